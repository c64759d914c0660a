//! What the operator asks of the API server, counted at an [`ApiProxy`] in front of it: the watch
//! caches serve the reconciles, so neither an idle reconcile nor a refresh reads anything (the
//! grant a refresh presents is the cached one, checked against this process's own last writes under
//! the per-grant lock), and no Secret is ever listed or watched without a label selector. Structural, not timing-based: the counts are exact whatever the machine's speed.

mod support;

use kube::api::{Patch, PatchParams};
use std::time::Duration;
use support::{
    api_proxy::ApiProxy,
    oauth::OAuthServer,
    operator::Operator,
    world::{Env, is_ready},
};

/// Access tokens that live 8 s: refreshes come every ~5 s.
fn short_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(8)
}

/// Access tokens that live 10 minutes: nothing is due during a test.
fn long_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

/// GETs of single objects (not lists, not watches) whose path contains `part`.
fn gets(api: &ApiProxy, part: &str) -> Vec<String> {
    api.requests_log_with_query()
        .into_iter()
        .filter(|(m, p)| m == "GET" && p.contains(part) && !p.contains("watch=true"))
        .map(|(_, p)| p)
        .collect()
}

/// Lists and watches of Secrets without a label selector (a cluster's every Secret).
fn unselected_secret_lists(api: &ApiProxy) -> Vec<String> {
    api.requests_log_with_query()
        .into_iter()
        .filter(|(m, p)| {
            let (path, query) = p.split_once('?').unwrap_or((p, ""));
            m == "GET" && path.ends_with("/secrets") && !query.contains("labelSelector=")
        })
        .map(|(_, p)| p)
        .collect()
}

fn reads(op: &Operator, object: &str) -> f64 {
    op.metric(&format!(
        "mailintegration_api_reads_total{{object=\"{object}\"}}"
    ))
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_reconcile_reads_nothing_and_a_restart_with_valid_tokens_neither_reads_nor_writes()
{
    let env = Env::new("reads-idle", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("proxy-kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut op = env.operator_with_kubeconfig("operator-1", &kubeconfig, &[]);
    env.ready_integration(&op, "inbox").await;
    // Settle: the reconciles that the operator's own writes brought have run.
    let settled = |op: &Operator| op.metric("mailintegration_reconciles_total{result=\"ok\"}");
    let mut last = settled(&op);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = settled(&op);
        if now == last {
            break;
        }
        last = now;
    }

    // Idle reconciles (a metadata change of the resource, and one of its client Secret, each
    // trigger one): nothing is read, nothing written.
    api.reset_counts();
    let reconciles = settled(&op).unwrap_or(0.0);
    let w0 = op.api_writes();
    let patch = serde_json::json!({"metadata": {"labels": {"touched": "yes"}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    env.secrets()
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while settled(&op).unwrap_or(0.0) < reconciles + 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the changes did not bring reconciles:\n{}",
            op.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = &env.ns;
    let read = gets(&api, &format!("/namespaces/{ns}/"));
    assert!(
        read.is_empty(),
        "idle reconciles read from the API server:\n{}",
        read.join("\n")
    );
    assert_eq!(op.api_writes(), w0, "idle reconciles wrote");

    // A restart with a valid token: the caches are filled by one list each; no single-object
    // read, no token request, no write.
    op.process.stop();
    api.reset_counts();
    env.proxy.reset_counts();
    let op2 = env.operator_with_kubeconfig("operator-2", &kubeconfig, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while settled(&op2).unwrap_or(0.0) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new operator did not reconcile:\n{}",
            op2.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.proxy.token_requests(), 0, "token requests at start-up");
    assert_eq!(op2.api_writes(), 0.0, "writes at start-up");
    let writes: Vec<_> = api
        .requests_log_with_query()
        .into_iter()
        .filter(|(m, p)| m != "GET" && p.contains(&format!("/namespaces/{ns}/")))
        .collect();
    assert!(
        writes.is_empty(),
        "writes at start-up, at the API server: {writes:?}"
    );
    let read = gets(&api, &format!("/namespaces/{ns}/"))
        .into_iter()
        .filter(|p| !p.contains('?'))
        .collect::<Vec<_>>();
    assert!(
        read.is_empty(),
        "single-object reads at start-up:\n{}",
        read.join("\n")
    );
    assert!(is_ready(&env.get("inbox").await));
    assert!(
        unselected_secret_lists(&api).is_empty(),
        "Secrets listed or watched without a label selector:\n{}",
        api.requests_log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_reads_nothing_and_no_secret_is_listed_unselected() {
    let env = Env::new("reads-refresh", short_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("proxy-kubeconfig");
    api.kubeconfig(&kubeconfig);
    let op = env.operator_with_kubeconfig("operator", &kubeconfig, &[]);
    env.ready_integration(&op, "inbox").await;
    let refreshed = |op: &Operator| {
        op.metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
            .unwrap_or(0.0)
    };
    assert!(
        unselected_secret_lists(&api).is_empty(),
        "Secrets listed or watched without a label selector:\n{}",
        api.requests_log_text()
    );
    // Over at least two refreshes (tokens of 8 s are refreshed every ~5 s).
    api.reset_counts();
    let (r0, g0) = (refreshed(&op), reads(&op, "grant_secret"));
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while refreshed(&op) < r0 + 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no refreshes:\n{}",
            op.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (r1, g1) = (refreshed(&op), reads(&op, "grant_secret"));
    let ns = &env.ns;
    let read = gets(&api, &format!("/namespaces/{ns}/"));
    assert!(
        read.is_empty(),
        "{} refreshes read from the API server:\n{}",
        r1 - r0,
        read.join("\n")
    );
    // The operator's own counter agrees with the API server's side.
    assert_eq!(g1 - g0, 0.0, "grant reads counted by the operator");
}
