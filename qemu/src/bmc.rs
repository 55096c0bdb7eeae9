//! A BMC per lab machine: OpenIPMI's `ipmi_sim` serving IPMI 2.0 lanplus on
//! `127.0.0.1:<port>`, with a generated `chassis_control` program that powers the VM.
//!
//! `ipmi_sim` runs the program (through `popen`, reading its stdout until EOF) as
//! `prog get power boot` (answers `power:0|1`, `boot:<value>` lines) and
//! `prog set power 0|1`, `set boot pxe|default|none|cdrom|bios`, `set reset 1`,
//! `set shutdown 1`, `set identify "<secs> <force>"`. OpenIPMI 2.0.33 maps Set System
//! Boot Options' device selector PXE (0x04) to `pxe` and disk (0x08) to `default`, and
//! ignores the valid, persistent and EFI bits: Get System Boot Options reports the device
//! only. ipmitool gets sessions with cipher suites 0-3 and 6; 15-17 are refused (no
//! SHA-256). Per-user privilege limits are not enforced (an Operator user is granted
//! Administrator).
//!
//! With [`Chassis::Qemu`], power on starts the VM's QEMU command line (from
//! [`crate::vm::qemu_argv`]) in the background with the recorded boot device first (`pxe`:
//! the NIC, then the disk; otherwise the disk, then the NIC: [`crate::vm::boot_order`]); a
//! boot device set while the VM runs reorders its devices' `bootindex` through QMP, which
//! QEMU hands the firmware at the next reset (a real BMC's boot flags hold for a warm reset
//! too); power off kills it, and the power state is whether that process lives. Build that command
//! line with [`crate::vm::GuestReboot::Reset`] so a guest reboot resets the VM in place, as
//! on real hardware, while a guest power-off ends QEMU: chassis off ([`BmcVm`] does both).
//! [`Chassis::Recorder`] only records the requests in files, for driver tests without a VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Lab;
use crate::process::{Spawned, tail, wait_for};
use crate::vm::{BootFirst, GuestReboot, VmPaths, VmSpec, boot_order, qemu_argv};

/// Privilege limits `ipmi_sim` knows for users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcPrivilege {
    User,
    Operator,
    Admin,
}

impl BmcPrivilege {
    fn conf(self) -> &'static str {
        match self {
            BmcPrivilege::User => "user",
            BmcPrivilege::Operator => "operator",
            BmcPrivilege::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BmcUser {
    pub name: String,
    pub password: String,
    pub privilege: BmcPrivilege,
}

impl BmcUser {
    pub fn new(name: &str, password: &str, privilege: BmcPrivilege) -> Self {
        Self {
            name: name.into(),
            password: password.into(),
            privilege,
        }
    }
}

/// What the BMC's power and boot requests act on.
#[derive(Debug, Clone)]
pub enum Chassis {
    /// Power and boot device are recorded in files only.
    Recorder,
    /// Power on runs this QEMU command line (program first, no boot order of its own).
    Qemu {
        argv: Vec<String>,
        /// The VM's QMP socket, for an ACPI soft shutdown (else SIGTERM).
        qmp: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct IpmiSimSpec {
    /// Names the BMC (its state directory and log).
    pub name: String,
    pub port: u16,
    pub users: Vec<BmcUser>,
    pub chassis: Chassis,
}

/// Default credentials of [`IpmiSimSpec::new`].
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "stork-admin";
pub const OPERATOR_USER: &str = "operator";
pub const OPERATOR_PASSWORD: &str = "stork-oper";

impl IpmiSimSpec {
    /// A recorder BMC with an `admin` (Administrator) and an `operator` (Operator) user.
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            users: vec![
                BmcUser::new(ADMIN_USER, ADMIN_PASSWORD, BmcPrivilege::Admin),
                BmcUser::new(OPERATOR_USER, OPERATOR_PASSWORD, BmcPrivilege::Operator),
            ],
            chassis: Chassis::Recorder,
        }
    }
}

/// A running `ipmi_sim`; stops it, and the VM it started, on drop.
pub struct IpmiSim {
    pub name: String,
    /// Where it listens: 127.0.0.1 (inside the lab namespace when started with a lab).
    pub addr: String,
    pub port: u16,
    dir: PathBuf,
    netns: Option<String>,
    admin: Option<BmcUser>,
    /// Text only this BMC's VM has on its command line (its QMP socket, or else its QEMU
    /// arguments), to tell it from another process that reused a stale pid.
    vm_marker: Option<String>,
    process: Spawned,
}

/// A UDP port free on the host's loopback right now (for BMCs started outside a lab).
pub fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a UDP port")?;
    Ok(s.local_addr()?.port())
}

impl IpmiSim {
    /// Starts the BMC inside the lab's namespace; its files go to `<lab dir>/bmc-<name>/`.
    pub fn start(lab: &Lab, spec: IpmiSimSpec) -> Result<Self> {
        let dir = lab.dir().join(format!("bmc-{}", spec.name));
        Self::start_in(&dir, spec, Some(lab.netns().to_string()))
    }

    /// Starts the BMC on the host's loopback (no namespace, no root); files go to `dir`.
    pub fn start_local(dir: &Path, spec: IpmiSimSpec) -> Result<Self> {
        Self::start_in(dir, spec, None)
    }

    fn start_in(dir: &Path, spec: IpmiSimSpec, netns: Option<String>) -> Result<Self> {
        for u in &spec.users {
            for (what, v) in [("user name", &u.name), ("password", &u.password)] {
                if v.is_empty()
                    || v.len() > 20
                    || v.contains(['"', '\\'])
                    || v.contains(char::is_whitespace)
                {
                    bail!("BMC {what} {v:?}: 1-20 characters, no quotes, backslashes or spaces");
                }
            }
        }
        std::fs::create_dir_all(dir.join("state"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        let prog = dir.join("chassis-control.sh");
        write_executable(&prog, &control_script(&dir, &spec.chassis))?;
        if let Chassis::Qemu { argv, .. } = &spec.chassis {
            write_executable(&dir.join("qemu.sh"), &qemu_script(argv)?)?;
        }
        let addr = "127.0.0.1".to_string();
        std::fs::write(dir.join("lan.conf"), lan_conf(&spec, &addr, &prog))?;
        // One BMC at IPMB address 0x20, nothing else (no sensors, no SDRs).
        std::fs::write(
            dir.join("bmc.emu"),
            "mc_setbmc 0x20\n\
             mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n\
             mc_enable 0x20\n",
        )?;
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "ipmi_sim"]);
                c
            }
            None => Command::new("ipmi_sim"),
        };
        cmd.arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("bmc.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            // No console on stdin/stdout: it runs as a daemon.
            .arg("-n");
        let process = Spawned::start(
            &format!("ipmi_sim {}", spec.name),
            cmd,
            &dir.join("ipmi_sim.log"),
        )
        .context("starting ipmi_sim (is the openipmi package installed?)")?;
        let admin = spec
            .users
            .iter()
            .find(|u| u.privilege == BmcPrivilege::Admin)
            .cloned();
        let vm_marker = match &spec.chassis {
            Chassis::Recorder => None,
            Chassis::Qemu { qmp: Some(qmp), .. } => Some(qmp.display().to_string()),
            Chassis::Qemu { argv, .. } => Some(argv.join("\0")),
        };
        let mut sim = Self {
            name: spec.name,
            addr,
            port: spec.port,
            dir,
            netns,
            admin,
            vm_marker,
            process,
        };
        sim.wait_ready()?;
        Ok(sim)
    }

    /// Waits until `ipmi_sim` answers (ipmitool's `chassis power status`).
    fn wait_ready(&mut self) -> Result<()> {
        if self.admin.is_none() {
            // Nothing to log in with; give it a moment to bind instead.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(());
        }
        wait_for(
            "ipmi_sim to answer",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                if let Some(status) = self.process.exited() {
                    bail!("ipmi_sim exited ({status}):\n{}", self.process.log_tail(20));
                }
                Ok(self.ipmitool(&["chassis", "power", "status"]).ok())
            },
        )?;
        Ok(())
    }

    /// Runs `ipmitool -I lanplus -C 3` as the BMC's administrator (inside the namespace
    /// if any) and returns its stdout. `-C 3` spares ipmitool a 10 s cipher-suite lookup.
    pub fn ipmitool(&self, args: &[&str]) -> Result<String> {
        let admin = self
            .admin
            .as_ref()
            .context("the BMC has no administrator user")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "ipmitool"]);
                c
            }
            None => Command::new("ipmitool"),
        };
        cmd.args(["-I", "lanplus", "-C", "3", "-N", "1", "-R", "2", "-H"])
            .arg(&self.addr)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", &admin.name, "-P", &admin.password])
            .args(args);
        crate::run(&mut cmd)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every call of the chassis control program, one line each: `<time> <args>`.
    pub fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default()
    }

    /// The recorded boot device (`pxe`, `default`, ..), `default` before any was set.
    pub fn boot(&self) -> String {
        std::fs::read_to_string(self.dir.join("boot"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "default".into())
    }

    /// Whether the chassis is on: the recorded state, or whether the VM's QEMU lives.
    pub fn power_is_on(&self) -> bool {
        if self.dir.join("qemu.sh").exists() {
            self.vm_pid().is_some()
        } else {
            std::fs::read_to_string(self.dir.join("power")).is_ok_and(|s| s.trim() == "1")
        }
    }

    /// Waits until the VM runs after a power-on through this BMC: the chassis program starts
    /// QEMU in the background, so under load the process can take a moment to exist.
    pub fn wait_powered_on(&self) -> Result<()> {
        wait_for(
            "the VM to power on through its BMC",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || Ok(self.power_is_on().then_some(())),
        )
    }

    /// The VM's QEMU process id while it runs.
    pub fn vm_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // A zombie (state Z) is dead; the state follows the parenthesised name.
        let state = stat.rsplit_once(") ")?.1.chars().next()?;
        // A QEMU that exited on its own leaves its pid file; the pid may have been reused
        // since (and Drop kills what this returns): it must still be this VM's QEMU, or our
        // qemu.sh about to exec it.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let script = self.dir.join("qemu.sh");
        let ours = cmdline.contains(&*script.to_string_lossy())
            || self
                .vm_marker
                .as_deref()
                .is_some_and(|m| cmdline.contains(m));
        (state != 'Z' && ours).then_some(pid)
    }

    /// The last lines of `ipmi_sim`'s own output.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The last lines of the VM's QEMU stderr.
    pub fn qemu_log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("qemu.log"), lines)
    }
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        // The VM was started by the control program, not by us: kill it by its pid.
        if let Some(pid) = self.vm_pid() {
            // SAFETY: kill with a pid read from our own pid file and a valid signal.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A lab machine powered only through its BMC, as real hardware is: its QEMU runs while the
/// BMC's chassis is on. Built with [`GuestReboot::Reset`], so a guest reboot resets the VM
/// in place (the same QEMU process, the same boot order) and a guest power-off is chassis off.
/// The disk and OVMF variables are made once, for this machine's lifetime. Dropping it stops
/// the BMC and the VM (the lab's namespace teardown does too).
pub struct BmcVm {
    pub spec: VmSpec,
    pub paths: VmPaths,
    pub bmc: IpmiSim,
}

impl BmcVm {
    /// Creates the VM (powered off) and starts its `ipmi_sim` at 127.0.0.1:`port` inside the
    /// lab, with the [`IpmiSimSpec::new`] users.
    pub fn start(lab: &mut Lab, mut spec: VmSpec, port: u16) -> Result<Self> {
        spec.guest_reboot = GuestReboot::Reset;
        let (argv, paths) = qemu_argv(lab, &spec)?;
        let mut bmc_spec = IpmiSimSpec::new(&spec.name, port);
        bmc_spec.chassis = Chassis::Qemu {
            argv,
            qmp: Some(paths.qmp.clone()),
        };
        let bmc = IpmiSim::start(lab, bmc_spec)?;
        Ok(Self { spec, paths, bmc })
    }

    /// Whether the chassis is on (the VM's QEMU lives).
    pub fn is_on(&self) -> bool {
        self.bmc.power_is_on()
    }

    /// Waits until `appliance` holds machine `id`'s inventory (its agent enlisted, after a
    /// power-on someone asked for); fails when the VM powers off first or `stork serve` exits.
    pub fn wait_enlisted(
        &self,
        appliance: &mut crate::Appliance,
        id: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_for("enlistment", timeout, Duration::from_millis(250), || {
            if let Some(status) = appliance.exited() {
                bail!("stork serve exited: {status}");
            }
            // The VM is looked at before the record is read: the agent enlists and then
            // powers off, so a VM already off while the record shows no inventory never
            // enlisted (the other order races the agent).
            let was_on = self.is_on();
            if appliance.machine(id)?.inventory.is_some() {
                return Ok(Some(()));
            }
            if !was_on {
                bail!("the VM powered off before it enlisted");
            }
            Ok(None)
        })
    }

    /// Waits until the chassis is off, `what` naming what should have powered it off.
    pub fn wait_off(&self, what: &str, timeout: Duration) -> Result<()> {
        wait_for(what, timeout, Duration::from_millis(200), || {
            Ok((!self.is_on()).then_some(()))
        })
    }

    /// The running QEMU's process id: it stays the same across guest reboots and changes
    /// with every power-on.
    pub fn qemu_pid(&self) -> Option<i32> {
        self.bmc.vm_pid()
    }

    /// How many power-on requests the BMC has passed to its chassis (power on, or the on half
    /// of a cycle); a guest reboot makes none.
    pub fn power_ons(&self) -> usize {
        self.bmc
            .calls()
            .lines()
            .filter(|l| l.ends_with(" set power 1"))
            .count()
    }

    /// The last lines of the serial console (every boot of the machine, appended).
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.paths.console, lines)
    }

    /// One line naming the VM's hardware, for diagnostics.
    pub fn describe(&self) -> String {
        format!(
            "VM {} (mac {}, {} MiB, {} cpus, disk {} bytes, {:?}; BMC at {}:{})",
            self.spec.name,
            self.spec.mac,
            self.spec.memory_mib,
            self.spec.cpus,
            self.spec.disk_bytes,
            self.spec.firmware,
            self.bmc.addr,
            self.bmc.port
        )
    }

    /// Everything the BMC knows, for a failure report: its calls, QEMU's stderr, its log.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- BMC calls ---\n{}\n--- qemu (last 10 lines) ---\n{}\n--- ipmi_sim (last 10 lines) ---\n{}",
            self.bmc.calls().trim_end(),
            self.bmc.qemu_log_tail(10),
            self.bmc.log_tail(10)
        )
    }
}

/// Runs `f` on a thread that has joined network namespace `netns`, so the sockets it
/// opens live there: how a test reaches a lab BMC at 127.0.0.1 inside the lab.
pub fn in_namespace<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = open_namespace(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_namespace(&ns, netns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread inside {netns} panicked"))?
    })
}

/// Opens network namespace `netns` (as `ip netns` names it) for [`enter_namespace`].
pub(crate) fn open_namespace(netns: &str) -> Result<std::fs::File> {
    let path = format!("/run/netns/{netns}");
    std::fs::File::open(&path).with_context(|| format!("opening {path}"))
}

/// Moves the calling thread (only it) into the namespace `ns` (named `netns`); its sockets,
/// the threads it starts and the processes it spawns live there from now on.
pub(crate) fn enter_namespace(ns: &std::fs::File, netns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace fd the caller holds open; it only changes this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `'...'` quoting for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn lan_conf(spec: &IpmiSimSpec, addr: &str, prog: &Path) -> String {
    let mut lines = vec![
        format!("# Generated by stork-lab for BMC {}.", spec.name),
        format!("name \"{}\"", spec.name),
        "set_working_mc 0x20".into(),
        "startlan 1".into(),
        format!("  addr {addr} {}", spec.port),
        "  priv_limit admin".into(),
        "  allowed_auths_callback none md2 md5 straight".into(),
        "  allowed_auths_user none md2 md5 straight".into(),
        "  allowed_auths_operator none md2 md5 straight".into(),
        "  allowed_auths_admin none md2 md5 straight".into(),
        // RAKP 2 carries the GUID, and the RAKP HMACs cover it.
        "  guid a123456789abcdefa123456789abcdef".into(),
        "endlan".into(),
        format!("chassis_control \"{}\"", prog.display()),
    ];
    // User 1 is the anonymous user; named users start at 2.
    for (i, u) in spec.users.iter().enumerate() {
        lines.push(format!(
            "user {} true \"{}\" \"{}\" {} 10 none md2 md5 straight",
            i + 2,
            u.name,
            u.password,
            u.privilege.conf()
        ));
    }
    lines.push(String::new());
    lines.join("\n")
}

fn qemu_script(argv: &[String]) -> Result<String> {
    if argv.is_empty() {
        bail!("the VM's QEMU command line is empty");
    }
    let quote = |args: &[String]| {
        args.iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Ok(format!(
        "#!/bin/sh\n\
         # The VM's QEMU command line (generated by stork-lab); $1 is the BMC's boot device:\n\
         # pxe boots the NIC first, then the disk; anything else the disk first.\n\
         if [ \"$1\" = pxe ]; then set -- {net}; else set -- {disk}; fi\n\
         exec {argv} \"$@\"\n",
        net = quote(&boot_order(BootFirst::Network)),
        disk = quote(&boot_order(BootFirst::Disk)),
        argv = quote(argv),
    ))
}

fn control_script(dir: &Path, chassis: &Chassis) -> String {
    let (mode, qmp) = match chassis {
        Chassis::Recorder => ("recorder", String::new()),
        Chassis::Qemu { qmp, .. } => (
            "qemu",
            qmp.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
    };
    format!(
        r#"#!/bin/sh
# chassis_control program for ipmi_sim, generated by stork-lab.
# ipmi_sim runs `prog get power boot` and reads `name:value` lines, or
# `prog set power 0|1`, `set boot pxe|default|none|cdrom|bios`, `set reset 1`,
# `set shutdown 1`, `set identify "<secs> <force>"`. It reads our stdout until EOF, so
# whatever runs in the background must not hold stdout open.
D={dir}
MODE={mode}
QMP={qmp}
echo "$(date +%s.%N) $*" >> "$D/calls.log"

running() {{
    [ -s "$D/qemu.pid" ] || return 1
    pid=$(cat "$D/qemu.pid")
    [ -r "/proc/$pid/stat" ] || return 1
    # A zombie is dead: the state letter follows the parenthesised name.
    state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -c1)
    [ "$state" != Z ]
}}

power() {{
    if [ "$MODE" = qemu ]; then
        if running; then echo 1; else echo 0; fi
    else
        cat "$D/power" 2>/dev/null || echo 0
    fi
}}

start() {{
    if [ "$MODE" = qemu ]; then
        running && return 0
        boot=$(cat "$D/boot" 2>/dev/null || echo default)
        echo "$(date +%s.%N) starting QEMU, boot device $boot" >> "$D/qemu.log"
        "$D/qemu.sh" "$boot" </dev/null >>"$D/qemu.log" 2>&1 &
        echo $! > "$D/qemu.pid"
    else
        echo 1 > "$D/power"
    fi
}}

stop() {{
    if [ "$MODE" = qemu ]; then
        if running; then
            pid=$(cat "$D/qemu.pid")
            kill -TERM "$pid" 2>/dev/null
            i=0
            while running && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
            running && kill -KILL "$pid" 2>/dev/null
        fi
        rm -f "$D/qemu.pid"
    else
        echo 0 > "$D/power"
    fi
}}

# QMP commands ($2 on: one JSON object per argument) to the running QEMU: false when
# there is no QEMU, no socket or no python3, or QEMU refused one.
qmp() {{
    [ "$MODE" = qemu ] && running && [ -n "$QMP" ] && [ -S "$QMP" ] \
        && command -v python3 >/dev/null || return 1
    python3 - "$QMP" "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
for cmd in ['{{"execute": "qmp_capabilities"}}'] + sys.argv[2:]:
    f.write(cmd + "\n")
    f.flush()
    while True:
        answer = json.loads(f.readline())
        if "event" not in answer:
            break
    if "error" in answer:
        sys.exit(answer["error"].get("desc", "refused"))
EOF
}}

# ACPI power button through QMP when we can, else the same as power off.
shutdown() {{
    qmp '{{"execute": "system_powerdown"}}' && return 0
    stop
}}

# A real BMC's boot device holds for the next boot, a warm reset's too: a running VM
# gets the order at once (QEMU hands the firmware its boot order anew at each reset).
boot_now() {{
    if [ "$1" = pxe ]; then first={nic}; second={disk}; else first={disk}; second={nic}; fi
    set_index() {{
        echo "{{\"execute\": \"qom-set\", \"arguments\": {{\"path\": \"/machine/peripheral/$1\", \"property\": \"bootindex\", \"value\": $2}}}}"
    }}
    running || return 0
    # QEMU refuses an index another device holds: both out of the way first.
    qmp "$(set_index $first 1000)" "$(set_index $second 1001)" \
        "$(set_index $first 1)" "$(set_index $second 2)" \
        || echo "$(date +%s.%N) boot order of the running VM not changed" >> "$D/qemu.log"
}}

op=$1
shift
case "$op" in
    get)
        for p in "$@"; do
            case "$p" in
                power) echo "power:$(power)" ;;
                boot) echo "boot:$(cat "$D/boot" 2>/dev/null || echo default)" ;;
                *) echo "unknown parameter $p"; exit 1 ;;
            esac
        done
        ;;
    set)
        while [ $# -ge 2 ]; do
            case "$1" in
                power) if [ "$2" = 1 ]; then start; else stop; fi ;;
                boot) echo "$2" > "$D/boot"; boot_now "$2" ;;
                reset) if [ "$(power)" = 1 ]; then stop; start; fi ;;
                shutdown) shutdown ;;
                identify) ;;
                *) echo "unknown parameter $1"; exit 1 ;;
            esac
            shift 2
        done
        ;;
    *)
        echo "unknown operation $op"
        exit 1
        ;;
esac
"#,
        dir = sh_quote(&dir.display().to_string()),
        mode = mode,
        qmp = sh_quote(&qmp),
        nic = crate::vm::NIC_ID,
        disk = crate::vm::DISK_ID,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        let s = qemu_script(&["qemu-system-x86_64".into(), "-name".into(), "vm 1".into()]).unwrap();
        assert!(s.contains("exec 'qemu-system-x86_64' '-name' 'vm 1' \"$@\""));
        assert!(s.contains(
            "then set -- '-set' 'device.nic0.bootindex=1' '-set' 'device.disk0.bootindex=2'; \
             else set -- '-set' 'device.disk0.bootindex=1' '-set' 'device.nic0.bootindex=2'; fi"
        ));
    }

    /// The recorder program answers the protocol ipmi_sim speaks (no ipmi_sim needed).
    #[test]
    fn recorder_program_speaks_the_chassis_protocol() {
        let dir = std::env::temp_dir().join(format!("stork-bmc-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("ctl.sh");
        write_executable(&prog, &control_script(&dir, &Chassis::Recorder)).unwrap();
        let run = |args: &[&str]| crate::run(Command::new(&prog).args(args)).unwrap();
        assert_eq!(run(&["get", "power", "boot"]), "power:0\nboot:default\n");
        run(&["set", "power", "1"]);
        run(&["set", "boot", "pxe"]);
        assert_eq!(run(&["get", "power", "boot"]), "power:1\nboot:pxe\n");
        run(&["set", "identify", "15 0"]);
        assert!(
            Command::new(&prog)
                .args(["set", "bogus", "1"])
                .status()
                .unwrap()
                .code()
                == Some(1)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
