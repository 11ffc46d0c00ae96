//! The agent in-process against a relay in-process (SQLite), on real UDP sockets on 127.0.0.1.

mod support;

use app_server_agent::{EndedBy, Event};
use proto::service::{SERVICE_ACCESS_TYPE, SERVICE_REQUEST_TYPE, ServiceAccess, assertion_key};
use proto::sip::message::{self, Method};
use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const SDP_OFFER: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                         m=audio 29526 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n";

fn token_of(url: &str) -> String {
    url.split_once("token=")
        .map(|(_, t)| t.to_string())
        .unwrap_or_default()
}

/// The introspection of a token whose session was just acknowledged: the ACK travels on its
/// own, so this waits (up to 5 s) for the token to turn active.
async fn introspect_acked(agent: &Agent, token: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = introspect(agent, token).await;
        if v["active"] == true || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn introspect(agent: &Agent, token: &str) -> Value {
    let (status, body) = http(
        agent.http(),
        "POST",
        "/introspect",
        Some("application/x-www-form-urlencoded"),
        &format!("token={token}"),
    )
    .await
    .expect("introspection answered");
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn direct_invites_without_a_valid_assertion_get_403() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let ev = agent
        .until(5, |e| matches!(e, Event::Registered { .. }))
        .await
        .unwrap();
    assert_eq!(
        ev.to_string(),
        format!("registered wine with {} (expires 300 s)", relay.addr())
    );
    let uac = Uac::bind().await.unwrap();
    let target = agent.sip();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());

    let key = vendor_key();
    let mut expired = assertion("c-expired", "s-expired");
    expired.exp = now_unix() - 10;
    let mut other_server = assertion("c-server", "s-server");
    other_server.server = "someone-else".into();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("c-none", None),
        (
            "c-key",
            Some(assertion("c-key", "s-key").sign(&assertion_key("wrong"))),
        ),
        ("c-expired", Some(expired.sign(&key))),
        (
            "c-other",
            Some(assertion("c-elsewhere", "s-other").sign(&key)),
        ),
        ("c-server", Some(other_server.sign(&key))),
        ("c-garbage", Some("not.an-assertion".into())),
    ];
    for (call_id, a) in cases {
        let invite = uac.invite(&ruri, call_id, a.as_deref(), None).unwrap();
        let call = uac.send(invite, target, false).await.unwrap();
        assert_eq!(call.final_response.status, 403, "{call_id}");
        assert_eq!(
            call.final_response.reason, "Not vouched for by the relay",
            "{call_id}"
        );
        assert!(call.final_response.body.is_empty());
    }
    assert_eq!(agent.handle.live_sessions(), 0);
    let ev = agent
        .until(5, |e| matches!(e, Event::Refused { .. }))
        .await
        .unwrap();
    assert!(
        ev.to_string()
            .contains("refused: 403 not vouched for by the relay"),
        "{ev}"
    );
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_vouched_session_gets_a_token_that_lives_until_bye() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let signed = assertion("c1", "sid-1").sign(&vendor_key());
    let body = r#"{"detail":"red, 2015","lang":"fr"}"#;
    let invite = uac
        .invite(
            &ruri,
            "c1",
            Some(&signed),
            Some((SERVICE_REQUEST_TYPE, body)),
        )
        .unwrap();
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    let ok = &call.final_response;
    assert_eq!(ok.status, 200);
    assert!(call.provisional.contains(&100));
    assert!(ok.to().unwrap().tag().is_some());
    assert!(ok.headers.get("Contact").unwrap().contains("sip:wine@"));
    assert_eq!(ok.headers.get("Content-Type"), Some(SERVICE_ACCESS_TYPE));
    let access = ServiceAccess::parse(&ok.body).unwrap();
    assert!(
        access.url.starts_with(&format!("{URL}?token=")),
        "{}",
        access.url
    );
    let token = token_of(&access.url);
    assert!(token.len() >= 32);
    assert_eq!(
        (
            access.service.as_str(),
            access.session_id.as_str(),
            access.server.as_str()
        ),
        ("wine", "sid-1", ACCOUNT)
    );
    assert_eq!(agent.handle.live_sessions(), 1);
    let ev = agent
        .until(5, |e| matches!(e, Event::Accepted { .. }))
        .await
        .unwrap();
    assert_eq!(
        ev.to_string(),
        format!("session sid-1 for alice: accepted, {URL} (wine)")
    );

    let (mut dialog, hop) = uac.ack(&call).await.unwrap();
    let active = introspect_acked(&agent, &token).await;
    assert_eq!(active["active"], true);
    assert_eq!(active["sub"], "alice");
    assert_eq!(active["username"], "alice");
    assert_eq!(active["sid"], "sid-1");
    assert_eq!(active["service"], "wine");
    assert_eq!(active["scope"], "wine");
    assert_eq!(active["detail"], "red, 2015");
    assert_eq!(active["server"], ACCOUNT);
    let iat = active["iat"].as_u64().unwrap();
    assert_eq!(active["exp"].as_u64().unwrap(), iat + 12 * 3600);
    // The same as JSON.
    let (status, same) = http(
        agent.http(),
        "POST",
        "/introspect",
        Some("application/json"),
        &json!({"token": token}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!((status, &same), (200, &active));
    let (status, list) = http(agent.http(), "GET", "/sessions", None, "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(list[0]["sid"], "sid-1");
    assert_eq!(list[0]["user"], "alice");
    assert_eq!(list[0]["service"], "wine");

    // A keepalive OPTIONS in the dialog (any CSeq), then BYE.
    dialog.local_seq += 100;
    let resp = uac
        .in_dialog(&mut dialog, hop, Method::Options)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let resp = uac.in_dialog(&mut dialog, hop, Method::Bye).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(introspect(&agent, &token).await, json!({"active": false}));
    assert_eq!(agent.handle.live_sessions(), 0);
    let ev = agent
        .until(5, |e| matches!(e, Event::Ended { .. }))
        .await
        .unwrap();
    assert_eq!(
        ev.to_string(),
        "session sid-1 for alice ended by the client"
    );
    // The dialog is gone: 481.
    let resp = uac.in_dialog(&mut dialog, hop, Method::Bye).await.unwrap();
    assert_eq!(resp.status, 481);
    // The same assertion again (a replay) is refused.
    let again = uac.invite(&ruri, "c1", Some(&signed), None).unwrap();
    let call = uac.send(again, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 403);
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn bye_before_ack_ends_the_session_and_the_late_ack_is_absorbed() {
    let relay = TestRelay::start().await.unwrap();
    let agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let signed = assertion("c-order", "sid-order").sign(&vendor_key());
    let invite = uac.invite(&ruri, "c-order", Some(&signed), None).unwrap();
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 200);
    let mut dialog = proto::sip::dialog::Dialog::uac(&call.invite, &call.final_response).unwrap();
    let hop = agent.sip();
    let resp = uac.in_dialog(&mut dialog, hop, Method::Bye).await.unwrap();
    assert_eq!(resp.status, 200);
    uac.ack(&call).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(agent.handle.live_sessions(), 0);
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn capacity_refuses_with_486_and_retry_after() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &["--capacity", "1", "--retry-after", "7"])
        .await
        .unwrap();
    let uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let key = vendor_key();
    let first = uac
        .invite(
            &ruri,
            "cap-1",
            Some(&assertion("cap-1", "s-cap-1").sign(&key)),
            None,
        )
        .unwrap();
    let call = uac.send(first, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 200);
    uac.ack(&call).await.unwrap();
    let second = uac
        .invite(
            &ruri,
            "cap-2",
            Some(&assertion("cap-2", "s-cap-2").sign(&key)),
            None,
        )
        .unwrap();
    let busy = uac.send(second, agent.sip(), false).await.unwrap();
    assert_eq!(busy.final_response.status, 486);
    assert_eq!(busy.final_response.headers.get("Retry-After"), Some("7"));
    let ev = agent
        .until(5, |e| matches!(e, Event::Refused { .. }))
        .await
        .unwrap();
    assert_eq!(
        ev.to_string(),
        "session s-cap-2 refused: 486 capacity 1 reached"
    );
    assert_eq!(agent.handle.live_sessions(), 1);
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_webhook_decides() {
    let relay = TestRelay::start().await.unwrap();
    let uac = Uac::bind().await.unwrap();
    let key = vendor_key();

    // It says no: 403 with its reason on one line.
    let (no, mut asked) = webhook(
        200,
        r#"{"accept": false, "reason": "Sold out\r\ntoday"}"#,
        Duration::ZERO,
    )
    .await
    .unwrap();
    let hook = format!("http://{no}/decide");
    let agent = Agent::start(relay.addr(), &["--decision-webhook", &hook])
        .await
        .unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let body = r#"{"detail":"red, 2015","lang":"fr"}"#;
    let invite = uac
        .invite(
            &ruri,
            "wh-1",
            Some(&assertion("wh-1", "s-wh-1").sign(&key)),
            Some((SERVICE_REQUEST_TYPE, body)),
        )
        .unwrap();
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 403);
    assert_eq!(call.final_response.reason, "Sold out today");
    let question = asked.recv().await.unwrap();
    assert_eq!(
        question,
        json!({"user": "alice", "session_id": "s-wh-1", "service": "wine",
               "detail": "red, 2015", "fields": {"detail": "red, 2015", "lang": "fr"},
               "call_id": "wh-1", "server": ACCOUNT})
    );
    agent.handle.stop().await;

    // It says yes.
    let (yes, _asked) = webhook(200, r#"{"accept": true}"#, Duration::ZERO)
        .await
        .unwrap();
    let hook = format!("http://{yes}/");
    let agent = Agent::start(relay.addr(), &["--decision-webhook", &hook])
        .await
        .unwrap();
    let call = uac.vouched_call(&agent, "wh-2").await.unwrap();
    assert_eq!(call.final_response.status, 200);
    uac.ack(&call).await.unwrap();
    agent.handle.stop().await;

    // It answers 500, or nobody listens: 503 with Retry-After.
    let (broken, _asked) = webhook(500, "{}", Duration::ZERO).await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for (i, addr) in [broken, closed].into_iter().enumerate() {
        let hook = format!("http://{addr}/");
        let agent = Agent::start(relay.addr(), &["--decision-webhook", &hook])
            .await
            .unwrap();
        let call = uac
            .vouched_call(&agent, &format!("wh-down-{i}"))
            .await
            .unwrap();
        assert_eq!(call.final_response.status, 503, "{addr}");
        assert_eq!(call.final_response.headers.get("Retry-After"), Some("30"));
        assert_eq!(agent.handle.live_sessions(), 0);
        agent.handle.stop().await;
    }

    // It answers something else than a decision: 503, and the operator's line says what the
    // answer should be and what it was.
    let (odd, _asked) = webhook(200, r#"{"ok": "yes please"}"#, Duration::ZERO)
        .await
        .unwrap();
    let hook = format!("http://{odd}/");
    let mut agent = Agent::start(relay.addr(), &["--decision-webhook", &hook])
        .await
        .unwrap();
    let call = uac.vouched_call(&agent, "wh-odd").await.unwrap();
    assert_eq!(call.final_response.status, 503);
    let why = loop {
        match tokio::time::timeout(Duration::from_secs(5), agent.events.recv()).await {
            Ok(Some(Event::Refused { why, .. })) => break why,
            Ok(Some(_)) => continue,
            other => panic!("no refusal reported: {other:?}"),
        }
    };
    assert!(
        why.contains(r#""accept": true|false"#) && why.contains(r#"{"ok": "yes please"}"#),
        "{why}"
    );
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn cancel_while_the_webhook_thinks_gives_487() {
    let relay = TestRelay::start().await.unwrap();
    let (slow, _asked) = webhook(200, r#"{"accept": true}"#, Duration::from_secs(2))
        .await
        .unwrap();
    let hook = format!("http://{slow}/");
    let mut agent = Agent::start(
        relay.addr(),
        &["--decision-webhook", &hook, "--capacity", "1"],
    )
    .await
    .unwrap();
    let uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let invite = uac
        .invite(
            &ruri,
            "cx-1",
            Some(&assertion("cx-1", "s-cx-1").sign(&vendor_key())),
            None,
        )
        .unwrap();
    let mut events = uac.ep.request(invite.clone(), agent.sip());
    // 100 Trying comes at once.
    let first = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&first, proto::sip::transaction::ClientEvent::Provisional(r) if r.status == 100),
        "{first:?}"
    );
    let mut cancel = proto::sip::message::Request::new(Method::Cancel, invite.uri.clone());
    for name in ["Via", "From", "To", "Call-ID"] {
        cancel
            .headers
            .push(name, invite.headers.get(name).unwrap_or_default());
    }
    cancel.headers.push("CSeq", "1 CANCEL");
    cancel.headers.push("Max-Forwards", "70");
    let cancelled = uac.send(cancel, agent.sip(), false).await.unwrap();
    assert_eq!(cancelled.final_response.status, 200);
    let fin = loop {
        match tokio::time::timeout(Duration::from_secs(3), events.recv())
            .await
            .unwrap()
        {
            Some(proto::sip::transaction::ClientEvent::Final(r)) => break r,
            Some(_) => {}
            None => panic!("INVITE ended without a final response"),
        }
    };
    assert_eq!(fin.status, 487);
    let ev = agent
        .until(5, |e| matches!(e, Event::Cancelled { .. }))
        .await
        .unwrap();
    assert_eq!(ev.to_string(), "session s-cx-1 cancelled by the client");
    assert_eq!(agent.handle.live_sessions(), 0);
    // The slot is free again: the next session is decided (and accepted).
    let invite = uac
        .invite(
            &ruri,
            "cx-2",
            Some(&assertion("cx-2", "s-cx-2").sign(&vendor_key())),
            None,
        )
        .unwrap();
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 200);
    uac.ack(&call).await.unwrap();
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn an_sdp_offer_gets_an_inactive_sdp_answer_and_call_info() {
    let relay = TestRelay::start().await.unwrap();
    let agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let invite = uac
        .invite(
            &ruri,
            "sdp-1",
            Some(&assertion("sdp-1", "s-sdp-1").sign(&vendor_key())),
            Some(("application/sdp", SDP_OFFER)),
        )
        .unwrap();
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    let ok = &call.final_response;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers.get("Content-Type"), Some("application/sdp"));
    let info = ok.headers.get("Call-Info").unwrap();
    assert!(
        info.starts_with(&format!("<{URL}?token=")) && info.ends_with(">;purpose=info"),
        "{info}"
    );
    let sdp = std::str::from_utf8(&ok.body).unwrap();
    let ip = agent.handle.contact_addr().ip();
    for line in [
        "v=0".to_string(),
        format!("c=IN IP4 {ip}"),
        "s=sip-relay".to_string(),
        "t=0 0".to_string(),
        "m=audio 9 RTP/AVP 8".to_string(),
        "a=rtpmap:8 PCMA/8000".to_string(),
        "a=inactive".to_string(),
    ] {
        assert!(sdp.lines().any(|l| l == line), "{line} missing in {sdp}");
    }
    assert!(sdp.lines().any(|l| l.starts_with("o=- ")));
    let token = info
        .trim_start_matches('<')
        .split('>')
        .next()
        .map(token_of)
        .unwrap();
    // The token turns active only with the ACK: a client that never sends it gets nothing.
    assert_eq!(introspect(&agent, &token).await, json!({"active": false}));
    uac.ack(&call).await.unwrap();
    assert_eq!(
        introspect_acked(&agent, &token).await["active"],
        true,
        "the token never turned active after the ACK"
    );
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_web_service_closes_a_session_with_bye_through_the_route_set() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let mut uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let mut invite = uac
        .invite(
            &ruri,
            "close-1",
            Some(&assertion("close-1", "s-close-1").sign(&vendor_key())),
            None,
        )
        .unwrap();
    // The UAC plays the relay too: its address in Record-Route.
    let rr = format!("<sip:{};lr;ftag=x>", uac.ep.advertised);
    invite.headers.push("Record-Route", rr.as_str());
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 200);
    assert_eq!(
        call.final_response.headers.get("Record-Route"),
        Some(rr.as_str())
    );
    // The ACK goes straight to the agent (the pretend relay would forward it there).
    let dialog = proto::sip::dialog::Dialog::uac(&call.invite, &call.final_response).unwrap();
    uac.ep
        .send_stateless(dialog.ack(1), agent.sip())
        .await
        .unwrap();
    let token = token_of(&ServiceAccess::parse(&call.final_response.body).unwrap().url);

    let (status, body) = http(
        agent.http(),
        "POST",
        "/close",
        Some("application/x-www-form-urlencoded"),
        "sid=s-close-1",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["closed"], true);
    let bye = uac.next_request(5).await.unwrap();
    assert_eq!(bye.request.method, Method::Bye);
    assert_eq!(bye.request.headers.get("Route"), Some(rr.as_str()));
    assert_eq!(bye.request.call_id(), Some("close-1"));
    bye.respond(message::make_response(&bye.request, 200, None, None));
    assert_eq!(introspect(&agent, &token).await, json!({"active": false}));
    let ev = agent
        .until(5, |e| matches!(e, Event::Ended { .. }))
        .await
        .unwrap();
    assert!(matches!(
        ev,
        Event::Ended {
            by: EndedBy::WebService,
            ..
        }
    ));

    let (status, body) = http(
        agent.http(),
        "POST",
        "/close",
        Some("application/json"),
        r#"{"sid": "s-close-1"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    assert_eq!(body["closed"], false);
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_session_never_acked_is_dropped_with_bye() {
    let relay = TestRelay::start().await.unwrap();
    // T1 = 20 ms: the agent gives up after 64*T1 = 1.28 s.
    let mut agent = Agent::start(relay.addr(), &["--timer-t1-ms", "20"])
        .await
        .unwrap();
    let mut uac = Uac::bind().await.unwrap();
    let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
    let invite = uac
        .invite(
            &ruri,
            "noack-1",
            Some(&assertion("noack-1", "s-noack-1").sign(&vendor_key())),
            None,
        )
        .unwrap();
    let call = uac.send(invite, agent.sip(), false).await.unwrap();
    assert_eq!(call.final_response.status, 200);
    assert_eq!(agent.handle.live_sessions(), 1);
    let ev = agent
        .until(5, |e| matches!(e, Event::Ended { .. }))
        .await
        .unwrap();
    assert!(
        matches!(
            ev,
            Event::Ended {
                by: EndedBy::NoAck,
                ..
            }
        ),
        "{ev:?}"
    );
    assert_eq!(agent.handle.live_sessions(), 0);
    let bye = uac.next_request(5).await.unwrap();
    assert_eq!(bye.request.method, Method::Bye);
    bye.respond(message::make_response(&bye.request, 200, None, None));
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_http_api_answers_the_edge_cases() {
    let relay = TestRelay::start().await.unwrap();
    let agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let a = agent.http();
    let (status, body) = http(
        a,
        "POST",
        "/introspect",
        Some("application/x-www-form-urlencoded"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = http(a, "POST", "/introspect", None, "token=nope")
        .await
        .unwrap();
    assert_eq!((status, body), (200, json!({"active": false})));
    let (status, _) = http(a, "GET", "/health", None, "").await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(a, "GET", "/nothing", None, "").await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = http(a, "GET", "/introspect", None, "").await.unwrap();
    assert_eq!(status, 405);
    let big = format!("token={}", "x".repeat(70 * 1024));
    let (status, _) = http(
        a,
        "POST",
        "/introspect",
        Some("application/x-www-form-urlencoded"),
        &big,
    )
    .await
    .unwrap();
    assert_eq!(status, 413);
    let (status, list) = http(a, "GET", "/sessions", None, "").await.unwrap();
    assert_eq!((status, list), (200, json!([])));
    // A browser page of another site that rebinds its name to 127.0.0.1 sends that name as
    // Host: nothing is answered (DNS rebinding).
    let port = a.port();
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        "127.0.0.1".to_string(),
    ] {
        let (status, body) = http_as(a, &host, "GET", "/sessions", None, "")
            .await
            .unwrap();
        assert_eq!(status, 421, "Host {host}");
        assert_eq!(body["error"], "misdirected_request");
        let (status, _) = http_as(a, &host, "POST", "/close", None, "sid=x")
            .await
            .unwrap();
        assert_eq!(status, 421, "Host {host}");
    }
    let (status, _) = http_as(a, &format!("localhost:{port}"), "GET", "/health", None, "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_client_reaches_the_service_through_the_relay() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let uac = Uac::bind().await.unwrap();
    let body = r#"{"detail":"a dry white"}"#;
    let invite = uac
        .invite(
            &format!("sip:wine@{DOMAIN}"),
            &message::new_call_id(),
            None,
            Some((SERVICE_REQUEST_TYPE, body)),
        )
        .unwrap();
    let call = uac
        .send(invite, proto::transport::Target::udp(relay.addr()), true)
        .await
        .unwrap();
    let ok = &call.final_response;
    assert_eq!(ok.status, 200, "{}", ok.reason);
    let access = ServiceAccess::parse(&ok.body).unwrap();
    assert_eq!(access.server, ACCOUNT);
    assert_eq!(access.service, "wine");
    let (mut dialog, hop) = uac.ack(&call).await.unwrap();
    assert_eq!(
        hop.addr,
        relay.addr(),
        "in-dialog requests go through the relay"
    );
    let active = introspect_acked(&agent, &token_of(&access.url)).await;
    assert_eq!(active["active"], true);
    assert_eq!(active["sub"], "alice");
    assert_eq!(active["sid"], access.session_id.as_str());
    assert_eq!(active["detail"], "a dry white");
    let resp = uac.in_dialog(&mut dialog, hop, Method::Bye).await.unwrap();
    assert_eq!(resp.status, 200);
    agent
        .until(5, |e| {
            matches!(
                e,
                Event::Ended {
                    by: EndedBy::Client,
                    ..
                }
            )
        })
        .await
        .unwrap();
    assert_eq!(
        introspect(&agent, &token_of(&access.url)).await,
        json!({"active": false})
    );
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn the_web_service_hangs_up_through_the_relay() {
    let relay = TestRelay::start().await.unwrap();
    let agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let mut uac = Uac::bind().await.unwrap();
    let invite = uac
        .invite(
            &format!("sip:wine@{DOMAIN}"),
            &message::new_call_id(),
            None,
            None,
        )
        .unwrap();
    let call = uac
        .send(invite, proto::transport::Target::udp(relay.addr()), true)
        .await
        .unwrap();
    assert_eq!(call.final_response.status, 200);
    uac.ack(&call).await.unwrap();
    let access = ServiceAccess::parse(&call.final_response.body).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = http(
        agent.http(),
        "POST",
        "/close",
        Some("application/json"),
        &json!({"sid": access.session_id}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let bye = uac.next_request(5).await.unwrap();
    assert_eq!(bye.request.method, Method::Bye);
    bye.respond(message::make_response(&bye.request, 200, None, None));
    agent.handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn startup_errors_name_the_problem() {
    let relay = TestRelay::start().await.unwrap();
    let mut a = support::args(relay.addr(), &[]).unwrap();
    a.password = Some("wrong".parse().unwrap());
    let e = app_server_agent::start(a).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "the relay refused the account's credentials (401 Unauthorized)"
    );

    let a = support::args(relay.addr(), &["--service", "wine", "--service", "beer"]).unwrap();
    let (out, _events) = app_server_agent::Output::channel();
    let e = app_server_agent::start_with(a, out)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("the relay refused to register service 'beer': 403 Forbidden ("),
        "{e}"
    );
    // wine was registered first, then removed again.
    let now = now_unix() as i64 * 1000;
    assert!(relay.store.bindings("wine", now).await.unwrap().is_empty());

    let mut a = support::args(relay.addr(), &[]).unwrap();
    a.url = "shop.example".into();
    let e = app_server_agent::start(a).await.unwrap_err().to_string();
    assert!(e.starts_with("--url is not an http(s) URL"), "{e}");
    relay.stop().await;
}

/// An agent started before its relay says where it is trying, waits with backoff, and
/// registers as soon as the relay is there; it does not give up.
#[tokio::test]
async fn an_agent_started_before_its_relay_waits_for_it() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (out, mut events) = app_server_agent::Output::channel();
    let starting = tokio::spawn(app_server_agent::start_with(
        support::args(port, &[]).unwrap(),
        out,
    ));
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    // The first attempt gets no answer; the agent says so and tries again.
    while !seen
        .iter()
        .any(|e: &Event| matches!(e, Event::Waiting { .. }))
    {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(e);
        assert!(std::time::Instant::now() < deadline);
    }
    assert!(matches!(seen[0], Event::Registering { .. }), "{seen:?}");
    let waiting = seen
        .iter()
        .find(|e| matches!(e, Event::Waiting { .. }))
        .unwrap()
        .to_string();
    assert!(
        waiting.contains(&port.to_string()) && waiting.contains("trying again in 1 s"),
        "{waiting}"
    );
    let relay = TestRelay::start_on(port).await.unwrap();
    let handle = tokio::time::timeout(Duration::from_secs(40), starting)
        .await
        .expect("the agent registered once the relay was there")
        .unwrap()
        .unwrap();
    let now = now_unix() as i64 * 1000;
    assert_eq!(relay.store.bindings("wine", now).await.unwrap().len(), 1);
    handle.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn stop_unregisters_every_service() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &[]).await.unwrap();
    let now = now_unix() as i64 * 1000;
    let bindings = relay.store.bindings("wine", now).await.unwrap();
    assert_eq!(bindings.len(), 1);
    assert!(bindings[0].contact.starts_with("sip:wine@127.0.0.1:"));
    let handle = agent.handle;
    handle.stop().await;
    assert!(relay.store.bindings("wine", now).await.unwrap().is_empty());
    let mut saw = false;
    while let Ok(ev) = agent.events.try_recv() {
        saw |= ev
            == Event::Unregistered {
                service: "wine".into(),
            };
    }
    assert!(saw);
    relay.stop().await;
}

#[tokio::test]
async fn the_agent_works_over_tcp() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &["--transport", "tcp"])
        .await
        .unwrap();
    let now = now_unix() as i64 * 1000;
    let bindings = relay.store.bindings("wine", now).await.unwrap();
    assert!(bindings[0].source.starts_with("tcp:"), "{bindings:?}");
    let uac = Uac::bind().await.unwrap();
    let invite = uac
        .invite(
            &format!("sip:wine@{DOMAIN}"),
            &message::new_call_id(),
            None,
            None,
        )
        .unwrap();
    let call = uac
        .send(invite, proto::transport::Target::udp(relay.addr()), true)
        .await
        .unwrap();
    assert_eq!(
        call.final_response.status, 200,
        "{}",
        call.final_response.reason
    );
    let (mut dialog, hop) = uac.ack(&call).await.unwrap();
    let resp = uac.in_dialog(&mut dialog, hop, Method::Bye).await.unwrap();
    assert_eq!(resp.status, 200);
    agent
        .until(5, |e| {
            matches!(
                e,
                Event::Ended {
                    by: EndedBy::Client,
                    ..
                }
            )
        })
        .await
        .unwrap();
    agent.handle.stop().await;
    assert!(relay.store.bindings("wine", now).await.unwrap().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn the_relay_ends_a_session_at_its_maximum_duration() {
    let relay = TestRelay::start().await.unwrap();
    let mut agent = Agent::start(relay.addr(), &["--service", "quick"])
        .await
        .unwrap();
    let mut uac = Uac::bind().await.unwrap();
    let invite = uac
        .invite(
            &format!("sip:quick@{DOMAIN}"),
            &message::new_call_id(),
            None,
            None,
        )
        .unwrap();
    let call = uac
        .send(invite, proto::transport::Target::udp(relay.addr()), true)
        .await
        .unwrap();
    assert_eq!(
        call.final_response.status, 200,
        "{}",
        call.final_response.reason
    );
    uac.ack(&call).await.unwrap();
    let token = token_of(&ServiceAccess::parse(&call.final_response.body).unwrap().url);
    assert_eq!(introspect_acked(&agent, &token).await["active"], true);
    let ev = agent
        .until(5, |e| matches!(e, Event::Ended { .. }))
        .await
        .unwrap();
    assert!(
        ev.to_string()
            .ends_with("ended by the relay (reason: max-duration)"),
        "{ev}"
    );
    assert_eq!(introspect(&agent, &token).await, json!({"active": false}));
    // The client gets its BYE too.
    let bye = uac.next_request(5).await.unwrap();
    assert_eq!(bye.request.method, Method::Bye);
    bye.respond(message::make_response(&bye.request, 200, None, None));
    agent.handle.stop().await;
    relay.stop().await;
}

/// The HTTP API can end sessions: off loopback it needs a bearer secret, which every call must
/// then carry.
#[tokio::test]
async fn the_http_api_off_loopback_needs_a_bearer_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = TestRelay::start().await.unwrap();
    let addr = relay.addr().to_string();
    let base = [
        "app-server-agent",
        "--relay",
        addr.as_str(),
        "--account",
        support::ACCOUNT,
        "--password",
        support::PASSWORD,
        "--domain",
        support::DOMAIN,
        "--url",
        support::URL,
        "--service",
        "wine",
        "--http",
        "0.0.0.0:0",
    ];
    let args = app_server_agent::RunArgs::try_parse_from_args(&base).unwrap();
    let err = app_server_agent::start_with(args, app_server_agent::Output::channel().0)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("--http-token"), "{err}");

    let secret = "0123456789abcdef-secret";
    let agent = Agent::start(relay.addr(), &["--http-token", secret])
        .await
        .unwrap();
    let http_addr = agent.http();
    let get = |auth: Option<String>| async move {
        let mut s = tokio::net::TcpStream::connect(http_addr).await.unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let req =
            format!("GET /health HTTP/1.1\r\nHost: {http_addr}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).to_string()
    };
    assert!(get(None).await.starts_with("HTTP/1.1 401"));
    assert!(
        get(Some("Bearer wrong".into()))
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(
        get(Some(format!("Bearer {secret}")))
            .await
            .starts_with("HTTP/1.1 200")
    );
    agent.handle.stop().await;
    relay.stop().await;
}
