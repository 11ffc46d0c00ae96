//! The `open` command: `INVITE sip:SERVICE@DOMAIN`, then one session per application server that
//! answers 2xx (the relay may fork to several and relay each 2xx, seconds apart), each ACKed
//! through the relay; the sessions stay open until `--for`, Ctrl-C, `close`/`close N` on the
//! input, or the server's BYE, and each close reports the relay's charge.

use super::{Agent, Interrupt, InviteAnswer};
use crate::output::{ChangedBy, Charge, ClosedBy, Event, SessionInfo};
use crate::session::{self, Access, UserCommand};
use bytes::Bytes;
use proto::clock::sleep_until;
use proto::service::{ChargeSummary, SERVICE_REQUEST_TYPE};
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Method, Request, Response};
use proto::sip::transaction::ClientEvent;
use proto::transport::Target;
use proto::ua::ServerRequest;
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What `open` was asked to do.
#[derive(Debug)]
pub(crate) struct Options {
    /// A service name or a SIP URI.
    pub(crate) service: String,
    /// The service request (already checked), sent as [`SERVICE_REQUEST_TYPE`].
    pub(crate) body: Option<Bytes>,
    /// How long to keep the sessions, from the first 2xx.
    pub(crate) duration: Option<Duration>,
    /// Open each URL with `xdg-open`.
    pub(crate) browse: bool,
    /// Command lines (`list`, `close`, `close N`, `change DETAILS`); its end closes nothing.
    pub(crate) input: mpsc::UnboundedReceiver<String>,
    /// Command lines run this long after the first session opened (`--change-after`).
    pub(crate) scripted: Vec<(Duration, String)>,
    /// Have the relay watch this long for a server when none is online (`--wait`).
    pub(crate) wait: Option<Duration>,
}

/// How long the answer to a REFER's final NOTIFY may hold up the new session's ACK.
const NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// How long the CANCEL for forks still pending may hold up the exit.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// One open session.
struct Live {
    index: usize,
    dialog: Dialog,
    hop: Target,
    access: Access,
    started: Instant,
    /// Our BYE is out, its answer not yet in.
    closing: bool,
    /// Our change is out, its answer not yet in.
    changing: bool,
}

/// The final answer to a BYE we sent (`None`: none came), by session index.
type ByeAnswer = (usize, Option<Response>);

/// The final answer to a change we sent: session index, the re-INVITE's CSeq, the details
/// asked for, the answer (`None`: none came).
type ChangeAnswer = (usize, u32, String, Option<Response>);

/// The state of an `open` once the INVITE has its first 2xx.
struct Opened {
    /// The service's name, for the sessions whose answer does not name it.
    service: String,
    /// The INVITE as last sent: every 2xx's dialog is built from it.
    invite: Request,
    invite_seq: u32,
    browse: bool,
    sessions: Vec<Live>,
    /// Every 2xx ACKed so far, by To tag, to ACK its retransmissions again.
    acked: HashMap<String, (Dialog, Target)>,
    next_index: usize,
    opened: usize,
    /// Sessions that ended normally: our BYE answered 2xx, or the server's BYE.
    closed_ok: usize,
    /// Close every session, including those still to come.
    closing_all: bool,
    byes: mpsc::UnboundedSender<ByeAnswer>,
    changes: mpsc::UnboundedSender<ChangeAnswer>,
    /// New sessions to open that continue a live one (transfers, REFERs followed), in order.
    follow: Vec<Follow>,
}

/// A new session to open that continues session `from`: `transfer SERVICE`, or the server's
/// REFER (then the REFER's subscription is told how it went, in NOTIFYs).
#[derive(Debug)]
struct Follow {
    from: usize,
    uri: String,
    refer: bool,
}

impl Agent {
    pub(super) async fn open(&mut self, opts: Options) -> anyhow::Result<ExitCode> {
        let Options {
            service,
            body,
            duration,
            browse,
            mut input,
            mut scripted,
            wait,
        } = opts;
        // The latest first, so the next one is popped off the end.
        scripted.sort_by_key(|s| std::cmp::Reverse(s.0));
        let name = session::service_name(&service);
        let uri = session::target_uri(&service, &self.domain);
        self.out.emit(&Event::Note {
            message: format!("opening {uri} through the relay at {}", self.relay_name()),
        });
        let call_id = message::new_call_id();
        let dialled = super::watch::with_wait(&uri, wait);
        let mut invite = self.new_request(Method::Invite, &dialled, &uri, &call_id, 1)?;
        if let Some(body) = &body {
            invite.headers.push("Content-Type", SERVICE_REQUEST_TYPE);
            invite.body = body.clone();
        }
        let mut interrupt = Interrupt::new();
        let answer = self.invite(invite, None, &mut interrupt, false).await?;
        // No server online and --wait: the relay watches, and its REFER brings the session.
        let answer = match answer {
            InviteAnswer::Accepted { invite, ok, .. } if super::watch::is_watch(&ok) => {
                match self.watch(&invite, &ok, &mut interrupt).await? {
                    super::watch::Watched::Ended(why) => {
                        self.out.emit(&Event::Failed {
                            request: "INVITE".into(),
                            status: 480,
                            reason: "Temporarily Unavailable".into(),
                            retry_after: None,
                            message: why,
                        });
                        return Ok(ExitCode::from(2));
                    }
                    super::watch::Watched::Referred {
                        uri: referred,
                        mut dialog,
                        hop,
                    } => {
                        let call_id = message::new_call_id();
                        let mut invite =
                            self.new_request(Method::Invite, &referred, &uri, &call_id, 1)?;
                        if let Some(body) = &body {
                            invite.headers.push("Content-Type", SERVICE_REQUEST_TYPE);
                            invite.body = body.clone();
                        }
                        let answer = self.invite(invite, None, &mut interrupt, false).await?;
                        let (status, reason) = super::watch_outcome(&answer);
                        super::watch::tell_relay(self, &mut dialog, hop, status, &reason);
                        answer
                    }
                }
            }
            other => other,
        };
        let (invite, ok, events, cancelled) = match answer {
            InviteAnswer::Accepted {
                invite,
                ok,
                events,
                cancelled,
            } => (invite, ok, events, cancelled),
            InviteAnswer::Rejected { resp, challenged } => {
                let retry_after = session::retry_after(&resp.headers);
                self.out.emit(&Event::Failed {
                    request: "INVITE".into(),
                    status: resp.status,
                    reason: resp.reason.clone(),
                    retry_after,
                    message: session::failure_message(
                        &name,
                        resp.status,
                        &resp.reason,
                        retry_after,
                        challenged,
                    ),
                });
                return Ok(ExitCode::from(2));
            }
            InviteAnswer::TimedOut { heard } => {
                let message = if heard {
                    session::NO_ANSWER.to_string()
                } else {
                    self.no_answer(Method::Invite, super::CALL_GIVE_UP)
                        .to_string()
                };
                self.out.emit(&Event::Failed {
                    request: "INVITE".into(),
                    status: 408,
                    reason: "Request Timeout".into(),
                    retry_after: None,
                    message,
                });
                return Ok(ExitCode::from(2));
            }
        };
        let (byes, mut bye_answers) = mpsc::unbounded_channel::<ByeAnswer>();
        let (changes, mut change_answers) = mpsc::unbounded_channel::<ChangeAnswer>();
        let mut state = Opened {
            service: name,
            invite_seq: invite.cseq().map(|c| c.seq).unwrap_or(1),
            invite,
            browse,
            sessions: Vec::new(),
            acked: HashMap::new(),
            next_index: 1,
            opened: 0,
            closed_ok: 0,
            closing_all: false,
            byes,
            changes,
            follow: Vec::new(),
        };
        let first_status = ok.status;
        state.on_success(self, ok).await;
        // The INVITE's transaction, while it may still pass up 2xx from other servers.
        let mut events = Some(events);
        let mut cancel: Option<mpsc::UnboundedReceiver<ClientEvent>> = None;
        if cancelled {
            // A 2xx crossed our CANCEL (Ctrl-C): the user wants out.
            state.close_all(self);
        }
        let mut deadline = match (duration, state.opened) {
            (Some(d), 1..) => Some(Instant::now() + d),
            _ => None,
        };
        // When the first session opened: the scripted commands count from there.
        let mut first_open = (state.opened > 0).then(Instant::now);
        let mut input_open = true;
        let mut incoming_open = true;
        loop {
            // Done when no session is left; before the first, when the INVITE can bring no more
            // or the user asked to close everything.
            if state.sessions.is_empty()
                && (state.opened > 0 || events.is_none() || state.closing_all)
            {
                break;
            }
            tokio::select! {
                _ = sleep_until(deadline) => {
                    deadline = None;
                    state.close_all(self);
                }
                _ = sleep_until(first_open.zip(scripted.last()).map(|(t, (after, _))| t + *after)) => {
                    if let Some((_, line)) = scripted.pop() {
                        state.on_command(self, &line);
                    }
                }
                answer = change_answers.recv() => {
                    if let Some(answer) = answer {
                        state.on_change_answer(self, answer).await;
                    }
                }
                _ = interrupt.next() => {
                    if interrupt.presses() > 1 || state.closing_all {
                        self.out.emit(&Event::Note {
                            message: format!(
                                "gave up waiting for {} session(s) to close",
                                state.sessions.len()
                            ),
                        });
                        break;
                    }
                    state.close_all(self);
                }
                ev = recv_opt(&mut events) => match ev {
                    Some(ClientEvent::Final(r)) if (200..300).contains(&r.status) => {
                        let before = state.opened;
                        state.on_success(self, r).await;
                        if before == 0 && state.opened > 0 {
                            deadline = duration.map(|d| Instant::now() + d);
                            first_open = Some(Instant::now());
                        }
                    }
                    Some(_) => {}
                    None => events = None,
                },
                answer = bye_answers.recv() => {
                    if let Some((index, answer)) = answer {
                        state.on_bye_answer(self, index, answer);
                    }
                }
                req = self.incoming.recv(), if incoming_open => match req {
                    Some(req) => state.on_request(self, req),
                    None => incoming_open = false,
                },
                line = input.recv(), if input_open => match line {
                    Some(line) => state.on_command(self, &line),
                    // End of input: stop reading, close nothing.
                    None => input_open = false,
                },
            }
            // Transfers and REFERs: each new session is asked for in turn (its digest dance and
            // ringing included) before anything else is read.
            while !state.follow.is_empty() {
                let f = state.follow.remove(0);
                state.follow_to(self, f, &mut interrupt).await;
            }
            // Closing everything: forks still pending at the relay are cancelled too.
            if state.closing_all && cancel.is_none() && events.is_some() {
                cancel = Some(self.cancel_events(&state.invite));
            }
        }
        if events.is_some() && cancel.is_none() && state.opened > 0 {
            // No session left: later answers from other servers would be sessions nobody uses.
            cancel = Some(self.cancel_events(&state.invite));
        }
        if let Some(mut cancel) = cancel {
            let _ = tokio::time::timeout(CANCEL_GRACE, async {
                while let Some(ev) = cancel.recv().await {
                    if matches!(ev, ClientEvent::Final(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        if state.opened == 0 {
            self.out.emit(&Event::Failed {
                request: "INVITE".into(),
                status: first_status,
                reason: message::reason_phrase(first_status).into(),
                retry_after: None,
                message:
                    "the service answered in a way this agent cannot use (no To tag or Contact)"
                        .into(),
            });
        }
        Ok(if state.opened > 0 && state.closed_ok > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        })
    }

    /// Opens `url` in the browser, without waiting; only web URLs.
    fn browse(&self, url: &str) {
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) {
            self.note(format!(
                "not opening {url}: --browse opens only http and https URLs"
            ));
            return;
        }
        let spawned = std::process::Command::new("xdg-open")
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(mut child) => {
                // Reaped on a thread of its own: nobody waits for the browser.
                let _ = std::thread::Builder::new()
                    .name("xdg-open".into())
                    .spawn(move || child.wait());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.note("xdg-open is not installed: open the URL yourself".into())
            }
            Err(e) => self.note(format!("cannot run xdg-open: {e}")),
        }
    }

    fn note(&self, message: String) {
        self.out.emit(&Event::Note { message });
    }
}

/// The next event of a transaction that may be over (`None` then, at once).
async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<ClientEvent>>) -> Option<ClientEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Opened {
    /// A 2xx to the INVITE: a new session (built, ACKed, told), or a retransmission (ACKed again).
    async fn on_success(&mut self, agent: &Agent, resp: Response) {
        let invite = self.invite.clone();
        let seq = self.invite_seq;
        self.add_session(agent, &invite, seq, resp, None).await;
    }

    /// A 2xx to `invite` (CSeq `seq`): a new session (built, ACKed, told), or a retransmission
    /// (ACKed again). `from`: the session it continues.
    async fn add_session(
        &mut self,
        agent: &Agent,
        invite: &Request,
        seq: u32,
        resp: Response,
        from: Option<usize>,
    ) {
        let Some(tag) = resp.to().ok().and_then(|to| to.tag().map(str::to_string)) else {
            agent.note("ignored a 2xx without a To tag".into());
            return;
        };
        if let Some((dialog, hop)) = self.acked.get(&tag) {
            // Our ACK was lost (RFC 3261 §13.2.2.4).
            let _ = agent.ep.send_stateless(dialog.ack(seq), *hop).await;
            return;
        }
        let Some(dialog) = Dialog::uac(invite, &resp) else {
            agent.note("ignored a 2xx without a usable Contact".into());
            return;
        };
        let hop = match agent.dialog_hop(&dialog) {
            Ok(hop) => hop,
            Err(e) => {
                agent.note(format!("ignored a 2xx: {e}"));
                return;
            }
        };
        if let Err(e) = agent.ep.send_stateless(dialog.ack(seq), hop).await {
            agent.note(format!("cannot send the ACK: {e}"));
        }
        self.acked.insert(tag, (dialog.clone(), hop));
        let access = session::access_from(&resp, &self.service);
        let index = self.next_index;
        self.next_index += 1;
        self.opened += 1;
        agent.out.emit(&Event::Session {
            index,
            transferred_from: from,
            service: access.service.clone(),
            server: access.server.clone(),
            session_id: access.session_id.clone(),
            url: access.url.clone(),
        });
        if self.browse {
            if let Some(url) = &access.url {
                agent.browse(url);
            }
        }
        let mut live = Live {
            index,
            dialog,
            hop,
            access,
            started: Instant::now(),
            closing: false,
            changing: false,
        };
        if self.closing_all {
            self.send_bye(agent, &mut live);
        }
        self.sessions.push(live);
    }

    /// Sends BYE for every session, and for those still to come.
    fn close_all(&mut self, agent: &Agent) {
        self.closing_all = true;
        let byes = self.byes.clone();
        for live in &mut self.sessions {
            bye(agent, live, &byes);
        }
    }

    fn send_bye(&self, agent: &Agent, live: &mut Live) {
        bye(agent, live, &self.byes);
    }

    /// The answer to our BYE: the session is over whatever it is (481, 408 and no answer
    /// included, RFC 3261 §15.1.1).
    fn on_bye_answer(&mut self, agent: &Agent, index: usize, answer: Option<Response>) {
        let Some(pos) = self.sessions.iter().position(|s| s.index == index) else {
            // The server's BYE crossed ours and ended it already.
            return;
        };
        let live = self.sessions.remove(pos);
        let status = answer.as_ref().map_or(408, |r| r.status);
        if (200..300).contains(&status) {
            self.closed_ok += 1;
        }
        let charge = answer.as_ref().and_then(|r| session::charge_of(&r.headers));
        let items = answer
            .as_ref()
            .map(|r| session::items_of(&r.headers))
            .unwrap_or_default();
        agent.out.emit(&closed(
            &live,
            ClosedBy::Client,
            charge,
            items,
            Some(status),
            None,
        ));
    }

    /// A request from the relay: the server's BYE, keepalives and other in-dialog requests.
    fn on_request(&mut self, agent: &Agent, req: ServerRequest) {
        let r = &req.request;
        if r.method == Method::Ack {
            return;
        }
        let respond = |status| req.respond(message::make_response(r, status, None, None));
        let in_dialog = r.to().ok().is_some_and(|to| to.tag().is_some());
        match self.sessions.iter().position(|s| s.dialog.matches(r)) {
            Some(pos) if r.method == Method::Bye => {
                respond(200);
                let live = self.sessions.remove(pos);
                self.closed_ok += 1;
                let charge = session::charge_of(&r.headers);
                let items = session::items_of(&r.headers);
                // The relay marks the BYEs it sends itself (and removes any copy a server put
                // in): then the relay ended the session, for the reason it names.
                let event = match r.headers.get(proto::service::END_HEADER) {
                    Some(why) => closed(
                        &live,
                        ClosedBy::Relay,
                        charge,
                        items,
                        None,
                        Some(why.trim().to_string()),
                    ),
                    None => closed(&live, ClosedBy::Server, charge, items, None, None),
                };
                agent.out.emit(&event);
            }
            // The server changes the service (through the relay, which searched again).
            Some(pos)
                if matches!(r.method, Method::Invite | Method::Update)
                    && proto::service::ServiceRequest::of_change(&r.headers, &r.body).is_some() =>
            {
                let live = &mut self.sessions[pos];
                let mut ok = message::make_response(r, 200, None, None);
                ok.headers
                    .push("Contact", live.dialog.local_contact.as_str());
                req.respond(ok);
                let detail = proto::service::ServiceRequest::of_change(&r.headers, &r.body)
                    .and_then(Result::ok)
                    .and_then(|q| q.detail().map(str::to_string));
                if let Some(url) = session::call_info_url(&r.headers) {
                    live.access.url = Some(url);
                }
                agent.out.emit(&Event::Changed {
                    index: live.index,
                    by: ChangedBy::Server,
                    service: live.access.service.clone(),
                    detail,
                    url: live.access.url.clone(),
                });
            }
            // The server refers us to another service: followed through the relay (RFC 3515).
            Some(pos) if r.method == Method::Refer => {
                let refer_to = r
                    .headers
                    .get("Refer-To")
                    .and_then(|v| message::NameAddr::parse(v).ok());
                let Some(target) = refer_to.filter(|t| t.uri.user.is_some()) else {
                    req.respond(message::make_response(r, 400, Some("Bad Refer-To"), None));
                    return;
                };
                req.respond(message::make_response(r, 202, None, None));
                let live = &mut self.sessions[pos];
                // Sent in the background: nothing waits for its answer.
                drop(notify(agent, live, "SIP/2.0 100 Trying", false));
                let mut uri = target.uri;
                // Nothing of ours may ride in embedded headers.
                uri.headers = None;
                agent.note(format!(
                    "session {}: the server refers you to {uri}",
                    live.index
                ));
                self.follow.push(Follow {
                    from: live.index,
                    uri: uri.to_string(),
                    refer: true,
                });
            }
            // No other re-INVITE support (the session has no media to renegotiate).
            Some(_) if r.method == Method::Invite => respond(488),
            // OPTIONS keepalives, INFO, UPDATE, …
            Some(_) => respond(200),
            None if !in_dialog && r.method == Method::Options => respond(200),
            None if !in_dialog && r.method == Method::Invite => respond(603),
            None => respond(481),
        }
    }

    /// A line of input.
    fn on_command(&mut self, agent: &Agent, line: &str) {
        match session::parse_command(line) {
            UserCommand::Nothing => {}
            UserCommand::CloseAll => self.close_all(agent),
            UserCommand::Close(n) => {
                let byes = self.byes.clone();
                match self.sessions.iter_mut().find(|s| s.index == n) {
                    Some(live) if live.closing => {
                        agent.note(format!("session {n} is already closing"))
                    }
                    Some(live) => bye(agent, live, &byes),
                    None => agent.note(format!("there is no live session {n}")),
                }
            }
            UserCommand::List => {
                let sessions = self
                    .sessions
                    .iter()
                    .map(|s| SessionInfo {
                        index: s.index,
                        service: s.access.service.clone(),
                        server: s.access.server.clone(),
                        session_id: s.access.session_id.clone(),
                        url: s.access.url.clone(),
                        elapsed_ms: millis(s.started.elapsed()),
                        closing: s.closing,
                    })
                    .collect();
                agent.out.emit(&Event::Sessions { sessions });
            }
            UserCommand::Change(details) => {
                let live: Vec<usize> = self
                    .sessions
                    .iter()
                    .filter(|s| !s.closing)
                    .map(|s| s.index)
                    .collect();
                if live.is_empty() {
                    agent.note("there is no live session to change".into());
                }
                for index in live {
                    self.send_change(agent, index, &details);
                }
            }
            UserCommand::Transfer { service, keep } => {
                let Some(first) = self.sessions.iter().find(|s| !s.closing) else {
                    agent.note("there is no live session to transfer".into());
                    return;
                };
                let Some(sid) = first.access.session_id.clone() else {
                    agent.note(format!(
                        "session {} has no session id (its server did not say): it cannot be transferred",
                        first.index
                    ));
                    return;
                };
                let name = session::service_name(&service);
                self.follow.push(Follow {
                    from: first.index,
                    uri: proto::service::transfer_uri(&name, &agent.domain, &sid, keep),
                    refer: false,
                });
            }
            UserCommand::Unknown(why) => agent.note(why),
        }
    }

    /// Opens the session `f` asks for (through the relay, with digest): it continues session
    /// `f.from`, which the relay ends (reason `transferred`) once the new one is established,
    /// unless `keep-first` was asked for. A REFER's subscription hears how it went.
    async fn follow_to(&mut self, agent: &Agent, f: Follow, interrupt: &mut Interrupt) {
        let uri = match message::Uri::parse(&f.uri) {
            Ok(u) => u,
            Err(e) => {
                agent.note(format!("cannot follow {}: {}", f.uri, e.reason));
                self.tell_referrer(agent, &f, "SIP/2.0 400 Bad Request")
                    .await;
                return;
            }
        };
        let name = uri.user.clone().unwrap_or_default();
        let to = format!("sip:{name}@{}", uri.host);
        agent.note(format!("moving session {} to {name}", f.from));
        let call_id = message::new_call_id();
        let invite = match agent.new_request(Method::Invite, &f.uri, &to, &call_id, 1) {
            Ok(i) => i,
            Err(e) => {
                agent.note(format!("cannot follow {}: {e}", f.uri));
                self.tell_referrer(agent, &f, "SIP/2.0 400 Bad Request")
                    .await;
                return;
            }
        };
        let answer = match agent.invite(invite, None, interrupt, false).await {
            Ok(a) => a,
            Err(e) => {
                agent.note(format!("transfer to {name} failed: {e}"));
                self.tell_referrer(agent, &f, "SIP/2.0 503 Service Unavailable")
                    .await;
                return;
            }
        };
        match answer {
            InviteAnswer::Accepted {
                invite,
                ok,
                mut events,
                ..
            } => {
                self.tell_referrer(agent, &f, &format!("SIP/2.0 {} {}", ok.status, ok.reason))
                    .await;
                let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
                self.add_session(agent, &invite, seq, ok, Some(f.from))
                    .await;
                // Our ACK may be lost: the server's 2xx retransmissions get it again.
                let acks: Vec<(String, (Dialog, Target))> = self
                    .acked
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let ep = agent.ep.clone();
                tokio::spawn(async move {
                    while let Some(ev) = events.recv().await {
                        if let ClientEvent::Final(r) = ev {
                            let tag = r.to().ok().and_then(|t| t.tag().map(str::to_string));
                            if let Some((_, (dialog, hop))) =
                                acks.iter().find(|(k, _)| Some(k) == tag.as_ref())
                            {
                                let _ = ep.send_stateless(dialog.ack(seq), *hop).await;
                            }
                        }
                    }
                });
            }
            InviteAnswer::Rejected { resp, challenged } => {
                self.tell_referrer(
                    agent,
                    &f,
                    &format!("SIP/2.0 {} {}", resp.status, resp.reason),
                )
                .await;
                let retry_after = session::retry_after(&resp.headers);
                agent.out.emit(&Event::Failed {
                    request: "INVITE".into(),
                    status: resp.status,
                    reason: resp.reason.clone(),
                    retry_after,
                    message: format!(
                        "transfer of session {} failed (it goes on): {}",
                        f.from,
                        session::failure_message(
                            &name,
                            resp.status,
                            &resp.reason,
                            retry_after,
                            challenged
                        )
                    ),
                });
            }
            InviteAnswer::TimedOut { .. } => {
                self.tell_referrer(agent, &f, "SIP/2.0 408 Request Timeout")
                    .await;
                agent.out.emit(&Event::Failed {
                    request: "INVITE".into(),
                    status: 408,
                    reason: "Request Timeout".into(),
                    retry_after: None,
                    message: format!("transfer of session {} got no answer (it goes on)", f.from),
                });
            }
        }
    }

    /// The final NOTIFY of a REFER's subscription (RFC 3515), in the session it came in.
    /// Waits (a moment at most) until the referrer has it: the new session's ACK may end the
    /// first session at the relay, and the NOTIFY must pass before.
    async fn tell_referrer(&mut self, agent: &Agent, f: &Follow, frag: &str) {
        if !f.refer {
            return;
        }
        if let Some(live) = self.sessions.iter_mut().find(|s| s.index == f.from) {
            let told = notify(agent, live, frag, true);
            let _ = tokio::time::timeout(NOTIFY_WAIT, told).await;
        }
    }

    /// Sends a re-INVITE with the new details in session `index` (the relay searches again
    /// and the server decides); its answer comes back on `changes`.
    fn send_change(&mut self, agent: &Agent, index: usize, details: &str) {
        let Some(live) = self.sessions.iter_mut().find(|s| s.index == index) else {
            return;
        };
        if live.changing {
            agent.note(format!("session {index}: a change is already on its way"));
            return;
        }
        live.changing = true;
        let mut req = live.dialog.request(Method::Invite);
        let seq = req.cseq().map(|c| c.seq).unwrap_or(1);
        req.headers
            .push("Contact", live.dialog.local_contact.as_str());
        req.headers.push("Content-Type", SERVICE_REQUEST_TYPE);
        req.body = Bytes::from(proto::service::ServiceRequest::with_detail(details).to_json());
        let req = agent.ep.with_via(req, live.hop.transport);
        let mut events = agent.ep.request(req, live.hop);
        let (changes, details) = (self.changes.clone(), details.to_string());
        tokio::spawn(async move {
            let answer = proto::ua::final_response(&mut events).await;
            let _ = changes.send((index, seq, details, answer));
        });
    }

    /// The answer to our change: a 2xx is ACKed and the session runs under the new details
    /// (the URL from the answer); anything else leaves it as it was.
    async fn on_change_answer(
        &mut self,
        agent: &Agent,
        (index, seq, details, answer): ChangeAnswer,
    ) {
        let Some(live) = self.sessions.iter_mut().find(|s| s.index == index) else {
            return;
        };
        live.changing = false;
        let Some(resp) = answer else {
            agent.out.emit(&Event::ChangeRefused {
                index,
                status: 408,
                reason: "Request Timeout".into(),
                transfer_to: None,
                message: format!(
                    "session {index}: the change got no answer; the session goes on as it was"
                ),
            });
            return;
        };
        if !(200..300).contains(&resp.status) {
            let transfer_to = resp
                .headers
                .get(proto::service::TRANSFER_HEADER)
                .map(|v| v.trim().to_string());
            agent.out.emit(&Event::ChangeRefused {
                index,
                status: resp.status,
                reason: resp.reason.clone(),
                message: format!(
                    "session {index}: {}",
                    session::change_refusal(resp.status, &resp.reason, transfer_to.as_deref())
                ),
                transfer_to,
            });
            return;
        }
        if let Err(e) = agent
            .ep
            .send_stateless(live.dialog.ack(seq), live.hop)
            .await
        {
            agent.note(format!("cannot send the ACK for the change: {e}"));
        }
        let access = session::access_from(&resp, &live.access.service);
        live.access.service = resp
            .headers
            .get(proto::service::SERVICE_HEADER)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or(access.service);
        if access.url.is_some() {
            live.access.url = access.url;
        }
        agent.out.emit(&Event::Changed {
            index,
            by: ChangedBy::Client,
            service: live.access.service.clone(),
            detail: Some(details),
            url: live.access.url.clone(),
        });
    }
}

/// Sends BYE in the session's dialog through the relay; its final answer (or `None`) comes back
/// on `byes`. Nothing if a BYE is already out.
fn bye(agent: &Agent, live: &mut Live, byes: &mpsc::UnboundedSender<ByeAnswer>) {
    if live.closing {
        return;
    }
    live.closing = true;
    let req = agent
        .ep
        .with_via(live.dialog.request(Method::Bye), live.hop.transport);
    let mut events = agent.ep.request(req, live.hop);
    let (index, byes) = (live.index, byes.clone());
    tokio::spawn(async move {
        let answer = proto::ua::final_response(&mut events).await;
        let _ = byes.send((index, answer));
    });
}

/// The `closed` event of a session, with the relay's charge when it reported one (its measure of
/// the duration is then the one told).
fn closed(
    live: &Live,
    by: ClosedBy,
    charge: Option<ChargeSummary>,
    items: Vec<proto::charge::BillLine>,
    status: Option<u16>,
    reason: Option<String>,
) -> Event {
    let duration_ms = charge
        .as_ref()
        .and_then(|c| u64::try_from(c.duration_ms).ok())
        .unwrap_or_else(|| millis(live.started.elapsed()));
    let session_id = live.access.session_id.clone().or_else(|| {
        charge
            .as_ref()
            .map(|c| c.session.clone())
            .filter(|s| !s.is_empty())
    });
    Event::Closed {
        index: live.index,
        by,
        duration_ms,
        charge: charge.as_ref().map(Charge::from),
        items,
        session_id,
        status,
        reason,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A NOTIFY of the implicit REFER subscription in `live`'s dialog ([`super::watch::notify`]).
fn notify(agent: &Agent, live: &mut Live, frag: &str, done: bool) -> tokio::task::JoinHandle<()> {
    super::watch::notify(agent, &mut live.dialog, live.hop, frag, done)
}
