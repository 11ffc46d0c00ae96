//! The agent: start-up (bind, register every service, derive the assertion key), the SIP loop
//! (INVITE decisions, CANCEL, ACK, BYE, in-dialog keepalives), server-side hang-up, and stop
//! (BYE to live sessions, un-REGISTER).
//!
//! The only module that sends SIP for sessions. It takes its decisions from
//! [`crate::assertion`] and [`crate::admission`], keeps sessions in [`crate::sessions`], and
//! never answers an INVITE the relay did not vouch for with anything but 403.

use crate::admission::{Admission, DecisionRequest, Refusal, Webhook};
use crate::assertion::Verifier;
use crate::cli::{Cli, Command, RunArgs, Settings};
use crate::output::{EndedBy, Event, Output};
use crate::registration::{self, Binding, RegisterError, Registrar};
use crate::sessions::{Closing, Session, Sessions, Slot, new_token};
use crate::{http_api, now_unix, sdp};
use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use proto::service::{SERVICE_ACCESS_TYPE, ServiceAccess, ServiceRequest};
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Method, Response};
use proto::sip::transaction::{ClientEvent, TxKey};
use proto::transport::Target;
use proto::ua::{self, Endpoint, ServerRequest};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Methods the agent answers.
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, MESSAGE";
/// How long stop waits for the answers to its BYEs.
const STOP_BYE_WAIT: Duration = Duration::from_secs(2);
/// How long stop waits for the un-REGISTERs.
const STOP_UNREGISTER_WAIT: Duration = Duration::from_secs(5);

/// Whether the agent should keep running.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Halt {
    Running,
    /// A [`Stopper`] asked for a stop.
    Requested,
    /// Something the agent cannot do without stopped working.
    Failed(String),
}

/// State shared by the SIP loop, the session tasks and the HTTP API.
pub(crate) struct Core {
    ep: Arc<Endpoint>,
    settings: Settings,
    verifier: Verifier,
    admission: Admission,
    pub(crate) sessions: Arc<Sessions>,
    /// INVITEs being decided, by server transaction key: a CANCEL fires their sender.
    pending: Mutex<HashMap<TxKey, oneshot::Sender<()>>>,
    out: Output,
    stopping: AtomicBool,
    halt: Arc<watch::Sender<Halt>>,
    /// Set while the relay's assertions do not verify with this account's key (its password
    /// was changed at the relay): when it was last said, and what.
    unvouched: Mutex<Option<(std::time::Instant, String)>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("account", &self.settings.account)
            .field("sip", &self.ep.advertised)
            .finish_non_exhaustive()
    }
}

/// A running agent.
pub struct AgentHandle {
    core: Arc<Core>,
    sip_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    registrations: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("sip_addr", &self.sip_addr)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Asks a running agent to stop: [`AgentHandle::wait`] then returns.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<watch::Sender<Halt>>);

impl Stopper {
    pub fn stop(&self) {
        self.0.send_if_modified(|h| {
            if *h == Halt::Running {
                *h = Halt::Requested;
                true
            } else {
                false
            }
        });
    }
}

impl AgentHandle {
    /// The bound SIP address (UDP and TCP).
    pub fn sip_addr(&self) -> SocketAddr {
        self.sip_addr
    }

    /// The SIP address the agent advertises in Contact (its address towards the relay).
    pub fn contact_addr(&self) -> SocketAddr {
        self.core.ep.advertised
    }

    /// The HTTP API's address, when `--http` was given.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Sessions answered 200 and not ended.
    pub fn live_sessions(&self) -> usize {
        self.core.sessions.live()
    }

    /// A handle that makes [`AgentHandle::wait`] return.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.core.halt.clone())
    }

    /// Waits until a [`Stopper`] asks for a stop (`Ok`) or the agent cannot go on (`Err` with
    /// the problem). Call [`AgentHandle::stop`] afterwards.
    pub async fn wait(&self) -> anyhow::Result<()> {
        let mut rx = self.core.halt.subscribe();
        let halt = rx
            .wait_for(|h| *h != Halt::Running)
            .await
            .map(|h| h.clone())
            .unwrap_or(Halt::Requested);
        match halt {
            Halt::Failed(why) => Err(anyhow!(why)),
            _ => Ok(()),
        }
    }

    /// Stops: ends live sessions with BYE, un-REGISTERs every service, stops the SIP loop and
    /// the HTTP API.
    pub async fn stop(self) {
        let core = &self.core;
        core.stopping.store(true, Ordering::SeqCst);
        // Un-register first (the registration tasks do it on this signal), so the relay stops
        // sending new sessions while the live ones are being ended.
        let _ = self.shutdown.send(true);
        let mut byes = Vec::new();
        for s in core.sessions.end_all() {
            core.out.emit(Event::Ended {
                sid: s.sid.clone(),
                user: s.user.clone(),
                by: EndedBy::Shutdown,
                reason: None,
            });
            if let Some(rx) = core.send_bye(s.dialog, &s.sid) {
                byes.push(rx);
            }
        }
        let _ = tokio::time::timeout(STOP_BYE_WAIT, async {
            for mut rx in byes {
                while let Some(ev) = rx.recv().await {
                    if matches!(
                        ev,
                        ClientEvent::Final(_) | ClientEvent::Timeout | ClientEvent::TransportError
                    ) {
                        break;
                    }
                }
            }
        })
        .await;
        let deadline = tokio::time::Instant::now() + STOP_UNREGISTER_WAIT;
        for h in self.registrations {
            let abort = h.abort_handle();
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                abort.abort();
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        core.halt.send_if_modified(|h| {
            if *h == Halt::Running {
                *h = Halt::Requested;
                true
            } else {
                false
            }
        });
    }
}

/// The first registration of a service. A relay that does not answer (not started yet, or
/// restarting) is asked again with backoff (1, 2, 4 … 30 s), saying so each time, until it
/// answers or Ctrl-C; a refusal (wrong password, a service the account may not deliver) ends
/// the agent with the reason.
async fn register_first(
    registrar: &Registrar,
    settings: &Settings,
    service: &str,
    out: &Output,
) -> anyhow::Result<(Binding, u32)> {
    let mut b = Binding::new(service);
    let mut attempt = 0;
    loop {
        out.emit(Event::Registering {
            service: service.to_string(),
            relay: settings.relay,
            transport: settings.transport.to_string(),
        });
        let tried = tokio::time::timeout(
            registration::FIRST_PATIENCE,
            registrar.register(&mut b, settings.expires),
        )
        .await;
        let why = match tried {
            Ok(Ok(granted)) => return Ok((b, granted)),
            Ok(Err(RegisterError::NoAnswer(why))) => why,
            Ok(Err(e)) => return Err(anyhow!(e.describe(service))),
            Err(_) => format!(
                "no answer from the relay at {} over {} within {} s (is `relay serve` running \
                 there?)",
                settings.relay,
                settings.transport,
                registration::FIRST_PATIENCE.as_secs()
            ),
        };
        let wait = registration::backoff(attempt);
        attempt += 1;
        out.emit(Event::Waiting {
            service: service.to_string(),
            message: why,
            retry_in_secs: wait.as_secs(),
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => bail!("stopped before {service} could be registered"),
        }
    }
}

/// Starts the agent, printing events on standard output; returns once every service is
/// registered (or with the problem that stopped it).
pub async fn start(args: RunArgs) -> anyhow::Result<AgentHandle> {
    start_with(args, Output::default()).await
}

/// [`start`] with events going to `out`.
pub async fn start_with(args: RunArgs, out: Output) -> anyhow::Result<AgentHandle> {
    let settings = Settings::from_args(&args).await?;
    let webhook = settings
        .webhook
        .as_deref()
        .map(Webhook::parse)
        .transpose()?;
    let http = match settings.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind the HTTP API on {addr}"))?,
        ),
        None => None,
    };
    let http_addr = match &http {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let toward = ua::local_ip_towards(settings.relay)
        .with_context(|| format!("no route to the relay at {}", settings.relay))?;
    let bind = settings.sip.unwrap_or(SocketAddr::new(toward, 0));
    let advertise = if bind.ip().is_unspecified() {
        toward
    } else {
        bind.ip()
    };
    let (ep, incoming) = Endpoint::bind(bind, Some(advertise))
        .await
        .with_context(|| format!("cannot bind SIP on {bind}"))?;
    let sip_addr = ep.transport().local_addr();
    let relay = Target {
        transport: settings.transport,
        addr: settings.relay,
        conn: None,
    };
    let registrar = Arc::new(Registrar::new(
        ep.clone(),
        relay,
        &settings.account,
        &settings.password.0,
        &settings.domain,
        settings.expires,
    ));
    let mut registered: Vec<(Binding, u32)> = Vec::new();
    for service in &settings.services {
        match register_first(&registrar, &settings, service, &out).await {
            Ok((b, granted)) => {
                out.emit(Event::Registered {
                    service: service.clone(),
                    relay: settings.relay,
                    expires: granted,
                });
                registered.push((b, granted));
            }
            Err(e) => {
                for (mut done, _) in registered {
                    if registrar.register(&mut done, 0).await.is_ok() {
                        out.emit(Event::Unregistered {
                            service: done.service.clone(),
                        });
                    }
                }
                return Err(e);
            }
        }
    }
    let realm = registrar.realm().unwrap_or_else(|| settings.domain.clone());
    let verifier = Verifier::new(&settings.account, &realm, &settings.password.0);
    let admission = Admission::new(
        settings.services.clone(),
        settings.capacity,
        webhook,
        settings.retry_after,
    );
    let (halt, _) = watch::channel(Halt::Running);
    let core = Arc::new(Core {
        ep,
        settings,
        verifier,
        admission,
        sessions: Arc::new(Sessions::default()),
        pending: Mutex::new(HashMap::new()),
        out: out.clone(),
        stopping: AtomicBool::new(false),
        halt: Arc::new(halt),
        unvouched: Mutex::new(None),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let registrations = registered
        .into_iter()
        .map(|(b, granted)| {
            tokio::spawn(registration::keep_registered(
                registrar.clone(),
                b,
                granted,
                out.clone(),
                shutdown_rx.clone(),
            ))
        })
        .collect();
    let mut tasks = vec![tokio::spawn(sip_loop(core.clone(), incoming))];
    if !core.settings.keepalive.is_zero() {
        tasks.push(tokio::spawn(keepalive_loop(core.clone())));
    }
    if let Some(listener) = http {
        tasks.push(tokio::spawn(http_api::serve(listener, core.clone())));
    }
    out.emit(Event::Listening {
        sip: core.ep.advertised,
        http: http_addr,
    });
    Ok(AgentHandle {
        core,
        sip_addr,
        http_addr,
        shutdown,
        registrations,
        tasks,
    })
}

/// Checks the live sessions every `--keepalive`: a session whose OPTIONS gets 408, 481 or no
/// answer is over (the relay ended it, or the client is gone, while its BYE could not reach
/// us), so its token dies and its capacity slot is freed; a session whose token expired is
/// ended with BYE.
async fn keepalive_loop(core: Arc<Core>) {
    let mut tick = tokio::time::interval(core.settings.keepalive);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (probes, expired) = core.sessions.probes(now_unix());
        for sid in expired {
            if let Some(s) = core.sessions.end(&sid) {
                core.out.emit(Event::Ended {
                    sid: s.sid.clone(),
                    user: s.user.clone(),
                    by: EndedBy::Expired,
                    reason: None,
                });
                core.spawn_bye(s.dialog, s.sid);
            }
        }
        for (sid, req, dialog) in probes {
            let Some(hop) = dialog
                .next_hop()
                .and_then(|uri| ua::uri_target(&uri, core.settings.transport))
            else {
                continue;
            };
            let core = core.clone();
            tokio::spawn(async move {
                let req = core.ep.with_via(req, hop.transport);
                let mut events = core.ep.request(req, hop);
                let mut gone = true;
                while let Some(ev) = events.recv().await {
                    match ev {
                        ClientEvent::Final(r) => {
                            gone = matches!(r.status, 408 | 481);
                            break;
                        }
                        ClientEvent::Timeout | ClientEvent::TransportError => break,
                        _ => {}
                    }
                }
                if gone {
                    if let Some(s) = core.sessions.end(&sid) {
                        tracing::info!(%sid, "Session check failed: the session is over");
                        core.out.emit(Event::Ended {
                            sid: s.sid.clone(),
                            user: s.user.clone(),
                            by: EndedBy::Gone,
                            reason: None,
                        });
                    }
                }
            });
        }
    }
}

/// Runs `app-server-agent run …`: starts, serves until Ctrl-C or SIGTERM, then stops.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Command::Run(args) = cli.command;
    let handle = start(args).await?;
    let outcome = tokio::select! {
        _ = interrupted() => Ok(()),
        _ = terminated() => Ok(()),
        r = handle.wait() => r,
    };
    handle.stop().await;
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}

/// Ctrl-C (never, if the handler cannot be installed).
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await
    }
}

/// SIGTERM (never, if the handler cannot be installed).
#[cfg(unix)]
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn terminated() {
    std::future::pending::<()>().await
}

async fn sip_loop(core: Arc<Core>, mut incoming: mpsc::UnboundedReceiver<ServerRequest>) {
    while let Some(req) = incoming.recv().await {
        core.handle(req);
    }
    core.halt
        .send_replace(Halt::Failed("the SIP endpoint stopped".into()));
}

/// What a decided INVITE needs to be accepted.
struct Accepted {
    sid: String,
    user: String,
    service: String,
    detail: Option<String>,
    dialog: Dialog,
    sdp_answer: Option<String>,
    slot: Slot,
}

impl Core {
    fn respond(&self, req: &ServerRequest, status: u16, reason: Option<&str>) {
        let mut resp = message::make_response(&req.request, status, reason, None);
        if matches!(status, 405 | 501) || (req.request.method == Method::Options && status == 200) {
            resp.headers.push("Allow", ALLOW);
        }
        req.respond(resp);
    }

    /// One request from the endpoint.
    fn handle(self: &Arc<Self>, req: ServerRequest) {
        let r = &req.request;
        let in_dialog = r.to().ok().is_some_and(|t| t.tag().is_some());
        match r.method {
            Method::Ack => {
                if let Some(sid) = self.sessions.find(r) {
                    self.sessions.acked(&sid);
                }
            }
            Method::Cancel => self.cancel(&req),
            _ if in_dialog => self.in_dialog(&req),
            Method::Invite => {
                // Registered before the next message is read, so a CANCEL right behind the
                // INVITE finds it.
                let key = TxKey::server(r).or_else(|| TxKey::server_2543(r));
                let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
                if let Some(k) = &key {
                    lock(&self.pending).insert(k.clone(), cancel_tx);
                }
                tokio::spawn(self.clone().invite(req, key, cancel_rx));
            }
            Method::Options => self.respond(&req, 200, None),
            Method::Bye => self.respond(&req, 481, None),
            _ => self.respond(&req, 405, None),
        }
    }

    fn in_dialog(&self, req: &ServerRequest) {
        let r = &req.request;
        let Some(sid) = self.sessions.find(r) else {
            self.respond(req, 481, None);
            return;
        };
        match r.method {
            Method::Bye => {
                self.respond(req, 200, None);
                if let Some(s) = self.sessions.end(&sid) {
                    // The relay marks the BYEs it sends itself (and removes any copy a client
                    // put in): such a session was ended by the relay, for the reason it names.
                    let by_relay = r.headers.get(proto::service::END_HEADER);
                    let reason = by_relay.or_else(|| r.headers.get("Reason").map(reason_text));
                    let reason = reason.map(crate::admission::sanitize_reason);
                    tracing::info!(sid = %s.sid, ?reason, "Session ended by the other side");
                    self.out.emit(Event::Ended {
                        sid: s.sid,
                        user: s.user,
                        by: if by_relay.is_some() {
                            EndedBy::Relay
                        } else {
                            EndedBy::Client
                        },
                        reason,
                    });
                }
            }
            Method::Options | Method::Info | Method::Update | Method::Message => {
                self.respond(req, 200, None)
            }
            // A re-INVITE: the session goes on unchanged (RFC 3261 §14.2).
            Method::Invite => self.respond(req, 488, Some("Session changes not supported")),
            _ => self.respond(req, 501, None),
        }
    }

    fn cancel(&self, req: &ServerRequest) {
        let key = TxKey::invite_for_cancel(&req.request);
        let found = key.and_then(|k| lock(&self.pending).remove(&k));
        match found {
            Some(tx) => {
                self.respond(req, 200, None);
                let _ = tx.send(());
            }
            None => self.respond(req, 481, None),
        }
    }

    /// An out-of-dialog INVITE: decide, then refuse, or accept and wait for the ACK.
    async fn invite(
        self: Arc<Self>,
        req: ServerRequest,
        key: Option<TxKey>,
        mut cancel_rx: oneshot::Receiver<()>,
    ) {
        let r = &req.request;
        req.respond(message::make_response(r, 100, None, None));
        let to_tag = message::new_tag();
        let call_id = r.call_id().unwrap_or_default().to_string();
        let decision = tokio::select! {
            d = self.decide(&req, &to_tag) => Some(d),
            Ok(()) = &mut cancel_rx => None,
        };
        if let Some(k) = &key {
            lock(&self.pending).remove(k);
        }
        let decision = match decision {
            Some(d) if cancel_rx.try_recv().is_err() => Some(d),
            _ => None,
        };
        let accepted = match decision {
            None => {
                req.respond(message::make_response(r, 487, None, Some(&to_tag)));
                self.out.emit(Event::Cancelled {
                    sid: self
                        .verifier
                        .peek(r, now_unix())
                        .unwrap_or_else(|| format!("(call {call_id})")),
                });
                return;
            }
            Some(Err((sid, refusal))) => {
                let mut resp =
                    message::make_response(r, refusal.status, Some(&refusal.reason), Some(&to_tag));
                if let Some(after) = refusal.retry_after {
                    resp.headers.push("Retry-After", after.to_string());
                }
                req.respond(resp);
                tracing::info!(?sid, %call_id, status = refusal.status, why = %refusal.why, "INVITE refused");
                self.out.emit(Event::Refused {
                    sid,
                    call_id,
                    status: refusal.status,
                    why: refusal.why,
                });
                return;
            }
            Some(Ok(a)) => a,
        };
        self.accept(req, accepted).await;
    }

    /// Notes whether the relay vouches with this account's key. An assertion from the relay
    /// itself whose signature does not verify means the account's password changed at the
    /// relay: every session would be refused, so the agent says so (at most once a minute) and
    /// `/health` reports it until an assertion verifies again.
    fn note_vouching(
        &self,
        req: &ServerRequest,
        checked: &Result<proto::service::Assertion, crate::assertion::Unvouched>,
    ) {
        use crate::assertion::Unvouched;
        use proto::service::AssertionError;
        let mut state = lock(&self.unvouched);
        match checked {
            Ok(_) => {
                if state.take().is_some() {
                    self.out.emit(Event::Unvouched {
                        message: "the relay's assertions verify again".into(),
                    });
                }
            }
            Err(Unvouched::Invalid(AssertionError::BadSignature))
                if req.source.addr == self.settings.relay =>
            {
                let due = state
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= std::time::Duration::from_secs(60));
                if due {
                    let message = format!(
                        "the relay no longer vouches for account {}: its assertions do not \
                         verify with this agent's password (was it changed with `relay \
                         appserver passwd`?). Every session is refused until the agent runs \
                         with the account's current password",
                        self.settings.account
                    );
                    self.out.emit(Event::Unvouched {
                        message: message.clone(),
                    });
                    *state = Some((std::time::Instant::now(), message));
                }
            }
            Err(_) => {}
        }
    }

    /// The problem `/health` reports, if the relay no longer vouches for this agent.
    pub(crate) fn vouching_problem(&self) -> Option<String> {
        lock(&self.unvouched).as_ref().map(|(_, m)| m.clone())
    }

    /// The reception decision (see [`crate::admission`]), after the relay's assertion.
    async fn decide(
        &self,
        req: &ServerRequest,
        to_tag: &str,
    ) -> Result<Accepted, (Option<String>, Refusal)> {
        let r = &req.request;
        let refuse = |status: u16, reason: &str, why: String| Refusal {
            status,
            reason: reason.to_string(),
            retry_after: None,
            why,
        };
        if self.stopping.load(Ordering::SeqCst) {
            return Err((
                None,
                Refusal {
                    status: 503,
                    reason: "Shutting down".into(),
                    retry_after: Some(self.settings.retry_after),
                    why: "the agent is stopping".into(),
                },
            ));
        }
        let checked = self.verifier.check(r, now_unix());
        self.note_vouching(req, &checked);
        let a = checked.map_err(|e| {
            (
                None,
                refuse(
                    403,
                    "Not vouched for by the relay",
                    format!("not vouched for by the relay ({e})"),
                ),
            )
        })?;
        let sid = Some(a.sid.clone());
        self.admission
            .check_service(&a.service)
            .map_err(|e| (sid.clone(), e))?;
        let content_type = r.headers.get("Content-Type");
        let request = ServiceRequest::from_message(content_type, &r.body).map_err(|e| {
            (
                sid.clone(),
                refuse(400, "Bad service request", e.to_string()),
            )
        })?;
        let sdp_answer = if sdp::is_sdp(content_type) {
            let answer = sdp::answer(&r.body, self.ep.advertised.ip(), now_unix());
            Some(answer.ok_or_else(|| {
                (
                    sid.clone(),
                    refuse(488, "Not Acceptable Here", "unusable SDP offer".into()),
                )
            })?)
        } else {
            None
        };
        let contact = registration::contact(&self.ep, &a.service, req.source.transport);
        let dialog = Dialog::uas(r, to_tag, &contact).ok_or_else(|| {
            (
                sid.clone(),
                refuse(
                    400,
                    "Missing Contact or From tag",
                    "the INVITE has no usable Contact or From tag".into(),
                ),
            )
        })?;
        let slot = self
            .admission
            .reserve(&self.sessions)
            .map_err(|e| (sid.clone(), e))?;
        let fields = request
            .as_ref()
            .map(|q| q.fields.clone())
            .unwrap_or_default();
        let detail = a.detail.clone().or_else(|| {
            request
                .as_ref()
                .and_then(|q| q.detail().map(str::to_string))
        });
        self.admission
            .ask(&DecisionRequest {
                user: &a.user,
                session_id: &a.sid,
                service: &a.service,
                detail: detail.as_deref(),
                fields: &fields,
                call_id: &a.call_id,
                server: &self.settings.account,
            })
            .await
            .map_err(|e| (sid.clone(), e))?;
        if self.stopping.load(Ordering::SeqCst) {
            return Err((
                sid,
                Refusal {
                    status: 503,
                    reason: "Shutting down".into(),
                    retry_after: Some(self.settings.retry_after),
                    why: "the agent is stopping".into(),
                },
            ));
        }
        Ok(Accepted {
            sid: a.sid,
            user: a.user,
            service: a.service,
            detail,
            dialog,
            sdp_answer,
            slot,
        })
    }

    /// Answers 200 with the service URL and a fresh token, then retransmits it until the ACK.
    async fn accept(self: Arc<Self>, req: ServerRequest, a: Accepted) {
        let r = &req.request;
        let token = new_token();
        let url = with_token(&self.settings.url, &token);
        let mut ok = message::make_response(r, 200, None, Some(&a.dialog.local_tag));
        for rr in r.headers.get_all("Record-Route") {
            ok.headers.push("Record-Route", rr);
        }
        ok.headers.push("Contact", a.dialog.local_contact.as_str());
        ok.headers.push("Allow", ALLOW);
        ok.headers.push("Server", crate::USER_AGENT);
        match &a.sdp_answer {
            Some(answer) => {
                ok.headers
                    .push("Call-Info", format!("<{url}>;purpose=info"));
                ok.headers.push("Content-Type", "application/sdp");
                ok.body = Bytes::from(answer.clone());
            }
            None => {
                ok.headers.push("Content-Type", SERVICE_ACCESS_TYPE);
                ok.body = Bytes::from(
                    ServiceAccess {
                        url,
                        service: a.service.clone(),
                        session_id: a.sid.clone(),
                        server: self.settings.account.clone(),
                    }
                    .to_json(),
                );
            }
        }
        let now = now_unix();
        let wake = Arc::new(Notify::new());
        let ttl = self.settings.token_ttl.as_secs().max(1);
        self.sessions.go_live(
            a.slot,
            Session {
                sid: a.sid.clone(),
                user: a.user.clone(),
                service: a.service.clone(),
                detail: a.detail,
                token,
                issued_at: now,
                expires_at: now.saturating_add(ttl),
                dialog: a.dialog,
                acked: false,
                closing: false,
                wake: wake.clone(),
            },
        );
        req.respond(ok.clone());
        tracing::info!(sid = %a.sid, user = %a.user, service = %a.service, "Session accepted");
        self.out.emit(Event::Accepted {
            sid: a.sid.clone(),
            user: a.user,
            service: a.service,
            url: self.settings.url.clone(),
        });
        self.await_ack(&req, ok, &a.sid, wake).await;
    }

    /// Retransmits the 2xx (T1 doubling to T2, unreliable transports only) until the ACK or the
    /// end of the session; drops the session with a BYE when 64*T1 pass without ACK
    /// (RFC 3261 §13.3.1.4).
    async fn await_ack(&self, req: &ServerRequest, ok: Response, sid: &str, wake: Arc<Notify>) {
        let t1 = self.settings.t1;
        let t2 = t1.saturating_mul(8);
        let give_up = Instant::now() + t1.saturating_mul(64);
        let reliable = req.source.is_reliable();
        let mut interval = t1;
        loop {
            let next = (Instant::now() + interval).min(give_up);
            let timer = tokio::select! {
                _ = wake.notified() => false,
                _ = tokio::time::sleep_until(next.into()) => true,
            };
            if !self.sessions.awaits_ack(sid) {
                // Closed by the web service while the ACK was on its way: the BYE goes now.
                if let Some(s) = self.sessions.end_if_closing(sid) {
                    self.spawn_bye(s.dialog, s.sid);
                }
                return;
            }
            if Instant::now() >= give_up {
                if let Some(s) = self.sessions.end(sid) {
                    tracing::info!(%sid, "No ACK for the 200 OK: session dropped");
                    self.out.emit(Event::Ended {
                        sid: s.sid.clone(),
                        user: s.user.clone(),
                        by: EndedBy::NoAck,
                        reason: None,
                    });
                    self.spawn_bye(s.dialog, s.sid);
                }
                return;
            }
            if timer {
                if !reliable {
                    req.respond(ok.clone());
                }
                interval = interval.saturating_mul(2).min(t2);
            }
        }
    }

    /// Ends a live session from the server side (HTTP API): BYE through the dialog's route set,
    /// at once if the dialog is confirmed, else as soon as the ACK comes (the token is dead
    /// from now on either way).
    pub(crate) fn close(self: &Arc<Self>, sid: &str) -> bool {
        let (user, now) = match self.sessions.close(sid) {
            None => return false,
            Some(Closing::Now(s)) => (s.user.clone(), Some(s)),
            Some(Closing::AfterAck { user }) => (user, None),
        };
        tracing::info!(%sid, "Session closed by the web service");
        self.out.emit(Event::Ended {
            sid: sid.to_string(),
            user,
            by: EndedBy::WebService,
            reason: None,
        });
        if let Some(s) = now {
            self.spawn_bye(s.dialog, s.sid);
        }
        true
    }

    /// Sends BYE in `dialog`; its transaction's events.
    fn send_bye(
        &self,
        mut dialog: Dialog,
        sid: &str,
    ) -> Option<mpsc::UnboundedReceiver<ClientEvent>> {
        let bye = dialog.request(Method::Bye);
        let hop = dialog
            .next_hop()
            .and_then(|uri| ua::uri_target(&uri, self.settings.transport));
        let Some(hop) = hop else {
            tracing::warn!(%sid, "No IP next hop in the dialog: BYE not sent");
            return None;
        };
        let bye = self.ep.with_via(bye, hop.transport);
        Some(self.ep.request(bye, hop))
    }

    /// [`Core::send_bye`], logging the answer in the background.
    fn spawn_bye(&self, dialog: Dialog, sid: String) {
        let Some(mut events) = self.send_bye(dialog, &sid) else {
            return;
        };
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    ClientEvent::Final(r) => {
                        tracing::debug!(%sid, status = r.status, "BYE answered");
                        break;
                    }
                    ClientEvent::Timeout | ClientEvent::TransportError => {
                        tracing::warn!(%sid, "BYE got no answer");
                        break;
                    }
                    _ => {}
                }
            }
        });
    }

    pub(crate) fn account(&self) -> &str {
        &self.settings.account
    }

    pub(crate) fn services(&self) -> &[String] {
        &self.settings.services
    }

    /// The secret the HTTP API requires as a bearer token, if any.
    pub(crate) fn http_token(&self) -> Option<&str> {
        self.settings.http_token.as_ref().map(|t| t.0.as_str())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `text` of a Reason header (`SIP;cause=200;text="max-duration"`), else the whole value.
fn reason_text(value: &str) -> &str {
    value
        .split(';')
        .find_map(|p| p.trim().strip_prefix("text="))
        .map(|t| t.trim_matches('"'))
        .unwrap_or(value)
}

/// `url` with `token=TOKEN` added to its query (before any fragment).
pub(crate) fn with_token(url: &str, token: &str) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let sep = match base.find('?') {
        None => "?",
        Some(_) if base.ends_with('?') || base.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut out = format!("{base}{sep}token={token}");
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{reason_text, with_token};

    #[test]
    fn reason_texts() {
        assert_eq!(
            reason_text("SIP;cause=200;text=\"max-duration\""),
            "max-duration"
        );
        assert_eq!(reason_text("Q.850;cause=16"), "Q.850;cause=16");
    }

    #[test]
    fn tokens_join_the_query() {
        assert_eq!(with_token("https://a/b", "T"), "https://a/b?token=T");
        assert_eq!(
            with_token("https://a/b?x=1", "T"),
            "https://a/b?x=1&token=T"
        );
        assert_eq!(with_token("https://a/b?", "T"), "https://a/b?token=T");
        assert_eq!(
            with_token("https://a/b?x=1&", "T"),
            "https://a/b?x=1&token=T"
        );
        assert_eq!(
            with_token("https://a/b#top", "T"),
            "https://a/b?token=T#top"
        );
    }
}
