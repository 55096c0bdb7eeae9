//! DHCPv6 leases on disk, so that a restart (or a `kill -9`) of the appliance keeps them:
//! one JSON line per change, appended and `fdatasync`ed before the reply that grants it
//! leaves. At start the file is read (a torn last line from a crash is skipped), expired
//! leases are dropped, and it is rewritten with the live ones only.
//!
//! Lines, not DHCPv4's fixed records (`dhcp::journal`): a DUID is of any length up to 130
//! bytes. The durable rewrite is the journal's own (`journal::file::write_durably`).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stork_proto::MacAddr;

use crate::dhcp::journal::{JournalError, file::write_durably};

/// The file's name in the data directory.
pub const FILE_NAME: &str = "dhcp6-leases.jsonl";

/// One change to the leases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// `duid`'s IA_NA `iaid` holds `addr` until `expires` (Unix seconds); `mac` is the
    /// client's MAC when its DUID or link-local address carries one.
    Bound {
        duid: Vec<u8>,
        iaid: u32,
        addr: Ipv6Addr,
        expires: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
    },
    Released {
        duid: Vec<u8>,
        iaid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
    },
}

/// A live lease as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub duid: Vec<u8>,
    pub iaid: u32,
    pub addr: Ipv6Addr,
    pub expires: u64,
    pub mac: Option<MacAddr>,
}

/// The lease file, open for appending.
#[derive(Debug)]
pub struct LeaseFile {
    path: PathBuf,
    file: File,
}

impl LeaseFile {
    /// Reads `path` (missing: no leases), keeps the leases live at `now`, rewrites the file
    /// with those only, and returns it open with them.
    pub fn open(path: &Path, now: u64) -> Result<(Self, Vec<Lease>), JournalError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(JournalError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let leases = replay(&text, now);
        let mut bytes = Vec::new();
        for l in &leases {
            bytes.extend(line(&Change::Bound {
                duid: l.duid.clone(),
                iaid: l.iaid,
                addr: l.addr,
                expires: l.expires,
                mac: l.mac,
            }));
        }
        let file = write_durably(path, &bytes)?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
            },
            leases,
        ))
    }

    /// Appends `changes` and makes them durable.
    pub fn append(&mut self, changes: &[Change]) -> Result<(), JournalError> {
        let bytes: Vec<u8> = changes.iter().flat_map(line).collect();
        let err = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&bytes).map_err(err)?;
        self.file.sync_data().map_err(err)
    }
}

fn line(c: &Change) -> Vec<u8> {
    // A Change always serialises: plain fields, no maps with non-string keys.
    let mut l = serde_json::to_vec(c).unwrap_or_default();
    l.push(b'\n');
    l
}

/// The leases `text` leaves live at `now`, in address order. Lines that do not parse (a
/// torn last line) are skipped.
pub fn replay(text: &str, now: u64) -> Vec<Lease> {
    type Live = HashMap<(Vec<u8>, u32), (Ipv6Addr, u64, Option<MacAddr>)>;
    let mut live: Live = HashMap::new();
    for change in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Change>(l).ok())
    {
        match change {
            Change::Bound {
                duid,
                iaid,
                addr,
                expires,
                mac,
            } => {
                // An address moves to its newest holder.
                live.retain(|_, (a, _, _)| *a != addr);
                live.insert((duid, iaid), (addr, expires, mac));
            }
            Change::Released { duid, iaid, .. } => {
                live.remove(&(duid, iaid));
            }
        }
    }
    let mut leases: Vec<Lease> = live
        .into_iter()
        .filter(|(_, (_, expires, _))| *expires > now)
        .map(|((duid, iaid), (addr, expires, mac))| Lease {
            duid,
            iaid,
            addr,
            expires,
            mac,
        })
        .collect();
    leases.sort_by_key(|l| l.addr);
    leases
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(duid: u8, addr: &str, expires: u64) -> Change {
        Change::Bound {
            duid: vec![duid],
            iaid: 1,
            addr: addr.parse().unwrap(),
            expires,
            mac: None,
        }
    }

    #[test]
    fn leases_survive_a_reopen_and_expired_or_released_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (mut f, leases) = LeaseFile::open(&path, 100).unwrap();
        assert!(leases.is_empty());
        f.append(&[bound(1, "fd77::100", 500), bound(2, "fd77::101", 150)])
            .unwrap();
        f.append(&[bound(3, "fd77::102", 500)]).unwrap();
        f.append(&[Change::Released {
            duid: vec![3],
            iaid: 1,
            mac: None,
        }])
        .unwrap();
        drop(f);
        // A torn line from a crash mid-write is skipped.
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        raw.write_all(b"{\"op\":\"bound\",\"du").unwrap();
        drop(raw);
        let (_, leases) = LeaseFile::open(&path, 200).unwrap();
        let got: Vec<(u8, String)> = leases
            .iter()
            .map(|l| (l.duid[0], l.addr.to_string()))
            .collect();
        assert_eq!(got, [(1, "fd77::100".to_string())]);
        // The rewrite kept only that one.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn an_address_belongs_to_its_newest_holder() {
        let text: String = [bound(1, "fd77::100", 500), bound(2, "fd77::100", 600)]
            .iter()
            .map(|c| String::from_utf8(line(c)).unwrap())
            .collect();
        let leases = replay(&text, 0);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].duid, vec![2]);
    }
}
