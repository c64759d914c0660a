//! Writes of the Secrets the operator owns: the grant (refresh token) and the token Secret that
//! workloads mount. Both carry an ownerReference to their MailIntegration and the managed-by label.

use super::context::FIELD_MANAGER;
use super::observed::grant_keys;
use crate::{
    api::{
        GrantDeletionPolicy, INTEGRATION_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailIntegration,
    },
    metrics::Metrics,
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

pub mod owner;
mod token;
pub use token::{
    TokenSecretError, render_template, sync_template, token_secret, write_token_secret,
};

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

/// `spec.grantDeletionPolicy` on a grant Secret's ownerReferences: Delete adds `ours` (the
/// integration's controller reference), Retain takes any reference to the integration away; other
/// owners stay. Returns whether it changed anything.
pub fn set_grant_owner(
    s: &mut Secret,
    mi: &MailIntegration,
    ours: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
) -> bool {
    let owners = s.metadata.owner_references.get_or_insert_with(Vec::new);
    let before = owners.len();
    let mut changed = false;
    match mi.spec.grant_deletion_policy() {
        GrantDeletionPolicy::Delete => {
            for o in ours {
                if !owners.iter().any(|x| x.uid == o.uid) {
                    owners.push(o);
                    changed = true;
                }
            }
        }
        GrantDeletionPolicy::Retain => {
            let uid = mi.uid();
            owners.retain(|o| Some(&o.uid) != uid.as_ref());
            changed = owners.len() != before;
        }
    }
    if owners.is_empty() {
        s.metadata.owner_references = None;
    }
    changed
}

/// The grant Secret after a sign-in or a rotation: `base` (the current Secret, possibly brought by
/// hand) with the new values, our label added, our ownerReference as `spec.grantDeletionPolicy`
/// says, and everything else kept.
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
    set_grant_owner(&mut s, mi, meta.owner_references.unwrap_or_default());
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
    // A JSON merge patch of the mark alone, not a copy of the cached Secret put back: the cache
    // holds neither finalizers nor kubectl's last-applied annotation, and other writers' fields
    // stay as they are. The resourceVersion in the patch is the precondition (409 on a change).
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": current.metadata.resource_version,
            "annotations": {
                super::inflight::REFRESH_IN_FLIGHT_ANNOTATION: mark.value(),
            },
        },
    });
    let written = api
        .patch(
            &current.name_any(),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
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
    /// The grant Secret is gone: someone deleted it (to end the grant, or a GitOps prune) while
    /// the refresh was in flight or its token held in memory. The operator does not create a grant
    /// Secret from memory: the token is dropped, and the integration asks for a sign-in.
    Deleted,
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
/// [`STORE_DEADLINE`]. A grant Secret that is gone is not created again ([`StoreError::Deleted`]).
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
    let deadline = now
        .checked_add(super::inflight::scaled(STORE_DEADLINE))
        .unwrap_or(now);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut last = String::from("no attempt finished in time");
    loop {
        // Only a grant Secret that exists is written: one that went away is not brought back.
        let Some(current) = base.as_ref() else {
            warn!(secret = %name, "the grant Secret was deleted; the refreshed token is dropped, not written into a new one");
            return Err(StoreError::Deleted);
        };
        let desired = grant_secret(mi, Some(current), new_token, &keys);
        let write = api.replace(&name, &pp, &desired);
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
