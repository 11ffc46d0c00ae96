//! What the other relays of a PostgreSQL database announce (`store::events`), acted on here: a
//! registration there drops this relay's cached bindings of that address and fires its watches;
//! a transfer completed there ends the first session if this relay carries it. With SQLite
//! there is no other relay and this task ends at once.

use crate::core::Core;
use crate::session::EndReason;
use crate::store::ClusterEvent;
use std::sync::Arc;

/// The task: runs until the relay stops.
pub async fn run(core: Arc<Core>) {
    let mut events = match core.store.cluster_events().await {
        Ok(Some(rx)) => rx,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen to the other relays of the database: a watch fires only when its target registers here, and a transfer ends the first session only where it is carried");
            return;
        }
    };
    while let Some(event) = events.recv().await {
        match event {
            ClusterEvent::Registered(aor) => {
                // What this relay read of that address before is stale now.
                core.location.invalidate(&aor);
                core.watches.registered(&aor);
            }
            ClusterEvent::End { session, reason } => {
                if reason != EndReason::Transferred.as_str() {
                    continue;
                }
                if let Some(key) = core.sessions.key_of(&session) {
                    let core = core.clone();
                    tokio::spawn(async move {
                        crate::session::supervise::end(&core, &key, EndReason::Transferred).await;
                    });
                }
            }
        }
    }
}
