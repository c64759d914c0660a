//! Prometheus metrics, registered in one place.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntegrationLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// success | permanent_failure | transient_failure
    pub result: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    /// "True", "False" or "Unknown"
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// ok | error
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// The operator's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub token_expiry: Family<IntegrationLabels, Gauge<f64, AtomicU64>>,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub refresh_duration: Histogram,
    pub ready: Family<ReadyLabels, Gauge>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub api_writes: Family<ErrorLabels, Counter>,
    pub mailbox_checks: Family<RefreshLabels, Counter>,
    pub mailbox_check_failures: Family<ErrorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mailintegration");
        let token_expiry = Family::<IntegrationLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "access_token_expiry_timestamp_seconds",
            "When the published access token of each integration expires (Unix time)",
            token_expiry.clone(),
        );
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Token refreshes by result and reason",
            refreshes.clone(),
        );
        let refresh_duration = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register(
            "refresh_duration_seconds",
            "Time the token endpoint took to answer a refresh",
            refresh_duration.clone(),
        );
        let ready = Family::<ReadyLabels, Gauge>::default();
        registry.register(
            "integrations",
            "Integrations by the status of their Ready condition",
            ready.clone(),
        );
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors by kind",
            reconcile_errors.clone(),
        );
        let api_writes = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Writes to the Kubernetes API by kind of object",
            api_writes.clone(),
        );
        let mailbox_checks = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "mailbox_checks",
            "Mailbox connection checks by result and reason",
            mailbox_checks.clone(),
        );
        let mailbox_check_failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "mailbox_check_failures",
            "Failed mailbox connection checks by reason",
            mailbox_check_failures.clone(),
        );
        Self {
            mailbox_checks,
            mailbox_check_failures,
            registry,
            token_expiry,
            refreshes,
            refresh_duration,
            ready,
            reconciles,
            reconcile_errors,
            api_writes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    // `fmt::Write` for String never fails.
    #[allow(clippy::expect_used)]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn count_write(&self, what: &str) {
        self.api_writes
            .get_or_create(&ErrorLabels {
                error: what.to_owned(),
            })
            .inc();
    }
}
