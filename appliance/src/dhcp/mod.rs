//! DHCPv4 service: the socket loop around the sans-IO [`handler`], the durable lease
//! [`journal`], and router advertisements ([`ra`]) that keep iPXE from waiting for IPv6.

pub mod client;
pub mod config;
pub mod datagram;
pub mod edge;
pub mod handler;
pub mod journal;
pub mod leases;
pub mod pool;
pub mod ra;
pub mod reply;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

pub use datagram::{Action, Port, Server};
pub use edge::MAX_PACKET;
use handler::{Handler, ServerInfo};
use journal::{Journal, JournalError};
pub use leases::Leases;

/// The PXE boot server port (PXE 2.1), served in proxy mode.
pub const PXE_PORT: u16 = 4011;

counters! {
    /// Counters exposed through the API (`stork stats`).
    Stats, StatsSnapshot;
    /// Datagrams received on ports 67 and 4011.
    received,
    /// Dropped at the edge as not a DHCP request we serve (every reason below but oversized).
    malformed,
    /// Longer than [`MAX_PACKET`].
    oversized,
    /// Dropped at the edge, by reason: shorter than the header and cookie; not a
    /// BOOTREQUEST; not 6-byte Ethernet (any other `htype`/`hlen`); no magic cookie; an
    /// option past the end or of a length the decoder would trust; no message type; the
    /// decoder refused it.
    drop_truncated,
    drop_not_request,
    drop_hardware,
    drop_no_cookie,
    drop_options,
    drop_no_message_type,
    drop_decode,
    /// Datagrams whose handling panicked (a bug): each was dropped, the service kept on.
    panics,
    /// Received, by message type.
    discover,
    request,
    decline,
    release,
    inform,
    /// Replies sent, all kinds, by the socket loop and the journal writer alike
    /// ([`reply`] counts both).
    replied,
    offers,
    acks,
    naks,
    /// Boot-only answers (proxy mode, both ports).
    proxy_replies,
    /// Requests answered with nothing (any reason, rate limiting included).
    ignored,
    /// Dropped by the per-MAC rate limit (`dhcp.rate_limit`).
    rate_limited,
    /// Dropped by the per-source-address rate limit (`dhcp.rate_limit_source`).
    rate_limited_source,
    /// Dropped by the global rate limit (`dhcp.rate_limit_global`).
    rate_limited_global,
    /// Relayed requests refused: giaddr in no configured subnet, or sent from an address
    /// that is not a trusted relay (`dhcp.relays`).
    relay_refused,
    /// DHCPDECLINEs not honoured: not from the address's holder or offeree, for another
    /// client's reservation, for an address not ours, or with the probation cap reached.
    decline_refused,
    send_errors,
    /// Journal batches made durable (one fdatasync each) and records in them.
    journal_syncs,
    journal_records,
    /// Journal writes that failed (their ACKs were withheld).
    journal_errors,
    /// Replies dropped because the journal writer was too far behind.
    journal_busy,
    /// Leases read back from the journal when the service last started: a restart of the
    /// appliance keeps them.
    leases_restored,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("cannot open the DHCP socket on interface {interface} port {port}")]
    Bind {
        interface: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("DHCP socket receive failed")]
    Recv(#[source] std::io::Error),
    #[error("cannot share the DHCP socket with the journal writer")]
    Clone(#[source] std::io::Error),
    #[error("lease journal")]
    Journal(#[from] JournalError),
}

/// Opens UDP `port` on every address, restricted to `interface` so DHCP is answered on the
/// provisioning network only, with broadcast allowed for replies to clients without an address.
pub fn bind(interface: &str, port: u16) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Bind {
        interface: interface.to_string(),
        port,
        source,
    };
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_broadcast(true).map_err(err)?;
    if !interface.is_empty() {
        sock.bind_device(Some(interface.as_bytes())).map_err(err)?;
    }
    // Bursts (a rack powering on, a benchmark) must queue rather than drop.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_nonblocking(true).map_err(err)?;
    let addr = SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    sock.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(sock.into()).map_err(err)
}

/// Serves DHCP on `sock` (port 67) and, in proxy mode, `pxe` (port 4011) until the task is
/// cancelled. Leases live in the journal at `journal_path`, loaded first.
pub async fn run(
    sock: UdpSocket,
    pxe: Option<UdpSocket>,
    info: ServerInfo,
    journal_path: &Path,
    stats: Arc<Stats>,
    leases: Arc<Leases>,
) -> Result<(), DhcpError> {
    let mut handler = Handler::new(info);
    let (journal, live) = Journal::open(journal_path, SystemTime::now())?;
    leases.apply(&live);
    let orphans = handler.restore(&live);
    if orphans > 0 {
        tracing::warn!(
            orphans,
            "journaled leases outside every configured subnet were dropped"
        );
    }
    let restored = live.len() - orphans;
    stats
        .leases_restored
        .store(restored as u64, Ordering::Relaxed);
    tracing::info!(leases = restored, "DHCP leases restored");
    // The writer sends the ACKs it holds back until their records are durable, on a
    // duplicate of the port 67 socket, through `reply` like the loop.
    let writer_sock = socket2::SockRef::from(&sock)
        .try_clone()
        .map_err(DhcpError::Clone)?;
    let journal = journal.spawn(writer_sock.into(), stats.clone())?;
    let mut server = Server::new(handler, stats.clone());

    // Larger than any valid request: longer datagrams show up as oversized, not truncated.
    let mut buf = vec![0u8; 4096];
    let mut pxe_buf = vec![0u8; 4096];
    loop {
        let (len, peer, port) = tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (len, peer) = r.map_err(DhcpError::Recv)?;
                (len, peer, Port::Dhcp)
            }
            r = recv_opt(pxe.as_ref(), &mut pxe_buf) => {
                let (len, peer) = r.map_err(DhcpError::Recv)?;
                (len, peer, Port::Pxe)
            }
        };
        let packet = match port {
            Port::Dhcp => &buf,
            Port::Pxe => &pxe_buf,
        };
        let packet = packet.get(..len).unwrap_or_default();
        match server.on_datagram(packet, peer, port, SystemTime::now()) {
            Action::Nothing => {}
            Action::Journal(job) => {
                leases.apply(&job.records);
                if !journal.submit(job) {
                    bump(&stats.journal_busy);
                    tracing::warn!(%peer, "lease journal behind: reply dropped");
                }
            }
            Action::Send(send) => {
                let via = match send.port {
                    Port::Pxe => pxe.as_ref().unwrap_or(&sock),
                    Port::Dhcp => &sock,
                };
                reply::send(via, &send, &stats).await;
            }
        }
    }
}

async fn recv_opt(
    sock: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Where the lease journal lives in the data directory.
pub fn journal_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(journal::FILE_NAME)
}
