//! Every input that ever made a fuzz target crash or hang (`fuzz/regressions/TARGET/`), replayed
//! through the same target body on every test run: what was fixed stays fixed.

#[test]
fn inputs_that_once_crashed_or_hung_pass() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
        .join("regressions");
    let started = std::time::Instant::now();
    let ran = tests::fuzz::replay_all(&dir)?;
    eprintln!("{ran} inputs replayed in {:?}", started.elapsed());
    // Each must be quick too: a hang is a finding.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "replaying took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Seeds from the RFC 4475 torture tests and PROTOS go through every target once, so a target
/// that broke is noticed here and not only by the fuzzer.
#[test]
fn the_targets_take_the_seed_corpora() -> anyhow::Result<()> {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("shared")
        .join("corpora")
        .join("rfc4475");
    let Ok(entries) = std::fs::read_dir(&shared) else {
        eprintln!("no {}: skipped", shared.display());
        return Ok(());
    };
    let mut n = 0;
    for entry in entries.filter_map(Result::ok) {
        let data = std::fs::read(entry.path())?;
        for (_, body) in tests::fuzz::TARGETS {
            body(&data);
        }
        n += 1;
    }
    assert!(n > 0, "no seed in {}", shared.display());
    Ok(())
}
