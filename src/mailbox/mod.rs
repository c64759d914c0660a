//! The mailbox connection check: does the mail server really accept the current access token?
//!
//! One short session per check, like a mail client's: IMAP (`AUTHENTICATE`, then `EXAMINE INBOX`,
//! because Microsoft 365 can accept the token and then refuse every command), POP3 (`AUTH`, `STAT`)
//! or SMTP submission (`EHLO`, `AUTH`, `QUIT` — no mail is ever sent), with XOAUTH2 or OAUTHBEARER,
//! over implicit TLS, STARTTLS, or (loopback only) plain TCP.
//!
//! Errors map to condition reasons through [`MailboxError::reason`]. Neither the token nor the SASL
//! string ever appears in an error: details are built from server replies and our own words, and
//! [`check`] scrubs them once more before returning.

pub mod allowed;
mod bounded;
mod imap;
mod pop3;
mod sasl;
mod smtp;
pub(crate) mod tls;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub(crate) use sasl::encode as encode_sasl;
pub use sasl::{SaslMechanism, decode_challenge, oauthbearer, printable, xoauth2};

use crate::{
    api::{MailProtocol, MailServer, TlsMode},
    secret::SecretValue,
};

/// How long a check may take, connection to logout, unless the target says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol a check speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckProtocol {
    Imap,
    Pop3,
    /// SMTP submission (RFC 6409): authenticate only, never send.
    Smtp,
}

impl CheckProtocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Imap => "IMAP",
            Self::Pop3 => "POP3",
            Self::Smtp => "SMTP",
        }
    }
}

impl std::fmt::Display for CheckProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<MailProtocol> for CheckProtocol {
    fn from(p: MailProtocol) -> Self {
        match p {
            MailProtocol::Imap => Self::Imap,
            MailProtocol::Pop3 => Self::Pop3,
        }
    }
}

/// What to check and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTarget {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub protocol: CheckProtocol,
    pub mechanism: SaslMechanism,
    /// The mailbox account (the SASL user).
    pub username: String,
    /// PEM CA certificates trusted in addition to the public roots (for a private CA).
    pub extra_ca_pem: Option<Vec<u8>>,
    /// The whole check, connect to logout, must finish within this.
    pub timeout: Duration,
    /// The addresses the host may resolve to ([`allowed::AllowedHosts::allows_address`]); `None`
    /// checks none (a caller that chose the server itself). The operator always sets it.
    pub allowed: Option<std::sync::Arc<allowed::AllowedHosts>>,
}

impl CheckTarget {
    /// A target with implicit TLS, XOAUTH2, no extra CA and the default timeout.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        protocol: CheckProtocol,
        username: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            tls: TlsMode::Implicit,
            protocol,
            mechanism: SaslMechanism::XOAuth2,
            username: username.into(),
            extra_ca_pem: None,
            timeout: DEFAULT_TIMEOUT,
            allowed: None,
        }
    }

    /// A target for a `MailServer` of the resource (TLS mode defaults to Implicit as in the CRD).
    pub fn for_server(
        server: &MailServer,
        protocol: CheckProtocol,
        username: impl Into<String>,
    ) -> Result<Self, MailboxError> {
        let port = u16::try_from(server.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| MailboxError::Protocol {
                detail: format!("port {} is not a TCP port", server.port),
            })?;
        Ok(Self {
            tls: server.tls.unwrap_or_default(),
            ..Self::new(server.host.clone(), port, protocol, username)
        })
    }

    pub fn with_tls(mut self, tls: TlsMode) -> Self {
        self.tls = tls;
        self
    }

    pub fn with_mechanism(mut self, mechanism: SaslMechanism) -> Self {
        self.mechanism = mechanism;
        self
    }

    pub fn with_extra_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca_pem = Some(pem.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connect only to addresses `allowed` allows (after resolving the host once).
    pub fn with_allowed(mut self, allowed: std::sync::Arc<allowed::AllowedHosts>) -> Self {
        self.allowed = Some(allowed);
        self
    }

    fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .trim_matches(['[', ']'])
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// A successful check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOk {
    pub protocol: CheckProtocol,
    pub mechanism: SaslMechanism,
    pub tls: TlsMode,
    /// Messages in INBOX (IMAP `EXISTS`) or in the maildrop (POP3 `STAT`); `None` for SMTP.
    pub messages: Option<u32>,
    pub elapsed: Duration,
}

impl std::fmt::Display for CheckOk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let over = match self.tls {
            TlsMode::Implicit => "TLS",
            TlsMode::StartTls => "STARTTLS",
            TlsMode::None => "plain TCP",
        };
        write!(
            f,
            "{} accepted the token ({} over {over})",
            self.protocol, self.mechanism
        )?;
        match (self.protocol, self.messages) {
            (CheckProtocol::Imap, Some(n)) => write!(f, "; INBOX has {n} messages"),
            (CheckProtocol::Pop3, Some(n)) => write!(f, "; maildrop has {n} messages"),
            _ => Ok(()),
        }
    }
}

/// Why a check failed. Every variant maps to a condition reason ([`MailboxError::reason`]); no
/// variant ever holds the token or the SASL string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    /// The server refused the token. `detail` is the server's decoded SASL error challenge (for
    /// example `{"status":"invalid_token"}`) when it sent one, else its failure reply.
    #[error("the mail server rejected the access token: {detail}")]
    AuthFailed { detail: String },
    /// DNS, connection refused or reset, timeout.
    #[error("the mail server is unreachable: {detail}")]
    Unreachable { detail: String },
    /// Certificate not trusted, wrong name, handshake failure, STARTTLS refused.
    #[error("TLS error: {detail}")]
    Tls { detail: String },
    /// The server said something a mail client cannot work with.
    #[error("mail protocol error: {detail}")]
    Protocol { detail: String },
    /// The host resolved to an address the operator does not connect to.
    #[error("{detail}")]
    AddressNotAllowed { detail: String },
}

impl MailboxError {
    /// The condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::AuthFailed { .. } => "MailboxAuthFailed",
            Self::Unreachable { .. } => "MailboxUnreachable",
            Self::AddressNotAllowed { .. } => crate::reason::Reason::MailboxHostNotAllowed.as_str(),
            Self::Tls { .. } => "TLSError",
            Self::Protocol { .. } => "ProtocolError",
        }
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        match self {
            Self::AuthFailed { detail }
            | Self::Unreachable { detail }
            | Self::Tls { detail }
            | Self::Protocol { detail }
            | Self::AddressNotAllowed { detail } => detail,
        }
    }

    fn detail_mut(&mut self) -> &mut String {
        match self {
            Self::AuthFailed { detail }
            | Self::Unreachable { detail }
            | Self::Tls { detail }
            | Self::Protocol { detail }
            | Self::AddressNotAllowed { detail } => detail,
        }
    }

    /// Remove any of `secrets` from the detail (defence in depth: no code path puts them there).
    fn scrub(mut self, secrets: &[&str]) -> Self {
        let detail = self.detail_mut();
        for secret in secrets {
            // Very short strings would mangle ordinary text; real tokens are long.
            if secret.len() >= 8 && detail.contains(secret) {
                *detail = detail.replace(secret, "[redacted]");
            }
        }
        self
    }
}

/// Microsoft's answer to SMTP AUTH when SMTP AUTH is switched off for the mailbox or the tenant:
/// `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.`
/// The token is fine; only an Exchange admin can fix it (reason `SmtpClientAuthenticationDisabled`).
pub fn is_smtp_auth_disabled(detail: &str) -> bool {
    detail.contains("5.7.139")
        && detail
            .to_ascii_lowercase()
            .contains("smtpclientauthentication")
}

/// Where a check is, for the timeout message ("no answer … while authenticating").
pub(crate) struct Progress(Mutex<&'static str>);

impl Progress {
    fn new() -> Self {
        Self(Mutex::new("connecting"))
    }

    pub(crate) fn at(&self, phase: &'static str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    fn phase(&self) -> &'static str {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the protocol modules need for one check.
pub(crate) struct Session<'a> {
    pub target: &'a CheckTarget,
    /// The first SASL message, not base64-encoded.
    pub sasl: &'a SecretValue,
    pub extra_cas: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub progress: &'a Progress,
}

impl Session<'_> {
    pub(crate) fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, MailboxError> {
        tls::client_config(&self.extra_cas)
    }
}

/// Check that the mailbox accepts `token` for `target.username`.
pub async fn check(target: &CheckTarget, token: &SecretValue) -> Result<CheckOk, MailboxError> {
    let started = Instant::now();
    let sasl =
        target
            .mechanism
            .initial_response(&target.username, &target.host, target.port, token);
    let encoded = sasl::encode(sasl.expose().as_bytes());
    let progress = Progress::new();
    // Boxed: the protocol's state (TLS connection, buffers: about 10 KiB) is allocated when the
    // check runs, not carried by every future that awaits one. A check queued for its permit
    // holds only its inputs (10,000 queued checks held 100 MiB before).
    let outcome =
        tokio::time::timeout(target.timeout, Box::pin(run(target, &sasl, &progress))).await;
    let result = match outcome {
        Ok(result) => result,
        Err(_) => Err(MailboxError::Unreachable {
            detail: format!(
                "{}:{}: no answer within {}s (while {})",
                target.host,
                target.port,
                target.timeout.as_secs_f32(),
                progress.phase()
            ),
        }),
    };
    match result {
        Ok(mut ok) => {
            ok.elapsed = started.elapsed();
            tracing::debug!(host = %target.host, port = target.port, protocol = %target.protocol,
                mechanism = %target.mechanism, elapsed_ms = ok.elapsed.as_millis() as u64, "mailbox check passed");
            Ok(ok)
        }
        Err(e) => {
            let e = e.scrub(&[token.expose(), sasl.expose(), &encoded]);
            tracing::debug!(host = %target.host, port = target.port, protocol = %target.protocol,
                mechanism = %target.mechanism, reason = e.reason(), error = %e, "mailbox check failed");
            Err(e)
        }
    }
}

async fn run(
    target: &CheckTarget,
    sasl: &SecretValue,
    progress: &Progress,
) -> Result<CheckOk, MailboxError> {
    if target.tls == TlsMode::None && !target.is_loopback() {
        return Err(MailboxError::Tls {
            detail: format!(
                "refusing to send the token to {} without TLS: tls: None is only for loopback",
                target.host
            ),
        });
    }
    let extra_cas = match &target.extra_ca_pem {
        Some(pem) => tls::parse_ca_pem(pem)?,
        None => Vec::new(),
    };
    let session = Session {
        target,
        sasl,
        extra_cas,
        progress,
    };
    let messages = match target.protocol {
        CheckProtocol::Imap => imap::check(&session).await?,
        CheckProtocol::Pop3 => pop3::check(&session).await?,
        CheckProtocol::Smtp => smtp::check(&session).await?,
    };
    Ok(CheckOk {
        protocol: target.protocol,
        mechanism: target.mechanism,
        tls: target.tls,
        messages,
        elapsed: Duration::ZERO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        let d = || "x".to_owned();
        assert_eq!(
            MailboxError::AuthFailed { detail: d() }.reason(),
            "MailboxAuthFailed"
        );
        assert_eq!(
            MailboxError::Unreachable { detail: d() }.reason(),
            "MailboxUnreachable"
        );
        assert_eq!(MailboxError::Tls { detail: d() }.reason(), "TLSError");
        assert_eq!(
            MailboxError::Protocol { detail: d() }.reason(),
            "ProtocolError"
        );
    }

    #[test]
    fn scrub_removes_long_secrets_only() {
        let e = MailboxError::Protocol {
            detail: "server echoed ya29.secret-token and x".into(),
        }
        .scrub(&["ya29.secret-token", "x"]);
        assert_eq!(e.detail(), "server echoed [redacted] and x");
    }

    #[test]
    fn target_from_mail_server() {
        let server = MailServer {
            host: "imap.gmail.com".into(),
            port: 993,
            tls: None,
        };
        let t = CheckTarget::for_server(&server, MailProtocol::Imap.into(), "a@b").unwrap();
        assert_eq!(t.tls, TlsMode::Implicit);
        assert_eq!(t.port, 993);
        assert_eq!(t.timeout, DEFAULT_TIMEOUT);
        let bad = MailServer {
            port: 70000,
            ..server
        };
        assert!(CheckTarget::for_server(&bad, CheckProtocol::Imap, "a@b").is_err());
    }

    #[tokio::test]
    async fn plain_tcp_is_refused_for_remote_hosts() {
        let t = CheckTarget::new("imap.example.com", 143, CheckProtocol::Imap, "a@b")
            .with_tls(TlsMode::None);
        let err = check(&t, &SecretValue::new("tok")).await.unwrap_err();
        assert_eq!(err.reason(), "TLSError", "{err}");
        assert!(
            CheckTarget::new("127.0.0.1", 1, CheckProtocol::Imap, "a").is_loopback()
                && CheckTarget::new("[::1]", 1, CheckProtocol::Imap, "a").is_loopback()
                && CheckTarget::new("localhost", 1, CheckProtocol::Imap, "a").is_loopback()
        );
    }
}
