//! A throwaway PostgreSQL cluster for tasks outside the test suite (`cargo xtask interop`'s
//! relays on one database): starts one as the test suite does (as the `postgres` user when
//! run by root), creates a database, prints its URL as the first line of standard output, and
//! keeps the cluster until its standard input closes or it is killed; the cluster's directory
//! goes with it.

use std::io::{BufRead, Write};

fn main() -> anyhow::Result<()> {
    let cluster = tests::pg::PgCluster::start()?;
    let url = cluster.fresh_database()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{url}")?;
    out.flush()?;
    drop(out);
    let mut line = String::new();
    while std::io::stdin()
        .lock()
        .read_line(&mut line)
        .is_ok_and(|n| n > 0)
    {
        line.clear();
    }
    drop(cluster);
    Ok(())
}
