//! `cargo xtask bench --soak`: plain calls at a steady rate for minutes through one release
//! relay, to see what a long run does that a 10 s step hides: failures in bursts,
//! retransmissions, slow set-ups in the tail, memory that keeps growing.
//!
//! Each run uses a fresh relay (SQLite, SIPp's address trusted as in `--mode calls`), a SIPp
//! callee registered at it, and a SIPp caller placing `--rate` calls a second for `--secs`
//! seconds, each `--pause` ms long, every one authenticated (407 + second INVITE). Printed per
//! run: calls placed, successful, failed, SIPp's retransmissions, records (exactly one `ended`
//! record per successful call is required), call set-up time (first INVITE to 200) and BYE time
//! (BYE to its 200) at p50, p99, p99.9 and the maximum, from every call's SIPp response times,
//! and the relay's memory (proportional set size, PSS, from /proc/PID/smaps_rollup) every
//! 10 s, first and last. Runs follow each other (`--runs`, default 2).
//!
//! A run that fails keeps its directory (relay log, SIPp error logs) and says where.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::interop::DOMAIN;
use crate::relay::Relay;
use crate::sipp::{self, Uac};
use crate::util::{self, TempDir};

const CALLER_PW: &str = "caller-secret";
const CALLEE_PW: &str = "callee-secret";
/// Memory is sampled this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

struct Options {
    rate: u64,
    secs: u64,
    pause_ms: u64,
    runs: u64,
    transport: String,
    relay_log: String,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        rate: 1000,
        secs: 180,
        pause_ms: 1000,
        runs: 2,
        transport: "udp".into(),
        relay_log: "warn".into(),
    };
    for (name, value) in util::parse_options(
        args,
        &[
            "--rate",
            "--secs",
            "--pause",
            "--runs",
            "--transport",
            "--relay-log",
        ],
    )? {
        match name.as_str() {
            "--rate" => o.rate = util::parse_num(&name, &value)?,
            "--secs" => o.secs = util::parse_num(&name, &value)?,
            "--pause" => o.pause_ms = util::parse_num(&name, &value)?,
            "--runs" => o.runs = util::parse_num(&name, &value)?,
            "--relay-log" => o.relay_log = value,
            _ => {
                if value != "udp" && value != "tcp" {
                    bail!("--transport: udp or tcp, not {value:?}");
                }
                o.transport = value;
            }
        }
    }
    if o.rate == 0 || o.secs == 0 || o.runs == 0 {
        bail!("--rate, --secs and --runs must be above 0");
    }
    Ok(o)
}

/// Percentiles of a set of times in ms.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Spread {
    pub(crate) count: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Spread {
    /// Nearest-rank percentiles.
    pub(crate) fn of(mut ms: Vec<f64>) -> Spread {
        if ms.is_empty() {
            return Spread::default();
        }
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
            ms[i - 1]
        };
        Spread {
            count: ms.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            p999: rank(0.999),
            max: ms[ms.len() - 1],
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} calls)",
            self.p50, self.p99, self.p999, self.max, self.count
        )
    }
}

/// SIPp's `-trace_rtt` file (`Date_ms;response_time_ms;rtd_no`): the times of each timer.
pub(crate) fn read_rtt(text: &str) -> (Vec<f64>, Vec<f64>) {
    let (mut setup, mut bye) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let cols: Vec<&str> = line.split(';').map(str::trim).collect();
        let (Some(ms), Some(timer)) = (cols.get(1), cols.get(2)) else {
            continue;
        };
        let Ok(ms) = ms.parse::<f64>() else { continue };
        match *timer {
            "1" => setup.push(ms),
            "2" => bye.push(ms),
            _ => {}
        }
    }
    (setup, bye)
}

/// The `-trace_rtt` file SIPp wrote in `dir` for scenario `stem` (`STEM_PID_rtt.csv`), or
/// nothing.
pub(crate) fn rtt_file(dir: &std::path::Path, stem: &str) -> String {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{stem}_")) && f.ends_with("_rtt.csv"))
        })
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

/// Proportional set size of a process in KiB (Pss from /proc/PID/smaps_rollup).
pub(crate) fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no Pss in smaps_rollup")?
        .parse()
        .context("bad Pss line")
}

struct SoakRun {
    passed: bool,
}

fn soak_run(o: &Options, bin_dir: &Path, n: u64) -> anyhow::Result<SoakRun> {
    let mut tmp = TempDir::new("sip-relay-soak")?;
    let dir = tmp.path.clone();
    let mut relay = Relay::start_with_env(
        bin_dir,
        &dir,
        DOMAIN,
        &o.relay_log,
        &[("RELAY_TRUSTED", "127.0.0.1/32")],
    )?;
    relay.add_user("caller", CALLER_PW)?;
    relay.add_user("callee", CALLEE_PW)?;
    let (mut uas, _) = sipp::start_registered_uas(
        &dir,
        &relay.addr(),
        DOMAIN,
        &o.transport,
        "callee",
        CALLEE_PW,
        false,
    )?;
    let calls = o.rate * o.secs;
    println!(
        "\n-- run {n}: {calls} calls at {}/s over {}, {} ms each (relay PID {}, in {})",
        o.rate,
        o.transport.to_uppercase(),
        o.pause_ms,
        relay.guard.pid(),
        dir.display()
    );

    // Memory every 10 s while SIPp runs.
    let pid = relay.guard.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let start = std::time::Instant::now();
            let mut next = start;
            while !stop.load(Ordering::Relaxed) {
                if std::time::Instant::now() >= next {
                    if let Ok(kib) = pss_kib(pid) {
                        samples.push((start.elapsed().as_secs(), kib));
                    }
                    next += SAMPLE_EVERY;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let cpu_before = relay.cpu_seconds()?;
    let uac = sipp::run_uac(
        &dir,
        &Uac {
            scenario: "uac_auth.xml",
            relay_addr: &relay.addr(),
            domain: DOMAIN,
            transport: &o.transport,
            caller: "caller",
            password: CALLER_PW,
            callee: "callee",
            calls,
            rate: o.rate,
            pause_ms: o.pause_ms,
            trace_msg: false,
            trace_rtt: true,
            users: None,
            name: format!("soak-{n}"),
        },
    )?;
    let end_kib = pss_kib(pid).ok();
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampler.join().unwrap_or_default();
    if let Some(kib) = end_kib {
        samples.push((uac.elapsed.as_secs(), kib));
    }
    let cdrs = relay.wait_cdrs(uac.successful as usize, Duration::from_secs(60))?;
    let cpu_s = relay.cpu_seconds()? - cpu_before;
    relay.guard.check_running()?;
    uas.check_running()?;
    uas.stop();
    relay.guard.stop();

    let (ended, distinct) = crate::relay::ended_and_distinct(&cdrs);
    let rtt = rtt_file(&dir, "uac_auth");
    let (setup, bye) = read_rtt(&rtt);
    let (setup, bye) = (Spread::of(setup), Spread::of(bye));

    println!(
        "   calls: {} placed, {} successful, {} failed, {} retransmissions ({:.0} s)",
        uac.created,
        uac.successful,
        uac.failed,
        uac.retransmissions,
        uac.elapsed.as_secs_f64()
    );
    println!(
        "   records: {} ({} ended, {} distinct calls), {} per successful call",
        cdrs.len(),
        ended,
        distinct,
        if uac.successful == 0 {
            "-".to_string()
        } else {
            format!("{:.3}", cdrs.len() as f64 / uac.successful as f64)
        }
    );
    println!("   set-up (INVITE to 200): {}", setup.line());
    println!("   BYE (BYE to 200):       {}", bye.line());
    println!(
        "   relay CPU: {:.1} s, {:.3} s per 1,000 calls",
        cpu_s,
        if uac.successful == 0 {
            0.0
        } else {
            cpu_s * 1000.0 / uac.successful as f64
        }
    );
    let memory: Vec<String> = samples
        .iter()
        .map(|(s, kib)| format!("{s} s {:.1}", *kib as f64 / 1024.0))
        .collect();
    println!("   relay memory (PSS, MiB): {}", memory.join(" · "));
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        // The first sample is the idle relay; the flat part starts once calls are up.
        let warm = samples.get(2).unwrap_or(first);
        println!(
            "   memory: {:.1} MiB idle, {:.1} MiB after {} s, {:.1} MiB at the end",
            first.1 as f64 / 1024.0,
            warm.1 as f64 / 1024.0,
            warm.0,
            last.1 as f64 / 1024.0
        );
    }
    let passed = uac.stats_found
        && uac.failed == 0
        && uac.successful == calls
        && cdrs.len() == calls as usize
        && ended == cdrs.len()
        && distinct == cdrs.len();
    if passed {
        println!("   passed: zero failed calls, exactly one ended record per call");
    } else {
        tmp.keep();
        println!("   FAILED; logs of this run: {}", dir.display());
    }
    Ok(SoakRun { passed })
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let o = options(args)?;
    sipp::require()?;
    println!("== soak: building the relay (release)");
    let bin_dir = util::build(&["relay"], true)?;
    println!(
        "== soak: {} run(s) of {} calls/s for {} s, each on a fresh relay (SQLite)",
        o.runs, o.rate, o.secs
    );
    let mut passed = 0;
    for n in 1..=o.runs {
        if soak_run(&o, &bin_dir, n)?.passed {
            passed += 1;
        }
    }
    println!("\n== soak: {passed} of {} run(s) passed", o.runs);
    if passed != o.runs {
        bail!("{} soak run(s) had failures", o.runs - passed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Spread, read_rtt};

    #[test]
    fn reads_response_times_per_timer() {
        let text = "Date_ms;response_time_ms;rtd_no\n\
                    1.0;2.500;1\n\
                    1.1;4.000;2\n\
                    1.2;3.500;1\n";
        assert_eq!(read_rtt(text), (vec![2.5, 3.5], vec![4.0]));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Spread::of((1..=1000).map(f64::from).collect());
        assert_eq!((s.p50, s.p99, s.p999, s.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Spread::of(vec![]).count, 0);
    }
}
