//! Issue 26, point 6: a watch that keeps failing is visible. `/readyz` fails while one has been
//! failing for longer than `--watch-failure-limit`, and the gauge
//! `mailintegration_watch_failing_seconds{namespace, watch}` says which and for how long; both
//! come back once the watch works again. docs/operations.md ("What happens on each failure") names
//! the test.

use super::*;
use support::api_proxy::ApiProxy;

/// `/readyz`'s body ("ready" with 200; otherwise why not).
fn readyz(op: &Operator) -> String {
    op.get("/readyz").unwrap_or_default()
}

/// Wait until `/readyz` says something `want` accepts; returns what it said.
async fn wait_readyz(
    op: &Operator,
    what: &str,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let said = readyz(op);
        if want(&said) {
            return said;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz not {what} within {timeout:?} (it says {said:?}):\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The largest `mailintegration_watch_failing_seconds` sample.
fn failing_seconds(op: &Operator) -> f64 {
    op.get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("mailintegration_watch_failing_seconds{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

/// The API server out of reach of the operator's watches (every connection to it cut and
/// refused, at the API proxy) for longer than `--watch-failure-limit` (5 s here; 2 min by
/// default): `/readyz` fails, saying which watch, and the gauge counts the seconds; once the API
/// server is back, `/readyz` is ready again and the gauge is 0. On main `/readyz` said "ready"
/// throughout: a watch that could not reconnect was invisible. Counting events alone as "works
/// again" left `/readyz` failing for good after the heal: a watch resumed from its
/// resourceVersion sends nothing until an object changes (the answer to its request counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_a_watch_keeps_failing_and_recovers_with_it() {
    let env = faults_env("watch-fails", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let op = env.operator_with_kubeconfig("operator", &kubeconfig, &["--watch-failure-limit=5s"]);
    env.ready_integration(&op, "inbox").await;
    assert_eq!(readyz(&op), "ready");

    api.partition();
    let cut_at = Instant::now();
    let said = wait_readyz(&op, "failing", Duration::from_secs(60), |s| {
        s.contains("watch")
    })
    .await;
    let failed_after = cut_at.elapsed();
    assert!(
        failed_after >= Duration::from_secs(5),
        "/readyz failed {failed_after:?} after the cut, before the limit of 5 s: {said}"
    );
    assert!(said.contains("failing for"), "{said}");
    let seconds = failing_seconds(&op);
    assert!(
        seconds >= 1.0,
        "mailintegration_watch_failing_seconds: {seconds}"
    );

    api.heal();
    let healed_at = Instant::now();
    wait_readyz(&op, "ready again", Duration::from_secs(60), |s| {
        s == "ready"
    })
    .await;
    let ready_after = healed_at.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while failing_seconds(&op) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the gauge stays above 0 after the watches recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_for("inbox", "Ready", Duration::from_secs(30), &op, is_ready)
        .await;
    eprintln!(
        "watch failing: /readyz failed {failed_after:?} after the cut ({said:?}), gauge {seconds} s; ready again {ready_after:?} after the API server came back"
    );
}
