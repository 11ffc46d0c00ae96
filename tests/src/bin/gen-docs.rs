//! Writes `docs/configuration.md` and `docs/man/*.1` from the code (`cargo xtask docs` runs it).
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no workspace directory"))?;
    tests::docs::write(root)?;
    println!(
        "wrote {}/docs/configuration.md and docs/man/",
        root.display()
    );
    Ok(())
}
