//! `cargo xtask bench`: SIPp at rising rates through the release relay, for plain calls and
//! for service sessions.
//!
//! * `calls`: every call goes through digest authentication (407 + second INVITE),
//!   record-routing, the relay's dialog tracking, and a call-detail record on SQLite; a SIPp
//!   UAS answers (tests/sipp/uac_auth.xml, uas.xml).
//! * `services`: every session is an INVITE for `sip:wine@DOMAIN` with a service request
//!   (tests/sipp/uac_service.xml), authenticated the same way; the relay picks the one
//!   `app-server-agent` (release) registered for `wine`, signs its assertion, the agent
//!   verifies it and answers with a URL and token, and at the BYE the relay rates the session
//!   by the service's tariff and stores the charge.
//!
//! Each rate step uses a fresh relay, database and answering side, places `rate × step-secs`
//! calls or sessions lasting `--pause` ms, and passes when SIPp reports zero failures and the
//! relay holds exactly one `ended` record per successful one (services: each with a charge).
//! The ramp stops at the first step that does not pass. Then, at fixed rates (fresh relay
//! each), the relay's CPU time (utime + stime from /proc/PID/stat, in clock ticks of `getconf
//! CLK_TCK`) per 1,000 calls or sessions and its peak resident memory (VmHWM from
//! /proc/PID/status); for services also the agent's.
//!
//! * `flood`: calls from 127.0.0.1 at a modest rate while another address, 127.0.0.2, sends
//!   INVITEs without credentials to the relay as fast as one sending thread can; then the same
//!   calls without the flood, for comparison. Nothing is trusted: the flood meets the relay's
//!   default per-source limit. Reported: the share of calls that succeeded, the flood's rate,
//!   the relay's CPU time and its peak memory.
//!
//! In `calls` and `services` SIPp's address (127.0.0.1) is trusted (`RELAY_TRUSTED`), as an
//! operator trusts a known peer that sends thousands of calls a second; otherwise the
//! per-source limit would measure itself.
//!
//! This is a benchmark, not a test: it reports and asserts nothing about speed. SIPp (and the
//! agent) share the machine's cores with the relay, so figures are lower bounds of the relay's
//! capacity on this machine.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::appagent;
use crate::interop::DOMAIN;
use crate::relay::Relay;
use crate::sipp::{self, Uac, UacResult};
use crate::util::{self, ChildGuard, TempDir};

const CALLER_PW: &str = "caller-secret";
const CALLEE_PW: &str = "callee-secret";

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Calls,
    Services,
}

impl Kind {
    fn default_rates(self) -> Vec<u64> {
        match self {
            Kind::Calls => vec![200, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000],
            Kind::Services => vec![100, 200, 500, 1000, 1500, 2000, 2500, 3000],
        }
    }

    fn default_cpu_rates(self) -> Vec<u64> {
        match self {
            Kind::Calls => vec![1000, 2000],
            Kind::Services => vec![500, 1000],
        }
    }

    /// `calls` or `sessions`.
    fn unit(self) -> &'static str {
        match self {
            Kind::Calls => "calls",
            Kind::Services => "sessions",
        }
    }
}

struct Options {
    kinds: Vec<Kind>,
    /// Run the flood scenario.
    flood: bool,
    /// Calls a second from 127.0.0.1 during the flood, and for how long.
    flood_rate: u64,
    flood_secs: u64,
    rates: Option<Vec<u64>>,
    cpu_rates: Option<Vec<u64>>,
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
        kinds: vec![Kind::Calls, Kind::Services],
        flood: true,
        flood_rate: 50,
        flood_secs: 20,
        rates: None,
        cpu_rates: None,
        step_secs: 10,
        pause_ms: 1000,
        transport: "udp".into(),
    };
    for (name, value) in util::parse_options(
        args,
        &[
            "--mode",
            "--rates",
            "--cpu-rates",
            "--step-secs",
            "--pause",
            "--transport",
            "--flood-rate",
            "--flood-secs",
        ],
    )? {
        match name.as_str() {
            "--mode" => {
                (o.kinds, o.flood) = match value.as_str() {
                    "calls" => (vec![Kind::Calls], false),
                    "services" => (vec![Kind::Services], false),
                    "flood" => (vec![], true),
                    "all" => (vec![Kind::Calls, Kind::Services], true),
                    _ => bail!("--mode: calls, services, flood or all, not {value:?}"),
                }
            }
            "--flood-rate" => o.flood_rate = util::parse_num(&name, &value)?,
            "--flood-secs" => o.flood_secs = util::parse_num(&name, &value)?,
            // An empty list skips that part (e.g. `--cpu-rates ""`).
            "--rates" => o.rates = Some(parse_list(&name, &value)?),
            "--cpu-rates" => o.cpu_rates = Some(parse_list(&name, &value)?),
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
    if o.step_secs == 0 || o.flood_secs == 0 || o.flood_rate == 0 {
        bail!("--step-secs, --flood-secs and --flood-rate must be above 0");
    }
    Ok(o)
}

/// One run at one rate on a fresh relay.
struct Run {
    kind: Kind,
    rate: u64,
    calls: u64,
    uac: UacResult,
    cdrs: usize,
    ended: usize,
    /// Records of distinct Call-IDs (equal to `cdrs` when none is doubled).
    distinct: usize,
    /// Ended records with a charge (services).
    charged: usize,
    cpu_s: f64,
    peak_rss_kib: u64,
    /// The app-server-agent's CPU seconds and peak memory (services).
    agent_cpu_s: f64,
    agent_rss_kib: u64,
}

impl Run {
    fn passed(&self) -> bool {
        self.uac.stats_found
            && self.uac.failed == 0
            && self.uac.successful == self.calls
            && self.cdrs == self.uac.successful as usize
            && self.ended == self.cdrs
            && self.distinct == self.cdrs
            && (self.kind == Kind::Calls || self.charged == self.cdrs)
    }
}

/// What answers the calls or sessions of a run.
enum Callee {
    /// A SIPp UAS registered as `callee`.
    Uas(ChildGuard),
    /// An app-server-agent registered for `wine`.
    Agent(ChildGuard),
}

fn start_callee(
    o: &Options,
    kind: Kind,
    bin_dir: &Path,
    dir: &Path,
    relay: &Relay,
) -> anyhow::Result<Callee> {
    match kind {
        Kind::Calls => {
            relay.add_user("callee", CALLEE_PW)?;
            let (uas, _) = sipp::start_registered_uas(
                dir,
                &relay.addr(),
                DOMAIN,
                &o.transport,
                "callee",
                CALLEE_PW,
                false,
            )?;
            Ok(Callee::Uas(uas))
        }
        Kind::Services => {
            appagent::add_wine(relay)?;
            let agent = appagent::start_logged(
                bin_dir,
                dir,
                relay,
                &appagent::Spec {
                    account: appagent::VENDOR,
                    password: appagent::VENDOR_PW,
                    services: &["wine"],
                    url: "http://127.0.0.1:9/wine",
                    http: None,
                    transport: &o.transport,
                },
            )?;
            Ok(Callee::Agent(agent))
        }
    }
}

fn run_at(o: &Options, kind: Kind, bin_dir: &Path, rate: u64) -> anyhow::Result<Run> {
    let mut tmp = TempDir::new("sip-relay-bench")?;
    let dir = tmp.path.clone();
    // Warnings only: per-call info lines would measure the logger. SIPp's address is trusted:
    // one load generator sends everything.
    let mut relay = Relay::start_with_env(
        bin_dir,
        &dir,
        DOMAIN,
        "warn",
        &[("RELAY_TRUSTED", "127.0.0.1/32")],
    )?;
    relay.add_user("caller", CALLER_PW)?;
    let mut callee = start_callee(o, kind, bin_dir, &dir, &relay)?;
    let agent_pid = match &callee {
        Callee::Agent(agent) => Some(agent.pid()),
        Callee::Uas(_) => None,
    };

    let calls = rate * o.step_secs;
    let cpu_before = relay.cpu_seconds()?;
    let agent_before = match agent_pid {
        Some(pid) => util::cpu_seconds(pid)?,
        None => 0.0,
    };
    let uac = sipp::run_uac(
        &dir,
        &Uac {
            scenario: match kind {
                Kind::Calls => "uac_auth.xml",
                Kind::Services => "uac_service.xml",
            },
            relay_addr: &relay.addr(),
            domain: DOMAIN,
            transport: &o.transport,
            caller: "caller",
            password: CALLER_PW,
            callee: match kind {
                Kind::Calls => "callee",
                Kind::Services => "wine",
            },
            calls,
            rate,
            pause_ms: o.pause_ms,
            trace_msg: false,
            trace_rtt: false,
            users: None,
            name: format!("uac-{rate}"),
        },
    )?;
    let cdr_list = relay.wait_cdrs(uac.successful as usize, Duration::from_secs(60))?;
    let cpu_after = relay.cpu_seconds()?;
    let peak_rss_kib = relay.peak_rss_kib()?;
    let (agent_cpu_s, agent_rss_kib) = match agent_pid {
        Some(pid) => (
            util::cpu_seconds(pid)? - agent_before,
            util::peak_rss_kib(pid)?,
        ),
        None => (0.0, 0),
    };
    relay.guard.check_running()?;
    match &mut callee {
        Callee::Uas(g) | Callee::Agent(g) => {
            g.check_running()?;
            g.stop();
        }
    }
    relay.guard.stop();
    let ended: Vec<_> = cdr_list
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .collect();
    let charged = ended
        .iter()
        .filter(|c| c.text("charge_minor").is_some() && c.text("currency").is_some())
        .count();
    let (_, distinct) = crate::relay::ended_and_distinct(&cdr_list);
    let run = Run {
        kind,
        rate,
        calls,
        uac,
        cdrs: cdr_list.len(),
        ended: ended.len(),
        distinct,
        charged,
        cpu_s: cpu_after - cpu_before,
        peak_rss_kib,
        agent_cpu_s,
        agent_rss_kib,
    };
    if !run.passed() {
        tmp.keep();
        println!("   (logs of this step: {})", dir.display());
    }
    Ok(run)
}

fn print_header(kind: Kind) {
    print!(
        "{:>6} {:>8} {:>7} {:>6} {:>8} {:>7} {:>7}",
        "rate",
        kind.unit(),
        "ok",
        "failed",
        "retrans",
        "records",
        "ended"
    );
    if kind == Kind::Services {
        print!(" {:>7}", "charged");
    }
    print!(" {:>9} {:>8} {:>9}", "achieved", "relay-s", "relay-RSS");
    if kind == Kind::Services {
        print!(" {:>8} {:>9}", "agent-s", "agent-RSS");
    }
    println!("  result");
}

fn print_run(r: &Run, pause_ms: u64) {
    // Calls were placed over (elapsed − call duration) seconds.
    let placing = (r.uac.elapsed.as_secs_f64() - pause_ms as f64 / 1000.0).max(0.001);
    print!(
        "{:>6} {:>8} {:>7} {:>6} {:>8} {:>7} {:>7}",
        r.rate, r.calls, r.uac.successful, r.uac.failed, r.uac.retransmissions, r.cdrs, r.ended,
    );
    if r.kind == Kind::Services {
        print!(" {:>7}", r.charged);
    }
    print!(
        " {:>7.0}/s {:>8.2} {:>5} MiB",
        r.uac.successful as f64 / placing,
        r.cpu_s,
        r.peak_rss_kib / 1024,
    );
    if r.kind == Kind::Services {
        print!(" {:>8.2} {:>5} MiB", r.agent_cpu_s, r.agent_rss_kib / 1024);
    }
    println!("  {}", if r.passed() { "pass" } else { "FAIL" });
}

/// CPU seconds per 1,000 successful calls or sessions.
fn per_k(cpu_s: f64, successful: u64) -> String {
    if successful > 0 {
        format!("{:.3}", cpu_s * 1000.0 / successful as f64)
    } else {
        "-".into()
    }
}

/// The ramp and the fixed-rate figures of one kind; returns the highest rate that passed.
fn bench_kind(o: &Options, kind: Kind, bin_dir: &Path) -> anyhow::Result<Option<u64>> {
    let unit = kind.unit();
    let what = match kind {
        Kind::Calls => "calls: auth + record-route + dialog + CDR on SQLite",
        Kind::Services => {
            "service sessions: auth + service lookup + assertion + app-server-agent + charge on SQLite"
        }
    };
    println!(
        "\n== {what}\n   ramp: {} s of new {unit} per step, {} ms each, {}",
        o.step_secs,
        o.pause_ms,
        o.transport.to_uppercase()
    );
    print_header(kind);
    let mut best: Option<u64> = None;
    let rates = o.rates.clone().unwrap_or_else(|| kind.default_rates());
    for &rate in &rates {
        let r = run_at(o, kind, bin_dir, rate)?;
        print_run(&r, o.pause_ms);
        if !r.passed() {
            break;
        }
        best = Some(rate);
    }
    let one_record = match kind {
        Kind::Calls => "exactly one `ended` record per call",
        Kind::Services => "exactly one `ended`, charged record per session",
    };
    match best {
        Some(rate) => {
            println!("highest rate with zero failed {unit} and {one_record}: {rate} {unit}/s")
        }
        None if rates.is_empty() => {}
        None => println!("no rate passed (zero failed {unit} and {one_record})"),
    }

    let cpu_rates = o
        .cpu_rates
        .clone()
        .unwrap_or_else(|| kind.default_cpu_rates());
    if cpu_rates.is_empty() {
        return Ok(best);
    }
    println!("\n   CPU and memory at fixed rates (fresh relay each)");
    print!(
        "{:>6} {:>8} {:>7} {:>6} {:>14} {:>9}",
        "rate", unit, "ok", "failed", "relay CPU-s/1k", "relay-RSS"
    );
    if kind == Kind::Services {
        print!(" {:>14} {:>9}", "agent CPU-s/1k", "agent-RSS");
    }
    println!();
    for &rate in &cpu_rates {
        let r = run_at(o, kind, bin_dir, rate)?;
        print!(
            "{:>6} {:>8} {:>7} {:>6} {:>14} {:>5} MiB",
            rate,
            r.calls,
            r.uac.successful,
            r.uac.failed,
            per_k(r.cpu_s, r.uac.successful),
            r.peak_rss_kib / 1024,
        );
        if kind == Kind::Services {
            print!(
                " {:>14} {:>5} MiB",
                per_k(r.agent_cpu_s, r.uac.successful),
                r.agent_rss_kib / 1024
            );
        }
        println!("{}", if r.passed() { "" } else { "  (had failures)" });
    }
    Ok(best)
}

/// What one flood run measured.
struct FloodRun {
    calls: u64,
    uac: UacResult,
    ended: usize,
    /// INVITEs the flooder sent, and over how long.
    flood_sent: u64,
    flood_secs: f64,
    cpu_s: f64,
    wall_s: f64,
    peak_rss_kib: u64,
    /// Log lines in which the relay said it drops a source's messages.
    drop_lines: usize,
}

/// INVITEs without credentials from 127.0.0.2 as fast as one thread sends them (a scanner such
/// as sipvicious), until `stop`; returns how many went out and over how long.
fn flood(relay_port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<(u64, f64)> {
    let sock = std::net::UdpSocket::bind("127.0.0.2:0")?;
    let local = sock.local_addr()?;
    let msg = format!(
        "INVITE sip:100@127.0.0.1:{relay_port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-flood;rport\r\n\
         Max-Forwards: 70\r\nFrom: \"sipvicious\"<sip:100@1.1.1.1>;tag=f1\r\nTo: \"sipvicious\"<sip:100@1.1.1.1>\r\n\
         Call-ID: flood-1\r\nCSeq: 1 INVITE\r\nContact: <sip:100@{local}>\r\nUser-Agent: friendly-scanner\r\n\
         Content-Length: 0\r\n\r\n"
    );
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], relay_port));
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            if sock.send_to(msg.as_bytes(), target).is_ok() {
                sent += 1;
            }
        }
    }
    Ok((sent, started.elapsed().as_secs_f64()))
}

fn run_flood(o: &Options, bin_dir: &Path, with_flood: bool) -> anyhow::Result<FloodRun> {
    let mut tmp = TempDir::new("sip-relay-flood")?;
    let dir = tmp.path.clone();
    // The relay as shipped: nobody trusted, the default per-source limit.
    let mut relay = Relay::start(bin_dir, &dir, DOMAIN, "warn")?;
    relay.add_user("caller", CALLER_PW)?;
    let mut callee = start_callee(o, Kind::Calls, bin_dir, &dir, &relay)?;
    let cpu_before = relay.cpu_seconds()?;
    let wall = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = with_flood.then(|| {
        let stop = stop.clone();
        let port = relay.port;
        std::thread::spawn(move || flood(port, stop))
    });
    if flooder.is_some() {
        // The flood is at full speed before the first call.
        std::thread::sleep(Duration::from_secs(1));
    }
    let calls = o.flood_rate * o.flood_secs;
    let uac = sipp::run_uac(
        &dir,
        &Uac {
            scenario: "uac_auth.xml",
            relay_addr: &relay.addr(),
            domain: DOMAIN,
            transport: "udp",
            caller: "caller",
            password: CALLER_PW,
            callee: "callee",
            calls,
            rate: o.flood_rate,
            pause_ms: o.pause_ms,
            trace_msg: false,
            trace_rtt: false,
            users: None,
            name: format!("uac-flood-{with_flood}"),
        },
    );
    stop.store(true, Ordering::Relaxed);
    let (flood_sent, flood_secs) = match flooder {
        Some(t) => t
            .join()
            .map_err(|_| anyhow::anyhow!("the flooding thread panicked"))??,
        None => (0, 0.0),
    };
    let uac = uac?;
    let cdr_list = relay.wait_cdrs(uac.successful as usize, Duration::from_secs(60))?;
    let cpu_after = relay.cpu_seconds()?;
    let wall_s = wall.elapsed().as_secs_f64();
    let peak_rss_kib = relay.peak_rss_kib()?;
    relay.guard.check_running()?;
    let (Callee::Uas(g) | Callee::Agent(g)) = &mut callee;
    g.stop();
    relay.guard.stop();
    let drop_lines = std::fs::read_to_string(&relay.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("over its message rate"))
        .count();
    let ended = cdr_list
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .count();
    if uac.successful < calls {
        tmp.keep();
        println!("   (logs of this run: {})", dir.display());
    }
    Ok(FloodRun {
        calls,
        uac,
        ended,
        flood_sent,
        flood_secs,
        cpu_s: cpu_after - cpu_before,
        wall_s,
        peak_rss_kib,
        drop_lines,
    })
}

fn bench_flood(o: &Options, bin_dir: &Path) -> anyhow::Result<()> {
    println!(
        "\n== flood: 127.0.0.2 sends INVITEs without credentials as fast as one thread can, \
         while 127.0.0.1 places {} calls/s for {} s ({} ms each); relay defaults, nothing trusted",
        o.flood_rate, o.flood_secs, o.pause_ms
    );
    println!(
        "{:<10} {:>6} {:>6} {:>8} {:>7} {:>13} {:>9} {:>7} {:>9} {:>10}",
        "run",
        "calls",
        "ok",
        "success",
        "ended",
        "flood sent",
        "flood/s",
        "relay-s",
        "relay-CPU",
        "relay-RSS"
    );
    for with_flood in [true, false] {
        let r = run_flood(o, bin_dir, with_flood)?;
        let rate = if r.flood_secs > 0.0 {
            r.flood_sent as f64 / r.flood_secs
        } else {
            0.0
        };
        println!(
            "{:<10} {:>6} {:>6} {:>7.2}% {:>7} {:>13} {:>9.0} {:>7.2} {:>8.0}% {:>6} MiB",
            if with_flood { "flood" } else { "no flood" },
            r.calls,
            r.uac.successful,
            100.0 * r.uac.successful as f64 / r.calls.max(1) as f64,
            r.ended,
            r.flood_sent,
            rate,
            r.cpu_s,
            100.0 * r.cpu_s / r.wall_s.max(0.001),
            r.peak_rss_kib / 1024,
        );
        if with_flood {
            println!(
                "           the relay logged {} drop line(s) for the flooding source",
                r.drop_lines
            );
        }
    }
    println!("(relay-CPU: its CPU time over the run's wall time; 100 % is one core)");
    Ok(())
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if args
        .iter()
        .any(|a| a == "--against" || a.starts_with("--against="))
    {
        return crate::against::run(args);
    }
    if let Some(i) = args.iter().position(|a| a == "--charges") {
        let mut rest = args.to_vec();
        rest.remove(i);
        return crate::charges::run(&rest);
    }
    if let Some(i) = args.iter().position(|a| a == "--soak") {
        let mut rest = args.to_vec();
        rest.remove(i);
        return crate::soak::run(&rest);
    }
    let o = options(args)?;
    sipp::require()?;
    println!("== bench: building the relay (release)");
    let bin_dir = util::build(&["relay"], true)?;
    if o.kinds.contains(&Kind::Services) {
        // On its own: built together, the two would unify their dependencies' features
        // differently from `cargo build -p relay` (interop), and each would rebuild the relay.
        println!("== bench: building app-server-agent (release)");
        util::build(&["app-server-agent"], true)?;
    }
    let mut summary = Vec::new();
    for &kind in &o.kinds {
        let best = bench_kind(&o, kind, &bin_dir)?;
        summary.push((kind, best));
    }
    if o.flood {
        bench_flood(&o, &bin_dir)?;
    }
    let agent = if o.kinds.contains(&Kind::Services) {
        ", agent-s"
    } else {
        ""
    };
    if !o.kinds.is_empty() {
        println!(
            "\n(relay-s{agent}: utime + stime of the process during the run; SIPp runs on the same machine)"
        );
    }
    if summary.len() > 1 {
        for (kind, best) in summary {
            match best {
                Some(rate) => println!("{}: highest passing rate {rate}/s", kind.unit()),
                None => println!("{}: no rate passed", kind.unit()),
            }
        }
    }
    Ok(())
}
