//! The lookups made before an inquiry starts: authentication (`relay::auth`), server search
//! (`relay::search`), the location service and, for a service, the servers that may deliver it
//! with the relay's signed assertion for each. They read the store (and, for a BYE the callee
//! sends, wait until the record holding the charge is committed); what they decide goes to the
//! [`Inquiry`](super::inquiry::Inquiry) as a [`Decision`].

use super::decision::{Action, Decision, Forward, Kind};
use super::reception::Plan;
use super::{COMMIT_WAIT, RELAYING_DENIED};
use crate::auth::{Outcome, Role};
use crate::core::Core;
use crate::registrar;
use crate::search::{Destination, Facts, RedirectFacts};
use crate::session::{
    Attempt, BranchInfo, ChangeRefused, Continues, DialogKey, Party, ServiceInfo,
};
use crate::store::Fork;
use proto::clock::{now_ms, now_unix};
use proto::log::Esc;
use proto::service::{
    ASSERTION_HEADER, Assertion, CHARGE_HEADER, REDIRECTED_PARAM, ServiceRequest, TRANSFER_HEADER,
};
use proto::sip::message::{self, Method, Request, Response, Uri};
use proto::transport::Target;
use std::time::Instant;

/// What the lookups found so far for one request.
struct Decider<'a> {
    core: &'a Core,
    source: Target,
    attempt: Option<Attempt>,
    kind: Kind,
    fork: Fork,
    original_cseq: Option<String>,
    /// A transfer: the session the new one continues.
    continues: Option<Continues>,
}

/// Decides what to do with a request the screen let through: forward it (the copies and where
/// they go) or answer it here.
pub async fn decide(core: &Core, source: Target, req: Request, plan: Plan) -> Decision {
    let mut d = Decider {
        core,
        source,
        attempt: None,
        kind: Kind::Other,
        fork: Fork::First,
        original_cseq: None,
        continues: None,
    };
    let action = d.decide(req, plan).await;
    Decision {
        kind: d.kind,
        attempt: d.attempt,
        fork: d.fork,
        original_cseq: d.original_cseq,
        action,
    }
}

/// A refusal of the attempt with its status and phrase; the record's reason follows the status.
fn refuse(status: u16, phrase: Option<&str>) -> Action {
    Action::Refuse {
        status,
        phrase: phrase.map(str::to_string),
        reason: None,
    }
}

impl Decider<'_> {
    async fn decide(&mut self, mut req: Request, plan: Plan) -> Action {
        let core = self.core;
        core.identity.pop_self_routes(&mut req);
        // Only the relay speaks these; a copy from anyone else is forged.
        proto::service::strip_relay_headers(&mut req.headers);
        let call_id = req.call_id().unwrap_or_default().to_string();
        match plan {
            Plan::InDialog {
                call_id,
                from_tag,
                to_tag,
            } => return self.in_dialog(req, &call_id, &from_tag, &to_tag).await,
            Plan::Register => {
                return match self.authenticate(&req, Role::Registrar).await {
                    Ok(user) => {
                        Action::Answer(registrar::handle(core, &req, &user, &self.source).await)
                    }
                    Err(challenge) => Action::Answer(challenge),
                };
            }
            Plan::Foreign(next) => {
                let caller = match self.authenticate(&req, Role::Proxy).await {
                    Ok(user) => user,
                    Err(challenge) => return Action::Answer(challenge),
                };
                if req.method == Method::Invite {
                    self.begin_attempt(call_id, caller, foreign_callee(&req), None);
                }
                return Action::Forward(vec![Forward::plain(req, Target::udp(next))]);
            }
            Plan::Pass(next) => {
                self.kind = Kind::Pass;
                return Action::Forward(vec![Forward::plain(req, Target::udp(next))]);
            }
            Plan::FromPeer => {
                self.kind = Kind::Pass;
                let user = req
                    .to()
                    .ok()
                    .and_then(|t| t.uri.user.clone())
                    .unwrap_or_default();
                let bindings = self.bindings(&user).await.unwrap_or_default();
                // The device's address, as its registration and its dialog name it (one
                // Contact may carry the user, the other not).
                let wanted = (req.uri.host_key(), req.uri.port.unwrap_or(5060));
                let target = bindings
                    .iter()
                    .filter(|b| {
                        Uri::parse(&b.contact)
                            .is_ok_and(|c| (c.host_key(), c.port.unwrap_or(5060)) == wanted)
                    })
                    .find_map(|b| crate::location::binding_target(&core.transport, b));
                return match target {
                    Some(t) => Action::Forward(vec![Forward::plain(req, t)]),
                    None => Action::Answer(local_response(&req, 481, None)),
                };
            }
            Plan::Denied => {
                let caller = match self.authenticate(&req, Role::Proxy).await {
                    Ok(user) => user,
                    Err(challenge) => return Action::Answer(challenge),
                };
                self.begin_attempt(call_id, caller, foreign_callee(&req), None);
                return Action::Refuse {
                    status: 403,
                    phrase: Some(RELAYING_DENIED.into()),
                    reason: Some("relaying-denied"),
                };
            }
            Plan::Local => {}
        }
        let caller = match self.authenticate(&req, Role::Proxy).await {
            Ok(user) => user,
            Err(challenge) => return Action::Answer(challenge),
        };
        let callee = req.uri.user.clone().unwrap_or_default();
        if req.method == Method::Invite {
            if let Err(refusal) = self.transfer_from(&req, &caller).await {
                self.begin_attempt(call_id, caller, callee, None);
                return refusal;
            }
        }
        let body = if req.method == Method::Invite && carries_service_request(&req) {
            match ServiceRequest::parse(&req.body) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::debug!(error = %Esc(&e.to_string()), "Bad service request");
                    self.begin_attempt(call_id, caller, callee, None);
                    return Action::Refuse {
                        status: 400,
                        phrase: Some("Bad service request".into()),
                        reason: Some("bad-request"),
                    };
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
        let destination = match core.catalog.resolve(&core.store, &facts).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for the service directory");
                if req.method == Method::Invite {
                    self.begin_attempt(call_id, caller, callee, None);
                }
                return refuse(500, Some("Service directory unavailable"));
            }
        };
        if req.method == Method::Invite {
            let target = match &destination {
                Destination::Service { service, .. } => service.name.clone(),
                Destination::User => callee.clone(),
            };
            if let Some(action) = self.redirect(&req, &call_id, &caller, &target).await {
                return action;
            }
        }
        if let Destination::Service {
            service,
            servers,
            servers_only,
            ..
        } = destination
        {
            if req.method != Method::Invite {
                let mut resp = local_response(&req, 405, None);
                resp.headers.push("Allow", "INVITE");
                return Action::Answer(resp);
            }
            return self
                .service(req, call_id, caller, service, (servers, servers_only), body)
                .await;
        }
        if req.method == Method::Invite {
            self.begin_attempt(call_id, caller.clone(), callee.clone(), None);
        }
        // No account has a longer name: refused before any lookup.
        if callee.len() > crate::config::MAX_USER_LEN {
            return refuse(404, None);
        }
        match core.auth.credentials(&core.store, &callee).await {
            Ok(Some(_)) => {}
            Ok(None) => return refuse(404, None),
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for location lookup");
                return refuse(500, Some("Location service unavailable"));
            }
        }
        let bindings = match self.bindings(&callee).await {
            Ok(b) => b,
            Err(refusal) => return refusal,
        };
        if bindings.is_empty() {
            if let Some(watching) = self.watch(&req, &caller, &callee).await {
                return watching;
            }
        }
        let mut forwards = Vec::new();
        for b in bindings {
            let Ok(contact) = Uri::parse(&b.contact) else {
                continue;
            };
            let Some(target) = crate::location::binding_target(&core.transport, &b) else {
                continue;
            };
            let mut copy = req.clone();
            copy.uri = contact;
            forwards.push(Forward::plain(copy, target));
        }
        if forwards.is_empty() {
            return refuse(480, None);
        }
        Action::Forward(forwards)
    }

    /// A service INVITE: one copy for each application server registered for the service (only
    /// the rule's servers, in its order, when a rule named some), each carrying the relay's
    /// signed assertion for that server.
    async fn service(
        &mut self,
        req: Request,
        call_id: String,
        caller: String,
        service: crate::store::ServiceRow,
        (servers, servers_only): (Option<Vec<String>>, bool),
        body: Option<ServiceRequest>,
    ) -> Action {
        let core = self.core;
        let details = body.as_ref().and_then(|b| b.detail().map(str::to_string));
        self.fork = service.fork;
        self.begin_attempt(
            call_id.clone(),
            caller.clone(),
            service.name.clone(),
            Some(service_info(&service, details.clone())),
        );
        let store = &core.store;
        let bindings = match self.bindings(&service.name).await {
            Ok(b) => b,
            Err(refusal) => return refusal,
        };
        // Only servers that may still deliver the service (the operator may have withdrawn
        // the right since they registered).
        let mut candidates = Vec::new();
        for b in bindings {
            let Some(account) = b.account.clone() else {
                continue;
            };
            match core.catalog.rights(store, &account).await {
                Ok(rights) if rights.contains(&service.name) => candidates.push((account, b)),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "Store unavailable for server rights");
                    return refuse(500, Some("Service directory unavailable"));
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
        let exp = now_unix() + core.config.assertion_ttl_secs;
        let mut forwards = Vec::new();
        for (account, b) in candidates {
            let Ok(contact) = Uri::parse(&b.contact) else {
                continue;
            };
            let Some(target) = crate::location::binding_target(&core.transport, &b) else {
                continue;
            };
            let creds = match core.auth.credentials(store, &account).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "Store unavailable for account lookup");
                    return refuse(500, Some("Service directory unavailable"));
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
            if let Some(watching) = self.watch(&req, &caller, &service.name).await {
                return watching;
            }
            return refuse(480, Some("No server of this service is online"));
        }
        Action::Forward(forwards)
    }

    /// A transfer (`;from-session=SID` in the Request-URI, SPEC feature 9): the new session
    /// continues session SID, which must be one of the caller's; with `;keep-first` both go on,
    /// else the relay ends the first (`transferred`) once the new one is established.
    async fn transfer_from(&mut self, req: &Request, caller: &str) -> Result<(), Action> {
        let Some(Some(sid)) = req.uri.param(proto::service::FROM_SESSION_PARAM) else {
            return Ok(());
        };
        let sid = sid.to_string();
        let keep_first = req.uri.param(proto::service::KEEP_FIRST_PARAM).is_some();
        let core = self.core;
        // The first session's record may still wait in the writer's queue.
        core.sessions.flush().await;
        match core.store.cdr(&sid).await {
            Ok(Some(first)) if first.caller == caller => {
                tracing::info!(user = %Esc(caller), first = %Esc(&sid), keep_first, "Transfer");
                self.continues = Some(Continues { sid, keep_first });
                Ok(())
            }
            Ok(_) => Err(refuse(403, Some("Not a session of yours to transfer from"))),
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for a transfer");
                Err(refuse(500, Some("Session records unavailable")))
            }
        }
    }

    /// Redirect to an additional server (seed file 003): a new INVITE matching a redirect rule
    /// whose target this relay knows gets 302 with the Contact of that relay, the same user or
    /// service there (`;redirected`: it is never redirected again). `target` is the service
    /// found, else the called user. `None`: served here.
    async fn redirect(
        &mut self,
        req: &Request,
        call_id: &str,
        caller: &str,
        target: &str,
    ) -> Option<Action> {
        let core = self.core;
        if core.additional.is_empty() || req.uri.param(REDIRECTED_PARAM).is_some() {
            return None;
        }
        let caller_domain = req.from().map(|f| f.uri.host_key()).unwrap_or_default();
        let facts = RedirectFacts {
            caller_domain: &caller_domain,
            service: target,
            sessions: core.sessions.live(),
        };
        let known = |name: &str| core.additional.iter().any(|a| a.name == name);
        let rule = match core.catalog.redirect(&core.store, &facts, known).await {
            Ok(r) => r?,
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for redirect rules");
                return None;
            }
        };
        let to = core.additional.iter().find(|a| a.name == rule.target)?;
        let user = req.uri.user.clone().unwrap_or_default();
        tracing::info!(
            call_id = %Esc(call_id),
            caller = %Esc(caller),
            target = %Esc(target),
            to = %to.name,
            rule = rule.id,
            "Redirected"
        );
        self.begin_attempt(
            call_id.to_string(),
            caller.to_string(),
            target.to_string(),
            None,
        );
        Some(Action::Redirect {
            contact: format!("<sip:{user}@{};{REDIRECTED_PARAM}>", to.addr),
        })
    }

    /// Auto-redial: an INVITE whose target is not registered and that asks for a watch
    /// (`;wait=SECONDS`) is answered 200 by the relay, which watches for the target
    /// (`relay::watch`); the attempt's record says `watching` (480: no session, nothing billed).
    async fn watch(&mut self, req: &Request, caller: &str, target: &str) -> Option<Action> {
        if req.method != Method::Invite {
            return None;
        }
        let ok = crate::watch::start(self.core, req, self.source, caller, target).await?;
        if let Some(attempt) = self.attempt.take() {
            self.core.sessions.failed(&attempt, None, 480, "watching");
        }
        self.kind = Kind::Other;
        Some(Action::Answer(ok))
    }

    /// The bindings of a user or a service; a 500 refusal when the store is not there.
    async fn bindings(&self, aor: &str) -> Result<Vec<crate::store::Binding>, Action> {
        let core = self.core;
        core.location
            .lookup(&core.store, aor, now_ms())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "Store unavailable for location lookup");
                refuse(500, Some("Location service unavailable"))
            })
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
            continues: self.continues.clone(),
        });
    }

    /// An in-dialog request goes to the other party of the dialog, where that party's messages
    /// come from (a TCP party over its connection), whatever its Request-URI and Route say.
    async fn in_dialog(
        &mut self,
        mut req: Request,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
    ) -> Action {
        let sessions = &self.core.sessions;
        // An application server's charges in an INFO: answered here once committed, never
        // relayed (a softphone would answer them 488).
        if req.method == Method::Info && carries_charges(&req) {
            return self.info_charges(&req, call_id, from_tag, to_tag).await;
        }
        let Some(target) = sessions.route(call_id, from_tag, to_tag) else {
            // The dialog ended meanwhile, or the other party can no longer be reached (its TCP
            // connection closed). A BYE ends the session all the same.
            if req.method == Method::Bye {
                let _ = sessions.bye_answered(call_id, from_tag, to_tag, 480, Instant::now());
            }
            return Action::Answer(local_response(
                &req,
                480,
                Some("The other party cannot be reached"),
            ));
        };
        // A change of the service details: searched again, relayed only when the session's
        // server delivers what is asked for now.
        if matches!(req.method, Method::Invite | Method::Update)
            && ServiceRequest::of_change(&req.headers, &req.body).is_some()
        {
            let key = DialogKey {
                call_id: call_id.to_string(),
                caller_tag: from_tag.to_string(),
                callee_tag: to_tag.to_string(),
            };
            if let Some(refusal) = self.change(&mut req, key).await {
                return refusal;
            }
        }
        let original = req.headers.get("CSeq").map(str::to_string);
        sessions.in_dialog_request(call_id, from_tag, to_tag, &mut req, Instant::now());
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
                sessions.bye_relayed(call_id, from_tag, to_tag, Instant::now())
            {
                let stored = commit.wait(COMMIT_WAIT).await;
                match charge {
                    Some(charge) if stored => {
                        req.headers.push(CHARGE_HEADER, charge.to_header());
                        // Its items, beside.
                        if let Some(value) =
                            super::bill::bill_header(self.core, &charge.session).await
                        {
                            req.headers.set(proto::charge::BILL_HEADER, value);
                        }
                    }
                    Some(_) => {
                        tracing::warn!(call_id = %Esc(call_id), "The session's record is not in the store yet: its BYE goes without the charge");
                    }
                    None => {}
                }
            }
        }
        Action::Forward(vec![Forward::plain(req, target)])
    }

    /// A re-INVITE or UPDATE carrying a service request in a service session (SPEC feature 8):
    /// the server search runs again for the new details (the session's service as the
    /// Request-URI user, the relay's domain as its host, the caller, the new fields). When the
    /// session's server may deliver the service found, the request goes on (towards the server
    /// with a fresh assertion for the same session, so the agent knows what it is asked for)
    /// and the session changes when it is answered 2xx ([`Kind::Change`]); else the relay
    /// refuses it with 488 naming the service to transfer to. `None`: relay it.
    async fn change(&mut self, req: &mut Request, key: DialogKey) -> Option<Action> {
        let core = self.core;
        let sessions = &core.sessions;
        let (current, server, caller, sid) = match sessions.begin_change(&key) {
            Ok(v) => v,
            // A plain call's re-INVITE with such a body is none of the relay's business.
            Err(ChangeRefused::NoSession) => return None,
            Err(ChangeRefused::NotEstablished) => {
                return Some(Action::Answer(local_response(
                    req,
                    491,
                    Some("Session not established"),
                )));
            }
            Err(ChangeRefused::Pending) => {
                return Some(Action::Answer(local_response(
                    req,
                    491,
                    Some("A service change is in progress"),
                )));
            }
        };
        let refuse_change = |status: u16, phrase: &str, transfer_to: Option<&str>| {
            sessions.change_answered(&key, None, status, Instant::now());
            let mut resp = local_response(req, status, Some(phrase));
            if let Some(name) = transfer_to {
                resp.headers.set(TRANSFER_HEADER, name);
            }
            Some(Action::Answer(resp))
        };
        let body = match ServiceRequest::of_change(&req.headers, &req.body) {
            Some(Ok(b)) => b,
            None => return None,
            Some(Err(e)) => {
                tracing::debug!(session = %sid, error = %Esc(&e.to_string()), "Bad service change");
                return refuse_change(400, "Bad service request", None);
            }
        };
        let facts = Facts {
            ruri_user: &current.name,
            ruri_host: &core.identity.domain,
            caller: &caller,
            body: Some(&body),
        };
        let found = match core.catalog.resolve(&core.store, &facts).await {
            Ok(Destination::Service {
                service,
                servers,
                servers_only,
                ..
            }) => (service, servers, servers_only),
            Ok(_) => return refuse_change(488, "No service delivers these details", None),
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for the service directory");
                return refuse_change(500, "Service directory unavailable", None);
            }
        };
        let (service, servers, servers_only) = found;
        let allowed = match core.catalog.rights(&core.store, &server).await {
            Ok(rights) => {
                rights.contains(&service.name)
                    && (!servers_only || servers.as_ref().is_some_and(|l| l.contains(&server)))
            }
            Err(e) => {
                tracing::error!(error = %e, "Store unavailable for server rights");
                return refuse_change(500, "Service directory unavailable", None);
            }
        };
        if !allowed {
            tracing::info!(
                session = %sid,
                server = %server,
                service = %service.name,
                "Service change refused: not delivered by the session's server"
            );
            let phrase = format!("{} is not delivered here: transfer to it", service.name);
            return refuse_change(488, &phrase, Some(&service.name));
        }
        let details = body.detail().map(str::to_string);
        let new = service_info(&service, details.clone());
        let to_server = sessions.party(&key, &key.caller_tag) == Some(Party::Caller);
        if to_server {
            // The agent verifies what it is asked for, as for the session itself.
            match core.auth.credentials(&core.store, &server).await {
                Ok(Some(creds)) => {
                    let assertion = Assertion {
                        user: caller,
                        sid,
                        service: service.name.clone(),
                        server,
                        call_id: key.call_id.clone(),
                        detail: details,
                        exp: now_unix() + core.config.assertion_ttl_secs,
                    }
                    .sign(&proto::service::assertion_key(&creds.ha1_sha256));
                    req.headers.push(ASSERTION_HEADER, assertion);
                }
                Ok(None) => return refuse_change(480, "The session's server is gone", None),
                Err(e) => {
                    tracing::error!(error = %e, "Store unavailable for account lookup");
                    return refuse_change(500, "Service directory unavailable", None);
                }
            }
        }
        self.kind = Kind::Change {
            key,
            service: Box::new(new),
        };
        None
    }

    /// Records the charges of an INFO from the session's application server. 200 when every
    /// charge is recorded (now or before), 400 when any is refused, both with the results
    /// (`application/vnd.sip-relay.charge-results+json`); 403 from anyone else; 500 when the
    /// store failed (nothing recorded: the server may send it again).
    async fn info_charges(
        &self,
        req: &Request,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
    ) -> Action {
        let Some((sid, server)) =
            self.core
                .sessions
                .charging(call_id, from_tag, to_tag, self.source.addr)
        else {
            return Action::Answer(local_response(req, 481, None));
        };
        let Some(server) = server else {
            return refuse(
                403,
                Some("Only the session's application server reports charges"),
            );
        };
        let doc = match proto::charge::Charges::parse(&req.body) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::info!(%sid, error = %e, "Charges in an INFO unreadable");
                return refuse(400, Some("Unreadable charges document"));
            }
        };
        let subs = crate::charging::in_session(&server, crate::store::Channel::Info, &sid, doc);
        if subs.is_empty() {
            return refuse(400, Some("No charges"));
        }
        let results = match self.core.charging.submit(subs).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%sid, error = %e, "Charges in an INFO not recorded");
                return refuse(500, Some("Charges not recorded; send them again"));
            }
        };
        let all = results.iter().all(|r| r.outcome.is_recorded());
        let mut resp = if all {
            local_response(req, 200, None)
        } else {
            local_response(req, 400, Some("Charge refused"))
        };
        resp.headers
            .set("Content-Type", proto::charge::RESULTS_CONTENT_TYPE);
        resp.body = proto::charge::Results { results }
            .to_json()
            .into_bytes()
            .into();
        Action::Answer(resp)
    }

    async fn authenticate(&self, req: &Request, role: Role) -> Result<String, Response> {
        let core = self.core;
        match core.auth.check(&core.store, req, role, now_unix()).await {
            Outcome::Authenticated(user) => Ok(user),
            Outcome::Challenge { stale, failed } => {
                // One line per refusal, with the source (for fail2ban and the like), a few per
                // source and interval at most.
                let ip = self.source.addr.ip();
                if let Some((user, why)) = failed {
                    if core.transport.admit_log(ip) {
                        tracing::info!(
                            source = %ip,
                            user = %Esc(&user),
                            method = %req.method,
                            "Authentication failed: {why}"
                        );
                    }
                }
                let mut resp = local_response(req, role.status(), None);
                for value in core.auth.challenges(stale, now_unix()) {
                    resp.headers.push(role.challenge_header(), value);
                }
                Err(resp)
            }
        }
    }
}

fn local_response(req: &Request, status: u16, reason: Option<&str>) -> Response {
    message::make_response(req, status, reason, Some(&message::new_tag()))
}

/// Whether a request's body is a charges document (by its content type).
fn carries_charges(req: &Request) -> bool {
    message::is_media_type(req.headers.get("Content-Type"), proto::charge::CONTENT_TYPE)
}

/// Whether an INVITE's body is a service request (by its content type).
fn carries_service_request(req: &Request) -> bool {
    !req.body.is_empty()
        && message::is_media_type(
            req.headers.get("Content-Type"),
            proto::service::SERVICE_REQUEST_TYPE,
        )
}

/// The callee of a call to a foreign domain, as its record names it: `user@host`.
fn foreign_callee(req: &Request) -> String {
    format!(
        "{}@{}",
        req.uri.user.clone().unwrap_or_default(),
        req.uri.host
    )
}

/// What a session of `service` runs under: its tariff and limits, with these details.
fn service_info(service: &crate::store::ServiceRow, details: Option<String>) -> ServiceInfo {
    ServiceInfo {
        name: service.name.clone(),
        tariff: crate::billing::Tariff {
            per_minute_minor: service.per_minute_minor,
            setup_fee_minor: service.setup_fee_minor,
            increment_secs: service.increment_secs,
            currency: service.currency.clone(),
        },
        max_duration_secs: service.max_duration_secs,
        details,
    }
}
