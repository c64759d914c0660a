//! Shared capacity (issue 21, point 5): what one tenant's integration or servers may take of what
//! every tenant uses. Counted outside the operator: token requests at the fault proxy in front of
//! the token endpoint, times in the API server's objects.

use super::support::{
    self,
    control_plane::ControlPlane,
    fault_proxy::Fault,
    operator::Operator,
    world::{Env, annotate_refresh, condition, condition_message, is_ready},
};
use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The production default of `--min-refresh-interval` (the test support lowers it otherwise).
const FLOOR: &str = "--min-refresh-interval=30s";

fn zero_lifetime_answer() -> Fault {
    Fault::json(
        200,
        serde_json::json!({
            "access_token": "zero-lifetime-token",
            "token_type": "Bearer",
            "expires_in": 0,
        }),
    )
}

fn last_refresh(mi: &mail_integration_operator::api::MailIntegration) -> Option<jiff::Timestamp> {
    mi.status.as_ref()?.last_refresh_time.as_ref().map(|t| t.0)
}

fn next_refresh(mi: &mail_integration_operator::api::MailIntegration) -> Option<jiff::Timestamp> {
    mi.status.as_ref()?.next_refresh_time.as_ref().map(|t| t.0)
}

/// A token endpoint answering `expires_in: 0` gets one token request per lowest refresh interval
/// (main: one a second, 825 in 30 s measured against oidc-provider), the token is still published
/// and the integration says why it is not Ready; another namespace's integration, on the same
/// operator, refreshes when it announced (within 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_token_lifetime_gets_one_request_per_interval_and_others_refresh_on_time() {
    let env = Env::new("cap-zero", support::oauth::with_token_ttl(600)).await;
    // Tokens of a minute: refreshed about 40 s after they were issued.
    let other = Env::new("cap-zero-other", support::oauth::shared()).await;
    let op = env.operator_with("operator", &["--namespace", &other.ns, FLOOR]);

    other.client_secret(other.server.client_secret()).await;
    other.grant("steady", "alice").await;
    other.integration("steady", "alice@example.test").await;
    let first = other
        .wait_for("steady", "Ready", Duration::from_secs(30), &op, is_ready)
        .await;
    let announced = next_refresh(&first).expect("a refresh time is announced");
    let first_refresh = last_refresh(&first).unwrap();

    env.client_secret(env.server.client_secret()).await;
    env.grant("zero", "alice").await;
    env.proxy.set_fault(zero_lifetime_answer());
    env.proxy.reset_counts();
    let started = Instant::now();
    env.integration("zero", "alice@example.test").await;
    let mi = env
        .wait_condition(
            "zero",
            ("Ready", "False", "TokenLifetimeTooShort"),
            Duration::from_secs(20),
            &op,
        )
        .await;
    assert_eq!(
        env.data("zero-token", "access_token").await.as_deref(),
        Some("zero-lifetime-token"),
        "the token is published all the same"
    );
    let msg = condition_message(&mi, "Ready");
    assert!(msg.contains("every 30s"), "{msg}");

    // 35 s from the first request: the first one and the one 30 s later, no more.
    tokio::time::sleep(Duration::from_secs(35).saturating_sub(started.elapsed())).await;
    let requests = env.proxy.token_requests();
    assert!(
        (1..=2).contains(&requests),
        "{requests} token requests in 35 s for a token endpoint answering expires_in: 0 (at most 2 with a 30 s floor)\n{}",
        support::world::tail(&op.log(), 30)
    );

    // The other namespace's integration refreshed when it announced, its token valid throughout.
    let after = other
        .wait_for(
            "steady",
            "the announced refresh",
            Duration::from_secs(60),
            &op,
            |mi| last_refresh(mi).is_some_and(|t| t > first_refresh),
        )
        .await;
    let refreshed = last_refresh(&after).unwrap();
    let late = refreshed.duration_since(announced).as_secs();
    assert!(
        // Whole seconds both; a loaded 2-core machine may add a few.
        (-1..=5).contains(&late),
        "the other tenant's refresh came {late} s after the second it announced ({announced})"
    );
    assert_eq!(
        condition(&after, "TokenValid"),
        Some(("True", "TokenValid"))
    );
}

/// However many new values of the refresh-requested-at annotation arrive, one token request per
/// lowest refresh interval; a request within it is deferred, not dropped (main: one request per
/// value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_request_spam_gives_one_provider_call_per_interval() {
    let env = Env::new("cap-spam", support::oauth::with_token_ttl(600)).await;
    let op = env.operator_with("operator", &[FLOOR]);
    env.ready_integration(&op, "inbox").await;
    let ready_at = last_refresh(&env.get("inbox").await).unwrap();
    env.proxy.reset_counts();

    let mut last = String::new();
    for i in 0..20 {
        last = format!("spam-{i}");
        annotate_refresh(&env, "inbox", &last).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        env.proxy.refresh_requests(),
        0,
        "requests within 30 s of the last refresh wait for the interval"
    );
    let mi = env
        .wait_for(
            "inbox",
            "the last request honoured",
            Duration::from_secs(40),
            &op,
            |mi| {
                mi.status
                    .as_ref()
                    .and_then(|s| s.last_refresh_request.as_deref())
                    == Some(last.as_str())
            },
        )
        .await;
    let honoured_at = last_refresh(&mi).unwrap();
    let waited = honoured_at.duration_since(ready_at).as_secs();
    assert!(
        (29..=40).contains(&waited),
        "the deferred request ran {waited} s after the last refresh"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.proxy.refresh_requests(),
        1,
        "20 requests within the interval are one token request"
    );
    assert!(is_ready(&mi));
}

/// A refresh request does not bypass the provider's Retry-After: the request waits for it and is
/// honoured after (main: every new value sent a token request at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_request_waits_out_the_providers_retry_after() {
    let env = Env::new("cap-retry-after", support::oauth::with_token_ttl(600)).await;
    let op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    env.proxy.set_fault(Fault::RateLimited {
        retry_after_secs: 60,
    });
    env.proxy.reset_counts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    annotate_refresh(&env, "inbox", "first").await;
    env.wait_condition(
        "inbox",
        ("Reconciling", "True", "RateLimited"),
        Duration::from_secs(20),
        &op,
    )
    .await;
    assert_eq!(env.proxy.refresh_requests(), 1);
    for i in 0..10 {
        annotate_refresh(&env, "inbox", &format!("again-{i}")).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        env.proxy.refresh_requests(),
        1,
        "no token request before the Retry-After of 60 s is over, however often a refresh is requested\n{}",
        support::world::tail(&op.log(), 30)
    );
    let mi = env.get("inbox").await;
    assert_ne!(
        mi.status
            .as_ref()
            .and_then(|s| s.last_refresh_request.as_deref()),
        Some("again-9"),
        "the request is still pending"
    );
}

/// A control plane of this module's own: the operator below watches every namespace (one
/// controller, shared workers, as the chart installs it), which must not reach the other tests'.
fn own_control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let cp = ControlPlane::start_dedicated();
        cp.install_crd();
        cp
    })
}

/// A namespace whose token endpoint hangs holds at most its share of the reconcile workers
/// (`--max-namespace-share`, half by default): another namespace's integration goes Ready within
/// 10 s (main: both workers of `--concurrency=2` waited 30 s for the hanging endpoint first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_whose_token_endpoint_hangs_does_not_hold_the_other_namespaces() {
    let cp = own_control_plane();
    let slow = Env::new_on(cp, "cap-hang", support::oauth::with_token_ttl(600)).await;
    let other = Env::new_on(cp, "cap-hang-other", support::oauth::with_token_ttl(600)).await;
    // All namespaces, as the chart runs it by default; two workers.
    let op = Operator::start(
        "operator",
        &cp.kubeconfig,
        &["--concurrency=2"],
        slow.log_dir.path(),
    );

    slow.client_secret(slow.server.client_secret()).await;
    slow.proxy.set_fault(Fault::Slow(Duration::from_secs(120)));
    for name in ["hang-1", "hang-2", "hang-3"] {
        slow.grant(name, "alice").await;
        slow.integration(name, "alice@example.test").await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow.proxy.token_requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the hanging endpoint got no request\n{}",
            support::world::tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The hanging namespace's calls are under way (and stay so for the operator's 30 s timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;

    other.client_secret(other.server.client_secret()).await;
    other.grant("inbox", "alice").await;
    let created = Instant::now();
    other.integration("inbox", "alice@example.test").await;
    other
        .wait_for("inbox", "Ready", Duration::from_secs(10), &op, is_ready)
        .await;
    let took = created.elapsed();
    assert_eq!(
        slow.proxy.token_requests(),
        1,
        "the hanging namespace's share (1 of 2 workers) is one call at a time, the others deferred"
    );
    eprintln!("the other namespace went Ready {took:?} after its integration was created");
}

/// A revocation endpoint that keeps failing is retried with the refreshes' backoff (5 s doubling,
/// jittered), not every 5 s (main: 7 requests in 30 s), until `--revoke-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_revocation_endpoint_is_retried_with_backoff() {
    let env = Env::new("cap-revoke", support::oauth::with_token_ttl(600)).await;
    let op = env.operator_with("operator", &["--revoke-timeout=45s"]);
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"revokeOnDelete": true}),
    )
    .await;
    env.wait_for("inbox", "Ready", Duration::from_secs(30), &op, is_ready)
        .await;
    // Nothing answers behind the proxy any more: every revocation fails.
    env.proxy.set_upstream("http://127.0.0.1:9");
    env.proxy.reset_counts();
    env.integrations()
        .delete("inbox", &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let tries = env.proxy.requests("/token/revocation");
    // At 0, 4-6, 12-18 and 28-42 s: 3 or 4 in 30 s.
    assert!(
        (2..=4).contains(&tries),
        "{tries} revocation requests in 30 s\n{}",
        support::world::tail(&op.log(), 30)
    );
}

/// A mail server that accepts connections and never says anything: every check of it takes the
/// whole check timeout (10 s). Returns its port and how many connections it accepted.
fn silent_mail_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            open.push(stream);
        }
    });
    (port, accepted)
}

fn mailbox_condition(mi: &mail_integration_operator::api::MailIntegration) -> Option<(&str, &str)> {
    condition(mi, "MailboxConnected")
}

/// A namespace whose mail server never answers runs at most its share of the mailbox checks (4 of
/// the 8 that run at once, `--mailbox-check-concurrency=8`): another namespace's check runs at once (main: it queued behind the
/// first namespace's twelve checks of 10 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_whose_mail_server_hangs_does_not_hold_the_other_namespaces_checks() {
    let env = Env::new("cap-mail", support::oauth::with_token_ttl(600)).await;
    let other = Env::new("cap-mail-other", support::oauth::with_token_ttl(600)).await;
    // 8 checks at once (the default is 32): twelve silent checks are then more than the share.
    let op = env.operator_with(
        "operator",
        &["--namespace", &other.ns, "--mailbox-check-concurrency=8"],
    );
    let (port, accepted) = silent_mail_server();

    env.client_secret(env.server.client_secret()).await;
    let names: Vec<String> = (1..=12).map(|i| format!("silent-{i}")).collect();
    // The grants first (a sign-in each), then the integrations together, so that their checks
    // start within a second or two of each other.
    for name in &names {
        env.grant(name, "alice").await;
    }
    for name in &names {
        env.integration_with(
            name,
            "alice@example.test",
            serde_json::json!({"mailbox": {"server": {"host": "127.0.0.1", "port": port, "tls": "Implicit"}}}),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "the silent mail server got {} connections\n{}",
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            support::world::tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let checking = accepted.load(std::sync::atomic::Ordering::SeqCst);

    other.client_secret(other.server.client_secret()).await;
    other.grant("inbox", "alice").await;
    let created = Instant::now();
    other
        .integration_with(
            "inbox",
            "alice@example.test",
            serde_json::json!({"mailbox": {"server": {"host": "127.0.0.1", "port": support::process::CLOSED_PORT, "tls": "Implicit"}}}),
        )
        .await;
    let mi = other
        .wait_for(
            "inbox",
            "MailboxConnected reported",
            Duration::from_secs(6),
            &op,
            |mi| mailbox_condition(mi).is_some_and(|c| c.1 == "MailboxUnreachable"),
        )
        .await;
    assert_eq!(
        mailbox_condition(&mi),
        Some(("False", "MailboxUnreachable"))
    );
    assert_eq!(
        checking, 4,
        "the silent namespace runs 4 checks at once (half of 8), the others wait for its share"
    );
    eprintln!(
        "the other namespace's check was reported {:?} after its integration was created",
        created.elapsed()
    );
}
