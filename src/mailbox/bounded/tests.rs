use super::*;
use crate::api::TlsMode;
use crate::mailbox::{CheckProtocol, CheckTarget, check};
use crate::secret::SecretValue;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

const TOKEN: &str = "ya29.bounded-check-token-0123456789abcdef";
/// Long enough that only the bound can end these checks in time.
// Generous: the bounds under test end a check in milliseconds; on a loaded machine the flooding
// server itself may be slow to be scheduled.
const TIMEOUT: Duration = Duration::from_secs(30);
/// What the server may write past what the client read before the client closes: its own send
/// buffer (set to 64 KiB below) and the client's receive buffer (128 KiB by Linux's default).
const SOCKET_SLACK: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The adapter alone
// ---------------------------------------------------------------------------------------------

/// Read everything `chunks` give, through a [`Bounded`] with `remaining` left.
async fn read_through(chunks: &[&[u8]], remaining: usize, imap: bool) -> io::Result<Vec<u8>> {
    let mut bounded = Bounded::with_remaining(Chunks::new(chunks), remaining);
    if imap {
        bounded = bounded.imap();
    }
    let mut out = Vec::new();
    bounded.read_to_end(&mut out).await?;
    Ok(out)
}

/// A reader that hands out one chunk per read, as TCP may split a literal announcement.
struct Chunks(std::collections::VecDeque<Vec<u8>>);

impl Chunks {
    fn new(chunks: &[&[u8]]) -> Self {
        Self(chunks.iter().map(|c| c.to_vec()).collect())
    }
}

impl AsyncRead for Chunks {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(mut chunk) = this.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                this.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn overrun(result: io::Result<Vec<u8>>) -> Overrun {
    let err = result.expect_err("the read is refused");
    *find(&err).expect("the error holds an Overrun")
}

#[tokio::test]
async fn the_budget_is_read_and_not_one_byte_more() {
    let data = vec![b'x'; 1000];
    assert_eq!(read_through(&[&data], 1000, false).await.unwrap(), data);
    assert_eq!(
        overrun(read_through(&[&data, b"y"], 1000, false).await),
        Overrun::Bytes {
            budget: SESSION_BUDGET
        }
    );
}

#[tokio::test]
async fn literals_within_the_budget_pass_and_larger_ones_are_refused_before_they_are_seen() {
    let small: &[u8] = b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n";
    assert_eq!(read_through(&[small], 1000, true).await.unwrap(), small);
    // Split across reads, as TCP may deliver it.
    let err = overrun(read_through(&[b"* 1 FETCH (BODY[] {5000", b"00000}\r\n"], 1000, true).await);
    assert_eq!(
        err,
        Overrun::Literal {
            size: 500_000_000,
            budget: SESSION_BUDGET
        }
    );
    // Digits past u64 saturate rather than wrap to something small.
    let huge = format!("* OK {{{}}}\r\n", "9".repeat(40));
    assert!(matches!(
        overrun(read_through(&[huge.as_bytes()], 1000, true).await),
        Overrun::Literal { size: u64::MAX, .. }
    ));
    // Without the IMAP guard (SMTP) braces are just text.
    assert!(
        read_through(&[b"250 {500000000}\r\n"], 1000, false)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn once_refused_every_later_read_is_refused() {
    let mut bounded = Bounded::with_remaining(Chunks::new(&[b"{999999}", b"more"]), 100).imap();
    let mut buf = [0u8; 64];
    assert!(bounded.read(&mut buf).await.is_err());
    assert!(bounded.read(&mut buf).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Hostile mail servers
// ---------------------------------------------------------------------------------------------

/// One step of a hostile server's script.
enum Step {
    Send(&'static [u8]),
    /// Read one line from the client (a command).
    ReadLine,
    /// `prefix`, then `filler` bytes forever, counting them.
    Flood {
        prefix: &'static [u8],
        filler: u8,
    },
}

struct Server {
    port: u16,
    flooded: Arc<AtomicU64>,
    closed: Arc<Notify>,
}

impl Server {
    async fn start(script: Vec<Step>) -> Self {
        // A small send buffer, so that what the server counts is close to what the client took.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4).unwrap();
        let port = listener.local_addr().unwrap().port();
        let flooded = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(Notify::new());
        let (f, c) = (flooded.clone(), closed.clone());
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            for step in script {
                match step {
                    Step::Send(bytes) => {
                        if stream.get_mut().write_all(bytes).await.is_err() {
                            break;
                        }
                    }
                    Step::ReadLine => {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            break;
                        }
                    }
                    Step::Flood { prefix, filler } => {
                        if stream.get_mut().write_all(prefix).await.is_err() {
                            break;
                        }
                        let block = [filler; 16 * 1024];
                        while stream.get_mut().write_all(&block).await.is_ok() {
                            f.fetch_add(block.len() as u64, Ordering::SeqCst);
                        }
                        break;
                    }
                }
            }
            c.notify_one();
        });
        Self {
            port,
            flooded,
            closed,
        }
    }

    /// Wait for the client to close, then give what the flood wrote.
    async fn flooded_when_closed(&self) -> u64 {
        tokio::time::timeout(TIMEOUT, self.closed.notified())
            .await
            .expect("the client closes the connection");
        self.flooded.load(Ordering::SeqCst)
    }
}

/// Check `protocol` against `server` over plain TCP on loopback; expect the bound's error.
async fn expect_refused(protocol: CheckProtocol, server: &Server, expected: &str) {
    let target = CheckTarget::new("127.0.0.1", server.port, protocol, "user@example.com")
        .with_tls(TlsMode::None)
        .with_timeout(TIMEOUT);
    let started = Instant::now();
    let err = check(&target, &SecretValue::new(TOKEN))
        .await
        .expect_err("the check fails");
    let elapsed = started.elapsed();
    assert_eq!(err.reason(), "MailboxUnreachable", "{protocol}: {err}");
    assert!(err.detail().contains(expected), "{protocol}: {err}");
    assert!(elapsed < TIMEOUT, "{protocol}: {elapsed:?}");
    assert!(!err.to_string().contains(TOKEN));
}

#[tokio::test]
async fn imap_literal_announced_larger_than_the_budget_is_refused_before_allocation() {
    // async-imap would resize its buffer to 500 MB on reading this line.
    let server = Server::start(vec![
        Step::Send(b"* OK IMAP4rev1 ready\r\n"),
        Step::ReadLine,
        Step::Flood {
            prefix: b"* 1 FETCH (BODY[] {500000000}\r\n",
            filler: b'x',
        },
    ])
    .await;
    expect_refused(
        CheckProtocol::Imap,
        &server,
        "127.0.0.1 announced a literal of 500000000 bytes, more than the operator reads (at most 1 MiB in one check) while authenticating",
    )
    .await;
    let flooded = server.flooded_when_closed().await;
    assert!(
        flooded <= SOCKET_SLACK,
        "{flooded} bytes of the literal sent"
    );
}

#[tokio::test]
async fn imap_endless_greeting_line_stops_at_the_budget() {
    let server = Server::start(vec![Step::Flood {
        prefix: b"* OK ",
        filler: b'x',
    }])
    .await;
    expect_refused(
        CheckProtocol::Imap,
        &server,
        "127.0.0.1 sent more than the operator reads (at most 1 MiB in one check) before the IMAP greeting",
    )
    .await;
    let flooded = server.flooded_when_closed().await;
    assert!(
        flooded <= SESSION_BUDGET as u64 + SOCKET_SLACK,
        "{flooded} bytes sent"
    );
}

#[tokio::test]
async fn smtp_endless_reply_line_stops_at_the_budget() {
    // lettre checks its line limit only once the line has ended.
    let server = Server::start(vec![Step::Flood {
        prefix: b"220-",
        filler: b'x',
    }])
    .await;
    expect_refused(
        CheckProtocol::Smtp,
        &server,
        "sent more than the operator reads (at most 1 MiB in one check) while connecting",
    )
    .await;
    let flooded = server.flooded_when_closed().await;
    assert!(
        flooded <= SESSION_BUDGET as u64 + SOCKET_SLACK,
        "{flooded} bytes sent"
    );
}

#[tokio::test]
async fn pop3_endless_line_stops_at_the_line_limit() {
    let server = Server::start(vec![Step::Flood {
        prefix: b"+OK ",
        filler: b'x',
    }])
    .await;
    expect_refused(
        CheckProtocol::Pop3,
        &server,
        "127.0.0.1 sent more than the operator reads (a line longer than 16 KiB) before the POP3 greeting",
    )
    .await;
    let flooded = server.flooded_when_closed().await;
    assert!(flooded <= SOCKET_SLACK, "{flooded} bytes sent");
}
