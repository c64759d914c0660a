//! The tower layer of [`super`]: turns, signals and retries around each request.

use super::{
    ApiMetrics, SignalLabels,
    limit::{self, Aimd, Change, Pacer, Settings, Signal},
};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service};
use tracing::{debug, info};

/// Wraps a (cloneable) Kubernetes client service in [`Governed`].
#[derive(Clone)]
pub struct GovernedLayer {
    shared: Arc<Shared>,
}

impl GovernedLayer {
    pub fn new(settings: Settings, metrics: ApiMetrics) -> Self {
        let now = Instant::now();
        metrics.limit.set(settings.start_limit().unwrap_or(0.0));
        GovernedLayer {
            shared: Arc::new(Shared {
                settings,
                metrics,
                state: Mutex::new(State {
                    aimd: settings.adaptive.then(|| Aimd::new(settings, now)),
                    pacer: Pacer::default(),
                }),
            }),
        }
    }
}

impl<S> Layer<S> for GovernedLayer {
    type Service = Governed<S>;
    fn layer(&self, inner: S) -> Governed<S> {
        Governed {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Each request waits for its turn, reports what its answer says of the API server's load, and is
/// sent again after a 429, 503 or 504 (see [`super`]).
#[derive(Clone)]
pub struct Governed<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    metrics: ApiMetrics,
    state: Mutex<State>,
}

struct State {
    /// `None`: a fixed limit (the cap) or none.
    aimd: Option<Aimd>,
    pacer: Pacer,
}

impl Shared {
    /// Waits until this request may go.
    async fn turn(&self) {
        let slot = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let rate = match &st.aimd {
                Some(a) => a.limit(),
                None => match self.settings.cap {
                    Some(cap) => cap,
                    None => return,
                },
            };
            let now = Instant::now();
            let slot = st.pacer.take(now, rate, self.settings.burst);
            if slot > now {
                self.metrics
                    .waited
                    .inc_by(slot.saturating_duration_since(now).as_secs_f64());
                if let Some(change) = st.aimd.as_mut().and_then(|a| a.held_back(now)) {
                    self.changed(change);
                }
            }
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    fn answered(&self, signal: Signal) {
        if signal == Signal::Throttled {
            self.metrics.throttled.inc();
        }
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(change) = st
            .aimd
            .as_mut()
            .and_then(|a| a.answered(Instant::now(), signal))
        {
            self.changed(change);
        }
    }

    fn changed(&self, change: Change) {
        match change {
            Change::Raised(limit) => {
                self.metrics.limit.set(limit);
                debug!(limit, "raised the Kubernetes API request limit");
            }
            Change::Lowered(limit, signal) => {
                self.metrics.limit.set(limit);
                let signal = match signal {
                    Signal::Throttled => "throttled",
                    Signal::Slow => "slow",
                    Signal::Prompt => "prompt",
                };
                self.metrics
                    .decreases
                    .get_or_create(&SignalLabels {
                        signal: signal.into(),
                    })
                    .inc();
                info!(
                    limit,
                    signal, "the Kubernetes API server is busy: halved the request limit"
                );
            }
        }
    }
}

impl<S, B> Service<Request<Body>> for Governed<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call readies its own clone of the inner service before using it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(send(self.inner.clone(), self.shared.clone(), req))
    }
}

/// Whether an answer's time says something of the server's load: not for lists (their size) and
/// watches (they answer at once and stream).
fn timed(method: &Method, verb: Option<&'static str>) -> bool {
    match verb {
        Some(v) => !(v.starts_with("list") || v.starts_with("watch")),
        None => method != Method::GET,
    }
}

async fn send<S, B>(
    mut inner: S,
    shared: Arc<Shared>,
    mut req: Request<Body>,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    let timed = timed(
        req.method(),
        req.extensions().get::<&'static str>().copied(),
    );
    let first = Instant::now();
    let mut retry = 0u32;
    loop {
        let again = clone_request(&req);
        shared.turn().await;
        let sent = Instant::now();
        futures::future::poll_fn(|cx| inner.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        let resp = inner.call(req).await.map_err(Into::into)?;
        let status = resp.status();
        let took = sent.elapsed();
        if timed {
            shared.metrics.duration.observe(took.as_secs_f64());
        }
        let signal = if status == StatusCode::TOO_MANY_REQUESTS {
            Signal::Throttled
        } else if timed && took > shared.settings.slow {
            Signal::Slow
        } else {
            Signal::Prompt
        };
        shared.answered(signal);
        if !matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        ) {
            return Ok(resp);
        }
        // A body that cannot be sent twice (kube sends none such) gets its answer as it is.
        let Some(next) = again else {
            return Ok(resp);
        };
        retry = retry.saturating_add(1);
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| limit::parse_retry_after(v.as_bytes()));
        let delay = limit::retry_delay(
            retry,
            retry_after,
            rand::random_range(0.8..1.2),
            rand::random_range(1.0..1.2),
        );
        let within_budget = Instant::now()
            .checked_add(delay)
            .zip(first.checked_add(limit::RETRY_BUDGET))
            .is_some_and(|(at, end)| at <= end);
        if retry > shared.settings.retries || !within_budget {
            return Ok(resp);
        }
        shared.metrics.retries.inc();
        debug!(
            status = status.as_u16(),
            retry,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "the Kubernetes API server refused a request for now; sending it again"
        );
        drop(resp);
        tokio::time::sleep(delay).await;
        req = next;
    }
}

/// The same request again, if its body can be sent twice (kube's bodies are bytes).
fn clone_request(req: &Request<Body>) -> Option<Request<Body>> {
    let body = req.body().try_clone()?;
    let mut new = Request::new(body);
    *new.method_mut() = req.method().clone();
    *new.uri_mut() = req.uri().clone();
    *new.version_mut() = req.version();
    *new.headers_mut() = req.headers().clone();
    *new.extensions_mut() = req.extensions().clone();
    Some(new)
}
