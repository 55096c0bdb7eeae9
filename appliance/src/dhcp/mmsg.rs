//! Many datagrams per system call: `recvmmsg(2)` for the socket loop, `sendmmsg(2)` for the
//! replies of a batch. At tens of thousands of requests a second on two cores the
//! per-datagram system call (and the wake-up before it) cost as much as the protocol work;
//! batching pays them once per batch. I/O only: what a batch means is [`super::datagram`]'s.
//!
//! libc directly: nix's wrappers want their own buffer types, and these two calls are all
//! that is needed. The sockets are IPv4 (`super::bind`), so addresses are `sockaddr_in`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};

use socket2::SockAddr;

use super::datagram::Send;

/// Datagrams taken per `recvmmsg` (and replies given per `sendmmsg`) at most: enough to pay
/// the call once for a burst, small enough that a batch's replies leave within a few
/// hundred microseconds of its first request.
pub const BATCH: usize = 64;

/// Receive buffer per datagram: larger than any valid request, so a longer datagram shows
/// up as oversized (at the edge), not truncated.
pub const DATAGRAM_BUF: usize = 4096;

/// Reusable buffers for one `recvmmsg`: plain data only (the call's headers are built on
/// the stack each time), so the socket loop's future stays `Send`.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    peers: Vec<SocketAddr>,
    capacity: usize,
    n: usize,
}

impl RecvBatch {
    /// Room for `capacity` datagrams (at most [`BATCH`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, BATCH);
        let unspecified = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        Self {
            bufs: vec![0; capacity * DATAGRAM_BUF],
            lens: vec![0; capacity],
            peers: vec![unspecified; capacity],
            capacity,
            n: 0,
        }
    }

    /// One non-blocking `recvmmsg`: every queued datagram up to the capacity. `WouldBlock`
    /// when none is queued (the caller waits for readiness its own way).
    pub fn recv(&mut self, sock: &impl AsFd) -> io::Result<usize> {
        self.n = 0;
        // SAFETY: all-zero is a valid value of these plain C structs (null pointers, zero
        // lengths); the fields that matter are set below.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut names: [libc::sockaddr_in; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (((io, buf), name), hdr) in iov
            .iter_mut()
            .zip(self.bufs.chunks_exact_mut(DATAGRAM_BUF))
            .zip(names.iter_mut())
            .zip(hdrs.iter_mut())
        {
            io.iov_base = buf.as_mut_ptr().cast();
            io.iov_len = buf.len();
            hdr.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
            hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = io;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdrs[..capacity]` point at `capacity` live buffers of DATAGRAM_BUF bytes
        // (the chunks of `self.bufs`) and address slots of the length given, all of which
        // outlive the call; no timeout pointer.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_fd().as_raw_fd(),
                hdrs.as_mut_ptr(),
                self.capacity as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = usize::try_from(r).unwrap_or(0).min(self.capacity);
        for (i, (hdr, name)) in hdrs.iter().zip(names.iter()).take(n).enumerate() {
            self.lens[i] = (hdr.msg_len as usize).min(DATAGRAM_BUF);
            self.peers[i] = peer(name, hdr.msg_hdr.msg_namelen);
        }
        self.n = n;
        Ok(n)
    }

    /// The datagrams of the last [`Self::recv`] and where each came from.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.bufs
            .chunks_exact(DATAGRAM_BUF)
            .zip(self.lens.iter().zip(self.peers.iter()))
            .take(self.n)
            .map(|(buf, (&len, &peer))| (buf.get(..len).unwrap_or_default(), peer))
    }
}

fn peer(name: &libc::sockaddr_in, len: libc::socklen_t) -> SocketAddr {
    if name.sin_family != libc::AF_INET as libc::sa_family_t
        || (len as usize) < size_of::<libc::sockaddr_in>()
    {
        // Not on an IPv4 socket; answered as a source without an address would be.
        return SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    }
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
        u16::from_be(name.sin_port),
    ))
}

/// One non-blocking `sendmmsg` of up to [`BATCH`] of `replies`, each to its own address.
/// Returns how many were sent; an error is about `replies[0]` (the kernel reports a later
/// message's error on the next call, which starts there).
pub fn send(sock: &impl AsFd, replies: &[Send]) -> io::Result<usize> {
    let replies = replies.get(..replies.len().min(BATCH)).unwrap_or_default();
    if replies.is_empty() {
        return Ok(0);
    }
    let addrs: Vec<SockAddr> = replies.iter().map(|r| SockAddr::from(r.to)).collect();
    // SAFETY: as in `RecvBatch::recv`: plain C structs, the fields used are set below.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for (((io, r), addr), hdr) in iov.iter_mut().zip(replies).zip(&addrs).zip(hdrs.iter_mut()) {
        // The kernel only reads through these pointers (sendmmsg).
        io.iov_base = r.bytes.as_ptr().cast_mut().cast();
        io.iov_len = r.bytes.len();
        hdr.msg_hdr.msg_name = addr.as_ptr().cast_mut().cast();
        hdr.msg_hdr.msg_namelen = addr.len();
        hdr.msg_hdr.msg_iov = io;
        hdr.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the first `replies.len()` headers point at the replies' bytes and addresses,
    // which outlive the call.
    let r = unsafe {
        libc::sendmmsg(
            sock.as_fd().as_raw_fd(),
            hdrs.as_mut_ptr(),
            replies.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(r).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    fn reply(to: SocketAddr, bytes: Vec<u8>) -> Send {
        Send::plain(to, bytes)
    }

    #[test]
    fn a_batch_goes_out_in_one_call_and_comes_in_in_one_call() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = tx.local_addr().unwrap();
        let replies: Vec<Send> = (0..BATCH as u8 + 6)
            .map(|n| reply(to, vec![n; usize::from(n) + 1]))
            .collect();
        let first = send(&tx, &replies).unwrap();
        assert_eq!(first, BATCH);
        assert_eq!(send(&tx, &replies[first..]).unwrap(), 6);
        let mut batch = RecvBatch::new(BATCH);
        assert_eq!(batch.recv(&rx).unwrap(), BATCH);
        for (i, (bytes, peer)) in batch.iter().enumerate() {
            assert_eq!(bytes, vec![i as u8; i + 1].as_slice());
            assert_eq!(peer, from);
        }
        assert_eq!(batch.recv(&rx).unwrap(), 6);
        assert_eq!(batch.iter().count(), 6);
        let empty = batch.recv(&rx).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(batch.iter().count(), 0);
    }

    #[test]
    fn a_long_datagram_is_cut_at_the_buffer_not_lost() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[1u8; DATAGRAM_BUF + 100], rx.local_addr().unwrap())
            .unwrap();
        let mut batch = RecvBatch::new(2);
        assert_eq!(batch.recv(&rx).unwrap(), 1);
        assert_eq!(batch.iter().next().unwrap().0.len(), DATAGRAM_BUF);
    }
}
