//! What a reconcile reads instead of the API server: the watch caches of the integrations and of
//! the Secrets the operator may read (its own, selected by label, and those users marked for it),
//! and what this process last wrote, so that a cache that has not caught up with its own write is
//! never decided on.
//!
//! Idle reconciles and refreshes then read nothing from the API server (at 10,000 integrations the
//! four GETs of every reconcile were the largest share of the API server's work). A refresh
//! presents the cached grant: under the per-grant lock it is checked against this process's last
//! writes (a sign-in by this process or the previous refresh may have replaced it; the sign-in
//! server records its grant writes here too). The marked Secrets' watch is metadata-only: their data
//! is read once per resourceVersion (see [`super::marked`]). Two more reads stay, each where a cache
//! cannot be trusted:
//! - a Secret the caches do not hold but that may exist unlabelled (a token Secret name taken by
//!   someone else, a grant Secret brought by hand without its label, an unmarked client Secret):
//!   read once so that the condition names the problem, as before;
//! - an object whose resourceVersion cannot be compared (see [`freshness`]).

use super::cached_secret::{CachedSecret, Held};
use super::marked::MarkedData;
use crate::api::{LAST_APPLIED_ANNOTATION as LAST_APPLIED, MailIntegration};
use crate::sync::LockExt as _;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Trim an integration before it enters the watch cache: managedFields (about half of a served
/// object once several managers wrote it) and kubectl's last-applied copy are never read, and the
/// cache holds every integration for the life of the process.
pub fn trim_integration(mi: &mut MailIntegration) {
    mi.managed_fields_mut().clear();
    if let Some(a) = mi.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// The watch caches of one controller (one per watched namespace, or one for all).
#[derive(Clone)]
pub struct Caches {
    pub integrations: Store<MailIntegration>,
    /// Grant and token Secrets (label `mailintegration.dev/integration`), kept compact.
    pub owned: Store<CachedSecret>,
    /// Secrets users marked for the operator (client Secrets, certificates, CA bundles): their
    /// metadata, from a metadata-only watch.
    pub marked: Store<CachedSecret>,
    /// The data of the marked Secrets a reconcile needed, per resourceVersion (see `super::marked`).
    pub marked_data: Arc<MarkedData>,
    /// Whether both Secret caches hold their first list, for any number of waiters.
    secrets_listed: Shared<BoxFuture<'static, bool>>,
}

impl Caches {
    pub fn new(
        integrations: Store<MailIntegration>,
        owned: Store<CachedSecret>,
        marked: Store<CachedSecret>,
    ) -> Self {
        // `Store::wait_until_ready` wakes only the last of its concurrent waiters (it polls one
        // oneshot receiver, which keeps one waker): with hundreds of reconciles waiting at a
        // start, all the others slept out their whole limit. One future waits on the stores and
        // `Shared` wakes every reconcile waiting on it.
        let (o, m) = (owned.clone(), marked.clone());
        let secrets_listed = async move {
            matches!(
                futures::future::join(o.wait_until_ready(), m.wait_until_ready()).await,
                (Ok(()), Ok(()))
            )
        }
        .boxed()
        .shared();
        Self {
            integrations,
            owned,
            marked,
            marked_data: Arc::default(),
            secrets_listed,
        }
    }

    /// Wait (at most `limit`) until the Secret caches hold their first list. The integrations'
    /// cache starts the reconciles, and may be ready before them: a reconcile deciding on an empty
    /// Secret cache would read every Secret it misses (a restart of 10,000 integrations would make
    /// tens of thousands of GETs). The controller keeps driving the watches meanwhile.
    pub async fn secrets_ready(&self, limit: std::time::Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.secrets_listed.clone()).await,
            Ok(true)
        )
    }

    /// A grant or token Secret from the cache (or the marker of one too large to keep).
    pub fn owned_secret(&self, ns: &str, name: &str) -> Option<Held> {
        self.owned
            .get(&ObjectRef::new(name).within(ns))
            .map(|s| s.held())
    }

    /// A marked Secret: `None` when the metadata watch does not hold it (missing, or not marked);
    /// else its data, read with `read` the first time this resourceVersion is needed.
    pub async fn marked_secret<F, Fut>(
        &self,
        ns: &str,
        name: &str,
        read: F,
    ) -> Result<Option<Held>, kube::Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Secret>, kube::Error>>,
    {
        let Some(meta) = self.marked.get(&ObjectRef::new(name).within(ns)) else {
            return Ok(None);
        };
        self.marked_data.get(&meta, read).await
    }
}

/// The resourceVersions of this process's last writes of one integration's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub integration: Option<String>,
    pub grant: Option<String>,
    pub token: Option<String>,
    /// When the last of them was written.
    pub at: Option<std::time::Instant>,
}

/// How long a cache may lag behind this process's write before the object is read instead: a
/// watch event takes milliseconds; an object that stays older (or gone: someone deleted the token
/// Secret) must not keep its integration waiting.
pub const LAG_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Written {
    /// Whether the last write is recent enough for a lagging cache to be waited for.
    pub fn recent(&self) -> bool {
        self.at.is_some_and(|at| at.elapsed() < LAG_LIMIT)
    }
}

/// Which of an integration's objects was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Integration,
    Grant,
    Token,
}

/// What this process last wrote, per integration UID.
#[derive(Default)]
pub struct WrittenVersions(Mutex<HashMap<String, Written>>);

impl WrittenVersions {
    pub fn get(&self, uid: &str) -> Written {
        self.0.locked().get(uid).cloned().unwrap_or_default()
    }

    pub fn set(&self, uid: &str, kind: Kind, version: Option<String>) {
        let Some(version) = version else { return };
        let mut map = self.0.locked();
        let w = map.entry(uid.to_owned()).or_default();
        w.at = Some(std::time::Instant::now());
        match kind {
            Kind::Integration => w.integration = Some(version),
            Kind::Grant => w.grant = Some(version),
            Kind::Token => w.token = Some(version),
        }
    }

    /// Remember the version a read returned (`None`: the object is gone) as the newest known,
    /// without counting it as a write: a cache still behind it (the watch is reconnecting after an
    /// API server outage, say) is then read again instead of being decided on, and a cache that
    /// has caught up with it is fresh. Forgetting the version instead would let the next
    /// reconcile decide on the lagging cache.
    pub fn read(&self, uid: &str, kind: Kind, version: Option<String>) {
        let Some(version) = version else {
            return self.clear(uid, kind);
        };
        let mut map = self.0.locked();
        let w = map.entry(uid.to_owned()).or_default();
        match kind {
            Kind::Integration => w.integration = Some(version),
            Kind::Grant => w.grant = Some(version),
            Kind::Token => w.token = Some(version),
        }
    }

    /// Forget one object's version.
    pub fn clear(&self, uid: &str, kind: Kind) {
        let mut map = self.0.locked();
        if let Some(w) = map.get_mut(uid) {
            match kind {
                Kind::Integration => w.integration = None,
                Kind::Grant => w.grant = None,
                Kind::Token => w.token = None,
            }
            if w.integration.is_none() && w.grant.is_none() && w.token.is_none() {
                map.remove(uid);
            }
        }
    }

    pub fn forget(&self, uid: &str) {
        self.0.locked().remove(uid);
    }

    pub fn len(&self) -> usize {
        self.0.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a cached object compares with this process's last write of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Nothing written by this process, or the cache holds that write or a later one: decide on it.
    Fresh,
    /// The cache still holds an older version than this process wrote: its watch event is on the
    /// way and brings the next reconcile.
    Lagging,
    /// The versions cannot be compared: read the object.
    Unknown,
}

/// Whether `cached` (the resourceVersion in the watch cache; `None`: not in it) is at least as new
/// as `written` (this process's last write). resourceVersions are documented as opaque, but
/// kube-apiserver serves etcd's revision, a number that only grows, and its own watch cache
/// compares them the same way; anything else falls back to a read. A cache still behind after
/// [`LAG_LIMIT`] (`recent` false) is not waited for either: the object is read.
pub fn freshness(cached: Option<&str>, written: Option<&str>, recent: bool) -> Freshness {
    let Some(written) = written else {
        return Freshness::Fresh;
    };
    let lagging = if recent {
        Freshness::Lagging
    } else {
        Freshness::Unknown
    };
    let Some(cached) = cached else {
        // Written (created) by this process but not in the cache yet (or deleted since).
        return lagging;
    };
    if cached == written {
        return Freshness::Fresh;
    }
    match (cached.parse::<u64>(), written.parse::<u64>()) {
        (Ok(c), Ok(w)) if c > w => Freshness::Fresh,
        (Ok(_), Ok(_)) => lagging,
        _ => Freshness::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_reconcile_waiting_for_the_secret_caches_wakes_when_they_have_listed() {
        let (integrations, _w) = kube::runtime::reflector::store::<MailIntegration>();
        let (owned, mut owned_writer) = kube::runtime::reflector::store::<CachedSecret>();
        let (marked, mut marked_writer) = kube::runtime::reflector::store::<CachedSecret>();
        let caches = Caches::new(integrations, owned, marked);
        let limit = std::time::Duration::from_secs(20);
        let waiters: Vec<_> = (0..100)
            .map(|_| {
                let c = caches.clone();
                tokio::spawn(async move { c.secrets_ready(limit).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        for w in [&mut owned_writer, &mut marked_writer] {
            w.apply_watcher_event(&kube::runtime::watcher::Event::Init);
            w.apply_watcher_event(&kube::runtime::watcher::Event::InitDone);
        }
        for w in waiters {
            assert!(
                w.await.unwrap(),
                "a waiter timed out instead of being woken"
            );
        }
        // Woken, not timed out: kube's own wait wakes only the last of many waiters.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_cache_is_fresh_unless_it_holds_less_than_this_process_wrote() {
        assert_eq!(freshness(Some("5"), None, true), Freshness::Fresh);
        assert_eq!(freshness(None, None, true), Freshness::Fresh);
        assert_eq!(freshness(Some("7"), Some("7"), true), Freshness::Fresh);
        assert_eq!(freshness(Some("8"), Some("7"), true), Freshness::Fresh);
        assert_eq!(freshness(Some("6"), Some("7"), true), Freshness::Lagging);
        assert_eq!(freshness(None, Some("7"), true), Freshness::Lagging);
        assert_eq!(freshness(Some("x"), Some("7"), true), Freshness::Unknown);
        // Behind for longer than a watch event takes (or deleted since): read it.
        assert_eq!(freshness(Some("6"), Some("7"), false), Freshness::Unknown);
        assert_eq!(freshness(None, Some("7"), false), Freshness::Unknown);
        assert_eq!(freshness(Some("8"), Some("7"), false), Freshness::Fresh);
    }

    #[test]
    fn a_read_newer_than_the_cache_keeps_the_cache_from_being_decided_on() {
        let w = WrittenVersions::default();
        w.set("u", Kind::Grant, Some("7".into()));
        // Read after the cache lagged too long: the API server has 9, the cache still 5.
        w.read("u", Kind::Grant, Some("9".into()));
        let now = w.get("u");
        assert_eq!(now.grant.as_deref(), Some("9"));
        // The read is not a write: it does not make a lagging cache worth waiting for again.
        assert_eq!(now.at, w.get("u").at);
        assert_eq!(
            freshness(Some("5"), now.grant.as_deref(), false),
            Freshness::Unknown,
            "a cache behind the read is read again"
        );
        assert_eq!(
            freshness(Some("9"), now.grant.as_deref(), false),
            Freshness::Fresh
        );
        // A read that found nothing forgets the version.
        w.read("u", Kind::Grant, None);
        assert_eq!(w.get("u").grant, None);
        // Never written, only read: not recent.
        w.read("v", Kind::Token, Some("3".into()));
        assert!(!w.get("v").recent());
    }

    #[test]
    fn written_versions_are_forgotten_per_object_and_whole() {
        let w = WrittenVersions::default();
        w.set("u", Kind::Token, Some("3".into()));
        w.set("u", Kind::Integration, Some("4".into()));
        w.set("u", Kind::Grant, None);
        assert_eq!(w.get("u").token.as_deref(), Some("3"));
        assert_eq!(w.get("u").grant, None);
        w.clear("u", Kind::Token);
        assert_eq!(w.len(), 1);
        w.clear("u", Kind::Integration);
        assert!(w.is_empty());
        w.set("u", Kind::Grant, Some("9".into()));
        w.forget("u");
        assert!(w.is_empty());
    }

    #[test]
    fn trimming_drops_managed_fields_and_the_last_applied_copy() {
        let mut mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
            "metadata": {"name": "a", "annotations": {LAST_APPLIED: "{}", "keep": "1"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"provider": "Google", "mailbox": {"address": "a@example.test"},
                "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}}
        }))
        .unwrap();
        trim_integration(&mut mi);
        assert!(mi.managed_fields().is_empty());
        assert_eq!(mi.annotations().len(), 1);
    }
}
