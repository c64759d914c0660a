use super::*;
use crate::api::MailIntegrationSpec;

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
