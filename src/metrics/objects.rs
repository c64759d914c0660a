//! Per-object metrics, read from the controller's reflector store at scrape time (like
//! kube-state-metrics, and cert-manager's `certmanager_certificate_ready_status`): nothing is pushed,
//! so nothing goes stale. An integration's series exist exactly while the watch cache holds it, and
//! are gone at the first scrape after its deletion reached the operator. Only a replica that runs the
//! controller (the leader) has a store, so only it serves these series.

use crate::api::{MailIntegration, condition};
use crate::sync::LockExt as _;
use kube::{ResourceExt, runtime::reflector::Store};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder},
    metrics::MetricType,
};
use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// The condition statuses a `*_status` gauge has one series for (cert-manager's shape).
pub const CONDITION_STATUSES: [&str; 3] = ["True", "False", "Unknown"];

type Stores = BTreeMap<u64, Store<MailIntegration>>;

/// The stores of the running controllers (one per watched namespace, or one for all).
#[derive(Clone, Default)]
pub struct ObjectStores {
    stores: Arc<Mutex<Stores>>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for ObjectStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStores")
            .field("stores", &self.stores.locked().len())
            .finish()
    }
}

/// Keeps a store in the collector until dropped (when its controller stops, e.g. on losing the lease).
#[must_use = "the store leaves the metrics when this is dropped"]
pub struct Registration {
    stores: Arc<Mutex<Stores>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stores.locked().remove(&self.id);
    }
}

impl ObjectStores {
    /// Serve per-object series from `store` while the returned guard lives.
    pub fn register(&self, store: Store<MailIntegration>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.stores.locked().insert(id, store);
        Registration {
            stores: self.stores.clone(),
            id,
        }
    }

    /// Every integration in the stores, once each (by UID).
    pub fn snapshot(&self) -> Vec<Arc<MailIntegration>> {
        let stores: Vec<Store<MailIntegration>> = self.stores.locked().values().cloned().collect();
        let mut seen = HashSet::new();
        stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|mi| seen.insert(mi.uid().unwrap_or_else(|| mi.name_any())))
            .collect()
    }
}

/// The collector registered in [`super::Metrics`].
#[derive(Debug)]
pub struct ObjectCollector {
    pub stores: ObjectStores,
}

fn status_of<'a>(mi: &'a MailIntegration, type_: &str) -> Option<(&'a str, &'a str)> {
    mi.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// What the series of one integration say, borrowed from the cache's object.
struct Row<'a> {
    namespace: &'a str,
    name: &'a str,
    ready: &'static str,
    reason: &'a str,
    mailbox: Option<&'static str>,
    /// access token expiry, last refresh, next refresh, client secret expiry, grant expiry.
    times: [Option<f64>; 5],
    suspended: bool,
}

/// One of [`CONDITION_STATUSES`] (a status outside them counts as Unknown).
fn known_status(status: &str) -> &'static str {
    CONDITION_STATUSES
        .into_iter()
        .find(|s| *s == status)
        .unwrap_or("Unknown")
}

fn row(mi: &MailIntegration) -> Row<'_> {
    let (ready, reason) = status_of(mi, condition::READY).unwrap_or(("Unknown", ""));
    let status = mi.status.as_ref();
    let seconds = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.map(|t| t.0.as_second() as f64)
    };
    Row {
        namespace: mi.metadata.namespace.as_deref().unwrap_or_default(),
        name: mi.metadata.name.as_deref().unwrap_or_default(),
        ready: known_status(ready),
        reason,
        mailbox: status_of(mi, condition::MAILBOX_CONNECTED).map(|(s, _)| known_status(s)),
        times: [
            seconds(status.and_then(|s| s.access_token_expires_at.as_ref())),
            seconds(status.and_then(|s| s.last_refresh_time.as_ref())),
            seconds(status.and_then(|s| s.next_refresh_time.as_ref())),
            seconds(status.and_then(|s| s.client_secret_expires_at.as_ref())),
            seconds(status.and_then(|s| s.grant_expires_at.as_ref())),
        ],
        suspended: mi.spec.suspend.unwrap_or(false),
    }
}

/// The names and help texts of the timestamp gauges, in the order of [`Row::times`].
const TIME_GAUGES: [(&str, &str); 5] = [
    (
        "access_token_expiry_timestamp_seconds",
        "When the published access token of each integration expires (Unix time)",
    ),
    (
        "last_refresh_timestamp_seconds",
        "When each integration's access token was last refreshed (Unix time)",
    ),
    (
        "next_refresh_timestamp_seconds",
        "When each integration's next refresh is due (Unix time)",
    ),
    (
        "client_secret_expiry_timestamp_seconds",
        "When each integration's client secret expires, from the client Secret's annotation mailintegration.dev/client-secret-expires (Unix time; absent without it)",
    ),
    (
        "grant_expiry_timestamp_seconds",
        "When each integration's grant is expected to end, where the provider announced it (Google apps in Testing status: 7 days after sign-in; Unix time)",
    ),
];

/// The three series of a `*_status` gauge of one integration.
fn encode_status(
    metric: &mut MetricEncoder<'_>,
    r: &Row<'_>,
    current: &str,
) -> Result<(), std::fmt::Error> {
    for s in CONDITION_STATUSES {
        let labels = [
            ("namespace", r.namespace),
            ("name", r.name),
            ("condition", s),
        ];
        metric
            .encode_family(&labels)?
            .encode_gauge(&i64::from(s == current))?;
    }
    Ok(())
}

impl Collector for ObjectCollector {
    /// Each series is written as it is read from the caches: at 10,000 integrations, building
    /// families first held tens of megabytes for the length of every scrape.
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.stores.snapshot();
        let rows: Vec<Row<'_>> = snapshot.iter().map(|mi| row(mi)).collect();
        let mut metric = encoder.encode_descriptor(
            "ready_status",
            "The status of each integration's Ready condition: 1 for the current one of True, False, Unknown",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            encode_status(&mut metric, r, r.ready)?;
        }
        let mut metric = encoder.encode_descriptor(
            "ready_reason_info",
            "The reason of each integration's Ready condition (always 1; join on namespace and name)",
            None,
            MetricType::Gauge,
        )?;
        for r in rows.iter().filter(|r| !r.reason.is_empty()) {
            let labels = [
                ("namespace", r.namespace),
                ("name", r.name),
                ("reason", r.reason),
            ];
            metric.encode_family(&labels)?.encode_gauge(&1i64)?;
        }
        let mut metric = encoder.encode_descriptor(
            "mailbox_connected_status",
            "The status of each integration's MailboxConnected condition (the last mailbox check): 1 for the current one of True, False, Unknown",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            if let Some(current) = r.mailbox {
                encode_status(&mut metric, r, current)?;
            }
        }
        for (i, (name, help)) in TIME_GAUGES.into_iter().enumerate() {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &rows {
                if let Some(&Some(v)) = r.times.get(i) {
                    let labels = [("namespace", r.namespace), ("name", r.name)];
                    metric.encode_family(&labels)?.encode_gauge(&v)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "suspended",
            "Whether each integration is suspended by spec.suspend (1) or not (0)",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            let labels = [("namespace", r.namespace), ("name", r.name)];
            metric
                .encode_family(&labels)?
                .encode_gauge(&i64::from(r.suspended))?;
        }
        let mut metric = encoder.encode_descriptor(
            "integrations",
            "Integrations by the status of their Ready condition",
            None,
            MetricType::Gauge,
        )?;
        for status in CONDITION_STATUSES {
            let count = rows.iter().filter(|r| r.ready == status).count();
            metric
                .encode_family(&[("status", status)])?
                .encode_gauge(&i64::try_from(count).unwrap_or(i64::MAX))?;
        }
        // The replica that runs the controllers has their stores: the Lease holder, or the only
        // replica without leader election. A standby serves 0 (and none of the series above).
        let leads = !self.stores.stores.locked().is_empty();
        encoder
            .encode_descriptor(
                "leader",
                "Whether this replica runs the controllers (1: it holds the Lease, or leader election is off) or waits as a standby (0)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&i64::from(leads))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector::store, watcher::Event};

    fn integration(name: &str, ready: Option<(&str, &str)>, suspend: bool) -> MailIntegration {
        let mut mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
            "metadata": {"name": name, "namespace": "team", "uid": name},
            "spec": {"provider": "Google", "mailbox": {"address": "a@example.test"}, "suspend": suspend,
                "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}}
        }))
        .unwrap();
        if let Some((status, reason)) = ready {
            mi.status = Some(serde_json::from_value(serde_json::json!({
                "conditions": [{"type": "Ready", "status": status, "reason": reason, "message": "",
                    "lastTransitionTime": "2026-12-01T00:00:00Z"}],
                "accessTokenExpiresAt": "2026-12-01T01:00:00Z",
                "grantExpiresAt": "2026-12-08T00:00:00Z"
            }))
            .unwrap());
        }
        mi
    }

    #[test]
    fn each_integration_has_its_series_written_straight_from_the_cache() {
        let (store, mut writer) = store::<MailIntegration>();
        for mi in [
            integration("ok", Some(("True", "Refreshed")), false),
            integration("odd", Some(("Maybe", "")), true),
            integration("new", None, false),
        ] {
            writer.apply_watcher_event(&Event::Apply(mi));
        }
        let stores = ObjectStores::default();
        let _registered = stores.register(store);
        let mut registry = prometheus_client::registry::Registry::with_prefix("mailintegration");
        registry.register_collector(Box::new(ObjectCollector { stores }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"mailintegration_ready_status{namespace="team",name="ok",condition="True"} 1"#,
            r#"mailintegration_ready_status{namespace="team",name="ok",condition="False"} 0"#,
            r#"mailintegration_ready_status{namespace="team",name="odd",condition="Unknown"} 1"#,
            r#"mailintegration_ready_status{namespace="team",name="new",condition="Unknown"} 1"#,
            r#"mailintegration_ready_reason_info{namespace="team",name="ok",reason="Refreshed"} 1"#,
            r#"mailintegration_access_token_expiry_timestamp_seconds{namespace="team",name="ok"} 1796086800.0"#,
            r#"mailintegration_grant_expiry_timestamp_seconds{namespace="team",name="ok"} 1796688000.0"#,
            r#"mailintegration_suspended{namespace="team",name="odd"} 1"#,
            r#"mailintegration_suspended{namespace="team",name="ok"} 0"#,
            r#"mailintegration_integrations{status="True"} 1"#,
            r#"mailintegration_integrations{status="Unknown"} 2"#,
            r#"mailintegration_integrations{status="False"} 0"#,
        ] {
            assert!(text.contains(line), "{line} is missing from:\n{text}");
        }
        assert_eq!(text.matches("ready_status{").count(), 9, "{text}");
        assert!(!text.contains(r#"name="odd",reason"#), "{text}");
        assert!(
            !text.contains("access_token_expiry_timestamp_seconds{namespace=\"team\",name=\"new\""),
            "{text}"
        );
        assert!(!text.contains("mailbox_connected_status{"), "{text}");
    }
}
