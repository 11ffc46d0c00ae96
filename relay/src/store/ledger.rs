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

use super::{Cdr, CdrFilter, CdrState, Store, StoreError};
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

/// A key already used: its row's answer to a charge sent again.
struct Used {
    key: String,
    id: String,
    fingerprint: String,
    amount: i64,
    occurred_at_ms: i64,
    recorded_at_ms: i64,
}

impl Used {
    /// The first result when the charge is the same (time included unless none is given),
    /// else a conflict.
    fn answer(&self, key: &str, fingerprint: &str, occurred_at_ms: i64) -> ChargeResult {
        if self.fingerprint == fingerprint && ledger::same_time(occurred_at_ms, self.occurred_at_ms)
        {
            done(
                key,
                Outcome::Duplicate,
                self.id.clone(),
                self.amount,
                self.recorded_at_ms,
            )
        } else {
            ChargeResult {
                idempotency_key: key.to_owned(),
                outcome: Outcome::Conflict,
                charge_id: None,
                amount_minor: None,
                recorded_at_ms: None,
                message: Some(format!(
                    "idempotency_key {key:?} was already used for a different charge (charge {}); nothing recorded",
                    self.id
                )),
            }
        }
    }
}

/// A charge accepted in this batch, to be written.
struct Accepted {
    index: usize,
    id: String,
    fingerprint: String,
    appserver: String,
    key: String,
    session_id: String,
    user: String,
    service: Option<String>,
    kind: Kind,
    amount: i64,
    currency: String,
    at: i64,
}

/// The columns of a charge row as written, with their SQL types (PostgreSQL casts to them).
const ROW_COLUMNS: [(&str, &str); 19] = [
    ("fingerprint", "text"),
    ("id", "text"),
    ("appserver", "text"),
    ("idempotency_key", "text"),
    ("session_id", "text"),
    ("user_name", "text"),
    ("service", "text"),
    ("kind", "text"),
    ("refunds", "text"),
    ("item_id", "text"),
    ("item_name", "text"),
    ("description", "text"),
    ("unit_price_minor", "bigint"),
    ("quantity", "bigint"),
    ("amount_minor", "bigint"),
    ("currency", "text"),
    ("occurred_at_ms", "bigint"),
    ("recorded_at_ms", "bigint"),
    ("channel", "text"),
];

fn insert_charges_sql(postgres: bool) -> String {
    let names: Vec<&str> = ROW_COLUMNS.iter().map(|(n, _)| *n).collect();
    let types: Vec<&str> = ROW_COLUMNS.iter().map(|(_, t)| *t).collect();
    format!(
        "INSERT INTO charges ({}) {} \
         ON CONFLICT (appserver, idempotency_key) DO NOTHING RETURNING id",
        names.join(", "),
        super::select_json_rows(&types, postgres)
    )
}

static INSERT_CHARGES_SQLITE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_charges_sql(false));
static INSERT_CHARGES_POSTGRES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_charges_sql(true));

/// The rows as one JSON array, each an array in `ROW_COLUMNS` order.
fn rows_json(rows: &[Accepted], batch: &[Submission], now_ms: i64) -> Result<String, StoreError> {
    let mut list = Vec::with_capacity(rows.len());
    for r in rows {
        let s = &batch[r.index];
        let c = &s.charge;
        list.push(serde_json::json!([
            r.fingerprint,
            r.id,
            r.appserver,
            r.key,
            r.session_id,
            r.user,
            r.service,
            r.kind.as_str(),
            c.refunds,
            c.item_id,
            c.item_name,
            c.description,
            c.unit_price_minor,
            c.quantity,
            r.amount,
            c.currency,
            r.at,
            now_ms,
            s.channel.as_str(),
        ]));
    }
    serde_json::to_string(&list).map_err(|e| StoreError::Db(sqlx::Error::Encode(Box::new(e))))
}

impl Store {
    /// Records a batch of charges in one transaction; one result per submission, in order.
    /// Results are final only once this returns `Ok` (the commit). A few statements per batch,
    /// whatever its size: the keys already used, each session once, the rows in one insert.
    pub async fn record_charges(
        &self,
        batch: &[Submission],
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<Vec<ChargeResult>, StoreError> {
        // SQLite: the write lock from the start (waiting for it as long as the busy timeout
        // allows), or the insert after the reads would fail when another connection wrote in
        // between (SQLITE_BUSY_SNAPSHOT).
        let mut tx = if self.postgres {
            self.pool.begin().await?
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        };
        let mut results: Vec<Option<ChargeResult>> = vec![None; batch.len()];
        // 1. What needs nothing from the store.
        let mut candidates: Vec<(usize, i64, String)> = Vec::with_capacity(batch.len());
        for (i, s) in batch.iter().enumerate() {
            match ledger::check_fields(&s.charge) {
                Ok(amount) => candidates.push((i, amount, ledger::fingerprint(&s.charge))),
                Err(r) => results[i] = Some(refused(&s.charge.idempotency_key, r)),
            }
        }
        // 2. The keys used before, per application server.
        let mut by_server: HashMap<&str, Vec<&str>> = HashMap::new();
        for (i, _, _) in &candidates {
            let s = &batch[*i];
            by_server
                .entry(s.appserver.as_str())
                .or_default()
                .push(s.charge.idempotency_key.as_str());
        }
        let mut used: HashMap<(String, String), Used> = HashMap::new();
        for (server, keys) in by_server {
            for u in self.used_keys(&mut tx, server, &keys).await? {
                used.insert((server.to_string(), u.key.clone()), u);
            }
        }
        // 3. Each candidate in order, against the store and the batch before it.
        let mut sessions: HashMap<String, Option<SessionFacts>> = HashMap::new();
        let mut limits: HashMap<String, Limits> = HashMap::new();
        let mut totals: HashMap<(String, String), i64> = HashMap::new();
        let mut refunded: HashMap<(String, String), i64> = HashMap::new();
        let mut rows: Vec<Accepted> = Vec::new();
        for (i, amount, fingerprint) in candidates {
            let s = &batch[i];
            let c = &s.charge;
            let key = c.idempotency_key.as_str();
            let slot = (s.appserver.clone(), key.to_string());
            if let Some(u) = used.get(&slot) {
                results[i] = Some(u.answer(key, &fingerprint, c.occurred_at_ms));
                continue;
            }
            if !sessions.contains_key(&c.session_id) {
                let facts = session_facts(&mut tx, &c.session_id).await?;
                sessions.insert(c.session_id.clone(), facts);
            }
            let Some(Some(facts)) = sessions.get(&c.session_id) else {
                results[i] = Some(refused(
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
                results[i] = Some(refused(key, r));
                continue;
            }
            let total_key = (c.session_id.clone(), c.currency.clone());
            match c.kind {
                Kind::Charge => {
                    let lim = match &facts.service {
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
                        match totals.get(&total_key) {
                            Some(t) => *t,
                            None => {
                                let t = session_total(&mut tx, &c.session_id, &c.currency).await?;
                                totals.insert(total_key.clone(), t);
                                t
                            }
                        }
                    } else {
                        0
                    };
                    if let Err(r) = ledger::check_limits(amount, total, lim) {
                        results[i] = Some(refused(key, r));
                        continue;
                    }
                    if lim.max_session_charges_minor.is_some() {
                        totals.insert(total_key, total.saturating_add(amount));
                    }
                }
                Kind::Refund => {
                    let target_key = c.refunds.clone().unwrap_or_default();
                    let slot_t = (s.appserver.clone(), target_key.clone());
                    // The charge refunded may be in this batch, before this refund.
                    let mut target = match rows
                        .iter()
                        .find(|r| r.appserver == s.appserver && r.key == target_key)
                    {
                        Some(r) => Some(Refunded {
                            session_id: r.session_id.clone(),
                            kind: r.kind,
                            currency: r.currency.clone(),
                            amount_minor: r.amount,
                            refunded_minor: 0,
                        }),
                        None => refund_target(&mut tx, &s.appserver, &target_key).await?,
                    };
                    if let Some(t) = &mut target {
                        t.refunded_minor = t
                            .refunded_minor
                            .saturating_add(refunded.get(&slot_t).copied().unwrap_or(0));
                    }
                    if let Err(r) = ledger::check_refund(c, amount, target.as_ref()) {
                        results[i] = Some(refused(key, r));
                        continue;
                    }
                    *refunded.entry(slot_t).or_default() += amount;
                    if let Some(t) = totals.get_mut(&total_key) {
                        *t = t.saturating_sub(amount);
                    }
                }
            }
            let id = uuid::Uuid::now_v7().to_string();
            used.insert(
                slot,
                Used {
                    key: key.to_string(),
                    id: id.clone(),
                    fingerprint: fingerprint.clone(),
                    amount,
                    occurred_at_ms: at,
                    recorded_at_ms: now_ms,
                },
            );
            rows.push(Accepted {
                index: i,
                id,
                fingerprint,
                appserver: s.appserver.clone(),
                key: key.to_string(),
                session_id: c.session_id.clone(),
                user: facts.user.clone(),
                service: facts.service.clone(),
                kind: c.kind,
                amount,
                currency: c.currency.clone(),
                at,
            });
        }
        // 4. Every accepted charge in one statement; a key another relay took meanwhile is
        // answered from its row.
        if !rows.is_empty() {
            let json = rows_json(&rows, batch, now_ms)?;
            let sql = if self.postgres {
                &*INSERT_CHARGES_POSTGRES
            } else {
                &*INSERT_CHARGES_SQLITE
            };
            let mut written = std::collections::HashSet::with_capacity(rows.len());
            for r in sqlx::query(sql).bind(json).fetch_all(&mut *tx).await? {
                written.insert(r.try_get::<String, _>("id")?);
            }
            for r in &rows {
                let c = &batch[r.index].charge;
                results[r.index] = if written.contains(&r.id) {
                    Some(done(
                        &r.key,
                        Outcome::Recorded,
                        r.id.clone(),
                        r.amount,
                        now_ms,
                    ))
                } else {
                    let mut again = self
                        .used_keys(&mut tx, &r.appserver, &[r.key.as_str()])
                        .await?;
                    match again.pop() {
                        Some(u) => Some(u.answer(&r.key, &r.fingerprint, c.occurred_at_ms)),
                        None => return Err(StoreError::Db(sqlx::Error::RowNotFound)),
                    }
                };
            }
        }
        tx.commit().await?;
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    refused(
                        "",
                        ledger::Refusal {
                            outcome: Outcome::Invalid,
                            message: "not processed".into(),
                        },
                    )
                })
            })
            .collect())
    }

    /// The rows of `keys` already recorded for `appserver`.
    async fn used_keys(
        &self,
        tx: &mut Tx<'_>,
        appserver: &str,
        keys: &[&str],
    ) -> Result<Vec<Used>, StoreError> {
        let keys = serde_json::to_string(keys)
            .map_err(|e| StoreError::Db(sqlx::Error::Encode(Box::new(e))))?;
        let sql = if self.postgres {
            // The keys drive the join, so each is one lookup in the unique index (an `IN
            // (SELECT …)` let PostgreSQL's generic plan scan the table and re-read the keys).
            "SELECT c.id, c.idempotency_key, c.fingerprint, c.amount_minor, c.occurred_at_ms, \
             c.recorded_at_ms FROM jsonb_array_elements_text($2::text::jsonb) AS k(key) \
             JOIN charges c ON c.appserver = $1 AND c.idempotency_key = k.key"
        } else {
            // SQLite looks each key up in the unique index this way (a join on json_each's
            // untyped values would scan the table).
            "SELECT id, idempotency_key, fingerprint, amount_minor, occurred_at_ms, recorded_at_ms \
             FROM charges WHERE appserver = $1 AND idempotency_key IN (SELECT value FROM json_each($2))"
        };
        let rows = sqlx::query(sql)
            .bind(appserver)
            .bind(keys)
            .fetch_all(&mut **tx)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Used {
                    key: r.try_get("idempotency_key")?,
                    id: r.try_get("id")?,
                    fingerprint: r.try_get("fingerprint")?,
                    amount: r.try_get("amount_minor")?,
                    occurred_at_ms: r.try_get("occurred_at_ms")?,
                    recorded_at_ms: r.try_get("recorded_at_ms")?,
                })
            })
            .collect()
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

    /// What an application server's settlement sums, requested or happened in [from, to): its
    /// fee (basis points), its sessions and its charges, oldest first; `None` when no such
    /// application server exists.
    pub async fn settlement_rows(
        &self,
        appserver: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Result<Option<(i64, Vec<Cdr>, Vec<ChargeRow>)>, StoreError> {
        let Some(fee) = self.appserver_fee(appserver).await? else {
            return Ok(None);
        };
        let mut sessions = self
            .find_cdrs(&CdrFilter {
                server: Some(appserver.to_string()),
                from_ms,
                to_ms,
                ..CdrFilter::default()
            })
            .await?;
        sessions.reverse();
        let charges = self
            .list_charges(None, Some(appserver), from_ms, to_ms)
            .await?;
        Ok(Some((fee, sessions, charges)))
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
