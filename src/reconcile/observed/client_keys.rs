//! Which keys of a client Secret hold what. The meaning of a Secret's keys is its owner's to say
//! (whoever may write the Secret), not the MailIntegration author's: otherwise `clientIdKey` could
//! name any key of a marked Secret (its `client_secret`, a certificate's `tls.key`, a service
//! account's key file), whose value would then travel as the client ID, in the authorization URL
//! that any browser is sent to, and in messages.
//!
//! - The default keys (`client_id`, `client_secret`, `service-account.json`) need nothing.
//! - Other keys are declared on the Secret by its owner, with the annotations
//!   `mailintegration.dev/client-id-key`, `mailintegration.dev/client-secret-key` and
//!   `mailintegration.dev/service-account-key` (cert-manager's `secretTemplate` and
//!   external-secrets' `target.template.metadata` can set them). A key named in
//!   `spec.oauth.clientSecretRef` is honoured only when it is the one the Secret declares.
//! - The client ID key is never a key of secret material: not the client secret's key, not the
//!   service account's key, and not a key that a Kubernetes Secret type reserves for secret
//!   material (`tls.key`, `password`, `ssh-privatekey`, `token`, ...), whatever the annotations say.

use crate::api::{
    ClientSecretRef, DEFAULT_CLIENT_ID_KEY, DEFAULT_CLIENT_SECRET_KEY, DEFAULT_SERVICE_ACCOUNT_KEY,
};
use k8s_openapi::api::core::v1::Secret;

/// The annotation on a client Secret naming the key of the client ID (default `client_id`).
pub const CLIENT_ID_KEY_ANNOTATION: &str = "mailintegration.dev/client-id-key";
/// The annotation on a client Secret naming the key of the client secret (default `client_secret`).
pub const CLIENT_SECRET_KEY_ANNOTATION: &str = "mailintegration.dev/client-secret-key";
/// The annotation on a client Secret naming the key of a service account's JSON key file (default
/// `service-account.json`).
pub const SERVICE_ACCOUNT_KEY_ANNOTATION: &str = "mailintegration.dev/service-account-key";

/// Keys that a Kubernetes Secret type reserves for secret material (kubernetes.io/tls `tls.key`,
/// basic-auth `password`, ssh-auth `ssh-privatekey`, service-account-token `token`, bootstrap
/// `token-secret`, the docker config files). None of them is ever read as a client ID, in a
/// Secret of any type: an Opaque copy of a TLS Secret holds a private key under `tls.key` too.
pub const RESERVED_SECRET_KEYS: &[&str] = &[
    "tls.key",
    "password",
    "ssh-privatekey",
    "token",
    "token-secret",
    ".dockercfg",
    ".dockerconfigjson",
];

/// The keys to read, as the Secret's owner declared them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientKeys {
    pub client_id: String,
    pub client_secret: String,
    pub service_account: String,
}

/// Why the keys the spec names cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    /// The spec names keys the Secret does not declare: (spec field, key named, key declared,
    /// annotation) for each.
    NotDeclared(Vec<(&'static str, String, String, &'static str)>),
    /// The client ID key would be a key of secret material.
    IdKeyIsSecret { key: String, why: &'static str },
}

fn annotation<'a>(secret: &'a Secret, name: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// The keys of `secret` to read for `r` (pure): each role's key is the one the Secret's annotation
/// declares, else the default; a key named in the spec must be that one; the client ID key must not
/// be a key of secret material.
pub fn client_keys(r: &ClientSecretRef, secret: &Secret) -> Result<ClientKeys, KeyRefusal> {
    let roles = [
        (
            "clientIdKey",
            r.client_id_key.as_deref(),
            CLIENT_ID_KEY_ANNOTATION,
            DEFAULT_CLIENT_ID_KEY,
        ),
        (
            "clientSecretKey",
            r.client_secret_key.as_deref(),
            CLIENT_SECRET_KEY_ANNOTATION,
            DEFAULT_CLIENT_SECRET_KEY,
        ),
        (
            "serviceAccountKey",
            r.service_account_key.as_deref(),
            SERVICE_ACCOUNT_KEY_ANNOTATION,
            DEFAULT_SERVICE_ACCOUNT_KEY,
        ),
    ];
    let mut undeclared = Vec::new();
    let mut chosen = Vec::with_capacity(3);
    for (field, named, ann, default) in roles {
        let declared = annotation(secret, ann).unwrap_or(default);
        if let Some(named) = named.map(str::trim).filter(|n| *n != declared) {
            undeclared.push((field, named.to_owned(), declared.to_owned(), ann));
        }
        chosen.push(declared.to_owned());
    }
    if !undeclared.is_empty() {
        return Err(KeyRefusal::NotDeclared(undeclared));
    }
    let [client_id, client_secret, service_account]: [String; 3] = chosen
        .try_into()
        .map_err(|_| KeyRefusal::NotDeclared(Vec::new()))?;
    let why = if client_id == client_secret {
        Some("it is the client secret's key")
    } else if client_id == service_account {
        Some("it is the service account key's key")
    } else if RESERVED_SECRET_KEYS.contains(&client_id.as_str()) {
        Some("a Kubernetes Secret type reserves it for secret material")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(KeyRefusal::IdKeyIsSecret {
            key: client_id,
            why,
        });
    }
    Ok(ClientKeys {
        client_id,
        client_secret,
        service_account,
    })
}

impl KeyRefusal {
    /// What happened and what fixes it, for the Secret `name` in `namespace` (names and keys only).
    pub fn message(&self, name: &str, namespace: &str) -> String {
        match self {
            KeyRefusal::NotDeclared(keys) => {
                let named = keys
                    .iter()
                    .map(|(field, named, declared, _)| {
                        format!("spec.oauth.clientSecretRef.{field} names the key {named:?}, but the Secret declares {declared:?}")
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let annotations = keys
                    .iter()
                    .map(|(_, named, _, ann)| format!("{ann}={named}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                format!(
                    "{named}: the meaning of a client Secret's keys is set on the Secret by whoever may write it, not by the MailIntegration. Remove the key names from spec.oauth.clientSecretRef, or, if those keys of Secret {name:?} hold exactly that, its owner runs: kubectl annotate secret {name} -n {namespace} {annotations}"
                )
            }
            KeyRefusal::IdKeyIsSecret { key, why } => format!(
                "the client ID would be read from the key {key:?} of Secret {name:?}, but {why}, and a client ID is not secret (it goes into the sign-in URL): put the client ID under its own key, declared with the annotation {CLIENT_ID_KEY_ANNOTATION} (default {DEFAULT_CLIENT_ID_KEY})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(type_: Option<&str>, annotations: &[(&str, &str)]) -> Secret {
        let mut s = Secret {
            type_: type_.map(str::to_owned),
            ..Default::default()
        };
        if !annotations.is_empty() {
            s.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        s
    }

    fn r(id: Option<&str>, secret: Option<&str>) -> ClientSecretRef {
        ClientSecretRef {
            name: "c".into(),
            client_id_key: id.map(str::to_owned),
            client_secret_key: secret.map(str::to_owned),
            service_account_key: None,
        }
    }

    #[test]
    fn the_defaults_need_nothing_and_custom_keys_need_the_owners_annotation() {
        let k = client_keys(&r(None, None), &secret(None, &[])).unwrap();
        assert_eq!(
            (k.client_id.as_str(), k.client_secret.as_str()),
            ("client_id", "client_secret")
        );
        // The spec may repeat the defaults.
        assert!(
            client_keys(
                &r(Some("client_id"), Some("client_secret")),
                &secret(None, &[])
            )
            .is_ok()
        );
        // A custom key the Secret does not declare.
        let err = client_keys(&r(Some("id"), Some("secret")), &secret(None, &[])).unwrap_err();
        let m = err.message("c", "ns");
        assert!(
            m.contains("kubectl annotate secret c -n ns mailintegration.dev/client-id-key=id mailintegration.dev/client-secret-key=secret"),
            "{m}"
        );
        // Declared by the owner: honoured, and the spec need not repeat it.
        let declared = secret(
            None,
            &[
                (CLIENT_ID_KEY_ANNOTATION, "id"),
                (CLIENT_SECRET_KEY_ANNOTATION, "secret"),
            ],
        );
        let k = client_keys(&r(Some("id"), Some("secret")), &declared).unwrap();
        assert_eq!(
            (k.client_id.as_str(), k.client_secret.as_str()),
            ("id", "secret")
        );
        assert_eq!(client_keys(&r(None, None), &declared).unwrap(), k);
        // The spec cannot name another key than the declared one.
        assert!(matches!(
            client_keys(&r(Some("secret"), None), &declared),
            Err(KeyRefusal::NotDeclared(_))
        ));
    }

    #[test]
    fn the_client_id_is_never_read_from_secret_material() {
        for (anns, ty) in [
            (vec![(CLIENT_ID_KEY_ANNOTATION, "client_secret")], None),
            (
                vec![(CLIENT_ID_KEY_ANNOTATION, "tls.key")],
                Some("kubernetes.io/tls"),
            ),
            (vec![(CLIENT_ID_KEY_ANNOTATION, "tls.key")], None),
            (
                vec![(CLIENT_ID_KEY_ANNOTATION, "service-account.json")],
                None,
            ),
            (
                vec![
                    (CLIENT_ID_KEY_ANNOTATION, "k"),
                    (CLIENT_SECRET_KEY_ANNOTATION, "k"),
                ],
                None,
            ),
        ] {
            let err = client_keys(&r(None, None), &secret(ty, &anns)).unwrap_err();
            assert!(matches!(err, KeyRefusal::IdKeyIsSecret { .. }), "{anns:?}");
        }
    }
}
