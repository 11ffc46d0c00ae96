//! Session control: the table of dialogs the relay has seen answered, their timing, and their
//! call-detail records.
//!
//! A call's billable time runs from the moment the relay relays the caller's ACK for the 2xx to
//! the moment it relays the 200 answering a BYE, measured on the monotonic clock and stored with
//! UTC wall-clock timestamps. Every attempt leaves one record: a failed INVITE a `failed` record
//! with its final status; an answered call an `established` record when the ACK passes, closed
//! (`ended`) when the BYE is answered. Records are written in order by one writer task so the
//! request path never waits on the database.

use crate::serve::{lock, now_ms};
use crate::store::{Cdr, Store};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Who ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    Caller,
    Callee,
    Relay,
}

impl Party {
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Caller => "caller",
            Party::Callee => "callee",
            Party::Relay => "relay",
        }
    }
}

#[derive(Debug)]
struct Session {
    cdr: Cdr,
    caller_tag: String,
    callee_tag: String,
    answered: Instant,
    peers: [Option<SocketAddr>; 2],
    started: Option<Instant>,
    bye_from: Option<Party>,
}

enum WriterOp {
    /// The record's current state, inserted or overwritten.
    Save(Box<Cdr>),
    Flush(oneshot::Sender<()>),
}

/// The dialog table and the record writer.
pub struct Sessions {
    by_call: Mutex<HashMap<String, Vec<Session>>>,
    writer: mpsc::UnboundedSender<WriterOp>,
    store: Store,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

/// What the proxy knows about an INVITE when it ends or is answered.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub call_id: String,
    pub caller: String,
    pub callee: String,
    pub created_at_ms: i64,
}

impl Sessions {
    pub fn new(store: Store) -> Sessions {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_task(store.clone(), rx));
        Sessions {
            by_call: Mutex::new(HashMap::new()),
            writer: tx,
            store,
        }
    }

    /// Closes records a previous run left open (the relay stopped without seeing their end):
    /// they are marked ended by the relay with reason `relay-restart` and no duration is invented.
    pub async fn recover(&self, now: i64) {
        match self.store.close_open_cdrs(now, "relay-restart").await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(count = n, "Closed sessions left open by a previous run"),
            Err(e) => tracing::error!(error = %e, "Could not close sessions left open"),
        }
    }

    /// Waits until every record handed to the writer so far is in the store.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriterOp::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// An INVITE ended without a session: one `failed` record with its final status.
    pub fn failed(&self, attempt: &Attempt, status: u16, reason: &str) {
        let now = now_ms();
        let cdr = Cdr {
            id: uuid::Uuid::new_v4().to_string(),
            call_id: attempt.call_id.clone(),
            caller: attempt.caller.clone(),
            callee: attempt.callee.clone(),
            created_at_ms: attempt.created_at_ms,
            started_at_ms: None,
            ended_at_ms: Some(now),
            duration_ms: None,
            ended_by: None,
            status: Some(i32::from(status)),
            reason: Some(reason.to_string()),
            state: "failed".into(),
        };
        let _ = self.writer.send(WriterOp::Save(Box::new(cdr)));
    }

    /// A 2xx to an INVITE was relayed: a dialog exists (one per distinct To tag).
    /// `peers` are the transport addresses of both parties' Contacts: the only places
    /// in-dialog requests of this session may be relayed to.
    pub fn answered(
        &self,
        attempt: &Attempt,
        caller_tag: &str,
        callee_tag: &str,
        status: u16,
        peers: [Option<SocketAddr>; 2],
    ) {
        let mut map = lock(&self.by_call);
        let list = map.entry(attempt.call_id.clone()).or_default();
        if list
            .iter()
            .any(|s| s.caller_tag == caller_tag && s.callee_tag == callee_tag)
        {
            return;
        }
        list.push(Session {
            cdr: Cdr {
                id: uuid::Uuid::new_v4().to_string(),
                call_id: attempt.call_id.clone(),
                caller: attempt.caller.clone(),
                callee: attempt.callee.clone(),
                created_at_ms: attempt.created_at_ms,
                started_at_ms: None,
                ended_at_ms: None,
                duration_ms: None,
                ended_by: None,
                status: Some(i32::from(status)),
                reason: None,
                state: "answered".into(),
            },
            caller_tag: caller_tag.to_string(),
            callee_tag: callee_tag.to_string(),
            answered: Instant::now(),
            peers,
            started: None,
            bye_from: None,
        });
    }

    /// Whether a request with these tags belongs to a dialog the relay knows.
    pub fn knows(&self, call_id: &str, from_tag: &str, to_tag: &str) -> bool {
        let map = lock(&self.by_call);
        map.get(call_id)
            .is_some_and(|l| l.iter().any(|s| s.matches(from_tag, to_tag)))
    }

    /// Whether an in-dialog request of a known dialog may go to `addr`: only to one of the two
    /// parties, so a forged Route or Request-URI cannot turn the relay into an open proxy.
    pub fn peer_allowed(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        addr: SocketAddr,
    ) -> bool {
        let map = lock(&self.by_call);
        map.get(call_id).is_some_and(|l| {
            l.iter()
                .any(|s| s.matches(from_tag, to_tag) && s.peers.contains(&Some(addr)))
        })
    }

    /// The caller's ACK for the 2xx was relayed: the session starts now.
    pub fn acked(&self, call_id: &str, from_tag: &str, to_tag: &str) {
        let mut map = lock(&self.by_call);
        let Some(s) = map
            .get_mut(call_id)
            .and_then(|l| l.iter_mut().find(|s| s.matches(from_tag, to_tag)))
        else {
            return;
        };
        if s.started.is_some() || s.cdr.state == "ended" {
            return;
        }
        s.started = Some(Instant::now());
        s.cdr.started_at_ms = Some(now_ms());
        s.cdr.state = "established".into();
        let _ = self.writer.send(WriterOp::Save(Box::new(s.cdr.clone())));
    }

    /// A BYE was relayed; `from_tag` says which side sent it.
    pub fn bye_relayed(&self, call_id: &str, from_tag: &str, to_tag: &str) {
        let mut map = lock(&self.by_call);
        if let Some(s) = map
            .get_mut(call_id)
            .and_then(|l| l.iter_mut().find(|s| s.matches(from_tag, to_tag)))
        {
            if s.bye_from.is_none() {
                s.bye_from = Some(if from_tag == s.caller_tag {
                    Party::Caller
                } else {
                    Party::Callee
                });
            }
        }
    }

    /// The final response to a BYE was relayed: the session ends now.
    pub fn bye_answered(&self, call_id: &str, from_tag: &str, to_tag: &str, status: u16) {
        let mut map = lock(&self.by_call);
        let Some(list) = map.get_mut(call_id) else {
            return;
        };
        let Some(pos) = list.iter().position(|s| s.matches(from_tag, to_tag)) else {
            return;
        };
        let mut s = list.swap_remove(pos);
        if list.is_empty() {
            map.remove(call_id);
        }
        drop(map);
        let now = now_ms();
        let was_established = s.started.is_some();
        s.cdr.ended_at_ms = Some(now);
        s.cdr.duration_ms = Some(
            s.started
                .map(|t| t.elapsed().as_millis() as i64)
                .unwrap_or(0),
        );
        s.cdr.ended_by = Some(s.bye_from.unwrap_or(Party::Caller).as_str().to_string());
        s.cdr.reason = Some(if (200..300).contains(&status) {
            if was_established {
                "bye".to_string()
            } else {
                "bye-before-ack".to_string()
            }
        } else {
            format!("bye-{status}")
        });
        s.cdr.state = "ended".into();
        let _ = self.writer.send(WriterOp::Save(Box::new(s.cdr)));
    }

    /// Ends answered sessions whose ACK never came within `grace` (the callee gives up after
    /// 64*T1 too, RFC 3261 §13.3.1.4): each gets a `failed` record with reason `no-ack`.
    pub fn sweep_unacknowledged(&self, grace: std::time::Duration) {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut map = lock(&self.by_call);
            map.retain(|_, list| {
                list.retain_mut(|s| {
                    let stale = s.started.is_none() && now.duration_since(s.answered) > grace;
                    if stale {
                        gone.push(std::mem::take(&mut s.cdr));
                    }
                    !stale
                });
                !list.is_empty()
            });
        }
        for mut cdr in gone {
            cdr.ended_at_ms = Some(now_ms());
            cdr.ended_by = Some(Party::Relay.as_str().to_string());
            cdr.reason = Some("no-ack".into());
            cdr.state = "failed".into();
            tracing::info!(call_id = %cdr.call_id, "Answered call never acknowledged");
            let _ = self.writer.send(WriterOp::Save(Box::new(cdr)));
        }
    }

    /// Number of dialogs in the table.
    pub fn live(&self) -> usize {
        lock(&self.by_call).values().map(Vec::len).sum()
    }
}

impl Session {
    fn matches(&self, from_tag: &str, to_tag: &str) -> bool {
        (self.caller_tag == from_tag && self.callee_tag == to_tag)
            || (self.caller_tag == to_tag && self.callee_tag == from_tag)
    }
}

/// Writes records as they change, every waiting one in a single statement and transaction
/// (group commit), so the store keeps up with thousands of calls a second without weakening
/// durability. Only the newest state of each record in a batch is written. A batch that fails
/// is retried record by record, so one bad record loses nothing else.
async fn writer_task(store: Store, mut rx: mpsc::UnboundedReceiver<WriterOp>) {
    const MAX_BATCH: usize = 2000;
    const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
    let mut batch: Vec<Cdr> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(op) = rx.recv().await {
        // Let records gather for a moment: one commit then carries every call that changed in
        // the meantime, instead of one commit (and two thread hand-offs) per record.
        tokio::time::sleep(LINGER).await;
        let mut next = Some(op);
        while let Some(op) = next.take() {
            match op {
                WriterOp::Save(cdr) => match index.get(&cdr.id) {
                    Some(&i) => batch[i] = *cdr,
                    None => {
                        index.insert(cdr.id.clone(), batch.len());
                        batch.push(*cdr);
                    }
                },
                WriterOp::Flush(done) => waiting.push(done),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.save_cdrs(&batch).await {
                tracing::warn!(error = %e, records = batch.len(), "Batch write failed; writing one by one");
                for cdr in &batch {
                    if let Err(e) = store.save_cdrs(std::slice::from_ref(cdr)).await {
                        tracing::error!(error = %e, call_id = %cdr.call_id, "Writing a call record failed");
                    }
                }
            }
            batch.clear();
            index.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}
