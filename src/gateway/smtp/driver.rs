//! One client session: reads lines (bounded, with idle timeouts), drives [`Machine`] and
//! [`DataPhase`], and does what they ask with the login layer ([`Login`]) and the mail server
//! ([`SmtpUpstream`]).
//!
//! The app hears `250` for its message only after the mail server answered the final dot with
//! `250`: a gateway replica that dies before that leaves the app with a broken session and no
//! `250`, so the app retries and nothing it was told was accepted is lost.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::TlsAcceptor;

use super::{
    data::{self, Action, DataPhase, End},
    line::{Line, read_line},
    report::Report,
    state::{Limits, Listener, LoggedIn, Machine, Step},
    upstream::{Reply, SmtpUpstream, is_smtp_auth_disabled},
};
use crate::{
    gateway::{
        metrics::GatewayMetrics,
        relay::OpenSession,
        session::{Authorized, Login, LoginRefused, Protocol},
        upstream::UpstreamError,
    },
    mailbox::allowed::AllowedHosts,
};

/// A client connection's stream (TCP, or TLS over it).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What every SMTP session of a gateway shares.
pub struct SmtpServer<L> {
    pub login: Arc<L>,
    /// The mail servers the gateway may connect to (the mailbox check's list).
    pub allowed: Arc<AllowedHosts>,
    /// The name the gateway greets with and says in EHLO upstream.
    pub hostname: String,
    pub limits: Limits,
    /// Idle time allowed before a successful AUTH (GATEWAY.md: 30 s).
    pub idle_before_login: Duration,
    /// Idle time allowed after it (30 min).
    pub idle_after_login: Duration,
    /// Where refusals the mailbox's owner must act on are reported.
    pub report: Arc<dyn Report>,
    /// The gateway's metrics: SMTP sessions by app and their duration, message bytes relayed,
    /// upstream errors by reason, connections closed by reason.
    pub metrics: Arc<GatewayMetrics>,
}

/// One accepted connection.
pub struct Connection {
    pub stream: Box<dyn Io>,
    pub source: SocketAddr,
    /// The connection is TLS already (the implicit-TLS port).
    pub tls: bool,
    /// STARTTLS with this acceptor is offered (the submission port).
    pub starttls: Option<TlsAcceptor>,
    /// AUTH without TLS is allowed (a plaintext port enabled for in-cluster clients).
    pub plaintext_auth: bool,
}

/// How a session ended, for logs and tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Quit,
    ClientClosed,
    Idle,
    Closed,
    Revoked,
    Io,
}

struct Session {
    authorized: Option<Authorized>,
    upstream: Option<SmtpUpstream>,
    /// In the sessions gauge from the login to the end.
    open: Option<OpenSession>,
}

impl<L: Login> SmtpServer<L> {
    /// Serve one connection until it ends.
    pub async fn serve(&self, conn: Connection) -> Ended {
        let source = conn.source;
        let mut machine = Machine::new(
            Listener {
                hostname: self.hostname.clone(),
                tls: conn.tls,
                starttls: conn.starttls.is_some(),
                plaintext_auth: conn.plaintext_auth,
            },
            self.limits,
        );
        let mut reader = BufReader::new(conn.stream);
        let mut session = Session {
            authorized: None,
            upstream: None,
            open: None,
        };
        if write(&mut reader, &machine.greeting()).await.is_err() {
            return Ended::Io;
        }
        let ended = loop {
            let idle = if machine.is_logged_in() {
                self.idle_after_login
            } else {
                self.idle_before_login
            };
            let line = match next_line(&mut reader, machine.line_limit(), idle, &session).await {
                Ok(line) => line,
                Err(ended) => {
                    let reply = match ended {
                        Ended::Idle => "421 4.4.2 Idle for too long, closing\r\n",
                        Ended::Revoked => {
                            "421 4.7.0 The app's credential was withdrawn, closing\r\n"
                        }
                        _ => "",
                    };
                    let _ = write(&mut reader, reply).await;
                    break ended;
                }
            };
            let step = match line {
                Line::Closed => break Ended::ClientClosed,
                Line::TooLong => machine.line_too_long(),
                Line::Complete { bytes, .. } => machine.line(&bytes),
            };
            let outcome = match step {
                Step::Reply(reply) => write(&mut reader, &reply).await.map(|_| None),
                Step::Close(reply) => {
                    let _ = write(&mut reader, &reply).await;
                    Ok(Some(Ended::Closed))
                }
                Step::Quit => {
                    let _ = write(&mut reader, "221 2.0.0 Bye\r\n").await;
                    Ok(Some(Ended::Quit))
                }
                Step::StartTls => {
                    let Some(acceptor) = conn.starttls.clone() else {
                        break Ended::Closed;
                    };
                    if !reader.buffer().is_empty() {
                        // Commands pipelined behind STARTTLS would be taken as sent over TLS
                        // (CVE-2011-0411): refuse the session.
                        let _ = write(
                            &mut reader,
                            "421 4.7.0 Commands sent after STARTTLS before the handshake, closing\r\n",
                        )
                        .await;
                        break Ended::Closed;
                    }
                    if write(&mut reader, "220 2.0.0 Ready to start TLS\r\n")
                        .await
                        .is_err()
                    {
                        break Ended::Io;
                    }
                    let plain = reader.into_inner();
                    match tokio::time::timeout(self.idle_before_login, acceptor.accept(plain)).await
                    {
                        Ok(Ok(tls)) => {
                            reader = BufReader::new(Box::new(tls) as Box<dyn Io>);
                            machine.tls_started();
                            Ok(None)
                        }
                        _ => break Ended::Io,
                    }
                }
                Step::Login(credentials) => {
                    let reply = self
                        .login(&mut machine, &mut session, &credentials, source)
                        .await;
                    write(&mut reader, &reply).await.map(|_| None)
                }
                Step::Mail {
                    from,
                    size,
                    eight_bit,
                } => {
                    let reply = self.mail(&mut session, &from, size, eight_bit).await;
                    machine.mail_answered(from, reply.is_positive());
                    write(&mut reader, &reply.wire()).await.map(|_| None)
                }
                Step::Rcpt { to } => {
                    let reply = relay(&mut session, &format!("RCPT TO:<{to}>")).await;
                    machine.rcpt_answered(reply.is_positive());
                    write(&mut reader, &reply.wire()).await.map(|_| None)
                }
                Step::Rset => {
                    if let Some(up) = session.upstream.as_mut()
                        && up.command("RSET").await.is_err()
                    {
                        session.upstream = None;
                    }
                    write(&mut reader, "250 2.0.0 OK\r\n").await.map(|_| None)
                }
                Step::Data => {
                    let Some(logged_in) = machine.logged_in_as().cloned() else {
                        break Ended::Closed;
                    };
                    let result = self.data(&mut reader, &mut session, logged_in).await;
                    machine.data_done();
                    result
                }
            };
            match outcome {
                Ok(None) => {}
                Ok(Some(ended)) => break ended,
                Err(_) => break Ended::Io,
            }
        };
        if let Some(up) = session.upstream.take()
            && ended == Ended::Quit
        {
            up.quit().await;
        }
        let reason = match ended {
            Ended::Quit | Ended::ClientClosed => None,
            Ended::Idle => Some("idle"),
            Ended::Closed if !machine.is_logged_in() => Some("pre_login_limit"),
            Ended::Closed => Some("refused"),
            Ended::Revoked => Some("revoked"),
            Ended::Io => Some("io"),
        };
        if let Some(reason) = reason {
            self.metrics.closed(Protocol::Smtp, reason);
        }
        drop(session.open.take());
        ended
    }

    /// Check the credential, connect upstream, and say what the app hears.
    async fn login(
        &self,
        machine: &mut Machine,
        session: &mut Session,
        credentials: &super::command::Credentials,
        source: SocketAddr,
    ) -> String {
        let mut clock = crate::gateway::upstream::StepClock::new();
        let authorized = match self
            .login
            .login(
                Protocol::Smtp,
                &credentials.username,
                &credentials.password,
                source,
            )
            .await
        {
            Ok(a) => a,
            Err(refused) => return machine.login_failed(login_refusal(refused)),
        };
        let check_us = clock.lap();
        tracing::debug!(protocol = %Protocol::Smtp, check_us, "upstream set-up steps");
        let config = authorized.entry.config.clone();
        let Some(app) = config.apps.iter().find(|a| a.name == authorized.app.app) else {
            return machine.login_failed(login_refusal(LoginRefused::BadCredential));
        };
        let upstream = match SmtpUpstream::connect(&authorized.entry, &self.allowed, &self.hostname)
            .await
        {
            Ok(up) => up,
            Err(e) => {
                self.metrics.upstream_error(Protocol::Smtp, e.reason());
                tracing::warn!(app = %authorized.app, source = %source, reason = e.reason(), error = %e,
                    "SMTP: the mail server did not take the integration's token");
                return machine.login_failed(self.upstream_refusal(&authorized, &e));
            }
        };
        let limit = match upstream.size {
            Some(size) => size.min(config.max_message_bytes),
            None => config.max_message_bytes,
        };
        let logged_in = LoggedIn {
            app: app.clone(),
            mailbox: config.mailbox.clone(),
            limit,
            eight_bit: upstream.eight_bit,
        };
        session.upstream = Some(upstream);
        session.open = Some(OpenSession::new(
            self.metrics.clone(),
            Protocol::Smtp,
            &authorized,
        ));
        session.authorized = Some(authorized);
        machine.logged_in(logged_in)
    }

    /// The app's answer when the mail server refused the session; Microsoft's "SMTP AUTH disabled"
    /// is also reported on the MailIntegration, since only the mailbox's owner can fix it.
    fn upstream_refusal(&self, authorized: &Authorized, e: &UpstreamError) -> String {
        match e {
            UpstreamError::AuthFailed(detail) if is_smtp_auth_disabled(detail) => {
                self.report.smtp_auth_disabled(authorized, detail);
                format!(
                    "535 5.7.139 The mailbox's provider has SMTP AUTH switched off for {}; its owner must enable it (see MailIntegration {}/{})\r\n",
                    crate::reason::outside_text(&authorized.entry.config.mailbox, 254),
                    authorized.app.namespace,
                    authorized.app.integration
                )
            }
            _ => format!(
                "454 4.7.0 Temporary authentication failure: the mail server is not available to the gateway now ({})\r\n",
                e.reason()
            ),
        }
    }

    /// `MAIL FROM` upstream; the connection is opened again if it was closed (after an aborted
    /// message, or by the server while the app was idle).
    async fn mail(
        &self,
        session: &mut Session,
        from: &str,
        size: Option<u64>,
        eight_bit: bool,
    ) -> Reply {
        let mut line = format!("MAIL FROM:<{from}>");
        if let Some(size) = size {
            line.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit {
            line.push_str(" BODY=8BITMIME");
        }
        for attempt in 0..2 {
            if session.upstream.is_none() {
                let Some(authorized) = &session.authorized else {
                    return Reply::local(530, "5.7.0 Authentication required");
                };
                match SmtpUpstream::connect(&authorized.entry, &self.allowed, &self.hostname).await
                {
                    Ok(up) => session.upstream = Some(up),
                    Err(e) => {
                        self.metrics.upstream_error(Protocol::Smtp, e.reason());
                        tracing::warn!(app = %authorized.app, reason = e.reason(), error = %e,
                            "SMTP: cannot reconnect to the mail server");
                        return Reply::local(
                            451,
                            "4.4.1 The mail server is not reachable now, try again later",
                        );
                    }
                }
            }
            let Some(up) = session.upstream.as_mut() else {
                continue;
            };
            match up.command(&line).await {
                Ok(reply) => return reply,
                Err(_) if attempt == 0 => session.upstream = None,
                Err(_) => break,
            }
        }
        session.upstream = None;
        Reply::local(
            451,
            "4.4.2 Lost the connection to the mail server, try again",
        )
    }

    /// The DATA phase: 354, the message's lines, the server's answer to the final dot.
    async fn data(
        &self,
        reader: &mut BufReader<Box<dyn Io>>,
        session: &mut Session,
        logged_in: LoggedIn,
    ) -> std::io::Result<Option<Ended>> {
        let mut phase = DataPhase::new(logged_in.app, logged_in.mailbox, logged_in.limit);
        let to_upstream = self.metrics.bytes_counter(Protocol::Smtp, "to_upstream");
        write(reader, "354 End data with <CR><LF>.<CR><LF>\r\n").await?;
        loop {
            let line =
                match next_line(reader, data::DATA_LINE, self.idle_after_login, session).await {
                    Ok(line) => line,
                    // The upstream connection is dropped with the session: no final dot was sent.
                    Err(ended) => return Ok(Some(ended)),
                };
            let action = match line {
                Line::Closed => return Ok(Some(Ended::ClientClosed)),
                Line::TooLong => phase.line_too_long(),
                Line::Complete { bytes, .. } => phase.line(bytes),
            };
            match action {
                Action::Nothing => {}
                Action::Open { head } => {
                    to_upstream.inc_by(head.len() as u64);
                    let opened = open_data(session, &head).await;
                    phase.opened(opened);
                }
                Action::Forward(line) => {
                    to_upstream.inc_by((line.len() as u64).saturating_add(2));
                    let sent = match session.upstream.as_mut() {
                        Some(up) => up.data_line(&line).await.is_ok(),
                        None => false,
                    };
                    if !sent {
                        session.upstream = None;
                        phase.upstream_lost(lost());
                    }
                }
                Action::Abort => {
                    // Closing without the final dot: the server completes nothing.
                    session.upstream = None;
                }
                Action::Close(reply) => {
                    session.upstream = None;
                    write(reader, &reply).await?;
                    return Ok(Some(Ended::Closed));
                }
                Action::End => {
                    let reply = match phase.end() {
                        End::Finish => finish(session).await,
                        End::OpenAndFinish { head } => {
                            to_upstream.inc_by(head.len() as u64);
                            match open_data(session, &head).await {
                                Ok(()) => finish(session).await,
                                Err(reply) => reply,
                            }
                        }
                        End::Refuse(reply) => {
                            // MAIL and RCPT were given upstream; DATA never was.
                            if let Some(up) = session.upstream.as_mut()
                                && up.command("RSET").await.is_err()
                            {
                                session.upstream = None;
                            }
                            reply
                        }
                    };
                    if let Some(authorized) = &session.authorized {
                        tracing::info!(app = %authorized.app, reply = %crate::reason::outside_text(&reply, 200),
                            "SMTP: message answered");
                    }
                    write(reader, &reply).await?;
                    return Ok(None);
                }
            }
        }
    }
}

/// `DATA` upstream and the held header block; `Err` is the reply for the app.
async fn open_data(session: &mut Session, head: &[u8]) -> Result<(), String> {
    let Some(up) = session.upstream.as_mut() else {
        return Err(lost());
    };
    match up.command("DATA").await {
        Ok(reply) if reply.code == 354 => {}
        Ok(reply) => return Err(reply.wire()),
        Err(_) => {
            session.upstream = None;
            return Err(lost());
        }
    }
    // `head` is CRLF-ended lines as the app sent them.
    for line in head.split_inclusive(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r\n").unwrap_or(line);
        if up.data_line(line).await.is_err() {
            session.upstream = None;
            return Err(lost());
        }
    }
    Ok(())
}

async fn finish(session: &mut Session) -> String {
    let Some(up) = session.upstream.as_mut() else {
        return lost();
    };
    match up.finish_data().await {
        Ok(reply) => reply.wire(),
        Err(_) => {
            session.upstream = None;
            lost()
        }
    }
}

fn lost() -> String {
    "451 4.4.2 Lost the connection to the mail server; the message was not sent, try again\r\n"
        .into()
}

async fn relay(session: &mut Session, line: &str) -> Reply {
    let Some(up) = session.upstream.as_mut() else {
        return Reply::local(
            451,
            "4.4.2 Lost the connection to the mail server, try again",
        );
    };
    match up.command(line).await {
        Ok(reply) => reply,
        Err(_) => {
            session.upstream = None;
            Reply::local(
                451,
                "4.4.2 Lost the connection to the mail server, try again",
            )
        }
    }
}

/// What the app hears when its login is refused (RFC 4954 §6 codes).
fn login_refusal(refused: LoginRefused) -> String {
    match refused {
        LoginRefused::BadCredential => "535 5.7.8 Authentication credentials invalid\r\n".into(),
        LoginRefused::ProtocolNotAllowed => {
            "535 5.7.8 This credential may not use SMTP (spec.gateway.apps[].protocols)\r\n".into()
        }
        LoginRefused::Throttled { retry_after } => format!(
            "454 4.7.0 Too many failed logins, try again in {} s\r\n",
            retry_after.as_secs().max(1)
        ),
        LoginRefused::TooManySessions => {
            "454 4.7.0 Too many sessions for this credential, try again later\r\n".into()
        }
        LoginRefused::Unavailable => {
            "454 4.7.0 The mailbox is not connected now (no valid access token), try again later\r\n"
                .into()
        }
    }
}

/// The next line within `idle`, or how the session ends (idle, or the credential withdrawn).
async fn next_line(
    reader: &mut BufReader<Box<dyn Io>>,
    limit: usize,
    idle: Duration,
    session: &Session,
) -> Result<Line, Ended> {
    let read = tokio::time::timeout(idle, read_line(reader, limit));
    let result = match &session.authorized {
        Some(authorized) => tokio::select! {
            r = read => r,
            () = authorized.lease.revoked() => return Err(Ended::Revoked),
        },
        None => read.await,
    };
    match result {
        Ok(Ok(line)) => Ok(line),
        Ok(Err(_)) => Err(Ended::Io),
        Err(_) => Err(Ended::Idle),
    }
}

async fn write(reader: &mut BufReader<Box<dyn Io>>, text: &str) -> std::io::Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    let stream = reader.get_mut();
    stream.write_all(text.as_bytes()).await?;
    stream.flush().await
}
