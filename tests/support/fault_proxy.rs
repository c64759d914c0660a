//! A provider stand-in for what no real server does on demand: a reverse proxy in front of the OAuth
//! server that counts requests per path and, when told to by the test, answers the token endpoint
//! with a fault instead of forwarding (Google's exact error bodies, 403 HTML under load, 429 with
//! Retry-After, 5xx, slow or broken answers).
//!
//! It runs on a thread of its own with its own tokio runtime, so a proxy shared by all tests of a
//! binary does not die with the runtime of the test that started it. The test steers it through the
//! [`FaultProxy`] handle; there is no control endpoint.
//!
//! Every refresh (`grant_type=refresh_token`) is recorded by a digest of the refresh token presented
//! ([`digest`], SHA-256 hex; the token itself is never kept), so a test can tell whether a refresh
//! token was presented twice ([`FaultProxy::reused_refresh_tokens`]). Token answers can be held back
//! after the upstream gave them ([`FaultProxy::hold_token_responses`]): the provider has rotated, the
//! operator has not heard of it yet — then kill the operator, or release or drop the answer.
//!
//! Forwarded requests keep their `Host` header, so oidc-provider builds the URLs of its discovery
//! document and redirects from the proxy's address; URLs in the discovery document that still point
//! at the upstream (other than `issuer`) are rewritten to the proxy as well.

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use sha2::{Digest as _, Sha256};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tokio::sync::{Notify, watch};

/// The token endpoint's path at oidc-provider (and what the proxy treats as the token endpoint).
pub const TOKEN_PATH: &str = "/token";

/// What the proxy does with a `POST /token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 with a JSON `server_error` body.
    InternalServerError,
    /// 503 with an HTML body.
    ServiceUnavailable,
    /// Wait this long, then forward to the upstream as usual.
    Slow(Duration),
    /// 429 with `Retry-After: N` (seconds) and a JSON body.
    RateLimited { retry_after_secs: u64 },
    /// 403 with Google's HTML error page (what Google answers under load).
    GoogleHtmlForbidden,
    /// 400 `invalid_grant` "Token has been expired or revoked." (Google).
    GoogleGrantRevoked,
    /// 400 `invalid_grant` with `error_subtype: invalid_rapt` (Google Workspace re-authentication).
    GoogleInvalidRapt,
    /// 401 `invalid_client` "The OAuth client was not found." (Google).
    GoogleInvalidClient,
    /// 400 `unauthorized_client` "Unauthorized" (Google).
    GoogleUnauthorizedClient,
    /// 400 `invalid_grant` with AADSTS700082 (Microsoft: refresh token expired from inactivity).
    MicrosoftGrantExpiredInactive,
    /// 200 with `application/json` that is not JSON (a broken answer).
    MalformedJson,
    /// Any canned answer.
    Canned {
        status: u16,
        content_type: String,
        headers: Vec<(String, String)>,
        body: String,
    },
}

const GOOGLE_403_HTML: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  \
<meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  \
<title>Error 403 (Forbidden)!!1</title>\n  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  \
<p><b>403.</b> <ins>That\u{2019}s an error.</ins>\n  \
<p>We're sorry, but you do not have access to this page. <ins>That\u{2019}s all we know.</ins>\n";

impl Fault {
    /// A Microsoft identity platform error body: `AADSTS{code}: {message}` plus the fields Entra ID sends.
    pub fn microsoft(status: u16, error: &str, aadsts: u32, message: &str) -> Fault {
        let body = serde_json::json!({
            "error": error,
            "error_description": format!(
                "AADSTS{aadsts}: {message} Trace ID: 00000000-0000-0000-0000-000000000001 \
                 Correlation ID: 00000000-0000-0000-0000-000000000002 Timestamp: 2025-01-01 00:00:00Z"
            ),
            "error_codes": [aadsts],
            "timestamp": "2025-01-01 00:00:00Z",
            "trace_id": "00000000-0000-0000-0000-000000000001",
            "correlation_id": "00000000-0000-0000-0000-000000000002",
            "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
        });
        Fault::Canned {
            status,
            content_type: "application/json; charset=utf-8".into(),
            headers: vec![],
            body: body.to_string(),
        }
    }

    /// A JSON error answer.
    pub fn json(status: u16, body: serde_json::Value) -> Fault {
        Fault::Canned {
            status,
            content_type: "application/json; charset=utf-8".into(),
            headers: vec![],
            body: body.to_string(),
        }
    }

    /// The canned answer, or `None` for faults that forward (`Slow`).
    fn answer(&self) -> Option<Fault> {
        use serde_json::json;
        Some(match self {
            Fault::Slow(_) => return None,
            Fault::Canned { .. } => self.clone(),
            Fault::InternalServerError => Fault::json(
                500,
                json!({"error": "server_error", "error_description": "Internal error (fault proxy)"}),
            ),
            Fault::ServiceUnavailable => Fault::Canned {
                status: 503,
                content_type: "text/html; charset=UTF-8".into(),
                headers: vec![],
                body: "<html><head><title>503 Service Unavailable</title></head><body><h1>Service Unavailable</h1></body></html>".into(),
            },
            Fault::RateLimited { retry_after_secs } => Fault::Canned {
                status: 429,
                content_type: "application/json; charset=utf-8".into(),
                headers: vec![("Retry-After".into(), retry_after_secs.to_string())],
                body: json!({"error": "rate_limit_exceeded", "error_description": "Rate Limit Exceeded"})
                    .to_string(),
            },
            Fault::GoogleHtmlForbidden => Fault::Canned {
                status: 403,
                content_type: "text/html; charset=UTF-8".into(),
                headers: vec![],
                body: GOOGLE_403_HTML.into(),
            },
            Fault::GoogleGrantRevoked => Fault::json(
                400,
                json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
            ),
            Fault::GoogleInvalidRapt => Fault::json(
                400,
                json!({
                    "error": "invalid_grant",
                    "error_description": "reauth related error (invalid_rapt)",
                    "error_uri": "https://support.google.com/a/answer/9368756",
                    "error_subtype": "invalid_rapt",
                }),
            ),
            Fault::GoogleInvalidClient => Fault::json(
                401,
                json!({"error": "invalid_client", "error_description": "The OAuth client was not found."}),
            ),
            Fault::GoogleUnauthorizedClient => Fault::json(
                400,
                json!({"error": "unauthorized_client", "error_description": "Unauthorized"}),
            ),
            Fault::MicrosoftGrantExpiredInactive => Fault::microsoft(
                400,
                "invalid_grant",
                700082,
                "The refresh token has expired due to inactivity. The token was issued on \
                 2024-06-01T00:00:00.0000000Z and was inactive for 90.00:00:00.",
            ),
            Fault::MalformedJson => Fault::Canned {
                status: 200,
                content_type: "application/json; charset=utf-8".into(),
                headers: vec![],
                body: "{\"access_token\": \"trunc".into(),
            },
        })
    }
}

/// The digest the proxy records for a refresh token: SHA-256, lowercase hex.
pub fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One refresh request seen at the token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presentation {
    /// [`digest`] of the refresh token presented.
    pub digest: String,
    /// When the request arrived.
    pub at: SystemTime,
    /// Whether it reached the upstream (not answered by a fault, upstream reachable).
    pub forwarded: bool,
    /// The upstream's status for it, when forwarded (200: accepted, 400: e.g. `invalid_grant`).
    pub upstream_status: Option<u16>,
}

#[derive(Default)]
struct Control {
    fault: Option<Fault>,
    /// `Some(n)`: the fault applies to the next `n` token requests, then the proxy forwards again.
    remaining: Option<u32>,
    counts: HashMap<String, u64>,
    faulted: u64,
    presentations: Vec<Presentation>,
    /// Answers of the next this many forwarded token requests are held back.
    hold_budget: u32,
    /// Answers held back now.
    held: u32,
}

/// Released and dropped batches of held token answers: a held answer waits for either to move.
#[derive(Clone, Copy, Default)]
struct HoldGen {
    released: u64,
    dropped: u64,
}

struct Shared {
    control: Mutex<Control>,
    hold: watch::Sender<HoldGen>,
    upstream: Mutex<String>,
    self_url: String,
}

/// Handle to a running proxy. Dropping it stops the proxy.
pub struct FaultProxy {
    url: String,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FaultProxy {
    /// Start a proxy on a free 127.0.0.1 port forwarding to `upstream` (e.g. `http://127.0.0.1:PORT`).
    /// `upstream` may be empty and set later with [`Self::set_upstream`] (to start the OAuth server
    /// with the proxy's URL as its issuer).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            control: Mutex::new(Control::default()),
            hold: watch::channel(HoldGen::default()).0,
            upstream: Mutex::new(upstream.trim_end_matches('/').to_owned()),
            self_url: url.clone(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fault proxy runtime");
                rt.block_on(async move {
                    let http = reqwest::Client::builder()
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                        .unwrap();
                    let app = Router::new().fallback(handle).with_state((state, http));
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        _ = serve(listener, app) => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks: their sockets close.
            })
            .expect("spawn fault proxy thread");
        FaultProxy {
            url,
            shared,
            shutdown: Some(tx),
        }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The proxy's token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.url)
    }
    pub fn set_upstream(&self, upstream: &str) {
        *self.shared.upstream.lock().unwrap() = upstream.trim_end_matches('/').to_owned();
    }

    /// Answer every token request with `fault` until [`Self::clear_fault`].
    pub fn set_fault(&self, fault: Fault) {
        let mut c = self.shared.control.lock().unwrap();
        c.fault = Some(fault);
        c.remaining = None;
    }
    /// Answer the next `n` token requests with `fault`, then forward again.
    pub fn set_fault_times(&self, fault: Fault, n: u32) {
        let mut c = self.shared.control.lock().unwrap();
        c.fault = (n > 0).then_some(fault);
        c.remaining = Some(n);
    }
    /// Forward everything again.
    pub fn clear_fault(&self) {
        let mut c = self.shared.control.lock().unwrap();
        c.fault = None;
        c.remaining = None;
    }
    pub fn fault(&self) -> Option<Fault> {
        self.shared.control.lock().unwrap().fault.clone()
    }

    /// Requests seen on `path` (any method, faulted or forwarded).
    pub fn requests(&self, path: &str) -> u64 {
        *self
            .shared
            .control
            .lock()
            .unwrap()
            .counts
            .get(path)
            .unwrap_or(&0)
    }
    /// `POST /token` requests seen, faulted or forwarded.
    pub fn token_requests(&self) -> u64 {
        self.requests(TOKEN_PATH)
    }
    /// Token requests the current fault applied to (`Slow` ones included).
    pub fn faulted_requests(&self) -> u64 {
        self.shared.control.lock().unwrap().faulted
    }
    /// Requests per path, all of them.
    pub fn counts(&self) -> HashMap<String, u64> {
        self.shared.control.lock().unwrap().counts.clone()
    }
    pub fn reset_counts(&self) {
        let mut c = self.shared.control.lock().unwrap();
        c.counts.clear();
        c.faulted = 0;
        c.presentations.clear();
    }

    /// Refresh requests (`POST /token` with `grant_type=refresh_token`) seen, faulted or forwarded.
    pub fn refresh_requests(&self) -> u64 {
        self.shared.control.lock().unwrap().presentations.len() as u64
    }
    /// How often each refresh token was presented, by [`digest`] (faulted requests included).
    pub fn presentations(&self) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for p in &self.shared.control.lock().unwrap().presentations {
            *out.entry(p.digest.clone()).or_insert(0) += 1;
        }
        out
    }
    /// Digests of the refresh tokens presented more than once (faulted requests included: a retry
    /// after a 5xx the proxy made up counts; see [`Self::reused_at_upstream`] for what the provider saw).
    pub fn reused_refresh_tokens(&self) -> Vec<String> {
        let mut reused: Vec<String> = self
            .presentations()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(d, _)| d)
            .collect();
        reused.sort();
        reused
    }
    /// Digests of the refresh tokens that reached the upstream more than once.
    pub fn reused_at_upstream(&self) -> Vec<String> {
        let mut counts: HashMap<&str, u32> = HashMap::new();
        let c = self.shared.control.lock().unwrap();
        for p in c.presentations.iter().filter(|p| p.forwarded) {
            *counts.entry(p.digest.as_str()).or_insert(0) += 1;
        }
        let mut reused: Vec<String> = counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(d, _)| d.to_owned())
            .collect();
        reused.sort();
        reused
    }
    /// Every refresh request seen, in order.
    pub fn presentation_log(&self) -> Vec<Presentation> {
        self.shared.control.lock().unwrap().presentations.clone()
    }

    /// Forward the next `n` token requests (any grant type) as usual, but hold their answers back
    /// from the client until [`Self::release_token_responses`] or [`Self::drop_token_responses`]:
    /// the upstream has answered (and rotated the refresh token) while the client still waits.
    /// `0` stops holding later answers (held ones stay held). Faulted requests are not held.
    pub fn hold_token_responses(&self, n: u32) {
        self.shared.control.lock().unwrap().hold_budget = n;
    }
    /// Send the answers held now.
    pub fn release_token_responses(&self) {
        self.shared.hold.send_modify(|g| g.released += 1);
    }
    /// Throw the answers held now away and close their connections without an answer.
    pub fn drop_token_responses(&self) {
        self.shared.hold.send_modify(|g| g.dropped += 1);
    }
    /// Token answers held back now (the upstream answered; the client waits).
    pub fn held_token_responses(&self) -> u32 {
        self.shared.control.lock().unwrap().held
    }
    /// Block until at least `n` answers are held; panics after `timeout`. From an async test, call it
    /// on a multi-thread runtime (it blocks the calling thread).
    pub fn wait_held_token_responses(&self, n: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.held_token_responses() < n {
            assert!(
                Instant::now() < deadline,
                "{} held token answer(s) after {timeout:?}, {n} expected; {} token requests seen",
                self.held_token_responses(),
                self.token_requests()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Set on each request: notify it to close the request's connection without an answer.
#[derive(Clone)]
struct ConnKill(Arc<Notify>);

/// Serve `app` on hyper directly (not `axum::serve`), so a handler can close its connection.
async fn serve(listener: tokio::net::TcpListener, app: Router) {
    use tower::ServiceExt as _;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let kill = Arc::new(Notify::new());
            let service = {
                let kill = kill.clone();
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnKill(kill.clone()));
                    app.clone().oneshot(req.map(Body::new))
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
            }
        });
    }
}

/// The refresh token of a `grant_type=refresh_token` form body.
fn presented_refresh_token(body: &[u8]) -> Option<String> {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    (form.get("grant_type").map(String::as_str) == Some("refresh_token"))
        .then(|| form.get("refresh_token").cloned().unwrap_or_default())
}

async fn handle(
    State((shared, http)): State<(Arc<Shared>, reqwest::Client)>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_owned();
    let is_token = req.method() == Method::POST && path == TOKEN_PATH;
    let kill = req.extensions().get::<ConnKill>().cloned();
    let (parts, body) = req.into_parts();
    let body: Bytes = match axum::body::to_bytes(body, 16 << 20).await {
        Ok(b) => b,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("fault proxy: body: {e}")),
    };
    let presented = if is_token {
        presented_refresh_token(&body)
    } else {
        None
    };

    let (fault, presentation) = {
        let mut c = shared.control.lock().unwrap();
        *c.counts.entry(path.clone()).or_insert(0) += 1;
        let presentation = presented.map(|token| {
            c.presentations.push(Presentation {
                digest: digest(&token),
                at: SystemTime::now(),
                forwarded: false,
                upstream_status: None,
            });
            c.presentations.len() - 1
        });
        let fault = if is_token { c.fault.clone() } else { None };
        if fault.is_some() {
            c.faulted += 1;
            if let Some(n) = c.remaining.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.fault = None;
                    c.remaining = None;
                }
            }
        }
        (fault, presentation)
    };

    if let Some(fault) = fault {
        match fault.answer() {
            Some(Fault::Canned {
                status,
                content_type,
                headers,
                body,
            }) => {
                let mut resp = Response::new(Body::from(body));
                *resp.status_mut() = StatusCode::from_u16(status).expect("valid status");
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_str(&content_type).unwrap(),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                for (k, v) in headers {
                    h.insert(
                        HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        HeaderValue::from_str(&v).unwrap(),
                    );
                }
                return resp;
            }
            Some(_) => unreachable!("answer() gives Canned"),
            None => {
                if let Fault::Slow(delay) = fault {
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    let (resp, upstream_status) = forward(&shared, &http, parts, body).await;
    let hold = {
        let mut c = shared.control.lock().unwrap();
        if let Some(i) = presentation
            && let Some(p) = c.presentations.get_mut(i)
        {
            p.forwarded = upstream_status.is_some();
            p.upstream_status = upstream_status;
        }
        let hold = is_token && upstream_status.is_some() && c.hold_budget > 0;
        if hold {
            c.hold_budget -= 1;
            c.held += 1;
        }
        hold
    };
    if !hold {
        return resp;
    }

    // Counts the held answer down however the wait ends (the client going away included).
    struct Held<'a>(&'a Shared);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.control.lock().unwrap().held -= 1;
        }
    }
    let mut gen_rx = shared.hold.subscribe();
    let before = *gen_rx.borrow_and_update();
    let guard = Held(&shared);
    let released = gen_rx
        .wait_for(|g| g.released != before.released || g.dropped != before.dropped)
        .await
        .map(|g| g.released != before.released)
        .unwrap_or(true);
    drop(guard);
    if released {
        return resp;
    }
    match kill {
        Some(ConnKill(kill)) => {
            kill.notify_one();
            std::future::pending().await
        }
        None => plain(
            StatusCode::BAD_GATEWAY,
            "fault proxy: answer dropped".into(),
        ),
    }
}

/// Forward to the upstream; the answer, and the upstream's status if it answered.
async fn forward(
    shared: &Shared,
    http: &reqwest::Client,
    parts: http::request::Parts,
    body: Bytes,
) -> (Response, Option<u16>) {
    let upstream = shared.upstream.lock().unwrap().clone();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);
    let sent = http
        .request(parts.method.clone(), format!("{upstream}{path_and_query}"))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream_resp = match sent {
        Ok(r) => r,
        Err(e) => {
            return (
                plain(
                    StatusCode::BAD_GATEWAY,
                    format!("fault proxy: upstream {upstream} unreachable: {e}"),
                ),
                None,
            );
        }
    };
    let status = upstream_resp.status();
    let mut resp_headers = HeaderMap::new();
    copy_headers(upstream_resp.headers(), &mut resp_headers);
    let mut bytes = match upstream_resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return (
                plain(
                    StatusCode::BAD_GATEWAY,
                    format!("fault proxy: upstream body: {e}"),
                ),
                None,
            );
        }
    };
    if parts.uri.path() == "/.well-known/openid-configuration"
        && status == StatusCode::OK
        && let Ok(serde_json::Value::Object(mut doc)) = serde_json::from_slice(&bytes)
    {
        for (key, value) in doc.iter_mut() {
            if key != "issuer"
                && let serde_json::Value::String(s) = value
                && let Some(rest) = s.strip_prefix(&upstream)
            {
                *s = format!("{}{rest}", shared.self_url);
            }
        }
        bytes = Bytes::from(serde_json::to_vec(&doc).unwrap());
    }
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    *resp.headers_mut() = resp_headers;
    (resp, Some(status.as_u16()))
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
