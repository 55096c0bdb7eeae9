//! The appliance image in the rootless lab: a copy of the image `cargo xtask test` built,
//! booted as a QEMU VM whose API the host reaches through a forwarded port of 127.0.0.1, with
//! the console as the person at the box sees it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_client::Client;
pub use stork_lab::appliance_image::{
    Described, Notice, PartitionInfo, copy_image, put_on_fat, read_from_fat,
};
use stork_lab::rootless::{RootlessLab, RootlessVm, RootlessVmSpec};
use stork_lab::wait_for;
use stork_tls::{Fingerprint, Trust};

/// The image `cargo xtask test` built (`STORK_APPLIANCE_IMAGE`).
pub fn image() -> PathBuf {
    crate::from_env(
        "STORK_APPLIANCE_IMAGE",
        "target/stork/appliance/stork-appliance.raw",
    )
}

/// The console so far (firmware writes bytes that are not UTF-8).
pub fn console(vm: &RootlessVm) -> String {
    std::fs::read(&vm.paths.console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Waits until the console shows `marker` `count` times in all (boots append); returns the
/// console. Fails early when QEMU exits.
pub fn wait_console(
    vm: &mut RootlessVm,
    marker: &str,
    count: usize,
    timeout: Duration,
) -> Result<String> {
    wait_until(vm, &format!("{marker:?}"), timeout, |text| {
        text.matches(marker).count() >= count
    })
}

/// Waits until `done` holds for the console; returns the console. Fails early when QEMU
/// exits.
fn wait_until(
    vm: &mut RootlessVm,
    what: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    wait_for(
        &format!("{what} on the console of {}", vm.spec.name),
        timeout,
        Duration::from_millis(500),
        || {
            if let Some(status) = vm.exited() {
                bail!(
                    "QEMU of {} exited ({status}); console:\n{}",
                    vm.spec.name,
                    vm.console_tail(40)
                );
            }
            let text = console(vm);
            Ok(done(&text).then_some(text))
        },
    )
}

/// Waits until the console shows `count` whole notices (boots append; the serial console
/// prints a notice a line at a time); returns the console.
pub fn wait_notice(vm: &mut RootlessVm, count: usize, timeout: Duration) -> Result<String> {
    wait_until(
        vm,
        &format!("notice {count} on the console"),
        timeout,
        |text| Notice::all(text).len() >= count,
    )
}

/// A client of the appliance's API through the forwarded port, pinning the certificate whose
/// fingerprint the console showed.
pub fn client(port: u16, fingerprint: &str, token: &str) -> Result<Client> {
    let fingerprint: Fingerprint = fingerprint.parse().context("the console's fingerprint")?;
    Ok(Client::with_trust(
        &format!("https://127.0.0.1:{port}"),
        Some(token.to_string()),
        Some(Trust::Pinned(fingerprint)),
    ))
}

/// Waits until the API answers its health check.
pub fn wait_api(client: &Client, vm: &mut RootlessVm, timeout: Duration) -> Result<()> {
    wait_for(
        "the appliance's API through the forwarded port",
        timeout,
        Duration::from_secs(1),
        || {
            if let Some(status) = vm.exited() {
                bail!("the appliance VM exited ({status})");
            }
            Ok(client.health().ok().map(|_| ()))
        },
    )
}

/// A lab whose socket path stays short (unix sockets take 107 bytes).
pub fn lab(tag: &str) -> Result<RootlessLab> {
    RootlessLab::new(tag, &crate::lab_dir())
}

/// The appliance VM's spec: 2 GiB, 2 CPUs, QEMU resets on a guest reboot (a restart of the
/// appliance is a reboot of the box).
pub fn appliance_spec(name: &str, mac: &str) -> RootlessVmSpec {
    let mut spec = RootlessVmSpec::new(name, mac);
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.guest_reboot = stork_lab::vm::GuestReboot::Reset;
    spec.boot_first = stork_lab::vm::BootFirst::Disk;
    spec
}
