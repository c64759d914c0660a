//! Serving a router with the limits `axum::serve` does not set.
//!
//! The sign-in port is reachable by anyone who can reach the Ingress. With `axum::serve`, a client
//! that opens connections and sends half a request head (or nothing) keeps each one, and its
//! buffers, forever. Here every connection holds a permit of a semaphore while it is served (the
//! rest wait in the kernel's listen backlog), hyper closes a connection whose request head has not
//! arrived within the header-read timeout (idle keep-alive connections included), a request
//! (reading its body included) must be answered within the request timeout, and the request head
//! and read buffer are bounded per connection. HTTP/1.1 only, as `axum::serve` was without axum's
//! `http2` feature.

use std::{sync::Arc, time::Duration};

use axum::{Router, http::StatusCode};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower_http::timeout::TimeoutLayer;

/// How much a server gives its clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Time a client has to send a whole request head, from the connection's start or the end of
    /// the previous response.
    pub header_read_timeout: Duration,
    /// Time a request may take, from its head to its answer (408 past it).
    pub request_timeout: Duration,
    /// Per-connection read buffer, which bounds the request head (431 past it). At least 8 KiB.
    pub max_buffer_bytes: usize,
}

impl Default for Limits {
    /// 512 connections of 64 KiB read buffers (32 MiB at most in all), 10 s for a request head,
    /// 60 s for a request (the sign-in callback exchanges the code within the 30 s provider
    /// timeout).
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_buffer_bytes: 64 * 1024,
        }
    }
}

/// hyper panics on a buffer below 8 KiB.
const MIN_BUFFER_BYTES: usize = 8 * 1024;
/// How long to wait after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// Serve `router` on `listener` within `limits`, until the process ends.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits) {
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let app = router.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buffer_bytes.max(MIN_BUFFER_BYTES));
    loop {
        // The semaphore is never closed; the permit is taken before accepting, so that clients
        // past the limit wait in the backlog instead of holding buffers here.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let service = WithPeer {
            inner: app.clone(),
            peer,
        };
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Header timeouts, resets, malformed requests: the client's doing.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// The router with the connection's peer address in every request's extensions (axum's
/// `ConnectInfo`), for the sign-in port's per-source limit.
#[derive(Clone)]
struct WithPeer<S> {
    inner: S,
    peer: std::net::SocketAddr,
}

impl<S, B> tower::Service<axum::http::Request<B>> for WithPeer<S>
where
    S: tower::Service<axum::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests;
