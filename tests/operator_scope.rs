//! What the operator acts on: `spec.suspend` stops refreshing (a due token and a requested refresh
//! alike) and resuming starts it again; an operator watching several namespaces serves each of
//! them and makes no request about a namespace it does not watch (as the API server's audit log
//! shows); and the token Secret's `oauthbearer` key exists exactly when a mail server is known.
//!
//! The token endpoint is a [`ProviderStandIn`] (Google flavour) behind a [`FaultProxy`].

mod support;

use kube::api::{Patch, PatchParams};
use mail_integration_operator::api::MailIntegration;
use std::time::{Duration, Instant};
use support::{
    fault_proxy::FaultProxy,
    operator::Operator,
    provider_standin::{Flavour, ProviderStandIn},
    world::{Env, annotate_refresh, condition, mail_integration, tail},
};

const CLIENT_SECRET: &str = "scope-test-client-secret-93ab17";

fn google_spec(name: &str, proxy: &FaultProxy) -> serde_json::Value {
    serde_json::json!({
        "provider": "Google",
        "mailbox": {
            "address": "alice@example.test",
            "server": {"host": "127.0.0.1", "port": support::process::CLOSED_PORT, "tls": "None"},
        },
        "oauth": {
            "clientSecretRef": {"name": "client"},
            "redirectURL": "http://127.0.0.1:8080/oauth2/callback",
            "endpoints": {
                "authorization": format!("{}/auth", proxy.url()),
                "token": proxy.token_url(),
            },
        },
        "tokenSecret": {"name": format!("{name}-token")},
        "refreshBefore": "1m",
    })
}

/// The client Secret, a grant brought by hand and a Google integration `name` in namespace `ns`.
async fn google_integration(
    env: &Env,
    ns: &str,
    name: &str,
    standin: &ProviderStandIn,
    proxy: &FaultProxy,
) {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(env.client.clone(), ns);
    for (secret, label, pairs) in [
        (
            "client".to_owned(),
            serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
            serde_json::json!({"client_id": "scope-test-client", "client_secret": CLIENT_SECRET}),
        ),
        (
            format!("{name}-oauth-grant"),
            serde_json::json!({"mailintegration.dev/integration": name}),
            serde_json::json!({"refresh_token": standin.issue_refresh_token()}),
        ),
    ] {
        let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
            // The OIDC integration of `ca_bundles_and_unknown_servers` uses the same client.
            "metadata": {"name": secret, "labels": label, "annotations": {"mailintegration.dev/oauth-servers": proxy.url()}},
            "stringData": pairs,
        }))
        .unwrap();
        secrets
            .patch(
                &secret,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&s),
            )
            .await
            .unwrap();
    }
    let api: kube::Api<MailIntegration> = kube::Api::namespaced(env.client.clone(), ns);
    api.create(
        &Default::default(),
        &mail_integration(name, google_spec(name, proxy)),
    )
    .await
    .unwrap();
}

async fn get_in(env: &Env, ns: &str, name: &str) -> MailIntegration {
    kube::Api::<MailIntegration>::namespaced(env.client.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    op: &Operator,
    mut done: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_stops_due_and_requested_refreshes_and_resume_restarts_them() {
    let env = Env::new("suspend", support::oauth::shared()).await;
    let standin = ProviderStandIn::start(Flavour::Google);
    // 75 s tokens with refreshBefore 1m: a refresh is due about 15 s after each one.
    standin.set_expires_in(75);
    let proxy = FaultProxy::start(&standin.url());
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    google_integration(&env, &env.ns, "inbox", &standin, &proxy).await;
    wait_until(
        "the first refresh",
        Duration::from_secs(30),
        &op,
        async || env.data("inbox-token", "access_token").await.is_some(),
    )
    .await;
    // The refresh that the suspension must prevent: when the operator announced it.
    let due = env
        .wait_for(
            "inbox",
            "status.nextRefreshTime",
            Duration::from_secs(30),
            &op,
            |m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.next_refresh_time.is_some())
            },
        )
        .await
        .status
        .and_then(|s| s.next_refresh_time)
        .unwrap()
        .0;
    let patch = |suspend: bool| serde_json::json!({"spec": {"suspend": suspend}});
    env.integrations()
        .patch(
            "inbox",
            &PatchParams::default(),
            &Patch::Merge(&patch(true)),
        )
        .await
        .unwrap();
    let mi = env
        .wait_for(
            "inbox",
            "Ready reason Suspended",
            Duration::from_secs(30),
            &op,
            |m| condition(m, "Ready").is_some_and(|c| c.1 == "Suspended"),
        )
        .await;
    assert!(mi.status.as_ref().unwrap().next_refresh_time.is_none());
    let refreshes = standin.presented().len();
    assert_eq!(refreshes, 1, "one refresh before the suspension");
    annotate_refresh(&env, "inbox", "while-suspended").await;
    // Past the announced due time, with a margin of 10 s.
    let wait = due
        .duration_since(jiff::Timestamp::now())
        .checked_add(jiff::SignedDuration::from_secs(10))
        .unwrap();
    assert!(
        wait <= jiff::SignedDuration::from_secs(90),
        "the refresh was announced for {due}, {wait} from now: more than this test waits"
    );
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    assert_eq!(
        standin.presented().len(),
        refreshes,
        "a suspended integration was refreshed (due, or requested):\n{}",
        tail(&op.log(), 30)
    );
    assert_eq!(proxy.token_requests(), refreshes as u64);

    env.integrations()
        .patch(
            "inbox",
            &PatchParams::default(),
            &Patch::Merge(&patch(false)),
        )
        .await
        .unwrap();
    wait_until(
        "a refresh after resuming",
        Duration::from_secs(30),
        &op,
        async || standin.presented().len() > refreshes,
    )
    .await;
    // Ready then says what the mailbox check found (nothing listens at 127.0.0.1:1), no longer
    // Suspended; the token is valid again.
    env.wait_for(
        "inbox",
        "not Suspended, TokenValid after resuming",
        Duration::from_secs(30),
        &op,
        |m| {
            condition(m, "Ready").is_some_and(|c| c.1 != "Suspended")
                && condition(m, "TokenValid").is_some_and(|c| c.0 == "True")
                && m.status.as_ref().unwrap().next_refresh_time.is_some()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watching_two_namespaces_serves_both_and_leaves_a_third_alone() {
    let env = Env::new("watch-a", support::oauth::shared()).await;
    let second = support::unique_namespace("watch-b");
    let unwatched = support::unique_namespace("watch-c");
    let standin = ProviderStandIn::start(Flavour::Google);
    let proxies: Vec<FaultProxy> = (0..3).map(|_| FaultProxy::start(&standin.url())).collect();
    let ns_flag = format!("--namespace={second}");
    let mut op = env.operator_with("operator", &["--allow-endpoint-overrides", &ns_flag]);
    let spaces = [env.ns.clone(), second.clone(), unwatched.clone()];
    for (ns, proxy) in spaces.iter().zip(&proxies) {
        google_integration(&env, ns, "inbox", &standin, proxy).await;
    }
    for ns in &spaces[..2] {
        wait_until(
            &format!("a token in {ns}"),
            Duration::from_secs(30),
            &op,
            async || {
                get_in(&env, ns, "inbox").await.status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "TokenValid" && c.status == "True")
                })
            },
        )
        .await;
    }
    // As long again for the unwatched one, which must stay untouched.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        get_in(&env, &unwatched, "inbox").await.status.is_none(),
        "the integration in the unwatched namespace has a status"
    );
    assert_eq!(
        proxies[2].token_requests(),
        0,
        "a refresh for the unwatched namespace"
    );
    // The audit log records a request once it is complete: a watch when it ends, so stop first.
    op.process.stop();
    let requests = op.api_requests();
    let about_unwatched: Vec<_> = requests
        .iter()
        .filter(|r| r.namespace.as_deref() == Some(unwatched.as_str()))
        .cloned()
        .collect();
    assert!(
        about_unwatched.is_empty(),
        "requests about a namespace the operator does not watch:\n{}",
        support::api_audit::describe(&about_unwatched)
    );
    for ns in &spaces[..2] {
        assert!(
            requests
                .iter()
                .any(
                    |r| r.namespace.as_deref() == Some(ns.as_str()) && r.verb == "watch"
                        || r.namespace.as_deref() == Some(ns.as_str()) && r.verb == "list"
                ),
            "the audit log shows the operator listing or watching {ns}:\n{}",
            support::api_audit::describe(&requests)
        );
    }
    // No cluster-wide list or watch: it asked about its namespaces only.
    let cluster_wide: Vec<_> = requests
        .iter()
        .filter(|r| {
            matches!(r.verb.as_str(), "list" | "watch")
                && r.namespace.is_none()
                && matches!(r.resource.as_str(), "mailintegrations" | "secrets")
        })
        .cloned()
        .collect();
    assert!(
        cluster_wide.is_empty(),
        "cluster-wide reads:\n{}",
        support::api_audit::describe(&cluster_wide)
    );
}

/// OAUTHBEARER names the mail server (host and port): the key is written when a server is known
/// (the provider's default, or spec.mailbox.server) and left out for OIDC without one, as the
/// README says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_is_written_exactly_when_a_mail_server_is_known() {
    let env = Env::new("sasl-keys", support::oauth::shared()).await;
    let standin = ProviderStandIn::start(Flavour::Google);
    let proxy = FaultProxy::start(&standin.url());
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    google_integration(&env, &env.ns, "known", &standin, &proxy).await;
    // OIDC without spec.mailbox.server: no server is known.
    let rt = standin.issue_refresh_token();
    env.put_secret("unknown-oauth-grant", &[("refresh_token", &rt)])
        .await;
    env.integrations()
        .create(
            &Default::default(),
            &mail_integration(
                "unknown",
                serde_json::json!({
                    "provider": "OIDC",
                    "mailbox": {"address": "alice@example.test"},
                    "oauth": {
                        "clientSecretRef": {"name": "client"},
                        "redirectURL": "http://127.0.0.1:8080/oauth2/callback",
                        "endpoints": {"authorization": format!("{}/auth", proxy.url()), "token": proxy.token_url()},
                    },
                    "tokenSecret": {"name": "unknown-token"},
                }),
            ),
        )
        .await
        .unwrap();
    for name in ["known", "unknown"] {
        wait_until(
            &format!("{name}: a token"),
            Duration::from_secs(30),
            &op,
            async || {
                env.data(&format!("{name}-token"), "access_token")
                    .await
                    .is_some()
            },
        )
        .await;
    }
    for (name, oauthbearer) in [("known", true), ("unknown", false)] {
        let secret = env.token_secret(name).await.unwrap();
        let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
        for k in [
            "access_token",
            "token_type",
            "expiry",
            "username",
            "xoauth2",
        ] {
            assert!(keys.iter().any(|x| *x == k), "{name}: no {k}: {keys:?}");
        }
        assert_eq!(
            keys.iter().any(|x| *x == "oauthbearer"),
            oauthbearer,
            "{name}: {keys:?}"
        );
        let expiry = env.data(&format!("{name}-token"), "expiry").await.unwrap();
        let expiry: jiff::Timestamp = expiry.parse().expect("expiry is RFC 3339");
        assert!(
            expiry > jiff::Timestamp::now(),
            "{name}: expiry {expiry} has passed"
        );
    }
}

/// `--sign-in-link-ttl` sets how long status.signIn.url works; a link about to expire is renewed
/// (here its expiry is moved close by hand, as time would), and a link with time left is kept —
/// reconciles write nothing (counted in the API server's audit log), so no renewal loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_links_last_the_ttl_and_are_renewed_before_they_expire() {
    let env = Env::new("link-ttl", support::oauth::shared()).await;
    let op = env.operator_with("operator", &["--sign-in-link-ttl=20m"]);
    env.client_secret(env.server.client_secret()).await;
    env.integration("inbox", "alice@example.test").await;
    let link = |mi: &MailIntegration| mi.status.as_ref().and_then(|s| s.sign_in.clone());
    let mi = env
        .wait_for(
            "inbox",
            "a sign-in link",
            Duration::from_secs(30),
            &op,
            |mi| link(mi).is_some(),
        )
        .await;
    let first = link(&mi).unwrap();
    let left = first.expires_at.0.duration_since(jiff::Timestamp::now());
    assert!(
        left > jiff::SignedDuration::from_mins(19) && left <= jiff::SignedDuration::from_mins(20),
        "a 20m link: {left:?} left"
    );
    // Kept while it has time left: nothing written over a few reconciles.
    let writes = |op: &Operator| {
        op.api_write_requests()
            .into_iter()
            .filter(|r| r.resource == "mailintegrations")
            .count()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writes(&op);
    annotate_refresh(&env, "inbox", "poke-1").await;
    annotate_refresh(&env, "inbox", "poke-2").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mi = env.get("inbox").await;
    assert_eq!(
        link(&mi).map(|l| l.url),
        Some(first.url.clone()),
        "the link is kept"
    );
    assert_eq!(
        writes(&op),
        before,
        "the operator wrote nothing while the link has time left"
    );
    assert!(
        before >= 1,
        "the audit log shows the operator's first status write"
    );

    // Four minutes left (as if sixteen had passed): renewed.
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_mins(4);
    let patch = serde_json::json!({"status": {"signIn": {"url": first.url, "expiresAt": soon.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()}}});
    env.integrations()
        .patch_status("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mi = env
        .wait_for(
            "inbox",
            "a renewed link",
            Duration::from_secs(30),
            &op,
            |mi| link(mi).is_some_and(|l| l.url != first.url),
        )
        .await;
    let renewed = link(&mi).unwrap();
    assert!(renewed.expires_at.0 > soon + jiff::SignedDuration::from_mins(10));
    // And it settles: no further writes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = writes(&op);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        writes(&op),
        settled,
        "no renewal loop:\n{}",
        tail(&op.log(), 20)
    );
}
