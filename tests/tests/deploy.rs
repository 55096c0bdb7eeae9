//! Deploying an OS end to end on SeaBIOS VMs powered only through their BMCs (`ipmi_sim`
//! starting and stopping QEMU): the test adds each machine with its IPMI parameters and asks
//! Stork for power-on, commissioning, deploy and release; Stork does every power-on and -off
//! (`Scenario` checks each: off before the first power-on, PXE set for commissioning, both
//! power actions in the history, the BMC password in no API answer, event or log line).
//!
//! - To disk: enlist, commission, the Debian image streamed onto the disk (the download cut
//!   once mid-stream and resumed), Stork sets the BMC's next boot to the disk, the agent's
//!   reboot resets the VM in place and SeaBIOS boots the disk with no network boot first
//!   (no `exit` script served), cloud-init phones home: Deployed; SSH with the
//!   deploy's key reads the hostname asked for, while a hostile host beside it fetches its
//!   boot script, tries the agent routes, floods DECLINEs, TFTP requests asking a 255 s
//!   timeout, slow connections and 2 MiB reports (`stork_tests::attacker`): ordinary
//!   clients on a third host are still served, and nothing the attacker sent changed a
//!   machine. The disk is NVMe, named in the deploy by its model, beside a SATA disk the
//!   inventory names by the serial only its VPD page holds; a deploy naming a disk the
//!   machine lacks is refused before any power-on; two late commands run in the installed
//!   root before its first boot, in order. Then a plain release erases
//!   by default, fully: Stork power-cycles the running machine into the agent, which erases
//!   the disk with NVMe Format NVM and reads samples back; the disk image holds not one
//!   non-zero byte afterwards.
//! - A plain SeaBIOS machine's commissioned inventory is its VM's hardware (MAC and
//!   virtio_net, disk serial and size, memory, CPUs, BIOS, DMI vendor), and the certificate
//!   the lab's CLI pinned on first use is the one `stork config show` prints. Then a wrong
//!   image checksum ends in failed_deployment with the reason, the agent wipes what it
//!   wrote (the disk image is all zeros again: no partition table to boot), and Stork powers
//!   the machine off. Deployed again from there with an image whose block map lost a range,
//!   it fails again, naming the missing range.
//!
//! The deploy into memory is `web_ui.rs`'s, driven through the web UI: one VM run proves both.

use std::time::Duration;

use anyhow::{Result, bail};
use stork_lab::{Appliance, DiskBus, ExtraDisk};
use stork_proto::DeployTarget;
use stork_proto::MacAddr;
use stork_proto::api::Status;
use stork_proto::inventory::Firmware;
use stork_tests::attacker::{self, Attacker};
use stork_tests::deploy::{
    Scenario, check_blank_disk, deploy_to_disk_and_log_in, register_image_with_map_range_dropped,
    seabios,
};

const MAC_DISK: &str = "52:54:00:77:01:01";
const SATA_SERIAL: &str = "STORK-SATA-1";

/// Enlists and commissions the scenario's machine; returns its id.
fn ready(s: &mut Scenario) -> Result<String> {
    let id = s.add_and_enlist()?;
    s.commission(&id)?;
    Ok(id)
}

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn seabios_vm_powered_by_its_bmc_deploys_debian_to_nvme_logs_in_over_ssh_then_release_erases_it() {
    let mut spec = seabios(MAC_DISK, 4 << 30);
    spec.disk_bus = DiskBus::Nvme;
    // A SATA disk beside it, first by kernel name (sda): the deploy picks the NVMe by model.
    spec.extra_disks = vec![ExtraDisk {
        bus: DiskBus::Sata,
        bytes: 128 << 20,
        serial: SATA_SERIAL.into(),
        unreadable_at: None,
    }];
    let mut s = Scenario::new("deploy-disk", spec, None).unwrap();
    s.disk = Some("QEMU NVMe Ctrl".into());
    // Run in the installed root before its first boot, in order.
    s.late_commands = vec![
        "echo \"late $(uname -m)\" > /etc/stork-late".into(),
        "echo second >> /etc/stork-late".into(),
    ];
    let result = (|| -> Result<()> {
        let id = ready(&mut s)?;
        inventory_names_every_disk(&s, &id)?;
        // A hostile host beside the deploy, from before the power-on to the login.
        let attacker = Attacker::start(&mut s.lab, &id, MAC_DISK)?;
        let ip = deploy_to_disk_and_log_in(&mut s, &id, "stork-e2e-disk", true)?;
        // Before the agent's reboot Stork set the BMC's next boot to the disk, so SeaBIOS
        // went straight to it: no network boot, no `exit` script (SeaBIOS and iPXE print to
        // the screen only: the appliance's log is the witness).
        let events = s.events(&id)?;
        if !events.contains("power: next boot from disk, set through the BMC") {
            bail!("Stork did not set the next boot through the BMC:\n{events}");
        }
        if !events.contains("ephemeral Done: not needed: the task runs from the initrd") {
            bail!("the raw deploy fetched the ephemeral root:\n{events}");
        }
        s.booted_straight_to_disk(MAC_DISK, &ip, &[])?;
        s.say("after the install SeaBIOS booted the disk first: no network boot");
        let late = s.ssh(&ip, "cat /etc/stork-late")?;
        if late.trim() != "late x86_64\nsecond" {
            bail!("the late commands left {late:?} in /etc/stork-late");
        }
        s.say("late commands ran in the installed root, in order");
        attacker::bystander_is_served(&mut s.lab, &s.appliance)?;
        attacker.stop()?.check()?;
        attacker::refusals_counted(&s.appliance, 1)?;
        let events = s.events(&id)?;
        if !events.contains("no agent token") {
            bail!("the attacker's script fetches are not in the history:\n{events}");
        }
        release_erases_by_default(&mut s, &id)
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (SeaBIOS, to disk):\n{}", s.timings());
}

/// The commissioned inventory names both disks as people do (the SATA disk's serial comes
/// from VPD page 0x80: sysfs has none for it) and the NIC's link; a deploy naming a disk
/// the machine lacks is refused at once, naming the field and the disks there are.
fn inventory_names_every_disk(s: &Scenario, id: &str) -> Result<()> {
    let m = s.status(id)?;
    let inv = m.inventory.ok_or_else(|| anyhow::anyhow!("no inventory"))?;
    let disk = |name: &str| inv.disks.iter().find(|d| d.name == name);
    let (Some(sata), Some(nvme)) = (disk("sda"), disk("nvme0n1")) else {
        bail!("the inventory lacks sda or nvme0n1: {:?}", inv.disks);
    };
    let want = |d: &stork_proto::inventory::Disk, serial: &str, model: &str, transport: &str| {
        d.serial.as_deref() == Some(serial)
            && d.model.as_deref() == Some(model)
            && d.transport.as_deref() == Some(transport)
            && d.path.is_some()
    };
    if !want(sata, SATA_SERIAL, "QEMU HARDDISK", "sata") {
        bail!("the SATA disk is not named as it is: {sata:?}");
    }
    if !want(nvme, &s.machine.spec.disk_serial, "QEMU NVMe Ctrl", "nvme") {
        bail!("the NVMe disk is not named as it is: {nvme:?}");
    }
    if !inv.nics.iter().all(|n| n.link == Some(true)) {
        bail!("a NIC without its link state: {:?}", inv.nics);
    }
    let refused = s.appliance.cli(&[
        "machine",
        "deploy",
        id,
        "--image",
        stork_tests::deploy::IMAGE,
        "--disk",
        "sdz",
    ]);
    match refused {
        Ok(out) => bail!("a deploy to disk sdz was taken: {out}"),
        Err(e) if e.to_string().contains("disk: no disk is named \"sdz\"") => {}
        Err(e) => bail!("a deploy to disk sdz failed otherwise: {e:#}"),
    }
    if s.status(id)?.status != Status::Ready {
        bail!("the refused deploy changed the machine");
    }
    s.say(&format!(
        "inventory: sda serial {SATA_SERIAL} (VPD), nvme0n1 by model; --disk sdz refused"
    ));
    Ok(())
}

/// A plain `machine release`, no flags: the appliance's defaults erase the disks fully.
fn release_erases_by_default(s: &mut Scenario, id: &str) -> Result<()> {
    s.phase_start();
    s.appliance.cli(&["machine", "release", id])?;
    let m = s.status(id)?;
    if m.status != Status::DiskErasing || m.erase_quick {
        bail!(
            "after a plain `release` the status is {} (quick erase: {})",
            m.status,
            m.erase_quick
        );
    }
    // Stork power-cycles the running machine into the agent through the BMC.
    s.wait_status(
        id,
        Status::Ready,
        &[Status::DiskErasing],
        Duration::from_secs(400),
    )?;
    s.wait_off("Stork's power-off after the erase", Duration::from_secs(90))?;
    s.phase_done("release, full erase by default (to Ready, off)");

    let events = s.events(id)?;
    for want in [
        "full erase done",
        "NVMe Format NVM, user data erase",
        "read back 66 MiB in 66 samples: all zeros",
    ] {
        if !events.contains(want) {
            bail!("the release's events lack {want:?}:\n{events}");
        }
    }
    let blank = check_blank_disk(&s.machine.paths.disk)?;
    s.say(&format!("erased by NVMe Format NVM; {blank}"));
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
        inventory_is_the_vms(&s, &id)?;
        pinned_what_config_show_prints(&s.appliance)?;
        s.deploy(&id, DeployTarget::Disk, "stork-e2e-badsum")?;
        let msg =
            s.deploy_fails_with(&id, "with a sha256 mismatch", &["sha256 mismatch", &wrong])?;
        if !msg.contains("the disk /dev/vda was wiped") {
            bail!("the failure does not say the disk was wiped: {msg}");
        }
        s.phase_done("failed deployment (to off)");
        // The image was written whole before its sum was known; nothing of it is left.
        let blank = check_blank_disk(&s.machine.paths.disk)?;
        s.say(&format!("wiped after the mismatch; {blank}"));

        // Deployed again from failed_deployment, with an image whose block map lost a
        // range: the agent finds data where the map says a gap and fails naming it, never
        // writing a disk that silently lacks that range.
        const BADMAP: &str = "debian-bookworm-badmap";
        register_image_with_map_range_dropped(&s.appliance, &s.lab, BADMAP, 1)?;
        s.phase_start();
        s.appliance.cli(&[
            "machine", "deploy", &id, "--image", BADMAP, "--target", "disk",
        ])?;
        s.deploy_fails_with(
            &id,
            "naming the block map's missing range",
            &["block map", "a range is missing from the map"],
        )?;
        s.phase_done("failed deployment, broken block map (to off)");
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
}

/// The inventory the agent reported is the VM's own hardware, and the history has both
/// steps of the commissioning.
fn inventory_is_the_vms(s: &Scenario, id: &str) -> Result<()> {
    let m = s.status(id)?;
    let spec = &s.machine.spec;
    let inv = m
        .inventory
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no inventory: {m:#?}"))?;
    let mac: MacAddr = spec.mac.parse()?;
    let checks = [
        (m.macs.contains(&mac), "the VM's MAC is among the machine's"),
        (
            inv.nics
                .iter()
                .any(|n| n.mac == mac && n.driver.as_deref() == Some("virtio_net")),
            "a virtio_net NIC with the VM's MAC",
        ),
        (
            inv.disks.iter().any(|d| {
                d.serial.as_deref() == Some(spec.disk_serial.as_str())
                    && d.size_bytes == spec.disk_bytes
            }),
            "a disk with the VM's disk serial and size",
        ),
        (
            inv.memory.total_bytes == u64::from(spec.memory_mib) << 20,
            "the VM's memory",
        ),
        (inv.cpu.count == spec.cpus, "the VM's CPU count"),
        (inv.firmware == Firmware::Bios, "BIOS firmware"),
        (
            inv.dmi.sys_vendor.as_deref() == Some("QEMU"),
            "DMI vendor QEMU",
        ),
    ];
    if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
        bail!("the inventory lacks {what}: {inv:#?}");
    }
    let events = s.events(id)?;
    for want in [
        "Commission: new -> commissioning",
        "CommissioningDone: commissioning -> ready",
    ] {
        if !events.contains(want) {
            bail!("the history lacks {want:?}:\n{events}");
        }
    }
    Ok(())
}

/// The API is HTTPS with a certificate generated at the first start: the lab's CLI pinned
/// it on first use (the agent pinned it from its command line, or it could not have
/// commissioned), and what it pinned is what `stork config show` prints on the appliance.
fn pinned_what_config_show_prints(appliance: &Appliance) -> Result<()> {
    let pins = std::fs::read_to_string(appliance.data_dir.with_file_name("pins"))?;
    let shown = stork_lab::run(
        std::process::Command::new(&appliance.bin)
            .args(["config", "show", "--data-dir"])
            .arg(&appliance.data_dir),
    )?;
    let fp = shown
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:"))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("no fingerprint in `stork config show`:\n{shown}"))?;
    if !(fp.starts_with("sha256:") && pins.contains(&format!("127.0.0.1:8443 {fp}"))) {
        bail!("the lab pinned {pins:?}, the appliance shows {fp}");
    }
    Ok(())
}
