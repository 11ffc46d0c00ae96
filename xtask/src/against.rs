//! `cargo xtask bench --against kamailio`: the relay and Kamailio 5.6 doing the same job on
//! this machine, side-runs alternating (Kamailio, relay, Kamailio, relay, …) in one run.
//!
//! The job (../shared/bench/kamailio-anchor.cfg and its README): a SIPp callee registers as
//! `service1` with digest authentication; SIPp callers (`--users` accounts in turn, from
//! ../shared/bench/kamailio-mkdb.py's `users.csv`) place calls to it at `--rate` calls a second,
//! each challenged (407) and sent again with credentials, record-routed, relayed statefully,
//! tracked as a dialog and written as one call record in SQLite; `--pause` ms between ACK and
//! BYE. Kamailio runs with one UDP worker (the anchor setting; with more, its SQLite record
//! writes fail under load); the relay as shipped (release build, one thread), SIPp's address
//! trusted as in the other benchmarks.
//!
//! Each side-run starts with `--warmup` seconds of calls at the rate (the anchor's figures were
//! taken after a 3 s warm-up), whose calls and records are not counted.
//!
//! Per side-run: calls placed, failed, records per call, CPU-seconds per 1,000 calls (utime +
//! stime of every process of the server, sampled before the first call and after the last
//! record), call set-up p50 and p99 (first INVITE to 200, from SIPp's response times), and
//! memory (PSS summed over the server's processes, the highest sample, every second). Then
//! the ratio of the relay's mean CPU per call to Kamailio's.
//!
//! Needs `kamailio` and `kamailio-sqlite-modules` (Debian), `python3`, `sqlite3` and `sipp`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::relay::Relay;
use crate::sipp::{self, Uac};
use crate::soak::{Spread, pss_kib, read_rtt, rtt_file};
use crate::util::{self, ChildGuard, TempDir};

const DOMAIN: &str = "bench.test";
const SERVICE: &str = "service1";
const SERVICE_PW: &str = "svc1-secret";
/// Kamailio's shared memory in MB. The anchor README's 256 ran out in one side-run of two here
/// ("out of mem" in tm, q_malloc fragments), failing thousands of calls; 1024 is plenty.
const KAMAILIO_SHM_MB: &str = "1024";

struct Options {
    rate: u64,
    calls: u64,
    pause_ms: u64,
    rounds: u64,
    users: u64,
    warmup_secs: u64,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        rate: 2000,
        calls: 20_000,
        pause_ms: 1000,
        rounds: 2,
        users: 100,
        warmup_secs: 3,
    };
    for (name, value) in util::parse_options(
        args,
        &[
            "--against",
            "--rate",
            "--calls",
            "--pause",
            "--rounds",
            "--users",
            "--warmup",
        ],
    )? {
        match name.as_str() {
            "--against" if value == "kamailio" => {}
            "--against" => bail!("--against: only kamailio, not {value:?}"),
            "--rate" => o.rate = util::parse_num(&name, &value)?,
            "--calls" => o.calls = util::parse_num(&name, &value)?,
            "--pause" => o.pause_ms = util::parse_num(&name, &value)?,
            "--rounds" => o.rounds = util::parse_num(&name, &value)?,
            "--warmup" => o.warmup_secs = util::parse_num(&name, &value)?,
            _ => o.users = util::parse_num(&name, &value)?,
        }
    }
    if o.rate == 0 || o.calls == 0 || o.rounds == 0 || o.users == 0 {
        bail!("--rate, --calls, --rounds and --users must be above 0");
    }
    Ok(o)
}

/// `../shared/bench`, beside the checkout.
fn anchor_dir() -> anyhow::Result<PathBuf> {
    let dir = util::project_root().join("..").join("shared").join("bench");
    if !dir.join("kamailio-anchor.cfg").exists() {
        bail!(
            "{} has no kamailio-anchor.cfg (the shared directory belongs beside the checkout)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Every process of the tree rooted at `pid` (Kamailio forks its workers).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (p, pp) in &parents {
            if *pp == parent && !tree.contains(p) {
                tree.push(*p);
            }
        }
        i += 1;
    }
    tree
}

/// Stops Kamailio and every process it forked: its workers outlive it when it dies on an error.
fn stop_kamailio(guard: &mut ChildGuard) {
    let tree = process_tree(guard.pid());
    guard.stop();
    for pid in tree.into_iter().skip(1) {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn tree_cpu(pid: u32) -> f64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| util::cpu_seconds(p).ok())
        .sum()
}

fn tree_pss_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| pss_kib(p).ok())
        .sum()
}

/// What one side-run measured.
struct SideRun {
    side: &'static str,
    round: u64,
    placed: u64,
    ok: u64,
    failed: u64,
    records: u64,
    ended: u64,
    distinct: u64,
    cpu_s: f64,
    setup: Spread,
    peak_pss_kib: u64,
}

impl SideRun {
    fn clean(&self) -> bool {
        self.failed == 0
            && self.ok == self.placed
            && self.records == self.ok
            && self.ended == self.ok
            && self.distinct == self.ok
    }

    fn cpu_per_k(&self) -> f64 {
        if self.ok == 0 {
            0.0
        } else {
            self.cpu_s * 1000.0 / self.ok as f64
        }
    }
}

/// The server under test: its PID (root of its processes) and what keeps it running.
enum Server {
    Kamailio(ChildGuard),
    Relay(Box<Relay>),
}

impl Drop for Server {
    /// Stops the server on every path out of a side-run, Kamailio with all it forked.
    fn drop(&mut self) {
        match self {
            Server::Kamailio(g) => stop_kamailio(g),
            Server::Relay(r) => r.guard.stop(),
        }
    }
}

impl Server {
    fn pid(&self) -> u32 {
        match self {
            Server::Kamailio(g) => g.pid(),
            Server::Relay(r) => r.guard.pid(),
        }
    }
}

fn mkdb(dir: &Path, users: u64, kamailio: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("python3");
    cmd.arg(anchor_dir()?.join("kamailio-mkdb.py"))
        .arg(dir)
        .arg(users.to_string())
        .arg(DOMAIN);
    if kamailio {
        cmd.arg("--kamailio");
    }
    util::run_output(&mut cmd, "kamailio-mkdb.py")?;
    Ok(())
}

fn start_kamailio(dir: &Path, port: u16) -> anyhow::Result<ChildGuard> {
    let d = dir.display();
    let log = std::fs::File::create(dir.join("kamailio.log"))?;
    let mut cmd = Command::new("kamailio");
    cmd.arg("-f")
        .arg(anchor_dir()?.join("kamailio-anchor.cfg"))
        .args(["-DD", "-E", "-m", KAMAILIO_SHM_MB, "-M", "16"])
        .arg("-P")
        .arg(dir.join("kamailio.pid"))
        .arg("-w")
        .arg(dir)
        .args(["-A", &format!("AUTH_DB_URL=\"sqlite:///{d}/auth.sqlite\"")])
        .args(["-A", &format!("ACC_DB_URL=\"sqlite:///{d}/acc.sqlite\"")])
        .args(["-A", &format!("CTL_SOCK=\"unix:{d}/kamailio_ctl\"")])
        .args(["-A", "UDP_CHILDREN=1"])
        .args(["-A", &format!("KPORT={port}")])
        .args(["-A", &format!("SIP_DOMAIN=\"{DOMAIN}\"")])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut guard = ChildGuard::spawn("kamailio", &mut cmd)?;
    guard.stop_signal = "TERM";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = Command::new("kamcmd")
            .arg("-s")
            .arg(format!("unix:{d}/kamailio_ctl"))
            .arg("core.uptime")
            .output()
            .is_ok_and(|o| o.status.success());
        if up {
            return Ok(guard);
        }
        if guard.check_running().is_err() || Instant::now() > deadline {
            stop_kamailio(&mut guard);
            bail!(
                "kamailio did not start (or answer kamcmd within 20 s):\n{}",
                util::tail(&dir.join("kamailio.log"), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sqlite_count(db: &Path, sql: &str) -> u64 {
    Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Kamailio's records, once their count reaches `expected` or stops growing for 3 s.
fn kamailio_records(dir: &Path, expected: u64) -> (u64, u64) {
    let db = dir.join("acc.sqlite");
    let start = Instant::now();
    let (mut last, mut since) = (u64::MAX, Instant::now());
    loop {
        let n = sqlite_count(&db, "select count(*) from acc_cdrs");
        if n >= expected || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    (
        sqlite_count(&db, "select count(*) from acc_cdrs"),
        sqlite_count(&db, "select count(distinct callid) from acc_cdrs"),
    )
}

fn side_run(o: &Options, bin_dir: &Path, kamailio: bool, round: u64) -> anyhow::Result<SideRun> {
    let side = if kamailio { "kamailio" } else { "relay" };
    let mut tmp = TempDir::new(&format!("sip-relay-against-{side}"))?;
    let dir = tmp.path.clone();
    mkdb(&dir, o.users, kamailio)?;
    let (server, addr) = if kamailio {
        let port = util::free_port()?;
        (
            Server::Kamailio(start_kamailio(&dir, port)?),
            format!("127.0.0.1:{port}"),
        )
    } else {
        let relay = Relay::start_with_env(
            bin_dir,
            &dir,
            DOMAIN,
            "warn",
            &[("RELAY_TRUSTED", "127.0.0.1/32")],
        )?;
        let users = std::fs::read_to_string(dir.join("users.tsv"))?;
        for line in users.lines() {
            if let Some((name, pw)) = line.split_once('\t') {
                relay.add_user(name, pw)?;
            }
        }
        let addr = relay.addr();
        (Server::Relay(Box::new(relay)), addr)
    };
    let pid = server.pid();
    let (mut uas, _) =
        sipp::start_registered_uas(&dir, &addr, DOMAIN, "udp", SERVICE, SERVICE_PW, false)?;

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(tree_pss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let users_file = dir.join("users.csv");
    let uac = |calls: u64, name: String, trace_rtt: bool| {
        sipp::run_uac(
            &dir,
            &Uac {
                scenario: "uac_users.xml",
                relay_addr: &addr,
                domain: DOMAIN,
                transport: "udp",
                caller: "",
                password: "",
                callee: SERVICE,
                calls,
                rate: o.rate,
                pause_ms: o.pause_ms,
                trace_msg: false,
                trace_rtt,
                users: Some(&users_file),
                name,
            },
        )
    };
    // Warm-up: its calls and their records are counted out (the records waited for, so none
    // lands in the measured window).
    let mut warm_ids = std::collections::HashSet::new();
    let mut warm_counts = (0, 0);
    if o.warmup_secs > 0 {
        let warm = uac(
            o.rate * o.warmup_secs,
            format!("{side}-{round}-warmup"),
            false,
        )?;
        match &server {
            Server::Kamailio(_) => warm_counts = kamailio_records(&dir, warm.successful),
            Server::Relay(relay) => {
                let cdrs = relay.wait_cdrs(warm.successful as usize, Duration::from_secs(60))?;
                warm_ids = cdrs
                    .iter()
                    .map(|c| c.text("call_id").unwrap_or_default())
                    .collect();
            }
        }
    }
    let cpu_before = tree_cpu(pid);
    let uac = uac(o.calls, format!("{side}-{round}"), true)?;
    let (records, ended, distinct) = match &server {
        Server::Kamailio(_) => {
            // acc writes a row when a call ends: every row is an ended call.
            let (records, distinct) = kamailio_records(&dir, warm_counts.0 + uac.successful);
            let records = records.saturating_sub(warm_counts.0);
            (records, records, distinct.saturating_sub(warm_counts.1))
        }
        Server::Relay(relay) => {
            let all = relay.wait_cdrs(
                warm_ids.len() + uac.successful as usize,
                Duration::from_secs(60),
            )?;
            let cdrs: Vec<_> = all
                .into_iter()
                .filter(|c| !warm_ids.contains(&c.text("call_id").unwrap_or_default()))
                .collect();
            let (ended, distinct) = crate::relay::ended_and_distinct(&cdrs);
            (cdrs.len() as u64, ended as u64, distinct as u64)
        }
    };
    let cpu_s = tree_cpu(pid) - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    uas.stop();
    drop(server);
    let rtt = rtt_file(&dir, "uac_users");
    let run = SideRun {
        side,
        round,
        placed: uac.created,
        ok: uac.successful,
        failed: uac.failed,
        records,
        ended,
        distinct,
        cpu_s,
        setup: Spread::of(read_rtt(&rtt).0),
        peak_pss_kib: peak.load(Ordering::Relaxed),
    };
    if !run.clean() {
        tmp.keep();
        println!(
            "   ({side} round {round} had failures; logs: {})",
            dir.display()
        );
    }
    Ok(run)
}

fn print_run(r: &SideRun) {
    println!(
        "{:<9} {:>5} {:>7} {:>7} {:>6} {:>8.3} {:>10.3} {:>7.1} {:>7.1} {:>8.1}{}",
        r.side,
        r.round,
        r.placed,
        r.ok,
        r.failed,
        if r.ok == 0 {
            0.0
        } else {
            r.records as f64 / r.ok as f64
        },
        r.cpu_per_k(),
        r.setup.p50,
        r.setup.p99,
        r.peak_pss_kib as f64 / 1024.0,
        if r.clean() { "" } else { "  (not clean)" }
    );
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let o = options(args)?;
    sipp::require()?;
    for (program, hint) in [
        (
            "kamailio",
            "apt-get install kamailio kamailio-sqlite-modules",
        ),
        ("kamcmd", "apt-get install kamailio"),
        ("sqlite3", "apt-get install sqlite3"),
        ("python3", "apt-get install python3"),
    ] {
        if !util::have_program(program, "-h") && !util::have_program(program, "--version") {
            bail!("`{program}` not found: {hint}");
        }
    }
    anchor_dir()?;
    println!("== bench --against kamailio: building the relay (release)");
    let bin_dir = util::build(&["relay"], true)?;
    println!(
        "== {} calls a side-run at {}/s, {} ms each, {} callers; Kamailio (1 UDP worker) and the relay alternating, {} round(s)",
        o.calls, o.rate, o.pause_ms, o.users, o.rounds
    );
    println!(
        "{:<9} {:>5} {:>7} {:>7} {:>6} {:>8} {:>10} {:>7} {:>7} {:>8}",
        "side",
        "round",
        "placed",
        "ok",
        "failed",
        "rec/call",
        "CPU-s/1k",
        "p50 ms",
        "p99 ms",
        "PSS MiB"
    );
    let mut runs = Vec::new();
    for round in 1..=o.rounds {
        for kamailio in [true, false] {
            let r = side_run(&o, &bin_dir, kamailio, round)?;
            print_run(&r);
            runs.push(r);
        }
    }
    // Only clean side-runs count: a server that failed calls did less work per call placed.
    let mean = |side: &str, clean_only: bool| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.side == side && (r.clean() || !clean_only))
            .map(SideRun::cpu_per_k)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    match (mean("kamailio", true), mean("relay", true)) {
        (Some(k), Some(r)) => println!(
            "\nCPU-s per 1,000 calls, mean of clean side-runs: Kamailio {k:.3}, relay {r:.3}; \
             relay / Kamailio = {:.2}",
            r / k
        ),
        (k, r) => {
            println!(
                "\nno clean ratio: clean side-runs: Kamailio {}, relay {}",
                if k.is_some() { "yes" } else { "none" },
                if r.is_some() { "yes" } else { "none" }
            );
            // Still say what the same run measured, marked for what it is.
            if let (Some(k), Some(r)) = (mean("kamailio", false), mean("relay", false)) {
                println!(
                    "CPU-s per 1,000 calls, mean of all side-runs (some failed calls): Kamailio \
                     {k:.3}, relay {r:.3}; relay / Kamailio = {:.2} (not a clean comparison)",
                    r / k
                );
            }
        }
    }
    let kamailio_failed = runs.iter().any(|r| r.side == "kamailio" && !r.clean());
    if kamailio_failed {
        println!("(Kamailio failed calls in a side-run at this rate: that run is left out)");
    }
    if !runs
        .iter()
        .filter(|r| r.side == "relay")
        .all(SideRun::clean)
    {
        bail!("a relay side-run had failed calls or not exactly one record per call");
    }
    Ok(())
}
