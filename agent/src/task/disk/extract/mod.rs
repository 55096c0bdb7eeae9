//! Deploy to disk by extraction: the agent partitions the chosen disk by the request's layout,
//! makes the file systems and extracts the image's root tar onto them, then makes the result
//! bootable. Used when the request asks for a layout (a raw image's partitions are fixed) or
//! the image has no raw file.
//!
//! 1. **Disk** (as for a raw image): the requested disk or the smallest that holds the layout;
//!    old signatures wiped.
//! 2. **Partitions**: a fresh GPT by `sgdisk` ([`stork_proto::layout`]: 1 BIOS boot, 2 ESP,
//!    3 root), the kernel's view re-read and checked against the layout, the first and last
//!    MiB of the new partitions zeroed (an earlier layout's file systems may start or end
//!    there), `mkfs.vfat -F 32` and `mkfs.ext4`.
//! 3. **Image**: the root mounted at [`TARGET`]; the tar streamed from the appliance through
//!    [`Download`] (sha256 in line, `Range` resume after a cut) on its own thread
//!    ([`Prefetched`]), decompressed here and piped into `tar -x`. The sum is checked once the
//!    last byte is in: a mismatch fails with both sums, ahead of any error of tar's. After any
//!    failure here the root is unmounted and the disk wiped (partition tables, the first and
//!    last MiB of the disk and of each partition: no file system or boot loader is left).
//! 4. **Bootloader**: the ESP mounted at `boot/efi` (after the extraction: tar would try to
//!    set the mode of the mount point, which FAT refuses; an image keeps nothing there, GRUB
//!    is installed onto it next); fstab by UUID (`blkid`); a root of fixed size told to
//!    cloud-init (no growpart); grub.cfg in the shape `stork-image` writes for the raw image
//!    (root by UUID, `/vmlinuz` and `/initrd.img`, the image's own kernel command line from
//!    its `/etc/default/grub`); `grub-install` for i386-pc (core.img in the BIOS boot
//!    partition) and x86_64-efi (the removable-media path, no NVRAM: the boot entry step
//!    makes the entry), both from the image's own GRUB modules when it has them.
//! 5. **Seed**: as for a raw image, into the mounted root; then everything is unmounted.
//!
//! Every tool's failure is an error with the command and the tail of its output.
//!
//! By module: [`partitions`] (the GPT, the kernel's view of it, mkfs), [`mount`] (a mount
//! undone on drop), [`tar`] (the root tar streamed into `tar -x`), [`decompress`] (the
//! compression by its magic number, decoded into tar's stdin) and [`boot`] (fstab, grub.cfg,
//! `grub-install`), [`error`] (one error for all of them) and [`tool`] (running a tool); here,
//! the flow.
//!
//! [`Download`]: crate::deploy::download::Download
//! [`Prefetched`]: crate::deploy::prefetch::Prefetched

mod boot;
mod decompress;
mod error;
mod mount;
mod partitions;
mod tar;
mod tool;

use std::path::{Path, PathBuf};

use stork_proto::layout::MIN_ROOT_MIB;
use stork_proto::{DiskLayout, ImageFile};

use super::{WipedAfter, wipe_after_failure};
use crate::deploy::block::{self, BlockDevice};
use crate::step::{Failed, Step, at};
use crate::task::{DEV, Deployment, SYS, TARGET};
use boot::bootloader;
use mount::Mounted;
use partitions::{ESP_PART, MIB, make_file_systems, partition};
use tar::extract;

/// A compressed root tar holds about three times its size in files (Debian: 221 MiB of zstd,
/// 755 MiB of tar); four times is the least root that a disk chosen for it should offer.
const TAR_EXPANSION: u64 = 4;

/// Installs `tar` on a disk partitioned by `layout`. Returns the disk and its ESP's number
/// for the boot entry step.
pub fn to_disk(
    cx: &Deployment,
    tar: &ImageFile,
    layout: DiskLayout,
) -> Result<(PathBuf, Option<u32>), Failed> {
    let client = cx.client;
    let need = layout.min_disk_bytes(root_floor_mib(tar.size));
    let mut dev = at(Step::Disk, cx.prepare_disk(Some(need), "a layout"))?;

    let parts = at(Step::Partitions, partition(client, &mut dev, &layout))?;
    let disk_path = dev.path.clone();
    // Close the disk: while it is open with O_EXCL, mkfs and mount refuse its partitions.
    drop(dev);
    at(Step::Partitions, make_file_systems(client, &parts))?;

    let target = Path::new(TARGET);
    let root = at(
        Step::Image,
        Mounted::new(&Path::new(DEV).join(&parts.root), target, "ext4"),
    )?;
    if let Err(reason) = extract(client, tar, target) {
        // Nothing of a tar that is not the registered one (or half extracted) may boot.
        let unmounted = root.unmount();
        let error = match (unmounted, wipe_disk(&disk_path)) {
            (Ok(()), Ok(mut dev)) => {
                let name = dev_name(&disk_path);
                let old = block::partitions(Path::new(SYS), &name);
                wipe_after_failure(client, &mut dev, None, &old, reason)
            }
            (Err(wipe), _) | (Ok(()), Err(wipe)) => WipedAfter::WipeFailed { reason, wipe }.into(),
        };
        return Err(Failed {
            step: Step::Image,
            error,
        });
    }

    let esp = at(
        Step::Bootloader,
        Mounted::new(
            &Path::new(DEV).join(&parts.esp),
            &target.join("boot/efi"),
            "vfat",
        ),
    )?;
    at(
        Step::Bootloader,
        bootloader(client, &disk_path, &parts, &layout, target),
    )?;

    at(Step::Seed, cx.seed_into(target, &parts.root))?;
    at(Step::Seed, esp.unmount().and_then(|()| root.unmount()))?;
    Ok((disk_path, Some(ESP_PART)))
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

/// The least root partition a disk is chosen for when the layout leaves the root's size to
/// the disk, in MiB.
pub fn root_floor_mib(tar_size: u64) -> u64 {
    (tar_size.saturating_mul(TAR_EXPANSION).div_ceil(MIB)).max(MIN_ROOT_MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_of_a_root_that_takes_the_rest() {
        assert_eq!(root_floor_mib(0), MIN_ROOT_MIB);
        assert_eq!(root_floor_mib(300 * MIB), 1200);
        assert_eq!(root_floor_mib(u64::MAX), u64::MAX.div_ceil(MIB));
    }
}
