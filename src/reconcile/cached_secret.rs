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
//! with the projection in between, so that the watch still hands full Secrets (or their metadata)
//! to the controller's triggers while the store keeps the compact form.
//!
//! Anyone who may write Secrets in a watched namespace can label one for the operator, with no
//! MailIntegration at all, so what is kept of one Secret is bounded: [`MAX_HELD_BYTES`] of its
//! labels, annotations, ownerReferences and data. Of a larger one only its name, namespace, UID,
//! resourceVersion and size are kept (a marker: [`Held::TooLarge`]), and the reconcile that needs
//! it reports it by name instead of using it.

use crate::api::LAST_APPLIED_ANNOTATION as LAST_APPLIED;
use futures::{Stream, TryStreamExt as _};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    core::PartialObjectMeta,
    runtime::{
        reflector::{Lookup, store::Writer},
        watcher,
    },
};
use std::{borrow::Cow, collections::BTreeMap};

type Pairs<V> = Box<[(Box<str>, V)]>;

/// The most the operator keeps of one watched Secret, in bytes: the keys and values of its data,
/// labels and annotations (kubectl's last-applied copy left out) and the strings of its
/// ownerReferences. The operator's own Secrets are a few KiB (an access token and its SASL strings,
/// a refresh token); the token Secret it writes is held to the same bound (see
/// `secrets::token_secret`). 130 labelled Secrets of 1 MiB kept whole took the chart's 128 MiB pod
/// past its limit; at this bound they cost their metadata markers, and Secrets just under it 64 KiB
/// each.
pub const MAX_HELD_BYTES: usize = 64 * 1024;

/// What [`MAX_HELD_BYTES`] counts of a Secret: its kept metadata and `data`.
pub fn held_size(meta: &ObjectMeta, data: Option<&BTreeMap<String, ByteString>>) -> usize {
    let strings = |m: &Option<BTreeMap<String, String>>| {
        m.iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != LAST_APPLIED)
            .map(|(k, v)| k.len().saturating_add(v.len()))
            .fold(0usize, usize::saturating_add)
    };
    let owners = meta
        .owner_references
        .iter()
        .flatten()
        .map(|o| {
            [&o.api_version, &o.kind, &o.name, &o.uid]
                .iter()
                .map(|s| s.len())
                .fold(0usize, usize::saturating_add)
        })
        .fold(0usize, usize::saturating_add);
    let data = data
        .into_iter()
        .flatten()
        .map(|(k, v)| k.len().saturating_add(v.0.len()))
        .fold(0usize, usize::saturating_add);
    strings(&meta.labels)
        .saturating_add(strings(&meta.annotations))
        .saturating_add(owners)
        .saturating_add(data)
}

/// What a reconcile gets of a watched Secret.
// Built per lookup and dropped with the reconcile, and the Secret is the common variant: boxing it
// would add an allocation to every lookup to save none.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Held {
    /// The Secret, with the fields kept.
    Secret(Secret),
    /// Larger than [`MAX_HELD_BYTES`]: nothing of it but its name and version is held or used.
    TooLarge {
        name: String,
        bytes: usize,
        resource_version: Option<String>,
    },
}

impl Held {
    /// `secret` as read from the API server, under the same bound as the caches when `bounded`
    /// (a Secret labelled for the operator; an unlabelled one is only looked at to say so).
    pub fn of_read(secret: Secret, bounded: bool) -> Self {
        let bytes = held_size(&secret.metadata, secret.data.as_ref());
        if bounded && bytes > MAX_HELD_BYTES {
            Held::TooLarge {
                name: secret.metadata.name.unwrap_or_default(),
                bytes,
                resource_version: secret.metadata.resource_version,
            }
        } else {
            Held::Secret(secret)
        }
    }

    pub fn resource_version(&self) -> Option<&str> {
        match self {
            Held::Secret(s) => s.metadata.resource_version.as_deref(),
            Held::TooLarge {
                resource_version, ..
            } => resource_version.as_deref(),
        }
    }

    pub fn secret(&self) -> Option<&Secret> {
        match self {
            Held::Secret(s) => Some(s),
            Held::TooLarge { .. } => None,
        }
    }

    pub fn into_secret(self) -> Option<Secret> {
        match self {
            Held::Secret(s) => Some(s),
            Held::TooLarge { .. } => None,
        }
    }

    /// `(name, bytes)` when too large.
    pub fn too_large(&self) -> Option<(&str, usize)> {
        match self {
            Held::Secret(_) => None,
            Held::TooLarge { name, bytes, .. } => Some((name, *bytes)),
        }
    }
}

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
    /// Set (to the size) when the Secret is larger than [`MAX_HELD_BYTES`]: then labels,
    /// annotations, ownerReferences and data are empty.
    too_large: Option<usize>,
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
        Self::project(&s.metadata, s.type_.as_ref(), s.immutable, s.data.as_ref())
    }
}

impl CachedSecret {
    fn project(
        m: &ObjectMeta,
        type_: Option<&String>,
        immutable: Option<bool>,
        data: Option<&BTreeMap<String, ByteString>>,
    ) -> Self {
        let bytes = held_size(m, data);
        let marker = Self {
            name: m.name.as_deref().unwrap_or_default().into(),
            namespace: boxed(&m.namespace),
            resource_version: boxed(&m.resource_version),
            uid: boxed(&m.uid),
            type_: None,
            immutable: None,
            labels: Box::default(),
            annotations: Box::default(),
            owner_references: Box::default(),
            data: Box::default(),
            too_large: Some(bytes),
        };
        if bytes > MAX_HELD_BYTES {
            return marker;
        }
        Self {
            type_: type_.map(|t| Box::from(t.as_str())),
            immutable,
            labels: pairs(&m.labels),
            annotations: pairs(&m.annotations),
            owner_references: m.owner_references.clone().unwrap_or_default().into(),
            data: data
                .into_iter()
                .flatten()
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.0.as_slice())))
                .collect(),
            too_large: None,
            ..marker
        }
    }

    pub fn name_str(&self) -> &str {
        &self.name
    }

    /// The namespace ("" for none).
    pub fn namespace_str(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    /// The resourceVersion the watch last saw.
    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// What a reconcile gets: the Secret, or the marker of one too large to keep.
    pub fn held(&self) -> Held {
        match self.too_large {
            Some(bytes) => Held::TooLarge {
                name: self.name.to_string(),
                bytes,
                resource_version: self.resource_version.as_deref().map(str::to_owned),
            },
            None => Held::Secret(self.to_secret()),
        }
    }
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

/// What a watch yields that a [`CachedSecret`] is made of: a whole Secret (the operator's own,
/// whose data is kept up to the bound) or a Secret's metadata alone (the marked ones, whose data is
/// read when a reconcile needs it; see `super::marked`).
pub trait Projected {
    fn project(&self) -> CachedSecret;
}

impl Projected for Secret {
    fn project(&self) -> CachedSecret {
        self.into()
    }
}

impl Projected for PartialObjectMeta<Secret> {
    fn project(&self) -> CachedSecret {
        CachedSecret::project(&self.metadata, None, None, None)
    }
}

fn project<K: Projected>(event: &watcher::Event<K>) -> watcher::Event<CachedSecret> {
    use watcher::Event;
    match event {
        Event::Apply(s) => Event::Apply(s.project()),
        Event::Delete(s) => Event::Delete(s.project()),
        Event::Init => Event::Init,
        Event::InitApply(s) => Event::InitApply(s.project()),
        Event::InitDone => Event::InitDone,
    }
}

/// kube-runtime's `reflector` with the projection: `writer`'s store keeps each Secret of `stream`
/// as a [`CachedSecret`], and the events go on unchanged.
pub fn reflector<K, S>(mut writer: Writer<CachedSecret>, stream: S) -> impl Stream<Item = S::Item>
where
    K: Projected,
    S: Stream<Item = watcher::Result<watcher::Event<K>>>,
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
    fn a_secret_over_the_bound_is_kept_as_a_marker_without_its_data() {
        let mut s = secret();
        s.data
            .as_mut()
            .unwrap()
            .insert("filler".into(), ByteString(vec![b'x'; MAX_HELD_BYTES]));
        let cached = CachedSecret::from(&s);
        match cached.held() {
            Held::TooLarge {
                name,
                bytes,
                resource_version,
            } => {
                assert_eq!(name, "inbox-token");
                assert!(bytes > MAX_HELD_BYTES);
                assert_eq!(resource_version.as_deref(), Some("42"));
            }
            other => panic!("kept whole: {other:?}"),
        }
        assert!(
            cached.data.is_empty() && cached.labels.is_empty() && cached.annotations.is_empty()
        );
        // Annotations count too (they may hold 256 KiB), kubectl's last-applied copy does not.
        let mut s = secret();
        s.data = None;
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("note".into(), "y".repeat(MAX_HELD_BYTES));
        assert!(CachedSecret::from(&s).held().too_large().is_some());
        let mut s = secret();
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(LAST_APPLIED.into(), "y".repeat(MAX_HELD_BYTES));
        assert!(CachedSecret::from(&s).held().secret().is_some());
    }

    #[test]
    fn a_read_is_bounded_only_when_asked() {
        let mut s = secret();
        s.data
            .as_mut()
            .unwrap()
            .insert("filler".into(), ByteString(vec![b'x'; MAX_HELD_BYTES]));
        assert!(Held::of_read(s.clone(), true).too_large().is_some());
        assert!(Held::of_read(s, false).secret().is_some());
    }

    #[test]
    fn metadata_alone_keeps_no_data() {
        let meta = PartialObjectMeta::<Secret> {
            metadata: secret().metadata,
            ..Default::default()
        };
        let cached = meta.project();
        assert!(cached.data.is_empty());
        assert_eq!(cached.resource_version(), Some("42"));
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
