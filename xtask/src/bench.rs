//! `cargo xtask bench`: SIPp at rising call rates through the release relay.
//!
//! Every call goes through digest authentication (407 + second INVITE), record-routing, the
//! relay's dialog tracking, and a call-detail record on SQLite. Each rate step uses a fresh
//! relay, database and SIPp UAS, places `rate × step-secs` calls lasting `--pause` ms, and
//! passes when SIPp reports zero failed calls and the relay holds exactly one `ended`
//! record per successful call. The ramp stops at the first step that does not pass.
//!
//! Then, at fixed rates (default 1,000 and 2,000 calls/s, fresh relay each), the relay's CPU
//! time (utime + stime from /proc/PID/stat, in clock ticks of `getconf CLK_TCK`) per 1,000
//! calls, and its peak resident memory (VmHWM from /proc/PID/status).
//!
//! This is a benchmark, not a test: it reports and asserts nothing about speed. SIPp itself
//! shares the machine's cores with the relay, so figures are lower bounds of the relay's
//! capacity on this machine.
use std::time::Duration;

use anyhow::bail;

use crate::interop::DOMAIN;
use crate::relay::Relay;
use crate::sipp::{self, Uac, UacResult};
use crate::util::{self, TempDir};

const CALLER_PW: &str = "caller-secret";
const CALLEE_PW: &str = "callee-secret";

struct Options {
    rates: Vec<u64>,
    cpu_rates: Vec<u64>,
    step_secs: u64,
    pause_ms: u64,
    transport: String,
}

fn parse_list(name: &str, value: &str) -> anyhow::Result<Vec<u64>> {
    let list: Vec<u64> = value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| util::parse_num(name, s.trim()))
        .collect::<anyhow::Result<_>>()?;
    if list.contains(&0) {
        bail!("{name}: rates must be above 0");
    }
    Ok(list)
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        rates: vec![200, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000],
        cpu_rates: vec![1000, 2000],
        step_secs: 10,
        pause_ms: 1000,
        transport: "udp".into(),
    };
    for (name, value) in util::parse_options(
        args,
        &[
            "--rates",
            "--cpu-rates",
            "--step-secs",
            "--pause",
            "--transport",
        ],
    )? {
        match name.as_str() {
            "--rates" => o.rates = parse_list(&name, &value)?,
            "--cpu-rates" => o.cpu_rates = parse_list(&name, &value)?,
            "--step-secs" => o.step_secs = util::parse_num(&name, &value)?,
            "--pause" => o.pause_ms = util::parse_num(&name, &value)?,
            _ => {
                if value != "udp" && value != "tcp" {
                    bail!("--transport: udp or tcp, not {value:?}");
                }
                o.transport = value;
            }
        }
    }
    if o.step_secs == 0 {
        bail!("--step-secs must be above 0");
    }
    Ok(o)
}

/// One run at one rate on a fresh relay.
struct Run {
    rate: u64,
    calls: u64,
    uac: UacResult,
    cdrs: usize,
    ended: usize,
    cpu_s: f64,
    peak_rss_kib: u64,
}

impl Run {
    fn passed(&self) -> bool {
        self.uac.stats_found
            && self.uac.failed == 0
            && self.uac.successful == self.calls
            && self.cdrs == self.uac.successful as usize
            && self.ended == self.cdrs
    }
}

fn run_at(o: &Options, bin_dir: &std::path::Path, rate: u64) -> anyhow::Result<Run> {
    let mut tmp = TempDir::new("sip-relay-bench")?;
    let dir = tmp.path.clone();
    // Warnings only: per-call info lines would measure the logger.
    let mut relay = Relay::start(bin_dir, &dir, DOMAIN, "warn")?;
    relay.add_user("caller", CALLER_PW)?;
    relay.add_user("callee", CALLEE_PW)?;
    let (mut uas, uas_port) = sipp::start_uas(&dir, &o.transport, "callee", false)?;
    let contact = if o.transport == "tcp" {
        format!("sip:callee@127.0.0.1:{uas_port};transport=tcp")
    } else {
        format!("sip:callee@127.0.0.1:{uas_port}")
    };
    sipp::register(
        &dir,
        &relay.addr(),
        DOMAIN,
        &o.transport,
        "callee",
        CALLEE_PW,
        &contact,
        3600,
    )?;

    let calls = rate * o.step_secs;
    let cpu_before = relay.cpu_seconds()?;
    let uac = sipp::run_uac(
        &dir,
        &Uac {
            relay_addr: &relay.addr(),
            domain: DOMAIN,
            transport: &o.transport,
            caller: "caller",
            password: CALLER_PW,
            callee: "callee",
            calls,
            rate,
            pause_ms: o.pause_ms,
            trace_msg: false,
            name: format!("uac-{rate}"),
        },
    )?;
    let cdr_list = relay.wait_cdrs(uac.successful as usize, Duration::from_secs(60))?;
    let cpu_after = relay.cpu_seconds()?;
    let peak_rss_kib = relay.peak_rss_kib()?;
    relay.guard.check_running()?;
    uas.stop();
    relay.guard.stop();
    let ended = cdr_list
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .count();
    let run = Run {
        rate,
        calls,
        uac,
        cdrs: cdr_list.len(),
        ended,
        cpu_s: cpu_after - cpu_before,
        peak_rss_kib,
    };
    if !run.passed() {
        tmp.keep();
        println!("   (logs of this step: {})", dir.display());
    }
    Ok(run)
}

fn print_header() {
    println!(
        "{:>6} {:>7} {:>7} {:>6} {:>8} {:>7} {:>7} {:>9} {:>8} {:>9}  result",
        "rate",
        "calls",
        "ok",
        "failed",
        "retrans",
        "CDRs",
        "ended",
        "achieved",
        "relay-s",
        "peak-RSS"
    );
}

fn print_run(r: &Run, pause_ms: u64) {
    // Calls were placed over (elapsed − call duration) seconds.
    let placing = (r.uac.elapsed.as_secs_f64() - pause_ms as f64 / 1000.0).max(0.001);
    println!(
        "{:>6} {:>7} {:>7} {:>6} {:>8} {:>7} {:>7} {:>7.0}/s {:>8.2} {:>6} MiB  {}",
        r.rate,
        r.calls,
        r.uac.successful,
        r.uac.failed,
        r.uac.retransmissions,
        r.cdrs,
        r.ended,
        r.uac.successful as f64 / placing,
        r.cpu_s,
        r.peak_rss_kib / 1024,
        if r.passed() { "pass" } else { "FAIL" }
    );
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let o = options(args)?;
    sipp::require()?;
    println!("== bench: building the relay (release)");
    let bin_dir = util::build(&["relay"], true)?;
    println!(
        "\n== ramp: {} s of calls per step, {} ms per call, {} (auth + record-route + dialog + CDR on SQLite)",
        o.step_secs,
        o.pause_ms,
        o.transport.to_uppercase()
    );
    print_header();
    let mut best: Option<u64> = None;
    for &rate in &o.rates {
        let r = run_at(&o, &bin_dir, rate)?;
        print_run(&r, o.pause_ms);
        if !r.passed() {
            break;
        }
        best = Some(rate);
    }
    match best {
        Some(rate) => println!(
            "highest rate with zero failed calls and exactly one record per call: {rate} calls/s"
        ),
        None => println!("no rate passed (zero failed calls and one record per call)"),
    }

    println!("\n== relay CPU and memory at fixed rates (fresh relay each)");
    println!(
        "{:>6} {:>7} {:>7} {:>6} {:>14} {:>12}",
        "rate", "calls", "ok", "failed", "CPU-s/1k calls", "peak RSS"
    );
    for &rate in &o.cpu_rates {
        let r = run_at(&o, &bin_dir, rate)?;
        let per_k = if r.uac.successful > 0 {
            format!("{:.3}", r.cpu_s * 1000.0 / r.uac.successful as f64)
        } else {
            "-".into()
        };
        println!(
            "{:>6} {:>7} {:>7} {:>6} {:>14} {:>8} MiB{}",
            rate,
            r.calls,
            r.uac.successful,
            r.uac.failed,
            per_k,
            r.peak_rss_kib / 1024,
            if r.passed() { "" } else { "  (had failures)" }
        );
    }
    println!(
        "(CPU-s = utime + stime of the relay process during the run; SIPp runs on the same machine)"
    );
    Ok(())
}
