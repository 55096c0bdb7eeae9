//! UEFI HTTP boot with no PXE and no TFTP: OVMF with its PXE switched off and no iPXE ROM
//! on the NIC has HTTP boot as its only network boot. Stork's DHCP answers its `HTTPClient`
//! request with an `http://` URL for `snponly.efi` (and option 60 `HTTPClient`), the firmware
//! fetches it over HTTP, iPXE asks DHCP again and takes its script over HTTP. The machine,
//! powered through its BMC, enlists with UEFI firmware, commissions and deploys into memory
//! to Deployed; SSH reads the hostname asked for. Stork's TFTP sees no request at all.
//!
//! (Firmware PXE with TFTP is `deploy_uefi.rs`'s path: that test fetches `snponly.efi` over
//! TFTP at each of its network boots.)

use anyhow::{Result, bail};
use stork_lab::Firmware;
use stork_proto::inventory::Firmware as RecordedFirmware;
use stork_tests::deploy::{Scenario, os_machine};
use stork_tests::require_boot_files;

const MAC: &str = "52:54:00:77:00:e1";
const HOSTNAME: &str = "stork-e2e-http";
/// What OVMF's boot manager prints when it starts each kind of network boot option.
const HTTP_BOOT: &str = "Start HTTP Boot over IPv4";
const PXE_BOOT: &str = "Start PXE over IPv4";

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn ovmf_without_pxe_http_boots_enlists_commissions_and_deploys_in_memory() {
    require_boot_files(&["snponly.efi"]);
    let spec = os_machine("uefi1", MAC, Firmware::UefiHttp, 1 << 30);
    let mut s = Scenario::new("uefi-http", spec, None).unwrap();
    if let Err(e) = run(&mut s) {
        s.fail(e);
    }
    eprintln!("phases (OVMF, UEFI HTTP boot, in memory):\n{}", s.timings());
}

fn run(s: &mut Scenario) -> Result<()> {
    let id = s.add_and_enlist()?;
    let firmware = s.status(&id)?.inventory.map(|i| i.firmware);
    if firmware != Some(RecordedFirmware::Uefi) {
        bail!("firmware recorded as {firmware:?}");
    }
    s.commission(&id)?;
    s.deploy_in_memory_and_log_in(&id, HOSTNAME)?;

    // Every network boot was an HTTP boot: the console (OVMF writes to the serial port)
    // shows one per power-on (enlist, commission, deploy) and no PXE, and the TFTP server
    // never heard from the machine.
    let console = s.console()?;
    let http_boots = console.matches(HTTP_BOOT).count();
    if http_boots < 3 {
        bail!("{http_boots} HTTP boots on the console, wanted one per network boot (3)");
    }
    if console.contains(PXE_BOOT) {
        bail!("the console shows a PXE boot ({PXE_BOOT:?}) with PXE switched off");
    }
    s.check_no_tftp()
}
