//! `/healthz`, `/readyz` and `/metrics`, on a port that no Ingress exposes.

use crate::metrics::Metrics;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// What the health endpoints report.
#[derive(Clone)]
pub struct HealthState {
    pub metrics: Arc<Metrics>,
    /// Set once the operator has started its watches (readiness does not depend on leadership).
    pub ready: Arc<AtomicBool>,
    /// `/readyz` fails while a watch has been failing for longer than this (`--watch-failure-limit`).
    pub watch_failure_limit: std::time::Duration,
}

pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<HealthState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting".to_owned());
    }
    match s
        .metrics
        .watches
        .failing_longer_than(s.watch_failure_limit, std::time::Instant::now())
    {
        Some((w, d)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the {} watch of namespace {:?} has been failing for {} s (the caches are stale)",
                w.watch,
                w.namespace,
                d.as_secs()
            ),
        ),
        None => (StatusCode::OK, "ready".to_owned()),
    }
}

async fn metrics(State(s): State<HealthState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
