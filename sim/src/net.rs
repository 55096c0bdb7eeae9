//! Many hosts on one tap: each simulated machine and each BMC is a smoltcp [`Interface`]
//! with its own MAC and address; [`Net::run`] reads the tap, hands each frame to the host
//! its destination names, polls the hosts that have work, and writes what they send.
//!
//! Everything runs on one thread (a tokio `LocalSet`): hosts live in a `RefCell`, and the
//! sockets' async wrappers ([`TcpStream`], [`UdpSocket`]) borrow it only between awaits.
//! DHCP does not go through smoltcp: a firmware's DHCP client speaks from 0.0.0.0 before it
//! has an address, so frames to UDP port 68 land in the host's `Host::dhcp` mailbox and
//! the client sends raw frames ([`Net::send_dhcp`]).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress,
    IpAddress, IpCidr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::tap::Tap;

pub type HostId = usize;

/// The segment's MTU; frames in may be larger (segmentation offload, see `tap.rs`).
const MTU: usize = 1500;
const TCP_RX: usize = 64 * 1024;
const TCP_TX: usize = 32 * 1024;
/// The longest a host's timers wait for a poll when nothing else happens.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// The frames one host's interface takes in and sends out.
#[derive(Default)]
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push(frame);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        // What comes in may carry a partial checksum (offload); what goes out is complete.
        caps.checksum.ipv4 = phy::Checksum::Tx;
        caps.checksum.tcp = phy::Checksum::Tx;
        caps.checksum.udp = phy::Checksum::Tx;
        caps.checksum.icmpv4 = phy::Checksum::Tx;
        caps
    }
}

/// Frames to UDP port 68 for one host, and the DHCP client waiting for them.
#[derive(Default)]
pub struct Mailbox {
    frames: VecDeque<Vec<u8>>,
    waker: Option<Waker>,
}

pub struct Host {
    pub mac: EthernetAddress,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queue,
    dhcp: Mailbox,
    /// Bumped at every power change: sockets of an earlier generation are gone.
    generation: u64,
    /// Off: frames to it are dropped and it sends nothing (a powered-off NIC).
    up: bool,
    /// Fault: the share of frames in and out that are lost.
    loss: f64,
    next_port: u16,
    poll_at: Option<Instant>,
    /// Sockets their owners dropped, closing: removed once closed.
    closing: Vec<SocketHandle>,
    /// UDP sockets their owners dropped with datagrams still queued (a TFTP client's last
    /// ACK): removed once those are sent.
    draining: Vec<SocketHandle>,
}

impl Host {
    fn new(mac: EthernetAddress, seed: u64, now: Instant) -> Self {
        let mut dev = Queue::default();
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = seed;
        Self {
            mac,
            iface: Interface::new(config, &mut dev, now),
            sockets: SocketSet::new(Vec::new()),
            dev,
            dhcp: Mailbox::default(),
            generation: 0,
            up: false,
            loss: 0.0,
            next_port: 49152 + (seed % 1000) as u16,
            poll_at: Some(now),
            closing: Vec::new(),
            draining: Vec::new(),
        }
    }

    fn ipv4(&self) -> Option<Ipv4Address> {
        self.iface.ipv4_addr()
    }

    /// The next ephemeral port, 49152 to 65000 round and round.
    fn take_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port >= 65000 { 49152 } else { port + 1 };
        port
    }
}

struct Inner {
    hosts: Vec<Host>,
    by_mac: HashMap<EthernetAddress, HostId>,
    by_ip: HashMap<Ipv4Address, HostId>,
    /// Hosts whose sockets a task touched since the last poll.
    dirty: Vec<HostId>,
    /// Raw frames (DHCP) to send as they are.
    raw_out: Vec<Vec<u8>>,
    rng: u64,
    pub counters: Counters,
}

/// What crossed the tap.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Frames to nobody we simulate (another host on the segment), or to a host that is off.
    pub frames_ignored: u64,
    /// Frames lost on purpose (the loss fault).
    pub frames_lost: u64,
    /// Frames the tap refused (its queue full).
    pub frames_refused: u64,
}

impl Counters {
    /// Another shard's counts added to these.
    pub fn add(&mut self, o: &Counters) {
        self.frames_in += o.frames_in;
        self.frames_out += o.frames_out;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.frames_ignored += o.frames_ignored;
        self.frames_lost += o.frames_lost;
        self.frames_refused += o.frames_refused;
    }
}

/// The shared segment: every host, and the tap they are all on.
pub struct Net {
    inner: RefCell<Inner>,
    wake: Notify,
    start: std::time::Instant,
}

impl Net {
    pub fn new() -> Rc<Self> {
        Rc::new(Self {
            inner: RefCell::new(Inner {
                hosts: Vec::new(),
                by_mac: HashMap::new(),
                by_ip: HashMap::new(),
                dirty: Vec::new(),
                raw_out: Vec::new(),
                rng: 0x9e37_79b9_7f4a_7c15,
                counters: Counters::default(),
            }),
            wake: Notify::new(),
            start: std::time::Instant::now(),
        })
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// A new host with `mac`, powered off and without an address.
    pub fn add_host(&self, mac: [u8; 6]) -> HostId {
        let now = self.now();
        let mut inner = self.inner.borrow_mut();
        let id = inner.hosts.len();
        let mac = EthernetAddress(mac);
        let seed = u64::from_be_bytes([
            0, 0, mac.0[0], mac.0[1], mac.0[2], mac.0[3], mac.0[4], mac.0[5],
        ]);
        inner.hosts.push(Host::new(mac, seed, now));
        inner.by_mac.insert(mac, id);
        id
    }

    pub fn counters(&self) -> Counters {
        self.inner.borrow().counters
    }

    /// Powers the host's NIC on or off. Either way its sockets, address and mail are gone
    /// (a power change loses the machine's state); tasks holding old sockets see errors.
    pub fn set_up(&self, id: HostId, up: bool) {
        let now = self.now();
        let mut inner = self.inner.borrow_mut();
        let Inner { hosts, by_ip, .. } = &mut *inner;
        let host = &mut hosts[id];
        if let Some(ip) = host.ipv4() {
            by_ip.remove(&ip);
        }
        let seed = host.generation.wrapping_mul(7919) ^ u64::from(host.next_port);
        let mut fresh = Host::new(host.mac, seed, now);
        fresh.generation = host.generation + 1;
        fresh.up = up;
        fresh.loss = host.loss;
        fresh.next_port = host.next_port;
        if let Some(w) = host.dhcp.waker.take() {
            w.wake();
        }
        *host = fresh;
        drop(inner);
        self.wake.notify_one();
    }

    pub fn set_loss(&self, id: HostId, loss: f64) {
        self.inner.borrow_mut().hosts[id].loss = loss;
    }

    pub fn generation(&self, id: HostId) -> u64 {
        self.inner.borrow().hosts[id].generation
    }

    /// Gives the host its address (and a default route through `gateway`, if any).
    pub fn configure(&self, id: HostId, ip: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>) {
        let mut inner = self.inner.borrow_mut();
        let Inner { hosts, by_ip, .. } = &mut *inner;
        let host = &mut hosts[id];
        let same = host
            .iface
            .ip_addrs()
            .iter()
            .any(|c| *c == IpCidr::new(IpAddress::Ipv4(ip), prefix));
        if let Some(old) = host.ipv4() {
            by_ip.remove(&old);
        }
        // Renewing the same address (iPXE after the firmware) keeps it as it is: changing
        // the addresses flushes smoltcp's neighbour cache, and its ARP rate limit then
        // delays the next connection by a second.
        if !same {
            host.iface.update_ip_addrs(|addrs| {
                addrs.clear();
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), prefix));
            });
        }
        if let Some(gw) = gateway {
            let _ = host.iface.routes_mut().add_default_ipv4_route(gw);
        }
        by_ip.insert(ip, id);
    }

    fn touch(&self, id: HostId) {
        self.inner.borrow_mut().dirty.push(id);
        self.wake.notify_one();
    }

    /// Sends one DHCP message from the host's port 68 as its firmware would: from its
    /// address (0.0.0.0 before it has one) to `to` (broadcast unless renewing).
    pub fn send_dhcp(&self, id: HostId, payload: &[u8], from: Ipv4Addr, to: Ipv4Addr) {
        let mut inner = self.inner.borrow_mut();
        let host = &inner.hosts[id];
        if !host.up {
            return;
        }
        let src = host.mac;
        let frame = udp_frame(src, EthernetAddress::BROADCAST, from, to, 68, 67, payload);
        inner.raw_out.push(frame);
        drop(inner);
        self.wake.notify_one();
    }

    /// The next DHCP message to the host (a UDP payload), or `None` at `timeout`.
    pub async fn recv_dhcp(&self, id: HostId, timeout: Duration) -> Option<Vec<u8>> {
        let generation = self.generation(id);
        tokio::time::timeout(
            timeout,
            std::future::poll_fn(|cx| {
                let mut inner = self.inner.borrow_mut();
                let host = &mut inner.hosts[id];
                if host.generation != generation {
                    return Poll::Ready(None);
                }
                if let Some(frame) = host.dhcp.frames.pop_front() {
                    return Poll::Ready(Some(frame));
                }
                host.dhcp.waker = Some(cx.waker().clone());
                Poll::Pending
            }),
        )
        .await
        .ok()
        .flatten()
    }

    /// Drops what DHCP mail the host has not read (an earlier exchange's late answers).
    pub fn clear_dhcp(&self, id: HostId) {
        self.inner.borrow_mut().hosts[id].dhcp.frames.clear();
    }

    fn chance(inner: &mut Inner, share: f64) -> bool {
        if share <= 0.0 {
            return false;
        }
        // xorshift64: cheap, and reproducible from run to run.
        let mut x = inner.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        inner.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64 <= share
    }

    /// Routes one frame from the tap to its host.
    fn dispatch(&self, inner: &mut Inner, frame: &[u8]) {
        inner.counters.frames_in += 1;
        inner.counters.bytes_in += frame.len() as u64;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            inner.counters.frames_ignored += 1;
            return;
        };
        let dst = eth.dst_addr();
        let target = if dst.is_broadcast() {
            broadcast_target(inner, &eth)
        } else {
            inner.by_mac.get(&dst).copied()
        };
        let Some(id) = target else {
            inner.counters.frames_ignored += 1;
            return;
        };
        let loss = inner.hosts[id].loss;
        if !inner.hosts[id].up {
            inner.counters.frames_ignored += 1;
            return;
        }
        if Self::chance(inner, loss) {
            inner.counters.frames_lost += 1;
            return;
        }
        let host = &mut inner.hosts[id];
        if let Some(payload) = dhcp_payload(&eth) {
            host.dhcp.frames.push_back(payload.to_vec());
            if let Some(w) = host.dhcp.waker.take() {
                w.wake();
            }
            return;
        }
        host.dev.rx.push_back(frame.to_vec());
        inner.dirty.push(id);
    }

    /// Runs the segment until the tap fails.
    pub async fn run(&self, tap: Tap) -> io::Result<()> {
        let mut buf = vec![0u8; crate::tap::MAX_FRAME];
        loop {
            {
                let mut inner = self.inner.borrow_mut();
                while let Some(frame) = tap.try_recv(&mut buf)? {
                    self.dispatch(&mut inner, frame);
                }
            }
            let next = self.poll_hosts(&tap)?;
            let wait = next.unwrap_or(IDLE_POLL).min(IDLE_POLL);
            tokio::select! {
                r = tap.readable() => r?,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Polls every host with frames in, sockets touched or timers due; writes what they send.
    /// Returns how long until the next timer.
    fn poll_hosts(&self, tap: &Tap) -> io::Result<Option<Duration>> {
        let now = self.now();
        let mut inner = self.inner.borrow_mut();
        let mut due: Vec<HostId> = std::mem::take(&mut inner.dirty);
        for (id, host) in inner.hosts.iter().enumerate() {
            if host.up && host.poll_at.is_some_and(|t| t <= now) {
                due.push(id);
            }
        }
        due.sort_unstable();
        due.dedup();
        let mut out = std::mem::take(&mut inner.raw_out);
        for id in due {
            let host = &mut inner.hosts[id];
            if !host.up {
                host.dev.rx.clear();
                continue;
            }
            host.iface.poll(now, &mut host.dev, &mut host.sockets);
            let Host {
                closing,
                draining,
                sockets,
                ..
            } = host;
            draining.retain(|&handle| {
                let sent = sockets.get::<udp::Socket>(handle).send_queue() == 0;
                if sent {
                    sockets.remove(handle);
                }
                !sent
            });
            closing.retain(|&handle| {
                let done = matches!(
                    sockets.get::<tcp::Socket>(handle).state(),
                    tcp::State::Closed | tcp::State::TimeWait
                );
                if done {
                    sockets.remove(handle);
                }
                !done
            });
            host.poll_at = host.iface.poll_at(now, &host.sockets);
            let loss = host.loss;
            let sent = std::mem::take(&mut host.dev.tx);
            for frame in sent {
                if Self::chance(&mut inner, loss) {
                    inner.counters.frames_lost += 1;
                } else {
                    out.push(frame);
                }
            }
        }
        for frame in &out {
            if tap.send(frame)? {
                inner.counters.frames_out += 1;
                inner.counters.bytes_out += frame.len() as u64;
            } else {
                inner.counters.frames_refused += 1;
            }
        }
        let next = inner
            .hosts
            .iter()
            .filter(|h| h.up)
            .filter_map(|h| h.poll_at)
            .min()
            .map(|t| {
                if t <= now {
                    Duration::ZERO
                } else {
                    Duration::from_micros((t - now).total_micros())
                }
            });
        Ok(next)
    }

    fn with_host<R>(
        &self,
        id: HostId,
        generation: u64,
        f: impl FnOnce(&mut Host) -> R,
    ) -> Option<R> {
        let mut inner = self.inner.borrow_mut();
        let host = &mut inner.hosts[id];
        if host.generation != generation {
            return None;
        }
        Some(f(host))
    }

    /// As [`Net::with_host`], for a change the host must act on: it is polled next round.
    fn change_host<R>(
        &self,
        id: HostId,
        generation: u64,
        f: impl FnOnce(&mut Host) -> R,
    ) -> Option<R> {
        let r = self.with_host(id, generation, f)?;
        self.touch(id);
        Some(r)
    }
}

/// Broadcasts we answer: ARP requests for a host's address, DHCP to a host's hardware
/// address (a server that broadcasts its answer).
fn broadcast_target(inner: &Inner, eth: &EthernetFrame<&[u8]>) -> Option<HostId> {
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let arp = ArpPacket::new_checked(eth.payload()).ok()?;
            let ip: [u8; 4] = arp.target_protocol_addr().try_into().ok()?;
            inner.by_ip.get(&Ipv4Address::from(ip)).copied()
        }
        EthernetProtocol::Ipv4 => {
            let payload = dhcp_payload(eth)?;
            // BOOTP's chaddr: 16 bytes at offset 28, the MAC in its first 6.
            let mac: [u8; 6] = payload.get(28..34)?.try_into().ok()?;
            inner.by_mac.get(&EthernetAddress(mac)).copied()
        }
        _ => None,
    }
}

/// The UDP payload of an IPv4 frame to port 68.
fn dhcp_payload<'a>(eth: &'a EthernetFrame<&'a [u8]>) -> Option<&'a [u8]> {
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    (udp.dst_port() == 68).then(|| udp.payload())
}

/// An Ethernet + IPv4 + UDP frame around `payload`.
fn udp_frame(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp = UdpRepr { src_port, dst_port };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut e = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut e);
    let mut p = Ipv4Packet::new_unchecked(e.payload_mut());
    ip.emit(&mut p, &smoltcp::phy::ChecksumCapabilities::default());
    let mut u = UdpPacket::new_unchecked(p.payload_mut());
    udp.emit(
        &mut u,
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &smoltcp::phy::ChecksumCapabilities::default(),
    );
    frame
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the host was powered off or reset",
    )
}

/// A TCP connection of one host, as tokio's I/O traits (for hyper and rustls).
pub struct TcpStream {
    net: Rc<Net>,
    host: HostId,
    generation: u64,
    handle: SocketHandle,
}

impl TcpStream {
    /// A new socket of the host (buffers of `rx` and `tx` bytes, closed after `idle` of
    /// silence), connected or listening by `setup`.
    fn open(
        net: &Rc<Net>,
        host: HostId,
        (rx, tx): (usize, usize),
        idle: u64,
        setup: impl FnOnce(&mut tcp::Socket<'static>, &mut Host) -> io::Result<()>,
    ) -> io::Result<Self> {
        let generation = net.generation(host);
        let handle = net
            .change_host(host, generation, |h| -> io::Result<SocketHandle> {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; rx]),
                    tcp::SocketBuffer::new(vec![0; tx]),
                );
                socket.set_timeout(Some(smoltcp::time::Duration::from_secs(idle)));
                setup(&mut socket, h)?;
                Ok(h.sockets.add(socket))
            })
            .ok_or_else(gone)??;
        Ok(Self {
            net: net.clone(),
            host,
            generation,
            handle,
        })
    }

    /// Waits while the socket is in one of `waiting`; then `Ok` if it is established.
    async fn settle(
        &self,
        waiting: &[tcp::State],
        refused: impl Fn() -> io::Error,
    ) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            self.socket(|s| match s.state() {
                tcp::State::Established => Poll::Ready(Ok(())),
                state if waiting.contains(&state) => {
                    s.register_send_waker(cx.waker());
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                _ => Poll::Ready(Err(refused())),
            })
            .unwrap_or_else(|| Poll::Ready(Err(gone())))
        })
        .await
    }

    /// Connects the host to `to`; fails when refused, reset or not established in `timeout`.
    pub async fn connect(
        net: &Rc<Net>,
        host: HostId,
        to: (Ipv4Addr, u16),
        timeout: Duration,
    ) -> io::Result<Self> {
        let stream = Self::open(net, host, (TCP_RX, TCP_TX), 60, |socket, h| {
            let port = h.take_port();
            socket
                .connect(h.iface.context(), (IpAddress::Ipv4(to.0), to.1), port)
                .map_err(|e| io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{e}")))
        })?;
        let refused = || {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("connecting to {}:{}: refused", to.0, to.1),
            )
        };
        let established = stream.settle(&[tcp::State::SynSent, tcp::State::SynReceived], refused);
        match tokio::time::timeout(timeout, established).await {
            Ok(r) => r.map(|()| stream),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {}:{}: no answer in {timeout:?}", to.0, to.1),
            )),
        }
    }

    /// Waits for one connection to the host's `port`.
    pub async fn accept(net: &Rc<Net>, host: HostId, port: u16) -> io::Result<Self> {
        let stream = Self::open(net, host, (16 * 1024, 16 * 1024), 30, |socket, _| {
            socket
                .listen(port)
                .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, format!("{e}")))
        })?;
        let reset = || io::Error::new(io::ErrorKind::ConnectionReset, "reset before established");
        stream
            .settle(&[tcp::State::Listen, tcp::State::SynReceived], reset)
            .await?;
        Ok(stream)
    }

    /// Runs `f` on the socket, or `None` when the host's power changed since it was made.
    fn socket<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> Option<R> {
        self.net.with_host(self.host, self.generation, |h| {
            f(h.sockets.get_mut::<tcp::Socket>(self.handle))
        })
    }

    /// One step of a read or write: the host is polled next round only when bytes moved
    /// (a window to open, data to send), not when the step waits.
    fn poll_socket<T>(
        &self,
        f: impl FnOnce(&mut tcp::Socket<'static>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let r = self.socket(f).unwrap_or_else(|| Poll::Ready(Err(gone())));
        if r.is_ready() {
            self.net.touch(self.host);
        }
        r
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_socket(|s| {
            if s.can_recv() {
                let n = s
                    .recv_slice(buf.initialize_unfilled())
                    .map_err(|e| io::Error::other(format!("{e}")))?;
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if !s.may_recv() {
                // Closed by the peer (EOF) or reset: hyper tells the two apart by what it read.
                return Poll::Ready(Ok(()));
            }
            s.register_recv_waker(cx.waker());
            Poll::Pending
        })
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_socket(|s| {
            if !s.may_send() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the connection is closed",
                )));
            }
            if s.can_send() {
                return Poll::Ready(
                    s.send_slice(data)
                        .map_err(|e| io::Error::other(format!("{e}"))),
                );
            }
            s.register_send_waker(cx.waker());
            Poll::Pending
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket(|s| s.close());
        self.net.touch(self.host);
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        // Closed, then forgotten: smoltcp sends the FIN on the next poll even though the
        // socket leaves the set (it is removed once the host polls it out).
        let handle = self.handle;
        self.net.change_host(self.host, self.generation, |h| {
            let s = h.sockets.get_mut::<tcp::Socket>(handle);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                h.sockets.remove(handle);
            } else {
                s.close();
                h.closing.push(handle);
            }
        });
    }
}

/// A UDP socket of one host.
pub struct UdpSocket {
    net: Rc<Net>,
    host: HostId,
    generation: u64,
    handle: SocketHandle,
}

impl UdpSocket {
    /// Bound to a fresh port of the host.
    pub fn bind(net: &Rc<Net>, host: HostId) -> io::Result<Self> {
        Self::bind_port(net, host, None)
    }

    /// Bound to `port` (a service's, such as a BMC's 623), or a fresh one.
    pub fn bind_port(net: &Rc<Net>, host: HostId, port: Option<u16>) -> io::Result<Self> {
        let generation = net.generation(host);
        let handle = net
            .with_host(host, generation, |h| -> io::Result<SocketHandle> {
                let mut socket = udp::Socket::new(
                    udp::PacketBuffer::new(
                        vec![udp::PacketMetadata::EMPTY; 64],
                        vec![0; 256 * 1024],
                    ),
                    udp::PacketBuffer::new(
                        vec![udp::PacketMetadata::EMPTY; 16],
                        vec![0; 16 * 1024],
                    ),
                );
                let port = port.unwrap_or_else(|| h.take_port());
                socket
                    .bind(port)
                    .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, format!("{e}")))?;
                Ok(h.sockets.add(socket))
            })
            .ok_or_else(gone)??;
        Ok(Self {
            net: net.clone(),
            host,
            generation,
            handle,
        })
    }

    pub fn send_to(&self, data: &[u8], to: (Ipv4Addr, u16)) -> io::Result<()> {
        self.net
            .change_host(self.host, self.generation, |h| {
                h.sockets
                    .get_mut::<udp::Socket>(self.handle)
                    .send_slice(data, (IpAddress::Ipv4(to.0), to.1))
                    .map_err(|e| io::Error::other(format!("{e}")))
            })
            .ok_or_else(gone)?
    }

    /// The next datagram and its sender, or `None` at `timeout`.
    pub async fn recv_from(
        &self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> io::Result<Option<(usize, (Ipv4Addr, u16))>> {
        let recv = std::future::poll_fn(|cx| {
            self.net
                .with_host(self.host, self.generation, |h| {
                    let s = h.sockets.get_mut::<udp::Socket>(self.handle);
                    match s.recv_slice(buf) {
                        Ok((n, meta)) => {
                            let IpAddress::Ipv4(ip) = meta.endpoint.addr;
                            Poll::Ready(Ok((n, (ip, meta.endpoint.port))))
                        }
                        Err(_) => {
                            s.register_recv_waker(cx.waker());
                            Poll::Pending
                        }
                    }
                })
                .unwrap_or_else(|| Poll::Ready(Err(gone())))
        });
        match tokio::time::timeout(timeout, recv).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        // What was sent last (a TFTP client's final ACK) still leaves: a socket with
        // datagrams queued goes once the host has polled them out.
        let handle = self.handle;
        self.net.change_host(self.host, self.generation, |h| {
            if h.sockets.get::<udp::Socket>(handle).send_queue() == 0 {
                h.sockets.remove(handle);
            } else {
                h.draining.push(handle);
            }
        });
    }
}
