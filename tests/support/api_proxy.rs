//! A fault-injecting HTTP proxy between a kube client (the operator process, or a test's client) and
//! the real kube-apiserver of a [`ControlPlane`].
//!
//! It listens on plain HTTP on 127.0.0.1 (kube-rs accepts an `http://` server in a kubeconfig: its
//! connector is `https_or_http`) and forwards over TLS to the apiserver. Request bodies are
//! buffered; response bodies are streamed chunk by chunk, so watches (long-lived chunked answers)
//! work through it. Headers pass through but for hop-by-hop ones and `Host`; `Authorization` too,
//! so a kubeconfig with a ServiceAccount's token is checked against that account's RBAC. A request
//! without `Authorization` is sent with the control plane's admin token.
//!
//! Rules, matched on method and path in the order they were added (first active match wins):
//! [`ApiProxy::hold`] keeps matching requests until [`HoldHandle::release`] forwards them or
//! [`HoldHandle::drop_held`] closes their connections unanswered; [`ApiProxy::fail`] answers with a
//! Kubernetes `Status`. [`ApiProxy::partition`] cuts every open connection (running watches
//! included) and closes each new one on arrival until [`ApiProxy::heal`]. Upgrades (exec,
//! port-forward) are not supported. A black hole (requests that never get an answer) is
//! `hold(Match::any())`.
//!
//! Like [`super::fault_proxy`], it runs on a thread of its own with its own tokio runtime, so it
//! outlives the test runtime that started it. The handle's methods are blocking and cheap (they take
//! a mutex); only [`HoldHandle::wait_held`] sleeps. Dropping the [`ApiProxy`] stops it and closes
//! its connections.

use super::control_plane::{ADMIN_TOKEN, ControlPlane, control_plane};
use axum::body::{Body, Bytes};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::{Notify, watch};

/// Which requests a rule applies to: a method (or `*` for any) and a path pattern.
#[derive(Clone, Debug)]
pub struct Match {
    method: Option<Method>,
    pattern: Pattern,
}

#[derive(Clone, Debug)]
enum Pattern {
    /// The path (query stripped) ends with this.
    Suffix(String),
    /// The path *with* its query contains this (so `"watch=true"` finds watches).
    Contains(String),
}

impl Match {
    /// `method` (`"PUT"`, … or `"*"`) and a path (query stripped) ending with `suffix`, e.g.
    /// `Match::suffix("PUT", "/secrets/inbox-oauth-grant")`.
    pub fn suffix(method: &str, suffix: &str) -> Match {
        Match {
            method: parse_method(method),
            pattern: Pattern::Suffix(suffix.to_owned()),
        }
    }
    /// `method` (or `"*"`) and a path-and-query containing `part`, e.g.
    /// `Match::contains("GET", "/secrets?")` (lists and watches of Secrets) or
    /// `Match::contains("GET", "watch=true")` (every watch).
    pub fn contains(method: &str, part: &str) -> Match {
        Match {
            method: parse_method(method),
            pattern: Pattern::Contains(part.to_owned()),
        }
    }
    /// Every request.
    pub fn any() -> Match {
        Match::contains("*", "")
    }

    fn matches(&self, method: &Method, path: &str, path_and_query: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && match &self.pattern {
                Pattern::Suffix(s) => path.ends_with(s.as_str()),
                Pattern::Contains(s) => path_and_query.contains(s.as_str()),
            }
    }
}

fn parse_method(method: &str) -> Option<Method> {
    (method != "*").then(|| {
        Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .unwrap_or_else(|e| panic!("not an HTTP method: {method:?}: {e}"))
    })
}

#[derive(Clone, Copy, Default)]
struct HoldState {
    released: bool,
    /// Incremented by each `drop_held`: requests held before it are cut.
    drops: u64,
}

struct HoldRule {
    state: watch::Sender<HoldState>,
    held: AtomicU32,
}

struct FailRule {
    status: u16,
    message: Option<String>,
    /// The `Retry-After` (seconds) of a 429 or 503 answer.
    retry_after: Option<u32>,
    /// `None`: forever.
    remaining: Mutex<Option<u32>>,
}

enum Action {
    Hold(HoldRule),
    Fail(FailRule),
    /// Forward after this long (a slow API server for these requests); removed by
    /// [`DelayHandle::remove`].
    Delay(Duration, std::sync::atomic::AtomicBool),
}

struct Rule {
    matcher: Match,
    action: Action,
    hits: AtomicU64,
}

impl Rule {
    /// Whether the rule still applies (a released hold or a used-up fail does not).
    fn active(&self) -> bool {
        match &self.action {
            Action::Hold(h) => !h.state.borrow().released,
            Action::Fail(f) => f.remaining.lock().unwrap().is_none_or(|n| n > 0),
            Action::Delay(_, removed) => !removed.load(Ordering::SeqCst),
        }
    }
}

#[derive(Default)]
struct Log {
    counts: HashMap<(String, String), u64>,
    /// (method, path without query, path with query), in arrival order.
    entries: Vec<(String, String, String)>,
}

struct Shared {
    upstream: String,
    rules: Mutex<Vec<Arc<Rule>>>,
    log: Mutex<Log>,
    /// `true` while partitioned; every connection task watches it.
    partitioned: watch::Sender<bool>,
    upstream_errors: AtomicU64,
}

/// Handle to a running proxy. Dropping it stops the proxy.
pub struct ApiProxy {
    url: String,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A hold rule added by [`ApiProxy::hold`]. Dropping the handle changes nothing: the rule stays until
/// [`Self::release`] or [`ApiProxy::clear`].
#[must_use = "without the handle the held requests can only be freed by ApiProxy::clear"]
pub struct HoldHandle {
    rule: Arc<Rule>,
    shared: Arc<Shared>,
}

/// A fail rule added by [`ApiProxy::fail`].
pub struct FailHandle {
    rule: Arc<Rule>,
}

/// A delay rule added by [`ApiProxy::delay`]; it stays until [`Self::remove`] or [`ApiProxy::clear`].
pub struct DelayHandle {
    rule: Arc<Rule>,
}

impl DelayHandle {
    /// Requests delayed so far.
    pub fn hits(&self) -> u64 {
        self.rule.hits.load(Ordering::SeqCst)
    }
    /// End the rule: later requests are forwarded at once (those waiting finish their wait).
    pub fn remove(&self) {
        if let Action::Delay(_, removed) = &self.rule.action {
            removed.store(true, Ordering::SeqCst);
        }
    }
}

impl ApiProxy {
    /// A proxy in front of the shared [`control_plane()`] of this test binary.
    pub fn start() -> ApiProxy {
        ApiProxy::start_for(control_plane())
    }

    /// A proxy in front of `cp` (e.g. a dedicated control plane). It keeps forwarding to the same
    /// address when that apiserver is stopped and started again; while it is down, requests are
    /// answered by closing their connection.
    pub fn start_for(cp: &ControlPlane) -> ApiProxy {
        let ca = std::fs::read(cp.ca_path()).expect("read the apiserver's certificate");
        let ca = reqwest::Certificate::from_pem(&ca).expect("the apiserver certificate is PEM");
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("upstream client");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            upstream: cp.server.trim_end_matches('/').to_owned(),
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Log::default()),
            partitioned: watch::channel(false).0,
            upstream_errors: AtomicU64::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        std::thread::Builder::new()
            .name("api-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("api proxy runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        _ = accept_loop(listener, state, http) => {}
                    }
                });
                // Dropping the runtime cancels every connection task: their sockets close.
            })
            .expect("spawn api proxy thread");
        ApiProxy {
            url,
            shared,
            shutdown: Some(tx),
        }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Write a kubeconfig pointing at the proxy, with the control plane's admin token.
    pub fn kubeconfig(&self, path: &Path) {
        self.kubeconfig_with_token(path, ADMIN_TOKEN)
    }

    /// Write a kubeconfig pointing at the proxy with another bearer token (it is passed through).
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: test\ncurrent-context: proxy\n",
            self.url
        );
        std::fs::write(path, yaml).expect("write kubeconfig");
    }

    /// An admin kube client through the proxy, for the calling test's runtime.
    pub async fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().expect("proxy URL"));
        config.auth_info.token = Some(ADMIN_TOKEN.to_owned().into());
        kube::Client::try_from(config).expect("kube client through the proxy")
    }

    /// Hold matching requests (not forwarded, not answered) until the handle releases or drops them.
    pub fn hold(&self, matcher: Match) -> HoldHandle {
        let rule = self.add(
            matcher,
            Action::Hold(HoldRule {
                state: watch::channel(HoldState::default()).0,
                held: AtomicU32::new(0),
            }),
        );
        HoldHandle {
            rule,
            shared: self.shared.clone(),
        }
    }

    /// Answer matching requests with a Kubernetes `Status` of `status` (reason from the code: 409
    /// Conflict, 422 Invalid, 500 InternalError, …) instead of forwarding them; `times`: only the
    /// next that many, `None`: until [`Self::clear`] or [`FailHandle::remove`].
    ///
    /// Mind that a kube-rs client (the operator's too) retries 429, 503 and 504 by itself
    /// (`Config::default_retry`: up to 15 retries, backoff from 5 ms doubling, `Retry-After` obeyed):
    /// a few of those never reach the caller, and `times: None` keeps one call busy for minutes.
    /// Other codes come back at once.
    pub fn fail(&self, matcher: Match, status: u16, times: Option<u32>) -> FailHandle {
        self.fail_with_message(matcher, status, times, None)
    }

    /// [`Self::fail`] with the `message` of the `Status` (else one like the apiserver's).
    pub fn fail_with_message(
        &self,
        matcher: Match,
        status: u16,
        times: Option<u32>,
        message: Option<&str>,
    ) -> FailHandle {
        self.fail_with(matcher, status, times, message, None)
    }

    /// [`Self::fail`] with `Retry-After: retry_after` seconds (a 429 of API Priority and
    /// Fairness, or a 503); a kube-rs client waits that long before each retry.
    pub fn fail_with_retry_after(
        &self,
        matcher: Match,
        status: u16,
        times: Option<u32>,
        retry_after: u32,
    ) -> FailHandle {
        self.fail_with(matcher, status, times, None, Some(retry_after))
    }

    fn fail_with(
        &self,
        matcher: Match,
        status: u16,
        times: Option<u32>,
        message: Option<&str>,
        retry_after: Option<u32>,
    ) -> FailHandle {
        StatusCode::from_u16(status).unwrap_or_else(|e| panic!("status {status}: {e}"));
        let rule = self.add(
            matcher,
            Action::Fail(FailRule {
                status,
                message: message.map(str::to_owned),
                retry_after,
                remaining: Mutex::new(times),
            }),
        );
        FailHandle { rule }
    }

    /// Forward matching requests only after `latency` (an API server slow to answer them), until
    /// [`DelayHandle::remove`] or [`Self::clear`]. The wait comes before the request reaches the
    /// API server: a client that gives up meanwhile changes nothing there.
    pub fn delay(&self, matcher: Match, latency: Duration) -> DelayHandle {
        let rule = self.add(
            matcher,
            Action::Delay(latency, std::sync::atomic::AtomicBool::new(false)),
        );
        DelayHandle { rule }
    }

    fn add(&self, matcher: Match, action: Action) -> Arc<Rule> {
        let rule = Arc::new(Rule {
            matcher,
            action,
            hits: AtomicU64::new(0),
        });
        self.shared.rules.lock().unwrap().push(rule.clone());
        rule
    }

    /// Remove every rule; requests held at that moment are forwarded.
    pub fn clear(&self) {
        let rules = std::mem::take(&mut *self.shared.rules.lock().unwrap());
        for rule in rules {
            if let Action::Hold(h) = &rule.action {
                h.state.send_modify(|s| s.released = true);
            }
        }
    }

    /// Cut every open connection (running watches, held and in-flight requests, idle keep-alive
    /// ones) and close each new connection unanswered, until [`Self::heal`].
    pub fn partition(&self) {
        self.shared.partitioned.send_replace(true);
    }
    pub fn heal(&self) {
        self.shared.partitioned.send_replace(false);
    }
    pub fn is_partitioned(&self) -> bool {
        *self.shared.partitioned.borrow()
    }

    /// Requests seen with `method` (or `"*"`) whose path (query stripped) contains `path_contains`.
    /// Counted on arrival, whatever then happened to them (forwarded, held, failed); connections
    /// closed by a partition carry no request and are not counted.
    pub fn count(&self, method: &str, path_contains: &str) -> u64 {
        let method = parse_method(method);
        self.shared
            .log
            .lock()
            .unwrap()
            .counts
            .iter()
            .filter(|((m, p), _)| {
                method.as_ref().is_none_or(|want| want.as_str() == m) && p.contains(path_contains)
            })
            .map(|(_, n)| n)
            .sum()
    }
    /// Requests per (method, path without query).
    pub fn counts(&self) -> HashMap<(String, String), u64> {
        self.shared.log.lock().unwrap().counts.clone()
    }
    /// Every request seen, in order: (method, path without query).
    pub fn requests_log(&self) -> Vec<(String, String)> {
        let log = self.shared.log.lock().unwrap();
        log.entries
            .iter()
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect()
    }
    /// Every request seen, in order: (method, path with query), e.g. to tell watches from lists.
    pub fn requests_log_with_query(&self) -> Vec<(String, String)> {
        let log = self.shared.log.lock().unwrap();
        log.entries
            .iter()
            .map(|(m, _, pq)| (m.clone(), pq.clone()))
            .collect()
    }
    /// The request log as text, one `METHOD /path?query` a line (for failure messages).
    pub fn requests_log_text(&self) -> String {
        self.requests_log_with_query()
            .iter()
            .map(|(m, p)| format!("{m} {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
    pub fn reset_counts(&self) {
        *self.shared.log.lock().unwrap() = Log::default();
    }
    /// Requests that could not be forwarded (the apiserver unreachable or its answer broken).
    pub fn upstream_errors(&self) -> u64 {
        self.shared.upstream_errors.load(Ordering::Relaxed)
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl HoldHandle {
    fn hold(&self) -> &HoldRule {
        match &self.rule.action {
            Action::Hold(h) => h,
            Action::Fail(_) | Action::Delay(..) => unreachable!("a HoldHandle holds a hold rule"),
        }
    }
    /// Requests held right now.
    pub fn held_count(&self) -> u32 {
        self.hold().held.load(Ordering::SeqCst)
    }
    /// Requests that matched the rule so far (held, released or dropped).
    pub fn hits(&self) -> u64 {
        self.rule.hits.load(Ordering::SeqCst)
    }
    /// Block until at least `n` requests are held; panics after `timeout` with the request log.
    /// From an async test, call it on a multi-thread runtime (it blocks the calling thread).
    pub fn wait_held(&self, n: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.held_count() < n {
            assert!(
                Instant::now() < deadline,
                "{} held request(s) after {timeout:?}, {n} expected (rule {:?}). Requests seen:\n{}",
                self.held_count(),
                self.rule.matcher,
                log_text(&self.shared)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Forward the held requests and every later match: the rule ends.
    pub fn release(&self) {
        self.hold().state.send_modify(|s| s.released = true);
        self.shared
            .rules
            .lock()
            .unwrap()
            .retain(|r| !Arc::ptr_eq(r, &self.rule));
    }
    /// Close the connections of the requests held now, without an answer. The rule stays: later
    /// matches are held again until [`Self::release`].
    pub fn drop_held(&self) {
        self.hold().state.send_modify(|s| s.drops += 1);
    }
}

impl FailHandle {
    /// Requests the rule answered so far.
    pub fn hits(&self) -> u64 {
        self.rule.hits.load(Ordering::SeqCst)
    }
    /// End the rule now (it ends by itself after `times` answers).
    pub fn remove(&self) {
        if let Action::Fail(f) = &self.rule.action {
            *f.remaining.lock().unwrap() = Some(0);
        }
    }
}

fn log_text(shared: &Shared) -> String {
    let log = shared.log.lock().unwrap();
    let lines: Vec<String> = log
        .entries
        .iter()
        .map(|(m, _, pq)| format!("{m} {pq}"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    http: reqwest::Client,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let mut partitioned = shared.partitioned.subscribe();
        if *partitioned.borrow_and_update() {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        let http = http.clone();
        tokio::spawn(async move {
            // Set by a request whose connection must close unanswered.
            let kill = Arc::new(Notify::new());
            let service = {
                let kill = kill.clone();
                hyper::service::service_fn(move |req| {
                    let (shared, http, kill) = (shared.clone(), http.clone(), kill.clone());
                    async move { handle(shared, http, kill, req).await }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
                _ = partitioned.wait_for(|p| *p) => {}
            }
            // Returning drops the connection: its socket closes, whatever was streaming.
        });
    }
}

/// Close the connection without an answer.
async fn cut(kill: &Notify) -> Result<Response<Body>, std::convert::Infallible> {
    kill.notify_one();
    std::future::pending().await
}

async fn handle(
    shared: Arc<Shared>,
    http: reqwest::Client,
    kill: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
    {
        let mut log = shared.log.lock().unwrap();
        *log.counts
            .entry((method.to_string(), path.clone()))
            .or_insert(0) += 1;
        log.entries
            .push((method.to_string(), path.clone(), path_and_query.clone()));
    }

    let rule = shared
        .rules
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.active() && r.matcher.matches(&method, &path, &path_and_query))
        .cloned();
    if let Some(rule) = rule {
        match &rule.action {
            Action::Fail(f) => {
                let applies = {
                    let mut remaining = f.remaining.lock().unwrap();
                    match remaining.as_mut() {
                        None => true,
                        Some(0) => false,
                        Some(n) => {
                            *n -= 1;
                            true
                        }
                    }
                };
                if applies {
                    rule.hits.fetch_add(1, Ordering::SeqCst);
                    return Ok(status_response(
                        f.status,
                        f.message.as_deref(),
                        f.retry_after,
                        &path,
                    ));
                }
            }
            Action::Delay(latency, _) => {
                rule.hits.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(*latency).await;
            }
            Action::Hold(h) => {
                rule.hits.fetch_add(1, Ordering::SeqCst);
                let mut state = h.state.subscribe();
                let drops_before = state.borrow_and_update().drops;
                h.held.fetch_add(1, Ordering::SeqCst);
                // Counts down however the wait ends, the client going away included.
                struct Held<'a>(&'a AtomicU32);
                impl Drop for Held<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let guard = Held(&h.held);
                let released = state
                    .wait_for(|s| s.released || s.drops != drops_before)
                    .await
                    .map(|s| s.released)
                    .unwrap_or(true);
                drop(guard);
                if !released {
                    return cut(&kill).await;
                }
            }
        }
    }

    match forward(&shared, &http, req).await {
        Ok(resp) => Ok(resp),
        Err(()) => {
            shared.upstream_errors.fetch_add(1, Ordering::Relaxed);
            cut(&kill).await
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
    "host",
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

async fn forward(
    shared: &Shared,
    http: &reqwest::Client,
    req: Request<Incoming>,
) -> Result<Response<Body>, ()> {
    let (parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let body: Bytes = axum::body::to_bytes(Body::new(body), 64 << 20)
        .await
        .map_err(|_| ())?;
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);
    headers.remove(header::CONTENT_LENGTH);
    if !headers.contains_key(header::AUTHORIZATION) {
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}")).unwrap(),
        );
    }
    let upstream = http
        .request(parts.method, format!("{}{path_and_query}", shared.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|_| ())?;
    let mut resp_headers = HeaderMap::new();
    copy_headers(upstream.headers(), &mut resp_headers);
    let status = upstream.status();
    // Chunk by chunk: a watch answer flows as the apiserver writes it. A broken upstream body breaks
    // the downstream one (hyper then closes the connection mid-body).
    let stream = futures::stream::unfold(upstream, |mut upstream| async move {
        match upstream.chunk().await {
            Ok(Some(chunk)) => Some((Ok::<_, std::io::Error>(chunk), upstream)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), upstream)),
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = resp_headers;
    Ok(resp)
}

/// The `reason` the apiserver gives with `code` (`metav1.StatusReason`).
pub fn status_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "",
    }
}

fn default_message(code: u16, path: &str) -> String {
    let (resource, name) = {
        let mut it = path.rsplit('/');
        let name = it.next().unwrap_or_default();
        (it.next().unwrap_or_default(), name)
    };
    match code {
        409 => format!(
            "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
        ),
        403 => format!("{resource} \"{name}\" is forbidden: injected by the test's ApiProxy"),
        404 => format!("{resource} \"{name}\" not found"),
        422 => format!("{resource} \"{name}\" is invalid: injected by the test's ApiProxy"),
        429 => "Too many requests, please try again later.".into(),
        _ => format!("{} (injected by the test's ApiProxy)", status_reason(code)),
    }
}

fn status_response(
    code: u16,
    message: Option<&str>,
    retry_after: Option<u32>,
    path: &str,
) -> Response<Body> {
    let message = message.map_or_else(|| default_message(code, path), str::to_owned);
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": status_reason(code),
        "code": code,
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).expect("checked when the rule was added");
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after.or((code == 429).then_some(1)) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    resp
}
