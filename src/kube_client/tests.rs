//! The layer against a scripted API server (a tower service answering from a list): turns,
//! retries after 429 + Retry-After, the bounds, and the metrics. Real time: the waits are ~1 s.

use super::*;
use axum::body::Bytes;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

// Every test runs on virtual time (`start_paused`): the delays they measure are the layer's own,
// not the machine's load.

/// What the fake server saw: when each request came and its body.
type Seen = Arc<Mutex<Vec<(Instant, Bytes)>>>;

/// A server answering with `script`'s statuses in order (200 once it is empty), each 429 with
/// `Retry-After: 1`.
fn server(
    script: &[u16],
) -> (
    impl Service<
        Request<Body>,
        Response = Response<String>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + 'static,
    Seen,
) {
    let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let (script, seen) = (script.clone(), s.clone());
        async move {
            let at = Instant::now();
            let body = req.into_body().collect_bytes().await?;
            seen.lock().unwrap().push((at, body));
            let status = script.lock().unwrap().pop_front().unwrap_or(200);
            let mut resp = Response::builder().status(status);
            if status == 429 {
                resp = resp.header("Retry-After", "1");
            }
            Ok::<_, BoxError>(resp.body(String::new()).unwrap())
        }
    });
    (svc, seen)
}

fn put(body: &'static str) -> Request<Body> {
    let mut req = Request::put("/api/v1/namespaces/a/secrets/b")
        .body(Body::from(Bytes::from_static(body.as_bytes())))
        .unwrap();
    req.extensions_mut().insert("replace");
    req
}

#[tokio::test(start_paused = true)]
async fn a_429_is_sent_again_after_its_retry_after_with_the_same_body_and_halves_the_limit() {
    let metrics = ApiMetrics::default();
    let (inner, seen) = server(&[429]);
    let mut svc = GovernedLayer::new(Settings::adaptive(None), metrics.clone()).layer(inner);
    assert_eq!(metrics.limit.get(), 100.0);
    let resp = svc.ready().await.unwrap().call(put("grant")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one 429, one retry");
    assert_eq!(seen[0].1, seen[1].1, "the retry sends the same body");
    assert_eq!(&seen[1].1[..], b"grant");
    let waited = seen[1].0 - seen[0].0;
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1500),
        "Retry-After: 1 (stretched by up to 20 %): waited {waited:?}"
    );
    assert_eq!(metrics.throttled.get(), 1);
    assert_eq!(metrics.retries.get(), 1);
    assert_eq!(metrics.limit.get(), 50.0, "halved on the 429");
    assert_eq!(
        metrics
            .decreases
            .get_or_create(&SignalLabels {
                signal: "throttled".into()
            })
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_refused_again_and_again_gets_the_answer_within_the_bounds() {
    let metrics = ApiMetrics::default();
    // 503s without Retry-After: the backoff only (200 ms doubling), `retries` of them.
    let (inner, seen) = server(&[503; 20]);
    let settings = Settings {
        retries: 3,
        ..Settings::fixed(None)
    };
    let mut svc = GovernedLayer::new(settings, metrics.clone()).layer(inner);
    let started = Instant::now();
    let resp = svc.ready().await.unwrap().call(put("x")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let attempts = seen.lock().unwrap().len();
    assert_eq!(attempts, 4);
    assert_eq!(metrics.retries.get(), 3);
    assert_eq!(metrics.throttled.get(), 0);
    // 0.2 + 0.4 + 0.8 s (±20 %).
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(1100) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    // Nothing adapts without the adaptive mode: the gauge says "no limit".
    assert_eq!(metrics.limit.get(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn answers_other_than_429_503_504_are_not_sent_again() {
    for status in [400u16, 401, 403, 404, 409, 410, 422, 500, 502] {
        let metrics = ApiMetrics::default();
        let (inner, seen) = server(&[status]);
        let mut svc = GovernedLayer::new(Settings::adaptive(None), metrics.clone()).layer(inner);
        let resp = svc.ready().await.unwrap().call(put("x")).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(seen.lock().unwrap().len(), 1, "{status} was sent again");
        assert_eq!(metrics.limit.get(), 100.0, "{status} changed the limit");
    }
}

#[tokio::test(start_paused = true)]
async fn requests_take_turns_at_the_cap() {
    let metrics = ApiMetrics::default();
    let (inner, seen) = server(&[]);
    let svc = GovernedLayer::new(Settings::fixed(Some(20.0)), metrics.clone()).layer(inner);
    let started = Instant::now();
    let calls = (0..22).map(|_| {
        let mut svc = svc.clone();
        async move { svc.ready().await.unwrap().call(put("x")).await.unwrap() }
    });
    futures::future::join_all(calls).await;
    // 20/s with 100 ms of burst: 3 at once (2 of burst and the one due), then one per 50 ms.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 22);
    assert_eq!(metrics.limit.get(), 20.0);
}

/// The answer times the limit judges are in `duration` (a slow write among them, past the 1 s
/// of `Settings::slow`); a list's is not (its size, not the server's load, sets it).
#[tokio::test(start_paused = true)]
async fn the_answer_times_the_limit_judges_are_in_the_duration_histogram() {
    use prometheus_client::encoding::text::encode;
    let metrics = ApiMetrics::default();
    let slow = tower::service_fn(|req: Request<Body>| async move {
        let wait = if req.method() == http::Method::PUT {
            1500
        } else {
            20
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        Ok::<_, BoxError>(Response::builder().body(String::new()).unwrap())
    });
    let mut svc = GovernedLayer::new(Settings::adaptive(None), metrics.clone()).layer(slow);
    svc.ready().await.unwrap().call(put("x")).await.unwrap();
    let mut list = Request::get("/api/v1/namespaces/a/secrets")
        .body(Body::empty())
        .unwrap();
    list.extensions_mut().insert("list");
    svc.ready().await.unwrap().call(list).await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("kube_api_request_duration_seconds_count 1\n"),
        "one timed answer (the write), not the list:\n{text}"
    );
    assert!(
        text.contains("kube_api_request_duration_seconds_bucket{le=\"1.0\"} 0\n")
            && text.contains("kube_api_request_duration_seconds_bucket{le=\"2.0\"} 1\n"),
        "the write took 1.5 s:\n{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_time_requests_wait_for_their_turn_is_counted() {
    let metrics = ApiMetrics::default();
    let (inner, seen) = server(&[]);
    // A fixed 10 requests/s: 100 ms apart, with a burst of 100 ms (one request early).
    let svc = GovernedLayer::new(Settings::fixed(Some(10.0)), metrics.clone()).layer(inner);
    let sent: Vec<_> = (0..6)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { svc.ready().await.unwrap().call(put("x")).await.unwrap() })
        })
        .collect();
    for s in sent {
        s.await.unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), 6);
    // The first two go at once (the burst), the others 100, 200, 300 and 400 ms later.
    let waited = metrics.waited.get();
    assert!(
        (waited - 1.0).abs() < 0.01,
        "waits of 0.1 + 0.2 + 0.3 + 0.4 s, counted {waited}"
    );
}
