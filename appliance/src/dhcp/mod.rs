//! DHCPv4 service: the socket loop around the sans-IO [`handler`].

pub mod client;
pub mod handler;
pub mod pool;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dhcproto::v4::{Decodable, Decoder, Encodable, Message};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use handler::{Handler, Outcome, ServerInfo};

/// Counters exposed through the API.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub malformed: AtomicU64,
    pub replied: AtomicU64,
    pub ignored: AtomicU64,
    pub send_errors: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct StatsSnapshot {
    pub received: u64,
    pub malformed: u64,
    pub replied: u64,
    pub ignored: u64,
    pub send_errors: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            malformed: get(&self.malformed),
            replied: get(&self.replied),
            ignored: get(&self.ignored),
            send_errors: get(&self.send_errors),
        }
    }
}

fn bump(c: &AtomicU64) {
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
    sock.set_nonblocking(true).map_err(err)?;
    let addr = SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    sock.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(sock.into()).map_err(err)
}

/// Serves DHCP on `sock` until the task is cancelled.
pub async fn run(sock: UdpSocket, info: ServerInfo, stats: Arc<Stats>) -> Result<(), DhcpError> {
    let mut handler = Handler::new(info);
    // Larger than any Ethernet frame: oversized datagrams arrive truncated and fail to parse.
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, peer) = sock.recv_from(&mut buf).await.map_err(DhcpError::Recv)?;
        bump(&stats.received);
        let Some(packet) = buf.get(..len) else {
            continue;
        };
        let req = match Message::decode(&mut Decoder::new(packet)) {
            Ok(m) => m,
            Err(e) => {
                bump(&stats.malformed);
                tracing::warn!(%peer, len, error = %e, "dropped malformed DHCP packet");
                continue;
            }
        };
        let mac = stork_proto::MacAddr::from_slice(req.chaddr())
            .map_or_else(|| "-".to_string(), |m| m.to_string());
        match handler.handle(&req, SystemTime::now()) {
            Outcome::Reply(reply) => {
                let kind = reply.msg.opts().msg_type();
                let bytes = match reply.msg.to_vec() {
                    Ok(b) => b,
                    Err(e) => {
                        bump(&stats.send_errors);
                        tracing::error!(error = %e, "cannot encode DHCP reply");
                        continue;
                    }
                };
                match sock.send_to(&bytes, SocketAddr::V4(reply.to)).await {
                    Ok(_) => {
                        bump(&stats.replied);
                        tracing::info!(%mac, xid = req.xid(), ?kind, yiaddr = %reply.msg.yiaddr(), to = %reply.to, "DHCP reply");
                    }
                    Err(e) => {
                        bump(&stats.send_errors);
                        tracing::warn!(to = %reply.to, error = %e, "DHCP send failed");
                    }
                }
            }
            Outcome::Ignore(why) => {
                bump(&stats.ignored);
                tracing::debug!(%mac, xid = req.xid(), reason = %why, "DHCP request ignored");
            }
        }
    }
}
