//! Timestamp arithmetic that cannot panic. jiff's `+`/`-` panic when the result leaves jiff's
//! range (years -9999..=9999), and the inputs here come from outside (a token Secret's `expiry`, a
//! provider's `Retry-After`, `expires_in`): such values saturate at the ends of the range instead.

use jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// `t + d`, saturating at [`Timestamp::MAX`].
pub fn after(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// `t + d` for a signed duration, saturating at either end.
pub fn shifted(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.saturating_add(d).unwrap_or(if d.is_negative() {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

/// `t - d`, saturating at [`Timestamp::MIN`].
pub fn before(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_sub(d).unwrap_or(Timestamp::MIN)
}

/// How long from `now` until `t`; zero when `t` is not after `now`.
pub fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// `t` as RFC 3339 in UTC with whole seconds, as annotations and messages show it.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates_at_the_ends_of_the_range() {
        let now: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        assert_eq!(after(now, Duration::MAX), Timestamp::MAX);
        assert_eq!(
            after(now, Duration::from_secs(1_000_000_000_000)),
            Timestamp::MAX
        );
        assert_eq!(
            before(Timestamp::MIN, Duration::from_secs(60)),
            Timestamp::MIN
        );
        assert_eq!(
            shifted(Timestamp::MIN, SignedDuration::from_mins(-5)),
            Timestamp::MIN
        );
        assert_eq!(
            shifted(Timestamp::MAX, SignedDuration::from_mins(5)),
            Timestamp::MAX
        );
        assert_eq!(until(now, Timestamp::MIN), Duration::ZERO);
        assert!(until(Timestamp::MIN, Timestamp::MAX).as_secs() > 0);
        assert_eq!(
            after(now, Duration::from_secs(90)),
            "2026-12-01T00:01:30Z".parse().unwrap()
        );
    }
}
