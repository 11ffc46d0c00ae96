//! The SIP protocol engine. No I/O, no clock reads, no tokio: time comes in as an argument.
pub mod dialog;
pub mod digest;
pub mod message;
pub mod transaction;
