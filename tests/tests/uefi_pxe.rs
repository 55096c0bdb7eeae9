//! UEFI firmware PXE with no iPXE ROM: OVMF's own PXE gets `snponly.efi` from Stork's DHCP
//! and TFTP, iPXE then asks DHCP again and fetches its script over HTTP, and the agent
//! enlists the machine with UEFI firmware in its inventory.

use std::time::Duration;

use anyhow::{Result, bail};
use stork_lab::{Appliance, Firmware, Lab, Vm, VmSpec};
use stork_proto::inventory::Firmware as RecordedFirmware;
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

const MAC: &str = "52:54:00:77:00:e1";

#[test]
#[ignore = "needs root, QEMU, OVMF and built images: run `cargo xtask test`"]
fn ovmf_firmware_pxe_fetches_its_nbp_over_tftp_and_enlists() {
    require_artefacts();
    assert!(
        boot_files().join("snponly.efi").exists(),
        "snponly.efi is missing from the boot files: run `cargo xtask test`"
    );
    let mut lab = Lab::new("uefi-pxe", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let mut spec = VmSpec::new("uefi1", MAC);
    spec.firmware = Firmware::Uefi { nic_rom: false };
    spec.disk_bytes = 2 << 30;
    let mut vm = Vm::start(&mut lab, spec).unwrap();
    if let Err(e) = run(&mut appliance, &mut vm) {
        lab.keep_dir();
        panic!(
            "{e:#}\n--- console (last 40 lines) ---\n{}\n--- stork (last 40 lines) ---\n{}\n(logs kept in {})",
            vm.console_tail(40),
            appliance.log_tail(40),
            lab.dir().display()
        );
    }
}

fn run(appliance: &mut Appliance, vm: &mut Vm) -> Result<()> {
    let m = appliance.wait_enlisted(vm, MAC, Duration::from_secs(400))?;
    let firmware = m.inventory.as_ref().map(|i| i.firmware);
    if firmware != Some(RecordedFirmware::Uefi) {
        bail!("firmware recorded as {firmware:?}");
    }
    let stats = appliance.stats()?;
    let done = stats.counter("tftp", "transfers_completed").unwrap_or(0);
    if done < 1 {
        bail!("no TFTP transfer completed: {stats:#?}");
    }
    Ok(())
}
