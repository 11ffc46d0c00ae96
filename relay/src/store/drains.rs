//! `relay drain` orders and the reports each relay leaves when it carried one out.

use super::{Store, StoreError, now_ms};
use sqlx::Row;

/// An order to move the matching sessions to the additional server `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOrder {
    pub id: i64,
    pub target: String,
    pub service: Option<String>,
    pub appserver: Option<String>,
    pub created_at_ms: i64,
}

/// What one relay did with an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    pub node: String,
    /// Sessions and registered clients that moved.
    pub moved: i64,
    /// Registered clients that refused to move: their next call is redirected.
    pub redirected: i64,
    pub failed: i64,
    /// One line per failure.
    pub problems: String,
}

/// Orders older than this are no longer carried out (a relay started later ignores them).
const ORDER_LIFETIME_MS: i64 = 10 * 60 * 1000;

impl Store {
    /// Records an order; its id.
    pub async fn add_drain(
        &self,
        target: &str,
        service: Option<&str>,
        appserver: Option<&str>,
    ) -> Result<i64, StoreError> {
        self.insert_next_id("drains", |id| async move {
            sqlx::query(
                "INSERT INTO drains (id, target, service, appserver, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(target)
            .bind(service)
            .bind(appserver)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Recent orders `node` has not reported on yet.
    pub async fn pending_drains(&self, node: &str) -> Result<Vec<DrainOrder>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, target, service, appserver, created_at_ms FROM drains d \
             WHERE created_at_ms >= $1 AND NOT EXISTS \
             (SELECT 1 FROM drain_reports r WHERE r.drain_id = d.id AND r.node = $2) \
             ORDER BY id",
        )
        .bind(now_ms() - ORDER_LIFETIME_MS)
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DrainOrder {
                    id: r.try_get("id")?,
                    target: r.try_get("target")?,
                    service: r.try_get("service")?,
                    appserver: r.try_get("appserver")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                })
            })
            .collect()
    }

    /// `node`'s report on order `id` (once).
    pub async fn report_drain(&self, id: i64, report: &DrainReport) -> Result<(), StoreError> {
        let res = sqlx::query(
            "INSERT INTO drain_reports (drain_id, node, moved, redirected, failed, problems, \
             reported_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(&report.node)
        .bind(report.moved)
        .bind(report.redirected)
        .bind(report.failed)
        .bind(&report.problems)
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if super::is_unique_violation(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The reports on order `id` so far.
    pub async fn drain_reports(&self, id: i64) -> Result<Vec<DrainReport>, StoreError> {
        let rows = sqlx::query(
            "SELECT node, moved, redirected, failed, problems FROM drain_reports \
             WHERE drain_id = $1 \
             ORDER BY node",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DrainReport {
                    node: r.try_get("node")?,
                    moved: r.try_get("moved")?,
                    redirected: r.try_get("redirected")?,
                    failed: r.try_get("failed")?,
                    problems: r.try_get("problems")?,
                })
            })
            .collect()
    }
}

/// A stored watch (auto-redial): its dialog is JSON the relay's `watch` module reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRow {
    pub id: String,
    pub caller: String,
    pub target: String,
    pub deadline_ms: i64,
    pub dialog: String,
}

impl Store {
    /// Keeps a watch of `node`'s.
    pub async fn add_watch(&self, node: &str, w: &WatchRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO watches (id, node, caller, target, deadline_ms, dialog, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&w.id)
        .bind(node)
        .bind(&w.caller)
        .bind(&w.target)
        .bind(w.deadline_ms)
        .bind(&w.dialog)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets a watch (it fired, ended or expired).
    pub async fn remove_watch(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM watches WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The watches `node` keeps (after a restart).
    pub async fn node_watches(&self, node: &str) -> Result<Vec<WatchRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, caller, target, deadline_ms, dialog FROM watches WHERE node = $1",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WatchRow {
                    id: r.try_get("id")?,
                    caller: r.try_get("caller")?,
                    target: r.try_get("target")?,
                    deadline_ms: r.try_get("deadline_ms")?,
                    dialog: r.try_get("dialog")?,
                })
            })
            .collect()
    }
}
