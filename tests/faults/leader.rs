//! Issue 26, points 1 and 2: the promise "no refresh token dropped or presented twice" in the
//! chart's own configuration (leader election on, two replicas, the chart's flags, the Lease in the
//! test namespace), both replicas talking to the API server through one [`ApiProxy`]. Counted at
//! the token endpoint (oidc-provider with strict rotation behind the fault proxy, which records
//! every refresh token presented): 0 presentations of a rotated-out token, 0 grants lost, Ready
//! again afterwards. docs/operations.md ("What happens on each failure") names each test.

use super::*;
use support::api_proxy::{ApiProxy, Match};

/// The chart's leader-election flags (values.yaml: `leaderElection.enabled: true`,
/// `leaseDurationSeconds: 15`; `shutdownTimeout` is the operator's default, 70 s), with the Lease
/// in the test namespace, both durations at the binary's protocol [`SCALE`] (15 s -> 8 s, 70 s ->
/// 35 s), so that they keep their place among the protocol's windows.
fn chart_flags(ns: &str) -> Vec<String> {
    vec![
        "--leader-election".into(),
        "--leader-election-namespace".into(),
        ns.into(),
        "--leader-election-lease-seconds".into(),
        15u32.div_ceil(SCALE).to_string(),
        scaled_drain(),
    ]
}

/// The operator's default drain limit (`--shutdown-timeout`, 70 s) at [`SCALE`].
fn scaled_drain() -> String {
    format!(
        "--shutdown-timeout={}ms",
        scaled(Duration::from_secs(70)).as_millis()
    )
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn refresh_token_of(s: &Secret) -> String {
    String::from_utf8(s.data.as_ref().unwrap()["refresh_token"].0.clone()).unwrap()
}

/// A second integration `name` of alice's, Ready.
async fn another_ready_integration(env: &Env, op: &Operator, name: &str) {
    env.grant(name, "alice").await;
    env.integration(name, "alice@example.test").await;
    env.wait_for(name, "Ready=True", Duration::from_secs(30), op, is_ready)
        .await;
}

/// The API server out of reach of both replicas for `outage` (every connection cut and refused)
/// right after the provider answered a rotating refresh of the leader: the leader's fence lapses
/// and it loses the Lease, but it keeps the rotated refresh token and stores it once the API server
/// is back, then exits to restart as a standby. The standby, which takes over, waits for the
/// leader's write-ahead mark meanwhile, and refreshes with the stored token. On main, the leader
/// drained, exited non-zero and dropped the token (the grant Secret kept the spent one), and the
/// next leader presented the spent token: GrantLostInFlight.
async fn an_api_server_outage_during_a_rotating_refresh(prefix: &str, outage: Duration) {
    let env = faults_env(prefix, long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let flags = chart_flags(&env.ns);
    let flags = strs(&flags);
    let mut a = env.operator_with_kubeconfig("operator-a", &kubeconfig, &flags);
    env.ready_integration(&a, "inbox").await;
    let b = env.operator_with_kubeconfig("operator-b", &kubeconfig, &flags);
    let spent = refresh_token_of(&grant_secret(&env, "inbox").await);

    // The provider answers (and rotates); the API server goes away before the answer reaches the
    // operator.
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || api.partition(),
    );
    let cut_at = Instant::now();
    // operator-a's mark on inbox (written before it presented): its first word names the process.
    let a_holder = mark(&grant_secret(&env, "inbox").await)
        .and_then(|m| m.split(' ').next().map(str::to_owned))
        .expect("operator-a marked inbox's refresh before presenting");
    tokio::time::sleep(outage).await;
    api.heal();
    let healed_at = Instant::now();
    let exited = wait_exit(&mut a, Duration::from_secs(120));
    let log_a = a.log();
    assert!(log_a.contains("lost the Lease"), "{}", tail(&log_a, 30));
    let stored = refresh_token_of(&grant_secret(&env, "inbox").await);
    // Compared, never printed: a refresh token stays out of the test's output too.
    assert!(
        stored != spent,
        "the rotated refresh token held in memory was stored after the outage, before the exit:\n{}",
        tail(&log_a, 40)
    );
    assert!(
        log_a.contains("stored a held grant before exiting"),
        "{}",
        tail(&log_a, 30)
    );
    // operator-a took its mark off. The standby leads once the Lease lapses and may have marked a
    // refresh of its own since (the refresh request operator-a had not reported handled): only a
    // mark of operator-a's is wrong.
    let left = mark(&grant_secret(&env, "inbox").await);
    assert!(
        left.as_deref()
            .is_none_or(|m| !m.starts_with(&format!("{a_holder} "))),
        "operator-a left its mark on inbox: {left:?}\n{}",
        tail(&log_a, 40)
    );

    // The standby leads now and refreshes with the stored token.
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(90), &b).await;
    let mi = env
        .wait_for(
            "inbox",
            "Ready under the new leader",
            Duration::from_secs(30),
            &b,
            |mi| is_ready(mi) && settled(mi),
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let refreshes = assert_no_reuse(&env, prefix);
    eprintln!(
        "{prefix}: API server out of reach for {:?}; the old leader stored the held token and exited {exited:?} after the outage ended; {refreshes} refreshes, 0 presented twice, 0 grants lost",
        healed_at.duration_since(cut_at),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_of_30_s_during_a_rotating_refresh_loses_no_grant() {
    an_api_server_outage_during_a_rotating_refresh("outage-30", scaled(Duration::from_secs(30)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_of_90_s_during_a_rotating_refresh_loses_no_grant() {
    an_api_server_outage_during_a_rotating_refresh("outage-90", scaled(Duration::from_secs(90)))
        .await;
}

/// SIGTERM while one refresh waits 25 s for the provider's answer (the provider has rotated the
/// token already) and another's write-ahead mark is on its way (held at the API proxy): the fence
/// closes at once, so the second refresh presents nothing (its mark is taken off again); the first
/// gets its answer, its grant write is held 20 s more (beyond the store's own bound, so the token
/// is held in memory), and the process stores it before it exits, within the default drain.
/// Then the next operator (the standby, with leader election) refreshes both. On main, the second
/// refresh presented its token after SIGTERM, and the 40 s drain aborted the first before its
/// grant was stored: the rotated token was lost.
async fn sigterm_with_the_provider_answering_after_25_s(prefix: &str, leader_election: bool) {
    let env = faults_env(prefix, long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let flags = if leader_election {
        chart_flags(&env.ns)
    } else {
        vec![scaled_drain()]
    };
    let flags = strs(&flags);
    let mut a = env.operator_with_kubeconfig("operator-a", &kubeconfig, &flags);
    env.ready_integration(&a, "inbox").await;
    another_ready_integration(&env, &a, "inbox2").await;
    let standby =
        leader_election.then(|| env.operator_with_kubeconfig("operator-b", &kubeconfig, &flags));
    let spent = refresh_token_of(&grant_secret(&env, "inbox").await);
    let unspent = refresh_token_of(&grant_secret(&env, "inbox2").await);

    // inbox: the provider answers (rotating), the answer is held back from the operator.
    let held_mark = api.hold(Match::suffix("PATCH", "/secrets/inbox2-oauth-grant"));
    env.proxy.hold_token_responses(1);
    force_refresh(&env, "inbox").await;
    env.proxy
        .wait_held_token_responses(1, Duration::from_secs(30));
    // operator-a's mark on inbox (written before it presented): its first word names the process.
    let a_holder = mark(&grant_secret(&env, "inbox").await)
        .and_then(|m| m.split(' ').next().map(str::to_owned))
        .expect("operator-a marked inbox's refresh before presenting");
    // inbox2: its write-ahead mark is on its way to the API server.
    force_refresh(&env, "inbox2").await;
    held_mark.wait_held(1, Duration::from_secs(30));
    let presented = env.proxy.refresh_requests();
    let held_store = api.hold(Match::suffix("PUT", "/secrets/inbox-oauth-grant"));
    // With leader election the old leader releases the Lease once its drain ended, before it
    // stores its held grant and exits, and the standby may lead (and refresh) from then on: the
    // old leader's provider calls and inbox2's grant are read when it released the Lease.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let holder = || async {
        leases
            .get_opt("mail-integration-operator")
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    let leader_id = if leader_election {
        holder().await
    } else {
        None
    };
    assert!(
        !leader_election || leader_id.is_some(),
        "operator-a holds the Lease"
    );

    signal(&a, "TERM");
    let term_at = Instant::now();
    tokio::time::sleep(scaled(Duration::from_secs(3))).await;
    // The mark lands within its budget: on main, inbox2's token was presented now.
    held_mark.release();
    tokio::time::sleep(scaled(Duration::from_secs(22))).await;
    env.proxy.release_token_responses();
    // The answer reaches the operator 25 s after SIGTERM (at the binary's scale: 12.5 s, within
    // the provider timeout of 15 s); its grant write waits 20 s (10 s) more, beyond the store's
    // own bound.
    tokio::time::sleep(scaled(Duration::from_secs(20))).await;
    held_store.drop_held();
    held_store.release();
    let waited = Instant::now();
    // (provider calls, inbox2's grant) when the Lease left operator-a (with leader election).
    let mut at_release = None;
    while a.process.is_running() {
        if at_release.is_none() && leader_id.is_some() && holder().await != leader_id {
            at_release = Some((
                env.proxy.refresh_requests(),
                grant_secret(&env, "inbox2").await,
            ));
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the operator did not exit within 60 s:\n{}",
            tail(&a.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exited = waited.elapsed();
    let exit_at = Instant::now();
    let log_a = a.log();
    let (by_a, inbox2) = match at_release {
        Some(at) => at,
        None => (
            env.proxy.refresh_requests(),
            grant_secret(&env, "inbox2").await,
        ),
    };
    assert_eq!(
        by_a,
        presented,
        "no provider call started after SIGTERM:\n{}",
        tail(&log_a, 40)
    );
    assert_eq!(
        a.process.exit_code(),
        Some(0),
        "a stop on SIGTERM ends well:\n{}",
        tail(&log_a, 30)
    );
    let stored = refresh_token_of(&grant_secret(&env, "inbox").await);
    assert!(
        stored != spent,
        "the rotated refresh token was stored before the exit:\n{}",
        tail(&log_a, 40)
    );
    // operator-a took its mark off. With leader election the standby leads from the Lease's
    // release and may have marked a refresh of its own since (the request operator-a had not yet
    // reported handled): only a mark of operator-a's is wrong.
    let left = mark(&grant_secret(&env, "inbox").await);
    assert!(
        left.as_deref()
            .is_none_or(|m| leader_election && !m.starts_with(&format!("{a_holder} "))),
        "operator-a left its mark on inbox: {left:?}\n{}",
        tail(&log_a, 40)
    );
    assert!(
        refresh_token_of(&inbox2) == unspent,
        "inbox2's refresh token was never presented, so it is unchanged"
    );
    assert_eq!(
        mark(&inbox2),
        None,
        "the mark of the refresh that presented nothing was taken off:\n{}",
        tail(&log_a, 40)
    );

    // The next operator refreshes both with what is stored.
    let b = match standby {
        Some(b) => b,
        None => env.operator_with_kubeconfig("operator-b", &kubeconfig, &flags),
    };
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    force_refresh(&env, "inbox2").await;
    wait_refresh_requests(&env, n + 2, Duration::from_secs(90), &b).await;
    for name in ["inbox", "inbox2"] {
        let mi = env
            .wait_for(
                name,
                "Ready after the stop",
                Duration::from_secs(30),
                &b,
                |mi| is_ready(mi) && settled(mi),
            )
            .await;
        assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    }
    let refreshes = assert_no_reuse(&env, prefix);
    eprintln!(
        "{prefix}: exited {:?} after SIGTERM ({exited:?} after the held grant write was let through), 0 provider calls after SIGTERM; {refreshes} refreshes, 0 presented twice, 0 grants lost",
        exit_at.duration_since(term_at),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_provider_answering_after_25_s_loses_nothing_with_leader_election() {
    sigterm_with_the_provider_answering_after_25_s("term-le", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_provider_answering_after_25_s_loses_nothing_without_leader_election() {
    sigterm_with_the_provider_answering_after_25_s("term", false).await;
}
