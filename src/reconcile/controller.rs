//! The act side of the reconciler: read the resource's Secrets, run the decision, call the provider
//! when it says so, and write only what changed.

use super::cached_secret::Held;
use super::inflight::Mark;
use super::refresh::{self, PendingGrant, backoff_delay, refresh, store_pending};
pub use super::refresh::{MAX_RETRY_AFTER, next_backoff};
use super::{
    cache::{self, Caches, Freshness, Kind, WrittenVersions},
    decide::{self, Action as Decision, Backoff, Outcome},
    finalizer,
    mailbox_check::{self, MailboxChecker, MailboxState},
    observed::{self, Observed},
    secrets,
    share::{NamespaceShare, SharePermit},
    slots::RefreshSlots,
};
use crate::lease::Fence;
use crate::sync::GrantLocks;
use crate::sync::LockExt as _;
use crate::{
    api::{MailIntegration, MailIntegrationStatus, condition},
    metrics::Metrics,
    oauth::OAuthClient,
    provider::ProviderResolver,
};
use futures::FutureExt as _;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Reporter},
        reflector::ObjectRef,
    },
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tracing::{instrument, warn};

/// Reconciles at once by default (see [`Context::concurrency`]; chosen from benches/README.md).
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "mail-integration-operator";

/// Errors that fail a reconcile (and are retried by the error policy). Provider failures are not
/// errors here: they are outcomes reported on the resource.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the resource has no namespace")]
    NoNamespace,
    /// A bug met by this resource's data: the reconcile is abandoned (and retried with backoff),
    /// the other resources go on.
    #[error("internal error while reconciling: {0}")]
    Panicked(String),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NoNamespace => "no_namespace",
            Error::Panicked(_) => "panic",
        }
    }
}

/// Links to the sign-in page; the web module provides it when the sign-in server runs.
pub trait SignInLinks: Send + Sync {
    fn link(&self, mi: &MailIntegration, now: Timestamp) -> Option<crate::api::SignInStatus>;
}

/// Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub oauth: OAuthClient,
    pub providers: ProviderResolver,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    /// Publishes the reconciler's events (without a cache: see [`super::events`]).
    pub(crate) recorder: super::events::EventPublisher,
    pub sign_in: Option<Arc<dyn SignInLinks>>,
    pub mailbox: Arc<MailboxChecker>,
    /// How long a failing revocation may delay a deletion (spec.revokeOnDelete).
    pub revoke_timeout: Duration,
    /// Whether this process may act as the leader ([`Fence::unfenced`] without leader election).
    pub fence: Arc<Fence>,
    /// Who this process is in write-ahead marks: `POD/NONCE`, unique per process.
    pub identity: String,
    /// One writer per grant in this process; shared with the sign-in server.
    pub grant_locks: Arc<GrantLocks>,
    /// Reconciles that run at once (`--concurrency`): bounds the memory and the API requests in
    /// flight when thousands of integrations are due together.
    pub concurrency: u16,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// Refreshed grants not stored yet, per UID.
    pending: Mutex<HashMap<String, PendingGrant>>,
    /// The mark of each UID's last attempt when the provider answered it without rotating.
    resolved_marks: Mutex<HashMap<String, Mark>>,
    /// Failed reconciles in a row, per resource UID (the error policy's backoff).
    errors: Mutex<HashMap<String, u32>>,
    /// The resourceVersions of this process's last writes, per UID (see [`cache::freshness`]);
    /// shared with the sign-in server, whose grant writes a refresh must not decide past.
    pub written: Arc<WrittenVersions>,
    /// The refreshes announced per second (see [`super::slots`]).
    pub(super) slots: RefreshSlots,
    /// How often an integration's token endpoint may be called (`--min-refresh-interval`).
    pub pace: decide::Pace,
    /// When this process last called each UID's token endpoint (see [`decide::decide_paced`]).
    last_calls: Mutex<HashMap<String, Timestamp>>,
    /// The reconciles one namespace may have waiting for a provider at once
    /// (`--max-namespace-share` of `--concurrency`; see [`super::share`]).
    pub provider_share: Arc<NamespaceShare>,
    /// Renders `spec.tokenSecret.template` in child processes (see [`super::template::sandbox`]).
    pub renderer: Arc<super::template::Renderer>,
}

impl Context {
    pub fn new(
        client: Client,
        oauth: OAuthClient,
        providers: ProviderResolver,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            mailbox: Arc::new(MailboxChecker::new(
                8,
                crate::mailbox::DEFAULT_TIMEOUT,
                metrics.clone(),
            )),
            client: client.clone(),
            oauth,
            providers,
            metrics,
            recorder: super::events::EventPublisher::new(client.clone(), reporter.clone()),
            reporter,
            sign_in: None,
            revoke_timeout: Duration::from_secs(300),
            fence: Arc::new(Fence::unfenced()),
            identity: format!(
                "{}/{:08x}",
                std::env::var("POD_NAME").unwrap_or_else(|_| FIELD_MANAGER.to_owned()),
                rand::random::<u32>()
            ),
            grant_locks: Arc::default(),
            concurrency: DEFAULT_CONCURRENCY,
            backoff: Mutex::default(),
            pending: Mutex::default(),
            resolved_marks: Mutex::default(),
            errors: Mutex::default(),
            written: Arc::default(),
            slots: RefreshSlots::default(),
            pace: decide::Pace::default(),
            last_calls: Mutex::default(),
            provider_share: NamespaceShare::new(super::share::share_of(
                usize::from(DEFAULT_CONCURRENCY),
                super::share::DEFAULT_MAX_NAMESPACE_SHARE,
            )),
            renderer: Arc::new(super::template::Renderer::of_this_binary()),
        }
    }

    /// When this process last called `uid`'s token endpoint.
    pub(super) fn last_call(&self, uid: &str) -> Option<Timestamp> {
        self.last_calls.locked().get(uid).copied()
    }

    /// Record a call of `uid`'s token endpoint, made now (whatever its answer will be).
    pub(super) fn note_call(&self, uid: &str, at: Timestamp) {
        self.last_calls.locked().insert(uid.to_owned(), at);
    }

    /// A unit of `mi`'s namespace's share of provider calls, or (`Err`) the outcome that defers
    /// the call: the namespace has its whole share waiting for providers now.
    pub(super) fn provider_permit(&self, mi: &MailIntegration) -> Result<SharePermit, Outcome> {
        let ns = mi.namespace().unwrap_or_default();
        self.provider_share.try_take(&ns).ok_or_else(|| {
            tracing::debug!(
                namespace = %ns,
                share = self.provider_share.limit(),
                "the namespace has its share of provider calls in flight: deferred"
            );
            self.metrics.count_deferred("namespace_share");
            Outcome::Requeue(super::share::deferral())
        })
    }

    pub(super) fn backoff(&self, uid: &str) -> Backoff {
        self.backoff.locked().get(uid).copied().unwrap_or_default()
    }

    pub(super) fn set_backoff(&self, uid: &str, b: Option<Backoff>) {
        let mut map = self.backoff.locked();
        match b {
            Some(b) => map.insert(uid.to_owned(), b),
            None => map.remove(uid),
        };
    }

    fn error_count(&self, mi: &MailIntegration) -> u32 {
        let uid = mi.uid().unwrap_or_default();
        self.errors.locked().get(&uid).copied().unwrap_or(0)
    }

    fn set_error_count(&self, mi: &MailIntegration, n: u32) {
        let uid = mi.uid().unwrap_or_default();
        let mut map = self.errors.locked();
        if n == 0 {
            map.remove(&uid);
        } else {
            map.insert(uid, n);
        }
    }

    pub(super) fn pending(&self, uid: &str) -> Option<PendingGrant> {
        self.pending.locked().get(uid).cloned()
    }

    pub(super) fn set_pending(&self, uid: &str, p: Option<PendingGrant>) {
        let mut map = self.pending.locked();
        match p {
            Some(p) => map.insert(uid.to_owned(), p),
            None => map.remove(uid),
        };
    }

    pub(super) fn resolved_mark(&self, uid: &str) -> Option<Mark> {
        self.resolved_marks.locked().get(uid).cloned()
    }

    pub(super) fn set_resolved_mark(&self, uid: &str, m: Option<Mark>) {
        let mut map = self.resolved_marks.locked();
        match m {
            Some(m) => map.insert(uid.to_owned(), m),
            None => map.remove(uid),
        };
    }

    pub(crate) fn forget(&self, mi: &MailIntegration) {
        if let Some(uid) = mi.uid() {
            self.mailbox.forget(&uid);
            self.set_backoff(&uid, None);
            self.grant_locks.remove(&uid);
            self.set_pending(&uid, None);
            self.set_resolved_mark(&uid, None);
            self.errors.locked().remove(&uid);
            self.written.forget(&uid);
            self.slots.hold(&uid, None);
            self.last_calls.locked().remove(&uid);
        }
    }
}

/// What one controller's reconciles share: the process's [`Context`] and that controller's caches.
pub struct Scoped {
    pub ctx: Arc<Context>,
    pub caches: Caches,
    /// Brings a reconcile of an integration (a mailbox check finished in the background).
    pub wake: futures::channel::mpsc::UnboundedSender<ObjectRef<MailIntegration>>,
}

#[instrument(skip_all, fields(integration = %format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any())))]
pub(super) async fn reconcile(
    mi: Arc<MailIntegration>,
    scoped: Arc<Scoped>,
) -> Result<Action, Error> {
    let ctx = &scoped.ctx;
    // Boxed as `dyn Future + Send`: works around rustc's higher-ranked Send inference for futures
    // that hold references across awaits.
    let started = std::time::Instant::now();
    let inner: futures::future::BoxFuture<'_, Result<Action, Error>> =
        Box::pin(reconcile_inner(&mi, ctx, &scoped.caches, &scoped.wake));
    // A panic on one tenant's data must not end the controller for every tenant: it fails this
    // reconcile only. (The arithmetic and parsing are written not to panic; this is the net.)
    let result = match std::panic::AssertUnwindSafe(inner).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(Error::Panicked(panic_message(payload.as_ref()))),
    };
    match &result {
        Ok(_) => ctx.set_error_count(&mi, 0),
        Err(_) => ctx.set_error_count(&mi, ctx.error_count(&mi).saturating_add(1)),
    }
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::ReconcileLabels {
            result: label.into(),
        })
        .inc();
    result
}

async fn reconcile_inner(
    cached: &MailIntegration,
    ctx: &Context,
    caches: &Caches,
    wake: &futures::channel::mpsc::UnboundedSender<ObjectRef<MailIntegration>>,
) -> Result<Action, Error> {
    let ns = cached.namespace().ok_or(Error::NoNamespace)?;
    if ctx.fence.check().is_err() {
        // Not (or no longer) the leader: no reads, no writes.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if !caches.secrets_ready(Duration::from_secs(30)).await {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let uid = cached.uid().unwrap_or_default();
    let written = ctx.written.get(&uid);
    let api: Api<MailIntegration> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // Decide on the watch cache, unless it has not caught up with this process's own last write:
    // deciding on the previous status would repeat a refresh that was just done (or retry a
    // permanent failure). That write's watch event is on its way and brings the next reconcile;
    // the requeue is only the fallback. A deletion is handled on the object as it is now.
    let lagging = |what: &str| {
        tracing::debug!(
            object = what,
            "the watch cache has not caught up with this process's write yet"
        );
        Ok(Action::requeue(Duration::from_secs(1)))
    };
    let fresh;
    let recent = written.recent();
    let mi: &MailIntegration = match cache::freshness(
        cached.resource_version().as_deref(),
        written.integration.as_deref(),
        recent,
    ) {
        Freshness::Lagging => return lagging("integration"),
        Freshness::Fresh if cached.meta().deletion_timestamp.is_none() => cached,
        Freshness::Fresh | Freshness::Unknown => {
            ctx.metrics.count_read("integration");
            let Some(got) = api.get_opt(&cached.name_any()).await? else {
                ctx.forget(cached);
                return Ok(Action::await_change());
            };
            ctx.written
                .read(&uid, Kind::Integration, got.resource_version());
            fresh = got;
            &fresh
        }
    };
    if mi.meta().deletion_timestamp.is_some() {
        let fut: futures::future::BoxFuture<'_, Result<Action, Error>> =
            Box::pin(finalizer::finalize(mi, &api, &secrets_api, ctx));
        return fut.await;
    }
    if finalizer::sync(mi, &api, ctx).await? {
        // The write triggers the next reconcile with the new object.
        return Ok(Action::await_change());
    }
    // The user's client Secret: a marked one from the metadata cache, its data read once per
    // version (see `super::marked`); one that is not there is read, so that the condition says
    // whether it is missing or only not marked. A marked Secret over the bound is not used.
    let client_name = &mi.spec.oauth.client_secret_ref.name;
    let client_secret =
        marked_or_read(caches, &secrets_api, &ns, client_name, "client_secret", ctx).await?;
    // A certificate credential's kubernetes.io/tls Secret, read the same way.
    let certificate = match &mi.spec.oauth.client_certificate_ref {
        None => None,
        Some(r) => marked_or_read(caches, &secrets_api, &ns, &r.name, "client_secret", ctx).await?,
    };
    // The grant and token Secrets from the cache of the operator's own; one that is not there is
    // read, because a Secret without the operator's label may hold the name (a conflict to report,
    // and never to overwrite).
    let owned = |name: String, kind: Kind, version: Option<String>, recent: bool| {
        let secrets_api = secrets_api.clone();
        let ns = ns.clone();
        let uid = &uid;
        async move {
            let cached = caches.owned_secret(&ns, &name);
            match cache::freshness(
                cached.as_ref().and_then(Held::resource_version),
                version.as_deref(),
                recent,
            ) {
                Freshness::Lagging => Err(None::<kube::Error>),
                Freshness::Fresh if cached.is_some() => Ok(cached),
                Freshness::Fresh | Freshness::Unknown => {
                    ctx.metrics.count_read(match kind {
                        Kind::Grant => "grant_secret",
                        _ => "token_secret",
                    });
                    let read = secrets_api.get_opt(&name).await.map_err(Some)?;
                    ctx.written.read(
                        uid,
                        kind,
                        read.as_ref()
                            .and_then(|s| s.metadata.resource_version.clone()),
                    );
                    // Bounded as the cache is, when labelled as the operator's; an unlabelled
                    // Secret under the name is a conflict, whatever its size.
                    Ok(read.map(|s| {
                        let labelled = observed::is_operator_managed(&s);
                        Held::of_read(s, labelled)
                    }))
                }
            }
        }
    };
    let grant_secret = match owned(mi.grant_secret_name(), Kind::Grant, written.grant, recent).await
    {
        Ok(s) => s,
        Err(None) => return lagging("grant Secret"),
        Err(Some(e)) => return Err(e.into()),
    };
    let token_secret = match owned(
        mi.spec.token_secret.name.clone(),
        Kind::Token,
        written.token,
        recent,
    )
    .await
    {
        Ok(s) => s,
        Err(None) => return lagging("token Secret"),
        Err(Some(e)) => return Err(e.into()),
    };

    let now = Timestamp::now();
    // A grant or token Secret over the bound is neither used nor written: said by name.
    let too_large = [&grant_secret, &token_secret]
        .into_iter()
        .flatten()
        .find_map(observed::too_large);
    let grant_secret = grant_secret.and_then(Held::into_secret);
    let token_secret = token_secret.and_then(Held::into_secret);
    let conflict =
        too_large.or_else(|| observed::conflicts(mi, grant_secret.as_ref(), token_secret.as_ref()));
    // A grant or token Secret that is not this integration's is neither used nor written.
    let grant_secret = grant_secret.filter(|s| observed::grant_belongs_to(s, mi));
    let token_secret = token_secret.filter(|s| observed::owned_by(s, mi));
    let observed = Observed {
        integration: mi,
        client: observed::client_held(&mi.spec, client_secret.as_ref(), certificate.as_ref()),
        // A permanent failure waits for either Secret to change.
        client_version: [client_secret.as_ref(), certificate.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.resource_version().map(str::to_owned))
            .reduce(|a, b| format!("{a}/{b}")),
        grant: observed::grant(grant_secret.as_ref()),
        token: observed::published_token(token_secret.as_ref(), now),
        conflict,
        now,
    };
    let mut observed = observed;
    let mut new_token = None;
    let outcome = if let Some(pending) = ctx.pending(&uid) {
        // A refreshed grant is held in memory: storing it comes before anything else.
        let lock = ctx.grant_locks.get(&uid);
        let _guard = lock.lock().await;
        ctx.metrics.count_read("grant_secret");
        let current = secrets_api.get_opt(&mi.grant_secret_name()).await?;
        let pending_store: futures::future::BoxFuture<'_, Result<(), Outcome>> = Box::pin(
            store_pending(mi, &pending, current.as_ref(), &secrets_api, now, ctx),
        );
        match pending_store.await {
            // Stored: its write brings the next reconcile, which decides with the new grant.
            Ok(()) => return Ok(Action::requeue(Duration::from_secs(1))),
            Err(outcome) => outcome,
        }
    } else {
        match decide::decide_paced(&observed, ctx.backoff(&uid), ctx.last_call(&uid), ctx.pace) {
            Decision::Hold(Outcome::Idle) if mi.spec.token_secret.template.is_some() => {
                // The template may have changed since the token was published: render again.
                match (token_secret.as_ref(), observed.token.as_ref()) {
                    (Some(current), Some(published)) => {
                        match secrets::sync_template(
                            mi,
                            &secrets_api,
                            current,
                            published,
                            &ctx.metrics,
                            &ctx.renderer,
                        )
                        .await
                        {
                            Ok(written) => {
                                if let Some(version) = written {
                                    ctx.written.set(&uid, super::cache::Kind::Token, version);
                                }
                                Outcome::Idle
                            }
                            Err(secrets::TokenSecretError::Kube(e)) => return Err(e.into()),
                            Err(e) => refresh::not_publishable(&e).unwrap_or(Outcome::Idle),
                        }
                    }
                    _ => Outcome::Idle,
                }
            }
            Decision::Hold(Outcome::Requeue(d)) => {
                // Only the pace defers a decision: the refresh (a request, say) waits for the
                // lowest refresh interval since the last call, and stays pending meanwhile.
                tracing::debug!(
                    wait_s = d.as_secs(),
                    "refresh deferred by the lowest refresh interval"
                );
                ctx.metrics.count_deferred("min_refresh_interval");
                Outcome::Requeue(d)
            }
            Decision::Hold(outcome) => outcome,
            Decision::Refresh(cause) => {
                let lock = ctx.grant_locks.get(&uid);
                let _guard = lock.lock().await;
                // Under the lock, a sign-in by this process (which takes the same lock) or the
                // previous refresh may have replaced the grant since this reconcile looked at the
                // cache; both leave their version in `written`, and the cache is looked at again
                // as at the start. The refresh token presented must be the one stored now: a cache
                // behind such a write waits for its event (which brings the next reconcile), one
                // behind for too long is read. Writes of other processes are fenced by the
                // write-ahead mark and the grant write's resourceVersion precondition, as a read
                // here would not close that window either.
                let written_now = ctx.written.get(&uid);
                let grant_now = match owned(
                    mi.grant_secret_name(),
                    Kind::Grant,
                    written_now.grant.clone(),
                    written_now.recent(),
                )
                .await
                {
                    Ok(s) => s
                        .and_then(Held::into_secret)
                        .filter(|s| observed::grant_belongs_to(s, mi)),
                    Err(None) => return lagging("grant Secret (under the lock)"),
                    Err(Some(e)) => return Err(e.into()),
                };
                if grant_now.as_ref().map(|s| &s.metadata.resource_version)
                    != grant_secret.as_ref().map(|s| &s.metadata.resource_version)
                {
                    // Decided on another grant than the one stored now: decide again.
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                let fut: futures::future::BoxFuture<'_, refresh::RefreshResult> =
                    Box::pin(refresh(
                        mi,
                        &observed,
                        cause,
                        (grant_now.as_ref(), token_secret.as_ref()),
                        &secrets_api,
                        ctx,
                    ));
                let result = fut.await;
                new_token = result.published;
                ctx.written
                    .set(&uid, Kind::Grant, result.grant_version.clone());
                if let (Some(v), Some(g)) = (result.grant_version, observed.grant.as_mut()) {
                    g.resource_version = Some(v);
                }
                result.outcome
            }
        }
    };
    if matches!(outcome, Outcome::Requeue(_)) || ctx.fence.check().is_err() {
        // Nothing to report (or no longer the leader): leave the status to the next decision.
        let Outcome::Requeue(d) = outcome else {
            return Ok(Action::requeue(Duration::from_secs(5)));
        };
        return Ok(Action::requeue(d));
    }
    let sign_in = match (&outcome, &ctx.sign_in) {
        // Nobody signs in to an app-only integration: a link would only mislead.
        (o, Some(links))
            if mi.spec.interactive() && decide::needs_sign_in(o, mi.status.as_ref()) =>
        {
            // Keep a link that is still valid for a while, so that idle reconciles write nothing.
            let current = mi.status.as_ref().and_then(|s| s.sign_in.clone());
            match current {
                Some(c) if c.expires_at.0 > crate::time::after(now, Duration::from_secs(600)) => {
                    Some(c)
                }
                _ => links.link(mi, now),
            }
        }
        _ => None,
    };
    let mut status = decide::status_after_paced(&observed, &outcome, sign_in, ctx.pace);
    let check_token = new_token
        .as_ref()
        .or(observed.token.as_ref())
        .map(|t| (&t.access_token, t.expires_at));
    let mailbox_state = if matches!(
        outcome,
        Outcome::ClientSecret(_)
            | Outcome::Conflict(_)
            | Outcome::SignInRequired
            | Outcome::Suspended
    ) {
        None
    } else {
        let ca = read_ca(mi, caches, &secrets_api, ctx).await;
        match ca {
            Ok(ca) => {
                // Off the refresh path: the status reports the last finished check, and a check
                // that finishes brings the next reconcile.
                let (wake, target) = (wake.clone(), ObjectRef::from_obj(mi));
                ctx.mailbox
                    .state_in_background(mi, check_token, ca, now, move || {
                        let _ = wake.unbounded_send(target);
                    })
            }
            Err(state) => Some(state),
        }
    };
    mailbox_check::apply(
        &mut status,
        mailbox_state.as_ref(),
        mi.metadata.generation,
        now,
    );
    super::lifetime::apply(
        &mut status,
        // Only a Secret the user marked for the operator (and not one of its own) is read.
        super::lifetime::client_secret_expiry(
            client_secret.as_ref().and_then(Held::secret).filter(|s| {
                observed::is_marked_for_operator(s) && !observed::is_operator_managed(s)
            }),
        ),
        observed
            .grant
            .as_ref()
            .and_then(|g| g.refresh_token_expires_at),
        mi.metadata.generation,
        now,
    );
    // The time of the last mailbox check goes out with the status's other changes; a check that
    // changed nothing else writes nothing.
    let reported_check = mi
        .status
        .as_ref()
        .and_then(|s| s.mailbox_checked_at.clone());
    let checked_at = match mailbox_state {
        Some(MailboxState::NotConfigured) => None,
        _ => ctx
            .mailbox
            .checked_at(mi)
            .map(Time)
            .or_else(|| reported_check.clone()),
    };
    // Compared with the check time as reported, then the current one is what is written.
    status.mailbox_checked_at = reported_check;
    // The load of every second is known again after a restart as the statuses are reconciled.
    ctx.slots
        .hold(&uid, status.next_refresh_time.as_ref().map(|t| t.0));
    let unchanged = mi.status.as_ref() == Some(&status);
    status.mailbox_checked_at = checked_at;
    if !unchanged {
        // Server-side apply: fields this manager set before and now omits (failedInputs, signIn)
        // are removed, which a merge patch would not do. status.lastSignInFailure belongs to the
        // sign-in server (its own field manager): it is never applied here, only read, and
        // removed with a merge patch once it no longer matters.
        let mut applied = status.clone();
        applied.last_sign_in_failure = None;
        // status.gateway belongs to the gateway (apps, its own field manager) and to the gateway
        // credentials (rotationHandled): never applied here, so never taken over or removed.
        applied.gateway = None;
        let patch = serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "status": applied,
        });
        let after = api
            .patch_status(
                &mi.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.written
            .set(&uid, Kind::Integration, after.resource_version());
        let stale_failure = mi
            .status
            .as_ref()
            .is_some_and(|s| s.last_sign_in_failure.is_some())
            && status.last_sign_in_failure.is_none();
        if stale_failure {
            let clear = serde_json::json!({ "status": { "lastSignInFailure": null } });
            let after = api
                .patch_status(
                    &mi.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&clear),
                )
                .await?;
            ctx.written
                .set(&uid, Kind::Integration, after.resource_version());
        }
        ctx.metrics.count_write("status");
        publish_events(mi, mi.status.as_ref(), &status, ctx).await;
    }
    let mut requeue = decide::requeue_after(&observed, &status, &outcome, ctx.backoff(&uid));
    if let Some(at) = ctx
        .mailbox
        .next_check_at(mi)
        .filter(|_| mailbox_state.is_some())
    {
        let until = Duration::try_from(at.duration_since(now))
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        requeue = Some(requeue.map_or(until, |r| r.min(until)));
    }
    Ok(match requeue {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

/// A Secret the spec names as a client Secret, certificate or CA bundle: from the marked Secrets'
/// cache (its data read once per version, over the bound a marker), else read (`what` counts the
/// read) so that the condition can say whether it is missing or only not marked.
async fn marked_or_read(
    caches: &Caches,
    secrets: &Api<Secret>,
    ns: &str,
    name: &str,
    what: &'static str,
    ctx: &Context,
) -> Result<Option<Held>, kube::Error> {
    let read = || async {
        ctx.metrics.count_read(what);
        secrets.get_opt(name).await
    };
    if let Some(held) = caches.marked_secret(ns, name, read).await? {
        return Ok(Some(held));
    }
    ctx.metrics.count_read(what);
    Ok(secrets.get_opt(name).await?.map(|s| {
        // Marked but not in the cache yet: the same bound.
        let marked = observed::is_marked_for_operator(&s);
        Held::of_read(s, marked)
    }))
}

/// The extra CA bundle named by spec.mailbox.caSecretRef; a missing Secret or key is a TLS problem
/// of the check, reported as such.
async fn read_ca(
    mi: &MailIntegration,
    caches: &Caches,
    secrets: &Api<Secret>,
    ctx: &Context,
) -> Result<Option<Vec<u8>>, MailboxState> {
    let Some((name, key)) = mailbox_check::ca_key(mi) else {
        return Ok(None);
    };
    let ns = mi.namespace().unwrap_or_default();
    let got = marked_or_read(caches, secrets, &ns, name, "ca_secret", ctx).await;
    let missing = |what: String| MailboxState::Failed {
        reason: "TLSError".into(),
        message: format!(
            "{what} (named by spec.mailbox.caSecretRef): create it with the PEM CA certificates of the mail server"
        ),
    };
    match got {
        Ok(Some(Held::TooLarge { bytes, .. })) => Err(MailboxState::Failed {
            reason: crate::reason::Reason::ClientSecretTooLarge.as_str().into(),
            message: observed::too_large_message(name, "spec.mailbox.caSecretRef", bytes),
        }),
        Ok(Some(Held::Secret(s))) if !observed::is_marked_for_operator(&s) => {
            Err(MailboxState::Failed {
                reason: crate::reason::Reason::ClientSecretNotMarked.as_str().into(),
                message: format!(
                    "Secret {name:?} (named by spec.mailbox.caSecretRef) is not marked for the operator, which reads only Secrets labelled {label}=true: run kubectl label secret {name} -n {ns} {label}=true",
                    label = crate::api::OAUTH_CLIENT_LABEL,
                    ns = mi.namespace().unwrap_or_default(),
                ),
            })
        }
        Ok(Some(Held::Secret(s))) => match s.data.and_then(|d| d.get(key).map(|b| b.0.clone())) {
            Some(pem) if !pem.is_empty() => Ok(Some(pem)),
            _ => Err(missing(format!("Secret {name:?} has no key {key:?}"))),
        },
        Ok(None) => Err(missing(format!("Secret {name:?} does not exist"))),
        Err(e) => Err(MailboxState::Failed {
            reason: "TLSError".into(),
            message: format!("could not read Secret {name:?}: {e}"),
        }),
    }
}

/// Events for changes a human cares about (first success, failure, recovery) — compared on the
/// (status, reason) of Ready, Authorized and Reconciling, so a routine refresh emits nothing.
async fn publish_events(
    mi: &MailIntegration,
    old: Option<&MailIntegrationStatus>,
    new: &MailIntegrationStatus,
    ctx: &Context,
) {
    let recorder = &ctx.recorder;
    let reference = mi.object_ref(&());
    for t in [
        condition::READY,
        condition::AUTHORIZED,
        condition::RECONCILING,
    ] {
        let before = old
            .and_then(|s| decide::find_condition(s, t))
            .map(|c| (c.status.as_str(), c.reason.as_str()));
        let Some(after) = decide::find_condition(new, t) else {
            continue;
        };
        if before == Some((after.status.as_str(), after.reason.as_str())) {
            continue;
        }
        if t == condition::RECONCILING
            && after.status == "False"
            && before.is_none_or(|b| b.0 == "False")
        {
            continue;
        }
        let healthy = match t {
            condition::RECONCILING => after.status == "False",
            _ => after.status == "True",
        };
        if !healthy
            && t != condition::READY
            && decide::find_condition(new, condition::READY)
                .is_some_and(|r| r.reason == after.reason)
        {
            // The same failure is already told by the Ready event.
            continue;
        }
        let reason = if t == condition::RECONCILING && healthy {
            "Recovered".to_owned()
        } else {
            after.reason.clone()
        };
        let event = Event {
            type_: if healthy {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason,
            note: Some(
                format!("{t}={}: {}", after.status, after.message)
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            warn!(error = %e, "could not publish an event");
        } else {
            ctx.metrics.count_write("event");
        }
    }
}

/// The text of a panic payload (a `&str` or `String`), cut to 200 characters.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    text.chars().take(200).collect()
}

pub(super) fn error_policy(mi: Arc<MailIntegration>, error: &Error, scoped: Arc<Scoped>) -> Action {
    let ctx = &scoped.ctx;
    warn!(integration = %format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any()), %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    // Per object and growing, so that an API server brownout does not become a request storm.
    Action::requeue(backoff_delay(ctx.error_count(&mi).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_payload_becomes_a_bounded_message() {
        let long = "x".repeat(1000);
        let payload: Box<dyn std::any::Any + Send> = Box::new(long);
        assert_eq!(panic_message(payload.as_ref()).len(), 200);
        let payload: Box<dyn std::any::Any + Send> = Box::new("overflow");
        assert_eq!(panic_message(payload.as_ref()), "overflow");
    }
}
