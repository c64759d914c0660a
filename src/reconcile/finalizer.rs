//! `spec.revokeOnDelete`: a finalizer that revokes the grant at the provider (RFC 7009) before the
//! resource goes. A provider that keeps failing delays the deletion only for a bounded time; then an
//! event says what was not revoked, and the resource goes anyway.

use super::{context::Context, decide::Outcome, error::Error, observed, refresh::next_backoff};
use crate::{
    api::MailIntegration,
    oauth::{Carrying, RevokeOutcome, TokenTypeHint},
    provider::TokenOperation,
    secret::SecretValue,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};
use std::time::Duration;
use tracing::{info, warn};

/// The finalizer the operator puts on integrations with `spec.revokeOnDelete: true`.
pub const FINALIZER: &str = "mailintegration.dev/revoke-grant";

fn has_finalizer(mi: &MailIntegration) -> bool {
    mi.finalizers().iter().any(|f| f == FINALIZER)
}

/// Add or remove the finalizer to match the spec (not while deleting). Returns whether it wrote.
pub async fn sync(
    mi: &MailIntegration,
    api: &Api<MailIntegration>,
    ctx: &Context,
) -> Result<bool, Error> {
    let wanted = mi.spec.revoke_on_delete.unwrap_or(false);
    if mi.meta().deletion_timestamp.is_some() || wanted == has_finalizer(mi) {
        return Ok(false);
    }
    let mut finalizers: Vec<String> = mi
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if wanted {
        finalizers.push(FINALIZER.to_owned());
    }
    match write(mi, api, finalizers).await {
        Ok(version) => {
            // The next reconcile waits for the cache to hold this write (see `cache::freshness`).
            ctx.written.set(
                &mi.uid().unwrap_or_default(),
                super::cache::Kind::Integration,
                version,
            );
        }
        // The object changed since the watch cache saw it: its event brings the next reconcile.
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => return Ok(true),
        Err(e) => return Err(e),
    }
    ctx.metrics.count_write("finalizer");
    Ok(true)
}

async fn write(
    mi: &MailIntegration,
    api: &Api<MailIntegration>,
    finalizers: Vec<String>,
) -> Result<Option<String>, Error> {
    // The resourceVersion makes it an optimistic-concurrency write: another finalizer added or
    // removed meanwhile is not overwritten. A PATCH of the main resource (not /status, which ignores
    // metadata): the chart grants `patch` on mailintegrations for this write only.
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": mi.resource_version()}
    });
    let written = api
        .patch(
            &mi.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(written.resource_version())
}

/// Handle a deletion: revoke, then let the resource go.
pub async fn finalize(
    mi: &MailIntegration,
    api: &Api<MailIntegration>,
    secrets: &Api<Secret>,
    ctx: &Context,
) -> Result<Action, Error> {
    if !has_finalizer(mi) {
        ctx.forget(mi);
        return Ok(Action::await_change());
    }
    let recorder = &ctx.recorder;
    let reference = mi.object_ref(&());
    // The revocation endpoint is a server the spec names: at most the namespace's share of
    // reconciles wait for providers at once; over it, the deletion waits a few seconds.
    let permit = match ctx.provider_permit(mi) {
        Ok(p) => p,
        Err(Outcome::Requeue(d)) => return Ok(Action::requeue(d)),
        Err(_) => return Ok(Action::requeue(super::share::deferral())),
    };
    let result = revoke(mi, secrets, ctx).await;
    drop(permit);
    let uid = mi.uid().unwrap_or_default();
    let (event_type, reason, note) = match result {
        Ok(RevokeOutcome::Revoked) | Ok(RevokeOutcome::AlreadyInvalid) => {
            (EventType::Normal, "GrantRevoked", "the grant was revoked at the provider".to_owned())
        }
        Ok(RevokeOutcome::NoRevocationEndpoint) => (
            EventType::Warning,
            "RevocationNotSupported",
            "the provider has no revocation endpoint: remove the app's access for the account at the provider".to_owned(),
        ),
        Err(NotRevoked::Refused(refusal)) => {
            warn!(reason = refusal.reason.as_str(), message = %refusal.message, "the grant may not be sent to that revocation endpoint; not revoking");
            (EventType::Warning, refusal.reason.as_str(), refusal.message)
        }
        Err(NotRevoked::Failed(message)) => {
            let since = mi.meta().deletion_timestamp.as_ref().map(|t| Timestamp::now().duration_since(t.0)).unwrap_or_default();
            let deadline = SignedDuration::try_from(ctx.revoke_timeout).unwrap_or(SignedDuration::ZERO);
            if since < deadline {
                // The same backoff as a refresh's (5 s doubling to 5 min, jittered), and never
                // past the deadline: the last try comes at it.
                let (backoff, delay) = next_backoff(ctx.backoff(&uid), None, Timestamp::now());
                ctx.set_backoff(&uid, Some(backoff));
                let left = deadline
                    .checked_sub(since)
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or_default();
                let delay = delay.min(left).max(Duration::from_secs(1));
                warn!(%message, retry_in_s = delay.as_secs(), "revoking the grant failed; retrying");
                return Ok(Action::requeue(delay));
            }
            let note = format!(
                "the grant of {} was NOT revoked at the provider (tried for {}s: {message}); revoke the app's access for the account at the provider by hand",
                mi.spec.mailbox.address,
                since.as_secs()
            );
            (EventType::Warning, "RevocationFailed", note)
        }
        Err(NotRevoked::Nothing) => (EventType::Normal, "NothingToRevoke", "no grant was stored, nothing to revoke".to_owned()),
    };
    info!(reason, "letting the resource go");
    let event = Event {
        type_: event_type,
        reason: reason.into(),
        note: Some(note),
        action: "Finalize".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        warn!(error = %e, "could not publish an event");
    }
    let rest: Vec<String> = mi
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let _ = write(mi, api, rest).await?;
    ctx.forget(mi);
    Ok(Action::await_change())
}

/// The refresh token that is live at the provider: the one `stored` in the grant Secret, unless
/// a refresh that presented it got a rotated one that is `held` in memory, not stored yet
/// (`GrantNotStored`): then `stored` is spent, and revoking it would leave the live one working.
pub fn live_refresh_token<'a>(
    stored: &'a SecretValue,
    held: Option<&'a super::refresh::PendingGrant>,
) -> &'a SecretValue {
    match held {
        Some(h) if h.presented == *stored => &h.refresh_token,
        _ => stored,
    }
}

/// Why nothing was revoked.
enum NotRevoked {
    /// No grant is stored.
    Nothing,
    /// The attempt failed (retried until `--revoke-timeout`).
    Failed(String),
    /// The binding check refused the destination: retrying cannot help.
    Refused(crate::oauth::binding::Refusal),
}

async fn revoke(
    mi: &MailIntegration,
    secrets: &Api<Secret>,
    ctx: &Context,
) -> Result<RevokeOutcome, NotRevoked> {
    let failed = |e: &dyn std::fmt::Display| NotRevoked::Failed(e.to_string());
    let grant_secret = secrets
        .get_opt(&mi.grant_secret_name())
        .await
        .map_err(|e| failed(&e))?;
    // Only this integration's own grant is revoked (never a Secret that merely has its name).
    let grant_secret = grant_secret.filter(|s| observed::grant_belongs_to(s, mi));
    let grant = observed::grant(grant_secret.as_ref()).ok_or(NotRevoked::Nothing)?;
    let client_secret = secrets
        .get_opt(&mi.spec.oauth.client_secret_ref.name)
        .await
        .map_err(|e| failed(&e))?;
    // A client that authenticates with a certificate revokes with a client assertion, as it
    // refreshes.
    let certificate = match &mi.spec.oauth.client_certificate_ref {
        Some(r) => secrets.get_opt(&r.name).await.map_err(|e| failed(&e))?,
        None => None,
    };
    let creds = observed::client(&mi.spec, client_secret.as_ref(), certificate.as_ref())
        .map_err(|e| failed(&e))?;
    let endpoints = ctx
        .providers
        .resolve(&mi.spec)
        .await
        .map_err(|e| failed(&e))?;
    // The revocation endpoint recorded with the grant, else the one the spec leads to (which the
    // binding check accepts only on the server that issued the grant).
    let recorded = grant
        .revocation_endpoint
        .as_deref()
        .map(url::Url::parse)
        .transpose()
        .map_err(|e| {
            failed(&format!(
                "the grant's recorded revocation endpoint is not a URL ({e})"
            ))
        })?;
    let Some(dest) = recorded.or_else(|| endpoints.revocation.clone()) else {
        return Ok(RevokeOutcome::NoRevocationEndpoint);
    };
    let carrying = Carrying::Grant {
        origin: grant.origin(),
        mailbox: mi.spec.sign_in_account(),
    };
    let bound = ctx
        .providers
        .bind(
            TokenOperation::Revocation,
            &dest,
            &endpoints,
            &creds,
            carrying,
        )
        .map_err(NotRevoked::Refused)?;
    let held = ctx.pending(&mi.uid().unwrap_or_default());
    ctx.oauth
        .revoke(
            &bound,
            live_refresh_token(&grant.refresh_token, held.as_ref()),
            TokenTypeHint::RefreshToken,
            Timestamp::now(),
        )
        .await
        .map_err(|e| failed(&e))
}

#[cfg(test)]
mod live_token_tests {
    use super::*;
    use crate::reconcile::refresh::PendingGrant;

    #[test]
    fn a_rotation_held_in_memory_is_revoked_not_the_spent_token() {
        let spent = SecretValue::new("rt-1");
        let live = SecretValue::new("rt-2");
        let mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "team", "uid": "u"},
            "spec": {"provider": "Google", "mailbox": {"address": "a@example.test"},
                "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}}
        }))
        .unwrap();
        let held = PendingGrant {
            integration: Box::new(mi),
            presented: spent.clone(),
            refresh_token: live.clone(),
            rotated: true,
            extra: vec![],
        };
        assert_eq!(live_refresh_token(&spent, Some(&held)), &live);
        assert_eq!(live_refresh_token(&spent, None), &spent);
        // A grant stored since (a sign-in): the held token belongs to the grant it replaced.
        let signed_in = SecretValue::new("rt-new");
        assert_eq!(live_refresh_token(&signed_in, Some(&held)), &signed_in);
    }
}
