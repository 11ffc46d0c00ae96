//! # xtask: project tasks for sip-relay
//!
//! Run with `cargo xtask TASK` (an alias in `.cargo/config.toml`):
//!
//! * `cargo xtask demo` — build the three programs, start a relay on loopback with a temporary
//!   SQLite database, add a user, two services with tariffs and their vendors; each vendor
//!   runs a web page (here, on a thread) and an `app-server-agent`; alice opens a session
//!   with `client-agent`, her URL is visited and verified, she closes it and is charged.
//! * `cargo xtask test [ARGS…]` — the whole test suite (`cargo test --workspace --no-fail-fast ARGS…`).
//! * `cargo xtask interop [--calls N] [--services N] [--rate R] [--transport udp|tcp|both]` —
//!   SIPp calls through the release relay (digest auth, record-route), then SIPp service
//!   sessions with an `app-server-agent`, checking every call and session succeeds and has
//!   exactly one record (sessions: with the right charge). Needs `sipp` (Debian: `sip-tester`).
//! * `cargo xtask bench [--mode calls|services|all]` — SIPp at rising rates through the
//!   release relay, calls and service sessions; CPU time per 1,000 and peak memory. A
//!   benchmark: it reports, it does not assert. `--soak`: calls at a steady rate for minutes,
//!   runs in a row: failures, retransmissions, records, set-up and BYE tails, memory over time.
//! * `cargo xtask tidy` — the Architecture Invariants of ARCHITECTURE.md that the source text
//!   shows (no import circles; sqlx, rsip, tonic, hyper, sockets, the wall clock only where
//!   allowed); a CI step.
//! * `cargo xtask topology` — `docker-compose.yml`'s services as local processes on loopback
//!   (the tests crate's `topology`): the client's sessions through them, the records checked.
//! * `cargo xtask docs` — writes `docs/configuration.md` and `docs/man/*.1` from the code
//!   (the tests crate's `gen-docs`); the test `docs_are_current` fails when they are stale.
//! * `cargo xtask fuzz [--minutes N] [--target T]` — the cargo-fuzz targets (nightly), each
//!   for N minutes; inputs that crash or hang go to `fuzz/regressions/`, replayed by the tests.
//!
//! Only the standard library and `anyhow`: every process is started with `std::process`,
//! binds only 127.0.0.1, and is stopped by its PID when the task ends (also on failure).
use std::process::ExitCode;

mod against;
mod appagent;
mod bench;
mod charges;
mod demo;
mod fuzz;
mod http;
mod interop;
mod json;
mod linphone;
mod relay;
mod sipp;
mod soak;
mod softphone;
mod tidy;
mod util;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  demo                 build the programs, run a relay on loopback, two vendors with a web
                       page and an app-server-agent each; alice opens a session, her URL is
                       verified, she closes it and is charged; records and statement
  test [ARGS...]       the whole test suite: cargo test --workspace --no-fail-fast ARGS...
  interop [options]    SIPp calls and service sessions, then baresip calls and a service
                       session, through the release relay (needs sipp and baresip,
                       Debian: sip-tester baresip-core)
      --calls N            calls per transport (default 200)
      --services N         service sessions, over the first transport (default 50; 0: none)
      --rate R             calls (and sessions) per second (default 50)
      --transport T        udp, tcp or both (default both)
      --pause MS           call duration, ms between ACK and BYE (default 500)
      --relay-log FILTER   relay log filter (default info); the log is kept on failure
      --softphone yes|no   also drive baresip (Debian: baresip-core): calls over UDP and
                           TCP, a service session (default yes)
  bench [options]      SIPp at rising rates through the release relay, then calls under a flood
      --mode M             calls, services, flood or all (default all: calls, services, flood)
      --rates A,B,...      rates to try (default calls 200,500,1000,1500,2000,2500,3000,3500,
                           4000,5000; services 100,200,500,1000,1500,2000,2500,3000)
      --step-secs S        seconds of new calls or sessions per step (default 10)
      --pause MS           call or session duration (default 1000)
      --transport T        udp or tcp (default udp)
      --cpu-rates A,B      fixed rates for CPU/memory figures (default calls 1000,2000;
                           services 500,1000; \"\" for none)
      --flood-rate R       calls/s from 127.0.0.1 while 127.0.0.2 floods (default 50)
      --flood-secs S       how long those calls are placed (default 20)
  bench --soak [options]
                       plain calls at a steady rate for minutes, runs in a row, each on a
                       fresh relay: failures, retransmissions, records, set-up and BYE times
                       (p50/p99/p99.9/max), relay memory every 10 s
      --rate R             calls per second (default 1000)
      --secs S             seconds of new calls per run (default 180)
      --pause MS           call duration (default 1000)
      --runs N             runs (default 2)
      --transport T        udp or tcp (default udp)
      --relay-log FILTER   the relay's log filter (default warn; relay::tables=debug adds
                           its table sizes every 10 s)
  bench --charges [options]
                       application charges over gRPC on SQLite and PostgreSQL: charges/s
                       acknowledged durably per batch size, p50/p99/max answer time, relay
                       CPU per 1,000 charges; the ledger checked to hold each once
      --store S            sqlite or postgres (default both)
      --charges N          charges per run (default 100000)
      --batch A,B,...      charges per call, one run each (default 1,100,1000)
      --streams N          concurrent callers (default 16)
  bench --against kamailio [options]
                       the relay and Kamailio 5.6 (../shared/bench/kamailio-anchor.cfg) doing
                       the same job, alternating in one run: CPU per 1,000 calls, failures,
                       records per call, set-up p50/p99, memory, and the ratio (needs
                       kamailio, kamailio-sqlite-modules, sqlite3, python3)
      --rate R             calls per second (default 2000)
      --calls N            calls per side-run (default 20000)
      --pause MS           call duration (default 1000)
      --rounds N           Kamailio-relay pairs (default 2)
      --users N            callers, taken in turn (default 100)
      --warmup S           seconds of calls at the rate before each side-run's measured
                           calls, not counted (default 3, as the anchor's figures; 0: none)
  fuzz [options]       the cargo-fuzz targets (message parser, digest headers, service
                       bodies, the relay's handling of one datagram); needs cargo-fuzz and
                       a nightly toolchain; findings go to fuzz/regressions/
      --minutes N          minutes per target (default 1)
      --target T           one target: message, digest, service_bodies, relay_datagram
  tidy                 the Architecture Invariants of ARCHITECTURE.md the code's text can
                       show: no import circles, external crates only where allowed
  topology             run docker-compose.yml's services as local processes on loopback
                       (ports remapped, a throwaway PostgreSQL), drive its client's sessions
                       and check the records (needs the PostgreSQL 15 server binaries, curl)
  docs                 write docs/configuration.md and the man pages in docs/man/ from the
                       code (the test `docs_are_current` fails when they are stale)
  help                 this text
";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }
    let task = args.remove(0);
    let result = match task.as_str() {
        "demo" => demo::run(&args),
        "test" => run_tests(&args),
        "interop" => interop::run(&args),
        "bench" => bench::run(&args),
        "fuzz" => fuzz::run(&args),
        "tidy" => tidy::run(&args),
        "docs" => docs(&args),
        "topology" => topology(&args),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("unknown task {other:?}\n");
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask {task}: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask docs`: the tests crate's `gen-docs` writes the reference and the man pages.
fn docs(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        anyhow::bail!("docs takes no options ({a:?})");
    }
    util::run_status(
        util::cargo().args(["run", "-q", "-p", "tests", "--bin", "gen-docs"]),
        "cargo run -p tests --bin gen-docs",
    )
}

/// `cargo xtask topology`: builds the programs and the tests crate's `topology`, which runs the
/// compose file's services locally.
fn topology(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        anyhow::bail!("topology takes no options ({a:?})");
    }
    util::build(
        &["relay", "app-server-agent", "client-agent", "tests"],
        false,
    )?;
    util::run_status(
        util::cargo().args(["run", "-q", "-p", "tests", "--bin", "topology"]),
        "cargo run -p tests --bin topology",
    )
}

/// `cargo xtask test`: `cargo test --workspace` with the extra arguments passed through; its
/// output is passed on as it comes, and a total over every test binary is printed at the end.
fn run_tests(args: &[String]) -> anyhow::Result<()> {
    use std::io::BufRead;
    // The end-to-end tests run the three programs as processes: build them (the same profile
    // and target directory as the tests) first.
    let status = util::cargo()
        .args([
            "build",
            "-p",
            "relay",
            "-p",
            "app-server-agent",
            "-p",
            "client-agent",
        ])
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start cargo build: {e}"))?;
    if !status.success() {
        anyhow::bail!("building the programs failed ({status})");
    }
    // Tests skipped at run time (PostgreSQL with SIP_RELAY_SKIP_PG=1) write their names here.
    let skip_log = std::env::temp_dir().join(format!("sip-relay-skipped-{}", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut cmd = util::cargo();
    cmd.env("SIP_RELAY_SKIP_LOG", &skip_log);
    // --no-fail-fast: report every failing test binary, not only the first.
    cmd.arg("test")
        .arg("--workspace")
        .arg("--no-fail-fast")
        .args(args)
        .stdout(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start cargo test: {e}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .filter_map(|part| {
                            part.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .strip_suffix(word)
                        })
                        .filter_map(|n| n.trim().parse::<u64>().ok())
                        .sum()
                };
                passed += count(" passed");
                failed += count(" failed");
                ignored += count(" ignored");
            }
        }
    }
    let status = child.wait()?;
    let skipped = std::fs::read_to_string(&skip_log)
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0);
    let _ = std::fs::remove_file(&skip_log);
    println!(
        "test: {} passed, {failed} failed, {} skipped{}",
        passed.saturating_sub(skipped),
        ignored + skipped,
        if skipped > 0 {
            format!(" ({skipped} PostgreSQL tests: SIP_RELAY_SKIP_PG=1)")
        } else {
            String::new()
        }
    );
    if !status.success() {
        anyhow::bail!("cargo test --workspace failed ({status})");
    }
    Ok(())
}
