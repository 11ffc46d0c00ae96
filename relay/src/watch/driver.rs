//! The watch task and what it sends: the relay's 200 that starts a watch, its REFER when the
//! target registers, its BYE when the period runs out (see the parent module).

use super::{BYE_AFTER_REFER, Cmd, WATCH_HEADER, Watch, WatchDialog};
use crate::core::Core;
use crate::store::WatchRow;
use proto::clock::now_ms;
use proto::log::Esc;
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Method, Request, Response, Uri};
use proto::sync::lock;
use proto::transport::Target;
use std::sync::Arc;
use std::time::Duration;

/// Starts a watch for `req` (an authenticated INVITE from `caller` to `target`, not
/// registered): the 200 to give the caller (with an SDP answer to an SDP offer), once the watch
/// is in the store. `None` when the request asks for no watch or it cannot be kept.
pub async fn start(
    core: &Core,
    req: &Request,
    source: Target,
    caller: &str,
    target: &str,
) -> Option<Response> {
    let secs: u64 = req.uri.param("wait")??.parse().ok()?;
    if secs == 0 {
        return None;
    }
    let secs = secs.min(core.config.max_watch_secs);
    let deadline_ms = now_ms().saturating_add(i64::try_from(secs).ok()?.saturating_mul(1000));
    let local_tag = message::new_tag();
    let mut ok = message::make_response(req, 200, Some("Watching"), Some(&local_tag));
    let transport = if source.transport == message::Transport::Tcp {
        ";transport=tcp"
    } else {
        ""
    };
    let contact = format!("<sip:watch@{}{transport}>", core.identity.advertised);
    ok.headers.push("Contact", contact.as_str());
    ok.headers.push(
        WATCH_HEADER,
        format!("{target};until={}", deadline_ms / 1000),
    );
    ok.headers
        .push("Allow", "INVITE, ACK, BYE, OPTIONS, NOTIFY");
    if proto::sdp::is_sdp(req.headers.get("Content-Type")) {
        let answer = proto::sdp::answer(
            &req.body,
            core.identity.advertised.ip(),
            proto::clock::now_unix(),
        )?;
        ok.headers.push("Content-Type", "application/sdp");
        ok.body = answer.into_bytes().into();
    }
    let from = req.from().ok()?;
    let remote_target =
        message::contacts(&req.headers)
            .ok()?
            .into_iter()
            .find_map(|c| match c {
                message::Contact::Addr(na) => Some(na.uri.to_string()),
                _ => None,
            })?;
    let dialog = WatchDialog {
        call_id: req.call_id()?.to_string(),
        local_tag: local_tag.clone(),
        remote_tag: from.tag()?.to_string(),
        local: ok.headers.get("To")?.to_string(),
        remote: req.headers.get("From")?.to_string(),
        remote_target,
        source: format!(
            "{}:{}",
            source.transport.as_str().to_ascii_lowercase(),
            source.addr
        ),
        cseq: 0,
        contact,
    };
    let w = Watch {
        id: uuid::Uuid::new_v4().to_string(),
        caller: caller.to_string(),
        target: target.to_string(),
        deadline_ms,
        dialog,
        fired: false,
    };
    let row = WatchRow {
        id: w.id.clone(),
        caller: w.caller.clone(),
        target: w.target.clone(),
        deadline_ms,
        dialog: serde_json::to_string(&w.dialog).ok()?,
    };
    if let Err(e) = core.store.add_watch(&core.lease.node_id, &row).await {
        tracing::error!(error = %e, "Store unavailable: no watch");
        return None;
    }
    tracing::info!(caller = %Esc(caller), target = %Esc(target), secs, "Watching");
    core.watches.insert(w);
    Some(ok)
}

/// The watch task: loads this node's watches, fires them when their target registers, ends
/// them when their period runs out.
pub async fn run(core: Arc<Core>) {
    let Some(mut rx) = lock(&core.watches.rx).take() else {
        return;
    };
    match core.store.node_watches(&core.lease.node_id).await {
        Ok(rows) => {
            for r in rows {
                let Ok(dialog) = serde_json::from_str::<WatchDialog>(&r.dialog) else {
                    continue;
                };
                core.watches.insert(Watch {
                    id: r.id,
                    caller: r.caller,
                    target: r.target,
                    deadline_ms: r.deadline_ms,
                    // A margin over what the previous run may have used.
                    dialog: WatchDialog {
                        cseq: dialog.cseq.saturating_add(100),
                        ..dialog
                    },
                    fired: false,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "Could not read the watches of a previous run"),
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Registered(target)) => {
                    for w in core.watches.fire_for(&target) {
                        tokio::spawn(fire(core.clone(), w));
                    }
                }
                Some(Cmd::Forget(id)) => {
                    let _ = core.store.remove_watch(&id).await;
                }
                None => return,
            },
            _ = tick.tick() => {
                for w in core.watches.expired(now_ms()) {
                    tokio::spawn(expire(core.clone(), w));
                }
            }
        }
    }
}

/// The target registered: REFER to it, then the watch's dialog ends.
async fn fire(core: Arc<Core>, w: Watch) {
    let _ = core.store.remove_watch(&w.id).await;
    // The relay's own address: the caller reaches it without DNS, whatever route it has.
    let refer_to = format!("<sip:{}@{}>", w.target, core.identity.advertised);
    tracing::info!(caller = %Esc(&w.caller), target = %Esc(&w.target), "Watched target registered: REFER");
    if let Some((mut req, to)) = request(&core, &w, Method::Refer) {
        req.headers.push("Refer-To", refer_to);
        req.headers
            .push("Referred-By", format!("<sip:{}>", core.identity.domain));
        let answer = crate::session::supervise::request(&core, req, to).await;
        tracing::debug!(status = ?answer.map(|r| r.status), "Watch REFER answered");
    }
    tokio::time::sleep(BYE_AFTER_REFER).await;
    // The caller hangs the watch's dialog up itself once its call is placed (client-agent
    // does); otherwise the relay does.
    if core.watches.has_call(&w.dialog.call_id) {
        bye(&core, &w, "referred").await;
    }
    core.watches.forget_call(&w.dialog.call_id);
}

/// The period ran out: the dialog ends.
async fn expire(core: Arc<Core>, w: Watch) {
    tracing::info!(caller = %Esc(&w.caller), target = %Esc(&w.target), "Watch expired");
    let _ = core.store.remove_watch(&w.id).await;
    core.watches.insert(Watch {
        fired: true,
        ..w.clone()
    });
    bye(&core, &w, "watch-expired").await;
    core.watches.forget_call(&w.dialog.call_id);
}

async fn bye(core: &Arc<Core>, w: &Watch, why: &str) {
    if let Some((mut req, to)) = request(core, w, Method::Bye) {
        req.headers.push(proto::service::END_HEADER, why);
        let _ = crate::session::supervise::request(core, req, to).await;
    }
}

/// A request of the relay's in a watch's dialog, and where it goes.
fn request(core: &Core, w: &Watch, method: Method) -> Option<(Request, Target)> {
    let seq = core
        .watches
        .next_cseq(&w.dialog.call_id)
        .unwrap_or(w.dialog.cseq.saturating_add(1));
    let d = &w.dialog;
    let to = crate::location::parse_source(&d.source)?;
    let mut dialog = Dialog {
        call_id: d.call_id.clone(),
        local_tag: d.local_tag.clone(),
        remote_tag: d.remote_tag.clone(),
        local: d.local.clone(),
        remote: d.remote.clone(),
        local_seq: seq.saturating_sub(1),
        remote_target: Uri::parse(&d.remote_target).ok()?,
        route_set: Vec::new(),
        local_contact: d.contact.clone(),
    };
    let mut req = dialog.request(method);
    core.identity
        .push_via(&mut req, to.transport, &message::new_branch());
    Some((req, to))
}
