//! Request relay (RFC 3261 §16): one transaction context per received request.
//!
//! A context owns the server transaction of the request and the client transactions of every
//! branch it forwards (and of the CANCELs it sends), drives them on the tokio clock, and decides:
//! answer locally (registrar, OPTIONS to the relay, errors) or relay. Relaying authenticates the
//! caller (407), finds the callee's bindings, forks in parallel to all of them, adds Record-Route
//! and Via, decrements Max-Forwards, forwards provisional and 2xx responses at once and the best
//! other final response once every branch has ended (§16.7). In-dialog requests are loose-routed
//! along the Record-Route the relay put in, and only for dialogs it knows, so the relay is never
//! an open proxy; a request for a domain it does not serve is refused unless the operator
//! configured a route for that domain. Nothing here resolves names: every next hop is an IP
//! literal from a registration, a Route the relay wrote, or the configuration.

use crate::auth::{Outcome, Role};
use crate::core::{CTX_QUEUE, Core, CtxInput, Tombstone};
use crate::registrar;
use crate::search::{Destination, Facts};
use crate::session::{Answer, Attempt, BranchInfo, Commit, Leg, Party, ServiceInfo};
use crate::store::Fork;
use proto::clock::{now_ms, now_unix};
use proto::log::Esc;
use proto::service::{ASSERTION_HEADER, Assertion, CHARGE_HEADER, ServiceRequest};
use proto::sip::dialog::Dialog;
use proto::sip::message::{
    self, Message, Method, NameAddr, Request, Response, Transport as ViaTransport, Uri, Via,
};
use proto::sip::transaction::{ClientEvent, ClientTransaction, ServerTransaction, State, TxKey};
use proto::transport::{Target, response_target};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Proxy Timer C (RFC 3261 §16.6 step 11): an INVITE branch with a provisional answer is
/// cancelled after this long without a final one.
const TIMER_C: Duration = Duration::from_secs(180);

/// How long a message that tells a party its charge may wait for that charge to be committed;
/// past it the message goes without the charge.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Methods the relay itself accepts or relays.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE, PRACK, REFER, MESSAGE, NOTIFY, SUBSCRIBE";

/// Reason phrase of the 403 for a request to a domain the relay neither serves nor routes.
pub const RELAYING_DENIED: &str = "Relaying denied";

/// Reason phrase of the 503 a stopping relay gives new and still-ringing INVITEs.
pub const STOPPING: &str = proto::service::STOPPING_REASON;
/// Its Retry-After, in seconds.
pub const STOPPING_RETRY_AFTER: &str = "30";

/// Starts the context for a new request that passed the [`screen`].
pub fn spawn_context(core: Arc<Core>, key: TxKey, req: Request, source: Target, plan: Plan) {
    let (tx, rx) = mpsc::channel(CTX_QUEUE);
    core.register_context(key.clone(), tx.clone());
    // A TCP caller's connection stays open while its request is in progress (a call may ring
    // for minutes without a message from it).
    if let Some(conn) = source.conn {
        core.transport.pin(conn);
    }
    tokio::spawn(async move {
        let mut ctx = Ctx::new(core, key, req, source, tx, rx);
        ctx.run(plan).await;
        ctx.finish();
    });
}

/// Sends a response to a request without a transaction (used where none can exist).
pub async fn reply_stateless(core: &Core, req: &Request, resp: Response, source: &Target) {
    let target = req
        .top_via()
        .map(|v| response_target(&v, source))
        .unwrap_or(*source);
    core.send(&target, &Message::Response(resp)).await;
}

/// What a new request is, once the [`screen`] let it through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A request inside a dialog the relay knows (the tags as the request has them).
    InDialog {
        call_id: String,
        from_tag: String,
        to_tag: String,
    },
    /// A REGISTER for this relay's domain, with credentials for its realm.
    Register,
    /// A request for a user or a service of this relay's domain, with credentials.
    Local,
    /// A request for a foreign domain the operator routes to this next hop, with credentials.
    Foreign(SocketAddr),
    /// An INVITE for a foreign domain no route leads to, with credentials: refused with 403
    /// once its caller is authenticated, so the attempt leaves a record.
    Denied,
}

/// Everything the relay refuses before authentication, decided from the request alone: no
/// store, no transaction, no context (RFC 3261 §16.3, §22.1). The answer goes out once,
/// statelessly; a retransmission gets the same answer again (the To tag derives from the
/// request) and the ACK for a refused INVITE belongs to no dialog and is dropped. So a forged
/// source costs the relay one answer, never a transaction that retransmits. A request that
/// passes carries credentials for the relay's realm with one of its nonces, or belongs to a
/// dialog the relay knows.
pub fn screen(core: &Core, req: &Request) -> Result<Plan, Response> {
    let answer = |status: u16, reason: Option<&str>| stateless_response(req, status, reason);
    let mf = match req.headers.get("Max-Forwards") {
        Some(v) => Some(
            v.trim()
                .parse::<u32>()
                .map_err(|_| answer(400, Some("Bad Max-Forwards")))?,
        ),
        None => None,
    };
    if let Some(ext) = req.headers.get("Proxy-Require") {
        let mut resp = answer(420, None);
        resp.headers.push("Unsupported", ext.trim());
        return Err(resp);
    }
    let to = req.to().map_err(|_| answer(400, Some("Bad To")))?;
    let from = req.from().map_err(|_| answer(400, Some("Bad From")))?;
    if let Some(to_tag) = to.tag() {
        let call_id = req.call_id().unwrap_or_default();
        let from_tag = from.tag().unwrap_or_default();
        if !core.sessions.knows(call_id, from_tag, to_tag) {
            return Err(answer(481, None));
        }
        if mf == Some(0) {
            return Err(answer(483, None));
        }
        return Ok(Plan::InDialog {
            call_id: call_id.to_string(),
            from_tag: from_tag.to_string(),
            to_tag: to_tag.to_string(),
        });
    }
    let host = req.uri.host_key();
    let (role, plan) = if req.method == Method::Register {
        let ours = host.eq_ignore_ascii_case(&core.config.domain)
            || core.is_local_host(&host, req.uri.port);
        if !ours {
            return Err(answer(403, Some("Not a domain served here")));
        }
        if let Some(ext) = req.headers.get("Require") {
            let mut resp = answer(420, None);
            resp.headers.push("Unsupported", ext.trim());
            return Err(resp);
        }
        (Role::Registrar, Plan::Register)
    } else {
        let plan = if core.is_local_host(&host, req.uri.port) {
            if req.uri.user.is_none() {
                return Err(answer_self(req));
            }
            Plan::Local
        } else {
            match core
                .config
                .routes
                .iter()
                .find(|r| r.domain.eq_ignore_ascii_case(&host))
            {
                Some(route) => Plan::Foreign(route.next_hop),
                // A call attempt is challenged like any other, and recorded once
                // authenticated; anything else is refused here.
                None if req.method == Method::Invite => Plan::Denied,
                None => return Err(answer(403, Some(RELAYING_DENIED))),
            }
        };
        if mf == Some(0) {
            return Err(answer(483, None));
        }
        (Role::Proxy, plan)
    };
    match core.auth.screen(req, role) {
        crate::auth::Screen::Pass => Ok(plan),
        crate::auth::Screen::Challenge => {
            let mut resp = answer(role.status(), None);
            for value in core.auth.challenges(false, now_unix()) {
                resp.headers.push(role.challenge_header(), value);
            }
            Err(resp)
        }
        crate::auth::Screen::NameTooLong => Err(answer(403, Some("User name too long"))),
    }
}

/// One line for a request the relay refused (not for a challenge, the normal first answer to a
/// request without credentials): status, reason, source address and port, user, method; a few
/// per source and interval at most.
pub fn log_refusal(core: &Core, req: &Request, resp: &Response, source: &Target) {
    if resp.status < 300 || matches!(resp.status, 401 | 407) {
        return;
    }
    if !core.transport.admit_log(source.addr.ip()) {
        return;
    }
    let user = req
        .from()
        .ok()
        .and_then(|f| f.uri.user.clone())
        .unwrap_or_default();
    tracing::info!(
        status = resp.status,
        reason = %Esc(&resp.reason),
        source = %source,
        user = %Esc(&user),
        method = %req.method,
        uri = %Esc(&req.uri.to_string()),
        "Refused"
    );
}

/// A final response sent without a transaction: its To tag derives from the request, so a
/// retransmitted request gets the very same answer.
pub fn stateless_response(req: &Request, status: u16, reason: Option<&str>) -> Response {
    let seed = format!(
        "{}|{}",
        req.top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_string))
            .unwrap_or_default(),
        req.call_id().unwrap_or_default()
    );
    let tag = format!("{:016x}", fnv1a(seed.as_bytes()));
    message::make_response(req, status, reason, Some(&tag))
}

/// OPTIONS (or another request) addressed to the relay itself.
fn answer_self(req: &Request) -> Response {
    if req.method != Method::Options {
        return stateless_response(req, 404, None);
    }
    if let Some(ext) = req.headers.get("Require") {
        let mut resp = stateless_response(req, 420, None);
        resp.headers.push("Unsupported", ext.trim());
        return resp;
    }
    let mut resp = stateless_response(req, 200, None);
    resp.headers.push("Allow", ALLOW);
    resp.headers.push("Accept", "application/sdp");
    resp.headers.push("Supported", "path");
    resp
}

/// CANCEL (RFC 3261 §9.2, §16.10): answered here at once, then passed to the INVITE's context.
pub async fn handle_cancel(core: Arc<Core>, req: Request, source: Target) {
    let ctx = TxKey::invite_for_cancel(&req).and_then(|k| core.context_for(&k));
    // Its own task: waiting for room in the context's queue stalls nobody else. A CANCEL the
    // context can no longer take (it ended meanwhile) matches nothing: 481.
    let status = match ctx {
        Some(ctx) if ctx.send(CtxInput::Cancel).await.is_ok() => 200,
        _ => 481,
    };
    let resp = message::make_response(&req, status, None, None);
    reply_stateless(&core, &req, resp, &source).await;
}

/// An ACK that matched no transaction: the ACK for a 2xx, relayed along the dialog's route.
pub async fn forward_ack(core: Arc<Core>, mut req: Request) {
    let (Some(call_id), Ok(from), Ok(to)) =
        (req.call_id().map(str::to_string), req.from(), req.to())
    else {
        return;
    };
    let (Some(ftag), Some(ttag)) = (from.tag(), to.tag()) else {
        return;
    };
    if !core.sessions.knows(&call_id, ftag, ttag) {
        // Most often the ACK of a refusal answered statelessly (the 407 challenge).
        tracing::debug!(call_id = %Esc(&call_id), "ACK matching no transaction and no dialog dropped");
        return;
    }
    pop_self_routes(&core, &mut req);
    proto::service::strip_relay_headers(&mut req.headers);
    if decrement_max_forwards(&mut req).is_none() {
        return;
    }
    // To the other party, where its messages come from; never where only a header points.
    let Some(target) = core.sessions.route(&call_id, ftag, ttag) else {
        return;
    };
    // Stateless forwarding: the branch is derived from the incoming one, so a retransmitted ACK
    // leaves with the same branch (RFC 3261 §16.11).
    let incoming = req
        .top_via()
        .ok()
        .and_then(|v| v.branch().map(str::to_string))
        .unwrap_or_default();
    let branch = format!("z9hG4bK{:016x}", fnv1a(incoming.as_bytes()));
    let (ftag, ttag) = (ftag.to_string(), ttag.to_string());
    core.sessions
        .in_dialog_request(&call_id, &ftag, &ttag, &mut req, Instant::now());
    push_via(&core, &mut req, target.transport, &branch);
    core.sessions.acked(
        &call_id,
        &ftag,
        &ttag,
        Duration::from_secs(core.config.keepalive_secs),
        Instant::now(),
    );
    core.send(&target, &Message::Request(req)).await;
}

/// A response no context knows: when its top Via is the relay's, pop it and send the response on
/// per the next Via (2xx retransmissions after the INVITE transaction ended); else drop it.
pub async fn forward_response_stateless(core: Arc<Core>, mut resp: Response) {
    let Ok(top) = resp.top_via() else { return };
    if !is_own_via(&core, &top) {
        return;
    }
    // Only a retransmitted 2xx to an INVITE of a dialog the relay knows: anything else with the
    // relay's Via is stale or forged and would be reflected to whatever the next Via names.
    let is_invite_2xx =
        (200..300).contains(&resp.status) && resp.cseq().is_ok_and(|c| c.method == Method::Invite);
    let known = match (resp.call_id(), resp.from(), resp.to()) {
        (Some(call_id), Ok(from), Ok(to)) => match (from.tag(), to.tag()) {
            (Some(f), Some(t)) => core.sessions.knows(call_id, f, t),
            _ => false,
        },
        _ => false,
    };
    if !is_invite_2xx || !known {
        return;
    }
    resp.headers.remove_first("Via");
    let Ok(next) = resp.top_via() else { return };
    let Some(target) = proto::transport::via_target(&next) else {
        return;
    };
    core.send(&target, &Message::Response(resp)).await;
}

fn is_own_via(core: &Core, via: &Via) -> bool {
    let host = via.host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip == core.advertised.ip())
        && via.port.unwrap_or(5060) == core.advertised.port()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Removes the Route headers at the top that name the relay (loose routing, RFC 3261 §16.4).
fn pop_self_routes(core: &Core, req: &mut Request) {
    while let Some(first) = req.headers.get("Route") {
        match NameAddr::parse(first) {
            Ok(na) if core.is_self_uri(&na.uri) => {
                req.headers.remove_first("Route");
            }
            _ => break,
        }
    }
}

/// Decrements Max-Forwards (70 when absent); `None` when it was already 0.
fn decrement_max_forwards(req: &mut Request) -> Option<u32> {
    let mf = match req.headers.get("Max-Forwards") {
        Some(v) => v.trim().parse::<u32>().unwrap_or(70),
        None => 70,
    };
    if mf == 0 {
        return None;
    }
    req.headers.set("Max-Forwards", (mf - 1).to_string());
    Some(mf - 1)
}

fn push_via(core: &Core, req: &mut Request, transport: ViaTransport, branch: &str) {
    let mut via = Via::new(
        transport,
        &core.advertised.ip().to_string(),
        Some(core.advertised.port()),
        branch,
    );
    via.set_param("rport", None);
    req.headers.push_front("Via", via.to_string());
}

fn record_route_value(core: &Core, transport: ViaTransport) -> String {
    let ip = core.advertised.ip();
    let host = if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    match transport {
        ViaTransport::Udp => format!("<sip:{host}:{};lr>", core.advertised.port()),
        other => format!(
            "<sip:{host}:{};transport={};lr>",
            core.advertised.port(),
            other.as_str().to_ascii_lowercase()
        ),
    }
}

#[derive(Debug)]
struct Branch {
    tx: ClientTransaction,
    target: Target,
    timer_c: Option<Instant>,
    /// CANCEL wanted but no provisional yet (RFC 3261 §9.1: wait for one).
    cancel_pending: bool,
    cancelled: bool,
    /// The CANCEL went out; `timer_c` then holds the deadline for the callee's final answer.
    cancel_sent: bool,
    final_status: Option<u16>,
    /// The service session this branch offers (session id, application server).
    info: Option<BranchInfo>,
    /// `--fork sequential`: when this server has rung long enough.
    ring_deadline: Option<Instant>,
    /// The ring deadline passed and the branch was cancelled: its 487 counts as a timeout.
    ring_expired: bool,
    /// A 2xx that lost (another server already won the session): the relay ended that dialog
    /// itself; the ACK it sent, for the server's retransmissions of the 2xx.
    released: Option<Request>,
    /// A 2xx came from this branch.
    answered: bool,
}

/// A copy of a request to forward, where to, and for which service session.
#[derive(Debug)]
pub struct Forward {
    pub req: Request,
    pub target: Target,
    pub info: Option<BranchInfo>,
}

impl Forward {
    fn plain(req: Request, target: Target) -> Forward {
        Forward {
            req,
            target,
            info: None,
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Invite,
    Bye {
        call_id: String,
        from_tag: String,
        to_tag: String,
    },
    Other,
}

struct Ctx {
    core: Arc<Core>,
    keys: Vec<TxKey>,
    server: ServerTransaction,
    upstream: Target,
    source: Target,
    branches: Vec<Branch>,
    cancels: Vec<(ClientTransaction, Target)>,
    me: mpsc::Sender<CtxInput>,
    rx: mpsc::Receiver<CtxInput>,
    final_sent: bool,
    cancelled: bool,
    /// The relay stopped this INVITE ([`CtxInput::Stop`]): its caller gets 503, not 487.
    stopping: bool,
    /// Responses sent upstream outside the server transaction (a late 2xx).
    direct: Vec<Response>,
    /// The best final answer so far (RFC 3261 §16.7), and the branch it came from.
    best: Option<(Response, Option<usize>)>,
    attempt: Option<Attempt>,
    kind: Kind,
    fork: Fork,
    /// `--fork sequential`: the branches not tried yet.
    pending: VecDeque<Forward>,
    /// An in-dialog request whose CSeq the relay shifted: answers get this one back.
    original_cseq: Option<String>,
    /// The branch whose 2xx made the session (not with `--fork all`).
    winner: Option<usize>,
    /// A 200 for BYE that tells the client its charge, waiting until that charge is stored.
    held: Option<(Response, Commit)>,
    started: Instant,
}

impl Ctx {
    fn new(
        core: Arc<Core>,
        key: TxKey,
        req: Request,
        source: Target,
        me: mpsc::Sender<CtxInput>,
        rx: mpsc::Receiver<CtxInput>,
    ) -> Ctx {
        let upstream = req
            .top_via()
            .map(|v| response_target(&v, &source))
            .unwrap_or(source);
        let server = ServerTransaction::new(req, source.is_reliable(), core.timers, Instant::now());
        Ctx {
            core,
            keys: vec![key],
            server,
            upstream,
            source,
            branches: Vec::new(),
            cancels: Vec::new(),
            me,
            rx,
            final_sent: false,
            cancelled: false,
            stopping: false,
            direct: Vec::new(),
            best: None,
            attempt: None,
            kind: Kind::Other,
            fork: Fork::First,
            pending: VecDeque::new(),
            original_cseq: None,
            winner: None,
            held: None,
            started: Instant::now(),
        }
    }

    fn finish(&mut self) {
        let req = self.server.request();
        tracing::debug!(
            method = %req.method,
            call_id = %Esc(req.call_id().unwrap_or_default()),
            source = %self.source,
            status = self.server.last_response().map(|r| r.status),
            branches = self.branches.len(),
            ms = self.started.elapsed().as_millis() as u64,
            "Transaction done"
        );
        for key in &self.keys {
            self.core.unregister_context(key);
        }
        if let Some(conn) = self.source.conn {
            self.core.transport.unpin(conn);
        }
    }

    async fn run(&mut self, plan: Plan) {
        let req = self.server.request().clone();
        if req.method == Method::Invite {
            let trying = message::make_response(&req, 100, None, None);
            self.server.send_response(trying, Instant::now());
            self.flush().await;
        }
        match self.decide(req, plan).await {
            Ok(forwards) => {
                if self.stopping {
                    let resp = self.fail(503, Some(STOPPING));
                    self.respond(resp);
                } else if self.cancelled {
                    let resp = self.fail(487, None);
                    self.respond(resp);
                } else {
                    self.start_branches(forwards);
                }
            }
            Err(resp) => {
                self.respond(resp);
            }
        }
        loop {
            self.flush().await;
            if let Some((mut resp, commit)) = self.held.take() {
                if !commit.wait(COMMIT_WAIT).await && resp.headers.get(CHARGE_HEADER).is_some() {
                    resp.headers.remove_all(CHARGE_HEADER);
                    tracing::warn!(
                        "The session's record is not in the store yet: the 200 for BYE goes without the charge"
                    );
                }
                self.server.send_response(resp, Instant::now());
                continue;
            }
            if self.is_done() {
                break;
            }
            if let Some(tombstone) = self.retirement() {
                // Everything left is absorbing retransmissions: a small tombstone does that
                // (RFC 6026 Timer L / Timer J) instead of the whole context.
                self.core.bury(self.keys[0].clone(), tombstone);
                break;
            }
            let deadline = self.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                input = self.rx.recv() => {
                    let Some(input) = input else { break };
                    self.handle_input(input);
                }
                _ = sleep => {
                    // Input first: what arrived while the relay could not run may answer
                    // what the timer would retransmit.
                    self.core.input_settled(self.core.timers.t1).await;
                    while let Ok(input) = self.rx.try_recv() {
                        self.handle_input(input);
                    }
                    self.handle_timeouts(Instant::now());
                }
            }
        }
    }

    /// When the only work left is absorbing retransmissions, the tombstone that can do it: an
    /// INVITE answered 2xx (retransmitted INVITEs are dropped; 2xx retransmissions from the callee
    /// are relayed statelessly by their Via), or a non-INVITE answered finally (a retransmission
    /// gets the same final response again).
    fn retirement(&self) -> Option<Tombstone> {
        let last = self.server.last_response()?;
        if last.status < 200 {
            return None;
        }
        let branches_done = self
            .branches
            .iter()
            .all(|b| b.final_status.is_some() || b.tx.is_terminated());
        let cancels_done = self
            .cancels
            .iter()
            .all(|(c, _)| c.is_completed() || c.is_terminated());
        if !branches_done || !cancels_done {
            return None;
        }
        let expires = Instant::now() + self.core.timers.t1 * 64;
        if self.server.request().method == Method::Invite {
            if last.status < 300 {
                return Some(Tombstone {
                    expires,
                    reply: None,
                    absorb_ack: false,
                });
            }
            // A non-2xx whose ACK arrived: only ACK retransmissions remain (Timer I).
            return (self.server.state() == State::Confirmed).then_some(Tombstone {
                expires: Instant::now() + self.core.timers.t4,
                reply: None,
                absorb_ack: true,
            });
        }
        let reply = (!self.source.is_reliable()).then(|| {
            (
                self.upstream,
                message::serialize(&Message::Response(last.clone())),
            )
        });
        Some(Tombstone {
            expires,
            reply,
            absorb_ack: false,
        })
    }

    fn is_done(&self) -> bool {
        self.server.is_terminated()
            && self.branches.iter().all(|b| b.tx.is_terminated())
            && self.cancels.iter().all(|(c, _)| c.is_terminated())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = self.server.poll_timeout();
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                deadline = Some(deadline.map_or(d, |x: Instant| x.min(d)));
            }
        };
        for b in &self.branches {
            consider(b.tx.poll_timeout());
            if !b.tx.is_completed() {
                consider(b.timer_c);
                if !b.cancelled {
                    consider(b.ring_deadline);
                }
            }
        }
        for (c, _) in &self.cancels {
            consider(c.poll_timeout());
        }
        deadline
    }

    fn handle_input(&mut self, input: CtxInput) {
        let now = Instant::now();
        match input {
            CtxInput::Request(req, _) => self.server.handle_request(*req, now),
            CtxInput::Response(resp) => {
                let Some(key) = TxKey::client(&resp) else {
                    return;
                };
                if let Some(b) = self.branches.iter_mut().find(|b| b.tx.key() == &key) {
                    b.tx.handle_response(*resp, now);
                } else if let Some((c, _)) = self.cancels.iter_mut().find(|(c, _)| c.key() == &key)
                {
                    c.handle_response(*resp, now);
                }
            }
            CtxInput::Cancel => {
                self.cancelled = true;
                self.pending.clear();
                self.cancel_branches(now);
            }
            CtxInput::Stop if matches!(self.kind, Kind::Invite) && !self.final_sent => {
                self.stopping = true;
                self.cancelled = true;
                self.pending.clear();
                self.cancel_branches(now);
            }
            CtxInput::Stop => {}
        }
    }

    fn handle_timeouts(&mut self, now: Instant) {
        self.server.handle_timeout(now);
        let mut expired_c = Vec::new();
        for (i, b) in self.branches.iter_mut().enumerate() {
            b.tx.handle_timeout(now);
            if b.timer_c.is_some_and(|t| t <= now) && !b.tx.is_completed() {
                b.timer_c = None;
                expired_c.push(i);
            }
        }
        for (i, b) in self.branches.iter_mut().enumerate() {
            if b.ring_deadline.is_some_and(|t| t <= now) && !b.tx.is_completed() && !b.cancelled {
                b.ring_deadline = None;
                b.ring_expired = true;
                expired_c.push(i);
            }
        }
        for i in expired_c {
            let silent = self
                .branches
                .get(i)
                .is_some_and(|b| b.ring_expired && !b.tx.got_response());
            if silent {
                // Nothing at all came back (no provisional, so no CANCEL may go yet, §9.1):
                // stop waiting for this server and go on.
                tracing::debug!("Ring timeout on a silent branch: giving it up");
                self.handle_branch_event(i, ClientEvent::Timeout);
                continue;
            }
            if self.branches.get(i).is_some_and(|b| b.cancel_sent) {
                // Cancelled, yet no final answer within 64*T1: the branch is given up as 408
                // (RFC 3261 §16.10 lets a proxy stop waiting), so the caller gets an answer.
                tracing::debug!("Cancelled branch never answered: giving it up");
                self.handle_branch_event(i, ClientEvent::Timeout);
            } else {
                tracing::debug!("Timer C or the ring timeout fired: cancelling a branch");
                self.cancel_branch(i, now);
            }
        }
        for (c, _) in &mut self.cancels {
            c.handle_timeout(now);
        }
    }

    /// Sends everything the transactions queued and handles their events, until quiet.
    async fn flush(&mut self) {
        loop {
            let mut progressed = false;
            for resp in std::mem::take(&mut self.direct) {
                progressed = true;
                self.core
                    .send(&self.upstream, &Message::Response(resp))
                    .await;
            }
            while let Some(resp) = self.server.poll_transmit() {
                progressed = true;
                self.core
                    .send(&self.upstream, &Message::Response(resp))
                    .await;
            }
            while self.server.poll_event().is_some() {}
            let mut events = Vec::new();
            for (i, b) in self.branches.iter_mut().enumerate() {
                while let Some(req) = b.tx.poll_transmit() {
                    progressed = true;
                    if let Err(e) = self
                        .core
                        .transport
                        .send(&b.target, &Message::Request(req))
                        .await
                    {
                        tracing::debug!(target = %b.target, error = %e, "Branch send failed");
                        b.tx.handle_transport_error(Instant::now());
                    }
                }
                while let Some(ev) = b.tx.poll_event() {
                    events.push((i, ev));
                }
            }
            for (c, target) in &mut self.cancels {
                while let Some(req) = c.poll_transmit() {
                    progressed = true;
                    self.core.send(target, &Message::Request(req)).await;
                }
                while c.poll_event().is_some() {}
            }
            for (i, ev) in events {
                progressed = true;
                self.handle_branch_event(i, ev);
            }
            if !progressed {
                break;
            }
        }
    }

    fn handle_branch_event(&mut self, i: usize, ev: ClientEvent) {
        let now = Instant::now();
        match ev {
            ClientEvent::Provisional(mut resp) => {
                proto::service::strip_relay_headers(&mut resp.headers);
                let Some(b) = self.branches.get_mut(i) else {
                    return;
                };
                if resp.status > 100 {
                    b.timer_c = Some(now + TIMER_C);
                }
                if b.cancel_pending {
                    b.cancel_pending = false;
                    self.send_cancel(i, now);
                }
                if resp.status > 100 && !self.final_sent {
                    resp.headers.remove_first("Via");
                    self.restore_cseq(&mut resp);
                    self.server.send_response(resp, now);
                }
            }
            ClientEvent::Final(mut resp) => {
                let status = resp.status;
                let first_final = self
                    .branches
                    .get(i)
                    .is_some_and(|b| b.final_status.is_none());
                if let Some(b) = self.branches.get_mut(i) {
                    b.final_status = Some(status);
                }
                resp.headers.remove_first("Via");
                self.restore_cseq(&mut resp);
                // Only the relay speaks these; a copy in a response is forged.
                proto::service::strip_relay_headers(&mut resp.headers);
                if (200..300).contains(&status) {
                    if let Some(ack) = self.branches.get(i).and_then(|b| b.released.clone()) {
                        // A retransmission of a 2xx the relay released: ACK it again.
                        let core = self.core.clone();
                        let target = self.branches[i].target;
                        tokio::spawn(
                            async move { core.send(&target, &Message::Request(ack)).await },
                        );
                        return;
                    }
                    let first_2xx = self.branches.get(i).is_some_and(|b| !b.answered);
                    if let Some(b) = self.branches.get_mut(i) {
                        b.answered = true;
                    }
                    // A 2xx nobody wants: another server already won (first, sequential), or
                    // with `all` the caller has cancelled the servers still deciding after
                    // taking its sessions. The relay ends that dialog itself.
                    let unwanted = if self.fork == Fork::All {
                        self.cancelled && self.final_sent
                    } else {
                        self.winner.is_some_and(|w| w != i)
                    };
                    let lost =
                        unwanted && self.attempt.as_ref().is_some_and(|a| a.service.is_some());
                    if lost && first_2xx {
                        // Another server already has this session: the one that answered
                        // late gets ACK and BYE from the relay, and the client never sees it
                        // (so never pays for it).
                        self.release(i, &resp);
                        return;
                    }
                    if first_2xx && self.winner.is_none() {
                        self.winner = Some(i);
                    }
                    // Every 2xx goes up at once (further 2xx pass through the Accepted state),
                    // but for the 200 for BYE that tells the client its charge: that waits
                    // until the charge is in the store.
                    let commit = if first_2xx {
                        self.note_answered(i, &mut resp)
                    } else {
                        None
                    };
                    self.final_sent = true;
                    if let Some(commit) = commit {
                        self.held = Some((resp, commit));
                    } else if matches!(
                        self.server.state(),
                        State::Completed | State::Confirmed | State::Terminated
                    ) {
                        // A 2xx after a 6xx was relayed: RFC 3261 §16.7 step 5 still forwards
                        // it, past the server transaction that already holds the 6xx.
                        self.direct.push(resp);
                    } else {
                        self.server.send_response(resp, now);
                    }
                    // `--fork all`: every server that accepts becomes a session of its own;
                    // otherwise the first 2xx wins and the other branches are cancelled.
                    if first_2xx && self.fork != Fork::All {
                        self.pending.clear();
                        self.cancel_others(i, now);
                    } else if first_2xx {
                        // `--fork all`: the servers still deciding get a last window (the
                        // sequential ring time) to join, then they are cancelled.
                        let window =
                            now + Duration::from_millis(self.core.config.sequential_timeout_ms);
                        for b in &mut self.branches {
                            if b.final_status.is_none() && b.ring_deadline.is_none() {
                                b.ring_deadline = Some(window);
                            }
                        }
                    }
                } else if !first_final {
                    // A retransmitted final response: the transaction handles it.
                } else if status >= 600 {
                    self.pending.clear();
                    self.cancel_others(i, now);
                    self.send_final(resp, Some(i));
                } else {
                    let rang_out = status == 487
                        && !self.cancelled
                        && self.branches.get(i).is_some_and(|b| b.ring_expired);
                    let resp = if rang_out {
                        // Cancelled by the relay because it rang too long: a timeout.
                        self.local_response(408, None)
                    } else {
                        resp
                    };
                    self.keep_best(resp, i);
                    self.next_or_best(now);
                }
            }
            ClientEvent::Timeout | ClientEvent::TransportError => {
                let first_final = self
                    .branches
                    .get(i)
                    .is_some_and(|b| b.final_status.is_none());
                if !first_final {
                    return;
                }
                let status = if matches!(ev, ClientEvent::Timeout) {
                    408
                } else {
                    503
                };
                if let Some(b) = self.branches.get_mut(i) {
                    b.final_status = Some(status);
                }
                let resp = message::make_response(
                    self.server.request(),
                    status,
                    None,
                    Some(&message::new_tag()),
                );
                self.keep_best(resp, i);
                self.next_or_best(now);
            }
            ClientEvent::Terminated => {}
        }
    }

    /// Answers to an in-dialog request whose CSeq the relay shifted get the original back.
    fn restore_cseq(&self, resp: &mut Response) {
        if let Some(v) = &self.original_cseq {
            resp.headers.set("CSeq", v.clone());
        }
    }

    /// Ends, from the relay, the dialog a late 2xx created (another server won the session):
    /// ACK it, then BYE it.
    fn release(&mut self, i: usize, resp: &Response) {
        let Some(b) = self.branches.get_mut(i) else {
            return;
        };
        // The relay ends the dialog as its UAC on this side: ACK and BYE built from the dialog
        // the 2xx made with the INVITE the relay sent, as the agents build theirs. Route
        // entries naming the relay itself are its own Record-Route: they are dropped.
        let invite = b.tx.request();
        let Some(mut dialog) = Dialog::uac(invite, resp) else {
            return;
        };
        let core = &self.core;
        dialog
            .route_set
            .retain(|r| NameAddr::parse(r).map_or(true, |na| !core.is_self_uri(&na.uri)));
        let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
        let mut ack = dialog.ack(seq);
        let mut bye = dialog.request(Method::Bye);
        bye.headers
            .push("Reason", "SIP;cause=200;text=\"answered elsewhere\"");
        let target = b.target;
        push_via(
            &self.core,
            &mut ack,
            target.transport,
            &message::new_branch(),
        );
        push_via(
            &self.core,
            &mut bye,
            target.transport,
            &message::new_branch(),
        );
        b.released = Some(ack.clone());
        tracing::info!(server = ?b.info.as_ref().map(|x| x.server.clone()), "Late 2xx released: the session went to another server");
        let core = self.core.clone();
        tokio::spawn(async move {
            core.send(&target, &Message::Request(ack)).await;
            let _ = crate::session::supervise::request(&core, bye, target).await;
        });
    }

    /// A branch failed: with `--fork sequential` the next server is tried, else (or when none is
    /// left) the best answer goes up once every branch has ended.
    fn next_or_best(&mut self, now: Instant) {
        if !self.final_sent && !self.cancelled {
            while let Some(next) = self.pending.pop_front() {
                if self.start_branch(next, now, false) {
                    return;
                }
            }
        }
        self.pending.clear();
        self.maybe_send_best();
    }

    /// RFC 3261 §16.7 step 6: 6xx beats everything, else the lowest class; within 4xx a real
    /// answer beats a timeout.
    fn keep_best(&mut self, resp: Response, branch: usize) {
        let rank = |s: u16| -> u32 {
            match s {
                600..=699 => 0,
                300..=399 => 1,
                408 => 3,
                400..=499 => 2,
                500..=599 => 4,
                _ => 5,
            }
        };
        let better = match &self.best {
            None => true,
            Some((b, _)) => rank(resp.status) < rank(b.status),
        };
        if better {
            self.best = Some((resp, Some(branch)));
        }
    }

    fn maybe_send_best(&mut self) {
        if self.final_sent
            || !self.pending.is_empty()
            || self.branches.iter().any(|b| b.final_status.is_none())
        {
            return;
        }
        if let Some((best, branch)) = self.best.take() {
            self.send_final(best, branch);
        }
    }

    /// Sends the final answer; for an INVITE that made no session, its `failed` record (with
    /// the session id and server of `branch`, the one whose answer this is, when the relay
    /// vouched for a session there).
    fn send_final(&mut self, resp: Response, branch: Option<usize>) {
        if self.final_sent {
            return;
        }
        // The relay cancelled the callees because it is stopping: the caller learns that, not
        // a 487 for a CANCEL it never sent.
        let resp = if self.stopping && resp.status == 487 {
            self.stopping_response()
        } else {
            resp
        };
        self.final_sent = true;
        if let Some(attempt) = &self.attempt {
            let offered = branch
                .and_then(|i| self.branches.get(i))
                .and_then(|b| b.info.as_ref());
            self.core.sessions.failed(
                attempt,
                offered,
                resp.status,
                self.failure_reason(resp.status),
            );
        }
        // Any final response to a BYE ends the session (RFC 3261 §15: the sender considers
        // it ended whatever the answer), billed to when the BYE was relayed.
        if let Kind::Bye {
            call_id,
            from_tag,
            to_tag,
        } = &self.kind
        {
            let _ = self.core.sessions.bye_answered(
                call_id,
                from_tag,
                to_tag,
                resp.status,
                Instant::now(),
            );
        }
        self.server.send_response(resp, Instant::now());
    }

    /// A 2xx is being relayed: tells session control. For the 200 that ends a session and tells
    /// the client its charge, returns the commit to wait for before it goes up.
    fn note_answered(&mut self, i: usize, resp: &mut Response) -> Option<Commit> {
        match &self.kind {
            Kind::Invite => {
                let (Some(attempt), Ok(from), Ok(to)) = (&self.attempt, resp.from(), resp.to())
                else {
                    return None;
                };
                let (Some(ft), Some(tt)) = (from.tag(), to.tag()) else {
                    return None;
                };
                let invite = self.server.request();
                let caller_contact = first_contact(&invite.headers).unwrap_or_default();
                let callee_contact = first_contact(&resp.headers).unwrap_or_default();
                // Requests reach the caller where its INVITE came from (the TCP connection it
                // opened; for UDP the packet's source, which also gets through a NAT); the
                // callee where the INVITE went. Never where only a Contact points.
                let caller_target = Some(self.source);
                let branch = self.branches.get(i);
                let callee_target = branch.map(|b| b.target);
                let leg = |header: &str, contact: String, target: Option<Target>| Leg {
                    header: header.to_string(),
                    contact,
                    target: target
                        .map(|t| crate::session::target_string(&t))
                        .unwrap_or_default(),
                };
                let answer = Answer {
                    caller_tag: ft.to_string(),
                    callee_tag: tt.to_string(),
                    status: resp.status,
                    session_id: branch.and_then(|b| b.info.as_ref().map(|x| x.session_id.clone())),
                    server: branch.and_then(|b| b.info.as_ref().map(|x| x.server.clone())),
                    legs: [
                        leg(
                            invite.headers.get("From").unwrap_or_default(),
                            caller_contact,
                            caller_target,
                        ),
                        leg(
                            resp.headers.get("To").unwrap_or_default(),
                            callee_contact,
                            callee_target,
                        ),
                    ],
                    targets: [Some(self.source), callee_target],
                    invite_cseq: invite.cseq().map(|c| c.seq).unwrap_or(1),
                };
                self.core.sessions.answered(attempt, answer, Instant::now());
                None
            }
            Kind::Bye {
                call_id,
                from_tag,
                to_tag,
            } => {
                let ended = self.core.sessions.bye_answered(
                    call_id,
                    from_tag,
                    to_tag,
                    resp.status,
                    Instant::now(),
                );
                // The 200 for a BYE waits until the ended record is in the store: the client
                // learns what its session cost from it, and whatever a party looks up after
                // its hang-up is the final record.
                let (by, charge, commit) = ended?;
                if let (Party::Caller, Some(charge)) = (by, charge) {
                    resp.headers.set(CHARGE_HEADER, charge.to_header());
                }
                Some(commit)
            }
            Kind::Other => None,
        }
    }

    fn cancel_others(&mut self, winner: usize, now: Instant) {
        for i in 0..self.branches.len() {
            if i != winner {
                self.cancel_branch(i, now);
            }
        }
    }

    /// The caller's CANCEL: every branch still pending is cancelled, also after a 2xx went up
    /// (RFC 3261 §16.10), so a `--fork all` server that has not answered yet stops ringing.
    fn cancel_branches(&mut self, now: Instant) {
        for i in 0..self.branches.len() {
            self.cancel_branch(i, now);
        }
    }

    fn cancel_branch(&mut self, i: usize, now: Instant) {
        let Some(b) = self.branches.get_mut(i) else {
            return;
        };
        if b.cancelled || b.tx.is_completed() || b.tx.request().method != Method::Invite {
            return;
        }
        b.cancelled = true;
        if b.tx.got_response() {
            self.send_cancel(i, now);
        } else {
            b.cancel_pending = true;
        }
    }

    fn send_cancel(&mut self, i: usize, now: Instant) {
        let give_up = now + self.core.timers.t1 * 64;
        let Some(b) = self.branches.get_mut(i) else {
            return;
        };
        b.cancel_sent = true;
        b.timer_c = Some(give_up);
        let b = &self.branches[i];
        let cancel = message::make_cancel(b.tx.request());
        let target = b.target;
        let tx = ClientTransaction::new(cancel, target.is_reliable(), self.core.timers, now);
        let key = tx.key().clone();
        self.core.register_context(key.clone(), self.me.clone());
        self.keys.push(key);
        self.cancels.push((tx, target));
    }

    fn respond(&mut self, resp: Response) {
        if (200..700).contains(&resp.status) {
            self.final_sent = true;
        }
        // An attempt's refusal has its own line (`Attempt failed`); others are logged here.
        if self.attempt.is_none() {
            log_refusal(&self.core, self.server.request(), &resp, &self.source);
        }
        self.server.send_response(resp, Instant::now());
    }

    fn local_response(&self, status: u16, reason: Option<&str>) -> Response {
        message::make_response(
            self.server.request(),
            status,
            reason,
            Some(&message::new_tag()),
        )
    }

    /// Decides what to do with a request the [`screen`] let through: forward it (the copies
    /// and where they go) or answer it here.
    async fn decide(&mut self, mut req: Request, plan: Plan) -> Result<Vec<Forward>, Response> {
        pop_self_routes(&self.core, &mut req);
        // Only the relay speaks these; a copy from anyone else is forged.
        proto::service::strip_relay_headers(&mut req.headers);
        let call_id = req.call_id().unwrap_or_default().to_string();
        match plan {
            Plan::InDialog {
                call_id,
                from_tag,
                to_tag,
            } => {
                return self
                    .decide_in_dialog(req, &call_id, &from_tag, &to_tag)
                    .await;
            }
            Plan::Register => {
                let user = self.authenticate(&req, Role::Registrar).await?;
                let resp = registrar::handle(&self.core, &req, &user, &self.source).await;
                return Err(resp);
            }
            Plan::Foreign(next) => {
                let caller = self.authenticate(&req, Role::Proxy).await?;
                if req.method == Method::Invite {
                    self.begin_attempt(call_id, caller, foreign_callee(&req), None);
                }
                return Ok(vec![Forward::plain(req, Target::udp(next))]);
            }
            Plan::Denied => {
                let caller = self.authenticate(&req, Role::Proxy).await?;
                self.begin_attempt(call_id, caller, foreign_callee(&req), None);
                return Err(self.fail_because(403, RELAYING_DENIED, "relaying-denied"));
            }
            Plan::Local => {}
        }
        let caller = self.authenticate(&req, Role::Proxy).await?;
        let callee = req.uri.user.clone().unwrap_or_default();
        let body = if req.method == Method::Invite && carries_service_request(&req) {
            match ServiceRequest::parse(&req.body) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::debug!(error = %Esc(&e.to_string()), "Bad service request");
                    self.begin_attempt(call_id, caller, callee, None);
                    return Err(self.fail_because(400, "Bad service request", "bad-request"));
                }
            }
        } else {
            None
        };
        let host = req.uri.host_key();
        let facts = Facts {
            ruri_user: &callee,
            ruri_host: &host,
            caller: &caller,
            body: body.as_ref(),
        };
        let destination = match self.core.catalog.resolve(&self.core.store, &facts).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for the service directory");
                if req.method == Method::Invite {
                    self.begin_attempt(call_id, caller, callee, None);
                }
                return Err(self.fail(500, Some("Service directory unavailable")));
            }
        };
        if let Destination::Service {
            service,
            servers,
            servers_only,
            ..
        } = destination
        {
            if req.method != Method::Invite {
                let mut resp = self.local_response(405, None);
                resp.headers.push("Allow", "INVITE");
                return Err(resp);
            }
            return self
                .service_forwards(req, call_id, caller, service, (servers, servers_only), body)
                .await;
        }
        if req.method == Method::Invite {
            self.begin_attempt(call_id, caller, callee.clone(), None);
        }
        // No account has a longer name: refused before any lookup.
        if callee.len() > crate::config::MAX_USER_LEN {
            return Err(self.fail(404, None));
        }
        let known = match self.core.auth.credentials(&self.core.store, &callee).await {
            Ok(v) => v.is_some(),
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for location lookup");
                return Err(self.fail(500, Some("Location service unavailable")));
            }
        };
        if !known {
            return Err(self.fail(404, None));
        }
        let bindings = match self
            .core
            .location
            .lookup(&self.core.store, &callee, now_ms())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for location lookup");
                return Err(self.fail(500, Some("Location service unavailable")));
            }
        };
        let mut forwards = Vec::new();
        for b in bindings {
            let Ok(contact) = Uri::parse(&b.contact) else {
                continue;
            };
            let Some(target) = crate::location::binding_target(&self.core.transport, &b) else {
                continue;
            };
            let mut copy = req.clone();
            copy.uri = contact;
            forwards.push(Forward::plain(copy, target));
        }
        if forwards.is_empty() {
            return Err(self.fail(480, None));
        }
        Ok(forwards)
    }

    /// A service INVITE: one copy for each application server registered for the service (only
    /// the rule's servers, in its order, when a rule named some), each carrying the relay's
    /// signed assertion for that server.
    async fn service_forwards(
        &mut self,
        req: Request,
        call_id: String,
        caller: String,
        service: crate::store::ServiceRow,
        (servers, servers_only): (Option<Vec<String>>, bool),
        body: Option<ServiceRequest>,
    ) -> Result<Vec<Forward>, Response> {
        let details = body.as_ref().and_then(|b| b.detail().map(str::to_string));
        self.fork = service.fork;
        self.begin_attempt(
            call_id.clone(),
            caller.clone(),
            service.name.clone(),
            Some(ServiceInfo {
                name: service.name.clone(),
                tariff: crate::billing::Tariff {
                    per_minute_minor: service.per_minute_minor,
                    setup_fee_minor: service.setup_fee_minor,
                    increment_secs: service.increment_secs,
                    currency: service.currency.clone(),
                },
                max_duration_secs: service.max_duration_secs,
                details: details.clone(),
            }),
        );
        let store = &self.core.store;
        let bindings = match self
            .core
            .location
            .lookup(store, &service.name, now_ms())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for location lookup");
                return Err(self.fail(500, Some("Location service unavailable")));
            }
        };
        // Only servers that may still deliver the service (the operator may have withdrawn
        // the right since they registered).
        let mut candidates = Vec::new();
        for b in bindings {
            let Some(account) = b.account.clone() else {
                continue;
            };
            match self.core.catalog.rights(store, &account).await {
                Ok(rights) if rights.contains(&service.name) => candidates.push((account, b)),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "Store unavailable for server rights");
                    return Err(self.fail(500, Some("Service directory unavailable")));
                }
            }
        }
        // A stable order (what `--fork sequential` follows): the rule's servers in its order,
        // else by account name.
        candidates.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.contact.cmp(&y.contact)));
        if let Some(list) = &servers {
            if servers_only {
                candidates.retain(|(a, _)| list.contains(a));
            }
            // The rule's servers first, in its order; any others after them.
            candidates.sort_by_key(|(a, _)| list.iter().position(|x| x == a).unwrap_or(usize::MAX));
        }
        let exp = now_unix() + self.core.config.assertion_ttl_secs;
        let mut forwards = Vec::new();
        for (account, b) in candidates {
            let Ok(contact) = Uri::parse(&b.contact) else {
                continue;
            };
            let Some(target) = crate::location::binding_target(&self.core.transport, &b) else {
                continue;
            };
            let creds = match self.core.auth.credentials(store, &account).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "Store unavailable for account lookup");
                    return Err(self.fail(500, Some("Service directory unavailable")));
                }
            };
            let session_id = uuid::Uuid::new_v4().to_string();
            let assertion = Assertion {
                user: caller.clone(),
                sid: session_id.clone(),
                service: service.name.clone(),
                server: account.clone(),
                call_id: call_id.clone(),
                detail: details.clone(),
                exp,
            }
            .sign(&proto::service::assertion_key(&creds.ha1_sha256));
            let mut copy = req.clone();
            copy.uri = contact;
            copy.headers.push(ASSERTION_HEADER, assertion);
            forwards.push(Forward {
                req: copy,
                target,
                info: Some(BranchInfo {
                    session_id,
                    server: account,
                }),
            });
        }
        if forwards.is_empty() {
            return Err(self.fail(480, Some("No server of this service is online")));
        }
        Ok(forwards)
    }

    /// A final failure decided here, recorded for the attempt when there is one.
    fn fail(&mut self, status: u16, reason: Option<&str>) -> Response {
        if let Some(attempt) = &self.attempt {
            self.core
                .sessions
                .failed(attempt, None, status, self.failure_reason(status));
        }
        if self.stopping && status == 503 {
            return self.stopping_response();
        }
        self.local_response(status, reason)
    }

    /// An authenticated INVITE: from here on the attempt leaves exactly one record (a
    /// session's, or a `failed` one).
    fn begin_attempt(
        &mut self,
        call_id: String,
        caller: String,
        callee: String,
        service: Option<ServiceInfo>,
    ) {
        self.kind = Kind::Invite;
        self.attempt = Some(Attempt {
            call_id,
            caller,
            callee,
            created_at_ms: now_ms(),
            service,
        });
    }

    /// Refuses the attempt with `status` and `phrase`; its record says `reason`.
    fn fail_because(&mut self, status: u16, phrase: &str, reason: &str) -> Response {
        if let Some(attempt) = &self.attempt {
            self.core.sessions.failed(attempt, None, status, reason);
        }
        self.local_response(status, Some(phrase))
    }

    /// The record's reason for a failed attempt.
    fn failure_reason(&self, status: u16) -> &'static str {
        if self.stopping && status == 503 {
            "relay-stop"
        } else {
            failure_reason(status)
        }
    }

    /// 503 for an INVITE the stopping relay gives up.
    fn stopping_response(&self) -> Response {
        let mut resp = self.local_response(503, Some(STOPPING));
        resp.headers.push("Retry-After", STOPPING_RETRY_AFTER);
        resp
    }

    /// An in-dialog request goes to the other party of the dialog, where that party's messages
    /// come from (a TCP party over its connection), whatever its Request-URI and Route say.
    async fn decide_in_dialog(
        &mut self,
        mut req: Request,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
    ) -> Result<Vec<Forward>, Response> {
        let Some(target) = self.core.sessions.route(call_id, from_tag, to_tag) else {
            // The dialog ended meanwhile, or the other party can no longer be reached (its TCP
            // connection closed). A BYE ends the session all the same.
            if req.method == Method::Bye {
                let _ =
                    self.core
                        .sessions
                        .bye_answered(call_id, from_tag, to_tag, 480, Instant::now());
            }
            return Err(self.local_response(480, Some("The other party cannot be reached")));
        };
        let original = req.headers.get("CSeq").map(str::to_string);
        self.core
            .sessions
            .in_dialog_request(call_id, from_tag, to_tag, &mut req, Instant::now());
        if req.headers.get("CSeq") != original.as_deref() {
            self.original_cseq = original;
        }
        if req.method == Method::Bye {
            self.kind = Kind::Bye {
                call_id: call_id.to_string(),
                from_tag: from_tag.to_string(),
                to_tag: to_tag.to_string(),
            };
            // The callee hung up: the session ends now, and the caller's copy goes once the
            // record is in the store (saying what it cost, for a service), so whatever the
            // caller then looks up is the final record.
            if let Some((charge, commit)) =
                self.core
                    .sessions
                    .bye_relayed(call_id, from_tag, to_tag, Instant::now())
            {
                let stored = commit.wait(COMMIT_WAIT).await;
                match charge {
                    Some(charge) if stored => {
                        req.headers.push(CHARGE_HEADER, charge.to_header());
                    }
                    Some(_) => {
                        tracing::warn!(call_id = %Esc(call_id), "The session's record is not in the store yet: its BYE goes without the charge");
                    }
                    None => {}
                }
            }
        }
        Ok(vec![Forward::plain(req, target)])
    }

    async fn authenticate(&self, req: &Request, role: Role) -> Result<String, Response> {
        match self
            .core
            .auth
            .check(&self.core.store, req, role, now_unix())
            .await
        {
            Outcome::Authenticated(user) => Ok(user),
            Outcome::Challenge { stale, failed } => {
                // One line per refusal, with the source (for fail2ban and the like), a few per
                // source and interval at most.
                let ip = self.source.addr.ip();
                if let Some((user, why)) = failed {
                    if self.core.transport.admit_log(ip) {
                        tracing::info!(
                            source = %ip,
                            user = %Esc(&user),
                            method = %req.method,
                            "Authentication failed: {why}"
                        );
                    }
                }
                let mut resp = self.local_response(role.status(), None);
                for value in self.core.auth.challenges(stale, now_unix()) {
                    resp.headers.push(role.challenge_header(), value);
                }
                Err(resp)
            }
        }
    }

    fn start_branches(&mut self, forwards: Vec<Forward>) {
        let now = Instant::now();
        let in_dialog = matches!(self.kind, Kind::Bye { .. })
            || forwards
                .first()
                .is_some_and(|f| f.req.to().ok().and_then(|t| t.tag().map(|_| ())).is_some());
        let mut forwards: VecDeque<Forward> = forwards.into();
        while let Some(f) = forwards.pop_front() {
            self.start_branch(f, now, in_dialog);
            if self.fork == Fork::Sequential && !self.branches.is_empty() {
                // One server at a time: the rest wait for this one to fail.
                self.pending = forwards;
                break;
            }
        }
        if self.branches.is_empty() {
            let resp = self.fail(483, None);
            self.respond(resp);
        }
    }

    /// Starts one branch; false when it cannot go (Max-Forwards exhausted).
    fn start_branch(&mut self, f: Forward, now: Instant, in_dialog: bool) -> bool {
        let Forward {
            mut req,
            target,
            info,
        } = f;
        let upstream_transport = self.source.transport;
        if decrement_max_forwards(&mut req).is_none() {
            return false;
        }
        consume_credentials(&mut req, self.core.auth.realm());
        if !in_dialog
            && matches!(
                req.method,
                Method::Invite | Method::Subscribe | Method::Refer
            )
        {
            if target.transport != upstream_transport {
                // RFC 5658: one entry for each side, the callee's side on top.
                req.headers.push_front(
                    "Record-Route",
                    record_route_value(&self.core, upstream_transport),
                );
            }
            req.headers.push_front(
                "Record-Route",
                record_route_value(&self.core, target.transport),
            );
        }
        push_via(
            &self.core,
            &mut req,
            target.transport,
            &message::new_branch(),
        );
        let tx = ClientTransaction::new(req, target.is_reliable(), self.core.timers, now);
        let key = tx.key().clone();
        self.core.register_context(key.clone(), self.me.clone());
        self.keys.push(key);
        let invite = tx.request().method == Method::Invite;
        let timer_c = invite.then(|| now + TIMER_C);
        let ring_deadline = (invite && self.fork == Fork::Sequential)
            .then(|| now + Duration::from_millis(self.core.config.sequential_timeout_ms));
        self.branches.push(Branch {
            tx,
            target,
            timer_c,
            cancel_pending: false,
            cancelled: false,
            cancel_sent: false,
            final_status: None,
            info,
            ring_deadline,
            ring_expired: false,
            released: None,
            answered: false,
        });
        true
    }
}

/// Whether an INVITE's body is a service request (by its content type).
fn carries_service_request(req: &Request) -> bool {
    !req.body.is_empty()
        && req.headers.get("Content-Type").is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(proto::service::SERVICE_REQUEST_TYPE)
        })
}

/// The callee of a call to a foreign domain, as its record names it: `user@host`.
fn foreign_callee(req: &Request) -> String {
    format!(
        "{}@{}",
        req.uri.user.clone().unwrap_or_default(),
        req.uri.host
    )
}

/// The URI of the first Contact, as text.
fn first_contact(headers: &message::Headers) -> Option<String> {
    match message::contacts(headers).ok()?.into_iter().next()? {
        message::Contact::Addr(na) => Some(na.uri.to_string()),
        message::Contact::Star => None,
    }
}

/// Removes the Proxy-Authorization the relay consumed (RFC 3261 §22.3: credentials for this
/// realm are not passed on).
fn consume_credentials(req: &mut Request, realm: &str) {
    let needle = format!("realm=\"{realm}\"");
    req.headers.0.retain(|h| {
        !(h.name.eq_ignore_ascii_case("Proxy-Authorization") && h.value.contains(&needle))
    });
}

fn failure_reason(status: u16) -> &'static str {
    match status {
        404 => "unknown-user",
        408 => "timeout",
        480 => "not-registered",
        486 | 600 => "busy",
        487 => "cancelled",
        403 | 603 => "declined",
        500..=599 => "server-error",
        _ => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_name_the_outcome() {
        assert_eq!(failure_reason(486), "busy");
        assert_eq!(failure_reason(487), "cancelled");
        assert_eq!(failure_reason(480), "not-registered");
        assert_eq!(failure_reason(408), "timeout");
    }
}
