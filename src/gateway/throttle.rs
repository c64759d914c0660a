//! Failed logins, counted per source address and per username (the `governor` crate's GCRA token
//! buckets, keyed), and sessions counted per credential.
//!
//! Every failed login takes one cell from its source's buckets and its username's:
//! - within the **budget** (`free` failures, one more forgiven per `period`) it is answered at once;
//! - past it, failed logins are answered only after a **delay**;
//! - past the **refusal** budget (`refuse` failures): a source address is refused outright, before
//!   any credential is checked, until its bucket has room again (the app is told when). A username
//!   is never locked out that way (anyone who knows it could lock the app out): its correct
//!   password still works, but its failed logins are answered "throttled" instead of "invalid".
//!
//! A good login from another address is therefore never affected by a brute-force run from one.
//! Memory is bounded: at most [`MAX_KEYS`] sources and usernames are tracked each; past that
//! (after dropping those whose buckets are full again) new ones share one bucket.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::keyed::HashMapStateStore,
};

/// Most keys tracked per kind.
pub const MAX_KEYS: usize = 65_536;
/// The largest budget a bucket takes (`--login-budget`, `--login-refuse-after` above it mean "no
/// limit" in practice), and the longest period (`--login-period`): governor computes period ×
/// burst in u64 nanoseconds, which larger values overflow (a panic in a debug build).
const MAX_BURST: u32 = 100_000;
const MAX_PERIOD: Duration = Duration::from_secs(86_400);

/// The throttle's settings (flags `--login-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failed logins answered without delay.
    pub free: u32,
    /// Failed logins before refusal (a source) or "throttled" answers (a username).
    pub refuse: u32,
    /// One failed login forgiven per period.
    pub period: Duration,
    /// The delay of a failed login past the budget.
    pub delay: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            free: 5,
            refuse: 20,
            period: Duration::from_secs(30),
            delay: Duration::from_secs(2),
        }
    }
}

type Limiter<K> = RateLimiter<K, HashMapStateStore<K>, DefaultClock>;

/// A token bucket per key with a bounded number of keys.
struct Buckets<K: std::hash::Hash + Eq + Clone> {
    limiter: Limiter<K>,
    overflow: K,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(burst: u32, period: Duration, clock: &DefaultClock, overflow: K) -> Self {
        let quota = Quota::with_period(period.clamp(Duration::from_millis(1), MAX_PERIOD))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst.min(MAX_BURST)).unwrap_or(NonZeroU32::MIN));
        Self {
            limiter: RateLimiter::hashmap_with_clock(quota, clock.clone()),
            overflow,
        }
    }

    /// Take a cell for `key`: `Err(wait)` when its bucket is empty.
    fn take(&self, key: K, clock: &DefaultClock) -> Result<(), Duration> {
        let mut key = key;
        if self.limiter.len() >= MAX_KEYS {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            if self.limiter.len() >= MAX_KEYS {
                key = self.overflow.clone();
            }
        }
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(clock.now()))
    }
}

/// The bucket of a source: its IPv4 address, or its IPv6 /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    crate::web::signin::limit::source_key(ip)
}

/// What the throttle does with a failed login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Penalty {
    /// Answer at once.
    None,
    /// Answer after this.
    Delay(Duration),
    /// Answer "throttled, retry after this".
    Refuse(Duration),
}

/// Failed logins per source and per username.
pub struct Throttle {
    config: ThrottleConfig,
    clock: DefaultClock,
    source_free: Buckets<IpAddr>,
    source_refuse: Buckets<IpAddr>,
    user_free: Buckets<String>,
    user_refuse: Buckets<String>,
    /// Sources refused until then (set when their refusal bucket ran dry).
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

const OVERFLOW_SOURCE: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        let clock = DefaultClock::default();
        let free = config.free.max(1);
        let refuse = config.refuse.max(free);
        Self {
            source_free: Buckets::new(free, config.period, &clock, OVERFLOW_SOURCE),
            source_refuse: Buckets::new(refuse, config.period, &clock, OVERFLOW_SOURCE),
            user_free: Buckets::new(free, config.period, &clock, String::new()),
            user_refuse: Buckets::new(refuse, config.period, &clock, String::new()),
            blocked: Mutex::default(),
            config,
            clock,
        }
    }

    /// Before a credential is checked: `Err(retry_after)` when the source is refused now.
    pub fn admit(&self, source: IpAddr) -> Result<(), Duration> {
        let key = source_key(source);
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match blocked.get(&key) {
            Some(until) if *until > now => Err(until.saturating_duration_since(now)),
            Some(_) => {
                blocked.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Count a failed login of `username` from `source`, and say what to do with it.
    pub fn failed(&self, source: IpAddr, username: &str) -> Penalty {
        let source = source_key(source);
        let user: String = username.chars().take(256).collect();
        let source_free = self.source_free.take(source, &self.clock);
        let source_refuse = self.source_refuse.take(source, &self.clock);
        let user_free = self.user_free.take(user.clone(), &self.clock);
        let user_refuse = self.user_refuse.take(user, &self.clock);
        if let Err(wait) = source_refuse {
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            if blocked.len() >= MAX_KEYS {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            if blocked.len() < MAX_KEYS
                && let Some(until) = Instant::now().checked_add(wait)
            {
                blocked.insert(source, until);
            }
            return Penalty::Refuse(wait);
        }
        if let Err(wait) = user_refuse {
            return Penalty::Refuse(wait);
        }
        if source_free.is_err() || user_free.is_err() {
            return Penalty::Delay(self.config.delay);
        }
        Penalty::None
    }
}

/// Sessions open per credential, capped.
#[derive(Default)]
pub struct SessionCounts {
    open: Mutex<HashMap<String, usize>>,
}

/// One counted session; uncounted when dropped.
pub struct Counted {
    counts: Arc<SessionCounts>,
    username: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.username) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.username);
            }
        }
    }
}

impl SessionCounts {
    /// Count a session of `username` unless it has `max` open already.
    pub fn try_open(self: &Arc<Self>, username: &str, max: usize) -> Option<Counted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(username.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n = n.saturating_add(1);
        Some(Counted {
            counts: self.clone(),
            username: username.to_owned(),
        })
    }

    /// Sessions open for `username`.
    pub fn open(&self, username: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(username)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Found by tests/properties.rs (`gateway_logins_open_only_their_own_credential`, which lifts
    /// the throttle): a budget of u32::MAX overflowed governor's period × burst.
    #[test]
    fn the_largest_budgets_and_periods_are_taken_without_overflow() {
        let t = Throttle::new(ThrottleConfig {
            free: u32::MAX,
            refuse: u32::MAX,
            period: Duration::MAX,
            delay: Duration::from_secs(2),
        });
        for _ in 0..10 {
            assert_eq!(t.failed(ip("10.0.0.1"), "ns/mi/app"), Penalty::None);
        }
        assert!(t.admit(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn a_source_gets_its_budget_then_delays_then_refusal_and_others_are_not_affected() {
        let t = Throttle::new(ThrottleConfig {
            free: 2,
            refuse: 4,
            period: Duration::from_secs(3600),
            delay: Duration::from_millis(5),
        });
        let a = ip("192.0.2.1");
        assert!(t.admit(a).is_ok());
        assert_eq!(t.failed(a, "u1"), Penalty::None);
        assert_eq!(t.failed(a, "u2"), Penalty::None);
        assert_eq!(t.failed(a, "u3"), Penalty::Delay(Duration::from_millis(5)));
        assert_eq!(t.failed(a, "u4"), Penalty::Delay(Duration::from_millis(5)));
        assert!(matches!(t.failed(a, "u5"), Penalty::Refuse(_)));
        let wait = t.admit(a).unwrap_err();
        assert!(wait > Duration::from_secs(3000), "{wait:?}");
        // Another address, even for the usernames tried, is admitted.
        assert!(t.admit(ip("192.0.2.2")).is_ok());
        assert_eq!(t.failed(ip("192.0.2.2"), "u9"), Penalty::None);
    }

    #[test]
    fn a_username_is_throttled_across_sources_but_never_blocks_a_source() {
        let t = Throttle::new(ThrottleConfig {
            free: 1,
            refuse: 2,
            period: Duration::from_secs(3600),
            delay: Duration::from_millis(1),
        });
        assert_eq!(t.failed(ip("198.51.100.1"), "ns/mi/app"), Penalty::None);
        assert!(matches!(
            t.failed(ip("198.51.100.2"), "ns/mi/app"),
            Penalty::Delay(_)
        ));
        assert!(matches!(
            t.failed(ip("198.51.100.3"), "ns/mi/app"),
            Penalty::Refuse(_)
        ));
        assert!(t.admit(ip("198.51.100.3")).is_ok());
        assert!(t.admit(ip("198.51.100.4")).is_ok());
    }

    #[test]
    fn sessions_are_capped_per_credential_and_released_on_drop() {
        let c = Arc::new(SessionCounts::default());
        let a = c.try_open("u", 2).unwrap();
        let _b = c.try_open("u", 2).unwrap();
        assert!(c.try_open("u", 2).is_none());
        assert!(c.try_open("v", 2).is_some());
        drop(a);
        assert_eq!(c.open("u"), 1);
        assert!(c.try_open("u", 2).is_some());
    }
}
