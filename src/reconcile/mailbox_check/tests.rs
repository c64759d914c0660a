use super::*;
use crate::api::{MailIntegrationSpec, MailIntegrationStatus};
use crate::mailbox::MailboxError;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

fn status_ready() -> MailIntegrationStatus {
    let ready = |t: &str| Condition {
        type_: t.into(),
        status: "True".into(),
        reason: t.into(),
        message: String::new(),
        observed_generation: Some(1),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    };
    MailIntegrationStatus {
        conditions: vec![
            ready("Ready"),
            ready("Authorized"),
            ready("TokenValid"),
            ready("Reconciling"),
        ],
        ..Default::default()
    }
}

/// A ready status whose mailbox check at `at` connected.
fn status_connected(at: Timestamp) -> MailIntegrationStatus {
    let mut s = status_ready();
    apply(
        &mut s,
        Some(&MailboxState::Connected("IMAP ok".into())),
        Some(1),
        at,
    );
    s
}

#[test]
fn a_refused_mailbox_makes_ready_false_with_its_reason() {
    let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
    let mut s = status_ready();
    apply(
        &mut s,
        Some(&MailboxState::Failed {
            reason: "MailboxAuthFailed".into(),
            message: "IMAP imap.example.com:993: refused".into(),
        }),
        Some(1),
        now,
    );
    let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "Ready",
            "Authorized",
            "TokenValid",
            "MailboxConnected",
            "Reconciling"
        ]
    );
    let mc = &s.conditions[3];
    assert_eq!(
        (mc.status.as_str(), mc.reason.as_str()),
        ("False", "MailboxAuthFailed")
    );
    assert_eq!(
        (
            s.conditions[0].status.as_str(),
            s.conditions[0].reason.as_str()
        ),
        ("False", "MailboxAuthFailed")
    );

    let s = status_connected(now);
    assert_eq!(s.conditions[3].reason, "Connected");
    assert_eq!(s.conditions[0].status, "True");
    let again = {
        let mut t = s.clone();
        apply(
            &mut t,
            Some(&MailboxState::Connected("IMAP ok".into())),
            Some(1),
            now + SignedDuration::from_mins(5),
        );
        t
    };
    assert_eq!(again, s, "the same result changes nothing (no write)");
    let mut kept = s.clone();
    apply(&mut kept, None, Some(1), now);
    assert_eq!(kept, s);
}

#[test]
fn a_restart_takes_the_last_check_from_the_status_and_spreads_overdue_ones() {
    let now = Timestamp::from_second(1_800_000_000).unwrap();
    let mi = |generation: i64, checked: Option<Timestamp>| -> MailIntegration {
        let mut mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "ns", "uid": "u", "generation": generation},
            "spec": {
                "provider": "Google",
                "mailbox": {"address": "a@example.com", "checkInterval": "15m"},
                "oauth": {"clientSecretRef": {"name": "c"}},
                "tokenSecret": {"name": "t"},
            },
        }))
        .unwrap();
        let mut s = status_connected(now);
        s.mailbox_checked_at = checked.map(Time);
        mi.status = Some(s);
        mi
    };
    let ago = |m: i64| now - SignedDuration::from_mins(m);
    // Checked 5 minutes ago: the next check is due 10 minutes from now, as before the restart.
    assert_eq!(resumed_check_time(&mi(1, Some(ago(5))), now), Some(ago(5)));
    // Never recorded, or of an older spec: check now.
    assert_eq!(resumed_check_time(&mi(1, None), now), None);
    assert_eq!(resumed_check_time(&mi(2, Some(ago(5))), now), None);
    // In the future (a clock step): counts as now.
    assert_eq!(
        resumed_check_time(&mi(1, Some(now + SignedDuration::from_hours(1))), now),
        Some(now)
    );
    // Overdue: due at some moment within the next interval, not all at once.
    let due: Vec<Timestamp> = (0..50)
        .map(|_| {
            resumed_check_time(&mi(1, Some(ago(60))), now).unwrap() + SignedDuration::from_mins(15)
        })
        .collect();
    assert!(
        due.iter()
            .all(|d| *d >= now && *d <= now + SignedDuration::from_mins(15)),
        "{due:?}"
    );
    let first = due[0];
    assert!(
        due.iter().any(|d| *d != first),
        "spread, not one instant: {due:?}"
    );
    // Hostile values do not panic.
    assert!(resumed_check_time(&mi(1, Some(Timestamp::MIN)), now).is_some());
}

#[test]
fn a_refused_app_only_token_names_the_exchange_steps() {
    let spec = |provider: &str, grant: &str| -> MailIntegrationSpec {
        serde_json::from_value(serde_json::json!({
            "provider": provider,
            "mailbox": {"address": "helpdesk@contoso.example"},
            "oauth": {"clientSecretRef": {"name": "m365"}, "grantType": grant},
            "tokenSecret": {"name": "t"},
        }))
        .unwrap()
    };
    let refused = || {
        MailboxState::Failed {
        reason: "MailboxAuthFailed".into(),
        message: "IMAP h:993: AUTHENTICATE failed. The mail server refused the access token (it cannot say why)".into(),
    }
    };
    let MailboxState::Failed { reason, message } =
        explain_app_only(&spec("Microsoft", "ClientCredentials"), refused())
    else {
        panic!("not a failure");
    };
    assert_eq!(reason, "AppMailboxAccessMissing");
    assert!(
        message.starts_with("IMAP h:993: AUTHENTICATE failed. The provider issued"),
        "{message}"
    );
    assert!(
        message.contains("New-ServicePrincipal -AppId <client ID in Secret \"m365\">"),
        "{message}"
    );
    assert!(message.contains("Add-MailboxPermission -Identity helpdesk@contoso.example"));
    let MailboxState::Failed { reason, message } =
        explain_app_only(&spec("OIDC", "ClientCredentials"), refused())
    else {
        panic!("not a failure");
    };
    assert_eq!(reason, "AppMailboxAccessMissing");
    assert!(!message.contains("Exchange"), "{message}");
    // A signed-in grant's refusal is the mailbox's own business.
    assert_eq!(
        explain_app_only(&spec("Microsoft", "Interactive"), refused()),
        refused()
    );
    let unreachable = MailboxState::Failed {
        reason: "MailboxUnreachable".into(),
        message: "x".into(),
    };
    assert_eq!(
        explain_app_only(&spec("Microsoft", "ClientCredentials"), unreachable.clone()),
        unreachable
    );
}

#[test]
fn targets_follow_the_spec_and_provider_defaults() {
    let spec: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
        "provider": "Google",
        "mailbox": {"address": "a@example.com", "protocol": "POP3", "smtp": {"host": "smtp.gmail.com", "port": 465}, "mechanism": "OAUTHBEARER"},
        "oauth": {"clientSecretRef": {"name": "c"}},
        "tokenSecret": {"name": "t"},
    }))
    .unwrap();
    let mi = MailIntegration::new("x", spec);
    let t = targets(&mi);
    assert_eq!(t.len(), 2);
    assert_eq!(
        (t[0].host.as_str(), t[0].port, t[0].protocol),
        ("pop.gmail.com", 995, CheckProtocol::Pop3)
    );
    assert_eq!(
        (t[1].host.as_str(), t[1].port, t[1].protocol),
        ("smtp.gmail.com", 465, CheckProtocol::Smtp)
    );
    assert!(t.iter().all(|t| t.mechanism == SaslMechanism::OAuthBearer));

    let oidc: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
        "provider": "OIDC",
        "mailbox": {"address": "a@example.com"},
        "oauth": {"clientSecretRef": {"name": "c"}, "issuerURL": "https://id.example.com"},
        "tokenSecret": {"name": "t"},
    }))
    .unwrap();
    assert!(targets(&MailIntegration::new("y", oidc)).is_empty());
}

#[test]
fn microsofts_smtp_auth_switch_is_its_own_reason_with_the_fix() {
    let t = CheckTarget::new(
        "smtp.office365.com",
        587,
        CheckProtocol::Smtp,
        "box@contoso.com",
    );
    let e = MailboxError::AuthFailed {
        detail: "permanent error (535): 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.".into(),
    };
    let MailboxState::Failed { reason, message } = failed(&t, &e) else {
        panic!("not a failure")
    };
    assert_eq!(reason, "SmtpClientAuthenticationDisabled");
    assert!(
        message.contains(
            "Set-CASMailbox -Identity box@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{message}"
    );
    // Another 535, or the same words from IMAP, stay MailboxAuthFailed.
    let other = MailboxError::AuthFailed {
        detail: "535 5.7.3 Authentication unsuccessful".into(),
    };
    let MailboxState::Failed { reason, .. } = failed(&t, &other) else {
        panic!()
    };
    assert_eq!(reason, "MailboxAuthFailed");
    let imap = CheckTarget::new(
        "outlook.office365.com",
        993,
        CheckProtocol::Imap,
        "box@contoso.com",
    );
    let MailboxState::Failed { reason, .. } = failed(&imap, &e) else {
        panic!()
    };
    assert_eq!(reason, "MailboxAuthFailed");
}

/// A loopback IMAP server that greets after `delay` and accepts any XOAUTH2 token.
async fn imap_after(delay: Duration) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"* OK ready\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut words = line.split_whitespace();
                    let tag = words.next().unwrap_or("*").to_owned();
                    let command = words.next().unwrap_or("").to_ascii_uppercase();
                    let answer = match command.as_str() {
                        "CAPABILITY" => {
                            format!("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR\r\n{tag} OK\r\n")
                        }
                        "EXAMINE" | "SELECT" => format!("* 0 EXISTS\r\n{tag} OK [READ-ONLY]\r\n"),
                        "LOGOUT" => format!("* BYE\r\n{tag} OK\r\n"),
                        _ => format!("{tag} OK done\r\n"),
                    };
                    if write.write_all(answer.as_bytes()).await.is_err() || command == "LOGOUT" {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn on_loopback(port: u16) -> MailIntegration {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "metadata": {"name": "inbox", "namespace": "ns", "uid": format!("u{port}"), "generation": 1},
        "spec": {
            "provider": "Google",
            "mailbox": {
                "address": "a@example.com",
                "server": {"host": "127.0.0.1", "port": port, "tls": "None"},
            },
            "oauth": {"clientSecretRef": {"name": "c"}},
            "tokenSecret": {"name": "t"},
        },
    }))
    .unwrap()
}

/// How many first refreshes' waits ended as `result` (the `mailbox_check_joins` counter).
fn joins_of(c: &MailboxChecker, result: &str) -> u64 {
    c.metrics
        .mailbox_check_joins
        .get_or_create(&crate::metrics::JoinLabels {
            result: result.into(),
        })
        .get()
}

/// A token valid for an hour from `now` ('static: joined calls run in tasks of their own).
fn valid_for_an_hour(now: Timestamp) -> Option<CheckToken<'static>> {
    let token: &'static SecretValue = Box::leak(Box::new(SecretValue::new("access")));
    Some(CheckToken {
        access_token: token,
        expires_at: now + SignedDuration::from_hours(1),
        grant: "grant",
    })
}

fn checker(permits: usize, wait: Duration) -> std::sync::Arc<MailboxChecker> {
    let allowed = crate::mailbox::allowed::AllowedHosts::with_defaults([]).with_loopback();
    std::sync::Arc::new(
        MailboxChecker::new(permits, Duration::from_secs(5), Default::default())
            .with_allowed_hosts(allowed)
            .with_join_wait(wait),
    )
}

/// The check a first refresh makes due joins its status write when it is done within the wait (its
/// queueing for a permit included); a slower one, a later refresh's (a result known) and a
/// reconcile that did not refresh are not waited for, and a refresh that finds every join slot
/// taken waits for one only while slots are released.
#[tokio::test]
async fn a_first_refresh_waits_for_its_check_only_within_the_wait_and_the_join_slots() {
    let now = Timestamp::now();
    let valid = valid_for_an_hour(now);
    let fast = on_loopback(imap_after(Duration::ZERO).await);
    let slow = on_loopback(imap_after(Duration::from_secs(3)).await);
    let joined = |c: &std::sync::Arc<MailboxChecker>, mi: &MailIntegration, refreshed: bool| {
        let (c, mi) = (c.clone(), mi.clone());
        async move {
            let started = std::time::Instant::now();
            let state = c
                .state_joined(&mi, valid, None, now, refreshed, || {})
                .await;
            (state, started.elapsed())
        }
    };
    let c = checker(8, Duration::from_millis(1500));
    // Fast: its result, in the refresh's own write.
    let (state, _) = joined(&c, &fast, true).await;
    assert!(
        matches!(state, Some(MailboxState::Connected(_))),
        "{state:?}"
    );
    // A later refresh with a result known (here the one its status reports): its check is not
    // waited for, even against a slow server; the known result is reported (the check's own
    // reconcile writes only a change).
    let mut known = slow.clone();
    known.metadata.uid = Some("known".into());
    known.status = Some(status_connected(now));
    let (state, took) = joined(&c, &known, true).await;
    assert!(
        matches!(state, Some(MailboxState::Connected(_))),
        "{state:?}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Slow: the last result (none yet) once the wait is over, not the check's 3 s.
    let (state, took) = joined(&c, &slow, true).await;
    assert_eq!(state, None);
    assert!(took < Duration::from_millis(2500), "{took:?}");
    // Counted: one joined, one late, none without a slot (the known one did not try).
    assert_eq!(
        [
            joins_of(&c, "joined"),
            joins_of(&c, "late"),
            joins_of(&c, "no_slot")
        ],
        [1, 1, 0]
    );
    // Without a refresh, nothing is waited for.
    let c = checker(8, Duration::from_millis(1500));
    let (state, took) = joined(&c, &fast, false).await;
    assert_eq!(state, None);
    assert!(took < Duration::from_millis(500), "{took:?}");
    // A check that queues for the one permit behind a check of 0.4 s is waited for: queueing is
    // part of the wait.
    let medium = on_loopback(imap_after(Duration::from_millis(400)).await);
    let c = checker(1, Duration::from_millis(1500));
    let _ = c
        .state_joined(&medium, valid, None, now, false, || {})
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (state, took) = joined(&c, &fast, true).await;
    assert!(
        matches!(state, Some(MailboxState::Connected(_))),
        "{state:?} after {took:?}"
    );
    // With every join slot taken (one here, by a refresh waiting for the slow server), a refresh
    // waits JOIN_SLOT_WAIT for it (none is released), then goes on without: at most the slots'
    // number of workers wait for a check at once.
    let c = checker(1, Duration::from_millis(1500));
    let waiting = tokio::spawn(joined(&c, &slow, true));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (state, took) = joined(&c, &fast, true).await;
    assert_eq!(state, None);
    assert!(
        took < JOIN_SLOT_WAIT + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(
        waiting.await.unwrap().0,
        None,
        "the slow check outlasted the wait"
    );
    assert_eq!(
        [
            joins_of(&c, "joined"),
            joins_of(&c, "late"),
            joins_of(&c, "no_slot")
        ],
        [0, 1, 1]
    );
    // Every slot held by another namespace's check of a server that hangs: none is released, so
    // a refresh waits JOIN_SLOT_WAIT for one, then goes on without (slots released now and then
    // keep it waiting up to JOIN_SLOT_WAIT_MAX: what one tenant's mail server costs another, once
    // per first refresh).
    let c = checker(1, Duration::from_millis(1500));
    let waiting = tokio::spawn(joined(&c, &slow, true));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut elsewhere = fast.clone();
    elsewhere.metadata.uid = Some("elsewhere".into());
    elsewhere.metadata.namespace = Some("elsewhere".into());
    let (state, took) = joined(&c, &elsewhere, true).await;
    assert_eq!(state, None);
    assert!(
        took >= JOIN_SLOT_WAIT && took < JOIN_SLOT_WAIT + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(waiting.await.unwrap().0, None);
    assert_eq!(joins_of(&c, "no_slot"), 1);
    // A slot freed within JOIN_SLOT_WAIT is taken: two first refreshes at once, one slot, a
    // server that answers at once: the one that finds the slot taken waits for it and joins
    // too (without the wait it would report nothing, and its check write a status of its own).
    let c = checker(1, Duration::from_millis(1500));
    let mut other = fast.clone();
    other.metadata.uid = Some("other".into());
    // Another namespace: one namespace's share of the one slot is the slot.
    other.metadata.namespace = Some("other".into());
    let first = tokio::spawn(joined(&c, &other, true));
    let (state, _) = joined(&c, &fast, true).await;
    assert!(
        matches!(state, Some(MailboxState::Connected(_))),
        "{state:?}"
    );
    let (state, _) = first.await.unwrap();
    assert!(
        matches!(state, Some(MailboxState::Connected(_))),
        "{state:?}"
    );
    assert_eq!([joins_of(&c, "joined"), joins_of(&c, "no_slot")], [2, 0]);
    // As many join slots as checks at once, at most half the reconcile workers.
    assert_eq!(join_slots(32, 64), 32);
    assert_eq!(join_slots(32, 32), 16);
    assert_eq!(join_slots(8, 64), 8);
    assert_eq!(join_slots(1, 1), 1);
    // A zero wait: never.
    assert!(!joins(true, false, Duration::ZERO));
    assert!(joins(true, false, DEFAULT_JOIN_WAIT));
    assert!(!joins(false, false, DEFAULT_JOIN_WAIT) && !joins(true, true, DEFAULT_JOIN_WAIT));
}

/// A check queued behind the permits is a task of `background`'s future size: it must hold its
/// inputs, not the protocol's state (TLS, buffers), which is allocated when it runs. At 10,000
/// integrations onboarded at once, 10,000 checks queue: 10 KiB each was 100 MiB of the operator's
/// memory limit.
#[tokio::test]
async fn a_queued_check_holds_its_inputs_not_the_protocol_state() {
    let mi = on_loopback(143);
    let c = checker(1, Duration::from_secs(1));
    let queued = Queued {
        namespace: "ns".into(),
        targets: targets(&mi),
        token: SecretValue::new("access"),
        spec: Box::new(mi.spec.clone()),
        key: "u".into(),
        made: Made {
            token: "t".into(),
            grant: "g".into(),
        },
        ca: None,
        tx: None,
    };
    let task = c.clone().background(queued, || {});
    let size = std::mem::size_of_val(&task);
    assert!(
        size <= 1536,
        "a queued check's task is {size} bytes: the protocol's state is inlined (box it)"
    );
    let (servers, token) = (targets(&mi), SecretValue::new("access"));
    let check = c.check_all(&servers, &token, None);
    let size = std::mem::size_of_val(&check);
    assert!(size <= 1024, "check_all's future is {size} bytes");
}

/// Of the join slots, one namespace takes at most its share: a tenant whose mail servers are slow
/// holds at most that many waiting reconciles, and another namespace's first refresh still waits
/// for its check.
#[tokio::test]
async fn one_namespace_takes_at_most_its_share_of_the_join_slots() {
    let now = Timestamp::now();
    let valid = valid_for_an_hour(now);
    let slow_port = imap_after(Duration::from_secs(3)).await;
    let allowed = crate::mailbox::allowed::AllowedHosts::with_defaults([]).with_loopback();
    // Eight checks at once and eight reconcile workers, so four join slots (half the workers),
    // half of them for one namespace.
    assert_eq!(join_slots(8, 8), 4);
    let c = std::sync::Arc::new(
        MailboxChecker::new(8, Duration::from_secs(5), Default::default())
            .with_namespace_share(50)
            .with_reconcile_workers(8)
            .with_allowed_hosts(allowed)
            .with_join_wait(Duration::from_millis(1500)),
    );
    let joined = |mi: MailIntegration| {
        let c = c.clone();
        async move {
            let started = std::time::Instant::now();
            let state = c.state_joined(&mi, valid, None, now, true, || {}).await;
            (state, started.elapsed())
        }
    };
    let slow = |i: usize| {
        let mut mi = on_loopback(slow_port);
        mi.metadata.uid = Some(format!("slow-{i}"));
        mi
    };
    // Namespace "ns": two refreshes wait for their slow checks ...
    let waiting = [tokio::spawn(joined(slow(0))), tokio::spawn(joined(slow(1)))];
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ... a third of the same namespace does not (its share is taken) ...
    let (state, took) = joined(slow(2)).await;
    assert_eq!(state, None);
    assert!(
        took < Duration::from_millis(500),
        "waited {took:?} over its share"
    );
    // ... and another namespace's refresh still gets a slot and its result.
    let mut other = on_loopback(imap_after(Duration::ZERO).await);
    other.metadata.namespace = Some("other".into());
    let (state, took) = joined(other).await;
    assert!(
        matches!(state, Some(MailboxState::Connected(_))),
        "{state:?} after {took:?}"
    );
    for w in waiting {
        assert_eq!(
            w.await.unwrap().0,
            None,
            "the slow check outlasted the wait"
        );
    }
}

/// A routine refresh of a grant whose last check connected makes no check due (the interval's
/// does); a new grant, a spec change, a refresh a user asked for and a new token after a failure do.
#[test]
fn a_routine_refresh_of_a_connected_grant_makes_no_check_due() {
    let mi = on_loopback(143);
    let now = Timestamp::now();
    let made = |token: &str, grant: &str| Made {
        token: token.into(),
        grant: grant.into(),
    };
    let connected = Cached {
        made: made("t1/1", "g1/1"),
        at: now,
        state: MailboxState::Connected("imap".into()),
    };
    assert!(
        connected.answers(&made("t2/1", "g1/1"), &mi, now),
        "routine refresh"
    );
    assert!(
        !connected.answers(&made("t2/1", "g2/1"), &mi, now),
        "new grant"
    );
    assert!(
        !connected.answers(&made("t1/2", "g1/2"), &mi, now),
        "new spec"
    );
    let after_interval = now + SignedDuration::try_from(mi.spec.check_interval()).unwrap();
    assert!(!connected.answers(&made("t1/1", "g1/1"), &mi, after_interval));
    let failed = Cached {
        state: MailboxState::Failed {
            reason: "MailboxAuthFailed".into(),
            message: "refused".into(),
        },
        ..connected.clone()
    };
    assert!(
        failed.answers(&made("t1/1", "g1/1"), &mi, now),
        "same token"
    );
    assert!(
        !failed.answers(&made("t2/1", "g1/1"), &mi, now),
        "a new token after a failure"
    );

    let signed_in = |refresh_token: &str, at: Option<&str>| crate::reconcile::observed::Grant {
        refresh_token: SecretValue::new(refresh_token),
        account: Some("a@example.com".into()),
        scopes: vec!["openid".into(), "email".into()],
        issued_at: at.map(|a| a.parse().unwrap()),
        refresh_token_expires_at: None,
        token_endpoint: Some("https://issuer.example/token".into()),
        client_id: Some("client".into()),
        revocation_endpoint: None,
        resource_version: Some("1".into()),
    };
    let at = Some("2026-12-07T09:00:00Z");
    let first = signed_in("r1", at);
    let basis = grant_basis(Some(&first), Some("5"), None);
    assert_eq!(basis, grant_basis(Some(&first), Some("6"), None));
    let rotated = signed_in("r2", at);
    assert_eq!(
        basis,
        grant_basis(Some(&rotated), Some("5"), None),
        "a rotated refresh token is the same grant"
    );
    let again = signed_in("r1", Some("2026-12-07T10:00:00Z"));
    assert_ne!(
        basis,
        grant_basis(Some(&again), Some("5"), None),
        "a new sign-in"
    );
    let mut narrower = first.clone();
    narrower.scopes.pop();
    assert_ne!(
        basis,
        grant_basis(Some(&narrower), Some("5"), None),
        "scopes"
    );
    assert_ne!(
        grant_basis(Some(&signed_in("r1", None)), None, None),
        grant_basis(Some(&signed_in("r2", None)), None, None),
        "a grant brought by hand: its refresh token"
    );
    assert_ne!(
        basis,
        grant_basis(Some(&first), Some("5"), Some("2026-12-07T10:00:00Z")),
        "a refresh asked for"
    );
    assert_ne!(
        grant_basis(None, Some("5"), None),
        grant_basis(None, Some("6"), None),
        "a new client Secret of an app-only grant"
    );
    assert!(!basis.contains("r1"), "{basis}");
}

/// A reconcile dropped while it waits for a join slot (a shutdown, a lost lease) leaves nothing
/// behind that keeps the integration's checks from running.
#[tokio::test]
async fn a_reconcile_dropped_while_it_waits_for_a_join_slot_leaves_its_checks_free_to_run() {
    let now = Timestamp::now();
    let valid = valid_for_an_hour(now);
    let slow = on_loopback(imap_after(Duration::from_secs(3)).await);
    let fast = on_loopback(imap_after(Duration::ZERO).await);
    // One join slot, held by a refresh waiting for the slow server.
    let c = checker(1, Duration::from_millis(1500));
    let holder = {
        let c = c.clone();
        tokio::spawn(async move { c.state_joined(&slow, valid, None, now, true, || {}).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The fast integration's first refresh waits for that slot and is dropped meanwhile.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        c.state_joined(&fast, valid, None, now, true, || {}),
    )
    .await;
    assert!(dropped.is_err(), "it was still waiting for the slot");
    // Its next reconcile starts its check, which calls back when done.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = c
        .state_joined(&fast, valid, None, now, false, move || {
            let _ = tx.send(());
        })
        .await;
    tokio::time::timeout(Duration::from_secs(3), rx)
        .await
        .expect("the check ran and called back")
        .unwrap();
    assert_eq!(
        holder.await.unwrap(),
        None,
        "the slow check outlasted the wait"
    );
}
