//! The command line of `app-server-agent` (clap), and its validation into [`Settings`].
//!
//! Parses and checks what the user typed; every error names the flag at fault. Does no I/O
//! beyond resolving the relay's name, and never prints or logs the password.

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use proto::sip::message::Transport;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "app-server-agent",
    version,
    about = "Runs beside a vendor's web service: registers its services with the sip-relay relay, \
             accepts or refuses the sessions it relays and lets the web service verify visitors"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register the services and serve sessions until Ctrl-C or SIGTERM, then unregister.
    Run(RunArgs),
    /// A small demo web service to try the agent with: its page (the agent's --url) verifies
    /// the visitor's token with the agent and sells one item through it.
    DemoShop(DemoShopArgs),
}

/// The flags of `app-server-agent demo-shop`.
#[derive(Debug, Clone, Args)]
pub struct DemoShopArgs {
    /// Where the shop's page listens (IP:PORT).
    #[arg(long, env = "DEMO_SHOP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The agent's HTTP API, http://IP:PORT (its --http).
    #[arg(long, env = "DEMO_SHOP_AGENT", default_value = "http://127.0.0.1:8790")]
    pub agent: String,
    /// The agent's --http-token, if it has one.
    #[arg(long, env = "DEMO_SHOP_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// What the page sells.
    #[arg(long, env = "DEMO_SHOP_ITEM", default_value = "a glass of wine")]
    pub item: String,
    /// Its price in minor units (cents).
    #[arg(long, env = "DEMO_SHOP_PRICE", default_value_t = 450)]
    pub price: i64,
    /// Its currency (ISO 4217).
    #[arg(long, env = "DEMO_SHOP_CURRENCY", default_value = "EUR")]
    pub currency: String,
    /// Log lines (standard error) as `text` or `json`.
    #[arg(
        long,
        env = "APP_AGENT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: proto::log::LogFormat,
}

/// A password that never shows in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Password {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Password(s.to_string()))
    }
}

/// The flags of `app-server-agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The relay's SIP address, HOST:PORT (port 5060 if left out).
    #[arg(long, env = "APP_AGENT_RELAY")]
    pub relay: String,
    /// The application server account at the relay (digest user name).
    #[arg(long, env = "APP_AGENT_ACCOUNT")]
    pub account: String,
    /// The account's password. Better kept off the command line (other local users can read
    /// it there): set APP_AGENT_PASSWORD or use --password-file.
    #[arg(long, env = "APP_AGENT_PASSWORD", hide_env_values = true)]
    pub password: Option<Password>,
    /// A file whose first line is the account's password.
    #[arg(
        long,
        env = "APP_AGENT_PASSWORD_FILE",
        value_name = "FILE",
        conflicts_with = "password"
    )]
    pub password_file: Option<std::path::PathBuf>,
    /// A service this server delivers (repeat the flag, or separate with commas).
    #[arg(
        long = "service",
        env = "APP_AGENT_SERVICES",
        value_delimiter = ',',
        required = true
    )]
    pub services: Vec<String>,
    /// The URL of the web service; clients get it with `token=…` added to its query.
    #[arg(long, env = "APP_AGENT_URL")]
    pub url: String,
    /// Most sessions at once; further ones get 486 Busy Here with Retry-After.
    #[arg(long, env = "APP_AGENT_CAPACITY")]
    pub capacity: Option<usize>,
    /// Ask this plain http:// URL whether to accept each session (POST JSON, 3 s timeout).
    #[arg(long, env = "APP_AGENT_DECISION_WEBHOOK")]
    pub decision_webhook: Option<String>,
    /// Serve the local HTTP API (introspect, close, sessions, charges, health, metrics) on
    /// ADDR (IP:PORT, or a port on 127.0.0.1). Without it there is no HTTP API.
    #[arg(long, env = "APP_AGENT_HTTP", value_parser = parse_http_addr)]
    pub http: Option<SocketAddr>,
    /// A secret the web service must send as `Authorization: Bearer SECRET` on every HTTP API
    /// call. Required when --http is not a loopback address (the API can end sessions).
    #[arg(long, env = "APP_AGENT_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<Password>,
    /// Local SIP address to bind (default: an ephemeral port on the address that reaches the relay).
    #[arg(long, env = "APP_AGENT_SIP")]
    pub sip: Option<SocketAddr>,
    /// The SIP domain (the relay's realm); defaults to the relay's address.
    #[arg(long, env = "APP_AGENT_DOMAIN")]
    pub domain: Option<String>,
    /// Transport to the relay.
    #[arg(long, env = "APP_AGENT_TRANSPORT", value_parser = ["udp", "tcp"], default_value = "udp")]
    pub transport: String,
    /// Registration lifetime to ask for, in seconds (refreshed at 90 % of what is granted).
    #[arg(long, env = "APP_AGENT_EXPIRES", default_value_t = 300)]
    pub expires: u32,
    /// Seconds put in Retry-After when refusing for capacity (486) or an unavailable webhook (503).
    #[arg(long, env = "APP_AGENT_RETRY_AFTER", default_value_t = 30)]
    pub retry_after: u32,
    /// How long a session's token stays valid (e.g. 30m, 12h).
    #[arg(long, env = "APP_AGENT_TOKEN_TTL", value_parser = parse_duration, default_value = "12h")]
    pub token_ttl: Duration,
    /// Check each live session every this many seconds with an in-dialog OPTIONS through the
    /// relay; a 408, a 481 or no answer ends it here (the relay or the client is gone). 0: off.
    #[arg(long, env = "APP_AGENT_KEEPALIVE", default_value_t = 30)]
    pub keepalive: u64,
    /// The relay's gRPC billing endpoint, e.g. http://relay.example:50051 (the relay's
    /// `serve --grpc`); charges go there.
    #[arg(long, env = "APP_AGENT_GRPC", value_name = "URL")]
    pub grpc: Option<String>,
    /// The billing token from `relay appserver token ACCOUNT`. Better kept off the command
    /// line: set APP_AGENT_GRPC_TOKEN or use --grpc-token-file.
    #[arg(long, env = "APP_AGENT_GRPC_TOKEN", hide_env_values = true)]
    pub grpc_token: Option<Password>,
    /// A file whose first line is the billing token.
    #[arg(
        long,
        env = "APP_AGENT_GRPC_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "grpc_token"
    )]
    pub grpc_token_file: Option<std::path::PathBuf>,
    /// With an https:// --grpc: the certificate authority (PEM) that signed the relay's
    /// certificate; default: the system's roots.
    #[arg(long, env = "APP_AGENT_GRPC_CA", value_name = "FILE")]
    pub grpc_ca: Option<std::path::PathBuf>,
    /// With an https:// --grpc to a relay that asks for mutual TLS (its
    /// --grpc-tls-client-ca): this server's certificate chain (PEM), with --grpc-key.
    #[arg(
        long,
        env = "APP_AGENT_GRPC_CERT",
        value_name = "FILE",
        requires = "grpc_key"
    )]
    pub grpc_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --grpc-cert.
    #[arg(
        long,
        env = "APP_AGENT_GRPC_KEY",
        value_name = "FILE",
        requires = "grpc_cert"
    )]
    pub grpc_key: Option<std::path::PathBuf>,
    /// How charges reach the relay: `immediate` (each over gRPC at once), `on-bye` (held, then
    /// in the 200 OK for the client's BYE; over gRPC when the session ends otherwise) or `info`
    /// (each at once in an INFO within the session; over gRPC when that is not possible).
    #[arg(
        long,
        env = "APP_AGENT_BILLING",
        value_enum,
        default_value = "immediate"
    )]
    pub billing: crate::billing::Mode,
    /// Where charges wait until the relay has answered them (kept across restarts, owner
    /// readable only). Default: ACCOUNT.charges.json in the working directory.
    #[arg(long, env = "APP_AGENT_CHARGES_FILE", value_name = "FILE")]
    pub charges_file: Option<std::path::PathBuf>,
    /// SIP timer T1 in milliseconds (2xx retransmission, the 64*T1 wait for ACK). For tests.
    #[arg(long, default_value_t = 500, hide = true)]
    pub timer_t1_ms: u64,
    /// Log lines (standard error, filtered by APP_AGENT_LOG, default warn) as `text` or `json`
    /// (one object a line, with a span per session carrying its id and Call-ID).
    #[arg(
        long,
        env = "APP_AGENT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: proto::log::LogFormat,
    /// A TOML settings file: each key a flag's name with `_` for `-` (`register_expires =
    /// 300`, `service = ["wine", "beer"]`); flags and variables win over it.
    #[arg(long, env = "APP_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

impl Cli {
    /// Parses arguments (the first is the program name), for programs that run the agent in-process.
    pub fn try_parse_from_args(args: &[&str]) -> anyhow::Result<Cli> {
        Ok(<Cli as Parser>::try_parse_from(args)?)
    }
}

impl RunArgs {
    /// Parses `run` arguments alone (the first is the program name), for in-process callers.
    pub fn try_parse_from_args(args: &[&str]) -> anyhow::Result<RunArgs> {
        let mut argv = vec![args.first().copied().unwrap_or("app-server-agent"), "run"];
        argv.extend(args.iter().skip(1).copied());
        match Cli::try_parse_from_args(&argv)?.command {
            Command::Run(run) => Ok(run),
            Command::DemoShop(_) => anyhow::bail!("not `run`"),
        }
    }
}

/// The checked settings the agent runs with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) relay: SocketAddr,
    pub(crate) transport: Transport,
    pub(crate) account: String,
    pub(crate) password: Password,
    pub(crate) services: Vec<String>,
    pub(crate) url: String,
    pub(crate) capacity: Option<usize>,
    pub(crate) webhook: Option<String>,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) http_token: Option<Password>,
    pub(crate) sip: Option<SocketAddr>,
    pub(crate) domain: String,
    /// The relay's realm when `--domain` names it; else learnt from the relay's first challenge.
    pub(crate) realm: Option<String>,
    pub(crate) expires: u32,
    pub(crate) retry_after: u32,
    pub(crate) token_ttl: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) t1: Duration,
    /// The gRPC endpoint's URL, token and, for https, the authority to trust.
    pub(crate) grpc: Option<crate::billing::GrpcSettings>,
    pub(crate) billing: crate::billing::Mode,
    pub(crate) charges_file: std::path::PathBuf,
}

impl Settings {
    /// Checks the arguments and resolves the relay's address.
    pub(crate) async fn from_args(args: &RunArgs) -> anyhow::Result<Settings> {
        let (relay, relay_host) = resolve_relay(&args.relay).await?;
        check_token("--account", &args.account)?;
        let given = proto::secret::given_or_file(
            args.password.as_ref().map(|p| p.0.as_str()),
            args.password_file.as_deref(),
        )
        .map_err(|e| anyhow!(e))?;
        let Some(password) = given.map(Password) else {
            bail!(
                "no password: set APP_AGENT_PASSWORD, or give --password-file FILE (its first line)"
            );
        };
        if password.0.is_empty() {
            bail!("--password is empty");
        }
        let mut services: Vec<String> = Vec::new();
        for s in &args.services {
            let s = s.trim();
            check_token("--service", s)?;
            if !services.iter().any(|x| x == s) {
                services.push(s.to_string());
            }
        }
        if services.is_empty() {
            bail!("at least one --service is needed");
        }
        check_url(&args.url)?;
        if args.capacity == Some(0) {
            bail!("--capacity must be at least 1");
        }
        if let Some(w) = &args.decision_webhook {
            crate::admission::Webhook::parse(w)?;
        }
        if args.expires == 0 {
            bail!("--expires must be at least 1 second");
        }
        if args.token_ttl.is_zero() {
            bail!("--token-ttl must be longer than 0");
        }
        if let Some(addr) = args.http {
            if args.http_token.is_none() && !addr.ip().is_loopback() {
                bail!(
                    "--http {addr} is reachable from other hosts: set --http-token (the web \
                     service then sends Authorization: Bearer TOKEN) or use a loopback address"
                );
            }
        }
        if args.http_token.as_ref().is_some_and(|t| t.0.len() < 16) {
            bail!("--http-token must be at least 16 characters");
        }
        let grpc = match &args.grpc {
            None => {
                if args.grpc_token.is_some() || args.grpc_token_file.is_some() {
                    bail!(
                        "a gRPC token without --grpc: give the relay's billing endpoint too (--grpc URL)"
                    );
                }
                None
            }
            Some(url) => {
                let url = url.trim();
                let url = if url.starts_with("http://") || url.starts_with("https://") {
                    url.to_string()
                } else if !url.is_empty() && !url.contains("://") {
                    format!("http://{url}")
                } else {
                    bail!("--grpc {url:?}: give http://HOST:PORT (the relay's --grpc address)");
                };
                let token = proto::secret::given_or_named_file(
                    args.grpc_token.as_ref().map(|p| p.0.as_str()),
                    args.grpc_token_file.as_deref(),
                    "billing token",
                )
                .map_err(|e| anyhow!(e))?;
                let Some(token) = token.filter(|t| !t.trim().is_empty()) else {
                    bail!(
                        "--grpc needs the billing token from `relay appserver token {}`: set \
                         APP_AGENT_GRPC_TOKEN, or give --grpc-token-file FILE",
                        args.account
                    );
                };
                if args.grpc_ca.is_some() && !url.starts_with("https://") {
                    bail!("--grpc-ca is for an https:// --grpc");
                }
                if args.grpc_cert.is_some() && !url.starts_with("https://") {
                    bail!("--grpc-cert and --grpc-key are for an https:// --grpc");
                }
                Some(crate::billing::GrpcSettings {
                    url,
                    token,
                    ca: args.grpc_ca.clone(),
                    identity: args.grpc_cert.clone().zip(args.grpc_key.clone()),
                })
            }
        };
        let charges_file = args
            .charges_file
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(format!("{}.charges.json", args.account)));
        let (domain, realm) = match &args.domain {
            Some(d) if !d.trim().is_empty() => (d.trim().to_string(), Some(d.trim().to_string())),
            Some(_) => bail!("--domain is empty"),
            None => (relay_host, None),
        };
        Ok(Settings {
            relay,
            transport: if args.transport.eq_ignore_ascii_case("tcp") {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            account: args.account.clone(),
            password,
            services,
            url: args.url.trim().to_string(),
            capacity: args.capacity,
            webhook: args.decision_webhook.clone(),
            http: args.http,
            http_token: args.http_token.clone(),
            sip: args.sip,
            domain,
            realm,
            expires: args.expires,
            retry_after: args.retry_after,
            token_ttl: args.token_ttl,
            keepalive: Duration::from_secs(args.keepalive),
            t1: Duration::from_millis(args.timer_t1_ms.clamp(1, 60_000)),
            grpc,
            billing: args.billing,
            charges_file,
        })
    }
}

/// The relay's address, and the default domain: the address as given for an IP literal (like
/// client-agent), the host name alone for a name.
async fn resolve_relay(s: &str) -> anyhow::Result<(SocketAddr, String)> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok((addr, addr.to_string()));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, 5060);
        return Ok((addr, addr.to_string()));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| anyhow!("--relay {s:?}: {p:?} is not a port number"))?,
        ),
        _ => (s, 5060),
    };
    if host.is_empty() {
        bail!("--relay {s:?} has no host (expected HOST:PORT, e.g. 127.0.0.1:5060)");
    }
    let addr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("--relay {s:?}: cannot resolve {host:?}"))?
        .next()
        .ok_or_else(|| anyhow!("--relay {s:?}: {host:?} has no address"))?;
    Ok((addr, host.to_string()))
}

/// Account and service names go into SIP URIs as the user part: keep them to safe characters.
fn check_token(flag: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty() {
        bail!("{flag} is empty");
    }
    if value.len() > 64
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '~'))
    {
        bail!("{flag} {value:?} must be 1 to 64 letters, digits or - _ . + ~");
    }
    Ok(())
}

/// `--url` must be an absolute http(s) URL with a host and nothing that breaks a header.
pub(crate) fn check_url(url: &str) -> anyhow::Result<()> {
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    let Some(rest) = rest else {
        bail!("--url is not an http(s) URL: {url:?}");
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() {
        bail!("--url has no host: {url:?}");
    }
    if url
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
    {
        bail!("--url contains spaces, control characters or <>\": {url:?}");
    }
    Ok(())
}

/// `8080` (on 127.0.0.1) or `IP:PORT`.
fn parse_http_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not IP:PORT or a port number (e.g. 127.0.0.1:8790)"))
}

pub use proto::clock::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> anyhow::Result<RunArgs> {
        let mut argv = vec![
            "app-server-agent",
            "--relay",
            "127.0.0.1:5060",
            "--account",
            "vendor",
            "--password",
            "secret",
            "--service",
            "wine",
            "--url",
            "https://shop.example/visit",
        ];
        argv.extend_from_slice(extra);
        RunArgs::try_parse_from_args(&argv)
    }

    #[test]
    fn defaults_and_repeated_services() {
        let a = args(&["--service", "beer,cider", "--http", "8790"]).unwrap();
        assert_eq!(a.services, ["wine", "beer", "cider"]);
        assert_eq!(a.expires, 300);
        assert_eq!(a.retry_after, 30);
        assert_eq!(a.token_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(a.http, Some("127.0.0.1:8790".parse().unwrap()));
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[tokio::test]
    async fn settings_name_the_flag_at_fault() {
        let s = Settings::from_args(&args(&[]).unwrap()).await.unwrap();
        assert_eq!(s.domain, "127.0.0.1:5060");
        let mut a = args(&[]).unwrap();
        a.url = "ftp://x".into();
        let e = Settings::from_args(&a).await.unwrap_err().to_string();
        assert!(e.contains("--url is not an http(s) URL"), "{e}");
        let mut a = args(&[]).unwrap();
        a.services = vec!["bad name".into()];
        let e = Settings::from_args(&a).await.unwrap_err().to_string();
        assert!(e.contains("--service"), "{e}");
        let mut a = args(&[]).unwrap();
        a.decision_webhook = Some("https://hook.example/".into());
        let e = Settings::from_args(&a).await.unwrap_err().to_string();
        assert!(e.contains("--decision-webhook"), "{e}");
    }

    #[tokio::test]
    async fn the_password_comes_from_a_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("asa-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut a = args(&[]).unwrap();
        a.password = None;
        a.password_file = Some(file.clone());
        let s = Settings::from_args(&a).await.unwrap();
        assert_eq!(s.password.0, "from-file");
        a.password_file = Some(dir.join("missing"));
        let e = Settings::from_args(&a).await.unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        a.password_file = None;
        let e = Settings::from_args(&a).await.unwrap_err().to_string();
        assert!(e.contains("APP_AGENT_PASSWORD"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43200));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
    }
}
