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
    /// The address and its expiry (Unix seconds).
    by_mac: RwLock<HashMap<MacAddr, (Ipv4Addr, u64)>>,
    /// DHCPv6 leases of clients whose MAC is known (`dhcp6::handler::Pool`: one per MAC).
    by_mac6: RwLock<HashMap<MacAddr, Ipv6Addr>>,
}

impl Leases {
    /// Follows lease records as the journal gets them: a binding replaces the MAC's
    /// address, a release forgets it.
    pub fn apply(&self, records: &[Record]) {
        let mut map = self.by_mac.write().unwrap_or_else(PoisonError::into_inner);
        for r in records {
            match *r {
                Record::Bound { mac, ip, expires } => {
                    map.insert(mac, (ip, expires));
                }
                Record::Released { mac, ip } => {
                    if map.get(&mac).map(|(held, _)| *held) == Some(ip) {
                        map.remove(&mac);
                    }
                }
                Record::Probation { .. } => {}
            }
        }
    }

    /// The address leased to `mac`, if this server leased it one.
    pub fn of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.by_mac
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&mac)
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
            .by_mac
            .read()
            .unwrap_or_else(PoisonError::into_inner)
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

    #[test]
    fn a_binding_is_followed_and_a_release_forgets_it() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let (a, b) = (Ipv4Addr::new(10, 77, 0, 10), Ipv4Addr::new(10, 77, 0, 11));
        let leases = Leases::default();
        leases.apply(&[Record::Bound {
            mac,
            ip: a,
            expires: 1,
        }]);
        assert_eq!(leases.of(mac), Some(a));
        leases.apply(&[Record::Bound {
            mac,
            ip: b,
            expires: 2,
        }]);
        // A stale release of the old address leaves the new one.
        leases.apply(&[Record::Released { mac, ip: a }]);
        assert_eq!(leases.of(mac), Some(b));
        leases.apply(&[Record::Released { mac, ip: b }]);
        assert_eq!(leases.of(mac), None);
    }
}
