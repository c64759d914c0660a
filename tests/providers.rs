//! Google and Microsoft through the operator: a real operator process against the real API server,
//! with `provider: Google` / `provider: Microsoft` integrations whose token endpoint is a
//! [`FaultProxy`] (the providers' exact error bodies) in front of a [`ProviderStandIn`] (the
//! providers' success behaviour: Google does not rotate, Microsoft rotates without invalidating the
//! previous refresh token). `--allow-endpoint-overrides` lets the spec point there.
//!
//! Each documented refresh-failure reason of each provider (src/provider/classify.rs,
//! docs/google.md, docs/microsoft.md) must reach the resource's conditions with its fix text; after
//! a permanent one the operator must not call the token endpoint again, while the transient ones in
//! the same operator are retried (the control that shows the operator was able to call again).
//!
//! Every integration gets a proxy of its own, so the counts of one cannot be confused with another's.
//! The mailbox server is 127.0.0.1:1 (nothing listens there): the check never leaves loopback.

mod support;

use jiff::{SignedDuration, Timestamp};
use mail_integration_operator::api::MailIntegration;
use std::time::{Duration, Instant};
use support::{
    fault_proxy::{Fault, FaultProxy},
    operator::Operator,
    provider_standin::{Flavour, ProviderStandIn},
    world::{Env, condition, condition_message, mail_integration, tail},
};

const CLIENT_SECRET: &str = "provider-test-client-secret-5b7c1e";

/// One refresh failure and what the resource must then say.
struct Case {
    name: &'static str,
    fault: Fault,
    /// Google: when the grant was signed in (the Testing-app detection reads it).
    issued_days_ago: Option<f64>,
    reason: &'static str,
    /// Words of the fix the condition message must carry.
    fix: &'static [&'static str],
    permanent: bool,
}

fn google_cases() -> Vec<Case> {
    vec![
        Case {
            name: "g-revoked",
            fault: Fault::GoogleGrantRevoked,
            issued_days_ago: Some(30.0),
            reason: "GrantRevoked",
            fix: &["Sign in again at status.signIn.url", "\"Testing\""],
            permanent: true,
        },
        Case {
            name: "g-revoked-no-history",
            fault: Fault::GoogleGrantRevoked,
            issued_days_ago: None,
            reason: "GrantRevoked",
            fix: &["Sign in again at status.signIn.url"],
            permanent: true,
        },
        Case {
            name: "g-testing-app",
            fault: Fault::GoogleGrantRevoked,
            // 7 days and 10 minutes: the Testing-status limit.
            issued_days_ago: Some(7.0 + 10.0 / 1440.0),
            reason: "TestingAppGrantExpired",
            fix: &["Publish the app", "7.0 days after sign-in"],
            permanent: true,
        },
        Case {
            name: "g-rapt",
            fault: Fault::GoogleInvalidRapt,
            issued_days_ago: Some(2.0),
            reason: "ReauthRequired",
            fix: &["re-authenticate", "marking it Trusted", "status.signIn.url"],
            permanent: true,
        },
        Case {
            name: "g-client",
            fault: Fault::GoogleInvalidClient,
            issued_days_ago: None,
            reason: "InvalidClient",
            fix: &["Check the client Secret against the provider's console"],
            permanent: true,
        },
        Case {
            name: "g-unauthorized",
            fault: Fault::GoogleUnauthorizedClient,
            issued_days_ago: None,
            reason: "UnauthorizedClient",
            fix: &[
                "another OAuth client",
                "Check client_id, then sign in again",
            ],
            permanent: true,
        },
        Case {
            name: "g-scope",
            fault: Fault::json(
                400,
                serde_json::json!({"error": "invalid_scope", "error_description": "Some requested scopes were invalid."}),
            ),
            issued_days_ago: None,
            reason: "ScopeMissing",
            fix: &["sign in again with prompt Consent"],
            permanent: true,
        },
        Case {
            name: "g-403-html",
            fault: Fault::GoogleHtmlForbidden,
            issued_days_ago: None,
            reason: "RateLimited",
            fix: &["HTTP 403", "as it does under load"],
            permanent: false,
        },
        Case {
            name: "g-429",
            fault: Fault::RateLimited {
                retry_after_secs: 1,
            },
            issued_days_ago: None,
            reason: "RateLimited",
            fix: &["rate limiting", "HTTP 429"],
            permanent: false,
        },
        Case {
            name: "g-503",
            fault: Fault::ServiceUnavailable,
            issued_days_ago: None,
            reason: "ProviderUnavailable",
            fix: &["HTTP 503", "retrying"],
            permanent: false,
        },
    ]
}

fn ms(status: u16, error: &str, code: u32, message: &str) -> Fault {
    Fault::microsoft(status, error, code, message)
}

fn microsoft_cases() -> Vec<Case> {
    let c = |name, fault, reason, fix, permanent| Case {
        name,
        fault,
        issued_days_ago: None,
        reason,
        fix,
        permanent,
    };
    vec![
        c(
            "m-inactive",
            Fault::MicrosoftGrantExpiredInactive,
            "GrantExpiredInactive",
            &["AADSTS700082", "90 days without use", "Sign in again"],
            true,
        ),
        c(
            "m-70008",
            ms(
                400,
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to inactivity.",
            ),
            "GrantExpiredInactive",
            &["AADSTS70008", "Sign in again"],
            true,
        ),
        c(
            "m-spa",
            ms(
                400,
                "invalid_grant",
                700084,
                "The refresh token was issued to a single page app (SPA), and therefore has a fixed, limited lifetime of 1.00:00:00.",
            ),
            "GrantExpiredInactive",
            &["\"Web\" platform", "Single-page application"],
            true,
        ),
        c(
            "m-revoked",
            ms(
                400,
                "invalid_grant",
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token is needed.",
            ),
            "GrantRevoked",
            &["AADSTS50173", "Sign in again at status.signIn.url"],
            true,
        ),
        c(
            "m-mfa",
            ms(
                400,
                "interaction_required",
                50076,
                "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication.",
            ),
            "ReauthRequired",
            &["multi-factor authentication", "Sign in again"],
            true,
        ),
        c(
            "m-ca",
            ms(
                400,
                "invalid_grant",
                53003,
                "Access has been blocked by Conditional Access policies.",
            ),
            "ProviderError",
            &["Conditional Access", "signing in again alone will not help"],
            true,
        ),
        c(
            "m-consent",
            ms(
                400,
                "invalid_grant",
                65001,
                "The user or administrator has not consented to use the application.",
            ),
            "ScopeMissing",
            &["AADSTS65001", "admin consent"],
            true,
        ),
        c(
            "m-secret",
            ms(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            ),
            "InvalidClient",
            &["Value (not its Secret ID)", "Certificates & secrets"],
            true,
        ),
        c(
            "m-secret-expired",
            ms(
                401,
                "invalid_client",
                7000222,
                "The provided client secret keys for app are expired.",
            ),
            "ClientSecretExpired",
            &["has expired", "Create a new one"],
            true,
        ),
        c(
            "m-client-id",
            ms(
                400,
                "unauthorized_client",
                700016,
                "Application with identifier was not found in the directory.",
            ),
            "InvalidClient",
            &["AADSTS700016", "spec.oauth.tenant"],
            true,
        ),
        c(
            "m-tenant",
            ms(400, "invalid_request", 90002, "Tenant not found."),
            "InvalidEndpoint",
            &["AADSTS90002", "tenant ID or domain"],
            true,
        ),
        c(
            "m-loop",
            ms(
                400,
                "invalid_request",
                50196,
                "The server terminated an operation because it encountered a client request loop.",
            ),
            "RateLimited",
            &["AADSTS50196", "throttling"],
            false,
        ),
        c(
            "m-throttled",
            ms(
                400,
                "temporarily_unavailable",
                90055,
                "The request has been throttled.",
            ),
            "RateLimited",
            &["AADSTS90055", "throttling"],
            false,
        ),
    ]
}

/// A Google or Microsoft integration of `address` whose endpoints are `proxy`, and whose mailbox
/// server is 127.0.0.1:1.
fn spec(flavour: Flavour, name: &str, address: &str, proxy: &FaultProxy) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "provider": format!("{flavour:?}"),
        "mailbox": {
            "address": address,
            "server": {"host": "127.0.0.1", "port": support::process::CLOSED_PORT, "tls": "None"},
        },
        "oauth": {
            "clientSecretRef": {"name": "client"},
            "redirectURL": "http://127.0.0.1:8080/oauth2/callback",
            "endpoints": {
                "authorization": format!("{}/auth", proxy.url()),
                "token": proxy.token_url(),
                "revocation": format!("{}/revoke", proxy.url()),
            },
        },
        "tokenSecret": {"name": format!("{name}-token")},
        "refreshBefore": "1m",
    });
    if flavour == Flavour::Microsoft {
        spec["oauth"]["tenant"] = "contoso.onmicrosoft.com".into();
    }
    spec
}

async fn create(env: &Env, name: &str, spec: serde_json::Value) {
    env.integrations()
        .create(&Default::default(), &mail_integration(name, spec))
        .await
        .unwrap();
}

/// The grant a sign-in would have stored, brought by hand: `refresh_token`, and `issued_at` when given.
async fn put_grant(env: &Env, name: &str, refresh_token: &str, issued_days_ago: Option<f64>) {
    let issued = issued_days_ago.map(|d| {
        (Timestamp::now() - SignedDuration::from_secs_f64(d * 86400.0))
            .round(jiff::Unit::Second)
            .unwrap()
            .to_string()
    });
    let mut pairs = vec![("refresh_token", refresh_token)];
    if let Some(i) = &issued {
        pairs.push(("issued_at", i.as_str()));
    }
    env.put_secret(&format!("{name}-oauth-grant"), &pairs).await;
}

/// Drive every case through one operator; check conditions, fix text, sign-in link and calls.
async fn drive(flavour: Flavour, cases: Vec<Case>) {
    let env = Env::new(
        &format!("{flavour:?}").to_lowercase(),
        support::oauth::shared(),
    )
    .await;
    let standin = ProviderStandIn::start(flavour);
    env.put_secret(
        "client",
        &[
            ("client_id", "provider-test-client"),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await;
    // Microsoft's operator logs JSON, as the chart runs it (logFormat: json): the leak check at
    // the end reads that format; Google's the text format.
    let format = match flavour {
        Flavour::Google => "--log-format=text",
        Flavour::Microsoft => "--log-format=json",
    };
    let op = env.operator_with("operator", &["--allow-endpoint-overrides", format]);
    let mut proxies = Vec::new();
    let mut refresh_tokens = Vec::new();
    for case in &cases {
        let proxy = FaultProxy::start(&standin.url());
        proxy.set_fault(case.fault.clone());
        let rt = standin.issue_refresh_token();
        put_grant(&env, case.name, &rt, case.issued_days_ago).await;
        create(
            &env,
            case.name,
            spec(flavour, case.name, "alice@example.test", &proxy),
        )
        .await;
        proxies.push(proxy);
        refresh_tokens.push(rt);
    }

    // Every case reaches its reason, with its fix.
    let mut reached_at = Vec::new();
    for (case, proxy) in cases.iter().zip(&proxies) {
        let mi = if case.permanent {
            env.wait_for(case.name, case.reason, Duration::from_secs(60), &op, |m| {
                condition(m, "Stalled") == Some(("True", case.reason))
            })
            .await
        } else {
            env.wait_for(case.name, case.reason, Duration::from_secs(60), &op, |m| {
                condition(m, "Reconciling") == Some(("True", case.reason))
            })
            .await
        };
        let (t, other) = if case.permanent {
            ("Authorized", "Ready")
        } else {
            ("Reconciling", "Ready")
        };
        if case.permanent {
            assert_eq!(
                condition(&mi, t),
                Some(("False", case.reason)),
                "{}",
                case.name
            );
        }
        assert_eq!(
            condition(&mi, other),
            Some(("False", case.reason)),
            "{}: {:?}",
            case.name,
            mi.status
        );
        let msg = condition_message(&mi, t);
        for words in case.fix {
            assert!(
                msg.contains(words),
                "{}: the {t} message lacks {words:?}: {msg}",
                case.name
            );
        }
        let sign_in_fixes = case.permanent
            && mail_integration_operator::reconcile::decide::sign_in_fixes(case.reason);
        assert_eq!(
            mi.status.as_ref().unwrap().sign_in.is_some(),
            sign_in_fixes,
            "{}: status.signIn is offered exactly when a sign-in fixes {}",
            case.name,
            case.reason
        );
        assert!(proxy.faulted_requests() >= 1, "{}", case.name);
        reached_at.push((Instant::now(), proxy.token_requests()));
    }

    // Permanent: no call after the one that failed. Transient: retried (the operator could call).
    // The first retry of a transient failure comes after 5 s ± 20 % (or Retry-After: 1 s); waiting
    // 20 s leaves a 14 s margin for a loaded machine, and the transient cases show it was enough.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all_retried = cases
            .iter()
            .zip(&proxies)
            .zip(&reached_at)
            .filter(|((c, _), _)| !c.permanent)
            .all(|((_, p), (_, n))| p.token_requests() > *n);
        if all_retried {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a transient failure was not retried within 20 s:\n{}",
            tail(&op.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give the permanent ones as long as the transient ones needed, and more: a retry of theirs
    // would come on the same backoff schedule.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for ((case, proxy), rt) in cases.iter().zip(&proxies).zip(&refresh_tokens) {
        if case.permanent {
            assert_eq!(
                proxy.token_requests(),
                1,
                "{}: the operator called the token endpoint again after {}:\n{}",
                case.name,
                case.reason,
                tail(&op.log(), 30)
            );
            let mi = env.get(case.name).await;
            assert_eq!(condition(&mi, "Stalled"), Some(("True", case.reason)));
        }
        // What reached the token endpoint was this integration's own refresh token, every time.
        assert_eq!(
            proxy.presentations().keys().collect::<Vec<_>>(),
            vec![&support::fault_proxy::digest(rt)],
            "{}: only its own refresh token was presented",
            case.name
        );
    }
    // Faulted requests never reach the provider.
    assert!(standin.presented().is_empty(), "{:?}", standin.presented());
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason} {.involvedObject.name}{\"\\n\"}{end}",
    ]);
    for case in cases.iter().filter(|c| c.permanent) {
        assert!(
            events.contains(&format!("Warning {} {}", case.reason, case.name)),
            "{}: a Warning event {}:\n{events}",
            case.name,
            case.reason
        );
    }
    if flavour == Flavour::Microsoft {
        let log = op.log();
        let json_lines = log
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
            .count();
        assert!(
            json_lines * 2 > log.lines().count(),
            "the operator logs JSON: the leak check reads that format\n{}",
            tail(&log, 5)
        );
    }
    let mut secrets: Vec<&str> = refresh_tokens.iter().map(String::as_str).collect();
    secrets.push(CLIENT_SECRET);
    support::world::assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_google_refresh_failure_reaches_the_conditions_and_permanent_ones_stop_calls() {
    drive(Flavour::Google, google_cases()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_microsoft_refresh_failure_reaches_the_conditions_and_permanent_ones_stop_calls() {
    drive(Flavour::Microsoft, microsoft_cases()).await;
}

async fn wait_grant_change(env: &Env, name: &str, from: &str, op: &Operator) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = env
            .data(&format!("{name}-oauth-grant"), "refresh_token")
            .await
            .unwrap_or_default();
        if now != from {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: the grant still holds the old refresh token after 30 s:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_token_valid(env: &Env, name: &str, op: &Operator) -> MailIntegration {
    env.wait_for(name, "TokenValid=True", Duration::from_secs(30), op, |m| {
        condition(m, "TokenValid").is_some_and(|c| c.0 == "True")
    })
    .await
}

/// Microsoft rotates on every refresh and keeps the old refresh token working: the operator must
/// store each new one and present only the newest, though the provider would never punish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_rotation_is_stored_and_only_the_newest_refresh_token_is_presented() {
    let env = Env::new("msrotate", support::oauth::shared()).await;
    let standin = ProviderStandIn::start(Flavour::Microsoft);
    let proxy = FaultProxy::start(&standin.url());
    env.put_secret(
        "client",
        &[
            ("client_id", "provider-test-client"),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await;
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    let rt0 = standin.issue_refresh_token();
    put_grant(&env, "inbox", &rt0, None).await;
    create(
        &env,
        "inbox",
        spec(Flavour::Microsoft, "inbox", "alice@example.test", &proxy),
    )
    .await;
    wait_token_valid(&env, "inbox", &op).await;
    let rt1 = wait_grant_change(&env, "inbox", &rt0, &op).await;
    let mut chain = vec![rt0.clone(), rt1.clone()];
    for i in 0..2 {
        let before = env.data("inbox-token", "access_token").await.unwrap();
        support::world::annotate_refresh(&env, "inbox", &format!("r{i}")).await;
        let next = wait_grant_change(&env, "inbox", chain.last().unwrap(), &op).await;
        chain.push(next);
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.data("inbox-token", "access_token").await.as_deref() == Some(before.as_str()) {
            assert!(Instant::now() < deadline, "no new access token published");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Each refresh presented the newest refresh token, each exactly once, in order.
    let presented = standin.presented();
    assert_eq!(
        presented,
        chain[..chain.len() - 1].to_vec(),
        "the refresh tokens presented, in order"
    );
    assert!(proxy.reused_refresh_tokens().is_empty());
    // Microsoft gets the mail scope and offline_access on every refresh (one resource per request).
    for s in standin.scopes_sent() {
        let s = s.expect("a scope parameter on every Microsoft refresh");
        assert!(
            s.contains("https://outlook.office.com/IMAP.AccessAsUser.All")
                && s.contains("offline_access"),
            "{s}"
        );
    }
    // The token Secret has every documented key, the SASL strings built from the current token.
    let token = env.data("inbox-token", "access_token").await.unwrap();
    let expiry = env.data("inbox-token", "expiry").await.expect("expiry key");
    let expiry: Timestamp = expiry.parse().expect("expiry is RFC 3339");
    let from_now = expiry.duration_since(Timestamp::now());
    assert!(
        from_now > SignedDuration::from_secs(3000) && from_now <= SignedDuration::from_secs(3600),
        "expiry {expiry} is the answer's expires_in (3599 s) from now"
    );
    let b64 = |s: &str| {
        use base64::Engine as _;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("base64"),
        )
        .unwrap()
    };
    let xoauth2 = b64(&env.data("inbox-token", "xoauth2").await.expect("xoauth2"));
    assert_eq!(
        xoauth2,
        format!("user=alice@example.test\x01auth=Bearer {token}\x01\x01")
    );
    let oauthbearer = b64(&env
        .data("inbox-token", "oauthbearer")
        .await
        .expect("oauthbearer"));
    assert_eq!(
        oauthbearer,
        format!(
            "n,a=alice@example.test,\x01host=127.0.0.1\x01port=1\x01auth=Bearer {token}\x01\x01"
        )
    );
    let mut secrets: Vec<&str> = chain.iter().map(String::as_str).collect();
    secrets.push(CLIENT_SECRET);
    secrets.push(&token);
    support::world::assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}

/// Google does not rotate: the same refresh token is presented again, the grant is not rewritten,
/// and status.scopes is what Google granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_refresh_without_rotation_keeps_the_grant_and_reports_the_granted_scope() {
    let env = Env::new("gok", support::oauth::shared()).await;
    let standin = ProviderStandIn::start(Flavour::Google);
    let proxy = FaultProxy::start(&standin.url());
    env.put_secret(
        "client",
        &[
            ("client_id", "provider-test-client"),
            ("client_secret", CLIENT_SECRET),
        ],
    )
    .await;
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    let rt = standin.issue_refresh_token();
    put_grant(&env, "inbox", &rt, Some(1.0)).await;
    create(
        &env,
        "inbox",
        spec(Flavour::Google, "inbox", "alice@example.test", &proxy),
    )
    .await;
    let mi = wait_token_valid(&env, "inbox", &op).await;
    assert_eq!(
        mi.status.as_ref().unwrap().scopes,
        vec!["https://mail.google.com/".to_owned()]
    );
    let before = env.data("inbox-token", "access_token").await.unwrap();
    support::world::annotate_refresh(&env, "inbox", "again").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.data("inbox-token", "access_token").await.as_deref() == Some(before.as_str()) {
        assert!(
            Instant::now() < deadline,
            "no new access token:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(standin.presented(), vec![rt.clone(), rt.clone()]);
    assert_eq!(
        env.data("inbox-oauth-grant", "refresh_token")
            .await
            .as_deref(),
        Some(rt.as_str())
    );
    // Google refreshes carry no scope parameter: the grant's scopes apply.
    assert_eq!(standin.scopes_sent(), vec![None, None]);
}
