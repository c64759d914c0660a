//! The gateway's [`Login`]: the throttle, the directory's verifiers, the protocol check, the token's
//! presence and the per-credential session cap, in that order; one log line and one metric per
//! attempt, never with the password.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use jiff::Timestamp;

use super::{
    config::{GatewayAppConfig, Verifier},
    directory::{Directory, LeaseKey},
    metrics::GatewayMetrics,
    parked::Pool,
    session::{AppId, Authorized, Login, LoginRefused, Protocol, SessionLease},
    throttle::{Penalty, SessionCounts, Throttle},
    usage::Usage,
};
use crate::secret::SecretValue;

/// The username as given, for a log line: at most 256 characters, control characters escaped.
pub fn loggable(username: &str) -> String {
    username
        .chars()
        .take(256)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// The verifier `password` matches at `now`, if any. Every verifier is checked (no early exit), so
/// the time taken does not say which one matched.
pub fn matching_verifier<'a>(
    app: &'a GatewayAppConfig,
    password: &SecretValue,
    now: Timestamp,
) -> Option<&'a Verifier> {
    app.verifiers.iter().fold(None, |found, v| {
        let matches = v.matches(password, now);
        found.or(if matches { Some(v) } else { None })
    })
}

/// Directory, throttle and session counts together.
pub struct Gate {
    pub directory: Arc<Directory>,
    pub throttle: Throttle,
    pub counts: Arc<SessionCounts>,
    pub metrics: Arc<GatewayMetrics>,
    pub max_sessions_per_credential: usize,
    pub usage: Option<Arc<Usage>>,
    /// Parked upstream IMAP sessions count against the session cap; at the cap, the oldest
    /// parked one of the credential makes way for a login ([`super::parked`]).
    pub parked: Option<Arc<Pool>>,
}

impl Gate {
    fn refuse(
        &self,
        protocol: Protocol,
        username: &str,
        source: SocketAddr,
        refused: LoginRefused,
    ) -> LoginRefused {
        tracing::info!(user = %loggable(username), source = %source, protocol = %protocol,
            result = refused.reason(), "gateway login refused");
        self.metrics.login(protocol, refused.reason());
        refused
    }

    async fn failed(
        &self,
        protocol: Protocol,
        username: &str,
        source: SocketAddr,
        refused: LoginRefused,
    ) -> LoginRefused {
        match self.throttle.failed(source.ip(), username) {
            Penalty::None => self.refuse(protocol, username, source, refused),
            Penalty::Delay(delay) => {
                self.metrics.throttled("delay");
                tokio::time::sleep(delay).await;
                self.refuse(protocol, username, source, refused)
            }
            Penalty::Refuse(retry_after) => {
                self.metrics.throttled("refusal");
                self.refuse(
                    protocol,
                    username,
                    source,
                    LoginRefused::Throttled { retry_after },
                )
            }
        }
    }

    fn check(
        &self,
        protocol: Protocol,
        username: &str,
        password: &SecretValue,
        source: SocketAddr,
    ) -> Result<Authorized, LoginRefused> {
        let now = Timestamp::now();
        let entry = self
            .directory
            .lookup(username)
            .ok_or(LoginRefused::BadCredential)?;
        let app = entry
            .config
            .app(username)
            .ok_or(LoginRefused::BadCredential)?;
        let verifier = matching_verifier(app, password, now).ok_or(LoginRefused::BadCredential)?;
        if !app.protocols.contains(&protocol) {
            return Err(LoginRefused::ProtocolNotAllowed);
        }
        if !entry.token_usable(now) {
            return Err(LoginRefused::Unavailable);
        }
        let max = self.max_sessions_per_credential;
        let counted = self
            .counts
            .try_open(username, max)
            .or_else(|| {
                // A parked session must not keep an active one out.
                let parked = self.parked.as_ref()?;
                while parked.evict_oldest(username) {
                    if let Some(counted) = self.counts.try_open(username, max) {
                        return Some(counted);
                    }
                }
                None
            })
            .ok_or(LoginRefused::TooManySessions)?;
        let revoked = self.directory.lease(LeaseKey {
            username: username.to_owned(),
            verifier: verifier.sha256.clone(),
            protocol,
        });
        let id = AppId::new(
            entry.config.namespace.clone(),
            entry.config.integration.clone(),
            app.name.clone(),
        );
        Ok(Authorized {
            app: id,
            entry: entry.clone(),
            source,
            lease: SessionLease::new(revoked, counted),
        })
    }
}

impl Gate {
    /// A login admitted: its log line (`upstream`: for IMAP, whether the upstream session is a
    /// parked one, `reused`, or `new`), metric and usage record.
    pub fn admitted(&self, who: &Authorized, protocol: Protocol, upstream: Option<&str>) {
        match upstream {
            Some(upstream) => tracing::info!(app = %who.app, source = %who.source,
                protocol = %protocol, result = "success", upstream, "gateway login"),
            None => tracing::info!(app = %who.app, source = %who.source, protocol = %protocol,
                result = "success", "gateway login"),
        }
        self.metrics.login(protocol, "success");
        if let Some(usage) = &self.usage {
            usage.record(&who.app);
        }
    }

    /// [`Login::login`] without the success line: the caller calls [`Self::admitted`] once it
    /// knows how the upstream session is had. Refusals are logged and counted here.
    pub async fn authorize(
        &self,
        protocol: Protocol,
        username: &str,
        password: &SecretValue,
        source: SocketAddr,
    ) -> Result<Authorized, LoginRefused> {
        if let Err(retry_after) = self.throttle.admit(source.ip()) {
            self.metrics.throttled("refusal");
            return Err(self.refuse(
                protocol,
                username,
                source,
                LoginRefused::Throttled { retry_after },
            ));
        }
        match self.check(protocol, username, password, source) {
            Ok(authorized) => Ok(authorized),
            Err(LoginRefused::BadCredential) => Err(self
                .failed(protocol, username, source, LoginRefused::BadCredential)
                .await),
            Err(other) => Err(self.refuse(protocol, username, source, other)),
        }
    }
}

impl Login for Gate {
    async fn login(
        &self,
        protocol: Protocol,
        username: &str,
        password: &SecretValue,
        source: SocketAddr,
    ) -> Result<Authorized, LoginRefused> {
        let who = self.authorize(protocol, username, password, source).await?;
        self.admitted(&who, protocol, None);
        Ok(who)
    }
}

/// The longest a throttled app is told to wait in a protocol reply.
pub fn retry_secs(retry_after: Duration) -> u64 {
    retry_after.as_secs().clamp(1, 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_logged_short_and_without_control_characters() {
        assert_eq!(loggable("a\r\nb\x1b"), "a\\r\\nb\\u{1b}");
        assert_eq!(loggable(&"x".repeat(1000)).len(), 256);
    }
}
