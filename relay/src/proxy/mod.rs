//! Request relay (RFC 3261 §16): one transaction context per received request.
//!
//! The seed's sections, one module each:
//! - [`reception`]: request reception: the screen that refuses, once and statelessly,
//!   everything that fails before authentication, and the CANCEL.
//! - [`decide`]: the lookups before relaying: authentication (`relay::auth`), server search
//!   (`relay::search`), the location service, and the service's servers with the relay's
//!   signed assertion for each. The result is a [`Decision`].
//! - [`inquiry`]: service inquiry and response relay, a state machine without I/O: forking
//!   (first/sequential/all), Record-Route, Via, Max-Forwards, Timer C, CANCEL, the best final
//!   answer (§16.7), the release of a late 2xx.
//! - [`confirmation`]: confirmation relay: the ACK for a 2xx along its dialog, and 2xx
//!   retransmissions after the INVITE's context ended.
//!
//! This module is the one driver: a context's task runs the decision, then feeds the
//! [`Inquiry`] what the dispatcher hands it (with the time), sends what it transmits, registers
//! its client transactions with the dispatcher, and tells session control what it reports.
//! Nothing here resolves names: every next hop is an IP literal from a registration, a Route
//! the relay wrote, or the configuration.

mod bill;
pub mod confirmation;
pub mod decide;
pub mod decision;
pub mod inquiry;
pub mod reception;

pub use confirmation::{forward_ack, forward_response_stateless};
pub use decision::{Action, Decision, Forward, Kind};
pub use inquiry::{Event, Inquiry, Origin, STOPPING, STOPPING_RETRY_AFTER, Settings, Transmit};
pub use reception::{
    Plan, handle_cancel, log_refusal, reply_stateless, screen, stateless_response,
};

use crate::core::{CTX_QUEUE, Core, CtxInput, Tombstone};
use crate::session::Party;
use proto::log::Esc;
use proto::service::CHARGE_HEADER;
use proto::sip::message::{self, Message, Request};
use proto::sip::transaction::TxKey;
use proto::transport::Target;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a message that tells a party its charge may wait for that charge to be committed;
/// past it the message goes without the charge.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Methods the relay itself accepts or relays.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE, PRACK, REFER, MESSAGE, NOTIFY, SUBSCRIBE";

/// Reason phrase of the 403 for a request to a domain the relay neither serves nor routes.
pub const RELAYING_DENIED: &str = "Relaying denied";

/// Starts the context for a new request that passed the [`screen`].
pub fn spawn_context(core: Arc<Core>, key: TxKey, req: Request, source: Target, plan: Plan) {
    let (tx, rx) = mpsc::channel(CTX_QUEUE);
    core.register_context(key.clone(), tx.clone());
    // A TCP caller's connection stays open while its request is in progress (a call may ring
    // for minutes without a message from it).
    if let Some(conn) = source.conn {
        core.transport.pin(conn);
    }
    // In JSON logs every line of the transaction carries its method, Call-ID and branch.
    let span = if proto::log::spans() {
        tracing::info_span!(
            "transaction",
            method = %req.method,
            call_id = %Esc(req.call_id().unwrap_or_default()),
            branch = %Esc(&key.branch),
            source = %source,
        )
    } else {
        tracing::Span::none()
    };
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let mut ctx = Context {
                core,
                keys: vec![key],
                me: tx,
                rx,
                source,
                started: Instant::now(),
            };
            ctx.run(req, plan).await;
        },
        span,
    ));
}

/// The task of one transaction context: the driver of its [`Inquiry`].
struct Context {
    core: Arc<Core>,
    /// The keys the dispatcher routes to this context.
    keys: Vec<TxKey>,
    me: mpsc::Sender<CtxInput>,
    rx: mpsc::Receiver<CtxInput>,
    source: Target,
    started: Instant,
}

impl Context {
    async fn run(&mut self, req: Request, plan: Plan) {
        let core = self.core.clone();
        let mut inquiry = Inquiry::new(
            req.clone(),
            self.source,
            core.inquiry.clone(),
            Instant::now(),
        );
        self.pump(&mut inquiry).await;
        // A client moved by `relay drain` reports its new session established: the first one
        // ends once this NOTIFY is on its way.
        let drained = match &plan {
            Plan::InDialog {
                call_id,
                from_tag,
                to_tag,
            } if req.method == message::Method::Notify => core
                .sessions
                .drained_by_notify(call_id, from_tag, to_tag, &req.body),
            _ => None,
        };
        let decision = decide::decide(&core, self.source, req, plan).await;
        inquiry.start(decision, Instant::now());
        if let Some(key) = drained {
            crate::session::drain::ended_by_move(&core, key);
        }
        loop {
            self.pump(&mut inquiry).await;
            if inquiry.is_done() {
                break;
            }
            if let Some(r) = inquiry.retirement(Instant::now()) {
                // Everything left is absorbing retransmissions: a small tombstone does that
                // (RFC 6026 Timer L / Timer J) instead of the whole context.
                let reply = r
                    .reply
                    .map(|(to, resp)| Box::new((to, message::serialize(&Message::Response(resp)))));
                core.bury(
                    self.keys[0].clone(),
                    Tombstone {
                        expires: r.until,
                        reply,
                        absorb_ack: r.absorb_ack,
                    },
                );
                break;
            }
            let sleep = proto::clock::sleep_until(inquiry.poll_timeout());
            tokio::select! {
                input = self.rx.recv() => {
                    let Some(input) = input else { break };
                    feed(&mut inquiry, input);
                }
                _ = sleep => {
                    // Input first: what arrived while the relay could not run may answer
                    // what the timer would retransmit.
                    core.input_settled(core.timers.t1).await;
                    while let Ok(input) = self.rx.try_recv() {
                        feed(&mut inquiry, input);
                    }
                    inquiry.handle_timeout(Instant::now());
                }
            }
        }
        self.finish(&inquiry);
    }

    /// Carries out what the inquiry asks for, until it asks for nothing more: its events first
    /// (session control must know a dialog before its 2xx leaves), then its new transaction
    /// keys, then its transmissions.
    async fn pump(&mut self, inquiry: &mut Inquiry) {
        loop {
            let mut progressed = false;
            while let Some(ev) = inquiry.poll_event() {
                progressed = true;
                self.report(inquiry, ev).await;
            }
            while let Some(key) = inquiry.poll_key() {
                self.core.register_context(key.clone(), self.me.clone());
                self.keys.push(key);
            }
            // A failed send goes back to its transaction only once this round's messages
            // are out: what the inquiry does about it (the next server, a final answer) then
            // takes the same order again (events, keys, transmissions).
            let mut failed = Vec::new();
            while let Some(Transmit {
                target,
                msg,
                origin,
            }) = inquiry.poll_transmit()
            {
                progressed = true;
                crate::metrics::METRICS.sent(&msg);
                if let Err(e) = self.core.transport.send(&target, &msg).await {
                    tracing::debug!(%target, error = %e, "Send failed");
                    failed.push(origin);
                }
            }
            for origin in failed {
                inquiry.handle_send_error(origin, Instant::now());
            }
            if !progressed {
                break;
            }
        }
    }

    /// Tells session control (or the refusal log) what the inquiry reported.
    async fn report(&self, inquiry: &mut Inquiry, ev: Event) {
        let sessions = &self.core.sessions;
        match ev {
            Event::Failed {
                attempt,
                offered,
                status,
                reason,
            } => sessions.failed(&attempt, offered.as_ref(), status, reason),
            Event::Answered {
                attempt,
                answer,
                at,
            } => sessions.answered(&attempt, *answer, at),
            Event::ChangeAnswered {
                key,
                service,
                status,
                at,
            } => sessions.change_answered(&key, Some(*service), status, at),
            Event::Refused(resp) => {
                log_refusal(&self.core, inquiry.request(), &resp, &self.source);
            }
            Event::ByeAnswered {
                call_id,
                from_tag,
                to_tag,
                status,
                at,
                held,
            } => {
                let ended = sessions.bye_answered(&call_id, &from_tag, &to_tag, status, at);
                let Some(mut resp) = held.map(|r| *r) else {
                    return;
                };
                // Charges never reach the client: those an application server put in its 200
                // for the client's BYE are recorded here and taken out.
                let charges = take_charges(&mut resp);
                // The 200 for a BYE waits until the ended record is in the store: the client
                // learns what its session cost from it, and whatever a party looks up after
                // its hang-up is the final record.
                if let Some(end) = ended {
                    if let (Party::Caller, Some(charge)) = (end.by, &end.charge) {
                        resp.headers.set(CHARGE_HEADER, charge.to_header());
                    }
                    if !end.commit.wait(COMMIT_WAIT).await
                        && resp.headers.get(CHARGE_HEADER).is_some()
                    {
                        resp.headers.remove_all(CHARGE_HEADER);
                        tracing::warn!(
                            "The session's record is not in the store yet: the 200 for BYE goes without the charge"
                        );
                    }
                    if let (Party::Caller, Some(server)) = (end.by, &end.server) {
                        if let Some(doc) = charges {
                            record_bye_charges(&self.core, &end.sid, server, doc).await;
                        }
                        bill::bill(&self.core, &end.sid, &mut resp).await;
                    }
                }
                inquiry.send_held(resp, Instant::now());
            }
        }
    }

    fn finish(&self, inquiry: &Inquiry) {
        let req = inquiry.request();
        tracing::debug!(
            method = %req.method,
            call_id = %Esc(req.call_id().unwrap_or_default()),
            source = %self.source,
            status = inquiry.final_status(),
            branches = inquiry.branch_count(),
            ms = self.started.elapsed().as_millis() as u64,
            "Transaction done"
        );
        for key in &self.keys {
            self.core.unregister_context(key);
        }
        if let Some(conn) = self.source.conn {
            self.core.transport.unpin(conn);
        }
    }
}

/// Hands one input from the dispatcher to the inquiry, with the time it is handled at.
fn feed(inquiry: &mut Inquiry, input: CtxInput) {
    let now = Instant::now();
    match input {
        CtxInput::Request(req, _) => inquiry.handle_request(*req, now),
        CtxInput::Response(resp) => inquiry.handle_response(*resp, now),
        CtxInput::Cancel => inquiry.handle_cancel(now),
        CtxInput::Stop => inquiry.handle_stop(now),
    }
}

pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Takes a charges document out of a message (any other body stays).
fn take_charges(msg: &mut message::Response) -> Option<proto::charge::Charges> {
    if !message::is_media_type(msg.headers.get("Content-Type"), proto::charge::CONTENT_TYPE) {
        return None;
    }
    let body = std::mem::take(&mut msg.body);
    msg.headers.remove_all("Content-Type");
    match proto::charge::Charges::parse(&body) {
        Ok(doc) => Some(doc),
        Err(e) => {
            tracing::warn!(error = %e, "Charges in a 200 for BYE unreadable: none recorded");
            None
        }
    }
}

/// Records the charges an application server put in its 200 for the client's BYE (before that
/// 200 is relayed, so the client's bill holds them).
async fn record_bye_charges(core: &Core, sid: &str, server: &str, doc: proto::charge::Charges) {
    let subs = crate::charging::in_session(server, crate::store::Channel::Bye, sid, doc);
    match core.charging.submit(subs).await {
        Ok(results) => {
            for r in results.iter().filter(|r| !r.outcome.is_recorded()) {
                tracing::warn!(
                    %sid,
                    server,
                    key = %Esc(&r.idempotency_key),
                    reason = %Esc(r.message.as_deref().unwrap_or_default()),
                    "A charge in a 200 for BYE was refused"
                );
            }
        }
        Err(e) => tracing::warn!(%sid, error = %e, "Charges in a 200 for BYE not recorded"),
    }
}
