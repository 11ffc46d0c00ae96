//! A `relay serve` process on a free loopback port with a SQLite database in a directory.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::json::{self, Value};
use crate::util::{self, ChildGuard};

/// A running relay.
pub(crate) struct Relay {
    pub(crate) bin: PathBuf,
    pub(crate) port: u16,
    pub(crate) domain: String,
    pub(crate) database_url: String,
    pub(crate) log: PathBuf,
    pub(crate) guard: ChildGuard,
}

impl Relay {
    /// Starts `relay serve` on 127.0.0.1:(free port), database `sqlite://DIR/relay.db`,
    /// log (standard error) in `DIR/relay.log`; waits until it accepts TCP connections.
    pub(crate) fn start(
        bin_dir: &Path,
        dir: &Path,
        domain: &str,
        log_filter: &str,
    ) -> anyhow::Result<Relay> {
        Self::start_with_env(bin_dir, dir, domain, log_filter, &[])
    }

    /// [`Relay::start`] with settings in `RELAY_*` variables (`RELAY_TRUSTED`, …).
    pub(crate) fn start_with_env(
        bin_dir: &Path,
        dir: &Path,
        domain: &str,
        log_filter: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Relay> {
        let database_url = format!("sqlite://{}", dir.join("relay.db").display());
        Self::start_on(
            bin_dir,
            dir,
            "relay",
            &database_url,
            domain,
            log_filter,
            env,
        )
    }

    /// A relay named `name` (its log `DIR/NAME.log`) on the database `database_url`, which
    /// another relay may share.
    pub(crate) fn start_on(
        bin_dir: &Path,
        dir: &Path,
        name: &str,
        database_url: &str,
        domain: &str,
        log_filter: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Relay> {
        let bin = bin_dir.join("relay");
        if !bin.exists() {
            bail!("{} does not exist (build failed?)", bin.display());
        }
        let port = util::free_port()?;
        let database_url = database_url.to_string();
        let log = dir.join(format!("{name}.log"));
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--sip")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--domain")
            .arg(domain)
            .arg("--database-url")
            .arg(&database_url)
            .arg("--log")
            .arg(log_filter)
            .env_remove("RELAY_CONFIG")
            .env_remove("RELAY_TRUSTED")
            .envs(env.iter().copied())
            // Plain text in the log file.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut guard = ChildGuard::spawn("relay serve", &mut cmd)?;
        // SIGINT: the relay's graceful shutdown (as Ctrl-C), then KILL after a grace time.
        guard.stop_signal = "INT";
        let relay = Relay {
            bin,
            port,
            domain: domain.to_owned(),
            database_url,
            log,
            guard,
        };
        let mut relay = relay;
        if let Err(e) = util::wait_tcp_listening(port, Duration::from_secs(20), &mut relay.guard) {
            bail!(
                "{e:#}\n--- relay log (last lines) ---\n{}",
                util::tail(&relay.log, 30)
            );
        }
        Ok(relay)
    }

    /// `host:port` of the relay's SIP socket.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// An admin command (`relay … --database-url … --domain …`).
    pub(crate) fn admin(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--database-url")
            .arg(&self.database_url)
            .arg("--domain")
            .arg(&self.domain)
            .env_remove("RELAY_CONFIG")
            .env_remove("RELAY_PASSWORD")
            .env_remove("RELAY_PASSWORD_FILE");
        cmd
    }

    /// `relay user add NAME`, the password in `RELAY_PASSWORD`.
    pub(crate) fn add_user(&self, name: &str, password: &str) -> anyhow::Result<()> {
        let mut cmd = self.admin();
        cmd.args(["user", "add", name])
            .env("RELAY_PASSWORD", password);
        util::run_output(&mut cmd, &format!("relay user add {name}"))?;
        Ok(())
    }

    /// `relay cdr list --format json`, parsed.
    pub(crate) fn cdrs(&self) -> anyhow::Result<Vec<Value>> {
        let mut cmd = self.admin();
        cmd.args(["cdr", "list", "--format", "json"]);
        let out = util::run_output(&mut cmd, "relay cdr list --format json")?;
        match json::parse(&out).context("relay cdr list --format json")? {
            Value::Array(items) => Ok(items),
            _ => bail!("relay cdr list --format json did not print an array"),
        }
    }

    /// Waits until the store holds at least `expected` records, or until the count stops
    /// growing for 3 s (at most `timeout`); returns the records.
    pub(crate) fn wait_cdrs(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let start = std::time::Instant::now();
        let mut last_len = usize::MAX;
        let mut last_change = std::time::Instant::now();
        loop {
            let cdrs = self.cdrs()?;
            if cdrs.len() >= expected && cdrs.iter().all(is_final) {
                return Ok(cdrs);
            }
            if cdrs.len() != last_len {
                last_len = cdrs.len();
                last_change = std::time::Instant::now();
            }
            if start.elapsed() > timeout || last_change.elapsed() > Duration::from_secs(3) {
                return Ok(cdrs);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// CPU seconds (user + system) the relay has used so far, from /proc/PID/stat.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        util::cpu_seconds(self.guard.pid())
    }

    /// Peak resident set size in KiB (VmHWM from /proc/PID/status).
    pub(crate) fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        util::peak_rss_kib(self.guard.pid())
    }
}

/// Whether a record is in a final state (`ended` or `failed`).
pub(crate) fn is_final(cdr: &Value) -> bool {
    matches!(cdr.text("state").as_deref(), Some("ended" | "failed"))
}

/// Records in the `ended` state, and the number of distinct Call-IDs among all records
/// (equal to their number when no call has two).
pub(crate) fn ended_and_distinct(cdrs: &[Value]) -> (usize, usize) {
    let ended = cdrs
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .count();
    let mut ids: Vec<String> = cdrs
        .iter()
        .map(|c| c.text("call_id").unwrap_or_default())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    (ended, ids.len())
}

/// Counts of records by state.
pub(crate) fn count_states(cdrs: &[Value]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for c in cdrs {
        let state = c.text("state").unwrap_or_else(|| "?".into());
        match counts.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => counts.push((state, 1)),
        }
    }
    counts
}

/// `ended: 200, failed: 1`.
pub(crate) fn describe_states(cdrs: &[Value]) -> String {
    let counts = count_states(cdrs);
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
