//! Operations: JSON logs with a span per transaction and per session, the settings files of
//! the agents, and the sample settings files in `contrib/` (each program takes its own).

use serde_json::Value;
use std::path::PathBuf;
use tests::harness::Db;
use tests::procs::{AppAgent, ClientProc, RelayProc};

/// A relay on SQLite with `extra` settings, alice, and the service wine delivered by cellar.
async fn relay_with_wine(extra: &str) -> anyhow::Result<RelayProc> {
    let relay = RelayProc::start(Db::Sqlite, extra).await?;
    relay.add_user("alice")?;
    relay.admin(&[
        "service",
        "add",
        "wine",
        "--per-minute",
        "60",
        "--currency",
        "EUR",
    ])?;
    relay.admin(&[
        "appserver",
        "add",
        "cellar",
        "--password",
        "cellar-pw",
        "--service",
        "wine",
    ])?;
    Ok(relay)
}

fn contrib(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace directory")
        .join("contrib")
        .join(name)
}

/// `log_format = "json"`: every line of the relay's log is one JSON object; a registration's
/// line carries its transaction's span (method, Call-ID), a session's lines the session's
/// (session id, Call-ID), the same as their own fields say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_transaction_and_the_session() -> anyhow::Result<()> {
    let relay = RelayProc::start(Db::Sqlite, "log_format = \"json\"").await?;
    relay.add_user("alice")?;
    relay.add_user("bob")?;
    let mut bob = ClientProc::start(relay.addr, "bob", "bob-pw", &["register", "--for", "10s"])?;
    bob.next_named("registered", 10).await?;
    let mut alice = ClientProc::start(
        relay.addr,
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "500ms"],
    )?;
    alice.next_named("established", 10).await?;
    alice.next_named("ended", 10).await?;
    relay.log.wait_for("Session ended", 10).await?;

    let lines: Vec<Value> = relay
        .log
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not JSON ({e}): {l}")))
        .collect::<anyhow::Result<_>>()?;
    let message = |v: &Value| {
        v["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let registered = lines
        .iter()
        .find(|v| message(v) == "Registered" && v["fields"]["user"] == "bob")
        .ok_or_else(|| anyhow::anyhow!("no Registered line"))?;
    assert_eq!(registered["level"], "INFO");
    assert_eq!(registered["span"]["name"], "transaction", "{registered}");
    assert_eq!(registered["span"]["method"], "REGISTER", "{registered}");
    assert!(
        registered["span"]["call_id"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{registered}"
    );
    for what in ["Session started", "Session ended"] {
        let line = lines
            .iter()
            .find(|v| message(v) == what)
            .ok_or_else(|| anyhow::anyhow!("no {what} line"))?;
        let span = &line["span"];
        assert_eq!(span["name"], "session", "{line}");
        assert_eq!(span["session_id"], line["fields"]["session"], "{line}");
        assert_eq!(span["call_id"], line["fields"]["call_id"], "{line}");
    }
    Ok(())
}

/// The agents take their settings from a file: the app-server-agent registers and serves,
/// the client opens a session, with nothing but `--config` (and the relay's address for the
/// client, which wins over the file's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_run_from_their_settings_files() -> anyhow::Result<()> {
    let relay = relay_with_wine("").await?;
    let dir = tempfile::tempdir()?;
    let agent_conf = dir.path().join("agent.toml");
    std::fs::write(
        &agent_conf,
        format!(
            "relay = \"{}\"\ndomain = \"relay.test\"\naccount = \"cellar\"\npassword = \"cellar-pw\"\n\
             service = [\"wine\"]\nurl = \"https://cellar.test/\"\nsip = \"127.0.0.1:0\"\n\
             expires = 120\n",
            relay.addr
        ),
    )?;
    let conf = agent_conf.to_string_lossy().into_owned();
    let agent = AppAgent::spawn_bare(&["run", "--config", &conf])?;
    agent.out.wait_for("serving SIP on", 15).await?;
    let client_conf = dir.path().join("client.toml");
    std::fs::write(
        &client_conf,
        "relay = \"127.0.0.1:9\"\nuser = \"alice\"\npassword = \"alice-pw\"\ndomain = \"relay.test\"\njson = true\n",
    )?;
    let conf = client_conf.to_string_lossy().into_owned();
    let relay_addr = relay.addr.to_string();
    let mut alice = ClientProc::spawn_bare(&[
        "--config",
        &conf,
        "--relay",
        &relay_addr,
        "open",
        "wine",
        "--for",
        "300ms",
    ])?;
    let session = alice.next_named("session", 10).await?;
    assert_eq!(session["server"], "cellar", "{session}");
    alice.next_named("closed", 10).await?;
    assert_eq!(alice.exit_code(10).await?, Some(0));
    Ok(())
}

/// The sample files in contrib/ are taken by the programs they are for, as they are.
#[test]
fn the_sample_settings_files_are_valid() -> anyhow::Result<()> {
    let relay = relay::config::Config::from_file(&contrib("relay.toml"))?;
    relay.validate()?;
    assert_eq!(relay.domain, "example.com");
    assert_eq!(relay.log_format, proto::log::LogFormat::Text);

    let path = contrib("app-server-agent.toml");
    let path = path.to_string_lossy();
    let cli: app_server_agent::Cli = proto::cli::try_parse_from(
        ["app-server-agent", "run", "--config", &path],
        "APP_AGENT_CONFIG_UNSET_IN_TESTS",
        Some("run"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let app_server_agent::Command::Run(run) = cli.command else {
        anyhow::bail!("the sample is not for `run`");
    };
    assert_eq!(run.account, "cellar");
    assert_eq!(run.services, ["wine", "beer"]);

    let path = contrib("client-agent.toml");
    let path = path.to_string_lossy();
    let cli: client_agent::cli::Cli = proto::cli::try_parse_from(
        ["client-agent", "--config", &path, "register"],
        "CLIENT_CONFIG_UNSET_IN_TESTS",
        None,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(cli.user, "alice");
    Ok(())
}

/// `GET PATH` on `addr`: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A scrape read by a Prometheus text-format parser.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn of(addr: std::net::SocketAddr) -> anyhow::Result<Scrape> {
        let (status, body) = http_get(addr, "/metrics").await?;
        assert_eq!(status, 200, "{body}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        Ok(Scrape(prometheus_parse::Scrape::parse(lines)?))
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.samples.iter().map(|s| s.metric.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// After one service session and one failed attempt, the relay's and the agent's metrics
/// count them; health and readiness answer; every metric is in docs/metrics.md, with no user
/// or session id among the labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_session_on_the_relay_and_the_agent() -> anyhow::Result<()> {
    let relay = relay_with_wine("http = \"127.0.0.1:0\"").await?;
    let http = relay
        .http
        .ok_or_else(|| anyhow::anyhow!("no http= in the relay's first line"))?;
    let agent = AppAgent::start(
        relay.addr,
        "cellar",
        &["--service", "wine", "--url", "https://cellar.test/"],
    )
    .await?;
    let (status, body) = http_get(http, "/healthz").await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(http, "/readyz").await?;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let mut alice = ClientProc::start(
        relay.addr,
        "alice",
        "alice-pw",
        &["open", "wine", "--for", "500ms"],
    )?;
    alice.next_named("session", 10).await?;
    alice.next_named("closed", 10).await?;
    let mut nobody = ClientProc::start(relay.addr, "alice", "alice-pw", &["open", "tea"])?;
    nobody.next_named("failed", 10).await?;
    relay.wait_cdrs("alice", 2, 10).await?;

    let m = Scrape::of(http).await?;
    let total = |n: &str| format!("siprelay_{n}_total");
    assert!(
        m.value(&total("sip_requests_received"), &[("method", "INVITE")]) >= 4.0,
        "{:?}",
        m.names()
    );
    assert!(m.value(&total("sip_requests_received"), &[("method", "REGISTER")]) >= 1.0);
    assert!(m.value(&total("sip_requests_sent"), &[("method", "INVITE")]) >= 1.0);
    assert!(
        m.value(
            &total("sip_responses_sent"),
            &[("method", "INVITE"), ("class", "4xx")]
        ) >= 3.0
    );
    assert!(
        m.value(
            &total("sip_responses_sent"),
            &[("method", "INVITE"), ("class", "2xx")]
        ) >= 1.0
    );
    assert!(
        m.value(
            &total("sip_responses_received"),
            &[("method", "INVITE"), ("class", "2xx")]
        ) >= 1.0
    );
    assert_eq!(m.value(&total("sessions_started"), &[]), 1.0);
    assert_eq!(m.value(&total("sessions_ended"), &[("reason", "bye")]), 1.0);
    assert_eq!(
        m.value(&total("attempts_failed"), &[("status", "404")]),
        1.0
    );
    assert!(m.value(&total("registrations"), &[("change", "registered")]) >= 1.0);
    assert_eq!(m.value("siprelay_sessions_open", &[]), 0.0);
    assert_eq!(m.value("siprelay_dialogs_open", &[]), 0.0);
    assert!(m.value("siprelay_bindings", &[]) >= 1.0, "the agent's wine");
    assert!(m.value("siprelay_store_write_seconds_count", &[]) >= 1.0);

    let agent_http = agent
        .http
        .ok_or_else(|| anyhow::anyhow!("the agent has no HTTP API"))?;
    let a = Scrape::of(agent_http).await?;
    assert_eq!(
        a.value("siprelay_agent_sessions_accepted_total", &[]),
        1.0,
        "{:?}",
        a.names()
    );
    assert_eq!(
        a.value("siprelay_agent_sessions_ended_total", &[("by", "client")]),
        1.0
    );
    assert_eq!(a.value("siprelay_agent_sessions_open", &[]), 0.0);

    // Every metric is documented, and no label carries a user or a session.
    let documented = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )?;
    for scrape in [&m, &a] {
        for s in &scrape.0.samples {
            let base = s
                .metric
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            assert!(
                documented.contains(&format!("`{base}`")),
                "{base} is not in docs/metrics.md"
            );
            for (k, v) in s.labels.iter() {
                assert!(
                    !v.contains("alice") && !v.contains('-') || k == "reason",
                    "label {k}={v} of {} names a user or an id",
                    s.metric
                );
            }
        }
    }
    Ok(())
}
