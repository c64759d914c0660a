//! What the gateway knows of one integration: the `gateway.json` key of the gateway Secret
//! (`<integration>-gateway`), written by the operator and the only thing the gateway reads besides
//! the current access token beside it. It holds verifiers of the apps' passwords, never a password.

use base64::{Engine, engine::general_purpose::STANDARD};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{api::TlsMode, secret::SecretValue};

/// The gateway Secret's key holding [`GatewayConfig`] as JSON.
pub const CONFIG_KEY: &str = "gateway.json";
/// The gateway Secret's key holding the integration's current access token.
pub const ACCESS_TOKEN_KEY: &str = "access_token";
/// The gateway Secret's key holding the access token's expiry (RFC 3339).
pub const EXPIRY_KEY: &str = "expiry";
/// The label the gateway selects its Secrets by (value `"true"`).
pub const GATEWAY_LABEL: &str = "mailintegration.dev/gateway";
/// The label of an app's credential Secret (value: the app's name). The gateway never reads these.
pub const GATEWAY_APP_LABEL: &str = "mailintegration.dev/gateway-app";
/// The suffix of the gateway Secret's name: `<integration>-gateway`.
pub const GATEWAY_SECRET_SUFFIX: &str = "-gateway";

/// A protocol an app may use through the gateway (the spec's type: IMAP, POP3, SMTP).
pub use crate::api::GatewayProtocol;

/// A mail server the gateway connects to on behalf of an app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamServer {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
}

/// The SASL mechanism used upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum UpstreamMechanism {
    #[default]
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

/// One verifier of an app's password: SHA-256 over salt and password.
///
/// A salted fast hash rather than a password hash (argon2, scrypt) on purpose: the passwords are 256
/// random bits made by the operator, so guessing is hopeless whatever the hash, and a slow hash
/// would cost every IMAP/SMTP login tens of milliseconds of CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verifier {
    /// Base64 (standard, padded) of 16 random bytes.
    pub salt: String,
    /// Base64 (standard, padded) of SHA-256(salt || password).
    pub sha256: String,
    /// When a rotated-out password stops working; `None` for the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retires_at: Option<Timestamp>,
}

impl Verifier {
    /// The verifier of `password` with `salt` (raw bytes).
    pub fn new(salt: &[u8], password: &SecretValue) -> Self {
        Self {
            salt: STANDARD.encode(salt),
            sha256: STANDARD.encode(digest(salt, password)),
            retires_at: None,
        }
    }

    /// Whether `password` matches and the verifier has not retired at `now`. Constant time in the
    /// password; a malformed verifier matches nothing.
    pub fn matches(&self, password: &SecretValue, now: Timestamp) -> bool {
        if self.retires_at.is_some_and(|at| at <= now) {
            return false;
        }
        let (Ok(salt), Ok(expected)) = (STANDARD.decode(&self.salt), STANDARD.decode(&self.sha256))
        else {
            return false;
        };
        if expected.len() != 32 {
            return false;
        }
        bool::from(digest(&salt, password).as_slice().ct_eq(&expected))
    }
}

fn digest(salt: &[u8], password: &SecretValue) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.expose().as_bytes());
    h.finalize().into()
}

/// One app allowed to use the integration's mailbox through the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAppConfig {
    pub name: String,
    /// `<namespace>/<integration>/<app>`.
    pub username: String,
    pub protocols: Vec<GatewayProtocol>,
    /// Addresses besides the mailbox the app may send as (SMTP envelope sender and `From:`).
    #[serde(default)]
    pub send_as: Vec<String>,
    pub verifiers: Vec<Verifier>,
}

impl GatewayAppConfig {
    /// Whether `password` is one of this app's live passwords at `now`. Every verifier is checked,
    /// so the time taken does not say which one matched.
    pub fn verify(&self, password: &SecretValue, now: Timestamp) -> bool {
        self.verifiers
            .iter()
            .fold(false, |found, v| v.matches(password, now) | found)
    }

    /// Whether the app may send as `address` (the mailbox itself always; case-insensitive).
    pub fn may_send_as(&self, mailbox: &str, address: &str) -> bool {
        address.eq_ignore_ascii_case(mailbox)
            || self.send_as.iter().any(|a| a.eq_ignore_ascii_case(address))
    }
}

/// The `gateway.json` of one integration's gateway Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    pub namespace: String,
    pub integration: String,
    pub uid: String,
    /// The mailbox address: the SASL user upstream and the sender every app may use.
    pub mailbox: String,
    #[serde(default)]
    pub mechanism: UpstreamMechanism,
    #[serde(default)]
    pub imap: Option<UpstreamServer>,
    #[serde(default)]
    pub pop3: Option<UpstreamServer>,
    #[serde(default)]
    pub smtp: Option<UpstreamServer>,
    /// PEM CA certificates trusted upstream besides the public roots.
    #[serde(default)]
    pub ca_pem: Option<String>,
    pub max_message_bytes: u64,
    pub apps: Vec<GatewayAppConfig>,
}

impl GatewayConfig {
    /// The upstream server of `protocol`, if the integration has one.
    pub fn server(&self, protocol: GatewayProtocol) -> Option<&UpstreamServer> {
        match protocol {
            GatewayProtocol::Imap => self.imap.as_ref(),
            GatewayProtocol::Pop3 => self.pop3.as_ref(),
            GatewayProtocol::Smtp => self.smtp.as_ref(),
        }
    }

    /// The app with this username.
    pub fn app(&self, username: &str) -> Option<&GatewayAppConfig> {
        self.apps.iter().find(|a| a.username == username)
    }
}

/// The username of an app's credential: `<namespace>/<integration>/<app>` (a `/` cannot occur in a
/// Kubernetes name, so no two credentials share one).
pub fn username(namespace: &str, integration: &str, app: &str) -> String {
    format!("{namespace}/{integration}/{app}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_matches_its_password_only_until_it_retires() {
        let now: Timestamp = "2026-12-06T00:00:00Z".parse().unwrap();
        let pw = SecretValue::new("p4ssw0rd-of-256-bits");
        let mut v = Verifier::new(b"0123456789abcdef", &pw);
        assert!(v.matches(&pw, now));
        assert!(!v.matches(&SecretValue::new("p4ssw0rd-of-256-bitz"), now));
        assert!(!v.matches(&SecretValue::new(""), now));
        v.retires_at = Some("2026-12-06T00:00:01Z".parse().unwrap());
        assert!(v.matches(&pw, now));
        assert!(!v.matches(&pw, "2026-12-06T00:00:01Z".parse().unwrap()));
        v.sha256 = "not base64!".into();
        assert!(!v.matches(&pw, now));
    }

    #[test]
    fn the_config_round_trips_as_json() {
        let pw = SecretValue::new("pw");
        let config = GatewayConfig {
            namespace: "team".into(),
            integration: "inbox".into(),
            uid: "u".into(),
            mailbox: "box@example.com".into(),
            mechanism: UpstreamMechanism::XOAuth2,
            imap: Some(UpstreamServer {
                host: "imap.example.com".into(),
                port: 993,
                tls: TlsMode::Implicit,
            }),
            pop3: None,
            smtp: None,
            ca_pem: None,
            max_message_bytes: 26_214_400,
            apps: vec![GatewayAppConfig {
                name: "grafana".into(),
                username: username("team", "inbox", "grafana"),
                protocols: vec![GatewayProtocol::Smtp],
                send_as: vec!["Alerts@Example.com".into()],
                verifiers: vec![Verifier::new(b"salt", &pw)],
            }],
        };
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"protocols\":[\"SMTP\"]"), "{json}");
        let back: GatewayConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let app = back.app("team/inbox/grafana").unwrap();
        assert!(app.verify(&pw, Timestamp::UNIX_EPOCH));
        assert!(app.may_send_as("box@example.com", "BOX@example.com"));
        assert!(app.may_send_as("box@example.com", "alerts@example.com"));
        assert!(!app.may_send_as("box@example.com", "ceo@example.com"));
    }
}
