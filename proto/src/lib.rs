//! # proto: the SIP stack and the wire contracts shared by the three programs
//!
//! Layers, bottom up:
//! - [`sip::message`]: parse, frame and serialise SIP messages (the only user of `rsip`).
//! - [`sip::digest`]: RFC 7616/8760 digest authentication with stateless HMAC nonces.
//! - [`sip::transaction`]: RFC 3261 §17 transactions as state machines driven by the caller's clock.
//! - [`sip::dialog`]: the dialog state a user agent keeps.
//! - [`transport`]: tokio UDP and TCP sockets; with [`ua`], the only code here that does I/O.
//! - [`ua`]: a user agent endpoint: client and server transactions driven over a transport.
//! - [`service`]: the service-session contracts: request and access bodies, the relay's signed
//!   assertion, the time-charge header.
//! - `grpc` (feature `grpc`): the gRPC contracts (generated from `proto/relay/v1/*.proto`);
//!   compiled only into a program that enables the feature.
//! - [`charge`]: the charge document application servers send on every channel, and the
//!   relay's results.
//! - [`clock`]: the wall clock (read only by drivers, never under [`sip`]) and UTC times as text.
//! - [`sync`]: a lock that survives a panicked holder.
//! - [`log`]: network text made safe for log lines.
//! - [`sdp`]: the inactive audio offer and answer softphones need.
//! - [`secret`]: passwords from a file, never from a command line.
pub mod charge;
pub mod cli;
pub mod clock;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod log;
pub mod program;
pub mod sdp;
pub mod secret;
pub mod service;
pub mod sip;
pub mod sync;
pub mod transport;
pub mod ua;
