//! A relay in-process on 127.0.0.1 port 0 over SQLite or a throwaway PostgreSQL, client agents
//! in-process with their events on a channel, and a raw SIP socket for hand-made messages.

use crate::pg::PgCluster;
use anyhow::{Context as _, anyhow, bail};
use client_agent::output::{Event, Output};
use proto::sip::digest::{self, Algorithm};
use proto::sip::message::{self, Limits, Message, Response};
use relay::config::Config;
use relay::serve::RelayHandle;
use relay::store::{Cdr, CdrState, Store};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The realm and domain of test relays.
pub const DOMAIN: &str = "relay.test";

/// Which store a test relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A relay serving on loopback for one test.
pub struct TestRelay {
    pub handle: Option<RelayHandle>,
    pub url: String,
    pub store: Store,
    config: Config,
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for TestRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRelay")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Logs to the test's output when `TEST_LOG` is set (e.g. `TEST_LOG=relay=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A config for a test relay: loopback, port 0, short SIP timers so timeouts take seconds.
pub fn test_config(url: &str) -> Config {
    Config {
        sip: "127.0.0.1:0".parse().expect("literal address"),
        domain: DOMAIN.into(),
        database_url: url.into(),
        timer_t1_ms: 100,
        ..Config::default()
    }
}

impl TestRelay {
    pub async fn start(db: Db) -> anyhow::Result<TestRelay> {
        Self::start_tuned(db, |_| {}).await
    }

    /// [`TestRelay::start`] with settings changed by `tune`.
    pub async fn start_tuned(db: Db, tune: impl FnOnce(&mut Config)) -> anyhow::Result<TestRelay> {
        init_logging();
        let (url, dir) = match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir()?;
                (
                    format!("sqlite://{}", dir.path().join("relay.db").display()),
                    Some(dir),
                )
            }
            Db::Postgres => (PgCluster::shared().fresh_database()?, None),
        };
        let mut config = test_config(&url);
        tune(&mut config);
        Self::start_with(config, dir).await
    }

    pub async fn start_with(
        config: Config,
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<TestRelay> {
        let handle = relay::serve::start(config.clone()).await?;
        let store = Store::open(&config.database_url).await?;
        Ok(TestRelay {
            handle: Some(handle),
            url: config.database_url.clone(),
            store,
            config,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle
            .as_ref()
            .map(RelayHandle::sip_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    /// Stops the relay and starts a new one on the same database (a new port).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
        self.handle = Some(relay::serve::start(self.config.clone()).await?);
        Ok(())
    }

    pub async fn add_user(&self, name: &str, password: &str) -> anyhow::Result<()> {
        self.store
            .add_user(
                name,
                &digest::ha1(Algorithm::Md5, name, DOMAIN, password),
                &digest::ha1(Algorithm::Sha256, name, DOMAIN, password),
                DOMAIN,
            )
            .await?;
        Ok(())
    }

    /// Waits until `user` has `n` call records in a final state (`ended` or `failed`), then
    /// flushes the relay's record writer and fails unless there are exactly `n`: a test of one
    /// record per attempt sees a second one.
    pub async fn wait_cdrs(&self, user: &str, n: usize) -> anyhow::Result<Vec<Cdr>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let finished = |cdrs: &[Cdr]| {
            cdrs.iter()
                .filter(|c| c.state == CdrState::Ended || c.state == CdrState::Failed)
                .count()
        };
        loop {
            let cdrs = self.store.list_cdrs(Some(user), None).await?;
            if finished(&cdrs) >= n {
                if let Some(h) = &self.handle {
                    h.core.sessions.flush().await;
                }
                let cdrs = self.store.list_cdrs(Some(user), None).await?;
                if finished(&cdrs) != n {
                    bail!("expected exactly {n} finished records for {user}, have {cdrs:#?}");
                }
                return Ok(cdrs);
            }
            if Instant::now() > deadline {
                bail!("expected {n} finished records for {user}, have {cdrs:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
    }
}

/// A client-agent run in-process.
pub struct AgentRun {
    pub events: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<anyhow::Result<ExitCode>>,
}

impl std::fmt::Debug for AgentRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRun").finish_non_exhaustive()
    }
}

/// Starts `client-agent --relay ADDR --user USER --password PW --domain relay.test ARGS…`.
pub fn client(relay: SocketAddr, user: &str, password: &str, args: &[&str]) -> AgentRun {
    let relay = relay.to_string();
    let mut argv = vec![
        "client-agent",
        "--relay",
        &relay,
        "--user",
        user,
        "--password",
        password,
        "--domain",
        DOMAIN,
    ];
    argv.extend_from_slice(args);
    let cli = client_agent::cli::Cli::try_parse_from_args(&argv);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let cli = cli?;
        client_agent::agent::run_with(
            cli,
            Output {
                json: true,
                sink: Some(tx),
            },
        )
        .await
    });
    AgentRun { events: rx, task }
}

impl AgentRun {
    /// The next event within `secs` seconds, notes (what the agent is doing) skipped.
    pub async fn next(&mut self, secs: u64) -> anyhow::Result<Event> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = tokio::time::timeout(left, self.events.recv())
                .await
                .map_err(|_| anyhow!("no event within {secs} s"))?
                .ok_or_else(|| anyhow!("the agent ended without another event"))?;
            if !matches!(ev, Event::Note { .. }) {
                return Ok(ev);
            }
        }
    }

    /// Skips events until one matches.
    pub async fn until(
        &mut self,
        secs: u64,
        pred: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<Event> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            let ev = self.next(left).await?;
            if pred(&ev) {
                return Ok(ev);
            }
            if Instant::now() > deadline {
                bail!("no matching event within {secs} s");
            }
        }
    }

    /// Waits for the agent to finish; returns whether it exited with success.
    pub async fn finish(self) -> anyhow::Result<bool> {
        let code = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("agent did not finish")??;
        Ok(code? == ExitCode::SUCCESS)
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

/// A UDP socket for hand-made SIP messages.
pub struct RawSip {
    pub sock: UdpSocket,
    pub relay: SocketAddr,
}

impl std::fmt::Debug for RawSip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSip")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl RawSip {
    pub async fn new(relay: SocketAddr) -> anyhow::Result<RawSip> {
        Self::new_on(relay, "127.0.0.1:0").await
    }

    /// A socket bound to `local` (another loopback address stands for another host).
    pub async fn new_on(relay: SocketAddr, local: &str) -> anyhow::Result<RawSip> {
        Ok(RawSip {
            sock: UdpSocket::bind(local).await?,
            relay,
        })
    }

    pub fn local(&self) -> SocketAddr {
        self.sock.local_addr().expect("bound socket")
    }

    /// Replaces `$LOCAL` (our address) and `$RELAY` in a message template written with `\n`
    /// line ends, fixes line ends to CRLF, and sends it.
    pub async fn send(&self, template: &str) -> anyhow::Result<()> {
        let text = template
            .replace("$LOCAL", &self.local().to_string())
            .replace("$RELAY", &self.relay.to_string())
            .replace("\r\n", "\n")
            .replace('\n', "\r\n");
        self.sock.send_to(text.as_bytes(), self.relay).await?;
        Ok(())
    }

    pub async fn send_bytes(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.sock.send_to(bytes, self.relay).await?;
        Ok(())
    }

    /// The next response (requests and provisional responses are skipped when `final_only`).
    pub async fn response(&self, secs: u64, final_only: bool) -> anyhow::Result<Response> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (n, _) = tokio::time::timeout(left, self.sock.recv_from(&mut buf))
                .await
                .map_err(|_| anyhow!("no response within {secs} s"))??;
            if let Ok(Message::Response(r)) = message::parse(&buf[..n], &Limits::UDP) {
                if !final_only || r.status >= 200 {
                    return Ok(r);
                }
            }
        }
    }

    /// The status code of the next datagram, read from its status line only (for responses our
    /// own parser would refuse, such as one to an unknown method).
    pub async fn raw_status(&self, secs: u64) -> anyhow::Result<u16> {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(Duration::from_secs(secs), self.sock.recv_from(&mut buf))
            .await
            .map_err(|_| anyhow!("no datagram within {secs} s"))??;
        let text = String::from_utf8_lossy(&buf[..n]);
        let code = text
            .strip_prefix("SIP/2.0 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok());
        code.ok_or_else(|| anyhow!("not a response: {:?}", text.lines().next()))
    }

    /// Whether nothing arrives within `ms` milliseconds.
    pub async fn silent_for(&self, ms: u64) -> bool {
        let mut buf = vec![0u8; 65_536];
        tokio::time::timeout(Duration::from_millis(ms), self.sock.recv_from(&mut buf))
            .await
            .is_err()
    }
}

// ---- Helpers for the corpus tests (`tests/tests/conformance.rs`) ----

/// Panics seen in this process outside the threads test bodies run on.
///
/// tokio catches the unwind of a panicking task, so a panic in one of the relay's tasks leaves
/// the relay half-broken without failing anything; a panic hook is the only place it shows.
#[derive(Debug, Default)]
pub struct PanicLog {
    count: std::sync::atomic::AtomicUsize,
    test_threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    details: std::sync::Mutex<Vec<String>>,
}

impl PanicLog {
    /// Panics so far on threads that are not test threads: the relay's tasks (tokio workers),
    /// the store's worker threads, anything else the relay started.
    pub fn relay_panics(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Thread name, message and location of the first of those panics (at most 20).
    pub fn details(&self) -> Vec<String> {
        self.details
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The process-wide [`PanicLog`]; the first call installs its panic hook (which still runs the
/// previous hook, so messages print as usual). Every call registers the calling thread as a test
/// thread, whose own assertion failures are not counted: call it at the start of a test body.
pub fn panic_log() -> &'static PanicLog {
    static LOG: std::sync::OnceLock<PanicLog> = std::sync::OnceLock::new();
    static HOOK: std::sync::Once = std::sync::Once::new();
    let log = LOG.get_or_init(PanicLog::default);
    log.test_threads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(std::thread::current().id());
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let is_test = LOG.get().is_some_and(|log| {
                log.test_threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&thread.id())
            });
            if !is_test {
                if let Some(log) = LOG.get() {
                    log.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut details = log.details.lock().unwrap_or_else(|e| e.into_inner());
                    if details.len() < 20 {
                        details.push(format!("{}: {info}", thread.name().unwrap_or("<unnamed>")));
                    }
                }
            }
            previous(info);
        }));
    });
    log
}

/// `haystack` with every `from` replaced by `to` (byte-wise, for messages that need not be
/// UTF-8), and how many were replaced. An empty `from` replaces nothing.
pub fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(haystack.len());
    let mut n = 0;
    let mut rest = haystack;
    if from.is_empty() {
        return (haystack.to_vec(), 0);
    }
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
        n += 1;
    }
    out.extend_from_slice(rest);
    (out, n)
}

/// The status code of a response, read from its status line only (`None` for anything else).
pub fn status_code(message: &[u8]) -> Option<u16> {
    let code = message.strip_prefix(b"SIP/2.0 ")?.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

impl RawSip {
    /// The next datagram within `ms` milliseconds, whatever it holds.
    pub async fn recv_raw(&self, ms: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(Duration::from_millis(ms), self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        buf.truncate(n);
        Some(buf)
    }
}
