//! The write-ahead mark of a refresh: before a refresh token is presented to a provider that may
//! rotate it, the grant Secret gets the annotation [`REFRESH_IN_FLIGHT_ANNOTATION`] (holder and start
//! time), written with the resourceVersion read as its precondition. The new refresh token is then
//! stored, and the mark removed, in one write with the resourceVersion of the mark as precondition.
//!
//! What the mark buys:
//! - **One presenter at a time, across processes.** Two operators (a partitioned old leader and a
//!   new one, or two replicas started without leader election) cannot both mark the same grant: the
//!   second write fails with 409, and the mark it then reads is another holder's, fresh — it waits.
//! - **A cut-off refresh is known.** A mark left behind by a holder that is gone (kill -9, lost
//!   Lease) says the refresh token may already be spent. The next holder tries it once: a provider
//!   with a reuse grace (Okta, Auth0) or one that never received the request answers with tokens;
//!   a strict one refuses, and the integration reports [`Reason::GrantLostInFlight`] instead of
//!   presenting the spent token again and again.
//!
//! What it costs: one more grant write per refresh, paid only for providers that may revoke a
//! refresh token once it is rotated ([`needs_mark`]). Google never rotates refresh tokens and
//! Microsoft's old refresh token stays valid after a rotation, so presenting one twice is harmless
//! there: those refreshes write nothing more than before.
//!
//! [`Reason::GrantLostInFlight`]: crate::reason::Reason::GrantLostInFlight

use crate::api::{MailIntegrationSpec, ProviderKind};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use std::time::Duration;

/// The annotation on the grant Secret while a refresh is in flight: `HOLDER RFC3339`.
pub const REFRESH_IN_FLIGHT_ANNOTATION: &str = "mailintegration.dev/refresh-in-flight";

/// How long another holder's mark is taken to mean "still in flight": longer than a refresh can
/// take from the time in its mark to its store — the mark's own write ([`MARK_WRITE_BUDGET`],
/// 10 s), the provider request timeout ([`crate::oauth::DEFAULT_REQUEST_TIMEOUT`], 30 s) and the
/// bounded retries of the grant write ([`super::secrets::STORE_DEADLINE`], 20 s) — with room for
/// clock skew between the two processes.
pub const IN_FLIGHT_WINDOW: Duration = Duration::from_secs(75);

/// The room [`IN_FLIGHT_WINDOW`] leaves for clock skew between two operator processes.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(14);

/// The longest a mark's own write may take, from the time written into the mark to the API
/// server's acknowledgement, for its refresh to go ahead: what [`IN_FLIGHT_WINDOW`] leaves after the
/// rest of a refresh's worst case (the provider request, the store) and [`CLOCK_SKEW_ALLOWANCE`].
/// The write is abandoned at this bound (the client, `crate::kube_client`, retries 429/503/504 for up to
/// a minute), and a write acknowledged later than it is not followed by a presentation: another
/// process may take the mark for stale before this one's refresh could end.
pub const MARK_WRITE_BUDGET: Duration = Duration::from_secs(10);

/// How long this process must have seen another holder's stale mark, unchanged, before it takes
/// the mark's refresh for cut off and presents the stored refresh token. An old leader that was cut
/// off from the API server together with this process (an API server outage) may hold the rotated
/// refresh token in memory and be retrying its store (every second, see
/// [`super::held::store_held`]); it stores within seconds of the API server's return, before this
/// grace ends, so the stored token it spent is never presented again. A mark left by a process
/// that is gone costs this much longer to recover from.
pub const HOLDER_GRACE: Duration = Duration::from_secs(20);

/// `d` at the test-only protocol scale ([`crate::time::set_test_scale`]).
pub fn scaled(d: Duration) -> Duration {
    crate::time::scaled(d)
}

/// [`IN_FLIGHT_WINDOW`] at the protocol scale (its parts divided, the mark's resolution not).
pub fn in_flight_window() -> Duration {
    scaled(IN_FLIGHT_WINDOW.saturating_sub(MARK_TIME_RESOLUTION))
        .saturating_add(MARK_TIME_RESOLUTION)
}

/// [`MARK_WRITE_BUDGET`] at the protocol scale.
pub fn mark_write_budget() -> Duration {
    scaled(MARK_WRITE_BUDGET)
}

/// [`HOLDER_GRACE`] at the protocol scale.
pub fn holder_grace() -> Duration {
    scaled(HOLDER_GRACE)
}

/// The mark's time is written in whole seconds, cut down: up to this much older than it is.
const MARK_TIME_RESOLUTION: Duration = Duration::from_secs(1);

const _: () = assert!(
    MARK_WRITE_BUDGET.as_secs()
        + crate::oauth::DEFAULT_REQUEST_TIMEOUT.as_secs()
        + super::secrets::STORE_DEADLINE.as_secs()
        + CLOCK_SKEW_ALLOWANCE.as_secs()
        + MARK_TIME_RESOLUTION.as_secs()
        <= IN_FLIGHT_WINDOW.as_secs()
);

/// Whether a refresh whose mark was acknowledged `since_mark` after the time written into it (its
/// sub-second part included: the mark is written in whole seconds) may present its refresh token.
pub fn may_present(since_mark: Duration) -> bool {
    since_mark <= mark_write_budget()
}

/// Whether refreshes of this integration are marked: providers that may invalidate a refresh
/// token once they have rotated it. Generic OIDC servers may (oidc-provider, Okta, Auth0, Keycloak
/// with "Revoke Refresh Token"); Google and Microsoft do not.
pub fn needs_mark(spec: &MailIntegrationSpec) -> bool {
    matches!(spec.provider, ProviderKind::Oidc)
}

/// A mark as read from a grant Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The operator process that wrote it (`POD/NONCE`).
    pub holder: String,
    /// When its refresh started.
    pub since: Timestamp,
}

impl Mark {
    pub fn new(holder: &str, since: Timestamp) -> Self {
        Self {
            holder: holder.to_owned(),
            since,
        }
    }

    /// The annotation's value.
    pub fn value(&self) -> String {
        format!(
            "{} {}",
            self.holder,
            self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    }

    /// Parse an annotation value. Anything else (edited by hand, truncated) is a mark of an
    /// unknown holder from the distant past: stale, so treated as cut off.
    pub fn parse(value: &str) -> Mark {
        value
            .rsplit_once(' ')
            .and_then(|(holder, since)| {
                let since = since.parse::<Timestamp>().ok()?;
                let holder = holder.trim();
                (!holder.is_empty()).then(|| Mark::new(holder, since))
            })
            .unwrap_or_else(|| Mark::new("(unreadable mark)", Timestamp::UNIX_EPOCH))
    }
}

/// The mark on a grant Secret, if any.
pub fn mark_of(secret: &Secret) -> Option<Mark> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(REFRESH_IN_FLIGHT_ANNOTATION)
        .map(|v| Mark::parse(v))
}

/// What a mark means for a refresh that is about to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkState {
    /// No mark, or one this process left after an attempt that got a definite answer (the
    /// provider did not rotate): refresh as usual.
    Clear,
    /// Another holder marked the grant within [`IN_FLIGHT_WINDOW`]: it may be refreshing right now.
    Fresh(Mark),
    /// A mark whose refresh may have been cut off after the provider rotated the token: try the
    /// stored token once; if the provider refuses it, the grant is lost.
    Stale(Mark),
}

/// Judge `mark` at `now` for the process `me`. `resolved`: the mark this process wrote for its
/// last attempt when that attempt ended with an answer from the provider that rotated nothing.
pub fn state(mark: Option<Mark>, me: &str, resolved: Option<&Mark>, now: Timestamp) -> MarkState {
    let Some(mark) = mark else {
        return MarkState::Clear;
    };
    if resolved == Some(&mark) {
        return MarkState::Clear;
    }
    let window = in_flight_window();
    let fresh_until = crate::time::after(mark.since, window);
    if mark.holder != me && now < fresh_until && mark.since <= crate::time::after(now, window) {
        return MarkState::Fresh(mark);
    }
    MarkState::Stale(mark)
}

/// How long to wait before a fresh mark of another holder turns stale.
pub fn wait_for(mark: &Mark, now: Timestamp) -> Duration {
    let window = in_flight_window();
    let until = crate::time::after(mark.since, window);
    Duration::try_from(until.duration_since(now))
        .unwrap_or_default()
        .clamp(Duration::from_secs(1), window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_mark_round_trips_and_garbage_is_stale() {
        let m = Mark::new("operator-0/1a2b", t("2026-12-01T10:00:00Z"));
        assert_eq!(m.value(), "operator-0/1a2b 2026-12-01T10:00:00Z");
        assert_eq!(Mark::parse(&m.value()), m);
        for garbage in [
            "",
            " ",
            "x",
            "holder not-a-time",
            " 2026-12-01T10:00:00Z",
            "\u{0}",
        ] {
            let g = Mark::parse(garbage);
            assert_eq!(g.since, Timestamp::UNIX_EPOCH, "{garbage:?}");
            assert_eq!(
                state(Some(g), "me", None, t("2026-12-01T10:00:00Z")),
                MarkState::Stale(Mark::parse(garbage))
            );
        }
    }

    #[test]
    fn another_holders_mark_is_fresh_for_the_window_then_stale() {
        let since = t("2026-12-01T10:00:00Z");
        let other = Mark::new("operator-1/ff", since);
        let soon = crate::time::after(since, Duration::from_secs(10));
        assert_eq!(
            state(Some(other.clone()), "me", None, soon),
            MarkState::Fresh(other.clone())
        );
        assert_eq!(
            wait_for(&other, soon),
            IN_FLIGHT_WINDOW - Duration::from_secs(10)
        );
        let late = crate::time::after(since, IN_FLIGHT_WINDOW);
        assert_eq!(
            state(Some(other.clone()), "me", None, late),
            MarkState::Stale(other.clone())
        );
        // A mark dated far in the future (a clock gone wrong, or a hostile edit) does not block
        // the grant forever.
        let future = Mark::new("operator-1/ff", t("2099-01-01T00:00:00Z"));
        assert_eq!(
            state(Some(future.clone()), "me", None, soon),
            MarkState::Stale(future)
        );
    }

    #[test]
    fn own_marks_are_stale_unless_their_attempt_was_answered() {
        let since = t("2026-12-01T10:00:00Z");
        let mine = Mark::new("me", since);
        let now = crate::time::after(since, Duration::from_secs(5));
        // Left by an attempt of this process that was cut (a timeout after sending): in doubt.
        assert_eq!(
            state(Some(mine.clone()), "me", None, now),
            MarkState::Stale(mine.clone())
        );
        // Left by an attempt the provider answered with an error: nothing was rotated.
        assert_eq!(
            state(Some(mine.clone()), "me", Some(&mine), now),
            MarkState::Clear
        );
        assert_eq!(state(None, "me", None, now), MarkState::Clear);
    }

    #[test]
    fn a_mark_acknowledged_late_is_not_presented_under() {
        assert!(may_present(Duration::ZERO));
        assert!(may_present(Duration::from_millis(9_999)));
        assert!(may_present(MARK_WRITE_BUDGET));
        assert!(!may_present(MARK_WRITE_BUDGET + Duration::from_millis(1)));
        assert!(!may_present(Duration::MAX));
        // The holder's worst case after the budget still ends inside the window as another
        // process, its clock up to the allowance ahead, sees it.
        let since = t("2026-12-01T10:00:00Z");
        let holder_done = MARK_WRITE_BUDGET
            + crate::oauth::DEFAULT_REQUEST_TIMEOUT
            + super::super::secrets::STORE_DEADLINE;
        let other_now = crate::time::after(since, holder_done + CLOCK_SKEW_ALLOWANCE);
        let m = Mark::new("operator-0/aa", since);
        assert_eq!(
            state(Some(m.clone()), "operator-1/bb", None, other_now),
            MarkState::Fresh(m)
        );
    }

    #[test]
    fn only_rotating_providers_are_marked() {
        let mut spec: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
            "provider": "Google",
            "oauth": {"clientSecretRef": {"name": "c"}},
            "mailbox": {"address": "a@example.com"},
            "tokenSecret": {"name": "t"},
        }))
        .unwrap();
        assert!(!needs_mark(&spec));
        spec.provider = ProviderKind::Microsoft;
        assert!(!needs_mark(&spec));
        spec.provider = ProviderKind::Oidc;
        assert!(needs_mark(&spec));
    }
}
