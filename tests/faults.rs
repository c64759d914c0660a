//! Faults in the middle of a refresh, against the real kube-apiserver and the real oidc-provider
//! with refresh-token rotation on (a rotated-out refresh token presented again makes it revoke the
//! whole grant). The fault proxy in front of the token endpoint counts which refresh token each
//! request presented (by digest), so every test can assert that none was presented twice.
//!
//! docs/operations.md describes the behaviour each test checks.

mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use mail_integration_operator::api::MailIntegration;
use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};
use support::{
    fault_proxy::Fault,
    oauth::{OAuthServer, OAuthServerConfig},
    operator::Operator,
    world::{Env, condition, is_ready, tail},
};

/// Access tokens that live 10 minutes: refreshes happen when a test asks for one.
fn long_lived_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(600),
            ..Default::default()
        })
    })
}

/// Access tokens that live 8 s: a refresh every few seconds.
fn short_lived_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(8),
            ..Default::default()
        })
    })
}

const IN_FLIGHT: &str = "mailintegration.dev/refresh-in-flight";

async fn force_refresh(env: &Env, name: &str) {
    let value = format!("{:?}", std::time::SystemTime::now());
    support::world::annotate_refresh(env, name, &value).await;
}

/// No refresh token was presented twice at the token endpoint; returns how many refreshes the
/// provider saw.
fn assert_no_reuse(env: &Env, what: &str) -> u64 {
    let reused = env.proxy.reused_refresh_tokens();
    assert!(
        reused.is_empty(),
        "{what}: refresh tokens presented more than once (digests): {reused:?}"
    );
    env.proxy.refresh_requests()
}

async fn grant_secret(env: &Env, name: &str) -> Secret {
    env.secrets()
        .get(&format!("{name}-oauth-grant"))
        .await
        .unwrap()
}

fn mark(s: &Secret) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(IN_FLIGHT).cloned()
}

/// Wait until the token endpoint has received `n` refresh requests in all.
async fn wait_refresh_requests(env: &Env, n: u64, timeout: Duration, op: &Operator) {
    let deadline = Instant::now() + timeout;
    while env.proxy.refresh_requests() < n {
        assert!(
            Instant::now() < deadline,
            "only {} refresh requests within {timeout:?}, expected {n}:\n{}",
            env.proxy.refresh_requests(),
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the supervised operator process has ended.
fn wait_exit(op: &mut Operator, timeout: Duration) -> Duration {
    let started = Instant::now();
    while op.process.is_running() {
        assert!(
            started.elapsed() < timeout,
            "the operator did not exit within {timeout:?}:\n{}",
            tail(&op.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn signal(op: &Operator, sig: &str) {
    let pid = op.process.child_pid().expect("the operator runs");
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// An integration that went Ready with its first refresh (a grant brought by hand: the test knows
/// its refresh token).
async fn ready_integration(env: &Env, op: &Operator, name: &str) -> String {
    env.client_secret(env.server.client_secret()).await;
    let rt = env.grant(name, "alice").await;
    env.integration(name, "alice@example.test").await;
    env.wait_for(name, "Ready=True", Duration::from_secs(30), op, is_ready)
        .await;
    rt
}

/// 2. SIGTERM while a refresh waits for the provider: the process does not abort it; the provider
/// answers (and rotates), the new refresh token is stored, then the process exits. The next
/// operator refreshes with the stored token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token() {
    let env = Env::new("drain", long_lived_server()).await;
    let mut op = env.operator("operator");
    ready_integration(&env, &op, "inbox").await;
    let before = grant_secret(&env, "inbox").await;
    let before_rt = before.data.as_ref().unwrap()["refresh_token"].clone();

    env.proxy.set_fault(Fault::Slow(Duration::from_secs(5)));
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    let marked = grant_secret(&env, "inbox").await;
    assert!(
        mark(&marked).is_some(),
        "the grant is marked while its refresh is in flight: {:?}",
        marked.metadata.annotations
    );
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
    assert_eq!(mark(&after), None, "the mark is gone with the store");
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

    let op2 = env.operator("operator-2");
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

/// Nothing in progress or failing: Reconciling=False.
fn settled(mi: &MailIntegration) -> bool {
    condition(mi, "Reconciling").is_some_and(|c| c.0 == "False")
}

/// 2. The Lease taken away while a refresh waits for the provider: the leader stops taking
/// reconciles, lets the refresh store its rotated token, and exits with an error (to restart as a
/// standby). The next leader refreshes with the stored token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_during_a_refresh_drains_it_and_exits_non_zero() {
    let env = Env::new("lease-loss", long_lived_server()).await;
    let args = [
        "--leader-election",
        "--leader-election-namespace",
        &env.ns,
        "--leader-election-lease-seconds",
        "6",
    ];
    let mut op = env.operator_with("operator", &args);
    ready_integration(&env, &op, "inbox").await;
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
    assert!(
        log.contains("Error: lost leadership"),
        "the process ends with an error (non-zero exit):\n{}",
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

/// 6. Another writer keeps changing the grant Secret while refreshes run: every write of the
/// operator is conditional, so it reads again and puts the new refresh token on top — nothing is
/// overwritten blindly and no token is lost or reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_conflicting_writes_on_the_grant_loses_nothing() {
    let env = Env::new("conflicts", short_lived_server()).await;
    let op = env.operator("operator");
    ready_integration(&env, &op, "inbox").await;
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

/// 6. Secrets that cannot be written: an immutable grant is refused before the provider is called
/// (a rotated token could not be stored), and a grant deleted while its namespace terminates ends
/// the refresh with a reason instead of a retry loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason() {
    let env = Env::new("unwritable", long_lived_server()).await;
    let op = env.operator("operator");
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
    let message = &mi
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
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
    ready_integration(&env, &op, "inbox").await;
    env.proxy.set_fault(Fault::Slow(Duration::from_secs(4)));
    let n = env.proxy.refresh_requests();
    force_refresh(&env, "inbox").await;
    wait_refresh_requests(&env, n + 1, Duration::from_secs(20), &op).await;
    env.cp
        .kubectl(&["delete", "namespace", &env.ns, "--wait=false"]);
    // What the namespace controller would do next (this control plane runs none).
    env.cp
        .kubectl(&["delete", "secret", "inbox-oauth-grant", "-n", &env.ns]);
    // The refresh gives up with the reason instead of retrying the write (the status then moves
    // on to SignInRequired, the grant being gone; no event can be created in a terminating
    // namespace).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = op.log();
        if log.contains("the refreshed grant cannot be stored")
            && log.contains("NamespaceTerminating")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no NamespaceTerminating within 40 s:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mi = env.get("inbox").await;
    assert!(!is_ready(&mi), "{:?}", mi.status);
    env.proxy.clear_fault();
    let presented = env.proxy.refresh_requests();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        env.proxy.refresh_requests(),
        presented,
        "no refresh after giving up: {:?}",
        mi.status
    );
    let refreshes = assert_no_reuse(&env, "unwritable");
    eprintln!("unwritable: {refreshes} refreshes, 0 presented twice");
}

/// 7. Two operators without leader election (a mistake the chart prevents): the write-ahead mark
/// lets only one present a rotating grant's refresh token at a time; the other waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_without_leader_election_never_present_a_token_twice() {
    let env = Env::new("two-unlocked", short_lived_server()).await;
    let a = env.operator("operator-a");
    let b = env.operator("operator-b");
    ready_integration(&env, &a, "inbox").await;
    let start = env.proxy.refresh_requests();
    wait_refresh_requests(&env, start + 6, Duration::from_secs(60), &a).await;
    let mi = env
        .wait_for("inbox", "Ready", Duration::from_secs(20), &a, is_ready)
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let refreshes = assert_no_reuse(&env, "two operators");
    let by = |op: &Operator| op.log().matches("stored the grant").count();
    eprintln!(
        "two operators: {refreshes} refreshes ({} stored by a, {} by b), 0 presented twice",
        by(&a),
        by(&b)
    );
}
