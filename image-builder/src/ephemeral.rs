//! The agent's ephemeral root: a minimal Debian (debootstrap minbase) with the tools the
//! deploy step runs, as a reproducible SquashFS. The agent fetches it into RAM, mounts it under
//! an overlay with a tmpfs upper layer and switches root into it.
//!
//! No kernel and no modules inside: the agent's initrd kernel keeps running, so the modules it
//! needs (ext4, vfat, squashfs, overlay, ...) come from the initrd and must be loaded (or
//! carried over) before the switch. No init system and no udev either: the agent is PID 1 and
//! devtmpfs provides the device nodes; blkid and lsblk probe devices directly.

use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::image::{self, ImageError};
use crate::manifest::{
    ArtifactKind, ImageArtifact, ImageEntry, ImageInputs, ImageKind, ImageManifest,
};
use crate::progress::Progress;
use crate::rootfs::{self, RootfsError};
use crate::squashfs;

pub const NAME: &str = "ephemeral";
pub const FILE: &str = "ephemeral.squashfs";
pub const SUITE: &str = "bookworm";
pub const ARCH: &str = "amd64";
/// Bump when the recipe's handling (not its package list) changes the image.
const FORMAT: u32 = 1;

/// What the deploy step runs, on top of minbase (which already has util-linux: wipefs, blkid,
/// lsblk, blockdev, partx, blkdiscard; mount; tar; gzip), and why each package is here.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "e2fsprogs",
        "mke2fs, e2fsck, resize2fs: make the root file system, grow it after a raw image",
    ),
    ("dosfstools", "mkfs.vfat: the EFI system partition"),
    (
        "gdisk",
        "sgdisk: GPT layout; move the backup GPT to the disk's end after a raw image",
    ),
    (
        "fdisk",
        "sfdisk: scripted partitioning, growing the root partition",
    ),
    (
        "grub2-common",
        "grub-install (GRUB's setup code is built into it)",
    ),
    (
        "grub-pc-bin",
        "GRUB's i386-pc modules, for grub-install --target=i386-pc",
    ),
    (
        "grub-efi-amd64-bin",
        "GRUB's x86_64-efi modules, for grub-install --target=x86_64-efi",
    ),
    ("mdadm", "software RAID arrays of a layout"),
    ("lvm2", "LVM volume groups and logical volumes of a layout"),
    ("xfsprogs", "mkfs.xfs for a layout's XFS file systems"),
    (
        "btrfs-progs",
        "mkfs.btrfs for a layout's btrfs file systems",
    ),
    ("zstd", "decompressing .zst images and tars"),
    ("xz-utils", "decompressing .xz images"),
    (
        "smartmontools",
        "smartctl: the `smart` hardware test while commissioning",
    ),
    (
        "memtester",
        "the `memory` hardware test while commissioning",
    ),
];

/// The built-in recipe, as hashed into the manifest.
#[derive(Serialize)]
struct Recipe<'a> {
    format: u32,
    suite: &'a str,
    arch: &'a str,
    variant: &'a str,
    packages: Vec<&'a str>,
    minimize: bool,
    squashfs: String,
}

pub struct Request<'a> {
    pub cache: &'a Path,
    pub out: &'a Path,
    /// Rebuild the image even if `out` has it from the same inputs.
    pub force: bool,
    /// Rebuild the root tree too, with the newest packages.
    pub refresh: bool,
}

fn packages() -> Vec<String> {
    PACKAGES.iter().map(|(p, _)| (*p).to_owned()).collect()
}

fn squashfs_options(epoch: u64) -> squashfs::Options {
    squashfs::Options {
        level: squashfs::DEFAULT_LEVEL,
        source_date_epoch: epoch,
    }
}

fn recipe_sha256() -> String {
    let r = Recipe {
        format: FORMAT,
        suite: SUITE,
        arch: ARCH,
        variant: rootfs::VARIANT,
        packages: PACKAGES.iter().map(|(p, _)| *p).collect(),
        minimize: true,
        squashfs: squashfs_options(0).describe(),
    };
    hex::encode(Sha256::digest(serde_json::to_vec(&r).unwrap_or_default()))
}

/// The ephemeral root tree (from the cache when it is there); locked while the value lives.
pub fn tree(cache: &Path, refresh: bool, progress: &Progress) -> Result<rootfs::Tree, RootfsError> {
    let packages = packages();
    let components = ["main".to_owned()];
    let configure = |_tree: &Path, _key: &str| Ok(());
    let spec = rootfs::Spec {
        name: NAME,
        suite: SUITE,
        arch: ARCH,
        components: &components,
        packages: &packages,
        extra_kernels: &[],
        minimize: true,
        config_key: format!("ephemeral {FORMAT}"),
        configure: &configure,
    };
    rootfs::prepare(cache, &spec, refresh, progress)
}

/// Builds `OUT/ephemeral.squashfs` and its manifest entry.
pub fn build(req: &Request<'_>) -> Result<ImageEntry, ImageError> {
    let progress = Progress::new(NAME);
    let _out_lock = image::lock_out(req.out)?;
    let tree = tree(req.cache, req.refresh, &progress)?;
    let opts = squashfs_options(tree.info.source_date_epoch);
    let inputs = ImageInputs {
        builder: image::builder(FORMAT),
        recipe_sha256: recipe_sha256(),
        suite: SUITE.into(),
        variant: rootfs::VARIANT.into(),
        packages: packages(),
        mirror_sha256: tree.info.mirror_sha256.clone(),
        installed_sha256: tree.info.installed_sha256(),
        installed_count: tree.info.installed_count(),
        source_date_epoch: tree.info.source_date_epoch,
        settings: [("squashfs".to_owned(), opts.describe())].into(),
    };
    if !req.force
        && let Some(e) = image::up_to_date(req.out, NAME, &inputs, &progress)?
    {
        return Ok(e);
    }
    let w = progress.step(&format!("mksquashfs ({})", opts.describe()), || {
        squashfs::write(&tree.path, &req.out.join(FILE), &opts)
    })?;
    progress.say(&format!(
        "{FILE}: {} bytes ({:.1} MiB), sha256 {}",
        w.size,
        w.size as f64 / 1_048_576.0,
        w.sha256
    ));
    let entry = ImageEntry {
        name: NAME.into(),
        kind: ImageKind::Ephemeral,
        arch: ARCH.into(),
        artifacts: vec![
            ImageArtifact {
                name: FILE.into(),
                kind: ArtifactKind::EphemeralSquashfs,
                size: w.size,
                sha256: w.sha256,
                compression: opts.describe(),
                uncompressed_size: None,
            },
            image::package_list(req.out, NAME, &tree.info)?,
        ],
        inputs,
        deploy: None,
    };
    ImageManifest::update(req.out, entry.clone())?;
    progress.say(&format!("done in {:.1} s", progress.elapsed()));
    Ok(entry)
}
