//! The appliance's network, as systemd-networkd runtime configuration: `.network` files in
//! `/run/systemd/network/` (networkd's own place for configuration made at boot; nothing
//! edits files behind networkd's back), then networkd's `Reload()` over D-Bus
//! ([`super::dbus`]).
//!
//! Two shapes: the provisioning interface with its static address (Stork serves DHCP there,
//! so it runs no DHCP client and waits for no router) and every other Ethernet NIC as a DHCP
//! client (the management network); or, in the safe state (no usable config), a DHCP client
//! on every Ethernet NIC, the first address that comes being where the API is announced.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Our files start with this, so a new run removes exactly what an older one wrote.
pub const FILE_PREFIX: &str = "50-stork-";

/// Where networkd reads runtime configuration.
pub const RUNTIME_DIR: &str = "/run/systemd/network";

/// `ARPHRD_ETHER` in `/sys/class/net/X/type`.
const ARPHRD_ETHER: u32 = 1;

/// A NIC as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub ifindex: u32,
}

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The physical Ethernet NICs under `sys_class_net` (normally `/sys/class/net`), by ifindex:
/// type Ethernet and backed by a device (`device` exists), so loopback, bridges, veths,
/// tunnels and other virtual links are left out.
pub fn ethernet_nics(sys_class_net: &Path) -> Vec<Nic> {
    let Ok(entries) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let read_u32 =
        |p: PathBuf| -> Option<u32> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let mut nics: Vec<Nic> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let dir = sys_class_net.join(&name);
            if name == "lo"
                || read_u32(dir.join("type"))? != ARPHRD_ETHER
                || !dir.join("device").exists()
            {
                return None;
            }
            Some(Nic {
                ifindex: read_u32(dir.join("ifindex"))?,
                name,
            })
        })
        .collect();
    nics.sort_by_key(|n| (n.ifindex, n.name.clone()));
    nics
}

/// One `.network` file: its name in the directory and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFile {
    pub name: String,
    pub text: String,
}

/// The configured state: `interface` with the static `address` (Stork serves DHCP there),
/// and the `management` NICs as DHCP clients.
pub fn provisioning(interface: &str, address: Ipv4Cidr, management: &[String]) -> Vec<NetworkFile> {
    let mut files = vec![NetworkFile {
        name: format!("{FILE_PREFIX}provisioning.network"),
        text: format!(
            "# Written by `stork appliance setup` from stork.toml: the provisioning network,
# where Stork serves DHCP. No DHCP client, no IPv6 autoconfiguration, and the address is
# set even without a cable (Stork binds to it at start).
[Match]
Name={interface}

[Network]
Address={address}
DHCP=no
LinkLocalAddressing=no
IPv6AcceptRA=no
ConfigureWithoutCarrier=yes
"
        ),
    }];
    if !management.is_empty() {
        files.push(dhcp_client(
            "management",
            &management.join(" "),
            "every other Ethernet NIC: the management network, configured by DHCP",
        ));
    }
    files
}

/// The safe state: a DHCP client on `nics` (space-separated: every Ethernet NIC, since which
/// port of a new box is cabled is not known), so the API is reachable for a fix while Stork's
/// own DHCP server stays off.
pub fn safe(nics: &str) -> Vec<NetworkFile> {
    vec![dhcp_client(
        "safe",
        nics,
        "the safe state (no usable stork.toml): the Ethernet NICs, configured by DHCP",
    )]
}

fn dhcp_client(what: &str, names: &str, why: &str) -> NetworkFile {
    NetworkFile {
        name: format!("{FILE_PREFIX}{what}.network"),
        text: format!(
            "# Written by `stork appliance setup`: {why}.
[Match]
Name={names}

[Network]
DHCP=yes
"
        ),
    }
}

/// Replaces the files an earlier run wrote in `dir` with `files`.
pub fn install(dir: &Path, files: &[NetworkFile]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(FILE_PREFIX) && name.ends_with(".network") {
            std::fs::remove_file(e.path())?;
        }
    }
    for f in files {
        super::write_file(&dir.join(&f.name), f.text.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// The IPv4 addresses `interface` has now (`getifaddrs`), link-local ones left out.
pub fn ipv4_addresses(interface: &str) -> Vec<Ipv4Cidr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| {
            let addr = a.address?.as_sockaddr_in()?.ip();
            let mask = a.netmask?.as_sockaddr_in()?.ip();
            Some(Ipv4Cidr {
                addr,
                prefix_len: u32::from(mask).count_ones() as u8,
            })
        })
        .filter(|c| !c.addr.is_link_local())
        .collect()
}

/// Calls `probe` until it gives something or `deadline` passes (probing once more then).
pub fn wait_until<T>(
    deadline: Instant,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(every.min(deadline - now));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_provisioning_interface_is_static_and_the_rest_dhcp() {
        let files = provisioning(
            "enp1s0",
            Ipv4Cidr {
                addr: Ipv4Addr::new(10, 77, 0, 1),
                prefix_len: 24,
            },
            &["enp2s0".into(), "enp3s0".into()],
        );
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].name, "50-stork-provisioning.network");
        let p = &files[0].text;
        for line in [
            "[Match]\nName=enp1s0\n",
            "[Network]\nAddress=10.77.0.1/24\nDHCP=no\nLinkLocalAddressing=no\n\
             IPv6AcceptRA=no\nConfigureWithoutCarrier=yes\n",
        ] {
            assert!(p.contains(line), "{p}");
        }
        assert_eq!(files[1].name, "50-stork-management.network");
        assert!(
            files[1]
                .text
                .ends_with("[Match]\nName=enp2s0 enp3s0\n\n[Network]\nDHCP=yes\n"),
            "{}",
            files[1].text
        );
        // No other NIC: no management file.
        assert_eq!(
            provisioning(
                "eth0",
                Ipv4Cidr {
                    addr: Ipv4Addr::new(10, 0, 0, 1),
                    prefix_len: 16
                },
                &[]
            )
            .len(),
            1
        );
        let s = safe("eno1");
        assert_eq!(s[0].name, "50-stork-safe.network");
        assert!(
            s[0].text
                .ends_with("[Match]\nName=eno1\n\n[Network]\nDHCP=yes\n")
        );
    }

    /// A fake `/sys/class/net`.
    pub(crate) fn fake_nic(sys: &Path, name: &str, ifindex: u32, kind: u32, device: bool) {
        let dir = sys.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ifindex"), format!("{ifindex}\n")).unwrap();
        std::fs::write(dir.join("type"), format!("{kind}\n")).unwrap();
        if device {
            std::fs::create_dir_all(dir.join("device")).unwrap();
        }
    }

    #[test]
    fn finds_physical_ethernet_nics_by_ifindex() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        fake_nic(sys, "lo", 1, 772, false);
        fake_nic(sys, "enp3s0", 4, 1, true);
        fake_nic(sys, "enp1s0", 3, 1, true);
        fake_nic(sys, "br0", 2, 1, false);
        fake_nic(sys, "wg0", 5, 65534, false);
        fake_nic(sys, "ib0", 6, 32, true);
        assert_eq!(
            ethernet_nics(sys),
            [
                Nic {
                    name: "enp1s0".into(),
                    ifindex: 3
                },
                Nic {
                    name: "enp3s0".into(),
                    ifindex: 4
                }
            ]
        );
        assert!(ethernet_nics(&sys.join("missing")).is_empty());
    }

    #[test]
    fn install_replaces_our_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("50-stork-old.network"), "x").unwrap();
        std::fs::write(dir.path().join("10-other.network"), "y").unwrap();
        install(dir.path(), &safe("eth0")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["10-other.network", "50-stork-safe.network"]);
    }

    #[test]
    fn loopback_has_no_address_we_use_and_waits_end() {
        // 127.0.0.1 is not link-local, so `lo` shows it when the test host has one.
        let lo = ipv4_addresses("lo");
        assert!(lo.iter().all(|c| !c.addr.is_link_local()));
        assert!(ipv4_addresses("no-such-nic0").is_empty());
        let start = Instant::now();
        let none: Option<()> = wait_until(
            start + Duration::from_millis(30),
            Duration::from_millis(5),
            || None,
        );
        assert!(none.is_none() && start.elapsed() >= Duration::from_millis(30));
        let mut n = 0;
        assert_eq!(
            wait_until(
                start + Duration::from_secs(5),
                Duration::from_millis(1),
                || {
                    n += 1;
                    (n == 3).then_some(n)
                }
            ),
            Some(3)
        );
    }
}
