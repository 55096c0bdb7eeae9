//! The journal's bytes, sans I/O: one 24-byte CRC-checked [`Record`] ([`Record::encode`],
//! [`Record::decode`]) and a whole file, the magic then records ([`emit`], [`parse`]).
//!
//! Nothing here panics, whatever the input. Decoding accepts only what [`Record::encode`]
//! writes, so every record that decodes re-encodes to the same bytes.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::time::SystemTime;

use stork_proto::MacAddr;

/// The first bytes of every journal file.
pub const MAGIC: &[u8; 8] = b"STRKLJ01";
/// Bytes in one record.
pub const RECORD_LEN: usize = 24;

/// Where each field sits in a record.
mod field {
    use std::ops::Range;
    pub const KIND: usize = 0;
    pub const MAC: Range<usize> = 1..7;
    pub const IP: Range<usize> = 7..11;
    /// Little endian Unix seconds: a lease's expiry or the end of probation.
    pub const TIME: Range<usize> = 11..19;
    /// Always zero.
    pub const PAD: usize = 19;
    /// What the CRC covers.
    pub const BODY: Range<usize> = 0..20;
    /// CRC-32 (IEEE) of the body, little endian.
    pub const CRC: Range<usize> = 20..24;
}

const KIND_BOUND: u8 = 1;
const KIND_RELEASED: u8 = 2;
const KIND_PROBATION: u8 = 3;

/// One change to the lease state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `mac` holds `ip` until `expires` (Unix seconds).
    Bound {
        mac: MacAddr,
        ip: Ipv4Addr,
        expires: u64,
    },
    Released {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    /// `ip` was declined and stays out of use until `until` (Unix seconds).
    Probation {
        ip: Ipv4Addr,
        until: u64,
    },
}

/// Seconds since the Unix epoch, the journal's clock; 0 before it.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Record {
    pub fn ip(&self) -> Ipv4Addr {
        match self {
            Record::Bound { ip, .. }
            | Record::Released { ip, .. }
            | Record::Probation { ip, .. } => *ip,
        }
    }

    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let (kind, mac, ip, time) = match *self {
            Record::Bound { mac, ip, expires } => (KIND_BOUND, mac, ip, expires),
            Record::Released { mac, ip } => (KIND_RELEASED, mac, ip, 0),
            Record::Probation { ip, until } => (KIND_PROBATION, MacAddr([0; 6]), ip, until),
        };
        let mut b = [0u8; RECORD_LEN];
        b[field::KIND] = kind;
        b[field::MAC].copy_from_slice(&mac.0);
        b[field::IP].copy_from_slice(&ip.octets());
        b[field::TIME].copy_from_slice(&time.to_le_bytes());
        let crc = crc32fast::hash(&b[field::BODY]);
        b[field::CRC].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` for a torn or corrupt record, and for one [`Record::encode`] would not write
    /// (a released record with a time, a probation with a MAC): that is not ours either.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Option<Self> {
        if crc32fast::hash(&b[field::BODY]).to_le_bytes() != b[field::CRC] || b[field::PAD] != 0 {
            return None;
        }
        let mac = MacAddr(array(b, field::MAC)?);
        let ip = Ipv4Addr::from(array::<4>(b, field::IP)?);
        let time = u64::from_le_bytes(array(b, field::TIME)?);
        match b[field::KIND] {
            KIND_BOUND => Some(Record::Bound {
                mac,
                ip,
                expires: time,
            }),
            KIND_RELEASED if time == 0 => Some(Record::Released { mac, ip }),
            KIND_PROBATION if mac.0 == [0; 6] => Some(Record::Probation { ip, until: time }),
            _ => None,
        }
    }
}

fn array<const N: usize>(b: &[u8], at: Range<usize>) -> Option<[u8; N]> {
    b.get(at)?.try_into().ok()
}

/// What a journal file holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub records: Vec<Record>,
    /// Bytes after the last good record (a torn write), dropped.
    pub torn_bytes: usize,
    /// Bytes between good records that are no record (a corrupt stretch: a flipped bit, a
    /// lost or doubled sector), skipped, and how many such stretches.
    pub skipped_bytes: usize,
    pub skipped_runs: usize,
}

/// A journal file holding exactly `records`.
pub fn emit(records: &[Record]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(MAGIC.len() + records.len() * RECORD_LEN);
    buf.extend_from_slice(MAGIC);
    for r in records {
        buf.extend_from_slice(&r.encode());
    }
    buf
}

/// The record starting at `at` in `body`, if a whole good one does.
fn record_at(body: &[u8], at: usize) -> Option<Record> {
    let b: &[u8; RECORD_LEN] = body.get(at..at.checked_add(RECORD_LEN)?)?.try_into().ok()?;
    // The cheap checks before the CRC: a resync tries every offset.
    if !(KIND_BOUND..=KIND_PROBATION).contains(&b[field::KIND]) || b[field::PAD] != 0 {
        return None;
    }
    Record::decode(b)
}

/// The good records of a journal file. `None` when the bytes do not start with the magic;
/// empty bytes are an empty journal (a crash can leave an empty file between create and
/// the first write).
///
/// Records are read in steps of [`RECORD_LEN`]. Where no good record starts, the reader
/// resynchronises: it looks at every following offset, one byte at a time, for the next
/// place a good record starts (kind, zero pad and CRC-32 all right: a false match is about
/// one in 2^34 per offset), and goes on from there; the stretch in between is skipped
/// ([`Loaded::skipped_bytes`]). Every record after a corrupt one, each of them possibly a
/// lease already acknowledged, is kept. When no good record follows, the rest is a torn
/// tail ([`Loaded::torn_bytes`]). A skipped record is a change lost: the state before it
/// stands (a lease it ended or moved stays with its holder until it expires), so no
/// address is handed to two clients because of it.
pub fn parse(data: &[u8]) -> Option<Loaded> {
    if data.is_empty() {
        return Some(Loaded::default());
    }
    let body = data.strip_prefix(MAGIC.as_slice())?;
    let mut loaded = Loaded::default();
    let mut at = 0;
    while at < body.len() {
        if let Some(r) = record_at(body, at) {
            loaded.records.push(r);
            at += RECORD_LEN;
            continue;
        }
        match (at + 1..body.len()).find(|&next| record_at(body, next).is_some()) {
            Some(next) => {
                loaded.skipped_bytes += next - at;
                loaded.skipped_runs += 1;
                at = next;
            }
            None => {
                loaded.torn_bytes = body.len() - at;
                break;
            }
        }
    }
    Some(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::fixtures::{bound, ip, mac};

    #[test]
    fn crc_matches_the_reference_value() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    /// Records as journals already on disk hold them (the CRC from Python's `zlib.crc32`):
    /// the format must never change under them.
    #[test]
    fn recorded_bytes_still_decode() {
        for (hex, r) in [
            (
                "015254000000010a00000200f1536500000000001ca4aa05",
                bound(1, 2, 1_700_000_000),
            ),
            (
                "025254000000030a0000040000000000000000002b24b63f",
                Record::Released {
                    mac: mac(3),
                    ip: ip(4),
                },
            ),
            (
                "030000000000000a000005070000000000000000ec166b18",
                Record::Probation {
                    ip: ip(5),
                    until: 7,
                },
            ),
        ] {
            let b: [u8; RECORD_LEN] = hex::decode(hex).unwrap().try_into().unwrap();
            assert_eq!(Record::decode(&b), Some(r), "{hex}");
            assert_eq!(r.encode(), b, "{hex}");
        }
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        for r in [
            bound(1, 2, 1_700_000_000),
            Record::Released {
                mac: mac(3),
                ip: ip(4),
            },
            Record::Probation {
                ip: ip(5),
                until: 7,
            },
        ] {
            let b = r.encode();
            assert_eq!(Record::decode(&b), Some(r));
            for i in 0..RECORD_LEN {
                let mut bad = b;
                bad[i] ^= 0x40;
                assert_eq!(Record::decode(&bad), None, "flipped byte {i}");
            }
        }
        assert_eq!(Record::decode(&[0; RECORD_LEN]), None);
    }

    /// Found by the `journal` fuzz target: these passed the CRC but re-encoded to other
    /// bytes. `encode` never wrote them.
    #[test]
    fn fields_a_kind_does_not_use_must_be_zero() {
        let with_crc = |mut b: [u8; RECORD_LEN]| {
            let crc = crc32fast::hash(&b[field::BODY]);
            b[field::CRC].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut released = Record::Released {
            mac: mac(3),
            ip: ip(4),
        }
        .encode();
        released[field::TIME.start] = 1;
        assert_eq!(Record::decode(&with_crc(released)), None);
        let mut probation = Record::Probation {
            ip: ip(5),
            until: 7,
        }
        .encode();
        probation[field::MAC.start] = 1;
        assert_eq!(Record::decode(&with_crc(probation)), None);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_bad_magic_refused() {
        let mut data = emit(&[bound(1, 10, 100)]);
        data.extend_from_slice(&bound(2, 11, 100).encode()[..7]);
        let l = parse(&data).unwrap();
        assert_eq!(l.records, vec![bound(1, 10, 100)]);
        assert_eq!(l.torn_bytes, 7);
        assert_eq!(parse(b""), Some(Loaded::default()));
        assert_eq!(parse(b"garbage!garbage!"), None);
    }

    fn five() -> Vec<Record> {
        vec![
            bound(1, 10, 100),
            bound(2, 11, 100),
            Record::Released {
                mac: mac(1),
                ip: ip(10),
            },
            Record::Probation {
                ip: ip(12),
                until: 300,
            },
            bound(3, 13, 100),
        ]
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_skipped_and_every_later_one_kept() {
        let records = five();
        for i in 0..RECORD_LEN {
            let mut data = emit(&records);
            data[MAGIC.len() + RECORD_LEN + i] ^= 0x10;
            let l = parse(&data).unwrap();
            let mut want = records.clone();
            want.remove(1);
            assert_eq!(l.records, want, "byte {i}");
            assert_eq!(
                (l.skipped_bytes, l.skipped_runs, l.torn_bytes),
                (RECORD_LEN, 1, 0)
            );
        }
    }

    #[test]
    fn lost_or_inserted_bytes_are_skipped_too() {
        let records = five();
        let clean = emit(&records);
        let second = MAGIC.len() + RECORD_LEN;
        // Half of the second record lost: the third starts off the 24-byte grid.
        let mut cut = clean.clone();
        cut.drain(second..second + 10);
        let l = parse(&cut).unwrap();
        assert_eq!(l.records, [&records[..1], &records[2..]].concat());
        assert_eq!((l.skipped_bytes, l.skipped_runs), (RECORD_LEN - 10, 1));
        // Garbage written between two records, and a zeroed stretch over two records.
        let mut grown = clean.clone();
        grown.splice(second..second, [0xAB; 7]);
        let l = parse(&grown).unwrap();
        assert_eq!(l.records, records);
        assert_eq!((l.skipped_bytes, l.skipped_runs), (7, 1));
        let mut zeroed = clean.clone();
        zeroed[second..second + 2 * RECORD_LEN].fill(0);
        let l = parse(&zeroed).unwrap();
        assert_eq!(l.records, [&records[..1], &records[3..]].concat());
        assert_eq!((l.skipped_bytes, l.skipped_runs), (2 * RECORD_LEN, 1));
        // Two separate bad records: two runs.
        let mut two = clean;
        two[second] ^= 1;
        two[second + 2 * RECORD_LEN + 5] ^= 1;
        let l = parse(&two).unwrap();
        assert_eq!(l.records.len(), 3);
        assert_eq!((l.skipped_bytes, l.skipped_runs), (2 * RECORD_LEN, 2));
    }

    #[test]
    fn a_corrupt_last_record_is_a_torn_tail() {
        let records = [bound(1, 10, 100), bound(2, 11, 100), bound(3, 12, 100)];
        let mut data = emit(&records);
        data[MAGIC.len() + 2 * RECORD_LEN + 3] ^= 1;
        let l = parse(&data).unwrap();
        assert_eq!(l.records, records[..2]);
        assert_eq!((l.torn_bytes, l.skipped_bytes), (RECORD_LEN, 0));
    }
}
