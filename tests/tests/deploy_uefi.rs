//! Deploying to disk on UEFI through firmware PXE, powered through the machine's BMC: OVMF
//! with the NIC's iPXE ROM disabled, so EDK2's own PXE fetches `snponly.efi` over Stork's
//! TFTP at every network boot. The machine enlists, commissions, gets the Debian image on its
//! disk; the agent's reboot resets the VM in place; OVMF network-boots first, iPXE gets
//! Stork's `exit`, and OVMF goes on to the disk's `EFI/BOOT/BOOTX64.EFI` (GRUB); cloud-init
//! phones home: Deployed, and SSH with the deploy's key reads the hostname asked for.
//!
//! The machine keeps its OVMF variable store for its lifetime (every power-on and reset of
//! the same machine); a new machine starts from the pristine template.

use anyhow::{Result, bail};
use stork_lab::{Firmware, VmSpec};
use stork_proto::inventory::Firmware as RecordedFirmware;
use stork_tests::boot_files;
use stork_tests::deploy::{Scenario, deploy_to_disk_and_log_in};

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn ovmf_vm_through_firmware_pxe_powered_by_its_bmc_deploys_debian_to_disk_and_logs_in() {
    assert!(
        boot_files().join("snponly.efi").exists(),
        "snponly.efi is missing from the boot files: run `cargo xtask test`"
    );
    let mut spec = VmSpec::new("uefi1", "52:54:00:77:01:e1");
    spec.firmware = Firmware::Uefi { nic_rom: false };
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.disk_bytes = 4 << 30;
    let mut s = Scenario::new("deploy-uefi", spec, None).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        let m = s.status(&id)?;
        let firmware = m.inventory.as_ref().map(|i| i.firmware);
        if firmware != Some(RecordedFirmware::Uefi) {
            bail!("firmware recorded as {firmware:?}");
        }
        s.commission(&id)?;
        deploy_to_disk_and_log_in(&mut s, &id, "stork-e2e-uefi", false)?;
        // After the agent's reboot OVMF network-booted first (iPXE writes to the EFI console,
        // so to the serial port) and went on to the disk when Stork's script said so.
        let console = std::fs::read(&s.machine.paths.console)?;
        let console = String::from_utf8_lossy(&console);
        let after_reboot = console
            .rsplit_once("stork-agent: done, rebooting")
            .map(|(_, rest)| rest)
            .unwrap_or_default();
        if !after_reboot.contains("Stork: booting from local disk") {
            bail!(
                "after the agent's reboot the console shows no network boot told to leave for the disk"
            );
        }
        // The agent gave the installed disk a UEFI boot entry (efibootmgr, from the
        // ephemeral root), after network boot in the order.
        let events = s.appliance.cli(&["machine", "events", &id])?;
        if !events.contains("boot-entry Done: UEFI entry Boot") {
            bail!("no UEFI boot entry among the events:\n{events}");
        }
        // Every network boot came through firmware PXE: OVMF fetched the NBP over TFTP.
        let stats = s.appliance.stats()?;
        let tftp = stats.counter("tftp", "transfers_completed").unwrap_or(0);
        // Enlist, commission, deploy, and the boot from disk after the deploy.
        if tftp < 4 {
            bail!("{tftp} TFTP transfers completed, wanted one per network boot (4): {stats:#?}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (OVMF, firmware PXE, to disk):\n{}", s.timings());
}
