//! The appliance disk's partitions. Numbers are fixed: GRUB's script and the upgrade find the
//! partitions by number on the disk GRUB itself was loaded from, so a second disk with a Stork
//! image (a stick being prepared, say) is never mistaken for this one.
//!
//! | # | name | type | size | content |
//! |---|---|---|---|---|
//! | 1 | `stork-bios` | BIOS boot | 1 MiB | GRUB core.img (i386-pc) |
//! | 2 | `stork-esp` | EFI system | 64 MiB | FAT32: `EFI/BOOT/BOOTX64.EFI`, `grub/` (modules, A/B script, grubenv) |
//! | 3 | `stork-config` | Microsoft basic data | 32 MiB | FAT, label `STORK`: `stork.toml` a person edits on any laptop |
//! | 4 | `stork-system-a` | Linux root x86-64 | `system_mib` | read-only ext4: the system |
//! | 5 | `stork-system-b` | Linux root x86-64 | `system_mib` | the other system: empty until an upgrade |
//! | 6 | `stork-data` | Linux data | 256 MiB, grown to the disk at first boot | ext4: `DATA_DIR` |
//!
//! The data partition is last so that it can grow; the systems are the same size so that any
//! image's system fits either slot.

use crate::disk::DiskError;
use crate::gpt::{Gpt, Guid, Partition, SECTOR};

pub const MIB: u64 = 1024 * 1024;
const SECTORS_PER_MIB: u64 = MIB / SECTOR;

pub const BIOS: u32 = 1;
pub const ESP: u32 = 2;
pub const CONFIG: u32 = 3;
pub const SYSTEM_A: u32 = 4;
pub const SYSTEM_B: u32 = 5;
pub const DATA: u32 = 6;

pub const ESP_MIB: u64 = 64;
pub const CONFIG_MIB: u64 = 32;
pub const DATA_MIB: u64 = 256;

/// GPT partition names, by number - 1.
pub const NAMES: [&str; 6] = [
    "stork-bios",
    "stork-esp",
    "stork-config",
    "stork-system-a",
    "stork-system-b",
    "stork-data",
];

/// Microsoft basic data: the type laptops mount without asking (an ESP they hide).
pub const BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
/// Linux file system data: systemd's gpt-auto generator leaves it alone.
pub const LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Partition extents in 512-byte sectors (inclusive), index = number - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub sectors: u64,
    pub parts: [(u64, u64); 6],
}

impl Layout {
    pub fn new(system_mib: u64) -> Self {
        let sizes = [1, ESP_MIB, CONFIG_MIB, system_mib, system_mib, DATA_MIB];
        let mut parts = [(0, 0); 6];
        // 1 MiB in for the primary GPT; 1 MiB at the end for the backup.
        let mut next = SECTORS_PER_MIB;
        for (p, mib) in parts.iter_mut().zip(sizes) {
            *p = (next, next + mib * SECTORS_PER_MIB - 1);
            next += mib * SECTORS_PER_MIB;
        }
        Self {
            sectors: next + SECTORS_PER_MIB,
            parts,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// First byte and length of partition `number`.
    pub fn extent(&self, number: u32) -> (u64, u64) {
        let (first, last) = self.parts[number as usize - 1];
        (first * SECTOR, (last - first + 1) * SECTOR)
    }

    /// The partition table; `guid(label)` gives the GUIDs (derived from the build's key).
    pub fn gpt(&self, guid: impl Fn(&str) -> Guid) -> Result<Gpt, DiskError> {
        let types = [
            Guid::BIOS_BOOT,
            Guid::ESP,
            BASIC_DATA,
            Guid::LINUX_ROOT_X86_64,
            Guid::LINUX_ROOT_X86_64,
            LINUX_DATA,
        ];
        let mut partitions = Vec::with_capacity(6);
        for ((name, ty), (first, last)) in NAMES.iter().zip(types).zip(self.parts) {
            partitions.push(Partition {
                type_guid: Guid::parse(ty).map_err(DiskError::Gpt)?,
                guid: guid(name),
                first_lba: first,
                last_lba: last,
                attributes: 0,
                name: (*name).to_owned(),
            });
        }
        Ok(Gpt {
            disk_guid: guid("disk"),
            sectors: self.sectors,
            partitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_each_other_aligned_with_data_last() {
        let l = Layout::new(2048);
        assert_eq!(l.parts[0], (2048, 4095));
        for w in l.parts.windows(2) {
            assert_eq!(w[0].1 + 1, w[1].0);
        }
        for (first, last) in l.parts {
            assert_eq!(first % SECTORS_PER_MIB, 0);
            assert_eq!((last + 1) % SECTORS_PER_MIB, 0);
        }
        let (_, a) = l.extent(SYSTEM_A);
        let (_, b) = l.extent(SYSTEM_B);
        assert_eq!(a, 2048 * MIB);
        assert_eq!(a, b);
        assert_eq!(l.extent(DATA).1, DATA_MIB * MIB);
        assert_eq!(
            l.bytes(),
            (1 + 1 + ESP_MIB + CONFIG_MIB + 2 * 2048 + DATA_MIB + 1) * MIB
        );
        let table = l
            .gpt(|label| Guid::from_big_endian([label.len() as u8; 16]))
            .unwrap();
        assert_eq!(table.partitions[DATA as usize - 1].name, "stork-data");
        assert!(table.partitions[5].last_lba <= table.last_usable());
    }
}
