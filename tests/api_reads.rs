//! What the operator asks of the API server, counted at an [`ApiProxy`] in front of it: the watch
//! caches serve the reconciles, so neither an idle reconcile nor a refresh reads anything (the
//! grant a refresh presents is the cached one, checked against this process's own last writes under
//! the per-grant lock), and no Secret is ever listed or watched without a label selector; the
//! watches stream their initial objects where the API server allows it, and list them in pages
//! where not. Structural, not timing-based: the counts are exact whatever the machine's speed.

#[path = "api_reads/first_refresh.rs"]
mod first_refresh;
#[path = "api_reads/flow_control.rs"]
mod flow_control;
#[path = "api_reads/other_writers.rs"]
mod other_writers;
mod support;

use kube::api::{Patch, PatchParams};
use std::{sync::OnceLock, time::Duration};
use support::{
    api_proxy::ApiProxy,
    control_plane::ControlPlane,
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
    // trigger one): nothing is written, and nothing read but the client Secret's new version (its
    // watch is metadata-only: the data of a marked Secret is read once per resourceVersion).
    api.reset_counts();
    let w0 = op.api_writes();
    let patch = serde_json::json!({"metadata": {"labels": {"touched": "yes"}}});
    // One change at a time: the controller runs one reconcile for changes of one integration that
    // arrive while it is busy, so two changes sent together may bring one reconcile.
    let one_reconcile_more = |what: &'static str, before: f64| {
        let op = &op;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while settled(op).unwrap_or(0.0) < before + 1.0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what} did not bring a reconcile:\n{}",
                    op.process.log_tail(30)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let before = settled(&op).unwrap_or(0.0);
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    one_reconcile_more("the integration's label", before).await;
    let before = settled(&op).unwrap_or(0.0);
    env.secrets()
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    one_reconcile_more("the client Secret's label", before).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = &env.ns;
    let read = gets(&api, &format!("/namespaces/{ns}/"));
    let client = format!("/api/v1/namespaces/{ns}/secrets/client");
    assert_eq!(
        read,
        std::slice::from_ref(&client),
        "idle reconciles read from the API server more than the client Secret's new version"
    );
    assert_eq!(op.api_writes(), w0, "idle reconciles wrote");

    // A restart with a valid token: the caches are filled by one list each; no single-object
    // read but the client Secret's data (once), no token request, no write.
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
    assert_eq!(
        read,
        [client],
        "single-object reads at start-up beyond the client Secret's data"
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

/// A control plane whose API server refuses streaming lists (the WatchList feature off, as
/// Kubernetes 1.33 ships it).
fn control_plane_without_streaming_lists() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let cp = ControlPlane::start_dedicated_with(&["--feature-gates=WatchList=false"]);
        cp.install_crd();
        cp
    })
}

/// The collection requests (lists and watches) of integrations and Secrets, split into those that
/// ask for the initial objects as watch events (`sendInitialEvents=true`) and paged lists.
fn initial_lists(api: &ApiProxy) -> (Vec<String>, Vec<String>) {
    let collections: Vec<String> = api
        .requests_log_with_query()
        .into_iter()
        .filter(|(m, p)| {
            let path = p.split_once('?').map_or(p.as_str(), |(path, _)| path);
            m == "GET" && (path.ends_with("/secrets") || path.ends_with("/mailintegrations"))
        })
        .map(|(_, p)| p)
        .collect();
    let (streamed, other): (Vec<_>, Vec<_>) = collections
        .into_iter()
        .partition(|p| p.contains("sendInitialEvents=true"));
    let paged = other
        .into_iter()
        .filter(|p| !p.contains("watch="))
        .collect();
    (streamed, paged)
}

async fn ready_through_a_proxy(env: &Env, api: &ApiProxy) -> Operator {
    let kubeconfig = env.log_dir.path().join("proxy-kubeconfig");
    api.kubeconfig(&kubeconfig);
    let op = env.operator_with_kubeconfig("operator", &kubeconfig, &[]);
    env.ready_integration(&op, "inbox").await;
    op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watches_stream_their_initial_objects_where_the_api_server_allows_it_and_list_pages_where_not()
 {
    // This binary's shared API server (Kubernetes 1.35: WatchList on by default) streams: the
    // integrations' watch and the two Secret watches, after one probe; not one paged list.
    let env = Env::new("lists-streamed", long_lived_server()).await;
    let api = ApiProxy::start();
    let op = ready_through_a_proxy(&env, &api).await;
    let (streamed, paged) = initial_lists(&api);
    assert!(
        streamed.len() >= 4 && paged.is_empty(),
        "expected the probe and three streamed watches, no paged list; streamed:\n{}\npaged:\n{}\n{}",
        streamed.join("\n"),
        paged.join("\n"),
        op.process.log_tail(20)
    );
    assert!(
        op.process.log_tail(usize::MAX).contains("Streaming"),
        "{}",
        op.process.log_tail(20)
    );

    // One that refuses them: the probe is refused, and the caches are filled by paged lists.
    let cp = control_plane_without_streaming_lists();
    let env = Env::new_on(cp, "lists-paged", long_lived_server()).await;
    let api = ApiProxy::start_for(cp);
    let op = ready_through_a_proxy(&env, &api).await;
    let (streamed, paged) = initial_lists(&api);
    assert!(
        streamed.len() == 1 && paged.len() >= 3,
        "expected only the refused probe streamed and three paged lists; streamed:\n{}\npaged:\n{}\n{}",
        streamed.join("\n"),
        paged.join("\n"),
        op.process.log_tail(20)
    );
    assert!(
        paged
            .iter()
            .filter(|p| p.contains("/secrets"))
            .all(|p| p.contains("labelSelector=")),
        "{paged:?}"
    );
    assert!(
        op.process.log_tail(usize::MAX).contains("Paged"),
        "{}",
        op.process.log_tail(20)
    );
}
