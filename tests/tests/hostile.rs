//! The relay facing the open Internet: what one account or one source address tries in order
//! to aim the relay at others, starve other users, replay credentials or stretch a bill.
//! Loopback addresses stand for hosts: 127.0.0.2 is "another machine".

use proto::sip::digest::{self, Challenge};
use proto::sip::message::{Message, Method};
use relay::store::CdrState;
use std::time::{Duration, Instant};
use tests::harness::{Db, RawSip, TestRelay, status_code};
use tests::raw::{
    alice_in_dialog, do_register, established_call, invite, next_request, raw_callee, register,
    respond, send_authed_invite,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn relay_tuned(tune: impl FnOnce(&mut relay::config::Config)) -> anyhow::Result<TestRelay> {
    let relay = TestRelay::start_tuned(Db::Sqlite, tune).await?;
    relay.add_user("alice", "alice-pw").await?;
    relay.add_user("bob", "bob-pw").await?;
    Ok(relay)
}

/// Every datagram that arrives until `quiet_ms` pass without one.
async fn all_datagrams(sock: &RawSip, quiet_ms: u64) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while let Some(d) = sock.recv_raw(quiet_ms).await {
        got.push(d);
    }
    got
}

fn options(branch: &str) -> String {
    format!(
        "OPTIONS sip:$RELAY SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nFrom: <sip:probe@$LOCAL>;tag=p{branch}\nTo: <sip:$RELAY>\nCall-ID: opt-{branch}\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n"
    )
}

#[tokio::test]
async fn refusals_before_authentication_are_answered_once_and_keep_nothing() -> anyhow::Result<()> {
    let relay = relay_tuned(|_| {}).await?;
    let foreign_creds = "Proxy-Authorization: Digest username=\"alice\", realm=\"other.example\", nonce=\"abc\", uri=\"sip:bob@relay.test\", response=\"0123456789abcdef0123456789abcdef\", qop=auth, nc=00000001, cnonce=\"c\"\n";
    let cases = [
        (
            "a MESSAGE for a foreign domain",
            invite("s1", "sip:x@192.0.2.1", 1, "").replace("INVITE", "MESSAGE"),
            403,
        ),
        (
            "a call to a foreign domain without credentials",
            invite("s9", "sip:x@192.0.2.1", 1, ""),
            407,
        ),
        (
            "unsupported Proxy-Require",
            invite("s2", "sip:bob@relay.test", 1, "Proxy-Require: foo\n"),
            420,
        ),
        (
            "credentials for another realm",
            invite("s3", "sip:bob@relay.test", 1, foreign_creds),
            407,
        ),
        (
            "no credentials",
            invite("s4", "sip:bob@relay.test", 1, ""),
            407,
        ),
        (
            "Max-Forwards 0",
            invite("s5", "sip:bob@relay.test", 1, "")
                .replace("Max-Forwards: 70", "Max-Forwards: 0"),
            483,
        ),
        (
            "a dialog nobody knows",
            alice_in_dialog("BYE", "s6", 3, "s6bye"),
            481,
        ),
        (
            "a MESSAGE without credentials",
            invite("s7", "sip:bob@relay.test", 1, "").replace("INVITE", "MESSAGE"),
            407,
        ),
        (
            "REGISTER for another domain",
            register("s8", "alice", 1, "", "<sip:alice@$LOCAL>")
                .replace("REGISTER sip:relay.test", "REGISTER sip:other.example")
                .replace("@relay.test>", "@other.example>"),
            403,
        ),
    ];
    let mut runs = Vec::new();
    for (what, msg, status) in cases {
        let addr = relay.addr();
        runs.push(tokio::spawn(async move {
            let raw = RawSip::new(addr).await?;
            raw.send(&msg).await?;
            // No ACK is ever sent: a transaction would retransmit its final answer every T1
            // (100 ms here) and more. Exactly one answer must come.
            let got: Vec<Option<u16>> = all_datagrams(&raw, 1500)
                .await
                .iter()
                .map(|d| status_code(d))
                .collect();
            anyhow::ensure!(
                got == vec![Some(status)],
                "{what}: expected one {status}, got {got:?}"
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    for run in runs {
        run.await??;
    }
    let core = &relay.handle.as_ref().expect("running").core;
    assert_eq!(core.live_contexts(), 0, "a refused request left a context");
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_user_holds_at_most_max_contacts_bindings() -> anyhow::Result<()> {
    let relay = relay_tuned(|c| c.max_contacts = 3).await?;
    let mut phones = Vec::new();
    for _ in 0..3 {
        let phone = RawSip::new(relay.addr()).await?;
        let r = do_register(&phone, "alice", "alice-pw", "<sip:alice@$LOCAL>", "").await?;
        assert_eq!(r.status, 200);
        phones.push(phone);
    }
    let fourth = RawSip::new(relay.addr()).await?;
    let r = do_register(&fourth, "alice", "alice-pw", "<sip:alice@$LOCAL>", "").await?;
    assert_eq!(r.status, 403);
    assert!(
        r.reason.contains("Too many contacts") && r.reason.contains('3'),
        "{}",
        r.reason
    );
    let bindings = relay
        .store
        .bindings("alice", proto::clock::now_ms())
        .await?;
    assert_eq!(bindings.len(), 3, "the refused REGISTER changed nothing");
    assert!(
        !bindings
            .iter()
            .any(|b| b.contact.contains(&fourth.local().to_string()))
    );
    // Refreshing a binding it holds still works.
    let r = do_register(&phones[0], "alice", "alice-pw", "<sip:alice@$LOCAL>", "").await?;
    assert_eq!(r.status, 200);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_device_is_reached_where_its_register_came_from_never_at_its_contact()
-> anyhow::Result<()> {
    let relay = relay_tuned(|_| {}).await?;
    // Bob registers from one socket naming a third party (another "host") as his Contact.
    let bob = RawSip::new(relay.addr()).await?;
    let victim = RawSip::new_on(relay.addr(), "127.0.0.2:0").await?;
    let contact = format!("<sip:bob@{}>", victim.local());
    assert_eq!(
        do_register(&bob, "bob", "bob-pw", &contact, "")
            .await?
            .status,
        200
    );
    let alice = RawSip::new(relay.addr()).await?;
    let fwd = tests::raw::invite_through(&alice, &bob, "vc").await?;
    assert_eq!(fwd.method, Method::Invite);
    assert_eq!(
        fwd.uri.to_string(),
        format!("sip:bob@{}", victim.local()),
        "the Request-URI is the Contact, as registered"
    );
    assert!(
        victim.silent_for(500).await,
        "the relay sent SIP to an address the account only named"
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_used_credential_never_passes_again_however_many_nonces_follow() -> anyhow::Result<()> {
    // The relay remembers the counts of two nonces only: the one alice first used is forgotten
    // after a few more registrations.
    let relay = relay_tuned(|c| c.max_nonces = 2).await?;
    let raw = RawSip::new(relay.addr()).await?;
    let contact = "<sip:alice@$LOCAL>";
    // Its own Call-ID, so the registrations below are not out of order against it.
    let first = |branch: &str, cseq: u32, extra: &str| {
        register(branch, "alice", cseq, extra, contact).replace("reg-alice", "first-alice")
    };
    raw.send(&first("n1", 1, "")).await?;
    let ch = raw.response(5, true).await?;
    let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
    let used = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "REGISTER",
        "sip:relay.test",
        1,
        "c1",
    );
    let with = format!("Authorization: {used}\n");
    raw.send(&first("n2", 2, &with)).await?;
    assert_eq!(raw.response(5, true).await?.status, 200);
    for i in 0..5 {
        let r = do_register(&raw, "alice", "alice-pw", contact, "").await?;
        assert_eq!(r.status, 200, "registration {i}");
    }
    // The first credential, replayed word for word in a new transaction.
    raw.send(&first("n3", 100, &with).replace("first-alice", "replay"))
        .await?;
    let r = raw.response(5, true).await?;
    assert_eq!(r.status, 401, "a replayed credential was accepted");
    let ch = Challenge::parse(r.headers.get("WWW-Authenticate").expect("challenge"))?;
    assert!(ch.stale, "a forgotten nonce is refused as stale");
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn user_names_longer_than_any_account_are_refused_before_a_lookup() -> anyhow::Result<()> {
    let relay = relay_tuned(|_| {}).await?;
    let raw = RawSip::new(relay.addr()).await?;
    raw.send(&register("l1", "alice", 1, "", "<sip:alice@$LOCAL>"))
        .await?;
    let ch = raw.response(5, true).await?;
    let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
    let long = "a".repeat(relay::config::MAX_USER_LEN + 1);
    let auth = digest::answer(&ch, &long, "pw", "REGISTER", "sip:relay.test", 1, "c");
    raw.send(&register(
        "l2",
        "alice",
        2,
        &format!("Authorization: {auth}\n"),
        "<sip:alice@$LOCAL>",
    ))
    .await?;
    let r = raw.response(5, true).await?;
    assert_eq!((r.status, r.reason.as_str()), (403, "User name too long"));
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn any_final_answer_to_a_bye_ends_and_bills_the_session() -> anyhow::Result<()> {
    let relay = relay_tuned(|_| {}).await?;
    let bob = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    established_call(&alice, &bob, "bf").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice
        .send(&alice_in_dialog("BYE", "bf", 3, "bfbye"))
        .await?;
    let bye = next_request(&bob, 5).await?;
    assert_eq!(bye.method, Method::Bye);
    respond(&bob, &bye, 500).await?;
    assert_eq!(alice.response(5, true).await?.status, 500);
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(cdrs[0].state, CdrState::Ended, "{cdrs:?}");
    assert_eq!(cdrs[0].reason.as_deref(), Some("bye-500"));
    let core = &relay.handle.as_ref().expect("running").core;
    assert_eq!(core.sessions.live(), 0, "the session is still in the table");
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_late_200_for_bye_cannot_stretch_the_bill() -> anyhow::Result<()> {
    let relay = relay_tuned(|c| c.bye_answer_limit_ms = 300).await?;
    let bob = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    established_call(&alice, &bob, "lb").await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    alice
        .send(&alice_in_dialog("BYE", "lb", 3, "lbbye"))
        .await?;
    let bye = next_request(&bob, 5).await?;
    assert_eq!(bye.method, Method::Bye);
    // Bob keeps the relay waiting 2 s for his 200.
    tokio::time::sleep(Duration::from_secs(2)).await;
    respond(&bob, &bye, 200).await?;
    assert_eq!(alice.response(5, true).await?.status, 200);
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    let duration = cdrs[0].duration_ms.unwrap_or(-1);
    assert!(
        (1000..1500).contains(&duration),
        "billed {duration} ms for a call of 1 s whose BYE was answered 2 s late"
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn beyond_max_dialogs_a_new_call_gets_503() -> anyhow::Result<()> {
    let relay = relay_tuned(|c| c.max_dialogs = 1).await?;
    let bob = raw_callee(&relay, "").await?;
    let alice = RawSip::new(relay.addr()).await?;
    established_call(&alice, &bob, "md").await?;
    let second = RawSip::new(relay.addr()).await?;
    send_authed_invite(&second, "mx", "").await?;
    let r = second.response(5, true).await?;
    assert_eq!(r.status, 503);
    assert!(r.headers.get("Retry-After").is_some());
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn one_flooding_source_is_held_to_its_rate_and_others_are_served() -> anyhow::Result<()> {
    let relay = relay_tuned(|c| {
        c.source_rate_per_sec = 20;
        c.source_burst = 20;
    })
    .await?;
    let flood = RawSip::new_on(relay.addr(), "127.0.0.2:0").await?;
    let started = Instant::now();
    for i in 0..300 {
        flood.send(&options(&format!("f{i}"))).await?;
    }
    // While it floods, alice (another address) registers.
    let alice = RawSip::new(relay.addr()).await?;
    let r = do_register(&alice, "alice", "alice-pw", "<sip:alice@$LOCAL>", "").await?;
    assert_eq!(r.status, 200);
    let answered = all_datagrams(&flood, 800).await.len();
    let secs = started.elapsed().as_secs_f64();
    let allowed = 20.0 + 20.0 * secs;
    assert!(
        (15..=allowed as usize + 2).contains(&answered),
        "{answered} of 300 answered in {secs:.1} s (burst 20, 20 a second)"
    );
    relay.stop().await;

    // The same flood from a trusted network is served in full.
    let relay = relay_tuned(|c| {
        c.source_rate_per_sec = 20;
        c.source_burst = 20;
        c.trusted = vec!["127.0.0.2/32".parse().expect("network")];
    })
    .await?;
    let trusted = RawSip::new_on(relay.addr(), "127.0.0.2:0").await?;
    for i in 0..100 {
        trusted.send(&options(&format!("t{i}"))).await?;
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let answered = all_datagrams(&trusted, 800).await.len();
    assert!(answered >= 95, "a trusted source got {answered} of 100");
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn by_default_one_source_may_send_500_requests_a_second() -> anyhow::Result<()> {
    let relay = relay_tuned(|_| {}).await?;
    let busy = RawSip::new_on(relay.addr(), "127.0.0.2:0").await?;
    let started = Instant::now();
    let mut answered = 0;
    // 600 requests over about 1.1 s: above 500 a second.
    for i in 0..600u64 {
        busy.send(&options(&format!("b{i}"))).await?;
        let due = started + Duration::from_micros(1_800 * (i + 1));
        tokio::time::sleep_until(due.into()).await;
        // Read as we go, so no answer is lost to a full socket buffer.
        while busy.recv_raw(0).await.is_some() {
            answered += 1;
        }
    }
    let rate = 600.0 / started.elapsed().as_secs_f64();
    answered += all_datagrams(&busy, 500).await.len();
    assert!(rate > 500.0, "sent only {rate:.0} a second");
    assert_eq!(answered, 600, "at {rate:.0} requests a second");
    relay.stop().await;
    Ok(())
}

/// (soft, hard) open-files limits of a process, from `/proc/PID/limits`.
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (
        fields.get(3).unwrap_or(&"").to_string(),
        fields.get(4).unwrap_or(&"").to_string(),
    )
}

#[tokio::test]
async fn the_relay_raises_its_open_files_limit_at_start() -> anyhow::Result<()> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("relay.db").display());
    // Started the way a service manager may start it: with a low soft limit.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -S -n 256 && exec \"$0\" \"$@\"")
        .arg(tests::procs::bin("relay")?)
        .args(["--sip", "127.0.0.1:0", "--database-url", &db, "serve"])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let serving = lines.any(|l| l.is_ok_and(|l| l.contains("Relay serving")));
    let (soft, hard) = open_files_limit(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving, "the relay did not start");
    assert!(!soft.is_empty(), "no open-files limit for the relay");
    assert_ne!(soft, "256", "the soft limit stayed as it was started with");
    assert_eq!(soft, hard, "the soft limit was not raised to the hard one");
    Ok(())
}

async fn tcp_from(local: &str, to: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(local.parse()?)?;
    Ok(sock.connect(to).await?)
}

/// Reads one SIP message from a TCP stream (or `None` when it closed).
async fn read_sip(tcp: &mut tokio::net::TcpStream, secs: u64) -> anyhow::Result<Option<Message>> {
    let mut buf = vec![0u8; 16_384];
    let n = tokio::time::timeout(Duration::from_secs(secs), tcp.read(&mut buf)).await??;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(proto::sip::message::parse(
        &buf[..n],
        &proto::sip::message::Limits::UDP,
    )?))
}

/// Waits until the relay closes the stream; how long that took.
async fn closed_within(tcp: &mut tokio::net::TcpStream, secs: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(secs), tcp.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("still open after {secs} s"))??;
        if n == 0 {
            return Ok(started.elapsed());
        }
    }
}

fn tcp_options(local: std::net::SocketAddr, relay: std::net::SocketAddr, branch: &str) -> String {
    format!(
        "OPTIONS sip:{relay} SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bK{branch}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{local}>;tag=t{branch}\r\nTo: <sip:{relay}>\r\nCall-ID: tcp-{branch}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
}

async fn options_over(tcp: &mut tokio::net::TcpStream, branch: &str) -> anyhow::Result<u16> {
    let (local, peer) = (tcp.local_addr()?, tcp.peer_addr()?);
    tcp.write_all(tcp_options(local, peer, branch).as_bytes())
        .await?;
    match read_sip(tcp, 5).await? {
        Some(Message::Response(r)) => Ok(r.status),
        other => anyhow::bail!("no answer over TCP: {other:?}"),
    }
}

#[tokio::test]
async fn a_source_holding_its_tcp_cap_leaves_others_and_udp_alone() -> anyhow::Result<()> {
    let relay = relay_tuned(|c| c.tcp_per_source = 3).await?;
    let mut held = Vec::new();
    for i in 0..3 {
        let mut c = tcp_from("127.0.0.2:0", relay.addr()).await?;
        assert_eq!(options_over(&mut c, &format!("h{i}")).await?, 200);
        held.push(c);
    }
    let mut fourth = tcp_from("127.0.0.2:0", relay.addr()).await?;
    closed_within(&mut fourth, 3).await?;
    // Another source's TCP, and UDP from anyone, are served as before.
    let mut other = tcp_from("127.0.0.1:0", relay.addr()).await?;
    assert_eq!(options_over(&mut other, "o1").await?, 200);
    let udp = RawSip::new_on(relay.addr(), "127.0.0.2:0").await?;
    udp.send(&options("u1")).await?;
    assert_eq!(udp.response(5, true).await?.status, 200);
    // The held connections are still there.
    assert_eq!(options_over(&mut held[0], "h9").await?, 200);
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn tcp_connections_that_say_nothing_or_idle_unregistered_are_closed() -> anyhow::Result<()> {
    let relay = relay_tuned(|c| {
        c.tcp_first_message_secs = 1;
        c.tcp_idle_secs = 1;
    })
    .await?;
    // Half a message, then nothing (slowloris).
    let mut slow = tcp_from("127.0.0.1:0", relay.addr()).await?;
    slow.write_all(b"OPTIONS sip:relay.test SIP/2.0\r\nVia: ")
        .await?;
    let took = closed_within(&mut slow, 5).await?;
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    // A whole message, then idle, with no registration.
    let mut idle = tcp_from("127.0.0.1:0", relay.addr()).await?;
    assert_eq!(options_over(&mut idle, "i1").await?, 200);
    closed_within(&mut idle, 5).await?;
    // A registered connection stays, and calls come over it.
    let mut bob = tcp_from("127.0.0.1:0", relay.addr()).await?;
    let local = bob.local_addr()?;
    let reg = |branch: &str, cseq: u32, extra: &str| {
        format!(
            "REGISTER sip:relay.test SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bK{branch}\r\nMax-Forwards: 70\r\nFrom: <sip:bob@relay.test>;tag=t{branch}\r\nTo: <sip:bob@relay.test>\r\nCall-ID: tcp-bob@test\r\nCSeq: {cseq} REGISTER\r\n{extra}Contact: <sip:bob@{local};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    bob.write_all(reg("b1", 1, "").as_bytes()).await?;
    let Some(Message::Response(ch)) = read_sip(&mut bob, 5).await? else {
        anyhow::bail!("no challenge");
    };
    let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
    let auth = digest::answer(&ch, "bob", "bob-pw", "REGISTER", "sip:relay.test", 1, "c");
    bob.write_all(reg("b2", 2, &format!("Authorization: {auth}\r\n")).as_bytes())
        .await?;
    let Some(Message::Response(ok)) = read_sip(&mut bob, 5).await? else {
        anyhow::bail!("no answer");
    };
    assert_eq!(ok.status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let alice = RawSip::new(relay.addr()).await?;
    send_authed_invite(&alice, "ti", "").await?;
    match read_sip(&mut bob, 5).await? {
        Some(Message::Request(r)) => assert_eq!(r.method, Method::Invite),
        other => panic!("the registered connection did not carry the call: {other:?}"),
    }
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn client_agent_never_gives_its_credentials_to_a_callee() -> anyhow::Result<()> {
    let relay = relay_tuned(|_| {}).await?;
    for (status, header, realm) in [
        (407, "Proxy-Authenticate", "evil.example"),
        (401, "WWW-Authenticate", tests::harness::DOMAIN),
    ] {
        let bob = raw_callee(&relay, "").await?;
        let mut alice = tests::harness::client(
            relay.addr(),
            "alice",
            "alice-pw",
            &["call", "bob", "--for", "1s"],
        );
        let inv = next_request(&bob, 5).await?;
        assert_eq!(inv.method, Method::Invite);
        let mut challenge = proto::sip::message::make_response(&inv, status, None, Some("evil"));
        challenge.headers.push(
            header,
            format!("Digest realm=\"{realm}\", nonce=\"harvest\", qop=\"auth\", algorithm=MD5"),
        );
        bob.sock
            .send_to(
                &proto::sip::message::serialize(&challenge.into()),
                relay.addr(),
            )
            .await?;
        // Nothing but the hop-by-hop ACK may follow: no INVITE with credentials.
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            let Ok(req) = next_request(&bob, 1).await else {
                break;
            };
            assert_eq!(
                req.method,
                Method::Ack,
                "the callee got {} {:?}",
                req.method,
                req.headers.get("Proxy-Authorization")
            );
        }
        let failed = alice
            .until(10, |e| {
                matches!(e, client_agent::output::Event::Failed { .. })
            })
            .await?;
        let client_agent::output::Event::Failed {
            status: got,
            message,
            ..
        } = failed
        else {
            unreachable!("matched above")
        };
        assert_eq!(got, status);
        assert!(
            message.contains("not sent") && message.contains(realm),
            "{message}"
        );
        alice.abort();
    }
    relay.stop().await;
    Ok(())
}

#[tokio::test]
async fn failed_logins_are_logged_with_their_source_escaped_and_rate_limited() -> anyhow::Result<()>
{
    let relay = tests::procs::RelayProc::start(Db::Sqlite, "").await?;
    relay.add_user("alice")?;
    let raw = RawSip::new(relay.addr).await?;
    // A user name that would colour a terminal (and could hide what follows) if written as it is.
    let evil = "mallory\u{1b}[31m\u{7f}red";
    for i in 0..30 {
        raw.send(&register(
            &format!("w{i}a"),
            "alice",
            1,
            "",
            "<sip:alice@$LOCAL>",
        ))
        .await?;
        let ch = raw.response(5, true).await?;
        let ch = Challenge::parse(ch.headers.get("WWW-Authenticate").expect("challenge"))?;
        let user = if i == 0 { evil } else { "alice" };
        let auth = digest::answer(&ch, user, "wrong", "REGISTER", "sip:relay.test", 1, "c");
        raw.send(&register(
            &format!("w{i}b"),
            "alice",
            2,
            &format!("Authorization: {auth}\n"),
            "<sip:alice@$LOCAL>",
        ))
        .await?;
        assert_eq!(raw.response(5, true).await?.status, 401);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = relay.log.text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Authentication failed"))
        .collect();
    assert!(
        (1..=5).contains(&lines.len()),
        "{} lines for 30 failures from one source:\n{log}",
        lines.len()
    );
    assert!(
        lines.iter().all(|l| l.contains("source=127.0.0.1")),
        "{log}"
    );
    assert!(
        lines[0].contains("mallory\\u{1b}[31m\\u{7f}red"),
        "not escaped: {:?}",
        lines[0]
    );
    assert!(
        !log.contains('\u{1b}'),
        "a control character reached the log"
    );
    Ok(())
}
