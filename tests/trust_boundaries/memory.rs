//! What the operator holds of the Secrets labelled for it (issue 21, point 4): anyone who may
//! write Secrets in a watched namespace can label any number of them, with no MailIntegration,
//! and the operator must neither run out of memory nor stop serving the other tenants.

use super::*;
use futures::StreamExt as _;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use mail_integration_operator::reconcile::cached_secret::MAX_HELD_BYTES;

/// Just under the API server's limit of one Secret (1 MiB).
const BIG: usize = 1000 * 1024;

/// Create Secrets `names` of [`BIG`] bytes with `labels` (a few at a time).
async fn big_secrets(env: &Env, names: Vec<String>, labels: serde_json::Value) {
    let api = env.secrets();
    futures::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            let labels = labels.clone();
            async move {
                let mut s: Secret = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": labels},
                }))
                .unwrap();
                s.data = Some(
                    [
                        ("client_id".to_owned(), ByteString(b"big-client".to_vec())),
                        (
                            "client_secret".to_owned(),
                            ByteString(b"big-client-secret-value".to_vec()),
                        ),
                        ("refresh_token".to_owned(), ByteString(b"rt".to_vec())),
                        ("filler".to_owned(), ByteString(vec![b'x'; BIG])),
                    ]
                    .into_iter()
                    .collect(),
                );
                api.create(&PostParams::default(), &s).await.unwrap();
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
}

/// The peak and current resident memory of process `pid`, in MiB (VmHWM, VmRSS).
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    };
    (kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
}

/// The most the operator (a debug build) may reach with the Secrets below: its own memory, a few
/// Secrets in flight at a time, and their markers. Holding the 150 MiB of them is far above it.
const PEAK_BOUND_MIB: f64 = 96.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_secrets_of_a_mebibyte_are_not_held_and_the_others_are_served() {
    let env = Env::new("memory", server()).await;
    // Before the operator starts: 130 marked Secrets of 1 MiB that no integration names, 20 of
    // 1 MiB labelled as integrations' grants (of integrations that do not exist), and one that is
    // the grant Secret of an integration below.
    let started = std::time::Instant::now();
    let names = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}-{i}")).collect();
    big_secrets(
        &env,
        names("big-client", 130),
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
    )
    .await;
    big_secrets(
        &env,
        names("big-grant", 20),
        serde_json::json!({"mailintegration.dev/integration": "ghost"}),
    )
    .await;
    big_secrets(
        &env,
        vec!["bloated-oauth-grant".into()],
        serde_json::json!({"mailintegration.dev/integration": "bloated"}),
    )
    .await;
    eprintln!("151 Secrets of 1 MiB created in {:?}", started.elapsed());

    let op = env.operator("operator");
    // Another tenant is served.
    env.ready_integration(&op, "tenant").await;
    // By then the Secret watches have listed everything (reconciles wait for them).
    let pid = op.process.child_pid().expect("the operator runs");
    let (peak, now) = memory_mib(pid);
    eprintln!(
        "operator with 151 labelled Secrets of 1 MiB: VmHWM {peak:.1} MiB, VmRSS {now:.1} MiB"
    );
    assert!(
        peak < PEAK_BOUND_MIB,
        "the operator's peak RSS was {peak:.1} MiB (bound {PEAK_BOUND_MIB} MiB): it holds the labelled Secrets' data"
    );
    // An integration naming a marked Secret over the bound is told so, by name and limit.
    env.integration_with(
        "heavy",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {"name": "big-client-7"}}}),
    )
    .await;
    let mi = env
        .wait_for("heavy", "ClientSecretTooLarge", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "ClientSecretTooLarge"))
        })
        .await;
    let text = message(&mi, "Ready");
    assert!(
        text.contains("big-client-7") && text.contains(&MAX_HELD_BYTES.to_string()),
        "{text}"
    );
    // An integration whose grant Secret is over the bound: neither used nor written.
    env.integration("bloated", "alice@example.test").await;
    let mi = env
        .wait_for("bloated", "SecretTooLarge", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "SecretTooLarge"))
        })
        .await;
    assert!(
        message(&mi, "Ready").contains("bloated-oauth-grant"),
        "{}",
        message(&mi, "Ready")
    );
    assert!(env.token_secret("bloated").await.is_none());

    // The tenant is still served after all this.
    assert!(is_ready(&env.get("tenant").await));
    assert_no_secrets_in_logs_or_events(&env, &op, &["big-client-secret-value"]).await;
}

/// An OIDC issuer on loopback whose discovery document is `doc(base)`; its base URL.
async fn discovery_server(
    doc: impl Fn(&str) -> serde_json::Value + Send + Sync + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let body = doc(&base);
    let app = axum::Router::new().route(
        "/.well-known/openid-configuration",
        axum::routing::get(move || {
            let body = body.clone();
            async move { axum::Json(body) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// Issue 21, point 6 (provider text): what a provider says reaches status and events bounded and
/// without control characters, however much it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_text_reaches_status_bounded_and_printable() {
    let env = Env::new("providertext", server()).await;
    let mut op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    // A grant brought by hand: its refresh resolves the endpoints (and is never sent).
    env.put_secret(
        "talker-oauth-grant",
        &[("refresh_token", "rt-never-sent-7d1c")],
    )
    .await;
    // A discovery document naming another issuer: 200,000 characters with a forged line and a
    // terminal escape.
    let issuer = format!(
        "https://id.example/\nReady=True all good\u{1b}[2J{}",
        "A".repeat(200_000)
    );
    let base = discovery_server(move |base| {
        serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{base}/auth"),
            "token_endpoint": format!("{base}/token"),
        })
    })
    .await;
    let spec = serde_json::json!({
        "provider": "OIDC",
        "mailbox": {"address": "alice@example.test"},
        "oauth": {"clientSecretRef": {"name": "client"}, "issuerURL": base},
        "tokenSecret": {"name": "talker-token"},
    });
    env.integrations()
        .create(
            &PostParams::default(),
            &support::world::mail_integration("talker", spec),
        )
        .await
        .unwrap();
    let mi = env
        .wait_for("talker", "DiscoveryFailed", WAIT, &op, |mi| {
            condition(mi, "Ready").is_some_and(|c| c.1 == "DiscoveryFailed")
        })
        .await;
    let conditions = &mi.status.as_ref().unwrap().conditions;
    for c in conditions {
        assert!(
            c.message.chars().count() <= mail_integration_operator::reason::MAX_MESSAGE,
            "{}: {} characters",
            c.type_,
            c.message.chars().count()
        );
        assert!(
            !c.message.chars().any(char::is_control),
            "{}: a control character in {:?}",
            c.type_,
            c.message
        );
    }
    let text = message(&mi, "Ready");
    assert!(text.contains("names a different issuer"), "{text}");
    assert!(
        !text.contains(&"A".repeat(400)),
        "the issuer is quoted whole"
    );
    assert!(op.process.is_running());
}

/// A sidecar's admin API on loopback (as Envoy's on 127.0.0.1:15000): counts what it is sent.
async fn sidecar_admin() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { "OK" }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, hits)
}

/// Issue 21, point 6 (loopback): an operator run as in production (without `--allow-loopback`,
/// the flag for development and tests) calls no endpoint on loopback that a spec names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_cannot_reach_a_sidecar_on_loopback_in_production() {
    let env = Env::new("loopback", server()).await;
    let (admin, hits) = sidecar_admin().await;
    let op = support::operator::Operator::start_with_env(
        "operator",
        &env.cp.kubeconfig,
        &["--namespace", &env.ns],
        &[("MIO_ALLOW_LOOPBACK", "false".into())],
        env.log_dir.path(),
    );
    env.client_secret(env.server.client_secret()).await;
    env.put_secret(
        "probe-oauth-grant",
        &[("refresh_token", "rt-never-sent-5e2a")],
    )
    .await;
    env.integration_with(
        "probe",
        "alice@example.test",
        serde_json::json!({"oauth": {"endpoints": {
            "authorization": "https://id.example.test/auth",
            "token": format!("{admin}/quitquitquit"),
        }}}),
    )
    .await;
    let mi = env
        .wait_for("probe", "InvalidEndpoint", WAIT, &op, |mi| {
            condition(mi, "Ready").is_some_and(|c| c.1 == "InvalidEndpoint")
        })
        .await;
    let text = message(&mi, "Ready");
    assert!(
        text.contains("loopback") && text.contains("--allow-loopback"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the sidecar's admin API was called"
    );
}

/// Issue 21, point 6 (DNS): an allow-listed mail host name is resolved once and every address it
/// resolves to is checked: `localhost`, allowed by name in production, leads to loopback, where the
/// check does not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_mail_host_name_that_resolves_to_loopback_is_not_connected_to() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = Env::new("mailhostdns", server()).await;
    // What listens there (a sidecar, say): counts connections.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    // A token is published by a development operator (`--allow-loopback`: it may check there).
    let mut dev = env.operator("development");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"mailbox": {"server": {"host": "localhost", "port": port, "tls": "Implicit"}}}),
    )
    .await;
    env.wait_for("inbox", "TokenValid=True", WAIT, &dev, |mi| {
        condition(mi, "TokenValid").is_some_and(|c| c.0 == "True")
    })
    .await;
    dev.process.stop();
    connections.store(0, Ordering::SeqCst);
    // A new generation of the spec: checked again at once, with the token still valid.
    env.integrations()
        .patch(
            "inbox",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"mailbox": {"checkInterval": "2h"}}})),
        )
        .await
        .unwrap();
    // The operator as in production, whose admin allowed the name `localhost`.
    let op = support::operator::Operator::start_with_env(
        "production",
        &env.cp.kubeconfig,
        &["--namespace", &env.ns, "--mailbox-allowed-hosts=localhost"],
        &[("MIO_ALLOW_LOOPBACK", "false".into())],
        env.log_dir.path(),
    );
    let mi = env
        .wait_for("inbox", "MailboxHostNotAllowed", WAIT, &op, |mi| {
            condition(mi, "MailboxConnected").is_some_and(|c| c.1 == "MailboxHostNotAllowed")
        })
        .await;
    let text = message(&mi, "MailboxConnected");
    assert!(
        text.contains("resolves to") && text.contains("localhost"),
        "{text}"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the check connected to loopback"
    );
}

/// What an issuer on loopback was asked: discovery documents per issuer path, and anything else.
#[derive(Default)]
struct Fetches {
    per_issuer: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    other: std::sync::atomic::AtomicUsize,
}

impl Fetches {
    fn of(&self, path: &str) -> usize {
        self.per_issuer
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.per_issuer.lock().unwrap().values().sum()
    }
}

/// Bytes of padding in every discovery document: near the operator's read limit (1 MiB).
const DOC_PADDING: usize = 1000 * 1024;

/// Many issuers on one loopback server: `<base><path>/.well-known/openid-configuration` answers a
/// discovery document of issuer `<base><path>`, padded to near the read limit, whose endpoint URLs
/// are each just under [`MAX_URL_LEN`] (the most a cache entry can hold); the issuer `/long` names
/// a token endpoint over it. Nothing else is answered (404), only counted.
async fn many_issuers() -> (String, std::sync::Arc<Fetches>) {
    use axum::response::IntoResponse as _;
    use mail_integration_operator::provider::MAX_URL_LEN;
    let fetches = std::sync::Arc::new(Fetches::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let padding = std::sync::Arc::new("p".repeat(DOC_PADDING));
    let (b, f) = (base.clone(), fetches.clone());
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (base, fetches, padding) = (b.clone(), f.clone(), padding.clone());
        async move {
            let path = uri.path();
            let Some(issuer) = path.strip_suffix("/.well-known/openid-configuration") else {
                fetches
                    .other
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return axum::http::StatusCode::NOT_FOUND.into_response();
            };
            *fetches
                .per_issuer
                .lock()
                .unwrap()
                .entry(issuer.to_owned())
                .or_default() += 1;
            let long = |endpoint: &str, len: usize| {
                let url = format!("{base}/{endpoint}?");
                let fill = len.saturating_sub(url.len());
                format!("{url}{}", "u".repeat(fill))
            };
            let token_len = if issuer == "/long" {
                MAX_URL_LEN + 1000
            } else {
                MAX_URL_LEN - 8
            };
            axum::Json(serde_json::json!({
                "issuer": format!("{base}{issuer}"),
                "authorization_endpoint": long("auth", MAX_URL_LEN - 8),
                "token_endpoint": long("token", token_len),
                "revocation_endpoint": long("revoke", MAX_URL_LEN - 8),
                "userinfo_endpoint": long("userinfo", MAX_URL_LEN - 8),
                "padding": padding.as_str(),
            }))
            .into_response()
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, fetches)
}

/// Issue 21, point 4 (discovery cache) and point 6 (provider text): the operator keeps the
/// endpoints of at most `MAX_DISCOVERY_ENTRIES` (256) issuers, not the documents, and uses no URL
/// over `MAX_URL_LEN` (2048 bytes), whatever issuers the specs name. One integration's
/// `spec.oauth.issuerURL` is edited through 300 issuers of near-2048-byte URLs whose documents are
/// near the 1 MiB read limit: each is fetched once, the last ones come from the cache, the first
/// one is fetched again (evicted), and the operator's peak RSS stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_cache_is_bounded_whatever_issuers_the_specs_name() {
    use mail_integration_operator::provider::{MAX_DISCOVERY_ENTRIES, MAX_URL_LEN};
    const ISSUERS: usize = 300;
    let env = Env::new("discoverycache", server()).await;
    let (base, fetches) = many_issuers().await;
    let mut op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    // A grant brought by hand: each refresh resolves the endpoints; the client Secret does not
    // name these issuers' servers, so nothing is ever sent to their token endpoints.
    env.put_secret(
        "roamer-oauth-grant",
        &[("refresh_token", "rt-never-sent-0c5e")],
    )
    .await;

    // An issuer URL over the limit: the API server refuses it.
    let too_long = format!("{base}/{}", "i".repeat(MAX_URL_LEN));
    assert_refused(
        &env,
        "too-long",
        serde_json::json!({
            "provider": "OIDC",
            "mailbox": {"address": "alice@example.test"},
            "oauth": {"clientSecretRef": {"name": "client"}, "issuerURL": too_long},
            "tokenSecret": {"name": "too-long-token"},
        }),
        "2048",
    )
    .await;

    // A discovery document naming a token endpoint over the limit: refused, said in a bounded
    // message, and nothing sent there.
    let spec = |issuer: &str| {
        serde_json::json!({
            "provider": "OIDC",
            "mailbox": {"address": "alice@example.test"},
            "oauth": {"clientSecretRef": {"name": "client"}, "issuerURL": issuer},
            "tokenSecret": {"name": "roamer-token"},
        })
    };
    env.integrations()
        .create(
            &PostParams::default(),
            &support::world::mail_integration("roamer", spec(&format!("{base}/long"))),
        )
        .await
        .unwrap();
    let mi = env
        .wait_for("roamer", "DiscoveryFailed", WAIT, &op, |mi| {
            condition(mi, "Ready").is_some_and(|c| c.1 == "DiscoveryFailed")
        })
        .await;
    let text = message(&mi, "Ready");
    assert!(
        text.contains(&format!("more than the {MAX_URL_LEN}")),
        "{text}"
    );
    assert!(
        text.chars().count() <= mail_integration_operator::reason::MAX_MESSAGE,
        "{} characters",
        text.chars().count()
    );
    assert_eq!(fetches.of("/long"), 1);

    // 300 issuers, each URL near the limit: one edit each, waiting for its fetch.
    let issuer = |i: usize| {
        let path = format!("/t/{i}/");
        let fill = (MAX_URL_LEN - 16).saturating_sub(base.len() + path.len());
        format!("{path}{}", "a".repeat(fill))
    };
    let edit = |path: String| {
        let (api, url) = (env.integrations(), format!("{base}{path}"));
        async move {
            let patch = serde_json::json!({"spec": {"oauth": {"issuerURL": url}}});
            api.patch("roamer", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap()
                .metadata
                .generation
        }
    };
    let fetched = |path: String, n: usize| {
        let fetches = fetches.clone();
        async move {
            let deadline = std::time::Instant::now() + WAIT;
            while fetches.of(&path) < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}…: not fetched {n} times within {WAIT:?}",
                    &path[..path.len().min(12)]
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let started = std::time::Instant::now();
    for i in 0..ISSUERS {
        edit(issuer(i)).await;
        fetched(issuer(i), 1).await;
    }
    let elapsed = started.elapsed();
    assert_eq!(fetches.total(), ISSUERS + 1, "each issuer fetched once");
    const { assert!(ISSUERS > MAX_DISCOVERY_ENTRIES) };

    // A recent issuer comes from the cache: the edit is reconciled without a fetch.
    let recent = issuer(ISSUERS - 2);
    let generation = edit(recent.clone()).await;
    env.wait_for("roamer", "the edit observed", WAIT, &op, |mi| {
        mi.status.as_ref().and_then(|s| s.observed_generation) == generation
            && condition(mi, "Ready").is_some_and(|c| c.0 == "False")
    })
    .await;
    assert_eq!(fetches.of(&recent), 1, "a recent issuer was fetched again");
    // The first issuer was forgotten (300 others since): fetched again.
    edit(issuer(0)).await;
    fetched(issuer(0), 2).await;
    assert_eq!(fetches.total(), ISSUERS + 2);
    assert_eq!(
        fetches.other.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "something but discovery was asked of these issuers"
    );

    let pid = op.process.child_pid().expect("the operator runs");
    let (peak, now) = memory_mib(pid);
    eprintln!(
        "{ISSUERS} issuers of {MAX_URL_LEN}-byte URLs and {DOC_PADDING}-byte documents in {elapsed:?}: VmHWM {peak:.1} MiB, VmRSS {now:.1} MiB"
    );
    assert!(
        peak < PEAK_BOUND_MIB,
        "the operator's peak RSS was {peak:.1} MiB (bound {PEAK_BOUND_MIB} MiB)"
    );
    assert!(op.process.is_running());
    assert_no_secrets_in_logs_or_events(&env, &op, &["rt-never-sent-0c5e"]).await;
}
