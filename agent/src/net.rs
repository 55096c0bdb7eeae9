//! Bringing up the boot NIC with the address the firmware got, through the classic
//! `SIOC*` ioctls (what busybox `ifconfig`/`route` do): a few dozen lines instead of netlink.
//!
//! All `unsafe` of the agent lives in [`ifreq_ioctl`] and [`route_ioctl`].

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use stork_proto::MacAddr;

/// Calls `f` every `interval` until it returns `Some` or `timeout` has passed.
pub fn poll_until<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(interval);
    }
}

/// Every interface in `class_net` (normally /sys/class/net) with the MAC it reports.
pub fn interfaces(class_net: &Path) -> Vec<(String, Option<MacAddr>)> {
    let Ok(entries) = fs::read_dir(class_net) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .map(|name| {
            let mac = fs::read_to_string(class_net.join(&name).join("address"))
                .ok()
                .and_then(|a| a.trim().parse().ok());
            (name, mac)
        })
        .collect();
    out.sort();
    out
}

/// The name of the interface whose hardware address is `mac`.
pub fn find_by_mac(class_net: &Path, mac: MacAddr) -> Option<String> {
    interfaces(class_net)
        .into_iter()
        .find(|(_, m)| *m == Some(mac))
        .map(|(name, _)| name)
}

/// `Some(true)` when the interface reports carrier (reading fails while it is down).
pub fn carrier(class_net: &Path, ifname: &str) -> Option<bool> {
    let text = fs::read_to_string(class_net.join(ifname).join("carrier")).ok()?;
    Some(text.trim() == "1")
}

/// The IPv4 netmask for a prefix length (0..=32).
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// An `AF_INET` datagram socket: the handle the kernel wants for interface and route ioctls.
pub struct Control(OwnedFd);

impl Control {
    pub fn new() -> Result<Self> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("open AF_INET socket for interface ioctls")?;
        Ok(Self(fd))
    }

    /// Sets `IFF_UP`, keeping the other flags.
    pub fn set_up(&self, ifname: &str) -> Result<()> {
        let mut req = ifreq(ifname)?;
        ifreq_ioctl(&self.0, libc::SIOCGIFFLAGS, &mut req)
            .with_context(|| format!("read flags of {ifname}"))?;
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel filled in the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        ifreq_ioctl(&self.0, libc::SIOCSIFFLAGS, &mut req)
            .with_context(|| format!("bring {ifname} up"))
    }

    /// Sets the interface's IPv4 address, then its netmask (the kernel derives a classful mask
    /// from the address alone, and recomputes the broadcast address and prefix route).
    pub fn set_ipv4(&self, ifname: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_addr = sockaddr(ip);
        ifreq_ioctl(&self.0, libc::SIOCSIFADDR, &mut req)
            .with_context(|| format!("set address {ip} on {ifname}"))?;
        let mask = netmask(prefix_len);
        let mut req = ifreq(ifname)?;
        req.ifr_ifru.ifru_netmask = sockaddr(mask);
        ifreq_ioctl(&self.0, libc::SIOCSIFNETMASK, &mut req)
            .with_context(|| format!("set netmask {mask} on {ifname}"))
    }

    /// Adds `default via gateway`; an existing identical route is fine.
    pub fn add_default_route(&self, gateway: Ipv4Addr) -> Result<()> {
        // SAFETY: rtentry is integers, sockaddrs and one pointer; all-zero is valid
        // (a null rt_dev lets the kernel pick the interface from the gateway).
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        match route_ioctl(&self.0, libc::SIOCADDRT, &mut rt) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("add default route via {gateway}")),
        }
    }
}

/// IPv6 addressing, through an `AF_INET6` socket (the kernel takes IPv6 address and route
/// ioctls only there).
pub struct Control6(OwnedFd);

impl Control6 {
    pub fn new() -> Result<Self> {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("open AF_INET6 socket for interface ioctls (is IPv6 in the kernel?)")?;
        Ok(Self(fd))
    }

    /// Adds `ip/prefix_len` to `ifname`, usable at once: duplicate address detection is
    /// turned off first (the address is the one the appliance's DHCPv6 leased to this
    /// machine; while DAD runs the kernel would send from the link-local address instead,
    /// and the appliance would not see the leased one).
    pub fn add_address(&self, ifname: &str, ip: Ipv6Addr, prefix_len: u8) -> Result<()> {
        let index = ifindex(ifname)?;
        for knob in ["accept_dad", "autoconf"] {
            let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{knob}");
            fs::write(&path, "0").with_context(|| format!("write 0 to {path}"))?;
        }
        let mut req = libc::in6_ifreq {
            ifr6_addr: libc::in6_addr {
                s6_addr: ip.octets(),
            },
            ifr6_prefixlen: u32::from(prefix_len),
            ifr6_ifindex: index,
        };
        // SAFETY: SIOCSIFADDR on an AF_INET6 socket takes a pointer to a struct in6_ifreq,
        // which `req` is, exclusively borrowed for the call.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::SIOCSIFADDR,
                &mut req as *mut libc::in6_ifreq,
            )
        };
        match Errno::result(rc) {
            Ok(_) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("add {ip}/{prefix_len} to {ifname}")),
        }
    }

    /// Adds `default via gateway dev ifname`; an existing identical route is fine.
    pub fn add_default_route(&self, ifname: &str, gateway: Ipv6Addr) -> Result<()> {
        let mut rt = In6Rtmsg {
            dst: [0; 16],
            src: [0; 16],
            gateway: gateway.octets(),
            kind: 0,
            dst_len: 0,
            src_len: 0,
            metric: 1,
            info: 0,
            flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
            ifindex: ifindex(ifname)?,
        };
        // SAFETY: SIOCADDRT on an AF_INET6 socket takes a pointer to a struct in6_rtmsg,
        // which `rt` is laid out as, exclusively borrowed for the call.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::SIOCADDRT,
                &mut rt as *mut In6Rtmsg,
            )
        };
        match Errno::result(rc) {
            Ok(_) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("add default route via {gateway}")),
        }
    }
}

/// `struct in6_rtmsg` (<linux/ipv6_route.h>): libc's has private fields.
#[repr(C)]
struct In6Rtmsg {
    dst: [u8; 16],
    src: [u8; 16],
    gateway: [u8; 16],
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// Adds the default route via `gateway`, of either family, on `ifname`.
pub fn add_default_route(ifname: &str, gateway: IpAddr) -> Result<()> {
    match gateway {
        IpAddr::V4(gw) => Control::new()?.add_default_route(gw),
        IpAddr::V6(gw) => Control6::new()?.add_default_route(ifname, gw),
    }
}

fn ifindex(ifname: &str) -> Result<libc::c_int> {
    let index =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    libc::c_int::try_from(index).with_context(|| format!("interface index of {ifname}"))
}

fn ifreq(ifname: &str) -> Result<libc::ifreq> {
    // The name must fit with its NUL terminator.
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        bail!("invalid interface name {ifname:?}");
    }
    // SAFETY: ifreq is a name array and a union of integers, sockaddrs and a pointer;
    // all-zero is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// An `AF_INET` sockaddr, built field by field so no pointer casts are needed.
fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    // sockaddr_in layout: 2 bytes of port (zero), then the address in network order.
    for (dst, src) in data[2..6].iter_mut().zip(ip.octets()) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

fn ifreq_ioctl(fd: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq) -> Result<(), Errno> {
    // SAFETY: every request passed here (SIOC[GS]IFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK) takes a
    // pointer to a struct ifreq, which `req` is, exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut libc::ifreq) };
    Errno::result(rc).map(drop)
}

fn route_ioctl(fd: &OwnedFd, request: libc::Ioctl, rt: &mut libc::rtentry) -> Result<(), Errno> {
    // SAFETY: SIOCADDRT takes a pointer to a struct rtentry, which `rt` is, exclusively
    // borrowed for the call; its rt_dev is null so the kernel reads nothing else.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, rt as *mut libc::rtentry) };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_from_prefix() {
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(27), Ipv4Addr::new(255, 255, 255, 224));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn sockaddr_carries_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|b| *b as u8).collect();
        assert_eq!(bytes[..6], [0, 0, 10, 77, 0, 100]);
        assert!(bytes[6..].iter().all(|b| *b == 0));
    }

    #[test]
    fn ifreq_rejects_names_the_kernel_cannot_hold() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-very-long-ifname").is_err());
    }

    #[test]
    fn finds_the_boot_nic_by_mac() {
        let dir = tempfile::tempdir().unwrap();
        for (name, addr) in [("eth0", "52:54:00:00:00:01"), ("eth1", "52:54:00:00:00:02")] {
            fs::create_dir(dir.path().join(name)).unwrap();
            fs::write(dir.path().join(name).join("address"), format!("{addr}\n")).unwrap();
        }
        fs::write(dir.path().join("eth0").join("carrier"), "1\n").unwrap();

        let mac = "52:54:00:00:00:02".parse().unwrap();
        assert_eq!(find_by_mac(dir.path(), mac).as_deref(), Some("eth1"));
        let absent = "52:54:00:00:00:09".parse().unwrap();
        assert_eq!(find_by_mac(dir.path(), absent), None);
        assert_eq!(carrier(dir.path(), "eth0"), Some(true));
        assert_eq!(carrier(dir.path(), "eth1"), None);
    }

    #[test]
    fn poll_until_gives_up_after_the_timeout() {
        let mut calls = 0;
        let got = poll_until(Duration::from_millis(30), Duration::from_millis(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, Some(3));
        let never: Option<()> =
            poll_until(Duration::from_millis(20), Duration::from_millis(5), || None);
        assert_eq!(never, None);
    }
}
