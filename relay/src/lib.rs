//! # relay: SIP registrar and authenticating, record-routing stateful proxy
//!
//! Modules follow the sections of the relay server (SPEC feature 7):
//! - [`serve`]: binds the transport, opens the store, dispatches messages to transaction contexts.
//! - [`auth`]: user authentication (digest challenges, checks against the store).
//! - [`core`]: what the handlers share: transport, store, sessions, caches, the table of
//!   transaction contexts and tombstones.
//! - [`registrar`]: REGISTER (bindings in the store).
//! - [`location`]: the location service: bindings by address of record, and where each is
//!   reached.
//! - [`search`]: server search: operator rules, services and the servers that deliver them.
//! - [`proxy`]: request reception (the screen), the lookups before relaying (authentication,
//!   search, location, the signed assertion on service INVITEs), service inquiry and response
//!   relay as a state machine without I/O (forking first/sequential/all, CANCEL, Timer C, the
//!   release of a late 2xx), confirmation relay (ACK), and the one driver that runs them.
//! - [`identity`]: what the relay calls itself on the wire.
//! - [`session`]: session control: the dialog table, ACK→200-for-BYE timing, keepalive checks,
//!   maximum duration, restart recovery, call records.
//! - [`billing`]: billing control: rating a session's time by its service's tariff.
//! - [`ledger`]: application billing: the rules a charge passes before it counts, once per key.
//! - [`charging`]: the charge committer: every channel's charges in group commits.
//! - [`api`]: the gRPC billing endpoint (the only module that sees tonic).
//! - [`cache`]: the short-lived cache of accounts and bindings on the request path.
//! - [`node`]: this relay's lease of its node id among relays sharing a database.
//! - [`store`]: the only database code (SQLite or PostgreSQL through sqlx).
//! - [`config`], [`cmd`]: configuration and the command line.
pub mod api;
pub mod auth;
pub mod billing;
pub mod cache;
pub mod charging;
pub mod cluster;
pub mod cmd;
pub mod config;
pub mod core;
pub mod http;
pub mod identity;
pub mod ledger;
pub mod location;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod registrar;
pub mod search;
pub mod serve;
pub mod session;
pub mod store;
pub mod watch;
