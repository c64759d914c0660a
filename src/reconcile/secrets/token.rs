//! The token Secret that workloads mount: its standard keys, the keys, labels and annotations of
//! `spec.tokenSecret.template` (rendered in the sandbox, see [`crate::reconcile::template`]), and its
//! writes.

use super::{bytes, owned_meta, rfc3339};
use crate::reconcile::context::FIELD_MANAGER;
use crate::reconcile::inflight;
use crate::reconcile::observed::{self, token_keys};
use crate::reconcile::template::{Rendered, Renderer, TokenFields, digest, keys};
use crate::{
    api::{MailIntegration, TokenSecretTemplate},
    mailbox as sasl,
    metrics::Metrics,
    oauth::TokenGrant,
};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;

/// The standard keys of the token Secret for `token`, and the values a template sees.
fn standard(
    mi: &MailIntegration,
    token: &TokenGrant,
) -> (BTreeMap<String, ByteString>, TokenFields) {
    let user = &mi.spec.mailbox.address;
    let server = crate::provider::mail_server(&mi.spec);
    let access = &token.access_token;
    let xoauth2 = sasl::xoauth2(user, access);
    let expiry = rfc3339(token.expires_at);
    let mut data: BTreeMap<String, ByteString> = [
        (token_keys::ACCESS_TOKEN, bytes(access.expose())),
        (token_keys::TOKEN_TYPE, bytes(&token.token_type)),
        (token_keys::EXPIRY, bytes(&expiry)),
        (token_keys::USERNAME, bytes(user)),
        (token_keys::XOAUTH2, bytes(xoauth2.expose())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // OAUTHBEARER names the server; without a known server (OIDC with no spec.mailbox.server) it is left out.
    let port = server
        .as_ref()
        .map(|s| u16::try_from(s.port).unwrap_or(0))
        .unwrap_or(0);
    let oauthbearer = server
        .as_ref()
        .map(|server| sasl::oauthbearer(user, &server.host, port, access));
    if let Some(ob) = &oauthbearer {
        data.insert(token_keys::OAUTHBEARER.to_owned(), bytes(ob.expose()));
    }
    let fields = TokenFields {
        access_token: access.expose().to_owned(),
        token_type: token.token_type.clone(),
        expiry,
        username: user.clone(),
        xoauth2: xoauth2.expose().to_owned(),
        oauthbearer: oauthbearer
            .as_ref()
            .map(|o| o.expose().to_owned())
            .unwrap_or_default(),
        mail_server: server.as_ref().map(|s| s.host.clone()).unwrap_or_default(),
        mail_port: port,
    };
    (data, fields)
}

/// The token Secret's content: never the refresh token or the client secret. With
/// `spec.tokenSecret.template`, its labels, annotations and `rendered` keys (see
/// [`render_template`]) are added, and the annotation saying what they were rendered from. `Err`:
/// the Secret would be larger than the operator keeps of one ([`TokenSecretError::TooLarge`] when
/// the provider's access token alone makes it so, else [`TokenSecretError::Template`]).
pub fn token_secret(
    mi: &MailIntegration,
    token: &TokenGrant,
    rendered: Rendered,
) -> Result<Secret, TokenSecretError> {
    token_secret_under(mi, token, rendered, None)
}

/// [`token_secret`] recording `under`, the write-ahead mark the token was refreshed under
/// ([`inflight::REFRESHED_UNDER_ANNOTATION`]; `None`: no mark, or the one recorded before).
fn token_secret_under(
    mi: &MailIntegration,
    token: &TokenGrant,
    rendered: Rendered,
    under: Option<String>,
) -> Result<Secret, TokenSecretError> {
    let max = crate::reconcile::cached_secret::MAX_HELD_BYTES;
    let (mut data, fields) = standard(mi, token);
    // The standard keys alone (the access token three times: as it is, in xoauth2, in
    // oauthbearer): over the bound, no template is to blame.
    let standard_held = crate::reconcile::cached_secret::held_size(
        &owned_meta(mi, &mi.spec.token_secret.name),
        Some(&data),
    );
    if standard_held > max {
        return Err(TokenSecretError::TooLarge(format!(
            "the provider issued an access token of {} bytes: the token Secret, which holds it with its xoauth2 and oauthbearer forms, would hold {standard_held} bytes, more than the {max} the operator keeps of a Secret, so it was not published (the grant is stored). Configure smaller access tokens at the provider (fewer roles, groups or claims in them), then request a refresh (kubectl mailint refresh)",
            token.access_token.expose().len()
        )));
    }
    for (k, v) in rendered {
        data.insert(k, bytes(v.expose()));
    }
    let mut metadata = owned_meta(mi, &mi.spec.token_secret.name);
    if let Some(t) = &mi.spec.token_secret.template {
        let labels = metadata.labels.get_or_insert_with(Default::default);
        for (k, v) in applied(&t.labels) {
            // The operator's own labels (ownership, the watch's selector) stay as they are.
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut annotations: BTreeMap<String, String> = applied(&t.annotations)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        annotations.insert(
            digest::DIGEST_ANNOTATION.to_owned(),
            digest::annotation(t, &fields, &data),
        );
        metadata.annotations = Some(annotations);
    }
    if let Some(under) = under {
        metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(inflight::REFRESHED_UNDER_ANNOTATION.to_owned(), under);
    }
    // The watch keeps no more of a Secret than this: a larger token Secret would not be used.
    let held = crate::reconcile::cached_secret::held_size(&metadata, Some(&data));
    if held > max {
        return Err(TokenSecretError::Template(format!(
            "the token Secret would hold {held} bytes of labels, annotations and data, more than the {max} the operator keeps of a Secret: make spec.tokenSecret.template smaller"
        )));
    }
    Ok(Secret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    })
}

/// The template's labels or annotations that are set: not one asking a Secret-mirroring
/// controller for a copy (a template with one is refused before; this holds whatever the caller),
/// nor the operator's own digest annotation (a template setting it would make every idle
/// reconcile render), nor its record of the refresh's mark (which must say only what the operator
/// refreshed under).
fn applied(map: &BTreeMap<String, String>) -> impl Iterator<Item = (&String, &String)> {
    map.iter().filter(|(k, _)| {
        keys::mirroring_controller(k).is_none()
            && k.as_str() != digest::DIGEST_ANNOTATION
            && k.as_str() != inflight::REFRESHED_UNDER_ANNOTATION
    })
}

/// The template's keys for `token`, rendered in the sandbox (none without a template). `Err`: the
/// template is refused or does not render, said without any token value.
pub async fn render_template(
    mi: &MailIntegration,
    token: &TokenGrant,
    renderer: &Renderer,
) -> Result<Rendered, String> {
    let Some(t) = &mi.spec.token_secret.template else {
        return Ok(Rendered::new());
    };
    if let Some(refused) = keys::refused(t) {
        return Err(refused);
    }
    let (_, fields) = standard(mi, token);
    renderer
        .render(
            mi.metadata.namespace.as_deref().unwrap_or_default(),
            t,
            &fields,
        )
        .await
}

/// Write the token Secret. `current` is the token Secret as cached, which must be this
/// integration's own (see [`crate::reconcile::observed::owned_by`]): when there is none it is
/// created without a read first (a first refresh costs one request, not two), so that a Secret
/// someone else made under that name fails the write (409) instead of being taken over; only then
/// is it read: this integration's own (a cache behind) is applied over, anyone else's is
/// [`TokenSecretError::Conflict`]. Else a server-side apply with the resourceVersion read as its
/// precondition. `under`: the write-ahead mark the token was refreshed under, recorded (see
/// [`inflight`]). Returns the written resourceVersion.
pub async fn write_token_secret(
    mi: &MailIntegration,
    api: &Api<Secret>,
    current: Option<&Secret>,
    (token, under): (&TokenGrant, Option<String>),
    metrics: &Metrics,
    renderer: &Renderer,
) -> Result<Option<String>, TokenSecretError> {
    let rendered = render_template(mi, token, renderer)
        .await
        .map_err(TokenSecretError::Template)?;
    let secret = token_secret_under(mi, token, rendered, under)?;
    let written = write_rendered(mi, api, current, secret, metrics).await?;
    // With spec.gateway, the gateway Secret gets the same token (the gateway never reads this
    // Secret, whose keys a template may replace).
    crate::gateway::credentials::token::publish(
        mi,
        api,
        &token.access_token,
        token.expires_at,
        metrics,
    )
    .await;
    Ok(written)
}

/// Write `secret`, the token Secret as [`token_secret`] built it, over `current` (see
/// [`write_token_secret`]).
async fn write_rendered(
    mi: &MailIntegration,
    api: &Api<Secret>,
    current: Option<&Secret>,
    mut secret: Secret,
    metrics: &Metrics,
) -> Result<Option<String>, TokenSecretError> {
    let written = match current {
        None => {
            let created = api
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &secret,
                )
                .await;
            match created {
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    metrics.count_read("token_secret");
                    let Some(found) = api.get_opt(&mi.spec.token_secret.name).await? else {
                        // Gone again in between: the next reconcile creates it.
                        return Err(kube::Error::Api(e).into());
                    };
                    if let Some(c) = observed::conflicts(mi, None, Some(&found)) {
                        return Err(TokenSecretError::Conflict(c));
                    }
                    secret.metadata.resource_version = found.metadata.resource_version;
                    api.patch(
                        &mi.spec.token_secret.name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&secret),
                    )
                    .await?
                }
                other => other?,
            }
        }
        Some(current) => {
            secret.metadata.resource_version = current.metadata.resource_version.clone();
            api.patch(
                &mi.spec.token_secret.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?
        }
    };
    metrics.count_write("token_secret");
    Ok(written.metadata.resource_version)
}

/// Re-render the token Secret from the token it holds when `spec.tokenSecret.template` or what it
/// renders from changed (no refresh is needed for that). Renders nothing when the Secret's
/// [`digest::DIGEST_ANNOTATION`] says it is what the template makes of its inputs (an idle
/// reconcile); writes only when the rendered Secret differs from `current`.
/// `Ok(Some(resourceVersion))` when it wrote.
pub async fn sync_template(
    mi: &MailIntegration,
    api: &Api<Secret>,
    current: &Secret,
    published: &crate::reconcile::observed::PublishedToken,
    metrics: &Metrics,
    renderer: &Renderer,
) -> Result<Option<Option<String>>, TokenSecretError> {
    let Some(t) = &mi.spec.token_secret.template else {
        return Ok(None);
    };
    let token_type = current
        .data
        .as_ref()
        .and_then(|d| d.get(token_keys::TOKEN_TYPE))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .unwrap_or_else(|| "Bearer".to_owned());
    let token = TokenGrant::access_only(
        published.access_token.clone(),
        token_type,
        published.expires_at,
    );
    let contains = |have: &Option<BTreeMap<String, String>>,
                    want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let recorded = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(digest::DIGEST_ANNOTATION))
        .map(String::as_str);
    let (_, fields) = standard(mi, &token);
    let no_data = BTreeMap::new();
    if digest::up_to_date(
        t,
        &fields,
        current.data.as_ref().unwrap_or(&no_data),
        recorded,
    ) {
        // Rendered from these inputs already: only labels or annotations put back by hand.
        let desired = token_secret(mi, &token, Rendered::new())?;
        if contains(&current.metadata.labels, &desired.metadata.labels)
            && contains(&current.metadata.annotations, &applied_annotations(t))
        {
            return Ok(None);
        }
    }
    let rendered = render_template(mi, &token, renderer)
        .await
        .map_err(TokenSecretError::Template)?;
    // The record of the mark stays as the refresh wrote it (an apply without it would remove it).
    let under = inflight::recorded(current).map(str::to_owned);
    let desired = token_secret_under(mi, &token, rendered, under)?;
    if desired.data == current.data
        && contains(&current.metadata.labels, &desired.metadata.labels)
        && contains(&current.metadata.annotations, &desired.metadata.annotations)
    {
        return Ok(None);
    }
    // What was rendered is written: the template is not rendered a second time for the write.
    let version = write_rendered(mi, api, Some(current), desired, metrics).await?;
    Ok(Some(version))
}

fn applied_annotations(t: &TokenSecretTemplate) -> Option<BTreeMap<String, String>> {
    Some(
        applied(&t.annotations)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// Why the token Secret was not written.
#[derive(Debug, thiserror::Error)]
pub enum TokenSecretError {
    /// `spec.tokenSecret.template` does not render (the message names the key, never a value).
    #[error("{0}")]
    Template(String),
    /// The provider's access token alone makes the token Secret larger than the operator keeps of
    /// one (`cached_secret::MAX_HELD_BYTES`).
    #[error("{0}")]
    TooLarge(String),
    /// A Secret that is not this integration's holds `spec.tokenSecret.name` (found when creating
    /// it met 409): nothing is written.
    #[error("{}", .0.message)]
    Conflict(observed::Conflict),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MailIntegrationSpec;
    use crate::secret::SecretValue;
    use jiff::Timestamp;

    fn templated(template: serde_json::Value) -> MailIntegration {
        let spec: MailIntegrationSpec = serde_json::from_value(serde_json::json!({
            "provider": "Google",
            "mailbox": {"address": "support@example.com"},
            "oauth": {"clientSecretRef": {"name": "gmail-client"}},
            "tokenSecret": {"name": "token", "template": template},
        }))
        .unwrap();
        let mut mi = MailIntegration::new("inbox", spec);
        mi.metadata.namespace = Some("mail".into());
        mi.metadata.uid = Some("u1".into());
        mi
    }

    #[test]
    fn a_templated_token_secret_records_what_it_was_rendered_from_and_sets_no_refused_key() {
        let mi = templated(serde_json::json!({
            "data": {"password": "{{ access_token }}"},
            "annotations": {
                "example.com/reload": "true",
                "reflector.v1.k8s.emberstack.com/reflection-allowed": "true",
                digest::DIGEST_ANNOTATION: "forged",
                inflight::REFRESHED_UNDER_ANNOTATION: "operator-0/aa 2026-12-01T10:00:00Z",
            },
        }));
        let t = mi.spec.token_secret.template.clone().unwrap();
        let token = TokenGrant::access_only(
            SecretValue::new("tok-1"),
            "Bearer".into(),
            Timestamp::from_second(1_900_000_000).unwrap(),
        );
        let rendered: Rendered = [("password".to_owned(), SecretValue::new("tok-1"))].into();
        let secret = token_secret(&mi, &token, rendered).unwrap();
        let annotations = secret.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.get("example.com/reload").map(String::as_str),
            Some("true")
        );
        assert!(!annotations.contains_key("reflector.v1.k8s.emberstack.com/reflection-allowed"));
        let recorded = annotations
            .get(digest::DIGEST_ANNOTATION)
            .map(String::as_str);
        assert_ne!(recorded, Some("forged"));
        // Nor can it set the record of a refresh's mark: only the operator's refresh does.
        assert!(!annotations.contains_key(inflight::REFRESHED_UNDER_ANNOTATION));
        let under = token_secret_under(
            &mi,
            &token,
            [("password".to_owned(), SecretValue::new("tok-1"))].into(),
            Some("operator-1/bb 2026-12-01T11:00:00Z".into()),
        )
        .unwrap();
        assert_eq!(
            under
                .metadata
                .annotations
                .unwrap()
                .get(inflight::REFRESHED_UNDER_ANNOTATION)
                .map(String::as_str),
            Some("operator-1/bb 2026-12-01T11:00:00Z")
        );
        // A template's own digest annotation is not one an idle reconcile looks for either (it
        // would never match, and every idle reconcile would render).
        assert!(
            !applied_annotations(&t)
                .unwrap()
                .contains_key(digest::DIGEST_ANNOTATION)
        );
        // What an idle reconcile sees: the same inputs, so no render.
        let (_, fields) = standard(&mi, &token);
        assert!(digest::up_to_date(
            &t,
            &fields,
            secret.data.as_ref().unwrap(),
            recorded
        ));
        assert!(digest::template_known_good(&t, recorded));
        // Another token: rendered again.
        let next = TokenGrant::access_only(
            SecretValue::new("tok-2"),
            "Bearer".into(),
            Timestamp::from_second(1_900_000_000).unwrap(),
        );
        let (_, fields) = standard(&mi, &next);
        assert!(!digest::up_to_date(
            &t,
            &fields,
            secret.data.as_ref().unwrap(),
            recorded
        ));
    }

    /// A provider's access token that makes the token Secret too large (it is held three times: as
    /// it is, in xoauth2 and in oauthbearer) is said as the provider's, not as a template's (main:
    /// "make spec.tokenSecret.template smaller", reason TokenTemplateInvalid, with no template).
    #[test]
    fn an_access_token_too_large_to_publish_is_the_providers_not_a_templates() {
        let token = |n: usize| {
            TokenGrant::access_only(
                SecretValue::new("a".repeat(n)),
                "Bearer".into(),
                Timestamp::from_second(1_900_000_000).unwrap(),
            )
        };
        let mut plain = templated(serde_json::json!({}));
        plain.spec.token_secret.template = None;
        let small = templated(serde_json::json!({"data": {"k": "{{ access_token }}"}}));
        for mi in [&plain, &small] {
            let e = token_secret(mi, &token(30_000), Rendered::new()).unwrap_err();
            let text = e.to_string();
            assert!(!text.contains("spec.tokenSecret.template"), "{text}");
            assert!(text.contains("access token of 30000 bytes"), "{text}");
            assert!(!text.contains(&"a".repeat(100)), "the token is not quoted");
            let outcome = crate::reconcile::refresh::not_publishable(&e);
            assert!(
                matches!(&outcome, Some(crate::reconcile::decide::Outcome::PermanentFailure { reason, .. }) if reason.as_str() == "SecretTooLarge"),
                "{outcome:?}"
            );
        }
        // A template that adds what goes over the bound is the template's.
        let rendered: Rendered = [("k".to_owned(), SecretValue::new("b".repeat(40_000)))].into();
        let e = token_secret(&small, &token(10_000), rendered).unwrap_err();
        assert!(matches!(e, TokenSecretError::Template(_)), "{e}");
        assert!(token_secret(&plain, &token(10_000), Rendered::new()).is_ok());
    }
}
