//! The initrd's file tree and its `newc` cpio encoding, made reproducible: entries sorted by
//! path (so every directory precedes its contents), inode numbers by position, owner root,
//! one mtime for all.
//!
//! Encoding uses `cpio::newc::Builder`, which sets mode and rdev freely, so device nodes need
//! no hand-written headers and no root to create.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use cpio::newc::{self, ModeFileType};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive path {path:?} is empty or not a plain absolute or relative path")]
    BadPath { path: String },
    #[error("{path} is added both as a directory and as something else")]
    Conflict { path: String },
    #[error("{path}: {size} bytes is too large for a newc archive (4 GiB limit)")]
    TooLarge { path: String, size: u64 },
    #[error("{path}: the file changed size while it was being archived")]
    Changed { path: PathBuf },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive")]
    Write(#[source] io::Error),
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Disk(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { perm: u32 },
    File { perm: u32, source: Source },
    CharDev { perm: u32, major: u32, minor: u32 },
}

/// Paths are kept without a leading `/`, as the kernel's own `gen_init_cpio` writes them.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Node>,
}

fn clean(path: &str) -> Result<String, ArchiveError> {
    let bad = || ArchiveError::BadPath {
        path: path.to_owned(),
    };
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(bad)?),
            _ => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory and any missing parents, all with `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), ArchiveError> {
        let path = clean(path)?;
        self.parents(&path, perm)?;
        self.insert(path, Node::Dir { perm })
    }

    /// Adds a regular file; missing parents are created with mode 0755.
    pub fn file(&mut self, path: &str, perm: u32, source: Source) -> Result<(), ArchiveError> {
        let path = clean(path)?;
        self.parents(&path, 0o755)?;
        self.insert(path, Node::File { perm, source })
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), ArchiveError> {
        let path = clean(path)?;
        self.parents(&path, 0o755)?;
        self.insert(path, Node::CharDev { perm, major, minor })
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.entries.iter().map(|(p, n)| (p.as_str(), n))
    }

    fn parents(&mut self, path: &str, perm: u32) -> Result<(), ArchiveError> {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let parent = &path[..at + i];
            match self.entries.get(parent) {
                None => {
                    self.entries.insert(parent.to_owned(), Node::Dir { perm });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(ArchiveError::Conflict {
                        path: parent.to_owned(),
                    });
                }
            }
            at += i + 1;
        }
        Ok(())
    }

    /// A second `dir` for an existing directory keeps the first; anything else twice replaces
    /// it, unless the kinds clash.
    fn insert(&mut self, path: String, node: Node) -> Result<(), ArchiveError> {
        match (self.entries.get(&path), &node) {
            (Some(Node::Dir { .. }), Node::Dir { .. }) => return Ok(()),
            (Some(Node::Dir { .. }), _) | (Some(_), Node::Dir { .. }) => {
                return Err(ArchiveError::Conflict { path });
            }
            _ => {}
        }
        self.entries.insert(path, node);
        Ok(())
    }

    /// Writes the whole archive, trailer included, and returns the writer.
    ///
    /// Sorting by the path string keeps each parent before its children because a parent is a
    /// prefix of every child path.
    pub fn write_newc<W: Write>(&self, mut out: W, mtime: u32) -> Result<W, ArchiveError> {
        for (ino, (path, node)) in (1u32..).zip(self.entries.iter()) {
            let header = newc::Builder::new(path).ino(ino).uid(0).gid(0).mtime(mtime);
            out = match node {
                Node::Dir { perm } => {
                    let h = header
                        .mode(perm & 0o7777)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2);
                    finish(h.write(out, 0))?
                }
                Node::CharDev { perm, major, minor } => {
                    let h = header
                        .mode(perm & 0o7777)
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(*major)
                        .rdev_minor(*minor);
                    finish(h.write(out, 0))?
                }
                Node::File { perm, source } => {
                    let h = header
                        .mode(perm & 0o7777)
                        .set_mode_file_type(ModeFileType::Regular);
                    write_file(h, path, source, out)?
                }
            };
        }
        newc::trailer(out).map_err(ArchiveError::Write)
    }
}

fn finish<W: Write>(w: newc::Writer<W>) -> Result<W, ArchiveError> {
    w.finish().map_err(ArchiveError::Write)
}

fn write_file<W: Write>(
    header: newc::Builder,
    path: &str,
    source: &Source,
    out: W,
) -> Result<W, ArchiveError> {
    let too_large = |size| ArchiveError::TooLarge {
        path: path.to_owned(),
        size,
    };
    match source {
        Source::Bytes(bytes) => {
            let size = u32::try_from(bytes.len()).map_err(|_| too_large(bytes.len() as u64))?;
            let mut w = header.write(out, size);
            w.write_all(bytes).map_err(ArchiveError::Write)?;
            finish(w)
        }
        Source::Disk(disk) => {
            let read_err = |source| ArchiveError::Read {
                path: disk.clone(),
                source,
            };
            let file = File::open(disk).map_err(read_err)?;
            let len = file.metadata().map_err(read_err)?.len();
            let size = u32::try_from(len).map_err(|_| too_large(len))?;
            let mut w = header.write(out, size);
            // Copy by hand so a read error is told apart from a write error.
            let mut reader = file.take(len);
            let mut buf = vec![0u8; 64 * 1024];
            let mut copied = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(read_err)?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n]).map_err(ArchiveError::Write)?;
                copied += n as u64;
            }
            // The cpio writer silently drops padding for a short entry; refuse one instead.
            if copied != len {
                return Err(ArchiveError::Changed { path: disk.clone() });
            }
            finish(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.file("/init", 0o755, Source::Bytes(b"#!agent".to_vec()))
            .unwrap();
        t.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        t.dir("/etc/stork", 0o755).unwrap();
        t.file("etc/stork/x", 0o644, Source::Bytes(b"12345".to_vec()))
            .unwrap();
        t
    }

    #[test]
    fn paths_are_cleaned_and_parents_added() {
        let names: Vec<_> = sample().entries().map(|(p, _)| p.to_owned()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/stork",
                "etc/stork/x",
                "init"
            ]
        );
        let mut t = Tree::new();
        for bad in ["", "/", "../x", "a/../b", "./"] {
            assert!(t.dir(bad, 0o755).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_may_not_clash() {
        let mut t = sample();
        assert!(matches!(
            t.dir("init", 0o755),
            Err(ArchiveError::Conflict { .. })
        ));
        assert!(matches!(
            t.file("init/x", 0o644, Source::Bytes(vec![])),
            Err(ArchiveError::Conflict { .. })
        ));
        assert!(matches!(
            t.file("etc", 0o644, Source::Bytes(vec![])),
            Err(ArchiveError::Conflict { .. })
        ));
        t.dir("etc", 0o700).unwrap();
    }

    #[test]
    fn encodes_modes_devices_and_data() {
        let bytes = sample().write_newc(Vec::new(), 1234).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let mut rest = bytes.as_slice();
        let mut seen = Vec::new();
        loop {
            let mut r = newc::Reader::new(rest).unwrap();
            let e = r.entry().clone();
            if e.is_trailer() {
                break;
            }
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            assert_eq!((e.uid(), e.gid(), e.mtime()), (0, 0, 1234));
            seen.push((
                e.name().to_owned(),
                e.ino(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
                data,
            ));
            rest = r.finish().unwrap();
        }
        assert_eq!(seen[0], ("dev".into(), 1, 0o040755, 0, 0, vec![]));
        assert_eq!(seen[1], ("dev/console".into(), 2, 0o020600, 5, 1, vec![]));
        assert_eq!(
            seen[4],
            ("etc/stork/x".into(), 5, 0o100644, 0, 0, b"12345".to_vec())
        );
        assert_eq!(
            seen[5],
            ("init".into(), 6, 0o100755, 0, 0, b"#!agent".to_vec())
        );
    }

    #[test]
    fn reads_files_from_disk() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b"from disk").unwrap();
        let mut t = Tree::new();
        t.file("a", 0o644, Source::Disk(tmp.path().to_owned()))
            .unwrap();
        let bytes = t.write_newc(Vec::new(), 0).unwrap();
        let mut r = newc::Reader::new(bytes.as_slice()).unwrap();
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"from disk");

        let mut t = Tree::new();
        t.file("a", 0o644, Source::Disk("/nonexistent/stork".into()))
            .unwrap();
        assert!(matches!(
            t.write_newc(Vec::new(), 0),
            Err(ArchiveError::Read { .. })
        ));
    }
}
