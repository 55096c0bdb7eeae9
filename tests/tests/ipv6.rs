//! An IPv6-only provisioning network: the appliance's interface has `fd77::1/64` and no IPv4
//! address; DHCPv4 is off. Router advertisements carry the managed flag, DHCPv6 leases
//! addresses and hands network-boot clients their boot file URL (RFC 5970), and every file
//! after it comes over HTTP on `[fd77::1]:8080`; the agent calls the API over HTTPS on
//! `[fd77::1]:8443`.
//!
//! - An iPXE machine (SeaBIOS with QEMU's iPXE ROM) boots, enlists, commissions and deploys
//!   Debian to its disk; the installed OS asks DHCPv6 for its address (one MAC keeps one
//!   address: the token's), phones home over IPv6 (Deployed), and SSH reads its hostname.
//! - A UEFI machine (OVMF, its IPv6 PXE on) boots `snponly.efi` over TFTP on IPv6, then
//!   iPXE's script over HTTP, enlists, commissions and deploys into memory to Deployed.
//!
//! - A UEFI machine with PXE off (OVMF's HTTP boot only) takes a DHCPv6 lease with the boot
//!   URL (option 59, vendor class `HTTPClient`), is sent the appliance as its router
//!   (`dhcp::ra::router_hint`: EDK2 has no route to an on-link server otherwise), fetches
//!   `snponly.efi` by UEFI HTTP boot over IPv6 and enlists.
//!
//! The three run side by side (three tests, three labs). `dhcp6.rs` proves the lease file's
//! durability against `kill -9` with `dhclient -6`.

use anyhow::{Result, bail};
use stork_lab::Firmware;
use stork_tests::deploy::{Scenario, deploy_to_disk_and_log_in, os_machine};
use stork_tests::require_boot_files;

/// DHCPv4 off, DHCPv6 leasing on the embedded default's IPv6 network.
const CONFIG: &str = "[dhcp]\nmode = \"off\"\n\n[dhcp6]\nmode = \"full\"\n";

/// Checks the agent booted with an IPv6 address from `[dhcp6] range` and the appliance's
/// IPv6 URLs, as its console shows its command line.
fn booted_over_ipv6(s: &Scenario) -> Result<String> {
    let ip = s.leased_ip()?;
    if !ip.starts_with("fd77::1") {
        bail!("the agent's address is {ip}, not one of [dhcp6] range");
    }
    let console = s.console()?;
    if !console.contains("url=http://[fd77::1]:8080") {
        bail!("the agent's command line does not name the appliance by its IPv6 address");
    }
    Ok(ip)
}

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn ipxe_vm_on_an_ipv6_only_network_deploys_to_disk_and_phones_home_over_ipv6() {
    let spec = os_machine("v6bios", "52:54:00:77:06:01", Firmware::Bios, 4 << 30);
    let mut s = Scenario::ipv6_only("ipv6-ipxe", spec, CONFIG).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        booted_over_ipv6(&s)?;
        s.commission(&id)?;
        let ip = deploy_to_disk_and_log_in(&mut s, &id, "stork-e2e-v6-disk", false)?;
        s.say(&format!("deployed OS at {ip} over IPv6"));
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!(
        "phases (SeaBIOS iPXE, IPv6 only, to disk):\n{}",
        s.timings()
    );
}

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn uefi_vm_on_an_ipv6_only_network_pxe_boots_over_ipv6_and_deploys_in_memory() {
    require_boot_files(&["snponly.efi"]);
    let spec = os_machine("v6uefi", "52:54:00:77:06:02", Firmware::UefiIpv6, 1 << 30);
    let mut s = Scenario::ipv6_only("ipv6-uefi", spec, CONFIG).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        booted_over_ipv6(&s)?;
        s.commission(&id)?;
        s.deploy_in_memory_and_log_in(&id, "stork-e2e-v6-mem")?;
        let stats = s.appliance.stats()?;
        if stats.counter("tftp", "requests").unwrap_or(0) == 0 {
            bail!("OVMF's IPv6 PXE fetched nothing over TFTP: {stats:#?}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (OVMF PXE over IPv6, in memory):\n{}", s.timings());
}

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn uefi_vm_with_pxe_off_http_boots_over_ipv6_and_enlists() {
    require_boot_files(&["snponly.efi"]);
    let spec = os_machine(
        "v6http",
        "52:54:00:77:06:03",
        Firmware::UefiHttpIpv6,
        1 << 30,
    );
    let mut s = Scenario::ipv6_only("ipv6-http", spec, CONFIG).unwrap();
    let result = (|| -> Result<()> {
        s.add_and_enlist()?;
        booted_over_ipv6(&s)?;
        let console = s.console()?;
        if !console.contains("Start HTTP Boot over IPv6") || console.contains("Start PXE") {
            bail!("the firmware did not boot by UEFI HTTP boot over IPv6 alone");
        }
        // The firmware itself fetched iPXE over IPv6 (its console names the URL it took).
        if !console.contains("URI: http://[fd77::1]:8080/boot/snponly.efi") {
            bail!("the firmware did not take the IPv6 boot URL");
        }
        s.check_no_tftp()
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (OVMF HTTP boot over IPv6):\n{}", s.timings());
}
