//! The agent's life: start-up (bind, register every service, derive the assertion key, serve
//! the HTTP API), the SIP loop that hands each request to [`crate::core`], keepalives of the
//! registrations, and stop (BYE to live sessions, un-REGISTER).

use crate::admission::{Admission, Webhook};
use crate::assertion::Verifier;
use crate::cli::{Cli, Command, RunArgs, Settings};
use crate::core::{Core, Halt};
use crate::output::{EndedBy, Event, Output};
use crate::registration::{self, Binding, RegisterError, Registrar};
use crate::sessions::Sessions;
use crate::{http_api, now_unix};
use anyhow::{Context as _, anyhow, bail};
use proto::sip::transaction::ClientEvent;
use proto::transport::Target;
use proto::ua::{self, Credentials, Endpoint, ServerRequest};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
/// How long stop waits for the answers to its BYEs.
const STOP_BYE_WAIT: Duration = Duration::from_secs(2);
/// How long stop waits for the un-REGISTERs.
const STOP_UNREGISTER_WAIT: Duration = Duration::from_secs(5);

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
        Credentials::new(
            &settings.account,
            &settings.password.0,
            settings.realm.clone(),
        ),
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
    let billing = crate::billing::Billing::open(
        settings.billing,
        settings.charges_file.clone(),
        settings.grpc.clone(),
        out.clone(),
    )?;
    let sessions = Arc::new(Sessions::default());
    let core = Arc::new(Core {
        ep,
        settings,
        verifier,
        admission,
        sessions: sessions.clone(),
        billing: billing.clone(),
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
    let mut tasks = vec![
        tokio::spawn(sip_loop(core.clone(), incoming)),
        tokio::spawn(billing.run(sessions)),
    ];
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
    let args = match cli.command {
        Command::Run(args) => args,
        Command::DemoShop(args) => {
            crate::demo_shop::run(args).await?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let handle = start(args).await?;
    let outcome = tokio::select! {
        () = crate::signals::stop() => Ok(()),
        r = handle.wait() => r,
    };
    handle.stop().await;
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}

async fn sip_loop(core: Arc<Core>, mut incoming: mpsc::UnboundedReceiver<ServerRequest>) {
    while let Some(req) = incoming.recv().await {
        core.handle(req);
    }
    core.halt
        .send_replace(Halt::Failed("the SIP endpoint stopped".into()));
}
