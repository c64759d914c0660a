//! One refresh: check that the grant may be used here, call the token endpoint, store a rotated
//! refresh token before anything else, publish the access token; and the backoff of transient
//! failures.

use super::{
    context::Context,
    decide::{Backoff, Outcome, RefreshCause},
    inflight,
    observed::{Observed, PublishedToken, grant_keys},
    secrets::{self, StoreError, Stored},
};
use crate::{
    api::MailIntegration,
    metrics::RefreshLabels,
    oauth::Carrying,
    provider::{FailureClass, TokenOperation},
    reason::Reason,
    secret::SecretValue,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::time::{Duration, Instant};
use tracing::{info, warn};

mod app_only;
mod mark;
use app_only::app_only;

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

/// What a refresh did.
pub(super) struct RefreshResult {
    pub outcome: Outcome,
    /// The access token it published, if any.
    pub published: Option<PublishedToken>,
    /// The grant Secret's resourceVersion after this refresh's own writes (the mark, the store):
    /// what a permanent failure's fingerprint must hold, so that its own write does not count as
    /// "the grant changed".
    pub grant_version: Option<String>,
}

impl From<Outcome> for RefreshResult {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            published: None,
            grant_version: None,
        }
    }
}

/// A refresh token the provider issued that is not stored yet (see [`Outcome::GrantNotStored`]):
/// kept in memory and written before anything else is done with the integration.
#[derive(Clone, Debug)]
pub struct PendingGrant {
    /// The integration it belongs to (as the refresh saw it): what a store on the way out needs.
    pub integration: Box<MailIntegration>,
    /// The refresh token the refresh presented (what the grant Secret held).
    pub presented: SecretValue,
    /// The one to store.
    pub refresh_token: SecretValue,
    pub rotated: bool,
    pub extra: Vec<(&'static str, String)>,
}

/// Call the token endpoint and publish the result. Never loses a rotated refresh token silently:
/// it is stored in the grant Secret (conditional on the resourceVersion of the write-ahead mark,
/// see [`super::inflight`]) before the access token is published, or the integration says that it
/// is held in memory only.
pub(super) async fn refresh(
    mi: &MailIntegration,
    o: &Observed<'_>,
    cause: RefreshCause,
    (grant_secret, token_secret): (Option<&Secret>, Option<&Secret>),
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> RefreshResult {
    if !mi.spec.interactive() {
        return app_only(mi, o, cause, token_secret, secrets_api, ctx).await;
    }
    let uid = mi.uid().unwrap_or_default();
    let (Ok(creds), Some(grant), Some(grant_secret)) = (&o.client, &o.grant, grant_secret) else {
        // decide() refreshes only with client credentials and a grant.
        return Outcome::SignInRequired.into();
    };
    // Discovery and the token request wait for servers the spec names: at most the namespace's
    // share of them at once (see `super::share`).
    let permit = match ctx.provider_permit(mi) {
        Ok(p) => p,
        Err(deferred) => return deferred.into(),
    };
    info!(?cause, "refreshing the access token");
    let endpoints = match ctx.providers.resolve(&mi.spec).await {
        Ok(e) => e,
        Err(class) => return failure_outcome(mi, class, o.now, ctx).into(),
    };
    let carrying = Carrying::Grant {
        origin: grant.origin(),
        mailbox: mi.spec.sign_in_account(),
    };
    let bound = match ctx.providers.bind(
        TokenOperation::Refresh,
        &endpoints.token,
        &endpoints,
        creds,
        carrying,
    ) {
        Ok(b) => b,
        Err(refusal) => {
            warn!(reason = refusal.reason.as_str(), message = %refusal.message, "the grant or client credential may not go there; not sending it");
            ctx.set_backoff(&uid, None);
            return Outcome::PermanentFailure {
                reason: refusal.reason.as_str().into(),
                message: refusal.message,
            }
            .into();
        }
    };
    if let Some(outcome) = template_refused(mi, token_secret, ctx).await {
        return outcome.into();
    }
    // A grant brought by hand is bound to where it first worked, in the same write as a rotation.
    let mut extra = Vec::new();
    if !grant.is_bound() {
        extra.push((grant_keys::TOKEN_ENDPOINT, endpoints.token.to_string()));
        extra.push((grant_keys::CLIENT_ID, creds.client_id.clone()));
        if let Some(r) = &endpoints.revocation {
            extra.push((grant_keys::REVOCATION_ENDPOINT, r.to_string()));
        }
    }
    let marked = inflight::needs_mark(&mi.spec);
    if grant_secret.immutable == Some(true) && (marked || !extra.is_empty()) {
        // Checked before the provider is called: a rotated token could not be stored after.
        ctx.set_backoff(&uid, None);
        return Outcome::PermanentFailure {
            reason: Reason::GrantSecretImmutable.as_str().into(),
            message: format!(
                "the grant Secret {:?} is immutable, so a refreshed grant could not be stored in it: delete the Secret and sign in again (status.signIn.url)",
                grant_secret.name_any()
            ),
        }
        .into();
    }
    if ctx.fence.check().is_err() {
        return Outcome::Requeue(Duration::from_secs(5)).into();
    }
    // Write-ahead: mark the grant before presenting a refresh token the provider may invalidate.
    let mut base = grant_secret.clone();
    let mut grant_version = None;
    let mut cut_off = None;
    let mut mark = None;
    if marked {
        match mark::mark(mi, o, grant, (grant_secret, token_secret), secrets_api, ctx).await {
            Ok(m) => {
                grant_version = m.base.metadata.resource_version.clone();
                base = m.base;
                mark = Some(m.mark);
                cut_off = m.cut_off;
            }
            Err(result) => return result,
        }
        // The mark took a round trip: is this still the leader (and not stopping)?
        if ctx.fence.check().is_err() {
            // Nothing presented: take the mark off, so that the next holder need not wait for it.
            ctx.set_resolved_mark(&uid, mark.clone());
            let withdrawn = mark::withdraw(&base, secrets_api, ctx).await;
            return RefreshResult {
                grant_version: withdrawn.or(grant_version),
                ..Outcome::Requeue(Duration::from_secs(5)).into()
            };
        }
    }
    let started = Instant::now();
    let scopes = crate::provider::refresh_scopes(&mi.spec);
    ctx.note_call(&uid, o.now);
    let result = ctx
        .oauth
        .refresh(&bound, &grant.refresh_token, &scopes, o.now)
        .await;
    drop(permit);
    ctx.metrics
        .refresh_duration
        .observe(started.elapsed().as_secs_f64());
    let token = match result {
        Ok(t) => t,
        Err(e) => {
            if let (Some(m), true) = (&mark, e.is_permanent()) {
                // The OAuth server answered, and rotated nothing: this mark is not a cut-off
                // refresh. (Only an OAuth error body is permanent; any other answer — a proxy's
                // page, a 5xx, a timeout — leaves the mark in doubt, like a cut-off: the next
                // attempt presents the same token once more, see docs/operations.md.)
                ctx.set_resolved_mark(&uid, Some(m.clone()));
            }
            let outcome = match (&cut_off, &e.class) {
                (Some(m), FailureClass::Permanent { reason, message })
                    if matches!(reason, Reason::GrantRevoked | Reason::ProviderError) =>
                {
                    ctx.set_backoff(&uid, None);
                    let message = format!(
                        "a refresh by operator process {} that started at {} did not finish (the process stopped or lost its Lease before it stored the new refresh token), and the provider now refuses the stored refresh token ({}: {message}): sign in again (status.signIn.url)",
                        m.holder,
                        crate::time::rfc3339(m.since),
                        reason.as_str(),
                    );
                    warn!(%message, "the grant was lost with a cut-off refresh");
                    Outcome::PermanentFailure {
                        reason: Reason::GrantLostInFlight.as_str().into(),
                        message,
                    }
                }
                _ => {
                    // Google words a Testing app's 7-day end like a revocation: the grant's own
                    // age tells them apart.
                    let history = crate::provider::GrantHistory {
                        issued_at: grant.issued_at,
                        refresh_token_expires_at: grant.refresh_token_expires_at,
                    };
                    let class = crate::provider::refine_with_grant_history(
                        mi.spec.provider,
                        e.class,
                        &history,
                        o.now,
                    );
                    failure_outcome(mi, class, o.now, ctx)
                }
            };
            return RefreshResult {
                outcome,
                published: None,
                grant_version,
            };
        }
    };
    let rotated = token
        .refresh_token
        .as_ref()
        .filter(|rt| **rt != grant.refresh_token);
    // Answered without a new refresh token (and nothing to bind): the mark stays on the grant,
    // resolved — in memory now, and for every process once the token Secret records it below.
    // No grant write: the mark's removal would cost one per refresh (docs/architecture.md).
    let store = rotated.is_some() || !extra.is_empty();
    ctx.set_resolved_mark(&uid, if store { None } else { mark.clone() });
    if store {
        let refresh_token = rotated.unwrap_or(&grant.refresh_token);
        let stored = secrets::store_after_refresh(
            mi,
            secrets_api,
            Some(&base),
            &grant.refresh_token,
            refresh_token,
            rotated.is_some(),
            &extra,
            &ctx.metrics,
        )
        .await;
        match stored {
            Ok(Stored::Stored(version)) => grant_version = version,
            Ok(Stored::Superseded) => {
                // A sign-in replaced the grant during this refresh: this answer's access token
                // belongs to the grant it replaced and is not published. The sign-in's write
                // brings the next reconcile, which decides with the new grant.
                info!(
                    "a sign-in replaced the grant during the refresh; its access token is not published"
                );
                return RefreshResult {
                    outcome: Outcome::Requeue(Duration::from_secs(1)),
                    published: None,
                    grant_version: None,
                };
            }
            Err(StoreError::GiveUp { reason, message }) => {
                warn!(reason = reason.as_str(), %message, "the refreshed grant cannot be stored");
                ctx.set_backoff(&uid, None);
                return RefreshResult {
                    outcome: Outcome::PermanentFailure {
                        reason: reason.as_str().into(),
                        message,
                    },
                    published: None,
                    grant_version,
                };
            }
            Err(StoreError::Deleted) => {
                ctx.set_backoff(&uid, None);
                return RefreshResult {
                    outcome: Outcome::SignInRequired,
                    published: None,
                    grant_version: None,
                };
            }
            Err(StoreError::NotStored { message }) => {
                warn!(%message, "the refreshed grant is not stored; holding it in memory");
                ctx.set_pending(
                    &uid,
                    Some(PendingGrant {
                        integration: Box::new(mi.clone()),
                        presented: grant.refresh_token.clone(),
                        refresh_token: refresh_token.clone(),
                        rotated: rotated.is_some(),
                        extra: extra.clone(),
                    }),
                );
                let (b, retry_in) = next_backoff(ctx.backoff(&uid), None, o.now);
                ctx.set_backoff(&uid, Some(b));
                return RefreshResult {
                    outcome: Outcome::GrantNotStored { message, retry_in },
                    published: None,
                    grant_version,
                };
            }
        }
    }
    let fallback = (grant.account.clone(), grant.scopes.clone());
    let published_to = (token_secret, mark.as_ref());
    let outcome = publish(mi, &token, fallback, published_to, secrets_api, o.now, ctx).await;
    if matches!(outcome, Outcome::Refreshed { .. }) {
        // The token Secret records the mark now: nothing to keep in memory.
        ctx.set_resolved_mark(&uid, None);
    }
    let published = matches!(outcome, Outcome::Refreshed { .. }).then(|| PublishedToken {
        access_token: token.access_token.clone(),
        expires_at: token.expires_at,
    });
    RefreshResult {
        outcome,
        published,
        grant_version,
    }
}

/// Write a pending grant (see [`PendingGrant`]) into the grant Secret as it is now: `Ok` once it is
/// stored or superseded by a newer grant, else the outcome to report.
pub(super) async fn store_pending(
    mi: &MailIntegration,
    pending: &PendingGrant,
    grant_secret: Option<&Secret>,
    secrets_api: &Api<Secret>,
    now: Timestamp,
    ctx: &Context,
) -> Result<(), Outcome> {
    let uid = mi.uid().unwrap_or_default();
    let extra: Vec<(&str, String)> = pending.extra.iter().map(|(k, v)| (*k, v.clone())).collect();
    let stored = secrets::store_after_refresh(
        mi,
        secrets_api,
        grant_secret,
        &pending.presented,
        &pending.refresh_token,
        pending.rotated,
        &extra,
        &ctx.metrics,
    )
    .await;
    match stored {
        Ok(stored) => {
            info!("stored the grant held in memory");
            if let Stored::Stored(version) = stored {
                // The cache may not have seen this write yet: the next reconcile must not decide
                // on the grant as it was before it.
                ctx.written.set(&uid, super::cache::Kind::Grant, version);
            }
            ctx.set_pending(&uid, None);
            ctx.set_backoff(&uid, None);
            Ok(())
        }
        Err(StoreError::GiveUp { reason, message }) => {
            ctx.set_pending(&uid, None);
            ctx.set_backoff(&uid, None);
            Err(Outcome::PermanentFailure {
                reason: reason.as_str().into(),
                message,
            })
        }
        Err(StoreError::Deleted) => {
            ctx.set_pending(&uid, None);
            ctx.set_backoff(&uid, None);
            Err(Outcome::SignInRequired)
        }
        Err(StoreError::NotStored { message }) => {
            let (b, retry_in) = next_backoff(ctx.backoff(&uid), None, now);
            ctx.set_backoff(&uid, Some(b));
            Err(Outcome::GrantNotStored { message, retry_in })
        }
    }
}

/// A token Secret template that is refused or does not render, checked before the provider is
/// called (the token could not be published). A template that already rendered with real values
/// into the token Secret (its digest annotation says so) is not rendered again.
async fn template_refused(
    mi: &MailIntegration,
    token_secret: Option<&Secret>,
    ctx: &Context,
) -> Option<Outcome> {
    let t = mi.spec.token_secret.template.as_ref()?;
    let message = match super::template::keys::refused(t) {
        Some(refused) => refused,
        None => {
            let recorded = token_secret
                .and_then(|s| s.metadata.annotations.as_ref())
                .and_then(|a| a.get(super::template::digest::DIGEST_ANNOTATION))
                .map(String::as_str);
            if super::template::digest::template_known_good(t, recorded) {
                return None;
            }
            ctx.renderer
                .check(&mi.namespace().unwrap_or_default(), t)
                .await
                .err()?
        }
    };
    ctx.set_backoff(&mi.uid().unwrap_or_default(), None);
    Some(template_invalid(&message))
}

/// The token Secret cannot be written as it is (a template that does not render, a Secret over the
/// bound): retrying the write would not help. `None` for a failed write.
pub(super) fn not_publishable(e: &secrets::TokenSecretError) -> Option<Outcome> {
    match e {
        secrets::TokenSecretError::Template(message) => Some(template_invalid(message)),
        secrets::TokenSecretError::TooLarge(message) => Some(Outcome::PermanentFailure {
            reason: Reason::SecretTooLarge.as_str().into(),
            message: message.clone(),
        }),
        secrets::TokenSecretError::Conflict(c) => Some(Outcome::Conflict(c.clone())),
        secrets::TokenSecretError::Kube(_) => None,
    }
}

pub(super) fn template_invalid(message: &str) -> Outcome {
    Outcome::PermanentFailure {
        reason: Reason::TokenTemplateInvalid.as_str().into(),
        message: format!("{message}: fix spec.tokenSecret.template"),
    }
}

/// After the grant is safe: check whose token it is and write the token Secret, with the mark
/// this refresh presented under (`under`: resolved from then on, see [`inflight`]).
async fn publish(
    mi: &MailIntegration,
    token: &crate::oauth::TokenGrant,
    (fallback_account, fallback_scopes): (Option<String>, Vec<String>),
    (token_secret, under): (Option<&Secret>, Option<&inflight::Mark>),
    secrets_api: &Api<Secret>,
    now: Timestamp,
    ctx: &Context,
) -> Outcome {
    let uid = mi.uid().unwrap_or_default();
    // Who the token belongs to: the provider's ID token says so when it sends one (a refresh token
    // brought by hand is checked here for the first time), else what the sign-in recorded.
    let signed_in = token
        .id_token_claims()
        .and_then(Result::ok)
        .and_then(|c| c.email);
    // A shared mailbox's grant belongs to its delegate (spec.oauth.signInAccount).
    let expected = mi.spec.sign_in_account();
    if let Some(actual) = signed_in
        .as_ref()
        .filter(|a| !a.eq_ignore_ascii_case(expected))
    {
        ctx.set_backoff(&uid, None);
        let message = format!(
            "the grant belongs to {actual}, not to {expected}: sign in again as {expected} (status.signIn.url), or replace the refresh token in Secret {:?}",
            mi.grant_secret_name()
        );
        return Outcome::PermanentFailure {
            reason: "AccountMismatch".into(),
            message,
        };
    }
    let account = signed_in.or(fallback_account);
    let scopes = token.scopes.clone().unwrap_or(fallback_scopes);
    let written = secrets::write_token_secret(
        mi,
        secrets_api,
        token_secret,
        (token, under.map(inflight::Mark::value)),
        &ctx.metrics,
        &ctx.renderer,
    )
    .await;
    if let Some(outcome) = written.as_ref().err().and_then(not_publishable) {
        ctx.set_backoff(&uid, None);
        return outcome;
    }
    if let Ok(version) = &written {
        ctx.written
            .set(&uid, super::cache::Kind::Token, version.clone());
    }
    if let Err(e) = written {
        warn!(error = %e, "writing the token Secret failed; retrying");
        let (b, delay) = next_backoff(ctx.backoff(&uid), None, now);
        ctx.set_backoff(&uid, Some(b));
        return Outcome::TransientFailure {
            reason: "TokenSecretWriteFailed".into(),
            message: format!(
                "could not write Secret {:?}: {e}",
                mi.spec.token_secret.name
            ),
            retry_in: delay,
        };
    }
    ctx.set_backoff(&uid, None);
    ctx.metrics
        .refreshes
        .get_or_create(&RefreshLabels {
            result: "success".into(),
            reason: "TokenRefreshed".into(),
        })
        .inc();
    let window = super::decide::refresh_window(mi, Some(now), token.expires_at, ctx.pace);
    Outcome::Refreshed {
        expires_at: token.expires_at,
        next_refresh_at: ctx.slots.pick(&uid, window, now),
        account,
        scopes,
    }
}

/// How long this integration has been failing: since its Reconciling condition turned True (kept
/// in the status, so a restart does not reset it).
fn failing_for(mi: &MailIntegration, now: Timestamp) -> Option<Duration> {
    let c = mi
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == crate::api::condition::RECONCILING && c.status == "True")?;
    Duration::try_from(now.duration_since(c.last_transition_time.0)).ok()
}

fn failure_outcome(
    mi: &MailIntegration,
    class: FailureClass,
    now: Timestamp,
    ctx: &Context,
) -> Outcome {
    let uid = mi.uid().unwrap_or_default();
    match crate::provider::after_long_run(class, failing_for(mi, now)) {
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
