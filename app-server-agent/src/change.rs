//! Service change and referral at the agent (SPEC features 8 and 9, the seed's Embodiments 5
//! and 6).
//!
//! A change the client asks for comes as a re-INVITE or UPDATE that the relay searched again
//! and relays with a fresh assertion naming the service and details now asked for: it is
//! decided like a session (the account's own service, the decision webhook, asked with the same
//! session id) and answered 200 with the service URL, or refused, which leaves the session as
//! it was. A change the web service asks for (`POST /sessions/{id}/change`) goes to the client
//! through the relay, which searches again: as UPDATE when the client's INVITE allowed it, else
//! as re-INVITE (baresip 1.0 answers UPDATE 501).

use crate::core::{ALLOW, Core, with_token};
use crate::now_unix;
use crate::output::Event;
use bytes::Bytes;
use proto::service::{SERVICE_ACCESS_TYPE, SERVICE_REQUEST_TYPE, ServiceAccess, ServiceRequest};
use proto::sip::message::{self, Method, Response};
use proto::ua::{self, ServerRequest};
use std::sync::Arc;
use std::time::Instant;

/// What became of a change the web service asked for.
#[derive(Debug)]
pub(crate) enum Changed {
    /// The client accepted it.
    Done { method: &'static str },
    /// No live, acknowledged session of that id.
    NotLive,
    /// The relay or the client refused it: the status, its phrase, and the service to
    /// transfer to when the relay named one.
    Refused {
        status: u16,
        reason: String,
        transfer_to: Option<String>,
    },
    /// Nothing answered.
    NoAnswer,
}

impl Core {
    /// A new request of ours in session `sid` (acknowledged), its dialog and next hop.
    fn in_session(
        &self,
        sid: &str,
        method: Method,
    ) -> Option<(
        proto::sip::message::Request,
        proto::sip::dialog::Dialog,
        proto::transport::Target,
    )> {
        let (req, dialog) = self.sessions.request(sid, method)?;
        let hop = dialog
            .next_hop()
            .and_then(|uri| ua::uri_target(&uri, self.settings.transport))?;
        Some((req, dialog, hop))
    }

    /// A re-INVITE or UPDATE with a service request in session `sid`: decided in a task.
    pub(crate) fn change_asked(self: &Arc<Self>, req: ServerRequest, sid: String) {
        tokio::spawn(self.clone().decide_change(req, sid));
    }

    async fn decide_change(self: Arc<Self>, req: ServerRequest, sid: String) {
        let r = &req.request;
        let refuse = |status: u16, reason: &str, why: String| {
            req.respond(message::make_response(r, status, Some(reason), None));
            tracing::info!(%sid, status, %why, "Service change refused");
            self.out.emit(Event::ChangeRefused {
                sid: sid.clone(),
                status,
                why,
            });
        };
        let Some(session) = self.sessions.get(&sid).filter(|s| s.acked) else {
            refuse(
                491,
                "Session not established",
                "not acknowledged yet".into(),
            );
            return;
        };
        let a = match self.verifier.check_change(r, &sid, now_unix()) {
            Ok(a) => a,
            Err(e) => {
                refuse(
                    403,
                    "Not vouched for by the relay",
                    format!("not vouched for by the relay ({e})"),
                );
                return;
            }
        };
        if let Err(refusal) = self.admission.check_service(&a.service) {
            refuse(refusal.status, &refusal.reason, refusal.why);
            return;
        }
        let request = match ServiceRequest::of_change(&r.headers, &r.body) {
            Some(Ok(q)) => q,
            None => ServiceRequest::default(),
            Some(Err(e)) => {
                refuse(400, "Bad service request", e.to_string());
                return;
            }
        };
        // A softphone's re-INVITE keeps SDP in its body: the answer is SDP, the URL beside.
        let sdp_answer = if proto::sdp::is_sdp(r.headers.get("Content-Type")) {
            match proto::sdp::answer(&r.body, self.ep.advertised.ip(), now_unix()) {
                Some(a) => Some(a),
                None => {
                    refuse(488, "Not Acceptable Here", "unusable SDP offer".into());
                    return;
                }
            }
        } else {
            None
        };
        let detail = a
            .detail
            .clone()
            .or_else(|| request.detail().map(str::to_string));
        let asked = self
            .admission
            .ask(&crate::admission::DecisionRequest {
                user: &a.user,
                session_id: &sid,
                service: &a.service,
                detail: detail.as_deref(),
                fields: &request.fields,
                call_id: &a.call_id,
                server: &self.settings.account,
            })
            .await;
        if let Err(refusal) = asked {
            refuse(refusal.status, &refusal.reason, refusal.why);
            return;
        }
        if self
            .sessions
            .changed(&sid, &a.service, detail.clone())
            .is_none()
        {
            refuse(481, "Session ended", "the session ended meanwhile".into());
            return;
        }
        let mut ok = message::make_response(r, 200, None, None);
        ok.headers
            .push("Contact", session.dialog.local_contact.as_str());
        ok.headers.push("Allow", ALLOW);
        let url = with_token(&self.settings.url, &session.token);
        match sdp_answer {
            Some(answer) => {
                ok.headers
                    .push("Call-Info", format!("<{url}>;purpose=info"));
                ok.headers.push("Content-Type", "application/sdp");
                ok.body = Bytes::from(answer);
            }
            None => {
                ok.headers.push("Content-Type", SERVICE_ACCESS_TYPE);
                ok.body = Bytes::from(
                    ServiceAccess {
                        url,
                        service: a.service.clone(),
                        session_id: sid.clone(),
                        server: self.settings.account.clone(),
                    }
                    .to_json(),
                );
            }
        }
        req.respond(ok.clone());
        tracing::info!(%sid, service = %a.service, ?detail, "Service changed by the client");
        self.out.emit(Event::Changed {
            sid: sid.clone(),
            user: a.user,
            service: a.service,
            detail,
            by_client: true,
        });
        if r.method == Method::Invite {
            self.until_acked(&req, ok, &sid).await;
        }
    }

    /// A re-INVITE without a service request (a softphone's hold or resume, RFC 3264): the
    /// session goes on, its media stays inactive; 200 with an SDP answer (linphone holds the
    /// first call when it follows a REFER, and sends its NOTIFYs only once that is answered).
    pub(crate) fn media_reinvite(self: &Arc<Self>, req: ServerRequest, sid: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let r = &req.request;
            let answer = proto::sdp::is_sdp(r.headers.get("Content-Type"))
                .then(|| proto::sdp::answer(&r.body, this.ep.advertised.ip(), now_unix()))
                .flatten();
            let Some(answer) = answer else {
                req.respond(message::make_response(
                    r,
                    488,
                    Some("Session changes not supported"),
                    None,
                ));
                return;
            };
            let Some(session) = this.sessions.get(&sid) else {
                req.respond(message::make_response(r, 481, None, None));
                return;
            };
            let mut ok = message::make_response(r, 200, None, None);
            ok.headers
                .push("Contact", session.dialog.local_contact.as_str());
            ok.headers.push("Allow", ALLOW);
            ok.headers.push("Content-Type", "application/sdp");
            ok.body = Bytes::from(answer);
            req.respond(ok.clone());
            this.until_acked(&req, ok, &sid).await;
        });
    }

    /// Retransmits the 2xx to a re-INVITE until its ACK (RFC 3261 §13.3.1.4; unreliable
    /// transports only).
    async fn until_acked(&self, req: &ServerRequest, ok: Response, sid: &str) {
        if req.source.is_reliable() {
            return;
        }
        let seq = req.request.cseq().map(|c| c.seq).unwrap_or(0);
        let t1 = self.settings.t1;
        let give_up = Instant::now() + t1.saturating_mul(64);
        let mut interval = t1;
        while Instant::now() < give_up {
            tokio::time::sleep(interval).await;
            if self.sessions.acked_seq(sid, seq) {
                return;
            }
            req.respond(ok.clone());
            interval = interval.saturating_mul(2).min(t1.saturating_mul(8));
        }
    }

    /// The web service changes session `sid` to what `request` asks for: UPDATE to a client
    /// that allows it, else re-INVITE (ACKed on 2xx), through the relay, which searches again.
    pub(crate) async fn change(&self, sid: &str, request: &ServiceRequest) -> Changed {
        let Some(session) = self.sessions.get(sid).filter(|s| s.acked && !s.closing) else {
            return Changed::NotLive;
        };
        let method = if session.allow_update {
            Method::Update
        } else {
            Method::Invite
        };
        let Some((mut req, dialog, hop)) = self.in_session(sid, method) else {
            return Changed::NotLive;
        };
        let url = with_token(&self.settings.url, &session.token);
        req.headers.push("Contact", dialog.local_contact.as_str());
        req.headers.push("Allow", ALLOW);
        req.headers
            .push("Call-Info", format!("<{url}>;purpose=info"));
        if session.sdp {
            // A softphone: SDP stays the body (it would refuse another), the service request
            // rides in a header it ignores and the relay reads.
            req.headers
                .push(proto::service::SERVICE_REQUEST_HEADER, request.to_header());
            req.headers.push("Content-Type", "application/sdp");
            req.body = Bytes::from(proto::sdp::offer(self.ep.advertised.ip(), now_unix()));
        } else {
            req.headers.push("Content-Type", SERVICE_REQUEST_TYPE);
            req.body = Bytes::from(request.to_json());
        }
        let seq = req.cseq().map(|c| c.seq).unwrap_or(1);
        let req = self.ep.with_via(req, hop.transport);
        let mut events = self.ep.request(req, hop);
        let answer = ua::final_response(&mut events).await;
        let Some(resp) = answer else {
            self.out.emit(Event::ChangeRefused {
                sid: sid.to_string(),
                status: 408,
                why: "no answer".into(),
            });
            return Changed::NoAnswer;
        };
        if !(200..300).contains(&resp.status) {
            let transfer_to = resp
                .headers
                .get(proto::service::TRANSFER_HEADER)
                .map(|v| v.trim().to_string());
            self.out.emit(Event::ChangeRefused {
                sid: sid.to_string(),
                status: resp.status,
                why: resp.reason.clone(),
            });
            return Changed::Refused {
                status: resp.status,
                reason: resp.reason,
                transfer_to,
            };
        }
        if method == Method::Invite {
            if let Err(e) = self.ep.send_stateless(dialog.ack(seq), hop).await {
                tracing::warn!(%sid, error = %e, "ACK for the re-INVITE not sent");
            }
        }
        let detail = request.detail().map(str::to_string);
        // The relay says which service the session runs under now.
        let service = resp
            .headers
            .get(proto::service::SERVICE_HEADER)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or(session.service);
        if let Some(user) = self.sessions.changed(sid, &service, detail.clone()) {
            tracing::info!(%sid, ?detail, "Service changed by the web service");
            self.out.emit(Event::Changed {
                sid: sid.to_string(),
                user,
                service,
                detail,
                by_client: false,
            });
        }
        Changed::Done {
            method: if method == Method::Invite {
                "INVITE"
            } else {
                "UPDATE"
            },
        }
    }
}

/// What became of a referral the web service asked for.
#[derive(Debug)]
pub(crate) enum Referred {
    /// The client accepted the REFER (it now places the new session, and reports in NOTIFYs).
    Accepted {
        status: u16,
    },
    NotLive,
    Refused {
        status: u16,
        reason: String,
    },
    NoAnswer,
}

impl Core {
    /// The web service refers session `sid`'s client to `service` (RFC 3515 REFER inside the
    /// session, through the relay): the client asks the relay for a session of that service
    /// that continues this one (`;from-session=SID` in the Refer-To URI, a parameter because
    /// softphones copy that URI into their INVITE as it is), and the relay ends this one once
    /// the new one is established, unless `keep`.
    pub(crate) async fn refer(&self, sid: &str, service: &str, keep: bool) -> Referred {
        let Some(session) = self.sessions.get(sid).filter(|s| s.acked && !s.closing) else {
            return Referred::NotLive;
        };
        let Some((mut req, dialog, hop)) = self.in_session(sid, Method::Refer) else {
            return Referred::NotLive;
        };
        // The relay's address, not its domain: a softphone without a route for the domain
        // (linphone sends a referred call where the URI points) must not need DNS.
        let relay = self.settings.relay.to_string();
        let target = proto::service::transfer_uri(service, &relay, &session.sid, keep);
        req.headers.push("Refer-To", format!("<{target}>"));
        req.headers.push(
            "Referred-By",
            format!("<sip:{}@{}>", self.settings.account, self.settings.domain),
        );
        req.headers.push("Contact", dialog.local_contact.as_str());
        let req = self.ep.with_via(req, hop.transport);
        let mut events = self.ep.request(req, hop);
        let answer = ua::final_response(&mut events).await;
        match answer {
            Some(r) if (200..300).contains(&r.status) => {
                tracing::info!(%sid, %service, keep, "Client referred to another service");
                Referred::Accepted { status: r.status }
            }
            Some(r) => Referred::Refused {
                status: r.status,
                reason: r.reason,
            },
            None => Referred::NoAnswer,
        }
    }
}
