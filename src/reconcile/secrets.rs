//! Writes of the Secrets the operator owns: the grant (refresh token) and the token Secret that
//! workloads mount. Both carry an ownerReference to their MailIntegration and the managed-by label.

use super::controller::FIELD_MANAGER;
use super::observed::{grant_keys, token_keys};
use super::template::{Rendered, Renderer, TokenFields, digest, keys};
use crate::{
    api::{
        INTEGRATION_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailIntegration, TokenSecretTemplate,
    },
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
use tracing::{debug, info, warn};

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
/// the Secret would be larger than the operator keeps of one.
pub fn token_secret(
    mi: &MailIntegration,
    token: &TokenGrant,
    rendered: Rendered,
) -> Result<Secret, String> {
    let (mut data, fields) = standard(mi, token);
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
    // The watch keeps no more of a Secret than this: a larger token Secret would not be used.
    let held = super::cached_secret::held_size(&metadata, Some(&data));
    if held > super::cached_secret::MAX_HELD_BYTES {
        return Err(format!(
            "the token Secret would hold {held} bytes of labels, annotations and data, more than the {} the operator keeps of a Secret: make spec.tokenSecret.template smaller",
            super::cached_secret::MAX_HELD_BYTES
        ));
    }
    Ok(Secret {
        metadata,
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    })
}

/// The template's labels or annotations that are set: not one asking a Secret-mirroring
/// controller for a copy (a template with one is refused before; this holds whatever the caller).
fn applied(map: &BTreeMap<String, String>) -> impl Iterator<Item = (&String, &String)> {
    map.iter()
        .filter(|(k, _)| keys::mirroring_controller(k).is_none())
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
    renderer.render(t, &fields).await
}

/// Write the token Secret. `current` is the token Secret as read, which must be this integration's
/// own (see [`super::observed::owned_by`]): when there was none it is created, so that a Secret
/// someone made meanwhile under that name fails the write (409) instead of being taken over; else a
/// server-side apply with the resourceVersion read as its precondition. Returns the written
/// resourceVersion.
pub async fn write_token_secret(
    mi: &MailIntegration,
    api: &Api<Secret>,
    current: Option<&Secret>,
    token: &TokenGrant,
    metrics: &Metrics,
    renderer: &Renderer,
) -> Result<Option<String>, TokenSecretError> {
    let rendered = render_template(mi, token, renderer)
        .await
        .map_err(TokenSecretError::Template)?;
    let mut secret = token_secret(mi, token, rendered).map_err(TokenSecretError::Template)?;
    let written = match current {
        None => {
            api.create(
                &PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &secret,
            )
            .await?
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
    published: &super::observed::PublishedToken,
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
        let desired =
            token_secret(mi, &token, Rendered::new()).map_err(TokenSecretError::Template)?;
        if contains(&current.metadata.labels, &desired.metadata.labels)
            && contains(&current.metadata.annotations, &applied_annotations(t))
        {
            return Ok(None);
        }
    }
    let rendered = render_template(mi, &token, renderer)
        .await
        .map_err(TokenSecretError::Template)?;
    let desired = token_secret(mi, &token, rendered).map_err(TokenSecretError::Template)?;
    if desired.data == current.data
        && contains(&current.metadata.labels, &desired.metadata.labels)
        && contains(&current.metadata.annotations, &desired.metadata.annotations)
    {
        return Ok(None);
    }
    let version = write_token_secret(mi, api, Some(current), &token, metrics, renderer).await?;
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
    #[error(transparent)]
    Kube(#[from] kube::Error),
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
    // A new grant, or the end of the refresh that marked it: the write-ahead mark goes.
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.remove(super::inflight::REFRESH_IN_FLIGHT_ANNOTATION);
    }
    s
}

/// How long a refresh keeps retrying the write of the grant after the provider answered, before
/// it reports [`StoreError::NotStored`] (and keeps the token in memory for the next reconcile).
/// Shorter than the drain deadline of a stopping operator, so an in-flight refresh finishes its
/// write (or says it could not) before the process exits.
pub const STORE_DEADLINE: Duration = Duration::from_secs(20);

/// The grant Secret with the write-ahead mark of a refresh about to start (see
/// [`super::inflight`]), written with `current`'s resourceVersion as precondition: a 409 means
/// someone else wrote the grant since it was read. Returns the Secret as written (its new
/// resourceVersion is the precondition of the store that follows the provider's answer).
pub async fn write_mark(
    api: &Api<Secret>,
    current: &Secret,
    mark: &super::inflight::Mark,
    metrics: &Metrics,
) -> Result<Secret, kube::Error> {
    let mut marked = current.clone();
    marked
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            super::inflight::REFRESH_IN_FLIGHT_ANNOTATION.to_owned(),
            mark.value(),
        );
    marked.metadata.managed_fields = None;
    let written = api
        .replace(
            &current.name_any(),
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &marked,
        )
        .await?;
    metrics.count_write("grant_secret");
    Ok(written)
}

/// How a grant write after a refresh ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The new refresh token is in the grant Secret (resourceVersion after the write).
    Stored(Option<String>),
    /// Someone stored another refresh token meanwhile (a sign-in): the newer grant is kept and
    /// this refresh's token dropped — it belongs to the grant that sign-in replaced.
    Superseded,
}

/// Why a grant write after a refresh did not land.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Nothing can ever store it there (immutable Secret, namespace being deleted): report and stop.
    GiveUp {
        reason: crate::reason::Reason,
        message: String,
    },
    /// Not now (API server unreachable, refused by RBAC, a webhook or a quota...): keep the token
    /// in memory and try again.
    NotStored { message: String },
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

/// Errors after which retrying cannot help.
fn give_up(e: &kube::Error, name: &str) -> Option<StoreError> {
    let kube::Error::Api(s) = e else {
        return None;
    };
    if s.code == 422 && s.message.contains("immutable") {
        return Some(StoreError::GiveUp {
            reason: crate::reason::Reason::GrantSecretImmutable,
            message: format!(
                "the grant Secret {name:?} is immutable, so the provider's new refresh token cannot be stored in it ({}): delete the Secret and sign in again (status.signIn.url)",
                s.message
            ),
        });
    }
    if s.code == 403 && s.message.contains("being terminated") {
        return Some(StoreError::GiveUp {
            reason: crate::reason::Reason::NamespaceTerminating,
            message: format!(
                "the namespace is being deleted, so the grant Secret {name:?} cannot be written ({})",
                s.message
            ),
        });
    }
    None
}

/// Store the grant after the provider answered a refresh: `new_token` (rotated, or the same one
/// with the grant's binding in `extra`) into the grant Secret, removing the write-ahead mark.
///
/// `base` is the grant Secret as last read or written; its resourceVersion is the precondition, so
/// nothing is overwritten blindly. On a conflict the Secret is read again: if it now holds a
/// refresh token other than `presented` (the one this refresh sent) and other than `new_token`, a
/// sign-in replaced the grant meanwhile and wins ([`Stored::Superseded`]); otherwise the new token
/// goes on top of what is there. Other failures are retried with jittered backoff for
/// [`STORE_DEADLINE`].
#[allow(clippy::too_many_arguments)]
pub async fn store_after_refresh(
    mi: &MailIntegration,
    api: &Api<Secret>,
    base: Option<&Secret>,
    presented: &SecretValue,
    new_token: &SecretValue,
    rotated: bool,
    extra: &[(&str, String)],
    metrics: &Metrics,
) -> Result<Stored, StoreError> {
    let name = mi.grant_secret_name();
    let mut base = base.cloned();
    let mut delay = Duration::from_millis(200);
    let mut keys: Vec<(&str, String)> = extra.to_vec();
    if rotated {
        keys.push((grant_keys::ROTATED_AT, rfc3339(Timestamp::now())));
    }
    let now = tokio::time::Instant::now();
    let deadline = now.checked_add(STORE_DEADLINE).unwrap_or(now);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut last = String::from("no attempt finished in time");
    loop {
        let desired = grant_secret(mi, base.as_ref(), new_token, &keys);
        let write = async {
            match &base {
                Some(_) => api.replace(&name, &pp, &desired).await,
                None => api.create(&pp, &desired).await,
            }
        };
        let result = tokio::time::timeout_at(deadline, write).await;
        let conflict = match result {
            Err(_elapsed) => {
                return Err(StoreError::NotStored {
                    message: format!("writing Secret {name:?} did not finish in time ({last})"),
                });
            }
            Ok(Ok(written)) => {
                metrics.count_write("grant_secret");
                info!(rotated, "stored the grant");
                return Ok(Stored::Stored(written.metadata.resource_version));
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 || s.code == 404 => {
                debug!(code = s.code, secret = %name, "the grant Secret changed since it was read; reading it again");
                true
            }
            Ok(Err(e)) => {
                if let Some(stop) = give_up(&e, &name) {
                    return Err(stop);
                }
                last = describe(&e);
                warn!(error = %last, retry_in_ms = delay.as_millis() as u64, "storing the grant failed; retrying");
                false
            }
        };
        if !conflict {
            let jittered = delay.mul_f64(rand::random_range(0.8..1.2));
            if tokio::time::timeout_at(deadline, tokio::time::sleep(jittered))
                .await
                .is_err()
            {
                return Err(StoreError::NotStored {
                    message: format!("could not write Secret {name:?}: {last}"),
                });
            }
            delay = delay.saturating_mul(2).min(Duration::from_secs(5));
        }
        // Read it again: someone else wrote it (409), it went away (404), or the last attempt
        // failed and the Secret may have changed meanwhile.
        match tokio::time::timeout_at(deadline, api.get_opt(&name)).await {
            Err(_elapsed) => {
                return Err(StoreError::NotStored {
                    message: format!("could not read Secret {name:?} again: timed out ({last})"),
                });
            }
            Ok(Err(e)) => {
                last = describe(&e);
                continue;
            }
            Ok(Ok(fresh)) => {
                if let Some(f) = fresh.as_ref() {
                    if !super::observed::grant_belongs_to(f, mi) {
                        return Err(StoreError::NotStored {
                            message: format!(
                                "Secret {name:?} was replaced by one that is not this integration's grant; the operator does not write into it"
                            ),
                        });
                    }
                    let stored = super::observed::grant(Some(f)).map(|g| g.refresh_token);
                    if stored.as_ref() == Some(new_token) {
                        // Already there (an earlier attempt landed, its answer was lost).
                        if super::inflight::mark_of(f).is_none() {
                            return Ok(Stored::Stored(f.metadata.resource_version.clone()));
                        }
                    } else if stored.as_ref().is_some_and(|t| t != presented) {
                        info!(secret = %name, "a sign-in stored a new grant during the refresh; keeping it");
                        return Ok(Stored::Superseded);
                    }
                }
                base = fresh;
            }
        }
    }
}
