//! A mutex guard that survives a panic elsewhere: the maps behind these locks hold caches and
//! counters that stay consistent at every await point, so a poisoned lock is taken over instead of
//! turning one panic into a panic of every later reconcile.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// `lock()` that never panics.
pub trait LockExt<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One writer of a grant at a time within this process: the refresher and the sign-in server take
/// the same lock per integration UID before they read and write its grant Secret. (Across
/// processes, the grant Secret's resourceVersion and the write-ahead mark of
/// [`crate::reconcile::inflight`] do the same.)
#[derive(Debug, Default)]
pub struct GrantLocks(
    Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
);

impl GrantLocks {
    /// The lock of the integration `uid`.
    pub fn get(&self, uid: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.0.locked().entry(uid.to_owned()).or_default().clone()
    }

    /// Drop the lock of a deleted integration (a holder keeps its own `Arc` until done).
    pub fn remove(&self, uid: &str) {
        self.0.locked().remove(uid);
    }
}
