//! An Ethernet switch in userspace, so VMs share one L2 segment with no root: no bridge, no
//! taps, no namespace. QEMU joins it with
//! `-netdev stream,id=n0,server=off,addr.type=unix,addr.path=<socket>` (QEMU 7.2): every
//! connection to the socket is one port, and each frame on it is prefixed by its length, four
//! bytes big-endian.
//!
//! Three layers, the lower two without I/O:
//! - [`FrameReader`] / [`encode_frame`]: the stream framing. Any input, however malformed,
//!   gives frames or a [`FrameError`]; nothing panics.
//! - [`SwitchCore`]: MAC learning and the forwarding decision for one frame, with the counters.
//!   A frame never goes back out of the port it came in on; broadcast, multicast and unknown
//!   unicast destinations are flooded; a port's MACs are forgotten when it disconnects.
//! - [`Switch`]: the socket, on plain threads with blocking I/O (one acceptor, and a reader
//!   and a writer per port) around a `SwitchCore` behind a mutex. Each port's writer has a
//!   bounded queue, so a VM that stops reading loses its own frames and stalls no one else.
//!   Dropping the `Switch` closes every port, joins every thread and removes the socket.
//!
//! A lab switch, not a fast one: tens of thousands of frames a second are plenty for network
//! boots. Why no tokio: the crate has none, and a thread per port is simpler to reason about
//! for the handful of ports a lab has.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use stork_proto::MacAddr;

/// The length prefix: four bytes, big-endian.
pub const LEN_PREFIX: usize = 4;

/// The longest frame accepted: QEMU's own `NET_BUFSIZE` (4096 + 65536), the most its stream
/// netdev sends or takes. A longer length means the stream is garbage or out of step, and the
/// connection is dropped.
pub const MAX_FRAME_LEN: usize = 4096 + 65536;

/// An Ethernet header: destination, source, EtherType.
pub const ETH_HEADER_LEN: usize = 14;

/// How many MACs the table learns, and how many get counters; past that, new sources are
/// not learned (their frames are still switched, and replies to them flooded). A client
/// sending random source addresses cannot grow the switch without bound.
pub const MAX_MACS: usize = 4096;

/// How many frames wait for one port's writer before further frames to it are dropped.
const PORT_QUEUE: usize = 1024;

/// How many frames a [`Switch::capture`] receiver holds before further copies are dropped.
const CAPTURE_QUEUE: usize = 4096;

/// Why a stream can no longer be read as frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A length prefix of 0: QEMU never sends an empty frame.
    Empty,
    /// A length prefix over [`MAX_FRAME_LEN`].
    TooLong { len: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "a frame of length 0"),
            Self::TooLong { len } => {
                write!(f, "a frame of length {len} (at most {MAX_FRAME_LEN})")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Splits a byte stream into length-prefixed frames, sans I/O: [`push`](Self::push) what was
/// read, then take frames with [`next_frame`](Self::next_frame) until it gives `Ok(None)`.
/// After an error the stream is out of step for good: every later call gives the same error.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    failed: Option<FrameError>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that ends
    /// the stream.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        let error = match len {
            0 => Some(FrameError::Empty),
            n if n as usize > MAX_FRAME_LEN => Some(FrameError::TooLong { len: n }),
            _ => None,
        };
        if let Some(e) = error {
            self.failed = Some(e);
            self.buf = Vec::new();
            self.start = 0;
            return Err(e);
        }
        let Some(frame) = rest.get(LEN_PREFIX..LEN_PREFIX + len as usize) else {
            return Ok(None);
        };
        let frame = frame.to_vec();
        self.start += LEN_PREFIX + frame.len();
        Ok(Some(frame))
    }

    /// Bytes received and not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// `frame` with its length prefix, ready to write to the stream.
pub fn encode_frame(frame: &[u8]) -> Result<Vec<u8>, FrameError> {
    if frame.is_empty() {
        return Err(FrameError::Empty);
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong {
            len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
        });
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + frame.len());
    // MAX_FRAME_LEN fits in a u32, checked above.
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    Ok(out)
}

/// A switch port: one connection, numbered from 0 in the order they arrive. Numbers are
/// never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port{}", self.0)
    }
}

/// Why a frame that came in was not sent anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// The source address is a group address, which no station may send from.
    GroupSource,
    /// The destination was learned on the port the frame came in on: it is already there.
    SamePort,
    /// Flooding found no other port.
    NoOtherPort,
}

/// What to do with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// To the one port the destination was learned on.
    Forward(PortId),
    /// To every other port: a broadcast, multicast or unknown destination.
    Flood(Vec<PortId>),
    Drop(DropReason),
}

impl Decision {
    /// The ports the frame goes out of.
    pub fn ports(&self) -> &[PortId] {
        match self {
            Self::Forward(p) => std::slice::from_ref(p),
            Self::Flood(ps) => ps,
            Self::Drop(_) => &[],
        }
    }
}

/// One port's counters. In: `received` = `forwarded` + `flooded` + `dropped`. Out: `sent`
/// frames were written to the port's connection; `tx_dropped` found its queue full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub received: u64,
    pub forwarded: u64,
    pub flooded: u64,
    pub dropped: u64,
    pub sent: u64,
    pub tx_dropped: u64,
}

/// Counters by source MAC, kept after its port disconnects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacStats {
    /// Frames received from this source.
    pub frames: u64,
    /// Of those, to the broadcast address.
    pub broadcast: u64,
    /// Of those, to another group (multicast) address.
    pub multicast: u64,
    /// Frames from this source written to each port.
    pub delivered: BTreeMap<PortId, u64>,
}

/// The switch's state and decisions, with no I/O: ports come and go, frames come in, and it
/// says where each goes.
#[derive(Debug, Default)]
pub struct SwitchCore {
    /// Connected ports.
    ports: BTreeMap<PortId, Vec<MacAddr>>,
    /// Counters of every port ever connected.
    stats: BTreeMap<PortId, PortStats>,
    table: HashMap<MacAddr, PortId>,
    by_mac: HashMap<MacAddr, MacStats>,
}

fn is_group(mac: &MacAddr) -> bool {
    mac.0[0] & 1 == 1
}

impl SwitchCore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A port joins.
    pub fn connect(&mut self, port: PortId) {
        self.ports.insert(port, Vec::new());
        self.stats.entry(port).or_default();
    }

    /// A port leaves: the MACs learned on it are forgotten, so frames to them flood again
    /// (the station may come back on another port).
    pub fn disconnect(&mut self, port: PortId) {
        if let Some(macs) = self.ports.remove(&port) {
            for mac in macs {
                if self.table.get(&mac) == Some(&port) {
                    self.table.remove(&mac);
                }
            }
        }
    }

    /// Where a frame that came in on `port` goes; learns its source and counts it.
    pub fn ingress(&mut self, port: PortId, frame: &[u8]) -> Decision {
        let decision = self.decide(port, frame);
        let stats = self.stats.entry(port).or_default();
        stats.received += 1;
        match &decision {
            Decision::Forward(_) => stats.forwarded += 1,
            Decision::Flood(_) => stats.flooded += 1,
            Decision::Drop(_) => stats.dropped += 1,
        }
        decision
    }

    fn decide(&mut self, port: PortId, frame: &[u8]) -> Decision {
        let (Some(dst), Some(src)) = (
            frame.get(..6).and_then(MacAddr::from_slice),
            frame.get(6..12).and_then(MacAddr::from_slice),
        ) else {
            return Decision::Drop(DropReason::Runt);
        };
        if frame.len() < ETH_HEADER_LEN {
            return Decision::Drop(DropReason::Runt);
        }
        if is_group(&src) {
            return Decision::Drop(DropReason::GroupSource);
        }
        self.learn(port, src, dst);
        if !is_group(&dst)
            && let Some(&to) = self.table.get(&dst)
        {
            return if to == port {
                Decision::Drop(DropReason::SamePort)
            } else {
                Decision::Forward(to)
            };
        }
        let others: Vec<PortId> = self.ports.keys().copied().filter(|&p| p != port).collect();
        if others.is_empty() {
            Decision::Drop(DropReason::NoOtherPort)
        } else {
            Decision::Flood(others)
        }
    }

    fn learn(&mut self, port: PortId, src: MacAddr, dst: MacAddr) {
        if self.by_mac.len() < MAX_MACS || self.by_mac.contains_key(&src) {
            let s = self.by_mac.entry(src).or_default();
            s.frames += 1;
            if dst.0 == [0xff; 6] {
                s.broadcast += 1;
            } else if is_group(&dst) {
                s.multicast += 1;
            }
        }
        if !self.ports.contains_key(&port) {
            return;
        }
        match self.table.get(&src) {
            Some(&p) if p == port => {}
            Some(&old) => {
                // The station moved (a VM restarted and came back on a new connection).
                if let Some(macs) = self.ports.get_mut(&old) {
                    macs.retain(|m| *m != src);
                }
                self.table.insert(src, port);
                self.ports.entry(port).or_default().push(src);
            }
            None if self.table.len() < MAX_MACS => {
                self.table.insert(src, port);
                self.ports.entry(port).or_default().push(src);
            }
            None => {}
        }
    }

    /// A frame was written out of `port`.
    pub fn sent(&mut self, port: PortId, frame: &[u8]) {
        self.stats.entry(port).or_default().sent += 1;
        if let Some(src) = frame.get(6..12).and_then(MacAddr::from_slice)
            && let Some(s) = self.by_mac.get_mut(&src)
        {
            *s.delivered.entry(port).or_default() += 1;
        }
    }

    /// A frame for `port` found its queue full.
    pub fn tx_dropped(&mut self, port: PortId) {
        self.stats.entry(port).or_default().tx_dropped += 1;
    }

    /// The port `mac` was learned on, while that port is connected.
    pub fn port_of(&self, mac: &MacAddr) -> Option<PortId> {
        self.table.get(mac).copied()
    }

    /// The MACs learned on a connected port.
    pub fn macs_on(&self, port: PortId) -> &[MacAddr] {
        self.ports.get(&port).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn is_connected(&self, port: PortId) -> bool {
        self.ports.contains_key(&port)
    }

    pub fn port_stats(&self, port: PortId) -> Option<PortStats> {
        self.stats.get(&port).copied()
    }

    pub fn mac_stats(&self, mac: &MacAddr) -> Option<&MacStats> {
        self.by_mac.get(mac)
    }

    /// Every port ever connected, in order.
    pub fn port_ids(&self) -> Vec<PortId> {
        self.stats.keys().copied().collect()
    }
}

/// Why a port's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortClosed {
    /// The peer closed it (QEMU exited).
    Eof,
    /// Reading or writing failed.
    Io(std::io::ErrorKind),
    /// The stream was not length-prefixed frames.
    Frame(FrameError),
    /// The switch stopped.
    Stopped,
}

/// A port as [`Switch::ports`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub id: PortId,
    /// The connected process (`SO_PEERCRED`): a VM's QEMU, so a test finds its VM's port.
    pub peer_pid: Option<i32>,
    /// `None` while connected.
    pub closed: Option<PortClosed>,
    /// MACs learned on it (none once closed).
    pub macs: Vec<MacAddr>,
    pub stats: PortStats,
}

/// A copy of a frame that went through the switch (see [`Switch::capture`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub port: PortId,
    pub frame: Arc<[u8]>,
    pub decision: Decision,
}

struct PortIo {
    stream: UnixStream,
    tx: SyncSender<Arc<[u8]>>,
}

#[derive(Default)]
struct State {
    core: SwitchCore,
    io: HashMap<PortId, PortIo>,
    peers: HashMap<PortId, Option<i32>>,
    closed: HashMap<PortId, PortClosed>,
    captures: Vec<SyncSender<Captured>>,
    threads: Vec<JoinHandle<()>>,
    next_port: u32,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking port thread must not take the switch down with it: its state is still
        // consistent at every unlock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running switch; dropping it stops it and removes the socket.
pub struct Switch {
    path: PathBuf,
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Switch {
    /// Listens on a new unix socket at `path` (which must not exist; unix socket paths have
    /// at most 107 bytes) and switches frames between whoever connects.
    pub fn start(path: &Path) -> Result<Self> {
        let listener = UnixListener::bind(path)
            .with_context(|| format!("listening on unix socket {}", path.display()))?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("stork-switch".into())
                .spawn(move || accept_loop(&listener, &shared))
                .context("starting the switch thread")?
        };
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The socket QEMU connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every port ever connected, in order, with its counters.
    pub fn ports(&self) -> Vec<PortInfo> {
        let st = self.shared.lock();
        st.core
            .port_ids()
            .into_iter()
            .map(|id| PortInfo {
                id,
                peer_pid: st.peers.get(&id).copied().flatten(),
                closed: st.closed.get(&id).cloned(),
                macs: st.core.macs_on(id).to_vec(),
                stats: st.core.port_stats(id).unwrap_or_default(),
            })
            .collect()
    }

    /// How many ports are connected now.
    pub fn connected(&self) -> usize {
        let st = self.shared.lock();
        st.core
            .port_ids()
            .into_iter()
            .filter(|&p| st.core.is_connected(p))
            .count()
    }

    pub fn port_stats(&self, port: PortId) -> Option<PortStats> {
        self.shared.lock().core.port_stats(port)
    }

    /// The connected port `mac` was learned on.
    pub fn port_of(&self, mac: &MacAddr) -> Option<PortId> {
        self.shared.lock().core.port_of(mac)
    }

    /// The most recent port process `pid` connected (a VM's QEMU: see `RootlessVm::pid`).
    pub fn port_of_pid(&self, pid: u32) -> Option<PortId> {
        let st = self.shared.lock();
        st.peers
            .iter()
            .filter(|(_, p)| **p == i32::try_from(pid).ok())
            .map(|(id, _)| *id)
            .max()
    }

    /// Counters for frames from `mac`.
    pub fn mac_stats(&self, mac: &MacAddr) -> MacStats {
        self.shared
            .lock()
            .core
            .mac_stats(mac)
            .cloned()
            .unwrap_or_default()
    }

    /// Frames received from `mac`.
    pub fn frames_from(&self, mac: &MacAddr) -> u64 {
        self.mac_stats(mac).frames
    }

    /// Broadcast frames received from `mac`.
    pub fn broadcasts_from(&self, mac: &MacAddr) -> u64 {
        self.mac_stats(mac).broadcast
    }

    /// Frames from `mac` written out of port `to`.
    pub fn delivered(&self, from: &MacAddr, to: PortId) -> u64 {
        self.mac_stats(from)
            .delivered
            .get(&to)
            .copied()
            .unwrap_or(0)
    }

    /// From now on, a copy of every frame that comes in, with where it went. Copies are
    /// dropped while the receiver holds 4096 unread; dropping the receiver ends it.
    pub fn capture(&self) -> Receiver<Captured> {
        let (tx, rx) = sync_channel(CAPTURE_QUEUE);
        self.shared.lock().captures.push(tx);
        rx
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor from accept(2), which then fails with EINVAL.
        // SAFETY: the listener's descriptor stays open while `self.listener` holds it.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let threads = {
            let mut st = self.shared.lock();
            for (port, io) in st.io.drain().collect::<Vec<_>>() {
                let _ = io.stream.shutdown(Shutdown::Both);
                st.closed.entry(port).or_insert(PortClosed::Stopped);
            }
            std::mem::take(&mut st.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                if add_port(shared, stream).is_err() {
                    // Out of threads or descriptors: this connection is dropped, the switch
                    // goes on.
                    continue;
                }
            }
            // EMFILE and the like: wait for a descriptor to come free.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is `cred`'s size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

fn add_port(shared: &Arc<Shared>, stream: UnixStream) -> std::io::Result<()> {
    let reader = stream.try_clone()?;
    let writer = stream.try_clone()?;
    let (tx, rx) = sync_channel::<Arc<[u8]>>(PORT_QUEUE);
    let mut st = shared.lock();
    let port = PortId(st.next_port);
    st.next_port += 1;
    st.peers.insert(port, peer_pid(&stream));
    st.core.connect(port);
    st.io.insert(port, PortIo { stream, tx });
    // Finished ports' threads need no join later.
    st.threads.retain(|t| !t.is_finished());
    let spawned = [
        std::thread::Builder::new()
            .name(format!("stork-switch-{port}-rx"))
            .spawn({
                let shared = Arc::clone(shared);
                move || read_port(&shared, port, reader)
            }),
        std::thread::Builder::new()
            .name(format!("stork-switch-{port}-tx"))
            .spawn({
                let shared = Arc::clone(shared);
                move || write_port(&shared, port, writer, &rx)
            }),
    ];
    let mut failed = None;
    for s in spawned {
        match s {
            Ok(t) => st.threads.push(t),
            Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = failed {
        close_port(&mut st, port, PortClosed::Io(e.kind()));
        return Err(e);
    }
    Ok(())
}

/// Removes a port (once): its MACs are forgotten, its writer ends when its queue's sender
/// goes, its reader when the connection is shut down.
fn close_port(st: &mut State, port: PortId, why: PortClosed) {
    if let Some(io) = st.io.remove(&port) {
        let _ = io.stream.shutdown(Shutdown::Both);
        st.core.disconnect(port);
        st.closed.entry(port).or_insert(why);
    }
}

fn read_port(shared: &Shared, port: PortId, mut stream: UnixStream) {
    let mut frames = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let why = 'read: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break PortClosed::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break PortClosed::Io(e.kind()),
        };
        frames.push(&buf[..n]);
        loop {
            match frames.next_frame() {
                Ok(Some(frame)) => switch_frame(shared, port, frame),
                Ok(None) => break,
                Err(e) => break 'read PortClosed::Frame(e),
            }
        }
    };
    let why = if shared.stop.load(Ordering::SeqCst) {
        PortClosed::Stopped
    } else {
        why
    };
    close_port(&mut shared.lock(), port, why);
}

fn switch_frame(shared: &Shared, port: PortId, frame: Vec<u8>) {
    let frame: Arc<[u8]> = frame.into();
    let mut st = shared.lock();
    let decision = st.core.ingress(port, &frame);
    for &to in decision.ports() {
        let full = match st.io.get(&to) {
            Some(io) => matches!(
                io.tx.try_send(Arc::clone(&frame)),
                Err(TrySendError::Full(_))
            ),
            None => false,
        };
        if full {
            st.core.tx_dropped(to);
        }
    }
    if !st.captures.is_empty() {
        let copy = Captured {
            port,
            frame,
            decision,
        };
        st.captures
            .retain(|c| !matches!(c.try_send(copy.clone()), Err(TrySendError::Disconnected(_))));
    }
}

fn write_port(shared: &Shared, port: PortId, mut stream: UnixStream, rx: &Receiver<Arc<[u8]>>) {
    let mut queued = VecDeque::new();
    while let Ok(frame) = rx.recv() {
        queued.push_back(frame);
        queued.extend(rx.try_iter());
        let mut out = Vec::new();
        for f in &queued {
            // Frames came through a FrameReader or the core's checks: never empty or too long.
            if let Ok(bytes) = encode_frame(f) {
                out.extend_from_slice(&bytes);
            }
        }
        if let Err(e) = stream.write_all(&out) {
            close_port(&mut shared.lock(), port, PortClosed::Io(e.kind()));
            return;
        }
        let mut st = shared.lock();
        for f in queued.drain(..) {
            st.core.sent(port, &f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A small deterministic generator (xorshift64*) for the fuzz-ish tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, last])
    }

    const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    fn frame(dst: MacAddr, src: MacAddr, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let a = frame(BROADCAST, mac(1), b"first");
        let b = frame(mac(1), mac(2), &[7; 1500]);
        let mut stream = encode_frame(&a).unwrap();
        stream.extend(encode_frame(&b).unwrap());
        assert_eq!(&stream[..4], &(a.len() as u32).to_be_bytes());
        for cut in 0..=stream.len() {
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                r.push(part);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, [a.clone(), b.clone()], "cut at {cut}");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn bad_lengths_end_the_stream() {
        let mut r = FrameReader::new();
        r.push(&[0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(r.next_frame(), Err(FrameError::Empty));
        r.push(&encode_frame(b"later frames are not read").unwrap());
        assert_eq!(r.next_frame(), Err(FrameError::Empty));

        let too_long = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        let mut r = FrameReader::new();
        r.push(&too_long[..3]);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&too_long[3..]);
        assert_eq!(
            r.next_frame(),
            Err(FrameError::TooLong {
                len: MAX_FRAME_LEN as u32 + 1
            })
        );
        let mut r = FrameReader::new();
        r.push(&[0xff; 4]);
        assert_eq!(r.next_frame(), Err(FrameError::TooLong { len: u32::MAX }));

        // The largest legal frame is accepted.
        let big = vec![1u8; MAX_FRAME_LEN];
        let mut r = FrameReader::new();
        r.push(&encode_frame(&big).unwrap());
        assert_eq!(r.next_frame().unwrap().unwrap().len(), MAX_FRAME_LEN);
        assert_eq!(encode_frame(&[]), Err(FrameError::Empty));
        assert!(encode_frame(&vec![0; MAX_FRAME_LEN + 1]).is_err());
    }

    /// Random bytes in random pieces: frames or an error, never a panic, and never a frame
    /// that the prefix did not announce.
    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng(0x5eed_cafe_f00d_0001);
        for _ in 0..2000 {
            let mut r = FrameReader::new();
            let len = rng.below(300);
            let mut input = rng.bytes(len);
            // Small lengths now and then, so whole frames appear too.
            if rng.below(2) == 0 && input.len() >= 4 {
                let n = rng.below(input.len()) as u32;
                input[..4].copy_from_slice(&n.to_be_bytes());
            }
            let mut pos = 0;
            while pos < input.len() {
                let step = 1 + rng.below(input.len() - pos);
                r.push(&input[pos..pos + step]);
                pos += step;
                while let Ok(Some(f)) = r.next_frame() {
                    assert!(!f.is_empty() && f.len() <= MAX_FRAME_LEN);
                }
            }
        }
    }

    /// Random frames, encoded and cut at random points, decode to the same frames.
    #[test]
    fn random_frames_round_trip() {
        let mut rng = Rng(42);
        for _ in 0..200 {
            let frames: Vec<Vec<u8>> = (0..1 + rng.below(10))
                .map(|_| {
                    let n = 1 + rng.below(3000);
                    rng.bytes(n)
                })
                .collect();
            let stream: Vec<u8> = frames
                .iter()
                .flat_map(|f| encode_frame(f).unwrap())
                .collect();
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < stream.len() {
                let step = 1 + rng.below(stream.len() - pos);
                r.push(&stream[pos..pos + step]);
                pos += step;
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames);
        }
    }

    fn core_with(ports: u32) -> SwitchCore {
        let mut c = SwitchCore::new();
        for p in 0..ports {
            c.connect(PortId(p));
        }
        c
    }

    #[test]
    fn the_table_learns_floods_and_never_echoes() {
        let (p0, p1, p2) = (PortId(0), PortId(1), PortId(2));
        let mut c = core_with(3);
        // Broadcast floods to every other port and teaches the source.
        assert_eq!(
            c.ingress(p0, &frame(BROADCAST, mac(1), b"")),
            Decision::Flood(vec![p1, p2])
        );
        assert_eq!(c.port_of(&mac(1)), Some(p0));
        // Multicast and unknown unicast flood too.
        let ipv6_all_nodes = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            c.ingress(p1, &frame(ipv6_all_nodes, mac(2), b"")),
            Decision::Flood(vec![p0, p2])
        );
        assert_eq!(
            c.ingress(p2, &frame(mac(9), mac(3), b"")),
            Decision::Flood(vec![p0, p1])
        );
        // Known unicast goes to its one port.
        assert_eq!(
            c.ingress(p2, &frame(mac(1), mac(3), b"")),
            Decision::Forward(p0)
        );
        assert_eq!(
            c.ingress(p0, &frame(mac(3), mac(1), b"")),
            Decision::Forward(p2)
        );
        // Never back to where it came from.
        assert_eq!(
            c.ingress(p0, &frame(mac(1), mac(4), b"")),
            Decision::Drop(DropReason::SamePort)
        );
        assert_eq!(c.macs_on(p0), [mac(1), mac(4)]);
        // Bad frames.
        assert_eq!(c.ingress(p0, &[1, 2, 3]), Decision::Drop(DropReason::Runt));
        assert_eq!(
            c.ingress(p0, &frame(BROADCAST, mac(1), b"")[..13]),
            Decision::Drop(DropReason::Runt)
        );
        assert_eq!(
            c.ingress(p0, &frame(mac(1), BROADCAST, b"")),
            Decision::Drop(DropReason::GroupSource)
        );
        assert_eq!(c.port_of(&BROADCAST), None);

        let s0 = c.port_stats(p0).unwrap();
        assert_eq!(
            (s0.received, s0.forwarded, s0.flooded, s0.dropped),
            (6, 1, 1, 4)
        );
        let m1 = c.mac_stats(&mac(1)).unwrap();
        assert_eq!((m1.frames, m1.broadcast, m1.multicast), (2, 1, 0));
        assert_eq!(c.mac_stats(&mac(2)).unwrap().multicast, 1);
    }

    #[test]
    fn a_lone_port_floods_to_no_one() {
        let mut c = core_with(1);
        assert_eq!(
            c.ingress(PortId(0), &frame(BROADCAST, mac(1), b"")),
            Decision::Drop(DropReason::NoOtherPort)
        );
    }

    #[test]
    fn a_disconnected_port_is_forgotten() {
        let (p0, p1, p2) = (PortId(0), PortId(1), PortId(2));
        let mut c = core_with(3);
        c.ingress(p1, &frame(BROADCAST, mac(2), b""));
        assert_eq!(
            c.ingress(p0, &frame(mac(2), mac(1), b"")),
            Decision::Forward(p1)
        );
        c.disconnect(p1);
        assert_eq!(c.port_of(&mac(2)), None);
        assert!(!c.is_connected(p1));
        // Unknown again: flooded, and not to the port that left.
        assert_eq!(
            c.ingress(p0, &frame(mac(2), mac(1), b"")),
            Decision::Flood(vec![p2])
        );
        // The station comes back on a new port.
        let p3 = PortId(3);
        c.connect(p3);
        c.ingress(p3, &frame(BROADCAST, mac(2), b""));
        assert_eq!(
            c.ingress(p0, &frame(mac(2), mac(1), b"")),
            Decision::Forward(p3)
        );
        // Counters of the old port stay readable.
        assert_eq!(c.port_stats(p1).unwrap().received, 1);
    }

    #[test]
    fn a_station_that_moves_is_relearned() {
        let (p0, p1, p2) = (PortId(0), PortId(1), PortId(2));
        let mut c = core_with(3);
        c.ingress(p1, &frame(BROADCAST, mac(2), b""));
        c.ingress(p2, &frame(BROADCAST, mac(2), b""));
        assert_eq!(c.port_of(&mac(2)), Some(p2));
        assert!(c.macs_on(p1).is_empty());
        c.disconnect(p1);
        assert_eq!(c.port_of(&mac(2)), Some(p2));
        assert_eq!(
            c.ingress(p0, &frame(mac(2), mac(1), b"")),
            Decision::Forward(p2)
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut c = core_with(2);
        for i in 0..(MAX_MACS as u32 + 10) {
            let b = i.to_be_bytes();
            c.ingress(
                PortId(0),
                &frame(BROADCAST, MacAddr([2, 0, b[0], b[1], b[2], b[3]]), b""),
            );
        }
        assert_eq!(c.macs_on(PortId(0)).len(), MAX_MACS);
        assert_eq!(c.by_mac.len(), MAX_MACS);
    }

    // In-process tests of the socket layer: plain clients stand in for QEMU.

    fn client(sw: &Switch) -> UnixStream {
        let s = UnixStream::connect(sw.path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn send(s: &mut UnixStream, f: &[u8]) {
        s.write_all(&encode_frame(f).unwrap()).unwrap();
    }

    fn recv(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).unwrap();
        f
    }

    fn wait(what: &str, mut ok: impl FnMut() -> bool) {
        crate::wait_for(
            what,
            Duration::from_secs(5),
            Duration::from_millis(5),
            || Ok(ok().then_some(())),
        )
        .unwrap();
    }

    /// Nothing arrives within a short while.
    fn silent(s: &mut UnixStream) -> bool {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        let quiet = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        quiet
    }

    #[test]
    fn the_socket_switches_between_clients() {
        let dir = tempfile::tempdir().unwrap();
        let sw = Switch::start(&dir.path().join("sw.sock")).unwrap();
        let captured = sw.capture();
        let mut a = client(&sw);
        wait("port 0", || sw.connected() == 1);
        let mut b = client(&sw);
        wait("port 1", || sw.connected() == 2);
        let mut c = client(&sw);
        wait("port 2", || sw.connected() == 3);
        let ports = sw.ports();
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[0].peer_pid, Some(std::process::id() as i32));

        let hello = frame(BROADCAST, mac(1), b"hello");
        send(&mut a, &hello);
        assert_eq!(recv(&mut b), hello);
        assert_eq!(recv(&mut c), hello);
        assert!(silent(&mut a), "a broadcast came back to its sender");
        assert_eq!(sw.port_of(&mac(1)), Some(PortId(0)));

        // b answers a: only a hears it.
        let reply = frame(mac(1), mac(2), b"reply");
        send(&mut b, &reply);
        assert_eq!(recv(&mut a), reply);
        assert!(silent(&mut c), "a known unicast was flooded");
        wait("counters", || sw.delivered(&mac(2), PortId(0)) == 1);
        assert_eq!(sw.frames_from(&mac(1)), 1);
        assert_eq!(sw.broadcasts_from(&mac(1)), 1);
        assert_eq!(sw.delivered(&mac(1), PortId(1)), 1);
        assert_eq!(sw.delivered(&mac(1), PortId(2)), 1);
        assert_eq!(sw.delivered(&mac(2), PortId(2)), 0);
        let s1 = sw.port_stats(PortId(1)).unwrap();
        assert_eq!((s1.received, s1.forwarded, s1.sent), (1, 1, 1));

        let first = captured.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first.port, PortId(0));
        assert_eq!(&*first.frame, &hello[..]);
        assert_eq!(first.decision, Decision::Flood(vec![PortId(1), PortId(2)]));

        // a leaves: its MAC is forgotten, and frames to it flood again.
        drop(a);
        wait("port 0 closed", || sw.connected() == 2);
        assert_eq!(sw.ports()[0].closed, Some(PortClosed::Eof));
        assert_eq!(sw.port_of(&mac(1)), None);
        send(&mut b, &reply);
        assert_eq!(recv(&mut c), reply);
    }

    #[test]
    fn a_bad_length_drops_only_that_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sw = Switch::start(&dir.path().join("sw.sock")).unwrap();
        let mut good = client(&sw);
        wait("port 0", || sw.connected() == 1);
        for bad in [[0u8; 4], [0xff; 4]] {
            let mut evil = client(&sw);
            evil.write_all(&bad).unwrap();
            // The switch hangs up on it.
            let mut b = [0u8; 1];
            assert_eq!(evil.read(&mut b).unwrap(), 0);
        }
        wait("bad ports closed", || sw.connected() == 1);
        let closed: Vec<_> = sw.ports().into_iter().filter_map(|p| p.closed).collect();
        assert_eq!(
            closed,
            [
                PortClosed::Frame(FrameError::Empty),
                PortClosed::Frame(FrameError::TooLong { len: u32::MAX })
            ]
        );
        // The switch still works.
        let mut other = client(&sw);
        wait("port 3", || sw.connected() == 2);
        send(&mut good, &frame(BROADCAST, mac(1), b"still here"));
        assert_eq!(recv(&mut other), frame(BROADCAST, mac(1), b"still here"));
    }

    #[test]
    fn dropping_the_switch_closes_ports_and_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sw.sock");
        let sw = Switch::start(&path).unwrap();
        let mut a = client(&sw);
        wait("port 0", || sw.connected() == 1);
        assert!(path.exists());
        drop(sw);
        assert!(!path.exists());
        let mut b = [0u8; 1];
        assert_eq!(a.read(&mut b).unwrap(), 0);
        // A new switch can take the same path.
        drop(Switch::start(&path).unwrap());
    }
}
