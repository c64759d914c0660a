//! Google Workspace domain-wide delegation end to end: the operator binary against the real
//! kube-apiserver, with `grantType: ServiceAccount` integrations whose token endpoint is the Google
//! stand-in's JWT-bearer grant (tests/support/provider_standin/jwt_bearer.rs: the assertion's RS256
//! signature verified with the service account's public key, then `iss`, `sub`, `aud`, `scope` and
//! `exp`), and real Dovecot checking the access token by introspection at the stand-in.
//!
//! Nobody signs in: no refresh token, no grant Secret, no sign-in link; the token Secret looks like a
//! signed-in Google integration's. Each setup failure (wrong key, no delegation for the client ID
//! and scope, unknown user, a key file that is not one) reaches the conditions with its reason and
//! what to do.

mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use std::time::Duration;
use support::{
    dovecot::{Dovecot, DovecotConfig},
    keys::TestKey,
    provider_standin::{Flavour, ProviderStandIn},
    world::{
        Env, assert_no_secrets_in_logs_or_events, condition, condition_message, is_ready, tail,
    },
};

const SERVICE_ACCOUNT: &str = "mailer@mio-test.iam.gserviceaccount.com";
const CLIENT_ID: &str = "104857600000000000001";
const MAIL_SCOPE: &str = "https://mail.google.com/";
const MAILBOX: &str = "support@example.test";

/// A Google stand-in where an admin delegated the mail scope to [`SERVICE_ACCOUNT`], whose key is
/// `key`, and [`MAILBOX`] is a user of the domain.
fn google(key: &TestKey) -> ProviderStandIn {
    let g = ProviderStandIn::start(Flavour::Google);
    g.add_service_account(SERVICE_ACCOUNT, CLIENT_ID, key.public_pem.as_bytes());
    g.delegate(CLIENT_ID, MAIL_SCOPE);
    g.add_user(MAILBOX);
    g
}

/// Dovecot asking the stand-in about every token (as Gmail knows Google's tokens).
fn dovecot(google: &ProviderStandIn) -> Dovecot {
    let url = google
        .url()
        .replacen("http://", "http://dovecot:unused@", 1);
    Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        ..DovecotConfig::new(format!("{url}/introspect"))
    })
}

async fn create(env: &Env, secret: serde_json::Value) {
    let s: Secret = serde_json::from_value(secret).unwrap();
    env.secrets()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

/// The client Secret holding a service account's key file, which its owner allows for the
/// mailboxes of example.test.
async fn key_secret(env: &Env, name: &str, json: &str) {
    key_secret_for(env, name, json, "*@example.test").await;
}

/// [`key_secret`] allowed for the mailboxes `allowed` (the delegated-mailboxes annotation).
async fn key_secret_for(env: &Env, name: &str, json: &str, allowed: &str) {
    env.put_secret(name, &[("service-account.json", json)])
        .await;
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/delegated-mailboxes": allowed}}});
    env.secrets()
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
}

/// A delegated Google integration for `mailbox` with the key in Secret `key`, its mail server
/// `imaps_port` (Dovecot) or a closed port.
fn delegated(
    google: &ProviderStandIn,
    key: &str,
    mailbox: &str,
    imaps_port: u16,
) -> serde_json::Value {
    serde_json::json!({
        "provider": "Google",
        "oauth": {
            "grantType": "ServiceAccount",
            "clientSecretRef": {"name": key},
            "endpoints": {"token": format!("{}/token", google.url())},
        },
        "mailbox": {
            "address": mailbox,
            "server": {"host": "127.0.0.1", "port": imaps_port, "tls": "Implicit"},
            "caSecretRef": {"name": "mail-ca"},
        },
    })
}

async fn world(prefix: &str, ca_pem: &[u8]) -> (Env, support::operator::Operator) {
    let env = Env::new(prefix, support::oauth::with_token_ttl(600)).await;
    // The token endpoint is the stand-in's: an override of Google's, allowed by this flag.
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    create(
        &env,
        serde_json::json!({
            "metadata": {"name": "mail-ca", "labels": {"mailintegration.dev/oauth-client": "true"}},
            "stringData": {"ca.crt": String::from_utf8(ca_pem.to_vec()).unwrap()},
        }),
    )
    .await;
    (env, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegated_integration_goes_ready_with_a_verified_jwt_bearer_grant() {
    let key = TestKey::new("mailer");
    let google = google(&key);
    let dovecot = dovecot(&google);
    let (env, op) = world("dwd-ok", &dovecot.ca_pem).await;
    key_secret(
        &env,
        "sa-key",
        &key.service_account_json(SERVICE_ACCOUNT, CLIENT_ID),
    )
    .await;
    env.integration_with(
        "support",
        MAILBOX,
        delegated(&google, "sa-key", MAILBOX, dovecot.imaps_port),
    )
    .await;
    let mi = env
        .wait_for(
            "support",
            "Ready=True and MailboxConnected",
            Duration::from_secs(60),
            &op,
            |mi| is_ready(mi) && condition(mi, "MailboxConnected").map(|c| c.0) == Some("True"),
        )
        .await;
    let status = mi.status.as_ref().unwrap();
    assert!(status.sign_in.is_none(), "nobody signs in");
    assert_eq!(status.account.as_deref(), Some(MAILBOX));
    assert_eq!(status.scopes, vec![MAIL_SCOPE.to_owned()]);
    assert_eq!(
        google.jwt_bearer_answers().first().map(String::as_str),
        Some(format!("ok sub={MAILBOX}").as_str()),
        "the stand-in verified the assertion"
    );
    assert!(
        env.secrets()
            .get_opt("support-oauth-grant")
            .await
            .unwrap()
            .is_none(),
        "no grant Secret"
    );
    // The token Secret looks like a signed-in integration's to a workload.
    let token = env.data("support-token", "access_token").await.unwrap();
    assert!(token.starts_with("ya29."));
    assert_eq!(
        env.data("support-token", "username").await.as_deref(),
        Some(MAILBOX)
    );
    assert!(env.data("support-token", "xoauth2").await.is_some());
    assert!(
        google.presented().is_empty(),
        "no refresh token was ever sent"
    );

    let key_lines: Vec<&str> = key
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut secrets = key_lines;
    secrets.push(&token);
    assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_setup_failures_are_refused_and_explained() {
    let key = TestKey::new("mailer");
    let google = google(&key);
    // Another service account of the project, for which nobody configured delegation.
    let undelegated = TestKey::new("undelegated");
    google.add_service_account(
        "reader@mio-test.iam.gserviceaccount.com",
        "999000999",
        undelegated.public_pem.as_bytes(),
    );
    let dovecot = dovecot(&google);
    let (env, op) = world("dwd-fail", &dovecot.ca_pem).await;
    let stranger = TestKey::new("stranger");
    key_secret(
        &env,
        "wrong-key",
        &stranger.service_account_json(SERVICE_ACCOUNT, CLIENT_ID),
    )
    .await;
    key_secret(
        &env,
        "undelegated-key",
        &undelegated.service_account_json("reader@mio-test.iam.gserviceaccount.com", "999000999"),
    )
    .await;
    key_secret(
        &env,
        "good-key",
        &key.service_account_json(SERVICE_ACCOUNT, CLIENT_ID),
    )
    .await;
    // A good key whose owner allows it for another mailbox only.
    key_secret_for(
        &env,
        "narrow-key",
        &key.service_account_json(SERVICE_ACCOUNT, CLIENT_ID),
        "helpdesk@example.test",
    )
    .await;
    // An OAuth client's JSON, not a service account's key file.
    key_secret(
        &env,
        "not-a-key",
        r#"{"web": {"client_id": "x.apps.googleusercontent.com"}}"#,
    )
    .await;

    let cases: [(&str, &str, &str, &str, &[&str]); 5] = [
        (
            "wrong-key",
            "wrong-key",
            MAILBOX,
            "ServiceAccountKeyRejected",
            &[
                "Invalid JWT Signature.",
                "Create a new JSON key",
                SERVICE_ACCOUNT,
            ],
        ),
        (
            "undelegated",
            "undelegated-key",
            MAILBOX,
            "DomainWideDelegationMissing",
            &[
                "Security > Access and data control > API controls > Domain-wide delegation",
                "Client ID: 999000999",
                "OAuth scopes: https://mail.google.com/",
            ],
        ),
        (
            "unknown-user",
            "good-key",
            "nobody@example.test",
            "DelegatedUserUnknown",
            &[
                "Invalid email or User ID",
                "spec.mailbox.address",
                "nobody@example.test",
            ],
        ),
        (
            "not-a-key",
            "not-a-key",
            MAILBOX,
            "ClientKeyInvalid",
            &["service-account.json", "not a service-account key file"],
        ),
        (
            "not-allowed",
            "narrow-key",
            MAILBOX,
            "DelegationNotAllowed",
            &[
                "mailintegration.dev/delegated-mailboxes",
                MAILBOX,
                "nothing was asked of Google",
            ],
        ),
    ];
    for (name, secret, mailbox, _, _) in &cases {
        env.integration_with(
            name,
            mailbox,
            delegated(&google, secret, mailbox, dovecot.imaps_port),
        )
        .await;
    }
    for (name, _, _, reason, words) in &cases {
        let mi = env
            .wait_for(name, reason, Duration::from_secs(60), &op, |mi| {
                condition(mi, "Ready") == Some(("False", reason))
            })
            .await;
        assert_eq!(
            condition(&mi, "Stalled").map(|c| c.0),
            Some("True"),
            "{name}"
        );
        assert!(mi.status.as_ref().unwrap().sign_in.is_none(), "{name}");
        let m = condition_message(&mi, "Ready");
        for w in *words {
            assert!(m.contains(w), "{name}: {w:?} missing from: {m}");
        }
        assert!(
            env.secrets()
                .get_opt(&format!("{name}-token"))
                .await
                .unwrap()
                .is_none(),
            "{name}: nothing published"
        );
    }
    // The stand-in refused the wrong key on its signature: it really checked it.
    let answers = google.jwt_bearer_answers();
    assert!(
        answers
            .iter()
            .any(|a| a == "invalid_grant: Invalid JWT Signature."),
        "{answers:?}\n{}",
        tail(&op.log(), 30)
    );
    // Three calls for the three integrations with a usable key; a permanent failure is not
    // retried, and neither the key file that is not one nor the key not allowed for the mailbox
    // reached Google.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        google.jwt_bearer_answers().len(),
        3,
        "{:?}",
        google.jwt_bearer_answers()
    );
    let mut secrets: Vec<&str> = Vec::new();
    for k in [&key, &stranger, &undelegated] {
        secrets.extend(k.key_pem.lines().filter(|l| !l.starts_with("-----")));
    }
    assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}
