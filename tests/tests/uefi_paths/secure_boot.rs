//! Secure Boot, enforced: OVMF's secboot build with Microsoft's keys enrolled and no iPXE ROM
//! (iPXE is not signed). The machine is added with the tag `secure-boot` (the appliance's
//! `boot.secure_boot` stays off: other UEFI machines keep iPXE), so Stork's DHCP sends its
//! firmware PXE Debian's Microsoft-signed shim, shim fetches Debian's signed network GRUB over
//! TFTP, GRUB reads its configuration from Stork's TFTP (`grub/grub.cfg`, then the machine's
//! own `grub/machine/<mac>`, made per request with this boot's agent token) and boots the
//! signed kernel and the agent's initrd, which loads only signed modules under the kernel's
//! lockdown. The machine, powered through its BMC, enlists with Secure Boot on in its
//! inventory, commissions, and deploys Debian 13 to disk; the installed system boots through its
//! own shim and GRUB with Secure Boot still on (checked over SSH with `mokutil`).

use anyhow::{Context, Result, bail};
use stork_lab::Firmware;
use stork_proto::inventory::Firmware as RecordedFirmware;
use stork_tests::deploy::{Scenario, deploy_to_disk_and_log_in, os_machine};
use stork_tests::require_boot_files;

const MAC: &str = "52:54:00:77:05:b0";
const HOSTNAME: &str = "stork-e2e-sb";
/// The image deployed: Debian 13.
const TRIXIE: &str = "debian-trixie";

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn secure_boot_enforced_netboots_shim_grub_and_the_agent_and_deploys_a_system_that_keeps_it() {
    require_boot_files(&["shimx64.efi", "grubx64.efi"]);
    let spec = os_machine("sb1", MAC, Firmware::UefiSecureBoot, 4 << 30);
    let mut s = Scenario::new("secure-boot", spec, None).unwrap();
    s.tags = vec!["secure-boot"];
    if let Err(e) = run(&mut s) {
        s.fail(e);
    }
    eprintln!("phases (OVMF, Secure Boot, to disk):\n{}", s.timings());
}

fn run(s: &mut Scenario) -> Result<()> {
    let id = s.add_and_enlist()?;
    let inventory = s.status(&id)?.inventory.context("no inventory")?;
    if inventory.firmware != RecordedFirmware::Uefi || inventory.secure_boot != Some(true) {
        bail!(
            "recorded firmware {:?}, secure boot {:?}: wanted UEFI with Secure Boot on",
            inventory.firmware,
            inventory.secure_boot
        );
    }
    s.say("enlisted: UEFI, Secure Boot on");
    // The chain as the console shows it: the firmware fetched shim, shim fetched GRUB, GRUB
    // ran the machine's configuration, the kernel's EFI stub saw Secure Boot on; iPXE never
    // ran. (The kernel's own lockdown notice is below the agent's console log level.)
    let console = s.console()?;
    for want in [
        "NBP filename is shimx64.efi",
        "Fetching Netboot Image grubx64.efi",
        "Stork: booting the agent on",
        "EFI stub: UEFI Secure Boot is enabled.",
    ] {
        if !console.contains(want) {
            bail!("the console lacks {want:?}");
        }
    }
    if console.contains("iPXE") {
        bail!("iPXE ran under Secure Boot");
    }
    // GRUB read the machine's own configuration over TFTP.
    let log = std::fs::read_to_string(s.lab.dir().join("stork.log"))?;
    let own = format!("file=grub/machine/{MAC}");
    if !log
        .lines()
        .any(|l| l.contains("TFTP transfer started") && l.contains(&own))
    {
        bail!("no TFTP transfer of grub/machine/{MAC} in the appliance's log");
    }

    s.commission(&id)?;
    // Debian 13 from its own recipe (the other tests deploy Debian 12): its shim, GRUB and
    // kernel carry the Secure Boot chain from the disk.
    s.use_image(TRIXIE)?;
    let ip = deploy_to_disk_and_log_in(s, &id, HOSTNAME, false)?;
    let release = s.ssh(
        &ip,
        ". /etc/os-release; echo \"$VERSION_ID $VERSION_CODENAME\"",
    )?;
    if release.trim() != "13 trixie" {
        bail!(
            "the installed system is {:?}, wanted Debian 13 (trixie)",
            release.trim()
        );
    }
    s.say(&format!("installed system: Debian {}", release.trim()));
    let state = s.ssh(&ip, "mokutil --sb-state")?;
    if !state.contains("SecureBoot enabled") {
        bail!("the installed system says {state:?}, wanted Secure Boot enabled");
    }
    s.say(&format!("installed system: {}", state.trim()));
    // It came up through its own shim: the ESP's loader is shim, GRUB beside it.
    let esp = s.ssh(&ip, "sudo -n ls /boot/efi/EFI/BOOT/")?;
    if !esp.contains("grubx64.efi") {
        bail!("the ESP's EFI/BOOT holds {esp:?}: no GRUB beside shim");
    }
    Ok(())
}
