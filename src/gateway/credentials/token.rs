//! The access token in the gateway Secret (`access_token`, `expiry`): written whenever the
//! operator writes the token Secret (one call from the token-write path), so that the gateway
//! never reads the token Secret, whose keys a template may replace. Only for integrations with
//! spec.gateway, only into the gateway Secret the operator owns, and not when unchanged.

use super::secrets::{gateway_secret_name, is_gateway_secret_of, token_of};
use crate::{
    api::MailIntegration,
    gateway::config::{ACCESS_TOKEN_KEY, EXPIRY_KEY},
    metrics::Metrics,
    secret::SecretValue,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use tracing::warn;

/// The field manager of the token keys of the gateway Secret.
pub const FIELD_MANAGER: &str = "mail-integration-operator-gateway-token";

/// The expiry as the token Secret writes it.
fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Put `access_token` and `expiry` into `mi`'s gateway Secret, when `mi` has spec.gateway, the
/// gateway Secret exists and is the operator's, and it holds something else. A failure is logged
/// (without the token) and does not fail the caller: the token Secret is written, and the next
/// write (or the credentials' reconcile) brings the gateway Secret up to date.
pub async fn publish(
    mi: &MailIntegration,
    api: &Api<Secret>,
    access_token: &SecretValue,
    expires_at: Timestamp,
    metrics: &Metrics,
) {
    if mi.spec.gateway.is_none() {
        return;
    }
    if let Err(e) = try_publish(mi, api, access_token, expires_at, metrics).await {
        warn!(
            namespace = mi.namespace().unwrap_or_default(),
            name = mi.name_any(),
            error = %e,
            "could not write the access token into the gateway Secret; the next token write retries"
        );
    }
}

async fn try_publish(
    mi: &MailIntegration,
    api: &Api<Secret>,
    access_token: &SecretValue,
    expires_at: Timestamp,
    metrics: &Metrics,
) -> Result<(), kube::Error> {
    let name = gateway_secret_name(&mi.name_any());
    metrics.count_read("gateway_secret");
    let Some(current) = api.get_opt(&name).await? else {
        return Ok(());
    };
    if !is_gateway_secret_of(&current, mi) {
        return Ok(());
    }
    let expiry = rfc3339(expires_at);
    if token_of(&current)
        == (
            Some(access_token.expose().as_bytes()),
            Some(expiry.as_bytes()),
        )
    {
        return Ok(());
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "data": {
            ACCESS_TOKEN_KEY: STANDARD.encode(access_token.expose()),
            EXPIRY_KEY: STANDARD.encode(&expiry),
        },
    });
    api.patch(
        &name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    )
    .await?;
    metrics.count_write("gateway_token");
    Ok(())
}

/// A new gateway Secret gets the token published so far in the token Secret (the operator's own;
/// its `access_token` and `expiry` as the reconcile reads them), so that the gateway can serve
/// before the next refresh.
pub async fn copy_published(
    mi: &MailIntegration,
    api: &Api<Secret>,
    now: Timestamp,
    metrics: &Metrics,
) {
    metrics.count_read("token_secret");
    let token = match api.get_opt(&mi.spec.token_secret.name).await {
        Ok(Some(s)) if crate::reconcile::observed::owned_by(&s, mi) => {
            crate::reconcile::observed::published_token(Some(&s), now)
        }
        _ => None,
    };
    if let Some(t) = token {
        publish(mi, api, &t.access_token, t.expires_at, metrics).await;
    }
}
