//! Leader election through the Lease, by this process's own clock alone.
//!
//! Every write of the Lease is one request, conditional on the resourceVersion last read (a
//! `replace`): a renewal costs one round trip, so a slow API server delays it by its latency once,
//! and a write based on a stale read fails with 409 instead of overwriting another holder's.
//! (kube-lease-manager, used before, renewed with an unconditional patch followed by a read: two
//! round trips per renewal, and its client gave up after 4 s, so one renewal slower than that made
//! the leader step down — issue 26, point 5.)
//!
//! Nothing compares another process's clock with this one's: a standby takes over only once it has
//! seen the same Lease record (resourceVersion) unchanged for the record's `leaseDurationSeconds`,
//! measured on its own monotonic clock from when it first saw it (what client-go's leader election
//! does), and the leader's [`Fence`] lasts `leaseDurationSeconds - margin` from when it *sent* its
//! last acknowledged renewal. A renewal is acknowledged only after the API server stored it, so the
//! standby saw the renewed record no earlier than it was sent: the leader's fence always lapses
//! before a standby may take over, however far apart the two processes' wall clocks are.
//!
//! The leader renews every third of the duration; a renewal that is late or refused (an API
//! server slow, unreachable or overloaded) is retried every second. While no renewal is
//! acknowledged the fence lapses (no provider call starts) `duration - margin` after the last one
//! was sent; leadership is given up only once the whole duration has passed, or when the Lease
//! names another holder. A renewal answered within `(duration - margin) / 2` (6 s of the chart's
//! 15 s) keeps the fence valid throughout.

use super::{Fence, LeaseConfig};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{Api, api::PostParams};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// The longest `leaseDurationSeconds` of another holder that is honoured: a Lease naming a
/// duration beyond it (hostile or broken) is taken over after this long unchanged.
const LONGEST_FOREIGN_DURATION: Duration = Duration::from_secs(3600);

/// How long after a failed Lease request the next one is sent.
const RETRY: Duration = Duration::from_secs(1);

/// The Lease as this process last read or wrote it, and when it first saw that record.
#[derive(Clone, Debug)]
pub struct Seen {
    pub lease: Lease,
    /// When this process first saw this resourceVersion (by its own monotonic clock).
    pub since: Instant,
}

impl Seen {
    fn version(&self) -> Option<&str> {
        self.lease.metadata.resource_version.as_deref()
    }

    /// A newer read: `since` stays when the record is the same one.
    fn updated(previous: Option<&Seen>, lease: Lease, now: Instant) -> Seen {
        let same = previous.is_some_and(|p| {
            p.version().is_some() && p.version() == lease.metadata.resource_version.as_deref()
        });
        Seen {
            since: if same {
                previous.map_or(now, |p| p.since)
            } else {
                now
            },
            lease,
        }
    }

    fn holder(&self) -> Option<&str> {
        self.lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .filter(|h| !h.is_empty())
    }
}

/// Whether `me` may take the Lease `seen`, at `now`: nobody holds it, `me` holds it already (this
/// process's pod restarted), or its holder has not renewed it for its own duration since this
/// process first saw the record. A missing or broken duration counts as `default`.
pub fn may_take(seen: &Seen, me: &str, now: Instant, default: Duration) -> bool {
    let Some(holder) = seen.holder() else {
        return true;
    };
    if holder == me {
        return true;
    }
    let duration = seen
        .lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(default, Duration::from_secs)
        .min(LONGEST_FOREIGN_DURATION);
    now.checked_duration_since(seen.since)
        .is_some_and(|unchanged| unchanged >= duration)
}

/// The Lease of `seen` (or a new one named `name`) held by `me` from `now`, renewed at `now`.
fn held_by(seen: Option<&Seen>, name: &str, me: &str, duration: Duration, now: Timestamp) -> Lease {
    let mut lease = seen.map_or_else(
        || Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: None,
        },
        |s| s.lease.clone(),
    );
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let taking = spec.holder_identity.as_deref() != Some(me);
    if taking {
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX));
    lease
}

/// What one Lease request came to.
enum Written {
    /// Stored: this process holds the Lease as of the request's start.
    Held(Box<Lease>),
    /// The record changed since it was read (409) or is gone (404): read it again.
    Stale,
    /// No answer in time, or another error: retry.
    Failed,
}

/// The running election: tells `leader` whether this process leads, and keeps `fence` valid while
/// it does. Runs until dropped.
pub async fn run(
    api: Api<Lease>,
    config: LeaseConfig,
    fence: Arc<Fence>,
    leader: watch::Sender<bool>,
) {
    let me = config.identity.clone();
    let mut seen: Option<Seen> = None;
    // When the last acknowledged write of this process (holding the Lease) was sent.
    let mut renewed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let Some(sent) = renewed {
            let over = sent.checked_add(config.duration).unwrap_or(now);
            if now >= over {
                tracing::warn!(lease = %config.name, "no renewal of the Lease was acknowledged for its whole duration: giving up leadership");
                renewed = None;
                fence.revoke();
                leader.send_replace(false);
                continue;
            }
            let due = sent.checked_add(config.renew_interval()).unwrap_or(now);
            tokio::time::sleep_until(due.into()).await;
            let timeout = config
                .request_timeout()
                .min(over.saturating_duration_since(Instant::now()));
            let started = Instant::now();
            match write(&api, &config, seen.as_ref(), timeout).await {
                Written::Held(lease) => {
                    seen = Some(Seen::updated(seen.as_ref(), *lease, Instant::now()));
                    renewed = Some(started);
                    confirm(&fence, &config, started);
                }
                Written::Stale => {
                    let Some(now_seen) = read(&api, &config, seen.as_ref()).await else {
                        tokio::time::sleep(RETRY).await;
                        continue;
                    };
                    seen = Some(now_seen);
                    // Still this process's (a renewal whose answer was lost landed after all):
                    // renew again on the record read.
                    if seen
                        .as_ref()
                        .is_none_or(|s| s.holder() != Some(me.as_str()))
                    {
                        tracing::warn!(lease = %config.name, holder = ?seen.as_ref().and_then(Seen::holder), "the Lease names another holder: giving up leadership");
                        renewed = None;
                        fence.revoke();
                        leader.send_replace(false);
                    }
                }
                Written::Failed => tokio::time::sleep(RETRY).await,
            }
            continue;
        }
        // A standby: read, and take the Lease once its holder let it go.
        match read(&api, &config, seen.as_ref()).await {
            Some(s) => seen = Some(s),
            None => {
                tokio::time::sleep(config.poll_interval().max(RETRY)).await;
                continue;
            }
        }
        let free = seen
            .as_ref()
            .is_none_or(|s| s.lease.metadata.resource_version.is_none())
            || seen
                .as_ref()
                .is_some_and(|s| may_take(s, &me, Instant::now(), config.duration));
        if free {
            let started = Instant::now();
            if let Written::Held(lease) =
                write(&api, &config, seen.as_ref(), config.request_timeout()).await
            {
                seen = Some(Seen::updated(seen.as_ref(), *lease, Instant::now()));
                renewed = Some(started);
                confirm(&fence, &config, started);
                tracing::info!(lease = %config.name, identity = %me, "took the Lease");
                leader.send_replace(true);
                continue;
            }
        }
        tokio::time::sleep(config.poll_interval()).await;
    }
}

/// The fence is valid until `duration - margin` after `sent`.
fn confirm(fence: &Fence, config: &LeaseConfig, sent: Instant) {
    if let Some(until) = config
        .duration
        .checked_sub(config.skew_margin())
        .and_then(|d| sent.checked_add(d))
    {
        fence.confirm_until(until);
    }
}

/// Read the Lease: `Some` with an empty record (no resourceVersion) when it does not exist,
/// `None` when the read failed.
async fn read(api: &Api<Lease>, config: &LeaseConfig, previous: Option<&Seen>) -> Option<Seen> {
    match tokio::time::timeout(config.request_timeout(), api.get_opt(&config.name)).await {
        Ok(Ok(Some(lease))) => Some(Seen::updated(previous, lease, Instant::now())),
        Ok(Ok(None)) => Some(Seen {
            lease: Lease::default(),
            since: Instant::now(),
        }),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, lease = %config.name, "could not read the Lease");
            None
        }
        Err(_) => {
            tracing::warn!(lease = %config.name, timeout_s = config.request_timeout().as_secs(), "no answer to a read of the Lease in time");
            None
        }
    }
}

/// Write the Lease as held by this process, conditional on the record of `seen` (created when it
/// does not exist).
async fn write(
    api: &Api<Lease>,
    config: &LeaseConfig,
    seen: Option<&Seen>,
    timeout: Duration,
) -> Written {
    let existing = seen.filter(|s| s.version().is_some());
    let lease = held_by(
        existing,
        &config.name,
        &config.identity,
        config.duration,
        Timestamp::now(),
    );
    let pp = PostParams::default();
    let request = async {
        match existing {
            Some(_) => api.replace(&config.name, &pp, &lease).await,
            None => api.create(&pp, &lease).await,
        }
    };
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(lease)) => Written::Held(Box::new(lease)),
        Ok(Err(kube::Error::Api(e))) if e.code == 409 || e.code == 404 => Written::Stale,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, lease = %config.name, "could not write the Lease");
            Written::Failed
        }
        Err(_) => {
            tracing::warn!(lease = %config.name, timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), "no answer to a write of the Lease in time");
            Written::Failed
        }
    }
}

/// Hand the Lease over at once (holder cleared, conditional on the record read): a standby takes it
/// on its next read instead of waiting for it to expire. Nothing when another process holds it.
pub async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), String> {
    let Some(seen) = read(api, config, None).await else {
        return Err("the Lease could not be read".into());
    };
    if seen.holder() != Some(config.identity.as_str()) {
        return Ok(());
    }
    let mut lease = seen.lease;
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
    }
    match tokio::time::timeout(
        config.request_timeout(),
        api.replace(&config.name, &PostParams::default(), &lease),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(holder: Option<&str>, seconds: Option<i32>, version: &str, since: Instant) -> Seen {
        Seen {
            lease: Lease {
                metadata: kube::api::ObjectMeta {
                    resource_version: Some(version.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: holder.map(str::to_owned),
                    lease_duration_seconds: seconds,
                    // A renewTime far in the future or the past changes nothing: no wall clock
                    // is compared.
                    renew_time: Some(MicroTime("2000-01-01T00:00:00Z".parse().unwrap())),
                    ..Default::default()
                }),
            },
            since,
        }
    }

    #[test]
    fn a_standby_takes_over_only_after_the_record_stayed_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        let s = seen(Some("other"), Some(15), "1", t0);
        assert!(!may_take(&s, "me", t0 + Duration::from_secs(14), d));
        assert!(may_take(&s, "me", t0 + Duration::from_secs(15), d));
        // A renewal (a new resourceVersion) starts the wait again; a read of the same record not.
        let again = Seen::updated(Some(&s), s.lease.clone(), t0 + Duration::from_secs(10));
        assert_eq!(again.since, t0);
        let mut renewed = s.lease.clone();
        renewed.metadata.resource_version = Some("2".into());
        let later = t0 + Duration::from_secs(14);
        let r = Seen::updated(Some(&s), renewed, later);
        assert_eq!(r.since, later);
        assert!(!may_take(&r, "me", t0 + Duration::from_secs(20), d));
        // Free, or held by this identity already.
        assert!(may_take(&seen(None, Some(15), "1", t0), "me", t0, d));
        assert!(may_take(&seen(Some(""), Some(15), "1", t0), "me", t0, d));
        assert!(may_take(&seen(Some("me"), Some(15), "1", t0), "me", t0, d));
    }

    #[test]
    fn hostile_durations_neither_panic_nor_block_forever() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        for bad in [None, Some(-1), Some(0)] {
            let s = seen(Some("other"), bad, "1", t0);
            assert!(!may_take(&s, "me", t0 + Duration::from_secs(14), d));
            assert!(may_take(&s, "me", t0 + d, d), "{bad:?}: the default");
        }
        let s = seen(Some("other"), Some(i32::MAX), "1", t0);
        assert!(may_take(&s, "me", t0 + LONGEST_FOREIGN_DURATION, d));
    }

    #[test]
    fn taking_a_lease_counts_a_transition_renewing_it_does_not() {
        let now: Timestamp = "2026-12-07T00:00:00Z".parse().unwrap();
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        let other = seen(Some("other"), Some(15), "1", t0);
        let taken = held_by(Some(&other), "l", "me", d, now);
        let spec = taken.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));
        assert_eq!(
            taken.metadata.resource_version.as_deref(),
            Some("1"),
            "conditional on the record read"
        );
        let mine = Seen {
            lease: taken,
            since: t0,
        };
        let later: Timestamp = "2026-12-07T00:00:05Z".parse().unwrap();
        let renewed = held_by(Some(&mine), "l", "me", d, later);
        let spec = renewed.spec.as_ref().unwrap();
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));
        assert_eq!(spec.renew_time, Some(MicroTime(later)));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        let new = held_by(None, "l", "me", d, now);
        assert_eq!(new.metadata.name.as_deref(), Some("l"));
        assert_eq!(new.spec.unwrap().lease_transitions, Some(1));
    }
}
