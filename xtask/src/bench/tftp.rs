//! `cargo xtask bench tftp`: Stork's TFTP against tftpd-hpa and dnsmasq's, same run, same
//! files, same client (atftp, the one that speaks windowsize).
//!
//! Two namespaces joined by a veth with static neighbour entries (docs/measurements.md: otherwise the
//! first replies of a fast run are lost while ARP resolves). Each server has its own
//! address on the server side, port 69. `/dev/cpu_dma_latency` is held at 0 for the run
//! (docs/measurements.md: numbers swing from about 22 to 190 MiB/s without it).
//!
//! 1. Plain veth: one 64 MiB file at blksize 1468 with windowsize 1, 16 and 64 (the peers
//!    ignore windowsize and run lock-step), and 50 clients at once fetching a 2 MiB NBP
//!    with OVMF's options (blksize 1468, windowsize 4, tsize).
//! 2. About 1 ms of round trip: this kernel has no netem, so a userspace forwarder in this
//!    process relays datagrams between client and server, holding each for 0.5 ms each way.
//!
//! Medians of `STORK_BENCH_RUNS` runs (default 3). Numbers are printed, never asserted.

use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use stork_lab::{Spawned, wait_for};

use super::Pair;

const MIB: u64 = 1 << 20;
const BIG: (&str, u64) = ("big.bin", 64 * MIB);
const NBP: (&str, u64) = ("nbp.efi", 2 * MIB);
const LATENCY_FILE: (&str, u64) = ("lat.bin", 8 * MIB);
const PROBE: (&str, u64) = ("probe.bin", 1000);
const STORM_CLIENTS: usize = 50;
const BLKSIZE: &str = "blksize 1468";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const SERVER_MAC: &str = "02:00:00:78:00:01";
const CLIENT_MAC: &str = "02:00:00:78:00:02";
/// Held for each datagram in each direction by the latency forwarder.
const ONE_WAY: Duration = Duration::from_micros(500);

#[derive(Debug, Clone, Copy)]
struct Server {
    name: &'static str,
    ip: Ipv4Addr,
}

const STORK: Server = Server {
    name: "Stork",
    ip: Ipv4Addr::new(10, 78, 0, 11),
};
const HPA: Server = Server {
    name: "tftpd-hpa",
    ip: Ipv4Addr::new(10, 78, 0, 12),
};
const DNSMASQ: Server = Server {
    name: "dnsmasq",
    ip: Ipv4Addr::new(10, 78, 0, 13),
};
const SERVERS: [Server; 3] = [STORK, HPA, DNSMASQ];

pub fn run() -> Result<()> {
    crate::deps::ensure()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the TFTP benchmark needs root (network namespaces, port 69, cpu_dma_latency)");
    }
    let runs: usize = std::env::var("STORK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    crate::step("building tftp_serve (release example: Stork's TFTP module alone)");
    crate::status(crate::cargo().args([
        "build",
        "--quiet",
        "--release",
        "--example",
        "tftp_serve",
        "-p",
        "stork",
    ]))?;
    let bin = crate::target().join("release/examples/tftp_serve");

    let dir = crate::target().join("bench-tftp");
    let root = dir.join("root");
    let logs = dir.join("logs");
    crate::step(&format!("test files in {}", root.display()));
    write_files(&root)?;
    std::fs::create_dir_all(&logs)?;

    let _dma = super::DmaLatency::hold();
    super::remove_stale_namespaces(NS_TAG);
    let net = namespaces()?;
    crate::step(&format!(
        "namespaces {} (servers {}, {}, {}) and {} (client {CLIENT_IP}), one veth",
        net.server, STORK.ip, HPA.ip, DNSMASQ.ip, net.client
    ));

    let server_ns = File::open(Pair::path(&net.server))?;
    let client_ns = File::open(Pair::path(&net.client))?;
    let root_s = root.to_string_lossy().into_owned();
    let mut cmd = in_ns(&server_ns, &bin);
    cmd.args(["--root", &root_s, "--listen"])
        .arg(format!("{}:69", STORK.ip));
    let mut stork_proc = Spawned::start("stork tftp", cmd, &logs.join("stork.log"))?;
    let mut cmd = in_ns(&server_ns, Path::new("/usr/sbin/in.tftpd"));
    cmd.args(["-L", "-a"])
        .arg(format!("{}:69", HPA.ip))
        .args(["-s", &root_s]);
    let _hpa = Spawned::start("tftpd-hpa", cmd, &logs.join("tftpd-hpa.log"))?;
    let mut cmd = in_ns(&server_ns, Path::new("/usr/sbin/dnsmasq"));
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",
        "--enable-tftp",
        "--bind-interfaces",
        "--pid-file",
        // Its default of 50 concurrent transfers would turn clients away.
        "--tftp-max=500",
    ])
    .arg(format!("--tftp-root={root_s}"))
    .arg(format!("--listen-address={}", DNSMASQ.ip))
    .arg(format!(
        "--log-facility={}",
        logs.join("dnsmasq.log").display()
    ));
    let _dnsmasq = Spawned::start("dnsmasq", cmd, &logs.join("dnsmasq.out"))?;
    for s in SERVERS {
        wait_for(
            &format!("{} to answer", s.name),
            Duration::from_secs(15),
            Duration::from_millis(100),
            || Ok(fetch(&client_ns, s.ip, 69, PROBE.0, Path::new("/dev/null"), &[]).ok()),
        )?;
    }

    crate::step("checking every server's downloads byte for byte");
    for s in SERVERS {
        for (file, opts) in [(BIG.0, ["windowsize 16"]), (NBP.0, ["windowsize 4"])] {
            let out = dir.join("check.out");
            let _ = std::fs::remove_file(&out);
            fetch(&client_ns, s.ip, 69, file, &out, &[BLKSIZE, opts[0]])?;
            if std::fs::read(&out)? != std::fs::read(root.join(file))? {
                bail!("{}: {file} downloaded differs from the original", s.name);
            }
            std::fs::remove_file(&out)?;
        }
    }

    // Every case once per round, rounds repeated: a burst of load from elsewhere on the
    // machine then hits all servers alike instead of one server's runs.
    let mut cases = Vec::new();
    for ws in [1u16, 16, 64] {
        for s in SERVERS {
            cases.push(Case::Veth(s, ws));
        }
    }
    for s in SERVERS {
        cases.push(Case::Storm(s));
    }
    for (s, ws) in [
        (HPA, 1u16),
        (DNSMASQ, 1),
        (STORK, 1),
        (STORK, 4),
        (STORK, 16),
        (STORK, 64),
    ] {
        cases.push(Case::Latency(s, ws));
    }
    let load_before = loadavg();
    crate::step(&format!(
        "measuring {} cases x {runs} rounds (load average before: {load_before})",
        cases.len()
    ));
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    let mut rtts = Vec::new();
    for round in 1..=runs {
        for (i, case) in cases.iter().enumerate() {
            let d = match *case {
                Case::Veth(s, ws) => fetch(
                    &client_ns,
                    s.ip,
                    69,
                    BIG.0,
                    Path::new("/dev/null"),
                    &[BLKSIZE, &format!("windowsize {ws}")],
                )?,
                Case::Storm(s) => storm(&client_ns, s.ip)?,
                Case::Latency(s, ws) => {
                    let fwd = Forwarder::start(&client_ns, SocketAddrV4::new(s.ip, 69), ONE_WAY)?;
                    let d = fetch(
                        &client_ns,
                        Ipv4Addr::LOCALHOST,
                        fwd.port,
                        LATENCY_FILE.0,
                        Path::new("/dev/null"),
                        &[BLKSIZE, &format!("windowsize {ws}")],
                    )?;
                    rtts.push(fwd.stop());
                    d
                }
            };
            eprintln!(
                "    round {round}: {:<32} {:8.2} s {:9.1} MiB/s",
                case.label(),
                d.as_secs_f64(),
                case.bytes() as f64 / MIB as f64 / d.as_secs_f64()
            );
            times[i].push(d);
        }
    }
    let load_after = loadavg();
    let rate: Vec<f64> = cases
        .iter()
        .zip(&times)
        .map(|(c, t)| c.bytes() as f64 / MIB as f64 / median(t).as_secs_f64())
        .collect();
    let find = |want: &Case| {
        cases
            .iter()
            .position(|c| c == want)
            .map_or(f64::NAN, |i| rate[i])
    };

    // The counters of Stork's run: retransmissions show whether windows were clean.
    // SAFETY: kill(2) on our own child's pid, not reaped (Spawned waits on drop only).
    unsafe {
        libc::kill(stork_proc.pid() as libc::pid_t, libc::SIGINT);
    }
    let _ = wait_for(
        "Stork's counters",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || Ok(stork_proc.exited()),
    );
    let counters = std::fs::read_to_string(stork_proc.log())
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}")
        .to_string();

    let mut out = vec![
        String::new(),
        format!(
            "TFTP benchmark: atftp client, veth between two namespaces, client and servers on the same 2 cores, cpu_dma_latency 0, median of {runs} interleaved rounds"
        ),
        format!("load average before {load_before}, after {load_after}"),
        format!(
            "(1) {} MiB, blksize 1468  MiB/s     Stork  tftpd-hpa    dnsmasq   Stork/hpa  Stork/dnsmasq",
            BIG.1 / MIB
        ),
    ];
    for ws in [1u16, 16, 64] {
        let r = SERVERS.map(|s| find(&Case::Veth(s, ws)));
        let note = if ws == 1 { "" } else { " (peers lock-step)" };
        out.push(format!(
            "    windowsize {ws:<3}{note:<19} {:8.1} {:10.1} {:10.1} {:10.2}x {:13.2}x",
            r[0],
            r[1],
            r[2],
            r[0] / r[1],
            r[0] / r[2]
        ));
    }
    let storm_total = NBP.1 * STORM_CLIENTS as u64;
    let r = SERVERS.map(|s| find(&Case::Storm(s)));
    let secs = r.map(|x| storm_total as f64 / MIB as f64 / x);
    out.push(format!(
        "    {STORM_CLIENTS} clients x {} MiB, seconds {:9.2}s {:9.2}s {:9.2}s {:10.2}x {:13.2}x   (aggregate {:.0} / {:.0} / {:.0} MiB/s)",
        NBP.1 / MIB,
        secs[0],
        secs[1],
        secs[2],
        r[0] / r[1],
        r[0] / r[2],
        r[0],
        r[1],
        r[2]
    ));
    rtts.sort();
    let rtt_ms = rtts
        .get(rtts.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    out.push(format!(
        "(2) relayed, {rtt_ms:.2} ms round trip, {} MiB, blksize 1468       MiB/s   vs tftpd-hpa",
        LATENCY_FILE.1 / MIB
    ));
    let hpa = find(&Case::Latency(HPA, 1));
    for (c, r) in cases.iter().zip(&rate) {
        if let Case::Latency(s, ws) = c {
            let note = if s.name == STORK.name {
                ""
            } else {
                " (lock-step)"
            };
            out.push(format!(
                "    {:<10} windowsize {ws:<3}{note:<13} {r:12.2} {:10.2}x",
                s.name,
                r / hpa
            ));
        }
    }
    out.push(format!("Stork counters: {counters}"));
    for line in &out {
        println!("{line}");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Case {
    /// 64 MiB over the plain veth with this windowsize.
    Veth(Server, u16),
    /// `STORM_CLIENTS` clients at once.
    Storm(Server),
    /// Through the delaying relay with this windowsize.
    Latency(Server, u16),
}

impl PartialEq for Case {
    fn eq(&self, other: &Self) -> bool {
        self.label() == other.label()
    }
}

impl Case {
    fn label(&self) -> String {
        match self {
            Self::Veth(s, ws) => format!("veth {} windowsize {ws}", s.name),
            Self::Storm(s) => format!("storm {}", s.name),
            Self::Latency(s, ws) => format!("relayed {} windowsize {ws}", s.name),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Self::Veth(..) => BIG.1,
            Self::Storm(_) => NBP.1 * STORM_CLIENTS as u64,
            Self::Latency(..) => LATENCY_FILE.1,
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Deterministic, incompressible-looking content; every file rewritten only when its size
/// is wrong.
fn write_files(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)?;
    // tftpd-hpa and dnsmasq drop privileges: the files must be world-readable.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
    for (i, (name, len)) in [BIG, NBP, LATENCY_FILE, PROBE].into_iter().enumerate() {
        let path = root.join(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == len) {
            continue;
        }
        let mut f = io::BufWriter::new(File::create(&path)?);
        let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ i as u64;
        let mut left = len;
        while left > 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            let n = left.min(8) as usize;
            f.write_all(&b[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// A command run inside the network namespace open at `ns`, dying with this process.
fn in_ns(ns: &File, program: &Path) -> Command {
    let mut c = Command::new(program);
    let fd = ns.as_raw_fd();
    // SAFETY: setns and prctl are plain syscalls, async-signal-safe, touching no memory of
    // the parent; `fd` stays open in the parent until after spawn returns.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// One atftp download; returns its wall-clock time.
fn fetch(
    client_ns: &File,
    server: Ipv4Addr,
    port: u16,
    file: &str,
    local: &Path,
    opts: &[&str],
) -> Result<Duration> {
    let mut cmd = in_ns(client_ns, Path::new("atftp"));
    cmd.args(["-g", "-r", file, "-l"]).arg(local);
    for o in opts {
        cmd.args(["--option", o]);
    }
    cmd.arg(server.to_string()).arg(port.to_string());
    super::timed(&mut cmd, &format!("atftp {file} from {server}:{port}"))
}

/// `STORM_CLIENTS` atftp processes at once, each fetching the NBP with OVMF's options.
fn storm(client_ns: &File, server: Ipv4Addr) -> Result<Duration> {
    let cmds = (0..STORM_CLIENTS).map(|_| {
        let mut cmd = in_ns(client_ns, Path::new("atftp"));
        cmd.args(["-g", "-r", NBP.0, "-l", "/dev/null"]);
        for o in [BLKSIZE, "windowsize 4", "tsize enable"] {
            cmd.args(["--option", o]);
        }
        cmd.args([&server.to_string(), "69"]);
        cmd
    });
    super::timed_together(cmds, &format!("storm clients against {server}"))
}

/// The server and client namespaces, addressed: the three servers' addresses on the
/// server side, the client's on the other, neighbours fixed both ways.
fn namespaces() -> Result<Pair> {
    let net = Pair::create(NS_TAG, SERVER_MAC, CLIENT_MAC)?;
    let (s, c) = (net.server.as_str(), net.client.as_str());
    net.addr(c, &format!("{CLIENT_IP}/24"))?;
    net.neigh(s, &CLIENT_IP.to_string(), CLIENT_MAC)?;
    for srv in SERVERS {
        let a = srv.ip.to_string();
        net.addr(s, &format!("{a}/24"))?;
        net.neigh(c, &a, SERVER_MAC)?;
    }
    Ok(net)
}

const NS_TAG: &str = "bench_tftp";

/// A UDP relay in the client namespace on 127.0.0.1: datagrams from the client go to the
/// server (port 69 for requests, then the transfer's port), replies come back, each held
/// for `delay`. The client sees every reply from the relay's port, which TFTP clients accept
/// (they lock onto the port of the first reply).
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Request-to-reply times seen by the relay, for the report.
    rtts: Arc<Mutex<Vec<Duration>>>,
}

type Queue = (Instant, Vec<u8>);

impl Forwarder {
    fn start(client_ns: &File, server: SocketAddrV4, delay: Duration) -> Result<Self> {
        // Sockets belong to the namespace of the thread that creates them.
        let fd = client_ns.as_raw_fd();
        let (front, back) = std::thread::scope(|s| {
            s.spawn(|| -> Result<(UdpSocket, UdpSocket)> {
                // SAFETY: setns on this short-lived thread only, with an fd we hold open.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error().into());
                }
                Ok((
                    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
                    UdpSocket::bind((CLIENT_IP, 0))?,
                ))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("forwarder setup thread panicked"))?
        })?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            force_rcvbuf(s, 4 << 20);
        }
        let port = front.local_addr()?.port();
        let front = Arc::new(front);
        let back = Arc::new(back);
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let server_tid = Arc::new(Mutex::new(SocketAddr::V4(server)));
        let rtts: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let last_up: Arc<Mutex<Option<Instant>>> = Arc::default();
        let (up_tx, up_rx) = mpsc::channel::<Queue>();
        let (down_tx, down_rx) = mpsc::channel::<Queue>();
        let mut threads = Vec::new();
        // client -> relay
        {
            let (front, stop, client, last_up) =
                (front.clone(), stop.clone(), client.clone(), last_up.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    let now = Instant::now();
                    *lock(&client) = Some(from);
                    *lock(&last_up) = Some(now);
                    if up_tx.send((now + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }));
        }
        // relay -> server, after the delay
        {
            let (back, stop, server_tid) = (back.clone(), stop.clone(), server_tid.clone());
            threads.push(std::thread::spawn(move || {
                precise_sleeps();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((due, pkt)) = up_rx.recv_timeout(Duration::from_millis(50)) else {
                        continue;
                    };
                    sleep_until(due);
                    // A request (opcode 1) goes to port 69; the rest to the transfer's port.
                    let to = if pkt.get(..2) == Some(&[0, 1]) {
                        SocketAddr::V4(server)
                    } else {
                        *lock(&server_tid)
                    };
                    let _ = back.send_to(&pkt, to);
                }
            }));
        }
        // server -> relay
        {
            let (back, stop, server_tid, rtts, last_up) = (
                back.clone(),
                stop.clone(),
                server_tid.clone(),
                rtts.clone(),
                last_up.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = back.recv_from(&mut buf) else {
                        continue;
                    };
                    let now = Instant::now();
                    *lock(&server_tid) = from;
                    if let Some(t) = lock(&last_up).take() {
                        lock(&rtts).push(now - t + delay);
                    }
                    if down_tx.send((now + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }));
        }
        // relay -> client, after the delay
        {
            let (front, stop, client) = (front.clone(), stop.clone(), client.clone());
            threads.push(std::thread::spawn(move || {
                precise_sleeps();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((due, pkt)) = down_rx.recv_timeout(Duration::from_millis(50)) else {
                        continue;
                    };
                    sleep_until(due);
                    if let Some(c) = *lock(&client) {
                        let _ = front.send_to(&pkt, c);
                    }
                }
            }));
        }
        Ok(Self {
            port,
            stop,
            threads,
            rtts,
        })
    }

    /// Stops the relay; returns the median round trip it saw (client packet to the first
    /// server reply, both delays included).
    fn stop(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut v = lock(&self.rtts).clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Timer slack of 1 ns for this thread: the default 50 us would blur a 500 us delay.
fn precise_sleeps() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

fn sleep_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// SO_RCVBUFFORCE (root) so a window of 64 blocks never overflows the relay's queue.
fn force_rcvbuf(s: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt with a valid fd, a valid option and a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
