//! The appliance image in the rootless lab: a copy of the image `cargo xtask test` built,
//! booted as a QEMU VM whose API the host reaches through a forwarded port of 127.0.0.1, with
//! the console as the person at the box sees it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use stork_client::Client;
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

/// What `stork-image appliance` writes beside the image.
#[derive(Debug, Deserialize)]
pub struct Described {
    pub sha256: String,
    pub version: String,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Deserialize)]
pub struct PartitionInfo {
    pub number: u32,
    pub name: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Described {
    pub fn load(image: &Path) -> Result<Self> {
        let path = image.with_extension("json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Byte offset and length of the partition named `name`.
    pub fn extent(&self, name: &str) -> Result<(u64, u64)> {
        let p = self
            .partitions
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no partition {name} in the image"))?;
        Ok((p.first_lba * 512, (p.last_lba - p.first_lba + 1) * 512))
    }
}

/// A copy of `image` at `disk`, `bytes` long (larger than the image, as a stick or disk is).
pub fn copy_image(image: &Path, disk: &Path, bytes: u64) -> Result<()> {
    stork_lab::run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(image)
            .arg(disk),
    )?;
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    f.set_len(bytes)?;
    Ok(())
}

/// Copies `file` to `name` on the FAT partition at `offset` of `disk`, as a person does from
/// a laptop.
pub fn put_on_fat(disk: &Path, offset: u64, file: &Path, name: &str) -> Result<()> {
    stork_lab::run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-o")
            .arg("-i")
            .arg(format!("{}@@{offset}", disk.display()))
            .arg(file)
            .arg(format!("::/{name}")),
    )?;
    Ok(())
}

/// A file from the FAT partition at `offset` of `disk`.
pub fn read_from_fat(disk: &Path, offset: u64, name: &str) -> Result<String> {
    stork_lab::run(
        Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@{offset}", disk.display()))
            .arg(format!("::/{name}")),
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
    wait_for(
        &format!("{marker:?} on the console of {}", vm.spec.name),
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
            Ok((text.matches(marker).count() >= count).then_some(text))
        },
    )
}

/// What the appliance printed on its console: the fingerprint of the last notice, and the
/// admin token if a notice showed one.
pub struct Notice {
    pub fingerprint: Fingerprint,
    pub token: Option<String>,
}

impl Notice {
    pub fn parse(console: &str) -> Result<Self> {
        let word = |prefix: &str, len: usize| {
            console
                .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
                .rfind(|w| w.starts_with(prefix) && w.len() == prefix.len() + len)
                .map(str::to_string)
        };
        let fp = word("sha256:", 64).context("no sha256: fingerprint on the console")?;
        Ok(Self {
            fingerprint: fp.parse().context("the console's fingerprint")?,
            token: word("stork_admin_", 64),
        })
    }
}

/// A client of the appliance's API through the forwarded port, pinning the certificate whose
/// fingerprint the console showed.
pub fn client(port: u16, fingerprint: &Fingerprint, token: &str) -> Client {
    Client::with_trust(
        &format!("https://127.0.0.1:{port}"),
        Some(token.to_string()),
        Some(Trust::Pinned(*fingerprint)),
    )
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
