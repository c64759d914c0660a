//! The reasons users see on conditions, events and metrics: one enum, so that every part of the
//! operator speaks the same vocabulary and `kubectl describe` shows the same words everywhere.
//!
//! This file is the one source of each reason's text: what happened ([`Reason::what_happened`]) and
//! what to do ([`Reason::hint`]). `docs/reasons.md` is generated from it ([`markdown`]; a test fails
//! when the checked-in file differs), and `kubectl mailint explain REASON` prints the same text.

use std::fmt;

mod outside;
mod text;

pub use outside::{MAX_MESSAGE, MAX_QUOTED, clean, outside_text, quoted};

/// Where a reason belongs, for the docs' sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Everything works, or the operator is at work.
    Healthy,
    /// Only a human can fix it: configuration, grant or Secrets.
    NeedsHuman,
    /// A failed sign-in (status.lastSignInFailure, the sign-in page, a Warning event).
    SignIn,
    /// The operator retries by itself, keeping the current token.
    Transient,
    /// The mailbox connection check.
    Mailbox,
    /// Events of a deletion with spec.revokeOnDelete.
    Deletion,
    /// It works now, but will stop on a known date unless someone acts (warning conditions).
    Warning,
}

impl Category {
    pub const ALL: &'static [Category] = &[
        Category::Healthy,
        Category::NeedsHuman,
        Category::SignIn,
        Category::Transient,
        Category::Mailbox,
        Category::Deletion,
        Category::Warning,
    ];

    /// The docs' section title.
    pub const fn title(self) -> &'static str {
        match self {
            Category::Healthy => "Healthy and in progress",
            Category::NeedsHuman => "Needs a human: configuration, grant, Secrets",
            Category::SignIn => "Sign-in failures",
            Category::Transient => "Transient: the operator retries by itself",
            Category::Mailbox => "The mailbox check",
            Category::Deletion => "Deletion with spec.revokeOnDelete (events)",
            Category::Warning => "Warnings: works now, stops on a known date",
        }
    }
}

/// A condition or event reason (CamelCase, as Kubernetes conventions want).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The grant works: the account signed in and a token was obtained.
    Authorized,
    /// The access token was refreshed.
    TokenRefreshed,
    /// The access token is valid and not yet due for refresh.
    TokenValid,
    /// The mailbox accepted the access token.
    MailboxConnected,
    /// Refreshing is suspended by `spec.suspend`.
    Suspended,
    /// Everything works: the grant is authorized, the access token is valid and published, and the mailbox (when a mail server is known) accepts it.
    Ready,
    /// Every configured mail server accepted the access token (condition `MailboxConnected=True`).
    Connected,
    /// The operator is refreshing the access token, or retrying after a transient failure (condition `Reconciling=True`).
    Refreshing,
    /// No work is in flight (condition `Reconciling=False`).
    Idle,
    /// Nothing needs a human (condition `Stalled=False`).
    AsExpected,
    /// Someone signed in on the operator's sign-in page and the grant was stored (Normal event).
    SignedIn,
    /// A failure the operator was retrying is over (Normal event).
    Recovered,
    /// No grant yet: someone must sign in at `status.signIn.url`.
    SignInRequired,
    /// The client Secret named in `spec.oauth.clientSecretRef` does not exist.
    ClientSecretNotFound,
    /// The client Secret exists but lacks the client ID or secret key (or it is empty).
    ClientSecretKeyMissing,
    /// The provider rejected the client credentials (wrong or expired secret, deleted client).
    InvalidClient,
    /// The client is not allowed to use this grant (token of another client, grant type disabled).
    UnauthorizedClient,
    /// The grant was revoked (by the user, an admin, a password change) or otherwise became invalid. The same reason names the Normal event of a deletion with `spec.revokeOnDelete` that revoked the grant at the provider.
    GrantRevoked,
    /// The grant expired because it was not used for too long.
    GrantExpiredInactive,
    /// A Google app in "Testing" publishing status: its grants expire after 7 days.
    TestingAppGrantExpired,
    /// The provider requires the user to sign in again (Google `invalid_rapt`, MFA).
    ReauthRequired,
    /// Someone other than the account that must sign in (`spec.oauth.signInAccount`, else
    /// `spec.mailbox.address`) signed in.
    AccountMismatch,
    /// The provider did not grant a scope the mailbox needs.
    ScopeMissing,
    /// An endpoint URL (override or discovered) is unusable.
    InvalidEndpoint,
    /// The provider refused the request for a reason that none of the other reasons covers; the message holds the provider's error.
    ProviderError,
    /// The client Secret (or CA bundle Secret) is not marked for the operator, or is one the operator manages.
    ClientSecretNotMarked,
    /// `spec.tokenSecret.name` names a Secret that the operator did not create for this integration.
    TokenSecretConflict,
    /// The grant Secret `<name>-oauth-grant` exists but belongs to something else.
    GrantSecretConflict,
    /// A client Secret, certificate or CA bundle marked for the operator is larger than the operator keeps of a Secret (64 KiB of labels, annotations and data): nothing of it is used.
    ClientSecretTooLarge,
    /// The grant or token Secret (labelled `mailintegration.dev/integration`) is larger than the operator keeps of a Secret (64 KiB of labels, annotations and data): it is neither used nor written.
    SecretTooLarge,
    /// The stored grant was issued for another provider, token endpoint, client or account than the spec now names.
    GrantBoundElsewhere,
    /// `spec.oauth.endpoints` overrides a Google or Microsoft endpoint, which this operator does not allow.
    EndpointOverrideNotAllowed,
    /// The mail server named in `spec.mailbox` is not in the operator's allowed mail hosts.
    MailboxHostNotAllowed,
    /// The published access token has expired and no new one was obtained (condition `TokenValid=False`, and `Ready` while refreshing does not succeed): workloads using it fail to log in.
    TokenExpired,
    /// No access token has been published yet (condition `TokenValid=False`): no sign-in or refresh has succeeded since the integration was created.
    NoToken,
    /// The user (or an admin policy) refused the consent at the provider (`access_denied`).
    SignInDenied,
    /// Prompt "No prompt" was chosen but nobody is signed in at the provider (`login_required`).
    LoginRequired,
    /// Prompt "No prompt" was chosen but the account has not consented yet (`consent_required`).
    ConsentRequired,
    /// Prompt "No prompt" was chosen but the provider needs to show a page (`interaction_required`, `account_selection_required`).
    InteractionRequired,
    /// The sign-in worked but the provider returned no refresh token.
    NoRefreshToken,
    /// The provider does not accept the operator's callback URL (`redirect_uri_mismatch`).
    RedirectURIMismatch,
    /// The authorization response or ID token came from another issuer than the configured provider (OAuth mix-up defence, RFC 9207).
    IssuerMismatch,
    /// The provider sent the browser back without an authorization code or an error.
    AuthorizationCodeMissing,
    /// The provider did not say which account signed in (no email in the ID token or userinfo).
    AccountUnknown,
    /// The sign-in link (its ticket) has expired.
    SignInLinkExpired,
    /// The sign-in link was not made for this MailIntegration (damaged, or made for a deleted resource of the same name).
    SignInLinkInvalid,
    /// The sign-in took longer than the operator waits for the provider's answer.
    SignInStateExpired,
    /// The provider's answer was used already (page reloaded, or replayed).
    SignInStateReused,
    /// The provider's answer carried a state the operator did not issue or that was altered.
    SignInStateInvalid,
    /// The sign-in was finished in another browser (or with cookies blocked) than the one that started it.
    SignInBrowserMismatch,
    /// The sign-in failed for a reason that none of the other sign-in reasons covers; the message holds the provider's error.
    SignInFailed,
    /// The sign-in worked but the operator could not store the grant Secret.
    GrantWriteFailed,
    /// A refresh of a provider that rotates refresh tokens was cut off (process killed, lease lost)
    /// after it may have been answered, and the provider no longer accepts the stored refresh token.
    GrantLostInFlight,
    /// The provider issued a new refresh token that cannot be stored in the grant Secret: it is held
    /// only in memory while the write is retried.
    GrantNotStored,
    /// The grant Secret is immutable: a rotated refresh token could not be stored in it.
    GrantSecretImmutable,
    /// The namespace is being deleted: nothing can be stored in it any more.
    NamespaceTerminating,
    /// Another operator process marked the grant as being refreshed moments ago; this one waits.
    RefreshInFlightElsewhere,
    /// `spec.tokenSecret.template` does not render.
    TokenTemplateInvalid,
    /// The provider's access tokens live no longer than the operator's lowest refresh interval.
    TokenLifetimeTooShort,
    /// The MailIntegration's name is longer than a label value may be (63 characters).
    NameTooLong,
    /// The provider did not answer properly (5xx, timeout, connection error).
    ProviderUnavailable,
    /// The token endpoint answered with something that is not an OAuth answer (an HTML or
    /// non-JSON page, a 404, 405, 407 or 4xx without an OAuth error body): an ingress, proxy or
    /// firewall answered instead of the OAuth server. Retried with backoff.
    NotAnOAuthAnswer,
    /// The grant Secret changed under the write-ahead mark twice in a row (409 Conflict, re-read
    /// in between): nothing was sent to the provider; retried with backoff.
    GrantMarkConflict,
    /// The provider asked us to slow down (429, Google's 403 page under load, AADSTS50196/90055).
    RateLimited,
    /// The OIDC discovery document could not be fetched or is inconsistent.
    DiscoveryFailed,
    /// A new access token was obtained, but writing the token Secret failed; the operator retries with backoff.
    TokenSecretWriteFailed,
    /// The mail server rejected the access token.
    MailboxAuthFailed,
    /// The mail server could not be reached.
    MailboxUnreachable,
    /// The TLS handshake with the mail server failed (certificate, protocol).
    #[allow(clippy::upper_case_acronyms)]
    TLSError,
    /// The mail server answered in a way the check did not expect (not IMAP, POP3 or SMTP on that port, or an unexpected reply).
    ProtocolError,
    /// The integration was deleted with `spec.revokeOnDelete`, but the provider has no revocation endpoint, so the grant still lives there (Warning event).
    RevocationNotSupported,
    /// The integration was deleted with `spec.revokeOnDelete`, but revoking the grant failed for as long as `--revoke-timeout` allows; the resource was let go anyway (Warning event).
    RevocationFailed,
    /// The integration was deleted with `spec.revokeOnDelete`, but no grant was stored, so there was nothing to revoke (Normal event).
    NothingToRevoke,
    /// No admin consent for the app's application permissions (Microsoft AADSTS65001 on an app-only token request).
    AdminConsentRequired,
    /// The client secret has expired (Microsoft AADSTS7000222).
    ClientSecretExpired,
    /// The provider refused the certificate's client assertion (Microsoft AADSTS700027: the certificate is not uploaded to the app, or the assertion's signature does not verify).
    ClientCertificateRejected,
    /// The key in the client Secret or the certificate Secret cannot be used: not a PEM certificate and RSA private key, or not a service-account key file.
    ClientKeyInvalid,
    /// Google refused the service account's token request (`unauthorized_client`): domain-wide delegation is not configured for its client ID and the scope https://mail.google.com/.
    DomainWideDelegationMissing,
    /// Google does not know the mailbox the service account asked a token for (`invalid_grant` "Invalid email or User ID").
    DelegatedUserUnknown,
    /// The service account's key Secret does not allow tokens for this mailbox: its annotation mailintegration.dev/delegated-mailboxes does not list spec.mailbox.address. Nothing was asked of Google.
    DelegationNotAllowed,
    /// `spec.oauth.clientSecretRef` names a key that the client Secret does not declare (annotations mailintegration.dev/client-id-key, client-secret-key, service-account-key), or the client ID would be read from a key of secret material.
    ClientSecretKeyNotDeclared,
    /// A client credential or grant would be sent to a server that its owner did not name: the client Secret's annotation mailintegration.dev/oauth-servers (required for provider OIDC) does not list it. Nothing was sent.
    OAuthServerNotAllowed,
    /// Google refused the service account's signed assertion (`invalid_grant` "Invalid JWT Signature."): the key was deleted or disabled, or belongs to another service account.
    ServiceAccountKeyRejected,
    /// The mail server refused a valid app-only token: Exchange Online does not know the app's service principal, or it has no permission on the mailbox.
    AppMailboxAccessMissing,
    /// The client Secret's annotation mailintegration.dev/client-secret-expires says the client secret expires within 30 days (condition `ClientSecretExpiringSoon=True`, a warning: the integration still works).
    ClientSecretExpiringSoon,
    /// The client secret is not due to expire within 30 days, or no expiry date is annotated (condition `ClientSecretExpiringSoon=False`).
    ClientSecretNotExpiring,
    /// The client Secret's annotation mailintegration.dev/client-secret-expires is not a date (YYYY-MM-DD) or an RFC 3339 time, so no warning can be given (condition `ClientSecretExpiringSoon=Unknown`).
    ClientSecretExpiryInvalid,
    /// Microsoft refused SMTP AUTH for the mailbox (`535 5.7.139 ... SmtpClientAuthentication is disabled`): the SMTP mailbox check (condition `MailboxConnected`) and the gateway (`status.gateway.apps[].lastError`, Warning event) report it.
    SmtpClientAuthenticationDisabled,
    /// Every app of `spec.gateway` has its gateway credential: its Secret `<name>-gateway-<app>` and its verifier in the gateway Secret (condition `GatewayCredentials=True`).
    GatewayCredentialsIssued,
    /// A Secret named like a gateway Secret of this integration (`<name>-gateway` or `<name>-gateway-<app>`) exists and the operator did not create it for this integration: it is not written, and the app (or, for `<name>-gateway`, every app) has no gateway credential (condition `GatewayCredentials=False`).
    GatewaySecretConflict,
    /// The annotation `mailintegration.dev/rotate-gateway-credentials` is not `<RFC 3339 time>` or `<RFC 3339 time>/<app>` naming an app of `spec.gateway.apps`: nothing was rotated (condition `GatewayCredentials=False`).
    GatewayRotationInvalid,
}

impl Reason {
    /// Every reason, for tests, docs and metrics label pre-registration.
    pub const ALL: &'static [Reason] = &[
        Reason::Authorized,
        Reason::TokenRefreshed,
        Reason::TokenValid,
        Reason::MailboxConnected,
        Reason::Suspended,
        Reason::Ready,
        Reason::Connected,
        Reason::Refreshing,
        Reason::Idle,
        Reason::AsExpected,
        Reason::SignedIn,
        Reason::Recovered,
        Reason::SignInRequired,
        Reason::ClientSecretNotFound,
        Reason::ClientSecretKeyMissing,
        Reason::InvalidClient,
        Reason::UnauthorizedClient,
        Reason::GrantRevoked,
        Reason::GrantExpiredInactive,
        Reason::TestingAppGrantExpired,
        Reason::ReauthRequired,
        Reason::AccountMismatch,
        Reason::ScopeMissing,
        Reason::InvalidEndpoint,
        Reason::ProviderError,
        Reason::ClientSecretNotMarked,
        Reason::TokenSecretConflict,
        Reason::GrantSecretConflict,
        Reason::ClientSecretTooLarge,
        Reason::SecretTooLarge,
        Reason::GrantBoundElsewhere,
        Reason::EndpointOverrideNotAllowed,
        Reason::MailboxHostNotAllowed,
        Reason::TokenExpired,
        Reason::NoToken,
        Reason::SignInDenied,
        Reason::LoginRequired,
        Reason::ConsentRequired,
        Reason::InteractionRequired,
        Reason::NoRefreshToken,
        Reason::RedirectURIMismatch,
        Reason::IssuerMismatch,
        Reason::AuthorizationCodeMissing,
        Reason::AccountUnknown,
        Reason::SignInLinkExpired,
        Reason::SignInLinkInvalid,
        Reason::SignInStateExpired,
        Reason::SignInStateReused,
        Reason::SignInStateInvalid,
        Reason::SignInBrowserMismatch,
        Reason::SignInFailed,
        Reason::GrantWriteFailed,
        Reason::GrantLostInFlight,
        Reason::GrantNotStored,
        Reason::GrantSecretImmutable,
        Reason::NamespaceTerminating,
        Reason::RefreshInFlightElsewhere,
        Reason::TokenTemplateInvalid,
        Reason::TokenLifetimeTooShort,
        Reason::NameTooLong,
        Reason::ProviderUnavailable,
        Reason::NotAnOAuthAnswer,
        Reason::GrantMarkConflict,
        Reason::RateLimited,
        Reason::DiscoveryFailed,
        Reason::TokenSecretWriteFailed,
        Reason::MailboxAuthFailed,
        Reason::MailboxUnreachable,
        Reason::TLSError,
        Reason::ProtocolError,
        Reason::RevocationNotSupported,
        Reason::RevocationFailed,
        Reason::NothingToRevoke,
        Reason::AdminConsentRequired,
        Reason::ClientSecretExpired,
        Reason::ClientCertificateRejected,
        Reason::ClientKeyInvalid,
        Reason::DomainWideDelegationMissing,
        Reason::DelegatedUserUnknown,
        Reason::DelegationNotAllowed,
        Reason::ClientSecretKeyNotDeclared,
        Reason::OAuthServerNotAllowed,
        Reason::ServiceAccountKeyRejected,
        Reason::AppMailboxAccessMissing,
        Reason::ClientSecretExpiringSoon,
        Reason::ClientSecretNotExpiring,
        Reason::ClientSecretExpiryInvalid,
        Reason::SmtpClientAuthenticationDisabled,
        Reason::GatewayCredentialsIssued,
        Reason::GatewaySecretConflict,
        Reason::GatewayRotationInvalid,
    ];

    /// The CamelCase string written into conditions and events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Authorized => "Authorized",
            Reason::TokenRefreshed => "TokenRefreshed",
            Reason::TokenValid => "TokenValid",
            Reason::MailboxConnected => "MailboxConnected",
            Reason::Suspended => "Suspended",
            Reason::Ready => "Ready",
            Reason::Connected => "Connected",
            Reason::Refreshing => "Refreshing",
            Reason::Idle => "Idle",
            Reason::AsExpected => "AsExpected",
            Reason::SignedIn => "SignedIn",
            Reason::Recovered => "Recovered",
            Reason::SignInRequired => "SignInRequired",
            Reason::ClientSecretNotFound => "ClientSecretNotFound",
            Reason::ClientSecretKeyMissing => "ClientSecretKeyMissing",
            Reason::InvalidClient => "InvalidClient",
            Reason::UnauthorizedClient => "UnauthorizedClient",
            Reason::GrantRevoked => "GrantRevoked",
            Reason::GrantExpiredInactive => "GrantExpiredInactive",
            Reason::TestingAppGrantExpired => "TestingAppGrantExpired",
            Reason::ReauthRequired => "ReauthRequired",
            Reason::AccountMismatch => "AccountMismatch",
            Reason::ScopeMissing => "ScopeMissing",
            Reason::InvalidEndpoint => "InvalidEndpoint",
            Reason::ProviderError => "ProviderError",
            Reason::ClientSecretNotMarked => "ClientSecretNotMarked",
            Reason::TokenSecretConflict => "TokenSecretConflict",
            Reason::GrantSecretConflict => "GrantSecretConflict",
            Reason::ClientSecretTooLarge => "ClientSecretTooLarge",
            Reason::SecretTooLarge => "SecretTooLarge",
            Reason::GrantBoundElsewhere => "GrantBoundElsewhere",
            Reason::EndpointOverrideNotAllowed => "EndpointOverrideNotAllowed",
            Reason::MailboxHostNotAllowed => "MailboxHostNotAllowed",
            Reason::TokenExpired => "TokenExpired",
            Reason::NoToken => "NoToken",
            Reason::SignInDenied => "SignInDenied",
            Reason::LoginRequired => "LoginRequired",
            Reason::ConsentRequired => "ConsentRequired",
            Reason::InteractionRequired => "InteractionRequired",
            Reason::NoRefreshToken => "NoRefreshToken",
            Reason::RedirectURIMismatch => "RedirectURIMismatch",
            Reason::IssuerMismatch => "IssuerMismatch",
            Reason::AuthorizationCodeMissing => "AuthorizationCodeMissing",
            Reason::AccountUnknown => "AccountUnknown",
            Reason::SignInLinkExpired => "SignInLinkExpired",
            Reason::SignInLinkInvalid => "SignInLinkInvalid",
            Reason::SignInStateExpired => "SignInStateExpired",
            Reason::SignInStateReused => "SignInStateReused",
            Reason::SignInStateInvalid => "SignInStateInvalid",
            Reason::SignInBrowserMismatch => "SignInBrowserMismatch",
            Reason::SignInFailed => "SignInFailed",
            Reason::GrantWriteFailed => "GrantWriteFailed",
            Reason::GrantLostInFlight => "GrantLostInFlight",
            Reason::GrantNotStored => "GrantNotStored",
            Reason::GrantSecretImmutable => "GrantSecretImmutable",
            Reason::NamespaceTerminating => "NamespaceTerminating",
            Reason::RefreshInFlightElsewhere => "RefreshInFlightElsewhere",
            Reason::TokenTemplateInvalid => "TokenTemplateInvalid",
            Reason::TokenLifetimeTooShort => "TokenLifetimeTooShort",
            Reason::NameTooLong => "NameTooLong",
            Reason::ProviderUnavailable => "ProviderUnavailable",
            Reason::NotAnOAuthAnswer => "NotAnOAuthAnswer",
            Reason::GrantMarkConflict => "GrantMarkConflict",
            Reason::RateLimited => "RateLimited",
            Reason::DiscoveryFailed => "DiscoveryFailed",
            Reason::TokenSecretWriteFailed => "TokenSecretWriteFailed",
            Reason::MailboxAuthFailed => "MailboxAuthFailed",
            Reason::MailboxUnreachable => "MailboxUnreachable",
            Reason::TLSError => "TLSError",
            Reason::ProtocolError => "ProtocolError",
            Reason::RevocationNotSupported => "RevocationNotSupported",
            Reason::RevocationFailed => "RevocationFailed",
            Reason::NothingToRevoke => "NothingToRevoke",
            Reason::AdminConsentRequired => "AdminConsentRequired",
            Reason::ClientSecretExpired => "ClientSecretExpired",
            Reason::ClientCertificateRejected => "ClientCertificateRejected",
            Reason::ClientKeyInvalid => "ClientKeyInvalid",
            Reason::DomainWideDelegationMissing => "DomainWideDelegationMissing",
            Reason::DelegatedUserUnknown => "DelegatedUserUnknown",
            Reason::DelegationNotAllowed => "DelegationNotAllowed",
            Reason::ClientSecretKeyNotDeclared => "ClientSecretKeyNotDeclared",
            Reason::OAuthServerNotAllowed => "OAuthServerNotAllowed",
            Reason::ServiceAccountKeyRejected => "ServiceAccountKeyRejected",
            Reason::AppMailboxAccessMissing => "AppMailboxAccessMissing",
            Reason::ClientSecretExpiringSoon => "ClientSecretExpiringSoon",
            Reason::ClientSecretNotExpiring => "ClientSecretNotExpiring",
            Reason::ClientSecretExpiryInvalid => "ClientSecretExpiryInvalid",
            Reason::SmtpClientAuthenticationDisabled => "SmtpClientAuthenticationDisabled",
            Reason::GatewayCredentialsIssued => "GatewayCredentialsIssued",
            Reason::GatewaySecretConflict => "GatewaySecretConflict",
            Reason::GatewayRotationInvalid => "GatewayRotationInvalid",
        }
    }

    /// The reason named by `s` (as written in a condition or event), ignoring ASCII case.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// Where the reason belongs.
    pub const fn category(self) -> Category {
        match self {
            Reason::AdminConsentRequired => Category::NeedsHuman,
            Reason::ClientSecretExpired => Category::NeedsHuman,
            Reason::ClientCertificateRejected => Category::NeedsHuman,
            Reason::ClientKeyInvalid => Category::NeedsHuman,
            Reason::DomainWideDelegationMissing => Category::NeedsHuman,
            Reason::DelegatedUserUnknown => Category::NeedsHuman,
            Reason::DelegationNotAllowed => Category::NeedsHuman,
            Reason::ClientSecretKeyNotDeclared | Reason::OAuthServerNotAllowed => {
                Category::NeedsHuman
            }
            Reason::ServiceAccountKeyRejected => Category::NeedsHuman,
            Reason::AppMailboxAccessMissing => Category::Mailbox,
            Reason::SmtpClientAuthenticationDisabled => Category::Mailbox,
            Reason::GatewayCredentialsIssued => Category::Healthy,
            Reason::GatewaySecretConflict | Reason::GatewayRotationInvalid => Category::NeedsHuman,
            Reason::ClientSecretExpiringSoon => Category::Warning,
            Reason::ClientSecretNotExpiring => Category::Healthy,
            Reason::ClientSecretExpiryInvalid => Category::Warning,
            Reason::Authorized
            | Reason::TokenRefreshed
            | Reason::TokenValid
            | Reason::MailboxConnected
            | Reason::Suspended
            | Reason::Ready
            | Reason::Connected
            | Reason::Refreshing
            | Reason::Idle
            | Reason::AsExpected
            | Reason::SignedIn
            | Reason::Recovered => Category::Healthy,
            Reason::SignInRequired
            | Reason::ClientSecretNotFound
            | Reason::ClientSecretKeyMissing
            | Reason::InvalidClient
            | Reason::UnauthorizedClient
            | Reason::GrantRevoked
            | Reason::GrantExpiredInactive
            | Reason::TestingAppGrantExpired
            | Reason::ReauthRequired
            | Reason::AccountMismatch
            | Reason::ScopeMissing
            | Reason::InvalidEndpoint
            | Reason::ProviderError
            | Reason::ClientSecretNotMarked
            | Reason::TokenSecretConflict
            | Reason::GrantSecretConflict
            | Reason::ClientSecretTooLarge
            | Reason::SecretTooLarge
            | Reason::GrantBoundElsewhere
            | Reason::EndpointOverrideNotAllowed
            | Reason::MailboxHostNotAllowed
            | Reason::TokenExpired
            | Reason::NoToken
            | Reason::GrantLostInFlight
            | Reason::GrantSecretImmutable
            | Reason::NamespaceTerminating
            | Reason::TokenTemplateInvalid
            | Reason::TokenLifetimeTooShort
            | Reason::NameTooLong => Category::NeedsHuman,
            Reason::SignInDenied
            | Reason::LoginRequired
            | Reason::ConsentRequired
            | Reason::InteractionRequired
            | Reason::NoRefreshToken
            | Reason::RedirectURIMismatch
            | Reason::IssuerMismatch
            | Reason::AuthorizationCodeMissing
            | Reason::AccountUnknown
            | Reason::SignInLinkExpired
            | Reason::SignInLinkInvalid
            | Reason::SignInStateExpired
            | Reason::SignInStateReused
            | Reason::SignInStateInvalid
            | Reason::SignInBrowserMismatch
            | Reason::SignInFailed
            | Reason::GrantWriteFailed => Category::SignIn,
            Reason::ProviderUnavailable
            | Reason::NotAnOAuthAnswer
            | Reason::GrantMarkConflict
            | Reason::RateLimited
            | Reason::DiscoveryFailed
            | Reason::TokenSecretWriteFailed
            | Reason::GrantNotStored
            | Reason::RefreshInFlightElsewhere => Category::Transient,
            Reason::MailboxAuthFailed
            | Reason::MailboxUnreachable
            | Reason::TLSError
            | Reason::ProtocolError => Category::Mailbox,
            Reason::RevocationNotSupported | Reason::RevocationFailed | Reason::NothingToRevoke => {
                Category::Deletion
            }
        }
    }

    /// Whether this reason reports a healthy state.
    pub const fn is_success(self) -> bool {
        matches!(
            self,
            Reason::Authorized
                | Reason::TokenRefreshed
                | Reason::TokenValid
                | Reason::MailboxConnected
                | Reason::Ready
                | Reason::Connected
                | Reason::SignedIn
                | Reason::Recovered
        )
    }

    /// The anchor of this reason's section in docs/reasons.md (GitHub's heading slug).
    pub fn anchor(self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// docs/reasons.md: every reason with what happened and what to do, by category.
pub fn markdown() -> String {
    let mut out = String::from(
        "<!-- Generated from src/reason.rs (`MIO_UPDATE_DOCS=1 cargo test --test docs` rewrites it). Do not edit by hand. -->\n\
         # Reasons\n\n\
         Every reason the operator writes into a condition (`kubectl mailint status NAME`, \
         `kubectl describe mailint NAME`), an event or `status.lastSignInFailure`, with what happened \
         and what to do. `kubectl mailint explain REASON` prints the same text. The alerts' \
         `runbook_url` links point here.\n",
    );
    for c in Category::ALL {
        out.push_str(&format!("\n## {}\n", c.title()));
        for r in Reason::ALL.iter().filter(|r| r.category() == *c) {
            out.push_str(&format!(
                "\n### {r}\n\n**What happened:** {}\n\n**What to do:** {}\n",
                r.what_happened(),
                r.hint()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn strings_are_unique_camel_case_and_match_debug() {
        let mut seen = HashSet::new();
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(seen.insert(s), "duplicate reason string {s}");
            // Kubernetes condition reasons: ^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$, CamelCase.
            assert!(s.chars().next().unwrap().is_ascii_uppercase(), "{s}");
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
            assert_eq!(format!("{r:?}"), s, "Debug and as_str agree");
            assert_eq!(r.to_string(), s);
            assert!(!r.hint().is_empty());
            assert!(r.hint().ends_with('.'), "hint of {s} is a sentence");
            assert!(
                r.what_happened().ends_with('.'),
                "what happened of {s} is a sentence"
            );
            assert_eq!(Reason::parse(s), Some(*r));
            assert_eq!(Reason::parse(&s.to_lowercase()), Some(*r));
        }
        assert_eq!(seen.len(), Reason::ALL.len());
    }

    #[test]
    fn testing_hint_names_the_seven_day_limit() {
        let h = Reason::TestingAppGrantExpired.hint();
        assert!(h.contains("7 days") && h.contains("Testing") && h.contains("ublish"));
        assert_eq!(Reason::TLSError.as_str(), "TLSError");
        assert!(Reason::TokenRefreshed.is_success());
        assert!(!Reason::RateLimited.is_success());
    }

    /// Every reason string the decision, the mailbox check and the finalizer write has its text here.
    #[test]
    fn the_reasons_other_modules_write_are_documented_here() {
        use crate::reconcile::decide::reasons;
        for s in [
            reasons::READY,
            reasons::AUTHORIZED,
            reasons::TOKEN_VALID,
            reasons::TOKEN_EXPIRED,
            reasons::NO_TOKEN,
            reasons::SIGN_IN_REQUIRED,
            reasons::SUSPENDED,
            reasons::REFRESHING,
            reasons::IDLE,
            reasons::NOT_STALLED,
            "Connected",
            "ProtocolError",
            "TokenSecretWriteFailed",
            "SignedIn",
            "Recovered",
            "RevocationNotSupported",
            "RevocationFailed",
            "NothingToRevoke",
        ] {
            assert!(
                Reason::parse(s).is_some(),
                "{s} has no entry in src/reason.rs"
            );
        }
        assert!(Reason::parse("NoSuchReason").is_none());
    }

    #[test]
    fn markdown_has_a_section_with_both_texts_for_every_reason() {
        let md = markdown();
        for r in Reason::ALL {
            let heading = format!("\n### {r}\n");
            let at = md
                .find(&heading)
                .unwrap_or_else(|| panic!("no section for {r}"));
            let section = &md[at + heading.len()..];
            let section = &section[..section.find("\n#").unwrap_or(section.len())];
            assert!(section.contains("**What happened:** "), "{r}");
            assert!(section.contains("**What to do:** "), "{r}");
        }
    }
}
