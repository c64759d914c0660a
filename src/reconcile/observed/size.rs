//! Secrets over the bound the operator keeps of one (`cached_secret::MAX_HELD_BYTES`): not used,
//! and said by name on the integration that names them.

use super::{ClientCredentials, ClientSecretProblem, Conflict, client};
use crate::api::MailIntegrationSpec;
use crate::reconcile::cached_secret::{Held, MAX_HELD_BYTES};

/// The condition message of a Secret over the bound, named by `field`.
pub fn too_large_message(name: &str, field: &str, bytes: usize) -> String {
    format!(
        "Secret {name:?} (named by {field}) holds {bytes} bytes of labels, annotations and data, more than the {MAX_HELD_BYTES} the operator keeps of a Secret: it is not used. Keep only what the integration needs in it (a client ID and secret, a certificate and key, a CA bundle)"
    )
}

/// A grant or token Secret over the bound: neither used nor written.
pub fn too_large(held: &Held) -> Option<Conflict> {
    let (name, bytes) = held.too_large()?;
    Some(Conflict {
        reason: crate::reason::Reason::SecretTooLarge,
        message: format!(
            "Secret {name:?} (this integration's grant or token Secret, labelled {label}) holds {bytes} bytes of labels, annotations and data, more than the {MAX_HELD_BYTES} the operator keeps of a Secret: it is neither used nor written. Delete it (the operator recreates its own), or bring a grant with only its refresh token",
            label = crate::api::INTEGRATION_LABEL,
        ),
    })
}

/// [`client`] over what the caches hold: a marked client Secret or certificate over the bound is
/// `ClientSecretTooLarge`, and nothing of it is looked at.
pub fn client_held(
    spec: &MailIntegrationSpec,
    client_secret: Option<&Held>,
    certificate: Option<&Held>,
) -> Result<ClientCredentials, ClientSecretProblem> {
    let fields = [
        (client_secret, "spec.oauth.clientSecretRef"),
        (certificate, "spec.oauth.clientCertificateRef"),
    ];
    for (held, field) in fields {
        if let Some((name, bytes)) = held.and_then(Held::too_large) {
            return Err(ClientSecretProblem::TooLarge {
                message: too_large_message(name, field, bytes),
            });
        }
    }
    client(
        spec,
        client_secret.and_then(Held::secret),
        certificate.and_then(Held::secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big(name: &str) -> Held {
        Held::TooLarge {
            name: name.into(),
            bytes: MAX_HELD_BYTES + 1,
            resource_version: Some("7".into()),
        }
    }

    #[test]
    fn a_client_secret_over_the_bound_is_said_by_name_with_the_limit() {
        let spec: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
            "provider": "Google", "mailbox": {"address": "a@example.test"},
            "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}
        }))
        .unwrap();
        let err = client_held(&spec, Some(&big("c")), None).unwrap_err();
        assert_eq!(err.reason(), crate::reason::Reason::ClientSecretTooLarge);
        let text = err.to_string();
        assert!(
            text.contains("\"c\"") && text.contains(&MAX_HELD_BYTES.to_string()),
            "{text}"
        );
        assert!(text.contains("spec.oauth.clientSecretRef"), "{text}");
    }

    #[test]
    fn a_grant_or_token_secret_over_the_bound_is_a_conflict_naming_it() {
        let c = too_large(&big("inbox-oauth-grant")).unwrap();
        assert_eq!(c.reason, crate::reason::Reason::SecretTooLarge);
        assert!(c.message.contains("inbox-oauth-grant"), "{}", c.message);
        assert!(too_large(&Held::Secret(Default::default())).is_none());
    }
}
