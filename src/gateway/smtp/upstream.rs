//! The gateway's SMTP client towards the integration's mail server: connect
//! ([`crate::gateway::upstream::open_stream`], STARTTLS or implicit TLS as the entry says), `EHLO`,
//! `AUTH XOAUTH2`/`OAUTHBEARER` with the entry's current access token, then `MAIL`/`RCPT`/`DATA` as
//! the app sends them.
//!
//! Hand-written over the stream rather than lettre's `AsyncSmtpConnection` (used by the mailbox
//! check): lettre sends a message only as one whole buffer (`message(&[u8])`), where the gateway
//! streams the body line by line as it arrives (a 35 MB message is never held) and must be able to
//! abandon a `DATA` without its final dot (a body over the limit: the connection is closed, so the
//! provider completes nothing). Replies are parsed with smtp-proto (`EhloResponse` for the
//! capabilities); reading them is bounded (line length, lines per reply, time).

use std::time::Duration;

use smtp_proto::{EXT_8BIT_MIME, EXT_START_TLS, EhloResponse};
use tokio::io::{AsyncWriteExt, BufReader};

use super::line::{Line, read_line};
use crate::{
    api::TlsMode,
    gateway::{
        config::{GatewayConfig, UpstreamMechanism},
        session::{Entry, Protocol},
        upstream::{StepClock, Stream, UpstreamError, open_stream},
    },
    mailbox::allowed::AllowedHosts,
    secret::SecretValue,
};

/// The longest reply line read from the server (RFC 5321 §4.5.3.1.5: 512 octets; slack for servers
/// that send longer text).
const REPLY_LINE: usize = 4096;
/// The most lines of one reply (an EHLO reply has about 15).
const REPLY_LINES: usize = 64;
/// How long one reply may take (RFC 5321 §4.5.3.2 suggests 5 minutes for most commands).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the reply to the final dot may take (RFC 5321 §4.5.3.2.6: 10 minutes).
pub const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// Body bytes written to the server at once.
const WRITE_CHUNK: usize = 64 * 1024;

/// A server reply: its code and its lines' text (after `ddd-`/`ddd `), made printable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply of the gateway's own.
    pub fn local(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            lines: vec![text.into()],
        }
    }

    /// The reply as sent to the app: the server's code and text, unchanged but for control
    /// characters (made spaces).
    pub fn wire(&self) -> String {
        let mut out = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.push_str(&format!("{}{sep}{line}\r\n", self.code));
        }
        if self.lines.is_empty() {
            out.push_str(&format!("{}\r\n", self.code));
        }
        out
    }

    /// The reply on one line, for logs and status messages.
    pub fn text(&self) -> String {
        crate::reason::outside_text(&format!("{} {}", self.code, self.lines.join(" ")), 512)
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// Microsoft's answer when SMTP AUTH is switched off (the mailbox check knows it too).
pub use crate::mailbox::is_smtp_auth_disabled;

/// An authenticated SMTP session with the integration's mail server.
pub struct SmtpUpstream {
    reader: BufReader<Stream>,
    out: Vec<u8>,
    host: String,
    /// The server offers 8BITMIME.
    pub eight_bit: bool,
    /// The server's SIZE limit, when it announces one.
    pub size: Option<u64>,
}

impl SmtpUpstream {
    /// Connect, greet, (STARTTLS,) and authenticate with the entry's access token.
    pub async fn connect(
        entry: &Entry,
        allowed: &AllowedHosts,
        hostname: &str,
    ) -> Result<Self, UpstreamError> {
        let config: &GatewayConfig = &entry.config;
        let server = config
            .smtp
            .as_ref()
            .ok_or(UpstreamError::NoServer(Protocol::Smtp))?;
        // Each step's time, for the debug line below (the benchmark reads it).
        let mut clock = StepClock::new();
        let (stream, upgrade) = open_stream(server, config.ca_pem.as_deref(), allowed).await?;
        let connect_us = clock.lap();
        let mut up = Self {
            reader: BufReader::new(stream),
            out: Vec::new(),
            host: server.host.clone(),
            eight_bit: false,
            size: None,
        };
        let greeting = up.reply(REPLY_TIMEOUT).await?;
        if greeting.code != 220 {
            return Err(up.protocol("greeted with", &greeting));
        }
        let greeting_us = clock.lap();
        let mut ehlo = up.ehlo(hostname).await?;
        let ehlo_us = clock.lap();
        let (mut starttls_us, mut tls_us) = (0, 0);
        if server.tls == TlsMode::StartTls {
            if ehlo.capabilities & EXT_START_TLS == 0 {
                return Err(UpstreamError::Tls(format!(
                    "{} does not offer STARTTLS; the token is not sent without TLS",
                    up.host
                )));
            }
            let go = up.command("STARTTLS").await?;
            if go.code != 220 {
                return Err(up.protocol("answered STARTTLS with", &go));
            }
            if !up.reader.buffer().is_empty() {
                return Err(UpstreamError::Protocol(format!(
                    "{} sent data before the TLS handshake",
                    up.host
                )));
            }
            starttls_us = clock.lap();
            let stream = upgrade.upgrade(up.reader.into_inner()).await?;
            up.reader = BufReader::new(stream);
            tls_us = clock.lap();
            ehlo = up.ehlo(hostname).await?;
        }
        let ehlo_tls_us = clock.lap();
        up.eight_bit = ehlo.capabilities & EXT_8BIT_MIME != 0;
        up.size = (ehlo.size > 0).then_some(ehlo.size as u64);
        up.authenticate(config, &entry.access_token, server.port)
            .await?;
        let auth_us = clock.lap();
        tracing::debug!(protocol = %Protocol::Smtp, connect_us, greeting_us, ehlo_us, starttls_us,
            tls_us, ehlo_tls_us, auth_us, "upstream set-up steps");
        Ok(up)
    }

    async fn ehlo(&mut self, hostname: &str) -> Result<EhloResponse<String>, UpstreamError> {
        self.send(&format!("EHLO {hostname}")).await?;
        let raw = self.raw_reply(REPLY_TIMEOUT).await?;
        let reply = parse_reply(&raw);
        if reply.code != 250 {
            return Err(self.protocol("answered EHLO with", &reply));
        }
        EhloResponse::parse(&mut raw.iter()).map_err(|e| {
            UpstreamError::Protocol(format!("{}: unreadable EHLO reply: {e}", self.host))
        })
    }

    async fn authenticate(
        &mut self,
        config: &GatewayConfig,
        token: &SecretValue,
        port: u16,
    ) -> Result<(), UpstreamError> {
        let (name, sasl, ack) = match config.mechanism {
            UpstreamMechanism::XOAuth2 => (
                "XOAUTH2",
                crate::mailbox::xoauth2(&config.mailbox, token),
                "",
            ),
            UpstreamMechanism::OAuthBearer => (
                "OAUTHBEARER",
                crate::mailbox::oauthbearer(&config.mailbox, &self.host, port, token),
                // base64 of %x01 (RFC 7628 §3.2.3).
                "AQ==",
            ),
        };
        // The line carries the token: written here and nowhere else, never logged.
        self.write_secret_line(&format!("AUTH {name} "), &sasl)
            .await?;
        let mut reply = self.reply(REPLY_TIMEOUT).await?;
        let mut challenge = None;
        if reply.code == 334 {
            // An error challenge (base64 JSON): acknowledge it and read the final answer.
            challenge = Some(crate::mailbox::decode_challenge(
                reply.lines.first().map(String::as_str).unwrap_or_default(),
            ));
            reply = self.command(ack).await?;
        }
        match reply.code {
            235 => Ok(()),
            _ => {
                let detail = match challenge {
                    Some(c) => format!("{} ({c})", reply.text()),
                    None => reply.text(),
                };
                Err(UpstreamError::AuthFailed(format!(
                    "{} refused AUTH {name}: {detail}",
                    self.host
                )))
            }
        }
    }

    /// Send one command line and read the reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        self.send(line).await?;
        self.reply(REPLY_TIMEOUT).await
    }

    /// Queue one line of the message body (as the app sent it, dot-stuffed, without its line end).
    pub async fn data_line(&mut self, line: &[u8]) -> Result<(), UpstreamError> {
        self.out.extend_from_slice(line);
        self.out.extend_from_slice(b"\r\n");
        if self.out.len() >= WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// End the message with the final dot and read the server's answer to it.
    pub async fn finish_data(&mut self) -> Result<Reply, UpstreamError> {
        self.out.extend_from_slice(b".\r\n");
        self.flush().await?;
        self.reply(DATA_END_TIMEOUT).await
    }

    /// Say goodbye (best effort) and close.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.command("QUIT")).await;
    }

    async fn send(&mut self, line: &str) -> Result<(), UpstreamError> {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.flush().await
    }

    async fn write_secret_line(
        &mut self,
        prefix: &str,
        secret: &SecretValue,
    ) -> Result<(), UpstreamError> {
        self.out.extend_from_slice(prefix.as_bytes());
        self.out.extend_from_slice(secret.expose().as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), UpstreamError> {
        let out = std::mem::take(&mut self.out);
        let write = async {
            let stream = self.reader.get_mut();
            stream.write_all(&out).await?;
            stream.flush().await
        };
        match tokio::time::timeout(REPLY_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(format!(
                "{}: connection lost: {e}",
                self.host
            ))),
            Err(_) => Err(UpstreamError::Unreachable(format!(
                "{}: not accepting data for {} s",
                self.host,
                REPLY_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn reply(&mut self, timeout: Duration) -> Result<Reply, UpstreamError> {
        let raw = self.raw_reply(timeout).await?;
        Ok(parse_reply(&raw))
    }

    /// One whole reply, raw (CRLF-ended lines), bounded in line length, line count and time.
    async fn raw_reply(&mut self, timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
        let host = self.host.clone();
        let read = async {
            let mut raw = Vec::new();
            for _ in 0..REPLY_LINES {
                let bytes = match read_line(&mut self.reader, REPLY_LINE).await {
                    Ok(Line::Complete { bytes, .. }) => bytes,
                    Ok(Line::TooLong) => {
                        return Err(UpstreamError::Protocol(format!(
                            "{host} sent a reply line longer than {REPLY_LINE} bytes"
                        )));
                    }
                    Ok(Line::Closed) => {
                        return Err(UpstreamError::Unreachable(format!(
                            "{host} closed the connection"
                        )));
                    }
                    Err(e) => {
                        return Err(UpstreamError::Unreachable(format!(
                            "{host}: connection lost: {e}"
                        )));
                    }
                };
                let code_ok = bytes
                    .get(..3)
                    .is_some_and(|c| c.iter().all(u8::is_ascii_digit));
                if !code_ok || !matches!(bytes.get(3), None | Some(b' ' | b'-')) {
                    return Err(UpstreamError::Protocol(format!(
                        "{host} sent a line that is not an SMTP reply: {}",
                        crate::reason::outside_text(&String::from_utf8_lossy(&bytes), 128)
                    )));
                }
                let last = bytes.get(3) != Some(&b'-');
                raw.extend_from_slice(&bytes);
                raw.extend_from_slice(b"\r\n");
                if last {
                    return Ok(raw);
                }
            }
            Err(UpstreamError::Protocol(format!(
                "{host} sent a reply of more than {REPLY_LINES} lines"
            )))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Unreachable(format!(
                "{host}: no reply within {} s",
                timeout.as_secs()
            ))),
        }
    }

    fn protocol(&self, what: &str, reply: &Reply) -> UpstreamError {
        UpstreamError::Protocol(format!("{} {what} {}", self.host, reply.text()))
    }
}

/// A reply's code and text from its raw lines (already checked to start with three digits).
fn parse_reply(raw: &[u8]) -> Reply {
    let mut code = 0u16;
    let mut lines = Vec::new();
    for line in raw.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(digits) = line.get(..3) else {
            continue;
        };
        if code == 0 {
            code = std::str::from_utf8(digits)
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
        }
        let text = line.get(4..).unwrap_or_default();
        lines.push(crate::reason::outside_text(
            &String::from_utf8_lossy(text),
            REPLY_LINE,
        ));
    }
    Reply { code, lines }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_relayed_as_the_server_wrote_them() {
        let r = parse_reply(b"250-first\r\n250 2.0.0 Ok: queued as X\r\n");
        assert_eq!(r.code, 250);
        assert_eq!(r.wire(), "250-first\r\n250 2.0.0 Ok: queued as X\r\n");
        let r = parse_reply(b"550 5.1.1 <x@y>: bad\x07 recipient\r\n");
        assert_eq!(r.wire(), "550 5.1.1 <x@y>: bad  recipient\r\n");
        assert_eq!(parse_reply(b"354\r\n").wire(), "354 \r\n");
    }

    #[test]
    fn microsofts_smtp_auth_switch_is_recognised() {
        assert!(is_smtp_auth_disabled(
            "smtp.office365.com refused AUTH XOAUTH2: 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
        ));
        assert!(!is_smtp_auth_disabled(
            "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect."
        ));
        assert!(!is_smtp_auth_disabled(
            "535 5.7.3 Authentication unsuccessful"
        ));
    }
}
