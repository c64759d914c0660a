//! The provider's backoff kept in the status (`status.providerBackoff`): what the operator's
//! memory of transient failures ([`Backoff`]) looks like there, and what a process that has no
//! memory of an integration (it just started, or just became the leader) takes back from it. A
//! provider that answered 429 with a Retry-After is not called again before it, restart or not.

use super::{
    decide::{Backoff, Outcome},
    refresh::MAX_RETRY_AFTER,
};
use crate::api::ProviderBackoff;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// `backoff` as the status shows it after `outcome`; `stored` is what the status shows now (kept
/// as it is while the backoff is the same, so the status is written only when it changes).
pub fn to_status(
    backoff: Backoff,
    outcome: &Outcome,
    stored: Option<&ProviderBackoff>,
) -> Option<ProviderBackoff> {
    // The status holds whole seconds (metav1.Time): rounded up, so that a process reading it
    // back never calls sooner, and compared as stored, so that it is written only when it changes.
    let until = whole_second_up(backoff.not_before.filter(|_| backoff.failures > 0)?);
    if let Some(s) = stored
        && s.until.0 == until
        && s.attempts == backoff.failures
    {
        return Some(s.clone());
    }
    let reason = match outcome {
        Outcome::TransientFailure { reason, .. } => reason.clone(),
        Outcome::GrantNotStored { .. } => crate::reason::Reason::GrantNotStored.as_str().into(),
        _ => stored.map_or_else(|| "TransientFailure".into(), |s| s.reason.clone()),
    };
    Some(ProviderBackoff {
        until: Time(until),
        attempts: backoff.failures,
        reason,
    })
}

/// `t` rounded up to the whole second.
fn whole_second_up(t: Timestamp) -> Timestamp {
    if t.subsec_nanosecond() == 0 {
        return t;
    }
    t.as_second()
        .checked_add(1)
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(t)
}

/// The backoff `stored` in the status means at `now`. The status is written by whoever may
/// write it: a time beyond the longest wait the operator itself ever sets ([`MAX_RETRY_AFTER`]
/// from now) is cut to it, so a hand-written `until` cannot park an integration for years.
pub fn recall(stored: Option<&ProviderBackoff>, now: Timestamp) -> Backoff {
    let Some(s) = stored else {
        return Backoff::default();
    };
    Backoff {
        failures: s.attempts,
        not_before: Some(s.until.0.min(crate::time::after(now, MAX_RETRY_AFTER))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn transient(reason: &str) -> Outcome {
        Outcome::TransientFailure {
            reason: reason.into(),
            message: String::new(),
            retry_in: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_backoff_goes_to_the_status_and_comes_back_from_it() {
        let b = Backoff {
            failures: 3,
            not_before: Some(t(600)),
        };
        let stored = to_status(b, &transient("RateLimited"), None).unwrap();
        assert_eq!(stored.until.0, t(600));
        assert_eq!(stored.attempts, 3);
        assert_eq!(stored.reason, "RateLimited");
        assert_eq!(recall(Some(&stored), t(0)), b);
        // Waiting it out (BackingOff) keeps what is stored: nothing to write.
        assert_eq!(
            to_status(b, &Outcome::BackingOff, Some(&stored)),
            Some(stored.clone())
        );
        // The next failure is written with its own reason.
        let next = Backoff {
            failures: 4,
            not_before: Some(t(1200)),
        };
        let again = to_status(next, &Outcome::BackingOff, Some(&stored)).unwrap();
        assert_eq!((again.attempts, again.reason.as_str()), (4, "RateLimited"));
        // A success clears the memory, and so the status.
        assert_eq!(
            to_status(Backoff::default(), &Outcome::Idle, Some(&stored)),
            None
        );
        assert_eq!(recall(None, t(0)), Backoff::default());
    }

    #[test]
    fn a_backoff_read_back_from_the_api_server_is_not_written_again() {
        // The API server keeps whole seconds: what the next reconcile compares with.
        let b = Backoff {
            failures: 1,
            not_before: Some(
                t(600)
                    .checked_add(jiff::SignedDuration::from_millis(250))
                    .unwrap(),
            ),
        };
        let written = to_status(b, &transient("RateLimited"), None).unwrap();
        assert_eq!(written.until.0, t(601), "rounded up, never sooner");
        let stored: ProviderBackoff =
            serde_json::from_value(serde_json::to_value(&written).unwrap()).unwrap();
        assert_eq!(
            to_status(b, &Outcome::BackingOff, Some(&stored)),
            Some(stored.clone())
        );
        assert_eq!(recall(Some(&stored), t(0)).not_before, Some(t(601)));
    }

    #[test]
    fn a_stored_time_beyond_the_longest_wait_is_cut_to_it() {
        let stored = ProviderBackoff {
            until: Time(Timestamp::MAX),
            attempts: u32::MAX,
            reason: "x".into(),
        };
        let b = recall(Some(&stored), t(0));
        assert_eq!(
            b.not_before,
            Some(crate::time::after(t(0), MAX_RETRY_AFTER))
        );
        assert_eq!(b.failures, u32::MAX);
        // And the next failure after it does not overflow.
        let (next, _) = super::super::refresh::next_backoff(b, None, t(0));
        assert_eq!(next.failures, u32::MAX);
    }
}
