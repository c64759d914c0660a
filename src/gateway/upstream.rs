//! The gateway's connection to an integration's mail server: the same rules as the mailbox check
//! (`src/mailbox`): only hosts on the operator's allow-list ([`AllowedHosts`], the name and every
//! address it resolves to), TLS always verified against the public roots plus the integration's own
//! CA (`caPem`), plain TCP only to loopback.
//!
//! [`open_stream`] gives the TCP (+ implicit TLS) stream; a protocol whose server uses STARTTLS
//! sends its own STARTTLS command on the plain stream and then calls [`TlsUpgrade::upgrade`].

use std::{net::IpAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

mod imap;
mod lines;
mod pop3;
pub mod tls_configs;

use lines::Lines;

use super::{
    config::{UpstreamMechanism, UpstreamServer},
    session::{Entry, Protocol},
    stream::MaybeTls,
};
use crate::{
    api::TlsMode,
    mailbox::{MailboxError, SaslMechanism, allowed::AllowedHosts, tls},
};

/// How long connecting (TCP and the TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole upstream set-up (connect, STARTTLS, authentication) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the gateway could not get an upstream session. No variant holds a token or a SASL string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The integration has no server for the protocol (gateway.json's `imap`/`pop3`/`smtp` null).
    #[error("the integration has no {0} server")]
    NoServer(Protocol),
    /// The host or an address it resolves to is not one the gateway may connect to.
    #[error("{0}")]
    HostNotAllowed(String),
    /// DNS, connection refused or reset, timeout.
    #[error("the mail server is unreachable: {0}")]
    Unreachable(String),
    /// Certificate not trusted, wrong name, handshake failure, STARTTLS refused.
    #[error("TLS error: {0}")]
    Tls(String),
    /// The server refused the access token.
    #[error("the mail server rejected the access token: {0}")]
    AuthFailed(String),
    /// The server said something the gateway cannot work with.
    #[error("mail protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The metrics label (`upstream errors by reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoServer(_) => "no_server",
            Self::HostNotAllowed(_) => "host_not_allowed",
            Self::Unreachable(_) => "unreachable",
            Self::Tls(_) => "tls",
            Self::AuthFailed(_) => "auth_failed",
            Self::Protocol(_) => "protocol",
        }
    }
}

impl From<MailboxError> for UpstreamError {
    fn from(e: MailboxError) -> Self {
        match e {
            MailboxError::AuthFailed { detail } => Self::AuthFailed(detail),
            MailboxError::Unreachable { detail } => Self::Unreachable(detail),
            MailboxError::Tls { detail } => Self::Tls(detail),
            MailboxError::Protocol { detail } => Self::Protocol(detail),
            MailboxError::AddressNotAllowed { detail } => Self::HostNotAllowed(detail),
        }
    }
}

/// A connection to a mail server: plain TCP (before STARTTLS, or loopback) or TLS.
pub type Stream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// What it takes to start TLS on a plain stream to the server later (STARTTLS).
#[derive(Clone)]
pub struct TlsUpgrade {
    config: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
}

impl std::fmt::Debug for TlsUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsUpgrade({}:{})", self.host, self.port)
    }
}

impl TlsUpgrade {
    /// Run the TLS handshake on a plain stream (after the server's go-ahead to STARTTLS/STLS),
    /// verifying the server's certificate. Bytes the caller buffered from the plain stream must be
    /// none (they would be injected into the TLS session): check before calling.
    pub async fn upgrade(&self, stream: Stream) -> Result<Stream, UpstreamError> {
        let Stream::Plain(tcp) = stream else {
            return Err(UpstreamError::Protocol(
                "STARTTLS on a stream that is TLS already".into(),
            ));
        };
        let handshake = tls::handshake(self.config.clone(), &self.host, self.port, tcp);
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(UpstreamError::Unreachable(format!(
                "{}:{}: no TLS handshake within {} s",
                self.host,
                self.port,
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Microseconds between laps: where an upstream set-up's time goes, for a debug line per set-up
/// (`upstream set-up steps`, which `benches/gateway.rs` averages).
pub(crate) struct StepClock(std::time::Instant);

impl StepClock {
    pub(crate) fn new() -> Self {
        Self(std::time::Instant::now())
    }

    /// Microseconds since the last lap (or the start), and a new lap begun.
    pub(crate) fn lap(&mut self) -> u64 {
        let now = std::time::Instant::now();
        let us = u64::try_from(now.duration_since(self.0).as_micros()).unwrap_or(u64::MAX);
        self.0 = now;
        us
    }
}

/// A stream the relay can use: any async byte stream.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// An authenticated upstream session, ready to relay.
pub struct Upstream {
    pub stream: Box<dyn AsyncStream>,
    /// What the server sent after its authentication reply: delivered to the app first.
    pub pending: Vec<u8>,
    /// The server's success reply: IMAP without its tag (`OK [CAPABILITY ...] Logged in`), POP3
    /// the whole line (`+OK ...`).
    pub reply: String,
    /// IMAP: the untagged lines the server sent before its reply (CRLF-terminated).
    pub untagged: Vec<u8>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("reply", &self.reply)
            .finish_non_exhaustive()
    }
}

fn mechanism(m: UpstreamMechanism) -> SaslMechanism {
    match m {
        UpstreamMechanism::XOAuth2 => SaslMechanism::XOAuth2,
        UpstreamMechanism::OAuthBearer => SaslMechanism::OAuthBearer,
    }
}

/// What the client answers to an error challenge, base64-encoded.
pub(crate) fn failure_ack(m: SaslMechanism) -> String {
    crate::mailbox::encode_sasl(m.failure_ack())
}

pub(crate) fn decode_challenge(data: &str) -> String {
    crate::mailbox::decode_challenge(data.trim())
}

/// Connect to the integration's server for `protocol` and authenticate with the entry's current
/// access token (XOAUTH2 or OAUTHBEARER as `gateway.json` says), within [`SETUP_TIMEOUT`]. IMAP
/// and POP3 only: SMTP has its own client (`smtp/upstream.rs`, over [`open_stream`]).
pub async fn connect(
    entry: &Entry,
    protocol: Protocol,
    allowed: &AllowedHosts,
) -> Result<Upstream, UpstreamError> {
    let config = &entry.config;
    let server = config
        .server(protocol)
        .ok_or(UpstreamError::NoServer(protocol))?;
    let mechanism = mechanism(config.mechanism);
    let sasl = mechanism.initial_response(
        &config.mailbox,
        &server.host,
        server.port,
        &entry.access_token,
    );
    let setup = async {
        let mut clock = StepClock::new();
        let (stream, upgrade) = open_stream(server, config.ca_pem.as_deref(), allowed).await?;
        let connect_us = clock.lap();
        let starttls = (server.tls == TlsMode::StartTls).then_some(&upgrade);
        match protocol {
            Protocol::Imap => {
                let done =
                    imap::authenticate(stream, starttls, &server.host, mechanism, &sasl).await?;
                let login_us = clock.lap();
                tracing::debug!(protocol = %protocol, connect_us, login_us, "upstream set-up steps");
                let (stream, pending) = done.lines.into_parts();
                Ok(Upstream {
                    stream: Box::new(stream),
                    pending,
                    reply: done.reply,
                    untagged: done.untagged,
                })
            }
            Protocol::Pop3 => {
                let (lines, reply) =
                    pop3::authenticate(stream, starttls, &server.host, mechanism, &sasl).await?;
                let (stream, pending) = lines.into_parts();
                Ok(Upstream {
                    stream: Box::new(stream),
                    pending,
                    reply,
                    untagged: Vec::new(),
                })
            }
            Protocol::Smtp => Err(UpstreamError::Protocol(
                "SMTP sessions use the gateway's SMTP client".into(),
            )),
        }
    };
    let result = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Unreachable(format!(
            "{}:{}: no authenticated session within {} s",
            server.host,
            server.port,
            SETUP_TIMEOUT.as_secs()
        ))),
    };
    result.map_err(|e| {
        e.scrub(&[
            entry.access_token.expose(),
            sasl.expose(),
            &crate::mailbox::encode_sasl(sasl.expose().as_bytes()),
        ])
    })
}

impl UpstreamError {
    fn detail_mut(&mut self) -> Option<&mut String> {
        match self {
            Self::NoServer(_) => None,
            Self::HostNotAllowed(d)
            | Self::Unreachable(d)
            | Self::Tls(d)
            | Self::AuthFailed(d)
            | Self::Protocol(d) => Some(d),
        }
    }

    /// Remove any of `secrets` from the detail (defence in depth: a server could echo them).
    fn scrub(mut self, secrets: &[&str]) -> Self {
        if let Some(detail) = self.detail_mut() {
            for secret in secrets {
                if secret.len() >= 8 && detail.contains(secret) {
                    *detail = detail.replace(secret, "[redacted]");
                }
            }
        }
        self
    }
}

/// Whether `host` names loopback (the only place plain TCP may carry a token).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Open a connection to `server`: check the host against `allowed`, resolve it once and check
/// every address, connect, and for implicit TLS run the handshake (certificate verified against
/// the public roots plus `ca_pem`; the TLS configuration and its session cache are shared by
/// every connection with the same `ca_pem`, [`tls_configs`]). For `StartTls` the stream is plain: the caller speaks the
/// protocol's STARTTLS and then calls [`TlsUpgrade::upgrade`]. `None` only for loopback.
pub async fn open_stream(
    server: &UpstreamServer,
    ca_pem: Option<&str>,
    allowed: &AllowedHosts,
) -> Result<(Stream, TlsUpgrade), UpstreamError> {
    let host = server.host.as_str();
    if !allowed.allows(host) {
        return Err(UpstreamError::HostNotAllowed(format!(
            "the mail server {} is not one the gateway may connect to (allowed: {})",
            crate::reason::outside_text(host, 256),
            allowed.describe()
        )));
    }
    if server.tls == TlsMode::None && !is_loopback(host) {
        return Err(UpstreamError::Tls(format!(
            "refusing to send the token to {host} without TLS: tls: None is only for loopback"
        )));
    }
    if server.port == 0 {
        return Err(UpstreamError::Protocol("port 0 is not a TCP port".into()));
    }
    let upgrade = TlsUpgrade {
        // Cached per CA bundle: later logins to the same server resume their TLS session.
        config: tls_configs::client_config(ca_pem)?,
        host: host.to_owned(),
        port: server.port,
    };
    let tcp = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tls::connect(host, server.port, Some(allowed)),
    )
    .await
    {
        Ok(tcp) => tcp?,
        Err(_) => {
            return Err(UpstreamError::Unreachable(format!(
                "{host}:{}: no connection within {} s",
                server.port,
                CONNECT_TIMEOUT.as_secs()
            )));
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream = match server.tls {
        TlsMode::Implicit => upgrade.upgrade(Stream::Plain(tcp)).await?,
        TlsMode::StartTls | TlsMode::None => Stream::Plain(tcp),
    };
    Ok((stream, upgrade))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(host: &str, tls: TlsMode) -> UpstreamServer {
        UpstreamServer {
            host: host.into(),
            port: 993,
            tls,
        }
    }

    #[tokio::test]
    async fn hosts_off_the_list_and_plain_tcp_off_loopback_are_refused_before_connecting() {
        let allowed = AllowedHosts::default();
        let e = open_stream(
            &server("evil.example.com", TlsMode::Implicit),
            None,
            &allowed,
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason(), "host_not_allowed", "{e}");
        let e = open_stream(&server("imap.gmail.com", TlsMode::None), None, &allowed)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "tls", "{e}");
        let e = open_stream(
            &server("127.0.0.1", TlsMode::Implicit),
            None,
            &AllowedHosts::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason(), "host_not_allowed", "{e}");
    }
}
