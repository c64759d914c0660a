//! The operator's Kubernetes client, limited by the API server's own signal rather than a fixed
//! budget alone: every request waits for its turn under a rate limit ([`limit::Pacer`]) that
//! adapts ([`limit::Aimd`]: it grows while the API server answers promptly and halves on a 429 or
//! on slow answers), under `--kube-api-qps` as a hard cap when one is set; and a request the API
//! server refuses with 429 (API Priority and Fairness: the operator's priority level is full), 503
//! or 504 is sent again after its `Retry-After` and the jittered backoff ([`limit::retry_delay`]),
//! each attempt waiting for its turn again, at most [`limit::MAX_RETRIES`] times within
//! [`limit::RETRY_BUDGET`]; past that the caller gets the answer and its own backoff takes over.
//!
//! This replaces kube's own retry (`Config::default_retry`), which retried below any client-side
//! limit (a retry took no turn), believed `Retry-After` only when longer than its own backoff,
//! and let a request retry for minutes.
//!
//! A 429 from the priority-and-fairness filter means the request was not executed, so resending
//! any verb is safe; a 503/504 may come after a write landed, which the callers already handle
//! (a replace carries its resourceVersion and meets a 409, a create meets 409 AlreadyExists).

pub mod limit;
mod service;
#[cfg(test)]
mod tests;

pub use limit::Settings;
pub use service::{Governed, GovernedLayer};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    /// throttled (a 429) | slow (answers slower than the threshold)
    pub signal: String,
}

/// The buckets of [`ApiMetrics::duration`], in seconds: around the 1 s of [`Settings::slow`].
const DURATION_BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

/// What the client reports: its limit now, the API server's refusals, the retries, how long the
/// answers took.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    /// Seconds from sending a request (after its turn) to its answer's headers, for the requests
    /// whose time the adaptive limit judges (not lists and watches): what the client calls slow,
    /// to set beside the API server's own `apiserver_request_duration_seconds`.
    pub duration: Histogram,
    /// Requests per second the client allows itself now; 0 when nothing limits it.
    pub limit: Gauge<f64, AtomicU64>,
    /// Seconds requests waited for their turn under the limit, summed: grows while the limit
    /// holds the operator back.
    pub waited: Counter<f64, AtomicU64>,
    /// Answers 429 Too Many Requests.
    pub throttled: Counter,
    /// Requests sent again after a 429, 503 or 504.
    pub retries: Counter,
    /// Times the adaptive limit was halved, by signal.
    pub decreases: Family<SignalLabels, Counter>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            duration: Histogram::new(DURATION_BUCKETS),
            limit: Gauge::default(),
            waited: Counter::default(),
            throttled: Counter::default(),
            retries: Counter::default(),
            decreases: Family::default(),
        }
    }
}

impl ApiMetrics {
    /// Registers the series under the registry's prefix (`mailintegration_kube_api_*`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kube_api_request_duration_seconds",
            "Seconds from sending a Kubernetes API request to its answer, as the operator's client saw it (lists and watches aside): the time its adaptive limit judges",
            self.duration.clone(),
        );
        registry.register(
            "kube_api_limit",
            "Requests per second the operator's Kubernetes client allows itself now (adaptive: grows while the API server answers promptly, halves on 429 or slow answers; 0: no limit)",
            self.limit.clone(),
        );
        registry.register(
            "kube_api_wait_seconds",
            "Seconds Kubernetes API requests waited for their turn under the operator's own limit, summed over all requests: grows while the limit holds the operator back",
            self.waited.clone(),
        );
        registry.register(
            "kube_api_throttled",
            "Answers 429 Too Many Requests of the Kubernetes API server (API Priority and Fairness)",
            self.throttled.clone(),
        );
        registry.register(
            "kube_api_retries",
            "Kubernetes API requests sent again after a 429, 503 or 504",
            self.retries.clone(),
        );
        registry.register(
            "kube_api_limit_decreases",
            "Times the adaptive limit of the Kubernetes client was halved, by signal",
            self.decreases.clone(),
        );
    }
}

/// The client of everything but the Lease: responses bounded in time (a watch ends by itself
/// within 290 s, so a read timeout above that never cuts a healthy one), the limit and the
/// retries above.
pub fn client(
    config: &kube::Config,
    settings: Settings,
    metrics: ApiMetrics,
) -> Result<kube::Client, kube::Error> {
    let mut config = config.clone();
    config.read_timeout = Some(std::time::Duration::from_secs(295));
    // The layer below retries instead, each attempt taking its turn.
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder
        // A service that can be cloned, to send a request more than once.
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&GovernedLayer::new(settings, metrics))
        .build())
}
