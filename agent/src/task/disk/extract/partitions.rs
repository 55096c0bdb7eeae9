//! The layout's partitions on each disk: a fresh GPT by `sgdisk` ([`stork_proto::layout`]:
//! 1 BIOS boot, 2 ESP, 3 data), the kernel's view re-read and checked against the layout, the
//! first and last MiB of each new partition zeroed, and the ESP's FAT made.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use stork_proto::layout::BIOS_BOOT_MIB;
use stork_proto::{DiskLayout, StepState};

use super::error::ExtractError;
use super::tool::run;
use crate::appliance::ApplianceClient;
use crate::deploy::block::{self, BlockDevice, Partition};
use crate::deploy::stream::Sink;
use crate::step::Step;
use crate::task::{DEV, SYS};

pub(super) const MIB: u64 = 1 << 20;

/// GPT partition numbers of the layout.
pub(super) const BIOS_PART: u32 = 1;
pub const ESP_PART: u32 = 2;
const DATA_PART: u32 = 3;

/// The partitions made on one disk, by kernel name (`vda2`, `nvme0n1p3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub esp: String,
    /// The root, the RAID member or the LVM physical volume.
    pub data: String,
    /// The BIOS boot partition's first byte and length on its disk.
    pub bios: (u64, u64),
}

/// The data partition's GPT type: what it holds, so that tools and people reading the
/// table see it.
pub fn data_type(layout: &DiskLayout) -> &'static str {
    match (layout.raid, &layout.lvm) {
        (Some(_), _) => "FD00",
        (None, Some(_)) => "8E00",
        (None, None) => "8304",
    }
}

/// sgdisk's arguments: a new GPT with the layout's three partitions, MiB-aligned.
pub fn sgdisk_args(disk: &Path, layout: &DiskLayout) -> Vec<OsString> {
    let size = |mib: Option<u64>| match mib {
        Some(m) => format!("+{m}MiB"),
        // 0 as the end: the largest free block, here the rest of the disk.
        None => "0".to_string(),
    };
    let mut args: Vec<OsString> = [
        "--clear".to_string(),
        "--set-alignment=2048".to_string(),
        format!("--new={BIOS_PART}:1MiB:+{BIOS_BOOT_MIB}MiB"),
        format!("--typecode={BIOS_PART}:EF02"),
        format!("--change-name={BIOS_PART}:bios"),
        format!("--new={ESP_PART}:0:{}", size(Some(layout.esp()))),
        format!("--typecode={ESP_PART}:EF00"),
        format!("--change-name={ESP_PART}:esp"),
        format!("--new={DATA_PART}:0:{}", size(layout.root_mib)),
        format!("--typecode={DATA_PART}:{}", data_type(layout)),
        format!("--change-name={DATA_PART}:root"),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(disk.as_os_str().to_owned());
    args
}

/// Checks the kernel's view of the new table against the layout; returns the ESP and root.
pub fn check_partitions(
    disk: &str,
    parts: &[Partition],
    layout: &DiskLayout,
) -> Result<Parts, ExtractError> {
    let want = [
        (BIOS_PART, Some(BIOS_BOOT_MIB)),
        (ESP_PART, Some(layout.esp())),
        (DATA_PART, layout.root_mib),
    ];
    let describe_want = || {
        want.iter()
            .map(|(n, mib)| match mib {
                Some(m) => format!("{n}: {m} MiB"),
                None => format!("{n}: the rest"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = || {
        if parts.is_empty() {
            "no partitions".to_string()
        } else {
            parts
                .iter()
                .map(|p| format!("{}: {} MiB", p.number, p.size_bytes / MIB))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let ok = parts.len() == want.len()
        && want.iter().all(|(n, mib)| {
            parts.iter().any(|p| {
                p.number == *n && mib.is_none_or(|m| p.size_bytes == m * MIB) && p.size_bytes > 0
            })
        });
    let name = |n: u32| parts.iter().find(|p| p.number == n).map(|p| p.name.clone());
    let bios = parts
        .iter()
        .find(|p| p.number == BIOS_PART)
        .map(|p| (p.start_bytes, p.size_bytes));
    match (ok, name(ESP_PART), name(DATA_PART), bios) {
        (true, Some(esp), Some(data), Some(bios)) => Ok(Parts { esp, data, bios }),
        _ => Err(ExtractError::Layout {
            disk: disk.to_string(),
            found: found(),
            want: describe_want(),
        }),
    }
}

pub(super) fn partition(
    client: &ApplianceClient,
    dev: &mut BlockDevice,
    layout: &DiskLayout,
) -> Result<Parts> {
    let name = dev
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let root = layout
        .root_mib
        .map_or_else(|| "the rest".to_string(), |m| format!("{m} MiB"));
    client.step_event(
        Step::Partitions,
        StepState::Started,
        format!(
            "GPT on {name}: BIOS boot {BIOS_BOOT_MIB} MiB, ESP {} MiB, root {root}",
            layout.esp()
        ),
    );
    run(Command::new("sgdisk").args(sgdisk_args(&dev.path, layout)))?;
    // sgdisk asks for a re-read too, but only warns when it fails: ours is checked.
    dev.reread_partitions()?;
    let found = block::partitions(Path::new(SYS), &name);
    let parts = check_partitions(&name, &found, layout)?;
    if !block::wait_for_nodes(Path::new(DEV), &found, Duration::from_secs(10)) {
        return Err(anyhow!("partition device nodes of {name} did not appear"));
    }
    // An earlier layout's file system or RAID member may start or end where a new partition
    // does; mkfs writes its own areas only, and blkid would then find two.
    for p in &found {
        let len = MIB.min(p.size_bytes);
        for offset in [p.start_bytes, p.start_bytes + p.size_bytes - len] {
            dev.zero(offset, len)
                .with_context(|| format!("zeroing {} at byte {offset}", dev.path.display()))?;
        }
    }
    dev.sync()
        .with_context(|| format!("fsync {}", dev.path.display()))?;
    Ok(parts)
}

/// FAT32 on each disk's ESP (GRUB for UEFI goes onto every one).
pub(super) fn make_esps(parts: &[Parts]) -> Result<()> {
    for p in parts {
        run(Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", "ESP"])
            .arg(Path::new(DEV).join(&p.esp)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, mib: u64) -> Partition {
        Partition {
            name: format!("vda{number}"),
            number,
            start_bytes: 0,
            size_bytes: mib * MIB,
            label: None,
        }
    }

    #[test]
    fn sgdisk_gets_the_three_partitions_of_the_layout() {
        let args = |l: DiskLayout| -> Vec<String> {
            sgdisk_args(Path::new("/dev/vda"), &l)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        let fixed = args(DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(2048),
            ..DiskLayout::default()
        });
        assert_eq!(
            fixed,
            [
                "--clear",
                "--set-alignment=2048",
                "--new=1:1MiB:+1MiB",
                "--typecode=1:EF02",
                "--change-name=1:bios",
                "--new=2:0:+256MiB",
                "--typecode=2:EF00",
                "--change-name=2:esp",
                "--new=3:0:+2048MiB",
                "--typecode=3:8304",
                "--change-name=3:root",
                "/dev/vda",
            ]
        );
        let rest = args(DiskLayout::default());
        assert!(rest.contains(&"--new=2:0:+512MiB".to_string()), "{rest:?}");
        assert!(rest.contains(&"--new=3:0:0".to_string()), "{rest:?}");
        let raid = args(DiskLayout {
            raid: Some(1),
            disks: vec!["vda".into(), "vdb".into()],
            ..DiskLayout::default()
        });
        assert!(raid.contains(&"--typecode=3:FD00".to_string()), "{raid:?}");
    }

    #[test]
    fn the_kernels_view_must_match_the_layout() {
        let l = DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(2048),
            ..DiskLayout::default()
        };
        let good = [part(1, 1), part(2, 256), part(3, 2048)];
        assert_eq!(
            check_partitions("vda", &good, &l).unwrap(),
            Parts {
                esp: "vda2".into(),
                data: "vda3".into(),
                bios: (0, MIB)
            }
        );
        let e = check_partitions("vda", &[part(1, 1), part(2, 256), part(3, 1000)], &l)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3: 1000 MiB") && e.contains("3: 2048 MiB"),
            "{e}"
        );
        let e = check_partitions("vda", &[], &l).unwrap_err().to_string();
        assert!(e.contains("no partitions"), "{e}");
        // A root of the rest of the disk: any size.
        let rest = DiskLayout {
            esp_mib: Some(256),
            root_mib: None,
            ..DiskLayout::default()
        };
        assert!(check_partitions("vda", &[part(1, 1), part(2, 256), part(3, 3800)], &rest).is_ok());
        assert!(
            check_partitions(
                "vda",
                &[part(1, 1), part(2, 256), part(3, 3800), part(4, 1)],
                &rest
            )
            .is_err()
        );
    }
}
