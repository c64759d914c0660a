//! Scale benchmark: N integrations against the real kube-apiserver and a stand-in token endpoint.
//!
//!   cargo bench --bench scale -- 100 1000
//!
//! For each N it prints: the time until all are Ready, token requests and API writes per refresh
//! (over a steady-state window in which every integration refreshes at least once), and the
//! operator's peak RSS. The stand-in token endpoint answers refresh_token grants at once with
//! short-lived access tokens (no rotation, like Google), so the figures are the operator's own.

#[path = "../tests/support/mod.rs"]
mod support;

use axum::{Form, Json, Router, routing::post};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams};
use mail_integration_operator::api::MailIntegration;
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use support::{ensure_crd, operator::Operator, unique_namespace};

/// Access-token lifetime of the stand-in: integrations refresh at two thirds of it.
const TOKEN_TTL_S: u64 = 30;

async fn token_endpoint(counter: Arc<AtomicU64>) -> String {
    let app = Router::new().route(
        "/token",
        post(move |Form(form): Form<HashMap<String, String>>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                assert_eq!(
                    form.get("grant_type").map(String::as_str),
                    Some("refresh_token")
                );
                Json(serde_json::json!({
                    "access_token": format!("at-{}", rand::random::<u64>()),
                    "token_type": "Bearer",
                    "expires_in": TOKEN_TTL_S,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn writes(op: &Operator) -> f64 {
    op.api_writes()
}

fn refreshes(op: &Operator) -> f64 {
    op.metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
        .unwrap_or(0.0)
}

async fn run(n: usize) {
    let cp = ensure_crd();
    let ns = unique_namespace(&format!("bench{n}"));
    let client = cp.client().await;
    let counter = Arc::new(AtomicU64::new(0));
    let token_url = token_endpoint(counter.clone()).await;
    let log_dir = tempfile::tempdir().unwrap();
    let op = Operator::start(
        "operator",
        &cp.kubeconfig,
        &["--namespace", &ns, "--log-format", "json"],
        log_dir.path(),
    );
    let pid = op.process.child_pid().expect("operator pid");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mis: Api<MailIntegration> = Api::namespaced(client.clone(), &ns);
    // Labelled as a user marks them: the client Secret for the operator to read, each grant
    // Secret for its integration.
    let label = |mut s: Secret, key: &str, value: &str| -> Secret {
        s.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.to_owned());
        s
    };
    let marked = |s: Secret| label(s, "mailintegration.dev/oauth-client", "true");
    let for_integration = |s: Secret, name: &str| label(s, "mailintegration.dev/integration", name);
    let secret = |name: String, data: serde_json::Value| -> Secret {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "stringData": data}))
            .unwrap()
    };
    secrets
        .create(
            &PostParams::default(),
            &marked(secret(
                "client".into(),
                serde_json::json!({"client_id": "bench", "client_secret": "bench-secret"}),
            )),
        )
        .await
        .unwrap();

    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (secrets, mis, token_url) = (secrets.clone(), mis.clone(), token_url.clone());
            async move {
                let name = format!("inbox-{i}");
                secrets
                    .create(&PostParams::default(), &for_integration(secret(format!("{name}-oauth-grant"), serde_json::json!({"refresh_token": format!("rt-{i}")})), &name))
                    .await
                    .unwrap();
                let mi: MailIntegration = serde_json::from_value(serde_json::json!({
                    "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
                    "metadata": {"name": name},
                    "spec": {
                        "provider": "OIDC",
                        "mailbox": {"address": format!("user{i}@example.test")},
                        "oauth": {"clientSecretRef": {"name": "client"}, "endpoints": {"authorization": "http://127.0.0.1:1/auth", "token": token_url}},
                        "tokenSecret": {"name": format!("{name}-token")},
                        "refreshBefore": "1m",
                    }
                }))
                .unwrap();
                mis.create(&PostParams::default(), &mi).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let created = started.elapsed();

    loop {
        let ready = mis
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|m| {
                m.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {ready}/{n} Ready after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_ready = started.elapsed();

    // Steady state: a window of one token lifetime, in which every integration refreshes once.
    let (r0, w0, t0) = (refreshes(&op), writes(&op), counter.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(TOKEN_TTL_S + 5)).await;
    let (r1, w1, t1) = (refreshes(&op), writes(&op), counter.load(Ordering::Relaxed));
    let refreshed = r1 - r0;
    println!(
        "scale N={n}: created in {:.1}s, all Ready after {:.1}s; steady state over {}s: {} refreshes, {:.2} token requests/refresh, {:.2} API writes/refresh; operator RSS now {} KiB, peak {} KiB",
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        TOKEN_TTL_S + 5,
        refreshed,
        (t1 - t0) as f64 / refreshed.max(1.0),
        (w1 - w0) / refreshed.max(1.0),
        rss_kib(pid, "VmRSS:"),
        rss_kib(pid, "VmHWM:"),
    );
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000]
    } else {
        sizes
    };
    for n in sizes {
        run(n).await;
    }
}
