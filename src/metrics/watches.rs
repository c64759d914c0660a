//! Whether the watches work: each watch's failures (an API server out of reach, RBAC taken away, a
//! watch the server keeps refusing) are recorded here, shown by the gauge
//! `mailintegration_watch_failing_seconds{namespace, watch}`, and fail `/readyz` once one has been
//! failing longer than `--watch-failure-limit` (docs/operations.md, "What happens on each
//! failure"). Without this, a watch that cannot reconnect leaves the caches stale while the
//! process looks healthy.

use crate::sync::LockExt as _;
use prometheus_client::{encoding::EncodeLabelSet, metrics::family::Family, metrics::gauge::Gauge};
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// The watched namespace ("" for all).
    pub namespace: String,
    /// `integrations`, `owned_secrets` or `marked_secrets`.
    pub watch: String,
}

/// The failing watches and since when.
#[derive(Default)]
pub struct WatchHealth {
    failing: Mutex<HashMap<WatchLabels, Instant>>,
    /// Seconds each watch has been failing, as of its last attempt (0 while it works).
    pub gauge: Family<WatchLabels, Gauge>,
}

impl WatchHealth {
    /// One result of `watch`: `ok` (an event, a list) ends its failure; an error starts one, or
    /// lengthens it.
    pub fn observe(&self, watch: &WatchLabels, ok: bool, now: Instant) {
        let mut failing = self.failing.locked();
        let seconds = if ok {
            failing.remove(watch);
            0
        } else {
            let since = *failing.entry(watch.clone()).or_insert(now);
            i64::try_from(now.saturating_duration_since(since).as_secs()).unwrap_or(i64::MAX)
        };
        self.gauge.get_or_create(watch).set(seconds);
    }

    /// The watch that has been failing longest, if for longer than `limit`: its labels and how long.
    pub fn failing_longer_than(
        &self,
        limit: Duration,
        now: Instant,
    ) -> Option<(WatchLabels, Duration)> {
        self.failing
            .locked()
            .iter()
            .map(|(w, since)| (w.clone(), now.saturating_duration_since(*since)))
            .filter(|(_, d)| *d > limit)
            .max_by_key(|(_, d)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_fails_from_its_first_error_until_its_next_event() {
        let h = WatchHealth::default();
        let w = WatchLabels {
            namespace: "a".into(),
            watch: "integrations".into(),
        };
        let t0 = Instant::now();
        let limit = Duration::from_secs(120);
        assert_eq!(h.failing_longer_than(limit, t0), None);
        h.observe(&w, false, t0);
        h.observe(&w, false, t0 + Duration::from_secs(100));
        assert_eq!(h.gauge.get_or_create(&w).get(), 100);
        assert_eq!(
            h.failing_longer_than(limit, t0 + Duration::from_secs(119)),
            None
        );
        assert_eq!(
            h.failing_longer_than(limit, t0 + Duration::from_secs(121)),
            Some((w.clone(), Duration::from_secs(121)))
        );
        h.observe(&w, true, t0 + Duration::from_secs(122));
        assert_eq!(h.gauge.get_or_create(&w).get(), 0);
        assert_eq!(
            h.failing_longer_than(limit, t0 + Duration::from_secs(500)),
            None
        );
    }
}
