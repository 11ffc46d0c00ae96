//! `relay drain` on a running relay (SPEC feature 11, seed file 003): an order in the store
//! moves the matching sessions this relay carries to an additional server. Each client gets a
//! REFER inside its session, from the relay on the server's behalf, to the same service at the
//! additional relay (`;redirected`, so it is not redirected again, and `;from-session=`, so the
//! records are linked); when the client reports (NOTIFY) that the new session is established,
//! the relay ends the first one (`drained`). The relay then leaves its report in the store,
//! which `relay drain` prints.

use super::supervise::{end, request};
use super::{DialogKey, EndReason, Party, Sessions};
use crate::core::Core;
use crate::store::{DrainOrder, DrainReport};
use proto::sip::message::{Method, Transport};
use proto::sync::lock;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One check of the store at a time.
static BUSY: AtomicBool = AtomicBool::new(false);

/// A session to move: where it is, its id and service.
struct Candidate {
    key: DialogKey,
    sid: String,
    service: String,
}

impl Sessions {
    /// The established service sessions an order matches (its service, its server), among those
    /// that were there when it was given (not the ones it brought here).
    fn drain_candidates(&self, order: &DrainOrder) -> Vec<Candidate> {
        lock(&self.by_call)
            .values()
            .flatten()
            .filter(|s| s.started.is_some() && !s.ending && s.bye_from.is_none())
            .filter(|s| s.cdr.created_at_ms <= order.created_at_ms)
            .filter_map(|s| {
                let service = s.d.service.as_ref()?.name.clone();
                let wanted = order.service.as_ref().is_none_or(|x| *x == service)
                    && order
                        .appserver
                        .as_ref()
                        .is_none_or(|a| s.cdr.server.as_ref() == Some(a));
                wanted.then(|| Candidate {
                    key: s.key(),
                    sid: s.cdr.id.clone(),
                    service,
                })
            })
            .collect()
    }

    /// A request of the relay's own to `to` in the dialog `key` (from the other party's side,
    /// its CSeq shifted past theirs).
    fn own_in_dialog(
        &self,
        key: &DialogKey,
        method: Method,
        to: Party,
        via: &dyn Fn(Transport) -> String,
    ) -> Option<super::Outgoing> {
        self.with_session(&key.call_id, &key.caller_tag, &key.callee_tag, |s| {
            let transport = s.targets[to.index()]
                .map(|t| t.transport)
                .unwrap_or(Transport::Udp);
            s.own_request(method, to, &via(transport))
        })
        .flatten()
    }

    /// Marks a session as being moved: the client's NOTIFY of an established new session
    /// ends it.
    fn mark_draining(&self, key: &DialogKey, on: bool) {
        self.with_session(&key.call_id, &key.caller_tag, &key.callee_tag, |s| {
            s.draining = on
        });
    }

    /// A NOTIFY is being relayed in a dialog: when the session is being moved and the NOTIFY
    /// reports a 2xx (message/sipfrag), the session to end now.
    pub fn drained_by_notify(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        body: &[u8],
    ) -> Option<DialogKey> {
        let ok = std::str::from_utf8(body)
            .ok()
            .and_then(|b| b.lines().next())
            .and_then(|l| l.split_whitespace().nth(1))
            .is_some_and(|code| code.starts_with('2'));
        if !ok {
            return None;
        }
        self.with_session(call_id, from_tag, to_tag, |s| {
            let from_caller = s.party_of(from_tag) == Party::Caller;
            (s.draining && from_caller).then(|| {
                s.draining = false;
                s.key()
            })
        })
        .flatten()
    }
}

/// Carries out the orders this relay has not reported on yet (called every few seconds).
pub async fn check(core: &Arc<Core>) {
    if BUSY.swap(true, Ordering::AcqRel) {
        return;
    }
    let node = core.lease.node_id.clone();
    match core.store.pending_drains(&node).await {
        Ok(orders) => {
            for order in orders {
                let report = carry_out(core, &order).await;
                tracing::info!(
                    drain = order.id,
                    to = %order.target,
                    moved = report.moved,
                    failed = report.failed,
                    "Drain carried out"
                );
                if let Err(e) = core.store.report_drain(order.id, &report).await {
                    tracing::warn!(drain = order.id, error = %e, "Could not report a drain");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "Could not read drain orders"),
    }
    BUSY.store(false, Ordering::Release);
}

async fn carry_out(core: &Arc<Core>, order: &DrainOrder) -> DrainReport {
    let mut report = DrainReport {
        node: core.lease.node_id.clone(),
        moved: 0,
        redirected: 0,
        failed: 0,
        problems: String::new(),
    };
    let candidates = core.sessions.drain_candidates(order);
    let Some(to) = core.additional.iter().find(|a| a.name == order.target) else {
        report.failed = i64::try_from(candidates.len()).unwrap_or(i64::MAX);
        if !candidates.is_empty() {
            report.problems = format!(
                "this relay knows no additional server {:?} (--additional {}=sip:IP:PORT)",
                order.target, order.target
            );
        }
        return report;
    };
    let mut tasks = Vec::new();
    for c in candidates {
        let refer_to = format!(
            "<{};{}>",
            proto::service::transfer_uri(&c.service, &to.addr.to_string(), &c.sid, false),
            proto::service::REDIRECTED_PARAM
        );
        let via = |t: Transport| core.identity.via(t, &proto::sip::message::new_branch());
        let Some(mut out) = core
            .sessions
            .own_in_dialog(&c.key, Method::Refer, Party::Caller, &via)
        else {
            continue;
        };
        out.request.headers.push("Refer-To", refer_to);
        out.request
            .headers
            .push("Referred-By", format!("<sip:{}>", core.identity.domain));
        core.sessions.mark_draining(&c.key, true);
        let core = core.clone();
        tasks.push(tokio::spawn(async move {
            let answer = request(&core, out.request, out.target).await;
            let status = answer.map(|r| r.status);
            if !status.is_some_and(|s| (200..300).contains(&s)) {
                core.sessions.mark_draining(&c.key, false);
            }
            (c.sid, status)
        }));
    }
    // Registered users: a REFER outside any dialog to the additional relay (`client-agent`
    // registers there when it comes from the relay it is registered with); one that refuses
    // (baresip 501, linphone 603) is redirected on its next call (the command's rule). Each
    // device is asked by the relay it registered with (several relays carry out one order).
    let now = proto::clock::now_ms();
    let bindings = core.store.all_bindings(now).await.unwrap_or_default();
    let mine = |b: &crate::store::Binding| {
        b.node
            .as_deref()
            .is_none_or(|n| n == core.lease.node_id.as_str())
    };
    let mut asked = Vec::new();
    for b in bindings
        .into_iter()
        .filter(|b| b.account.is_none() && mine(b))
    {
        let (core, addr) = (core.clone(), to.addr);
        asked.push(tokio::spawn(async move {
            refer_registered(&core, &b, addr).await
        }));
    }
    for t in asked {
        if t.await
            .ok()
            .flatten()
            .is_some_and(|s| (200..300).contains(&s))
        {
            report.moved += 1;
        } else {
            report.redirected += 1;
        }
    }
    for t in tasks {
        let Ok((sid, status)) = t.await else { continue };
        match status {
            Some(200..=299) => report.moved += 1,
            Some(s) => {
                report.failed += 1;
                report.problems.push_str(&format!(
                    "session {sid}: the client answered the REFER {s}\n"
                ));
            }
            None => {
                report.failed += 1;
                report.problems.push_str(&format!(
                    "session {sid}: the client did not answer the REFER\n"
                ));
            }
        }
    }
    report
}

/// REFER outside any dialog to a registered device: `<sip:ADDR;redirected>`, `Refer-Sub:
/// false` (RFC 4488: no NOTIFY). Its final status, if any.
async fn refer_registered(
    core: &Arc<Core>,
    b: &crate::store::Binding,
    to: std::net::SocketAddr,
) -> Option<u16> {
    let target = crate::location::binding_target(&core.transport, b)?;
    let uri = proto::sip::message::Uri::parse(&b.contact).ok()?;
    let domain = &core.identity.domain;
    let mut headers = proto::sip::message::Headers::default();
    headers.push("Max-Forwards", "70");
    headers.push(
        "From",
        format!("<sip:{domain}>;tag={}", proto::sip::message::new_tag()),
    );
    headers.push("To", format!("<sip:{}@{domain}>", b.aor));
    headers.push("Call-ID", proto::sip::message::new_call_id());
    headers.push("CSeq", "1 REFER");
    headers.push("Contact", format!("<sip:{}>", core.identity.advertised));
    headers.push(
        "Refer-To",
        format!("<sip:{to};{}>", proto::service::REDIRECTED_PARAM),
    );
    headers.push("Refer-Sub", "false");
    let mut req = proto::sip::message::Request {
        method: Method::Refer,
        uri,
        headers,
        body: Default::default(),
    };
    core.identity.push_via(
        &mut req,
        target.transport,
        &proto::sip::message::new_branch(),
    );
    request(core, req, target).await.map(|r| r.status)
}

/// Ends a session the client left for the additional relay.
pub fn ended_by_move(core: &Arc<Core>, key: DialogKey) {
    let core = core.clone();
    tokio::spawn(async move { end(&core, &key, EndReason::Drained).await });
}
