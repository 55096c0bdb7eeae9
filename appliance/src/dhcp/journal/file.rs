//! The journal file: [`load`] it, append and `fdatasync` ([`Journal::append`]), rewrite it
//! whole through a temporary file and a rename ([`Journal::compact`]). The bytes come from
//! [`super::record`], the decisions from [`super::live`].

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::JournalError;
use super::live::LiveSet;
use super::record::{self, Loaded, RECORD_LEN, Record, unix_secs};

/// Reads every good record of the journal at `path`; a missing or empty file is empty.
pub fn load(path: &Path) -> Result<Loaded, JournalError> {
    let mut data = Vec::new();
    let read_err = |source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    };
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut data).map_err(read_err)?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(source) => return Err(read_err(source)),
    };
    record::parse(&data).ok_or_else(|| JournalError::NotAJournal {
        path: path.to_path_buf(),
    })
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
    write_durably(path, &record::emit(records))
}

/// Replaces the file at `path` with `bytes`, durably (temp file, fdatasync, rename,
/// directory fsync), and returns it opened for appending. The DHCPv6 lease file too.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<File, JournalError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(write_err(&tmp))?;
    f.write_all(bytes).map_err(write_err(&tmp))?;
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
        if loaded.skipped_bytes > 0 {
            // Once per open: the rewrite below leaves only good records.
            tracing::error!(path = %path.display(), bytes = loaded.skipped_bytes, stretches = loaded.skipped_runs, kept = loaded.records.len(),
                "lease journal had corrupt records between good ones (disk or file damage); skipped them and kept every good record after");
        }
        let snapshot = LiveSet::from_records(&loaded.records).snapshot(unix_secs(now));
        let file = rewrite(path, &snapshot)?;
        tracing::info!(path = %path.display(), read = loaded.records.len(), live = snapshot.len(), "lease journal loaded and compacted");
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                in_file: snapshot.len() as u64,
                live: LiveSet::from_records(&snapshot),
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

    /// Makes `records` durable by rewriting the whole journal rather than appending: after
    /// a failed append the file may end in a partial record, and anything appended behind
    /// it would be unreadable.
    pub fn rewrite_with(
        &mut self,
        records: &[Record],
        now: SystemTime,
    ) -> Result<(), JournalError> {
        for r in records {
            self.live.apply(r);
        }
        self.compact(now)
    }

    pub fn wants_compaction(&self) -> bool {
        self.live.wants_compaction(self.in_file)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::FILE_NAME;
    use super::*;

    use super::super::fixtures::{bound, ip, mac};

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
    fn a_rewrite_drops_a_partial_record_and_keeps_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let (mut j, _) = Journal::open(&path, t).unwrap();
        j.append(&[bound(1, 10, 5000)]).unwrap();
        // What a failed append may leave behind.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&bound(2, 11, 5000).encode()[..5])
            .unwrap();
        j.rewrite_with(&[bound(3, 12, 5000)], t).unwrap();
        j.append(&[bound(4, 13, 5000)]).unwrap();
        let l = load(&path).unwrap();
        assert_eq!(l.torn_bytes, 0);
        assert_eq!(
            l.records,
            vec![bound(1, 10, 5000), bound(3, 12, 5000), bound(4, 13, 5000)]
        );
    }

    #[test]
    fn a_corrupt_record_in_the_middle_loses_no_later_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let (mut j, _) = Journal::open(&path, t).unwrap();
        let acked: Vec<Record> = (1..=20).map(|n| bound(n, n + 100, 5000)).collect();
        for r in &acked {
            j.append(std::slice::from_ref(r)).unwrap();
        }
        drop(j);
        // A bit flips in the 5th record on disk.
        let mut data = std::fs::read(&path).unwrap();
        data[super::super::MAGIC.len() + 4 * RECORD_LEN + 8] ^= 0x04;
        std::fs::write(&path, &data).unwrap();
        let l = load(&path).unwrap();
        assert_eq!(
            (l.skipped_bytes, l.skipped_runs, l.torn_bytes),
            (RECORD_LEN, 1, 0)
        );

        let (_j, live) = Journal::open(&path, t).unwrap();
        let mut want = acked.clone();
        want.remove(4);
        assert_eq!(live, want, "every lease after the bad record is restored");
        // The open rewrote the file clean.
        let l = load(&path).unwrap();
        assert_eq!((l.skipped_bytes, l.torn_bytes), (0, 0));
        assert_eq!(l.records, want);
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
}
