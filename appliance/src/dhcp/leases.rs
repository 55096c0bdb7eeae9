//! Which address each MAC holds, as this server leased it: what the HTTP side checks a boot
//! script's requester against, so that only the machine holding a MAC's lease is given that
//! machine's agent token.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{PoisonError, RwLock};

use stork_proto::MacAddr;

use super::journal::Record;

#[derive(Debug, Default)]
pub struct Leases {
    v4: RwLock<V4>,
    /// DHCPv6 leases of clients whose MAC is known (`dhcp6::handler::Pool`: one per MAC).
    by_mac6: RwLock<HashMap<MacAddr, Ipv6Addr>>,
}

/// DHCPv4 leases both ways, as the pool holds them (`dhcp::pool::Pool::put`): an address
/// has one holder, and an address that expired and went to another MAC is no longer its
/// former holder's. Without the second map the former holder's entry stayed, and whoever
/// took the address over could have been given that machine's agent token.
#[derive(Debug, Default)]
struct V4 {
    /// The address and its expiry (Unix seconds).
    by_mac: HashMap<MacAddr, (Ipv4Addr, u64)>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
}

impl V4 {
    fn bind(&mut self, mac: MacAddr, ip: Ipv4Addr, expires: u64) {
        if let Some((old, _)) = self.by_mac.insert(mac, (ip, expires))
            && old != ip
            && self.by_ip.get(&old) == Some(&mac)
        {
            self.by_ip.remove(&old);
        }
        if let Some(prev) = self.by_ip.insert(ip, mac)
            && prev != mac
            && self.by_mac.get(&prev).map(|(held, _)| *held) == Some(ip)
        {
            self.by_mac.remove(&prev);
        }
    }

    fn release(&mut self, mac: MacAddr, ip: Ipv4Addr) {
        if self.by_mac.get(&mac).map(|(held, _)| *held) == Some(ip) {
            self.by_mac.remove(&mac);
            if self.by_ip.get(&ip) == Some(&mac) {
                self.by_ip.remove(&ip);
            }
        }
    }
}

impl Leases {
    /// Follows lease records as the journal gets them: a binding replaces the MAC's
    /// address (and ends its former holder's lease of it), a release forgets it.
    pub fn apply(&self, records: &[Record]) {
        let mut v4 = self.v4.write().unwrap_or_else(PoisonError::into_inner);
        for r in records {
            match *r {
                Record::Bound { mac, ip, expires } => v4.bind(mac, ip, expires),
                Record::Released { mac, ip } => v4.release(mac, ip),
                Record::Probation { .. } => {}
            }
        }
    }

    /// The address leased to `mac`, if this server leased it one that has not expired.
    pub fn of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.of_at(mac, super::journal::unix_secs(std::time::SystemTime::now()))
    }

    fn of_at(&self, mac: MacAddr, now: u64) -> Option<Ipv4Addr> {
        self.v4
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_mac
            .get(&mac)
            .filter(|(_, expires)| *expires > now)
            .map(|(ip, _)| *ip)
    }

    /// Follows DHCPv6 lease changes once they are durable: a binding with a MAC replaces
    /// the MAC's address, a release with one forgets it.
    pub fn apply6(&self, changes: &[crate::dhcp6::leases::Change]) {
        use crate::dhcp6::leases::Change;
        let mut map = self.by_mac6.write().unwrap_or_else(PoisonError::into_inner);
        for c in changes {
            match c {
                Change::Bound {
                    addr,
                    mac: Some(mac),
                    ..
                } => {
                    map.insert(*mac, *addr);
                }
                Change::Released { mac: Some(mac), .. } => {
                    map.remove(mac);
                }
                _ => {}
            }
        }
    }

    /// Puts back a DHCPv6 lease read from the lease file at start.
    pub fn set6(&self, mac: MacAddr, addr: Ipv6Addr) {
        self.by_mac6
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(mac, addr);
    }

    /// The IPv6 address this server's DHCPv6 leased to `mac`, if it did.
    pub fn of6(&self, mac: MacAddr) -> Option<Ipv6Addr> {
        self.by_mac6
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&mac)
            .copied()
    }

    /// Every lease: MAC, address and expiry (Unix seconds), by address.
    pub fn all(&self) -> Vec<(MacAddr, Ipv4Addr, u64)> {
        let mut all: Vec<(MacAddr, Ipv4Addr, u64)> = self
            .v4
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_mac
            .iter()
            .map(|(mac, (ip, expires))| (*mac, *ip, *expires))
            .collect();
        all.sort_by_key(|(_, ip, _)| *ip);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LATER: u64 = 4_000_000_000;

    fn bound(mac: MacAddr, ip: Ipv4Addr, expires: u64) -> Record {
        Record::Bound { mac, ip, expires }
    }

    #[test]
    fn a_binding_is_followed_and_a_release_forgets_it() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let (a, b) = (Ipv4Addr::new(10, 77, 0, 10), Ipv4Addr::new(10, 77, 0, 11));
        let leases = Leases::default();
        leases.apply(&[bound(mac, a, LATER)]);
        assert_eq!(leases.of(mac), Some(a));
        leases.apply(&[bound(mac, b, LATER)]);
        // A stale release of the old address leaves the new one.
        leases.apply(&[Record::Released { mac, ip: a }]);
        assert_eq!(leases.of(mac), Some(b));
        leases.apply(&[Record::Released { mac, ip: b }]);
        assert_eq!(leases.of(mac), None);
        assert!(leases.all().is_empty());
    }

    /// The pool gives an expired address to another MAC with a binding and no release:
    /// the former holder no longer has it, so a boot script asked for that machine from
    /// the address gets no token.
    #[test]
    fn an_address_taken_over_is_no_longer_its_former_holders() {
        let (first, second): (MacAddr, MacAddr) = (
            "52:54:00:00:00:01".parse().unwrap(),
            "52:54:00:00:00:02".parse().unwrap(),
        );
        let a = Ipv4Addr::new(10, 77, 0, 10);
        let leases = Leases::default();
        leases.apply(&[bound(first, a, 100)]);
        assert_eq!(leases.of_at(first, 50), Some(a));
        // Expired: not its lease any more, even before anyone else takes the address.
        assert_eq!(leases.of_at(first, 100), None);
        leases.apply(&[bound(second, a, LATER)]);
        assert_eq!(leases.of_at(first, 50), None);
        assert_eq!(leases.of(second), Some(a));
        assert_eq!(leases.all(), [(second, a, LATER)]);
        // The second's release of the address ends its lease; the first's stays ended.
        leases.apply(&[Record::Released { mac: second, ip: a }]);
        assert_eq!((leases.of(first), leases.of(second)), (None, None));
        // A MAC moving to another address frees the first for the next holder.
        let b = Ipv4Addr::new(10, 77, 0, 11);
        leases.apply(&[bound(first, a, LATER), bound(first, b, LATER)]);
        leases.apply(&[bound(second, a, LATER)]);
        assert_eq!((leases.of(first), leases.of(second)), (Some(b), Some(a)));
    }
}
