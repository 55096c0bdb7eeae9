//! The disk layout a deploy to disk may ask for, shared by the appliance (which validates the
//! request against the machine's inventory) and the agent (which partitions by it).
//!
//! Asking for a layout makes the agent install by extracting the image's root tar onto file
//! systems it makes, instead of streaming the raw disk image. Every disk of the layout gets
//! the same GPT:
//!
//! | # | name | type | size |
//! |---|---|---|---|
//! | 1 | `bios` | BIOS boot (EF02), GRUB's core.img on a GPT disk | [`BIOS_BOOT_MIB`] |
//! | 2 | `esp` | EFI system (EF00), FAT32 | `esp_mib`, default [`DEFAULT_ESP_MIB`] |
//! | 3 | `root` | the data partition: Linux root (8304), RAID member (FD00) or LVM PV (8E00) | `root_mib`, default the rest of the disk |
//!
//! The first partition starts at 1 MiB; every partition is MiB-aligned. On the data
//! partitions, in this order and each optional: one software RAID array over all of them
//! (`raid`: mdadm level 0, 1, 5 or 10), an LVM volume group over the array or the partitions
//! (`lvm`: logical volumes with sizes, percentages or the rest, each with its file system,
//! mount point and options), and otherwise one root file system (`fs`, `mount_options`).
//! GRUB goes onto every disk, so that with RAID any member boots alone.
//!
//! `check` validates a layout by itself (every mistake names its field); `fit` places it
//! on disks of given sizes (what the appliance checks against the inventory and the agent
//! creates).

mod check;
mod disks;
mod fit;

pub use check::{MAX_DISKS, MAX_VOLUMES, raid_min_members};
pub use disks::PickError;
pub use fit::{DiskSize, Fit, MD_RESERVE_MIB, PE_MIB, PV_METADATA_MIB};

use serde::{Deserialize, Serialize};

/// The BIOS boot partition: GRUB's i386-pc core.img is about 100 KiB; 1 MiB is the usual
/// size and keeps the next partition aligned.
pub const BIOS_BOOT_MIB: u64 = 1;
/// Room for several kernels and unified kernel images, as common installers give it.
pub const DEFAULT_ESP_MIB: u64 = 512;
/// FAT32 needs at least 65,525 clusters: 32 MiB with 512-byte sectors and clusters; twice
/// that for margin. (A 4Kn disk needs 256 MiB: mkfs.vfat then fails with its own message.)
pub const MIN_ESP_MIB: u64 = 64;
/// Bounds keep every byte count well inside `u64`.
pub const MAX_ESP_MIB: u64 = 16 << 10;
/// Less than this holds no general-purpose OS with room to run.
pub const MIN_ROOT_MIB: u64 = 1024;
/// 1 PiB.
pub const MAX_ROOT_MIB: u64 = 1 << 30;
/// Before the first partition (protective MBR, GPT header and entries, alignment) and after
/// the last (the backup GPT's 33 sectors, rounded up to alignment).
pub const GPT_OVERHEAD_MIB: u64 = 2;

const MIB: u64 = 1 << 20;

/// A compressed root tar holds about three times its size in files (Debian: 221 MiB of zstd,
/// 755 MiB of tar); four times is the least root a layout should give it.
pub const TAR_EXPANSION: u64 = 4;

/// The least root, in MiB, for an image whose root tar is `tar_size` bytes: what the agent
/// chooses a disk by and the appliance checks a layout with.
pub fn root_floor_mib(tar_size: u64) -> u64 {
    (tar_size.saturating_mul(TAR_EXPANSION).div_ceil(MIB)).max(MIN_ROOT_MIB)
}

/// A deploy's storage: partition sizes in MiB, the disks, RAID, LVM and file systems; absent
/// fields take their defaults (one disk, no RAID, no LVM, an ext4 root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskLayout {
    /// EFI system partition of each disk; default [`DEFAULT_ESP_MIB`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(default = 512, minimum = 64, maximum = 16384)
    )]
    pub esp_mib: Option<u64>,
    /// Each disk's data partition: the root, or with `raid` or `lvm` the RAID member or LVM
    /// physical volume; default the rest of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1024, maximum = 1073741824))]
    pub root_mib: Option<u64>,
    /// The disks, each by a name the inventory shows (kernel name, serial, WWN, model or
    /// path). Empty: the deploy's `disk`, else the smallest that fits. More than one needs
    /// `raid` or `lvm` to join them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// Software RAID (mdadm, metadata 1.2) over the disks' data partitions: level 0, 1, 5 or
    /// 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u8>, example = 1))]
    pub raid: Option<u8>,
    /// An LVM volume group over the array, or over the data partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<Lvm>,
    /// The root's file system without `lvm`; default ext4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Fs>,
    /// The root's mount options without `lvm` (fstab's fourth field); default
    /// `errors=remount-ro` for ext4, `defaults` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_options: Option<String>,
}

/// A file system the agent makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    #[default]
    Ext4,
    Xfs,
    Btrfs,
}

impl Fs {
    /// The name fstab, mkfs and blkid use.
    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
            Fs::Btrfs => "btrfs",
        }
    }

    /// The smallest file system its mkfs makes (xfsprogs 5.19+ refuses under 300 MiB;
    /// mkfs.btrfs under 114 MiB with the default profiles), with margin.
    pub fn min_mib(self) -> u64 {
        match self {
            Fs::Ext4 => 16,
            Fs::Xfs => 300,
            Fs::Btrfs => 128,
        }
    }

    /// fstab's options when the request gives none.
    pub fn default_options(self) -> &'static str {
        match self {
            Fs::Ext4 => "errors=remount-ro",
            Fs::Xfs | Fs::Btrfs => "defaults",
        }
    }
}

/// An LVM volume group and its logical volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Lvm {
    /// The volume group's name; default `vg0`.
    #[serde(default = "default_vg")]
    #[cfg_attr(feature = "openapi", schema(default = "vg0"))]
    pub vg: String,
    /// In order of creation; exactly one is mounted on `/`.
    pub volumes: Vec<Volume>,
}

fn default_vg() -> String {
    "vg0".to_string()
}

/// An ext4 volume, for the tests of this module's parts.
#[cfg(test)]
pub(crate) fn test_volume(
    name: &str,
    mount: &str,
    size_mib: Option<u64>,
    percent: Option<u8>,
) -> Volume {
    Volume {
        name: name.into(),
        mount: mount.into(),
        fs: Fs::Ext4,
        size_mib,
        percent,
        options: None,
    }
}

/// A logical volume: its name, size, file system and mount point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// The logical volume's name (`root`, `var`).
    pub name: String,
    /// Where the installed OS mounts it (`/`, `/var`, `/srv/data`).
    pub mount: String,
    /// Default ext4.
    #[serde(default)]
    pub fs: Fs,
    /// Size in MiB (rounded up to whole 4 MiB extents). With neither this nor `percent`, the
    /// volume takes what the others leave (one volume at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// Size as a percentage of the volume group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub percent: Option<u8>,
    /// Mount options (fstab's fourth field); default as for the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout.{field}: {value} MiB is below the minimum of {min} MiB ({why})")]
    TooSmall {
        field: &'static str,
        value: u64,
        min: u64,
        why: &'static str,
    },
    #[error("layout.{field}: {value} MiB is above the maximum of {max} MiB")]
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// Any other mistake, with the field's path (`lvm.volumes[1].mount`).
    #[error("layout.{field}: {why}")]
    Field { field: String, why: String },
}

impl LayoutError {
    pub(crate) fn field(field: impl Into<String>, why: impl Into<String>) -> Self {
        LayoutError::Field {
            field: field.into(),
            why: why.into(),
        }
    }
}

impl DiskLayout {
    /// The ESP's size, default applied.
    pub fn esp(&self) -> u64 {
        self.esp_mib.unwrap_or(DEFAULT_ESP_MIB)
    }

    /// Checks the layout by itself: each size against its bounds, the disks, RAID level,
    /// volumes, mount points and options (`check`); the first mistake found, by its field.
    pub fn validate(&self) -> Result<(), LayoutError> {
        self.check_sizes()?;
        check::structure(self)
    }

    /// Whether the layout is more than one disk's partitions with an ext4 root: what the
    /// raw-image-like flat install does not cover (several disks, RAID, LVM, another file
    /// system or mount options).
    pub fn is_flat(&self) -> bool {
        self.disks.len() <= 1
            && self.raid.is_none()
            && self.lvm.is_none()
            && self.fs.unwrap_or_default() == Fs::Ext4
            && self.mount_options.is_none()
    }

    /// The root's file system.
    pub fn root_fs(&self) -> Fs {
        match &self.lvm {
            Some(lvm) => lvm
                .volumes
                .iter()
                .find(|v| v.mount == "/")
                .map_or(Fs::Ext4, |v| v.fs),
            None => self.fs.unwrap_or_default(),
        }
    }

    fn check_sizes(&self) -> Result<(), LayoutError> {
        let check = |field, value: Option<u64>, min, max, why| match value {
            Some(v) if v < min => Err(LayoutError::TooSmall {
                field,
                value: v,
                min,
                why,
            }),
            Some(v) if v > max => Err(LayoutError::TooLarge {
                field,
                value: v,
                max,
            }),
            _ => Ok(()),
        };
        check(
            "esp_mib",
            self.esp_mib,
            MIN_ESP_MIB,
            MAX_ESP_MIB,
            "FAT32 needs 65,525 clusters",
        )?;
        check(
            "root_mib",
            self.root_mib,
            MIN_ROOT_MIB,
            MAX_ROOT_MIB,
            "room for the OS to run",
        )
    }
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

    #[test]
    fn defaults_and_sizes() {
        let d = DiskLayout::default();
        assert_eq!(d.esp(), DEFAULT_ESP_MIB);
        assert_eq!(d.validate(), Ok(()));
        let disk = |mib: u64| {
            [DiskSize {
                label: "vda".into(),
                bytes: mib << 20,
            }]
        };
        assert!(d.fit(&disk(2 + 1 + 512 + 1024), 1024).is_ok());
        assert!(d.fit(&disk(2 + 1 + 512 + 1023), 1024).is_err());
        let l = DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(2048),
            ..DiskLayout::default()
        };
        assert_eq!(
            l.fit(&disk(2 + 1 + 256 + 2048), 1024).map(|f| f.root_mib),
            Ok(2048)
        );
        assert!(l.fit(&disk(2 + 1 + 256 + 2047), 1024).is_err());
        let huge = DiskLayout {
            esp_mib: Some(u64::MAX),
            root_mib: Some(u64::MAX),
            ..DiskLayout::default()
        };
        assert!(huge.fit(&disk(1 << 30), 0).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let e = |esp, root| {
            DiskLayout {
                esp_mib: esp,
                root_mib: root,
                ..DiskLayout::default()
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        let m = e(Some(16), None);
        assert!(m.starts_with("layout.esp_mib: 16 MiB is below"), "{m}");
        let m = e(Some(MAX_ESP_MIB + 1), None);
        assert!(
            m.starts_with("layout.esp_mib:") && m.contains("maximum"),
            "{m}"
        );
        let m = e(None, Some(100));
        assert!(m.starts_with("layout.root_mib: 100 MiB"), "{m}");
        let m = e(Some(512), Some(u64::MAX));
        assert!(m.starts_with("layout.root_mib:"), "{m}");
        assert!(
            DiskLayout {
                esp_mib: Some(MIN_ESP_MIB),
                root_mib: Some(MIN_ROOT_MIB),
                ..DiskLayout::default()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn json_is_strict_and_sparse() {
        let l: DiskLayout = serde_json::from_str(r#"{"root_mib": 2048}"#).unwrap();
        assert_eq!(l.esp_mib, None);
        assert_eq!(l.root_mib, Some(2048));
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"root_mib":2048}"#);
        let e = serde_json::from_str::<DiskLayout>(r#"{"esp": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `esp`"), "{e}");
    }
}
