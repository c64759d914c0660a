//! The chart's opt-in API Priority and Fairness objects (`apiPriority.enabled`): a
//! PriorityLevelConfiguration and a FlowSchema of the operator's own, and the Lease's FlowSchema
//! to Kubernetes' leader-election level; rendered as documented, and taken by the real API server,
//! which then classifies the ServiceAccount's requests by them (the `X-Kubernetes-PF-*` headers of
//! its answers).

use crate::{find, helm, kinds, support, yaml_docs};
use support::{
    ensure_crd,
    helm::{ChartRelease, client_for},
    unique_namespace,
};

const N: &str = "mio-mail-integration-operator";

fn has_kind(docs: &[serde_json::Value], kind: &str) -> bool {
    kinds(docs).iter().any(|(k, _, _)| k == kind)
}

#[test]
fn api_priority_objects_are_opt_in_and_match_only_the_operators_service_account() {
    let docs = yaml_docs(&helm::template("mio", "ops", &[]));
    assert!(
        !has_kind(&docs, "FlowSchema") && !has_kind(&docs, "PriorityLevelConfiguration"),
        "rendered without apiPriority.enabled: {:?}",
        kinds(&docs)
    );

    let docs = yaml_docs(&helm::template("mio", "ops", &["apiPriority.enabled=true"]));
    let pl = find(&docs, "PriorityLevelConfiguration", N);
    assert_eq!(pl["apiVersion"], "flowcontrol.apiserver.k8s.io/v1");
    let limited = &pl["spec"]["limited"];
    assert_eq!(pl["spec"]["type"], "Limited");
    assert_eq!(limited["nominalConcurrencyShares"], 10);
    assert_eq!(limited["lendablePercent"], 50);
    assert_eq!(limited["borrowingLimitPercent"], 100);
    assert_eq!(limited["limitResponse"]["type"], "Queue");
    assert_eq!(limited["limitResponse"]["queuing"]["queues"], 16);

    let fs = find(&docs, "FlowSchema", N);
    assert_eq!(fs["spec"]["priorityLevelConfiguration"]["name"], N);
    assert_eq!(fs["spec"]["matchingPrecedence"], 1000);
    let rules = fs["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "serviceAccount": {"name": N, "namespace": "ops"}}])
    );

    // Leader election is on by default: its Lease goes to the cluster's leader-election level,
    // matched first.
    let le = find(&docs, "FlowSchema", &format!("{N}-leader-election"));
    assert_eq!(
        le["spec"]["priorityLevelConfiguration"]["name"],
        "leader-election"
    );
    assert_eq!(le["spec"]["matchingPrecedence"], 999);
    assert_eq!(
        le["spec"]["rules"][0]["resourceRules"][0]["resources"],
        serde_json::json!(["leases"])
    );
    assert_eq!(
        le["spec"]["rules"][0]["resourceRules"][0]["namespaces"],
        serde_json::json!(["ops"])
    );

    // Without leader election, or with the Lease left in the operator's level: no second schema.
    for set in [
        &["apiPriority.enabled=true", "leaderElection.enabled=false"][..],
        &[
            "apiPriority.enabled=true",
            "apiPriority.leaderElectionPriorityLevel=",
        ][..],
    ] {
        let docs = yaml_docs(&helm::template("mio", "ops", set));
        let schemas: Vec<_> = kinds(&docs)
            .into_iter()
            .filter(|(k, _, _)| k == "FlowSchema")
            .collect();
        assert_eq!(schemas.len(), 1, "{set:?}: {schemas:?}");
    }
}

/// The UIDs of the FlowSchema and priority level the API server put this answer's request in.
fn classified(resp: &http::Response<kube::client::Body>) -> (String, String) {
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (
        h("X-Kubernetes-PF-FlowSchema-UID"),
        h("X-Kubernetes-PF-PriorityLevel-UID"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_takes_the_priority_objects_and_classifies_the_operator_by_them() {
    let cp = ensure_crd();
    let ns = unique_namespace("apf");
    let rel = ChartRelease::install(cp, &ns, &ns, &["apiPriority.enabled=true"], &[]);
    let name = rel.fullname.clone();
    let uid = |kind: &str, name: &str| {
        cp.kubectl(&["get", kind, name, "-o", "jsonpath={.metadata.uid}"])
            .trim()
            .to_owned()
    };
    let (fs, pl, le_fs, le_pl) = (
        uid("flowschema", &name),
        uid("prioritylevelconfiguration", &name),
        uid("flowschema", &format!("{name}-leader-election")),
        uid("prioritylevelconfiguration", "leader-election"),
    );
    assert!(
        ![&fs, &pl, &le_fs, &le_pl].iter().any(|u| u.is_empty()),
        "objects missing"
    );
    // The leader-election level exists: the Lease's schema is not dangling.
    let dangling = cp.kubectl(&[
        "get",
        "flowschema",
        &format!("{name}-leader-election"),
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Dangling\")].status}",
    ]);

    let sa = client_for(&rel.service_account_kubeconfig()).await;
    let get = |path: String| {
        http::Request::get(path)
            .body(kube::client::Body::empty())
            .unwrap()
    };
    // The API server's flow-control configuration follows the objects within a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (secret, lease) = loop {
        let secret = sa
            .send(get(format!(
                "/api/v1/namespaces/{ns}/secrets/{name}-sign-in-key"
            )))
            .await
            .unwrap();
        let lease = sa
            .send(get(format!(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}-leader"
            )))
            .await
            .unwrap();
        let (secret, lease) = (classified(&secret), classified(&lease));
        if (secret.0 == fs && lease.0 == le_fs) || std::time::Instant::now() > deadline {
            break (secret, lease);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(
        secret,
        (fs, pl),
        "the ServiceAccount's requests are in the operator's FlowSchema and level"
    );
    assert_eq!(
        lease,
        (le_fs, le_pl),
        "its Lease requests in the leader-election level"
    );
    assert_eq!(dangling.trim(), "False");
    rel.uninstall();
    assert!(
        cp.kubectl_output(&["get", "flowschema", &name])
            .stdout
            .is_empty(),
        "uninstall removes the FlowSchema"
    );
}
