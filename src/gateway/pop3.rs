//! POP3 towards apps: the AUTHORIZATION state (CAPA, USER/PASS, AUTH PLAIN with an initial
//! response or a continuation, STLS on a port that starts plain, QUIT), then the relay to the
//! integration's server.
//!
//! Hand-written: POP3 commands are a keyword and at most two arguments on one line (RFC 1939,
//! 2449, 5034), there is no maintained POP3 server-side parser crate, and the lines are bounded by
//! [`super::wire`] before they are parsed.

use std::{net::SocketAddr, sync::Arc};

use super::{
    Ctx,
    listen::{ClientStream, TlsState},
    login::retry_secs,
    prelogin::{Conn, Ending, Refusal, TlsStart},
    session::{LoginRefused, Protocol},
    upstream,
    wire::parse_plain,
};
use crate::secret::SecretValue;
use base64::{Engine as _, engine::general_purpose::STANDARD};

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

enum Outcome {
    Continue(Conn),
    Close,
    LoggedIn(Box<(Conn, super::session::Authorized, upstream::Upstream)>),
}

/// The greeting.
pub fn greeting(hostname: &str) -> String {
    format!("+OK {hostname} ready\r\n")
}

/// Serve one POP3 connection (the listener table's entry point).
pub async fn serve(stream: ClientStream, source: SocketAddr, tls: TlsState, ctx: Arc<Ctx>) {
    let mut conn = Conn::new(stream, source, tls, ctx.clone());
    if !conn.tls.greeted && !conn.send(&greeting(&ctx.hostname)).await {
        return;
    }
    // The name of USER, until PASS (RFC 1939), or STLS discards it (RFC 2595).
    let mut user = None;
    for _ in 0..ctx.bounds.max_commands_before_login {
        let line = match Conn::timed(&ctx, Protocol::Pop3, conn.wire.line()).await {
            Ok(line) => line,
            Err(ending) => {
                let farewell = match ending {
                    Ending::Idle => "-ERR Idle for too long\r\n",
                    Ending::TooLong => "-ERR Line too long\r\n",
                    Ending::Closed => return,
                };
                let _ = conn.send(farewell).await;
                return;
            }
        };
        match step(conn, &mut user, parse(&line)).await {
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

async fn step(mut conn: Conn, user: &mut Option<String>, command: Command) -> Outcome {
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
        Command::Stls => stls(conn, user).await,
        Command::User(name) => {
            if !conn.tls.login_allowed() {
                return privacy_required(conn).await;
            }
            *user = Some(name);
            reply(conn, "+OK\r\n").await
        }
        Command::Pass(password) => match user.take() {
            None => reply(conn, "-ERR USER first\r\n").await,
            Some(name) => login(conn, &name, &password).await,
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
    conn.plaintext_refused(Protocol::Pop3);
    reply(
        conn,
        "-ERR [AUTH] Logins need TLS: use STLS or the POP3S port\r\n",
    )
    .await
}

async fn stls(conn: Conn, user: &mut Option<String>) -> Outcome {
    let pipelined = "-ERR Data after STLS before the TLS handshake\r\n";
    match conn
        .start_tls(Protocol::Pop3, "+OK Begin TLS negotiation\r\n", pipelined)
        .await
    {
        TlsStart::Started(conn) => {
            // RFC 2595: the state is discarded.
            *user = None;
            Outcome::Continue(conn)
        }
        TlsStart::Unavailable(conn) => reply(conn, "-ERR STLS is not available now\r\n").await,
        TlsStart::Close => Outcome::Close,
    }
}

async fn login(conn: Conn, username: &str, password: &SecretValue) -> Outcome {
    if !conn.tls.login_allowed() {
        return privacy_required(conn).await;
    }
    match conn.log_in(Protocol::Pop3, username, password).await {
        Ok((who, upstream)) => Outcome::LoggedIn(Box::new((conn, who, upstream))),
        Err(refusal) => {
            let text = refusal_text(refusal);
            reply(conn, &format!("{text}\r\n")).await
        }
    }
}

/// The reply to a refused login.
fn refusal_text(refusal: Refusal) -> String {
    match refusal {
        Refusal::Login(LoginRefused::BadCredential) => "-ERR [AUTH] Invalid credentials".to_owned(),
        Refusal::Login(LoginRefused::Throttled { retry_after }) => format!(
            "-ERR [SYS/TEMP] Too many failed logins, try again in {} s",
            retry_secs(retry_after)
        ),
        Refusal::Login(LoginRefused::ProtocolNotAllowed) => {
            "-ERR [AUTH] This credential may not use POP3".to_owned()
        }
        Refusal::Login(LoginRefused::TooManySessions) => {
            "-ERR [IN-USE] Too many sessions for this credential".to_owned()
        }
        Refusal::Login(LoginRefused::Unavailable) => {
            "-ERR [SYS/TEMP] The mailbox is not connected now (no valid access token)".to_owned()
        }
        Refusal::Upstream(reason) => {
            format!("-ERR [SYS/TEMP] The mail server did not accept the gateway ({reason})")
        }
    }
}

async fn relay_session(
    conn: Conn,
    who: super::session::Authorized,
    mut upstream: upstream::Upstream,
) {
    let idle = conn.ctx.bounds.idle;
    let mut first = std::mem::take(&mut upstream.reply).into_bytes();
    first.extend_from_slice(b"\r\n");
    first.extend_from_slice(&std::mem::take(&mut upstream.pending));
    conn.relay(
        who,
        upstream,
        &first,
        Protocol::Pop3,
        idle,
        b"-ERR [SYS/PERM] This credential was revoked\r\n",
        // QUIT stays relayed: it is when the server removes the messages marked with DELE, and
        // its answer (`-ERR` if it could not) is the app's to see (src/gateway/logout.rs).
        None,
    )
    .await;
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
