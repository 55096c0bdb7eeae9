//! The durable lease store: an append-only journal, `DATA_DIR/dhcp-leases.journal`.
//!
//! - [`record`]: the bytes, sans I/O (a record, a whole file).
//! - [`live`]: what the records add up to and when to compact, sans I/O, time passed in.
//! - [`mod@file`]: load, append with `fdatasync`, rewrite via a temporary file and a rename.
//! - [`writer`]: the thread that batches appends and releases replies once durable.
//!
//! # Format
//! An 8-byte magic, then fixed 24-byte records: kind (1 bound, 2 released, 3 probation),
//! MAC (6), IPv4 address (4), a time in Unix seconds (8, little endian: the lease's expiry or
//! the end of probation), one zero byte, and a CRC-32 (IEEE) of the first 20 bytes. Fields
//! a kind does not use are zero. A torn or corrupt tail (a crash in the middle of a write)
//! fails its CRC; loading stops there and the next compaction drops it. A corrupt stretch
//! between good records (damage, not a crash) is skipped: loading resynchronises on the
//! next offset where a good record starts ([`record::parse`]), so no later, already
//! acknowledged lease is lost; the start-up compaction then rewrites the file clean.
//!
//! # Durability (fsync policy)
//! - Offers are never written: a lost offer costs the client one retry.
//! - Every bound lease (each ACK, renewals included: the expiry moves), release and decline
//!   is one record. The records of one received batch of requests (up to 64 datagrams, one
//!   `recvmmsg`) go to a dedicated writer thread as one [`Commit`] together with the replies
//!   that depend on them; the writer appends everything queued, calls `fdatasync` once for
//!   it all (group commit), and only then sends the ACKs (`sendmmsg`).
//!   So an ACKed lease is on disk before the client hears of it, and a crash (kill -9 or
//!   power loss) can lose only leases their clients were never told about. A group is
//!   whatever queued while the previous `fdatasync` ran (at most [`MAX_BATCH`] records),
//!   so an ACK waits at most two `fdatasync`s (0.8 to 1.5 ms each on this machine's disk),
//!   and the number of `fdatasync`s per second stays bounded however high the load.
//! - If a write or `fdatasync` fails, that batch's ACKs are not sent (clients retry) and the
//!   journal is rewritten from the writer's live set before the next append.
//! - Compaction rewrites the live set (unexpired bindings and probations) to a temporary
//!   file, `fdatasync`s it, renames it over the journal and `fsync`s the directory: at
//!   start-up, and when the journal holds [`COMPACT_FACTOR`] times more records than are live
//!   (and at least [`COMPACT_MIN`]).

pub mod file;
pub mod live;
pub mod postgres;
pub mod record;
pub mod writer;

use std::path::PathBuf;

pub use file::{Journal, load};
pub use live::{COMPACT_FACTOR, COMPACT_MIN, LiveSet};
pub use record::{Loaded, MAGIC, RECORD_LEN, Record, unix_secs};
pub use writer::{Backend, Commit, Job, JournalHandle, MAX_BATCH, spawn};

pub const FILE_NAME: &str = "dhcp-leases.journal";

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
    #[error("the lease database: {0}")]
    Database(String),
}

impl From<::postgres::Error> for JournalError {
    fn from(e: ::postgres::Error) -> Self {
        // The driver's Display hides the server's message behind "db error".
        JournalError::Database(match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        })
    }
}

/// Records for the journal's tests.
#[cfg(test)]
mod fixtures {
    use std::net::Ipv4Addr;

    use stork_proto::MacAddr;

    use super::Record;

    pub fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    pub fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }
    pub fn bound(m: u8, i: u8, expires: u64) -> Record {
        Record::Bound {
            mac: mac(m),
            ip: ip(i),
            expires,
        }
    }
}
