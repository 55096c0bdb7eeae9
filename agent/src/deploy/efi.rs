//! The installed disk's UEFI boot entry, made with `efibootmgr` from the ephemeral root.
//!
//! The raw image already carries GRUB for both firmwares (the BIOS boot partition and the
//! ESP's removable-media path `\EFI\BOOT\BOOTX64.EFI`), so a UEFI machine boots it even with
//! no entry; the entry names the disk so the firmware's boot menu and `efibootmgr` in the
//! installed OS show what Stork installed. It goes *last* in `BootOrder`: network boot stays
//! first, and the appliance's boot script decides (`exit` to the disk once deployed), as
//! MAAS does. Writing EFI variables by hand would mean encoding device paths: the ephemeral
//! image ships `efibootmgr` for this.

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
    /// The new entry's number and the boot order it left.
    Added { entry: String, order: String },
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
    // --create puts the new entry first; network boot must stay ahead of it.
    let mut order: Vec<String> = new.order.into_iter().filter(|n| *n != entry).collect();
    order.push(entry.clone());
    let order = order.join(",");
    efibootmgr(&["--bootorder", &order])?;
    Ok(Outcome::Added { entry, order })
}

fn mount_efivars() -> Result<()> {
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

/// `efibootmgr`'s listing: `BootOrder: 0001,0000` and `Boot0001* label<TAB>device path`.
#[derive(Debug, Default, PartialEq)]
struct Listing {
    order: Vec<String>,
    entries: Vec<(String, String)>,
}

fn parse(text: &str) -> Listing {
    let mut l = Listing::default();
    for line in text.lines() {
        if let Some(order) = line.strip_prefix("BootOrder:") {
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
}
