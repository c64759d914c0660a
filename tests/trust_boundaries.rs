//! Trust boundaries, against the real kube-apiserver and oidc-provider: whoever may create or edit a
//! MailIntegration cannot make the operator read a Secret that was not marked for it, write a Secret
//! it does not own, or crash it with a hostile value — and the operator says so on the resource.
//!
//! Each test has its own namespace and operator process (watching only that namespace).

mod support;

#[path = "trust_boundaries/capacity.rs"]
mod capacity;
#[path = "trust_boundaries/memory.rs"]
mod memory;

#[path = "trust_boundaries/templates.rs"]
mod templates;

#[path = "trust_boundaries/credentials.rs"]
mod credentials;

#[path = "trust_boundaries/events.rs"]
mod events;

#[path = "trust_boundaries/sign_in_timeout.rs"]
mod sign_in_timeout;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use std::time::Duration;
use support::{
    fault_proxy::Fault,
    oauth::OAuthServer,
    world::{Env, assert_no_secrets_in_logs_or_events, condition, is_ready, tail},
};

/// Access tokens that live 10 minutes: nothing is due during a test unless forced.
fn server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

const WAIT: Duration = Duration::from_secs(60);

/// (The modules of this binary import it under this name.)
use support::world::condition_message as message;

/// The API server refuses to create `spec` (CEL), with a message containing `expect`.
async fn assert_refused(env: &Env, name: &str, spec: serde_json::Value, expect: &str) {
    let mi = support::world::mail_integration(name, spec);
    match env.integrations().create(&PostParams::default(), &mi).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(e.message.contains(expect), "{}", e.message);
        }
        other => panic!("{name}: the API server accepted a spec it must refuse: {other:?}"),
    }
}

fn spec(env: &Env, client: &str, token: &str) -> serde_json::Value {
    serde_json::json!({
        "provider": "OIDC",
        "mailbox": {"address": "alice@example.test"},
        "oauth": {
            "clientSecretRef": {"name": client},
            "endpoints": {
                "authorization": format!("{}/auth", env.proxy.url()),
                "token": env.proxy.token_url(),
            },
        },
        "tokenSecret": {"name": token},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmarked_secret_is_never_read_through_a_mailintegration() {
    let env = Env::new("readthrough", server()).await;
    let op = env.operator("operator");
    // A Secret of some other application in the namespace, and another integration's grant.
    let loot = "app-db-password-7f3c9a1e";
    env.put_secret_labelled("app-db", &[("password", loot)], serde_json::json!({}))
        .await;
    env.client_secret(env.server.client_secret()).await;
    let victim_rt = env.grant("victim", "alice").await;
    env.integration("victim", "alice@example.test").await;
    env.wait_for("victim", "Ready", WAIT, &op, is_ready).await;

    // 1. Naming the unmarked Secret, with its key as the client ID and secret.
    env.integration_with(
        "thief",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {
            "name": "app-db", "clientIdKey": "password", "clientSecretKey": "password"
        }}}),
    )
    .await;
    let mi = env
        .wait_for("thief", "ClientSecretNotMarked", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "ClientSecretNotMarked"))
        })
        .await;
    assert_eq!(
        condition(&mi, "Stalled"),
        Some(("True", "ClientSecretNotMarked"))
    );
    let msg = message(&mi, "Ready");
    assert!(
        msg.contains(&format!(
            "kubectl label secret app-db -n {} mailintegration.dev/oauth-client=true",
            env.ns
        )),
        "{msg}"
    );
    assert!(
        mi.status.as_ref().unwrap().sign_in.is_none(),
        "no sign-in link (whose start would carry the client ID) for an unmarked client Secret"
    );

    // 2. Naming an operator-managed Secret (the victim's token Secret) as the client: refused
    //    even when someone adds the marking label to it.
    let patch =
        serde_json::json!({"metadata": {"labels": {"mailintegration.dev/oauth-client": "true"}}});
    env.secrets()
        .patch(
            "victim-token",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    env.integration_with(
        "thief2",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {
            "name": "victim-token", "clientIdKey": "access_token", "clientSecretKey": "xoauth2"
        }}}),
    )
    .await;
    let mi = env
        .wait_for("thief2", "ClientSecretNotMarked", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "ClientSecretNotMarked"))
        })
        .await;
    assert!(
        message(&mi, "Ready").contains("operator manages"),
        "{:?}",
        mi.status
    );

    // 3. Naming another integration's grant Secret: the API server refuses the spec itself.
    let mut s = spec(&env, "victim-oauth-grant", "thief3-token");
    s["oauth"]["clientSecretRef"]["clientIdKey"] = "refresh_token".into();
    assert_refused(&env, "thief3", s, "must not name a grant Secret").await;

    // Nothing of the unmarked Secret, the victim's refresh token or its access token went anywhere.
    let access = env.data("victim-token", "access_token").await.unwrap();
    assert_no_secrets_in_logs_or_events(&env, &op, &[loot, &victim_rt, &access]).await;
    assert_eq!(
        env.proxy.requests("/auth"),
        0,
        "no authorization request was started"
    );
    // The victim was not disturbed.
    assert!(is_ready(&env.get("victim").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_it_does_not_own_are_never_written() {
    let env = Env::new("overwrite", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;

    // An unrelated Secret that a tenant names as its token Secret.
    env.put_secret_labelled(
        "app-config",
        &[("config.yaml", "listen: 8080")],
        serde_json::json!({}),
    )
    .await;
    let before = env.secrets().get("app-config").await.unwrap();
    env.grant("squatter", "alice").await;
    env.integration_with(
        "squatter",
        "alice@example.test",
        serde_json::json!({"tokenSecret": {"name": "app-config"}}),
    )
    .await;
    let mi = env
        .wait_for("squatter", "TokenSecretConflict", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "TokenSecretConflict"))
        })
        .await;
    assert_eq!(
        condition(&mi, "Stalled"),
        Some(("True", "TokenSecretConflict"))
    );
    assert!(
        message(&mi, "Ready").contains("\"app-config\""),
        "{:?}",
        mi.status
    );

    // Another integration's token Secret.
    env.grant("owner", "alice").await;
    env.integration("owner", "alice@example.test").await;
    env.wait_for("owner", "Ready", WAIT, &op, is_ready).await;
    let owner_token_before = env.secrets().get("owner-token").await.unwrap();
    env.grant("copycat", "alice").await;
    env.integration_with(
        "copycat",
        "alice@example.test",
        serde_json::json!({"tokenSecret": {"name": "owner-token"}}),
    )
    .await;
    let mi = env
        .wait_for("copycat", "TokenSecretConflict", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "TokenSecretConflict"))
        })
        .await;
    assert!(
        message(&mi, "Ready").contains("another MailIntegration"),
        "{:?}",
        mi.status
    );

    // A grant Secret that exists under an integration's grant name but is not for it.
    env.put_secret_labelled(
        "stray-oauth-grant",
        &[("refresh_token", "not-for-the-operator")],
        serde_json::json!({}),
    )
    .await;
    env.integration("stray", "alice@example.test").await;
    let mi = env
        .wait_for("stray", "GrantSecretConflict", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "GrantSecretConflict"))
        })
        .await;
    assert!(
        message(&mi, "Ready").contains("mailintegration.dev/integration=stray"),
        "{:?}",
        mi.status
    );

    // The CEL rules: the token Secret can be neither the client Secret nor a grant Secret.
    assert_refused(
        &env,
        "selfie",
        spec(&env, "client", "client"),
        "must not be the client Secret",
    )
    .await;
    assert_refused(
        &env,
        "griefer",
        spec(&env, "client", "owner-oauth-grant"),
        "must not end in -oauth-grant",
    )
    .await;

    // None of them was written: same resourceVersion, no ownerReference added.
    let after = env.secrets().get("app-config").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(after.metadata.owner_references.is_none());
    let owner_token_after = env.secrets().get("owner-token").await.unwrap();
    assert_eq!(
        owner_token_after.metadata.resource_version,
        owner_token_before.metadata.resource_version
    );
    let stray = env.secrets().get("stray-oauth-grant").await.unwrap();
    assert!(stray.metadata.owner_references.is_none());
    assert_eq!(
        env.data("stray-oauth-grant", "refresh_token")
            .await
            .as_deref(),
        Some("not-for-the-operator")
    );
    // The owner's refresh and the squatter's one: its token Secret is created without a read, so
    // the unlabelled app-config is found only by the 409 of that create, after the token request
    // (once: the status then says TokenSecretConflict, and app-config is read before any other).
    // The copycat names a Secret in the operator's cache: held before any provider call.
    assert_eq!(
        env.proxy.token_requests(),
        2,
        "only the owner and the squatter (once) refreshed"
    );

    // Deleting the squatter leaves the user's Secret alone (no ownerReference for the garbage
    // collector), while the real garbage collector of kube-controller-manager removes what the
    // operator owned: the owner's token Secret, once the owner is deleted too.
    for name in ["squatter", "owner"] {
        env.integrations()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while env
        .secrets()
        .get_opt("owner-token")
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the garbage collector did not remove the deleted owner's token Secret within 90 s.\n--- kube-controller-manager ---\n{}",
            env.cp.controller_manager_log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let kept = env.secrets().get_opt("app-config").await.unwrap();
    assert_eq!(
        kept.and_then(|s| s.metadata.resource_version),
        before.metadata.resource_version,
        "the user's Secret named by the squatter is neither deleted nor written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_do_not_crash_the_operator_or_stall_other_tenants() {
    let env = Env::new("hostile", server()).await;
    let mut op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    for name in ["bystander", "tampered", "greedy"] {
        env.grant(name, "alice").await;
        env.integration(name, "alice@example.test").await;
    }
    for name in ["bystander", "tampered", "greedy"] {
        env.wait_for(name, "Ready", WAIT, &op, is_ready).await;
    }

    // A token Secret whose expiry is at the far end of the clock (the Secret is the operator's
    // own, but anyone who may edit Secrets in the namespace can change it).
    for expiry in ["-009999-01-03T00:00:00Z", "9999-12-30T00:00:00Z"] {
        let patch = serde_json::json!({"stringData": {"expiry": expiry}});
        env.secrets()
            .patch(
                "tampered-token",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
        // The operator refreshes it (a nonsense expiry is not believed) and publishes a sane one.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let now = env
                .data("tampered-token", "expiry")
                .await
                .unwrap_or_default();
            if now != expiry && now.starts_with("20") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tampered-token still has expiry {now:?}\n{}",
                tail(&op.log(), 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            op.process.is_running(),
            "the operator died on expiry {expiry}:\n{}",
            tail(&op.log(), 30)
        );
    }

    // A token endpoint that asks to wait 31,688 years.
    env.proxy.set_fault(Fault::RateLimited {
        retry_after_secs: 1_000_000_000_000,
    });
    force_refresh(&env, "greedy").await;
    let mi = env
        .wait_for("greedy", "RateLimited", WAIT, &op, |mi| {
            condition(mi, "Reconciling") == Some(("True", "RateLimited"))
        })
        .await;
    // Retry-After is capped at an hour: the message says so in seconds.
    let msg = message(&mi, "Reconciling");
    let secs: u64 = msg
        .rsplit("retrying in ")
        .next()
        .and_then(|s| s.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no retry delay in {msg:?}"));
    assert!(secs <= 3600, "{msg}");
    assert!(
        is_ready(&mi),
        "the published token stays valid and Ready: {:?}",
        mi.status
    );
    env.proxy.clear_fault();
    assert!(op.process.is_running(), "{}", tail(&op.log(), 30));

    // The other tenant is still served: a forced refresh goes through.
    let before = env.data("bystander-token", "access_token").await.unwrap();
    force_refresh(&env, "bystander").await;
    let deadline = std::time::Instant::now() + WAIT;
    while env.data("bystander-token", "access_token").await.unwrap() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "bystander was not refreshed\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(op.process.is_running());
    assert_eq!(
        op.metric(r#"mailintegration_reconcile_errors_total{error="panic"}"#),
        Some(0.0),
        "no reconcile panicked:\n{}",
        tail(&op.log(), 30)
    );
}

/// Ask for one refresh now (the annotation `kubectl mailint refresh` would set).
async fn force_refresh(env: &Env, name: &str) {
    let value = format!("{:?}", std::time::SystemTime::now());
    support::world::annotate_refresh(env, name, &value).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_never_sent_anywhere_but_where_it_was_issued() {
    let env = Env::new("bound", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    // Brought by hand: bound to the token endpoint and client of its first refresh.
    let rt = env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.wait_for("inbox", "Ready", WAIT, &op, is_ready).await;
    let bound = env.data("inbox-oauth-grant", "token_endpoint").await;
    assert_eq!(bound.as_deref(), Some(env.proxy.token_url().as_str()));
    assert_eq!(
        env.data("inbox-oauth-grant", "client_id").await.as_deref(),
        Some(env.server.client_id())
    );

    // Someone who may edit the MailIntegration points its token endpoint at their own server (a
    // second proxy here, counting what reaches it) and asks for a refresh.
    let evil = support::fault_proxy::FaultProxy::start(&env.server.base_url);
    let patch = serde_json::json!({"spec": {"oauth": {"endpoints": {"token": evil.token_url()}}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    force_refresh(&env, "inbox").await;
    let mi = env
        .wait_for("inbox", "GrantBoundElsewhere", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "GrantBoundElsewhere"))
        })
        .await;
    assert_eq!(
        condition(&mi, "Stalled"),
        Some(("True", "GrantBoundElsewhere"))
    );
    assert!(
        message(&mi, "Ready").contains(&evil.token_url()),
        "{:?}",
        mi.status
    );
    assert!(
        mi.status.as_ref().unwrap().sign_in.is_some(),
        "a new sign-in is offered: {:?}",
        mi.status
    );
    assert_eq!(
        evil.token_requests(),
        0,
        "the refresh token went to the other server"
    );

    // The mail server is moved to a host outside the allowed list (a listener on 127.0.0.2, which
    // is loopback but not 127.0.0.1): the check never connects there.
    let trap = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = trap.local_addr().unwrap().port();
    let patch = serde_json::json!({"spec": {
        "oauth": {"endpoints": {"token": env.proxy.token_url()}},
        "mailbox": {"server": {"host": "127.0.0.2", "port": port, "tls": "Implicit"}},
    }});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mi = env
        .wait_for("inbox", "MailboxHostNotAllowed", WAIT, &op, |mi| {
            condition(mi, "MailboxConnected") == Some(("False", "MailboxHostNotAllowed"))
        })
        .await;
    assert!(
        message(&mi, "MailboxConnected").contains("--mailbox-allowed-hosts"),
        "{:?}",
        mi.status
    );
    let connected = tokio::time::timeout(Duration::from_millis(500), trap.accept()).await;
    assert!(
        connected.is_err(),
        "the operator connected to a host outside the list"
    );
    let access = env.data("inbox-token", "access_token").await.unwrap();
    assert_no_secrets_in_logs_or_events(&env, &op, &[&rt, &access]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_answers_without_end_is_cut_off() {
    let env = Env::new("bigbody", server()).await;
    let mut op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.wait_for("inbox", "Ready", WAIT, &op, is_ready).await;
    // 32 MiB of "JSON" for one token request.
    env.proxy.set_fault(Fault::Canned {
        status: 200,
        content_type: "application/json".into(),
        headers: vec![],
        body: format!("{{\"access_token\":\"{}\"}}", "a".repeat(32 << 20)),
    });
    force_refresh(&env, "inbox").await;
    let mi = env
        .wait_for("inbox", "a refresh failure", WAIT, &op, |mi| {
            condition(mi, "Reconciling").is_some_and(|c| c.0 == "True")
        })
        .await;
    let msg = message(&mi, "Reconciling");
    assert!(msg.contains("larger than 64 KiB"), "{msg}");
    assert!(
        is_ready(&mi),
        "the published token stays in place: {:?}",
        mi.status
    );
    assert!(op.process.is_running());
    env.proxy.clear_fault();
}
