//! Labels and annotations of `spec.tokenSecret.template` that ask a Secret-mirroring controller to
//! copy the token Secret — with its live access token — into other namespaces or clusters. Whoever
//! may edit a MailIntegration would otherwise be able to publish the token where the namespace's
//! RBAC does not reach. Refused in the CRD (CEL, [`cel_rule`]) and here, for objects stored before
//! the rule.
//!
//! The prefixes are those the controllers document (each controller reads every key under its
//! prefix): a controller not listed here that copies Secrets by annotation is the cluster admin's
//! to restrict (its own allow-lists, or a policy engine).

use crate::api::TokenSecretTemplate;

/// Annotation/label prefixes (up to and including the `/`) of controllers that copy Secrets
/// between namespaces, with the controller's name.
pub const MIRRORING_PREFIXES: &[(&str, &str)] = &[
    // emberstack/kubernetes-reflector: reflection-allowed(-namespaces), reflection-auto-enabled,
    // reflection-auto-namespaces, reflects.
    ("reflector.v1.k8s.emberstack.com/", "Reflector"),
    // mittwald/kubernetes-replicator: replicate-to, replicate-to-matching, replication-allowed,
    // replication-allowed-namespaces, replicate-from.
    ("replicator.v1.mittwald.de/", "kubernetes-replicator"),
    // AppsCode kubed and its successor Config Syncer: sync, sync-contexts.
    ("kubed.appscode.com/", "kubed / Config Syncer"),
    // Synator: sync, include-namespaces, exclude-namespaces.
    ("synator/", "Synator"),
    // Replizieren: replicate, replicate-all.
    ("replizieren.dev/", "Replizieren"),
    // replik8or: replication-allowed, desired-namespaces.
    ("replik8or.c0deltin.dev/", "replik8or"),
    // kube-syncer: auto, label.
    ("kube-syncer/", "kube-syncer"),
    // secret-sync-operator: replicate, replicate-to.
    ("secretsync.ibm.com/", "secret-sync-operator"),
];

/// The mirroring controller a label or annotation key speaks to, if any.
pub fn mirroring_controller(key: &str) -> Option<&'static str> {
    MIRRORING_PREFIXES
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .map(|(_, name)| *name)
}

/// The first refused key of `t`, as a message naming it and why.
pub fn refused(t: &TokenSecretTemplate) -> Option<String> {
    [("labels", &t.labels), ("annotations", &t.annotations)]
        .into_iter()
        .flat_map(|(field, map)| map.keys().map(move |k| (field, k)))
        .find_map(|(field, key)| {
            mirroring_controller(key).map(|controller| {
                format!(
                    "spec.tokenSecret.template.{field}[{key:?}] asks {controller} to copy the token Secret into other namespaces; the operator does not set such keys on a Secret holding a live token (remove it, and give the workload that needs the token its own MailIntegration in its namespace)"
                )
            })
        })
}

/// The CEL expression (over a map of labels or annotations) that refuses the same keys.
pub fn cel_rule() -> String {
    let prefixes = MIRRORING_PREFIXES
        .iter()
        .map(|(p, _)| format!("k.startsWith('{p}')"))
        .collect::<Vec<_>>()
        .join(" || ");
    format!("!self.exists(k, {prefixes})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirroring_keys_are_refused_with_the_controller_named() {
        let mut t = TokenSecretTemplate::default();
        t.labels
            .insert("app.kubernetes.io/part-of".into(), "x".into());
        t.annotations
            .insert("argocd.argoproj.io/sync-wave".into(), "1".into());
        assert_eq!(refused(&t), None);
        for (key, controller) in [
            (
                "reflector.v1.k8s.emberstack.com/reflection-allowed",
                "Reflector",
            ),
            (
                "replicator.v1.mittwald.de/replicate-to",
                "kubernetes-replicator",
            ),
            ("kubed.appscode.com/sync", "kubed"),
        ] {
            let mut bad = t.clone();
            bad.annotations.insert(key.into(), "true".into());
            let e = refused(&bad).unwrap();
            assert!(e.contains(key) && e.contains(controller), "{e}");
            let mut bad = t.clone();
            bad.labels.insert(key.into(), "true".into());
            assert!(refused(&bad).unwrap().contains("template.labels"));
        }
    }

    #[test]
    fn the_crd_refuses_the_same_keys() {
        assert_eq!(crate::api::MIRRORING_RULE, cel_rule());
    }
}
