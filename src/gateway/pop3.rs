//! POP3 towards apps: the AUTHORIZATION state (CAPA, USER/PASS, AUTH PLAIN with an initial
//! response or a continuation, STLS on a port that starts plain, QUIT), then the relay to the
//! integration's server.
//!
//! Hand-written: POP3 commands are a keyword and at most two arguments on one line (RFC 1939,
//! 2449, 5034), there is no maintained POP3 server-side parser crate, and the lines are bounded by
//! [`super::wire`] before they are parsed.

use std::{net::SocketAddr, sync::Arc};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use tokio::io::AsyncWriteExt;

use super::{
    Ctx,
    listen::{ClientStream, TlsState},
    login::retry_secs,
    relay::{self, OpenSession},
    session::{Login, LoginRefused, Protocol},
    upstream,
    wire::{ReadError, Wire, parse_plain},
};
use crate::secret::SecretValue;

/// A command in the AUTHORIZATION state. Pure parsing result, for the property tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Capa,
    User(String),
    Pass(SecretValue),
    /// `AUTH` alone (list mechanisms), or `AUTH mechanism [initial-response]`.
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    Stls,
    Quit,
    Noop,
    Other,
}

/// Parse one command line (with or without its CRLF). Pure; never panics.
pub fn parse(line: &[u8]) -> Command {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches(['\r', '\n']);
    let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
    match keyword.to_ascii_uppercase().as_str() {
        "CAPA" => Command::Capa,
        "USER" if !rest.is_empty() => Command::User(rest.to_owned()),
        // RFC 1939: the password is the rest of the line, spaces included.
        "PASS" => Command::Pass(SecretValue::new(rest)),
        "AUTH" => {
            let mut args = rest.split(' ').filter(|a| !a.is_empty());
            Command::Auth {
                mechanism: args.next().map(str::to_ascii_uppercase),
                initial: args.next().map(str::to_owned),
            }
        }
        "STLS" => Command::Stls,
        "QUIT" => Command::Quit,
        "NOOP" => Command::Noop,
        _ => Command::Other,
    }
}

/// A base64 SASL response line: the decoded bytes, `None` for `*` (cancel) or garbage; `=` is an
/// empty response (RFC 5034).
pub fn decode_response(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    match text {
        "*" => None,
        "=" => Some(Vec::new()),
        _ => STANDARD.decode(text).ok(),
    }
}

/// The CAPA answer before login.
pub fn capabilities(tls: &TlsState) -> String {
    let mut lines = vec!["+OK Capability list follows"];
    if tls.login_allowed() {
        lines.push("USER");
        lines.push("SASL PLAIN");
    }
    if tls.starttls.is_some() && !tls.tls {
        lines.push("STLS");
    }
    lines.push("IMPLEMENTATION mail-integration-operator-gateway");
    lines.push(".");
    let mut text = lines.join("\r\n");
    text.push_str("\r\n");
    text
}

struct Conn {
    wire: Wire<ClientStream>,
    tls: TlsState,
    source: SocketAddr,
    ctx: Arc<Ctx>,
    user: Option<String>,
}

impl Conn {
    async fn send(&mut self, text: &str) -> bool {
        self.wire.send(text.as_bytes()).await
    }
}

enum Outcome {
    Continue(Conn),
    Close,
    LoggedIn(Box<(Conn, super::session::Authorized, upstream::Upstream)>),
}

/// Serve one POP3 connection (the listener table's entry point).
pub async fn serve(stream: ClientStream, source: SocketAddr, tls: TlsState, ctx: Arc<Ctx>) {
    let mut conn = Conn {
        wire: Wire::new(stream, ctx.bounds.max_line),
        tls,
        source,
        ctx: ctx.clone(),
        user: None,
    };
    if !conn.send(&format!("+OK {} ready\r\n", ctx.hostname)).await {
        return;
    }
    for _ in 0..ctx.bounds.max_commands_before_login {
        let line = match tokio::time::timeout(ctx.bounds.pre_login_idle, conn.wire.line()).await {
            Err(_) => {
                ctx.metrics.closed(Protocol::Pop3, "idle");
                let _ = conn.send("-ERR Idle for too long\r\n").await;
                return;
            }
            Ok(Err(ReadError::TooLong)) => {
                ctx.metrics.closed(Protocol::Pop3, "pre_login_limit");
                let _ = conn.send("-ERR Line too long\r\n").await;
                return;
            }
            Ok(Err(ReadError::Closed)) => return,
            Ok(Ok(line)) => line,
        };
        match step(conn, parse(&line)).await {
            Outcome::Continue(c) => conn = c,
            Outcome::Close => return,
            Outcome::LoggedIn(logged_in) => {
                let (c, who, upstream) = *logged_in;
                relay_session(c, who, upstream).await;
                return;
            }
        }
    }
    ctx.metrics.closed(Protocol::Pop3, "pre_login_limit");
    let _ = conn.send("-ERR Too many commands before login\r\n").await;
}

async fn reply(mut conn: Conn, text: &str) -> Outcome {
    if conn.send(text).await {
        Outcome::Continue(conn)
    } else {
        Outcome::Close
    }
}

async fn step(mut conn: Conn, command: Command) -> Outcome {
    match command {
        Command::Capa => {
            let text = capabilities(&conn.tls);
            reply(conn, &text).await
        }
        Command::Quit => {
            let _ = conn.send("+OK Bye\r\n").await;
            Outcome::Close
        }
        Command::Noop | Command::Other => reply(conn, "-ERR Log in first\r\n").await,
        Command::Stls => stls(conn).await,
        Command::User(user) => {
            if !conn.tls.login_allowed() {
                return privacy_required(conn).await;
            }
            conn.user = Some(user);
            reply(conn, "+OK\r\n").await
        }
        Command::Pass(password) => match conn.user.take() {
            None => reply(conn, "-ERR USER first\r\n").await,
            Some(user) => login(conn, &user, &password).await,
        },
        Command::Auth {
            mechanism: None, ..
        } => reply(conn, "+OK Mechanisms follow\r\nPLAIN\r\n.\r\n").await,
        Command::Auth {
            mechanism: Some(mechanism),
            initial,
        } => {
            if mechanism != "PLAIN" {
                return reply(conn, "-ERR Only AUTH PLAIN is offered\r\n").await;
            }
            if !conn.tls.login_allowed() {
                return privacy_required(conn).await;
            }
            let text = match initial {
                Some(text) => text,
                None => {
                    if !conn.send("+ \r\n").await {
                        return Outcome::Close;
                    }
                    match tokio::time::timeout(conn.ctx.bounds.pre_login_idle, conn.wire.line())
                        .await
                    {
                        Ok(Ok(line)) => String::from_utf8_lossy(&line).into_owned(),
                        _ => return Outcome::Close,
                    }
                }
            };
            match decode_response(&text).as_deref().and_then(parse_plain) {
                Some((user, password)) => login(conn, &user, &password).await,
                None => reply(conn, "-ERR AUTH cancelled or malformed\r\n").await,
            }
        }
    }
}

async fn privacy_required(conn: Conn) -> Outcome {
    conn.ctx.metrics.login(Protocol::Pop3, "plaintext_refused");
    tracing::info!(source = %conn.source, protocol = "POP3", result = "plaintext_refused",
        "gateway login refused before TLS");
    reply(
        conn,
        "-ERR [AUTH] Logins need TLS: use STLS or the POP3S port\r\n",
    )
    .await
}

async fn stls(mut conn: Conn) -> Outcome {
    let Some(acceptor) = conn.tls.starttls.clone().filter(|_| !conn.tls.tls) else {
        return reply(conn, "-ERR STLS is not available now\r\n").await;
    };
    if conn.wire.has_buffered() {
        let _ = conn
            .send("-ERR Data after STLS before the TLS handshake\r\n")
            .await;
        return Outcome::Close;
    }
    if !conn.send("+OK Begin TLS negotiation\r\n").await {
        return Outcome::Close;
    }
    let max_line = conn.ctx.bounds.max_line;
    let (stream, _) = conn.wire.into_parts();
    match tokio::time::timeout(conn.ctx.bounds.pre_login_idle, stream.start_tls(&acceptor)).await {
        Ok(Ok(stream)) => Outcome::Continue(Conn {
            wire: Wire::new(stream, max_line),
            tls: conn.tls.after_starttls(),
            source: conn.source,
            ctx: conn.ctx,
            // RFC 2595: the state is discarded.
            user: None,
        }),
        _ => {
            conn.ctx.metrics.closed(Protocol::Pop3, "tls");
            Outcome::Close
        }
    }
}

async fn login(conn: Conn, username: &str, password: &SecretValue) -> Outcome {
    if !conn.tls.login_allowed() {
        return privacy_required(conn).await;
    }
    let ctx = conn.ctx.clone();
    let who = match ctx
        .login
        .login(Protocol::Pop3, username, password, conn.source)
        .await
    {
        Ok(who) => who,
        Err(refused) => {
            let text = match refused {
                LoginRefused::BadCredential => "-ERR [AUTH] Invalid credentials".to_owned(),
                LoginRefused::Throttled { retry_after } => format!(
                    "-ERR [SYS/TEMP] Too many failed logins, try again in {} s",
                    retry_secs(retry_after)
                ),
                LoginRefused::ProtocolNotAllowed => {
                    "-ERR [AUTH] This credential may not use POP3".to_owned()
                }
                LoginRefused::TooManySessions => {
                    "-ERR [IN-USE] Too many sessions for this credential".to_owned()
                }
                LoginRefused::Unavailable => {
                    "-ERR [SYS/TEMP] The mailbox is not connected now (no valid access token)"
                        .to_owned()
                }
            };
            return reply(conn, &format!("{text}\r\n")).await;
        }
    };
    match upstream::connect(&who.entry, Protocol::Pop3, &ctx.allowed).await {
        Ok(upstream) => Outcome::LoggedIn(Box::new((conn, who, upstream))),
        Err(e) => {
            ctx.metrics.upstream_error(Protocol::Pop3, e.reason());
            tracing::warn!(app = %who.app, source = %conn.source, protocol = "POP3",
                reason = e.reason(), error = %e, "upstream session failed");
            reply(
                conn,
                &format!(
                    "-ERR [SYS/TEMP] The mail server did not accept the gateway ({})\r\n",
                    e.reason()
                ),
            )
            .await
        }
    }
}

async fn relay_session(conn: Conn, who: super::session::Authorized, upstream: upstream::Upstream) {
    let Conn {
        wire, ctx, source, ..
    } = conn;
    let (mut client, read_ahead) = wire.into_parts();
    let mut first = upstream.reply.into_bytes();
    first.extend_from_slice(b"\r\n");
    first.extend_from_slice(&upstream.pending);
    let _open = OpenSession::new(ctx.metrics.clone(), Protocol::Pop3, &who);
    let end = relay::relay(
        &mut client,
        upstream.stream,
        &read_ahead,
        &first,
        Protocol::Pop3,
        ctx.bounds.idle,
        &who.lease,
        &ctx.metrics,
    )
    .await;
    if end == relay::End::Revoked {
        let _ = client
            .write_all(b"-ERR [SYS/PERM] This credential was revoked\r\n")
            .await;
    }
    tracing::info!(app = %who.app, source = %source, protocol = "POP3",
        end = end.as_str(), "gateway session ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse(b"capa\r\n"), Command::Capa);
        assert_eq!(
            parse(b"USER ns/mi/app\r\n"),
            Command::User("ns/mi/app".into())
        );
        assert_eq!(
            parse(b"PASS a b\r\n"),
            Command::Pass(SecretValue::new("a b"))
        );
        assert_eq!(
            parse(b"AUTH plain AGEAYg==\r\n"),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some("AGEAYg==".into())
            }
        );
        assert_eq!(
            parse(b"AUTH\r\n"),
            Command::Auth {
                mechanism: None,
                initial: None
            }
        );
        assert_eq!(parse(b"RETR 1\r\n"), Command::Other);
        assert_eq!(decode_response("="), Some(vec![]));
        assert_eq!(decode_response("*"), None);
        assert_eq!(decode_response("AGEAYg=="), Some(b"\0a\0b".to_vec()));
    }
}
