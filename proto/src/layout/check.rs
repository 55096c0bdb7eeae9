//! A layout checked by itself, before any disk is looked at: the disks named once each, a
//! RAID level mdadm has with enough disks for it, LVM names LVM accepts, one root, mount
//! points that are plain absolute paths, each once, and options fstab can carry.

use std::collections::BTreeSet;

use super::{DiskLayout, LayoutError, Lvm, MAX_ROOT_MIB, MIN_ROOT_MIB};

/// More disks than any server's boot storage; bounds the work of a check.
pub const MAX_DISKS: usize = 16;
/// Logical volumes in one layout.
pub const MAX_VOLUMES: usize = 32;
/// LVM's own limit for a VG or LV name is 127; device-mapper names join both.
const MAX_NAME: usize = 64;
const MAX_OPTIONS: usize = 256;
const MAX_MOUNT: usize = 256;

/// The RAID levels offered, with the fewest members mdadm assembles each from.
pub fn raid_min_members(level: u8) -> Option<usize> {
    match level {
        0 | 1 | 10 => Some(2),
        5 => Some(3),
        _ => None,
    }
}

pub(super) fn structure(l: &DiskLayout) -> Result<(), LayoutError> {
    disks(&l.disks)?;
    let n = l.disks.len().max(1);
    if let Some(level) = l.raid {
        let min = raid_min_members(level).ok_or_else(|| {
            LayoutError::field("raid", format!("level {level} is not one of 0, 1, 5, 10"))
        })?;
        if n < min {
            return Err(LayoutError::field(
                "raid",
                format!(
                    "RAID {level} needs at least {min} disks; layout.disks names {}",
                    l.disks.len()
                ),
            ));
        }
    } else if n > 1 && l.lvm.is_none() {
        return Err(LayoutError::field(
            "disks",
            format!(
                "{n} disks without `raid` or `lvm` to join them: name one disk, or add raid or lvm"
            ),
        ));
    }
    match &l.lvm {
        Some(lvm) => {
            if l.fs.is_some() {
                return Err(LayoutError::field(
                    "fs",
                    "with `lvm` each volume names its file system (lvm.volumes[].fs)",
                ));
            }
            if l.mount_options.is_some() {
                return Err(LayoutError::field(
                    "mount_options",
                    "with `lvm` each volume has its own (lvm.volumes[].options)",
                ));
            }
            volumes(lvm)
        }
        None => match &l.mount_options {
            Some(o) => options("mount_options", o),
            None => Ok(()),
        },
    }
}

fn disks(disks: &[String]) -> Result<(), LayoutError> {
    if disks.len() > MAX_DISKS {
        return Err(LayoutError::field(
            "disks",
            format!("{} disks; at most {MAX_DISKS}", disks.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, d) in disks.iter().enumerate() {
        let field = format!("disks[{i}]");
        let name = d.trim();
        if name.is_empty() || name.len() > MAX_MOUNT || name.chars().any(char::is_control) {
            return Err(LayoutError::field(
                field,
                format!("{d:?} is not a disk name (kernel name, serial, WWN, model or path)"),
            ));
        }
        if !seen.insert(name) {
            return Err(LayoutError::field(
                field,
                format!("{name:?} is named twice"),
            ));
        }
    }
    Ok(())
}

/// Substrings LVM keeps for its own hidden volumes: an LV name holding one is refused.
const LV_RESERVED: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
    "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];
/// Names under /dev a volume group's directory would collide with (vgcreate refuses them).
const DEV_NAMES: &[&str] = &[
    "block",
    "bus",
    "char",
    "cpu",
    "disk",
    "dri",
    "fd",
    "hugepages",
    "input",
    "mapper",
    "md",
    "mqueue",
    "net",
    "pts",
    "shm",
    "snd",
    "vfio",
];
/// Kernel device names of disks and the like: a volume group named `sda` or `md0` collides.
const DEV_PREFIXES: &[&str] = &[
    "sd", "vd", "hd", "xvd", "nvme", "md", "loop", "dm-", "sr", "mmcblk", "nbd", "ram", "tty",
];

/// Whether `rest` after a device prefix makes a kernel device name: nothing, a number
/// (`md0`, `loop3`, `nvme0n1`, `dm-2`), or for disks one or two letters and maybe a number
/// (`sda`, `vdab`, `sdb1`).
fn device_suffix(prefix: &str, rest: &str) -> bool {
    let letters = rest.chars().take_while(char::is_ascii_lowercase).count();
    let after = &rest[letters..];
    let disk = matches!(prefix, "sd" | "vd" | "hd" | "xvd");
    rest.is_empty()
        || (letters == 0 && after.starts_with(|c: char| c.is_ascii_digit()))
        || (disk && (1..=2).contains(&letters) && after.chars().all(|c| c.is_ascii_digit()))
}

fn volumes(lvm: &Lvm) -> Result<(), LayoutError> {
    name("lvm.vg", &lvm.vg)?;
    let dev = DEV_NAMES.contains(&lvm.vg.as_str())
        || DEV_PREFIXES.iter().any(|p| {
            lvm.vg
                .strip_prefix(p)
                .is_some_and(|rest| device_suffix(p, rest))
        });
    ensure(!dev, "lvm.vg", || {
        format!(
            "{:?} is a name under /dev already (a device or directory)",
            lvm.vg
        )
    })?;
    if lvm.volumes.is_empty() || lvm.volumes.len() > MAX_VOLUMES {
        return Err(LayoutError::field(
            "lvm.volumes",
            format!(
                "{} volumes; between 1 and {MAX_VOLUMES}, one of them mounted on /",
                lvm.volumes.len()
            ),
        ));
    }
    let (mut names, mut mounts) = (BTreeSet::new(), BTreeSet::new());
    let (mut rest, mut percent) = (None, 0u32);
    for (i, v) in lvm.volumes.iter().enumerate() {
        let at = |f: &str| format!("lvm.volumes[{i}].{f}");
        name(&at("name"), &v.name)?;
        ensure(
            !LV_RESERVED.iter().any(|r| v.name.contains(r)),
            &at("name"),
            || {
                format!(
                    "{:?} holds a suffix LVM keeps for its own volumes (_tmeta, _rimage, ...)",
                    v.name
                )
            },
        )?;
        if !names.insert(v.name.as_str()) {
            return Err(LayoutError::field(
                at("name"),
                format!("{:?} is used twice", v.name),
            ));
        }
        mount(&at("mount"), &v.mount)?;
        if !mounts.insert(v.mount.as_str()) {
            return Err(LayoutError::field(
                at("mount"),
                format!("{} is mounted twice", v.mount),
            ));
        }
        if let Some(o) = &v.options {
            options(&at("options"), o)?;
        }
        let min = if v.mount == "/" {
            MIN_ROOT_MIB.max(v.fs.min_mib())
        } else {
            v.fs.min_mib()
        };
        match (v.size_mib, v.percent) {
            (Some(_), Some(_)) => {
                return Err(LayoutError::field(
                    at("percent"),
                    "give size_mib or percent, not both",
                ));
            }
            (Some(s), None) if s < min => {
                return Err(LayoutError::field(
                    at("size_mib"),
                    format!(
                        "{s} MiB is below the {min} MiB a {} {} needs",
                        v.fs.name(),
                        if v.mount == "/" {
                            "root"
                        } else {
                            "file system"
                        }
                    ),
                ));
            }
            (Some(s), None) if s > MAX_ROOT_MIB => {
                return Err(LayoutError::field(
                    at("size_mib"),
                    format!("{s} MiB is above the maximum of {MAX_ROOT_MIB} MiB"),
                ));
            }
            (None, Some(p)) if p == 0 || p > 100 => {
                return Err(LayoutError::field(
                    at("percent"),
                    format!("{p} is not between 1 and 100"),
                ));
            }
            (None, Some(p)) => percent += u32::from(p),
            (None, None) => {
                if let Some(other) = rest.replace(i) {
                    return Err(LayoutError::field(
                        at("size_mib"),
                        format!(
                            "lvm.volumes[{other}] already takes the rest; give this one size_mib \
                             or percent"
                        ),
                    ));
                }
            }
            (Some(_), None) => {}
        }
    }
    if percent > 100 || (percent == 100 && rest.is_some()) {
        return Err(LayoutError::field(
            "lvm.volumes",
            format!(
                "the percentages add up to {percent}%{}",
                if rest.is_some() {
                    ", leaving nothing for the volume that takes the rest"
                } else {
                    ""
                }
            ),
        ));
    }
    if !mounts.contains("/") {
        return Err(LayoutError::field(
            "lvm.volumes",
            "no volume is mounted on /: one must hold the root",
        ));
    }
    Ok(())
}

/// A VG or LV name as LVM accepts it, and one device-mapper can join with another (`-` is
/// doubled in `/dev/mapper` names; kept out so the names read the same everywhere).
fn name(field: &str, n: &str) -> Result<(), LayoutError> {
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME
        && !n.starts_with(['-', '.'])
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+'))
        && !n.starts_with("snapshot")
        && !n.starts_with("pvmove");
    ensure(ok, field, || {
        format!(
            "{n:?} is not a name LVM takes: 1 to {MAX_NAME} of A-Z a-z 0-9 _ . +, not starting \
             with . (nor snapshot, pvmove)"
        )
    })
}

/// `Ok` when `ok`, else the field's error with `why()`.
fn ensure(ok: bool, field: &str, why: impl FnOnce() -> String) -> Result<(), LayoutError> {
    if ok {
        Ok(())
    } else {
        Err(LayoutError::field(field, why()))
    }
}

/// An absolute path without `.`, `..`, empty components or characters fstab cannot carry;
/// not the ESP's (each disk's ESP is mounted there).
fn mount(field: &str, m: &str) -> Result<(), LayoutError> {
    let bad = |why: &str| Err(LayoutError::field(field, format!("{m:?} {why}")));
    if !m.starts_with('/') || m.len() > MAX_MOUNT {
        return bad("is not an absolute path");
    }
    if m != "/"
        && m[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("is not a plain path (no //, trailing /, . or ..)");
    }
    if m.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return bad("has a blank, a control character or a backslash");
    }
    // The kernel's file systems, and the symlinks of a merged /usr (tar cannot put a link
    // where a file system is mounted).
    const NOT_MOUNTS: &[&str] = &[
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/var/run",
        "/var/lock",
    ];
    if let Some(t) = NOT_MOUNTS
        .iter()
        .find(|t| m == **t || m.strip_prefix(**t).is_some_and(|r| r.starts_with('/')))
    {
        return bad(&format!(
            "is under {t}, which is the kernel's or a link in the image"
        ));
    }
    if m == "/boot" || m.starts_with("/boot/") {
        // grub.cfg boots the kernel from the root file system (Debian's /vmlinuz link).
        return bad(
            "is under /boot, which stays on the root file system (each disk's ESP is on /boot/efi)",
        );
    }
    Ok(())
}

/// Mount options as fstab's fourth field: no blanks, a plain character set.
fn options(field: &str, o: &str) -> Result<(), LayoutError> {
    let ok = !o.is_empty()
        && o.len() <= MAX_OPTIONS
        && o.chars()
            .all(|c| c.is_ascii_alphanumeric() || ",=._:+-/@".contains(c));
    ensure(ok, field, || {
        format!(
            "{o:?} is not a mount option list (comma-separated, of A-Z a-z 0-9 = . _ : + - / @)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Fs, Volume, test_volume as vol};
    use super::*;

    fn lvm(volumes: Vec<Volume>) -> DiskLayout {
        DiskLayout {
            disks: vec!["vda".into(), "vdb".into()],
            lvm: Some(Lvm {
                vg: "vg0".into(),
                volumes,
            }),
            ..DiskLayout::default()
        }
    }

    fn err(l: &DiskLayout) -> String {
        l.validate().unwrap_err().to_string()
    }

    #[test]
    fn raid_levels_and_their_disks() {
        let raid = |level, disks: &[&str]| DiskLayout {
            raid: Some(level),
            disks: disks.iter().map(|d| d.to_string()).collect(),
            ..DiskLayout::default()
        };
        assert!(raid(1, &["vda", "vdb"]).validate().is_ok());
        assert!(raid(10, &["vda", "vdb"]).validate().is_ok());
        assert!(raid(5, &["a", "b", "c"]).validate().is_ok());
        let m = err(&raid(5, &["a", "b"]));
        assert_eq!(
            m,
            "layout.raid: RAID 5 needs at least 3 disks; layout.disks names 2"
        );
        let m = err(&raid(1, &[]));
        assert!(m.starts_with("layout.raid: RAID 1 needs at least 2"), "{m}");
        let m = err(&raid(6, &["a", "b", "c", "d"]));
        assert_eq!(m, "layout.raid: level 6 is not one of 0, 1, 5, 10");
        let m = err(&raid(1, &["a", " a "]));
        assert_eq!(m, "layout.disks[1]: \"a\" is named twice");
        let two = DiskLayout {
            disks: vec!["a".into(), "b".into()],
            ..DiskLayout::default()
        };
        assert!(err(&two).starts_with("layout.disks: 2 disks without"));
    }

    #[test]
    fn volumes_are_checked_by_their_field() {
        assert!(
            lvm(vec![
                vol("root", "/", Some(2048), None),
                vol("var", "/var", None, Some(20)),
                vol("srv", "/srv/data", None, None),
            ])
            .validate()
            .is_ok()
        );
        let cases: &[(Vec<Volume>, &str)] = &[
            (vec![], "layout.lvm.volumes: 0 volumes"),
            (
                vec![vol("var", "/var", None, None)],
                "layout.lvm.volumes: no volume is mounted on /",
            ),
            (
                vec![vol("root", "/", Some(100), None)],
                "layout.lvm.volumes[0].size_mib: 100 MiB is below the 1024 MiB",
            ),
            (
                vec![vol("root", "/", None, None), vol("var", "/var", None, None)],
                "layout.lvm.volumes[1].size_mib: lvm.volumes[0] already takes the rest",
            ),
            (
                vec![
                    vol("root", "/", None, Some(60)),
                    vol("var", "/var", None, Some(50)),
                ],
                "layout.lvm.volumes: the percentages add up to 110%",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("v", "/var", None, Some(100)),
                ],
                "layout.lvm.volumes: the percentages add up to 100%, leaving nothing",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("root", "/var", Some(64), None),
                ],
                "layout.lvm.volumes[1].name: \"root\" is used twice",
            ),
            (
                vec![vol("root", "/", None, None), vol("v", "/", Some(64), None)],
                "layout.lvm.volumes[1].mount: / is mounted twice",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("v", "var", Some(64), None),
                ],
                "layout.lvm.volumes[1].mount: \"var\" is not an absolute path",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("v", "/var/", Some(64), None),
                ],
                "layout.lvm.volumes[1].mount: \"/var/\" is not a plain path",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("v", "/boot/efi", Some(64), None),
                ],
                "layout.lvm.volumes[1].mount: \"/boot/efi\" is under /boot",
            ),
            (
                vec![vol("ro-ot", "/", None, None)],
                "layout.lvm.volumes[0].name: \"ro-ot\" is not a name LVM takes",
            ),
            (
                vec![vol("db_tmeta", "/", None, None)],
                "layout.lvm.volumes[0].name: \"db_tmeta\" holds a suffix LVM keeps",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("p", "/proc/x", Some(64), None),
                ],
                "layout.lvm.volumes[1].mount: \"/proc/x\" is under /proc",
            ),
            (
                vec![
                    vol("root", "/", None, None),
                    vol("l", "/lib", Some(64), None),
                ],
                "layout.lvm.volumes[1].mount: \"/lib\" is under /lib",
            ),
            (
                vec![vol("root", "/", Some(2048), Some(5))],
                "layout.lvm.volumes[0].percent: give size_mib or percent, not both",
            ),
        ];
        for (volumes, want) in cases {
            let m = err(&lvm(volumes.clone()));
            assert!(m.starts_with(want), "{m}\n  wanted {want}");
        }
        let mut x = vol("data", "/data", Some(200), None);
        x.fs = Fs::Xfs;
        let m = err(&lvm(vec![vol("root", "/", None, None), x]));
        assert!(
            m.starts_with("layout.lvm.volumes[1].size_mib: 200 MiB is below the 300 MiB a xfs"),
            "{m}"
        );
        let mut bad_vg = lvm(vec![vol("root", "/", None, None)]);
        bad_vg.lvm.as_mut().unwrap().vg = "my vg".into();
        assert!(err(&bad_vg).starts_with("layout.lvm.vg: \"my vg\""));
        for dev in ["md0", "mapper", "sda", "nvme0n1"] {
            bad_vg.lvm.as_mut().unwrap().vg = dev.into();
            assert!(err(&bad_vg).contains("under /dev"), "{dev}");
        }
        for ok in ["vg0", "data", "mdvg", "system", "vdata", "ramdisk"] {
            bad_vg.lvm.as_mut().unwrap().vg = ok.into();
            assert!(bad_vg.validate().is_ok(), "{ok}");
        }
        let mut opts = lvm(vec![vol("root", "/", None, None)]);
        opts.lvm.as_mut().unwrap().volumes[0].options = Some("noatime discard".into());
        assert!(err(&opts).starts_with("layout.lvm.volumes[0].options:"));
        opts.lvm.as_mut().unwrap().volumes[0].options = Some("noatime,discard".into());
        assert!(opts.validate().is_ok());
        opts.fs = Some(Fs::Xfs);
        assert!(err(&opts).starts_with("layout.fs: with `lvm`"));
    }

    #[test]
    fn a_flat_root_takes_its_fs_and_options() {
        let l = DiskLayout {
            fs: Some(Fs::Btrfs),
            mount_options: Some("compress=zstd,noatime".into()),
            ..DiskLayout::default()
        };
        assert!(l.validate().is_ok());
        assert!(!l.is_flat());
        assert_eq!(l.root_fs(), Fs::Btrfs);
        let bad = DiskLayout {
            mount_options: Some("x\ny".into()),
            ..DiskLayout::default()
        };
        assert!(err(&bad).starts_with("layout.mount_options:"));
        assert!(DiskLayout::default().is_flat());
    }
}
