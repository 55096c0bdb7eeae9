//! DHCPv4 service: the socket loop around the sans-IO [`handler`], the durable lease
//! [`journal`], and router advertisements ([`ra`]) that keep iPXE from waiting for IPv6.

pub mod client;
pub mod config;
pub mod datagram;
pub mod edge;
pub mod ha;
pub mod ha_link;
pub mod handler;
pub mod journal;
pub mod leases;
pub mod mmsg;
pub mod neighbours;
pub mod pool;
pub mod ra;
pub mod reply;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

pub use datagram::{Action, Batch, Port, Server};
pub use edge::MAX_PACKET;
use handler::{Handler, ServerInfo};
use journal::{Journal, JournalError, JournalHandle};
pub use leases::Leases;
use mmsg::RecvBatch;

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
    /// Requests whose lease change and reply were dropped because the journal writer was
    /// too far behind.
    journal_busy,
    /// Leases read back from the journal when the service last started: a restart of the
    /// appliance keeps them.
    leases_restored,
    /// HA pair: requests left to the partner (its clients, while it runs).
    ha_partners_clients,
    /// HA pair: leases the database refused because another client holds the address
    /// (the ACK withheld; the pool learns the holder).
    ha_conflicts,
    /// HA pair: times this server found its partner gone and served its clients too.
    ha_takeovers,
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
    set_buffers(&sock, BUFFER);
    sock.set_nonblocking(true).map_err(err)?;
    let addr = SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    sock.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(sock.into()).map_err(err)
}

/// Socket buffer asked for each way: a few thousand requests (about a second of a rack
/// powering on at once) queue while the loop is busy.
const BUFFER: libc::c_int = 4 << 20;

/// Sets both socket buffers to `bytes`. `SO_RCVBUF`/`SO_SNDBUF` are silently capped at
/// `net.core.rmem_max`/`wmem_max` (208 KiB on a stock kernel, about 700 requests), so the
/// forcing variants are tried first (they need CAP_NET_ADMIN, which a root service has);
/// without it, whatever the sysctls allow. Also the DHCP benchmark's load client's.
pub fn set_buffers(sock: &impl std::os::fd::AsRawFd, bytes: libc::c_int) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: a valid socket, an int option, its size.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::from_ref(&bytes).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            tracing::warn!(bytes, "cannot size the DHCP socket buffers");
        }
    }
}

/// Where the DHCP service keeps its leases.
#[derive(Clone)]
pub enum LeaseStore {
    /// The journal file in the data directory (one appliance).
    File(std::path::PathBuf),
    /// The shared database of an HA pair, under the pair's site.
    Postgres {
        config: Box<postgres::Config>,
        site: String,
    },
}

/// Serves DHCP on `sock` (port 67) and, in proxy mode, `pxe` (port 4011) until the task is
/// cancelled. Leases live in `store`, loaded first.
pub async fn run(
    sock: UdpSocket,
    pxe: Option<UdpSocket>,
    info: ServerInfo,
    store: &LeaseStore,
    stats: Arc<Stats>,
    leases: Arc<Leases>,
) -> Result<(), DhcpError> {
    let mut handler = Handler::new(info);
    let now = SystemTime::now();
    let (backend, live) = match store {
        LeaseStore::File(path) => {
            let (journal, live) = Journal::open(path, now)?;
            (journal::Backend::File(journal), live)
        }
        LeaseStore::Postgres { config, site } => {
            // The sync client blocks (on a runtime of its own): not on this one's threads.
            let (config, site) = ((**config).clone(), site.clone());
            let (db, live) = tokio::task::spawn_blocking(move || {
                journal::postgres::PgLeases::open(config, &site, now)
            })
            .await
            .map_err(|e| JournalError::Database(e.to_string()))??;
            (journal::Backend::Postgres(Box::new(db)), live)
        }
    };
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
    let (learned_tx, learned) = std::sync::mpsc::channel();
    let journal = journal::spawn(backend, writer_sock.into(), stats.clone(), Some(learned_tx))?;
    let mut ha = match (store, handler.ha(), info_ha(&handler)) {
        (LeaseStore::Postgres { config, site }, Some(state), Some(failover)) => Some(
            ha_link::start((**config).clone(), site.clone(), state.role, failover)
                .map_err(DhcpError::Clone)?,
        ),
        _ => None,
    };
    let mut server = Server::new(handler, stats.clone());

    // Each wake-up takes every queued datagram (up to a batch) in one call; port 4011 sees
    // a PXE client now and then, so its batch is small.
    let mut batch_rx = RecvBatch::new(mmsg::BATCH);
    let mut pxe_rx = RecvBatch::new(4);
    let mut batch = Batch::default();
    loop {
        let port = tokio::select! {
            r = sock.async_io(Interest::READABLE, || batch_rx.recv(&sock)) => {
                r.map_err(DhcpError::Recv)?;
                Port::Dhcp
            }
            r = recv_opt(pxe.as_ref(), &mut pxe_rx) => {
                r.map_err(DhcpError::Recv)?;
                Port::Pxe
            }
            Some(event) = recv_ha(ha.as_mut()) => {
                on_ha(server.handler_mut(), event, &leases, &stats);
                continue;
            }
        };
        // What the lease database said others hold, before anything is decided.
        for holders in learned.try_iter() {
            leases.apply(&holders);
            server.handler_mut().restore(&holders);
        }
        let (rx, via) = match port {
            Port::Dhcp => (&batch_rx, &sock),
            Port::Pxe => (&pxe_rx, pxe.as_ref().unwrap_or(&sock)),
        };
        server.on_batch(rx.iter(), port, SystemTime::now(), &mut batch);
        // The commit first: the writer's write and fdatasync overlap the offers' sending.
        if let Some(commit) = batch.take_commit() {
            submit(&journal, commit, &leases, &stats);
        }
        reply::send(via, &batch.immediate, &stats).await;
        batch.immediate.clear();
    }
}

fn info_ha(handler: &Handler) -> Option<std::time::Duration> {
    handler.info().dhcp.ha.map(|h| h.failover)
}

async fn recv_ha(
    rx: Option<&mut tokio::sync::mpsc::UnboundedReceiver<ha_link::HaEvent>>,
) -> Option<ha_link::HaEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The partner gone (its leases taken in, everyone answered) or back.
fn on_ha(handler: &mut Handler, event: ha_link::HaEvent, leases: &Leases, stats: &Stats) {
    match event {
        ha_link::HaEvent::PartnerDown(live) => {
            leases.apply(&live);
            handler.restore(&live);
            handler.set_partner_down(true);
            bump(&stats.ha_takeovers);
        }
        ha_link::HaEvent::PartnerBack => handler.set_partner_down(false),
    }
}

/// Hands one batch's lease changes to the journal writer (and the HTTP side's view of the
/// leases, one lock for the batch).
fn submit(journal: &JournalHandle, commit: journal::Commit, leases: &Leases, stats: &Stats) {
    leases.apply(&commit.records);
    let requests = commit.requests;
    if !journal.submit(commit) {
        stats
            .journal_busy
            .fetch_add(requests as u64, Ordering::Relaxed);
        // Once per batch, not per request: this happens under overload.
        tracing::warn!(requests, "lease journal behind: replies dropped");
    }
}

async fn recv_opt(sock: Option<&UdpSocket>, rx: &mut RecvBatch) -> std::io::Result<usize> {
    match sock {
        Some(s) => s.async_io(Interest::READABLE, || rx.recv(s)).await,
        None => std::future::pending().await,
    }
}

/// Where the lease journal lives in the data directory.
pub fn journal_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(journal::FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With CAP_NET_ADMIN (root) the buffers get their size whatever `rmem_max` says.
    #[test]
    fn socket_buffers_are_not_capped_by_the_sysctls_as_root() {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        set_buffers(&sock, BUFFER);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // The kernel doubles what it is given, for its bookkeeping.
            let want = BUFFER as usize;
            assert!(sock.recv_buffer_size().unwrap() >= want);
            assert!(sock.send_buffer_size().unwrap() >= want);
        }
    }
}
