//! The user agent: registration, calls and service sessions through the relay.
//!
//! The `open` command (service sessions) lives in `agent::open`; what it shares with `call` is
//! here: the INVITE with digest authentication and CANCEL (`Agent::invite`), the next hop of a
//! dialog for its ACK and BYE, Ctrl-C handling (`Interrupt`).

mod open;
mod watch;

use crate::cli::{Cli, Command};
use crate::output::{Event, Output};
use crate::session;
use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use proto::sip::dialog::Dialog;
use proto::sip::digest::Challenge;
use proto::sip::message::{self, Headers, Method, Request, Response, Transport, Uri};
use proto::sip::transaction::ClientEvent;
use proto::transport::Target;
use proto::ua::{self, Credentials, Endpoint, ServerRequest};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The User-Agent header of every request.
const USER_AGENT: &str = concat!("sip-relay client-agent/", env!("CARGO_PKG_VERSION"));

/// How often a client says it is still waiting for the relay.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How long an INVITE waits for any answer (Timer B, 64*T1).
const CALL_GIVE_UP: Duration = Duration::from_secs(32);

/// A client bound to a local port and pointed at one relay.
pub struct Agent {
    ep: Arc<Endpoint>,
    incoming: mpsc::UnboundedReceiver<ServerRequest>,
    relay: Target,
    user: String,
    domain: String,
    out: Output,
    /// The user's credentials for the relay alone: its realm is `--domain`, else learnt from
    /// the relay's first challenge (the relay challenges every request that carries no
    /// credentials before it goes anywhere), so no callee ever gets them.
    creds: Credentials,
    /// Incoming INVITEs left ringing (`--answer ignore`), answered 487 when cancelled.
    ringing: Vec<ServerRequest>,
    /// Calls answered while registered (`--answer accept`) and not yet ended, with the time
    /// each was answered: at the end they are hung up with BYE before unregistering.
    answered: Vec<(Dialog, Instant)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("user", &self.user)
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

/// What became of an answered call while its 2xx was retransmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmed {
    /// The ACK came: the call is up.
    Acked,
    /// 64*T1 passed without an ACK.
    NoAck,
    /// A BYE ended it first (or the agent is stopping).
    Ended,
}

/// How a call attempt ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallResult {
    Completed,
    Failed,
}

/// Where `open` reads its commands (`list`, `close`, `close N`), one a line.
#[derive(Debug)]
pub enum Input {
    /// Standard input, read on a thread of its own; at its end no more commands are read (and
    /// nothing is closed).
    Stdin,
    /// Lines sent by an in-process caller; dropping the sender is the end of input.
    Lines(mpsc::UnboundedReceiver<String>),
}

impl Input {
    fn into_receiver(self) -> mpsc::UnboundedReceiver<String> {
        match self {
            Input::Lines(rx) => rx,
            Input::Stdin => stdin_lines(),
        }
    }
}

/// Lines of standard input on a channel. A plain thread, not tokio's stdin: its blocking read
/// cannot be cancelled and would hold up the runtime's shutdown until the user pressed Enter.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    // If the thread cannot start, `tx` is dropped with the closure: input has ended.
    let _ = std::thread::Builder::new()
        .name("client-agent-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line.clone()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    rx
}

/// Runs the command line, printing events on standard output.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = Output {
        json: cli.json,
        sink: None,
    };
    run_with(cli, out).await
}

/// Runs the command line with events going to `out`; `open` reads its commands on standard input.
pub async fn run_with(cli: Cli, out: Output) -> anyhow::Result<ExitCode> {
    run_with_input(cli, out, Input::Stdin).await
}

/// Runs the command line with events going to `out` and `open`'s commands coming from `input`.
pub async fn run_with_input(cli: Cli, out: Output, input: Input) -> anyhow::Result<ExitCode> {
    // A bad --body-file is the user's mistake: say so before touching the network.
    let body = match &cli.command {
        Command::Open {
            detail, body_file, ..
        } => session::request_body(detail.as_deref(), body_file.as_deref())?,
        _ => None,
    };
    let agent = Agent::connect(&cli, out).await?;
    let ep = agent.ep.clone();
    let result = match cli.command {
        Command::Register {
            expires,
            duration,
            answer,
        } => agent.register_and_stay(expires, duration, &answer).await,
        Command::Call {
            ref target,
            duration,
            ring_timeout,
            wait,
        } => {
            let mut agent = agent;
            let result = agent.call(target, duration, ring_timeout, wait).await?;
            Ok(match result {
                CallResult::Completed => ExitCode::SUCCESS,
                CallResult::Failed => ExitCode::from(2),
            })
        }
        Command::Open {
            service,
            duration,
            browse,
            change_after,
            transfer_after,
            keep,
            wait,
            ..
        } => {
            let mut agent = agent;
            let keep = if keep { " --keep" } else { "" };
            let scripted = change_after
                .into_iter()
                .map(|(after, details)| (after, format!("change {details}")))
                .chain(
                    transfer_after
                        .into_iter()
                        .map(|(after, service)| (after, format!("transfer {service}{keep}"))),
                )
                .collect();
            agent
                .open(open::Options {
                    service,
                    body,
                    duration,
                    browse,
                    input: input.into_receiver(),
                    scripted,
                    wait,
                })
                .await
        }
    };
    // The last thing done may be a 200 for the other side's BYE: it must leave before the
    // program does.
    ep.settle(Duration::from_secs(1)).await;
    result
}

/// The status line an INVITE's outcome tells a referrer.
fn watch_outcome(answer: &InviteAnswer) -> (u16, String) {
    match answer {
        InviteAnswer::Accepted { ok, .. } => (ok.status, ok.reason.clone()),
        InviteAnswer::Rejected { resp, .. } => (resp.status, resp.reason.clone()),
        InviteAnswer::TimedOut { .. } => (408, "Request Timeout".into()),
    }
}

/// At most this many redirects in a row for one INVITE.
const MAX_REDIRECTS: u32 = 5;

/// Methods the agent answers in a dialog.
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE";

/// How long to wait for the final answer after sending CANCEL: 64*T1.
const CANCEL_WAIT: Duration = Duration::from_secs(32);

/// Ctrl-C (or SIGTERM, SIGHUP: `timeout`, a closed terminal, a service manager), as often as
/// it comes. [`Interrupt::next`] can be dropped and called again (in `select!`) without missing
/// one; where signals cannot be caught it never completes.
pub(crate) struct Interrupt {
    signal: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>,
    presses: u32,
}

/// The next SIGINT, SIGTERM or SIGHUP.
async fn any_stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
            _ = hup.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

impl Interrupt {
    pub(crate) fn new() -> Interrupt {
        Interrupt {
            signal: Box::pin(any_stop_signal()),
            presses: 0,
        }
    }

    /// Waits for the next Ctrl-C (or SIGTERM/SIGHUP).
    pub(crate) async fn next(&mut self) {
        match self.signal.as_mut().await {
            Ok(()) => {
                self.presses += 1;
                self.signal = Box::pin(any_stop_signal());
            }
            Err(_) => {
                self.signal = Box::pin(std::future::pending());
                std::future::pending::<()>().await;
            }
        }
    }

    /// How many times Ctrl-C was pressed so far.
    pub(crate) fn presses(&self) -> u32 {
        self.presses
    }
}

/// How an INVITE's first final answer went.
pub(crate) enum InviteAnswer {
    /// A 2xx. `invite` is the request as last sent (with credentials); `events` goes on with the
    /// transaction, which passes up every further 2xx (other forks, retransmissions) until
    /// Timer M. `cancelled`: we had sent CANCEL (Ctrl-C or ring timeout) when it came.
    Accepted {
        invite: Request,
        ok: Response,
        events: mpsc::UnboundedReceiver<ClientEvent>,
        cancelled: bool,
    },
    /// A final failure; `challenged`: credentials had been sent.
    Rejected { resp: Response, challenged: bool },
    /// No final answer (Timer B); `heard` when anything at all came back (a provisional).
    TimedOut { heard: bool },
}

fn parse_relay(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 5060)))
        .map_err(|_| {
            anyhow!(
                "--relay {s:?} is not an IP address with an optional port (e.g. 127.0.0.1:5060)"
            )
        })
}

impl Agent {
    async fn connect(cli: &Cli, out: Output) -> anyhow::Result<Agent> {
        let relay_addr = parse_relay(&cli.relay)?;
        let transport = if cli.transport == "tcp" {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let ip = ua::local_ip_towards(relay_addr).context("no route to the relay")?;
        let bind = cli.bind.unwrap_or(SocketAddr::new(ip, 0));
        let (ep, incoming) = Endpoint::bind(bind, Some(ip))
            .await
            .with_context(|| format!("cannot bind {bind}"))?;
        let domain = cli.domain.clone().unwrap_or_else(|| relay_addr.to_string());
        Ok(Agent {
            ep,
            incoming,
            relay: Target {
                transport,
                addr: relay_addr,
                conn: None,
            },
            user: cli.user.clone(),
            creds: Credentials::new(&cli.user, &cli.password()?, cli.domain.clone()),
            domain,
            out,
            ringing: Vec::new(),
            answered: Vec::new(),
        })
    }

    fn aor(&self) -> String {
        format!("sip:{}@{}", self.user, self.domain)
    }

    fn contact(&self) -> String {
        let a = self.ep.advertised;
        let host = if a.is_ipv6() {
            format!("[{}]", a.ip())
        } else {
            a.ip().to_string()
        };
        let transport = if self.relay.transport == Transport::Tcp {
            ";transport=tcp"
        } else {
            ""
        };
        format!("<sip:{}@{}:{}{}>", self.user, host, a.port(), transport)
    }

    fn new_request(
        &self,
        method: Method,
        uri: &str,
        to: &str,
        call_id: &str,
        seq: u32,
    ) -> anyhow::Result<Request> {
        let uri = Uri::parse(uri).map_err(|e| anyhow!("bad SIP URI {uri:?}: {}", e.reason))?;
        let mut headers = Headers::default();
        headers.push("Via", self.ep.via(self.relay.transport).to_string());
        headers.push("Max-Forwards", "70");
        headers.push(
            "From",
            format!("<{}>;tag={}", self.aor(), message::new_tag()),
        );
        headers.push("To", format!("<{to}>"));
        headers.push("Call-ID", call_id);
        headers.push("CSeq", format!("{seq} {method}"));
        headers.push("Contact", self.contact());
        if method == Method::Invite {
            // What this agent answers within a session (a server changes a session by UPDATE
            // only when the client allows it).
            headers.push("Allow", ALLOW);
        }
        headers.push("User-Agent", USER_AGENT);
        Ok(Request {
            method,
            uri,
            headers,
            body: Bytes::new(),
        })
    }

    /// Adds credentials answering the relay's challenge in `resp` (see [`Credentials`]), with
    /// a new Via; false when the response carries no challenge this request answers.
    fn authorize(&self, req: &mut Request, resp: &Response, answered: &mut u32) -> bool {
        if !self.creds.answer(req, resp, answered) {
            return false;
        }
        *req = self.ep.with_via(req.clone(), self.relay.transport);
        true
    }

    /// The relay's address and transport, as messages name them (`127.0.0.1:5060 over UDP`).
    fn relay_name(&self) -> String {
        format!("{} over {}", self.relay.addr, self.relay.transport)
    }

    /// What to say when the relay never answered `method`.
    fn no_answer(&self, method: Method, waited: Duration) -> anyhow::Error {
        anyhow!(
            "{method}: no answer from the relay at {} after {} s. Is `relay serve` running \
             there, listening on that address and port (--relay IP alone means port 5060), \
             and does a firewall let {} through?",
            self.relay_name(),
            waited.as_secs(),
            self.relay.transport
        )
    }

    /// What to say when `method` could not be sent at all.
    fn unreachable(&self, method: Method) -> anyhow::Error {
        anyhow!(
            "{method}: cannot reach the relay at {}: nothing accepts connections there \
             (is `relay serve` running with --sip on that address and port?)",
            self.relay_name()
        )
    }

    /// The next event of a client transaction, saying every few seconds that we are still
    /// waiting for the relay.
    async fn next_event(
        &self,
        events: &mut mpsc::UnboundedReceiver<ClientEvent>,
        method: Method,
        since: Instant,
    ) -> Option<ClientEvent> {
        loop {
            tokio::select! {
                ev = events.recv() => return ev,
                _ = tokio::time::sleep(PROGRESS_EVERY) => self.out.emit(&Event::Note {
                    message: format!(
                        "{method}: still waiting for the relay at {} ({} s)",
                        self.relay_name(),
                        since.elapsed().as_secs()
                    ),
                }),
            }
        }
    }

    /// Sends a non-INVITE request, answering the relay's challenge (again only for a stale
    /// nonce); returns the final response.
    async fn send(&self, mut req: Request) -> anyhow::Result<Response> {
        let mut answered = 0;
        let since = Instant::now();
        loop {
            let mut events = self.ep.request(req.clone(), self.relay);
            let resp = loop {
                match self.next_event(&mut events, req.method, since).await {
                    Some(ClientEvent::Final(r)) => break r,
                    Some(ClientEvent::Timeout) => {
                        return Err(self.no_answer(req.method, since.elapsed()));
                    }
                    Some(ClientEvent::TransportError) => return Err(self.unreachable(req.method)),
                    Some(_) => {}
                    None => bail!("{} ended without an answer", req.method),
                }
            };
            if matches!(resp.status, 401 | 407) && self.authorize(&mut req, &resp, &mut answered) {
                continue;
            }
            return Ok(resp);
        }
    }

    fn failed(&self, request: &str, resp: &Response) {
        let retry_after = session::retry_after(&resp.headers);
        let relay_realm = self.creds.realm();
        // A challenge that is not the relay's: of another realm, or a 401 to anything but a
        // REGISTER (the relay challenges as a proxy there, with 407).
        let foreign_realm = ["WWW-Authenticate", "Proxy-Authenticate"]
            .iter()
            .flat_map(|h| resp.headers.get_all(h))
            .filter_map(|v| Challenge::parse(v).ok())
            .map(|c| c.realm)
            .find(|r| {
                relay_realm.as_deref() != Some(r.as_str())
                    || (resp.status == 401 && request != "REGISTER")
            });
        let words = match (resp.status, foreign_realm) {
            (401 | 407, Some(realm)) if request == "REGISTER" => format!(
                "the registrar asked for credentials of realm {realm:?}, not of {:?}: not sent \
                 (if this is your relay, give --domain {realm})",
                relay_realm.unwrap_or_default()
            ),
            (401 | 407, Some(realm)) => format!(
                "the other side asked for credentials (realm {realm:?}): not sent, they are for \
                 the relay alone"
            ),
            _ => match resp.status {
                401 | 407 => "wrong user name or password".to_string(),
                403 => "refused by the relay".to_string(),
                404 => "no such user".to_string(),
                408 => "no answer".to_string(),
                480 => "the callee is not registered".to_string(),
                486 | 600 => "the callee is busy".to_string(),
                487 => "cancelled".to_string(),
                503 if resp.reason == proto::service::STOPPING_REASON => match retry_after {
                    Some(after) => format!("the relay is stopping, retry after {after} s"),
                    None => "the relay is stopping".to_string(),
                },
                503 => match retry_after {
                    Some(after) => format!("service unavailable, retry after {after} s"),
                    None => "service unavailable".to_string(),
                },
                _ => "refused".to_string(),
            },
        };
        self.out.emit(&Event::Failed {
            request: request.to_string(),
            status: resp.status,
            reason: resp.reason.clone(),
            retry_after,
            message: format!(
                "{words} {}",
                session::status_note(resp.status, &resp.reason)
            ),
        });
    }

    async fn register_once(
        &self,
        call_id: &str,
        seq: u32,
        expires: u32,
    ) -> anyhow::Result<Response> {
        let req = proto::ua::Register {
            domain: &self.domain,
            aor: &self.aor(),
            from_tag: &message::new_tag(),
            call_id,
            seq,
            contact: &self.contact(),
            expires,
            via: self.ep.via(self.relay.transport).to_string(),
            user_agent: USER_AGENT,
        }
        .request()
        .map_err(|e| anyhow!("bad registrar URI sip:{}: {}", self.domain, e.reason))?;
        self.send(req).await
    }

    async fn register_and_stay(
        mut self,
        expires: u32,
        duration: Option<Duration>,
        answer: &str,
    ) -> anyhow::Result<ExitCode> {
        let call_id = message::new_call_id();
        let mut seq = 1;
        self.out.emit(&Event::Note {
            message: format!(
                "registering {} with the relay at {}",
                self.aor(),
                self.relay_name()
            ),
        });
        let resp = self.register_once(&call_id, seq, expires).await?;
        if resp.status != 200 {
            self.failed("REGISTER", &resp);
            return Ok(ExitCode::from(2));
        }
        let granted = ua::granted_expires(&resp, &self.contact()).unwrap_or(expires);
        let bindings = resp.headers.get_all("Contact").count();
        self.out.emit(&Event::Registered {
            aor: self.aor(),
            expires: granted,
            bindings,
        });
        if duration == Some(Duration::ZERO) {
            return Ok(ExitCode::SUCCESS);
        }
        let end = duration.map(|d| Instant::now() + d);
        let mut refresh = Instant::now() + ua::refresh_after(granted);
        let mut interrupt = Interrupt::new();
        loop {
            let wake = end.map_or(refresh, |e| e.min(refresh));
            tokio::select! {
                _ = interrupt.next() => break,
                _ = tokio::time::sleep_until(wake.into()) => {
                    if end.is_some_and(|e| Instant::now() >= e) {
                        break;
                    }
                    seq += 2;
                    let Some((granted, _)) = self.reregister(&call_id, seq, expires).await? else {
                        return Ok(ExitCode::from(2));
                    };
                    refresh = Instant::now() + ua::refresh_after(granted);
                }
                req = self.incoming.recv() => {
                    let Some(req) = req else { break };
                    if let Some(to) = self.moved_by_relay(&req) {
                        // `relay drain`: this registration moves to another relay of the
                        // same cluster (RFC 3515 with Refer-Sub: false: no NOTIFY).
                        req.respond(message::make_response(&req.request, 202, None, None));
                        seq += 2;
                        let _ = self.register_once(&call_id, seq, 0).await;
                        let from = self.relay_name();
                        self.relay = to;
                        self.out.emit(&Event::Note {
                            message: format!(
                                "the relay at {from} moves this registration to {}",
                                self.relay_name()
                            ),
                        });
                        seq += 2;
                        let Some((granted, bindings)) =
                            self.reregister(&call_id, seq, expires).await?
                        else {
                            return Ok(ExitCode::from(2));
                        };
                        refresh = Instant::now() + ua::refresh_after(granted);
                        self.out.emit(&Event::Registered {
                            aor: self.aor(),
                            expires: granted,
                            bindings,
                        });
                        continue;
                    }
                    self.answer_incoming(req, answer).await;
                }
            }
        }
        // Calls still up are ended first, while the relay can still reach this device: the
        // caller is told at once and the record gets the call's real duration.
        self.hang_up_answered().await;
        seq += 2;
        let resp = self.register_once(&call_id, seq, 0).await?;
        if resp.status == 200 {
            self.out.emit(&Event::Unregistered { aor: self.aor() });
        } else {
            self.failed("REGISTER", &resp);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// REGISTER again: the expiry granted and the number of bindings, or `None` (said) when
    /// the relay refused it.
    async fn reregister(
        &self,
        call_id: &str,
        seq: u32,
        expires: u32,
    ) -> anyhow::Result<Option<(u32, usize)>> {
        let resp = self.register_once(call_id, seq, expires).await?;
        if resp.status != 200 {
            self.failed("REGISTER", &resp);
            return Ok(None);
        }
        let granted = ua::granted_expires(&resp, &self.contact()).unwrap_or(expires);
        Ok(Some((granted, resp.headers.get_all("Contact").count())))
    }

    /// A REFER outside any dialog, from the relay itself, to another relay of its cluster
    /// (`<sip:IP:PORT;redirected>`, no user): where this registration moves. A REFER from
    /// anyone else, or to anything else, is not obeyed.
    fn moved_by_relay(&self, req: &ServerRequest) -> Option<Target> {
        let r = &req.request;
        if r.method != Method::Refer
            || r.to().ok()?.tag().is_some()
            || req.source.addr != self.relay.addr
        {
            return None;
        }
        let to = message::NameAddr::parse(r.headers.get("Refer-To")?).ok()?;
        if to.uri.user.is_some() || to.uri.param(proto::service::REDIRECTED_PARAM).is_none() {
            return None;
        }
        ua::uri_target(&to.uri, self.relay.transport)
    }

    /// Incoming requests while registered: calls are answered as `--answer` says; a BYE ends
    /// the current call.
    async fn answer_incoming(&mut self, req: ServerRequest, answer: &str) {
        let r = &req.request;
        match r.method {
            Method::Invite => {
                let tag = message::new_tag();
                match answer {
                    "busy" => req.respond(message::make_response(r, 486, None, Some(&tag))),
                    "ignore" => {
                        req.respond(message::make_response(r, 180, None, Some(&tag)));
                        self.ringing.retain(|p| p.request.call_id() != r.call_id());
                        self.ringing.push(req);
                    }
                    _ => {
                        req.respond(message::make_response(r, 180, None, Some(&tag)));
                        let mut ok = message::make_response(r, 200, None, Some(&tag));
                        ok.headers.push("Contact", self.contact());
                        for rr in r.headers.get_all("Record-Route") {
                            ok.headers.push("Record-Route", rr);
                        }
                        ok.headers.push("Content-Type", "application/sdp");
                        ok.body = Bytes::from(proto::sdp::offer(
                            self.ep.advertised.ip(),
                            proto::clock::now_unix(),
                        ));
                        self.out.emit(&Event::Established {
                            call_id: r.call_id().unwrap_or_default().to_string(),
                            status: 200,
                        });
                        let dialog = Dialog::uas(r, &tag, &self.contact());
                        let answered = Instant::now();
                        let confirmed = self.uas_confirm(&req, ok).await;
                        if let Some(dialog) = dialog {
                            match confirmed {
                                Confirmed::Acked => self.answered.push((dialog, answered)),
                                // Confirmed without an ACK: the session is ended at once
                                // (RFC 3261 §13.3.1.4).
                                Confirmed::NoAck => self.hang_up(dialog, answered).await,
                                Confirmed::Ended => {}
                            }
                        }
                    }
                }
            }
            Method::Ack => {}
            Method::Bye => self.end_answered(req),
            Method::Cancel => {
                req.respond(message::make_response(r, 200, None, None));
                let branch = |q: &Request| {
                    q.top_via()
                        .ok()
                        .and_then(|v| v.branch().map(str::to_string))
                };
                if let Some(pos) = self
                    .ringing
                    .iter()
                    .position(|p| branch(&p.request) == branch(r))
                {
                    let invite = self.ringing.swap_remove(pos);
                    invite.respond(message::make_response(
                        &invite.request,
                        487,
                        None,
                        Some(&message::new_tag()),
                    ));
                }
            }
            Method::Options => req.respond(message::make_response(r, 200, None, None)),
            _ => req.respond(message::make_response(r, 501, None, None)),
        }
    }

    /// A BYE for a call answered while registered: 200 and the call is over; 481 for a call
    /// this agent does not have.
    fn end_answered(&mut self, req: ServerRequest) {
        let r = &req.request;
        let Some(call) = self.answered.iter().position(|(d, _)| d.matches(r)) else {
            req.respond(message::make_response(r, 481, None, None));
            return;
        };
        req.respond(message::make_response(r, 200, None, None));
        let (_, since) = self.answered.swap_remove(call);
        self.out.emit(&Event::Ended {
            reason: "remote-bye".into(),
            status: Some(200),
            duration_ms: Some(since.elapsed().as_millis() as u64),
        });
    }

    /// Hangs up every call answered while registered: BYE through the relay, each told.
    async fn hang_up_answered(&mut self) {
        for (dialog, since) in std::mem::take(&mut self.answered) {
            self.hang_up(dialog, since).await;
        }
    }

    /// Ends one answered call with BYE through the relay and tells how it went.
    async fn hang_up(&self, mut dialog: Dialog, since: Instant) {
        let Ok(hop) = self.dialog_hop(&dialog) else {
            return;
        };
        let bye = self.ep.with_via(dialog.request(Method::Bye), hop.transport);
        let status = self.send_in_dialog(bye, hop).await.ok().map(|r| r.status);
        self.out.emit(&Event::Ended {
            reason: "local-bye".into(),
            status,
            duration_ms: Some(since.elapsed().as_millis() as u64),
        });
    }

    /// Sends the 2xx and retransmits it (T1 doubling to T2) until the ACK arrives or 64*T1 pass
    /// (RFC 3261 §13.3.1.4). Requests other than the ACK are answered meanwhile.
    async fn uas_confirm(&mut self, req: &ServerRequest, ok: Response) -> Confirmed {
        req.respond(ok.clone());
        let t1 = Duration::from_millis(500);
        let mut interval = t1;
        let give_up = Instant::now() + t1 * 64;
        let mut next = Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {
                    if Instant::now() >= give_up {
                        return Confirmed::NoAck;
                    }
                    req.respond(ok.clone());
                    interval = (interval * 2).min(Duration::from_secs(4));
                    next = Instant::now() + interval;
                }
                other = self.incoming.recv() => {
                    let Some(other) = other else { return Confirmed::Ended };
                    if other.request.method == Method::Ack && other.request.call_id() == req.request.call_id() {
                        return Confirmed::Acked;
                    }
                    if other.request.method == Method::Bye && other.request.call_id() == req.request.call_id() {
                        other.respond(message::make_response(&other.request, 200, None, None));
                        self.out.emit(&Event::Ended { reason: "remote-bye".into(), status: Some(200), duration_ms: None });
                        return Confirmed::Ended;
                    }
                    if other.request.method == Method::Bye {
                        self.end_answered(other);
                        continue;
                    }
                    other.respond(message::make_response(&other.request, 200, None, None));
                }
            }
        }
    }

    async fn call(
        &mut self,
        target: &str,
        duration: Option<Duration>,
        ring_timeout: Duration,
        wait: Option<Duration>,
    ) -> anyhow::Result<CallResult> {
        let uri = session::target_uri(target, &self.domain);
        self.out.emit(&Event::Note {
            message: format!("calling {uri} through the relay at {}", self.relay_name()),
        });
        let call_id = message::new_call_id();
        let dialled = watch::with_wait(&uri, wait);
        let mut invite = self.new_request(Method::Invite, &dialled, &uri, &call_id, 1)?;
        let sdp = |agent: &Agent, invite: &mut Request| {
            invite.headers.push("Content-Type", "application/sdp");
            invite.body = Bytes::from(proto::sdp::offer(
                agent.ep.advertised.ip(),
                proto::clock::now_unix(),
            ));
        };
        sdp(self, &mut invite);
        let mut interrupt = Interrupt::new();
        let answer = self
            .invite(
                invite,
                Some(Instant::now() + ring_timeout),
                &mut interrupt,
                true,
            )
            .await?;
        // The relay watches for the callee (--wait): its REFER brings the call.
        let answer = match answer {
            InviteAnswer::Accepted { invite, ok, .. } if watch::is_watch(&ok) => {
                match self.watch(&invite, &ok, &mut interrupt).await? {
                    watch::Watched::Ended(why) => {
                        self.out.emit(&Event::Note { message: why });
                        self.out.emit(&Event::Ended {
                            reason: "not-reached".into(),
                            status: Some(480),
                            duration_ms: None,
                        });
                        return Ok(CallResult::Failed);
                    }
                    watch::Watched::Referred {
                        uri,
                        mut dialog,
                        hop,
                    } => {
                        let call_id = message::new_call_id();
                        let mut invite =
                            self.new_request(Method::Invite, &uri, &uri, &call_id, 1)?;
                        sdp(self, &mut invite);
                        let answer = self
                            .invite(
                                invite,
                                Some(Instant::now() + ring_timeout),
                                &mut interrupt,
                                true,
                            )
                            .await?;
                        let (status, reason) = watch_outcome(&answer);
                        watch::tell_relay(self, &mut dialog, hop, status, &reason);
                        answer
                    }
                }
            }
            other => other,
        };
        let (invite, ok, mut events, cancelled) = match answer {
            InviteAnswer::Accepted {
                invite,
                ok,
                events,
                cancelled,
            } => (invite, ok, events, cancelled),
            InviteAnswer::TimedOut { heard } => {
                if !heard {
                    self.out.emit(&Event::Note {
                        message: self.no_answer(Method::Invite, CALL_GIVE_UP).to_string(),
                    });
                }
                self.out.emit(&Event::Ended {
                    reason: "timeout".into(),
                    status: Some(408),
                    duration_ms: None,
                });
                return Ok(CallResult::Failed);
            }
            InviteAnswer::Rejected { resp, .. } => {
                if resp.status != 487 {
                    self.failed("INVITE", &resp);
                }
                let reason = match resp.status {
                    487 => "cancelled",
                    401 | 407 => "unauthorized",
                    486 | 600 => "busy",
                    _ => "rejected",
                };
                self.out.emit(&Event::Ended {
                    reason: reason.into(),
                    status: Some(resp.status),
                    duration_ms: None,
                });
                return Ok(CallResult::Failed);
            }
        };
        let Some(mut dialog) = Dialog::uac(&invite, &ok) else {
            bail!("the 2xx to INVITE carried no usable To tag or Contact");
        };
        let invite_seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
        let hop = self.dialog_hop(&dialog)?;
        self.ep
            .send_stateless(dialog.ack(invite_seq), hop)
            .await
            .context("sending ACK")?;
        let started = Instant::now();
        self.out.emit(&Event::Established {
            call_id: call_id.clone(),
            status: ok.status,
        });
        // A 2xx that crossed our CANCEL: hang up at once.
        let end = if cancelled {
            Some(started)
        } else {
            duration.map(|d| started + d)
        };
        loop {
            tokio::select! {
                _ = proto::clock::sleep_until(end) => break,
                _ = interrupt.next() => break,
                ev = events.recv(), if !events.is_closed() => {
                    if let Some(ClientEvent::Final(r)) = ev {
                        if (200..300).contains(&r.status) {
                            let other = r
                                .to()
                                .ok()
                                .and_then(|t| t.tag().map(str::to_string))
                                .is_some_and(|t| t != dialog.remote_tag);
                            if other {
                                // A second device answered the forked call: this call already
                                // has its answer, so that dialog is acknowledged and ended.
                                self.release_extra(&invite, &r, invite_seq).await;
                            } else {
                                // A retransmitted 2xx means our ACK was lost: send it again
                                // (§13.2.2.4).
                                let _ = self.ep.send_stateless(dialog.ack(invite_seq), hop).await;
                            }
                        }
                    }
                }
                req = self.incoming.recv() => {
                    let Some(req) = req else { break };
                    let r = &req.request;
                    if r.method == Method::Ack && r.call_id() == Some(call_id.as_str()) {
                        // A retransmitted 2xx made the relay re-send; ACK it again.
                        continue;
                    }
                    if r.method == Method::Bye && dialog.matches(r) {
                        req.respond(message::make_response(r, 200, None, None));
                        let d = started.elapsed().as_millis() as u64;
                        self.out.emit(&Event::Ended { reason: "remote-bye".into(), status: Some(200), duration_ms: Some(d) });
                        return Ok(CallResult::Completed);
                    }
                    req.respond(message::make_response(r, if r.method == Method::Options { 200 } else { 481 }, None, None));
                }
            }
        }
        let bye = self.ep.with_via(dialog.request(Method::Bye), hop.transport);
        let resp = self.send_in_dialog(bye, hop).await?;
        let d = started.elapsed().as_millis() as u64;
        self.out.emit(&Event::Ended {
            reason: "local-bye".into(),
            status: Some(resp.status),
            duration_ms: Some(d),
        });
        Ok(if (200..300).contains(&resp.status) {
            CallResult::Completed
        } else {
            CallResult::Failed
        })
    }

    /// Sends an INVITE and waits for its first final answer: the relay's digest challenge is
    /// answered as for any request; Ctrl-C or `ring_deadline` sends CANCEL (and the 487 that
    /// follows comes back as [`InviteAnswer::Rejected`]). With `report_ringing`, 18x are told.
    async fn invite(
        &self,
        mut invite: Request,
        ring_deadline: Option<Instant>,
        interrupt: &mut Interrupt,
        report_ringing: bool,
    ) -> anyhow::Result<InviteAnswer> {
        let mut challenged = false;
        let mut answered = 0;
        let mut cancelled = false;
        // After a CANCEL the final answer (487) must come within 64*T1 (RFC 3261 §9.1); a
        // relay that lost the call never sends it, and nobody waits forever.
        let mut give_up: Option<Instant> = None;
        let since = Instant::now();
        let mut heard = false;
        let mut redirects = 0;
        loop {
            let mut events = self.ep.request(invite.clone(), self.invite_hop(&invite));
            let outcome = loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ClientEvent::Provisional(r)) => {
                            heard = true;
                            if report_ringing && r.status >= 180 {
                                self.out.emit(&Event::Ringing { status: r.status });
                            }
                        }
                        Some(ClientEvent::Final(r)) => break Some(r),
                        Some(ClientEvent::Timeout) | None => break None,
                        Some(ClientEvent::TransportError) => return Err(self.unreachable(Method::Invite)),
                        Some(ClientEvent::Terminated) => {}
                    },
                    _ = tokio::time::sleep(PROGRESS_EVERY), if !heard => self.out.emit(&Event::Note {
                        message: format!(
                            "INVITE: still waiting for the relay at {} ({} s)",
                            self.relay_name(),
                            since.elapsed().as_secs()
                        ),
                    }),
                    _ = proto::clock::sleep_until(ring_deadline), if !cancelled => {
                        cancelled = true;
                        give_up = Some(Instant::now() + CANCEL_WAIT);
                        self.cancel(&invite).await;
                    }
                    _ = interrupt.next() => {
                        if cancelled {
                            // Asked twice: stop waiting for the answer to the CANCEL.
                            break None;
                        }
                        cancelled = true;
                        give_up = Some(Instant::now() + CANCEL_WAIT);
                        self.cancel(&invite).await;
                    }
                    _ = proto::clock::sleep_until(give_up), if give_up.is_some() => break None,
                }
            };
            let Some(resp) = outcome else {
                return Ok(InviteAnswer::TimedOut { heard });
            };
            heard = true;
            if matches!(resp.status, 401 | 407)
                && !cancelled
                && self.authorize(&mut invite, &resp, &mut answered)
            {
                challenged = true;
                continue;
            }
            if (200..300).contains(&resp.status) {
                return Ok(InviteAnswer::Accepted {
                    invite,
                    ok: resp,
                    events,
                    cancelled,
                });
            }
            if (300..400).contains(&resp.status) && !cancelled && redirects < MAX_REDIRECTS {
                if let Some(next) = self.redirected(&invite, &resp) {
                    redirects += 1;
                    self.out.emit(&Event::Note {
                        message: format!("redirected ({}) to {}", resp.status, next.uri),
                    });
                    invite = next;
                    answered = 0;
                    continue;
                }
            }
            return Ok(InviteAnswer::Rejected { resp, challenged });
        }
    }

    /// Where the dialog's requests go: its first Route (the relay), else the remote target.
    /// ACK and BYE for a dialog a further 2xx created (another device of a forked call).
    async fn release_extra(&self, invite: &Request, resp: &Response, invite_seq: u32) {
        let Some(mut extra) = Dialog::uac(invite, resp) else {
            return;
        };
        let Ok(hop) = self.dialog_hop(&extra) else {
            return;
        };
        let _ = self.ep.send_stateless(extra.ack(invite_seq), hop).await;
        let bye = self.ep.with_via(extra.request(Method::Bye), hop.transport);
        let mut events = self.ep.request(bye, hop);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if matches!(
                    ev,
                    ClientEvent::Final(_) | ClientEvent::Timeout | ClientEvent::TransportError
                ) {
                    break;
                }
            }
        });
    }

    fn dialog_hop(&self, dialog: &Dialog) -> anyhow::Result<Target> {
        let uri = dialog
            .next_hop()
            .ok_or_else(|| anyhow!("no route in the dialog"))?;
        ua::uri_target(&uri, self.relay.transport)
            .ok_or_else(|| anyhow!("in-dialog next hop {uri} is not an IP address"))
    }

    async fn send_in_dialog(&self, req: Request, hop: Target) -> anyhow::Result<Response> {
        let mut events = self.ep.request(req, hop);
        loop {
            match events.recv().await {
                Some(ClientEvent::Final(r)) => return Ok(r),
                Some(ClientEvent::Timeout) | None => bail!("no answer to BYE"),
                Some(ClientEvent::TransportError) => bail!("cannot send BYE"),
                Some(_) => {}
            }
        }
    }

    /// CANCEL for the INVITE as it was sent (same Via branch, RFC 3261 §9.1).
    async fn cancel(&self, invite: &Request) {
        let mut events = self
            .ep
            .request(message::make_cancel(invite), self.invite_hop(invite));
        tokio::spawn(async move { while events.recv().await.is_some() {} });
    }

    /// CANCEL for the INVITE as it was sent, with its transaction's events.
    fn cancel_events(&self, invite: &Request) -> mpsc::UnboundedReceiver<ClientEvent> {
        self.ep
            .request(message::make_cancel(invite), self.invite_hop(invite))
    }

    /// Where an INVITE goes: the relay, or the additional relay a 302 named (its Contact,
    /// marked `;redirected`, is the Request-URI).
    fn invite_hop(&self, invite: &Request) -> Target {
        if invite.uri.param(proto::service::REDIRECTED_PARAM).is_some() {
            if let Some(t) = ua::uri_target(&invite.uri, self.relay.transport) {
                return t;
            }
        }
        self.relay
    }

    /// The INVITE again for the first Contact of a 3xx (RFC 3261 §8.1.3.4): same Call-ID and
    /// From tag, the next CSeq, no credentials (the next relay challenges afresh). Only a
    /// relay's redirect to another relay (`;redirected`, an IP address) is followed: a
    /// client never sends where only a header points otherwise.
    fn redirected(&self, invite: &Request, resp: &Response) -> Option<Request> {
        let contact = resp
            .headers
            .get("Contact")
            .and_then(|v| message::NameAddr::parse(v).ok())?;
        contact.uri.param(proto::service::REDIRECTED_PARAM)?;
        ua::uri_target(&contact.uri, self.relay.transport)?;
        let mut next = invite.clone();
        next.uri = contact.uri;
        next.headers.remove_all("Proxy-Authorization");
        next.headers.remove_all("Authorization");
        let seq = invite.cseq().map(|c| c.seq).unwrap_or(1).saturating_add(1);
        next.headers.set("CSeq", format!("{seq} INVITE"));
        Some(self.ep.with_via(next, self.relay.transport))
    }
}
