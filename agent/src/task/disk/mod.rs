//! Deploy to disk: from the raw image ([`raw`]) or, with a layout or without a raw file, by
//! extracting the root tar ([`extract`]); then the UEFI boot entry and the appliance told to
//! boot the disk from now on.
//!
//! When the image step fails after it started writing (a checksum mismatch above all: the
//! bytes on the disk are not the registered image's), the disk is wiped before the failure is
//! reported ([`wipe_after_failure`]), so the machine cannot boot a half-written or substituted
//! image.

pub mod extract;
pub mod raw;

use std::path::Path;

use anyhow::{Result, bail};
use stork_proto::StepState;

use super::{Deployment, Ending};
use crate::appliance::ApplianceClient;
use crate::console::human_bytes;
use crate::deploy::block::{self, BlockDevice, Partition};
use crate::deploy::efi;
use crate::deploy::stream::Sink;
use crate::step::{Failed, Step, at};
use stork_proto::ImageRole;

const MIB: u64 = 1 << 20;

/// Deploys to disk; returns how the agent ends (reboot into the installed OS).
pub fn run(cx: &Deployment) -> Result<Ending, Failed> {
    let (client, task) = (cx.client, cx.task);
    // A layout's partitions are not the raw image's; without a raw file the root tar is all
    // there is to install from.
    let raw = task.image.iter().find(|f| f.role == ImageRole::Raw);
    let (disk_path, esp) = match (task.layout.clone(), raw) {
        (None, Some(raw)) => {
            let map = task.image.iter().find(|f| f.role == ImageRole::DiskMap);
            raw::to_disk(cx, raw, map)?
        }
        (layout, _) => {
            let tar = at(Step::Disk, cx.image_file(ImageRole::Tar))?;
            let layout = layout.unwrap_or_default();
            extract::to_disk(cx, tar, layout)?
        }
    };

    at(Step::BootEntry, boot_entry(client, &disk_path, esp))?;

    client.step_event(
        Step::Installed,
        StepState::Started,
        "telling the appliance: boot from disk from now on".into(),
    );
    at(Step::Installed, client.installed())?;
    client.step_event(
        Step::Installed,
        StepState::Done,
        "image installed; rebooting from disk".into(),
    );
    Ok(Ending::Reboot)
}

/// A UEFI machine gets a boot entry for the installed disk: the next boot, and first in the
/// order.
fn boot_entry(client: &ApplianceClient, disk: &Path, esp: Option<u32>) -> Result<()> {
    if !efi::is_uefi() {
        client.step_event(
            Step::BootEntry,
            StepState::Done,
            "BIOS: GRUB in the image's BIOS boot partition boots it".into(),
        );
        return Ok(());
    }
    client.step_event(
        Step::BootEntry,
        StepState::Started,
        format!("UEFI: boot entry for {}", disk.display()),
    );
    let Some(part) = esp else {
        bail!("UEFI machine, but the image's GPT has no EFI system partition");
    };
    // One label for whatever Stork installed: a redeploy replaces the entry, never adds one.
    let label = "Stork: installed OS";
    let efi::Outcome { entry, order, next } = efi::add_boot_entry(disk, part, label)?;
    let next = match next {
        efi::BootNext::Set => format!("BootNext {entry}"),
        // Not fatal: the entry leads the order, and where the firmware still starts with the
        // network the appliance's boot script answers `exit` to the disk.
        efi::BootNext::Failed(why) => {
            format!("warning: BootNext not set ({why}); PXE's `exit` is the fallback")
        }
    };
    let message =
        format!("UEFI entry Boot{entry} {label:?} on partition {part}; {next}; boot order {order}");
    client.step_event(Step::BootEntry, StepState::Done, message);
    Ok(())
}

/// A failed image step's error, with what became of the disk.
#[derive(Debug, thiserror::Error)]
pub enum WipedAfter {
    #[error("{reason:#}; {wiped}")]
    Wiped {
        reason: anyhow::Error,
        wiped: String,
    },
    #[error("{reason:#}; wiping the disk after it failed too: {wipe:#}")]
    WipeFailed {
        reason: anyhow::Error,
        wipe: anyhow::Error,
    },
}

/// After the image step failed for `reason`: zeroes the first `written` bytes of `dev` (what
/// a raw image wrote, from its start), its first and last MiB (MBR, primary and backup GPT)
/// and the first and last MiB of each of `parts` (the file systems an extraction made), has
/// the kernel forget the partitions, and reads the disk's first and last MiB back. Returns
/// the error to fail the deploy with: the reason first, then what was wiped.
pub fn wipe_after_failure(
    client: &ApplianceClient,
    dev: &mut BlockDevice,
    written: Option<u64>,
    parts: &[Partition],
    reason: anyhow::Error,
) -> anyhow::Error {
    let size = dev.size();
    let wiped = (|| -> Result<String> {
        // Whole MiB: BLKZEROOUT wants sector-aligned ranges.
        let zeroed = written.map_or(0, |w| w.div_ceil(MIB).saturating_mul(MIB).min(size));
        if zeroed > 0 {
            dev.zero(0, zeroed)?;
        }
        let areas = block::wipe_signatures(dev, size, parts)?;
        dev.reread_partitions()?;
        dev.check_zeros(&block::edge_samples(size))?;
        Ok(format!(
            "the disk {} was wiped so that it cannot boot what was written: {}partition \
             tables and {areas} signature areas zeroed, its first and last MiB read back as zeros",
            dev.path.display(),
            if zeroed > 0 {
                format!("the {} written zeroed, ", human_bytes(zeroed))
            } else {
                String::new()
            },
        ))
    })();
    let error = match wiped {
        Ok(wiped) => WipedAfter::Wiped { reason, wiped },
        Err(wipe) => WipedAfter::WipeFailed { reason, wipe },
    };
    client.step_event(Step::Image, StepState::Progress, error.to_string());
    error.into()
}
