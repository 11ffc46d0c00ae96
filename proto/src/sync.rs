//! Locking that survives a panicked holder.
use std::sync::{Mutex, MutexGuard};

/// Locks `m`; a lock poisoned by a panic elsewhere is taken over (the data under it are
/// plain tables that stay consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
