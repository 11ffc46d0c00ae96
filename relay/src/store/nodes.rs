//! Node leases: which run of a relay holds a node id, and the claim of its open records.
//!
//! A relay holds the lease of its node id while it runs (a heartbeat every few seconds). Taking
//! a lease is a compare-and-swap on the row (insert when there is none, else replace the very
//! run that was read), so of two relays racing for one node id exactly one wins. The winner then
//! moves the open records of that node to its run in one statement; a record belongs to one run
//! at a time, and only that run's writes change it ([`Store::save_cdrs`]).

use super::{CDR_COLUMNS, Cdr, Store, StoreError, cdr_from_row};
use sqlx::Row;

/// A row of `relay_nodes`: the run of a relay that holds a node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLease {
    pub node_id: String,
    /// This run of the relay (a UUID).
    pub instance: String,
    /// Host name and process id of that run.
    pub host: String,
    pub pid: i64,
    /// Its SIP address, for the operator.
    pub sip: String,
    pub started_at_ms: i64,
    pub heartbeat_ms: i64,
}

const OPEN: &str = "('attempt', 'answered', 'established')";

fn lease_from_row(r: &sqlx::any::AnyRow) -> Result<NodeLease, StoreError> {
    Ok(NodeLease {
        node_id: r.try_get("node_id")?,
        instance: r.try_get("instance")?,
        host: r.try_get("host")?,
        pid: r.try_get("pid")?,
        sip: r.try_get("sip")?,
        started_at_ms: r.try_get("started_at_ms")?,
        heartbeat_ms: r.try_get("heartbeat_ms")?,
    })
}

impl Store {
    /// Every lease held or left behind.
    pub async fn node_leases(&self) -> Result<Vec<NodeLease>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, instance, host, pid, sip, started_at_ms, heartbeat_ms \
             FROM relay_nodes ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(lease_from_row).collect()
    }

    /// Records a setting of the relay serving this database (e.g. `domain`).
    pub async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO relay_settings (name, value, updated_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(name)
        .bind(value)
        .bind(super::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A setting of the relay serving this database, if one was recorded.
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM relay_settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    /// The lease of `node`, if a relay ever held it.
    pub async fn node_lease(&self, node: &str) -> Result<Option<NodeLease>, StoreError> {
        let row = sqlx::query(
            "SELECT node_id, instance, host, pid, sip, started_at_ms, heartbeat_ms \
             FROM relay_nodes WHERE node_id = $1",
        )
        .bind(node)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(lease_from_row).transpose()
    }

    /// Takes the lease for `lease.instance`: when `replacing` is `None`, only if no relay holds
    /// the node; else only if the run `replacing` still holds it. False when another relay was
    /// quicker.
    pub async fn take_node(
        &self,
        lease: &NodeLease,
        replacing: Option<&str>,
    ) -> Result<bool, StoreError> {
        let res =
            match replacing {
                None => sqlx::query(
                    "INSERT INTO relay_nodes (node_id, instance, host, pid, sip, started_at_ms, \
                     heartbeat_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (node_id) DO NOTHING",
                )
                .bind(&lease.node_id)
                .bind(&lease.instance)
                .bind(&lease.host)
                .bind(lease.pid)
                .bind(&lease.sip)
                .bind(lease.started_at_ms)
                .bind(lease.heartbeat_ms)
                .execute(&self.pool)
                .await?,
                Some(previous) => {
                    sqlx::query(
                        "UPDATE relay_nodes SET instance = $2, host = $3, pid = $4, sip = $5, \
                     started_at_ms = $6, heartbeat_ms = $7 WHERE node_id = $1 AND instance = $8",
                    )
                    .bind(&lease.node_id)
                    .bind(&lease.instance)
                    .bind(&lease.host)
                    .bind(lease.pid)
                    .bind(&lease.sip)
                    .bind(lease.started_at_ms)
                    .bind(lease.heartbeat_ms)
                    .bind(previous)
                    .execute(&self.pool)
                    .await?
                }
            };
        Ok(res.rows_affected() == 1)
    }

    /// Renews the lease; false when this run no longer holds it.
    pub async fn heartbeat(
        &self,
        node: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE relay_nodes SET heartbeat_ms = $3 WHERE node_id = $1 AND instance = $2",
        )
        .bind(node)
        .bind(instance)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Gives the lease up (a clean stop), if this run still holds it.
    pub async fn release_node(&self, node: &str, instance: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM relay_nodes WHERE node_id = $1 AND instance = $2")
            .bind(node)
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Moves the open records of `node` (and open records of no node, written before nodes
    /// existed) to the run `instance`, in one statement: each record goes to exactly one run.
    /// On SQLite, where one relay serves the database at a time, every open record: the relay
    /// before may have had another node id (another port). Returns how many.
    pub async fn claim_open_cdrs(&self, node: &str, instance: &str) -> Result<u64, StoreError> {
        let whose = if self.postgres {
            "AND (owner = $1 OR owner IS NULL)"
        } else {
            ""
        };
        let res = sqlx::query(&format!(
            "UPDATE cdrs SET owner = $1, instance = $2 WHERE state IN {OPEN} {whose}"
        ))
        .bind(node)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected())
    }

    /// Records of sessions left established that the run `instance` has claimed (to resume or
    /// close).
    pub async fn established_cdrs(&self, instance: &str) -> Result<Vec<Cdr>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CDR_COLUMNS} FROM cdrs WHERE state = 'established' AND instance = $1"
        ))
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(cdr_from_row).collect()
    }

    /// Closes the attempts left unanswered or unacknowledged (`attempt`, `answered`) that the run
    /// `instance` has claimed: failed, ended by the relay with `reason`.
    pub async fn close_open_attempts(
        &self,
        now_ms: i64,
        reason: &str,
        instance: &str,
    ) -> Result<u64, StoreError> {
        let res = sqlx::query(
            "UPDATE cdrs SET ended_at_ms = $1, ended_by = 'relay', reason = $2, state = 'failed' \
             WHERE state IN ('attempt', 'answered') AND instance = $3",
        )
        .bind(now_ms)
        .bind(reason)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected())
    }
}
