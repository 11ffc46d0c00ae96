//! The ledger of application charges, and the statement and settlement read from it.
//!
//! `record_charges` takes a batch (charges from any application servers and channels) in one
//! transaction: every charge is checked by [`crate::ledger`]'s rules against what this
//! transaction reads, and written under its unique (application server, idempotency key) only
//! when it passes. The row is the key and the ledger line at once. The commit is the
//! acknowledgement: no result leaves before it.
use std::collections::HashMap;

use proto::charge::{Charge, ChargeResult, Kind, Outcome};
use sqlx::Row;

use super::{CdrState, Store, StoreError};
use crate::ledger::{self, Limits, Refunded, SessionFacts};

/// Which way a charge came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Grpc,
    Info,
    Bye,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Grpc => "grpc",
            Channel::Info => "info",
            Channel::Bye => "bye",
        }
    }
}

/// One charge to record, with who sent it and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// The application server account (authenticated by the channel).
    pub appserver: String,
    pub channel: Channel,
    pub charge: Charge,
}

/// A recorded charge as read back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChargeRow {
    pub id: String,
    pub appserver: String,
    pub idempotency_key: String,
    pub session_id: String,
    pub user: String,
    pub service: Option<String>,
    pub kind: Kind,
    pub refunds: Option<String>,
    pub item_id: String,
    pub item_name: String,
    pub description: Option<String>,
    pub unit_price_minor: i64,
    pub quantity: i64,
    /// Price times quantity, positive for refunds too (their `kind` says which way).
    pub amount_minor: i64,
    pub currency: String,
    pub occurred_at_ms: i64,
    pub recorded_at_ms: i64,
    pub channel: String,
}

impl ChargeRow {
    /// The amount as it counts: a refund negative.
    pub fn signed_minor(&self) -> i64 {
        match self.kind {
            Kind::Charge => self.amount_minor,
            Kind::Refund => -self.amount_minor,
        }
    }
}

const CHARGE_COLUMNS: &str = "id, appserver, idempotency_key, session_id, user_name, service, kind, \
     refunds, item_id, item_name, description, unit_price_minor, quantity, amount_minor, currency, \
     occurred_at_ms, recorded_at_ms, channel";

fn charge_from_row(r: &sqlx::any::AnyRow) -> Result<ChargeRow, StoreError> {
    let kind: String = r.try_get("kind")?;
    Ok(ChargeRow {
        id: r.try_get("id")?,
        appserver: r.try_get("appserver")?,
        idempotency_key: r.try_get("idempotency_key")?,
        session_id: r.try_get("session_id")?,
        user: r.try_get("user_name")?,
        service: r.try_get("service")?,
        kind: Kind::parse(&kind).ok_or(StoreError::UnknownValue("charge kind", kind))?,
        refunds: r.try_get("refunds")?,
        item_id: r.try_get("item_id")?,
        item_name: r.try_get("item_name")?,
        description: r.try_get("description")?,
        unit_price_minor: r.try_get("unit_price_minor")?,
        quantity: r.try_get("quantity")?,
        amount_minor: r.try_get("amount_minor")?,
        currency: r.try_get("currency")?,
        occurred_at_ms: r.try_get("occurred_at_ms")?,
        recorded_at_ms: r.try_get("recorded_at_ms")?,
        channel: r.try_get("channel")?,
    })
}

fn done(key: &str, outcome: Outcome, id: String, amount: i64, at: i64) -> ChargeResult {
    ChargeResult {
        idempotency_key: key.to_owned(),
        outcome,
        charge_id: Some(id),
        amount_minor: Some(amount),
        recorded_at_ms: Some(at),
        message: None,
    }
}

fn refused(key: &str, r: ledger::Refusal) -> ChargeResult {
    ChargeResult {
        idempotency_key: key.to_owned(),
        outcome: r.outcome,
        charge_id: None,
        amount_minor: None,
        recorded_at_ms: None,
        message: Some(r.message),
    }
}

/// The message of a charge whose session is not (yet) in the store.
pub const NO_SUCH_SESSION: &str = "no such session";

type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// The result under a key already used: the first result when the charge is the same.
async fn earlier(
    tx: &mut Tx<'_>,
    appserver: &str,
    key: &str,
    fingerprint: &str,
    occurred_at_ms: i64,
) -> Result<Option<ChargeResult>, StoreError> {
    let row = sqlx::query(
        "SELECT id, fingerprint, amount_minor, occurred_at_ms, recorded_at_ms FROM charges \
         WHERE appserver = $1 AND idempotency_key = $2",
    )
    .bind(appserver)
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let stored: String = row.try_get("fingerprint")?;
    let at: i64 = row.try_get("occurred_at_ms")?;
    if stored == fingerprint && ledger::same_time(occurred_at_ms, at) {
        Ok(Some(done(
            key,
            Outcome::Duplicate,
            row.try_get("id")?,
            row.try_get("amount_minor")?,
            row.try_get("recorded_at_ms")?,
        )))
    } else {
        Ok(Some(ChargeResult {
            idempotency_key: key.to_owned(),
            outcome: Outcome::Conflict,
            charge_id: None,
            amount_minor: None,
            recorded_at_ms: None,
            message: Some(format!(
                "idempotency_key {key:?} was already used for a different charge (charge {}); nothing recorded",
                row.try_get::<String, _>("id")?
            )),
        }))
    }
}

impl Store {
    /// Records a batch of charges in one transaction; one result per submission, in order.
    /// Results are final only once this returns `Ok` (the commit).
    pub async fn record_charges(
        &self,
        batch: &[Submission],
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<Vec<ChargeResult>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut sessions: HashMap<String, Option<SessionFacts>> = HashMap::new();
        let mut limits: HashMap<String, Limits> = HashMap::new();
        let mut results = Vec::with_capacity(batch.len());
        for s in batch {
            let c = &s.charge;
            let key = c.idempotency_key.as_str();
            let amount = match ledger::check_fields(c) {
                Ok(a) => a,
                Err(r) => {
                    results.push(refused(key, r));
                    continue;
                }
            };
            let fingerprint = ledger::fingerprint(c);
            if let Some(r) =
                earlier(&mut tx, &s.appserver, key, &fingerprint, c.occurred_at_ms).await?
            {
                results.push(r);
                continue;
            }
            if !sessions.contains_key(&c.session_id) {
                let facts = session_facts(&mut tx, &c.session_id).await?;
                sessions.insert(c.session_id.clone(), facts);
            }
            let Some(Some(facts)) = sessions.get(&c.session_id) else {
                results.push(refused(
                    key,
                    ledger::Refusal {
                        outcome: Outcome::NotFound,
                        message: format!("{NO_SUCH_SESSION} {:?}", c.session_id),
                    },
                ));
                continue;
            };
            let at = if c.occurred_at_ms == 0 {
                now_ms
            } else {
                c.occurred_at_ms
            };
            if let Err(r) =
                ledger::check_session(&s.appserver, &c.session_id, facts, at, now_ms, grace_ms)
            {
                results.push(refused(key, r));
                continue;
            }
            let service = facts.service.clone();
            let user = facts.user.clone();
            match c.kind {
                Kind::Charge => {
                    let lim = match &service {
                        Some(name) => match limits.get(name) {
                            Some(l) => *l,
                            None => {
                                let l = service_limits(&mut tx, name).await?;
                                limits.insert(name.clone(), l);
                                l
                            }
                        },
                        None => Limits::default(),
                    };
                    let total = if lim.max_session_charges_minor.is_some() {
                        session_total(&mut tx, &c.session_id, &c.currency).await?
                    } else {
                        0
                    };
                    if let Err(r) = ledger::check_limits(amount, total, lim) {
                        results.push(refused(key, r));
                        continue;
                    }
                }
                Kind::Refund => {
                    let target = refund_target(
                        &mut tx,
                        &s.appserver,
                        c.refunds.as_deref().unwrap_or_default(),
                    )
                    .await?;
                    if let Err(r) = ledger::check_refund(c, amount, target.as_ref()) {
                        results.push(refused(key, r));
                        continue;
                    }
                }
            }
            // Time-ordered, so lines recorded in the same millisecond keep their order.
            let id = uuid::Uuid::now_v7().to_string();
            let inserted = sqlx::query(&format!(
                "INSERT INTO charges (fingerprint, {CHARGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, \
                 $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
                 ON CONFLICT (appserver, idempotency_key) DO NOTHING RETURNING id"
            ))
            .bind(&fingerprint)
            .bind(&id)
            .bind(&s.appserver)
            .bind(key)
            .bind(&c.session_id)
            .bind(&user)
            .bind(service.as_deref())
            .bind(c.kind.as_str())
            .bind(c.refunds.as_deref())
            .bind(&c.item_id)
            .bind(&c.item_name)
            .bind(c.description.as_deref())
            .bind(c.unit_price_minor)
            .bind(c.quantity)
            .bind(amount)
            .bind(&c.currency)
            .bind(at)
            .bind(now_ms)
            .bind(s.channel.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if inserted.is_some() {
                results.push(done(key, Outcome::Recorded, id, amount, now_ms));
            } else {
                // Another relay on the same database took the key since we looked.
                match earlier(&mut tx, &s.appserver, key, &fingerprint, c.occurred_at_ms).await? {
                    Some(r) => results.push(r),
                    None => return Err(StoreError::Db(sqlx::Error::RowNotFound)),
                }
            }
        }
        tx.commit().await?;
        Ok(results)
    }

    /// The charges of a user (as the caller of the sessions), or of an application server,
    /// oldest first, optionally in [from, to) by when they happened.
    pub async fn list_charges(
        &self,
        user: Option<&str>,
        appserver: Option<&str>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Result<Vec<ChargeRow>, StoreError> {
        let mut sql = format!("SELECT {CHARGE_COLUMNS} FROM charges WHERE 1 = 1");
        let mut n = 0;
        let mut arg = |column: &str, op: &str| {
            n += 1;
            format!(" AND {column} {op} ${n}")
        };
        if user.is_some() {
            sql.push_str(&arg("user_name", "="));
        }
        if appserver.is_some() {
            sql.push_str(&arg("appserver", "="));
        }
        if from_ms.is_some() {
            sql.push_str(&arg("occurred_at_ms", ">="));
        }
        if to_ms.is_some() {
            sql.push_str(&arg("occurred_at_ms", "<"));
        }
        sql.push_str(" ORDER BY occurred_at_ms, recorded_at_ms, id");
        let mut q = sqlx::query(&sql);
        if let Some(u) = user {
            q = q.bind(u);
        }
        if let Some(a) = appserver {
            q = q.bind(a);
        }
        if let Some(f) = from_ms {
            q = q.bind(f);
        }
        if let Some(t) = to_ms {
            q = q.bind(t);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(charge_from_row).collect()
    }

    /// The charges of one session, oldest first.
    pub async fn session_charges(&self, session_id: &str) -> Result<Vec<ChargeRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM charges WHERE session_id = $1 \
             ORDER BY occurred_at_ms, recorded_at_ms, id"
        ))
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(charge_from_row).collect()
    }

    /// Makes a new billing token's hash the application server's only one.
    pub async fn set_appserver_token(
        &self,
        name: &str,
        sha256_hex: &str,
    ) -> Result<(), StoreError> {
        let res = sqlx::query(
            "UPDATE users SET token_sha256 = $2, updated_at_ms = $3 WHERE name = $1 AND kind = 'appserver'",
        )
        .bind(name)
        .bind(sha256_hex)
        .bind(proto::clock::now_ms())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchAppServer(name.into()));
        }
        Ok(())
    }

    /// The application server whose billing token has this SHA-256 (hex).
    pub async fn appserver_by_token(&self, sha256_hex: &str) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT name FROM users WHERE token_sha256 = $1 AND kind = 'appserver'")
                .bind(sha256_hex)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get("name")).transpose()?)
    }

    /// Sets the operator's fee on an application server, in hundredths of a percent.
    pub async fn set_appserver_fee(&self, name: &str, basis_points: i64) -> Result<(), StoreError> {
        let res = sqlx::query(
            "UPDATE users SET fee_basis_points = $2 WHERE name = $1 AND kind = 'appserver'",
        )
        .bind(name)
        .bind(basis_points)
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchAppServer(name.into()));
        }
        Ok(())
    }

    /// The operator's fee on an application server (basis points), if it exists.
    pub async fn appserver_fee(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT fee_basis_points FROM users WHERE name = $1 AND kind = 'appserver'",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("fee_basis_points")).transpose()?)
    }
}

async fn session_facts(tx: &mut Tx<'_>, id: &str) -> Result<Option<SessionFacts>, StoreError> {
    let row = sqlx::query(
        "SELECT caller, server, service, state, created_at_ms, ended_at_ms FROM cdrs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let state: String = r.try_get("state")?;
    Ok(Some(SessionFacts {
        user: r.try_get("caller")?,
        server: r.try_get("server")?,
        service: r.try_get("service")?,
        state: CdrState::parse(&state).ok_or(StoreError::UnknownValue("record state", state))?,
        created_at_ms: r.try_get("created_at_ms")?,
        ended_at_ms: r.try_get("ended_at_ms")?,
    }))
}

async fn service_limits(tx: &mut Tx<'_>, name: &str) -> Result<Limits, StoreError> {
    let row = sqlx::query(
        "SELECT max_charge_minor, max_session_charges_minor FROM services WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match row {
        Some(r) => Limits {
            max_charge_minor: r.try_get("max_charge_minor")?,
            max_session_charges_minor: r.try_get("max_session_charges_minor")?,
        },
        None => Limits::default(),
    })
}

async fn session_total(tx: &mut Tx<'_>, session: &str, currency: &str) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(CASE WHEN kind = 'refund' THEN -amount_minor ELSE amount_minor END), 0) \
         AS BIGINT) AS total FROM charges WHERE session_id = $1 AND currency = $2",
    )
    .bind(session)
    .bind(currency)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get("total")?)
}

async fn refund_target(
    tx: &mut Tx<'_>,
    appserver: &str,
    key: &str,
) -> Result<Option<Refunded>, StoreError> {
    let row = sqlx::query(
        "SELECT session_id, kind, currency, amount_minor FROM charges \
         WHERE appserver = $1 AND idempotency_key = $2",
    )
    .bind(appserver)
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let refunded = sqlx::query(
        "SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) AS total FROM charges \
         WHERE appserver = $1 AND refunds = $2 AND kind = 'refund'",
    )
    .bind(appserver)
    .bind(key)
    .fetch_one(&mut **tx)
    .await?;
    let kind: String = r.try_get("kind")?;
    Ok(Some(Refunded {
        session_id: r.try_get("session_id")?,
        kind: Kind::parse(&kind).ok_or(StoreError::UnknownValue("charge kind", kind))?,
        currency: r.try_get("currency")?,
        amount_minor: r.try_get("amount_minor")?,
        refunded_minor: refunded.try_get("total")?,
    }))
}
