//! What every reconcile shares: the process's clients, limits and per-integration memory
//! ([`Context`]), and what one controller's reconciles share ([`Scoped`]).

use super::{
    cache::{Caches, WrittenVersions},
    decide::{self, Backoff, Outcome},
    inflight::Mark,
    mailbox_check::MailboxChecker,
    refresh::PendingGrant,
    share::{NamespaceShare, SharePermit},
    slots::RefreshSlots,
};
use crate::lease::Fence;
use crate::sync::{GrantLocks, LockExt as _};
use crate::{
    api::MailIntegration, metrics::Metrics, oauth::OAuthClient, provider::ProviderResolver,
};
use jiff::Timestamp;
use kube::{
    Client, ResourceExt,
    runtime::{events::Reporter, reflector::ObjectRef},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

/// Reconciles at once by default (see [`Context::concurrency`]; chosen from benches/README.md).
pub const DEFAULT_CONCURRENCY: u16 = 64;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "mail-integration-operator";

/// Links to the sign-in page; the web module provides it when the sign-in server runs.
pub trait SignInLinks: Send + Sync {
    fn link(&self, mi: &MailIntegration, now: Timestamp) -> Option<crate::api::SignInStatus>;
}

/// Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub oauth: OAuthClient,
    pub providers: ProviderResolver,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    /// Publishes the reconciler's events (without a cache: see [`super::events`]).
    pub(crate) recorder: super::events::EventPublisher,
    pub sign_in: Option<Arc<dyn SignInLinks>>,
    pub mailbox: Arc<MailboxChecker>,
    /// How long a failing revocation may delay a deletion (spec.revokeOnDelete).
    pub revoke_timeout: Duration,
    /// Whether this process may act as the leader ([`Fence::unfenced`] without leader election).
    pub fence: Arc<Fence>,
    /// Who this process is in write-ahead marks: `POD/NONCE`, unique per process.
    pub identity: String,
    /// One writer per grant in this process; shared with the sign-in server.
    pub grant_locks: Arc<GrantLocks>,
    /// Reconciles that run at once (`--concurrency`): bounds the memory and the API requests in
    /// flight when thousands of integrations are due together.
    pub concurrency: u16,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// Refreshed grants not stored yet, per UID.
    pending: Mutex<HashMap<String, PendingGrant>>,
    /// The mark of each UID's last attempt when the provider answered it without rotating.
    resolved_marks: Mutex<HashMap<String, Mark>>,
    /// Another holder's mark on each UID's grant, and when this process first saw it (see
    /// [`crate::reconcile::inflight::HOLDER_GRACE`]).
    seen_marks: Mutex<HashMap<String, (Mark, std::time::Instant)>>,
    /// Failed reconciles in a row, per resource UID (the error policy's backoff).
    errors: Mutex<HashMap<String, u32>>,
    /// The resourceVersions of this process's last writes, per UID (see [`cache::freshness`]);
    /// shared with the sign-in server, whose grant writes a refresh must not decide past.
    pub written: Arc<WrittenVersions>,
    /// The refreshes announced per second (see [`super::slots`]).
    pub(super) slots: RefreshSlots,
    /// How often an integration's token endpoint may be called (`--min-refresh-interval`).
    pub pace: decide::Pace,
    /// When this process last called each UID's token endpoint (see [`decide::decide_paced`]).
    last_calls: Mutex<HashMap<String, Timestamp>>,
    /// The reconciles one namespace may have waiting for a provider at once
    /// (`--max-namespace-share` of `--concurrency`; see [`super::share`]).
    pub provider_share: Arc<NamespaceShare>,
    /// Renders `spec.tokenSecret.template` in child processes (see [`super::template::sandbox`]).
    pub renderer: Arc<super::template::Renderer>,
}

impl Context {
    pub fn new(
        client: Client,
        oauth: OAuthClient,
        providers: ProviderResolver,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            mailbox: Arc::new(MailboxChecker::new(
                usize::from(super::mailbox_check::DEFAULT_CONCURRENCY),
                crate::mailbox::DEFAULT_TIMEOUT,
                metrics.clone(),
            )),
            client: client.clone(),
            oauth,
            providers,
            metrics,
            recorder: super::events::EventPublisher::new(client.clone(), reporter.clone()),
            reporter,
            sign_in: None,
            revoke_timeout: Duration::from_secs(300),
            fence: Arc::new(Fence::unfenced()),
            identity: format!(
                "{}/{:08x}",
                std::env::var("POD_NAME").unwrap_or_else(|_| FIELD_MANAGER.to_owned()),
                rand::random::<u32>()
            ),
            grant_locks: Arc::default(),
            concurrency: DEFAULT_CONCURRENCY,
            backoff: Mutex::default(),
            pending: Mutex::default(),
            resolved_marks: Mutex::default(),
            seen_marks: Mutex::default(),
            errors: Mutex::default(),
            written: Arc::default(),
            slots: RefreshSlots::default(),
            pace: decide::Pace::default(),
            last_calls: Mutex::default(),
            provider_share: NamespaceShare::new(super::share::share_of(
                usize::from(DEFAULT_CONCURRENCY),
                super::share::DEFAULT_MAX_NAMESPACE_SHARE,
            )),
            renderer: Arc::new(super::template::Renderer::of_this_binary()),
        }
    }

    /// When this process last called `uid`'s token endpoint.
    pub(super) fn last_call(&self, uid: &str) -> Option<Timestamp> {
        self.last_calls.locked().get(uid).copied()
    }

    /// Record a call of `uid`'s token endpoint, made now (whatever its answer will be).
    pub(super) fn note_call(&self, uid: &str, at: Timestamp) {
        self.last_calls.locked().insert(uid.to_owned(), at);
    }

    /// A unit of `mi`'s namespace's share of provider calls, or (`Err`) the outcome that defers
    /// the call: the namespace has its whole share waiting for providers now.
    pub(super) fn provider_permit(&self, mi: &MailIntegration) -> Result<SharePermit, Outcome> {
        let ns = mi.namespace().unwrap_or_default();
        self.provider_share.try_take(&ns).ok_or_else(|| {
            tracing::debug!(
                namespace = %ns,
                share = self.provider_share.limit(),
                "the namespace has its share of provider calls in flight: deferred"
            );
            self.metrics.count_deferred("namespace_share");
            Outcome::Requeue(super::share::deferral())
        })
    }

    pub(super) fn backoff(&self, uid: &str) -> Backoff {
        self.backoff.locked().get(uid).copied().unwrap_or_default()
    }

    /// Set (or end: `None`) `uid`'s backoff. An ended one stays known as none, so that
    /// [`Self::recall_backoff`] does not take it back from a status not updated yet.
    pub(super) fn set_backoff(&self, uid: &str, b: Option<Backoff>) {
        self.backoff
            .locked()
            .insert(uid.to_owned(), b.unwrap_or_default());
    }

    /// The backoff `stored` in `uid`'s status, if this process knows none of its own for it (it
    /// just started, or just became the leader): see [`super::remembered`].
    pub(super) fn recall_backoff(
        &self,
        uid: &str,
        stored: Option<&crate::api::ProviderBackoff>,
        now: Timestamp,
    ) {
        self.backoff
            .locked()
            .entry(uid.to_owned())
            .or_insert_with(|| super::remembered::recall(stored, now));
    }

    pub(super) fn error_count(&self, mi: &MailIntegration) -> u32 {
        let uid = mi.uid().unwrap_or_default();
        self.errors.locked().get(&uid).copied().unwrap_or(0)
    }

    pub(super) fn set_error_count(&self, mi: &MailIntegration, n: u32) {
        let uid = mi.uid().unwrap_or_default();
        let mut map = self.errors.locked();
        if n == 0 {
            map.remove(&uid);
        } else {
            map.insert(uid, n);
        }
    }

    pub(super) fn pending(&self, uid: &str) -> Option<PendingGrant> {
        self.pending.locked().get(uid).cloned()
    }

    pub(super) fn set_pending(&self, uid: &str, p: Option<PendingGrant>) {
        let mut map = self.pending.locked();
        match p {
            Some(p) => map.insert(uid.to_owned(), p),
            None => map.remove(uid),
        };
    }

    pub(super) fn resolved_mark(&self, uid: &str) -> Option<Mark> {
        self.resolved_marks.locked().get(uid).cloned()
    }

    pub(super) fn set_resolved_mark(&self, uid: &str, m: Option<Mark>) {
        let mut map = self.resolved_marks.locked();
        match m {
            Some(m) => map.insert(uid.to_owned(), m),
            None => map.remove(uid),
        };
    }

    /// The grants held in memory now (refreshed, not stored yet), by UID.
    pub fn held_grants(&self) -> Vec<(String, PendingGrant)> {
        self.pending
            .locked()
            .iter()
            .map(|(uid, p)| (uid.clone(), p.clone()))
            .collect()
    }

    /// When this process first saw `mark` on `uid`'s grant (now, if it is new to it).
    pub(super) fn first_seen(&self, uid: &str, mark: &Mark) -> std::time::Instant {
        let mut map = self.seen_marks.locked();
        match map.get(uid) {
            Some((m, at)) if m == mark => *at,
            _ => {
                let now = std::time::Instant::now();
                map.insert(uid.to_owned(), (mark.clone(), now));
                now
            }
        }
    }

    /// Whether anything of `uid` is remembered in the per-integration maps.
    #[cfg(test)]
    pub(super) fn remembers(&self, uid: &str) -> bool {
        self.backoff.locked().contains_key(uid)
            || self.pending.locked().contains_key(uid)
            || self.resolved_marks.locked().contains_key(uid)
            || self.seen_marks.locked().contains_key(uid)
            || self.errors.locked().contains_key(uid)
            || self.last_calls.locked().contains_key(uid)
    }

    pub(crate) fn forget(&self, mi: &MailIntegration) {
        if let Some(uid) = mi.uid() {
            self.mailbox.forget(&uid);
            self.backoff.locked().remove(&uid);
            self.grant_locks.remove(&uid);
            self.set_pending(&uid, None);
            self.set_resolved_mark(&uid, None);
            self.seen_marks.locked().remove(&uid);
            self.errors.locked().remove(&uid);
            self.written.forget(&uid);
            self.slots.hold(&uid, None);
            self.last_calls.locked().remove(&uid);
        }
    }
}

/// What one controller's reconciles share: the process's [`Context`] and that controller's caches.
pub struct Scoped {
    pub ctx: Arc<Context>,
    pub caches: Caches,
    /// Brings a reconcile of an integration (a mailbox check finished in the background).
    pub wake: futures::channel::mpsc::UnboundedSender<ObjectRef<MailIntegration>>,
}
