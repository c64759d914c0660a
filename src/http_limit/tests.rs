//! Hostile HTTP servers on 127.0.0.1: each sends more than its cap, and the caller must stop
//! reading promptly with an error that says so.

use super::*;
use crate::api::ProviderKind;
use crate::oauth::{ClientCredentials, OAuthClient, TokenTypeHint};
use crate::provider::{ProviderEndpoints, ProviderResolver, TokenOperation};
use crate::reason::Reason;
use crate::secret::SecretValue;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use url::Url;

/// A stream that the client would never stop reading without a cap fails the test here instead.
const PROMPTLY: Duration = Duration::from_secs(10);
/// What the server may write past the client's cap before the client closes: its own send buffer
/// (set to 64 KiB below) and the client's receive buffer (128 KiB by Linux's default). About
/// 224 KiB is measured for a 64 KiB cap; the servers announce 100 MB or send forever.
const SOCKET_SLACK: u64 = 1024 * 1024;

/// What the server sends after the status line.
#[derive(Clone, Copy, Debug)]
enum Body {
    /// `Content-Length: n`, then `n` bytes (at loopback speed, until the client closes).
    Length(u64),
    /// Chunked, `n` bytes in all, then the last chunk.
    Chunked(u64),
    /// Chunked, forever.
    Endless,
}

/// A server answering every request with `status` and `body`; counts the body bytes it wrote.
struct Hostile {
    base: String,
    written: Arc<AtomicU64>,
    closed: Arc<Notify>,
}

impl Hostile {
    async fn start(status: u16, body: Body) -> Self {
        // A small send buffer, so that what the server counts as written is close to what the
        // client took in (accepted sockets inherit it).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let written = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(Notify::new());
        let (w, c) = (written.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(answer(stream, status, body, w.clone(), c.clone()));
            }
        });
        Self {
            base,
            written,
            closed,
        }
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("{}{path}", self.base)).unwrap()
    }

    /// Wait until the client has closed a connection, then give the bytes written.
    async fn written_when_closed(&self) -> u64 {
        tokio::time::timeout(PROMPTLY, self.closed.notified())
            .await
            .expect("the client closes the connection after refusing the answer");
        self.written.load(Ordering::SeqCst)
    }

    /// Assert that the client stopped reading near `limit`: what the server wrote is at most the
    /// limit plus what the socket buffers took in meanwhile.
    async fn assert_stopped_near(&self, limit: usize) {
        let written = self.written_when_closed().await;
        assert!(
            written <= limit as u64 + SOCKET_SLACK,
            "{written} bytes written for a limit of {limit}"
        );
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    status: u16,
    body: Body,
    written: Arc<AtomicU64>,
    closed: Arc<Notify>,
) {
    // The request head (the form body, if any, stays unread: the answer does not depend on it).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let framing = match body {
        Body::Length(n) => format!("Content-Length: {n}"),
        Body::Chunked(_) | Body::Endless => "Transfer-Encoding: chunked".to_owned(),
    };
    let start = format!(
        "HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    );
    if stream.write_all(start.as_bytes()).await.is_err() {
        closed.notify_one();
        return;
    }
    let block = [b'x'; 16 * 1024];
    let mut left = match body {
        Body::Length(n) | Body::Chunked(n) => n,
        Body::Endless => u64::MAX,
    };
    let chunked = !matches!(body, Body::Length(_));
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        let mut frame = Vec::with_capacity(n + 16);
        if chunked {
            frame.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        }
        frame.extend_from_slice(&block[..n]);
        if chunked {
            frame.extend_from_slice(b"\r\n");
        }
        if stream.write_all(&frame).await.is_err() {
            closed.notify_one();
            return;
        }
        written.fetch_add(n as u64, Ordering::SeqCst);
        left -= n as u64;
    }
    if chunked {
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
    // Hold the connection until the client is done with it.
    let _ = stream.read(&mut byte).await;
    closed.notify_one();
}

async fn get_capped(server: &Hostile, limit: usize) -> Result<Vec<u8>, ReadError> {
    let response = reqwest::get(server.url("/")).await.unwrap();
    read_capped(response, limit).await
}

#[tokio::test]
async fn read_capped_takes_the_limit_and_refuses_one_byte_more() {
    const LIMIT: usize = 64 * 1024;
    for (body, fits) in [
        (Body::Length(LIMIT as u64), true),
        (Body::Length(LIMIT as u64 + 1), false),
        (Body::Chunked(LIMIT as u64), true),
        (Body::Chunked(LIMIT as u64 + 1), false),
        (Body::Chunked(0), true),
    ] {
        let server = Hostile::start(200, body).await;
        match get_capped(&server, LIMIT).await {
            Ok(b) if fits => assert!(b.len() <= LIMIT && b.iter().all(|&c| c == b'x')),
            Err(ReadError::TooLarge { limit: LIMIT }) if !fits => {}
            other => panic!("{body:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn read_capped_refuses_an_announced_length_without_reading_it() {
    let server = Hostile::start(200, Body::Length(100_000_000)).await;
    let started = Instant::now();
    let result = tokio::time::timeout(PROMPTLY, get_capped(&server, 64 * 1024)).await;
    assert!(matches!(
        result,
        Ok(Err(ReadError::TooLarge { limit: 65536 }))
    ));
    assert!(started.elapsed() < PROMPTLY);
    server.assert_stopped_near(64 * 1024).await;
}

#[tokio::test]
async fn read_capped_stops_an_endless_chunked_body() {
    let server = Hostile::start(200, Body::Endless).await;
    let result = tokio::time::timeout(PROMPTLY, get_capped(&server, 64 * 1024)).await;
    assert!(matches!(
        result,
        Ok(Err(ReadError::TooLarge { limit: 65536 }))
    ));
    server.assert_stopped_near(64 * 1024).await;
}

#[test]
fn sizes_read_as_people_write_them() {
    assert_eq!(Size(64 * 1024).to_string(), "64 KiB");
    assert_eq!(Size(1024 * 1024).to_string(), "1 MiB");
    assert_eq!(Size(1000).to_string(), "1000 bytes");
    assert_eq!(
        too_large("the token endpoint", TOKEN_RESPONSE_LIMIT),
        "the token endpoint's answer is larger than 64 KiB; the operator reads at most that"
    );
}

// ---------------------------------------------------------------------------------------------
// The callers: token endpoint (oauth2 crate), userinfo, revocation, discovery
// ---------------------------------------------------------------------------------------------

fn endpoints(server: &Hostile) -> ProviderEndpoints {
    ProviderEndpoints {
        kind: ProviderKind::Oidc,
        authorization: server.url("/auth"),
        token: server.url("/token"),
        revocation: Some(server.url("/revoke")),
        userinfo: Some(server.url("/userinfo")),
        issuer: None,
        discovered: None,
    }
}

fn client() -> OAuthClient {
    // A request timeout past PROMPTLY: only the cap can end these reads in time.
    OAuthClient::with_timeouts(Duration::from_secs(2), Duration::from_secs(30)).unwrap()
}

const SECRET: &str = "CLIENT-SECRET-bounded-0001";
const REFRESH: &str = "REFRESH-TOKEN-bounded-0002";

fn creds() -> ClientCredentials {
    ClientCredentials {
        signing_key: None,
        client_id: "client".into(),
        client_secret: SecretValue::new(SECRET),

        owner: Default::default(),
    }
}

async fn refresh(server: &Hostile) -> crate::oauth::TokenError {
    let call = async {
        client()
            .refresh(
                &crate::oauth::Bound::unchecked(
                    &endpoints(server),
                    &creds(),
                    crate::provider::TokenOperation::Refresh,
                ),
                &SecretValue::new(REFRESH),
                &[],
                jiff::Timestamp::now(),
            )
            .await
    };
    tokio::time::timeout(PROMPTLY, call)
        .await
        .expect("the token endpoint's answer is read with a cap")
        .unwrap_err()
}

fn assert_too_large(err: &crate::oauth::TokenError, what: &str) {
    let text = format!("{err} {err:?}");
    assert_eq!(err.reason(), Reason::ProviderError, "{text}");
    assert!(!err.is_permanent(), "{text}");
    assert!(
        text.contains(&format!(
            "{what}'s answer is larger than 64 KiB; the operator reads at most that"
        )),
        "{text}"
    );
    assert!(!text.contains(SECRET) && !text.contains(REFRESH) && !text.contains("xxxx"));
}

#[tokio::test]
async fn token_refresh_refuses_a_huge_announced_answer() {
    let server = Hostile::start(200, Body::Length(100_000_000)).await;
    let err = refresh(&server).await;
    assert_eq!(err.operation, TokenOperation::Refresh);
    assert_too_large(&err, "the token endpoint");
    server.assert_stopped_near(TOKEN_RESPONSE_LIMIT).await;
}

#[tokio::test]
async fn code_exchange_refuses_an_endless_chunked_answer() {
    let server = Hostile::start(200, Body::Endless).await;
    let call = async {
        client()
            .exchange_code(
                &crate::oauth::Bound::unchecked(
                    &endpoints(&server),
                    &creds(),
                    crate::provider::TokenOperation::CodeExchange,
                ),
                &SecretValue::new("AUTH-CODE-bounded-0003"),
                &SecretValue::new("PKCE-VERIFIER-bounded-0004-abcdefghijklmnopqrstuvwxyz"),
                "https://op.example.com/oauth2/callback",
                jiff::Timestamp::now(),
            )
            .await
    };
    let err = tokio::time::timeout(PROMPTLY, call)
        .await
        .expect("the token endpoint's answer is read with a cap")
        .unwrap_err();
    assert_eq!(err.operation, TokenOperation::CodeExchange);
    assert_too_large(&err, "the token endpoint");
    server.assert_stopped_near(TOKEN_RESPONSE_LIMIT).await;
}

#[tokio::test]
async fn token_error_with_an_endless_body_is_still_read_by_its_status() {
    // A 503 is worth a retry however long its page; the cap must not turn it into something else.
    let server = Hostile::start(503, Body::Endless).await;
    let err = refresh(&server).await;
    assert_eq!(err.reason(), Reason::ProviderUnavailable, "{err}");
    assert!(!err.is_permanent(), "{err}");
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    server.assert_stopped_near(TOKEN_RESPONSE_LIMIT).await;
}

#[tokio::test]
async fn userinfo_refuses_an_endless_answer() {
    let server = Hostile::start(200, Body::Endless).await;
    let call = async {
        client()
            .userinfo(
                &endpoints(&server),
                &SecretValue::new("ACCESS-TOKEN-bounded-0005"),
                jiff::Timestamp::now(),
            )
            .await
    };
    let err = tokio::time::timeout(PROMPTLY, call)
        .await
        .expect("the userinfo answer is read with a cap")
        .unwrap_err();
    assert_too_large(&err, "the userinfo endpoint");
    server.assert_stopped_near(USERINFO_LIMIT).await;
}

#[tokio::test]
async fn revocation_error_with_an_endless_body_is_read_by_its_status() {
    let server = Hostile::start(502, Body::Length(100_000_000)).await;
    let call = async {
        client()
            .revoke(
                &crate::oauth::Bound::unchecked(
                    &endpoints(&server),
                    &creds(),
                    crate::provider::TokenOperation::Revocation,
                ),
                &SecretValue::new(REFRESH),
                TokenTypeHint::RefreshToken,
                jiff::Timestamp::now(),
            )
            .await
    };
    let err = tokio::time::timeout(PROMPTLY, call)
        .await
        .expect("the revocation answer is read with a cap")
        .unwrap_err();
    assert_eq!(err.reason(), Reason::ProviderUnavailable, "{err}");
    assert!(err.to_string().contains("HTTP 502"), "{err}");
    server.assert_stopped_near(USERINFO_LIMIT).await;
}

#[tokio::test]
async fn discovery_refuses_a_document_over_1_mib() {
    for body in [Body::Length(100_000_000), Body::Endless] {
        let server = Hostile::start(200, body).await;
        let resolver = ProviderResolver::new(reqwest::Client::new()).with_loopback(true);
        let err = tokio::time::timeout(PROMPTLY, resolver.discover(&server.base))
            .await
            .expect("the discovery document is read with a cap")
            .unwrap_err();
        assert_eq!(err.reason(), Reason::DiscoveryFailed, "{body:?}: {err:?}");
        assert!(!err.is_permanent(), "{body:?}: {err:?}");
        assert!(
            err.message().ends_with(
                "/.well-known/openid-configuration's answer is larger than 1 MiB; the operator reads at most that"
            ),
            "{body:?}: {}",
            err.message()
        );
        server.assert_stopped_near(DISCOVERY_LIMIT).await;
    }
}
