//! Soak: N integrations on one operator process for a long time while faults are injected, then
//! what was found. The nightly-style opt-in of `tools/test.sh` (`SOAK=1`, through `tools/soak.sh`):
//!
//!   cargo bench --bench soak
//!
//! The operator (release build) runs against the real kube-apiserver + etcd of `tests/support`
//! through the fault-injecting API proxy (`tests/support/api_proxy.rs`), and refreshes at a token
//! endpoint of this file that rotates the refresh token on every refresh and, like Entra ID, keeps
//! the presented one working: only its own record of what was presented can tell a refresh token
//! used twice. Faults, one after the other with quiet spells between them: the token endpoint
//! failing half of its requests (500 JSON, 503 HTML, 429 with Retry-After) or answering slowly,
//! the API server failing the operator's Secret writes, the API server cut off (a partition), and
//! the operator restarted (SIGTERM, then a new process).
//!
//! At the end the faults stop, tokens of an hour are handed out, and once every integration is
//! Ready and the token endpoint has been quiet, it prints one figure a line (`soak NAME VALUE`):
//! refreshes (rotations at the token endpoint), reuse detections (a refresh token presented again
//! after it was rotated out: must be 0), lost grants (an integration whose grant Secret does not
//! hold the newest refresh token of its chain: must be 0), unknown refresh tokens presented, the
//! operator's peak RSS, the faults injected. It fails (exit code 101) when a must-be-0 figure is
//! not 0 or an integration is not Ready at the end.
//!
//! Environment: SOAK_SECONDS (3600: how long faults are injected), SOAK_INTEGRATIONS (1000),
//! SOAK_TOKEN_TTL_S (240: the access tokens' lifetime during the soak; refreshBefore is 1m),
//! SOAK_FAULT_EVERY_S (60: a fault starts this often and lasts at most half of it),
//! SOAK_SETTLE_S (900: how long the end may wait for every integration to be Ready and quiet).

#[path = "../tests/support/mod.rs"]
mod support;

use axum::{
    Form, Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use mail_integration_operator::api::MailIntegration;
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use support::{
    api_proxy::{ApiProxy, Match},
    ensure_crd,
    operator::Operator,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the token endpoint does wrong for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProviderFault {
    /// Half of the requests: 500 `server_error` (JSON), before anything is rotated.
    ServerError,
    /// Half of the requests: 503 with an HTML page.
    Unavailable,
    /// Half of the requests: 429 with `Retry-After: 5`.
    RateLimited,
    /// Every answer 2 s late (the rotation is done: the answer is on its way).
    Slow,
}

/// The record of the token endpoint: every refresh token it issued, the one it rotated each into,
/// how often each was presented.
#[derive(Default)]
struct Ledger {
    /// Refresh token -> the one it was rotated into (absent: not presented successfully yet).
    successor: HashMap<String, String>,
    issued: HashSet<String>,
    /// Presentations of a refresh token that had been rotated out already.
    reused: Vec<String>,
    /// Presentations of refresh tokens never issued.
    unknown: u64,
    rotations: u64,
    faulted: u64,
    fault: Option<ProviderFault>,
    last_request: Option<Instant>,
    ttl_s: u64,
}

#[derive(Clone)]
struct TokenEndpoint {
    url: String,
    ledger: Arc<Mutex<Ledger>>,
}

impl TokenEndpoint {
    async fn start(ttl_s: u64) -> TokenEndpoint {
        let ledger = Arc::new(Mutex::new(Ledger {
            ttl_s,
            ..Ledger::default()
        }));
        let l = ledger.clone();
        let app = Router::new().route(
            "/token",
            post(move |Form(form): Form<HashMap<String, String>>| {
                let l = l.clone();
                async move { answer(&l, &form).await }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        TokenEndpoint { url, ledger }
    }

    /// A refresh token that works (what a sign-in gives).
    fn issue(&self) -> String {
        let rt = format!("rt-{:032x}", rand::random::<u128>());
        self.ledger.lock().unwrap().issued.insert(rt.clone());
        rt
    }

    /// The newest refresh token of the chain that starts at `first`.
    fn head(&self, first: &str) -> String {
        let l = self.ledger.lock().unwrap();
        let mut rt = first;
        while let Some(next) = l.successor.get(rt) {
            rt = next;
        }
        rt.to_owned()
    }

    fn set_fault(&self, fault: Option<ProviderFault>) {
        self.ledger.lock().unwrap().fault = fault;
    }
}

async fn answer(ledger: &Mutex<Ledger>, form: &HashMap<String, String>) -> Response {
    let rt = form.get("refresh_token").cloned().unwrap_or_default();
    let (fault, body) = {
        let mut l = ledger.lock().unwrap();
        l.last_request = Some(Instant::now());
        let fault = l.fault;
        let fail_now = rand::random::<bool>();
        match fault {
            Some(ProviderFault::ServerError) if fail_now => {
                l.faulted += 1;
                let body = r#"{"error":"server_error","error_description":"soak fault"}"#;
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response();
            }
            Some(ProviderFault::Unavailable) if fail_now => {
                l.faulted += 1;
                let body = "<html><body>503 Service Unavailable</body></html>";
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "text/html")],
                    body,
                )
                    .into_response();
            }
            Some(ProviderFault::RateLimited) if fail_now => {
                l.faulted += 1;
                let body = r#"{"error":"temporarily_unavailable"}"#;
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::RETRY_AFTER, "5"),
                    ],
                    body,
                )
                    .into_response();
            }
            _ => {}
        }
        if !l.issued.contains(&rt) {
            l.unknown += 1;
            let body = r#"{"error":"invalid_grant","error_description":"unknown refresh token"}"#;
            return (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response();
        }
        if l.successor.contains_key(&rt) {
            // Rotated out already: the provider would take it (Entra ID does), the ledger does not.
            l.reused.push(rt.clone());
        }
        let next = format!("rt-{:032x}", rand::random::<u128>());
        l.issued.insert(next.clone());
        l.successor.insert(rt, next.clone());
        l.rotations += 1;
        let body = serde_json::json!({
            "access_token": format!("at-{:032x}", rand::random::<u128>()),
            "token_type": "Bearer",
            "expires_in": l.ttl_s,
            "refresh_token": next,
        });
        (fault, body)
    };
    if fault == Some(ProviderFault::Slow) {
        ledger.lock().unwrap().faulted += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn secret(name: &str, labels: serde_json::Value, data: serde_json::Value) -> Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}, "stringData": data
    }))
    .unwrap()
}

/// Integrations the soak's own watch last saw Ready.
fn watch_ready(client: &Client, ns: &str) -> Arc<Mutex<HashMap<String, bool>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let api: Api<MailIntegration> = Api::namespaced(client.clone(), ns);
    let s = seen.clone();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(
            watcher(api, Default::default())
                .default_backoff()
                .applied_objects()
        );
        while let Some(ev) = events.next().await {
            let Ok(mi) = ev else { continue };
            let ready = mi.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            s.lock()
                .unwrap()
                .insert(mi.metadata.name.clone().unwrap_or_default(), ready);
        }
    });
    seen
}

fn ready_count(seen: &Mutex<HashMap<String, bool>>) -> usize {
    seen.lock().unwrap().values().filter(|r| **r).count()
}

fn vm_hwm_kib(op: &Operator) -> u64 {
    let Some(pid) = op.process.child_pid() else {
        return 0;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn start_operator(kubeconfig: &std::path::Path, log_dir: &std::path::Path) -> Operator {
    Operator::start_with_env(
        "operator",
        kubeconfig,
        &[
            "--log-format",
            "json",
            // All integrations are one namespace (one tenant).
            "--max-namespace-share=100",
        ],
        &[("RUST_LOG", "info".into())],
        log_dir,
    )
}

/// SIGTERM, wait for the drain (at most 60 s), then a new process.
fn restart(op: Operator, kubeconfig: &std::path::Path, log_dir: &std::path::Path) -> Operator {
    let mut op = op;
    if let Some(pid) = op.process.child_pid() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.process.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !op.process.is_running(),
        "the operator did not exit within 60 s of SIGTERM:\n{}",
        op.process.log_tail(30)
    );
    drop(op);
    start_operator(kubeconfig, log_dir)
}

/// The faults, in the order they are injected (then again from the start).
const FAULTS: &[&str] = &[
    "provider 500",
    "API Secret writes fail",
    "provider 503",
    "operator restart",
    "provider 429",
    "API partition",
    "provider slow",
];

#[tokio::main]
async fn main() {
    let soak = Duration::from_secs(env_or("SOAK_SECONDS", 3600));
    let n: usize = env_or("SOAK_INTEGRATIONS", 1000);
    let ttl_s: u64 = env_or("SOAK_TOKEN_TTL_S", 240);
    let every = Duration::from_secs(env_or("SOAK_FAULT_EVERY_S", 60));
    let settle = Duration::from_secs(env_or("SOAK_SETTLE_S", 900));
    let started = Instant::now();
    let cp = ensure_crd();
    let client = cp.client().await;
    let ns = "soak";
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await;
    let endpoint = TokenEndpoint::start(ttl_s).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mis: Api<MailIntegration> = Api::namespaced(client.clone(), ns);
    let mut client_secret = secret(
        "client",
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
        serde_json::json!({"client_id": "soak", "client_secret": "soak-secret"}),
    );
    client_secret.metadata.annotations = Some(
        [(
            "mailintegration.dev/oauth-servers".to_owned(),
            url::Url::parse(&endpoint.url)
                .unwrap()
                .origin()
                .ascii_serialization(),
        )]
        .into(),
    );
    secrets
        .create(&PostParams::default(), &client_secret)
        .await
        .unwrap();
    // Each integration's first refresh token: the start of its chain.
    let firsts: Vec<String> = (0..n).map(|_| endpoint.issue()).collect();
    futures::stream::iter(firsts.iter().enumerate())
        .map(|(i, rt)| {
            let (secrets, mis, token_url) = (secrets.clone(), mis.clone(), endpoint.url.clone());
            async move {
                let name = format!("inbox-{i}");
                secrets
                    .create(
                        &PostParams::default(),
                        &secret(
                            &format!("{name}-oauth-grant"),
                            serde_json::json!({"mailintegration.dev/integration": name}),
                            serde_json::json!({"refresh_token": rt}),
                        ),
                    )
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
    let seen = watch_ready(&client, ns);

    let proxy = ApiProxy::start_for(cp);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    proxy.kubeconfig(&kubeconfig);
    let mut op = start_operator(&kubeconfig, dir.path());
    let mut peak_kib = 0u64;
    let first = Instant::now();
    while ready_count(&seen) < n {
        assert!(
            first.elapsed() < settle,
            "only {}/{n} Ready {settle:?} after the start",
            ready_count(&seen)
        );
        peak_kib = peak_kib.max(vm_hwm_kib(&op));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "soak: {n} integrations Ready in {:.0} s; injecting faults for {soak:?}",
        first.elapsed().as_secs_f64()
    );

    // The faults, one every `every`, each lasting half of it.
    let injected = Arc::new(AtomicU64::new(0));
    let mut counts: HashMap<&str, u64> = HashMap::new();
    // Faults that ended without meeting a single request.
    let mut missed: HashMap<&str, u64> = HashMap::new();
    let mut restarts = 0u64;
    let soak_start = Instant::now();
    let mut k = 0usize;
    while soak_start.elapsed() < soak {
        let fault = FAULTS[k % FAULTS.len()];
        k += 1;
        *counts.entry(fault).or_default() += 1;
        injected.fetch_add(1, Ordering::Relaxed);
        let lasting = every / 2;
        eprintln!(
            "soak: {:>5.0} s: {fault}; {}/{n} Ready",
            soak_start.elapsed().as_secs_f64(),
            ready_count(&seen)
        );
        let faulted_before = endpoint.ledger.lock().unwrap().faulted;
        let mut fails = Vec::new();
        match fault {
            "provider 500" => endpoint.set_fault(Some(ProviderFault::ServerError)),
            "provider 503" => endpoint.set_fault(Some(ProviderFault::Unavailable)),
            "provider 429" => endpoint.set_fault(Some(ProviderFault::RateLimited)),
            "provider slow" => endpoint.set_fault(Some(ProviderFault::Slow)),
            "API Secret writes fail" => {
                for method in ["PATCH", "PUT", "POST"] {
                    fails.push(proxy.fail(Match::contains(method, "/secrets"), 500, Some(20)));
                }
            }
            "API partition" => proxy.partition(),
            "operator restart" => {
                peak_kib = peak_kib.max(vm_hwm_kib(&op));
                op = tokio::task::block_in_place(|| restart(op, &kubeconfig, dir.path()));
                restarts += 1;
            }
            other => unreachable!("{other}"),
        }
        // A fault lasts half of `every`, and (refreshes come in waves) until it met a request, for
        // at most a token lifetime more.
        let until = Instant::now() + lasting;
        let at_most = until + Duration::from_secs(ttl_s);
        loop {
            peak_kib = peak_kib.max(vm_hwm_kib(&op));
            let met = match fault {
                "API Secret writes fail" => fails.iter().any(|f| f.hits() > 0),
                f if f.starts_with("provider") => {
                    endpoint.ledger.lock().unwrap().faulted > faulted_before
                }
                _ => true,
            };
            let now = Instant::now();
            if (now >= until && met) || now >= at_most {
                if !met {
                    *missed.entry(fault).or_default() += 1;
                }
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        endpoint.set_fault(None);
        proxy.clear();
        proxy.heal();
        let quiet = Instant::now() + (every - lasting);
        while Instant::now() < quiet {
            peak_kib = peak_kib.max(vm_hwm_kib(&op));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    let seconds_of_faults = soak_start.elapsed().as_secs();

    // The end: no faults, tokens of an hour; every integration Ready on one of them, and no request
    // at the token endpoint for 20 s, so that no refresh is in flight when the chains are compared.
    endpoint.ledger.lock().unwrap().ttl_s = 3600;
    let end = Instant::now();
    let rotations_at_end = endpoint.ledger.lock().unwrap().rotations;
    let settled = loop {
        peak_kib = peak_kib.max(vm_hwm_kib(&op));
        let quiet = endpoint
            .ledger
            .lock()
            .unwrap()
            .last_request
            .is_none_or(|t| t.elapsed() > Duration::from_secs(20));
        // Every token handed out during the soak lived at most `ttl_s`: after that long, each
        // integration has refreshed onto a token of an hour.
        if ready_count(&seen) == n && quiet && end.elapsed() > Duration::from_secs(ttl_s) {
            break true;
        }
        if end.elapsed() > settle {
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut lost = Vec::new();
    for (i, first) in firsts.iter().enumerate() {
        let stored = secrets
            .get_opt(&format!("inbox-{i}-oauth-grant"))
            .await
            .unwrap()
            .and_then(|s| s.data)
            .and_then(|d| d.get("refresh_token").cloned())
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned());
        if stored.as_deref() != Some(endpoint.head(first).as_str()) {
            lost.push(format!("inbox-{i}"));
        }
    }
    let not_ready = n - ready_count(&seen);
    let l = endpoint.ledger.lock().unwrap();
    let fig = |name: &str, value: f64| println!("soak {name} {value}");
    fig("integrations", n as f64);
    fig("seconds_of_faults", seconds_of_faults as f64);
    fig("refreshes", l.rotations as f64);
    fig(
        "refreshes_after_faults",
        (l.rotations - rotations_at_end) as f64,
    );
    fig("reuse_detections", l.reused.len() as f64);
    fig("lost_grants", lost.len() as f64);
    fig("unknown_refresh_tokens_presented", l.unknown as f64);
    fig("not_ready_at_end", not_ready as f64);
    fig("provider_faulted_requests", l.faulted as f64);
    fig("faults_injected", injected.load(Ordering::Relaxed) as f64);
    for f in FAULTS {
        fig(
            &format!("fault[{}]", f.replace(' ', "_")),
            counts.get(f).copied().unwrap_or(0) as f64,
        );
        fig(
            &format!("fault_met_no_request[{}]", f.replace(' ', "_")),
            missed.get(f).copied().unwrap_or(0) as f64,
        );
    }
    fig("operator_restarts", restarts as f64);
    fig("operator_peak_rss_mib", peak_kib as f64 / 1024.0);
    fig("api_proxy_upstream_errors", proxy.upstream_errors() as f64);
    fig("total_seconds", started.elapsed().as_secs() as f64);
    let problems: Vec<String> = [
        (!l.reused.is_empty()).then(|| {
            format!(
                "{} refresh tokens presented after they were rotated out",
                l.reused.len()
            )
        }),
        (!lost.is_empty()).then(|| {
            format!(
                "{} grants lost (grant Secret without the newest refresh token): {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            )
        }),
        (l.unknown > 0).then(|| format!("{} unknown refresh tokens presented", l.unknown)),
        (!settled).then(|| format!("{not_ready} of {n} not Ready {settle:?} after the faults")),
    ]
    .into_iter()
    .flatten()
    .collect();
    drop(l);
    if !problems.is_empty() {
        eprintln!("operator log tail:\n{}", op.process.log_tail(40));
        panic!("the soak found: {}", problems.join("; "));
    }
    eprintln!("soak: nothing found");
}
