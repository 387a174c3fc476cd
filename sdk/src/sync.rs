//! Locking shared by the SDK's modules.

use std::sync::Mutex;

/// Locks `m`, taking the data over from a thread that panicked while holding it: the SDK's
/// shared maps hold no invariant a panic could break halfway, and a context must keep working.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
