//! The live sessions and their tokens: what the 200 OK promised, what the HTTP API reports, and
//! the capacity count (reserved slots while deciding, live sessions from the 200 on).
//!
//! Plain state behind a mutex: no I/O, no SIP sending (the agent sends BYE), no clock reads
//! (times are passed in).

use proto::sip::dialog::Dialog;
use proto::sip::message::Request;
use rand::RngCore as _;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// One live session.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) sid: String,
    pub(crate) user: String,
    pub(crate) service: String,
    pub(crate) detail: Option<String>,
    pub(crate) token: String,
    /// Token issue time, Unix seconds.
    pub(crate) issued_at: u64,
    /// Token expiry, Unix seconds.
    pub(crate) expires_at: u64,
    pub(crate) dialog: Dialog,
    pub(crate) acked: bool,
    /// The web service closed it before the ACK came: the BYE goes out once the ACK is in
    /// (RFC 3261 §15: no BYE on an unconfirmed dialog); its token is already dead.
    pub(crate) closing: bool,
    /// Woken when the ACK arrives or the session ends (stops 2xx retransmissions).
    pub(crate) wake: Arc<Notify>,
    /// The client's INVITE listed UPDATE in its Allow: a change goes to it as UPDATE, else as
    /// re-INVITE (baresip 1.0 answers UPDATE 501).
    pub(crate) allow_update: bool,
    /// The CSeq of the latest ACK (a re-INVITE's 2xx is retransmitted until its ACK).
    pub(crate) ack_seq: u32,
    /// The session was made with SDP (a softphone): a change keeps SDP in the body.
    pub(crate) sdp: bool,
}

/// What `POST /introspect` reports for an active token (RFC 7662 names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Introspection {
    pub(crate) active: bool,
    pub(crate) sub: String,
    pub(crate) username: String,
    pub(crate) sid: String,
    pub(crate) service: String,
    pub(crate) scope: String,
    pub(crate) detail: Option<String>,
    pub(crate) server: String,
    pub(crate) iat: u64,
    pub(crate) exp: u64,
}

/// What [`Sessions::close`] did.
#[derive(Debug)]
pub(crate) enum Closing {
    /// Ended: send the BYE.
    Now(Box<Session>),
    /// The token is dead; the BYE follows the ACK.
    AfterAck { user: String },
}

/// One line of `GET /sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Summary {
    pub(crate) sid: String,
    pub(crate) user: String,
    pub(crate) service: String,
    /// Unix seconds.
    pub(crate) started_at: u64,
    pub(crate) acked: bool,
}

#[derive(Debug, Default)]
struct Inner {
    by_sid: HashMap<String, Session>,
    sid_by_token: HashMap<String, String>,
    sid_by_call: HashMap<String, String>,
    reserved: usize,
}

/// The live sessions of the agent.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<Inner>,
}

/// A capacity slot held while a session is being decided; given back when dropped unless the
/// session goes live ([`Sessions::go_live`]).
#[derive(Debug)]
pub(crate) struct Slot {
    sessions: Arc<Sessions>,
    live: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.live {
            let mut inner = self.sessions.lock();
            inner.reserved = inner.reserved.saturating_sub(1);
        }
    }
}

/// A fresh token: 192 random bits from the operating system, in hex.
pub(crate) fn new_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot when fewer than `capacity` sessions are live or being decided (`None`: no limit).
    pub(crate) fn reserve(self: &Arc<Self>, capacity: Option<usize>) -> Option<Slot> {
        let mut inner = self.lock();
        if let Some(cap) = capacity {
            if inner.by_sid.len() + inner.reserved >= cap {
                return None;
            }
        }
        inner.reserved += 1;
        Some(Slot {
            sessions: self.clone(),
            live: false,
        })
    }

    /// The session becomes live (counted from here on instead of its slot).
    pub(crate) fn go_live(&self, mut slot: Slot, session: Session) {
        let mut inner = self.lock();
        inner.reserved = inner.reserved.saturating_sub(1);
        slot.live = true;
        inner
            .sid_by_token
            .insert(session.token.clone(), session.sid.clone());
        inner
            .sid_by_call
            .insert(session.dialog.call_id.clone(), session.sid.clone());
        inner.by_sid.insert(session.sid.clone(), session);
    }

    pub(crate) fn live(&self) -> usize {
        self.lock().by_sid.len()
    }

    /// Whether a session of this id is live here.
    pub(crate) fn is_live(&self, sid: &str) -> bool {
        self.lock().by_sid.contains_key(sid)
    }

    /// The session whose dialog an in-dialog request belongs to.
    pub(crate) fn find(&self, req: &Request) -> Option<String> {
        let inner = self.lock();
        let sid = inner.sid_by_call.get(req.call_id()?)?;
        let s = inner.by_sid.get(sid)?;
        s.dialog.matches(req).then(|| sid.clone())
    }

    /// Records the ACK of a session; wakes its 2xx retransmission.
    pub(crate) fn acked(&self, sid: &str) {
        if let Some(s) = self.lock().by_sid.get_mut(sid) {
            s.acked = true;
            s.wake.notify_one();
        }
    }

    /// Records the CSeq number of an ACK in the session.
    pub(crate) fn ack_seq(&self, sid: &str, seq: u32) {
        if let Some(s) = self.lock().by_sid.get_mut(sid) {
            s.ack_seq = s.ack_seq.max(seq);
        }
    }

    /// Whether the ACK for the INVITE with CSeq `seq` came (or the session is over).
    pub(crate) fn acked_seq(&self, sid: &str, seq: u32) -> bool {
        self.lock().by_sid.get(sid).is_none_or(|s| s.ack_seq >= seq)
    }

    /// A copy of a live session.
    pub(crate) fn get(&self, sid: &str) -> Option<Session> {
        self.lock().by_sid.get(sid).cloned()
    }

    /// The session now delivers `service` with `detail`; its user, if it is live.
    pub(crate) fn changed(
        &self,
        sid: &str,
        service: &str,
        detail: Option<String>,
    ) -> Option<String> {
        let mut inner = self.lock();
        let s = inner.by_sid.get_mut(sid)?;
        s.service = service.to_string();
        s.detail = detail;
        Some(s.user.clone())
    }

    /// Whether the session is live and still waits for its ACK.
    pub(crate) fn awaits_ack(&self, sid: &str) -> bool {
        self.lock().by_sid.get(sid).is_some_and(|s| !s.acked)
    }

    /// Ends a session: its token is inactive from now on. `None` if it was not live.
    pub(crate) fn end(&self, sid: &str) -> Option<Session> {
        let mut inner = self.lock();
        let s = inner.by_sid.remove(sid)?;
        inner.sid_by_token.remove(&s.token);
        if inner.sid_by_call.get(&s.dialog.call_id) == Some(&s.sid) {
            inner.sid_by_call.remove(&s.dialog.call_id);
        }
        s.wake.notify_one();
        Some(s)
    }

    /// The web service wants the session closed: ends it now if it was acknowledged (the
    /// caller sends the BYE); otherwise kills its token and marks it to be ended when the ACK
    /// comes. `None` if it is not live (or already closing).
    pub(crate) fn close(&self, sid: &str) -> Option<Closing> {
        {
            let mut inner = self.lock();
            let s = inner.by_sid.get_mut(sid)?;
            if s.closing {
                return None;
            }
            if !s.acked {
                s.closing = true;
                let (token, user) = (s.token.clone(), s.user.clone());
                inner.sid_by_token.remove(&token);
                return Some(Closing::AfterAck { user });
            }
        }
        self.end(sid).map(|s| Closing::Now(Box::new(s)))
    }

    /// A session marked closing whose ACK has come: ended now (the caller sends the BYE).
    pub(crate) fn end_if_closing(&self, sid: &str) -> Option<Session> {
        let closing = self
            .lock()
            .by_sid
            .get(sid)
            .is_some_and(|s| s.closing && s.acked);
        if closing { self.end(sid) } else { None }
    }

    /// Ends every session (at shutdown).
    pub(crate) fn end_all(&self) -> Vec<Session> {
        let sids: Vec<String> = self.lock().by_sid.keys().cloned().collect();
        sids.iter().filter_map(|sid| self.end(sid)).collect()
    }

    /// Whether the token's session is live but still waits for its ACK (and is not closing).
    pub(crate) fn token_awaits_ack(&self, token: &str) -> bool {
        let inner = self.lock();
        inner
            .sid_by_token
            .get(token)
            .and_then(|sid| inner.by_sid.get(sid))
            .is_some_and(|s| !s.acked && !s.closing)
    }

    /// What the token stands for, if it is a live session's, acknowledged (a client that never
    /// sends the ACK gets no service) and unexpired at `now_unix`.
    pub(crate) fn introspect(
        &self,
        token: &str,
        server: &str,
        now_unix: u64,
    ) -> Option<Introspection> {
        let inner = self.lock();
        let sid = inner.sid_by_token.get(token)?;
        let s = inner.by_sid.get(sid)?;
        if !s.acked || now_unix >= s.expires_at {
            return None;
        }
        Some(Introspection {
            active: true,
            sub: s.user.clone(),
            username: s.user.clone(),
            sid: s.sid.clone(),
            service: s.service.clone(),
            scope: s.service.clone(),
            detail: s.detail.clone(),
            server: server.to_string(),
            iat: s.issued_at,
            exp: s.expires_at,
        })
    }

    /// For a liveness check at `now_unix`: an in-dialog OPTIONS (with the dialog's next CSeq)
    /// and the dialog, for every acknowledged session whose token is still valid; and the ids of
    /// sessions whose token has expired.
    pub(crate) fn probes(&self, now_unix: u64) -> (Vec<(String, Request, Dialog)>, Vec<String>) {
        let mut inner = self.lock();
        let mut probes = Vec::new();
        let mut expired = Vec::new();
        for s in inner.by_sid.values_mut() {
            if now_unix >= s.expires_at {
                expired.push(s.sid.clone());
            } else if s.acked {
                let req = s.dialog.request(proto::sip::message::Method::Options);
                probes.push((s.sid.clone(), req, s.dialog.clone()));
            }
        }
        (probes, expired)
    }

    /// A new in-dialog request of a live, acknowledged session, and its dialog (for the hop).
    pub(crate) fn request(
        &self,
        sid: &str,
        method: proto::sip::message::Method,
    ) -> Option<(Request, Dialog)> {
        let mut inner = self.lock();
        let s = inner.by_sid.get_mut(sid).filter(|s| s.acked)?;
        let req = s.dialog.request(method);
        Some((req, s.dialog.clone()))
    }

    /// The live sessions, oldest first.
    pub(crate) fn list(&self) -> Vec<Summary> {
        let inner = self.lock();
        let mut out: Vec<Summary> = inner
            .by_sid
            .values()
            .map(|s| Summary {
                sid: s.sid.clone(),
                user: s.user.clone(),
                service: s.service.clone(),
                started_at: s.issued_at,
                acked: s.acked,
            })
            .collect();
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.sid.cmp(&b.sid)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sip::message::Uri;

    fn session(sid: &str, token: &str, call_id: &str) -> Session {
        Session {
            sid: sid.into(),
            user: "alice".into(),
            service: "wine".into(),
            detail: Some("red".into()),
            token: token.into(),
            issued_at: 100,
            expires_at: 200,
            dialog: Dialog {
                call_id: call_id.into(),
                local_tag: "l".into(),
                remote_tag: "r".into(),
                local: "<sip:wine@x>;tag=l".into(),
                remote: "<sip:alice@x>;tag=r".into(),
                local_seq: 0,
                remote_target: Uri::parse("sip:alice@127.0.0.1:5555").unwrap(),
                route_set: vec![],
                local_contact: "<sip:wine@127.0.0.1:5070>".into(),
            },
            acked: false,
            closing: false,
            wake: Arc::new(Notify::new()),
            allow_update: false,
            ack_seq: 0,
            sdp: false,
        }
    }

    #[test]
    fn capacity_counts_slots_and_live_sessions() {
        let s = Arc::new(Sessions::default());
        let a = s.reserve(Some(2)).unwrap();
        let b = s.reserve(Some(2)).unwrap();
        assert!(s.reserve(Some(2)).is_none());
        drop(b);
        let b = s.reserve(Some(2)).unwrap();
        s.go_live(a, session("s1", "t1", "c1"));
        assert_eq!(s.live(), 1);
        assert!(s.reserve(Some(2)).is_none());
        drop(b);
        assert!(s.reserve(Some(2)).is_some());
        assert!(s.reserve(None).is_some());
    }

    #[test]
    fn tokens_are_active_from_the_ack_while_the_session_lives_and_before_expiry() {
        let s = Arc::new(Sessions::default());
        let slot = s.reserve(None).unwrap();
        s.go_live(slot, session("s1", "t1", "c1"));
        assert!(
            s.introspect("t1", "vendor", 150).is_none(),
            "no service before the ACK"
        );
        s.acked("s1");
        let i = s.introspect("t1", "vendor", 150).unwrap();
        assert_eq!(
            (i.sub.as_str(), i.sid.as_str(), i.exp),
            ("alice", "s1", 200)
        );
        assert!(s.introspect("t1", "vendor", 200).is_none());
        assert!(s.introspect("t2", "vendor", 150).is_none());
        assert!(s.end("s1").is_some());
        assert!(s.introspect("t1", "vendor", 150).is_none());
        assert!(s.end("s1").is_none());
        assert_eq!(new_token().len(), 48);
        assert_ne!(new_token(), new_token());
    }

    #[test]
    fn closing_before_the_ack_kills_the_token_and_waits_for_the_ack() {
        let sessions = Arc::new(Sessions::default());
        let slot = sessions.reserve(None).unwrap();
        sessions.go_live(slot, session("s1", "t1", "c1"));
        assert!(matches!(
            sessions.close("s1"),
            Some(Closing::AfterAck { .. })
        ));
        assert!(sessions.introspect("t1", "v", 150).is_none());
        assert_eq!(sessions.live(), 1, "kept until the ACK");
        assert!(sessions.close("s1").is_none(), "closing once is enough");
        assert!(sessions.end_if_closing("s1").is_none(), "no ACK yet");
        sessions.acked("s1");
        assert!(sessions.end_if_closing("s1").is_some());
        assert_eq!(sessions.live(), 0);
        // An acknowledged session closes at once.
        let slot = sessions.reserve(None).unwrap();
        sessions.go_live(slot, session("s2", "t2", "c2"));
        sessions.acked("s2");
        assert!(matches!(sessions.close("s2"), Some(Closing::Now(_))));
    }
}
