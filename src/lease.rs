//! Fencing of the leader: whether this process may still act as the one that refreshes.
//!
//! kube-lease-manager elects the leader and renews its Lease, but it reports `leader = true` until
//! it manages to read the Lease again, however long the API server is out of reach. The [`Fence`]
//! does not trust that flag: it reads the Lease itself (through a client with short connect and
//! read timeouts) and is valid only until `renewTime + leaseDuration - margin`, the `margin`
//! covering clock skew with the standby that will take over once the Lease has expired by its own
//! clock. Every provider call and every write-ahead mark checks it first; the leader steps down
//! (and the process exits to restart as a standby) as soon as it lapses.

use crate::sync::LockExt as _;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Why a fenced action is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "this operator does not hold a valid Lease (leadership lapsed or not confirmed yet), or is stopping"
)]
pub struct NotLeader;

/// Whether this process may act as the leader now: whether it may start a provider call or a
/// write-ahead mark. (The store of a refresh token already received is never fenced: its write is
/// conditional on the mark's resourceVersion, not on the Lease.)
#[derive(Debug, Default)]
pub struct Fence {
    /// `None`: no leader election, never fenced. `Some(None)`: leader election, not (yet) confirmed.
    valid_until: Option<Mutex<Option<Instant>>>,
    /// Closed for good ([`Fence::close`]): stopping, or the Lease was lost. No read of the Lease
    /// opens it again, with or without leader election.
    closed: AtomicBool,
}

impl Fence {
    /// No leader election: every action is allowed (until [`Fence::close`]).
    pub fn unfenced() -> Self {
        Self::default()
    }

    /// Leader election: nothing is allowed until a read of the Lease confirms this holder.
    pub fn leased() -> Self {
        Self {
            valid_until: Some(Mutex::new(None)),
            closed: AtomicBool::new(false),
        }
    }

    /// Refuse every new fenced action from now on, for good: on SIGTERM (with or without leader
    /// election) and when the Lease is lost, so that a confirmation read during the drain cannot
    /// make this process the leader again.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.revoke();
    }

    /// Whether [`Fence::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// `Ok` while the Lease is known to be held, with the margin for clock skew, and the fence is
    /// not closed.
    pub fn check(&self) -> Result<(), NotLeader> {
        if self.is_closed() {
            return Err(NotLeader);
        }
        match &self.valid_until {
            None => Ok(()),
            Some(v) => match *v.locked() {
                Some(until) if Instant::now() < until => Ok(()),
                _ => Err(NotLeader),
            },
        }
    }

    /// Record that the Lease is held until `until` (never moves the deadline back).
    pub fn confirm_until(&self, until: Instant) {
        if let Some(v) = &self.valid_until {
            let mut v = v.locked();
            *v = Some(v.map_or(until, |old| old.max(until)));
        }
    }

    /// Leadership is gone (another holder, or stepping down).
    pub fn revoke(&self) {
        if let Some(v) = &self.valid_until {
            *v.locked() = None;
        }
    }
}

/// The settings of leader election, as the process was started with.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// `leaseDurationSeconds`: a standby takes over this long after the last renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// The allowance for clock skew between this process and a standby: the fence lapses this long
    /// before the Lease expires.
    pub fn skew_margin(&self) -> Duration {
        self.duration
            .checked_div(5)
            .unwrap_or_default()
            .max(Duration::from_secs(1))
    }

    /// How long before expiry kube-lease-manager renews ("grace"): half the duration, so that a
    /// renewal is seen by the fence well before `duration - margin`.
    pub fn renew_grace_seconds(&self) -> u64 {
        (self.duration.as_secs() / 2).max(1)
    }

    /// How often the fence reads the Lease.
    pub fn poll_interval(&self) -> Duration {
        self.duration
            .checked_div(15)
            .unwrap_or_default()
            .clamp(Duration::from_millis(200), Duration::from_secs(2))
    }
}

/// How long the Lease, as read at `read_at` (wall clock `now`), is still held by `identity`, minus
/// the skew margin: `None` when it is not held by `identity`, or expires within the margin.
pub fn held_for(
    lease: &Lease,
    identity: &str,
    now: Timestamp,
    margin: Duration,
) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)?;
    let expires = crate::time::after(renewed, duration);
    let left = Duration::try_from(expires.duration_since(now)).ok()?;
    left.checked_sub(margin).filter(|d| !d.is_zero())
}

/// A client for the Lease alone: short timeouts, so a partition is noticed within seconds, not when
/// a TCP connection finally gives up.
pub fn lease_client(config: &kube::Config) -> Result<Client, kube::Error> {
    let mut config = config.clone();
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(4));
    config.write_timeout = Some(Duration::from_secs(4));
    config.reset_reader_on_write = true;
    Client::try_from(config)
}

/// Read the Lease once and move the fence: confirmed until the Lease (minus the margin) expires,
/// revoked when another identity holds it. A failed read changes nothing, so the fence lapses by
/// itself when reads keep failing.
pub async fn confirm_once(api: &Api<Lease>, config: &LeaseConfig, fence: &Fence) -> bool {
    let started = Instant::now();
    match api.get_opt(&config.name).await {
        Ok(Some(lease)) => {
            match held_for(
                &lease,
                &config.identity,
                Timestamp::now(),
                config.skew_margin(),
            ) {
                Some(left) => {
                    if let Some(until) = started.checked_add(left) {
                        fence.confirm_until(until);
                    }
                    true
                }
                None => {
                    fence.revoke();
                    false
                }
            }
        }
        Ok(None) => {
            fence.revoke();
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, lease = %config.name, "could not read the Lease; the leader's fence lapses unless a read succeeds");
            fence.check().is_ok()
        }
    }
}

/// Keep the fence current for as long as the future runs.
pub async fn keep_confirming(client: Client, config: LeaseConfig, fence: std::sync::Arc<Fence>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut tick = tokio::time::interval(config.poll_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        confirm_once(&api, &config, &fence).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed: &str, seconds: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                lease_duration_seconds: Some(seconds),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_fence_is_valid_until_expiry_minus_the_margin() {
        let now: Timestamp = "2026-12-01T10:00:05Z".parse().unwrap();
        let m = Duration::from_secs(3);
        let l = lease("me", "2026-12-01T10:00:00Z", 15);
        assert_eq!(held_for(&l, "me", now, m), Some(Duration::from_secs(7)));
        assert_eq!(held_for(&l, "other", now, m), None);
        let late: Timestamp = "2026-12-01T10:00:12Z".parse().unwrap();
        assert_eq!(
            held_for(&l, "me", late, m),
            None,
            "within the margin of expiry"
        );
        let expired: Timestamp = "2026-12-01T10:01:00Z".parse().unwrap();
        assert_eq!(held_for(&l, "me", expired, m), None);
        // Hostile or broken Leases: no panic, no validity.
        let negative = lease("me", "2026-12-01T10:00:00Z", -1);
        assert_eq!(held_for(&negative, "me", now, m), None);
        let far = lease("me", "9999-12-30T00:00:00Z", i32::MAX);
        assert!(held_for(&far, "me", now, m).is_some());
        assert_eq!(held_for(&Lease::default(), "me", now, m), None);
    }

    #[test]
    fn fence_states() {
        assert_eq!(Fence::unfenced().check(), Ok(()));
        let f = Fence::leased();
        assert_eq!(f.check(), Err(NotLeader));
        f.confirm_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(f.check(), Ok(()));
        // An older confirmation never shortens a newer one.
        f.confirm_until(Instant::now());
        assert_eq!(f.check(), Ok(()));
        f.revoke();
        assert_eq!(f.check(), Err(NotLeader));
        f.confirm_until(Instant::now());
        assert_eq!(f.check(), Err(NotLeader), "a deadline now is already past");
    }

    #[test]
    fn a_closed_fence_stays_closed() {
        let f = Fence::leased();
        f.confirm_until(Instant::now() + Duration::from_secs(60));
        f.close();
        assert_eq!(f.check(), Err(NotLeader));
        // A confirmation read finishing during the drain does not open it again.
        f.confirm_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(f.check(), Err(NotLeader));
        let u = Fence::unfenced();
        assert_eq!(u.check(), Ok(()));
        u.close();
        assert_eq!(
            u.check(),
            Err(NotLeader),
            "closed without leader election too"
        );
    }

    #[test]
    fn settings_fit_together() {
        let c = LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: "i".into(),
            duration: Duration::from_secs(15),
        };
        // Renewed every duration - grace; seen within one poll; valid until duration - margin.
        let renew_every = c.duration - Duration::from_secs(c.renew_grace_seconds());
        assert!(renew_every + c.poll_interval() * 2 < c.duration - c.skew_margin());
    }
}
