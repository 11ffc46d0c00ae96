//! Request reception: what the relay does with a new request before any lookup. The
//! [`screen`] refuses, once and statelessly, everything that fails before authentication; the
//! rest becomes a [`Plan`] for the transaction context. A CANCEL is answered here and passed to
//! the context of its INVITE.

use super::{ALLOW, RELAYING_DENIED, fnv1a};
use crate::auth::Role;
use crate::core::{Core, CtxInput};
use proto::clock::now_unix;
use proto::log::Esc;
use proto::sip::message::{self, Message, Method, Request, Response};
use proto::sip::transaction::TxKey;
use proto::transport::{Target, response_target};
use std::net::SocketAddr;
use std::sync::Arc;

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
    /// A request for an additional server this relay knows (a client following a redirect
    /// through this relay as its outbound proxy, or a request of such a dialog): passed on
    /// without authentication (the additional relay authenticates), record or Record-Route.
    Pass(SocketAddr),
    /// A request from an additional server in a dialog it carries, for a client registered
    /// here (which sends through this relay): to where that client's registration came from.
    FromPeer,
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
    if let Some(next) = to_additional(core, req) {
        if mf == Some(0) {
            return Err(answer(483, None));
        }
        return Ok(Plan::Pass(next));
    }
    if let Some(to_tag) = to.tag() {
        let call_id = req.call_id().unwrap_or_default();
        let from_tag = from.tag().unwrap_or_default();
        if !core.sessions.knows(call_id, from_tag, to_tag) {
            // A caller's request in the dialog of a watch (auto-redial): answered here.
            if let Some(resp) =
                core.watches
                    .in_dialog(req, from_tag, to_tag, core.identity.advertised.ip())
            {
                return Err(resp);
            }
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
        // The relay's domain (any port), or its own address and port.
        if !core.identity.is_local_host(&host, req.uri.port) {
            return Err(answer(403, Some("Not a domain served here")));
        }
        if let Some(ext) = req.headers.get("Require") {
            let mut resp = answer(420, None);
            resp.headers.push("Unsupported", ext.trim());
            return Err(resp);
        }
        (Role::Registrar, Plan::Register)
    } else {
        let plan = if core.identity.is_local_host(&host, req.uri.port) {
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
        screen @ (crate::auth::Screen::Challenge | crate::auth::Screen::Stale) => {
            let stale = screen == crate::auth::Screen::Stale;
            let mut resp = answer(role.status(), None);
            for value in core.auth.challenges(stale, now_unix()) {
                resp.headers.push(role.challenge_header(), value);
            }
            Err(resp)
        }
        crate::auth::Screen::NameTooLong => Err(answer(403, Some("User name too long"))),
    }
}

/// The additional server a request is for: a Request-URI marked `;redirected` naming one
/// (a client following the redirect through this relay), or, in a dialog, a first Route naming
/// one (after this relay's own). Never anything else: this is no open proxy.
pub fn to_additional(core: &Core, req: &Request) -> Option<SocketAddr> {
    let known = |uri: &proto::sip::message::Uri| {
        let ip: std::net::IpAddr = uri
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let addr = SocketAddr::new(ip, uri.port.unwrap_or(5060));
        core.additional
            .iter()
            .any(|a| a.addr == addr)
            .then_some(addr)
    };
    if req.method != Method::Register && req.uri.param(proto::service::REDIRECTED_PARAM).is_some() {
        if let Some(addr) = known(&req.uri) {
            return Some(addr);
        }
    }
    if req.to().ok()?.tag().is_some() {
        for value in req.headers.get_all("Route") {
            for part in value.split(',') {
                let Ok(na) = proto::sip::message::NameAddr::parse(part.trim()) else {
                    return None;
                };
                if core.identity.is_self_uri(&na.uri) {
                    continue;
                }
                return known(&na.uri);
            }
        }
    }
    None
}

/// Whether `req` comes from an additional server in a dialog this relay does not carry (one
/// whose client sends through this relay): see [`Plan::FromPeer`].
pub fn from_peer(core: &Core, req: &Request, source: &Target) -> bool {
    if !core.additional.iter().any(|a| a.addr == source.addr) {
        return false;
    }
    let Ok(to) = req.to() else {
        return false;
    };
    let Some(to_tag) = to.tag() else {
        return false;
    };
    let from = req.from();
    let from_tag = from.as_ref().ok().and_then(|f| f.tag()).unwrap_or_default();
    !core
        .sessions
        .knows(req.call_id().unwrap_or_default(), from_tag, to_tag)
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
