//! The fault scenarios about the grant that `tests/faults.rs` runs without leader election (one
//! operator process) and `tests/faults_leader.rs` runs as the chart deploys the operator (leader
//! election on, two replicas, the chart's flags, ServiceAccount and RBAC): each proves, counted at
//! the token endpoint, that no refresh token is presented twice and no grant is lost, both ways.

use super::*;
use support::api_proxy::{ApiProxy, Match};

/// Fault 2: SIGTERM while a refresh waits for the provider: the process does not abort it; the provider
/// answers (and rotates), the new refresh token is stored, then the process exits. The next
/// operator refreshes with the stored token.
pub async fn sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token(deploy: Deploy) {
    let env = faults_env("drain", long_lived_server()).await;
    let mut ops = deploy.operators(&env, None);
    let mut op = ops.first(&env);
    env.ready_integration(&op, "inbox").await;
    ops.start_standby(&env);
    let before = grant_secret(&env, "inbox").await;
    let before_rt = before.data.as_ref().unwrap()["refresh_token"].clone();

    env.proxy.set_fault(Fault::Slow(Duration::from_secs(5)));
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    let marked = grant_secret(&env, "inbox").await;
    // The draining operator's mark: its first word names the process.
    let holder = mark(&marked)
        .and_then(|m| m.split(' ').next().map(str::to_owned))
        .unwrap_or_else(|| {
            panic!(
                "the grant is marked while its refresh is in flight: {:?}",
                marked.metadata.annotations
            )
        });
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
    // The draining operator took its mark off with the store. With leader election the standby
    // leads once the Lease is released and may have marked a refresh of its own since (the
    // refresh request the drained operator stored but did not report handled): only a mark of
    // the drained operator's is wrong (as after an outage, tests/faults/leader.rs).
    let left = mark(&after);
    assert!(
        left.as_deref()
            .is_none_or(|m| !m.starts_with(&format!("{holder} "))),
        "the mark is gone with the store: {left:?}\n{}",
        tail(&op.log(), 30)
    );
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

    let op2 = ops.next(&env, "operator-2");
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

/// Fault 6: Another writer keeps changing the grant Secret while refreshes run: every write of the
/// operator is conditional, so it reads again and puts the new refresh token on top — nothing is
/// overwritten blindly and no token is lost or reused.
pub async fn a_storm_of_conflicting_writes_on_the_grant_loses_nothing(deploy: Deploy) {
    let env = faults_env("conflicts", short_lived_server()).await;
    let mut ops = deploy.operators(&env, None);
    let op = ops.first(&env);
    env.ready_integration(&op, "inbox").await;
    ops.start_standby(&env);
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

/// Fault 6: Secrets that cannot be written: an immutable grant is refused before the provider is called
/// (a rotated token could not be stored), and a grant deleted while its namespace terminates ends
/// the refresh with a reason instead of a retry loop.
pub async fn an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason(deploy: Deploy) {
    let env = faults_env("unwritable", long_lived_server()).await;
    let mut ops = deploy.operators(&env, None);
    let op = ops.first(&env);
    ops.start_standby(&env);
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
    // The refresh gives up instead of retrying the write: the grant Secret is gone, and the
    // operator never creates one from memory (it says so), or a create it still makes (the token
    // Secret's) is refused with NamespaceTerminating. The status then moves on to
    // SignInRequired; no event can be created in a terminating namespace.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = op.log();
        if (log.contains("the refreshed grant cannot be stored")
            && log.contains("NamespaceTerminating"))
            || log.contains("the refreshed token is dropped, not written into a new one")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no giving up (grant gone, or NamespaceTerminating) within 40 s:\n{}",
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

/// Fault 1: kill -9 after the provider rotated the refresh token and before the grant write (held at the
/// API proxy): the new token is gone with the process. The next operator finds the write-ahead
/// mark, waits while it may still be in flight, then tries the stored token exactly once; the
/// provider (strict rotation) refuses it, and the integration says GrantLostInFlight with a
/// sign-in link — the spent token is not presented again and again. A new grant brings it back.
pub async fn kill_9_between_the_providers_answer_and_the_grant_write_is_reported_not_retried(
    deploy: Deploy,
) {
    let env = faults_env("kill-9", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut ops = deploy.operators(&env, Some((&api, &kubeconfig)));
    let mut a = ops.first(&env);
    env.ready_integration(&a, "inbox").await;
    ops.start_standby(&env);
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

    // The next operator (straight to the API server): the standby, with leader election.
    let b = ops.next(&env, "operator-b");
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
pub async fn a_grant_write_that_keeps_failing_says_so_and_lands_later(deploy: Deploy) {
    let env = faults_env("persist", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut ops = deploy.operators(&env, Some((&api, &kubeconfig)));
    let op = ops.first(&env);
    env.ready_integration(&op, "inbox").await;
    ops.start_standby(&env);
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
