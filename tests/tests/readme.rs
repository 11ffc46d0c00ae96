//! The README runs as written: its `sh` blocks, in order, in one shell, in an empty directory,
//! with the built programs, and print what the README says they do.
//!
//! Substituted, and nothing else: the SIP port 5060, the agent's HTTP port 8081 and the relay's gRPC port 50051 become free
//! ports, `$PWD/target/release` the directory of the programs this test suite built, and the
//! `cargo build` line goes (they are built). Not run: the README's first block (the demo and
//! this test suite) and blocks marked `<!-- README test: not run (…) -->` (package installs,
//! interop, benchmark, fuzzing). Every process the blocks start is stopped at the end, by
//! process group (the shell's own).

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SKIP_MARK: &str = "<!-- README test: not run";

/// A runnable block: its text and the line it starts on.
#[derive(Debug)]
struct Block {
    line: usize,
    text: String,
}

fn runnable_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut first = true;
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```sh" {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && lines[end].trim_end() != "```" {
            end += 1;
        }
        let marked = i > 0 && lines[i - 1].starts_with(SKIP_MARK);
        if !first && !marked {
            blocks.push(Block {
                line: start + 1,
                text: lines[start..end].join("\n"),
            });
        }
        first = false;
        i = end + 1;
    }
    blocks
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The output of each block, by the line it starts on.
fn outputs(transcript: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for line in transcript.lines() {
        if let Some(n) = line.strip_prefix("### README line ") {
            out.push((n.trim().parse().unwrap_or(0), String::new()));
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

#[test]
fn the_readme_runs_as_written() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("no workspace root"))?;
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let bins = tests::procs::bin("relay")?
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("no bin dir"))?;
    for name in ["client-agent", "app-server-agent"] {
        tests::procs::bin(name)?;
    }
    let blocks = runnable_blocks(&readme);
    anyhow::ensure!(blocks.len() >= 4, "too few runnable blocks: {blocks:#?}");
    let (sip, http, grpc) = (free_port(), free_port(), free_port());
    let mut script = String::from("set -euo pipefail\nexec 2>&1\n");
    for b in &blocks {
        let text = b
            .text
            .lines()
            .filter(|l| !l.starts_with("cargo build"))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("127.0.0.1:5060", &format!("127.0.0.1:{sip}"))
            .replace("127.0.0.1:8081", &format!("127.0.0.1:{http}"))
            .replace("127.0.0.1:50051", &format!("127.0.0.1:{grpc}"))
            .replace("$PWD/target/release", &bins.display().to_string());
        script.push_str(&format!("echo '### README line {}'\n{text}\n", b.line));
    }
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    for (key, _) in std::env::vars() {
        if ["RELAY_", "CLIENT_", "APP_AGENT_"]
            .iter()
            .any(|p| key.starts_with(p))
        {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd.spawn()?;
    let pgid = child.id();
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever is left of what the blocks started: the shell's process group.
    for signal in ["-TERM", "-KILL"] {
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = child.wait();
    let transcript = reader.join().unwrap_or_default();
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
    let status = status.ok_or_else(|| {
        anyhow::anyhow!("the README's blocks ran over 120 s:\n{transcript}\nrelay.log:\n{log}")
    })?;
    anyhow::ensure!(
        status.success(),
        "a README command failed ({status}):\n{transcript}\nrelay.log:\n{log}"
    );

    // What each block says it shows.
    let outputs = outputs(&transcript);
    let of = |needle: &str| -> String {
        blocks
            .iter()
            .find(|b| b.text.contains(needle))
            .and_then(|b| outputs.iter().find(|(line, _)| *line == b.line))
            .map(|(_, out)| out.clone())
            .unwrap_or_default()
    };
    let expect = |needle: &str, wanted: &[&str]| -> anyhow::Result<()> {
        let out = of(needle);
        for w in wanted {
            anyhow::ensure!(
                out.contains(w),
                "the block with {needle:?} did not print {w:?}:\n{out}\n\nwhole transcript:\n{transcript}"
            );
        }
        Ok(())
    };
    // Quick start: the accounts, bob's registration, alice's 5 s call and its record.
    expect(
        "call bob --for 5s",
        &[
            "added user \"alice\" (realm \"example.com\")",
            "registered sip:bob@example.com",
            "ended: local-bye (200) after 5.0",
            "\"caller\":\"alice\",\"callee\":\"bob\"",
            "\"state\":\"ended\"",
            "\"ended_by\":\"caller\"",
            "USER  SERVER",
        ],
    )?;
    // Service session: the URL with its token, the server registered, the statement.
    expect(
        "open wine",
        &[
            "session 1: wine by cellar: http://127.0.0.1:8080/?token=",
            "closed by you after 3.0",
            "Total EUR:",
        ],
    )?;
    let list = of("relay appserver list");
    anyhow::ensure!(
        list.lines()
            .any(|l| l.starts_with("cellar") && l.matches("wine").count() >= 2),
        "cellar is not listed as registered for wine:\n{list}"
    );
    // Application charges: recorded once though sent twice, on her bill, her statement and
    // the vendor's settlement (10 % fee).
    expect(
        "relay billing settlement --appserver cellar",
        &[
            "\"outcome\":\"recorded\"",
            "\"outcome\":\"duplicate\"",
            "item 2 x Riesling 2019: 25.00 EUR",
            "Riesling 2019",
            "items 25.00 EUR",
            "Settlement for cellar",
            "operator's fee 10 %",
        ],
    )?;
    // Service change: the client is told, the record keeps both segments.
    expect(
        "--change-after 2s",
        &[
            "session 1 changed: now wine (a crisp white)",
            "\"segments\":[{",
            "\"details\":\"a red\"",
            "\"details\":\"a crisp white\"",
        ],
    )?;
    // Rules: three added, listed, one removed.
    expect("relay rule remove 2", &["vino", "wine-test", "berlin"])?;
    // The operator's views.
    expect(
        "relay sessions",
        &["\"aor\":\"bob\"", "id,call_id,caller,callee", "DURATION"],
    )?;
    // The relay's log said what happened and the stop was a planned one.
    for line in [
        "Registered user=bob",
        "Session started",
        "Session ended",
        "duration_ms=",
        "Stopping",
    ] {
        anyhow::ensure!(log.contains(line), "relay.log lacks {line:?}:\n{log}");
    }
    Ok(())
}

#[test]
fn blocks_are_found_and_marked_ones_skipped() {
    let readme = "```sh\nfirst\n```\ntext\n```sh\na\nb\n```\n<!-- README test: not run (x) -->\n```sh\nskip\n```\n```toml\nno\n```\n```sh\nc\n```\n";
    let blocks = runnable_blocks(readme);
    let texts: Vec<&str> = blocks.iter().map(|b| b.text.as_str()).collect();
    assert_eq!(texts, ["a\nb", "c"]);
    assert_eq!(blocks[0].line, 6);
}
