//! The token lifecycle end to end: the operator binary against the real kube-apiserver and a real
//! OAuth server (oidc-provider, refresh-token rotation on), with the fault-injecting stand-in in
//! front of the token endpoint for what no real server does on demand.
//!
//! Each test has its own namespace, its own operator process (watching only that namespace) and its
//! own fault proxy, so counts of token requests and API writes belong to that test alone.

mod support;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use mail_integration_operator::api::MailIntegration;
use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};
use support::{
    control_plane::ControlPlane,
    ensure_crd,
    fault_proxy::{Fault, FaultProxy},
    oauth::{OAuthServer, OAuthServerConfig},
    operator::Operator,
    unique_namespace,
};

/// Access tokens that live 8 s: refreshes come every ~5 s.
fn short_lived_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(8),
            ..Default::default()
        })
    })
}

/// Access tokens that live 10 minutes: nothing is due during a test.
fn long_lived_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(600),
            ..Default::default()
        })
    })
}

struct Env {
    cp: &'static ControlPlane,
    ns: String,
    client: kube::Client,
    proxy: FaultProxy,
    server: &'static OAuthServer,
    log_dir: tempfile::TempDir,
}

impl Env {
    async fn new(prefix: &str, server: &'static OAuthServer) -> Self {
        let cp = ensure_crd();
        let ns = unique_namespace(prefix);
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
        }
    }

    fn operator(&self, name: &str) -> Operator {
        Operator::start(
            name,
            &self.cp.kubeconfig,
            &["--namespace", &self.ns],
            self.log_dir.path(),
        )
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn integrations(&self) -> Api<MailIntegration> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn put_secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
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

    async fn client_secret(&self, secret: &str) {
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
    async fn grant(&self, name: &str, login: &str) -> String {
        let grant = self.server.obtain_grant(login).await;
        let rt = grant.refresh_token().to_owned();
        self.put_secret(&format!("{name}-oauth-grant"), &[("refresh_token", &rt)])
            .await;
        rt
    }

    async fn integration(&self, name: &str, address: &str) {
        let mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "metadata": {"name": name},
            "spec": {
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
            }
        }))
        .unwrap();
        self.integrations()
            .create(&PostParams::default(), &mi)
            .await
            .unwrap();
    }

    async fn get(&self, name: &str) -> MailIntegration {
        self.integrations().get(name).await.unwrap()
    }

    /// Wait until `pred` holds for the resource; panic with its status and the operator log if not.
    async fn wait_for(
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

    async fn token_secret(&self, name: &str) -> Option<Secret> {
        self.secrets()
            .get_opt(&format!("{name}-token"))
            .await
            .unwrap()
    }

    async fn data(&self, secret: &str, key: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        s.data
            .and_then(|d| d.get(key).map(|b| String::from_utf8(b.0.clone()).unwrap()))
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn condition<'a>(mi: &'a MailIntegration, t: &str) -> Option<(&'a str, &'a str)> {
    mi.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn is_ready(mi: &MailIntegration) -> bool {
    condition(mi, "Ready").is_some_and(|c| c.0 == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_in_a_row_with_rotation_keep_the_grant_alive() {
    let env = Env::new("rotation", short_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let first_rt = env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;

    let mi = env
        .wait_for(
            "inbox",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    assert_eq!(condition(&mi, "TokenValid"), Some(("True", "TokenValid")));
    assert_eq!(condition(&mi, "Stalled").map(|c| c.0), Some("False"));
    assert_eq!(
        mi.status.as_ref().unwrap().observed_generation,
        mi.metadata.generation
    );

    // The token Secret holds a token the OAuth server calls active, and everything workloads need.
    let token = env
        .data("inbox-token", "access_token")
        .await
        .expect("access_token in the token Secret");
    assert!(
        env.server.introspect(&token).await,
        "the published access token must be active"
    );
    assert_eq!(
        env.data("inbox-token", "token_type").await.as_deref(),
        Some("Bearer")
    );
    assert_eq!(
        env.data("inbox-token", "username").await.as_deref(),
        Some("alice@example.test")
    );
    let xoauth2 = env.data("inbox-token", "xoauth2").await.unwrap();
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(xoauth2)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        decoded,
        format!("user=alice@example.test\x01auth=Bearer {token}\x01\x01")
    );
    let token_secret = env.token_secret("inbox").await.unwrap();
    assert!(
        !token_secret
            .data
            .as_ref()
            .unwrap()
            .contains_key("refresh_token"),
        "workloads never get the refresh token"
    );
    let owner = &token_secret
        .metadata
        .owner_references
        .as_ref()
        .expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("MailIntegration", "inbox", Some(true))
    );

    // Three more refreshes, each before expiry; rotation hands out a new refresh token every time and
    // the operator must always use the newest (a reused one would kill the grant at oidc-provider).
    let mut seen = vec![token.clone()];
    let deadline = Instant::now() + Duration::from_secs(45);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "only {} distinct access tokens in 45 s:\n{}",
            seen.len(),
            tail(&op.log(), 40)
        );
        let t = env.data("inbox-token", "access_token").await.unwrap();
        if !seen.contains(&t) {
            let mi = env.get("inbox").await;
            assert!(is_ready(&mi), "Ready throughout: {:?}", mi.status);
            seen.push(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rt_now = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();
    assert_ne!(rt_now, first_rt, "the rotated refresh token was stored");
    let grant = env.secrets().get("inbox-oauth-grant").await.unwrap();
    assert!(
        grant
            .metadata
            .owner_references
            .is_some_and(|o| o.iter().any(|o| o.name == "inbox")),
        "the grant Secret was adopted"
    );
    // The grant is still alive: the newest access token is active, and the next refresh succeeds too.
    assert!(env.server.introspect(seen.last().unwrap()).await);
    let before = op
        .metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
        .unwrap_or(0.0);
    env.wait_for(
        "inbox",
        "one more successful refresh",
        Duration::from_secs(20),
        &op,
        |_| {
            op.metric(
                r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#,
            )
            .unwrap_or(0.0)
                > before
        },
    )
    .await;
    assert!(is_ready(&env.get("inbox").await));
    assert_eq!(
        op.metric(
            r#"mailintegration_refreshes_total{result="permanent_failure",reason="GrantRevoked"}"#
        ),
        None
    );
    assert_no_secrets_in_logs_or_events(
        &env,
        &op,
        &[env.server.client_secret(), &first_rt, &rt_now, &token],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_secret_stalls_and_fixing_it_recovers_within_seconds() {
    let env = Env::new("client", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret("not-the-secret").await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    let mi = env
        .wait_for("inbox", "Stalled=True", Duration::from_secs(30), &op, |m| {
            condition(m, "Stalled").is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(
        condition(&mi, "Authorized"),
        Some(("False", "InvalidClient"))
    );
    assert_eq!(condition(&mi, "Ready"), Some(("False", "InvalidClient")));
    let requests = env.proxy.token_requests();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        env.proxy.token_requests(),
        requests,
        "no retries against the provider while nothing changed"
    );

    let fixed_at = Instant::now();
    env.client_secret(env.server.client_secret()).await;
    env.wait_for(
        "inbox",
        "Ready=True after fixing the client Secret",
        Duration::from_secs(10),
        &op,
        is_ready,
    )
    .await;
    let took = fixed_at.elapsed();
    assert!(took < Duration::from_secs(10), "recovered in {took:?}");
    let mi = env.get("inbox").await;
    assert_eq!(condition(&mi, "Stalled").map(|c| c.0), Some("False"));
    assert!(mi.status.unwrap().failed_inputs.is_none());
    assert_no_secrets_in_logs_or_events(&env, &op, &[env.server.client_secret(), "not-the-secret"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_grant_stalls_and_stops_calling_the_provider() {
    let env = Env::new("revoked", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let rt = env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.wait_for(
        "inbox",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;

    // The user revokes the grant at the provider; then a refresh is asked for.
    let current_rt = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();
    env.server.revoke(&current_rt).await;
    annotate_refresh(&env, "inbox", "1").await;
    let mi = env
        .wait_for("inbox", "GrantRevoked", Duration::from_secs(20), &op, |m| {
            condition(m, "Authorized") == Some(("False", "GrantRevoked"))
        })
        .await;
    assert_eq!(condition(&mi, "Stalled"), Some(("True", "GrantRevoked")));
    let requests = env.proxy.token_requests();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        env.proxy.token_requests(),
        requests,
        "no token requests after a permanent failure"
    );
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        events.contains("Warning GrantRevoked"),
        "a Warning event tells the user: {events}"
    );
    assert_no_secrets_in_logs_or_events(&env, &op, &[env.server.client_secret(), &rt, &current_rt])
        .await;
}

async fn annotate_refresh(env: &Env, name: &str, value: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/refresh-requested-at": value}}});
    env.integrations()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_faults_back_off_keep_the_token_and_recover() {
    let env = Env::new("faults", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.wait_for(
        "inbox",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    let mut token = env.data("inbox-token", "access_token").await.unwrap();

    for (i, fault, reason) in [
        (1, Fault::ServiceUnavailable, "ProviderUnavailable"),
        (2, Fault::GoogleHtmlForbidden, "RateLimited"),
        (
            3,
            Fault::RateLimited {
                retry_after_secs: 2,
            },
            "RateLimited",
        ),
    ] {
        env.proxy.set_fault(fault);
        let before = env.proxy.faulted_requests();
        annotate_refresh(&env, "inbox", &format!("fault-{i}")).await;
        // Backoff: a second attempt comes, but not in a hot loop. Time the gap between the first
        // and the second faulted request.
        let started = Instant::now();
        let mut first_at = None;
        loop {
            let n = env.proxy.faulted_requests() - before;
            if n >= 1 && first_at.is_none() {
                first_at = Some(Instant::now());
            }
            if n >= 2 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{n} faulted requests within 30 s:\n{}",
                tail(&op.log(), 20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let retry_gap = first_at.unwrap().elapsed();
        assert!(
            retry_gap >= Duration::from_millis(1500),
            "retried after {retry_gap:?}: that is no backoff\n{}",
            tail(&op.log(), 30)
        );
        let mi = env.get("inbox").await;
        assert_eq!(
            condition(&mi, "Reconciling"),
            Some(("True", reason)),
            "{:?}",
            mi.status
        );
        // The access token stays in place while it is valid, and so does Ready.
        assert!(is_ready(&mi), "{:?}", mi.status);
        assert_eq!(condition(&mi, "TokenValid"), Some(("True", "TokenValid")));
        assert_eq!(
            env.data("inbox-token", "access_token").await.as_deref(),
            Some(token.as_str())
        );
        env.proxy.clear_fault();
        env.wait_for("inbox", "recovery", Duration::from_secs(30), &op, |m| {
            condition(m, "Reconciling").is_some_and(|c| c.0 == "False") && is_ready(m)
        })
        .await;
        let recovered = env.data("inbox-token", "access_token").await.unwrap();
        assert_ne!(recovered, token, "a new token after recovery");
        token = recovered;
    }
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        events.contains("Warning ProviderUnavailable") && events.contains("Normal Recovered"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_secret_keys_and_values_are_reported_without_crashing() {
    let env = Env::new("missing", long_lived_server()).await;
    let op = env.operator("operator");
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    let mi = env
        .wait_for(
            "inbox",
            "ClientSecretNotFound",
            Duration::from_secs(20),
            &op,
            |m| condition(m, "Ready") == Some(("False", "ClientSecretNotFound")),
        )
        .await;
    let msg = &mi
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        msg.contains("\"client\"") && msg.contains("does not exist"),
        "{msg}"
    );

    env.put_secret("client", &[("client_id", env.server.client_id())])
        .await;
    let mi = env
        .wait_for(
            "inbox",
            "ClientSecretKeyMissing",
            Duration::from_secs(20),
            &op,
            |m| condition(m, "Ready") == Some(("False", "ClientSecretKeyMissing")),
        )
        .await;
    let msg = &mi
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(msg.contains("has no key \"client_secret\""), "{msg}");

    env.put_secret(
        "client",
        &[("client_id", env.server.client_id()), ("client_secret", "")],
    )
    .await;
    let mi = env
        .wait_for("inbox", "empty value", Duration::from_secs(20), &op, |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.message.contains("is empty"))
            })
        })
        .await;
    assert_eq!(
        condition(&mi, "Ready"),
        Some(("False", "ClientSecretKeyMissing"))
    );
    assert_eq!(
        env.proxy.token_requests(),
        0,
        "no provider call without client credentials"
    );

    // No grant at all: a sign-in is required (not an error).
    env.secrets()
        .delete("inbox-oauth-grant", &DeleteParams::default())
        .await
        .unwrap();
    env.client_secret(env.server.client_secret()).await;
    env.wait_for(
        "inbox",
        "SignInRequired",
        Duration::from_secs(20),
        &op,
        |m| condition(m, "Authorized") == Some(("False", "SignInRequired")),
    )
    .await;
    let mut op = op;
    assert!(
        op.process.is_running(),
        "the operator must not crash:\n{}",
        tail(&op.log(), 20)
    );
    env.grant("inbox", "alice").await;
    env.wait_for(
        "inbox",
        "Ready after bringing a refresh token",
        Duration::from_secs(20),
        &op,
        is_ready,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_valid_tokens_makes_no_token_requests_and_idle_makes_no_writes() {
    let env = Env::new("restart", long_lived_server()).await;
    let mut op = env.operator("operator-1");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.wait_for(
        "inbox",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;

    // Idle: over a measured interval, zero writes — by the operator's own count and by the objects'
    // resourceVersions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = |op: &Operator| -> f64 {
        ["status", "token_secret", "grant_secret", "event"]
            .iter()
            .map(|k| {
                op.metric(&format!(
                    "mailintegration_api_writes_total{{error=\"{k}\"}}"
                ))
                .unwrap_or(0.0)
            })
            .sum()
    };
    let w0 = writes(&op);
    let mi_rv = env.get("inbox").await.metadata.resource_version;
    let token_rv = env
        .token_secret("inbox")
        .await
        .unwrap()
        .metadata
        .resource_version;
    // Touch the resource's metadata: a reconcile runs, but must decide that nothing changed.
    let patch = serde_json::json!({"metadata": {"labels": {"touched": "yes"}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mi_rv = {
        let _ = mi_rv;
        env.get("inbox").await.metadata.resource_version
    };
    let interval = Duration::from_secs(10);
    tokio::time::sleep(interval).await;
    assert_eq!(writes(&op), w0, "API writes while idle for {interval:?}");
    assert_eq!(
        env.get("inbox").await.metadata.resource_version,
        mi_rv,
        "the MailIntegration was written while idle"
    );
    assert_eq!(
        env.token_secret("inbox")
            .await
            .unwrap()
            .metadata
            .resource_version,
        token_rv,
        "the token Secret was written while idle"
    );

    // Restart: still-valid tokens are not refreshed again.
    op.process.stop();
    env.proxy.reset_counts();
    let op2 = env.operator("operator-2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        op2.metric("mailintegration_reconciles_total{result=\"ok\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "the new operator reconciled"
    );
    assert_eq!(
        env.proxy.token_requests(),
        0,
        "token requests at start-up with valid tokens"
    );
    assert!(is_ready(&env.get("inbox").await));
    assert_eq!(
        writes(&op2),
        0.0,
        "no writes at start-up when nothing changed"
    );
}

/// No secret value in the operator's log or in the events of the namespace.
async fn assert_no_secrets_in_logs_or_events(env: &Env, op: &Operator, secrets: &[&str]) {
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
    for s in secrets.iter().filter(|s| s.len() >= 8) {
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
