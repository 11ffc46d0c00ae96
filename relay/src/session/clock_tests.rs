//! Session control on a virtual clock: the table is given the time of every event (answer,
//! ACK, checks and their answers, the relay's end), so a keepalive that fails and a service's
//! maximum duration are decided at exact instants, with no sockets and no sleeps.
use super::*;
use crate::billing::Tariff;
use crate::store::Store;
use proto::sip::message::Transport;

/// Every party here is reached over UDP: the table has no connection to hold.
struct UdpOnly;

impl ConnectionHolds for UdpOnly {
    fn pin(&self, _: ConnId) {}
    fn unpin(&self, _: ConnId) {}
}

const KEEPALIVE: Duration = Duration::from_secs(30);

async fn table() -> (tempfile::TempDir, Sessions, Store) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("relay.db").display());
    let store = Store::open(&url).await.expect("store");
    let sessions = Sessions::new(
        Writer::spawn(store.clone(), Duration::ZERO),
        Arc::new(UdpOnly),
        SessionsConfig {
            node: "node-a".into(),
            instance: "node-a-run-1".into(),
            bye_limit: Duration::from_secs(4),
        },
    );
    (dir, sessions, store)
}

fn via(_: Transport) -> String {
    "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKrelay".into()
}

/// A service session (wine: 0.60 EUR a minute, 1 s increments, `max_secs` at most) answered
/// and acknowledged at `t0`; returns its key.
fn established(sessions: &Sessions, call: &str, max_secs: Option<i64>, t0: Instant) -> DialogKey {
    let key = answered(sessions, call, max_secs, t0);
    sessions.acked(call, "a1", "w1", KEEPALIVE, t0);
    key
}

/// The same session answered at `t0`, its ACK not (yet) come.
/// The test service: wine at 0.60 EUR a minute, 1 s increments, `max_secs` at most.
pub(crate) fn wine(max_secs: Option<i64>) -> ServiceInfo {
    ServiceInfo {
        name: "wine".into(),
        tariff: Tariff {
            per_minute_minor: 60,
            setup_fee_minor: 0,
            increment_secs: 1,
            currency: "EUR".into(),
        },
        max_duration_secs: max_secs,
        details: None,
    }
}

fn answered(sessions: &Sessions, call: &str, max_secs: Option<i64>, t0: Instant) -> DialogKey {
    let attempt = Attempt {
        call_id: call.into(),
        caller: "alice".into(),
        callee: "wine".into(),
        created_at_ms: 1_796_000_000_000,
        service: Some(wine(max_secs)),
        continues: None,
    };
    let leg = |user: &str, tag: &str, port: u16| Leg {
        header: format!("<sip:{user}@relay.test>;tag={tag}"),
        contact: format!("sip:{user}@127.0.0.1:{port}"),
        target: format!("udp:127.0.0.1:{port}"),
    };
    sessions.answered(
        &attempt,
        Answer {
            caller_tag: "a1".into(),
            callee_tag: "w1".into(),
            status: 200,
            session_id: Some(format!("sid-{call}")),
            server: Some("vendor-a".into()),
            legs: [leg("alice", "a1", 5071), leg("wine", "w1", 5072)],
            targets: [
                Some(Target::udp(([127, 0, 0, 1], 5071).into())),
                Some(Target::udp(([127, 0, 0, 1], 5072).into())),
            ],
            invite_cseq: 2,
        },
        t0,
    );
    DialogKey {
        call_id: call.into(),
        caller_tag: "a1".into(),
        callee_tag: "w1".into(),
    }
}

/// The charge the relay's BYE to the caller tells.
fn told_charge(byes: &[Outgoing]) -> proto::service::ChargeSummary {
    byes.iter()
        .find(|b| b.to == Party::Caller)
        .and_then(|b| b.request.headers.get(proto::service::CHARGE_HEADER))
        .and_then(proto::service::ChargeSummary::parse)
        .expect("the caller is told the charge")
}

fn ends(work: &[supervise::Work]) -> Vec<EndReason> {
    work.iter()
        .filter_map(|w| match w {
            supervise::Work::End(_, r) => Some(*r),
            supervise::Work::Ping(..) => None,
        })
        .collect()
}

#[tokio::test]
async fn the_maximum_duration_ends_a_session_at_its_instant_and_bills_exactly_it() {
    let (_dir, sessions, _store) = table().await;
    let t0 = Instant::now();
    let key = established(&sessions, "max", Some(120), t0);
    // A millisecond before the maximum: checks of the parties, nothing to end.
    assert_eq!(
        ends(&sessions.due(t0 + Duration::from_millis(119_999), KEEPALIVE, &via)),
        []
    );
    // At 2 minutes it ends; the check says so once.
    let at = t0 + Duration::from_secs(120);
    let work = sessions.due(at, KEEPALIVE, &via);
    assert_eq!(ends(&work), [EndReason::MaxDuration]);
    assert!(sessions.due(at, KEEPALIVE, &via).is_empty());
    // Ended a little late (the check runs once a second): billed to the maximum, not past it.
    let (byes, _commit) = sessions.end_by_relay(
        &key,
        EndReason::MaxDuration,
        &via,
        at + Duration::from_millis(700),
    );
    assert_eq!(byes.len(), 2, "a BYE to each party");
    for bye in &byes {
        assert_eq!(bye.request.headers.get("Relay-End"), Some("max-duration"));
    }
    let charge = told_charge(&byes);
    assert_eq!(charge.duration_ms, 120_000, "{charge:?}");
    assert_eq!((charge.billed_secs, charge.amount_minor), (120, 120));
    assert_eq!(sessions.live(), 0);
}

#[tokio::test]
async fn a_party_that_stops_answering_the_keepalive_ends_the_session_at_its_last_sign_of_life() {
    let (_dir, sessions, _store) = table().await;
    let t0 = Instant::now();
    let key = established(&sessions, "gone", None, t0);
    assert!(
        sessions
            .due(t0 + Duration::from_secs(29), KEEPALIVE, &via)
            .is_empty()
    );

    // First check at 30 s: an OPTIONS to each party, both answer.
    let first = t0 + KEEPALIVE;
    let work = sessions.due(first, KEEPALIVE, &via);
    let pings: Vec<&Outgoing> = work
        .iter()
        .filter_map(|w| match w {
            supervise::Work::Ping(_, out) => Some(out.as_ref()),
            supervise::Work::End(..) => None,
        })
        .collect();
    assert_eq!(pings.len(), 2);
    assert!(pings.iter().all(|p| p.request.method == Method::Options));
    // The caller's INVITE had CSeq 2: the relay's OPTIONS to the callee goes above it.
    let to_callee = pings
        .iter()
        .find(|p| p.to == Party::Callee)
        .expect("callee ping");
    assert!(to_callee.request.cseq().map(|c| c.seq).unwrap_or(0) > 2);
    // While a check is out, no other starts.
    assert!(
        sessions
            .due(first + Duration::from_secs(1), KEEPALIVE, &via)
            .is_empty()
    );
    let answered = first + Duration::from_millis(40);
    assert_eq!(
        sessions.ping_result(&key, Party::Caller, true, answered),
        None
    );
    assert_eq!(
        sessions.ping_result(&key, Party::Callee, true, answered),
        None
    );

    // Second check at 60 s: the callee has gone.
    let second = first + KEEPALIVE;
    assert_eq!(sessions.due(second, KEEPALIVE, &via).len(), 2);
    let late = second + Duration::from_secs(32);
    assert_eq!(sessions.ping_result(&key, Party::Caller, true, late), None);
    assert_eq!(
        sessions.ping_result(&key, Party::Callee, false, late),
        Some(EndReason::Gone(Party::Callee))
    );
    // Billed to the last moment both were known there: the first check's answers.
    let (byes, _commit) = sessions.end_by_relay(&key, EndReason::Gone(Party::Callee), &via, late);
    let charge = told_charge(&byes);
    assert_eq!(
        charge.duration_ms, 30_040,
        "billed to the last answers of both"
    );
    assert_eq!(charge.billed_secs, 31);
    assert_eq!(sessions.live(), 0);
}

#[tokio::test]
async fn an_answer_never_acknowledged_is_closed_after_the_grace_and_not_before() {
    let (_dir, sessions, store) = table().await;
    let t0 = Instant::now();
    established(&sessions, "noack", None, t0);
    // Another, answered but never acknowledged:
    answered(&sessions, "noack-2", None, t0);
    let grace = Duration::from_secs(32);
    sessions.sweep_unacknowledged(grace, t0 + Duration::from_secs(32));
    assert_eq!(sessions.live(), 2, "not before the grace");
    sessions.sweep_unacknowledged(grace, t0 + Duration::from_millis(32_001));
    assert_eq!(sessions.live(), 1, "the acknowledged one stays");
    sessions.flush().await;
    let record = store
        .cdr("sid-noack-2")
        .await
        .expect("store")
        .expect("the record");
    assert_eq!(
        (record.state, record.reason.as_deref(), record.ended_by),
        (CdrState::Failed, Some("no-ack"), Some(Party::Relay))
    );
}
