//! The address pool: which address each client holds, and until when.
//!
//! Pure data: time is passed in, nothing here does I/O.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use stork_proto::MacAddr;

/// How long an offered address stays reserved for the client it was offered to.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Offered,
    Bound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub state: LeaseState,
    pub expires: SystemTime,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("address pool exhausted")]
    Exhausted,
    #[error("{ip} is outside the pool")]
    OutOfRange { ip: Ipv4Addr },
    #[error("{ip} is held by {holder}")]
    Taken { ip: Ipv4Addr, holder: MacAddr },
}

#[derive(Debug)]
pub struct Pool {
    start: u32,
    end: u32,
    by_mac: HashMap<MacAddr, Lease>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    /// Where the next search for a free address starts, so allocation stays O(1) on average
    /// while the pool fills.
    cursor: u32,
}

impl Pool {
    pub fn new(start: Ipv4Addr, end: Ipv4Addr) -> Self {
        Self {
            start: start.into(),
            end: end.into(),
            by_mac: HashMap::new(),
            by_ip: HashMap::new(),
            cursor: start.into(),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&u32::from(ip))
    }

    pub fn lease_of(&self, mac: &MacAddr) -> Option<&Lease> {
        self.by_mac.get(mac)
    }

    fn holder(&self, ip: Ipv4Addr, now: SystemTime) -> Option<MacAddr> {
        let mac = self.by_ip.get(&ip)?;
        let lease = self.by_mac.get(mac)?;
        (lease.expires > now).then_some(*mac)
    }

    fn is_free_for(&self, ip: Ipv4Addr, mac: &MacAddr, now: SystemTime) -> bool {
        self.contains(ip) && self.holder(ip, now).is_none_or(|h| h == *mac)
    }

    /// Picks an address for `mac`: the one it already holds, else the one it asks for if free,
    /// else the next free one. The choice is held for [`OFFER_HOLD`].
    pub fn offer(
        &mut self,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: SystemTime,
    ) -> Result<Lease, PoolError> {
        let ip = if let Some(l) = self.by_mac.get(&mac).filter(|l| self.contains(l.ip)) {
            l.ip
        } else if let Some(r) = requested.filter(|r| self.is_free_for(*r, &mac, now)) {
            r
        } else {
            self.next_free(&mac, now)?
        };
        let state = match self.by_mac.get(&mac) {
            Some(l) if l.ip == ip && l.state == LeaseState::Bound && l.expires > now => {
                return Ok(*l);
            }
            _ => LeaseState::Offered,
        };
        Ok(self.put(Lease {
            ip,
            mac,
            state,
            expires: now + OFFER_HOLD,
        }))
    }

    /// Binds `ip` to `mac` for `lease_time`, as a REQUEST asks.
    pub fn bind(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        lease_time: Duration,
        now: SystemTime,
    ) -> Result<Lease, PoolError> {
        if !self.contains(ip) {
            return Err(PoolError::OutOfRange { ip });
        }
        if let Some(holder) = self.holder(ip, now).filter(|h| *h != mac) {
            return Err(PoolError::Taken { ip, holder });
        }
        Ok(self.put(Lease {
            ip,
            mac,
            state: LeaseState::Bound,
            expires: now + lease_time,
        }))
    }

    /// Frees the address `mac` holds, if it is `ip`.
    pub fn release(&mut self, mac: &MacAddr, ip: Ipv4Addr) -> bool {
        match self.by_mac.get(mac) {
            Some(l) if l.ip == ip => {
                self.by_ip.remove(&ip);
                self.by_mac.remove(mac);
                true
            }
            _ => false,
        }
    }

    fn put(&mut self, lease: Lease) -> Lease {
        if let Some(old) = self.by_mac.insert(lease.mac, lease)
            && old.ip != lease.ip
        {
            self.by_ip.remove(&old.ip);
        }
        if let Some(prev) = self.by_ip.insert(lease.ip, lease.mac)
            && prev != lease.mac
        {
            // The address expired under its previous holder: forget that lease entirely.
            self.by_mac.remove(&prev);
        }
        lease
    }

    fn next_free(&mut self, mac: &MacAddr, now: SystemTime) -> Result<Ipv4Addr, PoolError> {
        let size = u64::from(self.end - self.start) + 1;
        let mut ip = self.cursor;
        for _ in 0..size {
            let candidate = Ipv4Addr::from(ip);
            ip = if ip >= self.end { self.start } else { ip + 1 };
            if self.is_free_for(candidate, mac, now) {
                self.cursor = ip;
                return Ok(candidate);
            }
        }
        Err(PoolError::Exhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    const HOUR: Duration = Duration::from_secs(3600);

    fn pool() -> Pool {
        Pool::new(Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 12))
    }

    #[test]
    fn a_client_keeps_its_address() {
        let mut p = pool();
        let a = p.offer(mac(1), None, T0).unwrap();
        p.bind(mac(1), a.ip, HOUR, T0).unwrap();
        let again = p.offer(mac(1), None, T0 + Duration::from_secs(10)).unwrap();
        assert_eq!(again.ip, a.ip);
        assert_eq!(again.state, LeaseState::Bound);
    }

    #[test]
    fn no_address_goes_to_two_clients() {
        let mut p = pool();
        let ips: Vec<_> = (1..=3)
            .map(|n| p.offer(mac(n), None, T0).unwrap().ip)
            .collect();
        assert_eq!(ips.len(), 3);
        assert!(ips[0] != ips[1] && ips[1] != ips[2] && ips[0] != ips[2]);
        assert_eq!(p.offer(mac(4), None, T0), Err(PoolError::Exhausted));
        assert!(matches!(
            p.bind(mac(4), ips[0], HOUR, T0),
            Err(PoolError::Taken { .. })
        ));
    }

    #[test]
    fn expired_offers_are_reused() {
        let mut p = pool();
        for n in 1..=3 {
            p.offer(mac(n), None, T0).unwrap();
        }
        let later = T0 + OFFER_HOLD + Duration::from_secs(1);
        let l = p.offer(mac(4), None, later).unwrap();
        assert!(p.contains(l.ip));
        // The old holder of that address no longer has a lease.
        assert_eq!(
            (1..=3).filter(|n| p.lease_of(&mac(*n)).is_some()).count(),
            2
        );
    }

    #[test]
    fn requested_address_is_honoured_when_free() {
        let mut p = pool();
        let want = Ipv4Addr::new(10, 0, 0, 12);
        assert_eq!(p.offer(mac(1), Some(want), T0).unwrap().ip, want);
        assert_ne!(p.offer(mac(2), Some(want), T0).unwrap().ip, want);
        let outside = Ipv4Addr::new(10, 0, 0, 99);
        assert_ne!(p.offer(mac(3), Some(outside), T0).unwrap().ip, outside);
    }

    #[test]
    fn release_frees_the_address() {
        let mut p = Pool::new(Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 10));
        let l = p.offer(mac(1), None, T0).unwrap();
        p.bind(mac(1), l.ip, HOUR, T0).unwrap();
        assert!(!p.release(&mac(1), Ipv4Addr::new(10, 0, 0, 11)));
        assert!(p.release(&mac(1), l.ip));
        assert_eq!(p.offer(mac(2), None, T0).unwrap().ip, l.ip);
    }
}
