//! Conformance against public corpora, with a relay in-process on loopback:
//!
//! - RFC 4475 torture messages: each file rewritten for loopback, sent, and the relay's answer
//!   checked against what its RFC section asks, from a table (one line of justification each);
//! - RFC 5118 IPv6 messages: answered as the relay's rules say, never a crash;
//! - PROTOS c07-sip (4527 malformed INVITEs, each followed by its CANCEL): no panic, no leaked
//!   transaction context, and a real call still works afterwards.
//!
//! The corpora name hosts outside loopback. The relay answers per Via and forwards per
//! Request-URI, so every message is rewritten first, and before any message is sent the test
//! works out with the relay's own Via rules (`stamp_via`, `response_target`) where the answer
//! will go, and refuses to send it unless that is the test's own socket.

use client_agent::output::Event;
use proto::sip::message::{self, Frame, Limits, Message};
use proto::transport::{Target, response_target, stamp_via};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tests::harness::{Db, RawSip, TestRelay, client, panic_log, replace_bytes, status_code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const RFC4475_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpora/rfc4475");
const RFC5118_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpora/rfc5118");
const PROTOS_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/corpora/protos-c07-sip/cases"
);

/// Longest wait for a first final answer; after one, how long further datagrams are collected.
const MAX_WAIT: Duration = Duration::from_millis(1500);
const AFTER_FINAL: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Sending one rewritten message and judging the answer
// ---------------------------------------------------------------------------------------------

/// How the test sends a message. Requests whose top Via names TCP or TLS go over TCP: the relay
/// answers a request on the transport its Via names (RFC 3261 §18.2.2), so over UDP it would
/// open a connection back to the Via (or, for TLS, fail). Everything else goes over UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The first final answer has this status (every answer carries the message's Call-ID).
    Status(u16),
    /// The RFC says "ideally" this status: silence is acceptable too (and noted).
    Ideally(u16),
    /// Nothing comes back.
    Silent,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Status(s) => write!(f, "{s}"),
            Expect::Ideally(s) => write!(f, "{s} or silence"),
            Expect::Silent => f.write_str("silence"),
        }
    }
}

/// One corpus message: how to rewrite it, how to send it, what the relay must answer, and why.
#[derive(Debug, Clone)]
struct Case {
    file: &'static str,
    over: Over,
    expect: Expect,
    why: &'static str,
    /// Byte-exact replacements, applied in order to the whole message; each must match at least
    /// once. In the replacement, `$LOCAL` is the test's sending socket (Via sent-by: answers come
    /// back to it), `$SILENT` a socket of the test that must never hear anything (Contacts and
    /// other hosts the relay could contact), `$RELAY` the relay's own address.
    rewrite: Vec<(String, String)>,
}

fn case(
    file: &'static str,
    over: Over,
    expect: Expect,
    why: &'static str,
    rewrite: &[(&str, &str)],
) -> Case {
    Case {
        file,
        over,
        expect,
        why,
        rewrite: rewrite
            .iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect(),
    }
}

#[derive(Debug, Clone, Copy)]
struct Vars {
    local: SocketAddr,
    silent: SocketAddr,
    relay: SocketAddr,
}

impl Vars {
    fn expand(&self, s: &str) -> String {
        s.replace("$LOCAL", &self.local.to_string())
            .replace("$SILENT", &self.silent.to_string())
            .replace("$RELAY", &self.relay.to_string())
    }
}

fn apply_rewrite(raw: &[u8], rules: &[(String, String)], vars: &Vars) -> Result<Vec<u8>, String> {
    let mut out = raw.to_vec();
    for (from, to) in rules {
        let (next, n) = replace_bytes(&out, from.as_bytes(), vars.expand(to).as_bytes());
        if n == 0 {
            return Err(format!("rewrite table: {from:?} matches nothing"));
        }
        out = next;
    }
    Ok(out)
}

/// Bytes after the first blank line (the body, for a message that has one).
fn tail(msg: &[u8]) -> &[u8] {
    msg.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|at| msg.get(at + 4..))
        .unwrap_or_default()
}

/// Text of the corpora that names hosts outside loopback.
const FOREIGN: &[&str] = &[
    "example.",
    "examle.",
    "192.0.2.",
    "192.168.",
    "255.255.255.255",
    "135.180.",
    "10.0.0.",
    "jasomi",
    "company.com",
    "2001:db8",
];
/// Foreign-looking text that names no host: escaped user parts of URIs.
const NOT_HOSTS: &[&str] = &["sips%3Auser%40example.com", "par=u%40example.net"];

/// Everything in a rewritten message that still names a host outside loopback, or a loopback
/// port that is none of the test's. Call-ID values are opaque words, not hosts, and are skipped.
fn foreign_hosts(msg: &[u8], ports: &[u16]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let mut found = Vec::new();
    for line in text.split('\n') {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i") {
            continue;
        }
        let mut line = line.trim_end().to_string();
        for ok in NOT_HOSTS {
            line = line.replace(ok, "");
        }
        for f in FOREIGN {
            if line.contains(f) {
                found.push(format!("{f:?} in {line:?}"));
            }
        }
        for (at, _) in line.match_indices("127.0.0.1:") {
            let digits: String = line
                .get(at + 10..)
                .unwrap_or_default()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if digits.parse::<u16>().is_ok_and(|p| !ports.contains(&p)) {
                found.push(format!("port {digits} in {line:?}"));
            }
        }
    }
    found
}

/// Where the relay will send its answer to `msg` arriving from `source`, by the rules it uses
/// itself: the transport stamps `received`/`rport` (`stamp_via`), then answers go per the top Via
/// (`response_target`), or to the packet's source when the top Via cannot be read. `None` when
/// it will not answer: a parse error without the headers to answer with, or a response whose top
/// Via is not the relay's (dropped, RFC 3261 §18.1.2). A response whose top Via is the relay's
/// would be forwarded: refused outright.
fn answer_target(msg: &[u8], source: Target, relay: SocketAddr) -> Result<Option<Target>, String> {
    let mut headers = match message::parse(msg, &Limits::UDP) {
        Ok(Message::Request(req)) => req.headers,
        Ok(Message::Response(resp)) => {
            let top = resp.top_via().map_err(|e| e.to_string())?;
            let own = top.host.parse::<std::net::IpAddr>().ok() == Some(relay.ip())
                && top.port.unwrap_or(5060) == relay.port();
            if own {
                return Err("a response with the relay's Via on top would be forwarded".into());
            }
            return Ok(None);
        }
        Err(e) => match e.answerable {
            Some(h) => h,
            None => return Ok(None),
        },
    };
    stamp_via(&mut headers, &source);
    // A top Via that does not parse: the relay answers the packet's source.
    Ok(Some(
        message::top_via(&headers).map_or(source, |via| response_target(&via, &source)),
    ))
}

/// First value of a header, read from raw text (long name or compact form), trimmed.
fn raw_header(msg: &[u8], names: &[&str]) -> Option<String> {
    let text = String::from_utf8_lossy(msg);
    for line in text.split("\r\n").skip(1) {
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if names.iter().any(|n| name.trim().eq_ignore_ascii_case(n)) {
                return Some(value.trim().to_string());
            }
        }
    }
    None
}

fn call_id(msg: &[u8]) -> Option<String> {
    raw_header(msg, &["Call-ID", "i"])
}

/// Collects what the relay sends to a UDP socket: until a final answer plus [`AFTER_FINAL`], or
/// [`MAX_WAIT`] without one.
async fn collect_udp(sock: &UdpSocket) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut final_at = None;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let deadline = final_at.map_or(start + MAX_WAIT, |t: Instant| t + AFTER_FINAL);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                let msg = buf.get(..n).unwrap_or_default().to_vec();
                if final_at.is_none() && status_code(&msg).is_none_or(|s| s >= 200) {
                    final_at = Some(Instant::now());
                }
                out.push(msg);
            }
            _ => break,
        }
    }
    out
}

/// The same over a TCP connection, cutting the stream into messages with the relay's framing.
async fn collect_tcp(stream: &mut TcpStream) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut final_at = None;
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16_384];
    loop {
        loop {
            match message::frame_stream(&buf, 65_535) {
                Frame::Message(n) => {
                    let msg: Vec<u8> = buf.drain(..n).collect();
                    if final_at.is_none() && status_code(&msg).is_none_or(|s| s >= 200) {
                        final_at = Some(Instant::now());
                    }
                    out.push(msg);
                }
                Frame::Keepalive { len, .. } => {
                    buf.drain(..len);
                }
                Frame::Incomplete => break,
                Frame::Invalid(_) => {
                    out.push(std::mem::take(&mut buf));
                    return out;
                }
            }
        }
        let deadline = final_at.map_or(start + MAX_WAIT, |t: Instant| t + AFTER_FINAL);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            _ => break,
        }
    }
    if !buf.is_empty() {
        out.push(buf);
    }
    out
}

/// What happened to one case.
#[derive(Debug)]
struct Outcome {
    file: &'static str,
    expect: Expect,
    why: &'static str,
    /// Statuses received, in order ("silence" when none).
    observed: String,
    verdict: Result<(), String>,
    note: Option<String>,
}

fn summarize(replies: &[Vec<u8>]) -> String {
    if replies.is_empty() {
        return "silence".into();
    }
    replies
        .iter()
        .map(|r| status_code(r).map_or_else(|| "non-response".to_string(), |s| s.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Judges the answers to `sent` against what the case expects.
fn judge(case: &Case, sent: &[u8], replies: &[Vec<u8>]) -> (Result<(), String>, Option<String>) {
    let want = match case.expect {
        Expect::Silent => {
            return if replies.is_empty() {
                (Ok(()), None)
            } else {
                (Err("expected silence".into()), None)
            };
        }
        Expect::Ideally(s) if replies.is_empty() => {
            return (Ok(()), Some(format!("silent; RFC 4475 says ideally {s}")));
        }
        Expect::Status(s) | Expect::Ideally(s) => s,
    };
    if replies.is_empty() {
        return (Err(format!("no answer within {MAX_WAIT:?}")), None);
    }
    let mut finals = Vec::new();
    for r in replies {
        let Some(status) = status_code(r) else {
            return (Err("a datagram that is not a response".into()), None);
        };
        if status >= 200 {
            finals.push((status, r));
        }
    }
    let Some(&(first, first_msg)) = finals.first() else {
        return (Err("no final answer".into()), None);
    };
    if first != want {
        let line =
            String::from_utf8_lossy(first_msg.split(|b| *b == b'\r').next().unwrap_or_default())
                .into_owned();
        return (Err(format!("answered {line:?}")), None);
    }
    if let Some((other, _)) = finals.iter().find(|(s, _)| *s != first) {
        return (
            Err(format!("a second, different final answer {other}")),
            None,
        );
    }
    let sent_id = call_id(sent);
    if let Some(r) = replies.iter().find(|r| call_id(r) != sent_id) {
        return (
            Err(format!(
                "an answer for another message: Call-ID {:?}, sent {sent_id:?}",
                call_id(r)
            )),
            None,
        );
    }
    let need = |name: &str, contains: &str| -> Result<(), String> {
        match raw_header(first_msg, &[name]) {
            Some(v) if v.contains(contains) => Ok(()),
            other => Err(format!(
                "{name} is {other:?}, wanted it to hold {contains:?}"
            )),
        }
    };
    let extra = match (want, case.file) {
        (420, "bext01") => need("Unsupported", "noProxiesSupportThis"),
        (401, _) => need("WWW-Authenticate", "Digest"),
        (407, _) => need("Proxy-Authenticate", "Digest"),
        (420, _) => need("Unsupported", ""),
        _ => Ok(()),
    };
    (extra, None)
}

/// Rewrites, checks and sends one case, and judges what comes back.
async fn run_case(
    case: Case,
    raw: Vec<u8>,
    relay: SocketAddr,
    silent: SocketAddr,
    strict: bool,
) -> Outcome {
    let (verdict, observed, note) = match send_case(&case, &raw, relay, silent, strict).await {
        Ok((sent, replies)) => {
            let (verdict, note) = judge(&case, &sent, &replies);
            (verdict, summarize(&replies), note)
        }
        Err(e) => (Err(e), "not sent".to_string(), None),
    };
    Outcome {
        file: case.file,
        expect: case.expect,
        why: case.why,
        observed,
        verdict,
        note,
    }
}

async fn send_case(
    case: &Case,
    raw: &[u8],
    relay: SocketAddr,
    silent: SocketAddr,
    strict: bool,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), String> {
    let e = |e: std::io::Error| e.to_string();
    match case.over {
        Over::Udp => {
            let sock = UdpSocket::bind("127.0.0.1:0").await.map_err(e)?;
            let local = sock.local_addr().map_err(e)?;
            let msg = prepare(case, raw, Target::udp(local), relay, silent, strict)?;
            sock.send_to(&msg, relay).await.map_err(e)?;
            Ok((msg.clone(), collect_udp(&sock).await))
        }
        Over::Tcp => {
            let mut stream = TcpStream::connect(relay).await.map_err(e)?;
            let local = stream.local_addr().map_err(e)?;
            let msg = prepare(case, raw, Target::tcp(local), relay, silent, strict)?;
            stream.write_all(&msg).await.map_err(e)?;
            Ok((msg.clone(), collect_tcp(&mut stream).await))
        }
    }
}

/// Files whose bytes after the first blank line are trailing noise rather than a body counted
/// by Content-Length, so rewriting may change their length.
const TRAILING_NOISE: &[&str] = &["dblreq.dat"];

/// The message to send for a case: rewritten, with its body length untouched (the RFC 4475
/// files are bit-exact: Content-Length is never recomputed), naming no host outside loopback
/// when `strict` (no loopback port but the test's either way), and answered (if at all) to the
/// test's own socket.
fn prepare(
    case: &Case,
    raw: &[u8],
    source: Target,
    relay: SocketAddr,
    silent: SocketAddr,
    strict: bool,
) -> Result<Vec<u8>, String> {
    let vars = Vars {
        local: source.addr,
        silent,
        relay,
    };
    let msg = apply_rewrite(raw, &case.rewrite, &vars)?;
    if !TRAILING_NOISE.contains(&case.file) && tail(&msg).len() != tail(raw).len() {
        return Err(format!(
            "rewrite table changed the body length ({} → {})",
            tail(raw).len(),
            tail(&msg).len()
        ));
    }
    let mut foreign = foreign_hosts(&msg, &[source.addr.port(), silent.port(), relay.port()]);
    if !strict {
        foreign.retain(|f| f.starts_with("port "));
    }
    if !foreign.is_empty() {
        return Err(format!("rewrite table left foreign hosts: {foreign:?}"));
    }
    check_answer_target(&msg, source, relay)?;
    Ok(msg)
}

fn check_answer_target(msg: &[u8], source: Target, relay: SocketAddr) -> Result<(), String> {
    match answer_target(msg, source, relay)? {
        Some(t) if t.addr != source.addr => Err(format!(
            "refused to send: the relay would answer to {t}, not to the test's {}",
            source.addr
        )),
        _ => Ok(()),
    }
}

/// Runs every case at once (each on its own socket, so retransmitted answers never mix), then
/// reports all mismatches together.
async fn run_table(
    relay: &TestRelay,
    dir: &str,
    cases: Vec<Case>,
    load: fn(&Path) -> anyhow::Result<Vec<u8>>,
    strict: bool,
) -> anyhow::Result<(Vec<Outcome>, UdpSocket)> {
    let silent = UdpSocket::bind("127.0.0.1:0").await?;
    let silent_addr = silent.local_addr()?;
    let mut set = tokio::task::JoinSet::new();
    for case in cases {
        let raw = load(&Path::new(dir).join(case.file))?;
        set.spawn(run_case(case, raw, relay.addr(), silent_addr, strict));
    }
    let mut outcomes = Vec::new();
    while let Some(done) = set.join_next().await {
        outcomes.push(done?);
    }
    outcomes.sort_by_key(|o| o.file);
    Ok((outcomes, silent))
}

/// Prints the outcome table, then fails once with every mismatch, every note printed.
async fn report(
    title: &str,
    relay: &TestRelay,
    outcomes: &[Outcome],
    silent: &UdpSocket,
) -> anyhow::Result<()> {
    eprintln!("== {title}: {} messages", outcomes.len());
    let mut failures = Vec::new();
    for o in outcomes {
        let mark = if o.verdict.is_ok() { "ok  " } else { "FAIL" };
        eprintln!(
            "{mark} {:<30} expect {:<16} got {:<24} {}",
            o.file,
            o.expect.to_string(),
            o.observed,
            o.why
        );
        if let Some(note) = &o.note {
            eprintln!("     note: {note}");
        }
        if let Err(e) = &o.verdict {
            failures.push(format!(
                "{}: expected {} ({}), got {}: {e}",
                o.file, o.expect, o.why, o.observed
            ));
        }
    }
    // Nothing may ever reach the hosts the messages name (Contacts, Routes, …).
    let mut buf = [0u8; 2048];
    if let Ok(Ok((n, from))) =
        tokio::time::timeout(Duration::from_millis(200), silent.recv_from(&mut buf)).await
    {
        failures.push(format!(
            "the relay sent {n} bytes from {from} to a host named in a message: {:?}",
            String::from_utf8_lossy(buf.get(..n.min(120)).unwrap_or_default())
        ));
    }
    // The relay still serves.
    let raw = RawSip::new(relay.addr()).await?;
    raw.send("OPTIONS sip:$RELAY SIP/2.0\nVia: SIP/2.0/UDP $LOCAL;branch=z9hG4bKafter\nMax-Forwards: 70\nFrom: <sip:probe@$LOCAL>;tag=1\nTo: <sip:$RELAY>\nCall-ID: after-corpus\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n").await?;
    match raw.response(5, true).await {
        Ok(r) if r.status == 200 => {}
        other => failures.push(format!(
            "after the corpus, OPTIONS to the relay got {:?}",
            other.map(|r| r.status)
        )),
    }
    let panics = panic_log();
    if panics.relay_panics() > 0 {
        failures.push(format!(
            "{} panic(s) in the relay: {:?}",
            panics.relay_panics(),
            panics.details()
        ));
    }
    assert!(
        failures.is_empty(),
        "{title}: {} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RFC 4475
// ---------------------------------------------------------------------------------------------

/// The RFC 4475 table. Request-URI hosts become `relay.test` (the relay's domain, user parts
/// kept), Via sent-by the test's socket, Contacts and other reachable hosts the silent socket,
/// From hosts (and To hosts of responses) 127.0.0.1. Body addresses 192.0.2.N become 127.0.0.N:
/// same length, still loopback, so Content-Length stays true without being recomputed.
///
/// The relay's rules that decide the status: Proxy-Require → 420; a To tag → in-dialog, 481 for
/// a dialog it does not know; REGISTER → 401 challenge (RFC 3261 §10.3 authenticates before it
/// reads the To); Max-Forwards 0 → 483; any other request for a user of its domain → 407
/// challenge before anything else; parse errors → 400/416/501/505 from the transport, when the
/// request still has a Via, From, To, Call-ID and CSeq to answer with.
#[allow(clippy::too_many_lines)]
fn rfc4475_cases() -> Vec<Case> {
    use Expect::{Ideally, Silent, Status};
    use Over::{Tcp, Udp};
    let mut longreq = case(
        "longreq.dat",
        Tcp,
        Status(407),
        "§3.1.1.7 long values, 34 Vias: well formed; INVITE for a local user → proxy auth",
        &[
            ("INVITE sip:user@example.com", "INVITE sip:user@relay.test"),
            ("<sip:user@example.com:6000", "<sip:user@relay.test:6000"),
            ("callername@example.net", "callername@127.0.0.1"),
            ("TCP sip33.example.com", "TCP $LOCAL"),
            (
                "host.example.com;received=192.0.2.5;",
                "$SILENT;received=127.0.0.1;",
            ),
            ("@host5.example.net>", "@$SILENT>"),
            ("192.0.2.", "127.0.0."),
        ],
    );
    for n in 1..=32 {
        longreq.rewrite.insert(
            4,
            (format!("TCP sip{n}.example.com"), "TCP $SILENT".to_string()),
        );
    }
    vec![
        // ---- §3.1.1 valid messages: accepted and handled ----
        case(
            "wsinv.dat",
            Udp,
            Status(481),
            "§3.1.1.1 valid; its To has a tag: an in-dialog INVITE for a dialog the relay never saw",
            &[
                ("sip:vivekg@chair-dnrc.example.com", "sip:vivekg@relay.test"),
                ("<sip:jdrosen@example.com> ;", "<sip:jdrosen@$SILENT> ;"),
                ("<sip:jdrosen@example.com>", "<sip:jdrosen@127.0.0.1>"),
                ("192.0.2.2;branch", "$LOCAL;branch"),
                ("<sip:services.example.com;lr", "<sip:$RELAY;lr"),
                ("spindle.example.com", "$SILENT"),
                ("192.168.255.111", "$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "intmeth.dat",
            Tcp,
            Status(501),
            "§3.1.1.2 legal extension method the relay does not implement → 501",
            &[
                (")@example.com SIP/2.0", ")@relay.test SIP/2.0"),
                ("*@example.com>", "*@relay.test>"),
                ("sip:mundane@example.com", "sip:mundane@127.0.0.1"),
                ("host1.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "esc01.dat",
            Udp,
            Status(407),
            "§3.1.1.3 valid escapes; INVITE for a local user → proxy auth",
            &[
                ("@example.net SIP/2.0", "@relay.test SIP/2.0"),
                ("sip:%75se%72@example.com", "sip:%75se%72@relay.test"),
                (
                    "sip:I%20have%20spaces@example.net",
                    "sip:I%20have%20spaces@127.0.0.1",
                ),
                ("host5.example.net;branch", "$LOCAL;branch"),
                ("sip:cal%6Cer@host5.example.net", "sip:cal%6Cer@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "escnull.dat",
            Udp,
            Status(401),
            "§3.1.1.4 %00 in user parts is well formed; REGISTER → registrar challenge",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("null-%00-null@example.com", "null-%00-null@relay.test"),
                ("host5.example.com;branch", "$LOCAL;branch"),
                ("@host5.example.com", "@$SILENT"),
            ],
        ),
        case(
            "esc02.dat",
            Tcp,
            Status(501),
            "§3.1.1.5 RE%47IST%45R is not REGISTER but an unknown method → 501",
            &[
                ("sip:registrar.example.com", "sip:relay.test"),
                ("sip:resource@example.com", "sip:resource@relay.test"),
                ("host.example.com;branch", "$LOCAL;branch"),
                ("@host1.example.com", "@$SILENT"),
                ("@host2.example.com", "@$SILENT"),
                ("@host3.example.com", "@$SILENT"),
            ],
        ),
        case(
            "lwsdisp.dat",
            Udp,
            Status(407),
            "§3.1.1.6 no LWS before < is accepted; OPTIONS for a local user → proxy auth",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.com", "sip:caller@127.0.0.1"),
                ("funky.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        longreq,
        case(
            "dblreq.dat",
            Udp,
            Status(401),
            "§3.1.1.8 the REGISTER is handled, the trailing INVITE octets ignored (no answer for it)",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:j.user@host.example.com", "sip:j.user@$SILENT"),
                ("192.0.2.125;branch", "$LOCAL;branch"),
                ("sip:joe@example.com", "sip:joe@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("192.0.2.15;branch", "$LOCAL;branch"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "semiuri.dat",
            Udp,
            Status(407),
            "§3.1.1.9 user part is `user;par=u@example.net`, host the relay's → proxy auth (a mis-parse gives 403)",
            &[
                ("@example.com SIP/2.0", "@relay.test SIP/2.0"),
                ("sip:j_user@example.com", "sip:j_user@relay.test"),
                ("sip:caller@example.org", "sip:caller@127.0.0.1"),
                ("192.0.2.1;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "transports.dat",
            Udp,
            Status(407),
            "§3.1.1.10 unknown transports in lower Vias are fine; OPTIONS for a local user → proxy auth",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.com", "sip:caller@127.0.0.1"),
                ("t1.example.com;branch", "$LOCAL;branch"),
                ("t2.example.com", "$SILENT"),
                ("t3.example.com", "$SILENT"),
                ("t4.example.com", "$SILENT"),
                ("t5.example.com", "$SILENT"),
            ],
        ),
        case(
            "mpart01.dat",
            Udp,
            Status(407),
            "§3.1.1.11 multipart body with NULs framed by Content-Length; MESSAGE for a local user → proxy auth",
            &[
                ("127.0.0.1:5070;branch", "$LOCAL;branch"),
                ("<sip:127.0.0.1:5080>", "<sip:$RELAY>"),
                ("sip:fluffy@127.0.0.1:5070", "sip:fluffy@$SILENT"),
                ("sip:kumiko@example.org", "sip:kumiko@relay.test"),
                ("sip:fluffy@example.com", "sip:fluffy@127.0.0.1"),
            ],
        ),
        case(
            "unreason.dat",
            Udp,
            Silent,
            "§3.1.1.12 valid response matching no transaction, Via not the relay's → discarded (RFC 3261 §18.1.2)",
            &[
                ("192.0.2.198;branch", "$LOCAL;branch"),
                ("sip:user@example.com", "sip:user@127.0.0.1"),
                ("sip:user@example.edu", "sip:user@127.0.0.1"),
                ("sip:user@host198.example.com", "sip:user@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "noreason.dat",
            Udp,
            Silent,
            "§3.1.1.13 valid response matching no transaction → discarded",
            &[
                ("192.0.2.105;branch", "$LOCAL;branch"),
                ("<sip:user@example.com>", "<sip:user@127.0.0.1>"),
                ("<sip:user@example.edu>", "<sip:user@127.0.0.1>"),
                ("sip:user@host105.example.com", "sip:user@$SILENT"),
            ],
        ),
        // ---- §3.1.2 invalid messages: 400 for requests, dropped responses ----
        case(
            "badinv01.dat",
            Udp,
            Status(400),
            "§3.1.2.1 empty Via/Contact parameters: \"should respond with a 400\"",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("192.0.2.15;;,;,,", "$LOCAL;;,;,,"),
                ("sip:joe@example.org", "sip:joe@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "clerr.dat",
            Udp,
            Status(400),
            "§3.1.2.2 Content-Length beyond the datagram → 400",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("sip:caller@hungry.example.net", "sip:caller@$SILENT"),
                ("host5.example.com;branch", "$LOCAL;branch"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "ncl.dat",
            Udp,
            Status(400),
            "§3.1.2.3 negative Content-Length → an error",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("192.0.2.53;branch", "$LOCAL;branch"),
                ("sip:caller@example53.example.net", "sip:caller@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "scalar02.dat",
            Tcp,
            Status(400),
            "§3.1.2.4 CSeq beyond 2**32-1 → 400",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("host129.example.com;branch", "$LOCAL;branch"),
                ("<sip:user@example.com>", "<sip:user@relay.test>"),
                ("<sip:user@host129.example.com>", "<sip:user@$SILENT>"),
            ],
        ),
        case(
            "scalarlg.dat",
            Udp,
            Silent,
            "§3.1.2.5 response with overlarge scalars → discarded",
            &[
                ("host129.example.com;branch", "$LOCAL;branch"),
                ("received=192.0.2.129", "received=127.0.0.1"),
                ("<sip:user@example.com>", "<sip:user@127.0.0.1>"),
                ("<sip:other@example.net>", "<sip:other@127.0.0.1>"),
            ],
        ),
        case(
            "quotbal.dat",
            Udp,
            Status(400),
            "§3.1.2.6 unterminated quoted display name → 400",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("sip:caller@host59.example.net", "sip:caller@$SILENT"),
                ("192.0.2.59:5050", "$LOCAL"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "ltgtruri.dat",
            Udp,
            Status(400),
            "§3.1.2.7 Request-URI in <> → 400",
            &[
                ("<sip:user@example.com>", "<sip:user@relay.test>"),
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("UDP 192.0.2.5\r\n", "UDP $LOCAL\r\n"),
                ("sip:caller@host5.example.net", "sip:caller@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "lwsruri.dat",
            Udp,
            Status(400),
            "§3.1.2.8 LWS inside the Request-URI → 400",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("192.0.2.1:5060", "$LOCAL"),
                ("sip:caller@host1.example.net", "sip:caller@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "lwsstart.dat",
            Udp,
            Status(400),
            "§3.1.2.9 several SP between request-line elements → rejecting is acceptable",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("host1.example.com;branch", "$LOCAL;branch"),
                ("sip:caller@host1.example.net", "sip:caller@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "trws.dat",
            Tcp,
            Status(400),
            "§3.1.2.10 SP after the SIP-Version → rejecting is acceptable",
            &[
                (
                    "sip:remote-target@example.com",
                    "sip:remote-target@relay.test",
                ),
                ("host1.examle.com;branch", "$LOCAL;branch"),
                (
                    "sip:local-resource@example.com",
                    "sip:local-resource@127.0.0.1",
                ),
            ],
        ),
        case(
            "escruri.dat",
            Udp,
            Status(400),
            "§3.1.2.11 escaped headers in the Request-URI → 400 is acceptable",
            &[
                (
                    "sip:user@example.com?Route=%3Csip:example.com%3E",
                    "sip:user@relay.test?Route=%3Csip:$SILENT%3E",
                ),
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("sip:caller@host39923.example.net", "sip:caller@$SILENT"),
                ("host-of-the-hour.example.com;branch", "$LOCAL;branch"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "baddate.dat",
            Udp,
            Status(407),
            "§3.1.2.12 non-GMT Date: shouldn't be rejected when the Date does not matter; INVITE → proxy auth",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("host.example.com;branch", "$LOCAL;branch"),
                ("sip:caller@host5.example.net", "sip:caller@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "regbadct.dat",
            Udp,
            Status(400),
            "§3.1.2.13 Contact URI with headers not in <> → 400 is reasonable",
            &[
                (
                    "Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E",
                    "Contact: sip:user@$SILENT?Route=%3Csip:$SILENT%3E",
                ),
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("sip:user@example.com", "sip:user@relay.test"),
                ("135.180.130.133:5060", "$LOCAL"),
            ],
        ),
        case(
            "badaspec.dat",
            Udp,
            Status(400),
            "§3.1.2.14 spaces inside the To addr-spec → 400 is reasonable",
            &[
                (
                    "OPTIONS sip:user@example.org",
                    "OPTIONS sip:user@relay.test",
                ),
                ("host4.example.com:5060", "$LOCAL"),
                ("sip:a.g.bell@example.com", "sip:a.g.bell@127.0.0.1"),
                ("sip:t.watson@example.org", "sip:t.watson@relay.test"),
            ],
        ),
        case(
            "baddn.dat",
            Udp,
            Status(400),
            "§3.1.2.15 unquoted non-token display names → 400 is reasonable",
            &[
                (
                    "OPTIONS sip:t.watson@example.org",
                    "OPTIONS sip:t.watson@relay.test",
                ),
                ("c.example.com:5060", "$LOCAL"),
                ("sip:a.g.bell@example.com", "sip:a.g.bell@127.0.0.1"),
                ("<sip:t.watson@example.org>", "<sip:t.watson@relay.test>"),
            ],
        ),
        case(
            "badvers.dat",
            Udp,
            Status(505),
            "§3.1.2.16 SIP/7.0: \"should respond … with a 505 Version Not Supported\"",
            &[
                ("sip:t.watson@example.org", "sip:t.watson@relay.test"),
                ("c.example.com;branch", "$LOCAL;branch"),
                ("sip:a.g.bell@example.com", "sip:a.g.bell@127.0.0.1"),
            ],
        ),
        case(
            "mismatch01.dat",
            Udp,
            Status(400),
            "§3.1.2.17 CSeq method differs from the request method → 400",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("host.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "mismatch02.dat",
            Udp,
            Status(400),
            "§3.1.2.18 unknown method and CSeq mismatch: 501 preferred, 400 acceptable",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("sip:caller@host.example.net", "sip:caller@$SILENT"),
                ("host.example.net;branch", "$LOCAL;branch"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "bigcode.dat",
            Udp,
            Silent,
            "§3.1.2.19 response code beyond 699 → dropped",
            &[
                ("192.0.2.105;branch", "$LOCAL;branch"),
                ("<sip:user@example.com>", "<sip:user@127.0.0.1>"),
                ("<sip:user@example.edu>", "<sip:user@127.0.0.1>"),
                ("sip:user@host105.example.com", "sip:user@$SILENT"),
            ],
        ),
        // ---- §3.2 transaction layer ----
        case(
            "badbranch.dat",
            Udp,
            Status(407),
            "§3.2.1 branch is just the magic cookie: handled (keyed on it); OPTIONS for a local user → proxy auth",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.org", "sip:caller@127.0.0.1"),
                ("192.0.2.1;branch", "$LOCAL;branch"),
            ],
        ),
        // ---- §3.3 application layer ----
        case(
            "insuf.dat",
            Udp,
            Ideally(400),
            "§3.3.1 no To/From/Call-ID: \"must not break … Ideally, it will respond with a 400\"",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("192.0.2.95;branch", "$LOCAL;branch"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "unkscm.dat",
            Tcp,
            Status(416),
            "§3.3.2 unknown Request-URI scheme → 416 (the To, made the relay's domain here, must not route it)",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("host9.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "novelsc.dat",
            Tcp,
            Status(416),
            "§3.3.3 soap.beep Request-URI, never meaningful to the relay → 416",
            &[
                ("soap.beep://192.0.2.103:3002", "soap.beep://$SILENT"),
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("host9.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "unksm2.dat",
            Udp,
            Status(400),
            "§3.3.4 parses; \"a registrar would reject this request with a 400\": its To holds no SIP URI",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("http://www.example.com", "http://127.0.0.1"),
                ("192.0.2.21:5060", "$LOCAL"),
            ],
        ),
        case(
            "bext01.dat",
            Tcp,
            Status(420),
            "§3.3.5 420 with Unsupported listing the Proxy-Require features (the relay is a proxy)",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j_user@example.com", "sip:j_user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("fold-and-staple.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "invut.dat",
            Udp,
            Status(407),
            "§3.3.6 unknown body type: a proxy handles it like any INVITE (415 is a UAS's) → proxy auth",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@host5.example.net", "sip:caller@$SILENT"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("somehost.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "regaut01.dat",
            Tcp,
            Status(401),
            "§3.3.7 unknown Authorization scheme: a registrar that authenticates answers 401 with its own challenge",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("sip:j.user@example.com", "sip:j.user@relay.test"),
                ("192.0.2.253;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "multi01.dat",
            Udp,
            Status(400),
            "§3.3.8 several values in single-value header fields → 400",
            &[
                ("sip:user@company.com", "sip:user@relay.test"),
                ("sip:caller@host25.example.net", "sip:caller@$SILENT"),
                ("192.0.2.25;branch", "$LOCAL;branch"),
                ("sip:caller@example.com", "sip:caller@127.0.0.1"),
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:other@example.net", "sip:other@127.0.0.1"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("sip:caller@host36.example.net", "sip:caller@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "mcl01.dat",
            Udp,
            Status(400),
            "§3.3.9 two different Content-Length values → an error",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("host5.example.net;branch", "$LOCAL;branch"),
                ("sip:other@example.net", "sip:other@127.0.0.1"),
            ],
        ),
        case(
            "bcast.dat",
            Udp,
            Silent,
            "§3.3.10 never forwarded to the broadcast Via (kept as 127.255.255.255, loopback's broadcast); top Via not the relay's → dropped",
            &[
                ("192.0.2.198;branch", "$LOCAL;branch"),
                ("255.255.255.255", "127.255.255.255"),
                ("sip:user@example.com", "sip:user@127.0.0.1"),
                ("sip:user@example.edu", "sip:user@127.0.0.1"),
                ("sip:user@host28.example.com", "sip:user@$SILENT"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        case(
            "zeromf.dat",
            Udp,
            Status(483),
            "§3.3.11 Max-Forwards 0 at a proxy → 483 Too Many Hops",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("host1.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "cparam01.dat",
            Udp,
            Status(401),
            "§3.3.12 the REGISTER should succeed; the registrar challenges first",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("saturn.example.com:5060", "$LOCAL"),
                ("sip:watson@example.com", "sip:watson@relay.test"),
                ("@gw1.example.net", "@$SILENT"),
            ],
        ),
        case(
            "cparam02.dat",
            Udp,
            Status(401),
            "§3.3.13 the REGISTER should succeed; the registrar challenges first",
            &[
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("saturn.example.com:5060", "$LOCAL"),
                ("sip:watson@example.com", "sip:watson@relay.test"),
                ("@gw1.example.net", "@$SILENT"),
            ],
        ),
        case(
            "regescrt.dat",
            Udp,
            Status(401),
            "§3.3.14 escaped header in a <> Contact is valid; the registrar challenges first",
            &[
                (
                    "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>",
                    "<sip:user@$SILENT?Route=%3Csip:$SILENT%3E>",
                ),
                ("REGISTER sip:example.com", "REGISTER sip:relay.test"),
                ("sip:user@example.com", "sip:user@relay.test"),
                ("host5.example.com;branch", "$LOCAL;branch"),
            ],
        ),
        case(
            "sdp01.dat",
            Udp,
            Status(407),
            "§3.3.15 Accept without SDP concerns a UAS; a proxy handles the INVITE → proxy auth",
            &[
                ("sip:user@example.com", "sip:user@relay.test"),
                ("sip:j_user@example.com", "sip:j_user@relay.test"),
                ("sip:caller@host15.example.net", "sip:caller@$SILENT"),
                ("sip:caller@example.net", "sip:caller@127.0.0.1"),
                ("192.0.2.15;branch", "$LOCAL;branch"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        // ---- §3.4 backward compatibility ----
        case(
            "inv2543.dat",
            Udp,
            Status(407),
            "§3.4.1 RFC 2543 syntax (no branch, no tag, no Max-Forwards) accepted; INVITE → proxy auth",
            &[
                (
                    "sip:UserB@example.com;maddr=ss1.example.com",
                    "sip:UserB@$SILENT;maddr=127.0.0.1",
                ),
                ("sip:UserB@example.com", "sip:UserB@relay.test"),
                ("iftgw.example.com", "$LOCAL"),
                ("@ift.client.example.net", "@127.0.0.1"),
                ("@ss1.example.net", "@127.0.0.1"),
                ("192.0.2.", "127.0.0."),
            ],
        ),
        // ---- not in the RFC ----
        case(
            "test.dat",
            Udp,
            Silent,
            "in the archive, referenced by no section: no SIP-Version and no Via, nothing to answer to",
            &[
                ("sip:alan@jasomi.com", "sip:alan@relay.test"),
                ("alan@jasomi.com", "alan@relay.test"),
                ("ralph@example.com", "ralph@127.0.0.1"),
            ],
        ),
    ]
}

fn read_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc4475_torture_messages() -> anyhow::Result<()> {
    panic_log();
    let relay = TestRelay::start(Db::Sqlite).await?;
    let cases = rfc4475_cases();
    // The table covers the whole archive, once each.
    let mut on_disk: Vec<String> = std::fs::read_dir(RFC4475_DIR)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".dat"))
        .collect();
    on_disk.sort();
    let mut in_table: Vec<String> = cases.iter().map(|c| c.file.to_string()).collect();
    in_table.sort();
    assert_eq!(on_disk.len(), 50, "the RFC 4475 archive has 50 files");
    assert_eq!(in_table, on_disk, "the table covers every file once");

    let (outcomes, silent) = run_table(&relay, RFC4475_DIR, cases, read_bytes, true).await?;
    report("RFC 4475", &relay, &outcomes, &silent).await?;
    relay.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RFC 5118
// ---------------------------------------------------------------------------------------------

/// RFC 5118 files use bare LF, and some SDP cases carry a wrong Content-Length: CRLF line ends,
/// a final blank line where missing, Content-Length recomputed (as the corpus README says).
fn rfc5118_wire(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = String::from_utf8(read_bytes(path)?)?;
    let (head, body) = raw
        .split_once("\n\n")
        .unwrap_or((raw.trim_end_matches('\n'), ""));
    let body = body.replace('\n', "\r\n");
    let head: Vec<String> = head
        .lines()
        .map(|l| {
            if l.starts_with("Content-Length") {
                format!("Content-Length: {}", body.len())
            } else {
                l.to_string()
            }
        })
        .collect();
    Ok(format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes())
}

/// The RFC 5118 table. Only the top Via's sent-by is rewritten (to the test's socket, so answers
/// come back): every other IPv6 or foreign host is the point of the message and stays. That is
/// safe because nothing else can be contacted: each Request-URI names a host the relay does not
/// serve (403, or 407 for an INVITE, which is refused once authenticated; no forwarding: it has
/// no routes) or the request is in-dialog for an unknown dialog
/// (481); the relay resolves no names; its socket is IPv4, so no IPv6 address is reachable from
/// it at all; and the test checks before sending that the answer comes to its own socket. The
/// two messages whose top Via carries a `received` parameter also get `;rport`, so the relay
/// answers the packet's source (RFC 3581) instead of the IPv6 `received` it has parsed.
fn rfc5118_cases() -> Vec<Case> {
    use Expect::Status;
    use Over::Udp;
    vec![
        case(
            "ipv6-good",
            Udp,
            Status(403),
            "§4.1 valid IPv6 references; REGISTER for a domain not served here → 403",
            &[("[2001:db8::9:1];branch", "$LOCAL;branch")],
        ),
        case(
            "ipv6-bad",
            Udp,
            Status(400),
            "§4.2 IPv6 Request-URI host without brackets is invalid → 400",
            &[("[2001:db8::9:1];branch", "$LOCAL;branch")],
        ),
        case(
            "port-ambiguous",
            Udp,
            Status(403),
            "§4.3 valid: [2001:db8::10:5070] is an address, no port; not served here → 403",
            &[("[2001:db8::9:1];branch", "$LOCAL;branch")],
        ),
        case(
            "port-unambiguous",
            Udp,
            Status(403),
            "§4.4 valid: [2001:db8::10]:5070; not served here → 403",
            &[("[2001:db8::9:1];branch", "$LOCAL;branch")],
        ),
        case(
            "via-received-param-with-delim",
            Udp,
            Status(481),
            "§4.5 received=[IPv6] parsed; BYE with a To tag for an unknown dialog → 481",
            &[(
                "[2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3-111",
                "$LOCAL;received=[2001:db8::9:255];branch=z9hG4bKas3-111;rport",
            )],
        ),
        case(
            "via-received-param-no-delim",
            Udp,
            Status(403),
            "§4.5 received=IPv6 without brackets accepted; OPTIONS for a host not served here → 403",
            &[(
                "[2001:db8::9:1];received=2001:db8::9:255;branch=z9hG4bKas3",
                "$LOCAL;received=2001:db8::9:255;branch=z9hG4bKas3;rport",
            )],
        ),
        case(
            "ipv6-in-sdp",
            Udp,
            Status(407),
            "§4.6 IPv6 in SDP is the body's business; an INVITE for a host not served here is challenged (refused once authenticated) → 407",
            &[("[2001:db8::20];branch", "$LOCAL;branch")],
        ),
        case(
            "mult-ip-in-header",
            Udp,
            Status(481),
            "§4.7 mixed IPv4/IPv6 Vias parsed; BYE with a To tag for an unknown dialog → 481",
            &[("[2001:db8::9:1]:6050;branch", "$LOCAL;branch")],
        ),
        case(
            "mult-ip-in-sdp",
            Udp,
            Status(407),
            "§4.8 several SDP addresses; an INVITE for a host not served here is challenged → 407",
            &[("[2001:db8::9:1];branch", "$LOCAL;branch")],
        ),
        case(
            "ipv4-mapped-ipv6",
            Udp,
            Status(407),
            "§4.9 IPv4-mapped IPv6 references parsed; an INVITE for example.com, not served here, is challenged → 407",
            &[("[::ffff:192.0.2.10]:19823;branch", "$LOCAL;branch")],
        ),
        case(
            "ipv6-bug-abnf-3-colons",
            Udp,
            Status(400),
            "§4.10 2001:db8:::192.0.2.1 is no IPv6 address → 400",
            &[("lab1.east.example.com;branch", "$LOCAL;branch")],
        ),
        case(
            "ipv6-correct-abnf-2-colons",
            Udp,
            Status(403),
            "§4.10 2001:db8::192.0.2.1 is valid; OPTIONS for a host not served here → 403",
            &[("lab1.east.example.com;branch", "$LOCAL;branch")],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc5118_ipv6_messages() -> anyhow::Result<()> {
    panic_log();
    let relay = TestRelay::start(Db::Sqlite).await?;
    let cases = rfc5118_cases();
    assert_eq!(
        std::fs::read_dir(RFC5118_DIR)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != "README.md")
            .count(),
        cases.len(),
        "the table covers every RFC 5118 file"
    );
    // These keep their IPv6 hosts (see `rfc5118_cases`): only the loopback-port check applies.
    let (outcomes, silent) = run_table(&relay, RFC5118_DIR, cases, rfc5118_wire, false).await?;
    report("RFC 5118", &relay, &outcomes, &silent).await?;
    relay.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// PROTOS c07-sip
// ---------------------------------------------------------------------------------------------

/// A PROTOS case file: messages, each preceded by its length in bytes and a space.
fn protos_messages(data: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.iter().all(u8::is_ascii_whitespace) {
        let sp = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| anyhow::anyhow!("no length prefix"))?;
        let n: usize = std::str::from_utf8(rest.get(..sp).unwrap_or_default())?
            .trim()
            .parse()?;
        let msg = rest
            .get(sp + 1..sp + 1 + n)
            .ok_or_else(|| anyhow::anyhow!("message shorter than its length prefix"))?;
        out.push(msg);
        rest = rest.get(sp + 1 + n..).unwrap_or_default();
    }
    Ok(out)
}

/// Fills a PROTOS template: the callee is bob at the relay's domain, the caller the test's
/// socket, the teardown a CANCEL, Content-Length the body's length after substitution.
fn protos_fill(template: &[u8], case: &str, local: SocketAddr) -> Vec<u8> {
    let from = local.to_string();
    let ip = local.ip().to_string();
    let port = local.port().to_string();
    let call_id = format!("protos-{case}");
    let branch = format!("-{case}");
    let mut msg = template.to_vec();
    for (placeholder, value) in [
        ("<To>", "bob@relay.test"),
        ("<From>", from.as_str()),
        ("<From-Address>", ip.as_str()),
        ("<From-IP>", ip.as_str()),
        ("<Local-Port>", port.as_str()),
        ("<Branch-ID>", branch.as_str()),
        ("<Call-ID>", call_id.as_str()),
        ("<CSeq>", "1"),
        ("<Teardown-Method>", "CANCEL"),
    ] {
        msg = replace_bytes(&msg, placeholder.as_bytes(), value.as_bytes()).0;
    }
    let body_len = tail(&msg).len().to_string();
    replace_bytes(&msg, b"<Content-Length>", body_len.as_bytes()).0
}

/// Receives whatever has arrived, until `quiet` passes without a datagram or `cap` is reached,
/// counting statuses (0 for anything that is not a response).
async fn drain_counting(
    sock: &UdpSocket,
    quiet: Duration,
    cap: Duration,
    counts: &mut BTreeMap<u16, usize>,
) {
    let end = Instant::now() + cap;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = end.saturating_duration_since(Instant::now()).min(quiet);
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                let status = status_code(buf.get(..n).unwrap_or_default()).unwrap_or(0);
                *counts.entry(status).or_default() += 1;
            }
            _ => break,
        }
    }
}

/// Sends one message on a new TCP connection and reads until the relay closes it (or 2 s).
async fn send_over_tcp(relay: std::net::SocketAddr, msg: &[u8]) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(relay).await?;
    // The relay may close as soon as the cap is crossed; a reset while writing is fine.
    let _ = tcp.write_all(msg).await;
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
    }
    Ok(())
}

/// The largest UDP payload over IPv4.
const UDP_MAX: usize = 65_507;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protos_c07_sip_suite() -> anyhow::Result<()> {
    let panics = panic_log();
    let relay = TestRelay::start(Db::Sqlite).await?;
    relay.add_user("alice", "alice-pw").await?;
    relay.add_user("bob", "bob-pw").await?;
    let raw = RawSip::new(relay.addr()).await?;
    let local = raw.local();
    let source = Target::udp(local);

    let mut files: Vec<PathBuf> = std::fs::read_dir(PROTOS_DIR)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4527, "PROTOS c07-sip has 4527 cases");

    let started = Instant::now();
    let mut counts = BTreeMap::new();
    let (mut sent, mut too_large) = (0usize, 0usize);
    let (mut other_port, mut outside) = (std::collections::BTreeSet::new(), Vec::new());
    for batch in files.chunks(50) {
        for path in batch {
            let data = read_bytes(path)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let messages = protos_messages(&data)?;
            assert_eq!(messages.len(), 2, "{name}: an INVITE and its teardown");
            for template in messages {
                let msg = protos_fill(template, &name, local);
                if msg.len() > UDP_MAX {
                    // Too big for a datagram: over TCP, where the relay's size cap must close
                    // the connection cleanly.
                    too_large += 1;
                    send_over_tcp(relay.addr(), &msg).await?;
                    continue;
                }
                // Never send what the relay would answer outside loopback. The Via-port cases
                // (sent-by port 0, 1, 5060, 65535, …) make it answer to other loopback ports,
                // which is harmless: they are sent and counted.
                match answer_target(&msg, source, relay.addr()) {
                    Ok(Some(t)) if t.addr != local && t.addr.ip().is_loopback() => {
                        other_port.insert(format!("{name}→{}", t.addr.port()));
                    }
                    Ok(Some(t)) if t.addr != local => {
                        outside.push(format!("{name}: the relay would answer to {t}"));
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        outside.push(format!("{name}: {e}"));
                        continue;
                    }
                }
                raw.sock.send_to(&msg, relay.addr()).await?;
                sent += 1;
            }
        }
        drain_counting(
            &raw.sock,
            Duration::from_millis(20),
            Duration::from_millis(100),
            &mut counts,
        )
        .await;
    }
    let sending = started.elapsed();

    // (c) No leaked transaction context: all end within 64*T1 (6.4 s) of their last answer.
    let core = relay
        .handle
        .as_ref()
        .map(|h| h.core.clone())
        .ok_or_else(|| anyhow::anyhow!("relay not running"))?;
    let peak = core.live_contexts();
    let deadline = Instant::now() + Duration::from_secs(15);
    while core.live_contexts() > 0 && Instant::now() < deadline {
        drain_counting(
            &raw.sock,
            Duration::from_millis(100),
            Duration::from_millis(100),
            &mut counts,
        )
        .await;
    }
    let left = core.live_contexts();
    let drained = started.elapsed() - sending;
    eprintln!(
        "PROTOS c07-sip: {} files, {sent} messages sent over UDP in {sending:?}, {too_large} \
         over the UDP size limit sent over TCP, {} answered to another loopback port ({}); \
         contexts: {peak} live after sending, {left} after {drained:?}",
        files.len(),
        other_port.len(),
        other_port.iter().cloned().collect::<Vec<_>>().join(" ")
    );
    eprintln!("PROTOS c07-sip answers by status (0 = not a response): {counts:?}");
    assert!(
        outside.is_empty(),
        "messages the relay would answer outside loopback: {outside:?}"
    );
    assert_eq!(
        sent + too_large,
        2 * files.len(),
        "every message of every case is sent"
    );
    assert_eq!(
        left, 0,
        "transaction contexts still live 15 s after the run"
    );

    // (a) No panic anywhere in the relay.
    assert_eq!(
        panics.relay_panics(),
        0,
        "panics in the relay: {:?}",
        panics.details()
    );

    // (b) The relay still serves: a real call goes through.
    let mut bob = client(relay.addr(), "bob", "bob-pw", &["register", "--for", "20s"]);
    bob.until(10, |e| matches!(e, Event::Registered { .. }))
        .await?;
    let mut alice = client(
        relay.addr(),
        "alice",
        "alice-pw",
        &["call", "bob", "--for", "200ms"],
    );
    let mut events = Vec::new();
    loop {
        let ev = alice.next(10).await?;
        let end = matches!(ev, Event::Ended { .. });
        events.push(ev);
        if end {
            break;
        }
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Established { status: 200, .. })),
        "the call after the run was not established: {events:?}"
    );
    assert!(
        matches!(
            events.last(),
            Some(Event::Ended {
                status: Some(200),
                ..
            })
        ),
        "the call after the run did not end with a 200 BYE: {events:?}"
    );
    bob.abort();
    assert_eq!(panics.relay_panics(), 0, "{:?}", panics.details());
    relay.stop().await;
    Ok(())
}
