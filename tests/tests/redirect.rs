//! Redirects to additional servers (SPEC feature 11, seed file 003), end to end: two relays on
//! one PostgreSQL database (accounts, services, rules and records shared), the application
//! server's agent registered once, and client-agent following the relay's 302 on its own,
//! authenticating again at the additional relay. Each session stays with the relay that
//! carries it (its record's owner).

use serde_json::Value;
use std::time::Duration;
use tests::harness::Db;
use tests::procs::{AppAgent, ClientProc, RelayProc};

/// Relay "b" on a fresh database, and relay "a" on the same one, knowing b as an additional
/// server; b knows a (`a` rules therefore apply on b: used to show no request is redirected
/// twice). alice, the service wine delivered by cellar, whose agent registers through a.
async fn cluster() -> anyhow::Result<Option<(RelayProc, RelayProc, AppAgent)>> {
    if tests::pg::PgCluster::shared_or_skip().is_none() {
        return Ok(None);
    }
    let mut b = RelayProc::start(Db::Postgres, "").await?;
    let a = RelayProc::start_on(&b.db_url, &format!("additional = [\"b=sip:{}\"]", b.addr)).await?;
    // b again, now also knowing a (same database, same port).
    b.add_config(&format!("additional = [\"a=sip:{}\"]", a.addr))?;
    b.restart().await?;
    a.add_user("alice")?;
    a.admin(&[
        "service",
        "add",
        "wine",
        "--per-minute",
        "120",
        "--setup-fee",
        "10",
        "--increment",
        "1",
        "--currency",
        "EUR",
    ])?;
    a.admin(&[
        "appserver",
        "add",
        "cellar",
        "--password",
        "cellar-pw",
        "--service",
        "wine",
    ])?;
    let agent = AppAgent::start(
        a.addr,
        "cellar",
        &["--service", "wine", "--url", "https://cellar.test/"],
    )
    .await?;
    Ok(Some((a, b, agent)))
}

fn open(relay: &RelayProc, args: &[&str]) -> anyhow::Result<ClientProc> {
    let mut argv = vec!["open"];
    argv.extend_from_slice(args);
    ClientProc::start(relay.addr, "alice", "alice-pw", &argv)
}

fn owner(cdr: &Value) -> String {
    cdr["owner"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_sends_new_calls_to_the_additional_relay() -> anyhow::Result<()> {
    let Some((a, b, _agent)) = cluster().await? else {
        return Ok(());
    };
    // No rule yet: a serves alice itself.
    let mut alice = open(&a, &["wine", "--for", "300ms"])?;
    alice.next_named("session", 10).await?;
    alice.next_named("closed", 10).await?;
    let cdrs = a.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(owner(&cdrs[0]), a.addr.to_string());

    // Calls for wine go to b (a knows b); a rule to a would apply on b, but a redirected
    // request is never redirected again.
    let added = a.admin(&["redirect", "add", "--to", "b", "--service", "wine"])?;
    assert!(added.contains("added redirect 1"), "{added}");
    a.admin(&["redirect", "add", "--to", "a", "--service", "wine"])?;
    let list = a.admin(&["redirect", "list"])?;
    assert!(list.contains(&format!("b (sip:{})", b.addr)), "{list}");
    assert!(list.contains("a (not known here)"), "{list}");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut alice = open(&a, &["wine", "--detail", "a red", "--for", "500ms"])?;
    let session = alice.next_named("session", 10).await?;
    assert_eq!(session["server"], "cellar");
    let closed = alice.next_named("closed", 10).await?;
    assert!(
        closed["charge"]["amount_minor"].as_i64().is_some(),
        "{closed}"
    );
    assert_eq!(alice.exit_code(10).await?, Some(0));
    assert!(
        alice.out.text().contains(&format!(
            "redirected (302) to sip:wine@{};redirected",
            b.addr
        )),
        "{}",
        alice.out.text()
    );
    let cdrs = a.wait_cdrs("alice", 3, 10).await?;
    let redirected: Vec<&Value> = cdrs
        .iter()
        .filter(|c| c["reason"] == "redirected")
        .collect();
    assert_eq!(redirected.len(), 1, "{cdrs:#?}");
    assert_eq!(redirected[0]["status"], 302);
    assert_eq!(owner(redirected[0]), a.addr.to_string());
    let served: Vec<&Value> = cdrs
        .iter()
        .filter(|c| c["state"] == "ended" && owner(c) == b.addr.to_string())
        .collect();
    assert_eq!(served.len(), 1, "the session stays with b: {cdrs:#?}");
    assert_eq!(served[0]["service"], "wine");
    assert_eq!(served[0]["details"], "a red");
    assert!(b.log.text().contains("Session started"), "{}", b.log.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_hold_only_under_their_conditions() -> anyhow::Result<()> {
    let Some((a, b, _agent)) = cluster().await? else {
        return Ok(());
    };
    // Only callers from another domain, or beyond one session on the relay.
    a.admin(&[
        "redirect",
        "add",
        "--to",
        "b",
        "--caller-domain",
        "partner.test",
    ])?;
    a.admin(&["redirect", "add", "--to", "b", "--when-sessions-above", "0"])?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut first = open(&a, &["wine"])?;
    first.next_named("session", 10).await?;
    assert!(
        !first.out.text().contains("redirected"),
        "{}",
        first.out.text()
    );
    // a carries one session now: the next goes to b.
    let mut second = open(&a, &["wine", "--for", "300ms"])?;
    second.next_named("session", 10).await?;
    second.next_named("closed", 10).await?;
    assert!(
        second.out.text().contains("redirected (302)"),
        "{}",
        second.out.text()
    );
    first.say("close")?;
    first.next_named("closed", 10).await?;
    let cdrs = a.wait_cdrs("alice", 3, 10).await?;
    let ended: Vec<String> = cdrs
        .iter()
        .filter(|c| c["state"] == "ended")
        .map(owner)
        .collect();
    assert!(
        ended.contains(&a.addr.to_string()) && ended.contains(&b.addr.to_string()),
        "{cdrs:#?}"
    );
    // Usual mistakes at the command line.
    let err = a
        .admin(&["redirect", "remove", "9"])
        .expect_err("no redirect 9");
    assert!(err.to_string().contains("no such redirect 9"), "{err}");
    a.admin(&["redirect", "remove", "2"])?;
    let list = a.admin(&["redirect", "list"])?;
    assert!(
        list.contains("partner.test") && !list.contains("> 0"),
        "{list}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_sessions_in_progress_to_the_additional_relay() -> anyhow::Result<()> {
    let Some((a, b, agent)) = cluster().await? else {
        return Ok(());
    };
    a.add_user("bob")?;
    let mut bob = ClientProc::start(a.addr, "bob", "bob-pw", &["register", "--for", "30s"])?;
    bob.next_named("registered", 10).await?;
    let mut alice = open(&a, &["wine", "--detail", "a red"])?;
    let first = alice.next_named("session", 10).await?;
    // A third relay that knows b too carries out the order as well: it carries no session, and
    // bob registered with a, so it asks nobody.
    let c = RelayProc::start_on(&b.db_url, &format!("additional = [\"b=sip:{}\"]", b.addr)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let report = a.admin(&["drain", "--to", "b", "--service", "wine"])?;
    // alice's session, and bob, who is only registered: his client-agent registers at b.
    assert!(report.contains("moved: 2"), "{report}");
    assert!(
        report.contains(&format!("relay {}: moved 0", c.addr)),
        "{report}"
    );
    assert!(report.contains("will be redirected: 0 "), "{report}");
    bob.next_named("registered", 10).await?;
    assert!(
        bob.out
            .text()
            .contains(&format!("moves this registration to {}", b.addr)),
        "{}",
        bob.out.text()
    );
    assert!(report.contains("failed: 0"), "{report}");
    assert!(report.contains("will be redirected:"), "{report}");
    // alice followed the REFER to b; a ended her first session once she said so.
    let second = alice.next_named("session", 10).await?;
    assert_eq!(second["transferred_from"], 1, "{second}");
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 1);
    assert_eq!(closed["reason"], "drained");
    agent
        .out
        .wait_for("the client followed the referral: SIP/2.0 200 OK", 5)
        .await?;
    // New calls go to b now.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut again = open(&a, &["wine", "--for", "300ms"])?;
    again.next_named("session", 10).await?;
    again.next_named("closed", 10).await?;
    assert!(
        again.out.text().contains("redirected (302)"),
        "{}",
        again.out.text()
    );
    alice.say("close")?;
    alice.next_named("closed", 10).await?;

    let cdrs = a.wait_cdrs("alice", 4, 10).await?;
    let sid = first["session_id"].as_str().unwrap_or_default();
    let drained = cdrs
        .iter()
        .find(|c| c["id"] == sid)
        .cloned()
        .unwrap_or_default();
    assert_eq!(drained["reason"], "drained", "{cdrs:#?}");
    assert_eq!(owner(&drained), a.addr.to_string());
    let moved: Vec<&Value> = cdrs
        .iter()
        .filter(|c| c["transferred_from"] == sid)
        .collect();
    assert_eq!(moved.len(), 1, "{cdrs:#?}");
    assert_eq!(owner(moved[0]), b.addr.to_string());
    assert_eq!(moved[0]["state"], "ended");

    assert!(
        b.log.text().contains("Registered user=bob"),
        "{}",
        b.log.text()
    );
    // Nothing left to move (bob's binding through b is still in the shared store, and b is
    // not a relay a knows to be itself: he is asked again and stays), and an unknown server.
    let report = a.admin(&["drain", "--to", "b", "--service", "wine"])?;
    assert!(report.contains("failed: 0"), "{report}");
    let err = a
        .admin(&["drain", "--to", "b", "--appserver", "nobody"])
        .expect_err("unknown");
    assert!(
        err.to_string().contains("no such application server"),
        "{err}"
    );
    Ok(())
}

/// A watch kept by relay a fires when its target registers at relay b of the same database:
/// b's REGISTER is announced to the other relays (PostgreSQL NOTIFY), a sends alice the REFER,
/// and she reaches bob, whose binding a finds in the shared store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_fires_when_its_target_registers_at_another_relay() -> anyhow::Result<()> {
    let Some((a, b, _agent)) = cluster().await? else {
        return Ok(());
    };
    a.add_user("bob")?;
    let mut alice = ClientProc::start(
        a.addr,
        "alice",
        "alice-pw",
        &["call", "bob", "--wait", "30s", "--for", "1s"],
    )?;
    let watching = alice.next_named("watching", 10).await?;
    assert_eq!(watching["target"], "bob", "{watching}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut bob = ClientProc::start(b.addr, "bob", "bob-pw", &["register", "--for", "10s"])?;
    bob.next_named("registered", 10).await?;
    let established = alice.next_named("established", 10).await?;
    assert_eq!(established["status"], 200, "{established}");
    alice.next_named("ended", 10).await?;
    assert_eq!(alice.exit_code(10).await?, Some(0));
    assert!(
        a.log.text().contains("Watched target registered: REFER"),
        "relay a, which keeps the watch, sends the REFER"
    );
    let cdrs = a.wait_cdrs("alice", 2, 10).await?;
    let call: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
    assert_eq!(call.len(), 1, "{cdrs:#?}");
    assert_eq!(call[0]["callee"], "bob");
    assert_eq!(owner(call[0]), a.addr.to_string(), "a carries the call");
    Ok(())
}

/// alice's wine session was redirected to b; her transfer to tea is served by a (no rule for
/// tea): a completes the transfer and asks the other relays to end the first session, which b
/// carries and ends (`transferred`, the relay's BYE to both sides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_ends_the_first_session_at_the_relay_that_carries_it() -> anyhow::Result<()> {
    let Some((a, b, cellar)) = cluster().await? else {
        return Ok(());
    };
    a.admin(&["service", "add", "tea", "--per-minute", "60"])?;
    a.admin(&[
        "appserver",
        "add",
        "teahouse",
        "--password",
        "teahouse-pw",
        "--service",
        "tea",
    ])?;
    let _tea = AppAgent::start(
        a.addr,
        "teahouse",
        &["--service", "tea", "--url", "https://tea.test/"],
    )
    .await?;
    a.admin(&["redirect", "add", "--to", "b", "--service", "wine"])?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut alice = open(&a, &["wine", "--transfer-after", "1s=tea", "--for", "3s"])?;
    let first = alice.next_named("session", 10).await?;
    assert_eq!(first["service"], "wine");
    let second = alice.next_named("session", 10).await?;
    assert_eq!(second["service"], "tea", "{second}");
    assert_eq!(second["transferred_from"], 1);
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
    let cdrs = a.wait_cdrs("alice", 3, 10).await?;
    let wine: Vec<&Value> = cdrs
        .iter()
        .filter(|c| c["service"] == "wine" && c["state"] == "ended")
        .collect();
    let tea: Vec<&Value> = cdrs.iter().filter(|c| c["service"] == "tea").collect();
    assert_eq!((wine.len(), tea.len()), (1, 1), "{cdrs:#?}");
    assert_eq!(
        owner(wine[0]),
        b.addr.to_string(),
        "b carried the wine session"
    );
    assert_eq!(
        owner(tea[0]),
        a.addr.to_string(),
        "a carries the tea session"
    );
    assert_eq!(wine[0]["reason"], "transferred");
    assert_eq!(tea[0]["transferred_from"], wine[0]["id"]);
    Ok(())
}
