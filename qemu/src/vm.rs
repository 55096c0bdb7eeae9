//! QEMU virtual machines on the lab bridge.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::Lab;
use crate::process::{Spawned, tail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS; the NIC's iPXE option ROM does the network boot.
    Bios,
    /// OVMF; with `nic_rom: false` the NIC's iPXE ROM is disabled so EDK2's own PXE boots
    /// over TFTP (OVMF has no e1000 driver: the NIC is virtio).
    Uefi { nic_rom: bool },
    /// OVMF with no NIC ROM and its PXE off (`IPv4PXESupport=n`): UEFI HTTP boot is the
    /// only network boot it has, as on a server whose PXE and TFTP are disabled.
    UefiHttp,
    /// OVMF with Secure Boot enforced: Debian's `OVMF_CODE_4M.secboot.fd` (SMM, so the
    /// variable store is writable only by the firmware) with Microsoft's keys enrolled
    /// (`OVMF_VARS_4M.ms.fd`), no NIC ROM (iPXE is not signed): firmware PXE runs only what
    /// Microsoft's or a shim's trusted keys signed.
    UefiSecureBoot,
    /// OVMF with no NIC ROM and its IPv4 PXE off: PXEv6 is its first network boot, as on a
    /// server on an IPv6-only provisioning network.
    UefiIpv6,
    /// OVMF with no NIC ROM and both PXEs off: UEFI HTTP boot only. Its HTTPv4 attempt comes
    /// first and times out (about 60 s) on an IPv6-only network, then HTTPv6 boots. Without
    /// that wait EDK2 (2022.11 to 2025.02) fails HTTPv6 at once: `HttpBootDhcp6Sarr` starts
    /// DHCPv6 while its link-local address is still tentative and does not retry on
    /// `EFI_NO_MAPPING` (docs/measurements.md).
    UefiHttpIpv6,
}

impl Firmware {
    /// Whether OVMF runs its IPv6 network boot (and not its IPv4 one).
    pub fn ipv6(self) -> bool {
        matches!(self, Self::UefiIpv6 | Self::UefiHttpIpv6)
    }

    /// The variable store a new machine of this firmware starts from (Debian's `ovmf`).
    pub fn vars_template(self) -> &'static str {
        match self {
            Self::UefiSecureBoot => OVMF_VARS_MS_TEMPLATE,
            _ => OVMF_VARS_TEMPLATE,
        }
    }

    /// OVMF's code: with Secure Boot, the build that enforces it.
    fn ovmf_code(self) -> &'static str {
        match self {
            Self::UefiSecureBoot => "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
            _ => "/usr/share/OVMF/OVMF_CODE_4M.fd",
        }
    }
}

/// What a guest's reboot does to its QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestReboot {
    /// QEMU exits (`-no-reboot`), as if the machine powered off: whoever powers it on
    /// again decides how it boots ([`Vm::restart`], manual power).
    Exit,
    /// The VM resets in place and boots again in its boot order, as real hardware does:
    /// for VMs a lab BMC powers (`bmc::Chassis::Qemu`). A guest power-off still exits QEMU,
    /// which the BMC reports as chassis off.
    Reset,
}

/// How the VM's disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-blk-pci`: the guest's `vda`.
    Virtio,
    /// QEMU's NVMe controller with one namespace: the guest's `nvme0n1`. It implements
    /// Format NVM (a secure erase that zeroes the namespace), which SeaBIOS and OVMF boot from.
    Nvme,
    /// A removable USB stick (`usb-storage`) on a `qemu-xhci` controller: the guest's `sdX`.
    /// SeaBIOS and OVMF boot from it, as an appliance boots from its USB stick.
    Usb,
    /// A SATA disk (`ide-hd`, model `QEMU HARDDISK`) on an AHCI controller of its own: the
    /// guest's `sdX`, its serial only in SCSI VPD page 0x80 (libata's), not in sysfs.
    Sata,
}

/// A blank disk a machine has besides its first ([`VmSpec::extra_disks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraDisk {
    pub bus: DiskBus,
    pub bytes: u64,
    pub serial: String,
    /// A bad disk: every read that touches this byte fails with EIO (QEMU's `blkdebug`
    /// driver), writes and other reads work. A hardware test must find it.
    pub unreadable_at: Option<u64>,
}

/// What a VM's provisioning NIC ([`NIC_ID`], netdev `n0`) is plugged into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A tap on the root lab's bridge.
    Tap(String),
    /// The unix socket of a userspace switch ([`crate::switch::Switch`]): QEMU connects as
    /// a client and sends each frame with a 4-byte length before it. Needs no root.
    Stream(PathBuf),
}

impl NicBackend {
    /// The `-netdev` value of the provisioning NIC's backend (`n0`).
    pub fn netdev(&self) -> String {
        self.netdev_with_id("n0")
    }

    /// The `-netdev` value under the netdev id `id`.
    pub fn netdev_with_id(&self, id: &str) -> String {
        match self {
            Self::Tap(tap) => format!("tap,id={id},ifname={tap},script=no,downscript=no"),
            Self::Stream(sock) => format!(
                "stream,id={id},server=off,addr.type=unix,addr.path={}",
                opt_path(sock)
            ),
        }
    }
}

/// One disk on a machine's command line: drive `d<n>` and device [`disk_id`]`(n)` for the
/// n-th disk, so the first one is [`DISK_ID`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDisk {
    /// A raw image.
    pub file: PathBuf,
    pub bus: DiskBus,
    pub serial: String,
    /// Writes go to a temporary overlay that QEMU discards: the file itself never changes.
    pub snapshot: bool,
    /// A `blkdebug` rules file that fails the reads [`ExtraDisk::unreadable_at`] names.
    pub faults: Option<PathBuf>,
}

/// A path inside a QEMU option value: a comma is written twice, or QEMU would take it for
/// the next option.
pub(crate) fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub mac: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_bytes: u64,
    pub disk_serial: String,
    pub disk_bus: DiskBus,
    pub firmware: Firmware,
    /// Keep an existing `disk.raw` (and, under OVMF, its `OVMF_VARS.fd`) instead of
    /// creating fresh ones: a power cycle of the same machine (see [`Vm::restart`]).
    pub keep_disk: bool,
    pub guest_reboot: GuestReboot,
    /// Disks after the first, blank (`disk<n>.raw` beside `disk.raw`).
    pub extra_disks: Vec<ExtraDisk>,
    /// NICs after the provisioning one, by MAC, each on a tap of its own on the lab bridge
    /// (`nic1`, ...), without a boot ROM: the machine boots from its first NIC only.
    pub extra_nics: Vec<String>,
}

impl VmSpec {
    pub fn new(name: &str, mac: &str) -> Self {
        Self {
            name: name.to_string(),
            mac: mac.to_string(),
            memory_mib: 1024,
            cpus: 2,
            disk_bytes: 4 << 30,
            disk_serial: format!("STORK-{name}"),
            disk_bus: DiskBus::Virtio,
            firmware: Firmware::Bios,
            keep_disk: false,
            guest_reboot: GuestReboot::Exit,
            extra_disks: Vec::new(),
            extra_nics: Vec::new(),
        }
    }
}

pub struct Vm {
    pub spec: VmSpec,
    pub console: PathBuf,
    pub disk: PathBuf,
    pub qmp: PathBuf,
    process: Option<Spawned>,
}

/// Device ids in [`qemu_argv`]'s command line, so a boot order can be chosen after the
/// fact: `-set device.nic0.bootindex=1` boots from the network first.
pub const NIC_ID: &str = "nic0";
pub const DISK_ID: &str = "disk0";

/// The device id of a machine's `n`-th disk ([`DISK_ID`] for the first).
pub fn disk_id(n: usize) -> String {
    format!("disk{n}")
}

/// Where a VM's files are.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub console: PathBuf,
    pub qmp: PathBuf,
}

/// Creates the VM's directory, blank disk (and OVMF variable store) and tap, and returns its
/// QEMU command line (program first) with no boot order: append [`boot_order`]'s arguments.
/// [`Vm::start`] runs it; a lab BMC (`bmc::IpmiSim`) runs it on every power-on instead, so
/// what the machine keeps across power cycles (its disk, its OVMF variables) is made here,
/// once. The serial console is appended to, so it holds every boot of the machine. TCG: KVM
/// hangs on this kind of machine; set `STORK_KVM=1` to opt in.
pub fn qemu_argv(lab: &mut Lab, spec: &VmSpec) -> Result<(Vec<String>, VmPaths)> {
    let dir = lab.dir().join(&spec.name);
    let (disk, vars) = machine_files(&dir, spec, Path::new(spec.firmware.vars_template()))?;
    let console = dir.join("console.log");
    let qmp = dir.join("qmp.sock");
    let tap = lab.add_tap()?;
    let mut disks = vec![AttachedDisk {
        file: disk.clone(),
        bus: spec.disk_bus,
        serial: spec.disk_serial.clone(),
        snapshot: false,
        faults: None,
    }];
    for (n, extra) in spec.extra_disks.iter().enumerate() {
        let file = dir.join(format!("disk{}.raw", n + 1));
        blank_disk(&file, extra.bytes, spec.keep_disk)?;
        let faults = match extra.unreadable_at {
            Some(at) => {
                let rules = dir.join(format!("disk{}.blkdebug", n + 1));
                std::fs::write(
                    &rules,
                    format!(
                        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"{}\"\nonce = \"off\"\n",
                        at / 512
                    ),
                )
                .with_context(|| format!("writing {}", rules.display()))?;
                Some(rules)
            }
            None => None,
        };
        disks.push(AttachedDisk {
            file,
            bus: extra.bus,
            serial: extra.serial.clone(),
            snapshot: false,
            faults,
        });
    }
    let mut extra_nics = Vec::with_capacity(spec.extra_nics.len());
    for mac in &spec.extra_nics {
        extra_nics.push((NicBackend::Tap(lab.add_tap()?), mac.clone()));
    }
    let argv = machine_command(&MachineArgs {
        name: &spec.name,
        mac: &spec.mac,
        memory_mib: spec.memory_mib,
        cpus: spec.cpus,
        firmware: spec.firmware,
        guest_reboot: spec.guest_reboot,
        console: &console,
        qmp: &qmp,
        vars: vars.as_deref(),
        nic: &NicBackend::Tap(tap),
        extra_nics: &extra_nics,
        disks: &disks,
    })?;
    Ok((
        argv,
        VmPaths {
            dir,
            disk,
            console,
            qmp,
        },
    ))
}

/// What a machine's command line is made of, in both labs: the root lab's (a tap, one blank
/// disk) and the rootless one's (a switch socket, any disks).
pub(crate) struct MachineArgs<'a> {
    pub name: &'a str,
    /// The provisioning NIC's MAC.
    pub mac: &'a str,
    pub memory_mib: u32,
    pub cpus: u32,
    pub firmware: Firmware,
    pub guest_reboot: GuestReboot,
    pub console: &'a Path,
    pub qmp: &'a Path,
    /// The machine's OVMF variable store; required under [`Firmware::Uefi`].
    pub vars: Option<&'a Path>,
    pub nic: &'a NicBackend,
    /// More NICs (`n1`/`nic1`, ...): their backends and MACs.
    pub extra_nics: &'a [(NicBackend, String)],
    pub disks: &'a [AttachedDisk],
}

fn accel() -> &'static str {
    if std::env::var_os("STORK_KVM").is_some_and(|v| v == "1") {
        "kvm"
    } else {
        "tcg"
    }
}

/// SeaBIOS's fw_cfg file naming the serial port it mirrors its text screen to, beside the
/// console log. With `-nodefaults` there is no VGA, so without it SeaBIOS and the NIC's iPXE
/// ROM print nowhere and a stall between power-on and the kernel leaves an empty console
/// (docs/measurements.md, Firmware and iPXE).
fn sercon_port_file(console: &Path) -> PathBuf {
    console.with_file_name("sercon-port")
}

/// [`machine_argv`], with the files its command line names written first.
pub(crate) fn machine_command(m: &MachineArgs<'_>) -> Result<Vec<String>> {
    if m.firmware == Firmware::Bios {
        let file = sercon_port_file(m.console);
        // COM1's I/O port, 0x3f8, as the little-endian integer SeaBIOS reads.
        std::fs::write(&file, 0x3f8u16.to_le_bytes())
            .with_context(|| format!("writing {}", file.display()))?;
    }
    machine_argv(m)
}

/// The command line (program first) of a machine with its provisioning NIC [`NIC_ID`] on
/// `m.nic` and its disks [`disk_id`]`(0..)`; no boot order (see [`bootindex_args`]).
pub(crate) fn machine_argv(m: &MachineArgs<'_>) -> Result<Vec<String>> {
    let mut argv: Vec<String> = [
        "qemu-system-x86_64",
        "-name",
        m.name,
        "-accel",
        accel(),
        "-nodefaults",
        "-display",
        "none",
        "-m",
        &m.memory_mib.to_string(),
        "-smp",
        &m.cpus.to_string(),
        "-chardev",
        &format!("file,id=serial0,path={},append=on", m.console.display()),
        "-serial",
        "chardev:serial0",
        "-qmp",
        &format!("unix:{},server=on,wait=off", m.qmp.display()),
        "-netdev",
        &m.nic.netdev(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut usb = false;
    let mut sata_ports = 0;
    for (n, disk) in m.disks.iter().enumerate() {
        if disk.bus == DiskBus::Usb && !usb {
            usb = true;
            argv.extend(["-device".to_string(), "qemu-xhci,id=xhci".to_string()]);
        }
        if disk.bus == DiskBus::Sata && sata_ports == 0 {
            argv.extend(["-device".to_string(), "ahci,id=ahci".to_string()]);
        }
        let file = match &disk.faults {
            // The raw format's reads raise blkdebug's `read_aio` event, which its rules fail.
            Some(rules) => format!("blkdebug:{}:{}", opt_path(rules), opt_path(&disk.file)),
            None => opt_path(&disk.file),
        };
        // O_DIRECT on the host (`cache=none`): on our build machines a buffered write costs
        // some 7 s of the host's CPU per GiB, and a read of a hole far into a sparse file
        // more, taken from the emulated CPUs; direct I/O does either in under a second
        // (docs/measurements.md, Host file I/O).
        let mut drive = format!("file={file},if=none,id=d{n},format=raw,cache=none");
        if disk.snapshot {
            drive.push_str(",snapshot=on");
        }
        // A write that finds the host's disk full fails in the guest, which says so on its
        // console, instead of pausing the VM silently (QEMU's default, `werror=enospc`).
        drive.push_str(",werror=report");
        let id = disk_id(n);
        let device = match disk.bus {
            DiskBus::Virtio => format!("virtio-blk-pci,drive=d{n},id={id},serial={}", disk.serial),
            DiskBus::Nvme => format!("nvme,drive=d{n},id={id},serial={}", disk.serial),
            DiskBus::Usb => format!(
                "usb-storage,bus=xhci.0,drive=d{n},id={id},serial={},removable=on",
                disk.serial
            ),
            DiskBus::Sata => {
                sata_ports += 1;
                format!(
                    "ide-hd,bus=ahci.{},drive=d{n},id={id},serial={}",
                    sata_ports - 1,
                    disk.serial
                )
            }
        };
        // Disks past the first come after the boot order's two devices (`boot_order`), as a
        // real firmware lists every disk: OVMF drops a boot option (the agent's entry for
        // the installed disk) on a PCI device missing from QEMU's boot order.
        let device = match n {
            0 => device,
            n => format!("{device},bootindex={}", EXTRA_DISK_BOOTINDEX + n),
        };
        argv.extend(["-drive".to_string(), drive, "-device".to_string(), device]);
    }
    for (k, (backend, mac)) in m.extra_nics.iter().enumerate() {
        let n = k + 1;
        argv.extend([
            "-netdev".to_string(),
            backend.netdev_with_id(&format!("n{n}")),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=n{n},id=nic{n},mac={mac},romfile="),
        ]);
    }
    if m.guest_reboot == GuestReboot::Exit {
        // The agent powers off when done; its reboot into the installed OS, or a panic's,
        // stops QEMU too.
        argv.push("-no-reboot".to_string());
    }
    let nic = format!("virtio-net-pci,netdev=n0,id={NIC_ID},mac={}", m.mac);
    match m.firmware {
        Firmware::Bios => {
            argv.extend([
                "-device".to_string(),
                nic,
                "-fw_cfg".to_string(),
                format!(
                    "name=etc/sercon-port,file={}",
                    opt_path(&sercon_port_file(m.console))
                ),
            ]);
        }
        Firmware::Uefi { .. }
        | Firmware::UefiHttp
        | Firmware::UefiSecureBoot
        | Firmware::UefiIpv6
        | Firmware::UefiHttpIpv6 => {
            let nic_rom = m.firmware == (Firmware::Uefi { nic_rom: true });
            let vars = m
                .vars
                .context("an OVMF machine without its variable store")?;
            let nic = if nic_rom {
                nic
            } else {
                format!("{nic},romfile=")
            };
            if !m.firmware.ipv6() {
                argv.extend([
                    // No IPv6 network boot (as on most servers): OVMF tries every boot option
                    // of the NIC before the disk, and PXEv6 and HTTPv6 each wait out DHCPv6,
                    // which an IPv4 lab does not serve, when iPXE hands back with `exit 1`.
                    // IPv4 PXE and HTTP boot stay.
                    "-fw_cfg".to_string(),
                    "name=opt/org.tianocore/IPv6PXESupport,string=n".to_string(),
                    "-fw_cfg".to_string(),
                    "name=opt/org.tianocore/IPv6Support,string=n".to_string(),
                ]);
            }
            if matches!(m.firmware, Firmware::UefiHttp) || m.firmware.ipv6() {
                argv.extend([
                    "-fw_cfg".to_string(),
                    "name=opt/org.tianocore/IPv4PXESupport,string=n".to_string(),
                ]);
            }
            if m.firmware == Firmware::UefiHttpIpv6 {
                argv.extend([
                    "-fw_cfg".to_string(),
                    "name=opt/org.tianocore/IPv6PXESupport,string=n".to_string(),
                ]);
            }
            if m.firmware == Firmware::UefiSecureBoot {
                // The secboot build keeps its variables in SMM: without SMM and a secure
                // flash, it stops before the boot manager.
                argv.extend([
                    "-machine".to_string(),
                    "q35,smm=on".to_string(),
                    "-global".to_string(),
                    "driver=cfi.pflash01,property=secure,value=on".to_string(),
                ]);
            } else {
                argv.extend(["-machine".to_string(), "q35".to_string()]);
            }
            argv.extend([
                "-drive".to_string(),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    m.firmware.ovmf_code()
                ),
                "-drive".to_string(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                "-device".to_string(),
                nic,
            ]);
        }
    }
    Ok(argv)
}

/// Which device a power-on tries first; the other one comes second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFirst {
    /// The NIC, then the disk: when the network boot hands back (iPXE's `exit 1`, Stork's
    /// answer once the machine must boot locally) the firmware tries the disk.
    Network,
    /// The disk, then the NIC.
    Disk,
}

/// Disk `n` (from 1) past the first gets boot index this plus `n`: after the NIC's and the
/// first disk's, whatever the BMC set.
const EXTRA_DISK_BOOTINDEX: usize = 10;

/// `-set device.<id>.bootindex=<n>` arguments for [`qemu_argv`]'s command line. Both devices
/// get an index: OVMF drops the boot options of PCI devices that match no entry of QEMU's
/// boot order, so a disk without one would never be tried after the network boot.
pub fn boot_order(first: BootFirst) -> Vec<String> {
    let (one, two) = match first {
        BootFirst::Network => (NIC_ID, DISK_ID),
        BootFirst::Disk => (DISK_ID, NIC_ID),
    };
    bootindex_args(&[one, two])
}

/// `-set device.<id>.bootindex=<n>` arguments giving `devices` boot indexes 1, 2, ... in
/// order.
pub fn bootindex_args(devices: &[&str]) -> Vec<String> {
    devices
        .iter()
        .enumerate()
        .flat_map(|(n, id)| {
            [
                "-set".to_string(),
                format!("device.{id}.bootindex={}", n + 1),
            ]
        })
        .collect()
}

/// The template of every new OVMF machine's variable store (Debian's `ovmf`).
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The same with Microsoft's Secure Boot keys enrolled (and Secure Boot on).
pub const OVMF_VARS_MS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

/// Creates `dir` with what a machine keeps across power cycles: its sparse `disk.raw` and,
/// under OVMF, its NVRAM `OVMF_VARS.fd` copied from `vars_template` (boot options OVMF
/// writes persist across the machine's reboots and power-ons). With `spec.keep_disk`
/// existing files are kept (the same machine again); otherwise they start fresh (a new
/// machine). Returns the disk and the variable store.
fn machine_files(
    dir: &Path,
    spec: &VmSpec,
    vars_template: &Path,
) -> Result<(PathBuf, Option<PathBuf>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let disk = dir.join("disk.raw");
    blank_disk(&disk, spec.disk_bytes, spec.keep_disk)?;
    let vars = ovmf_vars(dir, spec.firmware, spec.keep_disk, vars_template)?;
    Ok((disk, vars))
}

/// Creates a sparse blank disk of `bytes` at `path`, or with `keep` keeps one that exists.
pub(crate) fn blank_disk(path: &Path, bytes: u64, keep: bool) -> Result<()> {
    if !(keep && path.exists()) {
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(bytes)?; // sparse
    }
    Ok(())
}

/// Under OVMF, the machine's variable store `dir/OVMF_VARS.fd`, copied from `vars_template`
/// unless `keep` and it exists; `None` under SeaBIOS.
pub(crate) fn ovmf_vars(
    dir: &Path,
    firmware: Firmware,
    keep: bool,
    vars_template: &Path,
) -> Result<Option<PathBuf>> {
    Ok(match firmware {
        Firmware::Bios => None,
        Firmware::Uefi { .. }
        | Firmware::UefiHttp
        | Firmware::UefiSecureBoot
        | Firmware::UefiIpv6
        | Firmware::UefiHttpIpv6 => {
            let vars = dir.join("OVMF_VARS.fd");
            if !(keep && vars.exists()) {
                std::fs::copy(vars_template, &vars).with_context(|| {
                    format!(
                        "copying {} (is the ovmf package installed?)",
                        vars_template.display()
                    )
                })?;
            }
            Some(vars)
        }
    })
}

impl Vm {
    /// Creates the VM's blank disk and starts QEMU (TCG: KVM hangs on this kind of machine;
    /// set `STORK_KVM=1` to opt in), network-booting from a new tap on the lab bridge.
    pub fn start(lab: &mut Lab, spec: VmSpec) -> Result<Self> {
        let (mut argv, paths) = qemu_argv(lab, &spec)?;
        argv.extend(boot_order(BootFirst::Network));
        let mut cmd = lab.command(&argv[0]);
        cmd.args(&argv[1..]);
        let process = Spawned::start(&spec.name, cmd, &paths.dir.join("qemu.log"))?;
        Ok(Self {
            spec,
            console: paths.console,
            disk: paths.disk,
            qmp: paths.qmp,
            process: Some(process),
        })
    }

    /// Powers the VM on again after it stopped (powered off, or rebooted under
    /// [`GuestReboot::Exit`]) with the same disk and OVMF variables, so what the last boot
    /// wrote is still there; it boots from the network first, as [`Vm::start`] does. The last
    /// boot's console is kept as `console.<n>.log`.
    pub fn restart(&mut self, lab: &mut Lab) -> Result<()> {
        self.kill();
        for n in 1.. {
            let old = self.console.with_extension(format!("{n}.log"));
            if !old.exists() {
                // Best effort: a missing console only costs diagnostics.
                let _ = std::fs::rename(&self.console, old);
                break;
            }
        }
        let mut spec = self.spec.clone();
        spec.keep_disk = true;
        *self = Self::start(lab, spec)?;
        Ok(())
    }

    /// The last lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console, lines)
    }

    /// QEMU's own stderr, for when it fails to start.
    pub fn qemu_log_tail(&self, lines: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }

    /// `Some(status)` once QEMU has exited (the guest powered off, or QEMU failed).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(|p| p.exited())
    }

    /// Kills QEMU (hard power-off).
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// One line naming the VM's hardware, for diagnostics.
    pub fn describe(&self) -> String {
        format!(
            "VM {} (mac {}, {} MiB, {} cpus, {:?} disk {} bytes, {:?})",
            self.spec.name,
            self.spec.mac,
            self.spec.memory_mib,
            self.spec.cpus,
            self.spec.disk_bus,
            self.spec.disk_bytes,
            self.spec.firmware
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine's disk and NVRAM survive a power cycle of the same machine; a new machine
    /// starts blank, from the template.
    #[test]
    fn machine_files_persist_for_the_same_machine_only() {
        let base = std::env::temp_dir().join(format!("stork-vm-unit-{}", std::process::id()));
        let dir = base.join("m1");
        std::fs::create_dir_all(&base).unwrap();
        let template = base.join("OVMF_VARS_template.fd");
        std::fs::write(&template, b"pristine").unwrap();
        let mut spec = VmSpec::new("m1", "52:54:00:00:00:01");
        spec.firmware = Firmware::Uefi { nic_rom: false };
        spec.disk_bytes = 1 << 20;

        let (disk, vars) = machine_files(&dir, &spec, &template).unwrap();
        let vars = vars.unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);
        assert_eq!(std::fs::read(&vars).unwrap(), b"pristine");
        // The firmware writes its boot options; the machine powers off and on again.
        std::fs::write(&vars, b"boot options").unwrap();
        std::fs::write(&disk, b"installed").unwrap();
        spec.keep_disk = true;
        machine_files(&dir, &spec, &template).unwrap();
        assert_eq!(std::fs::read(&vars).unwrap(), b"boot options");
        assert_eq!(std::fs::read(&disk).unwrap(), b"installed");
        // A new machine in the same place.
        spec.keep_disk = false;
        machine_files(&dir, &spec, &template).unwrap();
        assert_eq!(std::fs::read(&vars).unwrap(), b"pristine");
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 20);

        spec.firmware = Firmware::Bios;
        assert_eq!(machine_files(&dir, &spec, &template).unwrap().1, None);
        let _ = std::fs::remove_dir_all(&base);
    }

    /// The root lab's command line, as it was before the NIC became a parameter.
    #[test]
    fn the_root_lab_command_line_is_unchanged() {
        let dir = Path::new("/lab/m1");
        let (console, qmp, disk, vars) = (
            dir.join("console.log"),
            dir.join("qmp.sock"),
            dir.join("disk.raw"),
            dir.join("OVMF_VARS.fd"),
        );
        let tap = NicBackend::Tap("tap3".into());
        let mut spec = VmSpec::new("m1", "52:54:00:00:00:01");
        let disks = [AttachedDisk {
            file: disk.clone(),
            bus: spec.disk_bus,
            serial: spec.disk_serial.clone(),
            snapshot: false,
            faults: None,
        }];
        let args = |spec: &VmSpec| MachineArgs {
            name: "m1",
            mac: "52:54:00:00:00:01",
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            firmware: spec.firmware,
            guest_reboot: spec.guest_reboot,
            console: &console,
            qmp: &qmp,
            vars: Some(&vars),
            nic: &tap,
            extra_nics: &[],
            disks: &disks,
        };
        let common = [
            "qemu-system-x86_64",
            "-name",
            "m1",
            "-accel",
            accel(),
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "1024",
            "-smp",
            "2",
            "-chardev",
            "file,id=serial0,path=/lab/m1/console.log,append=on",
            "-serial",
            "chardev:serial0",
            "-qmp",
            "unix:/lab/m1/qmp.sock,server=on,wait=off",
            "-netdev",
            "tap,id=n0,ifname=tap3,script=no,downscript=no",
            "-drive",
            "file=/lab/m1/disk.raw,if=none,id=d0,format=raw,cache=none,werror=report",
            "-device",
            "virtio-blk-pci,drive=d0,id=disk0,serial=STORK-m1",
        ];
        let mut bios: Vec<&str> = common.to_vec();
        bios.extend([
            "-no-reboot",
            "-device",
            "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:00:00:01",
            "-fw_cfg",
            "name=etc/sercon-port,file=/lab/m1/sercon-port",
        ]);
        assert_eq!(machine_argv(&args(&spec)).unwrap(), bios);

        spec.firmware = Firmware::Uefi { nic_rom: false };
        spec.guest_reboot = GuestReboot::Reset;
        let mut uefi: Vec<&str> = common.to_vec();
        uefi.extend([
            "-fw_cfg",
            "name=opt/org.tianocore/IPv6PXESupport,string=n",
            "-fw_cfg",
            "name=opt/org.tianocore/IPv6Support,string=n",
            "-machine",
            "q35",
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive",
            "if=pflash,format=raw,unit=1,file=/lab/m1/OVMF_VARS.fd",
            "-device",
            "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:00:00:01,romfile=",
        ]);
        assert_eq!(machine_argv(&args(&spec)).unwrap(), uefi);

        spec.firmware = Firmware::UefiHttp;
        let http = machine_argv(&args(&spec)).unwrap();
        let pxe_off = http
            .windows(2)
            .any(|w| w == ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
        assert!(pxe_off, "{http:?}");
        assert!(http.iter().any(|a| a.ends_with("romfile=")), "{http:?}");
    }

    #[test]
    fn disks_and_a_switch_socket_on_the_command_line() {
        let sock = NicBackend::Stream("/lab,x/switch.sock".into());
        assert_eq!(
            sock.netdev(),
            "stream,id=n0,server=off,addr.type=unix,addr.path=/lab,,x/switch.sock"
        );
        let disks = [
            AttachedDisk {
                file: "/img/appliance.raw".into(),
                bus: DiskBus::Usb,
                serial: "STICK".into(),
                snapshot: true,
                faults: None,
            },
            AttachedDisk {
                file: "/lab/m1/disk1.raw".into(),
                bus: DiskBus::Nvme,
                serial: "DATA".into(),
                snapshot: false,
                faults: None,
            },
            AttachedDisk {
                file: "/lab/m1/disk2.raw".into(),
                bus: DiskBus::Usb,
                serial: "OTHER".into(),
                snapshot: false,
                faults: None,
            },
            AttachedDisk {
                file: "/lab/m1/disk3.raw".into(),
                bus: DiskBus::Sata,
                serial: "S1".into(),
                snapshot: false,
                faults: None,
            },
            AttachedDisk {
                file: "/lab/m1/disk4.raw".into(),
                bus: DiskBus::Sata,
                serial: "S2".into(),
                snapshot: false,
                faults: Some("/lab/m1/disk4.blkdebug".into()),
            },
        ];
        let argv = machine_argv(&small(&sock, &[], &disks)).unwrap();
        let at = argv.iter().position(|a| a == "-netdev").unwrap();
        assert_eq!(
            argv[at..],
            [
                "-netdev",
                "stream,id=n0,server=off,addr.type=unix,addr.path=/lab,,x/switch.sock",
                "-device",
                "qemu-xhci,id=xhci",
                "-drive",
                "file=/img/appliance.raw,if=none,id=d0,format=raw,cache=none,snapshot=on,werror=report",
                "-device",
                "usb-storage,bus=xhci.0,drive=d0,id=disk0,serial=STICK,removable=on",
                "-drive",
                "file=/lab/m1/disk1.raw,if=none,id=d1,format=raw,cache=none,werror=report",
                "-device",
                "nvme,drive=d1,id=disk1,serial=DATA,bootindex=11",
                "-drive",
                "file=/lab/m1/disk2.raw,if=none,id=d2,format=raw,cache=none,werror=report",
                "-device",
                "usb-storage,bus=xhci.0,drive=d2,id=disk2,serial=OTHER,removable=on,bootindex=12",
                "-device",
                "ahci,id=ahci",
                "-drive",
                "file=/lab/m1/disk3.raw,if=none,id=d3,format=raw,cache=none,werror=report",
                "-device",
                "ide-hd,bus=ahci.0,drive=d3,id=disk3,serial=S1,bootindex=13",
                "-drive",
                "file=blkdebug:/lab/m1/disk4.blkdebug:/lab/m1/disk4.raw,if=none,id=d4,format=raw,cache=none,werror=report",
                "-device",
                "ide-hd,bus=ahci.1,drive=d4,id=disk4,serial=S2,bootindex=14",
                "-device",
                "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:00:00:01",
                "-fw_cfg",
                "name=etc/sercon-port,file=/lab/m1/sercon-port",
            ]
        );
        // Under OVMF the variable store is required.
        assert!(
            machine_argv(&MachineArgs {
                firmware: Firmware::Uefi { nic_rom: true },
                ..small(&sock, &[], &[])
            })
            .is_err()
        );
    }

    /// A small BIOS machine's arguments.
    fn small<'a>(
        nic: &'a NicBackend,
        extra_nics: &'a [(NicBackend, String)],
        disks: &'a [AttachedDisk],
    ) -> MachineArgs<'a> {
        MachineArgs {
            name: "m1",
            mac: "52:54:00:00:00:01",
            memory_mib: 256,
            cpus: 1,
            firmware: Firmware::Bios,
            guest_reboot: GuestReboot::Reset,
            console: Path::new("/lab/m1/console.log"),
            qmp: Path::new("/lab/m1/qmp.sock"),
            vars: None,
            nic,
            extra_nics,
            disks,
        }
    }

    #[test]
    fn extra_nics_get_netdevs_of_their_own_and_no_boot_rom() {
        let extra = [(
            NicBackend::Tap("tap5".into()),
            "52:54:00:00:00:02".to_string(),
        )];
        let tap = NicBackend::Tap("tap4".into());
        let argv = machine_argv(&small(&tap, &extra, &[])).unwrap().join(" ");
        assert!(argv.contains("-netdev tap,id=n0,ifname=tap4,"), "{argv}");
        assert!(
            argv.contains(
                "-netdev tap,id=n1,ifname=tap5,script=no,downscript=no -device \
                 virtio-net-pci,netdev=n1,id=nic1,mac=52:54:00:00:00:02,romfile="
            ),
            "{argv}"
        );
    }

    #[test]
    fn boot_order_lists_both_devices() {
        assert_eq!(
            boot_order(BootFirst::Network),
            [
                "-set",
                "device.nic0.bootindex=1",
                "-set",
                "device.disk0.bootindex=2"
            ]
        );
        assert_eq!(
            boot_order(BootFirst::Disk),
            [
                "-set",
                "device.disk0.bootindex=1",
                "-set",
                "device.nic0.bootindex=2"
            ]
        );
    }
}
