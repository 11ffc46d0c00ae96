//! The `relay` binary's admin commands, run as a separate process on a temporary SQLite file.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use relay::store::{Cdr, Store};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// A directory with an empty database, as a relay that ran there once leaves it.
    fn new() -> Env {
        let env = Env::empty();
        env.ok(&["--create-database", "user", "list"]);
        env
    }

    /// A directory without a database.
    fn empty() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db_url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("relay.db").display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `relay ARGS` with the test's database and a clean environment.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
        for var in [
            "RELAY_SIP",
            "RELAY_ADVERTISE",
            "RELAY_DOMAIN",
            "RELAY_DATABASE_URL",
            "RELAY_CONFIG",
            "RELAY_LOG",
            "RELAY_PASSWORD",
            "RELAY_PASSWORD_FILE",
            "RELAY_TRUSTED",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("RELAY_DATABASE_URL", self.db_url())
            .current_dir(self.dir.path())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "relay {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "relay {args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    }

    fn store(&self) -> Store {
        let url = self.db_url();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(Store::open(&url))
            .unwrap()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
}

fn user_names(list: &str) -> Vec<String> {
    list.lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

#[test]
fn user_add_list_passwd_remove() {
    let env = Env::new();
    let out = env.ok(&[
        "user",
        "add",
        "alice",
        "--password",
        "secret",
        "--domain",
        "example.com",
    ]);
    assert!(out.contains("alice"), "{out}");
    // Global flags before the subcommand; password from the environment.
    let out = env
        .cmd(&["--domain", "example.com", "user", "add", "bob"])
        .env("RELAY_PASSWORD", "pw2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let list = env.ok(&["user", "list"]);
    assert!(list.starts_with("NAME"), "{list}");
    assert_eq!(user_names(&list), ["alice", "bob"]);
    assert!(list.contains("example.com"), "{list}");
    assert!(!list.contains("secret"), "{list}");

    // The stored HA1 is MD5("alice:example.com:secret").
    let store = env.store();
    let creds = env
        .block_on(store.user_credentials("alice"))
        .unwrap()
        .unwrap();
    assert_eq!(
        creds.ha1_md5,
        proto::sip::digest::ha1(
            proto::sip::digest::Algorithm::Md5,
            "alice",
            "example.com",
            "secret"
        )
    );
    assert_eq!(creds.ha1_sha256.len(), 64);

    // passwd with the password on standard input.
    let mut child = env
        .cmd(&["user", "passwd", "alice", "--domain", "example.com"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"new secret\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let creds = env
        .block_on(store.user_credentials("alice"))
        .unwrap()
        .unwrap();
    assert_eq!(
        creds.ha1_md5,
        proto::sip::digest::ha1(
            proto::sip::digest::Algorithm::Md5,
            "alice",
            "example.com",
            "new secret"
        )
    );

    env.ok(&["user", "remove", "alice"]);
    assert_eq!(user_names(&env.ok(&["user", "list"])), ["bob"]);
    let err = env.fails(&["user", "remove", "alice"]);
    assert_eq!(err.trim_end(), "error: no such user \"alice\"");
    let err = env.fails(&["user", "passwd", "alice", "--password", "x"]);
    assert_eq!(err.trim_end(), "error: no such user \"alice\"");
}

#[test]
fn passwords_come_from_a_file() {
    let env = Env::new();
    let file = env.path("carol.pw");
    std::fs::write(&file, "from-the-file\n").unwrap();
    let file_arg = file.to_string_lossy().to_string();
    env.ok(&[
        "--domain",
        "example.com",
        "user",
        "add",
        "carol",
        "--password-file",
        &file_arg,
    ]);
    let creds = env
        .block_on(env.store().user_credentials("carol"))
        .unwrap()
        .unwrap();
    let ha1 = |pw: &str| {
        proto::sip::digest::ha1(
            proto::sip::digest::Algorithm::Md5,
            "carol",
            "example.com",
            pw,
        )
    };
    assert_eq!(creds.ha1_md5, ha1("from-the-file"));
    // The variable names the file too; an unreadable file is named in the error.
    let out = env
        .cmd(&["--domain", "example.com", "user", "passwd", "carol"])
        .env("RELAY_PASSWORD_FILE", &file_arg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = env.fails(&[
        "user",
        "add",
        "dave",
        "--domain",
        "example.com",
        "--password-file",
        "/nonexistent/dave.pw",
    ]);
    assert!(err.contains("/nonexistent/dave.pw"), "{err}");
    // Both a password and a file: refused as ambiguous.
    let out = env.run(&[
        "user",
        "add",
        "erin",
        "--password",
        "x",
        "--password-file",
        &file_arg,
    ]);
    assert!(!out.status.success());
}

#[test]
fn accounts_take_the_domain_of_the_relay_that_serves_the_database() {
    let env = Env::new();
    // What `relay serve --domain example.com` records when it starts.
    env.block_on(env.store().set_setting("domain", "example.com"))
        .unwrap();
    env.ok(&["user", "add", "alice", "--password", "a"]);
    let list = env.ok(&["user", "list"]);
    assert!(list.contains("example.com"), "{list}");
    // Another domain would make an account that can never log in there.
    let err = env.fails(&[
        "user",
        "add",
        "bob",
        "--password",
        "b",
        "--domain",
        "other.test",
    ]);
    assert!(
        err.contains("\"example.com\"") && err.contains("--domain example.com"),
        "{err}"
    );
    env.ok(&[
        "user",
        "add",
        "bob",
        "--password",
        "b",
        "--domain",
        "EXAMPLE.COM",
    ]);
}

#[test]
fn a_database_that_does_not_exist_is_named_not_created() {
    let env = Env::empty();
    let err = env.fails(&["user", "list"]);
    assert!(
        err.contains(&env.path("relay.db").display().to_string())
            && err.contains("does not exist")
            && err.contains("--create-database"),
        "{err}"
    );
    assert!(
        !env.path("relay.db").exists(),
        "a new, empty database appeared"
    );
    env.ok(&["--create-database", "user", "list"]);
    assert!(env.path("relay.db").exists());
}

#[test]
fn application_servers_are_managed_as_such() {
    let env = Env::new();
    env.block_on(env.store().set_setting("domain", "example.com"))
        .unwrap();
    for s in ["wine", "beer"] {
        env.ok(&[
            "service",
            "add",
            s,
            "--per-minute",
            "100",
            "--currency",
            "EUR",
        ]);
    }
    env.ok(&[
        "appserver",
        "add",
        "cellar",
        "--password",
        "pw",
        "--service",
        "wine",
    ]);
    // The user commands are not for application-server accounts.
    for args in [
        vec!["user", "passwd", "cellar", "--password", "x"],
        vec!["user", "remove", "cellar"],
    ] {
        let err = env.fails(&args);
        assert!(err.contains("relay appserver"), "{err}");
    }
    // Another service, then one less.
    let out = env.ok(&["appserver", "update", "cellar", "--add-service", "beer"]);
    assert!(
        out.contains("wine, beer") || out.contains("beer, wine"),
        "{out}"
    );
    let out = env.ok(&["appserver", "update", "cellar", "--remove-service", "wine"]);
    assert!(out.contains("may now deliver: beer"), "{out}");
    let err = env.fails(&["appserver", "update", "cellar", "--add-service", "cider"]);
    assert!(err.contains("cider"), "{err}");
    let err = env.fails(&["appserver", "update", "nobody", "--add-service", "beer"]);
    assert!(err.contains("nobody"), "{err}");
    // Its password, changed where it belongs.
    env.ok(&["appserver", "passwd", "cellar", "--password", "new-pw"]);
    let creds = env
        .block_on(env.store().user_credentials("cellar"))
        .unwrap()
        .unwrap();
    assert_eq!(
        creds.ha1_md5,
        proto::sip::digest::ha1(
            proto::sip::digest::Algorithm::Md5,
            "cellar",
            "example.com",
            "new-pw"
        )
    );
    let list = env.ok(&["appserver", "list"]);
    assert!(list.starts_with("NAME"), "{list}");
    assert!(list.contains("REGISTERED"), "{list}");
}

#[test]
fn duplicate_add_fails_with_message() {
    let env = Env::new();
    env.ok(&[
        "user",
        "add",
        "bob",
        "--password",
        "a",
        "--domain",
        "d.test",
    ]);
    let err = env.fails(&[
        "user",
        "add",
        "bob",
        "--password",
        "b",
        "--domain",
        "d.test",
    ]);
    assert_eq!(err.trim_end(), "error: user \"bob\" already exists");
}

#[test]
fn bad_names_and_missing_password() {
    let env = Env::new();
    let err = env.fails(&["user", "add", "bad name", "--password", "a"]);
    assert!(err.contains("invalid user name"), "{err}");
    let long = "a".repeat(65);
    let err = env.fails(&["user", "add", &long, "--password", "a"]);
    assert!(err.contains("1 to 64"), "{err}");
    // stdin is /dev/null: an empty line is no password.
    let err = env.fails(&["user", "add", "carol", "--domain", "d.test"]);
    assert!(err.contains("password"), "{err}");
}

fn sample_cdr(id: &str, created: i64) -> Cdr {
    Cdr {
        id: id.to_owned(),
        call_id: "a84b4c76e66710@pc33.example.com".to_owned(),
        caller: "alice".to_owned(),
        callee: "bob".to_owned(),
        created_at_ms: created,
        started_at_ms: Some(created + 1000),
        ended_at_ms: Some(created + 13_345),
        duration_ms: Some(12_345),
        ended_by: Some(relay::store::Party::Callee),
        status: Some(200),
        reason: Some("bye".to_owned()),
        state: relay::store::CdrState::Ended,
        ..Cdr::default()
    }
}

#[test]
fn cdr_list_formats() {
    let env = Env::new();
    // Empty database.
    let table = env.ok(&["cdr", "list"]);
    assert_eq!(table.lines().count(), 1, "{table}");
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(env.ok(&["cdr", "list", "--format", "json"]), "[]\n");
    let csv = env.ok(&["cdr", "list", "--format", "csv"]);
    assert_eq!(csv.lines().count(), 1);
    assert!(csv.starts_with("id,call_id,caller,callee,"), "{csv}");

    let store = env.store();
    let c1 = sample_cdr("6f1c2a4e-0000-4000-8000-000000000001", 1_795_364_714_000);
    let mut c2 = sample_cdr("9a2b3c4d-0000-4000-8000-000000000002", 1_795_364_800_000);
    c2.callee = "carol".to_owned();
    c2.call_id = "x,\"y\"@h".to_owned();
    c2.started_at_ms = None;
    c2.ended_at_ms = Some(1_795_364_801_000);
    c2.duration_ms = None;
    c2.ended_by = None;
    c2.status = Some(486);
    c2.reason = Some("busy".to_owned());
    c2.state = relay::store::CdrState::Failed;
    env.block_on(store.insert_cdr(&c1)).unwrap();
    env.block_on(store.insert_cdr(&c2)).unwrap();

    let table = env.ok(&["cdr", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1].starts_with("9a2b3c4d  "), "newest first: {table}");
    assert!(lines[1].contains("failed 486"), "{table}");
    assert!(lines[2].contains("11-22 16:25"), "{table}");
    assert!(lines[2].contains("12s"), "{table}");
    // Every field, whole, with --wide.
    let wide = env.ok(&["cdr", "list", "--wide"]);
    assert!(wide.contains("2026-11-22T16:25:15.000Z"), "{wide}");
    assert!(wide.contains("12.345s") && wide.contains(&c1.id), "{wide}");
    // Columns line up: the CALLER column starts at the same offset in every line.
    let offsets: Vec<usize> = lines
        .iter()
        .map(|l| l.find("CALLER").or(l.find("alice")).unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] == w[1]), "{table}");

    let table = env.ok(&["cdr", "list", "--user", "carol"]);
    assert_eq!(table.lines().count(), 2, "{table}");
    let table = env.ok(&["cdr", "list", "--limit", "1"]);
    assert_eq!(table.lines().count(), 2, "{table}");

    let json = env.ok(&["cdr", "list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["id"], c1.id.as_str());
    assert_eq!(v[1]["duration_ms"], 12_345);
    assert_eq!(v[0]["status"], 486);
    assert!(v[0]["started_at_ms"].is_null());

    let csv = env.ok(&["cdr", "list", "--format", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines[1].starts_with(&format!("{},\"x,\"\"y\"\"@h\",alice,carol,", c2.id)),
        "{csv}"
    );
    assert!(lines[2].contains(",ended,200,bye,callee,"), "{csv}");
    assert!(lines[2].contains(",12345,"), "{csv}");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn config_precedence_flag_env_file() {
    let env = Env::new();
    let config = env.path("relay.toml");
    write(&config, "domain = \"file.example\"\n");
    let realm_of = |name: &str| -> String {
        let list = env.ok(&["user", "list"]);
        list.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    let cfg = config.to_str().unwrap();

    // File only.
    env.ok(&["--config", cfg, "user", "add", "u1", "--password", "p"]);
    assert_eq!(realm_of("u1"), "file.example");
    // Env beats file (config file named by RELAY_CONFIG).
    let out = env
        .cmd(&["user", "add", "u2", "--password", "p"])
        .env("RELAY_CONFIG", cfg)
        .env("RELAY_DOMAIN", "env.example")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(realm_of("u2"), "env.example");
    // Flag beats env and file.
    let out = env
        .cmd(&[
            "user",
            "add",
            "u3",
            "--password",
            "p",
            "--domain",
            "flag.example",
        ])
        .env("RELAY_CONFIG", cfg)
        .env("RELAY_DOMAIN", "env.example")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(realm_of("u3"), "flag.example");
    // No domain anywhere, and no relay has served this database: which realm is unknown.
    let err = env.fails(&["user", "add", "u4", "--password", "p"]);
    assert!(
        err.contains("which domain?") && err.contains("--domain"),
        "{err}"
    );

    // The database URL from the file is used when neither flag nor env gives one.
    let other = env.path("other.db");
    write(
        &config,
        &format!(
            "database_url = \"sqlite://{}\"\ndomain = \"file.example\"\n",
            other.display()
        ),
    );
    let out = env
        .cmd(&[
            "--config",
            cfg,
            "--create-database",
            "user",
            "add",
            "u5",
            "--password",
            "p",
        ])
        .env_remove("RELAY_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(other.exists());
}

#[test]
fn bad_config_file_is_named() {
    let env = Env::new();
    let config = env.path("bad.toml");
    write(&config, "domain = \"x\"\nmax_expirse = 10\n");
    let err = env.fails(&["--config", config.to_str().unwrap(), "user", "list"]);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("max_expirse"), "{err}");
    assert!(err.contains("line 2"), "{err}");

    write(&config, "sip = \"not an address\"\n");
    let err = env.fails(&["--config", config.to_str().unwrap(), "user", "list"]);
    assert!(err.contains("bad.toml") && err.contains("sip"), "{err}");

    let err = env.fails(&[
        "--config",
        env.path("missing.toml").to_str().unwrap(),
        "user",
        "list",
    ]);
    assert!(err.contains("missing.toml"), "{err}");

    write(&config, "min_expires = 100\ndefault_expires = 10\n");
    let err = env.fails(&["--config", config.to_str().unwrap(), "user", "list"]);
    assert!(
        err.contains("bad.toml") && err.contains("min_expires"),
        "{err}"
    );
}

#[test]
fn bad_database_url_is_an_error_not_a_panic() {
    let env = Env::new();
    let err = env.fails(&["--database-url", "mysql://x/y", "user", "list"]);
    assert!(err.contains("unsupported database URL"), "{err}");
}
