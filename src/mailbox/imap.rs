//! IMAP over `async-imap`: greeting, optional STARTTLS, `AUTHENTICATE`, `EXAMINE INBOX`, `LOGOUT`.
//!
//! async-imap does the SASL exchange through its [`Authenticator`] trait, which sees every server
//! challenge: the first (empty) one is answered with the token, an error challenge is kept for the
//! error detail and answered as the mechanism requires, so the server ends with its tagged `NO`.
//! STARTTLS is a plain tagged command; the stream is then taken back, wrapped in TLS and handed to a
//! new client.
//!
//! Every stream handed to async-imap is [`Bounded`] with its literal guard: async-imap sizes its
//! buffer from the server's literal announcements (see [`super::bounded`]).
//!
//! Logging: async-imap logs every line it writes at `trace` level through the `log` crate, and the
//! `AUTHENTICATE` continuation carries the token. This crate caps `log` statically at `debug`
//! (`max_level_debug` in Cargo.toml), so those records are compiled out.

use std::{
    fmt::Debug,
    sync::{Arc, Mutex},
};

use async_imap::{
    Authenticator, Client,
    error::Error as ImapError,
    imap_proto::{Response, Status},
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{MailboxError, Session, bounded::Bounded, sasl, tls};
use crate::api::TlsMode;

pub(super) async fn check(s: &Session<'_>) -> Result<Option<u32>, MailboxError> {
    let host = s.target.host.as_str();
    let tcp = tls::connect(host, s.target.port, s.target.allowed.as_deref()).await?;
    match s.target.tls {
        TlsMode::Implicit => {
            s.progress.at("in the TLS handshake");
            let stream = tls::handshake(s.tls_config()?, host, s.target.port, tcp).await?;
            let mut client = Client::new(Bounded::new(stream).imap());
            greeting(&mut client, s).await?;
            authenticated_check(client, s).await
        }
        TlsMode::StartTls => {
            let mut client = Client::new(Bounded::new(tcp).imap());
            greeting(&mut client, s).await?;
            s.progress.at("waiting for the STARTTLS answer");
            match client.run_command_and_check_ok("STARTTLS", None).await {
                Ok(()) => {}
                Err(ImapError::No(text) | ImapError::Bad(text)) => {
                    return Err(MailboxError::Tls {
                        detail: format!(
                            "{host} refused STARTTLS ({}); the token is not sent without TLS",
                            status_text(&text)
                        ),
                    });
                }
                Err(e) => return Err(imap_error(e, host, "after STARTTLS")),
            }
            s.progress.at("in the TLS handshake");
            // The handshake runs on the bare socket (rustls bounds its own records); the rest of
            // the check goes on with what is left of the budget, its literals read as before.
            let plain = client.into_inner();
            let remaining = plain.remaining();
            let stream =
                tls::handshake(s.tls_config()?, host, s.target.port, plain.into_inner()).await?;
            let stream = Bounded::with_remaining(stream, remaining).imap();
            authenticated_check(Client::new(stream), s).await
        }
        TlsMode::None => {
            let mut client = Client::new(Bounded::new(tcp).imap());
            greeting(&mut client, s).await?;
            authenticated_check(client, s).await
        }
    }
}

async fn greeting<T>(client: &mut Client<T>, s: &Session<'_>) -> Result<(), MailboxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Debug + Send,
{
    let host = s.target.host.as_str();
    s.progress.at("waiting for the IMAP greeting");
    let response = client
        .read_response()
        .await
        .map_err(|e| tls::classify_io(&e, host, "before the IMAP greeting"))?
        .ok_or_else(|| MailboxError::Unreachable {
            detail: format!("{host} closed the connection before the IMAP greeting"),
        })?;
    match response.parsed() {
        Response::Data {
            status: Status::Ok | Status::PreAuth,
            ..
        } => Ok(()),
        Response::Data {
            status: Status::Bye,
            outcome,
        } => Err(MailboxError::Unreachable {
            detail: format!(
                "{host} refused the connection: BYE {}",
                sasl::printable(outcome.information.as_deref().unwrap_or(""))
            ),
        }),
        other => Err(MailboxError::Protocol {
            detail: format!("{host} did not greet like an IMAP server: {other:?}")
                .chars()
                .take(300)
                .collect(),
        }),
    }
}

/// Answers the server's SASL challenges: the token first, then the mechanism's failure ack for an
/// error challenge, which it keeps.
struct SaslExchange {
    initial: Option<Vec<u8>>,
    ack: &'static [u8],
    error_challenge: Arc<Mutex<Option<String>>>,
}

impl Authenticator for SaslExchange {
    type Response = Vec<u8>;

    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        if let Some(initial) = self.initial.take() {
            return initial;
        }
        let text = sasl::printable(&String::from_utf8_lossy(challenge));
        *self
            .error_challenge
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(text);
        self.ack.to_vec()
    }
}

async fn authenticated_check<T>(
    client: Client<T>,
    s: &Session<'_>,
) -> Result<Option<u32>, MailboxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Debug + Send,
{
    let host = s.target.host.as_str();
    let mechanism = s.target.mechanism;
    let error_challenge = Arc::new(Mutex::new(None));
    let exchange = SaslExchange {
        initial: Some(s.sasl.expose().as_bytes().to_vec()),
        ack: mechanism.failure_ack(),
        error_challenge: error_challenge.clone(),
    };
    s.progress.at("authenticating");
    let mut session = match client.authenticate(mechanism.name(), exchange).await {
        Ok(session) => session,
        Err((e, _client)) => {
            let challenge = error_challenge
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            return Err(match e {
                ImapError::No(text) => MailboxError::AuthFailed {
                    detail: challenge.unwrap_or_else(|| format!("NO {}", status_text(&text))),
                },
                ImapError::Bad(text) => MailboxError::Protocol {
                    detail: format!(
                        "{host} rejected AUTHENTICATE {mechanism}: BAD {} (does it offer AUTH={mechanism}?)",
                        status_text(&text)
                    ),
                },
                other => imap_error(other, host, "while authenticating"),
            });
        }
    };
    // Microsoft 365 can accept the token and then answer "User is authenticated but not connected"
    // to every command: only a command after AUTHENTICATE shows that the mailbox is usable.
    s.progress.at("opening INBOX");
    let mailbox = match session.examine("INBOX").await {
        Ok(mailbox) => mailbox,
        Err(ImapError::No(text)) => {
            return Err(MailboxError::AuthFailed {
                detail: format!(
                    "the token was accepted, but EXAMINE INBOX failed: NO {}",
                    status_text(&text)
                ),
            });
        }
        Err(e) => return Err(imap_error(e, host, "while opening INBOX")),
    };
    s.progress.at("logging out");
    // The check has its answer; a server that drops the connection on LOGOUT changes nothing.
    let _ = session.logout().await;
    Ok(Some(mailbox.exists))
}

fn imap_error(e: ImapError, host: &str, when: &str) -> MailboxError {
    match e {
        ImapError::Io(io) => tls::classify_io(&io, host, when),
        ImapError::ConnectionLost => MailboxError::Unreachable {
            detail: format!("{host} closed the connection {when}"),
        },
        ImapError::No(text) => MailboxError::Protocol {
            detail: format!("{host} answered NO {when}: {}", status_text(&text)),
        },
        ImapError::Bad(text) => MailboxError::Protocol {
            detail: format!("{host} answered BAD {when}: {}", status_text(&text)),
        },
        other => MailboxError::Protocol {
            detail: format!("{host}: {}", sasl::printable(&other.to_string())),
        },
    }
}

/// async-imap reports a tagged NO/BAD as Debug text, `code: Some(AuthenticationFailed), info:
/// Some("text")` or `outcome: Outcome { code: None, information: Some("text") }`; turn either into
/// `[AuthenticationFailed] text`.
fn status_text(raw: &str) -> String {
    let info = ["information: Some(\"", "info: Some(\""]
        .iter()
        .find_map(|marker| raw.split_once(marker))
        .and_then(|(before, rest)| {
            let end = rest.rfind("\")")?;
            Some((before, rest[..end].replace("\\\"", "\"")))
        });
    let Some((before, info)) = info else {
        return sasl::printable(raw);
    };
    let code = before
        .split_once("code: Some(")
        .and_then(|(_, rest)| rest.rsplit_once("),"))
        .map(|(code, _)| code);
    sasl::printable(&match code {
        Some(code) => format!("[{code}] {info}"),
        None => info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_records_that_would_hold_the_token_are_compiled_out() {
        // async-imap logs the AUTHENTICATE continuation (the token) with log::trace!.
        assert!(log::STATIC_MAX_LEVEL <= log::LevelFilter::Debug);
    }

    #[test]
    fn status_text_is_readable() {
        assert_eq!(
            status_text(
                r#"code: Some(AuthenticationFailed), info: Some("Authentication failed.")"#
            ),
            "[AuthenticationFailed] Authentication failed."
        );
        assert_eq!(
            status_text(r#"code: None, info: Some("User is authenticated but not connected.")"#),
            "User is authenticated but not connected."
        );
        assert_eq!(
            status_text(
                r#"outcome: Outcome { code: None, information: Some("User is authenticated but not connected.") }"#
            ),
            "User is authenticated but not connected."
        );
        assert_eq!(
            status_text(
                r#"outcome: Outcome { code: Some(Alert), information: Some("say \"hi\"") }"#
            ),
            r#"[Alert] say "hi""#
        );
        assert_eq!(status_text("whatever"), "whatever");
    }

    #[test]
    fn exchange_sends_the_token_then_keeps_the_error_challenge() {
        let kept = Arc::new(Mutex::new(None));
        let mut ex = SaslExchange {
            initial: Some(b"first".to_vec()),
            ack: b"\x01",
            error_challenge: kept.clone(),
        };
        assert_eq!(ex.process(b""), b"first");
        assert_eq!(ex.process(br#"{"status":"invalid_token"}"#), b"\x01");
        assert_eq!(
            kept.lock().unwrap().as_deref(),
            Some(r#"{"status":"invalid_token"}"#)
        );
    }
}
