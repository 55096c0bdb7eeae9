//! The address pool of one subnet: which address each client holds, and until when.
//!
//! Pure data: time is passed in, nothing here does I/O. Every change a crash must not lose
//! (a bound lease, a release, a declined address) is also queued as a journal
//! [`Record`]; the I/O layer drains them with [`Pool::take_records`] and makes them durable
//! before it sends the ACK that depends on them.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use stork_proto::MacAddr;

use super::ha::HaState;
use super::journal::{Record, unix_secs};
use crate::config::SubnetConfig;

/// How long an offered address stays reserved for the client it was offered to.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);

/// At most one address in this many (dynamic and reserved, at least one address) is on
/// probation at once: a storm of DECLINEs (a device answering ARP for every address, or
/// hosts acting together) leaves three quarters of the pool usable.
pub const PROBATION_SHARE: usize = 4;

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
    #[error("{ip} is not assignable in this subnet")]
    OutOfRange { ip: Ipv4Addr },
    #[error("{ip} is held by {holder}")]
    Taken { ip: Ipv4Addr, holder: MacAddr },
    #[error("{ip} is the HA partner's to hand out")]
    PartnersShare { ip: Ipv4Addr },
    #[error("{ip} was declined and is on probation")]
    Probation { ip: Ipv4Addr },
    #[error("{mac} has reservation {reserved}, not {ip}")]
    Reserved {
        mac: MacAddr,
        ip: Ipv4Addr,
        reserved: Ipv4Addr,
    },
}

/// Why a DHCPDECLINE was not honoured.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum DeclineRefused {
    #[error("not an address of this pool")]
    NotOurs,
    #[error("reserved for another client")]
    ReservedForAnother,
    #[error("the client neither holds it nor was offered it")]
    NotHolder,
    #[error("{cap} addresses are on probation already, the most allowed")]
    Capped { cap: usize },
}

#[derive(Debug, Default)]
pub struct Pool {
    /// Dynamic ranges, inclusive, sorted and disjoint.
    ranges: Vec<(u32, u32)>,
    exclude: Vec<(u32, u32)>,
    reserved_ip: HashMap<Ipv4Addr, MacAddr>,
    reserved_mac: HashMap<MacAddr, Ipv4Addr>,
    by_mac: HashMap<MacAddr, Lease>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    /// Declined addresses and when they may be used again.
    probation: HashMap<Ipv4Addr, SystemTime>,
    /// The address each client last released (a machine rebooting releases its lease): it
    /// gets it back while it is free, as RFC 2131 4.3.1 asks. At most [`Pool::size`] entries.
    released: HashMap<MacAddr, Ipv4Addr>,
    /// Addresses this pool hands out (dynamic and reserved), for the probation cap.
    size: usize,
    /// Where the next search for a free address starts (index into `ranges`, address), so
    /// allocation stays O(1) on average while the pool fills.
    cursor: (usize, u32),
    records: Vec<Record>,
    /// In an HA pair, which new addresses this server may hand out ([`HaState::allocates`]).
    ha: Option<HaState>,
}

impl Pool {
    /// A pool of one inclusive range.
    pub fn new(start: Ipv4Addr, end: Ipv4Addr) -> Self {
        Self::with(&[(start, end)], &[], &[])
    }

    pub fn with(
        ranges: &[(Ipv4Addr, Ipv4Addr)],
        exclude: &[(Ipv4Addr, Ipv4Addr)],
        reservations: &[(MacAddr, Ipv4Addr)],
    ) -> Self {
        let pairs = |l: &[(Ipv4Addr, Ipv4Addr)]| -> Vec<(u32, u32)> {
            l.iter()
                .map(|(a, b)| (u32::from(*a), u32::from(*b)))
                .collect()
        };
        let ranges = pairs(ranges);
        let mut pool = Self {
            cursor: (0, ranges.first().map_or(0, |r| r.0)),
            ranges,
            exclude: pairs(exclude),
            reserved_ip: reservations.iter().map(|(m, i)| (*i, *m)).collect(),
            reserved_mac: reservations.iter().copied().collect(),
            ..Self::default()
        };
        pool.size = pool.count_addresses();
        pool
    }

    /// The dynamic addresses (ranges less exclusions and reservations) and the reserved
    /// ones, counted by interval arithmetic: a range may be a /8.
    fn count_addresses(&self) -> usize {
        let mut dynamic: u64 = 0;
        for &(a, b) in &self.ranges {
            // Exclusions clipped to the range and merged, so overlaps count once.
            let mut cut: Vec<(u32, u32)> = self
                .exclude
                .iter()
                .filter(|(x, y)| *x <= b && *y >= a)
                .map(|(x, y)| ((*x).max(a), (*y).min(b)))
                .collect();
            cut.sort_unstable();
            let mut excluded: u64 = 0;
            let mut upto: Option<u32> = None;
            for (x, y) in cut {
                let from = match upto {
                    Some(u) if u >= y => continue,
                    Some(u) if u >= x => u + 1,
                    _ => x,
                };
                excluded += u64::from(y - from) + 1;
                upto = Some(y);
            }
            dynamic += (u64::from(b - a) + 1).saturating_sub(excluded);
        }
        // Reservations inside a range are not dynamic but are still addresses here.
        let in_ranges = self
            .reserved_ip
            .keys()
            .filter(|ip| self.dynamic_ignoring_reservations(**ip))
            .count() as u64;
        let total = dynamic.saturating_sub(in_ranges) + self.reserved_ip.len() as u64;
        usize::try_from(total).unwrap_or(usize::MAX)
    }

    fn dynamic_ignoring_reservations(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&n))
            && !self.exclude.iter().any(|(a, b)| (*a..=*b).contains(&n))
    }

    /// Addresses this pool hands out, dynamic and reserved.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn for_subnet(s: &SubnetConfig) -> Self {
        Self::with(&s.ranges, &s.exclude, &s.reservations)
    }

    fn dynamic(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&n))
            && !self.exclude.iter().any(|(a, b)| (*a..=*b).contains(&n))
            && !self.reserved_ip.contains_key(&ip)
    }

    /// Whether this pool hands out `ip` at all (dynamically or as a reservation).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.dynamic(ip) || self.reserved_ip.contains_key(&ip)
    }

    fn assignable_to(&self, ip: Ipv4Addr, mac: &MacAddr) -> bool {
        match self.reserved_ip.get(&ip) {
            Some(owner) => owner == mac,
            None => self.dynamic(ip),
        }
    }

    pub fn lease_of(&self, mac: &MacAddr) -> Option<&Lease> {
        self.by_mac.get(mac)
    }

    /// Bound and unexpired leases.
    pub fn bound(&self, now: SystemTime) -> impl Iterator<Item = &Lease> {
        self.by_mac
            .values()
            .filter(move |l| l.state == LeaseState::Bound && l.expires > now)
    }

    fn holder(&self, ip: Ipv4Addr, now: SystemTime) -> Option<MacAddr> {
        let mac = self.by_ip.get(&ip)?;
        let lease = self.by_mac.get(mac)?;
        (lease.expires > now).then_some(*mac)
    }

    pub fn on_probation(&self, ip: Ipv4Addr, now: SystemTime) -> bool {
        self.probation.get(&ip).is_some_and(|until| *until > now)
    }

    fn is_free_for(&self, ip: Ipv4Addr, mac: &MacAddr, now: SystemTime) -> bool {
        self.assignable_to(ip, mac)
            && !self.on_probation(ip, now)
            && self.holder(ip, now).is_none_or(|h| h == *mac)
            && self.ours_to_give(ip, mac)
    }

    /// In an HA pair: whether this server may give `ip` to `mac`: an address of its share,
    /// or one `mac` holds already or has reserved (which both servers know).
    fn ours_to_give(&self, ip: Ipv4Addr, mac: &MacAddr) -> bool {
        self.ha.is_none_or(|h| h.allocates(ip))
            || self.by_mac.get(mac).is_some_and(|l| l.ip == ip)
            || self.reserved_mac.get(mac) == Some(&ip)
    }

    /// Sets this server's part in an HA pair (which new addresses it hands out).
    pub fn set_ha(&mut self, ha: Option<HaState>) {
        self.ha = ha;
    }

    /// Picks an address for `mac`: its reservation, else the one it already holds, else the
    /// one it last released if free, else the one it asks for if free, else the next free
    /// one. The choice is held for
    /// [`OFFER_HOLD`]; offers are not journaled (a lost offer costs the client a retry).
    pub fn offer(
        &mut self,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: SystemTime,
    ) -> Result<Lease, PoolError> {
        let reserved = self.reserved_mac.get(&mac).copied();
        let ip = if let Some(r) = reserved.filter(|r| self.is_free_for(*r, &mac, now)) {
            r
        } else if let Some(l) = self
            .by_mac
            .get(&mac)
            .filter(|l| self.is_free_for(l.ip, &mac, now))
        {
            l.ip
        } else if let Some(r) = self
            .released
            .get(&mac)
            .copied()
            .filter(|r| self.is_free_for(*r, &mac, now))
        {
            r
        } else if let Some(r) = requested.filter(|r| self.is_free_for(*r, &mac, now)) {
            r
        } else {
            self.next_free(&mac, now)?
        };
        if let Some(l) = self.by_mac.get(&mac)
            && l.ip == ip
            && l.state == LeaseState::Bound
            && l.expires > now
        {
            return Ok(*l);
        }
        Ok(self.put(Lease {
            ip,
            mac,
            state: LeaseState::Offered,
            expires: now + OFFER_HOLD,
        }))
    }

    /// Binds `ip` to `mac` for `lease_time`, as a REQUEST asks, and journals it.
    pub fn bind(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        lease_time: Duration,
        now: SystemTime,
    ) -> Result<Lease, PoolError> {
        if !self.assignable_to(ip, &mac) {
            return Err(PoolError::OutOfRange { ip });
        }
        if let Some(reserved) = self.reserved_mac.get(&mac).copied()
            && reserved != ip
            && self.is_free_for(reserved, &mac, now)
        {
            // A reservation added while the client held a dynamic address: the NAK sends it
            // back to DISCOVER, where it gets the reserved one.
            return Err(PoolError::Reserved { mac, ip, reserved });
        }
        if self.on_probation(ip, now) {
            return Err(PoolError::Probation { ip });
        }
        if let Some(holder) = self.holder(ip, now).filter(|h| *h != mac) {
            return Err(PoolError::Taken { ip, holder });
        }
        if !self.ours_to_give(ip, &mac) {
            return Err(PoolError::PartnersShare { ip });
        }
        let lease = self.put(Lease {
            ip,
            mac,
            state: LeaseState::Bound,
            expires: now + lease_time,
        });
        self.records.push(Record::Bound {
            mac,
            ip,
            expires: unix_secs(lease.expires),
        });
        Ok(lease)
    }

    /// Frees the address `mac` holds, if it is `ip`.
    pub fn release(&mut self, mac: &MacAddr, ip: Ipv4Addr) -> bool {
        match self.by_mac.get(mac) {
            Some(l) if l.ip == ip => {
                if l.state == LeaseState::Bound {
                    self.records.push(Record::Released { mac: *mac, ip });
                }
                self.by_ip.remove(&ip);
                self.by_mac.remove(mac);
                // Bounded by the pool: a host cycling MACs cannot grow it past that.
                if self.released.len() >= self.size.max(1) {
                    self.released.clear();
                }
                self.released.insert(*mac, ip);
                true
            }
            _ => false,
        }
    }

    /// DHCPDECLINE from `mac`: `ip` is in use by someone we do not know. Honoured only
    /// from the address's current holder or offeree (RFC 2131 4.3.3: the client that was
    /// given it found it in use), never for an address reserved for another MAC, and only
    /// while fewer than [`Pool::probation_cap`] addresses are on probation: otherwise any
    /// host could empty the pool with a DECLINE per address. An honoured decline drops
    /// `mac`'s claim and keeps the address out of use until `until`. When the cap is
    /// reached the decline is refused, but `mac`'s claim is still dropped (it said it
    /// cannot use the address; its next DISCOVER gets another).
    pub fn decline(
        &mut self,
        mac: &MacAddr,
        ip: Ipv4Addr,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), DeclineRefused> {
        if !self.contains(ip) {
            return Err(DeclineRefused::NotOurs);
        }
        if let Some(owner) = self.reserved_ip.get(&ip)
            && owner != mac
        {
            return Err(DeclineRefused::ReservedForAnother);
        }
        let holds = self
            .by_mac
            .get(mac)
            .is_some_and(|l| l.ip == ip && l.expires > now);
        if !holds {
            return Err(DeclineRefused::NotHolder);
        }
        self.release(mac, ip);
        // A declined address is not one to hand back to the client that found it in use.
        self.released.remove(mac);
        if !self.probation.contains_key(&ip) {
            // Ended probations do not count against the cap.
            self.probation.retain(|_, end| *end > now);
            let cap = self.probation_cap();
            if self.probation.len() >= cap {
                return Err(DeclineRefused::Capped { cap });
            }
        }
        // After the release record (when the lease was bound): whoever follows the records
        // (the journal, `Leases`) sees the lease end, then the probation.
        self.probation.insert(ip, until);
        self.records.push(Record::Probation {
            ip,
            until: unix_secs(until),
        });
        Ok(())
    }

    /// How many addresses may be on probation at once: a [`PROBATION_SHARE`] of the
    /// addresses this pool hands out, at least one.
    pub fn probation_cap(&self) -> usize {
        (self.size / PROBATION_SHARE).max(1)
    }

    /// Addresses on probation now.
    pub fn on_probation_count(&self, now: SystemTime) -> usize {
        self.probation.values().filter(|end| **end > now).count()
    }

    /// Restores state read back from the journal; queues no records. Returns false when the
    /// record's address does not belong here (the configuration changed since).
    pub fn restore(&mut self, record: &Record) -> bool {
        match *record {
            Record::Bound { mac, ip, expires } => {
                if !self.contains(ip) {
                    return false;
                }
                self.put(Lease {
                    ip,
                    mac,
                    state: LeaseState::Bound,
                    expires: SystemTime::UNIX_EPOCH + Duration::from_secs(expires),
                });
            }
            Record::Released { mac, ip } => {
                if self.by_mac.get(&mac).is_some_and(|l| l.ip == ip) {
                    self.by_mac.remove(&mac);
                    self.by_ip.remove(&ip);
                }
            }
            Record::Probation { ip, until } => {
                if !self.contains(ip) {
                    return false;
                }
                self.probation
                    .insert(ip, SystemTime::UNIX_EPOCH + Duration::from_secs(until));
            }
        }
        true
    }

    /// The journal records queued since the last call, oldest first.
    pub fn take_records(&mut self, out: &mut Vec<Record>) {
        out.append(&mut self.records);
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
        let size: u64 = self.ranges.iter().map(|(a, b)| u64::from(b - a) + 1).sum();
        let (mut r, mut ip) = self.cursor;
        for _ in 0..size {
            let Some(&(start, end)) = self.ranges.get(r) else {
                // Only reachable with an empty range list (reservations only).
                break;
            };
            let candidate = Ipv4Addr::from(ip.clamp(start, end));
            if ip >= end {
                r = (r + 1) % self.ranges.len();
                ip = self.ranges.get(r).map_or(0, |x| x.0);
            } else {
                ip += 1;
            }
            if self.is_free_for(candidate, mac, now) {
                self.cursor = (r, ip);
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

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn pool() -> Pool {
        Pool::new(ip(10), ip(12))
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
        let want = ip(12);
        assert_eq!(p.offer(mac(1), Some(want), T0).unwrap().ip, want);
        assert_ne!(p.offer(mac(2), Some(want), T0).unwrap().ip, want);
        let outside = ip(99);
        assert_ne!(p.offer(mac(3), Some(outside), T0).unwrap().ip, outside);
    }

    #[test]
    fn release_frees_the_address_and_is_journaled() {
        let mut p = Pool::new(ip(10), ip(10));
        let l = p.offer(mac(1), None, T0).unwrap();
        p.bind(mac(1), l.ip, HOUR, T0).unwrap();
        assert!(!p.release(&mac(1), ip(11)));
        assert!(p.release(&mac(1), l.ip));
        assert_eq!(p.offer(mac(2), None, T0).unwrap().ip, l.ip);
        let mut recs = Vec::new();
        p.take_records(&mut recs);
        assert_eq!(
            recs,
            vec![
                Record::Bound {
                    mac: mac(1),
                    ip: l.ip,
                    expires: 3600
                },
                Record::Released {
                    mac: mac(1),
                    ip: l.ip
                },
            ]
        );
        p.take_records(&mut recs);
        assert_eq!(recs.len(), 2, "drained once");
    }

    #[test]
    fn a_client_gets_back_the_address_it_released_while_it_is_free() {
        let mut p = Pool::new(ip(10), ip(20));
        let first = p.offer(mac(1), None, T0).unwrap().ip;
        p.bind(mac(1), first, HOUR, T0).unwrap();
        assert!(p.release(&mac(1), first));
        // Another client takes the next free address, not the released one: the cursor
        // moved on.
        let other = p.offer(mac(2), None, T0).unwrap().ip;
        assert_ne!(other, first);
        // The machine reboots: the same address again, before what it asks for.
        assert_eq!(p.offer(mac(1), Some(ip(19)), T0).unwrap().ip, first);
        p.bind(mac(1), first, HOUR, T0).unwrap();
        assert!(p.release(&mac(1), first));
        // Once someone else holds it, the client gets another.
        p.bind(mac(3), first, HOUR, T0).unwrap();
        assert_ne!(p.offer(mac(1), None, T0).unwrap().ip, first);
        // An address the client declined is not handed back to it, probation or not.
        let mut p = Pool::new(ip(10), ip(20));
        let l = p.offer(mac(4), None, T0).unwrap();
        p.bind(mac(4), l.ip, HOUR, T0).unwrap();
        let _ = p.decline(&mac(4), l.ip, T0, T0);
        assert_ne!(p.offer(mac(4), None, T0).unwrap().ip, l.ip);
    }

    #[test]
    fn offers_are_not_journaled() {
        let mut p = pool();
        p.offer(mac(1), None, T0).unwrap();
        let mut recs = Vec::new();
        p.take_records(&mut recs);
        assert!(recs.is_empty());
    }

    #[test]
    fn several_ranges_and_exclusions() {
        let mut p = Pool::with(
            &[(ip(10), ip(11)), (ip(20), ip(22))],
            &[(ip(11), ip(11)), (ip(21), ip(21))],
            &[],
        );
        let got: Vec<_> = (1..=3)
            .map(|n| p.offer(mac(n), None, T0).unwrap().ip)
            .collect();
        assert_eq!(got, vec![ip(10), ip(20), ip(22)]);
        assert_eq!(p.offer(mac(4), None, T0), Err(PoolError::Exhausted));
        assert_eq!(
            p.bind(mac(5), ip(21), HOUR, T0),
            Err(PoolError::OutOfRange { ip: ip(21) })
        );
        assert!(!p.contains(ip(15)));
    }

    #[test]
    fn reservations_win_and_are_never_dynamic() {
        let mut p = Pool::with(
            &[(ip(10), ip(11))],
            &[],
            &[(mac(9), ip(10)), (mac(8), ip(50))],
        );
        // .10 is reserved for mac 9: others get .11 only.
        assert_eq!(p.offer(mac(1), Some(ip(10)), T0).unwrap().ip, ip(11));
        assert_eq!(p.offer(mac(2), None, T0), Err(PoolError::Exhausted));
        assert_eq!(p.offer(mac(9), None, T0).unwrap().ip, ip(10));
        // A reservation outside the range.
        assert_eq!(p.offer(mac(8), Some(ip(11)), T0).unwrap().ip, ip(50));
        p.bind(mac(8), ip(50), HOUR, T0).unwrap();
        assert!(matches!(
            p.bind(mac(2), ip(50), HOUR, T0),
            Err(PoolError::OutOfRange { .. })
        ));
        // Holding a dynamic address while its reservation is free: NAKed towards it.
        assert!(matches!(
            p.bind(mac(9), ip(11), HOUR, T0),
            Err(PoolError::Reserved { .. }) | Err(PoolError::Taken { .. })
        ));
    }

    #[test]
    fn declined_addresses_stay_out_until_probation_ends() {
        let mut p = Pool::new(ip(10), ip(11));
        let l = p.offer(mac(1), None, T0).unwrap();
        p.bind(mac(1), l.ip, HOUR, T0).unwrap();
        let until = T0 + Duration::from_secs(600);
        assert_eq!(p.decline(&mac(1), l.ip, T0, until), Ok(()));
        assert!(p.lease_of(&mac(1)).is_none());
        // Never offered meanwhile, not even to the client that declined it.
        for t in [T0, T0 + Duration::from_secs(599)] {
            for m in [mac(2), mac(1)] {
                let got = p.offer(m, Some(l.ip), t).unwrap().ip;
                assert_ne!(got, l.ip);
                p.release(&m, got);
            }
        }
        assert_eq!(
            p.bind(mac(3), l.ip, HOUR, T0),
            Err(PoolError::Probation { ip: l.ip })
        );
        assert_eq!(p.offer(mac(3), Some(l.ip), until).unwrap().ip, l.ip);
        assert_eq!(
            p.decline(&mac(1), ip(99), T0, until),
            Err(DeclineRefused::NotOurs)
        );
        let mut recs = Vec::new();
        p.take_records(&mut recs);
        // The lease ends, then the probation starts.
        assert!(recs.ends_with(&[
            Record::Released {
                mac: mac(1),
                ip: l.ip
            },
            Record::Probation {
                ip: l.ip,
                until: 600
            }
        ]));
    }

    #[test]
    fn only_the_holder_or_offeree_may_decline() {
        let mut p = Pool::new(ip(10), ip(19));
        let until = T0 + Duration::from_secs(600);
        let bound = p.offer(mac(1), None, T0).unwrap().ip;
        p.bind(mac(1), bound, HOUR, T0).unwrap();
        let offered = p.offer(mac(2), None, T0).unwrap().ip;
        // Someone else's address, bound or offered, and a free one: refused, nothing changes.
        for a in [bound, offered, ip(15)] {
            assert_eq!(
                p.decline(&mac(3), a, T0, until),
                Err(DeclineRefused::NotHolder)
            );
            assert!(!p.on_probation(a, T0));
        }
        assert_eq!(p.lease_of(&mac(1)).map(|l| l.ip), Some(bound));
        assert_eq!(p.lease_of(&mac(2)).map(|l| l.ip), Some(offered));
        let mut recs = Vec::new();
        p.take_records(&mut recs);
        recs.clear();
        // An offer that has lapsed is no longer the client's to decline.
        assert_eq!(
            p.decline(&mac(2), offered, T0 + OFFER_HOLD, until),
            Err(DeclineRefused::NotHolder)
        );
        // The offeree, within the hold: honoured; nothing was bound, so no release record.
        assert_eq!(p.decline(&mac(2), offered, T0, until), Ok(()));
        assert!(p.on_probation(offered, T0));
        p.take_records(&mut recs);
        assert_eq!(
            recs,
            vec![Record::Probation {
                ip: offered,
                until: 600
            }]
        );
    }

    #[test]
    fn a_reserved_address_is_declined_only_by_its_owner() {
        let mut p = Pool::with(&[(ip(10), ip(19))], &[], &[(mac(9), ip(50))]);
        let until = T0 + Duration::from_secs(600);
        assert_eq!(
            p.decline(&mac(1), ip(50), T0, until),
            Err(DeclineRefused::ReservedForAnother)
        );
        // Nor once its owner has been offered it.
        assert_eq!(p.offer(mac(9), None, T0).unwrap().ip, ip(50));
        assert_eq!(
            p.decline(&mac(1), ip(50), T0, until),
            Err(DeclineRefused::ReservedForAnother)
        );
        assert_eq!(p.lease_of(&mac(9)).map(|l| l.ip), Some(ip(50)));
        assert_eq!(p.decline(&mac(9), ip(50), T0, until), Ok(()));
        assert!(p.on_probation(ip(50), T0));
    }

    #[test]
    fn probation_is_capped_at_a_share_of_the_pool() {
        // 16 addresses: at most 4 on probation.
        let mut p = Pool::new(ip(10), ip(25));
        assert_eq!(p.size(), 16);
        assert_eq!(p.probation_cap(), 16 / PROBATION_SHARE);
        let until = T0 + Duration::from_secs(600);
        let mut outcomes = Vec::new();
        for n in 1..=6 {
            let l = p.offer(mac(n), None, T0).unwrap();
            p.bind(mac(n), l.ip, HOUR, T0).unwrap();
            outcomes.push(p.decline(&mac(n), l.ip, T0, until));
        }
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 4);
        assert_eq!(outcomes[4], Err(DeclineRefused::Capped { cap: 4 }));
        assert_eq!(p.on_probation_count(T0), 4);
        // A refused decline still ends the client's claim: it gets another address.
        assert!(p.lease_of(&mac(5)).is_none());
        // Once probations end, there is room again.
        let later = until + Duration::from_secs(1);
        let l = p.offer(mac(7), None, later).unwrap();
        p.bind(mac(7), l.ip, HOUR, later).unwrap();
        assert_eq!(
            p.decline(&mac(7), l.ip, later, later + Duration::from_secs(600)),
            Ok(())
        );
        assert_eq!(p.on_probation_count(later), 1);
        // A tiny pool may still put its one address on probation.
        let mut one = Pool::new(ip(10), ip(10));
        one.offer(mac(1), None, T0).unwrap();
        assert_eq!(one.decline(&mac(1), ip(10), T0, until), Ok(()));
    }

    #[test]
    fn the_size_counts_ranges_less_exclusions_plus_reservations() {
        let p = Pool::with(
            &[(ip(10), ip(19)), (ip(30), ip(39))],
            // Overlapping exclusions count once; one reaches outside the ranges.
            &[(ip(12), ip(14)), (ip(13), ip(15)), (ip(38), ip(45))],
            // One reservation inside a range, one outside.
            &[(mac(1), ip(11)), (mac(2), ip(200))],
        );
        // 20 in ranges, less .12-.15 and .38-.39, less nothing for .11 (still an address),
        // plus .200.
        assert_eq!(p.size(), 20 - 4 - 2 + 1);
        let big = Pool::new(
            Ipv4Addr::new(10, 96, 1, 0),
            Ipv4Addr::new(10, 103, 255, 254),
        );
        assert_eq!(big.size(), (8 << 16) - 256 - 1);
    }

    #[test]
    fn restored_leases_are_held() {
        let mut p = pool();
        assert!(p.restore(&Record::Bound {
            mac: mac(1),
            ip: ip(10),
            expires: 3600
        }));
        assert!(!p.restore(&Record::Bound {
            mac: mac(2),
            ip: ip(99),
            expires: 3600
        }));
        assert!(p.restore(&Record::Probation {
            ip: ip(11),
            until: 3600
        }));
        assert_eq!(p.offer(mac(3), Some(ip(10)), T0).unwrap().ip, ip(12));
        assert_eq!(p.offer(mac(4), None, T0), Err(PoolError::Exhausted));
        assert_eq!(p.offer(mac(1), None, T0).unwrap().state, LeaseState::Bound);
        let mut recs = Vec::new();
        p.take_records(&mut recs);
        assert!(recs.is_empty(), "restoring journals nothing");
        // After expiry the address is free again.
        let late = T0 + Duration::from_secs(3601);
        assert_eq!(p.offer(mac(5), Some(ip(10)), late).unwrap().ip, ip(10));
    }
}
