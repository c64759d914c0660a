//! SMTP submission over `lettre`'s low-level async connection: greeting + `EHLO`, optional `STARTTLS`
//! + `EHLO`, `AUTH`, `QUIT`. No `MAIL FROM` is ever sent.
//!
//! lettre does the connection, TLS (its rustls backend with `ring`, trusting the same webpki roots
//! plus extra CAs as the IMAP and POP3 checks) and STARTTLS. `AUTH` goes through its generic
//! `command` instead of `AsyncSmtpConnection::auth`: lettre has no OAUTHBEARER mechanism, and its
//! XOAUTH2 mechanism answers an error challenge with an error of its own, losing the server's JSON
//! that says why the token was refused.
//!
//! lettre is handed the connection (`connect_with_transport`) rather than opening it, so that it reads
//! through [`Bounded`]: its reply reader checks its line limit only after a whole line has arrived
//! (see [`super::bounded`]). Implicit TLS is therefore done here, with the same configuration as for
//! IMAP and POP3; for STARTTLS lettre wraps its own rustls session around the bounded socket, and
//! the budget then counts the encrypted bytes, which bounds the plain ones.
//!
//! lettre logs protocol lines only with its `tracing` feature, which this crate does not enable.

use std::{fmt, io, net::SocketAddr};

use lettre::transport::smtp::{
    Error as SmtpError,
    client::{AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters},
    extension::{ClientId, Extension},
    response::Response,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::{
    MailboxError, Session,
    bounded::{self, Bounded},
    sasl, tls,
};
use crate::api::TlsMode;

const CONNECTING: &str = "while connecting";

/// One raw command line. It can carry the SASL string, so it has no `Debug` and is never logged.
struct Line(String);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\r\n", self.0)
    }
}

pub(super) async fn check(s: &Session<'_>) -> Result<Option<u32>, MailboxError> {
    let host = s.target.host.as_str();
    let port = s.target.port;
    let addr = format!("{host}:{port}");
    // An address literal, as RFC 5321 §4.1.4 asks of a client without a meaningful host name.
    let hello = ClientId::default();
    let tcp = tls::connect(host, port, s.target.allowed.as_deref()).await?;
    let mut conn = match s.target.tls {
        TlsMode::Implicit => {
            s.progress.at("in the TLS handshake");
            let stream = tls::handshake(s.tls_config()?, host, port, tcp).await?;
            greeting(Bounded::new(stream), &hello, &addr, s).await?
        }
        TlsMode::StartTls => {
            let mut conn = greeting(Bounded::new(tcp), &hello, &addr, s).await?;
            if !conn.server_info().supports_feature(Extension::StartTls) {
                conn.abort().await;
                return Err(MailboxError::Tls {
                    detail: format!(
                        "{host} does not offer STARTTLS; the token is not sent without TLS"
                    ),
                });
            }
            s.progress.at("in the STARTTLS handshake");
            conn.starttls(tls_parameters(s)?, &hello)
                .await
                .map_err(|e| smtp_error(&e, &addr, "during STARTTLS"))?;
            conn
        }
        TlsMode::None => greeting(Bounded::new(tcp), &hello, &addr, s).await?,
    };

    let mechanism = s.target.mechanism;
    s.progress.at("authenticating");
    // RFC 4954 initial response: `AUTH <mechanism> <base64>` (lines up to 12288 octets).
    let first = Line(format!(
        "AUTH {} {}",
        mechanism.name(),
        sasl::encode(s.sasl.expose().as_bytes())
    ));
    let mut challenge = None;
    let mut reply = conn.command(first).await;
    if let Ok(response) = &reply
        && response.has_code(334)
    {
        // An error challenge: keep it, acknowledge, and read the final 535.
        challenge = Some(sasl::decode_challenge(
            response.first_line().unwrap_or_default(),
        ));
        reply = conn
            .command(Line(sasl::encode(mechanism.failure_ack())))
            .await;
    }
    let result = match reply {
        Ok(response) if response.has_code(235) => Ok(None),
        Ok(response) => Err(MailboxError::Protocol {
            detail: format!(
                "{host} answered AUTH {mechanism} with {}",
                response_text(&response)
            ),
        }),
        Err(e) => Err(auth_error(&e, &addr, mechanism.name(), challenge)),
    };
    s.progress.at("logging out");
    // After 235 the answer is known; QUIT is courtesy (a submission server without its relay, such
    // as Dovecot's, may answer 421 here).
    let _ = conn.quit().await;
    result
}

/// Hand the connection to lettre, which reads the greeting and sends `EHLO`.
async fn greeting<S>(
    stream: Bounded<S>,
    hello: &ClientId,
    addr: &str,
    s: &Session<'_>,
) -> Result<AsyncSmtpConnection, MailboxError>
where
    Bounded<S>: AsyncTokioStream + 'static,
{
    s.progress.at("waiting for the SMTP greeting");
    AsyncSmtpConnection::connect_with_transport(Box::new(stream), hello)
        .await
        .map_err(|e| smtp_error(&e, addr, CONNECTING))
}

/// The peer address lettre may ask its transport for.
trait PeerAddr {
    fn peer(&self) -> io::Result<SocketAddr>;
}

impl PeerAddr for TcpStream {
    fn peer(&self) -> io::Result<SocketAddr> {
        self.peer_addr()
    }
}

impl PeerAddr for TlsStream<TcpStream> {
    fn peer(&self) -> io::Result<SocketAddr> {
        self.get_ref().0.peer_addr()
    }
}

impl<S> AsyncTokioStream for Bounded<S>
where
    S: AsyncRead + AsyncWrite + PeerAddr + Send + Sync + Unpin + fmt::Debug,
{
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.get_ref().peer()
    }
}

/// lettre's TLS parameters for STARTTLS: the same trust anchors as [`tls::client_config`].
fn tls_parameters(s: &Session<'_>) -> Result<TlsParameters, MailboxError> {
    let mut builder = TlsParameters::builder(s.target.host.clone())
        .certificate_store(CertificateStore::WebpkiRoots);
    for cert in &s.extra_cas {
        let cert = Certificate::from_der(cert.to_vec()).map_err(|e| MailboxError::Tls {
            detail: format!("a configured CA certificate cannot be used: {e}"),
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build_rustls().map_err(|e| MailboxError::Tls {
        detail: format!("TLS configuration: {e}"),
    })
}

fn response_text(response: &Response) -> String {
    sasl::printable(&format!(
        "{} {}",
        response.code(),
        response.message().collect::<Vec<_>>().join(" ")
    ))
}

/// A failed `AUTH`: 535 (and 534, Gmail's "log in with your web browser") mean the token was refused.
fn auth_error(
    e: &SmtpError,
    host: &str,
    mechanism: &str,
    challenge: Option<String>,
) -> MailboxError {
    let code = e.status().map(|c| c.to_string());
    match code.as_deref() {
        Some("535" | "534") => MailboxError::AuthFailed {
            detail: challenge.unwrap_or_else(|| sasl::printable(&e.to_string())),
        },
        Some(_) => MailboxError::Protocol {
            detail: format!(
                "{host} refused AUTH {mechanism}: {} (does it offer AUTH {mechanism}?)",
                sasl::printable(&e.to_string())
            ),
        },
        None => smtp_error(e, host, "while authenticating"),
    }
}

fn smtp_error(e: &SmtpError, host: &str, when: &str) -> MailboxError {
    if let Some(overrun) = bounded::find(e) {
        return overrun.error(host, when);
    }
    if let Some(tls_error) = tls::find_rustls_error(e) {
        return MailboxError::Tls {
            detail: tls::describe_tls_error(tls_error, host),
        };
    }
    let text = sasl::printable(&error_chain(e));
    if e.status().is_some() {
        // A 4xx/5xx reply to the greeting, EHLO or STARTTLS.
        return MailboxError::Protocol {
            detail: format!("{host} refused the session {when}: {text}"),
        };
    }
    if e.is_timeout() || when == CONNECTING {
        // Resolving, connecting, or a connection that closed before the greeting.
        return MailboxError::Unreachable {
            detail: format!("{host} {when}: {text}"),
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return tls::classify_io(io, host, when);
        }
        source = err.source();
    }
    if e.is_tls() {
        return MailboxError::Tls {
            detail: format!("{host}: {text}"),
        };
    }
    MailboxError::Protocol {
        detail: format!("{host} {when}: {text}"),
    }
}

/// lettre's error and its sources, for the detail (lettre's Display already includes the first
/// source; deeper ones are appended when they add something).
fn error_chain(e: &SmtpError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e).and_then(|s| s.source());
    while let Some(err) = source {
        let s = err.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = err.source();
    }
    text
}
