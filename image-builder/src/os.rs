//! Deployable OS images from a recipe: debootstrap minbase, the recipe's packages installed in
//! a chroot (debootstrap cannot `--include` packages behind virtual dependencies, such as
//! cloud-init's), configured for first boot by cloud-init, then written three ways:
//!
//! - `<name>.root.squashfs`: deploy in memory (overlay on tmpfs) or install by copying;
//! - `<name>.root.tar.zst`: install by extracting onto a file system the agent made;
//! - `<name>.raw.zst`: a GPT disk image ([`crate::disk`]) that boots by itself under BIOS and
//!   UEFI; streamed to a disk, then its root partition and file system are grown. Its zstd
//!   frames are laid out by its block map, `<name>.raw.map.json` ([`crate::blockmap`]), with
//!   which the agent zeroes the gaps instead of decoding them and decodes on every core.
//!
//! # What the image is configured to do
//!
//! - cloud-init reads `datasource_list: [ NoCloud, None ]` only: a deployed machine never
//!   probes a network metadata service. The seed is a `CIDATA` volume or
//!   `/var/lib/cloud/seed/nocloud/`; without one there is nothing to apply. The default user
//!   (recipe `[user]`) gets the seed's SSH keys; host keys are generated at first boot (none
//!   are in the image) and the root partition is grown by cloud-init's growpart.
//! - systemd-networkd runs DHCP on every Ethernet interface cloud-init's own network config
//!   does not name; systemd-resolved serves DNS. `systemd-networkd-wait-online` waits for any
//!   one interface, and is skipped when the machine has no PCI network controller at all (so a
//!   NIC-less boot is not held up two minutes).
//! - Serial console: the recipe's kernel command line (ttyS0) in grub.cfg and
//!   `/etc/default/grub`; GRUB itself talks on both console and serial.
//! - `/etc/machine-id` empty (first boot writes one), no SSH host keys, no apt lists.
//! - The root SquashFS and tar have an fstab without entries (in memory there is nothing to
//!   mount; an install by copy writes its own). The raw image's fstab mounts the root and the
//!   ESP by UUID.

use std::fs;
use std::path::{Path, PathBuf};

use crate::blockmap;
use crate::disk::{self, Bootloader, Ids, Layout};
use crate::grub;
use crate::image::{self, ImageError, io_err};
use crate::manifest::{
    ArtifactKind, DeployInfo, ImageArtifact, ImageEntry, ImageInputs, ImageKernel, ImageKind,
    ImageManifest,
};
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::rootfs::{self, RootfsError, write_file};
use crate::squashfs;
use crate::tarball;

/// Bump when the tree's configuration changes (part of the tree's cache key).
const CONFIG_FORMAT: u32 = 1;
/// Bump when the image steps change bytes (part of the manifest inputs).
const IMAGE_FORMAT: u32 = 6;
/// zstd levels. The root SquashFS is fetched into RAM for deploy in memory: size first. The tar
/// streams to a disk once per deploy. Measured on the Debian tree (755 MiB of tar, one core of
/// a busy machine): level 3 gives 254 MB in 8 s, 6 238 MB in 15 s, 9 223 MB in 19 s, 19 200 MB
/// in 674 s. The raw image is 3 GiB, mostly zeros, which level 6 crawls through (3.4 s per GiB)
/// and level 3 does not (0.7 s): level 3 there, 6% larger than level 6.
pub const SQUASHFS_LEVEL: u32 = squashfs::DEFAULT_LEVEL;
pub const TAR_LEVEL: i32 = 6;
pub const RAW_LEVEL: i32 = 3;

/// Where grub-install itself leaves the images it makes; the raw image's BIOS boot partition
/// and ESP get these, and an agent installing by copy can reuse them the same way.
pub const CORE_IMG: &str = "boot/grub/i386-pc/core.img";
pub const CORE_EFI: &str = "boot/grub/x86_64-efi/core.efi";
/// Debian's signed loaders, where `shim-signed` and `grub-efi-amd64-signed` install them.
pub const SIGNED_SHIM: &str = "usr/lib/shim/shimx64.efi.signed";
pub const SIGNED_GRUB: &str = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";
const BOOT_IMG: &str = "usr/lib/grub/i386-pc/boot.img";

pub struct Request<'a> {
    pub recipe: &'a Recipe,
    pub cache: &'a Path,
    pub out: &'a Path,
    /// Rebuild the images even if `out` has them from the same inputs.
    pub force: bool,
    /// Rebuild the root tree too, with the newest packages.
    pub refresh: bool,
}

/// Output file names for image `name`.
pub fn files(name: &str) -> [String; 3] {
    [
        format!("{name}.root.squashfs"),
        format!("{name}.root.tar.zst"),
        format!("{name}.raw.zst"),
    ]
}

/// The recipe's root tree (from the cache when it is there); locked while the value lives.
pub fn tree(
    recipe: &Recipe,
    cache: &Path,
    refresh: bool,
    progress: &Progress,
) -> Result<rootfs::Tree, RootfsError> {
    let configure = |tree: &Path, key: &str| configure(recipe, tree, key);
    let spec = rootfs::Spec {
        name: &recipe.name,
        suite: &recipe.suite,
        arch: &recipe.arch,
        components: &recipe.components,
        packages: &recipe.packages,
        extra_kernels: &recipe.kernels,
        minimize: false,
        config_key: format!("os {CONFIG_FORMAT} {}", recipe.sha256()),
        configure: &configure,
    };
    rootfs::prepare(cache, &spec, refresh, progress)
}

/// cloud-init: the only data source is the NoCloud seed; the recipe's default user.
fn cloud_cfg(recipe: &Recipe) -> String {
    let u = &recipe.user;
    let groups = u.groups.join(", ");
    let sudo = if u.sudo {
        "\n    sudo: [\"ALL=(ALL) NOPASSWD:ALL\"]"
    } else {
        ""
    };
    format!(
        "# Written by stork-image. Stork writes a NoCloud seed at deploy; nothing else is asked.
datasource_list: [ NoCloud, None ]
ssh_pwauth: false
# The image has no locales package; C.UTF-8 is built into glibc (the default, en_US.UTF-8,
# would fail cloud-init's locale module).
locale: C.UTF-8
system_info:
  default_user:
    name: {}
    gecos: \"{}\"
    lock_passwd: true
    groups: [{groups}]
    shell: {}{sudo}
",
        u.name, u.gecos, u.shell
    )
}

const NETWORK: &str = "\
# Written by stork-image: DHCP on every Ethernet interface. cloud-init's own files
# (10-cloud-init-*.network) sort first and win for the interfaces they name.
[Match]
Type=ether

[Network]
DHCP=yes
";

const WAIT_ONLINE: &str = "\
# Written by stork-image: one interface online is enough, and a machine without any PCI
# network controller has nothing to wait for (the device is enumerated before any driver
# loads, so this cannot race with udev).
[Service]
ExecCondition=/bin/sh -c 'grep -qs ^0x02 /sys/bus/pci/devices/*/class'
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=90
";

const FSTAB_TREE: &str = "\
# Written by stork-image. No mounts here: deployed in memory the root is an overlay, and an
# install by copy writes its own fstab (by UUID).
";

fn fstab_raw(ids: &Ids) -> String {
    format!(
        "# Written by stork-image for the raw disk image.
UUID={} / ext4 errors=remount-ro 0 1
UUID={} /boot/efi vfat umask=0077,nofail 0 2
",
        ids.root_uuid,
        ids.esp_text()
    )
}

/// Runs in the tree after the packages are installed (see the module doc).
fn configure(recipe: &Recipe, tree: &Path, key: &str) -> Result<(), RootfsError> {
    let ids = Ids::derive(key);
    write_file(
        &tree.join("etc/cloud/cloud.cfg.d/99_stork.cfg"),
        &cloud_cfg(recipe),
        0o644,
    )?;
    write_file(
        &tree.join("etc/systemd/network/90-stork-dhcp.network"),
        NETWORK,
        0o644,
    )?;
    write_file(
        &tree.join("etc/systemd/system/systemd-networkd-wait-online.service.d/stork.conf"),
        WAIT_ONLINE,
        0o644,
    )?;
    crate::cmd::run(rootfs::chroot(tree, None).args([
        "systemctl",
        "enable",
        "systemd-networkd.service",
        "systemd-resolved.service",
    ]))?;
    write_file(&tree.join("etc/fstab"), FSTAB_TREE, 0o644)?;
    let efi = tree.join("boot/efi");
    fs::create_dir_all(&efi).map_err(rootfs::io_err(&efi))?;

    // Debian's linux-base keeps /vmlinuz and /initrd.img pointing at the newest kernel;
    // grub.cfg boots those.
    for link in ["vmlinuz", "initrd.img"] {
        let p = tree.join(link);
        if fs::symlink_metadata(&p).is_err() {
            return Err(RootfsError::Io {
                path: p,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the kernel package made no symlink (is linux-image-* in the recipe?)",
                ),
            });
        }
    }

    write_file(
        &tree.join("etc/default/grub"),
        &grub::default_grub(&recipe.kernel_cmdline),
        0o644,
    )?;
    write_file(
        &tree.join("boot/grub/grub.cfg"),
        &grub::grub_cfg(
            &format!("Debian GNU/Linux ({})", recipe.name),
            &ids.root_uuid,
            &recipe.kernel_cmdline,
        ),
        0o644,
    )?;
    // Modules beside grub.cfg, where the images' prefix points, as grub-install copies them.
    for platform in ["i386-pc", "x86_64-efi"] {
        let src = tree.join("usr/lib/grub").join(platform);
        let dst = tree.join("boot/grub").join(platform);
        fs::create_dir_all(&dst).map_err(rootfs::io_err(&dst))?;
        for name in rootfs::list_dir(&src)? {
            if name.ends_with(".mod") || name.ends_with(".lst") || name == "boot.img" {
                let (s, d) = (src.join(&name), dst.join(&name));
                fs::copy(&s, &d).map_err(rootfs::io_err(&s))?;
            }
        }
    }
    grub::make_images(
        tree,
        &grub::early_config(&ids.root_uuid),
        "/boot/grub",
        grub::EARLY_MODULES,
        CORE_IMG,
        CORE_EFI,
    )?;
    Ok(())
}

/// Builds the three images of `req.recipe` and their manifest entry.
pub fn build(req: &Request<'_>) -> Result<ImageEntry, ImageError> {
    let recipe = req.recipe;
    let name = recipe.name.as_str();
    let progress = Progress::new(&format!("os {name}"));
    let _out_lock = image::lock_out(req.out)?;
    let tree = tree(recipe, req.cache, req.refresh, &progress)?;
    let kver = tree.info.default_kernel()?.to_owned();
    // The default first, then the recipe's extra kernels (prepare installed one each).
    let kernels = std::iter::once(ImageKernel {
        name: recipe.default_kernel.clone(),
        version: kver.clone(),
    })
    .chain(
        recipe
            .kernels
            .iter()
            .zip(&tree.info.extra_kernel_versions)
            .map(|(k, v)| ImageKernel {
                name: k.name.clone(),
                version: v.clone(),
            }),
    )
    .collect();
    let epoch = tree.info.source_date_epoch;
    let ids = Ids::derive(&tree.info.key);
    let layout = Layout::new(recipe.disk.size_mib, recipe.disk.esp_mib);
    let sq = squashfs::Options {
        level: SQUASHFS_LEVEL,
        source_date_epoch: epoch,
    };
    // The root SquashFS is what a deploy into memory runs, under the agent's kernel (the
    // image's default): the kernels, initrds and GRUB under /boot and the other kernels'
    // modules would only take RAM there.
    let sq_except: Vec<String> = std::iter::once("boot".to_owned())
        .chain(
            tree.info
                .extra_kernel_versions
                .iter()
                .map(|v| format!("usr/lib/modules/{v}")),
        )
        .collect();
    let inputs = ImageInputs {
        builder: image::builder(IMAGE_FORMAT),
        recipe_sha256: recipe.sha256(),
        suite: recipe.suite.clone(),
        variant: rootfs::VARIANT.into(),
        packages: recipe.packages.clone(),
        mirror_sha256: tree.info.mirror_sha256.clone(),
        installed_sha256: tree.info.installed_sha256(),
        installed_count: tree.info.installed_count(),
        source_date_epoch: epoch,
        settings: [
            (
                "squashfs".to_owned(),
                format!("{} without {}", sq.describe(), sq_except.join(", ")),
            ),
            ("tar".to_owned(), format!("zstd-{TAR_LEVEL}")),
            ("raw".to_owned(), raw_compression()),
            (
                "disk".to_owned(),
                format!(
                    "{} MiB, ESP {} MiB",
                    recipe.disk.size_mib, recipe.disk.esp_mib
                ),
            ),
        ]
        .into(),
    };
    if !req.force
        && let Some(e) = image::up_to_date(req.out, name, &inputs, &progress)?
    {
        return Ok(e);
    }
    let [sq_file, tar_file, raw_file] = files(name);

    let w = progress.step(&format!("mksquashfs ({})", sq.describe()), || {
        squashfs::write_except(&tree.path, &req.out.join(&sq_file), &sq, &sq_except)
    })?;
    progress.say(&format!("{sq_file}: {} MiB", w.size >> 20));
    let mut artifacts = vec![ImageArtifact {
        name: sq_file,
        kind: ArtifactKind::RootSquashfs,
        size: w.size,
        sha256: w.sha256,
        compression: sq.describe(),
        uncompressed_size: None,
    }];

    let t = progress.step(&format!("tar | zstd -{TAR_LEVEL}"), || {
        tarball::write(&tree.path, &req.out.join(&tar_file), TAR_LEVEL, epoch)
    })?;
    progress.say(&format!(
        "{tar_file}: {} MiB ({} MiB of tar)",
        t.size >> 20,
        t.tar_size >> 20
    ));
    artifacts.push(ImageArtifact {
        name: tar_file,
        kind: ArtifactKind::RootTarZst,
        size: t.size,
        sha256: t.sha256,
        compression: format!("zstd-{TAR_LEVEL}"),
        uncompressed_size: Some(t.tar_size),
    });

    let raw = req.out.join(format!(".{name}.raw"));
    let table = progress.step(
        &format!(
            "raw GPT image ({} MiB: BIOS boot, ESP, ext4 root {})",
            recipe.disk.size_mib, ids.root_uuid
        ),
        || build_raw(&tree.path, &raw, &layout, &ids, epoch),
    );
    let table = match table {
        Ok(t) => t,
        Err(e) => {
            // Best effort: the error being returned matters more than a stray temporary file.
            let _ = fs::remove_file(&raw);
            return Err(e);
        }
    };
    let map_file = blockmap::map_name(&raw_file);
    // What a deploy overwrites even where it is zero (the map's gaps are left as the disk
    // has them): the signature areas and the root's journal.
    let keep = match disk::journal_areas(&raw, layout.root.0 * crate::gpt::SECTOR) {
        Ok(mut keep) => {
            keep.extend(layout.signature_areas());
            keep
        }
        Err(e) => {
            // Best effort: the error being returned matters more than a stray temporary file.
            let _ = fs::remove_file(&raw);
            return Err(e.into());
        }
    };
    let compressed = progress.step(
        &format!("zstd -{RAW_LEVEL} of the raw image's data, its block map"),
        || {
            blockmap::compress_mapped(
                &raw,
                &req.out.join(&raw_file),
                &req.out.join(&map_file),
                RAW_LEVEL,
                &keep,
            )
        },
    );
    // Best effort: a leftover temporary raw image only costs space until the next build.
    let _ = fs::remove_file(&raw);
    let mapped = compressed.map_err(ImageError::BlockMap)?;
    progress.say(&format!(
        "{raw_file}: {} MiB ({} MiB logical, {} MiB of data in {} ranges)",
        mapped.file_size >> 20,
        layout.bytes() >> 20,
        mapped.map.data_bytes() >> 20,
        mapped.map.ranges.len()
    ));
    artifacts.push(ImageArtifact {
        name: raw_file,
        kind: ArtifactKind::RawDiskZst,
        size: mapped.file_size,
        sha256: mapped.file_sha256,
        compression: raw_compression(),
        uncompressed_size: Some(layout.bytes()),
    });
    artifacts.push(ImageArtifact {
        name: map_file,
        kind: ArtifactKind::RawDiskMap,
        size: mapped.map_size,
        sha256: mapped.map_sha256,
        compression: "none".into(),
        uncompressed_size: None,
    });
    artifacts.push(image::package_list(req.out, name, &tree.info)?);

    let entry = ImageEntry {
        name: name.to_owned(),
        kind: ImageKind::Os,
        arch: recipe.arch.clone(),
        artifacts,
        inputs,
        deploy: Some(DeployInfo {
            kernel: format!("/boot/vmlinuz-{kver}"),
            initrd: format!("/boot/initrd.img-{kver}"),
            kernel_version: kver,
            kernels,
            kernel_cmdline: recipe.kernel_cmdline.clone(),
            root_fs_uuid: ids.root_uuid.clone(),
            esp_fs_id: ids.esp_text(),
            partitions: disk::partition_info(&table),
            root_partition: disk::ROOT_PARTITION,
            default_user: recipe.user.name.clone(),
        }),
    };
    ImageManifest::update(req.out, entry.clone())?;
    progress.say(&format!("done in {:.1} s", progress.elapsed()));
    Ok(entry)
}

/// How the raw image is compressed, for the manifest.
fn raw_compression() -> String {
    format!(
        "zstd-{RAW_LEVEL} frames of {} MiB, block map of {} MiB blocks",
        blockmap::FRAME >> 20,
        blockmap::BLOCK >> 20
    )
}

/// The raw image, with the raw image's fstab.
fn build_raw(
    tree: &Path,
    raw: &Path,
    layout: &Layout,
    ids: &Ids,
    epoch: u64,
) -> Result<crate::gpt::Gpt, ImageError> {
    let read = |rel: &str| -> Result<Vec<u8>, ImageError> {
        let p: PathBuf = tree.join(rel);
        fs::read(&p).map_err(io_err(&p))
    };
    let boot_img = read(BOOT_IMG)?;
    let core_img = read(CORE_IMG)?;
    // The recipe installed Debian's signed shim and GRUB: the ESP boots through them.
    let (shim, grub) = (tree.join(SIGNED_SHIM), tree.join(SIGNED_GRUB));
    let signed = (shim.is_file() && grub.is_file()).then(|| disk::Signed {
        shim: &shim,
        grub: &grub,
        config: format!(
            "{}configfile $prefix/grub.cfg\n",
            grub::early_config(&ids.root_uuid)
        ),
    });
    Ok(disk::build_raw(
        raw,
        tree,
        layout,
        ids,
        &Bootloader {
            boot_img: &boot_img,
            core_img: &core_img,
            efi_image: &tree.join(CORE_EFI),
            signed,
        },
        &fstab_raw(ids),
        epoch,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_config_has_only_nocloud_and_the_user() {
        let r = Recipe::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/recipes/debian-bookworm.toml"
        )))
        .unwrap();
        let c = cloud_cfg(&r);
        assert!(c.contains("datasource_list: [ NoCloud, None ]\n"), "{c}");
        assert!(c.contains("    name: debian\n"), "{c}");
        assert!(c.contains("groups: [adm, sudo]"), "{c}");
        assert!(c.contains("NOPASSWD:ALL"), "{c}");
        let f = fstab_raw(&Ids::derive("0123456789abcdef"));
        assert!(
            f.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("UUID=") && l.contains(" / ext4 "))
        );
        assert_eq!(files("x")[2], "x.raw.zst");
    }
}
