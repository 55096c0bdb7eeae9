//! A SeaBIOS VM network-boots from Stork (DHCP, iPXE script, HTTP kernel and initrd), runs
//! the agent from RAM and enlists itself with its own hardware's inventory; then
//! `stork machine commission` takes it through commissioning to Ready, while a second host
//! on the provisioning network (the attacker) keeps fetching the machine's boot script and
//! tries the agent endpoints and the unauthenticated ones: it gets no token, changes
//! nothing, and the machine still reaches Ready.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::{Appliance, Lab, Vm, VmSpec, wait_for};
use stork_proto::MacAddr;
use stork_proto::api::{Machine, Status};
use stork_proto::inventory::Firmware;
use stork_tests::attacker::{self, Attacker};
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

const MAC: &str = "52:54:00:77:00:01";

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn seabios_vm_enlists_as_new_then_commissions_to_ready() {
    require_artefacts();
    let mut lab = Lab::new("enlist", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let mut spec = VmSpec::new("vm1", MAC);
    spec.memory_mib = 1024;
    spec.cpus = 2;
    spec.disk_bytes = 3 << 30;
    let mut vm = Vm::start(&mut lab, spec).unwrap();

    let mut result = wait_enlisted(&mut appliance, &mut vm).and_then(|m| {
        check_inventory(&m, &vm)?;
        Ok(m)
    });
    if let Ok(m) = &result {
        let id = m.id.clone();
        result = commission(&mut lab, &mut appliance, &mut vm, &id);
    }
    let result = result.and_then(|_| pinned_what_config_show_prints(&appliance));
    if let Err(e) = result {
        lab.keep_dir();
        panic!(
            "{e:#}\n--- {} console (last 40 lines) ---\n{}\n--- qemu ---\n{}\n--- stork (last 30 lines) ---\n{}\n(logs kept in {})",
            vm.describe(),
            vm.console_tail(40),
            vm.qemu_log_tail(10),
            appliance.log_tail(30),
            lab.dir().display()
        );
    }
}

/// The API was HTTPS with a certificate generated at the first start: the lab's CLI pinned
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
    anyhow::ensure!(
        fp.starts_with("sha256:") && pins.contains(&format!("127.0.0.1:8443 {fp}")),
        "the lab pinned {pins:?}, the appliance shows {fp}"
    );
    Ok(())
}

fn wait_enlisted(appliance: &mut Appliance, vm: &mut Vm) -> Result<Machine> {
    appliance.wait_enlisted(vm, MAC, Duration::from_secs(300))
}

/// Commissioning with the manual power driver: the appliance records that a person must
/// power the machine on, and the test is that person.
fn commission(lab: &mut Lab, appliance: &mut Appliance, vm: &mut Vm, id: &str) -> Result<Machine> {
    wait_for(
        "the enlisted VM to power off",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok(vm.exited()),
    )?;
    appliance.cli(&["machine", "commission", id])?;
    let m = appliance.machine(id)?;
    if m.status != Status::Commissioning {
        bail!("after `machine commission` the status is {}", m.status);
    }
    appliance
        .wait_events(id, &["manual power"], Duration::from_secs(30))
        .context("no event asks a person to power the machine on")?;
    let attacker = Attacker::start(lab, id, MAC)?;
    *vm = Vm::start(lab, vm.spec.clone())?;
    let m = wait_for(
        "commissioning to finish",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            // The VM is looked at before the status is read: the agent reports Ready and
            // then powers off, so a VM already stopped while the read still shows
            // Commissioning never finished (the other order races the agent; CI saw it).
            let stopped = vm.exited().is_some();
            let m = appliance.machine(id)?;
            match m.status {
                Status::Ready => Ok(Some(m)),
                Status::Commissioning if stopped => bail!("the VM stopped while commissioning"),
                Status::Commissioning => Ok(None),
                other => bail!("commissioning ended in {other}: {:?}", m.status_message),
            }
        },
    )?;
    check_inventory(&m, vm)?;
    attacker::bystander_is_served(lab, appliance)?;
    attacker.stop()?.check()?;
    attacker::refusals_counted(appliance, 1)?;
    let events = appliance.cli(&["machine", "events", id])?;
    if !events.contains("no agent token") {
        bail!("the attacker's script fetches are not in the history:\n{events}");
    }
    for want in [
        "Commission: new -> commissioning",
        "CommissioningDone: commissioning -> ready",
    ] {
        if !events.contains(want) {
            bail!("event history lacks {want:?}:\n{events}");
        }
    }
    Ok(m)
}

fn check_inventory(m: &Machine, vm: &Vm) -> Result<()> {
    let ctx = || format!("machine as recorded: {m:#?}");
    let expect = |cond: bool, what: &str| -> Result<()> {
        if cond {
            Ok(())
        } else {
            bail!("{what}; {}", ctx())
        }
    };
    let mac: MacAddr = MAC.parse()?;
    let inv = m
        .inventory
        .as_ref()
        .with_context(|| format!("no inventory; {}", ctx()))?;
    expect(
        m.macs.contains(&mac),
        "the VM's MAC is not among the machine's interfaces",
    )?;
    let nic = inv.nics.iter().find(|n| n.mac == mac);
    expect(
        nic.is_some_and(|n| n.driver.as_deref() == Some("virtio_net")),
        "no virtio_net NIC with the VM's MAC",
    )?;
    let disk = inv
        .disks
        .iter()
        .find(|d| d.serial.as_deref() == Some(vm.spec.disk_serial.as_str()));
    expect(
        disk.is_some_and(|d| d.size_bytes == vm.spec.disk_bytes),
        "no disk with the VM's disk serial and size",
    )?;
    expect(
        inv.memory.total_bytes == u64::from(vm.spec.memory_mib) << 20,
        "memory is not the VM's",
    )?;
    expect(inv.cpu.count == vm.spec.cpus, "CPU count is not the VM's")?;
    expect(inv.firmware == Firmware::Bios, "firmware is not BIOS")?;
    expect(
        inv.dmi.sys_vendor.as_deref() == Some("QEMU"),
        "DMI vendor is not QEMU",
    )?;
    Ok(())
}
