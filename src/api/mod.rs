//! The `MailIntegration` resource: its Rust types, the CEL rules the API server enforces, and the
//! defaults the operator applies in code (never in the CRD, so a GitOps tool sees no drift).

mod defaults;
pub mod gateway;
pub mod status;

pub use defaults::*;
pub use gateway::*;
pub use status::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// API group of every resource and annotation the operator owns.
pub const GROUP: &str = "mailintegration.dev";

/// Annotation whose every new value forces one refresh now (like `cmctl renew`).
pub const REFRESH_REQUESTED_ANNOTATION: &str = "mailintegration.dev/refresh-requested-at";

/// Label put on the Secrets the operator owns; the operator caches only Secrets carrying it.
pub const MANAGED_BY_LABEL: &str = "mailintegration.dev/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "mail-integration-operator";
/// Label naming the MailIntegration a Secret belongs to. The operator puts it on the Secrets it
/// owns; an admin who brings a refresh token by hand puts it on that grant Secret, which says the
/// Secret is meant for that integration.
pub const INTEGRATION_LABEL: &str = "mailintegration.dev/integration";
/// Label (value `"true"`) that marks a user's Secret as readable by the operator: an OAuth client
/// Secret, or a CA bundle for the mail servers. Other Secrets are never read, whatever a
/// MailIntegration names: whoever may create a MailIntegration may not be allowed to read Secrets.
pub const OAUTH_CLIENT_LABEL: &str = "mailintegration.dev/oauth-client";
/// Annotation on the client Secret with the client secret's expiry date (`2027-01-15` or an
/// RFC 3339 time), as the provider's console shows it: a warning condition, a metric and an alert
/// come 30 days ahead.
pub const CLIENT_SECRET_EXPIRES_ANNOTATION: &str = "mailintegration.dev/client-secret-expires";
/// The annotation `kubectl apply` keeps a full copy of the object in: never read by the operator,
/// and left out of its watch caches.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Suffix of the grant Secret's name (`<integration>-oauth-grant`).
pub const GRANT_SECRET_SUFFIX: &str = "-oauth-grant";

/// A mailbox connected through OAuth 2.0: the operator signs in once, keeps the access token fresh in
/// a Secret that mail workloads mount, and reports on the connection.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailintegration.dev",
    version = "v1alpha1",
    kind = "MailIntegration",
    namespaced,
    shortname = "mailint",
    category = "mail",
    status = "MailIntegrationStatus",
    doc = "A mailbox connected through OAuth 2.0: the operator keeps its access token fresh in a Secret.",
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Account", type_ = "string", json_path = ".status.account"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.accessTokenExpiresAt"),
    printcolumn(name = "Mailbox", type_ = "string", json_path = r#".status.conditions[?(@.type=="MailboxConnected")].reason"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.provider != 'OIDC' || has(self.spec.oauth.issuerURL) || (has(self.spec.oauth.endpoints) && has(self.spec.oauth.endpoints.authorization) && has(self.spec.oauth.endpoints.token))")
        .message("provider OIDC needs spec.oauth.issuerURL (the issuer to discover endpoints from), or both spec.oauth.endpoints.authorization and spec.oauth.endpoints.token"),
    validation = Rule::new("self.spec.provider != 'Microsoft' || has(self.spec.oauth.tenant)")
        .message("provider Microsoft needs spec.oauth.tenant: 'common', 'organizations', 'consumers', or your directory's tenant ID or domain"),
    validation = Rule::new("self.spec.provider == 'Microsoft' || !has(self.spec.oauth.tenant)")
        .message("spec.oauth.tenant is only used with provider Microsoft: remove it, or set provider: Microsoft"),
    // Checked at creation only (a name never changes): a MailIntegration stored before this rule
    // must stay deletable, and its finalizer removable (the operator reports NameTooLong on it).
    validation = Rule::new("oldSelf.hasValue() || size(self.metadata.name) <= 63").optional_old_self(true)
        .message("a MailIntegration's name may be at most 63 characters: the operator labels its Secrets with it (mailintegration.dev/integration), and a label value is at most 63 characters"),
    validation = Rule::new("!has(self.spec.grantDeletionPolicy) || self.spec.grantDeletionPolicy != 'Retain' || !has(self.spec.revokeOnDelete) || !self.spec.revokeOnDelete")
        .message("spec.grantDeletionPolicy Retain keeps the grant for a re-created integration, spec.revokeOnDelete revokes it: choose one"),
    validation = Rule::new("self.spec.tokenSecret.name != self.spec.oauth.clientSecretRef.name")
        .message("spec.tokenSecret.name must not be the client Secret: the operator writes the token Secret, and would overwrite the client's ID and secret"),
    validation = Rule::new("!self.spec.tokenSecret.name.endsWith('-oauth-grant')")
        .message("spec.tokenSecret.name must not end in -oauth-grant: that name is kept for grant Secrets, which hold refresh tokens that workloads must never mount"),
    validation = Rule::new("!self.spec.oauth.clientSecretRef.name.endsWith('-oauth-grant')")
        .message("spec.oauth.clientSecretRef.name must not name a grant Secret (-oauth-grant): name the Secret holding the OAuth client's ID and secret"),
    validation = Rule::new("!has(self.spec.mailbox.caSecretRef) || self.spec.mailbox.caSecretRef.name != self.spec.tokenSecret.name")
        .message("spec.mailbox.caSecretRef.name must not be the token Secret"),
    validation = Rule::new("!has(self.spec.oauth.signInAccount) || !has(self.spec.oauth.grantType) || self.spec.oauth.grantType == 'Interactive'")
        .message("spec.oauth.signInAccount is for interactive sign-in only: nobody signs in with grantType ClientCredentials or ServiceAccount, remove it"),
    validation = Rule::new("!has(self.spec.oauth.grantType) || self.spec.oauth.grantType != 'ClientCredentials' || self.spec.provider != 'Google'")
        .message("grantType ClientCredentials is not offered by Google: use Interactive (sign-in), or a Workspace service account with domain-wide delegation"),
    validation = Rule::new("!has(self.spec.oauth.grantType) || self.spec.oauth.grantType != 'ClientCredentials' || self.spec.provider != 'Microsoft' || !has(self.spec.oauth.tenant) || !(self.spec.oauth.tenant.lowerAscii() in ['common', 'organizations', 'consumers'])")
        .message("grantType ClientCredentials (app-only) needs a specific spec.oauth.tenant (your directory's tenant ID or domain), not common, organizations or consumers: app-only tokens are issued by one tenant"),
    validation = Rule::new("!has(self.spec.oauth.grantType) || self.spec.oauth.grantType != 'ServiceAccount' || self.spec.provider == 'Google'")
        .message("grantType ServiceAccount (domain-wide delegation with a service-account key) is for provider Google only; Microsoft app-only access is grantType ClientCredentials"),
    validation = Rule::new("!has(self.spec.oauth.clientCertificateRef) || !has(self.spec.oauth.grantType) || self.spec.oauth.grantType != 'ServiceAccount'")
        .message("spec.oauth.clientCertificateRef (certificate client authentication) is not used with grantType ServiceAccount: the service account's key file goes into the client Secret"),
    validation = Rule::new("!has(self.spec.oauth.clientSecretRef.serviceAccountKey) || (has(self.spec.oauth.grantType) && self.spec.oauth.grantType == 'ServiceAccount')")
        .message("spec.oauth.clientSecretRef.serviceAccountKey is for grantType ServiceAccount only"),
    validation = Rule::new("!has(self.spec.oauth.clientCertificateRef) || self.spec.oauth.clientCertificateRef.name != self.spec.tokenSecret.name")
        .message("spec.oauth.clientCertificateRef.name must not be the token Secret"),
    validation = Rule::new("!has(self.spec.oauth.clientCertificateRef) || !self.spec.oauth.clientCertificateRef.name.endsWith('-oauth-grant')")
        .message("spec.oauth.clientCertificateRef.name must not name a grant Secret (-oauth-grant): name the kubernetes.io/tls Secret holding the client's certificate and key"),
    validation = Rule::new("!has(self.spec.gateway) || !self.spec.tokenSecret.name.startsWith(self.metadata.name + '-gateway')")
        .message("with spec.gateway, spec.tokenSecret.name must not start with <name>-gateway: those names are kept for the gateway's Secrets"),
)]
#[serde(rename_all = "camelCase")]
pub struct MailIntegrationSpec {
    /// Which OAuth provider issues the tokens: Google, Microsoft or any OIDC provider.
    pub provider: ProviderKind,
    /// The mailbox that must sign in and that workloads connect to.
    pub mailbox: Mailbox,
    /// The OAuth client and how to sign in.
    pub oauth: OAuthSpec,
    /// The Secret the operator writes the current access token into, for mail workloads to mount.
    pub token_secret: TokenSecretRef,
    /// Refresh at least this long before the access token expires (Go duration, 1m to 50m; default
    /// 10m). When many tokens come due together, some are refreshed up to a fifth of their lifetime
    /// earlier, so that the refreshes spread out; status.nextRefreshTime says when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') && duration(self) >= duration('1m') && duration(self) <= duration('50m')")
        .message("refreshBefore must be a duration between 1m and 50m, such as 10m or 15m30s"))]
    pub refresh_before: Option<String>,
    /// Stop refreshing tokens and checking the mailbox while true. The token Secret stays as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Revoke the grant at the provider (RFC 7009) when this resource is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_on_delete: Option<bool>,
    /// Apps that may use this mailbox through the mail gateway with a password of their own
    /// (IMAP, POP3, SMTP; docs/gateway.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
    /// What deleting this resource does to its grant Secret: Delete or Retain (see
    /// [`GrantDeletionPolicy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_deletion_policy: Option<GrantDeletionPolicy>,
}

/// What deleting this resource does to its grant Secret (`<name>-oauth-grant`, the refresh token).
/// Delete: the grant Secret carries this resource's ownerReference and goes with it. Retain: it
/// carries none and stays; a MailIntegration of the same name in this namespace uses it again
/// without a sign-in, but only for the same token endpoint, client and mailbox (else
/// GrantBoundElsewhere). Default: the operator's --grant-deletion-policy (Delete unless set). The
/// token Secret always goes with the resource. Retain cannot be combined with revokeOnDelete.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GrantDeletionPolicy {
    /// The grant Secret is owned by the MailIntegration and deleted with it.
    #[default]
    Delete,
    /// The grant Secret is not owned by the MailIntegration and stays after it.
    Retain,
}

/// The OAuth provider.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    Google,
    Microsoft,
    #[serde(rename = "OIDC")]
    Oidc,
}

/// The mailbox address and the servers that accept its tokens.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Mailbox {
    /// The account that must sign in, e.g. support@example.com.
    #[schemars(length(max = 320))]
    #[x_kube(validation = Rule::new("self.matches('^[^@\\\\s]+@[^@\\\\s]+$')")
        .message("mailbox.address must be an email address such as support@example.com"))]
    pub address: String,
    /// The protocol workloads read mail with (default IMAP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<MailProtocol>,
    /// The IMAP or POP3 server (default: the provider's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<MailServer>,
    /// The SMTP submission server, when workloads also send mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<MailServer>,
    /// How the connection check authenticates: XOAUTH2 (default) or OAUTHBEARER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<SaslMechanismName>,
    /// Check the mailbox at least this often (Go duration, 1m to 24h; default 15m), and at once for a
    /// new grant, a spec change, a refresh asked for by annotation or a new token after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') && duration(self) >= duration('1m') && duration(self) <= duration('24h')")
        .message("checkInterval must be a duration between 1m and 24h, such as 15m"))]
    pub check_interval: Option<String>,
    /// Extra CA certificates (PEM) the mail servers' certificates may chain to, from a Secret in the
    /// same namespace; the system's public roots are always trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

/// The SASL mechanism of the mailbox check.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SaslMechanismName {
    #[default]
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

/// A CA bundle in a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of the Secret in the MailIntegration's namespace.
    #[x_kube(validation = Rule::new("self != ''").message("caSecretRef.name must name a Secret in the same namespace"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key holding the PEM certificates (default ca.crt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// How workloads read mail.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MailProtocol {
    #[default]
    #[serde(rename = "IMAP")]
    Imap,
    #[serde(rename = "POP3")]
    Pop3,
}

/// A mail server endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tls) || self.tls != 'None' || self.host in ['localhost', '127.0.0.1', '::1']")
    .message("tls: None (no encryption) is allowed only for localhost, 127.0.0.1 or ::1; use Implicit or StartTLS"))]
pub struct MailServer {
    /// Host name of the server.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port, 1 to 65535.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: i32,
    /// TLS mode (default Implicit): Implicit (993/995/465), StartTLS (143/110/587), or None (loopback only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
}

/// Transport security towards a mail server.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Implicit,
    #[serde(rename = "StartTLS")]
    StartTls,
    None,
}

/// The OAuth client and sign-in settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OAuthSpec {
    /// The Secret (same namespace) holding the OAuth client ID and secret.
    pub client_secret_ref: ClientSecretRef,
    /// The callback registered at the provider as an authorized redirect URI (default: the operator's own).
    #[serde(
        rename = "redirectURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (url(self).getScheme() == 'https' || (url(self).getScheme() == 'http' && url(self).getHostname() in ['localhost', '127.0.0.1', '::1']))")
        .message("redirectURL must be an https:// URL (http:// is allowed only for localhost, 127.0.0.1 or [::1])"))]
    pub redirect_url: Option<String>,
    /// The sign-in page's default prompt: None, Consent or SelectAccount (default Consent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Prompt>,
    /// Scopes to request (default: the provider's mail scopes): at most 32, each 1 to 256
    /// characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub scopes: Vec<String>,
    /// Microsoft only: the tenant (common, organizations, consumers, or a tenant ID or domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub tenant: Option<String>,
    /// OIDC only: the issuer whose discovery document names the endpoints.
    #[serde(rename = "issuerURL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (url(self).getScheme() == 'https' || (url(self).getScheme() == 'http' && url(self).getHostname() in ['localhost', '127.0.0.1', '::1']))")
        .message("issuerURL must be an https:// URL (http:// is allowed only for localhost, 127.0.0.1 or [::1])"))]
    pub issuer_url: Option<String>,
    /// Override any of the provider's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// How tokens are obtained: Interactive (default: a person signs in once, the grant is
    /// refreshed), ClientCredentials (app-only: the client itself gets tokens, nobody signs in;
    /// Microsoft Exchange Online app-only access, or any OIDC provider offering that grant), or
    /// ServiceAccount (Google Workspace domain-wide delegation with a service-account key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<GrantType>,
    /// The account that signs in, when it is not the mailbox: for a shared or delegated mailbox,
    /// a person with FullAccess to `spec.mailbox.address` signs in as themselves, and the tokens
    /// open the mailbox (the XOAUTH2 user stays `spec.mailbox.address`). Default: the mailbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 320))]
    #[x_kube(validation = Rule::new("self.matches('^[^@\\\\s]+@[^@\\\\s]+$')")
        .message("oauth.signInAccount must be an email address such as alice@example.com"))]
    pub sign_in_account: Option<String>,
    /// Authenticate the client with a certificate instead of a client secret: a client assertion
    /// signed with the certificate's key (`private_key_jwt`), for the client-credentials grant and
    /// for sign-in and refresh alike; the client Secret then needs only the client ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_ref: Option<ClientCertificateRef>,
}

/// How the operator obtains tokens.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GrantType {
    /// A person signs in once (status.signIn.url); the refresh token is kept in the grant Secret.
    #[default]
    Interactive,
    /// The OAuth 2.0 client-credentials grant (RFC 6749 §4.4): app-only tokens from the client ID
    /// and its secret or certificate (spec.oauth.clientCertificateRef), no refresh token, no sign-in.
    ClientCredentials,
    /// Google Workspace domain-wide delegation: a service account's key (the JSON key file in the
    /// client Secret) signs a JWT-bearer assertion (RFC 7523) for the mailbox; no refresh token,
    /// no sign-in.
    ServiceAccount,
}

/// A certificate credential of the OAuth client (`private_key_jwt`, RFC 7523 client assertion).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateRef {
    /// A `kubernetes.io/tls` Secret in the same namespace (tls.crt: the certificate uploaded to the
    /// app; tls.key: its RSA private key), labelled mailintegration.dev/oauth-client=true.
    #[x_kube(validation = Rule::new("self != ''").message("clientCertificateRef.name must name a kubernetes.io/tls Secret in the same namespace"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// The assertion's signature algorithm: RS256 (default) or PS256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AssertionAlgorithmName>,
}

/// A client assertion's signature algorithm.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AssertionAlgorithmName {
    #[default]
    RS256,
    PS256,
}

/// The sign-in prompt (the seed's "No prompt", "Consent", "Select account").
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prompt {
    None,
    #[default]
    Consent,
    SelectAccount,
}

/// Where the client ID and secret are.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of the Secret in the MailIntegration's namespace.
    #[x_kube(validation = Rule::new("self != ''").message("clientSecretRef.name must name a Secret in the same namespace"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key of the client ID (default client_id). Another key is used only when the Secret declares
    /// it with the annotation mailintegration.dev/client-id-key (set by whoever may write it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_id_key: Option<String>,
    /// Key of the client secret (default client_secret). Another key is used only when the Secret
    /// declares it with the annotation mailintegration.dev/client-secret-key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_secret_key: Option<String>,
    /// grantType ServiceAccount: key of the service account's JSON key file (default
    /// service-account.json; another key only when the Secret declares it with the annotation
    /// mailintegration.dev/service-account-key); the client ID is read from the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_key: Option<String>,
}

/// Endpoint overrides.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self)").message("endpoints.authorization must be an absolute URL"))]
    pub authorization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self)").message("endpoints.token must be an absolute URL"))]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self)").message("endpoints.revocation must be an absolute URL"))]
    pub revocation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self)").message("endpoints.userinfo must be an absolute URL"))]
    pub userinfo: Option<String>,
}

/// The Secret that workloads mount.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenSecretRef {
    /// Name of the Secret the operator writes (same namespace).
    #[x_kube(validation = Rule::new("self != ''").message("tokenSecret.name must name the Secret to write the access token into"))]
    #[schemars(length(max = 253))]
    pub name: String,
    /// Extra labels, annotations and keys of the token Secret, rendered from the token on every
    /// refresh (like external-secrets' `target.template`), for workloads that expect their own key
    /// names or a config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TokenSecretTemplate>,
}

/// What the token Secret carries besides its standard keys. Each value of `data` is a MiniJinja
/// (Jinja2) template over `access_token`, `token_type`, `expiry` (RFC 3339), `username`, `xoauth2`,
/// `oauthbearer` (empty when no mail server is known) and `mail_server`/`mail_port`; e.g.
/// `password={{ access_token }}`. A key named like a standard key replaces it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TokenSecretTemplate {
    /// Labels added to the token Secret (at most 32; the operator's own labels cannot be replaced,
    /// and keys that ask a Secret-mirroring controller for a copy are refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('mailintegration.dev/') && k != 'app.kubernetes.io/managed-by')").message("template.labels may not set the operator's own labels (mailintegration.dev/*, app.kubernetes.io/managed-by)"))]
    #[x_kube(validation = Rule::new(MIRRORING_RULE).message(MIRRORING_MESSAGE))]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the token Secret (at most 32; keys that ask a Secret-mirroring
    /// controller for a copy are refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new(MIRRORING_RULE).message(MIRRORING_MESSAGE))]
    #[schemars(extend("maxProperties" = 32))]
    pub annotations: BTreeMap<String, String>,
    /// Keys added to the token Secret: key → template (at most 32).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[-._a-zA-Z0-9]+$') && size(k) <= 253)").message("template.data keys must be valid Secret keys (letters, digits, '-', '_', '.')"))]
    #[x_kube(validation = Rule::new("self.all(k, size(self[k]) <= 16384)").message("a template.data template may be at most 16 KiB"))]
    #[schemars(extend("maxProperties" = 32))]
    pub data: BTreeMap<String, String>,
}

/// The CEL rule refusing template labels and annotations that ask a Secret-mirroring controller
/// to copy the token Secret (the same prefixes as
/// `reconcile::template::keys::MIRRORING_PREFIXES`, which a unit test compares).
pub const MIRRORING_RULE: &str = "!self.exists(k, k.startsWith('reflector.v1.k8s.emberstack.com/') || k.startsWith('replicator.v1.mittwald.de/') || k.startsWith('kubed.appscode.com/') || k.startsWith('synator/') || k.startsWith('replizieren.dev/') || k.startsWith('replik8or.c0deltin.dev/') || k.startsWith('kube-syncer/') || k.startsWith('secretsync.ibm.com/'))";
const MIRRORING_MESSAGE: &str = "template labels and annotations may not ask a Secret-mirroring controller (Reflector, kubernetes-replicator, kubed/Config Syncer, ...) to copy the token Secret: it holds a live token";

/// The CustomResourceDefinition generated from these types.
pub fn crd() -> CustomResourceDefinition {
    MailIntegration::crd()
}

/// The CRD as the YAML checked in under `crds/`.
// The CRD is built from our own types (no outside data); `tests/crd.rs` runs this on every build.
#[allow(clippy::expect_used)]
pub fn crd_yaml() -> String {
    // A long line stays one line (no folded `>-` block), so a CEL rule reads as written;
    // multi-line descriptions stay literal blocks.
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    let body = serde_saphyr::to_string_with_options(&crd(), options).expect("the CRD serializes");
    format!(
        "# Generated by `mail-integration-operator crd` from src/api. Do not edit by hand.\n{body}"
    )
}
