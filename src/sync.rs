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
