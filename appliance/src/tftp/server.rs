//! The tokio side: the listening socket's loop, and one task per transfer with a socket of
//! its own on an ephemeral port (the server's TID, RFC 1350), driving a
//! [`super::transfer::Transfer`].
//!
//! The transfer socket is connected to the client: the kernel drops datagrams from any
//! other TID (answering them with ICMP port unreachable, where RFC 1350 suggests an ERROR 5
//! that changes nothing for either side), and a client that closes its port is noticed at
//! once as `ECONNREFUSED` instead of after every retry.
//!
//! All transfers live in a `JoinSet` owned by [`run`]: cancelling `run` ends them all.
//!
//! Limits against a hostile LAN: at most `max_transfers` at once (lowered at start when the
//! open-file limit cannot cover them), at most `max_transfers_per_client` per client address
//! (more get an ERROR), and a transfer without progress ends at the server's retry budget
//! whatever `timeout` its client asked. Per transfer, memory is its read-ahead and window,
//! whatever the file's size, netascii included.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::task::{Id, JoinError, JoinSet};

use super::fs::Root;
use super::limits::{PerClient, max_transfers_for_nofile};
use super::options::{Limits, Negotiated, negotiate};
use super::packet::{DATA_HEADER_LEN, ErrorCode, Opcode, Packet, Repr, emit_data_header};
use super::request::{self, Mode, ReadRequest, Refused, netascii};
use super::transfer::{Expired, Failure, Handled, Params, State, Timing, Transfer, Transmit};
use super::{Stats, TftpConfig, TftpError, add, bump};

/// Opens the listening socket. Call it inside the tokio runtime.
pub fn bind(listen: SocketAddr) -> Result<UdpSocket, TftpError> {
    let err = |source| TftpError::Bind { listen, source };
    let sock = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    // IPv6 only: an IPv4 client reaches the IPv4 socket beside it (`Config::ipv6_twin`).
    if listen.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    // A boot storm sends hundreds of requests at once: leave room for them (best effort,
    // the kernel caps it at net.core.rmem_max).
    let _ = sock.set_recv_buffer_size(1 << 20);
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&listen.into()).map_err(err)?;
    UdpSocket::from_std(sock.into()).map_err(err)
}

/// What every transfer task shares.
struct Ctx {
    cfg: TftpConfig,
    root: Root,
    stats: Arc<Stats>,
    /// The listening socket's address; transfer sockets bind the same IP.
    local_ip: IpAddr,
    generated: Option<Arc<dyn super::Generated>>,
}

/// A transfer in progress, to recognise a client's retransmitted request.
struct Active {
    id: Id,
    request: Box<[u8]>,
}

struct Listener {
    ctx: Arc<Ctx>,
    tasks: JoinSet<()>,
    by_peer: HashMap<SocketAddr, Active>,
    by_id: HashMap<Id, SocketAddr>,
    /// Transfers per client address, for `max_transfers_per_client`.
    per_client: PerClient,
}

/// Serves TFTP on `sock` until cancelled (or the socket fails).
pub async fn run(sock: UdpSocket, cfg: TftpConfig, stats: Arc<Stats>) -> Result<(), TftpError> {
    run_with(sock, cfg, stats, None).await
}

/// [`run`], with files `generated` makes served beside the root's.
pub async fn run_with(
    sock: UdpSocket,
    mut cfg: TftpConfig,
    stats: Arc<Stats>,
    generated: Option<Arc<dyn super::Generated>>,
) -> Result<(), TftpError> {
    cfg.validate()?;
    // Each transfer holds descriptors: raise the process's limit, and serve no more at once
    // than it covers (a clear "busy" beats EMFILE in the middle of a boot storm).
    cfg.max_transfers = max_transfers_for_nofile(cfg.max_transfers);
    let root = Root::new(&cfg.root, cfg.case_insensitive).map_err(|source| TftpError::Root {
        path: cfg.root.clone(),
        source,
    })?;
    let local_ip = sock
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or_else(|_| cfg.listen.ip());
    tracing::info!(
        listen = %sock.local_addr().map_or(cfg.listen, |a| a),
        root = %root.path().display(),
        max_block = cfg.max_block,
        max_window = cfg.max_window,
        max_transfers = cfg.max_transfers,
        max_transfers_per_client = cfg.max_transfers_per_client,
        retry_budget_ms = cfg.retry_budget().as_millis() as u64,
        "TFTP serving"
    );
    let per_client = PerClient::new(cfg.max_transfers_per_client);
    let mut l = Listener {
        ctx: Arc::new(Ctx {
            cfg,
            root,
            stats,
            local_ip,
            generated,
        }),
        tasks: JoinSet::new(),
        by_peer: HashMap::new(),
        by_id: HashMap::new(),
        per_client,
    };
    // Any UDP datagram fits; a request is rarely more than a few hundred bytes.
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            biased;
            Some(done) = l.tasks.join_next_with_id(), if !l.tasks.is_empty() => l.reap(done),
            r = sock.recv_from(&mut buf) => match r {
                Ok((len, peer)) => {
                    let bytes = buf.get(..len).unwrap_or_default();
                    l.on_datagram(&sock, bytes, peer).await;
                }
                // ICMP errors from earlier sends (not expected on this socket): not fatal.
                Err(e) if is_transient(&e) => bump(&l.ctx.stats.io_errors),
                Err(e) => return Err(TftpError::Recv(e)),
            },
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

impl Listener {
    fn reap(&mut self, done: Result<(Id, ()), JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                if e.is_panic() {
                    tracing::error!(error = %e, "TFTP transfer task panicked");
                }
                e.id()
            }
        };
        if let Some(peer) = self.by_id.remove(&id) {
            self.per_client.release(peer.ip());
            if self.by_peer.get(&peer).is_some_and(|a| a.id == id) {
                self.by_peer.remove(&peer);
            }
        }
    }

    /// Handles one datagram on the listening port.
    async fn on_datagram(&mut self, sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
        let stats = &self.ctx.stats;
        let req = match classify_caught(bytes, peer, stats) {
            Listen::Drop => return,
            Listen::Refuse { code, message } => {
                send_error(sock, peer, stats, code, &message).await;
                return;
            }
            Listen::Start(req) => req,
        };
        if let Some(a) = self.by_peer.get(&peer)
            && *a.request == *bytes
        {
            // The client repeated its request because our answer was slow: the transfer under
            // way serves it (and retransmits on its own). A second transfer would double the
            // load exactly when the server is slow, and linger: the client ignores a second
            // TID, so it would only end by timing out. (Finished transfers are reaped before
            // each datagram is read, so a new request after one ends is not mistaken.)
            bump(&stats.duplicate_requests);
            tracing::debug!(%peer, file = %req.path, "duplicate TFTP request ignored");
            return;
        }
        let max = self.ctx.cfg.max_transfers_per_client;
        if self.per_client.running(peer.ip()) >= max {
            // One address may not take every slot. An ERROR, not silence: a client that
            // really wants that many is told why; one that floods gains nothing by asking
            // again. Logged at the 1st, 2nd, 4th, 8th... refusal so a flood cannot fill the log.
            let n = stats.per_client_refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(%peer, file = %req.path, max, refused_so_far = n, "TFTP request refused: client address at its transfer cap");
            } else {
                tracing::debug!(%peer, file = %req.path, max, "TFTP request refused: client address at its transfer cap");
            }
            send_error(sock, peer, stats, ErrorCode::NotDefined, PER_CLIENT_REFUSED).await;
            return;
        }
        if self.tasks.len() >= self.ctx.cfg.max_transfers {
            bump(&stats.busy);
            tracing::warn!(%peer, file = %req.path, max = self.ctx.cfg.max_transfers, "TFTP busy: request dropped, the client will ask again");
            return;
        }
        if !self.per_client.try_acquire(peer.ip()) {
            // Checked just above; kept so the count can never go wrong.
            return;
        }
        let handle = self.tasks.spawn(serve(self.ctx.clone(), peer, req));
        let id = handle.id();
        self.by_id.insert(id, peer);
        self.by_peer.insert(
            peer,
            Active {
                id,
                request: bytes.into(),
            },
        );
    }
}

/// The ERROR text for a request over `max_transfers_per_client`.
pub const PER_CLIENT_REFUSED: &str = "too many transfers from this address; try again later";

/// The terms of one transfer: what was negotiated, the OACK to send (if any) and the state
/// machine's parameters. Sans I/O, shared with the fuzz driver.
pub struct Plan {
    pub neg: Negotiated,
    pub oack: Option<Vec<u8>>,
    pub params: Params,
}

pub fn plan(req: &ReadRequest, size: u64, cfg: &TftpConfig) -> Plan {
    let neg = negotiate(
        &req.options,
        Limits {
            max_block: cfg.max_block,
            max_window: cfg.max_window,
        },
        size,
    );
    let oack = neg.oack.as_ref().and_then(|w| {
        Repr::Oack {
            options: w.options(),
        }
        .to_vec()
        .ok()
    });
    let params = Params {
        block_size: neg.block_size,
        window: neg.window,
        size,
        oack: oack.is_some(),
        timing: Timing {
            // The client's `timeout` if acknowledged (at most 5 s), else the server's.
            initial: neg.timeout.unwrap_or(cfg.timeout),
            max_interval: cfg.max_timeout,
            retries: cfg.retries,
            // From the server's own schedule: how long a silent client can hold a slot.
            budget: cfg.retry_budget(),
        },
    };
    Plan { neg, oack, params }
}

/// What the listening port does with one datagram.
#[derive(Debug)]
pub enum Listen {
    /// Counted and dropped: not a request, or not TFTP at all.
    Drop,
    /// Answer with an ERROR so the client stops asking.
    Refuse { code: ErrorCode, message: String },
    /// A read request to serve.
    Start(ReadRequest),
}

/// The listening port's decision on one datagram, sans I/O: parse, check, count. The
/// socket loop and the fuzz driver both run it.
pub fn classify(bytes: &[u8], peer: SocketAddr, stats: &Stats) -> Listen {
    let repr = match Repr::parse_bytes(bytes) {
        Ok(r) => r,
        Err(e) => {
            bump(&stats.malformed);
            tracing::debug!(%peer, len = bytes.len(), error = %e, "malformed TFTP datagram");
            // Answer a broken request so the client stops asking; drop anything else.
            let op = Packet::new_unchecked(bytes).opcode();
            if matches!(op, Some(Opcode::Rrq | Opcode::Wrq)) {
                return Listen::Refuse {
                    code: ErrorCode::IllegalOperation,
                    message: "malformed request".into(),
                };
            }
            return Listen::Drop;
        }
    };
    if matches!(repr, Repr::Rrq(_) | Repr::Wrq(_)) {
        bump(&stats.requests);
    }
    match request::read_request(&repr) {
        Ok(r) => Listen::Start(r),
        Err(Refused::NotARequest) => {
            bump(&stats.malformed);
            tracing::debug!(%peer, opcode = ?repr.opcode(), "not a request on the TFTP port");
            Listen::Drop
        }
        Err(why) => {
            bump(&stats.refused);
            let file = match repr {
                Repr::Rrq(r) | Repr::Wrq(r) => String::from_utf8_lossy(r.filename).into_owned(),
                _ => String::new(),
            };
            tracing::info!(%peer, %file, reason = %why, "TFTP request refused");
            Listen::Refuse {
                code: why.code(),
                message: why.to_string(),
            }
        }
    }
}

/// [`classify`], where a panic (a bug not found yet) costs this datagram only.
pub fn classify_caught(bytes: &[u8], peer: SocketAddr, stats: &Stats) -> Listen {
    std::panic::catch_unwind(|| classify(bytes, peer, stats)).unwrap_or_else(|_| {
        bump(&stats.panics);
        tracing::error!(%peer, len = bytes.len(), "TFTP request handling panicked: datagram dropped");
        Listen::Drop
    })
}

/// Sends an ERROR from the listening socket (a request refused before any transfer).
async fn send_error(
    sock: &UdpSocket,
    peer: SocketAddr,
    stats: &Stats,
    code: ErrorCode,
    message: &str,
) {
    let Some(bytes) = error_packet(code, message) else {
        return;
    };
    count_error_sent(stats, sock.send_to(&bytes, peer).await);
}

/// Sends an ERROR to a transfer's client.
async fn send_transfer_error(sock: &TransferSocket, stats: &Stats, code: ErrorCode, message: &str) {
    let Some(bytes) = error_packet(code, message) else {
        return;
    };
    count_error_sent(stats, sock.send(&bytes).await);
}

fn error_packet(code: ErrorCode, message: &str) -> Option<Vec<u8>> {
    Repr::Error {
        code,
        message: message.as_bytes(),
    }
    .to_vec()
    .ok()
}

fn count_error_sent(stats: &Stats, sent: io::Result<usize>) {
    match sent {
        Ok(_) => bump(&stats.errors_sent),
        Err(e) => {
            bump(&stats.io_errors);
            tracing::debug!(error = %e, "cannot send TFTP error");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("cannot open a transfer socket")]
    Socket(#[source] io::Error),
    #[error("the client's port is closed")]
    ClientGone,
    #[error("send failed")]
    Send(#[source] io::Error),
    #[error("receive failed")]
    Recv(#[source] io::Error),
    #[error("cannot read the file")]
    Read(#[source] io::Error),
    #[error("blocking read task failed")]
    Join(#[source] JoinError),
}

/// Keeps `Stats::active` true while a transfer task lives, however it ends.
struct ActiveGuard<'a>(&'a Stats);

impl<'a> ActiveGuard<'a> {
    fn new(s: &'a Stats) -> Self {
        bump(&s.active);
        Self(s)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One transfer, from opening the file to the last ACK.
async fn serve(ctx: Arc<Ctx>, peer: SocketAddr, req: ReadRequest) {
    let stats = &ctx.stats;
    let _active = ActiveGuard::new(stats);
    let sock = match TransferSocket::open(ctx.local_ip, peer) {
        Ok(s) => s,
        Err(e) => {
            bump(&stats.io_errors);
            tracing::warn!(%peer, file = %req.path, error = %error_chain(&e), "TFTP transfer not started");
            return;
        }
    };
    let generated = ctx
        .generated
        .as_ref()
        .and_then(|g| g.generate(&req.path, peer.ip()));
    let opened = match generated {
        Some(made) => Ok(made
            .await
            .and_then(|bytes| generated_body(&req.path, &bytes))),
        None => {
            let ctx = ctx.clone();
            let path = req.path.clone();
            tokio::task::spawn_blocking(move || open_body(&ctx.root, &path, req.mode)).await
        }
    };
    let (body, size, real) = match opened {
        Ok(Ok(o)) => o,
        Ok(Err(why)) => {
            bump(&stats.refused);
            tracing::info!(%peer, file = %req.path, reason = %why, "TFTP request refused");
            send_transfer_error(&sock, stats, why.code(), &why.to_string()).await;
            return;
        }
        Err(e) => {
            bump(&stats.io_errors);
            tracing::error!(%peer, file = %req.path, error = %e, "TFTP open task failed");
            return;
        }
    };
    let Plan { neg, oack, params } = plan(&req, size, &ctx.cfg);
    let started = Instant::now();
    let mut t = Transfer::new(params, started);
    bump(&stats.transfers_started);
    tracing::info!(
        %peer,
        file = %req.path,
        path = %real.display(),
        size,
        blksize = neg.block_size,
        windowsize = neg.window,
        mode = ?req.mode,
        ignored = ?req.options.ignored,
        "TFTP transfer started"
    );
    let mut reader = Reader::new(body, size, neg.block_size, neg.window);
    let mut counts = Counts::default();
    let mut result = drive(
        &sock,
        &mut t,
        &mut reader,
        oack.as_deref(),
        stats,
        &mut counts,
    )
    .await;
    if matches!(result, Err(TransferError::ClientGone)) && sock.settle(&mut t) {
        result = Ok(());
    }
    let secs = started.elapsed().as_secs_f64();
    let retransmits = counts.retransmits;
    let file = &req.path;
    match (result, t.state()) {
        (Ok(()), State::Done) => {
            bump(&stats.transfers_completed);
            tracing::info!(%peer, %file, size, retransmits, secs, "TFTP transfer completed");
        }
        (Ok(()), State::Failed(Failure::TimedOut)) => {
            bump(&stats.transfers_failed);
            bump(&stats.timeouts);
            tracing::warn!(%peer, %file, acked_blocks = t.acked(), retransmits, secs, "TFTP transfer timed out: client dropped");
        }
        (Ok(()), State::Failed(Failure::ClientError(code))) => {
            bump(&stats.transfers_failed);
            // EDK2 refuses the OACK of its size probe on purpose: not worth a warning.
            tracing::info!(%peer, %file, ?code, acked_blocks = t.acked(), "TFTP transfer ended by the client");
        }
        (Ok(()), State::Running) => {
            // `drive` returns only once the transfer has ended; counted in case it changes.
            bump(&stats.transfers_failed);
        }
        (Err(e), _) => {
            bump(&stats.transfers_failed);
            tracing::warn!(%peer, %file, error = %error_chain(&e), acked_blocks = t.acked(), "TFTP transfer failed");
        }
    }
}

/// An error with its causes, for one log field.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Per-transfer tallies for the final log line.
#[derive(Debug, Default)]
struct Counts {
    retransmits: u64,
}

/// A transfer's socket: connected to the client, registered for read readiness only.
///
/// tokio's `UdpSocket` registers for write readiness too, and on Linux every datagram the
/// client consumes frees send-buffer space and fires an EPOLLOUT edge: a spurious wakeup
/// per packet sent, which in lock-step doubles the wakeups per block. Here sends go straight
/// to the socket; only when the send buffer is full (large blocks in large windows) is write
/// readiness awaited, through a short-lived registration of a duplicate descriptor.
struct TransferSocket {
    io: AsyncFd<std::net::UdpSocket>,
}

impl TransferSocket {
    fn open(local_ip: IpAddr, peer: SocketAddr) -> Result<Self, TransferError> {
        let ip = match (local_ip.is_unspecified(), peer) {
            (false, _) => local_ip,
            (true, SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (true, SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let open = || -> io::Result<Self> {
            let sock = std::net::UdpSocket::bind((ip, 0))?;
            sock.connect(peer)?;
            sock.set_nonblocking(true)?;
            // SAFETY: the `UdpSocket` owns its descriptor, which stays open and the same
            // until the `AsyncFd` (its only owner) is dropped.
            let io = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE)? };
            Ok(Self { io })
        };
        open().map_err(TransferError::Socket)
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.io.readable().await?;
            if let Ok(r) = ready.try_io(|s| s.get_ref().recv(buf)) {
                return r;
            }
        }
    }

    /// After the client's port was found closed: whether the ACKs it sent before closing,
    /// still queued, complete the transfer. Linux reports a pending ICMP error on the next
    /// receive or send *ahead of* datagrams already queued, so a retransmission that raced
    /// the client's final ACK (it closes as soon as it has sent that ACK) would otherwise
    /// fail a transfer the client finished. Reads only what is queued; never waits.
    fn settle(&self, t: &mut Transfer) -> bool {
        let mut buf = [0u8; 1024];
        // Each queued ICMP error is reported once and then cleared; a few in a row are
        // expected (one per datagram sent to the closed port), so they do not end the drain.
        for _ in 0..256 {
            if t.state() != State::Running {
                break;
            }
            match self.io.get_ref().recv(&mut buf) {
                Ok(n) => {
                    if let Ok(repr) = Repr::parse_bytes(buf.get(..n).unwrap_or_default()) {
                        t.on_packet(&repr, Instant::now());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(_) => break,
            }
        }
        t.state() == State::Done
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.io.get_ref().send(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Registering reports the current state, so space freed in between is
                    // not missed.
                    let dup = self.io.get_ref().try_clone()?;
                    // SAFETY: as in `open`: `dup` owns its descriptor until `w` drops it.
                    let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE)? };
                    drop(w.writable().await?);
                }
                other => return other,
            }
        }
    }
}

/// Sends what the state machine asks, waits for a packet or its deadline, repeats.
async fn drive(
    sock: &TransferSocket,
    t: &mut Transfer,
    reader: &mut Reader,
    oack: Option<&[u8]>,
    stats: &Stats,
    counts: &mut Counts,
) -> Result<(), TransferError> {
    let mut out = vec![0u8; DATA_HEADER_LEN + usize::from(t.params().block_size)];
    // Clients send ACKs and ERRORs only; a longer datagram is cut and still parses.
    let mut inbuf = vec![0u8; 1024];
    let Some(first) = t.deadline() else {
        return Ok(());
    };
    let mut armed = first;
    let mut sleep = pin!(tokio::time::sleep_until(armed.into()));
    loop {
        while let Some(tx) = t.poll_transmit() {
            let sent = match tx {
                Transmit::Oack { retransmit } => {
                    count_packet(stats, counts, retransmit);
                    sock.send(oack.unwrap_or_default()).await
                }
                Transmit::Data {
                    block,
                    offset,
                    len,
                    retransmit,
                } => {
                    let data = reader.read(offset, len, t.resend_from()).await?;
                    let end = DATA_HEADER_LEN + len;
                    let Some(payload) = out.get_mut(DATA_HEADER_LEN..end) else {
                        return Err(TransferError::Read(io::ErrorKind::InvalidData.into()));
                    };
                    payload.copy_from_slice(data);
                    if emit_data_header(&mut out, block).is_err() {
                        return Err(TransferError::Read(io::ErrorKind::InvalidData.into()));
                    }
                    count_packet(stats, counts, retransmit);
                    add(&stats.bytes_sent, len as u64);
                    sock.send(out.get(..end).unwrap_or_default()).await
                }
                Transmit::Error { code, message } => {
                    send_transfer_error(sock, stats, code, message).await;
                    Ok(0)
                }
            };
            if let Err(e) = sent {
                return Err(socket_error(e, stats, TransferError::Send));
            }
        }
        let Some(deadline) = t.deadline() else {
            return Ok(());
        };
        // Re-arming the timer on every ACK costs a timer-wheel update; only move it earlier
        // here, and let a timer that fires early re-arm itself below.
        if deadline < armed {
            armed = deadline;
            sleep.as_mut().reset(armed.into());
        }
        tokio::select! {
            r = sock.recv(&mut inbuf) => {
                let n = r.map_err(|e| socket_error(e, stats, TransferError::Recv))?;
                let Ok(repr) = Repr::parse_bytes(inbuf.get(..n).unwrap_or_default()) else {
                    bump(&stats.malformed);
                    continue;
                };
                match t.on_packet(&repr, Instant::now()) {
                    Handled::Aborted(_) => bump(&stats.errors_received),
                    Handled::Ignored(why) => tracing::trace!(?why, "TFTP packet ignored"),
                    Handled::Advanced(_) | Handled::Completed => {}
                }
            }
            () = &mut sleep => {
                match t.on_timeout(Instant::now()) {
                    Expired::Retransmit { tries, next } => tracing::debug!(tries, next_ms = next.as_millis() as u64, acked_blocks = t.acked(), "TFTP retransmit"),
                    Expired::NotYet | Expired::GaveUp | Expired::Finished => {}
                }
                if let Some(d) = t.deadline() {
                    armed = d;
                    sleep.as_mut().reset(armed.into());
                }
            }
        }
    }
}

fn count_packet(stats: &Stats, counts: &mut Counts, retransmit: bool) {
    bump(&stats.packets_sent);
    if retransmit {
        bump(&stats.retransmits);
        counts.retransmits += 1;
    }
}

fn socket_error(
    e: io::Error,
    stats: &Stats,
    wrap: fn(io::Error) -> TransferError,
) -> TransferError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        // ICMP port unreachable: the client has gone; no point retrying.
        return TransferError::ClientGone;
    }
    bump(&stats.io_errors);
    wrap(e)
}

/// What a transfer sends: the file as it is (octet), or its netascii form, encoded as it
/// is sent. Either way the file is read in chunks, never whole.
enum Body {
    Octet(Arc<File>),
    /// The file and its raw length (the transfer's size is the encoded one).
    Netascii(Arc<File>, u64),
}

/// Raw bytes read per step when counting or encoding netascii.
const NETASCII_CHUNK: usize = 64 << 10;

fn open_body(root: &Root, path: &str, mode: Mode) -> Result<(Body, u64, PathBuf), Refused> {
    let opened = root.open(path)?;
    match mode {
        Mode::Octet => Ok((Body::Octet(Arc::new(opened.file)), opened.len, opened.path)),
        Mode::Netascii => {
            // The encoded size, for `tsize` and the last block: one pass over the file in
            // chunks (the file is then read again as it is sent; boot clients use octet).
            let mut file = opened.file;
            let mut chunk = vec![0u8; NETASCII_CHUNK];
            let (mut raw_len, mut size) = (0u64, 0u64);
            loop {
                let n = match file.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(Refused::Unreadable),
                };
                let read = chunk.get(..n).unwrap_or_default();
                raw_len = raw_len.saturating_add(n as u64);
                size = size.saturating_add(netascii::encoded_len(read));
            }
            Ok((Body::Netascii(Arc::new(file), raw_len), size, opened.path))
        }
    }
}

/// A generated file as a transfer's body: in an anonymous temporary file, so that it is read
/// like any other (it is small: a GRUB configuration). Sent as it is in either mode.
fn generated_body(path: &str, bytes: &[u8]) -> Result<(Body, u64, PathBuf), Refused> {
    use std::io::Write;
    let mut file = tempfile::tempfile().map_err(|_| Refused::Unreadable)?;
    file.write_all(bytes).map_err(|_| Refused::Unreadable)?;
    let len = bytes.len() as u64;
    Ok((
        Body::Octet(Arc::new(file)),
        len,
        PathBuf::from(format!("(generated) {path}")),
    ))
}

/// Reads what a transfer sends.
///
/// Octet: through a buffer of whole blocks. The state machine only asks from the oldest
/// unacknowledged block onward, and a refill starts there, so retransmitting a window never
/// reads twice. Netascii: through a [`netascii::Encoder`], which keeps the encoded bytes
/// from the oldest unacknowledged one and encodes further chunk by chunk as blocks are
/// asked; both hold about a window and a read-ahead, whatever the file's size.
///
/// Refills read the page cache in place ([`read_cached`]) and go to the blocking pool only
/// for what is not cached. Boot files are read over and over, so that is the rare path, and
/// it matters: measured lock-step, handing every refill to the blocking pool made transfers
/// on the multi-threaded runtime fall to a third of their speed whenever the machine was
/// busy (the wakeups move the task between workers).
struct Reader {
    file: Arc<File>,
    chunk: usize,
    kind: ReaderKind,
}

enum ReaderKind {
    Octet {
        size: u64,
        start: u64,
        buf: Vec<u8>,
    },
    Netascii {
        enc: netascii::Encoder,
        raw: Vec<u8>,
    },
}

/// Per-transfer read-ahead; a whole window always fits.
const READ_AHEAD: usize = 128 << 10;

impl Reader {
    fn new(body: Body, size: u64, block_size: u16, window: u16) -> Self {
        let bs = usize::from(block_size.max(1));
        let blocks = (READ_AHEAD / bs).max(usize::from(window)).max(1);
        match body {
            Body::Octet(file) => Self {
                file,
                chunk: blocks * bs,
                kind: ReaderKind::Octet {
                    size,
                    start: 0,
                    buf: Vec::new(),
                },
            },
            Body::Netascii(file, raw_len) => Self {
                file,
                chunk: NETASCII_CHUNK,
                kind: ReaderKind::Netascii {
                    enc: netascii::Encoder::new(raw_len),
                    raw: Vec::new(),
                },
            },
        }
    }

    /// `len` bytes at `offset`; nothing before `keep_from` (the first unacknowledged byte)
    /// will be asked again.
    async fn read(
        &mut self,
        offset: u64,
        len: usize,
        keep_from: u64,
    ) -> Result<&[u8], TransferError> {
        let changed = || TransferError::Read(io::ErrorKind::UnexpectedEof.into());
        if len == 0 {
            return Ok(&[]);
        }
        match &mut self.kind {
            ReaderKind::Octet { size, start, buf } => {
                let end = offset + len as u64;
                if offset < *start || end > *start + buf.len() as u64 {
                    let want = size.saturating_sub(offset).min(self.chunk as u64);
                    let want = usize::try_from(want).map_err(|_| changed())?.max(len);
                    let mut b = std::mem::take(buf);
                    b.resize(want, 0);
                    let (back, res) = read_exact_at(&self.file, b, offset).await?;
                    *buf = back;
                    *start = offset;
                    if let Err(e) = res {
                        buf.clear();
                        // A shorter file than at open time: it changed under us.
                        return Err(TransferError::Read(e));
                    }
                }
                let from = usize::try_from(offset - *start).map_err(|_| changed())?;
                buf.get(from..from + len).ok_or_else(changed)
            }
            ReaderKind::Netascii { enc, raw } => {
                enc.release_before(keep_from);
                while let Some((at, n)) = enc.wants(offset, len, self.chunk) {
                    let mut b = std::mem::take(raw);
                    b.resize(n, 0);
                    let (back, res) = read_exact_at(&self.file, b, at).await?;
                    *raw = back;
                    // A shorter file than counted at open: it changed under us.
                    res.map_err(TransferError::Read)?;
                    enc.feed(raw);
                }
                enc.get(offset, len).ok_or_else(changed)
            }
        }
    }
}

/// Fills `buf` from `file` at `offset`: from the page cache in place when it holds it all,
/// else the rest on the blocking pool. Returns the buffer (moved through the pool) and the
/// read's result.
async fn read_exact_at(
    file: &Arc<File>,
    mut buf: Vec<u8>,
    offset: u64,
) -> Result<(Vec<u8>, io::Result<()>), TransferError> {
    let cached = read_cached(file, &mut buf, offset);
    if cached == buf.len() {
        return Ok((buf, Ok(())));
    }
    // Not (all) in the page cache: the rest on the blocking pool.
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let res = buf.get_mut(cached..).map_or(Ok(()), |rest| {
            file.read_exact_at(rest, offset + cached as u64)
        });
        (buf, res)
    })
    .await
    .map_err(TransferError::Join)
}

/// Copies what the page cache holds of `buf.len()` bytes at `offset` without ever blocking
/// (`preadv2` with `RWF_NOWAIT`): returns how many bytes were read, from 0 (nothing cached,
/// end of file, or a filesystem without `RWF_NOWAIT`) to all of them. Errors are left to the
/// blocking read that follows, which reports them.
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
            break;
        };
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: one iovec over `rest`, live and exclusively borrowed for the call; the
        // descriptor belongs to `file`, open for the call.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        let Ok(n) = usize::try_from(n) else {
            break;
        };
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}
