//! The store's test suite, run against SQLite (a temporary file) and PostgreSQL
//! (a throwaway cluster, see `tests::pg`; set `SIP_RELAY_SKIP_PG=1` to skip those).
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
use relay::store::{Binding, Cdr, CdrState, Fork, Party, ServiceRow, Store, StoreError};
use tests::pg::PgCluster;

const T0: i64 = 1_795_364_726_123;

fn binding(aor: &str, contact: &str, expires_at_ms: i64) -> Binding {
    Binding {
        aor: aor.to_owned(),
        contact: contact.to_owned(),
        instance: None,
        expires_at_ms,
        q: None,
        call_id: format!("reg-{aor}"),
        cseq: 1,
        source: "udp:127.0.0.1:5070".to_owned(),
        updated_at_ms: T0,
        account: None,
        user_agent: None,
        node: None,
    }
}

fn cdr(id: &str, caller: &str, callee: &str, created_at_ms: i64) -> Cdr {
    Cdr {
        id: id.to_owned(),
        call_id: format!("call-{id}@example.com"),
        caller: caller.to_owned(),
        callee: callee.to_owned(),
        created_at_ms,
        started_at_ms: None,
        ended_at_ms: None,
        duration_ms: None,
        ended_by: None,
        status: None,
        reason: None,
        state: CdrState::Attempt,
        ..Cdr::default()
    }
}

async fn users(store: &Store) {
    store
        .add_user("alice", "md5a", "sha-a", "example.com")
        .await
        .unwrap();
    store
        .add_user("bob", "md5b", "sha-b", "example.com")
        .await
        .unwrap();
    let err = store
        .add_user("alice", "x", "y", "example.com")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::UserExists(ref n) if n == "alice"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "user \"alice\" already exists");
    // The duplicate did not overwrite the credentials.
    let creds = store.user_credentials("alice").await.unwrap().unwrap();
    assert_eq!(
        (
            creds.ha1_md5.as_str(),
            creds.ha1_sha256.as_str(),
            creds.realm.as_str()
        ),
        ("md5a", "sha-a", "example.com")
    );

    let names: Vec<String> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(store.list_users().await.unwrap()[0].created_at_ms > 0);

    store
        .set_user_password("alice", "md5n", "sha-n", "other.example")
        .await
        .unwrap();
    let creds = store.user_credentials("alice").await.unwrap().unwrap();
    assert_eq!(
        (
            creds.ha1_md5.as_str(),
            creds.ha1_sha256.as_str(),
            creds.realm.as_str()
        ),
        ("md5n", "sha-n", "other.example")
    );
    let err = store
        .set_user_password("carol", "a", "b", "c")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NoSuchUser(ref n) if n == "carol"),
        "{err:?}"
    );

    // Removing a user removes its bindings, and only its.
    store
        .upsert_binding(&binding("alice", "sip:alice@192.0.2.1:5070", T0 + 60_000))
        .await
        .unwrap();
    store
        .upsert_binding(&binding("bob", "sip:bob@192.0.2.2:5070", T0 + 60_000))
        .await
        .unwrap();
    store.remove_user("alice").await.unwrap();
    assert!(store.user_credentials("alice").await.unwrap().is_none());
    assert!(store.bindings("alice", T0).await.unwrap().is_empty());
    assert_eq!(store.bindings("bob", T0).await.unwrap().len(), 1);
    let err = store.remove_user("alice").await.unwrap_err();
    assert!(matches!(err, StoreError::NoSuchUser(_)), "{err:?}");
    let names: Vec<String> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["bob"]);
    // A removed name can be added again.
    store
        .add_user("alice", "1", "2", "example.com")
        .await
        .unwrap();
}

async fn bindings(store: &Store) {
    let mut a1 = binding(
        "alice",
        "sip:alice@192.0.2.1:5070;transport=tcp",
        T0 + 60_000,
    );
    a1.instance = Some("<urn:uuid:00000000-0000-0000-0000-000000000001>".to_owned());
    a1.q = Some(500);
    let mut a2 = binding("alice", "sip:alice@192.0.2.9:5070", T0 + 10_000);
    a2.q = Some(1000);
    let b1 = binding("bob", "sip:bob@192.0.2.2:5070", T0 + 120_000);
    for b in [&a1, &a2, &b1] {
        store.upsert_binding(b).await.unwrap();
    }
    // Highest q first; all fields round-trip.
    assert_eq!(
        store.bindings("alice", T0).await.unwrap(),
        [a2.clone(), a1.clone()]
    );

    // Upsert replaces by (aor, contact).
    let mut a1b = a1.clone();
    a1b.cseq = 2;
    a1b.expires_at_ms = T0 + 90_000;
    a1b.instance = None;
    a1b.q = None;
    a1b.source = "tcp:192.0.2.1:40000".to_owned();
    a1b.updated_at_ms = T0 + 1;
    store.upsert_binding(&a1b).await.unwrap();
    assert_eq!(
        store.bindings("alice", T0).await.unwrap(),
        [a1b.clone(), a2.clone()]
    );

    // Expiry: at T0 + 10 s, a2 has expired (expires_at_ms is exclusive).
    assert_eq!(
        store.bindings("alice", T0 + 10_000).await.unwrap(),
        [a1b.clone()]
    );
    let all = store.all_bindings(T0 + 10_000).await.unwrap();
    assert_eq!(all, [a1b.clone(), b1.clone()]);
    assert_eq!(store.purge_expired_bindings(T0 + 10_000).await.unwrap(), 1);
    assert_eq!(store.purge_expired_bindings(T0 + 10_000).await.unwrap(), 0);
    assert_eq!(store.all_bindings(T0).await.unwrap().len(), 2);

    // Remove one, remove all of an AOR; removing what is not there is no error.
    store
        .remove_binding("alice", &a1b.contact, None)
        .await
        .unwrap();
    store
        .remove_binding("alice", &a1b.contact, None)
        .await
        .unwrap();
    assert!(store.bindings("alice", T0).await.unwrap().is_empty());
    store.upsert_binding(&a2).await.unwrap();
    store.upsert_binding(&a1).await.unwrap();
    store.remove_bindings("alice").await.unwrap();
    assert!(store.bindings("alice", T0).await.unwrap().is_empty());
    assert_eq!(store.bindings("bob", T0).await.unwrap(), [b1]);
}

async fn cdrs(store: &Store) {
    let c1 = cdr("00000000-0000-4000-8000-000000000001", "alice", "bob", T0);
    let c2 = cdr(
        "00000000-0000-4000-8000-000000000002",
        "bob",
        "carol",
        T0 + 1000,
    );
    let c3 = cdr(
        "00000000-0000-4000-8000-000000000003",
        "carol",
        "alice",
        T0 + 2000,
    );
    for c in [&c1, &c2, &c3] {
        store.insert_cdr(c).await.unwrap();
    }
    assert_eq!(store.cdr(&c1.id).await.unwrap(), Some(c1.clone()));
    assert_eq!(store.cdr("nope").await.unwrap(), None);

    // A second insert of the same id fails and changes nothing.
    let mut dup = c1.clone();
    dup.caller = "mallory".to_owned();
    let err = store.insert_cdr(&dup).await.unwrap_err();
    assert!(
        matches!(err, StoreError::CdrExists(ref id) if *id == c1.id),
        "{err:?}"
    );
    assert_eq!(store.cdr(&c1.id).await.unwrap(), Some(c1.clone()));
    assert_eq!(store.list_cdrs(None, None).await.unwrap().len(), 3);

    // Update every mutable field.
    let mut ended = c1.clone();
    ended.started_at_ms = Some(T0 + 500);
    ended.ended_at_ms = Some(T0 + 12_845);
    ended.duration_ms = Some(12_345);
    ended.ended_by = Some(Party::Caller);
    ended.status = Some(200);
    ended.reason = Some("bye".to_owned());
    ended.state = CdrState::Ended;
    store.update_cdr(&ended).await.unwrap();
    assert_eq!(store.cdr(&c1.id).await.unwrap(), Some(ended.clone()));
    let err = store
        .update_cdr(&cdr("missing", "a", "b", T0))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSuchCdr(_)), "{err:?}");

    // Newest first; by user as caller or callee; limit.
    let ids = |v: Vec<Cdr>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_cdrs(None, None).await.unwrap()),
        [c3.id.clone(), c2.id.clone(), c1.id.clone()]
    );
    assert_eq!(
        ids(store.list_cdrs(Some("alice"), None).await.unwrap()),
        [c3.id.clone(), c1.id.clone()]
    );
    assert_eq!(
        ids(store.list_cdrs(Some("bob"), Some(1)).await.unwrap()),
        [c2.id.as_str()]
    );
    assert_eq!(
        ids(store.list_cdrs(None, Some(2)).await.unwrap()),
        [c3.id.clone(), c2.id.clone()]
    );
    assert!(
        store
            .list_cdrs(Some("nobody"), None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.list_cdrs(None, Some(0)).await.unwrap().is_empty());
    assert_eq!(
        store.list_cdrs(Some("alice"), None).await.unwrap()[1],
        ended
    );

    // What a relay runs at start on the records a previous run of its node left open
    // (`Sessions::recover`): it claims them for its run, closes the attempts (no duration
    // invented) and reads back the established sessions to check their parties.
    let mut established = cdr(
        "00000000-0000-4000-8000-000000000004",
        "dave",
        "erin",
        T0 + 3000,
    );
    established.started_at_ms = Some(T0 + 3500);
    established.status = Some(200);
    established.state = CdrState::Established;
    store.insert_cdr(&established).await.unwrap();
    let mut records = vec![established.clone()];
    for id in [&c2.id, &c3.id] {
        records.push(store.cdr(id).await.unwrap().unwrap());
    }
    for r in &mut records {
        r.owner = Some("node-a".into());
        r.instance = Some("node-a-run-1".into());
        store.update_cdr(r).await.unwrap();
    }
    // c2 and c3 are still "attempt"; c1 ("ended") is nobody's and stays as it is.
    assert_eq!(
        store
            .claim_open_cdrs("node-a", "node-a-run-2")
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        store
            .close_open_attempts(T0 + 9000, "relay-restart", "node-a-run-2")
            .await
            .unwrap(),
        2
    );
    let attempt = store.cdr(&c2.id).await.unwrap().unwrap();
    assert_eq!(attempt.state, CdrState::Failed);
    assert_eq!(attempt.ended_at_ms, Some(T0 + 9000));
    assert_eq!(attempt.ended_by, Some(Party::Relay));
    assert_eq!(attempt.reason.as_deref(), Some("relay-restart"));
    assert_eq!(attempt.duration_ms, None);
    let open = store.established_cdrs("node-a-run-2").await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, established.id);
    assert_eq!(open[0].state, CdrState::Established);
    assert_eq!(open[0].started_at_ms, Some(T0 + 3500));
    assert_eq!(store.cdr(&c1.id).await.unwrap(), Some(ended));
    // Run again, nothing is left to close.
    assert_eq!(
        store
            .close_open_attempts(T0 + 9999, "relay-restart", "node-a-run-2")
            .await
            .unwrap(),
        0
    );
}

/// A store that is opened twice (a second process, e.g. `relay user add` beside `relay
/// serve`) sees the first one's writes; migrations are idempotent.
async fn reopen(url: &str) {
    let a = Store::open(url).await.unwrap();
    a.add_user("zed", "1", "2", "r").await.unwrap();
    let b = Store::open(url).await.unwrap();
    assert!(b.user_credentials("zed").await.unwrap().is_some());
    b.remove_user("zed").await.unwrap();
    assert!(a.user_credentials("zed").await.unwrap().is_none());
}

async fn sqlite_store() -> (tempfile::TempDir, String, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("relay.db").display());
    let store = Store::open(&url).await.unwrap();
    assert!(!store.is_postgres());
    (dir, url, store)
}

async fn pg_store() -> Option<(String, Store)> {
    let cluster = PgCluster::shared_or_skip()?;
    let url = cluster.fresh_database().unwrap();
    let store = Store::open(&url).await.unwrap();
    assert!(store.is_postgres());
    Some((url, store))
}

macro_rules! suite {
    ($($name:ident),*) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_dir, _url, store) = super::sqlite_store().await;
                    super::$name(&store).await;
                }
            )*
            #[tokio::test]
            async fn reopen() {
                let (_dir, url, _store) = super::sqlite_store().await;
                super::reopen(&url).await;
            }
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some((_url, store)) = super::pg_store().await else { return };
                    super::$name(&store).await;
                }
            )*
            #[tokio::test]
            async fn reopen() {
                let Some((url, _store)) = super::pg_store().await else { return };
                super::reopen(&url).await;
            }
        }
    };
}

/// The relay's record writer: a batch of new and changed records in one statement.
/// One batch of charges as the committer hands it over: every rule answered in order, keys
/// and refunds seen across the batch, limits per session, and nothing of a refused charge
/// stored.
async fn ledger(store: &Store) {
    use proto::charge::{Charge, Kind, Outcome};
    use relay::store::{Channel, Submission};
    let mut wine = ServiceRow {
        name: "wine".into(),
        per_minute_minor: 0,
        setup_fee_minor: 0,
        increment_secs: 1,
        currency: "EUR".into(),
        fork: Fork::First,
        max_duration_secs: None,
        max_charge_minor: Some(5000),
        max_session_charges_minor: Some(6000),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    store.add_service(&wine).await.unwrap();
    wine.max_charge_minor = Some(5000);
    let session = Cdr {
        service: Some("wine".into()),
        server: Some("shop".into()),
        state: CdrState::Established,
        started_at_ms: Some(T0),
        ..cdr("00000000-0000-4000-8000-00000000000a", "alice", "wine", T0)
    };
    store
        .save_cdrs(std::slice::from_ref(&session))
        .await
        .unwrap();
    let c = |key: &str, price: i64, qty: i64| Charge {
        session_id: session.id.clone(),
        idempotency_key: key.into(),
        item_id: "i".into(),
        item_name: "item".into(),
        unit_price_minor: price,
        quantity: qty,
        currency: "EUR".into(),
        occurred_at_ms: T0 + 1000,
        ..Charge::default()
    };
    let refund = |key: &str, of: &str, price: i64| Charge {
        kind: Kind::Refund,
        refunds: Some(of.into()),
        ..c(key, price, 1)
    };
    let sub = |server: &str, charge: Charge| Submission {
        appserver: server.into(),
        channel: Channel::Grpc,
        charge,
    };
    let batch = vec![
        sub("shop", c("a", 1000, 2)),         // recorded: 2000
        sub("shop", c("a", 1000, 2)),         // the same again in the batch: duplicate
        sub("shop", c("a", 1000, 3)),         // the key for another charge: conflict
        sub("other", c("a", 1000, 2)),        // another server's key space: forbidden here
        sub("shop", c("b", 6000, 1)),         // above the 5000 a charge
        sub("shop", c("b", 2000, 2)),         // the same key corrected: recorded, total 6000
        sub("shop", c("c", 1, 1)),            // above the 6000 a session
        sub("shop", refund("r1", "a", 1500)), // refund of a: recorded, total 4500
        sub("shop", refund("r2", "a", 600)),  // would refund 2100 of 2000: refused
        sub("shop", c("c", 1, 1)),            // room again after the refund: recorded
        sub("shop", refund("r3", "zz", 1)),   // no such charge
    ];
    let want = [
        Outcome::Recorded,
        Outcome::Duplicate,
        Outcome::Conflict,
        Outcome::Forbidden,
        Outcome::Refused,
        Outcome::Recorded,
        Outcome::Refused,
        Outcome::Recorded,
        Outcome::Refused,
        Outcome::Recorded,
        Outcome::NotFound,
    ];
    let got = store
        .record_charges(&batch, T0 + 2000, 900_000)
        .await
        .unwrap();
    let outcomes: Vec<Outcome> = got.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, want, "{got:#?}");
    assert_eq!(got[1].charge_id, got[0].charge_id);
    let lines = store.session_charges(&session.id).await.unwrap();
    let keys: Vec<&str> = lines.iter().map(|l| l.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "r1", "c"]);
    let sum: i64 = lines.iter().map(|l| l.signed_minor()).sum();
    assert_eq!(sum, 2000 + 4000 - 1500 + 1);
    // A later batch: every key answers as before, nothing doubles.
    let again = store
        .record_charges(&batch[..2], T0 + 3000, 900_000)
        .await
        .unwrap();
    assert!(
        again.iter().all(|r| r.outcome == Outcome::Duplicate),
        "{again:#?}"
    );
    assert_eq!(store.session_charges(&session.id).await.unwrap().len(), 4);
}

async fn saved_cdrs(store: &Store) {
    let mut a = cdr("00000000-0000-4000-8000-0000000000a1", "alice", "bob", T0);
    let b = cdr(
        "00000000-0000-4000-8000-0000000000b2",
        "bob",
        "alice",
        T0 + 1,
    );
    store.save_cdrs(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(store.cdr(&a.id).await.unwrap(), Some(a.clone()));
    // The next batch changes `a` and adds a third; `b` stays as it was.
    a.started_at_ms = Some(T0 + 10);
    a.ended_at_ms = Some(T0 + 1010);
    a.duration_ms = Some(1000);
    a.state = CdrState::Ended;
    let c = cdr(
        "00000000-0000-4000-8000-0000000000c3",
        "carol",
        "bob",
        T0 + 2,
    );
    store.save_cdrs(&[a.clone(), c.clone()]).await.unwrap();
    assert_eq!(store.cdr(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.cdr(&b.id).await.unwrap(), Some(b));
    // A closed record is never written again.
    let mut late = a.clone();
    late.duration_ms = Some(5);
    let written = store.save_cdrs(&[late]).await.unwrap();
    assert!(written.is_empty(), "an ended record was rewritten");
    assert_eq!(store.cdr(&a.id).await.unwrap(), Some(a.clone()));
    // Every column survives the trip, text that needs escaping and the widest numbers included.
    let full = Cdr {
        id: "00000000-0000-4000-8000-0000000000f4".into(),
        call_id: "a\"b\\c'd@x".into(),
        caller: "zoë".into(),
        callee: "bob".into(),
        created_at_ms: i64::MAX - 1,
        started_at_ms: Some(i64::MIN + 1),
        ended_at_ms: Some(0),
        duration_ms: Some(1 << 60),
        ended_by: Some(Party::Callee),
        status: Some(i32::MAX),
        reason: Some("line\nbreak\t\u{1F377}".into()),
        state: CdrState::Established,
        service: Some("wine".into()),
        server: Some("shop".into()),
        details: Some("{\"detail\": \"a dark beer\"}".into()),
        charge_minor: Some(9_007_199_254_740_993),
        currency: Some("EUR".into()),
        billed_secs: Some(60),
        last_alive_ms: Some(T0),
        resumed_at_ms: Some(T0 + 1),
        dialog: Some("{\"route\": [\"<sip:a;lr>\"]}".into()),
        owner: Some("node-1".into()),
        instance: Some("run-1".into()),
        transferred_from: Some("00000000-0000-4000-8000-0000000000f3".into()),
        segments: Some("[{\"service\":\"wine\",\"details\":\"zoë's \\\"red\\\"\"}]".into()),
    };
    store.save_cdrs(std::slice::from_ref(&full)).await.unwrap();
    assert_eq!(store.cdr(&full.id).await.unwrap(), Some(full));
    assert_eq!(store.list_cdrs(None, None).await.unwrap().len(), 4);
    // A large batch, one statement.
    let many: Vec<Cdr> = (0..2500)
        .map(|i| {
            cdr(
                &format!("00000000-0000-4000-8000-{i:012}"),
                "dave",
                "erin",
                T0 + 10 + i,
            )
        })
        .collect();
    store.save_cdrs(&many).await.unwrap();
    assert_eq!(
        store.list_cdrs(Some("dave"), None).await.unwrap().len(),
        2500
    );
}

/// Services, application servers, rules, session records with charges, and what a restart
/// finds: the same answers on both databases.
async fn catalog(store: &Store) {
    let wine = ServiceRow {
        name: "wine".into(),
        per_minute_minor: 120,
        setup_fee_minor: 10,
        increment_secs: 6,
        currency: "EUR".into(),
        fork: Fork::Sequential,
        max_duration_secs: Some(7200),
        max_charge_minor: None,
        max_session_charges_minor: None,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    store.add_service(&wine).await.unwrap();
    assert!(matches!(
        store.add_service(&wine).await,
        Err(StoreError::ServiceExists(_))
    ));
    let got = store.service("wine").await.unwrap().unwrap();
    assert_eq!(
        (
            got.per_minute_minor,
            got.setup_fee_minor,
            got.increment_secs
        ),
        (120, 10, 6)
    );
    assert_eq!(got.fork, Fork::Sequential);
    assert_eq!(got.max_duration_secs, Some(7200));
    let mut changed = got.clone();
    changed.per_minute_minor = 90;
    changed.max_duration_secs = None;
    changed.fork = Fork::All;
    store.update_service(&changed).await.unwrap();
    let got = store.service("wine").await.unwrap().unwrap();
    assert_eq!(
        (got.per_minute_minor, got.max_duration_secs, got.fork),
        (90, None, Fork::All)
    );

    // Application servers: only existing services; names shared with services refused.
    assert!(matches!(
        store
            .add_appserver("cellar", "m", "s", "r", &["beer".into()])
            .await,
        Err(StoreError::NoSuchService(_))
    ));
    store
        .add_appserver("cellar", "m", "s", "r", &["wine".into()])
        .await
        .unwrap();
    assert!(matches!(
        store
            .add_appserver("wine", "m", "s", "r", &["wine".into()])
            .await,
        Err(StoreError::NameTaken(..))
    ));
    assert!(matches!(
        store.add_user("wine", "m", "s", "r").await,
        Err(StoreError::NameTaken(..))
    ));
    let mut named_like_cellar = wine.clone();
    named_like_cellar.name = "cellar".into();
    assert!(matches!(
        store.add_service(&named_like_cellar).await,
        Err(StoreError::NameTaken(..))
    ));
    assert_eq!(
        store.appserver_services("cellar").await.unwrap(),
        vec!["wine".to_string()]
    );
    let list = store.list_appservers().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].services, vec!["wine".to_string()]);
    // Application servers are not users.
    assert!(
        store
            .list_users()
            .await
            .unwrap()
            .iter()
            .all(|u| u.name != "cellar")
    );
    assert!(store.user_credentials("cellar").await.unwrap().is_some());

    // A server's bindings of a shared service: another account cannot remove them.
    let mut b = binding("wine", "sip:wine@127.0.0.1:6000", T0 + 60_000);
    b.account = Some("cellar".into());
    store.upsert_binding(&b).await.unwrap();
    store
        .remove_binding("wine", &b.contact, Some("other"))
        .await
        .unwrap();
    assert_eq!(store.bindings("wine", T0).await.unwrap().len(), 1);
    assert_eq!(
        store.bindings("wine", T0).await.unwrap()[0]
            .account
            .as_deref(),
        Some("cellar")
    );

    // Rules: tried by priority, then id; a rule's service must exist.
    assert!(matches!(
        store.add_rule(1, "ruri.user=x", "beer", None, true).await,
        Err(StoreError::NoSuchService(_))
    ));
    let r1 = store
        .add_rule(100, "ruri.user=vino", "wine", Some("cellar"), false)
        .await
        .unwrap();
    let r2 = store
        .add_rule(5, "caller=bob", "wine", None, true)
        .await
        .unwrap();
    let rules = store.list_rules().await.unwrap();
    assert_eq!(rules.iter().map(|r| r.id).collect::<Vec<_>>(), vec![r2, r1]);
    assert_eq!(rules[1].servers.as_deref(), Some("cellar"));
    assert!(!rules[1].servers_only);
    assert!(rules[0].servers_only);
    // A service used by a rule cannot go; once the rules are gone it can, with its rights and
    // its servers' bindings.
    assert!(matches!(
        store.remove_service("wine").await,
        Err(StoreError::ServiceInUse { .. })
    ));
    store.remove_rule(r1).await.unwrap();
    store.remove_rule(r2).await.unwrap();
    assert!(matches!(
        store.remove_rule(r2).await,
        Err(StoreError::NoSuchRule(_))
    ));

    // A session's record with its charge; a statement picks it by user and period.
    let mut s = cdr("00000000-0000-4000-8000-00000000c0de", "alice", "wine", T0);
    s.started_at_ms = Some(T0 + 100);
    s.ended_at_ms = Some(T0 + 61_100);
    s.duration_ms = Some(61_000);
    s.state = CdrState::Ended;
    s.service = Some("wine".into());
    s.server = Some("cellar".into());
    s.details = Some("red".into());
    s.charge_minor = Some(100);
    s.currency = Some("EUR".into());
    s.billed_secs = Some(66);
    s.owner = Some("relay-1".into());
    store.save_cdrs(std::slice::from_ref(&s)).await.unwrap();
    assert_eq!(store.cdr(&s.id).await.unwrap(), Some(s.clone()));
    assert_eq!(
        store
            .user_sessions("alice", T0 - 1, T0 + 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .user_sessions("alice", T0 + 1, T0 + 2)
            .await
            .unwrap()
            .is_empty()
    );
    // What a restart of relay-1 finds: its established records, not relay-2's.
    let mut open1 = s.clone();
    open1.id = "00000000-0000-4000-8000-00000000e001".into();
    open1.state = CdrState::Established;
    open1.ended_at_ms = None;
    open1.dialog = Some("{}".into());
    open1.instance = Some("relay-1-run-1".into());
    let mut open2 = open1.clone();
    open2.id = "00000000-0000-4000-8000-00000000e002".into();
    open2.owner = Some("relay-2".into());
    open2.instance = Some("relay-2-run-1".into());
    store.save_cdrs(&[open1.clone(), open2]).await.unwrap();
    // On PostgreSQL a relay takes over its own node's records only; on SQLite, which one relay
    // serves at a time, every open record (the relay before may have had another node id).
    let expected = if store.is_postgres() { 1 } else { 2 };
    assert_eq!(
        store
            .claim_open_cdrs("relay-1", "relay-1-run-2")
            .await
            .unwrap(),
        expected
    );
    let mine = store.established_cdrs("relay-1-run-2").await.unwrap();
    assert_eq!(mine.len(), expected as usize);
    assert!(mine.iter().any(|c| c.id == open1.id));
    assert!(mine.iter().all(|c| c.dialog.as_deref() == Some("{}")));

    store.remove_appserver("cellar").await.unwrap();
    assert!(store.bindings("wine", T0).await.unwrap().is_empty());
    assert!(matches!(
        store.remove_appserver("cellar").await,
        Err(StoreError::NoSuchAppServer(_))
    ));
    store.remove_service("wine").await.unwrap();
    assert!(store.service("wine").await.unwrap().is_none());
}

/// Node leases and record ownership for several relays on one database: one run holds a node id
/// at a time (compare-and-swap), open records move to the run that took the node over in one
/// statement, and neither a stale write nor a run that lost its lease changes a record.
async fn nodes(store: &Store) {
    use relay::store::NodeLease;
    let lease = |instance: &str, beat: i64| NodeLease {
        node_id: "relay-1".into(),
        instance: instance.into(),
        host: "host-a".into(),
        pid: 1,
        sip: "127.0.0.1:5060".into(),
        started_at_ms: T0,
        heartbeat_ms: beat,
    };
    assert!(store.node_lease("relay-1").await.unwrap().is_none());
    assert!(store.take_node(&lease("run-1", T0), None).await.unwrap());
    // A second relay cannot take a held node as if it were free...
    assert!(!store.take_node(&lease("run-2", T0), None).await.unwrap());
    // ...nor replace a run that no longer holds it.
    assert!(
        !store
            .take_node(&lease("run-2", T0), Some("run-0"))
            .await
            .unwrap()
    );
    assert!(
        store
            .heartbeat("relay-1", "run-1", T0 + 2_000)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .node_lease("relay-1")
            .await
            .unwrap()
            .map(|l| l.heartbeat_ms),
        Some(T0 + 2_000)
    );
    // Two relays take the node over from run-1 at once: exactly one wins.
    let (two, three) = (lease("run-2", T0 + 20_000), lease("run-3", T0 + 20_000));
    let (a, b) = tokio::join!(
        store.take_node(&two, Some("run-1")),
        store.take_node(&three, Some("run-1")),
    );
    assert!(
        a.unwrap() ^ b.unwrap(),
        "both or neither took the node over"
    );
    let winner = store.node_lease("relay-1").await.unwrap().unwrap().instance;
    // The run that lost the lease can no longer renew it.
    assert!(
        !store
            .heartbeat("relay-1", "run-1", T0 + 21_000)
            .await
            .unwrap()
    );

    // Run-1 left a session open; the winner claims it; run-1's late write changes nothing.
    let mut open = cdr("00000000-0000-4000-8000-0000000000a1", "alice", "bob", T0);
    open.state = CdrState::Established;
    open.started_at_ms = Some(T0 + 10);
    open.owner = Some("relay-1".into());
    open.instance = Some("run-1".into());
    let written = store.save_cdrs(std::slice::from_ref(&open)).await.unwrap();
    assert!(written.contains(&open.id));
    assert_eq!(store.claim_open_cdrs("relay-1", &winner).await.unwrap(), 1);
    let mut stale = open.clone();
    stale.state = CdrState::Ended;
    stale.ended_at_ms = Some(T0 + 5_000);
    stale.reason = Some("bye".into());
    let written = store.save_cdrs(std::slice::from_ref(&stale)).await.unwrap();
    assert!(
        written.is_empty(),
        "a run that lost the node changed its record"
    );
    assert_eq!(
        store.cdr(&open.id).await.unwrap().map(|c| c.state),
        Some(CdrState::Established)
    );
    // The winner closes it; a later, older state never reopens it.
    let mut closed = open.clone();
    closed.instance = Some(winner.clone());
    closed.state = CdrState::Ended;
    closed.reason = Some("relay-restart".into());
    closed.ended_at_ms = Some(T0 + 30_000);
    let written = store
        .save_cdrs(std::slice::from_ref(&closed))
        .await
        .unwrap();
    assert!(written.contains(&closed.id));
    let mut older = open.clone();
    older.instance = Some(winner.clone());
    assert!(
        store
            .save_cdrs(std::slice::from_ref(&older))
            .await
            .unwrap()
            .is_empty()
    );
    let stored = store.cdr(&open.id).await.unwrap().unwrap();
    assert_eq!(stored.state, CdrState::Ended);
    assert_eq!(stored.reason.as_deref(), Some("relay-restart"));
    // A clean stop gives the lease up.
    store.release_node("relay-1", &winner).await.unwrap();
    assert!(store.node_lease("relay-1").await.unwrap().is_none());
}

suite!(users, bindings, cdrs, saved_cdrs, catalog, nodes, ledger);

#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.add_user("a", "1", "2", "r").await.unwrap();
    assert!(path.exists());
    assert!(dir.path().join("new.db-wal").exists(), "no WAL file");
}

#[tokio::test]
async fn sqlite_memory_store_works() {
    let store = Store::open("sqlite::memory:").await.unwrap();
    users(&store).await;
    bindings(&store).await;
    cdrs(&store).await;
}
