//! # store: accounts, registrar bindings and call-detail records
//!
//! The only module of the relay that talks to a database (the only `sqlx` user).
//! One set of SQL serves both back ends through [`sqlx::AnyPool`]:
//!
//! - **SQLite** (the embedded default, `sqlite://relay.db`): the file is created when missing,
//!   runs in WAL mode with `synchronous=NORMAL` and a 5 s busy timeout, so admin commands
//!   (`relay user …`, `relay cdr …`) can run in another process while `relay serve` uses the
//!   same file. `sqlite::memory:` gives a private in-memory database (one connection).
//! - **PostgreSQL** (`postgres://…`): the shared store of several relays.
//!
//! Queries use `$N` placeholders, which both drivers accept. Migrations live in
//! `relay/migrations/{sqlite,postgres}` and run at [`Store::open`]. Times are UTC integer
//! milliseconds (`i64`); there are no floats.
use std::str::FromStr;
use std::sync::Once;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

mod catalog;
mod drains;
mod events;
mod ledger;
mod nodes;
pub use catalog::{AppServerRow, Fork, RedirectRow, RuleRow, ServiceRow};
pub use drains::{DrainOrder, DrainReport, WatchRow};
pub use events::ClusterEvent;
pub use ledger::{Channel, ChargeRow, NO_SUCH_SESSION, Submission};
pub use nodes::NodeLease;

/// Errors of the store. `Display` gives a message fit for an operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `add_user` for a name that exists.
    #[error("user \"{0}\" already exists")]
    UserExists(String),
    /// The named user does not exist.
    #[error("no such user \"{0}\"")]
    NoSuchUser(String),
    /// The name is already used by an account or a service (they share `sip:NAME@DOMAIN`).
    #[error("the name \"{0}\" is already used by {1}")]
    NameTaken(String, &'static str),
    /// No service of that name.
    #[error("no such service \"{0}\"")]
    NoSuchService(String),
    /// `add_service` for a name that exists.
    #[error("service \"{0}\" already exists")]
    ServiceExists(String),
    /// No application server of that name.
    #[error("no such application server \"{0}\"")]
    NoSuchAppServer(String),
    /// No rule with that id.
    #[error("no such rule {0}")]
    NoSuchRule(i64),
    /// No redirect rule with that id.
    #[error("no such redirect {0}")]
    NoSuchRedirect(i64),
    /// A service still referred to by rules cannot be removed.
    #[error("service \"{service}\" is used by rule {rule}; remove the rule first")]
    ServiceInUse { service: String, rule: i64 },
    /// `insert_cdr` with an id that is already stored (the first record is kept unchanged).
    #[error("call record \"{0}\" already exists")]
    CdrExists(String),
    /// `update_cdr` for an id that is not stored.
    #[error("no such call record \"{0}\"")]
    NoSuchCdr(String),
    /// The database server did not answer.
    #[error("the database server is unreachable: {0}")]
    Unreachable(String),
    /// The database URL names no back end this store supports.
    #[error("unsupported database URL \"{0}\": use sqlite://FILE, sqlite::memory: or postgres://…")]
    UnsupportedUrl(String),
    /// A stored value does not fit the Rust type (e.g. a status beyond `i32`).
    #[error("bad value in column {column}: {value}")]
    BadValue { column: &'static str, value: i64 },
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A column holds a value this version does not know (a newer relay wrote it?).
    #[error("the database holds an unknown {0} {1:?}")]
    UnknownValue(&'static str, String),
    /// Applying the schema migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// An account as listed by `relay user list` (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserRow {
    pub name: String,
    pub realm: String,
    pub created_at_ms: i64,
}

/// What digest authentication needs of an account: the HA1 hashes and the realm they were
/// computed for. Passwords are never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCredentials {
    /// `MD5(user:realm:password)`, lower-case hex.
    pub ha1_md5: String,
    /// `SHA-256(user:realm:password)`, lower-case hex.
    pub ha1_sha256: String,
    pub realm: String,
}

/// A registrar binding: one Contact of one address-of-record (AOR = the user name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub aor: String,
    /// The Contact URI as text.
    pub contact: String,
    /// `+sip.instance` of the Contact, if given.
    pub instance: Option<String>,
    pub expires_at_ms: i64,
    /// `q` × 1000.
    pub q: Option<i32>,
    pub call_id: String,
    pub cseq: i64,
    /// Where the REGISTER came from, e.g. `udp:127.0.0.1:5070` or `tcp:…`.
    pub source: String,
    pub updated_at_ms: i64,
    /// The account whose REGISTER made the binding (for a service: the application server).
    pub account: Option<String>,
    /// The User-Agent of the REGISTER that made or last refreshed it.
    pub user_agent: Option<String>,
    /// The node id of the relay that took that REGISTER (none in bindings made before it was
    /// kept).
    pub node: Option<String>,
}

/// Which records [`Store::find_cdrs`] returns: those that meet every condition given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdrFilter {
    /// The caller or the callee.
    pub user: Option<String>,
    /// Any of these states.
    pub states: Option<Vec<CdrState>>,
    pub service: Option<String>,
    pub server: Option<String>,
    /// Requested at or after this instant (UTC milliseconds).
    pub from_ms: Option<i64>,
    /// Requested before this instant.
    pub to_ms: Option<i64>,
    /// At most this many, the newest.
    pub limit: Option<i64>,
}

/// Where a record stands; text (`attempt`, `answered`, …) only in the database and in output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CdrState {
    /// An INVITE being relayed, no answer yet.
    #[default]
    Attempt,
    /// Answered 2xx, not yet acknowledged.
    Answered,
    /// Acknowledged: the session runs.
    Established,
    /// The session ended.
    Ended,
    /// The attempt made no session.
    Failed,
}

impl CdrState {
    pub const ALL: [CdrState; 5] = [
        CdrState::Attempt,
        CdrState::Answered,
        CdrState::Established,
        CdrState::Ended,
        CdrState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CdrState::Attempt => "attempt",
            CdrState::Answered => "answered",
            CdrState::Established => "established",
            CdrState::Ended => "ended",
            CdrState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<CdrState> {
        CdrState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// `ended` or `failed`: nothing changes the record any more.
    pub fn is_final(self) -> bool {
        matches!(self, CdrState::Ended | CdrState::Failed)
    }
}

impl std::fmt::Display for CdrState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A party of a session, and who ended it (`relay` when the relay did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Party {
    Caller,
    Callee,
    Relay,
}

impl Party {
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Caller => "caller",
            Party::Callee => "callee",
            Party::Relay => "relay",
        }
    }

    pub fn parse(text: &str) -> Option<Party> {
        [Party::Caller, Party::Callee, Party::Relay]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call-detail record: one per INVITE received, answered or not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cdr {
    /// A UUID.
    pub id: String,
    pub call_id: String,
    pub caller: String,
    pub callee: String,
    /// When the INVITE was received.
    pub created_at_ms: i64,
    /// When the ACK was relayed.
    pub started_at_ms: Option<i64>,
    /// When the 200 for BYE (or the failure final response) was relayed.
    pub ended_at_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    /// Who ended the session.
    pub ended_by: Option<Party>,
    /// Final SIP status of the INVITE.
    pub status: Option<i32>,
    /// e.g. `bye`, `cancel`, `busy`, `timeout`, `not-registered`.
    pub reason: Option<String>,
    pub state: CdrState,
    /// The service of a service session (none for a plain call).
    pub service: Option<String>,
    /// The application-server account that accepted the session.
    pub server: Option<String>,
    /// The `detail` of the service request.
    pub details: Option<String>,
    /// The time charge rated by the service's tariff, integer minor units of `currency`.
    pub charge_minor: Option<i64>,
    /// ISO 4217 code of `charge_minor`.
    pub currency: Option<String>,
    /// The seconds billed: the duration rounded up to the tariff's increment.
    pub billed_secs: Option<i64>,
    /// The last sign of life of both parties (UTC ms).
    pub last_alive_ms: Option<i64>,
    /// When a relay restart found the session alive and resumed supervising it.
    pub resumed_at_ms: Option<i64>,
    /// What the relay needs to supervise or end the session after a restart (JSON; internal).
    #[serde(skip)]
    pub dialog: Option<String>,
    /// The node id of the relay that keeps the record.
    pub owner: Option<String>,
    /// The run of that relay that keeps it now ([`Store::take_node`]); internal.
    #[serde(skip)]
    pub instance: Option<String>,
    /// The session's segments, a JSON array (`session::Segment`): one per service and details
    /// in force, each rated by its own tariff; the charge is their sum. None for a plain call.
    pub segments: Option<String>,
    /// The session this one continues (a transfer, or a followed REFER).
    pub transferred_from: Option<String>,
}

/// Number of columns of a record.
const CDR_PARAMS: usize = 25;

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a record's columns in `CDR_COLUMNS` order.
fn bind_cdr<'q>(q: AnyQuery<'q>, cdr: &'q Cdr) -> AnyQuery<'q> {
    q.bind(&cdr.id)
        .bind(&cdr.call_id)
        .bind(&cdr.caller)
        .bind(&cdr.callee)
        .bind(cdr.created_at_ms)
        .bind(cdr.started_at_ms)
        .bind(cdr.ended_at_ms)
        .bind(cdr.duration_ms)
        .bind(cdr.ended_by.map(Party::as_str))
        .bind(cdr.status)
        .bind(cdr.reason.as_deref())
        .bind(cdr.state.as_str())
        .bind(cdr.service.as_deref())
        .bind(cdr.server.as_deref())
        .bind(cdr.details.as_deref())
        .bind(cdr.charge_minor)
        .bind(cdr.currency.as_deref())
        .bind(cdr.billed_secs)
        .bind(cdr.last_alive_ms)
        .bind(cdr.resumed_at_ms)
        .bind(cdr.dialog.as_deref())
        .bind(cdr.owner.as_deref())
        .bind(cdr.instance.as_deref())
        .bind(cdr.segments.as_deref())
        .bind(cdr.transferred_from.as_deref())
}

fn insert_cdr_query(cdr: &Cdr) -> AnyQuery<'_> {
    bind_cdr(sqlx::query(INSERT_CDR), cdr)
}

fn update_cdr_query(cdr: &Cdr) -> AnyQuery<'_> {
    let q = sqlx::query(
        "UPDATE cdrs SET call_id = $2, caller = $3, callee = $4, created_at_ms = $5, \
         started_at_ms = $6, ended_at_ms = $7, duration_ms = $8, ended_by = $9, \
         status = $10, reason = $11, state = $12, service = $13, server = $14, details = $15, \
         charge_minor = $16, currency = $17, billed_secs = $18, last_alive_ms = $19, \
         resumed_at_ms = $20, dialog = $21, owner = $22, instance = $23, segments = $24, transferred_from = $25 WHERE id = $1",
    );
    bind_cdr(q, cdr)
}

/// Handle to the database; cheap to clone (a pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    postgres: bool,
    /// PostgreSQL: the database's URL, for the connection that listens to other relays.
    url: Option<SecretUrl>,
}

/// A database URL that may hold a password: never shown by `Debug`.
#[derive(Clone)]
struct SecretUrl(std::sync::Arc<str>);

impl SecretUrl {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

static DRIVERS: Once = Once::new();

const BINDING_COLUMNS: &str = "aor, contact, instance, expires_at_ms, q, call_id, cseq, source, updated_at_ms, account, \
     user_agent, node";
const CDR_COLUMNS: &str = "id, call_id, caller, callee, created_at_ms, started_at_ms, \
     ended_at_ms, duration_ms, ended_by, status, reason, state, service, server, details, \
     charge_minor, currency, billed_secs, last_alive_ms, resumed_at_ms, dialog, owner, instance, \
     segments, transferred_from";
const INSERT_CDR: &str = "INSERT INTO cdrs (id, call_id, caller, callee, created_at_ms, started_at_ms, \
     ended_at_ms, duration_ms, ended_by, status, reason, state, service, server, details, \
     charge_minor, currency, billed_secs, last_alive_ms, resumed_at_ms, dialog, owner, instance, \
     segments, transferred_from) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19, $20, $21, $22, $23, $24, $25)";

/// The SQL type of each of `CDR_COLUMNS`, in order (PostgreSQL casts a JSON field to it).
const CDR_TYPES: [&str; CDR_PARAMS] = [
    "text", "text", "text", "text", "bigint", "bigint", "bigint", "bigint", "text", "integer",
    "text", "text", "text", "text", "text", "bigint", "text", "bigint", "bigint", "bigint", "text",
    "text", "text", "text", "text",
];

/// Who called whom, when and in which call never change once a record exists; leaving them out
/// of the update spares SQLite their index maintenance. A closed record, or one another run of a
/// relay has taken over, is never written again.
const UPSERT_CDRS_TAIL: &str = " ON CONFLICT (id) DO UPDATE SET started_at_ms = excluded.started_at_ms, \
     ended_at_ms = excluded.ended_at_ms, duration_ms = excluded.duration_ms, \
     ended_by = excluded.ended_by, status = excluded.status, \
     reason = excluded.reason, state = excluded.state, \
     server = excluded.server, service = excluded.service, details = excluded.details, \
     segments = excluded.segments, charge_minor = excluded.charge_minor, \
     currency = excluded.currency, billed_secs = excluded.billed_secs, \
     last_alive_ms = excluded.last_alive_ms, resumed_at_ms = excluded.resumed_at_ms, \
     dialog = excluded.dialog, owner = excluded.owner, instance = excluded.instance \
     WHERE cdrs.state NOT IN ('ended', 'failed') \
     AND (cdrs.instance IS NULL OR cdrs.instance = excluded.instance) \
     RETURNING id";

/// A `SELECT` of the rows of one JSON array, the statement's only parameter, each row an array
/// of columns of SQL types `types` (PostgreSQL casts each field to its type): one statement
/// whatever the number of rows, so one prepared statement per connection. `WHERE true` keeps
/// SQLite from reading a following `ON CONFLICT` as a join constraint.
fn select_json_rows(types: &[&str], postgres: bool) -> String {
    let fields: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(k, ty)| {
            if postgres {
                format!("(value ->> {k})::{ty}")
            } else {
                format!("value ->> {k}")
            }
        })
        .collect();
    let from = if postgres {
        "jsonb_array_elements($1::text::jsonb)"
    } else {
        "json_each(?) WHERE true"
    };
    format!("SELECT {} FROM {from}", fields.join(", "))
}

/// Upserts the records of one JSON array of rows (`cdr_rows_json`).
static UPSERT_CDRS_SQLITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO cdrs ({CDR_COLUMNS}) {}{UPSERT_CDRS_TAIL}",
        select_json_rows(&CDR_TYPES, false)
    )
});

static UPSERT_CDRS_POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO cdrs ({CDR_COLUMNS}) {}{UPSERT_CDRS_TAIL}",
        select_json_rows(&CDR_TYPES, true)
    )
});

/// The records as one JSON array of rows, each an array of its columns in `CDR_COLUMNS` order.
fn cdr_rows_json(cdrs: &[Cdr]) -> Result<String, StoreError> {
    fn field<T: serde::Serialize + ?Sized>(
        out: &mut Vec<u8>,
        first: bool,
        value: &T,
    ) -> serde_json::Result<()> {
        if !first {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, value)
    }
    let mut out = Vec::with_capacity(cdrs.len() * 400);
    out.push(b'[');
    for (i, cdr) in cdrs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        let row = (|| -> serde_json::Result<()> {
            field(&mut out, true, &cdr.id)?;
            field(&mut out, false, &cdr.call_id)?;
            field(&mut out, false, &cdr.caller)?;
            field(&mut out, false, &cdr.callee)?;
            field(&mut out, false, &cdr.created_at_ms)?;
            field(&mut out, false, &cdr.started_at_ms)?;
            field(&mut out, false, &cdr.ended_at_ms)?;
            field(&mut out, false, &cdr.duration_ms)?;
            field(&mut out, false, &cdr.ended_by.map(Party::as_str))?;
            field(&mut out, false, &cdr.status)?;
            field(&mut out, false, &cdr.reason)?;
            field(&mut out, false, cdr.state.as_str())?;
            field(&mut out, false, &cdr.service)?;
            field(&mut out, false, &cdr.server)?;
            field(&mut out, false, &cdr.details)?;
            field(&mut out, false, &cdr.charge_minor)?;
            field(&mut out, false, &cdr.currency)?;
            field(&mut out, false, &cdr.billed_secs)?;
            field(&mut out, false, &cdr.last_alive_ms)?;
            field(&mut out, false, &cdr.resumed_at_ms)?;
            field(&mut out, false, &cdr.dialog)?;
            field(&mut out, false, &cdr.owner)?;
            field(&mut out, false, &cdr.instance)?;
            field(&mut out, false, &cdr.segments)?;
            field(&mut out, false, &cdr.transferred_from)
        })();
        row.map_err(|e| StoreError::Db(sqlx::Error::Encode(Box::new(e))))?;
        out.push(b']');
    }
    out.push(b']');
    String::from_utf8(out).map_err(|e| StoreError::Db(sqlx::Error::Encode(Box::new(e))))
}

use proto::clock::now_ms;

impl Store {
    /// Inserts a row whose id is the next after the largest in `table`, as `insert(id)` does; an
    /// insert that meets a concurrent one on the same id fails on the primary key and is tried
    /// again with the next. The id.
    pub(crate) async fn insert_next_id<F, Fut>(
        &self,
        table: &str,
        insert: F,
    ) -> Result<i64, StoreError>
    where
        F: Fn(i64) -> Fut,
        Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
    {
        let max = format!("SELECT COALESCE(MAX(id), 0) AS m FROM {table}");
        for _ in 0..5 {
            let row = sqlx::query(&max).fetch_one(&self.pool).await?;
            let id: i64 = row.try_get::<i64, _>("m")? + 1;
            match insert(id).await {
                Ok(()) => return Ok(id),
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Db(sqlx::Error::Protocol(format!(
            "could not allocate an id in {table}"
        ))))
    }
}

/// Hides the password of a `scheme://user:password@host/…` URL.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                ),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn opt_i32(row: &AnyRow, column: &'static str) -> Result<Option<i32>, StoreError> {
    let v: Option<i64> = row.try_get(column)?;
    v.map(|v| i32::try_from(v).map_err(|_| StoreError::BadValue { column, value: v }))
        .transpose()
}

fn binding_from_row(row: &AnyRow) -> Result<Binding, StoreError> {
    Ok(Binding {
        aor: row.try_get("aor")?,
        contact: row.try_get("contact")?,
        instance: row.try_get("instance")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        q: opt_i32(row, "q")?,
        call_id: row.try_get("call_id")?,
        cseq: row.try_get("cseq")?,
        source: row.try_get("source")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        account: row.try_get("account")?,
        user_agent: row.try_get("user_agent")?,
        node: row.try_get("node")?,
    })
}

fn cdr_from_row(row: &AnyRow) -> Result<Cdr, StoreError> {
    Ok(Cdr {
        id: row.try_get("id")?,
        call_id: row.try_get("call_id")?,
        caller: row.try_get("caller")?,
        callee: row.try_get("callee")?,
        created_at_ms: row.try_get("created_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        ended_at_ms: row.try_get("ended_at_ms")?,
        duration_ms: row.try_get("duration_ms")?,
        ended_by: match row.try_get::<Option<String>, _>("ended_by")? {
            Some(text) => {
                Some(Party::parse(&text).ok_or(StoreError::UnknownValue("ended_by", text))?)
            }
            None => None,
        },
        status: opt_i32(row, "status")?,
        reason: row.try_get("reason")?,
        state: {
            let text: String = row.try_get("state")?;
            CdrState::parse(&text).ok_or(StoreError::UnknownValue("state", text))?
        },
        service: row.try_get("service")?,
        server: row.try_get("server")?,
        details: row.try_get("details")?,
        charge_minor: row.try_get("charge_minor")?,
        currency: row.try_get("currency")?,
        billed_secs: row.try_get("billed_secs")?,
        last_alive_ms: row.try_get("last_alive_ms")?,
        resumed_at_ms: row.try_get("resumed_at_ms")?,
        dialog: row.try_get("dialog")?,
        owner: row.try_get("owner")?,
        instance: row.try_get("instance")?,
        segments: row.try_get("segments")?,
        transferred_from: row.try_get("transferred_from")?,
    })
}

/// The file a SQLite URL names (`sqlite://PATH`, `sqlite:PATH`, with or without `?…`); `None`
/// for an in-memory database or another kind of database.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

/// Creates a new database file readable and writable by its owner only (SQLite gives its -wal
/// and -shm files the same permissions). An existing file is left as it is.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // Let SQLite report what is wrong with the path (a missing directory, …).
        Err(_) => Ok(()),
    }
}

/// Normalises a SQLite URL: adds `mode=rwc` (create when missing) unless a mode is given.
fn sqlite_url(url: &str) -> String {
    let memory = url == "sqlite::memory:" || url.starts_with("sqlite::memory:?");
    if memory || url.contains("mode=") {
        return url.to_owned();
    }
    if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

impl Store {
    /// Opens (and for SQLite creates) the database and applies the migrations.
    ///
    /// Accepts `sqlite://PATH`, `sqlite:PATH`, `sqlite::memory:` and `postgres://…`
    /// (or `postgresql://…`).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let sqlite = url.starts_with("sqlite:");
        if !postgres && !sqlite {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        let url = if sqlite {
            if let Some(path) = sqlite_path(url) {
                create_private(&path)?;
            }
            sqlite_url(url)
        } else {
            url.to_owned()
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        if postgres {
            // One connection first: its error says what is wrong (refused, no such database,
            // authentication), where the pool would only say that it timed out.
            use sqlx::Connection as _;
            let conn = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                sqlx::AnyConnection::connect_with(&options),
            )
            .await
            .map_err(|_| StoreError::Unreachable("no answer within 10 s".into()))??;
            let _ = conn.close().await;
        }

        let mut pool_options = AnyPoolOptions::new();
        if sqlite {
            if memory {
                // Each new connection would open a distinct in-memory database: keep exactly one,
                // forever.
                pool_options = pool_options
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            } else {
                pool_options = pool_options.max_connections(8);
            }
            pool_options = pool_options.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if !memory {
                        // Persistent in the file; a no-op once set.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        } else {
            pool_options = pool_options.max_connections(16);
        }
        let pool = pool_options.connect_with(options).await?;
        if postgres {
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        } else {
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        }
        let url = postgres.then(|| SecretUrl(url.as_str().into()));
        Ok(Store {
            pool,
            postgres,
            url,
        })
    }

    /// Whether this store is on PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---------------------------------------------------------------- accounts

    /// Adds an account. Fails with [`StoreError::UserExists`] when the name is taken.
    pub async fn add_user(
        &self,
        name: &str,
        ha1_md5: &str,
        ha1_sha256: &str,
        realm: &str,
    ) -> Result<(), StoreError> {
        if self.service(name).await?.is_some() {
            return Err(StoreError::NameTaken(name.to_owned(), "a service"));
        }
        let now = now_ms();
        let res = sqlx::query(
            "INSERT INTO users (name, realm, ha1_md5, ha1_sha256, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(name)
        .bind(realm)
        .bind(ha1_md5)
        .bind(ha1_sha256)
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::UserExists(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces an account's HA1 hashes (and realm). Fails with [`StoreError::NoSuchUser`].
    pub async fn set_user_password(
        &self,
        name: &str,
        ha1_md5: &str,
        ha1_sha256: &str,
        realm: &str,
    ) -> Result<(), StoreError> {
        let res = sqlx::query(
            "UPDATE users SET ha1_md5 = $2, ha1_sha256 = $3, realm = $4, updated_at_ms = $5 \
             WHERE name = $1",
        )
        .bind(name)
        .bind(ha1_md5)
        .bind(ha1_sha256)
        .bind(realm)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchUser(name.to_owned()));
        }
        Ok(())
    }

    /// Removes an account and its registrar bindings, in one transaction.
    pub async fn remove_user(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM bindings WHERE aor = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let res = sqlx::query("DELETE FROM users WHERE name = $1 AND kind = 'user'")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::NoSuchUser(name.to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    /// All end-user accounts (not application servers), by name.
    pub async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, realm, created_at_ms FROM users WHERE kind = 'user' ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(UserRow {
                    name: row.try_get("name")?,
                    realm: row.try_get("realm")?,
                    created_at_ms: row.try_get("created_at_ms")?,
                })
            })
            .collect()
    }

    /// The HA1 hashes of an account (primary-key lookup; cheap enough for every request).
    pub async fn user_credentials(
        &self,
        name: &str,
    ) -> Result<Option<UserCredentials>, StoreError> {
        let row = sqlx::query("SELECT ha1_md5, ha1_sha256, realm FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(UserCredentials {
                ha1_md5: row.try_get("ha1_md5")?,
                ha1_sha256: row.try_get("ha1_sha256")?,
                realm: row.try_get("realm")?,
            })
        })
        .transpose()
    }

    // ---------------------------------------------------------------- bindings

    /// Inserts or replaces the binding keyed by `(aor, contact)`.
    pub async fn upsert_binding(&self, b: &Binding) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO bindings ({BINDING_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (aor, contact) DO UPDATE SET instance = excluded.instance, \
             account = excluded.account, user_agent = excluded.user_agent, node = excluded.node, \
             expires_at_ms = excluded.expires_at_ms, q = excluded.q, call_id = excluded.call_id, \
             cseq = excluded.cseq, source = excluded.source, updated_at_ms = excluded.updated_at_ms"
        ))
        .bind(&b.aor)
        .bind(&b.contact)
        .bind(b.instance.as_deref())
        .bind(b.expires_at_ms)
        .bind(b.q)
        .bind(&b.call_id)
        .bind(b.cseq)
        .bind(&b.source)
        .bind(b.updated_at_ms)
        .bind(b.account.as_deref())
        .bind(b.user_agent.as_deref())
        .bind(b.node.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes one binding made by `account` (`None`: a user's own), if it exists.
    pub async fn remove_binding(
        &self,
        aor: &str,
        contact: &str,
        account: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM bindings WHERE aor = $1 AND contact = $2 \
             AND COALESCE(account, '') = COALESCE($3, '')",
        )
        .bind(aor)
        .bind(contact)
        .bind(account)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes every binding of an AOR (`Contact: *`).
    pub async fn remove_bindings(&self, aor: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM bindings WHERE aor = $1")
            .bind(aor)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The unexpired bindings of an AOR (`expires_at_ms > now_ms`), highest q first.
    pub async fn bindings(&self, aor: &str, now_ms: i64) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE aor = $1 AND expires_at_ms > $2 \
             ORDER BY COALESCE(q, 1000) DESC, updated_at_ms DESC, contact"
        ))
        .bind(aor)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(binding_from_row).collect()
    }

    /// Every unexpired binding, by AOR.
    pub async fn all_bindings(&self, now_ms: i64) -> Result<Vec<Binding>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {BINDING_COLUMNS} FROM bindings WHERE expires_at_ms > $1 \
             ORDER BY aor, COALESCE(q, 1000) DESC, updated_at_ms DESC, contact"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(binding_from_row).collect()
    }

    /// How many bindings are unexpired at `now_ms`.
    pub async fn count_bindings(&self, now_ms: i64) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM bindings WHERE expires_at_ms > $1")
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Whether the database answers (a trivial query).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Deletes the bindings expired at `now_ms`; returns how many.
    pub async fn purge_expired_bindings(&self, now_ms: i64) -> Result<u64, StoreError> {
        let res = sqlx::query("DELETE FROM bindings WHERE expires_at_ms <= $1")
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected())
    }

    // ---------------------------------------------------------------- CDRs

    /// Stores a new CDR. A second insert of the same id fails with [`StoreError::CdrExists`]
    /// and leaves the first record as it was.
    pub async fn insert_cdr(&self, cdr: &Cdr) -> Result<(), StoreError> {
        match insert_cdr_query(cdr).execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::CdrExists(cdr.id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Rewrites every field of the CDR with `cdr.id`. Fails with [`StoreError::NoSuchCdr`].
    pub async fn update_cdr(&self, cdr: &Cdr) -> Result<(), StoreError> {
        let res = update_cdr_query(cdr).execute(&self.pool).await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchCdr(cdr.id.clone()));
        }
        Ok(())
    }

    /// Saves the current state of several records in one statement and one transaction (group
    /// commit): a record not stored yet is inserted; a stored one gets its outcome (start, end,
    /// duration, who ended it, status, reason, state) overwritten, while who called whom, when
    /// and in which call stay as first written. Each id may appear once; the caller keeps only
    /// the newest state of a record.
    ///
    /// A stored record is left alone when its state is final (`ended`, `failed`) or when another
    /// run of a relay keeps it (its `instance` differs): a stale write never overwrites a closed
    /// record, and a relay that lost its node's lease changes nothing. Returns the ids of the
    /// records that were written.
    pub async fn save_cdrs(
        &self,
        cdrs: &[Cdr],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut written = std::collections::HashSet::with_capacity(cdrs.len());
        // The rows travel as one JSON array bound to one parameter, so a batch of any size is the
        // same statement: one prepared statement per connection instead of one per batch size
        // (which filled the statement caches, and memory with them, as sizes varied).
        let sql = if self.postgres {
            &*UPSERT_CDRS_POSTGRES
        } else {
            &*UPSERT_CDRS_SQLITE
        };
        let rows = cdr_rows_json(cdrs)?;
        for row in sqlx::query(sql).bind(rows).fetch_all(&self.pool).await? {
            written.insert(row.try_get::<String, _>("id")?);
        }
        Ok(written)
    }

    /// CDRs, newest first; with `user`, only those where the user is caller or callee;
    /// with `limit`, at most that many (a negative limit counts as 0).
    pub async fn list_cdrs(
        &self,
        user: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Vec<Cdr>, StoreError> {
        self.find_cdrs(&CdrFilter {
            user: user.map(str::to_owned),
            limit,
            ..CdrFilter::default()
        })
        .await
    }

    /// The records that match every condition of `filter`, newest first.
    pub async fn find_cdrs(&self, filter: &CdrFilter) -> Result<Vec<Cdr>, StoreError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut texts: Vec<&str> = Vec::new();
        let mut numbers: Vec<i64> = Vec::new();
        // Text parameters first, numbers after: placeholders are numbered in that order.
        if let Some(user) = &filter.user {
            texts.push(user);
            let n = texts.len();
            conditions.push(format!("(caller = ${n} OR callee = ${n})"));
        }
        if let Some(states) = &filter.states {
            let mut alternatives = Vec::new();
            for st in states {
                texts.push(st.as_str());
                alternatives.push(format!("state = ${}", texts.len()));
            }
            conditions.push(format!("({})", alternatives.join(" OR ")));
        }
        if let Some(service) = &filter.service {
            texts.push(service);
            conditions.push(format!("service = ${}", texts.len()));
        }
        if let Some(server) = &filter.server {
            texts.push(server);
            conditions.push(format!("server = ${}", texts.len()));
        }
        if let Some(from) = filter.from_ms {
            numbers.push(from);
            conditions.push(format!("created_at_ms >= ${}", texts.len() + numbers.len()));
        }
        if let Some(to) = filter.to_ms {
            numbers.push(to);
            conditions.push(format!("created_at_ms < ${}", texts.len() + numbers.len()));
        }
        let mut sql = format!("SELECT {CDR_COLUMNS} FROM cdrs");
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY created_at_ms DESC, id DESC");
        if let Some(limit) = filter.limit {
            numbers.push(limit.max(0));
            sql.push_str(&format!(" LIMIT ${}", texts.len() + numbers.len()));
        }
        let mut query = sqlx::query(&sql);
        for t in texts {
            query = query.bind(t);
        }
        for n in numbers {
            query = query.bind(n);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(cdr_from_row).collect()
    }

    /// The sessions in progress on every relay of this database (answered or established),
    /// oldest first.
    pub async fn live_sessions(&self) -> Result<Vec<Cdr>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CDR_COLUMNS} FROM cdrs WHERE state = 'answered' OR state = 'established' \
             ORDER BY COALESCE(started_at_ms, created_at_ms), id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(cdr_from_row).collect()
    }

    /// One CDR by id.
    pub async fn cdr(&self, id: &str) -> Result<Option<Cdr>, StoreError> {
        let row = sqlx::query(&format!("SELECT {CDR_COLUMNS} FROM cdrs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(cdr_from_row).transpose()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redaction() {
        assert_eq!(
            super::redact_url("postgres://relay:s3cret@db:5432/relay"),
            "postgres://relay:***@db:5432/relay"
        );
        assert_eq!(
            super::redact_url("postgres://relay@db/relay"),
            "postgres://relay@db/relay"
        );
        assert_eq!(super::redact_url("sqlite://relay.db"), "sqlite://relay.db");
    }

    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(sqlite_path("sqlite://relay.db"), Some("relay.db".into()));
        assert_eq!(
            sqlite_path("sqlite:///var/lib/relay.db?mode=rwc"),
            Some("/var/lib/relay.db".into())
        );
        assert_eq!(sqlite_path("sqlite:relay.db"), Some("relay.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x/y"), None);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_new_database_and_its_wal_are_for_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        let store = Store::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        store.add_user("alice", "a", "b", "x").await.unwrap();
        for name in ["relay.db", "relay.db-wal", "relay.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name} has mode {:o}", mode & 0o777);
        }
        store.close().await;
    }

    #[test]
    fn sqlite_url_gets_create_mode() {
        assert_eq!(
            sqlite_url("sqlite://relay.db"),
            "sqlite://relay.db?mode=rwc"
        );
        assert_eq!(
            sqlite_url("sqlite://a.db?cache=shared"),
            "sqlite://a.db?cache=shared&mode=rwc"
        );
        assert_eq!(sqlite_url("sqlite://a.db?mode=ro"), "sqlite://a.db?mode=ro");
        assert_eq!(sqlite_url("sqlite::memory:"), "sqlite::memory:");
    }

    #[tokio::test]
    async fn memory_store_round_trip() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        assert!(!store.is_postgres());
        store
            .add_user("alice", "a", "b", "example.com")
            .await
            .unwrap();
        let creds = store.user_credentials("alice").await.unwrap().unwrap();
        assert_eq!(creds.realm, "example.com");
        assert!(store.user_credentials("bob").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unsupported_url_is_refused() {
        let err = Store::open("mysql://x").await.unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedUrl(_)));
    }
}
