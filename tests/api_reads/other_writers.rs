//! What other writers put on a grant Secret stays there across the operator's writes: the
//! write-ahead mark is a merge patch of its one annotation (resourceVersion as precondition), and
//! the store after a refresh writes on top of the Secret as the API server returned it, not the
//! watch cache's compact copy (which holds neither finalizers nor kubectl's last-applied
//! annotation).

use crate::{
    long_lived_server,
    support::world::{Env, annotate_refresh, is_ready},
};
use kube::api::{Patch, PatchParams};
use std::time::Duration;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
const FINALIZER: &str = "example.test/backup";

/// A grant Secret with another writer's finalizer and kubectl's last-applied annotation keeps
/// both across the refreshes of a rotating grant (first refresh, then a requested one). On main
/// before this change the mark's PUT of the cached copy removed both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_keeps_other_writers_finalizers_and_the_last_applied_annotation() {
    let env = Env::new("other-writers", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let first = env.grant("inbox", "alice").await;
    let applied = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"inbox-oauth-grant"}}"#;
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": [FINALIZER],
            "annotations": {LAST_APPLIED: applied},
        },
    });
    env.secrets()
        .patch(
            "inbox-oauth-grant",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    env.integration("inbox", "alice@example.test").await;
    env.wait_for(
        "inbox",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    let last = |mi: &mail_integration_operator::api::MailIntegration| {
        mi.status.as_ref().and_then(|s| s.last_refresh_time.clone())
    };
    let was = last(&env.get("inbox").await);
    annotate_refresh(&env, "inbox", "again").await;
    env.wait_for(
        "inbox",
        "refreshed again",
        Duration::from_secs(30),
        &op,
        |mi| last(mi) != was && is_ready(mi),
    )
    .await;

    let grant = env.secrets().get("inbox-oauth-grant").await.unwrap();
    let now = env.data("inbox-oauth-grant", "refresh_token").await;
    assert_ne!(
        now.as_deref(),
        Some(first.as_str()),
        "the grant did not rotate"
    );
    let finalizers = grant.metadata.finalizers.clone().unwrap_or_default();
    let kept = grant
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LAST_APPLIED))
        .cloned();
    // Let the namespace go at the end of the test whatever the outcome.
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    env.secrets()
        .patch(
            "inbox-oauth-grant",
            &PatchParams::default(),
            &Patch::Merge(&release),
        )
        .await
        .unwrap();
    assert_eq!(finalizers, [FINALIZER], "the other writer's finalizer");
    assert_eq!(
        kept.as_deref(),
        Some(applied),
        "kubectl's last-applied annotation"
    );
}
