//! The hardware inventory an agent reports.
//!
//! Inventories are stored as JSON with the machine: a field added later carries
//! `#[serde(default)]`, so every inventory stored before it still reads.

use serde::{Deserialize, Serialize};

use crate::MacAddr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Inventory {
    pub cpu: Cpu,
    pub memory: Memory,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub dmi: Dmi,
    pub firmware: Firmware,
    /// Whether UEFI Secure Boot was on (the firmware's `SecureBoot` variable); `None` where
    /// that could not be read, `Some(false)` under BIOS.
    #[serde(default)]
    pub secure_boot: Option<bool>,
    /// `uname -r` of the kernel the agent runs on.
    pub kernel: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cpu {
    pub model: String,
    /// Logical processors (hardware threads).
    pub count: u32,
    /// `vendor_id` from /proc/cpuinfo, e.g. `GenuineIntel`, `AuthenticAMD`.
    #[serde(default)]
    pub vendor: Option<String>,
    /// Physical packages; `None` when /proc/cpuinfo does not say (no `physical id`).
    #[serde(default)]
    pub sockets: Option<u32>,
    /// Physical cores in all sockets; `None` when /proc/cpuinfo does not say (no `core id`).
    #[serde(default)]
    pub cores: Option<u32>,
    /// Feature flags of the first processor as the kernel lists them (x86 `flags`, arm64
    /// `Features`), e.g. `vmx`, `avx2`, `aes`.
    #[serde(default)]
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Memory {
    /// Physical memory the firmware handed to the OS (sum of online memory blocks).
    pub total_bytes: u64,
    /// `MemTotal` from /proc/meminfo: what is left after the kernel's own reservations.
    pub usable_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Disk {
    /// Kernel name, e.g. `vda`, `sda`, `nvme0n1`.
    pub name: String,
    pub size_bytes: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub rotational: Option<bool>,
    /// How the disk is attached: `virtio`, `nvme`, `sata`, `scsi`, `usb` or `mmc`; `None`
    /// when the kernel's device path does not tell.
    #[serde(default)]
    pub transport: Option<String>,
    /// Removable media (a USB stick, an SD card).
    #[serde(default)]
    pub removable: Option<bool>,
    /// Bytes per logical block: the unit of addressing (512 or 4096).
    #[serde(default)]
    pub logical_block_size: Option<u32>,
    /// Bytes per physical block: the unit of the medium's writes (a 512e disk says 4096).
    #[serde(default)]
    pub physical_block_size: Option<u32>,
    /// World-wide identifier as the kernel reports it (`wwid`: `naa.`, `eui.`, `t10.`...);
    /// `None` when the device has none (virtio).
    #[serde(default)]
    pub wwn: Option<String>,
    /// Partitions as the kernel sees them, by number.
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

/// A partition, from sysfs. Its type GUID and file system label are not in sysfs (reading
/// them means reading the disk, as blkid does), so they are not reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Partition {
    /// Kernel name, e.g. `vda1`, `nvme0n1p2`.
    pub name: String,
    /// 1-based number in the partition table.
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// The GPT partition name, when it has one.
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Nic {
    pub name: String,
    pub mac: MacAddr,
    pub driver: Option<String>,
    /// Carrier detected.
    pub link: Option<bool>,
    /// `/sys/class/net/<nic>/speed`; `None` when the kernel reports -1 (unknown: virtio,
    /// some drivers) or the link is down.
    pub speed_mbps: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Dmi {
    pub sys_vendor: Option<String>,
    pub product_name: Option<String>,
    pub product_serial: Option<String>,
    pub product_uuid: Option<String>,
    pub bios_vendor: Option<String>,
    pub bios_version: Option<String>,
}

/// How the machine booted the agent: UEFI when the kernel has `/sys/firmware/efi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inventory as stored before topology, CPU flags and partitions were reported.
    const STORED_BEFORE_TOPOLOGY: &str = r#"{
        "cpu": {"model": "QEMU Virtual CPU", "count": 2},
        "memory": {"total_bytes": 2147483648, "usable_bytes": 2080374784},
        "disks": [{"name": "vda", "size_bytes": 10737418240, "model": null, "serial": "d1",
                   "rotational": false}],
        "nics": [{"name": "ens3", "mac": "52:54:00:12:34:56", "driver": "virtio_net",
                  "link": true, "speed_mbps": null}],
        "dmi": {"sys_vendor": "QEMU", "product_name": null, "product_serial": null,
                "product_uuid": null, "bios_vendor": null, "bios_version": null},
        "firmware": "bios",
        "kernel": "6.1.0-9-amd64"
    }"#;

    #[test]
    fn inventories_stored_before_new_fields_still_read() {
        let inv: Inventory = serde_json::from_str(STORED_BEFORE_TOPOLOGY).unwrap();
        assert_eq!(inv.cpu.count, 2);
        assert!(inv.cpu.flags.is_empty());
        assert_eq!(inv.cpu.sockets, None);
        let d = &inv.disks[0];
        assert_eq!((d.transport.as_deref(), d.partitions.len()), (None, 0));
        // And what is written now reads back the same.
        let again: Inventory = serde_json::from_str(&serde_json::to_string(&inv).unwrap()).unwrap();
        assert_eq!(again, inv);
    }
}
