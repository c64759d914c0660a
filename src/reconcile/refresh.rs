//! One refresh: check that the grant may be used here, call the token endpoint, store a rotated
//! refresh token before anything else, publish the access token; and the backoff of transient
//! failures.

use super::{
    controller::Context,
    decide::{Backoff, Outcome, RefreshCause},
    observed::{Observed, PublishedToken, grant_keys},
    secrets,
};
use crate::{api::MailIntegration, metrics::RefreshLabels, provider::FailureClass};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The longest `Retry-After` believed. A provider (or a server a tenant names) asking for more, up to
/// the absurd, is retried after this: an answer must not park an integration for years, nor
/// overflow the clock.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The delay after `failures` failures in a row: 5 s doubling to 5 min, ±20 % jitter, so that
/// many integrations failing together do not retry in the same second. Used for provider failures
/// ([`next_backoff`]) and for failed reconciles (the controller's error policy).
pub fn backoff_delay(failures: u32) -> Duration {
    let base = Duration::from_secs(5)
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(6)))
        .min(Duration::from_secs(300));
    base.mul_f64(rand::random_range(0.8..1.2))
}

/// Transient-failure backoff: [`backoff_delay`], never sooner than Retry-After (itself capped at
/// [`MAX_RETRY_AFTER`]).
pub fn next_backoff(
    prev: Backoff,
    retry_after: Option<Duration>,
    now: Timestamp,
) -> (Backoff, Duration) {
    let failures = prev.failures.saturating_add(1);
    let delay = backoff_delay(failures).max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
    let not_before = crate::time::after(now, delay);
    (
        Backoff {
            failures,
            not_before: Some(not_before),
        },
        delay,
    )
}

/// Call the token endpoint and publish the result. Never loses a rotated refresh token: it is stored
/// in the grant Secret (optimistic concurrency, retried until it lands) before anything else.
pub(super) async fn refresh(
    mi: &MailIntegration,
    o: &Observed<'_>,
    cause: RefreshCause,
    (grant_secret, token_secret): (Option<&Secret>, Option<&Secret>),
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> (Outcome, Option<PublishedToken>) {
    let uid = mi.uid().unwrap_or_default();
    let (Ok(creds), Some(grant)) = (&o.client, &o.grant) else {
        // decide() refreshes only with client credentials and a grant.
        return (Outcome::SignInRequired, None);
    };
    info!(?cause, "refreshing the access token");
    let endpoints = match ctx.providers.resolve(&mi.spec).await {
        Ok(e) => e,
        Err(class) => return (failure_outcome(mi, class, o.now, ctx), None),
    };
    if let Some(message) = grant.bound_elsewhere(
        endpoints.token.as_str(),
        &creds.client_id,
        &mi.spec.mailbox.address,
    ) {
        warn!(%message, "the grant was issued elsewhere; not sending it");
        ctx.set_backoff(&uid, None);
        return (
            Outcome::PermanentFailure {
                reason: crate::reason::Reason::GrantBoundElsewhere.as_str().into(),
                message,
            },
            None,
        );
    }
    let started = Instant::now();
    let scopes = crate::provider::refresh_scopes(&mi.spec);
    let result = ctx
        .oauth
        .refresh(&endpoints, creds, &grant.refresh_token, &scopes, o.now)
        .await;
    ctx.metrics
        .refresh_duration
        .observe(started.elapsed().as_secs_f64());
    let token = match result {
        Ok(t) => t,
        Err(e) => return (failure_outcome(mi, e.class, o.now, ctx), None),
    };
    let rotated = token
        .refresh_token
        .as_ref()
        .filter(|rt| **rt != grant.refresh_token);
    // A grant brought by hand is bound to where it first worked, in the same write as a rotation.
    let mut extra = Vec::new();
    if !grant.is_bound() {
        extra.push((grant_keys::TOKEN_ENDPOINT, endpoints.token.to_string()));
        extra.push((grant_keys::CLIENT_ID, creds.client_id.clone()));
    }
    if rotated.is_some() || !extra.is_empty() {
        let refresh_token = rotated.unwrap_or(&grant.refresh_token);
        secrets::store_rotated_refresh_token(
            mi,
            secrets_api,
            grant_secret,
            refresh_token,
            rotated.is_some(),
            &extra,
            &ctx.metrics,
        )
        .await;
    }
    // Who the token belongs to: the provider's ID token says so when it sends one (a refresh token
    // brought by hand is checked here for the first time), else what the sign-in recorded.
    let signed_in = token
        .id_token_claims()
        .and_then(Result::ok)
        .and_then(|c| c.email);
    let expected = &mi.spec.mailbox.address;
    if let Some(actual) = signed_in
        .as_ref()
        .filter(|a| !a.eq_ignore_ascii_case(expected))
    {
        ctx.set_backoff(&uid, None);
        let message = format!(
            "the grant belongs to {actual}, not to the mailbox {expected}: sign in again as {expected} (status.signIn.url), or replace the refresh token in Secret {:?}",
            mi.grant_secret_name()
        );
        return (
            Outcome::PermanentFailure {
                reason: "AccountMismatch".into(),
                message,
            },
            None,
        );
    }
    let account = signed_in.or_else(|| grant.account.clone());
    let scopes = token.scopes.clone().unwrap_or_else(|| grant.scopes.clone());
    if let Err(e) =
        secrets::write_token_secret(mi, secrets_api, token_secret, &token, &ctx.metrics).await
    {
        warn!(error = %e, "writing the token Secret failed; retrying");
        let (b, delay) = next_backoff(ctx.backoff(&uid), None, o.now);
        ctx.set_backoff(&uid, Some(b));
        let failure = Outcome::TransientFailure {
            reason: "TokenSecretWriteFailed".into(),
            message: format!(
                "could not write Secret {:?}: {e}",
                mi.spec.token_secret.name
            ),
            retry_in: delay,
        };
        return (failure, None);
    }
    ctx.set_backoff(&uid, None);
    ctx.metrics
        .refreshes
        .get_or_create(&RefreshLabels {
            result: "success".into(),
            reason: "TokenRefreshed".into(),
        })
        .inc();
    let published = PublishedToken {
        access_token: token.access_token.clone(),
        expires_at: token.expires_at,
    };
    (
        Outcome::Refreshed {
            expires_at: token.expires_at,
            account,
            scopes,
        },
        Some(published),
    )
}

fn failure_outcome(
    mi: &MailIntegration,
    class: FailureClass,
    now: Timestamp,
    ctx: &Context,
) -> Outcome {
    let uid = mi.uid().unwrap_or_default();
    match class {
        FailureClass::Permanent { reason, message } => {
            warn!(reason = reason.as_str(), %message, "refresh failed permanently; waiting for a change");
            ctx.set_backoff(&uid, None);
            ctx.metrics
                .refreshes
                .get_or_create(&RefreshLabels {
                    result: "permanent_failure".into(),
                    reason: reason.as_str().into(),
                })
                .inc();
            Outcome::PermanentFailure {
                reason: reason.as_str().into(),
                message,
            }
        }
        FailureClass::Transient {
            reason,
            message,
            retry_after,
        } => {
            let (b, delay) = next_backoff(ctx.backoff(&uid), retry_after, now);
            ctx.set_backoff(&uid, Some(b));
            warn!(reason = reason.as_str(), %message, retry_in_s = delay.as_secs(), "refresh failed; backing off");
            ctx.metrics
                .refreshes
                .get_or_create(&RefreshLabels {
                    result: "transient_failure".into(),
                    reason: reason.as_str().into(),
                })
                .inc();
            Outcome::TransientFailure {
                reason: reason.as_str().into(),
                message,
                retry_in: delay,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_delay_grows_and_caps() {
        assert!(backoff_delay(1) <= Duration::from_secs(6));
        assert!(backoff_delay(1) >= Duration::from_secs(4));
        assert!(backoff_delay(3) >= Duration::from_secs(16));
        assert!(backoff_delay(u32::MAX) <= Duration::from_secs(360));
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let (b1, d1) = next_backoff(Backoff::default(), None, now);
        assert_eq!(b1.failures, 1);
        assert!(
            d1 >= Duration::from_secs(4) && d1 <= Duration::from_secs(6),
            "{d1:?}"
        );
        let (b2, d2) = next_backoff(b1, None, now);
        assert!(
            d2 >= Duration::from_secs(8) && d2 <= Duration::from_secs(12),
            "{d2:?}"
        );
        let mut b = b2;
        for _ in 0..20 {
            b = next_backoff(b, None, now).0;
        }
        let (_, capped) = next_backoff(b, None, now);
        assert!(capped <= Duration::from_secs(360), "{capped:?}");
        let (_, honoured) = next_backoff(Backoff::default(), Some(Duration::from_secs(120)), now);
        assert!(honoured >= Duration::from_secs(120));
        assert_eq!(
            b1.not_before.unwrap(),
            now + jiff::SignedDuration::try_from(d1).unwrap()
        );
    }

    #[test]
    fn an_absurd_retry_after_is_capped_and_does_not_panic() {
        let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let (b, d) = next_backoff(
            Backoff::default(),
            Some(Duration::from_secs(1_000_000_000_000)),
            now,
        );
        assert_eq!(d, MAX_RETRY_AFTER);
        assert_eq!(b.not_before, Some(crate::time::after(now, MAX_RETRY_AFTER)));
        let (b, _) = next_backoff(
            Backoff {
                failures: u32::MAX,
                not_before: None,
            },
            Some(Duration::MAX),
            Timestamp::MAX,
        );
        assert_eq!(b.failures, u32::MAX);
        assert_eq!(b.not_before, Some(Timestamp::MAX));
    }
}
