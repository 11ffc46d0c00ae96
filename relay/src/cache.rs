//! A small time-bounded cache for what the request path reads on every call (accounts and
//! bindings), so the hot path does not wait on the database. An entry lives at most `ttl`, so
//! a change made elsewhere (an admin command, another relay on the same PostgreSQL) takes
//! effect within that time without a restart; changes this relay makes itself invalidate the
//! entry at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> TtlCache<K, V> {
        TtlCache {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cached value, if younger than the TTL.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| now.duration_since(*at) < self.ttl)
            .map(|(_, v)| v.clone())
    }

    pub fn put(&self, key: K, value: V, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (now, value));
    }

    pub fn invalidate(&self, key: &K) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::TtlCache;
    use std::time::{Duration, Instant};

    #[test]
    fn entries_expire_and_can_be_invalidated() {
        let c = TtlCache::new(Duration::from_secs(1), 10);
        let t0 = Instant::now();
        c.put("a", 1, t0);
        assert_eq!(c.get(&"a", t0 + Duration::from_millis(999)), Some(1));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(1)), None);
        c.put("b", 2, t0);
        c.invalidate(&"b");
        assert_eq!(c.get(&"b", t0), None);
    }

    #[test]
    fn capacity_is_bounded() {
        let c = TtlCache::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        for i in 0..10 {
            c.put(i, i, t0);
        }
        let n = (0..10).filter(|i| c.get(i, t0).is_some()).count();
        assert!(n <= 3, "{n} entries kept");
        assert_eq!(c.get(&9, t0), Some(9));
    }
}
