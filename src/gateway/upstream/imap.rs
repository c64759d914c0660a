//! The gateway's IMAP client towards the mail server, up to the authenticated state: greeting,
//! STARTTLS when the server needs it, `AUTHENTICATE XOAUTH2|OAUTHBEARER` with the token sent as
//! the answer to the server's continuation (not as SASL-IR: not every server offers it), an error
//! challenge acknowledged so that the server ends with its tagged `NO`. Hand-written like
//! `src/mailbox/pop3.rs`: it is five lines of protocol, and the relay needs the raw stream back
//! with whatever the server sent past its reply (a client crate keeps both to itself).

use super::{Lines, Stream, TlsUpgrade, UpstreamError};
use crate::{mailbox::SaslMechanism, secret::SecretValue};

/// What a successful authentication leaves.
pub struct Authenticated {
    pub lines: Lines,
    /// The tagged OK without its tag: `OK [CAPABILITY ...] Logged in`.
    pub reply: String,
    /// Untagged lines the server sent between the command and its OK (with CRLF).
    pub untagged: Vec<u8>,
}

pub async fn authenticate(
    stream: Stream,
    starttls: Option<&TlsUpgrade>,
    host: &str,
    mechanism: SaslMechanism,
    sasl: &SecretValue,
) -> Result<Authenticated, UpstreamError> {
    let mut lines = Lines::new(stream, host);
    lines.greeting("IMAP", "* OK", "* BYE").await?;
    if let Some(upgrade) = starttls {
        lines.send(b"G0 STARTTLS", "after STARTTLS").await?;
        let reply = tagged(&mut lines, "G0 ", "after STARTTLS", &mut Vec::new()).await?;
        let ok = reply.starts_with("OK");
        lines = lines.start_tls(upgrade, "STARTTLS", &reply, ok).await?;
    }
    lines
        .send(
            format!("G1 AUTHENTICATE {}", mechanism.name()).as_bytes(),
            "after AUTHENTICATE",
        )
        .await?;
    let mut untagged = Vec::new();
    let mut challenge = None;
    let mut sent = false;
    loop {
        let line = lines.line("while authenticating").await?;
        if let Some(rest) = line.strip_prefix("G1 ") {
            if rest.starts_with("OK") {
                return Ok(Authenticated {
                    lines,
                    reply: rest.to_owned(),
                    untagged,
                });
            }
            return Err(UpstreamError::AuthFailed(
                challenge.unwrap_or_else(|| crate::mailbox::printable(rest)),
            ));
        } else if let Some(data) = line.strip_prefix('+') {
            if sent {
                // An error challenge: keep it, acknowledge, read the tagged NO.
                challenge = Some(lines.acknowledge_error(mechanism, data).await?);
            } else {
                sent = true;
                lines.send_sasl(sasl).await?;
            }
        } else if line.starts_with("* ") {
            if untagged.len().saturating_add(line.len()) > super::lines::MAX_LINE {
                return Err(UpstreamError::Protocol(format!(
                    "{host} sent too much before its AUTHENTICATE reply"
                )));
            }
            untagged.extend_from_slice(line.as_bytes());
            untagged.extend_from_slice(b"\r\n");
        } else {
            return Err(UpstreamError::Protocol(format!(
                "{host} answered AUTHENTICATE with {}",
                crate::mailbox::printable(&line)
            )));
        }
    }
}

/// Read to the tagged reply of `tag`; its text without the tag. Untagged lines are collected.
async fn tagged(
    lines: &mut Lines,
    tag: &str,
    when: &str,
    untagged: &mut Vec<String>,
) -> Result<String, UpstreamError> {
    loop {
        let line = lines.line(when).await?;
        if let Some(rest) = line.strip_prefix(tag) {
            return Ok(rest.to_owned());
        }
        untagged.push(line);
    }
}
