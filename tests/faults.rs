//! Faults in the middle of a refresh, against the real kube-apiserver and the real oidc-provider
//! with refresh-token rotation on (a rotated-out refresh token presented again makes it revoke the
//! whole grant). The fault proxy in front of the token endpoint counts which refresh token each
//! request presented (by digest), so every test can assert that none was presented twice.
//!
//! docs/operations.md describes the behaviour each test checks.

mod support;

#[path = "faults/not_oauth.rs"]
mod not_oauth;

#[path = "faults/leader.rs"]
mod leader;

#[path = "faults/watches.rs"]
mod watches;

#[path = "faults/resolved_mark.rs"]
mod resolved_mark;

#[path = "faults/state.rs"]
mod state;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use mail_integration_operator::api::MailIntegration;
use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};
use support::{
    fault_proxy::Fault,
    oauth::OAuthServer,
    operator::Operator,
    world::{Env, condition, condition_message, is_ready, tail},
};

/// Access tokens that live 10 minutes: refreshes happen when a test asks for one.
fn long_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

/// Access tokens that live 8 s: a refresh every few seconds.
fn short_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(8)
}

const IN_FLIGHT: &str = "mailintegration.dev/refresh-in-flight";

/// The test-only protocol scale every operator of this binary runs with
/// (`MIO_TEST_PROTOCOL_SCALE`, docs/operations.md "Settings for tests only"): the refresh
/// protocol's windows are divided by it (the write-ahead mark's window 75 s -> 38 s, the holder
/// grace 20 s -> 10 s, the mark-write budget 10 s -> 5 s, the provider timeout 30 s -> 15 s, the
/// store deadline 20 s -> 10 s). The outages, delays, Lease durations and drain limits of the tests
/// are divided alike ([`scaled`]), so each keeps its place among the windows: a fault shorter than
/// a window stays shorter, a longer one stays longer.
const SCALE: u32 = 2;

/// `d` at the protocol scale of this binary.
fn scaled(d: Duration) -> Duration {
    d / SCALE
}

/// The write-ahead mark's in-flight window at [`SCALE`]: 74 s divided, plus the mark's 1 s resolution.
fn in_flight_window() -> Duration {
    scaled(Duration::from_secs(74)) + Duration::from_secs(1)
}

/// [`Env::new`] whose operators run at the protocol scale [`SCALE`].
async fn faults_env(prefix: &str, server: &'static OAuthServer) -> Env {
    scale(Env::new(prefix, server).await)
}

fn scale(mut env: Env) -> Env {
    env.operator_env
        .push(("MIO_TEST_PROTOCOL_SCALE", SCALE.to_string()));
    env
}

async fn force_refresh(env: &Env, name: &str) {
    let value = format!("{:?}", std::time::SystemTime::now());
    support::world::annotate_refresh(env, name, &value).await;
}

/// No refresh token was presented twice at the token endpoint; returns how many refreshes the
/// provider saw.
fn assert_no_reuse(env: &Env, what: &str) -> u64 {
    let reused = env.proxy.reused_refresh_tokens();
    assert!(
        reused.is_empty(),
        "{what}: refresh tokens presented more than once (digests): {reused:?}"
    );
    env.proxy.refresh_requests()
}

async fn grant_secret(env: &Env, name: &str) -> Secret {
    env.secrets()
        .get(&format!("{name}-oauth-grant"))
        .await
        .unwrap()
}

fn mark(s: &Secret) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(IN_FLIGHT).cloned()
}

/// Wait until the token endpoint has received `n` refresh requests in all.
async fn wait_refresh_requests(env: &Env, n: u64, timeout: Duration, op: &Operator) {
    let deadline = Instant::now() + timeout;
    while env.proxy.refresh_requests() < n {
        assert!(
            Instant::now() < deadline,
            "only {} refresh requests within {timeout:?}, expected {n}:\n{}",
            env.proxy.refresh_requests(),
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the supervised operator process has ended.
fn wait_exit(op: &mut Operator, timeout: Duration) -> Duration {
    let started = Instant::now();
    while op.process.is_running() {
        // A deadline, not a timing claim: callers pass more than the exit they wait for may take
        // (the drain limit after SIGTERM or a lost lease, or nothing after SIGKILL) with seconds to spare.
        assert!(
            started.elapsed() < timeout,
            "the operator did not exit within {timeout:?}:\n{}",
            tail(&op.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn signal(op: &Operator, sig: &str) {
    let pid = op.process.child_pid().expect("the operator runs");
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// 2. SIGTERM while a refresh waits for the provider: the process does not abort it; the provider
/// answers (and rotates), the new refresh token is stored, then the process exits. The next
/// operator refreshes with the stored token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token() {
    let env = faults_env("drain", long_lived_server()).await;
    let mut op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    let before = grant_secret(&env, "inbox").await;
    let before_rt = before.data.as_ref().unwrap()["refresh_token"].clone();

    env.proxy.set_fault(Fault::Slow(Duration::from_secs(5)));
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    let marked = grant_secret(&env, "inbox").await;
    assert!(
        mark(&marked).is_some(),
        "the grant is marked while its refresh is in flight: {:?}",
        marked.metadata.annotations
    );
    signal(&op, "TERM");
    let took = wait_exit(&mut op, Duration::from_secs(45));
    env.proxy.clear_fault();
    let after = grant_secret(&env, "inbox").await;
    assert_ne!(
        after.data.as_ref().unwrap()["refresh_token"],
        before_rt,
        "the rotated refresh token was stored before the exit:\n{}",
        tail(&op.log(), 30)
    );
    assert_eq!(mark(&after), None, "the mark is gone with the store");
    let log = op.log();
    assert!(
        log.contains("letting running refreshes store"),
        "{}",
        tail(&log, 30)
    );
    assert!(
        took >= Duration::from_secs(2),
        "the exit waited for the provider's answer ({took:?})"
    );
    assert_eq!(
        op.process.exit_code(),
        Some(0),
        "a drained SIGTERM ends with exit status 0:\n{}",
        tail(&log, 30)
    );

    let op2 = env.operator("operator-2");
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op2).await;
    let mi = env
        .wait_for(
            "inbox",
            "Ready after the restart",
            Duration::from_secs(20),
            &op2,
            |mi| is_ready(mi) && settled(mi),
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let refreshes = assert_no_reuse(&env, "drain");
    eprintln!("drain: exit after {took:?}, {refreshes} refreshes, 0 presented twice");
}

/// Nothing in progress or failing: Reconciling=False.
fn settled(mi: &MailIntegration) -> bool {
    condition(mi, "Reconciling").is_some_and(|c| c.0 == "False")
}

/// 2. The Lease taken away while a refresh waits for the provider: the leader stops taking
/// reconciles, lets the refresh store its rotated token, and exits with an error (to restart as a
/// standby). The next leader refreshes with the stored token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_during_a_refresh_drains_it_and_exits_non_zero() {
    let env = faults_env("lease-loss", long_lived_server()).await;
    let args = [
        "--leader-election",
        "--leader-election-namespace",
        &env.ns,
        "--leader-election-lease-seconds",
        "6",
    ];
    let mut op = env.operator_with("operator", &args);
    env.ready_integration(&op, "inbox").await;
    let before_rt = grant_secret(&env, "inbox").await.data.unwrap()["refresh_token"].clone();

    env.proxy.set_fault(Fault::Slow(Duration::from_secs(5)));
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    // Someone else holds the Lease now.
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    env.cp.kubectl(&[
        "patch",
        "lease",
        "mail-integration-operator",
        "-n",
        &env.ns,
        "--type=merge",
        "-p",
        &serde_json::json!({"spec": {"holderIdentity": "someone-else", "renewTime": now, "leaseDurationSeconds": 6}}).to_string(),
    ]);
    let took = wait_exit(&mut op, Duration::from_secs(45));
    env.proxy.clear_fault();
    let log = op.log();
    assert!(log.contains("lost the Lease"), "{}", tail(&log, 30));
    assert!(log.contains("Error: lost leadership"), "{}", tail(&log, 30));
    assert_eq!(
        op.process.exit_code(),
        Some(1),
        "the process ends with an error (exit status 1):\n{}",
        tail(&log, 30)
    );
    let after = grant_secret(&env, "inbox").await;
    assert_ne!(
        after.data.as_ref().unwrap()["refresh_token"],
        before_rt,
        "the rotated refresh token was stored before the exit:\n{}",
        tail(&log, 40)
    );
    assert_eq!(mark(&after), None);

    // A new leader (once "someone-else" lets the Lease expire) carries on with the stored token.
    let op2 = env.operator_with("operator-2", &args);
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(40), &op2).await;
    let mi = env
        .wait_for(
            "inbox",
            "Ready after the takeover",
            Duration::from_secs(20),
            &op2,
            |mi| is_ready(mi) && settled(mi),
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let refreshes = assert_no_reuse(&env, "lease loss");
    eprintln!("lease loss: exit after {took:?}, {refreshes} refreshes, 0 presented twice");
}

/// 6. Another writer keeps changing the grant Secret while refreshes run: every write of the
/// operator is conditional, so it reads again and puts the new refresh token on top — nothing is
/// overwritten blindly and no token is lost or reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_conflicting_writes_on_the_grant_loses_nothing() {
    let env = faults_env("conflicts", short_lived_server()).await;
    let op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    // The provider answers after 300 ms, so a bump lands between the mark and the store.
    env.proxy.set_fault(Fault::Slow(Duration::from_millis(300)));
    let secrets = env.secrets();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bumper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let patch = serde_json::json!({"metadata": {"annotations": {"example.com/bump": i.to_string()}}});
                let _ = secrets
                    .patch(
                        "inbox-oauth-grant",
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i
        })
    };
    let start = env.proxy.refresh_requests();
    wait_refresh_requests(&env, start + 4, Duration::from_secs(60), &op).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bumps = bumper.await.unwrap();
    env.proxy.clear_fault();
    let mi = env
        .wait_for(
            "inbox",
            "Ready after the storm",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let log = op.log();
    let conflicts = log
        .matches("the grant Secret changed since it was read")
        .count()
        + log.matches("decide again").count();
    assert!(
        conflicts > 0,
        "{bumps} bumps caused no conflict: the test proved nothing:\n{}",
        tail(&log, 30)
    );
    // Refreshes go on (8 s tokens): wait for a moment between two, when no mark is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let s = grant_secret(&env, "inbox").await;
        if mark(&s).is_none() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the grant stays marked: {:?}",
            s.metadata.annotations
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        after
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("example.com/bump"),
        "the other writer's annotation is kept"
    );
    // The stored refresh token is the newest: one more refresh with it works.
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    env.wait_for("inbox", "Ready", Duration::from_secs(20), &op, is_ready)
        .await;
    let refreshes = assert_no_reuse(&env, "conflict storm");
    eprintln!(
        "conflict storm: {bumps} foreign writes, {conflicts} conflicts seen, {refreshes} refreshes, 0 presented twice"
    );
}

/// 6. Secrets that cannot be written: an immutable grant is refused before the provider is called
/// (a rotated token could not be stored), and a grant deleted while its namespace terminates ends
/// the refresh with a reason instead of a retry loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason() {
    let env = faults_env("unwritable", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let grant = env.server.obtain_grant("alice").await;
    let immutable: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "frozen-oauth-grant", "labels": {"mailintegration.dev/integration": "frozen"}},
        "immutable": true,
        "stringData": {"refresh_token": grant.refresh_token()},
    }))
    .unwrap();
    env.secrets()
        .create(&PostParams::default(), &immutable)
        .await
        .unwrap();
    let n = env.proxy.refresh_requests();
    env.integration("frozen", "alice@example.test").await;
    let mi = env
        .wait_for(
            "frozen",
            "GrantSecretImmutable",
            Duration::from_secs(30),
            &op,
            |mi| condition(mi, "Ready").is_some_and(|c| c.1 == "GrantSecretImmutable"),
        )
        .await;
    let message = condition_message(&mi, "Ready");
    assert!(
        message.contains("immutable") && message.contains("sign in again"),
        "{message}"
    );
    assert_eq!(
        env.proxy.refresh_requests(),
        n,
        "an immutable grant is never presented"
    );

    // A refresh in flight when the namespace starts terminating and its Secrets go away.
    env.ready_integration(&op, "inbox").await;
    env.proxy.set_fault(Fault::Slow(Duration::from_secs(4)));
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    env.cp
        .kubectl(&["delete", "namespace", &env.ns, "--wait=false"]);
    // The namespace controller deletes the namespace's Secrets; the grant goes first here, so that
    // it is surely gone when the slow refresh ends (the controller may have taken it already).
    env.cp.kubectl(&[
        "delete",
        "secret",
        "inbox-oauth-grant",
        "-n",
        &env.ns,
        "--ignore-not-found",
    ]);
    // The refresh gives up with the reason instead of retrying the write (the status then moves
    // on to SignInRequired, the grant being gone; no event can be created in a terminating
    // namespace).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = op.log();
        if log.contains("the refreshed grant cannot be stored")
            && log.contains("NamespaceTerminating")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no NamespaceTerminating within 40 s:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The status write that reports it follows the log line, unless the namespace controller has
    // deleted the integration by then.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match env.integrations().get_opt("inbox").await.unwrap() {
            None => break None,
            Some(mi) if !is_ready(&mi) => break mi.status,
            Some(mi) => assert!(
                Instant::now() < deadline,
                "inbox still Ready 20 s after giving up: {:?}\n{}",
                mi.status,
                tail(&op.log(), 30)
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    env.proxy.clear_fault();
    let presented = env.proxy.refresh_requests();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        env.proxy.refresh_requests(),
        presented,
        "no refresh after giving up: {status:?}"
    );
    let refreshes = assert_no_reuse(&env, "unwritable");
    eprintln!("unwritable: {refreshes} refreshes, 0 presented twice");
}

/// 7. Two operators without leader election (a mistake the chart prevents): the write-ahead mark
/// lets only one present a rotating grant's refresh token at a time; the other waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_without_leader_election_never_present_a_token_twice() {
    let env = faults_env("two-unlocked", short_lived_server()).await;
    let a = env.operator("operator-a");
    let b = env.operator("operator-b");
    env.ready_integration(&a, "inbox").await;
    let start = env.proxy.refresh_requests();
    wait_refresh_requests(&env, start + 6, Duration::from_secs(60), &a).await;
    // Both took part, by the API server's own record: each operator (an API user of its own)
    // stored the grant at least once, so refreshes really came from both sides.
    let stored_grant = |op: &Operator| {
        let user = op
            .api_user
            .as_ref()
            .expect("an operator of Env has its own API user");
        support::api_audit::requests_of(user)
            .iter()
            .filter(|r| {
                r.resource == "secrets"
                    && r.name.as_deref() == Some("inbox-oauth-grant")
                    && matches!(r.verb.as_str(), "update" | "patch")
                    && r.code == 200
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while stored_grant(&a) == 0 || stored_grant(&b) == 0 {
        assert!(
            Instant::now() < deadline,
            "within 90 s one of the two operators never wrote the grant (a: {}, b: {}):\n--- a ---\n{}\n--- b ---\n{}",
            stored_grant(&a),
            stored_grant(&b),
            tail(&a.log(), 20),
            tail(&b.log(), 20)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mi = env
        .wait_for("inbox", "Ready", Duration::from_secs(20), &a, is_ready)
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let refreshes = assert_no_reuse(&env, "two operators");
    eprintln!(
        "two operators: {refreshes} refreshes ({} grant writes by a, {} by b), 0 presented twice",
        stored_grant(&a),
        stored_grant(&b)
    );
}

/// Access tokens that live 20 s: refreshes every dozen seconds, with quiet time between them.
fn twenty_second_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(20)
}

/// Hold the provider's answer to the next token request back from the operator (the provider
/// has answered: the refresh token is rotated), run `trigger` (what makes the operator refresh, if
/// anything) and, once an answer is held, `then` (an API fault); then let the answer through.
fn after_the_provider_answers(env: &Env, trigger: impl FnOnce(), then: impl FnOnce()) {
    env.proxy.hold_token_responses(1);
    trigger();
    env.proxy
        .wait_held_token_responses(1, Duration::from_secs(30));
    then();
    env.proxy.release_token_responses();
}

/// Ask for one refresh now, from blocking code.
fn force_refresh_blocking(env: &Env, name: &str) {
    let value = format!("{:?}", std::time::SystemTime::now());
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/refresh-requested-at": value}}});
    env.cp.kubectl(&[
        "patch",
        "mailintegration",
        name,
        "-n",
        &env.ns,
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

/// 1. kill -9 after the provider rotated the refresh token and before the grant write (held at the
/// API proxy): the new token is gone with the process. The next operator finds the write-ahead
/// mark, waits while it may still be in flight, then tries the stored token exactly once; the
/// provider (strict rotation) refuses it, and the integration says GrantLostInFlight with a
/// sign-in link — the spent token is not presented again and again. A new grant brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_the_providers_answer_and_the_grant_write_is_reported_not_retried() {
    use support::api_proxy::{ApiProxy, Match};
    let env = faults_env("kill-9", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut a = env.operator_with_kubeconfig("operator-a", &kubeconfig, &[]);
    env.ready_integration(&a, "inbox").await;
    let spent = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();

    let mut store = None;
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || store = Some(api.hold(Match::suffix("PUT", "/secrets/inbox-oauth-grant"))),
    );
    let store = store.unwrap();
    store.wait_held(1, Duration::from_secs(20));
    let killed_at = Instant::now();
    signal(&a, "KILL");
    wait_exit(&mut a, Duration::from_secs(10));
    store.drop_held();
    let marked = grant_secret(&env, "inbox").await;
    let holder = mark(&marked).expect("the cut-off refresh left its mark");
    assert_eq!(
        env.data("inbox-oauth-grant", "refresh_token")
            .await
            .unwrap(),
        spent,
        "the rotated token never reached the grant"
    );

    // The next operator (straight to the API server).
    let b = env.operator("operator-b");
    force_refresh(&env, "inbox").await;
    let mi = env
        .wait_for(
            "inbox",
            "GrantLostInFlight",
            Duration::from_secs(120),
            &b,
            |mi| condition(mi, "Ready").is_some_and(|c| c.1 == "GrantLostInFlight"),
        )
        .await;
    let reported_after = killed_at.elapsed();
    let message = condition_message(&mi, "Ready");
    let holder_process = holder.split(' ').next().unwrap();
    assert!(
        message.contains(holder_process) && message.contains("sign in again"),
        "{message}"
    );
    assert!(
        mi.status.as_ref().unwrap().sign_in.is_some(),
        "a sign-in link is offered"
    );
    let events = env
        .cp
        .kubectl(&["get", "events", "-n", &env.ns, "-o", "yaml"]);
    assert!(
        events.contains("GrantLostInFlight"),
        "an event says what happened"
    );
    // The spent token: once by the killed process, once by the single try. Never again.
    let presented = |t: &str| {
        env.proxy
            .presentations()
            .get(&support::fault_proxy::digest(t))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(presented(&spent), 2, "{}", tail(&b.log(), 30));
    tokio::time::sleep(Duration::from_secs(8)).await;
    force_refresh(&env, "inbox").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(presented(&spent), 2, "no retry of a lost grant");
    let others: Vec<String> = env
        .proxy
        .reused_refresh_tokens()
        .into_iter()
        .filter(|d| *d != support::fault_proxy::digest(&spent))
        .collect();
    assert!(
        others.is_empty(),
        "no other token presented twice: {others:?}"
    );

    // A new grant (what a sign-in stores) and the integration is Ready again.
    let fresh = env.grant("inbox", "alice").await;
    env.wait_for(
        "inbox",
        "Ready with the new grant",
        Duration::from_secs(30),
        &b,
        is_ready,
    )
    .await;
    assert_eq!(presented(&fresh), 1);
    eprintln!(
        "kill -9: GrantLostInFlight reported {reported_after:?} after the kill (the mark's in-flight window is {:?} here, 75 s in production, and the holder grace {:?}); the spent token presented 2 times (the cut-off request and the single try), every other token once; {} refreshes",
        in_flight_window(),
        scaled(Duration::from_secs(20)),
        env.proxy.refresh_requests()
    );
}

/// Persist or say so: a grant write that keeps failing after the provider rotated leaves the
/// integration not Ready with GrantNotStored (the new token held in memory), retried with backoff;
/// once the write works, the token is stored before anything else and the integration is Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_write_that_keeps_failing_says_so_and_lands_later() {
    use support::api_proxy::{ApiProxy, Match};
    let env = faults_env("persist", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let op = env.operator_with_kubeconfig("operator", &kubeconfig, &[]);
    env.ready_integration(&op, "inbox").await;
    let before = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();

    let mut failing = None;
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || {
            failing = Some(api.fail_with_message(
                Match::suffix("PUT", "/secrets/inbox-oauth-grant"),
                500,
                None,
                Some("etcdserver: request timed out"),
            ))
        },
    );
    let failing = failing.unwrap();
    let mi = env
        .wait_condition(
            "inbox",
            ("Ready", "False", "GrantNotStored"),
            Duration::from_secs(60),
            &op,
        )
        .await;
    let message = condition_message(&mi, "Ready");
    assert!(
        message.contains("held only in this operator's memory") && message.contains("etcdserver"),
        "{message}"
    );
    assert_eq!(
        env.data("inbox-oauth-grant", "refresh_token")
            .await
            .unwrap(),
        before
    );
    let tries = failing.hits();
    assert!(tries >= 2, "the write was retried: {tries}");
    let refreshes = env.proxy.refresh_requests();
    failing.remove();
    env.wait_for(
        "inbox",
        "Ready once stored",
        Duration::from_secs(60),
        &op,
        |mi| is_ready(mi) && settled(mi),
    )
    .await;
    assert_ne!(
        env.data("inbox-oauth-grant", "refresh_token")
            .await
            .unwrap(),
        before,
        "the token held in memory was stored"
    );
    assert_eq!(mark(&grant_secret(&env, "inbox").await), None);
    // Stored, not refreshed again meanwhile: the held token was written before anything else.
    let after = env.proxy.refresh_requests();
    assert!(after <= refreshes + 1, "{refreshes} → {after}");
    let refreshes = assert_no_reuse(&env, "persist or say so");
    eprintln!(
        "persist or say so: {tries} failed grant writes, GrantNotStored shown, stored after the fault; {refreshes} refreshes, 0 presented twice"
    );
}

/// 4. The leader cut off from the API server but not from the provider: its fence lapses before
/// its Lease expires, so it stops calling the provider; the standby takes over once the Lease
/// expired. The token endpoint never sees the same refresh token twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_stops_before_the_standby_takes_over() {
    use support::api_proxy::ApiProxy;
    let env = faults_env("partition", twenty_second_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let args = [
        "--leader-election",
        "--leader-election-namespace",
        &env.ns,
        "--leader-election-lease-seconds",
        "6",
    ];
    let mut a = env.operator_with_kubeconfig("operator-a", &kubeconfig, &args);
    env.ready_integration(&a, "inbox").await;
    let b = env.operator_with("operator-b", &args);
    // Two more refreshes by the leader, then cut it off right after one was stored (the next is
    // due in about a dozen seconds: none is in flight).
    let start = env.proxy.refresh_requests();
    wait_refresh_requests(&env, start + 2, Duration::from_secs(60), &a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while mark(&grant_secret(&env, "inbox").await).is_some() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let by_a = env.proxy.refresh_requests();
    api.partition();
    let cut_at = Instant::now();
    let stepped_down = wait_exit(&mut a, Duration::from_secs(60));
    let log_a = a.log();
    assert!(log_a.contains("lost the Lease"), "{}", tail(&log_a, 30));
    // The standby refreshes from now on.
    wait_refresh_requests(&env, by_a + 2, Duration::from_secs(90), &b).await;
    let recovered = cut_at.elapsed();
    let mi = env
        .wait_for(
            "inbox",
            "Ready under the new leader",
            Duration::from_secs(30),
            &b,
            is_ready,
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    assert!(
        !log_a.contains("refreshing the access token") || {
            // Any refresh A started after the cut must have been refused by its fence.
            let after_cut = log_a.rsplit("lost the Lease").next().unwrap_or("");
            !after_cut.contains("stored the grant")
        },
        "{}",
        tail(&log_a, 30)
    );
    let refreshes = assert_no_reuse(&env, "partition");
    eprintln!(
        "partition: the old leader stepped down {stepped_down:?} after the cut; the standby's second refresh {recovered:?} after it; {refreshes} refreshes, 0 presented twice"
    );
    api.heal();
}

/// A control plane of this test binary's own, for the test that stops its API server.
fn restartable_control_plane() -> &'static support::control_plane::ControlPlane {
    static CP: OnceLock<support::control_plane::ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let cp = support::control_plane::ControlPlane::start_dedicated();
        cp.install_crd();
        cp
    })
}

/// 3. kube-apiserver stopped for 60 s (at [`SCALE`]: 30 s, shorter than the mark's window) while refreshes are due (one of them between the provider's
/// answer and the grant write), then started again on the same etcd data: the rotated token held in
/// memory is stored first, refreshing resumes, nothing is presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_down_for_a_minute_loses_nothing() {
    let cp = restartable_control_plane();
    let env = scale(Env::new_on(cp, "apiserver-down", short_lived_server()).await);
    let op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    let start = env.proxy.refresh_requests();
    wait_refresh_requests(&env, start + 1, Duration::from_secs(30), &op).await;

    // The next refresh: the provider answers, and the API server goes away before the operator
    // can store the new refresh token.
    after_the_provider_answers(&env, || {}, || cp.stop_apiserver());
    let stopped_at = Instant::now();
    std::thread::sleep(scaled(Duration::from_secs(60)));
    let during = env.proxy.refresh_requests();
    cp.start_apiserver();
    let started_at = Instant::now();
    wait_refresh_requests(&env, during + 2, Duration::from_secs(120), &op).await;
    let mi = env
        .wait_for(
            "inbox",
            "Ready after the outage",
            Duration::from_secs(60),
            &op,
            |mi| is_ready(mi) && settled(mi),
        )
        .await;
    let recovered = started_at.elapsed();
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let log = op.log();
    assert!(
        log.contains("holding it in memory") && log.contains("stored the grant held in memory"),
        "the rotated token was kept in memory and stored after the outage:\n{}",
        tail(&log, 40)
    );
    let refreshes = assert_no_reuse(&env, "API server down");
    eprintln!(
        "API server down {:?}: {} refreshes during the outage (none can start: the mark needs the API), Ready {recovered:?} after the restart; {refreshes} refreshes, 0 presented twice",
        started_at.duration_since(stopped_at),
        during - start
    );
}
