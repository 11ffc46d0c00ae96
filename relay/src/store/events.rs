//! Events between the relays of one PostgreSQL database, carried by PostgreSQL's NOTIFY as they
//! happen (nothing polls): a REGISTER at one relay wakes the watches (auto-redial) another relay
//! keeps, and a transfer completed at one relay ends the first session where it is carried.
//! With SQLite one relay serves the database and there is nothing to carry.

use super::{Store, StoreError};
use tokio::sync::mpsc;

/// The NOTIFY channel of every event.
const CHANNEL: &str = "siprelay_events";

/// What one relay tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// This address of record registered (a binding was added or refreshed).
    Registered(String),
    /// The relay carrying this session (the record's id) should end it, with this reason
    /// (`transferred`).
    End { session: String, reason: String },
}

impl ClusterEvent {
    /// The NOTIFY payload: `registered AOR` or `end SESSION REASON`.
    fn payload(&self) -> String {
        match self {
            ClusterEvent::Registered(aor) => format!("registered {aor}"),
            ClusterEvent::End { session, reason } => format!("end {session} {reason}"),
        }
    }

    fn parse(payload: &str) -> Option<ClusterEvent> {
        let mut words = payload.split(' ');
        match (words.next()?, words.next()?, words.next(), words.next()) {
            ("registered", aor, None, None) => Some(ClusterEvent::Registered(aor.to_owned())),
            ("end", session, Some(reason), None) => Some(ClusterEvent::End {
                session: session.to_owned(),
                reason: reason.to_owned(),
            }),
            _ => None,
        }
    }
}

impl Store {
    /// Tells the other relays of this database (PostgreSQL; a no-op on SQLite).
    pub async fn announce(&self, event: &ClusterEvent) -> Result<(), StoreError> {
        if self.postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(event.payload())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The events every relay of this database announces (this one's included), as they come:
    /// `None` on SQLite. The listening connection is opened again after a loss (what was
    /// announced meanwhile is missed). The task ends with the receiver.
    pub async fn cluster_events(&self) -> Result<Option<mpsc::Receiver<ClusterEvent>>, StoreError> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url.expose()).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = listener.recv() => match got {
                        Ok(n) => {
                            let Some(event) = ClusterEvent::parse(n.payload()) else {
                                continue;
                            };
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Listening for the other relays failed; trying again");
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Some(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterEvent;

    #[test]
    fn payloads_round_trip_and_strangers_are_ignored() {
        for e in [
            ClusterEvent::Registered("bob".into()),
            ClusterEvent::End {
                session: "5be20119-69f5-4d09-a767-94003d2a44ef".into(),
                reason: "transferred".into(),
            },
        ] {
            assert_eq!(ClusterEvent::parse(&e.payload()), Some(e));
        }
        assert_eq!(ClusterEvent::parse("registered"), None);
        assert_eq!(ClusterEvent::parse("end sid"), None);
        assert_eq!(ClusterEvent::parse("registered a b"), None);
        assert_eq!(ClusterEvent::parse("hello world"), None);
    }
}
