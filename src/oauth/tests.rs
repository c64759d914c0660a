use super::*;
use axum::{
    Form, Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

const CLIENT_ID: &str = "client-123.apps.example.com";
const CLIENT_SECRET: &str = "CLIENT-SECRET-shh-0001";
const ACCESS_GOOD: &str = "ACCESS-TOKEN-good-0002";
const ACCESS_NEW: &str = "ACCESS-TOKEN-new-0003";
const REFRESH_ROTATED: &str = "REFRESH-TOKEN-rotated-0004";
const REFRESH_FROM_CODE: &str = "REFRESH-TOKEN-fromcode-0005";
const CODE_GOOD: &str = "AUTH-CODE-good-0006";
const VERIFIER: &str = "PKCE-VERIFIER-0007-abcdefghijklmnopqrstuvwxyz0123";

/// Every credential the tests hand out or send: none may appear in any formatted output.
const SECRETS: &[&str] = &[
    CLIENT_SECRET,
    ACCESS_GOOD,
    ACCESS_NEW,
    REFRESH_ROTATED,
    REFRESH_FROM_CODE,
    CODE_GOOD,
    VERIFIER,
    "REFRESH-TOKEN-",
    "ID-TOKEN-SIG",
];

fn jwt(claims: serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.ID-TOKEN-SIG",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

type Recorded = (HashMap<String, String>, HeaderMap);

#[derive(Clone, Default)]
struct Recorder {
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request was made")
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

async fn token(
    State(rec): State<Recorder>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    rec.requests.lock().unwrap().push((form.clone(), headers));
    if form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "client authentication failed"}),
        );
    }
    if form.get("grant_type").map(String::as_str) == Some("authorization_code") {
        let ok = form.get("code").map(String::as_str) == Some(CODE_GOOD)
            && form.get("code_verifier").map(String::as_str) == Some(VERIFIER)
            && form.get("redirect_uri").map(String::as_str)
                == Some("https://op.example.com/oauth2/callback");
        if !ok {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": "Bad Request"}),
            );
        }
        return json_response(
            StatusCode::OK,
            json!({
                "access_token": ACCESS_GOOD, "token_type": "Bearer", "expires_in": 3599,
                "refresh_token": REFRESH_FROM_CODE, "scope": "https://mail.google.com/ openid https://www.googleapis.com/auth/userinfo.email",
                "id_token": jwt(json!({"iss": "https://accounts.google.com", "sub": "1234", "email": "support@example.com", "email_verified": true})),
            }),
        );
    }
    let rt = form.get("refresh_token").cloned().unwrap_or_default();
    let name = rt.trim_start_matches("REFRESH-TOKEN-");
    match name {
        "good" => json_response(
            StatusCode::OK,
            json!({"access_token": ACCESS_NEW, "token_type": "Bearer", "expires_in": 3599, "scope": "https://mail.google.com/"}),
        ),
        "rotate" => json_response(
            StatusCode::OK,
            json!({"access_token": ACCESS_NEW, "token_type": "bearer", "expires_in": 300, "refresh_token": REFRESH_ROTATED, "scope": "openid email offline_access"}),
        ),
        "noexp" => json_response(StatusCode::OK, json!({"access_token": ACCESS_NEW, "token_type": "Bearer", "refresh_token_expires_in": 604799})),
        "revoked" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        ),
        "rapt" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "reauth related error (invalid_rapt)", "error_uri": "https://support.google.com/a/answer/9368756", "error_subtype": "invalid_rapt"}),
        ),
        "ms-inactive" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "AADSTS700082: The refresh token has expired due to inactivity.\r\nTrace ID: 0\r\n", "error_codes": [700082]}),
        ),
        "429" => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "42")],
            Json(json!({"error": "rate_limit_exceeded"})),
        )
            .into_response(),
        "429-date" => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "Wed, 01 Jan 2025 00:02:00 GMT")],
            "slow down",
        )
            .into_response(),
        "403-html" => (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/html; charset=UTF-8")],
            "<!DOCTYPE html><html><body>We're sorry... but your computer or network may be sending automated queries.</body></html>",
        )
            .into_response(),
        "500" => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/html")], "<html>oops</html>").into_response(),
        "503-json" => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(json!({"error": "temporarily_unavailable"})),
        )
            .into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            json_response(StatusCode::OK, json!({"access_token": ACCESS_NEW, "token_type": "Bearer"}))
        }
        "no-access-token" => json_response(StatusCode::OK, json!({"token_type": "Bearer", "expires_in": 3600, "refresh_token": REFRESH_ROTATED})),
        "wrong-type" => json_response(StatusCode::OK, json!({"access_token": ACCESS_NEW, "token_type": "Bearer", "expires_in": ACCESS_GOOD})),
        "error-200" => json_response(StatusCode::OK, json!({"error": "invalid_grant", "error_description": "Bad Request"})),
        "echo" => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": format!("refresh token {rt} is not valid for client secret {CLIENT_SECRET}")}),
        ),
        _ => json_response(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant", "error_description": "Bad Request"})),
    }
}

async fn revoke(
    State(rec): State<Recorder>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    rec.requests.lock().unwrap().push((form.clone(), headers));
    match form.get("token").map(String::as_str) {
        Some(ACCESS_GOOD) | Some(REFRESH_ROTATED) => StatusCode::OK.into_response(),
        Some(ACCESS_NEW) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "7")],
            "",
        )
            .into_response(),
        _ => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_token", "error_description": "Token expired or revoked"}),
        ),
    }
}

async fn userinfo(headers: HeaderMap) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth == Some(&format!("Bearer {ACCESS_GOOD}")) {
        return json_response(
            StatusCode::OK,
            json!({"sub": "1234", "email": "support@example.com"}),
        );
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, r#"Bearer realm="x", error="invalid_token", error_description="The access token is invalid""#)],
        "",
    )
        .into_response()
}

async fn start() -> (ProviderEndpoints, Recorder) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let rec = Recorder::default();
    let app = Router::new()
        .route("/token", post(token))
        .route("/revoke", post(revoke))
        .route("/userinfo", get(userinfo))
        .with_state(rec.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = |p: &str| Url::parse(&format!("{base}{p}")).unwrap();
    let endpoints = ProviderEndpoints {
        kind: ProviderKind::Google,
        authorization: url("/auth"),
        token: url("/token"),
        revocation: Some(url("/revoke")),
        userinfo: Some(url("/userinfo")),
        issuer: None,
        discovered: None,
    };
    (endpoints, rec)
}

fn creds() -> ClientCredentials {
    ClientCredentials {
        signing_key: None,
        client_id: CLIENT_ID.into(),
        client_secret: SecretValue::new(CLIENT_SECRET),

        owner: Default::default(),
    }
}

fn rt(name: &str) -> SecretValue {
    SecretValue::new(format!("REFRESH-TOKEN-{name}"))
}

fn now() -> Timestamp {
    "2025-01-01T00:00:00Z".parse().unwrap()
}

fn client() -> OAuthClient {
    OAuthClient::with_timeouts(Duration::from_secs(2), Duration::from_millis(500)).unwrap()
}

async fn refresh_err(endpoints: &ProviderEndpoints, name: &str) -> TokenError {
    client()
        .refresh(
            &crate::oauth::Bound::unchecked(
                endpoints,
                &creds(),
                crate::provider::TokenOperation::Refresh,
            ),
            &rt(name),
            &[],
            now(),
        )
        .await
        .expect_err(name)
}

fn assert_no_secrets(text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{s:?} leaked into: {text}");
    }
}

// ----- refresh ----------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_success_without_rotation_uses_client_secret_post_and_no_scope() {
    let (endpoints, rec) = start().await;
    let grant = client()
        .refresh(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Refresh,
            ),
            &rt("good"),
            &[],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(grant.access_token.expose(), ACCESS_NEW);
    assert_eq!(grant.token_type, "Bearer");
    assert_eq!(grant.expires_at, now() + SignedDuration::from_secs(3599));
    assert_eq!(grant.refresh_token, None, "Google does not rotate");
    assert_eq!(
        grant.scopes,
        Some(vec!["https://mail.google.com/".to_owned()])
    );
    assert_eq!(grant.id_token, None);

    let (form, headers) = rec.last();
    assert_eq!(form.get("grant_type").unwrap(), "refresh_token");
    assert_eq!(form.get("refresh_token").unwrap(), "REFRESH-TOKEN-good");
    assert_eq!(form.get("client_id").unwrap(), CLIENT_ID);
    assert_eq!(form.get("client_secret").unwrap(), CLIENT_SECRET);
    assert!(
        !form.contains_key("scope"),
        "refresh must not send scopes unless asked"
    );
    assert!(
        headers.get(header::AUTHORIZATION).is_none(),
        "client_secret_post, not basic"
    );
}

#[tokio::test]
async fn refresh_success_with_rotation_and_requested_scopes() {
    let (endpoints, rec) = start().await;
    let scopes = vec![
        "https://outlook.office.com/IMAP.AccessAsUser.All".to_owned(),
        "offline_access".to_owned(),
    ];
    let grant = client()
        .refresh(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Refresh,
            ),
            &rt("rotate"),
            &scopes,
            now(),
        )
        .await
        .unwrap();
    assert_eq!(
        grant.refresh_token.as_ref().unwrap().expose(),
        REFRESH_ROTATED
    );
    assert_eq!(grant.token_type, "Bearer", "token_type is case-insensitive");
    assert_eq!(grant.expires_at, now() + SignedDuration::from_secs(300));
    assert_eq!(
        grant.scopes.unwrap(),
        vec![
            "openid".to_owned(),
            "email".to_owned(),
            "offline_access".to_owned()
        ]
    );
    let (form, _) = rec.last();
    assert_eq!(
        form.get("scope").unwrap(),
        "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    );
}

#[tokio::test]
async fn missing_expires_in_assumes_an_hour() {
    let (endpoints, _) = start().await;
    let grant = client()
        .refresh(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Refresh,
            ),
            &rt("noexp"),
            &[],
            now(),
        )
        .await
        .unwrap();
    assert_eq!(grant.expires_at, now() + SignedDuration::from_secs(3600));
    assert_eq!(
        grant.refresh_token_expires_at,
        Some(now() + SignedDuration::from_secs(604799))
    );
}

#[tokio::test]
async fn refresh_error_bodies_are_classified() {
    let (endpoints, _) = start().await;
    let cases: &[(&str, ProviderKind, Reason, bool)] = &[
        ("revoked", ProviderKind::Google, Reason::GrantRevoked, true),
        ("rapt", ProviderKind::Google, Reason::ReauthRequired, true),
        ("bad", ProviderKind::Google, Reason::GrantRevoked, true),
        (
            "ms-inactive",
            ProviderKind::Microsoft,
            Reason::GrantExpiredInactive,
            true,
        ),
        ("error-200", ProviderKind::Oidc, Reason::GrantRevoked, true),
        (
            "no-access-token",
            ProviderKind::Oidc,
            Reason::ProviderError,
            false,
        ),
        (
            "wrong-type",
            ProviderKind::Oidc,
            Reason::ProviderError,
            false,
        ),
    ];
    for (name, kind, reason, permanent) in cases {
        let endpoints = ProviderEndpoints {
            kind: *kind,
            ..endpoints.clone()
        };
        let err = refresh_err(&endpoints, name).await;
        assert_eq!(err.reason(), *reason, "{name}: {err}");
        assert_eq!(err.is_permanent(), *permanent, "{name}: {err}");
        assert_eq!(err.provider, *kind);
        assert_eq!(err.operation, TokenOperation::Refresh);
        assert_no_secrets(&format!("{err} {err:?}"));
    }
}

#[tokio::test]
async fn wrong_client_secret_is_invalid_client() {
    let (endpoints, _) = start().await;
    let wrong = ClientCredentials {
        signing_key: None,
        client_id: CLIENT_ID.into(),
        client_secret: SecretValue::new("WRONG-SECRET-0008"),

        owner: Default::default(),
    };
    let err = client()
        .refresh(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &wrong,
                crate::provider::TokenOperation::Refresh,
            ),
            &rt("good"),
            &[],
            now(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::InvalidClient);
    assert!(err.is_permanent());
    assert!(!format!("{err:?}").contains("WRONG-SECRET-0008"));
}

#[tokio::test]
async fn rate_limits_honour_retry_after() {
    let (endpoints, _) = start().await;
    let err = refresh_err(&endpoints, "429").await;
    assert_eq!(err.reason(), Reason::RateLimited);
    assert!(!err.is_permanent());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(42)));
    assert!(err.to_string().contains("retrying after 42s"), "{err}");

    // HTTP-date form, relative to `now` (2025-01-01T00:00:00Z).
    let err = refresh_err(&endpoints, "429-date").await;
    assert_eq!(err.reason(), Reason::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
}

#[tokio::test]
async fn google_html_403_is_rate_limiting_and_5xx_unavailable() {
    let (endpoints, _) = start().await;
    let err = refresh_err(&endpoints, "403-html").await;
    assert_eq!(err.reason(), Reason::RateLimited);
    assert!(!err.is_permanent());
    assert!(
        !err.to_string().contains("automated queries"),
        "the page itself is not copied"
    );

    let err = refresh_err(&endpoints, "500").await;
    assert_eq!(err.reason(), Reason::ProviderUnavailable);
    assert!(!err.is_permanent());

    let err = refresh_err(&endpoints, "503-json").await;
    assert_eq!(err.reason(), Reason::ProviderUnavailable);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_transient() {
    let (endpoints, _) = start().await;
    let started = std::time::Instant::now();
    let err = refresh_err(&endpoints, "slow").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the request timeout applies"
    );
    assert_eq!(err.reason(), Reason::ProviderUnavailable);
    assert!(!err.is_permanent());
    assert!(err.to_string().contains("did not answer in time"), "{err}");

    let nowhere = ProviderEndpoints {
        token: Url::parse("http://127.0.0.1:1/token").unwrap(),
        ..endpoints
    };
    let err = refresh_err(&nowhere, "good").await;
    assert_eq!(err.reason(), Reason::ProviderUnavailable);
    assert!(!err.is_permanent());
    assert!(err.to_string().contains("Could not reach"), "{err}");
}

#[tokio::test]
async fn echoed_secrets_are_scrubbed_from_messages() {
    let (endpoints, _) = start().await;
    let err = refresh_err(&endpoints, "echo").await;
    let text = format!("{err} {err:?}");
    assert!(text.contains("[redacted]"), "{text}");
    assert_no_secrets(&text);
}

#[test]
fn a_secret_cut_by_the_length_limit_is_still_scrubbed() {
    // Found by tests/properties.rs: the message keeps the provider's first 300 characters, and a
    // credential echoed across that cut used to survive the scrub of the finished message in part.
    let secret = rt("echoed-at-the-cut");
    let description = format!("{} {}", "x".repeat(260), secret.expose());
    let cause = FailureCause::Http {
        status: 400,
        retry_after: None,
        body: ErrorBody::OAuth(ProviderErrorBody::new("invalid_grant", Some(&description))),
    };
    let err = token_error(
        ProviderKind::Google,
        TokenOperation::Refresh,
        cause,
        &[secret.expose()],
    );
    let message = err.class.message();
    assert!(!message.contains(&secret.expose()[..12]), "{message}");
    assert!(message.contains("[redacted]"), "{message}");
}

// ----- code exchange ----------------------------------------------------------------------------

#[tokio::test]
async fn exchange_code_sends_verifier_and_redirect_and_reads_the_id_token() {
    let (endpoints, rec) = start().await;
    let grant = client()
        .exchange_code(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::CodeExchange,
            ),
            &SecretValue::new(CODE_GOOD),
            &SecretValue::new(VERIFIER),
            "https://op.example.com/oauth2/callback",
            now(),
        )
        .await
        .unwrap();
    assert_eq!(grant.access_token.expose(), ACCESS_GOOD);
    assert_eq!(
        grant.refresh_token.as_ref().unwrap().expose(),
        REFRESH_FROM_CODE
    );
    let claims = grant.id_token_claims().unwrap().unwrap();
    assert_eq!(claims.email.as_deref(), Some("support@example.com"));
    assert_eq!(claims.sub.as_deref(), Some("1234"));
    assert_eq!(claims.iss.as_deref(), Some("https://accounts.google.com"));
    assert_eq!(claims.email_verified, Some(true));

    let (form, _) = rec.last();
    assert_eq!(form.get("grant_type").unwrap(), "authorization_code");
    assert_eq!(form.get("code_verifier").unwrap(), VERIFIER);
    assert_eq!(form.get("client_secret").unwrap(), CLIENT_SECRET);
    assert_no_secrets(&format!("{grant:?}"));
}

#[tokio::test]
async fn a_rejected_code_asks_for_a_new_sign_in() {
    let (endpoints, _) = start().await;
    let err = client()
        .exchange_code(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::CodeExchange,
            ),
            &SecretValue::new("AUTH-CODE-used-0009"),
            &SecretValue::new(VERIFIER),
            "https://op.example.com/oauth2/callback",
            now(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::SignInRequired);
    assert!(err.is_permanent());
    assert_eq!(err.operation, TokenOperation::CodeExchange);
    let err = client()
        .exchange_code(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::CodeExchange,
            ),
            &SecretValue::new(CODE_GOOD),
            &SecretValue::new(VERIFIER),
            "not a url",
            now(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::InvalidEndpoint);
}

// ----- revocation and userinfo ------------------------------------------------------------------

#[tokio::test]
async fn revoke_posts_the_token_with_client_credentials() {
    let (endpoints, rec) = start().await;
    let out = client()
        .revoke(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Revocation,
            ),
            &SecretValue::new(REFRESH_ROTATED),
            TokenTypeHint::RefreshToken,
            now(),
        )
        .await
        .unwrap();
    assert_eq!(out, RevokeOutcome::Revoked);
    let (form, _) = rec.last();
    assert_eq!(form.get("token").unwrap(), REFRESH_ROTATED);
    assert_eq!(form.get("token_type_hint").unwrap(), "refresh_token");
    assert_eq!(form.get("client_id").unwrap(), CLIENT_ID);
    assert_eq!(form.get("client_secret").unwrap(), CLIENT_SECRET);

    let out = client()
        .revoke(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Revocation,
            ),
            &SecretValue::new("ACCESS-TOKEN-dead-0010"),
            TokenTypeHint::AccessToken,
            now(),
        )
        .await
        .unwrap();
    assert_eq!(out, RevokeOutcome::AlreadyInvalid);

    let err = client()
        .revoke(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Revocation,
            ),
            &SecretValue::new(ACCESS_NEW),
            TokenTypeHint::AccessToken,
            now(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::ProviderUnavailable);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(err.operation, TokenOperation::Revocation);
    assert_no_secrets(&format!("{err} {err:?}"));

    // Without a revocation endpoint (Microsoft) nothing is sent: see reconcile::finalizer.
}

#[tokio::test]
async fn userinfo_reads_claims_and_classifies_bearer_errors() {
    let (endpoints, _) = start().await;
    let info = client()
        .userinfo(&endpoints, &SecretValue::new(ACCESS_GOOD), now())
        .await
        .unwrap();
    assert_eq!(info["email"], "support@example.com");

    let err = client()
        .userinfo(&endpoints, &SecretValue::new(ACCESS_NEW), now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Reason::ProviderError);
    assert!(err.is_permanent());
    assert!(err.to_string().contains("invalid_token"), "{err}");
    assert_no_secrets(&format!("{err} {err:?}"));

    let none = ProviderEndpoints {
        userinfo: None,
        ..endpoints
    };
    let err = client()
        .userinfo(&none, &SecretValue::new(ACCESS_GOOD), now())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ID token"), "{err}");
}

// ----- pure helpers -----------------------------------------------------------------------------

#[test]
fn retry_after_parses_seconds_and_http_dates() {
    let now: Timestamp = "2015-10-21T07:27:00Z".parse().unwrap();
    assert_eq!(
        parse_retry_after("120", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(parse_retry_after("soon", now), None);
    assert_eq!(parse_retry_after("-5", now), None);
}

#[test]
fn pkce_pairs_are_fresh_and_s256() {
    let (v1, c1) = pkce_pair();
    let (v2, c2) = pkce_pair();
    assert_ne!(v1, v2);
    assert_ne!(c1, c2);
    assert_eq!(v1.expose().len(), 43);
    assert_eq!(pkce_challenge_s256(&v1), c1);
    // RFC 7636 Appendix B.
    assert_eq!(
        pkce_challenge_s256(&SecretValue::new(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
        )),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
    assert_eq!(format!("{v1:?}"), "[redacted]");
}

#[test]
fn authorization_url_carries_everything_the_provider_needs() {
    let endpoints = crate::provider::google_endpoints();
    let verifier = SecretValue::new(VERIFIER);
    let scopes = vec![
        "https://mail.google.com/".to_owned(),
        "openid".to_owned(),
        "email".to_owned(),
    ];
    let url = authorization_url(&AuthorizationRequest {
        endpoints: &endpoints,
        client_id: CLIENT_ID,
        redirect_url: "https://op.example.com/oauth2/callback",
        scopes: &scopes,
        prompt: Prompt::SelectAccount,
        state: "state-xyz",
        pkce_verifier: &verifier,
        login_hint: Some("support@example.com"),
    })
    .unwrap();
    assert!(
        url.as_str()
            .starts_with("https://accounts.google.com/o/oauth2/v2/auth?")
    );
    let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], "https://op.example.com/oauth2/callback");
    assert_eq!(q["scope"], "https://mail.google.com/ openid email");
    assert_eq!(q["state"], "state-xyz");
    assert_eq!(q["code_challenge"], pkce_challenge_s256(&verifier));
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["access_type"], "offline");
    assert_eq!(q["include_granted_scopes"], "true");
    assert_eq!(q["prompt"], "select_account");
    assert_eq!(q["login_hint"], "support@example.com");
    assert!(
        !url.as_str().contains(VERIFIER),
        "only the challenge leaves"
    );
    assert!(!q.contains_key("client_secret"));

    let ms = crate::provider::microsoft_endpoints("common").unwrap();
    let url = authorization_url(&AuthorizationRequest {
        endpoints: &ms,
        prompt: Prompt::None,
        login_hint: None,
        ..AuthorizationRequest {
            endpoints: &endpoints,
            client_id: CLIENT_ID,
            redirect_url: "https://op.example.com/oauth2/callback",
            scopes: &scopes,
            prompt: Prompt::Consent,
            state: "s",
            pkce_verifier: &verifier,
            login_hint: None,
        }
    })
    .unwrap();
    let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["prompt"], "none");
    assert!(!q.contains_key("access_type"));
    assert!(!q.contains_key("login_hint"));
}

#[test]
fn id_token_claims_are_decoded_without_verification() {
    let t = SecretValue::new(jwt(json!({
        "iss": "https://login.microsoftonline.com/tid/v2.0", "sub": "abc",
        "preferred_username": "support@contoso.com", "email_verified": "true", "aud": "x"
    })));
    let c = decode_id_token_claims(&t).unwrap();
    assert_eq!(c.preferred_username.as_deref(), Some("support@contoso.com"));
    assert_eq!(c.email, None);
    assert_eq!(c.email_verified, Some(true));

    // Padding is tolerated.
    let padded = {
        let raw = jwt(json!({"sub": "a"}));
        let mut parts: Vec<String> = raw.split('.').map(str::to_owned).collect();
        while !parts[1].len().is_multiple_of(4) {
            parts[1].push('=');
        }
        parts.join(".")
    };
    assert_eq!(
        decode_id_token_claims(&SecretValue::new(padded))
            .unwrap()
            .sub
            .as_deref(),
        Some("a")
    );

    assert_eq!(
        decode_id_token_claims(&SecretValue::new("abc")),
        Err(IdTokenError::NotAJwt)
    );
    assert_eq!(
        decode_id_token_claims(&SecretValue::new("a.!!!.c")),
        Err(IdTokenError::NotBase64)
    );
    let not_json = format!(
        "a.{}.c",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("nope")
    );
    assert_eq!(
        decode_id_token_claims(&SecretValue::new(not_json)),
        Err(IdTokenError::NotJson)
    );
}

#[test]
fn www_authenticate_errors_are_parsed() {
    let b = parse_www_authenticate(
        r#"Bearer realm="example", error="insufficient_scope", error_description="needs mail""#,
    )
    .unwrap();
    assert_eq!(b.error, "insufficient_scope");
    assert_eq!(b.error_description.as_deref(), Some("needs mail"));
    assert_eq!(parse_www_authenticate(r#"Bearer realm="example""#), None);
}

/// Format every public struct and error with `{:?}` and `{}` and check that no credential shows.
#[tokio::test]
async fn nothing_formats_a_secret() {
    let (endpoints, _) = start().await;
    let mut texts = Vec::new();

    let grant = client()
        .exchange_code(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::CodeExchange,
            ),
            &SecretValue::new(CODE_GOOD),
            &SecretValue::new(VERIFIER),
            "https://op.example.com/oauth2/callback",
            now(),
        )
        .await
        .unwrap();
    texts.push(format!("{grant:?}"));
    texts.push(format!("{:?}", grant.id_token_claims()));
    let rotated = client()
        .refresh(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Refresh,
            ),
            &rt("rotate"),
            &[],
            now(),
        )
        .await
        .unwrap();
    texts.push(format!("{rotated:?}"));
    texts.push(format!("{:?}", creds()));
    texts.push(format!("{:?}", client()));
    texts.push(format!("{endpoints:?}"));
    let (verifier, challenge) = pkce_pair();
    texts.push(format!("{verifier:?} {verifier}"));
    assert!(!texts.last().unwrap().contains(verifier.expose()));
    let _ = challenge;
    texts.push(format!(
        "{:?}",
        GrantExtraFields {
            id_token: Some(jwt(json!({}))),
            refresh_token_expires_in: Some(1)
        }
    ));

    for name in [
        "revoked",
        "rapt",
        "bad",
        "429",
        "429-date",
        "403-html",
        "500",
        "503-json",
        "slow",
        "no-access-token",
        "wrong-type",
        "error-200",
        "echo",
    ] {
        let err = refresh_err(&endpoints, name).await;
        texts.push(format!("{err} | {err:?} | {} | {:?}", err.class, err.class));
        let source: &dyn std::error::Error = &err;
        texts.push(source.to_string());
    }
    let err = client()
        .exchange_code(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::CodeExchange,
            ),
            &SecretValue::new("AUTH-CODE-used-0009"),
            &SecretValue::new(VERIFIER),
            "https://op.example.com/oauth2/callback",
            now(),
        )
        .await
        .unwrap_err();
    texts.push(format!("{err} | {err:?}"));
    let err = client()
        .userinfo(&endpoints, &SecretValue::new(ACCESS_NEW), now())
        .await
        .unwrap_err();
    texts.push(format!("{err} | {err:?}"));
    let err = client()
        .revoke(
            &crate::oauth::Bound::unchecked(
                &endpoints,
                &creds(),
                crate::provider::TokenOperation::Revocation,
            ),
            &SecretValue::new(ACCESS_NEW),
            TokenTypeHint::AccessToken,
            now(),
        )
        .await
        .unwrap_err();
    texts.push(format!("{err} | {err:?}"));
    for e in [
        IdTokenError::NotAJwt,
        IdTokenError::NotBase64,
        IdTokenError::NotJson,
    ] {
        texts.push(format!("{e} {e:?}"));
    }

    assert!(texts.len() > 20);
    for t in &texts {
        assert_no_secrets(t);
    }
}

#[test]
fn own_host_addresses_are_loopback_unspecified_and_link_local() {
    for own in [
        "127.0.0.1",
        "127.9.9.9",
        "0.0.0.0",
        "169.254.169.254",
        "::1",
        "::",
        "fe80::1",
        "::ffff:127.0.0.1",
    ] {
        assert!(is_own_host(own.parse().unwrap()), "{own}");
    }
    for other in [
        "10.0.0.1",
        "192.168.1.1",
        "142.250.1.108",
        "fd00::1",
        "2a00:1450::1",
    ] {
        assert!(!is_own_host(other.parse().unwrap()), "{other}");
    }
}

#[tokio::test]
async fn a_name_that_leads_to_loopback_is_not_called_without_the_flag() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let client = OAuthClient::not_to_own_host().unwrap();
    let err = client
        .http_client()
        .get(format!("http://localhost:{port}/"))
        .send()
        .await
        .unwrap_err();
    let text = format!("{:?}", std::error::Error::source(&err));
    assert!(text.contains("--allow-loopback"), "{text}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The development client calls it.
    let _ = OAuthClient::new()
        .unwrap()
        .http_client()
        .get(format!("http://localhost:{port}/"))
        .send()
        .await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Issue 26: what a failed token-endpoint answer means, from what comes over the wire: only an
/// OAuth error body (JSON with an `error` some OAuth specification defines) may be permanent;
/// ingress, gateway, proxy and firewall pages are transient whatever their status.
#[test]
fn raw_token_endpoint_answers_are_permanent_only_with_an_oauth_error_body() {
    const NGINX_404: &str = "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
    const NGINX_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
    const SQUID_407: &str = "<!DOCTYPE html PUBLIC \"-//W3C//DTD HTML 4.01//EN\"><html><head><title>ERROR: Cache Access Denied</title></head><body><h2>Cache Access Denied.</h2></body></html>";
    // (status, content type, body, reason, permanent)
    let table: &[(u16, Option<&str>, &str, Reason, bool)] = &[
        (
            404,
            Some("text/html"),
            NGINX_404,
            Reason::NotAnOAuthAnswer,
            false,
        ),
        // An HTML page without a content type is still HTML.
        (404, None, NGINX_404, Reason::NotAnOAuthAnswer, false),
        (
            404,
            Some("text/plain"),
            "404 page not found",
            Reason::NotAnOAuthAnswer,
            false,
        ),
        (405, None, "", Reason::NotAnOAuthAnswer, false),
        (
            407,
            Some("text/html;charset=utf-8"),
            SQUID_407,
            Reason::NotAnOAuthAnswer,
            false,
        ),
        (
            400,
            Some("text/html"),
            "<html><body>Request Rejected. Your support ID is: 1234</body></html>",
            Reason::NotAnOAuthAnswer,
            false,
        ),
        (401, None, "", Reason::NotAnOAuthAnswer, false),
        (
            403,
            Some("application/json"),
            r#"{"message":"Forbidden"}"#,
            Reason::RateLimited,
            false,
        ),
        (
            400,
            Some("application/json"),
            r#"{"error":"blocked_by_policy"}"#,
            Reason::NotAnOAuthAnswer,
            false,
        ),
        (
            502,
            Some("text/html"),
            NGINX_502,
            Reason::ProviderUnavailable,
            false,
        ),
        (
            503,
            Some("text/html"),
            "<html>upstream connect error</html>",
            Reason::ProviderUnavailable,
            false,
        ),
        (504, None, "", Reason::ProviderUnavailable, false),
        // The OAuth server's own answers.
        (
            400,
            Some("application/json"),
            r#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#,
            Reason::GrantRevoked,
            true,
        ),
        (
            401,
            Some("application/json"),
            r#"{"error":"invalid_client"}"#,
            Reason::InvalidClient,
            true,
        ),
        (
            400,
            Some("application/json"),
            r#"{"error":"invalid_request"}"#,
            Reason::ProviderError,
            true,
        ),
        (
            400,
            Some("application/json"),
            r#"{"error":"invalid_scope"}"#,
            Reason::ScopeMissing,
            true,
        ),
        (
            400,
            Some("application/json"),
            r#"{"error":"temporarily_unavailable"}"#,
            Reason::ProviderUnavailable,
            false,
        ),
        // A 5xx is never the final word, whatever its body says.
        (
            500,
            Some("application/json"),
            r#"{"error":"invalid_grant"}"#,
            Reason::ProviderUnavailable,
            false,
        ),
    ];
    for (status, content_type, body, reason, permanent) in table {
        let meta = ResponseMeta {
            status: *status,
            retry_after: None,
            content_type: content_type.map(str::to_owned),
            www_authenticate: None,
        };
        let cause = FailureCause::Http {
            status: *status,
            retry_after: None,
            body: error_body(&meta, body.as_bytes()),
        };
        let class = crate::provider::classify(
            ProviderKind::Oidc,
            &TokenEndpointFailure {
                operation: TokenOperation::Refresh,
                cause,
            },
        );
        let case = format!("{status} {content_type:?} {body:.40}");
        assert_eq!(class.reason(), *reason, "{case}: {class:?}");
        assert_eq!(class.is_permanent(), *permanent, "{case}: {class:?}");
        // Never the page itself.
        for part in ["<html", "nginx", "Cache Access", "support ID", "Forbidden"] {
            assert!(
                !class.message().contains(part),
                "{case}: {}",
                class.message()
            );
        }
    }
}
