//! # app-server-agent: runs beside a vendor's web service
//!
//! Registers the vendor's services with the relay, decides whether to accept each session the
//! relay relays, gives the client the service URL with a one-time token, and lets the web
//! service verify visitors (and end sessions) over a local HTTP API.
//!
//! Layout:
//! - [`cli`]: the command line (`run`) and its checks.
//! - [`agent`]: start-up, the SIP loop, the registrations' keepalives, stop.
//! - `core`: the state the SIP loop, session tasks and HTTP API share, and the handling of
//!   each SIP request (INVITE, CANCEL, ACK, BYE, in-dialog keepalives).
//! - `registration`: REGISTER of each service with digest auth, refresh, un-REGISTER.
//! - `assertion`: verifies what the relay vouched for on an INVITE.
//! - `admission`: service list, capacity, decision webhook.
//! - `sessions`: live sessions and their tokens.
//! - [`billing`]: charges from the web service to the relay's gRPC endpoint or the 200 OK for
//!   BYE, kept on disk until the relay answers (the only code that sees tonic).
//! - `http_api`: introspect, close, sessions, charges, health.
//! - [`output`]: human lines on standard output, or events on a channel.
//!
//! **Invariant:** talks SIP only through `proto` (the `ua` endpoint); the HTTP API and the
//! webhook client are the only HTTP code.
pub mod agent;
pub mod billing;
pub mod cli;
pub mod output;

mod admission;
mod assertion;
mod change;
mod core;
mod demo_shop;
mod http_api;
mod metrics;
mod registration;
mod sessions;
mod signals;

pub use agent::{AgentHandle, Stopper, run, start, start_with};
pub use cli::{Cli, Command, DemoShopArgs, RunArgs};
pub use output::{EndedBy, Event, Output};

/// What the agent calls itself in User-Agent and Server headers.
pub(crate) const USER_AGENT: &str =
    concat!("sip-relay app-server-agent/", env!("CARGO_PKG_VERSION"));

pub(crate) use proto::clock::now_unix;
