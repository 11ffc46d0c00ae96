//! Operations: JSON logs with a span per transaction and per session, the settings files of
//! the agents, and the sample settings files in `contrib/` (each program takes its own).

use serde_json::Value;
use std::path::PathBuf;
use tests::harness::Db;
use tests::procs::{AppAgent, ClientProc, RelayProc};

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
    let relay = RelayProc::start(Db::Sqlite, "").await?;
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
    let app_server_agent::Command::Run(run) = cli.command;
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
