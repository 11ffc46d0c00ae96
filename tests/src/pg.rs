//! Throwaway PostgreSQL clusters for tests.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory and starts `postgres`
//! on a free port of 127.0.0.1 (trust authentication, user `postgres`, Unix socket inside the
//! temporary directory, durability switched off for speed). The binaries are taken from
//! `$SIP_RELAY_PG_BIN`, else `/usr/lib/postgresql/15/bin`.
//!
//! **Root.** PostgreSQL refuses to run as root. When the test process runs as root (`id -u`
//! is 0), the directory is `chown`ed to the `postgres` system user and `initdb`/`postgres`
//! run under `setpriv` as that user.
//!
//! **Nothing left running.** `postgres` is started by a small supervisor shell that watches
//! the test process (`kill -0 PID` once a second). When the test process is gone, or when
//! [`PgCluster`] is dropped, the supervisor stops `postgres` (SIGINT, fast shutdown), waits
//! for it and deletes the temporary directory. So the cluster of [`PgCluster::shared`], a
//! static that is never dropped, ends at most about a second after the test binary exits.
//!
//! **Sharing.** [`PgCluster::shared`] starts one cluster per test binary; each test takes its
//! own database from [`PgCluster::fresh_database`], so tests can run in parallel.
//!
//! **Skipping.** With `SIP_RELAY_SKIP_PG=1` the PostgreSQL tests are skipped (they print why,
//! and `cargo xtask test` counts them as skipped); in CI (`CI` set) that variable fails them. Without it, a cluster that cannot start (e.g. the binaries are missing) makes
//! those tests fail with the reason, so a machine without PostgreSQL is never mistaken for a
//! green run. Use [`PgCluster::shared_or_skip`] in tests.
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Environment variable that skips the PostgreSQL tests when set to `1`.
pub const SKIP_ENV: &str = "SIP_RELAY_SKIP_PG";
/// Environment variable naming a file where each skipped test writes its name (set by
/// `cargo xtask test`).
pub const SKIP_LOG_ENV: &str = "SIP_RELAY_SKIP_LOG";
/// Environment variable naming the directory of the PostgreSQL binaries.
pub const BIN_ENV: &str = "SIP_RELAY_PG_BIN";
/// Where Debian's PostgreSQL 15 puts its binaries.
pub const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct PgCluster {
    /// URL of the cluster's `postgres` database, e.g. `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    supervisor: Child,
    next_db: AtomicU32,
}

static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("no free TCP port")?;
    Ok(listener.local_addr()?.port())
}

fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl PgCluster {
    /// The cluster shared by every test of this test binary, started on first use.
    ///
    /// # Panics
    /// When the cluster cannot start; the message says why and mentions `SIP_RELAY_SKIP_PG`.
    pub fn shared() -> &'static PgCluster {
        match SHARED.get_or_init(|| PgCluster::start().map_err(|e| format!("{e:#}"))) {
            Ok(cluster) => cluster,
            Err(e) => panic!(
                "cannot start a PostgreSQL test cluster: {e}\n\
                 (install PostgreSQL 15, point {BIN_ENV} at its bin directory, \
                 or set {SKIP_ENV}=1 to skip the PostgreSQL tests)"
            ),
        }
    }

    /// [`PgCluster::shared`], or `None` when `SIP_RELAY_SKIP_PG=1`: the test is then skipped,
    /// said on stderr and written to the file `SIP_RELAY_SKIP_LOG` names (`cargo xtask test`
    /// counts those as skipped, not passed).
    ///
    /// # Panics
    /// When `SIP_RELAY_SKIP_PG=1` is set in CI (`CI` set): there the PostgreSQL tests must run.
    pub fn shared_or_skip() -> Option<&'static PgCluster> {
        if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
            assert!(
                std::env::var_os("CI").is_none(),
                "{SKIP_ENV}=1 is set in CI (CI is set): the PostgreSQL tests must run there"
            );
            let test = std::thread::current()
                .name()
                .unwrap_or("a PostgreSQL test")
                .to_owned();
            eprintln!("skipping {test}: {SKIP_ENV}=1");
            if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
                use std::io::Write as _;
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                {
                    let _ = writeln!(f, "{test}");
                }
            }
            return None;
        }
        Some(PgCluster::shared())
    }

    /// Starts a new cluster (see the module documentation).
    pub fn start() -> anyhow::Result<PgCluster> {
        let bin = std::env::var_os(BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN));
        for tool in ["initdb", "postgres", "createdb"] {
            if !bin.join(tool).is_file() {
                bail!(
                    "PostgreSQL binary {} not found (set {BIN_ENV} to the directory holding initdb and postgres)",
                    bin.join(tool).display()
                );
            }
        }
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("sip-relay-pg-")
            .tempdir()
            .context("cannot create a temporary directory")?
            .keep();
        match Self::start_in(&bin, &dir, root) {
            Ok(cluster) => Ok(cluster),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn start_in(bin: &Path, dir: &Path, root: bool) -> anyhow::Result<PgCluster> {
        let data = dir.join("data");
        let sock = dir.join("sock");
        std::fs::create_dir(&sock).context("cannot create the socket directory")?;
        // Run a PostgreSQL binary as the postgres user when we are root.
        let as_pg = |tool: &str| -> Command {
            if root {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(bin.join(tool));
                c
            } else {
                Command::new(bin.join(tool))
            }
        };
        if root {
            run_checked(
                Command::new("chown").args(["-R", "postgres:"]).arg(dir),
                "chown of the cluster directory to postgres",
            )?;
        }
        run_checked(
            as_pg("initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ])
                .env("TZ", "UTC"),
            "initdb",
        )?;

        // The port may be taken between choosing and binding it: retry a few times.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::launch(bin, dir, &data, &sock, port, root) {
                Ok(supervisor) => {
                    return Ok(PgCluster {
                        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                        port,
                        bin: bin.to_path_buf(),
                        dir: dir.to_path_buf(),
                        supervisor,
                        next_db: AtomicU32::new(0),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }

    /// Starts the supervisor shell and waits until postgres accepts connections.
    fn launch(
        bin: &Path,
        dir: &Path,
        data: &Path,
        sock: &Path,
        port: u16,
        root: bool,
    ) -> anyhow::Result<Child> {
        let postgres = sh_quote(path_str(&bin.join("postgres"))?);
        let run_as = if root {
            "setpriv --reuid=postgres --regid=postgres --init-groups -- "
        } else {
            ""
        };
        let log = dir.join("postgres.log");
        let pid_file = dir.join("postgres.pid");
        let _ = std::fs::remove_file(&pid_file);
        let script = format!(
            "{run_as}{postgres} -D {data} -p {port} -k {sock} \
               -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
               -c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB \
               >{log} 2>&1 &\n\
             pid=$!\n\
             echo $pid >{pid_file}\n\
             while kill -0 {watch} 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 1; done\n\
             kill -INT $pid 2>/dev/null\n\
             wait $pid\n\
             rm -rf {dir}\n",
            data = sh_quote(path_str(data)?),
            sock = sh_quote(path_str(sock)?),
            log = sh_quote(path_str(&log)?),
            pid_file = sh_quote(path_str(&pid_file)?),
            dir = sh_quote(path_str(dir)?),
            watch = std::process::id(),
        );
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the postgres supervisor shell")?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = supervisor.try_wait()? {
                bail!(
                    "postgres exited ({status}) on port {port}: {}",
                    read_log(&log)
                );
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
                && Command::new(bin.join("pg_isready"))
                    .args([
                        "-q",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                    ])
                    .status()
                    .is_ok_and(|s| s.success())
            {
                return Ok(supervisor);
            }
            if Instant::now() > deadline {
                let _ = stop_postgres(&pid_file);
                let _ = supervisor.wait();
                bail!(
                    "postgres on port {port} not ready after 60 s: {}",
                    read_log(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates an empty database and returns its URL.
    pub fn fresh_database(&self) -> anyhow::Result<String> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{}_{n}", std::process::id());
        run_checked(
            Command::new(self.bin.join("createdb"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .arg(&name),
            "createdb",
        )?;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.port
        ))
    }

    /// The cluster's directory (data, socket, log); deleted when the cluster stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_log(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    if text.is_empty() {
        "(no log output)".to_owned()
    } else {
        text
    }
}

/// Sends SIGINT (fast shutdown) to the postgres whose PID the supervisor wrote down.
fn stop_postgres(pid_file: &Path) -> anyhow::Result<()> {
    let pid = std::fs::read_to_string(pid_file)?;
    let pid = pid.trim();
    if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
        Command::new("kill")
            .args(["-INT", pid])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
    }
    Ok(())
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // The supervisor notices postgres has gone, waits for it and removes the directory.
        let _ = stop_postgres(&self.dir.join("postgres.pid"));
        let _ = self.supervisor.wait();
    }
}
