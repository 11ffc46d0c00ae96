//! Shared helpers: paths, cargo, ports, child processes, temporary directories, waiting.
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// The workspace root (the parent of this crate's directory).
pub(crate) fn project_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `<root>/target`.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                project_root().join(dir)
            }
        }
        _ => project_root().join("target"),
    }
}

/// A `cargo` command (the cargo that runs us, from `$CARGO`) in the workspace root.
pub(crate) fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(project_root());
    cmd
}

/// Builds packages with cargo; returns the directory of the binaries.
pub(crate) fn build(packages: &[&str], release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.arg("-p").arg(p);
    }
    let what = format!(
        "cargo build{} -p {}",
        if release { " --release" } else { "" },
        packages.join(" -p ")
    );
    run_status(&mut cmd, &what)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Runs a command with inherited standard streams; fails unless it exits 0.
pub(crate) fn run_status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({})", describe_status(status));
    }
    Ok(())
}

/// Runs a command, capturing its output; fails (showing standard error) unless it exits 0.
pub(crate) fn run_output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{what}: output is not UTF-8"))
}

/// `exit status 1`, `killed by signal 9`, ….
pub(crate) fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// A port of 127.0.0.1 that is free for both UDP and TCP right now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a UDP socket")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port of 127.0.0.1 free for both UDP and TCP")
}

/// Waits until a TCP connection to 127.0.0.1:port succeeds.
pub(crate) fn wait_tcp_listening(
    port: u16,
    timeout: Duration,
    child: &mut ChildGuard,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        child.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on TCP {addr} within {timeout:?}",
                child.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is stopped (by its PID) when the guard is dropped.
pub(crate) struct ChildGuard {
    pub(crate) name: String,
    pub(crate) child: Child,
    /// Signal sent first when stopping (`TERM` or `INT`); `KILL` follows after a grace time.
    pub(crate) stop_signal: &'static str,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts a command.
    pub(crate) fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            stop_signal: "TERM",
            exited: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub(crate) fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Fails if the process has already exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        match self.try_status() {
            None => Ok(()),
            Some(status) => bail!("{} exited early ({})", self.name, describe_status(status)),
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`; then stops it and fails.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "{} did not finish within {timeout:?}; stopped it",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process: its stop signal, then `KILL` after 3 s. Idempotent.
    pub(crate) fn stop(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .arg(format!("-{}", self.stop_signal))
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exited = Some(status);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fresh directory under the system's temporary directory, removed on drop unless kept.
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub(crate) fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    /// Keeps the directory (e.g. for its logs after a failure).
    pub(crate) fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep || std::env::var_os("XTASK_KEEP").is_some() {
            eprintln!("(kept {})", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One line of a child's output, or its end.
#[derive(Debug)]
pub(crate) enum Line {
    Text(String, String),
    Eof(String),
}

/// Reads `stream` line by line on a thread, sending each line tagged with `who`.
pub(crate) fn forward_lines(who: &str, stream: impl Read + Send + 'static, tx: mpsc::Sender<Line>) {
    let who = who.to_owned();
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.lines() {
            match line {
                Ok(line) => {
                    if tx.send(Line::Text(who.clone(), line)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Line::Eof(who));
    });
}

/// The last `n` lines of a text file (for showing logs after a failure).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether a program can be started (`PROGRAM ARG` runs at all).
pub(crate) fn have_program(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Parses `--name value` options; `known` lists the names that take a value.
pub(crate) fn parse_options(
    args: &[String],
    known: &[&str],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if !known.contains(&name.as_str()) {
            bail!("unknown option {arg:?} (known: {})", known.join(", "));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .with_context(|| format!("option {name} needs a value"))?
                .clone(),
        };
        out.push((name, value));
    }
    Ok(out)
}

/// Parses a number option.
pub(crate) fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> anyhow::Result<T> {
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("{name}: not a number: {value:?}"))
}

/// CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces):
    // index 0 is field 3 (state), so utime (field 14) is 11 and stime (field 15) is 12.
    let rest = stat.rsplit_once(')').context("bad /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / clock_ticks()?)
}

/// Peak resident set size of a process in KiB (VmHWM from /proc/PID/status).
pub(crate) fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/PID/status")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM line")?
        .parse()?;
    Ok(kib)
}

/// `getconf CLK_TCK` (clock ticks per second of /proc times).
fn clock_ticks() -> anyhow::Result<f64> {
    let out = run_output(Command::new("getconf").arg("CLK_TCK"), "getconf CLK_TCK")?;
    parse_num("CLK_TCK", out.trim())
}

/// Waits until the text file `path` (a child's output) holds a line containing each of
/// `needles`; fails early when a line contains `fatal` or the child exits.
pub(crate) fn wait_file_lines(
    path: &Path,
    needles: &[String],
    fatal: &str,
    timeout: Duration,
    child: &mut ChildGuard,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(fatal)) {
            bail!("{}: {line}", child.name);
        }
        if needles.iter().all(|n| text.lines().any(|l| l.contains(n))) {
            return Ok(());
        }
        child.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} did not print {needles:?} within {timeout:?}",
                child.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
