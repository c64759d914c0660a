//! Issue 25: an issuer that does not rotate leaves the write-ahead mark on the grant (no clearing
//! write), and the token Secret records the mark its token was refreshed under
//! (`mailintegration.dev/refreshed-under`). The crash windows of docs/architecture.md ("What a
//! refresh costs the API server"): a process killed after the record leaves a resolved mark (the
//! next process refreshes at once, nothing is "cut off"); a process killed between the provider's
//! answer and the record leaves a mark in doubt, which the next process treats as before (waits
//! while it may be in flight, then tries the stored token once).

use super::*;
use support::oauth::OAuthServerConfig;

const REFRESHED_UNDER: &str = "mailintegration.dev/refreshed-under";

/// An issuer that never rotates refresh tokens, access tokens of 10 minutes.
fn non_rotating_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(600),
            rotate_refresh_token: false,
            ..Default::default()
        })
    })
}

async fn recorded(env: &Env, name: &str) -> Option<String> {
    let s = env.secrets().get(&format!("{name}-token")).await.unwrap();
    s.metadata
        .annotations
        .as_ref()?
        .get(REFRESHED_UNDER)
        .cloned()
}

/// The grant's mark and the token Secret's record, once both say the same (a refresh finished).
async fn wait_recorded(env: &Env, op: &Operator) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = mark(&grant_secret(env, "inbox").await);
        if let Some(value) = &m
            && m == recorded(env, "inbox").await
        {
            return value.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no recorded mark: grant {m:?}, token Secret {:?}\n{}",
            recorded(env, "inbox").await,
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const CUT_OFF: &str = "got no answer from the OAuth server, or was cut off";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_mark_lets_the_next_process_refresh_at_once_and_one_in_doubt_does_not() {
    use support::api_proxy::{ApiProxy, Match};
    let env = faults_env("resolved-mark", non_rotating_server()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let mut a = env.operator_with_kubeconfig("operator-a", &kubeconfig, &[]);
    // The first refresh binds the grant brought by hand (a store, which takes the mark off); the
    // second writes the mark only, and leaves it.
    let rt = env.ready_integration(&a, "inbox").await;
    force_refresh(&env, "inbox").await;
    let first = wait_recorded(&env, &a).await;

    // 1. Killed after the record: the next process (another holder, within the mark's window)
    // refreshes at once, without taking the mark for a cut-off refresh.
    signal(&a, "KILL");
    wait_exit(&mut a, Duration::from_secs(10));
    let mut b = env.operator_with_kubeconfig("operator-b", &kubeconfig, &[]);
    let before = env.proxy.refresh_requests();
    let asked = Instant::now();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, before + 1, Duration::from_secs(30), &b).await;
    let took = asked.elapsed();
    assert!(
        took < in_flight_window() / 2,
        "the next process waited {took:?} for a resolved mark (the window is {:?})",
        in_flight_window()
    );
    let second = wait_recorded(&env, &b).await;
    assert_ne!(second, first);
    assert!(!b.log().contains(CUT_OFF), "{}", tail(&b.log(), 30));

    // 2. Killed between the provider's answer and the token Secret's write (held at the API
    // proxy): the grant holds a mark the token Secret does not record — in doubt.
    let mut held = None;
    after_the_provider_answers(
        &env,
        || force_refresh_blocking(&env, "inbox"),
        || held = Some(api.hold(Match::suffix("PATCH", "/secrets/inbox-token"))),
    );
    let held = held.unwrap();
    held.wait_held(1, Duration::from_secs(20));
    signal(&b, "KILL");
    wait_exit(&mut b, Duration::from_secs(10));
    held.drop_held();
    let in_doubt = mark(&grant_secret(&env, "inbox").await).expect("the refresh left its mark");
    assert_ne!(in_doubt, second, "the killed refresh wrote its own mark");
    assert_eq!(recorded(&env, "inbox").await, Some(second));
    let since: jiff::Timestamp = in_doubt.rsplit_once(' ').unwrap().1.parse().unwrap();

    // The next process waits while that mark may still be in flight, then tries once: this
    // issuer did not rotate, so the stored token works and nothing is lost.
    let c = env.operator("operator-c");
    let before = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, before + 1, in_flight_window() * 3, &c).await;
    let presented_at = jiff::Timestamp::now();
    let waited = presented_at.duration_since(since);
    assert!(
        waited
            >= jiff::SignedDuration::try_from(in_flight_window()).unwrap()
                - jiff::SignedDuration::from_secs(1),
        "the mark in doubt was presented under {waited:?} after it was written (window {:?})",
        in_flight_window()
    );
    env.wait_for("inbox", "Ready=True", Duration::from_secs(30), &c, is_ready)
        .await;
    wait_recorded(&env, &c).await;
    assert!(c.log().contains(CUT_OFF), "{}", tail(&c.log(), 30));
    assert_eq!(
        env.data("inbox-oauth-grant", "refresh_token")
            .await
            .unwrap(),
        rt,
        "never rotated, never replaced"
    );
    eprintln!(
        "resolved mark: the next process presented {took:?} after the request; a mark in doubt: presented {waited:?} after it was written (window {:?})",
        in_flight_window()
    );
}
