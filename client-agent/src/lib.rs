//! # client-agent: the end user's SIP client
//!
//! Layout:
//! - [`cli`]: the command line (`register`, `call`).
//! - [`agent`]: the user agent: registration and calls through the relay, with digest
//!   authentication, on the `proto` stack.
//! - [`output`]: what the user sees: human lines, or one JSON object a line with `--json`.
pub mod agent;
pub mod cli;
pub mod output;
