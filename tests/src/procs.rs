//! The three programs as separate processes, the way users run them: `relay` (serve and its
//! admin commands), `app-server-agent run`, `client-agent … open`. Each is started from the
//! workspace's build directory (`cargo xtask test` builds them first), on loopback, and killed by
//! PID when its handle drops; nothing outlives the test.

use crate::harness::{DOMAIN, Db};
use crate::pg::PgCluster;
use anyhow::{Context as _, anyhow, bail};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where the built programs are: beside the test executable's `deps/` directory.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .ok_or_else(|| anyhow!("cannot find the build directory from {}", exe.display()))?;
    // Beside the program itself (a binary of this crate), or beside the test's deps directory.
    let beside = exe.parent().map(|d| d.join(name));
    let path = match beside {
        Some(p) if p.exists() => p,
        _ => dir.join(name),
    };
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build -p relay -p app-server-agent -p client-agent` \
             (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// Lines a child prints, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn spawn(
        reader: impl std::io::Read + Send + 'static,
        tx: Option<mpsc::UnboundedSender<String>>,
    ) -> Lines {
        let lines = Lines::default();
        let store = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = store.0.lock() {
                    v.push(line.clone());
                }
                if let Some(tx) = &tx {
                    let _ = tx.send(line);
                }
            }
        });
        lines
    }

    pub fn text(&self) -> String {
        self.0.lock().map(|v| v.join("\n")).unwrap_or_default()
    }

    /// Waits for a line containing `needle`; returns it.
    pub async fn wait_for(&self, needle: &str, secs: u64) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = self
                .0
                .lock()
                .ok()
                .and_then(|v| v.iter().find(|l| l.contains(needle)).cloned())
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "no line with {needle:?} within {secs} s; got:\n{}",
                    self.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits up to `secs` for `child` to exit; its status code. What `output` gives then goes into
/// the error.
async fn exit_code(
    child: &mut Child,
    secs: u64,
    output: impl Fn() -> String,
) -> anyhow::Result<Option<i32>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code());
        }
        if Instant::now() > deadline {
            bail!("still running after {secs} s; output:\n{}", output());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `kill -NAME PID`.
pub fn send_signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

pub(crate) fn terminate(child: &mut Child) {
    // SIGTERM first (programs leave cleanly: agents un-register), then SIGKILL.
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = child.id().to_string();
    let _ = Command::new("kill")
        .args(["-TERM", &pid])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `relay serve` process with its own config file and database.
pub struct RelayProc {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The gRPC billing endpoint, when the configuration serves it.
    /// The metrics and health endpoint (`http = "127.0.0.1:0"` in its settings).
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub db_url: String,
    config: PathBuf,
    pub log: Lines,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for RelayProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayProc")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A field of a log line: `NAME=VALUE` in a text line, `fields.NAME` in a JSON one.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v["fields"][name].as_str().map(str::to_owned);
    }
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(str::to_owned)
}

impl RelayProc {
    /// Starts a relay on 127.0.0.1 (a free port) over a fresh SQLite file or PostgreSQL
    /// database, with short SIP timers and `extra` TOML settings.
    pub async fn start(db: Db, extra: &str) -> anyhow::Result<RelayProc> {
        let dir = tempfile::tempdir()?;
        let db_url = match db {
            Db::Sqlite => format!("sqlite://{}", dir.path().join("relay.db").display()),
            Db::Postgres => PgCluster::shared().fresh_database()?,
        };
        Self::start_in(dir, db_url, extra).await
    }

    /// A second relay on the database of another (`db_url`), with `extra` TOML settings.
    pub async fn start_on(db_url: &str, extra: &str) -> anyhow::Result<RelayProc> {
        Self::start_in(tempfile::tempdir()?, db_url.to_string(), extra).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        db_url: String,
        extra: &str,
    ) -> anyhow::Result<RelayProc> {
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "sip = \"127.0.0.1:0\"\ndomain = \"{DOMAIN}\"\ndatabase_url = \"{db_url}\"\n\
                 timer_t1_ms = 100\nlog = \"info\"\n{extra}\n"
            ),
        )?;
        let mut relay = RelayProc {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc: None,
            http: None,
            db_url,
            config,
            log: Lines::default(),
            _dir: dir,
        };
        relay.spawn(None).await?;
        Ok(relay)
    }

    async fn spawn(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("relay")?);
        cmd.arg("--config").arg(&self.config);
        if let Some(p) = port {
            cmd.arg("--sip").arg(format!("127.0.0.1:{p}"));
        }
        let mut child = cmd
            .arg("serve")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting relay serve")?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        self.log = Lines::spawn(stderr, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            if let Ok(line) = self.log.wait_for("Relay serving", 0).await {
                break line;
            }
            if let Some(status) = child.try_wait()? {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!("relay serve exited ({status}):\n{}", self.log.text());
            }
            if Instant::now() > deadline {
                terminate(&mut child);
                bail!(
                    "relay serve did not start within 20 s:\n{}",
                    self.log.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.child = Some(child);
        let addr = log_field(&line, "sip").ok_or_else(|| anyhow!("no sip= in {line:?}"))?;
        self.addr = addr
            .parse()
            .with_context(|| format!("bad address in {line:?}"))?;
        self.http = log_field(&line, "http")
            .map(|a| a.parse())
            .transpose()
            .with_context(|| format!("bad HTTP address in {line:?}"))?;
        self.grpc = log_field(&line, "grpc")
            .map(|a| a.parse())
            .transpose()
            .with_context(|| format!("bad gRPC address in {line:?}"))?;
        Ok(())
    }

    /// `relay --config F ARGS…`: its standard output, or an error with its standard error.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin("relay")?)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "relay {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds a user (password = name + "-pw").
    pub fn add_user(&self, name: &str) -> anyhow::Result<()> {
        self.admin(&["user", "add", name, "--password", &format!("{name}-pw")])
            .map(|_| ())
    }

    /// Sends a signal (`"TERM"`, `"INT"`) without waiting for anything.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let child = self.child.as_ref().ok_or_else(|| anyhow!("not running"))?;
        send_signal(child.id(), name)
    }

    /// Waits for the process to exit; its status code.
    pub async fn exit_code(&mut self, secs: u64) -> anyhow::Result<Option<i32>> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        let lines = &self.log;
        exit_code(child, secs, || lines.text()).await
    }

    /// `kill -9`: the relay dies without any chance to write.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a clean stop), waiting for the relay to exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// The relay's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Adds TOML settings to its configuration file (they take effect at its next start).
    pub fn add_config(&self, toml: &str) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)?;
        writeln!(f, "{toml}")?;
        Ok(())
    }

    /// Starts the relay again on the same port and database.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
        let port = self.addr.port();
        self.spawn(Some(port)).await
    }

    /// Records as `relay cdr list --format json` prints them.
    pub fn cdrs(&self, user: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.admin(&["cdr", "list", "--user", user, "--format", "json"])?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        Ok(v)
    }

    /// Waits until `user` has `n` records in a final state; more than `n` is an error.
    pub async fn wait_cdrs(
        &self,
        user: &str,
        n: usize,
        secs: u64,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let cdrs = self.cdrs(user)?;
            let done = cdrs
                .iter()
                .filter(|c| matches!(c["state"].as_str(), Some("ended" | "failed")))
                .count();
            if done > n {
                bail!("expected exactly {n} finished records for {user}, have {cdrs:#?}");
            }
            if done == n {
                return Ok(cdrs);
            }
            if Instant::now() > deadline {
                bail!(
                    "expected {n} finished records for {user}, have {cdrs:#?}\nrelay log:\n{}",
                    self.log.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

/// An `app-server-agent run` process.
pub struct AppAgent {
    child: Option<Child>,
    /// Holds the charges file when the caller named none.
    _dir: Option<tempfile::TempDir>,
    pub out: Lines,
    pub err: Lines,
    pub http: Option<SocketAddr>,
    /// Its SIP address, once it said where it serves.
    pub sip: Option<SocketAddr>,
}

impl std::fmt::Debug for AppAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppAgent")
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl AppAgent {
    /// Starts `app-server-agent run --relay ADDR --account A --password A-pw --sip 127.0.0.1:0
    /// --http 127.0.0.1:PORT ARGS…` and waits until it says its services are registered.
    pub async fn start(
        relay: SocketAddr,
        account: &str,
        args: &[&str],
    ) -> anyhow::Result<AppAgent> {
        let mut agent = Self::spawn(relay, account, args)?;
        let line = agent
            .out
            .wait_for("serving SIP on", 15)
            .await
            .with_context(|| format!("agent stderr:\n{}", agent.err.text()))?;
        agent.sip = line
            .strip_prefix("serving SIP on ")
            .and_then(|r| r.split(',').next())
            .and_then(|a| a.trim().parse().ok());
        Ok(agent)
    }

    /// Starts it without waiting for anything.
    pub fn spawn(relay: SocketAddr, account: &str, args: &[&str]) -> anyhow::Result<AppAgent> {
        let http = free_port()?;
        let relay = relay.to_string();
        let password = format!("{account}-pw");
        let http_s = http.to_string();
        let mut argv = vec![
            "run",
            "--relay",
            &relay,
            "--domain",
            DOMAIN,
            "--account",
            account,
            "--password",
            &password,
            "--sip",
            "127.0.0.1:0",
            "--http",
            &http_s,
        ];
        argv.extend_from_slice(args);
        // Charges wait in a file of the test's own unless it names one.
        let mut dir = None;
        let charges;
        if !args.contains(&"--charges-file") {
            let d = tempfile::tempdir()?;
            charges = d.path().join("charges.json").display().to_string();
            argv.extend_from_slice(&["--charges-file", &charges]);
            dir = Some(d);
        }
        Self::spawn_in(&argv, dir, Some(http))
    }

    /// Starts `app-server-agent ARGS…` with exactly these arguments, in a directory of its own
    /// (where its charges file goes), without waiting for anything.
    pub fn spawn_bare(args: &[&str]) -> anyhow::Result<AppAgent> {
        Self::spawn_in(args, Some(tempfile::tempdir()?), None)
    }

    /// `app-server-agent ARGV…`, in `dir` when given (kept as long as the agent).
    fn spawn_in(
        argv: &[&str],
        dir: Option<tempfile::TempDir>,
        http: Option<SocketAddr>,
    ) -> anyhow::Result<AppAgent> {
        let mut cmd = Command::new(bin("app-server-agent")?);
        if let Some(d) = &dir {
            cmd.current_dir(d.path());
        }
        let mut child = cmd
            .args(argv)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting app-server-agent")?;
        let out = Lines::spawn(
            child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?,
            None,
        );
        let err = Lines::spawn(
            child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?,
            None,
        );
        Ok(AppAgent {
            child: Some(child),
            _dir: dir,
            out,
            err,
            http,
            sip: None,
        })
    }

    /// Waits for the process to exit; its status code.
    pub async fn exit_code(&mut self, secs: u64) -> anyhow::Result<Option<i32>> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        exit_code(child, secs, String::new).await
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// GETs from the agent's HTTP API; (status, JSON body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let addr = self.http.ok_or_else(|| anyhow!("no HTTP API"))?;
        http_request(addr, "GET", path, "", "").await
    }

    /// POSTs JSON to the agent's HTTP API; (status, JSON body).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let addr = self.http.ok_or_else(|| anyhow!("no HTTP API"))?;
        http_post(addr, path, "application/json", &body.to_string()).await
    }

    /// POSTs a form to the agent's HTTP API; (status, JSON body).
    pub async fn post(&self, path: &str, form: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let addr = self.http.ok_or_else(|| anyhow!("no HTTP API"))?;
        http_post(addr, path, "application/x-www-form-urlencoded", form).await
    }
}

impl Drop for AppAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

/// A `client-agent --json … open …` process: JSON events from its standard output, commands
/// (`close`, `close N`, `list`) to its standard input.
pub struct ClientProc {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<String>,
    pub out: Lines,
    pub err: Lines,
}

impl std::fmt::Debug for ClientProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientProc").finish_non_exhaustive()
    }
}

impl ClientProc {
    /// `client-agent --relay ADDR --user U --password PW --domain relay.test --json ARGS…`.
    pub fn start(
        relay: SocketAddr,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> anyhow::Result<ClientProc> {
        let relay = relay.to_string();
        let mut argv = vec![
            "--relay",
            &relay,
            "--user",
            user,
            "--password",
            password,
            "--domain",
            DOMAIN,
            "--json",
        ];
        argv.extend_from_slice(args);
        Self::spawn_bare(&argv)
    }

    /// `client-agent ARGS…` with exactly these arguments.
    pub fn spawn_bare(args: &[&str]) -> anyhow::Result<ClientProc> {
        let mut child = Command::new(bin("client-agent")?)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting client-agent")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let out = Lines::spawn(
            child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?,
            Some(tx),
        );
        let err = Lines::spawn(
            child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?,
            None,
        );
        Ok(ClientProc {
            stdin: child.stdin.take(),
            child: Some(child),
            events: rx,
            out,
            err,
        })
    }

    /// The next JSON event within `secs` seconds, notes (what the agent is doing) skipped.
    pub async fn next(&mut self, secs: u64) -> anyhow::Result<serde_json::Value> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(secs), self.events.recv())
                .await
                .map_err(|_| anyhow!("no event within {secs} s; stderr:\n{}", self.err.text()))?
                .ok_or_else(|| anyhow!("client-agent ended; stderr:\n{}", self.err.text()))?;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["event"] != "note" {
                    return Ok(v);
                }
            }
        }
    }

    /// The next event named `name`, skipping others.
    pub async fn next_named(&mut self, name: &str, secs: u64) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            let ev = self.next(left).await?;
            if ev["event"] == name {
                return Ok(ev);
            }
            if Instant::now() > deadline {
                bail!("no {name:?} event within {secs} s");
            }
        }
    }

    /// Writes one line to its standard input.
    pub fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("stdin closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the process to exit; its status code.
    pub async fn exit_code(&mut self, secs: u64) -> anyhow::Result<Option<i32>> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        let lines = &self.err;
        exit_code(child, secs, || lines.text()).await
    }

    /// Sends a signal (`"INT"`, `"TERM"`, …) without waiting for anything.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let child = self.child.as_ref().ok_or_else(|| anyhow!("not running"))?;
        send_signal(child.id(), name)
    }

    /// `kill -9`: the client vanishes without a BYE.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A minimal HTTP/1.1 POST (the tests' stand-in for a vendor's web service calling its agent).
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    http_request(addr, "POST", path, content_type, body).await
}

async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))??;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("HTTP answer from {addr} timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP answer {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let json = serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
