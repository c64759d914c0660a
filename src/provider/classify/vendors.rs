//! What Google's and Microsoft's own error codes mean (Google's `error_subtype` and descriptions of
//! its JWT-bearer errors, Microsoft's AADSTS codes), before the RFC 6749 codes are looked at.

use super::{FailureClass, ProviderErrorBody, TokenOperation, permanent, transient, wait_phrase};
use crate::reason::Reason;
use std::time::Duration;

pub(super) const SIGN_IN_AGAIN: &str = "Sign in again at status.signIn.url.";

pub(super) fn google(operation: TokenOperation, b: &ProviderErrorBody) -> Option<FailureClass> {
    if operation == TokenOperation::JwtBearer {
        return google_jwt_bearer(b);
    }
    if b.error != "invalid_grant" {
        return None;
    }
    let said = format!(" (Google said: {})", b.hint());
    if b.error_subtype.as_deref() == Some("invalid_rapt") {
        // Documented: a Google Workspace session-control policy requires re-authentication.
        return Some(permanent(
            Reason::ReauthRequired,
            format!(
                "Google requires the account to re-authenticate: a Google Workspace session-control policy ended the grant (invalid_rapt). {SIGN_IN_AGAIN} A Workspace admin can exempt this app by marking it Trusted in the API controls.{said}"
            ),
        ));
    }
    let expired_or_revoked = b
        .error_description
        .as_deref()
        .is_some_and(|d| d.to_ascii_lowercase().contains("expired or revoked"));
    if operation == TokenOperation::Refresh && expired_or_revoked {
        return Some(permanent(
            Reason::GrantRevoked,
            format!(
                "Google says the grant has expired or been revoked. Possible causes: the app's OAuth consent screen is in \"Testing\" publishing status (Google ends such grants after 7 days: publish the app), the user or an admin removed the app's access, the password changed, the grant was unused for 6 months, or more than 100 newer grants exist for this account and client. {SIGN_IN_AGAIN}{said}"
            ),
        ));
    }
    None
}

pub(super) fn microsoft(
    operation: TokenOperation,
    b: &ProviderErrorBody,
    retry_after: Option<Duration>,
) -> Option<FailureClass> {
    let said = format!(" (Microsoft said: {})", b.hint());
    for code in b.aadsts_codes() {
        let class = match code {
            70008 | 700082 => permanent(
                Reason::GrantExpiredInactive,
                format!(
                    "Microsoft ended the grant because it was not used for too long (AADSTS{code}; refresh tokens lapse after 90 days without use). {SIGN_IN_AGAIN}{said}"
                ),
            ),
            700084 => permanent(
                Reason::GrantExpiredInactive,
                format!(
                    "Microsoft issued a refresh token for a single-page application, which lives only 24 hours (AADSTS700084). Register the redirect URI under the \"Web\" platform in Entra ID, not \"Single-page application\", then sign in again.{said}"
                ),
            ),
            50173 => permanent(
                Reason::GrantRevoked,
                format!(
                    "Microsoft says the grant was revoked (AADSTS50173), e.g. after a password change or an admin revoking sessions. {SIGN_IN_AGAIN}{said}"
                ),
            ),
            50076 | 50079 => permanent(
                Reason::ReauthRequired,
                format!(
                    "Microsoft requires multi-factor authentication for this account (AADSTS{code}). {SIGN_IN_AGAIN}{said}"
                ),
            ),
            53003 => permanent(
                Reason::ProviderError,
                format!(
                    "a Microsoft Entra Conditional Access policy blocks this sign-in (AADSTS53003). A tenant admin must allow this app, location or device in Conditional Access; signing in again alone will not help.{said}"
                ),
            ),
            65001 if operation == TokenOperation::ClientCredentials => permanent(
                Reason::AdminConsentRequired,
                format!(
                    "the app's application permissions have no admin consent (AADSTS65001). A tenant admin grants it in Entra ID → App registrations → the app → API permissions → Grant admin consent (Office 365 Exchange Online: IMAP.AccessAsApp, POP.AccessAsApp, SMTP.SendAsApp).{said}"
                ),
            ),
            700027 => permanent(
                Reason::ClientCertificateRejected,
                format!(
                    "Microsoft refused the certificate's client assertion (AADSTS700027): the certificate is not uploaded to the app, or its key does not match. Upload tls.crt of spec.oauth.clientCertificateRef's Secret in Entra ID → App registrations → Certificates & secrets → Certificates.{said}"
                ),
            ),
            65001 => permanent(
                Reason::ScopeMissing,
                format!(
                    "consent for the requested permissions is missing (AADSTS65001). Sign in again with prompt Consent, or have a tenant admin grant admin consent to the app for the mail permissions.{said}"
                ),
            ),
            7000215 => permanent(
                Reason::InvalidClient,
                format!(
                    "Microsoft rejected the client secret (AADSTS7000215). Put the secret's Value (not its Secret ID) from Entra ID → App registrations → Certificates & secrets into the client Secret.{said}"
                ),
            ),
            7000222 => permanent(
                Reason::ClientSecretExpired,
                format!(
                    "the client secret has expired (AADSTS7000222). Create a new one in Entra ID → App registrations → Certificates & secrets and update the client Secret.{said}"
                ),
            ),
            700016 => permanent(
                Reason::InvalidClient,
                format!(
                    "Microsoft does not know this client ID in the tenant (AADSTS700016). Check client_id and spec.oauth.tenant.{said}"
                ),
            ),
            90002 => permanent(
                Reason::InvalidEndpoint,
                format!(
                    "Microsoft does not know the tenant in spec.oauth.tenant (AADSTS90002). Use common, organizations, consumers, or your directory's tenant ID or domain.{said}"
                ),
            ),
            50196 | 90055 => transient(
                Reason::RateLimited,
                format!(
                    "Microsoft is throttling requests (AADSTS{code}) while {}; {}, keeping the current access token.{said}",
                    operation.describe(),
                    wait_phrase(retry_after)
                ),
                retry_after,
            ),
            _ => continue,
        };
        return Some(class);
    }
    None
}

/// Google's answers to a service account's JWT-bearer request (domain-wide delegation). The
/// client ID and scope of the delegation are added to the message by the caller, which knows them.
fn google_jwt_bearer(b: &ProviderErrorBody) -> Option<FailureClass> {
    let said = format!(" (Google said: {})", b.hint());
    let description = b
        .error_description
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let class = match b.error.as_str() {
        "unauthorized_client" => permanent(
            Reason::DomainWideDelegationMissing,
            format!(
                "Google does not let the service account act for the mailbox: domain-wide delegation is not configured for its client ID and scope. A Workspace super admin adds them in the Admin console under Security > Access and data control > API controls > Domain-wide delegation (Add new).{said}"
            ),
        ),
        "invalid_grant" if description.contains("invalid email or user id") => permanent(
            Reason::DelegatedUserUnknown,
            format!(
                "Google does not know the mailbox as a user of the Workspace domain: check spec.mailbox.address (an existing user, not a group, alias or consumer Gmail address).{said}"
            ),
        ),
        "invalid_grant" if description.contains("signature") => permanent(
            Reason::ServiceAccountKeyRejected,
            format!(
                "Google refused the service account's signature: the key in the client Secret was deleted or disabled, or is not this service account's. Create a new JSON key for the service account and put it into the client Secret.{said}"
            ),
        ),
        "invalid_grant"
            if description.contains("token must be a short-lived token")
                || description.contains("iat") =>
        {
            permanent(
                Reason::ProviderError,
                format!(
                    "Google refused the assertion's times: the operator's clock is probably off by more than a few minutes (check NTP on the node).{said}"
                ),
            )
        }
        "invalid_grant" => permanent(
            Reason::ProviderError,
            format!(
                "Google refused the service account's assertion. Check that the client Secret holds this service account's current JSON key and that spec.mailbox.address is a user of the domain.{said}"
            ),
        ),
        "invalid_scope" => permanent(
            Reason::ScopeMissing,
            format!(
                "Google refused the requested scopes: domain-wide delegation grants exactly the scopes the Admin console lists. Leave spec.oauth.scopes empty (https://mail.google.com/) or list only delegated scopes.{said}"
            ),
        ),
        "invalid_client" => permanent(
            Reason::ServiceAccountKeyRejected,
            format!(
                "Google does not know the service account of the key in the client Secret (deleted, or the key file is from another project). Create a new key and put it into the client Secret.{said}"
            ),
        ),
        _ => return None,
    };
    Some(class)
}
