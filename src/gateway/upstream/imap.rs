//! The gateway's IMAP client towards the mail server, up to the authenticated state: greeting,
//! STARTTLS when the server needs it, `AUTHENTICATE XOAUTH2|OAUTHBEARER` with the token sent as
//! an initial response (SASL-IR, RFC 4959) when the greeting's capabilities offer it (one round
//! trip less: Dovecot, Gmail and Outlook do), else as the answer to the server's continuation; an
//! error challenge acknowledged so that the server ends with its tagged `NO`. Hand-written like
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
    let greeting = lines.greeting("IMAP", "* OK", "* BYE").await?;
    // Capabilities seen before STARTTLS are not to be trusted after it (RFC 9051 6.2.1); asking
    // again would cost the round trip SASL-IR saves, so after STARTTLS the two-step exchange.
    let initial_response = starttls.is_none() && offers_sasl_ir(&greeting);
    if let Some(upgrade) = starttls {
        lines.send(b"G0 STARTTLS", "after STARTTLS").await?;
        let reply = tagged(&mut lines, "G0 ", "after STARTTLS", &mut Vec::new()).await?;
        let ok = reply.starts_with("OK");
        lines = lines.start_tls(upgrade, "STARTTLS", &reply, ok).await?;
    }
    let command = format!("G1 AUTHENTICATE {}", mechanism.name());
    if initial_response {
        lines.send_sasl_ir(command.as_bytes(), sasl).await?;
    } else {
        lines.send(command.as_bytes(), "after AUTHENTICATE").await?;
    }
    let mut untagged = Vec::new();
    let mut challenge = None;
    // With SASL-IR the token is sent already: any continuation is an error challenge.
    let mut sent = initial_response;
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

/// Whether an IMAP greeting (`* OK [CAPABILITY ... SASL-IR ...] ...`) lists SASL-IR.
pub(super) fn offers_sasl_ir(greeting: &str) -> bool {
    let Some(rest) = greeting.strip_prefix("* OK") else {
        return false;
    };
    let Some(code) = rest.trim_start().strip_prefix('[') else {
        return false;
    };
    let code = code.split(']').next().unwrap_or_default();
    let mut words = code.split_ascii_whitespace();
    words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("CAPABILITY"))
        && words.any(|w| w.eq_ignore_ascii_case("SASL-IR"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::encode_sasl;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::{TcpListener, TcpStream},
    };

    const DOVECOT: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=XOAUTH2 AUTH=OAUTHBEARER] Dovecot ready.";
    const NO_SASL_IR: &str = "* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready";

    /// A scripted server on loopback: sends `greeting`, then for each `(expected, answer)` reads a
    /// line, checks it and answers. What the client sent, for the test to look at.
    async fn exchange(
        greeting: &'static str,
        script: Vec<(String, &'static str)>,
        mechanism: SaslMechanism,
    ) -> (Result<Authenticated, UpstreamError>, Vec<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut socket = BufReader::new(socket);
            socket
                .get_mut()
                .write_all(format!("{greeting}\r\n").as_bytes())
                .await
                .unwrap();
            let mut seen = Vec::new();
            for (expected, answer) in script {
                let mut line = String::new();
                socket.read_line(&mut line).await.unwrap();
                let line = line.trim_end().to_owned();
                let matches = line == expected;
                seen.push(line);
                if !matches {
                    break;
                }
                socket.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
            seen
        });
        let stream = Stream::Plain(TcpStream::connect(addr).await.unwrap());
        let sasl = SecretValue::new("user=a@example.com\x01auth=Bearer tok-123456789\x01\x01");
        let result = authenticate(stream, None, "127.0.0.1", mechanism, &sasl).await;
        (result, server.await.unwrap())
    }

    fn encoded() -> String {
        encode_sasl(b"user=a@example.com\x01auth=Bearer tok-123456789\x01\x01")
    }

    #[test]
    fn sasl_ir_is_read_from_the_greeting_capabilities_only() {
        assert!(offers_sasl_ir(DOVECOT));
        assert!(offers_sasl_ir("* OK [capability imap4rev1 sasl-ir] hi"));
        assert!(!offers_sasl_ir(NO_SASL_IR));
        assert!(!offers_sasl_ir("* OK ready SASL-IR"));
        assert!(!offers_sasl_ir("* OK [ALERT SASL-IR] hi"));
        assert!(!offers_sasl_ir("* OK [CAPABILITY IMAP4rev1] SASL-IR"));
        assert!(!offers_sasl_ir("* PREAUTH [CAPABILITY SASL-IR] hi"));
        assert!(!offers_sasl_ir("* OK [CAPABILITY"));
    }

    #[tokio::test]
    async fn with_sasl_ir_the_token_goes_in_the_authenticate_line() {
        for mechanism in [SaslMechanism::XOAuth2, SaslMechanism::OAuthBearer] {
            let command = format!("G1 AUTHENTICATE {} {}", mechanism.name(), encoded());
            let (result, seen) = exchange(
                DOVECOT,
                vec![(command.clone(), "* CAPABILITY X\r\nG1 OK Logged in\r\n")],
                mechanism,
            )
            .await;
            assert_eq!(seen, vec![command], "{mechanism}");
            let done = result.unwrap();
            assert_eq!(done.reply, "OK Logged in");
            assert_eq!(done.untagged, b"* CAPABILITY X\r\n");
        }
    }

    #[tokio::test]
    async fn without_sasl_ir_the_token_answers_the_continuation() {
        let (result, seen) = exchange(
            NO_SASL_IR,
            vec![
                ("G1 AUTHENTICATE XOAUTH2".into(), "+ \r\n"),
                (encoded(), "G1 OK Logged in\r\n"),
            ],
            SaslMechanism::XOAuth2,
        )
        .await;
        assert_eq!(seen, vec!["G1 AUTHENTICATE XOAUTH2".to_owned(), encoded()]);
        assert_eq!(result.unwrap().reply, "OK Logged in");
    }

    #[tokio::test]
    async fn an_error_challenge_after_sasl_ir_is_acknowledged_and_reported() {
        let command = format!("G1 AUTHENTICATE XOAUTH2 {}", encoded());
        let ack = encode_sasl(SaslMechanism::XOAuth2.failure_ack());
        // {"status":"401"}
        let (result, seen) = exchange(
            DOVECOT,
            vec![
                (command.clone(), "+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
                (ack.clone(), "G1 NO [AUTHENTICATIONFAILED] failed\r\n"),
            ],
            SaslMechanism::XOAuth2,
        )
        .await;
        assert_eq!(seen, vec![command, ack]);
        match result {
            Err(UpstreamError::AuthFailed(detail)) => {
                assert!(detail.contains("401"), "{detail}");
                assert!(!detail.contains("tok-123456789"), "{detail}");
            }
            other => panic!("{:?}", other.map(|d| d.reply)),
        }
    }
}
