//! Sessions that move (SPEC features 8 and 9: service change, transfer), end to end with the three programs as
//! processes, on SQLite and on PostgreSQL: the client changes its session's details (re-INVITE
//! through the relay, which searches again), the web service does (`POST /sessions/{id}/change`
//! on its agent, sent as UPDATE to a client that allows it), and each kind of refusal leaves the
//! session running and billed as before. What is checked is what users see: the client's
//! events, the agent's answers and lines, the operator's records with their segments.

use serde_json::{Value, json};
use std::time::Duration;
use tests::harness::Db;
use tests::procs::{AppAgent, ClientProc, RelayProc};

use tests::on_both_stores;

on_both_stores!(
    a_client_changes_its_session_and_pays_each_segment_at_its_tariff,
    a_change_elsewhere_or_refused_leaves_the_session_as_it_was,
    the_web_service_changes_a_session,
    a_client_moves_to_another_service,
    a_client_keeps_its_session_beside_the_new_one,
    the_web_service_refers_its_client_elsewhere,
);

const URL: &str = "https://cellar.test/shop";

/// A relay with alice; wine (1.20 EUR a minute + 0.10 set-up), beer (2.40 a minute, no
/// set-up) and tea (0.60 a minute), 1 s increments. Details naming beer go to beer, tea to tea
/// (the operator's rules). cellar may deliver wine and beer, teahouse tea.
async fn relay(db: Db) -> anyhow::Result<RelayProc> {
    let relay = RelayProc::start(db, "").await?;
    relay.add_user("alice")?;
    for (name, per_minute, setup) in [
        ("wine", "120", "10"),
        ("beer", "240", "0"),
        ("tea", "60", "0"),
    ] {
        relay.admin(&[
            "service",
            "add",
            name,
            "--per-minute",
            per_minute,
            "--setup-fee",
            setup,
            "--increment",
            "1",
            "--currency",
            "EUR",
        ])?;
    }
    relay.admin(&[
        "appserver",
        "add",
        "cellar",
        "--password",
        "cellar-pw",
        "--service",
        "wine",
        "--service",
        "beer",
    ])?;
    relay.admin(&[
        "appserver",
        "add",
        "teahouse",
        "--password",
        "teahouse-pw",
        "--service",
        "tea",
    ])?;
    relay.admin(&[
        "rule",
        "add",
        "--when",
        "body.detail=*beer*",
        "--service",
        "beer",
    ])?;
    relay.admin(&[
        "rule",
        "add",
        "--when",
        "body.detail=*tea*",
        "--service",
        "tea",
    ])?;
    Ok(relay)
}

/// cellar's agent serving `services`.
async fn cellar(relay: &RelayProc, services: &[&str]) -> anyhow::Result<AppAgent> {
    let mut args = vec!["--url", URL];
    for s in services {
        args.extend_from_slice(&["--service", s]);
    }
    AppAgent::start(relay.addr, "cellar", &args).await
}

fn open(relay: &RelayProc, args: &[&str]) -> anyhow::Result<ClientProc> {
    let mut argv = vec!["open"];
    argv.extend_from_slice(args);
    ClientProc::start(relay.addr, "alice", "alice-pw", &argv)
}

fn ended(cdrs: &[Value]) -> &Value {
    let matching: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
    assert_eq!(matching.len(), 1, "one ended record expected: {cdrs:#?}");
    matching[0]
}

/// `per_minute` a minute for `ms`, 1 s increments, rounded up to the cent.
fn time_charge(ms: i64, per_minute: i64) -> i64 {
    let billed = (ms + 999) / 1000;
    (per_minute * billed + 59) / 60
}

/// Checks the record's segments against their tariffs and the record: they add up to its
/// duration and charge. Returns them.
fn checked_segments(cdr: &Value) -> Vec<Value> {
    let segments = cdr["segments"].as_array().cloned().unwrap_or_default();
    assert!(!segments.is_empty(), "no segments in {cdr:#}");
    let mut duration = 0;
    let mut charge = 0;
    for (i, s) in segments.iter().enumerate() {
        let ms = s["duration_ms"].as_i64().unwrap_or(-1);
        assert!(ms >= 0, "{s:#}");
        let per_minute = s["tariff"]["per_minute_minor"].as_i64().unwrap_or(-1);
        let setup = if i == 0 {
            s["tariff"]["setup_fee_minor"].as_i64().unwrap_or(0)
        } else {
            0
        };
        assert_eq!(
            s["charge_minor"].as_i64(),
            Some(setup + time_charge(ms, per_minute)),
            "segment {i} rated by its own tariff: {s:#}"
        );
        assert!(
            s["ended_at_ms"].as_i64() >= s["started_at_ms"].as_i64(),
            "{s:#}"
        );
        duration += ms;
        charge += s["charge_minor"].as_i64().unwrap_or(0);
    }
    assert_eq!(cdr["duration_ms"].as_i64(), Some(duration), "{cdr:#}");
    assert_eq!(cdr["charge_minor"].as_i64(), Some(charge), "{cdr:#}");
    segments
}

async fn a_client_changes_its_session_and_pays_each_segment_at_its_tariff(
    db: Db,
) -> anyhow::Result<()> {
    let relay = relay(db).await?;
    let agent = cellar(&relay, &["wine", "beer"]).await?;
    let mut alice = open(
        &relay,
        &[
            "wine",
            "--detail",
            "a red",
            "--change-after",
            "1s=a dark beer",
            "--for",
            "3s",
        ],
    )?;
    let session = alice.next_named("session", 10).await?;
    assert_eq!(session["service"], "wine");
    let changed = alice.next_named("changed", 10).await?;
    assert_eq!(changed["by"], "client");
    assert_eq!(changed["service"], "beer", "{changed}");
    assert_eq!(changed["detail"], "a dark beer");
    assert!(
        changed["url"].as_str().is_some_and(|u| u.starts_with(URL)),
        "the client is shown the URL: {changed}"
    );
    agent
        .out
        .wait_for("changed by the client: now beer (a dark beer)", 5)
        .await?;
    // The web page sees what the session is now.
    let token = changed["url"]
        .as_str()
        .and_then(|u| u.split("token=").nth(1))
        .unwrap_or_default()
        .to_string();
    let (status, seen) = agent.post("/introspect", &format!("token={token}")).await?;
    assert_eq!(status, 200);
    assert_eq!(seen["active"], true);
    assert_eq!(seen["service"], "beer");
    assert_eq!(seen["detail"], "a dark beer");
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(alice.exit_code(10).await?, Some(0));

    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = ended(&cdrs);
    assert_eq!(cdr["service"], "beer", "the record names what ran last");
    assert_eq!(cdr["details"], "a dark beer");
    let segments = checked_segments(cdr);
    assert_eq!(segments.len(), 2, "{cdr:#}");
    assert_eq!(segments[0]["service"], "wine");
    assert_eq!(segments[0]["details"], "a red");
    assert_eq!(segments[1]["service"], "beer");
    assert_eq!(segments[1]["details"], "a dark beer");
    assert_eq!(segments[1]["started_at_ms"], segments[0]["ended_at_ms"]);
    let first = segments[0]["duration_ms"].as_i64().unwrap_or(0);
    assert!(
        (900..2500).contains(&first),
        "the change came about 1 s in: {first} ms"
    );
    // The client was told the sum.
    assert_eq!(
        closed["charge"]["amount_minor"], cdr["charge_minor"],
        "{closed}"
    );
    // The operator's listing carries the segments in CSV too.
    let csv = relay.admin(&["cdr", "list", "--user", "alice", "--format", "csv"])?;
    assert!(
        csv.lines()
            .next()
            .is_some_and(|h| h.ends_with(",segments,transferred_from")),
        "{csv}"
    );
    assert!(csv.contains("a dark beer"), "{csv}");
    Ok(())
}

async fn a_change_elsewhere_or_refused_leaves_the_session_as_it_was(db: Db) -> anyhow::Result<()> {
    let relay = relay(db).await?;
    // cellar may deliver beer at the relay but its agent serves wine only: it refuses beer.
    let agent = cellar(&relay, &["wine"]).await?;
    let mut alice = open(&relay, &["wine", "--detail", "a red"])?;
    alice.next_named("session", 10).await?;

    // Tea is not cellar's: the relay refuses, naming where to go.
    alice.say("change a cup of tea")?;
    let refused = alice.next_named("change-refused", 10).await?;
    assert_eq!(refused["status"], 488, "{refused}");
    assert_eq!(refused["transfer_to"], "tea");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("transfer to the service tea")),
        "{refused}"
    );

    // Beer is cellar's at the relay, but its agent does not serve it: the server refuses.
    alice.say("change a dark beer")?;
    let refused = alice.next_named("change-refused", 10).await?;
    assert_eq!(refused["status"], 404, "{refused}");
    assert!(refused.get("transfer_to").is_none(), "{refused}");
    agent.out.wait_for("change of session", 5).await?;

    // A change without details is refused by the client itself, with what to type.
    alice.say("change")?;
    alice
        .out
        .wait_for("change needs the new details, e.g. change a dark beer", 5)
        .await?;

    // The session went on as wine the whole time.
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = ended(&cdrs);
    assert_eq!(cdr["service"], "wine");
    assert_eq!(cdr["details"], "a red");
    let segments = checked_segments(cdr);
    assert_eq!(segments.len(), 1, "{cdr:#}");
    let ms = cdr["duration_ms"].as_i64().unwrap_or(0);
    assert_eq!(
        cdr["charge_minor"].as_i64(),
        Some(10 + time_charge(ms, 120))
    );
    assert_eq!(closed["charge"]["amount_minor"], cdr["charge_minor"]);
    Ok(())
}

async fn the_web_service_changes_a_session(db: Db) -> anyhow::Result<()> {
    let relay = relay(db).await?;
    let agent = cellar(&relay, &["wine", "beer"]).await?;
    let mut alice = open(&relay, &["wine", "--detail", "a red"])?;
    let session = alice.next_named("session", 10).await?;
    let sid = session["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The client allows UPDATE (its INVITE said so): the change goes as UPDATE.
    let (status, answer) = agent
        .post_json(
            &format!("/sessions/{sid}/change"),
            &json!({"detail": "a dark beer"}),
        )
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], true);
    assert_eq!(answer["method"], "UPDATE");
    let changed = alice.next_named("changed", 10).await?;
    assert_eq!(changed["by"], "server");
    assert_eq!(changed["detail"], "a dark beer");
    assert!(
        changed["url"].as_str().is_some_and(|u| u.starts_with(URL)),
        "{changed}"
    );
    agent
        .out
        .wait_for("changed by the web service: now", 5)
        .await?;

    // Tea is not cellar's: 409 naming the service to transfer to; the session goes on.
    let (status, answer) = agent
        .post_json(
            &format!("/sessions/{sid}/change"),
            &json!({"detail": "a cup of tea"}),
        )
        .await?;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["status"], 488);
    assert_eq!(answer["transfer_to"], "tea");

    // Usual mistakes: no such session, an empty or non-JSON body.
    let (status, _) = agent
        .post_json("/sessions/nope/change", &json!({"detail": "x"}))
        .await?;
    assert_eq!(status, 404);
    let (status, answer) = agent
        .post_json(&format!("/sessions/{sid}/change"), &json!({}))
        .await?;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = agent
        .post_json(&format!("/sessions/{sid}/change"), &json!({"detail": 5}))
        .await?;
    assert_eq!(status, 400, "{answer}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = ended(&cdrs);
    assert_eq!(cdr["service"], "beer");
    let segments = checked_segments(cdr);
    assert_eq!(segments.len(), 2, "{cdr:#}");
    assert_eq!(segments[0]["service"], "wine");
    assert_eq!(segments[1]["service"], "beer");
    assert_eq!(closed["charge"]["amount_minor"], cdr["charge_minor"]);
    Ok(())
}

/// teahouse's agent serving tea.
async fn teahouse(relay: &RelayProc) -> anyhow::Result<AppAgent> {
    AppAgent::start(
        relay.addr,
        "teahouse",
        &["--url", "https://teahouse.test/", "--service", "tea"],
    )
    .await
}

fn by_service<'a>(cdrs: &'a [Value], service: &str) -> &'a Value {
    let matching: Vec<&Value> = cdrs.iter().filter(|c| c["service"] == service).collect();
    assert_eq!(
        matching.len(),
        1,
        "one {service} record expected: {cdrs:#?}"
    );
    matching[0]
}

async fn a_client_moves_to_another_service(db: Db) -> anyhow::Result<()> {
    let relay = relay(db).await?;
    let cellar = cellar(&relay, &["wine"]).await?;
    let _tea = teahouse(&relay).await?;
    let mut alice = open(
        &relay,
        &[
            "wine",
            "--detail",
            "a red",
            "--transfer-after",
            "1s=tea",
            "--for",
            "3s",
        ],
    )?;
    let first = alice.next_named("session", 10).await?;
    assert_eq!(first["service"], "wine");
    // The relay authenticates her again, finds tea's server, which accepts: session 2.
    let second = alice.next_named("session", 10).await?;
    assert_eq!(second["index"], 2);
    assert_eq!(second["transferred_from"], 1);
    assert_eq!(second["service"], "tea");
    assert_eq!(second["server"], "teahouse");
    // The first ends: the relay's BYE, reason transferred.
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 1, "{closed}");
    assert_eq!(closed["by"], "relay");
    assert_eq!(closed["reason"], "transferred");
    cellar
        .out
        .wait_for("ended by the relay (reason: transferred)", 5)
        .await?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 2, "{closed}");
    assert_eq!(alice.exit_code(10).await?, Some(0));

    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    let wine = by_service(&cdrs, "wine");
    let tea = by_service(&cdrs, "tea");
    assert_eq!(wine["reason"], "transferred");
    assert_eq!(wine["ended_by"], "relay");
    assert_eq!(tea["state"], "ended");
    assert_eq!(
        tea["transferred_from"], wine["id"],
        "the records are linked"
    );
    assert!(wine["transferred_from"].is_null());
    // Each is billed by its own service for its own time.
    checked_segments(wine);
    checked_segments(tea);
    Ok(())
}

async fn a_client_keeps_its_session_beside_the_new_one(db: Db) -> anyhow::Result<()> {
    let relay = relay(db).await?;
    let _cellar = cellar(&relay, &["wine"]).await?;
    let _tea = teahouse(&relay).await?;
    let mut alice = open(&relay, &["wine", "--detail", "a red"])?;
    let first = alice.next_named("session", 10).await?;
    alice.say("transfer tea --keep")?;
    let second = alice.next_named("session", 10).await?;
    assert_eq!(second["transferred_from"], 1);
    assert_eq!(second["service"], "tea");
    // A transfer to a service nobody delivers: refused, and both go on.
    alice.say("transfer coffee")?;
    let failed = alice.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 404, "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("transfer of session 1 failed (it goes on)")),
        "{failed}"
    );
    alice.say("list")?;
    let list = alice.next_named("sessions", 10).await?;
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(2), "{list}");
    // Someone else cannot continue alice's session.
    relay.add_user("bob")?;
    let sid = first["session_id"].as_str().unwrap_or_default();
    let mut bob = ClientProc::start(
        relay.addr,
        "bob",
        "bob-pw",
        &["open", &format!("sip:tea@relay.test;from-session={sid}")],
    )?;
    let refused = bob.next_named("failed", 10).await?;
    assert_eq!(refused["status"], 403, "{refused}");
    alice.say("close")?;
    alice.next_named("closed", 10).await?;
    alice.next_named("closed", 10).await?;
    // wine, tea, and the failed attempt at coffee.
    let cdrs = relay.wait_cdrs("alice", 3, 10).await?;
    let wine = by_service(&cdrs, "wine");
    let tea = by_service(&cdrs, "tea");
    assert_eq!(wine["reason"], "bye", "kept until she closed it: {wine:#}");
    assert_eq!(tea["transferred_from"], wine["id"]);
    Ok(())
}

async fn the_web_service_refers_its_client_elsewhere(db: Db) -> anyhow::Result<()> {
    let relay = relay(db).await?;
    let cellar = cellar(&relay, &["wine"]).await?;
    let _tea = teahouse(&relay).await?;
    let mut alice = open(&relay, &["wine", "--detail", "a red"])?;
    let first = alice.next_named("session", 10).await?;
    let sid = first["session_id"].as_str().unwrap_or_default().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Usual mistakes first: no service, an unknown session.
    let (status, answer) = cellar
        .post_json(&format!("/sessions/{sid}/refer"), &json!({"servce": "tea"}))
        .await?;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = cellar
        .post_json("/sessions/nope/refer", &json!({"service": "tea"}))
        .await?;
    assert_eq!(status, 404);
    let (status, answer) = cellar
        .post_json(
            &format!("/sessions/{sid}/refer"),
            &json!({"service": "tea"}),
        )
        .await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["referred"], true);
    // The client follows through the relay and reports back (NOTIFY, message/sipfrag).
    let second = alice.next_named("session", 10).await?;
    assert_eq!(second["service"], "tea");
    assert_eq!(second["transferred_from"], 1);
    cellar
        .out
        .wait_for("the client followed the referral: SIP/2.0 200 OK", 5)
        .await?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 1);
    assert_eq!(closed["reason"], "transferred");
    alice.say("close")?;
    alice.next_named("closed", 10).await?;
    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    let wine = by_service(&cdrs, "wine");
    let tea = by_service(&cdrs, "tea");
    assert_eq!(wine["reason"], "transferred");
    assert_eq!(tea["transferred_from"], wine["id"]);
    Ok(())
}

mod auto_redial {
    use super::*;

    on_both_stores!(
        a_caller_waits_for_a_user_and_is_called_through_when_it_registers,
        a_client_waits_for_a_service_to_come_online,
        a_watch_ends_when_its_period_runs_out,
        a_watch_survives_a_relay_restart,
    );

    async fn relay_with_bob(db: Db) -> anyhow::Result<RelayProc> {
        let relay = super::relay(db).await?;
        relay.add_user("bob")?;
        Ok(relay)
    }

    fn alice(relay: &RelayProc, args: &[&str]) -> anyhow::Result<ClientProc> {
        ClientProc::start(relay.addr, "alice", "alice-pw", args)
    }

    pub(super) async fn a_caller_waits_for_a_user_and_is_called_through_when_it_registers(
        db: Db,
    ) -> anyhow::Result<()> {
        let relay = relay_with_bob(db).await?;
        let mut alice = alice(&relay, &["call", "bob", "--wait", "30s", "--for", "1s"])?;
        let watching = alice.next_named("watching", 10).await?;
        assert_eq!(watching["target"], "bob", "{watching}");
        assert!(watching["until"].as_str().is_some(), "{watching}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // bob comes: the relay sends alice a REFER, she calls him through the relay.
        let mut bob =
            ClientProc::start(relay.addr, "bob", "bob-pw", &["register", "--for", "10s"])?;
        bob.next_named("registered", 10).await?;
        let established = alice.next_named("established", 10).await?;
        assert_eq!(established["status"], 200, "{established}");
        let ended = alice.next_named("ended", 10).await?;
        assert_eq!(ended["reason"], "local-bye", "{ended}");
        assert_eq!(alice.exit_code(10).await?, Some(0));
        let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
        let watch: Vec<&Value> = cdrs.iter().filter(|c| c["reason"] == "watching").collect();
        assert_eq!(watch.len(), 1, "{cdrs:#?}");
        assert_eq!(watch[0]["state"], "failed");
        assert!(watch[0]["charge_minor"].is_null(), "the wait is not billed");
        let call: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
        assert_eq!(call.len(), 1, "{cdrs:#?}");
        assert_eq!(call[0]["callee"], "bob");
        assert!(
            relay
                .log
                .text()
                .contains("Watched target registered: REFER")
        );
        Ok(())
    }

    pub(super) async fn a_client_waits_for_a_service_to_come_online(db: Db) -> anyhow::Result<()> {
        let relay = super::relay(db).await?;
        let mut alice = alice(
            &relay,
            &[
                "open", "wine", "--detail", "a red", "--wait", "30s", "--for", "500ms",
            ],
        )?;
        let watching = alice.next_named("watching", 10).await?;
        assert_eq!(watching["target"], "wine");
        let _cellar = cellar(&relay, &["wine"]).await?;
        let session = alice.next_named("session", 10).await?;
        assert_eq!(session["service"], "wine");
        assert_eq!(session["server"], "cellar");
        let closed = alice.next_named("closed", 10).await?;
        assert!(
            closed["charge"]["amount_minor"].as_i64().is_some(),
            "{closed}"
        );
        let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
        let session = cdrs
            .iter()
            .find(|c| c["state"] == "ended")
            .cloned()
            .unwrap_or_default();
        assert_eq!(session["details"], "a red", "{cdrs:#?}");
        // Billed from the session's start: the wait is not in it.
        assert!(
            session["duration_ms"].as_i64().unwrap_or(i64::MAX) < 2000,
            "{session:#}"
        );
        Ok(())
    }

    pub(super) async fn a_watch_ends_when_its_period_runs_out(db: Db) -> anyhow::Result<()> {
        let relay = relay_with_bob(db).await?;
        let mut alice = alice(&relay, &["call", "bob", "--wait", "2s"])?;
        alice.next_named("watching", 10).await?;
        let ended = alice.next_named("ended", 10).await?;
        assert_eq!(ended["reason"], "not-reached", "{ended}");
        assert_eq!(alice.exit_code(10).await?, Some(2));
        assert!(
            alice.out.text().contains("bob did not come before"),
            "{}",
            alice.out.text()
        );
        // Without --wait the relay says 480 at once, as before.
        let mut again = alice_plain(&relay)?;
        let ended = again.next_named("ended", 10).await?;
        assert_eq!(ended["status"], 480, "{ended}");
        Ok(())
    }

    fn alice_plain(relay: &RelayProc) -> anyhow::Result<ClientProc> {
        alice(relay, &["call", "bob"])
    }

    pub(super) async fn a_watch_survives_a_relay_restart(db: Db) -> anyhow::Result<()> {
        let mut relay = relay_with_bob(db).await?;
        let mut alice = alice(&relay, &["call", "bob", "--wait", "60s", "--for", "500ms"])?;
        alice.next_named("watching", 10).await?;
        relay.kill9();
        relay.restart().await?;
        let mut bob =
            ClientProc::start(relay.addr, "bob", "bob-pw", &["register", "--for", "10s"])?;
        bob.next_named("registered", 10).await?;
        let established = alice.next_named("established", 10).await?;
        assert_eq!(established["status"], 200);
        alice.next_named("ended", 10).await?;
        Ok(())
    }
}
