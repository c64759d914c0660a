//! Issue 26, point 5 and the faults of the Lease and the API server that only matter with leader
//! election on: a slow Lease, API Priority and Fairness throttling the Secret writes, the leader
//! cut off from the API server while a refresh is in flight, and two replicas whose clocks are
//! 10 s apart. The operator as the chart deploys it ([`ChartReplicas`]: two replicas, the chart's
//! flags, its ServiceAccount and RBAC); counted at the token endpoint (oidc-provider with strict
//! rotation behind the fault proxy): 0 presentations of a rotated-out token, 0 grants lost, Ready
//! again afterwards. docs/operations.md ("What happens on each failure") names each test.

use super::*;
use support::api_proxy::{ApiProxy, Match};

fn refresh_token_of(s: &Secret) -> String {
    String::from_utf8(s.data.as_ref().unwrap()["refresh_token"].0.clone()).unwrap()
}

/// Wait until `name` is Ready, settled and Authorized, as `op` reports it.
async fn ready_again(env: &Env, name: &str, what: &str, op: &Operator) {
    let mi = env
        .wait_for(name, what, Duration::from_secs(60), op, |mi| {
            is_ready(mi) && settled(mi)
        })
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
}

/// Wait until the chart's Lease names `holder`.
async fn wait_holder(env: &Env, chart: &ChartReplicas, holder: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while chart.lease_holder(env).as_deref() != Some(holder) {
        assert!(
            Instant::now() < deadline,
            "{holder} does not hold the Lease within {timeout:?} (holder: {:?})",
            chart.lease_holder(env)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader keeps leading: running, the Lease's holder, never stepped down.
fn still_leading(
    env: &Env,
    chart: &ChartReplicas,
    (name, leader): (&str, &mut Operator),
    standby: &Operator,
) {
    let log = leader.log();
    assert!(
        leader.process.is_running() && !log.contains("lost the Lease"),
        "the leader stepped down:\n{}",
        tail(&log, 40)
    );
    assert_eq!(chart.lease_holder(env).as_deref(), Some(name));
    let standby_log = standby.log();
    assert!(
        !standby_log.contains("became the leader"),
        "the standby took over a live Lease:\n{}",
        tail(&standby_log, 30)
    );
}

/// Point 5: every Lease request (renewals, the standby's reads) answered 5 s late, for a minute of
/// rotating refreshes. The leader renews with one conditional write, waited for up to 7 s of the
/// chart's 15 s Lease (every 5 s: its fence, 12 s from each renewal's start, never lapses), so it
/// keeps leading and refreshing, and the standby sees a Lease renewed in time. The chart's 15 s
/// Lease, not scaled: a latency is the API server's, not the protocol's. On main
/// (kube-lease-manager: an unconditional patch and a read per renewal, through a client that gave
/// up after 4 s), every renewal failed, the leader's fence lapsed and it exited at the first slow
/// renewal; with one replica, again at every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_requests_5_s_slow_keep_the_leader_leading_and_lose_nothing() {
    let env = faults_env("lease-slow", short_lived_server()).await;
    let api = ApiProxy::start();
    let chart = ChartReplicas::install_with_lease(&env, Some(&api), 15);
    let mut a = chart.replica(&env, "operator-a", &[]);
    env.ready_integration(&a, "inbox").await;
    let b = chart.replica(&env, "operator-b", &[]);
    wait_holder(&env, &chart, "operator-a", Duration::from_secs(5)).await;

    let slow = api.delay(Match::contains("*", "/leases"), Duration::from_secs(5));
    let start = env.proxy.refresh_requests();
    let slow_for = Duration::from_secs(60);
    tokio::time::sleep(slow_for).await;
    let refreshed = env.proxy.refresh_requests() - start;
    let lease_requests = slow.hits();
    still_leading(&env, &chart, ("operator-a", &mut a), &b);
    slow.remove();
    assert!(
        lease_requests >= 10,
        "the Lease was renewed and read through the delay: {lease_requests} requests"
    );
    // 8 s tokens: a refresh every few seconds, none paused for long by a lapsed fence.
    assert!(
        refreshed >= 8,
        "the leader went on refreshing while its renewals were slow: {refreshed} refreshes in {slow_for:?}:\n{}",
        tail(&a.log(), 30)
    );
    ready_again(&env, "inbox", "Ready after the slow Lease", &a).await;
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &a).await;
    still_leading(&env, &chart, ("operator-a", &mut a), &b);
    let refreshes = assert_no_reuse(&env, "slow Lease");
    eprintln!(
        "slow Lease: {lease_requests} Lease requests 5 s late in {slow_for:?}; the leader kept leading and refreshed {refreshed} times meanwhile; {refreshes} refreshes, 0 presented twice, 0 grants lost"
    );
}

/// API Priority and Fairness throttling the grant writes of rotating refreshes: the store of a
/// rotated refresh token answered `429 Retry-After: 4` five times (20 s, beyond the store's own
/// deadline: the token is held in memory and stored once a write goes through), and another
/// integration's write-ahead mark answered `429 Retry-After: 3` three times (9 s, beyond the mark's
/// write budget: that refresh presents nothing until a mark lands in time). Nothing is presented
/// twice, nothing is lost, both are Ready again and refresh with what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_429_with_retry_after_on_grant_writes_during_rotating_refreshes_loses_nothing() {
    let env = faults_env("apf-429", long_lived_server()).await;
    let api = ApiProxy::start();
    let chart = ChartReplicas::install(&env, Some(&api));
    let mut a = chart.replica(&env, "operator-a", &[]);
    env.ready_integration(&a, "inbox").await;
    env.grant("inbox2", "alice").await;
    env.integration("inbox2", "alice@example.test").await;
    env.wait_for(
        "inbox2",
        "Ready=True",
        Duration::from_secs(30),
        &a,
        is_ready,
    )
    .await;
    let b = chart.replica(&env, "operator-b", &[]);
    let spent = refresh_token_of(&grant_secret(&env, "inbox").await);
    let spent2 = refresh_token_of(&grant_secret(&env, "inbox2").await);

    let mut store = None;
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || {
            store = Some(api.fail_with_retry_after(
                Match::suffix("PUT", "/secrets/inbox-oauth-grant"),
                429,
                Some(5),
                4,
            ))
        },
    );
    let store = store.unwrap();
    let marks = api.fail_with_retry_after(
        Match::suffix("PATCH", "/secrets/inbox2-oauth-grant"),
        429,
        Some(3),
        3,
    );
    force_refresh(&env, "inbox2").await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let one = grant_secret(&env, "inbox").await;
        let two = grant_secret(&env, "inbox2").await;
        if refresh_token_of(&one) != spent
            && refresh_token_of(&two) != spent2
            && mark(&one).is_none()
            && mark(&two).is_none()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the throttled refreshes did not store their rotated tokens within 90 s (429s answered: store {}, marks {}):\n{}",
            store.hits(),
            marks.hits(),
            tail(&a.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.hits(), 5, "every 429 of the store was answered");
    assert_eq!(marks.hits(), 3, "every 429 of the mark was answered");
    for name in ["inbox", "inbox2"] {
        ready_again(&env, name, "Ready after the 429s", &a).await;
    }
    // Both refresh again with what was stored.
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    force_refresh(&env, "inbox2").await;
    wait_refresh_requests(&env, n + 2, Duration::from_secs(30), &a).await;
    for name in ["inbox", "inbox2"] {
        ready_again(&env, name, "Ready after one more refresh", &a).await;
    }
    still_leading(&env, &chart, ("operator-a", &mut a), &b);
    let refreshes = assert_no_reuse(&env, "429");
    eprintln!(
        "429 with Retry-After: the store throttled 5 x 4 s, a mark 3 x 3 s; {refreshes} refreshes, 0 presented twice, 0 grants lost"
    );
}

/// The leader cut off from the API server (not from the provider) right after the provider
/// answered a rotating refresh, the standby still connected: the standby takes the Lease once it
/// went unrenewed for its duration, finds the leader's write-ahead mark and waits; the old leader
/// keeps the rotated refresh token in memory, stores it when the partition heals (30 s, within
/// the mark's window and holder grace) and exits; the new leader then refreshes with it. (The
/// partition test of tests/faults.rs cuts the leader off between two refreshes, and the outage
/// tests of tests/faults/leader.rs cut both replicas off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_partitioned_with_a_refresh_in_flight_hands_over_without_a_loss() {
    let env = faults_env("partition-rt", long_lived_server()).await;
    let api = ApiProxy::start();
    let chart = ChartReplicas::install(&env, Some(&api));
    let mut a = chart.replica(&env, "operator-a", &[]);
    env.ready_integration(&a, "inbox").await;
    let b = chart.replica_direct(&env, "operator-b");
    wait_holder(&env, &chart, "operator-a", Duration::from_secs(5)).await;
    let spent = refresh_token_of(&grant_secret(&env, "inbox").await);

    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || api.partition(),
    );
    let cut_at = Instant::now();
    let marked = grant_secret(&env, "inbox").await;
    assert!(mark(&marked).is_some(), "the refresh in flight is marked");
    // The standby takes over while the old leader is cut off.
    wait_holder(&env, &chart, "operator-b", Duration::from_secs(60)).await;
    let took_over = cut_at.elapsed();
    let partition = scaled(Duration::from_secs(30));
    tokio::time::sleep(partition.saturating_sub(cut_at.elapsed())).await;
    assert_eq!(
        refresh_token_of(&grant_secret(&env, "inbox").await),
        spent,
        "nothing stored during the partition"
    );
    api.heal();
    let exited = wait_exit(&mut a, Duration::from_secs(120));
    let log_a = a.log();
    assert!(log_a.contains("lost the Lease"), "{}", tail(&log_a, 30));
    assert!(
        log_a.contains("stored a held grant before exiting"),
        "{}",
        tail(&log_a, 40)
    );
    let stored = grant_secret(&env, "inbox").await;
    assert!(
        refresh_token_of(&stored) != spent,
        "the rotated token held by the cut-off leader was stored"
    );
    assert_eq!(mark(&stored), None);

    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(60), &b).await;
    ready_again(&env, "inbox", "Ready under the new leader", &b).await;
    let refreshes = assert_no_reuse(&env, "partition with a refresh in flight");
    eprintln!(
        "partition with a refresh in flight: the standby took the Lease {took_over:?} after the cut, the old leader stored the held token and exited {exited:?} after the heal; {refreshes} refreshes, 0 presented twice, 0 grants lost"
    );
}

/// libfaketime's library for multi-threaded programs (Debian's `faketime` package, installed by
/// tools/install-test-deps.sh).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// The environment that runs a process with its wall clock `ahead` of everyone's (libfaketime;
/// its monotonic clock is left alone).
fn clock_ahead(ahead: Duration) -> Vec<(&'static str, String)> {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: apt-get install faketime (tools/install-test-deps.sh)"
    );
    vec![
        ("LD_PRELOAD", LIBFAKETIME.to_owned()),
        ("FAKETIME", format!("+{}s", ahead.as_secs())),
        ("DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

/// How far the clock of `op` is ahead of this process's, by the time of its last log line.
fn clock_offset(name: &str, op: &Operator) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = op.log();
        let stamped = log.lines().rev().find_map(|line| {
            (0..line.len().saturating_sub(20)).find_map(|i| {
                let rest = line.get(i..)?;
                let end = rest.find('Z')?;
                rest.get(..=end)?.parse::<jiff::Timestamp>().ok()
            })
        });
        if let Some(t) = stamped {
            // The line was written before now: its stamp is at most a little older.
            let now = jiff::Timestamp::now();
            return Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO);
        }
        assert!(Instant::now() < deadline, "no time stamp in {name}'s log");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two replicas whose wall clocks are 10 s apart (at the binary's scale, 5 s: the mark's clock-skew
/// allowance is scaled alike), the standby's ahead: during rotating refreshes it never takes the
/// Lease from the live leader (a standby waits until it has seen the Lease unrenewed for its
/// duration by its own monotonic clock, never compares wall clocks); when the leader is stopped
/// with a refresh in flight, the standby takes over and reads the old leader's write-ahead marks
/// as 10 s older than they are, within the allowance; then a new replica behind takes over
/// again and reads the marks of the one ahead as 10 s in its future. On main (kube-lease-manager
/// compares `renewTime` with the standby's own clock), the standby ahead took the Lease from the
/// live leader within seconds, and the leader exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_of_10_s_between_two_replicas_loses_nothing() {
    let env = faults_env("skew", short_lived_server()).await;
    let chart = ChartReplicas::install(&env, None);
    let mut a = chart.replica(&env, "operator-a", &[]);
    env.ready_integration(&a, "inbox").await;
    let skew = scaled(Duration::from_secs(10));
    let mut b = chart.replica(&env, "operator-b", &clock_ahead(skew));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let offset = clock_offset("operator-b", &b);
    assert!(
        offset + Duration::from_millis(1500) >= skew
            && offset <= skew + Duration::from_millis(1500),
        "libfaketime set operator-b's clock {offset:?} ahead, not {skew:?}"
    );

    // A leads through four Lease durations of rotating refreshes.
    let start = env.proxy.refresh_requests();
    tokio::time::sleep(Duration::from_secs(32)).await;
    still_leading(&env, &chart, ("operator-a", &mut a), &b);
    let by_a = env.proxy.refresh_requests() - start;
    assert!(by_a >= 4, "the leader refreshed meanwhile: {by_a}");

    // Stop A with a refresh in flight; B (ahead) takes over and refreshes.
    env.proxy.set_fault(Fault::Slow(Duration::from_secs(2)));
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &a).await;
    signal(&a, "TERM");
    wait_exit(&mut a, Duration::from_secs(60));
    env.proxy.clear_fault();
    wait_holder(&env, &chart, "operator-b", Duration::from_secs(30)).await;
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 3, Duration::from_secs(60), &b).await;
    ready_again(&env, "inbox", "Ready under the replica ahead", &b).await;

    // A replica behind again (a new pod), as the standby; B stopped with a refresh in flight.
    let c = chart.replica(&env, "operator-c", &[]);
    tokio::time::sleep(Duration::from_secs(16)).await;
    still_leading(&env, &chart, ("operator-b", &mut b), &c);
    env.proxy.set_fault(Fault::Slow(Duration::from_secs(2)));
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &b).await;
    signal(&b, "TERM");
    wait_exit(&mut b, Duration::from_secs(60));
    env.proxy.clear_fault();
    wait_holder(&env, &chart, "operator-c", Duration::from_secs(30)).await;
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 3, Duration::from_secs(60), &c).await;
    ready_again(&env, "inbox", "Ready under the replica behind", &c).await;
    let refreshes = assert_no_reuse(&env, "clock skew");
    eprintln!(
        "clock skew: operator-b {offset:?} ahead; no takeover of a live Lease; two handovers with a refresh in flight; {refreshes} refreshes, 0 presented twice, 0 grants lost"
    );
}
