//! The agent's shared state and its handling of every SIP request: INVITE decisions (assertion,
//! admission, the service URL with its token), CANCEL, ACK, BYE, in-dialog keepalives, and the
//! server-side hang-up.
//!
//! The only module that sends SIP for sessions. It takes its decisions from
//! [`crate::assertion`] and [`crate::admission`], keeps sessions in [`crate::sessions`], and
//! never answers an INVITE the relay did not vouch for with anything but 403.

use crate::admission::{Admission, DecisionRequest, Refusal};
use crate::assertion::Verifier;
use crate::cli::Settings;
use crate::now_unix;
use crate::output::{EndedBy, Event, Output};
use crate::registration::{self};
use crate::sessions::{Closing, Session, Sessions, Slot, new_token};
use bytes::Bytes;
use proto::sdp;
use proto::service::{SERVICE_ACCESS_TYPE, ServiceAccess, ServiceRequest};
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Method, Response};
use proto::sip::transaction::{ClientEvent, TxKey};
use proto::ua::{self, Endpoint, ServerRequest};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Methods the agent answers.
pub(crate) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, MESSAGE, NOTIFY";

/// Whether the agent should keep running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Halt {
    Running,
    /// A [`Stopper`] asked for a stop.
    Requested,
    /// Something the agent cannot do without stopped working.
    Failed(String),
}

/// State shared by the SIP loop, the session tasks and the HTTP API.
pub(crate) struct Core {
    pub(crate) ep: Arc<Endpoint>,
    pub(crate) settings: Settings,
    pub(crate) verifier: Verifier,
    pub(crate) admission: Admission,
    pub(crate) sessions: Arc<Sessions>,
    /// Charges on their way to the relay.
    pub(crate) billing: Arc<crate::billing::Billing>,
    /// INVITEs being decided, by server transaction key: a CANCEL fires their sender.
    pub(crate) pending: Mutex<HashMap<TxKey, oneshot::Sender<()>>>,
    pub(crate) out: Output,
    pub(crate) stopping: AtomicBool,
    pub(crate) halt: Arc<watch::Sender<Halt>>,
    /// Set while the relay's assertions do not verify with this account's key (its password
    /// was changed at the relay): when it was last said, and what.
    pub(crate) unvouched: Mutex<Option<(std::time::Instant, String)>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("account", &self.settings.account)
            .field("sip", &self.ep.advertised)
            .finish_non_exhaustive()
    }
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
    /// The client's Allow lists UPDATE.
    allow_update: bool,
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
    pub(crate) fn handle(self: &Arc<Self>, req: ServerRequest) {
        let r = &req.request;
        let in_dialog = r.to().ok().is_some_and(|t| t.tag().is_some());
        match r.method {
            Method::Ack => {
                if let Some(sid) = self.sessions.find(r) {
                    self.sessions.acked(&sid);
                    if let Ok(c) = r.cseq() {
                        self.sessions.ack_seq(&sid, c.seq);
                    }
                }
            }
            Method::Cancel => self.cancel(&req),
            _ if in_dialog => self.in_dialog(req),
            Method::Invite => {
                // Registered before the next message is read, so a CANCEL right behind the
                // INVITE finds it.
                let key = TxKey::server(r).or_else(|| TxKey::server_2543(r));
                let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
                if let Some(k) = &key {
                    lock(&self.pending).insert(k.clone(), cancel_tx);
                }
                // In JSON logs every line about this INVITE carries its Call-ID.
                let span = if proto::log::spans() {
                    tracing::info_span!(
                        "transaction",
                        method = "INVITE",
                        call_id = %proto::log::Esc(r.call_id().unwrap_or_default()),
                    )
                } else {
                    tracing::Span::none()
                };
                tokio::spawn(tracing::Instrument::instrument(
                    self.clone().invite(req, key, cancel_rx),
                    span,
                ));
            }
            Method::Options => self.respond(&req, 200, None),
            Method::Bye => self.respond(&req, 481, None),
            _ => self.respond(&req, 405, None),
        }
    }

    fn in_dialog(self: &Arc<Self>, req: ServerRequest) {
        let r = &req.request;
        let Some(sid) = self.sessions.find(r) else {
            self.respond(&req, 481, None);
            return;
        };
        let changes = matches!(r.method, Method::Invite | Method::Update)
            && ServiceRequest::of_change(&r.headers, &r.body).is_some();
        if changes {
            // A service change: decided like a session (crate::change).
            self.change_asked(req, sid);
            return;
        }
        if req.request.method == Method::Invite {
            // A re-INVITE without a service request: the session goes on unchanged, answered
            // with SDP (crate::change).
            self.media_reinvite(req, sid);
            return;
        }
        let req = &req;
        match r.method {
            Method::Bye => {
                // With --billing on-bye, the session's charges ride in the 200 OK for the
                // client's BYE (the relay takes them out); a BYE of the relay's own
                // (Relay-End) records nothing it carries, so they go over gRPC instead.
                let mut ok = message::make_response(&req.request, 200, None, None);
                let from_client = r.headers.get(proto::service::END_HEADER).is_none();
                if let Some(body) = from_client.then(|| self.billing.for_bye(&sid)).flatten() {
                    ok.headers.set("Content-Type", proto::charge::CONTENT_TYPE);
                    ok.body = body.into_bytes().into();
                }
                req.respond(ok);
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
            // How the client follows a REFER of ours (RFC 3515): the status line it reports.
            Method::Notify => {
                self.respond(req, 200, None);
                let frag = String::from_utf8_lossy(&r.body);
                let status = frag.lines().next().unwrap_or("").trim();
                if !status.is_empty() {
                    self.out.emit(Event::Referred {
                        sid: sid.clone(),
                        status: crate::admission::sanitize_reason(status),
                    });
                }
            }
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
        let allow_update = r
            .headers
            .get_all("Allow")
            .flat_map(|v| v.split(','))
            .any(|m| m.trim().eq_ignore_ascii_case("UPDATE"));
        Ok(Accepted {
            allow_update,
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
                sdp: a.sdp_answer.is_some(),
                dialog: a.dialog,
                acked: false,
                closing: false,
                wake: wake.clone(),
                allow_update: a.allow_update,
                ack_seq: 0,
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
    pub(crate) fn send_bye(
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

    /// Sends `body` (a charges document) in an INFO within the session and waits for the
    /// relay's final answer; `None` when the session is not live here or nothing answered.
    pub(crate) async fn send_charges_info(&self, sid: &str, body: String) -> Option<Response> {
        // Not before the ACK (the dialog is confirmed for both then): a moment's wait.
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        while self.sessions.awaits_ack(sid) && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (mut info, dialog) = self.sessions.request(sid, Method::Info)?;
        let hop = dialog
            .next_hop()
            .and_then(|uri| ua::uri_target(&uri, self.settings.transport))?;
        info.headers
            .set("Content-Type", proto::charge::CONTENT_TYPE);
        info.body = body.into_bytes().into();
        let info = self.ep.with_via(info, hop.transport);
        let mut events = self.ep.request(info, hop);
        ua::final_response(&mut events).await
    }

    /// [`Core::send_bye`], logging the answer in the background.
    pub(crate) fn spawn_bye(&self, dialog: Dialog, sid: String) {
        let Some(mut events) = self.send_bye(dialog, &sid) else {
            return;
        };
        let span = if proto::log::spans() {
            tracing::info_span!("session", session_id = %sid)
        } else {
            tracing::Span::none()
        };
        tokio::spawn(tracing::Instrument::instrument(
            async move {
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
            },
            span,
        ));
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

use proto::sync::lock;

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
