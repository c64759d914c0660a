//! The join slots: how many reconciles may wait for the check their first refresh made due, and
//! how long a refresh that finds them all taken waits for one (see the parent module's doc).

use super::super::share::{NamespaceShare, SharePermit};
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// How long a refresh that finds every join slot taken waits for one after the last was released
/// (or after it began waiting): none released for this long, the slots are held by mail servers
/// that do not answer, and this refresh goes on without. While slots are released (mail servers
/// that answer, a burst of first refreshes queueing for the slots), it keeps waiting, up to
/// [`JOIN_SLOT_WAIT_MAX`] in all: one tenant's slow mail servers cost another tenant's first
/// refresh at most that. Before, a refresh waited 250 ms whatever the queue did, and one in a
/// namespace that held its whole share (at a share of 100 %: every slot) did not wait at all: at a
/// burst of 10,000 Google first refreshes in one namespace, 0.36-0.99 % of the checks then
/// reported in a status write of their own (benches/README.md).
pub const JOIN_SLOT_WAIT: Duration = Duration::from_millis(250);

/// The longest a refresh waits for a join slot in all, however the queue moves.
pub const JOIN_SLOT_WAIT_MAX: Duration = Duration::from_secs(1);

/// The join slots, each namespace's share of them, and when a slot was last given back.
pub(super) struct JoinSlots {
    slots: Arc<Semaphore>,
    size: usize,
    share: Arc<NamespaceShare>,
    released: Arc<Released>,
}

/// When a join slot was last given back, as time since `base`.
struct Released {
    base: Instant,
    last: AtomicU64,
}

impl Released {
    fn record(&self) {
        let since = Instant::now().saturating_duration_since(self.base);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        let since = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        self.base.checked_add(since).unwrap_or(self.base)
    }
}

/// A join slot and a unit of its namespace's share, held while its reconcile waits for the
/// check; its release is noted when dropped.
pub(super) struct JoinSlot {
    share: Option<SharePermit>,
    permit: Option<OwnedSemaphorePermit>,
    released: Arc<Released>,
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        // The share before the slot: a namespace never holds more share units than slots, so
        // that whoever gets this slot finds its namespace's share free when that is all slots.
        drop(self.share.take());
        drop(self.permit.take());
        self.released.record();
    }
}

impl JoinSlots {
    /// `slots` join slots, of which one namespace holds at most `share`.
    pub(super) fn new(slots: usize, share: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            size: slots,
            share: NamespaceShare::new(share),
            released: Arc::new(Released {
                base: Instant::now(),
                last: AtomicU64::new(0),
            }),
        }
    }

    /// A slot for `namespace`: at once when one is free, else the first one freed while slots
    /// are released (waited for until none was for `quiet`, and `max` in all: the semaphore
    /// serves its waiters in order, so a queue that moves reaches each of them). A namespace
    /// that holds its whole share does not wait, unless its share is every slot (then holding it
    /// is every slot taken, and it waits as above). `None`: given up.
    pub(super) async fn take(
        &self,
        namespace: &str,
        quiet: Duration,
        max: Duration,
    ) -> Option<JoinSlot> {
        if self.share.limit() < self.size && self.share.held(namespace) >= self.share.limit() {
            return None;
        }
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => self.wait(quiet, max).await?,
        };
        // Taken after the slot and given back before it: with a share of every slot this
        // cannot fail; with a smaller one the namespace may have reached it meanwhile.
        let share = self.share.try_take(namespace)?;
        Some(JoinSlot {
            share: Some(share),
            permit: Some(permit),
            released: self.released.clone(),
        })
    }

    /// What `namespace` holds now.
    #[cfg(test)]
    pub(super) fn held(&self, namespace: &str) -> usize {
        self.share.held(namespace)
    }

    async fn wait(&self, quiet: Duration, max: Duration) -> Option<OwnedSemaphorePermit> {
        let began = Instant::now();
        let give_up = began.checked_add(max)?;
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            // `quiet` after the last release (or after this wait began, if later): a release
            // while it waited moves this on; none, and it is over.
            let until = self
                .released
                .last()
                .max(began)
                .checked_add(quiet)
                .map_or(give_up, |t| t.min(give_up));
            if Instant::now() >= until {
                return None;
            }
            if let Ok(permit) = tokio::time::timeout_at(until, &mut acquire).await {
                return permit.ok();
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
        let start = Instant::now();
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
        let start = Instant::now();
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
        let start = Instant::now();
        assert!(slots.take("z", quiet, max).await.is_none());
        assert_eq!(start.elapsed(), max);
    }

    /// A namespace whose share is every slot waits, when it holds them all, as one that finds
    /// every slot taken: it gets the next one released. One whose share is smaller does not
    /// wait once it holds its share, while another namespace gets a slot at once.
    #[tokio::test(start_paused = true)]
    async fn a_namespace_at_its_share_waits_only_when_its_share_is_every_slot() {
        let quiet = Duration::from_millis(250);
        let max = Duration::from_secs(1);
        let slots = Arc::new(JoinSlots::new(2, 2));
        let first = slots.take("a", quiet, max).await.expect("a free slot");
        let _second = slots.take("a", quiet, max).await.expect("a free slot");
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(first);
        });
        let start = Instant::now();
        assert!(slots.take("a", quiet, max).await.is_some());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        release.await.unwrap();
        // Four slots, two for one namespace: its third does not wait; another's gets one.
        let slots = Arc::new(JoinSlots::new(4, 2));
        let _a = [
            slots.take("a", quiet, max).await.expect("a free slot"),
            slots.take("a", quiet, max).await.expect("a free slot"),
        ];
        let start = Instant::now();
        assert!(slots.take("a", quiet, max).await.is_none());
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(slots.take("b", quiet, max).await.is_some());
        assert_eq!(slots.held("a"), 2);
    }
}
