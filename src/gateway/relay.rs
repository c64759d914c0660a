//! Relaying an authenticated session: bytes both ways (tokio's `copy_bidirectional`), counted into
//! the metrics as they pass, until either side closes, the session has been idle for its limit,
//! or its credential vanished.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{
    metrics::{GatewayMetrics, ProtocolLabels, SessionLabels},
    session::{Authorized, Protocol, SessionLease},
};

/// Bytes buffered per direction. Small: `copy_bidirectional` allocates both buffers for the
/// session's whole life, and a gateway holds thousands of idle IMAP sessions (8 KiB a session here;
/// a message of megabytes still streams at memory speed in 4 KiB steps).
const BUFFER: usize = 4 * 1024;

/// A stream that counts what is read from it and notes when.
struct Metered<S> {
    inner: S,
    counter: Counter,
    started: Instant,
    /// Milliseconds from `started` of the last read, shared by both directions.
    last: Arc<AtomicU64>,
}

impl<S> Metered<S> {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut me.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            me.counter.inc_by(n as u64);
            me.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a relayed session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// One side closed (or failed).
    Closed,
    /// Nothing moved for the idle limit.
    Idle,
    /// The credential vanished.
    Revoked,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle",
            Self::Revoked => "revoked",
        }
    }
}

/// Relay between the app and the mail server. `to_upstream_first` (bytes the app sent after its
/// login, already read) and `to_app_first` (bytes the server sent after its authentication reply)
/// are delivered before anything else.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    to_upstream_first: &[u8],
    to_app_first: &[u8],
    protocol: Protocol,
    idle: Duration,
    lease: &SessionLease,
    metrics: &GatewayMetrics,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Metered {
        inner: client,
        counter: metrics.bytes_counter(protocol, "to_upstream"),
        started,
        last: last.clone(),
    };
    let mut upstream = Metered {
        inner: upstream,
        counter: metrics.bytes_counter(protocol, "to_app"),
        started,
        last: last.clone(),
    };
    if !to_upstream_first.is_empty() {
        client.counter.inc_by(to_upstream_first.len() as u64);
        if upstream.inner.write_all(to_upstream_first).await.is_err() {
            return End::Closed;
        }
    }
    if !to_app_first.is_empty() {
        upstream.counter.inc_by(to_app_first.len() as u64);
        if client.inner.write_all(to_app_first).await.is_err() {
            return End::Closed;
        }
    }
    let watchdog = async {
        loop {
            let last_ms = last.load(Ordering::Relaxed);
            let deadline = started
                .checked_add(Duration::from_millis(last_ms))
                .and_then(|t| t.checked_add(idle))
                .unwrap_or_else(Instant::now);
            tokio::time::sleep_until(deadline.into()).await;
            if last.load(Ordering::Relaxed) == last_ms {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER) => End::Closed,
        _ = watchdog => End::Idle,
        _ = lease.revoked() => End::Revoked,
    }
}

/// An open relayed session in the metrics (the gauge, the counter, the duration when dropped).
pub struct OpenSession {
    metrics: Arc<GatewayMetrics>,
    labels: SessionLabels,
    protocol: Protocol,
    started: Instant,
}

impl OpenSession {
    pub fn new(metrics: Arc<GatewayMetrics>, protocol: Protocol, who: &Authorized) -> Self {
        let labels = SessionLabels {
            protocol: protocol.name().into(),
            app: who.app.to_string(),
        };
        metrics.sessions.get_or_create(&labels).inc();
        metrics.sessions_total.get_or_create(&labels).inc();
        Self {
            metrics,
            labels,
            protocol,
            started: Instant::now(),
        }
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.metrics.sessions.get_or_create(&self.labels).dec();
        self.metrics
            .session_duration
            .get_or_create(&ProtocolLabels {
                protocol: self.protocol.name().into(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test]
    async fn bytes_pass_both_ways_are_counted_and_idle_sessions_end() {
        let metrics = GatewayMetrics::default();
        let (app, app_side) = duplex(1024);
        let (server, server_side) = duplex(1024);
        let lease = SessionLease::detached();
        let (mut app, mut server) = (app, server);
        let relaying = relay(
            app_side,
            server_side,
            b"A1 NOOP\r\n",
            b"* OK hi\r\n",
            Protocol::Imap,
            Duration::from_millis(300),
            &lease,
            &metrics,
        );
        let talk = async {
            let mut buf = [0u8; 9];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"A1 NOOP\r\n");
            app.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"* OK hi\r\n");
            app.write_all(b"xy").await.unwrap();
            let mut two = [0u8; 2];
            server.read_exact(&mut two).await.unwrap();
            (app, server)
        };
        let (end, _keep) = tokio::join!(relaying, talk);
        assert_eq!(end, End::Idle);
        let text = metrics.encode();
        assert!(
            text.contains(r#"relayed_bytes_total{protocol="IMAP",direction="to_upstream"} 11"#),
            "{text}"
        );
    }
}
