//! The disk layout a deploy to disk may ask for, shared by the appliance (which validates the
//! request) and the agent (which partitions by it).
//!
//! Asking for a layout makes the agent install by extracting the image's root tar onto file
//! systems it makes, instead of streaming the raw disk image. The GPT it writes:
//!
//! | # | name | type | size |
//! |---|---|---|---|
//! | 1 | `bios` | BIOS boot (EF02), GRUB's core.img on a GPT disk | [`BIOS_BOOT_MIB`] |
//! | 2 | `esp` | EFI system (EF00), FAT32 | `esp_mib`, default [`DEFAULT_ESP_MIB`] |
//! | 3 | `root` | Linux root x86-64 (8304), ext4 | `root_mib`, default the rest of the disk |
//!
//! The first partition starts at 1 MiB; every partition is MiB-aligned.

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

/// Partition sizes in MiB; absent fields take their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskLayout {
    /// EFI system partition; default [`DEFAULT_ESP_MIB`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(default = 512, minimum = 64, maximum = 16384)
    )]
    pub esp_mib: Option<u64>,
    /// Root partition; default the rest of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1024, maximum = 1073741824))]
    pub root_mib: Option<u64>,
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
}

impl DiskLayout {
    /// The ESP's size, default applied.
    pub fn esp(&self) -> u64 {
        self.esp_mib.unwrap_or(DEFAULT_ESP_MIB)
    }

    /// Checks each size against its bounds; the error names the field.
    pub fn validate(&self) -> Result<(), LayoutError> {
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

    /// The smallest disk that holds the layout, in bytes, counting `root_floor_mib` for a
    /// root that takes the rest of the disk. Saturates rather than overflows (an unvalidated
    /// layout then fits no disk).
    pub fn min_disk_bytes(&self, root_floor_mib: u64) -> u64 {
        let root = self.root_mib.unwrap_or(root_floor_mib);
        GPT_OVERHEAD_MIB
            .saturating_add(BIOS_BOOT_MIB)
            .saturating_add(self.esp())
            .saturating_add(root)
            .saturating_mul(MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_sizes() {
        let d = DiskLayout::default();
        assert_eq!(d.esp(), DEFAULT_ESP_MIB);
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(d.min_disk_bytes(1024), (2 + 1 + 512 + 1024) << 20);
        let l = DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(2048),
        };
        assert_eq!(l.min_disk_bytes(1024), (2 + 1 + 256 + 2048) << 20);
        let huge = DiskLayout {
            esp_mib: Some(u64::MAX),
            root_mib: Some(u64::MAX),
        };
        assert_eq!(huge.min_disk_bytes(0), u64::MAX);
    }

    #[test]
    fn validation_names_the_field() {
        let e = |esp, root| {
            DiskLayout {
                esp_mib: esp,
                root_mib: root,
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
                root_mib: Some(MIN_ROOT_MIB)
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
