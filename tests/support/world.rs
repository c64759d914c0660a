//! One integration test's world: its namespace, its operator process (watching only that
//! namespace), a fault proxy in front of the OAuth server's token endpoint, and helpers to create the
//! Secrets and MailIntegrations a user would.

use super::{
    control_plane::ControlPlane, ensure_crd, fault_proxy::FaultProxy, helm::ChartRelease,
    oauth::OAuthServer, operator::Operator, unique_namespace,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use mail_integration_operator::api::MailIntegration;
use std::time::{Duration, Instant};

pub struct Env {
    pub cp: &'static ControlPlane,
    pub ns: String,
    pub client: kube::Client,
    pub proxy: FaultProxy,
    pub server: &'static OAuthServer,
    pub log_dir: tempfile::TempDir,
    /// Environment variables every operator of this world starts with (e.g. a test-only setting
    /// such as `MIO_TEST_PROTOCOL_SCALE`).
    pub operator_env: Vec<(&'static str, String)>,
}

impl Env {
    pub async fn new(prefix: &str, server: &'static OAuthServer) -> Self {
        let cp = ensure_crd();
        let ns = unique_namespace(prefix);
        Self::with(cp, ns, server).await
    }

    /// A world on another control plane (one a test may stop and start), whose CRD is installed.
    pub async fn new_on(
        cp: &'static ControlPlane,
        prefix: &str,
        server: &'static OAuthServer,
    ) -> Self {
        let ns = cp.unique_namespace(prefix);
        Self::with(cp, ns, server).await
    }

    async fn with(cp: &'static ControlPlane, ns: String, server: &'static OAuthServer) -> Self {
        let proxy = FaultProxy::start(&server.base_url);
        let client = cp.client().await;
        let log_dir = tempfile::Builder::new()
            .prefix("mio-operator-")
            .tempdir()
            .unwrap();
        Env {
            cp,
            ns,
            client,
            proxy,
            server,
            log_dir,
            operator_env: Vec::new(),
        }
    }

    pub fn operator(&self, name: &str) -> Operator {
        self.operator_with(name, &[])
    }

    /// The operator with extra `run` flags, as an API user of its own (so that
    /// [`Operator::api_requests`] can tell its requests from everyone else's).
    pub fn operator_with(&self, name: &str, extra: &[&str]) -> Operator {
        let user = self.cp.operator_user();
        let mut op = self.operator_with_kubeconfig(name, &user.kubeconfig, extra);
        op.api_user = Some(user);
        op
    }

    /// The operator with another kubeconfig (e.g. one of an
    /// [`ApiProxy`](super::api_proxy::ApiProxy), written by its `kubeconfig`) and extra `run` flags.
    pub fn operator_with_kubeconfig(
        &self,
        name: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> Operator {
        let mut args = vec!["--namespace", &self.ns];
        args.extend_from_slice(extra);
        Operator::start_with_env(
            name,
            kubeconfig,
            &args,
            &self.operator_env,
            self.log_dir.path(),
        )
    }

    /// The operator as the chart runs it: a release of the chart in a namespace of its own,
    /// watching this world's namespace (`set`: more `--set` values), and the operator process with
    /// the Deployment's own args (but for the listen addresses: the test reserves ports) plus
    /// `extra`, the downward-API env, and a kubeconfig of the chart's ServiceAccount. Every API call
    /// it makes is then checked against exactly the RBAC the chart grants.
    pub fn operator_as_chart(
        &self,
        name: &str,
        set: &[&str],
        extra: &[&str],
    ) -> (ChartRelease<'static>, Operator) {
        let op_ns = unique_namespace(&format!("{name}-release"));
        let watch = format!("watchNamespaces={{{}}}", self.ns);
        let mut values = vec![watch.as_str()];
        values.extend_from_slice(set);
        let release = ChartRelease::install(self.cp, &op_ns, &op_ns, &values, &["--skip-crds"]);
        let kubeconfig = release.service_account_kubeconfig();
        let args: Vec<String> = release.operator_args();
        assert!(
            args.iter().any(|a| a.contains(&self.ns)),
            "the chart passes the watched namespace: {args:?}"
        );
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let mut env = release.operator_env();
        env.extend(self.operator_env.iter().cloned());
        let op = Operator::start_with_env(name, &kubeconfig, &args, &env, self.log_dir.path());
        (release, op)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn integrations(&self) -> Api<MailIntegration> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Create or replace a Secret as a user would, marked the way the operator asks: a grant
    /// brought by hand (`<integration>-oauth-grant`) names its integration, any other Secret
    /// (client, CA bundle) carries the opt-in label.
    /// A client Secret also names the servers its credentials may go to (the annotation
    /// `mailintegration.dev/oauth-servers`): this world's proxy and OAuth server.
    pub async fn put_secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let (labels, annotations) = match name.strip_suffix("-oauth-grant") {
            Some(integration) => (
                serde_json::json!({"mailintegration.dev/integration": integration}),
                serde_json::json!({}),
            ),
            None => (
                serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
                serde_json::json!({"mailintegration.dev/oauth-servers": self.oauth_servers()}),
            ),
        };
        self.put_secret_with(name, pairs, labels, annotations).await
    }

    /// The value of a client Secret's `mailintegration.dev/oauth-servers` in this world.
    pub fn oauth_servers(&self) -> String {
        format!("{},{}", self.proxy.url(), self.server.base_url)
    }

    /// Create or replace a Secret with exactly `labels` (an object; `{}` for none).
    pub async fn put_secret_labelled(
        &self,
        name: &str,
        pairs: &[(&str, &str)],
        labels: serde_json::Value,
    ) {
        self.put_secret_with(name, pairs, labels, serde_json::json!({}))
            .await
    }

    /// Create or replace a Secret with exactly `labels` and `annotations` (objects).
    pub async fn put_secret_with(
        &self,
        name: &str,
        pairs: &[(&str, &str)],
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "stringData": pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .unwrap();
        let api = self.secrets();
        match api.get_opt(name).await.unwrap() {
            Some(_) => {
                api.replace(
                    name,
                    &PostParams::default(),
                    &Secret {
                        metadata: kube::api::ObjectMeta {
                            resource_version: api
                                .get(name)
                                .await
                                .unwrap()
                                .metadata
                                .resource_version,
                            ..secret.metadata.clone()
                        },
                        ..secret
                    },
                )
                .await
                .unwrap();
            }
            None => {
                api.create(&PostParams::default(), &secret).await.unwrap();
            }
        }
    }

    pub async fn client_secret(&self, secret: &str) {
        self.put_secret(
            "client",
            &[
                ("client_id", self.server.client_id()),
                ("client_secret", secret),
            ],
        )
        .await;
    }

    /// Sign in at the OAuth server (its own login and consent forms) and bring the refresh token.
    pub async fn grant(&self, name: &str, login: &str) -> String {
        let grant = self.server.obtain_grant(login).await;
        let rt = grant.refresh_token().to_owned();
        self.put_secret(&format!("{name}-oauth-grant"), &[("refresh_token", &rt)])
            .await;
        rt
    }

    /// The client Secret, a grant of alice brought by hand and an integration `name` for her
    /// mailbox, once it went Ready with its first refresh; the grant's refresh token (the test knows
    /// it).
    pub async fn ready_integration(&self, op: &Operator, name: &str) -> String {
        self.client_secret(self.server.client_secret()).await;
        let rt = self.grant(name, "alice").await;
        self.integration(name, "alice@example.test").await;
        self.wait_for(name, "Ready=True", Duration::from_secs(30), op, is_ready)
            .await;
        rt
    }

    pub async fn integration(&self, name: &str, address: &str) {
        self.integration_with(name, address, serde_json::json!({}))
            .await
    }

    /// An OIDC integration whose token endpoint is this world's fault proxy; `extra` is merged into
    /// the spec (objects merge one level deep: `{"mailbox": {...}}` adds to the mailbox).
    pub async fn integration_with(&self, name: &str, address: &str, extra: serde_json::Value) {
        let mut spec = serde_json::json!({
            "provider": "OIDC",
            "mailbox": {"address": address},
            "oauth": {
                "clientSecretRef": {"name": "client"},
                "redirectURL": "http://127.0.0.1:8080/oauth2/callback",
                "endpoints": {
                    "authorization": format!("{}/auth", self.proxy.url()),
                    "token": self.proxy.token_url(),
                    "revocation": format!("{}/token/revocation", self.proxy.url()),
                },
            },
            "tokenSecret": {"name": format!("{name}-token")},
            "refreshBefore": "1m",
        });
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            match (
                spec.get_mut(&k).and_then(|x| x.as_object_mut()),
                v.as_object(),
            ) {
                (Some(into), Some(from)) => into.extend(from.clone()),
                _ => {
                    spec[&k] = v;
                }
            }
        }
        self.integrations()
            .create(&PostParams::default(), &mail_integration(name, spec))
            .await
            .unwrap();
    }

    pub async fn get(&self, name: &str) -> MailIntegration {
        self.integrations().get(name).await.unwrap()
    }

    /// Wait until `pred` holds for the resource; panic with its status and the operator log if not.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        op: &Operator,
        pred: impl Fn(&MailIntegration) -> bool,
    ) -> MailIntegration {
        let deadline = Instant::now() + timeout;
        loop {
            let mi = self.get(name).await;
            if pred(&mi) {
                return mi;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}: {what} not reached within {timeout:?}.\nstatus: {}\n--- operator log ---\n{}",
                    serde_json::to_string_pretty(&mi.status).unwrap(),
                    tail(&op.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`Self::wait_for`] a condition: `(type, status, reason)`.
    pub async fn wait_condition(
        &self,
        name: &str,
        (t, status, reason): (&str, &str, &str),
        timeout: Duration,
        op: &Operator,
    ) -> MailIntegration {
        self.wait_for(name, &format!("{t}={status} {reason}"), timeout, op, |mi| {
            condition(mi, t) == Some((status, reason))
        })
        .await
    }

    pub async fn token_secret(&self, name: &str) -> Option<Secret> {
        self.secrets()
            .get_opt(&format!("{name}-token"))
            .await
            .unwrap()
    }

    pub async fn data(&self, secret: &str, key: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        s.data
            .and_then(|d| d.get(key).map(|b| String::from_utf8(b.0.clone()).unwrap()))
    }
}

/// Every API call the operator made was allowed: no Forbidden in its log, no reconcile that failed
/// on a Kubernetes API error.
pub fn assert_no_forbidden_calls(op: &Operator) {
    let log = op.log();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "a call was refused:\n{}",
        tail(&log, 30)
    );
    assert_eq!(
        op.metric(r#"mailintegration_reconcile_errors_total{error="kube"}"#),
        Some(0.0),
        "{}",
        tail(&log, 30)
    );
}

/// A MailIntegration named `name` with exactly `spec`, as a user would apply it.
pub fn mail_integration(name: &str, spec: serde_json::Value) -> MailIntegration {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn condition<'a>(mi: &'a MailIntegration, t: &str) -> Option<(&'a str, &'a str)> {
    mi.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// The message of condition `t` of `mi` ("" when it has none).
pub fn condition_message<'a>(mi: &'a MailIntegration, t: &str) -> &'a str {
    mi.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
        .map_or("", |c| c.message.as_str())
}

pub fn is_ready(mi: &MailIntegration) -> bool {
    condition(mi, "Ready").is_some_and(|c| c.0 == "True")
}

pub async fn annotate_refresh(env: &Env, name: &str, value: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/refresh-requested-at": value}}});
    env.integrations()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// No secret value in the operator's log or in the events of the namespace.
pub async fn assert_no_secrets_in_logs_or_events(env: &Env, op: &Operator, secrets: &[&str]) {
    let log = op.log();
    let events = env
        .cp
        .kubectl(&["get", "events", "-n", &env.ns, "-o", "yaml"]);
    let status = env
        .cp
        .kubectl(&["get", "mailint", "-n", &env.ns, "-o", "yaml"]);
    assert!(
        !log.is_empty(),
        "the operator log is empty: nothing was checked"
    );
    assert!(
        !secrets.is_empty() && secrets.iter().all(|s| s.len() >= 8),
        "give real secret values (8 characters or more) to look for: {} given",
        secrets.len()
    );
    // The JSON format writes the same characters (tokens need no escaping), and a log line that
    // carried a secret base64-encoded (an XOAUTH2 string) is as much a leak.
    let encoded: Vec<String> = secrets
        .iter()
        .map(|s| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(s)
        })
        .collect();
    for e in &encoded {
        assert!(
            !log.contains(e.trim_end_matches('=')),
            "a base64-encoded secret value appears in the operator log"
        );
    }
    for s in secrets {
        assert!(
            !log.contains(s),
            "a secret value appears in the operator log"
        );
        assert!(!events.contains(s), "a secret value appears in an event");
        assert!(
            !status.contains(s),
            "a secret value appears in the MailIntegration"
        );
    }
}
