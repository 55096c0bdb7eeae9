//! The writer thread: takes [`Job`]s from the socket loop, makes each batch durable with one
//! `fdatasync` and only then releases the batch's replies, through [`reply::send_blocking`]
//! like any other reply.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::SystemTime;

use super::super::datagram::Send as Reply;
use super::super::{Stats, bump, reply};
use super::{Journal, JournalError, Record};

/// Records written per `fdatasync` at most.
pub const MAX_BATCH: usize = 8192;
/// Jobs that may wait for the writer; beyond that replies are dropped (clients retry).
const QUEUE: usize = 65_536;

/// Records to make durable, and the reply to send once they are.
#[derive(Debug)]
pub struct Job {
    pub records: Vec<Record>,
    /// Sent on the writer's socket (port 67's), whatever its `port` says.
    pub reply: Option<Reply>,
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

impl Journal {
    /// Starts the writer thread; replies are sent on `sock` once their records are durable.
    pub fn spawn(self, sock: UdpSocket, stats: Arc<Stats>) -> Result<JournalHandle, JournalError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("dhcp-journal".into())
            .spawn(move || run(self, rx, &sock, &stats))
            .map_err(JournalError::Spawn)?;
        Ok(JournalHandle { tx })
    }
}

fn run(mut journal: Journal, rx: Receiver<Job>, sock: &UdpSocket, stats: &Stats) {
    let mut damaged = false;
    let mut batch: Vec<Job> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut n = first.records.len();
        batch.push(first);
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
            journal.rewrite_with(&records, now)
        } else {
            journal.append(&records)
        };
        match written {
            Ok(()) => {
                damaged = false;
                bump(&stats.journal_syncs);
                stats
                    .journal_records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                // Durable: the replies may leave.
                for job in batch.drain(..) {
                    if let Some(r) = job.reply {
                        reply::send_blocking(sock, &r, stats);
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
        for n in 1..=50u8 {
            assert!(h.submit(Job {
                records: vec![bound(n)],
                reply: Some(Reply {
                    bytes: vec![n],
                    to,
                    port: Port::Dhcp,
                    kind: Some(MessageType::Ack),
                    proxy: false,
                }),
            }));
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
        assert!(s.journal_syncs >= 1);
        assert_eq!(s.journal_records, 50);
    }
}
