//! Prometheus metrics, registered in one place. Counters and histograms are pushed by the code
//! that counts; every per-object series comes from [`objects`], which reads the controller's cache
//! at scrape time.

pub mod objects;
pub mod sign_ins;
pub mod watches;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// success | permanent_failure | transient_failure
    pub result: String,
    pub reason: String,
}

/// What became of a first refresh's wait for its mailbox check (`reconcile::mailbox_check`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JoinLabels {
    /// joined (the result went out in the refresh's status write) | late (the check outlasted
    /// the wait) | no_slot (no join slot became free in time, or the namespace held its share:
    /// not waited for)
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// ok | error
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// namespace_share | min_refresh_interval
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// The operator's metrics.
pub struct Metrics {
    pub registry: Registry,
    /// The controllers' caches, read at scrape time for the per-object series.
    pub objects: objects::ObjectStores,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub refresh_duration: Histogram,
    /// How long a reconcile took (the refresh and the writes included; the mailbox check is not).
    pub reconcile_duration: Histogram,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Writes to the Kubernetes API, by object written (status, grant_secret, token_secret, event, finalizer).
    pub api_writes: Family<ObjectLabels, Counter>,
    /// Reads (GETs) a reconcile made of the Kubernetes API, by object; the watch caches serve the rest.
    pub api_reads: Family<ObjectLabels, Counter>,
    pub mailbox_checks: Family<RefreshLabels, Counter>,
    pub mailbox_check_joins: Family<JoinLabels, Counter>,
    pub sign_ins: Family<RefreshLabels, Counter>,
    /// Provider calls deferred by a limit (docs/security.md, "Shared capacity").
    pub deferred: Family<LimitLabels, Counter>,
    /// The watches' failures (see [`watches`]); `/readyz` reads them.
    pub watches: std::sync::Arc<watches::WatchHealth>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mailintegration");
        let objects = objects::ObjectStores::default();
        registry.register_collector(Box::new(objects::ObjectCollector {
            stores: objects.clone(),
        }));
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The operator's version (always 1)",
            build_info,
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
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took, its provider call and API writes included",
            reconcile_duration.clone(),
        );
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors by kind",
            reconcile_errors.clone(),
        );
        let api_writes = Family::<ObjectLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Writes to the Kubernetes API, by object written",
            api_writes.clone(),
        );
        let api_reads = Family::<ObjectLabels, Counter>::default();
        registry.register(
            "api_reads",
            "Reads of the Kubernetes API by reconciles, by object (the watch caches serve the rest)",
            api_reads.clone(),
        );
        let deferred = Family::<LimitLabels, Counter>::default();
        registry.register(
            "deferred",
            "Provider calls deferred by a limit: a namespace's share of them in flight, or the lowest refresh interval",
            deferred.clone(),
        );
        let mailbox_checks = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "mailbox_checks",
            "Mailbox connection checks by result and reason",
            mailbox_checks.clone(),
        );
        let mailbox_check_joins = Family::<JoinLabels, Counter>::default();
        registry.register(
            "mailbox_check_joins",
            "First refreshes whose status write waited for their first mailbox check, by what became of it: joined (one status write), late (the check outlasted --mailbox-check-wait) or no_slot (every join slot taken); late and no_slot each cost a status write of the check's own",
            mailbox_check_joins.clone(),
        );
        for result in ["joined", "late", "no_slot"] {
            let _ = mailbox_check_joins.get_or_create(&JoinLabels {
                result: result.into(),
            });
        }
        let sign_ins = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "sign_ins",
            "Sign-ins on the operator's pages, by result and reason",
            sign_ins.clone(),
        );
        // Counters start at zero with their most common labels, so that every family the alerts
        // and the dashboard use is served from the start, and rate() sees the first increment.
        let zero = |family: &Family<RefreshLabels, Counter>, result: &str, reason: &str| {
            let _ = family.get_or_create(&RefreshLabels {
                result: result.into(),
                reason: reason.into(),
            });
        };
        zero(&mailbox_checks, "success", "Connected");
        zero(
            &sign_ins,
            "success",
            crate::reason::Reason::SignedIn.as_str(),
        );
        // The labels of `reconcile::error::Error::metric_label`.
        for error in ["kube", "no_namespace", "panic"] {
            let _ = reconcile_errors.get_or_create(&ErrorLabels {
                error: error.into(),
            });
        }
        let watches = std::sync::Arc::new(watches::WatchHealth::default());
        registry.register_collector(Box::new(watches::WatchCollector(watches.clone())));
        Self {
            watches,
            sign_ins,
            objects,
            mailbox_checks,
            mailbox_check_joins,
            registry,
            refreshes,
            refresh_duration,
            reconcile_duration,
            reconciles,
            reconcile_errors,
            api_writes,
            api_reads,
            deferred,
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

    pub fn count_read(&self, what: &str) {
        self.api_reads
            .get_or_create(&ObjectLabels {
                object: what.to_owned(),
            })
            .inc();
    }

    pub fn count_deferred(&self, limit: &str) {
        self.deferred
            .get_or_create(&LimitLabels {
                limit: limit.to_owned(),
            })
            .inc();
    }

    pub fn count_write(&self, what: &str) {
        self.api_writes
            .get_or_create(&ObjectLabels {
                object: what.to_owned(),
            })
            .inc();
    }
}
