//! RFC 3261 §17.1 client transactions (INVITE: figure 5 as amended by RFC 6026; non-INVITE:
//! figure 6).

use super::{
    Class, Retransmit, State, TIMER_D, Timers, TxKey, classify, cseq_number, earliest, first_header,
};
use crate::sip::message::{Header, Headers, Method, Request, Response};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What a client transaction reports to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// 1xx.
    Provisional(Response),
    /// 2xx–6xx (for INVITE, every 2xx, retransmissions included, while Accepted).
    Final(Response),
    /// Timer B or F fired: no final response (the user synthesises 408).
    Timeout,
    /// The transport reported a failure for this transaction.
    TransportError,
    /// The transaction is over and can be dropped.
    Terminated,
}

/// RFC 3261 §17.1 client transaction, INVITE or non-INVITE by the request's method.
#[derive(Debug)]
pub struct ClientTransaction {
    key: TxKey,
    request: Request,
    invite: bool,
    reliable: bool,
    timers: Timers,
    state: State,
    /// The ACK for a non-2xx final response to an INVITE, kept for retransmitted finals.
    ack: Option<Request>,
    transmit: VecDeque<Request>,
    events: VecDeque<ClientEvent>,
    /// Timer A (INVITE) or E (non-INVITE); never armed on reliable transports.
    retransmit: Option<Retransmit>,
    /// Timer B (INVITE) or F (non-INVITE).
    timeout: Option<Instant>,
    /// Timer D (Completed, INVITE), K (Completed, non-INVITE) or M (Accepted, INVITE).
    linger: Option<Instant>,
    got_response: bool,
    got_final: bool,
}

impl ClientTransaction {
    /// Starts the transaction: the request is queued for sending at once, and timers A/B (INVITE)
    /// or E/F (non-INVITE) armed; A and E only when `reliable` is false.
    pub fn new(
        request: Request,
        reliable: bool,
        timers: Timers,
        now: Instant,
    ) -> ClientTransaction {
        let key = TxKey::client_for_request(&request).unwrap_or_else(|| TxKey {
            branch: String::new(),
            sent_by: String::new(),
            method: request.method,
        });
        let invite = request.method == Method::Invite;
        let mut transmit = VecDeque::new();
        transmit.push_back(request.clone());
        ClientTransaction {
            key,
            invite,
            reliable,
            timers,
            state: if invite {
                State::Calling
            } else {
                State::Trying
            },
            ack: None,
            transmit,
            events: VecDeque::new(),
            retransmit: (!reliable).then(|| Retransmit::start(now, timers.t1)),
            timeout: Some(now + timers.t1x64()),
            linger: None,
            got_response: false,
            got_final: false,
            request,
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

    /// A response whose [`TxKey::client`] matched this transaction. For a non-2xx final response to
    /// an INVITE the transaction builds and queues the ACK itself (§17.1.1.3).
    pub fn handle_response(&mut self, resp: Response, now: Instant) {
        let class = classify(resp.status);
        match (self.state, class) {
            (State::Calling | State::Trying | State::Proceeding, Class::Provisional) => {
                self.got_response = true;
                self.state = State::Proceeding;
                if self.invite {
                    // §17.1.1.2: a provisional response stops A (and B: Timer C is the proxy's).
                    self.retransmit = None;
                    self.timeout = None;
                }
                // Non-INVITE: E goes on (at T2 from its next firing), F still runs.
                self.events.push_back(ClientEvent::Provisional(resp));
            }
            (State::Calling | State::Proceeding, Class::Success) if self.invite => {
                self.got_response = true;
                self.got_final = true;
                self.stop_request_timers();
                self.state = State::Accepted;
                self.linger = Some(now + self.timers.t1x64()); // Timer M
                self.events.push_back(ClientEvent::Final(resp));
            }
            (State::Calling | State::Proceeding, Class::Failure) if self.invite => {
                self.got_response = true;
                self.got_final = true;
                self.stop_request_timers();
                let ack = build_ack(&self.request, &resp);
                self.transmit.push_back(ack.clone());
                self.ack = Some(ack);
                self.events.push_back(ClientEvent::Final(resp));
                self.complete(now, TIMER_D);
            }
            (State::Trying | State::Proceeding, Class::Success | Class::Failure) => {
                self.got_response = true;
                self.got_final = true;
                self.stop_request_timers();
                self.events.push_back(ClientEvent::Final(resp));
                self.complete(now, self.timers.t4); // Timer K
            }
            (State::Completed, Class::Failure) if self.invite => {
                // A retransmitted final response: ACK it again, tell no one.
                if let Some(ack) = &self.ack {
                    self.transmit.push_back(ack.clone());
                }
            }
            (State::Accepted, Class::Success) => {
                // RFC 6026: every 2xx goes up (retransmissions and other forks alike).
                self.events.push_back(ClientEvent::Final(resp));
            }
            // Anything else (a late provisional, a non-2xx after a 2xx, any response once
            // Completed or Terminated) is absorbed.
            _ => {}
        }
    }

    /// Fires every timer due at `now`. A due B/F (or D/K/M) ends the transaction without a last
    /// retransmission; a due A/E retransmits once and re-arms from `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Terminated {
            return;
        }
        if self.timeout.is_some_and(|at| at <= now) {
            // Timer B or F.
            self.timeout = None;
            self.events.push_back(ClientEvent::Timeout);
            self.terminate();
        } else if self.linger.is_some_and(|at| at <= now) {
            // Timer D, K or M.
            self.linger = None;
            self.terminate();
        } else if self.retransmit.is_some_and(|r| r.at <= now) {
            self.fire_retransmit(now);
        }
    }

    /// A transport failure while the request is outstanding tells the user and ends the
    /// transaction. After a final response (the user has its answer) the transaction just ends;
    /// in Accepted nothing is sent by the transaction, so the failure is not its own and is
    /// ignored.
    pub fn handle_transport_error(&mut self, _now: Instant) {
        match self.state {
            State::Calling | State::Trying | State::Proceeding => {
                self.events.push_back(ClientEvent::TransportError);
                self.terminate();
            }
            State::Completed => self.terminate(),
            State::Accepted | State::Confirmed | State::Terminated => {}
        }
    }

    /// Next request to send: the first send, a retransmission, or the ACK for a non-2xx.
    pub fn poll_transmit(&mut self) -> Option<Request> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must next be called; `None` once terminated.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Terminated {
            return None;
        }
        earliest(&[self.retransmit.map(|r| r.at), self.timeout, self.linger])
    }

    /// True once a provisional or final response arrived (a CANCEL may be sent only then).
    pub fn got_response(&self) -> bool {
        self.got_response
    }

    /// True once a final response arrived.
    pub fn is_completed(&self) -> bool {
        self.got_final
    }

    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }

    fn fire_retransmit(&mut self, now: Instant) {
        let Some(timer) = self.retransmit else { return };
        match self.state {
            // Timer A: doubling without bound.
            State::Calling => {
                self.transmit.push_back(self.request.clone());
                self.retransmit = Some(timer.next(now, None));
            }
            // Timer E: doubling up to T2 while Trying, T2 once Proceeding.
            State::Trying if !self.invite => {
                self.transmit.push_back(self.request.clone());
                self.retransmit = Some(timer.next(now, Some(self.timers.t2)));
            }
            State::Proceeding if !self.invite => {
                self.transmit.push_back(self.request.clone());
                self.retransmit = Some(Retransmit {
                    at: now + self.timers.t2,
                    interval: self.timers.t2,
                });
            }
            _ => self.retransmit = None,
        }
    }

    fn stop_request_timers(&mut self) {
        self.retransmit = None;
        self.timeout = None;
    }

    /// Enters Completed, lingering `wait` on unreliable transports (Timer D or K); on reliable
    /// ones those timers are zero, so the transaction ends at once.
    fn complete(&mut self, now: Instant, wait: Duration) {
        if self.reliable {
            self.terminate();
        } else {
            self.state = State::Completed;
            self.linger = Some(now + wait);
        }
    }

    fn terminate(&mut self) {
        if self.state != State::Terminated {
            self.state = State::Terminated;
            self.retransmit = None;
            self.timeout = None;
            self.linger = None;
            self.events.push_back(ClientEvent::Terminated);
        }
    }
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): Request-URI, Call-ID, From and the
/// CSeq number of the INVITE with method ACK, To of the response, the INVITE's top Via only, its
/// Route headers, Max-Forwards 70, no body.
fn build_ack(invite: &Request, resp: &Response) -> Request {
    let mut headers = Vec::new();
    let mut push = |name: &str, value: &str| {
        headers.push(Header {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    };
    if let Some(via) = first_header(&invite.headers, "Via") {
        push("Via", via);
    }
    push("Max-Forwards", "70");
    for route in invite.headers.get_all("Route") {
        push("Route", route);
    }
    if let Some(from) = first_header(&invite.headers, "From") {
        push("From", from);
    }
    if let Some(to) =
        first_header(&resp.headers, "To").or_else(|| first_header(&invite.headers, "To"))
    {
        push("To", to);
    }
    if let Some(call_id) = first_header(&invite.headers, "Call-ID") {
        push("Call-ID", call_id);
    }
    let seq = cseq_number(&invite.headers).unwrap_or(1);
    push("CSeq", &format!("{seq} ACK"));
    Request {
        method: Method::Ack,
        uri: invite.uri.clone(),
        headers: Headers(headers),
        body: Bytes::new(),
    }
}
