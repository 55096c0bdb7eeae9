//! The writer thread: takes [`Commit`]s from the socket loop (one per received batch), makes
//! everything queued durable with one `fdatasync` and only then releases the replies, with
//! [`reply::send_blocking`] like any other reply (`sendmmsg`, a batch per call).

use std::net::UdpSocket;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::time::SystemTime;

use super::super::datagram::Send as Reply;
use super::super::{Stats, bump, reply};
use super::postgres::{Conflict, PgLeases};
use super::{Journal, JournalError, Record};

/// Records written per `fdatasync` at most.
pub const MAX_BATCH: usize = 8192;
/// Commits that may wait for the writer (each of at most one received batch, so about
/// 65,000 requests); beyond that replies are dropped (clients retry).
const QUEUE: usize = 1024;

/// One request's records to make durable, and the reply to send once they are.
#[derive(Debug)]
pub struct Job {
    pub records: Vec<Record>,
    /// Sent on the writer's socket (port 67's), whatever its `port` says.
    pub reply: Option<Reply>,
}

/// The jobs of one received batch, merged: one entry in the writer's queue and one wake-up
/// of the writer thread for all of them.
#[derive(Debug, Default)]
pub struct Commit {
    pub records: Vec<Record>,
    /// Sent on the writer's socket (port 67's), in order, once every record is durable.
    pub replies: Vec<Reply>,
    /// Each reply's records (indexes into `records`): a reply whose record the lease
    /// database refused is withheld.
    pub spans: Vec<Range<usize>>,
    /// Requests merged in (a RELEASE or DECLINE has records and no reply).
    pub requests: usize,
}

impl Commit {
    pub fn add(&mut self, job: Job) {
        let start = self.records.len();
        self.records.extend_from_slice(&job.records);
        if let Some(reply) = job.reply {
            self.replies.push(reply);
            self.spans.push(start..self.records.len());
        }
        self.requests += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The socket loop's side of the writer thread. Dropping it stops the thread after it has
/// written what was queued.
#[derive(Clone)]
pub struct JournalHandle {
    tx: SyncSender<Commit>,
}

impl JournalHandle {
    /// Queues a commit; `false` when the writer is too far behind or gone (its replies are
    /// dropped, the clients will retry).
    pub fn submit(&self, commit: Commit) -> bool {
        match self.tx.try_send(commit) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Where the writer makes leases durable: the journal file, or (an HA pair) the shared
/// database.
pub enum Backend {
    File(Journal),
    Postgres(Box<PgLeases>),
}

impl Journal {
    /// Starts the writer thread; replies are sent on `sock` once their records are durable.
    pub fn spawn(self, sock: UdpSocket, stats: Arc<Stats>) -> Result<JournalHandle, JournalError> {
        spawn(Backend::File(self), sock, stats, None)
    }
}

/// Starts the writer thread on `backend`; replies are sent on `sock` once their records
/// are durable. The holders of addresses the database refused to lease are sent to
/// `learned`, for the pools to take in.
pub fn spawn(
    backend: Backend,
    sock: UdpSocket,
    stats: Arc<Stats>,
    learned: Option<Sender<Vec<Record>>>,
) -> Result<JournalHandle, JournalError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("dhcp-journal".into())
        .spawn(move || run(backend, rx, &sock, &stats, learned.as_ref()))
        .map_err(JournalError::Spawn)?;
    Ok(JournalHandle { tx })
}

fn run(
    mut backend: Backend,
    rx: Receiver<Commit>,
    sock: &UdpSocket,
    stats: &Stats,
    learned: Option<&Sender<Vec<Record>>>,
) {
    let mut damaged = false;
    let mut records: Vec<Record> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    let mut spans: Vec<Range<usize>> = Vec::new();
    // Whatever queued while the last fdatasync ran is the next group.
    while let Ok(first) = rx.recv() {
        records.clear();
        replies.clear();
        spans.clear();
        let mut next = Some(first);
        while let Some(mut c) = next.take() {
            let base = records.len();
            records.append(&mut c.records);
            replies.append(&mut c.replies);
            spans.extend(c.spans.into_iter().map(|r| r.start + base..r.end + base));
            if records.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let now = SystemTime::now();
        let written = match &mut backend {
            Backend::File(journal) if damaged => {
                journal.rewrite_with(&records, now).map(|()| Vec::new())
            }
            Backend::File(journal) => journal.append(&records).map(|()| Vec::new()),
            Backend::Postgres(db) => db.append(&records, now),
        };
        match written {
            Ok(conflicts) => {
                damaged = false;
                bump(&stats.journal_syncs);
                stats
                    .journal_records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                if !conflicts.is_empty() {
                    withhold(&mut replies, &spans, &conflicts, stats, learned);
                }
                // Durable: the replies may leave.
                reply::send_blocking(sock, &replies, stats);
                if let Backend::File(journal) = &mut backend
                    && journal.wants_compaction()
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
                tracing::error!(error = %e, dropped_replies = replies.len(), "lease journal write failed: ACKs withheld");
            }
        }
    }
}

/// Drops the replies that depend on a refused record, and tells the pools who holds
/// those addresses.
fn withhold(
    replies: &mut Vec<Reply>,
    spans: &[Range<usize>],
    conflicts: &[Conflict],
    stats: &Stats,
    learned: Option<&Sender<Vec<Record>>>,
) {
    let refused = |span: &Range<usize>| conflicts.iter().any(|c| span.contains(&c.index));
    let mut keep = spans.iter().map(|s| !refused(s));
    replies.retain(|_| keep.next().unwrap_or(true));
    stats
        .ha_conflicts
        .fetch_add(conflicts.len() as u64, Ordering::Relaxed);
    for c in conflicts {
        tracing::warn!(ip = %c.holder.ip(), holder = ?c.holder, "lease refused by the database: the address is held; ACK withheld");
    }
    if let Some(tx) = learned {
        let _ = tx.send(conflicts.iter().map(|c| c.holder).collect());
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use dhcproto::v4::MessageType;
    use stork_proto::MacAddr;

    use super::super::super::datagram::Port;
    use super::super::{FILE_NAME, load};
    use super::*;

    fn bound(n: u8) -> Record {
        Record::Bound {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, n]),
            ip: Ipv4Addr::new(10, 0, 0, n),
            expires: 9999,
        }
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
        let to: SocketAddr = rx.local_addr().unwrap();
        // Two received batches: 20 requests, then 30.
        for ns in [1..=20u8, 21..=50] {
            let mut commit = Commit::default();
            for n in ns {
                commit.add(Job {
                    records: vec![bound(n)],
                    reply: Some(Reply {
                        bytes: vec![n],
                        to,
                        port: Port::Dhcp,
                        kind: Some(MessageType::Ack),
                        proxy: false,
                    }),
                });
            }
            assert!(h.submit(commit));
        }
        for _ in 1..=50 {
            let mut b = [0u8; 4];
            let (len, _) = rx.recv_from(&mut b).unwrap();
            assert_eq!(len, 1);
            // By the time the reply arrives its record is in the file.
            let on_disk = load(&path).unwrap().records;
            assert!(on_disk.contains(&bound(b[0])), "{}", b[0]);
        }
        // Counted as the socket loop counts an ACK. The counters are bumped right after
        // each send, so the last one may still be on its way.
        let s = (0..1000)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(1));
                stats.snapshot()
            })
            .find(|s| s.acks == 50)
            .unwrap();
        assert_eq!((s.replied, s.acks, s.offers, s.send_errors), (50, 50, 0, 0));
        // One fdatasync per queued group: at most one per received batch.
        assert!((1..=2).contains(&s.journal_syncs), "{s:?}");
        assert_eq!(s.journal_records, 50);
    }
}
