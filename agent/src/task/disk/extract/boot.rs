//! Making the extracted root bootable: fstab (file systems by UUID from `blkid`, logical
//! volumes by their device-mapper path), a root of fixed size told to cloud-init, grub.cfg in
//! the shape `stork-image` writes for the raw image (with the image's own kernel command line
//! and kernel), `grub-install` for i386-pc and x86_64-efi on every disk (so that any RAID
//! member boots alone), and with RAID the array in `mdadm.conf`.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};
use stork_proto::grub::Root;
use stork_proto::layout::Fs;
use stork_proto::{DiskLayout, StepState};

use super::error::{ExtractError, io_err};
use super::mount::Mounted;
use super::partitions::{BIOS_PART, Parts};
use super::stack::Stack;
use super::tool::run;
use crate::appliance::ApplianceClient;
use crate::step::Step;
use crate::task::DEV;

/// Read by cloud-init after the image's own `99_stork.cfg`.
const FIXED_ROOT_CFG: &str = "etc/cloud/cloud.cfg.d/99_stork_layout.cfg";

/// One line of fstab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// `UUID=...` or a device path.
    pub spec: String,
    pub mount: String,
    pub fs: &'static str,
    pub options: String,
}

/// `/etc/fstab` of the installed system: the root checked first, the others after it (XFS
/// and btrfs are not checked at boot: their fsck does nothing), the ESP last.
pub fn fstab(entries: &[FstabEntry]) -> String {
    let mut text = "# Written by the Stork agent (installed from the root tar).\n".to_string();
    for e in entries {
        let pass = match (e.mount.as_str(), e.fs) {
            (_, "xfs" | "btrfs") => 0,
            ("/", _) => 1,
            _ => 2,
        };
        text.push_str(&format!(
            "{} {} {} {} 0 {pass}\n",
            e.spec, e.mount, e.fs, e.options
        ));
    }
    text
}

/// The ESP's line: not needed to boot (GRUB is there already), so `nofail`.
fn esp_entry(uuid: &str) -> FstabEntry {
    FstabEntry {
        spec: format!("UUID={uuid}"),
        mount: "/boot/efi".into(),
        fs: "vfat",
        options: "umask=0077,nofail".into(),
    }
}

/// GRUB's modules for the root: the partition table, what the root sits on, its file system.
pub fn grub_modules(layout: &DiskLayout) -> Vec<&'static str> {
    let mut m = vec!["part_gpt"];
    if let Some(level) = layout.raid {
        m.push("mdraid1x");
        if level == 5 {
            m.push("raid5rec");
        }
    }
    if layout.lvm.is_some() {
        m.push("lvm");
    }
    m.push(match layout.root_fs() {
        Fs::Ext4 => "ext2",
        Fs::Xfs => "xfs",
        Fs::Btrfs => "btrfs",
    });
    m
}

/// `/boot/grub/grub.cfg`, the same text `stork-image` writes for the raw image.
pub fn grub_cfg(title: &str, root: &Root, cmdline: &str, kernel: &str, initrd: &str) -> String {
    stork_proto::grub::grub_cfg(
        "# Written by the Stork agent. Regenerate with grub-mkconfig (it reads /etc/default/grub)
# if you prefer.",
        title,
        root,
        cmdline,
        kernel,
        initrd,
    )
}

/// The image's kernel command line: `GRUB_CMDLINE_LINUX` and `GRUB_CMDLINE_LINUX_DEFAULT`
/// from its `/etc/default/grub`, else the arguments of its grub.cfg's first `linux` line
/// (less `root=` and `ro`, which we set). Empty when neither says.
pub fn kernel_cmdline(default_grub: Option<&str>, grub_cfg: Option<&str>) -> String {
    if let Some(text) = default_grub {
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .next_back()
                .map(unquote)
        };
        let (linux, default) = (
            value("GRUB_CMDLINE_LINUX"),
            value("GRUB_CMDLINE_LINUX_DEFAULT"),
        );
        if linux.is_some() || default.is_some() {
            return [linux, default]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    grub_cfg
        .and_then(|cfg| {
            cfg.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("linux")
                    .filter(|r| r.starts_with([' ', '\t']))
            })
        })
        .map(|rest| {
            rest.split_whitespace()
                .skip(1)
                .filter(|w| !w.starts_with("root=") && *w != "ro" && *w != "rw")
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// A shell value as `/etc/default/grub` writes it: `"..."`, `'...'` or bare.
fn unquote(v: &str) -> String {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.trim().to_string();
        }
    }
    v.to_string()
}

/// The kernel and initrd grub.cfg boots, as paths on the root: Debian's `/vmlinuz` and
/// `/initrd.img` symlinks (kept on the newest kernel by linux-base, so an upgrade needs no new
/// grub.cfg), else the newest `/boot/vmlinuz-*` and its initrd.
pub fn boot_files(root: &Path) -> Result<(String, String), ExtractError> {
    if fs::symlink_metadata(root.join("vmlinuz")).is_ok() {
        return Ok(("/vmlinuz".into(), "/initrd.img".into()));
    }
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .map_err(io_err("read", &boot))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| version_order(a, b));
    let v = versions.pop().ok_or(ExtractError::NoKernel)?;
    Ok((
        format!("/boot/vmlinuz-{v}"),
        format!("/boot/initrd.img-{v}"),
    ))
}

/// Kernel versions compared by their numbers (`6.1.0-9` < `6.1.0-10`), then as text.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let nums = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    nums(a).cmp(&nums(b)).then_with(|| a.cmp(b))
}

/// The menu entry's title: `PRETTY_NAME` from os-release.
pub fn os_title(os_release: Option<&str>) -> String {
    os_release
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(unquote)
        })
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('\'', ""))
        .unwrap_or_else(|| "Installed OS".to_string())
}

/// The `UUID` line of `blkid -o export`.
pub fn parse_blkid_uuid(export: &str) -> Option<String> {
    export
        .lines()
        .find_map(|l| l.trim().strip_prefix("UUID="))
        .map(str::to_string)
        .filter(|u| !u.is_empty())
}

fn blkid_uuid(device: &Path) -> Result<String, ExtractError> {
    // -p: probe the device itself; there is no udev and no blkid cache to trust here.
    let out = run(Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device))?;
    parse_blkid_uuid(&out).ok_or_else(|| ExtractError::NoUuid {
        device: device.display().to_string(),
        said: out.trim().to_string(),
    })
}

/// A root of fixed size stays that size: cloud-init would otherwise grow the partition and
/// its file system to the disk at every boot.
pub fn fixed_root_cfg() -> String {
    "# Written by the Stork agent: the deploy asked for a root partition of fixed size.\n\
     {\"growpart\": {\"mode\": \"off\"}, \"resize_rootfs\": false}\n"
        .to_string()
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), ExtractError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    fs::write(path, text).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

pub(super) fn bootloader(
    client: &ApplianceClient,
    disks: &[PathBuf],
    parts: &[Parts],
    stack: &Stack,
    layout: &DiskLayout,
    target: &Path,
) -> Result<()> {
    let names: Vec<String> = disks
        .iter()
        .map(|d| {
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    client.step_event(
        Step::Bootloader,
        StepState::Started,
        format!(
            "fstab, grub.cfg, GRUB for BIOS and UEFI on {}",
            names.join(", ")
        ),
    );
    let mut entries = Vec::with_capacity(stack.volumes.len() + 1);
    let mut root_uuid = String::new();
    for v in &stack.volumes {
        let uuid = blkid_uuid(&v.device)?;
        if v.mount == "/" {
            root_uuid = uuid.clone();
        }
        entries.push(FstabEntry {
            spec: v
                .path_name
                .clone()
                .unwrap_or_else(|| format!("UUID={uuid}")),
            mount: v.mount.clone(),
            fs: v.fs.name(),
            options: v.options.clone(),
        });
    }
    let esp_uuid = blkid_uuid(&Path::new(DEV).join(&parts[0].esp))?;
    entries.push(esp_entry(&esp_uuid));
    write_file(&target.join("etc/fstab"), &fstab(&entries), 0o644)?;
    // A root of fixed size, or on RAID or LVM, is not for cloud-init's growpart.
    if layout.root_mib.is_some() || !layout.is_flat() {
        write_file(&target.join(FIXED_ROOT_CFG), &fixed_root_cfg(), 0o644)?;
    }

    let read = |rel: &str| fs::read_to_string(target.join(rel)).ok();
    let cmdline = kernel_cmdline(
        read("etc/default/grub").as_deref(),
        read("boot/grub/grub.cfg").as_deref(),
    );
    let (kernel, initrd) = boot_files(target)?;
    let title = os_title(
        read("etc/os-release")
            .or_else(|| read("usr/lib/os-release"))
            .as_deref(),
    );

    let boot = target.join("boot");
    let grub_install = |platform: &str, extra: &[OsString]| -> Result<(), ExtractError> {
        let mut cmd = Command::new("grub-install");
        cmd.arg(format!("--target={platform}"))
            .arg(flag("--boot-directory", &boot));
        // The image's own GRUB, so that its modules and core image match the GRUB packages
        // the installed OS updates; else the ephemeral root's.
        let modules = target.join("usr/lib/grub").join(platform);
        if modules.join("modinfo.sh").is_file() {
            cmd.arg(flag("--directory", &modules));
        }
        run(cmd.args(extra)).map(drop)
    };
    let efi = |dir: &Path| {
        [
            flag("--efi-directory", dir),
            "--removable".into(),
            "--no-nvram".into(),
        ]
    };
    // Every disk gets GRUB for both firmware kinds: with RAID, any member boots alone. A
    // grub-install takes 5 to 6 s under emulation (docs/measurements.md); what it writes
    // for a further member partitioned as the first is the first's bytes, so those are
    // copied (`copy_bios_boot`, the ESP's files), and grub-install runs only where the
    // BIOS boot partition lies elsewhere or its sectors are of another size.
    let esp0 = target.join("boot/efi");
    grub_install("x86_64-efi", &efi(&esp0))?;
    let first = BiosBoot::of(&disks[0], &parts[0]);
    for (i, (disk, p)) in disks.iter().zip(parts).enumerate() {
        if i > 0 && BiosBoot::of(disk, p).same_as(&first) {
            copy_bios_boot(&disks[0], disk, p.bios)?;
        } else {
            grub_install("i386-pc", &[disk.as_os_str().to_owned()])?;
        }
        if i > 0 {
            let at = Path::new(ESP_ELSEWHERE);
            let esp = Mounted::new(&Path::new(DEV).join(&p.esp), at, "vfat")?;
            copy_tree(&esp0, at)?;
            esp.unmount()?;
        }
    }
    let modules = grub_modules(layout);
    let root = Root {
        uuid: &root_uuid,
        device: stack.root().path_name.as_deref(),
        modules: &modules,
    };
    write_file(
        &target.join("boot/grub/grub.cfg"),
        &grub_cfg(&title, &root, &cmdline, &kernel, &initrd),
        0o644,
    )?;
    let storage = storage_boot(layout, target)?;
    client.step_event(
        Step::Bootloader,
        StepState::Done,
        format!(
            "root UUID {root_uuid}, ESP {esp_uuid}; GRUB i386-pc in {} and x86_64-efi \
             at EFI/BOOT/BOOTX64.EFI; boots {kernel} with {cmdline:?}{storage}",
            names
                .iter()
                .map(|n| format!("{n}{BIOS_PART}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}

/// Where a disk's BIOS boot partition lies and in what sectors: GRUB's core.img on one disk
/// boots another only where both agree.
#[derive(Debug, PartialEq)]
struct BiosBoot {
    /// First byte and length of the BIOS boot partition.
    at: (u64, u64),
    /// The disk's logical sector size, as the kernel reports it; `None` if unreadable.
    sector: Option<u64>,
}

impl BiosBoot {
    fn of(disk: &Path, parts: &Parts) -> Self {
        let sector = disk.file_name().and_then(|name| {
            let sys = Path::new("/sys/class/block").join(name);
            crate::inventory::read_trimmed(&sys.join("queue/logical_block_size"))?
                .parse()
                .ok()
        });
        Self {
            at: parts.bios,
            sector,
        }
    }

    /// Whether GRUB for BIOS as written on `first` can be copied here: a disk of unknown
    /// sector size gets its own grub-install.
    fn same_as(&self, first: &Self) -> bool {
        self.sector.is_some() && self == first
    }
}

/// Bytes of sector 0 that are boot code (boot.img): the disk signature and the partition
/// table after them are the disk's own.
const BOOT_CODE: usize = 0x1b8;

/// GRUB for BIOS on `to` as grub-install put it on `from`, whose BIOS boot partition is
/// at the same place (`bios`: first byte, length): boot.img in sector 0 up to the disk
/// signature, and the BIOS boot partition whole (core.img, whose blocklist names sectors
/// of that partition, and whose prefix names the array, not the disk).
fn copy_bios_boot(from: &Path, to: &Path, bios: (u64, u64)) -> Result<(), ExtractError> {
    use std::os::unix::fs::FileExt;
    let src = fs::File::open(from).map_err(io_err("open", from))?;
    let dst = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(to)
        .map_err(io_err("open", to))?;
    let mut code = [0u8; BOOT_CODE];
    src.read_exact_at(&mut code, 0)
        .map_err(io_err("read sector 0 of", from))?;
    let mut part = vec![0u8; usize::try_from(bios.1).unwrap_or(0)];
    src.read_exact_at(&mut part, bios.0)
        .map_err(io_err("read the BIOS boot partition of", from))?;
    dst.write_all_at(&code, 0)
        .map_err(io_err("write sector 0 of", to))?;
    dst.write_all_at(&part, bios.0)
        .map_err(io_err("write the BIOS boot partition of", to))?;
    dst.sync_all().map_err(io_err("fsync", to))?;
    crate::console::line(&format!(
        "GRUB for BIOS copied from {} to {} (boot code, BIOS boot partition of {} KiB)",
        from.display(),
        to.display(),
        bios.1 / 1024
    ));
    Ok(())
}

/// Copies the files and directories under `from` into `to` (an ESP: FAT, so no links or
/// modes to keep).
fn copy_tree(from: &Path, to: &Path) -> Result<(), ExtractError> {
    for entry in fs::read_dir(from).map_err(io_err("read", from))? {
        let entry = entry.map_err(io_err("read", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io_err("stat", &src))?.is_dir() {
            fs::create_dir_all(&dst).map_err(io_err("create", &dst))?;
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst).map_err(io_err("copy", &src))?;
        }
    }
    Ok(())
}

/// Where the ESPs of the second and later disks are mounted in turn.
const ESP_ELSEWHERE: &str = "/run/stork/esp";

/// Whether the extracted image can bring the layout's storage up at boot: with RAID it needs
/// mdadm, with LVM lvm2 (their initramfs hooks put them in its initramfs when the image was
/// built).
pub(super) fn storage_tools(layout: &DiskLayout, target: &Path) -> Result<()> {
    let has = |tool: &str| {
        ["usr/sbin", "sbin"]
            .iter()
            .any(|d| target.join(d).join(tool).exists())
    };
    if layout.raid.is_some() && !has("mdadm") {
        bail!("the image has no mdadm: its initramfs could not assemble the root's RAID array");
    }
    if layout.lvm.is_some() && !has("lvm") {
        bail!("the image has no lvm2: its initramfs could not activate the root's volume group");
    }
    Ok(())
}

/// With RAID, writes the array into the installed system's `mdadm.conf`. Returns what the Done
/// event says of the storage.
///
/// The image's own initramfs brings the root up (checked by [`storage_tools`]): udev's rules
/// assemble any array incrementally and activate any volume group as its members appear, and
/// mdadm's local-block script runs an array degraded when a member is missing. Making the
/// initramfs again here would only add the array to its mdadm.conf, at a cost of minutes
/// under TCG (docs/measurements.md); the next kernel update makes it with the array.
fn storage_boot(layout: &DiskLayout, target: &Path) -> Result<String> {
    let mut said = Vec::new();
    if layout.raid.is_some() {
        let scan = run(Command::new("mdadm").args(["--detail", "--scan"]))?;
        let path = target.join("etc/mdadm/mdadm.conf");
        let old = fs::read_to_string(&path).unwrap_or_default();
        write_file(&path, &mdadm_conf(&old, &scan), 0o644)?;
        said.push("the array in mdadm.conf");
    }
    if layout.lvm.is_some() {
        said.push("LVM in the image's initramfs");
    }
    Ok(if said.is_empty() {
        String::new()
    } else {
        format!("; {}", said.join(", "))
    })
}

/// `mdadm.conf` with the arrays of `mdadm --detail --scan` in place of any `ARRAY` lines it
/// had (an image keeps none of its build host's).
pub fn mdadm_conf(old: &str, scan: &str) -> String {
    let mut text: String = old
        .lines()
        .filter(|l| !l.trim_start().starts_with("ARRAY"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str("# The arrays the Stork agent made for the root.\n");
    for l in scan.lines().filter(|l| l.starts_with("ARRAY")) {
        // A new RAID 5 is still recovering onto its last member, which the scan counts as
        // a spare: the array has none once it is in sync.
        let words: Vec<&str> = l
            .split_whitespace()
            .filter(|w| !w.starts_with("spares="))
            .collect();
        text.push_str(&words.join(" "));
        text.push('\n');
    }
    text
}

fn flag(name: &str, path: &Path) -> OsString {
    let mut s = OsString::from(format!("{name}="));
    s.push(path.as_os_str());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_is_copied_only_to_a_member_with_the_same_partition_and_sector_size() {
        let first = BiosBoot {
            at: (1 << 20, 1 << 20),
            sector: Some(512),
        };
        let like = |at: (u64, u64), sector| BiosBoot { at, sector }.same_as(&first);
        assert!(like((1 << 20, 1 << 20), Some(512)));
        // A 4Kn disk beside 512e ones: GRUB's sectors are not its sectors.
        assert!(!like((1 << 20, 1 << 20), Some(4096)));
        assert!(!like((2 << 20, 1 << 20), Some(512)));
        assert!(!like((1 << 20, 2 << 20), Some(512)));
        // Unknown sizes are not taken for equal.
        assert!(!like((1 << 20, 1 << 20), None));
        let unknown = || BiosBoot {
            at: (1 << 20, 1 << 20),
            sector: None,
        };
        assert!(!unknown().same_as(&unknown()));
    }

    #[test]
    fn a_members_bios_boot_is_the_first_disks_code_and_partition_under_its_own_table() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let bios = (4096, 2048);
        // The first disk: boot code, signature and table, the BIOS boot partition, more.
        let mut first: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        first[510] = 0x55;
        let mut second = vec![0xeeu8; 8192];
        second[BOOT_CODE..512].fill(0x11);
        fs::write(&a, &first).unwrap();
        fs::write(&b, &second).unwrap();
        copy_bios_boot(&a, &b, bios).unwrap();
        let got = fs::read(&b).unwrap();
        assert_eq!(got[..BOOT_CODE], first[..BOOT_CODE]);
        // Its signature and partition table are its own.
        assert!(got[BOOT_CODE..512].iter().all(|&x| x == 0x11));
        assert_eq!(got[4096..6144], first[4096..6144]);
        // Nothing else is touched.
        assert!(
            got[512..4096]
                .iter()
                .chain(&got[6144..])
                .all(|&x| x == 0xee)
        );
        assert_eq!(fs::read(&a).unwrap(), first);
        // A disk too short for the partition is an error that names it.
        fs::write(&a, &first[..5000]).unwrap();
        let e = copy_bios_boot(&a, &b, bios).unwrap_err().to_string();
        assert!(e.contains("BIOS boot partition"), "{e}");
    }

    #[test]
    fn an_esps_files_are_copied_whole_into_another() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("esp0"), dir.path().join("esp1"));
        fs::create_dir_all(from.join("EFI/BOOT")).unwrap();
        fs::create_dir_all(from.join("EFI/debian")).unwrap();
        fs::create_dir_all(&to).unwrap();
        fs::write(from.join("EFI/BOOT/BOOTX64.EFI"), b"shim").unwrap();
        fs::write(from.join("EFI/BOOT/grubx64.efi"), b"grub").unwrap();
        fs::write(from.join("EFI/debian/grub.cfg"), b"search").unwrap();
        copy_tree(&from, &to).unwrap();
        for f in [
            "EFI/BOOT/BOOTX64.EFI",
            "EFI/BOOT/grubx64.efi",
            "EFI/debian/grub.cfg",
        ] {
            assert_eq!(
                fs::read(to.join(f)).unwrap(),
                fs::read(from.join(f)).unwrap()
            );
        }
    }

    #[test]
    fn fstab_and_grub_cfg_name_the_file_systems_by_uuid() {
        let root = FstabEntry {
            spec: "UUID=0d1e2f3a-1111-4222-8333-444455556666".into(),
            mount: "/".into(),
            fs: "ext4",
            options: "errors=remount-ro".into(),
        };
        let f = fstab(&[root.clone(), esp_entry("ABCD-1234")]);
        let lines: Vec<&str> = f.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "UUID=0d1e2f3a-1111-4222-8333-444455556666 / ext4 errors=remount-ro 0 1",
                "UUID=ABCD-1234 /boot/efi vfat umask=0077,nofail 0 2",
            ]
        );
        let var = FstabEntry {
            spec: "/dev/mapper/vg0-var".into(),
            mount: "/var".into(),
            fs: "xfs",
            options: "defaults".into(),
        };
        let srv = FstabEntry {
            spec: "/dev/mapper/vg0-srv".into(),
            mount: "/srv".into(),
            fs: "ext4",
            options: "noatime".into(),
        };
        let f = fstab(&[root, var, srv]);
        assert!(
            f.contains("/dev/mapper/vg0-var /var xfs defaults 0 0\n"),
            "{f}"
        );
        assert!(
            f.contains("/dev/mapper/vg0-srv /srv ext4 noatime 0 2\n"),
            "{f}"
        );
        let cfg = grub_cfg(
            "Debian GNU/Linux 12 (bookworm)",
            &stork_proto::grub::ext4_root("0d1e2f3a-1111-4222-8333-444455556666"),
            "console=tty0 console=ttyS0,115200n8",
            "/vmlinuz",
            "/initrd.img",
        );
        assert!(cfg.contains(
            "search --no-floppy --fs-uuid --set=root 0d1e2f3a-1111-4222-8333-444455556666\n"
        ));
        assert!(cfg.contains(
            "    linux /vmlinuz root=UUID=0d1e2f3a-1111-4222-8333-444455556666 ro console=tty0 console=ttyS0,115200n8\n"
        ));
        assert!(cfg.contains("    initrd /initrd.img\n"));
        assert!(cfg.contains("menuentry 'Debian GNU/Linux 12 (bookworm)' {"));
        assert!(cfg.contains("serial --unit=0 --speed=115200"));
    }

    #[test]
    fn grub_modules_follow_the_layout_and_mdadm_conf_takes_the_arrays() {
        let flat = DiskLayout::default();
        assert_eq!(grub_modules(&flat), ["part_gpt", "ext2"]);
        let raid_lvm = DiskLayout {
            disks: vec!["a".into(), "b".into(), "c".into()],
            raid: Some(5),
            lvm: Some(stork_proto::layout::Lvm {
                vg: "vg0".into(),
                volumes: vec![stork_proto::layout::Volume {
                    name: "root".into(),
                    mount: "/".into(),
                    fs: Fs::Xfs,
                    size_mib: None,
                    percent: None,
                    options: None,
                }],
            }),
            ..DiskLayout::default()
        };
        assert_eq!(
            grub_modules(&raid_lvm),
            ["part_gpt", "mdraid1x", "raid5rec", "lvm", "xfs"]
        );
        let conf = mdadm_conf(
            "HOMEHOST <system>\nARRAY /dev/md/old metadata=1.2 UUID=x\nMAILADDR root\n",
            "ARRAY /dev/md0 metadata=1.2 spares=1 name=h:root UUID=a:b:c:d\n",
        );
        assert_eq!(
            conf,
            "HOMEHOST <system>\nMAILADDR root\n# The arrays the Stork agent made for the root.\n\
             ARRAY /dev/md0 metadata=1.2 name=h:root UUID=a:b:c:d\n"
        );
    }

    #[test]
    fn the_kernel_command_line_comes_from_the_image() {
        let default_grub = "GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"\"\n\
                            GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200n8\"\n";
        assert_eq!(
            kernel_cmdline(Some(default_grub), None),
            "console=tty0 console=ttyS0,115200n8"
        );
        assert_eq!(
            kernel_cmdline(
                Some("GRUB_CMDLINE_LINUX='a=1'\nGRUB_CMDLINE_LINUX_DEFAULT=quiet\n"),
                None
            ),
            "a=1 quiet"
        );
        let cfg = "search --set=root x\nmenuentry 'D' {\n    linux /vmlinuz root=UUID=x ro console=ttyS0 quiet\n    initrd /initrd.img\n}\n";
        assert_eq!(
            kernel_cmdline(Some("GRUB_TIMEOUT=1\n"), Some(cfg)),
            "console=ttyS0 quiet"
        );
        assert_eq!(kernel_cmdline(None, None), "");
        // `linux16` and the like are not the kernel line.
        assert_eq!(kernel_cmdline(None, Some("linuxefi /x a\n")), "");
    }

    #[test]
    fn boot_files_prefer_the_symlinks_then_the_newest_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("boot")).unwrap();
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            fs::write(root.join(format!("boot/vmlinuz-{v}")), "").unwrap();
        }
        assert_eq!(
            boot_files(root).unwrap(),
            (
                "/boot/vmlinuz-6.1.0-10-amd64".to_string(),
                "/boot/initrd.img-6.1.0-10-amd64".to_string()
            )
        );
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-9-amd64", root.join("vmlinuz")).unwrap();
        assert_eq!(
            boot_files(root).unwrap(),
            ("/vmlinuz".to_string(), "/initrd.img".to_string())
        );
        let empty = tempfile::tempdir().unwrap();
        fs::create_dir_all(empty.path().join("boot")).unwrap();
        assert!(matches!(
            boot_files(empty.path()),
            Err(ExtractError::NoKernel)
        ));
    }

    #[test]
    fn small_parsers() {
        assert_eq!(
            parse_blkid_uuid("DEVNAME=/dev/vda2\nUUID=ABCD-1234\nTYPE=vfat\n"),
            Some("ABCD-1234".into())
        );
        assert_eq!(parse_blkid_uuid("TYPE=vfat\nPART_ENTRY_UUID=x\n"), None);
        assert_eq!(
            os_title(Some(
                "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"
            )),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(os_title(Some("PRETTY_NAME='It''s'\n")), "Its");
        assert_eq!(os_title(None), "Installed OS");
        let cfg = fixed_root_cfg();
        let json = cfg.lines().nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["growpart"]["mode"], "off");
        assert_eq!(v["resize_rootfs"], false);
    }
}
