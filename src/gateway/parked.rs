//! Parked upstream IMAP sessions, per credential (the decisions: [`super::reuse`]).
//!
//! After the gateway answered an app's LOGOUT itself, a reset-safe session is parked here instead
//! of logged out: its upstream connection, what the server answered at its login (the untagged
//! lines and the tagged reply's text, so that the next app gets the same answer, capabilities
//! included), and the session's lease, which keeps counting it against the credential's session
//! cap. A task per parked session holds the connection and ends it (LOGOUT upstream) when:
//! - it was idle for `--imap-reuse-idle`, or its token comes within [`reuse::TOKEN_MARGIN`] of
//!   its expiry;
//! - the credential is revoked (app removed, integration deleted, password retired: the lease's
//!   token), or the integration's entry changes so that the token or the server it was
//!   authenticated with is no longer the current one;
//! - the server sends anything or closes (nothing is expected from an unselected, idle session);
//! - the gateway shuts down, or the slot is evicted: more than `--imap-reuse-per-credential`
//!   parked, or an active login of the credential needed its place under the session cap.
//!
//! A parked session is taken only by a login that passed the credential check for the same
//! username (protocol IMAP), with the same [`reuse::fingerprint`] (token, integration, mailbox,
//! server), and proven alive with a NOOP answered by its tagged OK alone within
//! [`PROBE_TIMEOUT`]; else the login gets a new upstream session as before.
//!
//! Memory: a parked session holds no app connection: its upstream TLS connection (rustls' 4 KiB
//! receive buffer while its read is pending, keys and state ~4.6 KiB), the login answer (a few
//! hundred bytes), the slot (~100 bytes) and its task (~0.5 KiB): about 10 KiB.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use jiff::Timestamp;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

use super::{
    directory::Directory,
    metrics::GatewayMetrics,
    prelogin::log_out_upstream,
    reuse::{self, Decision, ParkInput, Reset},
    session::{Authorized, Entry, SessionLease},
    upstream::AsyncStream,
};

/// How long a parked session has to answer the NOOP that proves it alive.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server has to answer the UNSELECT sent before parking.
pub const UNSELECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes read while waiting for a tagged reply of the gateway's own.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The server's answer to the session's login, kept for the next app that gets the session.
#[derive(Clone, Debug, Default)]
pub struct LoginAnswer {
    /// Untagged lines before the tagged reply (CRLF-terminated).
    pub untagged: Vec<u8>,
    /// The tagged reply without its tag (`OK [CAPABILITY ...] Logged in`).
    pub reply: String,
}

/// A parked session handed to a login.
pub struct Reused {
    pub stream: Box<dyn AsyncStream>,
    pub answer: LoginAnswer,
}

/// The reuse settings (flags `--imap-reuse-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long a session stays parked; zero: reuse is off.
    pub idle: Duration,
    /// Parked sessions per credential at most.
    pub per_credential: usize,
    /// Parked sessions of one integration (all its credentials) at most.
    pub per_mailbox: usize,
}

/// The integration a credential's username (`namespace/integration/app`) belongs to.
fn mailbox_of(username: &str) -> &str {
    username.rsplit_once('/').map_or(username, |(m, _)| m)
}

/// Take the slot at the position `pick` chooses from `username`'s list, dropping the list once
/// it is empty.
fn take_from(
    slots: &mut HashMap<String, VecDeque<Slot>>,
    username: &str,
    pick: impl FnOnce(&VecDeque<Slot>) -> Option<usize>,
) -> Option<Slot> {
    let list = slots.get_mut(username)?;
    let slot = pick(list).and_then(|at| list.remove(at));
    if list.is_empty() {
        slots.remove(username);
    }
    slot
}

/// Which parked sessions to log out so that `username`'s list holds at most `per_credential`
/// and its integration's lists together at most `per_mailbox`: the oldest first (ids grow).
/// `slots`: every credential's ids, of which only the integration's are read. Returns
/// (username, id) pairs.
fn over_caps<'a>(
    slots: impl Iterator<Item = (&'a str, impl Iterator<Item = u64>)>,
    username: &str,
    per_credential: usize,
    per_mailbox: usize,
) -> Vec<(String, u64)> {
    let mailbox = mailbox_of(username);
    let mut out = Vec::new();
    let mut same_mailbox: Vec<(u64, &str)> = Vec::new();
    for (user, ids) in slots.filter(|(u, _)| mailbox_of(u) == mailbox) {
        let ids: Vec<u64> = ids.collect();
        let over = if user == username {
            ids.len().saturating_sub(per_credential)
        } else {
            0
        };
        out.extend(ids.iter().take(over).map(|id| (user.to_owned(), *id)));
        same_mailbox.extend(ids.iter().skip(over).map(|id| (*id, user)));
    }
    same_mailbox.sort_unstable();
    let over = same_mailbox.len().saturating_sub(per_mailbox);
    out.extend(
        same_mailbox
            .into_iter()
            .take(over)
            .map(|(id, user)| (user.to_owned(), id)),
    );
    out
}

/// One parked session, as the pool lists it.
struct Slot {
    id: u64,
    fingerprint: [u8; 32],
    /// Counts the session against the credential's cap until the slot is dropped.
    lease: SessionLease,
    /// Sends the task where to hand the session; dropped: the task logs the session out.
    claim: oneshot::Sender<oneshot::Sender<Reused>>,
}

/// The parked sessions of every credential.
pub struct Pool {
    settings: Settings,
    directory: Arc<Directory>,
    metrics: Arc<GatewayMetrics>,
    /// Salts [`reuse::fingerprint`] (random per process).
    salt: [u8; 16],
    slots: Mutex<HashMap<String, VecDeque<Slot>>>,
    next_id: AtomicU64,
    closing: CancellationToken,
    /// Parked sessions' tasks still running (shutdown waits for their LOGOUTs).
    tasks: AtomicUsize,
}

impl Pool {
    pub fn new(
        settings: Settings,
        directory: Arc<Directory>,
        metrics: Arc<GatewayMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            directory,
            metrics,
            salt: rand::random(),
            slots: Mutex::default(),
            next_id: AtomicU64::new(0),
            closing: CancellationToken::new(),
            tasks: AtomicUsize::new(0),
        })
    }

    /// Whether sessions are parked now.
    pub fn enabled(&self) -> bool {
        !self.settings.idle.is_zero()
            && self.settings.per_credential > 0
            && !self.closing.is_cancelled()
    }

    fn fingerprint(&self, entry: &Entry) -> [u8; 32] {
        reuse::fingerprint(entry, &self.salt)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parked sessions of `username` now.
    pub fn parked(&self, username: &str) -> usize {
        self.lock().get(username).map_or(0, VecDeque::len)
    }

    fn remove(&self, username: &str, id: u64) -> Option<Slot> {
        take_from(&mut self.lock(), username, |l| {
            l.iter().position(|s| s.id == id)
        })
    }

    /// Drop the oldest parked session of `username` (its place under the session cap is free at
    /// once; its task logs it out): whether there was one.
    pub fn evict_oldest(&self, username: &str) -> bool {
        // Dropped after the lock (the statement's guard) is released.
        let slot = take_from(&mut self.lock(), username, |l| (!l.is_empty()).then_some(0));
        slot.is_some()
    }

    /// A parked session for `who` (who passed the credential check for IMAP), proven alive, if
    /// one fits; `None`: the login takes a new upstream session.
    pub async fn take(&self, who: &Authorized) -> Option<Reused> {
        if !self.enabled() || reuse::token_time_left(who.entry.expiry, Timestamp::now()).is_none() {
            return None;
        }
        let username = who.app.to_string();
        let fingerprint = self.fingerprint(&who.entry);
        loop {
            // The most recently parked first: the least likely to have been closed.
            let slot = take_from(&mut self.lock(), &username, |l| {
                l.iter()
                    .rposition(|s| s.fingerprint == fingerprint && !s.lease.is_revoked())
            })?;
            let Slot { claim, lease, .. } = slot;
            let (give, handed) = oneshot::channel();
            if claim.send(give).is_err() {
                continue;
            }
            // The task answers at once unless it is ending the session for a reason of its own.
            let Ok(Ok(mut reused)) = tokio::time::timeout(PROBE_TIMEOUT, handed).await else {
                continue;
            };
            // The new login's own lease counts the session from here.
            drop(lease);
            if exchange(&mut reused.stream, "P1", "NOOP", false, PROBE_TIMEOUT)
                .await
                .is_some()
            {
                self.metrics.upstream_reused.inc();
                return Some(reused);
            }
            self.metrics.park_dropped("probe_failed");
            tracing::info!(app = %who.app, reason = "probe_failed",
                "parked upstream session ended");
            tokio::spawn(async move {
                log_out_upstream(&mut reused.stream, "P2").await;
            });
            return None;
        }
    }

    /// After the gateway answered the app's LOGOUT: park the upstream session if the rules allow
    /// ([`reuse::decide`]), else log it out (with `tag`, the app's LOGOUT tag). The word for the
    /// session's log line: `parked`, or why not.
    pub async fn park_or_log_out(
        self: &Arc<Self>,
        who: Authorized,
        mut stream: Box<dyn AsyncStream>,
        answer: LoginAnswer,
        reset: Reset,
        tag: &str,
    ) -> &'static str {
        let username = who.app.to_string();
        let fingerprint = self.fingerprint(&who.entry);
        let current = self
            .directory
            .lookup(&username)
            .is_some_and(|e| self.fingerprint(&e) == fingerprint);
        let time_left = reuse::token_time_left(who.entry.expiry, Timestamp::now());
        let mut input = ParkInput {
            enabled: self.enabled(),
            answered_here: true,
            revoked: who.lease.is_revoked(),
            reset,
            unselect_offered: reuse::offers_unselect(&answer.untagged, &answer.reply),
            token_fresh: current && time_left.is_some(),
        };
        let mut decision = reuse::decide(input);
        if decision == Decision::LogOut("no_unselect")
            && !reuse::lists_capabilities(&answer.untagged, &answer.reply)
        {
            // The server did not list its capabilities at login (Outlook's login reply does
            // not): ask it now, after the login (the app is gone; the answer is not kept).
            if let Some(lines) =
                exchange(&mut stream, "P4", "CAPABILITY", true, UNSELECT_TIMEOUT).await
            {
                input.unselect_offered = reuse::offers_unselect(&lines, "");
                decision = reuse::decide(input);
            }
        }
        let not_parked = match decision {
            Decision::LogOut(why) => Some(why),
            Decision::UnselectThenPark => {
                exchange(&mut stream, "P0", "UNSELECT", true, UNSELECT_TIMEOUT)
                    .await
                    .is_none()
                    .then_some("unselect_failed")
            }
            Decision::Park => None,
        };
        if let Some(why) = not_parked {
            self.metrics.not_parked(why);
            log_out_upstream(&mut stream, tag).await;
            return "logged_out";
        }
        let (idle, expiring) = match time_left {
            Some(left) if left < self.settings.idle => (left, true),
            _ => (self.settings.idle, false),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (claim, claimed) = oneshot::channel();
        let revoked = who.lease.revocation();
        let evicted = {
            let mut slots = self.lock();
            let list = slots.entry(username.clone()).or_default();
            list.push_back(Slot {
                id,
                fingerprint,
                lease: who.lease,
                claim,
            });
            let over = over_caps(
                slots
                    .iter()
                    .map(|(u, l)| (u.as_str(), l.iter().map(|s| s.id))),
                &username,
                self.settings.per_credential,
                self.settings.per_mailbox.max(1),
            );
            over.into_iter()
                .filter_map(|(user, id)| {
                    take_from(&mut slots, &user, |l| l.iter().position(|s| s.id == id))
                })
                .collect::<Vec<_>>()
        };
        drop(evicted);
        self.metrics.upstream_parked.inc();
        self.metrics.upstream_parked_now.inc();
        self.tasks.fetch_add(1, Ordering::Relaxed);
        let held = Held {
            pool: self.clone(),
            username,
            id,
            fingerprint,
        };
        let parked = Reused { stream, answer };
        tokio::spawn(held.hold(parked, claimed, revoked, idle, expiring));
        "parked"
    }

    /// Shutting down: park nothing more, log every parked session out (waits for their LOGOUTs,
    /// at most a few seconds).
    pub async fn close(&self) {
        self.closing.cancel();
        let drained = async {
            while self.tasks.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(super::prelogin::LOGOUT_TIMEOUT, drained).await;
    }
}

/// A parked session's task: who it is and where it is listed.
struct Held {
    pool: Arc<Pool>,
    username: String,
    id: u64,
    fingerprint: [u8; 32],
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.metrics.upstream_parked_now.dec();
        self.pool.tasks.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Held {
    async fn hold(
        self,
        mut parked: Reused,
        mut claimed: oneshot::Receiver<oneshot::Sender<Reused>>,
        revoked: CancellationToken,
        idle: Duration,
        expiring: bool,
    ) {
        let mut changes = self.pool.directory.subscribe();
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(idle)
            .or_else(|| now.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(now);
        let mut byte = [0u8; 1];
        let reason = loop {
            tokio::select! {
                // An end (revocation, shutdown, a change, the server) before a claim ready at the
                // same time: a revoked session is never handed on.
                biased;
                _ = revoked.cancelled() => break "revoked",
                _ = self.pool.closing.cancelled() => break "shutdown",
                changed = changes.changed() => {
                    if changed.is_err() {
                        break "shutdown";
                    }
                    match self.pool.directory.lookup(&self.username) {
                        Some(e) if self.pool.fingerprint(&e) == self.fingerprint => continue,
                        Some(_) => break "token_changed",
                        None => break "revoked",
                    }
                }
                read = parked.stream.read(&mut byte) => {
                    break match read {
                        Ok(n) if n > 0 => "upstream_data",
                        _ => "upstream_closed",
                    };
                }
                claim = &mut claimed => match claim {
                    Ok(give) => match give.send(parked) {
                        Ok(()) => return,
                        Err(back) => {
                            parked = back;
                            break "abandoned";
                        }
                    },
                    Err(_) => break "evicted",
                },
                _ = tokio::time::sleep_until(deadline) => {
                    break if expiring { "token_expiring" } else { "idle" };
                }
            }
        };
        // Off the list first (its place under the cap is free), then a claim in flight fails.
        drop(self.pool.remove(&self.username, self.id));
        drop(claimed);
        self.pool.metrics.park_dropped(reason);
        tracing::info!(app = %self.username, reason, "parked upstream session ended");
        if reason != "upstream_closed" {
            log_out_upstream(&mut parked.stream, "P3").await;
        }
    }
}

/// Send `tag command` and read to its tagged reply, within `timeout`: `Some(the untagged lines
/// before it)` if it was `OK` with nothing else after it, and before it only untagged lines
/// without literals when `untagged` is allowed (else nothing).
async fn exchange(
    stream: &mut Box<dyn AsyncStream>,
    tag: &str,
    command: &str,
    untagged: bool,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let run = async {
        stream
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await
            .ok()?;
        stream.flush().await.ok()?;
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                match reply_line(&line, tag) {
                    ReplyLine::Ok => return buf.is_empty().then_some(lines),
                    ReplyLine::Untagged if untagged => lines.extend_from_slice(&line),
                    _ => return None,
                }
            }
            if buf.len().saturating_add(lines.len()) > MAX_REPLY_BYTES {
                return None;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(chunk.get(..n)?);
        }
    };
    tokio::time::timeout(timeout, run).await.ok().flatten()
}

#[derive(Debug, PartialEq, Eq)]
enum ReplyLine {
    /// `tag OK ...`.
    Ok,
    /// `* ...` without a literal.
    Untagged,
    /// Anything else: another status, another tag, a literal, a continuation.
    Other,
}

fn reply_line(line: &[u8], tag: &str) -> ReplyLine {
    let mut prefix = tag.as_bytes().to_vec();
    prefix.push(b' ');
    if let Some(rest) = line.strip_prefix(prefix.as_slice()) {
        let ok = rest
            .get(..3)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"OK "))
            || rest
                .get(..4)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"OK\r\n"));
        return if ok { ReplyLine::Ok } else { ReplyLine::Other };
    }
    if line.starts_with(b"* ") && !line.ends_with(b"}\r\n") {
        return ReplyLine::Untagged;
    }
    ReplyLine::Other
}

#[cfg(test)]
mod tests;
