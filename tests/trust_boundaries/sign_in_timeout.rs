//! Issue 26, point 6: the sign-in's request timeout does not drop a grant the provider issued. Once
//! the code is exchanged, the callback finishes (checks, grant Secret write, status) in a task of
//! its own; the page answers "still being stored" when the request's time runs out first.

use super::{
    WAIT,
    credentials::{alice_at_the_provider, http, ticket_of, with_sign_in_link},
    server,
};
use crate::support::{
    api_proxy::{ApiProxy, Match},
    world::{Env, is_ready, tail},
};
use std::time::{Duration, Instant};

/// The grant Secret's create held at the API server past the sign-in's request timeout (60 s,
/// 6 s at the test-only protocol scale of 10): the page says the grant is still being stored, and
/// once the API server answers the grant Secret is written and the integration goes Ready. On main
/// the timeout cancelled the callback during the write: a 408, and the grant (its refresh token
/// issued by the provider) was never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_store_outlasts_the_request_timeout_is_still_stored() {
    let env = Env::new("signin-slow-store", server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let op = env.operator_with_kubeconfig("operator", &kubeconfig, &["--test-protocol-scale=10"]);
    env.client_secret(env.server.client_secret()).await;
    env.integration("inbox", "alice@example.test").await;
    let mi = with_sign_in_link(&env, &op, "inbox").await;
    let (query, cookie) = alice_at_the_provider(&op, &ticket_of(&mi)).await;

    let held = api.hold(Match::suffix(
        "POST",
        &format!("/namespaces/{}/secrets", env.ns),
    ));
    let asked = Instant::now();
    let r = http()
        .get(format!("{}/oauth2/callback?{query}", op.sign_in_url()))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    let (code, took) = (r.status().as_u16(), asked.elapsed());
    let body = r.text().await.unwrap();
    assert!(
        held.hits() >= 1,
        "the grant Secret's write never reached the API server: {code}\n{body}"
    );
    // Past the request timeout, the write still waits at the API server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = held.held_count();
    held.release();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the grant was never stored (callback answered {code} after {took:?}; {waiting} write(s) still waiting when released):\n{body}\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        code, 202,
        "the page of a grant still being stored, after {took:?}:\n{body}"
    );
    assert!(body.contains("still being stored"), "{body}");
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    env.wait_for("inbox", "Ready=True", WAIT, &op, is_ready)
        .await;
}
