//! A SeaBIOS VM network-boots from Stork (DHCP, iPXE script, HTTP kernel and initrd), runs
//! the agent from RAM and enlists itself with its own hardware's inventory.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use stork_lab::{Appliance, Lab, Vm, VmSpec, wait_for};
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

const MAC: &str = "52:54:00:77:00:01";

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn seabios_vm_pxe_boots_and_enlists_as_new() {
    require_artefacts();
    let mut lab = Lab::new("enlist", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let mut spec = VmSpec::new("vm1", MAC);
    spec.memory_mib = 1024;
    spec.cpus = 2;
    spec.disk_bytes = 3 << 30;
    let mut vm = Vm::start(&mut lab, spec).unwrap();

    let result = wait_enlisted(&mut appliance, &mut vm).and_then(|m| check_inventory(&m, &vm));
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

fn wait_enlisted(appliance: &mut Appliance, vm: &mut Vm) -> Result<Value> {
    wait_for(
        "the VM to enlist",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            if let Some(status) = appliance.exited() {
                bail!("stork serve exited: {status}");
            }
            let found = appliance
                .machines()?
                .into_iter()
                .find(|m| m["boot_mac"] == MAC);
            if found.is_none()
                && let Some(status) = vm.exited()
            {
                bail!("the VM stopped ({status}) before it enlisted");
            }
            Ok(found)
        },
    )
}

fn check_inventory(m: &Value, vm: &Vm) -> Result<()> {
    let ctx = || format!("machine as recorded: {m:#}");
    let expect = |cond: bool, what: &str| -> Result<()> {
        if cond {
            Ok(())
        } else {
            bail!("{what}; {}", ctx())
        }
    };
    expect(m["status"] == "new", "status is not new")?;
    let inv = &m["inventory"];
    let macs: Vec<&str> = m["macs"]
        .as_array()
        .context("macs")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    expect(
        macs.contains(&MAC),
        "the VM's MAC is not among the machine's interfaces",
    )?;
    let nic = inv["nics"]
        .as_array()
        .context("nics")?
        .iter()
        .find(|n| n["mac"] == MAC);
    expect(
        nic.is_some_and(|n| n["driver"] == "virtio_net"),
        "no virtio_net NIC with the VM's MAC",
    )?;
    let disks = inv["disks"].as_array().context("disks")?;
    let disk = disks
        .iter()
        .find(|d| d["serial"] == vm.spec.disk_serial.as_str());
    expect(
        disk.is_some_and(|d| d["size_bytes"] == vm.spec.disk_bytes),
        "no disk with the VM's disk serial and size",
    )?;
    let mem = inv["memory"]["total_bytes"].as_u64().context("memory")?;
    expect(
        mem == u64::from(vm.spec.memory_mib) << 20,
        "memory is not the VM's",
    )?;
    expect(
        inv["cpu"]["count"] == vm.spec.cpus,
        "CPU count is not the VM's",
    )?;
    expect(inv["firmware"] == "bios", "firmware is not BIOS")?;
    expect(inv["dmi"]["sys_vendor"] == "QEMU", "DMI vendor is not QEMU")?;
    Ok(())
}
