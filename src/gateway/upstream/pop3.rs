//! The gateway's POP3 client towards the mail server, up to the transaction state: greeting, STLS
//! when the server needs it, `AUTH XOAUTH2|OAUTHBEARER` (RFC 5034) with the token as the answer to
//! the server's empty challenge (the AUTH line is limited to 255 octets). Hand-written as the
//! mailbox check's POP3 is (no maintained async POP3 crate).

use super::{Lines, Stream, TlsUpgrade, UpstreamError, decode_challenge, failure_ack};
use crate::{mailbox::SaslMechanism, secret::SecretValue};

pub async fn authenticate(
    stream: Stream,
    starttls: Option<&TlsUpgrade>,
    host: &str,
    mechanism: SaslMechanism,
    sasl: &SecretValue,
) -> Result<(Lines, String), UpstreamError> {
    let mut lines = Lines::new(stream, host);
    let greeting = lines.line("before the POP3 greeting").await?;
    if !greeting.starts_with("+OK") {
        return Err(UpstreamError::Unreachable(format!(
            "{host} refused the connection: {}",
            crate::mailbox::printable(&greeting)
        )));
    }
    if let Some(upgrade) = starttls {
        lines.send(b"STLS", "after STLS").await?;
        let reply = lines.line("after STLS").await?;
        if !reply.starts_with("+OK") {
            return Err(UpstreamError::Tls(format!(
                "{host} refused STLS ({}); the token is not sent without TLS",
                crate::mailbox::printable(&reply)
            )));
        }
        let stream = upgrade.upgrade(lines.into_stream_for_tls()?).await?;
        lines = Lines::new(stream, host);
    }
    lines
        .send(
            format!("AUTH {}", mechanism.name()).as_bytes(),
            "after AUTH",
        )
        .await?;
    let reply = lines.line("after AUTH").await?;
    if !reply.starts_with('+') || reply.starts_with("+OK") {
        return Err(UpstreamError::Protocol(format!(
            "{host} did not start AUTH {mechanism}: {}",
            crate::mailbox::printable(&reply)
        )));
    }
    lines
        .send(
            crate::mailbox::encode_sasl(sasl.expose().as_bytes()).as_bytes(),
            "while authenticating",
        )
        .await?;
    let mut reply = lines.line("while authenticating").await?;
    let mut challenge = None;
    if !reply.starts_with("+OK")
        && let Some(data) = reply.strip_prefix('+')
    {
        challenge = Some(decode_challenge(data));
        lines
            .send(failure_ack(mechanism).as_bytes(), "while authenticating")
            .await?;
        reply = lines.line("while authenticating").await?;
    }
    if reply.starts_with("+OK") {
        return Ok((lines, reply));
    }
    Err(UpstreamError::AuthFailed(
        challenge.unwrap_or_else(|| crate::mailbox::printable(&reply)),
    ))
}
