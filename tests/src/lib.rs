//! # tests: end-to-end tests of sip-relay
//!
//! - [`fuzz`]: the bodies of the fuzz targets, shared with the test that replays old findings.
//! - [`harness`]: a relay in-process on loopback (SQLite or PostgreSQL), client agents in-process,
//!   a raw SIP socket for hand-made messages.
//! - [`pg`]: a throwaway PostgreSQL 15 cluster for the tests.
//! - [`procs`]: the three programs as processes (relay, app-server-agent, client-agent), the way
//!   users run them.
//! - [`raw`]: hand-made SIP messages for a raw socket (REGISTER, INVITE, digest answers).
//!
//! The tests themselves are in `tests/tests/*.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
pub mod fuzz;
pub mod harness;
pub mod pg;
pub mod procs;
pub mod raw;
