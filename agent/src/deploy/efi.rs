//! The installed disk's UEFI boot entry, written by the agent itself through efivarfs.
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
//!
//! The variables are written here rather than by `efibootmgr` so that a raw deploy needs no
//! tool of the ephemeral root and the appliance can skip fetching it (issue 18): a load
//! option is a short, fixed structure (UEFI 2.10 section 3.1.3, `EFI_LOAD_OPTION`) whose
//! device path is the same short form `efibootmgr --create` writes, `HD(...)/File(...)`
//! (UEFI 2.10 sections 10.3.5.1 and 10.3.5.4). The kernel checks a `Boot####` variable's
//! structure before it passes it to the firmware (`efivar_validate`, `validate_load_option`).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};

const EFI: &str = "/sys/firmware/efi";
const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// The loader every image of ours has on its ESP (the removable-media path).
const LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";
/// `EFI_GLOBAL_VARIABLE`, the vendor of `Boot####`, `BootOrder` and `BootNext`.
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// Non-volatile, boot-service and runtime access: what the boot manager's variables carry.
const ATTRIBUTES: u32 = 0x7;
/// `LOAD_OPTION_ACTIVE`.
const ACTIVE: u32 = 0x1;
/// The sector size the GPT is read with (`BlockDevice` reads it the same way).
const SECTOR: u64 = 512;

/// What [`add_boot_entry`] did: the new entry's number, the boot order it left, and what
/// became of `BootNext`.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub entry: String,
    pub order: String,
    pub next: BootNext,
}

/// Whether the next boot takes the new entry directly.
#[derive(Debug, PartialEq, Eq)]
pub enum BootNext {
    /// `BootNext` names the new entry (read back from efivarfs).
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
    mount_efivars()?;
    let hd = HardDrive::read(disk, part)?;
    Vars::new(EFIVARS).add_entry(&load_option(label, &hd, LOADER), label)
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

/// The partition a `HD()` device-path node names: its number, where it lies (in sectors)
/// and its GPT unique GUID, as stored on disk (mixed-endian, as the node wants it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HardDrive {
    number: u32,
    start: u64,
    size: u64,
    guid: [u8; 16],
}

impl HardDrive {
    fn read(disk: &Path, number: u32) -> Result<Self> {
        let mut f =
            std::fs::File::open(disk).with_context(|| format!("open {}", disk.display()))?;
        let gpt = gptman::GPT::read_from(&mut f, SECTOR)
            .with_context(|| format!("read the GPT of {}", disk.display()))?;
        let p = gpt
            .iter()
            .find(|(i, p)| *i == number && p.is_used())
            .map(|(_, p)| p)
            .with_context(|| format!("{} has no partition {number}", disk.display()))?;
        Ok(Self {
            number,
            start: p.starting_lba,
            size: p.ending_lba + 1 - p.starting_lba,
            guid: p.unique_partition_guid,
        })
    }
}

/// An `EFI_LOAD_OPTION`: active, `label`, and the device path `HD(hd)/File(loader)/End`.
fn load_option(label: &str, hd: &HardDrive, loader: &str) -> Vec<u8> {
    let mut path = Vec::new();
    // Media device path (4), hard drive (1), 42 bytes; GPT (2) with a GUID signature (2).
    path.extend_from_slice(&[4, 1]);
    path.extend_from_slice(&42u16.to_le_bytes());
    path.extend_from_slice(&hd.number.to_le_bytes());
    path.extend_from_slice(&hd.start.to_le_bytes());
    path.extend_from_slice(&hd.size.to_le_bytes());
    path.extend_from_slice(&hd.guid);
    path.extend_from_slice(&[2, 2]);
    // Media device path (4), file path (4): the name in UCS-2 with its NUL.
    let name = ucs2(loader);
    path.extend_from_slice(&[4, 4]);
    path.extend_from_slice(
        &u16::try_from(4 + name.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    path.extend_from_slice(&name);
    // End of the entire device path.
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);

    let mut option = Vec::new();
    option.extend_from_slice(&ACTIVE.to_le_bytes());
    option.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_le_bytes());
    option.extend_from_slice(&ucs2(label));
    option.extend_from_slice(&path);
    option
}

/// `text` as NUL-terminated UCS-2, little-endian.
fn ucs2(text: &str) -> Vec<u8> {
    text.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// A load option's description (after its attributes and path length), if well formed.
fn description(option: &[u8]) -> Option<String> {
    let units: Vec<u16> = option
        .get(6..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// The boot manager's variables in an efivarfs directory: each file is the variable's
/// attributes (4 bytes) and then its value, written in one `write`.
struct Vars {
    dir: PathBuf,
}

impl Vars {
    fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{GLOBAL}"))
    }

    /// The variable's value, `None` when it does not exist.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(data) if data.len() >= 4 => Ok(Some(data[4..].to_vec())),
            Ok(_) => bail!("{}: shorter than its attributes", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    fn set(&self, name: &str, value: &[u8]) -> Result<()> {
        let path = self.path(name);
        mutable(&path)?;
        let mut data = ATTRIBUTES.to_le_bytes().to_vec();
        data.extend_from_slice(value);
        // No O_TRUNC: efivarfs cannot truncate, and a write replaces the whole variable (the
        // tests' plain files rewrite a variable only with a value of the same length).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let n = f
            .write(&data)
            .with_context(|| format!("write {}", path.display()))?;
        if n != data.len() {
            bail!("{}: wrote {n} of {} bytes", path.display(), data.len());
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        mutable(&path)?;
        std::fs::remove_file(&path).with_context(|| format!("delete {}", path.display()))
    }

    /// The `Boot####` entries: number (four upper-case hex digits) and description.
    fn entries(&self) -> Result<Vec<(String, String)>> {
        let suffix = format!("-{GLOBAL}");
        let mut entries = Vec::new();
        let dir =
            std::fs::read_dir(&self.dir).with_context(|| format!("list {}", self.dir.display()))?;
        for e in dir {
            let name = e?.file_name().to_string_lossy().into_owned();
            let Some(num) = name
                .strip_suffix(&suffix)
                .and_then(|n| n.strip_prefix("Boot"))
                .filter(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            else {
                continue;
            };
            let label = self
                .get(&format!("Boot{num}"))?
                .and_then(|o| description(&o))
                .unwrap_or_default();
            entries.push((num.to_ascii_uppercase(), label));
        }
        entries.sort();
        Ok(entries)
    }

    fn order(&self) -> Result<Vec<String>> {
        Ok(self
            .get("BootOrder")?
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| format!("{:04X}", u16::from_le_bytes([c[0], c[1]])))
            .collect())
    }

    /// Replaces the entries labelled `label` with `option`, puts it first in `BootOrder` and
    /// makes it `BootNext`.
    fn add_entry(&self, option: &[u8], label: &str) -> Result<Outcome> {
        let old = self.entries()?;
        for (num, _) in old.iter().filter(|(_, l)| l == label) {
            self.delete(&format!("Boot{num}"))?;
        }
        let taken: Vec<&str> = old
            .iter()
            .filter(|(_, l)| l != label)
            .map(|(n, _)| n.as_str())
            .collect();
        let entry = (0..=u16::MAX)
            .map(|n| format!("{n:04X}"))
            .find(|n| !taken.contains(&n.as_str()))
            .context("no free Boot#### number")?;
        self.set(&format!("Boot{entry}"), option)?;
        let order: Vec<String> = entry_first(&self.order()?, &entry)
            .into_iter()
            // An entry just deleted leaves the order with it.
            .filter(|n| *n == entry || taken.contains(&n.as_str()))
            .collect();
        self.set("BootOrder", &numbers(&order))?;
        let next = match self.set("BootNext", &numbers(std::slice::from_ref(&entry))) {
            Ok(()) => match self.get("BootNext") {
                Ok(Some(v)) if v == numbers(std::slice::from_ref(&entry)) => BootNext::Set,
                other => BootNext::Failed(format!("BootNext reads back as {other:?}")),
            },
            Err(e) => BootNext::Failed(format!("{e:#}")),
        };
        Ok(Outcome {
            entry,
            order: order.join(","),
            next,
        })
    }
}

/// `order`'s numbers as the variable holds them: UINT16 each, little-endian.
fn numbers(order: &[String]) -> Vec<u8> {
    order
        .iter()
        .filter_map(|n| u16::from_str_radix(n, 16).ok())
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// `order` with `entry` moved (or added) to the front, everything else kept in its order.
fn entry_first(order: &[String], entry: &str) -> Vec<String> {
    std::iter::once(entry.to_string())
        .chain(order.iter().filter(|n| *n != entry).cloned())
        .collect()
}

mod ioctl {
    // FS_IOC_GETFLAGS / FS_IOC_SETFLAGS = _IOR/_IOW('f', 1/2, long); the kernel moves an int
    // (`<linux/fs.h>`), hence the "bad" forms with the long's size in the number.
    nix::ioctl_read_bad!(
        get_flags,
        nix::request_code_read!(b'f', 1, std::mem::size_of::<libc::c_long>()),
        libc::c_int
    );
    nix::ioctl_write_ptr_bad!(
        set_flags,
        nix::request_code_write!(b'f', 2, std::mem::size_of::<libc::c_long>()),
        libc::c_int
    );
}

/// efivarfs makes most variables immutable so that `rm -rf` cannot brick a machine: the flag
/// is cleared before a variable is rewritten or deleted. A missing file or a file system
/// without the flags (tests) needs nothing.
fn mutable(path: &Path) -> Result<()> {
    const IMMUTABLE: libc::c_int = 0x10;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let mut flags: libc::c_int = 0;
    // SAFETY: the fd is open for the call's length and `flags` outlives it.
    match unsafe { ioctl::get_flags(f.as_raw_fd(), &mut flags) } {
        Ok(_) => {}
        Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("flags of {}", path.display())),
    }
    if flags & IMMUTABLE != 0 {
        let cleared = flags & !IMMUTABLE;
        // SAFETY: as above; `cleared` outlives the call.
        unsafe { ioctl::set_flags(f.as_raw_fd(), &cleared) }
            .with_context(|| format!("clear the immutable flag of {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hd() -> HardDrive {
        let mut guid = [0u8; 16];
        guid.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        HardDrive {
            number: 2,
            start: 0x800,
            size: 0x32000,
            guid,
        }
    }

    #[test]
    fn a_load_option_is_active_labelled_and_points_at_the_loader_on_the_partition() {
        let o = load_option("Stork: installed OS", &hd(), LOADER);
        assert_eq!(&o[..4], &ACTIVE.to_le_bytes());
        assert_eq!(description(&o).as_deref(), Some("Stork: installed OS"));
        let path_len = usize::from(u16::from_le_bytes([o[4], o[5]]));
        let label_len = ucs2("Stork: installed OS").len();
        // Attributes, the path's length, the label, the path: nothing else.
        assert_eq!(o.len(), 6 + label_len + path_len);
        let path = &o[6 + label_len..];
        // HD(2,GPT,<guid>,0x800,0x32000): 42 bytes.
        assert_eq!(&path[..4], &[4, 1, 42, 0]);
        assert_eq!(&path[4..8], &2u32.to_le_bytes());
        assert_eq!(&path[8..16], &0x800u64.to_le_bytes());
        assert_eq!(&path[16..24], &0x32000u64.to_le_bytes());
        assert_eq!(&path[24..40], &hd().guid);
        assert_eq!(&path[40..42], &[2, 2]);
        // File(\EFI\BOOT\BOOTX64.EFI): 21 characters and the NUL, in UCS-2.
        let file = &path[42..];
        assert_eq!(&file[..4], &[4, 4, 4 + 22 * 2, 0]);
        assert_eq!(&file[4..4 + 22 * 2], ucs2(LOADER).as_slice());
        assert_eq!(&file[4 + 22 * 2..], &[0x7f, 0xff, 4, 0]);
    }

    fn var(dir: &Path, name: &str, value: &[u8]) {
        let mut data = ATTRIBUTES.to_le_bytes().to_vec();
        data.extend_from_slice(value);
        std::fs::write(dir.join(format!("{name}-{GLOBAL}")), data).unwrap();
    }

    fn option(label: &str) -> Vec<u8> {
        load_option(label, &hd(), LOADER)
    }

    #[test]
    fn a_new_entry_replaces_ours_goes_first_and_is_the_next_boot() {
        let d = tempfile::tempdir().unwrap();
        // OVMF after a network boot, with an entry of an earlier deploy (0001).
        var(d.path(), "Boot0000", &option("UiApp"));
        var(d.path(), "Boot0001", &option("Stork: installed OS"));
        var(
            d.path(),
            "Boot0002",
            &option("UEFI PXEv4 (MAC:525400770101)"),
        );
        var(d.path(), "BootOrder", &[2, 0, 1, 0, 0, 0]);
        // Another vendor's variable of the same name is not ours.
        std::fs::write(
            d.path()
                .join("Boot0003-00000000-0000-0000-0000-000000000000"),
            b"x",
        )
        .unwrap();
        let vars = Vars::new(d.path());
        let out = vars
            .add_entry(&option("Stork: installed OS"), "Stork: installed OS")
            .unwrap();
        assert_eq!(
            out,
            Outcome {
                entry: "0001".into(),
                order: "0001,0002,0000".into(),
                next: BootNext::Set,
            }
        );
        assert_eq!(vars.order().unwrap(), ["0001", "0002", "0000"]);
        assert_eq!(vars.get("BootNext").unwrap(), Some(vec![1, 0]));
        let labels: Vec<String> = vars.entries().unwrap().into_iter().map(|e| e.1).collect();
        assert_eq!(
            labels,
            [
                "UiApp",
                "Stork: installed OS",
                "UEFI PXEv4 (MAC:525400770101)"
            ]
        );
        // Attributes first, then the option, as efivarfs wants the write.
        let raw = std::fs::read(d.path().join(format!("Boot0001-{GLOBAL}"))).unwrap();
        assert_eq!(&raw[..4], &ATTRIBUTES.to_le_bytes());
        assert_eq!(&raw[4..], option("Stork: installed OS").as_slice());
    }

    #[test]
    fn with_no_variables_the_entry_is_0000_and_the_whole_order() {
        let d = tempfile::tempdir().unwrap();
        let vars = Vars::new(d.path());
        let out = vars.add_entry(&option("Stork"), "Stork").unwrap();
        assert_eq!((out.entry.as_str(), out.order.as_str()), ("0000", "0000"));
        // A second run keeps one entry, ours, first.
        var(d.path(), "Boot0001", &option("UiApp"));
        var(d.path(), "BootOrder", &[1, 0, 0, 0]);
        let out = vars.add_entry(&option("Stork"), "Stork").unwrap();
        assert_eq!(
            (out.entry.as_str(), out.order.as_str()),
            ("0000", "0000,0001")
        );
        assert_eq!(vars.entries().unwrap().len(), 2);
    }

    #[test]
    fn a_short_or_odd_option_has_no_description_and_breaks_nothing() {
        assert_eq!(description(&[]), None);
        assert_eq!(description(&[1, 0, 0, 0, 4, 0]).as_deref(), Some(""));
        // An unpaired surrogate is not a label.
        assert_eq!(description(&[1, 0, 0, 0, 4, 0, 0x00, 0xd8, 0, 0]), None);
    }

    fn nums(order: &[&str]) -> Vec<String> {
        order.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn entry_goes_first_ahead_of_network_and_shell() {
        let old = nums(&["0001", "0002", "0000", "0003"]);
        assert_eq!(
            entry_first(&old, "0003"),
            nums(&["0003", "0001", "0002", "0000"])
        );
        assert_eq!(entry_first(&[], "0004"), nums(&["0004"]));
        // The entry listed twice comes out once.
        let old = nums(&["0001", "0004", "0004"]);
        assert_eq!(entry_first(&old, "0004"), nums(&["0004", "0001"]));
    }
}
