//! What the IMAP and POP3 handlers ([`super::imap`], [`super::pop3`]) share around their own
//! commands: the pre-login connection ([`Conn`]) and its bounded, timed reads, STARTTLS/STLS, the
//! refusal of a login before TLS, the connection to the mail server once an app is authorized, and
//! the hand-over to [`super::relay`]. Each protocol keeps its own parsing and reply texts.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    Ctx,
    listen::{ClientStream, TlsState},
    logout::{self, LogoutWatch},
    parked::LoginAnswer,
    relay::{self, OpenSession},
    session::{Authorized, LoginRefused, Protocol},
    upstream::{self, Upstream},
    wire::{ReadError, Wire},
};
use crate::secret::SecretValue;

/// An app's connection before login.
pub struct Conn {
    pub wire: Wire<ClientStream>,
    pub tls: TlsState,
    pub source: SocketAddr,
    pub ctx: Arc<Ctx>,
}

/// Why a read before login ended the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Nothing within `--pre-login-idle`.
    Idle,
    /// A line (or command) over its bound.
    TooLong,
    /// The app closed the connection.
    Closed,
}

impl Conn {
    pub fn new(stream: ClientStream, source: SocketAddr, tls: TlsState, ctx: Arc<Ctx>) -> Self {
        Self {
            wire: Wire::new(stream, ctx.bounds.max_line),
            tls,
            source,
            ctx,
        }
    }

    /// Write and flush; false when the app is gone.
    pub async fn send(&mut self, text: &str) -> bool {
        self.wire.send(text.as_bytes()).await
    }

    /// One pre-login read (`read`, on this connection's wire) within `--pre-login-idle`; an idle or
    /// overlong one is counted as the connection's end for `protocol`.
    pub async fn timed<T>(
        ctx: &Ctx,
        protocol: Protocol,
        read: impl Future<Output = Result<T, ReadError>>,
    ) -> Result<T, Ending> {
        match tokio::time::timeout(ctx.bounds.pre_login_idle, read).await {
            Err(_) => {
                ctx.metrics.closed(protocol, "idle");
                Err(Ending::Idle)
            }
            Ok(Err(ReadError::TooLong)) => {
                ctx.metrics.closed(protocol, "pre_login_limit");
                Err(Ending::TooLong)
            }
            Ok(Err(ReadError::Closed)) => Err(Ending::Closed),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// A login before TLS where TLS is required: counted and logged (no credential); the caller
    /// sends its protocol's refusal.
    pub fn plaintext_refused(&self, protocol: Protocol) {
        self.ctx.metrics.login(protocol, "plaintext_refused");
        tracing::info!(source = %self.source, protocol = %protocol, result = "plaintext_refused",
            "gateway login refused before TLS");
    }

    /// STARTTLS (IMAP) or STLS (POP3): `go_ahead` sent, then the handshake within the pre-login
    /// idle time. Bytes the app pipelined behind the command end the connection with `pipelined`
    /// (they would be taken as sent under TLS).
    pub async fn start_tls(
        mut self,
        protocol: Protocol,
        go_ahead: &str,
        pipelined: &str,
    ) -> TlsStart {
        let Some(acceptor) = self.tls.starttls.clone().filter(|_| !self.tls.tls) else {
            return TlsStart::Unavailable(self);
        };
        if self.wire.has_buffered() {
            let _ = self.send(pipelined).await;
            return TlsStart::Close;
        }
        if !self.send(go_ahead).await {
            return TlsStart::Close;
        }
        let max_line = self.ctx.bounds.max_line;
        let (stream, _) = self.wire.into_parts();
        let handshake = stream.start_tls(&acceptor);
        match tokio::time::timeout(self.ctx.bounds.pre_login_idle, handshake).await {
            Ok(Ok(stream)) => TlsStart::Started(Conn {
                wire: Wire::new(stream, max_line),
                tls: self.tls.after_starttls(),
                source: self.source,
                ctx: self.ctx,
            }),
            _ => {
                self.ctx.metrics.closed(protocol, "tls");
                TlsStart::Close
            }
        }
    }

    /// The app's login (the gate: throttle, credential, protocol, token, session cap), then the
    /// mail server of its integration, authenticated: for IMAP a parked session of the same
    /// credential if one fits ([`super::parked`]), else a new one. A failure of the latter is
    /// counted and logged; either refusal is the caller's to answer in its protocol.
    pub async fn log_in(
        &self,
        protocol: Protocol,
        username: &str,
        password: &SecretValue,
    ) -> Result<(Authorized, Upstream), Refusal> {
        let ctx = &self.ctx;
        let mut clock = upstream::StepClock::new();
        let who = ctx
            .login
            .authorize(protocol, username, password, self.source)
            .await
            .map_err(Refusal::Login)?;
        let check_us = clock.lap();
        let imap = protocol == Protocol::Imap;
        let reused = if imap {
            ctx.parked.take(&who).await
        } else {
            None
        };
        let upstream_kind = imap.then_some(if reused.is_some() { "reused" } else { "new" });
        ctx.login.admitted(&who, protocol, upstream_kind);
        if let Some(reused) = reused {
            let reuse_us = clock.lap();
            tracing::debug!(protocol = %protocol, check_us, reuse_us, "upstream set-up steps");
            let upstream = Upstream {
                stream: reused.stream,
                pending: Vec::new(),
                reply: reused.answer.reply,
                untagged: reused.answer.untagged,
            };
            return Ok((who, upstream));
        }
        match upstream::connect(&who.entry, protocol, &ctx.allowed).await {
            Ok(upstream) => {
                tracing::debug!(protocol = %protocol, check_us, "upstream set-up steps");
                Ok((who, upstream))
            }
            Err(e) => {
                ctx.metrics.upstream_error(protocol, e.reason());
                tracing::warn!(app = %who.app, source = %self.source, protocol = %protocol,
                    reason = e.reason(), error = %e, "upstream session failed");
                Err(Refusal::Upstream(e.reason()))
            }
        }
    }

    /// Relay the logged-in session: `first` (the server's login reply and what followed it) to
    /// the app, then bytes both ways until either side ends, `idle` passes or the credential is
    /// revoked (then `revoked` to the app). With `imap` (its watch has seen what `first` holds
    /// past the login reply), a LOGOUT the watch takes is answered here, the app's connection
    /// closed, and then the server's session parked for the credential's next login or logged
    /// out ([`super::logout`], [`super::parked`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn relay(
        self,
        who: Authorized,
        upstream: Upstream,
        first: &[u8],
        protocol: Protocol,
        idle: std::time::Duration,
        revoked: &[u8],
        imap: Option<ImapFollow>,
    ) {
        let Conn {
            wire, ctx, source, ..
        } = self;
        let (mut watch, answer) = match imap {
            Some(f) => (Some(f.watch), Some(f.answer)),
            None => (None, None),
        };
        let (mut client, read_ahead) = wire.into_parts();
        let mut stream = upstream.stream;
        if let Some(watch) = watch.as_mut() {
            watch.from_app(&read_ahead);
        }
        let _open = OpenSession::new(ctx.metrics.clone(), protocol, &who);
        let end = relay::relay(
            &mut client,
            &mut stream,
            &read_ahead,
            first,
            protocol,
            idle,
            &who.lease,
            &ctx.metrics,
            watch.as_mut(),
        )
        .await;
        let app = who.app.clone();
        let mut upstream_end = "closed";
        match end {
            relay::End::Revoked => {
                let _ = client.write_all(revoked).await;
            }
            relay::End::LoggedOut => {
                let tag = watch
                    .as_ref()
                    .and_then(|w| w.answered())
                    .unwrap_or("*")
                    .to_owned();
                let answered = async {
                    client.write_all(logout::answer(&tag).as_bytes()).await?;
                    client.flush().await?;
                    client.shutdown().await
                };
                let _ = tokio::time::timeout(LOGOUT_TIMEOUT, answered).await;
                drop(client);
                upstream_end = match (answer, watch) {
                    (Some(answer), Some(watch)) => {
                        ctx.parked
                            .park_or_log_out(who, stream, answer, watch.reset(), &tag)
                            .await
                    }
                    _ => {
                        log_out_upstream(&mut stream, &tag).await;
                        "logged_out"
                    }
                };
            }
            relay::End::Closed | relay::End::Idle => {}
        }
        tracing::info!(app = %app, source = %source, protocol = %protocol,
            end = end.as_str(), upstream = upstream_end, "gateway session ended");
    }
}

/// What the relay of an IMAP session follows besides the bytes: the LOGOUT watch, and the
/// server's login answer (kept with the session if it is parked).
pub struct ImapFollow {
    pub watch: LogoutWatch,
    pub answer: LoginAnswer,
}

/// How long the gateway gives the app's connection to take its LOGOUT answer, and the server to
/// answer the LOGOUT sent on the app's behalf and close.
pub const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Send the server the app's LOGOUT (`tag LOGOUT`) and read what it still sends (discarded: the
/// app has its answer and is gone) until it closes, within [`LOGOUT_TIMEOUT`]; then the connection
/// is dropped either way.
pub(crate) async fn log_out_upstream(stream: &mut Box<dyn upstream::AsyncStream>, tag: &str) {
    let closing = async {
        stream
            .write_all(format!("{tag} LOGOUT\r\n").as_bytes())
            .await?;
        stream.flush().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(LOGOUT_TIMEOUT, closing).await;
}

/// Why [`Conn::log_in`] gave no session.
#[derive(Debug)]
pub enum Refusal {
    /// The gate refused the login.
    Login(LoginRefused),
    /// The mail server did not accept the gateway (the [`upstream::UpstreamError::reason`]).
    Upstream(&'static str),
}

/// What STARTTLS/STLS did.
pub enum TlsStart {
    /// Not offered on this connection (no STARTTLS on the port, or TLS already): unchanged.
    Unavailable(Conn),
    /// Under TLS now.
    Started(Conn),
    /// To be closed.
    Close,
}
