//! POP3, written by hand: greeting, optional `STLS` (RFC 2595), `AUTH` (RFC 5034), `STAT`, `QUIT`.
//!
//! There is no maintained async POP3 client crate for tokio (the ones on crates.io are synchronous,
//! tied to native-tls/openssl, or unmaintained), and the exchange a check needs is six lines, so it
//! is written here against tokio + tokio-rustls like the rest of the module.
//!
//! The token is sent as the answer to the server's empty `+ ` challenge, not as an initial response
//! on the `AUTH` line: RFC 5034 limits that line to 255 octets and Google's tokens alone can be 2048.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{MailboxError, Session, bounded::Overrun, sasl, tls};
use crate::api::TlsMode;

/// The longest reply line read (RFC 1939 allows 512 octets; challenges are longer). A check reads
/// at most seven lines, so this also bounds what one check reads from the server; time is bounded
/// by the check's timeout.
const MAX_LINE: usize = 16 * 1024;

struct Pop3<S> {
    io: BufReader<S>,
    host: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Pop3<S> {
    fn new(stream: S, host: &str) -> Self {
        Self {
            io: BufReader::new(stream),
            host: host.to_owned(),
        }
    }

    async fn read_line(&mut self, when: &str) -> Result<String, MailboxError> {
        let mut line = String::new();
        let n = (&mut self.io)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(|e| tls::classify_io(&e, &self.host, when))?;
        if n == 0 {
            return Err(MailboxError::Unreachable {
                detail: format!("{} closed the connection {when}", self.host),
            });
        }
        if !line.ends_with('\n') {
            return Err(if n >= MAX_LINE {
                Overrun::Line { max: MAX_LINE }.error(&self.host, when)
            } else {
                MailboxError::Unreachable {
                    detail: format!("{} closed the connection in mid-line {when}", self.host),
                }
            });
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Send one line. Lines may carry the token: they are never logged.
    async fn send(&mut self, line: &[u8], when: &str) -> Result<(), MailboxError> {
        let io = self.io.get_mut();
        let mut buf = Vec::with_capacity(line.len().saturating_add(2));
        buf.extend_from_slice(line);
        buf.extend_from_slice(b"\r\n");
        io.write_all(&buf)
            .await
            .map_err(|e| tls::classify_io(&e, &self.host, when))?;
        io.flush()
            .await
            .map_err(|e| tls::classify_io(&e, &self.host, when))
    }

    async fn command(&mut self, line: &str, when: &str) -> Result<String, MailboxError> {
        self.send(line.as_bytes(), when).await?;
        self.read_line(when).await
    }

    fn into_inner(self) -> Result<S, MailboxError> {
        if !self.io.buffer().is_empty() {
            // Bytes received before the handshake would be injected into the TLS session.
            return Err(MailboxError::Tls {
                detail: format!("{} sent data before the TLS handshake of STLS", self.host),
            });
        }
        Ok(self.io.into_inner())
    }
}

pub(super) async fn check(s: &Session<'_>) -> Result<Option<u32>, MailboxError> {
    let host = s.target.host.as_str();
    let tcp = tls::connect(host, s.target.port, s.target.allowed.as_deref()).await?;
    match s.target.tls {
        TlsMode::Implicit => {
            s.progress.at("in the TLS handshake");
            let stream = tls::handshake(s.tls_config()?, host, s.target.port, tcp).await?;
            let mut conn = Pop3::new(stream, host);
            greeting(&mut conn, s).await?;
            authenticated_check(conn, s).await
        }
        TlsMode::StartTls => {
            let mut conn = Pop3::new(tcp, host);
            greeting(&mut conn, s).await?;
            s.progress.at("waiting for the STLS answer");
            let reply = conn.command("STLS", "after STLS").await?;
            if !reply.starts_with("+OK") {
                return Err(MailboxError::Tls {
                    detail: format!(
                        "{host} refused STLS ({}); the token is not sent without TLS",
                        sasl::printable(&reply)
                    ),
                });
            }
            s.progress.at("in the TLS handshake");
            let stream =
                tls::handshake(s.tls_config()?, host, s.target.port, conn.into_inner()?).await?;
            authenticated_check(Pop3::new(stream, host), s).await
        }
        TlsMode::None => {
            let mut conn = Pop3::new(tcp, host);
            greeting(&mut conn, s).await?;
            authenticated_check(conn, s).await
        }
    }
}

async fn greeting<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Pop3<S>,
    s: &Session<'_>,
) -> Result<(), MailboxError> {
    s.progress.at("waiting for the POP3 greeting");
    let line = conn.read_line("before the POP3 greeting").await?;
    if line.starts_with("+OK") {
        Ok(())
    } else if line.starts_with("-ERR") {
        Err(MailboxError::Unreachable {
            detail: format!(
                "{} refused the connection: {}",
                conn.host,
                sasl::printable(&line)
            ),
        })
    } else {
        Err(MailboxError::Protocol {
            detail: format!(
                "{} did not greet like a POP3 server: {}",
                conn.host,
                sasl::printable(&line)
            ),
        })
    }
}

async fn authenticated_check<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Pop3<S>,
    s: &Session<'_>,
) -> Result<Option<u32>, MailboxError> {
    let host = s.target.host.clone();
    let mechanism = s.target.mechanism;
    s.progress.at("authenticating");
    let reply = conn
        .command(&format!("AUTH {}", mechanism.name()), "after AUTH")
        .await?;
    if !reply.starts_with('+') || reply.starts_with("+OK") {
        return Err(MailboxError::Protocol {
            detail: format!(
                "{host} did not start AUTH {mechanism}: {} (does it offer SASL {mechanism}?)",
                sasl::printable(&reply)
            ),
        });
    }
    conn.send(
        sasl::encode(s.sasl.expose().as_bytes()).as_bytes(),
        "while authenticating",
    )
    .await?;
    let mut reply = conn.read_line("while authenticating").await?;
    let mut challenge = None;
    if let Some(encoded) = reply.strip_prefix("+ ").or(reply.strip_prefix('+'))
        && !reply.starts_with("+OK")
    {
        // An error challenge: keep it, acknowledge, and read the final -ERR.
        challenge = Some(sasl::decode_challenge(encoded));
        conn.send(
            sasl::encode(mechanism.failure_ack()).as_bytes(),
            "while authenticating",
        )
        .await?;
        reply = conn.read_line("while authenticating").await?;
    }
    if !reply.starts_with("+OK") {
        return Err(if reply.starts_with("-ERR") {
            MailboxError::AuthFailed {
                detail: challenge.unwrap_or_else(|| sasl::printable(&reply)),
            }
        } else {
            MailboxError::Protocol {
                detail: format!("{host} answered AUTH with {}", sasl::printable(&reply)),
            }
        });
    }
    // As for IMAP: a command after AUTH shows that the maildrop is really usable.
    s.progress.at("waiting for the STAT answer");
    let stat = conn.command("STAT", "after STAT").await?;
    let Some(counts) = stat.strip_prefix("+OK") else {
        return Err(MailboxError::AuthFailed {
            detail: format!(
                "the token was accepted, but STAT failed: {}",
                sasl::printable(&stat)
            ),
        });
    };
    let messages = counts
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| MailboxError::Protocol {
            detail: format!(
                "{host} sent a malformed STAT reply: {}",
                sasl::printable(&stat)
            ),
        })?;
    s.progress.at("logging out");
    let _ = conn.command("QUIT", "after QUIT").await;
    Ok(Some(messages))
}
