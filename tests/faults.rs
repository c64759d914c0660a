//! Faults in the middle of a refresh, against the real kube-apiserver and the real oidc-provider
//! with refresh-token rotation on (a rotated-out refresh token presented again makes it revoke the
//! whole grant). The fault proxy in front of the token endpoint counts which refresh token each
//! request presented (by digest), so every test can assert that none was presented twice.
//!
//! docs/operations.md describes the behaviour each test checks.

mod support;

#[path = "faults/not_oauth.rs"]
mod not_oauth;

#[path = "faults/shared.rs"]
mod shared;
#[allow(unused_imports)]
use shared::*;

#[path = "faults/grant.rs"]
mod grant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_that_are_not_oauth_answers_are_retried_and_lose_no_grant() {
    not_oauth::pages_that_are_not_oauth_answers_are_retried_and_lose_no_grant(Deploy::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_storm_on_the_mark_write_shows_and_recovers() {
    not_oauth::a_conflict_storm_on_the_mark_write_shows_and_recovers(Deploy::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_write_slower_than_its_budget_presents_nothing() {
    not_oauth::a_mark_write_slower_than_its_budget_presents_nothing(Deploy::Single).await;
}

#[path = "faults/watches.rs"]
mod watches;

#[path = "faults/resolved_mark.rs"]
mod resolved_mark;

#[path = "faults/state.rs"]
mod state;

/// Fault 2: SIGTERM while a refresh waits for the provider: drained, the rotated token stored, the next
/// operator refreshes with it. (`faults/grant.rs`; with leader election in
/// `tests/faults_leader.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token() {
    grant::sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token(Deploy::Single).await;
}

/// Fault 6: Another writer keeps changing the grant Secret while refreshes run: nothing overwritten, lost
/// or reused. (`faults/grant.rs`; with leader election in `tests/faults_leader.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_conflicting_writes_on_the_grant_loses_nothing() {
    grant::a_storm_of_conflicting_writes_on_the_grant_loses_nothing(Deploy::Single).await;
}

/// Fault 6: Secrets that cannot be written: refused before the provider is called, or given up with a
/// reason. (`faults/grant.rs`; with leader election in `tests/faults_leader.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason() {
    grant::an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason(Deploy::Single)
        .await;
}

/// Fault 1: kill -9 between the provider's answer and the grant write: GrantLostInFlight after one try,
/// never retried. (`faults/grant.rs`; with leader election in `tests/faults_leader.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_the_providers_answer_and_the_grant_write_is_reported_not_retried() {
    grant::kill_9_between_the_providers_answer_and_the_grant_write_is_reported_not_retried(
        Deploy::Single,
    )
    .await;
}

/// Persist or say so: GrantNotStored while the rotated token is only in memory, stored once a write
/// works. (`faults/grant.rs`; with leader election in `tests/faults_leader.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_write_that_keeps_failing_says_so_and_lands_later() {
    grant::a_grant_write_that_keeps_failing_says_so_and_lands_later(Deploy::Single).await;
}

/// Fault 2: The Lease taken away while a refresh waits for the provider: the leader stops taking
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

/// Fault 7: Two operators without leader election (a mistake the chart prevents): the write-ahead mark
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

/// Fault 4: The leader cut off from the API server but not from the provider: its fence lapses before
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

/// Fault 3: kube-apiserver stopped for 60 s (at [`SCALE`]: 30 s, shorter than the mark's window) while
/// refreshes are due (one of them between the provider's
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
