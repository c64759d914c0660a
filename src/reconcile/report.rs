//! Reconcile, steps 4 and 5 (report, requeue): the status after the outcome (with the sign-in link,
//! the mailbox check and the lifetime warnings), written only when it differs from the stored one,
//! events on transitions, and when to come back.

use super::{
    act::Acted,
    cache::Kind,
    cached_secret::Held,
    context::{Context, FIELD_MANAGER},
    decide::{self, Outcome},
    error::Error,
    mailbox_check::{self, MailboxState},
    observe::{Read, Reader},
    observed::{self, Observed},
};
use crate::api::{MailIntegration, MailIntegrationStatus, SignInStatus, condition};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        reflector::ObjectRef,
    },
};
use std::time::Duration;
use tracing::warn;

/// Brings a reconcile of an integration (a mailbox check finished in the background).
pub(super) type Wake = futures::channel::mpsc::UnboundedSender<ObjectRef<MailIntegration>>;

/// Report `acted` on `mi` and say when to reconcile again.
pub(super) async fn report(
    mi: &MailIntegration,
    read: &Read,
    observed: &Observed<'_>,
    acted: Acted,
    reader: &Reader<'_>,
    wake: &Wake,
) -> Result<Action, Error> {
    let ctx = reader.ctx;
    let Acted { outcome, new_token } = acted;
    if matches!(outcome, Outcome::Requeue(_)) || ctx.fence.check().is_err() {
        // Nothing to report (or no longer the leader): leave the status to the next decision.
        let Outcome::Requeue(d) = outcome else {
            return Ok(Action::requeue(Duration::from_secs(5)));
        };
        return Ok(Action::requeue(d));
    }
    let now = observed.now;
    let sign_in = sign_in_link(mi, &outcome, ctx, now);
    let mut status = decide::status_after_paced(observed, &outcome, sign_in, ctx.pace);
    status.provider_backoff = super::remembered::to_status(
        ctx.backoff(&reader.uid),
        &outcome,
        mi.status.as_ref().and_then(|s| s.provider_backoff.as_ref()),
    );
    let grant = mailbox_check::grant_basis(
        observed.grant.as_ref(),
        observed.client_version.as_deref(),
        mi.annotations()
            .get(crate::api::REFRESH_REQUESTED_ANNOTATION)
            .map(String::as_str),
    );
    let check_token =
        new_token
            .as_ref()
            .or(observed.token.as_ref())
            .map(|t| mailbox_check::CheckToken {
                access_token: &t.access_token,
                expires_at: t.expires_at,
                grant: &grant,
            });
    let mailbox_state = if matches!(
        outcome,
        Outcome::ClientSecret(_)
            | Outcome::Conflict(_)
            | Outcome::SignInRequired
            | Outcome::Suspended
    ) {
        None
    } else {
        match reader.ca(mi).await {
            Ok(ca) => {
                // Off the refresh path: the status reports the last finished check, and a check
                // that finishes brings the next reconcile. The check a refresh makes due joins
                // this status apply when it is done within the short join wait (one write for
                // Ready and MailboxConnected; see `mailbox_check`'s module doc).
                let (wake, target) = (wake.clone(), ObjectRef::from_obj(mi));
                let refreshed = new_token.is_some();
                ctx.mailbox
                    .state_joined(mi, check_token, ca, now, refreshed, move || {
                        let _ = wake.unbounded_send(target);
                    })
                    .await
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
            read.client_secret
                .as_ref()
                .and_then(Held::secret)
                .filter(|s| {
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
    write_if_changed(mi, status.clone(), mailbox_state.as_ref(), reader).await?;
    let uid = reader.uid.as_str();
    let mut requeue = decide::requeue_after(observed, &status, &outcome, ctx.backoff(uid));
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

/// The sign-in link for an integration that needs a sign-in, when the sign-in server runs.
fn sign_in_link(
    mi: &MailIntegration,
    outcome: &Outcome,
    ctx: &Context,
    now: Timestamp,
) -> Option<SignInStatus> {
    let links = ctx.sign_in.as_ref()?;
    // Nobody signs in to an app-only integration: a link would only mislead.
    if !mi.spec.interactive() || !decide::needs_sign_in(outcome, mi.status.as_ref()) {
        return None;
    }
    // Keep a link that is still valid for a while, so that idle reconciles write nothing.
    let current = mi.status.as_ref().and_then(|s| s.sign_in.clone());
    match current {
        Some(c) if c.expires_at.0 > crate::time::after(now, Duration::from_secs(600)) => Some(c),
        _ => links.link(mi, now),
    }
}

/// Write `status` when it differs from the stored one (and publish the events of its transitions).
async fn write_if_changed(
    mi: &MailIntegration,
    mut status: MailIntegrationStatus,
    mailbox_state: Option<&MailboxState>,
    reader: &Reader<'_>,
) -> Result<(), Error> {
    let ctx = reader.ctx;
    let uid = reader.uid.as_str();
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
        .hold(uid, status.next_refresh_time.as_ref().map(|t| t.0));
    if mi.status.as_ref() == Some(&status) {
        return Ok(());
    }
    status.mailbox_checked_at = checked_at;
    let api: Api<MailIntegration> = Api::namespaced(ctx.client.clone(), &reader.ns);
    // Server-side apply: fields this manager set before and now omits (failedInputs, signIn) are
    // removed, which a merge patch would not do. status.lastSignInFailure belongs to the sign-in
    // server (its own field manager): it is never applied here, only read, and removed with a
    // merge patch once it no longer matters.
    let mut applied = status.clone();
    applied.last_sign_in_failure = None;
    // status.gateway belongs to the gateway (apps, its own field manager) and to the gateway
    // credentials (rotationHandled, and the GatewayCredentials condition): never applied here,
    // so never taken over or removed.
    applied.gateway = None;
    applied
        .conditions
        .retain(|c| c.type_ != crate::api::condition::GATEWAY_CREDENTIALS);
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
        .set(uid, Kind::Integration, after.resource_version());
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
            .set(uid, Kind::Integration, after.resource_version());
    }
    ctx.metrics.count_write("status");
    publish_events(mi, mi.status.as_ref(), &status, ctx).await;
    Ok(())
}

/// One event for the changes a human cares about (first success, failure, recovery), compared on
/// the (status, reason) of Ready, Authorized and Reconciling, so a routine refresh emits nothing;
/// several transitions of one reconcile (a first refresh: Ready and Authorized) are one event.
async fn publish_events(
    mi: &MailIntegration,
    old: Option<&MailIntegrationStatus>,
    new: &MailIntegrationStatus,
    ctx: &Context,
) {
    let Some(event) = transition_event(old, new) else {
        return;
    };
    if let Err(e) = ctx.recorder.publish(&event, &mi.object_ref(&())).await {
        warn!(error = %e, "could not publish an event");
    } else {
        ctx.metrics.count_write("event");
    }
}

/// The event of a status change: every transition of Ready, Authorized and Reconciling worth
/// telling, in one note (`Ready=True: …; Authorized=True: …`); a Warning with the first failing
/// transition's reason if any fails, else Normal with the first one's (Ready's when it changed).
pub(super) fn transition_event(
    old: Option<&MailIntegrationStatus>,
    new: &MailIntegrationStatus,
) -> Option<Event> {
    let mut told: Vec<(bool, String, String)> = Vec::new();
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
            // The same failure is already told by Ready's transition.
            continue;
        }
        let reason = if t == condition::RECONCILING && healthy {
            "Recovered".to_owned()
        } else {
            after.reason.clone()
        };
        told.push((
            healthy,
            reason,
            format!("{t}={}: {}", after.status, after.message),
        ));
    }
    let (healthy, reason) = told
        .iter()
        .find(|(healthy, _, _)| !healthy)
        .or(told.first())
        .map(|(h, r, _)| (*h, r.clone()))?;
    let note = told
        .iter()
        .map(|(_, _, n)| n.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    Some(Event {
        type_: if healthy {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason,
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn status(conds: &[(&str, &str, &str)]) -> MailIntegrationStatus {
        MailIntegrationStatus {
            conditions: conds
                .iter()
                .map(|(t, s, r)| Condition {
                    type_: (*t).into(),
                    status: (*s).into(),
                    reason: (*r).into(),
                    message: format!("{r} said"),
                    last_transition_time: Time(Timestamp::UNIX_EPOCH),
                    observed_generation: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_first_refresh_is_one_event_telling_every_transition() {
        let new = status(&[
            ("Ready", "True", "TokenRefreshed"),
            ("Authorized", "True", "Authorized"),
            ("Reconciling", "False", "Idle"),
        ]);
        let ev = transition_event(None, &new).unwrap();
        assert_eq!(ev.reason, "TokenRefreshed");
        assert!(matches!(ev.type_, EventType::Normal));
        assert_eq!(
            ev.note.as_deref(),
            Some("Ready=True: TokenRefreshed said; Authorized=True: Authorized said")
        );
        // A routine refresh after it: nothing.
        assert!(transition_event(Some(&new), &new).is_none());
    }

    #[test]
    fn a_failure_among_the_transitions_makes_a_warning_with_its_reason() {
        let old = status(&[
            ("Ready", "True", "TokenRefreshed"),
            ("Authorized", "True", "Authorized"),
            ("Reconciling", "True", "ProviderUnavailable"),
        ]);
        // Authorized fails with the reason Ready tells: one Warning, Ready's.
        let new = status(&[
            ("Ready", "False", "GrantRevoked"),
            ("Authorized", "False", "GrantRevoked"),
            ("Reconciling", "False", "Idle"),
        ]);
        let ev = transition_event(Some(&old), &new).unwrap();
        assert!(matches!(ev.type_, EventType::Warning));
        assert_eq!(ev.reason, "GrantRevoked");
        assert_eq!(
            ev.note.as_deref(),
            Some("Ready=False: GrantRevoked said; Reconciling=False: Idle said")
        );
        // Only the recovery of Reconciling: Normal, Recovered.
        let recovered = status(&[
            ("Ready", "True", "TokenRefreshed"),
            ("Authorized", "True", "Authorized"),
            ("Reconciling", "False", "Idle"),
        ]);
        let ev = transition_event(Some(&old), &recovered).unwrap();
        assert!(matches!(ev.type_, EventType::Normal));
        assert_eq!(ev.reason, "Recovered");
    }
}
