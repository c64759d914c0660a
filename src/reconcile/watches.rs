//! The watches and the kube-runtime `Controller` that runs [`reconcile`] over them: one per watched
//! namespace (or one for all), each with its caches (see [`super::cache`]).

use super::{
    cache::{self, Caches},
    cached_secret,
    context::{Context, Scoped},
    controller::{error_policy, reconcile},
};
use crate::{
    api::{INTEGRATION_LABEL, MailIntegration, OAUTH_CLIENT_LABEL},
    metrics::watches::{WatchHealth, WatchLabels, Watching},
};
use futures::{StreamExt, TryStreamExt as _};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::WatchParams,
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        reflector::{self, ObjectRef, Store, reflector},
        watcher::{self, Config as WatcherConfig, watcher},
    },
};
use std::{sync::Arc, time::Duration};
use tracing::info;

/// How the watches get their initial state. A streaming list (the initial objects as watch
/// events) keeps one object at a time in flight where a paged list holds whole pages of them; the
/// API server must allow it (the WatchList feature, on by default in Kubernetes 1.32 and from 1.34),
/// so one watch request asks first, and paged lists remain for a server that refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitialList {
    Streaming,
    Paged,
}

impl InitialList {
    pub async fn of(integrations: &Api<MailIntegration>) -> Self {
        // A selector no object has: the answer is the end-of-initial-events bookmark alone.
        let probe = WatchParams::streaming_lists()
            .labels("mailintegration.dev/initial-list-probe")
            .timeout(1);
        let streaming = match integrations.watch(&probe, "0").await {
            Ok(events) => {
                let mut events = std::pin::pin!(events);
                // The server refuses in the stream's first event or in the response itself.
                !matches!(
                    events.next().await,
                    Some(Err(_)) | Some(Ok(kube::api::WatchEvent::Error(_)))
                )
            }
            Err(_) => false,
        };
        let chosen = if streaming {
            Self::Streaming
        } else {
            Self::Paged
        };
        info!(initial_list = ?chosen, "how the watches list their objects");
        chosen
    }

    /// [`Self::of`], asked once per process (one API server): the gateway credentials' watches
    /// use the main controller's answer.
    pub async fn once(integrations: &Api<MailIntegration>) -> Self {
        static CHOSEN: tokio::sync::OnceCell<InitialList> = tokio::sync::OnceCell::const_new();
        *CHOSEN.get_or_init(|| Self::of(integrations)).await
    }

    pub fn config(self) -> WatcherConfig {
        match self {
            Self::Streaming => WatcherConfig::default().streaming_lists(),
            Self::Paged => WatcherConfig::default().any_semantic(),
        }
    }
}

/// The MailIntegrations whose client Secret or CA bundle is `secret` (same namespace, by name).
fn integrations_using(
    store: &Store<MailIntegration>,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<MailIntegration>> {
    integrations_where(store, namespace, |mi| {
        mi.spec.oauth.client_secret_ref.name == name
            || mi
                .spec
                .oauth
                .client_certificate_ref
                .as_ref()
                .is_some_and(|c| c.name == name)
            || names_ca(mi, name)
    })
}

/// Whether `spec.mailbox.caSecretRef` of `mi` names the Secret `name`.
pub fn names_ca(mi: &MailIntegration, name: &str) -> bool {
    mi.spec
        .mailbox
        .ca_secret_ref
        .as_ref()
        .is_some_and(|c| c.name == name)
}

/// The MailIntegrations of `namespace` in `store` for which `pred` holds (e.g. those naming a
/// Secret that changed), to reconcile.
pub fn integrations_where(
    store: &Store<MailIntegration>,
    namespace: Option<&str>,
    pred: impl Fn(&MailIntegration) -> bool,
) -> Vec<ObjectRef<MailIntegration>> {
    store
        .state()
        .into_iter()
        .filter(|mi| mi.namespace().as_deref() == namespace && pred(mi))
        .map(|mi| ObjectRef::from_obj(&*mi))
        .collect()
}

/// How the watches reconnect after an error (an API server outage, say): exponential from 0.8 s,
/// with jitter, up to 10 s between tries, reset by the next event. kube's default (client-go's:
/// up to 30 s, jitter doubling it) left the caches up to a minute behind an API server that was
/// back; three watches trying every 10 s are no load for one.
pub fn watch_backoff() -> kube::runtime::watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(800))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// `stream` with each of its results recorded in the watches' health (see
/// [`crate::metrics::watches`]): an event shows the watch working, an error failing.
fn observed<S, T>(
    watching: &Watching,
    stream: S,
) -> impl futures::Stream<Item = Result<T, watcher::Error>> + use<S, T>
where
    S: futures::Stream<Item = Result<T, watcher::Error>>,
{
    let health = watching.health().clone();
    let labels = watching.labels().clone();
    stream.inspect(move |r| health.observe(&labels, r.is_ok(), std::time::Instant::now()))
}

/// The client of one watch: `client`, with every answer of the API server with a 2xx status to
/// the watch's requests (its list, its watch) recorded as the watch working. A watch that resumes
/// after an error (the API server back) sends no event until an object changes: kube's watcher
/// re-opens the watch from the last resourceVersion and emits nothing, so only the answer to
/// that request shows that the watch works again.
fn watch_client(client: &kube::Client, watching: &Watching) -> kube::Client {
    let default_namespace = client.default_namespace().to_owned();
    kube::Client::new(
        Answered {
            client: client.clone(),
            health: watching.health().clone(),
            labels: watching.labels().clone(),
        },
        default_namespace,
    )
}

/// See [`watch_client`].
#[derive(Clone)]
struct Answered {
    client: kube::Client,
    health: Arc<WatchHealth>,
    labels: WatchLabels,
}

impl tower::Service<http::Request<kube::client::Body>> for Answered {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // `client` queues the request itself.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let response = this.client.send(request).await?;
            if response.status().is_success() {
                this.health
                    .observe(&this.labels, true, std::time::Instant::now());
            }
            Ok(response)
        })
    }
}

/// Run the controller until shutdown, over all namespaces (`namespaces` empty) or over each of
/// `namespaces` (one watch per namespace, so RBAC can be limited to them).
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    // One API server: asked once, in a namespace this process may watch.
    let probed: Api<MailIntegration> =
        scoped_api(ctx.client.clone(), namespaces.first().map(String::as_str));
    let initial = InitialList::once(&probed).await;
    if namespaces.is_empty() {
        run_one(ctx, None, initial, ready, stop).await;
    } else {
        // `--namespace a --namespace a` must not start two controllers for one namespace.
        let mut unique = namespaces;
        unique.sort();
        unique.dedup();
        futures::future::join_all(
            unique
                .into_iter()
                .map(|ns| run_one(ctx.clone(), Some(ns), initial, ready.clone(), stop.clone())),
        )
        .await;
    }
}

/// What the process remembers of an integration (backoff, held grants, marks, last calls) goes
/// with its deletion. An integration without the finalizer (no `revokeOnDelete`) is never
/// reconciled once deleted, so its watch event is the one place that sees it go. (One deleted
/// while a watch was down comes back in a re-list as absent, with no event: its memory stays
/// until the process ends.)
fn forget_deleted(ctx: &Context, event: &watcher::Event<MailIntegration>) {
    if let watcher::Event::Delete(mi) = event {
        ctx.forget(mi);
    }
}

/// `Api` of `namespace`, or of all namespaces.
pub fn scoped_api<K>(client: kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

async fn run_one(
    ctx: Arc<Context>,
    namespace: Option<String>,
    initial: InitialList,
    ready: Arc<std::sync::atomic::AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Each watch with a client of its own that records its answers (see `watch_client`); the
    // series of each shows from here (0: working).
    let watching = |watch: &str| {
        ctx.metrics.watches.start(WatchLabels {
            namespace: namespace.clone().unwrap_or_default(),
            watch: watch.to_owned(),
        })
    };
    let (watching_integrations, watching_owned, watching_marked) = (
        watching("integrations"),
        watching("owned_secrets"),
        watching("marked_secrets"),
    );
    let integrations: Api<MailIntegration> = scoped_api(
        watch_client(&ctx.client, &watching_integrations),
        namespace.as_deref(),
    );
    let secrets: Api<Secret> = scoped_api(
        watch_client(&ctx.client, &watching_owned),
        namespace.as_deref(),
    );
    let secret_metas: Api<PartialObjectMeta<Secret>> = scoped_api(
        watch_client(&ctx.client, &watching_marked),
        namespace.as_deref(),
    );
    // The integrations' cache, trimmed of what is never read (see `cache::trim_integration`).
    let (store, writer) = reflector::store();
    let deleted = ctx.clone();
    let integration_events = reflector(
        writer,
        observed(
            &watching_integrations,
            watcher(integrations, initial.config()).backoff(watch_backoff()),
        )
        .modify(cache::trim_integration)
        .map_ok(move |event| {
            forget_deleted(&deleted, &event);
            event
        }),
    )
    .applied_objects();
    // Per-object metrics are read from this cache at scrape time, while this controller runs.
    let _metrics = ctx.metrics.objects.register(store.clone());
    // Only Secrets with the operator's labels are watched: its own grant and token Secrets and
    // grants brought by hand (`mailintegration.dev/integration`, which names the integration),
    // kept with their data up to `cached_secret::MAX_HELD_BYTES` each; and the client Secrets and
    // CA bundles users marked for it, watched metadata-only (their data is read when a reconcile
    // needs it: see `super::marked`). Reconciles read them from these caches, and a change
    // triggers the integrations concerned within seconds; the cluster's other Secrets are never
    // listed.
    let (owned, owned_writer) = reflector::store();
    let (marked, marked_writer) = reflector::store();
    let caches = Caches::new(store.clone(), owned, marked.clone());
    let marked_data = caches.marked_data.clone();
    // The stores keep the compact form of each Secret (see `cached_secret`).
    let owned_events = cached_secret::reflector(
        owned_writer,
        observed(
            &watching_owned,
            watcher(secrets.clone(), initial.config().labels(INTEGRATION_LABEL))
                .backoff(watch_backoff()),
        ),
    )
    .touched_objects()
    .predicate_filter(
        kube::runtime::predicates::resource_version,
        Default::default(),
    );
    let marked_events = cached_secret::reflector(
        marked_writer,
        // An Api of PartialObjectMeta makes kube ask for metadata only (a PartialObjectMetadata
        // list and watch): the API server sends no data.
        observed(
            &watching_marked,
            watcher(
                secret_metas,
                initial
                    .config()
                    .labels(&format!("{OAUTH_CLIENT_LABEL}=true")),
            )
            .backoff(watch_backoff()),
        ),
    )
    .map_ok(move |event| {
        // Data read for a Secret that is gone (or no longer marked) is forgotten with it.
        match &event {
            watcher::Event::Delete(s) => marked_data.forget(
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default(),
            ),
            watcher::Event::InitDone => marked_data.retain_listed(&marked),
            _ => {}
        }
        event
    })
    .touched_objects()
    .predicate_filter(
        kube::runtime::predicates::resource_version,
        Default::default(),
    );
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let scoped = Arc::new(Scoped { ctx, caches, wake });
    let config = kube::runtime::controller::Config::default().concurrency(scoped.ctx.concurrency);
    Controller::for_stream(integration_events, store.clone())
        .with_config(config)
        .watches_stream(owned_events, |s: Secret| {
            let ns = s.namespace()?;
            let name = s.labels().get(INTEGRATION_LABEL)?.clone();
            Some(ObjectRef::new(&name).within(&ns))
        })
        .watches_stream(marked_events, move |s: PartialObjectMeta<Secret>| {
            integrations_using(&store, s.metadata.namespace.as_deref(), &s.name_any())
        })
        .reconcile_on(woken)
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, scoped)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::decide::Backoff;

    /// A Context whose Kubernetes client reaches nothing.
    fn offline_context() -> Context {
        let client = kube::Client::new(
            tower::service_fn(|_: http::Request<kube::client::Body>| async {
                Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("offline"))
            }),
            "default",
        );
        let oauth = crate::oauth::OAuthClient::new().unwrap();
        let providers = crate::provider::ProviderResolver::new(oauth.http_client().clone());
        Context::new(client, oauth, providers, Arc::default())
    }

    fn integration(uid: &str) -> MailIntegration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "team", "uid": uid},
            "spec": {"provider": "Google", "mailbox": {"address": "a@example.test"},
                "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn an_integration_deleted_without_a_finalizer_is_forgotten() {
        let ctx = offline_context();
        let (gone, kept) = (integration("u-gone"), integration("u-kept"));
        for uid in ["u-gone", "u-kept"] {
            ctx.set_backoff(
                uid,
                Some(Backoff {
                    failures: 2,
                    not_before: Some(jiff::Timestamp::now()),
                }),
            );
            ctx.note_call(uid, jiff::Timestamp::now());
        }
        forget_deleted(&ctx, &watcher::Event::Apply(kept.clone()));
        forget_deleted(&ctx, &watcher::Event::Delete(gone));
        assert!(!ctx.remembers("u-gone"));
        assert!(ctx.remembers("u-kept"));
    }
}
