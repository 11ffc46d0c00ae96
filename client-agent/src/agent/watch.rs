//! Auto-redial at the client (`call USER --wait DURATION`, `open SERVICE --wait DURATION`):
//! the dialled URI asks the relay to watch for a target that is not registered
//! (`;wait=SECONDS`). The relay then answers 200 itself with `Relay-Watch`; the agent ACKs it,
//! says it is waiting, and waits for the relay's REFER inside that dialog (the target
//! registered), the relay's BYE (the period ran out), or Ctrl-C (it hangs up the watch). The
//! REFER is accepted (202, NOTIFY 100) and its target called as any other; the final NOTIFY
//! tells the relay how that went. The wait is never billed.

use super::{Agent, Interrupt};
use crate::output::Event;
use bytes::Bytes;
use proto::sip::dialog::Dialog;
use proto::sip::message::{self, Method, Request, Response};
use proto::sip::transaction::ClientEvent;
use proto::transport::Target;
use std::time::Duration;

/// The header of the relay's 200 that starts a watch.
pub(crate) const WATCH_HEADER: &str = "Relay-Watch";

/// How a watch ended.
pub(crate) enum Watched {
    /// The target registered: call this URI; tell the referrer in `dialog` how it went.
    Referred {
        uri: String,
        dialog: Box<Dialog>,
        hop: Target,
    },
    /// No call: why.
    Ended(String),
}

/// `uri` with `;wait=SECONDS`.
pub(crate) fn with_wait(uri: &str, wait: Option<Duration>) -> String {
    match wait {
        Some(d) => format!("{uri};wait={}", d.as_secs().max(1)),
        None => uri.to_string(),
    }
}

/// Whether a 2xx is the relay's answer starting a watch.
pub(crate) fn is_watch(ok: &Response) -> bool {
    ok.headers.get(WATCH_HEADER).is_some()
}

impl Agent {
    /// The relay watches for the target of `invite` (its 200 `ok`): ACK, then wait.
    pub(crate) async fn watch(
        &mut self,
        invite: &Request,
        ok: &Response,
        interrupt: &mut Interrupt,
    ) -> anyhow::Result<Watched> {
        let Some(mut dialog) = Dialog::uac(invite, ok) else {
            return Ok(Watched::Ended(
                "the relay's answer has no usable Contact".into(),
            ));
        };
        let hop = self.dialog_hop(&dialog)?;
        let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
        self.ep.send_stateless(dialog.ack(seq), hop).await?;
        let value = ok.headers.get(WATCH_HEADER).unwrap_or_default();
        let target = value.split(';').next().unwrap_or("").trim().to_string();
        let until = value
            .split(';')
            .find_map(|p| p.trim().strip_prefix("until="))
            .and_then(|u| u.parse::<i64>().ok())
            .map(|u| proto::clock::format_utc_ms(u.saturating_mul(1000)));
        self.out.emit(&Event::Watching {
            target: target.clone(),
            until: until.clone(),
        });
        loop {
            tokio::select! {
                _ = interrupt.next() => {
                    let bye = self.ep.with_via(dialog.request(Method::Bye), hop.transport);
                    let mut events = self.ep.request(bye, hop);
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(ev) = events.recv().await {
                            if matches!(ev, ClientEvent::Final(_)) { break; }
                        }
                    }).await;
                    return Ok(Watched::Ended("you stopped waiting".into()));
                }
                req = self.incoming.recv() => {
                    let Some(req) = req else {
                        return Ok(Watched::Ended("the agent stopped".into()));
                    };
                    let r = &req.request;
                    if !dialog.matches(r) {
                        if r.method != Method::Ack {
                            let status = if r.method == Method::Options { 200 } else { 481 };
                            req.respond(message::make_response(r, status, None, None));
                        }
                        continue;
                    }
                    match r.method {
                        Method::Refer => {
                            let uri = r
                                .headers
                                .get("Refer-To")
                                .and_then(|v| message::NameAddr::parse(v).ok())
                                .map(|na| {
                                    let mut u = na.uri;
                                    u.headers = None;
                                    u.to_string()
                                });
                            let Some(uri) = uri else {
                                req.respond(message::make_response(r, 400, Some("Bad Refer-To"), None));
                                continue;
                            };
                            req.respond(message::make_response(r, 202, None, None));
                            drop(notify(self, &mut dialog, hop, "SIP/2.0 100 Trying", false));
                            self.out.emit(&Event::Note {
                                message: format!("{target} is here now: calling {uri}"),
                            });
                            return Ok(Watched::Referred { uri, dialog: Box::new(dialog), hop });
                        }
                        Method::Bye => {
                            req.respond(message::make_response(r, 200, None, None));
                            let why = r
                                .headers
                                .get(proto::service::END_HEADER)
                                .unwrap_or("ended by the relay")
                                .trim()
                                .to_string();
                            let why = if why == "watch-expired" {
                                format!("{target} did not come before {}", until.unwrap_or_default())
                            } else {
                                why
                            };
                            return Ok(Watched::Ended(why));
                        }
                        Method::Ack => {}
                        _ => req.respond(message::make_response(r, 200, None, None)),
                    }
                }
            }
        }
    }
}

/// Tells the relay how the referred call went (the final NOTIFY, RFC 3515), then hangs up the
/// watch's dialog: the watch is over.
pub(crate) fn tell_relay(
    agent: &Agent,
    dialog: &mut Dialog,
    hop: Target,
    status: u16,
    reason: &str,
) {
    notify(
        agent,
        dialog,
        hop,
        &format!("SIP/2.0 {status} {reason}"),
        true,
    );
    let bye = agent
        .ep
        .with_via(dialog.request(Method::Bye), hop.transport);
    let mut events = agent.ep.request(bye, hop);
    tokio::spawn(async move { while events.recv().await.is_some() {} });
}

/// A NOTIFY of the implicit REFER subscription (RFC 3515) in `dialog`: `frag` is the status
/// line of the referred INVITE's answer (message/sipfrag); `done` ends the subscription. The
/// task ends with its transaction.
pub(crate) fn notify(
    agent: &Agent,
    dialog: &mut Dialog,
    hop: Target,
    frag: &str,
    done: bool,
) -> tokio::task::JoinHandle<()> {
    let mut req = dialog.request(Method::Notify);
    req.headers.push("Event", "refer");
    req.headers.push(
        "Subscription-State",
        if done {
            "terminated;reason=noresource"
        } else {
            "active;expires=60"
        },
    );
    req.headers.push("Contact", dialog.local_contact.as_str());
    req.headers
        .push("Content-Type", "message/sipfrag;version=2.0");
    req.body = Bytes::from(format!("{frag}\r\n"));
    let req = agent.ep.with_via(req, hop.transport);
    let mut events = agent.ep.request(req, hop);
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if matches!(
                ev,
                ClientEvent::Final(_) | ClientEvent::Timeout | ClientEvent::TransportError
            ) {
                break;
            }
        }
    })
}
