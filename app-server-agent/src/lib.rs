//! # app-server-agent: runs beside a vendor's web service
//!
//! Registers the vendor's services with the relay, decides whether to accept each session the
//! relay relays, gives the client the service URL with a one-time token, and lets the web
//! service verify visitors (and end sessions) over a local HTTP API.
//!
//! Layout:
//! - [`cli`]: the command line (`run`) and its checks.
//! - [`agent`]: start-up, the SIP loop (INVITE, CANCEL, ACK, BYE, keepalives), stop.
//! - `registration`: REGISTER of each service with digest auth, refresh, un-REGISTER.
//! - `assertion`: verifies what the relay vouched for on an INVITE.
//! - `admission`: service list, capacity, decision webhook.
//! - `sessions`: live sessions and their tokens.
//! - `sdp`: the inactive SDP answer softphones need.
//! - `http_api`: introspect, close, sessions, health.
//! - [`output`]: human lines on standard output, or events on a channel.
//!
//! **Invariant:** talks SIP only through `proto` (the `ua` endpoint); the HTTP API and the
//! webhook client are the only HTTP code.
pub mod agent;
pub mod cli;
pub mod output;

mod admission;
mod assertion;
mod http_api;
mod registration;
mod sdp;
mod sessions;

pub use agent::{AgentHandle, Stopper, run, start, start_with};
pub use cli::{Cli, Command, RunArgs};
pub use output::{EndedBy, Event, Output};

/// What the agent calls itself in User-Agent and Server headers.
pub(crate) const USER_AGENT: &str =
    concat!("sip-relay app-server-agent/", env!("CARGO_PKG_VERSION"));

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
