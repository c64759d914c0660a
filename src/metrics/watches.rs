//! Whether the watches work: each watch's failures (an API server out of reach, RBAC taken away, a
//! watch the server keeps refusing) are recorded here, shown at scrape time by the gauge
//! `mailintegration_watch_failing_seconds{namespace, watch}`, and fail `/readyz` once one has been
//! failing longer than `--watch-failure-limit` (docs/operations.md, "What happens on each
//! failure"). Without this, a watch that cannot reconnect leaves the caches stale while the
//! process looks healthy.
//!
//! A watch fails from its first error until the API server next answers one of its requests (see
//! `reconcile::watches::watch_client`) or it delivers an event: a watch resumed after an outage
//! delivers nothing until an object changes.

use crate::sync::LockExt as _;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::MetricType,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// The watched namespace ("" for all).
    pub namespace: String,
    /// `integrations`, `owned_secrets` or `marked_secrets`.
    pub watch: String,
}

/// The running watches, and since when each is failing (`None` while it works).
#[derive(Debug, Default)]
pub struct WatchHealth {
    running: Mutex<HashMap<WatchLabels, Option<Instant>>>,
}

impl WatchHealth {
    /// One result of `watch`: `ok` (an answer, an event) ends its failure; an error starts one
    /// (a failure already running keeps its start). A watch that is not running is not recorded.
    pub fn observe(&self, watch: &WatchLabels, ok: bool, now: Instant) {
        if let Some(since) = self.running.locked().get_mut(watch) {
            if ok {
                *since = None;
            } else if since.is_none() {
                *since = Some(now);
            }
        }
    }

    /// Records `watch` as running (and working) from now, so that its series shows 0 before any
    /// failure; the returned guard forgets it when the watch stops (a replica that lost the Lease
    /// watches nothing and must not stay unready for a watch it no longer runs).
    pub fn start(self: &Arc<Self>, watch: WatchLabels) -> Watching {
        self.running.locked().insert(watch.clone(), None);
        Watching {
            health: self.clone(),
            watch,
        }
    }

    /// The watch that has been failing longest, if for longer than `limit`: its labels and how long.
    pub fn failing_longer_than(
        &self,
        limit: Duration,
        now: Instant,
    ) -> Option<(WatchLabels, Duration)> {
        self.failing(now)
            .into_iter()
            .filter(|(_, d)| *d > limit)
            .max_by_key(|(_, d)| *d)
    }

    /// Each running watch and how long it has been failing as of `now` (zero while it works).
    fn failing(&self, now: Instant) -> Vec<(WatchLabels, Duration)> {
        self.running
            .locked()
            .iter()
            .map(|(w, since)| {
                let d = since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                (w.clone(), d)
            })
            .collect()
    }
}

/// Serves `mailintegration_watch_failing_seconds` from a [`WatchHealth`], read at each scrape.
#[derive(Debug)]
pub struct WatchCollector(pub Arc<WatchHealth>);

impl Collector for WatchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "watch_failing_seconds",
            "How long each watch of the operator has been failing (0 while it works); /readyz fails past --watch-failure-limit",
            None,
            MetricType::Gauge,
        )?;
        for (labels, d) in self.0.failing(Instant::now()) {
            let seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            metric.encode_family(&labels)?.encode_gauge(&seconds)?;
        }
        Ok(())
    }
}

/// One running watch (see [`WatchHealth::start`]).
pub struct Watching {
    health: Arc<WatchHealth>,
    watch: WatchLabels,
}

impl Watching {
    pub fn labels(&self) -> &WatchLabels {
        &self.watch
    }

    pub fn health(&self) -> &Arc<WatchHealth> {
        &self.health
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.health.running.locked().remove(&self.watch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> WatchLabels {
        WatchLabels {
            namespace: "a".into(),
            watch: "marked_secrets".into(),
        }
    }

    fn seconds(h: &WatchHealth, now: Instant) -> Vec<u64> {
        h.failing(now).iter().map(|(_, d)| d.as_secs()).collect()
    }

    #[test]
    fn a_watch_fails_from_its_first_error_until_its_next_answer() {
        let h = Arc::new(WatchHealth::default());
        let w = labels();
        let t0 = Instant::now();
        let limit = Duration::from_secs(120);
        let _watching = h.start(w.clone());
        assert_eq!(seconds(&h, t0), [0]);
        h.observe(&w, false, t0);
        // The gauge counts as of the scrape, not as of the last error: a client that retries one
        // request for a minute reports one error in that minute.
        h.observe(&w, false, t0 + Duration::from_secs(100));
        assert_eq!(seconds(&h, t0 + Duration::from_secs(110)), [110]);
        assert_eq!(
            h.failing_longer_than(limit, t0 + Duration::from_secs(119)),
            None
        );
        assert_eq!(
            h.failing_longer_than(limit, t0 + Duration::from_secs(121)),
            Some((w.clone(), Duration::from_secs(121)))
        );
        h.observe(&w, true, t0 + Duration::from_secs(122));
        assert_eq!(seconds(&h, t0 + Duration::from_secs(500)), [0]);
        assert_eq!(
            h.failing_longer_than(Duration::ZERO, t0 + Duration::from_secs(500)),
            None
        );
    }

    #[test]
    fn a_stopped_watch_is_forgotten_and_an_unknown_one_not_recorded() {
        let h = Arc::new(WatchHealth::default());
        let w = labels();
        let t0 = Instant::now();
        let watching = h.start(w.clone());
        h.observe(&w, false, t0);
        assert!(
            h.failing_longer_than(Duration::from_secs(1), t0 + Duration::from_secs(300))
                .is_some()
        );
        drop(watching);
        assert!(seconds(&h, t0).is_empty());
        h.observe(&w, false, t0);
        assert_eq!(
            h.failing_longer_than(Duration::ZERO, t0 + Duration::from_secs(900)),
            None
        );
    }
}
