//! `relay serve`: binds the SIP transport, opens the store and runs the dispatcher until shutdown.
//!
//! The dispatcher reads every message the transport parsed and hands it to the transaction
//! context it belongs to (by [`TxKey`]), or starts a new context for a new request
//! ([`crate::proxy`]). ACKs for 2xx and responses no context knows are forwarded statelessly.

use crate::auth::Authenticator;
use crate::config::Config;
use crate::core::{Core, CtxInput, Tombstones};
use crate::proxy;
use crate::session::{EndReason, Sessions};
use crate::store::Store;
use anyhow::Context as _;
use proto::clock::now_ms;
use proto::sip::message::{self, Message, Method};
use proto::sip::transaction::{Timers, TxKey};
use proto::transport::limit::SourceLimits;
use proto::transport::{Incoming, SipTransport, Target, TransportConfig};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A running relay.
pub struct RelayHandle {
    pub core: Arc<Core>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("sip", &self.sip_addr())
            .finish()
    }
}

impl RelayHandle {
    /// The SIP address (UDP and TCP).
    pub fn sip_addr(&self) -> SocketAddr {
        self.core.transport.local_addr()
    }

    /// The gRPC billing endpoint's address, when it is served.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// The metrics and health endpoint's address, when it is served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// Resolves when the relay stopped on its own (it lost its node's lease).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }

    /// A planned stop, before [`RelayHandle::stop`]: from now on new calls get 503; the
    /// sessions and calls in progress may go on for up to `limit`; then calls still ringing are
    /// given up (503 to the caller) and the sessions still running are ended by the relay,
    /// with BYE to both sides and billed to this moment (reason `relay-stop`). Returns early
    /// once nothing is in progress.
    pub async fn drain(&self, limit: std::time::Duration) {
        let core = &self.core;
        core.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let busy = || core.sessions.live() > 0 || core.live_contexts() > 0;
        if busy() {
            tracing::info!(
                sessions = core.sessions.live(),
                drain_secs = limit.as_secs(),
                "Stopping: new calls get 503; the sessions in progress may go on for up to drain_secs, then the relay ends them (a second signal stops at once)"
            );
        } else {
            tracing::info!("Stopping: nothing in progress");
        }
        let deadline = Instant::now() + limit;
        while busy() && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // Calls still ringing: given up (a 2xx that crosses the CANCEL makes a session, ended
        // below).
        core.stop_contexts();
        let settle = Instant::now() + std::time::Duration::from_secs(2);
        while core.live_contexts() > 0 && Instant::now() < settle {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let open = core.sessions.established();
        if !open.is_empty() {
            tracing::info!(
                sessions = open.len(),
                "Drain time over: ending the sessions still running"
            );
        }
        let mut ends = Vec::new();
        for key in open {
            let core = core.clone();
            ends.push(tokio::spawn(async move {
                crate::session::supervise::end(&core, &key, EndReason::RelayStop).await;
            }));
        }
        // The records and charges are stored before the BYEs leave; their answers are waited
        // for a moment only.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            for e in ends {
                let _ = e.await;
            }
        })
        .await;
    }

    /// Stops serving, waits for the dispatcher and the record writer to finish, and gives the
    /// node's lease back.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        self.core.sessions.flush().await;
        if !self
            .core
            .lease_lost
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let lease = &self.core.lease;
            if let Err(e) = self
                .core
                .store
                .release_node(&lease.node_id, &lease.instance)
                .await
            {
                tracing::warn!(error = %e, "Could not give up the node's lease");
            }
        }
    }
}

/// Opens the store, binds the transport and starts serving in the background.
pub async fn start(config: Config) -> anyhow::Result<RelayHandle> {
    let store = Store::open(&config.database_url).await.with_context(|| {
        format!(
            "cannot open the database {}",
            crate::store::redact_url(&config.database_url)
        )
    })?;
    let open_files = raise_open_files();
    let tconf = transport_config(&config, open_files);
    let (transport, incoming) = SipTransport::bind(config.sip, tconf)
        .await
        .with_context(|| format!("cannot bind SIP on {}", config.sip))?;
    let local = transport.local_addr();
    let advertised = match config.advertise {
        Some(ip) => SocketAddr::new(ip, local.port()),
        None if local.ip().is_unspecified() => {
            tracing::warn!(
                "Listening on every address but advertising 127.0.0.1 in Via and Record-Route: \
                 set --advertise to the address clients reach this relay at"
            );
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), local.port())
        }
        None => local,
    };
    let timers = Timers {
        t1: std::time::Duration::from_millis(config.timer_t1_ms.max(1)),
        ..Timers::default()
    };
    let cache_ttl = std::time::Duration::from_millis(config.cache_ttl_ms);
    // Records this relay keeps carry its node id: a restarted relay takes over only its own.
    let node = config
        .node_id
        .clone()
        .unwrap_or_else(|| advertised.to_string());
    // The node id is this relay's alone while it runs: another live relay holding it is refused.
    let lease = crate::node::acquire(&store, &node, &advertised.to_string()).await?;
    // What admin commands need to know of the relay serving this database.
    store
        .set_setting("domain", &config.domain)
        .await
        .context("cannot record the relay's domain in the database")?;
    let writer = crate::session::Writer::spawn(
        store.clone(),
        std::time::Duration::from_millis(config.record_linger_ms),
    );
    let charging = crate::charging::Charging::spawn(
        store.clone(),
        writer.clone(),
        i64::try_from(config.charge_grace_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
    );
    let sessions = Sessions::new(
        writer,
        transport.clone(),
        crate::session::SessionsConfig {
            instance: lease.instance.clone(),
            node,
            bye_limit: std::time::Duration::from_millis(config.bye_answer_limit_ms),
        },
    );
    sessions.recover(&store, now_ms()).await;
    let identity = crate::identity::Identity {
        domain: config.domain.clone(),
        advertised,
        bound: local,
    };
    let inquiry = Arc::new(crate::proxy::Settings {
        timers,
        sequential_timeout: std::time::Duration::from_millis(config.sequential_timeout_ms),
        realm: config.domain.clone(),
        identity: identity.clone(),
    });
    // Never itself: a name pointing at this relay's own address is left out.
    let additional: Vec<crate::config::Additional> = config
        .additional_servers()?
        .into_iter()
        .filter(|a| a.addr != identity.advertised && a.addr != identity.bound)
        .collect();
    let core = Arc::new(Core {
        watches: crate::watch::Watches::default(),
        additional,
        transport,
        auth: Authenticator::new(
            &config.domain,
            config.nonce_lifetime_secs,
            config.offer_sha256,
            cache_ttl,
            config.max_nonces,
        ),
        location: crate::location::Location::new(cache_ttl),
        catalog: crate::search::Catalog::new(cache_ttl),
        store,
        config,
        sessions,
        charging,
        timers,
        inquiry,
        identity,
        contexts: Mutex::new(HashMap::new()),
        tombstones: Mutex::new(Tombstones::default()),
        lease,
        lease_lost: std::sync::atomic::AtomicBool::new(false),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    if let Some(got) = core.transport.udp_receive_buffer() {
        let asked = core.config.udp_receive_buffer;
        // Linux reports twice the size granted (its bookkeeping included). Many systems cap it
        // at 208 KiB (net.core.rmem_max): said once, at info level, with the remedy.
        if asked > 0 && got / 2 < asked {
            tracing::info!(
                asked,
                granted = got / 2,
                "The UDP receive buffer is smaller than udp_receive_buffer asks; raise \
                 net.core.rmem_max (sysctl) to let a burst wait instead of being dropped"
            );
        }
    }
    let shutdown = CancellationToken::new();
    let grpc = match core.config.grpc {
        Some(addr) => {
            let tls = match (&core.config.grpc_tls_cert, &core.config.grpc_tls_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                _ => None,
            };
            let endpoint =
                crate::api::Endpoint::bind(addr, tls, core.config.grpc_tls_client_ca.as_deref())
                    .await?;
            let bound = endpoint.local_addr();
            let billing = crate::api::Billing::new(core.store.clone(), core.charging.clone());
            let stop = shutdown.clone();
            tokio::spawn(endpoint.serve(billing, async move { stop.cancelled().await }));
            bound
        }
        None => None,
    };
    // Metrics and health for the operator.
    let http = match core.config.http {
        Some(addr) => {
            let listener = crate::http::bind(addr).await?;
            let bound = listener.local_addr().ok();
            let (core, stop) = (core.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = crate::http::serve(listener, core) => {}
                    () = stop.cancelled() => {}
                }
            });
            bound
        }
        None => None,
    };
    tracing::info!(
        sip = %local,
        advertised = %advertised,
        domain = %core.config.domain,
        grpc = grpc.map(tracing::field::display),
        http = http.map(tracing::field::display),
        "Relay serving"
    );
    // Auto-redial: the watches of this node (those of a previous run too).
    tokio::spawn(crate::watch::run(core.clone()));
    tokio::spawn(crate::cluster::run(core.clone()));
    let task = tokio::spawn(dispatch_loop(core.clone(), incoming, shutdown.clone()));
    Ok(RelayHandle {
        core,
        shutdown,
        task,
        grpc,
        http,
    })
}

/// The transport's settings from the relay's: the per-source limits, and TCP connections
/// bounded by the open-files limit as well (leaving room for the database and the log).
fn transport_config(config: &Config, open_files: Option<u64>) -> TransportConfig {
    let by_files = open_files
        .map(|n| usize::try_from(n.saturating_sub(256)).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX)
        .max(16);
    TransportConfig {
        max_tcp_message: config.max_tcp_message,
        tcp_idle: std::time::Duration::from_secs(config.tcp_idle_secs),
        tcp_first_message: std::time::Duration::from_secs(config.tcp_first_message_secs),
        max_connections: config.tcp_max_connections.min(by_files),
        tcp_per_source: config.tcp_per_source,
        udp_receive_buffer: config.udp_receive_buffer,
        trace: config.sip_trace,
        sources: SourceLimits {
            rate_per_sec: config.source_rate_per_sec,
            burst: config.source_burst,
            trusted: config.trusted.clone(),
            ..SourceLimits::default()
        },
        ..TransportConfig::default()
    }
}

/// Raises the soft open-files limit to the hard one (every TCP connection is a file); returns
/// the limit in force, `None` for unlimited.
fn raise_open_files() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?limit.current, to = ?limit.maximum, "Raised the open-files limit");
                return limit.maximum;
            }
            Err(e) => tracing::warn!(error = %e, "Could not raise the open-files limit"),
        }
    }
    limit.current
}

/// Runs until SIGINT or SIGTERM: the first begins a planned stop ([`RelayHandle::drain`] for
/// `drain_secs`), a second one stops at once.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let handle = start(config).await?;
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = handle.stopped() => {}
    }
    let lost = handle
        .core
        .lease_lost
        .load(std::sync::atomic::Ordering::Relaxed);
    if !lost {
        let drain = std::time::Duration::from_secs(handle.core.config.drain_secs);
        tokio::select! {
            _ = handle.drain(drain) => {}
            _ = shutdown_signal() => {
                tracing::warn!(
                    sessions = handle.core.sessions.live(),
                    "Second signal: stopping at once; sessions still open are taken over at the \
                     next start"
                );
            }
            _ = handle.stopped() => {}
        }
    }
    let lost = handle
        .core
        .lease_lost
        .load(std::sync::atomic::Ordering::Relaxed);
    if lost {
        let node = handle.core.lease.node_id.clone();
        handle.stop().await;
        anyhow::bail!(
            "another relay took over node id {node:?} (this one did not renew its lease in time); stopped"
        );
    }
    tracing::info!("Shutting down");
    handle.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn dispatch_loop(
    core: Arc<Core>,
    mut incoming: mpsc::Receiver<Incoming>,
    shutdown: CancellationToken,
) {
    let mut sweep = tokio::time::interval(std::time::Duration::from_secs(30));
    let mut tombstone_sweep = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut session_sweep = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut heartbeat = tokio::time::interval(crate::node::HEARTBEAT);
    let mut tables = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tables.tick() => {
                if tracing::enabled!(target: "relay::tables", tracing::Level::DEBUG) {
                    let (tombstone_room, tombstone_queue_room) = core.tombstone_capacity();
                    tracing::debug!(
                        target: "relay::tables",
                        contexts = core.live_contexts(),
                        tombstones = core.tombstones_kept(),
                        tombstone_room,
                        tombstone_queue_room,
                        dialogs = core.sessions.live(),
                        records_queued = core.sessions.queued(),
                        nonces = core.auth.nonces_tracked(),
                        "Tables"
                    );
                }
            }
            _ = heartbeat.tick() => {
                let core = core.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let lease = &core.lease;
                    match core.store.heartbeat(&lease.node_id, &lease.instance, now_ms()).await {
                        // Orders of `relay drain` for the sessions this relay carries.
                        Ok(true) => crate::session::drain::check(&core).await,
                        Ok(false) => {
                            tracing::error!(node = %lease.node_id, "Another relay took over this node id: stopping");
                            core.lease_lost.store(true, std::sync::atomic::Ordering::Relaxed);
                            shutdown.cancel();
                        }
                        Err(e) => tracing::warn!(error = %e, "Could not renew the node's lease"),
                    }
                });
            }
            _ = tombstone_sweep.tick() => core.sweep_tombstones(Instant::now()),
            _ = session_sweep.tick() => {
                core.sessions.sweep_unacknowledged(
                    core.timers.t1 * 64 + std::time::Duration::from_secs(1),
                    Instant::now(),
                );
                crate::session::supervise::tick(&core);
            }
            _ = shutdown.cancelled() => break,
            msg = incoming.recv() => {
                let Some(inc) = msg else { break };
                dispatch(&core, inc).await;
            }
            _ = sweep.tick() => {
                let core = core.clone();
                tokio::spawn(async move {
                    if let Err(e) = core.store.purge_expired_bindings(now_ms()).await {
                        tracing::warn!(error = %e, "Purging expired bindings failed");
                    }
                });
            }
        }
    }
}

/// Sends a stateless answer: over UDP at once, over TCP in a task of its own (a send may have to
/// wait for a slow peer).
async fn reply_now(
    core: &Arc<Core>,
    req: message::Request,
    resp: message::Response,
    source: Target,
) {
    if source.is_reliable() {
        let core = core.clone();
        tokio::spawn(async move { proxy::reply_stateless(&core, &req, resp, &source).await });
    } else {
        proxy::reply_stateless(core, &req, resp, &source).await;
    }
}

async fn dispatch(core: &Arc<Core>, inc: Incoming) {
    let Incoming { msg, source } = inc;
    crate::metrics::METRICS.received(&msg);
    match msg {
        Message::Request(req) => {
            // Sends that may open a TCP connection run in their own task, so one slow peer
            // never stalls the dispatcher.
            if req.method == Method::Cancel {
                tokio::spawn(proxy::handle_cancel(core.clone(), req, source));
                return;
            }
            let key = TxKey::server(&req).or_else(|| TxKey::server_2543(&req));
            if let Some(key) = &key {
                if let Some(t) = core
                    .tombstone(key)
                    .filter(|t| req.method != Method::Ack || t.absorb_ack)
                {
                    if let Some((target, bytes)) = t.reply.map(|r| *r) {
                        let transport = core.transport.clone();
                        tokio::spawn(async move { transport.send_bytes(&target, bytes).await });
                    }
                    return;
                }
                if let Some(ctx) = core.context_for(key) {
                    let _ = ctx.try_send(CtxInput::Request(Box::new(req), source));
                    return;
                }
            }
            if req.method == Method::Ack {
                tokio::spawn(proxy::forward_ack(core.clone(), req));
                return;
            }
            let Some(key) = key else {
                let resp = message::make_response(&req, 400, Some("Missing Via branch"), None);
                let core = core.clone();
                tokio::spawn(
                    async move { proxy::reply_stateless(&core, &req, resp, &source).await },
                );
                return;
            };
            // A planned stop: no new calls (in-dialog requests and registrations go on).
            if req.method == Method::Invite
                && core.is_stopping()
                && req.to().ok().is_some_and(|to| to.tag().is_none())
            {
                let mut resp = proxy::stateless_response(&req, 503, Some(proxy::STOPPING));
                resp.headers
                    .push("Retry-After", proxy::STOPPING_RETRY_AFTER);
                reply_now(core, req, resp, source).await;
                return;
            }
            // A request of a dialog an additional relay carries, towards a client registered
            // here that sends through this relay: on to where its registration came from.
            let from_peer = proxy::reception::from_peer(core, &req, &source);
            let screened = if from_peer {
                Ok(proxy::Plan::FromPeer)
            } else {
                proxy::screen(core, &req)
            };
            let plan = match screened {
                Ok(plan) => plan,
                Err(answer) => {
                    proxy::log_refusal(core, &req, &answer, &source);
                    reply_now(core, req, answer, source).await;
                    return;
                }
            };
            // Bounded work: beyond the cap a new request is turned away at once.
            let busy = core.live_contexts() >= core.config.max_transactions
                || (req.method == Method::Invite
                    && (core.sessions.live() >= core.config.max_dialogs
                        || core.sessions.backlogged()));
            if busy {
                let mut resp = proxy::stateless_response(&req, 503, Some("Relay busy"));
                resp.headers.push("Retry-After", "5");
                if core.transport.admit_log(source.addr.ip()) {
                    tracing::warn!(
                        contexts = core.live_contexts(),
                        dialogs = core.sessions.live(),
                        "At capacity: a new request got 503"
                    );
                }
                reply_now(core, req, resp, source).await;
                return;
            }
            proxy::spawn_context(core.clone(), key, req, source, plan);
        }
        Message::Response(resp) => {
            if let Some(key) = TxKey::client(&resp) {
                if let Some(ctx) = core.context_for(&key) {
                    let _ = ctx.try_send(CtxInput::Response(Box::new(resp)));
                    return;
                }
            }
            tokio::spawn(proxy::forward_response_stateless(core.clone(), resp));
        }
    }
}

/// The transport keeps the TCP connections of live dialogs open for session control.
impl crate::session::ConnectionHolds for SipTransport {
    fn pin(&self, conn: proto::transport::ConnId) {
        SipTransport::pin(self, conn);
    }

    fn unpin(&self, conn: proto::transport::ConnId) {
        SipTransport::unpin(self, conn);
    }
}
