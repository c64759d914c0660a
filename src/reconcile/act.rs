//! Reconcile, steps 2 and 3 (decide, act): store a refreshed grant held in memory before anything
//! else; otherwise run the decision ([`decide::decide_paced`]) and carry it out: a refresh under the
//! grant's lock, a template rendered again, or nothing.

use super::{
    cache::Kind,
    cached_secret::Held,
    decide::{self, Action as Decision, Outcome, RefreshCause},
    error::Stop,
    observe::{Read, Reader, lagging},
    observed::{self, Observed, PublishedToken},
    refresh::{self, refresh, store_pending},
    secrets,
};
use crate::api::MailIntegration;
use futures::future::BoxFuture;
use kube::runtime::controller::Action;
use std::time::Duration;

/// What the act step did: the outcome to report and the access token it published, if any.
pub(super) struct Acted {
    pub outcome: Outcome,
    pub new_token: Option<PublishedToken>,
}

impl From<Outcome> for Acted {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            new_token: None,
        }
    }
}

/// Decide and act on what was observed. A refresh's new grant version goes into `observed`.
pub(super) async fn act(
    mi: &MailIntegration,
    read: &Read,
    observed: &mut Observed<'_>,
    reader: &Reader<'_>,
) -> Result<Acted, Stop> {
    let ctx = reader.ctx;
    let uid = reader.uid.as_str();
    if let Some(pending) = ctx.pending(uid) {
        // A refreshed grant is held in memory: storing it comes before anything else.
        let lock = ctx.grant_locks.get(uid);
        let _guard = lock.lock().await;
        ctx.metrics.count_read("grant_secret");
        let current = reader.secrets.get_opt(&mi.grant_secret_name()).await?;
        let pending_store: BoxFuture<'_, Result<(), Outcome>> = Box::pin(store_pending(
            mi,
            &pending,
            current.as_ref(),
            &reader.secrets,
            observed.now,
            ctx,
        ));
        return match pending_store.await {
            // Stored: its write brings the next reconcile, which decides with the new grant.
            Ok(()) => Err(Stop::Done(Action::requeue(Duration::from_secs(1)))),
            Err(outcome) => Ok(outcome.into()),
        };
    }
    // A provider's backoff outlives the process that met it (see `super::remembered`).
    ctx.recall_backoff(
        uid,
        mi.status.as_ref().and_then(|s| s.provider_backoff.as_ref()),
        observed.now,
    );
    match decide::decide_paced(observed, ctx.backoff(uid), ctx.last_call(uid), ctx.pace) {
        Decision::Hold(Outcome::Idle) if mi.spec.token_secret.template.is_some() => {
            render_again(mi, read, observed, reader)
                .await
                .map(Into::into)
        }
        Decision::Hold(Outcome::Requeue(d)) => {
            // Only the pace defers a decision: the refresh (a request, say) waits for the
            // lowest refresh interval since the last call, and stays pending meanwhile.
            tracing::debug!(
                wait_s = d.as_secs(),
                "refresh deferred by the lowest refresh interval"
            );
            ctx.metrics.count_deferred("min_refresh_interval");
            Ok(Outcome::Requeue(d).into())
        }
        Decision::Hold(outcome) => Ok(outcome.into()),
        Decision::Refresh(cause) => refresh_locked(mi, read, observed, cause, reader).await,
    }
}

/// An idle integration with a template: the template may have changed since the token was
/// published, so it is rendered again (written only when the result changed).
async fn render_again(
    mi: &MailIntegration,
    read: &Read,
    observed: &Observed<'_>,
    reader: &Reader<'_>,
) -> Result<Outcome, Stop> {
    let ctx = reader.ctx;
    let (Some(current), Some(published)) = (read.token_secret.as_ref(), observed.token.as_ref())
    else {
        return Ok(Outcome::Idle);
    };
    match secrets::sync_template(
        mi,
        &reader.secrets,
        current,
        published,
        &ctx.metrics,
        &ctx.renderer,
    )
    .await
    {
        Ok(written) => {
            if let Some(version) = written {
                ctx.written.set(&reader.uid, Kind::Token, version);
            }
            Ok(Outcome::Idle)
        }
        Err(secrets::TokenSecretError::Kube(e)) => Err(e.into()),
        Err(e) => Ok(refresh::not_publishable(&e).unwrap_or(Outcome::Idle)),
    }
}

/// A refresh, under the grant's lock (one writer per grant in this process).
async fn refresh_locked(
    mi: &MailIntegration,
    read: &Read,
    observed: &mut Observed<'_>,
    cause: RefreshCause,
    reader: &Reader<'_>,
) -> Result<Acted, Stop> {
    let ctx = reader.ctx;
    let uid = reader.uid.as_str();
    let lock = ctx.grant_locks.get(uid);
    let _guard = lock.lock().await;
    // Under the lock, a sign-in by this process (which takes the same lock) or the previous
    // refresh may have replaced the grant since this reconcile looked at the cache; both leave
    // their version in `written`, and the cache is looked at again as at the start. The refresh
    // token presented must be the one stored now: a cache behind such a write waits for its event
    // (which brings the next reconcile), one behind for too long is read. Writes of other
    // processes are fenced by the write-ahead mark and the grant write's resourceVersion
    // precondition, as a read here would not close that window either.
    let written_now = ctx.written.get(uid);
    let grant_now = reader
        .owned(
            mi.grant_secret_name(),
            Kind::Grant,
            written_now.grant.clone(),
            written_now.recent(),
            true,
        )
        .await
        .map_err(|e| e.unwrap_or_else(|| lagging("grant Secret (under the lock)")))?
        .and_then(Held::into_secret)
        .filter(|s| observed::grant_belongs_to(s, mi));
    if grant_now.as_ref().map(|s| &s.metadata.resource_version)
        != read
            .grant_secret
            .as_ref()
            .map(|s| &s.metadata.resource_version)
    {
        // Decided on another grant than the one stored now: decide again.
        return Err(Stop::Done(Action::requeue(Duration::from_secs(1))));
    }
    let fut: BoxFuture<'_, refresh::RefreshResult> = Box::pin(refresh(
        mi,
        observed,
        cause,
        (grant_now.as_ref(), read.token_secret.as_ref()),
        &reader.secrets,
        ctx,
    ));
    let result = fut.await;
    ctx.written
        .set(uid, Kind::Grant, result.grant_version.clone());
    if let (Some(v), Some(g)) = (result.grant_version, observed.grant.as_mut()) {
        g.resource_version = Some(v);
    }
    Ok(Acted {
        outcome: result.outcome,
        new_token: result.published,
    })
}
