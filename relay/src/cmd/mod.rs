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
use crate::store::{Store, redact_url};
pub use proto::clock::{days_from_civil, format_utc_ms};

pub mod billing;
pub mod catalog;
pub mod cdr;
pub mod listing;
pub mod live;
pub mod redirect;
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
    /// Manage redirect rules: which new calls go to an additional server (302).
    #[command(subcommand)]
    Redirect(redirect::RedirectCommand),
    /// Move users to an additional server now: every running relay of this database sends each
    /// matching session a REFER to the same service there, and new calls are redirected (302).
    Drain(redirect::DrainArgs),
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
            let result = live::registrations(&store, args, proto::clock::now_ms()).await;
            store.close().await;
            result
        }),
        Command::Sessions(args) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = live::sessions(&store, args, proto::clock::now_ms()).await;
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
        Command::Drain(args) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = redirect::drain(&store, &config, args).await;
            store.close().await;
            result
        }),
        Command::Redirect(command) => admin_runtime()?.block_on(async {
            let store = open_store(&config).await?;
            let result = redirect::run(&store, &config, command).await;
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
    proto::log::init(&config.log, config.log_format).map_err(|e| anyhow::anyhow!(e))
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
    fn durations() {
        assert_eq!(format_duration_ms(12_345), "12.345s");
        assert_eq!(format_duration_ms(7), "0.007s");
        assert_eq!(format_duration_ms(-1500), "-1.500s");
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
