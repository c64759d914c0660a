use super::*;
use crate::reason::Reason;
use serde_json::json;

fn spec(v: serde_json::Value) -> MailIntegrationSpec {
    let mut base = json!({
        "provider": "Google",
        "mailbox": {"address": "support@example.com"},
        "oauth": {"clientSecretRef": {"name": "c"}},
        "tokenSecret": {"name": "t"},
    });
    merge(&mut base, v);
    serde_json::from_value(base).expect("test spec parses")
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

// ----- endpoints ------------------------------------------------------------------------------

#[test]
fn google_endpoints_are_the_documented_ones() {
    let e = static_endpoints(&spec(json!({}))).unwrap().unwrap();
    assert_eq!(e.kind, ProviderKind::Google);
    assert_eq!(
        e.authorization.as_str(),
        "https://accounts.google.com/o/oauth2/v2/auth"
    );
    assert_eq!(e.token.as_str(), "https://oauth2.googleapis.com/token");
    assert_eq!(
        e.revocation.unwrap().as_str(),
        "https://oauth2.googleapis.com/revoke"
    );
    assert_eq!(
        e.userinfo.unwrap().as_str(),
        "https://openidconnect.googleapis.com/v1/userinfo"
    );
    assert_eq!(e.issuer.as_deref(), Some("https://accounts.google.com"));
}

#[test]
fn microsoft_endpoints_follow_the_tenant_and_have_no_revocation() {
    let e = static_endpoints(&spec(
        json!({"provider": "Microsoft", "oauth": {"tenant": "contoso.onmicrosoft.com"}}),
    ))
    .unwrap()
    .unwrap();
    assert_eq!(
        e.authorization.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
    );
    assert_eq!(
        e.token.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(e.revocation, None);
    assert_eq!(e.userinfo, None);
    // A domain tenant: ID tokens carry the tenant ID, so the issuer is not known in advance.
    assert_eq!(e.issuer, None);

    let guid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let e = microsoft_endpoints(guid).unwrap();
    assert_eq!(
        e.issuer.as_deref(),
        Some("https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0")
    );
    assert_eq!(microsoft_endpoints("common").unwrap().issuer, None);
}

#[test]
fn microsoft_rejects_tenants_that_would_change_the_url() {
    for bad in ["", "a/b", "x?y=1", "../common", "a b", "a#b"] {
        let err = microsoft_endpoints(bad).unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidEndpoint, "{bad:?}");
        assert!(err.is_permanent());
    }
}

#[test]
fn overrides_replace_any_endpoint_for_any_provider() {
    let s = spec(json!({
        "oauth": {"endpoints": {
            "token": "http://127.0.0.1:8080/token",
            "revocation": "https://revoke.example.com/r",
        }}
    }));
    let e = static_endpoints(&s).unwrap().unwrap();
    assert_eq!(e.token.as_str(), "http://127.0.0.1:8080/token");
    assert_eq!(
        e.revocation.unwrap().as_str(),
        "https://revoke.example.com/r"
    );
    // Untouched ones keep Google's defaults.
    assert_eq!(
        e.authorization.as_str(),
        "https://accounts.google.com/o/oauth2/v2/auth"
    );

    let s = spec(json!({
        "provider": "Microsoft",
        "oauth": {"tenant": "common", "endpoints": {"revocation": "https://r.example.com/", "userinfo": "https://u.example.com/"}}
    }));
    let e = static_endpoints(&s).unwrap().unwrap();
    assert_eq!(e.revocation.unwrap().as_str(), "https://r.example.com/");
    assert_eq!(e.userinfo.unwrap().as_str(), "https://u.example.com/");
}

#[test]
fn oidc_without_issuer_uses_the_overrides_and_needs_both() {
    let s = spec(json!({
        "provider": "OIDC",
        "oauth": {"endpoints": {"authorization": "https://id.example.com/auth", "token": "https://id.example.com/token"}}
    }));
    let e = static_endpoints(&s).unwrap().unwrap();
    assert_eq!(e.kind, ProviderKind::Oidc);
    assert_eq!(e.token.as_str(), "https://id.example.com/token");
    assert_eq!(e.revocation, None);

    let s = spec(
        json!({"provider": "OIDC", "oauth": {"endpoints": {"token": "https://id.example.com/token"}}}),
    );
    assert_eq!(
        static_endpoints(&s).unwrap_err().reason(),
        Reason::InvalidEndpoint
    );

    let s = spec(json!({"provider": "OIDC", "oauth": {"issuerURL": "https://id.example.com"}}));
    assert_eq!(static_endpoints(&s).unwrap(), None, "discovery needed");
}

#[test]
fn endpoint_urls_must_be_https_except_loopback() {
    for ok in [
        "https://id.example.com/token",
        "http://127.0.0.1:9/token",
        "http://localhost/token",
        "http://[::1]:80/x",
    ] {
        check_endpoint_url("token", ok).unwrap();
    }
    for bad in [
        "http://id.example.com/token",
        "ftp://id.example.com/",
        "not a url",
        "https://user:pw@id.example.com/",
    ] {
        let e = check_endpoint_url("token", bad).unwrap_err();
        assert_eq!(e.reason(), Reason::InvalidEndpoint, "{bad}");
        assert!(!e.message().contains("pw@"), "credentials are never echoed");
    }
    let s = spec(json!({"oauth": {"endpoints": {"token": "http://evil.example.com/token"}}}));
    assert_eq!(
        static_endpoints(&s).unwrap_err().reason(),
        Reason::InvalidEndpoint
    );
}

#[test]
fn discovery_document_must_name_the_same_issuer() {
    let doc = DiscoveryDocument {
        issuer: "https://id.example.com/".into(),
        authorization_endpoint: "https://id.example.com/auth".into(),
        token_endpoint: "https://id.example.com/token".into(),
        revocation_endpoint: Some("https://id.example.com/revoke".into()),
        userinfo_endpoint: None,
    };
    let e = doc.endpoints("https://id.example.com").unwrap();
    assert_eq!(e.issuer.as_deref(), Some("https://id.example.com/"));
    assert_eq!(
        e.revocation.unwrap().as_str(),
        "https://id.example.com/revoke"
    );

    let err = doc.endpoints("https://other.example.com").unwrap_err();
    assert_eq!(err.reason(), Reason::DiscoveryFailed);
    assert!(err.is_permanent());
    assert!(err.message().contains("different issuer"));

    let insecure = DiscoveryDocument {
        token_endpoint: "http://id.example.com/token".into(),
        ..doc
    };
    let err = insecure.endpoints("https://id.example.com").unwrap_err();
    assert_eq!(err.reason(), Reason::DiscoveryFailed);
}

#[test]
fn discovery_url_appends_the_well_known_path() {
    assert_eq!(
        discovery_url("https://id.example.com/realms/x/")
            .unwrap()
            .as_str(),
        "https://id.example.com/realms/x/.well-known/openid-configuration"
    );
    assert_eq!(
        discovery_url("https://accounts.google.com")
            .unwrap()
            .as_str(),
        "https://accounts.google.com/.well-known/openid-configuration"
    );
    assert_eq!(
        discovery_url("http://id.example.com").unwrap_err().reason(),
        Reason::DiscoveryFailed
    );
}

#[test]
fn the_discovery_cache_is_bounded_in_entries_and_age() {
    let endpoints = google_endpoints();
    let mut cache = DiscoveryCache::new();
    let start = Instant::now();
    let ttl = Duration::from_secs(3600);
    for i in 0..(MAX_DISCOVERY_ENTRIES + 50) {
        let at = start + Duration::from_secs(i as u64);
        insert_bounded(
            &mut cache,
            format!("https://id{i}.example"),
            endpoints.clone(),
            at,
            ttl,
        );
    }
    assert_eq!(cache.len(), MAX_DISCOVERY_ENTRIES);
    assert!(
        !cache.contains_key("https://id0.example"),
        "the oldest fetch went first"
    );
    assert!(cache.contains_key(&format!("https://id{}.example", MAX_DISCOVERY_ENTRIES + 49)));
    // An hour after the last fetch, every entry has expired: one new fetch leaves one entry.
    let later = start + Duration::from_secs(2 * 3600);
    insert_bounded(
        &mut cache,
        "https://new.example".into(),
        endpoints,
        later,
        ttl,
    );
    assert_eq!(cache.len(), 1);
}

#[test]
fn endpoint_urls_longer_than_the_crd_allows_are_refused_without_echo() {
    let long = format!("https://id.example/{}", "a".repeat(MAX_URL_LEN));
    let err = check_endpoint_url("token", &long).unwrap_err();
    assert_eq!(err.reason(), crate::reason::Reason::InvalidEndpoint);
    assert!(err.message().len() < 200, "{}", err.message());
}

#[tokio::test]
async fn loopback_endpoints_and_issuers_are_refused_without_the_flag() {
    let resolver = ProviderResolver::new(reqwest::Client::new());
    let spec = spec(json!({"provider": "OIDC", "oauth": {"endpoints": {
        "authorization": "https://id.example/auth",
        "token": "http://127.0.0.1:15000/quitquitquit",
    }}}));
    let err = resolver.resolve(&spec).await.unwrap_err();
    assert_eq!(err.reason(), Reason::InvalidEndpoint);
    assert!(
        err.message().contains("--allow-loopback"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("quitquitquit"), "{}", err.message());
    for issuer in [
        "http://localhost:15000",
        "https://[::1]:8443",
        "https://127.0.0.2",
        "https://0.0.0.0:8443",
        "https://169.254.169.254",
    ] {
        let err = resolver.discover(issuer).await.unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidEndpoint, "{issuer}");
    }
    // With the flag (development, tests) the same spec resolves.
    let dev = ProviderResolver::new(reqwest::Client::new()).with_loopback(true);
    assert_eq!(dev.resolve(&spec).await.unwrap().token.port(), Some(15000));
}

// ----- discovery over HTTP --------------------------------------------------------------------

mod discovery_http {
    use super::*;
    use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone)]
    struct Server {
        hits: Arc<AtomicUsize>,
        issuer_override: Option<String>,
        base: Arc<Mutex<String>>,
    }

    async fn doc(State(s): State<Server>) -> Json<serde_json::Value> {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let base = s.base.lock().unwrap().clone();
        Json(json!({
            "issuer": s.issuer_override.clone().unwrap_or(base.clone()),
            "authorization_endpoint": format!("{base}/auth"),
            "token_endpoint": format!("{base}/token"),
            "revocation_endpoint": format!("{base}/token/revocation"),
            "userinfo_endpoint": format!("{base}/me"),
            "jwks_uri": format!("{base}/jwks"),
        }))
    }

    async fn start(issuer_override: Option<&str>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let state = Server {
            hits: hits.clone(),
            issuer_override: issuer_override.map(str::to_owned),
            base: Arc::new(Mutex::new(base.clone())),
        };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(doc))
            .route(
                "/broken/.well-known/openid-configuration",
                get(|| async { (StatusCode::BAD_GATEWAY, "no") }),
            )
            .with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (base, hits)
    }

    fn oidc_spec(issuer: &str, endpoints: serde_json::Value) -> MailIntegrationSpec {
        spec(json!({"provider": "OIDC", "oauth": {"issuerURL": issuer, "endpoints": endpoints}}))
    }

    #[tokio::test]
    async fn resolves_caches_and_applies_overrides() {
        let (base, hits) = start(None).await;
        let resolver = ProviderResolver::new(reqwest::Client::new()).with_loopback(true);
        let e = resolver
            .resolve(&oidc_spec(&base, json!({})))
            .await
            .unwrap();
        assert_eq!(e.kind, ProviderKind::Oidc);
        assert_eq!(e.token.as_str(), format!("{base}/token"));
        assert_eq!(
            e.revocation.as_ref().unwrap().as_str(),
            format!("{base}/token/revocation")
        );
        assert_eq!(e.userinfo.as_ref().unwrap().as_str(), format!("{base}/me"));
        assert_eq!(e.issuer.as_deref(), Some(base.as_str()));

        // Cached: a second resolve (with a trailing slash too) does not fetch again.
        let e2 = resolver
            .resolve(&oidc_spec(
                &format!("{base}/"),
                json!({"token": "http://127.0.0.1:1/t"}),
            ))
            .await
            .unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(e2.token.as_str(), "http://127.0.0.1:1/t", "override wins");
        assert_eq!(e2.authorization, e.authorization);

        resolver.invalidate(&base);
        resolver.discover(&base).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn expired_cache_entries_are_fetched_again() {
        let (base, hits) = start(None).await;
        let resolver = ProviderResolver::new(reqwest::Client::new())
            .with_loopback(true)
            .with_ttl(Duration::ZERO);
        resolver.discover(&base).await.unwrap();
        resolver.discover(&base).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn issuer_mismatch_is_permanent_and_5xx_transient() {
        let (base, _) = start(Some("https://evil.example.com")).await;
        let resolver = ProviderResolver::new(reqwest::Client::new()).with_loopback(true);
        let err = resolver.discover(&base).await.unwrap_err();
        assert_eq!(err.reason(), Reason::DiscoveryFailed);
        assert!(err.is_permanent());

        let err = resolver
            .discover(&format!("{base}/broken"))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::DiscoveryFailed);
        assert!(!err.is_permanent());

        let err = resolver
            .discover(&format!("{base}/missing"))
            .await
            .unwrap_err();
        assert!(err.is_permanent(), "404: {err}");

        // Nothing listens on port 1.
        let err = resolver.discover("http://127.0.0.1:1").await.unwrap_err();
        assert!(!err.is_permanent());
        assert_eq!(err.reason(), Reason::DiscoveryFailed);
    }

    #[tokio::test]
    async fn google_and_microsoft_need_no_network() {
        let resolver = ProviderResolver::new(reqwest::Client::new());
        let e = resolver.resolve(&spec(json!({}))).await.unwrap();
        assert_eq!(e, google_endpoints());
    }
}

// ----- scopes ---------------------------------------------------------------------------------

#[test]
fn default_scopes_per_provider() {
    assert_eq!(
        default_scopes(&spec(json!({}))),
        strings(&["https://mail.google.com/"])
    );
    assert_eq!(
        default_scopes(&spec(
            json!({"provider": "Microsoft", "oauth": {"tenant": "common"}})
        )),
        strings(&[
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access"
        ])
    );
    assert_eq!(
        default_scopes(&spec(json!({
            "provider": "Microsoft",
            "oauth": {"tenant": "common"},
            "mailbox": {"protocol": "POP3", "smtp": {"host": "smtp.office365.com", "port": 587}},
        }))),
        strings(&[
            "https://outlook.office.com/POP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access"
        ])
    );
    assert_eq!(
        default_scopes(&spec(
            json!({"provider": "OIDC", "oauth": {"issuerURL": "https://id.example.com"}})
        )),
        strings(&["openid", "email", "offline_access"])
    );
}

#[test]
fn spec_scopes_replace_the_defaults() {
    let s = spec(
        json!({"oauth": {"scopes": ["https://www.googleapis.com/auth/gmail.readonly", " ", "https://www.googleapis.com/auth/gmail.readonly"]}}),
    );
    assert_eq!(
        requested_scopes(&s),
        strings(&["https://www.googleapis.com/auth/gmail.readonly"])
    );
    assert_eq!(
        sign_in_scopes(&s),
        strings(&[
            "https://www.googleapis.com/auth/gmail.readonly",
            "openid",
            "email"
        ])
    );
    assert_eq!(
        requested_scopes(&spec(json!({"oauth": {"scopes": []}}))),
        strings(&["https://mail.google.com/"])
    );
}

#[test]
fn sign_in_scopes_add_identity_scopes_once() {
    assert_eq!(
        sign_in_scopes(&spec(json!({}))),
        strings(&["https://mail.google.com/", "openid", "email"])
    );
    assert_eq!(
        sign_in_scopes(&spec(
            json!({"provider": "Microsoft", "oauth": {"tenant": "common"}})
        )),
        strings(&[
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access",
            "openid",
            "email",
            "profile"
        ])
    );
    assert_eq!(
        sign_in_scopes(&spec(
            json!({"provider": "OIDC", "oauth": {"issuerURL": "https://id.example.com", "scopes": ["mail"]}})
        )),
        strings(&["mail", "openid", "email", "offline_access"])
    );
}

#[test]
fn refresh_scopes_only_for_microsoft() {
    assert!(refresh_scopes(&spec(json!({}))).is_empty());
    assert!(
        refresh_scopes(&spec(
            json!({"provider": "OIDC", "oauth": {"issuerURL": "https://i.example.com"}})
        ))
        .is_empty()
    );
    assert_eq!(
        refresh_scopes(&spec(
            json!({"provider": "Microsoft", "oauth": {"tenant": "common"}})
        )),
        strings(&[
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access"
        ])
    );
}

#[test]
fn missing_scopes_ignores_identity_scopes() {
    let g = spec(json!({}));
    assert!(missing_scopes(&g, &strings(&["https://mail.google.com/", "openid"])).is_empty());
    assert_eq!(
        missing_scopes(
            &g,
            &strings(&["openid", "https://www.googleapis.com/auth/userinfo.email"])
        ),
        strings(&["https://mail.google.com/"])
    );
    let m = spec(json!({"provider": "Microsoft", "oauth": {"tenant": "common"}}));
    assert!(
        missing_scopes(
            &m,
            &strings(&["https://outlook.office.com/imap.accessasuser.all"])
        )
        .is_empty()
    );
}

// ----- authorization request and servers --------------------------------------------------------

#[test]
fn prompt_mapping_and_google_offline_access() {
    for (prompt, value) in [
        (Prompt::None, "none"),
        (Prompt::Consent, "consent"),
        (Prompt::SelectAccount, "select_account"),
    ] {
        assert_eq!(
            authorization_params(ProviderKind::Google, prompt),
            vec![
                ("access_type", "offline".to_owned()),
                ("include_granted_scopes", "true".to_owned()),
                ("prompt", value.to_owned())
            ]
        );
        for kind in [ProviderKind::Microsoft, ProviderKind::Oidc] {
            assert_eq!(
                authorization_params(kind, prompt),
                vec![("prompt", value.to_owned())]
            );
        }
    }
}

#[test]
fn default_mail_servers() {
    let s = |h: &str, p: i32, t: TlsMode| {
        Some(MailServer {
            host: h.into(),
            port: p,
            tls: Some(t),
        })
    };
    use MailProtocol::*;
    use ProviderKind::*;
    assert_eq!(
        default_mail_server(Google, Imap),
        s("imap.gmail.com", 993, TlsMode::Implicit)
    );
    assert_eq!(
        default_mail_server(Google, Pop3),
        s("pop.gmail.com", 995, TlsMode::Implicit)
    );
    assert_eq!(
        default_smtp_server(Google),
        s("smtp.gmail.com", 465, TlsMode::Implicit)
    );
    assert_eq!(
        default_mail_server(Microsoft, Imap),
        s("outlook.office365.com", 993, TlsMode::Implicit)
    );
    assert_eq!(
        default_mail_server(Microsoft, Pop3),
        s("outlook.office365.com", 995, TlsMode::Implicit)
    );
    assert_eq!(
        default_smtp_server(Microsoft),
        s("smtp.office365.com", 587, TlsMode::StartTls)
    );
    assert_eq!(default_mail_server(Oidc, Imap), None);
    assert_eq!(default_smtp_server(Oidc), None);

    assert_eq!(
        mail_server(&spec(json!({}))),
        s("imap.gmail.com", 993, TlsMode::Implicit)
    );
    let own =
        spec(json!({"mailbox": {"server": {"host": "127.0.0.1", "port": 1143, "tls": "None"}}}));
    assert_eq!(mail_server(&own), s("127.0.0.1", 1143, TlsMode::None));
    assert_eq!(
        mail_server(&spec(
            json!({"provider": "OIDC", "oauth": {"issuerURL": "https://i.example.com"}})
        )),
        None
    );
}

// ----- classification -------------------------------------------------------------------------

fn oauth(status: u16, body: serde_json::Value, retry_after: Option<u64>) -> FailureCause {
    FailureCause::Http {
        status,
        retry_after: retry_after.map(Duration::from_secs),
        body: ErrorBody::OAuth(serde_json::from_value(body).unwrap()),
    }
}

fn non_json(status: u16, body: ErrorBody, retry_after: Option<u64>) -> FailureCause {
    FailureCause::Http {
        status,
        retry_after: retry_after.map(Duration::from_secs),
        body,
    }
}

/// (case, provider, operation, cause, reason, permanent, retry_after)
type Row = (
    &'static str,
    ProviderKind,
    TokenOperation,
    FailureCause,
    Reason,
    bool,
    Option<u64>,
);

fn table() -> Vec<Row> {
    use ProviderKind::*;
    use TokenOperation::*;
    let html = || ErrorBody::Html;
    vec![
        (
            "google revoked",
            Google,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
                None,
            ),
            Reason::GrantRevoked,
            true,
            None,
        ),
        (
            "google bad token",
            Google,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Bad Request"}),
                None,
            ),
            Reason::GrantRevoked,
            true,
            None,
        ),
        (
            "google bad code",
            Google,
            CodeExchange,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Bad Request"}),
                None,
            ),
            Reason::SignInRequired,
            true,
            None,
        ),
        (
            "google rapt",
            Google,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "reauth related error (invalid_rapt)", "error_uri": "https://support.google.com/a/answer/9368756", "error_subtype": "invalid_rapt"}),
                None,
            ),
            Reason::ReauthRequired,
            true,
            None,
        ),
        (
            "google client not found",
            Google,
            Refresh,
            oauth(
                401,
                json!({"error": "invalid_client", "error_description": "The OAuth client was not found."}),
                None,
            ),
            Reason::InvalidClient,
            true,
            None,
        ),
        (
            "google wrong secret",
            Google,
            Refresh,
            oauth(
                401,
                json!({"error": "invalid_client", "error_description": "Unauthorized"}),
                None,
            ),
            Reason::InvalidClient,
            true,
            None,
        ),
        (
            "google other client's token",
            Google,
            Refresh,
            oauth(
                400,
                json!({"error": "unauthorized_client", "error_description": "Unauthorized"}),
                None,
            ),
            Reason::UnauthorizedClient,
            true,
            None,
        ),
        (
            "invalid_scope",
            Oidc,
            Refresh,
            oauth(400, json!({"error": "invalid_scope"}), None),
            Reason::ScopeMissing,
            true,
            None,
        ),
        (
            "google 403 html",
            Google,
            Refresh,
            non_json(403, html(), None),
            Reason::RateLimited,
            false,
            None,
        ),
        (
            "google 403 html retry-after",
            Google,
            Refresh,
            non_json(403, html(), Some(30)),
            Reason::RateLimited,
            false,
            Some(30),
        ),
        (
            "429 json",
            Google,
            Refresh,
            oauth(429, json!({"error": "rate_limit_exceeded"}), Some(120)),
            Reason::RateLimited,
            false,
            Some(120),
        ),
        (
            "429 no body",
            Oidc,
            Refresh,
            non_json(429, ErrorBody::Empty, None),
            Reason::RateLimited,
            false,
            None,
        ),
        (
            "503 html",
            Google,
            Refresh,
            non_json(503, html(), Some(5)),
            Reason::ProviderUnavailable,
            false,
            Some(5),
        ),
        (
            "500 json",
            Oidc,
            Refresh,
            oauth(500, json!({"error": "server_error"}), None),
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        (
            "502 empty",
            Microsoft,
            Refresh,
            non_json(502, ErrorBody::Empty, None),
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        // Found by tests/properties.rs: a 5xx whose body reads as permanent was not retried.
        (
            "500 with a permanent Microsoft code",
            Microsoft,
            Refresh,
            oauth(
                500,
                json!({"error": "invalid_grant", "error_codes": [70008]}),
                Some(9),
            ),
            Reason::ProviderUnavailable,
            false,
            Some(9),
        ),
        (
            "503 with Google's invalid_rapt",
            Google,
            Refresh,
            oauth(
                503,
                json!({"error": "invalid_grant", "error_subtype": "invalid_rapt"}),
                None,
            ),
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        (
            "503 with Microsoft throttling stays rate limiting",
            Microsoft,
            Refresh,
            oauth(
                503,
                json!({"error": "temporarily_unavailable", "error_codes": [50196]}),
                Some(4),
            ),
            Reason::RateLimited,
            false,
            Some(4),
        ),
        (
            "temporarily_unavailable 400",
            Oidc,
            Refresh,
            oauth(400, json!({"error": "temporarily_unavailable"}), None),
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        (
            "timeout",
            Google,
            Refresh,
            FailureCause::Timeout,
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        (
            "connect",
            Microsoft,
            Refresh,
            FailureCause::Connect {
                detail: "connection refused".into(),
            },
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        (
            "garbage 200",
            Oidc,
            Refresh,
            FailureCause::InvalidResponse {
                detail: "field `access_token`".into(),
            },
            Reason::ProviderError,
            false,
            None,
        ),
        (
            "401 html",
            Oidc,
            Refresh,
            non_json(401, html(), None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "404",
            Oidc,
            Refresh,
            non_json(
                404,
                ErrorBody::Other {
                    content_type: Some("text/plain".into()),
                },
                None,
            ),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "unknown error",
            Oidc,
            Refresh,
            oauth(400, json!({"error": "invalid_request"}), None),
            Reason::ProviderError,
            true,
            None,
        ),
        (
            "oidc-provider rotation reuse",
            Oidc,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "grant request is invalid"}),
                None,
            ),
            Reason::GrantRevoked,
            true,
            None,
        ),
        (
            "oidc-provider wrong secret",
            Oidc,
            Refresh,
            oauth(
                401,
                json!({"error": "invalid_client", "error_description": "client authentication failed"}),
                None,
            ),
            Reason::InvalidClient,
            true,
            None,
        ),
        (
            "ms inactive 70008",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.\r\nTrace ID: x\r\nCorrelation ID: y", "error_codes": [70008]}),
                None,
            ),
            Reason::GrantExpiredInactive,
            true,
            None,
        ),
        (
            "ms inactive 700082 (description only)",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "AADSTS700082: The refresh token has expired due to inactivity."}),
                None,
            ),
            Reason::GrantExpiredInactive,
            true,
            None,
        ),
        (
            "ms revoked 50173",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "AADSTS50173: The provided grant has expired due to it being revoked", "error_codes": [50173]}),
                None,
            ),
            Reason::GrantRevoked,
            true,
            None,
        ),
        (
            "ms mfa 50076",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "interaction_required", "error_description": "AADSTS50076: Due to a configuration change made by your administrator...", "error_codes": [50076]}),
                None,
            ),
            Reason::ReauthRequired,
            true,
            None,
        ),
        (
            "ms conditional access 53003",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "interaction_required", "error_codes": [53003]}),
                None,
            ),
            Reason::ProviderError,
            true,
            None,
        ),
        (
            "ms consent 65001",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_codes": [65001]}),
                None,
            ),
            Reason::ScopeMissing,
            true,
            None,
        ),
        (
            "ms wrong secret 7000215",
            Microsoft,
            Refresh,
            oauth(
                401,
                json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.", "error_codes": [7000215]}),
                None,
            ),
            Reason::InvalidClient,
            true,
            None,
        ),
        (
            "ms expired secret 7000222",
            Microsoft,
            Refresh,
            oauth(
                401,
                json!({"error": "invalid_client", "error_codes": [7000222]}),
                None,
            ),
            Reason::ClientSecretExpired,
            true,
            None,
        ),
        (
            "ms app-only admin consent 65001",
            Microsoft,
            ClientCredentials,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_codes": [65001]}),
                None,
            ),
            Reason::AdminConsentRequired,
            true,
            None,
        ),
        (
            "ms certificate not uploaded 700027",
            Microsoft,
            ClientCredentials,
            oauth(
                401,
                json!({"error": "invalid_client", "error_description": "AADSTS700027: Client assertion failed signature validation."}),
                None,
            ),
            Reason::ClientCertificateRejected,
            true,
            None,
        ),
        (
            "google dwd not configured",
            Google,
            JwtBearer,
            oauth(
                401,
                json!({"error": "unauthorized_client", "error_description": "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."}),
                None,
            ),
            Reason::DomainWideDelegationMissing,
            true,
            None,
        ),
        (
            "google dwd unknown user",
            Google,
            JwtBearer,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Invalid email or User ID"}),
                None,
            ),
            Reason::DelegatedUserUnknown,
            true,
            None,
        ),
        (
            "google dwd bad signature",
            Google,
            JwtBearer,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
                None,
            ),
            Reason::ServiceAccountKeyRejected,
            true,
            None,
        ),
        (
            "google dwd audience",
            Google,
            JwtBearer,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Invalid JWT: Failed audience check."}),
                None,
            ),
            Reason::ProviderError,
            true,
            None,
        ),
        (
            "google dwd scope",
            Google,
            JwtBearer,
            oauth(
                400,
                json!({"error": "invalid_scope", "error_description": "Invalid OAuth scope or ID token audience provided."}),
                None,
            ),
            Reason::ScopeMissing,
            true,
            None,
        ),
        (
            "google refresh unauthorized_client stays UnauthorizedClient",
            Google,
            Refresh,
            oauth(
                401,
                json!({"error": "unauthorized_client", "error_description": "Unauthorized"}),
                None,
            ),
            Reason::UnauthorizedClient,
            true,
            None,
        ),
        (
            "ms loop 50196",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_request", "error_codes": [50196]}),
                None,
            ),
            Reason::RateLimited,
            false,
            None,
        ),
        (
            "ms tenant throttled 90055",
            Microsoft,
            Refresh,
            oauth(
                503,
                json!({"error": "temporarily_unavailable", "error_codes": [90055]}),
                Some(10),
            ),
            Reason::RateLimited,
            false,
            Some(10),
        ),
        (
            "ms unknown code falls back to error",
            Microsoft,
            Refresh,
            oauth(
                400,
                json!({"error": "invalid_grant", "error_codes": [9999999]}),
                None,
            ),
            Reason::GrantRevoked,
            true,
            None,
        ),
        (
            "ms 429",
            Microsoft,
            Refresh,
            oauth(429, json!({"error": "invalid_request"}), Some(3)),
            Reason::RateLimited,
            false,
            Some(3),
        ),
        (
            "revocation 503",
            Google,
            Revocation,
            non_json(503, ErrorBody::Empty, Some(7)),
            Reason::ProviderUnavailable,
            false,
            Some(7),
        ),
        (
            "userinfo 401 invalid_token",
            Oidc,
            UserInfo,
            oauth(401, json!({"error": "invalid_token"}), None),
            Reason::ProviderError,
            true,
            None,
        ),
        (
            "userinfo 401 no body",
            Oidc,
            UserInfo,
            non_json(401, ErrorBody::Empty, None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        // Issue 26: an answer without an OAuth error body is never the final word.
        (
            "ingress 404 html",
            Oidc,
            Refresh,
            non_json(404, html(), None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "gateway 502 html",
            Oidc,
            Refresh,
            non_json(502, html(), None),
            Reason::ProviderUnavailable,
            false,
            None,
        ),
        (
            "egress proxy 407 html",
            Oidc,
            Refresh,
            non_json(407, html(), None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "waf 400 html",
            Microsoft,
            Refresh,
            non_json(400, html(), Some(10)),
            Reason::NotAnOAuthAnswer,
            false,
            Some(10),
        ),
        (
            "405 empty",
            Google,
            Refresh,
            non_json(405, ErrorBody::Empty, None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "410 on revocation",
            Oidc,
            Revocation,
            non_json(410, html(), None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "code exchange 404 html",
            Oidc,
            CodeExchange,
            non_json(404, html(), None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "json 400 with an error no OAuth specification defines",
            Oidc,
            Refresh,
            oauth(400, json!({"error": "request_blocked"}), None),
            Reason::NotAnOAuthAnswer,
            false,
            None,
        ),
        (
            "unsupported_grant_type stays permanent",
            Oidc,
            Refresh,
            oauth(400, json!({"error": "unsupported_grant_type"}), None),
            Reason::ProviderError,
            true,
            None,
        ),
        (
            "userinfo 403 insufficient_scope",
            Oidc,
            UserInfo,
            oauth(403, json!({"error": "insufficient_scope"}), None),
            Reason::ScopeMissing,
            true,
            None,
        ),
    ]
}

#[test]
fn classification_table() {
    for (case, kind, operation, cause, reason, is_permanent, retry_after) in table() {
        let class = classify(kind, &TokenEndpointFailure { operation, cause });
        assert_eq!(class.reason(), reason, "{case}: {class:?}");
        assert_eq!(class.is_permanent(), is_permanent, "{case}: {class:?}");
        assert_eq!(
            class.retry_after(),
            retry_after.map(Duration::from_secs),
            "{case}"
        );
        let m = class.message();
        assert!(
            m.len() > 40 && !m.contains('\n') && !m.contains('\r'),
            "{case}: {m}"
        );
    }
}

#[test]
fn google_revocation_message_mentions_the_testing_limit() {
    let class = classify(
        ProviderKind::Google,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
                None,
            ),
        },
    );
    let m = class.message();
    assert!(m.contains("Testing") && m.contains("7 days"), "{m}");
    assert!(m.contains("Sign in again"), "{m}");
    assert!(
        m.contains("Google said: invalid_grant: Token has been expired or revoked."),
        "{m}"
    );
}

#[test]
fn messages_carry_the_description_as_a_one_line_hint() {
    let class = classify(
        ProviderKind::Microsoft,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: oauth(
                400,
                json!({"error": "invalid_grant", "error_description": format!("AADSTS70008: expired.\r\nTrace ID: {}", "x".repeat(500))}),
                None,
            ),
        },
    );
    let m = class.message();
    assert!(m.contains("AADSTS70008: expired. Trace ID: xxx"), "{m}");
    assert!(
        m.contains('…') && m.len() < 800,
        "long descriptions are cut: {}",
        m.len()
    );
}

#[test]
fn aadsts_codes_come_from_error_codes_or_the_description() {
    let b = ProviderErrorBody {
        error: "invalid_grant".into(),
        error_description: Some("AADSTS700082: x. AADSTS50173: y".into()),
        ..Default::default()
    };
    assert_eq!(b.aadsts_codes(), vec![700082, 50173]);
    let b = ProviderErrorBody {
        error_codes: vec![70008],
        ..b
    };
    assert_eq!(b.aadsts_codes(), vec![70008]);
    assert!(ProviderErrorBody::new("x", None).aadsts_codes().is_empty());
}

#[test]
fn scrub_removes_echoed_secrets() {
    let c = FailureClass::Permanent {
        reason: Reason::ProviderError,
        message: "provider said: token 1//0gLongRefreshToken is bad; abc".into(),
    }
    .scrub(&["1//0gLongRefreshToken", "abc"]);
    assert_eq!(c.message(), "provider said: token [redacted] is bad; abc");
}

#[test]
fn testing_app_expiry_is_inferred_from_the_grant_age() {
    let now: jiff::Timestamp = "2025-03-08T10:00:00Z".parse().unwrap();
    let revoked = classify(
        ProviderKind::Google,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: oauth(
                400,
                json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
                None,
            ),
        },
    );
    let at = |s: &str| Some(s.parse::<jiff::Timestamp>().unwrap());

    // Died 7 days after sign-in: the Testing limit.
    let h = GrantHistory {
        issued_at: at("2025-03-01T09:30:00Z"),
        refresh_token_expires_at: None,
    };
    let c = refine_with_grant_history(ProviderKind::Google, revoked.clone(), &h, now);
    assert_eq!(c.reason(), Reason::TestingAppGrantExpired);
    assert!(c.is_permanent());
    assert!(
        c.message().contains("7.0 days after sign-in") && c.message().contains("Publish"),
        "{}",
        c.message()
    );

    // Google had announced a 7-day refresh token that has now passed (operator was down a while).
    let h = GrantHistory {
        issued_at: at("2025-02-20T10:00:00Z"),
        refresh_token_expires_at: at("2025-02-27T09:59:59Z"),
    };
    assert_eq!(
        refine_with_grant_history(ProviderKind::Google, revoked.clone(), &h, now).reason(),
        Reason::TestingAppGrantExpired
    );

    // Three days or a month after sign-in: a plain revocation.
    for issued in ["2025-03-05T10:00:00Z", "2025-02-01T10:00:00Z"] {
        let h = GrantHistory {
            issued_at: at(issued),
            refresh_token_expires_at: None,
        };
        assert_eq!(
            refine_with_grant_history(ProviderKind::Google, revoked.clone(), &h, now),
            revoked
        );
    }
    // Nothing known, another provider, or another reason: unchanged.
    assert_eq!(
        refine_with_grant_history(
            ProviderKind::Google,
            revoked.clone(),
            &GrantHistory::default(),
            now
        ),
        revoked
    );
    let h = GrantHistory {
        issued_at: at("2025-03-01T09:30:00Z"),
        refresh_token_expires_at: None,
    };
    assert_eq!(
        refine_with_grant_history(ProviderKind::Oidc, revoked.clone(), &h, now),
        revoked
    );
    let transient = FailureClass::Transient {
        reason: Reason::RateLimited,
        message: "m".into(),
        retry_after: None,
    };
    assert_eq!(
        refine_with_grant_history(ProviderKind::Google, transient.clone(), &h, now),
        transient
    );
}

#[tokio::test]
async fn google_and_microsoft_endpoints_are_not_overridden_without_the_flag() {
    let resolver = ProviderResolver::new(reqwest::Client::new());
    let evil = spec(json!({"oauth": {"endpoints": {"token": "https://evil.example.com/token"}}}));
    let err = resolver.resolve(&evil).await.unwrap_err();
    assert_eq!(err.reason(), Reason::EndpointOverrideNotAllowed);
    assert!(err.is_permanent());
    assert!(
        err.message().contains("--allow-endpoint-overrides"),
        "{}",
        err.message()
    );
    let allowed = resolver.clone().with_endpoint_overrides(true);
    assert_eq!(
        allowed.resolve(&evil).await.unwrap().token.as_str(),
        "https://evil.example.com/token"
    );
    let plain = spec(json!({}));
    assert!(resolver.resolve(&plain).await.is_ok());
}

#[test]
fn grants_without_a_sign_in_never_send_anyone_to_sign_in() {
    // A service account's or an app's failure is fixed in a console, not by a sign-in link.
    for (kind, operation, body) in [
        (
            ProviderKind::Google,
            TokenOperation::JwtBearer,
            json!({"error": "invalid_grant", "error_description": "Invalid JWT: Failed audience check."}),
        ),
        (
            ProviderKind::Google,
            TokenOperation::JwtBearer,
            json!({"error": "invalid_grant", "error_description": "Invalid email or User ID"}),
        ),
        (
            ProviderKind::Google,
            TokenOperation::JwtBearer,
            json!({"error": "invalid_scope"}),
        ),
        (
            ProviderKind::Google,
            TokenOperation::JwtBearer,
            json!({"error": "unauthorized_client"}),
        ),
        (
            ProviderKind::Microsoft,
            TokenOperation::ClientCredentials,
            json!({"error": "invalid_grant", "error_codes": [65001]}),
        ),
        (
            ProviderKind::Microsoft,
            TokenOperation::ClientCredentials,
            json!({"error": "invalid_client", "error_codes": [700027]}),
        ),
        (
            ProviderKind::Microsoft,
            TokenOperation::ClientCredentials,
            json!({"error": "unauthorized_client", "error_codes": [700016]}),
        ),
    ] {
        let class = classify(
            kind,
            &TokenEndpointFailure {
                operation,
                cause: oauth(400, body.clone(), None),
            },
        );
        assert!(class.is_permanent(), "{body}");
        assert!(
            !class.message().contains("signIn.url"),
            "{body}: {}",
            class.message()
        );
    }
}

#[test]
fn an_answer_that_is_not_oauth_says_what_was_seen_and_never_the_body() {
    let class = classify(
        ProviderKind::Oidc,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: non_json(404, ErrorBody::Html, None),
        },
    );
    let m = class.message();
    assert!(
        m.starts_with("The token endpoint answered HTTP 404 with an HTML body")
            && m.contains("an ingress or proxy answered, not the OAuth server")
            && m.contains("check the endpoint URL"),
        "{m}"
    );
    let proxy = classify(
        ProviderKind::Oidc,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: non_json(407, ErrorBody::Html, None),
        },
    );
    assert!(
        proxy.message().contains("HTTPS_PROXY"),
        "{}",
        proxy.message()
    );
    // The content type is shown cleaned and bounded, never anything of the body.
    let odd = classify(
        ProviderKind::Oidc,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: non_json(
                400,
                ErrorBody::Other {
                    content_type: Some(format!("text/x-\u{1b}[31m{}; charset=x", "a".repeat(500))),
                },
                None,
            ),
        },
    );
    let m = odd.message();
    assert!(
        !m.contains('\u{1b}') && !m.contains("charset") && m.len() < 800,
        "{m}"
    );
}

#[test]
fn a_long_run_of_answers_that_are_not_oauth_says_invalid_endpoint_and_keeps_retrying() {
    let class = || {
        classify(
            ProviderKind::Oidc,
            &TokenEndpointFailure {
                operation: TokenOperation::Refresh,
                cause: non_json(404, ErrorBody::Html, None),
            },
        )
    };
    for short in [
        None,
        Some(Duration::ZERO),
        Some(NOT_OAUTH_ESCALATION - Duration::from_secs(1)),
    ] {
        assert_eq!(after_long_run(class(), short), class(), "{short:?}");
    }
    let long = after_long_run(class(), Some(NOT_OAUTH_ESCALATION));
    assert!(!long.is_permanent());
    assert_eq!(long.reason(), Reason::NotAnOAuthAnswer);
    assert!(
        long.message()
            .starts_with("Likely InvalidEndpoint: refreshing has failed for 60 minutes")
            && long.message().contains(class().message()),
        "{}",
        long.message()
    );
    let huge = after_long_run(class(), Some(Duration::MAX));
    assert!(!huge.is_permanent());
    // Other transient failures and permanent ones are left alone.
    let timeout = classify(
        ProviderKind::Oidc,
        &TokenEndpointFailure {
            operation: TokenOperation::Refresh,
            cause: FailureCause::Timeout,
        },
    );
    assert_eq!(
        after_long_run(timeout.clone(), Some(Duration::MAX)),
        timeout
    );
}
