//! The rootless lab: VMs on one L2 segment with no root at all. No namespace, no bridge, no
//! taps and no `ip`: the segment is a userspace [`Switch`] on a unix socket that each VM's
//! provisioning NIC joins (`-netdev stream`), and the host reaches a service inside a VM
//! through a second, user-mode NIC that forwards a port of 127.0.0.1 to it
//! (`-netdev user,restrict=on,hostfwd=...`: `restrict=on` keeps the guest from reaching
//! anything else, on the host or beyond).
//!
//! The command lines come from the same builder as the root lab's ([`crate::vm`]): the same
//! firmware, console, QMP socket and OVMF variable store. Here a machine may also have no
//! disk, an existing raw image (an appliance image on a USB stick, say) and extra disks.
//!
//! Everything is torn down on drop: a [`RootlessVm`] kills its QEMU (which also dies with
//! the process that started it, `PR_SET_PDEATHSIG`), the [`RootlessLab`] stops its switch
//! and removes its work directory (see [`crate::KEEP_DIR_VAR`]). Drop the VMs first: declare
//! the lab before them.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::process::{Spawned, tail, wait_for};
use crate::switch::Switch;
use crate::vm::{
    AttachedDisk, BootFirst, DiskBus, Firmware, GuestReboot, MachineArgs, NIC_ID, NicBackend,
    blank_disk, bootindex_args, disk_id, machine_command, ovmf_vars,
};

/// The device id of the user-mode NIC (netdev `u0`).
pub const USER_NIC_ID: &str = "nic1";

/// The longest path a unix socket can have (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Labs made by this process so far, so two labs with the same tag get their own directory.
static LABS: AtomicU32 = AtomicU32::new(0);

/// A work directory and a switch; VMs started from it join the switch.
pub struct RootlessLab {
    dir: PathBuf,
    switch: Switch,
    keep_dir: bool,
}

impl RootlessLab {
    /// Creates work directory `stork-rootless-<tag>-<pid>-<n>` under `base` and starts the
    /// switch on `switch.sock` inside it. Unix socket paths are short (107 bytes), so `base`
    /// should be too (a `tempfile::tempdir()`, say).
    pub fn new(tag: &str, base: &Path) -> Result<Self> {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("stork-rootless-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let sock = dir.join("switch.sock");
        let switch = match check_socket_path(&sock).and_then(|()| Switch::start(&sock)) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Self {
            dir,
            switch,
            keep_dir: std::env::var_os(crate::KEEP_DIR_VAR).is_some_and(|v| v == "1"),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment every VM's provisioning NIC is on.
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// The switch's socket: what `-netdev stream` connects to.
    pub fn socket(&self) -> &Path {
        self.switch().path()
    }

    /// Keep the work directory (logs, consoles, disks) after the lab is dropped.
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }

    /// Creates the VM's directory, blank disks and OVMF variable store, and returns its QEMU
    /// command line (program first, boot order included) and where its files are. Nothing
    /// is started: [`RootlessLab::start_vm`] runs it, or a BMC does on power-on. The switch
    /// must be running when QEMU starts (QEMU 7.2 does not reconnect).
    pub fn qemu_argv(&self, spec: &RootlessVmSpec) -> Result<(Vec<String>, RootlessVmPaths)> {
        let dir = self.dir.join(&spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let paths = RootlessVmPaths {
            console: dir.join("console.log"),
            qmp: dir.join("qmp.sock"),
            log: dir.join("qemu.log"),
            vars: ovmf_vars(
                &dir,
                spec.firmware,
                spec.keep_disks,
                Path::new(spec.firmware.vars_template()),
            )?,
            disks: Vec::new(),
            dir,
        };
        check_socket_path(&paths.qmp)?;
        let mut paths = paths;
        let mut attached = Vec::new();
        for (n, disk) in spec.disks.iter().enumerate() {
            let (file, snapshot) = match &disk.source {
                DiskSource::Blank { bytes } => {
                    let file = paths.dir.join(format!("disk{n}.raw"));
                    blank_disk(&file, *bytes, spec.keep_disks)?;
                    (file, false)
                }
                DiskSource::Image { path, snapshot } => {
                    if !path.is_file() {
                        bail!("disk image {} does not exist", path.display());
                    }
                    (path.clone(), *snapshot)
                }
            };
            paths.disks.push(file.clone());
            attached.push(AttachedDisk {
                file,
                bus: disk.bus,
                serial: disk.serial.clone(),
                snapshot,
                faults: None,
            });
        }
        let nic = NicBackend::Stream(self.socket().to_path_buf());
        let mut argv = machine_command(&MachineArgs {
            name: &spec.name,
            mac: &spec.mac,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            firmware: spec.firmware,
            guest_reboot: spec.guest_reboot,
            console: &paths.console,
            qmp: &paths.qmp,
            vars: paths.vars.as_deref(),
            nic: &nic,
            extra_nics: &[],
            disks: &attached,
        })?;
        if let Some(user) = &spec.user_nic {
            argv.extend(user.args());
        }
        argv.extend(boot_args(spec.boot_first, spec.disks.len()));
        Ok((argv, paths))
    }

    /// Creates the VM's files and starts its QEMU, its provisioning NIC on the switch.
    pub fn start_vm(&self, spec: RootlessVmSpec) -> Result<RootlessVm> {
        let (argv, paths) = self.qemu_argv(&spec)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let process = Spawned::start(&spec.name, cmd, &paths.log)?;
        Ok(RootlessVm {
            spec,
            paths,
            process: Some(process),
        })
    }
}

impl Drop for RootlessLab {
    fn drop(&mut self) {
        // The switch stops after this, when its field is dropped.
        crate::kept::finish(&self.dir, self.keep_dir);
    }
}

fn check_socket_path(path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "unix socket path {} has {len} bytes, more than {MAX_SOCKET_PATH}: use a shorter base directory",
            path.display()
        );
    }
    Ok(())
}

/// The boot order: the provisioning NIC first and then the disks, or the disks first and
/// then the NIC. Every device gets an index, since OVMF drops boot options of devices that
/// have none; the user-mode NIC gets none and is never booted from.
fn boot_args(first: BootFirst, disks: usize) -> Vec<String> {
    let disks: Vec<String> = (0..disks).map(disk_id).collect();
    let mut order: Vec<&str> = disks.iter().map(String::as_str).collect();
    match first {
        BootFirst::Network => order.insert(0, NIC_ID),
        BootFirst::Disk => order.push(NIC_ID),
    }
    bootindex_args(&order)
}

/// Where a disk's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A new sparse raw file in the VM's directory (`disk<n>.raw`).
    Blank { bytes: u64 },
    /// An existing raw image, used in place; with `snapshot` QEMU writes to a temporary
    /// overlay instead and the file never changes.
    Image { path: PathBuf, snapshot: bool },
}

/// One disk of a rootless VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub source: DiskSource,
    pub bus: DiskBus,
    pub serial: String,
}

impl DiskSpec {
    /// A blank disk of `bytes`.
    pub fn blank(bytes: u64, bus: DiskBus, serial: &str) -> Self {
        Self {
            source: DiskSource::Blank { bytes },
            bus,
            serial: serial.to_string(),
        }
    }

    /// An existing raw image, written in place.
    pub fn image(path: &Path, bus: DiskBus, serial: &str) -> Self {
        Self {
            source: DiskSource::Image {
                path: path.to_path_buf(),
                snapshot: false,
            },
            bus,
            serial: serial.to_string(),
        }
    }

    /// A raw image as a USB stick (`qemu-xhci` + `usb-storage`), written in place: how an
    /// appliance image boots under OVMF.
    pub fn usb_stick(path: &Path, serial: &str) -> Self {
        Self::image(path, DiskBus::Usb, serial)
    }

    /// The same disk, its writes discarded when QEMU exits (images only).
    pub fn snapshot(mut self) -> Self {
        if let DiskSource::Image { snapshot, .. } = &mut self.source {
            *snapshot = true;
        }
        self
    }
}

/// A TCP port of the host's 127.0.0.1 forwarded to a port of the guest's user-mode NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    pub host_port: u16,
    pub guest_port: u16,
}

/// A second NIC in user mode (QEMU's slirp: the guest leases 10.0.2.15 from QEMU's DHCP)
/// with `restrict=on`, so the guest reaches nothing through it, and the host reaches the
/// guest's services through `forwards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNic {
    pub mac: String,
    pub forwards: Vec<HostForward>,
}

impl UserNic {
    pub fn new(mac: &str) -> Self {
        Self {
            mac: mac.to_string(),
            forwards: Vec::new(),
        }
    }

    /// Adds a forward of 127.0.0.1:`host_port` to the guest's `guest_port`.
    pub fn forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.forwards.push(HostForward {
            host_port,
            guest_port,
        });
        self
    }

    /// Its `-netdev` and `-device` arguments: netdev `u0`, device [`USER_NIC_ID`] with no
    /// option ROM (the firmware never boots from it).
    pub fn args(&self) -> Vec<String> {
        let mut netdev = "user,id=u0,restrict=on".to_string();
        for f in &self.forwards {
            netdev.push_str(&format!(
                ",hostfwd=tcp:127.0.0.1:{}-:{}",
                f.host_port, f.guest_port
            ));
        }
        vec![
            "-netdev".to_string(),
            netdev,
            "-device".to_string(),
            format!(
                "virtio-net-pci,netdev=u0,id={USER_NIC_ID},mac={},romfile=",
                self.mac
            ),
        ]
    }
}

/// A rootless VM: the root lab's [`crate::VmSpec`] less its one blank disk, plus any disks
/// and a user-mode NIC.
#[derive(Debug, Clone, PartialEq)]
pub struct RootlessVmSpec {
    pub name: String,
    /// The provisioning NIC's MAC ([`NIC_ID`], on the switch).
    pub mac: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub firmware: Firmware,
    pub guest_reboot: GuestReboot,
    /// In order: the first is [`crate::vm::DISK_ID`], the n-th [`disk_id`]`(n)`.
    pub disks: Vec<DiskSpec>,
    pub user_nic: Option<UserNic>,
    pub boot_first: BootFirst,
    /// Keep blank disks and the OVMF variable store an earlier start of this machine left.
    pub keep_disks: bool,
}

impl RootlessVmSpec {
    /// 1 GiB, 2 CPUs, SeaBIOS, no disk, no user-mode NIC, network boot first; QEMU exits
    /// when the guest reboots.
    pub fn new(name: &str, mac: &str) -> Self {
        Self {
            name: name.to_string(),
            mac: mac.to_string(),
            memory_mib: 1024,
            cpus: 2,
            firmware: Firmware::Bios,
            guest_reboot: GuestReboot::Exit,
            disks: Vec::new(),
            user_nic: None,
            boot_first: BootFirst::Network,
            keep_disks: false,
        }
    }
}

/// Where a rootless VM's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootlessVmPaths {
    pub dir: PathBuf,
    pub console: PathBuf,
    pub qmp: PathBuf,
    /// QEMU's own stdout and stderr.
    pub log: PathBuf,
    /// The file behind each disk, in order.
    pub disks: Vec<PathBuf>,
    pub vars: Option<PathBuf>,
}

/// A running rootless VM; dropping it kills QEMU.
pub struct RootlessVm {
    pub spec: RootlessVmSpec,
    pub paths: RootlessVmPaths,
    process: Option<Spawned>,
}

impl RootlessVm {
    /// QEMU's process id (0 once killed): the switch knows the VM's port by it
    /// ([`Switch::port_of_pid`]).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map(Spawned::pid).unwrap_or(0)
    }

    /// Connects to the VM's QMP socket, waiting up to `timeout` for QEMU to open it.
    pub fn qmp(&mut self, timeout: Duration) -> Result<Qmp> {
        let path = self.paths.qmp.clone();
        wait_for(
            &format!("QMP of VM {}", self.spec.name),
            timeout,
            Duration::from_millis(50),
            || {
                if let Some(status) = self.exited() {
                    bail!(
                        "QEMU of VM {} exited ({status}): {}",
                        self.spec.name,
                        self.qemu_log_tail(20)
                    );
                }
                Ok(Qmp::connect(&path).ok())
            },
        )
    }

    /// The last lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.paths.console, lines)
    }

    /// QEMU's own output, for when it fails.
    pub fn qemu_log_tail(&self, lines: usize) -> String {
        tail(&self.paths.log, lines)
    }

    /// `Some(status)` once QEMU has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(Spawned::exited)
    }

    /// Kills QEMU (hard power-off).
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// One line naming the VM's hardware, for diagnostics.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "rootless VM {} (mac {}, {} MiB, {} cpus, {:?}, disks {:?}, user NIC {:?})",
            s.name, s.mac, s.memory_mib, s.cpus, s.firmware, s.disks, s.user_nic
        )
    }
}

/// `n` distinct TCP ports of 127.0.0.1 that were free a moment ago (bound together, then
/// released), for host forwards. Another process may take one before QEMU does; QEMU then
/// fails to start and says so.
pub fn free_local_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding 127.0.0.1:0")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A QMP connection (QEMU's JSON monitor), past capability negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to a QMP socket, reads QEMU's greeting and leaves negotiation mode.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connecting to QMP at {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("reading QMP")? == 0 {
            bail!("QMP closed");
        }
        serde_json::from_str(&line).with_context(|| format!("parsing QMP message {line:?}"))
    }

    /// Runs `command` and returns its `return` value; events that arrive meanwhile are
    /// skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .context("writing QMP")?;
        loop {
            let mut reply = self.read()?;
            if let Some(r) = reply.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = reply.get("error") {
                bail!("QMP {command} failed: {e}");
            }
        }
    }

    /// Runs a human monitor command (`info usernet`, say) and returns its output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        let out = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(out.as_str().unwrap_or_default().to_string())
    }

    /// The VM's run state (`running`, `paused`, `shutdown`, ...).
    pub fn status(&mut self) -> Result<String> {
        let s = self.execute("query-status", None)?;
        s.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("query-status without a status: {s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_order_puts_every_device_in_line() {
        assert_eq!(
            boot_args(BootFirst::Network, 0),
            ["-set", "device.nic0.bootindex=1"]
        );
        assert_eq!(
            boot_args(BootFirst::Network, 2),
            [
                "-set",
                "device.nic0.bootindex=1",
                "-set",
                "device.disk0.bootindex=2",
                "-set",
                "device.disk1.bootindex=3"
            ]
        );
        assert_eq!(
            boot_args(BootFirst::Disk, 2),
            [
                "-set",
                "device.disk0.bootindex=1",
                "-set",
                "device.disk1.bootindex=2",
                "-set",
                "device.nic0.bootindex=3"
            ]
        );
    }

    #[test]
    fn the_user_nic_is_restricted_and_forwards_from_loopback_only() {
        let nic = UserNic::new("52:54:00:aa:00:01")
            .forward(40022, 22)
            .forward(40080, 8080);
        assert_eq!(
            nic.args(),
            [
                "-netdev",
                "user,id=u0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:40080-:8080",
                "-device",
                "virtio-net-pci,netdev=u0,id=nic1,mac=52:54:00:aa:00:01,romfile=",
            ]
        );
    }

    #[test]
    fn a_vm_command_line_joins_the_switch() {
        let base = tempfile::tempdir().unwrap();
        let image = base.path().join("appliance.raw");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let lab = RootlessLab::new("argv", base.path()).unwrap();
        let mut spec = RootlessVmSpec::new("m1", "52:54:00:aa:00:02");
        spec.disks = vec![
            DiskSpec::usb_stick(&image, "STICK").snapshot(),
            DiskSpec::blank(1 << 20, DiskBus::Virtio, "DATA"),
        ];
        spec.user_nic = Some(UserNic::new("52:54:00:aa:00:03").forward(1234, 80));
        spec.boot_first = BootFirst::Disk;
        let (argv, paths) = lab.qemu_argv(&spec).unwrap();
        let joined = argv.join(" ");
        assert!(
            joined.contains(&format!(
                "-netdev stream,id=n0,server=off,addr.type=unix,addr.path={}",
                lab.socket().display()
            )),
            "{joined}"
        );
        assert!(joined.contains("-accel tcg") || joined.contains("-accel kvm"));
        assert!(joined.contains("usb-storage,bus=xhci.0,drive=d0,id=disk0,serial=STICK"));
        assert!(joined.contains(&format!(
            "file={},if=none,id=d0,format=raw,cache=none,snapshot=on",
            image.display()
        )));
        assert!(joined.contains("virtio-blk-pci,drive=d1,id=disk1,serial=DATA"));
        assert!(joined.contains("restrict=on,hostfwd=tcp:127.0.0.1:1234-:80"));
        assert!(joined.ends_with("-set device.disk1.bootindex=2 -set device.nic0.bootindex=3"));
        assert!(!joined.contains("tap"));
        assert_eq!(paths.disks[0], image);
        assert_eq!(std::fs::metadata(&paths.disks[1]).unwrap().len(), 1 << 20);
        assert_eq!(paths.vars, None);

        // A missing image is named.
        spec.disks = vec![DiskSpec::usb_stick(&base.path().join("nope.raw"), "X")];
        let err = format!("{:#}", lab.qemu_argv(&spec).unwrap_err());
        assert!(err.contains("nope.raw"), "{err}");
    }

    #[test]
    fn the_lab_cleans_up_and_refuses_long_socket_paths() {
        let base = tempfile::tempdir().unwrap();
        let lab = RootlessLab::new("clean", base.path()).unwrap();
        let dir = lab.dir().to_path_buf();
        assert!(lab.socket().exists());
        drop(lab);
        assert!(!dir.exists());

        let long = base.path().join("x".repeat(120));
        assert!(RootlessLab::new("long", &long).is_err());
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_local_ports(5).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert!(ports.iter().all(|&p| p != 0));
    }
}
