//! `cargo xtask demo`: a relay, two users and one call, told step by step.
//!
//! Needs only the Rust toolchain: builds `relay` and `client-agent`, starts the relay on a
//! free port of 127.0.0.1 with a SQLite database in a temporary directory, adds alice and
//! bob, registers bob (`client-agent … register --answer accept`), lets alice call bob for
//! 2 s (`client-agent … call bob --for 2s`), then shows `relay cdr list`.
//! Exit status 0 only if the call was established and ended and its record is there.
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::json;
use crate::relay::Relay;
use crate::util::{self, ChildGuard, Line, TempDir};

const DOMAIN: &str = "demo.sip-relay.test";
const ALICE_PW: &str = "alice-demo-pw";
const BOB_PW: &str = "bob-demo-pw";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        bail!("demo takes no arguments (got {a:?})");
    }
    step(1, "Build the relay and the client agent");
    let bin_dir = util::build(&["relay", "client-agent"], false)?;

    let mut tmp = TempDir::new("sip-relay-demo")?;
    let result = run_in(&bin_dir, &tmp);
    if result.is_err() {
        tmp.keep();
        eprintln!(
            "\nthe relay's log and the agents' logs are in {}",
            tmp.path.display()
        );
    }
    result
}

fn step(n: u32, text: &str) {
    println!("\n== Step {n}: {text}");
}

fn run_in(bin_dir: &std::path::Path, tmp: &TempDir) -> anyhow::Result<()> {
    let dir = &tmp.path;

    step(2, "Start the relay");
    let mut relay = Relay::start(bin_dir, dir, DOMAIN, "info")?;
    println!(
        "   relay serve --sip {} --domain {DOMAIN} --database-url {}",
        relay.addr(),
        relay.database_url
    );
    println!(
        "   The relay is listening on {} (UDP and TCP).",
        relay.addr()
    );

    step(3, "Create two accounts");
    relay.add_user("alice", ALICE_PW)?;
    relay.add_user("bob", BOB_PW)?;
    println!(
        "   relay user add alice / relay user add bob: both can now authenticate (digest, realm {DOMAIN})."
    );

    let (tx, rx) = mpsc::channel::<Line>();
    let agent = |user: &str, password: &str| -> Command {
        let mut cmd = Command::new(bin_dir.join("client-agent"));
        cmd.args([
            "--relay",
            &relay.addr(),
            "--user",
            user,
            "--password",
            password,
        ])
        .args(["--domain", DOMAIN, "--json"])
        .env_remove("CLIENT_RELAY")
        .env_remove("CLIENT_USER")
        .env_remove("CLIENT_PASSWORD");
        cmd
    };

    step(
        4,
        "bob registers and waits for calls (in the background, for up to 20 s)",
    );
    let mut bob_cmd = agent("bob", BOB_PW);
    bob_cmd
        .args(["register", "--answer", "accept", "--for", "20s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("bob.err"))?);
    let mut bob = ChildGuard::spawn("client-agent (bob)", &mut bob_cmd)?;
    // Ctrl-C: bob unregisters before leaving.
    bob.stop_signal = "INT";
    let bob_out = bob
        .child
        .stdout
        .take()
        .context("no stdout of bob's agent")?;
    util::forward_lines("bob", bob_out, tx.clone());
    let mut story = Story::default();
    let registered = util::wait_for_line(
        &rx,
        Duration::from_secs(15),
        |who, line| story.tell(who, line),
        |who, line| who == "bob" && event_name(line).as_deref() == Some("registered"),
    );
    if let Err(e) = registered {
        bail!(
            "bob did not register: {e:#}\n--- bob's agent (stderr) ---\n{}\n--- relay log ---\n{}",
            util::tail(&dir.join("bob.err"), 15),
            util::tail(&relay.log, 20)
        );
    }

    step(5, "alice calls bob; she hangs up after 2 s");
    let mut alice_cmd = agent("alice", ALICE_PW);
    alice_cmd
        .args(["call", "bob", "--for", "2s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("alice.err"))?);
    let mut alice = ChildGuard::spawn("client-agent (alice)", &mut alice_cmd)?;
    let alice_out = alice
        .child
        .stdout
        .take()
        .context("no stdout of alice's agent")?;
    util::forward_lines("alice", alice_out, tx.clone());
    drop(tx);

    // Tell both agents' events until alice's agent has finished (at most 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut alice_done = false;
    while !alice_done {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Line::Text(who, line)) => story.tell(&who, &line),
            Ok(Line::Eof(who)) => alice_done |= who == "alice",
            Err(_) => break,
        }
    }
    let alice_status = alice.wait_timeout(Duration::from_secs(5))?;
    // Events bob printed meanwhile (e.g. the remote BYE).
    std::thread::sleep(Duration::from_millis(300));
    while let Ok(Line::Text(who, line)) = rx.try_recv() {
        story.tell(&who, &line);
    }

    step(6, "The relay's call-detail records (relay cdr list)");
    let cdrs = relay.wait_cdrs(1, Duration::from_secs(10))?;
    print!("{}", indent(&relay.cdr_table()?));

    step(7, "Stop everything");
    bob.stop();
    while let Ok(Line::Text(who, line)) = rx.try_recv() {
        story.tell(&who, &line);
    }
    relay.guard.stop();
    println!("   bob's agent and the relay are stopped; the temporary database is removed.");

    let ended_cdr = cdrs.iter().any(|c| {
        c.text("state").as_deref() == Some("ended") && c.text("caller").as_deref() == Some("alice")
    });
    let mut problems = Vec::new();
    if !story.alice_established {
        problems.push("alice's call was not established".to_owned());
    }
    if !story.alice_ended {
        problems.push("alice's call did not end normally".to_owned());
    }
    if !alice_status.success() {
        problems.push(format!(
            "alice's agent exited with {}",
            util::describe_status(alice_status)
        ));
    }
    if !ended_cdr {
        problems.push(format!(
            "no `ended` call record for alice -> bob ({} records)",
            cdrs.len()
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{}\n--- alice's agent (stderr) ---\n{}\n--- bob's agent (stderr) ---\n{}\n--- relay log ---\n{}",
            problems.join("; "),
            util::tail(&dir.join("alice.err"), 15),
            util::tail(&dir.join("bob.err"), 15),
            util::tail(&relay.log, 25)
        );
    }
    println!(
        "\nDemo done: bob registered, alice called him, the call was established and ended, and the relay recorded it."
    );
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

fn event_name(line: &str) -> Option<String> {
    json::parse(line).ok()?.text("event")
}

/// Turns the agents' JSON events into sentences, remembering what alice saw.
#[derive(Default)]
struct Story {
    alice_established: bool,
    alice_ended: bool,
}

impl Story {
    fn tell(&mut self, who: &str, line: &str) {
        let Ok(v) = json::parse(line) else {
            println!("   {who:>5} | {line}");
            return;
        };
        let event = v.text("event").unwrap_or_default();
        let status = v
            .text("status")
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        let text = match event.as_str() {
            "registered" => format!(
                "registered as {} for {} s ({} binding(s)): calls to {who} now reach this agent",
                v.text("aor").unwrap_or_default(),
                v.text("expires").unwrap_or_default(),
                v.text("bindings").unwrap_or_default()
            ),
            "unregistered" => format!("unregistered {}", v.text("aor").unwrap_or_default()),
            "ringing" => format!("the relay found bob's phone; it is ringing{status}"),
            "established" => {
                if who == "alice" {
                    self.alice_established = true;
                }
                let call_id = v.text("call_id").unwrap_or_default();
                if who == "alice" {
                    format!("bob answered: the call is up{status}, Call-ID {call_id}")
                } else {
                    format!("answered the incoming call{status}: the call is up, Call-ID {call_id}")
                }
            }
            "ended" => {
                if who == "alice" {
                    self.alice_ended = true;
                }
                let reason = match v.text("reason").as_deref() {
                    Some("local-bye") => "hung up (sent BYE)".to_owned(),
                    Some("remote-bye") => "the other side hung up (received BYE)".to_owned(),
                    Some(other) => other.to_owned(),
                    None => "ended".to_owned(),
                };
                let duration = v
                    .get("duration_ms")
                    .and_then(|d| d.as_f64())
                    .map(|ms| format!(" after {:.1} s", ms / 1000.0))
                    .unwrap_or_default();
                format!("the call is over: {reason}{status}{duration}")
            }
            "failed" => format!(
                "{} failed: {}{status} {}",
                v.text("request").unwrap_or_default(),
                v.text("message").unwrap_or_default(),
                v.text("reason").unwrap_or_default()
            ),
            _ => format!("{event}: {line}"),
        };
        println!("   {who:>5} | {text}");
    }
}
