//! IPv6 router advertisements that say "no IPv6 here", so iPXE stops waiting for one; or,
//! with DHCPv6 on (`[dhcp6]`), that addresses come from DHCPv6 (the managed flag) on the
//! provisioning prefix.
//!
//! iPXE configures every interface with DHCPv4 and IPv6 autoconfiguration in parallel and
//! waits for both: without a router it sends router solicitations for about 13 s before it
//! gives up (docs/measurements.md). A router advertisement with M = 0 and O = 0 ends its IPv6
//! configurator at once (iPXE `ndp.c`, `ipv6conf_rx_router_advertisement`). Ours also has
//! router lifetime 0 (not a default router) and no prefix, so no host configures anything
//! from it.
//!
//! Solicitations are answered at once, multicast to all nodes, at most every
//! [`MIN_INTERVAL`]: RFC 4861 section 6.2.6 asks for a random delay of up to 0.5 s and 3 s
//! between multicast answers, which would cost every booting machine that time; an
//! advertisement that configures nothing is harmless to repeat. One unsolicited
//! advertisement goes out every [`PERIOD`] as well, unless DHCPv6 is on (`answers`).
//!
//! UEFI HTTP boot clients get one more kind, unicast after DHCPv6 leased them an address:
//! [`router_hint`], which says why.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

pub const ROUTER_SOLICITATION: u8 = 133;
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// RFC 4861 option 1, source link-layer address.
const OPT_SOURCE_LL: u8 = 1;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
pub const PERIOD: Duration = Duration::from_secs(60);
/// No periodic advertisement (a day between them: tokio's timer has no "never").
const NEVER: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum RaError {
    #[error("cannot read {what} of interface {interface}")]
    Interface {
        interface: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the ICMPv6 socket on {interface}")]
    Socket {
        interface: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the advertisements say about IPv6 on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Service {
    /// Nothing here: M = 0, O = 0, no prefix (iPXE stops waiting).
    None,
    /// DHCPv6 leases addresses (M = 1, O = 1) on this on-link prefix.
    Managed { prefix: Ipv6Addr, len: u8 },
    /// DHCPv6 gives other configuration only (O = 1), the prefix on-link.
    Other { prefix: Ipv6Addr, len: u8 },
}

/// RFC 4861 option 3, prefix information.
const OPT_PREFIX: u8 = 3;
const FLAG_MANAGED: u8 = 0x80;
const FLAG_OTHER: u8 = 0x40;
/// Prefix information flag L: the prefix is on-link (no A: addresses come from DHCPv6).
const PREFIX_ON_LINK: u8 = 0x80;

/// The advertisement for `service` (router lifetime 0 always: not a default router); the
/// checksum is left to the kernel (raw ICMPv6 sockets always fill it in).
pub fn advertisement_for(mac: Option<[u8; 6]>, service: Ipv6Service) -> Vec<u8> {
    let mut p = advertisement(mac);
    let (flags, prefix) = match service {
        Ipv6Service::None => return p,
        Ipv6Service::Managed { prefix, len } => (FLAG_MANAGED | FLAG_OTHER, (prefix, len)),
        Ipv6Service::Other { prefix, len } => (FLAG_OTHER, (prefix, len)),
    };
    p[5] = flags;
    let (addr, len) = prefix;
    p.extend_from_slice(&[OPT_PREFIX, 4, len, PREFIX_ON_LINK]);
    p.extend_from_slice(&u32::MAX.to_be_bytes()); // valid lifetime: infinite
    p.extend_from_slice(&u32::MAX.to_be_bytes()); // preferred lifetime: infinite
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&addr.octets());
    p
}

/// RFC 4191 default router preference "low" (Prf = 11): a host with another router
/// prefers that one.
const PREFERENCE_LOW: u8 = 0x18;
/// Router lifetime in a [`router_hint`]: longer than any firmware's HTTP download.
const HINT_LIFETIME: u16 = 600;
/// A hint goes out this many times, this far apart: EDK2 looks for a route for 10 s after
/// its lease, and one datagram may be lost.
const HINT_REPEATS: usize = 3;
const HINT_EVERY: Duration = Duration::from_secs(2);
/// Clients waiting for a repeated hint; more are dropped (DHCPv6 rate-limits each one).
const MAX_PENDING_HINTS: usize = 256;

/// The advertisement sent to one UEFI HTTP boot client (EDK2) after DHCPv6 leased it an
/// address: this appliance as a default router (low preference), nothing else (M = 0,
/// O = 0, no prefix). EDK2 2022.11 sets its leased address with prefix length 0 and takes
/// as its gateway the first route to the server it finds, longest prefix first: without
/// a default router there is no route to the server; with an on-link prefix that route's
/// gateway is `::` and it again has none (docs/measurements.md). Sent only to the client
/// (unicast), after its lease: an M flag before its own DHCPv6 would start the
/// firmware's other DHCPv6 client, which takes the lease and leaves HTTP boot with none.
pub fn router_hint(mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut p = advertisement(mac);
    p[5] = PREFERENCE_LOW;
    p[6..8].copy_from_slice(&HINT_LIFETIME.to_be_bytes());
    p
}

/// The advertisement: no managed or other configuration, router lifetime 0, no prefix;
/// the checksum is left to the kernel (raw ICMPv6 sockets always fill it in).
pub fn advertisement(mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut p = vec![
        ROUTER_ADVERTISEMENT,
        0, // code
        0,
        0, // checksum
        0, // current hop limit: unspecified
        0, // flags: M = 0, O = 0
        0,
        0, // router lifetime 0: not a default router
        0,
        0,
        0,
        0, // reachable time: unspecified
        0,
        0,
        0,
        0, // retransmission timer: unspecified
    ];
    if let Some(mac) = mac {
        p.extend_from_slice(&[OPT_SOURCE_LL, 1]);
        p.extend_from_slice(&mac);
    }
    p
}

fn sysfs(interface: &str, what: &'static str) -> Result<String, RaError> {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/{what}"))
        .map(|s| s.trim().to_string())
        .map_err(|source| RaError::Interface {
            interface: interface.to_string(),
            what,
            source,
        })
}

/// One datagram from the raw socket and its source address.
fn recv_from(sock: &Socket, buf: &mut [u8]) -> std::io::Result<(usize, Option<Ipv6Addr>)> {
    use std::os::fd::AsRawFd;
    let (n, from) =
        nix::sys::socket::recvfrom::<nix::sys::socket::SockaddrIn6>(sock.as_raw_fd(), buf)?;
    Ok((n, from.map(|a| a.ip())))
}

/// Whether a solicitation from `from` gets an answer. Not this host's own (its kernel
/// solicits when the link comes up, just as a lab's first machine starts). With DHCPv6 on,
/// not one from the unspecified address either: EDK2 sends that as its network boot
/// starts, and the answer's M flag starts the firmware's other DHCPv6 client, which takes
/// the lease and leaves UEFI HTTP boot without one (docs/measurements.md). Hosts solicit
/// again from their link-local address, and [`router_hint`] serves EDK2.
fn answers(service: Ipv6Service, from: Ipv6Addr, own: &mut OwnAddresses) -> bool {
    if from.is_unspecified() {
        return service == Ipv6Service::None;
    }
    !own.contains(from)
}

/// An interface's own IPv6 addresses, read from `/proc/net/if_inet6` at most once per
/// [`OwnAddresses::FRESH`]: solicitations are unauthenticated input, and a flood of them
/// must not mean a file read each.
struct OwnAddresses {
    interface: String,
    addrs: Vec<Ipv6Addr>,
    read: Option<Instant>,
}

impl OwnAddresses {
    /// Addresses come and go (the link-local one once its DAD is done): this old at most.
    const FRESH: Duration = Duration::from_secs(1);

    fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_string(),
            addrs: Vec::new(),
            read: None,
        }
    }

    fn contains(&mut self, addr: Ipv6Addr) -> bool {
        if self.read.is_none_or(|at| at.elapsed() >= Self::FRESH) {
            let text = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
            self.addrs = parse_if_inet6(&text, &self.interface);
            self.read = Some(Instant::now());
        }
        self.addrs.contains(&addr)
    }
}

/// `interface`'s addresses in `/proc/net/if_inet6` text: per line 32 hex digits, index,
/// prefix length, scope, flags, name.
fn parse_if_inet6(text: &str, interface: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.last() != Some(&interface) {
                return None;
            }
            u128::from_str_radix(f.first()?, 16)
                .ok()
                .map(Ipv6Addr::from)
        })
        .collect()
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<stork_proto::MacAddr>().ok().map(|m| m.0)
}

/// Answers router solicitations on `interface` until the task is cancelled, and sends
/// [`router_hint`] to each link-local address that comes on `hints`. Fails only at start
/// (no such interface, no IPv6); the caller logs that and carries on without.
pub async fn run(
    interface: String,
    service: Ipv6Service,
    hints: tokio::sync::broadcast::Receiver<Ipv6Addr>,
) -> Result<(), RaError> {
    let mut hints = Some(hints);
    let ifindex: u32 = sysfs(&interface, "ifindex")?
        .parse()
        .map_err(|_| RaError::Interface {
            interface: interface.clone(),
            what: "ifindex",
            source: std::io::ErrorKind::InvalidData.into(),
        })?;
    let mac = sysfs(&interface, "address")
        .ok()
        .and_then(|m| parse_mac(&m));
    let err = |source| RaError::Socket {
        interface: interface.clone(),
        source,
    };
    let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(err)?;
    sock.bind_device(Some(interface.as_bytes())).map_err(err)?;
    // RFC 4861: receivers drop neighbour discovery packets whose hop limit is not 255.
    sock.set_multicast_hops_v6(255).map_err(err)?;
    sock.set_unicast_hops_v6(255).map_err(err)?;
    sock.set_multicast_loop_v6(false).map_err(err)?;
    sock.join_multicast_v6(&ALL_ROUTERS, ifindex).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same for
    // the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(sock) }.map_err(|e| err(e.into()))?;
    let all_nodes = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, ifindex));
    let ra = advertisement_for(mac, service);
    let hint = router_hint(mac);
    tracing::info!(%interface, ?service, "answering IPv6 router solicitations");

    let send = |what: &[u8], to: &SockAddr, why: &str| match fd.get_ref().send_to(what, to) {
        Ok(_) => {
            tracing::debug!(%interface, why, to = ?to.as_socket(), "router advertisement sent")
        }
        Err(e) => tracing::warn!(%interface, error = %e, "router advertisement failed"),
    };
    // Nothing is sent at start: the interface's link-local address may still be tentative.
    let mut last = Instant::now();
    // With DHCPv6 on, only solicitations are answered: an unsolicited M flag may reach an
    // EDK2 HTTP boot client before its DHCPv6 ([`answers`]).
    let period = match service {
        Ipv6Service::None => PERIOD,
        Ipv6Service::Managed { .. } | Ipv6Service::Other { .. } => NEVER,
    };
    let mut next_periodic = last + period;
    // Hints still to repeat: (when, to whom, how many sent).
    let mut pending: Vec<(Instant, Ipv6Addr, usize)> = Vec::new();
    let mut own = OwnAddresses::new(&interface);
    let mut buf = [0u8; 1500];
    loop {
        let due = pending
            .iter()
            .map(|p| p.0)
            .min()
            .map_or(next_periodic, |d| d.min(next_periodic));
        tokio::select! {
            readable = fd.readable() => {
                let mut guard = match readable {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(%interface, error = %e, "ICMPv6 socket failed; no more router advertisements");
                        return Ok(());
                    }
                };
                // Drain everything queued; answer once if any of it was a solicitation to
                // answer ([`answers`]).
                let mut solicited = false;
                loop {
                    match guard.try_io(|inner| recv_from(inner.get_ref(), &mut buf)) {
                        Ok(Ok((n, from))) => {
                            solicited |= n >= 8
                                && buf[0] == ROUTER_SOLICITATION
                                && from.is_some_and(|a| answers(service, a, &mut own));
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "ICMPv6 receive failed");
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
                if solicited && last.elapsed() >= MIN_INTERVAL {
                    send(&ra, &all_nodes, "solicited");
                    last = Instant::now();
                    next_periodic = last + period;
                }
            }
            hinted = async {
                match hints.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => match hinted {
                Ok(to) if to.is_unicast_link_local() && pending.len() < MAX_PENDING_HINTS => {
                    pending.retain(|p| p.1 != to);
                    pending.push((Instant::now(), to, 0));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "router hints lagged");
                }
                // DHCPv6 stopped: carry on answering solicitations.
                Err(tokio::sync::broadcast::error::RecvError::Closed) => hints = None,
            },
            () = tokio::time::sleep_until(due.into()) => {
                let now = Instant::now();
                if now >= next_periodic {
                    send(&ra, &all_nodes, "periodic");
                    last = now;
                    next_periodic = now + period;
                }
                for p in pending.iter_mut().filter(|p| p.0 <= now) {
                    let to = SockAddr::from(SocketAddrV6::new(p.1, 0, 0, ifindex));
                    send(&hint, &to, "router hint");
                    p.2 += 1;
                    p.0 = now + HINT_EVERY;
                }
                pending.retain(|p| p.2 < HINT_REPEATS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_configures_nothing() {
        let p = advertisement(Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(p.len(), 24);
        assert_eq!(p[0], ROUTER_ADVERTISEMENT);
        assert_eq!(p[5], 0, "M and O clear");
        assert_eq!(&p[6..8], &[0, 0], "router lifetime 0");
        assert_eq!(&p[16..24], &[1, 1, 0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(advertisement(None).len(), 16);
        assert_eq!(
            parse_mac("52:54:00:01:02:03"),
            Some([0x52, 0x54, 0, 1, 2, 3])
        );
    }

    #[test]
    fn a_managed_advertisement_names_dhcpv6_and_the_on_link_prefix() {
        let prefix: Ipv6Addr = "fd77::".parse().unwrap();
        let p = advertisement_for(None, Ipv6Service::Managed { prefix, len: 64 });
        assert_eq!(p[5], 0xc0, "M and O set");
        assert_eq!(&p[6..8], &[0, 0], "still not a default router");
        assert_eq!(
            &p[16..20],
            &[3, 4, 64, 0x80],
            "prefix option, on-link, no autonomous"
        );
        assert_eq!(&p[32..48], &prefix.octets());
        let o = advertisement_for(None, Ipv6Service::Other { prefix, len: 64 });
        assert_eq!(o[5], 0x40, "O only");
        assert_eq!(
            advertisement_for(None, Ipv6Service::None),
            advertisement(None)
        );
    }

    #[test]
    fn own_addresses_are_known_by_interface() {
        let text = "fe800000000000007c0d4bfffe56c1d0 02 40 20 80   stork0\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n";
        let ll: Ipv6Addr = "fe80::7c0d:4bff:fe56:c1d0".parse().unwrap();
        assert_eq!(parse_if_inet6(text, "stork0"), [ll]);
        assert_eq!(parse_if_inet6(text, "lo"), [Ipv6Addr::LOCALHOST]);
        assert!(parse_if_inet6(text, "eth0").is_empty());
        // The live table: a solicitation from an address the interface lacks is answered,
        // from `::` only without DHCPv6.
        let mut own = OwnAddresses::new("no-such-if");
        assert!(answers(Ipv6Service::None, ll, &mut own));
        assert!(answers(Ipv6Service::None, Ipv6Addr::UNSPECIFIED, &mut own));
        let managed = Ipv6Service::Managed {
            prefix: "fd77::".parse().unwrap(),
            len: 64,
        };
        assert!(!answers(managed, Ipv6Addr::UNSPECIFIED, &mut own));
        assert!(answers(managed, ll, &mut own));
        // This host's loopback, where it has IPv6 (Linux unless disabled).
        if std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| t.contains(" lo\n")) {
            assert!(!answers(
                Ipv6Service::None,
                Ipv6Addr::LOCALHOST,
                &mut OwnAddresses::new("lo")
            ));
        }
    }

    #[test]
    fn a_router_hint_names_a_default_router_and_nothing_else() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let p = router_hint(Some(mac));
        assert_eq!(p.len(), 24, "no prefix option");
        assert_eq!(p[5], 0x18, "M and O clear, preference low");
        assert_eq!(
            &p[6..8],
            &600u16.to_be_bytes(),
            "a default router for 10 minutes"
        );
        assert_eq!(&p[16..24], &[1, 1, 0x52, 0x54, 0, 1, 2, 3]);
    }
}
