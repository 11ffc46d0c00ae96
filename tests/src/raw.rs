//! Hand-made SIP over a [`RawSip`] socket: REGISTER and INVITE templates, digest answers,
//! a registered callee, an INVITE through the relay and its 200. The templates use `\n` line
//! ends and `$LOCAL` / `$RELAY`, which [`RawSip::send`] fills in.

use crate::harness::{RawSip, TestRelay};
use proto::sip::digest::{self, Challenge};

/// A REGISTER of `user` for `contact`.
pub fn register(branch: &str, user: &str, cseq: u32, extra: &str, contact: &str) -> String {
    format!(
        "REGISTER sip:relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nFrom: <sip:{user}@relay.test>;tag=f{branch}\nTo: <sip:{user}@relay.test>\nCall-ID: reg-{user}@test\nCSeq: {cseq} REGISTER\n{extra}Contact: {contact}\nContent-Length: 0\n\n"
    )
}

/// An INVITE from alice to `to`.
pub fn invite(branch: &str, to: &str, cseq: u32, extra: &str) -> String {
    format!(
        "INVITE {to} SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=a{branch}\nTo: <{to}>\nCall-ID: inv-{branch}@test\nCSeq: {cseq} INVITE\n{extra}Contact: <sip:alice@$LOCAL>\nContent-Length: 0\n\n"
    )
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Registers `user` with `contact`, answering the challenge; returns the final response.
pub async fn do_register(
    raw: &RawSip,
    user: &str,
    pw: &str,
    contact: &str,
    extra: &str,
) -> anyhow::Result<proto::sip::message::Response> {
    register_as(raw, user, user, pw, contact, extra).await
}

/// Registers the address `sip:AOR@relay.test` with `contact`, answering the challenge as
/// `account` (an application server registers its services so); returns the final response.
pub async fn register_as(
    raw: &RawSip,
    aor: &str,
    account: &str,
    pw: &str,
    contact: &str,
    extra: &str,
) -> anyhow::Result<proto::sip::message::Response> {
    let n = SEQ.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    raw.send(&register(&format!("r{n}"), aor, n, extra, contact))
        .await?;
    let ch = raw.response(5, true).await?;
    assert_eq!(ch.status, 401);
    let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
    let auth = digest::answer(&ch, account, pw, "REGISTER", "sip:relay.test", 1, "cn");
    raw.send(&register(
        &format!("r{}", n + 1),
        aor,
        n + 1,
        &format!("{extra}Authorization: {auth}\n"),
        contact,
    ))
    .await?;
    raw.response(5, true).await
}

/// Alice and Bob (raw sockets) at a relay process (users alice and bob); Bob registered.
pub async fn relay_with_bob() -> anyhow::Result<(crate::procs::RelayProc, RawSip, RawSip)> {
    let relay = crate::procs::RelayProc::start(crate::harness::Db::Sqlite, "").await?;
    relay.add_user("alice")?;
    relay.add_user("bob")?;
    let alice = RawSip::new(relay.addr).await?;
    let bob = RawSip::new(relay.addr).await?;
    let contact = format!("<sip:bob@{}>", bob.local());
    let r = do_register(&bob, "bob", "bob-pw", &contact, "").await?;
    anyhow::ensure!(r.status == 200, "register: {}", r.status);
    Ok((relay, alice, bob))
}

/// Alice's INVITE for `service` with a service-request body, answering the relay's 407
/// (branches `{tag}1` and `{tag}2`, Call-ID `inv-{tag}2@test`); `extra` headers go on both.
pub async fn send_service_invite(
    alice: &RawSip,
    tag: &str,
    service: &str,
    extra: &str,
) -> anyhow::Result<()> {
    let body = format!("{{\"service\":\"{service}\"}}");
    let to = format!("sip:{service}@relay.test");
    let msg = |branch: &str, cseq: u32, extra: &str| {
        format!(
            "INVITE {to} SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\n\
             From: <sip:alice@relay.test>;tag=a{tag}2\nTo: <{to}>\nCall-ID: inv-{tag}2@test\n\
             CSeq: {cseq} INVITE\n{extra}Contact: <sip:alice@$LOCAL>\nContent-Type: {}\n\
             Content-Length: {}\n\n{body}",
            proto::service::SERVICE_REQUEST_TYPE,
            body.len()
        )
    };
    let ch = proxy_challenge(alice, &msg(&format!("{tag}1"), 1, extra)).await?;
    let auth = digest::answer(&ch, "alice", "alice-pw", "INVITE", &to, 1, "cn");
    alice
        .send(&msg(
            &format!("{tag}2"),
            2,
            &format!("{extra}Proxy-Authorization: {auth}\n"),
        ))
        .await
}

/// Bob's device: a raw socket registered as `bob` (password `bob-pw`), `expires` added to its
/// Contact.
pub async fn raw_callee(relay: &TestRelay, expires: &str) -> anyhow::Result<RawSip> {
    let bob = RawSip::new(relay.addr()).await?;
    let contact = format!("<sip:bob@{}>{expires}", bob.local());
    let r = do_register(&bob, "bob", "bob-pw", &contact, "").await?;
    anyhow::ensure!(r.status == 200, "register: {}", r.status);
    Ok(bob)
}

/// The next request that arrives at `sock` within `secs` seconds.
pub async fn next_request(
    sock: &RawSip,
    secs: u64,
) -> anyhow::Result<proto::sip::message::Request> {
    let mut buf = vec![0u8; 65_536];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (n, _) = tokio::time::timeout(left, sock.sock.recv_from(&mut buf)).await??;
        if let Ok(proto::sip::message::Message::Request(r)) =
            proto::sip::message::parse(&buf[..n], &proto::sip::message::Limits::UDP)
        {
            return Ok(r);
        }
    }
}

/// Sends `first` (a request without credentials) and returns the relay's 407 challenge.
async fn proxy_challenge(alice: &RawSip, first: &str) -> anyhow::Result<Challenge> {
    alice.send(first).await?;
    let challenge = alice.response(5, true).await?;
    anyhow::ensure!(
        challenge.status == 407,
        "the first INVITE got {}",
        challenge.status
    );
    Ok(Challenge::parse(
        challenge
            .headers
            .get("Proxy-Authenticate")
            .expect("challenge"),
    )?)
}

/// Alice's INVITE to Bob with credentials: the first INVITE, without, draws the relay's 407
/// (branch `{tag}1`, CSeq 1); the second answers it (branch `{tag}2`, CSeq 2, Call-ID
/// `inv-{tag}2@test`); `extra` headers go on both. Returns the challenge, for further
/// requests with its nonce.
pub async fn send_authed_invite(
    alice: &RawSip,
    tag: &str,
    extra: &str,
) -> anyhow::Result<Challenge> {
    let ch = proxy_challenge(
        alice,
        &invite(&format!("{tag}1"), "sip:bob@relay.test", 1, extra),
    )
    .await?;
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "INVITE",
        "sip:bob@relay.test",
        1,
        "cn",
    );
    let extra = format!("{extra}Proxy-Authorization: {auth}\n");
    alice
        .send(&invite(&format!("{tag}2"), "sip:bob@relay.test", 2, &extra))
        .await?;
    Ok(ch)
}

/// Alice's INVITE to Bob through the relay, answering its 407 (branches `{tag}1`, `{tag}2`,
/// Call-ID `inv-{tag}2@test`); returns the INVITE as Bob's device received it.
pub async fn invite_through(
    alice: &RawSip,
    bob: &RawSip,
    tag: &str,
) -> anyhow::Result<proto::sip::message::Request> {
    send_authed_invite(alice, tag, "").await?;
    next_request(bob, 5).await
}

/// Bob's device answers a forwarded INVITE with 200 (To tag `bobtag`, its own Contact).
pub async fn answer_200(bob: &RawSip, invite: &proto::sip::message::Request) -> anyhow::Result<()> {
    let mut ok = proto::sip::message::make_response(invite, 200, None, Some("bobtag"));
    ok.headers
        .push("Contact", format!("<sip:bob@{}>", bob.local()));
    bob.sock
        .send_to(&proto::sip::message::serialize(&ok.into()), bob.relay)
        .await?;
    Ok(())
}

/// A request of alice's inside the dialog [`invite_through`] made with `tag` (Bob answered with
/// To tag `bobtag`), sent to the relay with its Route.
pub fn alice_in_dialog(method: &str, tag: &str, cseq: u32, branch: &str) -> String {
    format!(
        "{method} sip:bob@127.0.0.1 SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nRoute: <sip:$RELAY;lr>\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=a{tag}2\nTo: <sip:bob@relay.test>;tag=bobtag\nCall-ID: inv-{tag}2@test\nCSeq: {cseq} {method}\nContent-Length: 0\n\n"
    )
}

/// Sends a response from a raw socket to the relay.
pub async fn respond(
    from: &RawSip,
    req: &proto::sip::message::Request,
    status: u16,
) -> anyhow::Result<()> {
    let resp = proto::sip::message::make_response(req, status, None, None);
    from.sock
        .send_to(&proto::sip::message::serialize(&resp.into()), from.relay)
        .await?;
    Ok(())
}

/// A call from alice to bob (both raw sockets) through the relay, answered and acknowledged.
pub async fn established_call(alice: &RawSip, bob: &RawSip, tag: &str) -> anyhow::Result<()> {
    let fwd = invite_through(alice, bob, tag).await?;
    answer_200(bob, &fwd).await?;
    let ok = alice.response(5, true).await?;
    anyhow::ensure!(ok.status == 200, "the call got {}", ok.status);
    alice
        .send(&alice_in_dialog("ACK", tag, 2, &format!("{tag}ack")))
        .await?;
    let ack = next_request(bob, 5).await?;
    anyhow::ensure!(
        ack.method == proto::sip::message::Method::Ack,
        "bob got {} instead of the ACK",
        ack.method
    );
    Ok(())
}
