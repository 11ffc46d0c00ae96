//! Application billing end to end, on SQLite and PostgreSQL: `relay serve --grpc`, a real
//! session between client-agent and app-server-agent, charges reported over gRPC with tokens
//! from `relay appserver token`, and what the operator reads (`relay billing statement` and
//! `settlement`). Every answer checked is one a vendor or an operator would look at.

use proto::grpc::relay_v1 as v1;
use serde_json::Value;
use tests::harness::Db;
use tests::procs::{AppAgent, ClientProc, RelayProc};
use tonic::{Code, Request};
use v1::billing_client::BillingClient;

use tests::on_both_stores;

on_both_stores!(
    the_endpoint_answers_health_and_reflection,
    charges_over_grpc_count_once,
    a_charge_after_the_grace_is_refused,
    an_acknowledged_charge_survives_a_relay_kill,
    tokens_and_reports_belong_to_their_vendor,
    the_agent_forwards_the_web_services_charges,
    on_bye_charges_ride_in_the_200_for_bye,
    held_charges_survive_an_agent_kill,
    charges_in_an_info_are_answered_by_the_relay,
);

/// A relay serving gRPC, with alice, the service wine (1.20 EUR a minute) and two vendors.
async fn relay(db: Db, extra: &str) -> anyhow::Result<RelayProc> {
    let relay = RelayProc::start(db, &format!("grpc = \"127.0.0.1:0\"\n{extra}")).await?;
    relay.add_user("alice")?;
    relay.admin(&[
        "service",
        "add",
        "wine",
        "--per-minute",
        "120",
        "--increment",
        "1",
        "--currency",
        "EUR",
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

/// `relay appserver token NAME`: the token is the last line.
fn token(relay: &RelayProc, vendor: &str) -> anyhow::Result<String> {
    let out = relay.admin(&["appserver", "token", vendor])?;
    let t = out.lines().last().unwrap_or_default().trim().to_string();
    anyhow::ensure!(t.starts_with("srt_"), "no token in {out:?}");
    Ok(t)
}

async fn client(relay: &RelayProc) -> anyhow::Result<BillingClient<tonic::transport::Channel>> {
    let addr = relay
        .grpc
        .ok_or_else(|| anyhow::anyhow!("the relay serves no gRPC"))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(BillingClient::new(channel))
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn charge(sid: &str, key: &str, item: &str, price: i64, qty: i64) -> v1::Charge {
    v1::Charge {
        session_id: sid.into(),
        idempotency_key: key.into(),
        item_id: item.into(),
        item_name: format!("{item} (bottle)"),
        unit_price_minor: price,
        quantity: qty,
        currency: "EUR".into(),
        ..v1::Charge::default()
    }
}

async fn report(
    c: &mut BillingClient<tonic::transport::Channel>,
    token: &str,
    charges: Vec<v1::Charge>,
) -> anyhow::Result<Vec<v1::ChargeResult>> {
    Ok(
        c.report_charges(authed(v1::ReportChargesRequest { charges }, token))
            .await?
            .into_inner()
            .results,
    )
}

/// The error of a call that had to fail.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> anyhow::Result<tonic::Status> {
    match r {
        Ok(v) => anyhow::bail!("the call succeeded: {v:?}"),
        Err(status) => Ok(status),
    }
}

fn outcome(r: &v1::ChargeResult) -> v1::Outcome {
    v1::Outcome::try_from(r.outcome).unwrap_or(v1::Outcome::Unspecified)
}

/// alice opens wine at vendor-a; returns her client and the session id.
async fn session(relay: &RelayProc, secs: &str) -> anyhow::Result<(AppAgent, ClientProc, String)> {
    session_with(relay, secs, &[]).await
}

/// The same, with more flags for vendor-a's agent.
async fn session_with(
    relay: &RelayProc,
    secs: &str,
    agent_args: &[&str],
) -> anyhow::Result<(AppAgent, ClientProc, String)> {
    let mut args = vec!["--service", "wine", "--url", "https://shop-a.test/wine"];
    args.extend_from_slice(agent_args);
    let agent = AppAgent::start(relay.addr, "vendor-a", &args).await?;
    let mut alice = ClientProc::start(
        relay.addr,
        "alice",
        "alice-pw",
        &["open", "wine", "--for", secs],
    )?;
    let s = alice.next_named("session", 10).await?;
    let sid = s["session_id"].as_str().unwrap_or_default().to_string();
    anyhow::ensure!(!sid.is_empty(), "no session id in {s}");
    Ok((agent, alice, sid))
}

fn statement(relay: &RelayProc) -> anyhow::Result<Value> {
    let out = relay.admin(&[
        "billing",
        "statement",
        "--user",
        "alice",
        "--format",
        "json",
    ])?;
    Ok(serde_json::from_str(&out)?)
}

async fn the_endpoint_answers_health_and_reflection(db: Db) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let relay = relay(db, "").await?;
    let addr = relay.grpc.ok_or_else(|| anyhow::anyhow!("no gRPC"))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "relay.v1.Billing"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream_once(ask))
        .await?
        .into_inner();
    let first = answers
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no reflection answer"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        anyhow::bail!("not a service list: {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "relay.v1.Billing"), "{names:?}");
    Ok(())
}

/// A stream of one message (a client-streaming call's only request).
fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter([item])
}

async fn charges_over_grpc_count_once(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "").await?;
    let tok = token(&relay, "vendor-a")?;
    let (_agent, mut alice, sid) = session(&relay, "30s").await?;
    let mut c = client(&relay).await?;

    // Two items in one call: both recorded, each with its amount.
    let r = report(
        &mut c,
        &tok,
        vec![
            charge(&sid, "order-1", "riesling", 1250, 2),
            charge(&sid, "order-2", "glass", 450, 1),
        ],
    )
    .await?;
    assert_eq!(r.len(), 2);
    assert_eq!(outcome(&r[0]), v1::Outcome::Recorded, "{r:?}");
    assert_eq!((r[0].amount_minor, r[1].amount_minor), (2500, 450));
    let first_id = r[0].charge_id.clone();

    // A retry: the first result again, nothing new.
    let again = report(
        &mut c,
        &tok,
        vec![charge(&sid, "order-1", "riesling", 1250, 2)],
    )
    .await?;
    assert_eq!(outcome(&again[0]), v1::Outcome::Duplicate);
    assert_eq!(again[0].charge_id, first_id);
    assert_eq!(again[0].recorded_at_ms, r[0].recorded_at_ms);

    // The same key for another charge: refused, naming the key.
    let conflict = report(
        &mut c,
        &tok,
        vec![charge(&sid, "order-1", "riesling", 1250, 3)],
    )
    .await?;
    assert_eq!(outcome(&conflict[0]), v1::Outcome::Conflict);
    assert!(conflict[0].message.contains("order-1"), "{conflict:?}");

    // Bad input stores nothing: the corrected charge may use the same key.
    let mut bad = charge(&sid, "order-3", "cheese", 800, 1);
    bad.currency = "EURO".into();
    let refused = report(&mut c, &tok, vec![bad]).await?;
    assert_eq!(outcome(&refused[0]), v1::Outcome::Invalid);
    assert!(refused[0].message.contains("currency"), "{refused:?}");
    let mut negative = charge(&sid, "order-3", "cheese", -800, 1);
    negative.currency = "EUR".into();
    let refused = report(&mut c, &tok, vec![negative]).await?;
    assert!(
        refused[0].message.contains("unit_price_minor"),
        "{refused:?}"
    );
    let fixed = report(
        &mut c,
        &tok,
        vec![charge(&sid, "order-3", "cheese", 800, 1)],
    )
    .await?;
    assert_eq!(outcome(&fixed[0]), v1::Outcome::Recorded, "{fixed:?}");

    // A refund names its charge; it cannot give back more than the charge.
    let mut refund = charge(&sid, "refund-1", "glass", 450, 1);
    refund.kind = v1::ChargeKind::Refund as i32;
    refund.refunds = Some("order-2".into());
    let r = report(&mut c, &tok, vec![refund.clone()]).await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Recorded, "{r:?}");
    refund.idempotency_key = "refund-2".into();
    let r = report(&mut c, &tok, vec![refund]).await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Refused, "{r:?}");

    // An unknown session.
    let r = report(
        &mut c,
        &tok,
        vec![charge("no-such-session", "order-9", "x", 1, 1)],
    )
    .await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::NotFound, "{r:?}");

    // alice ends the session; the statement lists the items once and totals its lines.
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    let time = closed["charge"]["amount_minor"].as_i64().unwrap_or(-1);
    relay.wait_cdrs("alice", 1, 10).await?;
    let st = statement(&relay)?;
    let items = st["items"].as_array().cloned().unwrap_or_default();
    let keys: Vec<(&str, i64)> = items
        .iter()
        .map(|i| {
            (
                i["item_id"].as_str().unwrap_or_default(),
                i["amount_minor"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            ("riesling", 2500),
            ("glass", 450),
            ("cheese", 800),
            ("glass", -450)
        ],
        "{st}"
    );
    let total = &st["totals"][0];
    assert_eq!(total["currency"], "EUR");
    assert_eq!(total["time_minor"], time);
    assert_eq!(total["items_minor"], 3750);
    assert_eq!(total["refunds_minor"], 450);
    assert_eq!(total["amount_minor"], time + 3750 - 450, "{st}");
    Ok(())
}

async fn a_charge_after_the_grace_is_refused(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "charge_grace_secs = 1").await?;
    let tok = token(&relay, "vendor-a")?;
    let (_agent, mut alice, sid) = session(&relay, "1s").await?;
    alice.next_named("closed", 10).await?;
    relay.wait_cdrs("alice", 1, 10).await?;
    let mut c = client(&relay).await?;
    // Within the grace: taken.
    let r = report(
        &mut c,
        &tok,
        vec![charge(&sid, "late-1", "riesling", 1250, 1)],
    )
    .await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Recorded, "{r:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = report(
        &mut c,
        &tok,
        vec![charge(&sid, "late-2", "riesling", 1250, 1)],
    )
    .await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Refused, "{r:?}");
    assert!(r[0].message.contains("grace"), "{r:?}");
    // The one taken before is still answered as such.
    let r = report(
        &mut c,
        &tok,
        vec![charge(&sid, "late-1", "riesling", 1250, 1)],
    )
    .await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Duplicate, "{r:?}");
    Ok(())
}

async fn an_acknowledged_charge_survives_a_relay_kill(db: Db) -> anyhow::Result<()> {
    let mut relay = relay(db, "").await?;
    let tok = token(&relay, "vendor-a")?;
    let (_agent, _alice, sid) = session(&relay, "30s").await?;
    let mut c = client(&relay).await?;
    let r = report(
        &mut c,
        &tok,
        vec![charge(&sid, "kill-1", "riesling", 1250, 2)],
    )
    .await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Recorded, "{r:?}");
    relay.kill9();
    relay.restart().await?;
    let items: Vec<Value> = statement(&relay)?["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["amount_minor"], 2500);
    // The vendor's retry after the restart is a duplicate, not a second charge.
    let mut c = client(&relay).await?;
    let again = report(
        &mut c,
        &tok,
        vec![charge(&sid, "kill-1", "riesling", 1250, 2)],
    )
    .await?;
    assert_eq!(outcome(&again[0]), v1::Outcome::Duplicate, "{again:?}");
    assert_eq!(again[0].charge_id, r[0].charge_id);
    Ok(())
}

async fn tokens_and_reports_belong_to_their_vendor(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "").await?;
    let old = token(&relay, "vendor-a")?;
    let tok = token(&relay, "vendor-a")?;
    let tok_b = token(&relay, "vendor-b")?;
    relay.admin(&["appserver", "update", "vendor-a", "--fee-percent", "2.5"])?;
    let (_agent, mut alice, sid) = session(&relay, "30s").await?;
    let mut c = client(&relay).await?;

    // No token, a wrong one, the replaced one: unauthenticated.
    let none = c
        .report_charges(Request::new(v1::ReportChargesRequest {
            charges: vec![charge(&sid, "a-1", "riesling", 1250, 1)],
        }))
        .await;
    let none = refused(none)?;
    assert_eq!(none.code(), Code::Unauthenticated);
    for t in [old.as_str(), "srt_made-up"] {
        let err = c
            .report_charges(authed(
                v1::ReportChargesRequest {
                    charges: vec![charge(&sid, "a-1", "riesling", 1250, 1)],
                },
                t,
            ))
            .await;
        let err = refused(err)?;
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }

    // vendor-b may not charge in vendor-a's session; the key stays free for vendor-a.
    let r = report(
        &mut c,
        &tok_b,
        vec![charge(&sid, "a-1", "riesling", 1250, 1)],
    )
    .await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Forbidden, "{r:?}");
    let r = report(&mut c, &tok, vec![charge(&sid, "a-1", "riesling", 1250, 1)]).await?;
    assert_eq!(outcome(&r[0]), v1::Outcome::Recorded, "{r:?}");
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    let time = closed["charge"]["amount_minor"].as_i64().unwrap_or(-1);
    relay.wait_cdrs("alice", 1, 10).await?;

    // vendor-a's settlement, from the CLI and over gRPC: gross, fee (2.5 %, half up), net.
    let gross = time + 1250;
    let fee = (gross * 250 + 5_000) / 10_000;
    let out = relay.admin(&[
        "billing",
        "settlement",
        "--appserver",
        "vendor-a",
        "--format",
        "json",
    ])?;
    let st: Value = serde_json::from_str(&out)?;
    assert_eq!(st["fee_basis_points"], 250);
    assert_eq!(st["totals"][0]["gross_minor"], gross, "{st}");
    assert_eq!(st["totals"][0]["fee_minor"], fee, "{st}");
    assert_eq!(st["totals"][0]["net_minor"], gross - fee, "{st}");
    let over = c
        .settlement(authed(v1::SettlementRequest::default(), &tok))
        .await?
        .into_inner();
    assert_eq!(over.appserver, "vendor-a");
    assert_eq!(
        (
            over.totals[0].gross_minor,
            over.totals[0].fee_minor,
            over.totals[0].net_minor
        ),
        (gross, fee, gross - fee)
    );
    // vendor-b sees neither vendor-a's settlement nor alice's lines with vendor-a.
    let err = c
        .settlement(authed(
            v1::SettlementRequest {
                appserver: "vendor-a".into(),
                ..Default::default()
            },
            &tok_b,
        ))
        .await;
    let err = refused(err)?;
    assert_eq!(err.code(), Code::PermissionDenied);
    let b = c
        .statement(authed(
            v1::StatementRequest {
                user: "alice".into(),
                ..Default::default()
            },
            &tok_b,
        ))
        .await?
        .into_inner();
    assert!(b.lines.is_empty() && b.totals.is_empty(), "{b:?}");
    let a = c
        .statement(authed(
            v1::StatementRequest {
                user: "alice".into(),
                ..Default::default()
            },
            &tok,
        ))
        .await?
        .into_inner();
    let sum: i64 = a.lines.iter().map(|l| l.amount_minor).sum();
    assert_eq!(a.lines.len(), 2, "{a:?}");
    assert_eq!(a.totals[0].total_minor, sum);
    assert_eq!(sum, gross);
    Ok(())
}

/// vendor-a's agent flags for the relay's billing endpoint, with its token in a file.
fn grpc_args(relay: &RelayProc, dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let file = dir.join("token");
    std::fs::write(&file, format!("{}\n", token(relay, "vendor-a")?))?;
    let addr = relay
        .grpc
        .ok_or_else(|| anyhow::anyhow!("the relay serves no gRPC"))?;
    Ok(vec![
        "--grpc".into(),
        format!("http://{addr}"),
        "--grpc-token-file".into(),
        file.display().to_string(),
    ])
}

fn item(key: &str, id: &str, price: i64, qty: i64) -> Value {
    serde_json::json!({"idempotency_key": key, "item_id": id, "item_name": id,
        "unit_price_minor": price, "quantity": qty, "currency": "EUR"})
}

fn items_of(st: &Value) -> Vec<(String, i64)> {
    st["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            (
                i["item_id"].as_str().unwrap_or_default().to_string(),
                i["amount_minor"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

async fn the_agent_forwards_the_web_services_charges(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "").await?;
    let dir = tempfile::tempdir()?;
    let g = grpc_args(&relay, dir.path())?;
    let g: Vec<&str> = g.iter().map(String::as_str).collect();
    let (agent, mut alice, sid) = session_with(&relay, "30s", &g).await?;
    let path = format!("/sessions/{sid}/charges");

    // The body the issue writes: recorded, with the relay's answer per charge.
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("w-1", "riesling", 1250, 2)]}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "recorded", "{body}");
    assert_eq!(body["results"][0]["amount_minor"], 2500);
    let id = body["results"][0]["charge_id"].clone();
    // The web service retries: the same result, counted once.
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("w-1", "riesling", 1250, 2)]}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "duplicate", "{body}");
    assert_eq!(body["results"][0]["charge_id"], id);
    // The same key for another charge: 409 naming the key.
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("w-1", "riesling", 1250, 3)]}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("w-1"), "{body}");
    // Bad input: 400 naming the field; nothing kept, so the corrected charge may reuse the key.
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("w-2", "glass", 0, 1)]}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("unit_price_minor"), "{body}");
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [{"idempotency_key": "w-2"}]}),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("item_id"), "{body}");
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("w-2", "glass", 450, 1)]}),
        )
        .await?;
    assert_eq!(
        (status, &body["results"][0]["outcome"]),
        (200, &Value::from("recorded")),
        "{body}"
    );

    // alice closes: her bill lists the items beside the time charge.
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    let items: Vec<(String, i64)> = closed["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_string(),
                i["amount_minor"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        items,
        vec![("riesling".to_string(), 2500), ("glass".to_string(), 450)],
        "{closed}"
    );
    relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(
        items_of(&statement(&relay)?),
        vec![("riesling".to_string(), 2500), ("glass".to_string(), 450)]
    );
    Ok(())
}

async fn on_bye_charges_ride_in_the_200_for_bye(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "").await?;
    let dir = tempfile::tempdir()?;
    let mut args = grpc_args(&relay, dir.path())?;
    let file = dir.path().join("charges.json");
    args.extend([
        "--billing".into(),
        "on-bye".into(),
        "--charges-file".into(),
        file.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (agent, mut alice, sid) = session_with(&relay, "30s", &args).await?;
    let path = format!("/sessions/{sid}/charges");
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("b-1", "riesling", 1250, 2), item("b-2", "glass", 450, 1)]}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["results"][0]["outcome"], "held", "{body}");
    // Held on disk, owner-readable only; the relay knows nothing yet.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(items_of(&statement(&relay)?).is_empty());
    // A retry of a held charge is held once.
    let (status, _) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("b-1", "riesling", 1250, 2)]}),
        )
        .await?;
    assert_eq!(status, 202);

    // alice closes: the charges come in the agent's 200 for her BYE and are on her bill.
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(
        closed["items"].as_array().map(Vec::len),
        Some(2),
        "{closed}"
    );
    relay.wait_cdrs("alice", 1, 10).await?;
    let want = vec![("riesling".to_string(), 2500), ("glass".to_string(), 450)];
    assert_eq!(items_of(&statement(&relay)?), want);
    // The agent confirms them over gRPC (duplicates), then forgets them: counted once.
    let confirmed = agent.out.wait_for("charge b-2 of session", 15).await?;
    assert!(confirmed.contains("duplicate"), "{confirmed}");
    for _ in 0..50 {
        if !file.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!file.exists(), "the charges file still holds charges");
    assert_eq!(items_of(&statement(&relay)?), want);
    Ok(())
}

async fn held_charges_survive_an_agent_kill(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "").await?;
    let dir = tempfile::tempdir()?;
    let mut args = grpc_args(&relay, dir.path())?;
    let file = dir.path().join("charges.json");
    args.extend([
        "--billing".into(),
        "on-bye".into(),
        "--charges-file".into(),
        file.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut agent, _alice, sid) = session_with(&relay, "30s", &args).await?;
    let (status, body) = agent
        .post_json(
            &format!("/sessions/{sid}/charges"),
            &serde_json::json!({"charges": [item("k-1", "riesling", 1250, 1)]}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    agent.kill9();
    assert!(items_of(&statement(&relay)?).is_empty());
    // Started again: what it held goes to the relay, once.
    let mut again = vec!["--service", "wine", "--url", "https://shop-a.test/wine"];
    again.extend_from_slice(&args);
    let agent = AppAgent::start(relay.addr, "vendor-a", &again).await?;
    let line = agent.out.wait_for("charge k-1 of session", 15).await?;
    assert!(line.contains("recorded"), "{line}");
    assert_eq!(
        items_of(&statement(&relay)?),
        vec![("riesling".to_string(), 1250)]
    );
    assert!(!file.exists());
    Ok(())
}

async fn charges_in_an_info_are_answered_by_the_relay(db: Db) -> anyhow::Result<()> {
    let relay = relay(db, "").await?;
    // No gRPC at all: the INFO within the session is the only way.
    let (agent, mut alice, sid) = session_with(&relay, "30s", &["--billing", "info"]).await?;
    let path = format!("/sessions/{sid}/charges");
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("i-1", "riesling", 1250, 2)]}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "recorded", "{body}");
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("i-1", "riesling", 1250, 2)]}),
        )
        .await?;
    assert_eq!(
        (status, &body["results"][0]["outcome"]),
        (200, &Value::from("duplicate")),
        "{body}"
    );
    let (status, body) = agent
        .post_json(
            &path,
            &serde_json::json!({"charges": [item("i-1", "riesling", 1250, 5)]}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["results"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("i-1"),
        "{body}"
    );
    alice.say("close")?;
    let closed = alice.next_named("closed", 10).await?;
    assert_eq!(closed["items"][0]["amount_minor"], 2500, "{closed}");
    relay.wait_cdrs("alice", 1, 10).await?;
    assert_eq!(
        items_of(&statement(&relay)?),
        vec![("riesling".to_string(), 2500)]
    );
    Ok(())
}

/// `openssl ARGS…` in `dir`, failing with what it said.
fn openssl(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A test certificate authority and a certificate for 127.0.0.1 it signed (openssl, as an
/// operator would make them): (ca.pem, server.pem, server.key).
fn test_ca(dir: &std::path::Path) -> anyhow::Result<(String, String, String)> {
    let run = |args: &[&str]| openssl(dir, args);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=sip-relay test CA",
    ];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&a)?;
    let mut a = vec!["req", "-subj", "/CN=127.0.0.1"];
    a.extend(ec);
    a.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&a)?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.pem",
        "-extfile",
        "ext.cnf",
    ])?;
    let p = |f: &str| dir.join(f).display().to_string();
    Ok((p("ca.pem"), p("server.pem"), p("server.key")))
}

/// The web service sells one riesling (12.50) in session `sid` under `key`: the agent's answer.
async fn one_riesling(agent: &AppAgent, sid: &str, key: &str) -> anyhow::Result<(u16, Value)> {
    agent
        .post_json(
            &format!("/sessions/{sid}/charges"),
            &serde_json::json!({"charges": [item(key, "riesling", 1250, 1)]}),
        )
        .await
}

/// A certificate for an application server that `test_ca`'s authority signed (client
/// authentication): (client.pem, client.key).
fn client_cert(dir: &std::path::Path) -> anyhow::Result<(String, String)> {
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-subj",
        "/CN=vendor-a",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ])?;
    std::fs::write(
        dir.join("client.cnf"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "client.pem",
        "-extfile",
        "client.cnf",
    ])?;
    let p = |f: &str| dir.join(f).display().to_string();
    Ok((p("client.pem"), p("client.key")))
}

/// A relay whose gRPC endpoint speaks TLS with `test_ca`'s certificate (asking for client
/// certificates of that authority when `mutual`), and the agent's flags to reach it with
/// vendor-a's token.
async fn tls_relay(
    dir: &std::path::Path,
    mutual: bool,
) -> anyhow::Result<(RelayProc, Vec<String>)> {
    let (ca, cert, key) = test_ca(dir)?;
    let mut settings = format!("grpc_tls_cert = \"{cert}\"\ngrpc_tls_key = \"{key}\"");
    if mutual {
        settings.push_str(&format!("\ngrpc_tls_client_ca = \"{ca}\""));
    }
    let relay = relay(Db::Sqlite, &settings).await?;
    let addr = relay.grpc.ok_or_else(|| anyhow::anyhow!("no gRPC"))?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token(&relay, "vendor-a")?)?;
    let args = vec![
        "--grpc".to_string(),
        format!("https://{addr}"),
        "--grpc-token-file".to_string(),
        token_file.display().to_string(),
        "--grpc-ca".to_string(),
        ca,
    ];
    Ok((relay, args))
}

/// `grpc_tls_client_ca`: an application server with a certificate the authority signed gets
/// its charge recorded; one with the token alone is not let in (its charge waits, pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_over_mutual_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (relay, agent_args) = tls_relay(dir.path(), true).await?;
    // Signed by the authority tls_relay made.
    let (client, client_key) = client_cert(dir.path())?;
    let base: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    {
        let mut args = base.to_vec();
        args.extend([
            "--grpc-cert",
            client.as_str(),
            "--grpc-key",
            client_key.as_str(),
        ]);
        let (agent, _alice, sid) = session_with(&relay, "30s", &args).await?;
        let (status, body) = one_riesling(&agent, &sid, "m-1").await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["outcome"], "recorded", "{body}");
    }
    let (agent, _alice, sid) = session_with(&relay, "30s", &base).await?;
    let (status, body) = one_riesling(&agent, &sid, "m-2").await?;
    assert_eq!(status, 202, "without a client certificate: {body}");
    assert_eq!(body["results"][0]["outcome"], "pending", "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_over_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (relay, agent_args) = tls_relay(dir.path(), false).await?;
    let addr = relay.grpc.ok_or_else(|| anyhow::anyhow!("no gRPC"))?;
    let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let (agent, _alice, sid) = session_with(&relay, "30s", &args).await?;
    let (status, body) = one_riesling(&agent, &sid, "t-1").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "recorded", "{body}");
    // Plain HTTP/2 to a TLS endpoint gets nowhere.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut c = BillingClient::new(channel);
        let r = c
            .settlement(authed(v1::SettlementRequest::default(), "x"))
            .await;
        assert!(
            r.is_err(),
            "a plain call to the TLS endpoint was answered: {r:?}"
        );
    }
    Ok(())
}
