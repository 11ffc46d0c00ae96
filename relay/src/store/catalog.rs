//! Application-server accounts, services with their tariffs, operator rules, and the queries
//! of billing statements and restart recovery.

use super::{CDR_COLUMNS, Cdr, Store, StoreError, cdr_from_row, is_unique_violation, now_ms};
use sqlx::Row;
use sqlx::any::AnyRow;

/// How a service with several registered servers is offered (SPEC feature 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fork {
    /// All servers in parallel; the first 200 wins, the rest are cancelled.
    First,
    /// One server at a time; on to the next on a failure or timeout.
    Sequential,
    /// All servers in parallel; every one that accepts becomes its own session.
    All,
}

impl Fork {
    pub fn as_str(self) -> &'static str {
        match self {
            Fork::First => "first",
            Fork::Sequential => "sequential",
            Fork::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<Fork> {
        match s {
            "first" => Some(Fork::First),
            "sequential" => Some(Fork::Sequential),
            "all" => Some(Fork::All),
            _ => None,
        }
    }
}

/// A service and its tariff. Money is integer minor units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRow {
    pub name: String,
    pub per_minute_minor: i64,
    pub setup_fee_minor: i64,
    /// Billing increment: the duration is rounded up to a multiple of this many seconds.
    pub increment_secs: i64,
    /// ISO 4217 code.
    pub currency: String,
    pub fork: Fork,
    /// Sessions are ended by the relay after this long.
    pub max_duration_secs: Option<i64>,
    /// The most one application charge line (price x quantity) may be, minor units.
    pub max_charge_minor: Option<i64>,
    /// The most all application charges of one session may add up to, minor units.
    pub max_session_charges_minor: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// An application-server account (no secrets) and the services it may deliver.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppServerRow {
    pub name: String,
    pub realm: String,
    pub services: Vec<String>,
    /// The operator's fee on what it earns, in hundredths of a percent.
    pub fee_basis_points: i64,
    pub created_at_ms: i64,
}

/// An operator rule as stored: `conditions` is the rule language text (see `search`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleRow {
    pub id: i64,
    pub priority: i64,
    pub conditions: String,
    pub service: String,
    /// Comma-separated application-server accounts, in order.
    pub servers: Option<String>,
    /// Whether only `servers` may get the request (else they are tried first).
    pub servers_only: bool,
    pub created_at_ms: i64,
}

/// A redirect rule as stored: new INVITEs matching it get 302 to the additional server
/// `target` (on a relay that knows that name). Conditions left `None` hold always.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RedirectRow {
    pub id: i64,
    pub target: String,
    pub caller_domain: Option<String>,
    pub service: Option<String>,
    pub sessions_above: Option<i64>,
    pub created_at_ms: i64,
}

fn redirect_from_row(row: &AnyRow) -> Result<RedirectRow, StoreError> {
    Ok(RedirectRow {
        id: row.try_get("id")?,
        target: row.try_get("target")?,
        caller_domain: row.try_get("caller_domain")?,
        service: row.try_get("service")?,
        sessions_above: row.try_get("sessions_above")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

const SERVICE_COLUMNS: &str = "name, per_minute_minor, setup_fee_minor, increment_secs, currency, \
     fork, max_duration_secs, max_charge_minor, max_session_charges_minor, created_at_ms, \
     updated_at_ms";

fn service_from_row(row: &AnyRow) -> Result<ServiceRow, StoreError> {
    let fork: String = row.try_get("fork")?;
    Ok(ServiceRow {
        name: row.try_get("name")?,
        per_minute_minor: row.try_get("per_minute_minor")?,
        setup_fee_minor: row.try_get("setup_fee_minor")?,
        increment_secs: row.try_get("increment_secs")?,
        currency: row.try_get("currency")?,
        fork: Fork::parse(&fork).unwrap_or(Fork::First),
        max_duration_secs: row.try_get("max_duration_secs")?,
        max_charge_minor: row.try_get("max_charge_minor")?,
        max_session_charges_minor: row.try_get("max_session_charges_minor")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn rule_from_row(row: &AnyRow) -> Result<RuleRow, StoreError> {
    Ok(RuleRow {
        id: row.try_get("id")?,
        priority: row.try_get("priority")?,
        conditions: row.try_get("conditions")?,
        service: row.try_get("service")?,
        servers: row.try_get("servers")?,
        servers_only: row.try_get::<i64, _>("servers_only")? != 0,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

impl Store {
    // ------------------------------------------------------------ application servers

    /// Adds an application-server account allowed to deliver `services` (which must exist).
    pub async fn add_appserver(
        &self,
        name: &str,
        ha1_md5: &str,
        ha1_sha256: &str,
        realm: &str,
        services: &[String],
    ) -> Result<(), StoreError> {
        if self.service(name).await?.is_some() {
            return Err(StoreError::NameTaken(name.into(), "a service"));
        }
        for s in services {
            if self.service(s).await?.is_none() {
                return Err(StoreError::NoSuchService(s.clone()));
            }
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "INSERT INTO users (name, realm, ha1_md5, ha1_sha256, created_at_ms, updated_at_ms, kind) \
             VALUES ($1, $2, $3, $4, $5, $5, 'appserver')",
        )
        .bind(name)
        .bind(realm)
        .bind(ha1_md5)
        .bind(ha1_sha256)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(StoreError::UserExists(name.into())),
            Err(e) => return Err(e.into()),
        }
        for s in services {
            sqlx::query(
                "INSERT INTO appserver_services (account, service) VALUES ($1, $2) \
                 ON CONFLICT (account, service) DO NOTHING",
            )
            .bind(name)
            .bind(s)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes an application-server account, its service list and its registrations.
    pub async fn remove_appserver(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query("DELETE FROM users WHERE name = $1 AND kind = 'appserver'")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::NoSuchAppServer(name.into()));
        }
        sqlx::query("DELETE FROM appserver_services WHERE account = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM bindings WHERE account = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every application server with its services, by name.
    pub async fn list_appservers(&self) -> Result<Vec<AppServerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, realm, fee_basis_points, created_at_ms FROM users WHERE kind = 'appserver' \
             ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get("name")?;
            let services = self.appserver_services(&name).await?;
            out.push(AppServerRow {
                realm: row.try_get("realm")?,
                fee_basis_points: row.try_get("fee_basis_points")?,
                created_at_ms: row.try_get("created_at_ms")?,
                name,
                services,
            });
        }
        Ok(out)
    }

    /// Gives an application server the right to deliver `add` and takes it away for `remove`,
    /// in one transaction (every service to add must exist). A server that loses a service
    /// loses its registrations for it too.
    pub async fn update_appserver_services(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(), StoreError> {
        if self.account_kind(name).await?.as_deref() != Some("appserver") {
            return Err(StoreError::NoSuchAppServer(name.into()));
        }
        for s in add {
            if self.service(s).await?.is_none() {
                return Err(StoreError::NoSuchService(s.clone()));
            }
        }
        let mut tx = self.pool.begin().await?;
        for s in add {
            sqlx::query(
                "INSERT INTO appserver_services (account, service) VALUES ($1, $2) \
                 ON CONFLICT (account, service) DO NOTHING",
            )
            .bind(name)
            .bind(s)
            .execute(&mut *tx)
            .await?;
        }
        for s in remove {
            sqlx::query("DELETE FROM appserver_services WHERE account = $1 AND service = $2")
                .bind(name)
                .bind(s)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM bindings WHERE account = $1 AND aor = $2")
                .bind(name)
                .bind(s)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `user` or `appserver` for an existing account, `None` for no account of that name.
    pub async fn account_kind(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT kind FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("kind")).transpose()?)
    }

    /// The services an account may deliver (empty for end users).
    pub async fn appserver_services(&self, account: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT service FROM appserver_services WHERE account = $1 ORDER BY service",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("service").map_err(StoreError::from))
            .collect()
    }

    // ------------------------------------------------------------ services

    pub async fn add_service(&self, s: &ServiceRow) -> Result<(), StoreError> {
        if self.user_credentials(&s.name).await?.is_some() {
            return Err(StoreError::NameTaken(s.name.clone(), "an account"));
        }
        let res = sqlx::query(&format!(
            "INSERT INTO services ({SERVICE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)"
        ))
        .bind(&s.name)
        .bind(s.per_minute_minor)
        .bind(s.setup_fee_minor)
        .bind(s.increment_secs)
        .bind(&s.currency)
        .bind(s.fork.as_str())
        .bind(s.max_duration_secs)
        .bind(s.max_charge_minor)
        .bind(s.max_session_charges_minor)
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::ServiceExists(s.name.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Rewrites a service's tariff and settings.
    pub async fn update_service(&self, s: &ServiceRow) -> Result<(), StoreError> {
        let res = sqlx::query(
            "UPDATE services SET per_minute_minor = $2, setup_fee_minor = $3, increment_secs = $4, \
             currency = $5, fork = $6, max_duration_secs = $7, max_charge_minor = $8, \
             max_session_charges_minor = $9, updated_at_ms = $10 WHERE name = $1",
        )
        .bind(&s.name)
        .bind(s.per_minute_minor)
        .bind(s.setup_fee_minor)
        .bind(s.increment_secs)
        .bind(&s.currency)
        .bind(s.fork.as_str())
        .bind(s.max_duration_secs)
        .bind(s.max_charge_minor)
        .bind(s.max_session_charges_minor)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchService(s.name.clone()));
        }
        Ok(())
    }

    /// Removes a service (refused while a rule refers to it) and the right to deliver it.
    pub async fn remove_service(&self, name: &str) -> Result<(), StoreError> {
        if let Some(rule) = self
            .list_rules()
            .await?
            .into_iter()
            .find(|r| r.service == name)
        {
            return Err(StoreError::ServiceInUse {
                service: name.into(),
                rule: rule.id,
            });
        }
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query("DELETE FROM services WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::NoSuchService(name.into()));
        }
        sqlx::query("DELETE FROM appserver_services WHERE service = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM bindings WHERE aor = $1 AND account IS NOT NULL")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn service(&self, name: &str) -> Result<Option<ServiceRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(service_from_row).transpose()
    }

    pub async fn list_services(&self) -> Result<Vec<ServiceRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(service_from_row).collect()
    }

    // ------------------------------------------------------------ rules

    /// Adds a rule; returns its id. `servers_only`: only `servers` may get the request (else
    /// they are tried first).
    pub async fn add_rule(
        &self,
        priority: i64,
        conditions: &str,
        service: &str,
        servers: Option<&str>,
        servers_only: bool,
    ) -> Result<i64, StoreError> {
        if self.service(service).await?.is_none() {
            return Err(StoreError::NoSuchService(service.into()));
        }
        // Ids are small and increasing.
        self.insert_next_id("rules", |id| async move {
            sqlx::query(
                "INSERT INTO rules (id, priority, conditions, service, servers, created_at_ms, \
                 servers_only) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(id)
            .bind(priority)
            .bind(conditions)
            .bind(service)
            .bind(servers)
            .bind(now_ms())
            .bind(i64::from(servers_only))
            .execute(&self.pool)
            .await
            .map(|_| ())
        })
        .await
    }

    pub async fn remove_rule(&self, id: i64) -> Result<(), StoreError> {
        let res = sqlx::query("DELETE FROM rules WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchRule(id));
        }
        Ok(())
    }

    /// Adds a redirect rule; its id.
    pub async fn add_redirect(
        &self,
        target: &str,
        caller_domain: Option<&str>,
        service: Option<&str>,
        sessions_above: Option<i64>,
    ) -> Result<i64, StoreError> {
        self.insert_next_id("redirects", |id| async move {
            sqlx::query(
                "INSERT INTO redirects (id, target, caller_domain, service, sessions_above, \
                 created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(target)
            .bind(caller_domain)
            .bind(service)
            .bind(sessions_above)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map(|_| ())
        })
        .await
    }

    pub async fn remove_redirect(&self, id: i64) -> Result<(), StoreError> {
        let res = sqlx::query("DELETE FROM redirects WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchRedirect(id));
        }
        Ok(())
    }

    /// Redirect rules in the order they are tried (by id).
    pub async fn list_redirects(&self) -> Result<Vec<RedirectRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, target, caller_domain, service, sessions_above, created_at_ms \
             FROM redirects ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(redirect_from_row).collect()
    }

    /// Rules in the order they are tried: priority, then id.
    pub async fn list_rules(&self) -> Result<Vec<RuleRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, priority, conditions, service, servers, servers_only, created_at_ms \
             FROM rules ORDER BY priority, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from_row).collect()
    }

    // ------------------------------------------------------------ statements, recovery

    /// The records of sessions `user` opened (as the caller) that ended or are still open,
    /// created in `[from_ms, to_ms)`, oldest first.
    pub async fn user_sessions(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Cdr>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CDR_COLUMNS} FROM cdrs WHERE caller = $1 AND created_at_ms >= $2 \
             AND created_at_ms < $3 AND started_at_ms IS NOT NULL ORDER BY created_at_ms, id"
        ))
        .bind(user)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(cdr_from_row).collect()
    }
}
