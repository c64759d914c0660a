//! When and how a reconcile checks the mailbox, and what the result does to the status.
//!
//! The check runs at least every `spec.mailbox.checkInterval`, and at once for a token of a new
//! grant (a sign-in, new scopes, a new client Secret for app-only grants; not a rotated refresh
//! token: [`grant_basis`]), after a spec change, after a refresh a user asked for (the refresh
//! annotation), and for every new token while the last check failed ([`Cached::answers`]). A
//! routine refresh of a grant whose last check connected does not make one due: its new token is
//! the same grant's, and the interval's check finds what changed at the mail server. Results are
//! kept in memory per integration (with what they were made with), so a storm of reconciles does
//! not become a storm of logins, and a check that did not change its result writes nothing.
//! Checks run with bounded concurrency and a timeout each, off the refresh path
//! ([`MailboxChecker::state_joined`]): a reconcile does not wait for a mail server; it
//! reports the last finished check, and a finished check brings a reconcile of its own.
//!
//! One exception keeps a first refresh at one status write ([`MailboxChecker::state_joined`]):
//! the check a refresh makes due (a new token), when no result is known yet, is waited for up to
//! `--mailbox-check-wait` (3 s), its queueing for a permit included, and its result goes out in
//! the refresh's status apply (Ready and MailboxConnected together) instead of a write of its own.
//! Never longer: a slower mail server reports in its own write as before, so Ready is late by at
//! most the wait. Never more than the join slots ([`join_slots`]: as many as the checks that run
//! at once, at most half the reconcile workers) wait at once, each at most the wait, whatever the
//! mail servers do; a refresh that finds no free slot waits for one while slots are released (a
//! burst of first refreshes against mail servers that answer), and goes on without once none was
//! released for [`JOIN_SLOT_WAIT`] (250 ms: slow mail servers hold them) or after
//! [`JOIN_SLOT_WAIT_MAX`] (1 s) in all.

use super::template::digest::{feed, hex};
use crate::sync::LockExt as _;
use crate::{
    api::{DEFAULT_CA_KEY, MailIntegration, SaslMechanismName},
    mailbox::{self, CheckProtocol, CheckTarget, SaslMechanism},
    metrics::{Metrics, RefreshLabels},
    secret::SecretValue,
};
use jiff::{SignedDuration, Timestamp};
pub use join::{JOIN_SLOT_WAIT, JOIN_SLOT_WAIT_MAX};
use join::{JoinSlot, JoinSlots};
use kube::ResourceExt;
use sha2::Digest;
use std::{collections::HashMap, sync::Mutex, time::Duration};

/// The outcome of checking all of an integration's servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxState {
    /// No mail server is known (OIDC without spec.mailbox.server): nothing to check.
    NotConfigured,
    /// Every server accepted the token; the message says which.
    Connected(String),
    /// A server refused; `reason` is MailboxAuthFailed, MailboxUnreachable, TLSError or ProtocolError.
    Failed { reason: String, message: String },
}

#[derive(Clone)]
struct Cached {
    made: Made,
    at: Timestamp,
    state: MailboxState,
}

/// What a check was made with, as short digests: the token and the grant it came from, each with
/// the spec's generation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Made {
    token: String,
    grant: String,
}

impl Cached {
    /// Whether this result still answers, less than an interval ago: made with this token and
    /// spec, or, when it connected, with another token of the same grant and spec (a routine
    /// refresh). A failure is checked again with every new token.
    fn answers(&self, made: &Made, mi: &MailIntegration, now: Timestamp) -> bool {
        let same = self.made == *made
            || (self.made.grant == made.grant && matches!(self.state, MailboxState::Connected(_)));
        same && now.duration_since(self.at)
            < SignedDuration::try_from(mi.spec.check_interval()).unwrap_or(SignedDuration::MAX)
    }
}

/// The token a check sends and the grant it was issued from.
#[derive(Clone, Copy)]
pub struct CheckToken<'t> {
    pub access_token: &'t SecretValue,
    pub expires_at: Timestamp,
    /// What the token was issued from ([`grant_basis`]).
    pub grant: &'t str,
}

/// What a token was issued from, for [`CheckToken::grant`], as a short digest: the grant's
/// sign-in (its time, account, scopes, token endpoint and client; a rotated refresh token keeps
/// them, a new sign-in does not; a grant brought by hand without its sign-in time: its refresh
/// token), else the client Secret's version (app-only grants), and the refresh a user asked for
/// (the refresh annotation's value), so that each of these makes a check due and a routine
/// refresh, rotating or not, does not.
pub fn grant_basis(
    grant: Option<&super::observed::Grant>,
    client_version: Option<&str>,
    requested: Option<&str>,
) -> String {
    let mut digest = sha2::Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        feed(&mut digest, name.as_bytes());
        feed(&mut digest, value);
    };
    match grant {
        Some(g) => {
            match g.issued_at {
                Some(at) => field("issued-at", at.to_string().as_bytes()),
                None => field("refresh-token", g.refresh_token.expose().as_bytes()),
            }
            field(
                "account",
                g.account.as_deref().unwrap_or_default().as_bytes(),
            );
            field("scopes", g.scopes.join(" ").as_bytes());
            field(
                "token-endpoint",
                g.token_endpoint.as_deref().unwrap_or_default().as_bytes(),
            );
            field(
                "client",
                g.client_id.as_deref().unwrap_or_default().as_bytes(),
            );
        }
        None => field(
            "client-secret",
            client_version.unwrap_or_default().as_bytes(),
        ),
    }
    field("requested", requested.unwrap_or_default().as_bytes());
    short_hex(&digest.finalize())
}

/// The first 8 bytes of a digest, in hex: enough to tell inputs apart, nothing to guess from.
fn short_hex(digest: &[u8]) -> String {
    hex(digest.get(..8).unwrap_or(digest))
}

/// A check to make (see [`MailboxChecker::start`]).
struct Check<'t> {
    targets: Vec<CheckTarget>,
    token: &'t SecretValue,
    key: String,
    made: Made,
}

/// Checks mailboxes with bounded concurrency and remembers the results.
pub struct MailboxChecker {
    /// How many checks run at once (`--mailbox-check-concurrency`).
    concurrency: usize,
    /// The reconcile workers (`--concurrency`), of which at most half wait for a check.
    workers: usize,
    /// One namespace's share of the checks and the join slots, in percent.
    share_percent: u8,
    /// The checks that run at once, of which one namespace holds at most its share (see
    /// [`super::share::NamespaceQueue`]).
    permits: std::sync::Arc<super::share::NamespaceQueue>,
    cache: Mutex<HashMap<String, Cached>>,
    /// UIDs whose check runs in the background now (one at a time per integration).
    running: Mutex<std::collections::HashSet<String>>,
    timeout: Duration,
    /// How long a refresh's status apply waits for the check the refresh made due (see the
    /// module doc); zero: never.
    join_wait: Duration,
    /// The reconciles that may wait for a check at once ([`join_slots`]), of which one namespace
    /// takes at most its share (`--max-namespace-share`), so that one tenant's slow mail servers
    /// cannot hold every waiting reconcile.
    join_slots: std::sync::Arc<JoinSlots>,
    metrics: std::sync::Arc<Metrics>,
    allowed: std::sync::Arc<crate::mailbox::allowed::AllowedHosts>,
}

/// The default of `--mailbox-check-concurrency`: checks are a connection and a login each, mostly
/// waiting for the mail server; 32 at once keep up with the first refreshes of 10,000 integrations
/// started at once (benches/README.md), and each goes to a different mailbox.
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// How many reconciles may wait for their check at once (the join slots): as many as the checks
/// that run at once, but at most half the reconcile `workers` (at least one), so that whatever
/// the mail servers do, half the workers stay free and each waiting one waits at most the join
/// wait. At the defaults, 32 of the 64 workers: at a burst of 10,000 Google first refreshes, 16
/// slots left 2-3 % of the checks to a status write of their own (benches/README.md).
pub fn join_slots(concurrency: usize, workers: usize) -> usize {
    concurrency.min(workers / 2).max(1)
}

/// The default of `--mailbox-check-wait`: long enough for a mail server that answers (a check is
/// a TLS connection and three commands), short enough that a slow one delays Ready by little.
pub const DEFAULT_JOIN_WAIT: Duration = Duration::from_secs(3);

/// Whether a reconcile waits for the check it starts: only one that refreshed (its status is
/// written anyway, and the check is due because of the new token), only when no result is known
/// yet (no MailboxConnected: a first refresh), and only with a wait set. With a result known, the
/// check's own reconcile writes nothing unless the result changed (its time goes out with the
/// next write), so waiting would save nothing but hold a worker.
pub fn joins(refreshed: bool, known: bool, wait: Duration) -> bool {
    refreshed && !known && !wait.is_zero()
}

/// What a check started in the background holds until it runs (see [`MailboxChecker::background`]).
struct Queued {
    namespace: String,
    targets: Vec<CheckTarget>,
    token: SecretValue,
    spec: Box<crate::api::MailIntegrationSpec>,
    key: String,
    made: Made,
    ca: Option<Vec<u8>>,
    /// Where the result goes when a refresh waits for it.
    tx: Option<tokio::sync::oneshot::Sender<MailboxState>>,
}

/// A check started in the background: its result when the caller may wait for it, with the join
/// slot the waiting holds.
type Started = Option<(tokio::sync::oneshot::Receiver<MailboxState>, JoinSlot)>;

impl MailboxChecker {
    pub fn new(concurrency: usize, timeout: Duration, metrics: std::sync::Arc<Metrics>) -> Self {
        let concurrency = concurrency.max(1);
        let workers = usize::from(super::context::DEFAULT_CONCURRENCY);
        let share_percent = super::share::DEFAULT_MAX_NAMESPACE_SHARE;
        let (permits, join_slots) = Self::pools(concurrency, workers, share_percent);
        Self {
            concurrency,
            workers,
            share_percent,
            permits,
            cache: Mutex::default(),
            running: Mutex::default(),
            timeout,
            join_wait: DEFAULT_JOIN_WAIT,
            join_slots,
            metrics,
            allowed: Default::default(),
        }
    }

    /// The check permits, the join slots and the join slots' per-namespace share, for
    /// `concurrency` checks at once and `workers` reconcile workers, of which one namespace holds
    /// at most `percent` %.
    fn pools(
        concurrency: usize,
        workers: usize,
        percent: u8,
    ) -> (
        std::sync::Arc<super::share::NamespaceQueue>,
        std::sync::Arc<JoinSlots>,
    ) {
        let slots = join_slots(concurrency, workers);
        (
            super::share::NamespaceQueue::new(
                concurrency,
                super::share::share_of(concurrency, percent),
            ),
            std::sync::Arc::new(JoinSlots::new(
                slots,
                super::share::share_of(slots, percent),
            )),
        )
    }

    /// Let one namespace run at most `percent` % of the checks that run at once and take at most
    /// as much of the join slots (at least one of each).
    pub fn with_namespace_share(mut self, percent: u8) -> Self {
        self.share_percent = percent;
        self.rebuild_pools()
    }

    /// Size the join slots for this many reconcile workers (`--concurrency`; see [`join_slots`]).
    pub fn with_reconcile_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self.rebuild_pools()
    }

    fn rebuild_pools(mut self) -> Self {
        (self.permits, self.join_slots) =
            Self::pools(self.concurrency, self.workers, self.share_percent);
        self
    }

    /// How long a refresh's status apply waits for the check the refresh made due (zero: never).
    pub fn with_join_wait(mut self, wait: Duration) -> Self {
        self.join_wait = wait;
        self
    }

    /// Connect only to these mail hosts (see [`crate::mailbox::allowed`]).
    pub fn with_allowed_hosts(mut self, allowed: crate::mailbox::allowed::AllowedHosts) -> Self {
        self.allowed = std::sync::Arc::new(allowed);
        self
    }

    /// Why the check must not send this integration's token anywhere, if so: a server outside the
    /// allowed hosts, or a grant of another account than the mailbox (after an edit of the spec).
    pub fn refusal(&self, mi: &MailIntegration, targets: &[CheckTarget]) -> Option<MailboxState> {
        if let Some(t) = targets.iter().find(|t| !self.allowed.allows(&t.host)) {
            return Some(MailboxState::Failed {
                reason: crate::reason::Reason::MailboxHostNotAllowed.as_str().into(),
                message: format!(
                    "the mail server {} is not one the operator may connect to (allowed: {}): use the provider's own mail host, or ask the operator's admin to add it to --mailbox-allowed-hosts",
                    crate::reason::clean(&t.host),
                    self.allowed.describe()
                ),
            });
        }
        // The account that must have signed in: the mailbox's own, or its delegate's for a shared
        // mailbox (spec.oauth.signInAccount).
        let expected = mi.spec.sign_in_account();
        if let Some(account) = mi
            .status
            .as_ref()
            .and_then(|s| s.account.as_deref())
            .filter(|a| !a.eq_ignore_ascii_case(expected))
        {
            let of = if expected.eq_ignore_ascii_case(mi.spec.mailbox.address.trim()) {
                format!("the mailbox {expected}")
            } else {
                format!("{expected} (spec.oauth.signInAccount)")
            };
            return Some(MailboxState::Failed {
                reason: crate::reason::Reason::AccountMismatch.as_str().into(),
                message: format!(
                    "the grant is of {account}, not of {of}: its token is not sent to the mail server; sign in again as {expected} (status.signIn.url)"
                ),
            });
        }
        None
    }

    /// What every check starts with: the servers to check with which token, or (`Err`) what to
    /// report without a check (nothing to check, a refusal, no valid token).
    fn start<'t>(
        &self,
        mi: &MailIntegration,
        token: Option<CheckToken<'t>>,
        now: Timestamp,
    ) -> Result<Check<'t>, Option<MailboxState>> {
        let targets = targets(mi);
        if targets.is_empty() {
            return Err(Some(MailboxState::NotConfigured));
        }
        if let Some(refused) = self.refusal(mi, &targets) {
            return Err(Some(refused));
        }
        let Some(token) = token.filter(|t| t.expires_at > now) else {
            return Err(None);
        };
        // A new grant, a new token after a failure, or a new spec (servers, mechanism, address)
        // means a new check (`Cached::answers`).
        let generation = mi.metadata.generation.unwrap_or(0);
        let made = Made {
            token: format!("{}/{generation}", Self::fingerprint(token.access_token)),
            grant: format!("{}/{generation}", token.grant),
        };
        Ok(Check {
            targets,
            token: token.access_token,
            key: mi.uid().unwrap_or_default(),
            made,
        })
    }

    /// A short fingerprint of the token, so the cache can tell a new token without keeping it.
    fn fingerprint(token: &SecretValue) -> String {
        short_hex(&sha2::Sha256::digest(token.expose().as_bytes()))
    }

    /// The state to report: a fresh check when the token changed or the last check is older than
    /// the interval, the cached result otherwise. `None` when there is no valid token to check with.
    pub async fn state(
        &self,
        mi: &MailIntegration,
        token: Option<CheckToken<'_>>,
        extra_ca_pem: Option<Vec<u8>>,
        now: Timestamp,
    ) -> Option<MailboxState> {
        let Check {
            targets,
            token,
            key,
            made,
        } = match self.start(mi, token, now) {
            Ok(check) => check,
            Err(report) => return report,
        };
        if let Some(c) = self.cache.locked().get(&key)
            && c.answers(&made, mi, now)
        {
            return Some(c.state.clone());
        }
        let state = {
            let _permit = self
                .permits
                .acquire(&mi.namespace().unwrap_or_default())
                .await?;
            let state = self.check_all(&targets, token, extra_ca_pem).await;
            explain_app_only(&mi.spec, state)
        };
        self.count(&state);
        self.cache.locked().insert(
            key,
            Cached {
                made,
                at: now,
                state: state.clone(),
            },
        );
        Some(state)
    }

    /// Like [`Self::state`], but a check that is needed runs in the background (bounded by the
    /// same permits) and calls `done` when its result is in the cache; meanwhile the last finished
    /// result is returned, or what the status says (`MailboxConnected` as last reported), so that a
    /// refresh is not held by a mail server and its status write does not flap Ready. One
    /// exception: when `refreshed` with no result known yet (see [`joins`]) and a join slot is
    /// free, the check's result is waited for up to the join wait and returned instead of the last
    /// one (`done` is still called; its reconcile then writes nothing).
    pub async fn state_joined(
        self: &std::sync::Arc<Self>,
        mi: &MailIntegration,
        token: Option<CheckToken<'_>>,
        extra_ca_pem: Option<Vec<u8>>,
        now: Timestamp,
        refreshed: bool,
        done: impl FnOnce() + Send + 'static,
    ) -> Option<MailboxState> {
        let (last, started) = self
            .in_background(mi, token, extra_ca_pem, now, refreshed, done)
            .await;
        let Some((result, _slot)) = started else {
            return last;
        };
        match tokio::time::timeout(self.join_wait, result).await {
            Ok(Ok(state)) => {
                self.count_join("joined");
                Some(state)
            }
            // Slower than the wait: the check reports in a write of its own.
            _ => {
                self.count_join("late");
                last
            }
        }
    }

    fn count_join(&self, result: &str) {
        self.metrics
            .mailbox_check_joins
            .get_or_create(&crate::metrics::JoinLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The state to report now and, when the caller `refreshed` and may wait (see [`joins`]) and
    /// a join slot is free, the result of the check started for it.
    async fn in_background(
        self: &std::sync::Arc<Self>,
        mi: &MailIntegration,
        token: Option<CheckToken<'_>>,
        extra_ca_pem: Option<Vec<u8>>,
        now: Timestamp,
        refreshed: bool,
        done: impl FnOnce() + Send + 'static,
    ) -> (Option<MailboxState>, Started) {
        let check = match self.start(mi, token, now) {
            Ok(check) => check,
            Err(report) => return (report, None),
        };
        let reported = reported_state(mi.status.as_ref());
        let last = self.last_or_resumed(mi, &check, reported.clone(), now);
        if let Some(c) = &last
            && c.answers(&check.made, mi, now)
        {
            return (Some(c.state.clone()), None);
        }
        let known = last.map(|c| c.state).or(reported);
        let join = joins(refreshed, known.is_some(), self.join_wait);
        let started = self.spawn_check(mi, check, extra_ca_pem, join, done).await;
        (known, started)
    }

    /// The last finished check of this integration; on the first look since the process started,
    /// the one the status reports (its result and time), so the check is due from then.
    fn last_or_resumed(
        &self,
        mi: &MailIntegration,
        check: &Check<'_>,
        reported: Option<MailboxState>,
        now: Timestamp,
    ) -> Option<Cached> {
        let mut cache = self.cache.locked();
        if !cache.contains_key(&check.key)
            && let Some(state) = reported
            && let Some(at) = resumed_check_time(mi, now)
        {
            cache.insert(
                check.key.clone(),
                Cached {
                    made: check.made.clone(),
                    at,
                    state,
                },
            );
        }
        cache.get(&check.key).cloned()
    }

    /// Run `check` in the background unless one of this integration runs already; with `join` and
    /// a free join slot, it hands its result back as well.
    async fn spawn_check(
        self: &std::sync::Arc<Self>,
        mi: &MailIntegration,
        check: Check<'_>,
        extra_ca_pem: Option<Vec<u8>>,
        join: bool,
        done: impl FnOnce() + Send + 'static,
    ) -> Started {
        let Check {
            targets,
            token,
            key,
            made,
        } = check;
        if self.running.locked().contains(&key) {
            return None;
        }
        let namespace = mi.namespace().unwrap_or_default();
        // Every slot taken (or the namespace's share of them): checks that answer free them as
        // the queue moves; slow ones hold them, and this refresh goes on without.
        let slot = if join {
            self.join_slots
                .take(&namespace, JOIN_SLOT_WAIT, JOIN_SLOT_WAIT_MAX)
                .await
        } else {
            None
        };
        // Marked running only after the wait for a slot, with nothing awaited until the task is
        // spawned: a reconcile dropped while it waited (a shutdown, a lost lease) leaves no mark
        // that would keep this integration's checks from ever running again.
        if !self.running.locked().insert(key.clone()) {
            return None;
        }
        if join && slot.is_none() {
            self.count_join("no_slot");
        }
        let (tx, started) = match slot {
            Some(slot) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some((rx, slot)))
            }
            None => (None, None),
        };
        tokio::spawn(self.clone().background(
            Queued {
                namespace,
                targets,
                token: token.clone(),
                spec: Box::new(mi.spec.clone()),
                key,
                made,
                ca: extra_ca_pem,
                tx,
            },
            done,
        ));
        started
    }

    /// A check started by [`Self::spawn_check`]: waits for its permit, checks, keeps the result,
    /// hands it to a waiting refresh and calls `done`. What it holds while queued is its inputs
    /// only (the protocol's state is boxed inside [`mailbox::check`]): at 10,000 integrations
    /// whose checks queue behind the permits, each queued check is a task of this future's size.
    async fn background(
        self: std::sync::Arc<Self>,
        q: Queued,
        done: impl FnOnce() + Send + 'static,
    ) {
        let Queued {
            namespace,
            targets,
            token,
            spec,
            key,
            made,
            ca,
            tx,
        } = q;
        if let Some(_permit) = self.permits.acquire(&namespace).await {
            let state = self.check_all(&targets, &token, ca).await;
            let state = explain_app_only(&spec, state);
            self.count(&state);
            self.cache.locked().insert(
                key.clone(),
                Cached {
                    made,
                    at: Timestamp::now(),
                    state: state.clone(),
                },
            );
            if let Some(tx) = tx {
                // The waiter may have given up: the result is in the cache for `done`'s.
                let _ = tx.send(state);
            }
        }
        self.running.locked().remove(&key);
        done();
    }

    fn count(&self, state: &MailboxState) {
        let (result, reason) = match state {
            MailboxState::Failed { reason, .. } => ("failure", reason.clone()),
            _ => ("success", "Connected".to_owned()),
        };
        self.metrics
            .mailbox_checks
            .get_or_create(&RefreshLabels {
                result: result.into(),
                reason,
            })
            .inc();
    }

    /// When the last finished check of this integration ran, if one did in this process (or was
    /// taken over from the status at start).
    pub fn checked_at(&self, mi: &MailIntegration) -> Option<Timestamp> {
        self.cache
            .locked()
            .get(&mi.uid().unwrap_or_default())
            .map(|c| c.at)
    }

    /// When the cached result expires (the next periodic check), if there is one.
    pub fn next_check_at(&self, mi: &MailIntegration) -> Option<Timestamp> {
        let interval = mi.spec.check_interval();
        self.cache
            .locked()
            .get(&mi.uid().unwrap_or_default())
            .map(|c| crate::time::after(c.at, interval))
    }

    pub fn forget(&self, uid: &str) {
        self.cache.locked().remove(uid);
    }

    /// Checks running in the background now.
    pub fn running(&self) -> usize {
        self.running.locked().len()
    }

    async fn check_all(
        &self,
        targets: &[CheckTarget],
        token: &SecretValue,
        ca: Option<Vec<u8>>,
    ) -> MailboxState {
        let mut connected = Vec::new();
        for t in targets {
            // The host is on the list (see `refusal`); the addresses it resolves to are checked
            // when connecting.
            let mut target = t
                .clone()
                .with_timeout(self.timeout)
                .with_allowed(self.allowed.clone());
            if let Some(pem) = &ca {
                target = target.with_extra_ca_pem(pem.clone());
            }
            match mailbox::check(&target, token).await {
                Ok(ok) => connected.push(format!(
                    "{} {}:{}: {ok}",
                    protocol_name(t.protocol),
                    t.host,
                    t.port
                )),
                Err(e) => return failed(t, &e),
            }
        }
        MailboxState::Connected(connected.join("; "))
    }
}

/// The servers to check: the read protocol's server and, when set, SMTP submission.
pub fn targets(mi: &MailIntegration) -> Vec<CheckTarget> {
    let spec = &mi.spec;
    let user = spec.mailbox.address.clone();
    let mechanism = match spec.mailbox.mechanism.unwrap_or_default() {
        SaslMechanismName::XOAuth2 => SaslMechanism::XOAuth2,
        SaslMechanismName::OAuthBearer => SaslMechanism::OAuthBearer,
    };
    let mut out = Vec::new();
    if let Some(server) = crate::provider::mail_server(spec)
        && let Ok(t) =
            CheckTarget::for_server(&server, CheckProtocol::from(spec.protocol()), user.clone())
    {
        out.push(t.with_mechanism(mechanism));
    }
    if let Some(smtp) = &spec.mailbox.smtp
        && let Ok(t) = CheckTarget::for_server(smtp, CheckProtocol::Smtp, user)
    {
        out.push(t.with_mechanism(mechanism));
    }
    out
}

/// Key of the CA bundle in the CA Secret.
pub fn ca_key(mi: &MailIntegration) -> Option<(&str, &str)> {
    mi.spec
        .mailbox
        .ca_secret_ref
        .as_ref()
        .map(|r| (r.name.as_str(), r.key.as_deref().unwrap_or(DEFAULT_CA_KEY)))
}

mod failure;
mod join;
mod status;
pub use failure::explain_app_only;
use failure::{failed, protocol_name};
pub use status::{apply, reported_state, resumed_check_time};

#[cfg(test)]
mod tests;
