//! QEMU virtual machines on the lab bridge.

use std::path::PathBuf;

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
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub mac: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_bytes: u64,
    pub disk_serial: String,
    pub firmware: Firmware,
    /// Keep an existing `disk.raw` instead of creating a blank one: a power cycle of the same
    /// machine (see [`Vm::restart`]).
    pub keep_disk: bool,
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
            firmware: Firmware::Bios,
            keep_disk: false,
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

/// Where a VM's files are.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub console: PathBuf,
    pub qmp: PathBuf,
}

/// Creates the VM's directory, blank disk and tap, and returns its QEMU command line
/// (program first) with no boot order: append `-set device.<NIC_ID|DISK_ID>.bootindex=1`.
/// [`Vm::start`] runs it; a lab BMC (`bmc::IpmiSim`) runs it on power-on instead.
/// TCG: KVM hangs on this kind of machine; set `STORK_KVM=1` to opt in.
pub fn qemu_argv(lab: &mut Lab, spec: &VmSpec) -> Result<(Vec<String>, VmPaths)> {
    let dir = lab.dir().join(&spec.name);
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.raw");
    if !(spec.keep_disk && disk.exists()) {
        let f =
            std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
        f.set_len(spec.disk_bytes)?; // sparse
    }
    let console = dir.join("console.log");
    let qmp = dir.join("qmp.sock");
    let tap = lab.add_tap()?;

    let accel = if std::env::var_os("STORK_KVM").is_some_and(|v| v == "1") {
        "kvm"
    } else {
        "tcg"
    };
    let mut argv: Vec<String> = [
        "qemu-system-x86_64",
        "-name",
        &spec.name,
        "-accel",
        accel,
        "-nodefaults",
        "-display",
        "none",
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
        "-serial",
        &format!("file:{}", console.display()),
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
        // The agent powers off when done; a panic reboots: either way QEMU exits.
        "-no-reboot",
        "-netdev",
        &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-drive",
        &format!("file={},if=none,id=d0,format=raw", disk.display()),
        "-device",
        &format!(
            "virtio-blk-pci,drive=d0,id={DISK_ID},serial={}",
            spec.disk_serial
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nic = format!("virtio-net-pci,netdev=n0,id={NIC_ID},mac={}", spec.mac);
    match spec.firmware {
        Firmware::Bios => {
            argv.extend(["-device".to_string(), nic]);
        }
        Firmware::Uefi { nic_rom } => {
            let vars = dir.join("OVMF_VARS.fd");
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                .context("copying OVMF_VARS_4M.fd (is the ovmf package installed?)")?;
            let nic = if nic_rom {
                nic
            } else {
                format!("{nic},romfile=")
            };
            argv.extend([
                "-machine".to_string(),
                "q35".to_string(),
                "-drive".to_string(),
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
                    .to_string(),
                "-drive".to_string(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                "-device".to_string(),
                nic,
            ]);
        }
    }
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

impl Vm {
    /// Creates the VM's blank disk and starts QEMU (TCG: KVM hangs on this kind of machine;
    /// set `STORK_KVM=1` to opt in), network-booting from a new tap on the lab bridge.
    pub fn start(lab: &mut Lab, spec: VmSpec) -> Result<Self> {
        let (mut argv, paths) = qemu_argv(lab, &spec)?;
        argv.extend(["-set".to_string(), format!("device.{NIC_ID}.bootindex=1")]);
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

    /// Powers the VM on again after it stopped (powered off, or rebooted: QEMU runs with
    /// `-no-reboot`) with the same disk, so what the last boot wrote is still there; it boots
    /// from the network first, as [`Vm::start`] does. The last boot's console is kept as
    /// `console.<n>.log`.
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
            "VM {} (mac {}, {} MiB, {} cpus, disk {} bytes, {:?})",
            self.spec.name,
            self.spec.mac,
            self.spec.memory_mib,
            self.spec.cpus,
            self.spec.disk_bytes,
            self.spec.firmware
        )
    }
}
