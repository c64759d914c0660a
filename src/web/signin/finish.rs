//! The sign-in callback after the provider issued a grant: check it, store it, report it.
//!
//! This part runs in a task of its own, outside the request's cancellation: once the code has
//! been exchanged, the provider holds a grant whose refresh token exists only here. The request
//! timeout (or a browser that goes away) must not drop it between the exchange and the grant
//! Secret's write. The page answers with the result when it comes within the request's time, and
//! otherwise says the grant is still being stored and where to see the outcome.

use super::{Failure, Report, Subject};
use super::{
    SignIn, account_from_id_token, account_id, api_unavailable, check_account_id, check_grant,
    check_id_token, grant_record, html, page, provider_failure,
};
use crate::api::{MailIntegration, Prompt};
use crate::oauth::TokenGrant;
use crate::provider::ProviderEndpoints;
use crate::reason::Reason;
use crate::reconcile::observed::{self, grant_keys};
use axum::{http::StatusCode, response::Response};
use jiff::Timestamp;
use kube::ResourceExt;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// What the callback holds once the code was exchanged.
pub(super) struct Exchanged {
    pub mi: MailIntegration,
    pub prompt: Option<Prompt>,
    pub endpoints: ProviderEndpoints,
    pub provider: String,
    pub client_id: String,
    pub grant: TokenGrant,
    pub subject: Option<Subject>,
    pub now: Timestamp,
}

/// Finish the sign-in in a task of its own and answer with its page, or, when it is not done
/// shortly before the request's time (`started` + the request timeout) runs out, with a page
/// saying the grant is still being stored: the task goes on either way.
pub(super) async fn answer(s: &SignIn, started: Instant, x: Exchanged) -> Response {
    let ns = x.mi.namespace().unwrap_or_default();
    let name = x.mi.name_any();
    let grant_secret = x.mi.grant_secret_name();
    let task = tokio::spawn(finish(s.clone(), x));
    let timeout = s.inner.config.request_timeout;
    // The answer must leave before the server's request timeout cuts the connection.
    let wait = timeout
        .saturating_sub(started.elapsed())
        .saturating_sub(timeout.checked_div(10).unwrap_or_default());
    match tokio::time::timeout(wait, task).await {
        Ok(Ok(page)) => page,
        Ok(Err(_)) => {
            // A panic (not its message: it may quote anything the task held).
            error!(integration = %format!("{ns}/{name}"), "finishing a sign-in ended abnormally");
            let f = Failure::new(
                Reason::GrantWriteFailed,
                StatusCode::INTERNAL_SERVER_ERROR,
                "The sign-in could not be finished",
                format!(
                    "The provider signed the account in, but the operator stopped before it reported whether the Secret {grant_secret:?} was written."
                ),
                Reason::GrantWriteFailed.hint(),
            );
            html(f.status, page::failure_page(&f), &[])
        }
        Err(_) => {
            info!(integration = %format!("{ns}/{name}"), "the sign-in is still being stored when its request's time runs out; it goes on");
            html(
                StatusCode::ACCEPTED,
                page::storing_page(&ns, &name, &grant_secret),
                &[],
            )
        }
    }
}

async fn finish(s: SignIn, x: Exchanged) -> Response {
    let Exchanged {
        mi,
        prompt,
        endpoints,
        provider,
        client_id,
        grant,
        subject,
        now,
    } = x;
    if let Err(f) = check_id_token(
        &grant,
        &endpoints,
        &client_id,
        mi.spec.oauth.tenant.as_deref(),
        now,
    ) {
        return s.fail(f.on(subject), Some(&mi)).await;
    }
    let mut account = match account_from_id_token(&grant, &endpoints, &provider) {
        Ok(a) => a,
        Err(f) => return s.fail(f.on(subject), Some(&mi)).await,
    };
    if account.is_none() && endpoints.userinfo.is_some() {
        match s
            .inner
            .oauth
            .userinfo(&endpoints, &grant.access_token, now)
            .await
        {
            Ok(v) => account = v.get("email").and_then(|e| e.as_str()).map(str::to_owned),
            Err(e) => {
                return s
                    .fail(provider_failure(&e.class).on(subject), Some(&mi))
                    .await;
            }
        }
    }
    let (refresh_token, account) =
        match check_grant(&mi, &grant, account.as_deref(), prompt, &provider) {
            Ok(v) => v,
            Err(f) => return s.fail(f.on(subject), Some(&mi)).await,
        };
    let scopes = grant
        .scopes
        .clone()
        .unwrap_or_else(|| crate::provider::sign_in_scopes(&mi.spec))
        .join(" ");
    // The account's immutable identity (Microsoft): a grant of one account is not replaced by a
    // sign-in of another that claims the same address.
    let signed_in_id = account_id(&grant, &endpoints);
    let ns = mi.namespace().unwrap_or_default();
    let stored_id = match s.inner.backend.secret(&ns, &mi.grant_secret_name()).await {
        Ok(secret) => secret
            .filter(|g| observed::grant_belongs_to(g, &mi))
            .and_then(|g| {
                g.data
                    .as_ref()
                    .and_then(|d| d.get(grant_keys::ACCOUNT_ID))
                    .and_then(|b| std::str::from_utf8(&b.0).ok().map(|v| v.trim().to_owned()))
            }),
        Err(e) => {
            warn!(error = %e, "reading the grant Secret failed");
            return s.fail(api_unavailable().on(subject), Some(&mi)).await;
        }
    };
    if let Err(f) = check_account_id(stored_id.as_deref(), signed_in_id.as_deref()) {
        return s.fail(f.on(subject), Some(&mi)).await;
    }
    let mut extra = grant_record(
        &account,
        scopes,
        endpoints.token.as_str(),
        &client_id,
        now,
        grant.refresh_token_expires_at,
    );
    if let Some(r) = &endpoints.revocation {
        extra.push((grant_keys::REVOCATION_ENDPOINT, r.to_string()));
    }
    if let Some(id) = signed_in_id {
        extra.push((grant_keys::ACCOUNT_ID, id));
    }
    if let Err(e) = s.inner.backend.store_grant(&mi, refresh_token, extra).await {
        warn!(error = %e, "storing the grant Secret failed");
        let f = Failure::new(
            Reason::GrantWriteFailed,
            StatusCode::INTERNAL_SERVER_ERROR,
            "The grant could not be stored",
            format!(
                "{account} signed in, but the operator could not write the Secret {:?}: {e}.",
                mi.grant_secret_name()
            ),
            Reason::GrantWriteFailed.hint(),
        )
        .on(subject);
        return s.fail(f, Some(&mi)).await;
    }
    info!(
        integration = %format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any()),
        %account,
        "sign-in succeeded; grant stored"
    );
    s.inner
        .backend
        .report(
            &mi,
            Report::SignedIn {
                account: account.clone(),
            },
        )
        .await;
    let body = page::connected_page(
        &mi.namespace().unwrap_or_default(),
        &mi.name_any(),
        &account,
        &mi.grant_secret_name(),
    );
    html(StatusCode::OK, body, &[])
}
