//! Grants where the mailbox itself does not sign in, end to end: the operator binary against the real
//! kube-apiserver and oidc-provider (client-credentials grant enabled), with Microsoft's error bodies
//! from the fault proxy in front of the token endpoint.
//!
//! - App-only (`spec.oauth.grantType: ClientCredentials`): nobody signs in; the integration goes
//!   Ready with a token Secret, no grant Secret and no sign-in link, Dovecot accepts the app token
//!   for the mailbox, and a new app-only token is fetched before the published one expires.
//! - Certificate client authentication (`spec.oauth.clientCertificateRef`, `private_key_jwt`):
//!   oidc-provider checks the client assertion against the certificate's public key, and Dovecot
//!   (introspecting at the same server) accepts the app token for the one mailbox the app was
//!   given; for another mailbox it refuses, which the operator explains as missing Exchange
//!   registration or mailbox permission.
//! - Microsoft's app-only setup errors (AADSTS65001, 7000222, 700027) through the fault proxy.
//! - A client Secret annotated with an expiry within 30 days: a warning condition and a metric,
//!   Ready stays True.
//! - Shared mailboxes (`spec.oauth.signInAccount`): a delegate signs in as themselves, the token
//!   Secret opens the shared mailbox.

mod support;

use base64::Engine as _;
use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};
use support::{
    fault_proxy::Fault,
    keys::TestKey,
    oauth::{ClientConfig, OAuthServer, OAuthServerConfig},
    world::{
        Env, annotate_refresh, assert_no_secrets_in_logs_or_events, condition, condition_message,
        is_ready, tail,
    },
};

/// The client ID of the app that authenticates with a certificate.
const CERT_APP: &str = "mio-cert-app";
/// The one mailbox app-only tokens are good for at Dovecot.
const APP_MAILBOX: &str = "helpdesk@example.test";

/// The certificate registered for [`CERT_APP`].
fn app_key() -> &'static TestKey {
    static K: OnceLock<TestKey> = OnceLock::new();
    K.get_or_init(|| TestKey::new("mio-cert-app"))
}

/// App-only tokens that live 15 s: a new one is due every ~10 s, leaving a few seconds to a
/// loaded 2-core machine between a renewal falling due and the old token's expiry.
fn server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        let mut config = OAuthServerConfig {
            access_token_ttl: Duration::from_secs(15),
            client_credentials: true,
            app_mailbox: Some(APP_MAILBOX.into()),
            // Alice may open the help desk's shared mailbox (Exchange's FullAccess).
            full_access: vec![("alice".into(), APP_MAILBOX.into())],
            ..Default::default()
        };
        // Signs in and gets app-only tokens alike, authenticating with its certificate.
        config.clients.push(ClientConfig {
            client_id: CERT_APP.into(),
            client_secret: String::new(),
            redirect_uris: config.clients[0].redirect_uris.clone(),
            certificate: Some(app_key().client_certificate()),
        });
        OAuthServer::start(config)
    })
}

fn app_only() -> serde_json::Value {
    serde_json::json!({"oauth": {"grantType": "ClientCredentials", "scopes": ["mail"]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_only_integration_goes_ready_without_a_sign_in_and_is_renewed() {
    let dovecot = app_only_setup::dovecot();
    let env = Env::new("app-only", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let mut spec = app_only();
    // Dovecot checks the app token for the mailbox named in XOAUTH2 (its `email` claim).
    spec["mailbox"] = app_only_setup::imaps_mailbox(&env, &dovecot).await;
    env.integration_with("shared", APP_MAILBOX, spec).await;

    let mi = env
        .wait_for(
            "shared",
            "Ready=True and MailboxConnected",
            Duration::from_secs(60),
            &op,
            |mi| is_ready(mi) && condition(mi, "MailboxConnected").map(|c| c.0) == Some("True"),
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    assert_eq!(condition(&mi, "TokenValid"), Some(("True", "TokenValid")));
    let status = mi.status.as_ref().unwrap();
    assert!(status.sign_in.is_none(), "no sign-in link for app-only");
    assert_eq!(status.account.as_deref(), Some("helpdesk@example.test"));
    assert_eq!(status.scopes, vec!["mail".to_owned()]);
    assert!(
        env.secrets()
            .get_opt("shared-oauth-grant")
            .await
            .unwrap()
            .is_none(),
        "an app-only integration has no grant Secret"
    );

    // The token Secret looks exactly like a delegated integration's: the mailbox is the user.
    let token = env.data("shared-token", "access_token").await.unwrap();
    assert!(
        env.server.introspect(&token).await,
        "the app token is active"
    );
    assert_eq!(
        env.data("shared-token", "username").await.as_deref(),
        Some("helpdesk@example.test")
    );
    let xoauth2 = base64::engine::general_purpose::STANDARD
        .decode(env.data("shared-token", "xoauth2").await.unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(xoauth2).unwrap(),
        format!("user=helpdesk@example.test\x01auth=Bearer {token}\x01\x01")
    );

    // Renewed before it expires, twice, each time with the client-credentials grant.
    // Each token's expiry is read from the token Secret that carries it (one read for both):
    // the status is applied after the Secret is written, so a status read just after a new
    // token appears can still hold the previous token's expiry.
    let mut seen = vec![token];
    let mut expiry = status.access_token_expires_at.clone().unwrap().0;
    let deadline = Instant::now() + Duration::from_secs(75);
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "only {} app tokens in 75 s:\n{}",
            seen.len(),
            tail(&op.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let secret = env.secrets().get("shared-token").await.unwrap();
        let key = |k: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|v| String::from_utf8(v.0.clone()).unwrap())
        };
        let Some(t) = key("access_token") else {
            continue;
        };
        if seen.contains(&t) {
            continue;
        }
        let now = jiff::Timestamp::now();
        assert!(
            now < expiry,
            "a new app token must come before the old one expires ({now} >= {expiry})"
        );
        assert!(
            is_ready(&env.get("shared").await),
            "still Ready after a renewal"
        );
        expiry = key("expiry")
            .expect("the token Secret has its expiry")
            .parse()
            .expect("the token Secret's expiry is RFC 3339");
        seen.push(t);
    }
    let log = env.server.log();
    assert!(
        log.contains("grant_type=client_credentials result=ok refresh_token_issued=false"),
        "the OAuth server saw client-credentials requests:\n{}",
        tail(&log, 20)
    );
    assert_eq!(
        env.proxy.refresh_requests(),
        0,
        "no refresh token is ever presented"
    );
    assert!(env.get("shared").await.status.unwrap().sign_in.is_none());
    let client_secret = env.server.client_secret().to_owned();
    let mut secrets: Vec<&str> = seen.iter().map(String::as_str).collect();
    secrets.push(&client_secret);
    assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_app_only_setup_errors_reach_the_conditions() {
    let env = Env::new("app-only-ms", server()).await;
    // The fault proxy stands in for login.microsoftonline.com.
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    env.client_secret(env.server.client_secret()).await;
    env.proxy.set_fault(Fault::microsoft(
        401,
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
    ));
    env.integration_with(
        "m365",
        "helpdesk@contoso.example",
        serde_json::json!({
            "provider": "Microsoft",
            "oauth": {
                "grantType": "ClientCredentials",
                "tenant": "contoso.onmicrosoft.com",
                "endpoints": {"token": env.proxy.token_url()},
            },
        }),
    )
    .await;
    let stalled_with = |code: &'static str| {
        move |mi: &kube_mi::MailIntegration| {
            condition(mi, "Stalled").map(|c| c.0) == Some("True")
                && mi
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Authorized"))
                    .is_some_and(|c| c.message.contains(code))
        }
    };
    let mi = env
        .wait_for(
            "m365",
            "Stalled by AADSTS7000215",
            Duration::from_secs(30),
            &op,
            stalled_with("AADSTS7000215"),
        )
        .await;
    assert_eq!(condition(&mi, "Ready"), Some(("False", "InvalidClient")));
    assert!(mi.status.as_ref().unwrap().sign_in.is_none());
    assert_eq!(
        env.proxy.refresh_requests(),
        0,
        "nothing but the client-credentials grant was asked for"
    );

    // The app is not registered in that tenant: a different answer, a different message.
    env.proxy.set_fault(Fault::microsoft(
        400,
        "unauthorized_client",
        700016,
        "Application with identifier 'mio' was not found in the directory 'contoso'.",
    ));
    annotate_refresh(&env, "m365", "1").await;
    let mi = env
        .wait_for(
            "m365",
            "Stalled by AADSTS700016",
            Duration::from_secs(30),
            &op,
            stalled_with("AADSTS700016"),
        )
        .await;
    assert_eq!(condition(&mi, "Ready"), Some(("False", "InvalidClient")));
    assert!(
        env.secrets().get_opt("m365-token").await.unwrap().is_none(),
        "no token was published"
    );
    let client_secret = env.server.client_secret().to_owned();
    assert_no_secrets_in_logs_or_events(&env, &op, &[&client_secret]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_mailbox_is_opened_with_the_grant_of_its_delegate() {
    // Dovecot opens a mailbox for its own account's token, or for the token of an account that
    // may open it (the `full_access` its tokens carry), as Exchange does for FullAccess delegates.
    let dovecot = app_only_setup::shared_mailbox_dovecot();
    let env = Env::new("shared-mailbox", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let imap = app_only_setup::imaps_mailbox(&env, &dovecot).await;
    // Alice (who has FullAccess to the help desk's mailbox) signed in as herself.
    env.grant("helpdesk", "alice").await;
    env.integration_with(
        "helpdesk",
        "helpdesk@example.test",
        serde_json::json!({"oauth": {"signInAccount": "alice@example.test"}, "mailbox": imap}),
    )
    .await;
    // Bob signed in as himself too, but has no access to the help desk's mailbox.
    env.grant("no-access", "bob").await;
    env.integration_with(
        "no-access",
        "helpdesk@example.test",
        serde_json::json!({"oauth": {"signInAccount": "bob@example.test"}, "mailbox": imap}),
    )
    .await;
    // The same grant for a mailbox whose delegate is Bob: the ID token says Alice, so it is refused.
    env.grant("wrong-delegate", "alice").await;
    env.integration_with(
        "wrong-delegate",
        "helpdesk@example.test",
        serde_json::json!({"oauth": {"signInAccount": "bob@example.test"}}),
    )
    .await;

    let mi = env
        .wait_for(
            "helpdesk",
            "Ready=True and MailboxConnected",
            Duration::from_secs(30),
            &op,
            |mi| is_ready(mi) && condition(mi, "MailboxConnected").map(|c| c.0) == Some("True"),
        )
        .await;
    assert!(
        dovecot.logins("helpdesk@example.test") >= 1,
        "Dovecot opened the shared mailbox:\n{}",
        dovecot.log_tail(20)
    );
    assert_eq!(
        dovecot.logins("alice@example.test"),
        0,
        "the check opened the shared mailbox, not the delegate's own"
    );
    let refused = env
        .wait_for(
            "no-access",
            "MailboxConnected=False",
            Duration::from_secs(30),
            &op,
            |mi| condition(mi, "MailboxConnected").map(|c| c.0) == Some("False"),
        )
        .await;
    assert_eq!(
        condition(&refused, "MailboxConnected"),
        Some(("False", "MailboxAuthFailed")),
        "a delegate without access to the mailbox is refused by the mail server: {:?}",
        refused.status
    );
    assert_eq!(
        condition(&refused, "Authorized").map(|c| c.0),
        Some("True"),
        "Bob's own grant is fine: {:?}",
        refused.status
    );
    assert_eq!(
        mi.status.as_ref().unwrap().account.as_deref(),
        Some("alice@example.test"),
        "status.account is who signed in"
    );
    let token = env.data("helpdesk-token", "access_token").await.unwrap();
    assert_eq!(
        env.data("helpdesk-token", "username").await.as_deref(),
        Some("helpdesk@example.test"),
        "workloads open the shared mailbox"
    );
    let xoauth2 = base64::engine::general_purpose::STANDARD
        .decode(env.data("helpdesk-token", "xoauth2").await.unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(xoauth2).unwrap(),
        format!("user=helpdesk@example.test\x01auth=Bearer {token}\x01\x01")
    );

    let mi = env
        .wait_condition(
            "wrong-delegate",
            ("Ready", "False", "AccountMismatch"),
            Duration::from_secs(30),
            &op,
        )
        .await;
    let message = condition_message(&mi, "Ready");
    assert!(
        message.contains("alice@example.test") && message.contains("bob@example.test"),
        "{message}"
    );
    assert!(
        env.secrets()
            .get_opt("wrong-delegate-token")
            .await
            .unwrap()
            .is_none(),
        "nothing is published for the wrong delegate"
    );
}

#[path = "grant_types/app_only_setup.rs"]
mod app_only_setup;

mod kube_mi {
    pub use mail_integration_operator::api::MailIntegration;
}
