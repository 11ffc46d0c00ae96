//! Test support: a relay in-process on SQLite, the agent in-process, a SIP user agent on a
//! real UDP socket, a raw HTTP client and a one-shot webhook server.
#![allow(dead_code, unreachable_pub)]

use anyhow::{Context as _, anyhow, bail};
use app_server_agent::{AgentHandle, Event, Output, RunArgs};
use bytes::Bytes;
use proto::service::{Assertion, assertion_key};
use proto::sip::dialog::Dialog;
use proto::sip::digest::{self, Algorithm, Challenge};
use proto::sip::message::{self, Headers, Method, Request, Response, Transport, Uri};
use proto::sip::transaction::ClientEvent;
use proto::transport::Target;
use proto::ua::{Endpoint, ServerRequest};
use relay::config::Config;
use relay::serve::RelayHandle;
use relay::store::{Fork, ServiceRow, Store};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub const DOMAIN: &str = "relay.test";
pub const ACCOUNT: &str = "vendor";
pub const PASSWORD: &str = "vendor-secret";
pub const URL: &str = "https://shop.example/visit";

pub fn init_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A relay with services `wine`, `beer` and `quick` (sessions of at most 1 s), an
/// application-server account `vendor` allowed to deliver `wine` and `quick`, and a user `alice`.
pub struct TestRelay {
    pub handle: Option<RelayHandle>,
    pub store: Store,
    _dir: tempfile::TempDir,
}

impl TestRelay {
    pub async fn start() -> anyhow::Result<TestRelay> {
        Self::start_on("127.0.0.1:0".parse()?).await
    }

    /// A relay on `sip` (a given port: for agents started before their relay).
    pub async fn start_on(sip: SocketAddr) -> anyhow::Result<TestRelay> {
        init_logging();
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("relay.db").display());
        let config = Config {
            sip,
            domain: DOMAIN.into(),
            database_url: url.clone(),
            timer_t1_ms: 100,
            ..Config::default()
        };
        let handle = relay::serve::start(config).await?;
        let store = Store::open(&url).await?;
        for (name, max) in [("wine", None), ("beer", None), ("quick", Some(1))] {
            store
                .add_service(&ServiceRow {
                    name: name.into(),
                    per_minute_minor: 100,
                    setup_fee_minor: 0,
                    increment_secs: 1,
                    currency: "EUR".into(),
                    fork: Fork::First,
                    max_duration_secs: max,
                    max_charge_minor: None,
                    max_session_charges_minor: None,
                    created_at_ms: 0,
                    updated_at_ms: 0,
                })
                .await?;
        }
        store
            .add_appserver(
                ACCOUNT,
                &digest::ha1(Algorithm::Md5, ACCOUNT, DOMAIN, PASSWORD),
                &digest::ha1(Algorithm::Sha256, ACCOUNT, DOMAIN, PASSWORD),
                DOMAIN,
                &["wine".to_string(), "quick".to_string()],
            )
            .await?;
        store
            .add_user(
                "alice",
                &digest::ha1(Algorithm::Md5, "alice", DOMAIN, "alice-pw"),
                &digest::ha1(Algorithm::Sha256, "alice", DOMAIN, "alice-pw"),
                DOMAIN,
            )
            .await?;
        Ok(TestRelay {
            handle: Some(handle),
            store,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle
            .as_ref()
            .map(RelayHandle::sip_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
    }
}

/// The agent's arguments for `relay` plus `extra`.
pub fn args(relay: SocketAddr, extra: &[&str]) -> anyhow::Result<RunArgs> {
    let relay = relay.to_string();
    let mut argv = vec![
        "app-server-agent",
        "--relay",
        &relay,
        "--account",
        ACCOUNT,
        "--password",
        PASSWORD,
        "--domain",
        DOMAIN,
        "--url",
        URL,
        "--http",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    if !extra.contains(&"--service") {
        argv.extend_from_slice(&["--service", "wine"]);
    }
    RunArgs::try_parse_from_args(&argv)
}

/// A running agent and its events.
pub struct Agent {
    pub handle: AgentHandle,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl Agent {
    pub async fn start(relay: SocketAddr, extra: &[&str]) -> anyhow::Result<Agent> {
        let (out, events) = Output::channel();
        let handle = app_server_agent::start_with(args(relay, extra)?, out).await?;
        Ok(Agent { handle, events })
    }

    pub fn http(&self) -> SocketAddr {
        self.handle
            .http_addr()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)))
    }

    pub fn sip(&self) -> Target {
        Target::udp(self.handle.contact_addr())
    }

    /// Skips events until one matches, within `secs`.
    pub async fn until(
        &mut self,
        secs: u64,
        pred: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<Event> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow!("no matching event within {secs} s"))?
                .ok_or_else(|| anyhow!("the agent's events ended"))?;
            if pred(&ev) {
                return Ok(ev);
            }
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key the relay signs `vendor`'s assertions with.
pub fn vendor_key() -> [u8; 32] {
    assertion_key(&digest::ha1(Algorithm::Sha256, ACCOUNT, DOMAIN, PASSWORD))
}

pub fn assertion(call_id: &str, sid: &str) -> Assertion {
    Assertion {
        user: "alice".into(),
        sid: sid.into(),
        service: "wine".into(),
        server: ACCOUNT.into(),
        call_id: call_id.into(),
        detail: Some("red, 2015".into()),
        exp: now_unix() + 60,
    }
}

/// A SIP user agent on 127.0.0.1 (UDP).
pub struct Uac {
    pub ep: Arc<Endpoint>,
    pub incoming: mpsc::UnboundedReceiver<ServerRequest>,
}

/// An INVITE the UAC sent and how it ended.
pub struct Call {
    pub invite: Request,
    pub final_response: Response,
    pub provisional: Vec<u16>,
}

impl Uac {
    pub async fn bind() -> anyhow::Result<Uac> {
        let (ep, incoming) = Endpoint::bind("127.0.0.1:0".parse()?, None).await?;
        Ok(Uac { ep, incoming })
    }

    pub fn contact(&self) -> String {
        format!("<sip:alice@{}>", self.ep.advertised)
    }

    /// An INVITE to `uri` with optional assertion and body.
    pub fn invite(
        &self,
        uri: &str,
        call_id: &str,
        assertion: Option<&str>,
        body: Option<(&str, &str)>,
    ) -> anyhow::Result<Request> {
        let mut headers = Headers::default();
        headers.push("Via", self.ep.via(Transport::Udp).to_string());
        headers.push("Max-Forwards", "70");
        headers.push(
            "From",
            format!("<sip:alice@{DOMAIN}>;tag={}", message::new_tag()),
        );
        let service = uri
            .strip_prefix("sip:")
            .and_then(|u| u.split('@').next())
            .unwrap_or("wine");
        headers.push("To", format!("<sip:{service}@{DOMAIN}>"));
        headers.push("Call-ID", call_id);
        headers.push("CSeq", "1 INVITE");
        headers.push("Contact", self.contact());
        if let Some(a) = assertion {
            headers.push(proto::service::ASSERTION_HEADER, a);
        }
        let mut req = Request {
            method: Method::Invite,
            uri: Uri::parse(uri).map_err(|e| anyhow!("bad URI {uri}: {}", e.reason))?,
            headers,
            body: Bytes::new(),
        };
        if let Some((ct, b)) = body {
            req.headers.push("Content-Type", ct);
            req.body = Bytes::from(b.to_string());
        }
        Ok(req)
    }

    /// A service INVITE for wine, straight to `agent`, with the relay's assertion for
    /// `call_id` (session id `s-CALL_ID`); its final answer.
    pub async fn vouched_call(&self, agent: &Agent, call_id: &str) -> anyhow::Result<Call> {
        let ruri = format!("sip:wine@{}", agent.handle.contact_addr());
        let signed = assertion(call_id, &format!("s-{call_id}")).sign(&vendor_key());
        let invite = self.invite(&ruri, call_id, Some(&signed), None)?;
        self.send(invite, agent.sip(), false).await
    }

    /// Sends a request and waits for its final response (answering one digest challenge as
    /// alice when `auth` is set).
    pub async fn send(&self, mut req: Request, target: Target, auth: bool) -> anyhow::Result<Call> {
        let mut challenged = false;
        loop {
            let mut events = self.ep.request(req.clone(), target);
            let mut provisional = Vec::new();
            let resp = loop {
                match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                    Err(_) => bail!("no final response to {} within 10 s", req.method),
                    Ok(Some(ClientEvent::Provisional(r))) => provisional.push(r.status),
                    Ok(Some(ClientEvent::Final(r))) => break r,
                    Ok(Some(ClientEvent::Terminated)) => {}
                    Ok(other) => bail!("{} ended with {other:?}", req.method),
                }
            };
            if auth && !challenged && matches!(resp.status, 401 | 407) {
                challenged = true;
                let name = if resp.status == 401 {
                    "WWW-Authenticate"
                } else {
                    "Proxy-Authenticate"
                };
                let ch = resp
                    .headers
                    .get_all(name)
                    .find_map(|v| Challenge::parse(v).ok())
                    .context("no challenge")?;
                let value = digest::answer(
                    &ch,
                    "alice",
                    "alice-pw",
                    req.method.as_str(),
                    &req.uri.to_string(),
                    1,
                    "cn0nce",
                );
                let creds = if resp.status == 401 {
                    "Authorization"
                } else {
                    "Proxy-Authorization"
                };
                req.headers.set(creds, value);
                let seq = req.cseq()?.seq + 1;
                req.headers.set("CSeq", format!("{seq} {}", req.method));
                req = self.ep.with_via(req, Transport::Udp);
                continue;
            }
            return Ok(Call {
                invite: req,
                final_response: resp,
                provisional,
            });
        }
    }

    /// ACKs a 2xx; returns the dialog and where in-dialog requests go.
    pub async fn ack(&self, call: &Call) -> anyhow::Result<(Dialog, Target)> {
        let dialog =
            Dialog::uac(&call.invite, &call.final_response).context("no dialog from the 200 OK")?;
        let hop_uri = dialog.next_hop().context("no next hop")?;
        let hop = proto::ua::uri_target(&hop_uri, Transport::Udp).context("no IP next hop")?;
        let seq = call.invite.cseq()?.seq;
        self.ep.send_stateless(dialog.ack(seq), hop).await?;
        Ok((dialog, hop))
    }

    /// Sends a request in the dialog; its final response.
    pub async fn in_dialog(
        &self,
        dialog: &mut Dialog,
        hop: Target,
        method: Method,
    ) -> anyhow::Result<Response> {
        let req = self.ep.with_via(dialog.request(method), Transport::Udp);
        Ok(self.send(req, hop, false).await?.final_response)
    }

    /// The next request the UAC receives, within `secs`.
    pub async fn next_request(&mut self, secs: u64) -> anyhow::Result<ServerRequest> {
        tokio::time::timeout(Duration::from_secs(secs), self.incoming.recv())
            .await
            .map_err(|_| anyhow!("no request within {secs} s"))?
            .ok_or_else(|| anyhow!("endpoint closed"))
    }
}

/// A plain HTTP/1.1 request; the status and the JSON body (Null when not JSON).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, Value)> {
    http_as(addr, &addr.to_string(), method, path, content_type, body).await
}

/// [`http`] with `host` in the Host header.
pub async fn http_as(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, Value)> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// A webhook answering every request with `status` and `answer` after `delay`; the JSON bodies
/// it received come on the channel.
pub async fn webhook(
    status: u16,
    answer: &'static str,
    delay: Duration,
) -> anyhow::Result<(SocketAddr, mpsc::UnboundedReceiver<Value>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if rest.len() >= len {
                            break rest.to_string();
                        }
                    }
                };
                let _ = tx.send(serde_json::from_str(&body).unwrap_or(Value::Null));
                tokio::time::sleep(delay).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((addr, rx))
}
