use super::*;
use crate::sip::message::Header;
use bytes::Bytes;

const BRANCH: &str = "z9hG4bK776asdhds";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn uri(user: &str, host: &str) -> Uri {
    Uri {
        secure: false,
        user: Some(user.to_owned()),
        host: host.to_owned(),
        port: None,
        params: vec![],
        headers: None,
    }
}

fn headers(list: &[(&str, &str)]) -> Headers {
    Headers(
        list.iter()
            .map(|(n, v)| Header {
                name: (*n).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
    )
}

fn request_with(method: Method, cseq: &str, extra: &[(&str, &str)]) -> Request {
    let mut list = vec![
        (
            "Via",
            "SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds",
        ),
        ("Max-Forwards", "70"),
        ("To", "Bob <sip:bob@biloxi.com>"),
        ("From", "Alice <sip:alice@atlanta.com>;tag=1928301774"),
        ("Call-ID", "a84b4c76e66710@pc33.atlanta.com"),
        ("CSeq", cseq),
    ];
    list.extend_from_slice(extra);
    Request {
        method,
        uri: uri("bob", "biloxi.com"),
        headers: headers(&list),
        body: Bytes::new(),
    }
}

fn invite() -> Request {
    request_with(Method::Invite, "314159 INVITE", &[])
}

fn options() -> Request {
    request_with(Method::Options, "63104 OPTIONS", &[])
}

/// A response to `req` built by hand (Via list, From, To with a tag, Call-ID, CSeq copied).
fn response(req: &Request, status: u16) -> Response {
    let mut list = Vec::new();
    for h in &req.headers.0 {
        match h.name.as_str() {
            "Via" | "From" | "Call-ID" | "CSeq" => list.push(h.clone()),
            "To" if status > 100 => list.push(Header {
                name: "To".into(),
                value: format!("{};tag=a6c85cf", h.value),
            }),
            "To" => list.push(h.clone()),
            _ => {}
        }
    }
    Response {
        status,
        reason: "Whatever".into(),
        headers: Headers(list),
        body: Bytes::new(),
    }
}

fn ack_for(invite: &Request, resp: &Response) -> Request {
    let mut ack = invite.clone();
    ack.method = Method::Ack;
    ack.headers.0.retain(|h| h.name != "CSeq" && h.name != "To");
    let seq = cseq_number(&invite.headers).unwrap();
    ack.headers.0.push(Header {
        name: "To".into(),
        value: first_header(&resp.headers, "To").unwrap().to_owned(),
    });
    ack.headers.0.push(Header {
        name: "CSeq".into(),
        value: format!("{seq} ACK"),
    });
    ack
}

fn drain_client(tx: &mut ClientTransaction) -> (Vec<Request>, Vec<ClientEvent>) {
    let sent = std::iter::from_fn(|| tx.poll_transmit()).collect();
    let events = std::iter::from_fn(|| tx.poll_event()).collect();
    (sent, events)
}

fn drain_server(tx: &mut ServerTransaction) -> (Vec<Response>, Vec<ServerEvent>) {
    let sent = std::iter::from_fn(|| tx.poll_transmit()).collect();
    let events = std::iter::from_fn(|| tx.poll_event()).collect();
    (sent, events)
}

/// Follows `poll_timeout` up to `until` (inclusive), returning the offsets (ms from `t0`) at which
/// something was sent, and every event.
fn run_client(
    tx: &mut ClientTransaction,
    t0: Instant,
    until: Duration,
) -> (Vec<u128>, Vec<ClientEvent>) {
    let mut times = Vec::new();
    let mut events = Vec::new();
    while let Some(at) = tx.poll_timeout() {
        if at > t0 + until {
            break;
        }
        tx.handle_timeout(at);
        let (sent, evs) = drain_client(tx);
        times.extend(sent.iter().map(|_| (at - t0).as_millis()));
        events.extend(evs);
    }
    (times, events)
}

fn run_server(
    tx: &mut ServerTransaction,
    t0: Instant,
    until: Duration,
) -> (Vec<u128>, Vec<ServerEvent>) {
    let mut times = Vec::new();
    let mut events = Vec::new();
    while let Some(at) = tx.poll_timeout() {
        if at > t0 + until {
            break;
        }
        tx.handle_timeout(at);
        let (sent, evs) = drain_server(tx);
        times.extend(sent.iter().map(|_| (at - t0).as_millis()));
        events.extend(evs);
    }
    (times, events)
}

// ---- INVITE client ----

#[test]
fn invite_client_retransmits_with_timer_a_until_timer_b() {
    let t0 = Instant::now();
    let mut tx = ClientTransaction::new(invite(), false, Timers::default(), t0);
    assert_eq!(tx.state(), State::Calling);
    let (sent, events) = drain_client(&mut tx);
    assert_eq!(sent, vec![invite()]);
    assert!(events.is_empty());
    assert_eq!(tx.poll_timeout(), Some(t0 + ms(500)));

    let (times, events) = run_client(&mut tx, t0, Duration::from_secs(100));
    assert_eq!(times, vec![500, 1500, 3500, 7500, 15500, 31500]);
    assert_eq!(events, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
    assert!(tx.is_terminated());
    assert!(!tx.got_response());
    assert!(!tx.is_completed());
    assert_eq!(tx.poll_timeout(), None);
}

#[test]
fn invite_client_timer_b_follows_t1() {
    let t0 = Instant::now();
    let timers = Timers {
        t1: ms(10),
        t2: ms(40),
        t4: ms(50),
    };
    let mut tx = ClientTransaction::new(invite(), false, timers, t0);
    drain_client(&mut tx);
    let (times, events) = run_client(&mut tx, t0, Duration::from_secs(10));
    assert_eq!(times, vec![10, 30, 70, 150, 310, 630]);
    assert_eq!(events, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
}

#[test]
fn invite_client_late_timeout_does_not_retransmit() {
    let t0 = Instant::now();
    let mut tx = ClientTransaction::new(invite(), false, Timers::default(), t0);
    drain_client(&mut tx);
    tx.handle_timeout(t0 + Duration::from_secs(40));
    let (sent, events) = drain_client(&mut tx);
    assert!(sent.is_empty());
    assert_eq!(events, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
}

#[test]
fn invite_client_provisional_stops_timer_a() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ClientTransaction::new(req.clone(), false, Timers::default(), t0);
    drain_client(&mut tx);
    tx.handle_timeout(t0 + ms(500));
    assert_eq!(drain_client(&mut tx).0.len(), 1);
    let ringing = response(&req, 180);
    tx.handle_response(ringing.clone(), t0 + ms(700));
    let (sent, events) = drain_client(&mut tx);
    assert!(sent.is_empty());
    assert_eq!(events, vec![ClientEvent::Provisional(ringing.clone())]);
    assert_eq!(tx.state(), State::Proceeding);
    assert!(tx.got_response());
    assert!(!tx.is_completed());
    // Neither A nor B is armed any more (Timer C belongs to the proxy core).
    assert_eq!(tx.poll_timeout(), None);
    tx.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(drain_client(&mut tx), (vec![], vec![]));
    // A retransmitted provisional goes up again.
    tx.handle_response(ringing.clone(), t0 + Duration::from_secs(61));
    assert_eq!(
        drain_client(&mut tx).1,
        vec![ClientEvent::Provisional(ringing)]
    );
    assert!(!tx.is_terminated());
}

#[test]
fn invite_client_non_2xx_builds_ack_and_absorbs_retransmissions() {
    let t0 = Instant::now();
    let req = request_with(
        Method::Invite,
        "314159 INVITE",
        &[
            (
                "Via",
                "SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKolder;received=10.0.0.9",
            ),
            ("Route", "<sip:p1.example.com;lr>"),
            ("Route", "<sip:p2.example.com;lr>"),
            ("Contact", "<sip:alice@pc33.atlanta.com>"),
            ("Content-Type", "application/sdp"),
        ],
    );
    let mut req = req;
    req.body = Bytes::from_static(b"v=0\r\n");
    let mut tx = ClientTransaction::new(req.clone(), false, Timers::default(), t0);
    drain_client(&mut tx);
    let busy = response(&req, 486);
    tx.handle_response(busy.clone(), t0 + ms(200));
    let (sent, events) = drain_client(&mut tx);
    assert_eq!(events, vec![ClientEvent::Final(busy.clone())]);
    assert_eq!(tx.state(), State::Completed);
    assert!(tx.is_completed());
    assert!(tx.got_response());
    assert_eq!(sent.len(), 1);
    let ack = &sent[0];
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(ack.uri, req.uri);
    assert!(ack.body.is_empty());
    let expected = headers(&[
        (
            "Via",
            "SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds",
        ),
        ("Max-Forwards", "70"),
        ("Route", "<sip:p1.example.com;lr>"),
        ("Route", "<sip:p2.example.com;lr>"),
        ("From", "Alice <sip:alice@atlanta.com>;tag=1928301774"),
        ("To", "Bob <sip:bob@biloxi.com>;tag=a6c85cf"),
        ("Call-ID", "a84b4c76e66710@pc33.atlanta.com"),
        ("CSeq", "314159 ACK"),
    ]);
    assert_eq!(ack.headers, expected);

    // Timer D is 32 s; a retransmitted 486 meanwhile gets the same ACK and no event.
    assert_eq!(
        tx.poll_timeout(),
        Some(t0 + ms(200) + Duration::from_secs(32))
    );
    tx.handle_response(busy.clone(), t0 + Duration::from_secs(2));
    let (again, events) = drain_client(&mut tx);
    assert_eq!(again, vec![ack.clone()]);
    assert!(events.is_empty());
    // Nothing else is passed up in Completed.
    tx.handle_response(response(&req, 200), t0 + Duration::from_secs(3));
    tx.handle_response(response(&req, 180), t0 + Duration::from_secs(3));
    assert_eq!(drain_client(&mut tx), (vec![], vec![]));

    let (times, events) = run_client(&mut tx, t0, Duration::from_secs(100));
    assert!(times.is_empty());
    assert_eq!(events, vec![ClientEvent::Terminated]);
    assert_eq!(tx.poll_timeout(), None);
}

#[test]
fn invite_client_2xx_goes_to_accepted_and_passes_every_2xx_up() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ClientTransaction::new(req.clone(), false, Timers::default(), t0);
    drain_client(&mut tx);
    tx.handle_response(response(&req, 180), t0 + ms(100));
    drain_client(&mut tx);
    let ok = response(&req, 200);
    tx.handle_response(ok.clone(), t0 + ms(1000));
    let (sent, events) = drain_client(&mut tx);
    assert!(sent.is_empty(), "no ACK for a 2xx from the transaction");
    assert_eq!(events, vec![ClientEvent::Final(ok.clone())]);
    assert_eq!(tx.state(), State::Accepted);
    assert!(tx.is_completed());
    assert_eq!(
        tx.poll_timeout(),
        Some(t0 + ms(1000) + Duration::from_secs(32))
    );

    // Retransmitted 2xx (and a 2xx from another fork) go up; other responses do not.
    tx.handle_response(ok.clone(), t0 + ms(1500));
    let mut other = ok.clone();
    other.headers.0.retain(|h| h.name != "To");
    other.headers.0.push(Header {
        name: "To".into(),
        value: "Bob <sip:bob@biloxi.com>;tag=fork2".into(),
    });
    tx.handle_response(other.clone(), t0 + ms(1600));
    tx.handle_response(response(&req, 486), t0 + ms(1700));
    tx.handle_response(response(&req, 180), t0 + ms(1800));
    let (sent, events) = drain_client(&mut tx);
    assert!(sent.is_empty());
    assert_eq!(
        events,
        vec![ClientEvent::Final(ok), ClientEvent::Final(other)]
    );

    // Timer M.
    tx.handle_timeout(t0 + ms(32_999));
    assert_eq!(drain_client(&mut tx), (vec![], vec![]));
    tx.handle_timeout(t0 + ms(33_000));
    assert_eq!(drain_client(&mut tx).1, vec![ClientEvent::Terminated]);
    assert!(tx.is_terminated());
    tx.handle_response(response(&req, 200), t0 + ms(34_000));
    assert_eq!(drain_client(&mut tx), (vec![], vec![]));
}

#[test]
fn invite_client_reliable_has_no_retransmissions() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ClientTransaction::new(req.clone(), true, Timers::default(), t0);
    assert_eq!(drain_client(&mut tx).0.len(), 1);
    assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    let (times, events) = run_client(&mut tx, t0, Duration::from_secs(100));
    assert!(times.is_empty());
    assert_eq!(events, vec![ClientEvent::Timeout, ClientEvent::Terminated]);

    // A non-2xx on a reliable transport: ACK, and Timer D is zero.
    let mut tx = ClientTransaction::new(req.clone(), true, Timers::default(), t0);
    drain_client(&mut tx);
    let busy = response(&req, 486);
    tx.handle_response(busy.clone(), t0 + ms(10));
    let (sent, events) = drain_client(&mut tx);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, Method::Ack);
    assert_eq!(
        events,
        vec![ClientEvent::Final(busy), ClientEvent::Terminated]
    );
    assert!(tx.is_terminated());
    assert_eq!(tx.poll_timeout(), None);
}

#[test]
fn client_transport_error_terminates() {
    let t0 = Instant::now();
    let mut tx = ClientTransaction::new(invite(), false, Timers::default(), t0);
    drain_client(&mut tx);
    tx.handle_transport_error(t0);
    assert_eq!(
        drain_client(&mut tx).1,
        vec![ClientEvent::TransportError, ClientEvent::Terminated]
    );
    assert_eq!(tx.poll_timeout(), None);
    tx.handle_transport_error(t0);
    assert_eq!(drain_client(&mut tx), (vec![], vec![]));
}

// ---- non-INVITE client ----

#[test]
fn non_invite_client_timer_e_capped_at_t2_until_timer_f() {
    let t0 = Instant::now();
    let mut tx = ClientTransaction::new(options(), false, Timers::default(), t0);
    assert_eq!(tx.state(), State::Trying);
    assert_eq!(drain_client(&mut tx).0, vec![options()]);
    let (times, events) = run_client(&mut tx, t0, Duration::from_secs(100));
    assert_eq!(
        times,
        vec![
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    assert_eq!(events, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
}

#[test]
fn non_invite_client_proceeding_then_final_then_timer_k() {
    let t0 = Instant::now();
    let req = options();
    let mut tx = ClientTransaction::new(req.clone(), false, Timers::default(), t0);
    drain_client(&mut tx);
    let (times, _) = run_client(&mut tx, t0, ms(500));
    assert_eq!(times, vec![500]);
    let trying = response(&req, 100);
    tx.handle_response(trying.clone(), t0 + ms(600));
    assert_eq!(
        drain_client(&mut tx).1,
        vec![ClientEvent::Provisional(trying)]
    );
    assert_eq!(tx.state(), State::Proceeding);
    // E fires at 1.5 s as scheduled, then every T2.
    let (times, _) = run_client(&mut tx, t0, ms(10_000));
    assert_eq!(times, vec![1500, 5500, 9500]);

    let ok = response(&req, 200);
    tx.handle_response(ok.clone(), t0 + ms(10_000));
    assert_eq!(
        drain_client(&mut tx),
        (vec![], vec![ClientEvent::Final(ok.clone())])
    );
    assert_eq!(tx.state(), State::Completed);
    assert!(tx.is_completed());
    // Timer K = T4.
    assert_eq!(tx.poll_timeout(), Some(t0 + ms(15_000)));
    tx.handle_response(ok, t0 + ms(11_000));
    assert_eq!(drain_client(&mut tx), (vec![], vec![]));
    let (times, events) = run_client(&mut tx, t0, Duration::from_secs(100));
    assert!(times.is_empty());
    assert_eq!(events, vec![ClientEvent::Terminated]);
}

#[test]
fn non_invite_client_reliable_terminates_on_final() {
    let t0 = Instant::now();
    let req = options();
    let mut tx = ClientTransaction::new(req.clone(), true, Timers::default(), t0);
    drain_client(&mut tx);
    assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    let nope = response(&req, 404);
    tx.handle_response(nope.clone(), t0 + ms(50));
    assert_eq!(
        drain_client(&mut tx),
        (
            vec![],
            vec![ClientEvent::Final(nope), ClientEvent::Terminated]
        )
    );
    assert_eq!(tx.poll_timeout(), None);
}

// ---- INVITE server ----

#[test]
fn invite_server_resends_provisional_then_retransmits_final_until_ack() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ServerTransaction::new(req.clone(), false, Timers::default(), t0);
    assert_eq!(tx.state(), State::Proceeding);
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));
    assert_eq!(tx.poll_timeout(), None);
    // A retransmission before any response: nothing to resend.
    tx.handle_request(req.clone(), t0 + ms(100));
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));

    let trying = response(&req, 100);
    tx.send_response(trying.clone(), t0 + ms(100));
    assert_eq!(drain_server(&mut tx).0, vec![trying.clone()]);
    tx.handle_request(req.clone(), t0 + ms(500));
    assert_eq!(drain_server(&mut tx).0, vec![trying.clone()]);
    assert_eq!(tx.last_response(), Some(&trying));

    let busy = response(&req, 486);
    tx.send_response(busy.clone(), t0);
    assert_eq!(drain_server(&mut tx).0, vec![busy.clone()]);
    assert_eq!(tx.state(), State::Completed);
    assert_eq!(tx.last_response(), Some(&busy));
    // Later responses are ignored.
    tx.send_response(response(&req, 200), t0);
    tx.send_response(response(&req, 180), t0);
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));

    // Timer G: 0.5, 1.5, 3.5, 7.5, 11.5 (interval capped at T2).
    let (times, events) = run_server(&mut tx, t0, ms(12_000));
    assert_eq!(times, vec![500, 1500, 3500, 7500, 11500]);
    assert!(events.is_empty());
    // A retransmitted INVITE gets the final response again.
    tx.handle_request(req.clone(), t0 + ms(12_000));
    assert_eq!(drain_server(&mut tx).0, vec![busy.clone()]);

    tx.handle_request(ack_for(&req, &busy), t0 + ms(13_000));
    assert_eq!(drain_server(&mut tx), (vec![], vec![ServerEvent::Acked]));
    assert_eq!(tx.state(), State::Confirmed);
    // Timer I = T4; retransmitted ACKs and INVITEs are absorbed meanwhile.
    assert_eq!(tx.poll_timeout(), Some(t0 + ms(18_000)));
    tx.handle_request(ack_for(&req, &busy), t0 + ms(14_000));
    tx.handle_request(req.clone(), t0 + ms(14_000));
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));
    let (times, events) = run_server(&mut tx, t0, Duration::from_secs(100));
    assert!(times.is_empty());
    assert_eq!(events, vec![ServerEvent::Terminated]);
    assert_eq!(tx.poll_timeout(), None);
}

#[test]
fn invite_server_timer_h_without_ack() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ServerTransaction::new(req.clone(), false, Timers::default(), t0);
    tx.send_response(response(&req, 603), t0);
    assert_eq!(drain_server(&mut tx).0.len(), 1);
    let (times, events) = run_server(&mut tx, t0, Duration::from_secs(100));
    assert_eq!(
        times,
        vec![
            500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
    );
    assert_eq!(
        events,
        vec![ServerEvent::AckTimeout, ServerEvent::Terminated]
    );
    assert!(tx.is_terminated());
}

#[test]
fn invite_server_reliable_no_g_and_i_is_zero() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ServerTransaction::new(req.clone(), true, Timers::default(), t0);
    let busy = response(&req, 486);
    tx.send_response(busy.clone(), t0);
    assert_eq!(drain_server(&mut tx).0, vec![busy.clone()]);
    // Only H is armed.
    assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    tx.handle_request(ack_for(&req, &busy), t0 + ms(100));
    assert_eq!(
        drain_server(&mut tx),
        (vec![], vec![ServerEvent::Acked, ServerEvent::Terminated])
    );
    assert_eq!(tx.poll_timeout(), None);
}

#[test]
fn invite_server_2xx_goes_to_accepted() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ServerTransaction::new(req.clone(), false, Timers::default(), t0);
    tx.send_response(response(&req, 180), t0);
    drain_server(&mut tx);
    let ok = response(&req, 200);
    tx.send_response(ok.clone(), t0 + ms(1000));
    assert_eq!(drain_server(&mut tx), (vec![ok.clone()], vec![]));
    assert_eq!(tx.state(), State::Accepted);
    // Timer L only: no retransmission of the 2xx by the transaction.
    assert_eq!(tx.poll_timeout(), Some(t0 + ms(33_000)));
    // Retransmitted INVITEs are absorbed, nothing is resent.
    tx.handle_request(req.clone(), t0 + ms(1500));
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));
    // The user's 2xx retransmissions pass through; anything else is ignored.
    tx.send_response(ok.clone(), t0 + ms(1500));
    tx.send_response(response(&req, 486), t0 + ms(1600));
    tx.send_response(response(&req, 180), t0 + ms(1600));
    assert_eq!(drain_server(&mut tx), (vec![ok.clone()], vec![]));
    tx.handle_request(ack_for(&req, &ok), t0 + ms(1700));
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));

    let (times, events) = run_server(&mut tx, t0, Duration::from_secs(100));
    assert!(times.is_empty());
    assert_eq!(events, vec![ServerEvent::Terminated]);
}

#[test]
fn server_transport_error_terminates() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ServerTransaction::new(req.clone(), false, Timers::default(), t0);
    tx.send_response(response(&req, 500), t0);
    drain_server(&mut tx);
    tx.handle_transport_error(t0 + ms(10));
    assert_eq!(
        drain_server(&mut tx),
        (
            vec![],
            vec![ServerEvent::TransportError, ServerEvent::Terminated]
        )
    );
    assert_eq!(tx.poll_timeout(), None);
}

#[test]
fn server_late_timeout_fires_h_not_g() {
    let t0 = Instant::now();
    let req = invite();
    let mut tx = ServerTransaction::new(req.clone(), false, Timers::default(), t0);
    tx.send_response(response(&req, 500), t0);
    drain_server(&mut tx);
    tx.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(
        drain_server(&mut tx),
        (
            vec![],
            vec![ServerEvent::AckTimeout, ServerEvent::Terminated]
        )
    );
}

// ---- non-INVITE server ----

#[test]
fn non_invite_server_answers_retransmissions_then_timer_j() {
    let t0 = Instant::now();
    let req = options();
    let mut tx = ServerTransaction::new(req.clone(), false, Timers::default(), t0);
    assert_eq!(tx.state(), State::Trying);
    assert_eq!(tx.poll_timeout(), None);
    // Trying: retransmissions are discarded.
    tx.handle_request(req.clone(), t0 + ms(500));
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));
    let trying = response(&req, 100);
    tx.send_response(trying.clone(), t0 + ms(600));
    assert_eq!(tx.state(), State::Proceeding);
    assert_eq!(drain_server(&mut tx).0, vec![trying.clone()]);
    tx.handle_request(req.clone(), t0 + ms(1500));
    assert_eq!(drain_server(&mut tx).0, vec![trying]);

    let ok = response(&req, 200);
    tx.send_response(ok.clone(), t0 + ms(2000));
    assert_eq!(drain_server(&mut tx), (vec![ok.clone()], vec![]));
    assert_eq!(tx.state(), State::Completed);
    tx.send_response(response(&req, 500), t0 + ms(2100));
    assert_eq!(drain_server(&mut tx), (vec![], vec![]));
    tx.handle_request(req.clone(), t0 + ms(3500));
    assert_eq!(drain_server(&mut tx).0, vec![ok.clone()]);
    assert_eq!(tx.last_response(), Some(&ok));

    // Timer J = 64*T1, no retransmission of its own.
    assert_eq!(tx.poll_timeout(), Some(t0 + ms(34_000)));
    let (times, events) = run_server(&mut tx, t0, Duration::from_secs(100));
    assert!(times.is_empty());
    assert_eq!(events, vec![ServerEvent::Terminated]);
}

#[test]
fn non_invite_server_reliable_terminates_on_final() {
    let t0 = Instant::now();
    let req = options();
    let mut tx = ServerTransaction::new(req.clone(), true, Timers::default(), t0);
    let ok = response(&req, 200);
    tx.send_response(ok.clone(), t0);
    assert_eq!(
        drain_server(&mut tx),
        (vec![ok], vec![ServerEvent::Terminated])
    );
    assert_eq!(tx.poll_timeout(), None);
}

// ---- keys ----

#[test]
fn server_key_maps_ack_to_invite() {
    let req = invite();
    let key = TxKey::server(&req).unwrap();
    assert_eq!(
        key,
        TxKey {
            branch: BRANCH.into(),
            sent_by: "pc33.atlanta.com:5060".into(),
            method: Method::Invite
        }
    );
    let ack = ack_for(&req, &response(&req, 486));
    assert_eq!(TxKey::server(&ack), Some(key.clone()));
    let tx = ServerTransaction::new(req, false, Timers::default(), Instant::now());
    assert_eq!(tx.key(), &key);
}

#[test]
fn cancel_key_maps_to_invite() {
    let req = invite();
    let cancel = request_with(Method::Cancel, "314159 CANCEL", &[]);
    let own = TxKey::server(&cancel).unwrap();
    assert_eq!(own.method, Method::Cancel);
    assert_ne!(Some(own), TxKey::server(&req));
    assert_eq!(TxKey::invite_for_cancel(&cancel), TxKey::server(&req));
}

#[test]
fn server_key_sent_by_and_branch() {
    let mut req = invite();
    req.headers.0[0].value = "SIP/2.0/TLS PC33.Atlanta.com;branch=z9hG4bKabc".into();
    assert_eq!(
        TxKey::server(&req).unwrap().sent_by,
        "pc33.atlanta.com:5061"
    );
    req.headers.0[0].value = "SIP/2.0/UDP [2001:db8::1]:5080;branch=z9hG4bKabc".into();
    assert_eq!(TxKey::server(&req).unwrap().sent_by, "[2001:db8::1]:5080");
    let other = {
        let mut r = req.clone();
        r.headers.0[0].value = "SIP/2.0/UDP [2001:db8::1]:5081;branch=z9hG4bKabc".into();
        r
    };
    assert_ne!(TxKey::server(&req), TxKey::server(&other));
    req.headers.0[0].value = "SIP/2.0/UDP 10.0.0.1;branch=1234".into();
    assert_eq!(TxKey::server(&req), None);
}

#[test]
fn client_key_of_response_matches_request() {
    let req = invite();
    let key = TxKey::client_for_request(&req).unwrap();
    assert_eq!(
        key,
        TxKey {
            branch: BRANCH.into(),
            sent_by: String::new(),
            method: Method::Invite
        }
    );
    assert_eq!(TxKey::client(&response(&req, 180)), Some(key.clone()));
    assert_eq!(TxKey::client(&response(&req, 486)), Some(key.clone()));
    let tx = ClientTransaction::new(req, false, Timers::default(), Instant::now());
    assert_eq!(tx.key(), &key);
    // The response to a CANCEL with the same branch belongs to the CANCEL's transaction.
    let cancel = request_with(Method::Cancel, "314159 CANCEL", &[]);
    let cancel_key = TxKey::client_for_request(&cancel).unwrap();
    assert_ne!(cancel_key, key);
    assert_eq!(TxKey::client(&response(&cancel, 200)), Some(cancel_key));
}

#[test]
fn rfc2543_keys() {
    let via = ("Via", "SIP/2.0/UDP oldphone.example.com:5060");
    let mut req = invite();
    req.headers.0[0].value = via.1.into();
    assert_eq!(TxKey::server(&req), None);
    let key = TxKey::server_2543(&req).unwrap();
    assert!(key.is_rfc2543());
    assert_eq!(key.method, Method::Invite);
    assert_eq!(key.sent_by, "oldphone.example.com:5060");
    assert_eq!(TxKey::server_2543(&req.clone()), Some(key.clone()));

    // The ACK carries the response's To tag and still matches.
    let ack = ack_for(&req, &response(&req, 486));
    assert_eq!(TxKey::server_2543(&ack), Some(key.clone()));
    // So does a CANCEL through invite_for_cancel, but not by its own key.
    let mut cancel = request_with(Method::Cancel, "314159 CANCEL", &[]);
    cancel.headers.0[0].value = via.1.into();
    assert_eq!(TxKey::invite_for_cancel(&cancel), Some(key.clone()));
    assert_ne!(TxKey::server_2543(&cancel), Some(key.clone()));
    // A new request (other CSeq) is another transaction.
    let mut next = req.clone();
    set_header(&mut next.headers, "CSeq", "314160 INVITE");
    assert_ne!(TxKey::server_2543(&next), Some(key.clone()));
    // The server transaction falls back to it.
    let tx = ServerTransaction::new(req, false, Timers::default(), Instant::now());
    assert_eq!(tx.key(), &key);
}

fn set_header(headers: &mut Headers, name: &str, value: &str) {
    for h in headers.0.iter_mut().filter(|h| h.name == name) {
        h.value = value.to_owned();
    }
}

#[test]
fn requests_without_readable_via_never_panic() {
    let t0 = Instant::now();
    let mut req = invite();
    req.headers
        .0
        .retain(|h| h.name != "Via" && h.name != "CSeq");
    assert_eq!(TxKey::server(&req), None);
    assert_eq!(TxKey::server_2543(&req), None);
    assert_eq!(TxKey::client_for_request(&req), None);
    let mut c = ClientTransaction::new(req.clone(), false, Timers::default(), t0);
    c.handle_response(
        Response {
            status: 500,
            reason: String::new(),
            headers: Headers::default(),
            body: Bytes::new(),
        },
        t0,
    );
    let (sent, _) = drain_client(&mut c);
    assert_eq!(sent.last().map(|r| r.method), Some(Method::Ack));
    let mut s = ServerTransaction::new(req, false, Timers::default(), t0);
    s.send_response(
        Response {
            status: 999,
            reason: String::new(),
            headers: Headers::default(),
            body: Bytes::new(),
        },
        t0,
    );
    assert_eq!(s.state(), State::Completed);
}
