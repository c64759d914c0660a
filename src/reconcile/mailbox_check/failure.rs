//! What a failed check says: the reason, the server's words and what to fix.

use super::MailboxState;
use crate::{
    api::{GrantType, MailIntegrationSpec, ProviderKind},
    mailbox::{CheckProtocol, CheckTarget, MailboxError},
};

pub(super) fn protocol_name(p: CheckProtocol) -> &'static str {
    match p {
        CheckProtocol::Imap => "IMAP",
        CheckProtocol::Pop3 => "POP3",
        CheckProtocol::Smtp => "SMTP",
    }
}

pub(super) fn failed(t: &CheckTarget, e: &MailboxError) -> MailboxState {
    if t.protocol == CheckProtocol::Smtp
        && matches!(e, MailboxError::AuthFailed { .. })
        && crate::mailbox::is_smtp_auth_disabled(e.detail())
    {
        // Not the token: Exchange Online has SMTP AUTH switched off for the mailbox or tenant.
        let reason = crate::reason::Reason::SmtpClientAuthenticationDisabled;
        return MailboxState::Failed {
            reason: reason.as_str().to_owned(),
            message: format!(
                "SMTP {}:{}: {}. {}",
                t.host,
                t.port,
                e.detail(),
                reason
                    .hint()
                    .replace("<mailbox>", &crate::reason::outside_text(&t.username, 254))
            ),
        };
    }
    let hint = match e.reason() {
        "MailboxAuthFailed" => {
            " The mail server refused the access token (it cannot say why: see Authorized for the grant). If the grant is fine, check the granted scopes and that the account may use this protocol (IMAP, POP or SMTP AUTH can be disabled per account)."
        }
        "MailboxUnreachable" => {
            " Check spec.mailbox host and port, and that the operator may reach the server."
        }
        "TLSError" => {
            " Check the server's certificate, or put the CA that signed it into spec.mailbox.caSecretRef."
        }
        _ => "",
    };
    MailboxState::Failed {
        reason: e.reason().to_owned(),
        message: format!(
            "{} {}:{}: {}.{hint}",
            protocol_name(t.protocol),
            t.host,
            t.port,
            e.detail()
        ),
    }
}

/// A mail server that refuses an app-only token the provider has just issued (the token is valid:
/// the token endpoint gave it out for this client) is not refusing the token but the app: for
/// Exchange Online, the app's service principal is not registered in Exchange, or has no
/// permission on the mailbox. Say which commands are likely missing.
pub fn explain_app_only(spec: &MailIntegrationSpec, state: MailboxState) -> MailboxState {
    let MailboxState::Failed { reason, message } = state else {
        return state;
    };
    use crate::reason::Reason;
    if reason != Reason::MailboxAuthFailed.as_str()
        || spec.grant_type() != GrantType::ClientCredentials
    {
        return MailboxState::Failed { reason, message };
    }
    // The mail server's own words come first; the generic hint about scopes does not apply.
    let said = message
        .split(". The mail server refused the access token")
        .next()
        .unwrap_or_default();
    let mailbox = spec.mailbox.address.trim();
    let secret = &spec.oauth.client_secret_ref.name;
    let fix = match spec.provider {
        ProviderKind::Microsoft => format!(
            "the app is likely not registered in Exchange Online or has no access to this mailbox. In Exchange Online PowerShell run New-ServicePrincipal -AppId <client ID in Secret {secret:?}> -ObjectId <object ID of the Enterprise Application> (Entra ID → Enterprise applications; not the App registration's object ID), then Add-MailboxPermission -Identity {mailbox} -User <the service principal's ID> -AccessRights FullAccess (or assign an RBAC for Applications role scoped to the mailbox). Changes can take up to an hour to apply."
        ),
        ProviderKind::Google | ProviderKind::Oidc => format!(
            "the mail server does not let this app open {mailbox}: give the app (client ID in Secret {secret:?}) access to the mailbox at the mail server."
        ),
    };
    MailboxState::Failed {
        reason: Reason::AppMailboxAccessMissing.as_str().to_owned(),
        message: format!(
            "{said}. The provider issued a valid app-only token, but the mail server refused it for {mailbox}: {fix}"
        ),
    }
}
