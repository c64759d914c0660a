//! Dates on which an integration is known to stop working unless someone acts: the client secret's
//! expiry (from an annotation the admin puts on the client Secret, since no provider tells an OAuth
//! client when its own secret ends) and the end of a grant the provider announced (Google apps in
//! Testing status: 7 days after sign-in). Pure: the status fields and the warning condition
//! from those dates and the clock.

use crate::api::{CLIENT_SECRET_EXPIRES_ANNOTATION, MailIntegrationStatus, condition};
use crate::reason::Reason;
use jiff::{SignedDuration, Timestamp, civil::Date, tz::TimeZone};
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

/// How long before the expiry the warning starts.
pub const WARN_BEFORE: SignedDuration = SignedDuration::from_hours(30 * 24);

/// The client secret's expiry as annotated on the client Secret: `None` without the annotation,
/// `Some(Err(()))` when it is not a date. A plain date means the start of that day (UTC): the
/// consoles show dates, and warning a few hours early is the safe side.
pub fn client_secret_expiry(secret: Option<&Secret>) -> Option<Result<Timestamp, ()>> {
    let value = secret?
        .metadata
        .annotations
        .as_ref()?
        .get(CLIENT_SECRET_EXPIRES_ANNOTATION)?
        .trim();
    if value.len() > 64 {
        return Some(Err(()));
    }
    if let Ok(t) = value.parse::<Timestamp>() {
        return Some(Ok(t));
    }
    Some(
        value
            .parse::<Date>()
            .ok()
            .and_then(|d| d.to_zoned(TimeZone::UTC).ok())
            .map(|z| z.timestamp())
            .ok_or(()),
    )
}

/// Write the lifetime fields and the ClientSecretExpiringSoon condition into `status`: the
/// condition exists only while an expiry is annotated (True within [`WARN_BEFORE`] or past it,
/// False before, Unknown for a value that is not a date). It never touches Ready: the integration
/// works until the date.
pub fn apply(
    status: &mut MailIntegrationStatus,
    client_secret: Option<Result<Timestamp, ()>>,
    grant_expires_at: Option<Timestamp>,
    generation: Option<i64>,
    now: Timestamp,
) {
    status.grant_expires_at = grant_expires_at.map(Time);
    status.client_secret_expires_at = client_secret.and_then(Result::ok).map(Time);
    let wanted = client_secret.map(|expiry| expiring_condition(expiry, now));
    let prev = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::CLIENT_SECRET_EXPIRING_SOON)
        .cloned();
    status
        .conditions
        .retain(|c| c.type_ != condition::CLIENT_SECRET_EXPIRING_SOON);
    if let Some((state, reason, message)) = wanted {
        let last_transition_time = match &prev {
            Some(p) if p.status == state => p.last_transition_time.clone(),
            _ => Time(now),
        };
        status.conditions.push(Condition {
            type_: condition::CLIENT_SECRET_EXPIRING_SOON.to_owned(),
            status: state.to_owned(),
            reason: reason.as_str().to_owned(),
            message: crate::reason::outside_text(&message, crate::reason::MAX_MESSAGE),
            observed_generation: generation,
            last_transition_time,
        });
    }
}

fn expiring_condition(
    expiry: Result<Timestamp, ()>,
    now: Timestamp,
) -> (&'static str, Reason, String) {
    let annotation = CLIENT_SECRET_EXPIRES_ANNOTATION;
    let Ok(at) = expiry else {
        return (
            "Unknown",
            Reason::ClientSecretExpiryInvalid,
            format!(
                "the client Secret's annotation {annotation} is not a date: {}",
                Reason::ClientSecretExpiryInvalid.hint()
            ),
        );
    };
    let when = at.strftime("%Y-%m-%dT%H:%M:%SZ");
    let left = at.duration_since(now);
    if left > WARN_BEFORE {
        return (
            "False",
            Reason::ClientSecretNotExpiring,
            format!("the client secret expires at {when} ({annotation})"),
        );
    }
    let days = left.as_secs() / 86_400;
    let message = if left.is_negative() {
        format!(
            "the client secret expired at {when} ({annotation}): the provider will refuse it, if it has not yet. {}",
            Reason::ClientSecretExpiringSoon.hint()
        )
    } else {
        format!(
            "the client secret expires at {when}, in {days} days ({annotation}). {}",
            Reason::ClientSecretExpiringSoon.hint()
        )
    };
    ("True", Reason::ClientSecretExpiringSoon, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(value: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.annotations = Some(
            [(
                CLIENT_SECRET_EXPIRES_ANNOTATION.to_owned(),
                value.to_owned(),
            )]
            .into_iter()
            .collect(),
        );
        s
    }

    fn now() -> Timestamp {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    fn condition_of(s: &MailIntegrationStatus) -> Option<(&str, &str)> {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::CLIENT_SECRET_EXPIRING_SOON)
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    #[test]
    fn dates_and_times_are_read_and_anything_else_is_invalid() {
        let day: Timestamp = "2027-01-15T00:00:00Z".parse().unwrap();
        assert_eq!(
            client_secret_expiry(Some(&secret("2027-01-15"))),
            Some(Ok(day))
        );
        assert_eq!(
            client_secret_expiry(Some(&secret(" 2027-01-15T00:00:00+00:00 "))),
            Some(Ok(day))
        );
        assert_eq!(
            client_secret_expiry(Some(&secret("15/01/2027"))),
            Some(Err(()))
        );
        assert_eq!(
            client_secret_expiry(Some(&secret(&"9".repeat(100)))),
            Some(Err(()))
        );
        assert_eq!(client_secret_expiry(Some(&Secret::default())), None);
        assert_eq!(client_secret_expiry(None), None);
    }

    #[test]
    fn the_warning_starts_30_days_ahead_and_leaves_ready_alone() {
        let mut s = MailIntegrationStatus::default();
        let in_days = |d: i64| {
            Ok(now()
                .checked_add(SignedDuration::from_hours(24 * d))
                .unwrap())
        };
        apply(&mut s, Some(in_days(31)), None, Some(1), now());
        assert_eq!(condition_of(&s), Some(("False", "ClientSecretNotExpiring")));
        apply(&mut s, Some(in_days(29)), None, Some(1), now());
        assert_eq!(condition_of(&s), Some(("True", "ClientSecretExpiringSoon")));
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == "ClientSecretExpiringSoon")
            .unwrap();
        assert!(c.message.contains("in 29 days"), "{}", c.message);
        assert_eq!(
            s.client_secret_expires_at.as_ref().map(|t| t.0),
            in_days(29).ok()
        );
        apply(&mut s, Some(in_days(-1)), None, Some(1), now());
        assert!(s.conditions[0].message.contains("expired at"));
        apply(&mut s, Some(Err(())), None, Some(1), now());
        assert_eq!(
            condition_of(&s),
            Some(("Unknown", "ClientSecretExpiryInvalid"))
        );
        assert_eq!(s.client_secret_expires_at, None);
        // The annotation removed: the condition goes.
        apply(&mut s, None, None, Some(1), now());
        assert_eq!(condition_of(&s), None);
        assert!(s.conditions.iter().all(|c| c.type_ != "Ready"));
    }

    #[test]
    fn an_unchanged_state_keeps_its_transition_time() {
        let mut s = MailIntegrationStatus::default();
        let soon = Ok(now().checked_add(SignedDuration::from_hours(24)).unwrap());
        apply(&mut s, Some(soon), None, None, now());
        let first = s.conditions[0].last_transition_time.clone();
        let later = now().checked_add(SignedDuration::from_hours(1)).unwrap();
        apply(&mut s, Some(soon), None, None, later);
        assert_eq!(s.conditions[0].last_transition_time, first);
    }

    #[test]
    fn an_announced_grant_end_is_shown() {
        let mut s = MailIntegrationStatus::default();
        let end: Timestamp = "2026-12-08T12:00:00Z".parse().unwrap();
        apply(&mut s, None, Some(end), None, now());
        assert_eq!(s.grant_expires_at.map(|t| t.0), Some(end));
    }
}
