use super::*;
use crate::{
    api::{MailIntegrationSpec, condition},
    reconcile::observed::{ClientCredentials, Grant, PublishedToken},
    secret::SecretValue,
};
use jiff::SignedDuration;

/// A pace that never binds in the tests of the window's shape.
const FAST: Pace = Pace {
    min_refresh_interval: Duration::from_secs(1),
};

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn integration(extra: serde_json::Value) -> MailIntegration {
    let mut spec = serde_json::json!({
        "provider": "Google",
        "mailbox": {"address": "support@example.com"},
        "oauth": {"clientSecretRef": {"name": "client"}},
        "tokenSecret": {"name": "token"},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let spec: MailIntegrationSpec = serde_json::from_value(spec).unwrap();
    let mut mi = MailIntegration::new("inbox", spec);
    mi.metadata.namespace = Some("ns".into());
    mi.metadata.uid = Some("0b6f3c8e-1111-2222-3333-444455556666".into());
    mi.metadata.generation = Some(1);
    mi
}

struct World {
    mi: MailIntegration,
    client_ok: bool,
    grant: bool,
    token_expiry: Option<Timestamp>,
    now: Timestamp,
}

impl World {
    fn new() -> Self {
        Self {
            mi: integration(serde_json::json!({})),
            client_ok: true,
            grant: true,
            token_expiry: None,
            now: t("2026-11-28T10:00:00Z"),
        }
    }
    fn observed(&self) -> Observed<'_> {
        Observed {
            integration: &self.mi,
            client: if self.client_ok {
                Ok(ClientCredentials {
                    signing_key: None,
                    client_id: "id".into(),
                    client_secret: SecretValue::new("cs"),

                    owner: Default::default(),
                })
            } else {
                Err(ClientSecretProblem::NotFound {
                    name: "client".into(),
                })
            },
            client_version: Some("7".into()),
            grant: self.grant.then(|| Grant {
                refresh_token: SecretValue::new("rt"),
                account: Some("support@example.com".into()),
                scopes: vec![],
                issued_at: None,
                refresh_token_expires_at: None,
                token_endpoint: None,
                client_id: None,
                revocation_endpoint: None,
                resource_version: Some("11".into()),
            }),
            token: self.token_expiry.map(|e| PublishedToken {
                access_token: SecretValue::new("at"),
                expires_at: e,
            }),
            conflict: None,
            now: self.now,
        }
    }
    fn decide(&self) -> Action {
        decide(&self.observed(), Backoff::default())
    }
    /// Apply `outcome` to the stored status, as the operator would.
    fn store(&mut self, outcome: &Outcome) -> MailIntegrationStatus {
        let s = status_after(&self.observed(), outcome, None);
        self.mi.status = Some(s.clone());
        s
    }
    /// [`Self::store`] of a refresh that published a token expiring at `expires_at`, announcing
    /// the latest second of its window.
    fn refreshed(&mut self, expires_at: Timestamp) -> MailIntegrationStatus {
        let next_refresh_at = latest(self, expires_at);
        self.store(&Outcome::Refreshed {
            expires_at,
            next_refresh_at,
            account: None,
            scopes: vec![],
        })
    }
}

#[test]
fn missing_client_secret_holds_with_its_reason() {
    let mut w = World::new();
    w.client_ok = false;
    let Action::Hold(outcome) = w.decide() else {
        panic!("must not call the provider")
    };
    let s = w.store(&outcome);
    let ready = find_condition(&s, condition::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        (
            "False",
            crate::reason::Reason::ClientSecretNotFound.as_str()
        )
    );
    assert_eq!(
        find_condition(&s, condition::STALLED).unwrap().status,
        "True"
    );
}

#[test]
fn no_grant_means_sign_in_required_not_stalled() {
    let mut w = World::new();
    w.grant = false;
    assert_eq!(w.decide(), Action::Hold(Outcome::SignInRequired));
    let s = w.store(&Outcome::SignInRequired);
    assert_eq!(
        find_condition(&s, condition::AUTHORIZED).unwrap().reason,
        reasons::SIGN_IN_REQUIRED
    );
    assert_eq!(
        find_condition(&s, condition::STALLED).unwrap().status,
        "False"
    );
}

#[test]
fn an_app_only_integration_needs_no_grant_and_no_sign_in() {
    let mut w = World::new();
    w.mi = integration(serde_json::json!({
        "provider": "Microsoft",
        "oauth": {"clientSecretRef": {"name": "client"}, "tenant": "contoso.onmicrosoft.com", "grantType": "ClientCredentials"},
    }));
    w.grant = false;
    assert!(!w.mi.spec.interactive());
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::NoToken));
    // A published token is renewed when due, like a refreshed one, without any grant.
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    assert_eq!(w.decide(), Action::Hold(Outcome::Idle));
    w.now = t("2026-11-28T10:55:00Z");
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));
    assert_eq!(
        crate::provider::requested_scopes(&w.mi.spec),
        vec!["https://outlook.office365.com/.default".to_owned()]
    );
}

#[test]
fn first_reconcile_with_a_grant_refreshes() {
    assert_eq!(
        World::new().decide(),
        Action::Refresh(RefreshCause::NoToken)
    );
}

/// The second the slots would announce when nothing else is due: the window's last.
fn latest(w: &World, expires_at: Timestamp) -> Timestamp {
    refresh_window(&w.mi, Some(w.now), expires_at, Pace::default()).latest
}

#[test]
fn without_an_announced_time_refresh_is_due_at_expiry_minus_refresh_before_minus_jitter() {
    let mut w = World::new();
    let expiry = t("2026-11-28T11:00:00Z");
    w.token_expiry = Some(expiry);
    let due = refresh_due_at(&w.mi, expiry, Pace::default());
    // No status: the lifetime is unknown, the spread is a tenth of refreshBefore, at most 30 s.
    let spread = jitter(w.mi.uid().as_deref().unwrap(), Duration::from_secs(30));
    assert_eq!(
        due,
        expiry - SignedDuration::from_mins(10) - SignedDuration::try_from(spread).unwrap()
    );

    w.now = due - SignedDuration::from_secs(1);
    assert_eq!(w.decide(), Action::Hold(Outcome::Idle));
    w.now = due;
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));
    w.now = expiry + SignedDuration::from_secs(1);
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));
}

#[test]
fn refresh_before_comes_from_the_spec() {
    let mut w = World::new();
    w.mi = integration(serde_json::json!({"refreshBefore": "30m"}));
    let expiry = t("2026-11-28T11:00:00Z");
    let due = refresh_due_at(&w.mi, expiry, Pace::default());
    assert!(
        due <= expiry - SignedDuration::from_mins(30)
            && due >= expiry - SignedDuration::from_mins(30) - SignedDuration::from_secs(30),
        "{due}"
    );
}

#[test]
fn the_refresh_window_is_the_last_fifth_before_refresh_before() {
    let w = World::new();
    let issued = t("2026-11-28T10:00:00Z");
    // An hour's token, refreshBefore 10m: from 12 minutes before 10:50 to 10:50.
    assert_eq!(
        refresh_window(&w.mi, Some(issued), t("2026-11-28T11:00:00Z"), FAST),
        Window {
            earliest: t("2026-11-28T10:38:00Z"),
            latest: t("2026-11-28T10:50:00Z"),
        }
    );
    // 30 s lifetime with refreshBefore 10m: two thirds of the lifetime, a fifth of it earlier.
    assert_eq!(
        refresh_window(&w.mi, Some(issued), t("2026-11-28T10:00:30Z"), FAST),
        Window {
            earliest: t("2026-11-28T10:00:14Z"),
            latest: t("2026-11-28T10:00:20Z"),
        }
    );
    // Lifetimes of a day spread over an hour at most.
    let day = refresh_window(&w.mi, Some(issued), t("2026-11-29T10:00:00Z"), FAST);
    assert_eq!(
        day.latest.duration_since(day.earliest),
        SignedDuration::from_hours(1)
    );
    // A token that expired before it was issued has no lifetime to spread over.
    let odd = refresh_window(&w.mi, Some(issued), t("2026-11-28T09:00:00Z"), FAST);
    assert!(odd.earliest <= odd.latest && odd.latest <= t("2026-11-28T09:00:00Z"));
}

#[test]
fn the_announced_time_is_kept_while_it_belongs_to_the_token_and_its_window() {
    let mut w = World::new();
    let expiry = t("2026-11-28T11:00:00Z");
    let announced = t("2026-11-28T10:41:07Z");
    let s = w.store(&Outcome::Refreshed {
        expires_at: expiry,
        next_refresh_at: announced,
        account: None,
        scopes: vec![],
    });
    assert_eq!(s.next_refresh_time.as_ref().map(|t| t.0), Some(announced));
    w.token_expiry = Some(expiry);
    assert_eq!(refresh_due_at(&w.mi, expiry, Pace::default()), announced);
    w.now = announced - SignedDuration::from_secs(1);
    assert_eq!(w.decide(), Action::Hold(Outcome::Idle));
    // An idle reconcile (a restart's too) announces the same second: nothing to write.
    let again = status_after(&w.observed(), &Outcome::Idle, None);
    assert_eq!(Some(&again), w.mi.status.as_ref());
    w.now = announced;
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));

    // For another token (a token Secret written by hand) the announcement is not trusted.
    let other = t("2026-11-28T11:30:00Z");
    assert_ne!(refresh_due_at(&w.mi, other, Pace::default()), announced);
    // Nor a time after the window (an edited status): never later than expiry - refreshBefore.
    let status = w.mi.status.as_mut().unwrap();
    status.next_refresh_time = Some(Time(t("2026-11-28T10:55:00Z")));
    let due = refresh_due_at(&w.mi, expiry, Pace::default());
    assert!(
        due <= t("2026-11-28T10:50:00Z") && due >= t("2026-11-28T10:38:00Z"),
        "{due}"
    );
}

#[test]
fn jitter_is_stable_and_spreads() {
    let w = Duration::from_secs(60);
    assert_eq!(jitter("a", w), jitter("a", w));
    let distinct: std::collections::HashSet<_> =
        (0..100).map(|i| jitter(&format!("uid-{i}"), w)).collect();
    assert!(distinct.len() > 10, "jitter should spread: {distinct:?}");
    assert_eq!(jitter("a", Duration::ZERO), Duration::ZERO);
}

#[test]
fn idle_reconcile_reproduces_the_stored_status_exactly() {
    let mut w = World::new();
    w.store(&Outcome::Refreshed {
        expires_at: t("2026-11-28T11:00:00Z"),
        next_refresh_at: latest(&w, t("2026-11-28T11:00:00Z")),
        account: Some("support@example.com".into()),
        scopes: vec!["https://mail.google.com/".into()],
    });
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    for minutes in [1, 10, 30] {
        w.now = t("2026-11-28T10:00:00Z") + SignedDuration::from_mins(minutes);
        let Action::Hold(outcome) = w.decide() else {
            panic!("not due yet at +{minutes}m")
        };
        assert_eq!(outcome, Outcome::Idle);
        let again = status_after(&w.observed(), &outcome, None);
        assert_eq!(
            Some(&again),
            w.mi.status.as_ref(),
            "an idle reconcile must not change the status (no API write)"
        );
    }
}

#[test]
fn refreshed_status_is_ready_with_times() {
    let mut w = World::new();
    let s = w.store(&Outcome::Refreshed {
        expires_at: t("2026-11-28T11:00:00Z"),
        next_refresh_at: latest(&w, t("2026-11-28T11:00:00Z")),
        account: Some("support@example.com".into()),
        scopes: vec!["https://mail.google.com/".into()],
    });
    assert_eq!(find_condition(&s, condition::READY).unwrap().status, "True");
    assert_eq!(
        find_condition(&s, condition::AUTHORIZED).unwrap().status,
        "True"
    );
    assert_eq!(
        find_condition(&s, condition::TOKEN_VALID).unwrap().status,
        "True"
    );
    assert_eq!(
        find_condition(&s, condition::STALLED).unwrap().status,
        "False"
    );
    assert_eq!(s.account.as_deref(), Some("support@example.com"));
    assert_eq!(s.last_refresh_time.unwrap().0, w.now);
    assert_eq!(
        s.access_token_expires_at.unwrap().0,
        t("2026-11-28T11:00:00Z")
    );
    assert_eq!(s.observed_generation, Some(1));
    let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "Ready",
            "Authorized",
            "TokenValid",
            "Reconciling",
            "Stalled"
        ]
    );
}

#[test]
fn permanent_failure_stops_calls_until_an_input_changes() {
    let mut w = World::new();
    w.token_expiry = Some(t("2026-11-28T10:05:00Z"));
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));
    let s = w.store(&Outcome::PermanentFailure {
        reason: "InvalidClient".into(),
        message: "wrong client secret".into(),
    });
    assert_eq!(
        find_condition(&s, condition::STALLED).unwrap().reason,
        "InvalidClient"
    );
    assert_eq!(
        find_condition(&s, condition::AUTHORIZED).unwrap().status,
        "False"
    );
    // The published token is still valid: TokenValid says so even though Ready is False.
    assert_eq!(
        find_condition(&s, condition::TOKEN_VALID).unwrap().status,
        "True"
    );

    w.now += SignedDuration::from_mins(3);
    assert_eq!(w.decide(), Action::Hold(Outcome::StillFailed));
    let held = status_after(&w.observed(), &Outcome::StillFailed, None);
    assert_eq!(
        Some(&held),
        w.mi.status.as_ref(),
        "nothing changed, nothing to write"
    );

    // After the token expires, only TokenValid moves.
    w.now += SignedDuration::from_mins(3);
    let held = status_after(&w.observed(), &Outcome::StillFailed, None);
    assert_eq!(
        find_condition(&held, condition::TOKEN_VALID)
            .unwrap()
            .status,
        "False"
    );
    assert_eq!(
        find_condition(&held, condition::STALLED).unwrap().reason,
        "InvalidClient"
    );

    // The user fixes the client Secret: a new resourceVersion.
    let mut o = w.observed();
    o.client_version = Some("8".into());
    assert_eq!(
        decide(&o, Backoff::default()),
        Action::Refresh(RefreshCause::InputsChanged)
    );
    // ... or edits the spec, or signs in again (new grant Secret version).
    w.mi.metadata.generation = Some(2);
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::InputsChanged));
}

#[test]
fn requested_refresh_runs_once_per_annotation_value() {
    let mut w = World::new();
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    w.store(&Outcome::Idle);
    w.mi.metadata.annotations = Some(
        [(
            REFRESH_REQUESTED_ANNOTATION.to_owned(),
            "2026-11-28T10:00:00Z".to_owned(),
        )]
        .into(),
    );
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Requested));
    w.refreshed(t("2026-11-28T11:00:00Z"));
    assert_eq!(w.decide(), Action::Hold(Outcome::Idle));
    // A new request within the lowest refresh interval waits for it (deferred, not dropped).
    w.mi.metadata.annotations =
        Some([(REFRESH_REQUESTED_ANNOTATION.to_owned(), "again".to_owned())].into());
    assert_eq!(
        w.decide(),
        Action::Hold(Outcome::Requeue(DEFAULT_MIN_REFRESH_INTERVAL))
    );
    w.now += SignedDuration::from_secs(30);
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Requested));
}

#[test]
fn refresh_requests_are_paced_by_the_last_call_whatever_its_answer() {
    let mut w = World::new();
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    w.store(&Outcome::Idle);
    let request = |w: &mut World, v: &str| {
        w.mi.metadata.annotations =
            Some([(REFRESH_REQUESTED_ANNOTATION.to_owned(), v.to_owned())].into());
    };
    request(&mut w, "1");
    let last_call = Some(t("2026-11-28T09:59:50Z"));
    // A call 10 s ago (a permanent failure, say, which sets no lastRefreshTime): 20 s to wait.
    assert_eq!(
        decide_paced(
            &w.observed(),
            Backoff::default(),
            last_call,
            Pace::default()
        ),
        Action::Hold(Outcome::Requeue(Duration::from_secs(20)))
    );
    // Every new value in the meantime waits the same: one call per interval, however many requests.
    for i in 2..50 {
        request(&mut w, &i.to_string());
        assert!(matches!(
            decide_paced(
                &w.observed(),
                Backoff::default(),
                last_call,
                Pace::default()
            ),
            Action::Hold(Outcome::Requeue(_))
        ));
    }
    w.now = t("2026-11-28T10:00:20Z");
    assert_eq!(
        decide_paced(
            &w.observed(),
            Backoff::default(),
            last_call,
            Pace::default()
        ),
        Action::Refresh(RefreshCause::Requested)
    );
    // A last call in the future (a clock gone wrong) defers by the interval at most.
    assert_eq!(
        decide_paced(
            &w.observed(),
            Backoff::default(),
            Some(Timestamp::MAX),
            Pace::default()
        ),
        Action::Hold(Outcome::Requeue(DEFAULT_MIN_REFRESH_INTERVAL))
    );
}

#[test]
fn a_refresh_request_does_not_bypass_a_backoff_or_retry_after() {
    let mut w = World::new();
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    w.store(&Outcome::Idle);
    w.mi.metadata.annotations =
        Some([(REFRESH_REQUESTED_ANNOTATION.to_owned(), "now".to_owned())].into());
    // The provider answered 429 with Retry-After: 120 a minute ago.
    let backoff = Backoff {
        failures: 1,
        not_before: Some(t("2026-11-28T10:01:00Z")),
    };
    assert_eq!(
        decide(&w.observed(), backoff),
        Action::Hold(Outcome::BackingOff)
    );
    // The request is still pending once the backoff is over.
    w.now = t("2026-11-28T10:01:00Z");
    assert_eq!(
        decide(&w.observed(), backoff),
        Action::Refresh(RefreshCause::Requested)
    );
}

#[test]
fn a_token_of_zero_lifetime_is_published_and_refreshed_once_per_interval() {
    let mut w = World::new();
    // expires_in: 0 — the token expires the moment it is issued.
    let expiry = w.now;
    let s = w.refreshed(expiry);
    w.token_expiry = Some(expiry);
    assert_eq!(
        s.next_refresh_time.as_ref().unwrap().0,
        t("2026-11-28T10:00:30Z"),
        "not sooner than the interval"
    );
    let ready = find_condition(&s, condition::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "TokenLifetimeTooShort")
    );
    assert!(ready.message.contains("valid for 0s"), "{}", ready.message);
    assert!(ready.message.contains("every 30s"), "{}", ready.message);
    // Not due in between, and an idle reconcile writes nothing.
    for secs in [1, 10, 29] {
        w.now = t("2026-11-28T10:00:00Z") + SignedDuration::from_secs(secs);
        assert_eq!(w.decide(), Action::Hold(Outcome::Idle), "{secs}s");
        assert_eq!(status_after(&w.observed(), &Outcome::Idle, None), s);
        assert_eq!(
            requeue_after(&w.observed(), &s, &Outcome::Idle, Backoff::default()),
            Some(Duration::from_secs(30 - secs as u64))
        );
    }
    w.now = t("2026-11-28T10:00:30Z");
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));
    // One of 1 s, or one that lives exactly the interval, likewise.
    for lifetime in [1, 30] {
        let expiry = w.now + SignedDuration::from_secs(lifetime);
        let window = refresh_window(&w.mi, Some(w.now), expiry, Pace::default());
        assert_eq!(window.earliest, t("2026-11-28T10:01:00Z"), "{lifetime}");
        assert!(lifetime_too_short(w.now, expiry, Pace::default()));
    }
    // A minute's token is refreshed before it expires, as before.
    let minute = w.now + SignedDuration::from_secs(60);
    let window = refresh_window(&w.mi, Some(w.now), minute, Pace::default());
    assert_eq!(window.latest, t("2026-11-28T10:01:10Z"));
    assert!(!lifetime_too_short(w.now, minute, Pace::default()));
}

#[test]
fn the_pace_saturates_instead_of_overflowing() {
    let pace = Pace {
        min_refresh_interval: Duration::from_secs(3600),
    };
    assert_eq!(
        pace.next_call_at(Some(Timestamp::MAX)),
        Some(Timestamp::MAX)
    );
    assert!(lifetime_too_short(Timestamp::MAX, Timestamp::MAX, pace));
    assert!(!lifetime_too_short(Timestamp::MIN, Timestamp::MAX, pace));
    let w = World::new();
    let window = refresh_window(&w.mi, Some(Timestamp::MAX), Timestamp::MAX, pace);
    assert_eq!(window.latest, Timestamp::MAX);
}

#[test]
fn transient_failure_keeps_ready_while_the_token_is_valid() {
    let mut w = World::new();
    w.refreshed(t("2026-11-28T11:00:00Z"));
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    w.now = t("2026-11-28T10:55:00Z");
    let failure = Outcome::TransientFailure {
        reason: "ProviderUnavailable".into(),
        message: "token endpoint answered 503".into(),
        retry_in: Duration::from_secs(20),
    };
    let s = w.store(&failure);
    assert_eq!(find_condition(&s, condition::READY).unwrap().status, "True");
    assert_eq!(
        find_condition(&s, condition::TOKEN_VALID).unwrap().status,
        "True"
    );
    let rec = find_condition(&s, condition::RECONCILING).unwrap();
    assert_eq!(
        (rec.status.as_str(), rec.reason.as_str()),
        ("True", "ProviderUnavailable")
    );
    assert!(rec.message.contains("retrying in 20s"), "{}", rec.message);

    let backoff = Backoff {
        failures: 1,
        not_before: Some(w.now + SignedDuration::from_secs(20)),
    };
    assert_eq!(
        decide(&w.observed(), backoff),
        Action::Hold(Outcome::BackingOff)
    );
    w.now += SignedDuration::from_secs(21);
    assert_eq!(
        decide(&w.observed(), backoff),
        Action::Refresh(RefreshCause::Retry)
    );
    // A failed forced refresh is retried as well, although the token is not due.
    let early = Observed {
        now: t("2026-11-28T10:05:00Z"),
        ..w.observed()
    };
    let over = Backoff {
        failures: 2,
        not_before: Some(early.now),
    };
    assert_eq!(decide(&early, over), Action::Refresh(RefreshCause::Retry));

    // Past expiry, still failing: Ready and TokenValid go False.
    w.now = t("2026-11-28T11:00:01Z");
    let s = w.store(&failure);
    assert_eq!(
        find_condition(&s, condition::READY).unwrap().status,
        "False"
    );
    assert_eq!(
        find_condition(&s, condition::TOKEN_VALID).unwrap().reason,
        reasons::TOKEN_EXPIRED
    );
}

#[test]
fn suspended_does_not_refresh() {
    let mut w = World::new();
    w.mi = integration(serde_json::json!({"suspend": true}));
    w.token_expiry = Some(t("2026-11-28T10:01:00Z"));
    assert_eq!(w.decide(), Action::Hold(Outcome::Suspended));
    let s = w.store(&Outcome::Suspended);
    assert_eq!(
        find_condition(&s, condition::READY).unwrap().reason,
        reasons::SUSPENDED
    );
    assert!(s.next_refresh_time.is_none());
}

#[test]
fn transition_times_move_only_when_status_flips() {
    let mut w = World::new();
    let s1 = w.refreshed(t("2026-11-28T11:00:00Z"));
    let ready1 = find_condition(&s1, condition::READY)
        .unwrap()
        .last_transition_time
        .clone();
    w.now = t("2026-11-28T10:50:00Z");
    let s2 = w.refreshed(t("2026-11-28T11:50:00Z"));
    assert_eq!(
        find_condition(&s2, condition::READY)
            .unwrap()
            .last_transition_time,
        ready1
    );
    w.now = t("2026-11-28T10:51:00Z");
    let s3 = w.store(&Outcome::PermanentFailure {
        reason: "GrantRevoked".into(),
        message: "revoked".into(),
    });
    assert_eq!(
        find_condition(&s3, condition::READY)
            .unwrap()
            .last_transition_time
            .0,
        w.now
    );
}

#[test]
fn requeue_is_exactly_the_next_due_time() {
    let mut w = World::new();
    let s = w.refreshed(t("2026-11-28T11:00:00Z"));
    let o = w.observed();
    let after = requeue_after(&o, &s, &Outcome::Idle, Backoff::default()).unwrap();
    let due = s.next_refresh_time.clone().unwrap().0;
    assert_eq!(
        after,
        Duration::try_from(due.duration_since(w.now)).unwrap()
    );
    // Never a hot loop: at least one second.
    w.now = due + SignedDuration::from_mins(1);
    assert_eq!(
        requeue_after(&w.observed(), &s, &Outcome::Idle, Backoff::default()),
        Some(Duration::from_secs(1))
    );
}

#[test]
fn token_expiry_at_the_ends_of_the_clock_does_not_panic() {
    // A token Secret is writable by whoever may write Secrets in the namespace: its expiry is input.
    for expiry in [
        t("-009999-01-03T00:00:00Z"),
        Timestamp::MIN,
        Timestamp::MAX,
        t("9999-12-30T00:00:00Z"),
    ] {
        let mut w = World::new();
        w.token_expiry = Some(expiry);
        let due = refresh_due_at(&w.mi, expiry, Pace::default());
        assert!(due <= expiry);
        let action = w.decide();
        let outcome = match action {
            Action::Refresh(_) => Outcome::Refreshed {
                expires_at: crate::time::after(w.now, Duration::from_secs(3600)),
                next_refresh_at: latest(&w, crate::time::after(w.now, Duration::from_secs(3600))),
                account: None,
                scopes: vec![],
            },
            Action::Hold(o) => o,
        };
        let status = w.store(&outcome);
        let _ = requeue_after(&w.observed(), &status, &outcome, Backoff::default());
    }
    let mut w = World::new();
    w.token_expiry = Some(t("-009999-01-03T00:00:00Z"));
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Due));
}

#[test]
fn a_sign_in_link_at_the_end_of_the_clock_does_not_panic() {
    let mut w = World::new();
    w.grant = false;
    let link = SignInStatus {
        url: "https://example.com/sign-in?ticket=x".into(),
        expires_at: Time(Timestamp::MIN),
    };
    let status = status_after(&w.observed(), &Outcome::SignInRequired, Some(link));
    w.mi.status = Some(status.clone());
    let again = requeue_after(
        &w.observed(),
        &status,
        &Outcome::SignInRequired,
        Backoff::default(),
    );
    assert_eq!(again, Some(Duration::from_secs(1)));
}

#[test]
fn a_grant_lost_in_flight_is_not_presented_again_even_on_request() {
    let mut w = World::new();
    w.token_expiry = Some(t("2026-11-28T11:00:00Z"));
    w.store(&Outcome::PermanentFailure {
        reason: crate::reason::Reason::GrantLostInFlight.as_str().into(),
        message: "lost".into(),
    });
    w.mi.metadata.annotations =
        Some([(REFRESH_REQUESTED_ANNOTATION.to_owned(), "please".to_owned())].into());
    assert_eq!(w.decide(), Action::Hold(Outcome::StillFailed));
    // Another permanent failure may be retried on request (the cause may be fixed elsewhere).
    w.store(&Outcome::PermanentFailure {
        reason: crate::reason::Reason::InvalidClient.as_str().into(),
        message: "bad client".into(),
    });
    w.mi.metadata.annotations =
        Some([(REFRESH_REQUESTED_ANNOTATION.to_owned(), "again".to_owned())].into());
    assert_eq!(w.decide(), Action::Refresh(RefreshCause::Requested));
}

#[test]
fn a_name_longer_than_a_label_value_is_refused_before_anything_else() {
    let mut w = World::new();
    w.mi.metadata.name = Some("a".repeat(64));
    match w.decide() {
        Action::Hold(Outcome::PermanentFailure { reason, message }) => {
            assert_eq!(reason, "NameTooLong");
            assert!(
                message.contains("64 characters") && message.contains("63"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    w.mi.metadata.name = Some("a".repeat(63));
    assert!(!matches!(
        w.decide(),
        Action::Hold(Outcome::PermanentFailure { .. })
    ));
}
