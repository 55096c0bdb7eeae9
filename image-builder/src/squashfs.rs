//! SquashFS images of a directory tree, reproducibly: Debian's `mksquashfs` (squashfs-tools
//! 4.5) with zstd, every timestamp clamped to `SOURCE_DATE_EPOCH`, owners, modes, hard links
//! and extended attributes kept.
//!
//! # Why mksquashfs
//!
//! Measured on this machine (2 cores) on a debootstrap minbase tree (175 MB, 6,679 entries):
//!
//! | writer | zstd level | time | size |
//! |---|---|---|---|
//! | `mksquashfs` 4.5.1 | 3 | 0.5 s | 61.5 MB |
//! | `backhand` 0.25.5 | 3 | 0.5 s | 61.9 MB |
//! | `mksquashfs` 4.5.1 | 15 | 6.7 s | 54.6 MB |
//! | `backhand` 0.25.5 | 15 | 11.5 s | 55.0 MB |
//! | `mksquashfs` 4.5.1 | 19 | 17.1 s | 54.2 MB |
//! | `backhand` 0.25.5 | 19 | 32.5 s | 54.4 MB |
//! | `mksquashfs`, 1 MiB blocks | 15 | 5.3 s | 52.1 MB |
//!
//! Size is a wash; at the levels worth shipping `mksquashfs` is 1.7-1.9x faster (it compresses
//! on every core). What decides it is what an OS root needs: backhand writes neither extended
//! attributes (file capabilities such as `security.capability` are xattrs) nor hard links
//! (it stores each link as a separate copy); `mksquashfs` keeps both, and is the reference
//! the kernel's reader is tested against. libsquashfs bindings (`squashfs-ng`) are
//! unmaintained and pull an advisory (`owning_ref`). So the writer is `mksquashfs`, and our
//! part is the reproducible options and the checks around it.
//!
//! `mksquashfs` 4.5 is reproducible by default: the same tree gives the same bytes with 1 or 2
//! processors (checked), as long as the file system time and the file times are pinned, which
//! `SOURCE_DATE_EPOCH` does (file times later than it are clamped to it).
//!
//! Block size 1 MiB (the maximum): 5% smaller and faster to build than 128 KiB; the images are
//! read from RAM, where bigger blocks cost little. `cargo xtask bench images` compares this
//! writer with plain mksquashfs at the same level on the image trees; on a busy 2-core machine
//! it measured 0.85x the time and 0.975x the size on the Debian OS tree (755 MiB: 67 s,
//! 240 MB), 0.85x and 0.986x on the ephemeral tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cmd::{self, CmdError};
use crate::manifest;

/// zstd level for SquashFS images: the ephemeral image is fetched into RAM on every
/// commissioning and deployment, so size matters more than the build's seconds (see the table).
pub const DEFAULT_LEVEL: u32 = 15;
pub const BLOCK_SIZE: &str = "1M";

#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("zstd level {level} is outside 1..=22")]
    Level { level: u32 },
    #[error("mksquashfs")]
    Tool(#[from] CmdError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub level: u32,
    /// File system time, and the latest file time (later ones are clamped).
    pub source_date_epoch: u64,
}

impl Options {
    /// How the manifest names the compression.
    pub fn describe(&self) -> String {
        format!("zstd-{} block {}", self.level, BLOCK_SIZE)
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
    pub seconds: f64,
}

/// The mksquashfs command for `source` -> `out`, exactly as `write` runs it (the benchmark runs
/// plain mksquashfs beside it).
pub fn command(
    source: &Path,
    out: &Path,
    opts: &Options,
    except: &[String],
) -> std::process::Command {
    let mut c = cmd::clean("mksquashfs");
    c.arg(source)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress"])
        .args(["-comp", "zstd", "-Xcompression-level"])
        .arg(opts.level.to_string())
        .args(["-b", BLOCK_SIZE])
        // Not an NFS export: the table only costs space.
        .arg("-no-exports")
        // Sets the file system time and clamps later file times (mksquashfs refuses it
        // together with -mkfs-time or -all-time).
        .env("SOURCE_DATE_EPOCH", opts.source_date_epoch.to_string());
    if !except.is_empty() {
        // Paths relative to `source`; `-e` takes the rest of the arguments.
        c.arg("-e").args(except);
    }
    c
}

/// Writes `out` from `source` (through a temporary file renamed into place) and hashes it.
pub fn write(source: &Path, out: &Path, opts: &Options) -> Result<Written, SquashfsError> {
    write_except(source, out, opts, &[])
}

/// [`fn@write`] without the paths `except` (relative to `source`) and what is below them.
pub fn write_except(
    source: &Path,
    out: &Path,
    opts: &Options,
    except: &[String],
) -> Result<Written, SquashfsError> {
    if !source.is_dir() {
        return Err(SquashfsError::NotADirectory {
            path: source.to_owned(),
        });
    }
    if !(1..=22).contains(&opts.level) {
        return Err(SquashfsError::Level { level: opts.level });
    }
    let started = Instant::now();
    let tmp = manifest::tmp_path(out);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SquashfsError::Io { path, source }
    };
    let result = (|| {
        cmd::run(&mut command(source, &tmp, opts, except))?;
        let (size, sha256) = manifest::sha256_file(&tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, out).map_err(io_err(out))?;
        Ok(Written {
            size,
            sha256,
            seconds: started.elapsed().as_secs_f64(),
        })
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than a stray temporary file.
        let _ = fs::remove_file(&tmp);
    }
    result
}
