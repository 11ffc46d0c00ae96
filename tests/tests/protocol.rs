//! The relay's answers to hand-made SIP messages: what an operator or a SIP peer checks.

use proto::sip::digest::{self, Challenge};
use relay::store::CdrState;
use tests::harness::{Db, RawSip, TestRelay};
use tests::raw::{
    answer_200, do_register, invite, invite_through, next_request, raw_callee, register,
    send_authed_invite,
};

async fn relay() -> anyhow::Result<TestRelay> {
    let relay = TestRelay::start(Db::Sqlite).await?;
    relay.add_user("alice", "alice-pw").await?;
    relay.add_user("bob", "bob-pw").await?;
    Ok(relay)
}

#[tokio::test]
async fn options_to_the_relay_itself_gets_200() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    raw.send("OPTIONS sip:$RELAY SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKo1\nMax-Forwards: 70\nFrom: <sip:probe@$LOCAL>;tag=1\nTo: <sip:$RELAY>\nCall-ID: o1\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n").await?;
    let r = raw.response(5, true).await?;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("Allow").is_some_and(|a| a.contains("INVITE")));
    relay.stop().await;
    Ok(())
}

/// `INVITE URI` from alice answering the relay's 407 (branches `{tag}1`, `{tag}2`); the final
/// answer to the second.
async fn authed_invite_to(
    raw: &RawSip,
    tag: &str,
    uri: &str,
    extra: &str,
    body: Option<&str>,
) -> anyhow::Result<proto::sip::message::Response> {
    let msg = |branch: &str, cseq: u32, extra: &str| {
        let (ty, body) = match body {
            Some(b) => (
                format!("Content-Type: {}\n", proto::service::SERVICE_REQUEST_TYPE),
                b,
            ),
            None => (String::new(), ""),
        };
        format!(
            "INVITE {uri} SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=a{tag}\nTo: <{uri}>\nCall-ID: call-{tag}@test\nCSeq: {cseq} INVITE\n{extra}Contact: <sip:alice@$LOCAL>\n{ty}Content-Length: {}\n\n{body}",
            body.len()
        )
    };
    raw.send(&msg(&format!("{tag}1"), 1, extra)).await?;
    let ch = raw.response(5, true).await?;
    anyhow::ensure!(ch.status == 407, "the first INVITE got {}", ch.status);
    let ch = Challenge::parse(ch.headers.get("Proxy-Authenticate").unwrap_or_default())?;
    let auth = digest::answer(&ch, "alice", "alice-pw", "INVITE", uri, 1, "cn");
    raw.send(&msg(
        &format!("{tag}2"),
        2,
        &format!("{extra}Proxy-Authorization: {auth}\n"),
    ))
    .await?;
    raw.response(5, true).await
}

#[tokio::test]
async fn foreign_domains_are_refused_without_forwarding() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    // A listener standing for the foreign host: nothing may reach it.
    let victim = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let to = format!("sip:someone@{}", victim.local_addr()?);
    // A call is challenged like any other; once alice is authenticated it is refused, and
    // the attempt is recorded.
    let r = authed_invite_to(&raw, "f1", &to, "", None).await?;
    assert_eq!((r.status, r.reason.as_str()), (403, "Relaying denied"));
    let r = authed_invite_to(&raw, "f2", "sip:someone@example.com", "", None).await?;
    assert_eq!(r.status, 403);
    // Other requests are refused at once.
    raw.send(&invite("f3", "sip:someone@example.com", 1, "").replace("INVITE", "MESSAGE"))
        .await?;
    assert_eq!(raw.response(5, true).await?.status, 403);
    let mut buf = [0u8; 2048];
    let leaked = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        victim.recv_from(&mut buf),
    )
    .await;
    assert!(
        leaked.is_err(),
        "the relay forwarded a request for a foreign host"
    );
    let cdrs = relay.wait_cdrs("alice", 2).await?;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    for cdr in &cdrs {
        assert_eq!(
            (cdr.state.as_str(), cdr.status, cdr.reason.as_deref()),
            ("failed", Some(403), Some("relaying-denied")),
            "{cdr:?}"
        );
    }
    let mut callees: Vec<&str> = cdrs.iter().map(|c| c.callee.as_str()).collect();
    callees.sort_unstable();
    assert_eq!(
        callees,
        ["someone@127.0.0.1", "someone@example.com"],
        "the callee as the Request-URI named it"
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn max_forwards_zero_is_483() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    raw.send(
        &invite("m1", "sip:bob@relay.test", 1, "").replace("Max-Forwards: 70", "Max-Forwards: 0"),
    )
    .await?;
    assert_eq!(raw.response(5, true).await?.status, 483);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn unknown_user_and_wrong_password_look_the_same() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    raw.send(&invite("u1", "sip:bob@relay.test", 1, "")).await?;
    let first = raw.response(5, true).await?;
    assert_eq!(first.status, 407);
    let ch = Challenge::parse(first.headers.get("Proxy-Authenticate").expect("challenge"))?;
    let mut answers = Vec::new();
    for (i, (user, pw)) in [("alice", "wrong"), ("nosuchuser", "whatever")]
        .iter()
        .enumerate()
    {
        let auth = digest::answer(&ch, user, pw, "INVITE", "sip:bob@relay.test", 1, "cn");
        raw.send(&invite(
            &format!("u{}", i + 2),
            "sip:bob@relay.test",
            2,
            &format!("Proxy-Authorization: {auth}\n"),
        ))
        .await?;
        answers.push(raw.response(5, true).await?);
    }
    let shape = |r: &proto::sip::message::Response| {
        let names: Vec<String> = r.headers.0.iter().map(|h| h.name.clone()).collect();
        (r.status, r.reason.clone(), names)
    };
    assert_eq!(answers[0].status, 407);
    assert_eq!(shape(&answers[0]), shape(&answers[1]));
    for a in &answers {
        let ch = Challenge::parse(a.headers.get("Proxy-Authenticate").expect("challenge"))?;
        assert!(!ch.stale, "a wrong answer is never called stale");
    }
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn replayed_nonce_count_is_refused() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    let contact = format!("<sip:alice@{}>", raw.local());
    raw.send(&register("p1", "alice", 1, "", &contact)).await?;
    let ch = Challenge::parse(
        raw.response(5, true)
            .await?
            .headers
            .get("WWW-Authenticate")
            .expect("challenge"),
    )?;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "REGISTER",
        "sip:relay.test",
        1,
        "cn",
    );
    raw.send(&register(
        "p2",
        "alice",
        2,
        &format!("Authorization: {auth}\n"),
        &contact,
    ))
    .await?;
    assert_eq!(raw.response(5, true).await?.status, 200);
    // The same credentials again (same nonce, same nc) in a new request: refused.
    raw.send(&register(
        "p3",
        "alice",
        3,
        &format!("Authorization: {auth}\n"),
        &contact,
    ))
    .await?;
    assert_eq!(raw.response(5, true).await?.status, 401);
    // The next nc is fine.
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "REGISTER",
        "sip:relay.test",
        2,
        "cn",
    );
    raw.send(&register(
        "p4",
        "alice",
        4,
        &format!("Authorization: {auth}\n"),
        &contact,
    ))
    .await?;
    assert_eq!(raw.response(5, true).await?.status, 200);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn registrar_rules() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    let c1 = format!("<sip:alice@{}>", raw.local());
    // Too short an expiry: 423 with Min-Expires.
    let r = do_register(&raw, "alice", "alice-pw", &format!("{c1};expires=5"), "").await?;
    assert_eq!(r.status, 423);
    assert_eq!(r.headers.get("Min-Expires"), Some("60"));
    // Two contacts in one header, comma-separated, with their own expiries.
    let two = format!("{c1};expires=120, <sip:alice@127.0.0.1:1>;expires=300");
    let r = do_register(&raw, "alice", "alice-pw", &two, "").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get_all("Contact").count(), 2);
    assert_eq!(
        relay
            .store
            .bindings("alice", proto::clock::now_ms())
            .await?
            .len(),
        2
    );
    // Expires header for a contact with no parameter; the un-REGISTER of all with `*`.
    let r = do_register(&raw, "alice", "alice-pw", "*", "Expires: 0\n").await?;
    assert_eq!(r.status, 200);
    assert!(
        relay
            .store
            .bindings("alice", proto::clock::now_ms())
            .await?
            .is_empty()
    );
    // `*` with a non-zero expiry is a bad request.
    raw.send(&register("s1", "alice", 9, "Expires: 60\n", "*"))
        .await?;
    let ch = raw.response(5, true).await?;
    assert_eq!(ch.status, 401);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn malformed_request_gets_400_and_relay_keeps_serving() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    // CSeq method disagrees with the request method.
    raw.send("OPTIONS sip:$RELAY SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKb1\nMax-Forwards: 70\nFrom: <sip:x@$LOCAL>;tag=1\nTo: <sip:$RELAY>\nCall-ID: b1\nCSeq: 1 INVITE\nContent-Length: 0\n\n").await?;
    assert_eq!(raw.response(5, true).await?.status, 400);
    // An unknown method: 501.
    raw.send("FROB sip:$RELAY SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKb2\nMax-Forwards: 70\nFrom: <sip:x@$LOCAL>;tag=1\nTo: <sip:$RELAY>\nCall-ID: b2\nCSeq: 1 FROB\nContent-Length: 0\n\n").await?;
    assert_eq!(raw.raw_status(5).await?, 501);
    // Garbage gets nothing back; then a valid OPTIONS still works.
    raw.send_bytes(b"\x00\xff garbage \r\n\r\n").await?;
    assert!(raw.silent_for(200).await);
    raw.send("OPTIONS sip:$RELAY SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKb3\nMax-Forwards: 70\nFrom: <sip:x@$LOCAL>;tag=1\nTo: <sip:$RELAY>\nCall-ID: b3\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n").await?;
    assert_eq!(raw.response(5, true).await?.status, 200);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn crlf_keepalive_gets_a_pong() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    raw.send_bytes(b"\r\n\r\n").await?;
    let mut buf = [0u8; 16];
    let (n, _) = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        raw.sock.recv_from(&mut buf),
    )
    .await??;
    assert_eq!(&buf[..n], b"\r\n");
    // Over TCP too.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(relay.addr()).await?;
    tcp.write_all(b"\r\n\r\n").await?;
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), tcp.read(&mut buf)).await??;
    assert_eq!(&buf[..n], b"\r\n");
    relay.stop().await;
    Ok(())
}

/// Bob's device as a raw socket: registered by hand, it sees exactly what the relay forwards.
#[tokio::test]
async fn preloaded_route_is_consumed_and_forwarded_request_is_proxied_right() -> anyhow::Result<()>
{
    let relay = relay().await?;
    let bob = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    // Like baresip and linphone: a Route naming the relay (outbound proxy) on the first INVITE.
    let route = "Route: <sip:$RELAY;lr>\n";
    send_authed_invite(&alice, "lr", route).await?;
    let fwd = next_request(&bob, 5).await?;
    assert_eq!(fwd.method, proto::sip::message::Method::Invite);
    assert_eq!(
        fwd.uri.to_string(),
        format!("sip:bob@{}", bob.local()),
        "Request-URI is the binding"
    );
    assert!(
        fwd.headers.get("Route").is_none(),
        "the relay's own Route is removed"
    );
    assert!(
        fwd.headers.get("Proxy-Authorization").is_none(),
        "credentials for the relay are consumed"
    );
    assert_eq!(fwd.headers.get("Max-Forwards"), Some("69"));
    let rr = fwd.headers.get("Record-Route").expect("Record-Route");
    assert!(
        rr.contains(&relay.addr().to_string()) && rr.contains(";lr"),
        "{rr}"
    );
    let vias: Vec<&str> = fwd.headers.get_all("Via").collect();
    assert_eq!(vias.len(), 2);
    assert!(vias[0].contains(&relay.addr().to_string()), "{vias:?}");
    assert!(vias[1].contains("branch=z9hG4bKlr2"), "{vias:?}");
    // Bob answers 486; the relay relays it, absorbs Alice's ACK, and ACKs Bob hop by hop.
    let busy = proto::sip::message::make_response(&fwd, 486, None, Some("bobtag"));
    bob.sock
        .send_to(&proto::sip::message::serialize(&busy.into()), relay.addr())
        .await?;
    let up = alice.response(5, true).await?;
    assert_eq!(up.status, 486);
    assert_eq!(
        up.headers.get_all("Via").count(),
        1,
        "the relay's Via is popped"
    );
    let ack = next_request(&bob, 5).await?;
    assert_eq!(ack.method, proto::sip::message::Method::Ack);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn bindings_expire_on_time() -> anyhow::Result<()> {
    let mut config = tests::harness::test_config("sqlite::memory:");
    let dir = tempfile::tempdir()?;
    config.database_url = format!("sqlite://{}", dir.path().join("r.db").display());
    config.min_expires = 1;
    let relay = TestRelay::start_with(config, Some(dir)).await?;
    relay.add_user("alice", "alice-pw").await?;
    relay.add_user("bob", "bob-pw").await?;
    let _bob = raw_callee(&relay, ";expires=1").await?;
    assert_eq!(
        relay
            .store
            .bindings("bob", proto::clock::now_ms())
            .await?
            .len(),
        1
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut alice = tests::harness::client(relay.addr(), "alice", "alice-pw", &["call", "bob"]);
    let ended = alice
        .until(10, |e| {
            matches!(e, client_agent::output::Event::Ended { .. })
        })
        .await?;
    assert!(
        matches!(
            ended,
            client_agent::output::Event::Ended {
                status: Some(480),
                ..
            }
        ),
        "{ended:?}"
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn answered_call_without_ack_is_closed_as_no_ack() -> anyhow::Result<()> {
    let relay = relay().await?;
    let bob = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    let fwd = invite_through(&alice, &bob, "na").await?;
    answer_200(&bob, &fwd).await?;
    assert_eq!(alice.response(5, true).await?.status, 200);
    // Alice never ACKs. The relay gives up after 64*T1 and closes the record, billing nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let cdr = loop {
        let cdrs = relay.store.list_cdrs(Some("alice"), None).await?;
        if let Some(c) = cdrs.into_iter().find(|c| c.state == CdrState::Failed) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record for the unacknowledged call"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(cdr.reason.as_deref(), Some("no-ack"));
    assert_eq!(cdr.status, Some(200));
    assert_eq!(cdr.started_at_ms, None);
    assert_eq!(cdr.duration_ms, None);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn account_changes_take_effect_without_a_restart() -> anyhow::Result<()> {
    let relay = relay().await?;
    let raw = RawSip::new(relay.addr()).await?;
    let contact = format!("<sip:alice@{}>", raw.local());
    assert_eq!(
        do_register(&raw, "alice", "alice-pw", &contact, "")
            .await?
            .status,
        200
    );
    // What `relay user passwd` does, from another process in real life.
    relay
        .store
        .set_user_password(
            "alice",
            &digest::ha1(digest::Algorithm::Md5, "alice", "relay.test", "new-pw"),
            &digest::ha1(digest::Algorithm::Sha256, "alice", "relay.test", "new-pw"),
            "relay.test",
        )
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        do_register(&raw, "alice", "alice-pw", &contact, "")
            .await?
            .status,
        401
    );
    assert_eq!(
        do_register(&raw, "alice", "new-pw", &contact, "")
            .await?
            .status,
        200
    );
    // A new user can register at once.
    relay.add_user("carol", "carol-pw").await?;
    let contact = format!("<sip:carol@{}>", raw.local());
    assert_eq!(
        do_register(&raw, "carol", "carol-pw", &contact, "")
            .await?
            .status,
        200
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_tcp_device_is_reached_only_over_the_connection_it_registered_on() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = relay().await?;
    // The Contact names a UDP socket: an address the device did not register from, over a
    // transport it did not register with. Nothing may ever reach it.
    let elsewhere = RawSip::new(relay.addr()).await?;
    let contact = format!("<sip:bob@{}>", elsewhere.local());
    let mut tcp = tokio::net::TcpStream::connect(relay.addr()).await?;
    let local = tcp.local_addr()?;
    let reg = |branch: &str, cseq: u32, extra: &str| {
        format!(
            "REGISTER sip:relay.test SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bK{branch}\r\nMax-Forwards: 70\r\nFrom: <sip:bob@relay.test>;tag=t{branch}\r\nTo: <sip:bob@relay.test>\r\nCall-ID: tcp-reg@test\r\nCSeq: {cseq} REGISTER\r\n{extra}Contact: {contact}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    async fn read_message(
        tcp: &mut tokio::net::TcpStream,
    ) -> anyhow::Result<proto::sip::message::Message> {
        let mut buf = vec![0u8; 8192];
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf)).await??;
        Ok(proto::sip::message::parse(
            &buf[..n],
            &proto::sip::message::Limits::UDP,
        )?)
    }
    tcp.write_all(reg("t1", 1, "").as_bytes()).await?;
    let proto::sip::message::Message::Response(ch) = read_message(&mut tcp).await? else {
        anyhow::bail!("no challenge");
    };
    let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
    let auth = digest::answer(&ch, "bob", "bob-pw", "REGISTER", "sip:relay.test", 1, "cn");
    tcp.write_all(reg("t2", 2, &format!("Authorization: {auth}\r\n")).as_bytes())
        .await?;
    let proto::sip::message::Message::Response(ok) = read_message(&mut tcp).await? else {
        anyhow::bail!("no answer");
    };
    assert_eq!(ok.status, 200);
    // While the connection is open, Alice's call comes over it.
    let alice = RawSip::new(relay.addr()).await?;
    let ch = send_authed_invite(&alice, "tc", "").await?;
    let proto::sip::message::Message::Request(got) = read_message(&mut tcp).await? else {
        anyhow::bail!("no INVITE on the connection");
    };
    assert_eq!(got.method, proto::sip::message::Method::Invite);
    assert!(
        elsewhere.silent_for(300).await,
        "the relay sent to the Contact's address"
    );
    // Once the connection closed, Bob cannot be reached: 480, and still nothing at the Contact.
    drop(tcp);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "INVITE",
        "sip:bob@relay.test",
        2,
        "cn",
    );
    alice
        .send(
            &invite(
                "tc3",
                "sip:bob@relay.test",
                3,
                &format!("Proxy-Authorization: {auth}\n"),
            )
            .replace("inv-tc3", "inv-tc3b"),
        )
        .await?;
    assert_eq!(alice.response(5, true).await?.status, 480);
    assert!(
        elsewhere.silent_for(500).await,
        "the relay fell back to the Contact's address"
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn in_dialog_requests_go_only_to_the_parties() -> anyhow::Result<()> {
    let relay = relay().await?;
    let bob = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    let fwd = invite_through(&alice, &bob, "pd").await?;
    answer_200(&bob, &fwd).await?;
    assert_eq!(alice.response(5, true).await?.status, 200);
    // Inside this dialog, Alice asks the relay to carry a request to a third address (in the
    // Request-URI, or in a Route after the relay's).
    let victim = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let v = victim.local_addr()?;
    for (n, (ruri, route)) in [
        (format!("sip:x@{v}"), String::new()),
        (
            format!("sip:bob@{}", bob.local()),
            format!(", <sip:{v};lr>"),
        ),
    ]
    .iter()
    .enumerate()
    {
        let msg = format!(
            "MESSAGE {ruri} SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKpd3{n};rport\nRoute: <sip:$RELAY;lr>{route}\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=apd2\nTo: <sip:bob@relay.test>;tag=bobtag\nCall-ID: inv-pd2@test\nCSeq: {} MESSAGE\nContent-Length: 0\n\n",
            3 + n
        );
        alice.send(&msg).await?;
        // It goes to Bob, the other party, where Bob's messages come from; never to the victim.
        let got = next_request(&bob, 5).await?;
        assert_eq!(got.method, proto::sip::message::Method::Message);
        let mut buf = [0u8; 2048];
        let leaked = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            victim.recv_from(&mut buf),
        )
        .await;
        assert!(
            leaked.is_err(),
            "the relay carried an in-dialog request to a non-party"
        );
    }
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_2xx_after_a_6xx_still_reaches_the_caller() -> anyhow::Result<()> {
    let relay = relay().await?;
    let desk = raw_callee(&relay, "").await?;
    let phone = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    alice
        .send(&invite("sx1", "sip:bob@relay.test", 1, ""))
        .await?;
    let challenge = alice.response(5, true).await?;
    let ch = Challenge::parse(
        challenge
            .headers
            .get("Proxy-Authenticate")
            .expect("challenge"),
    )?;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "INVITE",
        "sip:bob@relay.test",
        1,
        "cn",
    );
    alice
        .send(&invite(
            "sx2",
            "sip:bob@relay.test",
            2,
            &format!("Proxy-Authorization: {auth}\n"),
        ))
        .await?;
    let to_desk = next_request(&desk, 5).await?;
    let to_phone = next_request(&phone, 5).await?;
    // The desk declines everywhere (603); the relay relays it and cancels the phone...
    let decline = proto::sip::message::make_response(&to_desk, 603, None, Some("desktag"));
    desk.sock
        .send_to(
            &proto::sip::message::serialize(&decline.into()),
            relay.addr(),
        )
        .await?;
    assert_eq!(alice.response(5, true).await?.status, 603);
    // ...but the phone had already answered: its 200 must reach Alice too (RFC 3261 §16.7).
    answer_200(&phone, &to_phone).await?;
    let late = alice.response(5, true).await?;
    assert_eq!(late.status, 200);
    assert_eq!(late.to()?.tag(), Some("bobtag"));
    relay.stop().await;
    Ok(())
}

/// REGISTER and INVITE written the way linphone and baresip write them (../shared/notes/real-clients.md).
#[tokio::test]
async fn messages_shaped_like_real_softphones_work() -> anyhow::Result<()> {
    let relay = relay().await?;
    let phone = RawSip::new(relay.addr()).await?;
    // linphone: Expires header, display name and +sip.instance in Contact, two spaces after
    // "Digest" and between parameters, parameters in its own order.
    let linphone_register = |branch: &str, cseq: u32, auth: &str| {
        format!(
            "REGISTER sip:relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nFrom: <sip:bob@relay.test>;tag=lp1\nTo: sip:bob@relay.test\nCSeq: {cseq} REGISTER\nCall-ID: lp-reg\nMax-Forwards: 70\nSupported: replaces, outbound, gruu\n{auth}Contact: \"bob\" <sip:bob@$LOCAL;transport=udp>;+sip.instance=\"<urn:uuid:f7e00481-ec79-0073-8e8b-3cd4af2cba76>\"\nExpires: 600\nContent-Length: 0\nUser-Agent: Linphone/5.1\n\n"
        )
    };
    phone.send(&linphone_register("lpa", 20, "")).await?;
    let ch = phone.response(5, true).await?;
    assert_eq!(ch.status, 401);
    let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
    let standard = digest::answer(
        &ch,
        "bob",
        "bob-pw",
        "REGISTER",
        "sip:relay.test",
        1,
        "zSfygK7NPykKMxmX",
    );
    let linphone_style = standard
        .replacen("Digest ", "Digest  ", 1)
        .replace(", ", ",  ");
    phone
        .send(&linphone_register(
            "lpb",
            21,
            &format!("Authorization:  {linphone_style}\n"),
        ))
        .await?;
    let ok = phone.response(5, true).await?;
    assert_eq!(ok.status, 200, "{ok:?}");
    let bindings = relay.store.bindings("bob", proto::clock::now_ms()).await?;
    assert_eq!(bindings.len(), 1);
    assert_eq!(
        bindings[0].instance.as_deref(),
        Some("<urn:uuid:f7e00481-ec79-0073-8e8b-3cd4af2cba76>")
    );
    assert!(((bindings[0].expires_at_ms - proto::clock::now_ms()) / 1000 - 600).abs() <= 2);
    // The same device registers again (new Call-ID, same instance): one binding, not two.
    phone
        .send(&linphone_register("lpc", 22, "").replace("lp-reg", "lp-reg2"))
        .await?;
    let ch = Challenge::parse(
        phone
            .response(5, true)
            .await?
            .headers
            .get("WWW-Authenticate")
            .expect("challenge"),
    )?;
    let again = digest::answer(&ch, "bob", "bob-pw", "REGISTER", "sip:relay.test", 1, "x");
    phone
        .send(
            &linphone_register("lpd", 23, &format!("Authorization: {again}\n"))
                .replace("lp-reg", "lp-reg2"),
        )
        .await?;
    assert_eq!(phone.response(5, true).await?.status, 200);
    assert_eq!(
        relay
            .store
            .bindings("bob", proto::clock::now_ms())
            .await?
            .len(),
        1
    );

    // baresip: no Expires header (only the Contact parameter), a Contact user that is not the
    // AOR's, an empty Supported header, no algorithm in its credentials.
    let baresip = RawSip::new(relay.addr()).await?;
    let baresip_register = |branch: &str, cseq: u32, auth: &str| {
        format!(
            "REGISTER sip:relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nTo: <sip:alice@relay.test>\nFrom: <sip:alice@relay.test>;tag=bs1\nCall-ID: bs-reg\nCSeq: {cseq} REGISTER\nUser-Agent: baresip v1.0.0\nSupported:\nAllow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,REFER\n{auth}Contact: <sip:alice-0x5610ce25da70@$LOCAL>;expires=600\nContent-Length: 0\n\n"
        )
    };
    baresip.send(&baresip_register("bsa", 13841, "")).await?;
    let ch = Challenge::parse(
        baresip
            .response(5, true)
            .await?
            .headers
            .get("WWW-Authenticate")
            .expect("challenge"),
    )?;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "REGISTER",
        "sip:relay.test",
        1,
        "5efa41be1194bd69",
    )
    .replace(", algorithm=MD5", "")
    .replace("algorithm=MD5, ", "");
    baresip
        .send(&baresip_register(
            "bsb",
            13842,
            &format!("Authorization: {auth}\n"),
        ))
        .await?;
    assert_eq!(baresip.response(5, true).await?.status, 200);

    // baresip calls bob (linphone) with a preloaded Route and an SDP offer; bob gets it.
    let offer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 29526 RTP/AVP 0 8 101\r\n";
    let invite = |branch: &str, cseq: u32, auth: &str| {
        format!(
            "INVITE sip:bob@relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nRoute: <sip:$RELAY;transport=udp;lr>\nMax-Forwards: 70\nTo: <sip:bob@relay.test>\nFrom: <sip:alice@relay.test>;tag=bsc\nCall-ID: bs-call\nCSeq: {cseq} INVITE\nSupported:\n{auth}Contact: <sip:alice-0x5610ce25da70@$LOCAL>\nContent-Type: application/sdp\nContent-Length: {}\n\n{offer}",
            offer.len()
        )
    };
    baresip.send(&invite("bsc1", 1, "")).await?;
    let ch = baresip.response(5, true).await?;
    assert_eq!(ch.status, 407);
    let ch = Challenge::parse(ch.headers.get("Proxy-Authenticate").expect("challenge"))?;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "INVITE",
        "sip:bob@relay.test",
        2,
        "5efa41be1194bd69",
    );
    baresip
        .send(&invite(
            "bsc2",
            2,
            &format!("Proxy-Authorization: {auth}\n"),
        ))
        .await?;
    let got = next_request(&phone, 5).await?;
    assert_eq!(got.method, proto::sip::message::Method::Invite);
    assert_eq!(
        &got.body[..],
        offer.as_bytes(),
        "the SDP offer arrives byte for byte"
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn first_challenge_is_stateless_and_stable_across_retransmissions() -> anyhow::Result<()> {
    let relay = relay().await?;
    let alice = RawSip::new(relay.addr()).await?;
    let first = invite("st1", "sip:bob@relay.test", 1, "");
    alice.send(&first).await?;
    let a = alice.response(5, false).await?;
    assert_eq!(a.status, 407, "no 100 Trying before the challenge");
    alice.send(&first).await?;
    let b = alice.response(5, false).await?;
    assert_eq!(b.status, 407);
    assert_eq!(
        a.to()?.tag(),
        b.to()?.tag(),
        "a retransmission gets the same To tag"
    );
    let core = relay.handle.as_ref().expect("running").core.clone();
    assert_eq!(
        core.live_contexts(),
        0,
        "no transaction is kept for a challenge"
    );
    relay.stop().await;
    Ok(())
}

/// A service INVITE whose body claims to be a service request but is not one: 400, and the
/// relay keeps serving.
#[tokio::test]
async fn a_malformed_service_request_gets_400() -> anyhow::Result<()> {
    let relay = relay().await?;
    relay
        .store
        .add_service(&relay::store::ServiceRow {
            name: "wine".into(),
            per_minute_minor: 0,
            setup_fee_minor: 0,
            increment_secs: 1,
            currency: "EUR".into(),
            fork: relay::store::Fork::First,
            max_duration_secs: None,
            max_charge_minor: None,
            max_session_charges_minor: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        })
        .await?;
    let raw = RawSip::new(relay.addr()).await?;
    let with_body = |branch: &str, cseq: u32, extra: &str, body: &str| {
        format!(
            "INVITE sip:wine@relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=a{branch}\nTo: <sip:wine@relay.test>\nCall-ID: svc-{branch}@test\nCSeq: {cseq} INVITE\n{extra}Contact: <sip:alice@$LOCAL>\nContent-Type: {}\nContent-Length: {}\n\n{body}",
            proto::service::SERVICE_REQUEST_TYPE,
            body.len()
        )
    };
    for (i, body) in [r#"{"detail": 5}"#, "not json", r#"["a"]"#]
        .iter()
        .enumerate()
    {
        raw.send(&with_body(&format!("m{i}a"), 1, "", body)).await?;
        let ch = raw.response(5, true).await?;
        assert_eq!(ch.status, 407);
        let ch = Challenge::parse(ch.headers.get("Proxy-Authenticate").expect("challenge"))?;
        let auth = digest::answer(
            &ch,
            "alice",
            "alice-pw",
            "INVITE",
            "sip:wine@relay.test",
            1,
            "cn",
        );
        raw.send(&with_body(
            &format!("m{i}b"),
            2,
            &format!("Proxy-Authorization: {auth}\n"),
            body,
        ))
        .await?;
        let r = raw.response(5, true).await?;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.reason, "Bad service request");
    }
    // Still serving: no server is registered for wine, so a well-formed request gets 480.
    raw.send(&with_body("okA", 1, "", r#"{"detail": "red"}"#))
        .await?;
    let ch = raw.response(5, true).await?;
    let ch = Challenge::parse(ch.headers.get("Proxy-Authenticate").expect("challenge"))?;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "INVITE",
        "sip:wine@relay.test",
        1,
        "cn",
    );
    raw.send(&with_body(
        "okB",
        2,
        &format!("Proxy-Authorization: {auth}\n"),
        r#"{"detail": "red"}"#,
    ))
    .await?;
    assert_eq!(raw.response(5, true).await?.status, 480);
    // Each authenticated attempt left one record: three refused for their body, one that
    // found nobody serving.
    let cdrs = relay.wait_cdrs("alice", 4).await?;
    let refused: Vec<_> = cdrs
        .iter()
        .filter(|c| c.status == Some(400))
        .map(|c| (c.state.as_str(), c.callee.as_str(), c.reason.as_deref()))
        .collect();
    assert_eq!(refused, vec![("failed", "wine", Some("bad-request")); 3]);
    assert_eq!(cdrs.len(), 4, "{cdrs:?}");
    relay.stop().await;
    Ok(())
}
