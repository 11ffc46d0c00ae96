//! `relay user …`: manage accounts.
//!
//! The realm of every account is the relay's domain (`--domain`). Only the digest HA1 hashes
//! (MD5 and SHA-256) are stored, never the password. A running `relay serve` reads accounts
//! from the store on every authentication, so changes take effect at once.
use std::io::{BufRead, IsTerminal};

use anyhow::{Context, bail};
use clap::Subcommand;
use proto::sip::digest::{Algorithm, ha1};

use super::format_utc_ms;
use crate::config::Config;
use crate::store::Store;

/// Where a new password comes from, in order: `--password` (or `RELAY_PASSWORD`),
/// `--password-file` (or `RELAY_PASSWORD_FILE`), then (when standard input is not a terminal)
/// the first line of standard input. A flag is visible to every local user (`ps`): prefer the
/// others.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PasswordArgs {
    /// Password (better: RELAY_PASSWORD, --password-file, or piped on standard input; a flag
    /// is visible to other local users).
    #[arg(long, env = "RELAY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A file whose first line is the password.
    #[arg(
        long,
        env = "RELAY_PASSWORD_FILE",
        value_name = "FILE",
        conflicts_with = "password"
    )]
    pub password_file: Option<std::path::PathBuf>,
}

/// The `relay user` subcommands.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add an account.
    Add {
        /// User name: 1–64 characters of a SIP user part (letters, digits, - _ . ! ~ * ' ( ) & = + $ , ; ? /).
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// List accounts (name, realm, creation time).
    List,
    /// Remove an account and its registrations.
    Remove {
        /// User name.
        name: String,
    },
    /// Change an account's password.
    Passwd {
        /// User name.
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
}

/// The realm a new account (or a new password) must carry: the domain of the relay that will
/// challenge it. Given (`--domain`, `RELAY_DOMAIN`, the config file), it must agree with the
/// domain of the relay serving this database, if one has; not given, it is that relay's.
pub(crate) async fn account_realm(store: &Store, config: &Config) -> anyhow::Result<String> {
    let served = store.setting("domain").await?;
    match (config.domain_given, served) {
        (true, Some(served)) if !served.eq_ignore_ascii_case(&config.domain) => bail!(
            "the relay serving this database has the domain {served:?}, not {:?}: an account in \
             realm {:?} could never log in there; give --domain {served} (or leave --domain out)",
            config.domain,
            config.domain
        ),
        (true, _) => Ok(config.domain.clone()),
        (false, Some(served)) => Ok(served),
        (false, None) => bail!(
            "which domain? An account's realm is the SIP domain of its relay, and no relay has \
             served this database yet: give --domain DOMAIN (or RELAY_DOMAIN, or domain in the \
             --config file), the same as `relay serve` uses"
        ),
    }
}

/// Fails for an application-server account, pointing at `relay appserver …`.
async fn refuse_appserver(store: &Store, name: &str) -> anyhow::Result<()> {
    if store.account_kind(name).await?.as_deref() == Some("appserver") {
        bail!(
            "{name:?} is an application-server account: use `relay appserver passwd {name}` or \
             `relay appserver remove {name}`"
        );
    }
    Ok(())
}

/// Runs one `relay user` subcommand.
pub async fn run(store: &Store, config: &Config, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add { name, password } => {
            validate_name(&name)?;
            let realm = account_realm(store, config).await?;
            let password = password_from(password)?;
            let (md5, sha256) = ha1_pair(&name, &realm, &password);
            store.add_user(&name, &md5, &sha256, &realm).await?;
            println!("added user {name:?} (realm {realm:?})");
        }
        UserCommand::List => {
            let users = store.list_users().await?;
            let rows: Vec<[String; 3]> = users
                .into_iter()
                .map(|u| [u.name, u.realm, format_utc_ms(u.created_at_ms)])
                .collect();
            print!("{}", table(&["NAME", "REALM", "CREATED"], &rows));
        }
        UserCommand::Remove { name } => {
            validate_name(&name)?;
            refuse_appserver(store, &name).await?;
            store.remove_user(&name).await?;
            println!("removed user {name:?}");
        }
        UserCommand::Passwd { name, password } => {
            validate_name(&name)?;
            refuse_appserver(store, &name).await?;
            change_password(store, config, &name, password).await?;
            println!("changed the password of user {name:?}");
        }
    }
    Ok(())
}

/// Sets a new password of an existing account (user or application server), in the realm of
/// the relay serving this database.
pub(crate) async fn change_password(
    store: &Store,
    config: &Config,
    name: &str,
    password: PasswordArgs,
) -> anyhow::Result<()> {
    // Fail on an unknown account before asking for the password.
    if store.user_credentials(name).await?.is_none() {
        return Err(crate::store::StoreError::NoSuchUser(name.to_string()).into());
    }
    let realm = account_realm(store, config).await?;
    let password = password_from(password)?;
    let (md5, sha256) = ha1_pair(name, &realm, &password);
    store.set_user_password(name, &md5, &sha256, &realm).await?;
    Ok(())
}

pub(crate) fn ha1_pair(name: &str, realm: &str, password: &str) -> (String, String) {
    (
        ha1(Algorithm::Md5, name, realm, password),
        ha1(Algorithm::Sha256, name, realm, password),
    )
}

/// Checks a user name: 1–64 characters, each allowed unescaped in a SIP user part
/// (RFC 3261 `unreserved` / `user-unreserved`). Percent-escapes are not accepted.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    const EXTRA: &str = "-_.!~*'()&=+$,;?/";
    let len = name.chars().count();
    if !(1..=64).contains(&len) {
        bail!("invalid user name {name:?}: must be 1 to 64 characters long");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || EXTRA.contains(*c)))
    {
        bail!(
            "invalid user name {name:?}: character {bad:?} is not allowed \
             (use letters, digits and - _ . ! ~ * ' ( ) & = + $ , ; ? /)"
        );
    }
    Ok(())
}

/// The password from the flag/environment, the password file, or one line of a non-terminal
/// standard input.
pub(crate) fn password_from(given: PasswordArgs) -> anyhow::Result<String> {
    let chosen =
        proto::secret::given_or_file(given.password.as_deref(), given.password_file.as_deref())
            .map_err(|e| anyhow::anyhow!(e))?;
    let password = match chosen {
        Some(p) => p,
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!(
                    "no password given: set RELAY_PASSWORD, use --password-file FILE or pipe it \
                     on standard input"
                );
            }
            let mut line = String::new();
            stdin
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        bail!("the password must not be empty");
    }
    Ok(password)
}

/// Left-aligned columns separated by two spaces, with a header row.
pub(crate) fn table<const N: usize>(header: &[&'static str; N], rows: &[[String; N]]) -> String {
    let columns: Vec<super::listing::Column> =
        header.iter().map(|h| super::listing::fixed(h)).collect();
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    super::listing::table(&columns, &rows, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("alice").is_ok());
        assert!(validate_name("+4930123").is_ok());
        assert!(validate_name("first.last").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("a@b").is_err());
        assert!(validate_name("a:b").is_err());
    }

    #[test]
    fn table_aligns() {
        let t = table(
            &["A", "BB"],
            &[
                ["xyz".to_owned(), "1".to_owned()],
                ["q".to_owned(), "".to_owned()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq\n");
    }
}
