//! Timestamp arithmetic that cannot panic. jiff's `+`/`-` panic when the result leaves jiff's
//! range (years -9999..=9999), and the inputs here come from outside (a token Secret's `expiry`, a
//! provider's `Retry-After`, `expires_in`): such values saturate at the ends of the range instead.

use jiff::{SignedDuration, Timestamp};
use std::time::Duration;

static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Test only (docs/operations.md, "Settings for tests only"): divide the protocol's windows by
/// `n` (1-10) so that a test of a fault longer than a window need not wait minutes — the
/// write-ahead mark's window (`reconcile::inflight::in_flight_window`, less the mark's 1 s
/// resolution), the mark-write budget, the holder grace, the provider request timeout, the grant
/// store deadline, the held-grant store attempt, and `spec.mailbox.checkInterval` (whose CRD minimum
/// is 1m). The parts of the mark's window are divided alike, so the window still covers a
/// refresh's worst case. Unset (production: the chart and the kustomize base never set it), the
/// scale is 1. Set once, at start; a second call changes nothing.
pub fn set_test_scale(n: u32) {
    let _ = SCALE.set(n.clamp(1, 10));
}

/// `d` divided by the test-only protocol scale (1 unless [`set_test_scale`] was called).
pub fn scaled(d: Duration) -> Duration {
    d.checked_div(SCALE.get().copied().unwrap_or(1))
        .unwrap_or(d)
}

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
