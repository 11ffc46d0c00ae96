//! What the operator sees: one human line on standard output per event, or the events on a
//! channel for in-process callers.
//!
//! Never prints the password or a session's token (accepted sessions show the service URL
//! without its token).

use std::net::SocketAddr;
use tokio::sync::mpsc;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The other side sent BYE: the client, or the relay when it ends a session itself (then
    /// with a Reason).
    Client,
    /// The relay ended it (maximum duration, a vanished party, its own stop); `reason` says
    /// which.
    Relay,
    /// The web service closed it through the HTTP API (the agent sent BYE).
    WebService,
    /// No ACK came for the 200 OK within 64*T1 (the agent sent BYE).
    NoAck,
    /// The agent was stopping (it sent BYE).
    Shutdown,
    /// The agent's check found the dialog gone (408, 481 or no answer).
    Gone,
    /// The session's token expired (the agent sent BYE).
    Expired,
}

/// Something worth telling the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A REGISTER for a service is on its way.
    Registering {
        service: String,
        relay: SocketAddr,
        transport: String,
    },
    /// The first registration of a service could not be made yet; it is tried again.
    Waiting {
        service: String,
        message: String,
        retry_in_secs: u64,
    },
    /// A registration was refreshed; `recovered` when an earlier refresh had failed.
    Reregistered {
        service: String,
        expires: u32,
        recovered: bool,
    },
    /// The relay's assertions for this account stopped verifying: the relay no longer vouches
    /// for this agent (most likely the account's password was changed).
    Unvouched { message: String },
    /// A service is registered with the relay.
    Registered {
        service: String,
        relay: SocketAddr,
        expires: u32,
    },
    /// Refreshing a registration failed (it is retried).
    RegistrationFailed { service: String, message: String },
    /// A service's registration was removed at shutdown.
    Unregistered { service: String },
    /// The agent is serving.
    Listening {
        sip: SocketAddr,
        http: Option<SocketAddr>,
    },
    /// A session was accepted: the client got `url` with a token.
    Accepted {
        sid: String,
        user: String,
        service: String,
        url: String,
    },
    /// An INVITE was refused. `sid` is known once the relay's assertion verified.
    Refused {
        sid: Option<String>,
        call_id: String,
        status: u16,
        why: String,
    },
    /// The client cancelled while the agent was deciding.
    Cancelled { sid: String },
    /// The relay answered a charge: recorded, a duplicate of one recorded, or refused (with
    /// the reason).
    Charge {
        sid: String,
        key: String,
        outcome: String,
        message: Option<String>,
    },
    /// A session's service changed (asked by the client, or by the web service).
    Changed {
        sid: String,
        user: String,
        service: String,
        detail: Option<String>,
        by_client: bool,
    },
    /// A change of a session's service was refused (by the agent, the relay or the client).
    ChangeRefused {
        sid: String,
        status: u16,
        why: String,
    },
    /// The client reported on a REFER this agent sent (RFC 3515 NOTIFY): the status line of
    /// its new session's INVITE answer.
    Referred { sid: String, status: String },
    /// A session ended.
    Ended {
        sid: String,
        user: String,
        by: EndedBy,
        /// The BYE's Reason header text, if it had one (the relay gives `max-duration`,
        /// `caller-gone`, … when it ends a session itself).
        reason: Option<String>,
    },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Registering {
                service,
                relay,
                transport,
            } => write!(
                f,
                "registering {service} with the relay at {relay} over {transport} ..."
            ),
            Event::Waiting {
                service,
                message,
                retry_in_secs,
            } => write!(
                f,
                "{service} is not registered yet: {message}; trying again in {retry_in_secs} s"
            ),
            Event::Reregistered {
                service,
                expires,
                recovered: true,
            } => write!(
                f,
                "registration of {service} recovered (expires {expires} s)"
            ),
            Event::Reregistered {
                service, expires, ..
            } => write!(f, "re-registered {service} (expires {expires} s)"),
            Event::Unvouched { message } => write!(f, "{message}"),
            Event::Registered {
                service,
                relay,
                expires,
            } => write!(f, "registered {service} with {relay} (expires {expires} s)"),
            Event::RegistrationFailed { service, message } => {
                write!(f, "registration of {service} failed: {message} (retrying)")
            }
            Event::Unregistered { service } => write!(f, "unregistered {service}"),
            Event::Listening { sip, http } => match http {
                Some(h) => write!(f, "serving SIP on {sip}, HTTP API on http://{h}"),
                None => write!(f, "serving SIP on {sip}, no HTTP API (no --http)"),
            },
            Event::Accepted {
                sid,
                user,
                service,
                url,
            } => write!(f, "session {sid} for {user}: accepted, {url} ({service})"),
            Event::Refused {
                sid: Some(sid),
                status,
                why,
                ..
            } => write!(f, "session {sid} refused: {status} {why}"),
            Event::Refused {
                sid: None,
                call_id,
                status,
                why,
            } => write!(f, "INVITE (call {call_id}) refused: {status} {why}"),
            Event::Cancelled { sid } => write!(f, "session {sid} cancelled by the client"),
            Event::Charge {
                sid,
                key,
                outcome,
                message,
            } => match message {
                Some(m) => write!(f, "charge {key} of session {sid}: {outcome}: {m}"),
                None => write!(f, "charge {key} of session {sid}: {outcome}"),
            },
            Event::Changed {
                sid,
                user,
                service,
                detail,
                by_client,
            } => {
                let by = if *by_client {
                    "the client"
                } else {
                    "the web service"
                };
                write!(f, "session {sid} for {user} changed by {by}: now {service}")?;
                match detail {
                    Some(d) => write!(f, " ({d})"),
                    None => Ok(()),
                }
            }
            Event::Referred { sid, status } => {
                write!(
                    f,
                    "session {sid}: the client followed the referral: {status}"
                )
            }
            Event::ChangeRefused { sid, status, why } => {
                write!(f, "change of session {sid} refused: {status} {why}")
            }
            Event::Ended {
                sid,
                user,
                by,
                reason,
            } => {
                let how = match by {
                    EndedBy::Client => "ended by the client",
                    EndedBy::Relay => "ended by the relay",
                    EndedBy::WebService => "closed by the web service",
                    EndedBy::NoAck => "dropped: no ACK for the 200 OK",
                    EndedBy::Shutdown => "ended: the agent is stopping",
                    EndedBy::Gone => "ended: the relay or the client is gone",
                    EndedBy::Expired => "ended: its token expired",
                };
                write!(f, "session {sid} for {user} {how}")?;
                match reason {
                    Some(r) => write!(f, " (reason: {r})"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Where events go.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// In-process callers get the events here instead of standard output.
    pub sink: Option<mpsc::UnboundedSender<Event>>,
}

/// Counts what an event says happened (the agent's metrics).
fn count(event: &Event) {
    let m = &crate::metrics::METRICS;
    match event {
        Event::Accepted { .. } => m.accepted(),
        Event::Refused { status, .. } => m.refused(*status),
        Event::Ended { by, .. } => m.ended(match by {
            EndedBy::Client => "client",
            EndedBy::Relay => "relay",
            EndedBy::WebService => "web_service",
            EndedBy::NoAck => "no_ack",
            EndedBy::Shutdown => "shutdown",
            EndedBy::Gone => "gone",
            EndedBy::Expired => "expired",
        }),
        Event::Charge { outcome, .. } => m.charge(outcome),
        Event::Changed { .. } => m.changed(),
        Event::RegistrationFailed { .. } => m.registration_failed(),
        _ => {}
    }
}

impl Output {
    /// Events on a channel instead of standard output.
    pub fn channel() -> (Output, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Output { sink: Some(tx) }, rx)
    }

    pub fn emit(&self, event: Event) {
        count(&event);
        match &self.sink {
            Some(tx) => {
                let _ = tx.send(event);
            }
            None => {
                // A closed standard output loses the line, never the agent: no panic.
                use std::io::Write as _;
                let _ = writeln!(std::io::stdout().lock(), "{event}");
            }
        }
    }
}
