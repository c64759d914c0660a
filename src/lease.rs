//! Fencing of the leader: whether this process may still act as the one that refreshes.
//!
//! [`elect`] elects the leader and renews its Lease, one conditional write per renewal; the
//! [`Fence`] is valid until `leaseDuration - margin` after the last acknowledged renewal was sent,
//! by this process's monotonic clock, and a standby takes over only after it saw the record
//! unchanged for `leaseDuration` by its own: the fence lapses first, whatever the two wall clocks
//! say. Every provider call and every write-ahead mark checks it first. A lapsed fence pauses
//! provider calls; the leader steps down (and the process exits to restart as a standby) when the
//! Lease names another holder or no renewal was acknowledged for the whole duration.

pub mod elect;

use crate::sync::LockExt as _;
use kube::Client;
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
    /// election) and when the Lease is lost, so that a renewal finishing during the drain cannot
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

    /// How often the leader renews the Lease: every third of the duration.
    pub fn renew_interval(&self) -> Duration {
        self.duration.checked_div(3).unwrap_or_default()
    }

    /// How long one Lease request may take: what is left of the fence after a renewal was sent
    /// one interval after the last acknowledged one, `duration - margin - interval` (at least 2 s),
    /// so that a renewal that slow still keeps the fence valid. Beyond it the request is abandoned
    /// and retried.
    pub fn request_timeout(&self) -> Duration {
        self.duration
            .saturating_sub(self.skew_margin())
            .saturating_sub(self.renew_interval())
            .max(Duration::from_secs(2))
    }

    /// How often a standby reads the Lease.
    pub fn poll_interval(&self) -> Duration {
        self.duration
            .checked_div(15)
            .unwrap_or_default()
            .clamp(Duration::from_millis(200), Duration::from_secs(2))
    }
}

/// A client for the Lease alone: short timeouts, so a partition is noticed within seconds, not when
/// a TCP connection finally gives up; a slow answer within [`LeaseConfig::request_timeout`] is
/// waited for.
pub fn lease_client(config: &kube::Config, lease: &LeaseConfig) -> Result<Client, kube::Error> {
    let mut config = config.clone();
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(lease.request_timeout());
    config.write_timeout = Some(lease.request_timeout());
    config.reset_reader_on_write = true;
    Client::try_from(config)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        // A renewal finishing during the drain does not open it again.
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
        // Renewed every 5 s; a renewal that takes 6 s (the request timeout) sent 5 s after the
        // last acknowledged one is acknowledged before the fence (12 s) lapses.
        assert_eq!(c.renew_interval(), Duration::from_secs(5));
        assert_eq!(c.request_timeout(), Duration::from_secs(7));
        assert!(c.renew_interval() + c.request_timeout() <= c.duration - c.skew_margin());
        // The chart's 15 s at the test binaries' scale (8 s): every 2.67 s, 3.73 s at most.
        let t = LeaseConfig {
            duration: Duration::from_secs(8),
            ..c.clone()
        };
        assert!(t.renew_interval() + t.request_timeout() <= t.duration - t.skew_margin());
    }
}
