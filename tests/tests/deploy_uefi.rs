//! Deploying to disk on UEFI through firmware PXE, powered through the machine's BMC: OVMF
//! with the NIC's iPXE ROM disabled, so EDK2's own PXE fetches `snponly.efi` over Stork's
//! TFTP at every network boot. The machine enlists, commissions, gets the Debian image on its
//! disk (uploaded as a user's own image: a qcow2 made from it, `stork image upload` after an
//! upload with a wrong `--sha256` was refused and left nothing; the appliance converted it)
//! and a boot entry for it that is `BootNext` and first in `BootOrder`; the agent's reboot
//! resets the VM in place and OVMF goes straight to the disk's `EFI/BOOT/BOOTX64.EFI` (GRUB),
//! with no network boot on the way (no boot script, no TFTP); cloud-init phones home:
//! Deployed, and SSH with the deploy's key reads the hostname asked for.
//!
//! The machine keeps its OVMF variable store for its lifetime (every power-on and reset of
//! the same machine); a new machine starts from the pristine template.

use anyhow::{Context, Result, bail};
use stork_lab::Firmware;
use stork_proto::inventory::Firmware as RecordedFirmware;
use stork_tests::deploy::{Scenario, deploy_to_disk_and_log_in, os_machine, upload_qcow2};

/// The image the test uploads (a qcow2 made from the Debian image) and deploys.
const UPLOADED: &str = "debian-qcow2";
use stork_tests::require_boot_files;

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn ovmf_vm_through_firmware_pxe_powered_by_its_bmc_deploys_debian_to_disk_and_logs_in() {
    require_boot_files(&["snponly.efi"]);
    let mac = "52:54:00:77:01:e1";
    let spec = os_machine("uefi1", mac, Firmware::Uefi { nic_rom: false }, 4 << 30);
    let mut s = Scenario::new("deploy-uefi", spec, None).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        let m = s.status(&id)?;
        let firmware = m.inventory.as_ref().map(|i| i.firmware);
        if firmware != Some(RecordedFirmware::Uefi) {
            bail!("firmware recorded as {firmware:?}");
        }
        s.commission(&id)?;
        upload_qcow2(&s, UPLOADED)?;
        s.image = UPLOADED.into();
        let ip = deploy_to_disk_and_log_in(&mut s, &id, "stork-e2e-uefi", false)?;
        // The agent gave the installed disk a UEFI boot entry (efibootmgr, from the
        // ephemeral root) and made it the next boot.
        let events = s.appliance.cli(&["machine", "events", &id])?;
        let entry = events
            .lines()
            .find(|l| l.contains("boot-entry Done: UEFI entry Boot"))
            .with_context(|| format!("no UEFI boot entry among the events:\n{events}"))?;
        if !entry.contains("; BootNext ") {
            bail!("the boot entry is not the next boot: {entry}");
        }
        s.say(entry.trim());
        // After the agent's reboot OVMF did not network-boot: the appliance served that MAC
        // no `exit` script (it would, to any network boot of a deployed machine), and the
        // console (OVMF and iPXE write to the serial port) shows no PXE attempt.
        let after_reboot = s.booted_straight_to_disk(
            mac,
            &ip,
            &["Start PXE over", "Stork: booting from local disk"],
        )?;
        // OVMF's boot manager says which option it starts (`BdsDxe: loading Boot0005 ...`):
        // the agent's entry, as BootNext, straight after the reset.
        let num = entry
            .split("UEFI entry Boot")
            .nth(1)
            .and_then(|rest| rest.get(..4))
            .with_context(|| format!("no entry number in {entry:?}"))?;
        if !after_reboot.contains(&format!("BdsDxe: loading Boot{num} ")) {
            bail!("after the agent's reboot OVMF did not start Boot{num} (the agent's entry)");
        }
        // Every network boot came through firmware PXE, and the boot from disk made none:
        // OVMF opens each NBP download with a size probe it ends itself (`tsize`, then an
        // OptionRefused error), then fetches `snponly.efi`: two TFTP requests for each of
        // enlist, commission and deploy. (Completed transfers are not counted: the server
        // may see OVMF's last ACK go missing after the client has the whole file.)
        let stats = s.appliance.stats()?;
        // At least: a firmware that repeats a request under load is not a failure here (the
        // console and the log above show the boot from disk made none).
        let requests = stats.counter("tftp", "requests").unwrap_or(0);
        if requests < 6 {
            bail!("{requests} TFTP requests, wanted two per network boot (3 boots): {stats:#?}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (OVMF, firmware PXE, to disk):\n{}", s.timings());
}
