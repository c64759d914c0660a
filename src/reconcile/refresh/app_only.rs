//! Tokens that nobody signs in for: the client-credentials grant (client secret or certificate) and
//! a Google service account's JWT-bearer grant. No grant Secret, no refresh token to keep and so no
//! write-ahead mark; a new token is simply asked for whenever one is due.

use super::{RefreshResult, failure_outcome, publish, template_refused};
use crate::{
    api::{GrantType, MailIntegration, MailIntegrationSpec},
    oauth::{Carrying, ClientCredentials, SigningKey},
    provider::{FailureClass, TokenOperation},
    reason::Reason,
    reconcile::{
        context::Context,
        decide::{Outcome, RefreshCause},
        observed::{Observed, PublishedToken},
    },
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::time::{Duration, Instant};
use tracing::info;

pub(super) async fn app_only(
    mi: &MailIntegration,
    o: &Observed<'_>,
    cause: RefreshCause,
    token_secret: Option<&Secret>,
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> RefreshResult {
    let Ok(creds) = &o.client else {
        // decide() refreshes only with client credentials.
        return Outcome::Requeue(Duration::from_secs(5)).into();
    };
    let permit = match ctx.provider_permit(mi) {
        Ok(p) => p,
        Err(deferred) => return deferred.into(),
    };
    info!(?cause, grant_type = ?mi.spec.grant_type(), "requesting an app-only access token");
    let endpoints = match ctx.providers.resolve(&mi.spec).await {
        Ok(e) => e,
        Err(class) => return failure_outcome(mi, class, o.now, ctx).into(),
    };
    if let Some(outcome) = template_refused(mi, token_secret, ctx).await {
        return outcome.into();
    }
    if ctx.fence.check().is_err() {
        return Outcome::Requeue(Duration::from_secs(5)).into();
    }
    let op = match mi.spec.grant_type() {
        GrantType::ServiceAccount => TokenOperation::JwtBearer,
        _ => TokenOperation::ClientCredentials,
    };
    let bound = match ctx
        .providers
        .bind(op, &endpoints.token, &endpoints, creds, Carrying::Client)
    {
        Ok(b) => b,
        Err(refusal) => {
            tracing::warn!(reason = refusal.reason.as_str(), message = %refusal.message, "the client credential may not go there; not sending it");
            return failure_outcome(
                mi,
                FailureClass::Permanent {
                    reason: refusal.reason,
                    message: refusal.message,
                },
                o.now,
                ctx,
            )
            .into();
        }
    };
    let started = Instant::now();
    let scopes = crate::provider::requested_scopes(&mi.spec);
    ctx.note_call(&mi.uid().unwrap_or_default(), o.now);
    let result = match op {
        TokenOperation::JwtBearer => {
            let mailbox = mi.spec.mailbox.address.trim();
            ctx.oauth.jwt_bearer(&bound, mailbox, &scopes, o.now).await
        }
        _ => ctx.oauth.client_credentials(&bound, &scopes, o.now).await,
    };
    drop(permit);
    ctx.metrics
        .refresh_duration
        .observe(started.elapsed().as_secs_f64());
    let token = match result {
        Ok(t) => t,
        Err(e) => {
            let class = explain(&mi.spec, creds, &scopes, e.class);
            return failure_outcome(mi, class, o.now, ctx).into();
        }
    };
    // Nobody signs in: the account is the mailbox the app was given access to.
    let fallback = (Some(mi.spec.mailbox.address.clone()), scopes);
    let outcome = publish(
        mi,
        &token,
        fallback,
        (token_secret, None),
        secrets_api,
        o.now,
        ctx,
    )
    .await;
    let published = matches!(outcome, Outcome::Refreshed { .. }).then(|| PublishedToken {
        access_token: token.access_token.clone(),
        expires_at: token.expires_at,
    });
    RefreshResult {
        outcome,
        published,
        grant_version: None,
    }
}

/// Add what the provider's answer cannot know to a setup failure's message: the client ID and
/// scope that domain-wide delegation must list, the certificate thumbprint that was sent.
pub fn explain(
    spec: &MailIntegrationSpec,
    creds: &ClientCredentials,
    scopes: &[String],
    class: FailureClass,
) -> FailureClass {
    let FailureClass::Permanent { reason, message } = class else {
        return class;
    };
    let scopes = scopes.join(",");
    let extra = match (reason, creds.signing_key.as_deref()) {
        (Reason::DomainWideDelegationMissing, Some(SigningKey::ServiceAccount(sa))) => {
            format!(" Client ID: {}; OAuth scopes: {scopes}.", sa.client_id)
        }
        (Reason::DelegatedUserUnknown, Some(SigningKey::ServiceAccount(sa))) => format!(
            " Mailbox asked for: {}; service account: {}.",
            spec.mailbox.address.trim(),
            sa.client_email
        ),
        (Reason::ServiceAccountKeyRejected, Some(SigningKey::ServiceAccount(sa))) => {
            format!(" Service account: {}.", sa.client_email)
        }
        (Reason::ClientCertificateRejected, Some(SigningKey::Certificate(c))) => format!(
            " Thumbprint sent: {} (client ID {}).",
            c.thumbprint_hex(),
            creds.client_id
        ),
        (Reason::AdminConsentRequired, _) => format!(" Client ID: {}.", creds.client_id),
        _ => String::new(),
    };
    FailureClass::Permanent {
        reason,
        message: format!("{message}{extra}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretValue;

    #[test]
    fn a_failure_without_a_key_keeps_its_message() {
        let spec: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
            "provider": "Microsoft",
            "mailbox": {"address": "helpdesk@contoso.example"},
            "oauth": {"clientSecretRef": {"name": "c"}, "tenant": "contoso.example", "grantType": "ClientCredentials"},
            "tokenSecret": {"name": "t"},
        }))
        .unwrap();
        let creds = ClientCredentials {
            client_id: "app-1".into(),
            client_secret: SecretValue::new("s"),
            signing_key: None,

            owner: Default::default(),
        };
        let class = FailureClass::Permanent {
            reason: Reason::AdminConsentRequired,
            message: "no consent.".into(),
        };
        let explained = explain(&spec, &creds, &[], class);
        assert_eq!(explained.message(), "no consent. Client ID: app-1.");
        let other = FailureClass::Permanent {
            reason: Reason::InvalidClient,
            message: "wrong secret.".into(),
        };
        assert_eq!(
            explain(&spec, &creds, &[], other).message(),
            "wrong secret."
        );
    }
}
