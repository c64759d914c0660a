//! What a token Secret was rendered from, so that an idle reconcile renders nothing when nothing
//! changed. The token Secret carries the annotation [`DIGEST_ANNOTATION`] =
//! `<template digest>/<content digest>`: SHA-256 of the template, and SHA-256 of that with the
//! token's fields and every key the Secret holds. An idle reconcile recomputes it from the Secret
//! as it is and the spec; only when it differs (the template, the mailbox or mail server, the
//! token, or a key edited by hand) is the template rendered again. The template digest alone tells
//! a refresh that this template already rendered with real values, so it is not checked again.
//!
//! The digest is one-way: it carries no value of the Secret (which holds the token itself anyway).

use super::TokenFields;
use crate::api::TokenSecretTemplate;
use k8s_openapi::ByteString;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

/// The annotation on the token Secret saying what its template keys were rendered from.
pub const DIGEST_ANNOTATION: &str = "mailintegration.dev/template-digest";

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Length-prefixed, so that no two different inputs hash the same bytes.
pub(crate) fn feed(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u64).to_be_bytes());
    h.update(part);
}

/// SHA-256 of the template (its data, labels and annotations), hex.
pub fn template_digest(t: &TokenSecretTemplate) -> String {
    let mut h = Sha256::new();
    feed(&mut h, b"template/v1");
    for map in [&t.data, &t.labels, &t.annotations] {
        feed(&mut h, &(map.len() as u64).to_be_bytes());
        for (k, v) in map {
            feed(&mut h, k.as_bytes());
            feed(&mut h, v.as_bytes());
        }
    }
    hex(&h.finalize())
}

/// The annotation's value for a token Secret holding `data`, rendered from `t` with `fields`.
pub fn annotation(
    t: &TokenSecretTemplate,
    fields: &TokenFields,
    data: &BTreeMap<String, ByteString>,
) -> String {
    let template = template_digest(t);
    let mut h = Sha256::new();
    feed(&mut h, b"content/v1");
    feed(&mut h, template.as_bytes());
    for f in [
        &fields.access_token,
        &fields.token_type,
        &fields.expiry,
        &fields.username,
        &fields.xoauth2,
        &fields.oauthbearer,
        &fields.mail_server,
    ] {
        feed(&mut h, f.as_bytes());
    }
    feed(&mut h, &fields.mail_port.to_be_bytes());
    feed(&mut h, &(data.len() as u64).to_be_bytes());
    for (k, v) in data {
        feed(&mut h, k.as_bytes());
        feed(&mut h, &v.0);
    }
    format!("{template}/{}", hex(&h.finalize()))
}

/// Whether `t` already rendered with real values into the Secret annotated `recorded`.
pub fn template_known_good(t: &TokenSecretTemplate, recorded: Option<&str>) -> bool {
    recorded
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(template, _)| template == template_digest(t))
}

/// Whether the Secret holding `data`, annotated `recorded`, is what `t` renders with `fields`
/// (without rendering it).
pub fn up_to_date(
    t: &TokenSecretTemplate,
    fields: &TokenFields,
    data: &BTreeMap<String, ByteString>,
    recorded: Option<&str>,
) -> bool {
    recorded == Some(annotation(t, fields, data).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: &[(&str, &str)]) -> TokenSecretTemplate {
        TokenSecretTemplate {
            data: data
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn any_change_of_what_was_rendered_shows() {
        let template = t(&[("k", "{{ access_token }}")]);
        let fields = TokenFields::placeholders();
        let written = data(&[("k", "tok"), ("access_token", "tok")]);
        let a = annotation(&template, &fields, &written);
        assert!(up_to_date(&template, &fields, &written, Some(&a)));
        assert!(template_known_good(&template, Some(&a)));
        // The template, a field, a key written, or nothing recorded.
        let other = t(&[("k", "{{ access_token }} ")]);
        assert!(!up_to_date(&other, &fields, &written, Some(&a)));
        assert!(!template_known_good(&other, Some(&a)));
        let mut moved = fields.clone();
        moved.mail_port = 143;
        assert!(!up_to_date(&template, &moved, &written, Some(&a)));
        let edited = data(&[("k", "tok2"), ("access_token", "tok")]);
        assert!(!up_to_date(&template, &fields, &edited, Some(&a)));
        assert!(!up_to_date(&template, &fields, &written, None));
        assert!(!template_known_good(&template, Some("garbage")));
        // Labels and annotations are part of the template.
        let mut labelled = template.clone();
        labelled.labels.insert("team".into(), "a".into());
        assert!(!template_known_good(&labelled, Some(&a)));
    }

    #[test]
    fn no_value_is_readable_from_it() {
        let fields = TokenFields {
            access_token: "SECRET-TOKEN-VALUE".into(),
            ..TokenFields::placeholders()
        };
        let a = annotation(&t(&[]), &fields, &data(&[("k", "SECRET-TOKEN-VALUE")]));
        assert!(!a.contains("SECRET"));
        assert_eq!(a.len(), 129);
    }
}
