//! Deploy to disk: from the raw image ([`raw`]) or, with a layout or without a raw file, by
//! extracting the root tar ([`extract`]); then the UEFI boot entry and the appliance told to
//! boot the disk from now on.

pub mod extract;
pub mod raw;

use std::path::Path;

use anyhow::{Result, bail};
use stork_proto::StepState;

use super::{Deployment, Ending};
use crate::appliance::ApplianceClient;
use crate::deploy::efi;
use crate::step::{Failed, Step, at};
use stork_proto::ImageRole;

/// Deploys to disk; returns how the agent ends (reboot into the installed OS).
pub fn run(cx: &Deployment) -> Result<Ending, Failed> {
    let (client, task) = (cx.client, cx.task);
    // A layout's partitions are not the raw image's; without a raw file the root tar is all
    // there is to install from.
    let raw = task.image.iter().find(|f| f.role == ImageRole::Raw);
    let (disk_path, esp) = match (task.layout, raw) {
        (None, Some(raw)) => raw::to_disk(cx, raw)?,
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

/// A UEFI machine gets a boot entry for the installed disk (after network boot).
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
    let message = match efi::add_boot_entry(disk, part, label)? {
        efi::Outcome::Added { entry, order } => {
            format!("UEFI entry Boot{entry} {label:?} on partition {part}; boot order {order}")
        }
        efi::Outcome::NoTool => "warning: no efibootmgr here (no ephemeral root); the firmware \
             boots the disk by its removable-media path"
            .to_string(),
    };
    client.step_event(Step::BootEntry, StepState::Done, message);
    Ok(())
}
