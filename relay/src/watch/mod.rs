//! Auto-redial (SPEC feature 12, seed file 004): a caller whose target (a user, or a service
//! with no server online) is not registered may ask the relay to watch for it, with
//! `;wait=SECONDS` in the dialled URI. Instead of 480 the relay answers 200 itself, with
//! `Relay-Watch: TARGET;until=UNIX-SECONDS`: a dialog between the caller and the relay (a
//! softphone that takes a REFER only inside a call can be reached that way). The watch (caller,
//! target, deadline, that dialog) is kept in the store, so it survives a restart. When the target
//! registers within the period, the relay sends the caller a REFER to the target inside that
//! dialog and ends the watch; the caller places the call through the relay as any other. When
//! the period runs out the relay ends the dialog with BYE; the caller may hang up at any time.
//! Nothing is polled: a REGISTER of the target is what fires the watch. The wait is never
//! billed: the attempt leaves a `failed` record (480, `watching`), the call after the REFER its
//! own record.

pub mod driver;

pub use driver::{run, start};

use proto::log::Esc;
use proto::sip::message::{self, Method, Request, Response};
use proto::sync::lock;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// The header on the relay's 200 that starts a watch: `TARGET;until=UNIX-SECONDS`.
pub const WATCH_HEADER: &str = "Relay-Watch";

/// How long after its REFER the relay ends the watch's dialog.
pub(crate) const BYE_AFTER_REFER: Duration = Duration::from_secs(2);

/// The dialog of a watch, as the relay (its UAS side) addresses the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchDialog {
    pub call_id: String,
    /// The relay's tag (the To tag of its 200).
    pub local_tag: String,
    pub remote_tag: String,
    /// The To of the 200 (with the relay's tag), the caller's From.
    pub local: String,
    pub remote: String,
    /// The caller's Contact.
    pub remote_target: String,
    /// Where the caller's INVITE came from (`udp:IP:PORT`): the relay's requests go there.
    pub source: String,
    /// The relay's last CSeq in this dialog.
    pub cseq: u32,
    /// The relay's Contact.
    pub contact: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Watch {
    pub(crate) id: String,
    pub(crate) caller: String,
    pub(crate) target: String,
    pub(crate) deadline_ms: i64,
    pub(crate) dialog: WatchDialog,
    /// Its REFER is out: kept only to answer the caller's NOTIFYs and BYE.
    pub(crate) fired: bool,
}

pub(crate) enum Cmd {
    /// A binding of this address of record was registered (here or at another relay).
    Registered(String),
    /// The caller hung up: the watch goes from the store.
    Forget(String),
}

/// The watches this relay keeps.
pub struct Watches {
    by_call: Mutex<HashMap<String, Watch>>,
    tx: mpsc::UnboundedSender<Cmd>,
    pub(crate) rx: Mutex<Option<mpsc::UnboundedReceiver<Cmd>>>,
}

impl std::fmt::Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches").finish_non_exhaustive()
    }
}

impl Default for Watches {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Watches {
            by_call: Mutex::new(HashMap::new()),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Watches {
    /// A REGISTER added a binding of `aor` (a user, or a service's server), here or at another
    /// relay of the database: its watches here fire.
    pub fn registered(&self, aor: &str) {
        let any = lock(&self.by_call)
            .values()
            .any(|w| !w.fired && w.target == aor);
        if any {
            let _ = self.tx.send(Cmd::Registered(aor.to_string()));
        }
    }

    /// A request in a watch's dialog, from the caller: answered here (200; a BYE ends the
    /// watch). `None`: no watch has this dialog.
    /// A re-INVITE with SDP (linphone holds the watch call before it follows the REFER) is
    /// answered 200 with an inactive SDP answer from `ip`.
    pub fn in_dialog(
        &self,
        req: &Request,
        from_tag: &str,
        to_tag: &str,
        ip: std::net::IpAddr,
    ) -> Option<Response> {
        let call_id = req.call_id()?;
        let mut map = lock(&self.by_call);
        let w = map.get(call_id)?;
        if w.dialog.local_tag != to_tag || w.dialog.remote_tag != from_tag {
            return None;
        }
        let status = match req.method {
            Method::Bye => {
                let w = map.remove(call_id)?;
                tracing::info!(caller = %Esc(&w.caller), target = %Esc(&w.target), "Watch ended by the caller");
                let _ = self.tx.send(Cmd::Forget(w.id));
                200
            }
            Method::Invite => {
                let contact = w.dialog.contact.clone();
                let answer = proto::sdp::is_sdp(req.headers.get("Content-Type"))
                    .then(|| proto::sdp::answer(&req.body, ip, proto::clock::now_unix()))
                    .flatten();
                return Some(match answer {
                    Some(sdp) => {
                        let mut ok = message::make_response(req, 200, None, None);
                        ok.headers.push("Contact", contact);
                        ok.headers.push("Content-Type", "application/sdp");
                        ok.body = sdp.into_bytes().into();
                        ok
                    }
                    None => message::make_response(req, 488, None, None),
                });
            }
            Method::Ack => return None,
            _ => 200,
        };
        Some(message::make_response(req, status, None, None))
    }

    /// How many watches this relay keeps.
    pub fn len(&self) -> usize {
        lock(&self.by_call).len()
    }

    /// Whether it keeps none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn insert(&self, w: Watch) {
        lock(&self.by_call).insert(w.dialog.call_id.clone(), w);
    }

    /// The watches of `target` not fired yet, marked fired.
    pub(crate) fn fire_for(&self, target: &str) -> Vec<Watch> {
        lock(&self.by_call)
            .values_mut()
            .filter(|w| !w.fired && w.target == target)
            .map(|w| {
                w.fired = true;
                w.clone()
            })
            .collect()
    }

    /// The watches whose period ran out, taken out.
    pub(crate) fn expired(&self, now: i64) -> Vec<Watch> {
        let mut map = lock(&self.by_call);
        let gone: Vec<String> = map
            .iter()
            .filter(|(_, w)| !w.fired && w.deadline_ms <= now)
            .map(|(k, _)| k.clone())
            .collect();
        gone.iter().filter_map(|k| map.remove(k)).collect()
    }

    pub(crate) fn forget_call(&self, call_id: &str) {
        lock(&self.by_call).remove(call_id);
    }

    /// Whether the watch's dialog is still up (the caller has not hung it up).
    pub(crate) fn has_call(&self, call_id: &str) -> bool {
        lock(&self.by_call).contains_key(call_id)
    }

    /// The next CSeq of the relay in a watch's dialog.
    pub(crate) fn next_cseq(&self, call_id: &str) -> Option<u32> {
        lock(&self.by_call).get_mut(call_id).map(|w| {
            w.dialog.cseq = w.dialog.cseq.saturating_add(1);
            w.dialog.cseq
        })
    }
}
