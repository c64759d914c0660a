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
//! A refresh whose answer carries no new refresh token does not take its mark off: the mark (who
//! presented, when) stays true, and the token Secret the refresh publishes records it
//! ([`REFRESHED_UNDER_ANNOTATION`]). A mark that the token Secret records is resolved: its refresh
//! was answered and nothing was rotated, so the next refresh, by any process, goes ahead at once
//! (and writes its own mark over it). A mark that the token Secret does not record is in doubt, as
//! before: fresh, or stale and cut off. Mark values never repeat on a grant (a process never writes
//! the value that is there or recorded: it waits for the next second), so a record can only ever
//! resolve the one refresh that published it.
//!
//! What it costs: one grant write per refresh (the mark), two when the provider rotates (the mark,
//! and the store that takes it off), paid only for providers that may revoke a refresh token once
//! it is rotated ([`needs_mark`]). Google never rotates refresh tokens and Microsoft's old refresh
//! token stays valid after a rotation, so presenting one twice is harmless there: those refreshes
//! write no mark. docs/architecture.md "What a refresh costs the API server" has the crash windows.
//!
//! [`Reason::GrantLostInFlight`]: crate::reason::Reason::GrantLostInFlight

use crate::api::{MailIntegrationSpec, ProviderKind};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use std::time::Duration;

/// The annotation on the grant Secret while a refresh is in flight: `HOLDER RFC3339`.
pub const REFRESH_IN_FLIGHT_ANNOTATION: &str = "mailintegration.dev/refresh-in-flight";

/// The annotation on the token Secret: the mark (its value, as on the grant Secret) of the refresh
/// that published the token. Written with the token, only after the provider answered and a
/// rotated refresh token (if any) was stored; a grant mark equal to it is resolved.
pub const REFRESHED_UNDER_ANNOTATION: &str = "mailintegration.dev/refreshed-under";

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
        Self::parse_strict(value)
            .unwrap_or_else(|| Mark::new("(unreadable mark)", Timestamp::UNIX_EPOCH))
    }

    /// A well-formed annotation value, or `None`.
    fn parse_strict(value: &str) -> Option<Mark> {
        let (holder, since) = value.rsplit_once(' ')?;
        let since = since.parse::<Timestamp>().ok()?;
        let holder = holder.trim();
        (!holder.is_empty()).then(|| Mark::new(holder, since))
    }
}

/// The raw value of the mark on a grant Secret, if any.
pub fn mark_value(grant_secret: &Secret) -> Option<&str> {
    annotation(grant_secret, REFRESH_IN_FLIGHT_ANNOTATION)
}

/// The mark the token Secret records as the one its token was refreshed under, if any.
pub fn recorded(token_secret: &Secret) -> Option<&str> {
    annotation(token_secret, REFRESHED_UNDER_ANNOTATION)
}

fn annotation<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The grant's mark when the token Secret records it: a refresh answered without a rotation
/// (or after its rotation was stored) left it. Only a well-formed value, equal as written.
pub fn resolved_by_record(grant_secret: &Secret, token_secret: Option<&Secret>) -> Option<Mark> {
    let value = mark_value(grant_secret)?;
    (token_secret.and_then(recorded) == Some(value))
        .then(|| Mark::parse_strict(value))
        .flatten()
}

/// Whether a mark with `value` may be written now: not when the grant already holds that value,
/// nor the token Secret records it, nor this process resolved it (the same holder in the same
/// second). A record must only ever match the refresh that wrote it.
pub fn value_taken(value: &str, taken: &[Option<&str>]) -> bool {
    taken.iter().flatten().any(|t| *t == value)
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

/// Judge `mark` at `now` for the process `me`. `resolved`: marks known to be resolved — the one
/// this process wrote for its last attempt when that attempt ended with an answer from the
/// provider that rotated nothing, and the one the token Secret records ([`resolved_by_record`]).
pub fn state(
    mark: Option<Mark>,
    me: &str,
    resolved: &[Option<&Mark>],
    now: Timestamp,
) -> MarkState {
    let Some(mark) = mark else {
        return MarkState::Clear;
    };
    if resolved.iter().flatten().any(|r| **r == mark) {
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
                state(Some(g), "me", &[], t("2026-12-01T10:00:00Z")),
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
            state(Some(other.clone()), "me", &[], soon),
            MarkState::Fresh(other.clone())
        );
        assert_eq!(
            wait_for(&other, soon),
            IN_FLIGHT_WINDOW - Duration::from_secs(10)
        );
        let late = crate::time::after(since, IN_FLIGHT_WINDOW);
        assert_eq!(
            state(Some(other.clone()), "me", &[], late),
            MarkState::Stale(other.clone())
        );
        // A mark dated far in the future (a clock gone wrong, or a hostile edit) does not block
        // the grant forever.
        let future = Mark::new("operator-1/ff", t("2099-01-01T00:00:00Z"));
        assert_eq!(
            state(Some(future.clone()), "me", &[], soon),
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
            state(Some(mine.clone()), "me", &[], now),
            MarkState::Stale(mine.clone())
        );
        // Left by an attempt the provider answered with an error: nothing was rotated.
        assert_eq!(
            state(Some(mine.clone()), "me", &[Some(&mine)], now),
            MarkState::Clear
        );
        assert_eq!(state(None, "me", &[], now), MarkState::Clear);
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
            state(Some(m.clone()), "operator-1/bb", &[], other_now),
            MarkState::Fresh(m)
        );
    }

    fn annotated(key: &str, value: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.annotations = Some([(key.to_owned(), value.to_owned())].into());
        s
    }

    #[test]
    fn a_mark_the_token_secret_records_is_resolved_and_only_that_one() {
        let since = t("2026-12-01T10:00:00Z");
        let m = Mark::new("operator-0/aa", since);
        let grant = annotated(REFRESH_IN_FLIGHT_ANNOTATION, &m.value());
        let token = annotated(REFRESHED_UNDER_ANNOTATION, &m.value());
        let resolved = resolved_by_record(&grant, Some(&token));
        assert_eq!(resolved.as_ref(), Some(&m));
        // Another holder's resolved mark, within the window: no wait, no cut-off.
        let soon = crate::time::after(since, Duration::from_secs(5));
        assert_eq!(
            state(Some(m.clone()), "operator-1/bb", &[resolved.as_ref()], soon),
            MarkState::Clear
        );
        // A newer mark than the recorded one: in flight (fresh) or cut off (stale), as before.
        let newer = Mark::new(
            "operator-0/aa",
            crate::time::after(since, Duration::from_secs(1)),
        );
        let grant2 = annotated(REFRESH_IN_FLIGHT_ANNOTATION, &newer.value());
        assert_eq!(resolved_by_record(&grant2, Some(&token)), None);
        assert_eq!(
            state(Some(newer.clone()), "operator-1/bb", &[None], soon),
            MarkState::Fresh(newer)
        );
        // No token Secret, no record, a grant without a mark: nothing resolved.
        assert_eq!(resolved_by_record(&grant, None), None);
        assert_eq!(resolved_by_record(&Secret::default(), Some(&token)), None);
        // Garbage on both sides is not a record (it would otherwise parse to the same
        // "unreadable" mark).
        let g = annotated(REFRESH_IN_FLIGHT_ANNOTATION, "garbage");
        let r = annotated(REFRESHED_UNDER_ANNOTATION, "garbage");
        assert_eq!(resolved_by_record(&g, Some(&r)), None);
        // A value already on the grant or recorded is never written again.
        assert!(value_taken(&m.value(), &[None, Some(&m.value())]));
        assert!(!value_taken(&newer_value(&m), &[Some(&m.value()), None]));
    }

    fn newer_value(m: &Mark) -> String {
        Mark::new(
            &m.holder,
            crate::time::after(m.since, Duration::from_secs(1)),
        )
        .value()
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
