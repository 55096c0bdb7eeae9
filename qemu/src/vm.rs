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

impl Vm {
    /// Creates the VM's blank disk and starts QEMU (TCG: KVM hangs on this kind of machine;
    /// set `STORK_KVM=1` to opt in), network-booting from a new tap on the lab bridge.
    pub fn start(lab: &mut Lab, spec: VmSpec) -> Result<Self> {
        let dir = lab.dir().join(&spec.name);
        std::fs::create_dir_all(&dir)?;
        let disk = dir.join("disk.raw");
        let f =
            std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
        f.set_len(spec.disk_bytes)?; // sparse
        let console = dir.join("console.log");
        let qmp = dir.join("qmp.sock");
        let tap = lab.add_tap()?;

        let accel = if std::env::var_os("STORK_KVM").is_some_and(|v| v == "1") {
            "kvm"
        } else {
            "tcg"
        };
        let mut cmd = lab.command("qemu-system-x86_64");
        cmd.args([
            "-name",
            &spec.name,
            "-accel",
            accel,
            "-nodefaults",
            "-display",
            "none",
        ])
        .args([
            "-m",
            &spec.memory_mib.to_string(),
            "-smp",
            &spec.cpus.to_string(),
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        // The agent powers off when done; a panic reboots: either way QEMU exits.
        .arg("-no-reboot")
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw", disk.display()))
        .args([
            "-device",
            &format!("virtio-blk-pci,drive=d0,serial={}", spec.disk_serial),
        ]);
        let nic = format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", spec.mac);
        match spec.firmware {
            Firmware::Bios => {
                cmd.args(["-device", &nic]);
            }
            Firmware::Uefi { nic_rom } => {
                let vars = dir.join("OVMF_VARS.fd");
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                    .context("copying OVMF_VARS_4M.fd (is the ovmf package installed?)")?;
                cmd.args(["-machine", "q35"])
                    .args(["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"])
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
                let nic = if nic_rom {
                    nic
                } else {
                    format!("{nic},romfile=")
                };
                cmd.args(["-device", &nic]);
            }
        }
        let process = Spawned::start(&spec.name, cmd, &dir.join("qemu.log"))?;
        Ok(Self {
            spec,
            console,
            disk,
            qmp,
            process: Some(process),
        })
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
