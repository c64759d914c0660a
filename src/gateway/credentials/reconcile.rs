//! The thin writing layer of the gateway credentials: watches (MailIntegrations, and the two kinds
//! of Secrets it owns, label-selected), the reads a decision needs, and the writes it decides on.
//! Nothing is written when nothing changed.

use super::{
    GatewaySettings,
    decide::{self, AppSecret, Entropy, Inputs, Rotation},
    secrets::{self as shape, app_of, app_secret_name, gateway_secret_name},
    status,
};
use crate::{
    api::{INTEGRATION_LABEL, MailIntegration, OAUTH_CLIENT_LABEL, ROTATE_GATEWAY_ANNOTATION},
    gateway::config::{GATEWAY_APP_LABEL, GATEWAY_LABEL},
    metrics::Metrics,
    reconcile::{
        cached_secret::{self, CachedSecret, Held},
        observed,
        watches::{InitialList, integrations_where, names_ca, scoped_api, watch_backoff},
    },
};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector::{self, ObjectRef, Store, reflector},
        watcher::watcher,
    },
};
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use tracing::{info, warn};

/// What the credentials part of the operator needs.
pub struct Credentials {
    pub client: kube::Client,
    pub settings: GatewaySettings,
    pub metrics: Arc<Metrics>,
}

/// How soon a reconcile comes back while a Secret name is taken by someone else's Secret (it may
/// be deleted without any event the watches see).
const CONFLICT_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

struct Scope {
    creds: Arc<Credentials>,
    apps: Store<CachedSecret>,
    gateways: Store<CachedSecret>,
    memory: std::sync::Mutex<Memory>,
}

/// What this process wrote last, for the reconciles that run before the watch caches show it
/// (the events of two Secret watches and of the integrations arrive in no fixed order): a decision
/// on an app Secret older than its gateway Secret would take a kept password for an edited one.
#[derive(Default)]
struct Memory {
    /// `(namespace, name)` → the resourceVersion of this process's last write of the Secret.
    versions: std::collections::HashMap<(String, String), String>,
    /// Integration UID → the last rotation request acted on.
    rotations: std::collections::HashMap<String, String>,
    /// Integration UID → the status fields last applied.
    reports: std::collections::HashMap<String, status::Report>,
}

impl Scope {
    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wrote(&self, ns: &str, name: &str, version: Option<String>) {
        let key = (ns.to_owned(), name.to_owned());
        let mut m = self.memory();
        match version {
            Some(v) => m.versions.insert(key, v),
            None => m.versions.remove(&key),
        };
    }

    /// A Secret as it is now: from `store`, unless this process wrote a version the cache does
    /// not show yet (or it was too large to keep): then read.
    async fn current(
        &self,
        store: &Store<CachedSecret>,
        api: &Api<Secret>,
        ns: &str,
        name: &str,
    ) -> Result<Option<Secret>, kube::Error> {
        let written = self
            .memory()
            .versions
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned();
        let cached = store
            .get(&ObjectRef::new(name).within(ns))
            .map(|s| s.held());
        let lagging = written.is_some()
            && cached.as_ref().and_then(|h| h.resource_version()) != written.as_deref();
        match cached {
            Some(Held::Secret(s)) if !lagging => Ok(Some(s)),
            None if !lagging => Ok(None),
            _ => {
                self.creds.metrics.count_read("gateway_secret");
                let read = api.get_opt(name).await?;
                if read
                    .as_ref()
                    .and_then(|s| s.metadata.resource_version.as_deref())
                    != written.as_deref()
                {
                    // Changed since by someone else: the cache will follow that version.
                    self.wrote(ns, name, None);
                }
                Ok(read)
            }
        }
    }
}

/// The OS random number generator (`rand`'s `OsRng`, i.e. getrandom).
struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), String> {
        use rand::TryRngCore as _;
        rand::rngs::OsRng
            .try_fill_bytes(buf)
            .map_err(|e| format!("the OS random number generator failed: {e}"))
    }
}

/// Run until `stop`, over all namespaces (`namespaces` empty) or each of `namespaces`.
pub async fn run(
    creds: Arc<Credentials>,
    namespaces: Vec<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    // Streaming lists where the API server allows them, as the main controller's watches.
    let probed: Api<MailIntegration> =
        scoped_api(creds.client.clone(), namespaces.first().map(String::as_str));
    let initial = InitialList::once(&probed).await;
    if namespaces.is_empty() {
        run_one(creds, None, initial, stop).await;
    } else {
        let mut unique = namespaces;
        unique.sort();
        unique.dedup();
        futures::future::join_all(
            unique
                .into_iter()
                .map(|ns| run_one(creds.clone(), Some(ns), initial, stop.clone())),
        )
        .await;
    }
}

async fn run_one(
    creds: Arc<Credentials>,
    namespace: Option<String>,
    initial: InitialList,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ns = namespace.as_deref();
    let config = initial.config();
    let (store, writer) = reflector::store();
    let integrations = reflector(
        writer,
        watcher(
            scoped_api::<MailIntegration>(creds.client.clone(), ns),
            config.clone(),
        )
        .backoff(watch_backoff())
        .modify(status::trim_for_cache),
    )
    .applied_objects();
    // Only Secrets with the credentials' own labels, kept compact and bounded like the main
    // controller's (see `cached_secret`).
    let (apps, apps_writer) = reflector::store();
    let app_events = cached_secret::reflector(
        apps_writer,
        watcher(
            scoped_api::<Secret>(creds.client.clone(), ns),
            config.clone().labels(GATEWAY_APP_LABEL),
        )
        .backoff(watch_backoff()),
    )
    .touched_objects()
    .predicate_filter(
        kube::runtime::predicates::resource_version,
        Default::default(),
    );
    let (gateways, gateways_writer) = reflector::store();
    let gateway_events = cached_secret::reflector(
        gateways_writer,
        watcher(
            scoped_api::<Secret>(creds.client.clone(), ns),
            config.clone().labels(&format!("{GATEWAY_LABEL}=true")),
        )
        .backoff(watch_backoff()),
    )
    .touched_objects()
    .predicate_filter(
        kube::runtime::predicates::resource_version,
        Default::default(),
    );
    // The CA bundles integrations name (spec.mailbox.caSecretRef): `gateway.json` carries their
    // PEM, so a change of one reaches the gateway Secret at once rather than at the integration's
    // next event. Watched as the main controller watches them: the Secrets users marked for the
    // operator (`mailintegration.dev/oauth-client=true`), metadata only (the data is read by
    // `read_ca` when a reconcile needs it); the cluster's other Secrets are never listed.
    let ca_events = watcher(
        scoped_api::<PartialObjectMeta<Secret>>(creds.client.clone(), ns),
        config.labels(&format!("{OAUTH_CLIENT_LABEL}=true")),
    )
    .backoff(watch_backoff())
    .touched_objects()
    .predicate_filter(
        kube::runtime::predicates::resource_version,
        Default::default(),
    );
    let naming_ca = {
        let store = store.clone();
        move |s: PartialObjectMeta<Secret>| {
            let name = s.name_any();
            integrations_where(&store, s.metadata.namespace.as_deref(), |mi| {
                mi.spec.gateway.is_some() && names_ca(mi, &name)
            })
        }
    };
    let to_integration = |s: Secret| {
        let ns = s.namespace()?;
        let name = s.labels().get(INTEGRATION_LABEL)?.clone();
        Some(ObjectRef::new(&name).within(&ns))
    };
    let scope = Arc::new(Scope {
        creds,
        apps,
        gateways,
        memory: Default::default(),
    });
    info!(
        namespace = ns.unwrap_or("(all)"),
        "issuing gateway credentials"
    );
    Controller::for_stream(integrations, store)
        .watches_stream(app_events, to_integration)
        .watches_stream(gateway_events, to_integration)
        .watches_stream(ca_events, naming_ca)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, scope)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn error_policy(mi: Arc<MailIntegration>, e: &Error, _: Arc<Scope>) -> Action {
    warn!(
        namespace = mi.namespace().unwrap_or_default(),
        name = mi.name_any(),
        error = %e,
        "could not write the gateway credentials; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Whether a Secret the caches do not hold exists anyway (someone else's, without our labels):
/// its metadata only is read, never its data.
async fn exists(api: &Api<Secret>, name: &str, metrics: &Metrics) -> Result<bool, kube::Error> {
    metrics.count_read("gateway_name_check");
    Ok(api.get_metadata_opt(name).await?.is_some())
}

async fn reconcile(mi: Arc<MailIntegration>, scope: Arc<Scope>) -> Result<Action, Error> {
    let Some(uid) = mi.uid() else {
        return Ok(Action::await_change());
    };
    if mi.metadata.deletion_timestamp.is_some() {
        // Its Secrets go with it (ownerReferences).
        let mut m = scope.memory();
        m.rotations.remove(&uid);
        m.reports.remove(&uid);
        return Ok(Action::await_change());
    }
    let ns = mi.namespace().unwrap_or_default();
    let name = mi.name_any();
    let creds = &scope.creds;
    let secrets: Api<Secret> = Api::namespaced(creds.client.clone(), &ns);
    let now = Timestamp::now();
    let gw_name = gateway_secret_name(&name);
    let current_gw = scope
        .current(&scope.gateways, &secrets, &ns, &gw_name)
        .await?;
    // This integration's app Secrets, by app (the names the cache holds, each as it is now).
    let cached_names: Vec<String> = scope
        .apps
        .state()
        .iter()
        .filter(|s| s.namespace_str() == ns)
        .map(|s| s.to_secret())
        .filter(|s| app_of(s, &mi).is_some())
        .map(|s| s.name_any())
        .collect();
    let mut owned_apps: BTreeMap<String, Secret> = BTreeMap::new();
    for n in cached_names {
        if let Some(s) = scope.current(&scope.apps, &secrets, &ns, &n).await?
            && let Some(app) = app_of(&s, &mi).map(str::to_owned)
        {
            owned_apps.insert(app, s);
        }
    }
    let mut reported = status::reported(&mi);
    // The status may not show this process's last write yet.
    let (remembered_rotation, remembered_report) = {
        let m = scope.memory();
        (m.rotations.get(&uid).cloned(), m.reports.get(&uid).cloned())
    };
    if let Some(r) = remembered_rotation {
        reported.rotation_handled = Some(r);
    }
    let status_differs = |report: &status::Report| {
        status::reported(&mi) != *report && remembered_report.as_ref() != Some(report)
    };

    let Some(gateway) = mi.spec.gateway.as_ref() else {
        // No spec.gateway (any more): both kinds of Secrets go, and the status fields.
        if let Some(gw) = current_gw.filter(|s| shape::is_gateway_secret_of(s, &mi)) {
            hand_to_collector(&scope, &secrets, &mi, &gw).await?;
        }
        for s in owned_apps.values() {
            hand_to_collector(&scope, &secrets, &mi, s).await?;
        }
        let none = status::Report {
            rotation_handled: None,
            condition: None,
        };
        if status_differs(&none) {
            apply_status(&scope, &mi, &none, now).await?;
        }
        scope.memory().rotations.remove(&uid);
        return Ok(Action::await_change());
    };

    let gateway_conflict = match &current_gw {
        Some(s) => !shape::is_gateway_secret_of(s, &mi),
        None => exists(&secrets, &gw_name, &creds.metrics).await?,
    };
    let rotation = decide::rotation(
        mi.annotations()
            .get(ROTATE_GATEWAY_ANNOTATION)
            .map(String::as_str),
        reported.rotation_handled.as_deref(),
        gateway,
    );
    if gateway_conflict {
        let report = status::report(&mi, &[], &[], true, &Rotation::None, None);
        let report = status::Report {
            rotation_handled: reported.rotation_handled.clone(),
            ..report
        };
        if status_differs(&report) {
            apply_status(&scope, &mi, &report, now).await?;
        }
        return Ok(Action::requeue(CONFLICT_RECHECK));
    }
    let mut app_secrets = BTreeMap::new();
    for app in &gateway.apps {
        let secret_name = app_secret_name(&name, &app.name);
        let found = match owned_apps.get(&app.name) {
            Some(s) if s.name_any() == secret_name => AppSecret::Ours(shape::password_of(s)),
            // Another integration's, or a Secret someone labelled: not ours to write.
            _ => match scope
                .current(&scope.apps, &secrets, &ns, &secret_name)
                .await?
            {
                Some(s) if app_of(&s, &mi) == Some(app.name.as_str()) => {
                    AppSecret::Ours(shape::password_of(&s))
                }
                Some(_) => AppSecret::Foreign,
                None if exists(&secrets, &secret_name, &creds.metrics).await? => AppSecret::Foreign,
                None => AppSecret::Missing,
            },
        };
        if let AppSecret::Ours(_) = found
            && !owned_apps.contains_key(&app.name)
            && let Some(s) = scope
                .current(&scope.apps, &secrets, &ns, &secret_name)
                .await?
        {
            owned_apps.insert(app.name.clone(), s);
        }
        app_secrets.insert(app.name.clone(), found);
    }
    let current_config = current_gw.as_ref().and_then(shape::config_of);
    let plan = decide::plan(
        &mi,
        gateway,
        Inputs {
            current: current_config.as_ref(),
            app_secrets: &app_secrets,
            rotation: &rotation,
            ca_pem: read_ca(&mi, &secrets, &creds.metrics).await,
            now,
        },
        &mut OsEntropy,
    )
    .map_err(Error::Other)?;

    // 1. The gateway Secret first: every verifier is live before an app holds its password.
    let token = match current_gw.as_ref().map(shape::token_of) {
        Some((Some(t), Some(e))) => (Some(t.to_vec()), Some(e.to_vec())),
        _ => (None, None),
    };
    let desired = shape::gateway_secret(
        &mi,
        current_gw.as_ref(),
        &plan.config,
        (token.0.as_deref(), token.1.as_deref()),
    )
    .map_err(Error::Other)?;
    write(&scope, &secrets, current_gw.as_ref(), &desired).await?;
    if token.0.is_none() {
        // A new gateway Secret: the token published so far, until the next refresh writes both.
        super::token::copy_published(&mi, &secrets, now, &creds.metrics).await;
    }

    // 2. The app Secrets: new passwords, or new host, ports or protocols.
    let mut issued = Vec::new();
    for app in &gateway.apps {
        let password = match (
            plan.new_passwords.get(&app.name),
            app_secrets.get(&app.name),
        ) {
            (Some(p), _) => p.clone(),
            (None, Some(AppSecret::Ours(Some(p)))) => p.clone(),
            _ => continue,
        };
        let data = decide::app_secret_data(&ns, &name, app, &password, &creds.settings);
        let current = owned_apps.get(&app.name);
        let desired = shape::app_secret(&mi, &app.name, current, &data);
        write(&scope, &secrets, current, &desired).await?;
        if plan.new_passwords.contains_key(&app.name) {
            info!(
                namespace = %ns, name = %name, app = %app.name,
                secret = %app_secret_name(&name, &app.name),
                "issued a gateway password"
            );
        }
        issued.push(app.name.clone());
    }

    // 3. Apps no longer listed: their verifiers are gone from gateway.json (above); their Secrets go.
    for (app, s) in &owned_apps {
        if !gateway.apps.iter().any(|a| &a.name == app) {
            hand_to_collector(&scope, &secrets, &mi, s).await?;
            info!(namespace = %ns, name = %name, app = %app, "removed a gateway credential");
        }
    }

    // 4. The status: the rotation handled, the condition.
    let report = status::report(
        &mi,
        &issued,
        &plan.conflicts,
        false,
        &rotation,
        reported.rotation_handled.as_deref(),
    );
    if let Some(v) = rotation.value() {
        scope.memory().rotations.insert(uid.clone(), v.to_owned());
    }
    if status_differs(&report) {
        apply_status(&scope, &mi, &report, now).await?;
    }
    let mut requeue = plan.next_retirement.map(|at| {
        Duration::try_from(at.duration_since(now))
            .unwrap_or_default()
            .max(Duration::from_secs(1))
    });
    if !plan.conflicts.is_empty() {
        requeue = Some(requeue.map_or(CONFLICT_RECHECK, |r| r.min(CONFLICT_RECHECK)));
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// The CA bundle of spec.mailbox.caSecretRef, when the Secret is marked for the operator (and not
/// one of its own), within the bound of a kept Secret, and holds the key; else none (the mailbox
/// check reports what is wrong with it).
async fn read_ca(mi: &MailIntegration, secrets: &Api<Secret>, metrics: &Metrics) -> Option<String> {
    let (name, key) = crate::reconcile::mailbox_check::ca_key(mi)?;
    // Metadata first: an unmarked Secret's data is never read.
    metrics.count_read("ca_secret");
    let meta = secrets.get_metadata_opt(name).await.ok()??;
    let marked = meta
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OAUTH_CLIENT_LABEL))
        .is_some_and(|v| v == "true");
    if !marked {
        return None;
    }
    metrics.count_read("ca_secret");
    let secret = secrets.get_opt(name).await.ok()??;
    if !observed::is_marked_for_operator(&secret) {
        return None;
    }
    let secret = Held::of_read(secret, true).into_secret()?;
    let pem = secret.data?.remove(key)?;
    String::from_utf8(pem.0)
        .ok()
        .filter(|p| !p.trim().is_empty())
}

/// Create `desired` (no `current`: a Secret someone made meanwhile under that name fails the
/// create instead of being taken over), or patch `current` into it (a merge patch conditional on
/// the resourceVersion read) when anything differs; else nothing.
async fn write(
    scope: &Scope,
    api: &Api<Secret>,
    current: Option<&Secret>,
    desired: &Secret,
) -> Result<(), kube::Error> {
    let metrics = &scope.creds.metrics;
    let what = if desired.labels().contains_key(GATEWAY_APP_LABEL) {
        "gateway_app_secret"
    } else {
        "gateway_secret"
    };
    let written = match current {
        None => {
            api.create(
                &PostParams {
                    field_manager: Some(status::FIELD_MANAGER.into()),
                    ..Default::default()
                },
                desired,
            )
            .await?
        }
        Some(current) if shape::differs(current, desired) => {
            api.patch(
                &desired.name_any(),
                &PatchParams {
                    field_manager: Some(status::FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&merge_patch(current, desired)),
            )
            .await?
        }
        Some(_) => return Ok(()),
    };
    metrics.count_write(what);
    scope.wrote(
        &written.namespace().unwrap_or_default(),
        &written.name_any(),
        written.metadata.resource_version,
    );
    Ok(())
}

/// The merge patch making `current` into `desired`: the resourceVersion read as precondition, the
/// labels set, the data keys set, and the keys `desired` lacks removed.
fn merge_patch(current: &Secret, desired: &Secret) -> serde_json::Value {
    let mut data = serde_json::Map::new();
    for k in current.data.iter().flatten().map(|(k, _)| k) {
        data.insert(k.clone(), serde_json::Value::Null);
    }
    for (k, v) in desired.data.iter().flatten() {
        data.insert(k.clone(), serde_json::to_value(v).unwrap_or_default());
    }
    serde_json::json!({
        "metadata": {
            "resourceVersion": current.metadata.resource_version,
            "labels": desired.metadata.labels,
        },
        "data": data,
    })
}

/// Hand a Secret of a removed app (or of a removed spec.gateway) to the garbage collector (see
/// [`shape::handed_to_collector`]), conditional on the resourceVersion read.
async fn hand_to_collector(
    scope: &Scope,
    api: &Api<Secret>,
    mi: &MailIntegration,
    current: &Secret,
) -> Result<(), kube::Error> {
    let metrics = &scope.creds.metrics;
    let gone = shape::handed_to_collector(mi, current);
    let mut labels = serde_json::Map::new();
    for k in current.labels().keys() {
        if !gone.labels().contains_key(k) {
            labels.insert(k.clone(), serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": current.metadata.resource_version,
            "labels": labels,
            "ownerReferences": gone.metadata.owner_references,
        },
        "data": null,
    });
    let written = api
        .patch(
            &current.name_any(),
            &PatchParams {
                field_manager: Some(status::FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await?;
    metrics.count_write("gateway_secret_removal");
    scope.wrote(
        &written.namespace().unwrap_or_default(),
        &written.name_any(),
        written.metadata.resource_version,
    );
    Ok(())
}

/// Apply the credentials' status fields under their own field manager (an empty report removes
/// them).
async fn apply_status(
    scope: &Scope,
    mi: &MailIntegration,
    report: &status::Report,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let api: Api<MailIntegration> = Api::namespaced(
        scope.creds.client.clone(),
        &mi.namespace().unwrap_or_default(),
    );
    api.patch_status(
        &mi.name_any(),
        &PatchParams::apply(status::FIELD_MANAGER).force(),
        &Patch::Apply(&status::patch(mi, report, now)),
    )
    .await?;
    if let Some(uid) = mi.uid() {
        scope.memory().reports.insert(uid, report.clone());
    }
    Ok(())
}
