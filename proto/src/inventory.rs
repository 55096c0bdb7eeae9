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
    /// Where the disk sits: its device's path under `/sys/devices` (controller, port,
    /// target), the same for whatever disk is put in that slot.
    #[serde(default)]
    pub path: Option<String>,
}

impl Disk {
    /// Whether `req` names this disk as people do: its kernel name or `/dev/` path, its
    /// serial, WWN, model or device path (exactly; surrounding blanks ignored).
    pub fn named_by(&self, req: &str) -> bool {
        let req = req.trim();
        let is = |v: &Option<String>| v.as_deref().is_some_and(|v| v.trim() == req);
        self.name == req.strip_prefix("/dev/").unwrap_or(req)
            || is(&self.serial)
            || is(&self.wwn)
            || is(&self.model)
            || is(&self.path)
    }

    /// How the disk is named in messages: `sda (serial X, model Y)`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s}"));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model {m}"));
        }
        if parts.is_empty() {
            self.name.clone()
        } else {
            format!("{} ({})", self.name, parts.join(", "))
        }
    }
}

/// Why no disk could be chosen ([`choose_disk`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("no disk found (is the storage driver in the initrd?)")]
    NoDisks,
    #[error(
        "no disk is named {requested:?} (by name, serial, WWN, model or path); present: {present}"
    )]
    NotFound { requested: String, present: String },
    #[error("{requested:?} names several disks ({matches}): name one by its serial or kernel name")]
    Ambiguous { requested: String, matches: String },
    #[error("{disk} holds {size} bytes, the image needs {need}")]
    TooSmall { disk: String, size: u64, need: u64 },
    #[error("no disk holds {need} bytes (largest: {largest} bytes)")]
    NoneLargeEnough { need: u64, largest: u64 },
}

/// The disk to deploy to: the one `requested` names ([`Disk::named_by`]: exactly one
/// must), else the smallest that holds `need` bytes, else (size unknown) the first by
/// name. The agent decides with this at deploy time, the appliance checks a request with
/// it against the last inventory.
pub fn choose_disk<'a>(
    disks: &'a [Disk],
    requested: Option<&str>,
    need: Option<u64>,
) -> Result<&'a Disk, ChooseError> {
    if disks.is_empty() {
        return Err(ChooseError::NoDisks);
    }
    let list =
        |ds: &mut dyn Iterator<Item = &Disk>| ds.map(Disk::label).collect::<Vec<_>>().join(", ");
    if let Some(req) = requested.map(str::trim).filter(|r| !r.is_empty()) {
        let named: Vec<&Disk> = disks.iter().filter(|d| d.named_by(req)).collect();
        let disk = match named[..] {
            [one] => one,
            [] => {
                return Err(ChooseError::NotFound {
                    requested: req.to_string(),
                    present: list(&mut disks.iter()),
                });
            }
            _ => {
                return Err(ChooseError::Ambiguous {
                    requested: req.to_string(),
                    matches: list(&mut named.into_iter()),
                });
            }
        };
        if let Some(need) = need
            && disk.size_bytes < need
        {
            return Err(ChooseError::TooSmall {
                disk: disk.label(),
                size: disk.size_bytes,
                need,
            });
        }
        return Ok(disk);
    }
    let mut sorted: Vec<&Disk> = disks.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    match need {
        None => Ok(sorted[0]),
        Some(need) => sorted
            .iter()
            .filter(|d| d.size_bytes >= need)
            .min_by_key(|d| d.size_bytes)
            .copied()
            .ok_or(ChooseError::NoneLargeEnough {
                need,
                largest: disks.iter().map(|d| d.size_bytes).max().unwrap_or(0),
            }),
    }
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

    fn disk(name: &str, gib: u64, serial: &str, model: &str) -> Disk {
        Disk {
            name: name.into(),
            size_bytes: gib << 30,
            model: Some(model.into()),
            serial: Some(serial.into()),
            ..Disk::default()
        }
    }

    #[test]
    fn chooses_the_disk_named_or_the_smallest_that_fits() {
        let mut disks = [
            disk("vdb", 8, "B", "virtio"),
            disk("nvme0n1", 4, "N", "QEMU NVMe Ctrl"),
            disk("sda", 2, "QM00001", "QEMU HARDDISK"),
        ];
        disks[0].wwn = Some("naa.5000c500a1b2c3d4".into());
        disks[2].path = Some("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0".into());
        let pick = |req, need| choose_disk(&disks, req, need).map(|d| d.name.as_str());
        // By kernel name, /dev/ path, serial, model, WWN and device path alike.
        assert_eq!(pick(Some("vdb"), None), Ok("vdb"));
        assert_eq!(pick(Some("/dev/vdb"), None), Ok("vdb"));
        assert_eq!(pick(Some(" QM00001 "), None), Ok("sda"));
        assert_eq!(pick(Some("QEMU NVMe Ctrl"), None), Ok("nvme0n1"));
        assert_eq!(pick(Some("naa.5000c500a1b2c3d4"), None), Ok("vdb"));
        assert_eq!(
            pick(
                Some("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0"),
                None
            ),
            Ok("sda")
        );
        // Not named: the smallest that holds the image; size unknown: the first by name.
        assert_eq!(pick(None, Some(3 << 30)), Ok("nvme0n1"));
        assert_eq!(pick(None, Some(1 << 30)), Ok("sda"));
        assert_eq!(pick(None, None), Ok("nvme0n1"));
        let e = pick(Some("nvme1n1"), None).unwrap_err().to_string();
        assert!(
            e.contains("nvme1n1") && e.contains("sda (serial QM00001, model QEMU HARDDISK)"),
            "{e}"
        );
        assert!(matches!(
            pick(None, Some(9 << 30)),
            Err(ChooseError::NoneLargeEnough { .. })
        ));
        assert!(matches!(
            pick(Some("sda"), Some(3 << 30)),
            Err(ChooseError::TooSmall { .. })
        ));
        assert_eq!(choose_disk(&[], None, None), Err(ChooseError::NoDisks));
        // A model two disks share names neither.
        disks[0].model = Some("QEMU HARDDISK".into());
        let e = choose_disk(&disks, Some("QEMU HARDDISK"), None).unwrap_err();
        assert!(matches!(e, ChooseError::Ambiguous { .. }), "{e}");
        assert!(e.to_string().contains("vdb") && e.to_string().contains("sda"));
    }

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
