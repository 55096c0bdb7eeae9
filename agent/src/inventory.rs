//! Reading the hardware inventory from /proc and /sys.
//!
//! Everything is read relative to a root directory so tests can use a fake tree. Nothing here
//! fails: an unreadable file becomes `None`, an unreadable device is skipped.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeSet;

use stork_proto::inventory::{Cpu, Disk, Dmi, Firmware, Memory, Nic, Partition};
use stork_proto::{Inventory, MacAddr};

use crate::console::{human_bytes, say};
use crate::step::Step;

/// Block devices that are not disks: loop, RAM disks, device-mapper, optical, floppy, md RAID.
const NOT_DISKS: &[&str] = &["loop", "ram", "zram", "dm-", "sr", "fd", "md"];

/// `/sys/block/X/size` counts 512-byte sectors whatever the device's real sector size.
const SECTOR: u64 = 512;

pub fn collect(root: &Path) -> Inventory {
    let proc = root.join("proc");
    let sys = root.join("sys");
    let usable_bytes = mem_total(&proc).unwrap_or(0);
    Inventory {
        cpu: cpu(&proc),
        memory: Memory {
            total_bytes: online_memory(&sys).unwrap_or(usable_bytes),
            usable_bytes,
        },
        disks: disks(&sys),
        nics: nics(&sys),
        dmi: dmi(&sys),
        // The kernel has /sys/firmware/efi only when UEFI booted it (and left it runtime
        // services): the firmware the machine network-boots with.
        firmware: if sys.join("firmware/efi").exists() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        },
        secure_boot: secure_boot(&sys),
        kernel: read_trimmed(&proc.join("sys/kernel/osrelease")).unwrap_or_default(),
    }
}

/// This machine's inventory, its summary shown on the console; for enlisting and
/// commissioning alike.
pub fn collect_and_show() -> Inventory {
    if crate::deploy::efi::is_uefi() {
        // Secure Boot's state is an EFI variable: efivarfs must be there to read it.
        if let Err(e) = crate::deploy::efi::mount_efivars() {
            say!(Step::Inventory, "secure boot state unknown: {e:#}");
        }
    }
    raise_links();
    let inv = collect(Path::new("/"));
    if inv.firmware == Firmware::Uefi && inv.secure_boot.is_none() {
        let var = Path::new("/sys").join(SECURE_BOOT_VAR);
        if let Err(e) = fs::read(&var) {
            say!(
                Step::Inventory,
                "secure boot state unknown: {}: {e}",
                var.display()
            );
        }
    }
    for line in summary_lines(&inv) {
        say!(Step::Inventory, "{line}");
    }
    inv
}

/// How long NICs just set up get to find their carrier.
const LINK_WAIT: Duration = Duration::from_secs(5);

/// Sets every physical NIC that is down up, and waits (at most [`LINK_WAIT`]) for their
/// carriers: a NIC that is down reports neither link state nor speed, and the inventory
/// names the link of every NIC, not only the one the agent booted on. They stay up, with
/// no address.
fn raise_links() {
    let class = Path::new("/sys/class/net");
    let down: Vec<String> = crate::net::interfaces(class)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| n != "lo" && class.join(n).join("device").exists())
        .filter(|n| crate::net::carrier(class, n).is_none())
        .collect();
    if down.is_empty() {
        return;
    }
    let control = match crate::net::Control::new() {
        Ok(c) => c,
        Err(e) => {
            say!(Step::Inventory, "NIC links unknown: {e:#}");
            return;
        }
    };
    let raised: Vec<&String> = down
        .iter()
        .filter(|n| match control.set_up(n) {
            Ok(()) => true,
            Err(e) => {
                say!(Step::Inventory, "{n} stays down: {e:#}");
                false
            }
        })
        .collect();
    let all_linked = || {
        raised
            .iter()
            .all(|n| crate::net::carrier(class, n) == Some(true))
            .then_some(())
    };
    if crate::net::poll_until(LINK_WAIT, Duration::from_millis(100), all_linked).is_none() {
        say!(
            Step::Inventory,
            "not every NIC found a link within {LINK_WAIT:?}"
        );
    }
}

/// The UEFI global variable `SecureBoot` (4 bytes of attributes, then the value), as
/// efivarfs shows it: on when 1. Under BIOS it is off; `None` when UEFI's is unreadable.
const SECURE_BOOT_VAR: &str =
    "firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

fn secure_boot(sys: &Path) -> Option<bool> {
    if !sys.join("firmware").exists() {
        return None;
    }
    if !sys.join("firmware/efi").exists() {
        return Some(false);
    }
    let bytes = fs::read(sys.join(SECURE_BOOT_VAR)).ok()?;
    bytes.get(4).map(|v| *v == 1)
}

/// The file's content without surrounding whitespace; `None` when unreadable or empty.
pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Names of the entries of a directory, sorted; empty when it cannot be read.
fn entry_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn cpu(proc: &Path) -> Cpu {
    let text = fs::read_to_string(proc.join("cpuinfo")).unwrap_or_default();
    let fields = || {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
    };
    let first = |key: &str| {
        fields()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    // One block per logical processor; `physical id` names its package and `core id` its
    // core within the package (x86). Without them the topology is not guessed.
    let mut packages = BTreeSet::new();
    let mut cores = BTreeSet::new();
    for block in text.split("\n\n") {
        let get = |key: &str| {
            block
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim())
        };
        let package = get("physical id");
        if let Some(p) = package {
            packages.insert(p);
        }
        if let Some(c) = get("core id") {
            cores.insert((package.unwrap_or_default(), c));
        }
    }
    let count = |n: usize| (n > 0).then(|| u32::try_from(n).unwrap_or(u32::MAX));
    Cpu {
        model: first("model name").unwrap_or_default(),
        count: fields()
            .filter(|(k, _)| *k == "processor")
            .count()
            .try_into()
            .unwrap_or(u32::MAX),
        vendor: first("vendor_id"),
        sockets: count(packages.len()),
        cores: count(cores.len()),
        // x86 says `flags`, arm64 `Features`.
        flags: first("flags")
            .or_else(|| first("Features"))
            .map(|f| f.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    }
}

/// `MemTotal` in bytes.
fn mem_total(proc: &Path) -> Option<u64> {
    let text = fs::read_to_string(proc.join("meminfo")).ok()?;
    let rest = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Sum of the online memory blocks: the RAM the firmware handed over, before the kernel's
/// reservations. `None` without memory hotplug support in sysfs.
fn online_memory(sys: &Path) -> Option<u64> {
    let dir = sys.join("devices/system/memory");
    let block = read_trimmed(&dir.join("block_size_bytes"))?;
    let block = u64::from_str_radix(block.trim_start_matches("0x"), 16).ok()?;
    let online = entry_names(&dir)
        .into_iter()
        .filter(|n| {
            n.strip_prefix("memory")
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|n| {
            let d = dir.join(n);
            read_trimmed(&d.join("online")).as_deref() == Some("1")
                || read_trimmed(&d.join("state")).as_deref() == Some("online")
        })
        .count() as u64;
    let total = online.checked_mul(block)?;
    (total > 0).then_some(total)
}

pub(crate) fn disks(sys: &Path) -> Vec<Disk> {
    let block = sys.join("block");
    entry_names(&block)
        .into_iter()
        .filter(|n| !NOT_DISKS.iter().any(|p| n.starts_with(p)))
        .filter_map(|name| {
            let dev = block.join(&name);
            let sectors: u64 = read_trimmed(&dev.join("size"))?.parse().ok()?;
            if sectors == 0 {
                return None;
            }
            let flag = |file: &str| match read_trimmed(&dev.join(file)).as_deref() {
                Some("1") => Some(true),
                Some("0") => Some(false),
                _ => None,
            };
            let number = |file: &str| read_trimmed(&dev.join(file))?.parse().ok();
            Some(Disk {
                size_bytes: sectors.saturating_mul(SECTOR),
                model: read_trimmed(&dev.join("device/model")),
                serial: read_trimmed(&dev.join("serial"))
                    .or_else(|| read_trimmed(&dev.join("device/serial")))
                    .or_else(|| vpd_serial(&dev)),
                rotational: flag("queue/rotational"),
                transport: transport(&block, &name).map(str::to_string),
                removable: flag("removable"),
                logical_block_size: number("queue/logical_block_size"),
                physical_block_size: number("queue/physical_block_size"),
                // NVMe namespaces have it on the block device, SCSI disks on the device.
                wwn: read_trimmed(&dev.join("wwid"))
                    .or_else(|| read_trimmed(&dev.join("device/wwid"))),
                partitions: crate::deploy::block::partitions(sys, &name)
                    .into_iter()
                    .map(|p| Partition {
                        name: p.name,
                        number: p.number,
                        start_bytes: p.start_bytes,
                        size_bytes: p.size_bytes,
                        label: p.label,
                    })
                    .collect(),
                path: device_path(&block, &name),
                name,
            })
        })
        .collect()
}

/// The unit serial number from SCSI VPD page 0x80 (`device/vpd_pg80`: a 4-byte header,
/// then as many bytes as it says). libata answers that page for SATA disks, whose sysfs
/// has no `serial` file (udev reads the same page for `ID_SERIAL`).
fn vpd_serial(dev: &Path) -> Option<String> {
    let page = fs::read(dev.join("device/vpd_pg80")).ok()?;
    let (head, rest) = page.split_at_checked(4)?;
    if head[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let text = String::from_utf8_lossy(rest.get(..len)?);
    let serial = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!serial.is_empty()).then(|| serial.to_string())
}

/// Where disk `name` sits: its device's path under `/sys/devices` without the block
/// device itself (`pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0` for
/// `../devices/pci0000:00/.../0:0:0:0/block/sda`).
fn device_path(block: &Path, name: &str) -> Option<String> {
    let link = fs::read_link(block.join(name)).ok()?;
    let link = link.to_string_lossy();
    let (_, under) = link.split_once("devices/")?;
    let dir = under.strip_suffix(name)?.trim_end_matches('/');
    let dir = dir.strip_suffix("/block").unwrap_or(dir);
    (!dir.is_empty()).then(|| dir.to_string())
}

/// How disk `name` is attached, from the kernel's device path (`/sys/block/<name>` links to
/// e.g. `../devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda`), and
/// from its name where the path does not tell (a copied tree has no links).
fn transport(block: &Path, name: &str) -> Option<&'static str> {
    let link = fs::read_link(block.join(name))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let has = |prefix: &str| link.split('/').any(|c| c.starts_with(prefix));
    // Most specific first: a USB stick is also a SCSI disk, a virtio-scsi disk sits under a
    // virtio device but speaks SCSI, and libata (SATA and PATA alike) presents SCSI hosts.
    Some(if has("usb") {
        "usb"
    } else if name.starts_with("nvme") || has("nvme") {
        "nvme"
    } else if name.starts_with("mmcblk") || has("mmc") {
        "mmc"
    } else if has("ata") {
        "sata"
    } else if name.starts_with("vd") {
        "virtio"
    } else if name.starts_with("sd") || has("host") {
        "scsi"
    } else if has("virtio") {
        "virtio"
    } else {
        return None;
    })
}

fn nics(sys: &Path) -> Vec<Nic> {
    let net = sys.join("class/net");
    entry_names(&net)
        .into_iter()
        .filter(|n| n != "lo")
        .filter_map(|name| {
            let dev = net.join(&name);
            // Virtual interfaces (bridges, tunnels, ifb) have no backing device.
            fs::symlink_metadata(dev.join("device")).ok()?;
            let mac: MacAddr = read_trimmed(&dev.join("address"))?.parse().ok()?;
            Some(Nic {
                mac,
                driver: link_name(&dev.join("device/driver")),
                link: read_trimmed(&dev.join("carrier")).map(|c| c == "1"),
                // Unknown speed reads as -1, or fails while the link is down.
                speed_mbps: read_trimmed(&dev.join("speed"))
                    .and_then(|s| s.parse::<i64>().ok())
                    .filter(|s| *s > 0)
                    .and_then(|s| u32::try_from(s).ok()),
                name,
            })
        })
        .collect()
}

/// The last component of a symlink's target, e.g. the driver name from `device/driver`.
fn link_name(link: &Path) -> Option<String> {
    let target: PathBuf = fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

fn dmi(sys: &Path) -> Dmi {
    let id = sys.join("class/dmi/id");
    let get = |f: &str| read_trimmed(&id.join(f));
    Dmi {
        sys_vendor: get("sys_vendor"),
        product_name: get("product_name"),
        product_serial: get("product_serial"),
        product_uuid: get("product_uuid"),
        bios_vendor: get("bios_vendor"),
        bios_version: get("bios_version"),
    }
}

/// Console lines summarising an inventory, one per device.
pub fn summary_lines(inv: &Inventory) -> Vec<String> {
    let topology = match (inv.cpu.sockets, inv.cpu.cores) {
        (Some(s), Some(c)) => format!(" ({s} sockets, {c} cores)"),
        _ => String::new(),
    };
    let mut lines = vec![
        format!(
            "cpu: {} x {}{topology}, {} flags",
            inv.cpu.count,
            or_unknown(Some(&inv.cpu.model)),
            inv.cpu.flags.len()
        ),
        format!(
            "memory: {} MiB total, {} MiB usable",
            inv.memory.total_bytes >> 20,
            inv.memory.usable_bytes >> 20
        ),
    ];
    for d in &inv.disks {
        let kind = match d.rotational {
            Some(true) => "hdd",
            Some(false) => "ssd",
            None => "?",
        };
        lines.push(format!(
            "disk {}: {}, model {}, serial {}, {kind}, {}{}, {} partitions",
            d.name,
            human_bytes(d.size_bytes),
            or_unknown(d.model.as_ref()),
            or_unknown(d.serial.as_ref()),
            or_unknown(d.transport.as_ref()),
            if d.removable == Some(true) {
                " removable"
            } else {
                ""
            },
            d.partitions.len(),
        ));
    }
    for n in &inv.nics {
        let link = match n.link {
            Some(true) => "link up",
            Some(false) => "no link",
            None => "link ?",
        };
        let speed = n
            .speed_mbps
            .map(|s| format!(" {s} Mb/s"))
            .unwrap_or_default();
        lines.push(format!(
            "nic {}: {} driver {}, {link}{speed}",
            n.name,
            n.mac,
            or_unknown(n.driver.as_ref()),
        ));
    }
    lines.push(format!(
        "system: {} {}, firmware {}, kernel {}",
        or_unknown(inv.dmi.sys_vendor.as_ref()),
        or_unknown(inv.dmi.product_name.as_ref()),
        match (inv.firmware, inv.secure_boot) {
            (Firmware::Uefi, Some(true)) => "uefi (secure boot on)",
            (Firmware::Uefi, Some(false)) => "uefi (secure boot off)",
            (Firmware::Uefi, None) => "uefi",
            (Firmware::Bios, _) => "bios",
        },
        or_unknown(Some(&inv.kernel)),
    ));
    lines
}

fn or_unknown(s: Option<&String>) -> &str {
    s.map(String::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Writes `content` at `root/rel`, creating parent directories.
    fn put(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn fake_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        // Two threads of one core of one package.
        put(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\
             physical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu vme sse2 avx2 svm\n\n\
             processor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\
             physical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu vme sse2 avx2 svm\n\n",
        );
        put(
            r,
            "proc/meminfo",
            "MemTotal:         880000 kB\nMemFree:          812345 kB\n",
        );
        put(r, "proc/sys/kernel/osrelease", "6.1.0-9-amd64\n");

        put(r, "sys/devices/system/memory/block_size_bytes", "8000000\n");
        for i in 0..8 {
            let online = if i == 5 { "0\n" } else { "1\n" };
            put(
                r,
                &format!("sys/devices/system/memory/memory{i}/online"),
                online,
            );
        }
        // Not a memory block: must not be counted even though it has an `online` file.
        put(r, "sys/devices/system/memory/memoryX/online", "1\n");

        // /sys/block entries are links into the device tree, which tells the transport.
        let vda = "devices/pci0000:00/0000:00:04.0/virtio1/block/vda";
        fs::create_dir_all(r.join("sys").join(vda)).unwrap();
        fs::create_dir_all(r.join("sys/block")).unwrap();
        symlink(format!("../{vda}"), r.join("sys/block/vda")).unwrap();
        put(r, "sys/block/vda/size", "20971520\n");
        put(r, "sys/block/vda/removable", "0\n");
        put(r, "sys/block/vda/queue/logical_block_size", "512\n");
        put(r, "sys/block/vda/queue/physical_block_size", "4096\n");
        for (n, start, size, label) in [(1, 2048, 2048, "bios"), (2, 4096, 20_965_376, "root")] {
            let dir = format!("sys/block/vda/vda{n}");
            put(r, &format!("{dir}/partition"), &format!("{n}\n"));
            put(r, &format!("{dir}/start"), &format!("{start}\n"));
            put(r, &format!("{dir}/size"), &format!("{size}\n"));
            put(
                r,
                &format!("{dir}/uevent"),
                &format!(
                    "MAJOR=254\nMINOR={n}\nDEVNAME=vda{n}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={label}\n"
                ),
            );
        }
        put(r, "sys/block/vda/serial", "  stork-disk-0 \n");
        put(r, "sys/block/vda/queue/rotational", "1\n");
        put(r, "sys/block/loop0/size", "1024\n");
        put(r, "sys/block/vdb/size", "0\n");

        put(r, "sys/bus/virtio/drivers/virtio_net/bind", "");
        put(r, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        put(r, "sys/class/net/eth0/carrier", "1\n");
        put(r, "sys/class/net/eth0/speed", "-1\n");
        fs::create_dir_all(r.join("sys/class/net/eth0/device")).unwrap();
        symlink(
            r.join("sys/bus/virtio/drivers/virtio_net"),
            r.join("sys/class/net/eth0/device/driver"),
        )
        .unwrap();
        put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        fs::create_dir_all(r.join("sys/class/net/lo/device")).unwrap();
        put(r, "sys/class/net/ifb0/address", "de:ad:be:ef:00:01\n");

        put(r, "sys/class/dmi/id/sys_vendor", "QEMU\n");
        put(
            r,
            "sys/class/dmi/id/product_name",
            "Standard PC (Q35 + ICH9, 2009)\n",
        );
        put(r, "sys/class/dmi/id/product_serial", "\n");
        put(
            r,
            "sys/class/dmi/id/product_uuid",
            "8c1f2a3e-7a44-4d0e-9b1e-0d6f7a8b9c01\n",
        );
        put(r, "sys/class/dmi/id/bios_vendor", "EDK II\n");
        // bios_version deliberately absent.
        fs::create_dir_all(r.join("sys/firmware/efi")).unwrap();
        dir
    }

    #[test]
    fn collects_every_field_from_a_fake_tree() {
        let dir = fake_tree();
        let inv = collect(dir.path());
        let expected = Inventory {
            cpu: Cpu {
                model: "AMD EPYC 7B13".into(),
                count: 2,
                vendor: Some("AuthenticAMD".into()),
                sockets: Some(1),
                cores: Some(1),
                flags: ["fpu", "vme", "sse2", "avx2", "svm"]
                    .map(String::from)
                    .to_vec(),
            },
            memory: Memory {
                total_bytes: 7 * 0x800_0000,
                usable_bytes: 880_000 * 1024,
            },
            disks: vec![Disk {
                name: "vda".into(),
                size_bytes: 20_971_520 * 512,
                model: None,
                serial: Some("stork-disk-0".into()),
                rotational: Some(true),
                transport: Some("virtio".into()),
                removable: Some(false),
                logical_block_size: Some(512),
                physical_block_size: Some(4096),
                wwn: None,
                path: Some("pci0000:00/0000:00:04.0/virtio1".into()),
                partitions: vec![
                    Partition {
                        name: "vda1".into(),
                        number: 1,
                        start_bytes: 2048 * 512,
                        size_bytes: 2048 * 512,
                        label: Some("bios".into()),
                    },
                    Partition {
                        name: "vda2".into(),
                        number: 2,
                        start_bytes: 4096 * 512,
                        size_bytes: 20_965_376 * 512,
                        label: Some("root".into()),
                    },
                ],
            }],
            nics: vec![Nic {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".parse().unwrap(),
                driver: Some("virtio_net".into()),
                link: Some(true),
                speed_mbps: None,
            }],
            dmi: Dmi {
                sys_vendor: Some("QEMU".into()),
                product_name: Some("Standard PC (Q35 + ICH9, 2009)".into()),
                product_serial: None,
                product_uuid: Some("8c1f2a3e-7a44-4d0e-9b1e-0d6f7a8b9c01".into()),
                bios_vendor: Some("EDK II".into()),
                bios_version: None,
            },
            firmware: Firmware::Uefi,
            secure_boot: None,
            kernel: "6.1.0-9-amd64".into(),
        };
        assert_eq!(inv, expected);
        // The SecureBoot variable as efivarfs shows it: attributes, then the value.
        let var = "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";
        fs::create_dir_all(dir.path().join("sys/firmware/efi/efivars")).unwrap();
        fs::write(dir.path().join(var), [6, 0, 0, 0, 1]).unwrap();
        assert_eq!(collect(dir.path()).secure_boot, Some(true));
        fs::write(dir.path().join(var), [6, 0, 0, 0, 0]).unwrap();
        assert_eq!(collect(dir.path()).secure_boot, Some(false));
    }

    #[test]
    fn reads_model_speed_and_state_variants() {
        let dir = fake_tree();
        let r = dir.path();
        put(r, "sys/block/vda/device/model", "QEMU HARDDISK   \n");
        put(r, "sys/block/nvme0n1/size", "2048\n");
        put(r, "sys/block/nvme0n1/device/serial", "NVME-123\n");
        put(r, "sys/block/nvme0n1/queue/rotational", "0\n");
        put(r, "sys/class/net/eth0/speed", "1000\n");
        put(r, "sys/class/net/eth0/carrier", "0\n");
        // Memory blocks that expose `state` instead of `online`.
        for i in 0..8 {
            fs::remove_file(r.join(format!("sys/devices/system/memory/memory{i}/online"))).unwrap();
            put(
                r,
                &format!("sys/devices/system/memory/memory{i}/state"),
                "online\n",
            );
        }
        fs::remove_dir(r.join("sys/firmware/efi")).unwrap();

        let inv = collect(r);
        assert_eq!(inv.memory.total_bytes, 8 * 0x800_0000);
        let names: Vec<_> = inv.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "vda"]);
        assert_eq!(inv.disks[0].serial.as_deref(), Some("NVME-123"));
        assert_eq!(inv.disks[0].rotational, Some(false));
        assert_eq!(inv.disks[1].model.as_deref(), Some("QEMU HARDDISK"));
        assert_eq!(inv.nics[0].speed_mbps, Some(1000));
        assert_eq!(inv.nics[0].link, Some(false));
        assert_eq!(inv.firmware, Firmware::Bios);
        assert_eq!(inv.secure_boot, Some(false));
    }

    /// A link from /sys/block into the device tree, as the kernel makes it.
    fn block_link(r: &Path, name: &str, device_path: &str) {
        let target = format!("devices/{device_path}/block/{name}");
        fs::create_dir_all(r.join("sys").join(&target)).unwrap();
        symlink(format!("../{target}"), r.join("sys/block").join(name)).unwrap();
        put(r, &format!("sys/block/{name}/size"), "2048\n");
    }

    #[test]
    fn disk_transports_identifiers_and_removable_media() {
        let dir = fake_tree();
        let r = dir.path();
        block_link(
            r,
            "sda",
            "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
        );
        put(r, "sys/block/sda/device/wwid", "naa.5000c500a1b2c3d4\n");
        // A SATA disk's serial only in VPD page 0x80 (libata's), blank-padded as ATA does.
        let mut page = vec![0, 0x80, 0, 20];
        page.extend_from_slice(b"        STORK-SATA-1");
        fs::write(r.join("sys/block/sda/device/vpd_pg80"), page).unwrap();
        block_link(
            r,
            "sdb",
            "pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0",
        );
        put(r, "sys/block/sdb/removable", "1\n");
        block_link(
            r,
            "sdc",
            "pci0000:00/0000:00:05.0/virtio2/host2/target2:0:0/2:0:0:0",
        );
        block_link(r, "nvme0n1", "pci0000:00/0000:00:06.0/nvme/nvme0");
        put(r, "sys/block/nvme0n1/wwid", "eui.0025388b71b2c3d4\n");
        put(r, "sys/block/nvme0n1/queue/logical_block_size", "4096\n");
        // No link (a copied tree): the name still tells a virtio disk; nothing else guesses.
        put(r, "sys/block/vdz/size", "2048\n");
        put(r, "sys/block/xvda/size", "2048\n");

        let inv = collect(r);
        let by_name = |n: &str| inv.disks.iter().find(|d| d.name == n).unwrap();
        let transport = |n: &str| by_name(n).transport.clone();
        assert_eq!(transport("sda").as_deref(), Some("sata"));
        assert_eq!(transport("sdb").as_deref(), Some("usb"));
        assert_eq!(transport("sdc").as_deref(), Some("scsi"));
        assert_eq!(transport("nvme0n1").as_deref(), Some("nvme"));
        assert_eq!(transport("vdz").as_deref(), Some("virtio"));
        assert_eq!(transport("xvda"), None);
        assert_eq!(by_name("sda").wwn.as_deref(), Some("naa.5000c500a1b2c3d4"));
        assert_eq!(by_name("sda").serial.as_deref(), Some("STORK-SATA-1"));
        assert_eq!(
            by_name("sda").path.as_deref(),
            Some("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0")
        );
        assert_eq!(
            by_name("nvme0n1").path.as_deref(),
            Some("pci0000:00/0000:00:06.0/nvme/nvme0")
        );
        assert_eq!(by_name("vdz").path, None);
        assert_eq!(
            by_name("nvme0n1").wwn.as_deref(),
            Some("eui.0025388b71b2c3d4")
        );
        assert_eq!(by_name("nvme0n1").logical_block_size, Some(4096));
        assert_eq!(by_name("sdb").removable, Some(true));
        assert_eq!(by_name("sda").removable, None);
        assert!(by_name("sda").partitions.is_empty());
    }

    #[test]
    fn cpu_topology_counts_packages_and_cores() {
        let dir = tempfile::tempdir().unwrap();
        // Two packages of two cores of two threads; arm64-style `Features` has no topology.
        let mut text = String::new();
        for n in 0..8 {
            text.push_str(&format!(
                "processor\t: {n}\nphysical id\t: {}\ncore id\t\t: {}\nflags\t\t: lm vmx\n\n",
                n / 4,
                (n / 2) % 2
            ));
        }
        put(dir.path(), "proc/cpuinfo", &text);
        let cpu = collect(dir.path()).cpu;
        assert_eq!(
            (cpu.count, cpu.sockets, cpu.cores, cpu.flags.len()),
            (8, Some(2), Some(4), 2)
        );

        put(
            dir.path(),
            "proc/cpuinfo",
            "processor\t: 0\nFeatures\t: fp asimd aes\n\nprocessor\t: 1\nFeatures\t: fp asimd aes\n",
        );
        let cpu = collect(dir.path()).cpu;
        assert_eq!((cpu.count, cpu.sockets, cpu.cores), (2, None, None));
        assert_eq!(cpu.flags, ["fp", "asimd", "aes"]);
    }

    #[test]
    fn missing_tree_yields_empty_inventory_and_memory_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(collect(dir.path()), Inventory::default());

        put(dir.path(), "proc/meminfo", "MemTotal: 2048 kB\n");
        let inv = collect(dir.path());
        assert_eq!(inv.memory.total_bytes, 2048 * 1024);
        assert_eq!(inv.memory.usable_bytes, 2048 * 1024);
    }

    #[test]
    fn summary_has_one_line_per_device() {
        let inv = collect(fake_tree().path());
        let lines = summary_lines(&inv);
        assert_eq!(
            lines,
            [
                "cpu: 2 x AMD EPYC 7B13 (1 sockets, 1 cores), 5 flags",
                "memory: 896 MiB total, 859 MiB usable",
                "disk vda: 10.0 GiB, model ?, serial stork-disk-0, hdd, virtio, 2 partitions",
                "nic eth0: 52:54:00:12:34:56 driver virtio_net, link up",
                "system: QEMU Standard PC (Q35 + ICH9, 2009), firmware uefi, kernel 6.1.0-9-amd64",
            ]
        );
    }
}
