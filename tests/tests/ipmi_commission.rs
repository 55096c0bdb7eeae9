//! The whole power path through the appliance: a machine added with IPMI power parameters
//! is powered on by `stork machine power`, PXE-boots and enlists; `stork machine commission`
//! makes Stork set PXE and power it on through IPMI, and when commissioning ends Stork powers
//! it off through IPMI. No direct QEMU start: the BMC simulator starts and stops the VM.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::bmc::{self, Chassis, IpmiSim, IpmiSimSpec};
use stork_lab::vm::{VmSpec, qemu_argv};
use stork_lab::{Appliance, Lab, wait_for};
use stork_proto::api::Status;
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

const MAC: &str = "52:54:00:77:00:31";

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn ipmi_powered_vm_enlists_commissions_and_is_powered_off_by_stork() {
    require_artefacts();
    let mut lab = Lab::new("ipmi-commission", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let mut spec = VmSpec::new("vm1", MAC);
    spec.disk_bytes = 2 << 30;
    let (argv, paths) = qemu_argv(&mut lab, &spec).unwrap();
    let mut bmc_spec = IpmiSimSpec::new("vm1", 623);
    bmc_spec.chassis = Chassis::Qemu {
        argv,
        qmp: Some(paths.qmp.clone()),
    };
    let sim = IpmiSim::start(&lab, bmc_spec).unwrap();

    if let Err(e) = run(&mut appliance, &sim) {
        lab.keep_dir();
        panic!(
            "{e:#}\n--- console (last 40 lines) ---\n{}\n--- BMC calls ---\n{}\n--- stork (last 30 lines) ---\n{}\n(logs kept in {})",
            stork_lab::process::tail(&paths.console, 40),
            sim.calls(),
            appliance.log_tail(30),
            lab.dir().display()
        );
    }
}

fn status(a: &Appliance, id: &str) -> Result<Status> {
    Ok(a.machine(id)?.status)
}

fn run(appliance: &mut Appliance, sim: &IpmiSim) -> Result<()> {
    let m = appliance.add_ipmi_machine(MAC, sim)?;
    let id = m.id.clone();
    let shown = serde_json::to_string(&m)?;
    if shown.contains(bmc::OPERATOR_PASSWORD) {
        bail!("the API answer shows the BMC password: {shown}");
    }
    if !appliance
        .cli(&["machine", "power", &id, "query"])?
        .contains("off")
    {
        bail!("the machine is not off before power-on");
    }
    appliance.cli(&["machine", "power", &id, "on"])?;
    sim.wait_powered_on()
        .context("`stork machine power on` did not power the VM on through the BMC")?;
    wait_for(
        "enlistment",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            let m = appliance.machine(&id)?;
            Ok(m.inventory.is_some().then_some(()))
        },
    )?;
    wait_for(
        "the agent's power-off",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok((!sim.power_is_on()).then_some(())),
    )?;

    appliance.cli(&["machine", "commission", &id])?;
    if sim.boot() != "pxe" {
        bail!(
            "commissioning did not set the next boot to PXE: {:?}",
            sim.boot()
        );
    }
    wait_for(
        "commissioning to finish",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || match status(appliance, &id)? {
            Status::Ready => Ok(Some(())),
            Status::Commissioning => Ok(None),
            other => bail!("commissioning ended in {other}"),
        },
    )?;
    wait_for(
        "Stork's power-off through IPMI",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || Ok((!sim.power_is_on()).then_some(())),
    )?;
    let events = appliance.wait_events(
        &id,
        &["NetbootAndPowerOn done", "PowerOff"],
        Duration::from_secs(30),
    )?;
    if events.contains(bmc::OPERATOR_PASSWORD)
        || appliance.log_tail(10_000).contains(bmc::OPERATOR_PASSWORD)
    {
        bail!("the BMC password appears in events or the log");
    }
    Ok(())
}
