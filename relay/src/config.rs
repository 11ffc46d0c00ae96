//! # config: the relay's settings
//!
//! Each setting comes from, in order of precedence:
//! 1. a command-line flag (`--sip`, `--advertise`, `--domain`, `--database-url`, `--log`,
//!    `--trusted`, `--sip-trace`, `--drain-secs`, `--additional`, …),
//! 2. an environment variable (`RELAY_SIP`, `RELAY_ADVERTISE`, `RELAY_DOMAIN`,
//!    `RELAY_DATABASE_URL`, `RELAY_LOG`, `RELAY_TRUSTED`, `RELAY_SIP_TRACE`,
//!    `RELAY_DRAIN_SECS`, `RELAY_ADDITIONAL` (comma-separated), …),
//! 3. the TOML file named by `--config FILE` (or `RELAY_CONFIG`),
//! 4. the default.
//!
//! Settings without a flag (`routes`, `max_tcp_message`, the expiry and nonce settings) come
//! from the file or their default. Example file:
//!
//! ```toml
//! sip = "0.0.0.0:5060"
//! advertise = "192.0.2.5"
//! domain = "example.com"
//! database_url = "sqlite://relay.db"
//! log = "info,relay=debug"
//! log_format = "text"
//! max_tcp_message = 65535
//! nonce_lifetime_secs = 300
//! offer_sha256 = false
//! max_contacts = 10
//! trusted = ["10.0.0.0/8"]
//! source_rate_per_sec = 1000
//! source_burst = 2000
//! udp_receive_buffer = 4194304
//! min_expires = 60
//! max_expires = 3600
//! default_expires = 3600
//! keepalive_secs = 30
//! sequential_timeout_ms = 10000
//! drain_secs = 30
//! http = "127.0.0.1:9090"
//! grpc = "127.0.0.1:50051"
//! charge_grace_secs = 900
//! additional = ["b=sip:192.0.2.6:5060"]
//!
//! [[routes]]
//! domain = "partner.example.net"
//! next_hop = "192.0.2.10:5060"
//! ```
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use proto::transport::limit::Cidr;
use serde::Deserialize;

/// The longest user (or service) name, in bytes: longer names in a request are refused before
/// any lookup, and `relay user add` refuses them.
pub const MAX_USER_LEN: usize = 64;

/// Operator-configured forwarding of requests for a foreign domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainRoute {
    /// The domain of the Request-URI, e.g. `partner.example.net`.
    pub domain: String,
    /// Where to send such requests.
    pub next_hop: SocketAddr,
}

/// Everything `relay` reads at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// SIP listening address (UDP and TCP). Default `0.0.0.0:5060`.
    pub sip: SocketAddr,
    /// Address the relay puts in Via and Record-Route when `sip` is a wildcard address.
    /// Default none: the bound address, or 127.0.0.1 for a wildcard.
    pub advertise: Option<IpAddr>,
    /// The relay's SIP domain; also the digest realm. Default `localhost`.
    pub domain: String,
    /// Where accounts, bindings and records are kept: `sqlite://FILE`, or
    /// `postgres://USER@HOST/DB` for several relays sharing one database. Default
    /// `sqlite://relay.db`.
    pub database_url: String,
    /// Largest SIP message accepted on a stream transport, in bytes. Default 65535.
    pub max_tcp_message: usize,
    /// `tracing` filter, e.g. `info` or `info,relay=debug`. Default `info`.
    pub log: String,
    /// How log lines are written: `text` (lines for people) or `json` (one object a line, with
    /// a span per transaction and per session carrying the Call-ID and session id). Default
    /// `text`.
    pub log_format: proto::log::LogFormat,
    /// Forwarding for foreign domains. Default none.
    pub routes: Vec<DomainRoute>,
    /// How long a digest nonce stays valid. Default 300 s.
    pub nonce_lifetime_secs: u64,
    /// Offer an SHA-256 digest challenge beside the MD5 one (MD5 is always offered). Default
    /// false: with both challenges in one 401, baresip 1.0 answers neither, and sipsak and SIPp
    /// know only MD5; linphone answers SHA-256.
    pub offer_sha256: bool,
    /// Most bindings (registered contacts) one user, or one application server for one
    /// service, may hold; a REGISTER that would pass it is refused (403) and changes nothing.
    /// Default 10.
    pub max_contacts: u32,
    /// Networks exempt from the per-source limits (`["10.0.0.0/8", "192.0.2.7"]`). Default none.
    pub trusted: Vec<Cidr>,
    /// Messages one source address may send per second, sustained (token bucket); the excess
    /// is dropped. 0 turns the limit off. Default 1000.
    pub source_rate_per_sec: u32,
    /// Messages one source address may send in a burst beyond its rate. Default 2000.
    pub source_burst: u32,
    /// Most TCP connections one source address may hold open. Default 100.
    pub tcp_per_source: usize,
    /// The UDP socket's receive buffer the relay asks for, in bytes: what arrives while the
    /// relay cannot run (a burst, a busy CPU) waits there instead of being dropped. The system
    /// grants at most `net.core.rmem_max`; the relay says so when it got less. 0 keeps the system's
    /// default. Default 4194304 (4 MiB).
    pub udp_receive_buffer: usize,
    /// Most TCP connections open at once (also bounded by the open-files limit). Default 10000.
    pub tcp_max_connections: usize,
    /// Seconds an accepted TCP connection has to deliver its first whole message. Default 10.
    pub tcp_first_message_secs: u64,
    /// Seconds an accepted TCP connection that carries no registration and no session may stay
    /// without a message. Default 120.
    pub tcp_idle_secs: u64,
    /// Most digest nonces whose counts the relay remembers (replay guard); when more are in
    /// use, the earliest issued are refused as stale and their clients take new ones. Default
    /// 100000.
    pub max_nonces: usize,
    /// Most transactions in progress at once; beyond it new requests get 503. Default 50000.
    pub max_transactions: usize,
    /// Most sessions (dialogs) at once; beyond it new INVITEs get 503. Default 100000.
    pub max_dialogs: usize,
    /// The most a party's late 200 for BYE can add to a session's billed time: the session is
    /// billed to the relayed 200, but never past this long after the relay relayed the BYE, in
    /// milliseconds. Default 4000.
    pub bye_answer_limit_ms: u64,
    /// How long the record writer lets changes gather before one commit (group commit), in
    /// milliseconds. Default 10.
    pub record_linger_ms: u64,
    /// Serve Prometheus metrics (`/metrics`) and health checks (`/healthz`, `/readyz`) over
    /// HTTP on this address; bind it to loopback or a management network (no authentication).
    /// Default none: not served.
    pub http: Option<SocketAddr>,
    /// The gRPC billing endpoint's address (`relay.v1.Billing`, health, reflection). Default
    /// none: not served.
    pub grpc: Option<SocketAddr>,
    /// The gRPC endpoint's certificate chain (PEM file): with `grpc_tls_key`, it speaks TLS
    /// (TLS 1.2 and 1.3) and application servers use `https://`. Default none.
    pub grpc_tls_cert: Option<PathBuf>,
    /// The private key of `grpc_tls_cert` (PEM file). Default none.
    pub grpc_tls_key: Option<PathBuf>,
    /// Mutual TLS for the gRPC endpoint: application servers must present a certificate this
    /// certificate authority (PEM file) signed, besides their token. Needs `grpc_tls_cert`
    /// and `grpc_tls_key`. Default none: the token alone.
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// Additional servers: other relays on the same database this relay may redirect new
    /// INVITEs to (`relay redirect add --to NAME`), as `NAME=sip:IP:PORT`
    /// (`["b=sip:192.0.2.6:5060"]`). Default none.
    pub additional: Vec<String>,
    /// How long after a session's end an application server may still report its charges
    /// (the time of the charge, and its arrival), in seconds. Default 900 (15 minutes).
    pub charge_grace_secs: u64,
    /// Auto-redial: the longest a caller may have the relay watch for a target
    /// (`;wait=SECONDS` in the dialled URI; longer asks are cut to this), in seconds. Default
    /// 3600.
    pub max_watch_secs: u64,
    /// A planned stop (SIGTERM, SIGINT): how long established sessions may go on after new
    /// calls are refused, before the relay ends them with BYE and bills them, in seconds.
    /// Default 30.
    pub drain_secs: u64,
    /// Log every SIP message received and sent, whole (for debugging; target `sip_trace`).
    /// Default false.
    pub sip_trace: bool,
    /// Smallest registration expiry accepted (else 423). Default 60 s.
    pub min_expires: u32,
    /// Largest registration expiry granted. Default 3600 s.
    pub max_expires: u32,
    /// Expiry when a REGISTER gives none. Default 3600 s.
    pub default_expires: u32,
    /// SIP timer T1 (RFC 3261 §17: the round-trip estimate every retransmission and timeout
    /// derives from), in milliseconds. Default 500.
    pub timer_t1_ms: u64,
    /// How long the relay may reuse an account or a user's bindings read from the store, in
    /// milliseconds; changes made by admin commands or another relay take effect within this
    /// time. 0 reads the store on every request. Default 1000.
    pub cache_ttl_ms: u64,
    /// Threads running SIP work. 1 runs everything on one thread, which is the cheapest per
    /// call; more spread the work over several cores. Default 1.
    pub threads: usize,
    /// How often the relay checks that both parties of an established session are still
    /// there, with an in-dialog OPTIONS to each (a 408, a 481 or no answer means gone), in
    /// seconds. 0 turns the checks off. Default 30.
    pub keepalive_secs: u64,
    /// With `--fork sequential`, how long one application server may ring before the relay
    /// cancels it and tries the next, in milliseconds. Default 10000.
    pub sequential_timeout_ms: u64,
    /// How long the relay's assertion on a relayed INVITE stays valid, in seconds: long enough
    /// for `--fork sequential` to reach the last server. Default 120.
    pub assertion_ttl_secs: u64,
    /// This relay's name among several sharing one PostgreSQL: it owns the records of the
    /// sessions it relays, and after a restart resumes or closes only those. Default: the
    /// advertised SIP address (`IP:PORT`), so keep it stable or set it.
    pub node_id: Option<String>,
    /// Whether the domain was given (flag, environment or file) rather than defaulted: new
    /// accounts need the domain of the relay that will challenge them.
    #[serde(skip)]
    pub domain_given: bool,
    /// Admin commands may create a missing SQLite database (`--create-database`); `relay serve`
    /// always may.
    #[serde(skip)]
    pub create_database: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sip: SocketAddr::from(([0, 0, 0, 0], 5060)),
            advertise: None,
            domain: "localhost".to_owned(),
            database_url: "sqlite://relay.db".to_owned(),
            max_tcp_message: 65535,
            log: "info".to_owned(),
            log_format: proto::log::LogFormat::Text,
            routes: Vec::new(),
            nonce_lifetime_secs: 300,
            offer_sha256: false,
            max_contacts: 10,
            trusted: Vec::new(),
            source_rate_per_sec: 1000,
            source_burst: 2000,
            tcp_per_source: 100,
            udp_receive_buffer: 4 * 1024 * 1024,
            tcp_max_connections: 10_000,
            tcp_first_message_secs: 10,
            tcp_idle_secs: 120,
            max_nonces: 100_000,
            max_transactions: 50_000,
            max_dialogs: 100_000,
            bye_answer_limit_ms: 4000,
            record_linger_ms: 10,
            http: None,
            grpc: None,
            grpc_tls_cert: None,
            grpc_tls_key: None,
            grpc_tls_client_ca: None,
            additional: Vec::new(),
            charge_grace_secs: 900,
            max_watch_secs: 3600,
            drain_secs: 30,
            sip_trace: false,
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            timer_t1_ms: 500,
            cache_ttl_ms: 1000,
            threads: 1,
            keepalive_secs: 30,
            sequential_timeout_ms: 10_000,
            assertion_ttl_secs: 120,
            node_id: None,
            domain_given: false,
            create_database: false,
        }
    }
}

/// An additional server: another relay on the same database, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Additional {
    pub name: String,
    /// Its SIP address (an IP literal: the relay never resolves names).
    pub addr: SocketAddr,
}

/// `NAME=sip:IP:PORT` (port 5060 when left out).
pub fn parse_additional(text: &str) -> anyhow::Result<Additional> {
    let (name, uri) = text
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{text:?} is not NAME=sip:IP:PORT"))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("{text:?}: the name must be letters, digits, '-', '_' or '.'");
    }
    let uri = proto::sip::message::Uri::parse(uri.trim())
        .map_err(|e| anyhow::anyhow!("{text:?}: not a SIP URI ({})", e.reason))?;
    let ip: std::net::IpAddr = uri
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            anyhow::anyhow!(
                "{text:?}: the host must be an IP address (the relay never resolves names)"
            )
        })?;
    Ok(Additional {
        name: name.to_string(),
        addr: SocketAddr::new(ip, uri.port.unwrap_or(5060)),
    })
}

impl Config {
    /// The additional servers, checked (names unique).
    pub fn additional_servers(&self) -> anyhow::Result<Vec<Additional>> {
        let mut out: Vec<Additional> = Vec::new();
        for text in &self.additional {
            let a = parse_additional(text).context("bad additional server")?;
            if out.iter().any(|o| o.name == a.name) {
                bail!("additional server {:?} is named twice", a.name);
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Reads a TOML config file; missing keys take their defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config = Config::from_toml(&text)
            .with_context(|| format!("bad config file {}", path.display()))?;
        config.domain_given = text
            .parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("domain"));
        Ok(config)
    }

    /// Parses TOML text; missing keys take their defaults.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        // toml's message already names the line, the column and the problem.
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }

    /// Checks the values fit together.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.domain.trim().is_empty() {
            bail!("domain must not be empty");
        }
        if self.database_url.trim().is_empty() {
            bail!("database_url must not be empty");
        }
        if self.max_tcp_message < 1024 {
            bail!(
                "max_tcp_message must be at least 1024 bytes (is {})",
                self.max_tcp_message
            );
        }
        if self.nonce_lifetime_secs == 0 {
            bail!("nonce_lifetime_secs must be above 0");
        }
        if !(self.min_expires <= self.default_expires && self.default_expires <= self.max_expires) {
            bail!(
                "expiry settings must satisfy min_expires ({}) <= default_expires ({}) <= max_expires ({})",
                self.min_expires,
                self.default_expires,
                self.max_expires
            );
        }
        if self.grpc_tls_cert.is_some() != self.grpc_tls_key.is_some() {
            bail!("grpc_tls_cert and grpc_tls_key go together: give both (PEM files) or neither");
        }
        if self.grpc_tls_cert.is_some() && self.grpc.is_none() {
            bail!("grpc_tls_cert without grpc: give the endpoint's address too (--grpc ADDR)");
        }
        self.additional_servers()?;
        if !(1..=86_400).contains(&self.max_watch_secs) {
            bail!(
                "max_watch_secs must be between 1 and 86400 (is {})",
                self.max_watch_secs
            );
        }
        if self.sequential_timeout_ms == 0 {
            bail!("sequential_timeout_ms must be above 0");
        }
        // Durations are added to clocks and multiplied (T1 by 64); refuse what would overflow
        // or make no sense, by name.
        let bounded: [(&str, u64, u64, u64); 16] = [
            ("timer_t1_ms", self.timer_t1_ms, 1, 60_000),
            ("nonce_lifetime_secs", self.nonce_lifetime_secs, 1, 86_400),
            ("cache_ttl_ms", self.cache_ttl_ms, 0, 3_600_000),
            ("keepalive_secs", self.keepalive_secs, 0, 86_400),
            ("drain_secs", self.drain_secs, 0, 86_400),
            (
                "sequential_timeout_ms",
                self.sequential_timeout_ms,
                1,
                3_600_000,
            ),
            ("assertion_ttl_secs", self.assertion_ttl_secs, 1, 86_400),
            (
                "tcp_first_message_secs",
                self.tcp_first_message_secs,
                1,
                3_600,
            ),
            ("tcp_idle_secs", self.tcp_idle_secs, 1, 86_400),
            ("bye_answer_limit_ms", self.bye_answer_limit_ms, 0, 60_000),
            ("record_linger_ms", self.record_linger_ms, 0, 10_000),
            ("charge_grace_secs", self.charge_grace_secs, 0, 31 * 86_400),
            ("max_expires", u64::from(self.max_expires), 1, 31_536_000),
            ("threads", self.threads as u64, 0, 1024),
            ("max_contacts", u64::from(self.max_contacts), 1, 10_000),
            (
                "udp_receive_buffer",
                self.udp_receive_buffer as u64,
                0,
                1 << 30,
            ),
        ];
        for (name, value, min, max) in bounded {
            if !(min..=max).contains(&value) {
                bail!("{name} must be between {min} and {max} (is {value})");
            }
        }
        for (name, value) in [
            ("tcp_per_source", self.tcp_per_source),
            ("tcp_max_connections", self.tcp_max_connections),
            ("max_transactions", self.max_transactions),
            ("max_nonces", self.max_nonces),
            ("max_dialogs", self.max_dialogs),
        ] {
            if value == 0 {
                bail!("{name} must be above 0");
            }
        }
        for route in &self.routes {
            if route.domain.trim().is_empty() {
                bail!("a route has an empty domain");
            }
        }
        Ok(())
    }
}

/// Options every subcommand accepts, before or after the subcommand's name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// TOML config file (settings below override it).
    #[arg(long, global = true, env = "RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database: sqlite://FILE (default sqlite://relay.db) or postgres://USER@HOST/DB.
    #[arg(long, global = true, env = "RELAY_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// SIP domain of this relay, also the digest realm (default localhost).
    #[arg(long, global = true, env = "RELAY_DOMAIN")]
    pub domain: Option<String>,
    /// SIP listening address for UDP and TCP (default 0.0.0.0:5060).
    #[arg(long, global = true, env = "RELAY_SIP", value_name = "ADDR")]
    pub sip: Option<SocketAddr>,
    /// Address to put in Via and Record-Route when --sip is a wildcard (default: 127.0.0.1).
    #[arg(long, global = true, env = "RELAY_ADVERTISE", value_name = "IP")]
    pub advertise: Option<IpAddr>,
    /// Log filter, e.g. `info` or `relay=debug` (default info).
    #[arg(long, global = true, env = "RELAY_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log lines as `text` (default) or `json` (one object a line, with the transaction's and
    /// the session's Call-ID and session id).
    #[arg(
        long,
        global = true,
        env = "RELAY_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum
    )]
    pub log_format: Option<proto::log::LogFormat>,
    /// Networks exempt from the per-source rate and connection limits, e.g.
    /// 10.0.0.0/8,192.0.2.7 (default none).
    #[arg(
        long,
        global = true,
        env = "RELAY_TRUSTED",
        value_name = "CIDR[,CIDR...]"
    )]
    pub trusted: Option<String>,
    /// Log every SIP message received and sent, whole (a SIP trace, for debugging).
    #[arg(long, global = true, env = "RELAY_SIP_TRACE")]
    pub sip_trace: bool,
    /// On SIGTERM or SIGINT: seconds the established sessions may go on before the relay ends
    /// them (default 30; a second signal stops at once).
    #[arg(long, global = true, env = "RELAY_DRAIN_SECS", value_name = "SECS")]
    pub drain_secs: Option<u64>,
    /// Serve Prometheus metrics (/metrics) and health checks (/healthz, /readyz) over HTTP on
    /// this address (no authentication: loopback or a management network). Default: not
    /// served.
    #[arg(long, global = true, env = "RELAY_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Serve the gRPC billing endpoint on this address (application servers report charges
    /// there with a token from `relay appserver token NAME`). Default: not served.
    #[arg(long, global = true, env = "RELAY_GRPC", value_name = "ADDR")]
    pub grpc: Option<SocketAddr>,
    /// The gRPC endpoint's certificate chain (PEM); with --grpc-tls-key it speaks TLS.
    #[arg(long, global = true, env = "RELAY_GRPC_TLS_CERT", value_name = "FILE")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// The private key of --grpc-tls-cert (PEM).
    #[arg(long, global = true, env = "RELAY_GRPC_TLS_KEY", value_name = "FILE")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Mutual TLS: application servers must present a certificate this CA (PEM) signed,
    /// besides their token (needs --grpc-tls-cert and --grpc-tls-key).
    #[arg(
        long,
        global = true,
        env = "RELAY_GRPC_TLS_CLIENT_CA",
        value_name = "FILE"
    )]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// How long after a session's end its charges are still taken, in seconds (default 900).
    #[arg(
        long,
        global = true,
        env = "RELAY_CHARGE_GRACE_SECS",
        value_name = "SECS"
    )]
    pub charge_grace_secs: Option<u64>,
    /// Admin commands: create the SQLite database when it does not exist (`relay serve` always
    /// does).
    #[arg(long, global = true)]
    pub create_database: bool,
    /// An additional server (another relay on the same database) this relay may redirect new
    /// calls to, e.g. b=sip:192.0.2.6:5060 (repeat for several; see `relay redirect`).
    #[arg(
        long,
        global = true,
        env = "RELAY_ADDITIONAL",
        value_delimiter = ',',
        value_name = "NAME=SIP-URI"
    )]
    pub additional: Vec<String>,
}

impl GlobalArgs {
    /// Builds the configuration: flag > environment > config file > default.
    /// (clap has already merged each flag with its environment variable.)
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(sip) = self.sip {
            config.sip = sip;
        }
        if let Some(ip) = self.advertise {
            config.advertise = Some(ip);
        }
        if let Some(domain) = &self.domain {
            config.domain = domain.clone();
            config.domain_given = true;
        }
        config.create_database = self.create_database;
        if let Some(url) = &self.database_url {
            config.database_url = url.clone();
        }
        if let Some(log) = &self.log {
            config.log = log.clone();
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        if self.sip_trace {
            config.sip_trace = true;
        }
        if let Some(secs) = self.drain_secs {
            config.drain_secs = secs;
        }
        if let Some(addr) = self.grpc {
            config.grpc = Some(addr);
        }
        if let Some(addr) = self.http {
            config.http = Some(addr);
        }
        if let Some(f) = &self.grpc_tls_cert {
            config.grpc_tls_cert = Some(f.clone());
        }
        if let Some(f) = &self.grpc_tls_key {
            config.grpc_tls_key = Some(f.clone());
        }
        if let Some(f) = &self.grpc_tls_client_ca {
            config.grpc_tls_client_ca = Some(f.clone());
        }
        if let Some(secs) = self.charge_grace_secs {
            config.charge_grace_secs = secs;
        }
        if !self.additional.is_empty() {
            config.additional = self.additional.clone();
        }
        if let Some(trusted) = &self.trusted {
            config.trusted =
                Cidr::parse_list(trusted).map_err(|e| anyhow::anyhow!("bad --trusted: {e}"))?;
        }
        match &self.config {
            Some(path) => config
                .validate()
                .with_context(|| format!("bad configuration (file {})", path.display()))?,
            None => config.validate().context("bad configuration")?,
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn file_values_and_routes() {
        let c = Config::from_toml(
            "domain = \"example.com\"\nsip = \"127.0.0.1:5080\"\n\
             [[routes]]\ndomain = \"b.net\"\nnext_hop = \"192.0.2.1:5060\"\n",
        )
        .unwrap();
        assert_eq!(c.domain, "example.com");
        assert_eq!(c.sip, "127.0.0.1:5080".parse().unwrap());
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.max_expires, 3600);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("domian = \"x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("domian"), "{err:#}");
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "domain = \"file.example\"\nlog = \"debug\"\n").unwrap();
        let args = GlobalArgs {
            config: Some(path),
            domain: Some("flag.example".into()),
            ..GlobalArgs::default()
        };
        let c = args.load().unwrap();
        assert_eq!(c.domain, "flag.example");
        assert_eq!(c.log, "debug");
    }

    #[test]
    fn md5_alone_is_offered_by_default() {
        // baresip 1.0 answers neither challenge of an MD5 + SHA-256 pair.
        assert!(!Config::default().offer_sha256);
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn settings_that_would_overflow_are_refused_by_name() {
        for (key, value) in [
            ("timer_t1_ms", "9223372036854775807"),
            ("keepalive_secs", "9223372036854775807"),
            ("drain_secs", "9223372036854775807"),
            ("sequential_timeout_ms", "9223372036854775807"),
            ("assertion_ttl_secs", "9223372036854775807"),
            ("nonce_lifetime_secs", "9223372036854775807"),
            ("cache_ttl_ms", "9223372036854775807"),
            ("tcp_idle_secs", "9223372036854775807"),
            ("tcp_first_message_secs", "0"),
            ("bye_answer_limit_ms", "9223372036854775807"),
            ("max_expires", "4294967295"),
            ("threads", "100000"),
            ("max_contacts", "0"),
            ("max_dialogs", "0"),
            ("udp_receive_buffer", "4294967296"),
        ] {
            let c = Config::from_toml(&format!("{key} = {value}\n"))
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            let err = c.validate().expect_err(key);
            assert!(format!("{err}").contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn additional_servers_are_names_and_ip_addresses() {
        let c = Config::from_toml("additional = [\"b=sip:192.0.2.6:5070\", \"c=sip:192.0.2.7\"]\n")
            .unwrap();
        let a = c.additional_servers().unwrap();
        assert_eq!(a[0].name, "b");
        assert_eq!(a[0].addr, "192.0.2.6:5070".parse().unwrap());
        assert_eq!(a[1].addr, "192.0.2.7:5060".parse().unwrap());
        for (bad, says) in [
            ("b", "NAME=sip:IP:PORT"),
            ("=sip:192.0.2.6", "the name"),
            ("b=sip:relay.example.com:5060", "never resolves"),
            ("b=http://192.0.2.6/", "not a SIP URI"),
        ] {
            let e = parse_additional(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let twice =
            Config::from_toml("additional = [\"b=sip:192.0.2.6\", \"b=sip:192.0.2.7\"]\n").unwrap();
        assert!(format!("{:#}", twice.validate().unwrap_err()).contains("named twice"));
    }

    #[test]
    fn trusted_networks_from_flag_or_file() {
        let c = Config::from_toml("trusted = [\"10.0.0.0/8\", \"192.0.2.7\"]\n").unwrap();
        assert_eq!(c.trusted.len(), 2);
        let err = Config::from_toml("trusted = [\"10.0.0.0/40\"]\n").unwrap_err();
        assert!(format!("{err}").contains("prefix"), "{err}");
        let args = GlobalArgs {
            trusted: Some("127.0.0.2/32, 10.1.0.0/16".into()),
            ..GlobalArgs::default()
        };
        assert_eq!(args.load().unwrap().trusted.len(), 2);
        let bad = GlobalArgs {
            trusted: Some("10.0.0.0/8,nonsense".into()),
            ..GlobalArgs::default()
        };
        let err = bad.load().unwrap_err();
        assert!(format!("{err:#}").contains("nonsense"), "{err:#}");
    }

    #[test]
    fn inconsistent_expiry_is_refused() {
        let c = Config {
            min_expires: 100,
            default_expires: 50,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
