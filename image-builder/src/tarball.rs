//! A root tree as a zstd-compressed POSIX tar: GNU tar writes the archive (sorted, numeric
//! owners, xattrs such as file capabilities, hard links, times clamped to SOURCE_DATE_EPOCH),
//! and we compress and hash its output as it streams.
//!
//! Extract with `tar --xattrs --xattrs-include='*' --numeric-owner -xpf - -C TARGET` (through
//! `zstd -d`), or the agent's own reader: it is a plain pax archive.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::cmd::{self, CmdError};
use crate::manifest::{self, HashingWriter};

#[derive(Debug, thiserror::Error)]
pub enum TarballError {
    #[error("cannot run tar")]
    Spawn(#[source] io::Error),
    #[error(transparent)]
    Tool(#[from] CmdError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What was written: compressed size and hash, and the tar's own size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
    pub tar_size: u64,
}

/// Writes `out` (zstd at `level`) from the tree at `root`.
pub fn write(root: &Path, out: &Path, level: i32, epoch: u64) -> Result<Written, TarballError> {
    let tmp = manifest::tmp_path(out);
    let result = write_to(root, &tmp, level, epoch).and_then(|w| {
        fs::rename(&tmp, out).map_err(|source| TarballError::Io {
            path: out.to_owned(),
            source,
        })?;
        Ok(w)
    });
    if result.is_err() {
        // Best effort: the error being returned matters more than a stray temporary file.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_to(root: &Path, tmp: &Path, level: i32, epoch: u64) -> Result<Written, TarballError> {
    let io_err = |source| TarballError::Io {
        path: tmp.to_owned(),
        source,
    };
    let mut c = cmd::clean("tar");
    c.arg("--create")
        .arg("--file=-")
        .arg("--directory")
        .arg(root)
        .args([
            "--format=posix",
            // No atime/ctime or PID-dependent header names: same tree, same bytes.
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "--sort=name",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--one-file-system",
            "--clamp-mtime",
        ])
        .arg(format!("--mtime=@{epoch}"))
        .arg(".")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = cmd::describe(&c);
    let mut child = c.spawn().map_err(TarballError::Spawn)?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| TarballError::Spawn(io::Error::other("tar has no stdout")))?;
    // Drain stderr on a thread so tar never blocks on a full pipe.
    let mut stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            // Best effort: these are diagnostics for an error message.
            let _ = e.read_to_string(&mut s);
        }
        s
    });

    let file = File::create(tmp).map_err(io_err)?;
    let mut encoder =
        zstd::Encoder::new(HashingWriter::new(BufWriter::new(file)), level).map_err(io_err)?;
    encoder.include_checksum(true).map_err(io_err)?;
    let tar_size = io::copy(&mut stdout, &mut encoder).map_err(io_err)?;
    let (buffered, size, sha256) = encoder.finish().map_err(io_err)?.finish();
    let file = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)?;

    let status = child.wait().map_err(TarballError::Spawn)?;
    let stderr = errors.join().unwrap_or_default();
    if !status.success() {
        return Err(CmdError::Failed {
            command,
            status: status.to_string(),
            tail: stderr.trim_end().to_owned(),
            log: None,
        }
        .into());
    }
    Ok(Written {
        size,
        sha256,
        tar_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tree_same_bytes_and_tar_reads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), "x\n").unwrap();
        std::os::unix::fs::symlink("hostname", root.join("etc/link")).unwrap();
        let a = write(&root, &tmp.path().join("a.tar.zst"), 3, 1_700_000_000).unwrap();
        let b = write(&root, &tmp.path().join("b.tar.zst"), 3, 1_700_000_000).unwrap();
        assert_eq!(a, b);
        assert!(a.tar_size >= 3 * 512);

        let listing = std::process::Command::new("tar")
            .args(["--zstd", "-tvf"])
            .arg(tmp.path().join("a.tar.zst"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(text.contains("./etc/hostname"), "{text}");
        assert!(text.contains("./etc/link -> hostname"), "{text}");
        assert!(text.contains("2023-11-14"), "clamped mtime: {text}");
    }
}
