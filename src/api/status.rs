//! What the operator reports on a MailIntegration (kstatus-compatible: Ready + observedGeneration,
//! Reconciling while work is in flight, Stalled when only a human can fix it).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a MailIntegration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailIntegrationStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Authorized, TokenValid, MailboxConnected, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The account that signed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The scopes the provider granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// When the current access token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<Time>,
    /// When the access token was last refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// When the next refresh is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    /// Present only while a sign-in is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in: Option<SignInStatus>,
    /// The last failed sign-in, written by the sign-in server; while a sign-in is still needed the
    /// Authorized and Ready conditions report it. Cleared by a successful sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sign_in_failure: Option<SignInFailure>,
    /// The inputs (spec generation and Secret versions) of the last permanent failure: the operator
    /// does not call the provider again until one of them changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_inputs: Option<String>,
    /// The last value of the refresh-requested-at annotation that was acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_request: Option<String>,
    /// When the client secret expires, from the client Secret's annotation
    /// mailintegration.dev/client-secret-expires (condition ClientSecretExpiringSoon within 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_expires_at: Option<Time>,
    /// When the grant is expected to end, where the provider said so at sign-in (Google apps in
    /// Testing publishing status: 7 days after sign-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_expires_at: Option<Time>,
    /// When the mailbox was last checked (the result is the MailboxConnected condition). Written
    /// with the status's other changes, never on its own, so it can be behind by up to a token
    /// lifetime; after a restart, the operator checks again only once a check is due from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox_checked_at: Option<Time>,
    /// The mail gateway's use of this mailbox (spec.gateway): written by the gateway (apps) and by
    /// the operator's gateway credentials (rotationHandled), never by the main status write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<super::GatewayStatus>,
    /// The backoff after transient failures of the provider (a 429 and its Retry-After, 5xx,
    /// timeouts): no call of the token endpoint before `until`. Kept here so that a restarted
    /// operator, or the next leader, waits it out too; written only when it changes, removed by
    /// the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_backoff: Option<ProviderBackoff>,
}

/// See [`MailIntegrationStatus::provider_backoff`].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderBackoff {
    /// No call of the token endpoint before this time (the backoff, or the provider's
    /// Retry-After when longer; believed for at most an hour).
    pub until: Time,
    /// Failed attempts in a row: the backoff doubles with each (5 s up to 5 min).
    pub attempts: u32,
    /// The reason of the last failure, as in the conditions.
    pub reason: String,
}

/// Where to sign in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SignInStatus {
    /// The operator's sign-in page for this resource (carries a short-lived signed ticket).
    pub url: String,
    /// When the link stops working.
    pub expires_at: Time,
}

/// A failed sign-in, as the sign-in server recorded it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SignInFailure {
    /// The condition reason, e.g. AccountMismatch, ConsentRequired, SignInStateReused.
    pub reason: String,
    /// What happened and what to do.
    pub message: String,
    /// When it happened.
    pub time: Time,
    /// The resource's generation at the time: a failure of an older spec is not reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition types.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const AUTHORIZED: &str = "Authorized";
    pub const TOKEN_VALID: &str = "TokenValid";
    pub const MAILBOX_CONNECTED: &str = "MailboxConnected";
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
    /// A warning: the client secret expires within 30 days (never makes Ready False).
    pub const CLIENT_SECRET_EXPIRING_SOON: &str = "ClientSecretExpiringSoon";
    /// Whether every app of spec.gateway has its gateway credential (written by the gateway
    /// credentials under their own field manager, never by the main status write; never makes
    /// Ready False).
    pub const GATEWAY_CREDENTIALS: &str = "GatewayCredentials";
}
