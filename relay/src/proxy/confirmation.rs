//! Confirmation relay: what passes the relay outside any transaction context. The ACK for a
//! 2xx goes along its dialog to the other party (never where only a header points), with a
//! branch derived from the incoming one; a retransmitted 2xx of a known dialog, after its
//! INVITE's context ended, goes on by its next Via.

use super::fnv1a;
use super::inquiry::decrement_max_forwards;
use crate::core::Core;
use crate::session::{EndReason, Replaced};
use crate::store::ClusterEvent;
use proto::log::Esc;
use proto::sip::message::{Message, Method, Request, Response};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        // An ACK of a dialog an additional relay carries (its client sends through this one).
        if let Some(next) = super::reception::to_additional(&core, &req) {
            core.identity.pop_self_routes(&mut req);
            if decrement_max_forwards(&mut req).is_none() {
                return;
            }
            let branch = derived_branch(&req);
            let target = proto::transport::Target::udp(next);
            core.identity.push_via(&mut req, target.transport, &branch);
            core.send(&target, &Message::Request(req)).await;
            return;
        }
        // Most often the ACK of a refusal answered statelessly (the 407 challenge).
        tracing::debug!(call_id = %Esc(&call_id), "ACK matching no transaction and no dialog dropped");
        return;
    }
    core.identity.pop_self_routes(&mut req);
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
    let branch = derived_branch(&req);
    let (ftag, ttag) = (ftag.to_string(), ttag.to_string());
    core.sessions
        .in_dialog_request(&call_id, &ftag, &ttag, &mut req, Instant::now());
    core.identity.push_via(&mut req, target.transport, &branch);
    let replaced = core.sessions.acked(
        &call_id,
        &ftag,
        &ttag,
        Duration::from_secs(core.config.keepalive_secs),
        Instant::now(),
    );
    core.send(&target, &Message::Request(req)).await;
    match replaced {
        // A transfer: the user is in the new session now; the first one ends here.
        Some(Replaced::Here(first)) => {
            let core = core.clone();
            tokio::spawn(async move {
                crate::session::supervise::end(&core, &first, EndReason::Transferred).await;
            });
        }
        // Or at the relay that carries it (several relays on one database).
        Some(Replaced::Elsewhere(id)) => {
            let event = ClusterEvent::End {
                session: id,
                reason: EndReason::Transferred.as_str().to_owned(),
            };
            if let Err(e) = core.store.announce(&event).await {
                tracing::warn!(error = %e, "Could not ask the other relays to end a transferred session");
            }
        }
        None => {}
    }
}

/// The branch of a statelessly forwarded ACK, derived from the incoming one, so a retransmitted
/// ACK leaves with the same branch (RFC 3261 §16.11).
fn derived_branch(req: &Request) -> String {
    let incoming = req
        .top_via()
        .ok()
        .and_then(|v| v.branch().map(str::to_string))
        .unwrap_or_default();
    format!("z9hG4bK{:016x}", fnv1a(incoming.as_bytes()))
}

/// A response no context knows: when its top Via is the relay's, pop it and send the response on
/// per the next Via (2xx retransmissions after the INVITE transaction ended); else drop it.
pub async fn forward_response_stateless(core: Arc<Core>, mut resp: Response) {
    let Ok(top) = resp.top_via() else { return };
    if !core.identity.is_own_via(&top) {
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
