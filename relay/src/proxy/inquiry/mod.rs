//! Service inquiry and response relay (RFC 3261 §16.6–§16.10) as a state machine without I/O.
//!
//! One [`Inquiry`] per received request, built like `proto::sip::transaction`: it owns the
//! server transaction of the request and the client transactions of every branch it forwards
//! (and of the CANCELs and BYEs it sends); the request's decision ([`Decision`], made before
//! from the store: who the caller is, where the request goes, which servers deliver the
//! service) is handed to [`Inquiry::start`]; responses, the caller's CANCEL, a planned stop and
//! timeouts go in with `now` (`handle_*`); transmissions, new transaction keys and events for
//! session control come out (`poll_*`). It never reads a clock, awaits, spawns or touches the
//! store or a socket: the driver in [`super`] runs it over the transport and session control,
//! and the tests in `clock_tests` run it on a virtual clock.
//!
//! What it decides: forking (`first` cancels the rest at the first 2xx, `sequential` tries one
//! server at a time with a ring timeout, `all` lets every 2xx become a session), Record-Route,
//! Via and Max-Forwards on each copy, Timer C, CANCEL (only once a branch answered
//! provisionally, §9.1), the best final response (§16.7), the release of a 2xx nobody wants
//! any more (ACK and BYE from the relay, so the client never sees or pays for it), and the CSeq
//! an in-dialog answer gets back.

use super::decision::{Action, Decision, Forward, Kind};
use crate::identity::Identity;
use crate::session::{Answer, Attempt, BranchInfo, Leg};
use crate::store::Fork;
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Message, Method, NameAddr, Request, Response};
use proto::sip::transaction::{
    ClientEvent, ClientTransaction, ServerTransaction, State, Timers, TxKey,
};
use proto::transport::{Target, response_target};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Proxy Timer C (RFC 3261 §16.6 step 11): an INVITE branch with a provisional answer is
/// cancelled after this long without a final one.
pub const TIMER_C: Duration = Duration::from_secs(180);

/// Reason phrase of the 503 a stopping relay gives new and still-ringing INVITEs.
pub const STOPPING: &str = proto::service::STOPPING_REASON;
/// Its Retry-After, in seconds.
pub const STOPPING_RETRY_AFTER: &str = "30";

/// What an inquiry needs to know of the relay; fixed while it serves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub timers: Timers,
    /// `--fork sequential`: how long one server rings before the next is tried; with `all`, the
    /// window the others get to join after the first 2xx.
    pub sequential_timeout: Duration,
    /// The relay's realm: credentials for it are consumed, not passed on.
    pub realm: String,
    pub identity: Identity,
}

/// A message to send.
#[derive(Debug)]
pub struct Transmit {
    pub target: Target,
    pub msg: Message,
    /// Which transaction sent it: a send error goes back to it ([`Inquiry::handle_send_error`]).
    pub origin: Origin,
}

/// Which of the inquiry's transactions a transmission comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The server transaction, or no transaction (an ACK, a 2xx past the server transaction).
    Server,
    /// The client transaction of branch N.
    Branch(usize),
    /// The relay's own request N (a CANCEL, the BYE of a released 2xx).
    Own(usize),
}

/// What session control (and the refusal log) must hear.
#[derive(Debug)]
pub enum Event {
    /// The attempt ended without a session: its `failed` record.
    Failed {
        attempt: Attempt,
        offered: Option<BranchInfo>,
        status: u16,
        reason: &'static str,
    },
    /// A 2xx to the INVITE goes up: a dialog exists.
    Answered {
        attempt: Attempt,
        answer: Box<Answer>,
        at: Instant,
    },
    /// The BYE got its final answer: the session ends. With `held`, the answer is a 2xx that
    /// waits to be given back ([`Inquiry::send_held`]) with the charge, once its record is
    /// committed.
    ByeAnswered {
        call_id: String,
        from_tag: String,
        to_tag: String,
        status: u16,
        at: Instant,
        held: Option<Box<Response>>,
    },
    /// A service change got its final answer: with a 2xx the session runs under `service`
    /// from `at`; any answer ends the change.
    ChangeAnswered {
        key: crate::session::DialogKey,
        service: Box<crate::session::ServiceInfo>,
        status: u16,
        at: Instant,
    },
    /// A final answer given here to a request outside an attempt (for the refusal log).
    Refused(Box<Response>),
}

/// Why a branch is being cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelWhy {
    /// The caller cancelled, another branch won, or the relay is stopping.
    Unwanted,
    /// `sequential`/`all`: it rang longer than the ring timeout: its 487 counts as a timeout.
    RingTimeout,
}

/// Where a branch stands.
#[derive(Debug)]
enum Phase {
    /// Waiting for its final answer.
    Calling,
    /// Cancelled while waiting: the CANCEL waits for a provisional (§9.1) until `sent`.
    Cancelling { why: CancelWhy, sent: bool },
    /// A 2xx came and went up (or became a session with `all`).
    Accepted,
    /// A 2xx nobody wanted: the relay ended that dialog itself with this ACK (sent again for
    /// the server's retransmissions of the 2xx) and a BYE.
    Released(Box<Request>),
    /// A final non-2xx, a timeout or a transport error.
    Failed,
    /// Silent until its ring timeout (`sequential`): counted as a 408 and the next server
    /// tried, while its INVITE is still out. A CANCEL wanted later (`Some(false)`) waits for its
    /// first provisional answer and then goes (`Some(true)`).
    GivenUp { cancel: Option<bool> },
}

#[derive(Debug)]
struct Branch {
    tx: ClientTransaction,
    target: Target,
    info: Option<BranchInfo>,
    phase: Phase,
    /// Timer C, or once the CANCEL went out, the deadline for the callee's final answer.
    timer_c: Option<Instant>,
    /// `sequential` (and `all` after the first 2xx): when this server has rung long enough.
    ring_deadline: Option<Instant>,
}

impl Branch {
    /// Whether its final answer is still awaited (it counts for the best answer).
    fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Calling | Phase::Cancelling { .. })
    }

    /// Whether a CANCEL is wanted and waits for a provisional answer (§9.1).
    fn cancel_waits(&self) -> bool {
        matches!(
            self.phase,
            Phase::Cancelling { sent: false, .. }
                | Phase::GivenUp {
                    cancel: Some(false)
                }
        )
    }

    /// Whether its CANCEL went out.
    fn cancel_sent(&self) -> bool {
        matches!(
            self.phase,
            Phase::Cancelling { sent: true, .. } | Phase::GivenUp { cancel: Some(true) }
        )
    }
}

/// Why the caller will not get a session from the branches still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The caller's CANCEL.
    Cancelled,
    /// The relay is stopping ([`Inquiry::handle_stop`]): the caller gets 503, not 487.
    Stopping,
}

/// One received request and everything the relay does for it.
#[derive(Debug)]
pub struct Inquiry {
    settings: std::sync::Arc<Settings>,
    server: ServerTransaction,
    source: Target,
    upstream: Target,
    kind: Kind,
    attempt: Option<Attempt>,
    fork: Fork,
    original_cseq: Option<String>,
    branches: Vec<Branch>,
    /// `sequential`: the servers not tried yet.
    pending: VecDeque<Forward>,
    /// CANCELs and the BYEs of released dialogs, each in its own client transaction.
    own: Vec<(ClientTransaction, Target)>,
    stop: Option<Stop>,
    final_sent: bool,
    /// The branch whose 2xx made the session (not with `all`).
    winner: Option<usize>,
    /// The best final answer so far (§16.7), and the branch it came from.
    best: Option<(Response, usize)>,
    /// A 2xx for BYE handed out for its charge ([`Event::ByeAnswered`]).
    holding: bool,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    keys: VecDeque<TxKey>,
}

impl Inquiry {
    /// A request received from `source`; an INVITE is answered 100 Trying at once.
    pub fn new(
        req: Request,
        source: Target,
        settings: std::sync::Arc<Settings>,
        now: Instant,
    ) -> Inquiry {
        let upstream = req
            .top_via()
            .map(|v| response_target(&v, &source))
            .unwrap_or(source);
        let invite = req.method == Method::Invite;
        let trying = invite.then(|| message::make_response(&req, 100, None, None));
        let server = ServerTransaction::new(req, source.is_reliable(), settings.timers, now);
        let mut inquiry = Inquiry {
            settings,
            server,
            source,
            upstream,
            kind: Kind::Other,
            attempt: None,
            fork: Fork::First,
            original_cseq: None,
            branches: Vec::new(),
            pending: VecDeque::new(),
            own: Vec::new(),
            stop: None,
            final_sent: false,
            winner: None,
            best: None,
            holding: false,
            out: VecDeque::new(),
            events: VecDeque::new(),
            keys: VecDeque::new(),
        };
        if let Some(trying) = trying {
            inquiry.server.send_response(trying, now);
        }
        inquiry.settle(now);
        inquiry
    }

    /// The request as received.
    pub fn request(&self) -> &Request {
        self.server.request()
    }

    /// The final status given to the caller, once there is one.
    pub fn final_status(&self) -> Option<u16> {
        self.server.last_response().map(|r| r.status)
    }

    pub fn branch_count(&self) -> usize {
        self.branches.len()
    }

    /// Acts on the decision made for the request.
    pub fn start(&mut self, decision: Decision, now: Instant) {
        self.kind = decision.kind;
        self.attempt = decision.attempt;
        self.fork = decision.fork;
        self.original_cseq = decision.original_cseq;
        match decision.action {
            Action::Answer(resp) => self.respond(resp, now),
            Action::Refuse {
                status,
                phrase,
                reason,
            } => {
                let resp = self.refuse(status, phrase.as_deref(), reason);
                self.respond(resp, now);
            }
            Action::Redirect { contact } => {
                let mut resp = self.refuse(302, None, Some("redirected"));
                resp.headers.push("Contact", contact);
                self.respond(resp, now);
            }
            Action::Forward(forwards) => match self.stop {
                Some(Stop::Stopping) => {
                    let resp = self.refuse(503, None, None);
                    self.respond(resp, now);
                }
                Some(Stop::Cancelled) => {
                    let resp = self.refuse(487, None, None);
                    self.respond(resp, now);
                }
                None => self.start_branches(forwards, now),
            },
        }
        self.settle(now);
    }

    /// A retransmission of the request, or the ACK for a non-2xx final answer.
    pub fn handle_request(&mut self, req: Request, now: Instant) {
        self.server.handle_request(req, now);
        self.settle(now);
    }

    /// A response to one of the inquiry's client transactions.
    pub fn handle_response(&mut self, resp: Response, now: Instant) {
        let Some(key) = TxKey::client(&resp) else {
            return;
        };
        if let Some(b) = self.branches.iter_mut().find(|b| b.tx.key() == &key) {
            b.tx.handle_response(resp, now);
        } else if let Some((c, _)) = self.own.iter_mut().find(|(c, _)| c.key() == &key) {
            c.handle_response(resp, now);
        }
        self.settle(now);
    }

    /// The caller's CANCEL: every branch still pending is cancelled, also after a 2xx went up
    /// (§16.10), so a `--fork all` server that has not answered yet stops ringing.
    pub fn handle_cancel(&mut self, now: Instant) {
        if self.stop.is_none() {
            self.stop = Some(Stop::Cancelled);
        }
        self.pending.clear();
        self.cancel_branches(now);
        self.settle(now);
    }

    /// The relay is stopping: an INVITE still ringing is cancelled towards its callees and
    /// answered 503; other requests carry on.
    pub fn handle_stop(&mut self, now: Instant) {
        if self.kind != Kind::Invite || self.final_sent {
            return;
        }
        self.stop = Some(Stop::Stopping);
        self.pending.clear();
        self.cancel_branches(now);
        self.settle(now);
    }

    /// Sending what `origin` transmitted failed.
    pub fn handle_send_error(&mut self, origin: Origin, now: Instant) {
        match origin {
            Origin::Branch(i) => {
                if let Some(b) = self.branches.get_mut(i) {
                    b.tx.handle_transport_error(now);
                }
            }
            Origin::Own(i) => {
                if let Some((c, _)) = self.own.get_mut(i) {
                    c.handle_transport_error(now);
                }
            }
            Origin::Server => {}
        }
        self.settle(now);
    }

    /// The 2xx for BYE handed out in [`Event::ByeAnswered`], now carrying its charge (or
    /// without it): it goes to the caller.
    pub fn send_held(&mut self, resp: Response, now: Instant) {
        self.holding = false;
        self.server.send_response(resp, now);
        self.settle(now);
    }

    /// The earliest instant at which [`Inquiry::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut deadline = self.server.poll_timeout();
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                deadline = Some(deadline.map_or(d, |x: Instant| x.min(d)));
            }
        };
        for b in &self.branches {
            consider(b.tx.poll_timeout());
            if !b.tx.is_completed() {
                consider(b.timer_c);
                if matches!(b.phase, Phase::Calling) {
                    consider(b.ring_deadline);
                }
            }
        }
        for (c, _) in &self.own {
            consider(c.poll_timeout());
        }
        deadline
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.server.handle_timeout(now);
        let mut expired = Vec::new();
        for (i, b) in self.branches.iter_mut().enumerate() {
            b.tx.handle_timeout(now);
            if b.tx.is_completed() {
                continue;
            }
            let ring =
                matches!(b.phase, Phase::Calling) && b.ring_deadline.is_some_and(|t| t <= now);
            let timer_c = b.timer_c.is_some_and(|t| t <= now);
            if ring {
                b.ring_deadline = None;
            }
            if timer_c {
                b.timer_c = None;
            }
            if ring || timer_c {
                expired.push((i, ring));
            }
        }
        for (i, ring) in expired {
            let Some(b) = self.branches.get(i) else {
                continue;
            };
            if ring && !b.tx.got_response() {
                // Nothing at all came back (no provisional, so no CANCEL may go yet, §9.1):
                // stop waiting for this server and go on.
                tracing::debug!("Ring timeout on a silent branch: giving it up");
                self.give_up(i, 408, Phase::GivenUp { cancel: None }, now);
            } else if b.cancel_sent() {
                // Cancelled, yet no final answer within 64*T1: the branch is given up as 408
                // (§16.10 lets a proxy stop waiting), so the caller gets an answer.
                tracing::debug!("Cancelled branch never answered: giving it up");
                self.give_up(i, 408, Phase::Failed, now);
            } else {
                tracing::debug!("Timer C or the ring timeout fired: cancelling a branch");
                let why = if ring {
                    CancelWhy::RingTimeout
                } else {
                    CancelWhy::Unwanted
                };
                self.cancel_branch(i, why, now);
            }
        }
        for (c, _) in &mut self.own {
            c.handle_timeout(now);
        }
        self.settle(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Keys of client transactions started since the last call: their responses belong here.
    pub fn poll_key(&mut self) -> Option<TxKey> {
        self.keys.pop_front()
    }

    /// Whether every transaction has ended.
    pub fn is_done(&self) -> bool {
        !self.holding
            && self.server.is_terminated()
            && self.branches.iter().all(|b| b.tx.is_terminated())
            && self.own.iter().all(|(c, _)| c.is_terminated())
    }

    /// When all that is left is absorbing retransmissions, what can do it in place of the
    /// inquiry: an INVITE answered 2xx (retransmitted INVITEs are dropped; 2xx retransmissions
    /// from the callee are relayed statelessly by their Via), an INVITE answered otherwise
    /// whose ACK came (only ACK retransmissions remain, Timer I), or a non-INVITE answered
    /// finally (a retransmission gets the same answer again).
    pub fn retirement(&self, now: Instant) -> Option<Retirement> {
        if self.holding {
            return None;
        }
        let last = self.server.last_response()?;
        if last.status < 200 {
            return None;
        }
        let branches_done = self
            .branches
            .iter()
            .all(|b| !b.waiting() || b.tx.is_terminated());
        let own_done = self
            .own
            .iter()
            .all(|(c, _)| c.is_completed() || c.is_terminated());
        if !branches_done || !own_done {
            return None;
        }
        let timers = self.settings.timers;
        if self.server.request().method == Method::Invite {
            if last.status < 300 {
                return Some(Retirement {
                    until: now + timers.t1 * 64,
                    reply: None,
                    absorb_ack: false,
                });
            }
            return (self.server.state() == State::Confirmed).then_some(Retirement {
                until: now + timers.t4,
                reply: None,
                absorb_ack: true,
            });
        }
        let reply = (!self.source.is_reliable()).then(|| (self.upstream, last.clone()));
        Some(Retirement {
            until: now + timers.t1 * 64,
            reply,
            absorb_ack: false,
        })
    }

    /// Moves what the transactions queued to the outputs and handles their events, until quiet.
    fn settle(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(resp) = self.server.poll_transmit() {
                progressed = true;
                self.out.push_back(Transmit {
                    target: self.upstream,
                    msg: Message::Response(resp),
                    origin: Origin::Server,
                });
            }
            while self.server.poll_event().is_some() {}
            let mut events = Vec::new();
            for (i, b) in self.branches.iter_mut().enumerate() {
                while let Some(req) = b.tx.poll_transmit() {
                    progressed = true;
                    self.out.push_back(Transmit {
                        target: b.target,
                        msg: Message::Request(req),
                        origin: Origin::Branch(i),
                    });
                }
                while let Some(ev) = b.tx.poll_event() {
                    events.push((i, ev));
                }
            }
            for (j, (c, target)) in self.own.iter_mut().enumerate() {
                while let Some(req) = c.poll_transmit() {
                    progressed = true;
                    self.out.push_back(Transmit {
                        target: *target,
                        msg: Message::Request(req),
                        origin: Origin::Own(j),
                    });
                }
                while c.poll_event().is_some() {}
            }
            for (i, ev) in events {
                progressed = true;
                self.handle_branch_event(i, ev, now);
            }
            if !progressed {
                break;
            }
        }
    }

    fn handle_branch_event(&mut self, i: usize, ev: ClientEvent, now: Instant) {
        match ev {
            ClientEvent::Provisional(resp) => self.provisional(i, resp, now),
            ClientEvent::Final(resp) => self.final_answer(i, resp, now),
            ClientEvent::Timeout => self.branch_failed(i, 408, now),
            ClientEvent::TransportError => self.branch_failed(i, 503, now),
            ClientEvent::Terminated => {}
        }
    }

    fn cancel_others(&mut self, winner: usize, now: Instant) {
        for i in 0..self.branches.len() {
            if i != winner {
                self.cancel_branch(i, CancelWhy::Unwanted, now);
            }
        }
    }

    fn cancel_branches(&mut self, now: Instant) {
        for i in 0..self.branches.len() {
            self.cancel_branch(i, CancelWhy::Unwanted, now);
        }
    }

    fn cancel_branch(&mut self, i: usize, why: CancelWhy, now: Instant) {
        let Some(b) = self.branches.get_mut(i) else {
            return;
        };
        if b.tx.is_completed() || b.tx.request().method != Method::Invite {
            return;
        }
        match b.phase {
            Phase::Calling => b.phase = Phase::Cancelling { why, sent: false },
            // Given up for its silence, yet its INVITE is still out: it is cancelled too.
            Phase::GivenUp { cancel: None } => {
                b.phase = Phase::GivenUp {
                    cancel: Some(false),
                }
            }
            _ => return,
        }
        if b.tx.got_response() {
            self.send_cancel(i, now);
        }
    }

    fn send_cancel(&mut self, i: usize, now: Instant) {
        let give_up = now + self.settings.timers.t1 * 64;
        let Some(b) = self.branches.get_mut(i) else {
            return;
        };
        match &mut b.phase {
            Phase::Cancelling { sent, .. } => *sent = true,
            Phase::GivenUp { cancel } => *cancel = Some(true),
            _ => {}
        }
        b.timer_c = Some(give_up);
        let cancel = message::make_cancel(b.tx.request());
        let tx = ClientTransaction::new(cancel, b.target.is_reliable(), self.settings.timers, now);
        self.keys.push_back(tx.key().clone());
        self.own.push((tx, b.target));
    }

    fn respond(&mut self, resp: Response, now: Instant) {
        if (200..700).contains(&resp.status) {
            self.final_sent = true;
        }
        // An attempt's refusal has its own line (`Attempt failed`); others are logged by the
        // driver.
        if self.attempt.is_none() && resp.status >= 300 {
            self.events
                .push_back(Event::Refused(Box::new(resp.clone())));
        }
        self.server.send_response(resp, now);
    }

    /// A refusal decided here, recorded for the attempt when there is one.
    fn refuse(
        &mut self,
        status: u16,
        phrase: Option<&str>,
        reason: Option<&'static str>,
    ) -> Response {
        if let Some(attempt) = &self.attempt {
            self.events.push_back(Event::Failed {
                attempt: attempt.clone(),
                offered: None,
                status,
                reason: reason.unwrap_or_else(|| self.failure_reason(status)),
            });
        }
        if self.stop == Some(Stop::Stopping) && status == 503 {
            return self.stopping_response();
        }
        self.local_response(status, phrase)
    }

    fn local_response(&self, status: u16, reason: Option<&str>) -> Response {
        message::make_response(
            self.server.request(),
            status,
            reason,
            Some(&message::new_tag()),
        )
    }

    /// The record's reason for a failed attempt.
    fn failure_reason(&self, status: u16) -> &'static str {
        if self.stop == Some(Stop::Stopping) && status == 503 {
            "relay-stop"
        } else {
            failure_reason(status)
        }
    }

    /// 503 for an INVITE the stopping relay gives up.
    fn stopping_response(&self) -> Response {
        let mut resp = self.local_response(503, Some(STOPPING));
        resp.headers.push("Retry-After", STOPPING_RETRY_AFTER);
        resp
    }

    fn start_branches(&mut self, forwards: Vec<Forward>, now: Instant) {
        let in_dialog = matches!(self.kind, Kind::Bye { .. } | Kind::Pass)
            || forwards
                .first()
                .is_some_and(|f| f.req.to().is_ok_and(|t| t.tag().is_some()));
        let mut forwards: VecDeque<Forward> = forwards.into();
        while let Some(f) = forwards.pop_front() {
            self.start_branch(f, now, in_dialog);
            if self.fork == Fork::Sequential && !self.branches.is_empty() {
                // One server at a time: the rest wait for this one to fail.
                self.pending = forwards;
                break;
            }
        }
        if self.branches.is_empty() {
            let resp = self.refuse(483, None, None);
            self.respond(resp, now);
        }
    }

    /// Starts one branch; false when it cannot go (Max-Forwards exhausted).
    fn start_branch(&mut self, f: Forward, now: Instant, in_dialog: bool) -> bool {
        let Forward {
            mut req,
            target,
            info,
        } = f;
        let upstream_transport = self.source.transport;
        if decrement_max_forwards(&mut req).is_none() {
            return false;
        }
        // Credentials for the realm are the relay's to consume, unless the request goes on to
        // an additional relay of the same realm, which checks them.
        if self.kind != Kind::Pass {
            consume_credentials(&mut req, &self.settings.realm);
        }
        let identity = &self.settings.identity;
        if !in_dialog
            && matches!(
                req.method,
                Method::Invite | Method::Subscribe | Method::Refer
            )
        {
            if target.transport != upstream_transport {
                // RFC 5658: one entry for each side, the callee's side on top.
                req.headers
                    .push_front("Record-Route", identity.record_route(upstream_transport));
            }
            req.headers
                .push_front("Record-Route", identity.record_route(target.transport));
        }
        identity.push_via(&mut req, target.transport, &message::new_branch());
        let tx = ClientTransaction::new(req, target.is_reliable(), self.settings.timers, now);
        self.keys.push_back(tx.key().clone());
        let invite = tx.request().method == Method::Invite;
        let ring_deadline = (invite && self.fork == Fork::Sequential)
            .then(|| now + self.settings.sequential_timeout);
        self.branches.push(Branch {
            tx,
            target,
            info,
            phase: Phase::Calling,
            timer_c: invite.then(|| now + TIMER_C),
            ring_deadline,
        });
        true
    }
}

/// What replaces a finished inquiry while retransmissions may still come.
#[derive(Debug)]
pub struct Retirement {
    pub until: Instant,
    /// For a non-INVITE over UDP: where and what to answer a retransmitted request with.
    pub reply: Option<(Target, Response)>,
    /// ACKs with this key are absorbed too.
    pub absorb_ack: bool,
}

/// Decrements Max-Forwards (70 when absent); `None` when it was already 0.
pub fn decrement_max_forwards(req: &mut Request) -> Option<u32> {
    let mf = match req.headers.get("Max-Forwards") {
        Some(v) => v.trim().parse::<u32>().unwrap_or(70),
        None => 70,
    };
    if mf == 0 {
        return None;
    }
    req.headers.set("Max-Forwards", (mf - 1).to_string());
    Some(mf - 1)
}

/// Removes the Proxy-Authorization the relay consumed (RFC 3261 §22.3: credentials for this
/// realm are not passed on).
fn consume_credentials(req: &mut Request, realm: &str) {
    let needle = format!("realm=\"{realm}\"");
    req.headers.0.retain(|h| {
        !(h.name.eq_ignore_ascii_case("Proxy-Authorization") && h.value.contains(&needle))
    });
}

/// The record's reason for an attempt that ended with `status`.
pub fn failure_reason(status: u16) -> &'static str {
    match status {
        404 => "unknown-user",
        408 => "timeout",
        480 => "not-registered",
        486 | 600 => "busy",
        487 => "cancelled",
        403 | 603 => "declined",
        500..=599 => "server-error",
        _ => "failed",
    }
}

mod response;

#[cfg(test)]
mod clock_tests;
