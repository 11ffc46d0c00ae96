//! RFC 3261 §17.2 server transactions (INVITE: figure 7 as amended by RFC 6026; non-INVITE:
//! figure 8).

use super::{Class, Retransmit, State, Timers, TxKey, classify};
use crate::sip::message::{Method, Request, Response};
use std::collections::VecDeque;
use std::time::Instant;

/// What a server transaction reports to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The ACK for a non-2xx final response arrived (absorbed here; for the user's information).
    Acked,
    /// Timer H fired: no ACK came for the non-2xx final response.
    AckTimeout,
    /// The transport reported a failure for this transaction.
    TransportError,
    /// The transaction is over and can be dropped.
    Terminated,
}

/// RFC 3261 §17.2 server transaction, INVITE or non-INVITE by the request's method.
#[derive(Debug)]
pub struct ServerTransaction {
    key: TxKey,
    request: Request,
    invite: bool,
    reliable: bool,
    timers: Timers,
    state: State,
    /// The last response the user sent (provisional or final).
    last_response: Option<Response>,
    transmit: VecDeque<Response>,
    events: VecDeque<ServerEvent>,
    /// Timer G (INVITE, Completed); never armed on reliable transports.
    retransmit: Option<Retransmit>,
    /// Timer H (INVITE, Completed).
    timeout: Option<Instant>,
    /// Timer I (Confirmed), J (non-INVITE Completed) or L (Accepted).
    linger: Option<Instant>,
}

impl ServerTransaction {
    /// Created by the transport user for a new request (not for ACK). For INVITE on an unreliable
    /// transport nothing is sent by itself: the user sends 100 Trying with `send_response` (a
    /// proxy does so at once).
    pub fn new(
        request: Request,
        reliable: bool,
        timers: Timers,
        _now: Instant,
    ) -> ServerTransaction {
        let key = TxKey::server(&request)
            .or_else(|| TxKey::server_2543(&request))
            .unwrap_or_else(|| TxKey {
                branch: String::new(),
                sent_by: String::new(),
                method: if request.method == Method::Ack {
                    Method::Invite
                } else {
                    request.method
                },
            });
        let invite = request.method == Method::Invite;
        ServerTransaction {
            key,
            request,
            invite,
            reliable,
            timers,
            state: if invite {
                State::Proceeding
            } else {
                State::Trying
            },
            last_response: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            retransmit: None,
            timeout: None,
            linger: None,
        }
    }

    pub fn key(&self) -> &TxKey {
        &self.key
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Where the transaction stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// A retransmission of the request (the last response is queued again) or, for an INVITE, the
    /// ACK to a non-2xx final response (absorbed; `ServerEvent::Acked`).
    pub fn handle_request(&mut self, req: Request, now: Instant) {
        if req.method == Method::Ack {
            if self.invite && self.state == State::Completed {
                self.retransmit = None;
                self.timeout = None;
                self.events.push_back(ServerEvent::Acked);
                if self.reliable {
                    self.terminate(); // Timer I is zero
                } else {
                    self.state = State::Confirmed;
                    self.linger = Some(now + self.timers.t4); // Timer I
                }
            }
            // An ACK in any other state (a retransmitted one while Confirmed, a stray one) is
            // absorbed.
            return;
        }
        match self.state {
            // INVITE Proceeding: resend the last provisional, if any. Non-INVITE Proceeding and
            // Completed, INVITE Completed: resend the last response.
            State::Proceeding | State::Completed => {
                if let Some(resp) = &self.last_response {
                    self.transmit.push_back(resp.clone());
                }
            }
            // Non-INVITE Trying: nothing sent yet, discard. RFC 6026 Accepted: absorbed, nothing
            // resent (the TU retransmits 2xx itself). Confirmed, Terminated: absorbed.
            State::Trying
            | State::Accepted
            | State::Confirmed
            | State::Terminated
            | State::Calling => {}
        }
    }

    /// The user's response. Provisional responses keep the transaction Proceeding; a final one
    /// moves it to Completed (non-2xx, timers G/H or J) or, for a 2xx to an INVITE, to Accepted
    /// (RFC 6026, Timer L). Responses after a final one are ignored, except further 2xx to an
    /// INVITE while Accepted, which are passed through.
    pub fn send_response(&mut self, resp: Response, now: Instant) {
        let class = classify(resp.status);
        match (self.state, class) {
            (State::Trying | State::Proceeding, Class::Provisional) => {
                self.state = State::Proceeding;
                self.send(resp);
            }
            (State::Proceeding, Class::Success) if self.invite => {
                self.state = State::Accepted;
                self.linger = Some(now + self.timers.t1x64()); // Timer L
                self.send(resp);
            }
            (State::Proceeding, Class::Failure) if self.invite => {
                self.state = State::Completed;
                self.timeout = Some(now + self.timers.t1x64()); // Timer H
                if !self.reliable {
                    self.retransmit = Some(Retransmit::start(now, self.timers.t1)); // Timer G
                }
                self.send(resp);
            }
            (State::Trying | State::Proceeding, Class::Success | Class::Failure) => {
                self.send(resp);
                if self.reliable {
                    self.terminate(); // Timer J is zero
                } else {
                    self.state = State::Completed;
                    self.linger = Some(now + self.timers.t1x64()); // Timer J
                }
            }
            (State::Accepted, Class::Success) => self.send(resp),
            _ => {}
        }
    }

    /// Fires every timer due at `now`. A due H (or I/J/L) ends the transaction without a last
    /// retransmission; a due G retransmits once and re-arms from `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Terminated {
            return;
        }
        if self.timeout.is_some_and(|at| at <= now) {
            // Timer H.
            self.timeout = None;
            self.events.push_back(ServerEvent::AckTimeout);
            self.terminate();
        } else if self.linger.is_some_and(|at| at <= now) {
            // Timer I, J or L.
            self.linger = None;
            self.terminate();
        } else if let Some(timer) = self.retransmit.filter(|r| r.at <= now) {
            // Timer G: doubling up to T2.
            if self.state == State::Completed {
                if let Some(resp) = &self.last_response {
                    self.transmit.push_back(resp.clone());
                }
                self.retransmit = Some(timer.next(now, Some(self.timers.t2)));
            } else {
                self.retransmit = None;
            }
        }
    }

    /// A transport failure tells the user and ends the transaction (RFC 3261 §17.2.4).
    pub fn handle_transport_error(&mut self, _now: Instant) {
        if self.state != State::Terminated {
            self.events.push_back(ServerEvent::TransportError);
            self.terminate();
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Response> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Terminated {
            return None;
        }
        super::earliest(&[self.retransmit.map(|r| r.at), self.timeout, self.linger])
    }

    /// The last response sent, if any (its status tells whether a final one was sent).
    pub fn last_response(&self) -> Option<&Response> {
        self.last_response.as_ref()
    }

    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }

    fn send(&mut self, resp: Response) {
        self.transmit.push_back(resp.clone());
        self.last_response = Some(resp);
    }

    fn terminate(&mut self) {
        if self.state != State::Terminated {
            self.state = State::Terminated;
            self.retransmit = None;
            self.timeout = None;
            self.linger = None;
            self.events.push_back(ServerEvent::Terminated);
        }
    }
}
