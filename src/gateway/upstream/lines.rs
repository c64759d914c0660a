//! A bounded line reader over the upstream stream, for the few lines of an authentication: each
//! line at most [`MAX_LINE`] bytes, at most [`MAX_LINES`] lines per session set-up. What was read
//! past the last line is handed back with the stream, so that the relay delivers it to the app.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Stream, TlsUpgrade, UpstreamError, decode_challenge, failure_ack};
use crate::{
    mailbox::{SaslMechanism, encode_sasl, printable},
    secret::SecretValue,
};

/// The longest line read from a server before the relay starts.
pub const MAX_LINE: usize = 64 * 1024;
/// The most lines read from a server before the relay starts.
pub const MAX_LINES: usize = 200;

pub struct Lines {
    pub stream: Stream,
    buf: Vec<u8>,
    lines: usize,
    host: String,
}

impl Lines {
    pub fn new(stream: Stream, host: &str) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            lines: 0,
            host: host.to_owned(),
        }
    }

    /// The next line, without its CRLF, lossily decoded.
    pub async fn line(&mut self, when: &str) -> Result<String, UpstreamError> {
        self.lines = self.lines.saturating_add(1);
        if self.lines > MAX_LINES {
            return Err(UpstreamError::Protocol(format!(
                "{} sent more than {MAX_LINES} lines {when}",
                self.host
            )));
        }
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(end.saturating_add(1));
                let line = std::mem::replace(&mut self.buf, rest);
                let text = String::from_utf8_lossy(&line);
                return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
            }
            if self.buf.len() >= MAX_LINE {
                return Err(UpstreamError::Protocol(format!(
                    "{} sent a line longer than {MAX_LINE} bytes {when}",
                    self.host
                )));
            }
            let room = MAX_LINE.saturating_sub(self.buf.len()).min(4096);
            let n = (&mut self.stream)
                .take(room as u64)
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| UpstreamError::Unreachable(format!("{}: {e} {when}", self.host)))?;
            if n == 0 {
                return Err(UpstreamError::Unreachable(format!(
                    "{} closed the connection {when}",
                    self.host
                )));
            }
        }
    }

    /// Send one line (CRLF added). Lines may carry the token: they are never logged.
    pub async fn send(&mut self, line: &[u8], when: &str) -> Result<(), UpstreamError> {
        let mut out = Vec::with_capacity(line.len().saturating_add(2));
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        let io =
            |e: std::io::Error| UpstreamError::Unreachable(format!("{}: {e} {when}", self.host));
        self.stream.write_all(&out).await.map_err(io)?;
        self.stream.flush().await.map_err(io)
    }

    /// The server's greeting: the line when it starts with `ok`; else the server refused the
    /// connection (a line starting with `refused`) or does not speak `protocol`.
    pub async fn greeting(
        &mut self,
        protocol: &str,
        ok: &str,
        refused: &str,
    ) -> Result<String, UpstreamError> {
        let line = self
            .line(&format!("before the {protocol} greeting"))
            .await?;
        if line.starts_with(ok) {
            return Ok(line);
        }
        let host = &self.host;
        Err(if line.starts_with(refused) {
            UpstreamError::Unreachable(format!(
                "{host} refused the connection: {}",
                printable(&line)
            ))
        } else {
            UpstreamError::Protocol(format!(
                "{host} did not greet like an {protocol} server: {}",
                printable(&line)
            ))
        })
    }

    /// After the server's `reply` to `command` (STARTTLS, STLS): on its go-ahead (`ok`), the TLS
    /// handshake and a reader over the TLS stream; else an error: the token is never sent without
    /// TLS.
    pub async fn start_tls(
        self,
        upgrade: &TlsUpgrade,
        command: &str,
        reply: &str,
        ok: bool,
    ) -> Result<Lines, UpstreamError> {
        if !ok {
            return Err(UpstreamError::Tls(format!(
                "{} refused {command} ({}); the token is not sent without TLS",
                self.host,
                printable(reply)
            )));
        }
        let host = self.host.clone();
        let stream = upgrade.upgrade(self.into_stream_for_tls()?).await?;
        Ok(Lines::new(stream, &host))
    }

    /// Send the SASL response carrying the token (XOAUTH2 or OAUTHBEARER, base64).
    pub async fn send_sasl(&mut self, sasl: &SecretValue) -> Result<(), UpstreamError> {
        self.send(
            encode_sasl(sasl.expose().as_bytes()).as_bytes(),
            "while authenticating",
        )
        .await
    }

    /// Send `command`, a space and the SASL response carrying the token as its initial response
    /// (SASL-IR), in one line.
    pub async fn send_sasl_ir(
        &mut self,
        command: &[u8],
        sasl: &SecretValue,
    ) -> Result<(), UpstreamError> {
        let encoded = encode_sasl(sasl.expose().as_bytes());
        let mut line = Vec::with_capacity(
            command
                .len()
                .saturating_add(encoded.len())
                .saturating_add(1),
        );
        line.extend_from_slice(command);
        line.push(b' ');
        line.extend_from_slice(encoded.as_bytes());
        self.send(&line, "after AUTHENTICATE").await
    }

    /// An error challenge (`data`, the base64 after `+`): acknowledged as `mechanism` requires, so
    /// that the server ends the exchange with its failure reply; its decoded text, for the error.
    pub async fn acknowledge_error(
        &mut self,
        mechanism: SaslMechanism,
        data: &str,
    ) -> Result<String, UpstreamError> {
        self.send(failure_ack(mechanism).as_bytes(), "while authenticating")
            .await?;
        Ok(decode_challenge(data))
    }

    /// The stream back, for STARTTLS: nothing may have been read past the server's go-ahead.
    pub fn into_stream_for_tls(self) -> Result<Stream, UpstreamError> {
        if !self.buf.is_empty() {
            return Err(UpstreamError::Tls(format!(
                "{} sent data before the TLS handshake",
                self.host
            )));
        }
        Ok(self.stream)
    }

    /// The stream and what was read past the last line.
    pub fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.stream, self.buf)
    }
}
