//! The gateway's POP3 client towards the mail server, up to the transaction state: greeting, STLS
//! when the server needs it, `AUTH XOAUTH2|OAUTHBEARER` (RFC 5034) with the token as the answer to
//! the server's empty challenge (the AUTH line is limited to 255 octets). Hand-written as the
//! mailbox check's POP3 is (no maintained async POP3 crate).

use super::{Lines, Stream, TlsUpgrade, UpstreamError};
use crate::{mailbox::SaslMechanism, secret::SecretValue};

pub async fn authenticate(
    stream: Stream,
    starttls: Option<&TlsUpgrade>,
    host: &str,
    mechanism: SaslMechanism,
    sasl: &SecretValue,
) -> Result<(Lines, String), UpstreamError> {
    let mut lines = Lines::new(stream, host);
    // Anything but +OK is a refusal (POP3 greets with nothing else).
    lines.greeting("POP3", "+OK", "").await?;
    if let Some(upgrade) = starttls {
        lines.send(b"STLS", "after STLS").await?;
        let reply = lines.line("after STLS").await?;
        let ok = reply.starts_with("+OK");
        lines = lines.start_tls(upgrade, "STLS", &reply, ok).await?;
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
    lines.send_sasl(sasl).await?;
    let mut reply = lines.line("while authenticating").await?;
    let mut challenge = None;
    if !reply.starts_with("+OK")
        && let Some(data) = reply.strip_prefix('+')
    {
        challenge = Some(lines.acknowledge_error(mechanism, data).await?);
        reply = lines.line("while authenticating").await?;
    }
    if reply.starts_with("+OK") {
        return Ok((lines, reply));
    }
    Err(UpstreamError::AuthFailed(
        challenge.unwrap_or_else(|| crate::mailbox::printable(&reply)),
    ))
}
