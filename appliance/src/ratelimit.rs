//! Token buckets: one per key ([`RateLimiter`]: a DHCP client's MAC or source address, an
//! HTTP client's address on the unauthenticated agent routes) and one for everyone
//! ([`Bucket`]). A client flooding requests is dropped (and counted) without slowing anyone
//! else; the global bucket is a ceiling on the work floods can cause. Time is passed in.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::SystemTime;

use stork_proto::MacAddr;

use crate::config::RateLimit;

/// Buckets are pruned (full ones forgotten: a full bucket is the same as none) once this
/// many exist, so a stream of distinct keys cannot grow the table without bound.
const PRUNE_AT: usize = 65_536;

/// One token bucket: `per_second` tokens a second, at most `burst`, one per request.
#[derive(Debug)]
pub struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: SystemTime,
}

impl Bucket {
    /// Full at first.
    pub fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst);
        Self {
            per_second: f64::from(limit.per_second),
            burst,
            tokens: burst,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    /// Takes a token; `false` means drop the request.
    pub fn allow(&mut self, now: SystemTime) -> bool {
        let tokens = refill(self.tokens, self.at, now, self.per_second, self.burst);
        let allowed = tokens >= 1.0;
        self.tokens = if allowed { tokens - 1.0 } else { tokens };
        // A clock that stepped back keeps the later time: it refills nothing until passed.
        self.at = self.at.max(now);
        allowed
    }
}

fn refill(tokens: f64, at: SystemTime, now: SystemTime, rate: f64, burst: f64) -> f64 {
    // A clock that stepped back refills nothing.
    let dt = now.duration_since(at).map_or(0.0, |d| d.as_secs_f64());
    (tokens + dt * rate).min(burst)
}

#[derive(Debug)]
struct Entry {
    tokens: f64,
    at: SystemTime,
}

/// A token bucket per key (a client's MAC, a datagram's source address).
#[derive(Debug)]
pub struct RateLimiter<K = MacAddr> {
    per_second: f64,
    burst: f64,
    buckets: HashMap<K, Entry>,
    prune_at: usize,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            per_second: f64::from(limit.per_second),
            burst: f64::from(limit.burst),
            buckets: HashMap::new(),
            prune_at: PRUNE_AT,
        }
    }

    /// Takes a token for `key`; `false` means drop the request.
    pub fn allow(&mut self, key: K, now: SystemTime) -> bool {
        if self.buckets.len() >= self.prune_at && !self.buckets.contains_key(&key) {
            self.prune(now);
        }
        let tokens = match self.buckets.get(&key) {
            Some(b) => refill(b.tokens, b.at, now, self.per_second, self.burst),
            None => self.burst,
        };
        let allowed = tokens >= 1.0;
        self.buckets.insert(
            key,
            Entry {
                tokens: if allowed { tokens - 1.0 } else { tokens },
                at: now,
            },
        );
        allowed
    }

    fn prune(&mut self, now: SystemTime) {
        let (rate, burst) = (self.per_second, self.burst);
        self.buckets
            .retain(|_, b| refill(b.tokens, b.at, now, rate, burst) < burst);
        // Still full of active clients: allow the table to grow rather than prune each call.
        self.prune_at = (self.buckets.len() * 2).max(PRUNE_AT);
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut l: RateLimiter = RateLimiter::new(RateLimit {
            per_second: 2,
            burst: 3,
        });
        let got: Vec<bool> = (0..5).map(|_| l.allow(mac(1), T0)).collect();
        assert_eq!(got, [true, true, true, false, false]);
        // Another client is unaffected.
        assert!(l.allow(mac(2), T0));
        // Half a second buys one request at 2/s.
        let t = T0 + Duration::from_millis(500);
        assert!(l.allow(mac(1), t));
        assert!(!l.allow(mac(1), t));
        // A clock stepping back refills nothing and does not panic.
        assert!(!l.allow(mac(1), T0));
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let mut l: RateLimiter = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 1,
        });
        for n in 0..PRUNE_AT as u32 {
            l.allow(mac(n), T0);
        }
        assert_eq!(l.tracked(), PRUNE_AT);
        l.allow(mac(u32::MAX), T0 + Duration::from_secs(5));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn one_bucket_for_everyone() {
        let mut b = Bucket::new(RateLimit {
            per_second: 10,
            burst: 5,
        });
        let t = T0 + Duration::from_secs(100);
        assert_eq!((0..8).filter(|_| b.allow(t)).count(), 5);
        // A tenth of a second buys one.
        let t = t + Duration::from_millis(100);
        assert!(b.allow(t));
        assert!(!b.allow(t));
        // A clock stepping back refills nothing, and does not count the step twice.
        assert!(!b.allow(T0));
        assert!(b.allow(t + Duration::from_millis(100)));
    }

    #[test]
    fn keyed_by_source_address() {
        use std::net::Ipv4Addr;
        let mut l: RateLimiter<Ipv4Addr> = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 2,
        });
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!((0..5).filter(|_| l.allow(a, T0)).count(), 2);
        assert!(l.allow(b, T0));
    }
}
