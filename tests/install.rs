// The tests share the one cluster-wide CRD through `exclusive_cluster()`: its std Mutex is held
// across awaits on purpose (each test has its own runtime; the others wait their turn).
#![allow(clippy::await_holding_lock)]
//! Installing the operator: the Helm chart, the kustomize base in deploy/, the CRD copies, the RBAC
//! the chart grants (acting as its ServiceAccount), the Prometheus alerts, the Argo CD health check
//! and the Dockerfile lint. Against the real test control plane; the Deployment is stored but never
//! runs (no kubelet), so nothing here waits for pods.

#[path = "install/api_priority.rs"]
mod api_priority;
#[path = "install/chart_readme.rs"]
mod chart_readme;
#[path = "install/docker_context.rs"]
mod docker_context;
#[path = "install/gateway_chart.rs"]
mod gateway_chart;
#[path = "install/notes.rs"]
mod notes;
#[path = "install/release.rs"]
mod release;
mod support;

use k8s_openapi::api::{
    authorization::v1::{SelfSubjectAccessReview, SelfSubjectRulesReview},
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret},
    rbac::v1::RoleBinding,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter},
};
use mail_integration_operator::{api::MailIntegration, reconcile::finalizer::FINALIZER};
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};
use support::{
    control_plane::{ControlPlane, bin_dir},
    ensure_crd,
    helm::{self, ChartRelease, chart_dir, client_for, helm_output, kubectl_as},
    unique_namespace,
};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The non-empty documents of a multi-document YAML stream.
fn yaml_docs(s: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(s)
        .expect("valid YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize DIR` (local: no API server).
fn kustomize(dir: &Path) -> String {
    let out = Command::new(bin_dir().join("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn key(v: &Value) -> (String, String, String) {
    (
        str_at(v, &["kind"]).unwrap_or_default().to_owned(),
        str_at(v, &["metadata", "namespace"])
            .unwrap_or_default()
            .to_owned(),
        str_at(v, &["metadata", "name"])
            .unwrap_or_default()
            .to_owned(),
    )
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            str_at(d, &["kind"]) == Some(kind) && str_at(d, &["metadata", "name"]) == Some(name)
        })
        .unwrap_or_else(|| {
            panic!(
                "no {kind} {name} among {:?}",
                docs.iter().map(key).collect::<Vec<_>>()
            )
        })
}

fn kinds(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    docs.iter().map(key).collect()
}

fn container_args(deploy: &Value) -> Vec<String> {
    deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn owned(v: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    v.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Files that must agree with each other
// ---------------------------------------------------------------------------------------------

#[test]
fn crd_copies_equal_the_repository_crd() {
    let original = std::fs::read(repo().join("crds/mailintegration.yaml")).unwrap();
    for copy in [
        "charts/mail-integration-operator/files/crds/mailintegration.yaml",
        "deploy/crds/mailintegration.yaml",
    ] {
        let path = repo().join(copy);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{copy} must be a regular file (a symlink does not survive `helm package`)"
        );
        assert!(
            std::fs::read(&path).unwrap() == original,
            "{copy} differs from crds/mailintegration.yaml. After regenerating the CRD, copy it:\n  \
             cp crds/mailintegration.yaml {copy}"
        );
    }
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion must be the crate version in Cargo.toml"
    );
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    // The kustomize base runs the same image.
    let deploy = std::fs::read_to_string(repo().join("deploy/deployment.yaml")).unwrap();
    let image = format!(
        "image: ghcr.io/mail-integration-operator/mail-integration-operator:{}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(deploy.contains(&image), "deploy/deployment.yaml: {image}");
}

/// The license every label names is the one in LICENSE, and the changelog has a section for the
/// version being built, beside Unreleased.
#[test]
fn license_and_changelog_match_the_version_and_labels() {
    let license = std::fs::read_to_string(repo().join("LICENSE")).expect("LICENSE");
    assert!(
        license.trim_start().starts_with("Apache License")
            && license.contains("Version 2.0, January 2004")
            && license.contains("END OF TERMS AND CONDITIONS"),
        "LICENSE must hold the full Apache License 2.0 text"
    );
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("\nlicense = \"Apache-2.0\"\n"));
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("org.opencontainers.image.licenses=\"Apache-2.0\""));
    let changelog = std::fs::read_to_string(repo().join("CHANGELOG.md")).expect("CHANGELOG.md");
    let headings: Vec<&str> = changelog.lines().filter(|l| l.starts_with("## ")).collect();
    assert_eq!(headings.first(), Some(&"## [Unreleased]"), "{headings:?}");
    let this = format!("## [{}]", env!("CARGO_PKG_VERSION"));
    assert!(
        headings.iter().any(|h| h.starts_with(&this)),
        "CHANGELOG.md has no section {this}: {headings:?}"
    );
    // Each version (Unreleased too) says what an upgrade needs.
    let sections = changelog.split("\n## ").skip(1).count();
    assert_eq!(changelog.matches("\n### Upgrading\n").count(), sections);
}

#[test]
fn helm_package_carries_the_crd_as_a_file() {
    let out = tempfile::tempdir().unwrap();
    helm::helm_offline(&[
        "package",
        chart_dir().to_str().unwrap(),
        "--destination",
        out.path().to_str().unwrap(),
    ]);
    let tgz = out
        .path()
        .join(format!("mail-integration-operator-{}.tgz", "0.1.0"));
    let listing = Command::new("tar")
        .arg("tvzf")
        .arg(&tgz)
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let crd_line = listing
        .lines()
        .find(|l| l.ends_with("mail-integration-operator/files/crds/mailintegration.yaml"))
        .unwrap_or_else(|| {
            panic!("the package has no files/crds/mailintegration.yaml:\n{listing}")
        });
    assert!(
        crd_line.starts_with('-'),
        "a regular file, not a link: {crd_line}"
    );
    for f in [
        "values.schema.json",
        "templates/NOTES.txt",
        "templates/deployment.yaml",
        "templates/crds.yaml",
    ] {
        assert!(
            listing.contains(&format!("mail-integration-operator/{f}")),
            "{f} in:\n{listing}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// helm lint / template / values schema
// ---------------------------------------------------------------------------------------------

/// Every optional part turned on, for lint and template.
const ALL_ON: &[&str] = &[
    "watchNamespaces={team-a,team-b}",
    "replicaCount=2",
    "ingress.enabled=true",
    "ingress.className=nginx",
    "ingress.host=mail-operator.example.com",
    "ingress.tlsSecretName=mail-operator-tls",
    "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "podDisruptionBudget.enabled=true",
    "apiPriority.enabled=true",
    "logLevel=info",
];

#[test]
fn helm_lint_passes_with_defaults_and_with_everything_on() {
    let chart = chart_dir();
    let out = helm::helm_offline(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
    let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
    for s in ALL_ON {
        args.extend(["--set", s]);
    }
    let out = helm::helm_offline(&args);
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
}

#[test]
fn helm_template_defaults_render_the_operator_with_a_cluster_role() {
    let docs = yaml_docs(&helm::template("mio", "ops", &[]));
    let n = "mio-mail-integration-operator";
    assert_eq!(
        kinds(&docs),
        owned(&[
            ("ServiceAccount", "ops", n),
            ("ClusterRole", "", n),
            ("ClusterRoleBinding", "", n),
            ("Role", "ops", &format!("{n}-own-namespace")),
            ("RoleBinding", "ops", &format!("{n}-own-namespace")),
            ("Deployment", "ops", n),
            ("Service", "ops", n),
            ("Service", "ops", &format!("{n}-metrics")),
            (
                "CustomResourceDefinition",
                "",
                "mailintegrations.mailintegration.dev",
            ),
            ("ClusterRole", "", &format!("{n}-view")),
            ("ClusterRole", "", &format!("{n}-edit")),
            ("Pod", "ops", &format!("{n}-test-readiness")),
        ]),
        "objects of the default install"
    );

    let deploy = find(&docs, "Deployment", n);
    assert_eq!(
        container_args(deploy),
        [
            "run",
            "--health-addr=0.0.0.0:9090",
            "--sign-in-addr=0.0.0.0:8080",
            &format!("--sign-in-key-secret={n}-sign-in-key"),
            "--sign-in-link-ttl=1h",
            "--log-format=json",
            "--leader-election",
            &format!("--leader-election-lease={n}-leader"),
            "--leader-election-lease-seconds=15",
            "--shutdown-timeout=70s",
            "--kube-api-qps=0",
            "--kube-api-adaptive=true",
            "--concurrency=64",
            "--grant-deletion-policy=Delete",
        ]
    );
    // Room for the drain: the grace period is longer than --shutdown-timeout.
    assert_eq!(
        deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64(),
        Some(90)
    );
    // Leader election is on by default: a rolling update, never two refreshers.
    assert_eq!(
        deploy["spec"]["strategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    let spec = &deploy["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(
        c["image"].as_str(),
        Some("ghcr.io/mail-integration-operator/mail-integration-operator:0.1.0")
    );
    // Hardening.
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    // Probes on the health port, by name.
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["port"].as_str(),
        Some("health")
    );
    let ports: Vec<(String, u64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("http".into(), 8080), ("health".into(), 9090)]);
    // Downward API.
    let env = serde_saphyr::to_string(&c["env"]).unwrap();
    assert!(
        env.contains("POD_NAME") && env.contains("metadata.name"),
        "{env}"
    );
    assert!(
        env.contains("POD_NAMESPACE") && env.contains("metadata.namespace"),
        "{env}"
    );
    // One replica without leader election: never two operators during an upgrade.
    let docs_off = yaml_docs(&helm::template(
        "mio",
        "ops",
        &["leaderElection.enabled=false"],
    ));
    let off = find(&docs_off, "Deployment", n);
    assert_eq!(off["spec"]["strategy"]["type"].as_str(), Some("Recreate"));
    assert!(!container_args(off).iter().any(|a| a == "--leader-election"));

    // Services: sign-in on 80 -> http, metrics on 9090 -> health.
    let svc = find(&docs, "Service", n);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"].as_str(), Some("http"));
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(80));
    let metrics = find(&docs, "Service", &format!("{n}-metrics"));
    assert_eq!(
        metrics["spec"]["ports"][0]["targetPort"].as_str(),
        Some("health")
    );

    // Own namespace: the key Secret by name, the Lease (leader election is on by default), and no
    // Lease rights without leader election.
    let own = serde_saphyr::to_string(find(&docs, "Role", &format!("{n}-own-namespace"))).unwrap();
    assert!(own.contains(&format!("{n}-sign-in-key")), "{own}");
    assert!(own.contains(&format!("{n}-leader")), "{own}");
    let own_off =
        serde_saphyr::to_string(find(&docs_off, "Role", &format!("{n}-own-namespace"))).unwrap();
    assert!(!own_off.contains("leases"), "{own_off}");
}

#[test]
fn helm_template_with_everything_on() {
    let docs = yaml_docs(&helm::template("mio", "ops", ALL_ON));
    let n = "mio-mail-integration-operator";
    let k = kinds(&docs);
    // Watch namespaces: a Role + RoleBinding in each, no ClusterRole.
    for ns in ["team-a", "team-b"] {
        assert!(k.contains(&("Role".into(), ns.into(), n.into())), "{k:?}");
        assert!(
            k.contains(&("RoleBinding".into(), ns.into(), n.into())),
            "{k:?}"
        );
    }
    // (The only ClusterRoles are the aggregated ones for users, bound to nobody by the chart.)
    assert!(
        !k.iter().any(|(kind, _, name)| kind == "ClusterRoleBinding"
            || (kind == "ClusterRole" && !name.ends_with("-view") && !name.ends_with("-edit"))),
        "no cluster-wide RBAC for the operator with watchNamespaces: {k:?}"
    );
    for kind in [
        "Ingress",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    ] {
        assert!(k.iter().any(|(x, _, _)| x == kind), "{kind} missing: {k:?}");
    }
    let deploy = find(&docs, "Deployment", n);
    let args = container_args(deploy);
    for want in [
        "--namespace=team-a",
        "--namespace=team-b",
        "--leader-election",
        &format!("--leader-election-lease={n}-leader"),
        "--public-url=https://mail-operator.example.com",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }
    assert_eq!(
        deploy["spec"]["strategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    let env = serde_saphyr::to_string(&deploy["spec"]["template"]["spec"]["containers"][0]["env"])
        .unwrap();
    assert!(env.contains("RUST_LOG"), "{env}");
    let own = serde_saphyr::to_string(find(&docs, "Role", &format!("{n}-own-namespace"))).unwrap();
    assert!(
        own.contains("leases") && own.contains(&format!("{n}-leader")),
        "{own}"
    );
    // The Ingress routes only to the sign-in Service.
    let ing = find(&docs, "Ingress", n);
    assert_eq!(
        ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"].as_str(),
        Some(n)
    );
    assert_eq!(
        ing["spec"]["tls"][0]["secretName"].as_str(),
        Some("mail-operator-tls")
    );
    // The ServiceMonitor scrapes only the metrics Service and keeps the integrations' namespace label.
    let sm = find(&docs, "ServiceMonitor", n);
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/service"].as_str(),
        Some("metrics")
    );
    assert_eq!(
        sm["spec"]["endpoints"][0]["honorLabels"].as_bool(),
        Some(true)
    );
}

/// The conventions of the charts this one is measured against, each rendered: global and chart
/// imagePullSecrets (names or {name}, each once, the helm test Pod too), commonLabels on every
/// object the chart makes, deploymentAnnotations and revisionHistoryLimit on the Deployment, a
/// PodDisruptionBudget by maxUnavailable instead of minAvailable, extraObjects (maps and strings
/// through tpl), no fixed runAsUser (OpenShift assigns its own), a helm test Pod that no selector
/// of the chart matches, and `enabled=false` (a parent chart's condition) rendering nothing.
#[test]
fn chart_follows_its_anchors_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        r#"global:
  imagePullSecrets: [a, {name: b}]
imagePullSecrets: [{name: a}]
commonLabels: {team: mail}
deploymentAnnotations: {reloader.stakater.com/auto: "true"}
revisionHistoryLimit: 3
replicaCount: 2
podDisruptionBudget: {enabled: true, maxUnavailable: 1}
networkPolicy: {enabled: true}
extraObjects:
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: "{{ .Release.Name }}-extra"}
  - |
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: {{ include "mio.fullname" . }}-string
"#,
    )
    .unwrap();
    let chart = chart_dir();
    let render = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "mio",
            chart.to_str().unwrap(),
            "--namespace",
            "ops",
        ];
        args.extend_from_slice(extra);
        helm::helm_offline(&args)
    };
    let docs = yaml_docs(&render(&["-f", values.to_str().unwrap()]));
    let n = "mio-mail-integration-operator";
    let deploy = find(&docs, "Deployment", n);
    let pod = find(&docs, "Pod", &format!("{n}-test-readiness"));
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        names(&deploy["spec"]["template"]["spec"]["imagePullSecrets"]),
        ["a", "b"]
    );
    assert_eq!(names(&pod["spec"]["imagePullSecrets"]), ["a", "b"]);
    for d in &docs {
        let k = key(d);
        if k.0 == "CustomResourceDefinition" || k.2.ends_with("-extra") || k.2.ends_with("-string")
        {
            continue;
        }
        assert_eq!(
            str_at(d, &["metadata", "labels", "team"]),
            Some("mail"),
            "commonLabels on {k:?}"
        );
    }
    assert_eq!(
        str_at(&deploy["spec"]["template"], &["metadata", "labels", "team"]),
        Some("mail")
    );
    assert_eq!(
        str_at(
            deploy,
            &["metadata", "annotations", "reloader.stakater.com/auto"]
        ),
        Some("true")
    );
    assert_eq!(deploy["spec"]["revisionHistoryLimit"].as_i64(), Some(3));
    let pdb = find(&docs, "PodDisruptionBudget", n);
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert!(pdb["spec"].get("minAvailable").is_none(), "{pdb:?}");
    find(&docs, "ConfigMap", "mio-extra");
    find(&docs, "ConfigMap", &format!("{n}-string"));

    // No selector of the chart's picks the helm test Pod.
    let pod_labels = pod["metadata"]["labels"].as_object().unwrap();
    let selects = |sel: &Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    let mut selectors = vec![
        &deploy["spec"]["selector"]["matchLabels"],
        &pdb["spec"]["selector"]["matchLabels"],
        &find(&docs, "NetworkPolicy", n)["spec"]["podSelector"]["matchLabels"],
    ];
    for d in docs
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("Service"))
    {
        selectors.push(&d["spec"]["selector"]);
    }
    assert_eq!(selectors.len(), 5);
    for sel in selectors {
        assert!(
            !selects(sel),
            "the helm test Pod's labels {pod_labels:?} match the selector {sel:?}"
        );
    }
    // The operator's pods themselves are selected.
    let op_labels = deploy["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    assert!(
        deploy["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| op_labels.get(k) == Some(v))
    );

    // Defaults: no fixed uid (the image's user is 65532; OpenShift assigns the namespace's).
    let defaults = yaml_docs(&render(&[]));
    let sc = &find(&defaults, "Deployment", n)["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert!(
        sc.get("runAsUser").is_none() && sc.get("runAsGroup").is_none(),
        "{sc:?}"
    );
    // A ServiceMonitor where Prometheus reads them, still scraping the release namespace.
    let sm_docs = yaml_docs(&render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "serviceMonitor.namespace=monitoring",
        "--set",
        "serviceMonitor.metricRelabelings[0].action=drop",
        "--set",
        "serviceMonitor.metricRelabelings[0].regex=mailintegration_api_reads_total",
        "--set",
        "serviceMonitor.relabelings[0].targetLabel=cluster",
        "--set",
        "serviceMonitor.relabelings[0].replacement=prod",
    ]));
    let sm = find(&sm_docs, "ServiceMonitor", n);
    assert_eq!(str_at(sm, &["metadata", "namespace"]), Some("monitoring"));
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"][0].as_str(),
        Some("ops")
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["metricRelabelings"][0]["action"].as_str(), Some("drop"));
    assert_eq!(
        ep["relabelings"][0]["targetLabel"].as_str(),
        Some("cluster")
    );
    // Egress rules make the NetworkPolicy an egress one too; an HTTPRoute through a Gateway
    // exposes the sign-in Service and sets the public URL.
    let more = yaml_docs(&render(&[
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.egress[0].ports[0].port=443",
        "--set",
        "httpRoute.enabled=true",
        "--set",
        "httpRoute.parentRefs[0].name=public",
        "--set",
        "httpRoute.hostnames[0]=mail.example.org",
    ]));
    let np = find(&more, "NetworkPolicy", n);
    assert_eq!(
        np["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert_eq!(
        np["spec"]["egress"][0]["ports"][0]["port"].as_i64(),
        Some(443)
    );
    let np_default = find(
        &yaml_docs(&render(&["--set", "networkPolicy.enabled=true"])),
        "NetworkPolicy",
        n,
    )
    .clone();
    assert_eq!(
        np_default["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let route = find(&more, "HTTPRoute", n);
    assert_eq!(
        route["spec"]["hostnames"][0].as_str(),
        Some("mail.example.org")
    );
    assert_eq!(
        route["spec"]["parentRefs"][0]["name"].as_str(),
        Some("public")
    );
    assert_eq!(
        route["spec"]["rules"][0]["backendRefs"][0]["name"].as_str(),
        Some(n)
    );
    assert!(
        container_args(find(&more, "Deployment", n))
            .iter()
            .any(|a| a == "--public-url=https://mail.example.org"),
    );
    let refused = helm::helm_offline_output(&[
        "template",
        "mio",
        chart.to_str().unwrap(),
        "--set",
        "httpRoute.enabled=true",
        "--set",
        "httpRoute.hostnames[0]=mail.example.org",
    ]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("httpRoute.parentRefs is required"),
        "{refused:?}"
    );
    // A parent chart's condition turns the whole chart off.
    let off = render(&["--set", "enabled=false"]);
    assert!(yaml_docs(&off).is_empty(), "enabled=false renders:\n{off}");
}

/// Every value of values.yaml is in values.schema.json, every object the schema models is closed
/// (a misspelt key fails `helm install` instead of being ignored; `global` stays open: an umbrella
/// chart passes its own globals), and every value is in docs/install.md's table: the top-level
/// keys, and the keys of each object the schema models field by field (Kubernetes types such as
/// `resources` are documented as a whole).
#[test]
fn every_value_is_in_the_schema_and_documented() {
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    fn resolve<'a>(root: &'a Value, mut n: &'a Value) -> &'a Value {
        while let Some(r) = n.get("$ref").and_then(Value::as_str) {
            n = &root["definitions"][r.rsplit('/').next().unwrap()];
        }
        n
    }
    fn walk(value: &Value, root: &Value, node: &Value, path: &str, problems: &mut Vec<String>) {
        let node = resolve(root, node);
        let Some(props) = node.get("properties").and_then(Value::as_object) else {
            return;
        };
        if path != "global." && node.get("additionalProperties") != Some(&Value::Bool(false)) {
            problems.push(format!(
                "{path}: the schema object is open (additionalProperties)"
            ));
        }
        for (k, v) in value.as_object().into_iter().flatten() {
            match props.get(k) {
                Some(n) => walk(v, root, n, &format!("{path}{k}."), problems),
                None => problems.push(format!("{path}{k}: not in values.schema.json")),
            }
        }
    }
    let mut problems = Vec::new();
    walk(&values, &schema, &schema, "", &mut problems);

    let doc = std::fs::read_to_string(repo().join("docs/install.md")).unwrap();
    let table = &doc[doc.find("### Values").unwrap()..doc.find("### One replica").unwrap()];
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| `")).collect();
    for (k, v) in values.as_object().unwrap() {
        // The key column of each row that names the value.
        let keys: String = rows
            .iter()
            .map(|r| r.split('|').nth(1).unwrap_or(""))
            .filter(|key| key.contains(&format!("`{k}`")) || key.contains(&format!("`{k}.")))
            .collect();
        if keys.is_empty() {
            problems.push(format!("{k}: not in docs/install.md's Values table"));
            continue;
        }
        let inline = schema["properties"][k].get("properties").is_some();
        if inline && k != "global" {
            for sub in v.as_object().into_iter().flatten().map(|(s, _)| s) {
                if !keys.contains(&format!("`{k}.{sub}`")) && !keys.contains(&format!("`.{sub}`")) {
                    problems.push(format!("{k}.{sub}: not in its docs/install.md row"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn values_schema_and_checks_reject_bad_values_with_clear_messages() {
    let chart = chart_dir();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["replicaCount=two"],
            &["at '/replicaCount': got string, want integer"],
        ),
        (&["replicaCount=0"], &["at '/replicaCount'", "minimum"]),
        (
            &["logFormat=xml"],
            &["at '/logFormat': value must be one of 'text', 'json'"],
        ),
        (
            &["replicasCount=2"],
            &["additional properties 'replicasCount' not allowed"],
        ),
        (
            &["watchNamespaces={Team_A}"],
            &["at '/watchNamespaces/0'", "does not match pattern"],
        ),
        (
            &["publicURL=mail-operator.example.com"],
            &["at '/publicURL'", "does not match pattern"],
        ),
        (
            &["signIn.linkTTL=one hour"],
            &["at '/signIn/linkTTL'", "does not match pattern"],
        ),
        (
            &["extraEnv[0].name=POD_NAMESPACE", "extraEnv[0].value=x"],
            &["at '/extraEnv/0/name'"],
        ),
        (
            &["ingress.enabled=true"],
            &["ingress.host is required when ingress.enabled is true"],
        ),
        (
            &["podDisruptionBudget.enabled=true"],
            &["podDisruptionBudget.minAvailable (1) must be below replicaCount (1)"],
        ),
    ];
    for (set, want) in cases {
        let mut args = vec!["template", "bad", chart.to_str().unwrap()];
        for s in *set {
            args.extend(["--set", s]);
        }
        let out = helm::helm_offline_output(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set:?} was accepted");
        for w in *want {
            assert!(
                stderr.contains(w),
                "{set:?}: expected {w:?} in the error:\n{stderr}"
            );
        }
    }
}

/// The test-only protocol scale (docs/operations.md, "Settings for tests only") is set by no
/// install: not the chart with every option on, not the kustomize base; and `run --help` hides it.
#[test]
fn no_install_sets_a_test_only_setting() {
    let chart = helm::template("mio", "ops", ALL_ON);
    let base = kustomize(&repo().join("deploy"));
    for (what, text) in [("the chart", &chart), ("the kustomize base", &base)] {
        for setting in ["test-protocol-scale", "MIO_TEST_"] {
            assert!(!text.contains(setting), "{what} sets {setting}");
        }
    }
    let bin = env!("CARGO_BIN_EXE_mail-integration-operator");
    let help = Command::new(bin).args(["run", "--help"]).output().unwrap();
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains("test-protocol-scale"));
    let refused = Command::new(bin)
        .args(["run", "--test-protocol-scale=0", "--help"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a scale of 0 is refused");
}

#[test]
fn flags_the_chart_passes_exist_in_the_binary() {
    // Flags the chart already passes but this branch's binary does not have yet. When one lands,
    // this test fails until it is removed from here: keep the list short and true.
    const PENDING: &[&str] = &[];
    let docs = yaml_docs(&helm::template("mio", "ops", ALL_ON));
    let args = container_args(find(&docs, "Deployment", "mio-mail-integration-operator"));
    assert_eq!(args[0], "run");
    let bin = env!("CARGO_BIN_EXE_mail-integration-operator");
    let help = Command::new(bin).args(["run", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let mut missing = BTreeSet::new();
    for a in &args[1..] {
        let flag = a.split('=').next().unwrap();
        if !help
            .lines()
            .any(|l| l.trim_start().split([' ', ',', '=']).any(|w| w == flag))
        {
            missing.insert(flag.to_owned());
        }
    }
    // The chart passes --namespace once per watched namespace.
    let repeated = Command::new(bin)
        .args(["run", "--namespace=a", "--namespace=b", "--help"])
        .output()
        .unwrap();
    if !repeated.status.success() {
        missing.insert("repeated --namespace".into());
    }
    let pending: BTreeSet<String> = PENDING.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        missing, pending,
        "flags the chart passes that `mail-integration-operator run` lacks (left) vs the PENDING \
         list (right): add a flag to the binary, or update PENDING when one has landed"
    );
}

// ---------------------------------------------------------------------------------------------
// kustomize base
// ---------------------------------------------------------------------------------------------

/// Drop what only Helm adds (its two labels) and comments are already gone after parsing.
fn strip_helm_labels(v: &mut Value) {
    fn strip(meta: Option<&mut Value>) {
        if let Some(labels) = meta
            .and_then(|m| m.get_mut("labels"))
            .and_then(|l| l.as_object_mut())
        {
            labels.remove("helm.sh/chart");
            labels.remove("app.kubernetes.io/managed-by");
        }
    }
    strip(v.get_mut("metadata"));
    strip(
        v.get_mut("spec")
            .and_then(|s| s.get_mut("template"))
            .and_then(|t| t.get_mut("metadata")),
    );
}

#[test]
fn kustomize_base_equals_the_chart_defaults() {
    let rendered = kustomize(&repo().join("deploy"));
    let base = yaml_docs(&rendered);
    let mut chart = yaml_docs(&helm::template(
        "mail-integration-operator",
        "mail-integration-operator",
        &[],
    ));
    chart.iter_mut().for_each(strip_helm_labels);

    // Beyond the chart's other templates the base holds the CRD (the chart's own, without Helm's
    // annotation and labels) and the namespace
    // (helm install --create-namespace); the examples are not part of it.
    let base_kinds = kinds(&base);
    assert!(base_kinds.contains(&(
        "CustomResourceDefinition".into(),
        "".into(),
        "mailintegrations.mailintegration.dev".into()
    )));
    assert!(base_kinds.contains(&(
        "Namespace".into(),
        "".into(),
        "mail-integration-operator".into()
    )));
    assert!(
        !base_kinds
            .iter()
            .any(|(k, _, _)| k == "MailIntegration" || k == "Secret"),
        "deploy/examples must stay out of the base: {base_kinds:?}"
    );
    // kustomize writes a whole-numbered float (a schema bound such as `maximum: 157286400.0`) as an
    // integer: the same number, compared as such.
    fn whole_numbers(v: &mut Value) {
        match v {
            Value::Number(n) => {
                if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                    && !n.is_i64()
                    && !n.is_u64()
                {
                    *v = Value::from(f as i64);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(whole_numbers),
            Value::Object(o) => o.values_mut().for_each(whole_numbers),
            _ => {}
        }
    }
    let mut crd: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("crds/mailintegration.yaml")).unwrap(),
    )
    .unwrap();
    whole_numbers(&mut crd);
    let mut in_base = find(
        &base,
        "CustomResourceDefinition",
        "mailintegrations.mailintegration.dev",
    )
    .clone();
    whole_numbers(&mut in_base);
    assert_eq!(in_base, crd);

    let by_key = |docs: &[Value]| -> BTreeMap<(String, String, String), Value> {
        docs.iter()
            .filter(|d| {
                !matches!(
                    str_at(d, &["kind"]),
                    Some("Namespace" | "CustomResourceDefinition")
                )
                // `helm test` hooks are not part of an installation.
                && str_at(d, &["metadata", "annotations", "helm.sh/hook"]).is_none()
            })
            .map(|d| (key(d), d.clone()))
            .collect()
    };
    let (base, chart) = (by_key(&base), by_key(&chart));
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "deploy/ and the chart's defaults hold different objects"
    );
    for (k, b) in &base {
        assert!(
            b == &chart[k],
            "{k:?} differs between deploy/ and the chart's defaults.\n--- deploy/:\n{}\n--- chart:\n{}",
            serde_saphyr::to_string(b).unwrap(),
            serde_saphyr::to_string(&chart[k]).unwrap()
        );
    }
}

#[test]
fn docs_list_exactly_the_rbac_rules_the_chart_grants() {
    let n = "mio-mail-integration-operator";
    let own = format!("{n}-own-namespace");
    // Defaults: the ClusterRole carries the "watched" rows; the own namespace, the "own" ones and,
    // leader election being on by default, its Lease rows.
    let docs = yaml_docs(&helm::template("mio", "ops", &[]));
    assert_eq!(
        rendered_grants(&docs, "ClusterRole", "", n),
        documented_grants(n, &["watched"])
    );
    assert_eq!(
        rendered_grants(&docs, "Role", "ops", &own),
        documented_grants(n, &["own", "own, leader election only"])
    );
    let docs = yaml_docs(&helm::template(
        "mio",
        "ops",
        &["leaderElection.enabled=false"],
    ));
    assert_eq!(
        rendered_grants(&docs, "Role", "ops", &own),
        documented_grants(n, &["own"])
    );
    // A namespace list: the same "watched" rows in each Role; leader election adds its rows.
    let docs = yaml_docs(&helm::template(
        "mio",
        "ops",
        &[
            "watchNamespaces={team-a,team-b}",
            "leaderElection.enabled=true",
        ],
    ));
    for ns in ["team-a", "team-b"] {
        assert_eq!(
            rendered_grants(&docs, "Role", ns, n),
            documented_grants(n, &["watched"]),
            "the Role in {ns}"
        );
    }
    assert_eq!(
        rendered_grants(&docs, "Role", "ops", &own),
        documented_grants(n, &["own", "own, leader election only"])
    );
    // The grant that makes revokeOnDelete work, and the verbs that stay out.
    let watched = documented_grants(n, &["watched"]);
    assert!(watched.contains(&grant(
        "mailintegration.dev",
        "mailintegrations",
        "*",
        "patch"
    )));
    for verb in ["create", "update", "delete", "deletecollection"] {
        assert!(
            !watched.contains(&grant("mailintegration.dev", "mailintegrations", "*", verb)),
            "{verb} on mailintegrations"
        );
    }
    assert!(!watched.contains(&grant("", "secrets", "*", "delete")));
}

#[test]
fn kustomize_overlay_moves_everything_to_another_namespace() {
    // The overlay docs/install.md shows: the whole base, RBAC subjects included, in another namespace.
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("overlay");
    std::fs::create_dir(&overlay).unwrap();
    let doc = std::fs::read_to_string(repo().join("docs/install.md")).unwrap();
    let start = doc
        .find("# overlay/kustomization.yaml")
        .expect("docs/install.md shows overlay/kustomization.yaml");
    let block = &doc[start..];
    let block = &block[..block.find("```").unwrap()];
    // kustomize takes a base only by relative path: link the repository's deploy/ next to it.
    std::os::unix::fs::symlink(repo().join("deploy"), dir.path().join("deploy")).unwrap();
    std::fs::write(overlay.join("kustomization.yaml"), block).unwrap();
    let docs = yaml_docs(&kustomize(&overlay));
    for d in &docs {
        let (kind, ns, name) = key(d);
        match kind.as_str() {
            "Namespace" => assert_eq!(name, "mail", "the Namespace object is renamed"),
            "CustomResourceDefinition" | "ClusterRole" => assert_eq!(ns, ""),
            "ClusterRoleBinding" => {
                assert_eq!(str_at(&d["subjects"][0], &["namespace"]), Some("mail"))
            }
            "RoleBinding" => {
                assert_eq!(ns, "mail");
                assert_eq!(str_at(&d["subjects"][0], &["namespace"]), Some("mail"))
            }
            _ => assert_eq!(ns, "mail", "{kind} {name}"),
        }
    }
}

/// `kubectl diff` exit status: 0 no difference, 1 differences, other: an error.
fn assert_no_diff(cp: &ControlPlane, args: &[&str]) {
    let out = cp.kubectl_output(args);
    assert!(
        out.status.code() == Some(0),
        "kubectl {} (exit {:?}) shows a difference after applying the same files:\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kind/name=resourceVersion` of every object `target` (`-k DIR` or `-f PATH`) names.
fn resource_versions(cp: &ControlPlane, target: &[&str]) -> String {
    let mut args = vec!["get"];
    args.extend(target);
    args.extend([
        "--no-headers",
        "-o",
        "custom-columns=KIND:.kind,NAME:.metadata.name,VERSION:.metadata.resourceVersion",
    ]);
    cp.kubectl(&args)
}

#[test]
fn kubectl_apply_k_deploy_twice_changes_nothing() {
    let (_cluster, cp) = exclusive_cluster();
    let deploy = repo().join("deploy");
    let deploy = deploy.to_str().unwrap();
    let first = cp.kubectl_output(&["apply", "-k", deploy]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "kubectl apply -k deploy/: {stderr}");
    // The namespace asks for warnings against the "restricted" Pod Security level: the Deployment
    // must not draw one.
    assert!(
        !stderr.contains("PodSecurity"),
        "the Deployment violates the restricted Pod Security level:\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    for obj in [
        "customresourcedefinition.apiextensions.k8s.io/mailintegrations.mailintegration.dev",
        "namespace/mail-integration-operator",
        "serviceaccount/mail-integration-operator",
        "clusterrole.rbac.authorization.k8s.io/mail-integration-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/mail-integration-operator",
        "clusterrole.rbac.authorization.k8s.io/mail-integration-operator-view",
        "clusterrole.rbac.authorization.k8s.io/mail-integration-operator-edit",
        "role.rbac.authorization.k8s.io/mail-integration-operator-own-namespace",
        "rolebinding.rbac.authorization.k8s.io/mail-integration-operator-own-namespace",
        "deployment.apps/mail-integration-operator",
        "service/mail-integration-operator",
        "service/mail-integration-operator-metrics",
    ] {
        assert!(stdout.contains(obj), "{obj} not applied:\n{stdout}");
    }
    assert_eq!(stdout.lines().count(), 12, "exactly the base:\n{stdout}");
    let target = ["-k", deploy];
    let versions = resource_versions(cp, &target);
    assert_eq!(versions.lines().count(), 12, "{versions}");

    // Client-side apply again: nothing changes, nothing is written.
    let second = cp.kubectl(&["apply", "-k", deploy]);
    assert!(
        second.lines().all(|l| l.ends_with(" unchanged")),
        "the second apply changed something:\n{second}"
    );
    assert_eq!(resource_versions(cp, &target), versions);
    assert_no_diff(cp, &["diff", "-k", deploy]);

    // Server-side apply takes over without conflicts (no field the server defaults differently),
    // and from then on is a no-op too.
    cp.kubectl(&["apply", "--server-side", "-k", deploy]);
    let versions = resource_versions(cp, &target);
    cp.kubectl(&["apply", "--server-side", "-k", deploy]);
    assert_eq!(
        resource_versions(cp, &target),
        versions,
        "a repeated server-side apply wrote objects"
    );
    assert_no_diff(cp, &["diff", "--server-side", "-k", deploy]);
    let stored = cp.kubectl(&[
        "get",
        "deployment",
        "mail-integration-operator",
        "-n",
        "mail-integration-operator",
        "-o",
        "jsonpath={.spec.template.spec.serviceAccountName}",
    ]);
    assert_eq!(stored, "mail-integration-operator");
}

#[test]
fn kubectl_apply_f_crds_twice_changes_nothing() {
    let (_cluster, cp) = exclusive_cluster();
    let crds = repo().join("crds");
    let crds = crds.to_str().unwrap();
    let target = ["-f", crds];
    // Client-side (the way most users run it), then server-side (the way ensure_crd, Flux and Argo
    // CD with ServerSideApply run it): each is a no-op the second time.
    cp.kubectl(&["apply", "-f", crds]);
    let versions = resource_versions(cp, &target);
    let again = cp.kubectl(&["apply", "-f", crds]);
    assert!(again.trim().ends_with(" unchanged"), "{again}");
    assert_eq!(resource_versions(cp, &target), versions);
    assert_no_diff(cp, &["diff", "-f", crds]);

    cp.kubectl(&["apply", "--server-side", "-f", crds]);
    let versions = resource_versions(cp, &target);
    cp.kubectl(&["apply", "--server-side", "-f", crds]);
    assert_eq!(resource_versions(cp, &target), versions);
    assert_no_diff(cp, &["diff", "--server-side", "-f", crds]);
}

// ---------------------------------------------------------------------------------------------
// helm install / upgrade / uninstall against the API server
// ---------------------------------------------------------------------------------------------

fn exists(cp: &ControlPlane, kind: &str, name: &str, ns: Option<&str>) -> bool {
    let mut args = vec!["get", kind, name, "-o", "name"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    cp.kubectl_output(&args).status.success()
}

#[test]
fn helm_install_upgrade_uninstall() {
    let (_cluster, cp) = exclusive_cluster();
    let ns = unique_namespace("helm");
    let rel = ChartRelease::install(cp, &ns, &ns, &["logFormat=json"], &[]);
    let n = rel.fullname.as_str();
    let expected: &[(&str, &str, bool)] = &[
        ("serviceaccount", n, true),
        ("clusterrole", n, false),
        ("clusterrolebinding", n, false),
        ("role", &format!("{n}-own-namespace"), true),
        ("rolebinding", &format!("{n}-own-namespace"), true),
        ("deployment", n, true),
        ("service", n, true),
        ("service", &format!("{n}-metrics"), true),
    ];
    for (kind, name, namespaced) in expected {
        assert!(
            exists(cp, kind, name, namespaced.then_some(ns.as_str())),
            "helm install did not create {kind} {name}"
        );
    }
    let status = helm::helm(cp, &["status", &rel.release, "-n", &ns]);
    assert!(status.contains("STATUS: deployed"), "{status}");
    assert!(
        rel.deployment_args().contains(&"--log-format=json".into()),
        "{:?}",
        rel.deployment_args()
    );

    // Upgrade: a changed value reaches the stored Deployment; new objects appear.
    rel.upgrade(&[
        "logFormat=text",
        "replicaCount=2",
        "podDisruptionBudget.enabled=true",
    ]);
    let args = rel.deployment_args();
    assert!(args.contains(&"--log-format=text".into()), "{args:?}");
    assert!(args.contains(&"--leader-election".into()), "{args:?}");
    let replicas = cp.kubectl(&[
        "get",
        "deployment",
        n,
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "2");
    assert!(exists(cp, "poddisruptionbudget", n, Some(&ns)));
    let lease_rule = cp.kubectl(&[
        "get",
        "role",
        &format!("{n}-own-namespace"),
        "-n",
        &ns,
        "-o",
        "jsonpath={.rules[*].resources}",
    ]);
    assert!(lease_rule.contains("leases"), "{lease_rule}");
    let history = helm::helm(cp, &["history", &rel.release, "-n", &ns]);
    assert_eq!(history.lines().count(), 3, "two revisions:\n{history}");

    // Uninstall removes everything it made but leaves the CRD (and so users' MailIntegrations).
    let out = rel.uninstall();
    assert!(out.contains("uninstalled"), "{out}");
    for (kind, name, namespaced) in expected {
        assert!(
            !exists(cp, kind, name, namespaced.then_some(ns.as_str())),
            "{kind} {name} left after helm uninstall"
        );
    }
    assert!(!exists(cp, "poddisruptionbudget", n, Some(&ns)));
    assert!(exists(
        cp,
        "crd",
        "mailintegrations.mailintegration.dev",
        None
    ));
}

#[test]
fn helm_install_refuses_bad_values_and_creates_nothing() {
    let (_cluster, cp) = exclusive_cluster();
    let ns = unique_namespace("helm-bad");
    let chart = chart_dir();
    let out = helm_output(
        cp,
        &[
            "install",
            &ns,
            chart.to_str().unwrap(),
            "-n",
            &ns,
            "--set",
            "logFormat=yaml",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("at '/logFormat': value must be one of 'text', 'json'"),
        "{stderr}"
    );
    // (The namespace's `default` ServiceAccount is kube-controller-manager's, not the chart's.)
    let left = cp.kubectl(&["get", "deploy,sa,role,secret", "-n", &ns, "-o", "name"]);
    let left: Vec<&str> = left
        .lines()
        .filter(|l| *l != "serviceaccount/default")
        .collect();
    assert!(
        left.is_empty(),
        "objects created despite the error: {left:?}"
    );
}

#[test]
fn helm_install_with_crds_managed_separately_leaves_the_crd_alone() {
    // Users who manage the CRD themselves (kubectl apply -f crds/, GitOps) install with
    // crds.enabled=false (ChartRelease::install sets it: this control plane's CRD came from kubectl).
    let (_cluster, cp) = exclusive_cluster();
    let ns = unique_namespace("helm-skip");
    let version = || {
        cp.kubectl(&[
            "get",
            "crd",
            "mailintegrations.mailintegration.dev",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
    };
    let before = version();
    let rel = ChartRelease::install(cp, &ns, &ns, &["crds.enabled=false"], &[]);
    assert_eq!(
        before,
        version(),
        "crds.enabled=false must leave the CRD alone"
    );
    let manifest = helm::helm(cp, &["get", "manifest", &rel.release, "-n", &ns]);
    assert!(
        !manifest.contains("CustomResourceDefinition"),
        "the CRD is not part of this release"
    );
    rel.uninstall();
    assert_eq!(before, version(), "nor does uninstall touch it");
}

/// The CRD is a template (crds.enabled, default on), so `helm upgrade` applies a changed CRD —
/// Helm never upgrades a chart's crds/ — and crds.keep (default on) leaves it on uninstall. On a
/// control plane of its own: the shared one's CRD belongs to kubectl.
#[test]
fn helm_upgrade_upgrades_the_crd_and_uninstall_keeps_it() {
    let cp = Box::leak(Box::new(
        support::control_plane::ControlPlane::start_dedicated(),
    ));
    let ns = cp.unique_namespace("helm-crd");
    let crd = |path: &str| {
        cp.kubectl(&[
            "get",
            "crd",
            "mailintegrations.mailintegration.dev",
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    let rel = ChartRelease::install(cp, &ns, &ns, &["crds.enabled=true"], &[]);
    assert_eq!(
        crd("{.metadata.annotations.helm\\.sh/resource-policy}"),
        "keep"
    );
    assert_eq!(
        crd("{.metadata.labels.app\\.kubernetes\\.io/managed-by}"),
        "Helm"
    );
    let columns = || crd("{.spec.versions[0].additionalPrinterColumns[*].name}");
    assert!(!columns().contains("UpgradeProbe"), "{}", columns());

    // The next chart version changes the CRD (a printer column more).
    let next = tempfile::tempdir().unwrap();
    let copy = next.path().join("mail-integration-operator");
    let status = Command::new("cp")
        .args(["-r", chart_dir().to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let file = copy.join("files/crds/mailintegration.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let marker = "additionalPrinterColumns:\n";
    let at = text.find(marker).expect("the CRD has printer columns");
    // The items sit at the key's own column (`  - additionalPrinterColumns:` then `    - jsonPath`).
    let column_of_key = text[..at].rsplit('\n').next().unwrap().len();
    let indent = " ".repeat(column_of_key);
    let column = format!(
        "{indent}- name: UpgradeProbe\n{indent}  type: string\n{indent}  jsonPath: .spec.provider\n"
    );
    let changed = format!(
        "{}{column}{}",
        &text[..at + marker.len()],
        &text[at + marker.len()..]
    );
    std::fs::write(&file, changed).unwrap();
    helm::helm(
        cp,
        &[
            "upgrade",
            &rel.release,
            copy.to_str().unwrap(),
            "--namespace",
            &ns,
            "--set",
            "crds.enabled=true",
        ],
    );
    assert!(
        columns().contains("UpgradeProbe"),
        "helm upgrade applied the changed CRD: {}",
        columns()
    );

    rel.uninstall();
    assert_eq!(
        crd("{.metadata.name}"),
        "mailintegrations.mailintegration.dev",
        "helm uninstall keeps the CRD (and so every MailIntegration)"
    );
}

// ---------------------------------------------------------------------------------------------
// RBAC: acting as the chart's ServiceAccount
// ---------------------------------------------------------------------------------------------

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[track_caller]
fn assert_forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) {
    match r {
        Err(e) if status_code(&e) == Some(403) => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[track_caller]
fn assert_allowed<T>(what: &str, r: Result<T, kube::Error>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: expected to be allowed, got {e}"))
}

fn example_integration(cp: &ControlPlane, ns: &str) {
    let example = repo().join("deploy/examples/google.yaml");
    cp.kubectl(&["apply", "-n", ns, "-f", example.to_str().unwrap()]);
}

fn secret(name: &str) -> Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"refresh_token": "test"}
    }))
    .unwrap()
}

/// One RBAC permission: (API group, resource, resource name or `*` for any, verb).
type Grant = (String, String, String, String);

fn grant(group: &str, resource: &str, name: &str, verb: &str) -> Grant {
    (group.into(), resource.into(), name.into(), verb.into())
}

/// The permissions of RBAC rules (a Role's or ClusterRole's `rules`), one per verb and name.
fn grants_of_rules(rules: &Value) -> BTreeSet<Grant> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        let mut names = strings(&rule["resourceNames"]);
        if names.is_empty() {
            names.push("*".into());
        }
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for n in &names {
                    for v in strings(&rule["verbs"]) {
                        out.insert(grant(&g, &r, n, &v));
                    }
                }
            }
        }
    }
    out
}

/// The permissions of the rendered Role or ClusterRole `name` (in namespace `ns`; "" for a ClusterRole).
fn rendered_grants(docs: &[Value], kind: &str, ns: &str, name: &str) -> BTreeSet<Grant> {
    let role = docs
        .iter()
        .find(|d| key(d) == (kind.to_owned(), ns.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("no {kind} {ns}/{name} among {:?}", kinds(docs)));
    grants_of_rules(&role["rules"])
}

/// The table of docs/install.md, "What the operator's ServiceAccount can do": the permissions of
/// the rows whose "where" column is one of `wheres`, with `<fullname>` filled in.
fn documented_grants(fullname: &str, wheres: &[&str]) -> BTreeSet<Grant> {
    const KNOWN: &[&str] = &["watched", "own", "own, leader election only"];
    let doc = std::fs::read_to_string(repo().join("docs/install.md")).unwrap();
    let section = doc
        .split("\n## What the operator's ServiceAccount can do\n")
        .nth(1)
        .expect("docs/install.md has the section \"What the operator's ServiceAccount can do\"");
    let section = section.split("\n## ").next().unwrap();
    let unquote = |c: &str| c.trim().trim_matches('`').replace("\"\"", "");
    let mut out = BTreeSet::new();
    let mut rows = 0;
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        assert_eq!(cells.len(), 6, "a row of six cells: {line}");
        let place = cells[0].trim();
        if place == "where" {
            continue;
        }
        assert!(
            KNOWN.contains(&place),
            "unknown \"where\" {place:?}: {line}"
        );
        rows += 1;
        if !wheres.contains(&place) {
            continue;
        }
        let names = cells[3].trim();
        let name = if names == "any" {
            "*".to_owned()
        } else {
            let quoted = names.split('`').nth(1).unwrap_or_else(|| panic!("{line}"));
            quoted.replace("<fullname>", fullname)
        };
        for verb in cells[4].split(',') {
            out.insert(grant(
                &unquote(cells[1]),
                &unquote(cells[2]),
                &name,
                verb.trim(),
            ));
        }
    }
    assert!(rows > 0, "no rows in the table");
    out
}

/// What the API server's authorizer lets the client do in `ns`, by a SelfSubjectRulesReview, less
/// the self-reviews every authenticated user may create (system:basic-user).
async fn effective_grants(client: &kube::Client, ns: &str) -> BTreeSet<Grant> {
    let review: SelfSubjectRulesReview =
        serde_json::from_value(serde_json::json!({"spec": {"namespace": ns}})).unwrap();
    let review = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectRulesReview");
    let status = review.status.expect("a rules review status");
    assert!(!status.incomplete, "incomplete rules review: {status:?}");
    let mut out = BTreeSet::new();
    for rule in status.resource_rules {
        let mut names = rule.resource_names.unwrap_or_default();
        if names.is_empty() {
            names.push("*".into());
        }
        for g in rule.api_groups.unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                let self_review = r.starts_with("selfsubject")
                    && (g == "authorization.k8s.io" || g == "authentication.k8s.io");
                if self_review {
                    continue;
                }
                for n in &names {
                    for v in &rule.verbs {
                        out.insert(grant(&g, &r, n, v));
                    }
                }
            }
        }
    }
    out
}

/// Whether the client may `verb` `group`/`resource`[/`subresource`] in `ns` (None: cluster-scoped, or
/// all namespaces), as the API server's authorizer answers a SelfSubjectAccessReview.
async fn can_i(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> bool {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {"resourceAttributes": {
            "verb": verb, "group": group, "resource": resource, "subresource": subresource,
            "namespace": ns.unwrap_or_default(),
        }}
    }))
    .unwrap();
    let review = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    review.status.expect("an access review status").allowed
}

/// What the chart's ServiceAccount must not be able to do wherever it is bound (`ns`: a namespace
/// where its rules apply): delete, touch workloads, configuration or identities, or reach RBAC to
/// give itself more. Asked of the authorizer, so each line is a yes/no of the real API server.
async fn assert_cannot_reach_beyond_its_job(sa: &kube::Client, ns: &str) {
    let namespaced: &[(&str, &str, &str)] = &[
        ("delete", "", "secrets"),
        ("deletecollection", "", "secrets"),
        ("create", "mailintegration.dev", "mailintegrations"),
        ("update", "mailintegration.dev", "mailintegrations"),
        ("delete", "mailintegration.dev", "mailintegrations"),
        (
            "deletecollection",
            "mailintegration.dev",
            "mailintegrations",
        ),
        ("update", "mailintegration.dev", "mailintegrations/status"),
        ("get", "", "pods"),
        ("create", "", "pods"),
        ("create", "", "pods/exec"),
        ("get", "", "configmaps"),
        ("update", "", "configmaps"),
        ("create", "", "serviceaccounts"),
        ("create", "", "serviceaccounts/token"),
        ("impersonate", "", "serviceaccounts"),
        ("get", "", "events"),
        ("create", "", "events"),
        ("patch", "apps", "deployments"),
        ("get", "rbac.authorization.k8s.io", "roles"),
        ("create", "rbac.authorization.k8s.io", "roles"),
        ("escalate", "rbac.authorization.k8s.io", "roles"),
        ("bind", "rbac.authorization.k8s.io", "roles"),
        ("create", "rbac.authorization.k8s.io", "rolebindings"),
        ("patch", "rbac.authorization.k8s.io", "rolebindings"),
        ("delete", "coordination.k8s.io", "leases"),
    ];
    for (verb, group, resource) in namespaced {
        assert!(
            !can_i(sa, verb, group, resource, Some(ns)).await,
            "the ServiceAccount may {verb} {group}/{resource} in {ns}"
        );
    }
    let cluster: &[(&str, &str, &str)] = &[
        ("list", "", "nodes"),
        ("list", "", "namespaces"),
        ("create", "", "namespaces"),
        ("impersonate", "", "users"),
        ("impersonate", "", "groups"),
        (
            "update",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
        ),
        ("create", "rbac.authorization.k8s.io", "clusterroles"),
        ("escalate", "rbac.authorization.k8s.io", "clusterroles"),
        ("bind", "rbac.authorization.k8s.io", "clusterroles"),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
        (
            "create",
            "certificates.k8s.io",
            "certificatesigningrequests",
        ),
    ];
    for (verb, group, resource) in cluster {
        assert!(
            !can_i(sa, verb, group, resource, None).await,
            "the ServiceAccount may {verb} {group}/{resource} cluster-wide"
        );
    }
    // And acted out: binding itself to cluster-admin is refused (RBAC's escalation check: it may
    // not grant what it does not hold, and it may not create RoleBindings at all).
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mio-escalate"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "Group", "name": "system:serviceaccounts"}]
    }))
    .unwrap();
    assert_forbidden(
        "bind the ServiceAccounts to cluster-admin",
        Api::<RoleBinding>::namespaced(sa.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await,
    );
}

/// The revokeOnDelete finalizer, written exactly as src/reconcile/finalizer.rs writes it (a merge
/// patch of metadata.finalizers with the resourceVersion), then removed again: allowed, and it
/// lands.
async fn assert_may_write_the_finalizer(mis: &Api<MailIntegration>, name: &str) {
    let rv = mis.get(name).await.unwrap().resource_version();
    let patch = |finalizers: Vec<&str>, rv: Option<String>| {
        Patch::Merge(serde_json::json!({
            "metadata": {"finalizers": finalizers, "resourceVersion": rv}
        }))
    };
    let added = assert_allowed(
        "add the revokeOnDelete finalizer",
        mis.patch(name, &PatchParams::default(), &patch(vec![FINALIZER], rv))
            .await,
    );
    assert_eq!(added.finalizers(), [FINALIZER], "the finalizer landed");
    let removed = assert_allowed(
        "remove the revokeOnDelete finalizer",
        mis.patch(
            name,
            &PatchParams::default(),
            &patch(vec![], added.resource_version()),
        )
        .await,
    );
    assert!(removed.finalizers().is_empty(), "the finalizer went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_with_watch_namespaces_is_least_privilege() {
    let (_cluster, cp) = exclusive_cluster();
    let watched = unique_namespace("rbac-watched");
    let watched2 = unique_namespace("rbac-watched2");
    let other = unique_namespace("rbac-other");
    let op = unique_namespace("rbac-op");
    let rel = ChartRelease::install(
        cp,
        &op,
        &op,
        &[
            &format!("watchNamespaces={{{watched},{watched2}}}"),
            "leaderElection.enabled=false",
        ],
        &["--skip-crds"],
    );
    example_integration(cp, &watched);
    example_integration(cp, &other);
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "someone-elses",
        "-n",
        &op,
        "--from-literal=k=v",
    ]);
    let sa = client_for(&rel.service_account_kubeconfig()).await;

    // --- what the operator does, in a watched namespace: allowed.
    let mis: Api<MailIntegration> = Api::namespaced(sa.clone(), &watched);
    let list = assert_allowed(
        "list MailIntegrations",
        mis.list(&ListParams::default()).await,
    );
    assert_eq!(
        list.items.iter().map(|m| m.name_any()).collect::<Vec<_>>(),
        ["support-inbox"]
    );
    let mut stream = Box::pin(assert_allowed(
        "watch MailIntegrations",
        mis.watch(&WatchParams::default().timeout(2), "0").await,
    ));
    use futures::StreamExt;
    match stream.next().await {
        Some(Ok(WatchEvent::Added(m))) => assert_eq!(m.name_any(), "support-inbox"),
        other => panic!("watch gave {other:?}"),
    }
    let mi = assert_allowed("get MailIntegration", mis.get("support-inbox").await);
    let status = serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
        "status": {
            "observedGeneration": mi.metadata.generation,
            "account": "support@example.com",
            "conditions": [{"type": "Ready", "status": "False", "reason": "SignInRequired",
                "message": "sign in", "lastTransitionTime": "2026-11-28T10:00:00Z"}]
        }
    });
    assert_allowed(
        "server-side apply MailIntegration status",
        mis.patch_status(
            "support-inbox",
            &PatchParams::apply("mail-integration-operator").force(),
            &Patch::Apply(&status),
        )
        .await,
    );
    let account = cp.kubectl(&[
        "get",
        "mailint",
        "support-inbox",
        "-n",
        &watched,
        "-o",
        "jsonpath={.status.account}",
    ]);
    assert_eq!(account, "support@example.com", "the status patch landed");

    let secrets: Api<Secret> = Api::namespaced(sa.clone(), &watched);
    let client_secret = assert_allowed("get the client Secret", secrets.get("gmail-client").await);
    assert!(client_secret.data.unwrap().contains_key("client_secret"));
    let metas = assert_allowed(
        "metadata-only list of Secrets",
        secrets.list_metadata(&ListParams::default()).await,
    );
    assert!(metas.items.iter().any(|m| m.name_any() == "gmail-client"));
    let mut meta_stream = Box::pin(assert_allowed(
        "metadata-only watch of Secrets",
        secrets
            .watch_metadata(&WatchParams::default().timeout(2), "0")
            .await,
    ));
    match meta_stream.next().await {
        Some(Ok(WatchEvent::Added(m))) => assert!(m.metadata.name.is_some()),
        other => panic!("metadata watch gave {other:?}"),
    }
    let created = assert_allowed(
        "create the grant Secret",
        secrets
            .create(&PostParams::default(), &secret("support-inbox-oauth-grant"))
            .await,
    );
    assert_allowed(
        "update the grant Secret (optimistic concurrency)",
        secrets
            .replace(
                "support-inbox-oauth-grant",
                &PostParams::default(),
                &created,
            )
            .await,
    );
    let token = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "support-inbox-token"},
        "stringData": {"access_token": "a"}
    });
    assert_allowed(
        "server-side apply the token Secret",
        secrets
            .patch(
                "support-inbox-token",
                &PatchParams::apply("mail-integration-operator").force(),
                &Patch::Apply(&token),
            )
            .await,
    );
    // Events exactly as the operator publishes them (events.k8s.io; a repeat becomes a patch).
    let recorder = Recorder::new(
        sa.clone(),
        Reporter {
            controller: "mail-integration-operator".into(),
            instance: Some("rbac-test".into()),
        },
    );
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "SignInRequired".into(),
        note: Some("sign in".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = mi.object_ref(&());
    assert_allowed(
        "create an event",
        recorder.publish(&event, &reference).await,
    );
    assert_allowed(
        "patch a repeated event",
        recorder.publish(&event, &reference).await,
    );
    let events = cp.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &watched,
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("SignInRequired"), "{events}");
    assert_may_write_the_finalizer(&mis, "support-inbox").await;
    // The second watched namespace too.
    let secrets2: Api<Secret> = Api::namespaced(sa.clone(), &watched2);
    assert_allowed(
        "list Secrets in the second watched namespace",
        secrets2.list_metadata(&ListParams::default()).await,
    );

    // --- own namespace: the sign-in key Secret (create, then get by name) only.
    let own: Api<Secret> = Api::namespaced(sa.clone(), &op);
    let key = format!("{}-sign-in-key", rel.fullname);
    assert_allowed(
        "create the sign-in key Secret",
        own.create(&PostParams::default(), &secret(&key)).await,
    );
    assert_allowed("get the sign-in key Secret", own.get(&key).await);
    assert_forbidden(
        "get another Secret in the operator's namespace",
        own.get("someone-elses").await,
    );
    assert_forbidden(
        "list Secrets in the operator's namespace",
        own.list_metadata(&ListParams::default()).await,
    );
    let leases: Api<Lease> = Api::namespaced(sa.clone(), &op);
    assert_forbidden(
        "get a Lease without leader election",
        leases.get(&format!("{}-leader", rel.fullname)).await,
    );

    // --- anything else: forbidden.
    let other_secrets: Api<Secret> = Api::namespaced(sa.clone(), &other);
    assert_forbidden(
        "get a Secret in a namespace not watched",
        other_secrets.get("gmail-client").await,
    );
    assert_forbidden(
        "list Secrets in a namespace not watched",
        other_secrets.list_metadata(&ListParams::default()).await,
    );
    assert_forbidden(
        "list Secrets in all namespaces",
        Api::<Secret>::all(sa.clone())
            .list_metadata(&ListParams::default())
            .await,
    );
    assert_forbidden(
        "list MailIntegrations in a namespace not watched",
        Api::<MailIntegration>::namespaced(sa.clone(), &other)
            .list(&ListParams::default())
            .await,
    );
    assert_forbidden(
        "list MailIntegrations in all namespaces",
        Api::<MailIntegration>::all(sa.clone())
            .list(&ListParams::default())
            .await,
    );
    assert_forbidden(
        "delete a Secret",
        secrets
            .delete("gmail-client", &DeleteParams::default())
            .await,
    );
    assert_forbidden(
        "delete a MailIntegration",
        mis.delete("support-inbox", &DeleteParams::default()).await,
    );
    let current = mis.get("support-inbox").await.unwrap();
    assert_forbidden(
        "update (PUT) a MailIntegration",
        mis.replace("support-inbox", &PostParams::default(), &current)
            .await,
    );
    let mut copy = current.clone();
    copy.metadata = kube::api::ObjectMeta {
        name: Some("created-by-the-operator".into()),
        ..Default::default()
    };
    assert_forbidden(
        "create a MailIntegration",
        mis.create(&PostParams::default(), &copy).await,
    );
    // What `patch` on mailintegrations (granted for the finalizer) allows beyond it, said plainly
    // in docs/install.md: RBAC cannot narrow a verb to metadata.finalizers, so a spec patch passes
    // authorization too (dry run: nothing changes). Should the chart ever block it (e.g. with a
    // ValidatingAdmissionPolicy), this fails and the docs must change with it.
    assert_allowed(
        "patch a MailIntegration's spec (dry run)",
        mis.patch(
            "support-inbox",
            &PatchParams {
                dry_run: true,
                ..Default::default()
            },
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await,
    );
    assert_forbidden(
        "list pods",
        Api::<Pod>::namespaced(sa.clone(), &watched)
            .list(&ListParams::default())
            .await,
    );
    let cms: Api<ConfigMap> = Api::namespaced(sa.clone(), &watched);
    assert_forbidden("list configmaps", cms.list(&ListParams::default()).await);
    assert_forbidden(
        "create a configmap",
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap(),
        )
        .await,
    );
    // kube-system, where the cluster's own credentials live: nothing at all.
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        &format!("rbac-ns-mode-{}", std::process::id()),
        "-n",
        "kube-system",
        "--from-literal=k=v",
    ]);
    let kube_system: Api<Secret> = Api::namespaced(sa.clone(), "kube-system");
    assert_forbidden(
        "get a Secret in kube-system",
        kube_system
            .get(&format!("rbac-ns-mode-{}", std::process::id()))
            .await,
    );
    assert_forbidden(
        "list Secrets in kube-system",
        kube_system.list_metadata(&ListParams::default()).await,
    );
    cp.kubectl(&[
        "delete",
        "secret",
        &format!("rbac-ns-mode-{}", std::process::id()),
        "-n",
        "kube-system",
    ]);

    // Exactly the documented rules, nowhere more: the authorizer's own list of what the
    // ServiceAccount may do in each namespace equals the table of docs/install.md.
    let n = rel.fullname.as_str();
    for ns in [&watched, &watched2] {
        assert_eq!(
            effective_grants(&sa, ns).await,
            documented_grants(n, &["watched"]),
            "what the ServiceAccount may do in watched namespace {ns}"
        );
        assert_cannot_reach_beyond_its_job(&sa, ns).await;
    }
    assert_eq!(
        effective_grants(&sa, &op).await,
        documented_grants(n, &["own"]),
        "what the ServiceAccount may do in its own namespace"
    );
    for ns in [other.as_str(), "kube-system", "default"] {
        assert_eq!(
            effective_grants(&sa, ns).await,
            BTreeSet::new(),
            "the ServiceAccount may do something in {ns}, a namespace it does not watch"
        );
    }

    // Core-group events are another resource than events.k8s.io ones.
    let core_events = kubectl_as(
        cp,
        &rel.service_account_kubeconfig(),
        &["get", "events", "-n", &watched],
    );
    assert!(!core_events.status.success());
    assert!(
        String::from_utf8_lossy(&core_events.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&core_events.stderr)
    );
    rel.uninstall();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_all_namespaces_with_leader_election() {
    let (_cluster, cp) = exclusive_cluster();
    let anywhere = unique_namespace("rbac-any");
    let op = unique_namespace("rbac-op-le");
    let rel = ChartRelease::install(cp, &op, &op, &["replicaCount=2"], &["--skip-crds"]);
    example_integration(cp, &anywhere);
    let sa = client_for(&rel.service_account_kubeconfig()).await;

    // Any namespace: MailIntegrations and Secrets as the operator uses them.
    let all = assert_allowed(
        "list MailIntegrations in all namespaces",
        Api::<MailIntegration>::all(sa.clone())
            .list(&ListParams::default())
            .await,
    );
    assert!(
        all.items
            .iter()
            .any(|m| m.namespace().as_deref() == Some(anywhere.as_str())),
        "the cluster-wide list holds the integration in {anywhere}"
    );
    assert_allowed(
        "metadata-only list of Secrets in all namespaces",
        Api::<Secret>::all(sa.clone())
            .list_metadata(&ListParams::default())
            .await,
    );
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), &anywhere);
    assert_allowed("get the client Secret", secrets.get("gmail-client").await);
    let mis: Api<MailIntegration> = Api::namespaced(sa.clone(), &anywhere);
    assert_may_write_the_finalizer(&mis, "support-inbox").await;

    // What docs/install.md says of a cluster-wide install, shown: the ServiceAccount reads any
    // Secret, kube-system's included, with its data (RBAC cannot limit it to the labelled ones).
    let name = format!("rbac-cluster-mode-{}", std::process::id());
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        &name,
        "-n",
        "kube-system",
        "--from-literal=token=cluster-credential",
    ]);
    let kube_system: Api<Secret> = Api::namespaced(sa.clone(), "kube-system");
    let read = assert_allowed(
        "get a Secret in kube-system (cluster-wide install)",
        kube_system.get(&name).await,
    );
    assert_eq!(read.data.unwrap()["token"].0, b"cluster-credential");
    let listed = assert_allowed(
        "list Secrets in kube-system with their data (cluster-wide install)",
        kube_system.list(&ListParams::default()).await,
    );
    assert!(
        listed
            .items
            .iter()
            .any(|s| s.name_any() == name && s.data.is_some()),
        "the full list holds the kube-system Secret's data"
    );
    cp.kubectl(&["delete", "secret", &name, "-n", "kube-system"]);

    // Exactly the documented rules: the watched ones everywhere, plus the own-namespace ones
    // (with leader election) in its namespace.
    let n = rel.fullname.as_str();
    for ns in [anywhere.as_str(), "kube-system"] {
        assert_eq!(
            effective_grants(&sa, ns).await,
            documented_grants(n, &["watched"]),
            "what the ServiceAccount may do in {ns}"
        );
        assert_cannot_reach_beyond_its_job(&sa, ns).await;
    }
    assert_eq!(
        effective_grants(&sa, &op).await,
        documented_grants(n, &["watched", "own", "own, leader election only"]),
        "what the ServiceAccount may do in its own namespace"
    );
    assert_forbidden(
        "delete a Secret",
        secrets
            .delete("gmail-client", &DeleteParams::default())
            .await,
    );
    assert_forbidden(
        "list pods in all namespaces",
        Api::<Pod>::all(sa.clone())
            .list(&ListParams::default())
            .await,
    );
    assert_forbidden(
        "list configmaps in all namespaces",
        Api::<ConfigMap>::all(sa.clone())
            .list(&ListParams::default())
            .await,
    );

    // Leader election: its own Lease only.
    let leases: Api<Lease> = Api::namespaced(sa.clone(), &op);
    let lease_name = format!("{}-leader", rel.fullname);
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": lease_name},
        "spec": {"holderIdentity": "pod-0", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    let created = assert_allowed(
        "create the Lease",
        leases.create(&PostParams::default(), &lease).await,
    );
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().holder_identity = Some("pod-1".into());
    assert_allowed(
        "update the Lease",
        leases
            .replace(&lease_name, &PostParams::default(), &renewed)
            .await,
    );
    assert_allowed("get the Lease", leases.get(&lease_name).await);
    assert_forbidden(
        "delete the Lease",
        leases.delete(&lease_name, &DeleteParams::default()).await,
    );
    let mut foreign = lease.clone();
    foreign.metadata.name = Some("someone-elses-lease".into());
    cp.kubectl_stdin(
        &["apply", "-n", &op, "-f", "-"],
        &serde_json::to_string(&foreign).unwrap(),
    );
    assert_forbidden("get another Lease", leases.get("someone-elses-lease").await);
    assert_forbidden(
        "create a Lease in another namespace",
        Api::<Lease>::namespaced(sa.clone(), &anywhere)
            .create(&PostParams::default(), &lease)
            .await,
    );
    rel.uninstall();
}

// ---------------------------------------------------------------------------------------------
// Pod Security: the chart's pods meet the "restricted" level
// ---------------------------------------------------------------------------------------------

#[test]
fn chart_deployment_meets_restricted_pod_security() {
    let (_cluster, cp) = exclusive_cluster();
    let ns = unique_namespace("psa");
    cp.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/warn=restricted",
    ]);
    let dry_run = |set: &[&str]| {
        let mut set = set.to_vec();
        set.push("rbac.create=false");
        set.push("serviceAccount.create=false");
        set.push("serviceAccount.name=default");
        let manifest = helm::template("psa", &ns, &set);
        let out = cp.kubectl_stdin(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            &manifest,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let warnings = dry_run(&[]);
    assert!(
        !warnings.contains("PodSecurity"),
        "the chart's Deployment violates the restricted level:\n{warnings}"
    );
    // The check can fail: a weakened security context draws the warning.
    let warnings = dry_run(&["securityContext.allowPrivilegeEscalation=true"]);
    assert!(
        warnings.contains("would violate PodSecurity \"restricted:latest\"")
            && warnings.contains("allowPrivilegeEscalation"),
        "{warnings}"
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus alerts (promtool from Debian's prometheus package)
// ---------------------------------------------------------------------------------------------

fn tool(name: &str, debian_package: &str) -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .expect("sh");
    assert!(
        found.status.success(),
        "{name} is missing: apt-get install {debian_package} (tools/test.sh installs it)"
    );
    PathBuf::from(String::from_utf8_lossy(&found.stdout).trim())
}

#[test]
fn prometheus_alerts_fire_as_documented() {
    let promtool = tool("promtool", "prometheus");
    let docs = yaml_docs(&helm::template(
        "mio",
        "ops",
        &[
            "prometheusRule.enabled=true",
            "prometheusRule.additionalAlertLabels.team=mail",
            "prometheusRule.signInRequiredFor=20m",
        ],
    ));
    let rule = find(&docs, "PrometheusRule", "mio-mail-integration-operator");
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, serde_saphyr::to_string(&rule["spec"]).unwrap()).unwrap();
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Synthetic series (one sample a minute); time() starts at 0 in promtool tests. The operator's
    // series as it serves them (per object, read from its cache), one replica (instance a) until a
    // second one (b) also serves them from minute 20, as in a leader hand-over.
    // - mail/ok refreshes: its expiry keeps moving ahead of the clock; its mailbox check fails
    //   from minute 11 -> MailboxCheckFailing from 21 m (for: 10m);
    //   Its next refresh is announced 600 s before each expiry.
    // - mail/stuck: expiry fixed at 1200 s, its refresh due at 600 s and never done -> half of its
    //   600 s margin is gone at 900 s -> TokenExpiring from 900 s (+1m for: 16m); Ready=False with
    //   reason GrantRevoked all along -> NotReady (critical) from 15 m, once, by name;
    // - mail/short: refreshBefore 1m, 10-minute tokens, refreshed on time every 9 minutes: never
    //   TokenExpiring (a fixed 300 s threshold fired from minute 6 of every cycle);
    // - mail/paused: suspended, its token long expired and its last announced refresh still
    //   exported, Ready=False with reason Suspended -> neither TokenExpiring nor NotReady;
    // - mail/fresh: waits for its first sign-in (SignInRequired) -> not NotReady, but
    //   SignInRequired (warning) after signInRequiredFor (20m here);
    // - mail/ok's grant ends (as Google announced) at 2 days + 600 s: inside the 2-day window
    //   after minute 10 -> GrantEnding from 21 m (for: 10m); mail/paused's (suspended) never;
    // - the operator's target is down from minute 10;
    // - mail/ok's client secret expires at 30 days + 600 s: inside the 30-day window after minute
    //   10 -> ClientSecretExpiringSoon from 21 m (for: 10m).
    let runbooks =
        "https://github.com/mail-integration-operator/mail-integration-operator/blob/main/docs";
    let test = format!(
        r#"rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mailintegration_access_token_expiry_timestamp_seconds{{namespace="mail",name="ok",instance="a"}}'
        values: '3600+60x40'
      - series: 'mailintegration_access_token_expiry_timestamp_seconds{{namespace="mail",name="stuck",instance="a"}}'
        values: '1200x40'
      - series: 'mailintegration_access_token_expiry_timestamp_seconds{{namespace="mail",name="short",instance="a"}}'
        values: '600x8 1140x8 1680x8 2220x8 2760x4'
      - series: 'mailintegration_access_token_expiry_timestamp_seconds{{namespace="mail",name="paused",instance="a"}}'
        values: '100x40'
      - series: 'mailintegration_next_refresh_timestamp_seconds{{namespace="mail",name="ok",instance="a"}}'
        values: '3000+60x40'
      - series: 'mailintegration_next_refresh_timestamp_seconds{{namespace="mail",name="stuck",instance="a"}}'
        values: '600x40'
      - series: 'mailintegration_next_refresh_timestamp_seconds{{namespace="mail",name="short",instance="a"}}'
        values: '540x8 1080x8 1620x8 2160x8 2700x4'
      - series: 'mailintegration_next_refresh_timestamp_seconds{{namespace="mail",name="paused",instance="a"}}'
        values: '40x40'
      - series: 'mailintegration_suspended{{namespace="mail",name="ok",instance="a"}}'
        values: '0x40'
      - series: 'mailintegration_suspended{{namespace="mail",name="stuck",instance="a"}}'
        values: '0x40'
      - series: 'mailintegration_suspended{{namespace="mail",name="short",instance="a"}}'
        values: '0x40'
      - series: 'mailintegration_suspended{{namespace="mail",name="fresh",instance="a"}}'
        values: '0x40'
      - series: 'mailintegration_suspended{{namespace="mail",name="paused",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_status{{namespace="mail",name="paused",condition="False",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_reason_info{{namespace="mail",name="paused",reason="Suspended",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_status{{namespace="mail",name="fresh",condition="False",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_reason_info{{namespace="mail",name="fresh",reason="SignInRequired",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_status{{namespace="mail",name="ok",condition="False",instance="a"}}'
        values: '0x40'
      - series: 'mailintegration_ready_reason_info{{namespace="mail",name="ok",reason="Ready",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_status{{namespace="mail",name="stuck",condition="False",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_reason_info{{namespace="mail",name="stuck",reason="GrantRevoked",instance="a"}}'
        values: '1x40'
      - series: 'mailintegration_ready_status{{namespace="mail",name="stuck",condition="False",instance="b"}}'
        values: '_x20 1x20'
      - series: 'mailintegration_ready_reason_info{{namespace="mail",name="stuck",reason="GrantRevoked",instance="b"}}'
        values: '_x20 1x20'
      - series: 'mailintegration_mailbox_connected_status{{namespace="mail",name="ok",condition="False",instance="a"}}'
        values: '0x10 1x30'
      - series: 'up{{job="mio-mail-integration-operator-metrics",namespace="ops"}}'
        values: '1x10 0x30'
      - series: 'mailintegration_client_secret_expiry_timestamp_seconds{{namespace="mail",name="ok",instance="a"}}'
        values: '2592600x40'
      - series: 'mailintegration_grant_expiry_timestamp_seconds{{namespace="mail",name="ok",instance="a"}}'
        values: '173400x40'
      - series: 'mailintegration_grant_expiry_timestamp_seconds{{namespace="mail",name="paused",instance="a"}}'
        values: '1000x40'
    alert_rule_test:
      - eval_time: 8m
        alertname: MailIntegrationTokenExpiring
        exp_alerts: []
      - eval_time: 10m
        alertname: MailIntegrationTokenExpiring
        exp_alerts: []
      - eval_time: 17m
        alertname: MailIntegrationTokenExpiring
        exp_alerts:
          - exp_labels: {{severity: critical, team: mail, namespace: mail, name: stuck}}
            exp_annotations:
              summary: "Access token of MailIntegration mail/stuck expires without a successful refresh"
              description: "The published access token expires in 3m 0s (negative: already expired). Mail workloads using it will fail to authenticate. See: kubectl mailint status -n mail stuck"
              runbook_url: "{runbooks}/reasons.md#tokenexpired"
      - eval_time: 10m
        alertname: MailIntegrationNotReady
        exp_alerts: []
      - eval_time: 16m
        alertname: MailIntegrationNotReady
        exp_alerts: &not_ready
          - exp_labels: {{severity: critical, team: mail, namespace: mail, name: stuck, reason: GrantRevoked}}
            exp_annotations:
              summary: "MailIntegration mail/stuck is not Ready: GrantRevoked"
              description: "Ready=False with reason GrantRevoked. What happened and what to do: kubectl mailint explain GrantRevoked; the full picture: kubectl mailint status -n mail stuck"
              runbook_url: "{runbooks}/reasons.md#grantrevoked"
      - eval_time: 30m
        alertname: MailIntegrationNotReady
        exp_alerts: *not_ready
      - eval_time: 35m
        alertname: MailIntegrationTokenExpiring
        exp_alerts:
          - exp_labels: {{severity: critical, team: mail, namespace: mail, name: stuck}}
            exp_annotations:
              summary: "Access token of MailIntegration mail/stuck expires without a successful refresh"
              description: "The published access token expires in -15m 0s (negative: already expired). Mail workloads using it will fail to authenticate. See: kubectl mailint status -n mail stuck"
              runbook_url: "{runbooks}/reasons.md#tokenexpired"
      - eval_time: 19m
        alertname: MailIntegrationSignInRequired
        exp_alerts: []
      - eval_time: 21m
        alertname: MailIntegrationSignInRequired
        exp_alerts:
          - exp_labels: {{severity: warning, team: mail, namespace: mail, name: fresh}}
            exp_annotations:
              summary: "MailIntegration mail/fresh waits for its first sign-in"
              description: "Nobody has signed in yet. Open the link it offers and sign in as the mailbox: kubectl mailint sign-in -n mail fresh"
              runbook_url: "{runbooks}/reasons.md#signinrequired"
      - eval_time: 20m
        alertname: MailIntegrationMailboxCheckFailing
        exp_alerts: []
      - eval_time: 22m
        alertname: MailIntegrationMailboxCheckFailing
        exp_alerts:
          - exp_labels: {{severity: warning, team: mail, namespace: mail, name: ok}}
            exp_annotations:
              summary: "Mailbox check of MailIntegration mail/ok is failing"
              description: "The mail server refuses the access token or cannot be reached. The MailboxConnected condition says why: kubectl mailint status -n mail ok"
              runbook_url: "{runbooks}/reasons.md#the-mailbox-check"
      - eval_time: 20m
        alertname: MailIntegrationClientSecretExpiringSoon
        exp_alerts: []
      - eval_time: 22m
        alertname: MailIntegrationClientSecretExpiringSoon
        exp_alerts:
          - exp_labels: {{severity: warning, team: mail, namespace: mail, name: ok}}
            exp_annotations:
              summary: "The client secret of MailIntegration mail/ok expires soon"
              description: "The client secret expires in 29d 23h 48m 0s (negative: already expired). Create a new one at the provider, put it into the client Secret and update the annotation mailintegration.dev/client-secret-expires."
              runbook_url: "{runbooks}/reasons.md#clientsecretexpiringsoon"
      - eval_time: 20m
        alertname: MailIntegrationGrantEnding
        exp_alerts: []
      - eval_time: 22m
        alertname: MailIntegrationGrantEnding
        exp_alerts:
          - exp_labels: {{severity: warning, team: mail, namespace: mail, name: ok}}
            exp_annotations:
              summary: "The grant of MailIntegration mail/ok ends soon"
              description: "The provider ends this grant in 1d 23h 48m 0s (negative: already ended): sign in again (kubectl mailint sign-in -n mail ok), or publish a Google app in Testing status and sign in once more."
              runbook_url: "{runbooks}/reasons.md#testingappgrantexpired"
      - eval_time: 12m
        alertname: MailIntegrationOperatorDown
        exp_alerts: []
      - eval_time: 16m
        alertname: MailIntegrationOperatorDown
        exp_alerts:
          - exp_labels: {{severity: critical, team: mail}}
            exp_annotations:
              summary: "mail-integration-operator is down"
              description: "No mail-integration-operator pod has been scraped successfully for 5 minutes; access tokens are not being refreshed."
              runbook_url: "{runbooks}/troubleshooting.md#the-operator-is-down"
"#,
        rules = rules.display()
    );
    // Only label sets a running operator serves (checked against a scrape in tests/cli.rs).
    let mut used = std::collections::BTreeSet::new();
    for line in test.lines() {
        let Some(series) = line.trim().strip_prefix("- series: '") else {
            continue;
        };
        let (name, labels) = support::alert_series::series_labels(series.trim_end_matches('\''))
            .unwrap_or_else(|| panic!("unreadable series {series}"));
        if name == "up" {
            continue;
        }
        let labels: Vec<&str> = labels
            .iter()
            .map(String::as_str)
            .filter(|l| *l != "instance")
            .collect();
        let served = support::alert_series::ALERT_INPUTS
            .iter()
            .chain(support::alert_series::ALERT_INPUTS_NOT_SCRAPED)
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not among the series the operator serves"));
        assert_eq!(
            labels, served.1,
            "{name}: labels the operator does not serve"
        );
        used.insert(name);
    }
    assert_eq!(
        used.len(),
        support::alert_series::ALERT_INPUTS.len()
            + support::alert_series::ALERT_INPUTS_NOT_SCRAPED.len(),
        "every served series the alerts read has input: {used:?}"
    );
    let test_file = dir.path().join("test.yaml");
    std::fs::write(&test_file, test).unwrap();
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Argo CD health check (Lua 5.1, the language of Argo CD's gopher-lua)
// ---------------------------------------------------------------------------------------------

/// A YAML value as a Lua table constructor, as Argo CD hands objects to health scripts.
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("[{:?}] = {}", k, lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[test]
fn argocd_health_check_passes_its_test_cases() {
    let lua = tool("lua5.1", "lua5.1");
    let dir = repo().join("docs/gitops/argocd/mailintegration.dev/MailIntegration");
    let script = std::fs::read_to_string(dir.join("health.lua")).unwrap();
    let tests: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
            .unwrap();
    let cases = tests["tests"].as_array().unwrap();
    assert!(cases.len() >= 8, "every branch has a case");
    let mut statuses = BTreeSet::new();
    for case in cases {
        let input = case["inputPath"].as_str().unwrap();
        let obj: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(dir.join(input)).unwrap()).unwrap();
        let program = format!(
            "obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
            lua_literal(&obj)
        );
        let out = Command::new(&lua).args(["-e", &program]).output().unwrap();
        assert!(
            out.status.success(),
            "{input}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (status, message) = stdout.split_once('\n').unwrap();
        assert_eq!(
            (status, message),
            (
                case["healthStatus"]["status"].as_str().unwrap(),
                case["healthStatus"]["message"].as_str().unwrap()
            ),
            "{input}"
        );
        statuses.insert(status.to_owned());
    }
    assert_eq!(
        statuses,
        ["Degraded", "Healthy", "Progressing", "Suspended"]
            .map(String::from)
            .into(),
        "the cases cover every status the script returns"
    );
    // docs/gitops.md shows the same script.
    let doc = std::fs::read_to_string(repo().join("docs/gitops.md")).unwrap();
    let indented: String = script
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_owned()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    assert!(
        doc.contains(&indented),
        "docs/gitops.md must embed health.lua verbatim (indented by 4 under the argocd-cm key)"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerfile_passes_hadolint() {
    let out = Command::new("bash")
        .arg(repo().join("tools/hadolint.sh"))
        .env("MIO_NO_INSTALL", "1")
        .current_dir(repo())
        .output()
        .expect("run tools/hadolint.sh");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("FROM gcr.io/distroless/static-debian12:nonroot"));
    assert!(dockerfile.contains("USER 65532:65532"));
}

/// The image builds from what the Dockerfile copies, not from the whole checkout: the files its
/// build stage COPYs from the context (after `.dockerignore`) are copied into a temp dir as the
/// image lays them out, and there cargo must read the manifest, find every target it declares
/// (`cargo fetch`: `cargo metadata` does not look for target files, so a missing `benches/` passes
/// it) and resolve the lock offline (`--locked`); every file the library and
/// binaries read at compile time (`include_str!`, `include_bytes!`, `#[path]`) must be among the
/// copied files. A new top-level file the manifest needs then fails this test, not a user's
/// `docker build`. Not a release build: compiling the binary from scratch in that dir takes longer
/// than this whole test binary on a 2-core CI machine, and the rest of the suite builds the same
/// sources from the checkout.
#[test]
fn dockerfile_context_holds_what_cargo_needs() {
    let root = tempfile::tempdir().unwrap();
    let (workdir, copied) = docker_context::materialize(repo(), root.path(), "cargo build");
    assert!(
        copied.iter().any(|f| f == "Cargo.lock") && copied.iter().any(|f| f == "src/main.rs"),
        "{copied:?}"
    );
    let top: BTreeSet<&str> = copied
        .iter()
        .map(|f| f.split('/').next().unwrap())
        .collect();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |args: &[&str]| {
        let out = Command::new(&cargo)
            .args(args)
            .current_dir(&workdir)
            // Not the checkout's target dir or config: only what the image has.
            .env("CARGO_TARGET_DIR", root.path().join("target"))
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "cargo {} in the Dockerfile's context (it holds {top:?}):\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    // Offline, and for this machine's platform only: the crates a build here has downloaded (a
    // clean CI machine has no others; the image's musl targets use the same crates).
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc).arg("-vV").output().expect("rustc -vV");
    let host = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    run(&["fetch", "--locked", "--offline", "--target", &host]);
    // The targets as cargo reads them from the manifest (no dependency needed).
    let meta: Value = serde_json::from_slice(&run(&[
        "metadata",
        "--no-deps",
        "--offline",
        "--format-version",
        "1",
    ]))
    .unwrap();
    // The sources of the library and the binaries: what `cargo build --bin` compiles.
    let package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mail-integration-operator")
        .expect("the crate in cargo metadata");
    let mut dirs = BTreeSet::new();
    for t in package["targets"].as_array().unwrap() {
        let kinds = t["kind"].as_array().unwrap();
        if kinds.iter().any(|k| k == "lib" || k == "bin") {
            let src = PathBuf::from(t["src_path"].as_str().unwrap());
            dirs.insert(src.parent().unwrap().to_path_buf());
        }
    }
    let ctx = workdir.canonicalize().unwrap();
    let mut reads = 0;
    for dir in dirs {
        for file in docker_context::rust_files(&dir) {
            let text = std::fs::read_to_string(&file).unwrap();
            for read in docker_context::compile_time_reads(&file, &text, &workdir) {
                reads += 1;
                let found = read.canonicalize().ok().filter(|p| p.starts_with(&ctx));
                assert!(
                    found.is_some(),
                    "{} reads {} at compile time, which the Dockerfile does not copy",
                    file.strip_prefix(&workdir).unwrap_or(&file).display(),
                    read.display()
                );
            }
        }
    }
    // src/reconcile/decide.rs has `#[path = "decide_tests.rs"]`: the scan sees the sources.
    assert!(
        reads > 0,
        "no compile-time read found in the copied sources"
    );
}

/// The control plane, for one test at a time: these tests install, apply and compare the one
/// cluster-wide CRD (and ClusterRoles), so running them side by side would make each see the
/// others' writes.
fn exclusive_cluster() -> (
    std::sync::MutexGuard<'static, ()>,
    &'static support::control_plane::ControlPlane,
) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    (guard, ensure_crd())
}

/// The aggregated roles let a namespace's users work with MailIntegrations (view: read; edit:
/// change) and nothing more — no Secret access — checked by the API server's own authorizer, bound
/// directly; and kube-controller-manager's aggregation puts them into Kubernetes' own `view` and
/// `edit`, so that a user bound to those gets them. The opt-in NetworkPolicy and the `helm test`
/// Pod are accepted by the API server.
#[test]
fn aggregated_roles_grant_mailintegrations_only_and_the_extras_are_valid() {
    let cp = ensure_crd();
    let rel = ChartRelease::install_in_new_namespace(
        cp,
        "aggregate",
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
        ],
    );
    let n = &rel.fullname;
    let team = unique_namespace("team");
    for (user, role) in [("viewer", "view"), ("editor", "edit")] {
        cp.kubectl(&[
            "create",
            "rolebinding",
            user,
            "-n",
            &team,
            &format!("--clusterrole={n}-{role}"),
            &format!("--user={user}"),
        ]);
    }
    let can = |user: &str, verb: &str, resource: &str| {
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        let sub = format!("--subresource={sub}");
        let mut args = vec!["auth", "can-i", verb, resource, "-n", &team];
        let as_user = format!("--as={user}");
        args.push(&as_user);
        if sub != "--subresource=" {
            args.push(&sub);
        }
        let out = cp.kubectl_output(&args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can(
        "viewer",
        "list",
        "mailintegrations.mailintegration.dev"
    ));
    assert!(!can(
        "viewer",
        "create",
        "mailintegrations.mailintegration.dev"
    ));
    assert!(can(
        "editor",
        "create",
        "mailintegrations.mailintegration.dev"
    ));
    assert!(can(
        "editor",
        "delete",
        "mailintegrations.mailintegration.dev"
    ));
    // Kubernetes' own roles, filled by the ClusterRole aggregation controller.
    for (user, role) in [("k8s-viewer", "view"), ("k8s-editor", "edit")] {
        cp.kubectl(&[
            "create",
            "rolebinding",
            user,
            "-n",
            &team,
            &format!("--clusterrole={role}"),
            &format!("--user={user}"),
        ]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(can("k8s-viewer", "list", "mailintegrations.mailintegration.dev")
        && can(
            "k8s-editor",
            "create",
            "mailintegrations.mailintegration.dev",
        ))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the chart's roles were not aggregated into view and edit within 60 s.\n--- kube-controller-manager ---\n{}",
            cp.controller_manager_log_tail(30)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(!can(
        "k8s-viewer",
        "create",
        "mailintegrations.mailintegration.dev"
    ));
    assert!(
        !can("k8s-viewer", "get", "secrets"),
        "view reads no Secrets"
    );
    for user in ["viewer", "editor"] {
        assert!(!can(user, "get", "secrets"), "{user} reads no Secrets");
        assert!(
            !can(user, "patch", "mailintegrations.mailintegration.dev/status"),
            "{user} writes no status"
        );
    }
    let policy = cp.kubectl(&[
        "get",
        "networkpolicy",
        n,
        "-n",
        &rel.namespace,
        "-o",
        "jsonpath={.spec.ingress[1].from[0].namespaceSelector.matchLabels.name}",
    ]);
    assert_eq!(policy, "monitoring");
    // The helm test Pod is valid for the API server (it is created by `helm test`, never run here).
    let pod = helm::helm(cp, &["get", "hooks", &rel.release, "-n", &rel.namespace]);
    let check = cp.kubectl_stdin(
        &[
            "create",
            "--dry-run=server",
            "-n",
            &rel.namespace,
            "-f",
            "-",
        ],
        &pod,
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        pod.contains(&format!("http://{n}-metrics:9090/readyz")),
        "{pod}"
    );
    rel.uninstall();
}
