//! Command line of `client-agent`.

use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "client-agent",
    version,
    about = "SIP client of sip-relay: register, place calls, open service sessions through the relay"
)]
pub struct Cli {
    /// The relay's SIP address, HOST:PORT (an IP address; names are not resolved).
    #[arg(long, env = "CLIENT_RELAY")]
    pub relay: String,
    /// Your user name at the relay.
    #[arg(long, env = "CLIENT_USER")]
    pub user: String,
    /// Your password. Better kept off the command line (other local users can read it there):
    /// set CLIENT_PASSWORD or use --password-file.
    #[arg(long, env = "CLIENT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A file whose first line is your password.
    #[arg(
        long,
        env = "CLIENT_PASSWORD_FILE",
        value_name = "FILE",
        conflicts_with = "password"
    )]
    pub password_file: Option<std::path::PathBuf>,
    /// The SIP domain (the relay's realm); defaults to the relay's address.
    #[arg(long, global = true, env = "CLIENT_DOMAIN")]
    pub domain: Option<String>,
    /// Transport to the relay.
    #[arg(
        long,
        global = true,
        env = "CLIENT_TRANSPORT",
        value_parser = ["udp", "tcp"],
        default_value = "udp"
    )]
    pub transport: String,
    /// Print one JSON object a line for each event.
    #[arg(long, global = true, env = "CLIENT_JSON")]
    pub json: bool,
    /// Local SIP address to bind (default: an ephemeral port on the address that reaches the relay).
    #[arg(long, global = true, env = "CLIENT_BIND")]
    pub bind: Option<std::net::SocketAddr>,
    /// Log lines (standard error, filtered by CLIENT_LOG, default warn) as `text` or `json`.
    #[arg(
        long,
        global = true,
        env = "CLIENT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: proto::log::LogFormat,
    /// A TOML settings file for the options above: each key an option's name with `_` for `-`
    /// (`relay = "192.0.2.5:5060"`, `user = "alice"`); options and variables win over it.
    #[arg(long, global = true, env = "CLIENT_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with the relay, stay registered (refreshing) until --for elapses or Ctrl-C, then unregister.
    Register {
        /// Registration lifetime to ask for, in seconds.
        #[arg(long, default_value_t = 3600)]
        expires: u32,
        /// How long to stay registered (e.g. 30s, 5m); without it, until Ctrl-C. `0` registers once and exits, keeping the binding.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Answer incoming calls: `accept`, `busy` (486) or `ignore`.
        #[arg(long, value_parser = ["accept", "busy", "ignore"], default_value = "accept")]
        answer: String,
    },
    /// Call another user through the relay; hang up after --for or on Ctrl-C.
    Call {
        /// Who to call: a user name (`bob`) or a SIP URI (`sip:bob@example.com`).
        target: String,
        /// How long to stay in the call once established (e.g. 10s, 1m, 500ms); without it, until Ctrl-C or the other side hangs up.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Give up ringing after this long (sends CANCEL).
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        ring_timeout: Duration,
        /// When the user is not registered, have the relay watch for it this long (e.g. 10m)
        /// and call it as soon as it registers (auto-redial); the wait is never billed.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
    },
    /// Open a session with a service (`INVITE sip:SERVICE@DOMAIN`): every application server
    /// that accepts gives one session and its URL. Type `list`, `close` or `close N` on standard
    /// input; sessions end after --for, on Ctrl-C, or when the server hangs up.
    Open {
        /// The service: a name (`wine`) or a SIP URI (`sip:wine@example.com`).
        service: String,
        /// What you want, as free text (sent as the `detail` field of the service request).
        #[arg(long, conflicts_with = "body_file")]
        detail: Option<String>,
        /// A file holding the whole service request (a JSON object of string fields).
        #[arg(long, value_name = "FILE")]
        body_file: Option<std::path::PathBuf>,
        /// How long to keep the sessions once the first is open (e.g. 30s, 5m); without it,
        /// until `close`, Ctrl-C or the servers hang up.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Open each session's URL in the browser (`xdg-open`).
        #[arg(long)]
        browse: bool,
        /// After DURATION from the first session's start, change its details to DETAILS, as
        /// typing `change DETAILS` would (e.g. --change-after 30s='a dark beer'). Repeatable.
        #[arg(long = "change-after", value_name = "DURATION=DETAILS", value_parser = parse_after)]
        change_after: Vec<(Duration, String)>,
        /// After DURATION from the first session's start, move to SERVICE, as typing
        /// `transfer SERVICE` would (e.g. --transfer-after 30s=beer). Repeatable.
        #[arg(long = "transfer-after", value_name = "DURATION=SERVICE", value_parser = parse_after)]
        transfer_after: Vec<(Duration, String)>,
        /// With --transfer-after: keep the first session too (`transfer SERVICE --keep`).
        #[arg(long, requires = "transfer_after")]
        keep: bool,
        /// When no server of the service is online, have the relay watch for one this long
        /// (e.g. 10m) and open the session as soon as one registers; the wait is never billed.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
    },
}

/// `DURATION=TEXT` of the scripted commands (`--change-after 30s=a dark beer`).
pub fn parse_after(s: &str) -> Result<(Duration, String), String> {
    let (d, text) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not DURATION=VALUE (e.g. 30s=a dark beer)"))?;
    let d = parse_duration(d.trim())?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{s:?} names nothing after the ="));
    }
    Ok((d, text.to_string()))
}

impl Cli {
    /// Parses arguments (the first is the program name), for programs that run the agent in-process.
    pub fn try_parse_from_args(args: &[&str]) -> anyhow::Result<Cli> {
        Ok(<Cli as Parser>::try_parse_from(args)?)
    }

    /// The password: `--password` / `CLIENT_PASSWORD`, or the first line of `--password-file`.
    pub fn password(&self) -> anyhow::Result<String> {
        let given =
            proto::secret::given_or_file(self.password.as_deref(), self.password_file.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?;
        let Some(password) = given else {
            anyhow::bail!(
                "no password: set CLIENT_PASSWORD, or give --password-file FILE (its first line)"
            );
        };
        if password.is_empty() {
            anyhow::bail!("the password is empty");
        }
        Ok(password)
    }
}

pub use proto::clock::parse_duration;

#[cfg(test)]
mod tests {
    use super::{Cli, Command, parse_duration};
    use std::time::Duration;

    const GLOBAL: [&str; 7] = [
        "client-agent",
        "--relay",
        "127.0.0.1:5060",
        "--user",
        "alice",
        "--password",
        "pw",
    ];

    fn parse(args: &[&str]) -> anyhow::Result<Cli> {
        let mut argv = GLOBAL.to_vec();
        argv.extend_from_slice(args);
        Cli::try_parse_from_args(&argv)
    }

    #[test]
    fn open_takes_a_service_and_its_options() {
        let cli = parse(&[
            "open",
            "wine",
            "--detail",
            "red, 2015",
            "--for",
            "2m",
            "--browse",
            "--json",
            "--change-after",
            "30s=a dark beer",
            "--change-after",
            "1m = a stout ",
        ])
        .unwrap();
        assert!(cli.json, "--json is accepted after the subcommand");
        match cli.command {
            Command::Open {
                service,
                detail,
                body_file,
                duration,
                browse,
                change_after,
                ..
            } => {
                assert_eq!(
                    change_after,
                    vec![
                        (Duration::from_secs(30), "a dark beer".to_string()),
                        (Duration::from_secs(60), "a stout".to_string()),
                    ]
                );
                assert_eq!(service, "wine");
                assert_eq!(detail.as_deref(), Some("red, 2015"));
                assert_eq!(body_file, None);
                assert_eq!(duration, Some(Duration::from_secs(120)));
                assert!(browse);
            }
            other => panic!("parsed as {other:?}"),
        }
        for bad in ["30s", "30s=", "soon=beer"] {
            let e = parse(&["open", "wine", "--change-after", bad]).unwrap_err();
            assert!(e.to_string().contains("--change-after"), "{e}");
        }
        let cli = parse(&["--json", "open", "wine", "--body-file", "req.json"]).unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Open {
                detail,
                body_file,
                duration,
                browse,
                ..
            } => {
                assert_eq!(detail, None);
                assert_eq!(body_file, Some("req.json".into()));
                assert_eq!(duration, None);
                assert!(!browse);
            }
            other => panic!("parsed as {other:?}"),
        }
        // Global options after the subcommand.
        let cli = parse(&["open", "wine", "--transport", "tcp", "--domain", "d.test"]).unwrap();
        assert_eq!(cli.transport, "tcp");
        assert_eq!(cli.domain.as_deref(), Some("d.test"));
    }

    #[test]
    fn open_refuses_both_bodies_and_a_missing_service() {
        let err = parse(&["open", "wine", "--detail", "x", "--body-file", "f"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be used with"), "{err}");
        assert!(parse(&["open"]).is_err());
        assert!(parse(&["open", "wine", "--for", "soon"]).is_err());
    }

    #[test]
    fn the_password_comes_from_a_file_or_the_environment() {
        let dir = tempfile_dir();
        let file = dir.join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let file_arg = file.to_string_lossy().to_string();
        let cli = Cli::try_parse_from_args(&[
            "client-agent",
            "--relay",
            "127.0.0.1",
            "--user",
            "alice",
            "--password-file",
            &file_arg,
            "register",
        ])
        .unwrap();
        assert_eq!(cli.password().unwrap(), "from-file");
        let cli = parse(&["register"]).unwrap();
        assert_eq!(cli.password().unwrap(), "pw");
        let err = Cli::try_parse_from_args(&[
            "client-agent",
            "--relay",
            "127.0.0.1",
            "--user",
            "alice",
            "--password-file",
            "/nonexistent/pw",
            "register",
        ])
        .unwrap()
        .password()
        .unwrap_err();
        assert!(format!("{err}").contains("/nonexistent/pw"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "client-agent-cli-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(
            parse_duration("ten")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
    }
}
