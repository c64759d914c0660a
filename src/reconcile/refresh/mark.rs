//! The write-ahead mark of one refresh (see [`crate::reconcile::inflight`]): judged on the grant
//! Secret as read, written within [`inflight::MARK_WRITE_BUDGET`], and after a 409 read again once
//! and decided again. Nothing here calls the provider.

use super::{RefreshResult, next_backoff};
use crate::{
    api::MailIntegration,
    reason::Reason,
    reconcile::{
        cache::Kind,
        context::Context,
        decide::Outcome,
        inflight::{self, Mark, MarkState},
        observed::{self, Grant, Observed},
        secrets,
    },
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::{
    borrow::Cow,
    time::{Duration, Instant},
};
use tracing::{info, warn};

/// A mark this refresh holds: present the refresh token under it.
pub(super) struct Marked {
    /// The grant Secret as the mark write returned it (the store's precondition).
    pub base: Secret,
    pub mark: Mark,
    /// Another refresh's mark that this one replaced, whose outcome is unknown: the stored
    /// refresh token may be spent (see [`MarkState::Stale`]).
    pub cut_off: Option<Mark>,
}

/// What the 409 re-read found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterConflict {
    /// The grant is gone, or holds another refresh token than the one decided on: decide again
    /// on what is there now.
    Changed,
    /// The same grant, another version (someone else's annotation or label, another process's
    /// mark): judge its mark again and write on top of it.
    Same,
}

/// After a 409 on the mark: whether the grant read again is still the one decided on.
pub(super) fn after_conflict(decided_on: &Grant, fresh: Option<&Secret>) -> AfterConflict {
    match observed::grant(fresh) {
        Some(g) if g.refresh_token == decided_on.refresh_token => AfterConflict::Same,
        _ => AfterConflict::Changed,
    }
}

/// Mark the grant before its refresh token is presented. `Err`: do not present; the result to
/// report (a wait, a requeue, a transient failure).
pub(super) async fn mark(
    mi: &MailIntegration,
    o: &Observed<'_>,
    grant: &Grant,
    (grant_secret, token_secret): (&Secret, Option<&Secret>),
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> Result<Marked, RefreshResult> {
    let uid = mi.uid().unwrap_or_default();
    let name = grant_secret.name_any();
    let mut current = Cow::Borrowed(grant_secret);
    let mut reread = false;
    loop {
        let resolved = ctx.resolved_mark(&uid);
        // A mark the token Secret records was answered without a rotation: resolved.
        let recorded = inflight::resolved_by_record(&current, token_secret);
        let cut_off = match inflight::state(
            inflight::mark_of(&current),
            &ctx.identity,
            &[resolved.as_ref(), recorded.as_ref()],
            o.now,
        ) {
            MarkState::Fresh(m) => {
                // Not a failure, and not this refresh's turn: decide again once the mark is stale
                // (a refresh request stays pending meanwhile; the status is left as it is).
                info!(reason = Reason::RefreshInFlightElsewhere.as_str(), holder = %m.holder, since = %m.since, "another operator process is refreshing this grant; waiting");
                return Err(Outcome::Requeue(inflight::wait_for(&m, o.now)).into());
            }
            MarkState::Stale(m)
                if m.holder != ctx.identity
                    && ctx.first_seen(&uid, &m).elapsed() < inflight::holder_grace() =>
            {
                // Its holder may be back from an outage with the rotated token, storing it.
                let left = inflight::holder_grace()
                    .saturating_sub(ctx.first_seen(&uid, &m).elapsed())
                    .max(Duration::from_secs(1));
                info!(holder = %m.holder, since = %m.since, wait_s = left.as_secs(), "another operator process's refresh of this grant did not finish in time; giving it a moment to store its result");
                return Err(Outcome::Requeue(left).into());
            }
            MarkState::Stale(m) => {
                warn!(holder = %m.holder, since = %m.since, "an earlier refresh of this grant got no answer from the OAuth server, or was cut off, before it stored its result; trying the stored refresh token");
                Some(m)
            }
            MarkState::Clear => None,
        };
        let resolved_value = resolved.as_ref().map(Mark::value);
        let now = fresh_mark_time(
            &[
                inflight::mark_value(&current),
                token_secret.and_then(inflight::recorded),
                resolved_value.as_deref(),
            ],
            &ctx.identity,
        )
        .await;
        let started = Instant::now();
        // The mark says whole seconds, cut down: the window, as others see it, began that much earlier.
        let cut = Duration::from_nanos(u64::try_from(now.subsec_nanosecond()).unwrap_or(0));
        let m = Mark::new(&ctx.identity, now);
        let written = tokio::time::timeout(
            inflight::mark_write_budget(),
            secrets::write_mark(secrets_api, &current, &m, &ctx.metrics),
        )
        .await;
        let took = started.elapsed().saturating_add(cut);
        let e = match written {
            Ok(Ok(base)) if inflight::may_present(took) => {
                return Ok(Marked {
                    base,
                    mark: m,
                    cut_off,
                });
            }
            Ok(Ok(base)) => {
                // Written, but too late: nothing was presented under this mark.
                ctx.set_resolved_mark(&uid, Some(m));
                let mut r = write_failed(mi, ctx, too_slow(&name, took));
                r.grant_version = base.metadata.resource_version;
                return Err(r);
            }
            Err(_) => {
                // Perhaps written, perhaps not: either way nothing was presented under it.
                ctx.set_resolved_mark(&uid, Some(m));
                return Err(write_failed(mi, ctx, too_slow(&name, took)));
            }
            Ok(Err(e)) => e,
        };
        match &e {
            kube::Error::Api(s) if s.code == 404 => {
                // The grant is gone: decide again on what is there now.
                return Err(Outcome::Requeue(Duration::from_secs(1)).into());
            }
            kube::Error::Api(s) if s.code == 409 && !reread => {
                // The grant changed since it was read (a sign-in, another process, another
                // writer), and the cache may not show it yet: read it once and decide again.
                reread = true;
                info!(
                    "the grant Secret changed since it was read (409 on the mark); reading it again to decide again"
                );
                ctx.metrics.count_read("grant_secret");
                let fresh = match secrets_api.get_opt(&name).await {
                    Ok(fresh) => fresh,
                    Err(e) => {
                        return Err(write_failed(
                            mi,
                            ctx,
                            format!(
                                "could not read the grant Secret {name:?} again after a conflict on marking it before refreshing: {e}"
                            ),
                        ));
                    }
                };
                ctx.written.read(
                    &uid,
                    Kind::Grant,
                    fresh.as_ref().and_then(|s| s.resource_version()),
                );
                match (after_conflict(grant, fresh.as_ref()), fresh) {
                    (AfterConflict::Same, Some(fresh)) => current = Cow::Owned(fresh),
                    _ => return Err(Outcome::Requeue(Duration::from_secs(1)).into()),
                }
            }
            kube::Error::Api(s) if s.code == 409 => {
                let (b, retry_in) = next_backoff(ctx.backoff(&uid), None, Timestamp::now());
                ctx.set_backoff(&uid, Some(b));
                let message = format!(
                    "the grant Secret {name:?} changed again while it was being marked before a refresh (409 Conflict twice, read again in between); nothing was sent to the provider; another writer may be changing it"
                );
                warn!(reason = Reason::GrantMarkConflict.as_str(), %message, retry_in_s = retry_in.as_secs(), "marking the grant failed; backing off");
                return Err(Outcome::TransientFailure {
                    reason: Reason::GrantMarkConflict.as_str().into(),
                    message,
                    retry_in,
                }
                .into());
            }
            _ => {
                return Err(write_failed(
                    mi,
                    ctx,
                    format!("could not mark the grant Secret {name:?} before refreshing: {e}"),
                ));
            }
        }
    }
}

/// Now, or the next second when this process's mark of now would repeat a value that is on the
/// grant, recorded by the token Secret or resolved in memory (the same holder within one second):
/// a record must never match a later refresh's mark.
async fn fresh_mark_time(taken: &[Option<&str>], holder: &str) -> Timestamp {
    loop {
        let now = Timestamp::now();
        if !inflight::value_taken(&Mark::new(holder, now).value(), taken) {
            return now;
        }
        let left =
            1_000_000_000u64.saturating_sub(u64::try_from(now.subsec_nanosecond()).unwrap_or(0));
        tokio::time::sleep(Duration::from_nanos(left).saturating_add(Duration::from_millis(1)))
            .await;
    }
}

fn too_slow(name: &str, took: Duration) -> String {
    format!(
        "marking the grant Secret {name:?} before refreshing took {:.1}s, longer than the {:.1}s a refresh may spend on it (the API server is slow); the refresh token was not sent",
        took.as_secs_f64(),
        inflight::mark_write_budget().as_secs_f64()
    )
}

/// A transient failure to mark, backed off from now (not from when the reconcile observed: the
/// write may have taken up to [`inflight::MARK_WRITE_BUDGET`]).
fn write_failed(mi: &MailIntegration, ctx: &Context, message: String) -> RefreshResult {
    let uid = mi.uid().unwrap_or_default();
    let (b, retry_in) = next_backoff(ctx.backoff(&uid), None, Timestamp::now());
    ctx.set_backoff(&uid, Some(b));
    warn!(reason = Reason::GrantWriteFailed.as_str(), %message, "marking the grant failed; backing off");
    Outcome::TransientFailure {
        reason: Reason::GrantWriteFailed.as_str().into(),
        message,
        retry_in,
    }
    .into()
}

/// Take this refresh's own mark off the grant (`base`: the Secret as the mark write returned it)
/// when it presents nothing after all (the fence closed while the mark was written), so that the
/// next holder need not wait for the mark to turn stale. Conditional on the mark's
/// resourceVersion (it removes nothing another writer put since) and bounded: a mark left turns
/// stale by itself. Returns the grant Secret's new resourceVersion.
pub(super) async fn withdraw(
    base: &Secret,
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> Option<String> {
    let mut clean = base.clone();
    clean
        .metadata
        .annotations
        .as_mut()?
        .remove(inflight::REFRESH_IN_FLIGHT_ANNOTATION)?;
    clean.metadata.managed_fields = None;
    let pp = kube::api::PostParams {
        field_manager: Some(crate::reconcile::context::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let name = base.name_any();
    let write = secrets_api.replace(&name, &pp, &clean);
    match tokio::time::timeout(inflight::mark_write_budget(), write).await {
        Ok(Ok(written)) => {
            ctx.metrics.count_write("grant_secret");
            info!(
                "no refresh token presented (stopping, or no longer the leader): took the mark off the grant"
            );
            written.metadata.resource_version
        }
        Ok(Err(e)) => {
            warn!(error = %e, "could not take the mark off the grant; it turns stale by itself");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn grant_secret(rt: &str) -> Secret {
        Secret {
            data: Some(
                [(
                    observed::grant_keys::REFRESH_TOKEN.to_owned(),
                    ByteString(rt.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_conflict_decides_again_on_the_grant_read_again() {
        let decided_on = observed::grant(Some(&grant_secret("rt-1"))).unwrap();
        // Someone else's annotation, label or mark: the same refresh token.
        let mut annotated = grant_secret("rt-1");
        annotated.metadata.annotations = Some([("x".to_owned(), "y".to_owned())].into());
        assert_eq!(
            after_conflict(&decided_on, Some(&annotated)),
            AfterConflict::Same
        );
        // A sign-in or another process stored another refresh token: never present the old one.
        assert_eq!(
            after_conflict(&decided_on, Some(&grant_secret("rt-2"))),
            AfterConflict::Changed
        );
        assert_eq!(after_conflict(&decided_on, None), AfterConflict::Changed);
        assert_eq!(
            after_conflict(&decided_on, Some(&Secret::default())),
            AfterConflict::Changed
        );
    }
}
