//! Only the relay speaks `Relay-*` headers (`Relay-Assertion`, `Relay-Charge`, `Relay-End`):
//! a copy that a client, a callee or an application server puts in any request or response
//! never reaches the other side; what does arrive is the relay's own. Plain calls and service
//! sessions, with raw SIP sockets on both sides of a relay process; with services, the server
//! that answers only after the relay cancelled it is released by the relay.
use std::time::Duration;

use proto::service::{Assertion, ChargeSummary, assertion_key};
use proto::sip::digest::{self, Algorithm};
use proto::sip::message::{self, Method, Request, Response};
use tests::harness::RawSip;
use tests::procs::RelayProc;
use tests::raw::{
    alice_in_dialog, next_request, register_as, relay_with_bob, respond, send_authed_invite,
    send_service_invite,
};

const FORGED: &str = "Relay-Assertion: eyJ1c2VyIjoibWFsbG9yeSJ9.c2ln\n\
                      Relay-Charge: amount=1;currency=EUR;duration-ms=1;billed-secs=1;session=x\n\
                      Relay-End: forged\n";

fn relay_headers(headers: &message::Headers) -> Vec<String> {
    headers
        .0
        .iter()
        .filter(|h| h.name.to_ascii_lowercase().starts_with("relay-"))
        .map(|h| format!("{}: {}", h.name, h.value))
        .collect()
}

/// Sends `resp` (to a request `from` received) with the forged headers added.
async fn respond_forged(from: &RawSip, mut resp: Response) -> anyhow::Result<()> {
    for line in FORGED.lines() {
        if let Some((name, value)) = line.split_once(": ") {
            resp.headers.push(name, value);
        }
    }
    from.sock
        .send_to(&message::serialize(&resp.into()), from.relay)
        .await?;
    Ok(())
}

/// A plain call in which every message from either party carries forged `Relay-*` headers:
/// none of them arrives, in requests (INVITE, ACK, BYE of the callee) or responses (180,
/// 200 for INVITE, 200 for BYE).
#[tokio::test]
async fn forged_relay_headers_never_cross_a_call() -> anyhow::Result<()> {
    let (_relay, alice, bob) = relay_with_bob().await?;
    send_authed_invite(&alice, "fg", FORGED).await?;
    let fwd = next_request(&bob, 5).await?;
    assert_eq!(relay_headers(&fwd.headers), Vec::<String>::new(), "INVITE");

    let ringing = message::make_response(&fwd, 180, None, Some("bobtag"));
    respond_forged(&bob, ringing).await?;
    let mut ok = message::make_response(&fwd, 200, None, Some("bobtag"));
    ok.headers
        .push("Contact", format!("<sip:bob@{}>", bob.local()));
    respond_forged(&bob, ok).await?;
    let mut seen = Vec::new();
    loop {
        let r = alice.response(5, false).await?;
        seen.push(r.status);
        assert_eq!(
            relay_headers(&r.headers),
            Vec::<String>::new(),
            "{}",
            r.status
        );
        if r.status >= 200 {
            break;
        }
    }
    assert!(seen.contains(&180) && seen.contains(&200), "{seen:?}");

    alice
        .send(
            &alice_in_dialog("ACK", "fg", 2, "fgack")
                .replace("Content-Length: 0", &format!("{FORGED}Content-Length: 0")),
        )
        .await?;
    let ack = next_request(&bob, 5).await?;
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(relay_headers(&ack.headers), Vec::<String>::new(), "ACK");

    // Bob hangs up, forging a charge; alice answers, forging one back.
    let bye = format!(
        "BYE sip:alice@{alice} SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKbobbye;rport\n\
         Route: <sip:$RELAY;lr>\nMax-Forwards: 70\nFrom: <sip:bob@relay.test>;tag=bobtag\n\
         To: <sip:alice@relay.test>;tag=afg2\nCall-ID: inv-fg2@test\nCSeq: 1 BYE\n{FORGED}\
         Content-Length: 0\n\n",
        alice = alice.local()
    );
    bob.send(&bye).await?;
    let at_alice = next_request(&alice, 5).await?;
    assert_eq!(at_alice.method, Method::Bye);
    assert_eq!(
        relay_headers(&at_alice.headers),
        Vec::<String>::new(),
        "BYE"
    );
    respond_forged(&alice, message::make_response(&at_alice, 200, None, None)).await?;
    let done = bob.response(5, true).await?;
    assert_eq!(done.status, 200);
    assert_eq!(
        relay_headers(&done.headers),
        Vec::<String>::new(),
        "200 for BYE"
    );
    Ok(())
}

/// A relay with the service wine (0.60 EUR a minute, 1 s increments, fork `fork`) delivered
/// by vendor-a and vendor-b, each a raw socket registered for it; and alice.
async fn service_relay(fork: &str) -> anyhow::Result<(RelayProc, RawSip, RawSip, RawSip)> {
    let relay = RelayProc::start(tests::harness::Db::Sqlite, "").await?;
    relay.add_user("alice")?;
    relay.admin(&[
        "service",
        "add",
        "wine",
        "--per-minute",
        "60",
        "--increment",
        "1",
        "--currency",
        "EUR",
        "--fork",
        fork,
    ])?;
    let mut servers = Vec::new();
    for vendor in ["vendor-a", "vendor-b"] {
        relay.admin(&[
            "appserver",
            "add",
            vendor,
            "--password",
            &format!("{vendor}-pw"),
            "--service",
            "wine",
        ])?;
        let sock = RawSip::new(relay.addr).await?;
        let contact = format!("<sip:wine@{}>", sock.local());
        let r = register_as(&sock, "wine", vendor, &format!("{vendor}-pw"), &contact, "").await?;
        anyhow::ensure!(r.status == 200, "{vendor} register: {}", r.status);
        servers.push(sock);
    }
    let b = servers.pop().expect("two servers");
    let a = servers.pop().expect("two servers");
    let alice = RawSip::new(relay.addr).await?;
    Ok((relay, alice, a, b))
}

/// The one `Relay-Assertion` an INVITE carries, verified with `vendor`'s key.
fn assertion_for(invite: &Request, vendor: &str) -> Assertion {
    let values: Vec<&str> = invite.headers.get_all("Relay-Assertion").collect();
    assert_eq!(values.len(), 1, "{vendor} got {values:?}");
    let ha1 = digest::ha1(
        Algorithm::Sha256,
        vendor,
        "relay.test",
        &format!("{vendor}-pw"),
    );
    let now = proto::clock::now_unix();
    Assertion::verify(values[0], &assertion_key(&ha1), now)
        .unwrap_or_else(|e| panic!("{vendor}: the assertion does not verify: {e}"))
}

/// A server's 200 with its own Contact and To tag, forging a charge.
async fn server_ok(server: &RawSip, invite: &Request, tag: &str) -> anyhow::Result<()> {
    let mut ok = message::make_response(invite, 200, None, Some(tag));
    ok.headers
        .push("Contact", format!("<sip:wine@{}>", server.local()));
    respond_forged(server, ok).await
}

/// The released server gets the relay's ACK and BYE ("answered elsewhere") for its late 2xx.
async fn expect_release(server: &RawSip, tag: &str) -> anyhow::Result<()> {
    let ack = next_request(server, 5).await?;
    assert_eq!(ack.method, Method::Ack, "{tag}");
    assert_eq!(ack.to()?.tag(), Some(tag));
    // Built from the dialog, without the relay's own Record-Route as a Route.
    assert_eq!(ack.headers.get("Route"), None, "{ack:?}");
    let bye = next_request(server, 5).await?;
    assert_eq!(bye.method, Method::Bye, "{tag}");
    assert_eq!(bye.headers.get("Route"), None, "{bye:?}");
    assert!(bye.cseq()?.seq > ack.cseq()?.seq, "{bye:?}");
    assert!(
        bye.headers
            .get("Reason")
            .is_some_and(|r| r.contains("answered elsewhere")),
        "{bye:?}"
    );
    respond(server, &bye, 200).await
}

/// Alice's ACK and BYE in her session with the server that answered with To tag `tag`; the
/// server answers the BYE 200 forging a charge. Returns the 200 alice gets for her BYE.
async fn alice_ends(
    alice: &RawSip,
    server: &RawSip,
    tag: &str,
    call: &str,
) -> anyhow::Result<Response> {
    for (method, cseq) in [("ACK", 2), ("BYE", 3)] {
        alice
            .send(&format!(
                "{method} sip:wine@127.0.0.1 SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{call}{method};rport\n\
                 Route: <sip:$RELAY;lr>\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=a{call}2\n\
                 To: <sip:wine@relay.test>;tag={tag}\nCall-ID: inv-{call}2@test\nCSeq: {cseq} {method}\n\
                 {FORGED}Content-Length: 0\n\n"
            ))
            .await?;
        let got = next_request(server, 5).await?;
        assert_eq!(got.method.as_str(), method);
        assert_eq!(
            relay_headers(&got.headers),
            Vec::<String>::new(),
            "{method}"
        );
        if method == "BYE" {
            respond_forged(server, message::make_response(&got, 200, None, None)).await?;
        }
    }
    loop {
        let r = alice.response(5, true).await?;
        if r.cseq()?.method == Method::Bye {
            return Ok(r);
        }
    }
}

/// fork `first`: both servers get the INVITE, each with one assertion of the relay's made
/// for it (alice's forged one is gone); vendor-a answers; the relay cancels vendor-b, which
/// answers 200 only once the CANCEL reached it: the relay releases it (ACK, BYE), alice never
/// sees it. Alice's session has one record, and the charge she is told is the relay's, equal
/// to the record's.
#[tokio::test]
async fn first_a_server_answering_after_its_cancel_is_released_and_forgeries_dropped()
-> anyhow::Result<()> {
    let (relay, alice, a, b) = service_relay("first").await?;
    send_service_invite(&alice, "sf", "wine", FORGED).await?;
    let at_a = next_request(&a, 5).await?;
    let at_b = next_request(&b, 5).await?;
    let (sa, sb) = (
        assertion_for(&at_a, "vendor-a"),
        assertion_for(&at_b, "vendor-b"),
    );
    assert_eq!(
        (sa.user.as_str(), sa.server.as_str()),
        ("alice", "vendor-a")
    );
    assert_eq!(
        (sb.user.as_str(), sb.server.as_str()),
        ("alice", "vendor-b")
    );
    assert!(at_a.headers.get("Relay-Charge").is_none());
    respond(&b, &at_b, 180).await?;
    server_ok(&a, &at_a, "atag").await?;
    let cancel = next_request(&b, 5).await?;
    assert_eq!(cancel.method, Method::Cancel);
    server_ok(&b, &at_b, "btag").await?;
    respond(&b, &cancel, 200).await?;

    let ok = alice.response(5, true).await?;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.to()?.tag(), Some("atag"));
    assert_eq!(relay_headers(&ok.headers), Vec::<String>::new());
    expect_release(&b, "btag").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let done = alice_ends(&alice, &a, "atag", "sf").await?;
    // Alice sees only vendor-a's session: no other 200 reached her.
    let charges: Vec<&str> = done.headers.get_all("Relay-Charge").collect();
    assert_eq!(charges.len(), 1, "{charges:?}");
    let told = ChargeSummary::parse(charges[0]).expect("the relay's charge");
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(cdrs.len(), 1, "{cdrs:#?}");
    let cdr = &cdrs[0];
    assert_eq!(cdr["state"], "ended");
    assert_eq!(cdr["server"], "vendor-a");
    assert_eq!(cdr["id"], sa.sid.as_str());
    assert_eq!(cdr["charge_minor"], told.amount_minor);
    assert_eq!(told.session, sa.sid);
    Ok(())
}

/// fork `all`: vendor-a answers and alice takes that session; then she cancels the servers
/// still deciding. vendor-b answers 200 only once the relay's CANCEL reached it: it is
/// released; alice has one session and one record.
#[tokio::test]
async fn all_a_server_answering_after_the_callers_cancel_is_released() -> anyhow::Result<()> {
    let (relay, alice, a, b) = service_relay("all").await?;
    send_service_invite(&alice, "sa", "wine", "").await?;
    let at_a = next_request(&a, 5).await?;
    let at_b = next_request(&b, 5).await?;
    respond(&b, &at_b, 180).await?;
    server_ok(&a, &at_a, "atag").await?;
    let ok = alice.response(5, true).await?;
    assert_eq!((ok.status, ok.to()?.tag()), (200, Some("atag")));
    alice
        .send(
            "CANCEL sip:wine@relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKsa2;rport\n\
             Max-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=asa2\nTo: <sip:wine@relay.test>\n\
             Call-ID: inv-sa2@test\nCSeq: 2 CANCEL\nContent-Length: 0\n\n",
        )
        .await?;
    let cancel = next_request(&b, 5).await?;
    assert_eq!(cancel.method, Method::Cancel);
    server_ok(&b, &at_b, "btag").await?;
    respond(&b, &cancel, 200).await?;
    expect_release(&b, "btag").await?;
    let done = alice_ends(&alice, &a, "atag", "sa").await?;
    assert_eq!(done.status, 200);
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(cdrs.len(), 1, "{cdrs:#?}");
    assert_eq!(cdrs[0]["state"], "ended");
    assert_eq!(cdrs[0]["server"], "vendor-a");
    // Nothing reached alice from vendor-b.
    while let Ok(r) = alice.response(1, false).await {
        assert_ne!(
            r.to()?.tag(),
            Some("btag"),
            "vendor-b's answer reached alice"
        );
    }
    Ok(())
}
