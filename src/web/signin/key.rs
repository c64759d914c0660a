//! The HMAC key of tickets and states, kept in a Secret so that replicas agree and restarts do not
//! invalidate open links. Created on first start when missing (create is atomic: when replicas
//! race, one wins and the others read its key).

use super::token::{MIN_KEY_LEN, random_b64};
use crate::api::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::reconcile::context::FIELD_MANAGER;
use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use tracing::info;

/// The data key holding the HMAC key (base64url text of 32 random bytes).
pub const KEY_DATA: &str = "hmac-sha256-key";
/// Default name of the key Secret.
pub const DEFAULT_KEY_SECRET: &str = "mail-integration-operator-sign-in-key";

/// Decode the key stored in `secret`.
pub fn key_from_secret(secret: &Secret) -> anyhow::Result<Vec<u8>> {
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_DATA))
        .with_context(|| format!("the Secret has no key {KEY_DATA:?}"))?;
    let text = std::str::from_utf8(&raw.0)
        .context("the key is not text")?
        .trim();
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .context("the key is not base64url")?;
    if key.len() < MIN_KEY_LEN {
        bail!(
            "the key has {} bytes; at least {MIN_KEY_LEN} are needed",
            key.len()
        );
    }
    Ok(key)
}

/// Read the key Secret `ns/name`, creating it with a fresh random key when it does not exist.
pub async fn load_or_create(client: Client, ns: &str, name: &str) -> anyhow::Result<Vec<u8>> {
    let api = Api::<Secret>::namespaced(client, ns);
    let what = format!("sign-in key Secret {ns}/{name}");
    for _ in 0..3 {
        if let Some(s) = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading the {what}"))?
        {
            return key_from_secret(&s).with_context(|| {
                format!("the {what} is unusable (delete it to have a new key made; open sign-in links then stop working)")
            });
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned())].into()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some([(KEY_DATA.to_owned(), ByteString(random_b64(32).into_bytes()))].into()),
            ..Default::default()
        };
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.create(&pp, &secret).await {
            Ok(s) => {
                info!(secret = %format!("{ns}/{name}"), "created the sign-in key Secret");
                return key_from_secret(&s);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("creating the {what}")),
        }
    }
    bail!("the {what} could not be read or created")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(value: Option<&str>) -> Secret {
        Secret {
            data: value.map(|v| [(KEY_DATA.to_owned(), ByteString(v.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn keys_are_read_and_refused_when_missing_or_short() {
        let k = random_b64(32);
        assert_eq!(key_from_secret(&secret(Some(&k))).unwrap().len(), 32);
        assert_eq!(
            key_from_secret(&secret(Some(&format!("{k}\n"))))
                .unwrap()
                .len(),
            32
        );
        assert!(key_from_secret(&secret(None)).is_err());
        assert!(key_from_secret(&secret(Some(&random_b64(8)))).is_err());
        assert!(key_from_secret(&secret(Some("not base64 !"))).is_err());
    }
}
