//! The join slots: how many reconciles may wait for the check their first refresh made due, and
//! how long a refresh that finds them all taken waits for one (see the parent module's doc).

use super::super::share::{NamespaceShare, SharePermit};
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a refresh that finds every join slot taken (or its namespace holding its whole share
/// of them) waits for one while none is released: the slots are then held by mail servers that
/// do not answer, and this refresh goes on without (one tenant's slow mail servers cost another's
/// first refresh at most this). While slots are released (mail servers that answer, a burst of
/// first refreshes queueing for the slots), it keeps waiting, up to [`JOIN_SLOT_WAIT_MAX`] in all.
/// Before, a refresh whose namespace held its whole share did not wait at all and one that found
/// every slot taken waited 250 ms whatever the queue did: at a burst of 10,000 Google first
/// refreshes in one namespace, 0.36-0.99 % of the checks then reported in a status write of their
/// own (benches/README.md).
pub const JOIN_SLOT_WAIT: Duration = Duration::from_millis(250);

/// The longest a refresh waits for a join slot in all, however the queue moves.
pub const JOIN_SLOT_WAIT_MAX: Duration = Duration::from_secs(1);

/// The join slots, each namespace's share of them, and how many have been given back so far
/// (the queue's progress).
pub(super) struct JoinSlots {
    slots: Arc<Semaphore>,
    share: Arc<NamespaceShare>,
    released: Arc<Released>,
}

#[derive(Default)]
struct Released {
    count: AtomicU64,
    notify: Notify,
}

/// A join slot and a unit of its namespace's share, held while its reconcile waits for the
/// check; counted as released when dropped.
pub(super) struct JoinSlot {
    permit: Option<OwnedSemaphorePermit>,
    share: Option<SharePermit>,
    released: Arc<Released>,
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        // Given back first, then counted and told: a waiter that wakes finds them free.
        drop(self.permit.take());
        drop(self.share.take());
        self.released.count.fetch_add(1, Ordering::Relaxed);
        self.released.notify.notify_waiters();
    }
}

impl JoinSlots {
    /// `slots` join slots, of which one namespace holds at most `share`.
    pub(super) fn new(slots: usize, share: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            share: NamespaceShare::new(share),
            released: Arc::default(),
        }
    }

    /// What `namespace` holds now.
    #[cfg(test)]
    pub(super) fn held(&self, namespace: &str) -> usize {
        self.share.held(namespace)
    }

    /// A slot for `namespace` at once when one is free and the namespace holds less than its
    /// share; otherwise waited for while slots are released at least every `quiet`, and at most
    /// `max` in all (the semaphore serves its waiters in order, so a queue that moves reaches each
    /// of them; a namespace at its share tries again at each release). `None`: given up.
    pub(super) async fn take(
        &self,
        namespace: &str,
        quiet: Duration,
        max: Duration,
    ) -> Option<JoinSlot> {
        let give_up = tokio::time::Instant::now().checked_add(max)?;
        let until = || {
            tokio::time::Instant::now()
                .checked_add(quiet)
                .map_or(give_up, |t| t.min(give_up))
        };
        let mut seen = self.released.count.load(Ordering::Relaxed);
        // The namespace's share first: held by its own slots, freed as they are released.
        let share = loop {
            let notified = self.released.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(share) = self.share.try_take(namespace) {
                break share;
            }
            if tokio::time::timeout_at(until(), notified).await.is_err()
                || tokio::time::Instant::now() >= give_up
            {
                return None;
            }
            seen = self.released.count.load(Ordering::Relaxed);
        };
        let slot = |permit| JoinSlot {
            permit: Some(permit),
            share: Some(share),
            released: self.released.clone(),
        };
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(slot(permit));
        }
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            match tokio::time::timeout_at(until(), &mut acquire).await {
                Ok(permit) => return permit.ok().map(slot),
                Err(_) => {
                    let now_seen = self.released.count.load(Ordering::Relaxed);
                    if now_seen == seen || tokio::time::Instant::now() >= give_up {
                        return None;
                    }
                    seen = now_seen;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots released more often than `quiet` keep a waiter waiting past `quiet` (and it gets
    /// one); slots that nobody releases make it give up after `quiet`; a queue that moves but not
    /// far enough makes it give up at `max`.
    #[tokio::test(start_paused = true)]
    async fn a_refresh_waits_for_a_join_slot_while_the_queue_moves_and_not_longer() {
        let quiet = Duration::from_millis(250);
        let max = Duration::from_secs(1);
        // One slot held 150 ms at a time by each of four takers in turn: the last waits 450 ms.
        let slots = Arc::new(JoinSlots::new(1, 1));
        let start = tokio::time::Instant::now();
        let takers: Vec<_> = (0..4)
            .map(|i| {
                let slots = slots.clone();
                tokio::spawn(async move {
                    let slot = slots.take(&format!("ns{i}"), quiet, max).await;
                    let got = slot.is_some();
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    drop(slot);
                    got
                })
            })
            .collect();
        for t in takers {
            assert!(t.await.unwrap(), "a moving queue reaches every waiter");
        }
        assert!(start.elapsed() >= Duration::from_millis(600));
        // Held and never released: given up after `quiet`.
        let held = slots.take("a", quiet, max).await.expect("a free slot");
        let start = tokio::time::Instant::now();
        assert!(slots.take("b", quiet, max).await.is_none());
        assert_eq!(start.elapsed(), quiet);
        drop(held);
        // Two slots: one held for good, the other passed around every 200 ms by a queue of
        // takers longer than `max` lasts: a waiter at its end gives up at `max`.
        let slots = Arc::new(JoinSlots::new(2, 2));
        let _kept = slots.take("a", quiet, max).await.expect("a free slot");
        for i in 0..10 {
            let slots = slots.clone();
            tokio::spawn(async move {
                let slot = slots
                    .take(&format!("q{i}"), quiet, Duration::from_secs(60))
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(slot);
            });
        }
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        assert!(slots.take("z", quiet, max).await.is_none());
        assert_eq!(start.elapsed(), max);
    }

    /// A namespace that holds its whole share waits as one that finds every slot taken: it gets
    /// a unit back when one of its own slots is released, and gives up after `quiet` without.
    #[tokio::test(start_paused = true)]
    async fn a_namespace_at_its_share_waits_for_its_own_slots_to_be_released() {
        let quiet = Duration::from_millis(250);
        let max = Duration::from_secs(1);
        // Four slots, two for one namespace.
        let slots = Arc::new(JoinSlots::new(4, 2));
        let first = slots.take("a", quiet, max).await.expect("a free slot");
        let _second = slots.take("a", quiet, max).await.expect("a free slot");
        assert_eq!(slots.held("a"), 2);
        // Released 100 ms later: the third of "a" gets it then.
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(first);
        });
        let start = tokio::time::Instant::now();
        let third = slots.take("a", quiet, max).await;
        assert!(third.is_some(), "its own slot was released within the wait");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        release.await.unwrap();
        // Nothing of "a" released: the fourth gives up after `quiet`, while "b" gets one at once.
        let start = tokio::time::Instant::now();
        assert!(slots.take("a", quiet, max).await.is_none());
        assert_eq!(start.elapsed(), quiet);
        assert!(slots.take("b", quiet, max).await.is_some());
    }
}
