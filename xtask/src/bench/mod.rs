//! `cargo xtask bench <what>`: benchmarks against peer implementations, in namespaces of
//! their own. They print numbers; they never assert on time.

mod api;
mod deploy;
mod dhcp;
mod fleet;
mod http;
mod images;
mod tftp;
mod ui;

use std::path::Path;

use anyhow::{Result, bail};

pub fn run(what: &str) -> Result<()> {
    match what {
        "api" => api::run(),
        "tftp" => tftp::run(),
        "dhcp" => dhcp::run(dhcp::Family::V4),
        "dhcp6" => dhcp::run(dhcp::Family::V6),
        "fleet" => fleet::run(),
        "images" => images::run(),
        "deploy" => deploy::run(),
        "deploy-layout" => deploy::run_layout(),
        "ui" => ui::run(),
        "http" => http::run(),
        other => {
            bail!(
                "unknown benchmark `{other}` (known: api, tftp, dhcp, dhcp6, fleet, images, deploy, deploy-layout, ui, http)"
            )
        }
    }
}

/// Whether `name` is in the comma-separated list in `var` (absent or empty: everything): a
/// bench's `STORK_BENCH_*` filters.
pub fn chosen(var: &str, name: &str) -> bool {
    let list = std::env::var(var).unwrap_or_default();
    list.trim().is_empty() || list.split(',').any(|p| p.trim() == name)
}

/// Builds the appliance and the sim's binaries (`stork-sim`, `stork-dhcp-load`) in release;
/// returns the directory they are in.
pub fn build_stork_and_sim() -> Result<std::path::PathBuf> {
    crate::step("building stork and stork-sim's binaries (release)");
    crate::status(crate::cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "stork",
        "-p",
        "stork-sim",
    ]))?;
    Ok(crate::target().join("release"))
}

/// Two namespaces, server and client, joined by one veth (`eth0` on both sides, with the
/// given MACs, up, loopback up); removed on drop with every process inside. Named
/// `stork-<tag>-<pid>[-client]` so the lab's stale-namespace sweep removes them if the
/// bench dies first.
pub struct Pair {
    pub server: String,
    pub client: String,
}

fn ip(args: &[&str]) -> Result<()> {
    stork_lab::run(std::process::Command::new("ip").args(args)).map(|_| ())
}

impl Pair {
    pub fn create(tag: &str, server_mac: &str, client_mac: &str) -> Result<Self> {
        let pid = std::process::id();
        let pair = Self {
            server: format!("stork-{tag}-{pid}"),
            client: format!("stork-{tag}-{pid}-client"),
        };
        let (s, c) = (pair.server.as_str(), pair.client.as_str());
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", c])?;
        ip(&[
            "-n", s, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", c,
        ])?;
        for (ns, mac) in [(s, server_mac), (c, client_mac)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "address", mac])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(pair)
    }

    /// Adds `cidr` to `ns`'s `eth0`.
    pub fn addr(&self, ns: &str, cidr: &str) -> Result<()> {
        ip(&["-n", ns, "addr", "add", cidr, "dev", "eth0"])
    }

    /// A permanent neighbour entry: no ARP inside a measurement.
    pub fn neigh(&self, ns: &str, peer_ip: &str, peer_mac: &str) -> Result<()> {
        ip(&[
            "-n",
            ns,
            "neigh",
            "replace",
            peer_ip,
            "lladdr",
            peer_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
    }

    /// `cmd` run inside `ns`.
    pub fn wrap(ns: &str, cmd: &std::process::Command) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    }

    /// `cmd` run in the server namespace.
    pub fn server(&self, cmd: &std::process::Command) -> std::process::Command {
        Self::wrap(&self.server, cmd)
    }

    /// `cmd` run in the client namespace.
    pub fn client(&self, cmd: &std::process::Command) -> std::process::Command {
        Self::wrap(&self.client, cmd)
    }

    pub fn path(ns: &str) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/netns").join(ns)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            kill_namespace(ns);
        }
    }
}

/// Kills every process in `ns` (until none is left) and deletes it.
fn kill_namespace(ns: &str) {
    for _ in 0..50 {
        let pids = stork_lab::run(std::process::Command::new("ip").args(["netns", "pids", ns]))
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill with a pid the kernel listed in our own namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Namespaces `stork-<tag>-<pid>[...]` of an earlier bench whose process is gone.
pub fn remove_stale_namespaces(tag: &str) {
    let Ok(list) = stork_lab::run(std::process::Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    let prefix = format!("stork-{tag}-");
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace(name);
        }
    }
}

/// Holds `/dev/cpu_dma_latency` at 0 while alive: the kernel keeps CPUs out of deep idle
/// states only as long as the file stays open (docs/measurements.md: without it numbers swing).
pub struct DmaLatency {
    _held: Option<std::fs::File>,
}

impl DmaLatency {
    pub fn hold() -> Self {
        use std::io::Write;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
        match f {
            Ok(f) => Self { _held: Some(f) },
            Err(e) => {
                eprintln!(
                    "warning: cannot hold /dev/cpu_dma_latency at 0 ({e}): numbers will swing"
                );
                Self { _held: None }
            }
        }
    }
}

/// Runs `cmd` (stdin and stdout to null, stderr kept) and times it; fails with `what` and
/// its stderr when it fails.
pub fn timed(cmd: &mut std::process::Command, what: &str) -> Result<std::time::Duration> {
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = std::time::Instant::now();
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {what}: {e}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Starts every command at once (no output) and waits for all: the time from the first
/// start to the last finish; fails with `what` when any of them failed.
pub fn timed_together(
    cmds: impl IntoIterator<Item = std::process::Command>,
    what: &str,
) -> Result<std::time::Duration> {
    use std::process::Stdio;
    let start = std::time::Instant::now();
    let mut children = Vec::new();
    for mut cmd in cmds {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        children.push(
            cmd.spawn()
                .map_err(|e| anyhow::anyhow!("cannot start {what}: {e}"))?,
        );
    }
    let total = children.len();
    let mut failed = 0;
    for mut c in children {
        if !c.wait()?.success() {
            failed += 1;
        }
    }
    let took = start.elapsed();
    if failed > 0 {
        bail!("{failed} of {total} {what} failed");
    }
    Ok(took)
}

/// nginx as a peer should run: sendfile with TCP_NOPUSH (TCP_CORK), a worker per core, no
/// access log, everything it writes under `dir` (its temporary directories made here),
/// serving `root` on `listen` (`ip:port`).
pub fn nginx_config(dir: &Path, root: &Path, logs: &Path, listen: &str) -> String {
    let tmp = dir.join("nginx-tmp");
    for d in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = std::fs::create_dir_all(tmp.join(d));
    }
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
user root;
pid {dir}/nginx.pid;
error_log {logs}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen {listen};
        root {root};
    }}
}}
"#,
        dir = dir.display(),
        logs = logs.display(),
        tmp = tmp.display(),
        root = root.display(),
    )
}
