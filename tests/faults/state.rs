//! Issue 26, point 6: what the operator remembers of an integration outlives the process where
//! it must (the provider's backoff and Retry-After, in `status.providerBackoff`), and what it does
//! when an integration's state is gone. docs/operations.md ("What happens on each failure") names
//! each test.

use super::*;

/// The token endpoint answers 429 with `Retry-After: 90`; the operator is killed and another
/// starts, and a refresh is requested of it: it does not call the token endpoint before the
/// Retry-After is over (counted at the fault proxy in front of the token endpoint), then
/// refreshes once, and the integration is Ready with `status.providerBackoff` gone. On main the
/// backoff lived in memory only: the new process called the provider as soon as the refresh
/// request came (or the old mark's window ended), about 40 s into the provider's 90. The backoff
/// is written once, with the failure (two status writes when its time kept nanoseconds the API
/// server drops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_provider_is_not_called_again_after_a_restart() {
    const RETRY_AFTER: u64 = 90;
    let env = faults_env("backoff-restart", long_lived_server()).await;
    let mut a = env.operator("operator-a");
    env.ready_integration(&a, "inbox").await;

    env.proxy.set_fault(Fault::RateLimited {
        retry_after_secs: RETRY_AFTER,
    });
    let faulted = env.proxy.faulted_requests();
    let asked = env.proxy.token_requests();
    let status_writes = |op: &Operator| {
        op.api_write_requests()
            .iter()
            .filter(|r| r.kind() == "mailintegrations/status")
            .count()
    };
    let written_before = status_writes(&a);
    force_refresh(&env, "inbox").await;
    let limited = env
        .wait_for(
            "inbox",
            "providerBackoff",
            Duration::from_secs(30),
            &a,
            |mi| {
                mi.status
                    .as_ref()
                    .is_some_and(|s| s.provider_backoff.is_some())
            },
        )
        .await;
    let limited_at = std::time::SystemTime::now();
    assert_eq!(env.proxy.faulted_requests(), faulted + 1);
    let backoff = limited.status.unwrap().provider_backoff.unwrap();
    let until = std::time::SystemTime::from(backoff.until.0);
    let waits = until.duration_since(limited_at).unwrap_or_default();
    assert!(
        waits >= Duration::from_secs(RETRY_AFTER - 10),
        "status.providerBackoff.until is {waits:?} away, not the provider's Retry-After of {RETRY_AFTER} s: {backoff:?}"
    );
    assert_eq!(backoff.attempts, 1, "{backoff:?}");
    assert!(!backoff.reason.is_empty(), "{backoff:?}");

    // The backoff is written once, with the failure: the reconciles that wait it out write nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let written = status_writes(&a) - written_before;
    eprintln!("status writes of the failure and the wait: {written}");
    assert_eq!(written, 1, "status writes while backing off");
    signal(&a, "KILL");
    wait_exit(&mut a, Duration::from_secs(10));
    let b = env.operator("operator-b");
    support::world::annotate_refresh(&env, "inbox", "after-restart").await;
    // Until 5 s before the Retry-After ends, the token endpoint hears nothing more.
    let quiet_until = until - Duration::from_secs(5);
    while std::time::SystemTime::now() < quiet_until {
        assert_eq!(
            env.proxy.token_requests(),
            asked + 1,
            "the restarted operator called the rate-limited token endpoint {:?} before its Retry-After ended:\n{}",
            until
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
            tail(&b.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.proxy.clear_fault();
    let ready = env
        .wait_for(
            "inbox",
            "Ready after the Retry-After",
            Duration::from_secs(60),
            &b,
            |mi| {
                is_ready(mi)
                    && mi.status.as_ref().is_some_and(|s| {
                        s.provider_backoff.is_none()
                            && s.last_refresh_request.as_deref() == Some("after-restart")
                    })
            },
        )
        .await;
    let called = env.proxy.token_requests() - asked;
    assert_eq!(
        called, 2,
        "the 429, then one refresh after the Retry-After: {called} token requests"
    );
    // The 429 came from the proxy: the token it carried never reached the provider, and the one
    // try after the Retry-After is its first use there.
    assert_eq!(
        env.proxy.reused_at_upstream(),
        Vec::<String>::new(),
        "a refresh token reached the provider twice"
    );
    eprintln!(
        "rate limited: Retry-After {RETRY_AFTER} s kept across a restart; {called} token requests; ready: {:?}",
        condition(&ready, "Ready")
    );
}

/// The grant Secret deleted while the provider's answer to a rotating refresh is on its way (a
/// user ending the grant, a GitOps prune): the operator does not create it again from the token
/// it holds. The integration asks for a sign-in, saying the grant Secret is gone, and the Secret
/// stays gone. On main the store after the refresh met 404, read nothing, and created the grant
/// Secret anew with the rotated token: the deletion was undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_secret_deleted_during_a_refresh_is_not_recreated() {
    let env = faults_env("grant-deleted", long_lived_server()).await;
    let op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    let grant = "inbox-oauth-grant";
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || {
            env.cp
                .kubectl(&["delete", "secret", grant, "-n", &env.ns, "--wait=false"]);
        },
    );
    let mi = env
        .wait_for(
            "inbox",
            "a sign-in asked for, the grant Secret gone",
            Duration::from_secs(30),
            &op,
            |mi| {
                condition(mi, "Ready") == Some(("False", "SignInRequired"))
                    && condition_message(mi, "Ready").contains("is gone")
            },
        )
        .await;
    // Not brought back later either (the next reconciles, the held-token path).
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert!(
            env.secrets().get_opt(grant).await.unwrap().is_none(),
            "the deleted grant Secret was created again:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        mi.status.as_ref().unwrap().sign_in.is_some(),
        "a sign-in link is offered: {:?}",
        mi.status
    );
    eprintln!(
        "grant deleted during a refresh: {:?}",
        condition_message(&mi, "Ready")
    );
}

/// A sign-in (here: a new grant put into the grant Secret, as a sign-in stores it) lands while the
/// provider's answer to a refresh of the old grant is on its way: the new grant is kept, and the
/// access token of that answer (the old grant's) is not published; the next refresh uses the new
/// grant. On main the refresh found the new grant, kept it, and published the old grant's access
/// token all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_loses_to_a_sign_in_publishes_nothing() {
    let env = faults_env("superseded", long_lived_server()).await;
    let op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    let published = env.data("inbox-token", "access_token").await.unwrap();
    let new_grant = env.server.obtain_grant("alice").await;
    let patch = serde_json::json!({"stringData": {"refresh_token": new_grant.refresh_token()}});
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || {
            env.cp.kubectl(&[
                "patch",
                "secret",
                "inbox-oauth-grant",
                "-n",
                &env.ns,
                "--type=merge",
                "-p",
                &patch.to_string(),
            ]);
            // The refresh with the new grant that follows fails, so that only the superseded
            // answer could change the published token.
            env.proxy.set_fault(Fault::ServiceUnavailable);
        },
    );
    let faulted = env.proxy.faulted_requests();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.proxy.faulted_requests() == faulted {
        assert!(
            Instant::now() < deadline,
            "no refresh with the new grant within 30 s:\n{}",
            tail(&op.log(), 30)
        );
        assert_eq!(
            env.data("inbox-token", "access_token").await.as_deref(),
            Some(published.as_str()),
            "the superseded refresh published the old grant's access token:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.data("inbox-token", "access_token").await.as_deref(),
        Some(published.as_str())
    );
    assert_eq!(
        env.data("inbox-oauth-grant", "refresh_token")
            .await
            .as_deref(),
        Some(new_grant.refresh_token()),
        "the new grant is kept"
    );
    env.proxy.clear_fault();
    env.wait_for("inbox", "Ready", Duration::from_secs(60), &op, |mi| {
        is_ready(mi)
            && mi
                .status
                .as_ref()
                .and_then(|s| s.provider_backoff.as_ref())
                .is_none()
    })
    .await;
    assert_eq!(
        env.proxy.reused_at_upstream(),
        Vec::<String>::new(),
        "a refresh token reached the provider twice"
    );
}
