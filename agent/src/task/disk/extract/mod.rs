//! Deploy to disk by extraction: the agent partitions the layout's disks, builds its storage
//! (RAID, LVM), makes the file systems and extracts the image's root tar onto them, then makes
//! the result bootable from every disk. Used when the request asks for a layout (a raw
//! image's partitions are fixed) or the image has no raw file.
//!
//! 1. **Disks**: the layout's disks by name, or the requested disk, or the smallest the layout
//!    fits ([`DiskLayout::pick_disks`], by [`DiskLayout::fit`]: what does not fit fails here, before
//!    anything is written); old signatures wiped; fitted again to their opened sizes.
//! 2. **Partitions**: on each disk a fresh GPT by `sgdisk` ([`stork_proto::layout`]: 1 BIOS
//!    boot, 2 ESP, 3 data), the kernel's view re-read and checked against the layout, the
//!    first and last MiB of the new partitions zeroed (an earlier layout's file systems, RAID
//!    superblocks or LVM labels may start or end there), FAT32 on every ESP; then
//!    [`stack`]: the md array, the volume group and its volumes, and the file systems.
//! 3. **Image**: the file systems mounted at [`TARGET`] (the root first); the tar streamed
//!    from the appliance through [`Download`] (sha256 in line, `Range` resume after a cut) on
//!    its own thread ([`Prefetched`]), decompressed here and piped into `tar -x`. The sum is
//!    checked once the last byte is in: a mismatch fails with both sums, ahead of any error of
//!    tar's. After any failure here everything is unmounted, the volume group and array
//!    stopped and every disk wiped (partition tables, the first and last MiB of the disk and
//!    of each partition: no file system or boot loader is left).
//! 4. **Bootloader** ([`boot`]): the first disk's ESP mounted at `boot/efi` (after the
//!    extraction: tar would try to set the mode of the mount point, which FAT refuses);
//!    fstab; a root of fixed size told to cloud-init (no growpart); grub.cfg in the shape
//!    `stork-image` writes for the raw image; `grub-install` for i386-pc on every disk and
//!    x86_64-efi on every ESP (the removable-media path, no NVRAM: the boot entry step makes
//!    the entry), from the image's own GRUB modules when it has them; with RAID the array in
//!    mdadm.conf (the image's initramfs assembles it and activates LVM: `boot::storage_boot`).
//! 5. **Seed**: as for a raw image, into the mounted root; then everything is unmounted.
//!
//! Every tool's failure is an error with the command and the tail of its output.
//!
//! By module: [`partitions`] (each disk's GPT, the kernel's view of it, the ESPs' FAT),
//! [`stack`] (RAID, LVM, file systems), [`mount`] (a mount undone on drop), [`tar`] (the
//! root tar streamed into `tar -x`), [`decompress`] (the compression by its magic number,
//! decoded into tar's stdin) and [`boot`] (fstab, grub.cfg, `grub-install`, mdadm.conf),
//! [`error`] (one error for all of them) and [`tool`] (running a tool); here, the flow.
//!
//! [`Download`]: crate::deploy::download::Download
//! [`Prefetched`]: crate::deploy::prefetch::Prefetched

mod boot;
mod decompress;
mod error;
mod mount;
mod partitions;
mod stack;
mod tar;
mod tool;

use std::path::{Path, PathBuf};

use stork_proto::layout::{DiskSize, Fs, root_floor_mib};
use stork_proto::{DiskLayout, ImageFile};

use super::{WipedAfter, wipe_after_failure};
use crate::deploy::block::{self, BlockDevice};
use crate::inventory;
use crate::step::{Failed, Step, at};
use crate::task::{DEV, Deployment, SYS, TARGET};
use boot::bootloader;
use mount::Mounted;
use partitions::{ESP_PART, make_esps, partition};
use stack::Stack;
use tar::extract;

/// Installs `tar` on the disks partitioned by `layout`. Returns the first disk and its ESP's
/// number for the boot entry step.
pub fn to_disk(
    cx: &Deployment,
    tar: &ImageFile,
    layout: DiskLayout,
) -> Result<(PathBuf, Option<u32>), Failed> {
    let client = cx.client;
    let floor = root_floor_mib(tar.size);
    let mut devs = at(Step::Disk, open_disks(cx, &layout, floor))?;
    let sizes: Vec<DiskSize> = devs
        .iter()
        .map(|d| DiskSize {
            label: dev_name(&d.path),
            bytes: d.size(),
        })
        .collect();
    // The appliance fitted the layout to the last inventory; these are the disks as they are.
    let fit = at(
        Step::Partitions,
        layout.fit(&sizes, floor).map_err(anyhow::Error::from),
    )?;

    let mut parts = Vec::with_capacity(devs.len());
    for dev in &mut devs {
        parts.push(at(Step::Partitions, partition(client, dev, &layout))?);
    }
    let disks: Vec<PathBuf> = devs.iter().map(|d| d.path.clone()).collect();
    // Close the disks: while they are open with O_EXCL, mkfs, mdadm and mount refuse their
    // partitions.
    drop(devs);
    at(Step::Partitions, load_modules(cx, &layout))?;
    at(Step::Partitions, make_esps(&parts))?;
    let data: Vec<String> = parts.iter().map(|p| p.data.clone()).collect();
    let stack = at(
        Step::Partitions,
        stack::build(client, &layout, &fit, &data, &cx.task.hostname),
    )?;
    client.step_event(
        Step::Partitions,
        stork_proto::StepState::Done,
        format!(
            "GPT on {}; {}",
            disks
                .iter()
                .map(|d| dev_name(d))
                .collect::<Vec<_>>()
                .join(", "),
            stack
                .volumes
                .iter()
                .map(|v| format!("{} on {} for {}", v.fs.name(), v.device.display(), v.mount))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let target = Path::new(TARGET);
    let mounted = mount_all(&stack, target);
    let reason = match mounted {
        // An image that cannot bring this storage up at boot is refused before GRUB goes on.
        Ok(mounts) => {
            match extract(client, tar, target).and_then(|()| boot::storage_tools(&layout, target)) {
                Ok(()) => Ok(mounts),
                Err(e) => Err((e, mounts)),
            }
        }
        Err(e) => Err((e, Vec::new())),
    };
    let mounts = match reason {
        Ok(mounts) => mounts,
        Err((reason, mounts)) => {
            // Nothing of a tar that is not the registered one (or half extracted) may boot.
            return Err(Failed {
                step: Step::Image,
                error: undo(cx, mounts, &stack, &disks, reason),
            });
        }
    };

    let esp = at(
        Step::Bootloader,
        Mounted::new(
            &Path::new(DEV).join(&parts[0].esp),
            &target.join("boot/efi"),
            "vfat",
        ),
    )?;
    at(
        Step::Bootloader,
        bootloader(client, &disks, &parts, &stack, &layout, target),
    )?;

    at(
        Step::Seed,
        cx.seed_into(target, &stack.root().device.display().to_string()),
    )?;
    at(Step::Seed, esp.unmount())?;
    for m in mounts.into_iter().rev() {
        at(Step::Seed, m.unmount())?;
    }
    Ok((disks[0].clone(), Some(ESP_PART)))
}

/// The layout's disks, each by its name, or (none named) the requested disk or the smallest
/// the layout fits; fitted to their sizes before anything is written, then opened and their
/// old signatures wiped.
fn open_disks(
    cx: &Deployment,
    layout: &DiskLayout,
    floor: u64,
) -> anyhow::Result<Vec<BlockDevice>> {
    let found = inventory::disks(Path::new(SYS));
    let (disks, _) = layout.pick_disks(&found, cx.task.disk.as_deref(), floor)?;
    disks
        .iter()
        .map(|d| cx.open_disk(Some(&d.name), None, "a layout"))
        .collect()
}

/// The kernel modules the layout needs beyond the boot list's (ext4, vfat).
pub fn modules_for(layout: &DiskLayout) -> Vec<&'static str> {
    let mut m = Vec::new();
    match layout.raid {
        Some(0) => m.push("raid0"),
        Some(1) => m.push("raid1"),
        Some(5) => m.push("raid456"),
        Some(_) => m.push("raid10"),
        None => {}
    }
    if layout.lvm.is_some() {
        m.push("dm_mod");
    }
    let mut fs: Vec<Fs> = match &layout.lvm {
        Some(lvm) => lvm.volumes.iter().map(|v| v.fs).collect(),
        None => vec![layout.root_fs()],
    };
    fs.sort_by_key(|f| f.name());
    fs.dedup();
    for f in fs {
        match f {
            Fs::Xfs => m.push("xfs"),
            Fs::Btrfs => m.push("btrfs"),
            Fs::Ext4 => {}
        }
    }
    m
}

fn load_modules(cx: &Deployment, layout: &DiskLayout) -> anyhow::Result<()> {
    let names = modules_for(layout);
    if names.is_empty() {
        return Ok(());
    }
    let s = crate::modules::load_on_demand(&names)?;
    cx.client.step_event(
        Step::Partitions,
        stork_proto::StepState::Progress,
        format!(
            "kernel modules for the layout: {} ({} loaded in {} ms)",
            names.join(", "),
            s.loaded,
            s.elapsed.as_millis()
        ),
    );
    Ok(())
}

/// Mounts the file systems on `target`, the root first.
fn mount_all(stack: &Stack, target: &Path) -> anyhow::Result<Vec<Mounted>> {
    let mut mounts = Vec::with_capacity(stack.volumes.len());
    for v in &stack.volumes {
        let at = target.join(v.mount.trim_start_matches('/'));
        mounts.push(Mounted::new(&v.device, &at, v.fs.name())?);
    }
    Ok(mounts)
}

/// After the image step failed: unmounts, stops the array and volume group and wipes every
/// disk, so that nothing written can boot. Returns the error to fail with.
fn undo(
    cx: &Deployment,
    mounts: Vec<Mounted>,
    stack: &Stack,
    disks: &[PathBuf],
    mut reason: anyhow::Error,
) -> anyhow::Error {
    for m in mounts.into_iter().rev() {
        if let Err(wipe) = m.unmount() {
            return WipedAfter::WipeFailed { reason, wipe }.into();
        }
    }
    stack.stop();
    for disk in disks {
        reason = match wipe_disk(disk) {
            Ok(mut dev) => {
                let old = block::partitions(Path::new(SYS), &dev_name(disk));
                wipe_after_failure(cx.client, &mut dev, None, &old, reason)
            }
            Err(wipe) => return WipedAfter::WipeFailed { reason, wipe }.into(),
        };
    }
    reason
}

/// The disk's kernel name, from its `/dev` path.
fn dev_name(disk: &Path) -> String {
    disk.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}

/// Opens the disk again (it was closed for mkfs and mount) to wipe it.
fn wipe_disk(disk: &Path) -> anyhow::Result<BlockDevice> {
    Ok(BlockDevice::open(Path::new(DEV), &dev_name(disk))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_loads_the_modules_of_its_raid_lvm_and_file_systems() {
        assert!(modules_for(&DiskLayout::default()).is_empty());
        let l: DiskLayout = serde_json::from_str(
            r#"{"disks": ["a", "b", "c"], "raid": 5, "lvm": {"volumes": [
                {"name": "root", "mount": "/", "fs": "xfs"},
                {"name": "b", "mount": "/b", "fs": "btrfs", "size_mib": 512},
                {"name": "c", "mount": "/c", "fs": "xfs", "size_mib": 512}]}}"#,
        )
        .unwrap();
        assert_eq!(modules_for(&l), ["raid456", "dm_mod", "btrfs", "xfs"]);
    }
}
