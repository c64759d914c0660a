//! Defaults, applied in code: the CRD carries none, so what a user applied is exactly what the API
//! server stores and GitOps tools see no drift.

use super::*;
use std::time::Duration;

/// Default `spec.refreshBefore`.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(10 * 60);
/// Default `spec.mailbox.checkInterval`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// Default key of the CA bundle in `spec.mailbox.caSecretRef`.
pub const DEFAULT_CA_KEY: &str = "ca.crt";
/// Default key of the client ID in the client Secret.
pub const DEFAULT_CLIENT_ID_KEY: &str = "client_id";
/// Default key of the client secret in the client Secret.
pub const DEFAULT_CLIENT_SECRET_KEY: &str = "client_secret";

impl MailIntegrationSpec {
    /// `spec.refreshBefore` or its default. The CRD's CEL rule guarantees a parseable value on the
    /// API server; a value that still fails to parse (an old object) falls back to the default.
    pub fn refresh_before(&self) -> Duration {
        self.refresh_before
            .as_deref()
            .and_then(|s| s.parse::<kube::core::Duration>().ok())
            .map(Duration::from)
            .unwrap_or(DEFAULT_REFRESH_BEFORE)
    }

    /// Whether refreshing is suspended.
    pub fn suspended(&self) -> bool {
        self.suspend.unwrap_or(false)
    }

    /// The sign-in page's default prompt.
    pub fn prompt(&self) -> Prompt {
        self.oauth.prompt.unwrap_or_default()
    }

    /// How often the mailbox is checked (besides after every refresh).
    pub fn check_interval(&self) -> Duration {
        self.mailbox
            .check_interval
            .as_deref()
            .and_then(|s| s.parse::<kube::core::Duration>().ok())
            .map(Duration::from)
            .unwrap_or(DEFAULT_CHECK_INTERVAL)
    }

    /// The mail protocol workloads read with.
    pub fn protocol(&self) -> MailProtocol {
        self.mailbox.protocol.unwrap_or_default()
    }
}

impl ClientSecretRef {
    /// Key of the client ID.
    pub fn client_id_key(&self) -> &str {
        self.client_id_key
            .as_deref()
            .unwrap_or(DEFAULT_CLIENT_ID_KEY)
    }

    /// Key of the client secret.
    pub fn client_secret_key(&self) -> &str {
        self.client_secret_key
            .as_deref()
            .unwrap_or(DEFAULT_CLIENT_SECRET_KEY)
    }
}

impl MailIntegration {
    /// Name of the operator-owned grant Secret of this integration.
    pub fn grant_secret_name(&self) -> String {
        grant_secret_name(&kube::ResourceExt::name_any(self))
    }
}

/// Name of the grant Secret of the integration `name`.
pub fn grant_secret_name(name: &str) -> String {
    format!("{name}-oauth-grant")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_refresh_before(v: Option<&str>) -> MailIntegrationSpec {
        serde_json::from_value(serde_json::json!({
            "provider": "Google",
            "mailbox": {"address": "a@example.com"},
            "oauth": {"clientSecretRef": {"name": "c"}},
            "tokenSecret": {"name": "t"},
            "refreshBefore": v,
        }))
        .unwrap()
    }

    #[test]
    fn refresh_before_parses_go_durations_and_defaults() {
        assert_eq!(
            spec_with_refresh_before(None).refresh_before(),
            DEFAULT_REFRESH_BEFORE
        );
        assert_eq!(
            spec_with_refresh_before(Some("15m30s")).refresh_before(),
            Duration::from_secs(930)
        );
        assert_eq!(
            spec_with_refresh_before(Some("1m")).refresh_before(),
            Duration::from_secs(60)
        );
        assert_eq!(
            spec_with_refresh_before(Some("garbage")).refresh_before(),
            DEFAULT_REFRESH_BEFORE
        );
    }

    #[test]
    fn defaults_apply_in_code() {
        let spec = spec_with_refresh_before(None);
        assert_eq!(spec.prompt(), Prompt::Consent);
        assert_eq!(spec.protocol(), MailProtocol::Imap);
        assert!(!spec.suspended());
        assert_eq!(spec.oauth.client_secret_ref.client_id_key(), "client_id");
        assert_eq!(
            spec.oauth.client_secret_ref.client_secret_key(),
            "client_secret"
        );
    }
}
