//! # tests: end-to-end tests of sip-relay
//!
//! - [`docs`]: the generated configuration reference and man pages (`cargo xtask docs`).
//! - [`fuzz`]: the bodies of the fuzz targets, shared with the test that replays old findings.
//! - [`harness`]: a relay in-process on loopback (SQLite or PostgreSQL), client agents in-process,
//!   a raw SIP socket for hand-made messages.
//! - [`pg`]: a throwaway PostgreSQL 15 cluster for the tests.
//! - [`procs`]: the three programs as processes (relay, app-server-agent, client-agent), the way
//!   users run them.
//! - [`topology`]: `docker-compose.yml`'s services as local processes (`cargo xtask topology`).
//! - [`raw`]: hand-made SIP messages for a raw socket (REGISTER, INVITE, digest answers).
//!
//! The tests themselves are in `tests/tests/*.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
pub mod docs;
pub mod fuzz;
pub mod harness;
pub mod pg;
pub mod procs;
pub mod raw;
pub mod topology;

/// Declares each named `async fn NAME(db: Db) -> anyhow::Result<()>` of the calling test file
/// as a test on SQLite (`sqlite::NAME`) and on PostgreSQL (`postgres::NAME`, skipped only where
/// `SIP_RELAY_SKIP_PG=1` is allowed).
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> { super::$name($crate::harness::Db::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                if $crate::pg::PgCluster::shared_or_skip().is_none() {
                    return Ok(());
                }
                super::$name($crate::harness::Db::Postgres).await
            })*
        }
    };
}
