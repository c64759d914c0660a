//! The mailbox check in the status: MailboxConnected, Ready's share of it, and the last check as
//! the status reports it (taken over after a restart).

use super::MailboxState;
use crate::api::{MailIntegration, MailIntegrationStatus, condition};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The mailbox state as the status last reported it (its MailboxConnected condition).
pub fn reported_state(status: Option<&MailIntegrationStatus>) -> Option<MailboxState> {
    let c = status?
        .conditions
        .iter()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)?;
    Some(match c.status.as_str() {
        "True" => MailboxState::Connected(c.message.clone()),
        _ => MailboxState::Failed {
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
    })
}

/// When to count the last check as made, for an integration this process has not checked yet: the
/// status's `mailboxCheckedAt` when it describes the current spec (MailboxConnected of this
/// generation) and is less than an interval old. One older than that (or after the status was
/// written by an operator that did not record it) is due, but not all at once: a restart with
/// thousands of overdue integrations spreads their checks over one interval, as they would run
/// anyway, instead of queueing them all behind each other. `None`: check now.
pub fn resumed_check_time(mi: &MailIntegration, now: Timestamp) -> Option<Timestamp> {
    let status = mi.status.as_ref()?;
    status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
        .filter(|c| {
            c.observed_generation.is_some() && c.observed_generation == mi.metadata.generation
        })?;
    let checked = status.mailbox_checked_at.as_ref()?.0;
    let interval = mi.spec.check_interval();
    // A time in the future (a clock step, or a hand edit) counts as now.
    let checked = checked.min(now);
    if crate::time::after(checked, interval) > now {
        return Some(checked);
    }
    let spread = interval.mul_f64(rand::random_range(0.0..1.0));
    Some(crate::time::after(
        crate::time::before(now, interval),
        spread,
    ))
}

/// Put the mailbox state into the status: the MailboxConnected condition, and Ready, which is only
/// True when the mailbox accepts the token too. `None` (no check possible now) keeps what was there.
pub fn apply(
    status: &mut MailIntegrationStatus,
    state: Option<&MailboxState>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(state) = state else { return };
    let (ok, reason, message) = match state {
        MailboxState::NotConfigured => {
            status
                .conditions
                .retain(|c| c.type_ != condition::MAILBOX_CONNECTED);
            return;
        }
        MailboxState::Connected(m) => (true, "Connected", m.clone()),
        MailboxState::Failed { reason, message } => (false, reason.as_str(), message.clone()),
    };
    let transition = match status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
    {
        Some(p) if p.status == if ok { "True" } else { "False" } => p.last_transition_time.clone(),
        _ => Time(now),
    };
    let new = Condition {
        type_: condition::MAILBOX_CONNECTED.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: crate::reason::outside_text(&message, crate::reason::MAX_MESSAGE),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
    {
        Some(c) => *c = new,
        None => {
            let at = status
                .conditions
                .iter()
                .position(|c| c.type_ == condition::RECONCILING)
                .unwrap_or(status.conditions.len());
            status.conditions.insert(at, new);
        }
    }
    if !ok
        && let Some(ready) = status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == condition::READY && c.status == "True")
    {
        ready.status = "False".into();
        ready.reason = reason.into();
        ready.message =
            format!("the token is valid, but the mailbox refuses the connection: {message}");
        ready.last_transition_time = Time(now);
    }
}
