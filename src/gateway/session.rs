//! The interface between the gateway's listener/login layer and a protocol handler (IMAP, POP3,
//! SMTP): what a login checks and what a successful one gives the handler (docs/gateway.md,
//! GATEWAY.md of issue 22).
//!
//! A handler parses the app's login, calls [`Login::login`] with the username and password it was
//! given, and on [`Authorized`] connects upstream with the entry's current token
//! ([`super::upstream`]) and relays. It keeps [`Authorized::lease`] for the session's life: the lease
//! counts the session against the credential's cap and says when the credential vanished
//! ([`SessionLease::revoked`]), at which point the handler ends the session.

use std::{fmt, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::config::GatewayConfig;
use crate::secret::SecretValue;

/// A protocol the gateway speaks to apps (the same type as the config's, so that an app's
/// `protocols` compare without conversion).
pub use super::config::GatewayProtocol as Protocol;

impl Protocol {
    /// The protocol's name (`IMAP`, `POP3`, `SMTP`), also its metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Imap => "IMAP",
            Self::Pop3 => "POP3",
            Self::Smtp => "SMTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One app of one integration: namespace, integration, app name (`Display`: `ns/mi/app`, the
/// credential's username).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId {
    pub namespace: String,
    pub integration: String,
    pub app: String,
}

impl AppId {
    pub fn new(
        namespace: impl Into<String>,
        integration: impl Into<String>,
        app: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            integration: integration.into(),
            app: app.into(),
        }
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.integration, self.app)
    }
}

/// One integration as the gateway knows it: its gateway Secret, parsed. Replaced whole (a new
/// `Arc<Entry>`) whenever the Secret changes; a session keeps the entry it logged in with.
#[derive(Clone, Debug)]
pub struct Entry {
    /// `gateway.json`.
    pub config: Arc<GatewayConfig>,
    /// `access_token`: the integration's current access token (redacted by type).
    pub access_token: SecretValue,
    /// `expiry`: when the token expires, if the Secret says.
    pub expiry: Option<Timestamp>,
}

impl Entry {
    /// Whether the token can be presented upstream at `now`: present and not expired.
    pub fn token_usable(&self, now: Timestamp) -> bool {
        !self.access_token.is_empty() && self.expiry.is_none_or(|at| at > now)
    }
}

/// What a successful login gives a protocol handler.
#[derive(Debug)]
pub struct Authorized {
    /// Namespace, integration, app name.
    pub app: AppId,
    /// The integration's gateway entry as of the login.
    pub entry: Arc<Entry>,
    /// The app's address.
    pub source: SocketAddr,
    /// Held for the session's life (see [`SessionLease`]).
    pub lease: SessionLease,
}

/// A session's hold on its credential: counts the session against the credential's cap until it is
/// dropped, and is revoked when the credential vanishes (app removed from `spec.gateway`,
/// integration deleted, password retired).
pub struct SessionLease {
    revoked: CancellationToken,
    _count: Option<Box<dyn Send + Sync>>,
}

impl SessionLease {
    /// A lease revoked through `revoked`, holding `count` (dropped with the lease) for the cap.
    pub fn new(revoked: CancellationToken, count: impl Send + Sync + 'static) -> Self {
        Self {
            revoked,
            _count: Some(Box::new(count)),
        }
    }

    /// A lease that counts nothing and is never revoked (tests, tools).
    pub fn detached() -> Self {
        Self {
            revoked: CancellationToken::new(),
            _count: None,
        }
    }

    /// Resolves when the credential vanished: the handler ends the session.
    pub async fn revoked(&self) {
        self.revoked.cancelled().await
    }

    /// Whether the credential has vanished.
    pub fn is_revoked(&self) -> bool {
        self.revoked.is_cancelled()
    }

    /// The token cancelled when the credential vanishes (for a task that watches it apart from
    /// the lease: a parked upstream session, [`super::parked`]).
    pub fn revocation(&self) -> CancellationToken {
        self.revoked.clone()
    }
}

impl fmt::Debug for SessionLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLease")
            .field("revoked", &self.is_revoked())
            .finish()
    }
}

/// Checks a credential. Implemented by the gateway's login layer (directory + throttle); protocol
/// handlers call it and nothing else to authenticate an app.
pub trait Login: Send + Sync {
    /// Check a credential. Throttling and logging of the attempt happen inside.
    fn login(
        &self,
        protocol: Protocol,
        username: &str,
        password: &SecretValue,
        source: SocketAddr,
    ) -> impl Future<Output = Result<Authorized, LoginRefused>> + Send;
}

/// Why a login was refused. The app is told only what is its to act on; every variant is one
/// `reason` label of the login metric and log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginRefused {
    /// Unknown username, wrong or retired password.
    BadCredential,
    /// Too many failed logins from this address or for this username: try again after this.
    Throttled { retry_after: Duration },
    /// The credential is good but not for this protocol (`spec.gateway.apps[].protocols`).
    ProtocolNotAllowed,
    /// The credential already has the most sessions it may have at once.
    TooManySessions,
    /// The integration has no usable access token now (none yet, or expired).
    Unavailable,
}

impl LoginRefused {
    /// The metrics label and log reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::BadCredential => "bad_credential",
            Self::Throttled { .. } => "throttled",
            Self::ProtocolNotAllowed => "protocol_not_allowed",
            Self::TooManySessions => "too_many_sessions",
            Self::Unavailable => "unavailable",
        }
    }

    /// Whether the app should try again later (a temporary failure: SMTP 4xx, IMAP `[UNAVAILABLE]`).
    pub fn is_temporary(self) -> bool {
        matches!(
            self,
            Self::Throttled { .. } | Self::TooManySessions | Self::Unavailable
        )
    }
}

impl fmt::Display for LoginRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadCredential => f.write_str("invalid credentials"),
            Self::Throttled { retry_after } => write!(
                f,
                "too many failed logins, try again in {} s",
                retry_after.as_secs().max(1)
            ),
            Self::ProtocolNotAllowed => {
                f.write_str("this credential is not allowed to use this protocol")
            }
            Self::TooManySessions => f.write_str("too many sessions for this credential"),
            Self::Unavailable => {
                f.write_str("the mailbox is not connected now (no valid access token), try later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_id_displays_as_the_username() {
        assert_eq!(AppId::new("ns", "mi", "app").to_string(), "ns/mi/app");
        assert_eq!(Protocol::Pop3.to_string(), "POP3");
    }

    #[test]
    fn a_lease_reports_revocation_and_releases_its_count() {
        let token = CancellationToken::new();
        let counter = Arc::new(());
        let lease = SessionLease::new(token.clone(), counter.clone());
        assert_eq!(Arc::strong_count(&counter), 2);
        assert!(!lease.is_revoked());
        token.cancel();
        assert!(lease.is_revoked());
        drop(lease);
        assert_eq!(Arc::strong_count(&counter), 1);
    }
}
