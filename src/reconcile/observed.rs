//! What a reconcile observes: the resource and its three Secrets, parsed into domain values. Parsing
//! is pure, so the decision built on it is testable without a server.

use crate::{
    api::{
        INTEGRATION_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailIntegration, OAUTH_CLIENT_LABEL,
    },
    secret::SecretValue,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use std::time::Duration;

/// Keys of the grant Secret (`<name>-oauth-grant`), written by the operator (or by an admin who brings
/// their own refresh token: only `refresh_token` is required then).
pub mod grant_keys {
    pub const REFRESH_TOKEN: &str = "refresh_token";
    pub const ACCOUNT: &str = "account";
    pub const SCOPES: &str = "scopes";
    pub const ISSUED_AT: &str = "issued_at";
    pub const ROTATED_AT: &str = "rotated_at";
    /// When the provider said the grant ends, if it did (RFC 3339).
    pub const REFRESH_TOKEN_EXPIRES_AT: &str = "refresh_token_expires_at";
    /// Where the grant was issued: the token endpoint it is refreshed at, and the OAuth client it
    /// belongs to. Written at sign-in (or on the first refresh of a grant brought by hand); the
    /// refresh token is never sent to another endpoint or with another client.
    pub const TOKEN_ENDPOINT: &str = "token_endpoint";
    pub const CLIENT_ID: &str = "client_id";
    /// The revocation endpoint of the issuer (recorded with the token endpoint): the only place
    /// `revokeOnDelete` sends the refresh token to.
    pub const REVOCATION_ENDPOINT: &str = "revocation_endpoint";
    /// Microsoft: the signed-in account's immutable identity, `<tid>/<oid>` (directory and object
    /// ID): a later sign-in must be of the same account, whatever its `email` claim says.
    pub const ACCOUNT_ID: &str = "account_id";
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

mod client;
mod client_keys;
pub use client::*;
mod size;
pub use client_keys::*;
pub use size::*;

fn label<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// Whether the operator manages `secret` (its label, on a grant or token Secret of any integration).
pub fn is_operator_managed(secret: &Secret) -> bool {
    label(secret, MANAGED_BY_LABEL).is_some() || label(secret, INTEGRATION_LABEL).is_some()
}

/// Whether a user marked `secret` as readable by the operator (client Secrets, CA bundles), and it
/// is not one of the operator's own.
pub fn is_marked_for_operator(secret: &Secret) -> bool {
    label(secret, OAUTH_CLIENT_LABEL) == Some("true") && !is_operator_managed(secret)
}

/// Whether `secret` is one the operator created for `mi`: its managed-by label and a controller
/// ownerReference to `mi`'s UID. Only such a Secret is ever written.
pub fn owned_by(secret: &Secret, mi: &MailIntegration) -> bool {
    let Some(uid) = mi.uid() else {
        return false;
    };
    label(secret, MANAGED_BY_LABEL) == Some(MANAGED_BY_VALUE)
        && secret
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Whether the grant Secret may be used by `mi`: the operator's own, or brought by hand with the
/// label `mailintegration.dev/integration: <mi's name>` and no other controller.
pub fn grant_belongs_to(secret: &Secret, mi: &MailIntegration) -> bool {
    if owned_by(secret, mi) {
        return true;
    }
    let other_controller = secret
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) != mi.uid().as_ref());
    label(secret, INTEGRATION_LABEL) == Some(mi.name_any().as_str()) && !other_controller
}

/// The stored grant.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub refresh_token: SecretValue,
    pub account: Option<String>,
    pub scopes: Vec<String>,
    pub issued_at: Option<Timestamp>,
    /// When the provider said the grant ends (Google's `refresh_token_expires_in` at sign-in: a
    /// Testing-status app's grant lives 7 days).
    pub refresh_token_expires_at: Option<Timestamp>,
    /// The token endpoint and client the grant was issued for ([`grant_keys::TOKEN_ENDPOINT`]).
    pub token_endpoint: Option<String>,
    pub client_id: Option<String>,
    /// The revocation endpoint of the grant's issuer, when it has one ([`grant_keys::REVOCATION_ENDPOINT`]).
    pub revocation_endpoint: Option<String>,
    /// The Secret's resourceVersion: the precondition of every write (optimistic concurrency).
    pub resource_version: Option<String>,
}

impl Grant {
    /// Why this grant must not be used with `token_endpoint`, `client_id` and `mailbox`: it was
    /// issued elsewhere (the spec was edited to point at another server, client or mailbox).
    pub fn bound_elsewhere(
        &self,
        token_endpoint: &str,
        client_id: &str,
        mailbox: &str,
    ) -> Option<String> {
        let fix = "sign in again (status.signIn.url): a grant is only ever sent back to where it was issued";
        if let Some(bound) = self
            .token_endpoint
            .as_deref()
            .filter(|b| b.trim_end_matches('/') != token_endpoint.trim_end_matches('/'))
        {
            return Some(format!(
                "the grant was issued by the token endpoint {bound}, but the spec now names {token_endpoint}: its refresh token is not sent there; {fix}"
            ));
        }
        if let Some(bound) = self.client_id.as_deref().filter(|b| *b != client_id) {
            return Some(format!(
                "the grant belongs to the OAuth client {bound}, but the client Secret now holds {client_id}; {fix}"
            ));
        }
        if let Some(account) = self
            .account
            .as_deref()
            .filter(|a| !a.eq_ignore_ascii_case(mailbox))
        {
            return Some(format!(
                "the grant is of {account}, but spec.mailbox.address is now {mailbox}; {fix}"
            ));
        }
        None
    }

    /// Where the grant was issued, for the binding check.
    pub fn origin(&self) -> crate::oauth::GrantOrigin<'_> {
        crate::oauth::GrantOrigin {
            token_endpoint: self.token_endpoint.as_deref(),
            revocation_endpoint: self.revocation_endpoint.as_deref(),
            client_id: self.client_id.as_deref(),
            account: self.account.as_deref(),
        }
    }

    /// Whether the grant records where it was issued (else it is bound on its first refresh).
    pub fn is_bound(&self) -> bool {
        self.token_endpoint.is_some() && self.client_id.is_some()
    }
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
        refresh_token_expires_at: text(secret, grant_keys::REFRESH_TOKEN_EXPIRES_AT)
            .and_then(|s| s.parse().ok()),
        token_endpoint: text(secret, grant_keys::TOKEN_ENDPOINT),
        client_id: text(secret, grant_keys::CLIENT_ID),
        revocation_endpoint: text(secret, grant_keys::REVOCATION_ENDPOINT),
        resource_version: secret.metadata.resource_version.clone(),
    })
}

/// The access token currently published in the token Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedToken {
    pub access_token: SecretValue,
    pub expires_at: Timestamp,
}

/// The longest an access token is believed to live (`expires_in` is capped to the same in
/// [`crate::oauth`]): an `expiry` further ahead is not trusted, and the token is refreshed.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parse the token Secret; `None` when missing, incomplete, unparseable or with an expiry further
/// ahead of `now` than any token lives (then it is refreshed and rewritten).
pub fn published_token(secret: Option<&Secret>, now: Timestamp) -> Option<PublishedToken> {
    let secret = secret?;
    let access_token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(token_keys::ACCESS_TOKEN))
        .and_then(|b| SecretValue::from_bytes(&b.0))
        .filter(|v| !v.is_empty())?;
    let expires_at: Timestamp = text(secret, token_keys::EXPIRY)?.parse().ok()?;
    if expires_at > crate::time::after(now, MAX_TOKEN_LIFETIME) {
        return None;
    }
    Some(PublishedToken {
        access_token,
        expires_at,
    })
}

/// A Secret the spec points the operator at that it must not use or write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub reason: crate::reason::Reason,
    pub message: String,
}

/// The conflicts of `mi` with the grant and token Secrets found under its names.
pub fn conflicts(
    mi: &MailIntegration,
    grant_secret: Option<&Secret>,
    token_secret: Option<&Secret>,
) -> Option<Conflict> {
    use crate::reason::Reason;
    if let Some(t) = token_secret.filter(|s| !owned_by(s, mi)) {
        let whose = if is_operator_managed(t) {
            "it belongs to another MailIntegration"
        } else {
            "the operator did not create it"
        };
        return Some(Conflict {
            reason: Reason::TokenSecretConflict,
            message: format!(
                "Secret {:?} (spec.tokenSecret.name) already exists and {whose}: the operator writes only Secrets it owns; choose another spec.tokenSecret.name, or delete that Secret if it is left over",
                t.name_any()
            ),
        });
    }
    if let Some(g) = grant_secret.filter(|s| !grant_belongs_to(s, mi)) {
        return Some(Conflict {
            reason: Reason::GrantSecretConflict,
            message: format!(
                "Secret {:?} has the grant Secret's name but is not this integration's: it is not used. Delete or rename it; to bring your own refresh token, label it {INTEGRATION_LABEL}={}",
                g.name_any(),
                mi.name_any()
            ),
        });
    }
    None
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
    /// A grant or token Secret the spec leads to that is not this integration's.
    pub conflict: Option<Conflict>,
    pub now: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ClientSecretRef;
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

    fn now() -> Timestamp {
        "2026-11-28T09:00:00Z".parse().unwrap()
    }

    fn labelled(mut s: Secret, pairs: &[(&str, &str)]) -> Secret {
        s.metadata.namespace = Some("ns".into());
        s.metadata.labels = Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s
    }

    fn marked(pairs: &[(&str, &[u8])]) -> Secret {
        labelled(secret(pairs), &[(OAUTH_CLIENT_LABEL, "true")])
    }

    fn integration() -> MailIntegration {
        let spec = serde_json::from_value(serde_json::json!({
            "provider": "Google",
            "mailbox": {"address": "a@example.com"},
            "oauth": {"clientSecretRef": {"name": "c"}},
            "tokenSecret": {"name": "t"},
        }))
        .unwrap();
        let mut mi = MailIntegration::new("inbox", spec);
        mi.metadata.namespace = Some("ns".into());
        mi.metadata.uid = Some("uid-1".into());
        mi
    }

    fn owned(mut s: Secret, uid: &str) -> Secret {
        s = labelled(
            s,
            &[
                (MANAGED_BY_LABEL, MANAGED_BY_VALUE),
                (INTEGRATION_LABEL, "inbox"),
            ],
        );
        s.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "mailintegration.dev/v1alpha1".into(),
                kind: "MailIntegration".into(),
                name: "inbox".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        s
    }

    #[test]
    fn only_marked_secrets_are_read_as_clients() {
        let r = client_ref();
        let pairs: &[(&str, &[u8])] = &[
            ("client_id", b"id"),
            ("client_secret", b"refresh-token-value"),
        ];
        let err = client_credentials(&r, Some(&secret(pairs))).unwrap_err();
        assert!(
            matches!(err, ClientSecretProblem::NotMarked { .. }),
            "{err}"
        );
        assert_eq!(err.reason(), crate::reason::Reason::ClientSecretNotMarked);
        assert!(
            err.to_string().contains(
                "kubectl label secret gmail-client -n  mailintegration.dev/oauth-client=true"
            ) || err
                .to_string()
                .contains("kubectl label secret gmail-client -n"),
            "{err}"
        );
        assert!(!err.to_string().contains("refresh-token-value"));
        let wrong_value = labelled(secret(pairs), &[(OAUTH_CLIENT_LABEL, "yes")]);
        assert!(matches!(
            client_credentials(&r, Some(&wrong_value)),
            Err(ClientSecretProblem::NotMarked { .. })
        ));
        // A grant Secret of the operator, even if someone adds the marking label to it.
        let grant = labelled(
            secret(pairs),
            &[(OAUTH_CLIENT_LABEL, "true"), (INTEGRATION_LABEL, "other")],
        );
        assert!(matches!(
            client_credentials(&r, Some(&grant)),
            Err(ClientSecretProblem::OperatorManaged { .. })
        ));
        assert!(client_credentials(&r, Some(&marked(pairs))).is_ok());
    }

    #[test]
    fn ownership_decides_what_is_used_and_written() {
        let mi = integration();
        let plain = secret(&[("refresh_token", b"rt")]);
        assert!(!owned_by(&plain, &mi));
        assert!(!grant_belongs_to(&plain, &mi));
        assert!(owned_by(&owned(plain.clone(), "uid-1"), &mi));
        assert!(!owned_by(&owned(plain.clone(), "uid-2"), &mi));
        assert!(!grant_belongs_to(&owned(plain.clone(), "uid-2"), &mi));
        let byo = labelled(plain.clone(), &[(INTEGRATION_LABEL, "inbox")]);
        assert!(grant_belongs_to(&byo, &mi));
        assert!(
            !owned_by(&byo, &mi),
            "brought by hand: used, and adopted on write"
        );
        let other = labelled(plain.clone(), &[(INTEGRATION_LABEL, "other")]);
        assert!(!grant_belongs_to(&other, &mi));

        let mut foreign_token = plain.clone();
        foreign_token.metadata.name = Some("t".into());
        let c = conflicts(&mi, None, Some(&foreign_token)).unwrap();
        assert_eq!(c.reason, crate::reason::Reason::TokenSecretConflict);
        assert!(c.message.contains("\"t\""), "{}", c.message);
        assert!(conflicts(&mi, None, Some(&owned(plain.clone(), "uid-1"))).is_none());
        let mut foreign_grant = plain.clone();
        foreign_grant.metadata.name = Some("inbox-oauth-grant".into());
        let c = conflicts(&mi, Some(&foreign_grant), None).unwrap();
        assert_eq!(c.reason, crate::reason::Reason::GrantSecretConflict);
        assert!(
            c.message.contains("mailintegration.dev/integration=inbox"),
            "{}",
            c.message
        );
        assert!(conflicts(&mi, Some(&byo), None).is_none());
    }

    #[test]
    fn a_grant_is_used_only_where_it_was_issued() {
        let g = grant(Some(&secret(&[
            ("refresh_token", b"rt"),
            ("account", b"A@example.com"),
            ("token_endpoint", b"https://id.example.com/token"),
            ("client_id", b"client-1"),
        ])))
        .unwrap();
        assert!(g.is_bound());
        assert_eq!(
            g.bound_elsewhere("https://id.example.com/token/", "client-1", "a@example.com"),
            None
        );
        let m = g
            .bound_elsewhere(
                "https://evil.example.com/token",
                "client-1",
                "a@example.com",
            )
            .unwrap();
        assert!(
            m.contains("https://evil.example.com/token") && m.contains("sign in again"),
            "{m}"
        );
        assert!(!m.contains("rt"), "no refresh token in the message: {m}");
        assert!(
            g.bound_elsewhere("https://id.example.com/token", "client-2", "a@example.com")
                .unwrap()
                .contains("client-1")
        );
        assert!(
            g.bound_elsewhere("https://id.example.com/token", "client-1", "b@example.com")
                .unwrap()
                .contains("b@example.com")
        );
        let byo = grant(Some(&secret(&[("refresh_token", b"rt")]))).unwrap();
        assert!(!byo.is_bound());
        assert_eq!(byo.bound_elsewhere("https://x/token", "c", "a@b"), None);
    }

    #[test]
    fn an_expiry_beyond_any_token_lifetime_is_not_trusted() {
        let far = secret(&[("access_token", b"at"), ("expiry", b"9999-12-30T00:00:00Z")]);
        assert_eq!(published_token(Some(&far), now()), None);
        let past = secret(&[
            ("access_token", b"at"),
            ("expiry", b"-009999-01-03T00:00:00Z"),
        ]);
        let t = published_token(Some(&past), now()).unwrap();
        assert!(t.expires_at < now());
    }

    fn client_ref() -> ClientSecretRef {
        ClientSecretRef {
            name: "gmail-client".into(),
            client_id_key: None,
            client_secret_key: None,
            service_account_key: None,
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
        let only_id = marked(&[("client_id", b"id")]);
        let err = client_credentials(&r, Some(&only_id)).unwrap_err();
        assert!(
            err.to_string().contains("has no key \"client_secret\""),
            "{err}"
        );
        assert!(err.to_string().contains("client-secret-key"), "{err}");
        let empty = marked(&[("client_id", b"id"), ("client_secret", b" \n")]);
        let err = client_credentials(&r, Some(&empty)).unwrap_err();
        assert!(matches!(err, ClientSecretProblem::Empty { .. }), "{err}");
        let ok = marked(&[("client_id", b"id\n"), ("client_secret", b"s3cr3t-value")]);
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
            published_token(Some(&secret(&[("access_token", b"at")])), now()),
            None
        );
        assert_eq!(
            published_token(
                Some(&secret(&[("access_token", b"at"), ("expiry", b"soon")])),
                now()
            ),
            None
        );
        let t = published_token(
            Some(&secret(&[
                ("access_token", b"at"),
                ("expiry", b"2026-11-28T10:00:00Z"),
            ])),
            now(),
        )
        .unwrap();
        assert_eq!(t.expires_at, "2026-11-28T10:00:00Z".parse().unwrap());
    }
}
