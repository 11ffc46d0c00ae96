//! `relay appserver …`, `relay service …`, `relay rule …`: the service directory.
//!
//! Application-server accounts authenticate like users (digest, HA1 hashes only) and may
//! register only the services listed for them. Services carry their tariff in integer minor
//! units of their currency. Rules are written in the language `crate::search` documents.
//! A running relay picks every change up within its cache lifetime (1 s by default).
use anyhow::bail;
use clap::{Subcommand, ValueEnum};

use super::format_utc_ms;
use super::user::{
    PasswordArgs, account_realm, change_password, ha1_pair, password_from, table, validate_name,
};
use crate::billing::is_currency_code;
use crate::config::Config;
use crate::search::{parse_conditions, split_servers};
use crate::store::{Fork, ServiceRow, Store};

/// `--fork` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ForkArg {
    /// Ask all servers in parallel; the first 200 wins, the others are cancelled.
    First,
    /// Ask one server at a time; on to the next on a failure or timeout.
    Sequential,
    /// Ask all servers; every one that accepts becomes its own session.
    All,
}

impl From<ForkArg> for Fork {
    fn from(f: ForkArg) -> Fork {
        match f {
            ForkArg::First => Fork::First,
            ForkArg::Sequential => Fork::Sequential,
            ForkArg::All => Fork::All,
        }
    }
}

/// The `relay appserver` subcommands.
#[derive(Debug, Subcommand)]
pub enum AppServerCommand {
    /// Add an application-server account and the services it may deliver.
    Add {
        /// Account name (the same characters as a user name).
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// A service it may deliver (repeat for several; each must exist).
        #[arg(long = "service", value_name = "SERVICE", required = true)]
        services: Vec<String>,
        /// The operator's fee on what it earns, in percent (e.g. 2.5; two decimals at most).
        #[arg(long, value_name = "P")]
        fee_percent: Option<String>,
    },
    /// Give an application server more services, or take some away (its registrations for a
    /// service taken away go too).
    Update {
        name: String,
        /// A service it may deliver from now on (repeat for several; each must exist).
        #[arg(long = "add-service", value_name = "SERVICE")]
        add: Vec<String>,
        /// A service it may no longer deliver (repeat for several).
        #[arg(long = "remove-service", value_name = "SERVICE")]
        remove: Vec<String>,
        /// The operator's fee on what it earns, in percent (e.g. 2.5; two decimals at most).
        #[arg(long, value_name = "P")]
        fee_percent: Option<String>,
    },
    /// Make a new billing token for an application server's agent (`app-server-agent run
    /// --grpc-token-file`); the token is printed once, as the last line, and replaces the old one.
    /// The relay keeps only its SHA-256.
    Token { name: String },
    /// Change an application server's password (its agent must then use the new one: the
    /// relay's assertions are signed with a key derived from it).
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// List application servers, their services and which of them are registered now.
    List,
    /// Remove an application server, its rights and its registrations.
    Remove { name: String },
}

/// Tariff and settings of `relay service add|update`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Price per minute, in minor units of the currency (e.g. cents).
    #[arg(long, value_name = "MINOR")]
    pub per_minute: Option<i64>,
    /// Set-up fee charged once per established session, in minor units.
    #[arg(long, value_name = "MINOR")]
    pub setup_fee: Option<i64>,
    /// Billing increment in seconds: durations are rounded up to a multiple of it.
    #[arg(long, value_name = "SECONDS")]
    pub increment: Option<i64>,
    /// ISO 4217 currency code, e.g. EUR.
    #[arg(long, value_name = "ISO4217")]
    pub currency: Option<String>,
    /// What happens when several servers deliver the service.
    #[arg(long, value_enum)]
    pub fork: Option<ForkArg>,
    /// End sessions after this long, e.g. 90m, 2h, 1h30m, 45s; `none` for no limit.
    #[arg(long, value_name = "DURATION")]
    pub max_duration: Option<String>,
    /// The most one application charge (price x quantity) may be, in minor units of its
    /// currency; `none` for no limit.
    #[arg(long, value_name = "MINOR|none")]
    pub max_charge: Option<String>,
    /// The most all application charges of one session may add up to, in minor units of each
    /// currency; `none` for no limit.
    #[arg(long, value_name = "MINOR|none")]
    pub max_session_charges: Option<String>,
}

/// The `relay service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service (defaults: free, 1 s increment, EUR, fork first, no maximum duration).
    Add {
        /// Service name: what clients put in `sip:NAME@DOMAIN`.
        name: String,
        #[command(flatten)]
        args: ServiceArgs,
    },
    /// Change a service's tariff or settings (only the options given).
    Update {
        name: String,
        #[command(flatten)]
        args: ServiceArgs,
    },
    /// List services with their tariffs.
    List,
    /// Remove a service (refused while a rule uses it).
    Remove { name: String },
}

/// The `relay rule` subcommands.
#[derive(Debug, Subcommand)]
pub enum RuleCommand {
    /// Add a rule: when every --when condition holds, the request goes to --service.
    ///
    /// Conditions: FIELD=PATTERN or FIELD!=PATTERN, FIELD one of ruri.user, ruri.host, caller,
    /// body.NAME (a field of the service-request body); `*` in PATTERN matches any text.
    /// Example: relay rule add --when ruri.user=wine --when body.lang=fr --service wine-fr
    Add {
        /// A condition (repeat; all must hold).
        #[arg(long = "when", value_name = "CONDITION", required = true)]
        conditions: Vec<String>,
        /// The service the request goes to.
        #[arg(long)]
        service: String,
        /// Only these application servers, in this order (comma-separated accounts).
        #[arg(long, value_name = "A,B,…", conflicts_with = "prefer")]
        servers: Option<String>,
        /// These application servers first, in this order, then the service's others.
        #[arg(long, value_name = "A,B,…")]
        prefer: Option<String>,
        /// Lower priorities are tried first (then older rules first).
        #[arg(long, default_value_t = 100)]
        priority: i64,
    },
    /// List rules in the order they are tried.
    List,
    /// Remove a rule by its id.
    Remove { id: i64 },
}

/// Parses `90m`, `2h`, `1h30m`, `45s`, `1d`, or a plain number of seconds.
pub fn parse_duration_secs(text: &str) -> anyhow::Result<i64> {
    let t = text.trim();
    if t.is_empty() {
        bail!("empty duration");
    }
    if let Ok(n) = t.parse::<i64>() {
        if n <= 0 {
            bail!("duration {text:?} must be above zero");
        }
        return Ok(n);
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => bail!("bad duration {text:?}: unknown unit {c:?} (use s, m, h or d)"),
        };
        let n: i64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("bad duration {text:?}: a number must precede {c:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        num.clear();
    }
    if !num.is_empty() {
        bail!("bad duration {text:?}: {num} has no unit");
    }
    if total <= 0 {
        bail!("duration {text:?} must be above zero");
    }
    Ok(total)
}

fn apply(mut s: ServiceRow, a: ServiceArgs) -> anyhow::Result<ServiceRow> {
    if let Some(v) = a.per_minute {
        if v < 0 {
            bail!("--per-minute must not be negative");
        }
        s.per_minute_minor = v;
    }
    if let Some(v) = a.setup_fee {
        if v < 0 {
            bail!("--setup-fee must not be negative");
        }
        s.setup_fee_minor = v;
    }
    if let Some(v) = a.increment {
        if v < 1 {
            bail!("--increment must be at least 1 second");
        }
        s.increment_secs = v;
    }
    if let Some(c) = a.currency {
        let c = c.trim().to_ascii_uppercase();
        if !is_currency_code(&c) {
            bail!("--currency {c:?} is not an ISO 4217 code (three capital letters, e.g. EUR)");
        }
        s.currency = c;
    }
    if let Some(f) = a.fork {
        s.fork = f.into();
    }
    if let Some(d) = a.max_duration {
        s.max_duration_secs = if d.trim() == "none" {
            None
        } else {
            let secs = parse_duration_secs(&d)?;
            if secs > 366 * 86_400 {
                bail!("--max-duration {d:?} is longer than a year; use `none` for no limit");
            }
            Some(secs)
        };
    }
    if let Some(v) = a.max_charge {
        s.max_charge_minor = parse_limit("--max-charge", &v)?;
    }
    if let Some(v) = a.max_session_charges {
        s.max_session_charges_minor = parse_limit("--max-session-charges", &v)?;
    }
    Ok(s)
}

/// A limit in minor units, or `none`.
fn parse_limit(flag: &str, text: &str) -> anyhow::Result<Option<i64>> {
    let t = text.trim();
    if t == "none" {
        return Ok(None);
    }
    match t.parse::<i64>() {
        Ok(v) if v > 0 => Ok(Some(v)),
        _ => bail!(
            "{flag} {t:?}: a positive whole number of minor units (e.g. 5000 for 50.00 EUR), or `none`"
        ),
    }
}

/// Basis points as a percentage: 250 -> "2.5 %".
pub(crate) fn format_fee(basis_points: i64) -> String {
    let whole = basis_points / 100;
    let frac = basis_points % 100;
    if frac == 0 {
        format!("{whole} %")
    } else if frac % 10 == 0 {
        format!("{whole}.{} %", frac / 10)
    } else {
        format!("{whole}.{frac:02} %")
    }
}

fn money(minor: i64, currency: &str) -> String {
    proto::service::format_money(minor, currency)
}

pub async fn run_appserver(
    store: &Store,
    config: &Config,
    command: AppServerCommand,
) -> anyhow::Result<()> {
    match command {
        AppServerCommand::Add {
            name,
            password,
            services,
            fee_percent,
        } => {
            validate_name(&name)?;
            let fee = fee_percent
                .map(|p| crate::ledger::parse_fee_percent(&p))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            for s in &services {
                validate_name(s)?;
            }
            let realm = account_realm(store, config).await?;
            let password = password_from(password)?;
            let (md5, sha256) = ha1_pair(&name, &realm, &password);
            store
                .add_appserver(&name, &md5, &sha256, &realm, &services)
                .await?;
            if let Some(bp) = fee {
                store.set_appserver_fee(&name, bp).await?;
            }
            println!(
                "added application server {name:?} for {} (realm {realm:?}, operator's fee {})",
                services.join(", "),
                format_fee(fee.unwrap_or(0))
            );
        }
        AppServerCommand::Update {
            name,
            add,
            remove,
            fee_percent,
        } => {
            if add.is_empty() && remove.is_empty() && fee_percent.is_none() {
                anyhow::bail!(
                    "nothing to change: give --add-service, --remove-service or --fee-percent"
                );
            }
            let fee = fee_percent
                .map(|p| crate::ledger::parse_fee_percent(&p))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            for s in add.iter().chain(&remove) {
                validate_name(s)?;
            }
            if store.account_kind(&name).await?.as_deref() != Some("appserver") {
                return Err(crate::store::StoreError::NoSuchAppServer(name).into());
            }
            if let Some(bp) = fee {
                store.set_appserver_fee(&name, bp).await?;
                println!(
                    "application server {name:?}: operator's fee {}",
                    format_fee(bp)
                );
                if add.is_empty() && remove.is_empty() {
                    return Ok(());
                }
            }
            store
                .update_appserver_services(&name, &add, &remove)
                .await?;
            let now = store.appserver_services(&name).await?;
            println!(
                "application server {name:?} may now deliver: {}",
                if now.is_empty() {
                    "nothing".to_string()
                } else {
                    now.join(", ")
                }
            );
        }
        AppServerCommand::Passwd { name, password } => {
            if store.account_kind(&name).await?.as_deref() != Some("appserver") {
                return Err(crate::store::StoreError::NoSuchAppServer(name).into());
            }
            change_password(store, config, &name, password).await?;
            println!(
                "changed the password of application server {name:?}: restart its agent with \
                 the new one (until then the relay's sessions for it fail, and the agent says so)"
            );
        }
        AppServerCommand::List => {
            let now = proto::clock::now_ms();
            let mut rows: Vec<[String; 6]> = Vec::new();
            for a in store.list_appservers().await? {
                // Which of its services it has registered right now.
                let mut live = Vec::new();
                for s in &a.services {
                    let bindings = store.bindings(s, now).await?;
                    if bindings
                        .iter()
                        .any(|b| b.account.as_deref() == Some(&a.name))
                    {
                        live.push(s.clone());
                    }
                }
                rows.push([
                    a.name,
                    a.services.join(","),
                    if live.is_empty() {
                        "-".to_string()
                    } else {
                        live.join(",")
                    },
                    format_fee(a.fee_basis_points),
                    a.realm,
                    format_utc_ms(a.created_at_ms),
                ]);
            }
            print!(
                "{}",
                table(
                    &["NAME", "SERVICES", "REGISTERED", "FEE", "REALM", "CREATED"],
                    &rows
                )
            );
        }
        AppServerCommand::Token { name } => {
            if store.account_kind(&name).await?.as_deref() != Some("appserver") {
                return Err(crate::store::StoreError::NoSuchAppServer(name).into());
            }
            let token = crate::ledger::new_token();
            store
                .set_appserver_token(&name, &crate::ledger::token_sha256(&token))
                .await?;
            eprintln!(
                "a new billing token for application server {name:?} (any earlier one no longer works); \
                 give it to its agent (app-server-agent run --grpc-token-file FILE, or APP_AGENT_GRPC_TOKEN); it is not shown again:"
            );
            println!("{token}");
        }
        AppServerCommand::Remove { name } => {
            store.remove_appserver(&name).await?;
            println!("removed application server {name:?}");
        }
    }
    Ok(())
}

pub async fn run_service(store: &Store, command: ServiceCommand) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Add { name, args } => {
            validate_name(&name)?;
            let base = ServiceRow {
                name: name.clone(),
                per_minute_minor: 0,
                setup_fee_minor: 0,
                increment_secs: 1,
                currency: "EUR".into(),
                fork: Fork::First,
                max_duration_secs: None,
                max_charge_minor: None,
                max_session_charges_minor: None,
                created_at_ms: 0,
                updated_at_ms: 0,
            };
            let s = apply(base, args)?;
            store.add_service(&s).await?;
            println!("added service {name:?}: {}", describe(&s));
        }
        ServiceCommand::Update { name, args } => {
            let Some(current) = store.service(&name).await? else {
                return Err(crate::store::StoreError::NoSuchService(name).into());
            };
            let s = apply(current, args)?;
            store.update_service(&s).await?;
            println!("updated service {name:?}: {}", describe(&s));
        }
        ServiceCommand::List => {
            let rows: Vec<[String; 7]> = store
                .list_services()
                .await?
                .into_iter()
                .map(|s| {
                    [
                        s.name.clone(),
                        money(s.per_minute_minor, &s.currency),
                        money(s.setup_fee_minor, &s.currency),
                        format!("{}s", s.increment_secs),
                        s.fork.as_str().into(),
                        s.max_duration_secs
                            .map(|d| format!("{d}s"))
                            .unwrap_or_else(|| "-".into()),
                        format_utc_ms(s.updated_at_ms),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NAME",
                        "PER-MINUTE",
                        "SETUP-FEE",
                        "INCREMENT",
                        "FORK",
                        "MAX-DURATION",
                        "UPDATED"
                    ],
                    &rows
                )
            );
        }
        ServiceCommand::Remove { name } => {
            store.remove_service(&name).await?;
            println!("removed service {name:?}");
        }
    }
    Ok(())
}

fn describe(s: &ServiceRow) -> String {
    format!(
        "{} a minute, set-up {}, {} s increment, fork {}, max duration {}{}{}",
        money(s.per_minute_minor, &s.currency),
        money(s.setup_fee_minor, &s.currency),
        s.increment_secs,
        s.fork.as_str(),
        s.max_duration_secs
            .map(|d| format!("{d} s"))
            .unwrap_or_else(|| "none".into()),
        s.max_charge_minor
            .map(|m| format!(", max charge {m} minor units"))
            .unwrap_or_default(),
        s.max_session_charges_minor
            .map(|m| format!(", max charges a session {m} minor units"))
            .unwrap_or_default(),
    )
}

pub async fn run_rule(store: &Store, command: RuleCommand) -> anyhow::Result<()> {
    match command {
        RuleCommand::Add {
            conditions,
            service,
            servers,
            prefer,
            priority,
        } => {
            let text = conditions.join("; ");
            parse_conditions(&text).map_err(|e| anyhow::anyhow!("bad rule: {e}"))?;
            let only = servers.is_some();
            let servers = servers.or(prefer).map(|s| split_servers(&s).join(","));
            if let Some(list) = &servers {
                let known = store.list_appservers().await?;
                for name in split_servers(list) {
                    if !known.iter().any(|a| a.name == name) {
                        bail!("no such application server {name:?}");
                    }
                }
            }
            let id = store
                .add_rule(priority, &text, &service, servers.as_deref(), only)
                .await?;
            println!("added rule {id}: when {text} → {service}");
        }
        RuleCommand::List => {
            let rows: Vec<[String; 5]> = store
                .list_rules()
                .await?
                .into_iter()
                .map(|r| {
                    [
                        r.id.to_string(),
                        r.priority.to_string(),
                        r.conditions,
                        r.service,
                        match (r.servers, r.servers_only) {
                            (Some(s), true) => format!("only {s}"),
                            (Some(s), false) => format!("first {s}"),
                            (None, _) => "-".into(),
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["ID", "PRIORITY", "WHEN", "SERVICE", "SERVERS"], &rows)
            );
        }
        RuleCommand::Remove { id } => {
            store.remove_rule(id).await?;
            println!("removed rule {id}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_secs("90").unwrap(), 90);
        assert_eq!(parse_duration_secs("90m").unwrap(), 5400);
        assert_eq!(parse_duration_secs("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration_secs("1d").unwrap(), 86_400);
        assert!(parse_duration_secs("0").is_err());
        assert!(parse_duration_secs("5x").is_err());
        assert!(parse_duration_secs("h").is_err());
        assert!(parse_duration_secs("5m3").is_err());
    }
}
