//! Sign-in requests per source address, counted before anything else is done with a request (no
//! API call, no signature check): the sign-in port is open to anyone who can reach the Ingress,
//! and every genuine request costs reads on the operator's rate-limited Kubernetes client.
//!
//! A token bucket per source (the `governor` crate's GCRA, keyed by address): an IPv4 address, or
//! the /64 of an IPv6 address (one host usually holds a whole /64). A request past the limit gets
//! 429 with `Retry-After`. At most [`MAX_SOURCES`] sources are tracked; past that (after dropping
//! those whose bucket is full again), new sources share one bucket, so that the memory stays
//! bounded under a flood from many addresses. Behind an Ingress or a proxy the source is the
//! proxy: then the limit holds for all browsers together (`X-Forwarded-For` is not believed, any
//! client can write it).

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::keyed::HashMapStateStore,
};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Requests a source may send at once (a sign-in is three: page, start, callback).
pub const DEFAULT_BURST: u32 = 30;
/// And then one every this often.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(2);
/// Most sources tracked at once (about 100 bytes each).
pub const MAX_SOURCES: usize = 65_536;

/// The per-source limit. Cheap to clone.
#[derive(Clone)]
pub struct SourceLimit {
    limiter: Arc<RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for SourceLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceLimit").finish_non_exhaustive()
    }
}

/// The bucket of a source: its IPv4 address, or its IPv6 /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The shared bucket of sources past [`MAX_SOURCES`] (and of requests without a peer address).
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl SourceLimit {
    /// `burst` requests at once, then one per `period` (a zero burst or period is taken as 1 and
    /// 1 ms).
    pub fn new(burst: u32, period: Duration) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_millis(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let clock = DefaultClock::default();
        Self {
            limiter: Arc::new(RateLimiter::hashmap_with_clock(quota, clock.clone())),
            clock,
        }
    }

    /// Count a request from `peer`: `Err(wait)` when it is over its limit.
    pub fn check(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let mut key = peer.map(source_key).unwrap_or(OVERFLOW);
        if self.limiter.len() >= MAX_SOURCES {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            if self.limiter.len() >= MAX_SOURCES {
                key = OVERFLOW;
            }
        }
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// How many sources are tracked now.
    pub fn sources(&self) -> usize {
        self.limiter.len()
    }
}

impl Default for SourceLimit {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_PERIOD)
    }
}

/// The middleware: 429 past the limit, before the request reaches a handler.
pub async fn limit(State(limit): State<SourceLimit>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    match limit.check(peer) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let secs = wait.as_secs().saturating_add(1);
            tracing::debug!(peer = ?peer, retry_in_s = secs, "sign-in request over the per-source limit");
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                "Too many requests from this address: wait a minute, then open the sign-in link again.\n",
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_waits_and_others_are_not_affected() {
        let l = SourceLimit::new(3, Duration::from_secs(60));
        let a = Some("192.0.2.1".parse().unwrap());
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        assert!(l.check(Some("192.0.2.2".parse().unwrap())).is_ok());
        // One IPv6 /64 is one source.
        let v6 = |s: &str| Some(s.parse().unwrap());
        for _ in 0..3 {
            assert!(l.check(v6("2001:db8:1:2::1")).is_ok());
        }
        assert!(l.check(v6("2001:db8:1:2:ffff::9")).is_err());
        assert!(l.check(v6("2001:db8:1:3::1")).is_ok());
    }
}
