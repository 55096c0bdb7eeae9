//! `stork-sim`: runs a simulated fleet against a Stork appliance on the segment of a tap.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use stork_sim::fleet::{FaultPlan, FleetConfig, run};

/// Simulates machines and their BMCs on a tap and takes them through Stork's lifecycle.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A tap device on the appliance's segment (created by whoever runs the sim); repeat it
    /// to split the fleet into shards, a thread and a tap each.
    #[arg(long = "tap", required = true)]
    taps: Vec<String>,
    #[arg(long, default_value_t = 50)]
    machines: usize,
    /// Distinguishes this fleet's MACs from another's on the same segment.
    #[arg(long, default_value_t = 1)]
    mac_tag: u8,
    /// The first BMC's address; the others follow it.
    #[arg(long, default_value = "10.77.1.0")]
    bmc_base: std::net::Ipv4Addr,
    /// The segment's prefix length.
    #[arg(long, default_value_t = 16)]
    prefix: u8,
    #[arg(long, default_value_t = 0.2)]
    uefi_pxe: f64,
    #[arg(long, default_value_t = 0.1)]
    uefi_http: f64,
    /// Share (0..1) of machines Stork powers over IPMI; the rest over Redfish.
    #[arg(long, default_value_t = 0.5)]
    ipmi: f64,
    /// Share (0..1) of the kernel, initrd and ephemeral root each boot fetches.
    #[arg(long, default_value_t = 1.0)]
    boot_share: f64,
    /// The appliance's API.
    #[arg(long, default_value = "https://10.77.0.1:8443")]
    api: String,
    /// An admin token (or STORK_TOKEN); not needed for `--storm`.
    #[arg(long, env = "STORK_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// A boot storm only: every machine powered on at once by the sim, each booting as far
    /// as its agent's files; any DHCP+TFTP+HTTP servers (Stork's, or dnsmasq and nginx).
    #[arg(long)]
    storm: bool,
    /// The API certificate's fingerprint (`sha256:...`); absent: pinned on first use.
    #[arg(long)]
    fingerprint: Option<String>,
    /// The boot resource to deploy after commissioning (absent: commission only).
    #[arg(long)]
    image: Option<String>,
    /// Release (quick erase) what deployed.
    #[arg(long)]
    release: bool,
    /// Seconds the operator waits for each phase.
    #[arg(long, default_value_t = 1800)]
    phase_timeout: u64,
    /// Machines that lose `--loss` of their frames.
    #[arg(long, default_value_t = 0)]
    lossy: usize,
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    /// Machines whose installed OS never phones home.
    #[arg(long, default_value_t = 0)]
    no_phone_home: usize,
    /// Machines whose agent stalls half-way through the image.
    #[arg(long, default_value_t = 0)]
    stall_image: usize,
    /// Machines whose BMC answers `--slow-bmc-ms` late.
    #[arg(long, default_value_t = 0)]
    slow_bmc: usize,
    #[arg(long, default_value_t = 2000)]
    slow_bmc_ms: u64,
    /// The appliance's process, sampled for CPU, memory and descriptors.
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Where to write the report (`.json`; the chart goes beside it as `.svg`).
    #[arg(long, default_value = "fleet-report.json")]
    report: PathBuf,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let config = FleetConfig {
        taps: a.taps,
        machines: a.machines,
        mac_tag: a.mac_tag,
        bmc_base: a.bmc_base,
        prefix: a.prefix,
        uefi_pxe: a.uefi_pxe,
        uefi_http: a.uefi_http,
        ipmi: a.ipmi.clamp(0.0, 1.0),
        boot_share: a.boot_share.clamp(0.0, 1.0),
        faults: FaultPlan {
            lossy: a.lossy,
            loss: a.loss,
            no_phone_home: a.no_phone_home,
            stall_image: a.stall_image,
            slow_bmc: a.slow_bmc,
            slow_bmc_delay: Duration::from_millis(a.slow_bmc_ms),
        },
        api: a.api,
        token: a.token,
        fingerprint: a.fingerprint,
        image: a.image,
        release: a.release,
        phase_timeout: Duration::from_secs(a.phase_timeout),
        watch_pid: a.watch_pid,
        storm: a.storm,
    };
    if !config.storm && config.token.is_empty() {
        anyhow::bail!("--token (or STORK_TOKEN) is needed to drive the appliance");
    }
    let report = run(&config)?;
    std::fs::write(&a.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", a.report.display()))?;
    let svg = a.report.with_extension("svg");
    std::fs::write(&svg, report.svg()).with_context(|| format!("writing {}", svg.display()))?;
    print!("{}", report.summary());
    println!("report: {}, chart: {}", a.report.display(), svg.display());
    Ok(())
}
