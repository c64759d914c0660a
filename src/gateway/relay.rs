//! Relaying an authenticated session: bytes both ways, counted into the metrics as they pass,
//! until either side closes, the session has been idle for its limit, or its credential vanished.
//!
//! Not tokio's `copy_bidirectional`: it keeps a buffer per direction for the session's whole life,
//! and a gateway holds thousands of idle IMAP sessions. Here a read goes into a buffer on the
//! stack of the poll that makes it, and is written on at once; only what the other side does not
//! take at once is kept (on the heap) until it does. An idle session holds no relay buffer.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{
    logout::LogoutWatch,
    metrics::{GatewayMetrics, ProtocolLabels, SessionLabels},
    session::{Authorized, Protocol, SessionLease},
};

/// The most one read takes (a TLS record's plaintext is at most 16 KiB). On the poll's stack,
/// never kept.
const READ_SIZE: usize = 16 * 1024;

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
    /// The app sent a LOGOUT the gateway answers itself ([`super::logout`]): not forwarded; the
    /// caller answers the app and closes the server's session.
    LoggedOut,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle",
            Self::Revoked => "revoked",
            Self::LoggedOut => "logout",
        }
    }
}

/// Relay between the app and the mail server. `to_upstream_first` (bytes the app sent after its
/// login, already read) and `to_app_first` (bytes the server sent after its authentication reply)
/// are delivered before anything else. With `watch` (IMAP), the bytes passing both ways are
/// followed and a LOGOUT it takes ends the relay ([`End::LoggedOut`]); the watch must have seen
/// what the two `first` carry beyond the login reply.
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
    watch: Option<&mut LogoutWatch>,
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
        finish = Bidirectional::new(&mut client, &mut upstream, watch) => match finish {
            Ok(Finish::LoggedOut) => End::LoggedOut,
            _ => End::Closed,
        },
        _ = watchdog => End::Idle,
        _ = lease.revoked() => End::Revoked,
    }
}

/// One direction of the relay: what was read and not yet written, and how far it got.
#[derive(Default)]
struct Direction {
    /// Read from the source, not yet taken by the destination (empty, no allocation, while idle).
    pending: Vec<u8>,
    written: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The source ended: shut the destination's writing down, then this direction is done.
    eof: bool,
    done: bool,
    /// A read was taken by the inspection (not forwarded): the relay ends.
    taken: bool,
}

impl Direction {
    /// Move bytes from `from` to `to` until `from` has nothing now (`Pending`) or ended and `to`
    /// is shut down (`Ready(Ok)`), or either failed. Each read is shown to `inspect` first; if it
    /// takes it (`true`), it is not written and the direction stops (`taken`, `Ready(Ok)`).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        inspect: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while let Some(rest) = self.pending.get(self.written..).filter(|r| !r.is_empty()) {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, rest))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written = self.written.saturating_add(n);
                self.unflushed = true;
            }
            // Written out: give the memory back.
            self.pending = Vec::new();
            self.written = 0;
            if self.eof {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *from).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let mut data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            if inspect(data) {
                self.taken = true;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            while !data.is_empty() {
                match Pin::new(&mut *to).poll_write(cx, data) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        data = data.get(n..).unwrap_or_default();
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The destination is full: keep the rest until it takes it.
                        self.pending = data.to_vec();
                        self.written = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// How [`Bidirectional`] ended.
enum Finish {
    /// Both directions ended.
    Closed,
    /// The watch took a LOGOUT.
    LoggedOut,
}

/// Both directions at once, until both ended (each side's end shuts the other's writing down,
/// as `copy_bidirectional` does) or one failed, or the watch took a LOGOUT.
struct Bidirectional<'a, 'w, C, U> {
    client: &'a mut C,
    upstream: &'a mut U,
    to_upstream: Direction,
    to_app: Direction,
    watch: Option<&'w mut LogoutWatch>,
}

impl<'a, 'w, C, U> Bidirectional<'a, 'w, C, U> {
    fn new(client: &'a mut C, upstream: &'a mut U, watch: Option<&'w mut LogoutWatch>) -> Self {
        Self {
            client,
            upstream,
            to_upstream: Direction::default(),
            to_app: Direction::default(),
            watch,
        }
    }
}

impl<C, U> std::future::Future for Bidirectional<'_, '_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<Finish>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Finish>> {
        let me = self.get_mut();
        // Nothing of the server's is waiting to be written to the app (checked before the app's
        // read is looked at; the other direction is not polled in between).
        let to_app_idle = me.to_app.pending.is_empty();
        let up = match me.watch.as_deref_mut() {
            Some(watch) => {
                me.to_upstream
                    .poll_copy(cx, &mut *me.client, &mut *me.upstream, &mut |chunk| {
                        watch.app_chunk(chunk, to_app_idle)
                    })?
            }
            None => {
                me.to_upstream
                    .poll_copy(cx, &mut *me.client, &mut *me.upstream, &mut |_| false)?
            }
        };
        if me.to_upstream.taken {
            return Poll::Ready(Ok(Finish::LoggedOut));
        }
        let down = match me.watch.as_deref_mut() {
            Some(watch) => {
                me.to_app
                    .poll_copy(cx, &mut *me.upstream, &mut *me.client, &mut |chunk| {
                        watch.from_server(chunk);
                        false
                    })?
            }
            None => me
                .to_app
                .poll_copy(cx, &mut *me.upstream, &mut *me.client, &mut |_| false)?,
        };
        match (up, down) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(Finish::Closed)),
            _ => Poll::Pending,
        }
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
            None,
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

    #[tokio::test]
    async fn a_logout_the_watch_takes_is_not_forwarded_and_ends_the_relay() {
        let metrics = GatewayMetrics::default();
        let (mut app, app_side) = duplex(1024);
        let (mut server, server_side) = duplex(1024);
        let lease = SessionLease::detached();
        let mut watch = LogoutWatch::new();
        let relaying = relay(
            app_side,
            server_side,
            b"",
            b"",
            Protocol::Imap,
            Duration::from_secs(30),
            &lease,
            &metrics,
            Some(&mut watch),
        );
        let talk = async {
            app.write_all(b"a1 NOOP\r\n").await.unwrap();
            let mut buf = [0u8; 9];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"a1 NOOP\r\n");
            server.write_all(b"a1 OK NOOP\r\n").await.unwrap();
            let mut answer = [0u8; 12];
            app.read_exact(&mut answer).await.unwrap();
            app.write_all(b"a2 LOGOUT\r\n").await.unwrap();
            (app, server)
        };
        let (end, (_app, mut server)) = tokio::join!(relaying, talk);
        assert_eq!(end, End::LoggedOut);
        assert_eq!(watch.answered(), Some("a2"));
        let mut more = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), server.read(&mut more)).await;
        // Nothing more (the relay dropped its end here: end of stream, or nothing yet).
        assert!(
            !matches!(read, Ok(Ok(n)) if n > 0),
            "the LOGOUT was forwarded"
        );
    }

    #[tokio::test]
    async fn a_large_transfer_through_slow_narrow_pipes_arrives_whole_and_an_end_is_passed_on() {
        let metrics = GatewayMetrics::default();
        // 61-byte pipes: nearly every write is partial or pending, so the kept remainder is used.
        let (mut app, app_side) = duplex(61);
        let (mut server, server_side) = duplex(61);
        let lease = SessionLease::detached();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let relaying = relay(
            app_side,
            server_side,
            b"",
            b"",
            Protocol::Imap,
            Duration::from_secs(30),
            &lease,
            &metrics,
            None,
        );
        let talk = async {
            let send = async {
                app.write_all(&data).await.unwrap();
                app.shutdown().await.unwrap();
                let mut answer = Vec::new();
                app.read_to_end(&mut answer).await.unwrap();
                answer
            };
            let receive = async {
                let mut got = Vec::new();
                let mut chunk = [0u8; 7];
                loop {
                    let n = server.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    tokio::task::yield_now().await;
                }
                server.write_all(b"bye").await.unwrap();
                server.shutdown().await.unwrap();
                got
            };
            tokio::join!(send, receive)
        };
        let (end, (answer, got)) = tokio::join!(relaying, talk);
        assert_eq!(end, End::Closed);
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes arrived changed or out of order");
        assert_eq!(answer, b"bye");
    }
}
