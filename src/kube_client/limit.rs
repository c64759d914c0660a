//! The pure decisions of the Kubernetes client's limit: how many requests per second it sends
//! ([`Aimd`]: grows while the API server answers promptly, halves on its signal), when the next
//! request may go ([`Pacer`]), and how long a refused request waits before it is sent again
//! ([`retry_delay`]). No clock and no randomness of their own: the callers pass `now` and the
//! jitter, so that each rule is a plain function of its inputs.

use std::time::Duration;
use tokio::time::Instant;

/// What one answer of the API server says about its load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Answered within [`Settings::slow`] (or a request whose time says nothing: lists, watches).
    Prompt,
    /// Answered, but slower than [`Settings::slow`]: requests queue at the server.
    Slow,
    /// 429 Too Many Requests: API Priority and Fairness (or the max-in-flight filter) refused it.
    Throttled,
}

/// How the limit behaves; [`Settings::adaptive`] with the defaults is the operator's default.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Adapt the limit to the API server's signals (AIMD). Off: a fixed limit of `cap`, or none.
    pub adaptive: bool,
    /// Requests per second at most, whatever the signals (`--kube-api-qps`); `None`: no cap.
    pub cap: Option<f64>,
    /// Where the adaptive limit starts: the fixed default of before (100 requests/s).
    pub initial: f64,
    /// The adaptive limit never goes below this (or the cap, if lower).
    pub floor: f64,
    /// The first increase per window past the limit that held before the last decrease (doubling
    /// each window up to `max_step`), and the least a window adds on the way back to that limit.
    pub step: f64,
    /// The most one window adds past the limit that held before the last decrease.
    pub max_step: f64,
    /// The period over which the signals are judged: at most one decrease per window; an increase
    /// at the end of a window whose requests were held back by the limit and met no signal.
    pub window: Duration,
    /// An answer slower than this is a [`Signal::Slow`].
    pub slow: Duration,
    /// How much earlier than its pace a request may go (a burst): this much time's worth of
    /// requests at the current limit.
    pub burst: Duration,
    /// Retries of one refused request at most ([`MAX_RETRIES`]).
    pub retries: u32,
}

impl Settings {
    /// The adaptive limit under `cap` (`None`: no cap).
    pub fn adaptive(cap: Option<f64>) -> Self {
        Settings {
            adaptive: true,
            cap,
            initial: 100.0,
            floor: 5.0,
            step: 10.0,
            max_step: 80.0,
            window: Duration::from_secs(1),
            slow: Duration::from_secs(1),
            burst: Duration::from_millis(100),
            retries: MAX_RETRIES,
        }
    }

    /// A fixed limit of `cap` requests per second (`None`: no limit at all).
    pub fn fixed(cap: Option<f64>) -> Self {
        Settings {
            adaptive: false,
            ..Self::adaptive(cap)
        }
    }

    /// `--kube-api-qps` (0: no cap) and whether the limit adapts.
    pub fn from_flags(qps: u64, adaptive: bool) -> Self {
        // A u64 of requests per second fits an f64 well enough for a limit.
        #[allow(clippy::cast_precision_loss)]
        let cap = (qps > 0).then_some(qps as f64);
        if adaptive {
            Self::adaptive(cap)
        } else {
            Self::fixed(cap)
        }
    }

    /// The limit a client starts with: `None` when nothing limits it.
    pub fn start_limit(&self) -> Option<f64> {
        if self.adaptive {
            Some(self.clamp(self.initial))
        } else {
            self.cap
        }
    }

    fn clamp(&self, limit: f64) -> f64 {
        let cap = self.cap.unwrap_or(f64::INFINITY);
        limit.max(self.floor).min(cap)
    }
}

/// Increase and multiplicative decrease of a rate limit, judged per window, as TCP's BIC does:
/// slow start (the limit doubles per window) until the first decrease; halved at most once per
/// window on a 429, or when at least a quarter (and 3) of the window's answers were slow. After a
/// decrease it climbs back toward the limit that held before it by half the distance per window (a
/// binary search; at least `step`), then probes past it by `step`, doubling per window up to
/// `max_step`. Without the search, a halving from 400 requests/s on one burst of slow answers took
/// 20 windows of `step` to come back while the API server idled; without the probing, a limit cut
/// down to 110 by a burst of slow answers from someone else's load took 25 windows to reach 350
/// (measured: docs/architecture.md). It grows only while the limit holds requests back: an idle
/// client keeps its limit.
#[derive(Clone, Debug)]
pub struct Aimd {
    settings: Settings,
    limit: f64,
    /// Below this the limit doubles per window; set to the limit at each decrease.
    threshold: f64,
    /// The limit in force before the last decrease (0 before the first): what growth climbs back
    /// toward by halves.
    before: f64,
    /// What the next increase past `before` adds: `step` after a decrease, doubling per window.
    probe: f64,
    window_start: Instant,
    /// This window: a request waited for the limit.
    held_back: bool,
    /// This window: the limit was lowered (no increase at its end).
    lowered: bool,
    answers: u32,
    slow: u32,
    /// No decrease before this (one per window).
    calm_until: Instant,
}

/// A change of the limit, for the metrics and the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    Raised(f64),
    Lowered(f64, Signal),
}

impl Aimd {
    pub fn new(settings: Settings, now: Instant) -> Self {
        Aimd {
            settings,
            limit: settings.clamp(settings.initial),
            threshold: f64::INFINITY,
            before: 0.0,
            probe: settings.step,
            window_start: now,
            held_back: false,
            lowered: false,
            answers: 0,
            slow: 0,
            calm_until: now,
        }
    }

    /// Requests per second allowed now.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// A request had to wait for the limit: demand is above it.
    pub fn held_back(&mut self, now: Instant) -> Option<Change> {
        let change = self.roll(now);
        self.held_back = true;
        change
    }

    /// An answer came, saying `signal`.
    pub fn answered(&mut self, now: Instant, signal: Signal) -> Option<Change> {
        let rolled = self.roll(now);
        self.answers = self.answers.saturating_add(1);
        let congested = match signal {
            Signal::Prompt => false,
            Signal::Throttled => true,
            Signal::Slow => {
                self.slow = self.slow.saturating_add(1);
                self.slow >= 3 && self.slow.saturating_mul(4) >= self.answers
            }
        };
        if congested && now >= self.calm_until {
            self.before = self.limit;
            self.limit = self.settings.clamp(self.limit / 2.0);
            self.threshold = self.limit;
            self.probe = self.settings.step;
            self.lowered = true;
            self.calm_until = now
                .checked_add(self.settings.window)
                .unwrap_or(self.calm_until);
            return Some(Change::Lowered(self.limit, signal));
        }
        rolled
    }

    /// Ends the window(s) that `now` is past: an increase if the last one was held back by the
    /// limit and not lowered.
    fn roll(&mut self, now: Instant) -> Option<Change> {
        let end = self.window_start.checked_add(self.settings.window)?;
        if now < end {
            return None;
        }
        let grow = self.held_back && !self.lowered;
        // Windows without any request in between start afresh at `now`.
        self.window_start = if now < end.checked_add(self.settings.window).unwrap_or(end) {
            end
        } else {
            now
        };
        self.held_back = false;
        self.lowered = false;
        self.answers = 0;
        self.slow = 0;
        if !grow {
            return None;
        }
        let toward = self.before - self.limit;
        let grown = if self.limit < self.threshold {
            (self.limit * 2.0).min(self.threshold)
        } else if toward > 2.0 * self.settings.step {
            self.limit + toward / 2.0
        } else {
            let probe = self.probe;
            self.probe = (probe * 2.0).min(self.settings.max_step.max(self.settings.step));
            self.limit + probe
        };
        let grown = self.settings.clamp(grown);
        if grown > self.limit {
            self.limit = grown;
            Some(Change::Raised(grown))
        } else {
            None
        }
    }
}

/// Spaces requests at a rate (a virtual-scheduling token bucket, GCRA): each request gets the next
/// free slot, at least `1/rate` after the previous one; a slot up to `burst` in the past is still
/// free, so that a client idle for a while may send that much at once.
#[derive(Clone, Debug, Default)]
pub struct Pacer {
    /// The next free slot; `None` before the first request.
    next: Option<Instant>,
}

impl Pacer {
    /// The time the request taken now may go (`now` or later) at `rate` per second.
    pub fn take(&mut self, now: Instant, rate: f64, burst: Duration) -> Instant {
        let interval = interval(rate);
        let earliest = now.checked_sub(burst_of(interval, burst)).unwrap_or(now);
        let slot = self.next.map_or(earliest, |next| next.max(earliest));
        self.next = Some(slot.checked_add(interval).unwrap_or(slot));
        slot.max(now)
    }
}

/// `1/rate` seconds, within 1 µs and an hour (a rate of 0, negative or NaN waits an hour).
fn interval(rate: f64) -> Duration {
    if rate.is_finite() && rate > 0.0 {
        Duration::try_from_secs_f64(1.0 / rate)
            .unwrap_or(Duration::from_secs(3600))
            .clamp(Duration::from_micros(1), Duration::from_secs(3600))
    } else if rate.is_infinite() && rate > 0.0 {
        Duration::from_micros(1)
    } else {
        Duration::from_secs(3600)
    }
}

/// At least one request's worth of burst.
fn burst_of(interval: Duration, burst: Duration) -> Duration {
    burst.max(interval)
}

/// The longest `Retry-After` of the API server believed: a longer one is waited for this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Retries of one refused request at most (after its first attempt), by default.
pub const MAX_RETRIES: u32 = 8;

/// No retry starts later than this after the request's first attempt: past it the answer goes to
/// the caller, whose own backoff takes over.
pub const RETRY_BUDGET: Duration = Duration::from_secs(60);

/// How long to wait before retry number `retry` (1, 2, ...) of a request the API server refused:
/// the operator's jittered backoff (200 ms doubling to 5 s, `backoff_jitter` in 0.8..1.2), and
/// never sooner than its `Retry-After` (capped at [`MAX_RETRY_AFTER`]), itself stretched by
/// `after_jitter` (in 1.0..1.2) so that the clients told "1 s" at once do not come back in the
/// same instant.
pub fn retry_delay(
    retry: u32,
    retry_after: Option<Duration>,
    backoff_jitter: f64,
    after_jitter: f64,
) -> Duration {
    let base = Duration::from_millis(200)
        .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1).min(5)))
        .min(Duration::from_secs(5));
    let backoff = mul(base, backoff_jitter.clamp(0.8, 1.2));
    let after = retry_after
        .map(|d| mul(d.min(MAX_RETRY_AFTER), after_jitter.clamp(1.0, 1.2)))
        .unwrap_or_default();
    backoff.max(after)
}

fn mul(d: Duration, f: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * f).unwrap_or(d)
}

/// The seconds of a `Retry-After` header (the API server sends whole seconds); an HTTP date or
/// anything else is not believed.
pub fn parse_retry_after(value: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(value).ok()?.trim();
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// One window of `n` requests held back and answered promptly, ending at `end_ms`.
    fn busy_window(a: &mut Aimd, start: Instant, end_ms: u64) -> Option<Change> {
        a.held_back(at(start, end_ms.saturating_sub(500)));
        a.answered(at(start, end_ms.saturating_sub(400)), Signal::Prompt);
        // The next call past the window's end rolls it.
        a.answered(at(start, end_ms), Signal::Prompt)
    }

    #[test]
    fn the_adaptive_limit_starts_at_the_old_default_under_the_cap() {
        let now = Instant::now();
        assert_eq!(Aimd::new(Settings::adaptive(None), now).limit(), 100.0);
        assert_eq!(Aimd::new(Settings::adaptive(Some(20.0)), now).limit(), 20.0);
        assert_eq!(Settings::from_flags(0, true).start_limit(), Some(100.0));
        assert_eq!(Settings::from_flags(0, false).start_limit(), None);
        assert_eq!(Settings::from_flags(50, false).start_limit(), Some(50.0));
        assert_eq!(Settings::from_flags(50, true).start_limit(), Some(50.0));
    }

    #[test]
    fn it_doubles_while_held_back_and_prompt_until_the_first_signal_then_adds_a_step() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(None), start);
        assert_eq!(
            busy_window(&mut a, start, 1000),
            Some(Change::Raised(200.0))
        );
        assert_eq!(
            busy_window(&mut a, start, 2000),
            Some(Change::Raised(400.0))
        );
        assert_eq!(
            a.answered(at(start, 2100), Signal::Throttled),
            Some(Change::Lowered(200.0, Signal::Throttled))
        );
        // The window of the decrease does not grow; the next ones climb back toward the 400 that
        // held before it by half the distance, then, once within 20 of it, probe past it by 10,
        // 20, 40, 80, 80.
        assert_eq!(busy_window(&mut a, start, 3000), None);
        let mut limits = vec![];
        for w in 4..13u64 {
            busy_window(&mut a, start, w * 1000);
            limits.push(a.limit());
        }
        assert_eq!(
            limits,
            [
                300.0, 350.0, 375.0, 387.5, 397.5, 417.5, 457.5, 537.5, 617.5
            ]
        );
    }

    #[test]
    fn a_second_decrease_on_the_way_back_climbs_toward_the_lower_limit() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(None), start);
        busy_window(&mut a, start, 1000);
        busy_window(&mut a, start, 2000);
        assert_eq!(a.limit(), 400.0);
        a.answered(at(start, 2100), Signal::Throttled);
        busy_window(&mut a, start, 3000);
        busy_window(&mut a, start, 4000);
        assert_eq!(a.limit(), 300.0);
        // Still too much: halved from 300, and 300 is what it climbs back toward now.
        assert_eq!(
            a.answered(at(start, 4100), Signal::Slow),
            None,
            "one slow answer is not a signal"
        );
        for i in 0..3 {
            a.answered(at(start, 4200 + i), Signal::Slow);
        }
        assert_eq!(a.limit(), 150.0);
        busy_window(&mut a, start, 5000);
        busy_window(&mut a, start, 6000);
        assert_eq!(a.limit(), 225.0);
        busy_window(&mut a, start, 7000);
        assert_eq!(a.limit(), 262.5);
    }

    #[test]
    fn it_does_not_grow_while_the_limit_holds_nothing_back() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(None), start);
        for s in 1..10u64 {
            assert_eq!(a.answered(at(start, s * 1000), Signal::Prompt), None);
        }
        assert_eq!(a.limit(), 100.0);
    }

    #[test]
    fn the_cap_bounds_growth_and_the_floor_bounds_decreases() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(Some(150.0)), start);
        assert_eq!(
            busy_window(&mut a, start, 1000),
            Some(Change::Raised(150.0))
        );
        assert_eq!(busy_window(&mut a, start, 2000), None);
        assert_eq!(a.limit(), 150.0);
        // One 429 a window: 75, 37.5, 18.75, 9.375, then the floor of 5.
        let mut limits = vec![];
        for w in 3..10u64 {
            a.answered(at(start, w * 1000 + 10), Signal::Throttled);
            limits.push(a.limit());
        }
        assert_eq!(limits, [75.0, 37.5, 18.75, 9.375, 5.0, 5.0, 5.0]);
    }

    #[test]
    fn many_429s_in_one_window_halve_once() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(None), start);
        let changes: Vec<_> = (0..30)
            .filter_map(|i| a.answered(at(start, 100 + i), Signal::Throttled))
            .collect();
        assert_eq!(changes, [Change::Lowered(50.0, Signal::Throttled)]);
        assert_eq!(
            a.answered(at(start, 1101), Signal::Throttled),
            Some(Change::Lowered(25.0, Signal::Throttled))
        );
    }

    #[test]
    fn slow_answers_halve_when_a_quarter_of_the_window_is_slow() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(None), start);
        // Two slow answers among many prompt ones: noise.
        for i in 0..20 {
            a.answered(at(start, 10 + i), Signal::Prompt);
        }
        assert_eq!(a.answered(at(start, 40), Signal::Slow), None);
        assert_eq!(a.answered(at(start, 41), Signal::Slow), None);
        assert_eq!(a.answered(at(start, 42), Signal::Slow), None);
        assert_eq!(a.limit(), 100.0);
        // A window where most answers are slow: halved.
        a.answered(at(start, 1100), Signal::Slow);
        a.answered(at(start, 1101), Signal::Slow);
        assert_eq!(
            a.answered(at(start, 1102), Signal::Slow),
            Some(Change::Lowered(50.0, Signal::Slow))
        );
    }

    #[test]
    fn recovery_after_pressure_probes_up_from_where_it_fell() {
        let start = Instant::now();
        let mut a = Aimd::new(Settings::adaptive(None), start);
        for w in 0..6u64 {
            a.answered(at(start, w * 1000 + 10), Signal::Throttled);
        }
        assert_eq!(a.limit(), 5.0);
        for w in 7..17u64 {
            busy_window(&mut a, start, w * 1000);
        }
        // Ten busy, calm windows: 5 + 10, 20, 40, 80, then 80 each.
        assert_eq!(a.limit(), 635.0);
        // The next decrease starts the probe again at 10.
        a.answered(at(start, 17_010), Signal::Throttled);
        assert_eq!(a.limit(), 317.5);
        for w in 18..24u64 {
            busy_window(&mut a, start, w * 1000);
        }
        // The window of the decrease adds nothing; then 476.25, 555.625, 595.3125, 615.15625
        // (halving the distance), then 625.15625 (past it by 10 again, not 160).
        assert_eq!(a.limit(), 625.156_25);
    }

    #[test]
    fn the_pacer_spaces_requests_and_allows_a_small_burst() {
        let start = Instant::now();
        let mut p = Pacer::default();
        let burst = Duration::from_millis(100);
        // At 100/s after idling: the first 11 go at once (100 ms worth, and the one due now).
        let slots: Vec<_> = (0..13).map(|_| p.take(start, 100.0, burst)).collect();
        assert!(slots[..10].iter().all(|s| *s == start), "{slots:?}");
        assert_eq!(slots[10], start);
        assert_eq!(slots[11], at(start, 10));
        assert_eq!(slots[12], at(start, 20));
        // Halved: the next ones 20 ms apart.
        assert_eq!(p.take(start, 50.0, burst), at(start, 30));
        assert_eq!(p.take(start, 50.0, burst), at(start, 50));
    }

    #[test]
    fn the_pacer_survives_absurd_rates() {
        let start = Instant::now();
        let mut p = Pacer::default();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300, 1e300] {
            let slot = p.take(start, rate, Duration::from_millis(100));
            assert!(slot >= start);
        }
    }

    #[test]
    fn a_retry_waits_for_retry_after_stretched_and_the_backoff_otherwise() {
        let s = Duration::from_secs;
        // APF's "Retry-After: 1": 1 s to 1.2 s, whatever the early backoff.
        assert_eq!(retry_delay(1, Some(s(1)), 1.0, 1.0), s(1));
        assert_eq!(
            retry_delay(1, Some(s(1)), 1.2, 1.2),
            Duration::from_millis(1200)
        );
        // Without it: 200 ms doubling, ±20 %, to 5 s.
        assert_eq!(retry_delay(1, None, 1.0, 1.0), Duration::from_millis(200));
        assert_eq!(retry_delay(3, None, 1.0, 1.0), Duration::from_millis(800));
        assert_eq!(retry_delay(3, None, 0.8, 1.0), Duration::from_millis(640));
        assert_eq!(retry_delay(20, None, 1.0, 1.0), s(5));
        // The backoff wins when longer than Retry-After.
        assert_eq!(retry_delay(6, Some(s(1)), 1.0, 1.0), s(5));
        // An absurd Retry-After is capped; jitter outside its range is clamped.
        assert_eq!(retry_delay(1, Some(s(u64::MAX)), 1.0, 1.0), MAX_RETRY_AFTER);
        assert_eq!(
            retry_delay(1, None, 100.0, -3.0),
            Duration::from_millis(240)
        );
        assert_eq!(retry_delay(u32::MAX, None, f64::NAN, f64::NAN), s(5));
    }

    #[test]
    fn retry_after_is_whole_seconds_only() {
        assert_eq!(parse_retry_after(b"1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(b" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(b"99999999999"), None);
        assert_eq!(parse_retry_after(b"-1"), None);
        assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(b""), None);
        assert_eq!(parse_retry_after(&[0xff, 0x31]), None);
    }
}
