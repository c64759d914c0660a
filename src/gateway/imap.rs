//! IMAP towards apps: the not-authenticated state (greeting, CAPABILITY, NOOP, LOGOUT, STARTTLS,
//! ID, LOGIN, AUTHENTICATE PLAIN with SASL-IR or a continuation), then the relay to the
//! integration's server.
//!
//! Commands are parsed with `imap-codec` (the maintained IMAP codec; `CommandCodec` for commands,
//! `AuthenticateDataCodec` for the continuation line). Hand-written here: the framing around it
//! ([`super::wire`]: lines of at most `--max-line` bytes, synchronizing literals of at most
//! `--max-literal` answered with a continuation only when they fit, so nothing unbounded is ever
//! buffered) and the replies, which are a few fixed lines. The capabilities shown before login
//! are only what the gateway itself does before login; after login the app talks to the server,
//! whose own capabilities come with its login reply.

use std::{net::SocketAddr, sync::Arc};

use imap_codec::{
    AuthenticateDataCodec, CommandCodec,
    decode::{CommandDecodeError, Decoder},
    imap_types::{
        auth::{AuthMechanism, AuthenticateData},
        command::{Command, CommandBody},
        core::LiteralMode,
    },
};

use super::{
    Ctx,
    listen::{ClientStream, TlsState},
    login::retry_secs,
    logout::LogoutWatch,
    parked::LoginAnswer,
    prelogin::{Conn, Ending, ImapFollow, Refusal, TlsStart},
    session::{LoginRefused, Protocol},
    upstream,
    wire::{ReadError, parse_plain},
};
use crate::secret::SecretValue;

/// A pre-login command as the gateway acts on it. Pure parsing result, for the property tests.
#[derive(Debug, PartialEq, Eq)]
pub enum PreLogin {
    Capability {
        tag: String,
    },
    Noop {
        tag: String,
    },
    Logout {
        tag: String,
    },
    StartTls {
        tag: String,
    },
    Id {
        tag: String,
    },
    Login {
        tag: String,
        username: String,
        password: SecretValue,
    },
    /// `initial` is the decoded SASL-IR, if any (`Some(empty)` for `=`).
    Authenticate {
        tag: String,
        plain: bool,
        initial: Option<Vec<u8>>,
    },
    /// Any other command: not before login.
    Other {
        tag: String,
    },
}

/// What parsing a (partial) command message said.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Command(PreLogin),
    /// A synchronizing literal of `length` bytes follows the message so far.
    Literal {
        tag: String,
        length: u32,
        sync: bool,
    },
    /// More bytes are needed (the line is not complete).
    Incomplete,
    /// Not a command: BAD with the tag if one can be read.
    Bad {
        tag: Option<String>,
    },
}

fn rough_tag(message: &[u8]) -> Option<String> {
    let end = message.iter().position(|b| *b == b' ')?;
    let tag = std::str::from_utf8(message.get(..end)?).ok()?;
    (!tag.is_empty()
        && tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+]".contains(&b)))
    .then(|| tag.to_owned())
}

/// Parse a command message (a line, or lines with their literals). Pure; never panics.
pub fn parse(message: &[u8]) -> Parsed {
    let command: Command<'_> = match CommandCodec::default().decode(message) {
        Ok((_, command)) => command,
        Err(CommandDecodeError::Incomplete) => return Parsed::Incomplete,
        Err(CommandDecodeError::LiteralFound { tag, length, mode }) => {
            return Parsed::Literal {
                tag: tag.as_ref().to_owned(),
                length,
                sync: matches!(mode, LiteralMode::Sync),
            };
        }
        Err(CommandDecodeError::Failed) => {
            return Parsed::Bad {
                tag: rough_tag(message),
            };
        }
    };
    let tag = command.tag.as_ref().to_owned();
    Parsed::Command(match command.body {
        CommandBody::Capability => PreLogin::Capability { tag },
        CommandBody::Noop => PreLogin::Noop { tag },
        CommandBody::Logout => PreLogin::Logout { tag },
        CommandBody::StartTLS => PreLogin::StartTls { tag },
        CommandBody::Id { .. } => PreLogin::Id { tag },
        CommandBody::Login { username, password } => {
            match (
                std::str::from_utf8(username.as_ref()),
                std::str::from_utf8(password.declassify().as_ref()),
            ) {
                (Ok(u), Ok(p)) => PreLogin::Login {
                    tag,
                    username: u.to_owned(),
                    password: SecretValue::new(p),
                },
                _ => return Parsed::Bad { tag: Some(tag) },
            }
        }
        CommandBody::Authenticate {
            mechanism,
            initial_response,
        } => PreLogin::Authenticate {
            tag,
            plain: matches!(mechanism, AuthMechanism::Plain),
            initial: initial_response.map(|r| r.declassify().to_vec()),
        },
        _ => PreLogin::Other { tag },
    })
}

/// The continuation line of AUTHENTICATE: `Some(data)`, or `None` for `*` (cancel) or garbage.
pub fn parse_authenticate_line(line: &[u8]) -> Option<Vec<u8>> {
    match AuthenticateDataCodec::default().decode(line) {
        Ok((_, AuthenticateData::Continue(data))) => Some(data.declassify().to_vec()),
        _ => None,
    }
}

/// The capabilities before login.
pub fn capabilities(tls: &TlsState) -> String {
    let mut caps = vec!["IMAP4rev1", "SASL-IR"];
    if tls.starttls.is_some() && !tls.tls {
        caps.push("STARTTLS");
    }
    if tls.login_allowed() {
        caps.push("AUTH=PLAIN");
    } else {
        caps.push("LOGINDISABLED");
    }
    caps.join(" ")
}

enum Next {
    /// Read the next command.
    Continue,
    /// Close the connection.
    Close,
}

/// Read one command message (with its literals), within the pre-login bounds.
async fn read_command(conn: &mut Conn) -> Result<Parsed, ReadError> {
    let max_literal = conn.ctx.bounds.max_literal;
    let limit = conn.ctx.bounds.max_line.saturating_add(max_literal);
    let mut message = Vec::new();
    loop {
        let line = conn.wire.line().await?;
        message.extend_from_slice(&line);
        if message.len() > limit {
            return Err(ReadError::TooLong);
        }
        match parse(&message) {
            Parsed::Literal { tag, length, sync } => {
                let length = usize::try_from(length).unwrap_or(usize::MAX);
                if length > max_literal || message.len().saturating_add(length) > limit {
                    if !sync {
                        // The app sends the data anyway: no resynchronizing after it.
                        return Err(ReadError::TooLong);
                    }
                    return Ok(Parsed::Bad { tag: Some(tag) });
                }
                if sync && !conn.send("+ Ready for literal data\r\n").await {
                    return Err(ReadError::Closed);
                }
                let data = conn.wire.exact(length).await?;
                message.extend_from_slice(&data);
            }
            Parsed::Incomplete => {
                if message.ends_with(b"\n") {
                    return Ok(Parsed::Bad {
                        tag: rough_tag(&message),
                    });
                }
            }
            other => return Ok(other),
        }
    }
}

/// The greeting, with the capabilities before login.
pub fn greeting(tls: &TlsState, hostname: &str) -> String {
    format!(
        "* OK [CAPABILITY {}] {hostname} ready\r\n",
        capabilities(tls)
    )
}

/// Serve one IMAP connection (the listener table's entry point).
pub async fn serve(stream: ClientStream, source: SocketAddr, tls: TlsState, ctx: Arc<Ctx>) {
    let mut conn = Conn::new(stream, source, tls, ctx.clone());
    if !conn.tls.greeted && !conn.send(&greeting(&conn.tls, &ctx.hostname)).await {
        return;
    }
    let mut commands = 0usize;
    loop {
        if commands >= ctx.bounds.max_commands_before_login {
            ctx.metrics.closed(Protocol::Imap, "pre_login_limit");
            let _ = conn.send("* BYE Too many commands before login\r\n").await;
            return;
        }
        commands = commands.saturating_add(1);
        // The pre-login steps' futures are boxed: their state (a TLS handshake, the upstream
        // set-up) is large and short-lived, and would otherwise size this future, which an idle
        // relayed session keeps for hours (docs/gateway.md "Capacity").
        let read = Box::pin(Conn::timed(&ctx, Protocol::Imap, read_command(&mut conn)));
        let parsed = match read.await {
            Ok(parsed) => parsed,
            Err(ending) => {
                let farewell = match ending {
                    Ending::Idle => "* BYE Idle for too long\r\n",
                    Ending::TooLong => "* BYE Command too long\r\n",
                    Ending::Closed => return,
                };
                let _ = conn.send(farewell).await;
                return;
            }
        };
        let next = match parsed {
            Parsed::Command(PreLogin::StartTls { tag }) => {
                match Box::pin(starttls(conn, &tag)).await {
                    Some(upgraded) => {
                        conn = upgraded;
                        Next::Continue
                    }
                    None => return,
                }
            }
            Parsed::Command(command) => match Box::pin(command_step(&mut conn, command)).await {
                Step::Next(next) => next,
                Step::LoggedIn(session) => {
                    session.run(conn).await;
                    return;
                }
            },
            Parsed::Bad { tag } => {
                let tag = tag.unwrap_or_else(|| "*".into());
                bad(&mut conn, &tag, "Command not understood").await
            }
            Parsed::Literal { .. } | Parsed::Incomplete => Next::Continue,
        };
        if let Next::Close = next {
            return;
        }
    }
}

async fn bad(conn: &mut Conn, tag: &str, text: &str) -> Next {
    if conn.send(&format!("{tag} BAD {text}\r\n")).await {
        Next::Continue
    } else {
        Next::Close
    }
}

enum Step {
    Next(Next),
    LoggedIn(Box<LoggedIn>),
}

async fn command_step(conn: &mut Conn, command: PreLogin) -> Step {
    let next = match command {
        PreLogin::Capability { tag } => {
            let text = format!(
                "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                capabilities(&conn.tls)
            );
            ok_or_close(conn.send(&text).await)
        }
        PreLogin::Noop { tag } => {
            ok_or_close(conn.send(&format!("{tag} OK NOOP completed\r\n")).await)
        }
        PreLogin::Id { tag } => ok_or_close(
            conn.send(&format!(
                "* ID (\"name\" \"mail-integration-operator gateway\")\r\n{tag} OK ID completed\r\n"
            ))
            .await,
        ),
        PreLogin::Logout { tag } => {
            let _ = conn
                .send(&format!(
                    "* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n"
                ))
                .await;
            Next::Close
        }
        // Handled by the loop (it replaces the connection).
        PreLogin::StartTls { tag } => bad(conn, &tag, "STARTTLS is not available now").await,
        PreLogin::Other { tag } => bad(conn, &tag, "Log in first").await,
        PreLogin::Login {
            tag,
            username,
            password,
        } => return login(conn, &tag, &username, &password).await,
        PreLogin::Authenticate {
            tag,
            plain,
            initial,
        } => {
            if !plain {
                return Step::Next(ok_or_close(
                    conn.send(&format!(
                        "{tag} NO [CANNOT] Only AUTHENTICATE PLAIN is offered\r\n"
                    ))
                    .await,
                ));
            }
            if !conn.tls.login_allowed() {
                return Step::Next(privacy_required(conn, &tag).await);
            }
            let message = match initial {
                Some(message) => message,
                None => {
                    if !conn.send("+ \r\n").await {
                        return Step::Next(Next::Close);
                    }
                    let line =
                        tokio::time::timeout(conn.ctx.bounds.pre_login_idle, conn.wire.line())
                            .await;
                    match line {
                        Ok(Ok(line)) => match parse_authenticate_line(&line) {
                            Some(message) => message,
                            None => {
                                return Step::Next(
                                    bad(conn, &tag, "AUTHENTICATE cancelled or malformed").await,
                                );
                            }
                        },
                        _ => return Step::Next(Next::Close),
                    }
                }
            };
            match parse_plain(&message) {
                Some((username, password)) => {
                    return login(conn, &tag, &username, &password).await;
                }
                None => bad(conn, &tag, "Malformed PLAIN message").await,
            }
        }
    };
    Step::Next(next)
}

fn ok_or_close(sent: bool) -> Next {
    if sent { Next::Continue } else { Next::Close }
}

async fn privacy_required(conn: &mut Conn, tag: &str) -> Next {
    conn.plaintext_refused(Protocol::Imap);
    ok_or_close(
        conn.send(&format!(
            "{tag} NO [PRIVACYREQUIRED] Logins need TLS: use STARTTLS or the IMAPS port\r\n"
        ))
        .await,
    )
}

/// STARTTLS: the connection back under TLS, or `None` when it is to be closed.
async fn starttls(conn: Conn, tag: &str) -> Option<Conn> {
    let go_ahead = format!("{tag} OK Begin TLS negotiation now\r\n");
    let pipelined = "* BYE Data after STARTTLS before the TLS handshake\r\n";
    match conn.start_tls(Protocol::Imap, &go_ahead, pipelined).await {
        TlsStart::Started(conn) => Some(conn),
        TlsStart::Unavailable(mut conn) => {
            match bad(&mut conn, tag, "STARTTLS is not available now").await {
                Next::Continue => Some(conn),
                Next::Close => None,
            }
        }
        TlsStart::Close => None,
    }
}

/// A logged-in session, its upstream connected, to relay.
struct LoggedIn {
    who: super::session::Authorized,
    upstream: upstream::Upstream,
    /// The server's login answer as it gave it (kept if the session is parked).
    answer: LoginAnswer,
}

async fn login(conn: &mut Conn, tag: &str, username: &str, password: &SecretValue) -> Step {
    if !conn.tls.login_allowed() {
        return Step::Next(privacy_required(conn, tag).await);
    }
    match conn.log_in(Protocol::Imap, username, password).await {
        Ok((who, upstream)) => {
            let answer = LoginAnswer {
                untagged: upstream.untagged.clone(),
                reply: upstream.reply.clone(),
            };
            Step::LoggedIn(Box::new(LoggedIn {
                who,
                upstream: upstream_with_tag(upstream, tag),
                answer,
            }))
        }
        Err(refusal) => {
            let text = refusal_text(refusal);
            Step::Next(ok_or_close(conn.send(&format!("{tag} {text}\r\n")).await))
        }
    }
}

/// The tagged reply (without its tag) to a refused login.
fn refusal_text(refusal: Refusal) -> String {
    match refusal {
        Refusal::Login(LoginRefused::BadCredential) => {
            "NO [AUTHENTICATIONFAILED] Invalid credentials".to_owned()
        }
        Refusal::Login(LoginRefused::Throttled { retry_after }) => format!(
            "NO [UNAVAILABLE] Too many failed logins, try again in {} s",
            retry_secs(retry_after)
        ),
        Refusal::Login(LoginRefused::ProtocolNotAllowed) => {
            "NO [AUTHORIZATIONFAILED] This credential may not use IMAP".to_owned()
        }
        Refusal::Login(LoginRefused::TooManySessions) => {
            "NO [LIMIT] Too many sessions for this credential".to_owned()
        }
        Refusal::Login(LoginRefused::Unavailable) => {
            "NO [UNAVAILABLE] The mailbox is not connected now (no valid access token)".to_owned()
        }
        Refusal::Upstream(reason) => format!(
            "NO [UNAVAILABLE] The mail server did not accept the gateway ({reason}); see the gateway's log and the MailIntegration's status"
        ),
    }
}

/// The server's reply, retagged with the app's tag.
fn upstream_with_tag(mut upstream: upstream::Upstream, tag: &str) -> upstream::Upstream {
    upstream.reply = format!("{tag} {}\r\n", upstream.reply);
    upstream
}

impl LoggedIn {
    async fn run(self, conn: Conn) {
        let idle = conn.ctx.bounds.imap_idle;
        let mut upstream = self.upstream;
        let mut first = std::mem::take(&mut upstream.untagged);
        first.extend_from_slice(upstream.reply.as_bytes());
        // The watch follows what comes after the login reply (LOGOUT answered by the gateway
        // when nothing else is outstanding: src/gateway/logout.rs).
        let mut watch = LogoutWatch::new();
        watch.from_server(&upstream.pending);
        first.extend_from_slice(&std::mem::take(&mut upstream.pending));
        conn.relay(
            self.who,
            upstream,
            &first,
            Protocol::Imap,
            idle,
            b"* BYE [UNAVAILABLE] This credential was revoked\r\n",
            Some(ImapFollow {
                watch,
                answer: self.answer,
            }),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_login_commands() {
        assert_eq!(
            parse(b"a1 LOGIN \"ns/mi/app\" \"p\\\"w\"\r\n"),
            Parsed::Command(PreLogin::Login {
                tag: "a1".into(),
                username: "ns/mi/app".into(),
                password: SecretValue::new("p\"w"),
            })
        );
        assert_eq!(
            parse(b"a2 LOGIN {9}\r\n"),
            Parsed::Literal {
                tag: "a2".into(),
                length: 9,
                sync: true
            }
        );
        assert!(matches!(
            parse(b"a2 LOGIN {9}\r\nns/mi/app pw\r\n"),
            Parsed::Command(PreLogin::Login { .. })
        ));
        assert_eq!(
            parse(b"a3 AUTHENTICATE PLAIN AG5zL21pL2FwcABwdw==\r\n"),
            Parsed::Command(PreLogin::Authenticate {
                tag: "a3".into(),
                plain: true,
                initial: Some(b"\0ns/mi/app\0pw".to_vec()),
            })
        );
        assert!(matches!(
            parse(b"a4 AUTHENTICATE XOAUTH2\r\n"),
            Parsed::Command(PreLogin::Authenticate { plain: false, .. })
        ));
        assert_eq!(
            parse(b"a5 starttls\r\n"),
            Parsed::Command(PreLogin::StartTls { tag: "a5".into() })
        );
        assert_eq!(
            parse(b"a6 SELECT INBOX\r\n"),
            Parsed::Command(PreLogin::Other { tag: "a6".into() })
        );
        assert_eq!(
            parse(b"a7 FROBNICATE\r\n"),
            Parsed::Bad {
                tag: Some("a7".into())
            }
        );
        assert_eq!(parse(b"a8 NOOP"), Parsed::Incomplete);
        assert_eq!(
            parse_authenticate_line(b"AG5zL21pL2FwcABwdw==\r\n"),
            Some(b"\0ns/mi/app\0pw".to_vec())
        );
        assert_eq!(parse_authenticate_line(b"*\r\n"), None);
    }

    #[test]
    fn capabilities_before_login_say_only_what_the_gateway_does() {
        let plain = TlsState {
            tls: false,
            starttls: None,
            plaintext_login: false,
            greeted: false,
        };
        assert_eq!(capabilities(&plain), "IMAP4rev1 SASL-IR LOGINDISABLED");
        let tls = TlsState {
            tls: true,
            ..plain.clone()
        };
        assert_eq!(capabilities(&tls), "IMAP4rev1 SASL-IR AUTH=PLAIN");
    }
}
