//! `cargo xtask fuzz [--minutes N] [--target T]`: the cargo-fuzz targets of `fuzz/` (libFuzzer,
//! on the nightly toolchain), each for N minutes, seeded with the RFC 4475 and RFC 5118
//! torture messages and with header and body samples. Every input that crashes or hangs a
//! target is copied into `fuzz/regressions/TARGET/`, which `cargo xtask test` replays on the
//! stable toolchain (`tests/tests/fuzz_regressions.rs`); commit it with its fix.
//!
//! Needs `cargo-fuzz` (`cargo install cargo-fuzz`) and a nightly toolchain (`rustup toolchain
//! install nightly`). CI stays on stable and does not fuzz.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::util;

const TARGETS: [&str; 4] = ["message", "digest", "service_bodies", "relay_datagram"];

/// Digest header values the way real clients write them (../shared/notes/real-clients.md).
const DIGEST_SEEDS: &[&str] = &[
    "Digest username=\"alice\", realm=\"example.com\", nonce=\"awL/oGsC/nT7cf0Ty869t/EgDLrdfTiz\", uri=\"sip:example.com\", response=\"0123456789abcdef0123456789abcdef\", cnonce=\"5efa41be1194bd69\", qop=auth, nc=00000001",
    "Digest realm=\"example.com\", nonce=\"awMAKWsC/v1toB8W+BzBcjy1Ci/3IM41\", username=\"alice\",  uri=\"sip:example.com\", response=\"0123456789abcdef0123456789abcdef\", cnonce=\"zSfygK7NPykKMxmX\", nc=00000001, qop=auth",
    "Digest username=\"service1\",realm=\"example.com\",cnonce=\"6b8b4567\",nc=00000001,qop=auth,uri=\"sip:127.0.0.1:25060\",nonce=\"abc\",response=\"0123456789abcdef0123456789abcdef\",algorithm=MD5",
    "Digest realm=\"example.com\", nonce=\"abc\", qop=\"auth\", algorithm=SHA-256, stale=true",
    "Digest realm=\"example.com\", nonce=\"abc\", qop=\"auth,auth-int\", algorithm=MD5, opaque=\"o\"",
];

/// Service bodies and headers.
const BODY_SEEDS: &[&str] = &[
    "{\"detail\":\"a red for tonight\",\"lang\":\"en\"}",
    "{\"url\":\"https://shop.example/wine?token=abc\",\"service\":\"wine\",\"session_id\":\"s1\",\"server\":\"cellar\"}",
    "amount=16;currency=EUR;duration-ms=2999;billed-secs=3;session=d2644979-774d-4593-ae04-75099b479eee",
    "eyJ1c2VyIjoiYWxpY2UifQ.c2lnbmF0dXJl",
];

struct Options {
    minutes: u64,
    targets: Vec<String>,
}

fn options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        minutes: 1,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
    };
    for (name, value) in util::parse_options(args, &["--minutes", "--target"])? {
        match name.as_str() {
            "--minutes" => o.minutes = util::parse_num(&name, &value)?,
            _ => {
                if !TARGETS.contains(&value.as_str()) {
                    bail!("--target: one of {}, not {value:?}", TARGETS.join(", "));
                }
                o.targets = vec![value];
            }
        }
    }
    if o.minutes == 0 {
        bail!("--minutes must be above 0");
    }
    Ok(o)
}

/// `cargo +nightly …` in the workspace root, without the stable toolchain's settings that
/// `cargo xtask` inherited.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(util::project_root());
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTDOC",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn require() -> anyhow::Result<()> {
    let ok = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "cargo-fuzz on the nightly toolchain is needed: rustup toolchain install nightly; \
             cargo install cargo-fuzz"
        );
    }
    Ok(())
}

/// Fills `fuzz/corpus/TARGET/` with the seeds (files already there stay: the corpus grows from
/// run to run).
fn seed(target: &str, corpus: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(corpus)?;
    let mut n = 0;
    let mut put = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        std::fs::write(corpus.join(format!("seed-{name}")), data)?;
        n += 1;
        Ok(())
    };
    match target {
        "message" | "relay_datagram" => {
            let shared = util::project_root()
                .join("..")
                .join("shared")
                .join("corpora");
            for set in ["rfc4475", "rfc5118"] {
                let Ok(entries) = std::fs::read_dir(shared.join(set)) else {
                    continue;
                };
                for e in entries.filter_map(Result::ok) {
                    let path = e.path();
                    if path.extension().is_some_and(|x| x == "md") {
                        continue;
                    }
                    let name = format!("{set}-{}", e.file_name().to_string_lossy());
                    put(&name, &std::fs::read(&path)?)?;
                }
            }
        }
        "digest" => {
            for (i, s) in DIGEST_SEEDS.iter().enumerate() {
                put(&i.to_string(), s.as_bytes())?;
            }
        }
        _ => {
            for (i, s) in BODY_SEEDS.iter().enumerate() {
                put(&i.to_string(), s.as_bytes())?;
            }
        }
    }
    Ok(n)
}

/// What one target's run reported.
struct Report {
    target: String,
    /// Wall time with the build.
    secs: f64,
    execs: Option<u64>,
    per_sec: Option<u64>,
    corpus: usize,
    findings: Vec<PathBuf>,
}

fn run_target(target: &str, minutes: u64) -> anyhow::Result<Report> {
    let root = util::project_root();
    let corpus = root.join("fuzz").join("corpus").join(target);
    let seeds = seed(target, &corpus)?;
    let artifacts = root.join("fuzz").join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let before: Vec<PathBuf> = list(&artifacts);
    println!("\n== fuzz {target}: {minutes} min, {seeds} seeds");
    let log = root.join("fuzz").join(format!("{target}.log"));
    let out = std::fs::File::create(&log)?;
    let started = Instant::now();
    let status = nightly_cargo()
        .args(["fuzz", "run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={}", minutes * 60))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("cannot start cargo fuzz")?;
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stat = |name: &str| {
        text.lines().rev().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
    };
    let execs = stat("stat::number_of_executed_units:");
    let per_sec = stat("stat::average_exec_per_sec:");
    let findings: Vec<PathBuf> = list(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if !status.success() && findings.is_empty() {
        bail!(
            "cargo fuzz run {target} failed ({status}) without a finding; see {}\n{}",
            log.display(),
            util::tail(&log, 20)
        );
    }
    let regressions = root.join("fuzz").join("regressions").join(target);
    std::fs::create_dir_all(&regressions)?;
    for f in &findings {
        if let Some(name) = f.file_name() {
            std::fs::copy(f, regressions.join(name))?;
        }
    }
    Ok(Report {
        target: target.to_string(),
        secs,
        execs,
        per_sec,
        corpus: list(&corpus).len(),
        findings,
    })
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let o = options(args)?;
    require()?;
    let mut reports = Vec::new();
    for t in &o.targets {
        reports.push(run_target(t, o.minutes)?);
    }
    println!("\n== fuzz summary");
    println!(
        "{:<16} {:>8} {:>14} {:>10} {:>8}  findings",
        "target", "wall-s", "executions", "exec/s", "corpus"
    );
    let mut found = 0;
    for r in &reports {
        let execs = r.execs.map_or("-".to_string(), |n| n.to_string());
        let rate = r.per_sec.map_or("-".to_string(), |n| n.to_string());
        println!(
            "{:<16} {:>8.0} {:>14} {:>10} {:>8}  {}",
            r.target,
            r.secs,
            execs,
            rate,
            r.corpus,
            r.findings.len()
        );
        for f in &r.findings {
            println!(
                "    {} (copied to fuzz/regressions/{}/)",
                f.display(),
                r.target
            );
        }
        found += r.findings.len();
    }
    if found > 0 {
        bail!("{found} input(s) crashed or hung a target: fix them, and commit fuzz/regressions/");
    }
    Ok(())
}
