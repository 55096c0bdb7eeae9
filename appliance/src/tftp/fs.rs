//! The TFTP root on disk: resolves a normalised path, confines it, opens the file. Blocking
//! (the I/O layer calls it on the blocking pool).
//!
//! Confinement: the path is already free of `..` ([`super::request::normalize`]); here the
//! joined path is canonicalised, which resolves every symlink, and must stay under the
//! canonical root. The file is then opened with `O_NOFOLLOW`, so a symlink swapped in
//! for the last component after the check is refused. Swapping a directory above it is not
//! covered; only the operator writes under the root.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::request::Refused;

/// The confined root directory.
#[derive(Debug, Clone)]
pub struct Root {
    canonical: PathBuf,
    case_insensitive: bool,
}

/// A file ready to be served.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub len: u64,
    /// Where it really is (after symlinks and case folding), for the log.
    pub path: PathBuf,
}

impl Root {
    /// `root` must exist and be a directory.
    pub fn new(root: &Path, case_insensitive: bool) -> io::Result<Self> {
        let canonical = root.canonicalize()?;
        if !canonical.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "the TFTP root is not a directory",
            ));
        }
        Ok(Self {
            canonical,
            case_insensitive,
        })
    }

    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// Opens `rel`, a path from [`super::request::normalize`].
    pub fn open(&self, rel: &str) -> Result<Opened, Refused> {
        let path = match self.confine(&self.canonical.join(rel)) {
            Err(Refused::NotFound) if self.case_insensitive => {
                // Some firmware upper-cases names (`PXELINUX.0`); try a case-blind match.
                let folded = self.find_folded(rel).ok_or(Refused::NotFound)?;
                self.confine(&folded)?
            }
            other => other?,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(refusal)?;
        let meta = file.metadata().map_err(refusal)?;
        if !meta.is_file() {
            return Err(Refused::NotAFile);
        }
        Ok(Opened {
            file,
            len: meta.len(),
            path,
        })
    }

    /// Resolves symlinks and checks the result is inside the root.
    fn confine(&self, joined: &Path) -> Result<PathBuf, Refused> {
        let real = joined.canonicalize().map_err(refusal)?;
        if !real.starts_with(&self.canonical) {
            return Err(Refused::Escapes);
        }
        Ok(real)
    }

    /// `rel` with each component matched case-insensitively (ASCII) against the directory
    /// listing; the exact name wins, then the first in byte order, so the answer is stable.
    fn find_folded(&self, rel: &str) -> Option<PathBuf> {
        let mut dir = self.canonical.clone();
        for part in rel.split('/') {
            let exact = dir.join(part);
            if exact.symlink_metadata().is_ok() {
                dir = exact;
                continue;
            }
            let mut matches: Vec<_> = std::fs::read_dir(&dir)
                .ok()?
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .filter(|n| n.to_str().is_some_and(|n| n.eq_ignore_ascii_case(part)))
                .collect();
            matches.sort();
            dir = dir.join(matches.first()?);
        }
        Some(dir)
    }
}

fn refusal(e: io::Error) -> Refused {
    match e.kind() {
        io::ErrorKind::PermissionDenied => Refused::Unreadable,
        io::ErrorKind::IsADirectory => Refused::NotAFile,
        // O_NOFOLLOW on a symlink: it was swapped in after the check.
        _ if e.raw_os_error() == Some(libc::ELOOP) => Refused::Escapes,
        // Missing, a file used as a directory, a dangling link: all "not found", so the
        // answer does not tell what exists outside the root.
        _ => Refused::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("efi/boot")).unwrap();
        std::fs::write(root.join("pxelinux.0"), b"nbp").unwrap();
        std::fs::write(root.join("efi/boot/BOOTx64.efi"), b"efi").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        symlink(dir.path(), root.join("up")).unwrap();
        symlink("pxelinux.0", root.join("inside")).unwrap();
        symlink(root.join("missing"), root.join("dangling")).unwrap();
        let r = Root::new(&root, false).unwrap();
        (dir, r)
    }

    #[test]
    fn files_inside_are_served() {
        let (_d, root) = setup();
        assert_eq!(root.open("pxelinux.0").unwrap().len, 3);
        assert_eq!(root.open("efi/boot/BOOTx64.efi").unwrap().len, 3);
        // A symlink that stays inside is fine.
        let o = root.open("inside").unwrap();
        assert!(o.path.ends_with("pxelinux.0"));
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let (_d, root) = setup();
        assert_eq!(root.open("escape").unwrap_err(), Refused::Escapes);
        assert_eq!(root.open("up/secret").unwrap_err(), Refused::Escapes);
        assert_eq!(root.open("dangling").unwrap_err(), Refused::NotFound);
    }

    #[test]
    fn missing_and_directories() {
        let (_d, root) = setup();
        assert_eq!(root.open("nope").unwrap_err(), Refused::NotFound);
        assert_eq!(root.open("pxelinux.0/x").unwrap_err(), Refused::NotFound);
        assert_eq!(root.open("efi").unwrap_err(), Refused::NotAFile);
        assert_eq!(root.open("PXELINUX.0").unwrap_err(), Refused::NotFound);
    }

    #[test]
    fn case_insensitive_fallback() {
        let (_d, root) = setup();
        let root = Root::new(root.path(), true).unwrap();
        assert_eq!(root.open("PXELINUX.0").unwrap().len, 3);
        assert_eq!(root.open("EFI/BOOT/bootx64.EFI").unwrap().len, 3);
        // Folding does not open a way out.
        assert_eq!(root.open("ESCAPE").unwrap_err(), Refused::Escapes);
        assert_eq!(root.open("nope").unwrap_err(), Refused::NotFound);
    }
}
