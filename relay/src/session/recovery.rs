//! Recovery after a restart: what a previous run of this node left open in the store is
//! taken over, closed or put back in the dialog table for an immediate check.

use super::*;
use crate::store::Store;

impl Sessions {
    /// Takes over what a previous run left open. Attempts never established are closed as
    /// failed (`relay-restart`). Established sessions are put back in the table for an
    /// immediate check of both parties: a session whose parties both answer is resumed (its
    /// record gets `resumed_at_ms`), otherwise it is closed with reason `relay-restart`, billed up
    /// to the last sign of life the previous run recorded. Nothing is silently dropped.
    pub async fn recover(&self, store: &Store, now: i64) {
        // This run holds the node's lease: the node's open records are moved to it at once,
        // so no other relay can end them.
        match store.claim_open_cdrs(&self.node, &self.instance).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(count = n, node = %self.node, "Took over the records left open")
            }
            Err(e) => tracing::error!(error = %e, "Could not take over the records left open"),
        }
        match store
            .close_open_attempts(now, "relay-restart", &self.instance)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(count = n, "Closed attempts left open by a previous run"),
            Err(e) => tracing::error!(error = %e, "Could not close attempts left open"),
        }
        let open = match store.established_cdrs(&self.instance).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "Could not read sessions left open");
                return;
            }
        };
        let mut resumed = 0;
        for cdr in open {
            let state: Option<DialogState> = cdr
                .dialog
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok());
            let Some(d) = state else {
                // Nothing to reach the parties with: close it, billed to the last sign of life.
                let mut cdr = cdr;
                close_at_last_sign(&mut cdr, None, now);
                log_ended(&cdr);
                self.save(cdr);
                continue;
            };
            let mono_now = Instant::now();
            let ago = |ms: Option<i64>| {
                let back =
                    Duration::from_millis(u64::try_from(now - ms.unwrap_or(now)).unwrap_or(0));
                mono_now.checked_sub(back).unwrap_or(mono_now)
            };
            let started = ago(cdr.started_at_ms);
            let alive = ago(cdr.last_alive_ms.or(cdr.started_at_ms));
            // A party reached over TCP had its connection die with the previous run: it cannot
            // be reached (never at an address only its Contact names), so the check closes
            // the session, billed to the last sign of life.
            let leg_target = |leg: &Leg| {
                crate::location::parse_source(&leg.target)
                    .filter(|t| t.transport == proto::sip::message::Transport::Udp)
            };
            let targets = [leg_target(&d.legs[0]), leg_target(&d.legs[1])];
            let deadline = max_deadline(started, d.service.as_ref());
            let mut d = d;
            // The previous run may have used CSeq numbers it did not get to store: leave a
            // margin so the relay's requests never go below what a party has seen.
            d.shift = [
                d.shift[0].saturating_add(100),
                d.shift[1].saturating_add(100),
            ];
            let session = Session {
                targets,
                answered: started,
                started: Some(started),
                bye_from: None,
                last_alive: [alive, alive],
                next_ping: Some(mono_now),
                pinging: [false, false],
                deadline,
                ending: false,
                bye_at: None,
                resume_check: true,
                changing: false,
                end_first: None,
                draining: false,
                d,
                cdr,
            };
            resumed += 1;
            lock(&self.by_call)
                .entry(session.d.call_id.clone())
                .or_default()
                .push(session);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        if resumed > 0 {
            tracing::warn!(
                count = resumed,
                "Checking sessions left open by a previous run"
            );
        }
    }
}
