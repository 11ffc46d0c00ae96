//! # client-agent: the end user's SIP client
//!
//! Layout:
//! - [`cli`]: the command line (`register`, `call`, `open`).
//! - [`agent`]: the user agent on the `proto` stack: registration, calls and service sessions
//!   through the relay, with digest authentication. `agent::open` is the `open` command: one
//!   INVITE to `sip:SERVICE@DOMAIN`, one session per application server that answers 2xx, kept
//!   until `--for`, Ctrl-C, `close`/`close N` on standard input or the server's BYE.
//! - [`session`]: service sessions without I/O: the request body, the access (URL) a 2xx gives,
//!   the words for a failed attempt, the relay's charge, the input commands.
//! - [`output`]: what the user sees: human lines, or one JSON object a line with `--json`;
//!   in-process callers ([`agent::run_with`], [`agent::run_with_input`]) get the events on a
//!   channel.
pub mod agent;
pub mod cli;
pub mod output;
pub mod session;
