//! The OAuth client as the user's Secrets describe it: a client ID with a secret, a certificate
//! (`kubernetes.io/tls` Secret), or a Google service account's key file. Every Secret read here
//! is one the user marked for the operator; messages name Secrets and keys, never a value.

use super::{client_keys, is_marked_for_operator, is_operator_managed};
use crate::api::{ClientSecretRef, GrantType, MailIntegrationSpec, OAUTH_CLIENT_LABEL};
use crate::oauth::assertion::{CertificateKey, ServiceAccountKey};
use crate::oauth::binding::{OAUTH_SERVERS_ANNOTATION, parse_servers};
use crate::oauth::{ClientCredentials, CredentialOwner, SigningKey};
use crate::secret::SecretValue;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use std::sync::Arc;

/// Why the client Secret cannot be used. Messages name the Secret and key, never a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientSecretProblem {
    #[error(
        "Secret {name:?} (named by spec.oauth.clientSecretRef) does not exist in this namespace: create it with the OAuth client's ID and secret"
    )]
    NotFound { name: String },
    #[error("Secret {name:?} has no key {key:?}: {field}")]
    KeyMissing {
        name: String,
        key: String,
        field: &'static str,
    },
    #[error(
        "Secret {name:?} key {key:?} is empty (or not UTF-8 text): put the OAuth client's value there"
    )]
    Empty { name: String, key: String },
    #[error(
        "Secret {name:?} is not marked for the operator, which reads only Secrets labelled {label}=true: if it holds this integration's OAuth client, run: kubectl label secret {name} -n {namespace} {label}=true",
        label = OAUTH_CLIENT_LABEL
    )]
    NotMarked { name: String, namespace: String },
    #[error(
        "Secret {name:?} is one the operator manages (a grant or token Secret), not an OAuth client: set spec.oauth.{field}.name to the Secret holding the client's {holds}"
    )]
    OperatorManaged {
        name: String,
        field: &'static str,
        holds: &'static str,
    },
    #[error(
        "Secret {name:?} (named by spec.oauth.clientCertificateRef) does not exist in this namespace: create it with kubectl create secret tls {name} --cert=app.crt --key=app.key, and label it {label}=true",
        label = OAUTH_CLIENT_LABEL
    )]
    CertificateNotFound { name: String },
    #[error(
        "Secret {name:?} (named by spec.oauth.clientCertificateRef) is not marked for the operator, which reads only Secrets labelled {label}=true: run kubectl label secret {name} -n {namespace} {label}=true",
        label = OAUTH_CLIENT_LABEL
    )]
    CertificateNotMarked { name: String, namespace: String },
    #[error(
        "Secret {name:?} (the service account's key) does not allow tokens for {mailbox}: its annotation {DELEGATED_MAILBOXES_ANNOTATION} lists the mailboxes it may be used for (addresses or *@domain, comma-separated); nothing was asked of Google"
    )]
    DelegationNotAllowed { name: String, mailbox: String },
    #[error("Secret {name:?} key {key:?} cannot be used: {problem}")]
    KeyInvalid {
        name: String,
        key: String,
        problem: String,
    },
    /// A marked Secret over the bound the operator keeps (see `size::too_large_message`).
    #[error("{message}")]
    TooLarge { message: String },
    /// The spec names keys the Secret does not declare, or the client ID key is secret material.
    #[error("{message}")]
    KeyNotDeclared { message: String },
    #[error(
        "Secret {name:?} has an annotation {OAUTH_SERVERS_ANNOTATION} that cannot be used ({problem}): list the OAuth servers its credentials may be sent to as comma-separated https URLs"
    )]
    ServersInvalid { name: String, problem: String },
    /// An OIDC client's Secret does not name the servers its credentials may go to.
    #[error("{message}")]
    ServersNotNamed { message: String },
}

impl ClientSecretProblem {
    /// The condition reason.
    pub fn reason(&self) -> crate::reason::Reason {
        use crate::reason::Reason;
        match self {
            ClientSecretProblem::NotFound { .. } => Reason::ClientSecretNotFound,
            ClientSecretProblem::KeyMissing { .. } | ClientSecretProblem::Empty { .. } => {
                Reason::ClientSecretKeyMissing
            }
            ClientSecretProblem::NotMarked { .. }
            | ClientSecretProblem::OperatorManaged { .. }
            | ClientSecretProblem::CertificateNotMarked { .. } => Reason::ClientSecretNotMarked,
            ClientSecretProblem::CertificateNotFound { .. } => Reason::ClientSecretNotFound,
            ClientSecretProblem::KeyInvalid { .. } => Reason::ClientKeyInvalid,
            ClientSecretProblem::DelegationNotAllowed { .. } => Reason::DelegationNotAllowed,
            ClientSecretProblem::TooLarge { .. } => Reason::ClientSecretTooLarge,
            ClientSecretProblem::KeyNotDeclared { .. } => Reason::ClientSecretKeyNotDeclared,
            ClientSecretProblem::ServersInvalid { .. }
            | ClientSecretProblem::ServersNotNamed { .. } => Reason::OAuthServerNotAllowed,
        }
    }
}

/// Read the client credentials from the user's Secret (`None`: it does not exist): the client ID
/// and secret.
pub fn client_credentials(
    r: &ClientSecretRef,
    secret: Option<&Secret>,
) -> Result<ClientCredentials, ClientSecretProblem> {
    let secret = marked_client_secret(r, secret)?;
    let keys = keys_of(r, secret)?;
    let client_id = read_key(secret, &r.name, &keys.client_id, CLIENT_ID_FIX)?;
    let client_secret = read_key(secret, &r.name, &keys.client_secret, CLIENT_SECRET_FIX)?;
    Ok(ClientCredentials {
        client_id: client_id.expose().trim().to_owned(),
        client_secret,
        signing_key: None,
        owner: owner_of(r, secret)?,
    })
}

/// The keys the Secret's owner declared (see [`client_keys`]).
fn keys_of(
    r: &ClientSecretRef,
    secret: &Secret,
) -> Result<client_keys::ClientKeys, ClientSecretProblem> {
    client_keys::client_keys(r, secret).map_err(|refusal| ClientSecretProblem::KeyNotDeclared {
        message: refusal.message(&r.name, &secret.namespace().unwrap_or_default()),
    })
}

/// Where the Secret's owner lets its credentials go ([`OAUTH_SERVERS_ANNOTATION`]).
fn owner_of(r: &ClientSecretRef, secret: &Secret) -> Result<CredentialOwner, ClientSecretProblem> {
    let servers = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OAUTH_SERVERS_ANNOTATION))
        .map(|v| parse_servers(v))
        .transpose()
        .map_err(|problem| ClientSecretProblem::ServersInvalid {
            name: r.name.clone(),
            problem,
        })?;
    Ok(CredentialOwner {
        secret: r.name.clone(),
        namespace: secret.namespace().unwrap_or_default(),
        servers,
    })
}

/// The annotation on a service account's key Secret that lists the mailboxes the key may get
/// tokens for (addresses or `*@domain`, comma-separated; `*`: any). Domain-wide delegation lets the
/// key act as any user of the Workspace domain, and the spec's mailbox is written by whoever may
/// create MailIntegrations: the key's owner says which mailboxes it serves.
pub const DELEGATED_MAILBOXES_ANNOTATION: &str = "mailintegration.dev/delegated-mailboxes";

/// Whether the annotation value `allowed` lets a key get tokens for `mailbox` (case-insensitive;
/// no annotation allows nothing).
pub fn delegation_allows(allowed: Option<&str>, mailbox: &str) -> bool {
    let Some(allowed) = allowed else {
        return false;
    };
    let mailbox = mailbox.trim();
    let Some((_, domain)) = mailbox.rsplit_once('@') else {
        return false;
    };
    allowed
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| match entry.strip_prefix("*@") {
            _ if entry == "*" => true,
            Some(d) => d.eq_ignore_ascii_case(domain),
            None => entry.eq_ignore_ascii_case(mailbox),
        })
}

/// What to do about a missing key, per field of the spec.
const CLIENT_ID_FIX: &str = "add it, or declare the key that holds the client ID on the Secret with the annotation mailintegration.dev/client-id-key";
const CLIENT_SECRET_FIX: &str = "add it, or declare the key that holds the client secret on the Secret with the annotation mailintegration.dev/client-secret-key";
const SERVICE_ACCOUNT_FIX: &str = "add it, or declare the key that holds the service account's key file on the Secret with the annotation mailintegration.dev/service-account-key";
const CERTIFICATE_FIX: &str = "a kubernetes.io/tls Secret holds tls.crt and tls.key (spec.oauth.clientCertificateRef): create it with kubectl create secret tls";

/// The client as `spec` wants it authenticated: [`client_credentials`]; with
/// `spec.oauth.clientCertificateRef` the client ID and the certificate (`certificate`, the
/// `kubernetes.io/tls` Secret it names); with grantType ServiceAccount the key file from the client
/// Secret.
pub fn client(
    spec: &MailIntegrationSpec,
    client_secret: Option<&Secret>,
    certificate: Option<&Secret>,
) -> Result<ClientCredentials, ClientSecretProblem> {
    let creds = client_as_read(spec, client_secret, certificate)?;
    if spec.provider == crate::api::ProviderKind::Oidc && creds.owner.servers.is_none() {
        return Err(ClientSecretProblem::ServersNotNamed {
            message: servers_not_named(spec, &creds.owner),
        });
    }
    Ok(creds)
}

/// An OIDC client's Secret must name the servers its credentials may go to (see
/// [`crate::oauth::binding`]): said before any sign-in link is offered, with the command that lists
/// what this spec needs (its issuer, whose discovery names the endpoints, and the servers of the
/// endpoints it names itself).
fn servers_not_named(spec: &MailIntegrationSpec, owner: &CredentialOwner) -> String {
    let mut entries: Vec<String> = Vec::new();
    let issuer = spec
        .oauth
        .issuer_url
        .as_deref()
        .map(|i| i.trim().trim_end_matches('/').to_owned());
    entries.extend(issuer.clone());
    let named = spec
        .oauth
        .endpoints
        .as_ref()
        .map(|e| [e.token.as_deref(), e.revocation.as_deref()])
        .unwrap_or_default();
    for url in named.into_iter().flatten() {
        let Ok(u) = url::Url::parse(url.trim()) else {
            continue;
        };
        let covered = issuer
            .as_deref()
            .and_then(|i| url::Url::parse(i).ok())
            .is_some_and(|i| crate::oauth::binding::under(&u, &i));
        let origin = u.origin().ascii_serialization();
        if !covered && !entries.contains(&origin) {
            entries.push(origin);
        }
    }
    let name = &owner.secret;
    format!(
        "Secret {name:?} holds an OIDC client's credentials but does not say which servers they may be sent to: the operator sends a client secret only to servers its owner lists on the Secret (the MailIntegration's author may not be who decides that). If {} belongs to this client's OAuth server, whoever may write the Secret runs: kubectl annotate secret {name} -n {} {OAUTH_SERVERS_ANNOTATION}={}",
        crate::reason::clean(&entries.join(" and ")),
        owner.namespace,
        crate::reason::clean(&entries.join(","))
    )
}

/// [`client`] before the check that an OIDC client's Secret names its servers.
fn client_as_read(
    spec: &MailIntegrationSpec,
    client_secret: Option<&Secret>,
    certificate: Option<&Secret>,
) -> Result<ClientCredentials, ClientSecretProblem> {
    let r = &spec.oauth.client_secret_ref;
    if spec.grant_type() == GrantType::ServiceAccount {
        let secret = marked_client_secret(r, client_secret)?;
        let mailbox = spec.mailbox.address.trim();
        let allowed = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DELEGATED_MAILBOXES_ANNOTATION));
        if !delegation_allows(allowed.map(String::as_str), mailbox) {
            return Err(ClientSecretProblem::DelegationNotAllowed {
                name: r.name.clone(),
                mailbox: crate::reason::clean(mailbox),
            });
        }
        let keys = keys_of(r, secret)?;
        let key = keys.service_account.as_str();
        let json = raw_key(secret, &r.name, key, SERVICE_ACCOUNT_FIX)?;
        let account =
            ServiceAccountKey::from_json(json).map_err(|p| key_invalid(&r.name, key, &p))?;
        return Ok(ClientCredentials {
            client_id: account.client_id.clone(),
            client_secret: SecretValue::new(String::new()),
            signing_key: Some(Arc::new(SigningKey::ServiceAccount(account))),
            owner: owner_of(r, secret)?,
        });
    }
    let Some(cert_ref) = &spec.oauth.client_certificate_ref else {
        return client_credentials(r, client_secret);
    };
    let secret = marked_client_secret(r, client_secret)?;
    let keys = keys_of(r, secret)?;
    let client_id = read_key(secret, &r.name, &keys.client_id, CLIENT_ID_FIX)?;
    let owner = owner_of(r, secret)?;
    let name = &cert_ref.name;
    let tls = certificate
        .ok_or_else(|| ClientSecretProblem::CertificateNotFound { name: name.clone() })?;
    if is_operator_managed(tls) {
        return Err(ClientSecretProblem::OperatorManaged {
            name: name.clone(),
            field: "clientCertificateRef",
            holds: "certificate and key (kubernetes.io/tls)",
        });
    }
    if !is_marked_for_operator(tls) {
        return Err(ClientSecretProblem::CertificateNotMarked {
            name: name.clone(),
            namespace: tls.namespace().unwrap_or_default(),
        });
    }
    let cert = raw_key(tls, name, "tls.crt", CERTIFICATE_FIX)?;
    let key = raw_key(tls, name, "tls.key", CERTIFICATE_FIX)?;
    let cert_len = cert.len();
    let cert = CertificateKey::from_pem(cert, key, cert_ref.algorithm()).map_err(|p| {
        use crate::oauth::assertion::{KeyProblem, MAX_KEY_BYTES};
        let which = match p {
            KeyProblem::NoCertificate => "tls.crt",
            KeyProblem::TooLarge if cert_len > MAX_KEY_BYTES => "tls.crt",
            _ => "tls.key",
        };
        key_invalid(name, which, &p)
    })?;
    Ok(ClientCredentials {
        client_id: client_id.expose().trim().to_owned(),
        client_secret: SecretValue::new(String::new()),
        signing_key: Some(Arc::new(SigningKey::Certificate(cert))),
        owner,
    })
}

fn key_invalid(
    name: &str,
    key: &str,
    p: &crate::oauth::assertion::KeyProblem,
) -> ClientSecretProblem {
    ClientSecretProblem::KeyInvalid {
        name: name.to_owned(),
        key: key.to_owned(),
        problem: p.to_string(),
    }
}

/// The client Secret, if the user marked it for the operator: a Secret that is not marked is not
/// read at all.
fn marked_client_secret<'a>(
    r: &ClientSecretRef,
    secret: Option<&'a Secret>,
) -> Result<&'a Secret, ClientSecretProblem> {
    let name = r.name.clone();
    let secret = secret.ok_or_else(|| ClientSecretProblem::NotFound { name: name.clone() })?;
    if is_operator_managed(secret) {
        return Err(ClientSecretProblem::OperatorManaged {
            name,
            field: "clientSecretRef",
            holds: "ID and secret",
        });
    }
    if !is_marked_for_operator(secret) {
        return Err(ClientSecretProblem::NotMarked {
            name,
            namespace: secret.namespace().unwrap_or_default(),
        });
    }
    Ok(secret)
}

/// A key's bytes (`data`, else `stringData`).
fn raw_key<'a>(
    secret: &'a Secret,
    name: &str,
    key: &str,
    field: &'static str,
) -> Result<&'a [u8], ClientSecretProblem> {
    secret
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
            name: name.to_owned(),
            key: key.to_owned(),
            field,
        })
}

/// A key's text value, not empty.
fn read_key(
    secret: &Secret,
    name: &str,
    key: &str,
    field: &'static str,
) -> Result<SecretValue, ClientSecretProblem> {
    let bytes = raw_key(secret, name, key, field)?;
    SecretValue::from_bytes(bytes)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ClientSecretProblem::Empty {
            name: name.to_owned(),
            key: key.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn delegation_is_allowed_only_for_the_listed_mailboxes() {
        let allows = |a: Option<&str>, m: &str| delegation_allows(a, m);
        assert!(!allows(None, "ceo@example.com"));
        assert!(!allows(Some(""), "ceo@example.com"));
        assert!(allows(Some("support@example.com"), "Support@Example.com"));
        assert!(!allows(Some("support@example.com"), "ceo@example.com"));
        assert!(allows(
            Some(" x@y.z , *@Tickets.example.com"),
            "a@tickets.example.com"
        ));
        assert!(!allows(Some("*@example.com"), "a@tickets.example.com"));
        assert!(!allows(Some("*@example.com"), "a@evil-example.com"));
        assert!(allows(Some("*"), "anyone@anywhere.test"));
        assert!(!allows(Some("*@example.com"), "not-an-address"));
    }

    use super::*;
    use crate::oauth::assertion::tests::keypair;
    use k8s_openapi::ByteString;

    fn secret(name: &str, marked: bool, pairs: &[(&str, &[u8])]) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        if marked {
            s.metadata.labels = Some([(OAUTH_CLIENT_LABEL.to_owned(), "true".to_owned())].into());
        }
        s.data = Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
        );
        s
    }

    fn spec(oauth: serde_json::Value) -> MailIntegrationSpec {
        let mut o = serde_json::json!({"clientSecretRef": {"name": "client"}});
        o.as_object_mut()
            .unwrap()
            .extend(oauth.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({
            "provider": "Microsoft",
            "mailbox": {"address": "helpdesk@contoso.example"},
            "oauth": o,
            "tokenSecret": {"name": "t"},
        }))
        .unwrap()
    }

    #[test]
    fn a_certificate_client_needs_only_the_client_id_and_a_marked_tls_secret() {
        let (cert, key, _, fingerprint) = keypair();
        let s = spec(serde_json::json!({
            "tenant": "contoso.example",
            "grantType": "ClientCredentials",
            "clientCertificateRef": {"name": "app-cert"},
        }));
        let id_only = secret("client", true, &[("client_id", b"app-1")]);
        let tls = secret("app-cert", true, &[("tls.crt", &cert), ("tls.key", &key)]);
        let creds = client(&s, Some(&id_only), Some(&tls)).unwrap();
        assert_eq!(creds.client_id, "app-1");
        assert!(creds.client_secret.is_empty());
        assert!(format!("{creds:?}").contains(&fingerprint));

        let unmarked = secret("app-cert", false, &[("tls.crt", &cert), ("tls.key", &key)]);
        let err = client(&s, Some(&id_only), Some(&unmarked)).unwrap_err();
        assert_eq!(err.reason(), crate::reason::Reason::ClientSecretNotMarked);
        assert!(
            err.to_string()
                .contains("kubectl label secret app-cert -n ns"),
            "{err}"
        );
        let err = client(&s, Some(&id_only), None).unwrap_err();
        assert_eq!(err.reason(), crate::reason::Reason::ClientSecretNotFound);
        let swapped = secret("app-cert", true, &[("tls.crt", &key), ("tls.key", &cert)]);
        let err = client(&s, Some(&id_only), Some(&swapped)).unwrap_err();
        assert_eq!(err.reason(), crate::reason::Reason::ClientKeyInvalid);
        assert!(err.to_string().contains("tls.crt"), "{err}");
        let text = String::from_utf8(key).unwrap();
        let body = text.lines().nth(1).unwrap();
        assert!(!err.to_string().contains(body));
    }

    #[test]
    fn a_service_account_reads_its_key_file_and_client_id_from_the_client_secret() {
        let (_, key, _, _) = keypair();
        let mut s = spec(serde_json::json!({"grantType": "ServiceAccount"}));
        s.provider = crate::api::ProviderKind::Google;
        let json = serde_json::json!({
            "type": "service_account",
            "client_email": "mailer@p.iam.gserviceaccount.com",
            "client_id": "42",
            "private_key": String::from_utf8(key).unwrap(),
        })
        .to_string();
        let mut good = secret("client", true, &[("service-account.json", json.as_bytes())]);
        // Without the key owner's list of mailboxes, the key is not used for any.
        assert_eq!(
            client(&s, Some(&good), None).unwrap_err().reason(),
            crate::reason::Reason::DelegationNotAllowed
        );
        good.metadata.annotations = Some(
            [(
                DELEGATED_MAILBOXES_ANNOTATION.to_owned(),
                "*@contoso.example".to_owned(),
            )]
            .into(),
        );
        let creds = client(&s, Some(&good), None).unwrap();
        assert_eq!(creds.client_id, "42");
        assert!(matches!(
            creds.signing_key.as_deref(),
            Some(SigningKey::ServiceAccount(_))
        ));
        let mut missing = secret("client", true, &[("client_id", b"x")]);
        missing.metadata.annotations = good.metadata.annotations.clone();
        let err = client(&s, Some(&missing), None).unwrap_err();
        assert!(err.to_string().contains("service-account-key"), "{err}");
        let unmarked = secret(
            "client",
            false,
            &[("service-account.json", json.as_bytes())],
        );
        assert_eq!(
            client(&s, Some(&unmarked), None).unwrap_err().reason(),
            crate::reason::Reason::ClientSecretNotMarked
        );
    }
}
