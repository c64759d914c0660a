//! The operator's side of the gateway's credentials (issue 22, point 1; docs/gateway.md "Giving an
//! app a credential"): the app Secrets, the gateway Secret, rotation, and status.gateway.

use crate::support::{
    self,
    oauth::OAuthServer,
    world::{Env, annotate_refresh},
};
use kube::api::{Patch, PatchParams};
use mail_integration_operator::api::MailIntegration;
use std::time::Duration;

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
