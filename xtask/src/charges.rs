//! `cargo xtask bench --charges`: application charges acknowledged durably over gRPC, on
//! SQLite and PostgreSQL. Builds the release relay and `charge-bench` (tests/src/bin) and runs
//! it on each store: charges per second per batch size, the p50/p99/max time to a call's
//! answer, the relay's CPU per 1,000 charges, and the check that the ledger holds each
//! acknowledged charge once. A benchmark: it reports, it asserts only that nothing was lost.
use std::process::Command;

use anyhow::bail;

use crate::util;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut stores = vec!["sqlite".to_string(), "postgres".to_string()];
    let mut pass: Vec<String> = Vec::new();
    for (name, value) in
        util::parse_options(args, &["--store", "--charges", "--batch", "--streams"])?
    {
        match name.as_str() {
            "--store" => {
                if value != "sqlite" && value != "postgres" {
                    bail!("--store: sqlite or postgres, not {value:?}");
                }
                stores = vec![value];
            }
            "--batch" => {
                for b in value.split(',').filter(|b| !b.trim().is_empty()) {
                    pass.extend(["--batch".to_string(), b.trim().to_string()]);
                }
            }
            _ => pass.extend([name, value]),
        }
    }
    let mut cmd = util::cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "relay",
        "--bin",
        "relay",
        "-p",
        "tests",
        "--bin",
        "charge-bench",
    ]);
    util::run_status(&mut cmd, "cargo build --release (relay, charge-bench)")?;
    let bin = util::target_dir().join("release").join("charge-bench");
    for store in stores {
        let mut cmd = Command::new(&bin);
        cmd.arg("--store").arg(&store).args(&pass);
        util::run_status(&mut cmd, &format!("charge-bench --store {store}"))?;
    }
    Ok(())
}
