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
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{family::Family, gauge::Gauge},
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    namespace: String,
    name: String,
    condition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    namespace: String,
    name: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabels {
    status: String,
}

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

fn status_of(mi: &MailIntegration, type_: &str) -> Option<(String, String)> {
    mi.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn encode_family<S, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    family: &Family<S, M>,
) -> Result<(), std::fmt::Error>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet,
    M: EncodeMetric + prometheus_client::metrics::TypedMetric + Default,
{
    let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
    family.encode(metric)
}

impl Collector for ObjectCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ready = Family::<ConditionLabels, Gauge>::default();
        let ready_reason = Family::<ReasonLabels, Gauge>::default();
        let mailbox = Family::<ConditionLabels, Gauge>::default();
        let expiry = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let last_refresh = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let next_refresh = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let client_secret_expiry = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let grant_expiry = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let suspended = Family::<ObjectLabels, Gauge>::default();
        let fleet = Family::<FleetLabels, Gauge>::default();
        for s in CONDITION_STATUSES {
            fleet
                .get_or_create(&FleetLabels { status: s.into() })
                .set(0);
        }
        for mi in self.stores.snapshot() {
            let namespace = mi.namespace().unwrap_or_default();
            let name = mi.name_any();
            let object = ObjectLabels {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let condition_gauges = |family: &Family<ConditionLabels, Gauge>, status: &str| {
                for s in CONDITION_STATUSES {
                    family
                        .get_or_create(&ConditionLabels {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            condition: s.into(),
                        })
                        .set(i64::from(s == status));
                }
            };
            let (ready_status, reason) = status_of(&mi, condition::READY)
                .unwrap_or_else(|| ("Unknown".into(), String::new()));
            let ready_status = if CONDITION_STATUSES.contains(&ready_status.as_str()) {
                ready_status
            } else {
                "Unknown".into()
            };
            condition_gauges(&ready, &ready_status);
            fleet
                .get_or_create(&FleetLabels {
                    status: ready_status,
                })
                .inc();
            if !reason.is_empty() {
                ready_reason
                    .get_or_create(&ReasonLabels {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        reason,
                    })
                    .set(1);
            }
            if let Some((status, _)) = status_of(&mi, condition::MAILBOX_CONNECTED) {
                condition_gauges(&mailbox, &status);
            }
            let status = mi.status.as_ref();
            let seconds = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
                t.map(|t| t.0.as_second() as f64)
            };
            for (family, value) in [
                (
                    &expiry,
                    seconds(status.and_then(|s| s.access_token_expires_at.as_ref())),
                ),
                (
                    &last_refresh,
                    seconds(status.and_then(|s| s.last_refresh_time.as_ref())),
                ),
                (
                    &next_refresh,
                    seconds(status.and_then(|s| s.next_refresh_time.as_ref())),
                ),
                (
                    &client_secret_expiry,
                    seconds(status.and_then(|s| s.client_secret_expires_at.as_ref())),
                ),
                (
                    &grant_expiry,
                    seconds(status.and_then(|s| s.grant_expires_at.as_ref())),
                ),
            ] {
                if let Some(v) = value {
                    family.get_or_create(&object).set(v);
                }
            }
            suspended
                .get_or_create(&object)
                .set(i64::from(mi.spec.suspend.unwrap_or(false)));
        }
        let e = &mut encoder;
        encode_family(
            e,
            "ready_status",
            "The status of each integration's Ready condition: 1 for the current one of True, False, Unknown",
            &ready,
        )?;
        encode_family(
            e,
            "ready_reason_info",
            "The reason of each integration's Ready condition (always 1; join on namespace and name)",
            &ready_reason,
        )?;
        encode_family(
            e,
            "mailbox_connected_status",
            "The status of each integration's MailboxConnected condition (the last mailbox check): 1 for the current one of True, False, Unknown",
            &mailbox,
        )?;
        encode_family(
            e,
            "access_token_expiry_timestamp_seconds",
            "When the published access token of each integration expires (Unix time)",
            &expiry,
        )?;
        encode_family(
            e,
            "last_refresh_timestamp_seconds",
            "When each integration's access token was last refreshed (Unix time)",
            &last_refresh,
        )?;
        encode_family(
            e,
            "next_refresh_timestamp_seconds",
            "When each integration's next refresh is due (Unix time)",
            &next_refresh,
        )?;
        encode_family(
            e,
            "client_secret_expiry_timestamp_seconds",
            "When each integration's client secret expires, from the client Secret's annotation mailintegration.dev/client-secret-expires (Unix time; absent without it)",
            &client_secret_expiry,
        )?;
        encode_family(
            e,
            "grant_expiry_timestamp_seconds",
            "When each integration's grant is expected to end, where the provider announced it (Google apps in Testing status: 7 days after sign-in; Unix time)",
            &grant_expiry,
        )?;
        encode_family(
            e,
            "suspended",
            "Whether each integration is suspended by spec.suspend (1) or not (0)",
            &suspended,
        )?;
        encode_family(
            e,
            "integrations",
            "Integrations by the status of their Ready condition",
            &fleet,
        )?;
        Ok(())
    }
}
