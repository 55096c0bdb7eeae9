//! DHCPv4 service: the socket loop around the sans-IO [`handler`], the durable lease
//! [`journal`], and router advertisements ([`ra`]) that keep iPXE from waiting for IPv6.

pub mod client;
pub mod handler;
pub mod journal;
pub mod pool;
pub mod ra;
pub mod ratelimit;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dhcproto::v4::{Decodable, Decoder, Encodable, Message, MessageType};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use handler::{Handler, Ignored, Outcome, ServerInfo};
use journal::{Job, Journal, JournalError};

/// The PXE boot server port (PXE 2.1), served in proxy mode.
pub const PXE_PORT: u16 = 4011;

/// Largest datagram accepted: a DHCP message in one unfragmented Ethernet frame
/// (1500 - 20 IP - 8 UDP). Anything longer is counted as oversized and dropped.
pub const MAX_PACKET: usize = 1472;

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters exposed through the API (`stork stats`).
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        #[derive(Debug, Serialize)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

stats! {
    /// Datagrams received on ports 67 and 4011.
    received,
    /// Not a DHCP message.
    malformed,
    /// Longer than [`MAX_PACKET`].
    oversized,
    /// Received, by message type.
    discover,
    request,
    decline,
    release,
    inform,
    /// Replies sent, all kinds.
    replied,
    offers,
    acks,
    naks,
    /// Boot-only answers (proxy mode, both ports).
    proxy_replies,
    /// Requests answered with nothing (any reason, rate limiting included).
    ignored,
    /// Dropped by the per-MAC rate limit.
    rate_limited,
    send_errors,
    /// Journal batches made durable (one fdatasync each) and records in them.
    journal_syncs,
    journal_records,
    /// Journal writes that failed (their ACKs were withheld).
    journal_errors,
    /// Replies dropped because the journal writer was too far behind.
    journal_busy,
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
) -> Result<(), DhcpError> {
    let mut handler = Handler::new(info);
    let (journal, live) = Journal::open(journal_path, SystemTime::now())?;
    let orphans = handler.restore(&live);
    if orphans > 0 {
        tracing::warn!(
            orphans,
            "journaled leases outside every configured subnet were dropped"
        );
    }
    tracing::info!(leases = live.len() - orphans, "DHCP leases restored");
    // The writer sends ACKs itself, after their records are durable, on a duplicate of the
    // port 67 socket.
    let writer_sock = socket2::SockRef::from(&sock)
        .try_clone()
        .map_err(DhcpError::Clone)?;
    let journal = journal.spawn(writer_sock.into(), stats.clone())?;

    // Larger than any valid request: longer datagrams show up as oversized, not truncated.
    let mut buf = vec![0u8; 4096];
    let mut pxe_buf = vec![0u8; 4096];
    let mut records = Vec::new();
    loop {
        let (len, peer, from_pxe) = tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (len, peer) = r.map_err(DhcpError::Recv)?;
                (len, peer, false)
            }
            r = recv_opt(pxe.as_ref(), &mut pxe_buf) => {
                let (len, peer) = r.map_err(DhcpError::Recv)?;
                (len, peer, true)
            }
        };
        bump(&stats.received);
        let packet = if from_pxe { &pxe_buf } else { &buf };
        if len > MAX_PACKET {
            bump(&stats.oversized);
            tracing::warn!(%peer, len, "dropped oversized DHCP packet");
            continue;
        }
        let Some(packet) = packet.get(..len) else {
            continue;
        };
        let req = match decode(packet) {
            Ok(m) => m,
            Err(e) => {
                bump(&stats.malformed);
                tracing::warn!(%peer, len, error = %e, "dropped malformed DHCP packet");
                continue;
            }
        };
        count_request(&stats, req.opts().msg_type());
        let now = SystemTime::now();
        let outcome = if from_pxe {
            handler.handle_pxe(&req, now)
        } else {
            handler.handle(&req, now)
        };
        handler.take_records(&mut records);
        let mac = stork_proto::MacAddr::from_slice(req.chaddr());
        match outcome {
            Outcome::Reply(mut reply) => {
                if from_pxe && let SocketAddr::V4(p) = peer {
                    // PXE 2.1: the boot server answers where the request came from.
                    reply.to = p;
                }
                let kind = reply.msg.opts().msg_type();
                let bytes = match reply.msg.to_vec() {
                    Ok(b) => b,
                    Err(e) => {
                        bump(&stats.send_errors);
                        tracing::error!(error = %e, "cannot encode DHCP reply");
                        continue;
                    }
                };
                let to = SocketAddr::V4(reply.to);
                let yiaddr = reply.msg.yiaddr();
                if !records.is_empty() {
                    // An ACK that binds a lease leaves only once the lease is durable.
                    let job = Job {
                        records: std::mem::take(&mut records),
                        reply: Some((bytes, to)),
                    };
                    if journal.submit(job) {
                        tracing::debug!(mac = ?mac, xid = req.xid(), ?kind, %yiaddr, %to, "DHCP reply queued behind the journal");
                    } else {
                        bump(&stats.journal_busy);
                        tracing::warn!(mac = ?mac, xid = req.xid(), "lease journal behind: reply dropped");
                    }
                    continue;
                }
                let sent = if from_pxe {
                    pxe.as_ref().unwrap_or(&sock).send_to(&bytes, to).await
                } else {
                    sock.send_to(&bytes, to).await
                };
                match sent {
                    Ok(_) => {
                        bump(&stats.replied);
                        // A proxy offer is the only offer without an address.
                        let proxy = from_pxe
                            || (kind == Some(MessageType::Offer) && yiaddr.is_unspecified());
                        count_reply(&stats, kind, proxy);
                        tracing::debug!(mac = ?mac, xid = req.xid(), ?kind, %yiaddr, %to, "DHCP reply");
                    }
                    Err(e) => {
                        bump(&stats.send_errors);
                        tracing::warn!(%to, error = %e, "DHCP send failed");
                    }
                }
            }
            Outcome::Ignore(why) => {
                bump(&stats.ignored);
                if why == Ignored::RateLimited {
                    bump(&stats.rate_limited);
                }
                if !records.is_empty() {
                    // RELEASE and DECLINE: no reply, but the change must outlive a crash.
                    let job = Job {
                        records: std::mem::take(&mut records),
                        reply: None,
                    };
                    if !journal.submit(job) {
                        bump(&stats.journal_busy);
                    }
                }
                tracing::debug!(mac = ?mac, xid = req.xid(), reason = %why, "DHCP request ignored");
            }
        }
    }
}

/// Why a datagram is not a DHCP message we accept.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("does not decode: {0}")]
    Decode(#[from] dhcproto::error::DecodeError),
    #[error("option {code} has length {len}")]
    OptionLength { code: u8, len: usize },
    #[error("the decoder panicked")]
    Panic,
}

/// Option lengths dhcproto 0.15 asserts on (`debug_assert!`, `len - n`) instead of
/// checking: a packet with a wrong length there panics a debug build (found by the
/// `dhcp_handler` fuzz target), so it is rejected before decoding. `len` is the length
/// after RFC 3396 concatenation, as dhcproto sees it.
fn length_ok(code: u8, len: usize) -> bool {
    match code {
        80 => len == 0,        // Rapid Commit
        81 => len >= 3,        // Client FQDN: flags and two rcodes first
        94 => len == 3,        // Client Network Interface
        151 => len >= 1,       // BLQ status code: a code first
        152..=155 => len == 4, // BLQ times
        _ => true,
    }
}

/// Decodes one DHCP message, rejecting what the decoder would mishandle. Shared with the
/// fuzz target, so it exercises exactly what the server accepts.
pub fn decode(packet: &[u8]) -> Result<Message, Malformed> {
    // The options area: after the fixed header and the magic cookie (RFC 2131 section 3).
    // Consecutive options with the same code are one option (RFC 3396), as dhcproto
    // concatenates them.
    let mut i = 240;
    let mut run: Option<(u8, usize)> = None;
    let check = |run: Option<(u8, usize)>| match run {
        Some((code, len)) if !length_ok(code, len) => Err(Malformed::OptionLength { code, len }),
        _ => Ok(()),
    };
    while let Some(&code) = packet.get(i) {
        if code == 0 || code == 255 {
            check(run.take())?;
            if code == 255 {
                break;
            }
            i += 1;
            continue;
        }
        let Some(&len) = packet.get(i + 1) else { break };
        let len = usize::from(len);
        run = match run {
            Some((c, total)) if c == code => Some((c, total + len)),
            other => {
                check(other)?;
                Some((code, len))
            }
        };
        i += 2 + len;
    }
    check(run)?;
    // A panic inside the decoder on hostile input must cost one packet, not the service.
    match std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(packet))) {
        Ok(r) => Ok(r?),
        Err(_) => Err(Malformed::Panic),
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

fn count_request(stats: &Stats, kind: Option<MessageType>) {
    match kind {
        Some(MessageType::Discover) => bump(&stats.discover),
        Some(MessageType::Request) => bump(&stats.request),
        Some(MessageType::Decline) => bump(&stats.decline),
        Some(MessageType::Release) => bump(&stats.release),
        Some(MessageType::Inform) => bump(&stats.inform),
        _ => {}
    }
}

fn count_reply(stats: &Stats, kind: Option<MessageType>, proxy: bool) {
    if proxy {
        bump(&stats.proxy_replies);
        return;
    }
    match kind {
        Some(MessageType::Offer) => bump(&stats.offers),
        Some(MessageType::Ack) => bump(&stats.acks),
        Some(MessageType::Nak) => bump(&stats.naks),
        _ => {}
    }
}

/// Where the lease journal lives in the data directory.
pub fn journal_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(journal::FILE_NAME)
}
