//! `relay redirect …`: redirect rules (seed file 003). A new INVITE that matches a rule gets 302
//! with the Contact of the additional server the rule names, on every relay of this database
//! whose configuration knows that name (`relay serve --additional NAME=sip:IP:PORT`); a relay
//! never redirects to itself, and a redirected request is never redirected again.

use super::user::table;
use crate::config::Config;
use crate::store::Store;
use anyhow::bail;
use clap::Subcommand;

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
