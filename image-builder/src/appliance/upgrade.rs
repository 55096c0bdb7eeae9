//! `stork-image upgrade DISK IMAGE`: a newer appliance image's system onto an appliance disk
//! that is not running (a USB stick on a laptop, a disk image of a VM that is off), keeping
//! the disk's data and configuration partitions.
//!
//! The new system (partition 4 of the image: every image carries its system in slot A) is
//! written over the slot the disk is not committed to, read back, and GRUB's environment gets
//! `stork_try` = that slot: the next boot tries it once, and `stork appliance commit` keeps it
//! once Stork runs there. A system that does not boot falls back to the committed one
//! ([`super::boot`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stork_proto::grubenv::{self, GrubEnv};

use super::layout::{ESP, NAMES, SYSTEM_A, SYSTEM_B};
use crate::cmd::{self, CmdError};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("{path}: no GPT partition table")]
    NoTable {
        path: PathBuf,
        #[source]
        source: gptman::Error,
    },
    #[error("{path} is not a Stork appliance disk: partition {number} is {found:?}, not {want}")]
    NotAppliance {
        path: PathBuf,
        number: u32,
        found: String,
        want: &'static str,
    },
    #[error(
        "the new system is {new} bytes and slot {slot} of {disk} holds {room}: the image was \
         built with a larger --system-mib"
    )]
    TooLarge {
        disk: PathBuf,
        slot: &'static str,
        new: u64,
        room: u64,
    },
    #[error("reading back slot {slot}: sha256 {got}, written {want}")]
    Verify {
        slot: &'static str,
        got: String,
        want: String,
    },
    #[error("GRUB environment on the ESP")]
    Grubenv(#[from] grubenv::GrubenvError),
    #[error(transparent)]
    Tool(#[from] CmdError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> UpgradeError + '_ {
    move |source| UpgradeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What an upgrade did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Upgraded {
    /// The slot written and to be tried at the next boot.
    pub slot: &'static str,
    /// The slot the disk was committed to (and falls back to).
    pub committed: &'static str,
    pub bytes: u64,
    pub sha256: String,
}

/// Byte offset and length of each appliance partition of `path`, checked by name.
fn partitions(path: &Path) -> Result<Vec<(u64, u64)>, UpgradeError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let gpt = gptman::GPT::find_from(&mut f).map_err(|source| UpgradeError::NoTable {
        path: path.to_owned(),
        source,
    })?;
    let sector = gpt.sector_size;
    let mut out = Vec::new();
    for (number, want) in (1u32..).zip(NAMES) {
        let p = &gpt[number];
        let found = p.partition_name.as_str().to_string();
        if !p.is_used() || found != want {
            return Err(UpgradeError::NotAppliance {
                path: path.to_owned(),
                number,
                found,
                want,
            });
        }
        out.push((
            p.starting_lba * sector,
            (p.ending_lba - p.starting_lba + 1) * sector,
        ));
    }
    Ok(out)
}

/// The FAT partition at `offset` of `disk`, as mtools names it.
fn fat(disk: &Path, offset: u64) -> String {
    format!("{}@@{offset}", disk.display())
}

/// Reads the disk's GRUB environment block from its ESP.
pub fn read_grubenv(disk: &Path) -> Result<GrubEnv, UpgradeError> {
    let (esp, _) = partitions(disk)?[ESP as usize - 1];
    let out = cmd::run(crate::disk::mtools("mtype", &fat(disk, esp), None).arg("::/grub/grubenv"))?;
    Ok(GrubEnv::parse(&out.stdout)?)
}

fn write_grubenv(disk: &Path, env: &GrubEnv, scratch: &Path) -> Result<(), UpgradeError> {
    let (esp, _) = partitions(disk)?[ESP as usize - 1];
    std::fs::write(scratch, env.to_bytes()).map_err(io_err(scratch))?;
    let result = cmd::run(
        crate::disk::mtools("mcopy", &fat(disk, esp), None)
            .arg("-o")
            .arg(scratch)
            .arg("::/grub/grubenv"),
    );
    // Best effort: a scratch file beside the disk.
    let _ = std::fs::remove_file(scratch);
    result?;
    Ok(())
}

/// Writes `image`'s system into the slot of `disk` that is not committed and sets GRUB to try
/// it once.
pub fn upgrade(disk: &Path, image: &Path) -> Result<Upgraded, UpgradeError> {
    let target = partitions(disk)?;
    let source = partitions(image)?;
    let mut env = read_grubenv(disk)?;
    let committed = match env.get(grubenv::stork::SLOT) {
        Some("b") => "b",
        _ => "a",
    };
    let (slot, number) = if committed == "a" {
        ("b", SYSTEM_B)
    } else {
        ("a", SYSTEM_A)
    };
    let (from, len) = source[SYSTEM_A as usize - 1];
    let (to, room) = target[number as usize - 1];
    if len > room {
        return Err(UpgradeError::TooLarge {
            disk: disk.to_owned(),
            slot,
            new: len,
            room,
        });
    }
    let sha256 = copy_range(image, from, disk, to, len)?;
    let mut back = File::open(disk).map_err(io_err(disk))?;
    back.seek(SeekFrom::Start(to)).map_err(io_err(disk))?;
    let got = hash(&mut back.take(len), disk)?;
    if got != sha256 {
        return Err(UpgradeError::Verify {
            slot,
            got,
            want: sha256,
        });
    }
    env.set(grubenv::stork::TRY, slot)?;
    env.unset(grubenv::stork::TRYING);
    write_grubenv(disk, &env, &disk.with_extension("grubenv"))?;
    Ok(Upgraded {
        slot,
        committed,
        bytes: len,
        sha256,
    })
}

/// Copies `len` bytes at `from` of `src` to `to` of `dst`; returns their SHA-256.
fn copy_range(
    src: &Path,
    from: u64,
    dst: &Path,
    to: u64,
    len: u64,
) -> Result<String, UpgradeError> {
    let mut r = File::open(src).map_err(io_err(src))?;
    r.seek(SeekFrom::Start(from)).map_err(io_err(src))?;
    let mut w = File::options().write(true).open(dst).map_err(io_err(dst))?;
    w.seek(SeekFrom::Start(to)).map_err(io_err(dst))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        r.read_exact(&mut buf[..want]).map_err(io_err(src))?;
        h.update(&buf[..want]);
        w.write_all(&buf[..want]).map_err(io_err(dst))?;
        left -= want as u64;
    }
    w.sync_all().map_err(io_err(dst))?;
    Ok(hex::encode(h.finalize()))
}

fn hash(r: &mut impl Read, path: &Path) -> Result<String, UpgradeError> {
    let mut h = Sha256::new();
    std::io::copy(r, &mut h).map_err(io_err(path))?;
    Ok(hex::encode(h.finalize()))
}
