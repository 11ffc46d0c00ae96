//! The record writer: one task that saves the newest state of every waiting record in one
//! statement and transaction (group commit), so no request waits on the database, and tells
//! whoever waits for a record ([`Commit`]) once it is in the store.

use crate::store::{Cdr, Store};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

enum WriterOp {
    /// The record's current state, inserted or overwritten; the sender, if any, hears once it
    /// is committed.
    Save(Box<Cdr>, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
}

/// Settles when a record handed to the writer is committed to the store.
#[derive(Debug)]
pub struct Commit(Option<oneshot::Receiver<()>>);

impl Commit {
    /// Nothing to wait for.
    pub fn none() -> Commit {
        Commit(None)
    }

    /// Whether the record was committed within `limit` (false when the store failed or was too
    /// slow: then nobody may be told what the record says).
    pub async fn wait(self, limit: Duration) -> bool {
        match self.0 {
            None => true,
            Some(rx) => matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(()))),
        }
    }
}

/// The sending side of the record writer: cheap to use from any thread, never waits.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<WriterOp>,
    /// Changes handed to the writer and not yet taken by it.
    queued: Arc<AtomicUsize>,
}

impl Writer {
    /// Starts the writer task on `store`; record changes gather for `linger` before a commit.
    pub fn spawn(store: Store, linger: Duration) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(writer_task(store, rx, queued.clone(), linger));
        Writer { tx, queued }
    }

    /// Hands a record's current state to the writer.
    pub fn save(&self, cdr: Cdr) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(WriterOp::Save(Box::new(cdr), None));
    }

    /// Hands a record to the writer; the [`Commit`] settles once it is in the store.
    pub fn save_durable(&self, cdr: Cdr) -> Commit {
        let (tx, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(WriterOp::Save(Box::new(cdr), Some(tx)));
        Commit(Some(rx))
    }

    /// Records handed to the writer and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Waits until every record handed to the writer so far is in the store.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(WriterOp::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Writes records as they change, every waiting one in a single statement and transaction
/// (group commit), so the store keeps up with thousands of calls a second without weakening
/// durability. Only the newest state of each record in a batch is written; whoever waits for a
/// record hears once the batch holding it is committed. A batch that fails is retried record
/// by record, so one bad record loses nothing else; records the store still refuses (it is
/// down, or busy too long) are kept and retried every second until it takes them (up to
/// `MAX_HELD` records, beyond which the oldest are given up, loudly).
async fn writer_task(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<WriterOp>,
    queued: Arc<AtomicUsize>,
    linger: Duration,
) {
    const MAX_BATCH: usize = 1000;
    const MAX_HELD: usize = 100_000;
    const RETRY: Duration = Duration::from_secs(1);
    let mut batch: Vec<Cdr> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    // Who waits for which record of the batch to be committed.
    let mut committed: Vec<(String, oneshot::Sender<()>)> = Vec::new();
    let mut held: Vec<Cdr> = Vec::new();
    let mut store_trouble = false;
    loop {
        let first = if held.is_empty() {
            match rx.recv().await {
                Some(op) => Some(op),
                None => break,
            }
        } else {
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => Some(op),
                    None => break,
                },
                _ = tokio::time::sleep(RETRY) => None,
            }
        };
        // Let records gather for a moment: one commit then carries every call that changed in
        // the meantime, instead of one commit (and two thread hand-offs) per record.
        if !linger.is_zero() {
            tokio::time::sleep(linger).await;
        }
        for cdr in held.drain(..) {
            index.insert(cdr.id.clone(), batch.len());
            batch.push(cdr);
        }
        let mut next = first;
        if next.is_none() {
            next = rx.try_recv().ok();
        }
        while let Some(op) = next.take() {
            match op {
                WriterOp::Save(cdr, done) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    if let Some(done) = done {
                        committed.push((cdr.id.clone(), done));
                    }
                    match index.get(&cdr.id) {
                        Some(&i) => batch[i] = *cdr,
                        None => {
                            index.insert(cdr.id.clone(), batch.len());
                            batch.push(*cdr);
                        }
                    }
                }
                WriterOp::Flush(done) => waiting.push(done),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let started = std::time::Instant::now();
            let (written, failed, error) = write_batch(&store, &mut batch, &mut held).await;
            crate::metrics::METRICS
                .store_write_seconds
                .observe(started.elapsed().as_secs_f64());
            // The store's trouble is said once when it starts and once when it is over, not
            // for every record at every retry.
            match (&error, store_trouble) {
                (Some(e), false) => {
                    tracing::error!(error = %e, records = failed, "Cannot write call records; keeping them and retrying every second");
                    store_trouble = true;
                }
                (Some(e), true) => {
                    tracing::debug!(error = %e, records = failed, "Still cannot write call records")
                }
                (None, true) => {
                    tracing::info!(records = written.len(), "Call records are written again");
                    store_trouble = false;
                }
                (None, false) => {}
            }
            let refused = batch.len() - written.len() - failed;
            if refused > 0 {
                // Closed already, or kept by another run of this node: never overwritten.
                tracing::warn!(
                    records = refused,
                    "Records not written: closed already, or taken over by another relay"
                );
            }
            // Who waited for a record that is not in the store hears nothing (its sender is
            // dropped), so it tells nobody what the record says.
            committed.retain(|(id, _)| written.contains(id));
            if held.len() > MAX_HELD {
                let drop_n = held.len() - MAX_HELD;
                tracing::error!(
                    records = drop_n,
                    "Store unavailable too long: giving up the oldest unwritten records"
                );
                held.drain(..drop_n);
            }
            batch.clear();
            index.clear();
        }
        for (_, done) in committed.drain(..) {
            let _ = done.send(());
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes a batch in one commit, or record by record when that fails (one bad record loses
/// nothing else); the records the store still refuses go to `held`. Returns the ids written,
/// how many failed, and the store's last error.
async fn write_batch(
    store: &Store,
    batch: &mut [Cdr],
    held: &mut Vec<Cdr>,
) -> (std::collections::HashSet<String>, usize, Option<String>) {
    match store.save_cdrs(batch).await {
        Ok(ids) => (ids, 0, None),
        Err(e) => {
            let mut last = e.to_string();
            let mut written = std::collections::HashSet::new();
            let mut failed = 0;
            for cdr in batch.iter() {
                match store.save_cdrs(std::slice::from_ref(cdr)).await {
                    Ok(ids) => written.extend(ids),
                    Err(e) => {
                        last = e.to_string();
                        failed += 1;
                        held.push(cdr.clone());
                    }
                }
            }
            (written, failed, (failed > 0).then_some(last))
        }
    }
}
