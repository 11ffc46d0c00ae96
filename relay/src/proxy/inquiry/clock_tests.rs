//! The inquiry on a virtual clock: forking (first, sequential with its ring timeout, all),
//! CANCEL crossing a 2xx, the release of a late 2xx, Timer C and a planned stop, decided at
//! exact instants with no sockets and no sleeps. Time only moves when a test moves it.
use super::*;
use proto::sip::message::{Limits, Transport};
use std::net::SocketAddr;
use std::sync::Arc;

const CALLER: u16 = 5071;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn settings() -> Arc<Settings> {
    settings_ringing(Duration::from_secs(10))
}

/// The settings with `ring` as the sequential ring timeout.
fn settings_ringing(ring: Duration) -> Arc<Settings> {
    Arc::new(Settings {
        timers: Timers::default(),
        sequential_timeout: ring,
        realm: "relay.test".into(),
        identity: Identity {
            domain: "relay.test".into(),
            advertised: addr(5060),
            bound: addr(5060),
        },
    })
}

fn parse_request(text: &str) -> Request {
    match message::parse(text.replace('\n', "\r\n").as_bytes(), &Limits::default()) {
        Ok(Message::Request(r)) => r,
        other => panic!("not a request: {other:?}"),
    }
}

/// Alice's INVITE for `callee`, as the relay received it.
fn invite(callee: &str) -> Request {
    parse_request(&format!(
        "INVITE sip:{callee}@relay.test SIP/2.0\n\
         Via: SIP/2.0/UDP 127.0.0.1:{CALLER};branch=z9hG4bKalice1;rport={CALLER};received=127.0.0.1\n\
         Max-Forwards: 70\n\
         From: <sip:alice@relay.test>;tag=a1\n\
         To: <sip:{callee}@relay.test>\n\
         Call-ID: call-1@127.0.0.1\n\
         CSeq: 1 INVITE\n\
         Contact: <sip:alice@127.0.0.1:{CALLER}>\n\
         Proxy-Authorization: Digest username=\"alice\", realm=\"relay.test\", nonce=\"n\", uri=\"sip:{callee}@relay.test\", response=\"r\"\n\
         Content-Length: 0\n\n"
    ))
}

/// What the lookups decide for a service INVITE offered to the servers at `ports`, in order.
fn service_decision(req: &Request, fork: Fork, ports: &[u16]) -> Decision {
    let forwards = ports
        .iter()
        .map(|&port| {
            let mut copy = req.clone();
            copy.uri = message::Uri::parse(&format!("sip:wine@127.0.0.1:{port}")).expect("uri");
            Forward {
                req: copy,
                target: Target::udp(addr(port)),
                info: Some(BranchInfo {
                    session_id: format!("sid-{port}"),
                    server: format!("vendor-{port}"),
                }),
            }
        })
        .collect();
    Decision {
        kind: Kind::Invite,
        attempt: Some(Attempt {
            call_id: "call-1@127.0.0.1".into(),
            caller: "alice".into(),
            callee: "wine".into(),
            created_at_ms: 1_796_000_000_000,
            service: Some(crate::session::clock_tests::wine(None)),
            continues: None,
        }),
        fork,
        original_cseq: None,
        action: Action::Forward(forwards),
    }
}

/// A plain call to bob's one device at `port`.
fn call_decision(req: &Request, port: u16) -> Decision {
    let mut copy = req.clone();
    copy.uri = message::Uri::parse(&format!("sip:bob@127.0.0.1:{port}")).expect("uri");
    Decision {
        kind: Kind::Invite,
        attempt: Some(Attempt {
            call_id: "call-1@127.0.0.1".into(),
            caller: "alice".into(),
            callee: "bob".into(),
            created_at_ms: 1_796_000_000_000,
            service: None,
            continues: None,
        }),
        fork: Fork::First,
        original_cseq: None,
        action: Action::Forward(vec![Forward::plain(copy, Target::udp(addr(port)))]),
    }
}

/// One inquiry, everything it sent and reported, and the virtual time.
struct World {
    q: Inquiry,
    now: Instant,
    sent: Vec<(u16, Message)>,
    events: Vec<Event>,
}

impl World {
    fn new(req: Request) -> World {
        World::with(req, settings())
    }

    fn with(req: Request, settings: Arc<Settings>) -> World {
        let now = Instant::now();
        let q = Inquiry::new(req, Target::udp(addr(CALLER)), settings, now);
        let mut w = World {
            q,
            now,
            sent: Vec::new(),
            events: Vec::new(),
        };
        w.drain();
        w
    }

    fn start(&mut self, d: Decision) {
        self.q.start(d, self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(t) = self.q.poll_transmit() {
            self.sent.push((t.target.addr.port(), t.msg));
        }
        while let Some(ev) = self.q.poll_event() {
            self.events.push(ev);
        }
        while self.q.poll_key().is_some() {}
    }

    /// Moves the clock to `now + by`, firing every timer due on the way at its own instant.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(at) = self.q.poll_timeout().filter(|&at| at <= until) {
            self.now = self.now.max(at);
            self.q.handle_timeout(self.now);
            self.drain();
        }
        self.now = until;
    }

    fn requests_to(&self, port: u16, method: Method) -> Vec<&Request> {
        self.sent
            .iter()
            .filter_map(|(p, m)| match m {
                Message::Request(r) if *p == port && r.method == method => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Statuses the caller received, in order.
    fn upstream(&self) -> Vec<u16> {
        self.sent
            .iter()
            .filter_map(|(p, m)| match m {
                Message::Response(r) if *p == CALLER => Some(r.status),
                _ => None,
            })
            .collect()
    }

    /// The device or server at `port` answers its INVITE with `status`.
    fn answer(&mut self, port: u16, status: u16) {
        let invite = (*self.requests_to(port, Method::Invite)[0]).clone();
        let mut resp = message::make_response(&invite, status, None, Some(&format!("t{port}")));
        if (200..300).contains(&status) {
            resp.headers
                .push("Contact", format!("<sip:srv@127.0.0.1:{port}>"));
        }
        self.q.handle_response(resp, self.now);
        self.drain();
    }

    /// The caller acknowledges the final non-2xx it got (RFC 3261 §17.1.1.3).
    fn caller_acks(&mut self) {
        let invite = self.q.request().clone();
        let last = self
            .sent
            .iter()
            .rev()
            .find_map(|(p, m)| match m {
                Message::Response(r) if *p == CALLER && r.status >= 300 => Some(r.clone()),
                _ => None,
            })
            .expect("a final answer to acknowledge");
        let mut ack = invite.clone();
        ack.method = Method::Ack;
        ack.headers.set("CSeq", "1 ACK");
        ack.headers
            .set("To", last.headers.get("To").unwrap_or_default().to_string());
        ack.headers.remove_all("Contact");
        self.q.handle_request(ack, self.now);
        self.drain();
    }

    /// The device at `port` answers the CANCEL it got with 200.
    fn answer_cancel(&mut self, port: u16) {
        let cancel = (*self.requests_to(port, Method::Cancel)[0]).clone();
        let resp = message::make_response(&cancel, 200, None, Some(&format!("t{port}")));
        self.q.handle_response(resp, self.now);
        self.drain();
    }

    fn answered(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Answered { answer, .. } => {
                    Some(answer.session_id.clone().unwrap_or_default())
                }
                _ => None,
            })
            .collect()
    }

    fn failed(&self) -> Vec<(u16, &'static str, Option<String>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Failed {
                    status,
                    reason,
                    offered,
                    ..
                } => Some((
                    *status,
                    *reason,
                    offered.as_ref().map(|o| o.session_id.clone()),
                )),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn the_first_2xx_wins_and_a_2xx_crossing_its_cancel_is_released_by_the_relay() {
    let mut w = World::new(invite("wine"));
    assert_eq!(w.upstream(), vec![100], "an INVITE gets 100 Trying at once");
    let req = w.q.request().clone();
    w.start(service_decision(&req, Fork::First, &[6001, 6002]));
    for port in [6001, 6002] {
        let copy = w.requests_to(port, Method::Invite);
        assert_eq!(copy.len(), 1, "one INVITE to {port}");
        let copy = copy[0];
        assert_eq!(copy.headers.get("Max-Forwards"), Some("69"));
        assert!(
            copy.top_via()
                .is_ok_and(|v| v.host == "127.0.0.1" && v.port == Some(5060)),
            "the relay's Via on top"
        );
        assert_eq!(
            copy.headers.get("Record-Route"),
            Some("<sip:127.0.0.1:5060;lr>")
        );
        assert!(
            copy.headers.get("Proxy-Authorization").is_none(),
            "credentials for the relay's realm are consumed"
        );
    }
    w.advance(Duration::from_millis(10));
    w.answer(6001, 180);
    w.answer(6002, 180);
    assert_eq!(w.upstream(), vec![100, 180, 180]);
    w.advance(Duration::from_millis(10));
    w.answer(6001, 200);
    assert_eq!(w.upstream(), vec![100, 180, 180, 200]);
    assert_eq!(w.answered(), vec!["sid-6001"], "the session is 6001's");
    assert_eq!(
        w.requests_to(6002, Method::Cancel).len(),
        1,
        "the other server is cancelled"
    );
    // 6002 accepted before its CANCEL arrived: the relay ends that dialog itself.
    w.advance(Duration::from_millis(5));
    w.answer(6002, 200);
    assert_eq!(
        w.upstream(),
        vec![100, 180, 180, 200],
        "the caller never sees the second 2xx"
    );
    assert_eq!(w.requests_to(6002, Method::Ack).len(), 1);
    let bye = w.requests_to(6002, Method::Bye);
    assert_eq!(bye.len(), 1, "the released server gets a BYE");
    assert_eq!(bye[0].uri.to_string(), "sip:srv@127.0.0.1:6002");
    assert!(
        bye[0]
            .headers
            .get("Reason")
            .is_some_and(|r| r.contains("answered elsewhere"))
    );
    // Its 2xx retransmitted: ACKed again, still not relayed.
    w.advance(Duration::from_millis(500));
    w.answer(6002, 200);
    assert_eq!(w.requests_to(6002, Method::Ack).len(), 2);
    assert_eq!(w.upstream(), vec![100, 180, 180, 200]);
    assert_eq!(w.answered(), vec!["sid-6001"], "one session");
    assert!(
        w.failed().is_empty(),
        "no failed record: the attempt made a session"
    );
}

#[test]
fn sequential_rings_one_server_at_a_time_and_moves_on_at_the_ring_timeout() {
    let mut w = World::new(invite("wine"));
    let req = w.q.request().clone();
    w.start(service_decision(&req, Fork::Sequential, &[6001, 6002]));
    assert_eq!(w.requests_to(6001, Method::Invite).len(), 1);
    assert!(
        w.requests_to(6002, Method::Invite).is_empty(),
        "the second server waits for the first"
    );
    w.advance(Duration::from_millis(10));
    w.answer(6001, 180);
    w.advance(Duration::from_millis(9_989));
    assert!(
        w.requests_to(6001, Method::Cancel).is_empty(),
        "1 ms before the ring timeout nothing happens"
    );
    w.advance(Duration::from_millis(1));
    assert_eq!(
        w.requests_to(6001, Method::Cancel).len(),
        1,
        "10 s after the INVITE the first server is cancelled"
    );
    assert!(w.requests_to(6002, Method::Invite).is_empty());
    w.answer_cancel(6001);
    w.answer(6001, 487);
    assert_eq!(
        w.requests_to(6001, Method::Ack).len(),
        1,
        "its 487 is acknowledged"
    );
    assert_eq!(
        w.requests_to(6002, Method::Invite).len(),
        1,
        "then the second server rings"
    );
    w.advance(Duration::from_millis(20));
    w.answer(6002, 200);
    assert_eq!(w.upstream(), vec![100, 180, 200]);
    assert_eq!(w.answered(), vec!["sid-6002"]);
    assert!(w.failed().is_empty());
}

#[test]
fn sequential_gives_up_a_silent_server_without_cancelling_it() {
    let mut w = World::new(invite("wine"));
    let req = w.q.request().clone();
    w.start(service_decision(&req, Fork::Sequential, &[6001, 6002]));
    w.advance(Duration::from_secs(10));
    assert!(
        w.requests_to(6001, Method::Cancel).is_empty(),
        "no CANCEL before a provisional answer (RFC 3261 §9.1)"
    );
    assert_eq!(w.requests_to(6002, Method::Invite).len(), 1);
    w.answer(6002, 486);
    assert_eq!(
        w.upstream(),
        vec![100, 486],
        "the real refusal beats the silent server's timeout"
    );
    assert_eq!(
        w.failed(),
        vec![(486, "busy", Some("sid-6002".to_string()))],
        "one failed record, naming the session the answering server was offered"
    );
}

#[test]
fn a_server_given_up_for_its_silence_is_still_cancelled_when_it_rings_later() {
    let mut w = World::new(invite("wine"));
    let req = w.q.request().clone();
    w.start(service_decision(&req, Fork::Sequential, &[6001, 6002]));
    w.advance(Duration::from_secs(10));
    assert_eq!(w.requests_to(6002, Method::Invite).len(), 1);
    w.advance(Duration::from_millis(50));
    w.answer(6002, 180);
    w.advance(Duration::from_millis(50));
    w.q.handle_cancel(w.now);
    w.drain();
    assert_eq!(w.requests_to(6002, Method::Cancel).len(), 1);
    assert!(
        w.requests_to(6001, Method::Cancel).is_empty(),
        "the silent server gets its CANCEL only after a provisional answer"
    );
    w.answer(6002, 487);
    assert_eq!(w.upstream(), vec![100, 180, 487]);
    w.caller_acks();
    // The first server wakes up: its INVITE was still out, so it is cancelled now.
    w.advance(Duration::from_millis(900));
    w.answer(6001, 180);
    assert_eq!(
        w.requests_to(6001, Method::Cancel).len(),
        1,
        "the server given up is cancelled at its first provisional answer"
    );
    w.answer(6001, 487);
    assert_eq!(w.upstream(), vec![100, 180, 487], "nothing more goes up");
    assert_eq!(
        w.failed(),
        vec![(487, "cancelled", Some("sid-6002".to_string()))],
        "one record for the attempt"
    );
    assert!(w.answered().is_empty());
}

#[test]
fn timer_c_and_the_ring_timeout_at_the_same_instant_count_as_a_timeout() {
    let mut w = World::with(invite("wine"), settings_ringing(TIMER_C));
    let req = w.q.request().clone();
    w.start(service_decision(&req, Fork::Sequential, &[6001]));
    w.answer(6001, 180);
    w.advance(TIMER_C);
    assert_eq!(w.requests_to(6001, Method::Cancel).len(), 1);
    w.answer(6001, 487);
    assert_eq!(
        w.upstream(),
        vec![100, 180, 408],
        "it rang out: 408, not the 487 of a cancel nobody asked for"
    );
    assert_eq!(
        w.failed(),
        vec![(408, "timeout", Some("sid-6001".to_string()))]
    );
}

#[test]
fn all_makes_a_session_of_every_2xx_and_cancels_the_undecided_after_the_window() {
    let mut w = World::new(invite("wine"));
    let req = w.q.request().clone();
    w.start(service_decision(&req, Fork::All, &[6001, 6002, 6003]));
    w.advance(Duration::from_millis(10));
    w.answer(6003, 180);
    w.answer(6001, 200);
    w.advance(Duration::from_millis(10));
    w.answer(6002, 200);
    assert_eq!(w.upstream(), vec![100, 180, 200, 200], "both 2xx go up");
    assert_eq!(w.answered(), vec!["sid-6001", "sid-6002"]);
    assert!(w.requests_to(6003, Method::Cancel).is_empty());
    // The third server gets the ring time, counted from the first 2xx, to join.
    w.advance(Duration::from_millis(9_989));
    assert!(w.requests_to(6003, Method::Cancel).is_empty());
    w.advance(Duration::from_millis(1));
    assert_eq!(w.requests_to(6003, Method::Cancel).len(), 1);
    w.answer(6003, 487);
    assert_eq!(
        w.upstream(),
        vec![100, 180, 200, 200],
        "nothing more goes up"
    );
    assert!(w.failed().is_empty());
}

#[test]
fn a_2xx_crossing_the_callers_cancel_goes_up_and_makes_the_session() {
    let mut w = World::new(invite("bob"));
    let req = w.q.request().clone();
    w.start(call_decision(&req, 6001));
    w.advance(Duration::from_millis(10));
    w.answer(6001, 180);
    w.advance(Duration::from_millis(100));
    w.q.handle_cancel(w.now);
    w.drain();
    assert_eq!(w.requests_to(6001, Method::Cancel).len(), 1);
    w.advance(Duration::from_millis(2));
    w.answer(6001, 200);
    assert_eq!(
        w.upstream(),
        vec![100, 180, 200],
        "the callee answered first: the caller gets the 2xx, not 487 (RFC 3261 §9.2)"
    );
    assert_eq!(w.answered().len(), 1);
    assert!(w.failed().is_empty());
}

#[test]
fn a_cancel_before_any_answer_waits_for_a_provisional_then_ends_in_487() {
    let mut w = World::new(invite("bob"));
    let req = w.q.request().clone();
    w.start(call_decision(&req, 6001));
    w.q.handle_cancel(w.now);
    w.drain();
    assert!(w.requests_to(6001, Method::Cancel).is_empty());
    w.advance(Duration::from_millis(30));
    w.answer(6001, 180);
    assert_eq!(w.requests_to(6001, Method::Cancel).len(), 1);
    assert_eq!(w.upstream(), vec![100, 180]);
    w.answer(6001, 487);
    assert_eq!(w.upstream(), vec![100, 180, 487]);
    assert_eq!(w.failed(), vec![(487, "cancelled", None)]);
}

#[test]
fn timer_c_cancels_a_branch_ringing_three_minutes_and_gives_up_after_64_t1() {
    let mut w = World::new(invite("bob"));
    let req = w.q.request().clone();
    w.start(call_decision(&req, 6001));
    w.answer(6001, 180);
    w.advance(TIMER_C - Duration::from_millis(1));
    assert!(w.requests_to(6001, Method::Cancel).is_empty());
    w.advance(Duration::from_millis(1));
    assert_eq!(
        w.requests_to(6001, Method::Cancel).len(),
        1,
        "Timer C: 180 s after the last provisional"
    );
    // The callee never answers, not even the CANCEL: after 64*T1 the caller gets 408.
    w.advance(Timers::default().t1 * 64 - Duration::from_millis(1));
    assert_eq!(w.upstream(), vec![100, 180]);
    w.advance(Duration::from_millis(1));
    assert_eq!(w.upstream(), vec![100, 180, 408]);
    assert_eq!(w.failed(), vec![(408, "timeout", None)]);
}

#[test]
fn a_stopping_relay_cancels_the_callee_and_answers_503_with_retry_after() {
    let mut w = World::new(invite("bob"));
    let req = w.q.request().clone();
    w.start(call_decision(&req, 6001));
    w.answer(6001, 180);
    w.q.handle_stop(w.now);
    w.drain();
    assert_eq!(w.requests_to(6001, Method::Cancel).len(), 1);
    w.answer(6001, 487);
    assert_eq!(w.upstream(), vec![100, 180, 503]);
    let last = w
        .sent
        .iter()
        .rev()
        .find_map(|(p, m)| match m {
            Message::Response(r) if *p == CALLER => Some(r),
            _ => None,
        })
        .expect("a final answer");
    assert_eq!(last.headers.get("Retry-After"), Some("30"));
    assert_eq!(w.failed(), vec![(503, "relay-stop", None)]);
}

#[test]
fn over_tcp_the_callee_side_gets_its_own_record_route() {
    let mut w = World::new(invite("bob"));
    let req = w.q.request().clone();
    let mut d = call_decision(&req, 6001);
    if let Action::Forward(f) = &mut d.action {
        f[0].target = Target::tcp(addr(6001));
    }
    w.start(d);
    let copy = w.requests_to(6001, Method::Invite)[0];
    let rr: Vec<&str> = copy.headers.get_all("Record-Route").collect();
    assert_eq!(
        rr,
        vec![
            "<sip:127.0.0.1:5060;transport=tcp;lr>",
            "<sip:127.0.0.1:5060;lr>"
        ],
        "RFC 5658: one entry per side, the callee's on top"
    );
    assert!(copy.top_via().is_ok_and(|v| v.transport == Transport::Tcp));
}

#[test]
fn failure_reasons_name_the_outcome() {
    assert_eq!(failure_reason(486), "busy");
    assert_eq!(failure_reason(487), "cancelled");
    assert_eq!(failure_reason(480), "not-registered");
    assert_eq!(failure_reason(408), "timeout");
}
