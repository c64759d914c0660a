//! `spec.grantDeletionPolicy` / `--grant-deletion-policy` (chart `grantDeletionPolicy`) end to end:
//! a Retain grant outlives its MailIntegration and serves a re-created one of the same name without
//! a sign-in, is refused to one with another client, and a Delete grant goes with its integration.

use super::*;
use k8s_openapi::api::core::v1::Secret;

/// The UIDs of the grant Secret's owners, and its refresh token (None when it is gone).
async fn grant_state(env: &Env, name: &str) -> Option<(Vec<String>, String)> {
    let s: Secret = env
        .secrets()
        .get_opt(&format!("{name}-oauth-grant"))
        .await
        .unwrap()?;
    let owners = s
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.uid)
        .collect();
    let rt = s
        .data
        .unwrap_or_default()
        .get("refresh_token")
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    Some((owners, rt))
}

async fn wait_until<F, Fut>(env: &Env, what: &str, timeout: Duration, op: &Operator, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}\nkube-controller-manager:\n{}",
            tail(&op.log(), 30),
            env.cp.controller_manager_log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn token_secret_gone(env: &Env, name: &str) -> bool {
    env.secrets()
        .get_opt(&format!("{name}-token"))
        .await
        .unwrap()
        .is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_grant_serves_a_recreated_integration_and_no_other_client() {
    let env = Env::new("retain", long_lived_server()).await;
    // The chart's grantDeletionPolicy sets the operator's default; the operator acts as the
    // chart's ServiceAccount (its RBAC must allow the patch of the grant's ownerReferences).
    let (release, op) = env.operator_as_chart("operator", &["grantDeletionPolicy=Retain"], &[]);
    let args = release.operator_args();
    assert!(
        args.iter().any(|a| a == "--grant-deletion-policy=Retain"),
        "{args:?}"
    );
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    let first = env
        .wait_for(
            "inbox",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    let first_uid = first.metadata.uid.clone().unwrap();
    // Retain: the grant the operator stored (bound to this client at its first refresh) has no
    // owner; the token Secret has this integration as its owner.
    wait_until(
        &env,
        "the grant is bound and unowned",
        Duration::from_secs(15),
        &op,
        || async {
            let bound = env.data("inbox-oauth-grant", "client_id").await.is_some();
            bound
                && grant_state(&env, "inbox")
                    .await
                    .is_some_and(|(o, _)| o.is_empty())
        },
    )
    .await;
    let (_, rt) = grant_state(&env, "inbox").await.unwrap();
    let token_owners = env
        .secrets()
        .get("inbox-token")
        .await
        .unwrap()
        .metadata
        .owner_references
        .unwrap_or_default();
    assert!(token_owners.iter().any(|o| o.uid == first_uid));

    // Deleted: the garbage collector takes the token Secret, the grant stays as it was. (The
    // collector learns the CRD's kind by its periodic discovery, every 30 s: up to a minute here.)
    env.integrations()
        .delete("inbox", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&env, "inbox", Duration::from_secs(15), &op).await;
    wait_until(
        &env,
        "the token Secret is collected",
        Duration::from_secs(90),
        &op,
        || token_secret_gone(&env, "inbox"),
    )
    .await;
    assert_eq!(
        grant_state(&env, "inbox").await,
        Some((vec![], rt.clone())),
        "the grant outlives its integration"
    );

    // Re-created with another client: the kept grant is refused (never sent to it), not adopted,
    // and still there after this one is deleted too.
    env.put_secret(
        "other",
        &[("client_id", "another-client"), ("client_secret", "x")],
    )
    .await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {"name": "other"}}}),
    )
    .await;
    env.wait_condition(
        "inbox",
        ("Ready", "False", "GrantBoundElsewhere"),
        Duration::from_secs(30),
        &op,
    )
    .await;
    assert_eq!(grant_state(&env, "inbox").await, Some((vec![], rt.clone())));
    env.integrations()
        .delete("inbox", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&env, "inbox", Duration::from_secs(15), &op).await;
    assert_eq!(grant_state(&env, "inbox").await, Some((vec![], rt.clone())));

    // Re-created with the same client, now with spec.grantDeletionPolicy Delete: Ready from the kept
    // grant without a sign-in, which it adopts; deleted, the grant goes with it.
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"grantDeletionPolicy": "Delete"}),
    )
    .await;
    let again = env
        .wait_for(
            "inbox",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    let uid = again.metadata.uid.clone().unwrap();
    assert_ne!(uid, first_uid);
    assert!(
        again
            .status
            .as_ref()
            .and_then(|s| s.sign_in.as_ref())
            .is_none(),
        "no sign-in was asked for"
    );
    assert!(env.data("inbox-token", "access_token").await.is_some());
    wait_until(
        &env,
        "the kept grant is adopted",
        Duration::from_secs(15),
        &op,
        || async {
            grant_state(&env, "inbox")
                .await
                .is_some_and(|(o, _)| o == vec![uid.clone()])
        },
    )
    .await;
    env.integrations()
        .delete("inbox", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&env, "inbox", Duration::from_secs(15), &op).await;
    wait_until(
        &env,
        "the grant is collected",
        Duration::from_secs(30),
        &op,
        || async { grant_state(&env, "inbox").await.is_none() },
    )
    .await;
}
