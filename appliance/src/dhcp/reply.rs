//! Where every DHCP reply leaves and is counted, whoever sends it: the socket loop (offers,
//! NAKs, INFORM ACKs, proxy answers) with [`send`], or the journal writer (ACKs it releases
//! once their records are durable) with [`send_blocking`]. Both go through [`try_send`], so
//! `replied`, `offers`, `acks`, `naks`, `proxy_replies` and `send_errors` mean the same
//! whichever path a reply took.

use std::io::{self, ErrorKind};
use std::os::fd::AsFd;
use std::time::Duration;

use dhcproto::v4::MessageType;
use socket2::{SockAddr, SockRef};
use tokio::io::Interest;

use super::datagram::Send;
use super::{Stats, bump};

/// One attempt to send `reply` on the non-blocking `sock`, counted: sent, or failed (in
/// `send_errors`, logged). `WouldBlock` is returned uncounted: the caller waits its own way
/// and tries again.
pub fn try_send(sock: &impl AsFd, reply: &Send, stats: &Stats) -> io::Result<()> {
    match SockRef::from(sock).send_to(&reply.bytes, &SockAddr::from(reply.to)) {
        Ok(_) => {
            count_sent(reply, stats);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Err(e),
        Err(e) => {
            bump(&stats.send_errors);
            tracing::warn!(to = %reply.to, error = %e, "DHCP send failed");
            Err(e)
        }
    }
}

/// From the socket loop: waits for room in the send buffer as long as it takes.
pub async fn send(sock: &tokio::net::UdpSocket, reply: &Send, stats: &Stats) {
    // Any error is counted and logged already.
    let _ = sock
        .async_io(Interest::WRITABLE, || try_send(sock, reply, stats))
        .await;
}

/// From a thread holding a duplicate of the loop's non-blocking socket: a full send buffer
/// gets a few short waits, then the reply is dropped (the client retries).
pub fn send_blocking(sock: &impl AsFd, reply: &Send, stats: &Stats) {
    for _ in 0..100 {
        match try_send(sock, reply, stats) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50));
            }
            _ => return,
        }
    }
    bump(&stats.send_errors);
    tracing::warn!(to = %reply.to, "DHCP send buffer stayed full; reply dropped");
}

fn count_sent(reply: &Send, stats: &Stats) {
    bump(&stats.replied);
    if reply.proxy {
        bump(&stats.proxy_replies);
        return;
    }
    match reply.kind {
        Some(MessageType::Offer) => bump(&stats.offers),
        Some(MessageType::Ack) => bump(&stats.acks),
        Some(MessageType::Nak) => bump(&stats.naks),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket};

    use super::super::datagram::Port;
    use super::*;

    fn reply(to: SocketAddr, kind: MessageType, proxy: bool) -> Send {
        Send {
            bytes: vec![kind.into()],
            to,
            port: Port::Dhcp,
            kind: Some(kind),
            proxy,
        }
    }

    /// The loop's path and the writer's count a reply the same way.
    #[tokio::test]
    async fn both_paths_count_alike() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let std_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        std_sock.set_nonblocking(true).unwrap();
        let tokio_sock = tokio::net::UdpSocket::from_std(std_sock.try_clone().unwrap()).unwrap();
        let (by_loop, by_writer) = (Stats::default(), Stats::default());
        for (kind, proxy) in [
            (MessageType::Offer, false),
            (MessageType::Ack, false),
            (MessageType::Nak, false),
            (MessageType::Ack, true),
        ] {
            send(&tokio_sock, &reply(to, kind, proxy), &by_loop).await;
            send_blocking(&std_sock, &reply(to, kind, proxy), &by_writer);
        }
        let (a, b) = (by_loop.snapshot(), by_writer.snapshot());
        let counters = |s: &super::super::StatsSnapshot| {
            (
                s.replied,
                s.offers,
                s.acks,
                s.naks,
                s.proxy_replies,
                s.send_errors,
            )
        };
        assert_eq!(counters(&a), (4, 1, 1, 1, 1, 0));
        assert_eq!(counters(&a), counters(&b));
        let mut buf = [0u8; 8];
        for _ in 0..8 {
            rx.recv_from(&mut buf).unwrap();
        }
    }

    #[test]
    fn a_failed_send_is_a_send_error() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stats = Stats::default();
        // An IPv6 destination on an IPv4 socket.
        let to: SocketAddr = "[::1]:68".parse().unwrap();
        send_blocking(&sock, &reply(to, MessageType::Ack, false), &stats);
        let s = stats.snapshot();
        assert_eq!((s.replied, s.acks, s.send_errors), (0, 0, 1));
    }
}
