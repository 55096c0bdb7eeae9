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
pub fn copy_image(image: &Path, disk: &Path, bytes: u64) -> Result<()> {
    crate::run(
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

impl Notice {
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
