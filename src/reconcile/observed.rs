//! What a reconcile observes: the resource and its three Secrets, parsed into domain values. Parsing
//! is pure, so the decision built on it is testable without a server.

use crate::{
    api::{ClientSecretRef, MailIntegration},
    secret::SecretValue,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;

/// Keys of the grant Secret (`<name>-oauth-grant`), written by the operator (or by an admin who brings
/// their own refresh token: only `refresh_token` is required then).
pub mod grant_keys {
    pub const REFRESH_TOKEN: &str = "refresh_token";
    pub const ACCOUNT: &str = "account";
    pub const SCOPES: &str = "scopes";
    pub const ISSUED_AT: &str = "issued_at";
    pub const ROTATED_AT: &str = "rotated_at";
}

/// Keys of the token Secret that workloads mount.
pub mod token_keys {
    pub const ACCESS_TOKEN: &str = "access_token";
    pub const TOKEN_TYPE: &str = "token_type";
    pub const EXPIRY: &str = "expiry";
    pub const USERNAME: &str = "username";
    pub const XOAUTH2: &str = "xoauth2";
    pub const OAUTHBEARER: &str = "oauthbearer";
}

pub use crate::oauth::ClientCredentials;

/// Why the client Secret cannot be used. Messages name the Secret and key, never a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientSecretProblem {
    #[error(
        "Secret {name:?} (named by spec.oauth.clientSecretRef) does not exist in this namespace: create it with the OAuth client's ID and secret"
    )]
    NotFound { name: String },
    #[error(
        "Secret {name:?} has no key {key:?}: add it, or set spec.oauth.clientSecretRef.{field} to the key that holds the value"
    )]
    KeyMissing {
        name: String,
        key: String,
        field: &'static str,
    },
    #[error(
        "Secret {name:?} key {key:?} is empty (or not UTF-8 text): put the OAuth client's value there"
    )]
    Empty { name: String, key: String },
}

/// Read the client credentials from the user's Secret (`None`: it does not exist).
pub fn client_credentials(
    r: &ClientSecretRef,
    secret: Option<&Secret>,
) -> Result<ClientCredentials, ClientSecretProblem> {
    let name = r.name.clone();
    let secret = secret.ok_or_else(|| ClientSecretProblem::NotFound { name: name.clone() })?;
    let read = |key: &str, field: &'static str| -> Result<SecretValue, ClientSecretProblem> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.as_slice())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.as_bytes())
            })
            .ok_or_else(|| ClientSecretProblem::KeyMissing {
                name: name.clone(),
                key: key.to_owned(),
                field,
            })?;
        SecretValue::from_bytes(bytes)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ClientSecretProblem::Empty {
                name: name.clone(),
                key: key.to_owned(),
            })
    };
    let client_id = read(r.client_id_key(), "clientIdKey")?;
    let client_secret = read(r.client_secret_key(), "clientSecretKey")?;
    Ok(ClientCredentials {
        client_id: client_id.expose().trim().to_owned(),
        client_secret,
    })
}

/// The stored grant.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub refresh_token: SecretValue,
    pub account: Option<String>,
    pub scopes: Vec<String>,
    pub issued_at: Option<Timestamp>,
    /// The Secret's resourceVersion: the precondition of every write (optimistic concurrency).
    pub resource_version: Option<String>,
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Parse the grant Secret; `None` when it is missing or holds no refresh token.
pub fn grant(secret: Option<&Secret>) -> Option<Grant> {
    let secret = secret?;
    let refresh_token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(grant_keys::REFRESH_TOKEN))
        .and_then(|b| SecretValue::from_bytes(&b.0))
        .filter(|v| !v.is_empty())?;
    Some(Grant {
        refresh_token,
        account: text(secret, grant_keys::ACCOUNT),
        scopes: text(secret, grant_keys::SCOPES)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        issued_at: text(secret, grant_keys::ISSUED_AT).and_then(|s| s.parse().ok()),
        resource_version: secret.metadata.resource_version.clone(),
    })
}

/// The access token currently published in the token Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedToken {
    pub access_token: SecretValue,
    pub expires_at: Timestamp,
}

/// Parse the token Secret; `None` when missing, incomplete or unparseable (then it is rewritten).
pub fn published_token(secret: Option<&Secret>) -> Option<PublishedToken> {
    let secret = secret?;
    let access_token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(token_keys::ACCESS_TOKEN))
        .and_then(|b| SecretValue::from_bytes(&b.0))
        .filter(|v| !v.is_empty())?;
    let expires_at = text(secret, token_keys::EXPIRY)?.parse().ok()?;
    Some(PublishedToken {
        access_token,
        expires_at,
    })
}

/// Everything one reconcile decides on.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub integration: &'a MailIntegration,
    pub client: Result<ClientCredentials, ClientSecretProblem>,
    /// resourceVersion of the client Secret (part of what a permanent failure waits to change).
    pub client_version: Option<String>,
    pub grant: Option<Grant>,
    pub token: Option<PublishedToken>,
    pub now: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(pairs: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn client_ref() -> ClientSecretRef {
        ClientSecretRef {
            name: "gmail-client".into(),
            client_id_key: None,
            client_secret_key: Some("secret".into()),
        }
    }

    #[test]
    fn client_secret_problems_name_the_fix_and_no_value() {
        let r = client_ref();
        assert_eq!(
            client_credentials(&r, None),
            Err(ClientSecretProblem::NotFound {
                name: "gmail-client".into()
            })
        );
        let only_id = secret(&[("client_id", b"id")]);
        let err = client_credentials(&r, Some(&only_id)).unwrap_err();
        assert!(err.to_string().contains("has no key \"secret\""), "{err}");
        assert!(err.to_string().contains("clientSecretKey"), "{err}");
        let empty = secret(&[("client_id", b"id"), ("secret", b" \n")]);
        let err = client_credentials(&r, Some(&empty)).unwrap_err();
        assert!(matches!(err, ClientSecretProblem::Empty { .. }), "{err}");
        let ok = secret(&[("client_id", b"id\n"), ("secret", b"s3cr3t-value")]);
        let creds = client_credentials(&r, Some(&ok)).unwrap();
        assert_eq!(creds.client_id, "id");
        assert_eq!(creds.client_secret.expose(), "s3cr3t-value");
        assert!(!format!("{creds:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn grant_needs_only_a_refresh_token() {
        assert_eq!(grant(None), None);
        assert_eq!(grant(Some(&secret(&[("account", b"a@b")]))), None);
        let byo = grant(Some(&secret(&[("refresh_token", b"1//rt\n")]))).unwrap();
        assert_eq!(byo.refresh_token.expose(), "1//rt");
        assert_eq!(byo.account, None);
        let full = grant(Some(&secret(&[
            ("refresh_token", b"rt"),
            ("account", b"a@example.com"),
            ("scopes", b"openid https://mail.google.com/"),
            ("issued_at", b"2026-11-01T00:00:00Z"),
        ])))
        .unwrap();
        assert_eq!(full.scopes, ["openid", "https://mail.google.com/"]);
        assert_eq!(
            full.issued_at,
            Some("2026-11-01T00:00:00Z".parse().unwrap())
        );
    }

    #[test]
    fn published_token_needs_token_and_expiry() {
        assert_eq!(
            published_token(Some(&secret(&[("access_token", b"at")]))),
            None
        );
        assert_eq!(
            published_token(Some(&secret(&[
                ("access_token", b"at"),
                ("expiry", b"soon")
            ]))),
            None
        );
        let t = published_token(Some(&secret(&[
            ("access_token", b"at"),
            ("expiry", b"2026-11-28T10:00:00Z"),
        ])))
        .unwrap();
        assert_eq!(t.expires_at, "2026-11-28T10:00:00Z".parse().unwrap());
    }
}
