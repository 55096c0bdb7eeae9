//! Release with erase: every disk wiped, then the machine released.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use stork_proto::{AgentEvent, StepState};

use super::{DEV, Ending, PROGRESS_EVERY, SYS};
use crate::appliance::ApplianceClient;
use crate::console::human_bytes;
use crate::deploy::block::{self, BlockDevice};
use crate::deploy::stream::Sink;
use crate::inventory;
use crate::step::{Failed, Step, at};

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
    let n = block::wipe_signatures(&mut dev, size, &parts)
        .with_context(|| format!("wiping signatures on {name}"))?;
    if !quick {
        zero_all(client, &mut dev, size)?;
    }
    dev.reread_partitions()?;
    client.step_event(
        Step::Erase,
        StepState::Done,
        format!(
            "{name}: {how} erase done in {:.1} s ({} partitions, {n} signature areas)",
            start.elapsed().as_secs_f64(),
            parts.len()
        ),
    );
    Ok(())
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
