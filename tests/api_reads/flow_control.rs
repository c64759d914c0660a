//! The operator under the API server's own flow control (API Priority and Fairness) set tight: a
//! PriorityLevelConfiguration of 3 seats that rejects what does not fit, for the operator's API
//! user only, while its integrations (rotating refresh tokens, 8 s access tokens) are asked to
//! refresh every 2 s. Counted at the API server's audit log: the 429s it sent, and when each
//! refused request came again.

use crate::{
    short_lived_server,
    support::{
        api_audit::{self, ApiRequest},
        control_plane::ApiUser,
        operator::Operator,
        world::{Env, annotate_refresh, condition, is_ready},
    },
};
use std::time::{Duration, Instant};

const N: usize = 12;
/// A path only the test's probe asks for (the operator never reads ConfigMaps).
const PROBE: &str = "mio-apf-probe";

/// A priority level of the fewest seats (1 share of ~246: 3 of the API server's 600) that
/// rejects at once, and a FlowSchema putting every request of the ServiceAccount `ns/sa` into it,
/// before the built-in service-accounts schema (9000). (The test's operator users are in
/// `system:masters`, whose requests only the built-in `exempt` schema may match first.)
fn tight(name: &str, ns: &str, sa: &str) -> String {
    format!(
        r#"apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: PriorityLevelConfiguration
metadata: {{name: {name}}}
spec:
  type: Limited
  limited:
    nominalConcurrencyShares: 1
    lendablePercent: 0
    borrowingLimitPercent: 0
    limitResponse: {{type: Reject}}
---
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata: {{name: {name}}}
spec:
  priorityLevelConfiguration: {{name: {name}}}
  matchingPrecedence: 500
  distinguisherMethod: {{type: ByUser}}
  rules:
    - subjects: [{{kind: ServiceAccount, serviceAccount: {{name: {sa}, namespace: {ns}}}}}]
      resourceRules: [{{verbs: ["*"], apiGroups: ["*"], resources: ["*"], clusterScope: true, namespaces: ["*"]}}]
      nonResourceRules: [{{verbs: ["*"], nonResourceURLs: ["*"]}}]
"#
    )
}

/// A ServiceAccount of the test's namespace with cluster-admin rights (not in `system:masters`),
/// as an API user whose requests the audit log records.
fn service_account_user(env: &Env, sa: &str) -> ApiUser {
    let ns = &env.ns;
    env.cp.kubectl(&["create", "serviceaccount", sa, "-n", ns]);
    env.cp.kubectl(&[
        "create",
        "clusterrolebinding",
        &format!("{ns}-{sa}"),
        "--clusterrole=cluster-admin",
        &format!("--serviceaccount={ns}:{sa}"),
    ]);
    let token = env
        .cp
        .kubectl(&["create", "token", sa, "-n", ns, "--duration=2h"])
        .trim()
        .to_owned();
    let kubeconfig = env.log_dir.path().join(format!("kubeconfig-{sa}"));
    env.cp.kubeconfig_with_token(&kubeconfig, &token);
    ApiUser {
        name: format!("system:serviceaccount:{ns}:{sa}"),
        token,
        kubeconfig,
        audit_log: env.cp.audit_log_path(),
    }
}

/// The UID of the FlowSchema the API server puts the user's requests in now.
async fn flow_schema_of(probe: &kube::Client, ns: &str) -> String {
    let req = http::Request::get(format!("/api/v1/namespaces/{ns}/configmaps/{PROBE}"))
        .body(kube::client::Body::empty())
        .unwrap();
    let resp = probe.send(req).await.unwrap();
    resp.headers()
        .get("X-Kubernetes-PF-FlowSchema-UID")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn wait_flow_schema(probe: &kube::Client, ns: &str, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let uid = flow_schema_of(probe, ns).await;
        if want(&uid) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the API server's flow control did not follow the change within 30 s (FlowSchema {uid:?})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn refreshed(op: &Operator) -> f64 {
    op.metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
        .unwrap_or(0.0)
}

/// Every refresh that ended in a permanent failure, whatever its reason.
fn permanent_failures(op: &Operator) -> f64 {
    op.get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(r#"mailintegration_refreshes_total{result="permanent_failure""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// For `window`: a refresh of every integration requested every 2 s; returns the lowest and the
/// highest limit the operator reported meanwhile.
async fn refresh_waves(env: &Env, op: &Operator, window: Duration) -> (f64, f64) {
    let (mut low, mut high) = (f64::INFINITY, 0.0f64);
    let end = Instant::now() + window;
    let mut next_wave = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_wave {
            let at = jiff::Timestamp::now().to_string();
            for i in 0..N {
                annotate_refresh(env, &format!("inbox-{i}"), &at).await;
            }
            next_wave += Duration::from_secs(2);
        }
        if let Some(l) = op.metric("mailintegration_kube_api_limit") {
            low = low.min(l);
            high = high.max(l);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (low, high)
}

fn at(r: &ApiRequest) -> jiff::Timestamp {
    r.received
        .parse()
        .unwrap_or_else(|e| panic!("audit timestamp {:?}: {e}", r.received))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_flow_control_set_tight_429s_are_honoured_no_grant_is_lost_or_reused_and_throughput_recovers()
 {
    let env = Env::new("apf-tight", short_lived_server()).await;
    let sa = "operator";
    let user = service_account_user(&env, sa);
    let mut op =
        env.operator_with_kubeconfig("operator", &user.kubeconfig, &["--min-refresh-interval=1s"]);
    op.api_user = Some(user.clone());
    env.client_secret(env.server.client_secret()).await;
    for i in 0..N {
        let name = format!("inbox-{i}");
        env.grant(&name, "alice").await;
        env.integration(&name, "alice@example.test").await;
    }
    for i in 0..N {
        env.wait_for(
            &format!("inbox-{i}"),
            "Ready=True",
            Duration::from_secs(60),
            &op,
            is_ready,
        )
        .await;
    }
    // The adaptive limit (100/s at start; slow answers of a busy machine may have halved it).
    let start_limit = op.metric("mailintegration_kube_api_limit").unwrap_or(0.0);
    assert!(
        start_limit >= 5.0,
        "no adaptive limit reported: {start_limit}"
    );
    let throttled_before = op
        .metric(r#"mailintegration_kube_api_limit_decreases_total{signal="throttled"}"#)
        .unwrap_or(0.0);

    // Pressure: the operator's user in 3 seats, rejected beyond them.
    let name = format!("{}-tight", env.ns);
    let out = env
        .cp
        .kubectl_stdin(&["apply", "-f", "-"], &tight(&name, &env.ns, sa));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fs_uid = env
        .cp
        .kubectl(&["get", "flowschema", &name, "-o", "jsonpath={.metadata.uid}"]);
    let mut probe_config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&user.kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    probe_config.default_retry = false;
    let probe = kube::Client::try_from(probe_config).unwrap();
    wait_flow_schema(&probe, &env.ns, |uid| uid == fs_uid).await;
    let r0 = refreshed(&op);
    let (low, _) = refresh_waves(&env, &op, Duration::from_secs(20)).await;
    let under_pressure = refreshed(&op) - r0;

    // The pressure goes.
    env.cp.kubectl(&["delete", "flowschema", &name]);
    env.cp
        .kubectl(&["delete", "prioritylevelconfiguration", &name]);
    wait_flow_schema(&probe, &env.ns, |uid| uid != fs_uid).await;
    let relieved = jiff::Timestamp::now();
    let r1 = refreshed(&op);
    let (_, high) = refresh_waves(&env, &op, Duration::from_secs(20)).await;
    let recovered = refreshed(&op) - r1;

    // Every integration Ready with its grant, none lost or presented twice (oidc-provider
    // revokes the whole grant when a rotated refresh token comes again: the integration would
    // be GrantRevoked).
    for i in 0..N {
        let name = format!("inbox-{i}");
        env.wait_for(&name, "Ready=True", Duration::from_secs(60), &op, is_ready)
            .await;
        let mi = env.get(&name).await;
        for t in ["Authorized", "Ready"] {
            assert_eq!(condition(&mi, t).map(|c| c.0), Some("True"), "{name} {t}");
        }
    }
    assert_eq!(
        permanent_failures(&op),
        0.0,
        "permanent refresh failures:\n{}",
        op.process.log_tail(40)
    );

    let throttled = op
        .metric("mailintegration_kube_api_throttled_total")
        .unwrap_or(0.0);
    let requests: Vec<ApiRequest> = api_audit::requests_of(&user)
        .into_iter()
        .filter(|r| !r.uri.contains(PROBE) && !r.user_agent.starts_with("kubectl"))
        .collect();
    let refused: Vec<&ApiRequest> = requests.iter().filter(|r| r.code == 429).collect();
    assert!(
        !refused.is_empty(),
        "the tight priority level refused nothing: no pressure was made ({under_pressure} refreshes under it)"
    );
    assert_eq!(
        throttled,
        refused.len() as f64,
        "every 429 the API server sent reached the operator's limit"
    );
    assert!(
        op.metric(r#"mailintegration_kube_api_limit_decreases_total{signal="throttled"}"#)
            .unwrap_or(0.0)
            > throttled_before
            && low < start_limit,
        "the limit was not lowered on 429s (from {start_limit}, lowest {low})"
    );

    // Honoured: a refused request comes again no sooner than its Retry-After (API Priority and
    // Fairness says at least 1 s). Its next request of the same verb and URI is its retry: one
    // reconcile per integration at a time, and creates (whose URI is the collection's) left out.
    let mut retries = 0;
    for r in refused.iter().filter(|r| r.verb != "create") {
        let Some(next) = requests
            .iter()
            .skip_while(|x| !std::ptr::eq(*x, *r))
            .skip(1)
            .find(|x| x.verb == r.verb && x.uri == r.uri)
        else {
            continue;
        };
        let gap = at(next).duration_since(at(r));
        assert!(
            gap >= jiff::SignedDuration::from_millis(995),
            "{r} came again {gap:?} after its 429:\n{next}"
        );
        retries += 1;
    }
    assert!(
        retries > 0,
        "no refused request came again: {}",
        api_audit::describe(&refused.into_iter().cloned().collect::<Vec<_>>())
    );

    // Recovered: no 429 once the API server followed the change, the limit grew again and every
    // integration refreshed.
    let late: Vec<ApiRequest> = requests
        .iter()
        .filter(|r| r.code == 429 && at(r) > relieved)
        .cloned()
        .collect();
    assert!(late.is_empty(), "{}", api_audit::describe(&late));
    assert!(
        high >= low + 20.0 && high >= 2.0 * low,
        "the limit did not recover: lowest {low} under pressure, highest {high} after"
    );
    assert!(
        recovered >= N as f64 && under_pressure >= N as f64,
        "refreshes: {under_pressure} under pressure, {recovered} after"
    );
    env.cp
        .kubectl(&["delete", "clusterrolebinding", &format!("{}-{sa}", env.ns)]);
    eprintln!(
        "429s: {}, retried and checked: {retries}, limit: {start_limit} before, lowest {low} under pressure, highest {high} after; refreshes {under_pressure} under pressure, {recovered} after\n{}",
        throttled,
        op.get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("mailintegration_kube_api"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
