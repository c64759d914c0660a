//! The two kinds of Secrets the gateway credentials write, built and recognised (pure): the app
//! Secret `<integration>-gateway-<app>` that an app mounts, and the gateway Secret
//! `<integration>-gateway` that the gateway reads. Both carry the operator's labels and a
//! controller ownerReference to their MailIntegration; only a Secret that has both (and its kind's
//! label) is ever written.

use super::decide::well_formed_password;
use crate::{
    api::{INTEGRATION_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailIntegration},
    gateway::config::{
        ACCESS_TOKEN_KEY, CONFIG_KEY, EXPIRY_KEY, GATEWAY_APP_LABEL, GATEWAY_LABEL,
        GATEWAY_SECRET_SUFFIX, GatewayConfig,
    },
    reconcile::observed::owned_by,
    secret::SecretValue,
};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// `<integration>-gateway`.
pub fn gateway_secret_name(integration: &str) -> String {
    format!("{integration}{GATEWAY_SECRET_SUFFIX}")
}

/// `<integration>-gateway-<app>`.
pub fn app_secret_name(integration: &str, app: &str) -> String {
    format!("{integration}{GATEWAY_SECRET_SUFFIX}-{app}")
}

fn label<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// Whether `s` is `mi`'s gateway Secret, written by the operator.
pub fn is_gateway_secret_of(s: &Secret, mi: &MailIntegration) -> bool {
    owned_by(s, mi) && label(s, GATEWAY_LABEL) == Some("true")
}

/// The app an app Secret of `mi`'s is for, when `s` is one the operator wrote.
pub fn app_of<'a>(s: &'a Secret, mi: &MailIntegration) -> Option<&'a str> {
    label(s, GATEWAY_APP_LABEL).filter(|_| owned_by(s, mi))
}

/// The `gateway.json` of a gateway Secret, when it parses (`None` for anything else: the
/// verifiers are then made again from the app Secrets).
pub fn config_of(s: &Secret) -> Option<GatewayConfig> {
    let raw = s.data.as_ref()?.get(CONFIG_KEY)?;
    serde_json::from_slice(&raw.0).ok()
}

/// The password in an app Secret, when it has the shape of one the operator issued.
pub fn password_of(s: &Secret) -> Option<SecretValue> {
    let raw = s.data.as_ref()?.get("password")?;
    let text = std::str::from_utf8(&raw.0).ok()?;
    well_formed_password(text).then(|| SecretValue::new(text))
}

/// The access token and expiry held in a gateway Secret (as written: bytes of each key).
pub fn token_of(s: &Secret) -> (Option<&[u8]>, Option<&[u8]>) {
    let get = |k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.as_slice())
    };
    (get(ACCESS_TOKEN_KEY), get(EXPIRY_KEY))
}

fn owner(mi: &MailIntegration) -> Vec<OwnerReference> {
    mi.controller_owner_ref(&()).into_iter().collect()
}

/// `base` (the current Secret, when there is one) made into the one to write: the operator's
/// labels and `kind` label added, the ownerReference set, `data` as given; everything else kept.
fn shaped(
    mi: &MailIntegration,
    name: &str,
    base: Option<&Secret>,
    kind: (&str, &str),
    data: BTreeMap<String, ByteString>,
) -> Secret {
    let mut s = base.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: mi.namespace(),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    });
    s.metadata.managed_fields = None;
    let labels = s.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    labels.insert(INTEGRATION_LABEL.into(), mi.name_any());
    labels.insert(kind.0.into(), kind.1.into());
    if base.is_none() {
        s.metadata.owner_references = Some(owner(mi));
    }
    s.data = Some(data);
    s.string_data = None;
    s
}

/// The gateway Secret holding `config` and the access token and expiry of `token` (the bytes of
/// those keys as they are, or none yet).
pub fn gateway_secret(
    mi: &MailIntegration,
    base: Option<&Secret>,
    config: &GatewayConfig,
    token: (Option<&[u8]>, Option<&[u8]>),
) -> Result<Secret, String> {
    let json = serde_json::to_vec(config).map_err(|e| format!("gateway.json: {e}"))?;
    let mut data: BTreeMap<String, ByteString> = BTreeMap::new();
    data.insert(CONFIG_KEY.into(), ByteString(json));
    if let (Some(t), Some(e)) = token {
        data.insert(ACCESS_TOKEN_KEY.into(), ByteString(t.to_vec()));
        data.insert(EXPIRY_KEY.into(), ByteString(e.to_vec()));
    }
    Ok(shaped(
        mi,
        &gateway_secret_name(&mi.name_any()),
        base,
        (GATEWAY_LABEL, "true"),
        data,
    ))
}

/// The app Secret of `app` with `data` (see [`super::decide::app_secret_data`]).
pub fn app_secret(
    mi: &MailIntegration,
    app: &str,
    base: Option<&Secret>,
    data: &BTreeMap<String, SecretValue>,
) -> Secret {
    let data = data
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.expose().as_bytes().to_vec())))
        .collect();
    shaped(
        mi,
        &app_secret_name(&mi.name_any(), app),
        base,
        (GATEWAY_APP_LABEL, app),
        data,
    )
}

/// Whether writing `desired` over `current` would change anything the operator sets: its data,
/// its labels, its ownerReference.
pub fn differs(current: &Secret, desired: &Secret) -> bool {
    let labels_kept = desired
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| current.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    current.data.clone().unwrap_or_default() != desired.data.clone().unwrap_or_default()
        || !labels_kept
}

/// The UID written into the ownerReference of a Secret handed to the garbage collector: no object
/// ever has it (UIDs are UUIDs), so the collector finds its owner absent and deletes it.
pub const GONE_OWNER_UID: &str = "gateway-credential-removed";

/// A Secret of a removed app (or of a removed spec.gateway) handed to Kubernetes' garbage
/// collector: its data emptied at once (the credential is gone even before the collector runs),
/// the operator's labels taken off (no watch holds it any longer) and its only ownerReference one
/// that names no existing object. The operator needs no right to delete Secrets for this.
pub fn handed_to_collector(mi: &MailIntegration, current: &Secret) -> Secret {
    let mut s = current.clone();
    s.metadata.managed_fields = None;
    s.data = Some(BTreeMap::new());
    s.string_data = None;
    if let Some(l) = s.metadata.labels.as_mut() {
        for k in [
            MANAGED_BY_LABEL,
            INTEGRATION_LABEL,
            GATEWAY_LABEL,
            GATEWAY_APP_LABEL,
        ] {
            l.remove(k);
        }
    }
    s.metadata.owner_references = Some(vec![OwnerReference {
        api_version: MailIntegration::api_version(&()).into_owned(),
        kind: MailIntegration::kind(&()).into_owned(),
        name: mi.name_any(),
        uid: GONE_OWNER_UID.into(),
        controller: None,
        block_owner_deletion: None,
    }]);
    s
}
