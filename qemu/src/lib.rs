//! The QEMU lab: a network namespace of its own with a bridge and taps, the appliance and
//! VMs inside it, and everything torn down when the [`Lab`] is dropped, also on panic.
//!
//! The namespace has no uplink and no route out: VMs reach the appliance and nothing else.
//! Processes started here get `PR_SET_PDEATHSIG`, so they die with the process that started
//! them even if it is killed; namespaces left by a dead owner are removed by the next lab.
//!
//! [`rootless`] is the same without root: VMs on a userspace Ethernet [`switch`] over a unix
//! socket, and a user-mode NIC with host forwards for the host to reach a VM's services.

pub mod appliance;
pub mod appliance_image;
pub mod bmc;
pub mod browser;
pub mod guest;
pub mod images;
pub mod kept;
pub mod postgres;
pub mod process;
pub mod rootless;
pub mod switch;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub use appliance::Appliance;
pub use browser::Browser;
pub use process::{Spawned, wait_for};
pub use rootless::{RootlessLab, RootlessVm, RootlessVmSpec};
pub use switch::Switch;
pub use vm::{DiskBus, ExtraDisk, Firmware, Vm, VmSpec};

/// The provisioning bridge inside the namespace and the appliance's address on it; these
/// match `stork serve`'s embedded default so the appliance needs no configuration.
pub const BRIDGE: &str = "stork0";
pub const APPLIANCE_IP: &str = "10.77.0.1";
pub const PREFIX_LEN: u8 = 24;

/// The appliance's address on an IPv6-only lab network ([`Net::Ipv6Only`]): `[dhcp6]
/// address` as `stork serve` embeds it.
pub const APPLIANCE_IP6: &str = "fd77::1";
pub const PREFIX_LEN6: u8 = 64;

/// What the lab's provisioning network carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// [`APPLIANCE_IP`] on the bridge (the embedded default's network).
    Ipv4,
    /// [`APPLIANCE_IP6`] on the bridge and no IPv4 address at all.
    Ipv6Only,
}

const NETNS_PREFIX: &str = "stork-";

/// Set to `1` to keep every lab's work directory (logs, consoles, disks), not only a failed
/// test's; the namespace and processes are still removed.
pub const KEEP_DIR_VAR: &str = "STORK_KEEP_LAB";

pub struct Lab {
    netns: String,
    dir: PathBuf,
    taps: u32,
    hosts: Vec<String>,
    keep_dir: bool,
}

/// Another namespace joined to the lab bridge by a veth pair: a client host on the
/// provisioning network (or, with its own address, a relay or another server).
pub struct Host {
    pub netns: String,
    /// The host side of the veth pair.
    pub ifname: String,
}

impl Host {
    /// A command that runs `program` inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }
}

/// Runs a command to completion and fails with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", shown(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            shown(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line for messages: its environment (the API token) is left out and a
/// `password=` argument is masked, so no secret reaches a log through a failure.
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            match a.split_once("password=") {
                Some((key, _)) => format!("{key}password=***"),
                None => a.into_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

impl Lab {
    /// Creates namespace `stork-<tag>-<pid>` (a `-` in `tag` becomes `_`) with bridge [`BRIDGE`] at [`APPLIANCE_IP`], and a
    /// work directory under `base` for logs, disks and consoles.
    pub fn new(tag: &str, base: &Path) -> Result<Self> {
        Self::with_net(tag, base, Net::Ipv4)
    }

    /// As [`Lab::new`], with the provisioning network `net`.
    pub fn with_net(tag: &str, base: &Path, net: Net) -> Result<Self> {
        if !nix_is_root() {
            bail!("the QEMU lab needs root (network namespaces, taps): run as root");
        }
        remove_stale_namespaces();
        let netns = format!(
            "{NETNS_PREFIX}{}-{}",
            tag.replace('-', "_"),
            std::process::id()
        );
        let dir = base.join(&netns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Build the guard first so a failure half-way still tears down what exists.
        let lab = Self {
            netns,
            dir,
            taps: 0,
            hosts: Vec::new(),
            keep_dir: std::env::var_os(KEEP_DIR_VAR).is_some_and(|v| v == "1"),
        };
        let ns = lab.netns.as_str();
        ip(&["netns", "add", ns])?;
        let addr = match net {
            Net::Ipv4 => format!("{APPLIANCE_IP}/{PREFIX_LEN}"),
            Net::Ipv6Only => format!("{APPLIANCE_IP6}/{PREFIX_LEN6}"),
        };
        // DAD off for the appliance's own address: usable as soon as the bridge is up.
        let nodad = if net == Net::Ipv6Only { "nodad" } else { "" };
        for args in [
            vec!["-n", ns, "link", "set", "lo", "up"],
            vec![
                "-n",
                ns,
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ],
            vec!["-n", ns, "addr", "add", &addr, "dev", BRIDGE, nodad],
            vec!["-n", ns, "link", "set", BRIDGE, "up"],
        ] {
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            ip(&args)?;
        }
        Ok(lab)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep the work directory (logs, consoles) after the lab is dropped (see also
    /// [`KEEP_DIR_VAR`]).
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Adds a tap on the bridge and returns its name.
    pub fn add_tap(&mut self) -> Result<String> {
        let name = format!("tap{}", self.taps);
        self.taps += 1;
        let ns = self.netns.as_str();
        ip(&["-n", ns, "tuntap", "add", "dev", &name, "mode", "tap"])?;
        ip(&["-n", ns, "link", "set", &name, "master", BRIDGE, "up"])?;
        Ok(name)
    }
}

impl Lab {
    /// Adds host namespace `<lab>-<name>` joined to the bridge; its interface `eth0` is up
    /// with no address (give it one, or run a DHCP client on it).
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        let netns = format!("{}-{}", self.netns, name.replace('-', "_"));
        let n = self.hosts.len();
        self.hosts.push(netns.clone());
        ip(&["netns", "add", &netns])?;
        let bridge_side = format!("veth{n}");
        ip(&[
            "-n",
            &self.netns,
            "link",
            "add",
            &bridge_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &self.netns,
            "link",
            "set",
            &bridge_side,
            "master",
            BRIDGE,
            "up",
        ])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        Ok(Host {
            netns,
            ifname: "eth0".into(),
        })
    }

    /// [`Lab::add_host`] with the static address `cidr` (`10.77.0.2/24`) on its interface.
    pub fn add_host_at(&mut self, name: &str, cidr: &str) -> Result<Host> {
        let host = self.add_host(name)?;
        ip(&["-n", &host.netns, "addr", "add", cidr, "dev", &host.ifname])?;
        Ok(host)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_namespace(h);
        }
        kill_namespace(&self.netns);
        kept::finish(&self.dir, self.keep_dir);
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Kills every process in the namespace, then deletes it.
fn kill_namespace(ns: &str) {
    for _ in 0..50 {
        let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill with a pid read from the kernel and a valid signal number.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes `stork-<tag>-<pid>[-<host>]` namespaces whose owning process no longer exists.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_shows_no_secret() {
        let mut cmd = Command::new("false");
        cmd.args(["--power-param", "password=hunter2"])
            .env("STORK_TOKEN", "stork_secret_token");
        let err = format!("{:#}", run(&mut cmd).unwrap_err());
        assert!(err.contains("password=***"), "{err}");
        assert!(
            !err.contains("hunter2") && !err.contains("stork_secret_token"),
            "{err}"
        );
    }
}
