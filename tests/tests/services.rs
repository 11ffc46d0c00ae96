//! Service sessions end to end with the three real programs as processes, on SQLite and on
//! PostgreSQL: `relay serve` and its admin commands, `app-server-agent run` beside a (test)
//! web service, `client-agent open`. What is checked is what users see: the client's events,
//! the web service's view through the agent's HTTP API, the operator's records and statements.

use serde_json::Value;
use std::time::{Duration, Instant};
use tests::harness::Db;
use tests::procs::{AppAgent, ClientProc, RelayProc};

use tests::on_both_stores;

on_both_stores!(
    session_is_opened_timed_billed_and_closed,
    the_server_hangs_up,
    sessions_over_tcp,
    refusals_reach_the_client_as_given,
    agents_accept_only_what_the_relay_vouched_for,
    an_agent_whose_password_changed_says_so,
    servers_register_only_their_services,
    fork_first_takes_the_first_answer,
    fork_first_never_bills_a_second_answer,
    fork_sequential_fails_over,
    fork_all_makes_one_session_per_server,
    rules_pick_service_and_servers,
    a_vanished_client_is_detected_and_billed_to_its_last_sign_of_life,
    a_vanished_server_is_detected,
    the_agent_ends_sessions_whose_client_is_gone,
    max_duration_ends_the_session,
    sessions_survive_a_relay_kill,
    a_softphone_gets_an_sdp_answer,
    a_charge_the_client_was_told_survives_a_relay_kill,
    a_node_id_belongs_to_one_live_relay,
    a_callee_that_is_stopped_hangs_up_first,
    a_planned_stop_drains_then_ends_the_sessions,
    a_second_signal_stops_at_once,
    operators_see_registrations_and_live_sessions,
);

const URL_A: &str = "https://shop-a.test/wine";
const URL_B: &str = "https://shop-b.test/wine";

/// A relay with user alice and the service wine (1.20 EUR a minute, 0.10 EUR set-up, 1 s
/// increments), delivered by vendor-a and vendor-b.
async fn relay(db: Db, extra: &str, fork: &str) -> anyhow::Result<RelayProc> {
    let relay = RelayProc::start(db, extra).await?;
    relay.add_user("alice")?;
    relay.admin(&[
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
        "--fork",
        fork,
    ])?;
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
    }
    Ok(relay)
}

/// vendor-a's agent serving wine at URL_A, registered.
async fn vendor_a(relay: &RelayProc) -> anyhow::Result<AppAgent> {
    AppAgent::start(
        relay.addr,
        "vendor-a",
        &["--service", "wine", "--url", URL_A],
    )
    .await
}

fn open(relay: &RelayProc, args: &[&str]) -> anyhow::Result<ClientProc> {
    let mut argv = vec!["open"];
    argv.extend_from_slice(args);
    ClientProc::start(relay.addr, "alice", "alice-pw", &argv)
}

/// The token the agent put in the URL.
fn token_of(url: &str) -> String {
    url.split(['?', '&'])
        .find_map(|p| p.strip_prefix("token="))
        .unwrap_or_default()
        .to_string()
}

fn one_record<'a>(cdrs: &'a [Value], state: &str) -> &'a Value {
    let matching: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == state).collect();
    assert_eq!(matching.len(), 1, "one {state} record expected: {cdrs:#?}");
    matching[0]
}

/// The charge of `duration_ms` at 120 a minute plus 10, 1 s increments.
fn wine_charge(duration_ms: i64) -> i64 {
    let billed = (duration_ms + 999) / 1000;
    10 + (120 * billed + 59) / 60
}

async fn session_is_opened_timed_billed_and_closed(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    let agent = vendor_a(&relay).await?;
    let started = Instant::now();
    let mut alice = open(&relay, &["wine", "--detail", "red, 2015", "--for", "2s"])?;

    let session = alice.next_named("session", 10).await?;
    assert_eq!(session["service"], "wine");
    assert_eq!(session["server"], "vendor-a");
    let url = session["url"].as_str().unwrap_or_default().to_string();
    assert!(url.starts_with(&format!("{URL_A}?token=")), "{url}");
    let sid = session["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // The web service checks its visitor: a live session of alice for wine.
    let (status, info) = agent
        .post("/introspect", &format!("token={}", token_of(&url)))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["sub"], "alice");
    assert_eq!(info["sid"], sid.as_str());
    assert_eq!(info["service"], "wine");
    assert_eq!(info["detail"], "red, 2015");
    assert!(info["exp"].as_u64().is_some_and(|e| e > 0));
    // A made-up token gets nothing but `active: false`.
    let (_, fake) = agent
        .post("/introspect", "token=AAAAAAAAAAAAAAAAAAAAAA")
        .await?;
    assert_eq!(fake, serde_json::json!({"active": false}));

    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["by"], "client");
    let duration = closed["duration_ms"].as_i64().unwrap_or(-1);
    assert!((1900..4000).contains(&duration), "{closed}");
    assert_eq!(closed["charge"]["currency"], "EUR");
    let charge = closed["charge"]["amount_minor"].as_i64().unwrap_or(-1);
    assert_eq!(charge, wine_charge(duration), "{closed}");
    assert_eq!(alice.exit_code(10).await?, Some(0));

    // After the session, the token is dead.
    let (_, after) = agent
        .post("/introspect", &format!("token={}", token_of(&url)))
        .await?;
    assert_eq!(after, serde_json::json!({"active": false}));

    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = one_record(&cdrs, "ended");
    assert_eq!(cdr["id"], sid.as_str());
    assert_eq!(cdr["service"], "wine");
    assert_eq!(cdr["server"], "vendor-a");
    assert_eq!(cdr["details"], "red, 2015");
    assert_eq!(cdr["ended_by"], "caller");
    assert_eq!(cdr["reason"], "bye");
    assert_eq!(cdr["duration_ms"], duration);
    assert_eq!(cdr["charge_minor"], charge);
    assert_eq!(cdr["currency"], "EUR");
    assert!(started.elapsed() > Duration::from_millis(duration as u64));

    // The user's statement lists it and totals it.
    let out = relay.admin(&[
        "billing",
        "statement",
        "--user",
        "alice",
        "--format",
        "json",
    ])?;
    let st: Value = serde_json::from_str(&out)?;
    assert_eq!(st["sessions"].as_array().map(Vec::len), Some(1));
    assert_eq!(st["totals"][0]["currency"], "EUR");
    assert_eq!(st["totals"][0]["amount_minor"], charge);
    let csv = relay.admin(&["billing", "statement", "--user", "alice", "--format", "csv"])?;
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("kind,id,service,server,"), "{csv}");
    assert!(
        lines[1].starts_with(&format!("session,{sid},wine,vendor-a,")),
        "{csv}"
    );
    assert!(
        lines[2].starts_with("total,") && lines[2].contains(&format!(",{charge},EUR")),
        "{csv}"
    );
    let table = relay.admin(&["billing", "statement", "--user", "alice"])?;
    assert!(
        table.contains("wine") && table.contains("Total EUR"),
        "{table}"
    );
    // Another period has nothing.
    let out = relay.admin(&[
        "billing",
        "statement",
        "--user",
        "alice",
        "--from",
        "2001-01-01",
        "--to",
        "2001-12-31",
        "--format",
        "json",
    ])?;
    let st: Value = serde_json::from_str(&out)?;
    assert_eq!(st["sessions"].as_array().map(Vec::len), Some(0));
    Ok(())
}

async fn the_server_hangs_up(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    let agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "30s"])?;
    let session = alice.next_named("session", 10).await?;
    let sid = session["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = agent.post("/close", &format!("sid={sid}")).await?;
    assert_eq!(status, 200, "{body}");
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["by"], "server");
    let charge = closed["charge"]["amount_minor"].as_i64().unwrap_or(-1);
    assert!(charge >= wine_charge(1200), "{closed}");
    assert_eq!(alice.exit_code(10).await?, Some(0));
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = one_record(&cdrs, "ended");
    assert_eq!(cdr["ended_by"], "callee");
    assert_eq!(cdr["reason"], "bye");
    assert_eq!(cdr["charge_minor"], charge);
    Ok(())
}

async fn sessions_over_tcp(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    // The server over TCP, the client over TCP, then a client over UDP to the same server.
    let _a = AppAgent::start(
        relay.addr,
        "vendor-a",
        &["--service", "wine", "--url", URL_A, "--transport", "tcp"],
    )
    .await?;
    for transport in ["tcp", "udp"] {
        let mut alice = open(&relay, &["wine", "--for", "1s", "--transport", transport])?;
        let session = alice.next_named("session", 10).await?;
        assert_eq!(session["server"], "vendor-a", "{transport}");
        let closed = alice.next_named("closed", 10).await?;
        assert!(
            closed["charge"]["amount_minor"].as_i64().is_some(),
            "{closed}"
        );
        assert_eq!(alice.exit_code(10).await?, Some(0));
    }
    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    assert_eq!(cdrs.iter().filter(|c| c["state"] == "ended").count(), 2);
    Ok(())
}

/// A stand-in for a vendor's web service that answers the agent's decision webhook.
async fn webhook(answer: &'static str, delay: Duration) -> anyhow::Result<String> {
    Ok(webhook_recording(answer, delay).await?.0)
}

/// The questions a webhook was asked (JSON bodies), in order.
type Asked = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

/// [`webhook`], keeping what it was asked.
async fn webhook_recording(
    answer: &'static str,
    delay: Duration,
) -> anyhow::Result<(String, Asked)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let asked = Asked::default();
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                // Read the head and the body (Content-Length).
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            if let Ok(v) = serde_json::from_str(body) {
                                log.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                            }
                            break;
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((format!("http://{addr}/decide"), asked))
}

async fn refusals_reach_the_client_as_given(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    relay.admin(&["service", "add", "beer"])?;
    relay.admin(&[
        "appserver",
        "add",
        "brewer",
        "--password",
        "brewer-pw",
        "--service",
        "beer",
    ])?;

    // No such service (and no such user): 404.
    let mut c = open(&relay, &["cheese"])?;
    let failed = c.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 404);
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no such service"),
        "{failed}"
    );
    assert_ne!(c.exit_code(10).await?, Some(0));

    // A service nobody serves right now: 480.
    let mut c = open(&relay, &["wine"])?;
    let failed = c.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 480, "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nobody is serving"),
        "{failed}"
    );

    // A wrong password: refused, in words.
    let mut c = ClientProc::start(relay.addr, "alice", "wrong", &["open", "wine"])?;
    let failed = c.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 407, "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("wrong user name or password")
    );

    // Capacity reached: 486 with the agent's Retry-After, as the agent gave it.
    let _a = AppAgent::start(
        relay.addr,
        "vendor-a",
        &[
            "--service",
            "wine",
            "--url",
            URL_A,
            "--capacity",
            "1",
            "--retry-after",
            "42",
        ],
    )
    .await?;
    let mut first = open(&relay, &["wine", "--for", "20s"])?;
    first.next_named("session", 10).await?;
    let mut second = open(&relay, &["wine"])?;
    let failed = second.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 486, "{failed}");
    assert_eq!(failed["retry_after"], 42, "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("42"),
        "{failed}"
    );
    first.say("close")?;
    first.next_named("closed", 10).await?;

    // The vendor's web service says no: 403 with its reason.
    let (hook, asked) = webhook_recording(
        r#"{"accept": false, "reason": "Closed on Sundays"}"#,
        Duration::ZERO,
    )
    .await?;
    let _b = AppAgent::start(
        relay.addr,
        "brewer",
        &[
            "--service",
            "beer",
            "--url",
            "https://brew.test/",
            "--decision-webhook",
            &hook,
        ],
    )
    .await?;
    let mut c = open(&relay, &["beer"])?;
    let failed = c.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 403, "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Closed on Sundays"),
        "{failed}"
    );

    // The web service cannot be reached: 503 with the agent's Retry-After.
    relay.admin(&["service", "add", "cider"])?;
    relay.admin(&[
        "appserver",
        "add",
        "presser",
        "--password",
        "presser-pw",
        "--service",
        "cider",
    ])?;
    let closed_port = tests::procs::free_port()?;
    let _c = AppAgent::start(
        relay.addr,
        "presser",
        &[
            "--service",
            "cider",
            "--url",
            "https://cider.test/",
            "--retry-after",
            "9",
            "--decision-webhook",
            &format!("http://{closed_port}/decide"),
        ],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1100)).await; // the relay's catalog cache
    let mut c = open(&relay, &["cider"])?;
    let failed = c.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 503, "{failed}");
    assert_eq!(failed["retry_after"], 9, "{failed}");

    // Every authenticated attempt left a record: five failed with their status, one session.
    let cdrs = relay.wait_cdrs("alice", 6, 10).await?;
    let statuses: Vec<i64> = cdrs
        .iter()
        .filter(|c| c["state"] == "failed")
        .filter_map(|c| c["status"].as_i64())
        .collect();
    for s in [404, 480, 486, 403, 503] {
        assert!(statuses.contains(&s), "no {s} record in {statuses:?}");
    }
    // The refused session's record has the id the web service was asked about, and names the
    // server that refused it.
    let question = asked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the webhook was not asked"))?;
    let refused = cdrs
        .iter()
        .find(|c| c["id"] == question["session_id"])
        .ok_or_else(|| {
            anyhow::anyhow!("no record with id {}: {cdrs:#?}", question["session_id"])
        })?;
    assert_eq!(
        (&refused["state"], &refused["status"], &refused["server"]),
        (&"failed".into(), &403.into(), &"brewer".into()),
        "{refused}"
    );
    assert_eq!(cdrs.len(), 6, "one record per attempt: {cdrs:#?}");
    Ok(())
}

/// A raw UDP exchange with the agent: what an INVITE sent straight to it gets.
async fn direct_invite(agent: std::net::SocketAddr, extra: &str) -> anyhow::Result<u16> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let me = sock.local_addr()?;
    let msg = format!(
        "INVITE sip:wine@{agent} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-direct{}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:mallory@relay.test>;tag=m1\r\nTo: <sip:wine@relay.test>\r\n\
         Call-ID: direct-{}@test\r\nCSeq: 1 INVITE\r\nContact: <sip:mallory@{me}>\r\n{extra}\
         Content-Length: 0\r\n\r\n",
        rand_suffix(),
        rand_suffix()
    );
    sock.send_to(msg.as_bytes(), agent).await?;
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (n, _) = tokio::time::timeout(left, sock.recv_from(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf[..n]);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status >= 200 {
            return Ok(status);
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn agents_accept_only_what_the_relay_vouched_for(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    let agent = vendor_a(&relay).await?;
    let sip = agent
        .sip
        .ok_or_else(|| anyhow::anyhow!("agent did not say its SIP address"))?;
    // Straight to the agent, without the relay: 403.
    assert_eq!(direct_invite(sip, "").await?, 403);
    // With a forged assertion: 403.
    let forged = proto::service::Assertion {
        user: "mallory".into(),
        sid: "forged".into(),
        service: "wine".into(),
        server: "vendor-a".into(),
        call_id: "whatever".into(),
        detail: None,
        exp: u64::MAX,
    }
    .sign(&proto::service::assertion_key("not the key"));
    assert_eq!(
        direct_invite(sip, &format!("Relay-Assertion: {forged}\r\n")).await?,
        403
    );
    // A client cannot smuggle its own assertion through the relay either: the relay removes
    // it and signs its own, so the session works and is alice's.
    let mut alice = open(&relay, &["wine", "--for", "1s"])?;
    let session = alice.next_named("session", 10).await?;
    let url = session["url"].as_str().unwrap_or_default().to_string();
    let (_, info) = agent
        .post("/introspect", &format!("token={}", token_of(&url)))
        .await?;
    assert_eq!(info["sub"], "alice");
    alice.next_named("closed", 10).await?;
    // No session was created by the direct attempts.
    let refused = agent.out.text();
    assert!(refused.matches("refused: 403").count() >= 2, "{refused}");
    Ok(())
}

/// The operator changes an application server's password at the relay but not at its agent:
/// every session is refused from then on, and the agent says so in its log and on `/health`
/// instead of looking healthy.
async fn an_agent_whose_password_changed_says_so(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    let agent = vendor_a(&relay).await?;
    let (status, health) = agent.get("/health").await?;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    relay.admin(&[
        "appserver",
        "passwd",
        "vendor-a",
        "--password",
        "changed-pw",
    ])?;
    // Admin changes take effect within the relay's account cache time (1 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut alice = open(&relay, &["wine", "--for", "1s"])?;
    let refused = alice.next(15).await?;
    assert_eq!(refused["status"], 403, "the client is refused: {refused}");
    let line = agent.out.wait_for("no longer vouches", 10).await?;
    assert!(
        line.contains("vendor-a") && line.contains("appserver passwd"),
        "{line}"
    );
    let (status, health) = agent.get("/health").await?;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "not-vouched");
    assert!(
        health["problem"]
            .as_str()
            .is_some_and(|p| p.contains("no longer vouches")),
        "{health}"
    );
    Ok(())
}

async fn servers_register_only_their_services(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    relay.admin(&["service", "add", "beer"])?;
    // vendor-a may deliver wine, not beer: the agent says so and stops.
    let mut agent = AppAgent::spawn(
        relay.addr,
        "vendor-a",
        &["--service", "wine", "--service", "beer", "--url", URL_A],
    )?;
    let code = agent.exit_code(15).await?;
    assert_ne!(code, Some(0));
    let err = agent.err.text();
    assert!(err.contains("beer") && err.contains("403"), "{err}");
    // A wrong password is named too.
    let mut agent = AppAgent::spawn(relay.addr, "nobody", &["--service", "wine", "--url", URL_A])?;
    assert_ne!(agent.exit_code(15).await?, Some(0));
    assert!(agent.err.text().contains("401"), "{}", agent.err.text());
    // Services and accounts share sip:NAME@DOMAIN: no service may be named like an account.
    let err = match relay.admin(&["service", "add", "alice"]) {
        Ok(out) => anyhow::bail!("a service named like a user was added: {out}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("already used"), "{err}");
    // The operator lists what exists.
    let list = relay.admin(&["appserver", "list"])?;
    assert!(list.contains("vendor-a") && list.contains("wine"), "{list}");
    Ok(())
}

async fn fork_first_takes_the_first_answer(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    // vendor-b's web service takes 3 s to decide: vendor-a answers first.
    let slow = webhook(r#"{"accept": true}"#, Duration::from_secs(3)).await?;
    let _a = vendor_a(&relay).await?;
    let b = AppAgent::start(
        relay.addr,
        "vendor-b",
        &[
            "--service",
            "wine",
            "--url",
            URL_B,
            "--decision-webhook",
            &slow,
        ],
    )
    .await?;
    let mut alice = open(&relay, &["wine", "--for", "4s"])?;
    let session = alice.next_named("session", 10).await?;
    assert_eq!(session["server"], "vendor-a");
    // vendor-b was cancelled, so alice gets no second session.
    b.out.wait_for("cancelled", 10).await?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 1);
    assert_eq!(alice.exit_code(10).await?, Some(0));
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(one_record(&cdrs, "ended")["server"], "vendor-a");
    Ok(())
}

async fn fork_first_never_bills_a_second_answer(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    // Both servers accept at once: whichever 200 comes second crosses the relay's CANCEL.
    let a = vendor_a(&relay).await?;
    let b = AppAgent::start(
        relay.addr,
        "vendor-b",
        &["--service", "wine", "--url", URL_B],
    )
    .await?;
    for round in 0..5 {
        let mut alice = open(&relay, &["wine", "--for", "30s"])?;
        let first = alice.next_named("session", 10).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        alice.say("list")?;
        let list = alice.next_named("sessions", 10).await?;
        assert_eq!(
            list["sessions"].as_array().map(Vec::len),
            Some(1),
            "round {round}: {list}"
        );
        alice.say("close")?;
        let closed = alice.next_named("closed", 10).await?;
        assert_eq!(closed["session_id"], first["session_id"]);
        assert_eq!(alice.exit_code(10).await?, Some(0));
    }
    // One record per opened session, and no server keeps a session it was not given.
    let cdrs = relay.wait_cdrs("alice", 5, 10).await?;
    assert_eq!(
        cdrs.iter().filter(|c| c["state"] == "ended").count(),
        5,
        "{cdrs:#?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every round, the losing server was either cancelled in time or, its 200 having crossed
    // the CANCEL, released by the relay (ACK + BYE).
    let released = relay.log.text().matches("Late 2xx released").count();
    let cancelled =
        a.out.text().matches("cancelled").count() + b.out.text().matches("cancelled").count();
    assert_eq!(
        released + cancelled,
        5,
        "released {released}, cancelled {cancelled}"
    );
    for agent in [&a, &b] {
        let (_, health) = agent.get("/health").await?;
        assert_eq!(health["live_sessions"], 0, "{health}");
    }
    Ok(())
}

async fn fork_sequential_fails_over(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "sequential_timeout_ms = 1500", "sequential").await?;
    relay.admin(&[
        "appserver",
        "add",
        "vendor-c",
        "--password",
        "vendor-c-pw",
        "--service",
        "wine",
    ])?;
    let no = webhook(r#"{"accept": false, "reason": "Sold out"}"#, Duration::ZERO).await?;
    let hang = webhook(r#"{"accept": true}"#, Duration::from_secs(20)).await?;
    let _a = AppAgent::start(
        relay.addr,
        "vendor-a",
        &[
            "--service",
            "wine",
            "--url",
            URL_A,
            "--decision-webhook",
            &no,
        ],
    )
    .await?;
    let b = AppAgent::start(
        relay.addr,
        "vendor-b",
        &[
            "--service",
            "wine",
            "--url",
            URL_B,
            "--decision-webhook",
            &hang,
        ],
    )
    .await?;
    let _c = AppAgent::start(
        relay.addr,
        "vendor-c",
        &["--service", "wine", "--url", "https://c.test/"],
    )
    .await?;
    // The order: the preferred a refuses, the preferred b rings too long and is cancelled,
    // then the others: c accepts.
    relay.admin(&[
        "rule",
        "add",
        "--when",
        "ruri.user=wine",
        "--service",
        "wine",
        "--prefer",
        "vendor-a,vendor-b",
    ])?;
    let rules = relay.admin(&["rule", "list"])?;
    assert!(rules.contains("first vendor-a,vendor-b"), "{rules}");
    tokio::time::sleep(Duration::from_millis(1100)).await; // the relay's catalog cache
    let started = Instant::now();
    let mut alice = open(&relay, &["wine", "--for", "1s"])?;
    let session = alice.next_named("session", 15).await?;
    assert_eq!(session["server"], "vendor-c", "{session}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "b was not given its ring time"
    );
    b.out.wait_for("cancelled", 5).await?;
    alice.next_named("closed", 10).await?;
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(one_record(&cdrs, "ended")["server"], "vendor-c");

    // When every server fails, the client gets the last real refusal as it was given.
    relay.admin(&[
        "rule",
        "add",
        "--priority",
        "1",
        "--when",
        "ruri.user=wine",
        "--service",
        "wine",
        "--servers",
        "vendor-a",
    ])?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut alice = open(&relay, &["wine"])?;
    let failed = alice.next_named("failed", 10).await?;
    assert_eq!(failed["status"], 403);
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Sold out"),
        "{failed}"
    );
    Ok(())
}

async fn fork_all_makes_one_session_per_server(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "sequential_timeout_ms = 20000", "all").await?;
    relay.admin(&[
        "appserver",
        "add",
        "vendor-c",
        "--password",
        "vendor-c-pw",
        "--service",
        "wine",
    ])?;
    let _a = vendor_a(&relay).await?;
    let _b = AppAgent::start(
        relay.addr,
        "vendor-b",
        &["--service", "wine", "--url", URL_B],
    )
    .await?;
    // vendor-c's web service takes its time: still deciding when alice is done.
    let slow = webhook(r#"{"accept": true}"#, Duration::from_secs(15)).await?;
    let c = AppAgent::start(
        relay.addr,
        "vendor-c",
        &[
            "--service",
            "wine",
            "--url",
            "https://c.test/",
            "--decision-webhook",
            &slow,
        ],
    )
    .await?;
    let mut alice = open(&relay, &["wine", "--for", "30s"])?;
    let s1 = alice.next_named("session", 10).await?;
    let s2 = alice.next_named("session", 10).await?;
    let mut servers = vec![s1["server"].clone(), s2["server"].clone()];
    servers.sort_by_key(|v| v.to_string());
    assert_eq!(
        servers,
        vec![Value::from("vendor-a"), Value::from("vendor-b")]
    );
    assert_ne!(s1["session_id"], s2["session_id"]);
    // Keep one, close the other.
    let keep = s2["server"].clone();
    alice.say("close 1")?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 1);
    alice.say("list")?;
    let list = alice.next_named("sessions", 10).await?;
    let live: Vec<&Value> = list["sessions"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["closing"] != true).collect())
        .unwrap_or_default();
    assert_eq!(live.len(), 1, "{list}");
    assert_eq!(live[0]["server"], keep);
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["index"], 2);
    assert_eq!(alice.exit_code(10).await?, Some(0));
    // The server still deciding was cancelled when alice was done.
    c.out.wait_for("cancelled", 5).await?;
    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    let ended: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
    assert_eq!(ended.len(), 2, "{cdrs:#?}");
    assert!(
        ended
            .iter()
            .all(|c| c["charge_minor"].as_i64().is_some_and(|v| v >= 10))
    );
    Ok(())
}

async fn rules_pick_service_and_servers(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    let _a = vendor_a(&relay).await?;
    let _b = AppAgent::start(
        relay.addr,
        "vendor-b",
        &["--service", "wine", "--url", URL_B],
    )
    .await?;
    // Added while the relay runs: French requests for "vino" go to wine at vendor-b only.
    relay.admin(&[
        "rule",
        "add",
        "--when",
        "ruri.user=vino",
        "--when",
        "body.lang=fr",
        "--service",
        "wine",
        "--servers",
        "vendor-b",
    ])?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dir = tempfile::tempdir()?;
    let body = dir.path().join("request.json");
    std::fs::write(&body, r#"{"detail": "un rouge", "lang": "fr"}"#)?;
    let body = body.display().to_string();
    for _ in 0..3 {
        let mut alice = open(&relay, &["vino", "--body-file", &body, "--for", "200ms"])?;
        let s = alice.next_named("session", 10).await?;
        assert_eq!(s["server"], "vendor-b");
        assert_eq!(s["service"], "wine");
        alice.next_named("closed", 10).await?;
    }
    // Without the field the rule does not hold, and there is no service "vino": 404.
    let mut alice = open(&relay, &["vino", "--detail", "un rouge"])?;
    assert_eq!(alice.next_named("failed", 10).await?["status"], 404);
    let cdrs = relay.wait_cdrs("alice", 4, 10).await?;
    let ended: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
    assert_eq!(ended.len(), 3);
    assert!(
        ended
            .iter()
            .all(|c| c["details"] == "un rouge" && c["service"] == "wine")
    );
    let rules = relay.admin(&["rule", "list"])?;
    assert!(rules.contains("body.lang=fr"), "{rules}");

    // Removed while the relay runs: the rule no longer holds (no service "vino": 404) …
    relay.admin(&["rule", "remove", "1"])?;
    // … and a server whose account is removed no longer gets sessions: only vendor-a is left.
    relay.admin(&["appserver", "remove", "vendor-b"])?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut alice = open(&relay, &["vino", "--body-file", &body])?;
    assert_eq!(alice.next_named("failed", 10).await?["status"], 404);
    for _ in 0..3 {
        let mut alice = open(&relay, &["wine", "--for", "100ms"])?;
        assert_eq!(alice.next_named("session", 10).await?["server"], "vendor-a");
        alice.next_named("closed", 10).await?;
    }
    let list = relay.admin(&["appserver", "list"])?;
    assert!(!list.contains("vendor-b"), "{list}");
    Ok(())
}

async fn a_vanished_client_is_detected_and_billed_to_its_last_sign_of_life(
    db: Db,
) -> anyhow::Result<()> {
    let relay = relay(db, "keepalive_secs = 1", "first").await?;
    let agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    let session = alice.next_named("session", 10).await?;
    let url = session["url"].as_str().unwrap_or_default().to_string();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let killed = Instant::now();
    alice.kill9();
    // The relay notices (its OPTIONS go unanswered), ends the session on the agent's side too,
    // and bills it only up to the last time alice answered.
    agent
        .out
        .wait_for("ended by the relay (reason: caller-gone)", 20)
        .await?;
    let (_, info) = agent
        .post("/introspect", &format!("token={}", token_of(&url)))
        .await?;
    assert_eq!(info["active"], false);
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = one_record(&cdrs, "ended");
    assert_eq!(cdr["reason"], "caller-gone", "{cdr:#}");
    assert_eq!(cdr["ended_by"], "relay");
    let duration = cdr["duration_ms"].as_i64().unwrap_or(-1);
    assert!(
        (1000..=3600).contains(&duration),
        "billed {duration} ms for a 2.5 s session"
    );
    assert_eq!(cdr["charge_minor"], wine_charge(duration));
    assert!(killed.elapsed() < Duration::from_secs(20));
    Ok(())
}

async fn a_vanished_server_is_detected(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "keepalive_secs = 1", "first").await?;
    let mut agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    alice.next_named("session", 10).await?;
    // At least one keepalive round (1 s) is answered before the server vanishes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.kill9();
    // The relay's BYE tells the client, with what the session cost up to the server's last
    // sign of life.
    let closed = alice.next_named("closed", 20).await?;
    assert_eq!(closed["by"], "relay", "{closed}");
    assert_eq!(closed["reason"], "callee-gone");
    assert_eq!(alice.exit_code(10).await?, Some(0));
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = one_record(&cdrs, "ended");
    assert_eq!(cdr["reason"], "callee-gone", "{cdr:#}");
    assert_eq!(cdr["ended_by"], "relay");
    let duration = cdr["duration_ms"].as_i64().unwrap_or(-1);
    assert!(
        (500..=2600).contains(&duration),
        "billed {duration} ms for a 1.5 s session"
    );
    assert_eq!(closed["charge"]["amount_minor"], cdr["charge_minor"]);
    Ok(())
}

/// With the relay's own checks off, the agent's check (an in-dialog OPTIONS through the relay)
/// finds a vanished client, so the vendor's web service stops honouring its token and the
/// capacity slot is free again.
async fn the_agent_ends_sessions_whose_client_is_gone(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "keepalive_secs = 0", "first").await?;
    let agent = AppAgent::start(
        relay.addr,
        "vendor-a",
        &[
            "--service",
            "wine",
            "--url",
            URL_A,
            "--keepalive",
            "1",
            "--capacity",
            "1",
        ],
    )
    .await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    let session = alice.next_named("session", 10).await?;
    let url = session["url"].as_str().unwrap_or_default().to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice.kill9();
    agent
        .out
        .wait_for("the relay or the client is gone", 20)
        .await?;
    let (_, info) = agent
        .post("/introspect", &format!("token={}", token_of(&url)))
        .await?;
    assert_eq!(info, serde_json::json!({"active": false}));
    // The slot is free: the next session is accepted.
    let mut again = open(&relay, &["wine", "--for", "200ms"])?;
    again.next_named("session", 10).await?;
    again.next_named("closed", 10).await?;
    Ok(())
}

async fn max_duration_ends_the_session(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    relay.admin(&["service", "update", "wine", "--max-duration", "2s"])?;
    let agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    alice.next_named("session", 10).await?;
    let closed = alice.next_named("closed", 10).await?;
    // The client, the agent and the record say the same: the relay ended it, and why.
    assert_eq!(closed["by"], "relay", "{closed}");
    assert_eq!(closed["reason"], "max-duration");
    agent
        .out
        .wait_for("ended by the relay (reason: max-duration)", 10)
        .await?;
    let cdrs = relay.wait_cdrs("alice", 1, 10).await?;
    let cdr = one_record(&cdrs, "ended");
    assert_eq!(cdr["reason"], "max-duration");
    assert_eq!(cdr["ended_by"], "relay");
    // Exactly the maximum, not a moment more.
    let duration = cdr["duration_ms"].as_i64().unwrap_or(-1);
    assert_eq!(duration, 2000);
    assert_eq!(cdr["charge_minor"], wine_charge(duration));
    assert_eq!(closed["charge"]["amount_minor"], cdr["charge_minor"]);
    assert_eq!(alice.exit_code(10).await?, Some(0));
    Ok(())
}

async fn sessions_survive_a_relay_kill(db: Db) -> anyhow::Result<()> {
    let mut relay = relay(db, "keepalive_secs = 1", "first").await?;
    let agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    let kept = alice.next_named("session", 10).await?;
    let mut bob_like = open(&relay, &["wine", "--for", "60s"])?;
    let lost = bob_like.next_named("session", 10).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    relay.kill9();
    // One client vanishes while the relay is down.
    bob_like.kill9();
    relay.restart().await?;

    // The live session is resumed: still open, marked resumed, closed normally later.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (resumed, closed_lost) = loop {
        let cdrs = relay.cdrs("alice")?;
        let find = |sid: &Value| cdrs.iter().find(|c| c["id"] == *sid).cloned();
        let a = find(&kept["session_id"]);
        let b = find(&lost["session_id"]);
        if let (Some(a), Some(b)) = (&a, &b) {
            if a["resumed_at_ms"].is_i64() && b["state"] == "ended" {
                break (a.clone(), b.clone());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "after the restart: {cdrs:#?}\nrelay log:\n{}",
                relay.log.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(resumed["state"], "established");
    assert_eq!(closed_lost["reason"], "relay-restart", "{closed_lost:#}");
    assert_eq!(closed_lost["ended_by"], "relay");
    // The lost session is billed exactly to the last sign of life the killed run stored.
    let d = closed_lost["duration_ms"].as_i64().unwrap_or(-1);
    let last_alive = closed_lost["last_alive_ms"].as_i64().unwrap_or(-1);
    let started = closed_lost["started_at_ms"].as_i64().unwrap_or(-1);
    assert_eq!(d, last_alive - started, "{closed_lost:#}");
    assert!((0..4000).contains(&d), "{d}");
    assert_eq!(
        closed_lost["charge_minor"],
        wine_charge(d),
        "{closed_lost:#}"
    );

    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    assert!(
        closed["charge"]["amount_minor"].as_i64().is_some(),
        "{closed}"
    );
    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    let a = cdrs
        .iter()
        .find(|c| c["id"] == kept["session_id"])
        .cloned()
        .unwrap_or_default();
    assert_eq!(a["state"], "ended");
    assert_eq!(a["reason"], "bye");
    // The resumed session runs on from its first start, across the restart: its duration is
    // its wall-clock span, and its charge the tariff's for that duration, as the client was told.
    let duration = a["duration_ms"].as_i64().unwrap_or(0);
    let span = a["ended_at_ms"].as_i64().unwrap_or(0) - a["started_at_ms"].as_i64().unwrap_or(0);
    assert!(duration >= 1500, "{a:#}");
    assert!(
        (duration - span).abs() <= 50,
        "duration {duration} ms, span {span} ms: {a:#}"
    );
    assert_eq!(a["charge_minor"], wine_charge(duration), "{a:#}");
    assert_eq!(closed["charge"]["amount_minor"], a["charge_minor"]);
    drop(agent);
    Ok(())
}

/// What a softphone (SDP offer, no service-request body) gets from a service: an SDP answer
/// that keeps it in the session, and the URL in Call-Info. Returns the 200 OK.
async fn softphone_session(
    relay: std::net::SocketAddr,
) -> anyhow::Result<proto::sip::message::Response> {
    use proto::sip::dialog::Dialog;
    use proto::sip::digest::{self, Challenge};
    use proto::sip::message::{Headers, Method, Request, Transport, Uri};
    use proto::sip::transaction::ClientEvent;
    use proto::transport::Target;
    use proto::ua::Endpoint;

    let (ep, _incoming) = Endpoint::bind("127.0.0.1:0".parse()?, None).await?;
    let target = Target::udp(relay);
    let me = ep.advertised;
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio 29526 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n",
        ip = me.ip()
    );
    let mut headers = Headers::default();
    headers.push("Max-Forwards", "70");
    headers.push("From", "<sip:alice@relay.test>;tag=soft1");
    headers.push("To", "<sip:wine@relay.test>");
    headers.push("Call-ID", format!("soft-{}@test", rand_suffix()));
    headers.push("CSeq", "20 INVITE");
    headers.push("Contact", format!("<sip:alice@{me}>"));
    headers.push("Content-Type", "application/sdp");
    let mut invite = Request {
        method: Method::Invite,
        uri: Uri::parse("sip:wine@relay.test")?,
        headers,
        body: sdp.into(),
    };
    let mut nc = 0;
    loop {
        let req = ep.with_via(invite.clone(), Transport::Udp);
        let mut events = ep.request(req.clone(), target);
        let mut last = None;
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await? {
            if let ClientEvent::Final(resp) = ev {
                last = Some(resp);
                break;
            }
        }
        let resp = last.ok_or_else(|| anyhow::anyhow!("no final answer"))?;
        if resp.status == 407 && nc == 0 {
            nc += 1;
            let ch = resp
                .headers
                .get_all("Proxy-Authenticate")
                .find_map(|v| Challenge::parse(v).ok())
                .ok_or_else(|| anyhow::anyhow!("no challenge"))?;
            let uri = invite.uri.to_string();
            let value = digest::answer(&ch, "alice", "alice-pw", "INVITE", &uri, nc, "c0ffee");
            invite.headers.push("Proxy-Authorization", value);
            invite.headers.set("CSeq", "21 INVITE");
            continue;
        }
        anyhow::ensure!(resp.status == 200, "softphone INVITE got {}", resp.status);
        // ACK and BYE through the relay, as a softphone does.
        let mut dialog = Dialog::uac(&req, &resp).ok_or_else(|| anyhow::anyhow!("no dialog"))?;
        let ack = ep.with_via(dialog.ack(21), Transport::Udp);
        ep.send_stateless(ack, target).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let bye = ep.with_via(dialog.request(Method::Bye), Transport::Udp);
        let mut events = ep.request(bye, target);
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await? {
            if let ClientEvent::Final(r) = ev {
                anyhow::ensure!(r.status == 200, "BYE got {}", r.status);
                break;
            }
        }
        return Ok(resp);
    }
}

async fn a_softphone_gets_an_sdp_answer(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    let _a = vendor_a(&relay).await?;
    let ok = softphone_session(relay.addr).await?;
    assert_eq!(ok.headers.get("Content-Type"), Some("application/sdp"));
    let answer = String::from_utf8_lossy(&ok.body).to_string();
    assert!(answer.starts_with("v=0"), "{answer}");
    assert!(answer.contains("m=audio "), "{answer}");
    assert!(answer.contains("a=inactive"), "{answer}");
    assert!(answer.contains("c=IN IP4 "), "{answer}");
    let info = ok.headers.get("Call-Info").unwrap_or_default().to_string();
    assert!(
        info.contains(URL_A) && info.contains("token=") && info.contains("purpose=info"),
        "{info}"
    );
    // `client-agent call`, a softphone-like client, stays up and hangs up normally.
    let mut c = ClientProc::start(
        relay.addr,
        "alice",
        "alice-pw",
        &["call", "wine", "--for", "1s"],
    )?;
    c.next_named("established", 10).await?;
    assert_eq!(c.exit_code(10).await?, Some(0));
    let cdrs = relay.wait_cdrs("alice", 2, 10).await?;
    let ended: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
    assert_eq!(ended.len(), 2, "{cdrs:#?}");
    assert!(
        ended
            .iter()
            .all(|c| c["service"] == "wine" && c["server"] == "vendor-a")
    );
    Ok(())
}

/// Whatever ends a session (the client, the server, the maximum duration), the charge the client
/// is told is already in the store: with every commit held back 2 s, the relay is killed
/// (`kill -9`) the moment the client reports its charge, and the record holds exactly that
/// charge.
async fn a_charge_the_client_was_told_survives_a_relay_kill(db: Db) -> anyhow::Result<()> {
    for how in ["client", "server", "max-duration"] {
        let mut relay = relay(db, "record_linger_ms = 2000", "first").await?;
        if how == "max-duration" {
            relay.admin(&["service", "update", "wine", "--max-duration", "2s"])?;
        }
        let agent = AppAgent::start(
            relay.addr,
            "vendor-a",
            &["--service", "wine", "--url", URL_A],
        )
        .await?;
        let stay = if how == "client" { "1500ms" } else { "60s" };
        let mut alice = open(&relay, &["wine", "--for", stay])?;
        let session = alice.next_named("session", 15).await?;
        if how == "server" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let sid = session["session_id"].as_str().unwrap_or_default();
            let (status, body) = agent.post("/close", &format!("sid={sid}")).await?;
            assert_eq!(status, 200, "{body}");
        }
        let closed = alice.next_named("closed", 20).await?;
        relay.kill9();
        let told = closed["charge"]["amount_minor"].as_i64();
        assert!(
            told.is_some(),
            "{how}: the client was told no charge: {closed}"
        );
        let cdrs = relay.cdrs("alice")?;
        let ended: Vec<&Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
        assert_eq!(
            ended.len(),
            1,
            "{how}: the told charge is not in the store: {cdrs:#?}"
        );
        assert_eq!(ended[0]["charge_minor"].as_i64(), told, "{how}");
    }
    Ok(())
}

/// Several relays on one database: a relay refuses to start while another live relay holds its
/// node id, naming it; with its own node id it starts. A relay stopped cleanly gives its node id
/// back at once, and one killed (`kill -9`) is taken over by its successor on this host at once.
async fn a_node_id_belongs_to_one_live_relay(db: Db) -> anyhow::Result<()> {
    let mut first = RelayProc::start(db, "node_id = \"relay-1\"").await?;
    let started = Instant::now();
    let err = RelayProc::start_on(&first.db_url, "node_id = \"relay-1\"")
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        (err.contains("another relay holds node id \"relay-1\" and is alive")
            || err.contains("another relay serves this SQLite database"))
            && err.contains(&first.addr.to_string()),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // With its own node id a second relay runs beside it on PostgreSQL; SQLite is for one
    // relay at a time, and the second one says so, naming the first.
    let second = RelayProc::start_on(&first.db_url, "node_id = \"relay-2\"").await;
    match db {
        Db::Postgres => assert!(second.is_ok(), "{:?}", second.err()),
        Db::Sqlite => {
            let err = format!("{:#}", second.expect_err("a second relay on SQLite"));
            assert!(
                err.contains("another relay serves this SQLite database")
                    && err.contains(&first.addr.to_string()),
                "{err}"
            );
        }
    }
    // kill -9: the next relay with that node id takes over without waiting.
    first.kill9();
    let started = Instant::now();
    let mut third = RelayProc::start_on(&first.db_url, "node_id = \"relay-1\"").await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(third.log.text().contains("Took over the node id"));
    // A clean stop gives it back.
    third.terminate();
    let _fourth = RelayProc::start_on(&first.db_url, "node_id = \"relay-1\"").await?;
    Ok(())
}

/// Ctrl-C (here SIGINT, then SIGTERM) of `client-agent register` during a call: the callee
/// hangs up with BYE before it unregisters, so the caller is told at once and the record has
/// the call's real duration, ended by the callee.
async fn a_callee_that_is_stopped_hangs_up_first(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "", "first").await?;
    relay.add_user("bob")?;
    for (round, signal) in ["INT", "TERM"].into_iter().enumerate() {
        let mut bob = ClientProc::start(
            relay.addr,
            "bob",
            "bob-pw",
            &["register", "--answer", "accept", "--for", "60s"],
        )?;
        bob.next_named("registered", 10).await?;
        let mut alice = ClientProc::start(relay.addr, "alice", "alice-pw", &["call", "bob"])?;
        alice.next_named("established", 10).await?;
        let since = Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        bob.signal(signal)?;
        let ended = alice.next_named("ended", 5).await?;
        let told_after = since.elapsed();
        assert_eq!(ended["reason"], "remote-bye", "{ended}");
        let bob_ended = bob.next_named("ended", 5).await?;
        assert_eq!(bob_ended["reason"], "local-bye", "{bob_ended}");
        assert_eq!(bob_ended["status"], 200, "{bob_ended}");
        bob.next_named("unregistered", 5).await?;
        assert_eq!(bob.exit_code(5).await?, Some(0));
        assert_eq!(alice.exit_code(5).await?, Some(0));
        let cdrs = relay.wait_cdrs("alice", round + 1, 10).await?;
        let cdr = cdrs
            .iter()
            .max_by_key(|c| c["created_at_ms"].as_i64())
            .ok_or_else(|| anyhow::anyhow!("no record"))?;
        assert_eq!(cdr["callee"], "bob", "{cdr}");
        assert_eq!(cdr["state"], "ended", "{cdr}");
        assert_eq!(cdr["ended_by"], "callee", "{cdr}");
        assert_eq!(cdr["reason"], "bye", "{cdr}");
        let d = cdr["duration_ms"].as_u64().unwrap_or(0);
        assert!(
            (1400..=told_after.as_millis() as u64 + 100).contains(&d),
            "a call of about 1.5 s lasted {d} ms: {cdr}"
        );
        // The operator's log has the end of the call too.
        let id = cdr["id"].as_str().unwrap_or_default();
        let line = relay
            .log
            .wait_for(&format!("Session ended session={id}"), 5)
            .await?;
        assert!(
            line.contains("caller=alice callee=bob") && line.contains(r#"ended_by="callee""#),
            "{line}"
        );
    }
    Ok(())
}

/// SIGTERM of the relay is a planned stop: new calls get 503 at once, the running session goes
/// on for the drain time, then the relay ends it with BYE to both sides, billed to that moment,
/// and exits.
async fn a_planned_stop_drains_then_ends_the_sessions(db: Db) -> anyhow::Result<()> {
    let mut relay = relay(db, "drain_secs = 2", "first").await?;
    let agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    let session = alice.next_named("session", 10).await?;
    // And a call still ringing: bob lets it ring.
    relay.add_user("bob")?;
    let mut bob = ClientProc::start(
        relay.addr,
        "bob",
        "bob-pw",
        &["register", "--answer", "ignore", "--for", "60s"],
    )?;
    bob.next_named("registered", 10).await?;
    let mut ringing = ClientProc::start(relay.addr, "alice", "alice-pw", &["call", "bob"])?;
    ringing.next_named("ringing", 10).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Instant::now();
    relay.signal("TERM")?;
    relay.log.wait_for("Stopping", 5).await?;
    // No new calls while draining.
    let mut late = open(&relay, &["wine"])?;
    let failed = late.next_named("failed", 5).await?;
    assert_eq!(failed["status"], 503, "{failed}");
    assert_eq!(failed["reason"], "Relay stopping", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the relay is stopping; try again in 30 s")),
        "{failed}"
    );
    // The session ran on until the drain time was over; then the relay ended it and said why.
    let closed = alice.next_named("closed", 10).await?;
    let after = stop.elapsed();
    assert!(
        after >= Duration::from_millis(1900),
        "ended after {after:?}"
    );
    assert_eq!(closed["by"], "relay", "{closed}");
    assert_eq!(closed["reason"], "relay-stop", "{closed}");
    agent
        .out
        .wait_for("ended by the relay (reason: relay-stop)", 10)
        .await?;
    // The call that was still ringing is given up: 503 to the caller, cancelled at bob.
    let failed = ringing.next_named("failed", 10).await?;
    assert_eq!(
        (failed["status"].as_u64(), failed["reason"].as_str()),
        (Some(503), Some("Relay stopping")),
        "{failed}"
    );
    assert_eq!(relay.exit_code(10).await?, Some(0));
    let cdrs = relay.cdrs("alice")?;
    let given_up = cdrs
        .iter()
        .find(|c| c["callee"] == "bob")
        .ok_or_else(|| anyhow::anyhow!("no record of the ringing call: {cdrs:#?}"))?;
    assert_eq!(
        (&given_up["state"], &given_up["status"], &given_up["reason"]),
        (&"failed".into(), &503.into(), &"relay-stop".into()),
        "{given_up}"
    );
    // Billed exactly: the record's charge is its duration's, and the one the client was told.
    let cdrs = relay.cdrs("alice")?;
    let cdr = cdrs
        .iter()
        .find(|c| c["id"] == session["session_id"])
        .ok_or_else(|| anyhow::anyhow!("no record of the session: {cdrs:#?}"))?;
    assert_eq!(cdr["state"], "ended", "{cdr}");
    assert_eq!(cdr["ended_by"], "relay", "{cdr}");
    assert_eq!(cdr["reason"], "relay-stop", "{cdr}");
    let duration = cdr["duration_ms"].as_i64().unwrap_or(-1);
    assert!((2400..5000).contains(&duration), "{cdr}");
    assert_eq!(cdr["charge_minor"], wine_charge(duration), "{cdr}");
    assert_eq!(closed["charge"]["amount_minor"], cdr["charge_minor"]);
    assert_eq!(alice.exit_code(10).await?, Some(0));
    Ok(())
}

/// A second signal during the drain stops the relay at once; the session it left open is taken
/// over at the next start, as after a crash.
async fn a_second_signal_stops_at_once(db: Db) -> anyhow::Result<()> {
    let mut relay = relay(db, "drain_secs = 60\nkeepalive_secs = 1", "first").await?;
    let _agent = vendor_a(&relay).await?;
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    let session = alice.next_named("session", 10).await?;
    relay.signal("TERM")?;
    relay.log.wait_for("Stopping", 5).await?;
    let second = Instant::now();
    relay.signal("INT")?;
    assert_eq!(relay.exit_code(5).await?, Some(0));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "{:?}",
        second.elapsed()
    );
    assert!(
        relay.log.text().contains("Second signal"),
        "{}",
        relay.log.text()
    );
    relay.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let cdrs = relay.cdrs("alice")?;
        if let Some(c) = cdrs.iter().find(|c| c["id"] == session["session_id"]) {
            if c["resumed_at_ms"].is_i64() {
                assert_eq!(c["state"], "established", "{c}");
                break;
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the session was not resumed: {cdrs:#?}\n{}",
                relay.log.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn json_of(out: &str) -> anyhow::Result<Vec<Value>> {
    serde_json::from_str(out).map_err(|e| anyhow::anyhow!("not a JSON array ({e}): {out}"))
}

/// `relay registrations`, `relay sessions` and `relay cdr list` with filters, run beside the
/// relay (on PostgreSQL: beside two relays sharing the database).
async fn operators_see_registrations_and_live_sessions(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "node_id = \"relay-1\"", "first").await?;
    relay.add_user("bob")?;
    let _agent = vendor_a(&relay).await?;
    let mut bob = ClientProc::start(
        relay.addr,
        "bob",
        "bob-pw",
        &[
            "--transport",
            "tcp",
            "register",
            "--answer",
            "accept",
            "--for",
            "60s",
        ],
    )?;
    bob.next_named("registered", 10).await?;

    let regs = json_of(&relay.admin(&["registrations", "--format", "json"])?)?;
    let find = |aor: &str| regs.iter().find(|r| r["aor"] == aor).cloned();
    let b = find("bob").ok_or_else(|| anyhow::anyhow!("bob is not listed: {regs:#?}"))?;
    assert_eq!(
        (&b["kind"], &b["transport"]),
        (&"user".into(), &"tcp".into()),
        "{b}"
    );
    assert!(
        b["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{b}"
    );
    assert!(
        b["user_agent"]
            .as_str()
            .is_some_and(|u| u.contains("client-agent")),
        "{b}"
    );
    assert!(
        b["expires_in_secs"].as_i64().is_some_and(|s| s > 3000),
        "{b}"
    );
    let w = find("wine").ok_or_else(|| anyhow::anyhow!("wine is not listed: {regs:#?}"))?;
    assert_eq!(
        (&w["kind"], &w["server"]),
        (&"service".into(), &"vendor-a".into()),
        "{w}"
    );
    let only_bob =
        json_of(&relay.admin(&["registrations", "--user", "bob", "--format", "json"])?)?;
    assert_eq!(only_bob.len(), 1, "{only_bob:#?}");
    let table = relay.admin(&["registrations"])?;
    assert!(
        table.starts_with("USER") && table.contains("vendor-a"),
        "{table}"
    );
    let csv = relay.admin(&["registrations", "--format", "csv"])?;
    assert!(
        csv.starts_with("aor,kind,server,contact,transport,source,"),
        "{csv}"
    );

    // A session and a call in progress.
    let mut alice = open(&relay, &["wine", "--for", "60s"])?;
    let session = alice.next_named("session", 10).await?;
    let mut call = ClientProc::start(
        relay.addr,
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "60s"],
    )?;
    call.next_named("established", 10).await?;
    // On PostgreSQL a second relay serves the same database: its session is listed too.
    let second = match db {
        Db::Postgres => Some(RelayProc::start_on(&relay.db_url, "node_id = \"relay-2\"").await?),
        Db::Sqlite => None,
    };
    let mut elsewhere = match &second {
        Some(r) => {
            let mut c = ClientProc::start(
                r.addr,
                "alice",
                "alice-pw",
                &["open", "wine", "--for", "60s"],
            )?;
            c.next_named("session", 10).await?;
            Some(c)
        }
        None => None,
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let live = json_of(&relay.admin(&["sessions", "--format", "json"])?)?;
    let expected = if second.is_some() { 3 } else { 2 };
    assert_eq!(live.len(), expected, "{live:#?}");
    let s = live
        .iter()
        .find(|l| l["id"] == session["session_id"])
        .ok_or_else(|| anyhow::anyhow!("the session is not listed: {live:#?}"))?;
    assert_eq!(
        (&s["user"], &s["service"], &s["server"], &s["node"]),
        (
            &"alice".into(),
            &"wine".into(),
            &"vendor-a".into(),
            &"relay-1".into()
        ),
        "{s}"
    );
    assert!(s["duration_ms"].as_i64().is_some_and(|d| d >= 1000), "{s}");
    assert!(
        live.iter()
            .any(|l| l["callee"] == "bob" && l["server"].is_null()),
        "{live:#?}"
    );
    if second.is_some() {
        assert!(live.iter().any(|l| l["node"] == "relay-2"), "{live:#?}");
    }
    let table = relay.admin(&["sessions"])?;
    assert!(
        table.starts_with("ID") && table.contains("relay-1"),
        "{table}"
    );
    for line in table.lines() {
        assert!(line.chars().count() <= 80, "{line}");
    }

    // The records of what is running, and filters.
    let running = json_of(&relay.admin(&["cdr", "list", "--state", "live", "--format", "json"])?)?;
    assert_eq!(running.len(), expected, "{running:#?}");
    alice.say("close")?;
    alice.next_named("closed", 10).await?;
    if let Some(c) = elsewhere.as_mut() {
        c.say("close")?;
        c.next_named("closed", 10).await?;
    }
    call.signal("INT")?;
    call.next_named("ended", 10).await?;
    let mut refused = open(&relay, &["cheese"])?;
    refused.next_named("failed", 10).await?;
    relay.wait_cdrs("alice", expected + 1, 10).await?;
    let list = |args: &[&str]| -> anyhow::Result<Vec<Value>> {
        let mut argv = vec!["cdr", "list", "--format", "json"];
        argv.extend_from_slice(args);
        json_of(&relay.admin(&argv)?)
    };
    assert_eq!(list(&["--state", "failed"])?.len(), 1);
    assert_eq!(list(&["--state", "ended"])?.len(), expected);
    assert_eq!(list(&["--state", "live"])?.len(), 0);
    let wine = list(&["--service", "wine"])?;
    assert!(
        !wine.is_empty() && wine.iter().all(|c| c["service"] == "wine"),
        "{wine:#?}"
    );
    assert_eq!(
        list(&["--server", "vendor-a", "--state", "ended"])?.len(),
        expected - 1
    );
    assert_eq!(list(&["--server", "nobody"])?.len(), 0);
    let all = list(&[])?;
    let (last, first) = match (all.first(), all.last()) {
        (Some(l), Some(f)) => (session_day(l)?, session_day(f)?),
        _ => anyhow::bail!("no records"),
    };
    assert_eq!(
        list(&["--from", &first, "--to", &last])?.len(),
        expected + 1
    );
    assert_eq!(list(&["--to", "2001-01-01"])?.len(), 0);
    let bad = relay
        .admin(&["cdr", "list", "--from", "yesterday"])
        .expect_err("a bad date");
    assert!(bad.to_string().contains("bad date \"yesterday\""), "{bad}");
    // CSV: the same fields under the same names as JSON.
    let csv = relay.admin(&["cdr", "list", "--format", "csv"])?;
    let header: Vec<&str> = csv.lines().next().unwrap_or_default().split(',').collect();
    let json = list(&[])?;
    let mut keys: Vec<&str> = json[0]
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut names = header.clone();
    keys.sort_unstable();
    names.sort_unstable();
    assert_eq!(keys, names);
    // The default table fits 80 columns.
    for line in relay.admin(&["cdr", "list"])?.lines() {
        assert!(line.chars().count() <= 80, "{line}");
    }
    Ok(())
}

/// The UTC day (YYYY-MM-DD) a record was requested on.
fn session_day(cdr: &Value) -> anyhow::Result<String> {
    cdr["created_at"]
        .as_str()
        .and_then(|t| t.get(..10))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no created_at: {cdr}"))
}
