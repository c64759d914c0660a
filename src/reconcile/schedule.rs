//! When an integration's next refresh may come, as pure functions of the integration, its
//! token's lifetime and the clock: the window of seconds a refresh may be announced for
//! ([`refresh_window`], whose second [`super::slots`] picks), the time it is due
//! ([`refresh_due_at`]), and the lowest interval between two token requests whatever the provider
//! says ([`Pace`], `--min-refresh-interval`). Re-exported by [`super::decide`].

use crate::api::MailIntegration;
use jiff::Timestamp;
use kube::ResourceExt;
use std::time::Duration;

/// How often the operator may call an integration's token endpoint, whatever the provider or the
/// integration's author asks for (`--min-refresh-interval`; see docs/security.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// No provider call for an integration sooner than this after its last one: a token that lives
    /// shorter is refreshed once per interval (and reported, [`lifetime_too_short`]), and a refresh
    /// request (the annotation) within it waits until the interval is over.
    pub min_refresh_interval: Duration,
}

/// The default of `--min-refresh-interval`: shorter than two thirds of the shortest access-token
/// lifetime providers configure (Keycloak's lowest common setting is one minute), so that no real
/// provider's tokens are affected.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

impl Default for Pace {
    fn default() -> Self {
        Self {
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
        }
    }
}

impl Pace {
    /// The first instant a provider call may follow one made at `last` (`None`: no call known).
    pub fn next_call_at(&self, last: Option<Timestamp>) -> Option<Timestamp> {
        last.map(|t| crate::time::after(t, self.min_refresh_interval))
    }
}

/// Whether a token issued at `issued_at` and expiring at `expires_at` expires before the pace
/// allows its next refresh: it is published, but expired part of the time.
pub fn lifetime_too_short(issued_at: Timestamp, expires_at: Timestamp, pace: Pace) -> bool {
    expires_at <= crate::time::after(issued_at, pace.min_refresh_interval)
}

/// A per-resource spread, for a token whose status announces no refresh time of its own (see
/// [`refresh_due_at`]): deterministic (a hash of the UID), so a restart computes the same due time.
pub fn jitter(uid: &str, window: Duration) -> Duration {
    let max = window.as_secs();
    if max == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: stable across processes and Rust versions, unlike std's RandomState.
    let hash = uid.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    Duration::from_secs(hash.checked_rem(max.saturating_add(1)).unwrap_or(0))
}

/// The seconds a token's refresh may be announced for (see [`super::slots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub earliest: Timestamp,
    /// `expiry - refreshBefore`.
    pub latest: Timestamp,
}

impl Window {
    /// Whether `t` lies in the window, give or take the second that status timestamps round off.
    pub fn holds(&self, t: Timestamp) -> bool {
        let slack = Duration::from_secs(1);
        t >= crate::time::before(self.earliest, slack)
            && t <= crate::time::after(self.latest, slack)
    }
}

/// The longest spread of a refresh window.
const MAX_SPREAD: Duration = Duration::from_secs(3600);

/// When the refresh of a token issued at `issued_at` (if known) and expiring at `expires_at` may
/// come: from `expiry - refreshBefore - spread` to `expiry - refreshBefore`, the spread being a fifth
/// of the lifetime (as kubelet rotates its certificates between 70 and 90 % of theirs), at most an
/// hour; a tenth of refreshBefore (at most 30 s) when the lifetime is unknown. Tokens that live less
/// than three times `refreshBefore` (short-lived test or provider tokens) are refreshed from two
/// thirds of their lifetime instead, so that they do not loop. Never earlier than
/// `pace.min_refresh_interval` after `issued_at`, whatever the token's lifetime (an `expires_in` of 0
/// must not make a refresh loop).
pub fn refresh_window(
    mi: &MailIntegration,
    issued_at: Option<Timestamp>,
    expires_at: Timestamp,
    pace: Pace,
) -> Window {
    let mut before = mi.spec.refresh_before();
    let mut spread = before
        .checked_div(10)
        .unwrap_or_default()
        .min(Duration::from_secs(30));
    if let Some(lifetime) = issued_at
        .and_then(|t| Duration::try_from(expires_at.duration_since(t)).ok())
        .filter(|l| !l.is_zero())
    {
        before = before.min(lifetime.checked_div(3).unwrap_or_default());
        spread = lifetime.checked_div(5).unwrap_or_default().min(MAX_SPREAD);
    }
    let latest = crate::time::before(expires_at, before);
    let earliest = crate::time::before(latest, spread);
    // (A token that expired before it was issued is refreshed as its window says: no floor from a
    // time that cannot be its issue.)
    match pace.next_call_at(issued_at.filter(|t| *t <= expires_at)) {
        Some(floor) => Window {
            earliest: earliest.max(floor),
            latest: latest.max(floor),
        },
        None => Window { earliest, latest },
    }
}

/// When the published token must be refreshed: the time the status announced for it, when it
/// announced one for this token inside its window (the second [`super::slots`] chose); else a
/// per-resource point of the window ([`jitter`]).
pub fn refresh_due_at(mi: &MailIntegration, expires_at: Timestamp, pace: Pace) -> Timestamp {
    let status = mi.status.as_ref();
    let issued_at = status
        .and_then(|s| s.last_refresh_time.as_ref())
        .map(|t| t.0);
    let window = refresh_window(mi, issued_at, expires_at, pace);
    let announced = status
        .filter(|s| s.access_token_expires_at.as_ref().map(|t| t.0) == Some(expires_at))
        .and_then(|s| s.next_refresh_time.as_ref())
        .map(|t| t.0)
        .filter(|t| window.holds(*t));
    announced.unwrap_or_else(|| {
        let spread =
            Duration::try_from(window.latest.duration_since(window.earliest)).unwrap_or_default();
        crate::time::before(
            window.latest,
            jitter(mi.uid().as_deref().unwrap_or_default(), spread),
        )
    })
}
