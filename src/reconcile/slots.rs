//! Which second of its refresh window each integration's next refresh is announced for.
//!
//! Tokens issued in one wave (a first refresh of thousands of integrations, a restart after an
//! outage) would all come due in a wave of the same shape one lifetime later, and a wave that the
//! operator took at its full pace comes back at that pace: every refresh in it waits for the ones
//! before. A random jitter narrower than the wave only blurs its edges. Here each refresh takes
//! the least-loaded second of its window (the latest of equals, so no refresh is earlier than it
//! needs to be), which spreads a wave over its length plus the window's.
//!
//! The load is what this process announced: a restart learns it again from the statuses as it
//! reconciles them ([`RefreshSlots::hold`]), and the announced second stays in the status, so an
//! idle reconcile after a restart writes nothing.

use super::decide::Window;
use crate::sync::LockExt as _;
use jiff::Timestamp;
use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher as _, RandomState},
    sync::Mutex,
};

/// The refreshes announced per second, and the second each integration holds.
#[derive(Debug, Default)]
pub struct RefreshSlots(Mutex<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Announced refreshes per second (Unix seconds); seconds already past are dropped now and then.
    load: BTreeMap<i64, u32>,
    /// The second each integration holds, by a hash of its UID (8 bytes instead of the UID's 36).
    held: HashMap<u64, i64>,
    hasher: RandomState,
}

/// How far in the past the load table may reach before it is pruned.
const PRUNE_AFTER_S: i64 = 60;

impl RefreshSlots {
    /// Announce the next refresh of `uid` in `window`: its least-loaded second after `now`, the
    /// latest of equals; the window's last second when none of it is after `now`. Replaces what
    /// `uid` held.
    pub fn pick(&self, uid: &str, window: Window, now: Timestamp) -> Timestamp {
        let latest = window.latest.as_second();
        let earliest = ceil_second(window.earliest).max(now.as_second().saturating_add(1));
        let mut inner = self.0.locked();
        inner.prune(now.as_second());
        let chosen = if earliest > latest {
            latest
        } else {
            inner.least_loaded(earliest, latest)
        };
        inner.set(uid, Some(chosen));
        Timestamp::from_second(chosen).unwrap_or(window.latest)
    }

    /// Record the second `uid`'s status announces (`None`: no refresh announced).
    pub fn hold(&self, uid: &str, at: Option<Timestamp>) {
        self.0.locked().set(uid, at.map(|t| t.as_second()));
    }

    /// How many refreshes are announced for the second of `at` (for tests and diagnostics).
    pub fn load_at(&self, at: Timestamp) -> u32 {
        self.0
            .locked()
            .load
            .get(&at.as_second())
            .copied()
            .unwrap_or(0)
    }
}

impl Inner {
    fn set(&mut self, uid: &str, second: Option<i64>) {
        let key = self.hasher.hash_one(uid);
        let previous = match second {
            Some(s) => self.held.insert(key, s),
            None => self.held.remove(&key),
        };
        if previous == second {
            return;
        }
        if let Some(p) = previous
            && let Some(n) = self.load.get_mut(&p)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.load.remove(&p);
            }
        }
        if let Some(s) = second {
            let n = self.load.entry(s).or_default();
            *n = n.saturating_add(1);
        }
    }

    /// The least-loaded second of `[earliest, latest]` (not empty), the latest of equals: walks
    /// the seconds that hold refreshes from the latest down, and stops at the first free one.
    fn least_loaded(&self, earliest: i64, latest: i64) -> i64 {
        let mut best = (u32::MAX, latest);
        let mut expected = latest;
        for (&second, &n) in self.load.range(earliest..=latest).rev() {
            if second < expected {
                return expected;
            }
            if n < best.0 {
                best = (n, second);
            }
            expected = second.saturating_sub(1);
        }
        if expected >= earliest {
            return expected;
        }
        best.1
    }

    fn prune(&mut self, now: i64) {
        if self
            .load
            .first_key_value()
            .is_some_and(|(&s, _)| s < now.saturating_sub(PRUNE_AFTER_S))
        {
            self.load = self.load.split_off(&now);
        }
    }
}

fn ceil_second(t: Timestamp) -> i64 {
    let s = t.as_second();
    if t.subsec_nanosecond() > 0 {
        s.saturating_add(1)
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn window(earliest: i64, latest: i64) -> Window {
        Window {
            earliest: at(earliest),
            latest: at(latest),
        }
    }

    #[test]
    fn a_refresh_takes_the_latest_free_second_then_the_least_loaded() {
        let slots = RefreshSlots::default();
        assert_eq!(slots.pick("a", window(10, 12), at(0)), at(12));
        assert_eq!(slots.pick("b", window(10, 12), at(0)), at(11));
        assert_eq!(slots.pick("c", window(10, 12), at(0)), at(10));
        // All three seconds hold one: the latest of equals.
        assert_eq!(slots.pick("d", window(10, 12), at(0)), at(12));
        assert_eq!(slots.load_at(at(12)), 2);
        // A gap below the occupied seconds is found too.
        slots.hold("e", Some(at(9)));
        assert_eq!(slots.pick("f", window(8, 12), at(0)), at(8));
    }

    #[test]
    fn picking_again_moves_the_integration_instead_of_counting_it_twice() {
        let slots = RefreshSlots::default();
        assert_eq!(slots.pick("a", window(10, 12), at(0)), at(12));
        assert_eq!(slots.pick("a", window(20, 22), at(0)), at(22));
        assert_eq!(slots.load_at(at(12)), 0);
        assert_eq!(slots.load_at(at(22)), 1);
        slots.hold("a", Some(at(22)));
        assert_eq!(slots.load_at(at(22)), 1);
        slots.hold("a", None);
        assert_eq!(slots.load_at(at(22)), 0);
    }

    #[test]
    fn a_window_in_the_past_gives_its_last_second() {
        let slots = RefreshSlots::default();
        assert_eq!(slots.pick("a", window(10, 12), at(30)), at(12));
        // Seconds up to now are never chosen while later ones are in the window.
        assert_eq!(slots.pick("b", window(10, 20), at(15)), at(20));
        assert_eq!(slots.pick("c", window(10, 20), at(19)), at(20));
        assert_eq!(slots.load_at(at(20)), 2);
    }

    #[test]
    fn a_wave_of_ten_thousand_tokens_issued_within_two_minutes_is_spread_over_its_windows() {
        // 10,000 ten-minute tokens issued at 100 per second (the saturated first refresh of a
        // 2-core machine), refreshBefore 1m: windows of the fifth of the lifetime before
        // expiry - 1m, as `decide::refresh_window` gives them.
        let slots = RefreshSlots::default();
        for i in 0..10_000i64 {
            let issued = i / 100;
            let latest = issued + 540;
            let got = slots.pick(
                &format!("uid-{i}"),
                window(latest - 120, latest),
                at(issued),
            );
            assert!(got >= at(latest - 120) && got <= at(latest), "{got}");
        }
        let busiest = (0..700).map(|s| slots.load_at(at(s))).max().unwrap();
        // Due at the issuing pace, 100 refreshes would come due in every second of the wave (a
        // uniform jitter narrower than the wave keeps its middle at that pace); the least-loaded
        // second leaves at most 57 in any one (10,000 / (100 s + 120 s) = 45 is the floor).
        assert!(busiest <= 60, "busiest second holds {busiest}");
    }
}
