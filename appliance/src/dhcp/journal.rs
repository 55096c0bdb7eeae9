//! The durable lease store: an append-only journal, `DATA_DIR/dhcp-leases.journal`.
//!
//! # Format
//! An 8-byte magic, then fixed 24-byte records: kind (1 bound, 2 released, 3 probation),
//! MAC (6), IPv4 address (4), a time in Unix seconds (8, little endian: the lease's expiry or
//! the end of probation), one zero byte, and a CRC-32 (IEEE) of the first 20 bytes. A torn
//! or corrupt tail (a crash in the middle of a write) fails its CRC; loading stops there and
//! the next compaction drops it.
//!
//! # Durability (fsync policy)
//! - Offers are never written: a lost offer costs the client one retry.
//! - Every bound lease (each ACK, renewals included: the expiry moves), release and decline
//!   is one record. The records of one request go to a dedicated writer thread together with
//!   the reply that depends on them; the writer appends everything queued, calls
//!   `fdatasync` once for the batch (group commit), and only then sends the batch's ACKs.
//!   So an ACKed lease is on disk before the client hears of it, and a crash (kill -9 or
//!   power loss) can lose only leases their clients were never told about. The batch is
//!   whatever queued while the previous `fdatasync` ran (at most [`MAX_BATCH`] records),
//!   so an ACK waits at most two `fdatasync`s (about 1.5 ms each on this machine's disk),
//!   and the number of `fdatasync`s per second stays bounded however high the load.
//! - If a write or `fdatasync` fails, that batch's ACKs are not sent (clients retry) and the
//!   journal is rewritten from the writer's live set before the next append.
//! - Compaction rewrites the live set (unexpired bindings and probations) to a temporary
//!   file, `fdatasync`s it, renames it over the journal and `fsync`s the directory: at
//!   start-up, and when the journal holds [`COMPACT_FACTOR`] times more records than are live
//!   (and at least [`COMPACT_MIN`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use stork_proto::MacAddr;

use super::{Stats, bump};

pub const FILE_NAME: &str = "dhcp-leases.journal";
const MAGIC: &[u8; 8] = b"STRKLJ01";
const RECORD_LEN: usize = 24;
/// Records written per `fdatasync` at most.
pub const MAX_BATCH: usize = 8192;
/// Jobs that may wait for the writer; beyond that replies are dropped (clients retry).
const QUEUE: usize = 65_536;
pub const COMPACT_MIN: u64 = 100_000;
pub const COMPACT_FACTOR: u64 = 4;

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
        b[0] = kind;
        b[1..7].copy_from_slice(&mac.0);
        b[7..11].copy_from_slice(&ip.octets());
        b[11..19].copy_from_slice(&time.to_le_bytes());
        let crc = crc32fast::hash(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` for a torn or corrupt record.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Option<Self> {
        let (body, crc) = b.split_at(20);
        if crc32fast::hash(body).to_le_bytes() != crc || body[19] != 0 {
            return None;
        }
        let mac = MacAddr(body[1..7].try_into().ok()?);
        let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&body[7..11]).ok()?);
        let time = u64::from_le_bytes(body[11..19].try_into().ok()?);
        match body[0] {
            KIND_BOUND => Some(Record::Bound {
                mac,
                ip,
                expires: time,
            }),
            KIND_RELEASED => Some(Record::Released { mac, ip }),
            KIND_PROBATION => Some(Record::Probation { ip, until: time }),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read the lease journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Stork lease journal (bad magic): refusing to overwrite it")]
    NotAJournal { path: PathBuf },
    #[error("cannot write the lease journal {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the lease journal writer")]
    Spawn(#[source] std::io::Error),
}

/// The state a journal describes: what is bound and what is on probation.
#[derive(Debug, Default, Clone)]
pub struct LiveSet {
    leases: HashMap<MacAddr, (Ipv4Addr, u64)>,
    holders: HashMap<Ipv4Addr, MacAddr>,
    probation: HashMap<Ipv4Addr, u64>,
}

impl LiveSet {
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
}

/// What [`load`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub records: Vec<Record>,
    /// Bytes after the last good record (a torn write), dropped.
    pub torn_bytes: usize,
}

/// Reads every good record of the journal at `path`; a missing or empty file is empty.
pub fn load(path: &Path) -> Result<Loaded, JournalError> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => f
            .read_to_end(&mut data)
            .map_err(|source| JournalError::Read {
                path: path.to_path_buf(),
                source,
            })?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(source) => {
            return Err(JournalError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse(&data).ok_or_else(|| JournalError::NotAJournal {
        path: path.to_path_buf(),
    })
}

/// `None` when the bytes do not start with the magic (an empty file is an empty journal:
/// a crash can leave one between create and the first write).
fn parse(data: &[u8]) -> Option<Loaded> {
    if data.is_empty() {
        return Some(Loaded::default());
    }
    let body = data.strip_prefix(MAGIC.as_slice())?;
    let mut out = Loaded::default();
    let mut chunks = body.chunks_exact(RECORD_LEN);
    for chunk in chunks.by_ref() {
        let Some(r) = <&[u8; RECORD_LEN]>::try_from(chunk)
            .ok()
            .and_then(Record::decode)
        else {
            break;
        };
        out.records.push(r);
    }
    out.torn_bytes = body.len() - out.records.len() * RECORD_LEN;
    Some(out)
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `records` as a fresh journal at `path`, durably (temp file, fdatasync, rename,
/// directory fsync), and returns it opened for appending.
fn rewrite(path: &Path, records: &[Record]) -> Result<File, JournalError> {
    let tmp = path.with_extension("journal.tmp");
    let mut buf = Vec::with_capacity(MAGIC.len() + records.len() * RECORD_LEN);
    buf.extend_from_slice(MAGIC);
    for r in records {
        buf.extend_from_slice(&r.encode());
    }
    let mut f = File::create(&tmp).map_err(write_err(&tmp))?;
    f.write_all(&buf).map_err(write_err(&tmp))?;
    f.sync_data().map_err(write_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(write_err(path))?;
    if let Some(dir) = path.parent() {
        // The rename itself must survive power loss.
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err(dir))?;
    }
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(write_err(path))
}

/// An open journal, compacted, with the live state it holds.
pub struct Journal {
    path: PathBuf,
    file: File,
    live: LiveSet,
    /// Records in the file now.
    in_file: u64,
}

impl Journal {
    /// Loads the journal (creating it if missing), compacts it, and returns it with the live
    /// records to seed the pools with.
    pub fn open(path: &Path, now: SystemTime) -> Result<(Self, Vec<Record>), JournalError> {
        let loaded = load(path)?;
        if loaded.torn_bytes > 0 {
            tracing::warn!(path = %path.display(), bytes = loaded.torn_bytes, "lease journal had a torn tail (crash during a write); dropped it");
        }
        let mut live = LiveSet::default();
        for r in &loaded.records {
            live.apply(r);
        }
        let snapshot = live.snapshot(unix_secs(now));
        let file = rewrite(path, &snapshot)?;
        tracing::info!(path = %path.display(), read = loaded.records.len(), live = snapshot.len(), "lease journal loaded and compacted");
        let mut live = LiveSet::default();
        for r in &snapshot {
            live.apply(r);
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                in_file: snapshot.len() as u64,
                live,
            },
            snapshot,
        ))
    }

    /// Appends `records` and makes them durable.
    pub fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        let mut buf = Vec::with_capacity(records.len() * RECORD_LEN);
        for r in records {
            buf.extend_from_slice(&r.encode());
            self.live.apply(r);
        }
        self.in_file += records.len() as u64;
        self.file.write_all(&buf).map_err(write_err(&self.path))?;
        self.file.sync_data().map_err(write_err(&self.path))
    }

    /// Rewrites the journal from the live set.
    pub fn compact(&mut self, now: SystemTime) -> Result<(), JournalError> {
        let snapshot = self.live.snapshot(unix_secs(now));
        self.file = rewrite(&self.path, &snapshot)?;
        self.in_file = snapshot.len() as u64;
        tracing::info!(path = %self.path.display(), live = snapshot.len(), "lease journal compacted");
        Ok(())
    }

    fn wants_compaction(&self) -> bool {
        self.in_file >= COMPACT_MIN && self.in_file > COMPACT_FACTOR * self.live.len() as u64
    }

    /// Starts the writer thread; replies are sent on `sock` once their records are durable.
    pub fn spawn(self, sock: UdpSocket, stats: Arc<Stats>) -> Result<JournalHandle, JournalError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("dhcp-journal".into())
            .spawn(move || writer(self, rx, &sock, &stats))
            .map_err(JournalError::Spawn)?;
        Ok(JournalHandle { tx })
    }
}

/// Records to make durable, and the reply to send once they are.
#[derive(Debug)]
pub struct Job {
    pub records: Vec<Record>,
    pub reply: Option<(Vec<u8>, SocketAddr)>,
}

/// The socket loop's side of the writer thread. Dropping it stops the thread after it has
/// written what was queued.
#[derive(Clone)]
pub struct JournalHandle {
    tx: SyncSender<Job>,
}

impl JournalHandle {
    /// Queues a job; `false` when the writer is too far behind or gone (the reply is
    /// dropped, the client will retry).
    pub fn submit(&self, job: Job) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

fn writer(mut journal: Journal, rx: Receiver<Job>, sock: &UdpSocket, stats: &Stats) {
    let mut damaged = false;
    let mut batch: Vec<Job> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let mut n = batch.first().map_or(0, |j| j.records.len());
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.records.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        records.clear();
        for job in &batch {
            records.extend_from_slice(&job.records);
        }
        let now = SystemTime::now();
        let written = if damaged {
            // The last append may have left a partial record: rewrite before appending
            // again, or everything after it would be unreadable.
            for r in &records {
                journal.live.apply(r);
            }
            journal.compact(now)
        } else {
            journal.append(&records)
        };
        match written {
            Ok(()) => {
                damaged = false;
                bump(&stats.journal_syncs);
                stats
                    .journal_records
                    .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for job in batch.drain(..) {
                    if let Some((bytes, to)) = job.reply {
                        send(sock, &bytes, to, stats);
                    }
                }
                if journal.wants_compaction()
                    && let Err(e) = journal.compact(now)
                {
                    bump(&stats.journal_errors);
                    tracing::error!(error = %e, "lease journal compaction failed");
                    damaged = true;
                }
            }
            Err(e) => {
                damaged = true;
                bump(&stats.journal_errors);
                tracing::error!(error = %e, dropped_replies = batch.len(), "lease journal write failed: ACKs withheld");
                batch.clear();
            }
        }
    }
}

/// Sends a reply from the writer thread. The socket is shared with the async loop and so
/// non-blocking: a full send buffer gets a few short retries.
pub(super) fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr, stats: &Stats) {
    for _ in 0..100 {
        match sock.send_to(bytes, to) {
            Ok(_) => {
                bump(&stats.replied);
                bump(&stats.acks);
                return;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => {
                bump(&stats.send_errors);
                tracing::warn!(%to, error = %e, "DHCP send failed");
                return;
            }
        }
    }
    bump(&stats.send_errors);
    tracing::warn!(%to, "DHCP send buffer stayed full; reply dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }
    fn bound(m: u8, i: u8, expires: u64) -> Record {
        Record::Bound {
            mac: mac(m),
            ip: ip(i),
            expires,
        }
    }

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

    #[test]
    fn a_torn_tail_is_dropped_and_bad_magic_refused() {
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&bound(1, 10, 100).encode());
        data.extend_from_slice(&bound(2, 11, 100).encode()[..7]);
        let l = parse(&data).unwrap();
        assert_eq!(l.records, vec![bound(1, 10, 100)]);
        assert_eq!(l.torn_bytes, 7);
        assert_eq!(parse(b""), Some(Loaded::default()));
        assert_eq!(parse(b"garbage!garbage!"), None);
    }

    #[test]
    fn live_set_follows_moves_releases_and_declines() {
        let mut s = LiveSet::default();
        for r in [
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
        ] {
            s.apply(&r);
        }
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
    fn open_append_reopen_keeps_every_durable_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let (mut j, live) = Journal::open(&path, t).unwrap();
        assert!(live.is_empty());
        j.append(&[bound(1, 10, 5000), bound(2, 11, 5000)]).unwrap();
        j.append(&[
            Record::Released {
                mac: mac(2),
                ip: ip(11),
            },
            bound(3, 12, 1500),
        ])
        .unwrap();
        drop(j);
        // A crash mid-write leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&bound(9, 19, 5000).encode()[..10]).unwrap();
        drop(f);

        let (_j, live) = Journal::open(&path, t).unwrap();
        assert_eq!(live, vec![bound(1, 10, 5000), bound(3, 12, 1500)]);
        // Compacted on open: exactly the live records, and expired ones go on the next open.
        assert_eq!(load(&path).unwrap().records, live);
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(2000);
        let (_j, live) = Journal::open(&path, later).unwrap();
        assert_eq!(live, vec![bound(1, 10, 5000)]);
    }

    #[test]
    fn a_foreign_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"precious data, not a journal").unwrap();
        assert!(matches!(
            Journal::open(&path, SystemTime::now()),
            Err(JournalError::NotAJournal { .. })
        ));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"precious data, not a journal"
        );
    }

    #[test]
    fn the_writer_sends_replies_after_their_records_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (j, _) = Journal::open(&path, SystemTime::UNIX_EPOCH).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stats = Arc::new(Stats::default());
        let h = j.spawn(tx, stats.clone()).unwrap();
        for n in 1..=50u8 {
            assert!(h.submit(Job {
                records: vec![bound(n, n, 9999)],
                reply: Some((vec![n], rx.local_addr().unwrap())),
            }));
        }
        for _ in 1..=50 {
            let mut b = [0u8; 4];
            let (len, _) = rx.recv_from(&mut b).unwrap();
            assert_eq!(len, 1);
            // By the time the reply arrives its record is in the file.
            let on_disk = load(&path).unwrap().records;
            assert!(on_disk.contains(&bound(b[0], b[0], 9999)), "{}", b[0]);
        }
        assert!(
            stats
                .journal_syncs
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
    }
}
