//! # xtask: project tasks for sip-relay
//!
//! Run with `cargo xtask TASK` (an alias in `.cargo/config.toml`):
//!
//! * `cargo xtask demo` — build `relay` and `client-agent`, start a relay on loopback with a
//!   temporary SQLite database, register bob, let alice call him, show the call record.
//! * `cargo xtask test [ARGS…]` — the whole test suite (`cargo test --workspace --no-fail-fast ARGS…`).
//! * `cargo xtask interop [--calls N] [--rate R] [--transport udp|tcp|both]` — SIPp calls
//!   through the release relay (digest auth, record-route), checking every call succeeds and
//!   has exactly one call-detail record. Needs `sipp` (Debian package `sip-tester`).
//! * `cargo xtask bench` — SIPp at rising call rates through the release relay; CPU time per
//!   1,000 calls and peak memory. A benchmark: it reports, it does not assert.
//!
//! Only the standard library and `anyhow`: every process is started with `std::process`,
//! binds only 127.0.0.1, and is stopped by its PID when the task ends (also on failure).
use std::process::ExitCode;

mod bench;
mod demo;
mod interop;
mod json;
mod relay;
mod sipp;
mod util;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  demo                 build relay + client-agent, run a relay on loopback, register bob,
                       let alice call him for 2 s, show the call-detail record
  test [ARGS...]       the whole test suite: cargo test --workspace --no-fail-fast ARGS...
  interop [options]    SIPp calls through the release relay (needs sipp, Debian: sip-tester)
      --calls N            calls per transport (default 200)
      --rate R             calls per second (default 50)
      --transport T        udp, tcp or both (default both)
      --pause MS           call duration, ms between ACK and BYE (default 500)
      --relay-log FILTER   relay log filter (default info); the log is kept on failure
  bench [options]      SIPp at rising call rates through the release relay
      --rates A,B,...      call rates to try (default 200,500,1000,1500,2000,2500,3000,3500,4000,5000)
      --step-secs S        seconds of new calls per step (default 10)
      --pause MS           call duration (default 1000)
      --transport T        udp or tcp (default udp)
      --cpu-rates A,B      fixed rates for CPU/memory figures (default 1000,2000)
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
    let mut cmd = util::cargo();
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
    println!("test: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        anyhow::bail!("cargo test --workspace failed ({status})");
    }
    Ok(())
}
