//! `cargo xtask interop`: SIPp calls through the release relay.
//!
//! 1. `cargo build --release -p relay`; a relay on a free loopback port, SQLite in a temporary
//!    directory; users `caller` and `callee`.
//! 2. Per transport (UDP, then TCP): a SIPp UAS (tests/sipp/uas.xml) on a free port, registered
//!    as `callee` by tests/sipp/register.xml (digest auth; Contact with `;transport=tcp` for TCP);
//!    then tests/sipp/uac_auth.xml places N calls as `caller` to `sip:callee@DOMAIN`
//!    (INVITE → 407 → ACK → INVITE with Proxy-Authorization → 200 → ACK → pause → BYE → 200);
//!    then the UAS binding is removed (Expires 0).
//! 3. Checks: SIPp reports zero failed calls and N successful ones, and the relay's store
//!    holds exactly one record per successful call, all in state `ended`.
//! 4. Service sessions (`--services N`, default 50; 0 skips), over the first transport: service
//!    `wine` with a tariff, an `app-server-agent` (its debug build, which `cargo xtask test`
//!    builds too) registered for it as `vendor`, then tests/sipp/uac_service.xml opens N
//!    sessions as `caller` (INVITE sip:wine@DOMAIN with a service request, the same digest
//!    dance, 200 with the service access, ACK, pause, BYE). Each must leave one `ended` record
//!    naming the service and the server, billed and charged as the tariff says for its duration.
//!
//! 5. Softphones (`--softphone`): baresip calls over UDP and TCP and a service session; then
//!    baresip and linphone each accept the app-server-agent's change (re-INVITE, UPDATE),
//!    follow its REFER (`POST /sessions/{id}/refer`) through the relay (the records linked, the
//!    first ended `transferred`), are brought to bob by a watch's REFER (auto-redial), and
//!    follow a 302 between two relays on a throwaway PostgreSQL; last, a planned stop.
//!
//! On failure the temporary directory (relay log, SIPp error and message logs) is kept.
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::appagent;
use crate::http;
use crate::json;
use crate::linphone;
use crate::relay::{self, Relay};
use crate::sipp::{self, Uac, UacResult};
use crate::softphone::{self, Baresip, Phone, Program};
use crate::util::{self, TempDir};

pub(crate) const DOMAIN: &str = "sip-relay.test";
const CALLER_PW: &str = "caller-secret";
const CALLEE_PW: &str = "callee-secret";
const ALICE_PW: &str = "alice-secret";
const BOB_PW: &str = "bob-secret";
/// The application server of the softphone's service session.
const CELLAR: &str = "cellar";
const CELLAR_PW: &str = "cellar-secret";
/// The softphones that follow a change, a REFER, a watch and a 302.
const PHONES: [Program; 2] = [Program::Baresip, Program::Linphone];

struct Options {
    calls: u64,
    /// Service sessions (0: none).
    services: u64,
    rate: u64,
    pause_ms: u64,
    transports: Vec<String>,
    relay_log: String,
    /// Run the softphone phase (baresip and linphone).
    softphone: bool,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        calls: 200,
        services: 50,
        rate: 50,
        pause_ms: 500,
        transports: vec!["udp".into(), "tcp".into()],
        relay_log: "info".into(),
        softphone: true,
    };
    for (name, value) in util::parse_options(
        args,
        &[
            "--calls",
            "--services",
            "--rate",
            "--pause",
            "--transport",
            "--relay-log",
            "--softphone",
        ],
    )? {
        match name.as_str() {
            "--calls" => o.calls = util::parse_num(&name, &value)?,
            "--services" => o.services = util::parse_num(&name, &value)?,
            "--rate" => o.rate = util::parse_num(&name, &value)?,
            "--pause" => o.pause_ms = util::parse_num(&name, &value)?,
            "--relay-log" => o.relay_log = value,
            "--softphone" => {
                o.softphone = match value.as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => bail!("--softphone: yes or no, not {value:?}"),
                }
            }
            _ => {
                o.transports = match value.as_str() {
                    "udp" | "tcp" => vec![value],
                    "both" => vec!["udp".into(), "tcp".into()],
                    _ => bail!("--transport: udp, tcp or both, not {value:?}"),
                }
            }
        }
    }
    if o.calls == 0 || o.rate == 0 {
        bail!("--calls and --rate must be above 0");
    }
    Ok(o)
}

struct PhaseResult {
    transport: String,
    uac: UacResult,
    /// Records in the store after this phase (all phases so far).
    cdrs_total: usize,
    cdrs_ended: usize,
    /// Records this phase added.
    new_cdrs: usize,
    new_ended: usize,
    cdr_states: String,
    problems: Vec<String>,
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let o = options(args)?;
    sipp::require()?;
    let started = Instant::now();
    println!("== interop: building the relay (release)");
    let bin_dir = util::build(&["relay"], true)?;
    // The agent answers only a few sessions: its debug build, with the same packages as
    // `cargo xtask test` builds (so CI, which has just run the tests, compiles nothing more).
    if o.softphone {
        softphone::require()?;
        linphone::require()?;
    }
    let agent_dir = if o.services > 0 || o.softphone {
        println!("== interop: building app-server-agent (debug)");
        // With the test crate's pg-cluster (PostgreSQL for the redirect between two relays).
        Some(util::build(
            &["relay", "app-server-agent", "client-agent", "tests"],
            false,
        )?)
    } else {
        None
    };

    let mut tmp = TempDir::new("sip-relay-interop")?;
    let result = run_in(&o, &bin_dir, agent_dir.as_deref(), &tmp);
    if result.is_err() {
        tmp.keep();
        eprintln!(
            "logs (relay.log, SIPp *_errors.log / *_messages.log) are in {}",
            tmp.path.display()
        );
    }
    let (phases, relay_log) = result?;

    println!(
        "\n== interop summary ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<12} {:>6} {:>10} {:>7} {:>8} {:>6} {:>8}  result",
        "phase", "calls", "successful", "failed", "retrans", "CDRs", "ended"
    );
    let mut failed = false;
    for p in &phases {
        let ok = p.problems.is_empty();
        failed |= !ok;
        println!(
            "{:<12} {:>6} {:>10} {:>7} {:>8} {:>6} {:>8}  {}",
            p.transport,
            p.uac.created,
            p.uac.successful,
            p.uac.failed,
            p.uac.retransmissions,
            p.new_cdrs,
            p.new_ended,
            if ok {
                "ok".to_owned()
            } else {
                format!("FAILED ({})", p.cdr_states)
            }
        );
    }
    for p in &phases {
        for problem in &p.problems {
            println!("  {}: {problem}", p.transport);
        }
    }
    if failed {
        if let Some(log) = relay_log {
            println!("--- relay log (last lines) ---\n{log}");
        }
        tmp.keep();
        println!(
            "logs (relay.log, SIPp *_errors.log / *_messages.log) are in {}",
            tmp.path.display()
        );
        bail!("some calls failed or lack a call record (see above)");
    }
    if o.services > 0 {
        println!(
            "all calls and service sessions succeeded; exactly one `ended` record per call, \
             one `ended`, charged record per session"
        );
    } else {
        println!("all calls succeeded; exactly one `ended` record per call");
    }
    Ok(())
}

/// Runs the phases; stops after the first phase with problems. Also returns the relay log's
/// last lines when something failed.
fn run_in(
    o: &Options,
    bin_dir: &std::path::Path,
    agent_dir: Option<&std::path::Path>,
    tmp: &TempDir,
) -> anyhow::Result<(Vec<PhaseResult>, Option<String>)> {
    let dir = &tmp.path;
    let mut relay = Relay::start(bin_dir, dir, DOMAIN, &o.relay_log)?;
    println!(
        "== relay listening on {} (UDP+TCP), domain {DOMAIN}, database {}",
        relay.addr(),
        relay.database_url
    );
    relay.add_user("caller", CALLER_PW)?;
    relay.add_user("callee", CALLEE_PW)?;
    println!("== users caller and callee added");

    let mut phases = Vec::new();
    let mut ended_before = 0usize;
    let mut total_before = 0usize;
    for transport in &o.transports {
        let phase = run_phase(o, &mut relay, dir, transport, total_before, ended_before)?;
        total_before = phase.cdrs_total;
        ended_before = phase.cdrs_ended;
        let stop = !phase.problems.is_empty();
        phases.push(phase);
        if stop {
            return Ok((phases, Some(util::tail(&relay.log, 20))));
        }
    }
    if let Some(agent_dir) = agent_dir.filter(|_| o.softphone) {
        let phase = run_softphone_phase(&mut relay, agent_dir, dir, total_before)?;
        total_before = phase.cdrs_total;
        ended_before = phase.cdrs_ended;
        let stop = !phase.problems.is_empty();
        phases.push(phase);
        if stop {
            return Ok((phases, Some(util::tail(&relay.log, 20))));
        }
    }
    if let Some(agent_dir) = agent_dir.filter(|_| o.services > 0) {
        let transport = o.transports.first().map_or("udp", String::as_str);
        let phase = run_service_phase(
            o,
            &mut relay,
            agent_dir,
            dir,
            transport,
            total_before,
            ended_before,
        )?;
        let stop = !phase.problems.is_empty();
        phases.push(phase);
        if stop {
            return Ok((phases, Some(util::tail(&relay.log, 20))));
        }
    }
    Ok((phases, None))
}

fn run_phase(
    o: &Options,
    relay: &mut Relay,
    dir: &std::path::Path,
    transport: &str,
    total_before: usize,
    ended_before: usize,
) -> anyhow::Result<PhaseResult> {
    println!("\n== {}: SIPp UAS as callee", transport.to_uppercase());
    let (mut uas, uas_port) = sipp::start_registered_uas(
        dir,
        &relay.addr(),
        DOMAIN,
        transport,
        "callee",
        CALLEE_PW,
        true,
    )?;
    let contact = format!("sip:callee@127.0.0.1:{uas_port};transport={transport}");
    println!(
        "   registered {contact} over {} from its own socket (Expires 3600, digest auth)",
        transport.to_uppercase()
    );

    println!(
        "   SIPp UAC: {} calls as caller -> sip:callee@{DOMAIN}, {} calls/s, {} ms each, -t {}",
        o.calls,
        o.rate,
        o.pause_ms,
        sipp::transport_flag(transport)
    );
    let uac = sipp::run_uac(
        dir,
        &Uac {
            scenario: "uac_auth.xml",
            relay_addr: &relay.addr(),
            domain: DOMAIN,
            transport,
            caller: "caller",
            password: CALLER_PW,
            callee: "callee",
            calls: o.calls,
            rate: o.rate,
            pause_ms: o.pause_ms,
            trace_msg: true,
            trace_rtt: false,
            users: None,
            name: format!("uac-{transport}"),
        },
    )?;
    println!("   {}", uac.summary());

    let mut problems = Vec::new();
    if !uac.stats_found {
        problems.push("no SIPp statistics file".to_owned());
    }
    if !uac.exit_ok {
        problems.push(format!("SIPp UAC {} (some calls failed)", uac.exit));
    }
    if uac.failed > 0 {
        problems.push(format!(
            "{} failed calls (see {}/uac_auth_*_errors.log)",
            uac.failed,
            dir.display()
        ));
    }
    if uac.successful != o.calls {
        problems.push(format!(
            "{} successful calls of {}",
            uac.successful, o.calls
        ));
    }

    let expected_total = total_before + uac.successful as usize;
    let cdrs = relay.wait_cdrs(expected_total, Duration::from_secs(30))?;
    let cdrs_ended = cdrs
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .count();
    let cdr_states = relay::describe_states(&cdrs);
    println!("   relay records now: {} ({cdr_states})", cdrs.len());
    if cdrs.len() != expected_total {
        problems.push(format!(
            "relay has {} records, expected {expected_total} ({total_before} before + {} successful calls)",
            cdrs.len(),
            uac.successful
        ));
    }
    if cdrs_ended.saturating_sub(ended_before) != uac.successful as usize {
        problems.push(format!(
            "{} new records in state `ended`, expected {}",
            cdrs_ended.saturating_sub(ended_before),
            uac.successful
        ));
    }
    // Records of this phase that lack a duration (an `ended` call has one).
    let no_duration = cdrs
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended") && c.text("duration_ms").is_none())
        .count();
    if no_duration > 0 {
        problems.push(format!("{no_duration} `ended` records without duration_ms"));
    }

    // Remove the UAS binding so the next phase's UAS is the only contact.
    if let Err(e) = sipp::register(
        dir,
        &relay.addr(),
        DOMAIN,
        transport,
        "callee",
        CALLEE_PW,
        &contact,
        0,
    ) {
        problems.push(format!("un-REGISTER failed: {e:#}"));
    } else {
        println!("   unregistered {contact}");
    }
    uas.stop();
    relay.guard.check_running()?;

    Ok(PhaseResult {
        transport: transport.to_owned(),
        uac,
        cdrs_total: cdrs.len(),
        cdrs_ended,
        new_cdrs: cdrs.len().saturating_sub(total_before),
        new_ended: cdrs_ended.saturating_sub(ended_before),
        cdr_states,
        problems,
    })
}

/// Service sessions: an app-server-agent registered for `wine`, and uac_service.xml opening
/// `o.services` sessions as `caller` (INVITE sip:wine@DOMAIN with a service request, digest
/// auth, 200 with the service access, ACK, pause, BYE). Each must leave one `ended` record
/// naming the service and the server, with the charge the tariff gives for its duration.
fn run_service_phase(
    o: &Options,
    relay: &mut Relay,
    agent_dir: &std::path::Path,
    dir: &std::path::Path,
    transport: &str,
    total_before: usize,
    ended_before: usize,
) -> anyhow::Result<PhaseResult> {
    println!(
        "\n== services ({}): app-server-agent `vendor` for `wine`",
        transport.to_uppercase()
    );
    appagent::add_wine(relay)?;
    let mut agent = appagent::start_logged(
        agent_dir,
        dir,
        relay,
        &appagent::Spec {
            account: appagent::VENDOR,
            password: appagent::VENDOR_PW,
            services: &["wine"],
            url: "http://127.0.0.1:9/wine",
            http: None,
            transport,
        },
    )?;
    println!("   registered wine (1.20 EUR a minute, 0.10 EUR set-up, 1 s increments)");
    let rate = o.rate.min(o.services);
    println!(
        "   SIPp UAC: {} sessions as caller -> sip:wine@{DOMAIN}, {rate}/s, {} ms each, -t {}",
        o.services,
        o.pause_ms,
        sipp::transport_flag(transport)
    );
    let uac = sipp::run_uac(
        dir,
        &Uac {
            scenario: "uac_service.xml",
            relay_addr: &relay.addr(),
            domain: DOMAIN,
            transport,
            caller: "caller",
            password: CALLER_PW,
            callee: "wine",
            calls: o.services,
            rate,
            pause_ms: o.pause_ms,
            trace_msg: true,
            trace_rtt: false,
            users: None,
            name: format!("uac-service-{transport}"),
        },
    )?;
    println!("   {}", uac.summary());
    let mut problems = Vec::new();
    if !uac.stats_found {
        problems.push("no SIPp statistics file".to_owned());
    }
    if !uac.exit_ok || uac.failed > 0 {
        problems.push(format!(
            "SIPp UAC {}, {} failed sessions (see {}/uac_service_*_errors.log)",
            uac.exit,
            uac.failed,
            dir.display()
        ));
    }
    if uac.successful != o.services {
        problems.push(format!(
            "{} successful sessions of {}",
            uac.successful, o.services
        ));
    }

    let expected_total = total_before + uac.successful as usize;
    let cdrs = relay.wait_cdrs(expected_total, Duration::from_secs(30))?;
    let sessions: Vec<_> = cdrs
        .iter()
        .filter(|c| c.text("service").as_deref() == Some("wine"))
        .collect();
    let cdr_states = relay::describe_states(&cdrs);
    println!(
        "   relay records now: {} ({cdr_states}), {} of them `wine` sessions",
        cdrs.len(),
        sessions.len()
    );
    if cdrs.len() != expected_total || sessions.len() != uac.successful as usize {
        problems.push(format!(
            "relay has {} records ({} `wine` sessions), expected {expected_total} ({} sessions)",
            cdrs.len(),
            sessions.len(),
            uac.successful
        ));
    }
    let mut wrong = Vec::new();
    for c in &sessions {
        let num = |key: &str| c.get(key).and_then(json::Value::as_f64).map(|n| n as i64);
        let (duration, billed, charge) =
            (num("duration_ms"), num("billed_secs"), num("charge_minor"));
        let expected = duration.map(appagent::wine_charge);
        let ok = c.text("state").as_deref() == Some("ended")
            && c.text("service").as_deref() == Some("wine")
            && c.text("server").as_deref() == Some("vendor")
            && c.text("currency").as_deref() == Some("EUR")
            && expected.is_some()
            && expected == billed.zip(charge);
        if !ok {
            wrong.push(format!(
                "{} ({}, {duration:?} ms, billed {billed:?} s, charge {charge:?})",
                c.text("call_id").unwrap_or_default(),
                c.text("state").unwrap_or_default()
            ));
        }
    }
    if !wrong.is_empty() {
        problems.push(format!(
            "{} session records not ended with the right service, server and charge, e.g. {}",
            wrong.len(),
            wrong[..wrong.len().min(3)].join("; ")
        ));
    }
    agent.check_running()?;
    agent.stop();
    relay.guard.check_running()?;
    let cdrs_ended = cdrs
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .count();
    Ok(PhaseResult {
        transport: format!("{transport} services"),
        uac,
        cdrs_total: cdrs.len(),
        cdrs_ended,
        new_cdrs: cdrs.len().saturating_sub(total_before),
        new_ended: cdrs_ended.saturating_sub(ended_before),
        cdr_states,
        problems,
    })
}

/// The account of `user` (alice or bob; bob answers at once) at the relay, which is its
/// outbound proxy.
fn account<'a>(
    name: &'a str,
    user: &'static str,
    transport: &'static str,
    relay_addr: &'a str,
) -> Phone<'a> {
    Phone {
        name,
        user,
        password: if user == "alice" { ALICE_PW } else { BOB_PW },
        domain: DOMAIN,
        relay_addr,
        transport,
        auto_answer: user == "bob",
        sip_trace: user == "alice",
        outbound: true,
    }
}

/// baresip, as Debian ships it, against the relay with its default settings: alice calls bob
/// (both baresip, bob answering at once) over UDP and over TCP, holds the call 3 s and hangs up;
/// then alice opens service `tour` (tariff as `wine`) served by an app-server-agent, holds it
/// 2 s and hangs up. Each must leave one `ended` record; the session's charge must be the
/// tariff's and the one baresip was told in the 200 for its BYE. Last, a planned stop ends a
/// baresip call ([`planned_stop_with_baresip`]).
fn run_softphone_phase(
    relay: &mut Relay,
    agent_dir: &std::path::Path,
    dir: &std::path::Path,
    total_before: usize,
) -> anyhow::Result<PhaseResult> {
    println!(
        "\n== softphone: baresip (Debian's baresip-core) and linphone (linphone-cli), headless, \
         relay defaults"
    );
    relay.add_user("alice", ALICE_PW)?;
    relay.add_user("bob", BOB_PW)?;
    let started = Instant::now();
    let relay_addr = relay.addr();
    let relay_addr = relay_addr.as_str();
    let phone = |name, user, transport| account(name, user, transport, relay_addr);
    let mut problems = Vec::new();
    let mut done = 0u64;
    for transport in ["udp", "tcp"] {
        let result = (|| -> anyhow::Result<()> {
            let (bob_name, alice_name) = if transport == "udp" {
                ("bob-udp", "alice-udp")
            } else {
                ("bob-tcp", "alice-tcp")
            };
            let mut bob = Baresip::start(dir, &phone(bob_name, "bob", transport))?;
            let mut alice = Baresip::start(dir, &phone(alice_name, "alice", transport))?;
            println!(
                "   {}: alice and bob registered (baresip, MD5 digest)",
                transport.to_uppercase()
            );
            alice.call_and_hang_up(&format!("sip:bob@{DOMAIN}"), Duration::from_secs(3))?;
            bob.wait_for(&["terminated (duration"], Duration::from_secs(10))?;
            println!(
                "   {}: alice called bob, 3 s, hung up",
                transport.to_uppercase()
            );
            alice.quit();
            bob.quit();
            Ok(())
        })();
        match result {
            Ok(()) => done += 1,
            Err(e) => problems.push(format!("{transport} call: {e:#}")),
        }
    }
    // A service session from the softphone to an app-server-agent.
    let session = (|| -> anyhow::Result<(Option<i64>, Option<json::Value>)> {
        let mut cmd = relay.admin();
        cmd.args(["service", "add", "tour", "--per-minute", "120"])
            .args(["--setup-fee", "10", "--increment", "1", "--currency", "EUR"]);
        util::run_output(&mut cmd, "relay service add tour")?;
        let mut cmd = relay.admin();
        cmd.args(["appserver", "add", CELLAR, "--service", "tour"])
            .env("RELAY_PASSWORD", CELLAR_PW);
        util::run_output(&mut cmd, "relay appserver add")?;
        let mut agent = appagent::start_logged(
            agent_dir,
            dir,
            relay,
            &appagent::Spec {
                account: CELLAR,
                password: CELLAR_PW,
                services: &["tour"],
                url: "http://127.0.0.1:9/tour",
                http: None,
                transport: "udp",
            },
        )?;
        let mut alice = Baresip::start(dir, &phone("alice-service", "alice", "udp"))?;
        alice.call_and_hang_up(&format!("sip:tour@{DOMAIN}"), Duration::from_secs(2))?;
        // The charge the 200 for its BYE told it (baresip's SIP trace).
        let told = alice
            .output()
            .lines()
            .find_map(|l| l.trim().strip_prefix("Relay-Charge:").map(str::to_owned))
            .and_then(|v| {
                v.split(';')
                    .find_map(|p| p.trim().strip_prefix("amount=").map(str::to_owned))
            })
            .and_then(|a| a.parse::<i64>().ok());
        println!(
            "   alice opened tour (app-server-agent {CELLAR}), 2 s, hung up; told charge {told:?}"
        );
        alice.quit();
        agent.check_running()?;
        agent.stop();
        // Its record, before other tour sessions begin.
        let cdrs = relay.wait_cdrs(total_before + 3, Duration::from_secs(15))?;
        let record = cdrs
            .into_iter()
            .find(|c| c.text("service").as_deref() == Some("tour"));
        Ok((told, record))
    })();
    let (told, session) = match session {
        Ok(found) => {
            done += 1;
            found
        }
        Err(e) => {
            problems.push(format!("service session: {e:#}"));
            (None, None)
        }
    };
    // Records on the main relay so far: the two calls and the service session.
    let mut expected_new = done as usize;
    if let Err(e) = add_museum(relay) {
        problems.push(format!("service museum: {e:#}"));
    }
    for program in PHONES {
        let name = program.name();
        // The agent refers the phone to another service (REFER in the session): the phone
        // places the new session itself, through the relay, which links the records and ends
        // the first.
        let phone_name = format!("alice-refer-{name}");
        match phone_follows_a_refer(
            program,
            relay,
            agent_dir,
            dir,
            &account(&phone_name, "alice", "udp", relay_addr),
        ) {
            Ok(()) => {
                done += 1;
                expected_new += 2;
            }
            Err(e) => problems.push(format!("{name}: REFER followed: {e:#}")),
        }
        // Auto-redial: the phone dials bob with ;wait=30 before bob is registered; when he
        // is, the relay's REFER inside the watch call brings the phone to him (records: the
        // watch's and the call's).
        let phone_name = format!("alice-wait-{name}");
        match phone_waits_for_bob(
            program,
            relay,
            dir,
            &account(&phone_name, "alice", "udp", relay_addr),
        ) {
            Ok(()) => {
                done += 1;
                expected_new += 2;
            }
            Err(e) => problems.push(format!("{name}: auto-redial: {e:#}")),
        }
    }
    // A redirect between two relays of one database, which both phones follow on their own.
    match phones_follow_a_302(&PHONES, relay, agent_dir, dir) {
        Ok(()) => done += PHONES.len() as u64,
        Err(e) => problems.push(format!("302 followed: {e:#}")),
    }
    let expected_total = total_before + expected_new;
    // A planned stop of a relay of its own while baresip is in a call.
    match planned_stop_with_baresip(relay, dir) {
        Ok(()) => done += 1,
        Err(e) => problems.push(format!("planned stop: {e:#}")),
    }
    let cdrs = relay.wait_cdrs(expected_total, Duration::from_secs(15))?;
    let mine: Vec<_> = cdrs
        .iter()
        .filter(|c| c.text("caller").as_deref() == Some("alice"))
        .collect();
    let num =
        |c: &json::Value, key: &str| c.get(key).and_then(json::Value::as_f64).map(|n| n as i64);
    let calls = mine
        .iter()
        .filter(|c| {
            c.text("callee").as_deref() == Some("bob")
                && c.text("state").as_deref() == Some("ended")
                && num(c, "duration_ms").is_some_and(|d| d >= 2500)
        })
        .count();
    if calls != 2 {
        problems.push(format!(
            "{calls} ended records of alice calling bob for 3 s, expected 2 ({})",
            relay::describe_states(&cdrs)
        ));
    }
    match &session {
        Some(c) => {
            let charge = num(c, "charge_minor");
            let expected = num(c, "duration_ms").map(|d| appagent::wine_charge(d).1);
            let ok = c.text("state").as_deref() == Some("ended")
                && c.text("server").as_deref() == Some(CELLAR)
                && charge.is_some()
                && charge == expected
                && told == charge;
            if !ok {
                problems.push(format!(
                    "the tour session's record is not ended with server {CELLAR} and the charge \
                     the tariff gives and baresip was told: state {:?}, charge {charge:?}, \
                     expected {expected:?}, told {told:?}",
                    c.text("state")
                ));
            }
        }
        None => problems.push("no record of alice's tour session".to_owned()),
    }
    relay.guard.check_running()?;
    let cdrs_ended = cdrs
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended"))
        .count();
    Ok(PhaseResult {
        transport: "softphones".to_owned(),
        uac: UacResult {
            exit_ok: problems.is_empty(),
            exit: String::new(),
            created: 4 + 3 * PHONES.len() as u64,
            successful: done,
            failed: (4 + 3 * PHONES.len() as u64).saturating_sub(done),
            retransmissions: 0,
            elapsed: started.elapsed(),
            stats_found: true,
        },
        cdrs_total: cdrs.len(),
        cdrs_ended,
        new_cdrs: cdrs.len().saturating_sub(total_before),
        new_ended: mine
            .iter()
            .filter(|c| c.text("state").as_deref() == Some("ended"))
            .count(),
        cdr_states: relay::describe_states(&cdrs),
        problems,
    })
}

/// Adds service `museum` and gives it to the cellar's application server (once, before the
/// softphones are referred to it).
fn add_museum(relay: &Relay) -> anyhow::Result<()> {
    let mut cmd = relay.admin();
    cmd.args(["service", "add", "museum", "--per-minute", "60"])
        .args(["--increment", "1", "--currency", "EUR"]);
    util::run_output(&mut cmd, "relay service add museum")?;
    let mut cmd = relay.admin();
    cmd.args(["appserver", "update", CELLAR, "--add-service", "museum"]);
    util::run_output(&mut cmd, "relay appserver update")?;
    // The running relay sees the new right within its cache time (1 s).
    std::thread::sleep(Duration::from_millis(1100));
    Ok(())
}

/// A softphone in a session of `tour` at the cellar's agent. The agent's web service first
/// changes the session (`POST /sessions/{id}/change`: re-INVITE towards baresip, which has no
/// UPDATE; UPDATE towards linphone, which allows it), then refers it to `museum` (`POST
/// /sessions/{id}/refer`): the phone answers 202, places the referred INVITE through the relay
/// on its own (it copies the Refer-To URI, `;from-session=` included; linphone puts the tour
/// on hold first), the relay ends the tour session once the museum session is established
/// (reason `transferred`), and the records link the two.
fn phone_follows_a_refer(
    program: Program,
    relay: &Relay,
    agent_dir: &std::path::Path,
    dir: &std::path::Path,
    phone: &Phone<'_>,
) -> anyhow::Result<()> {
    let http_addr = format!("127.0.0.1:{}", util::free_port()?);
    // Its log in a directory of its own (one per softphone).
    let agent_dir_log = dir.join(format!("{}-agent", phone.name));
    std::fs::create_dir_all(&agent_dir_log)?;
    let mut agent = appagent::start_logged(
        agent_dir,
        &agent_dir_log,
        relay,
        &appagent::Spec {
            account: CELLAR,
            password: CELLAR_PW,
            services: &["tour", "museum"],
            url: "http://127.0.0.1:9/tour",
            http: Some(http_addr.clone()),
            transport: "udp",
        },
    )?;
    let mut alice = program.start(dir, phone)?;
    let tour = format!("sip:tour@{DOMAIN}");
    alice.dial(&tour)?;
    alice.wait_established(&tour, Duration::from_secs(10))?;
    let listed = http::get(&format!("http://{http_addr}/sessions"))?;
    let sid = match json::parse(&listed.body)? {
        json::Value::Array(a) => a.first().and_then(|s| s.text("sid")),
        _ => None,
    }
    .ok_or_else(|| anyhow::anyhow!("the agent lists no session: {}", listed.body))?;
    // The service request rides in a header; the body stays SDP.
    let method = match program {
        Program::Baresip => "INVITE",
        Program::Linphone => "UPDATE",
    };
    let changed = http::post_json(
        http_addr.parse()?,
        &format!("/sessions/{sid}/change"),
        r#"{"detail": "a guided tour"}"#,
    )?;
    if changed.status != 200 || !changed.body.contains(&format!("\"method\":\"{method}\"")) {
        anyhow::bail!(
            "the change was not accepted by {method}: {} {}",
            changed.status,
            changed.body
        );
    }
    println!(
        "   {}: the agent changed the tour session ({method} with SDP); accepted",
        program.name()
    );
    let answer = http::post_json(
        http_addr.parse()?,
        &format!("/sessions/{sid}/refer"),
        r#"{"service": "museum"}"#,
    )?;
    if answer.status != 202 {
        anyhow::bail!(
            "the REFER was not accepted: {} {}",
            answer.status,
            answer.body
        );
    }
    alice.wait_established("sip:museum@", Duration::from_secs(10))?;
    println!(
        "   {}: the agent referred it from tour to museum; it followed through the relay",
        program.name()
    );
    std::thread::sleep(Duration::from_secs(1));
    alice.hang_up()?;
    alice.quit();
    agent.check_running()?;
    agent.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let museum_of = |c: &json::Value| {
        c.text("service").as_deref() == Some("museum")
            && c.text("transferred_from").as_deref() == Some(sid.as_str())
    };
    let cdrs = loop {
        let cdrs = relay.cdrs()?;
        let museum_ended = cdrs
            .iter()
            .any(|c| museum_of(c) && c.text("state").as_deref() == Some("ended"));
        if museum_ended || Instant::now() > deadline {
            break cdrs;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let tour_record = cdrs.iter().rev().find(|c| {
        c.text("service").as_deref() == Some("tour")
            && c.text("id").as_deref() == Some(sid.as_str())
    });
    let museum = cdrs.iter().find(|c| museum_of(c));
    match (tour_record, museum) {
        (Some(t), Some(m))
            if t.text("reason").as_deref() == Some("transferred")
                && m.text("state").as_deref() == Some("ended")
                && t.text("details").as_deref() == Some("a guided tour") =>
        {
            println!(
                "   {}: records linked: museum continues tour, which ended \"transferred\"",
                program.name()
            );
            Ok(())
        }
        (t, m) => anyhow::bail!(
            "the records are not as expected: tour {:?} ({:?}, details {:?}), museum {:?} (from {:?})",
            t.and_then(|t| t.text("state")),
            t.and_then(|t| t.text("reason")),
            t.and_then(|t| t.text("details")),
            m.and_then(|m| m.text("state")),
            m.and_then(|m| m.text("transferred_from")),
        ),
    }
}

/// alice (a softphone that takes a REFER only inside a call) dials `sip:bob@DOMAIN;wait=30`
/// while bob is not registered: the relay answers 200 itself (the watch), and when bob (the
/// same program, answering at once) registers, the relay's REFER inside that call makes alice
/// call him through the relay.
fn phone_waits_for_bob(
    program: Program,
    relay: &Relay,
    dir: &std::path::Path,
    phone: &Phone<'_>,
) -> anyhow::Result<()> {
    let mut alice = program.start(dir, phone)?;
    let watched = format!("sip:bob@{DOMAIN};wait=30");
    alice.dial(&watched)?;
    alice.wait_established(&watched, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let relay_addr = relay.addr();
    let bob_name = format!("bob-late-{}", program.name());
    let mut bob = program.start(
        dir,
        &Phone {
            name: &bob_name,
            user: "bob",
            password: BOB_PW,
            domain: DOMAIN,
            relay_addr: &relay_addr,
            transport: "udp",
            auto_answer: true,
            sip_trace: false,
            outbound: true,
        },
    )?;
    bob.wait_established("sip:alice@", Duration::from_secs(15))?;
    alice.wait_established(&format!("sip:bob@{DOMAIN}"), Duration::from_secs(5))?;
    println!(
        "   {}: auto-redial: dialled bob;wait=30 before he was there; the relay's REFER brought the call when he registered",
        program.name()
    );
    std::thread::sleep(Duration::from_secs(1));
    alice.hang_up()?;
    bob.wait_calls_ended(1, Duration::from_secs(10))?;
    alice.quit();
    bob.quit();
    Ok(())
}

/// Two relays on one database: a knows b as an additional server (`RELAY_ADDITIONAL`) and a
/// redirect rule sends `tour` there. Each softphone, registered at a with a's address as its
/// domain, dials tour at a, gets 302 and follows it on its own (baresip straight to b with the
/// same Call-ID; linphone through a, its proxy, with a new Call-ID), authenticates again at b,
/// and the session runs through b: a keeps a `redirected` record per call, b the session's.
/// baresip hangs up itself; linphone's session is ended by the server (its BYE through b).
/// Then [`linphone_is_drained`] on the same two relays.
fn phones_follow_a_302(
    programs: &[Program],
    main: &Relay,
    agent_dir: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let rdir = dir.join("redirect");
    std::fs::create_dir_all(&rdir)?;
    let bin_dir = main
        .bin
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory of the relay binary"))?;
    // Several relays share PostgreSQL (one SQLite file serves one relay): a throwaway cluster.
    println!("   redirect: starting a PostgreSQL cluster for two relays (pg-cluster)");
    let mut pg_cmd = std::process::Command::new(agent_dir.join("pg-cluster"));
    pg_cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(rdir.join("pg-cluster.log"))?);
    let mut pg = util::ChildGuard::spawn("pg-cluster", &mut pg_cmd)?;
    let stdout = pg
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("pg-cluster has no standard output"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let db = rx
        .recv_timeout(Duration::from_secs(90))
        .unwrap_or_default()
        .trim()
        .to_string();
    if !db.starts_with("postgres://") {
        anyhow::bail!(
            "pg-cluster gave no database URL: {}",
            util::tail(&rdir.join("pg-cluster.log"), 20)
        );
    }
    let b = Relay::start_on(bin_dir, &rdir, "relay-b", &db, DOMAIN, "info", &[])?;
    let additional = format!("b=sip:{}", b.addr());
    let a = Relay::start_on(
        bin_dir,
        &rdir,
        "relay-a",
        &db,
        DOMAIN,
        "info",
        &[("RELAY_ADDITIONAL", additional.as_str())],
    )?;
    a.add_user("alice", ALICE_PW)?;
    let mut cmd = a.admin();
    cmd.args(["service", "add", "tour", "--per-minute", "120"])
        .args(["--setup-fee", "10", "--increment", "1", "--currency", "EUR"]);
    util::run_output(&mut cmd, "relay service add tour")?;
    let mut cmd = a.admin();
    cmd.args(["service", "add", "museum", "--per-minute", "60"])
        .args(["--increment", "1", "--currency", "EUR"]);
    util::run_output(&mut cmd, "relay service add museum")?;
    let mut cmd = a.admin();
    cmd.args([
        "appserver",
        "add",
        CELLAR,
        "--service",
        "tour",
        "--service",
        "museum",
    ])
    .env("RELAY_PASSWORD", CELLAR_PW);
    util::run_output(&mut cmd, "relay appserver add")?;
    let mut cmd = a.admin();
    cmd.args(["redirect", "add", "--to", "b", "--service", "tour"]);
    util::run_output(&mut cmd, "relay redirect add")?;
    let http_addr = format!("127.0.0.1:{}", util::free_port()?);
    let mut agent = appagent::start_logged(
        agent_dir,
        &rdir,
        &a,
        &appagent::Spec {
            account: CELLAR,
            password: CELLAR_PW,
            services: &["tour", "museum"],
            url: "http://127.0.0.1:9/tour",
            http: Some(http_addr.clone()),
            transport: "udp",
        },
    )?;
    let a_addr = a.addr();
    for (n, program) in programs.iter().enumerate() {
        let name = format!("alice-302-{}", program.name());
        let mut alice = program.start(
            &rdir,
            &Phone {
                name: &name,
                user: "alice",
                password: ALICE_PW,
                // baresip without an outbound proxy, so that it follows the 302 straight to b;
                // linphone always routes through its proxy, a.
                domain: match program {
                    Program::Baresip => &a_addr,
                    Program::Linphone => DOMAIN,
                },
                relay_addr: &a_addr,
                transport: "udp",
                auto_answer: false,
                sip_trace: true,
                outbound: false,
            },
        )?;
        alice.dial(&format!("sip:tour@{a_addr}"))?;
        alice.wait_established("sip:tour@", Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_secs(1));
        if *program == Program::Linphone {
            // The server ends this one: its BYE goes through b, which carries the session.
            let listed = http::get(&format!("http://{http_addr}/sessions"))?;
            let sid = match json::parse(&listed.body)? {
                json::Value::Array(a) => a.first().and_then(|s| s.text("sid")),
                _ => None,
            }
            .ok_or_else(|| anyhow::anyhow!("the agent lists no session: {}", listed.body))?;
            let closed = http::post_json(
                http_addr.parse()?,
                "/close",
                &format!(r#"{{"sid": "{sid}"}}"#),
            )?;
            if closed.status != 200 {
                anyhow::bail!(
                    "the agent did not close the session: {} {}",
                    closed.status,
                    closed.body
                );
            }
            alice.wait_calls_ended(1, Duration::from_secs(10))?;
        } else {
            alice.hang_up()?;
        }
        let trace = alice.output();
        alice.quit();
        if *program == Program::Baresip && !trace.contains("SIP/2.0 302") {
            anyhow::bail!("baresip saw no 302 from relay a");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cdrs = a.cdrs()?;
            let redirected = cdrs
                .iter()
                .filter(|c| c.text("reason").as_deref() == Some("redirected"))
                .count();
            let at_b = cdrs
                .iter()
                .filter(|c| {
                    c.text("service").as_deref() == Some("tour")
                        && c.text("state").as_deref() == Some("ended")
                        && c.text("owner").as_deref() == Some(b.addr().as_str())
                })
                .count();
            if redirected == n + 1 && at_b == n + 1 {
                println!(
                    "   {}: redirect: relay a answered 302 to relay b (same database); it \
                     followed, authenticated again, and the tour session ran through b",
                    program.name()
                );
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{}: expected {} redirected records at a and as many ended tour sessions at b: {}",
                    program.name(),
                    n + 1,
                    relay::describe_states(&cdrs)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    linphone_is_drained(&a, &b, &rdir)?;
    agent.check_running()?;
    agent.stop();
    Ok(())
}

/// `relay drain --to b --service museum` while linphone (registered at a, a its proxy) is in a
/// museum session carried by a: a sends it a REFER inside the session, linphone places the
/// session again through a, which passes it on to b, and a ends the first (`drained`);
/// linphone refuses the REFER outside a call that moves its registration (603), so it is
/// counted as one to be redirected. The command's report says so.
fn linphone_is_drained(a: &Relay, b: &Relay, dir: &std::path::Path) -> anyhow::Result<()> {
    let a_addr = a.addr();
    let mut alice = Program::Linphone.start(
        dir,
        &Phone {
            name: "alice-drain-linphone",
            user: "alice",
            password: ALICE_PW,
            domain: DOMAIN,
            relay_addr: &a_addr,
            transport: "udp",
            auto_answer: false,
            sip_trace: false,
            outbound: true,
        },
    )?;
    alice.dial(&format!("sip:museum@{DOMAIN}"))?;
    alice.wait_established("sip:museum@", Duration::from_secs(10))?;
    let additional = format!("b=sip:{}", b.addr());
    let mut cmd = a.admin();
    cmd.args(["drain", "--to", "b", "--service", "museum", "--wait", "20"])
        .env("RELAY_ADDITIONAL", &additional);
    let report = util::run_output(&mut cmd, "relay drain")?;
    let line = |prefix: &str| {
        report
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_owned()
    };
    let (moved, redirected, failed) =
        (line("moved:"), line("will be redirected:"), line("failed:"));
    if moved != "moved: 1"
        || !redirected.starts_with("will be redirected: 1 ")
        || failed != "failed: 0"
    {
        anyhow::bail!(
            "relay drain did not report 1 moved, 1 to be redirected, 0 failed:\n{report}"
        );
    }
    // The second museum session, at b.
    alice.wait_established(&format!("sip:museum@{}", b.addr()), Duration::from_secs(10))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cdrs = a.cdrs()?;
        let museum = |reason: &str| {
            cdrs.iter().any(|c| {
                c.text("service").as_deref() == Some("museum")
                    && c.text("reason").as_deref() == Some(reason)
            })
        };
        let at_b = cdrs.iter().any(|c| {
            c.text("service").as_deref() == Some("museum")
                && c.text("owner").as_deref() == Some(b.addr().as_str())
                && c.text("transferred_from").is_some()
        });
        if museum("drained") && at_b {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "expected a museum session ended `drained` at a and its continuation at b: {}",
                relay::describe_states(&cdrs)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    alice.hang_up()?;
    alice.quit();
    println!(
        "   linphone: drain: relay a's REFER moved its museum session to b (first ended \
         `drained`); it refused to move its registration (603), counted as to be redirected"
    );
    Ok(())
}

/// A relay of its own (`drain_secs` 2) gets SIGTERM while alice (baresip) is in a call with bob
/// (baresip): after the drain time both phones must see the relay's BYE and hang up, the relay
/// must exit 0, and the call's record must say the relay ended it (`relay-stop`) with the
/// duration up to then.
fn planned_stop_with_baresip(main: &Relay, dir: &std::path::Path) -> anyhow::Result<()> {
    let stop_dir = dir.join("planned-stop");
    std::fs::create_dir_all(&stop_dir)?;
    let bin_dir = main
        .bin
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory of the relay binary"))?;
    let mut relay = Relay::start_with_env(
        bin_dir,
        &stop_dir,
        DOMAIN,
        "info",
        &[("RELAY_DRAIN_SECS", "2")],
    )?;
    relay.add_user("alice", ALICE_PW)?;
    relay.add_user("bob", BOB_PW)?;
    let relay_addr = relay.addr();
    let phone = |name: &'static str, user: &'static str| Phone {
        name,
        user,
        password: if user == "alice" { ALICE_PW } else { BOB_PW },
        domain: DOMAIN,
        relay_addr: &relay_addr,
        transport: "udp",
        auto_answer: user == "bob",
        sip_trace: user == "alice",
        outbound: true,
    };
    let mut bob = Baresip::start(&stop_dir, &phone("bob-stop", "bob"))?;
    let mut alice = Baresip::start(&stop_dir, &phone("alice-stop", "alice"))?;
    let uri = format!("sip:bob@{DOMAIN}");
    alice.command(&format!("/dial {uri}"))?;
    alice.wait_for(
        &[&format!("Call established: {uri}")],
        Duration::from_secs(10),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Instant::now();
    util::run_status(
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(relay.guard.pid().to_string()),
        "kill -TERM relay",
    )?;
    alice.wait_for(&["terminated (duration"], Duration::from_secs(10))?;
    bob.wait_for(&["terminated (duration"], Duration::from_secs(10))?;
    let ended_after = stopped.elapsed();
    let status = relay.guard.wait_timeout(Duration::from_secs(10))?;
    if !status.success() {
        bail!("the relay exited with {}", util::describe_status(status));
    }
    if ended_after < Duration::from_millis(1500) {
        bail!("the call ended {ended_after:?} after SIGTERM, before the 2 s drain time");
    }
    let cdrs = relay.cdrs()?;
    let ok = cdrs.len() == 1
        && cdrs.iter().all(|c| {
            c.text("state").as_deref() == Some("ended")
                && c.text("ended_by").as_deref() == Some("relay")
                && c.text("reason").as_deref() == Some("relay-stop")
                && c.get("duration_ms")
                    .and_then(json::Value::as_f64)
                    .is_some_and(|d| d >= 2500.0)
        });
    if !ok {
        bail!(
            "expected one record ended by the relay (relay-stop) after at least 2.5 s: {}",
            relay::describe_states(&cdrs)
        );
    }
    println!(
        "   planned stop: SIGTERM during alice's call with bob; after the 2 s drain both \
         baresips hung up on the relay's BYE ({:.1} s), record relay-stop",
        ended_after.as_secs_f64()
    );
    alice.quit();
    bob.quit();
    Ok(())
}
