//! The OAuth fixtures against the real oidc-provider: grants obtained through its login and consent
//! forms, refresh-token rotation and reuse detection, introspection, revocation, client
//! authentication, and every fault of the fault proxy.
//!
//! Needs `npm ci --prefix tests/oauth-server` once.

mod support;

use std::time::Duration;
use support::{
    fault_proxy::{Fault, FaultProxy},
    oauth::{
        self, AuthorizationRequest, OAuthServer, OAuthServerConfig, TokenResponse, post_form,
        post_form_with_timeout,
    },
};

/// The server log must never hold a token, code or secret value.
fn assert_log_clean(server: &OAuthServer, values: &[&str]) {
    let log = server.log();
    for (i, v) in values.iter().enumerate() {
        assert!(v.len() >= 16, "value {i} is too short to search for");
        assert!(
            !log.contains(v),
            "value {i} (a token, code or secret) appears in the OAuth server log"
        );
    }
}

fn assert_error(resp: &TokenResponse, status: u16, error: &str) {
    assert_eq!(resp.status, status, "status of {resp:?}");
    assert_eq!(resp.error(), Some(error), "error of {resp:?}");
}

#[tokio::test]
async fn grant_through_login_and_consent_forms() {
    let server = oauth::shared();
    // How long it took to start is the harness's business (it gives up with the server's log);
    // a bound here below the harness's own would only add a flake.
    assert!(server.startup_time > Duration::ZERO);

    let grant = server.obtain_grant("alice").await;
    assert_eq!(grant.token_type, "Bearer");
    assert_eq!(grant.expires_in, 60, "the configured access-token TTL");
    let scopes: Vec<&str> = grant.scope.split(' ').collect();
    for s in ["openid", "email", "offline_access", "mail"] {
        assert!(
            scopes.contains(&s),
            "scope {s} missing from {:?}",
            grant.scope
        );
    }
    let refresh_token = grant.refresh_token().to_owned();
    assert!(refresh_token != grant.access_token);
    assert!(grant.id_token.is_some(), "openid scope gives an ID token");

    let info = server.introspection(&grant.access_token).await;
    assert_eq!(info["active"], true, "fresh access token: {info}");
    assert_eq!(info["sub"], "alice");
    assert_eq!(info["email"], "alice@example.test");
    assert_eq!(info["client_id"], server.client_id());
    assert_eq!(info["iss"], server.issuer());

    // The ID token carries the email (like Google's), so the operator can check the account.
    let id_token = grant.id_token.as_deref().unwrap();
    let payload = id_token.split('.').nth(1).expect("ID token is a JWT");
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.test");
    assert_eq!(claims["iss"], server.issuer());
    assert_eq!(claims["aud"], server.client_id());

    // The userinfo endpoint answers the access token with the account's email.
    let userinfo: serde_json::Value = reqwest::Client::new()
        .get(server.userinfo_url())
        .bearer_auth(&grant.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(userinfo["email"], "alice@example.test", "{userinfo}");

    let log = server.log();
    assert!(
        log.contains("token status=200 client=mio-test-client grant_type=authorization_code result=ok refresh_token_issued=true"),
        "the code exchange is logged:\n{}",
        server.log_tail(20)
    );
    assert_log_clean(
        server,
        &[
            &grant.access_token,
            &refresh_token,
            id_token,
            server.client_secret(),
        ],
    );
}

#[tokio::test]
async fn without_prompt_consent_offline_access_is_dropped() {
    let server = oauth::shared();
    let mut req = AuthorizationRequest::new("bob");
    req.prompt = None;
    let grant = server.obtain_grant_with(&req).await;
    assert!(grant.refresh_token.is_none(), "no refresh token: {grant:?}");
    assert!(
        !grant.scope.split(' ').any(|s| s == "offline_access"),
        "offline_access dropped: {grant:?}"
    );
}

#[tokio::test]
async fn authorization_code_is_single_use_and_never_logged() {
    let server = oauth::shared();
    let req = AuthorizationRequest::new("alice");
    let callback = server.authorize(&req).await;
    assert_eq!(callback.iss.as_deref(), Some(server.issuer()));
    let code = callback.code.clone().expect("a code");
    let grant = server
        .exchange_code(&req, &code, &callback.code_verifier)
        .await
        .into_grant();
    assert!(server.introspect(&grant.access_token).await);

    // Replaying the code fails and kills what it gave out.
    let replay = server
        .exchange_code(&req, &code, &callback.code_verifier)
        .await;
    assert_error(&replay, 400, "invalid_grant");
    assert!(!server.introspect(&grant.access_token).await);
    assert_error(
        &server.refresh(grant.refresh_token()).await,
        400,
        "invalid_grant",
    );

    // A wrong PKCE verifier is refused.
    let callback = server.authorize(&req).await;
    let wrong = server
        .exchange_code(
            &req,
            callback.code.as_deref().unwrap(),
            "x".repeat(43).as_str(),
        )
        .await;
    assert_error(&wrong, 400, "invalid_grant");

    assert_log_clean(server, &[&code, callback.code.as_deref().unwrap()]);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_kills_the_grant() {
    let server = oauth::shared();
    let grant = server.obtain_grant("alice").await;
    let mut seen = vec![grant.refresh_token().to_owned()];
    let mut access_tokens = vec![grant.access_token.clone()];

    for round in 1..=3 {
        let current = seen.last().unwrap().clone();
        let refreshed = server.refresh(&current).await.into_grant();
        let new_rt = refreshed
            .refresh_token
            .clone()
            .unwrap_or_else(|| panic!("round {round}: rotation returns a refresh token"));
        assert!(
            !seen.contains(&new_rt),
            "round {round}: a new refresh token"
        );
        assert!(
            !access_tokens.contains(&refreshed.access_token),
            "round {round}: a new access token"
        );
        assert_eq!(refreshed.expires_in, 60);
        assert!(
            server.introspect(&new_rt).await,
            "round {round}: new one active"
        );
        assert!(
            !server.introspect(&current).await,
            "round {round}: the rotated one is no longer active"
        );
        assert!(server.introspect(&refreshed.access_token).await);
        seen.push(new_rt);
        access_tokens.push(refreshed.access_token);
    }
    let newest = seen.last().unwrap().clone();
    assert!(server.introspect(&newest).await, "the newest still works");

    // Reusing an old refresh token is refused, and (RFC 9700 §4.14.2, as oidc-provider does it)
    // revokes the whole grant: the newest refresh token and the access tokens die with it.
    assert_error(&server.refresh(&seen[1]).await, 400, "invalid_grant");
    assert!(!server.introspect(&newest).await, "grant revoked on reuse");
    assert!(!server.introspect(access_tokens.last().unwrap()).await);
    let after = server.refresh(&newest).await;
    assert_error(&after, 400, "invalid_grant");

    let log = server.log();
    assert!(
        log.contains("grant_type=refresh_token result=ok refresh_token_issued=true expires_in=60"),
        "refreshes are logged:\n{}",
        server.log_tail(20)
    );
    assert!(log.contains("grant_type=refresh_token result=invalid_grant"));
    let mut secrets: Vec<&str> = seen.iter().map(String::as_str).collect();
    secrets.extend(access_tokens.iter().map(String::as_str));
    assert_log_clean(server, &secrets);
}

#[tokio::test]
async fn introspection_and_revocation() {
    let server = oauth::shared();
    let grant = server.obtain_grant("bob").await;
    let rt = grant.refresh_token().to_owned();
    assert!(server.introspect(&grant.access_token).await);

    // Revoking the refresh token revokes the whole grant.
    let refreshed = server.refresh(&rt).await.into_grant();
    assert!(server.introspect(&refreshed.access_token).await);
    let rt = refreshed.refresh_token().to_owned();
    server.revoke(&rt).await;
    assert!(!server.introspect(&refreshed.access_token).await);
    assert!(!server.introspect(&rt).await);
    assert_error(&server.refresh(&rt).await, 400, "invalid_grant");

    // Revoking an access token revokes every token of its grant too (as Google does): the refresh
    // token is dead as well.
    let grant = server.obtain_grant("bob").await;
    server.revoke(&grant.access_token).await;
    assert!(!server.introspect(&grant.access_token).await);
    assert!(!server.introspect(grant.refresh_token()).await);
    assert_error(
        &server.refresh(grant.refresh_token()).await,
        400,
        "invalid_grant",
    );

    // RFC 7009: unknown tokens are fine too; RFC 7662: unknown tokens are inactive.
    server.revoke("not-a-token-at-all-0123456789").await;
    assert!(!server.introspect("not-a-token-at-all-0123456789").await);
}

#[tokio::test]
async fn wrong_client_credentials_are_invalid_client() {
    let server = oauth::shared();
    let grant = server.obtain_grant("alice").await;
    let wrong_secret = post_form(
        &server.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", grant.refresh_token()),
            ("client_id", server.client_id()),
            ("client_secret", "wrong-secret-0123456789abcdef"),
        ],
    )
    .await;
    assert_error(&wrong_secret, 401, "invalid_client");

    let unknown_client = post_form(
        &server.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", grant.refresh_token()),
            ("client_id", "no-such-client"),
            ("client_secret", "whatever-0123456789abcdef"),
        ],
    )
    .await;
    assert_error(&unknown_client, 401, "invalid_client");

    // The introspection client can introspect but not use the token endpoint for this grant.
    let (id, secret) = server.introspection_client();
    let as_introspector = post_form(
        &server.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", grant.refresh_token()),
            ("client_id", id),
            ("client_secret", secret),
        ],
    )
    .await;
    assert!(
        as_introspector.status >= 400,
        "the introspection client cannot refresh: {as_introspector:?}"
    );

    // The refresh token survived the failed attempts.
    let ok = server.refresh(grant.refresh_token()).await.into_grant();
    assert!(server.introspect(&ok.access_token).await);
    assert!(server.log().contains("result=invalid_client"));
}

#[tokio::test]
async fn short_access_tokens_expire_and_rotation_can_be_off() {
    let server = OAuthServer::start(OAuthServerConfig {
        access_token_ttl: Duration::from_secs(2),
        rotate_refresh_token: false,
        ..Default::default()
    });
    let grant = server.obtain_grant("alice").await;
    assert_eq!(grant.expires_in, 2);
    assert!(server.introspect(&grant.access_token).await);

    let rt = grant.refresh_token().to_owned();
    for _ in 0..2 {
        let refreshed = server.refresh(&rt).await.into_grant();
        assert!(
            refreshed.refresh_token.as_deref() == Some(rt.as_str()),
            "without rotation the same refresh token comes back"
        );
        assert!(
            refreshed.access_token != grant.access_token,
            "a new access token"
        );
    }
    assert!(server.introspect(&rt).await, "the same refresh token stays");

    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(
        !server.introspect(&grant.access_token).await,
        "a 2 s access token is inactive after 3 s"
    );
    assert!(server.introspect(&rt).await);
}

/// oidc-provider runs on a Node.js it supports (22 or later), and says nothing against its runtime.
#[tokio::test]
async fn the_server_runs_on_a_runtime_oidc_provider_supports() {
    let server = oauth::shared();
    let node = oauth::node_binary(&oauth::server_dir());
    let version =
        oauth::node_version(&node).unwrap_or_else(|e| panic!("{} --version: {e}", node.display()));
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("{} --version printed {version:?}", node.display()));
    assert!(
        major >= 22,
        "{} is Node.js {version}; oidc-provider 9 supports 22 and later",
        node.display()
    );
    let log = server.log();
    assert!(
        !log.contains("Unsupported runtime"),
        "oidc-provider warns about its runtime:\n{log}"
    );
    assert!(log.contains("oauth-server listening on"), "{log}");
}

#[test]
fn missing_node_modules_names_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let panic = std::panic::catch_unwind(|| oauth::require_node_modules(empty.path()))
        .expect_err("an empty project directory is refused");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("run npm ci --prefix tests/oauth-server"),
        "message: {msg}"
    );
    oauth::require_node_modules(&oauth::server_dir());
}

/// A grant whose refresh token is still unused, and a proxy in front of the shared server.
async fn proxied_grant() -> (&'static OAuthServer, FaultProxy, String) {
    let server = oauth::shared();
    let proxy = FaultProxy::start(&server.base_url);
    let grant = server.obtain_grant("alice").await;
    (server, proxy, grant.refresh_token().to_owned())
}

#[tokio::test]
async fn proxy_forwards_discovery_and_tokens() {
    let (server, proxy, rt) = proxied_grant().await;
    let doc: serde_json::Value =
        reqwest::get(format!("{}/.well-known/openid-configuration", proxy.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(doc["issuer"], server.issuer(), "issuer stays the server's");
    assert_eq!(doc["token_endpoint"], proxy.token_url());
    assert_eq!(
        doc["revocation_endpoint"],
        format!("{}/token/revocation", proxy.url())
    );
    assert_eq!(
        doc["introspection_endpoint"],
        format!("{}/token/introspection", proxy.url())
    );

    let refreshed = server
        .refresh_at(&proxy.token_url(), &rt)
        .await
        .into_grant();
    assert!(server.introspect(&refreshed.access_token).await);
    assert_eq!(proxy.token_requests(), 1);
    assert_eq!(proxy.requests("/.well-known/openid-configuration"), 1);
    assert_eq!(proxy.faulted_requests(), 0);
    // Errors of the real server pass through unchanged.
    assert_error(
        &server.refresh_at(&proxy.token_url(), &rt).await,
        400,
        "invalid_grant",
    );
    assert_eq!(proxy.token_requests(), 2);
}

#[tokio::test]
async fn proxy_faults_answer_what_they_should() {
    let (server, proxy, rt) = proxied_grant().await;
    let url = proxy.token_url();

    let cases: Vec<(Fault, u16, Option<&str>)> = vec![
        (Fault::InternalServerError, 500, Some("server_error")),
        (Fault::ServiceUnavailable, 503, None),
        (Fault::GoogleGrantRevoked, 400, Some("invalid_grant")),
        (Fault::GoogleInvalidRapt, 400, Some("invalid_grant")),
        (Fault::GoogleInvalidClient, 401, Some("invalid_client")),
        (
            Fault::GoogleUnauthorizedClient,
            400,
            Some("unauthorized_client"),
        ),
        (
            Fault::MicrosoftGrantExpiredInactive,
            400,
            Some("invalid_grant"),
        ),
    ];
    let n = cases.len() as u64;
    for (i, (fault, status, error)) in cases.into_iter().enumerate() {
        proxy.set_fault(fault.clone());
        let resp = server.refresh_at(&url, &rt).await;
        assert_eq!(resp.status, status, "{fault:?}: {resp:?}");
        assert_eq!(resp.error(), error, "{fault:?}: {resp:?}");
        assert_eq!(proxy.token_requests(), i as u64 + 1);
        match fault {
            Fault::GoogleGrantRevoked => {
                assert_eq!(
                    resp.error_description(),
                    Some("Token has been expired or revoked.")
                )
            }
            Fault::GoogleInvalidRapt => assert_eq!(resp.json["error_subtype"], "invalid_rapt"),
            Fault::GoogleInvalidClient => {
                assert_eq!(
                    resp.error_description(),
                    Some("The OAuth client was not found.")
                )
            }
            Fault::MicrosoftGrantExpiredInactive => {
                let d = resp.error_description().unwrap();
                assert!(d.starts_with("AADSTS700082: "), "{d}");
                assert_eq!(resp.json["error_codes"][0], 700082);
            }
            Fault::ServiceUnavailable => {
                assert!(
                    resp.content_type
                        .as_deref()
                        .unwrap()
                        .starts_with("text/html")
                )
            }
            _ => {}
        }
    }

    proxy.set_fault(Fault::RateLimited {
        retry_after_secs: 7,
    });
    let resp = server.refresh_at(&url, &rt).await;
    assert_eq!(resp.status, 429, "{resp:?}");
    assert_eq!(resp.retry_after.as_deref(), Some("7"));

    proxy.set_fault(Fault::GoogleHtmlForbidden);
    let resp = server.refresh_at(&url, &rt).await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(
        resp.content_type
            .as_deref()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(resp.text.contains("That\u{2019}s an error."), "{resp:?}");
    assert!(resp.json.is_null(), "not JSON");

    proxy.set_fault(Fault::MalformedJson);
    let resp = server.refresh_at(&url, &rt).await;
    assert_eq!(resp.status, 200);
    assert!(resp.json.is_null(), "the body does not parse");

    assert_eq!(proxy.token_requests(), n + 3);
    assert_eq!(proxy.faulted_requests(), n + 3);

    // Nothing reached the server: the (rotating) refresh token is still unused and works now.
    proxy.clear_fault();
    let ok = server.refresh_at(&url, &rt).await.into_grant();
    assert!(server.introspect(&ok.access_token).await);
    assert_eq!(proxy.token_requests(), n + 4);
    assert_eq!(proxy.faulted_requests(), n + 3);
}

#[tokio::test]
async fn proxy_fault_for_n_requests_then_forwards() {
    let (server, proxy, rt) = proxied_grant().await;
    proxy.set_fault_times(Fault::ServiceUnavailable, 2);
    assert_eq!(server.refresh_at(&proxy.token_url(), &rt).await.status, 503);
    assert_eq!(server.refresh_at(&proxy.token_url(), &rt).await.status, 503);
    assert_eq!(proxy.fault(), None, "used up");
    let ok = server
        .refresh_at(&proxy.token_url(), &rt)
        .await
        .into_grant();
    assert!(ok.refresh_token.is_some());
    assert_eq!((proxy.token_requests(), proxy.faulted_requests()), (3, 2));

    // Only the token endpoint is faulted.
    proxy.set_fault(Fault::InternalServerError);
    let doc = reqwest::get(format!("{}/.well-known/openid-configuration", proxy.url()))
        .await
        .unwrap();
    assert_eq!(doc.status(), 200);
    proxy.reset_counts();
    assert_eq!(proxy.token_requests(), 0);
}

#[tokio::test]
async fn proxy_slow_answers_arrive_late_or_time_out() {
    let (server, proxy, rt) = proxied_grant().await;
    proxy.set_fault(Fault::Slow(Duration::from_millis(1500)));

    // A client that gives up after 300 ms sees a timeout. (The proxy may still forward that request
    // and consume the refresh token, so the patient client below uses another grant.)
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
        ("client_id", server.client_id()),
        ("client_secret", server.client_secret()),
    ];
    let err = post_form_with_timeout(&proxy.token_url(), &form, Duration::from_millis(300))
        .await
        .expect_err("times out");
    assert!(err.is_timeout(), "{err}");

    let grant = server.obtain_grant("alice").await;
    let resp = server
        .refresh_at(&proxy.token_url(), grant.refresh_token())
        .await;
    assert!(
        resp.elapsed >= Duration::from_millis(1500),
        "slow: {:?}",
        resp.elapsed
    );
    let refreshed = resp.into_grant();
    assert!(server.introspect(&refreshed.access_token).await);
    assert_eq!(proxy.token_requests(), 2);
}

#[test]
fn proxy_outlives_the_runtime_that_started_it() {
    let server = oauth::shared();
    let proxy = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async { FaultProxy::start(&server.base_url) })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let resp = reqwest::get(format!("{}/.well-known/openid-configuration", proxy.url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    });
    assert_eq!(proxy.requests("/.well-known/openid-configuration"), 1);
}

#[tokio::test]
async fn server_behind_proxy_under_the_proxys_issuer() {
    let proxy = FaultProxy::start("");
    let server = OAuthServer::start(OAuthServerConfig {
        issuer: Some(proxy.url().to_owned()),
        ..Default::default()
    });
    proxy.set_upstream(&server.base_url);
    let doc: serde_json::Value =
        reqwest::get(format!("{}/.well-known/openid-configuration", proxy.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(doc["issuer"], proxy.url());
    assert_eq!(doc["token_endpoint"], proxy.token_url());

    let grant = server.obtain_grant("bob").await; // checks the callback's iss is the proxy's
    let info = server.introspection(&grant.access_token).await;
    assert_eq!(info["iss"], proxy.url());
    proxy.set_fault(Fault::GoogleGrantRevoked);
    assert_error(
        &server
            .refresh_at(&proxy.token_url(), grant.refresh_token())
            .await,
        400,
        "invalid_grant",
    );
}
