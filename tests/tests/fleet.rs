//! A simulated fleet through `stork serve`: `stork-sim` puts 50 machines and their 50 BMCs
//! on two taps of the lab's bridge (smoltcp, one host per MAC, a thread per tap), and takes them through the
//! lifecycle over the admin API: added (half with IPMI power, half with Redfish),
//! commissioned, allocated and deployed, released. Stork powers every one of them through
//! its BMC (the IPMI side answered by Stork's own wire and crypto code, playing BMC); each
//! boots as its firmware would (BIOS PXE, UEFI PXE, UEFI HTTP), then speaks the agent's API.
//!
//! Faults on purpose: machines losing 3 % of their frames, an installed OS that never phones
//! home, an agent that stalls half-way through the image, BMCs that answer 1.5 s late. The
//! test asserts outcomes, never times: every machine is accounted for; the healthy, lossy
//! and slow-BMC ones end Ready after a deploy and a release, over both power drivers; the
//! silent OS fails its deploy by the status timeout, the stalled agent by the heartbeat rule;
//! the simulated BMCs dropped nothing Stork's IPMI driver sent as malformed or unauthentic.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use stork_lab::{Appliance, Lab};
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

const MACHINES: usize = 50;
const IMAGE: &str = "sim-tiny";

/// Short status and heartbeat timeouts, so the faulty machines fail within the test.
const CONFIG: &str = "\
[lifecycle]
timeout = 120
check_interval = 2
heartbeat_timeout = 30
power_poll = 0
";

fn sim_bin() -> std::path::PathBuf {
    std::env::var_os("STORK_SIM_BIN")
        .map(Into::into)
        .unwrap_or_else(|| stork_bin().with_file_name("stork-sim"))
}

fn run_fleet(lab: &mut Lab, appliance: &Appliance) -> Result<Value> {
    // 8 MiB: each simulated agent downloads and checks it, and writes it nowhere.
    stork_lab::images::register_random_image(appliance, IMAGE, 8 << 20)?;
    // Two shards, a tap and a thread each: the bridge finds each machine's tap by its MAC.
    let taps = [lab.add_tap()?, lab.add_tap()?];
    let report = lab.dir().join("fleet.json");
    let out = lab
        .command(sim_bin())
        .args(["--tap", &taps[0], "--tap", &taps[1]])
        .args(["--machines", &MACHINES.to_string()])
        .args([
            "--bmc-base",
            "10.77.0.10",
            "--prefix",
            "24",
            "--ipmi",
            "0.5",
        ])
        .args([
            "--uefi-pxe",
            "0.3",
            "--uefi-http",
            "0.2",
            "--boot-share",
            "0.02",
        ])
        .args(["--image", IMAGE, "--release", "--phase-timeout", "600"])
        .args(["--lossy", "3", "--loss", "0.03", "--no-phone-home", "2"])
        .args([
            "--stall-image",
            "2",
            "--slow-bmc",
            "2",
            "--slow-bmc-ms",
            "1500",
        ])
        .arg("--report")
        .arg(&report)
        .env("STORK_TOKEN", &appliance.token)
        .env("RUST_LOG", "info")
        .output()
        .context("running stork-sim")?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    if !out.status.success() {
        bail!("stork-sim failed ({}):\n{text}", out.status);
    }
    Ok(serde_json::from_slice(&std::fs::read(&report)?)?)
}

fn check(report: &Value) -> Result<()> {
    let machines = report["per_machine"].as_array().context("per_machine")?;
    if machines.len() != MACHINES {
        bail!("{} machines in the report, not {MACHINES}", machines.len());
    }
    let mut problems = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ready_by_power: BTreeMap<&str, usize> = BTreeMap::new();
    for m in machines {
        let f = &m["faults"];
        let status = m["status"].as_str().unwrap_or("missing");
        let why = m["status_message"].as_str().unwrap_or_default();
        let marks: Vec<&str> = m["marks"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p[0].as_str()).collect())
            .unwrap_or_default();
        let (kind, want) = if f["no_phone_home"] == true {
            ("no phone-home", "failed_deployment")
        } else if f["stall_image"] == true {
            ("stalled agent", "failed_deployment")
        } else if f["loss"].as_f64().unwrap_or(0.0) > 0.0 {
            ("lossy", "ready")
        } else if !f["slow_bmc"].is_null() {
            ("slow BMC", "ready")
        } else {
            ("healthy", "ready")
        };
        *seen.entry(kind).or_default() += 1;
        let mac = m["mac"].as_str().unwrap_or("?");
        if status != want {
            problems.push(format!("{kind} {mac}: {status} ({why}), not {want}"));
            continue;
        }
        if status == "ready" {
            *ready_by_power
                .entry(m["power"].as_str().unwrap_or("none"))
                .or_default() += 1;
        }
        let needs: &[&str] = match kind {
            "no phone-home" => &["commissioned", "image", "installed"],
            "stalled agent" => &["commissioned"],
            _ => &["commissioned", "image", "installed", "deployed", "released"],
        };
        for n in needs {
            if !marks.contains(n) {
                problems.push(format!("{kind} {mac}: never {n} ({marks:?})"));
            }
        }
        if kind == "no phone-home" && !why.contains("timed out") && !why.contains("timeout") {
            problems.push(format!(
                "{kind} {mac}: failed for {why:?}, not the status timeout"
            ));
        }
        if kind == "stalled agent" && !why.contains("heartbeat") {
            problems.push(format!(
                "{kind} {mac}: failed for {why:?}, not the heartbeat rule"
            ));
        }
        if kind != "stalled agent"
            && marks.contains(&"deployed")
            && marks.iter().filter(|n| **n == "image").count() != 1
        {
            problems.push(format!(
                "{kind} {mac}: the image was fetched more than once"
            ));
        }
    }
    let want: BTreeMap<&str, usize> = [
        ("healthy", MACHINES - 9),
        ("lossy", 3),
        ("no phone-home", 2),
        ("stalled agent", 2),
        ("slow BMC", 2),
    ]
    .into_iter()
    .collect();
    if seen != want {
        problems.push(format!("the fleet's faults: {seen:?}, not {want:?}"));
    }
    // Half the fleet on each driver (spread evenly, so each has some of every fault).
    let ready = MACHINES - 4;
    for power in ["ipmi", "redfish"] {
        let n = ready_by_power.get(power).copied().unwrap_or(0);
        if n < ready / 3 {
            problems.push(format!(
                "{n} machines Ready over {power}, of {ready}: {ready_by_power:?}"
            ));
        }
    }
    let ipmi = &report["ipmi"];
    if ipmi["sessions"].as_u64().unwrap_or(0) == 0 {
        problems.push("no IPMI session was set up".into());
    }
    for dropped in ["dropped_malformed", "dropped_unauthentic"] {
        if ipmi[dropped] != 0 {
            problems.push(format!("the simulated BMCs {dropped}: {}", ipmi[dropped]));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

#[test]
#[ignore = "needs root, the lab and the boot files: run `cargo xtask test`"]
fn fifty_simulated_machines_with_faults_go_through_commission_deploy_and_release() {
    require_artefacts();
    let mut lab = Lab::new("fleet", &lab_dir()).unwrap();
    let config = lab.dir().join("stork.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut appliance = Appliance::start_with(
        &lab,
        &stork_bin(),
        &boot_files(),
        &["--config", &config.to_string_lossy()],
    )
    .unwrap();
    let result = run_fleet(&mut lab, &appliance).and_then(|r| check(&r));
    if let Err(e) = result {
        lab.keep_dir();
        panic!(
            "{e:#}\nlab kept in {}\n--- appliance log (last 80 lines) ---\n{}",
            lab.dir().display(),
            appliance.log_tail(80)
        );
    }
    // The appliance is still running after the storm.
    assert!(
        appliance.exited().is_none(),
        "stork serve exited during the run"
    );
}
