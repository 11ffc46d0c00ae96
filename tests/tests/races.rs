//! Races forced rather than hoped for: each test arranges the order of events that makes the
//! race happen, with raw SIP sockets on either side of a relay.
use std::time::Duration;

use proto::sip::digest;
use proto::sip::message::{self, Method};
use tests::harness::{Db, RawSip};
use tests::procs::RelayProc;
use tests::raw::{
    alice_in_dialog, answer_200, do_register, established_call, invite, invite_through,
    next_request, relay_with_bob, respond, send_authed_invite,
};

/// The relay could not run for a while (stopped with SIGSTOP, as a starved process is) just
/// after it forwarded an INVITE; meanwhile the callee answered 200, and the relay's
/// retransmission timer (T1 = 100 ms) expired four times over. Resumed, the relay reads the 200
/// waiting in its socket before it acts on the timer: the callee never sees its INVITE again
/// (SIPp as a callee aborts a call whose INVITE comes again after its 200, and the call's ACK
/// and BYE then find nobody).
#[tokio::test]
async fn a_relay_that_could_not_run_reads_the_waiting_answer_before_retransmitting()
-> anyhow::Result<()> {
    let (relay, alice, bob) = relay_with_bob().await?;
    for round in 0..3 {
        let tag = format!("stall{round}");
        let fwd = invite_through(&alice, &bob, &tag).await?;
        relay.signal("STOP")?;
        let resumed = async {
            answer_200(&bob, &fwd).await?;
            tokio::time::sleep(Duration::from_millis(400)).await;
            relay.signal("CONT")
        }
        .await;
        if resumed.is_err() {
            relay.signal("CONT")?;
        }
        resumed?;
        let ok = alice.response(5, true).await?;
        assert_eq!(ok.status, 200, "round {round}");
        // Within a second (ten T1s), Bob gets nothing but the ACK.
        alice
            .send(&alice_in_dialog("ACK", &tag, 2, &format!("{tag}ack")))
            .await?;
        let next = next_request(&bob, 1).await?;
        assert_eq!(
            next.method,
            Method::Ack,
            "round {round}: the callee got its INVITE again instead of the ACK"
        );
        assert!(
            next_request(&bob, 1).await.is_err(),
            "round {round}: the callee got more than the ACK"
        );
    }
    Ok(())
}

/// A CANCEL that matches no INVITE in progress gets 481 (RFC 3261 §9.2), and nothing is
/// forwarded.
#[tokio::test]
async fn a_cancel_matching_no_invite_gets_481() -> anyhow::Result<()> {
    let (_relay, alice, bob) = relay_with_bob().await?;
    alice
        .send(
            "CANCEL sip:bob@relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKnone;rport\n\
             Max-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=anone\nTo: <sip:bob@relay.test>\n\
             Call-ID: none@test\nCSeq: 1 CANCEL\nContent-Length: 0\n\n",
        )
        .await?;
    let r = alice.response(5, true).await?;
    assert_eq!(r.status, 481);
    assert!(
        next_request(&bob, 1).await.is_err(),
        "the CANCEL went somewhere"
    );
    Ok(())
}

/// The authenticated INVITE comes twice at once (a client whose retransmission timer fired),
/// again while the callee rings and again after the answer: one branch to the callee, one
/// session, one record.
#[tokio::test]
async fn an_invite_retransmitted_after_authentication_makes_one_branch_and_one_record()
-> anyhow::Result<()> {
    let (relay, alice, bob) = relay_with_bob().await?;
    let ch = send_authed_invite(&alice, "rt", "").await?;
    // The same request again, byte for byte (same branch, same credentials).
    let auth = digest::answer(
        &ch,
        "alice",
        "alice-pw",
        "INVITE",
        "sip:bob@relay.test",
        1,
        "cn",
    );
    let again = invite(
        "rt2",
        "sip:bob@relay.test",
        2,
        &format!("Proxy-Authorization: {auth}\n"),
    );
    alice.send(&again).await?;
    let fwd = next_request(&bob, 5).await?;
    assert_eq!(fwd.method, Method::Invite);
    respond(&bob, &fwd, 180).await?;
    alice.send(&again).await?;
    assert!(
        next_request(&bob, 1).await.is_err(),
        "a retransmission while ringing reached the callee"
    );
    answer_200(&bob, &fwd).await?;
    let ok = alice.response(5, true).await?;
    assert_eq!(ok.status, 200);
    alice.send(&again).await?;
    alice
        .send(&alice_in_dialog("ACK", "rt", 2, "rtack"))
        .await?;
    let ack = next_request(&bob, 5).await?;
    assert_eq!(ack.method, Method::Ack, "the callee got {}", ack.method);
    alice
        .send(&alice_in_dialog("BYE", "rt", 3, "rtbye"))
        .await?;
    let bye = next_request(&bob, 5).await?;
    assert_eq!(bye.method, Method::Bye, "the callee got {}", bye.method);
    respond(&bob, &bye, 200).await?;
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0]["state"], "ended", "{cdrs:?}");
    Ok(())
}

/// The CANCEL crosses the callee's 200: the callee answers the INVITE only after the relay's
/// CANCEL reached it. The 2xx stands (RFC 3261 §9.2): the caller gets it instead of a 487,
/// acknowledges it and hangs up, and the call leaves one ended record.
#[tokio::test]
async fn a_200_after_the_cancel_reaches_the_caller_who_ends_the_call() -> anyhow::Result<()> {
    let (relay, alice, bob) = relay_with_bob().await?;
    let fwd = invite_through(&alice, &bob, "cx").await?;
    respond(&bob, &fwd, 180).await?;
    alice
        .send(
            "CANCEL sip:bob@relay.test SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKcx2;rport\n\
             Max-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=acx2\nTo: <sip:bob@relay.test>\n\
             Call-ID: inv-cx2@test\nCSeq: 2 CANCEL\nContent-Length: 0\n\n",
        )
        .await?;
    let cancel = next_request(&bob, 5).await?;
    assert_eq!(cancel.method, Method::Cancel);
    answer_200(&bob, &fwd).await?;
    respond(&bob, &cancel, 200).await?;
    // Alice: 200 for her CANCEL, then the 200 for the INVITE.
    let mut invite_answer = None;
    for _ in 0..4 {
        let r = alice.response(5, true).await?;
        if r.cseq()?.method == Method::Invite {
            invite_answer = Some(r.status);
            break;
        }
    }
    assert_eq!(invite_answer, Some(200), "the caller did not get the 200");
    alice
        .send(&alice_in_dialog("ACK", "cx", 2, "cxack"))
        .await?;
    assert_eq!(next_request(&bob, 5).await?.method, Method::Ack);
    alice
        .send(&alice_in_dialog("BYE", "cx", 3, "cxbye"))
        .await?;
    let bye = next_request(&bob, 5).await?;
    assert_eq!(bye.method, Method::Bye);
    respond(&bob, &bye, 200).await?;
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0]["state"], "ended", "{cdrs:?}");
    Ok(())
}

/// Bob has two devices. The desk answers; the relay cancels the phone, which answers 200 only
/// once that CANCEL reached it. Both answers reach alice (a proxy forwards every 2xx, RFC 3261
/// §16.7): two dialogs, which she acknowledges and ends, and one record each.
#[tokio::test]
async fn a_second_device_answering_after_the_cancel_makes_a_second_dialog_the_caller_ends()
-> anyhow::Result<()> {
    let (relay, alice, desk) = relay_with_bob().await?;
    let phone = RawSip::new(relay.addr).await?;
    let contact = format!("<sip:bob@{}>", phone.local());
    let r = do_register(&phone, "bob", "bob-pw", &contact, "").await?;
    anyhow::ensure!(r.status == 200, "register: {}", r.status);

    send_authed_invite(&alice, "fk", "").await?;
    let at_desk = next_request(&desk, 5).await?;
    let at_phone = next_request(&phone, 5).await?;
    assert_eq!(
        (at_desk.method, at_phone.method),
        (Method::Invite, Method::Invite)
    );
    respond(&phone, &at_phone, 180).await?;
    answer_200(&desk, &at_desk).await?;
    let cancel = next_request(&phone, 5).await?;
    assert_eq!(cancel.method, Method::Cancel);
    let mut ok = message::make_response(&at_phone, 200, None, Some("phonetag"));
    ok.headers
        .push("Contact", format!("<sip:bob@{}>", phone.local()));
    phone
        .sock
        .send_to(&message::serialize(&ok.into()), phone.relay)
        .await?;
    respond(&phone, &cancel, 200).await?;

    let mut tags = Vec::new();
    while tags.len() < 2 {
        let r = alice.response(5, true).await?;
        assert_eq!(r.status, 200, "alice got {}", r.status);
        if let Some(tag) = r.to()?.tag() {
            if !tags.iter().any(|t: &String| t == tag) {
                tags.push(tag.to_string());
            }
        }
    }
    tags.sort();
    assert_eq!(tags, ["bobtag", "phonetag"]);
    for (tag, device) in [("bobtag", &desk), ("phonetag", &phone)] {
        for (method, cseq) in [("ACK", 2), ("BYE", 3)] {
            alice
                .send(&format!(
                    "{method} sip:bob@127.0.0.1 SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bK{tag}{method};rport\n\
                     Route: <sip:$RELAY;lr>\nMax-Forwards: 70\nFrom: <sip:alice@relay.test>;tag=afk2\n\
                     To: <sip:bob@relay.test>;tag={tag}\nCall-ID: inv-fk2@test\nCSeq: {cseq} {method}\n\
                     Content-Length: 0\n\n"
                ))
                .await?;
            let got = next_request(device, 5).await?;
            assert_eq!(got.method.as_str(), method, "{tag}");
            if method == "BYE" {
                respond(device, &got, 200).await?;
            }
        }
    }
    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert!(cdrs.iter().all(|c| c["state"] == "ended"), "{cdrs:?}");
    Ok(())
}

/// The relay's own in-dialog requests take CSeq numbers in each party's sequence: its
/// keepalive OPTIONS to Bob carries a CSeq above Alice's last one, Alice's next request then
/// reaches Bob shifted above the OPTIONS, and the answer comes back to Alice with her own CSeq.
#[tokio::test]
async fn the_relays_options_shift_the_cseq_of_the_other_partys_requests() -> anyhow::Result<()> {
    let relay = RelayProc::start(Db::Sqlite, "keepalive_secs = 1").await?;
    relay.add_user("alice")?;
    relay.add_user("bob")?;
    let alice = RawSip::new(relay.addr).await?;
    let bob = RawSip::new(relay.addr).await?;
    let contact = format!("<sip:bob@{}>", bob.local());
    let r = do_register(&bob, "bob", "bob-pw", &contact, "").await?;
    anyhow::ensure!(r.status == 200, "register: {}", r.status);
    established_call(&alice, &bob, "sh").await?;

    // The keepalive reaches both; each answers.
    let at_bob = next_request(&bob, 5).await?;
    assert_eq!(at_bob.method, Method::Options);
    let options_cseq = at_bob.cseq()?.seq;
    assert!(
        options_cseq > 2,
        "Alice's INVITE had CSeq 2, the OPTIONS {options_cseq}"
    );
    respond(&bob, &at_bob, 200).await?;
    let at_alice = next_request(&alice, 5).await?;
    assert_eq!(at_alice.method, Method::Options);
    respond(&alice, &at_alice, 200).await?;

    // Alice's next request (CSeq 3) reaches Bob above the OPTIONS.
    alice
        .send(&alice_in_dialog("BYE", "sh", 3, "shbye"))
        .await?;
    let bye = next_request(&bob, 5).await?;
    assert_eq!(bye.method, Method::Bye);
    assert!(
        bye.cseq()?.seq > options_cseq,
        "BYE CSeq {} not above the relay's OPTIONS {options_cseq}",
        bye.cseq()?.seq
    );
    respond(&bob, &bye, 200).await?;
    let ok = alice.response(5, true).await?;
    assert_eq!(ok.status, 200);
    let cseq = ok.cseq()?;
    assert_eq!((cseq.seq, cseq.method), (3, Method::Bye));
    Ok(())
}
