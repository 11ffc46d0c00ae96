//! Runs `docker-compose.yml`'s services as local processes and checks the records (`cargo xtask
//! topology`, see `tests::topology`). Expects the three programs built beside it.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no workspace directory"))?;
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory of {}", exe.display()))?;
    tests::topology::run(&root.join("docker-compose.yml"), root, bin_dir)?;
    println!("topology: the client opened, bought and closed; records and statement as expected");
    Ok(())
}
