//! # relay: SIP registrar and authenticating, record-routing stateful proxy
//!
//! Modules follow the sections of the relay server (SPEC feature 7):
//! - [`serve`]: binds the transport, opens the store, dispatches messages to transaction contexts.
//! - [`auth`]: user authentication (digest challenges, checks against the store).
//! - [`registrar`]: REGISTER and the location service (bindings in the store).
//! - [`proxy`]: request relay, response relay, forking, CANCEL, loose routing.
//! - [`session`]: session control: the dialog table, ACK→200-for-BYE timing, call records.
//! - [`cache`]: the short-lived cache of accounts and bindings on the request path.
//! - [`store`]: the only database code (SQLite or PostgreSQL through sqlx).
//! - [`config`], [`cmd`]: configuration and the command line.
pub mod auth;
pub mod cache;
pub mod cmd;
pub mod config;
pub mod proxy;
pub mod registrar;
pub mod serve;
pub mod session;
pub mod store;
