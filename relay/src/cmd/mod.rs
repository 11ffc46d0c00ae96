//! # cmd: the `relay` command line
//!
//! `relay serve` runs the registrar and proxy; `relay user|appserver|service|rule|cdr|billing …` are admin
//! commands that open the same database, so they work while `relay serve` runs (in another
//! process) and take effect without a restart.
//!
//! Errors are printed as one `error: …` line on standard error with exit status 1.
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, GlobalArgs};
use crate::store::Store;

pub mod billing;
pub mod catalog;
pub mod cdr;
pub mod listing;
pub mod live;
pub mod user;

/// SIP registrar and authenticating, record-routing proxy with call-detail records.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: SIP over UDP and TCP on --sip, accounts and records in --database-url.
    Serve,
    /// Manage user accounts (digest credentials for the relay's domain).
    #[command(subcommand)]
    User(user::UserCommand),
    /// Manage application-server accounts (which services each may deliver).
    #[command(subcommand)]
    Appserver(catalog::AppServerCommand),
    /// Manage services and their tariffs.
    #[command(subcommand)]
    Service(catalog::ServiceCommand),
    /// Manage operator rules: which service (and servers) a request goes to.
    #[command(subcommand)]
    Rule(catalog::RuleCommand),
    /// Show call-detail records.
    #[command(subcommand)]
    Cdr(cdr::CdrCommand),
    /// Billing: a user's statement.
    #[command(subcommand)]
    Billing(billing::BillingCommand),
    /// List current registrations: users' devices and application servers' services.
    Registrations(live::RegistrationsArgs),
    /// List the sessions in progress, on every relay of this database.
    Sessions(live::SessionsArgs),
}

/// Runs a parsed command line; prints any error and returns the process's exit status.
pub fn run(cli: Cli) -> ExitCode {
    match run_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: a cause whose text the line already
/// holds (sqlx repeats its inner errors) is left out.
pub fn describe_error(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run_inner(cli: Cli) -> anyhow::Result<()> {
    let config = cli.global.load()?;
    init_tracing(&config)?;
    match cli.command {
        Command::Serve => {
            // One thread runs all SIP work by default: a message then never crosses threads,
            // which on a small machine costs more than the work itself. The databases'
            // drivers keep their own threads.
            let mut builder = if config.threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(config.threads);
                b
            };
            let runtime = builder
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(serve(config))
        }
        Command::User(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = user::run(&store, &config, command).await;
            store.close().await;
            result
        }),
        Command::Cdr(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = cdr::run(&store, command).await;
            store.close().await;
            result
        }),
        Command::Registrations(args) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = live::registrations(&store, args, crate::serve::now_ms()).await;
            store.close().await;
            result
        }),
        Command::Sessions(args) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = live::sessions(&store, args, crate::serve::now_ms()).await;
            store.close().await;
            result
        }),
        Command::Appserver(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = catalog::run_appserver(&store, &config, command).await;
            store.close().await;
            result
        }),
        Command::Service(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = catalog::run_service(&store, command).await;
            store.close().await;
            result
        }),
        Command::Rule(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = catalog::run_rule(&store, command).await;
            store.close().await;
            result
        }),
        Command::Billing(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = billing::run(&store, command).await;
            store.close().await;
            result
        }),
    }
}

/// `relay serve`: runs until SIGINT or SIGTERM.
async fn serve(config: Config) -> anyhow::Result<()> {
    crate::serve::run(config).await
}

fn admin_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .with_context(|| format!("bad log filter {:?}", config.log))?;
    // Ignore "already set": a test harness may have installed one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(proto::log::colours())
        .try_init();
    Ok(())
}

/// Opens the configured store for an admin command, naming the database (without its
/// password) on failure. A SQLite file that does not exist is refused (a mistyped path would
/// otherwise be a new, empty database) unless `--create-database` asks for it; `relay serve`
/// creates it.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    if let Some(path) = crate::store::sqlite_path(&config.database_url) {
        if !config.create_database && !path.exists() {
            anyhow::bail!(
                "the database {} does not exist: check --database-url (or RELAY_DATABASE_URL); \
                 `relay serve` creates it, or add --create-database to create it here",
                path.display()
            );
        }
    }
    Store::open(&config.database_url).await.with_context(|| {
        format!(
            "cannot open the database {}",
            redact_url(&config.database_url)
        )
    })
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

/// Formats UTC milliseconds since the Unix epoch as ISO 8601, e.g. `2026-11-22T16:25:26.123Z`.
pub fn format_utc_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day)
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are small and positive by construction.
    (year, month as u32, day as u32)
}

/// A proleptic Gregorian date to days since 1970-01-01 (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats a duration in milliseconds as seconds with three decimals, e.g. `12.345s`.
pub fn format_duration_ms(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03}s", abs / 1000, abs % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_times() {
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc_ms(1_795_364_726_123), "2026-11-22T16:25:26.123Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration_ms(12_345), "12.345s");
        assert_eq!(format_duration_ms(7), "0.007s");
        assert_eq!(format_duration_ms(-1500), "-1.500s");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("postgres://relay:s3cret@db:5432/relay"),
            "postgres://relay:***@db:5432/relay"
        );
        assert_eq!(
            redact_url("postgres://relay@db/relay"),
            "postgres://relay@db/relay"
        );
        assert_eq!(redact_url("sqlite://relay.db"), "sqlite://relay.db");
    }

    #[test]
    fn each_cause_is_said_once() {
        let inner = anyhow::anyhow!("(code: 14) unable to open database file");
        let middle =
            inner.context("error returned from database: (code: 14) unable to open database file");
        let outer = middle.context("cannot open the database sqlite://x.db");
        assert_eq!(
            describe_error(&outer),
            "cannot open the database sqlite://x.db: error returned from database: (code: 14) \
             unable to open database file"
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
