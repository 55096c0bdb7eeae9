//! The DHCPv6 service (`[dhcp6]`): a socket loop on UDP 547 of the provisioning interface,
//! joined to All_DHCP_Relay_Agents_and_Servers (ff02::1:2), around the sans-IO [`handler`].
//!
//! Leases are made durable before the reply that grants them leaves ([`leases`]), and read
//! back at start: a restart, even a `kill -9`, keeps them.

pub mod edge;
pub mod handler;
pub mod leases;

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

pub use handler::{Dhcp6Config, Handled, Handler, Ignored, Mode, ServerInfo};

use crate::config::ConfigError;
use leases::Change;

/// The server port; clients listen on 546.
pub const SERVER_PORT: u16 = 547;
/// All_DHCP_Relay_Agents_and_Servers, link scope (RFC 8415 section 7.1).
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
/// A DHCPv6 message fits one unfragmented IPv6 packet on any provisioning link.
pub const MAX_PACKET: usize = 1500;

counters! {
    /// The DHCPv6 service's counters, in `/stats` as `dhcp6`.
    Stats, StatsSnapshot;
    /// Datagrams received on port 547.
    received,
    /// Replies sent (Advertise and Reply).
    replied,
    /// Dropped, by reason: not a DHCPv6 message (or longer than [`MAX_PACKET`]); a type
    /// servers do not answer; no client identifier; for another server; not served here
    /// (off, or stateless and not an Information-request).
    drop_malformed,
    drop_not_for_servers,
    drop_no_client_id,
    drop_other_server,
    drop_not_served,
    /// Dropped by the per-source-address rate limit (`dhcp6.rate_limit`).
    rate_limited,
    /// Datagrams whose handling panicked (a bug): each was dropped, the service kept on.
    panics,
    send_errors,
    /// Lease file writes that failed (their replies were withheld).
    journal_errors,
    /// Leases read back from the lease file when the service last started.
    leases_restored,
}

/// `[dhcp6]` as written in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dhcp6File {
    pub mode: Mode,
    pub address: Ipv6Addr,
    pub prefix_len: u8,
    pub range: [Ipv6Addr; 2],
    pub lease_time: u32,
    /// Requests per second (and burst) from one source address; 0 = no limit.
    pub rate_limit: u32,
    pub rate_burst: u32,
}

impl Default for Dhcp6File {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            address: Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1),
            prefix_len: 64,
            range: [
                Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100),
                Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x1ff),
            ],
            lease_time: 3600,
            rate_limit: 10,
            rate_burst: 20,
        }
    }
}

fn invalid(field: &str, why: &str) -> ConfigError {
    ConfigError::InvalidAt {
        field: format!("dhcp6.{field}"),
        why: why.to_string(),
    }
}

impl Dhcp6File {
    pub fn validate(&self) -> Result<Dhcp6Config, ConfigError> {
        if !(8..=128).contains(&self.prefix_len) {
            return Err(invalid("prefix_len", "must be 8..=128"));
        }
        let cfg = Dhcp6Config {
            mode: self.mode,
            address: self.address,
            prefix_len: self.prefix_len,
            range: (self.range[0], self.range[1]),
            lease_time: self.lease_time,
            rate_limit: crate::dhcp::config::RateLimit::from_file(self.rate_limit, self.rate_burst),
        };
        if self.mode == Mode::Off {
            return Ok(cfg);
        }
        let unicast = !(self.address.is_unspecified()
            || self.address.is_multicast()
            || self.address.is_loopback());
        if !unicast {
            return Err(invalid("address", "must be a unicast address"));
        }
        if self.lease_time < 60 {
            return Err(invalid("lease_time", "must be at least 60 seconds"));
        }
        if u128::from(self.range[0]) > u128::from(self.range[1]) {
            return Err(invalid("range", "the first address is after the last"));
        }
        for a in self.range {
            if !handler::same_prefix(a, self.address, self.prefix_len) {
                return Err(invalid(
                    "range",
                    "must be inside the address's prefix (address/prefix_len)",
                ));
            }
        }
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Dhcp6Error {
    #[error("cannot open the DHCPv6 socket on {interface}")]
    Bind {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {what} of interface {interface}")]
    Interface {
        interface: String,
        what: &'static str,
    },
    #[error("DHCPv6 receive failed")]
    Recv(#[source] std::io::Error),
    #[error("the DHCPv6 lease file")]
    Leases(#[from] crate::dhcp::journal::JournalError),
    #[error("the DHCPv6 lease file's task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the DHCPv6 lease file was lost to a failed write task")]
    LeaseFileLost,
}

/// The interface's index and MAC, from sysfs.
fn interface(interface: &str) -> Result<(u32, [u8; 6]), Dhcp6Error> {
    let read = |what: &'static str| {
        std::fs::read_to_string(format!("/sys/class/net/{interface}/{what}"))
            .map(|s| s.trim().to_string())
            .map_err(|_| Dhcp6Error::Interface {
                interface: interface.to_string(),
                what,
            })
    };
    let index = read("ifindex")?
        .parse()
        .map_err(|_| Dhcp6Error::Interface {
            interface: interface.to_string(),
            what: "ifindex",
        })?;
    let mac = read("address")?
        .parse::<stork_proto::MacAddr>()
        .map_err(|_| Dhcp6Error::Interface {
            interface: interface.to_string(),
            what: "address",
        })?;
    Ok((index, mac.0))
}

/// Binds [`SERVER_PORT`] on `interface` and joins [`ALL_SERVERS`] there; returns the socket
/// and this server's DUID (DUID-LL of the interface's MAC).
pub fn bind(interface: &str) -> Result<(UdpSocket, Vec<u8>), Dhcp6Error> {
    let err = |source| Dhcp6Error::Bind {
        interface: interface.to_string(),
        source,
    };
    let (index, mac) = self::interface(interface)?;
    let sock = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    sock.set_only_v6(true).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.bind_device(Some(interface.as_bytes())).map_err(err)?;
    sock.set_multicast_loop_v6(false).map_err(err)?;
    sock.join_multicast_v6(&ALL_SERVERS, index).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    let addr = SocketAddr::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, SERVER_PORT, 0, 0));
    sock.bind(&addr.into()).map_err(err)?;
    let sock = UdpSocket::from_std(sock.into()).map_err(err)?;
    Ok((sock, handler::duid_ll(mac)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn count_drop(stats: &Stats, why: &Ignored) {
    let c = match why {
        Ignored::Malformed => &stats.drop_malformed,
        Ignored::NotForServers => &stats.drop_not_for_servers,
        Ignored::NoClientId => &stats.drop_no_client_id,
        Ignored::OtherServer => &stats.drop_other_server,
        Ignored::NotServed => &stats.drop_not_served,
    };
    crate::dhcp::bump(c);
}

/// Where the lease file lives in the data directory.
pub fn leases_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join(leases::FILE_NAME)
}

/// Serves DHCPv6 on `sock` until the task is cancelled or the socket fails, with the leases
/// in the file at `leases_path`.
pub async fn run(
    sock: UdpSocket,
    info: ServerInfo,
    leases_path: std::path::PathBuf,
    stats: Arc<Stats>,
    shared: Arc<crate::dhcp::leases::Leases>,
    router_hints: tokio::sync::broadcast::Sender<std::net::Ipv6Addr>,
) -> Result<(), Dhcp6Error> {
    let (file, restored) =
        tokio::task::spawn_blocking(move || leases::LeaseFile::open(&leases_path, unix_now()))
            .await
            .map_err(|e| Dhcp6Error::Recv(std::io::Error::other(e)))??;
    tracing::info!(
        mode = ?info.cfg.mode,
        address = %info.cfg.address,
        range = ?info.cfg.range,
        leases = restored.len(),
        "DHCPv6 serving"
    );
    stats
        .leases_restored
        .store(restored.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut limiter = info
        .cfg
        .rate_limit
        .map(crate::ratelimit::RateLimiter::<std::net::IpAddr>::new);
    let mut handler = Handler::new(info);
    for lease in restored {
        if let Some(mac) = lease.mac {
            shared.set6(mac, lease.addr);
        }
        handler.pool.restore(lease);
    }
    // Moved to the blocking pool for each write and back: one write at a time, in order.
    let mut file = Some(file);
    // One byte more than the largest message taken, to see an oversized one.
    let mut buf = vec![0u8; MAX_PACKET + 1];
    loop {
        // Group commit: the first datagram is waited for, then whatever else is already
        // queued (up to [`BATCH`]) is handled too, and all their lease changes are made
        // durable by one write and one fdatasync before any of their replies goes out.
        let mut batch = Batch::default();
        let first = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Dhcp6Error::Recv(e)),
        };
        let mut next = Some(first);
        while let Some((len, peer)) = next.take() {
            let bytes = buf.get(..len.min(buf.len())).unwrap_or_default();
            take(
                &mut handler,
                &mut limiter,
                &stats,
                bytes,
                len,
                peer,
                &mut batch,
            );
            if batch.held.len() >= BATCH {
                break;
            }
            next = match sock.try_recv_from(&mut buf) {
                Ok(r) => Some(r),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Err(e) => return Err(Dhcp6Error::Recv(e)),
            };
        }
        // Answers that change nothing go out at once.
        for (reply, peer) in batch.free.drain(..) {
            send(&sock, &stats, &reply, peer, false, &router_hints).await;
        }
        if batch.held.is_empty() {
            continue;
        }
        let Some(mut f) = file.take() else {
            return Err(Dhcp6Error::LeaseFileLost);
        };
        let changes = std::mem::take(&mut batch.changes);
        let (f, changes, written) = tokio::task::spawn_blocking(move || {
            let r = f.append(&changes);
            (f, changes, r)
        })
        .await?;
        file = Some(f);
        if let Err(e) = written {
            // A lease that is not durable is not granted.
            crate::dhcp::bump(&stats.journal_errors);
            tracing::error!(error = %e, replies = batch.held.len(), "DHCPv6 leases not written; replies withheld");
            continue;
        }
        // Boot scripts give agent tokens to the holders of these leases.
        shared.apply6(&changes);
        for (reply, peer, hint) in batch.held.drain(..) {
            send(&sock, &stats, &reply, peer, hint, &router_hints).await;
        }
    }
}

/// Messages handled together ([`run`]'s group commit).
#[derive(Default)]
struct Batch {
    /// Replies that need no write.
    free: Vec<(Vec<u8>, SocketAddr)>,
    /// Replies sent once `changes` are durable, with their router hint.
    held: Vec<(Vec<u8>, SocketAddr, bool)>,
    changes: Vec<Change>,
}

/// The most replies held for one write: enough to share an fdatasync among a burst, few
/// enough that the first of them is not kept waiting long.
const BATCH: usize = 64;

/// Handles one datagram of `len` bytes (`bytes`, at most [`MAX_PACKET`] + 1) from `peer`
/// into `batch`: counted, rate-limited, checked, answered or dropped with its reason.
fn take(
    handler: &mut Handler,
    limiter: &mut Option<crate::ratelimit::RateLimiter<std::net::IpAddr>>,
    stats: &Stats,
    bytes: &[u8],
    len: usize,
    peer: SocketAddr,
    batch: &mut Batch,
) {
    crate::dhcp::bump(&stats.received);
    if let Some(l) = limiter.as_mut()
        && !l.allow(peer.ip(), SystemTime::now())
    {
        crate::dhcp::bump(&stats.rate_limited);
        return;
    }
    let result = if len > MAX_PACKET {
        Err(Ignored::Malformed)
    } else {
        let from = match peer.ip() {
            std::net::IpAddr::V6(v6) => Some(v6),
            std::net::IpAddr::V4(_) => None,
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handler.handle_from(bytes, unix_now(), from)
        })) {
            Ok(r) => r,
            Err(p) => {
                crate::dhcp::bump(&stats.panics);
                tracing::error!(%peer, panic = %crate::supervise::panic_message(&*p), "DHCPv6 handling panicked; datagram dropped");
                return;
            }
        }
    };
    match result {
        Ok(h) if h.changes.is_empty() => batch.free.push((h.reply, peer)),
        Ok(h) => {
            batch.changes.extend(h.changes);
            batch.held.push((h.reply, peer, h.router_hint));
        }
        Err(why) => {
            count_drop(stats, &why);
            tracing::debug!(%peer, reason = %why, "DHCPv6 request dropped");
        }
    }
}

/// Sends one reply; a UEFI HTTP boot client that got an address is named to the RA
/// service ([`crate::dhcp::ra::router_hint`]).
async fn send(
    sock: &UdpSocket,
    stats: &Stats,
    reply: &[u8],
    peer: SocketAddr,
    router_hint: bool,
    router_hints: &tokio::sync::broadcast::Sender<std::net::Ipv6Addr>,
) {
    match sock.send_to(reply, peer).await {
        Ok(_) => {
            crate::dhcp::bump(&stats.replied);
            if let (true, std::net::IpAddr::V6(ll)) = (router_hint, peer.ip()) {
                // No receiver (router advertisements off): nothing to do.
                let _ = router_hints.send(ll);
            }
        }
        Err(e) => {
            crate::dhcp::bump(&stats.send_errors);
            tracing::debug!(%peer, error = %e, "DHCPv6 reply not sent");
        }
    }
}
