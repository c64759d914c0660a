//! The Secrets of the operator's caches, in the form they are kept for the life of the process.
//!
//! A `k8s_openapi` Secret is built for every field the API may send: its `ObjectMeta` alone is
//! about half a kilobyte before any value, each map costs a B-tree node of about half a kilobyte
//! whatever it holds, and a store keyed by `ObjectRef` copies the UID and resourceVersion into
//! every key. At 10,000 integrations (a grant and a token Secret each) that was most of the
//! operator's memory. A [`CachedSecret`] keeps only what a reconcile reads (name, namespace,
//! resourceVersion, UID, type, immutability, labels, annotations, ownerReferences and data) in
//! boxed slices, and is turned back into a `Secret` when a reconcile looks it up.
//!
//! kube-runtime's `reflector` stores the type its watch yields; [`reflector`] here is the same loop
//! with the projection in between, so that the watch still hands full Secrets to the controller's
//! triggers while the store keeps the compact form.

use crate::api::LAST_APPLIED_ANNOTATION as LAST_APPLIED;
use futures::{Stream, TryStreamExt as _};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::runtime::{
    reflector::{Lookup, store::Writer},
    watcher,
};
use std::{borrow::Cow, collections::BTreeMap};

type Pairs<V> = Box<[(Box<str>, V)]>;

/// A Secret as the caches hold it (see the module's text). Its `Debug` names the data keys only.
#[derive(Clone, PartialEq)]
pub struct CachedSecret {
    name: Box<str>,
    namespace: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    uid: Option<Box<str>>,
    type_: Option<Box<str>>,
    immutable: Option<bool>,
    labels: Pairs<Box<str>>,
    /// Without kubectl's last-applied copy, which is never read.
    annotations: Pairs<Box<str>>,
    owner_references: Box<[OwnerReference]>,
    data: Pairs<Box<[u8]>>,
}

fn boxed(s: &Option<String>) -> Option<Box<str>> {
    s.as_deref().map(Box::from)
}

fn pairs(map: &Option<BTreeMap<String, String>>) -> Pairs<Box<str>> {
    map.iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != LAST_APPLIED)
        .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
        .collect()
}

fn map(pairs: &Pairs<Box<str>>) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

impl From<&Secret> for CachedSecret {
    fn from(s: &Secret) -> Self {
        let m = &s.metadata;
        Self {
            name: m.name.as_deref().unwrap_or_default().into(),
            namespace: boxed(&m.namespace),
            resource_version: boxed(&m.resource_version),
            uid: boxed(&m.uid),
            type_: boxed(&s.type_),
            immutable: s.immutable,
            labels: pairs(&m.labels),
            annotations: pairs(&m.annotations),
            owner_references: m.owner_references.clone().unwrap_or_default().into(),
            data: s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.0.as_slice())))
                .collect(),
        }
    }
}

impl CachedSecret {
    /// The Secret again, with the fields kept (a reconcile reads nothing else).
    pub fn to_secret(&self) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.to_string()),
                namespace: self.namespace.as_deref().map(str::to_owned),
                resource_version: self.resource_version.as_deref().map(str::to_owned),
                uid: self.uid.as_deref().map(str::to_owned),
                labels: map(&self.labels),
                annotations: map(&self.annotations),
                owner_references: (!self.owner_references.is_empty())
                    .then(|| self.owner_references.to_vec()),
                ..Default::default()
            },
            type_: self.type_.as_deref().map(str::to_owned),
            immutable: self.immutable,
            data: Some(
                self.data
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for CachedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSecret")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("resource_version", &self.resource_version)
            .field(
                "data_keys",
                &self.data.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Lookup for CachedSecret {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        "Secret".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "secrets".into()
    }

    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }

    fn namespace(&self) -> Option<Cow<'_, str>> {
        self.namespace.as_deref().map(Cow::Borrowed)
    }

    /// Left out of the store's keys (which copy it): lookups are by namespace and name only, and
    /// the kept resourceVersion is in the object.
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }

    /// Left out of the store's keys, as the resourceVersion.
    fn uid(&self) -> Option<Cow<'_, str>> {
        None
    }
}

fn project(event: &watcher::Event<Secret>) -> watcher::Event<CachedSecret> {
    use watcher::Event;
    match event {
        Event::Apply(s) => Event::Apply(s.into()),
        Event::Delete(s) => Event::Delete(s.into()),
        Event::Init => Event::Init,
        Event::InitApply(s) => Event::InitApply(s.into()),
        Event::InitDone => Event::InitDone,
    }
}

/// kube-runtime's `reflector` with the projection: `writer`'s store keeps each Secret of `stream`
/// as a [`CachedSecret`], and the events go on unchanged.
pub fn reflector<S>(mut writer: Writer<CachedSecret>, stream: S) -> impl Stream<Item = S::Item>
where
    S: Stream<Item = watcher::Result<watcher::Event<Secret>>>,
{
    stream.inspect_ok(move |event| writer.apply_watcher_event(&project(event)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::{ObjectRef, store};

    fn secret() -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "inbox-token", "namespace": "team", "uid": "u-1", "resourceVersion": "42",
                "creationTimestamp": "2026-12-01T00:00:00Z", "generation": 3,
                "labels": {"mailintegration.dev/integration": "inbox", "other": "x"},
                "annotations": {LAST_APPLIED: "{\"data\":{}}", "mailintegration.dev/client-secret-expires": "2027-01-01"},
                "ownerReferences": [{"apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
                    "name": "inbox", "uid": "mi-1", "controller": true}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "type": "Opaque",
            "immutable": true,
            "data": {"access_token": "YXQ=", "expiry": "MjAyNy0wMS0wMVQwMDowMDowMFo=", "empty": ""}
        }))
        .unwrap()
    }

    #[test]
    fn a_cached_secret_gives_back_every_field_a_reconcile_reads() {
        let s = secret();
        let back = CachedSecret::from(&s).to_secret();
        assert_eq!(back.metadata.name, s.metadata.name);
        assert_eq!(back.metadata.namespace, s.metadata.namespace);
        assert_eq!(back.metadata.uid, s.metadata.uid);
        assert_eq!(back.metadata.resource_version, s.metadata.resource_version);
        assert_eq!(back.metadata.labels, s.metadata.labels);
        assert_eq!(back.metadata.owner_references, s.metadata.owner_references);
        assert_eq!(back.type_, s.type_);
        assert_eq!(back.immutable, Some(true));
        assert_eq!(back.data, s.data);
        // What is never read is not kept.
        let annotations = back.metadata.annotations.unwrap();
        assert_eq!(annotations.len(), 1);
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(back.metadata.managed_fields, None);
        assert_eq!(back.metadata.creation_timestamp, None);
        assert_eq!(back.metadata.generation, None);
    }

    #[test]
    fn a_secret_without_maps_comes_back_without_them() {
        let s = Secret {
            metadata: ObjectMeta {
                name: Some("bare".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let back = CachedSecret::from(&s).to_secret();
        assert_eq!(back.metadata.labels, None);
        assert_eq!(back.metadata.annotations, None);
        assert_eq!(back.metadata.owner_references, None);
        assert_eq!(back.data, Some(BTreeMap::new()));
    }

    #[test]
    fn its_debug_names_keys_and_never_values() {
        let text = format!("{:?}", CachedSecret::from(&secret()));
        assert!(text.contains("access_token"), "{text}");
        assert!(
            !text.contains("YXQ") && !text.contains("[97, 116]"),
            "{text}"
        );
    }

    #[test]
    fn the_store_keeps_the_projection_and_the_events_go_on_whole() {
        let (store, writer) = store::<CachedSecret>();
        let mut deleted = secret();
        deleted.metadata.name = Some("gone".into());
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(secret())),
            Ok(watcher::Event::InitApply(deleted.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(deleted)),
        ];
        let passed: Vec<_> =
            futures::executor::block_on(futures::TryStreamExt::try_collect::<Vec<_>>(reflector(
                writer,
                futures::stream::iter(events),
            )))
            .unwrap();
        assert_eq!(passed.len(), 5);
        assert!(
            matches!(&passed[1], watcher::Event::InitApply(s) if s.metadata.managed_fields.is_some()),
            "the controller's triggers still get the Secret as watched"
        );
        assert_eq!(store.state().len(), 1, "the deleted one left the store");
        let kept = store
            .get(&ObjectRef::new("inbox-token").within("team"))
            .expect("kept by namespace and name");
        assert_eq!(kept.to_secret().data, secret().data);
    }
}
