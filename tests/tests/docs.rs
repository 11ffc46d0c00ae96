//! The generated reference documents are current: `docs/configuration.md` and `docs/man/*.1`
//! are what the code gives (`cargo xtask docs` writes them). A flag, variable, default or doc
//! comment changed without running it fails here, naming the first line that differs.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace directory")
        .to_path_buf()
}

fn first_difference(have: &str, want: &str) -> String {
    for (i, (h, w)) in have.lines().zip(want.lines()).enumerate() {
        if h != w {
            return format!("line {}:\n  file: {h}\n  code: {w}", i + 1);
        }
    }
    format!(
        "the file has {} lines, the code gives {}",
        have.lines().count(),
        want.lines().count()
    )
}

#[test]
fn docs_are_current() -> anyhow::Result<()> {
    let docs = root().join("docs");
    let want = tests::docs::configuration_md()?;
    let have = std::fs::read_to_string(docs.join("configuration.md")).unwrap_or_default();
    assert!(
        have == want,
        "docs/configuration.md is stale: run `cargo xtask docs` ({})",
        first_difference(&have, &want)
    );
    let pages = tests::docs::man_pages()?;
    for (name, roff) in &pages {
        let have = std::fs::read(docs.join("man").join(name)).unwrap_or_default();
        assert!(
            &have == roff,
            "docs/man/{name} is stale or missing: run `cargo xtask docs` ({})",
            first_difference(
                &String::from_utf8_lossy(&have),
                &String::from_utf8_lossy(roff)
            )
        );
    }
    // No page of a command that is gone.
    for entry in std::fs::read_dir(docs.join("man"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        assert!(
            pages.iter().any(|(n, _)| *n == name),
            "docs/man/{name} belongs to no command: remove it (or run `cargo xtask docs` after \
             removing docs/man)"
        );
    }
    Ok(())
}

/// Every setting of the relay states a default and a meaning, and those that have a flag and a
/// variable are named as `relay serve --help` names them.
#[test]
fn the_reference_names_every_relay_setting() -> anyhow::Result<()> {
    let (settings, _) = tests::docs::relay_settings()?;
    for key in [
        "sip",
        "domain",
        "database_url",
        "log_format",
        "additional",
        "max_watch_secs",
    ] {
        assert!(settings.iter().any(|s| s.key == key), "{key} missing");
    }
    for s in &settings {
        assert!(!s.default.is_empty() && !s.meaning.is_empty(), "{s:?}");
        if let Some(flag) = &s.flag {
            assert_eq!(flag, &format!("--{}", s.key.replace('_', "-")));
            let env = s.env.as_deref().unwrap_or_default();
            assert_eq!(env, format!("RELAY_{}", s.key.to_uppercase()), "{s:?}");
        }
    }
    Ok(())
}
