//! `cargo xtask bench fleet`: a simulated fleet (`stork-sim`, release) against one
//! appliance (release), in one run:
//!
//! 1. **Boot storm, Stork**: N machines powered on at once, each through DHCP, its NBP
//!    (TFTP, or HTTP for UEFI HTTP boot), iPXE's DHCP, the boot script, kernel, initrd and
//!    ephemeral root, all from `stork serve`.
//! 2. **Lifecycle, Stork**: N machines added with BMCs (half IPMI, half Redfish), commissioned, deployed (a
//!    64 MiB image, downloaded and checked by every machine) and released, Stork powering
//!    every one through its BMC.
//! 3. **Boot storm, the peer path**: the same storm as 1 through dnsmasq (DHCP and TFTP)
//!    and nginx (the script, a static file, and the same boot files).
//!
//! It prints each leg's figures, the storm's ratio Stork/peer, deploys per minute beside
//! Carbide's published 240, and the image bytes' rate against the segment's. It asserts
//! nothing on time. `STORK_FLEET_MACHINES` sets N (default 1,000), `STORK_FLEET_SHARDS` the
//! sim's threads (a tap each; default 2).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use stork_lab::process::Spawned;
use stork_lab::{Appliance, Lab};

/// Deploys per minute Carbide publishes for its simulator (machine-a-tron: 3,000 hosts
/// ingested in about 25 minutes is 120/min; its scale tests state 240/min).
const CARBIDE_PER_MINUTE: f64 = 240.0;
const IMAGE_MIB: usize = 64;

/// A /16 for the fleet: the lab's bridge gets it instead of its /24.
const FLEET_TOML: &str = "\
[dhcp]
prefix_len = 16
range = [\"10.77.16.0\", \"10.77.31.255\"]
rate_limit_global = 0
[http]
max_connections = 8192
max_connections_per_ip = 64
[lifecycle]
power_poll = 0
";

pub fn run() -> Result<()> {
    let n: usize = std::env::var("STORK_FLEET_MACHINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // The sim's threads (a tap each): one per core by default.
    let shards: usize = std::env::var("STORK_FLEET_SHARDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    crate::deps::ensure()?;
    let boot = crate::images()?;
    let release = super::build_stork_and_sim()?;
    let stork = release.join("stork");
    let sim = release.join("stork-sim");
    let base = crate::target().join("lab");

    let _neighbours = NeighbourTable::raise(n)?;
    crate::step(&format!("1/3 boot storm of {n} machines through Stork"));
    let mut lab = Lab::new("bench-fleet", &base)?;
    lab.keep_dir();
    prepare(&lab)?;
    let config = lab.dir().join("stork.toml");
    std::fs::write(&config, FLEET_TOML)?;
    let appliance = Appliance::start_with(&lab, &stork, &boot, &["--config", &path(&config)])?;
    let taps = add_taps(&mut lab, shards)?;
    let stork_storm = sim_run(
        &lab,
        (&sim, &taps),
        n,
        1,
        &["--storm"],
        Some(&appliance),
        "storm-stork",
    )?;

    crate::step("2/3 lifecycle through Stork: IPMI and Redfish power, commission, deploy, release");
    stork_lab::images::register_random_image(&appliance, "bench-image", IMAGE_MIB << 20)?;
    let life = sim_run(
        &lab,
        (&sim, &taps),
        n,
        2,
        &["--image", "bench-image", "--release", "--boot-share", "1"],
        Some(&appliance),
        "lifecycle",
    )?;
    let stork_log = appliance.log_tail(5);
    drop(appliance);
    drop(lab);

    crate::step(&format!(
        "3/3 boot storm of {n} machines through dnsmasq and nginx"
    ));
    let mut peer_lab = Lab::new("bench-fleet-peer", &base)?;
    prepare(&peer_lab)?;
    let peers = start_peers(&peer_lab, &boot)?;
    let taps = add_taps(&mut peer_lab, shards)?;
    let peer_storm = sim_run(
        &peer_lab,
        (&sim, &taps),
        n,
        1,
        &["--storm"],
        None,
        "storm-peer",
    )?;
    drop(peers);

    print_results(n, shards, &stork_storm, &peer_storm, &life);
    eprintln!("(stork log tail)\n{stork_log}");
    Ok(())
}

/// The kernel's IPv4 neighbour table, shared by every network namespace, holds 1,024
/// entries by default: fewer than a fleet this size and its BMCs, and beyond that the
/// appliance's (and the peers') answers to some machines never leave. `stork serve` raises
/// it for its DHCP pools where it can write the setting; in the lab's namespace it cannot,
/// so the bench raises it the same way (2 x the neighbours soft, 4 x hard) for the run and
/// puts it back after.
struct NeighbourTable {
    was: Vec<(&'static str, String)>,
}

const NEIGH: &str = "/proc/sys/net/ipv4/neigh/default";

impl NeighbourTable {
    fn raise(machines: usize) -> Result<Self> {
        let neighbours = 2 * machines as u64;
        let mut was = Vec::new();
        // The hard limit first: the soft one stays below it.
        for (name, want) in [
            ("gc_thresh3", 4 * neighbours),
            ("gc_thresh2", 2 * neighbours),
        ] {
            let path = Path::new(NEIGH).join(name);
            let now = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if now.trim().parse::<u64>().unwrap_or(0) < want {
                std::fs::write(&path, want.to_string())
                    .with_context(|| format!("raising {}", path.display()))?;
                was.push((name, now.trim().to_string()));
            }
        }
        if !was.is_empty() {
            crate::step(&format!(
                "neighbour table raised for {neighbours} neighbours (was {was:?}, put back after)"
            ));
        }
        Ok(Self { was })
    }
}

impl Drop for NeighbourTable {
    fn drop(&mut self) {
        // The soft limit first, back below the hard one.
        for (name, value) in self.was.iter().rev() {
            let _ = std::fs::write(Path::new(NEIGH).join(name), value);
        }
    }
}

fn add_taps(lab: &mut Lab, n: usize) -> Result<Vec<String>> {
    (0..n).map(|_| lab.add_tap()).collect()
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The lab's bridge as a /16: room for thousands of machines and their BMCs. And the
/// servers' TCP (Stork's and the peers' alike, in the lab's namespace) hands the taps
/// segments of at least 44 MSS: with a thousand flows at once the kernel sizes each flow's
/// segments to a millisecond of its pacing rate, two MSS, and the simulator then pays per
/// 3 KB frame what a real NIC's receive offload would coalesce (a 1,000-machine storm
/// without this floor: 12.7 million frames, 188.8 s; with it: 6.6 million, 157.3 s).
fn prepare(lab: &Lab) -> Result<()> {
    let ns = lab.netns();
    // Written through /proc, which shows the namespace's own setting (no procps needed).
    stork_lab::run(
        lab.command("sh")
            .args(["-c", "echo 44 > /proc/sys/net/ipv4/tcp_min_tso_segs"]),
    )?;
    for args in [
        vec!["-n", ns, "addr", "flush", "dev", stork_lab::BRIDGE],
        vec![
            "-n",
            ns,
            "addr",
            "add",
            "10.77.0.1/16",
            "dev",
            stork_lab::BRIDGE,
        ],
    ] {
        stork_lab::run(Command::new("ip").args(&args))?;
    }
    Ok(())
}

/// Runs `stork-sim` on `tap` with `n` machines (MACs tagged `tag`), against `appliance`
/// when there is one (its token, its process sampled); returns its report.
fn sim_run(
    lab: &Lab,
    (sim, taps): (&Path, &[String]),
    n: usize,
    tag: u8,
    extra: &[&str],
    appliance: Option<&Appliance>,
    name: &str,
) -> Result<Value> {
    let report = lab.dir().join(format!("{name}.json"));
    let mut cmd = lab.command(sim);
    for tap in taps {
        cmd.args(["--tap", tap]);
    }
    cmd.args(["--machines", &n.to_string()])
        .args(["--mac-tag", &tag.to_string(), "--bmc-base", "10.77.64.0"])
        .args(["--prefix", "16", "--phase-timeout", "3600"])
        .args(extra)
        .arg("--report")
        .arg(&report)
        .env("RUST_LOG", "info");
    if let Some(a) = appliance {
        cmd.env("STORK_TOKEN", &a.token);
        if let Some(pid) = a.pid() {
            cmd.args(["--watch-pid", &pid.to_string()]);
        }
    }
    sim_exec(cmd, &report, name)
}

fn sim_exec(mut cmd: Command, report: &Path, name: &str) -> Result<Value> {
    let status = cmd
        .status()
        .with_context(|| format!("running stork-sim ({name})"))?;
    if !status.success() {
        bail!("stork-sim ({name}) failed: {status}");
    }
    let text = std::fs::read(report).with_context(|| format!("reading {}", report.display()))?;
    let mut kept = crate::target().join("stork/bench");
    std::fs::create_dir_all(&kept)?;
    kept.push(format!("fleet-{name}.json"));
    std::fs::write(&kept, &text)?;
    let _ = std::fs::copy(report.with_extension("svg"), kept.with_extension("svg"));
    Ok(serde_json::from_slice(&text)?)
}

/// dnsmasq (DHCP and TFTP, PXE and iPXE answered as Stork answers them) and nginx (the
/// script and the boot files) on the peer lab's bridge.
fn start_peers(lab: &Lab, boot: &Path) -> Result<Vec<Spawned>> {
    let dir = lab.dir().join("peer");
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    for e in std::fs::read_dir(boot)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), root.join(e.file_name()))?;
        }
    }
    // The script Stork gives a machine it does not know, with the same files.
    std::fs::write(
        root.join("script.ipxe"),
        "#!ipxe\n\
         kernel http://10.77.0.1:8080/vmlinuz initrd=initrd.img console=ttyS0 stork.url=http://10.77.0.1:8080 BOOTIF=01-${net0/mac:hexhyp} stork.ip=${netX/ip}/${netX/netmask} stork.ephemeral=http://10.77.0.1:8080/ephemeral.squashfs\n\
         initrd http://10.77.0.1:8080/initrd.img\n\
         boot\n",
    )?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        super::nginx_config(&dir, &root, &dir, "10.77.0.1:8080"),
    )?;
    let mut nginx = lab.command("nginx");
    nginx.arg("-c").arg(&conf);
    let nginx = Spawned::start("nginx", nginx, &dir.join("nginx.out"))?;
    let mut dnsmasq = lab.command("/usr/sbin/dnsmasq");
    dnsmasq
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            // Its ping before each offer (about 3 s with nobody answering) is on by default;
            // off here, as a farm of PXE clients would run it: the peer at its fastest.
            "--no-ping",
            "--bind-interfaces",
            "--interface=stork0",
            "--dhcp-range=10.77.16.0,10.77.31.255,255.255.0.0,1h",
            "--dhcp-lease-max=20000",
            "--dhcp-match=set:ipxe,175",
            "--dhcp-vendorclass=set:bios,PXEClient:Arch:00000",
            "--dhcp-vendorclass=set:efi,PXEClient:Arch:00007",
            "--dhcp-vendorclass=set:http,HTTPClient:Arch:00016",
            "--dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe",
            "--dhcp-boot=tag:!ipxe,tag:efi,snponly.efi",
            "--dhcp-boot=tag:!ipxe,tag:http,http://10.77.0.1:8080/snponly.efi",
            "--dhcp-option-force=tag:http,60,HTTPClient",
            "--dhcp-boot=tag:ipxe,http://10.77.0.1:8080/script.ipxe",
            "--enable-tftp",
            "--tftp-max=5000",
            "--pid-file",
        ])
        .arg(format!("--tftp-root={}", root.display()))
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!(
            "--log-facility={}",
            dir.join("dnsmasq.log").display()
        ));
    let dnsmasq = Spawned::start("dnsmasq", dnsmasq, &dir.join("dnsmasq.out"))?;
    // Ready when DHCP (67), TFTP (69) and HTTP (8080) are bound.
    stork_lab::process::wait_for(
        "dnsmasq and nginx listening",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let out = lab
                .command("ss")
                .args(["-Hln", "( sport = :67 or sport = :69 or sport = :8080 )"])
                .output()?;
            Ok((String::from_utf8_lossy(&out.stdout).lines().count() >= 3).then_some(()))
        },
    )?;
    Ok(vec![nginx, dnsmasq])
}

fn spread(v: &Value, key: &str) -> String {
    let s = &v[key];
    if s.is_null() {
        return "-".into();
    }
    format!(
        "n={} p50 {:.1} s p99 {:.1} s max {:.1} s",
        s["count"],
        s["p50"].as_f64().unwrap_or(0.0),
        s["p99"].as_f64().unwrap_or(0.0),
        s["max"].as_f64().unwrap_or(0.0)
    )
}

fn print_results(n: usize, shards: usize, stork: &Value, peer: &Value, life: &Value) {
    let last = |v: &Value, k: &str| v[k]["max"].as_f64();
    println!(
        "\nfleet benchmark: {n} simulated machines (stork-sim, smoltcp, {shards} threads and taps), this machine's 2 cores shared by the appliance, the peers and the sim"
    );
    println!("boot storm (power-on to the agent's kernel, initrd and ephemeral root fetched):");
    println!("  Stork           {}", spread(stork, "storm"));
    println!("  dnsmasq+nginx   {}", spread(peer, "storm"));
    if let (Some(s), Some(p)) = (last(stork, "storm"), last(peer, "storm")) {
        println!(
            "  whole storm: Stork {s:.1} s, peer {p:.1} s, Stork/peer {:.2} (below 1: Stork faster)",
            s / p
        );
    }
    println!(
        "  statuses: Stork {}  peer {}",
        stork["operator"], peer["operator"]
    );
    println!(
        "lifecycle through Stork (IPMI and Redfish power, commission, deploy of a {IMAGE_MIB} MiB image, release):"
    );
    for k in ["commission", "deploy", "release"] {
        println!("  {k:<10} {}", spread(life, k));
    }
    println!("  final statuses: {}", life["statuses"]);
    println!("  failures: {}", life["failures"]);
    if let Some(r) = life["deploys_per_minute"].as_f64() {
        println!(
            "  deploys per minute: {r:.0} (Carbide publishes {CARBIDE_PER_MINUTE:.0}: Stork/Carbide {:.2})",
            r / CARBIDE_PER_MINUTE
        );
    }
    if let (Some(bytes), Some(t)) = (life["image_bytes"].as_f64(), last(life, "deploy")) {
        println!(
            "  image bytes: {:.0} MiB in {t:.0} s = {:.0} MiB/s over the tap",
            bytes / 1048576.0,
            bytes / 1048576.0 / t
        );
        // The floor: the image bytes at the best rate this run's link carried (a storm's
        // bytes over its time), and at a rack's 10 GbE line rate.
        let rate = |v: &Value| Some(v["tap"]["bytes_in"].as_f64()? / last(v, "storm")?);
        if let Some(best) = [rate(stork), rate(peer)]
            .into_iter()
            .flatten()
            .reduce(f64::max)
        {
            let floor = bytes / best;
            println!(
                "  floor: at the best rate this link carried in the run ({:.0} MiB/s, a storm) the image bytes take {floor:.0} s; the deploy took {:.2}x that",
                best / 1048576.0,
                t / floor
            );
        }
        let line = bytes / (10e9 / 8.0);
        println!(
            "  at 10 GbE line rate they would take {line:.0} s: the deploy took {:.1}x that",
            t / line
        );
    }
    let peak = |v: &Value, k: &str| {
        v["appliance"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s[k].as_f64()).fold(0.0, f64::max))
            .unwrap_or(0.0)
    };
    println!(
        "  appliance peaks: CPU {:.2} cores, RSS {:.0} MiB, fds {:.0}",
        peak(life, "cpu"),
        peak(life, "rss_mib"),
        peak(life, "fds")
    );
    let kept = crate::target().join("stork/bench");
    println!(
        "reports and charts: {}",
        kept.join("fleet-*.{json,svg}").display()
    );
}
