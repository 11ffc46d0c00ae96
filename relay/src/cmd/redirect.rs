//! `relay redirect …`: redirect rules (seed file 003). A new INVITE that matches a rule gets 302
//! with the Contact of the additional server the rule names, on every relay of this database
//! whose configuration knows that name (`relay serve --additional NAME=sip:IP:PORT`); a relay
//! never redirects to itself, and a redirected request is never redirected again.

use super::user::table;
use crate::config::Config;
use crate::store::Store;
use anyhow::bail;
use clap::{Args, Subcommand};
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Add a redirect rule: new calls matching every condition given go to the additional
    /// server NAME (302). Example: relay redirect add --to b --service wine
    /// --when-sessions-above 1000
    Add {
        /// The additional server (a name from --additional NAME=sip:IP:PORT).
        #[arg(long, value_name = "NAME")]
        to: String,
        /// Only calls whose caller's From URI has this host.
        #[arg(long, value_name = "DOMAIN")]
        caller_domain: Option<String>,
        /// Only calls for this service (after the rules), or to this user.
        #[arg(long, value_name = "SERVICE")]
        service: Option<String>,
        /// Only while the relay carries more than N sessions.
        #[arg(long, value_name = "N")]
        when_sessions_above: Option<u64>,
    },
    /// List redirect rules in the order they are tried.
    List,
    /// Remove a redirect rule by its id.
    Remove { id: i64 },
}

pub async fn run(store: &Store, config: &Config, command: RedirectCommand) -> anyhow::Result<()> {
    let known = config.additional_servers()?;
    match command {
        RedirectCommand::Add {
            to,
            caller_domain,
            service,
            when_sessions_above,
        } => {
            let to = to.trim().to_string();
            if to.is_empty() {
                bail!("--to needs the name of an additional server");
            }
            let above = when_sessions_above
                .map(i64::try_from)
                .transpose()
                .map_err(|_| anyhow::anyhow!("--when-sessions-above is too large"))?;
            let id = store
                .add_redirect(
                    &to,
                    caller_domain.as_deref().map(str::trim),
                    service.as_deref().map(str::trim),
                    above,
                )
                .await?;
            println!("added redirect {id}: → {to}");
            if !known.iter().any(|a| a.name == to) {
                eprintln!(
                    "note: this configuration names no additional server {to:?}; the rule applies \
                     only on relays started with --additional {to}=sip:IP:PORT"
                );
            }
        }
        RedirectCommand::List => {
            let rows: Vec<[String; 6]> = store
                .list_redirects()
                .await?
                .into_iter()
                .map(|r| {
                    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                    [
                        r.id.to_string(),
                        match known.iter().find(|a| a.name == r.target) {
                            Some(a) => format!("{} (sip:{})", r.target, a.addr),
                            None => format!("{} (not known here)", r.target),
                        },
                        dash(r.caller_domain),
                        dash(r.service),
                        dash(r.sessions_above.map(|n| format!("> {n}"))),
                        proto::clock::format_utc_ms(r.created_at_ms),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["ID", "TO", "CALLER-DOMAIN", "SERVICE", "SESSIONS", "ADDED"],
                    &rows
                )
            );
        }
        RedirectCommand::Remove { id } => {
            store.remove_redirect(id).await?;
            println!("removed redirect {id}");
        }
    }
    Ok(())
}

/// `relay drain`: move users to an additional server at once.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The additional server (a name from --additional NAME=sip:IP:PORT).
    #[arg(long, value_name = "NAME")]
    to: String,
    /// Only users of this domain.
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
    /// Only sessions of this service (and new calls for it).
    #[arg(long, value_name = "SERVICE")]
    service: Option<String>,
    /// Only sessions this application server delivers.
    #[arg(long, value_name = "ACCOUNT")]
    appserver: Option<String>,
    /// How long to wait for every running relay's report, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    wait: u64,
}

/// Leaves an order every running relay of the database carries out for the sessions it
/// carries (a REFER inside each, to the same service at the additional server), adds a redirect
/// rule so that new calls go there too, waits for the relays' reports and prints them.
pub async fn drain(store: &Store, config: &Config, args: DrainArgs) -> anyhow::Result<()> {
    let known = config.additional_servers()?;
    let to = args.to.trim().to_string();
    if to.is_empty() {
        bail!("--to needs the name of an additional server");
    }
    if !known.iter().any(|a| a.name == to) {
        eprintln!(
            "note: this configuration names no additional server {to:?}; only relays started \
             with --additional {to}=sip:IP:PORT can move their sessions there"
        );
    }
    if let Some(a) = &args.appserver {
        if !store.list_appservers().await?.iter().any(|x| &x.name == a) {
            bail!("no such application server {a:?}");
        }
    }
    // Users of another domain have no sessions here (a relay serves one domain).
    let other_domain = args
        .domain
        .as_deref()
        .is_some_and(|d| !d.eq_ignore_ascii_case(&config.domain));
    // New calls: a redirect rule (it cannot name an application server).
    let rule = if args.appserver.is_none() {
        Some(
            store
                .add_redirect(&to, args.domain.as_deref(), args.service.as_deref(), None)
                .await?,
        )
    } else {
        None
    };
    let now = proto::clock::now_ms();
    let live: Vec<String> = store
        .node_leases()
        .await?
        .into_iter()
        .filter(|l| now - l.heartbeat_ms < 10_000)
        .map(|l| l.node_id)
        .collect();
    let mut moved = 0;
    let mut redirected = 0;
    let mut failed = 0;
    if !other_domain && !live.is_empty() {
        let order = store
            .add_drain(&to, args.service.as_deref(), args.appserver.as_deref())
            .await?;
        let deadline = Instant::now() + Duration::from_secs(args.wait);
        let reports = loop {
            let reports = store.drain_reports(order).await?;
            if live.iter().all(|n| reports.iter().any(|r| &r.node == n))
                || Instant::now() > deadline
            {
                break reports;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        for n in &live {
            match reports.iter().find(|r| &r.node == n) {
                Some(r) => {
                    println!(
                        "relay {}: moved {}, {} to be redirected, {} failed",
                        r.node, r.moved, r.redirected, r.failed
                    );
                    for line in r.problems.lines() {
                        println!("  {line}");
                    }
                    moved += r.moved;
                    redirected += r.redirected;
                    failed += r.failed;
                }
                None => println!(
                    "relay {n}: no report within {} s (its sessions stay where they are)",
                    args.wait
                ),
            }
        }
    }
    println!("moved: {moved}");
    match rule {
        Some(id) => println!(
            "will be redirected: {redirected} registered client(s) that refused to move, and \
             every new call (redirect {id} sends new calls to {to})"
        ),
        None => println!(
            "will be redirected: none (a redirect rule cannot name an application server; \
             add one with relay redirect add)"
        ),
    }
    println!("failed: {failed}");
    Ok(())
}
