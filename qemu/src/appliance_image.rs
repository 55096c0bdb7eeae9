//! The appliance image as a person handles it: its description beside it, a copy of it as a
//! USB stick or disk, files put on and read from its FAT partitions (as from a laptop), and
//! the notice its console shows. Used by the appliance tests and `cargo xtask lab`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Deserialize;

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
/// `qemu-img convert` with direct I/O on both ends copies the data and leaves the holes, in
/// 2 s where `cp --sparse=always` takes 18 s of this machine's CPU for a 6 GiB image with
/// 2 GiB of data (docs/measurements.md, Host file I/O); `cp` where direct I/O is refused.
pub fn copy_image(image: &Path, disk: &Path, bytes: u64) -> Result<()> {
    let direct = crate::run(
        Command::new("qemu-img")
            .args([
                "convert", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none",
            ])
            .arg(image)
            .arg(disk),
    );
    if direct.is_err() {
        crate::run(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(image)
                .arg(disk),
        )?;
    }
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    f.set_len(bytes)?;
    Ok(())
}

/// Copies `file` to `name` on the FAT partition at `offset` of `disk`, as a person does from
/// a laptop.
pub fn put_on_fat(disk: &Path, offset: u64, file: &Path, name: &str) -> Result<()> {
    crate::run(
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
    crate::run(
        Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@{offset}", disk.display()))
            .arg(format!("::/{name}")),
    )
}

/// What the appliance printed on its console: the certificate fingerprint of the last notice
/// (`sha256:<hex>`), and the admin token if a notice showed one.
pub struct Notice {
    pub fingerprint: String,
    pub token: Option<String>,
}

/// A notice's last line says how the appliance's own address came up; the serial console
/// shows the notice a line at a time, so only a notice through that line is whole.
const NOTICE_LAST_LINES: [&str; 2] = ["\n  Network: ", "\n  DHCP: "];

impl Notice {
    /// The whole notices on a console, in order, each from its `Stork ` heading through its
    /// last line (boots append to the console).
    pub fn all(console: &str) -> Vec<&str> {
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(at) = console[from..]
            .find("Certificate fingerprint")
            .map(|n| from + n)
        {
            let Some(last) = NOTICE_LAST_LINES
                .iter()
                .filter_map(|l| console[at..].find(l))
                .min()
            else {
                break;
            };
            let line = at + last + 1;
            let Some(end) = console[line..].find('\n').map(|n| line + n) else {
                break;
            };
            let start = console[..at].rfind("Stork ").unwrap_or(at);
            found.push(&console[start..end]);
            from = end;
        }
        found
    }

    /// The fingerprint and token of the last notice on `console`.
    pub fn parse(console: &str) -> Result<Self> {
        let word = |prefix: &str, len: usize| {
            console
                .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
                .rfind(|w| w.starts_with(prefix) && w.len() == prefix.len() + len)
                .map(str::to_string)
        };
        Ok(Self {
            fingerprint: word("sha256:", 64).context("no sha256: fingerprint on the console")?,
            token: word("stork_admin_", 64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Notice, copy_image};

    /// A copy holds the image's bytes, holes as zeros, and is as long as the disk asked for.
    #[test]
    fn a_copied_image_is_the_image_then_zeros_to_the_disks_size() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (image, disk) = (dir.path().join("image.raw"), dir.path().join("disk.raw"));
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[9u8; 70_000], 3 << 20).unwrap();
        f.write_all_at(b"end", (8 << 20) - 3).unwrap();
        copy_image(&image, &disk, 16 << 20).unwrap();
        let (want, got) = (
            std::fs::read(&image).unwrap(),
            std::fs::read(&disk).unwrap(),
        );
        assert_eq!(got.len(), 16 << 20);
        assert!(
            got[..8 << 20] == want[..],
            "the copy differs from the image"
        );
        assert!(got[8 << 20..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_notice_is_whole_only_through_its_last_line() {
        let first = "boot\nStork 1 (slot a), host h\n  Certificate fingerprint (pin it):\n    \
                     sha256:ab\n  Admin token: made\n    stork_admin_x\n  DHCP: full on e (a)\n";
        assert_eq!(Notice::all(first).len(), 1);
        assert!(Notice::all(first)[0].starts_with("Stork 1"));
        assert!(Notice::all(first)[0].ends_with("DHCP: full on e (a)"));
        // The second boot's notice, cut before its token: not whole yet.
        let cut = "Stork 1 (slot a)\n  Certificate fingerprint (pin it):\n    sha256:ab\n";
        let both = format!("{first}{cut}");
        assert_eq!(Notice::all(&both).len(), 1);
        let whole = format!("{both}  Admin token: in a file\n  Network: e by DHCP (a); off\n");
        assert_eq!(Notice::all(&whole).len(), 2);
        // The last line itself arrives in pieces.
        assert_eq!(Notice::all(&whole[..whole.len() - 3]).len(), 1);
    }
}
