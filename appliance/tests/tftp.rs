//! The TFTP service in process on 127.0.0.1 (port 0, a temporary root), fetched with real
//! clients: tftp-hpa's `tftp`, `curl tftp://` and `atftp` (windowsize), plus a hand-written
//! UDP client for what the real ones cannot do (stop ACKing, repeat a request, send WRQ,
//! ask from a second loopback address).
//!
//! The clients come from Debian packages (`cargo xtask deps` installs them); a missing one
//! fails the test with the package to install.

// Helpers outside `#[test]` functions panic on setup failures too, on purpose.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stork::tftp::packet::{ErrorCode, Options, OptionsWriter, Repr, Request};
use stork::tftp::{self, Stats, StatsSnapshot, TftpConfig};

/// A TFTP server on its own runtime thread; stopped on drop.
struct Server {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(root: &Path, tweak: impl FnOnce(&mut TftpConfig)) -> Self {
        Self::start_with(root, tweak, None)
    }

    /// As [`Server::start`], with files `generated` makes.
    fn start_with(
        root: &Path,
        tweak: impl FnOnce(&mut TftpConfig),
        generated: Option<Arc<dyn tftp::Generated>>,
    ) -> Self {
        let mut cfg = TftpConfig {
            root: root.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..TftpConfig::default()
        };
        tweak(&mut cfg);
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stats.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sock = tftp::bind(cfg.listen).unwrap();
                tx.send(sock.local_addr().unwrap()).unwrap();
                tokio::select! {
                    r = tftp::run_with(sock, cfg, st, generated) => panic!("TFTP service ended: {r:?}"),
                    _ = stopped => {}
                }
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            addr,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Waits until `n` transfers have completed and none is running.
    fn wait_completed(&self, n: u64) {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if s.transfers_completed >= n && s.active == 0 {
                assert_eq!(s.transfers_completed, n, "{s:?}");
                return;
            }
            // A hang detector, not a speed check: a client that lost a packet under load
            // waits out its own retransmission timeouts (seen once past 20 s).
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{n} transfers did not complete: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Deterministic bytes that differ at every offset, so a misplaced block changes the hash.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Files of every size that matters for blocks of 512 bytes and the negotiated ones.
const SIZES: &[(&str, usize)] = &[
    ("empty.bin", 0),
    ("one-block.bin", 512),
    ("blk1468.bin", 1468),
    ("blk8192.bin", 8192),
    ("many.bin", 3 * 1024 * 1024 + 123),
    // 33 MiB: more than 65535 blocks of 512 bytes, so the block number wraps.
    ("wrap.bin", 33 * 1024 * 1024),
];

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("efi")).unwrap();
        for (i, (name, len)) in SIZES.iter().enumerate() {
            std::fs::write(root.join(name), noise(*len, i as u64 + 7)).unwrap();
        }
        std::fs::write(root.join("efi/snponly.efi"), noise(100_000, 99)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        Self { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name.replace('/', "_"))
    }

    fn assert_same(&self, name: &str, local: &Path, client: &str) {
        let want = std::fs::read(self.root().join(name)).unwrap();
        let got = std::fs::read(local)
            .unwrap_or_else(|e| panic!("{client}: no download of {name} at {local:?}: {e}"));
        assert_eq!(
            (got.len(), sha(&got)),
            (want.len(), sha(&want)),
            "{client}: {name} differs"
        );
    }
}

/// Fails clearly when a client is not installed.
fn need(binary: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()));
    assert!(
        found,
        "`{binary}` not found: install the Debian package {package} (`cargo xtask deps` does)"
    );
}

/// Runs a client with a deadline; kills it when the deadline passes.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, not reaped yet (its waiter is
            // still blocked), so the pid cannot have been reused.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const LIMIT: Duration = Duration::from_secs(180);

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tftp_hpa_fetches_every_size() {
    need("tftp", "tftp-hpa");
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    for (name, _) in SIZES {
        let local = f.out(name);
        // tftp-hpa sends no options: 512-byte blocks, lock-step.
        let out = run(
            Command::new("tftp")
                .args([
                    "-m",
                    "binary",
                    "127.0.0.1",
                    &server.port(),
                    "-c",
                    "get",
                    name,
                ])
                .arg(&local),
            LIMIT,
        );
        ok(&out, &format!("tftp get {name}"));
        f.assert_same(name, &local, "tftp-hpa");
    }
    // The client exits on sending its last ACK; the server counts the transfer on reading it.
    server.wait_completed(SIZES.len() as u64);
    let s = server.stats();
    assert_eq!(s.transfers_failed, 0, "{s:?}");
}

#[test]
fn tftp_hpa_netascii_mode() {
    need("tftp", "tftp-hpa");
    let f = Fixture::new();
    let text = "line one\nline two\r\nbare\rcr\n".repeat(100);
    std::fs::write(f.root().join("notes.txt"), &text).unwrap();
    let server = Server::start(&f.root(), |_| {});
    let local = f.out("notes.txt");
    // netascii is tftp-hpa's default mode; it turns CR LF back into LF and CR NUL into CR.
    let out = run(
        Command::new("tftp")
            .args(["127.0.0.1", &server.port(), "-c", "get", "notes.txt"])
            .arg(&local),
        LIMIT,
    );
    ok(&out, "tftp get (netascii)");
    f.assert_same("notes.txt", &local, "tftp-hpa netascii");
}

#[test]
fn curl_fetches_every_size_with_blksize() {
    need("curl", "curl");
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    // curl asks for tsize, blksize (512 by default) and timeout.
    let mut cases: Vec<(&str, Option<&str>)> = SIZES.iter().map(|(n, _)| (*n, None)).collect();
    cases.extend([
        ("blk1468.bin", Some("1468")),
        ("many.bin", Some("1468")),
        ("blk8192.bin", Some("8192")),
        ("many.bin", Some("8192")),
        ("efi/snponly.efi", Some("1468")),
    ]);
    for (name, blksize) in cases {
        let local = f.out(&format!("{name}.{}", blksize.unwrap_or("512")));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "-o"]).arg(&local);
        if let Some(b) = blksize {
            cmd.args(["--tftp-blksize", b]);
        }
        cmd.arg(format!("tftp://127.0.0.1:{}/{name}", server.port()));
        ok(
            &run(&mut cmd, LIMIT),
            &format!("curl {name} blksize {blksize:?}"),
        );
        f.assert_same(name, &local, "curl");
    }
    server.wait_completed(SIZES.len() as u64 + 5);
    let s = server.stats();
    assert_eq!(s.transfers_failed, 0, "{s:?}");
}

#[test]
fn atftp_fetches_with_windowsize() {
    need("atftp", "atftp");
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    let cases: &[(&str, &[&str])] = &[
        ("empty.bin", &["blksize 1468", "windowsize 16"]),
        ("one-block.bin", &["windowsize 16"]),
        ("blk1468.bin", &["blksize 1468", "windowsize 16"]),
        ("blk8192.bin", &["blksize 8192", "windowsize 4"]),
        ("many.bin", &["blksize 1468", "windowsize 16"]),
        ("many.bin", &["blksize 1468", "windowsize 64"]),
        ("many.bin", &["blksize 65464", "windowsize 4"]),
        // OVMF's own request (docs/measurements.md), tsize included.
        (
            "efi/snponly.efi",
            &["blksize 1468", "windowsize 4", "tsize enable"],
        ),
        // 512-byte blocks with a window: the block number wraps inside windows.
        ("wrap.bin", &["windowsize 16"]),
    ];
    for (i, (name, opts)) in cases.iter().enumerate() {
        let local = f.out(&format!("{name}.{i}"));
        let mut cmd = Command::new("atftp");
        cmd.args(["-g", "-r", name, "-l"]).arg(&local);
        for o in *opts {
            cmd.args(["--option", o]);
        }
        cmd.args(["127.0.0.1", &server.port()]);
        ok(&run(&mut cmd, LIMIT), &format!("atftp {name} {opts:?}"));
        f.assert_same(name, &local, &format!("atftp {opts:?}"));
    }
    server.wait_completed(cases.len() as u64);
    let s = server.stats();
    assert_eq!(s.transfers_failed, 0, "{s:?}");
}

/// A client that ACKs the last block and closes at once, while an earlier ACK of its
/// (here sent on purpose, in atftp's case a hole in a window) makes the server resend into
/// its closed port: the ICMP error the server then reads comes ahead of the final ACK
/// already queued, and the transfer still counts as completed (seen as a rare failure of
/// `atftp_fetches_with_windowsize` with 64 KiB blocks).
#[test]
fn a_final_ack_queued_behind_a_closed_port_completes_the_transfer() {
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    for round in 0..5 {
        let c = RawClient::new(server.addr);
        c.request(
            false,
            b"blk8192.bin",
            &[("blksize", "2048"), ("windowsize", "8")],
        );
        let (oack, tid) = c.recv().expect("OACK");
        assert!(matches!(Repr::parse_bytes(&oack), Ok(Repr::Oack { .. })));
        c.sock
            .send_to(&Repr::Ack { block: 0 }.to_vec().unwrap(), tid)
            .unwrap();
        // 8192 bytes in 2048-byte blocks: four full ones and an empty fifth.
        for block in 1..=5u16 {
            let (pkt, _) = c.recv().expect("DATA");
            let Ok(Repr::Data { block: b, .. }) = Repr::parse_bytes(&pkt) else {
                panic!("not DATA: {:?}", Repr::parse_bytes(&pkt))
            };
            assert_eq!(b, block);
        }
        for block in [2u16, 5] {
            c.sock
                .send_to(&Repr::Ack { block }.to_vec().unwrap(), tid)
                .unwrap();
        }
        drop(c);
        server.wait_completed(round + 1);
    }
    let s = server.stats();
    assert_eq!(s.transfers_failed, 0, "{s:?}");
}

/// A bare UDP client for what real clients will not do.
struct RawClient {
    sock: UdpSocket,
    server: SocketAddr,
}

impl RawClient {
    fn new(server: SocketAddr) -> Self {
        Self::from_ip("127.0.0.1", server)
    }

    /// A client on another address (any of 127.0.0.0/8 works on loopback).
    fn from_ip(ip: &str, server: SocketAddr) -> Self {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self { sock, server }
    }

    /// Fetches `name` lock-step by hand (no options): the file's bytes.
    fn fetch(&self, name: &[u8]) -> Vec<u8> {
        self.request(false, name, &[]);
        let mut got = Vec::new();
        for block in 1u16.. {
            let (pkt, tid) = self.recv().expect("DATA");
            let Repr::Data { block: b, data } = Repr::parse_bytes(&pkt).unwrap() else {
                panic!("not DATA: {:?}", Repr::parse_bytes(&pkt))
            };
            assert_eq!(b, block);
            got.extend_from_slice(data);
            let last = data.len() < 512;
            self.sock
                .send_to(&Repr::Ack { block }.to_vec().unwrap(), tid)
                .unwrap();
            if last {
                break;
            }
        }
        got
    }

    fn request(&self, write: bool, name: &[u8], opts: &[(&str, &str)]) -> Vec<u8> {
        let mut w = OptionsWriter::default();
        for (n, v) in opts {
            w.push(n, v).unwrap();
        }
        let req = Request {
            filename: name,
            mode: b"octet",
            options: if w.is_empty() {
                Options::EMPTY
            } else {
                w.options()
            },
        };
        let repr = if write {
            Repr::Wrq(req)
        } else {
            Repr::Rrq(req)
        };
        let bytes = repr.to_vec().unwrap();
        self.sock.send_to(&bytes, self.server).unwrap();
        bytes
    }

    /// The next datagram and where it came from, or `None` after the read timeout.
    fn recv(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                buf.truncate(n);
                Some((buf, from))
            }
            Err(_) => None,
        }
    }

    fn expect_error(&self, name: &[u8], write: bool) -> ErrorCode {
        self.request(write, name, &[]);
        let (pkt, _) = self
            .recv()
            .unwrap_or_else(|| panic!("no answer to {}", String::from_utf8_lossy(name)));
        match Repr::parse_bytes(&pkt).unwrap() {
            Repr::Error { code, .. } => code,
            other => panic!(
                "{} was not refused: got {other:?}",
                String::from_utf8_lossy(name)
            ),
        }
    }
}

#[test]
fn traversal_is_refused() {
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    let c = RawClient::new(server.addr);
    for (name, code) in [
        (&b"../etc/passwd"[..], ErrorCode::AccessViolation),
        (b"..\\..\\etc\\passwd", ErrorCode::AccessViolation),
        (b"efi/../../etc/passwd", ErrorCode::AccessViolation),
        // Leading slashes are stripped: this names root/etc/passwd, which does not exist.
        (b"/etc/passwd", ErrorCode::FileNotFound),
        (b"escape", ErrorCode::AccessViolation),
        (b"etc-link/passwd", ErrorCode::AccessViolation),
        (b"efi", ErrorCode::FileNotFound),
    ] {
        assert_eq!(
            c.expect_error(name, false),
            code,
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    // Real clients get an error too, and no bytes of the file.
    need("curl", "curl");
    for name in [
        "../etc/passwd",
        "//etc/passwd",
        "escape",
        "..%5C..%5Cetc%5Cpasswd",
    ] {
        let local = f.out(&format!("curl-{name}"));
        let out = run(
            Command::new("curl")
                .args(["-sS", "--path-as-is", "-o"])
                .arg(&local)
                .arg(format!("tftp://127.0.0.1:{}/{name}", server.port())),
            LIMIT,
        );
        assert!(!out.status.success(), "curl fetched {name}");
        let got = std::fs::read(&local).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&got).contains("root:"), "{name}");
    }
    need("tftp", "tftp-hpa");
    let local = f.out("hpa-passwd");
    let out = run(
        Command::new("tftp")
            .args(["-m", "binary", "127.0.0.1", &server.port(), "-c", "get"])
            .arg("../etc/passwd")
            .arg(&local),
        LIMIT,
    );
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Error code 2"), "tftp-hpa said: {said}");
    let got = std::fs::read(&local).unwrap_or_default();
    assert!(got.is_empty(), "tftp-hpa got bytes of ../etc/passwd");
    let s = server.stats();
    assert_eq!(s.transfers_started, 0, "{s:?}");
    assert!(s.refused >= 12, "{s:?}");
}

#[test]
fn write_requests_are_refused() {
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    let c = RawClient::new(server.addr);
    assert_eq!(c.expect_error(b"new.bin", true), ErrorCode::AccessViolation);
    need("tftp", "tftp-hpa");
    let local = f.root().join("one-block.bin");
    let out = run(
        Command::new("tftp")
            .args(["-m", "binary", "127.0.0.1", &server.port(), "-c", "put"])
            .arg(&local)
            .arg("uploaded.bin"),
        LIMIT,
    );
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Error code 2"), "tftp-hpa put said: {said}");
    assert!(!f.root().join("uploaded.bin").exists());
    assert_eq!(server.stats().refused, 2);
}

#[test]
fn silent_client_is_dropped_while_others_finish() {
    need("curl", "curl");
    let f = Fixture::new();
    let server = Server::start(&f.root(), |c| {
        c.timeout = Duration::from_millis(100);
        c.max_timeout = Duration::from_millis(400);
        c.retries = 3;
    });
    // The silent client asks, then never ACKs; its socket stays open so only the timeout
    // can end the transfer.
    let silent = RawClient::new(server.addr);
    silent.request(false, b"many.bin", &[("blksize", "1468")]);
    let started = Instant::now();
    // It records what arrives, and when, on a thread of its own.
    let listener = std::thread::spawn(move || {
        let mut oacks = Vec::new();
        let mut error = None;
        while let Some((pkt, _)) = silent.recv() {
            match Repr::parse_bytes(&pkt).unwrap() {
                Repr::Oack { .. } => oacks.push(started.elapsed()),
                Repr::Error { code, .. } => {
                    error = Some(code);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (oacks, error)
    });
    // Meanwhile a real client fetches a file.
    let local = f.out("concurrent");
    let out = run(
        Command::new("curl")
            .args(["-sS", "--fail", "--tftp-blksize", "1468", "-o"])
            .arg(&local)
            .arg(format!("tftp://127.0.0.1:{}/many.bin", server.port())),
        LIMIT,
    );
    ok(&out, "curl while another client is silent");
    f.assert_same("many.bin", &local, "curl");

    // The silent client sees the OACK sent 1 + 3 times with growing gaps, then an ERROR.
    let (oacks, error) = listener.join().unwrap();
    assert_eq!(oacks.len(), 4, "OACK at {oacks:?}");
    assert_eq!(error, Some(ErrorCode::NotDefined));
    // Backoff: 100, 200, 400 ms between sends (generous bounds for a loaded machine).
    let gaps: Vec<Duration> = oacks.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= Duration::from_millis(70), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(300), "{gaps:?}");
    wait_for(
        "the silent transfer to be dropped",
        Duration::from_secs(10),
        || server.stats().active == 0,
    );
    let s = server.stats();
    assert_eq!(s.transfers_completed, 1, "{s:?}");
    assert_eq!(s.timeouts, 1, "{s:?}");
    assert_eq!(s.transfers_failed, 1, "{s:?}");
    assert!(s.retransmits >= 3, "{s:?}");
}

#[test]
fn repeated_request_starts_one_transfer() {
    let f = Fixture::new();
    let server = Server::start(&f.root(), |_| {});
    let c = RawClient::new(server.addr);
    c.request(false, b"one-block.bin", &[]);
    c.request(false, b"one-block.bin", &[]);
    // Both requests reach the server before the client ACKs anything: a request after the
    // transfer has ended is a new one.
    wait_for("both requests", Duration::from_secs(10), || {
        server.stats().requests == 2
    });
    // Lock-step by hand: DATA 1 (512 bytes), DATA 2 (empty).
    let mut got = Vec::new();
    let mut tid = None;
    for block in 1u16..=2 {
        let (pkt, from) = c.recv().expect("DATA");
        assert_eq!(*tid.get_or_insert(from), from, "one server TID only");
        assert_ne!(
            from.port(),
            server.addr.port(),
            "DATA comes from a new port"
        );
        let Repr::Data { block: b, data } = Repr::parse_bytes(&pkt).unwrap() else {
            panic!("not DATA")
        };
        assert_eq!(b, block);
        got.extend_from_slice(data);
        c.sock
            .send_to(&Repr::Ack { block }.to_vec().unwrap(), from)
            .unwrap();
    }
    assert_eq!(got.len(), 512);
    server.wait_completed(1);
    let s = server.stats();
    assert_eq!((s.transfers_started, s.duplicate_requests), (1, 1), "{s:?}");
    // Nothing else arrives: no second transfer's DATA.
    c.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(c.recv().is_none());

    // A late retransmission, after the client has ACKed (its request timer fired while our
    // answer was queued on a busy machine), is still the same transfer.
    let c = RawClient::new(server.addr);
    c.request(false, b"many.bin", &[]);
    let (pkt, tid) = c.recv().expect("DATA 1");
    assert!(matches!(
        Repr::parse_bytes(&pkt).unwrap(),
        Repr::Data { block: 1, .. }
    ));
    c.sock
        .send_to(&Repr::Ack { block: 1 }.to_vec().unwrap(), tid)
        .unwrap();
    c.recv().expect("DATA 2");
    c.request(false, b"many.bin", &[]);
    wait_for("the late duplicate", Duration::from_secs(10), || {
        server.stats().duplicate_requests == 2
    });
    let s = server.stats();
    assert_eq!(s.transfers_started, 2, "{s:?}");
}

#[test]
fn case_insensitive_fallback_and_garbage() {
    let f = Fixture::new();
    let server = Server::start(&f.root(), |c| c.case_insensitive = true);
    let c = RawClient::new(server.addr);
    c.request(false, b"EFI\\SNPONLY.EFI", &[("tsize", "0")]);
    let (pkt, _) = c.recv().expect("OACK");
    let Repr::Oack { options } = Repr::parse_bytes(&pkt).unwrap() else {
        panic!("not an OACK: {pkt:?}")
    };
    let tsize: Vec<_> = options.iter().collect();
    assert_eq!(tsize, [(&b"tsize"[..], &b"100000"[..])]);
    // Garbage on the listening port is counted, answered only when it claims to be a request.
    c.sock.send_to(b"\x00", server.addr).unwrap();
    c.sock
        .send_to(b"\x00\x01no-terminator", server.addr)
        .unwrap();
    let (pkt, _) = c.recv().expect("an answer to a broken request");
    assert!(matches!(
        Repr::parse_bytes(&pkt).unwrap(),
        Repr::Error {
            code: ErrorCode::IllegalOperation,
            ..
        }
    ));
    wait_for("malformed counter", Duration::from_secs(5), || {
        server.stats().malformed >= 2
    });
}

/// The options of an OACK, as strings.
fn oack_options(pkt: &[u8]) -> Vec<(String, String)> {
    let Repr::Oack { options } = Repr::parse_bytes(pkt).unwrap() else {
        panic!("not an OACK: {:?}", Repr::parse_bytes(pkt))
    };
    options
        .iter()
        .map(|(n, v)| {
            (
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

/// What a silent client sees until the server gives up: when each OACK came, and the
/// ERROR's code and when it came.
fn listen_silently(
    c: &RawClient,
    since: Instant,
) -> (Vec<Duration>, Option<(ErrorCode, Duration)>) {
    let mut oacks = Vec::new();
    while let Some((pkt, _)) = c.recv() {
        match Repr::parse_bytes(&pkt).unwrap() {
            Repr::Oack { .. } => oacks.push(since.elapsed()),
            Repr::Error { code, .. } => return (oacks, Some((code, since.elapsed()))),
            other => panic!("unexpected {other:?}"),
        }
    }
    (oacks, None)
}

#[test]
fn client_timeout_is_capped_and_cannot_stretch_the_retry_budget() {
    let f = Fixture::new();
    let server = Server::start(&f.root(), |c| {
        c.timeout = Duration::from_millis(100);
        c.max_timeout = Duration::from_millis(400);
        c.retries = 3;
    });
    // The server's budget: 100 + 200 + 400 + 400 ms without progress.
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };

    // `timeout 255`: not acknowledged (RFC 2349 allows only the client's value or nothing),
    // the rest is; the server retransmits on its own 100 ms schedule and gives up at its
    // budget, not after 255 s and more.
    let greedy = RawClient::new(server.addr);
    let asked = Instant::now();
    greedy.request(
        false,
        b"many.bin",
        &[("blksize", "1468"), ("timeout", "255")],
    );
    let (first, _) = greedy.recv().expect("OACK");
    let first_at = asked.elapsed();
    assert_eq!(oack_options(&first), pairs(&[("blksize", "1468")]));
    let (oacks, error) = listen_silently(&greedy, asked);
    assert_eq!(oacks.len(), 3, "retransmitted OACKs at {oacks:?}");
    assert!(oacks[0] - first_at < Duration::from_secs(1), "{oacks:?}");
    let (code, at) = error.expect("an ERROR when the budget ran out");
    assert_eq!(code, ErrorCode::NotDefined);
    assert!(at < Duration::from_secs(4), "dropped after {at:?}");

    // `timeout 5` (the cap): acknowledged and used as the interval, yet the transfer still
    // ends at the server's 1.1 s budget, before its first 5 s retransmission.
    let capped = RawClient::new(server.addr);
    let asked = Instant::now();
    capped.request(false, b"many.bin", &[("timeout", "5"), ("tsize", "0")]);
    let (first, _) = capped.recv().expect("OACK");
    let size = (3 * 1024 * 1024 + 123).to_string();
    assert_eq!(
        oack_options(&first),
        pairs(&[("tsize", &size), ("timeout", "5")])
    );
    let (oacks, error) = listen_silently(&capped, asked);
    assert!(oacks.is_empty(), "retransmitted at {oacks:?}");
    let (code, at) = error.expect("an ERROR when the budget ran out");
    assert_eq!(code, ErrorCode::NotDefined);
    assert!(at >= Duration::from_millis(900), "dropped after {at:?}");
    assert!(at < Duration::from_secs(4), "dropped after {at:?}");
    wait_for(
        "both silent transfers to end",
        Duration::from_secs(10),
        || server.stats().active == 0,
    );
    assert_eq!(server.stats().timeouts, 2);

    // A real client asking `timeout 255` is served all the same (curl asks 6, above the
    // cap too, in every curl test here).
    need("atftp", "atftp");
    let local = f.out("atftp-timeout-255");
    let mut cmd = Command::new("atftp");
    cmd.args(["-g", "-r", "many.bin", "-l"]).arg(&local);
    for o in ["timeout 255", "blksize 1468", "tsize enable"] {
        cmd.args(["--option", o]);
    }
    cmd.args(["127.0.0.1", &server.port()]);
    ok(&run(&mut cmd, LIMIT), "atftp with timeout 255");
    f.assert_same("many.bin", &local, "atftp timeout 255");
    server.wait_completed(1);
}

#[test]
fn per_client_cap_refuses_the_excess_and_serves_other_addresses() {
    let f = Fixture::new();
    // The default cap (8) and the default timings: the silent transfers below hold their
    // slots for the whole test (19 s budget), as an attacker's would.
    let server = Server::start(&f.root(), |_| {});
    let cap = TftpConfig::default().max_transfers_per_client;
    assert_eq!(cap, 8);
    let silent: Vec<RawClient> = (0..cap).map(|_| RawClient::new(server.addr)).collect();
    let mut tids = Vec::new();
    for c in &silent {
        c.request(false, b"many.bin", &[]);
        let (pkt, tid) = c.recv().expect("DATA 1");
        assert!(matches!(
            Repr::parse_bytes(&pkt).unwrap(),
            Repr::Data { block: 1, .. }
        ));
        tids.push(tid);
    }
    // One more from the same address, on a new port: an ERROR, no transfer.
    let extra = RawClient::new(server.addr);
    extra.request(false, b"one-block.bin", &[]);
    let (pkt, from) = extra.recv().expect("an answer");
    assert_eq!(from, server.addr, "refused from the listening port");
    match Repr::parse_bytes(&pkt).unwrap() {
        Repr::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotDefined);
            assert_eq!(message, tftp::server::PER_CLIENT_REFUSED.as_bytes());
        }
        other => panic!("not refused: {other:?}"),
    }
    // A real client from there is refused too, with the reason.
    need("curl", "curl");
    let out = run(
        Command::new("curl")
            .args(["-sS", "-o"])
            .arg(f.out("refused"))
            .arg(format!("tftp://127.0.0.1:{}/one-block.bin", server.port())),
        LIMIT,
    );
    assert!(!out.status.success(), "curl was served over the cap");
    let s = server.stats();
    assert_eq!(
        (s.per_client_refused, s.transfers_started, s.active),
        (2, cap as u64, cap as u64),
        "{s:?}"
    );

    // Another address is served meanwhile.
    let other = RawClient::from_ip("127.0.0.2", server.addr);
    let got = other.fetch(b"efi/snponly.efi");
    assert_eq!(sha(&got), sha(&noise(100_000, 99)));

    // A slot given back (the client aborts) is free again for the first address.
    silent[0]
        .sock
        .send_to(
            &Repr::Error {
                code: ErrorCode::NotDefined,
                message: b"bye",
            }
            .to_vec()
            .unwrap(),
            tids[0],
        )
        .unwrap();
    wait_for(
        "the aborted transfer to end",
        Duration::from_secs(10),
        || server.stats().active == cap as u64 - 1,
    );
    let again = RawClient::new(server.addr);
    assert_eq!(again.fetch(b"one-block.bin").len(), 512);
    // The client is done on sending its last ACK; the server counts on reading it.
    wait_for("both fetches counted", Duration::from_secs(10), || {
        server.stats().transfers_completed == 2
    });
    let s = server.stats();
    assert_eq!(s.per_client_refused, 2, "{s:?}");
}

#[test]
fn netascii_streams_files_larger_than_the_old_cap() {
    need("tftp", "tftp-hpa");
    need("curl", "curl");
    let f = Fixture::new();
    // 17 MiB of text (the old in-memory limit was 16 MiB) with LF, CR LF and bare CR.
    let line = "a netascii line of text, then LF\nCR LF\r\nbare CR\rend\n";
    let text = line.repeat((17 << 20) / line.len() + 1);
    std::fs::write(f.root().join("big.txt"), &text).unwrap();
    let server = Server::start(&f.root(), |_| {});
    // tftp-hpa asks netascii by default and decodes it: the same bytes come back.
    let local = f.out("big.txt");
    let out = run(
        Command::new("tftp")
            .args(["127.0.0.1", &server.port(), "-c", "get", "big.txt"])
            .arg(&local),
        LIMIT,
    );
    ok(&out, "tftp get big.txt (netascii)");
    f.assert_same("big.txt", &local, "tftp-hpa netascii");
    // curl asks netascii with -B and keeps the wire form: exactly the encoding, with
    // blksize and tsize (the encoded size, counted before the first block).
    let local = f.out("big.txt.curl");
    let out = run(
        Command::new("curl")
            .args(["-sS", "--fail", "-B", "--tftp-blksize", "1468", "-o"])
            .arg(&local)
            .arg(format!("tftp://127.0.0.1:{}/big.txt", server.port())),
        LIMIT,
    );
    ok(&out, "curl -B big.txt");
    let want = tftp::request::netascii::encode(text.as_bytes());
    let got = std::fs::read(&local).unwrap();
    assert_eq!((got.len(), sha(&got)), (want.len(), sha(&want)));
    server.wait_completed(2);
    let s = server.stats();
    assert_eq!((s.refused, s.transfers_failed), (0, 0), "{s:?}");
}

/// Makes `made/<name>` (saying who asked), refuses `made/secret`, leaves the rest to the root.
struct Maker;

impl tftp::Generated for Maker {
    fn generate(
        &self,
        path: &str,
        peer: std::net::IpAddr,
    ) -> Option<futures_util::future::BoxFuture<'static, Result<Vec<u8>, tftp::request::Refused>>>
    {
        let name = path.strip_prefix("made/")?.to_string();
        Some(Box::pin(async move {
            if name == "secret" {
                return Err(tftp::request::Refused::NotFound);
            }
            Ok(format!("made {name} for {peer}\n").repeat(100).into_bytes())
        }))
    }
}

#[test]
fn generated_files_are_served_beside_the_root() {
    need("curl", "curl");
    let f = Fixture::new();
    let server = Server::start_with(&f.root(), |_| {}, Some(Arc::new(Maker)));
    let get = |name: &str| {
        let local = f.out(&name.replace('/', "-"));
        let out = run(
            Command::new("curl")
                .args(["-sS", "--fail", "--tftp-blksize", "1468", "-o"])
                .arg(&local)
                .arg(format!("tftp://127.0.0.1:{}/{name}", server.port())),
            LIMIT,
        );
        (out, local)
    };
    let (out, local) = get("made/grub.cfg");
    ok(&out, "curl made/grub.cfg");
    let want = "made grub.cfg for 127.0.0.1\n".repeat(100);
    assert_eq!(std::fs::read_to_string(&local).unwrap(), want);
    // What the maker refuses is an error, what it does not claim comes from the root.
    let (out, _) = get("made/secret");
    assert!(!out.status.success(), "made/secret was served");
    let (out, local) = get("efi/snponly.efi");
    ok(&out, "curl efi/snponly.efi");
    f.assert_same("efi/snponly.efi", &local, "curl");
    // curl exits on sending its last ACK; the server counts the transfer on reading it.
    server.wait_completed(2);
    assert_eq!(server.stats().refused, 1);
}
