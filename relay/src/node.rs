//! node: this relay's lease of its node id among the relays that share a database.
//!
//! A relay's node id names the records it keeps. While it runs it holds the node's lease in
//! the store and renews it every [`HEARTBEAT`]. At start a relay takes the lease:
//! - nobody holds it: taken;
//! - its holder has not renewed it for [`STALE_AFTER`], or ran on this host and its process is
//!   gone (a crash, `kill -9`): taken over, replacing exactly that holder (compare-and-swap);
//! - else the holder may be alive: the relay watches the lease for a while; if it is renewed,
//!   another live relay holds the node id and this one refuses to start, naming it.
//!
//! A relay that finds its lease taken by another (it was paused longer than [`STALE_AFTER`])
//! stops: its writes would be refused anyway ([`crate::store::Store::save_cdrs`]).

use crate::store::{NodeLease, Store};
use anyhow::bail;
use std::time::Duration;

/// How often a running relay renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A lease not renewed for this long belongs to a relay that is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// This host's name, as leases record it.
fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Whether a process with this id runs on this host.
fn process_alive(pid: i64) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        // Another user's process: alive all the same.
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// On SQLite only one relay may serve the database: another one alive (under any node id)
/// stops this one from starting, named.
async fn refuse_a_second_on_sqlite(store: &Store, node: &str) -> anyhow::Result<()> {
    if store.is_postgres() {
        return Ok(());
    }
    let now = proto::clock::now_ms();
    let host = host_name();
    for l in store.node_leases().await? {
        let fresh = now - l.heartbeat_ms < ms(STALE_AFTER);
        let alive = fresh && (l.host != host || process_alive(l.pid));
        if alive && l.node_id != node {
            bail!(
                "another relay serves this SQLite database (SIP {}, host {}, pid {}): SQLite \
                 is for one relay at a time; stop that one, or give several relays one \
                 PostgreSQL database",
                l.sip,
                l.host,
                l.pid
            );
        }
    }
    Ok(())
}

/// Takes the lease of `node` for a new run of this relay (listening on `sip`), or explains who
/// holds it.
pub async fn acquire(store: &Store, node: &str, sip: &str) -> anyhow::Result<NodeLease> {
    refuse_a_second_on_sqlite(store, node).await?;
    let me = NodeLease {
        node_id: node.to_string(),
        instance: uuid::Uuid::new_v4().to_string(),
        host: host_name(),
        pid: i64::from(std::process::id()),
        sip: sip.to_string(),
        started_at_ms: proto::clock::now_ms(),
        heartbeat_ms: proto::clock::now_ms(),
    };
    // The holder last seen and when we first saw it so (to tell a live one from a dead one).
    let mut watched: Option<(NodeLease, std::time::Instant)> = None;
    loop {
        let now = proto::clock::now_ms();
        let mine = NodeLease {
            heartbeat_ms: now,
            ..me.clone()
        };
        let Some(held) = store.node_lease(node).await? else {
            if store.take_node(&mine, None).await? {
                return Ok(mine);
            }
            continue;
        };
        let stale = now - held.heartbeat_ms >= ms(STALE_AFTER);
        let dead_here = held.host == me.host && !process_alive(held.pid);
        let unchanged = watched.as_ref().is_some_and(|(w, since)| {
            w.instance == held.instance
                && w.heartbeat_ms == held.heartbeat_ms
                && since.elapsed() > HEARTBEAT * 2 + Duration::from_secs(1)
        });
        if stale || dead_here || unchanged {
            if store.take_node(&mine, Some(&held.instance)).await? {
                tracing::warn!(
                    node,
                    previous_sip = %held.sip,
                    previous_host = %held.host,
                    "Took over the node id of a relay that is gone"
                );
                return Ok(mine);
            }
            // Another relay was quicker: look again.
            watched = None;
            continue;
        }
        let renewed = watched.as_ref().is_some_and(|(w, _)| {
            w.instance == held.instance && w.heartbeat_ms != held.heartbeat_ms
        });
        if renewed
            || watched
                .as_ref()
                .is_some_and(|(w, _)| w.instance != held.instance)
        {
            bail!(
                "another relay holds node id {node:?} and is alive (SIP {}, host {}, pid {}, \
                 running since {}): give this relay its own node id (node_id in the config \
                 file), or stop the other one",
                held.sip,
                held.host,
                held.pid,
                proto::clock::format_utc_ms(held.started_at_ms)
            );
        }
        if watched.is_none() {
            tracing::warn!(
                node,
                holder_sip = %held.sip,
                holder_host = %held.host,
                "Node id held by a relay that renewed it lately: waiting to see whether it is alive"
            );
            watched = Some((held, std::time::Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
