//! `spec.grantDeletionPolicy` on a grant Secret that is already there: Delete gives it this
//! integration's ownerReference (the garbage collector deletes it with the integration), Retain
//! takes it away (it stays, for a re-created integration of the same name, like cert-manager's
//! Secrets without `--enable-certificate-owner-ref`). Without an ownerReference nothing, not even
//! a foreground deletion (`kubectl delete --cascade=foreground`, Argo CD's prune), takes it along.

use super::super::{
    cache,
    context::{Context, FIELD_MANAGER},
    error::Error,
};
use crate::api::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailIntegration};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use tracing::info;

/// The ownerReferences `grant` should carry for `mi`, when they differ from what it carries. Only a
/// grant the operator wrote (its managed-by label) is changed here: a grant brought by hand becomes
/// the operator's with the first write of a new token (see [`super::grant_secret`]). Retain takes
/// the reference away at once. Delete adds it to a grant without one (kept by a deleted integration
/// of the same name, or under Retain before) only once the integration is Ready: its token came
/// from this grant through the binding check (same token endpoint, client and mailbox), so a kept
/// grant of another client is never adopted (and deleted with an integration that cannot use it).
pub fn wanted_owners(
    grant: &Secret,
    mi: &MailIntegration,
) -> Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>> {
    let managed = grant
        .labels()
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY_VALUE);
    if !managed {
        return None;
    }
    let ready = mi.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == crate::api::condition::READY && c.status == "True")
    });
    if mi.spec.grant_deletion_policy() == crate::api::GrantDeletionPolicy::Delete && !ready {
        return None;
    }
    let mut wanted = grant.clone();
    let ours = mi.controller_owner_ref(&()).into_iter().collect();
    super::set_grant_owner(&mut wanted, mi, ours)
        .then(|| wanted.metadata.owner_references.unwrap_or_default())
}

/// Bring `grant`'s ownerReferences in line with the policy. Returns whether it wrote (the write's
/// watch event brings the next reconcile). An optimistic-concurrency patch: a grant written since
/// the cache saw it (409) is left for that next reconcile.
pub async fn sync(
    mi: &MailIntegration,
    grant: &Secret,
    api: &Api<Secret>,
    ctx: &Context,
) -> Result<bool, Error> {
    let Some(owners) = wanted_owners(grant, mi) else {
        return Ok(false);
    };
    // A merge patch of the ownerReferences alone (the cache does not hold every field of the
    // Secret, so no replace): it replaces the whole list (null removes it), and the cached
    // resourceVersion makes it fail (409) rather than drop an owner someone added meanwhile.
    let owners_json = if owners.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::to_value(&owners).map_err(|e| Error::Panicked(e.to_string()))?
    };
    let patch = serde_json::json!({
        "metadata": {"ownerReferences": owners_json, "resourceVersion": grant.resource_version()}
    });
    let written = match api
        .patch(
            &grant.name_any(),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(w) => w,
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(true),
        Err(e) => return Err(e.into()),
    };
    ctx.metrics.count_write("grant_secret");
    ctx.written.set(
        &mi.uid().unwrap_or_default(),
        cache::Kind::Grant,
        written.resource_version(),
    );
    info!(
        secret = %grant.name_any(),
        policy = ?mi.spec.grant_deletion_policy(),
        owned = !owners.is_empty(),
        "the grant Secret's ownerReference follows spec.grantDeletionPolicy"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GrantDeletionPolicy;

    fn integration(policy: Option<GrantDeletionPolicy>, uid: &str) -> MailIntegration {
        let mut mi = not_ready(policy, uid);
        mi.status = Some(
            serde_json::from_value(serde_json::json!({"conditions": [{"type": "Ready",
                "status": "True", "reason": "Refreshed", "message": "",
                "lastTransitionTime": "2026-12-01T00:00:00Z"}]}))
            .unwrap(),
        );
        mi
    }

    fn not_ready(policy: Option<GrantDeletionPolicy>, uid: &str) -> MailIntegration {
        let mut mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "team", "uid": uid},
            "spec": {"provider": "Google", "mailbox": {"address": "a@example.test"},
                "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}}
        }))
        .unwrap();
        mi.spec.grant_deletion_policy = policy;
        mi
    }

    fn grant(managed: bool, owner_uids: &[&str]) -> Secret {
        let mut labels = serde_json::json!({"mailintegration.dev/integration": "inbox"});
        if managed {
            labels[MANAGED_BY_LABEL] = MANAGED_BY_VALUE.into();
        }
        let owners: Vec<_> = owner_uids
            .iter()
            .map(|u| serde_json::json!({"apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration", "name": "inbox", "uid": u, "controller": true}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "inbox-oauth-grant", "labels": labels, "ownerReferences": owners}
        }))
        .unwrap()
    }

    fn uids(
        o: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
    ) -> Option<Vec<String>> {
        o.map(|v| v.into_iter().map(|r| r.uid).collect())
    }

    #[test]
    fn the_grants_owner_follows_the_policy() {
        let delete = integration(Some(GrantDeletionPolicy::Delete), "u1");
        let retain = integration(Some(GrantDeletionPolicy::Retain), "u1");
        let default = integration(None, "u1");
        // Delete (and the default): an operator-written grant without our reference gains it.
        assert_eq!(
            uids(wanted_owners(&grant(true, &[]), &delete)),
            Some(vec!["u1".into()])
        );
        assert_eq!(
            uids(wanted_owners(&grant(true, &[]), &default)),
            Some(vec!["u1".into()])
        );
        assert_eq!(uids(wanted_owners(&grant(true, &["u1"]), &delete)), None);
        // A grant kept from an integration of the same name that was deleted is adopted once the
        // new one is Ready with it (it passed the binding check), not before.
        assert_eq!(
            uids(wanted_owners(&grant(true, &[]), &integration(None, "u2"))),
            Some(vec!["u2".into()])
        );
        assert_eq!(
            uids(wanted_owners(&grant(true, &[]), &not_ready(None, "u2"))),
            None
        );
        assert_eq!(
            uids(wanted_owners(
                &grant(true, &["u2"]),
                &not_ready(Some(GrantDeletionPolicy::Retain), "u2")
            )),
            Some(vec![]),
            "Retain does not wait"
        );
        // Retain: our reference goes, and only ours.
        assert_eq!(
            uids(wanted_owners(&grant(true, &["u1"]), &retain)),
            Some(vec![])
        );
        assert_eq!(
            uids(wanted_owners(&grant(true, &["x", "u1"]), &retain)),
            Some(vec!["x".into()])
        );
        assert_eq!(uids(wanted_owners(&grant(true, &[]), &retain)), None);
        // A grant brought by hand is the operator's only from its first write.
        assert_eq!(uids(wanted_owners(&grant(false, &[]), &delete)), None);
        assert_eq!(uids(wanted_owners(&grant(false, &["u1"]), &retain)), None);
        // revokeOnDelete without a policy never keeps the grant, whatever the operator's default.
        let mut revoking = integration(None, "u1");
        revoking.spec.revoke_on_delete = Some(true);
        assert_eq!(
            revoking.spec.grant_deletion_policy(),
            GrantDeletionPolicy::Delete
        );
    }

    #[test]
    fn a_new_grant_is_owned_only_under_delete() {
        let rt = crate::secret::SecretValue::from("rt".to_owned());
        let owned = super::super::grant_secret(&integration(None, "u1"), None, &rt, &[]);
        assert_eq!(
            owned.metadata.owner_references.map(|o| o.len()),
            Some(1),
            "Delete: the grant goes with the integration"
        );
        let kept = super::super::grant_secret(
            &integration(Some(GrantDeletionPolicy::Retain), "u1"),
            Some(&grant(true, &["u1"])),
            &rt,
            &[],
        );
        assert_eq!(kept.metadata.owner_references, None, "Retain: no owner");
        assert_eq!(
            kept.labels()
                .get("mailintegration.dev/integration")
                .map(String::as_str),
            Some("inbox"),
            "the label that lets an integration of the same name use it again"
        );
    }
}
