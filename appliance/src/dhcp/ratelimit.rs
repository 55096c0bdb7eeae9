//! Per-MAC token buckets: a client flooding requests is dropped (and counted) without
//! slowing anyone else. Time is passed in.

use std::collections::HashMap;
use std::time::SystemTime;

use stork_proto::MacAddr;

use crate::config::RateLimit;

/// Buckets are pruned (full ones forgotten: a full bucket is the same as none) once this
/// many exist, so a stream of distinct MACs cannot grow the table without bound.
const PRUNE_AT: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<MacAddr, Bucket>,
    prune_at: usize,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            per_second: f64::from(limit.per_second),
            burst: f64::from(limit.burst),
            buckets: HashMap::new(),
            prune_at: PRUNE_AT,
        }
    }

    fn refill(&self, b: &Bucket, now: SystemTime) -> f64 {
        // A clock that stepped back refills nothing.
        let dt = now.duration_since(b.at).map_or(0.0, |d| d.as_secs_f64());
        (b.tokens + dt * self.per_second).min(self.burst)
    }

    /// Takes a token for `mac`; `false` means drop the request.
    pub fn allow(&mut self, mac: MacAddr, now: SystemTime) -> bool {
        if self.buckets.len() >= self.prune_at && !self.buckets.contains_key(&mac) {
            self.prune(now);
        }
        let tokens = match self.buckets.get(&mac) {
            Some(b) => self.refill(b, now),
            None => self.burst,
        };
        let allowed = tokens >= 1.0;
        self.buckets.insert(
            mac,
            Bucket {
                tokens: if allowed { tokens - 1.0 } else { tokens },
                at: now,
            },
        );
        allowed
    }

    fn prune(&mut self, now: SystemTime) {
        let (rate, burst) = (self.per_second, self.burst);
        self.buckets.retain(|_, b| {
            let dt = now.duration_since(b.at).map_or(0.0, |d| d.as_secs_f64());
            b.tokens + dt * rate < burst
        });
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
        let mut l = RateLimiter::new(RateLimit {
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
        let mut l = RateLimiter::new(RateLimit {
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
}
