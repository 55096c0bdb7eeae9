//! The kernels an image users brought carries, read from the image itself, so that its
//! listing shows them, a deploy can name one and a machine's minimum kernel is checked.
//!
//! A kernel is a `boot/vmlinuz-V` with its `boot/initrd.img-V`. The default, listed first, is
//! the one the `/vmlinuz` link names, else the newest (what update-grub boots first). The
//! agent boots another kernel by re-pointing Debian's `/vmlinuz` and `/initrd.img` links, which
//! works only when the image's GRUB boots through them (the images of Stork's recipes do); for
//! any other image only the default is listed, the one kernel a deploy of it boots.
//!
//! Read from a raw GPT disk image (the first ext2/3/4 partition holding `/boot`, through
//! ext4-view: read-only and in-process, no loop device or mount on the appliance) and from a
//! root tar, plain or zstd. Anything else (a compressed raw image, a root on XFS or LVM)
//! lists none: it boots what it boots, and no kernel can be asked of it.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::Path;

use stork_proto::kernel::{ImageKernel, release};

/// What a `grub.cfg` larger than this says is not read: no GRUB configuration is this large.
const MAX_GRUB_CFG: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("no ext2/3/4 partition of the image holds /boot")]
    NoBoot,
    #[error("reading the image's file system: {0}")]
    Ext4(#[from] ext4_view::Ext4Error),
}

/// What a root file system says about its kernels.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The names in `/boot`.
    pub boot: Vec<String>,
    /// Where `/vmlinuz` points, if it is a link.
    pub link: Option<String>,
    /// `/boot/grub/grub.cfg`, if there is one of a sane size.
    pub grub_cfg: Option<String>,
}

/// The kernels `found` lists, the default first; see the module's comment.
pub fn listed(found: &Found) -> Vec<ImageKernel> {
    let mut versions: Vec<&str> = found
        .boot
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.is_empty() && found.boot.iter().any(|n| *n == format!("initrd.img-{v}")))
        .collect();
    // Newest first, so that without a link the first is update-grub's default.
    versions.sort_by(|a, b| release(b).cmp(&release(a)).then(b.cmp(a)));
    let linked = found
        .link
        .as_deref()
        .and_then(|l| l.rsplit_once("vmlinuz-"))
        .map(|(_, v)| v);
    if let Some(pos) = linked.and_then(|l| versions.iter().position(|v| *v == l)) {
        let v = versions.remove(pos);
        versions.insert(0, v);
    }
    if !found.grub_cfg.as_deref().is_some_and(boots_the_link) {
        versions.truncate(1);
    }
    versions
        .into_iter()
        .map(|v| ImageKernel {
            name: v.to_owned(),
            version: v.to_owned(),
        })
        .collect()
}

/// Whether a `grub.cfg` boots the `/vmlinuz` link rather than a kernel by its file name.
fn boots_the_link(cfg: &str) -> bool {
    let mut linux = cfg.lines().filter_map(|l| {
        let mut w = l.split_whitespace();
        matches!(w.next(), Some("linux" | "linuxefi")).then(|| w.next())
    });
    linux.next().flatten() == Some("/vmlinuz") && linux.all(|p| p == Some("/vmlinuz"))
}

/// The kernels of the raw disk image at `path`.
pub fn in_raw(path: &Path) -> Result<Vec<ImageKernel>, ScanError> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut parts = partitions(&mut file, size).unwrap_or_default();
    // A bare file system image, no partition table.
    parts.push((0, size));
    for (start, len) in parts {
        let reader = Part {
            file: file.try_clone()?,
            start,
            len,
        };
        let Ok(fs) = ext4_view::Ext4::load(Box::new(reader)) else {
            continue;
        };
        if fs.exists("/boot").unwrap_or(false) {
            return Ok(listed(&read_ext4(&fs)?));
        }
    }
    Err(ScanError::NoBoot)
}

/// The partitions of a GPT disk image of `size` bytes, as (start, length) in bytes, those
/// that lie within it; `None` without a GPT. Leaves the file at its start, as found.
pub fn partitions(file: &mut File, size: u64) -> Option<Vec<(u64, u64)>> {
    let gpt = gptman::GPT::find_from(file);
    // The probe seeks; a reader after it (the upload's compression) starts at byte 0.
    file.rewind().ok()?;
    let gpt = gpt.ok()?;
    let sector = gpt.sector_size;
    Some(
        gpt.iter()
            .filter(|(_, p)| p.is_used())
            .filter_map(|(_, p)| {
                let start = p.starting_lba.saturating_mul(sector);
                let end = p.ending_lba.saturating_add(1).saturating_mul(sector);
                (start < end && end <= size).then_some((start, end - start))
            })
            .collect(),
    )
}

fn read_ext4(fs: &ext4_view::Ext4) -> Result<Found, ScanError> {
    let mut found = Found::default();
    for entry in fs.read_dir("/boot")? {
        if let Ok(name) = entry?.file_name().as_str() {
            found.boot.push(name.to_owned());
        }
    }
    found.link = fs
        .read_link("/vmlinuz")
        .ok()
        .and_then(|p| p.to_str().ok().map(str::to_owned));
    let cfg = "/boot/grub/grub.cfg";
    if fs
        .metadata(cfg)
        .is_ok_and(|m| m.file_type().is_regular_file() && m.len() <= MAX_GRUB_CFG)
    {
        found.grub_cfg = fs.read_to_string(cfg).ok();
    }
    Ok(found)
}

/// One partition of the image, as ext4-view reads a device.
struct Part {
    file: File,
    start: u64,
    len: u64,
}

impl ext4_view::Ext4Read for Part {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err("a read past the partition's end".into());
        }
        Ok(self.file.read_exact_at(dst, self.start + start_byte)?)
    }
}

/// The kernels of the root tar at `path`, plain or zstd.
pub fn in_tar(path: &Path) -> Result<Vec<ImageKernel>, ScanError> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.rewind()?;
    let reader: Box<dyn Read> = if magic[..n] == stork_proto::blockmap::ZSTD_MAGIC.to_le_bytes() {
        Box::new(zstd::stream::read::Decoder::new(file)?)
    } else {
        Box::new(file)
    };
    let mut found = Found::default();
    for entry in tar::Archive::new(reader).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").trim_start_matches('/');
        if let Some(name) = path.strip_prefix("boot/").filter(|n| !n.contains('/')) {
            found.boot.push(name.to_owned());
        } else if path == "vmlinuz" {
            found.link = entry.link_name()?.map(|l| l.to_string_lossy().into_owned());
        } else if path == "boot/grub/grub.cfg" && entry.size() <= MAX_GRUB_CFG {
            let mut cfg = String::new();
            if entry.read_to_string(&mut cfg).is_ok() {
                found.grub_cfg = Some(cfg);
            }
        }
    }
    Ok(listed(&found))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const LINKED: &str =
        "menuentry 'Debian' {\n  linux /vmlinuz root=UUID=x ro\n  initrd /initrd.img\n}\n";
    const BY_NAME: &str = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1.0-57-amd64 root=x\n}\n";

    fn found(boot: &[&str], link: Option<&str>, cfg: Option<&str>) -> Found {
        Found {
            boot: boot.iter().map(|s| s.to_string()).collect(),
            link: link.map(str::to_owned),
            grub_cfg: cfg.map(str::to_owned),
        }
    }

    fn versions(k: &[ImageKernel]) -> Vec<&str> {
        k.iter().map(|k| k.version.as_str()).collect()
    }

    const TWO: &[&str] = &[
        "vmlinuz-6.1.0-57-amd64",
        "initrd.img-6.1.0-57-amd64",
        "vmlinuz-6.12.95+deb12-amd64",
        "initrd.img-6.12.95+deb12-amd64",
        "vmlinuz-7.0-no-initrd",
        "config-6.1.0-57-amd64",
        "grub",
    ];

    #[test]
    fn the_linked_kernel_is_the_default_and_others_are_listed_when_grub_boots_the_link() {
        let k = listed(&found(
            TWO,
            Some("boot/vmlinuz-6.1.0-57-amd64"),
            Some(LINKED),
        ));
        assert_eq!(versions(&k), ["6.1.0-57-amd64", "6.12.95+deb12-amd64"]);
        // No link: the newest, as update-grub orders them.
        let k = listed(&found(TWO, None, Some(LINKED)));
        assert_eq!(versions(&k), ["6.12.95+deb12-amd64", "6.1.0-57-amd64"]);
        // A kernel without its initrd is not one the agent can boot.
        assert!(!versions(&k).contains(&"7.0-no-initrd"));
    }

    #[test]
    fn an_image_whose_grub_names_its_kernels_lists_only_its_default() {
        let k = listed(&found(
            TWO,
            Some("/boot/vmlinuz-6.1.0-57-amd64"),
            Some(BY_NAME),
        ));
        assert_eq!(versions(&k), ["6.1.0-57-amd64"]);
        let k = listed(&found(TWO, None, None));
        assert_eq!(versions(&k), ["6.12.95+deb12-amd64"]);
        assert!(listed(&found(&["grub"], None, Some(LINKED))).is_empty());
    }

    #[test]
    fn a_root_tar_plain_or_zstd_is_read() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut file = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
        file("./boot/vmlinuz-6.1.0-57-amd64", b"k");
        file("./boot/initrd.img-6.1.0-57-amd64", b"i");
        file("./boot/vmlinuz-6.12.95+deb12-amd64", b"k");
        file("./boot/initrd.img-6.12.95+deb12-amd64", b"i");
        file("./boot/grub/grub.cfg", LINKED.as_bytes());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        b.append_link(&mut h, "./vmlinuz", "boot/vmlinuz-6.1.0-57-amd64")
            .unwrap();
        let tar = b.into_inner().unwrap();
        let plain = d.path().join("root.tar");
        std::fs::write(&plain, &tar).unwrap();
        let zst = d.path().join("root.tar.zst");
        std::fs::write(&zst, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();
        for p in [plain, zst] {
            assert_eq!(
                versions(&in_tar(&p).unwrap()),
                ["6.1.0-57-amd64", "6.12.95+deb12-amd64"]
            );
        }
    }

    /// A GPT disk image with a 1 MiB partition before an ext4 root holding two kernels, the
    /// link and `grub_cfg`, made by `mkfs.ext4 -d` as stork-image makes its roots.
    pub(crate) fn gpt_disk(dir: &Path, grub_cfg: &str) -> std::path::PathBuf {
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("boot/grub")).unwrap();
        for f in &TWO[..4] {
            std::fs::write(root.join("boot").join(f), f).unwrap();
        }
        std::fs::write(root.join("boot/grub/grub.cfg"), grub_cfg).unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-57-amd64", root.join("vmlinuz")).unwrap();
        let fs_img = dir.join("root.ext4");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&fs_img)
            .arg("8M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs) runs");
        assert!(made.success());
        let fs_bytes = std::fs::read(&fs_img).unwrap();
        let mib = 1u64 << 20;
        let mut disk = std::io::Cursor::new(vec![0u8; (12 * mib) as usize]);
        gptman::GPT::write_protective_mbr_into(&mut disk, 512).unwrap();
        let mut gpt = gptman::GPT::new_from(&mut disk, 512, [7; 16]).unwrap();
        for (i, (first, last)) in [(2048, 4095), (4096, 4096 + 16383)].into_iter().enumerate() {
            gpt[i as u32 + 1] = gptman::GPTPartitionEntry {
                partition_type_guid: [1; 16],
                unique_partition_guid: [i as u8 + 2; 16],
                starting_lba: first,
                ending_lba: last,
                attribute_bits: 0,
                partition_name: "part".into(),
            };
        }
        gpt.write_into(&mut disk).unwrap();
        let mut bytes = disk.into_inner();
        bytes[(2 * mib) as usize..(2 * mib) as usize + fs_bytes.len()].copy_from_slice(&fs_bytes);
        let path = dir.join("disk.raw");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_gpt_raw_image_is_read_through_its_ext4_root() {
        let d = tempfile::tempdir().unwrap();
        let linked = gpt_disk(&d.path().join("a"), LINKED);
        assert_eq!(
            versions(&in_raw(&linked).unwrap()),
            ["6.1.0-57-amd64", "6.12.95+deb12-amd64"]
        );
        let by_name = gpt_disk(&d.path().join("b"), BY_NAME);
        assert_eq!(versions(&in_raw(&by_name).unwrap()), ["6.1.0-57-amd64"]);
    }

    /// An uploaded image is anyone's bytes: corrupted file systems give an answer or an
    /// error, never a panic or a hang.
    #[test]
    fn corrupted_file_systems_never_panic() {
        use rand::{Rng, SeedableRng};
        let d = tempfile::tempdir().unwrap();
        let good = std::fs::read(gpt_disk(d.path(), LINKED)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let path = d.path().join("bad.raw");
        for _ in 0..300 {
            let mut bad = good.clone();
            // The file system's first 256 KiB: superblock, group descriptors, inode table.
            for _ in 0..rng.random_range(1..16) {
                let at = (2 << 20) + rng.random_range(0..256 << 10);
                bad[at] = rng.random();
            }
            std::fs::write(&path, &bad).unwrap();
            let _ = in_raw(&path);
        }
    }

    #[test]
    fn a_raw_image_without_an_ext4_boot_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        std::fs::write(&p, vec![0xA5u8; 1 << 20]).unwrap();
        assert!(matches!(in_raw(&p), Err(ScanError::NoBoot)));
    }
}
