//! The HTTP accept loop: the router served by hyper with what `axum::serve` does not offer
//! (docs/security.md, "HTTP"): a cap on open connections, from everyone and from one
//! address, and a deadline for a request's headers, so that slow or idle connections from
//! one host (slowloris) cannot hold the listener. The request body's deadline is a layer of
//! the router (`router`). The same loop serves HTTPS: the TLS handshake then runs under
//! the header deadline.
//!
//! On plain HTTP, boot files skip hyper: the loop reads each request head itself and
//! answers a plain `GET`/`HEAD` of a `/boot/` path with `sendfile(2)` (`bootfile` says which
//! and why), under the same slots and header deadline, with an idle deadline on sending.
//! The first request that is anything else takes the connection, and the bytes read of it,
//! to hyper for good: every other route behaves as before.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use super::bootfile::{self, Peek};
use super::config::HttpLimits;

counters! {
    /// The listener's counters, in `/stats` as `http`.
    HttpStats, HttpStatsSnapshot;
    connections,
    /// Closed at once: the listener held `max_connections` already.
    refused_busy,
    /// Closed at once: that address held `max_connections_per_ip` already.
    refused_per_ip,
    /// Unauthenticated agent requests refused by the per-address rate limit.
    agent_rate_limited,
    /// Changes asked without a valid token whose refusal was not written to the audit log:
    /// that address's refusals came faster than `agent_rate` (each entry is a durable write).
    audit_unauthenticated_dropped,
    /// `/boot/` files sent on the runtime: the blocking pool's share of sends was taken.
    boot_sends_on_runtime,
}

/// Open connections, in all and by address.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// One open connection's place; given back when dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    Busy,
    PerIp,
}

fn take_slot(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &HttpLimits) -> Result<Slot, Full> {
    let mut o = open.lock().unwrap_or_else(PoisonError::into_inner);
    if o.total >= limits.max_connections {
        return Err(Full::Busy);
    }
    let n = o.by_ip.entry(ip).or_default();
    if *n >= limits.max_connections_per_ip {
        return Err(Full::PerIp);
    }
    *n += 1;
    o.total += 1;
    Ok(Slot {
        open: open.clone(),
        ip,
    })
}

/// How a listener's connections arrive, and what the router is told of it.
#[derive(Clone)]
pub enum Channel {
    /// Plain HTTP, with the API and agent routes on this listener.
    Plain,
    /// Plain HTTP beside an HTTPS listener: the API and agent routes are refused here
    /// (each request carries a [`PlainBesideTls`] naming where to go instead).
    PlainBesideTls(PlainBesideTls),
    Tls(tokio_rustls::TlsAcceptor),
}

/// In a plain request's extensions while HTTPS is on: the API's HTTPS base URL.
#[derive(Clone, Debug)]
pub struct PlainBesideTls {
    pub api_url: Arc<str>,
}

/// Serves `app` on `listener` until the task is cancelled or accepting fails. On a plain
/// channel, `/boot/` requests are answered from `boot_root` with `sendfile` (the router's
/// `/boot/` serves the same root: [`super::boot_root`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    channel: Channel,
    boot_root: Option<Arc<PathBuf>>,
) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    let boot = match channel {
        Channel::Tls(_) => None,
        Channel::Plain | Channel::PlainBesideTls(_) => boot_root,
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors or a connection reset before accept: the next one
            // may work; a pause keeps a full fd table from spinning the loop.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "HTTP accept failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ip = crate::lifecycle::boot::canonical(peer.ip());
        let slot = match take_slot(&open, ip, &limits) {
            Ok(s) => s,
            Err(full) => {
                let counter = match full {
                    Full::Busy => &stats.refused_busy,
                    Full::PerIp => &stats.refused_per_ip,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, ?full, "HTTP connection refused");
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (app, channel, boot) = (app.clone(), channel.clone(), boot.clone());
        let stats = stats.clone();
        let header_timeout = limits.header_timeout;
        let limits = limits.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let plain = match &channel {
                Channel::PlainBesideTls(p) => Some(p.clone()),
                _ => None,
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                // What `into_make_service_with_connect_info` would add: who is asking.
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                if let Some(p) = &plain {
                    req.extensions_mut().insert(p.clone());
                }
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let served = match channel {
                Channel::Tls(acceptor) => {
                    // The handshake gets the headers' deadline: a silent client holds a
                    // slot no longer over TLS than without it.
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                Channel::Plain | Channel::PlainBesideTls(_) => {
                    let io = match &boot {
                        Some(root) => match boot_files(stream, peer, root, &limits, &stats).await {
                            Some(io) => io,
                            None => return,
                        },
                        None => Rewind::new(Vec::new(), stream),
                    };
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

/// Serves the `/boot/` requests of a plain connection with `sendfile` until one is not
/// ours: the connection is then hyper's, with what was read of that request (`Some`).
/// `None`: the connection is done (closed by the client, a deadline, an error, a refusal).
async fn boot_files(
    mut stream: TcpStream,
    peer: SocketAddr,
    root: &Path,
    limits: &HttpLimits,
    stats: &HttpStats,
) -> Option<Rewind> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // From the first wait for each request, as hyper's: an idle keep-alive connection
        // holds its slot no longer than a slow request would.
        let deadline = tokio::time::Instant::now() + limits.header_timeout;
        let req = loop {
            match bootfile::peek(&buf) {
                Peek::Handoff => return Some(Rewind::new(buf, stream)),
                Peek::Ours(req, n) => {
                    buf.drain(..n);
                    break req;
                }
                Peek::Bad(bad) => {
                    tracing::debug!(%peer, error = %bad, "bad boot file request");
                    let head = bootfile::refusal_head(bad, SystemTime::now());
                    let _ = tokio::time::timeout(limits.header_timeout, async {
                        stream.write_all(&head).await?;
                        stream.shutdown().await
                    })
                    .await;
                    return None;
                }
                Peek::NeedMore => {}
            }
            buf.reserve(4096);
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) => return None,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%peer, "HTTP request head timed out");
                    return None;
                }
            }
        };
        match respond(&mut stream, peer, root, &req, limits.body_timeout, stats).await {
            Ok(()) if req.keep_alive => {}
            Ok(()) => {
                let _ = stream.shutdown().await;
                return None;
            }
            Err(e) => {
                tracing::debug!(%peer, path = %req.path, error = %e, "boot file not sent");
                return None;
            }
        }
    }
}

/// Why a boot file's answer was cut short (the connection is then closed).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("the client took nothing for {0:?}")]
    Stalled(Duration),
    #[error("the file ended {0} bytes early")]
    Truncated(u64),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Answers one boot file request. `idle`: how long the client may take no byte before the
/// connection is closed. The request body's deadline serves: a client that stops reading
/// holds its slot no longer than one that stops sending, and a slow link still gets a
/// large file as long as it keeps taking bytes.
async fn respond(
    stream: &mut TcpStream,
    peer: SocketAddr,
    root: &Path,
    req: &bootfile::Request,
    idle: Duration,
    stats: &HttpStats,
) -> Result<(), SendError> {
    let started = Instant::now();
    let (root_path, path) = (root.to_path_buf(), req.path.clone());
    // Path resolution and open touch the disk: off the runtime's threads.
    let opened = tokio::task::spawn_blocking(move || open_boot_file(&root_path, &path))
        .await
        .ok()
        .flatten();
    let meta = opened.as_ref().map(|(_, m)| *m);
    let answer = bootfile::answer(req, meta.as_ref());
    let head = bootfile::response_head(answer, meta.as_ref(), req.keep_alive, SystemTime::now());
    let body = meta.and_then(|m| answer.body(req.method, &m));
    // As nginx's `tcp_nopush`: the head leaves in the body's first full segment, and every
    // segment of the body is full; uncorking sends the last partial one at once.
    let cork = |stream: &TcpStream, on: bool| socket2::SockRef::from(stream).set_tcp_cork(on);
    if body.is_some() {
        cork(stream, true)?;
    }
    tokio::time::timeout(idle, stream.write_all(&head))
        .await
        .map_err(|_| SendError::Stalled(idle))??;
    let mut sent = 0;
    if let (Some((file, _)), Some((offset, count))) = (opened, body) {
        send_file(stream, file, offset, count, idle, stats).await?;
        cork(stream, false)?;
        sent = count;
    }
    tracing::debug!(
        %peer,
        method = ?req.method,
        path = %req.path,
        status = answer.status(),
        bytes = sent,
        ms = started.elapsed().as_millis() as u64,
        "boot file"
    );
    Ok(())
}

/// The regular file `encoded` names under `root`, open, and its size and time; `None`
/// for anything [`bootfile::lookup`] refuses, a directory, or what cannot be opened.
fn open_boot_file(root: &Path, encoded: &str) -> Option<(std::fs::File, bootfile::FileMeta)> {
    let bootfile::Lookup::Inside(path) = bootfile::lookup(root, encoded) else {
        return None;
    };
    // As ServeDir: a trailing slash names a directory, and directories are not listed.
    if encoded.ends_with('/') {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    let m = file.metadata().ok()?;
    m.is_file().then(|| {
        let meta = bootfile::FileMeta {
            len: m.len(),
            modified: m.modified().ok(),
        };
        (file, meta)
    })
}

/// Files sent on the blocking pool at once, at most: each send holds a thread of the pool
/// for its whole file, and the store's calls share the pool (512 threads), so a boot storm of
/// large files must never take it all; beyond this, files go out on the runtime.
const BLOCKING_SENDS: usize = 32;
static BLOCKING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BLOCKING_SENDS);

/// `count` bytes of `file` from `offset` to the socket with `sendfile(2)`: on the blocking
/// pool while it has room ([`BLOCKING_SENDS`]), else on the runtime.
async fn send_file(
    stream: &TcpStream,
    file: std::fs::File,
    offset: u64,
    count: u64,
    idle: Duration,
    stats: &HttpStats,
) -> Result<(), SendError> {
    match BLOCKING.try_acquire() {
        Ok(permit) => send_file_blocking(stream, file, offset, count, idle, permit).await,
        Err(_) => {
            stats.boot_sends_on_runtime.fetch_add(1, Ordering::Relaxed);
            send_file_nonblocking(stream, &file, offset, count, idle).await
        }
    }
}

/// [`send_file`] on the runtime: the socket stays non-blocking, so each call moves what fits
/// in its buffer and tokio says when more fits.
async fn send_file_nonblocking(
    stream: &TcpStream,
    file: &std::fs::File,
    offset: u64,
    count: u64,
    idle: Duration,
) -> Result<(), SendError> {
    let mut off = start_offset(offset)?;
    let mut left = count;
    let (sock, fd) = (stream.as_raw_fd(), file.as_raw_fd());
    while left > 0 {
        tokio::time::timeout(idle, stream.writable())
            .await
            .map_err(|_| SendError::Stalled(idle))??;
        let moved = stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendfile_once(sock, fd, &mut off, left)
        });
        match moved {
            Ok(n) => advance(&mut left, n)?,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// [`send_file`] on the blocking pool, with the socket made blocking for the while: one call
/// moves what the non-blocking form moves in a wakeup per socket buffer (an epoll round, a
/// timer and a spurious `EAGAIN` each), which kept a 512 MiB file at 0.89x nginx's rate on
/// one connection. `SO_SNDTIMEO` is the idle deadline: a call that moves nothing for `idle`
/// fails. `permit` is held until the thread is done, even if this future is dropped.
async fn send_file_blocking(
    stream: &TcpStream,
    file: std::fs::File,
    offset: u64,
    count: u64,
    idle: Duration,
    permit: tokio::sync::SemaphorePermit<'static>,
) -> Result<(), SendError> {
    // The thread's own descriptor: if this future is dropped mid-file, the thread never
    // writes to a number that has since been reused.
    let sock = std::os::fd::AsFd::as_fd(stream).try_clone_to_owned()?;
    let sock = socket2::Socket::from(sock);
    sock.set_write_timeout(Some(idle.max(Duration::from_millis(1))))?;
    // O_NONBLOCK belongs to the open file, which tokio's descriptor shares: tokio does
    // nothing with it while this future waits, and gets it back non-blocking.
    sock.set_nonblocking(false)?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let r = blocking_send(&sock, &file, offset, count, idle);
        let back = sock.set_nonblocking(true);
        r.and_then(|()| back.map_err(SendError::from))
    })
    .await
    .map_err(std::io::Error::other)?
}

fn blocking_send(
    sock: &socket2::Socket,
    file: &std::fs::File,
    offset: u64,
    count: u64,
    idle: Duration,
) -> Result<(), SendError> {
    let mut off = start_offset(offset)?;
    let mut left = count;
    let (sock, fd) = (sock.as_raw_fd(), file.as_raw_fd());
    while left > 0 {
        match sendfile_once(sock, fd, &mut off, left) {
            Ok(n) => advance(&mut left, n)?,
            Err(e) => match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                // The send timeout passed with nothing moved.
                std::io::ErrorKind::WouldBlock => return Err(SendError::Stalled(idle)),
                _ => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// A file offset as `sendfile(2)` takes it.
fn start_offset(offset: u64) -> std::io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// One `sendfile(2)` of at most `left` bytes from `file` at `off` (which the kernel
/// advances) to `sock`: the bytes moved, or the call's error.
fn sendfile_once(
    sock: std::os::fd::RawFd,
    file: std::os::fd::RawFd,
    off: &mut libc::off_t,
    left: u64,
) -> std::io::Result<usize> {
    // The kernel moves at most about 2 GiB a call.
    let chunk = left.min(1 << 30) as usize;
    // SAFETY: both descriptors are open for the call (borrowed from live owners by the
    // callers), and `off` is a valid off_t the kernel advances.
    let n = unsafe { libc::sendfile(sock, file, off, chunk) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Counts `moved` bytes off `left`; nothing moved with bytes left is a file that shrank.
fn advance(left: &mut u64, moved: usize) -> Result<(), SendError> {
    if moved == 0 {
        return Err(SendError::Truncated(*left));
    }
    *left = left.saturating_sub(moved as u64);
    Ok(())
}

/// A plain connection handed to hyper with the bytes the boot file responder already read
/// of it: hyper reads those first.
struct Rewind {
    read: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Rewind {
    fn new(read: Vec<u8>, inner: TcpStream) -> Self {
        Self {
            read,
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let rest = this.read.get(this.pos..).unwrap_or_default();
        if !rest.is_empty() {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            if this.pos >= this.read.len() {
                this.read = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_all_and_per_address_and_given_back() {
        let limits = HttpLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..HttpLimits::default()
        };
        let open = Arc::new(Mutex::new(Open::default()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = take_slot(&open, a, &limits).unwrap();
        let _a2 = take_slot(&open, a, &limits).unwrap();
        assert_eq!(take_slot(&open, a, &limits).err(), Some(Full::PerIp));
        let _b1 = take_slot(&open, b, &limits).unwrap();
        assert_eq!(take_slot(&open, b, &limits).err(), Some(Full::Busy));
        drop(a1);
        assert!(take_slot(&open, b, &limits).is_ok());
    }
}
