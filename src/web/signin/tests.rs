//! The sign-in server at the HTTP level, against an in-memory cluster: tickets, states, pages,
//! headers and the mapping of every failure to its page and report. (The whole flow against a real
//! API server, OAuth server and browser is in tests/sign_in_browser.rs.)

use super::*;
use crate::api::{MailIntegrationSpec, Prompt};
use crate::oauth::{self, TokenGrant};
use axum::body::Body;
use axum::http::Request;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use std::collections::HashMap;
use std::sync::Mutex;
use tower::ServiceExt as _;

const UID: &str = "6a0f4d1e-0000-4000-8000-000000000001";
const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-test-key";

#[derive(Default)]
struct FakeCluster {
    /// API reads (integrations and Secrets).
    reads: std::sync::atomic::AtomicUsize,
    integrations: Mutex<HashMap<(String, String), MailIntegration>>,
    secrets: Mutex<HashMap<(String, String), Secret>>,
    grants: Mutex<Vec<(String, String)>>,
    reports: Mutex<Vec<(String, Report)>>,
}

impl Backend for FakeCluster {
    fn integration<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<MailIntegration>, String>> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let v = self
            .integrations
            .lock()
            .unwrap()
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned();
        Box::pin(async move { Ok(v) })
    }

    fn secret<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<Secret>, String>> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let v = self
            .secrets
            .lock()
            .unwrap()
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned();
        Box::pin(async move { Ok(v) })
    }

    fn store_grant<'a>(
        &'a self,
        mi: &'a MailIntegration,
        _refresh_token: &'a SecretValue,
        _extra: Vec<(&'static str, String)>,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        self.grants
            .lock()
            .unwrap()
            .push((mi.namespace().unwrap(), mi.name_any()));
        Box::pin(async { Ok(()) })
    }

    fn report<'a>(
        &'a self,
        mi: &'a MailIntegration,
        report: Report,
    ) -> futures::future::BoxFuture<'a, ()> {
        self.reports.lock().unwrap().push((
            format!("{}/{}", mi.namespace().unwrap(), mi.name_any()),
            report,
        ));
        Box::pin(async {})
    }
}

fn integration(name: &str, uid: &str, address: &str, prompt: Option<&str>) -> MailIntegration {
    let spec: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
        "provider": "Google",
        "mailbox": {"address": address},
        "oauth": {"clientSecretRef": {"name": "gmail-client"}, "prompt": prompt},
        "tokenSecret": {"name": "token"},
    }))
    .unwrap();
    let mut mi = MailIntegration::new(name, spec);
    mi.metadata.namespace = Some("mail".into());
    mi.metadata.uid = Some(uid.into());
    mi.metadata.generation = Some(1);
    mi
}

struct Harness {
    cluster: Arc<FakeCluster>,
    server: SignIn,
    signer: Signer,
}

impl Harness {
    fn new(public_url: &str) -> Self {
        let cluster = Arc::new(FakeCluster::default());
        let mi = integration("inbox", UID, "Support@Example.com", Some("SelectAccount"));
        cluster
            .integrations
            .lock()
            .unwrap()
            .insert(("mail".into(), "inbox".into()), mi);
        let client = Secret {
            metadata: kube::api::ObjectMeta {
                namespace: Some("mail".into()),
                labels: Some(
                    [(crate::api::OAUTH_CLIENT_LABEL.to_owned(), "true".to_owned())].into(),
                ),
                ..Default::default()
            },
            data: Some(
                [
                    ("client_id".to_owned(), ByteString(b"the-client".to_vec())),
                    ("client_secret".to_owned(), ByteString(b"s3cret".to_vec())),
                ]
                .into(),
            ),
            ..Default::default()
        };
        cluster
            .secrets
            .lock()
            .unwrap()
            .insert(("mail".into(), "gmail-client".into()), client);
        let signer = Signer::new(KEY.to_vec()).unwrap();
        let oauth = OAuthClient::new().unwrap();
        let providers = ProviderResolver::new(oauth.http_client().clone());
        let server = SignIn::new(
            SignInConfig::new(parse_public_url(public_url).unwrap()),
            signer.clone(),
            cluster.clone(),
            oauth,
            providers,
        );
        Self {
            cluster,
            server,
            signer,
        }
    }

    fn mi(&self) -> MailIntegration {
        self.cluster.integrations.lock().unwrap()[&("mail".to_owned(), "inbox".to_owned())].clone()
    }

    fn ticket(&self) -> String {
        let link = self.server.link(&self.mi(), Timestamp::now()).unwrap();
        Url::parse(&link.url)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "ticket")
            .unwrap()
            .1
            .into_owned()
    }

    fn reports(&self) -> Vec<(String, Report)> {
        self.cluster.reports.lock().unwrap().clone()
    }

    fn last_reason(&self) -> Option<Reason> {
        self.reports().last().and_then(|(_, r)| match r {
            Report::Failed { reason, .. } => Some(*reason),
            Report::SignedIn { .. } => None,
        })
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let r = self.server.router().oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(&self, uri: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut b = Request::get(uri);
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        self.send(b.body(Body::empty()).unwrap()).await
    }

    /// POST the sign-in form; returns the redirect's URL and the cookie (`name=value`).
    async fn start(&self, prompt: &str, cookie: Option<&str>) -> (Url, String) {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("ticket", &self.ticket())
            .append_pair("prompt", prompt)
            .finish();
        let mut b = Request::post("/oauth2/start")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ORIGIN, "http://127.0.0.1:8080");
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        let (status, headers, body) = self.send(b.body(Body::from(body)).unwrap()).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
        let location = Url::parse(headers[header::LOCATION].to_str().unwrap()).unwrap();
        let set_cookie = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        (location, cookie)
    }
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn callback_uri(pairs: &[(&str, &str)]) -> String {
    let q = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("/oauth2/callback?{q}")
}

// ---------------------------------------------------------------------------------------------
// Tokens and the state store
// ---------------------------------------------------------------------------------------------

fn ticket_for(uid: &str, exp: i64) -> Ticket {
    Ticket {
        ns: "mail".into(),
        name: "inbox".into(),
        uid: uid.into(),
        exp,
        iat: 0,
    }
}

#[test]
fn tickets_verify_and_refuse_tampering_other_keys_and_other_purposes() {
    let signer = Signer::new(KEY.to_vec()).unwrap();
    let t = ticket_for(UID, 2_000_000_000);
    let token = signer.sign(TICKET, &t);
    assert_eq!(signer.verify::<Ticket>(TICKET, &token), Ok(t.clone()));

    // Another payload under the same signature (e.g. someone edits the name).
    let (_, sig) = token.split_once('.').unwrap();
    let other = signer.sign(
        TICKET,
        &Ticket {
            name: "other".into(),
            ..t.clone()
        },
    );
    let (other_payload, _) = other.split_once('.').unwrap();
    assert_eq!(
        signer.verify::<Ticket>(TICKET, &format!("{other_payload}.{sig}")),
        Err(token::TokenProblem::BadSignature)
    );
    // One character of the signature changed.
    let mut flipped = token.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    assert!(signer.verify::<Ticket>(TICKET, &flipped).is_err());
    // Another key.
    let other_key = Signer::new(vec![7u8; 32]).unwrap();
    assert_eq!(
        other_key.verify::<Ticket>(TICKET, &token),
        Err(token::TokenProblem::BadSignature)
    );
    // A ticket is not a state.
    assert_eq!(
        signer.verify::<Ticket>(STATE, &token),
        Err(token::TokenProblem::BadSignature)
    );
    assert_eq!(
        signer.verify::<Ticket>(TICKET, "no-dot"),
        Err(token::TokenProblem::Malformed)
    );
    assert!(
        Signer::new(vec![1u8; 16]).is_err(),
        "short keys are refused"
    );
    assert_eq!(format!("{signer:?}"), "Signer([redacted])");
}

#[test]
fn the_pkce_verifier_is_derived_from_the_key_and_state_id() {
    let a = Signer::new(KEY.to_vec()).unwrap();
    let b = Signer::new(vec![9u8; 32]).unwrap();
    let v = a.derive(PKCE, "state-1");
    assert_eq!(v.len(), 43, "RFC 7636: 43 to 128 characters");
    assert_eq!(v, a.derive(PKCE, "state-1"), "any replica derives the same");
    assert_ne!(v, a.derive(PKCE, "state-2"));
    assert_ne!(v, b.derive(PKCE, "state-1"));
}

#[test]
fn state_store_is_one_use_bounded_and_expires() {
    let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
    let rec = |exp: Timestamp| StateRecord {
        ns: "mail".into(),
        name: "inbox".into(),
        uid: UID.into(),
        expires: exp,
        used: false,
    };
    let later = now + SignedDuration::from_mins(15);
    let store = StateStore::with_capacity(2);
    store.insert("a", rec(later), now).unwrap();
    assert_eq!(store.consume("a", rec(later), now), Consumed::Pending);
    assert_eq!(store.consume("a", rec(later), now), Consumed::Used);
    assert_eq!(store.consume("b", rec(later), now), Consumed::Unknown);
    assert_eq!(store.consume("b", rec(later), now), Consumed::Used);
    // Full of live records: new sign-ins are refused rather than evicting (which would allow replay).
    assert_eq!(store.insert("c", rec(later), now), Err(store::Full));
    // Once they expire, there is room again.
    let after = later + SignedDuration::from_secs(1);
    store
        .insert("c", rec(after + SignedDuration::from_mins(15)), after)
        .unwrap();
    assert_eq!(store.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The sign-in page
// ---------------------------------------------------------------------------------------------

fn assert_security_headers(h: &HeaderMap) {
    assert_eq!(h[header::CACHE_CONTROL], "no-store");
    // The sign-in page's form must carry the operator's origin (`Origin: null` is refused).
    let referrer = h[header::REFERRER_POLICY].to_str().unwrap();
    assert!(
        matches!(referrer, "no-referrer" | "same-origin"),
        "{referrer}"
    );
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        csp.contains(&format!("style-src {}", *page::STYLE_HASH)),
        "{csp}"
    );
    assert!(!csp.contains("script-src"), "{csp}");
}

#[tokio::test]
async fn sign_in_page_shows_the_integration_and_preselects_the_prompt() {
    let h = Harness::new("http://127.0.0.1:8080");
    let (status, headers, body) = h
        .get(&format!("/sign-in?ticket={}", h.ticket()), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_security_headers(&headers);
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("form-action 'self' https://accounts.google.com;"),
        "{csp}"
    );
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    for text in [
        "mail/inbox",
        "Support@Example.com",
        "Sign in with Google",
        "No prompt",
        "Consent",
        "Select account",
        "<fieldset>",
        "<legend>How should Google ask?</legend>",
        "<label for=\"prompt-none\">",
        "<label for=\"prompt-consent\">",
        "<label for=\"prompt-selectaccount\">",
        "name=\"viewport\"",
        "action=\"/oauth2/start\"",
        "http://127.0.0.1:8080/oauth2/callback",
    ] {
        assert!(body.contains(text), "missing {text:?} in\n{body}");
    }
    assert!(body.contains(
        "value=\"SelectAccount\" aria-describedby=\"prompt-selectaccount-help\" checked>"
    ));
    assert_eq!(body.matches(" checked>").count(), 1);
    for forbidden in ["<script", "http://fonts", "https://fonts", "<img", "<link"] {
        assert!(!body.contains(forbidden), "{forbidden} in page");
    }
    assert!(h.reports().is_empty());
}

#[tokio::test]
async fn the_default_prompt_is_consent_and_names_are_escaped() {
    let h = Harness::new("http://127.0.0.1:8080");
    let evil = integration("inbox", UID, "<script>alert(1)</script>\"@x.test", None);
    h.cluster
        .integrations
        .lock()
        .unwrap()
        .insert(("mail".into(), "inbox".into()), evil);
    let (status, _, body) = h
        .get(&format!("/sign-in?ticket={}", h.ticket()), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("<script>"), "{body}");
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;@x.test"));
    assert!(body.contains("value=\"Consent\" aria-describedby=\"prompt-consent-help\" checked>"));
    assert_eq!(page::escape("a&b<'\">"), "a&amp;b&lt;&#39;&quot;&gt;");
}

#[tokio::test]
async fn ticket_failures_each_get_their_page_and_report() {
    let h = Harness::new("http://127.0.0.1:8080");
    let now = Timestamp::now().as_second();

    // Tampered: page, but no report (nothing trustworthy names the resource).
    let mut bad = h.ticket();
    bad.insert(3, 'x');
    let (status, headers, body) = h.get(&format!("/sign-in?ticket={bad}"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_security_headers(&headers);
    assert!(body.contains("This sign-in link is not valid") && body.contains("SignInLinkInvalid"));
    assert!(body.contains("kubectl get mailint"));
    assert!(h.reports().is_empty());

    // No ticket at all.
    let (status, _, body) = h.get("/sign-in", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("has no ticket"));

    // Expired: the page only, and no API read (signature and expiry come first).
    let reads = h.cluster.reads.load(std::sync::atomic::Ordering::Relaxed);
    let n = h.reports().len();
    let expired = h.signer.sign(TICKET, &ticket_for(UID, now - 5));
    let (status, _, body) = h.get(&format!("/sign-in?ticket={expired}"), None).await;
    assert_eq!(status, StatusCode::GONE);
    assert!(body.contains("This sign-in link has expired"), "{body}");
    assert_eq!(h.reports().len(), n);
    assert_eq!(
        h.cluster.reads.load(std::sync::atomic::Ordering::Relaxed),
        reads,
        "an expired ticket made an API read"
    );

    // Made for an earlier resource of the same name (other UID).
    let other = h.signer.sign(TICKET, &ticket_for("another-uid", now + 600));
    let (status, _, body) = h.get(&format!("/sign-in?ticket={other}"), None).await;
    assert_eq!(status, StatusCode::GONE);
    assert!(body.contains("for another MailIntegration"), "{body}");
    assert_eq!(h.last_reason(), Some(Reason::SignInLinkInvalid));

    // Unknown resource: page only.
    let n = h.reports().len();
    let unknown = h.signer.sign(
        TICKET,
        &Ticket {
            name: "gone".into(),
            ..ticket_for(UID, now + 600)
        },
    );
    let (status, _, body) = h.get(&format!("/sign-in?ticket={unknown}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("mail/gone does not exist"), "{body}");
    assert_eq!(h.reports().len(), n);

    let (status, headers, _) = h.get("/elsewhere", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_security_headers(&headers);
    assert!(h.cluster.grants.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Start: the redirect to the provider
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn start_redirects_to_the_provider_with_pkce_state_and_a_browser_cookie() {
    let h = Harness::new("http://127.0.0.1:8080");
    let (url, cookie) = h.start("None", None).await;
    assert_eq!(
        url.origin().ascii_serialization(),
        "https://accounts.google.com"
    );
    assert_eq!(url.path(), "/o/oauth2/v2/auth");
    assert_eq!(param(&url, "response_type").as_deref(), Some("code"));
    assert_eq!(param(&url, "client_id").as_deref(), Some("the-client"));
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some("http://127.0.0.1:8080/oauth2/callback")
    );
    assert_eq!(param(&url, "prompt").as_deref(), Some("none"));
    assert_eq!(param(&url, "access_type").as_deref(), Some("offline"));
    assert_eq!(
        param(&url, "login_hint").as_deref(),
        Some("Support@Example.com")
    );
    assert_eq!(
        param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    let scope = param(&url, "scope").unwrap();
    assert!(
        scope.contains("https://mail.google.com/")
            && scope.contains("openid")
            && scope.contains("email")
    );
    let state = param(&url, "state").unwrap();
    let claims: StateClaims = h.signer.verify(STATE, &state).unwrap();
    assert_eq!(
        (
            claims.ns.as_str(),
            claims.name.as_str(),
            claims.uid.as_str()
        ),
        ("mail", "inbox", UID)
    );
    assert_eq!(claims.p, "None");
    // The challenge is that of the verifier the callback derives.
    let verifier = SecretValue::new(h.signer.derive(PKCE, &claims.id));
    assert_eq!(
        param(&url, "code_challenge").unwrap(),
        oauth::pkce_challenge_s256(&verifier)
    );
    let nonce = cookie.strip_prefix("mio_signin=").unwrap();
    assert_eq!(claims.b, token::browser_binding(nonce));

    // The cookie's attributes (no Secure on http).
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ticket", &h.ticket())
        .append_pair("prompt", "Consent")
        .finish();
    let req = Request::post("/oauth2/start")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    let (_, headers, _) = h.send(req).await;
    let set = headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        set.contains("; Path=/oauth2;")
            && set.contains("; HttpOnly")
            && set.contains("; SameSite=Lax"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "{set}");
    assert_security_headers(&headers);

    // The same browser keeps its nonce for a second sign-in (two tabs do not undo each other).
    let (_, cookie2) = h.start("Consent", Some(&cookie)).await;
    assert_eq!(cookie2, cookie);
}

#[tokio::test]
async fn https_public_urls_get_secure_cookies_and_prefixed_paths() {
    let h = Harness::new("https://mail-operator.example.com/prefix/");
    let link = h.server.link(&h.mi(), Timestamp::now()).unwrap();
    assert!(
        link.url
            .starts_with("https://mail-operator.example.com/prefix/sign-in?ticket="),
        "{}",
        link.url
    );
    assert_eq!(
        h.server.callback_url(),
        "https://mail-operator.example.com/prefix/oauth2/callback"
    );
    let (status, _, body) = h
        .get(&format!("/prefix/sign-in?ticket={}", h.ticket()), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("action=\"/prefix/oauth2/start\""));
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ticket", &h.ticket())
        .finish();
    let req = Request::post("/prefix/oauth2/start")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ORIGIN, "https://mail-operator.example.com")
        .body(Body::from(form))
        .unwrap();
    let (status, headers, _) = h.send(req).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set = headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        set.contains("Path=/prefix/oauth2;") && set.ends_with("; Secure"),
        "{set}"
    );
    let location = Url::parse(headers[header::LOCATION].to_str().unwrap()).unwrap();
    assert_eq!(
        param(&location, "prompt").as_deref(),
        Some("select_account"),
        "the resource's default"
    );
}

#[tokio::test]
async fn a_form_posted_from_another_site_is_refused() {
    let h = Harness::new("http://127.0.0.1:8080");
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ticket", &h.ticket())
        .finish();
    let req = Request::post("/oauth2/start")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::from(form))
        .unwrap();
    let (status, headers, body) = h.send(req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!headers.contains_key(header::LOCATION));
    assert!(body.contains("did not start on the operator"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// The callback
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn state_is_one_use_bound_to_the_browser_and_expires() {
    let h = Harness::new("http://127.0.0.1:8080");
    let (url, cookie) = h.start("Consent", None).await;
    let state = param(&url, "state").unwrap();
    let denied = callback_uri(&[("state", &state), ("error", "access_denied")]);

    // Another browser (no cookie, or another nonce): refused, reported, and the state stays usable.
    let (status, _, body) = h.get(&denied, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("started in another browser"), "{body}");
    assert_eq!(h.last_reason(), Some(Reason::SignInBrowserMismatch));
    let other = format!("mio_signin={}", token::random_b64(32));
    h.get(&denied, Some(&other)).await;
    assert_eq!(h.last_reason(), Some(Reason::SignInBrowserMismatch));

    // The right browser: the provider's error is shown and reported.
    let (status, headers, body) = h.get(&denied, Some(&cookie)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_security_headers(&headers);
    assert!(body.contains("Access was not granted"), "{body}");
    assert_eq!(h.last_reason(), Some(Reason::SignInDenied));

    // Used once: a replay is refused.
    let (status, _, body) = h.get(&denied, Some(&cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("used already"), "{body}");
    assert_eq!(h.last_reason(), Some(Reason::SignInStateReused));

    // Tampered: refused; reported on the resource this replica issued the state for.
    let (url, cookie) = h.start("Consent", None).await;
    let mut tampered = param(&url, "state").unwrap();
    tampered.pop();
    tampered.push('A');
    tampered.pop();
    tampered.push('B');
    let (status, _, body) = h
        .get(
            &callback_uri(&[("state", &tampered), ("code", "c")]),
            Some(&cookie),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("does not match a sign-in"), "{body}");
    assert_eq!(h.last_reason(), Some(Reason::SignInStateInvalid));

    // Expired (a genuine state past its time).
    let nonce = cookie.strip_prefix("mio_signin=").unwrap();
    let old = h.signer.sign(
        STATE,
        &StateClaims {
            id: "old".into(),
            ns: "mail".into(),
            name: "inbox".into(),
            uid: UID.into(),
            exp: Timestamp::now().as_second() - 1,
            b: token::browser_binding(nonce),
            p: "Consent".into(),
            t: String::new(),
            c: String::new(),
        },
    );
    let (status, _, body) = h
        .get(
            &callback_uri(&[("state", &old), ("code", "c")]),
            Some(&cookie),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("took too long"), "{body}");
    assert_eq!(h.last_reason(), Some(Reason::SignInStateExpired));

    // No state at all: a page, nothing to report on.
    let n = h.reports().len();
    let (status, _, body) = h.get("/oauth2/callback?code=abc", Some(&cookie)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("no state"), "{body}");
    assert_eq!(h.reports().len(), n);
    assert!(
        h.cluster.grants.lock().unwrap().is_empty(),
        "no failure stores a grant"
    );
}

async fn callback_failure(
    prompt: &str,
    extra: &[(&str, &str)],
) -> (Harness, StatusCode, String, Option<Reason>, String) {
    let h = Harness::new("http://127.0.0.1:8080");
    let (url, cookie) = h.start(prompt, None).await;
    let state = param(&url, "state").unwrap();
    let mut pairs = vec![("state", state.as_str())];
    pairs.extend_from_slice(extra);
    let (status, _, body) = h.get(&callback_uri(&pairs), Some(&cookie)).await;
    let reason = h.last_reason();
    let message = match h.reports().last() {
        Some((_, Report::Failed { message, .. })) => message.clone(),
        _ => String::new(),
    };
    assert!(h.cluster.grants.lock().unwrap().is_empty());
    (h, status, body, reason, message)
}

#[tokio::test]
async fn provider_errors_map_to_pages_and_reasons_that_say_what_to_do() {
    let (_, status, body, reason, message) =
        callback_failure("None", &[("error", "interaction_required")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reason, Some(Reason::InteractionRequired));
    assert!(body.contains("&quot;No prompt&quot;"), "{body}");
    assert!(
        message.contains("choose \"Consent\" or \"Select account\""),
        "{message}"
    );

    for (error, want) in [
        ("login_required", Reason::LoginRequired),
        ("consent_required", Reason::ConsentRequired),
        ("account_selection_required", Reason::InteractionRequired),
        ("access_denied", Reason::SignInDenied),
        ("invalid_client", Reason::InvalidClient),
        ("temporarily_unavailable", Reason::ProviderUnavailable),
        ("invalid_request", Reason::SignInFailed),
    ] {
        let (_, _, body, reason, _) = callback_failure("None", &[("error", error)]).await;
        assert_eq!(reason, Some(want), "{error}");
        assert!(body.contains(want.as_str()), "{error}: {body}");
    }

    let (_, _, body, reason, message) = callback_failure(
        "Consent",
        &[
            ("error", "redirect_uri_mismatch"),
            ("error_description", "<b>bad</b>"),
        ],
    )
    .await;
    assert_eq!(reason, Some(Reason::RedirectURIMismatch));
    assert!(
        body.contains("<code id=\"copy\">http://127.0.0.1:8080/oauth2/callback</code>"),
        "{body}"
    );
    assert!(
        body.contains("&lt;b&gt;bad&lt;/b&gt;") && !body.contains("<b>bad"),
        "{body}"
    );
    assert!(
        message.contains("http://127.0.0.1:8080/oauth2/callback"),
        "{message}"
    );

    let (_, status, body, reason, _) = callback_failure("Consent", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reason, Some(Reason::AuthorizationCodeMissing));
    assert!(body.contains("no authorization code"), "{body}");

    // RFC 9207: an answer naming another issuer is not used, even with a code.
    let (_, _, body, reason, _) = callback_failure(
        "Consent",
        &[("code", "abc"), ("iss", "https://evil.example")],
    )
    .await;
    assert_eq!(reason, Some(Reason::IssuerMismatch));
    assert!(body.contains("another provider"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// What the token endpoint granted
// ---------------------------------------------------------------------------------------------

fn jwt(claims: serde_json::Value) -> SecretValue {
    use base64::Engine as _;
    let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    SecretValue::new(format!(
        "{}.{}.sig",
        b(br#"{"alg":"RS256"}"#),
        b(claims.to_string().as_bytes())
    ))
}

fn grant(
    refresh: Option<&str>,
    scopes: Option<&[&str]>,
    id_token: Option<SecretValue>,
) -> TokenGrant {
    TokenGrant {
        access_token: SecretValue::new("at"),
        token_type: "Bearer".into(),
        expires_at: Timestamp::now(),
        refresh_token: refresh.map(SecretValue::new),
        scopes: scopes.map(|s| s.iter().map(|x| x.to_string()).collect()),
        id_token,
        refresh_token_expires_at: None,
    }
}

#[test]
fn a_shared_mailbox_is_signed_in_to_by_its_delegate_and_only_by_them() {
    let mut mi = integration("shared", UID, "helpdesk@example.com", None);
    mi.spec.oauth.sign_in_account = Some("Alice@Example.com".into());
    let g = grant(Some("rt"), Some(&["https://mail.google.com/"]), None);
    let (_, account) = check_grant(&mi, &g, Some("alice@example.com"), None, "Google").unwrap();
    assert_eq!(account, "alice@example.com");
    // The mailbox itself is not the account that must sign in any more, nor is anyone else.
    for other in ["helpdesk@example.com", "bob@example.com"] {
        let err = check_grant(&mi, &g, Some(other), None, "Google").unwrap_err();
        assert_eq!(err.reason, Reason::AccountMismatch);
        assert!(err.todo.contains("Alice@Example.com"), "{}", err.todo);
    }
    assert_eq!(mi.spec.sign_in_account(), "Alice@Example.com");
    // Without the field, the mailbox signs in.
    mi.spec.oauth.sign_in_account = None;
    assert_eq!(mi.spec.sign_in_account(), "helpdesk@example.com");
}

#[test]
fn the_account_must_be_the_mailbox_and_a_refresh_token_and_the_scopes_are_needed() {
    let mi = integration("inbox", UID, "Support@Example.com", None);
    let endpoints = provider::google_endpoints();
    let scopes: &[&str] = &["https://mail.google.com/", "openid"];

    let g = grant(
        Some("rt"),
        Some(scopes),
        Some(jwt(
            serde_json::json!({"iss": "https://accounts.google.com", "email": "support@example.COM"}),
        )),
    );
    let account = account_from_id_token(&g, &endpoints, "Google").unwrap();
    let (rt, account) = check_grant(&mi, &g, account.as_deref(), None, "Google").unwrap();
    assert_eq!(
        (rt.expose(), account.as_str()),
        ("rt", "support@example.COM")
    );

    let err = check_grant(&mi, &g, Some("someone@else.test"), None, "Google").unwrap_err();
    assert_eq!(err.reason, Reason::AccountMismatch);
    assert!(err.what.contains("someone@else.test") && err.todo.contains("Select account"));

    let err = check_grant(
        &mi,
        &grant(None, Some(scopes), None),
        Some("support@example.com"),
        Some(Prompt::None),
        "Google",
    )
    .unwrap_err();
    assert_eq!(err.reason, Reason::NoRefreshToken);
    assert!(err.todo.contains("Consent"), "{}", err.todo);

    let err = check_grant(
        &mi,
        &grant(Some("rt"), Some(&["openid"]), None),
        Some("support@example.com"),
        None,
        "Google",
    )
    .unwrap_err();
    assert_eq!(err.reason, Reason::ScopeMissing);
    assert!(err.what.contains("https://mail.google.com/"));

    let err = check_grant(&mi, &grant(Some("rt"), None, None), None, None, "Google").unwrap_err();
    assert_eq!(err.reason, Reason::AccountUnknown);

    let other_iss = grant(
        Some("rt"),
        None,
        Some(jwt(
            serde_json::json!({"iss": "https://evil.example", "email": "support@example.com"}),
        )),
    );
    assert_eq!(
        account_from_id_token(&other_iss, &endpoints, "Google")
            .unwrap_err()
            .reason,
        Reason::IssuerMismatch
    );
    let unverified = grant(
        Some("rt"),
        None,
        Some(jwt(
            serde_json::json!({"email": "support@example.com", "email_verified": false}),
        )),
    );
    assert_eq!(
        account_from_id_token(&unverified, &endpoints, "Google")
            .unwrap_err()
            .reason,
        Reason::AccountUnknown
    );
    assert_eq!(
        account_from_id_token(&grant(Some("rt"), None, None), &endpoints, "Google"),
        Ok(None)
    );
}

/// What `provider_error` gets is the browser's query (`error`, `error_description`): no code, no
/// secret reaches it, so all it must do is keep that text to one bounded line. (That failed code
/// exchanges never carry the code, verifier or client secret is tested with real values in
/// src/oauth/tests.rs and tests/properties.rs, where the scrubbing happens.)
#[test]
fn provider_error_text_at_the_callback_is_one_bounded_line() {
    let f = failure::provider_error(
        "access_denied",
        Some("user\ncancelled"),
        Some(Prompt::Consent),
        "Google",
        "http://x/cb",
    );
    assert!(!f.message().contains('\n'));
    assert!(f.message().ends_with('.') || f.message().contains("Redirect URL"));
    let long = "x".repeat(1000);
    assert!(failure::clean(&long).chars().count() <= 301);
}

#[test]
fn controller_reports_the_last_sign_in_failure_while_sign_in_is_needed() {
    use crate::reconcile::decide::{Outcome, status_after};
    use crate::reconcile::observed::Observed;
    let mut mi = integration("inbox", UID, "support@example.com", None);
    let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
    mi.status = Some(crate::api::MailIntegrationStatus {
        last_sign_in_failure: Some(crate::api::SignInFailure {
            reason: "AccountMismatch".into(),
            message: "bob@example.com signed in, but this integration is for the mailbox support@example.com.".into(),
            time: Time(now),
            observed_generation: Some(1),
        }),
        ..Default::default()
    });
    let o = Observed {
        integration: &mi,
        client: Ok(ClientCredentials {
            signing_key: None,
            client_id: "id".into(),
            client_secret: SecretValue::new("cs"),

            owner: Default::default(),
        }),
        client_version: None,
        grant: None,
        token: None,
        conflict: None,
        now,
    };
    let link = Harness::new("http://127.0.0.1:8080")
        .server
        .link_for("mail", "inbox", UID, now);
    let s = status_after(&o, &Outcome::SignInRequired, Some(link));
    let authorized = crate::reconcile::decide::find_condition(&s, "Authorized").unwrap();
    assert_eq!(
        (authorized.status.as_str(), authorized.reason.as_str()),
        ("False", "AccountMismatch")
    );
    assert!(
        authorized.message.contains("bob@example.com")
            && authorized.message.contains("status.signIn.url"),
        "{}",
        authorized.message
    );
    assert_eq!(
        crate::reconcile::decide::find_condition(&s, "Ready")
            .unwrap()
            .reason,
        "AccountMismatch"
    );
    assert!(s.sign_in.is_some());

    // A failure from an older generation of the spec is dropped.
    let mut newer = mi.clone();
    newer.metadata.generation = Some(2);
    let o = Observed {
        integration: &newer,
        ..o
    };
    let s = status_after(&o, &Outcome::SignInRequired, None);
    assert!(s.last_sign_in_failure.is_none());
    assert_eq!(
        crate::reconcile::decide::find_condition(&s, "Authorized")
            .unwrap()
            .reason,
        "SignInRequired"
    );
}

#[test]
fn a_grant_only_a_new_sign_in_fixes_offers_the_link_too() {
    use crate::reconcile::decide::{Outcome, find_condition, needs_sign_in, status_after};
    use crate::reconcile::observed::{Grant, Observed};
    let mi = integration("inbox", UID, "support@example.com", None);
    let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
    let revoked = Outcome::PermanentFailure {
        reason: "GrantRevoked".into(),
        message: "Google rejected the refresh token. Sign in again.".into(),
    };
    assert!(needs_sign_in(&revoked, None));
    assert!(needs_sign_in(&Outcome::SignInRequired, None));
    assert!(!needs_sign_in(
        &Outcome::PermanentFailure {
            reason: "InvalidClient".into(),
            message: String::new()
        },
        None
    ));
    assert!(!needs_sign_in(&Outcome::Idle, None));
    let o = Observed {
        integration: &mi,
        client: Ok(ClientCredentials {
            signing_key: None,
            client_id: "id".into(),
            client_secret: SecretValue::new("cs"),

            owner: Default::default(),
        }),
        client_version: Some("1".into()),
        grant: Some(Grant {
            refresh_token: SecretValue::new("rt"),
            account: None,
            scopes: vec![],
            issued_at: None,
            refresh_token_expires_at: None,
            token_endpoint: None,
            client_id: None,
            revocation_endpoint: None,
            resource_version: Some("7".into()),
        }),
        token: None,
        conflict: None,
        now,
    };
    let link = Harness::new("http://127.0.0.1:8080")
        .server
        .link_for("mail", "inbox", UID, now);
    let s = status_after(&o, &revoked, Some(link.clone()));
    assert_eq!(s.sign_in.as_ref(), Some(&link));
    assert_eq!(
        find_condition(&s, "Authorized").unwrap().reason,
        "GrantRevoked"
    );
    assert_eq!(
        find_condition(&s, "Stalled").unwrap().reason,
        "GrantRevoked"
    );

    // The next reconcile holds the failure and keeps offering the link; a failed sign-in shows.
    let mut held = mi.clone();
    held.status = Some(s.clone());
    held.status.as_mut().unwrap().last_sign_in_failure = Some(crate::api::SignInFailure {
        reason: "AccountMismatch".into(),
        message: "bob@example.com signed in.".into(),
        time: Time(now),
        observed_generation: Some(1),
    });
    assert!(needs_sign_in(&Outcome::StillFailed, held.status.as_ref()));
    let o = Observed {
        integration: &held,
        ..o
    };
    let s = status_after(&o, &Outcome::StillFailed, Some(link));
    assert!(s.sign_in.is_some());
    assert_eq!(
        find_condition(&s, "Authorized").unwrap().reason,
        "AccountMismatch"
    );
    assert_eq!(
        find_condition(&s, "Stalled").unwrap().reason,
        "GrantRevoked"
    );
}

#[tokio::test]
async fn a_request_body_over_16_kib_is_refused_unread() {
    let h = Harness::new("http://127.0.0.1:8080");
    let body = format!(
        "ticket={}&prompt=Consent&pad={}",
        h.ticket(),
        "x".repeat(MAX_REQUEST_BODY)
    );
    let req = Request::post("/oauth2/start")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap();
    let (status, headers, _) = h.send(req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_security_headers(&headers);
    // The same form, small, is a sign-in.
    let (location, _) = h.start("Consent", None).await;
    assert!(
        location
            .as_str()
            .starts_with("https://accounts.google.com/")
    );
}

#[test]
fn the_id_token_must_be_for_this_client_fresh_verified_and_of_the_tenant() {
    let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
    let google = provider::google_endpoints();
    let ok = serde_json::json!({
        "iss": "https://accounts.google.com", "aud": "the-client", "exp": now.as_second() + 600,
        "email": "support@example.com", "email_verified": true,
    });
    let with = |patch: serde_json::Value| {
        let mut c = ok.clone();
        c.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        grant(Some("rt"), None, Some(jwt(c)))
    };
    assert!(
        check_id_token(
            &with(serde_json::json!({})),
            &google,
            "the-client",
            None,
            now
        )
        .is_ok()
    );
    let aud = with(serde_json::json!({"aud": ["other-client"]}));
    let f = check_id_token(&aud, &google, "the-client", None, now).unwrap_err();
    assert_eq!(f.reason, Reason::IssuerMismatch);
    assert!(f.what.contains("other-client"), "{}", f.what);
    let list = with(serde_json::json!({"aud": ["x", "the-client"]}));
    assert!(check_id_token(&list, &google, "the-client", None, now).is_ok());
    let old = with(serde_json::json!({"exp": now.as_second() - 3600}));
    assert_eq!(
        check_id_token(&old, &google, "the-client", None, now)
            .unwrap_err()
            .reason,
        Reason::AccountUnknown
    );
    let unverified = with(serde_json::json!({"email_verified": null}));
    assert_eq!(
        check_id_token(&unverified, &google, "the-client", None, now)
            .unwrap_err()
            .reason,
        Reason::AccountUnknown
    );
    let tenant = "11111111-2222-3333-4444-555555555555";
    let ms = provider::microsoft_endpoints(tenant).unwrap();
    let other_tid = with(serde_json::json!({"tid": "99999999-2222-3333-4444-555555555555"}));
    assert_eq!(
        check_id_token(&other_tid, &ms, "the-client", Some(tenant), now)
            .unwrap_err()
            .reason,
        Reason::AccountMismatch
    );
    let same_tid = with(serde_json::json!({"tid": tenant}));
    assert!(check_id_token(&same_tid, &ms, "the-client", Some(tenant), now).is_ok());
    // A tenant given by name (common, a domain) cannot be compared with a directory ID.
    assert!(check_id_token(&other_tid, &ms, "the-client", Some("common"), now).is_ok());
}

#[test]
fn an_announced_grant_end_is_recorded_and_read_back() {
    let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
    let ends: Timestamp = "2026-12-08T09:59:59Z".parse().unwrap();
    let keys = grant_record(
        "alice@example.com",
        "https://mail.google.com/".into(),
        "https://oauth2.googleapis.com/token",
        "client-1",
        now,
        Some(ends),
    );
    let mut secret = k8s_openapi::api::core::v1::Secret::default();
    let mut data: std::collections::BTreeMap<String, k8s_openapi::ByteString> = keys
        .into_iter()
        .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.into_bytes())))
        .collect();
    data.insert(
        "refresh_token".into(),
        k8s_openapi::ByteString(b"rt".to_vec()),
    );
    secret.data = Some(data);
    let g = crate::reconcile::observed::grant(Some(&secret)).unwrap();
    assert_eq!(g.issued_at, Some(now));
    assert_eq!(g.refresh_token_expires_at, Some(ends));
    let without = grant_record("a@b.c", String::new(), "https://t", "c", now, None);
    assert!(
        without
            .iter()
            .all(|(k, _)| *k != "refresh_token_expires_at")
    );
}

#[test]
fn a_microsoft_account_is_its_upn_and_its_object_id_is_kept() {
    let endpoints = provider::microsoft_endpoints("common").unwrap();
    // The mail attribute claims the mailbox; the user principal name says who it is.
    let g = grant(
        Some("rt"),
        None,
        Some(jwt(serde_json::json!({
            "email": "ceo@contoso.example",
            "preferred_username": "mallory@fabrikam.example",
            "tid": "11111111-1111-1111-1111-111111111111",
            "oid": "AAAAAAAA-0000-0000-0000-000000000001",
        }))),
    );
    assert_eq!(
        account_from_id_token(&g, &endpoints, "Microsoft")
            .unwrap()
            .as_deref(),
        Some("mallory@fabrikam.example")
    );
    let id = account_id(&g, &endpoints).unwrap();
    assert_eq!(
        id,
        "11111111-1111-1111-1111-111111111111/aaaaaaaa-0000-0000-0000-000000000001"
    );
    assert!(check_account_id(Some(&id), Some(&id)).is_ok());
    assert!(check_account_id(None, Some(&id)).is_ok());
    let err = check_account_id(Some("t/other"), Some(&id)).unwrap_err();
    assert_eq!(err.reason, Reason::AccountMismatch);
    // Without a UPN, the address claim; other providers keep theirs; no oid: nothing recorded.
    let no_upn = grant(
        Some("rt"),
        None,
        Some(jwt(serde_json::json!({"email": "a@contoso.example"}))),
    );
    assert_eq!(
        account_from_id_token(&no_upn, &endpoints, "Microsoft")
            .unwrap()
            .as_deref(),
        Some("a@contoso.example")
    );
    assert_eq!(account_id(&no_upn, &endpoints), None);
    assert_eq!(account_id(&g, &provider::google_endpoints()), None);
}
