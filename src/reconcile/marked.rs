//! The data of the Secrets users marked for the operator (`mailintegration.dev/oauth-client=true`:
//! client Secrets, certificates, CA bundles).
//!
//! Their watch is metadata-only: anyone who may write Secrets in a watched namespace can mark any
//! number of them, with no MailIntegration at all, and a watch of their data would bring every one
//! into the process (130 of 1 MiB took the chart's 128 MiB pod past its limit at every start). The
//! data of a marked Secret is read with one GET when a reconcile first needs it, and kept per
//! resourceVersion: refreshes read it from here, and a change the metadata watch sees (a new
//! resourceVersion, a deletion) makes the next reconcile read it again. What is kept is bounded per
//! Secret by [`MAX_HELD_BYTES`]; a larger Secret is kept as a marker ([`Held::TooLarge`]) and not
//! read again until it changes. Only Secrets an integration names are ever read, so what this
//! holds is at most one bounded entry per Secret named by a MailIntegration.

use super::cached_secret::{CachedSecret, Held};
use crate::sync::LockExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use std::{collections::HashMap, future::Future, sync::Arc, sync::Mutex};
use tokio::sync::OnceCell;

/// One Secret's data as read for one resourceVersion; concurrent reconciles share one read.
type Entry = (Box<str>, Arc<OnceCell<Option<CachedSecret>>>);

/// Namespace and name.
type Key = (Box<str>, Box<str>);

/// The data read of marked Secrets, by namespace and name.
#[derive(Default)]
pub struct MarkedData(Mutex<HashMap<Key, Entry>>);

impl MarkedData {
    /// The Secret whose metadata the watch holds as `meta`, read with `read` unless this
    /// resourceVersion was read before (`Ok(None)`: it was deleted meanwhile).
    pub async fn get<F, Fut>(
        &self,
        meta: &CachedSecret,
        read: F,
    ) -> Result<Option<Held>, kube::Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Secret>, kube::Error>>,
    {
        if let Held::TooLarge { .. } = meta.held() {
            // Its labels and annotations alone are over the bound.
            return Ok(Some(meta.held()));
        }
        let name = meta.name_str();
        let Some(version) = meta.resource_version() else {
            // Nothing to key a read by (never the case with kube-apiserver): read every time.
            return Ok(read().await?.map(|s| Held::of_read(s, true)));
        };
        let key = (Box::from(meta.namespace_str()), Box::from(name));
        let cell = {
            let mut map = self.0.locked();
            match map.get(&key) {
                Some((v, cell)) if &**v == version => cell.clone(),
                _ => {
                    let cell = Arc::new(OnceCell::new());
                    map.insert(key, (Box::from(version), cell.clone()));
                    cell
                }
            }
        };
        let kept = cell
            .get_or_try_init(|| async {
                Ok::<_, kube::Error>(read().await?.map(|s| CachedSecret::from(&s)))
            })
            .await?;
        Ok(kept.as_ref().map(CachedSecret::held))
    }

    /// Forget the data of Secrets no longer in `store` (deleted, or no longer marked).
    pub fn retain_listed(&self, store: &Store<CachedSecret>) {
        self.0
            .locked()
            .retain(|(ns, name), _| store.get(&ObjectRef::new(name).within(ns)).is_some());
    }

    /// Forget one Secret's data.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.0
            .locked()
            .remove(&(Box::from(namespace), Box::from(name)));
    }

    /// How many Secrets' data is kept.
    pub fn len(&self) -> usize {
        self.0.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::cached_secret::MAX_HELD_BYTES;
    use k8s_openapi::ByteString;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn secret(version: &str, bytes: usize) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some("client".into());
        s.metadata.namespace = Some("team".into());
        s.metadata.resource_version = Some(version.into());
        s.data = Some(
            [("client_secret".to_owned(), ByteString(vec![b'x'; bytes]))]
                .into_iter()
                .collect(),
        );
        s
    }

    fn meta(version: &str) -> CachedSecret {
        let mut s = secret(version, 0);
        s.data = None;
        CachedSecret::from(&s)
    }

    #[tokio::test]
    async fn a_version_is_read_once_and_read_again_when_it_changes() {
        let data = MarkedData::default();
        let reads = AtomicUsize::new(0);
        let read = |v: &'static str| {
            let reads = &reads;
            move || async move {
                reads.fetch_add(1, Ordering::Relaxed);
                Ok(Some(secret(v, 10)))
            }
        };
        for _ in 0..3 {
            let got = data.get(&meta("1"), read("1")).await.unwrap().unwrap();
            assert!(got.secret().is_some());
        }
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        data.get(&meta("2"), read("2")).await.unwrap();
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        assert_eq!(data.len(), 1, "one entry per Secret, the newest version");
        data.forget("team", "client");
        assert!(data.is_empty());
    }

    #[tokio::test]
    async fn a_secret_over_the_bound_is_kept_as_a_marker_and_not_read_again() {
        let data = MarkedData::default();
        let reads = AtomicUsize::new(0);
        for _ in 0..2 {
            let got = data
                .get(&meta("1"), || async {
                    reads.fetch_add(1, Ordering::Relaxed);
                    Ok(Some(secret("1", MAX_HELD_BYTES + 1)))
                })
                .await
                .unwrap()
                .unwrap();
            let (name, bytes) = got.too_large().expect("over the bound");
            assert_eq!(name, "client");
            assert!(bytes > MAX_HELD_BYTES);
        }
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        // What is kept of it holds no data.
        let map = data.0.locked();
        let kept = map
            .values()
            .next()
            .unwrap()
            .1
            .get()
            .unwrap()
            .as_ref()
            .unwrap();
        assert!(format!("{kept:?}").contains("data_keys: []"), "{kept:?}");
    }

    #[tokio::test]
    async fn a_failed_read_is_tried_again() {
        let data = MarkedData::default();
        let failed = data
            .get(&meta("1"), || async {
                Err(kube::Error::LinesCodecMaxLineLengthExceeded)
            })
            .await;
        assert!(failed.is_err());
        let got = data
            .get(&meta("1"), || async { Ok(Some(secret("1", 1))) })
            .await
            .unwrap();
        assert!(got.unwrap().secret().is_some());
    }
}
