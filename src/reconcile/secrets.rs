//! Writes of the Secrets the operator owns: the grant (refresh token) and the token Secret that
//! workloads mount. Both carry an ownerReference to their MailIntegration and the managed-by label.

use super::controller::FIELD_MANAGER;
use super::observed::{grant_keys, token_keys};
use crate::{
    api::{INTEGRATION_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailIntegration},
    mailbox as sasl,
    metrics::Metrics,
    oauth::TokenGrant,
    secret::SecretValue,
};
use jiff::Timestamp;
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use std::{collections::BTreeMap, time::Duration};
use tracing::{info, warn};

fn labels(mi: &MailIntegration) -> BTreeMap<String, String> {
    [
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (INTEGRATION_LABEL.to_owned(), mi.name_any()),
    ]
    .into()
}

fn owned_meta(mi: &MailIntegration, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: mi.namespace(),
        labels: Some(labels(mi)),
        owner_references: mi.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The token Secret's content: never the refresh token or the client secret.
pub fn token_secret(mi: &MailIntegration, token: &TokenGrant) -> Secret {
    let user = &mi.spec.mailbox.address;
    let server = crate::provider::mail_server(&mi.spec);
    let access = &token.access_token;
    let xoauth2 = sasl::xoauth2(user, access);
    let mut data: BTreeMap<String, ByteString> = [
        (token_keys::ACCESS_TOKEN, bytes(access.expose())),
        (token_keys::TOKEN_TYPE, bytes(&token.token_type)),
        (token_keys::EXPIRY, bytes(&rfc3339(token.expires_at))),
        (token_keys::USERNAME, bytes(user)),
        (token_keys::XOAUTH2, bytes(xoauth2.expose())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // OAUTHBEARER names the server; without a known server (OIDC with no spec.mailbox.server) it is left out.
    if let Some(server) = server {
        let port = u16::try_from(server.port).unwrap_or(0);
        let oauthbearer = sasl::oauthbearer(user, &server.host, port, access);
        data.insert(
            token_keys::OAUTHBEARER.to_owned(),
            bytes(oauthbearer.expose()),
        );
    }
    Secret {
        metadata: owned_meta(mi, &mi.spec.token_secret.name),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Write the token Secret. `current` is the token Secret as read, which must be this integration's
/// own (see [`super::observed::owned_by`]): when there was none it is created, so that a Secret
/// someone made meanwhile under that name fails the write (409) instead of being taken over; else a
/// server-side apply with the resourceVersion read as its precondition.
pub async fn write_token_secret(
    mi: &MailIntegration,
    api: &Api<Secret>,
    current: Option<&Secret>,
    token: &TokenGrant,
    metrics: &Metrics,
) -> Result<(), kube::Error> {
    let mut secret = token_secret(mi, token);
    match current {
        None => {
            api.create(
                &PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &secret,
            )
            .await?;
        }
        Some(current) => {
            secret.metadata.resource_version = current.metadata.resource_version.clone();
            api.patch(
                &mi.spec.token_secret.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        }
    }
    metrics.count_write("token_secret");
    Ok(())
}

/// The grant Secret after a sign-in or a rotation: `base` (the current Secret, possibly brought by
/// hand) with the new values, our label and ownerReference added and everything else kept.
pub fn grant_secret(
    mi: &MailIntegration,
    base: Option<&Secret>,
    refresh_token: &SecretValue,
    extra: &[(&str, String)],
) -> Secret {
    let mut s = base.cloned().unwrap_or_else(|| Secret {
        type_: Some("Opaque".into()),
        ..Default::default()
    });
    let meta = owned_meta(mi, &mi.grant_secret_name());
    s.metadata.name = meta.name;
    s.metadata.namespace = meta.namespace;
    s.metadata
        .labels
        .get_or_insert_with(Default::default)
        .extend(labels(mi));
    let owners = s.metadata.owner_references.get_or_insert_with(Vec::new);
    for o in meta.owner_references.unwrap_or_default() {
        if !owners.iter().any(|x| x.uid == o.uid) {
            owners.push(o);
        }
    }
    let data = s.data.get_or_insert_with(Default::default);
    data.insert(
        grant_keys::REFRESH_TOKEN.into(),
        bytes(refresh_token.expose()),
    );
    for (k, v) in extra {
        data.insert((*k).to_owned(), bytes(v));
    }
    s.string_data = None;
    s
}

/// Store a rotated refresh token. The provider has already invalidated the old one, so this write
/// must land: an optimistic-concurrency replace (the resourceVersion we read), re-read on conflict,
/// retried with capped backoff until it succeeds.
///
/// `rotated`: the provider issued `refresh_token` just now (recorded as `rotated_at`); `extra`:
/// further keys to record in the same write (the grant's binding).
pub async fn store_rotated_refresh_token(
    mi: &MailIntegration,
    api: &Api<Secret>,
    current: Option<&Secret>,
    refresh_token: &SecretValue,
    rotated: bool,
    extra: &[(&str, String)],
    metrics: &Metrics,
) {
    let name = mi.grant_secret_name();
    let mut base = current.cloned();
    let mut delay = Duration::from_millis(200);
    let mut keys: Vec<(&str, String)> = extra.to_vec();
    if rotated {
        keys.push((grant_keys::ROTATED_AT, rfc3339(Timestamp::now())));
    }
    loop {
        let desired = grant_secret(mi, base.as_ref(), refresh_token, &keys);
        let result = match &base {
            Some(_) => {
                api.replace(
                    &name,
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &desired,
                )
                .await
            }
            None => {
                api.create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &desired,
                )
                .await
            }
        };
        match result {
            Ok(_) => {
                metrics.count_write("grant_secret");
                info!(rotated, "stored the grant");
                return;
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                // Someone else wrote the Secret (or it went away) since we read it: read it again
                // and put the new refresh token on top — never into a Secret that is not this
                // integration's grant (then wait until it is gone).
                base = api.get_opt(&name).await.ok().flatten();
                if base
                    .as_ref()
                    .is_some_and(|b| !super::observed::grant_belongs_to(b, mi))
                {
                    warn!(secret = %name, "the grant Secret was replaced by one that is not this integration's; holding the rotated refresh token until it is gone");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    base = api.get_opt(&name).await.ok().flatten();
                    continue;
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "storing the rotated refresh token failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(Duration::from_secs(10));
                if let Ok(fresh) = api.get_opt(&name).await {
                    base = fresh;
                }
            }
        }
    }
}
