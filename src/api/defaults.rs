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
/// Key of a service account's JSON key file in the client Secret (grantType ServiceAccount).
pub const DEFAULT_SERVICE_ACCOUNT_KEY: &str = "service-account.json";

impl MailIntegrationSpec {
    /// `spec.refreshBefore` or its default. The CRD's CEL rule guarantees a parseable value on the
    /// API server; a value that still fails to parse (an old object) falls back to the default
    /// (see [`go_duration`]).
    pub fn refresh_before(&self) -> Duration {
        self.refresh_before
            .as_deref()
            .and_then(go_duration)
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

    /// How often the mailbox is checked (besides at once for a new grant, see
    /// `reconcile::mailbox_check`); like
    /// [`refresh_before`](Self::refresh_before), an unparseable value gives the default. Divided
    /// by the test-only protocol scale ([`crate::time::set_test_scale`]; 1 in production).
    pub fn check_interval(&self) -> Duration {
        crate::time::scaled(
            self.mailbox
                .check_interval
                .as_deref()
                .and_then(go_duration)
                .unwrap_or(DEFAULT_CHECK_INTERVAL),
        )
    }

    /// How tokens are obtained.
    pub fn grant_type(&self) -> GrantType {
        self.oauth.grant_type.unwrap_or_default()
    }

    /// Whether a person signs in (and a grant Secret holds a refresh token): false for app-only
    /// grants, which need no sign-in link, no grant Secret and no write-ahead mark.
    pub fn interactive(&self) -> bool {
        self.grant_type() == GrantType::Interactive
    }

    /// The account that must sign in and whose claims are checked: `spec.oauth.signInAccount`
    /// (a delegate of a shared mailbox), else the mailbox itself.
    pub fn sign_in_account(&self) -> &str {
        self.oauth
            .sign_in_account
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .unwrap_or(self.mailbox.address.trim())
    }

    /// The mail protocol workloads read with.
    pub fn protocol(&self) -> MailProtocol {
        self.mailbox.protocol.unwrap_or_default()
    }
}

/// Longest duration text read: 50 parts of at most 12 digits cannot overflow a `Duration`.
const MAX_DURATION_TEXT: usize = 100;
/// Most integer digits of one part (10^12 hours is still far from `Duration::MAX`).
const MAX_DURATION_DIGITS: usize = 12;
/// Units of Go durations, longest first where one is a prefix of another (`ms` before `m`).
const DURATION_UNITS: [&str; 8] = ["ns", "us", "\u{00b5}s", "\u{03bc}s", "ms", "s", "m", "h"];

/// A Go duration of the form the CRD's rule accepts, `^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`
/// (also with U+03BC for µ), at most 100 characters and 12 integer digits per part; anything else
/// is `None`. Only such text reaches kube's parser, which panics on a negative part (`5m-3s`) and
/// on overflow (`99999999999999999999h`), and reads `-5m` as 5 minutes.
pub fn go_duration(text: &str) -> Option<Duration> {
    if text.is_empty() || text.len() > MAX_DURATION_TEXT {
        return None;
    }
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let mut rest = text;
    while !rest.is_empty() {
        let int = digits(rest);
        if int == 0 || int > MAX_DURATION_DIGITS {
            return None;
        }
        rest = &rest[int..];
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac = digits(after_dot);
            if frac == 0 {
                return None;
            }
            rest = &after_dot[frac..];
        }
        let unit = DURATION_UNITS.iter().find(|u| rest.starts_with(**u))?;
        rest = &rest[unit.len()..];
    }
    text.parse::<kube::core::Duration>()
        .ok()
        .map(Duration::from)
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

    /// Key of the service account's JSON key file.
    pub fn service_account_key(&self) -> &str {
        self.service_account_key
            .as_deref()
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT_KEY)
    }
}

impl ClientCertificateRef {
    /// The client assertion's signature algorithm.
    pub fn algorithm(&self) -> crate::oauth::assertion::AssertionAlgorithm {
        use crate::oauth::assertion::AssertionAlgorithm;
        match self.algorithm.unwrap_or_default() {
            AssertionAlgorithmName::RS256 => AssertionAlgorithm::RS256,
            AssertionAlgorithmName::PS256 => AssertionAlgorithm::PS256,
        }
    }
}

/// The operator's `--grant-deletion-policy`: set once at start-up, before any integration is read.
static DEFAULT_GRANT_DELETION_POLICY: std::sync::OnceLock<super::GrantDeletionPolicy> =
    std::sync::OnceLock::new();

/// Set the policy of integrations without `spec.grantDeletionPolicy` (once; later calls are
/// ignored). Without a call it is Delete.
pub fn set_default_grant_deletion_policy(policy: super::GrantDeletionPolicy) {
    let _ = DEFAULT_GRANT_DELETION_POLICY.set(policy);
}

impl MailIntegrationSpec {
    /// `spec.grantDeletionPolicy`, or the operator's default. An integration that revokes its grant
    /// on deletion (`spec.revokeOnDelete`) does not keep it, whatever the default.
    pub fn grant_deletion_policy(&self) -> super::GrantDeletionPolicy {
        match (self.grant_deletion_policy, self.revoke_on_delete) {
            (Some(p), _) => p,
            (None, Some(true)) => super::GrantDeletionPolicy::Delete,
            (None, _) => DEFAULT_GRANT_DELETION_POLICY
                .get()
                .copied()
                .unwrap_or_default(),
        }
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
    fn durations_outside_the_crd_rule_give_the_default_instead_of_panicking() {
        // Found by tests/properties.rs: kube's parser panics on a negative part and on overflow,
        // and drops the sign of a negative duration.
        for bad in [
            "5m-3s",
            "99999999999999999999h",
            "1000000000000h",
            "-5m",
            "-1ns",
            "+5m",
            "0",
            "5",
            "1.h",
            ".5h",
            "5d",
            "1e3s",
            " 5m",
        ] {
            let spec = spec_with_refresh_before(Some(bad));
            assert_eq!(spec.refresh_before(), DEFAULT_REFRESH_BEFORE, "{bad}");
            assert_eq!(go_duration(bad), None, "{bad}");
        }
        assert_eq!(go_duration(&"1h".repeat(51)), None);
        assert_eq!(
            go_duration(&"1h".repeat(50)),
            Some(Duration::from_secs(50 * 3600))
        );
        assert_eq!(
            go_duration("999999999999h"),
            Some(Duration::from_secs(999_999_999_999 * 3600))
        );
        assert_eq!(
            go_duration("1.5h2m3s4ms"),
            Some(Duration::from_millis(5_523_004))
        );
        assert_eq!(go_duration("7\u{03bc}s"), Some(Duration::from_micros(7)));
        assert_eq!(
            go_duration("7\u{00b5}s1ns"),
            Some(Duration::from_nanos(7_001))
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
