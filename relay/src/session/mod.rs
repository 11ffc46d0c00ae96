//! Session control (SPEC features 5 and 7): the table of dialogs the relay has seen answered,
//! their timing, their supervision, and their call-detail records.
//!
//! A session's billable time runs from the moment the relay relays the caller's ACK for the 2xx
//! to the moment it relays the 200 answering a BYE, measured on the monotonic clock and stored
//! with UTC wall-clock timestamps. Every attempt leaves one record: a failed INVITE a `failed`
//! record with its final status; an answered one an `established` record when the ACK passes,
//! closed (`ended`) when the BYE is answered, rated by the service's tariff in the same row and
//! statement ([`crate::billing`]).
//!
//! Supervision ([`supervise`]): the relay sends in-dialog OPTIONS to both parties every
//! `keepalive_secs`; a 408, a 481 or no answer means that party is gone, and the relay then
//! ends the session on both sides with BYE, billed up to the last moment both parties were
//! known to be there. A service's `max_duration` ends its sessions the same way. Requests the
//! relay inserts into a dialog take CSeq numbers the parties did not use; the relay shifts the
//! CSeq of later requests in that direction so each party still sees increasing numbers
//! (answers get their original CSeq back).
//!
//! Records are written by one writer task in group commits, so the request path never waits on
//! the database. What the relay needs to supervise a session is kept in its record, so after a
//! crash a restarted relay resumes the sessions whose parties still answer and closes the others
//! ([`Sessions::recover`]).
//!
//! This module must not parse SIP from the network or choose routes: the proxy tells it what
//! it relayed.

pub mod drain;
pub mod recovery;
pub mod segments;
pub mod supervise;
pub mod writer;

pub use segments::{ChangeRefused, Segment};
pub use writer::{Commit, Writer};

#[cfg(test)]
pub(crate) mod clock_tests;

use crate::billing::Tariff;
use crate::store::Cdr;
use proto::clock::now_ms;
use proto::log::Esc;
use proto::service::ChargeSummary;
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Method, Request};
use proto::sync::lock;
use proto::transport::{ConnId, Target};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Record changes waiting for the writer beyond which new calls are turned away (503) until the
/// store catches up: nothing already relayed is ever dropped for lack of room.
pub const MAX_QUEUED_RECORDS: usize = 100_000;

pub use crate::store::{CdrState, Party};

impl Party {
    fn index(self) -> usize {
        match self {
            Party::Caller => 0,
            _ => 1,
        }
    }

    fn other(self) -> Party {
        match self {
            Party::Caller => Party::Callee,
            _ => Party::Caller,
        }
    }
}

/// The service side of a service session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub tariff: Tariff,
    pub max_duration_secs: Option<i64>,
    pub details: Option<String>,
}

/// One party of a dialog, as the relay must address it to send it a request of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    /// The party's own From (caller) or To (callee) header value, with its tag.
    pub header: String,
    /// The party's Contact URI (the Request-URI of requests to it).
    pub contact: String,
    /// Where to send to it: `udp:IP:PORT` or `tcp:IP:PORT`.
    pub target: String,
}

/// What the relay keeps of a dialog to supervise and, if needed, end it (stored with the record
/// so a restarted relay can carry on).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DialogState {
    call_id: String,
    caller_tag: String,
    callee_tag: String,
    legs: [Leg; 2],
    /// Highest CSeq seen from [caller, callee].
    cseq: [u32; 2],
    /// Requests the relay inserted towards [caller, callee]: later requests to that party are
    /// shifted up by this much.
    shift: [u32; 2],
    /// The service and details in force (changed by an accepted service change).
    service: Option<ServiceInfo>,
    /// The segments before the running one (service changes), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    segments: Vec<Segment>,
    /// When the running segment began (UTC ms), after a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    segment_started_ms: Option<i64>,
}

#[derive(Debug)]
struct Session {
    cdr: Cdr,
    d: DialogState,
    answered: Instant,
    /// Where [caller, callee] are reached: where their messages came from (over TCP, the same
    /// connection). Never an address that only a Contact names.
    targets: [Option<Target>; 2],
    started: Option<Instant>,
    bye_from: Option<Party>,
    last_alive: [Instant; 2],
    next_ping: Option<Instant>,
    pinging: [bool; 2],
    deadline: Option<Instant>,
    /// The relay decided to end it (maximum duration): no further checks.
    ending: bool,
    /// When the first BYE was relayed (the end when that BYE is never answered 2xx).
    bye_at: Option<Instant>,
    /// Resumed after a restart: checked at once, marked resumed when both parties answer.
    resume_check: bool,
    /// A service change is being relayed (a second one meanwhile gets 491).
    changing: bool,
    /// The session (by id) this one replaces: ended by the relay when this one starts.
    end_first: Option<String>,
    /// `relay drain` sent the client a REFER: its NOTIFY of a 2xx ends this session.
    draining: bool,
}

/// The dialog table; its records go to the [`Writer`].
pub struct Sessions {
    by_call: Mutex<HashMap<String, Vec<Session>>>,
    writer: Writer,
    /// This relay's node id, the owner of the records it writes.
    node: String,
    /// This run of the relay: the records it keeps carry it.
    instance: String,
    /// Keeps the TCP connections of live dialogs open.
    transport: Arc<dyn ConnectionHolds>,
    /// The most a late 200 for BYE adds to the billed time.
    bye_limit: Duration,
    /// Number of dialogs in `by_call`, kept beside it (every INVITE asks, under load).
    count: AtomicUsize,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

/// What the relay vouched for on one branch of a service INVITE.
#[derive(Debug, Clone)]
pub struct BranchInfo {
    pub session_id: String,
    pub server: String,
}

/// What the proxy knows about an INVITE when it ends or is answered.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub call_id: String,
    pub caller: String,
    /// The called user, or the service.
    pub callee: String,
    pub created_at_ms: i64,
    pub service: Option<ServiceInfo>,
    /// The session this one continues (a transfer), if any.
    pub continues: Option<Continues>,
}

/// A new session that continues another of the same user (SPEC feature 9, transfer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continues {
    /// The first session's id.
    pub sid: String,
    /// The first session goes on; else the relay ends it (`transferred`) once this one is
    /// established.
    pub keep_first: bool,
}

/// A 2xx the proxy relayed: what it says about the new dialog.
#[derive(Debug, Clone)]
pub struct Answer {
    pub caller_tag: String,
    pub callee_tag: String,
    pub status: u16,
    /// The session id the relay vouched for on this branch (the record's id), if any.
    pub session_id: Option<String>,
    /// The application-server account of the branch.
    pub server: Option<String>,
    /// [caller, callee].
    pub legs: [Leg; 2],
    /// Where requests to [caller, callee] go: where each party's messages came from (a TCP
    /// party over its connection). In-dialog requests go there and nowhere else.
    pub targets: [Option<Target>; 2],
    /// The INVITE's CSeq.
    pub invite_cseq: u32,
}

/// Identifies a dialog in the table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogKey {
    pub call_id: String,
    pub caller_tag: String,
    pub callee_tag: String,
}

/// A request the relay sends on its own in a dialog, and where.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub request: Request,
    pub target: Target,
    pub to: Party,
}

/// Why the relay ended a session.
/// The session a transfer replaces, which ends once the new one is established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// Carried by this relay.
    Here(DialogKey),
    /// Not carried here (its record's id): another relay of the database may carry it.
    Elsewhere(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    MaxDuration,
    Gone(Party),
    RelayRestart,
    /// A planned stop's drain time ran out.
    RelayStop,
    /// Its user moved to another session (a transfer).
    Transferred,
    /// `relay drain` moved it to an additional server.
    Drained,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::MaxDuration => "max-duration",
            EndReason::Gone(Party::Caller) => "caller-gone",
            EndReason::Gone(_) => "callee-gone",
            EndReason::RelayRestart => "relay-restart",
            EndReason::RelayStop => "relay-stop",
            EndReason::Transferred => "transferred",
            EndReason::Drained => "drained",
        }
    }
}

/// `udp:IP:PORT` / `tcp:IP:PORT`, as a [`Leg`] stores where a party is reached.
pub fn target_string(t: &Target) -> String {
    format!("{}:{}", t.transport.as_str().to_ascii_lowercase(), t.addr)
}

/// What keeps the TCP connections of live dialogs open: the transport. The table tells it
/// which connections a dialog needs and when it no longer does; a dialog over UDP needs none.
pub trait ConnectionHolds: Send + Sync {
    fn pin(&self, conn: ConnId);
    fn unpin(&self, conn: ConnId);
}

/// A session ended by an answered BYE ([`Sessions::bye_answered`]).
#[derive(Debug)]
pub struct ByeEnd {
    /// Who sent the BYE.
    pub by: Party,
    /// The time charge of a service session.
    pub charge: Option<ChargeSummary>,
    /// Settles once the ended record is in the store.
    pub commit: Commit,
    /// The session id (its record's id).
    pub sid: String,
    /// The application server account of a service session.
    pub server: Option<String>,
}

/// How the dialog table and its writer are set up.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// This relay's node id, the owner of the records it writes.
    pub node: String,
    /// This run of the relay (it holds the node's lease).
    pub instance: String,
    /// The most a late 200 for BYE adds to a session's billed time.
    pub bye_limit: Duration,
}

impl Sessions {
    /// The table, handing its records to `writer`.
    pub fn new(
        writer: Writer,
        transport: Arc<dyn ConnectionHolds>,
        config: SessionsConfig,
    ) -> Sessions {
        Sessions {
            by_call: Mutex::new(HashMap::new()),
            writer,
            node: config.node,
            instance: config.instance,
            transport,
            bye_limit: config.bye_limit,
            count: AtomicUsize::new(0),
        }
    }

    fn save(&self, mut cdr: Cdr) {
        cdr.instance = Some(self.instance.clone());
        self.writer.save(cdr);
    }

    /// Hands a record to the writer; the [`Commit`] settles once it is in the store.
    fn save_durable(&self, mut cdr: Cdr) -> Commit {
        cdr.instance = Some(self.instance.clone());
        self.writer.save_durable(cdr)
    }

    /// Records handed to the writer and not yet written.
    pub fn queued(&self) -> usize {
        self.writer.queued()
    }

    /// Whether the writer is so far behind that new calls should wait.
    pub fn backlogged(&self) -> bool {
        self.writer.queued() >= MAX_QUEUED_RECORDS
    }

    /// Waits until every record handed to the writer so far is in the store.
    pub async fn flush(&self) {
        self.writer.flush().await;
    }

    /// Keeps (or stops keeping) the TCP connections a dialog reaches its parties over.
    fn hold_connections(&self, targets: &[Option<Target>; 2], hold: bool) {
        for conn in targets.iter().flatten().filter_map(|t| t.conn) {
            if hold {
                self.transport.pin(conn);
            } else {
                self.transport.unpin(conn);
            }
        }
    }

    /// An INVITE ended without a session: one `failed` record with its final status. When the
    /// answer came from a server the relay vouched for a session to (`offered`), the record
    /// carries that session id and server: the id the agent and its webhook saw.
    pub fn failed(
        &self,
        attempt: &Attempt,
        offered: Option<&BranchInfo>,
        status: u16,
        reason: &str,
    ) {
        let now = now_ms();
        let cdr = Cdr {
            id: offered.map_or_else(
                || uuid::Uuid::new_v4().to_string(),
                |o| o.session_id.clone(),
            ),
            server: offered.map(|o| o.server.clone()),
            call_id: attempt.call_id.clone(),
            caller: attempt.caller.clone(),
            callee: attempt.callee.clone(),
            created_at_ms: attempt.created_at_ms,
            ended_at_ms: Some(now),
            status: Some(i32::from(status)),
            reason: Some(reason.to_string()),
            state: CdrState::Failed,
            service: attempt.service.as_ref().map(|s| s.name.clone()),
            details: attempt.service.as_ref().and_then(|s| s.details.clone()),
            owner: Some(self.node.clone()),
            transferred_from: attempt.continues.as_ref().map(|c| c.sid.clone()),
            ..Cdr::default()
        };
        crate::metrics::METRICS.failed(status);
        span(&cdr).in_scope(|| {
            tracing::info!(
                session = %cdr.id,
                call_id = %Esc(&cdr.call_id),
                caller = %Esc(&cdr.caller),
                callee = %Esc(&cdr.callee),
                service = cdr.service.as_deref().unwrap_or("-"),
                server = cdr.server.as_deref().unwrap_or("-"),
                status,
                reason,
                "Attempt failed"
            );
        });
        self.save(cdr);
    }

    /// A 2xx to an INVITE was relayed: a dialog exists (one per distinct To tag).
    pub fn answered(&self, attempt: &Attempt, a: Answer, now: Instant) {
        let mut map = lock(&self.by_call);
        let list = map.entry(attempt.call_id.clone()).or_default();
        if list
            .iter()
            .any(|s| s.d.caller_tag == a.caller_tag && s.d.callee_tag == a.callee_tag)
        {
            return;
        }
        self.hold_connections(&a.targets, true);
        list.push(Session {
            cdr: Cdr {
                id: a
                    .session_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                call_id: attempt.call_id.clone(),
                caller: attempt.caller.clone(),
                callee: attempt.callee.clone(),
                created_at_ms: attempt.created_at_ms,
                status: Some(i32::from(a.status)),
                state: CdrState::Answered,
                service: attempt.service.as_ref().map(|s| s.name.clone()),
                server: a.server.clone(),
                details: attempt.service.as_ref().and_then(|s| s.details.clone()),
                currency: attempt.service.as_ref().map(|s| s.tariff.currency.clone()),
                owner: Some(self.node.clone()),
                transferred_from: attempt.continues.as_ref().map(|c| c.sid.clone()),
                ..Cdr::default()
            },
            d: DialogState {
                call_id: attempt.call_id.clone(),
                caller_tag: a.caller_tag,
                callee_tag: a.callee_tag,
                legs: a.legs,
                cseq: [a.invite_cseq, 0],
                shift: [0, 0],
                service: attempt.service.clone(),
                segments: Vec::new(),
                segment_started_ms: None,
            },
            answered: now,
            targets: a.targets,
            started: None,
            bye_from: None,
            last_alive: [now, now],
            next_ping: None,
            pinging: [false, false],
            deadline: None,
            ending: false,
            bye_at: None,
            resume_check: false,
            changing: false,
            draining: false,
            end_first: attempt
                .continues
                .as_ref()
                .filter(|c| !c.keep_first)
                .map(|c| c.sid.clone()),
        });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn with_session<R>(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        f: impl FnOnce(&mut Session) -> R,
    ) -> Option<R> {
        let mut map = lock(&self.by_call);
        map.get_mut(call_id)
            .and_then(|l| l.iter_mut().find(|s| s.matches(from_tag, to_tag)))
            .map(f)
    }

    /// Whether a request with these tags belongs to a dialog the relay knows.
    pub fn knows(&self, call_id: &str, from_tag: &str, to_tag: &str) -> bool {
        self.with_session(call_id, from_tag, to_tag, |_| ())
            .is_some()
    }

    /// Where an in-dialog request from the party with `from_tag` goes: to the other party,
    /// where that party's messages came from. Whatever its Request-URI or Route say, a request
    /// of a dialog reaches only the two parties that made it.
    pub fn route(&self, call_id: &str, from_tag: &str, to_tag: &str) -> Option<Target> {
        self.with_session(call_id, from_tag, to_tag, |s| {
            s.targets[s.party_of(from_tag).other().index()]
        })
        .flatten()
    }

    /// Who may charge in the dialog of a request: its session id, and its application server
    /// when the request is that server's (sent by the callee of a service session, from where
    /// the callee's messages come).
    pub fn charging(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        source: std::net::SocketAddr,
    ) -> Option<(String, Option<String>)> {
        self.with_session(call_id, from_tag, to_tag, |s| {
            let sender = s.party_of(from_tag);
            let from_callee = sender == Party::Callee
                && s.targets[sender.index()].is_some_and(|t| t.addr == source);
            (
                s.cdr.id.clone(),
                s.cdr.server.clone().filter(|_| from_callee),
            )
        })
    }

    /// The caller's ACK for the 2xx was relayed: the session starts now. Returns the session
    /// it replaces (a transfer without keeping the first), for the relay to end.
    pub fn acked(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        keepalive: Duration,
        now: Instant,
    ) -> Option<Replaced> {
        let writer = &self.writer;
        let first = self.with_session(call_id, from_tag, to_tag, |s| {
            if s.started.is_some() || s.cdr.state == CdrState::Ended {
                return None;
            }
            s.started = Some(now);
            s.last_alive = [now, now];
            s.next_ping = (!keepalive.is_zero()).then(|| now + keepalive);
            s.deadline = max_deadline(now, s.d.service.as_ref());
            let wall = now_ms();
            s.cdr.started_at_ms = Some(wall);
            s.cdr.last_alive_ms = Some(wall);
            s.cdr.state = CdrState::Established;
            s.cdr.dialog = serde_json::to_string(&s.d).ok();
            log_started(&s.cdr);
            // Queued under the table's lock, so a later state of the record is always queued
            // after this one.
            writer.save(s.cdr.clone());
            s.end_first.take()
        })??;
        // A transfer: the session this one replaces ends now, here or where it is carried.
        Some(match self.key_of(&first) {
            Some(key) => Replaced::Here(key),
            None => Replaced::Elsewhere(first),
        })
    }

    /// The dialog of the established session whose record is `id`, if this relay carries it.
    pub fn key_of(&self, id: &str) -> Option<DialogKey> {
        lock(&self.by_call)
            .values()
            .flatten()
            .find(|s| s.cdr.id == id && s.started.is_some())
            .map(Session::key)
    }

    /// An in-dialog request from one party is being relayed to the other: a sign of life of the
    /// sender; its CSeq is shifted past any request the relay inserted towards the receiver.
    pub fn in_dialog_request(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        req: &mut Request,
        now: Instant,
    ) {
        let Ok(cseq) = req.cseq() else { return };
        self.with_session(call_id, from_tag, to_tag, |s| {
            let sender = s.party_of(from_tag);
            let i = sender.index();
            s.last_alive[i] = now;
            if req.method != Method::Ack {
                s.d.cseq[i] = s.d.cseq[i].max(cseq.seq);
            }
            let shift = s.d.shift[sender.other().index()];
            if shift > 0 {
                let method = req.method.as_str().to_string();
                req.headers.set(
                    "CSeq",
                    format!("{} {method}", cseq.seq.saturating_add(shift)),
                );
            }
        });
    }

    /// A BYE is being relayed; `from_tag` says which side sent it. The caller's BYE ends the
    /// session when it is answered ([`Sessions::bye_answered`]). The application server's BYE
    /// ends it now: the record is closed at this moment and its charge is returned for the
    /// client's copy of the BYE, with the [`Commit`] to wait for before that copy goes out (so
    /// the charge a client is told is always the one stored).
    pub fn bye_relayed(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        now: Instant,
    ) -> Option<(Option<ChargeSummary>, Commit)> {
        let party = self.with_session(call_id, from_tag, to_tag, |s| {
            let party = s.party_of(from_tag);
            if s.bye_from.is_none() {
                s.bye_from = Some(party);
                s.bye_at = Some(now);
            }
            party
        })?;
        if party != Party::Callee {
            return None;
        }
        let mut s = self.remove(call_id, from_tag, to_tag)?;
        let was_established = s.started.is_some();
        let end = s.deadline.map_or(now, |d| now.min(d));
        let duration = s.started.map(|t| elapsed_ms(t, end)).unwrap_or(0);
        let reason = if was_established {
            "bye"
        } else {
            "bye-before-ack"
        };
        s.close(
            now_ms() - elapsed_ms(end, now),
            duration,
            Party::Callee,
            reason,
        );
        let charge = s.charge(duration, was_established);
        log_ended(&s.cdr);
        Some((charge, self.save_durable(s.cdr)))
    }

    /// The final response to the caller's BYE was relayed: whatever its status, the session
    /// ends (RFC 3261 §15). A 2xx ends it now, but never later than the BYE limit after the BYE
    /// was relayed (a party cannot stretch the bill by answering late); any other answer ends
    /// it when the BYE was relayed. Returns who sent the BYE, the charge, and the [`Commit`] to
    /// wait for before telling anyone that charge.
    pub fn bye_answered(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        status: u16,
        now: Instant,
    ) -> Option<ByeEnd> {
        let mut s = self.remove(call_id, from_tag, to_tag)?;
        let was_established = s.started.is_some();
        let bye_at = s.bye_at.unwrap_or(now);
        let end = if (200..300).contains(&status) {
            now.min(bye_at.checked_add(self.bye_limit).unwrap_or(now))
        } else {
            bye_at
        };
        let end = s.deadline.map_or(end, |d| end.min(d));
        let duration = s.started.map(|t| elapsed_ms(t, end)).unwrap_or(0);
        let by = s.bye_from.unwrap_or(Party::Caller);
        let reason = if (200..300).contains(&status) {
            if was_established {
                "bye"
            } else {
                "bye-before-ack"
            }
            .to_string()
        } else {
            format!("bye-{status}")
        };
        s.close(now_ms() - elapsed_ms(end, now), duration, by, &reason);
        let charge = s.charge(duration, was_established);
        log_ended(&s.cdr);
        let sid = s.cdr.id.clone();
        let server = s.cdr.server.clone();
        let commit = self.save_durable(s.cdr);
        Some(ByeEnd {
            by,
            charge,
            commit,
            sid,
            server,
        })
    }

    fn remove(&self, call_id: &str, from_tag: &str, to_tag: &str) -> Option<Session> {
        let mut map = lock(&self.by_call);
        let list = map.get_mut(call_id)?;
        let pos = list.iter().position(|s| s.matches(from_tag, to_tag))?;
        let s = list.swap_remove(pos);
        self.count.fetch_sub(1, Ordering::Relaxed);
        if list.is_empty() {
            map.remove(call_id);
        }
        drop(map);
        self.hold_connections(&s.targets, false);
        Some(s)
    }

    /// Ends answered sessions whose ACK never came within `grace` (the callee gives up after
    /// 64*T1 too, RFC 3261 §13.3.1.4): each gets a `failed` record with reason `no-ack`.
    pub fn sweep_unacknowledged(&self, grace: Duration, now: Instant) {
        let mut gone = Vec::new();
        {
            let mut map = lock(&self.by_call);
            map.retain(|_, list| {
                list.retain_mut(|s| {
                    let stale = s.started.is_none() && now.duration_since(s.answered) > grace;
                    if stale {
                        gone.push((std::mem::take(&mut s.cdr), s.targets));
                    }
                    !stale
                });
                !list.is_empty()
            });
            self.count.fetch_sub(gone.len(), Ordering::Relaxed);
        }
        for (mut cdr, targets) in gone {
            self.hold_connections(&targets, false);
            cdr.ended_at_ms = Some(now_ms());
            cdr.ended_by = Some(Party::Relay);
            cdr.reason = Some("no-ack".into());
            cdr.state = CdrState::Failed;
            log_ended(&cdr);
            self.save(cdr);
        }
    }

    /// Number of dialogs in the table.
    pub fn live(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// How many sessions are established now.
    pub fn established_count(&self) -> usize {
        lock(&self.by_call)
            .values()
            .flatten()
            .filter(|s| s.started.is_some())
            .count()
    }

    /// The keys of established sessions (for operators and tests).
    pub fn established(&self) -> Vec<DialogKey> {
        lock(&self.by_call)
            .values()
            .flatten()
            .filter(|s| s.started.is_some())
            .map(Session::key)
            .collect()
    }
}

/// The span of a session's lines in JSON logs: its id and Call-ID (none in text logs).
pub fn span(cdr: &Cdr) -> tracing::Span {
    if proto::log::spans() {
        tracing::info_span!("session", session_id = %cdr.id, call_id = %Esc(&cdr.call_id))
    } else {
        tracing::Span::none()
    }
}

/// The line every session start writes: who, what, which server.
fn log_started(cdr: &Cdr) {
    crate::metrics::METRICS.sessions_started.inc();
    let _span = span(cdr).entered();
    tracing::info!(
        session = %cdr.id,
        call_id = %Esc(&cdr.call_id),
        caller = %Esc(&cdr.caller),
        callee = %Esc(&cdr.callee),
        service = cdr.service.as_deref().unwrap_or("-"),
        server = cdr.server.as_deref().unwrap_or("-"),
        "Session started"
    );
}

/// The line every end of a session (or of an answered call never acknowledged) writes: who,
/// what, which server, how long, what it cost, why and who ended it.
fn log_ended(cdr: &Cdr) {
    let charge = match (cdr.charge_minor, cdr.currency.as_deref()) {
        (Some(m), Some(c)) => proto::service::format_money(m, c),
        _ => "-".to_string(),
    };
    crate::metrics::METRICS.ended(cdr.reason.as_deref().unwrap_or("-"));
    let _span = span(cdr).entered();
    tracing::info!(
        session = %cdr.id,
        call_id = %Esc(&cdr.call_id),
        caller = %Esc(&cdr.caller),
        callee = %Esc(&cdr.callee),
        service = cdr.service.as_deref().unwrap_or("-"),
        server = cdr.server.as_deref().unwrap_or("-"),
        duration_ms = cdr.duration_ms.unwrap_or(0),
        charge = %charge,
        reason = cdr.reason.as_deref().unwrap_or("-"),
        ended_by = cdr.ended_by.map_or("-", Party::as_str),
        "Session ended"
    );
}

/// When a session of this service must end, if it has a maximum duration (none if the sum
/// does not fit the clock).
fn max_deadline(started: Instant, service: Option<&ServiceInfo>) -> Option<Instant> {
    let secs = service?.max_duration_secs?;
    started.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

fn elapsed_ms(from: Instant, to: Instant) -> i64 {
    i64::try_from(to.saturating_duration_since(from).as_millis()).unwrap_or(i64::MAX)
}

/// Closes a record a previous run left open and that cannot be resumed: ended by the relay,
/// billed up to the last recorded sign of life.
fn close_at_last_sign(cdr: &mut Cdr, service: Option<&ServiceInfo>, now: i64) {
    let started = cdr.started_at_ms.unwrap_or(cdr.created_at_ms);
    let last = cdr.last_alive_ms.unwrap_or(started).max(started);
    let duration = last - started;
    cdr.ended_at_ms = Some(now);
    cdr.duration_ms = Some(duration);
    cdr.ended_by = Some(Party::Relay);
    cdr.reason = Some(EndReason::RelayRestart.as_str().into());
    cdr.state = CdrState::Ended;
    if let Some(sv) = service {
        let r = sv.tariff.rate(duration);
        cdr.charge_minor = Some(r.charge_minor);
        cdr.billed_secs = Some(r.billed_secs);
        cdr.currency = Some(sv.tariff.currency.clone());
    }
}

impl Session {
    fn matches(&self, from_tag: &str, to_tag: &str) -> bool {
        (self.d.caller_tag == from_tag && self.d.callee_tag == to_tag)
            || (self.d.caller_tag == to_tag && self.d.callee_tag == from_tag)
    }

    fn party_of(&self, from_tag: &str) -> Party {
        if from_tag == self.d.caller_tag {
            Party::Caller
        } else {
            Party::Callee
        }
    }

    fn key(&self) -> DialogKey {
        DialogKey {
            call_id: self.d.call_id.clone(),
            caller_tag: self.d.caller_tag.clone(),
            callee_tag: self.d.callee_tag.clone(),
        }
    }

    /// Ends the record: `duration` billed, `end` the wall-clock end.
    fn close(&mut self, end_ms: i64, duration: i64, by: Party, reason: &str) {
        self.cdr.ended_at_ms = Some(end_ms);
        self.cdr.duration_ms = Some(duration);
        self.cdr.ended_by = Some(by);
        self.cdr.reason = Some(reason.to_string());
        self.cdr.state = CdrState::Ended;
        self.cdr.dialog = None;
        if self.started.is_some() {
            if let Some(sv) = &self.d.service {
                let (all, r) = segments::rate(
                    &self.d.segments,
                    sv,
                    self.segment_start_ms(),
                    duration,
                    end_ms,
                );
                self.cdr.charge_minor = Some(r.charge_minor);
                self.cdr.billed_secs = Some(r.billed_secs);
                self.cdr.currency = Some(sv.tariff.currency.clone());
                self.cdr.segments = serde_json::to_string(&all).ok();
            }
        }
    }

    /// The time charge for `duration` (none for a plain call or a session never established).
    fn charge(&self, duration: i64, established: bool) -> Option<ChargeSummary> {
        let sv = self.d.service.as_ref()?;
        let r = if established {
            segments::rate(&self.d.segments, sv, self.segment_start_ms(), duration, 0).1
        } else {
            crate::billing::Rated {
                billed_secs: 0,
                charge_minor: 0,
            }
        };
        Some(ChargeSummary {
            amount_minor: r.charge_minor,
            currency: sv.tariff.currency.clone(),
            duration_ms: duration,
            billed_secs: r.billed_secs,
            session: self.cdr.id.clone(),
        })
    }

    /// A request of the relay's own to `to` in this dialog, as if from the other party, with
    /// the next CSeq that party has not used (the shift remembers it for later requests). Built
    /// from the dialog as that party's user agent would build it (proto's `Dialog`), sent
    /// straight to `to` (no route set: the relay is the only proxy on the path).
    fn own_request(&mut self, method: Method, to: Party, via: &str) -> Option<Outgoing> {
        let i = to.index();
        let from = to.other().index();
        let target = self.targets[i]?;
        let remote_target = message::Uri::parse(&self.d.legs[i].contact).ok()?;
        self.d.shift[i] = self.d.shift[i].saturating_add(1);
        let seq = self.d.cseq[from].saturating_add(self.d.shift[i]);
        let tags = [self.d.caller_tag.clone(), self.d.callee_tag.clone()];
        let mut dialog = Dialog {
            call_id: self.d.call_id.clone(),
            local_tag: tags[from].clone(),
            remote_tag: tags[i].clone(),
            local: self.d.legs[from].header.clone(),
            remote: self.d.legs[i].header.clone(),
            local_seq: seq.saturating_sub(1),
            remote_target,
            route_set: Vec::new(),
            local_contact: String::new(),
        };
        let mut request = dialog.request(method);
        request.headers.push_front("Via", via);
        Some(Outgoing {
            request,
            target,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_name_the_party() {
        assert_eq!(EndReason::Gone(Party::Caller).as_str(), "caller-gone");
        assert_eq!(EndReason::Gone(Party::Callee).as_str(), "callee-gone");
        assert_eq!(EndReason::MaxDuration.as_str(), "max-duration");
    }

    #[test]
    fn a_record_left_open_is_billed_to_its_last_sign_of_life() {
        let mut cdr = Cdr {
            created_at_ms: 1_000,
            started_at_ms: Some(2_000),
            last_alive_ms: Some(32_000),
            state: CdrState::Established,
            ..Cdr::default()
        };
        let sv = ServiceInfo {
            name: "wine".into(),
            tariff: Tariff {
                per_minute_minor: 60,
                setup_fee_minor: 5,
                increment_secs: 1,
                currency: "EUR".into(),
            },
            max_duration_secs: None,
            details: None,
        };
        close_at_last_sign(&mut cdr, Some(&sv), 999_000);
        assert_eq!(cdr.duration_ms, Some(30_000));
        assert_eq!(cdr.ended_at_ms, Some(999_000));
        assert_eq!(cdr.charge_minor, Some(35));
        assert_eq!(cdr.reason.as_deref(), Some("relay-restart"));
        assert_eq!(cdr.state, CdrState::Ended);
    }
}
