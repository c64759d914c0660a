//! The reconcile of one integration, as the kube-runtime `Controller` calls it: observe
//! ([`super::observe`]), decide and act ([`super::act`]), report ([`super::report`]); a panic on one
//! tenant's data fails only that reconcile; the error policy's backoff.

pub use super::refresh::{MAX_RETRY_AFTER, next_backoff};
use super::{
    act,
    cache::Caches,
    context::{Context, Scoped},
    error::{Error, Stop},
    finalizer,
    observe::{self, Reader},
    refresh::backoff_delay,
    report::{self, Wake},
};
use crate::api::MailIntegration;
use futures::{FutureExt as _, future::BoxFuture};
use kube::{Api, Resource, ResourceExt, runtime::controller::Action};
use std::{sync::Arc, time::Duration};
use tracing::{instrument, warn};

#[instrument(skip_all, fields(integration = %format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any())))]
pub(super) async fn reconcile(
    mi: Arc<MailIntegration>,
    scoped: Arc<Scoped>,
) -> Result<Action, Error> {
    let ctx = &scoped.ctx;
    // Boxed as `dyn Future + Send`: works around rustc's higher-ranked Send inference for futures
    // that hold references across awaits.
    let started = std::time::Instant::now();
    let inner: BoxFuture<'_, Result<Action, Error>> = Box::pin(
        reconcile_inner(&mi, ctx, &scoped.caches, &scoped.wake).map(|r| match r {
            Ok(action) | Err(Stop::Done(action)) => Ok(action),
            Err(Stop::Failed(e)) => Err(e),
        }),
    );
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
    wake: &Wake,
) -> Result<Action, Stop> {
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
    let reader = Reader {
        ctx,
        caches,
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        ns,
        uid,
    };
    // 1. Observe: the integration as it is now (a deletion is handled on it), then its Secrets.
    let fresh = observe::integration(cached, &api, &written, &reader).await?;
    let mi = fresh.as_ref().unwrap_or(cached);
    if mi.meta().deletion_timestamp.is_some() {
        let fut: BoxFuture<'_, Result<Action, Error>> =
            Box::pin(finalizer::finalize(mi, &api, &reader.secrets, ctx));
        return Ok(fut.await?);
    }
    if finalizer::sync(mi, &api, ctx).await? {
        // The write triggers the next reconcile with the new object.
        return Ok(Action::await_change());
    }
    let (read, mut observed) = observe::observe(mi, written, &reader).await?;
    // spec.grantDeletionPolicy: the grant goes with the integration (Delete) or stays (Retain).
    if let Some(grant) = read.grant_secret.as_ref()
        && super::secrets::owner::sync(mi, grant, &reader.secrets, ctx).await?
    {
        return Ok(Action::await_change());
    }
    // 2 and 3. Decide and act: store a grant held in memory, refresh, render, or hold.
    let acted = act::act(mi, &read, &mut observed, &reader).await?;
    // 4 and 5. Report the outcome (written only when it changed) and say when to come back.
    Ok(report::report(mi, &read, &observed, acted, &reader, wake).await?)
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
