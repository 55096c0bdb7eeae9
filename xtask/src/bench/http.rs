//! `cargo xtask bench http`: boot files over plain HTTP, Stork against nginx, same file,
//! same namespaces, same client (curl), same run.
//!
//! A release `stork serve` (plain HTTP, DHCP and TFTP off) and nginx (`sendfile on`,
//! `tcp_nopush on`, its own configuration and logs in the bench directory) each listen on an
//! address of their own in the server namespace; both serve one 512 MiB file of
//! pseudo-random bytes from the same directory, at the same URL path (`/boot/big.bin`).
//! The client namespace, joined by a veth with static neighbour entries, runs curl to
//! `/dev/null`:
//! - one connection: one download, median of `STORK_BENCH_RUNS` (default 3);
//! - 32 connections: 32 curl processes at once, each downloading the file once; aggregate
//!   MiB/s from the first start to the last finish, median of the same number of rounds.
//!
//! Rounds interleave the servers so a burst of load elsewhere hits both alike;
//! `/dev/cpu_dma_latency` is held at 0. Numbers are printed, never asserted.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use stork_lab::{Spawned, wait_for};

use super::Pair;

const MIB: u64 = 1 << 20;
const FILE: &str = "big.bin";
const SIZE: u64 = 512 * MIB;
const PARALLEL: usize = 32;
const SERVER_MAC: &str = "02:00:00:79:00:01";
const CLIENT_MAC: &str = "02:00:00:79:00:02";
const CLIENT_IP: &str = "10.79.0.2";
const NS_TAG: &str = "bench_http";

#[derive(Debug, Clone, Copy)]
struct Server {
    name: &'static str,
    ip: &'static str,
    port: u16,
}

const STORK: Server = Server {
    name: "Stork",
    ip: "10.79.0.11",
    port: 8080,
};
const NGINX: Server = Server {
    name: "nginx",
    ip: "10.79.0.12",
    port: 80,
};
const SERVERS: [Server; 2] = [STORK, NGINX];

impl Server {
    fn url(&self) -> String {
        format!("http://{}:{}/boot/{FILE}", self.ip, self.port)
    }
}

pub fn run() -> Result<()> {
    crate::deps::ensure()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the HTTP benchmark needs root (network namespaces, cpu_dma_latency)");
    }
    let runs = super::api::knob("STORK_BENCH_RUNS", 3);
    crate::step("building stork (release)");
    crate::status(crate::cargo().args(["build", "--quiet", "--release", "-p", "stork"]))?;
    let stork = crate::target().join("release/stork");

    let dir = crate::target().join("bench-http");
    let data = dir.join("data");
    let logs = dir.join("logs");
    let boot = data.join("boot");
    std::fs::create_dir_all(&boot)?;
    std::fs::create_dir_all(&logs)?;
    // The store starts empty each run; the file stays (writing 512 MiB takes a while).
    let _ = std::fs::remove_file(data.join("stork.db"));
    crate::step(&format!(
        "{} MiB test file in {}",
        SIZE / MIB,
        boot.display()
    ));
    write_file(&boot.join(FILE), SIZE)?;

    let _dma = super::DmaLatency::hold();
    super::remove_stale_namespaces(NS_TAG);
    let net = namespaces()?;
    crate::step(&format!(
        "namespaces {} (Stork {}, nginx {}) and {} (client {CLIENT_IP}), one veth",
        net.server, STORK.ip, NGINX.ip, net.client
    ));

    let config = dir.join("stork.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[http]\nlisten = \"{}\"\nport = {}\nmax_connections_per_ip = 1024\n[tls]\nenabled = false\n[dhcp]\nmode = \"off\"\n\n[tftp]\nenabled = false\n",
            STORK.ip, STORK.port
        ),
    )?;
    let mut cmd = net.server(
        Command::new(&stork)
            .arg("serve")
            .arg("--config")
            .arg(&config),
    );
    cmd.env("RUST_LOG", "warn");
    let mut stork_proc = Spawned::start("stork serve", cmd, &logs.join("stork.log"))?;

    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        super::nginx_config(&dir, &data, &logs, &format!("{}:{}", NGINX.ip, NGINX.port)),
    )?;
    let cmd = net.server(Command::new("nginx").arg("-c").arg(&nginx_conf));
    let mut nginx_proc = Spawned::start("nginx", cmd, &logs.join("nginx.out"))?;

    for s in SERVERS {
        wait_for(
            &format!("{} to serve the file", s.name),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                for p in [&mut stork_proc, &mut nginx_proc] {
                    if let Some(st) = p.exited() {
                        bail!("a server exited ({st}):\n{}", p.log_tail(20));
                    }
                }
                let out = net
                    .client(
                        Command::new("curl")
                            .args(["-sI", "-o", "/dev/null", "-w", "%{http_code}"])
                            .arg(s.url()),
                    )
                    .output()?;
                Ok((out.stdout == b"200").then_some(()))
            },
        )?;
    }

    crate::step("checking both servers' downloads byte for byte");
    for s in SERVERS {
        let out = dir.join("check.out");
        let _ = std::fs::remove_file(&out);
        fetch(&net, s, &out)?;
        if !same_file(&out, &boot.join(FILE))? {
            bail!("{}: the downloaded file differs from the original", s.name);
        }
        std::fs::remove_file(&out)?;
    }

    let load_before = loadavg();
    crate::step(&format!(
        "measuring one connection and {PARALLEL} at once, {runs} rounds (load average before: {load_before})"
    ));
    let mut single: [Vec<f64>; 2] = Default::default();
    let mut parallel: [Vec<f64>; 2] = Default::default();
    for round in 1..=runs {
        for (i, s) in SERVERS.iter().enumerate() {
            let d = fetch(&net, *s, Path::new("/dev/null"))?;
            let rate = SIZE as f64 / MIB as f64 / d.as_secs_f64();
            eprintln!(
                "    round {round}: {:<6} 1 connection   {rate:9.0} MiB/s",
                s.name
            );
            single[i].push(rate);
        }
        for (i, s) in SERVERS.iter().enumerate() {
            let d = storm(&net, *s)?;
            let rate = (SIZE * PARALLEL as u64) as f64 / MIB as f64 / d.as_secs_f64();
            eprintln!(
                "    round {round}: {:<6} {PARALLEL} connections {rate:9.0} MiB/s",
                s.name
            );
            parallel[i].push(rate);
        }
    }
    let load_after = loadavg();
    for p in [&mut stork_proc, &mut nginx_proc] {
        if let Some(st) = p.exited() {
            bail!("a server exited during the run ({st})");
        }
    }

    let nginx_version = Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    let (s1, n1) = (median(&single[0]), median(&single[1]));
    let (sp, np) = (median(&parallel[0]), median(&parallel[1]));
    let out = [
        String::new(),
        format!(
            "HTTP boot file benchmark: {} MiB file, curl to /dev/null, veth between two namespaces, client and servers on the same cores, cpu_dma_latency 0, median of {runs} interleaved rounds ({nginx_version})",
            SIZE / MIB
        ),
        format!("load average before {load_before}, after {load_after}"),
        "                      MiB/s     Stork     nginx   Stork/nginx".to_string(),
        format!(
            "    1 connection             {s1:9.0} {n1:9.0} {:12.2}x",
            s1 / n1
        ),
        format!(
            "    {PARALLEL} connections (sum)     {sp:9.0} {np:9.0} {:12.2}x",
            sp / np
        ),
    ];
    for line in &out {
        println!("{line}");
    }
    drop(stork_proc);
    drop(nginx_proc);
    Ok(())
}

/// One curl download of the file to `local`; its wall-clock time.
fn fetch(net: &Pair, s: Server, local: &Path) -> Result<Duration> {
    let mut cmd = net.client(
        Command::new("curl")
            .args(["-sS", "--fail", "-o"])
            .arg(local)
            .arg(s.url()),
    );
    super::timed(&mut cmd, &format!("curl {}", s.url()))
}

/// `PARALLEL` curl processes at once, each downloading the file once; the time from the
/// first start to the last finish.
fn storm(net: &Pair, s: Server) -> Result<Duration> {
    let cmds = (0..PARALLEL).map(|_| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "-o", "/dev/null"]).arg(s.url());
        net.client(&cmd)
    });
    super::timed_together(cmds, &format!("downloads from {}", s.name))
}

/// The server and client namespaces, addressed, with fixed neighbours both ways.
fn namespaces() -> Result<Pair> {
    let net = Pair::create(NS_TAG, SERVER_MAC, CLIENT_MAC)?;
    let (s, c) = (net.server.as_str(), net.client.as_str());
    net.addr(c, &format!("{CLIENT_IP}/24"))?;
    net.neigh(s, CLIENT_IP, CLIENT_MAC)?;
    for srv in SERVERS {
        net.addr(s, &format!("{}/24", srv.ip))?;
        net.neigh(c, srv.ip, SERVER_MAC)?;
    }
    Ok(net)
}

/// Pseudo-random (incompressible) bytes, rewritten only when the size is wrong; readable
/// by everyone.
fn write_file(path: &Path, len: u64) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == len) {
        return Ok(());
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut left = len;
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = left.min(8) as usize;
        f.write_all(&x.to_le_bytes()[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Whether two files hold the same bytes (compared in 1 MiB pieces, not both in memory).
fn same_file(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut a, mut b) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            return Ok(true);
        }
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
