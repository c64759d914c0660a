//! `spec.gateway` and `status.gateway`: which apps may use the mailbox through the mail gateway
//! with a password of their own (docs/gateway.md), and what the gateway reports of their use.
//!
//! The apps are listed on the MailIntegration itself rather than in a resource of their own: the
//! mailbox's owner decides which apps may use it, with the same RBAC, in the same namespace, and the
//! credentials are deleted with the integration.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The annotation whose every new value issues new gateway passwords: `<RFC 3339 time>` for every
/// app, `<RFC 3339 time>/<app>` for one (`kubectl mailint rotate-gateway`).
pub const ROTATE_GATEWAY_ANNOTATION: &str = "mailintegration.dev/rotate-gateway-credentials";

/// Default `spec.gateway.rotationGracePeriod`: a rotated-out password works this long.
pub const DEFAULT_ROTATION_GRACE_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);
/// Default `spec.gateway.maxMessageBytes` for Microsoft (Exchange Online's 35 MB).
pub const MICROSOFT_MAX_MESSAGE_BYTES: u64 = 36_700_160;
/// Default `spec.gateway.maxMessageBytes` for the other providers (Gmail's 25 MB).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 26_214_400;
/// The smallest and largest `spec.gateway.maxMessageBytes` the CRD accepts.
pub const MIN_MAX_MESSAGE_BYTES: u64 = 1024;
pub const MAX_MAX_MESSAGE_BYTES: u64 = 157_286_400;

/// The apps that may use the mailbox through the mail gateway, each with a credential of its own.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The apps (at most 32, names unique). For each, the operator writes the Secret
    /// `<integration>-gateway-<app>` with the gateway's host, ports, a username and a password.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub apps: Vec<GatewayApp>,
    /// How long a rotated-out password keeps working (Go duration, 0s to 720h; default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') && duration(self) <= duration('720h')")
        .message("rotationGracePeriod must be a duration of at most 720h (30 days), such as 24h or 90m"))]
    pub rotation_grace_period: Option<String>,
    /// The largest message the gateway accepts over SMTP, in bytes (1024 to 157286400; default the
    /// provider's limit: 36700160 for Microsoft, 26214400 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 157_286_400))]
    pub max_message_bytes: Option<u64>,
}

/// An app allowed to use the mailbox through the gateway.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApp {
    /// The app's name: a DNS label of at most 40 characters (its Secret is
    /// `<integration>-gateway-<name>`, its username `<namespace>/<integration>/<name>`).
    #[schemars(length(min = 1, max = 40))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("a gateway app's name must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit"))]
    pub name: String,
    /// The protocols the app may use: any of IMAP, POP3 and SMTP, at least one, each once.
    #[schemars(length(min = 1, max = 3))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub protocols: Vec<GatewayProtocol>,
    /// Addresses besides the mailbox the app may use as envelope sender and `From:` over SMTP (at
    /// most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 3, max = 320)))]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^[^@\\\\s]+@[^@\\\\s]+$'))")
        .message("sendAs must list email addresses such as alerts@example.com"))]
    pub send_as: Vec<String>,
}

/// A protocol an app may use through the gateway.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum GatewayProtocol {
    #[serde(rename = "IMAP")]
    Imap,
    #[serde(rename = "POP3")]
    Pop3,
    #[serde(rename = "SMTP")]
    Smtp,
}

// Its name and `Display` are in `crate::gateway::session` (as `Protocol`).

impl GatewaySpec {
    /// `rotationGracePeriod` or its default; an unparseable value (an object stored before the CEL
    /// rule) gives the default, a value over 30 days is cut to 30 days.
    pub fn rotation_grace_period(&self) -> Duration {
        const MAX: Duration = Duration::from_secs(30 * 24 * 60 * 60);
        self.rotation_grace_period
            .as_deref()
            .and_then(super::go_duration)
            .unwrap_or(DEFAULT_ROTATION_GRACE_PERIOD)
            .min(MAX)
    }

    /// `maxMessageBytes`, kept within the CRD's bounds, or the provider's default.
    pub fn max_message_bytes(&self, provider: super::ProviderKind) -> u64 {
        match self.max_message_bytes {
            Some(n) => n.clamp(MIN_MAX_MESSAGE_BYTES, MAX_MAX_MESSAGE_BYTES),
            None if provider == super::ProviderKind::Microsoft => MICROSOFT_MAX_MESSAGE_BYTES,
            None => DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// What the gateway and the operator report on the gateway's use of this mailbox.
///
/// Two writers, each with its own server-side-apply field manager: the operator's credentials part
/// writes `rotationHandled`; the gateway process (`mail-integration-gateway`) writes `apps`. The
/// operator's main status write never includes this field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// The last value of the rotate-gateway-credentials annotation that was acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_handled: Option<String>,
    /// The apps' use of the gateway, written by the gateway at most once an hour per app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub apps: Vec<GatewayAppStatus>,
}

/// One app's use of the gateway.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAppStatus {
    /// The app's name in spec.gateway.apps.
    pub name: String,
    /// When the app last logged in through the gateway (to the hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_time: Option<Time>,
    /// The last error the gateway met on the app's behalf that someone must act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<GatewayAppError>,
}

/// An error the gateway met for an app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAppError {
    /// A condition reason, e.g. SmtpClientAuthenticationDisabled.
    pub reason: String,
    /// What happened and what to do.
    pub message: String,
    /// When it happened.
    pub time: Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ProviderKind;

    #[test]
    fn the_defaults_and_bounds_hold_whatever_the_stored_values() {
        let spec = |grace: Option<&str>, bytes: Option<u64>| GatewaySpec {
            rotation_grace_period: grace.map(str::to_owned),
            max_message_bytes: bytes,
            ..Default::default()
        };
        assert_eq!(
            spec(None, None).rotation_grace_period(),
            DEFAULT_ROTATION_GRACE_PERIOD
        );
        assert_eq!(
            spec(Some("90m"), None).rotation_grace_period(),
            Duration::from_secs(90 * 60)
        );
        assert_eq!(
            spec(Some("0s"), None).rotation_grace_period(),
            Duration::ZERO
        );
        assert_eq!(
            spec(Some("1d"), None).rotation_grace_period(),
            DEFAULT_ROTATION_GRACE_PERIOD
        );
        assert_eq!(
            spec(Some("99999h"), None).rotation_grace_period(),
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(
            spec(None, None).max_message_bytes(ProviderKind::Microsoft),
            36_700_160
        );
        assert_eq!(
            spec(None, None).max_message_bytes(ProviderKind::Google),
            26_214_400
        );
        assert_eq!(
            spec(None, Some(5)).max_message_bytes(ProviderKind::Oidc),
            1024
        );
        assert_eq!(
            spec(None, Some(u64::MAX)).max_message_bytes(ProviderKind::Oidc),
            MAX_MAX_MESSAGE_BYTES
        );
    }
}
