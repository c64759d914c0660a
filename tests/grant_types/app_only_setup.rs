//! App-only grants beyond the client secret, and the setup steps an admin can miss: certificate
//! client authentication against oidc-provider with Dovecot checking the token, Microsoft's
//! AADSTS answers for missing consent, an expired secret and an unknown certificate, and the
//! client-secret expiry warning.

use super::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use support::dovecot::{Dovecot, DovecotConfig};

/// Dovecot asking `server()` about every token, naming the user by its `email` claim.
pub(super) fn dovecot() -> Dovecot {
    dovecot_with(None)
}

/// [`dovecot`], also opening a mailbox for a token whose `full_access` names it (a delegate's).
pub(super) fn shared_mailbox_dovecot() -> Dovecot {
    dovecot_with(Some("full_access"))
}

fn dovecot_with(delegation_attribute: Option<&str>) -> Dovecot {
    let (id, secret) = server().introspection_client();
    let url =
        server()
            .introspection_url()
            .replacen("http://", &format!("http://{id}:{secret}@"), 1);
    Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        delegation_attribute: delegation_attribute.map(Into::into),
        ..DovecotConfig::new(url)
    })
}

/// Puts Dovecot's CA into the marked Secret `mail-ca` and returns the `spec.mailbox` that checks
/// the token at Dovecot's IMAPS port with it.
pub(super) async fn imaps_mailbox(env: &Env, dovecot: &Dovecot) -> serde_json::Value {
    create(
        env,
        serde_json::json!({
            "metadata": {"name": "mail-ca", "labels": {"mailintegration.dev/oauth-client": "true"}},
            "stringData": {"ca.crt": String::from_utf8(dovecot.ca_pem.clone()).unwrap()},
        }),
    )
    .await;
    serde_json::json!({
        "server": {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "Implicit"},
        "caSecretRef": {"name": "mail-ca"},
    })
}

pub(super) async fn create(env: &Env, secret: serde_json::Value) {
    let s: Secret = serde_json::from_value(secret).unwrap();
    env.secrets()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

/// A `kubernetes.io/tls` Secret marked for the operator.
async fn tls_secret(env: &Env, name: &str, key: &TestKey) {
    create(
        env,
        serde_json::json!({
            "metadata": {"name": name, "labels": {"mailintegration.dev/oauth-client": "true"}},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": key.cert_pem, "tls.key": key.key_pem},
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_app_goes_ready_and_dovecot_accepts_its_token_for_its_mailbox_only() {
    let dovecot = dovecot();
    let env = Env::new("cert-app", server()).await;
    // oidc-provider stands in for Entra ID: a Microsoft integration whose endpoints are overridden.
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    let imaps = imaps_mailbox(&env, &dovecot).await;
    // The client Secret holds only the client ID: the certificate authenticates the client.
    env.put_secret("cert-client", &[("client_id", CERT_APP)])
        .await;
    tls_secret(&env, "app-cert", app_key()).await;
    // oidc-provider accepts client assertions addressed to its own token endpoint (as Entra
    // does), so the integration talks to it directly, not through the fault proxy.
    let direct = |mailbox: &str| {
        let mut imaps = imaps.clone();
        imaps["address"] = mailbox.into();
        serde_json::json!({
            "provider": "Microsoft",
            "oauth": {
                "grantType": "ClientCredentials",
                "tenant": "contoso.onmicrosoft.com",
                "scopes": ["mail"],
                "clientSecretRef": {"name": "cert-client"},
                "clientCertificateRef": {"name": "app-cert", "algorithm": "PS256"},
                "endpoints": {
                    "authorization": format!("{}/auth", env.server.base_url),
                    "token": format!("{}/token", env.server.base_url),
                },
            },
            "mailbox": imaps,
        })
    };
    env.integration_with("helpdesk", APP_MAILBOX, direct(APP_MAILBOX))
        .await;
    let mi = env
        .wait_for(
            "helpdesk",
            "Ready=True and MailboxConnected",
            Duration::from_secs(60),
            &op,
            |mi| is_ready(mi) && condition(mi, "MailboxConnected").map(|c| c.0) == Some("True"),
        )
        .await;
    assert!(mi.status.as_ref().unwrap().sign_in.is_none());
    let log = env.server.log();
    assert!(
        log.contains(&format!(
            "client={CERT_APP} grant_type=client_credentials result=ok refresh_token_issued=false"
        )),
        "oidc-provider accepted the client assertion:\n{}",
        tail(&log, 20)
    );
    let token = env.data("helpdesk-token", "access_token").await.unwrap();
    assert_eq!(
        env.data("helpdesk-token", "username").await.as_deref(),
        Some(APP_MAILBOX)
    );

    // Another mailbox: the token is valid, but the app has no access to that mailbox.
    env.integration_with("other", "sales@example.test", direct("sales@example.test"))
        .await;
    let mi = env
        .wait_condition(
            "other",
            ("MailboxConnected", "False", "AppMailboxAccessMissing"),
            Duration::from_secs(60),
            &op,
        )
        .await;
    let m = condition_message(&mi, "MailboxConnected");
    for words in [
        "New-ServicePrincipal -AppId",
        "Enterprise Application",
        "not the App registration's object ID",
        "Add-MailboxPermission -Identity sales@example.test",
        "FullAccess",
        "the mail server refused it for sales@example.test",
    ] {
        assert!(m.contains(words), "{words:?} missing from: {m}");
    }
    assert_eq!(
        condition(&mi, "Ready").map(|c| c.1),
        Some("AppMailboxAccessMissing")
    );

    // A certificate the app does not know: oidc-provider refuses the assertion.
    tls_secret(&env, "stranger-cert", &TestKey::new("stranger")).await;
    let mut stranger = direct(APP_MAILBOX);
    stranger["oauth"]["clientCertificateRef"] = serde_json::json!({"name": "stranger-cert"});
    env.integration_with("stranger", APP_MAILBOX, stranger)
        .await;
    env.wait_condition(
        "stranger",
        ("Ready", "False", "InvalidClient"),
        Duration::from_secs(60),
        &op,
    )
    .await;
    let key_lines: Vec<&str> = app_key()
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut secrets = key_lines.clone();
    secrets.push(&token);
    assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_grant_of_a_certificate_client_is_refreshed_with_client_assertions() {
    let env = Env::new("cert-interactive", server()).await;
    let op = env.operator("operator");
    env.put_secret("cert-client", &[("client_id", CERT_APP)])
        .await;
    tls_secret(&env, "app-cert", app_key()).await;
    // Alice signed in through the certificate client (the code exchanged with an assertion).
    let mut req = support::oauth::AuthorizationRequest::new("alice");
    req.client_id = Some(CERT_APP.into());
    let grant = env.server.obtain_grant_with(&req).await;
    env.put_secret(
        "alice-oauth-grant",
        &[("refresh_token", grant.refresh_token())],
    )
    .await;
    env.integration_with(
        "alice",
        "alice@example.test",
        serde_json::json!({
            "revokeOnDelete": true,
            "oauth": {
                "clientSecretRef": {"name": "cert-client"},
                "clientCertificateRef": {"name": "app-cert"},
                "endpoints": {
                    "authorization": format!("{}/auth", env.server.base_url),
                    "token": format!("{}/token", env.server.base_url),
                    "revocation": format!("{}/token/revocation", env.server.base_url),
                },
            },
        }),
    )
    .await;
    let mi = env
        .wait_for(
            "alice",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    assert_eq!(
        mi.status.as_ref().unwrap().account.as_deref(),
        Some("alice@example.test")
    );
    let log = env.server.log();
    assert!(
        log.contains(&format!(
            "client={CERT_APP} grant_type=refresh_token result=ok"
        )),
        "the refresh authenticated with the certificate:\n{}",
        tail(&log, 20)
    );
    let token = env.data("alice-token", "access_token").await.unwrap();
    assert!(env.server.introspect(&token).await);
    // The rotated refresh token was stored: the grant Secret no longer holds the first one.
    let stored = env
        .data("alice-oauth-grant", "refresh_token")
        .await
        .unwrap();
    assert_ne!(stored, grant.refresh_token());
    let key_lines: Vec<&str> = app_key()
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut secrets = key_lines;
    secrets.push(&token);
    secrets.push(&stored);

    // Deleted with revokeOnDelete: the grant is revoked with a client assertion too.
    env.integrations()
        .delete("alice", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.integrations().get_opt("alice").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "not deleted within 30 s:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = env.server.log();
    assert!(
        log.contains(&format!("revocation status=200 client={CERT_APP}")),
        "the revocation authenticated with the certificate:\n{}",
        tail(&log, 20)
    );
    assert!(
        !env.server.introspect(&token).await,
        "the grant was revoked at the provider"
    );
    assert_no_secrets_in_logs_or_events(&env, &op, &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_app_only_setup_steps_that_are_missing_are_named() {
    let env = Env::new("app-only-setup", server()).await;
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    env.client_secret(env.server.client_secret()).await;
    env.put_secret("cert-client", &[("client_id", CERT_APP)])
        .await;
    tls_secret(&env, "app-cert", app_key()).await;
    let m365 = |cert: bool| {
        let mut oauth = serde_json::json!({
            "grantType": "ClientCredentials",
            "tenant": "contoso.onmicrosoft.com",
            "endpoints": {"token": env.proxy.token_url()},
        });
        if cert {
            oauth["clientSecretRef"] = serde_json::json!({"name": "cert-client"});
            oauth["clientCertificateRef"] = serde_json::json!({"name": "app-cert"});
        }
        serde_json::json!({"provider": "Microsoft", "oauth": oauth})
    };
    let cases = [
        (
            Fault::microsoft(
                400,
                "invalid_grant",
                65001,
                "The user or administrator has not consented to use the application with ID 'mio'.",
            ),
            false,
            "AdminConsentRequired",
            vec![
                "Grant admin consent",
                "IMAP.AccessAsApp",
                "Client ID: mio-test-client",
            ],
        ),
        (
            Fault::microsoft(
                401,
                "invalid_client",
                7000222,
                "The provided client secret keys for app 'mio' are expired.",
            ),
            false,
            "ClientSecretExpired",
            vec!["has expired", "Certificates & secrets"],
        ),
        (
            Fault::microsoft(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation.",
            ),
            true,
            "ClientCertificateRejected",
            vec!["AADSTS700027", "Upload tls.crt", "Thumbprint sent: "],
        ),
    ];
    for (i, (fault, cert, reason, words)) in cases.into_iter().enumerate() {
        env.proxy.set_fault(fault);
        let name = format!("m365-{i}");
        env.integration_with(&name, "helpdesk@contoso.example", m365(cert))
            .await;
        let mi = env
            .wait_for(&name, reason, Duration::from_secs(30), &op, |mi| {
                condition(mi, "Ready") == Some(("False", reason))
            })
            .await;
        assert_eq!(condition(&mi, "Stalled"), Some(("True", reason)));
        let m = condition_message(&mi, "Ready");
        for w in words {
            assert!(m.contains(w), "{reason}: {w:?} missing from: {m}");
        }
    }
    let client_secret = env.server.client_secret().to_owned();
    assert_no_secrets_in_logs_or_events(&env, &op, &[&client_secret]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_expiring_within_30_days_warns_and_is_exported() {
    let env = Env::new("secret-expiry", server()).await;
    let op = env.operator("operator");
    let expires: jiff::Timestamp = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(10 * 24))
        .unwrap()
        .round(jiff::Unit::Second)
        .unwrap();
    create(
        &env,
        serde_json::json!({
            "metadata": {
                "name": "client",
                "labels": {"mailintegration.dev/oauth-client": "true"},
                "annotations": {
                    "mailintegration.dev/client-secret-expires": expires.to_string(),
                    "mailintegration.dev/oauth-servers": env.oauth_servers(),
                },
            },
            "stringData": {"client_id": env.server.client_id(), "client_secret": env.server.client_secret()},
        }),
    )
    .await;
    env.integration_with("soon", APP_MAILBOX, app_only()).await;
    let mi = env
        .wait_for(
            "soon",
            "Ready=True with ClientSecretExpiringSoon=True",
            Duration::from_secs(30),
            &op,
            |mi| is_ready(mi) && condition(mi, "ClientSecretExpiringSoon").is_some(),
        )
        .await;
    assert_eq!(
        condition(&mi, "ClientSecretExpiringSoon"),
        Some(("True", "ClientSecretExpiringSoon"))
    );
    let m = condition_message(&mi, "ClientSecretExpiringSoon");
    assert!(m.contains("in 9 days") || m.contains("in 10 days"), "{m}");
    assert_eq!(
        mi.status
            .as_ref()
            .unwrap()
            .client_secret_expires_at
            .as_ref()
            .map(|t| t.0),
        Some(expires)
    );
    let sample = format!(
        "mailintegration_client_secret_expiry_timestamp_seconds{{namespace=\"{}\",name=\"soon\"}}",
        env.ns
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let value = loop {
        if let Some(v) = op.metric(&sample) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no {sample}:\n{}",
            op.get("/metrics").unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(value, expires.as_second() as f64);

    // A grant whose end the provider announced at sign-in (a Google app in Testing status: 7 days).
    let grant = env.server.obtain_grant("alice").await;
    let ends = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(7 * 24))
        .unwrap()
        .round(jiff::Unit::Second)
        .unwrap();
    env.put_secret(
        "testing-app-oauth-grant",
        &[
            ("refresh_token", grant.refresh_token()),
            ("refresh_token_expires_at", &ends.to_string()),
        ],
    )
    .await;
    env.integration("testing-app", "alice@example.test").await;
    let mi = env
        .wait_for(
            "testing-app",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    assert_eq!(
        mi.status
            .as_ref()
            .unwrap()
            .grant_expires_at
            .as_ref()
            .map(|t| t.0),
        Some(ends)
    );
    let sample = format!(
        "mailintegration_grant_expiry_timestamp_seconds{{namespace=\"{}\",name=\"testing-app\"}}",
        env.ns
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while op.metric(&sample) != Some(ends.as_second() as f64) {
        assert!(Instant::now() < deadline, "no {sample}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A date 60 days away: no warning, the condition says so; Ready never moved.
    let far = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(60 * 24))
        .unwrap();
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/client-secret-expires": far.strftime("%Y-%m-%d").to_string()}}});
    env.secrets()
        .patch(
            "client",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let mi = env
        .wait_for(
            "soon",
            "ClientSecretExpiringSoon=False",
            Duration::from_secs(30),
            &op,
            |mi| {
                condition(mi, "ClientSecretExpiringSoon")
                    == Some(("False", "ClientSecretNotExpiring"))
            },
        )
        .await;
    assert!(is_ready(&mi));
}
