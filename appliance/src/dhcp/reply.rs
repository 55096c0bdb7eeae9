//! Where every DHCP reply leaves and is counted, whoever sends it: the socket loop (offers,
//! NAKs, INFORM ACKs, proxy answers) with [`send`], or the journal writer (ACKs it releases
//! once their records are durable) with [`send_blocking`]. Both send a batch with as few
//! `sendmmsg` calls as it takes ([`super::mmsg`]) and count through [`try_send`], so
//! `replied`, `offers`, `acks`, `naks`, `proxy_replies` and `send_errors` mean the same
//! whichever path a reply took.

use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, AsRawFd};

use dhcproto::v4::MessageType;
use tokio::io::Interest;

use super::datagram::Send;
use super::{Stats, bump, mmsg};

/// Waits for room in a full send buffer, each at most [`FULL_WAIT_MS`], before the writer
/// drops what is left (the clients retry).
const FULL_WAITS: u32 = 100;
const FULL_WAIT_MS: libc::c_int = 1;

/// One attempt to send the head of `replies` on the non-blocking `sock`, counted. Returns
/// how many replies it dealt with: sent, or (the first one) failed, counted in
/// `send_errors` and logged. `WouldBlock` is returned uncounted: the caller waits its own
/// way and tries again.
pub fn try_send(sock: &impl AsFd, replies: &[Send], stats: &Stats) -> io::Result<usize> {
    let Some(first) = replies.first() else {
        return Ok(0);
    };
    match mmsg::send(sock, replies) {
        // Nothing sent and no error (not seen from Linux): the first one is given up, so
        // the caller always moves on.
        Ok(0) => {
            bump(&stats.send_errors);
            tracing::warn!(to = %first.to, "DHCP send took nothing");
            Ok(1)
        }
        Ok(n) => {
            for r in replies.iter().take(n) {
                count_sent(r, stats);
            }
            Ok(n)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Err(e),
        Err(e) => {
            bump(&stats.send_errors);
            tracing::warn!(to = %first.to, error = %e, "DHCP send failed");
            Ok(1)
        }
    }
}

/// From the socket loop: waits for room in the send buffer as long as it takes.
pub async fn send(sock: &tokio::net::UdpSocket, replies: &[Send], stats: &Stats) {
    let mut done = 0;
    while let Some(rest) = replies.get(done..).filter(|r| !r.is_empty()) {
        match sock
            .async_io(Interest::WRITABLE, || try_send(sock, rest, stats))
            .await
        {
            Ok(n) => done += n.max(1),
            Err(e) => {
                // Only a failure of the reactor itself gets here (send errors are counted
                // and skipped inside): the rest cannot leave.
                drop_rest(rest, stats, &e);
                return;
            }
        }
    }
}

/// From a thread holding a duplicate of the loop's non-blocking socket: a full send buffer
/// gets a few short waits, then what is left is dropped (the clients retry).
pub fn send_blocking(sock: &impl AsFd, replies: &[Send], stats: &Stats) {
    let mut done = 0;
    let mut waits = 0;
    while let Some(rest) = replies.get(done..).filter(|r| !r.is_empty()) {
        match try_send(sock, rest, stats) {
            Ok(n) => {
                done += n.max(1);
                waits = 0;
            }
            Err(e) if waits < FULL_WAITS => {
                debug_assert_eq!(e.kind(), ErrorKind::WouldBlock);
                waits += 1;
                wait_writable(sock);
            }
            Err(e) => {
                drop_rest(rest, stats, &e);
                return;
            }
        }
    }
}

fn drop_rest(rest: &[Send], stats: &Stats, e: &io::Error) {
    for _ in rest {
        bump(&stats.send_errors);
    }
    tracing::warn!(dropped = rest.len(), error = %e, "DHCP send buffer stayed full; replies dropped");
}

/// Until the socket has room for a datagram, or a millisecond.
fn wait_writable(sock: &impl AsFd) {
    let mut fd = libc::pollfd {
        fd: sock.as_fd().as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call. Its result does not matter:
    // the caller tries again either way.
    unsafe { libc::poll(&mut fd, 1, FULL_WAIT_MS) };
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
        let batch: Vec<Send> = [
            (MessageType::Offer, false),
            (MessageType::Ack, false),
            (MessageType::Nak, false),
            (MessageType::Ack, true),
        ]
        .into_iter()
        .map(|(kind, proxy)| reply(to, kind, proxy))
        .collect();
        send(&tokio_sock, &batch, &by_loop).await;
        send_blocking(&std_sock, &batch, &by_writer);
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

    /// A reply that cannot leave costs itself only: the ones after it in its batch go.
    #[test]
    fn a_failed_send_is_a_send_error() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ok = rx.local_addr().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let stats = Stats::default();
        // An IPv6 destination on an IPv4 socket, first and in the middle.
        let bad: SocketAddr = "[::1]:68".parse().unwrap();
        let batch: Vec<Send> = [bad, ok, bad, ok]
            .into_iter()
            .map(|to| reply(to, MessageType::Ack, false))
            .collect();
        send_blocking(&sock, &batch, &stats);
        let s = stats.snapshot();
        assert_eq!((s.replied, s.acks, s.send_errors), (2, 2, 2));
    }
}
