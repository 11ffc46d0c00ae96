//! What the relay's request handlers share while it serves ([`Core`]): the transport, the
//! store, sessions, caches and settings; the table of transaction contexts in progress and
//! the tombstones of finished ones, which the dispatcher consults before anything else.

use crate::auth::Authenticator;
use crate::config::Config;
use crate::session::Sessions;
use crate::store::Store;
use proto::sip::message::{Message, Request, Response};
use proto::sip::transaction::{Timers, TxKey};
use proto::sync::lock;
use proto::transport::{SipTransport, Target};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Inputs waiting for one transaction context (retransmissions, responses of its branches); a
/// context that falls this far behind loses the excess, as a datagram network would.
pub const CTX_QUEUE: usize = 64;

/// What stays of a finished transaction context while retransmissions may still arrive.
#[derive(Debug, Clone)]
pub struct Tombstone {
    pub expires: Instant,
    /// For a non-INVITE: where and what to answer a retransmitted request with (boxed: most
    /// tombstones have none, and the table holds tens of thousands).
    pub reply: Option<Box<(Target, Vec<u8>)>>,
    /// Whether ACKs with this key are absorbed too (the ACK for a non-2xx final response was
    /// already received: retransmissions of it end here).
    pub absorb_ack: bool,
}

/// What the dispatcher hands to a context (boxed: a context's channel allocates its slots in
/// blocks of 32).
#[derive(Debug)]
pub enum CtxInput {
    /// A retransmission of the request, or the ACK for a non-2xx final response.
    Request(Box<Request>, Target),
    /// A response to one of the context's client transactions.
    Response(Box<Response>),
    /// The caller cancelled the INVITE.
    Cancel,
    /// The relay is stopping: an INVITE still ringing is cancelled towards its callees and
    /// answered 503 (its record says `relay-stop`); other requests ignore it.
    Stop,
}

/// Most finished transactions kept to absorb retransmissions (each a few hundred bytes).
pub const MAX_TOMBSTONES: usize = 200_000;

/// Everything the request handlers share.
pub struct Core {
    pub transport: Arc<SipTransport>,
    pub store: Store,
    pub config: Config,
    pub auth: Authenticator,
    pub sessions: Sessions,
    /// Application charges from every channel, committed in groups.
    pub charging: crate::charging::Charging,
    pub location: crate::location::Location,
    pub catalog: crate::search::Catalog,
    pub timers: Timers,
    /// What the relay calls itself on the wire (domain, Via and Record-Route address).
    pub identity: crate::identity::Identity,
    /// What each transaction's inquiry needs to know of the relay.
    pub inquiry: Arc<crate::proxy::inquiry::Settings>,
    /// The additional servers this relay may redirect to (other relays on its database),
    /// itself left out.
    pub additional: Vec<crate::config::Additional>,
    /// Auto-redial: the callers waiting for a target to register.
    pub watches: crate::watch::Watches,
    pub(crate) contexts: Mutex<HashMap<TxKey, mpsc::Sender<CtxInput>>>,
    pub(crate) tombstones: Mutex<Tombstones>,
    /// This run's lease of its node id.
    pub(crate) lease: crate::store::NodeLease,
    /// Set when another relay took the lease over: this one stops.
    pub(crate) lease_lost: std::sync::atomic::AtomicBool,
    /// Set by a planned stop ([`RelayHandle::drain`]): new calls are refused with 503.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

/// Finished server transactions still absorbing retransmissions, in expiry order.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    by_key: HashMap<TxKey, Tombstone>,
    order: VecDeque<(Instant, TxKey)>,
}

impl Tombstones {
    /// Keeps `tombstone` for `key`. At [`MAX_TOMBSTONES`] the oldest goes first.
    fn bury(&mut self, key: TxKey, tombstone: Tombstone) {
        while self.by_key.len() >= MAX_TOMBSTONES {
            let Some((_, old)) = self.order.pop_front() else {
                self.by_key.clear();
                break;
            };
            self.by_key.remove(&old);
        }
        self.order.push_back((tombstone.expires, key.clone()));
        self.by_key.insert(key, tombstone);
    }

    /// Forgets the tombstones expired by `now`, then keeps the table as large as what it holds
    /// needs: the hash table marks a removed slot instead of emptying it, so under steady
    /// churn the marks use up its room until it doubles although its count does not grow
    /// (+21 MB at 1,000 calls/s after 5 minutes, measured). Rebuilt once little room is left
    /// (every ~15 s at that rate, a few ms), it never does.
    fn sweep(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                if self.by_key.get(&key).is_some_and(|s| s.expires <= now) {
                    self.by_key.remove(&key);
                }
            }
        }
        let len = self.by_key.len();
        if self.by_key.capacity() - len < len / 4 {
            let live = std::mem::take(&mut self.by_key);
            self.by_key = HashMap::with_capacity(len + len / 2);
            self.by_key.extend(live);
        }
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("advertised", &self.identity.advertised)
            .finish_non_exhaustive()
    }
}

impl Core {
    pub(crate) fn register_context(&self, key: TxKey, tx: mpsc::Sender<CtxInput>) {
        lock(&self.contexts).insert(key, tx);
    }

    pub(crate) fn unregister_context(&self, key: &TxKey) {
        lock(&self.contexts).remove(key);
    }

    pub(crate) fn context_for(&self, key: &TxKey) -> Option<mpsc::Sender<CtxInput>> {
        lock(&self.contexts).get(key).cloned()
    }

    /// Replaces a finished context by its tombstone. At [`MAX_TOMBSTONES`] the oldest goes
    /// first (a retransmission it would have absorbed then finds no transaction: a
    /// retransmitted request is screened again, a stray ACK dropped).
    pub(crate) fn bury(&self, key: TxKey, tombstone: Tombstone) {
        lock(&self.tombstones).bury(key, tombstone);
    }

    /// The tombstone of a finished transaction, if one is still absorbing.
    pub(crate) fn tombstone(&self, key: &TxKey) -> Option<Tombstone> {
        let now = Instant::now();
        lock(&self.tombstones)
            .by_key
            .get(key)
            .filter(|t| t.expires > now)
            .cloned()
    }

    pub(crate) fn sweep_tombstones(&self, now: Instant) {
        lock(&self.tombstones).sweep(now);
    }

    /// Number of finished transactions kept to absorb retransmissions.
    pub fn tombstones_kept(&self) -> usize {
        lock(&self.tombstones).by_key.len()
    }

    /// Room of the tombstone table and its expiry queue before they grow (for the table-size
    /// debug line).
    pub fn tombstone_capacity(&self) -> (usize, usize) {
        let t = lock(&self.tombstones);
        (t.by_key.capacity(), t.order.capacity())
    }

    /// Number of live transaction contexts (for tests and metrics).
    pub fn live_contexts(&self) -> usize {
        lock(&self.contexts).len()
    }

    /// Whether a planned stop has begun: new calls are refused.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells every transaction in progress that the relay is stopping (INVITEs still ringing
    /// are given up, see [`CtxInput::Stop`]).
    pub(crate) fn stop_contexts(&self) {
        let senders: Vec<_> = lock(&self.contexts).values().cloned().collect();
        for tx in senders {
            let _ = tx.try_send(CtxInput::Stop);
        }
    }

    /// Waits (at most `limit`) until every message received so far has been read and handed to
    /// its context. A context whose timer fired calls this first: after the relay could not run
    /// for a while, the answers that arrived meanwhile wait in the socket, and acting on the
    /// timer before them would retransmit requests already answered (a callee then sees its
    /// INVITE again after its 200).
    pub async fn input_settled(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.transport.input_waiting() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub async fn send(&self, target: &Target, msg: &Message) {
        crate::metrics::METRICS.sent(msg);
        if let Err(e) = self.transport.send(target, msg).await {
            tracing::debug!(%target, error = %e, "Send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sip::message::Method;

    fn key(n: u64) -> TxKey {
        TxKey {
            branch: format!("z9hG4bK{n:016x}"),
            sent_by: "127.0.0.1:5071".into(),
            method: Method::Invite,
        }
    }

    #[test]
    fn a_steady_churn_of_tombstones_keeps_the_table_at_the_size_it_needs() {
        let mut t = Tombstones::default();
        let t0 = Instant::now();
        let life = Duration::from_millis(1_100);
        // 1,100 tombstones alive at any time (room for 1,792 fits them; a doubled table has
        // room for 3,584), 200,000 buried and expired in all, swept every 100.
        for n in 0..200_000u64 {
            let at = t0 + Duration::from_millis(n);
            t.bury(
                key(n),
                Tombstone {
                    expires: at + life,
                    reply: None,
                    absorb_ack: false,
                },
            );
            if n % 100 == 0 {
                t.sweep(at);
            }
        }
        let (len, room) = (t.by_key.len(), t.by_key.capacity());
        assert!((1_100..=1_200).contains(&len), "{len} alive");
        assert!(
            room <= 1_792,
            "the table grew to room for {room} while holding {len}"
        );
    }
}
