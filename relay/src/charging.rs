//! The charge committer: every channel's charges (gRPC, INFO, the 200 for BYE) go through one
//! task that records what is waiting in one transaction (group commit), then answers each
//! sender. An answer is sent only after the commit, so an acknowledged charge is durable.
//!
//! A charge for a session whose record is still in the record writer's queue (a charge right
//! after the session began) would find no session: those are tried once more after the record
//! writer has flushed.
use proto::charge::{ChargeResult, Outcome};
use tokio::sync::{mpsc, oneshot};

use crate::session::Writer;
use crate::store::{Channel, NO_SUCH_SESSION, Store, StoreError, Submission};

/// The charges of a document an application server sent within session `sid` (an INFO, its
/// 200 for BYE): a charge that names no session is this session's.
pub fn in_session(
    server: &str,
    channel: Channel,
    sid: &str,
    doc: proto::charge::Charges,
) -> Vec<Submission> {
    doc.charges
        .into_iter()
        .map(|mut charge| {
            if charge.session_id.is_empty() {
                charge.session_id = sid.to_string();
            }
            Submission {
                appserver: server.to_string(),
                channel,
                charge,
            }
        })
        .collect()
}

/// Most charges in one transaction.
const MAX_BATCH: usize = 4096;

struct Job {
    charges: Vec<Submission>,
    reply: oneshot::Sender<Result<Vec<ChargeResult>, String>>,
}

/// A handle to the committer.
#[derive(Clone)]
pub struct Charging {
    tx: mpsc::UnboundedSender<Job>,
    grace_ms: i64,
}

impl std::fmt::Debug for Charging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charging")
            .field("grace_ms", &self.grace_ms)
            .finish()
    }
}

/// The relay could not record the charges (the store failed); nothing was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the relay could not record the charges: {0}")]
pub struct ChargingError(pub String);

impl Charging {
    /// Starts the committer on `store`; `records` is flushed when a charge's session is not
    /// found yet.
    pub fn spawn(store: Store, records: Writer, grace_ms: i64) -> Charging {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, records, rx, grace_ms));
        Charging { tx, grace_ms }
    }

    /// The grace after a session's end during which its charges are still taken.
    pub fn grace_ms(&self) -> i64 {
        self.grace_ms
    }

    /// Records charges; one result per charge, in order, once committed.
    pub async fn submit(
        &self,
        charges: Vec<Submission>,
    ) -> Result<Vec<ChargeResult>, ChargingError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { charges, reply })
            .map_err(|_| ChargingError("the relay is stopping".into()))?;
        match rx.await {
            Ok(Ok(results)) => Ok(results),
            Ok(Err(e)) => Err(ChargingError(e)),
            Err(_) => Err(ChargingError("the relay is stopping".into())),
        }
    }
}

async fn run(store: Store, records: Writer, mut rx: mpsc::UnboundedReceiver<Job>, grace_ms: i64) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut n = jobs[0].charges.len();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.charges.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let batch: Vec<Submission> = jobs
            .iter()
            .flat_map(|j| j.charges.iter().cloned())
            .collect();
        let outcome = record(&store, &records, &batch, grace_ms).await;
        if let Ok(results) = &outcome {
            for r in results {
                crate::metrics::METRICS.charge(r.outcome);
            }
        }
        let mut at = 0;
        for job in jobs {
            let k = job.charges.len();
            let answer = match &outcome {
                Ok(results) => Ok(results[at..at + k].to_vec()),
                Err(e) => Err(e.to_string()),
            };
            at += k;
            let _ = job.reply.send(answer);
        }
    }
}

/// One transaction for the batch; the charges whose session was not found yet are tried again
/// after the record writer flushed.
async fn record(
    store: &Store,
    records: &Writer,
    batch: &[Submission],
    grace_ms: i64,
) -> Result<Vec<ChargeResult>, StoreError> {
    let mut results = store
        .record_charges(batch, proto::clock::now_ms(), grace_ms)
        .await?;
    let missing: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.outcome == Outcome::NotFound
                && r.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with(NO_SUCH_SESSION))
        })
        .map(|(i, _)| i)
        .collect();
    if missing.is_empty() {
        return Ok(results);
    }
    records.flush().await;
    let again: Vec<Submission> = missing.iter().map(|&i| batch[i].clone()).collect();
    let second = store
        .record_charges(&again, proto::clock::now_ms(), grace_ms)
        .await?;
    for (i, r) in missing.into_iter().zip(second) {
        results[i] = r;
    }
    Ok(results)
}
