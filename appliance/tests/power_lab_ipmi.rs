//! End to end: a lab VM whose only way to power on is its BMC. `ipmi_sim` runs in the lab
//! namespace with a chassis control program that starts the VM's QEMU command line; the
//! IPMI driver (run on a thread inside the namespace) sets PXE, powers the VM on, the VM
//! network-boots from Stork and enlists; the BMC then reports the agent's power-off, and
//! a second boot is cut short by an IPMI power off.
//!
//! It lives in the appliance's tests (not `tests/`) because it drives the appliance's own
//! driver, and `stork-tests` does not depend on the appliance crate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork::power::ipmi::wire;
use stork::power::{BootDevice, IpmiDriver, IpmiParams, PowerState};
use stork_lab::bmc::{self, Chassis, IpmiSim, IpmiSimSpec};
use stork_lab::vm::{VmSpec, qemu_argv};
use stork_lab::{Appliance, Lab, wait_for};
use stork_proto::MacAddr;

const MAC: &str = "52:54:00:77:00:61";

fn workspace_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(default)
    })
}

/// Runs one driver operation on a thread inside the lab namespace, where the BMC is.
fn in_lab<T: Send>(
    lab: &Lab,
    f: impl AsyncFnOnce(&IpmiDriver) -> T + Send,
    driver: &IpmiDriver,
) -> Result<T> {
    bmc::in_namespace(lab.netns(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        Ok(rt.block_on(f(driver)))
    })?
}

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn vm_powered_by_ipmi_pxe_boots_enlists_and_is_powered_off_by_ipmi() {
    let boot_files = workspace_path("STORK_BOOT_FILES", "target/stork/boot");
    assert!(
        boot_files.join("vmlinuz").exists() && boot_files.join("initrd.img").exists(),
        "{} lacks vmlinuz/initrd.img: run `cargo xtask images` (or `cargo xtask test`)",
        boot_files.display()
    );
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_stork"));
    let mut lab = Lab::new("power-ipmi", &workspace_path("STORK_LAB_DIR", "target/lab")).unwrap();
    let mut appliance = Appliance::start(&lab, &bin, &boot_files).unwrap();

    let mut spec = VmSpec::new("vm1", MAC);
    spec.memory_mib = 1024;
    spec.disk_bytes = 2 << 30;
    let (argv, paths) = qemu_argv(&mut lab, &spec).unwrap();
    let mut bmc_spec = IpmiSimSpec::new("vm1", 623);
    bmc_spec.chassis = Chassis::Qemu {
        argv,
        qmp: Some(paths.qmp.clone()),
    };
    let sim = IpmiSim::start(&lab, bmc_spec).unwrap();
    let mut params = IpmiParams::new("127.0.0.1", bmc::OPERATOR_USER, bmc::OPERATOR_PASSWORD);
    params.port = sim.port;
    let driver = IpmiDriver::new(params);

    let result = run(&lab, &mut appliance, &sim, &driver);
    if let Err(e) = result {
        lab.keep_dir();
        panic!(
            "{e:#}\n--- console (last 40 lines) ---\n{}\n--- qemu ---\n{}\n--- BMC calls ---\n{}\n--- ipmi_sim ---\n{}\n--- stork (last 30 lines) ---\n{}\n(logs kept in {})",
            stork_lab::process::tail(&paths.console, 40),
            sim.qemu_log_tail(10),
            sim.calls(),
            sim.log_tail(10),
            appliance.log_tail(30),
            lab.dir().display()
        );
    }
}

/// QEMU's pid once `ipmi_sim` has started it: the BMC acknowledges a power-on before its
/// chassis command has run (CI saw the second power-on's QEMU start 40 ms after the answer).
fn started_qemu(sim: &IpmiSim) -> Result<i32> {
    wait_for(
        "ipmi_sim to start QEMU",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || Ok(sim.vm_pid()),
    )
}

fn run(lab: &Lab, appliance: &mut Appliance, sim: &IpmiSim, driver: &IpmiDriver) -> Result<()> {
    // Off at first: nothing runs until the BMC is told.
    let state = in_lab(lab, async |d| d.query().await, driver)??;
    if state != PowerState::Off || sim.vm_pid().is_some() {
        bail!("the VM is not off before power-on: {state}");
    }
    in_lab(
        lab,
        async |d| d.set_boot_device(BootDevice::Pxe, false, false).await,
        driver,
    )??;
    if sim.boot() != "pxe" {
        bail!("the BMC recorded boot device {:?}", sim.boot());
    }
    let flags = in_lab(lab, async |d| d.boot_flags().await, driver)??;
    if flags.device != wire::BOOT_DEVICE_PXE {
        bail!("boot flags read back as {flags:?}");
    }

    in_lab(lab, async |d| d.power_on().await, driver)??;
    if in_lab(lab, async |d| d.query().await, driver)?? != PowerState::On {
        bail!("the BMC does not report the VM on after power-on");
    }
    started_qemu(sim).context("power-on did not start QEMU")?;
    if !sim
        .ipmitool(&["chassis", "power", "status"])?
        .contains("is on")
    {
        bail!("ipmitool does not see the VM on");
    }

    // PXE boot and enlistment through the ordinary flow.
    let mac: MacAddr = MAC.parse()?;
    wait_for(
        "the VM to enlist",
        Duration::from_secs(300),
        Duration::from_millis(500),
        || {
            if let Some(status) = appliance.exited() {
                bail!("stork serve exited: {status}");
            }
            // QEMU first, then the machines: the agent enlists and then powers off.
            let running = sim.vm_pid().is_some();
            let found = appliance
                .machines()?
                .into_iter()
                .find(|m| m.boot_mac == Some(mac));
            if found.is_none() && !running {
                bail!("the VM stopped before it enlisted");
            }
            Ok(found)
        },
    )?;

    // The agent powers the machine off after enlisting; the BMC sees QEMU gone.
    wait_for(
        "the BMC to report the VM off after enlistment",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || Ok((in_lab(lab, async |d| d.query().await, driver)?? == PowerState::Off).then_some(())),
    )?;

    // Second boot, cut short by Stork's IPMI power off (hard).
    in_lab(lab, async |d| d.power_on().await, driver)??;
    let pid = started_qemu(sim).context("second power-on did not start QEMU")?;
    in_lab(lab, async |d| d.power_off(false).await, driver)??;
    if std::path::Path::new(&format!("/proc/{pid}")).exists() && sim.vm_pid() == Some(pid) {
        bail!("QEMU {pid} still runs after the IPMI power off");
    }
    if in_lab(lab, async |d| d.query().await, driver)?? != PowerState::Off {
        bail!("the BMC does not report the VM off after power off");
    }
    if !sim
        .ipmitool(&["chassis", "power", "status"])?
        .contains("is off")
    {
        bail!("ipmitool does not see the VM off");
    }
    Ok(())
}
