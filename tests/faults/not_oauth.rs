//! Issue 26, points 3 and 4: answers at the token endpoint that are not the OAuth server's (an
//! ingress's 404 page while the server restarts, a gateway's 502 page, an egress proxy's 407)
//! are retried, never taken for the provider's verdict on the grant, even
//! after a cut-off; and the write-ahead mark's own write is bounded and its conflicts show.
//! docs/operations.md ("What happens on each failure") names each test. Each scenario runs both
//! ways ([`Deploy`]): without leader election in `tests/faults.rs`, as the chart deploys the
//! operator in `tests/faults_leader.rs` (`…_with_leader_election`).

use super::*;

const NGINX_404: &str = "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const NGINX_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const SQUID_407: &str = "<!DOCTYPE html PUBLIC \"-//W3C//DTD HTML 4.01//EN\" \"http://www.w3.org/TR/html4/strict.dtd\">\n<html><head><title>ERROR: Cache Access Denied</title></head><body id=\"ERR_CACHE_ACCESS_DENIED\"><h1>ERROR</h1><h2>Cache Access Denied.</h2><p>Sorry, you are not currently allowed to request http://idp/token from this cache until you have authenticated yourself.</p></body></html>";

fn page(status: u16, body: &str, headers: &[(&str, &str)]) -> Fault {
    Fault::Canned {
        status,
        content_type: "text/html".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.into(),
    }
}

/// Wait until the token endpoint has answered `n` requests with the fault in all.
async fn wait_faulted(env: &Env, n: u64, timeout: Duration, op: &Operator, what: &str) {
    let deadline = Instant::now() + timeout;
    while env.proxy.faulted_requests() < n {
        let mi = env.get("inbox").await;
        assert!(
            Instant::now() < deadline,
            "{what}: only {} faulted token requests within {timeout:?}, expected {n}; the operator stopped retrying.\nstatus: {}\n{}",
            env.proxy.faulted_requests(),
            serde_json::to_string_pretty(&mi.status).unwrap(),
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway's 502 page (the refresh token presented, no OAuth answer: in doubt, like a cut-off),
/// then an egress proxy's 407 page, then an ingress's 404 page until the access token has expired,
/// then the OAuth server again: each is retried by itself with backoff, the conditions say what
/// answered, without the page, and no grant is declared lost (on main the 407 after the 502 was
/// taken for the provider's refusal of a cut-off refresh: `GrantLostInFlight`, no further attempt;
/// a lone 404 page left it `Stalled` with `InvalidEndpoint`). Afterwards the integration is Ready,
/// and oidc-provider (strict rotation, reuse detection) never saw a refresh token twice and
/// refused nothing. (A firewall's 400 page is in the unit table
/// `oauth::tests::raw_token_endpoint_answers_are_permanent_only_with_an_oauth_error_body`.)
pub async fn pages_that_are_not_oauth_answers_are_retried_and_lose_no_grant(deploy: Deploy) {
    let env = faults_env("not-oauth", short_lived_server()).await;
    let mut ops = deploy.operators(&env, None);
    let op = ops.first(&env);
    env.ready_integration(&op, "inbox").await;
    ops.start_standby(&env);
    let faulted = env.proxy.faulted_requests();

    // A gateway's 502 page: the operator cannot tell whether the OAuth server saw the token.
    env.proxy.set_fault(page(502, NGINX_502, &[]));
    wait_faulted(&env, faulted + 1, Duration::from_secs(30), &op, "502 page").await;
    // Retried by itself after its backoff, the mark still in doubt: the next answer is judged as
    // after a cut-off.
    env.proxy.set_fault(page(
        407,
        SQUID_407,
        &[("Proxy-Authenticate", "Basic realm=\"proxy\"")],
    ));
    wait_faulted(
        &env,
        faulted + 2,
        Duration::from_secs(30),
        &op,
        "407 after the 502",
    )
    .await;
    // An ingress's 404 page while the OAuth server restarts.
    env.proxy.set_fault(page(404, NGINX_404, &[]));
    wait_faulted(
        &env,
        faulted + 3,
        Duration::from_secs(40),
        &op,
        "404 after the 407",
    )
    .await;
    let mi = env
        .wait_for(
            "inbox",
            "Ready=False NotAnOAuthAnswer for the 404 page once the token expired",
            Duration::from_secs(20),
            &op,
            |mi| {
                condition(mi, "Ready") == Some(("False", "NotAnOAuthAnswer"))
                    && condition_message(mi, "Ready").contains("HTTP 404")
            },
        )
        .await;
    let said = condition_message(&mi, "Ready");
    assert!(
        said.contains("HTTP 404 with an HTML body")
            && said.contains("an ingress or proxy answered, not the OAuth server"),
        "{said}"
    );
    for page_text in ["nginx", "<html", "404 Not Found</"] {
        assert!(!said.contains(page_text), "{said}");
    }
    assert_eq!(condition(&mi, "Stalled").map(|c| c.0), Some("False"));
    assert_eq!(
        condition(&mi, "Reconciling"),
        Some(("True", "NotAnOAuthAnswer"))
    );
    let seen = env.proxy.faulted_requests() - faulted;

    // The OAuth server answers again: the next retry (after its backoff) gets tokens.
    env.proxy.clear_fault();
    let mi = env
        .wait_for("inbox", "Ready again", Duration::from_secs(60), &op, |mi| {
            is_ready(mi) && settled(mi)
        })
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    // The grant lives: the next refresh (8 s tokens) is answered 200 by oidc-provider too.
    let n = env.proxy.refresh_requests();
    wait_refresh_requests(&env, n + 1, Duration::from_secs(30), &op).await;
    env.wait_for(
        "inbox",
        "Ready after one more refresh",
        Duration::from_secs(20),
        &op,
        |mi| is_ready(mi) && settled(mi),
    )
    .await;
    let log = env.proxy.presentation_log();
    let refused: Vec<_> = log
        .iter()
        .filter(|p| p.upstream_status.is_some_and(|s| s != 200))
        .collect();
    assert!(
        refused.is_empty(),
        "oidc-provider refused refreshes: {refused:?}"
    );
    assert_eq!(
        env.proxy.reused_at_upstream(),
        Vec::<String>::new(),
        "a refresh token reached oidc-provider twice"
    );
    let events = op.log();
    assert!(
        !events.contains("GrantLostInFlight"),
        "{}",
        tail(&events, 30)
    );
    eprintln!(
        "not OAuth answers: {seen} faulted answers (502, 407, 404 pages), {} refreshes at oidc-provider, 0 refused, 0 presented twice there",
        log.iter().filter(|p| p.forwarded).count()
    );
}

/// A 409 on every write of the grant Secret while the operator marks it: it reads the Secret
/// again once and decides again; when that write conflicts too it backs off and says so
/// (`Reconciling=True GrantMarkConflict`, and `Ready=False` with it once the token expired —
/// on main it requeued after 1 s, silently and without end, `Ready` still True). Nothing is sent
/// to the provider meanwhile; once the writes go through, the integration is Ready again.
pub async fn a_conflict_storm_on_the_mark_write_shows_and_recovers(deploy: Deploy) {
    use support::api_proxy::{ApiProxy, Match};
    let env = faults_env("mark-409", short_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut ops = deploy.operators(&env, Some((&api, &kubeconfig)));
    let op = ops.first(&env);
    env.ready_integration(&op, "inbox").await;
    ops.start_standby(&env);

    let conflicts = api.fail(
        Match::suffix("PATCH", "/secrets/inbox-oauth-grant"),
        409,
        None,
    );
    let reads = api.count("GET", "/secrets/inbox-oauth-grant");
    let mi = env
        .wait_condition(
            "inbox",
            ("Reconciling", "True", "GrantMarkConflict"),
            Duration::from_secs(40),
            &op,
        )
        .await;
    let said = condition_message(&mi, "Reconciling");
    assert!(
        said.contains("409") && said.contains("nothing was sent to the provider"),
        "{said}"
    );
    assert!(
        conflicts.hits() >= 2,
        "{} conflicting writes",
        conflicts.hits()
    );
    assert!(
        api.count("GET", "/secrets/inbox-oauth-grant") > reads,
        "the grant Secret was read again after the conflict"
    );
    // Nothing presented while the grant cannot be marked.
    let presented = env.proxy.refresh_requests();
    env.wait_condition(
        "inbox",
        ("Ready", "False", "GrantMarkConflict"),
        Duration::from_secs(30),
        &op,
    )
    .await;
    assert_eq!(env.proxy.refresh_requests(), presented);
    let hits = conflicts.hits();

    conflicts.remove();
    force_refresh(&env, "inbox").await;
    env.wait_for("inbox", "Ready again", Duration::from_secs(60), &op, |mi| {
        is_ready(mi) && settled(mi)
    })
    .await;
    let refreshes = assert_no_reuse(&env, "mark conflicts");
    eprintln!(
        "mark conflicts: {hits} conflicting mark writes, condition shown, recovered; {refreshes} refreshes, 0 presented twice"
    );
}

/// The mark's write held at the API server for longer than a refresh may spend on it: the
/// operator abandons it after 10 s (5 s at the binary's scale) and does not present the refresh token under it (on main the
/// write had no bound: the token was presented once the write came back, however late, while
/// another process could already take the mark for stale). It says so and refreshes once the API
/// server answers in time.
pub async fn a_mark_write_slower_than_its_budget_presents_nothing(deploy: Deploy) {
    use support::api_proxy::{ApiProxy, Match};
    let env = faults_env("mark-slow", long_lived_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut ops = deploy.operators(&env, Some((&api, &kubeconfig)));
    let op = ops.first(&env);
    env.ready_integration(&op, "inbox").await;
    ops.start_standby(&env);

    let held = api.hold(Match::suffix("PATCH", "/secrets/inbox-oauth-grant"));
    let presented = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    held.wait_held(1, Duration::from_secs(20));
    let mi = env
        .wait_condition(
            "inbox",
            ("Reconciling", "True", "GrantWriteFailed"),
            Duration::from_secs(30),
            &op,
        )
        .await;
    let said = condition_message(&mi, "Reconciling");
    let budget = format!(
        "longer than the {:.1}s",
        scaled(Duration::from_secs(10)).as_secs_f64()
    );
    assert!(said.contains(&budget), "{said}");
    // The held write lands late: nothing is presented under it.
    held.release();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.proxy.refresh_requests(),
        presented,
        "{}",
        tail(&op.log(), 30)
    );
    drop(held);
    api.clear();

    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, presented + 1, Duration::from_secs(30), &op).await;
    env.wait_for("inbox", "Ready again", Duration::from_secs(30), &op, |mi| {
        is_ready(mi) && settled(mi)
    })
    .await;
    let refreshes = assert_no_reuse(&env, "slow mark");
    eprintln!(
        "slow mark: abandoned after the 10 s budget, nothing presented under it; {refreshes} refreshes, 0 presented twice"
    );
}
