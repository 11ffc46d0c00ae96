//! Registration and calls through a relay in-process, on SQLite and on PostgreSQL: what a user of
//! the relay checks (the events their client shows, the records the operator sees).

use client_agent::output::Event;
use relay::store::{CdrState, Party};
use tests::harness::{Db, RawSip, TestRelay, client};

/// Runs one scenario against both stores.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> { super::$name(tests::harness::Db::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                // Only an explicit SIP_RELAY_SKIP_PG=1 skips; missing binaries fail the test.
                if tests::pg::PgCluster::shared_or_skip().is_none() {
                    return Ok(());
                }
                super::$name(tests::harness::Db::Postgres).await
            })*
        }
    };
}

on_both_stores!(
    register_and_unregister,
    call_is_established_timed_and_recorded,
    caller_cancels_while_ringing,
    busy_callee,
    unanswered_callee_times_out,
    unknown_callee_is_404,
    unregistered_callee_is_480,
    wrong_password_is_refused,
    bindings_survive_a_restart,
);

async fn relay_with_users(db: Db) -> anyhow::Result<TestRelay> {
    let relay = TestRelay::start(db).await?;
    relay.add_user("alice", "alice-pw").await?;
    relay.add_user("bob", "bob-pw").await?;
    Ok(relay)
}

fn is_registered(e: &Event) -> bool {
    matches!(e, Event::Registered { .. })
}

async fn register_and_unregister(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut bob = client(
        relay.addr(),
        "bob",
        "bob-pw",
        &["register", "--expires", "120", "--for", "1s"],
    );
    match bob.next(10).await? {
        Event::Registered {
            aor,
            expires,
            bindings,
        } => {
            assert_eq!(aor, "sip:bob@relay.test");
            assert_eq!(expires, 120);
            assert_eq!(bindings, 1);
        }
        other => panic!("expected registered, got {other:?}"),
    }
    let now = proto::clock::now_ms();
    assert_eq!(
        relay.store.bindings("bob", now).await?.len(),
        1,
        "binding stored"
    );
    assert!(matches!(bob.next(10).await?, Event::Unregistered { .. }));
    assert!(bob.finish().await?);
    assert!(
        relay.store.bindings("bob", now).await?.is_empty(),
        "binding removed on un-REGISTER"
    );
    relay.stop().await;
    Ok(())
}

async fn call_is_established_timed_and_recorded(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut bob = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "20s"]);
    bob.until(10, is_registered).await?;
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "1s"],
    );
    assert!(matches!(
        alice.next(10).await?,
        Event::Ringing { status: 180 }
    ));
    assert!(matches!(
        alice.next(10).await?,
        Event::Established { status: 200, .. }
    ));
    match alice.next(10).await? {
        Event::Ended {
            reason,
            status,
            duration_ms,
        } => {
            assert_eq!(reason, "local-bye");
            assert_eq!(status, Some(200));
            let d = duration_ms.expect("duration");
            assert!((1000..3000).contains(&d), "call lasted {d} ms");
        }
        other => panic!("expected ended, got {other:?}"),
    }
    assert!(alice.finish().await?);
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(cdrs.len(), 1, "one record per call: {cdrs:?}");
    let cdr = &cdrs[0];
    assert_eq!((cdr.caller.as_str(), cdr.callee.as_str()), ("alice", "bob"));
    assert_eq!(cdr.state, CdrState::Ended);
    assert_eq!(cdr.status, Some(200));
    assert_eq!(cdr.ended_by, Some(Party::Caller));
    assert_eq!(cdr.reason.as_deref(), Some("bye"));
    let d = cdr.duration_ms.expect("duration recorded");
    assert!((950..3000).contains(&d), "recorded duration {d} ms");
    let (start, end) = (
        cdr.started_at_ms.expect("start"),
        cdr.ended_at_ms.expect("end"),
    );
    assert!(
        end >= start && (end - start - d).abs() < 500,
        "timestamps agree with the duration"
    );
    bob.abort();
    relay.stop().await;
    Ok(())
}

async fn caller_cancels_while_ringing(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut bob = client(
        relay.addr(),
        "bob",
        "bob-pw",
        &["register", "--answer", "ignore", "--for", "20s"],
    );
    bob.until(10, is_registered).await?;
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--ring-timeout", "1s"],
    );
    assert!(matches!(alice.next(10).await?, Event::Ringing { .. }));
    match alice.next(10).await? {
        Event::Ended { reason, status, .. } => {
            assert_eq!(reason, "cancelled");
            assert_eq!(status, Some(487));
        }
        other => panic!("expected ended, got {other:?}"),
    }
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(cdrs[0].state, CdrState::Failed);
    assert_eq!(cdrs[0].status, Some(487));
    assert_eq!(cdrs[0].reason.as_deref(), Some("cancelled"));
    bob.abort();
    relay.stop().await;
    Ok(())
}

async fn busy_callee(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut bob = client(
        relay.addr(),
        "bob",
        "bob-pw",
        &["register", "--answer", "busy", "--for", "20s"],
    );
    bob.until(10, is_registered).await?;
    let mut alice = client(relay.addr(), "alice", "alice-pw", &["call", "bob"]);
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert_eq!(
        ended,
        Event::Ended {
            reason: "busy".into(),
            status: Some(486),
            duration_ms: None
        }
    );
    assert!(
        !alice.finish().await?,
        "a busy call is a failure for the caller"
    );
    let cdrs = relay.wait_cdrs("bob", 1).await?;
    assert_eq!(
        (cdrs[0].state.as_str(), cdrs[0].status),
        ("failed", Some(486))
    );
    assert_eq!(cdrs[0].reason.as_deref(), Some("busy"));
    bob.abort();
    relay.stop().await;
    Ok(())
}

async fn unanswered_callee_times_out(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    // Bob's device registers, then goes silent: the relay's INVITE gets no answer at all.
    let dead = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let raw = RawSip::new(relay.addr()).await?;
    let contact = dead.local_addr()?;
    let first = format!(
        "REGISTER sip:relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK-reg1;rport\nMax-Forwards: 70\nFrom: <sip:bob@relay.test>;tag=r1\nTo: <sip:bob@relay.test>\nCall-ID: reg-dead-1\nCSeq: 1 REGISTER\nContact: <sip:bob@{contact}>\nExpires: 300\nContent-Length: 0\n\n"
    );
    raw.send(&first).await?;
    let challenge = raw.response(5, true).await?;
    assert_eq!(challenge.status, 401);
    let ch = proto::sip::digest::Challenge::parse(
        challenge
            .headers
            .get("WWW-Authenticate")
            .expect("challenge"),
    )?;
    let auth =
        proto::sip::digest::answer(&ch, "bob", "bob-pw", "REGISTER", "sip:relay.test", 1, "c1");
    let second = first.replace("z9hG4bK-reg1", "z9hG4bK-reg2").replace(
        "CSeq: 1 REGISTER",
        &format!("CSeq: 2 REGISTER\nAuthorization: {auth}"),
    );
    raw.send(&second).await?;
    assert_eq!(raw.response(5, true).await?.status, 200);
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--ring-timeout", "30s"],
    );
    let ended = alice
        .until(20, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert_eq!(
        ended,
        Event::Ended {
            reason: "rejected".into(),
            status: Some(408),
            duration_ms: None
        }
    );
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(
        (cdrs[0].state.as_str(), cdrs[0].status),
        ("failed", Some(408))
    );
    assert_eq!(cdrs[0].reason.as_deref(), Some("timeout"));
    relay.stop().await;
    Ok(())
}

async fn unknown_callee_is_404(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut alice = client(relay.addr(), "alice", "alice-pw", &["call", "nobody"]);
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert_eq!(
        ended,
        Event::Ended {
            reason: "rejected".into(),
            status: Some(404),
            duration_ms: None
        }
    );
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(
        (cdrs[0].callee.as_str(), cdrs[0].status),
        ("nobody", Some(404))
    );
    relay.stop().await;
    Ok(())
}

async fn unregistered_callee_is_480(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut alice = client(relay.addr(), "alice", "alice-pw", &["call", "bob"]);
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert_eq!(
        ended,
        Event::Ended {
            reason: "rejected".into(),
            status: Some(480),
            duration_ms: None
        }
    );
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(
        (cdrs[0].state.as_str(), cdrs[0].status),
        ("failed", Some(480))
    );
    assert_eq!(cdrs[0].reason.as_deref(), Some("not-registered"));
    relay.stop().await;
    Ok(())
}

async fn wrong_password_is_refused(db: Db) -> anyhow::Result<()> {
    let relay = relay_with_users(db).await?;
    let mut bob = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "20s"]);
    bob.until(10, is_registered).await?;
    let mut alice = client(relay.addr(), "alice", "not-her-password", &["call", "bob"]);
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert_eq!(
        ended,
        Event::Ended {
            reason: "unauthorized".into(),
            status: Some(407),
            duration_ms: None
        }
    );
    let mut mallory = client(
        relay.addr(),
        "alice",
        "not-her-password",
        &["register", "--for", "0"],
    );
    assert!(matches!(
        mallory.next(10).await?,
        Event::Failed { status: 401, .. }
    ));
    // Nobody was called, so nothing is billed.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(relay.store.list_cdrs(Some("alice"), None).await?.is_empty());
    bob.abort();
    relay.stop().await;
    Ok(())
}

async fn bindings_survive_a_restart(db: Db) -> anyhow::Result<()> {
    let mut relay = relay_with_users(db).await?;
    let mut bob = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "30s"]);
    bob.until(10, is_registered).await?;
    relay.restart().await?;
    // Bob's client still refreshes at the old address; the binding itself came back from the store.
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "200ms"],
    );
    alice
        .until(10, |e| matches!(e, Event::Established { .. }))
        .await?;
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert!(
        matches!(
            ended,
            Event::Ended {
                status: Some(200),
                ..
            }
        ),
        "{ended:?}"
    );
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(cdrs[0].state, CdrState::Ended);
    bob.abort();
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_over_tcp_to_a_udp_caller() -> anyhow::Result<()> {
    let relay = relay_with_users(Db::Sqlite).await?;
    // Bob is reached over the TCP connection his REGISTER came on.
    let mut bob = client(
        relay.addr(),
        "bob",
        "bob-pw",
        &["--transport", "tcp", "register", "--for", "20s"],
    );
    bob.until(10, is_registered).await?;
    let bindings = relay.store.bindings("bob", proto::clock::now_ms()).await?;
    assert!(bindings[0].source.starts_with("tcp:"), "{bindings:?}");
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "300ms"],
    );
    alice
        .until(10, |e| matches!(e, Event::Established { .. }))
        .await?;
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert!(
        matches!(
            ended,
            Event::Ended {
                status: Some(200),
                ..
            }
        ),
        "{ended:?}"
    );
    // And the other way round: a TCP caller to a UDP callee.
    let mut carol = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["--transport", "tcp", "call", "bob", "--for", "300ms"],
    );
    carol
        .until(10, |e| matches!(e, Event::Established { .. }))
        .await?;
    let ended = carol
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert!(
        matches!(
            ended,
            Event::Ended {
                status: Some(200),
                ..
            }
        ),
        "{ended:?}"
    );
    let cdrs = relay.wait_cdrs("alice", 2).await?;
    assert!(cdrs.iter().all(|c| c.state == CdrState::Ended), "{cdrs:?}");
    bob.abort();
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_forking_to_every_binding() -> anyhow::Result<()> {
    let relay = relay_with_users(Db::Sqlite).await?;
    // Two devices for bob: one answers, one keeps ringing and must be cancelled by the relay.
    let mut desk = client(
        relay.addr(),
        "bob",
        "bob-pw",
        &["register", "--answer", "ignore", "--for", "20s"],
    );
    desk.until(10, is_registered).await?;
    let mut phone = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "20s"]);
    match phone.until(10, is_registered).await? {
        Event::Registered { bindings, .. } => assert_eq!(bindings, 2),
        other => panic!("{other:?}"),
    }
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "300ms"],
    );
    alice
        .until(10, |e| matches!(e, Event::Established { .. }))
        .await?;
    let ended = alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    assert!(
        matches!(
            ended,
            Event::Ended {
                status: Some(200),
                ..
            }
        ),
        "{ended:?}"
    );
    let cdrs = relay.wait_cdrs("alice", 1).await?;
    assert_eq!(cdrs.len(), 1, "one record for the forked call: {cdrs:?}");
    assert_eq!(cdrs[0].state, CdrState::Ended);
    // The ringing device was cancelled: its transactions end (the last after Timer D, 32 s on
    // UDP), and nothing is left in the relay.
    let core = relay.handle.as_ref().expect("running").core.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while core.live_contexts() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(core.live_contexts(), 0, "transactions left behind");
    assert_eq!(core.sessions.live(), 0, "dialogs left behind");
    desk.abort();
    phone.abort();
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_to_a_forked_call_is_ended_by_the_caller() -> anyhow::Result<()> {
    let relay = relay_with_users(Db::Sqlite).await?;
    // Two devices for bob that both answer at once: the second 200 crosses the CANCEL.
    let mut desk = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "20s"]);
    desk.until(10, is_registered).await?;
    let mut phone = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "20s"]);
    phone.until(10, is_registered).await?;
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "1s"],
    );
    alice
        .until(10, |e| matches!(e, Event::Established { .. }))
        .await?;
    alice
        .until(10, |e| matches!(e, Event::Ended { .. }))
        .await?;
    // Whatever answered, no dialog is left open: a second answer was acknowledged and ended by
    // the caller at once (not left for the relay to drop as unacknowledged after 64*T1).
    let core = relay.handle.as_ref().expect("running").core.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while core.sessions.live() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(core.sessions.live(), 0, "a dialog was left open");
    core.sessions.flush().await;
    let cdrs = relay.store.list_cdrs(Some("alice"), None).await?;
    assert!(!cdrs.is_empty());
    assert!(
        cdrs.iter()
            .all(|c| c.state == CdrState::Ended && c.reason.as_deref() == Some("bye")),
        "{cdrs:?}"
    );
    desk.abort();
    phone.abort();
    relay.stop().await;
    Ok(())
}
