//! Supervision of established sessions: keepalive checks of both parties, the maximum duration
//! of a service, and the relay's own BYE to both sides when a session must end.
//!
//! [`tick`] runs once a second from the dispatcher. The table decides what is due
//! ([`Sessions::due`]); each check or BYE then runs as its own client transaction
//! ([`request`]), so a party that does not answer delays nothing else.

use super::{Commit, DialogKey, EndReason, Outgoing, Party, Session, Sessions, elapsed_ms};
use crate::core::{Core, CtxInput};
use proto::clock::now_ms;
use proto::service::{CHARGE_HEADER, END_HEADER};
use proto::sip::message::{self, Message, Method, Request, Response, Transport};
use proto::sip::transaction::{ClientEvent, ClientTransaction};
use proto::sync::lock;
use proto::transport::Target;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Work the table found due.
#[derive(Debug)]
pub enum Work {
    /// Check that a party is still there.
    Ping(DialogKey, Box<Outgoing>),
    /// End the session on both sides.
    End(DialogKey, EndReason),
}

impl Sessions {
    fn find_mut<'a>(
        map: &'a mut std::collections::HashMap<String, Vec<Session>>,
        key: &DialogKey,
    ) -> Option<&'a mut Session> {
        map.get_mut(&key.call_id)?
            .iter_mut()
            .find(|s| s.d.caller_tag == key.caller_tag && s.d.callee_tag == key.callee_tag)
    }

    /// What is due at `now`: sessions past their maximum duration end; the others whose check
    /// is due get an OPTIONS to each party.
    pub fn due(
        &self,
        now: Instant,
        keepalive: Duration,
        via: &dyn Fn(Transport) -> String,
    ) -> Vec<Work> {
        let mut work = Vec::new();
        let mut map = lock(&self.by_call);
        for s in map.values_mut().flatten() {
            // Not established, being ended, or hanging up already (a BYE is on its way).
            if s.started.is_none() || s.ending || s.bye_from.is_some() {
                continue;
            }
            // A session resumed after a restart is checked before anything else is decided.
            if !s.resume_check && s.deadline.is_some_and(|d| d <= now) {
                s.ending = true;
                work.push(Work::End(s.key(), EndReason::MaxDuration));
                continue;
            }
            if s.pinging.iter().any(|p| *p) || s.next_ping.is_none_or(|t| t > now) {
                continue;
            }
            // A party that can no longer be reached (its TCP connection closed) is gone.
            if let Some(party) = [Party::Caller, Party::Callee]
                .into_iter()
                .find(|p| s.targets[p.index()].is_none())
            {
                s.ending = true;
                let reason = if s.resume_check {
                    EndReason::RelayRestart
                } else {
                    EndReason::Gone(party)
                };
                work.push(Work::End(s.key(), reason));
                continue;
            }
            s.next_ping = (!keepalive.is_zero()).then(|| now + keepalive);
            for party in [Party::Caller, Party::Callee] {
                let transport = s.targets[party.index()]
                    .map(|t| t.transport)
                    .unwrap_or(Transport::Udp);
                if let Some(out) = s.own_request(Method::Options, party, &via(transport)) {
                    s.pinging[party.index()] = true;
                    work.push(Work::Ping(s.key(), Box::new(out)));
                }
            }
        }
        work
    }

    /// The answer to a check of `party`: `alive` unless it was 408, 481 or none at all.
    /// Returns why the session must end, if it must.
    pub fn ping_result(
        &self,
        key: &DialogKey,
        party: Party,
        alive: bool,
        now: Instant,
    ) -> Option<EndReason> {
        let mut map = lock(&self.by_call);
        let s = Self::find_mut(&mut map, key)?;
        s.pinging[party.index()] = false;
        if !alive {
            tracing::info!(call_id = %proto::log::Esc(&key.call_id), party = party.as_str(), "Party gone");
            return Some(if s.resume_check {
                EndReason::RelayRestart
            } else {
                EndReason::Gone(party)
            });
        }
        s.last_alive[party.index()] = now;
        if s.pinging.iter().any(|p| *p) {
            return None;
        }
        // Both answered: keep the last sign of life in the record, for a restart.
        let oldest = s.last_alive[0].min(s.last_alive[1]);
        let wall = now_ms() - elapsed_ms(oldest, now);
        s.cdr.last_alive_ms = Some(wall);
        if s.resume_check {
            s.resume_check = false;
            s.cdr.resumed_at_ms = Some(now_ms());
            tracing::info!(call_id = %proto::log::Esc(&key.call_id), "Session resumed after a restart");
        }
        s.cdr.dialog = serde_json::to_string(&s.d).ok();
        // Queued under the table's lock: the record's end is always queued after this.
        self.save(s.cdr.clone());
        None
    }

    /// Ends a session from the relay: the record is closed at once (billed to `now` for the
    /// maximum duration, else to the last moment both parties were known to be there), and the
    /// BYEs for both parties are returned, the client's carrying the charge, with the commit
    /// to wait for before they go out.
    pub fn end_by_relay(
        &self,
        key: &DialogKey,
        reason: EndReason,
        via: &dyn Fn(Transport) -> String,
        now: Instant,
    ) -> (Vec<Outgoing>, Commit) {
        let Some(mut s) = self.remove(&key.call_id, &key.caller_tag, &key.callee_tag) else {
            return (Vec::new(), Commit::none());
        };
        let Some(started) = s.started else {
            return (Vec::new(), Commit::none());
        };
        // Both parties are there (or a check would have ended it): billed to this moment.
        let end = match reason {
            EndReason::MaxDuration
            | EndReason::RelayStop
            | EndReason::Transferred
            | EndReason::Drained => now,
            _ => s.last_alive[0].min(s.last_alive[1]).max(started),
        };
        // Never past the maximum duration (the check runs once a second; a resumed session
        // may have passed it while the relay was down).
        let end = s.deadline.map_or(end, |d| end.min(d).max(started));
        let duration = elapsed_ms(started, end);
        let end_ms = now_ms() - elapsed_ms(end, now);
        s.close(end_ms, duration, Party::Relay, reason.as_str());
        let charge = s.charge(duration, true);
        super::log_ended(&s.cdr);
        let (cause, text) = match reason {
            EndReason::MaxDuration | EndReason::Transferred | EndReason::Drained => {
                (200, reason.as_str())
            }
            EndReason::RelayStop => (503, reason.as_str()),
            _ => (408, reason.as_str()),
        };
        let mut byes = Vec::new();
        for party in [Party::Caller, Party::Callee] {
            let transport = s.targets[party.index()]
                .map(|t| t.transport)
                .unwrap_or(Transport::Udp);
            if let Some(mut out) = s.own_request(Method::Bye, party, &via(transport)) {
                out.request
                    .headers
                    .push("Reason", format!("SIP;cause={cause};text=\"{text}\""));
                out.request.headers.push(END_HEADER, text);
                if party == Party::Caller {
                    if let Some(c) = &charge {
                        out.request.headers.push(CHARGE_HEADER, c.to_header());
                    }
                }
                byes.push(out);
            }
        }
        let commit = self.save_durable(s.cdr);
        (byes, commit)
    }
}

/// The Via the relay puts on a request of its own.
fn own_via(core: &Core, transport: Transport) -> String {
    core.identity.via(transport, &message::new_branch())
}

/// Runs what is due; called once a second.
pub fn tick(core: &Arc<Core>) {
    let keepalive = Duration::from_secs(core.config.keepalive_secs);
    let via = |t: Transport| own_via(core, t);
    for w in core.sessions.due(Instant::now(), keepalive, &via) {
        let core = core.clone();
        match w {
            Work::Ping(key, out) => {
                tokio::spawn(async move {
                    let alive = request(&core, out.request, out.target)
                        .await
                        .is_some_and(|r| !matches!(r.status, 408 | 481));
                    if let Some(reason) =
                        core.sessions
                            .ping_result(&key, out.to, alive, Instant::now())
                    {
                        end(&core, &key, reason).await;
                    }
                });
            }
            Work::End(key, reason) => {
                tokio::spawn(async move { end(&core, &key, reason).await });
            }
        }
    }
}

/// Ends a session on both sides.
pub async fn end(core: &Arc<Core>, key: &DialogKey, reason: EndReason) {
    let via = |t: Transport| own_via(core, t);
    let (mut byes, commit) = core
        .sessions
        .end_by_relay(key, reason, &via, Instant::now());
    // The client's BYE tells it the charge: only once that charge is in the store.
    if !commit.wait(Duration::from_secs(5)).await {
        tracing::warn!(call_id = %proto::log::Esc(&key.call_id), "The session's record is not in the store yet: its BYEs go without the charge");
        for bye in &mut byes {
            bye.request.headers.remove_all(CHARGE_HEADER);
        }
    }
    let mut tasks = Vec::new();
    for bye in byes {
        let core = core.clone();
        tasks.push(tokio::spawn(async move {
            let answer = request(&core, bye.request, bye.target).await;
            tracing::debug!(
                party = bye.to.as_str(),
                status = answer.map(|r| r.status),
                "Relay's BYE answered"
            );
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Sends a request of the relay's own in a client transaction; the final response, or `None`
/// on timeout or transport failure.
pub async fn request(core: &Arc<Core>, req: Request, target: Target) -> Option<Response> {
    let now = Instant::now();
    let mut tx = ClientTransaction::new(req, target.is_reliable(), core.timers, now);
    let key = tx.key().clone();
    let (in_tx, mut in_rx) = mpsc::channel(crate::core::CTX_QUEUE);
    core.register_context(key.clone(), in_tx);
    let mut result = None;
    'outer: loop {
        while let Some(out) = tx.poll_transmit() {
            if core
                .transport
                .send(&target, &Message::Request(out))
                .await
                .is_err()
            {
                tx.handle_transport_error(Instant::now());
            }
        }
        while let Some(ev) = tx.poll_event() {
            match ev {
                ClientEvent::Final(resp) => {
                    result = Some(resp);
                    break 'outer;
                }
                ClientEvent::Timeout | ClientEvent::TransportError | ClientEvent::Terminated => {
                    break 'outer;
                }
                ClientEvent::Provisional(_) => {}
            }
        }
        let sleep = proto::clock::sleep_until(tx.poll_timeout());
        tokio::select! {
            input = in_rx.recv() => match input {
                Some(CtxInput::Response(resp)) => tx.handle_response(*resp, Instant::now()),
                Some(_) => {}
                None => break,
            },
            _ = sleep => tx.handle_timeout(Instant::now()),
        }
    }
    core.unregister_context(&key);
    result
}
