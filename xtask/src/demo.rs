//! `cargo xtask demo`: the service story, told step by step on loopback.
//!
//! Needs only the Rust toolchain. Builds `relay`, `app-server-agent` and `client-agent`;
//! starts a relay on a free port of 127.0.0.1 with a SQLite database in a temporary
//! directory; adds user alice, two services with their tariffs (`wine` from vendor `cellar`,
//! `lessons` from vendor `school`) and the vendors' accounts, printing each admin command as
//! it runs. Each vendor gets a small web page (served here, on a thread) and an
//! `app-server-agent` beside it. alice opens a wine session with `client-agent open`; the demo
//! visits her URL as her browser would: the page checks the token with its agent
//! (`POST /introspect`) and welcomes her, and a made-up token is refused. alice types
//! `change …` (a second segment of her session) and `close`, and gets the charge; a one-second lesson shows a per-minute increment. Last, the
//! relay's records and alice's statement. Every process is stopped by its PID at the end (also
//! on failure, when the logs are printed and kept).
//!
//! Purchases: the relay serves its gRPC billing endpoint; each vendor's agent gets a billing
//! token (`relay appserver token`). alice buys two items on cellar's page, whose agent sends
//! charges at once (`--billing immediate`); the page sends one of them twice, and it is
//! counted once. On school's page she buys a worksheet, which its agent holds for the 200 OK
//! of her BYE (`--billing on-bye`). Her bills, her statement and both vendors' settlements
//! show them.
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::appagent;
use crate::http::{self, Answer, Request};
use crate::json::{self, Value};
use crate::relay::Relay;
use crate::util::{self, ChildGuard, Line, TempDir};

const DOMAIN: &str = "demo.sip-relay.test";
const ALICE_PW: &str = "alice-pw";
const WINE_DETAIL: &str = "a red for tonight";
/// How long alice keeps her wine session before typing `close`, in ms.
const WINE_MS: u64 = 2500;

/// A vendor: its application-server account, the service it delivers and its tariff
/// (minor units of EUR).
struct Vendor {
    account: &'static str,
    password: &'static str,
    service: &'static str,
    per_minute: i64,
    setup_fee: i64,
    increment: i64,
    /// How its agent sends charges (`--billing`).
    billing: &'static str,
    /// The operator's fee on what it earns, percent.
    fee_percent: &'static str,
}

const VENDORS: [Vendor; 2] = [
    Vendor {
        account: "cellar",
        password: "cellar-pw",
        service: "wine",
        per_minute: 120,
        setup_fee: 10,
        increment: 1,
        billing: "immediate",
        fee_percent: "10",
    },
    Vendor {
        account: "school",
        password: "school-pw",
        service: "lessons",
        per_minute: 60,
        setup_fee: 0,
        increment: 60,
        billing: "on-bye",
        fee_percent: "15",
    },
];

impl Vendor {
    /// `relay service add …` arguments.
    fn service_add(&self) -> Vec<String> {
        let mut args = strings(&["service", "add", self.service]);
        args.extend(["--per-minute".to_owned(), self.per_minute.to_string()]);
        if self.setup_fee != 0 {
            args.extend(["--setup-fee".to_owned(), self.setup_fee.to_string()]);
        }
        args.extend(["--increment".to_owned(), self.increment.to_string()]);
        args.extend(strings(&["--currency", "EUR"]));
        args
    }

    /// How a charge came about: `= 0.10 EUR set-up + 3 s at 1.20 EUR a minute (…)`.
    fn explain(&self, billed_secs: &str) -> String {
        let setup = if self.setup_fee != 0 {
            format!("{} set-up + ", money(self.setup_fee, "EUR"))
        } else {
            String::new()
        };
        let rounding = if self.increment == 1 {
            "the duration rounded up to whole seconds".to_owned()
        } else {
            format!("the duration rounded up to {} s steps", self.increment)
        };
        format!(
            "= {setup}{billed_secs} s at {} a minute ({rounding})",
            money(self.per_minute, "EUR")
        )
    }
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        bail!("demo takes no arguments (got {a:?})");
    }
    step(1, "Build the relay and the two agents");
    let bin_dir = util::build(&["relay", "app-server-agent", "client-agent"], false)?;

    let mut tmp = TempDir::new("sip-relay-demo")?;
    let started = Instant::now();
    // Every process and web page of the run is stopped when run_in returns.
    let result = run_in(&bin_dir, &tmp.path);
    match result {
        Ok(()) => {
            println!(
                "\nDemo done in {:.0} s: two sessions opened, verified by the vendor's page, items bought, closed and billed.",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            tmp.keep();
            print_logs(&tmp.path);
            Err(e)
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n== Step {n}: {text}");
}

/// A command as a person would type it, wrapped to stay readable.
fn show_cmd(program: &str, args: &[String]) {
    show_cmd_env(&[], program, args);
}

/// [`show_cmd`] with variables set for the command (passwords never go on a command line).
fn show_cmd_env(env: &[(&str, &str)], program: &str, args: &[String]) {
    let vars: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let mut line = format!("   $ {vars}{program}");
    let mut width = line.len();
    for arg in args {
        let word = if arg.is_empty() || arg.contains([' ', '"', '\'', '$', '&', ';']) {
            format!("\"{}\"", arg.replace('"', "\\\""))
        } else {
            arg.clone()
        };
        // Break before an option, not between an option and its value.
        if width + word.len() > 96 && word.starts_with("--") {
            line.push_str(" \\\n        ");
            width = 8;
        }
        line.push(' ');
        line.push_str(&word);
        width += word.len() + 1;
    }
    println!("{line}");
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("     {l}\n")).collect()
}

/// `1234` minor units of EUR → `12.34 EUR`.
fn money(minor: i64, currency: &str) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", m / 100, m % 100)
}

/// The first characters of a token or id, for lines that stay short.
fn short(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s.to_owned()
    }
}

fn run_in(bin_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    step(2, "Start a relay on loopback (temporary SQLite database)");
    let grpc = format!("127.0.0.1:{}", util::free_port()?);
    let mut relay = Relay::start_with_env(bin_dir, dir, DOMAIN, "info", &[("RELAY_GRPC", &grpc)])?;
    relay.guard.stop_signal = "TERM";
    show_cmd(
        "relay",
        &strings(&[
            "serve",
            "--sip",
            &relay.addr(),
            "--grpc",
            &grpc,
            "--domain",
            DOMAIN,
            "--database-url",
            &relay.database_url,
        ]),
    );
    util::wait_tcp_listening(
        grpc.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
        Duration::from_secs(10),
        &mut relay.guard,
    )?;
    println!(
        "   It serves SIP on {} (UDP and TCP) and its billing endpoint (gRPC) on {grpc}. Admin\n   commands change the same database while it runs; here they find it through the environment:",
        relay.addr()
    );
    println!(
        "   $ export RELAY_DATABASE_URL={} RELAY_DOMAIN={DOMAIN}",
        relay.database_url
    );

    step(
        3,
        "A user, two services with their tariffs, and the vendors' accounts",
    );
    admin_with_password(&relay, &strings(&["user", "add", "alice"]), ALICE_PW)?;
    for v in &VENDORS {
        admin(&relay, &v.service_add())?;
    }
    for v in &VENDORS {
        admin_with_password(
            &relay,
            &strings(&[
                "appserver",
                "add",
                v.account,
                "--service",
                v.service,
                "--fee-percent",
                v.fee_percent,
            ]),
            v.password,
        )?;
    }
    println!("   Each vendor's agent gets a billing token for the relay's gRPC endpoint:");
    let mut token_files = Vec::new();
    for v in &VENDORS {
        let args = strings(&["appserver", "token", v.account]);
        show_cmd("relay", &args);
        let mut cmd = relay.admin();
        cmd.args(&args).stderr(Stdio::null());
        let out = util::run_output(&mut cmd, &format!("relay {}", args.join(" ")))?;
        let token = out.lines().last().unwrap_or_default().trim().to_owned();
        if !token.starts_with("srt_") {
            bail!("relay appserver token printed no token: {out:?}");
        }
        let file = dir.join(format!("{}.token", v.account));
        std::fs::write(&file, format!("{token}\n"))?;
        println!("   (srt_… kept in {})", file.display());
        token_files.push(file);
    }

    let (tx, rx) = mpsc::channel::<Line>();
    let mut story = Story { rx };

    step(
        4,
        "Each vendor runs a web page and an app-server-agent beside it",
    );
    let mut pages = Vec::new();
    let mut agents: Vec<ChildGuard> = Vec::new();
    for (v, token_file) in VENDORS.iter().zip(&token_files) {
        let api: SocketAddr = format!("127.0.0.1:{}", util::free_port()?).parse()?;
        let page = start_page(v, api, tx.clone())?;
        let url = format!("http://{}/", page.addr);
        println!(
            "   {}'s web page: {url} (it asks the agent's POST /introspect who a visitor is)",
            v.account
        );
        let spec = appagent::Spec {
            account: v.account,
            password: v.password,
            services: &[v.service],
            url: &url,
            http: Some(api.to_string()),
            transport: "udp",
        };
        let billing = strings(&[
            "--grpc",
            &format!("http://{grpc}"),
            "--grpc-token-file",
            &token_file.display().to_string(),
            "--billing",
            v.billing,
            "--charges-file",
            &dir.join(format!("{}.charges.json", v.account))
                .display()
                .to_string(),
        ]);
        let mut shown = spec.args(&relay);
        shown.extend(billing.iter().cloned());
        show_cmd_env(
            &[("APP_AGENT_PASSWORD", v.password)],
            "app-server-agent",
            &shown,
        );
        let mut cmd = spec.command(bin_dir, &relay)?;
        cmd.args(&billing);
        cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(
            dir.join(format!("{}.err", v.account)),
        )?);
        let mut agent = ChildGuard::spawn(&format!("app-server-agent ({})", v.account), &mut cmd)?;
        let out = agent
            .child
            .stdout
            .take()
            .context("no stdout of the agent")?;
        util::forward_lines(v.account, out, tx.clone());
        agents.push(agent);
        let mut waiting = spec.ready_lines();
        story.wait(
            Duration::from_secs(15),
            &format!("{}'s agent to register {}", v.account, v.service),
            Some(v.account),
            |who, line| {
                if who == v.account {
                    waiting.retain(|w| !line.contains(w.as_str()));
                }
                waiting.is_empty()
            },
        )?;
        pages.push(page);
    }

    step(5, "alice opens a wine session");
    let wine_args = client_args(&relay, "wine", &["--detail", WINE_DETAIL]);
    show_cmd_env(&[("CLIENT_PASSWORD", ALICE_PW)], "client-agent", &wine_args);
    let mut cmd = Command::new(bin_dir.join("client-agent"));
    cmd.args(&wine_args)
        .env_remove("CLIENT_RELAY")
        .env_remove("CLIENT_USER")
        .env_remove("CLIENT_PASSWORD_FILE")
        .env("CLIENT_PASSWORD", ALICE_PW)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("alice-wine.err"))?);
    let mut alice = ChildGuard::spawn("client-agent (alice, wine)", &mut cmd)?;
    let mut alice_in = alice.child.stdin.take().context("no stdin of alice")?;
    let out = alice.child.stdout.take().context("no stdout of alice")?;
    util::forward_lines("alice:wine", out, tx.clone());
    let session = story.wait_event("alice:wine", "session", Duration::from_secs(15))?;
    let opened = Instant::now();
    let url = session
        .text("url")
        .context("the session event has no URL")?;
    let sid = session.text("session_id").unwrap_or_default();
    story.drain(Duration::from_millis(300));

    step(
        6,
        "alice's browser visits her URL; the page asks cellar's agent who she is",
    );
    let answer = visit(&mut story, &url)?;
    if answer.status != 200 || !answer.body.contains("Welcome alice") {
        bail!(
            "the page did not welcome alice: {} {}",
            answer.status,
            answer.body
        );
    }
    let (page_addr, _) = http::split_url(&url)?;
    println!("   Someone else tries a made-up token:");
    let fake = visit(
        &mut story,
        &format!("http://{page_addr}/?token=0123456789abcdef"),
    )?;
    if fake.status != 403 {
        bail!(
            "the page let a made-up token in: {} {}",
            fake.status,
            fake.body
        );
    }

    step(
        7,
        "alice buys two items on cellar's page; its agent sends each charge to the relay at once",
    );
    let token = url.split_once("token=").map(|(_, t)| t).unwrap_or_default();
    let buy = |story: &mut Story, key: &str, item: &str, name: &str, price: i64, qty: i64| {
        visit(
            story,
            &format!(
                "http://{page_addr}/buy?token={token}&key={key}&item={item}&name={name}&price={price}&qty={qty}"
            ),
        )
    };
    buy(
        &mut story,
        "order-1001",
        "riesling-2019",
        "Riesling+2019",
        1250,
        2,
    )?;
    buy(
        &mut story,
        "order-1002",
        "cheese-plate",
        "Cheese+plate",
        890,
        1,
    )?;
    println!("   The page's first request timed out on its side, so it sends order-1001 again:");
    let again = buy(
        &mut story,
        "order-1001",
        "riesling-2019",
        "Riesling+2019",
        1250,
        2,
    )?;
    if !again.body.contains("duplicate") {
        bail!(
            "the repeated order was not answered as a duplicate: {}",
            again.body
        );
    }

    step(
        8,
        "alice changes her mind: she types `change a glass of Cremant`; the relay searches again and cellar's agent accepts",
    );
    alice_in
        .write_all(b"change a glass of Cremant\n")
        .context("cannot write to alice's client-agent")?;
    let changed = story.wait_event("alice:wine", "changed", Duration::from_secs(15))?;
    if changed.text("detail").as_deref() != Some("a glass of Cremant") {
        bail!("the change did not take: {changed:?}");
    }
    story.drain(Duration::from_millis(300));
    println!("   From here on the session's record runs a second segment, rated on its own.");

    step(
        9,
        "alice types `close`; the relay rates the session and tells her the bill",
    );
    std::thread::sleep(
        (opened + Duration::from_millis(WINE_MS)).saturating_duration_since(Instant::now()),
    );
    println!(
        "   (after {:.1} s) alice types: close",
        WINE_MS as f64 / 1000.0
    );
    alice_in
        .write_all(b"close\n")
        .context("cannot write to alice's client-agent")?;
    drop(alice_in);
    let closed = story.wait_event("alice:wine", "closed", Duration::from_secs(15))?;
    check_exit(&mut alice)?;
    story.drain(Duration::from_millis(300));
    let wine_charge = charge_of(&closed).context("the wine session was closed without a charge")?;
    println!("   {}", VENDORS[0].explain(&billed_secs(&closed)));

    step(
        10,
        "A short lesson, billed by the started minute; a worksheet held for the end of it",
    );
    let lesson_args = client_args(&relay, "lessons", &["--for", "3s"]);
    show_cmd_env(
        &[("CLIENT_PASSWORD", ALICE_PW)],
        "client-agent",
        &lesson_args,
    );
    let mut cmd = Command::new(bin_dir.join("client-agent"));
    cmd.args(&lesson_args)
        .env_remove("CLIENT_RELAY")
        .env_remove("CLIENT_USER")
        .env_remove("CLIENT_PASSWORD_FILE")
        .env("CLIENT_PASSWORD", ALICE_PW)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("alice-lessons.err"))?);
    let mut lesson = ChildGuard::spawn("client-agent (alice, lessons)", &mut cmd)?;
    let out = lesson.child.stdout.take().context("no stdout of alice")?;
    util::forward_lines("alice:lessons", out, tx.clone());
    drop(tx);
    let session = story.wait_event("alice:lessons", "session", Duration::from_secs(15))?;
    let lesson_url = session
        .text("url")
        .context("the lesson's session event has no URL")?;
    let (school_page, _) = http::split_url(&lesson_url)?;
    let lesson_token = lesson_url
        .split_once("token=")
        .map(|(_, t)| t.to_owned())
        .unwrap_or_default();
    visit(
        &mut story,
        &format!(
            "http://{school_page}/buy?token={lesson_token}&key=ws-77&item=worksheet&name=Worksheet&price=300&qty=1"
        ),
    )?;
    let closed = story.wait_event("alice:lessons", "closed", Duration::from_secs(15))?;
    check_exit(&mut lesson)?;
    story.drain(Duration::from_millis(300));
    let lesson_charge = charge_of(&closed).context("the lesson was closed without a charge")?;
    println!("   {}", VENDORS[1].explain(&billed_secs(&closed)));

    step(
        11,
        "What the relay recorded: records, alice's statement, the vendors' settlements",
    );
    let cdrs = relay.wait_cdrs(2, Duration::from_secs(10))?;
    let charged = cdrs
        .iter()
        .filter(|c| c.text("state").as_deref() == Some("ended") && c.text("charge_minor").is_some())
        .count();
    if charged != 2
        || !cdrs
            .iter()
            .any(|c| c.text("id").as_deref() == Some(sid.as_str()))
    {
        bail!(
            "expected two ended, charged records (one of them {sid}), found {}",
            crate::relay::describe_states(&cdrs)
        );
    }
    admin(&relay, &strings(&["cdr", "list"]))?;
    admin(
        &relay,
        &strings(&["billing", "statement", "--user", "alice"]),
    )?;
    // Each purchase once: three items, whatever was sent twice.
    let mut cmd = relay.admin();
    cmd.args([
        "billing",
        "statement",
        "--user",
        "alice",
        "--format",
        "json",
    ]);
    let st = json::parse(&util::run_output(&mut cmd, "relay billing statement")?)?;
    let items = match st.get("items") {
        Some(Value::Array(items)) => items.len(),
        _ => 0,
    };
    if items != 3 {
        bail!("the statement should list 3 items, found {items}");
    }
    let total = match st.get("totals") {
        Some(Value::Array(t)) => t
            .first()
            .and_then(|t| t.get("amount_minor"))
            .and_then(Value::as_f64)
            .map(|a| a as i64),
        _ => None,
    }
    .context("the statement has no total")?;
    for v in &VENDORS {
        admin(
            &relay,
            &strings(&["billing", "settlement", "--appserver", v.account]),
        )?;
    }

    step(12, "Stop everything");
    for agent in &mut agents {
        agent.stop();
    }
    story.drain(Duration::from_millis(200));
    relay.guard.stop();
    drop(pages);
    println!(
        "   The agents un-registered (SIGTERM), the relay and both web pages are stopped, and the\n   temporary directory is removed. alice paid {} for her time ({} and {}) and her items:\n   {} in all.",
        money(wine_charge.0 + lesson_charge.0, &wine_charge.1),
        money(wine_charge.0, &wine_charge.1),
        money(lesson_charge.0, &lesson_charge.1),
        money(total, "EUR")
    );
    Ok(())
}

/// The arguments of alice's `client-agent … --json open SERVICE EXTRA…`.
fn client_args(relay: &Relay, service: &str, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "--relay",
        &relay.addr(),
        "--domain",
        DOMAIN,
        "--user",
        "alice",
        "--json",
        "open",
        service,
    ]);
    args.extend(strings(extra));
    args
}

/// Runs an admin command (`relay ARGS…` with the database in the environment), printing it
/// and what it printed.
fn admin(relay: &Relay, args: &[String]) -> anyhow::Result<()> {
    run_admin(relay, args, None)
}

/// [`admin`] for a command that takes a password, given in `RELAY_PASSWORD`.
fn admin_with_password(relay: &Relay, args: &[String], password: &str) -> anyhow::Result<()> {
    run_admin(relay, args, Some(password))
}

fn run_admin(relay: &Relay, args: &[String], password: Option<&str>) -> anyhow::Result<()> {
    match password {
        Some(pw) => show_cmd_env(&[("RELAY_PASSWORD", pw)], "relay", args),
        None => show_cmd("relay", args),
    }
    let mut cmd = Command::new(&relay.bin);
    cmd.args(args)
        .env_remove("RELAY_CONFIG")
        .env_remove("RELAY_PASSWORD")
        .env_remove("RELAY_PASSWORD_FILE")
        .env("RELAY_DATABASE_URL", &relay.database_url)
        .env("RELAY_DOMAIN", &relay.domain);
    if let Some(pw) = password {
        cmd.env("RELAY_PASSWORD", pw);
    }
    let out = util::run_output(&mut cmd, &format!("relay {}", args.join(" ")))?;
    print!("{}", indent(&out));
    Ok(())
}

/// Fails unless a client agent exits 0 within 10 s.
fn check_exit(agent: &mut ChildGuard) -> anyhow::Result<()> {
    let status = agent.wait_timeout(Duration::from_secs(10))?;
    if !status.success() {
        bail!(
            "{} exited with {}",
            agent.name,
            util::describe_status(status)
        );
    }
    Ok(())
}

/// (amount in minor units, currency) of a `closed` event.
fn charge_of(closed: &Value) -> Option<(i64, String)> {
    let charge = closed.get("charge")?;
    let amount = charge.get("amount_minor")?.as_f64()? as i64;
    Some((amount, charge.text("currency")?))
}

/// `billed_secs` of a `closed` event's charge.
fn billed_secs(closed: &Value) -> String {
    closed
        .get("charge")
        .and_then(|c| c.text("billed_secs"))
        .unwrap_or_else(|| "?".to_owned())
}

/// GET a URL as a browser would, telling the request, what the page did, and the answer.
fn visit(story: &mut Story, url: &str) -> anyhow::Result<http::Response> {
    let shown = match url.split_once("token=") {
        Some((base, token)) => format!("{base}token={}", short(token, 12)),
        None => url.to_owned(),
    };
    say("browser", &format!("GET {shown}"));
    let answer = http::get(url)?;
    // The page's own line (its introspection) comes on the channel.
    story.drain(Duration::from_millis(100));
    say(
        "browser",
        &format!(
            "{} {}: {}",
            answer.status,
            answer.reason,
            page_text(&answer.body)
        ),
    );
    Ok(answer)
}

fn say(who: &str, text: &str) {
    println!("   {who:>10} | {text}");
}

/// The text of a page's `<h1>` and `<p>` elements, joined by ` — `.
fn page_text(html: &str) -> String {
    let body = html.split_once("<body>").map(|(_, b)| b).unwrap_or(html);
    let marked = body.replace("</h1>", "\u{1}").replace("</p>", "\u{1}");
    let mut text = String::new();
    let mut in_tag = false;
    for c in marked.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split('\u{1}')
        .map(|part| unescape(part.trim()))
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" — ")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// A vendor's web page: `GET /?token=…` asks the agent's `POST /introspect` and welcomes a
/// live session's user; anything else is refused. Each check is told on `tx`.
fn start_page(
    vendor: &Vendor,
    api: SocketAddr,
    tx: mpsc::Sender<Line>,
) -> anyhow::Result<http::Server> {
    let name = format!("{}/web", vendor.account);
    let title = vendor.account;
    // The channel's sender is not Sync; the server thread owns it alone.
    let tx = std::sync::Mutex::new(tx);
    let tell = move |text: String| {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(Line::Text(name.clone(), text));
        }
    };
    let page = move |status: u16, paragraphs: &[String]| -> Answer {
        let body: String = paragraphs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == 0 {
                    format!("<h1>{}</h1>", escape(p))
                } else {
                    format!("<p>{}</p>", escape(p))
                }
            })
            .collect();
        (
            status,
            "text/html; charset=utf-8",
            format!(
                "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body>{body}</body></html>\n"
            ),
        )
    };
    http::Server::start(&format!("{}-page", vendor.account), move |req: &Request| {
        if req.method == "GET" && req.path == "/buy" {
            return buy(req, api, &tell, &page);
        }
        if req.method != "GET" || req.path != "/" {
            return page(404, &["Not found".to_owned()]);
        }
        let Some(token) = req.param("token").filter(|t| !t.is_empty()) else {
            return page(
                403,
                &["Not a live session".to_owned(), "no token".to_owned()],
            );
        };
        let asked = format!("POST /introspect token={}", short(token, 12));
        let info = http::post_form(api, "/introspect", &format!("token={token}"))
            .and_then(|r| json::parse(&r.body));
        match info {
            Ok(v) if v.get("active") == Some(&Value::Bool(true)) => {
                let user = v.text("sub").unwrap_or_default();
                let service = v.text("service").unwrap_or_default();
                let sid = v.text("sid").unwrap_or_default();
                tell(format!(
                    "{asked} → active: sub {user}, service {service}, sid {}",
                    short(&sid, 8)
                ));
                let mut paragraphs = vec![
                    format!("Welcome {user}"),
                    format!("{service} session {sid}"),
                ];
                if let Some(detail) = v.text("detail").filter(|d| !d.is_empty()) {
                    paragraphs.push(format!("You asked for: {detail}"));
                }
                page(200, &paragraphs)
            }
            Ok(_) => {
                tell(format!("{asked} → {{\"active\":false}}"));
                page(403, &["Not a live session".to_owned()])
            }
            Err(e) => {
                tell(format!("{asked} failed: {e:#}"));
                page(502, &["Cannot check the session".to_owned()])
            }
        }
    })
}

/// `GET /buy?token=…&key=…&item=…&name=…&price=…&qty=…`: the page learns the session from
/// the token (`POST /introspect`), then posts the charge to its agent
/// (`POST /sessions/{sid}/charges`) and shows the relay's answer.
fn buy(
    req: &Request,
    api: SocketAddr,
    tell: &dyn Fn(String),
    page: &dyn Fn(u16, &[String]) -> Answer,
) -> Answer {
    let p = |name: &str| req.param(name).unwrap_or_default().to_owned();
    let info = http::post_form(api, "/introspect", &format!("token={}", p("token")))
        .and_then(|r| json::parse(&r.body));
    let sid = match info {
        Ok(v) if v.get("active") == Some(&Value::Bool(true)) => v.text("sid").unwrap_or_default(),
        _ => return page(403, &["Not a live session".to_owned()]),
    };
    let (Ok(price), Ok(qty)) = (p("price").parse::<i64>(), p("qty").parse::<i64>()) else {
        return page(400, &["Bad price or quantity".to_owned()]);
    };
    let name = p("name").replace('+', " ");
    let body = format!(
        "{{\"charges\": [{{\"idempotency_key\": \"{}\", \"item_id\": \"{}\", \"item_name\": \"{}\", \"unit_price_minor\": {price}, \"quantity\": {qty}, \"currency\": \"EUR\"}}]}}",
        p("key"),
        p("item"),
        name
    );
    let path = format!("/sessions/{sid}/charges");
    match http::post_json(api, &path, &body) {
        Ok(r) => {
            let outcome = json::parse(&r.body)
                .ok()
                .and_then(|v| match v.get("results") {
                    Some(Value::Array(list)) => list.first().and_then(|r| r.text("outcome")),
                    _ => None,
                })
                .unwrap_or_else(|| r.body.clone());
            tell(format!(
                "POST /sessions/{}/charges {} {qty} x {name} at {} → {} {outcome}",
                short(&sid, 8),
                p("key"),
                money(price, "EUR"),
                r.status
            ));
            page(
                if r.status < 300 { 200 } else { 502 },
                &[format!("{qty} x {name}"), format!("charge: {outcome}")],
            )
        }
        Err(e) => {
            tell(format!("POST {path} failed: {e:#}"));
            page(502, &["Cannot charge".to_owned()])
        }
    }
}

/// The output of the agents and pages, told as it comes.
struct Story {
    rx: mpsc::Receiver<Line>,
}

impl Story {
    /// Tells lines until `pred` holds for one (at most `timeout`).
    fn wait(
        &mut self,
        timeout: Duration,
        what: &str,
        eof_fatal: Option<&str>,
        mut pred: impl FnMut(&str, &str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Line::Text(who, line)) => {
                    let done = pred(&who, &line);
                    tell(&who, &line);
                    if done {
                        return Ok(line);
                    }
                }
                Ok(Line::Eof(who)) => {
                    // A program that ends its output has exited: nothing more comes from it.
                    if eof_fatal == Some(who.as_str()) {
                        bail!("{} exited before {what}", label(&who));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no {what} within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("every program ended its output before {what}")
                }
            }
        }
    }

    /// Waits for alice's JSON event `name`; fails on a `failed` event.
    fn wait_event(&mut self, who: &str, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        let mut failure: Option<String> = None;
        let what = format!("{}'s {name} event", label(who));
        let line = self.wait(timeout, &what, Some(who), |w, line| {
            if w != who {
                return false;
            }
            let Ok(v) = json::parse(line) else {
                return false;
            };
            let event = v.text("event").unwrap_or_default();
            if event == "failed" {
                failure = Some(v.text("message").unwrap_or_else(|| line.to_owned()));
                return true;
            }
            event == name
        })?;
        if let Some(message) = failure {
            bail!("{}: {message}", label(who));
        }
        json::parse(&line)
    }

    /// Tells every line that comes until none has come for `quiet`.
    fn drain(&mut self, quiet: Duration) {
        while let Ok(line) = self.rx.recv_timeout(quiet) {
            if let Line::Text(who, line) = line {
                tell(&who, &line);
            }
        }
    }
}

/// One line of a program: alice's JSON events as sentences, the others as they are.
fn tell(who: &str, line: &str) {
    let who = label(who);
    if who != "alice" {
        say(who, line);
        return;
    }
    let Ok(v) = json::parse(line) else {
        say(who, line);
        return;
    };
    let index = v.text("index").unwrap_or_default();
    match v.text("event").unwrap_or_default().as_str() {
        "session" => {
            say(
                who,
                &format!(
                    "session {index}: {} by {}, session id {}",
                    v.text("service").unwrap_or_default(),
                    v.text("server").unwrap_or_else(|| "?".into()),
                    v.text("session_id").unwrap_or_default()
                ),
            );
            say(
                who,
                &format!(
                    "her URL: {}",
                    v.text("url").unwrap_or_else(|| "none".into())
                ),
            );
        }
        "closed" => {
            let by = match v.text("by").as_deref() {
                Some("client") => "alice",
                _ => "the server",
            };
            let secs = v
                .get("duration_ms")
                .and_then(Value::as_f64)
                .map(|ms| ms / 1000.0)
                .unwrap_or(0.0);
            let charge = match charge_of(&v) {
                Some((amount, currency)) => format!(
                    "charge {} ({} s billed)",
                    money(amount, &currency),
                    billed_secs(&v)
                ),
                None => "no charge reported".to_owned(),
            };
            say(
                who,
                &format!("session {index} closed by {by} after {secs:.1} s: {charge}"),
            );
            if let Some(Value::Array(items)) = v.get("items") {
                for i in items {
                    let amount =
                        i.get("amount_minor").and_then(Value::as_f64).unwrap_or(0.0) as i64;
                    say(
                        who,
                        &format!(
                            "  on her bill: {} x {} {}",
                            i.text("quantity").unwrap_or_default(),
                            i.text("name").unwrap_or_default(),
                            money(amount, &i.text("currency").unwrap_or_default())
                        ),
                    );
                }
            }
        }
        "failed" | "note" => say(who, &v.text("message").unwrap_or_else(|| line.to_owned())),
        _ => say(who, line),
    }
}

/// The name shown for a stream: `alice:wine` → `alice`.
fn label(stream: &str) -> &str {
    stream.split(':').next().unwrap_or(stream)
}

/// After a failure: the last lines of the relay's log and of every program's standard error.
fn print_logs(dir: &Path) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let is_log = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("log" | "err")
        );
        let text = util::tail(&file, 25);
        if is_log && !text.trim().is_empty() {
            eprintln!(
                "\n--- {} (last lines) ---\n{text}",
                file.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
        }
    }
}
