//! RFC 3261 §17 transactions (with RFC 6026's Accepted state) as sans-I/O state machines.
//!
//! Nothing here reads a clock or touches a socket: the caller passes `now` into every `handle_*`
//! call, sends what `poll_transmit` returns, delivers what `poll_event` returns to its transaction
//! user, and calls `handle_timeout` when the instant from `poll_timeout` has passed.
//! Polling order after any `handle_*`: `poll_transmit` until `None`, then `poll_event` until
//! `None`, then `poll_timeout`.
//!
//! Timers that RFC 3261 sets to zero on reliable transports (D, I, J, K) are not armed there: the
//! transaction terminates at once, and `poll_transmit` still hands out whatever was queued before
//! (the ACK, or the final response).
//!
//! Requests from RFC 2543 peers (top Via without a `z9hG4bK` branch) have no [`TxKey::server`];
//! [`TxKey::server_2543`] builds their key from the other fields §17.2.3 names.

mod client;
mod server;
#[cfg(test)]
mod tests;

pub use client::{ClientEvent, ClientTransaction};
pub use server::{ServerEvent, ServerTransaction};

use crate::sip::message::{self, Headers, Method, Request, Response, Transport, Uri, Via};
use std::time::{Duration, Instant};

/// Timer values (RFC 3261 §17.1.1.1, Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate, 500 ms by default.
    pub t1: Duration,
    /// Longest retransmit interval for non-INVITE requests and INVITE responses, 4 s by default.
    pub t2: Duration,
    /// Longest time a message stays in the network, 5 s by default.
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl Timers {
    /// 64*T1: Timers B, F, H, J (and RFC 6026's L and M).
    pub fn t1x64(&self) -> Duration {
        self.t1.saturating_mul(64)
    }
}

/// Timer D on unreliable transports: "at least 32 s" (RFC 3261 Table 4), whatever T1 is.
pub const TIMER_D: Duration = Duration::from_secs(32);

/// Where a transaction stands (RFC 3261 §17 figures 5–8, plus RFC 6026's Accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// INVITE client: request sent, no response yet.
    Calling,
    /// Non-INVITE client (request sent, no response yet) and non-INVITE server (no response sent).
    Trying,
    /// A provisional response was received (client) or sent (server); a new INVITE server
    /// transaction starts here.
    Proceeding,
    /// A non-2xx final response (any final for non-INVITE) was received or sent.
    Completed,
    /// RFC 6026: a 2xx to an INVITE was received or sent.
    Accepted,
    /// INVITE server: the ACK to the non-2xx final response arrived.
    Confirmed,
    /// Over: the transaction can be dropped.
    Terminated,
}

/// What identifies a transaction (RFC 3261 §17.1.3 and §17.2.3): the top Via branch, the Via
/// sent-by (server side), and the method, where ACK matches INVITE and CANCEL has its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxKey {
    pub branch: String,
    /// `host:port` of the top Via for server transactions; empty for client transactions.
    pub sent_by: String,
    pub method: Method,
}

/// RFC 3261's magic cookie at the start of every compliant branch.
const MAGIC_COOKIE: &str = "z9hG4bK";

/// Prefix of the synthetic `branch` of an RFC 2543 key; it can never start a real RFC 3261 branch.
const RFC2543_PREFIX: &str = "rfc2543\n";

impl TxKey {
    /// Key of the server transaction a received request belongs to (ACK maps to INVITE).
    /// `None` when the top Via has no RFC 3261 branch (`z9hG4bK…`); see [`TxKey::server_2543`].
    pub fn server(req: &Request) -> Option<TxKey> {
        let via = message::top_via(&req.headers).ok()?;
        let branch = rfc3261_branch(&via)?;
        Some(TxKey {
            branch: branch.to_owned(),
            sent_by: sent_by(&via),
            method: invite_family(req.method),
        })
    }

    /// Key of the INVITE server transaction a CANCEL is for (same branch and sent-by, method INVITE).
    /// For a CANCEL from an RFC 2543 peer (no `z9hG4bK` branch) this is the
    /// [`TxKey::server_2543`] key of the INVITE it cancels (RFC 3261 §9.2: same fields, the
    /// method ignored).
    pub fn invite_for_cancel(cancel: &Request) -> Option<TxKey> {
        let via = message::top_via(&cancel.headers).ok()?;
        match rfc3261_branch(&via) {
            Some(branch) => Some(TxKey {
                branch: branch.to_owned(),
                sent_by: sent_by(&via),
                method: Method::Invite,
            }),
            None => key_2543(cancel, &via, Method::Invite),
        }
    }

    /// Key of the client transaction a received response belongs to.
    pub fn client(resp: &Response) -> Option<TxKey> {
        client_key(&resp.headers)
    }

    /// Key of a client transaction we send (the request carries our own top Via).
    pub fn client_for_request(req: &Request) -> Option<TxKey> {
        let via = message::top_via(&req.headers).ok()?;
        let branch = via.branch().filter(|b| !b.is_empty())?;
        Some(TxKey {
            branch: branch.to_owned(),
            sent_by: String::new(),
            method: req.method,
        })
    }

    /// Key of the server transaction a request from an RFC 2543 peer belongs to (RFC 3261
    /// §17.2.3): Request-URI, From tag, Call-ID, CSeq number and top Via (transport, sent-by and
    /// branch if any), with the method mapped as in [`TxKey::server`] (ACK → INVITE). The To tag
    /// is part of the key for every method except INVITE and ACK: an ACK carries the To tag of
    /// the response, not of the INVITE, so §17.2.3 matches it separately; leaving it out there
    /// lets an ACK (and a CANCEL, through [`TxKey::invite_for_cancel`]) find its INVITE.
    ///
    /// The fields are packed into `branch` behind a prefix no RFC 3261 branch can have, so these
    /// keys never collide with [`TxKey::server`] keys. `None` when the top Via, From, Call-ID or
    /// CSeq cannot be read.
    pub fn server_2543(req: &Request) -> Option<TxKey> {
        let via = message::top_via(&req.headers).ok()?;
        key_2543(req, &via, invite_family(req.method))
    }

    /// True for a key built by [`TxKey::server_2543`] (or the RFC 2543 case of
    /// [`TxKey::invite_for_cancel`]).
    pub fn is_rfc2543(&self) -> bool {
        self.branch.starts_with(RFC2543_PREFIX)
    }
}

/// ACK belongs to the INVITE transaction.
fn invite_family(method: Method) -> Method {
    match method {
        Method::Ack => Method::Invite,
        m => m,
    }
}

fn rfc3261_branch(via: &Via) -> Option<&str> {
    via.branch().filter(|b| b.starts_with(MAGIC_COOKIE))
}

/// `host:port` with the host lower-cased and the transport's default port filled in.
fn sent_by(via: &Via) -> String {
    let port = via.port.unwrap_or(match via.transport {
        Transport::Tls | Transport::Wss => 5061,
        Transport::Udp | Transport::Tcp | Transport::Sctp | Transport::Ws => 5060,
    });
    format!("{}:{}", via.host.to_ascii_lowercase(), port)
}

fn client_key(headers: &Headers) -> Option<TxKey> {
    let via = message::top_via(headers).ok()?;
    let branch = via.branch().filter(|b| !b.is_empty())?;
    let cseq = message::cseq(headers).ok()?;
    Some(TxKey {
        branch: branch.to_owned(),
        sent_by: String::new(),
        method: cseq.method,
    })
}

fn key_2543(req: &Request, via: &Via, method: Method) -> Option<TxKey> {
    let from_tag = message::name_addr_header(&req.headers, "From")
        .ok()?
        .tag()
        .map(str::to_owned);
    let call_id = first_header(&req.headers, "Call-ID")?;
    let seq = cseq_number(&req.headers)?;
    let to_tag = if matches!(method, Method::Invite) {
        None
    } else {
        message::name_addr_header(&req.headers, "To")
            .ok()
            .and_then(|to| to.tag().map(str::to_owned))
    };
    // Debug formatting escapes control characters, so `\n` separates fields unambiguously.
    let branch = format!(
        "{RFC2543_PREFIX}{}\n{:?}\n{:?}\n{}\n{:?}\n{:?}\n{:?}",
        uri_key(&req.uri),
        from_tag,
        call_id.trim(),
        seq,
        to_tag,
        via.transport,
        via.branch(),
    );
    Some(TxKey {
        branch,
        sent_by: sent_by(via),
        method,
    })
}

/// A comparable form of a Request-URI (host case-insensitive, everything else as written).
fn uri_key(uri: &Uri) -> String {
    format!(
        "{}|{:?}|{}|{:?}|{:?}|{:?}",
        uri.secure,
        uri.user,
        uri.host.to_ascii_lowercase(),
        uri.port,
        uri.params,
        uri.headers
    )
}

/// First value of a header (case-insensitive name).
pub(super) fn first_header<'a>(headers: &'a Headers, name: &'a str) -> Option<&'a str> {
    headers.get_all(name).next()
}

/// The sequence number of the CSeq header, read directly (`"<number> <method>"`).
pub(super) fn cseq_number(headers: &Headers) -> Option<u32> {
    first_header(headers, "CSeq")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How a response status is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Provisional,
    Success,
    Failure,
}

pub(super) fn classify(status: u16) -> Class {
    match status {
        0..=199 => Class::Provisional,
        200..=299 => Class::Success,
        _ => Class::Failure,
    }
}

/// A retransmission timer: next deadline and the interval that led to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Retransmit {
    pub(super) at: Instant,
    pub(super) interval: Duration,
}

impl Retransmit {
    pub(super) fn start(now: Instant, t1: Duration) -> Retransmit {
        Retransmit {
            at: now + t1,
            interval: t1,
        }
    }
    /// Re-arms after firing at `now` with the next interval (doubled, capped at `cap` if any).
    pub(super) fn next(self, now: Instant, cap: Option<Duration>) -> Retransmit {
        let doubled = self.interval.saturating_mul(2);
        let interval = match cap {
            Some(cap) => doubled.min(cap),
            None => doubled,
        };
        Retransmit {
            at: now + interval,
            interval,
        }
    }
}

/// Earliest of a set of optional deadlines.
pub(super) fn earliest(deadlines: &[Option<Instant>]) -> Option<Instant> {
    deadlines.iter().flatten().min().copied()
}
