//! Two appliances on one network sharing its pool (an HA pair), sans I/O.
//!
//! Load balancing as RFC 3074 describes it: each client hashes to one of 256 buckets from
//! its MAC, and while both servers run each answers its own half of the buckets only (the
//! other's clients get no answer from it). New addresses are split too, by parity: the
//! first server takes even addresses, the second odd ones, so the two never pick the same
//! free address at once. Leases live in the shared database, which refuses a lease on an
//! address another client holds (`journal::postgres`): that, not the split, is what keeps
//! an address from going to two clients, whatever either server believed.
//!
//! When the partner has been gone for `failover` (its session lock in PostgreSQL free:
//! `dhcp::run`), the survivor is *partner-down*: it reads every lease back from the
//! database and answers every client from the whole pool, until the partner returns.

use std::net::Ipv4Addr;

use stork_proto::MacAddr;

/// Which of the pair this server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    First,
    Second,
}

impl Role {
    pub fn partner(self) -> Role {
        match self {
            Role::First => Role::Second,
            Role::Second => Role::First,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::First => "first",
            Role::Second => "second",
        }
    }
}

/// The server of the pair that answers `mac` while both run: buckets 0 to 127 are the
/// first's (RFC 3074's split of 256 buckets in two halves). The bucket is FNV-1a of the
/// six MAC bytes, folded to one byte: a stable, even spread that both servers compute
/// alike.
pub fn bucket_owner(mac: &MacAddr) -> Role {
    let mut h: u32 = 0x811c_9dc5;
    for b in mac.0 {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let bucket = (h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) & 0xff;
    if bucket < 128 {
        Role::First
    } else {
        Role::Second
    }
}

/// This server's part in the pair now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaState {
    pub role: Role,
    /// The partner is gone (for longer than the failover time): serve everyone.
    pub partner_down: bool,
}

impl HaState {
    pub fn new(role: Role) -> Self {
        Self {
            role,
            partner_down: false,
        }
    }

    /// Whether this server answers `mac` now.
    pub fn answers(&self, mac: &MacAddr) -> bool {
        self.partner_down || bucket_owner(mac) == self.role
    }

    /// Whether this server may hand out `ip` to a client that does not hold it yet.
    pub fn allocates(&self, ip: Ipv4Addr) -> bool {
        self.partner_down || share_of(ip) == self.role
    }
}

/// Whose new addresses `ip` is while both run: even ones the first's, odd ones the second's.
pub fn share_of(ip: Ipv4Addr) -> Role {
    if u32::from(ip).is_multiple_of(2) {
        Role::First
    } else {
        Role::Second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buckets_split_clients_about_evenly_and_stably() {
        let macs: Vec<MacAddr> = (0..1000u16)
            .map(|n| {
                let [a, b] = n.to_be_bytes();
                MacAddr([0x52, 0x54, 0, 0x11, a, b])
            })
            .collect();
        let first = macs
            .iter()
            .filter(|m| bucket_owner(m) == Role::First)
            .count();
        assert!((400..=600).contains(&first), "{first} of 1000");
        assert_eq!(bucket_owner(&macs[7]), bucket_owner(&macs[7]));
    }

    #[test]
    fn both_running_each_answers_its_own_and_a_survivor_answers_all() {
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let mine = bucket_owner(&mac);
        let (me, partner) = (HaState::new(mine), HaState::new(mine.partner()));
        assert!(me.answers(&mac) && !partner.answers(&mac));
        let ip = Ipv4Addr::new(10, 77, 0, 100);
        assert!(HaState::new(Role::First).allocates(ip));
        assert!(!HaState::new(Role::Second).allocates(ip));
        let survivor = HaState {
            partner_down: true,
            ..partner
        };
        assert!(survivor.answers(&mac) && survivor.allocates(ip));
    }
}
