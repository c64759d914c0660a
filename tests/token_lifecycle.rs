//! The token lifecycle end to end: the operator binary against the real kube-apiserver and a real
//! OAuth server (oidc-provider, refresh-token rotation on), with the fault-injecting stand-in in
//! front of the token endpoint for what no real server does on demand.
//!
//! Each test has its own namespace, its own operator process (watching only that namespace) and its
//! own fault proxy, so counts of token requests and API writes belong to that test alone.

#[path = "token_lifecycle/grant_deletion.rs"]
mod grant_deletion;
mod support;

use base64::Engine as _;
use kube::api::{DeleteParams, Patch, PatchParams};
use std::time::{Duration, Instant};
use support::{
    api_audit,
    fault_proxy::Fault,
    oauth::OAuthServer,
    operator::Operator,
    world::{
        Env, annotate_refresh, assert_no_forbidden_calls, assert_no_secrets_in_logs_or_events,
        condition, condition_message, is_ready, tail,
    },
};

/// Access tokens that live 8 s: refreshes come every ~5 s.
fn short_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(8)
}

/// Access tokens that live 10 minutes: nothing is due during a test.
fn long_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_in_a_row_with_rotation_keep_the_grant_alive() {
    let env = Env::new("rotation", short_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let first_rt = env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;

    let mi = env
        .wait_for(
            "inbox",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    assert_eq!(condition(&mi, "TokenValid"), Some(("True", "TokenValid")));
    assert_eq!(condition(&mi, "Stalled").map(|c| c.0), Some("False"));
    assert_eq!(
        mi.status.as_ref().unwrap().observed_generation,
        mi.metadata.generation
    );

    // The token Secret holds a token the OAuth server calls active, and everything workloads need.
    let token = env
        .data("inbox-token", "access_token")
        .await
        .expect("access_token in the token Secret");
    assert!(
        env.server.introspect(&token).await,
        "the published access token must be active"
    );
    assert_eq!(
        env.data("inbox-token", "token_type").await.as_deref(),
        Some("Bearer")
    );
    assert_eq!(
        env.data("inbox-token", "username").await.as_deref(),
        Some("alice@example.test")
    );
    let xoauth2 = env.data("inbox-token", "xoauth2").await.unwrap();
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(xoauth2)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        decoded,
        format!("user=alice@example.test\x01auth=Bearer {token}\x01\x01")
    );
    let token_secret = env.token_secret("inbox").await.unwrap();
    assert!(
        !token_secret
            .data
            .as_ref()
            .unwrap()
            .contains_key("refresh_token"),
        "workloads never get the refresh token"
    );
    let owner = &token_secret
        .metadata
        .owner_references
        .as_ref()
        .expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("MailIntegration", "inbox", Some(true))
    );

    // Three more refreshes, each before expiry; rotation hands out a new refresh token every time and
    // the operator must always use the newest (a reused one would kill the grant at oidc-provider).
    let mut seen = vec![token.clone()];
    let deadline = Instant::now() + Duration::from_secs(45);
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "only {} distinct access tokens in 45 s:\n{}",
            seen.len(),
            tail(&op.log(), 40)
        );
        let t = env.data("inbox-token", "access_token").await.unwrap();
        if !seen.contains(&t) {
            let mi = env.get("inbox").await;
            assert!(is_ready(&mi), "Ready throughout: {:?}", mi.status);
            seen.push(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rt_now = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();
    assert_ne!(rt_now, first_rt, "the rotated refresh token was stored");
    let grant = env.secrets().get("inbox-oauth-grant").await.unwrap();
    assert!(
        grant
            .metadata
            .owner_references
            .is_some_and(|o| o.iter().any(|o| o.name == "inbox")),
        "the grant Secret was adopted"
    );
    // The grant is still alive: the newest access token is active, and the next refresh succeeds too.
    assert!(env.server.introspect(seen.last().unwrap()).await);
    let before = op
        .metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
        .unwrap_or(0.0);
    env.wait_for(
        "inbox",
        "one more successful refresh",
        Duration::from_secs(20),
        &op,
        |_| {
            op.metric(
                r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#,
            )
            .unwrap_or(0.0)
                > before
        },
    )
    .await;
    assert!(is_ready(&env.get("inbox").await));
    assert_eq!(
        op.metric(
            r#"mailintegration_refreshes_total{result="permanent_failure",reason="GrantRevoked"}"#
        ),
        None
    );
    assert_no_secrets_in_logs_or_events(
        &env,
        &op,
        &[env.server.client_secret(), &first_rt, &rt_now, &token],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_secret_stalls_and_fixing_it_recovers_within_seconds() {
    let env = Env::new("client", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret("not-the-secret").await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    let mi = env
        .wait_for("inbox", "Stalled=True", Duration::from_secs(30), &op, |m| {
            condition(m, "Stalled").is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(
        condition(&mi, "Authorized"),
        Some(("False", "InvalidClient"))
    );
    assert_eq!(condition(&mi, "Ready"), Some(("False", "InvalidClient")));
    let requests = env.proxy.token_requests();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        env.proxy.token_requests(),
        requests,
        "no retries against the provider while nothing changed"
    );

    // The fix is noticed through the watch on client Secrets (the periodic resync is an hour
    // away): 30 s is margin for a loaded machine, not a performance bound.
    env.client_secret(env.server.client_secret()).await;
    env.wait_for(
        "inbox",
        "Ready=True after fixing the client Secret",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    assert_eq!(
        env.proxy.token_requests(),
        requests + 1,
        "one token request after the fix: the refresh with the fixed client secret"
    );
    let mi = env.get("inbox").await;
    assert_eq!(condition(&mi, "Stalled").map(|c| c.0), Some("False"));
    assert!(mi.status.unwrap().failed_inputs.is_none());
    assert_no_secrets_in_logs_or_events(&env, &op, &[env.server.client_secret(), "not-the-secret"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_grant_stalls_and_stops_calling_the_provider() {
    let env = Env::new("revoked", long_lived_server()).await;
    let op = env.operator("operator");
    let rt = env.ready_integration(&op, "inbox").await;

    // The user revokes the grant at the provider; then a refresh is asked for.
    let current_rt = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();
    env.server.revoke(&current_rt).await;
    annotate_refresh(&env, "inbox", "1").await;
    let mi = env
        .wait_for("inbox", "GrantRevoked", Duration::from_secs(20), &op, |m| {
            condition(m, "Authorized") == Some(("False", "GrantRevoked"))
        })
        .await;
    assert_eq!(condition(&mi, "Stalled"), Some(("True", "GrantRevoked")));
    let requests = env.proxy.token_requests();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        env.proxy.token_requests(),
        requests,
        "no token requests after a permanent failure"
    );
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        events.contains("Warning GrantRevoked"),
        "a Warning event tells the user: {events}"
    );
    assert_no_secrets_in_logs_or_events(&env, &op, &[env.server.client_secret(), &rt, &current_rt])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_faults_back_off_keep_the_token_and_recover() {
    let env = Env::new("faults", long_lived_server()).await;
    let op = env.operator("operator");
    env.ready_integration(&op, "inbox").await;
    let mut token = env.data("inbox-token", "access_token").await.unwrap();

    // The first retry comes after the backoff (5 s ± 20 %: at least 4 s), or after Retry-After
    // when that is longer. A Retry-After of 9 s is longer than any first backoff, so a gap of at
    // least 8.5 s shows it was honoured (a Retry-After below the backoff could not be told apart).
    // Lower bounds only: a loaded machine makes gaps longer, never shorter.
    for (i, fault, reason, min_gap) in [
        (
            1,
            Fault::ServiceUnavailable,
            "ProviderUnavailable",
            Duration::from_millis(3500),
        ),
        (
            2,
            Fault::GoogleHtmlForbidden,
            "RateLimited",
            Duration::from_millis(3500),
        ),
        (
            3,
            Fault::RateLimited {
                retry_after_secs: 9,
            },
            "RateLimited",
            Duration::from_millis(8500),
        ),
    ] {
        env.proxy.set_fault(fault);
        let before = env.proxy.faulted_requests();
        annotate_refresh(&env, "inbox", &format!("fault-{i}")).await;
        // Backoff: a second attempt comes, but not in a hot loop. Time the gap between the first
        // and the second faulted request.
        let started = Instant::now();
        let mut first_at = None;
        loop {
            let n = env.proxy.faulted_requests() - before;
            if n >= 1 && first_at.is_none() {
                first_at = Some(Instant::now());
            }
            if n >= 2 {
                break;
            }
            // A deadline, not a timing claim: the longest expected gap is 9 s of Retry-After plus
            // backoff; 30 s leaves more than 3x for a loaded 2-core machine.
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{n} faulted requests within 30 s:\n{}",
                tail(&op.log(), 20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let retry_gap = first_at.unwrap().elapsed();
        assert!(
            retry_gap >= min_gap,
            "retried after {retry_gap:?}: that is no backoff\n{}",
            tail(&op.log(), 30)
        );
        let mi = env.get("inbox").await;
        assert_eq!(
            condition(&mi, "Reconciling"),
            Some(("True", reason)),
            "{:?}",
            mi.status
        );
        // The access token stays in place while it is valid, and so does Ready.
        assert!(is_ready(&mi), "{:?}", mi.status);
        assert_eq!(condition(&mi, "TokenValid"), Some(("True", "TokenValid")));
        assert_eq!(
            env.data("inbox-token", "access_token").await.as_deref(),
            Some(token.as_str())
        );
        env.proxy.clear_fault();
        env.wait_for("inbox", "recovery", Duration::from_secs(30), &op, |m| {
            condition(m, "Reconciling").is_some_and(|c| c.0 == "False") && is_ready(m)
        })
        .await;
        let recovered = env.data("inbox-token", "access_token").await.unwrap();
        assert_ne!(recovered, token, "a new token after recovery");
        token = recovered;
    }
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        events.contains("Warning ProviderUnavailable") && events.contains("Normal Recovered"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_secret_keys_and_values_are_reported_without_crashing() {
    let env = Env::new("missing", long_lived_server()).await;
    let op = env.operator("operator");
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    let mi = env
        .wait_condition(
            "inbox",
            ("Ready", "False", "ClientSecretNotFound"),
            Duration::from_secs(20),
            &op,
        )
        .await;
    let msg = condition_message(&mi, "Ready");
    assert!(
        msg.contains("\"client\"") && msg.contains("does not exist"),
        "{msg}"
    );

    env.put_secret("client", &[("client_id", env.server.client_id())])
        .await;
    let mi = env
        .wait_condition(
            "inbox",
            ("Ready", "False", "ClientSecretKeyMissing"),
            Duration::from_secs(20),
            &op,
        )
        .await;
    let msg = condition_message(&mi, "Ready");
    assert!(msg.contains("has no key \"client_secret\""), "{msg}");

    env.put_secret(
        "client",
        &[("client_id", env.server.client_id()), ("client_secret", "")],
    )
    .await;
    let mi = env
        .wait_for("inbox", "empty value", Duration::from_secs(20), &op, |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.message.contains("is empty"))
            })
        })
        .await;
    assert_eq!(
        condition(&mi, "Ready"),
        Some(("False", "ClientSecretKeyMissing"))
    );
    assert_eq!(
        env.proxy.token_requests(),
        0,
        "no provider call without client credentials"
    );

    // No grant at all: a sign-in is required (not an error).
    env.secrets()
        .delete("inbox-oauth-grant", &DeleteParams::default())
        .await
        .unwrap();
    env.client_secret(env.server.client_secret()).await;
    env.wait_condition(
        "inbox",
        ("Authorized", "False", "SignInRequired"),
        Duration::from_secs(20),
        &op,
    )
    .await;
    let mut op = op;
    assert!(
        op.process.is_running(),
        "the operator must not crash:\n{}",
        tail(&op.log(), 20)
    );
    env.grant("inbox", "alice").await;
    env.wait_for(
        "inbox",
        "Ready after bringing a refresh token",
        Duration::from_secs(20),
        &op,
        is_ready,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_valid_tokens_makes_no_token_requests_and_idle_makes_no_writes() {
    let env = Env::new("restart", long_lived_server()).await;
    let mut op = env.operator("operator-1");
    env.ready_integration(&op, "inbox").await;

    // Idle: over a measured interval, zero writes — by the operator's own count and by the objects'
    // resourceVersions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = |op: &Operator| op.api_writes();
    let w0 = writes(&op);
    let mi_rv = env.get("inbox").await.metadata.resource_version;
    let token_rv = env
        .token_secret("inbox")
        .await
        .unwrap()
        .metadata
        .resource_version;
    // Touch the resource's metadata: a reconcile runs, but must decide that nothing changed.
    let patch = serde_json::json!({"metadata": {"labels": {"touched": "yes"}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mi_rv = {
        let _ = mi_rv;
        env.get("inbox").await.metadata.resource_version
    };
    let at_api_before = op.api_requests();
    let interval = Duration::from_secs(10);
    tokio::time::sleep(interval).await;
    assert_eq!(writes(&op), w0, "API writes while idle for {interval:?}");
    // As the API server saw it: every request of this operator's own user, the sign-in server's,
    // events and finalizers included.
    let idle = api_audit::since(&at_api_before, &op.api_requests());
    let idle_writes: Vec<_> = idle.iter().filter(|r| r.is_write()).cloned().collect();
    assert!(
        idle_writes.is_empty(),
        "the API server saw writes while idle:\n{}",
        api_audit::describe(&idle_writes)
    );
    assert_eq!(
        env.get("inbox").await.metadata.resource_version,
        mi_rv,
        "the MailIntegration was written while idle"
    );
    assert_eq!(
        env.token_secret("inbox")
            .await
            .unwrap()
            .metadata
            .resource_version,
        token_rv,
        "the token Secret was written while idle"
    );

    // Restart: still-valid tokens are not refreshed again.
    op.process.stop();
    env.proxy.reset_counts();
    let op2 = env.operator("operator-2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while op2
        .metric("mailintegration_reconciles_total{result=\"ok\"}")
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the new operator did not reconcile within 30 s:\n{}",
            tail(&op2.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A refresh at start-up would come right after the first reconcile; give it 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.proxy.token_requests(),
        0,
        "token requests at start-up with valid tokens"
    );
    assert!(is_ready(&env.get("inbox").await));
    assert_eq!(
        writes(&op2),
        0.0,
        "no writes at start-up when nothing changed"
    );
    let at_api = op2.api_requests();
    assert!(
        at_api.iter().any(
            |r| r.resource == "mailintegrations" && matches!(r.verb.as_str(), "list" | "watch")
        ),
        "the audit log shows the new operator's start-up (a list or watch of MailIntegrations):\n{}",
        api_audit::describe(&at_api)
    );
    let start_writes: Vec<_> = at_api.iter().filter(|r| r.is_write()).cloned().collect();
    assert!(
        start_writes.is_empty(),
        "the API server saw writes at start-up when nothing changed:\n{}",
        api_audit::describe(&start_writes)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_on_delete_revokes_the_grant_and_gives_up_after_a_bounded_time() {
    let env = Env::new("revoke", long_lived_server()).await;
    // As the chart's ServiceAccount: the finalizer is a PATCH of the MailIntegration itself, which
    // only the chart's RBAC (not an admin kubeconfig) can show to be allowed.
    let (_release, op) = env.operator_as_chart("operator", &[], &["--revoke-timeout=4s"]);
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"revokeOnDelete": true}),
    )
    .await;
    let mi = env
        .wait_for(
            "inbox",
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    assert!(
        mi.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"mailintegration.dev/revoke-grant".to_owned()),
        "the operator added its finalizer"
    );
    let token = env.data("inbox-token", "access_token").await.unwrap();
    assert!(env.server.introspect(&token).await);

    env.integrations()
        .delete("inbox", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&env, "inbox", Duration::from_secs(15), &op).await;
    assert!(
        !env.server.introspect(&token).await,
        "the grant was revoked at the provider"
    );
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
    ]);
    assert!(events.contains("Normal GrantRevoked"), "{events}");

    // A revocation endpoint that never answers delays the deletion only for --revoke-timeout.
    env.grant("stuck", "bob").await;
    let closed = format!("http://127.0.0.1:{}/revoke", support::process::CLOSED_PORT);
    // The client Secret's owner lists that server (else the binding check refuses it at once).
    let servers = format!(
        "{},http://127.0.0.1:{}",
        env.oauth_servers(),
        support::process::CLOSED_PORT
    );
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/oauth-servers": servers}}});
    env.secrets()
        .patch(
            "client",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    env.integration_with(
        "stuck",
        "bob@example.test",
        serde_json::json!({"revokeOnDelete": true, "oauth": {"endpoints": {"authorization": format!("{}/auth", env.proxy.url()), "token": env.proxy.token_url(), "revocation": closed}}}),
    )
    .await;
    env.wait_for(
        "stuck",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    env.integrations()
        .delete("stuck", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = env.integrations().get_opt("stuck").await.unwrap();
    // The timeout counts from the deletion timestamp, which the API server writes in whole seconds.
    let deleted_at = kept
        .as_ref()
        .and_then(|mi| mi.metadata.deletion_timestamp.as_ref())
        .expect("kept while revocation is retried, with its deletion timestamp")
        .0;
    wait_gone(&env, "stuck", Duration::from_secs(30), &op).await;
    // A lower bound (--revoke-timeout=4s): a slow machine only makes it longer.
    let took = jiff::Timestamp::now().duration_since(deleted_at);
    assert!(
        took >= jiff::SignedDuration::from_secs(4),
        "gone {took} after its deletion timestamp, before the timeout"
    );
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason} {.message}{\"\\n\"}{end}",
    ]);
    assert!(
        events.contains("Warning RevocationFailed") && events.contains("was NOT revoked"),
        "{events}"
    );
    assert_no_forbidden_calls(&op);
}

async fn wait_gone(env: &Env, name: &str, timeout: Duration, op: &Operator) {
    let deadline = Instant::now() + timeout;
    while env.integrations().get_opt(name).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "{name} still exists after {timeout:?}:\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const SUCCESS: &str =
    r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leader_election_only_the_leader_refreshes_and_a_standby_takes_over() {
    let env = Env::new("leader", short_lived_server()).await;
    let lease_seconds = 6;
    let args = [
        "--leader-election",
        "--leader-election-namespace",
        &env.ns,
        "--leader-election-lease-seconds",
        "6",
    ];
    let a = env.operator_with("operator-a", &args);
    let b = env.operator_with("operator-b", &args);
    env.ready_integration(&a, "inbox").await;
    let count = |op: &Operator| op.metric(SUCCESS).unwrap_or(0.0);
    env.wait_for(
        "inbox",
        "three refreshes",
        Duration::from_secs(40),
        &a,
        |_| count(&a) + count(&b) >= 3.0,
    )
    .await;
    let (ca, cb) = (count(&a), count(&b));
    assert!(
        (ca == 0.0) != (cb == 0.0),
        "exactly one operator refreshes: a={ca} b={cb}"
    );
    let (mut leader, standby) = if ca > 0.0 { (a, b) } else { (b, a) };
    let holder = || {
        env.cp.kubectl(&[
            "get",
            "lease",
            "mail-integration-operator",
            "-n",
            &env.ns,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    let first_holder = holder();
    assert!(!first_holder.is_empty());

    // The leader dies without a chance to hand over (SIGKILL): the standby takes over once the
    // Lease runs out.
    let before_kill = count(&leader);
    let pid = leader.process.child_pid().expect("leader pid");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let killed_at = Instant::now();
    while holder() == first_holder {
        // A deadline: the takeover is due one lease after the last renewal; 10 s more covers the
        // standby's retry period (2 s) and a loaded machine's scheduling several times over.
        assert!(
            killed_at.elapsed() < Duration::from_secs(lease_seconds + 10),
            "no takeover within the lease duration:\n{}",
            tail(&standby.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let takeover = killed_at.elapsed();
    // Not before the Lease ran out: the leader renewed it at most half a lease before the kill,
    // so the standby may take it no sooner than half a lease after (1 s slack for the poll).
    // The upper bound is the loop's: lease + 10 s, margin for a loaded 2-core machine.
    assert!(
        takeover + Duration::from_secs(1) >= Duration::from_secs(lease_seconds / 2),
        "takeover after {takeover:?}: before the dead leader's Lease ran out"
    );
    env.wait_for(
        "inbox",
        "refreshes by the new leader",
        Duration::from_secs(30),
        &standby,
        |_| count(&standby) >= 2.0,
    )
    .await;
    leader.process.stop();

    // No double refresh: every token request is one successful refresh of exactly one operator (the
    // one request that may have been in flight at the kill aside), and with rotation on the grant
    // is still alive — a refresh token used twice would have revoked it.
    let requests = env.proxy.token_requests() as f64;
    let refreshed = before_kill + count(&standby);
    assert!(
        requests >= refreshed && requests <= refreshed + 1.0,
        "token requests {requests}, successful refreshes {refreshed}"
    );
    let mi = env.get("inbox").await;
    assert!(is_ready(&mi), "{:?}", mi.status);
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    assert!(
        env.server
            .introspect(&env.data("inbox-token", "access_token").await.unwrap())
            .await
    );
    eprintln!("leader election: takeover after {takeover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_works_with_exactly_the_charts_rbac() {
    use support::helm::kubectl_as;
    let env = Env::new("rbac", long_lived_server()).await;
    let (release, op) = env.operator_as_chart("operator", &["leaderElection.enabled=true"], &[]);
    let kubeconfig = release.service_account_kubeconfig();

    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.wait_for(
        "inbox",
        "Ready=True as the chart's ServiceAccount",
        Duration::from_secs(60),
        &op,
        is_ready,
    )
    .await;
    let events = env.cp.kubectl(&[
        "get",
        "events",
        "-n",
        &env.ns,
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        !events.trim().is_empty(),
        "the operator could publish events"
    );

    assert_no_forbidden_calls(&op);

    // And it cannot read a Secret it has no business reading: one in a namespace it does not watch.
    let other = support::unique_namespace("rbac-other");
    env.cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "unrelated",
        "-n",
        &other,
        "--from-literal=password=hunter2",
    ]);
    let out = kubectl_as(
        env.cp,
        &kubeconfig,
        &["get", "secret", "unrelated", "-n", &other],
    );
    assert!(
        !out.status.success(),
        "the ServiceAccount read a Secret outside its namespaces"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl_as(
        env.cp,
        &kubeconfig,
        &[
            "delete",
            "secret",
            "client",
            "-n",
            &env.ns,
            "--dry-run=server",
        ],
    );
    assert!(
        !out.status.success(),
        "the ServiceAccount may delete Secrets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_of_another_account_is_refused_with_account_mismatch() {
    let env = Env::new("mismatch", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    // bob's refresh token brought by hand for alice's mailbox.
    env.grant("inbox", "bob").await;
    env.integration("inbox", "alice@example.test").await;
    let mi = env
        .wait_for(
            "inbox",
            "AccountMismatch",
            Duration::from_secs(30),
            &op,
            |m| condition(m, "Authorized").is_some_and(|c| c.1 == "AccountMismatch"),
        )
        .await;
    assert_eq!(condition(&mi, "Ready").map(|c| c.0), Some("False"));
    assert_eq!(condition(&mi, "Stalled"), Some(("True", "AccountMismatch")));
    let message = condition_message(&mi, "Authorized");
    assert!(
        message.contains("bob@example.test") && message.contains("alice@example.test"),
        "{message}"
    );
    assert!(
        env.token_secret("inbox").await.is_none(),
        "bob's token is not published for alice's mailbox"
    );
}

/// spec.tokenSecret.template: extra keys rendered from the token (a config file), labels and
/// annotations; a changed template is rendered again without a refresh; a broken one is refused
/// with TokenTemplateInvalid naming the key — and no token value appears in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_secret_template_renders_config_files_and_refuses_broken_ones() {
    let env = Env::new("template", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"tokenSecret": {"template": {
            "labels": {"app": "helpdesk"},
            "annotations": {"example.com/reload": "true"},
            "data": {"app.ini": "[mail]\nuser = {{ username }}\npassword = {{ access_token }}\n"},
        }}}),
    )
    .await;
    env.wait_for(
        "inbox",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    let token = env.data("inbox-token", "access_token").await.unwrap();
    assert_eq!(
        env.data("inbox-token", "app.ini").await.as_deref(),
        Some(format!("[mail]\nuser = alice@example.test\npassword = {token}\n").as_str())
    );
    let secret = env.token_secret("inbox").await.unwrap();
    assert_eq!(secret.metadata.labels.as_ref().unwrap()["app"], "helpdesk");
    assert_eq!(
        secret.metadata.annotations.as_ref().unwrap()["example.com/reload"],
        "true"
    );
    let refreshes = env.proxy.refresh_requests();

    // A new template: the Secret follows, with the same token (no refresh).
    let patch = serde_json::json!({"spec": {"tokenSecret": {"template": {"data": {"token.txt": "{{ access_token }}"}}}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.data("inbox-token", "token.txt").await.as_deref() != Some(token.as_str()) {
        assert!(
            Instant::now() < deadline,
            "not re-rendered:\n{}",
            tail(&op.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        env.proxy.refresh_requests(),
        refreshes,
        "re-rendering needs no refresh"
    );

    // A broken template (a name it may not use): refused with the key named.
    let patch = serde_json::json!({"spec": {"tokenSecret": {"template": {"data": {"token.txt": null, "leak": "{{ refresh_token }}"}}}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mi = env
        .wait_for(
            "inbox",
            "TokenTemplateInvalid",
            Duration::from_secs(20),
            &op,
            |mi| condition(mi, "Ready").is_some_and(|c| c.1 == "TokenTemplateInvalid"),
        )
        .await;
    let message = condition_message(&mi, "Ready");
    assert!(
        message.contains("leak") && message.contains("undefined"),
        "{message}"
    );
    assert!(!message.contains(&token), "no token value in the message");
    assert_eq!(
        env.data("inbox-token", "leak").await,
        None,
        "nothing rendered from a broken template"
    );
    assert_no_secrets_in_logs_or_events(&env, &op, &[&token, env.server.client_secret()]).await;
}
