//! The join slots: how many reconciles may wait for the check their first refresh made due, and
//! how long a refresh that finds them all taken waits for one (see the parent module's doc).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a refresh that finds every join slot taken waits for one while none is released: the
/// slots are then held by mail servers that do not answer, and this refresh goes on without
/// (one tenant's slow mail servers cost another's first refresh at most this). While slots are
/// released (mail servers that answer, a burst of first refreshes queueing for the slots), it
/// keeps waiting, up to [`JOIN_SLOT_WAIT_MAX`] in all. At a burst of 10,000 Google first
/// refreshes, giving up after 250 ms whatever the queue did left 0.36-0.98 % of the checks to a
/// status write of their own, most of them at the burst's start, when the first checks of 32
/// slots all took longer than 250 ms (benches/README.md).
pub const JOIN_SLOT_WAIT: Duration = Duration::from_millis(500);

/// The longest a refresh waits for a join slot in all, however the queue moves.
pub const JOIN_SLOT_WAIT_MAX: Duration = Duration::from_secs(1);

/// The join slots and how many have been given back so far (the queue's progress).
pub(super) struct JoinSlots {
    slots: Arc<Semaphore>,
    released: Arc<AtomicU64>,
}

/// A join slot, held while its reconcile waits for the check; counted as released when dropped.
pub(super) struct JoinSlot {
    _permit: OwnedSemaphorePermit,
    released: Arc<AtomicU64>,
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        // Before the permit itself goes back (fields drop after this): a waiter that sees no
        // change has not been passed a slot since it looked.
        self.released.fetch_add(1, Ordering::Relaxed);
    }
}

impl JoinSlots {
    pub(super) fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            released: Arc::default(),
        }
    }

    /// A slot at once when one is free; otherwise the first one freed, waited for while slots are
    /// released at least every `quiet` and at most `max` in all (the tokio semaphore serves its
    /// waiters in order, so a queue that moves reaches each of them). `None`: given up.
    pub(super) async fn take(&self, quiet: Duration, max: Duration) -> Option<JoinSlot> {
        let slot = |permit| JoinSlot {
            _permit: permit,
            released: self.released.clone(),
        };
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(slot(permit));
        }
        let give_up = tokio::time::Instant::now().checked_add(max)?;
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let mut seen = self.released.load(Ordering::Relaxed);
        loop {
            let until = tokio::time::Instant::now()
                .checked_add(quiet)
                .map_or(give_up, |t| t.min(give_up));
            match tokio::time::timeout_at(until, &mut acquire).await {
                Ok(permit) => return permit.ok().map(slot),
                Err(_) => {
                    let now_seen = self.released.load(Ordering::Relaxed);
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
        let slots = Arc::new(JoinSlots::new(1));
        let start = tokio::time::Instant::now();
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let slots = slots.clone();
                tokio::spawn(async move {
                    let slot = slots.take(quiet, max).await;
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
        let held = slots.take(quiet, max).await.expect("a free slot");
        let start = tokio::time::Instant::now();
        assert!(slots.take(quiet, max).await.is_none());
        assert_eq!(start.elapsed(), quiet);
        drop(held);
        // Two slots: one held for good, the other passed around every 200 ms by a queue of
        // takers longer than `max` lasts: a waiter at its end gives up at `max`.
        let slots = Arc::new(JoinSlots::new(2));
        let _kept = slots.take(quiet, max).await.expect("a free slot");
        for _ in 0..10 {
            let slots = slots.clone();
            tokio::spawn(async move {
                let slot = slots.take(quiet, Duration::from_secs(60)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(slot);
            });
        }
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        assert!(slots.take(quiet, max).await.is_none());
        assert_eq!(start.elapsed(), max);
    }
}
