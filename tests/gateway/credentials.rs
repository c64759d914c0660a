//! The operator's side of the gateway's credentials (issue 22, point 1; docs/gateway.md "Giving an
//! app a credential"): the app Secrets, the gateway Secret, rotation, and status.gateway.

use crate::support::{
    self,
    oauth::OAuthServer,
    operator::Operator,
    world::{Env, annotate_refresh, assert_no_secrets_in_logs_or_events, condition, tail},
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use mail_integration_operator::{
    api::MailIntegration,
    gateway::config::{GatewayAppConfig, GatewayConfig, username},
    secret::SecretValue,
};
use std::time::{Duration, Instant};

/// Access tokens that live 10 minutes: refreshes happen when a test asks for one.
fn server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

const WAIT: Duration = Duration::from_secs(60);

/// The gateway process's field manager (GATEWAY.md: `usage.rs`).
const GATEWAY_MANAGER: &str = "mail-integration-gateway";

/// Apply `status.gateway.apps` as the gateway does: server-side apply under its own manager.
async fn apply_gateway_usage(env: &Env, name: &str, apps: serde_json::Value) {
    let patch = serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "status": {"gateway": {"apps": apps}},
    });
    env.integrations()
        .patch_status(
            name,
            &PatchParams::apply(GATEWAY_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
}

/// The names of the apps in status.gateway.apps.
fn usage_apps(mi: &MailIntegration) -> Vec<String> {
    mi.status
        .as_ref()
        .and_then(|s| s.gateway.as_ref())
        .map(|g| g.apps.iter().map(|a| a.name.clone()).collect())
        .unwrap_or_default()
}

/// The status fields `manager` owns, as the API server's managedFields record them.
fn status_fields_of(mi: &MailIntegration, manager: &str) -> String {
    mi.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(manager))
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.fields_v1.as_ref().map(|f| f.0.to_string()))
        .collect()
}

/// Force a refresh and wait until the operator has written its status for it.
async fn refreshed(env: &Env, op: &support::operator::Operator, name: &str, value: &str) {
    annotate_refresh(env, name, value).await;
    env.wait_for(name, "the refresh request handled", WAIT, op, |mi| {
        mi.status
            .as_ref()
            .and_then(|s| s.last_refresh_request.as_deref())
            == Some(value)
    })
    .await;
}

/// The gateway writes status.gateway.apps by server-side apply under its own field manager; the
/// operator's own status writes (server-side apply of the rest of the status) neither take those
/// fields over nor remove them, so the gateway can also remove what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_status_writes_leave_the_gateways_usage_alone() {
    let env = Env::new("gw-usage", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"gateway": {"apps": [{"name": "grafana", "protocols": ["SMTP"]}]}}),
    )
    .await;
    env.wait_for("inbox", "Ready", WAIT, &op, support::world::is_ready)
        .await;

    apply_gateway_usage(
        &env,
        "inbox",
        serde_json::json!([{"name": "grafana", "lastUsedTime": "2026-12-06T21:00:00Z"}]),
    )
    .await;
    // The operator writes its status again (a refresh changes lastRefreshTime and more).
    refreshed(&env, &op, "inbox", "2026-12-06T21:00:01Z").await;
    let mi = env.get("inbox").await;
    assert_eq!(usage_apps(&mi), ["grafana"], "{:?}", mi.status);
    let operator_fields = status_fields_of(&mi, "mail-integration-operator");
    assert!(
        operator_fields.contains("f:lastRefreshRequest"),
        "the operator wrote its status by server-side apply: {operator_fields}"
    );
    assert!(
        !operator_fields.contains("f:gateway"),
        "the operator owns no field of status.gateway: {operator_fields}"
    );

    // The gateway removes its entry: with no other owner, it is gone, and stays gone through the
    // operator's next write.
    apply_gateway_usage(&env, "inbox", serde_json::json!([])).await;
    refreshed(&env, &op, "inbox", "2026-12-06T21:00:02Z").await;
    let mi = env.get("inbox").await;
    assert!(usage_apps(&mi).is_empty(), "{:?}", mi.status);
}

/// An integration `name` of alice's mailbox, Ready, with `gateway` as its spec.gateway.
pub(crate) async fn integration_with_gateway(
    env: &Env,
    op: &Operator,
    name: &str,
    gateway: serde_json::Value,
) {
    env.client_secret(env.server.client_secret()).await;
    env.grant(name, "alice").await;
    env.integration_with(
        name,
        "alice@example.test",
        serde_json::json!({ "gateway": gateway }),
    )
    .await;
    env.wait_for(name, "Ready", WAIT, op, support::world::is_ready)
        .await;
}

/// A namespace of its own, the operator, and the integration `inbox` of alice's mailbox with
/// `gateway` as spec.gateway, Ready.
pub(crate) async fn started(prefix: &str, gateway: serde_json::Value) -> (Env, Operator) {
    let env = Env::new(prefix, server()).await;
    let op = env.operator("operator");
    integration_with_gateway(&env, &op, "inbox", gateway).await;
    (env, op)
}

/// The apps `grafana` (SMTP) and `helpdesk` (IMAP).
fn grafana_and_helpdesk() -> serde_json::Value {
    serde_json::json!({"apps": [
        {"name": "grafana", "protocols": ["SMTP"]},
        {"name": "helpdesk", "protocols": ["IMAP"]},
    ]})
}

/// Apply a merge patch to the integration `name`.
pub(crate) async fn merge(env: &Env, name: &str, patch: serde_json::Value) {
    env.integrations()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// `app` of `mi` in the gateway Secret's gateway.json now.
pub(crate) async fn app_config(env: &Env, mi: &str, app: &str) -> Option<GatewayAppConfig> {
    gateway_config(env, mi)
        .await?
        .app(&username(&env.ns, mi, app))
        .cloned()
}

/// Wait until Secret `secret` satisfies `pred` (`None`: it does not exist); the Secret then.
async fn wait_secret(
    env: &Env,
    op: &Operator,
    secret: &str,
    what: &str,
    pred: impl Fn(Option<&Secret>) -> bool,
) -> Option<Secret> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = env.secrets().get_opt(secret).await.unwrap();
        if pred(s.as_ref()) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "Secret {secret}: {what} not reached within {WAIT:?}\n--- operator log ---\n{}",
            tail(&op.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn key(s: &Secret, k: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(k)
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
}

/// The app Secret of `app` once it holds a password; that password.
pub(crate) async fn app_password(env: &Env, op: &Operator, mi: &str, app: &str) -> String {
    let s = wait_secret(env, op, &format!("{mi}-gateway-{app}"), "a password", |s| {
        s.and_then(|s| key(s, "password")).is_some()
    })
    .await
    .unwrap();
    key(&s, "password").unwrap()
}

/// The gateway Secret's gateway.json.
pub(crate) async fn gateway_config(env: &Env, mi: &str) -> Option<GatewayConfig> {
    let s = env
        .secrets()
        .get_opt(&format!("{mi}-gateway"))
        .await
        .unwrap()?;
    let raw = key(&s, "gateway.json")?;
    Some(serde_json::from_str(&raw).unwrap())
}

/// Whether `password` opens `app` of `mi` by the gateway Secret's verifiers at `now`.
async fn verifies(env: &Env, mi: &str, app: &str, password: &str, now: Timestamp) -> bool {
    let Some(config) = gateway_config(env, mi).await else {
        return false;
    };
    config
        .app(&username(&env.ns, mi, app))
        .is_some_and(|a| a.verify(&SecretValue::new(password), now))
}

fn resource_version(s: &Secret) -> String {
    s.metadata.resource_version.clone().unwrap()
}

/// The app Secret: a 43-character password, username ns/mi/app, the gateway's address and the
/// URLs of its protocols, the operator's labels and ownerReference; the gateway Secret: a verifier
/// that matches that password and no password, and the access token of the token Secret, after
/// the sign-in and after every refresh. Nothing is written again when nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_gets_a_password_the_gateway_secret_can_verify_but_does_not_hold() {
    let (env, op) = started(
        "gw-creds",
        serde_json::json!({"apps": [
            {"name": "grafana", "protocols": ["SMTP"], "sendAs": ["alerts@example.test"]},
            {"name": "helpdesk", "protocols": ["IMAP", "POP3"]},
        ]}),
    )
    .await;
    let grafana = app_password(&env, &op, "inbox", "grafana").await;
    let helpdesk = app_password(&env, &op, "inbox", "helpdesk").await;
    for p in [&grafana, &helpdesk] {
        assert_eq!(p.len(), 43, "256 bits, base64url without padding");
        assert!(
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }
    assert_ne!(grafana, helpdesk);
    let app = env.secrets().get("inbox-gateway-grafana").await.unwrap();
    let user = format!("{}/inbox/grafana", env.ns);
    assert_eq!(key(&app, "username").as_deref(), Some(user.as_str()));
    assert_eq!(
        key(&app, "host").as_deref(),
        Some("mail-integration-operator-gateway.default.svc")
    );
    assert_eq!(key(&app, "smtp-port").as_deref(), Some("587"));
    assert_eq!(key(&app, "smtps-port").as_deref(), Some("465"));
    assert_eq!(key(&app, "imaps-port").as_deref(), Some("993"));
    let url = key(&app, "smtp-url").unwrap();
    assert_eq!(
        url,
        format!(
            "smtp://{}%2Finbox%2Fgrafana:{}@mail-integration-operator-gateway.default.svc:587",
            env.ns.replace('-', "%2D"),
            grafana.replace('-', "%2D").replace('_', "%5F")
        )
    );
    assert!(key(&app, "imaps-url").is_none(), "SMTP only");
    let labels = app.metadata.labels.clone().unwrap();
    assert_eq!(labels["mailintegration.dev/gateway-app"], "grafana");
    assert_eq!(labels["mailintegration.dev/integration"], "inbox");
    assert_eq!(
        labels["mailintegration.dev/managed-by"],
        "mail-integration-operator"
    );
    let mi = env.get("inbox").await;
    let owner = &app.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(Some(&owner.uid), mi.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));

    // The gateway Secret: verifiers that match, never the password itself.
    let now = Timestamp::now();
    assert!(verifies(&env, "inbox", "grafana", &grafana, now).await);
    assert!(verifies(&env, "inbox", "helpdesk", &helpdesk, now).await);
    assert!(!verifies(&env, "inbox", "grafana", &helpdesk, now).await);
    let gw = env.secrets().get("inbox-gateway").await.unwrap();
    assert_eq!(
        gw.metadata.labels.as_ref().unwrap()["mailintegration.dev/gateway"],
        "true"
    );
    let everything = serde_json::to_string(&gw).unwrap();
    for p in [&grafana, &helpdesk] {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(p);
        assert!(
            !everything.contains(p.as_str()) && !everything.contains(b64.trim_end_matches('=')),
            "a password in the gateway Secret"
        );
    }
    let config = gateway_config(&env, "inbox").await.unwrap();
    assert_eq!(config.mailbox, "alice@example.test");
    assert_eq!(config.uid, mi.metadata.uid.clone().unwrap());
    assert_eq!(config.max_message_bytes, 26_214_400);
    assert_eq!(config.apps.len(), 2);
    let mi = env
        .wait_condition(
            "inbox",
            ("GatewayCredentials", "True", "GatewayCredentialsIssued"),
            WAIT,
            &op,
        )
        .await;
    assert_eq!(condition(&mi, "Ready"), Some(("True", "Ready")));

    // The access token: the token Secret's, from the start and after a refresh.
    let token_of = |s: &Secret| (key(s, "access_token"), key(s, "expiry"));
    let published = token_of(&env.token_secret("inbox").await.unwrap());
    assert!(published.0.is_some());
    wait_secret(&env, &op, "inbox-gateway", "the published token", |s| {
        s.map(token_of) == Some(published.clone())
    })
    .await;
    refreshed(&env, &op, "inbox", "2026-12-06T22:00:00Z").await;
    let refreshed_token = token_of(&env.token_secret("inbox").await.unwrap());
    assert_ne!(refreshed_token, published, "the refresh issued a new token");
    let gw = wait_secret(&env, &op, "inbox-gateway", "the refreshed token", |s| {
        s.map(token_of) == Some(refreshed_token.clone())
    })
    .await
    .unwrap();

    // Nothing changed: nothing is written (an unrelated edit of the integration reconciles it).
    let app = env.secrets().get("inbox-gateway-grafana").await.unwrap();
    let patch = serde_json::json!({"metadata": {"annotations": {"example.test/unrelated": "1"}}});
    merge(&env, "inbox", patch).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let app_after = env.secrets().get("inbox-gateway-grafana").await.unwrap();
    let gw_after = env.secrets().get("inbox-gateway").await.unwrap();
    assert_eq!(resource_version(&app_after), resource_version(&app));
    assert_eq!(resource_version(&gw_after), resource_version(&gw));
    assert_eq!(key(&app_after, "password"), Some(grafana.clone()));

    assert_no_secrets_in_logs_or_events(&env, &op, &[&grafana, &helpdesk]).await;
}

/// A rotation (the annotation, for one app) issues a new password; both verify until retiresAt,
/// then only the new one. The other app keeps its password. No password in a log, event or status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_issues_a_new_password_and_the_old_one_retires_after_the_grace_period() {
    let (env, op) = started(
        "gw-rotate",
        serde_json::json!({
            "apps": [
                {"name": "grafana", "protocols": ["SMTP"]},
                {"name": "helpdesk", "protocols": ["IMAP"]},
            ],
            "rotationGracePeriod": "15s",
        }),
    )
    .await;
    let old = app_password(&env, &op, "inbox", "grafana").await;
    let other = app_password(&env, &op, "inbox", "helpdesk").await;
    let value = format!("{}/grafana", Timestamp::now());
    let patch = serde_json::json!({"metadata": {"annotations": {
        "mailintegration.dev/rotate-gateway-credentials": value,
    }}});
    merge(&env, "inbox", patch).await;
    let s = wait_secret(&env, &op, "inbox-gateway-grafana", "a new password", |s| {
        s.and_then(|s| key(s, "password")).is_some_and(|p| p != old)
    })
    .await
    .unwrap();
    let new = key(&s, "password").unwrap();
    assert_eq!(new.len(), 43);
    env.wait_for("inbox", "the rotation recorded", WAIT, &op, |mi| {
        mi.status
            .as_ref()
            .and_then(|s| s.gateway.as_ref())
            .and_then(|g| g.rotation_handled.as_deref())
            == Some(value.as_str())
    })
    .await;
    let grafana = app_config(&env, "inbox", "grafana").await.unwrap();
    assert_eq!(grafana.verifiers.len(), 2, "{grafana:?}");
    let retires_at = grafana.verifiers[1]
        .retires_at
        .expect("the old one retires");
    let before = retires_at - jiff::SignedDuration::from_secs(1);
    assert!(
        retires_at > Timestamp::now()
            && retires_at <= Timestamp::now() + jiff::SignedDuration::from_secs(16),
        "retiresAt = now + 15s: {retires_at}"
    );
    assert!(verifies(&env, "inbox", "grafana", &old, before).await);
    assert!(verifies(&env, "inbox", "grafana", &new, before).await);
    assert!(!verifies(&env, "inbox", "grafana", &old, retires_at).await);
    assert_eq!(app_password(&env, &op, "inbox", "helpdesk").await, other);

    // After retiresAt the operator drops the old verifier by itself.
    let deadline = Instant::now() + Duration::from_secs(40);
    while app_config(&env, "inbox", "grafana")
        .await
        .unwrap()
        .verifiers
        .len()
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "the retired verifier stayed\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = Timestamp::now();
    assert!(!verifies(&env, "inbox", "grafana", &old, now).await);
    assert!(verifies(&env, "inbox", "grafana", &new, now).await);
    assert_eq!(app_password(&env, &op, "inbox", "grafana").await, new);

    assert_no_secrets_in_logs_or_events(&env, &op, &[&old, &new, &other]).await;
}

/// Removing an app removes its verifier and its Secret; removing spec.gateway removes the gateway
/// Secret, the other app Secrets and the condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_app_or_the_gateway_removes_its_credentials() {
    let (env, op) = started("gw-remove", grafana_and_helpdesk()).await;
    let grafana = app_password(&env, &op, "inbox", "grafana").await;
    let helpdesk = app_password(&env, &op, "inbox", "helpdesk").await;
    let patch = serde_json::json!({"spec": {"gateway": {"apps": [
        {"name": "helpdesk", "protocols": ["IMAP"]},
    ]}}});
    merge(&env, "inbox", patch).await;
    wait_secret(&env, &op, "inbox-gateway-grafana", "deleted", |s| {
        s.is_none()
    })
    .await;
    let now = Timestamp::now();
    assert!(!verifies(&env, "inbox", "grafana", &grafana, now).await);
    assert!(app_config(&env, "inbox", "grafana").await.is_none());
    assert!(verifies(&env, "inbox", "helpdesk", &helpdesk, now).await);
    assert_eq!(app_password(&env, &op, "inbox", "helpdesk").await, helpdesk);

    let patch = serde_json::json!({"spec": {"gateway": null}});
    merge(&env, "inbox", patch).await;
    wait_secret(&env, &op, "inbox-gateway", "deleted", |s| s.is_none()).await;
    wait_secret(&env, &op, "inbox-gateway-helpdesk", "deleted", |s| {
        s.is_none()
    })
    .await;
    env.wait_for(
        "inbox",
        "no GatewayCredentials condition",
        WAIT,
        &op,
        |mi| condition(mi, "GatewayCredentials").is_none(),
    )
    .await;
    assert!(
        env.token_secret("inbox").await.is_some(),
        "the token Secret stays"
    );
    support::world::assert_no_forbidden_calls(&op);
}

/// A restart of the operator changes no password: the app Secrets are not written again, and
/// their passwords still verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_keeps_every_password() {
    let (env, mut op) = started(
        "gw-restart",
        serde_json::json!({"apps": [{"name": "grafana", "protocols": ["SMTP", "IMAP"]}]}),
    )
    .await;
    let password = app_password(&env, &op, "inbox", "grafana").await;
    let before = env.secrets().get("inbox-gateway-grafana").await.unwrap();
    op.process.stop();
    let op = env.operator("operator-2");
    // The new process reconciles the integration (a refresh, to be sure it has).
    refreshed(&env, &op, "inbox", "2026-12-06T22:30:00Z").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = env.secrets().get("inbox-gateway-grafana").await.unwrap();
    assert_eq!(key(&after, "password"), Some(password.clone()));
    assert_eq!(resource_version(&after), resource_version(&before));
    assert!(verifies(&env, "inbox", "grafana", &password, Timestamp::now()).await);
    assert!(
        op.log().contains("issuing gateway credentials"),
        "the second process runs the credentials part"
    );
}

/// A Secret of someone else's under an app Secret's name is never written: the condition names
/// it, and the other apps get their credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_the_operator_does_not_own_is_reported_not_overwritten() {
    let env = Env::new("gw-squat", server()).await;
    let op = env.operator("operator");
    env.put_secret_labelled(
        "inbox-gateway-grafana",
        &[("password", "the-owners-own-value")],
        serde_json::json!({}),
    )
    .await;
    integration_with_gateway(&env, &op, "inbox", grafana_and_helpdesk()).await;
    let mi = env
        .wait_condition(
            "inbox",
            ("GatewayCredentials", "False", "GatewaySecretConflict"),
            WAIT,
            &op,
        )
        .await;
    let message = support::world::condition_message(&mi, "GatewayCredentials");
    assert!(message.contains("\"inbox-gateway-grafana\""), "{message}");
    let helpdesk = app_password(&env, &op, "inbox", "helpdesk").await;
    assert!(verifies(&env, "inbox", "helpdesk", &helpdesk, Timestamp::now()).await);
    let squatter = env.secrets().get("inbox-gateway-grafana").await.unwrap();
    assert_eq!(
        key(&squatter, "password").as_deref(),
        Some("the-owners-own-value")
    );
    assert!(squatter.metadata.owner_references.is_none());
    assert!(app_config(&env, "inbox", "grafana").await.is_none());
}
