//! Events between the relays of one PostgreSQL database: a REGISTER at one relay wakes the
//! watches (auto-redial) another relay keeps. PostgreSQL's NOTIFY carries them as they happen,
//! so nothing polls; with SQLite one relay serves the database and there is nothing to carry.

use super::{Store, StoreError};
use tokio::sync::mpsc;

/// The NOTIFY channel; its payload is the address of record that registered.
const REGISTERED_CHANNEL: &str = "siprelay_registered";

impl Store {
    /// Tells the other relays of this database that `aor` registered (PostgreSQL; a no-op on
    /// SQLite).
    pub async fn announce_registered(&self, aor: &str) -> Result<(), StoreError> {
        if self.postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(REGISTERED_CHANNEL)
                .bind(aor)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The addresses of record that register at any relay of this database (this one
    /// included), as they do: `None` on SQLite. The listening connection is opened again
    /// after a loss (what was announced meanwhile is missed; the watches' own relay still sees
    /// its own registrations). The channel closes when the receiver is dropped.
    pub async fn registered_anywhere(&self) -> Result<Option<mpsc::Receiver<String>>, StoreError> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url.expose()).await?;
        listener.listen(REGISTERED_CHANNEL).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(n) => {
                        if tx.send(n.payload().to_owned()).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if tx.is_closed() {
                            return;
                        }
                        tracing::warn!(error = %e, "Listening for other relays' registrations failed; trying again");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Some(rx))
    }
}
