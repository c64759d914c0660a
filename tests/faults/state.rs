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
/// request came (or the old mark's window ended), about 40 s into the provider's 90.
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
