//! Issue 21, points 1, 2 and parts of 5 and 6: no key of a marked Secret, no client credential and
//! no grant reachable through a MailIntegration, and the sign-in port's anonymous requests cost no
//! API reads past a small per-source budget.

use super::{WAIT, message, server};
use crate::support::{
    self,
    fault_proxy::FaultProxy,
    operator::Operator,
    world::{Env, assert_no_secrets_in_logs_or_events, condition, is_ready, tail},
};
use kube::api::{DeleteParams, Patch, PatchParams};
use mail_integration_operator::api::MailIntegration;
use mail_integration_operator::web::signin::{Signer, TICKET, Ticket, key};
use std::time::{Duration, Instant};

/// An HTTP client for the sign-in port: no redirects followed, no cookie jar (the tests carry the
/// cookie by hand).
pub(super) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub(super) fn ticket_of(mi: &MailIntegration) -> String {
    let url = &mi.status.as_ref().unwrap().sign_in.as_ref().unwrap().url;
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

/// The integration's status once the operator put a sign-in link on it.
pub(super) async fn with_sign_in_link(env: &Env, op: &Operator, name: &str) -> MailIntegration {
    env.wait_for(name, "a sign-in link", WAIT, op, |mi| {
        mi.status.as_ref().is_some_and(|s| s.sign_in.is_some())
    })
    .await
}

/// Alice signs in at the provider from `ticket`'s start page: the callback's query and the
/// state cookie it must carry.
pub(super) async fn alice_at_the_provider(op: &Operator, ticket: &str) -> (String, String) {
    let (status, location, cookie) =
        start(&op.sign_in_url(), ticket, Some(&op.sign_in_url())).await;
    assert_eq!(status, 303);
    let query = authorize(
        &location.unwrap(),
        "alice",
        "http://127.0.0.1:8080/oauth2/callback",
    )
    .await;
    (query, cookie.unwrap())
}

/// `POST /oauth2/start` with `ticket` and `origin`: status, Location, the cookie `name=value`.
pub(super) async fn start(
    op_url: &str,
    ticket: &str,
    origin: Option<&str>,
) -> (u16, Option<String>, Option<String>) {
    let mut req = http()
        .post(format!("{op_url}/oauth2/start"))
        .form(&[("ticket", ticket), ("prompt", "Consent")]);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    let r = req.send().await.unwrap();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let cookie = header("set-cookie").and_then(|c| c.split(';').next().map(str::to_owned));
    (r.status().as_u16(), header("location"), cookie)
}

/// Drive the OAuth server's login and consent forms from the authorization URL until it sends the
/// browser to `redirect`; the query of that redirect.
pub(super) async fn authorize(authorization_url: &str, login: &str, redirect: &str) -> String {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut next = (
        reqwest::Method::GET,
        url::Url::parse(authorization_url).unwrap(),
        Vec::<(String, String)>::new(),
    );
    for _ in 0..12 {
        let (method, url, form) = next;
        let mut req = client.request(method.clone(), url.clone());
        if method == reqwest::Method::POST {
            req = req.form(&form);
        }
        let resp = req.send().await.unwrap();
        if resp.status().is_redirection() {
            let location = resp.headers()["location"].to_str().unwrap().to_owned();
            let target = url.join(&location).unwrap();
            if target.as_str().starts_with(redirect) {
                return target.query().unwrap_or_default().to_owned();
            }
            next = (reqwest::Method::GET, target, Vec::new());
            continue;
        }
        let body = resp.text().await.unwrap();
        let action = url
            .join(&support::oauth::form_action(&body).expect("a form"))
            .unwrap();
        let form = if body.contains(r#"name="prompt" value="login""#) {
            vec![
                ("prompt".into(), "login".into()),
                ("login".into(), login.into()),
                ("password".into(), "any password".into()),
            ]
        } else {
            vec![("prompt".into(), "consent".into())]
        };
        next = (reqwest::Method::POST, action, form);
    }
    panic!("the sign-in did not reach {redirect}");
}

async fn signer(env: &Env) -> Signer {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(env.client.clone(), "default");
    let s = secrets.get(key::DEFAULT_KEY_SECRET).await.unwrap();
    Signer::new(key::key_from_secret(&s).unwrap()).unwrap()
}

/// Point 1: `clientIdKey` can name only the key the Secret's owner declares, never a key of secret
/// material: the client secret does not come back as a client ID in the sign-in redirect, status,
/// events or logs. A Secret whose owner declares its own key names works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_key_names_only_what_the_secret_declares() {
    let env = Env::new("idkey", server()).await;
    let op = env.operator("operator");
    let secret = env.server.client_secret().to_owned();
    env.client_secret(&secret).await;
    env.integration_with(
        "thief",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {"name": "client", "clientIdKey": "client_secret"}}}),
    )
    .await;
    let mi = env
        .wait_for("thief", "a decision", WAIT, &op, |mi| {
            mi.status.as_ref().is_some_and(|s| s.sign_in.is_some())
                || condition(mi, "Ready") == Some(("False", "ClientSecretKeyNotDeclared"))
        })
        .await;
    // On main a sign-in link appears: its start sends the browser off with the secret as the ID.
    if mi.status.as_ref().is_some_and(|s| s.sign_in.is_some()) {
        let (_, location, _) = start(&op.sign_in_url(), &ticket_of(&mi), None).await;
        assert!(
            !location.unwrap_or_default().contains(&secret),
            "the client secret came back as the client ID in the /oauth2/start redirect"
        );
    }
    let mi = env
        .wait_for("thief", "ClientSecretKeyNotDeclared", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "ClientSecretKeyNotDeclared"))
        })
        .await;
    let msg = message(&mi, "Ready");
    assert!(
        msg.contains(&format!(
            "kubectl annotate secret client -n {} mailintegration.dev/client-id-key=client_secret",
            env.ns
        )),
        "{msg}"
    );
    assert!(
        mi.status.as_ref().unwrap().sign_in.is_none(),
        "no sign-in link"
    );

    // Declaring it does not help: the client ID is never read from the secret's own key.
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/client-id-key": "client_secret"}}});
    env.secrets()
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mi = env
        .wait_for(
            "thief",
            "the client secret's key refused as ID",
            WAIT,
            &op,
            |mi| message(mi, "Ready").contains("it is the client secret's key"),
        )
        .await;
    assert_eq!(
        condition(&mi, "Ready"),
        Some(("False", "ClientSecretKeyNotDeclared"))
    );

    // An external-secrets style Secret with its own key names, declared by its owner, works.
    env.put_secret_with(
        "vault-client",
        &[("id", env.server.client_id()), ("secret", &secret)],
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
        serde_json::json!({
            "mailintegration.dev/oauth-servers": env.oauth_servers(),
            "mailintegration.dev/client-id-key": "id",
            "mailintegration.dev/client-secret-key": "secret",
        }),
    )
    .await;
    env.grant("declared", "alice").await;
    env.integration_with(
        "declared",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {"name": "vault-client", "clientIdKey": "id", "clientSecretKey": "secret"}}}),
    )
    .await;
    env.wait_for("declared", "Ready", WAIT, &op, is_ready).await;
    assert_eq!(env.proxy.requests("/auth"), 0);
    assert_no_secrets_in_logs_or_events(&env, &op, &[&secret]).await;
}

/// Point 1: an OIDC client's secret goes only to the servers its Secret lists. Without the
/// annotation the condition names the exact `kubectl annotate` that fixes it (run here); a
/// client-credentials spec that names another token endpoint sends nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oidc_client_secret_goes_only_to_servers_its_secret_lists() {
    let env = Env::new("servers", server()).await;
    let op = env.operator("operator");
    let secret = env.server.client_secret().to_owned();
    // An existing OIDC user's Secret, without the annotation.
    env.put_secret_labelled(
        "plain",
        &[
            ("client_id", env.server.client_id()),
            ("client_secret", &secret),
        ],
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
    )
    .await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {"name": "plain"}}}),
    )
    .await;
    let mi = env
        .wait_for("inbox", "OAuthServerNotAllowed", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "OAuthServerNotAllowed"))
        })
        .await;
    assert_eq!(env.proxy.token_requests(), 0, "nothing was sent");
    let msg = message(&mi, "Ready");
    let command = format!(
        "kubectl annotate secret plain -n {} mailintegration.dev/oauth-servers={}",
        env.ns,
        env.proxy.url()
    );
    assert!(msg.contains(&command), "{msg}");
    // The command from the message, as the Secret's owner runs it.
    let args: Vec<&str> = command.split(' ').skip(1).collect();
    env.cp.kubectl(&args);
    env.wait_for("inbox", "Ready after the annotation", WAIT, &op, is_ready)
        .await;

    // A client-credentials spec pointed at another server: the secret is not sent there.
    let evil = FaultProxy::start(&env.server.base_url);
    env.client_secret(&secret).await;
    env.integration_with(
        "app",
        "alice@example.test",
        serde_json::json!({"oauth": {
            "grantType": "ClientCredentials",
            "endpoints": {"authorization": format!("{}/auth", evil.url()), "token": evil.token_url()},
        }}),
    )
    .await;
    let mi = env
        .wait_for("app", "OAuthServerNotAllowed", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "OAuthServerNotAllowed"))
        })
        .await;
    assert!(
        message(&mi, "Ready").contains(evil.url()),
        "{:?}",
        mi.status
    );
    assert_eq!(
        evil.token_requests(),
        0,
        "the client secret went to another server"
    );
    assert_no_secrets_in_logs_or_events(&env, &op, &[&secret]).await;
}

/// Point 2: `revokeOnDelete` sends the grant only to the revocation endpoint recorded with it,
/// whatever `endpoints.revocation` says at deletion time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_on_delete_sends_the_grant_only_to_its_issuer() {
    let env = Env::new("revokebound", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let rt = env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"revokeOnDelete": true}),
    )
    .await;
    env.wait_for("inbox", "Ready", WAIT, &op, is_ready).await;
    // Whoever may edit the MailIntegration (and is listed as a server by a careless owner) moves
    // the revocation endpoint to their own server, then deletes the integration.
    let evil = FaultProxy::start(&env.server.base_url);
    let servers = format!("{},{}", env.oauth_servers(), evil.url());
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/oauth-servers": servers}}});
    env.secrets()
        .patch("client", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let patch = serde_json::json!({"spec": {"oauth": {"endpoints": {"revocation": format!("{}/token/revocation", evil.url())}}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.integrations()
        .delete("inbox", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while env.integrations().get_opt("inbox").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the integration was not deleted\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        evil.requests("/token/revocation"),
        0,
        "the refresh token was sent to the spec's revocation endpoint"
    );
    assert_eq!(
        env.proxy.requests("/token/revocation"),
        1,
        "revoked at the issuer's own endpoint"
    );
    assert!(
        !env.server.introspect(&rt).await,
        "the grant was revoked at its issuer"
    );
}

/// Point 2: the callback exchanges the code at the token endpoint `/oauth2/start` bound, not at
/// the one the spec names when the browser comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_is_exchanged_only_where_the_sign_in_started() {
    let env = Env::new("codebound", server()).await;
    let op = env.operator("operator");
    let evil = FaultProxy::start(&env.server.base_url);
    // The owner lists both servers: only the binding at start keeps the code from the second.
    env.put_secret_with(
        "client",
        &[
            ("client_id", env.server.client_id()),
            ("client_secret", env.server.client_secret()),
        ],
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
        serde_json::json!({"mailintegration.dev/oauth-servers": format!("{},{}", env.oauth_servers(), evil.url())}),
    )
    .await;
    env.integration("inbox", "alice@example.test").await;
    let mi = with_sign_in_link(&env, &op, "inbox").await;
    let (query, cookie) = alice_at_the_provider(&op, &ticket_of(&mi)).await;
    // Between the start and the callback, the spec's token endpoint moves.
    let patch = serde_json::json!({"spec": {"oauth": {"endpoints": {"token": evil.token_url()}}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = http()
        .get(format!("{}/oauth2/callback?{query}", op.sign_in_url()))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert_eq!(
        evil.token_requests(),
        0,
        "the code, PKCE verifier and client secret went to the spec's new token endpoint"
    );
    assert!(body.contains("GrantBoundElsewhere"), "{body}");
    assert!(
        env.secrets()
            .get_opt("inbox-oauth-grant")
            .await
            .unwrap()
            .is_none()
    );
}

/// Point 5: sign-in requests are limited per source before any API call, and a ticket's
/// signature and expiry are checked before any API read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_sign_in_requests_cost_no_api_reads_past_a_small_budget() {
    let env = Env::new("signinlimit", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.integration("inbox", "alice@example.test").await;
    let mi = with_sign_in_link(&env, &op, "inbox").await;
    // A genuine ticket that expired (signed with the operator's own key).
    let expired = signer(&env).await.sign(
        TICKET,
        &Ticket {
            ns: env.ns.clone(),
            name: "inbox".into(),
            uid: mi.metadata.uid.clone().unwrap(),
            exp: jiff::Timestamp::now().as_second() - 60,
            iat: 0,
        },
    );
    let reads_before = op.api_requests().len();
    let url = format!("{}/sign-in?ticket={expired}", op.sign_in_url());
    let client = http();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        statuses.push(client.get(&url).send().await.unwrap().status().as_u16());
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        (60..=75).contains(&limited),
        "100 requests from one source: {limited} answered 429 (30 allowed at once): {statuses:?}"
    );
    assert!(statuses.iter().take(30).all(|s| *s == 410), "{statuses:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // What the sign-in server would read for a ticket: the MailIntegration by name (the
    // reconciler decides on its watch cache).
    let reads: Vec<_> = op
        .api_requests()
        .into_iter()
        .skip(reads_before)
        .filter(|r| r.verb == "get" && r.resource == "mailintegrations")
        .collect();
    let sign_in_reads = reads.len();
    assert_eq!(
        sign_in_reads, 0,
        "expired tickets made API reads: {reads:?}"
    );
}

/// Point 6: `Origin: null` is refused at `/oauth2/start`, and a sign-in link stops working once a
/// sign-in with it succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_link_is_one_time_and_origin_null_is_refused() {
    let env = Env::new("onetime", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.integration("inbox", "alice@example.test").await;
    let mi = with_sign_in_link(&env, &op, "inbox").await;
    let ticket = ticket_of(&mi);
    let (status, location, _) = start(&op.sign_in_url(), &ticket, Some("null")).await;
    assert_eq!(status, 403, "Origin: null was accepted: {location:?}");
    assert!(env.proxy.requests("/auth") == 0);

    // The sign-in page sends its form with the operator's origin.
    let page = http()
        .get(format!("{}/sign-in?ticket={ticket}", op.sign_in_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["referrer-policy"], "same-origin");

    let (query, cookie) = alice_at_the_provider(&op, &ticket).await;
    let r = http()
        .get(format!("{}/oauth2/callback?{query}", op.sign_in_url()))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    env.wait_for("inbox", "Ready", WAIT, &op, is_ready).await;

    // The same link again: refused before anything is sent to the provider.
    let auth_before = env.proxy.requests("/auth");
    let again = http()
        .get(format!("{}/sign-in?ticket={ticket}", op.sign_in_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 410);
    assert!(again.text().await.unwrap().contains("used already"));
    let (status, _, _) = start(&op.sign_in_url(), &ticket, Some(&op.sign_in_url())).await;
    assert_eq!(status, 410, "the link started a second sign-in");
    assert_eq!(env.proxy.requests("/auth"), auth_before);
}
