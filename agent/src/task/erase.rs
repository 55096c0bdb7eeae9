//! Release with erase: every disk wiped and read back, then the machine released.
//!
//! - **Quick**: the partition tables and signatures (the first and last MiB of the disk and of
//!   each partition) are zeroed; the disk's first and last MiB are read back.
//! - **Full**: the disk's own secure erase where it has one (NVMe Format NVM with user data
//!   erase, [`nvme`]), else every byte zeroed (`BLKZEROOUT`); then [`READ_BACK_SAMPLES`] MiB
//!   spread over the disk, and its first and last MiB, are read back from the medium
//!   (`O_DIRECT`). A drive whose format leaves data that does not read as zeros is zeroed
//!   after all. Any non-zero byte read back fails the release with where it was.
//!
//! Each disk's events say which method erased it and what was read back.

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use stork_proto::{AgentEvent, StepState};

use super::{DEV, Ending, PROGRESS_EVERY, SYS};
use crate::appliance::ApplianceClient;
use crate::console::human_bytes;
use crate::deploy::block::{self, BlockDevice, DiskError};
use crate::deploy::nvme;
use crate::deploy::stream::Sink;
use crate::inventory;
use crate::step::{Failed, Step, at};

/// MiB read back from across a fully erased disk, besides its first and last.
pub const READ_BACK_SAMPLES: u64 = 64;

/// Wipes every disk: `quick` zeroes partition tables and signatures, else every byte.
pub fn run(client: &ApplianceClient, quick: bool) -> Result<Ending, Failed> {
    let disks = inventory::disks(Path::new(SYS));
    if disks.is_empty() {
        return Err(Failed {
            step: Step::Erase,
            error: block::DiskError::NoDisks.into(),
        });
    }
    for d in &disks {
        at(Step::Erase, erase_one(client, &d.name, quick))?;
    }
    at(Step::Erase, client.released())?;
    client.step_event(
        Step::Erase,
        StepState::Done,
        format!("{} disks erased; released", disks.len()),
    );
    Ok(Ending::PowerOff)
}

fn erase_one(client: &ApplianceClient, name: &str, quick: bool) -> Result<()> {
    let mut dev = BlockDevice::open(Path::new(DEV), name)?;
    let size = dev.size();
    let how = if quick { "quick" } else { "full" };
    client.step_event(
        Step::Erase,
        StepState::Started,
        format!("{how} erase of {name} ({})", human_bytes(size)),
    );
    let start = Instant::now();
    let parts = block::partitions(Path::new(SYS), name);
    // First, in every case: whatever happens next, nothing on the disk boots any more.
    let n = block::wipe_signatures(&mut dev, size, &parts)
        .with_context(|| format!("wiping signatures on {name}"))?;
    let (method, samples) = if quick {
        let method = Method::Signatures {
            partitions: parts.len(),
            areas: n,
        };
        (method, block::edge_samples(size))
    } else {
        let method = full_erase(client, &mut dev, name)?;
        (
            method,
            block::spread_samples(size, READ_BACK_SAMPLES, seed()),
        )
    };
    let read = match dev.check_zeros(&samples) {
        Ok(read) => read,
        // A format may leave the user data reading as ones or vendor data (the specification
        // allows it): zero it, and read back again.
        Err(e @ DiskError::NotErased { .. }) if matches!(method, Method::NvmeFormat(_)) => {
            client.step_event(
                Step::Erase,
                StepState::Progress,
                format!("{name}: after the NVMe format {e}; zeroing every byte instead"),
            );
            zero_all(client, &mut dev, size)?;
            dev.check_zeros(&samples)?
        }
        Err(e) => return Err(e.into()),
    };
    dev.reread_partitions()?;
    client.step_event(
        Step::Erase,
        StepState::Done,
        format!(
            "{name}: {how} erase done in {:.1} s by {method}; read back {} in {} samples: all zeros",
            start.elapsed().as_secs_f64(),
            human_bytes(read),
            samples.len()
        ),
    );
    Ok(())
}

/// How a disk was erased, for its event.
enum Method {
    Signatures {
        partitions: usize,
        areas: usize,
    },
    /// NVMe Format NVM, as [`nvme::secure_erase`] describes it.
    NvmeFormat(String),
    /// Every byte zeroed; why there was no secure erase.
    Zeroed {
        why_not: String,
    },
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signatures { partitions, areas } => write!(
                f,
                "zeroing partition tables and signatures ({partitions} partitions, {areas} areas)"
            ),
            Self::NvmeFormat(how) => f.write_str(how),
            Self::Zeroed { why_not } => write!(
                f,
                "zeroing every byte (BLKZEROOUT; no secure erase: {why_not})"
            ),
        }
    }
}

/// Erases every byte of `dev`: NVMe secure erase when the disk can, else zeroing.
fn full_erase(client: &ApplianceClient, dev: &mut BlockDevice, name: &str) -> Result<Method> {
    let size = dev.size();
    let why_not = match nvme::secure_erase(dev.file()) {
        Ok(nvme::Outcome::Formatted(how)) => {
            // The page cache still holds what the disk held: drop it, so the partition
            // re-read and anything after see the erased disk.
            dev.drop_caches()?;
            return Ok(Method::NvmeFormat(how));
        }
        Ok(nvme::Outcome::Unsupported(why)) => why,
        Err(e) => {
            // A refused or failed format leaves the data in place: zeroing still erases it.
            let why = format!("{:#}", anyhow::Error::from(e));
            client.step_event(
                Step::Erase,
                StepState::Progress,
                format!("{name}: NVMe secure erase failed ({why}); zeroing every byte instead"),
            );
            why
        }
    };
    zero_all(client, dev, size)?;
    Ok(Method::Zeroed { why_not })
}

/// A different read-back plan on every erase.
fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
}

/// Zeroes the whole disk with BLKZEROOUT (offloaded when the device can), in slices so that
/// progress is reported.
fn zero_all(client: &ApplianceClient, dev: &mut BlockDevice, size: u64) -> Result<()> {
    const SLICE: u64 = 1 << 30;
    let mut last = Instant::now();
    let mut off = 0;
    while off < size {
        let len = SLICE.min(size - off);
        dev.zero(off, len)
            .with_context(|| format!("zeroing {} from byte {off}", dev.path.display()))?;
        off += len;
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            client.progress(&AgentEvent {
                step: Step::Erase,
                state: StepState::Progress,
                message: format!("{} of {} zeroed", human_bytes(off), human_bytes(size)),
                progress: Some(off as f32 / size as f32),
                log_tail: None,
            });
        }
    }
    dev.sync().context("fsync")?;
    Ok(())
}
