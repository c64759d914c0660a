//! The checks of what a sign-in brought back, before anything is stored: the issuer (RFC 9207), the
//! ID token (audience, expiry, tenant, verified address), who signed in, and what the token
//! endpoint granted; and the grant Secret's record of it. Pure: no I/O, each a [`Failure`] that
//! says what to fix.

use super::failure::{self, Failure};
use crate::api::{MailIntegration, ProviderKind};
use crate::oauth::TokenGrant;
use crate::provider::{self, ProviderEndpoints};
use crate::reason::Reason;
use crate::reconcile::observed::grant_keys;
use crate::secret::SecretValue;
use axum::http::StatusCode;
use jiff::Timestamp;

/// RFC 9207: when the provider names its issuer in the answer, it must be the configured one.
pub fn check_issuer(
    iss: Option<&str>,
    endpoints: &ProviderEndpoints,
    provider: &str,
) -> Result<(), Failure> {
    let (Some(got), Some(want)) = (iss, endpoints.issuer.as_deref()) else {
        return Ok(());
    };
    if got.trim_end_matches('/') == want.trim_end_matches('/') {
        return Ok(());
    }
    Err(Failure::new(
        Reason::IssuerMismatch,
        StatusCode::BAD_REQUEST,
        "The answer came from another provider",
        format!(
            "The answer names the issuer {}, but this integration signs in with {provider} ({want}); it was not used (OAuth mix-up defence).",
            failure::clean(got)
        ),
        "Check spec.provider, spec.oauth.issuerURL and spec.oauth.endpoints, then open the sign-in link again.",
    ))
}

/// The ID token must be for this client (`aud`), not expired (`exp`, 5 minutes of clock skew),
/// from the configured Microsoft directory when `spec.oauth.tenant` names one by its ID (`tid`),
/// and, at Google, say that the address is verified (`email_verified`). Without an ID token there
/// is nothing to check here (the account then comes from userinfo).
pub fn check_id_token(
    grant: &TokenGrant,
    endpoints: &ProviderEndpoints,
    client_id: &str,
    tenant: Option<&str>,
    now: Timestamp,
) -> Result<(), Failure> {
    let Some(Ok(claims)) = grant.id_token_claims() else {
        return Ok(());
    };
    let refuse = |reason: Reason, title: &str, what: String, todo: &str| {
        Err(Failure::new(
            reason,
            StatusCode::BAD_REQUEST,
            title,
            what,
            todo,
        ))
    };
    if !claims.aud.is_empty() && !claims.aud.iter().any(|a| a == client_id) {
        return refuse(
            Reason::IssuerMismatch,
            "The ID token is for another application",
            format!(
                "The ID token was issued to {}, not to this integration's OAuth client {client_id}; it was not used.",
                failure::clean(&claims.aud.join(", "))
            ),
            "Check the client ID in the client Secret and spec.oauth, then open the sign-in link again.",
        );
    }
    if let Some(exp) = claims.exp
        && exp.saturating_add(300) < now.as_second()
    {
        return refuse(
            Reason::AccountUnknown,
            "The ID token has expired",
            "The provider returned an ID token that had already expired; it was not used."
                .to_owned(),
            "Open the sign-in link again; if it repeats, check the clocks of the provider and the cluster.",
        );
    }
    if endpoints.kind == ProviderKind::Microsoft
        && let Some(want) = tenant.filter(|t| provider::is_tenant_id(t))
        && claims
            .tid
            .as_deref()
            .is_some_and(|got| !got.eq_ignore_ascii_case(want))
    {
        return refuse(
            Reason::AccountMismatch,
            "The account is from another directory",
            format!(
                "The signed-in account belongs to the directory {}, not to the tenant {want} of this integration.",
                failure::clean(claims.tid.as_deref().unwrap_or("-"))
            ),
            "Sign in with an account of the integration's tenant, or change spec.oauth.tenant.",
        );
    }
    if endpoints.kind == ProviderKind::Google && claims.email_verified != Some(true) {
        return refuse(
            Reason::AccountUnknown,
            "The account's address is not verified",
            "Google did not say that the signed-in account's address is verified (email_verified)."
                .to_owned(),
            "Sign in with the mailbox's own Google account.",
        );
    }
    Ok(())
}

/// Who signed in, from the ID token: `email` (or Microsoft's `preferred_username` when it is an
/// address). `Ok(None)`: the ID token does not say (ask userinfo).
pub fn account_from_id_token(
    grant: &TokenGrant,
    endpoints: &ProviderEndpoints,
    provider: &str,
) -> Result<Option<String>, Failure> {
    let Some(claims) = grant.id_token_claims() else {
        return Ok(None);
    };
    let claims = claims.map_err(|e| {
        Failure::new(
            Reason::AccountUnknown,
            StatusCode::BAD_GATEWAY,
            "The provider's answer could not be read",
            format!("{provider} returned an ID token that could not be read: {e}."),
            "Open the sign-in link again; if it repeats, check the provider's configuration.",
        )
    })?;
    if let (Some(got), Some(want)) = (claims.iss.as_deref(), endpoints.issuer.as_deref())
        && got.trim_end_matches('/') != want.trim_end_matches('/')
    {
        return Err(Failure::new(
            Reason::IssuerMismatch,
            StatusCode::BAD_REQUEST,
            "The ID token came from another issuer",
            format!(
                "The ID token was issued by {}, not by {want}.",
                failure::clean(got)
            ),
            "Check spec.provider, spec.oauth.issuerURL and spec.oauth.endpoints, then sign in again.",
        ));
    }
    if claims.email_verified == Some(false) {
        return Err(Failure::new(
            Reason::AccountUnknown,
            StatusCode::FORBIDDEN,
            "The account's address is not verified",
            format!(
                "{provider} says the address {} of the signed-in account is not verified.",
                failure::clean(claims.email.as_deref().unwrap_or("-"))
            ),
            "Verify the address at the provider, or sign in with the mailbox's own account.",
        ));
    }
    // Microsoft's `email` claim is whatever the account's mail attribute says (mutable, not
    // verified, set by the account's own directory): its user principal name is in a domain that
    // directory verified, so it comes first.
    let account = if endpoints.kind == ProviderKind::Microsoft {
        claims
            .preferred_username
            .filter(|u| u.contains('@'))
            .or(claims.email)
    } else {
        claims.email
    };
    Ok(account.map(|e| e.trim().to_owned()))
}

/// Microsoft's immutable identity of the signed-in account, `<tid>/<oid>`, when the ID token has
/// both.
pub fn account_id(grant: &TokenGrant, endpoints: &ProviderEndpoints) -> Option<String> {
    if endpoints.kind != ProviderKind::Microsoft {
        return None;
    }
    let claims = grant.id_token_claims()?.ok()?;
    let (tid, oid) = (claims.tid?, claims.oid?);
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    (ok(&tid) && ok(&oid))
        .then(|| format!("{}/{}", tid.to_ascii_lowercase(), oid.to_ascii_lowercase()))
}

/// A new sign-in must be of the account that the stored grant recorded (`account_id`), when both
/// are known: an address claim can be given to another account, the object ID cannot.
pub fn check_account_id(stored: Option<&str>, signed_in: Option<&str>) -> Result<(), Failure> {
    match (stored, signed_in) {
        (Some(stored), Some(now)) if stored != now => Err(Failure::new(
            Reason::AccountMismatch,
            StatusCode::FORBIDDEN,
            "Another account signed in",
            format!(
                "The mailbox was connected by the account {stored} (directory/object ID); this sign-in is of the account {}, even though it names the same address. Nothing was stored.",
                failure::clean(now)
            ),
            "Sign in with the mailbox's own account. If the account was really replaced, delete the grant Secret (<name>-oauth-grant) first.",
        )),
        _ => Ok(()),
    }
}

/// The grant Secret's keys besides the refresh token: the account, the granted scopes, where the
/// grant was issued (the refresher sends it nowhere else), when, and when the provider said it
/// ends (Google's `refresh_token_expires_in` for an app in Testing status: 7 days).
pub fn grant_record(
    account: &str,
    scopes: String,
    token_endpoint: &str,
    client_id: &str,
    now: Timestamp,
    ends: Option<Timestamp>,
) -> Vec<(&'static str, String)> {
    let rfc3339 = |t: Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut keys = vec![
        (grant_keys::ACCOUNT, account.to_owned()),
        (grant_keys::SCOPES, scopes),
        (grant_keys::TOKEN_ENDPOINT, token_endpoint.to_owned()),
        (grant_keys::CLIENT_ID, client_id.to_owned()),
        (grant_keys::ISSUED_AT, rfc3339(now)),
    ];
    if let Some(end) = ends {
        keys.push((grant_keys::REFRESH_TOKEN_EXPIRES_AT, rfc3339(end)));
    }
    keys
}

/// The checks of what the token endpoint granted: the signed-in account must be the mailbox, a
/// refresh token must be there, and the mailbox scopes must be granted.
pub fn check_grant<'g>(
    mi: &MailIntegration,
    grant: &'g TokenGrant,
    account: Option<&str>,
    prompt: Option<crate::api::Prompt>,
    provider: &str,
) -> Result<(&'g SecretValue, String), Failure> {
    // A shared mailbox's delegate signs in as themselves (spec.oauth.signInAccount).
    let want = mi.spec.sign_in_account();
    let Some(account) = account.map(str::trim).filter(|a| !a.is_empty()) else {
        return Err(Failure::new(
            Reason::AccountUnknown,
            StatusCode::BAD_GATEWAY,
            "The provider did not say who signed in",
            format!("{provider} returned neither an email claim in the ID token nor in userinfo."),
            Reason::AccountUnknown.hint(),
        ));
    };
    if !account.eq_ignore_ascii_case(want) {
        return Err(Failure::new(
            Reason::AccountMismatch,
            StatusCode::FORBIDDEN,
            "Another account signed in",
            format!(
                "{} signed in, but this integration is for the mailbox {want}. Nothing was stored.",
                failure::clean(account)
            ),
            format!(
                "Open the sign-in link again, choose \"Select account\", and sign in as {want} (or change spec.mailbox.address, or spec.oauth.signInAccount for a shared mailbox)."
            ),
        ));
    }
    let Some(rt) = grant.refresh_token.as_ref().filter(|t| !t.is_empty()) else {
        let todo = if prompt == Some(crate::api::Prompt::Consent) {
            format!(
                "Remove the app's access in the account's security settings at {provider}, then sign in again with \"Consent\"; for OIDC providers, allow the offline_access scope and the refresh_token grant for the client."
            )
        } else {
            "Open the sign-in link again and choose \"Consent\": providers such as Google return a refresh token only when the consent page is shown.".to_owned()
        };
        return Err(Failure::new(
            Reason::NoRefreshToken,
            StatusCode::BAD_GATEWAY,
            "No refresh token was returned",
            format!(
                "{provider} signed {account} in but returned no refresh token, so the operator could not keep the mailbox connected. Nothing was stored."
            ),
            todo,
        ));
    };
    let granted = grant.scopes.clone().unwrap_or_default();
    if grant.scopes.is_some() {
        let missing = provider::missing_scopes(&mi.spec, &granted);
        if !missing.is_empty() {
            return Err(Failure::new(
                Reason::ScopeMissing,
                StatusCode::FORBIDDEN,
                "A permission was not granted",
                format!(
                    "{provider} did not grant {}; the mailbox cannot be used without it. Nothing was stored.",
                    missing.join(", ")
                ),
                "Open the sign-in link again with \"Consent\" and keep every requested permission ticked.",
            ));
        }
    }
    Ok((rt, account.to_owned()))
}
