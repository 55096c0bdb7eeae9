//! What a journal's records add up to, sans I/O: the [`LiveSet`] (bound leases and
//! probations), the records that rebuild it ([`LiveSet::snapshot`]) and when a journal is
//! worth rewriting from it ([`LiveSet::wants_compaction`]). Time is passed in.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use stork_proto::MacAddr;

use super::record::Record;

/// Compaction waits until the journal holds at least this many records...
pub const COMPACT_MIN: u64 = 100_000;
/// ...and this many times more than are live.
pub const COMPACT_FACTOR: u64 = 4;

/// The state a journal describes: what is bound and what is on probation.
#[derive(Debug, Default, Clone)]
pub struct LiveSet {
    leases: HashMap<MacAddr, (Ipv4Addr, u64)>,
    holders: HashMap<Ipv4Addr, MacAddr>,
    probation: HashMap<Ipv4Addr, u64>,
}

impl LiveSet {
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut s = Self::default();
        for r in records {
            s.apply(r);
        }
        s
    }

    pub fn apply(&mut self, r: &Record) {
        match *r {
            Record::Bound { mac, ip, expires } => {
                if let Some((old, _)) = self.leases.insert(mac, (ip, expires))
                    && old != ip
                {
                    self.holders.remove(&old);
                }
                if let Some(prev) = self.holders.insert(ip, mac)
                    && prev != mac
                {
                    self.leases.remove(&prev);
                }
            }
            Record::Released { mac, ip } => {
                if self.leases.get(&mac).is_some_and(|(held, _)| *held == ip) {
                    self.leases.remove(&mac);
                    self.holders.remove(&ip);
                }
            }
            Record::Probation { ip, until } => {
                if let Some(mac) = self.holders.remove(&ip) {
                    self.leases.remove(&mac);
                }
                self.probation.insert(ip, until);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.leases.len() + self.probation.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records that rebuild this state, without what ended before `now` (Unix seconds).
    pub fn snapshot(&self, now: u64) -> Vec<Record> {
        let mut out: Vec<Record> = self
            .leases
            .iter()
            .filter(|(_, (_, expires))| *expires > now)
            .map(|(mac, (ip, expires))| Record::Bound {
                mac: *mac,
                ip: *ip,
                expires: *expires,
            })
            .chain(
                self.probation
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(ip, until)| Record::Probation {
                        ip: *ip,
                        until: *until,
                    }),
            )
            .collect();
        // Stable output: the same state always writes the same file.
        out.sort_by_key(|r| (u32::from(r.ip()), matches!(r, Record::Probation { .. })));
        out
    }

    /// Whether a journal of `in_file` records describing this state should be rewritten:
    /// mostly dead records, and enough of them for the rewrite to pay.
    pub fn wants_compaction(&self, in_file: u64) -> bool {
        in_file >= COMPACT_MIN && in_file > COMPACT_FACTOR * self.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::fixtures::{bound, ip, mac};

    #[test]
    fn live_set_follows_moves_releases_and_declines() {
        let s = LiveSet::from_records(&[
            bound(1, 10, 100),
            bound(2, 11, 100),
            // mac 1 moves to .12; .10 is free again
            bound(1, 12, 200),
            // .11 expired under mac 2 and went to mac 3
            bound(3, 11, 300),
            Record::Released {
                mac: mac(3),
                ip: ip(11),
            },
            bound(4, 13, 50),
            Record::Probation {
                ip: ip(13),
                until: 400,
            },
            bound(5, 14, 90),
        ]);
        assert_eq!(
            s.snapshot(95),
            vec![
                bound(1, 12, 200),
                Record::Probation {
                    ip: ip(13),
                    until: 400
                },
            ]
        );
    }

    #[test]
    fn compaction_needs_many_records_mostly_dead() {
        let empty = LiveSet::default();
        assert!(!empty.wants_compaction(COMPACT_MIN - 1));
        assert!(empty.wants_compaction(COMPACT_MIN));
        let one = LiveSet::from_records(&[bound(1, 10, 100)]);
        assert!(one.wants_compaction(COMPACT_MIN));
        let mut many = LiveSet::default();
        for n in 0..(COMPACT_MIN / COMPACT_FACTOR) {
            let [a, b, c, d] = (n as u32).to_be_bytes();
            many.apply(&Record::Bound {
                mac: MacAddr([0x52, 0x54, a, b, c, d]),
                ip: Ipv4Addr::new(a, b, c, d),
                expires: 100,
            });
        }
        assert!(!many.wants_compaction(COMPACT_MIN));
        assert!(many.wants_compaction(COMPACT_MIN + 1));
    }
}
