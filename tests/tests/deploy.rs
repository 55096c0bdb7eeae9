//! Deploying an OS end to end on SeaBIOS VMs powered only through their BMCs (`ipmi_sim`
//! starting and stopping QEMU): the test adds each machine with its IPMI parameters and asks
//! Stork for power-on, commissioning, deploy and release; Stork does every power-on and -off.
//!
//! - To disk: enlist, commission, the Debian image streamed onto the disk (the download cut
//!   once mid-stream and resumed), the agent's reboot resets the VM in place, the network boot
//!   answers `exit` and SeaBIOS boots the disk, cloud-init phones home: Deployed; SSH with the
//!   deploy's key reads the hostname asked for. Then a release with erase (Stork power-cycles
//!   the running machine into the agent) leaves no partition table or signature on the disk.
//! - A wrong image checksum ends in failed_deployment with the reason, and Stork powers the
//!   machine off.
//! - A deploy into memory leaves the disk untouched.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use stork_lab::{VmSpec, wait_for};
use stork_proto::DeployTarget;
use stork_proto::api::Status;
use stork_tests::deploy::{Scenario, USER, deploy_to_disk_and_log_in};

/// A SeaBIOS machine with room for the installed Debian (cloud-init is python, and sshd).
fn seabios(mac: &str, disk_bytes: u64) -> VmSpec {
    let mut spec = VmSpec::new("vm1", mac);
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.disk_bytes = disk_bytes;
    spec
}

/// Enlists and commissions the scenario's machine; returns its id.
fn ready(s: &mut Scenario) -> Result<String> {
    let id = s.add_and_enlist()?;
    s.commission(&id)?;
    Ok(id)
}

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn seabios_vm_powered_by_its_bmc_deploys_debian_to_disk_logs_in_over_ssh_then_releases_with_erase()
{
    let spec = seabios("52:54:00:77:01:01", 4 << 30);
    let mut s = Scenario::new("deploy-disk", spec, None).unwrap();
    let result = (|| -> Result<()> {
        let id = ready(&mut s)?;
        deploy_to_disk_and_log_in(&mut s, &id, "stork-e2e-disk", true)?;
        release_with_erase(&mut s, &id)
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (SeaBIOS, to disk):\n{}", s.timings());
}

fn release_with_erase(s: &mut Scenario, id: &str) -> Result<()> {
    s.phase_start();
    s.appliance.cli(&["machine", "release", id, "--erase"])?;
    let m = s.status(id)?;
    if m.status != Status::DiskErasing {
        bail!("after `release --erase` the status is {}", m.status);
    }
    // Stork power-cycles the running machine into the agent through the BMC.
    s.wait_status(
        id,
        Status::Ready,
        &[Status::DiskErasing],
        Duration::from_secs(400),
    )?;
    s.wait_off("Stork's power-off after the erase", Duration::from_secs(90))?;
    s.phase_done("release with erase (to Ready, off)");

    let disk = s
        .machine
        .paths
        .disk
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 disk path"))?;
    let wipefs = stork_lab::run(Command::new("wipefs").args(["--no-act", &disk]))?;
    if !wipefs.trim().is_empty() {
        bail!("wipefs still finds signatures on the erased disk:\n{wipefs}");
    }
    let blkid = Command::new("blkid").args(["-p", &disk]).output()?;
    // blkid exits 2 when it finds nothing.
    if blkid.status.code() != Some(2) {
        bail!(
            "blkid -p still recognises the erased disk: {}",
            String::from_utf8_lossy(&blkid.stdout)
        );
    }
    let sgdisk = Command::new("sgdisk").args(["-p", &disk]).output()?;
    let text = String::from_utf8_lossy(&sgdisk.stdout).to_string()
        + &String::from_utf8_lossy(&sgdisk.stderr);
    if !text.contains("GPT: not present") && !text.contains("Creating new GPT entries") {
        bail!("sgdisk still finds a partition table:\n{text}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn an_image_with_the_wrong_sha256_fails_the_deployment_with_that_reason() {
    let wrong = "0".repeat(64);
    let spec = seabios("52:54:00:77:01:02", 4 << 30);
    let mut s = Scenario::new("deploy-badsum", spec, Some(&wrong)).unwrap();
    let result = (|| -> Result<()> {
        let id = ready(&mut s)?;
        s.deploy(&id, DeployTarget::Disk, "stork-e2e-badsum")?;
        let m = wait_for(
            "the deployment to fail",
            Duration::from_secs(600),
            Duration::from_millis(500),
            || {
                let m = s.status(&id)?;
                Ok(match m.status {
                    Status::Deploying => None,
                    _ => Some(m),
                })
            },
        )?;
        let msg = m.status_message.as_deref().unwrap_or_default();
        if m.status != Status::FailedDeployment
            || !msg.contains("sha256 mismatch")
            || !msg.contains(&wrong)
        {
            bail!(
                "expected failed_deployment with a sha256 mismatch, got {} ({msg})",
                m.status
            );
        }
        s.say(&format!(
            "failed as it should: {}",
            msg.lines().next().unwrap_or_default()
        ));
        s.wait_off(
            "Stork's power-off after the failed deployment",
            Duration::from_secs(90),
        )?;
        s.phase_done("failed deployment (to off)");
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = stork_lab::run(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn seabios_vm_powered_by_its_bmc_deploys_debian_in_memory_without_touching_its_disk() {
    let spec = seabios("52:54:00:77:01:03", 1 << 30);
    let mut s = Scenario::new("deploy-mem", spec, None).unwrap();
    let result = (|| -> Result<()> {
        let id = ready(&mut s)?;
        let hostname = "stork-e2e-ram";
        let before = sha256_of(&s.machine.paths.disk)?;
        s.deploy(&id, DeployTarget::Memory, hostname)?;
        s.wait_status(
            &id,
            Status::Deployed,
            &[Status::Deploying],
            Duration::from_secs(600),
        )?;
        s.phase_done("deploy in memory (to phone-home)");
        let ip = s.leased_ip()?;
        let got = s.ssh_when_up(&ip, "hostname; findmnt -n -o FSTYPE /")?;
        let mut lines = got.lines();
        let (name, fstype) = (
            lines.next().unwrap_or_default(),
            lines.next().unwrap_or_default(),
        );
        if name.trim() != hostname || fstype.trim() != "overlay" {
            bail!(
                "over SSH: hostname {name:?}, root {fstype:?}; wanted {hostname:?} on an overlay"
            );
        }
        s.say(&format!(
            "ssh {USER}@{ip}: hostname {name}, root on {fstype}"
        ));
        let after = sha256_of(&s.machine.paths.disk)?;
        if after != before {
            bail!("the disk changed during a deploy in memory: sha256 {before} -> {after}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (SeaBIOS, in memory):\n{}", s.timings());
}
