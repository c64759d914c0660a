//! Per-namespace shares of the capacity every tenant uses: the reconcile workers that wait for a
//! provider (token, discovery and revocation requests, up to 30 s each) and the mailbox checks that
//! run at once (up to 10 s each). One namespace whose servers are slow holds at most its share;
//! the rest stays for the others.
//!
//! - [`NamespaceShare::try_take`] never waits: a reconcile worker that waited for its namespace's
//!   share would hold the worker all the same. A provider call over the share is deferred (the
//!   reconcile comes back in a few seconds, the status as it is); it is not dropped.
//! - [`NamespaceQueue`] is for work that runs in the background and may wait (the mailbox check):
//!   a namespace's checks queue for its share first, then for the shared permits, so that one
//!   namespace's queue is never in front of another's beyond its share.
//!
//! Both keep an entry only while a namespace holds or waits for something: the maps are bounded
//! by the work in flight, not by the namespaces ever seen.

use crate::sync::LockExt as _;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

/// The default of `--max-namespace-share`: the percentage of a shared pool one namespace may hold.
pub const DEFAULT_MAX_NAMESPACE_SHARE: u8 = 50;

/// How many of `pool` one namespace may hold at `percent`: at least one.
pub fn share_of(pool: usize, percent: u8) -> usize {
    pool.saturating_mul(usize::from(percent.min(100)))
        .checked_div(100)
        .unwrap_or(0)
        .max(1)
}

/// How long a provider call over its namespace's share is deferred: 1 to 3 s, spread so that the
/// deferred reconciles of a namespace do not come back together.
pub fn deferral() -> Duration {
    Duration::from_millis(rand::random_range(1000..3000))
}

/// Counts what each namespace holds of a pool, up to `limit` each; see the module doc.
#[derive(Debug)]
pub struct NamespaceShare {
    limit: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// One unit of a namespace's share, given back when dropped.
#[derive(Debug)]
pub struct SharePermit {
    share: Arc<NamespaceShare>,
    namespace: String,
}

impl NamespaceShare {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            held: Mutex::default(),
        })
    }

    /// The most one namespace may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A unit of `namespace`'s share, or `None` when it holds its whole share now.
    pub fn try_take(self: &Arc<Self>, namespace: &str) -> Option<SharePermit> {
        let mut held = self.held.locked();
        let n = held.entry(namespace.to_owned()).or_default();
        if *n >= self.limit {
            return None;
        }
        *n = n.saturating_add(1);
        Some(SharePermit {
            share: self.clone(),
            namespace: namespace.to_owned(),
        })
    }

    /// What `namespace` holds now (for tests and diagnostics).
    pub fn held(&self, namespace: &str) -> usize {
        self.held.locked().get(namespace).copied().unwrap_or(0)
    }

    /// Namespaces that hold something now.
    pub fn namespaces(&self) -> usize {
        self.held.locked().len()
    }
}

impl Drop for SharePermit {
    fn drop(&mut self) {
        let mut held = self.share.held.locked();
        if let Some(n) = held.get_mut(&self.namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.namespace);
            }
        }
    }
}

/// Shared permits (`total`), of which one namespace holds at most `per_namespace`; waiting is
/// allowed (background work). See the module doc.
#[derive(Debug)]
pub struct NamespaceQueue {
    shared: Arc<tokio::sync::Semaphore>,
    per_namespace: usize,
    namespaces: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// A permit of the shared pool and of its namespace's share.
#[derive(Debug)]
pub struct QueuePermit {
    _shared: tokio::sync::OwnedSemaphorePermit,
    namespace: Option<tokio::sync::OwnedSemaphorePermit>,
    queue: Arc<NamespaceQueue>,
    name: String,
}

impl NamespaceQueue {
    pub fn new(total: usize, per_namespace: usize) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Self {
            shared: Arc::new(tokio::sync::Semaphore::new(total)),
            per_namespace: per_namespace.clamp(1, total),
            namespaces: Mutex::default(),
        })
    }

    /// The most one namespace holds at once.
    pub fn per_namespace(&self) -> usize {
        self.per_namespace
    }

    /// Wait for a unit of `namespace`'s share, then for a shared permit. `None` only if the
    /// semaphores were closed (they never are).
    pub async fn acquire(self: &Arc<Self>, namespace: &str) -> Option<QueuePermit> {
        let own = self
            .namespaces
            .locked()
            .entry(namespace.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_namespace)))
            .clone();
        let ns_permit = own.acquire_owned().await.ok()?;
        let shared = self.shared.clone().acquire_owned().await.ok()?;
        Some(QueuePermit {
            _shared: shared,
            namespace: Some(ns_permit),
            queue: self.clone(),
            name: namespace.to_owned(),
        })
    }

    /// Namespaces with checks running or waiting (for tests and diagnostics).
    pub fn namespaces(&self) -> usize {
        self.namespaces.locked().len()
    }
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        drop(self.namespace.take());
        // The namespace's semaphore goes once nobody holds or waits for it (the map's own Arc is
        // the only one left).
        let mut map = self.queue.namespaces.locked();
        if map
            .get(&self.name)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_a_percentage_of_the_pool_and_at_least_one() {
        assert_eq!(share_of(32, 50), 16);
        assert_eq!(share_of(8, 50), 4);
        assert_eq!(share_of(2, 50), 1);
        assert_eq!(share_of(1, 50), 1);
        assert_eq!(share_of(32, 100), 32);
        assert_eq!(share_of(32, 255), 32);
        assert_eq!(share_of(usize::MAX, 100), usize::MAX / 100);
    }

    #[test]
    fn a_namespace_holds_at_most_its_share_and_others_are_not_counted_against_it() {
        let share = NamespaceShare::new(2);
        let a1 = share.try_take("a").unwrap();
        let _a2 = share.try_take("a").unwrap();
        assert!(share.try_take("a").is_none(), "a's share is full");
        let _b = share.try_take("b").expect("b has its own share");
        drop(a1);
        let _a3 = share.try_take("a").expect("a unit was given back");
        assert_eq!(share.held("a"), 2);
    }

    #[test]
    fn a_namespace_that_holds_nothing_leaves_no_entry() {
        let share = NamespaceShare::new(1);
        let permits: Vec<_> = (0..100)
            .map(|i| share.try_take(&format!("ns-{i}")).unwrap())
            .collect();
        assert_eq!(share.namespaces(), 100);
        drop(permits);
        assert_eq!(share.namespaces(), 0);
    }

    #[tokio::test]
    async fn a_queue_gives_one_namespace_its_share_and_the_rest_to_the_others() {
        let queue = NamespaceQueue::new(4, 2);
        let a1 = queue.acquire("a").await.unwrap();
        let _a2 = queue.acquire("a").await.unwrap();
        // a's third waits for its own share, not in front of b.
        let waiting = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.acquire("a").await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        let b = tokio::time::timeout(Duration::from_secs(1), queue.acquire("b"))
            .await
            .expect("b gets a shared permit while a waits for its share");
        assert!(b.is_some());
        assert!(!waiting.is_finished());
        drop(a1);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a's third runs once a's first is done")
            .unwrap();
        drop(b);
        drop(_a2);
        assert_eq!(queue.namespaces(), 0, "no entry is left once nothing runs");
    }
}
