//! The installed disk's UEFI boot entry, made with `efibootmgr` from the ephemeral root.
//!
//! The raw image already carries GRUB for both firmwares (the BIOS boot partition and the
//! ESP's removable-media path `\EFI\BOOT\BOOTX64.EFI`), so a UEFI machine boots it even with
//! no entry. The entry exists so the installed OS starts without a detour through the network:
//! it becomes `BootNext` (the very next boot, once) and goes *first* in `BootOrder`, ahead of
//! network boot and the EFI shell. Behind network boot, every local boot of a machine whose NIC
//! has a ROM went through that ROM, the firmware's PXE and its HTTP boot first (about 24 s
//! under TCG with an e1000e), each answered `exit` by the appliance.
//!
//! First is safe because Stork never relies on the firmware's order to get a machine back on
//! the network: every status that needs the agent (commission, deploy, release with erase)
//! runs `NetbootAndPowerOn`, which sets the BMC's next boot device to PXE for one boot (IPMI
//! Set System Boot Options, Redfish `BootSourceOverrideTarget: Pxe` once) before it powers the
//! machine on or cycles it. A release without erase only powers off. The appliance's `exit`
//! for a deployed machine stays the fallback when `BootNext` cannot be set.
//!
//! QEMU's OVMF rewrites `BootOrder` at every boot from QEMU's `bootorder` fw_cfg file (the
//! devices' `bootindex`; EDK2 `OvmfPkg/Library/QemuBootOrderLib`): per device it keeps the
//! first option, in the old order, that lies on it (a short `HD()` path is expanded to find
//! out), appends options that start with neither `PciRoot()` nor `HD()`, and deletes the rest.
//! So in the lab the NIC (bootindex 1 when the BMC says PXE) is first again after one boot,
//! which is why a release there still network-boots; our entry survives that rewrite because
//! it comes before the firmware's own entry for the disk. `BootNext` is read before the
//! rewrite (EDK2 `BdsEntry.c` caches it), so the first boot after the install takes the disk.
//! Writing EFI variables by hand would mean encoding device paths: the ephemeral image ships
//! `efibootmgr` for this.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};

const EFI: &str = "/sys/firmware/efi";
const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// The loader every image of ours has on its ESP (the removable-media path).
const LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

/// What [`add_boot_entry`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No `efibootmgr` (the agent runs from the initrd alone).
    NoTool,
    /// The new entry's number, the boot order it left, and what became of `BootNext`.
    Added {
        entry: String,
        order: String,
        next: BootNext,
    },
}

/// Whether the next boot takes the new entry directly.
#[derive(Debug, PartialEq, Eq)]
pub enum BootNext {
    /// `BootNext` names the new entry (read back from efibootmgr's listing).
    Set,
    /// Why it could not be set; the entry still leads `BootOrder`, and the appliance's `exit`
    /// covers firmware that puts the network first anyway.
    Failed(String),
}

pub fn is_uefi() -> bool {
    Path::new(EFI).is_dir()
}

/// Replaces any entry labelled `label` with one for `disk`'s partition `part`, on a machine
/// booted by UEFI ([`is_uefi`]).
pub fn add_boot_entry(disk: &Path, part: u32, label: &str) -> Result<Outcome> {
    if which("efibootmgr").is_none() {
        return Ok(Outcome::NoTool);
    }
    mount_efivars()?;
    let before = efibootmgr(&[])?;
    let old = parse(&before);
    for (num, _) in old.entries.iter().filter(|(_, l)| l == label) {
        efibootmgr(&["--bootnum", num, "--delete-bootnum"])?;
    }
    let disk_arg = disk.to_string_lossy();
    let part_arg = part.to_string();
    let after = efibootmgr(&[
        "--create", "--disk", &disk_arg, "--part", &part_arg, "--label", label, "--loader", LOADER,
    ])?;
    let new = parse(&after);
    let entry = new
        .entries
        .iter()
        .find(|(num, l)| l == label && !old.entries.iter().any(|(n, _)| n == num))
        .map(|(n, _)| n.clone())
        .context("efibootmgr created no entry with our label")?;
    // --create already puts the new entry first; saying so keeps a re-run idempotent and
    // reports the order we asked for.
    let order = entry_first(&new.order, &entry).join(",");
    efibootmgr(&["--bootorder", &order])?;
    let next = match efibootmgr(&["--bootnext", &entry]) {
        Ok(listing) => match parse(&listing).next {
            Some(n) if n == entry => BootNext::Set,
            other => BootNext::Failed(format!("efibootmgr left BootNext at {other:?}")),
        },
        Err(e) => BootNext::Failed(format!("{e:#}")),
    };
    Ok(Outcome::Added { entry, order, next })
}

/// `order` with `entry` moved (or added) to the front, everything else kept in its order.
fn entry_first(order: &[String], entry: &str) -> Vec<String> {
    std::iter::once(entry.to_string())
        .chain(order.iter().filter(|n| *n != entry).cloned())
        .collect()
}

pub fn mount_efivars() -> Result<()> {
    if crate::mounts::is_mount_point(Path::new(EFIVARS))? {
        return Ok(());
    }
    mount(
        Some("efivarfs"),
        EFIVARS,
        Some("efivarfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("mount efivarfs on {EFIVARS} (is the efivarfs module loaded?)"))
}

fn efibootmgr(args: &[&str]) -> Result<String> {
    let out = Command::new("efibootmgr")
        .args(args)
        .output()
        .context("run efibootmgr")?;
    if !out.status.success() {
        bail!(
            "efibootmgr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `efibootmgr`'s listing: `BootNext: 0003`, `BootOrder: 0001,0000` and
/// `Boot0001* label<TAB>device path`.
#[derive(Debug, Default, PartialEq)]
struct Listing {
    next: Option<String>,
    order: Vec<String>,
    entries: Vec<(String, String)>,
}

fn parse(text: &str) -> Listing {
    let mut l = Listing::default();
    for line in text.lines() {
        if let Some(next) = line.strip_prefix("BootNext:") {
            l.next = Some(next.trim().to_string()).filter(|n| !n.is_empty());
        } else if let Some(order) = line.strip_prefix("BootOrder:") {
            l.order = order
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
        } else if let Some(rest) = line.strip_prefix("Boot")
            && rest.len() > 4
            && rest.as_bytes()[..4].iter().all(u8::is_ascii_hexdigit)
        {
            let num = rest[..4].to_string();
            let label = rest[4..].trim_start_matches('*').trim_start();
            // The device path follows a tab (efibootmgr 17) or is absent (-q/older).
            let label = label.split('\t').next().unwrap_or_default().trim();
            l.entries.push((num, label.to_string()));
        }
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_order_and_labels() {
        let text = "BootCurrent: 0001\nTimeout: 0 seconds\nBootOrder: 0001,0000,0003\n\
                    Boot0000* UiApp\tFvVol(7cb8bdc9)/FvFile(462caa21)\n\
                    Boot0001* UEFI PXEv4 (MAC:525400770101)\tPciRoot(0x0)/Pci(0x3,0x0)\n\
                    Boot0003* debian-bookworm (Stork)\tHD(2,GPT,ab,0x800,0x32000)/File(\\EFI\\BOOT\\BOOTX64.EFI)\n";
        let l = parse(text);
        assert_eq!(l.order, ["0001", "0000", "0003"]);
        assert_eq!(
            l.entries,
            [
                ("0000".to_string(), "UiApp".to_string()),
                (
                    "0001".to_string(),
                    "UEFI PXEv4 (MAC:525400770101)".to_string()
                ),
                ("0003".to_string(), "debian-bookworm (Stork)".to_string()),
            ]
        );
    }

    #[test]
    fn ignores_lines_that_only_look_like_entries() {
        let l = parse("BootCurrent: 0001\nBootNext: 0002\nBootOrder:\n");
        assert!(l.order.is_empty());
        assert!(l.entries.is_empty());
    }

    #[test]
    fn parses_boot_next() {
        let text = "BootNext: 0004\nBootCurrent: 0001\nTimeout: 0 seconds\n\
                    BootOrder: 0004,0001,0000\n\
                    Boot0004* Stork: installed OS\tHD(1,GPT,ab,0x800,0x32000)/File(\\EFI\\BOOT\\BOOTX64.EFI)\n";
        let l = parse(text);
        assert_eq!(l.next.as_deref(), Some("0004"));
        assert_eq!(l.order, ["0004", "0001", "0000"]);
        assert_eq!(parse("BootCurrent: 0001\nBootOrder: 0001\n").next, None);
        assert_eq!(parse("BootNext: \n").next, None);
    }

    fn nums(order: &[&str]) -> Vec<String> {
        order.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn entry_goes_first_ahead_of_network_and_shell() {
        // OVMF's order after a network boot: NIC, EFI shell, UiApp; --create put ours first.
        let old = nums(&["0003", "0001", "0002", "0000"]);
        assert_eq!(
            entry_first(&old, "0003"),
            nums(&["0003", "0001", "0002", "0000"])
        );
        // Firmware that appended it (or a BootOrder rewritten since) still gets it first.
        let old = nums(&["0001", "0002", "0000", "0003"]);
        assert_eq!(
            entry_first(&old, "0003"),
            nums(&["0003", "0001", "0002", "0000"])
        );
        // Not in the order at all (efibootmgr may leave it out): added, nothing lost.
        assert_eq!(
            entry_first(&nums(&["0001"]), "0004"),
            nums(&["0004", "0001"])
        );
        assert_eq!(entry_first(&[], "0004"), nums(&["0004"]));
        // The entry listed twice comes out once.
        let old = nums(&["0001", "0004", "0004"]);
        assert_eq!(entry_first(&old, "0004"), nums(&["0004", "0001"]));
    }
}
