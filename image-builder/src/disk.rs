//! Raw GPT disk images built in a sparse file, without mounts or loop devices:
//!
//! | # | name | type | size | content |
//! |---|---|---|---|---|
//! | 1 | `bios` | BIOS boot (EF02) | 1 MiB at 1 MiB | GRUB core.img (i386-pc) |
//! | 2 | `esp` | EFI system (EF00) | `esp_mib` | FAT32: `EFI/BOOT/BOOTX64.EFI` (GRUB x86_64-efi, or shim with signed GRUB beside it: [`Signed`]) |
//! | 3 | `root` | Linux root x86-64 (8304) | the rest | ext4 from the root tree |
//!
//! The GPT is written by [`crate::gpt`] (with gptman); `mkfs.vfat --offset` and mtools'
//! `file@@offset` write the ESP in place; `mke2fs -E offset= -d TREE` writes and fills the root
//! file system in place; GRUB's boot sector and core.img are patched in ([`crate::grub`]). The
//! root partition is last so it can grow to the end of whatever disk the image is written to.
//!
//! The root file system's UUID, the ESP's volume id and the GPT GUIDs are derived from the
//! tree's key, and every time written is SOURCE_DATE_EPOCH (mkfs.vfat `--invariant`, mtools and
//! mke2fs/debugfs fake times), so a rebuild from the same tree gives the same bytes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cmd::{self, CmdError};
use crate::gpt::{Gpt, GptError, Guid, Partition, SECTOR};
use crate::grub::{self, GrubError};
use crate::manifest::{self, HashingWriter, PartitionInfo};

const MIB: u64 = 1024 * 1024;
const SECTORS_PER_MIB: u64 = MIB / SECTOR;
pub const ROOT_PARTITION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("partition table")]
    Gpt(#[from] GptError),
    #[error("GRUB images")]
    Grub(#[from] GrubError),
    #[error("core.img is {len} bytes; the BIOS boot partition holds {room}")]
    CoreTooBig { len: usize, room: u64 },
    #[error(transparent)]
    Tool(#[from] CmdError),
    #[error("debugfs did not replace {path} in the root file system; it reads:\n{got}")]
    Replace { path: String, got: String },
    #[error("debugfs did not say where the root file system's journal is; it reads:\n{got}")]
    Journal { got: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Partition boundaries in 512-byte sectors (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub sectors: u64,
    pub bios: (u64, u64),
    pub esp: (u64, u64),
    pub root: (u64, u64),
}

impl Layout {
    pub fn new(size_mib: u64, esp_mib: u64) -> Self {
        let sectors = size_mib * SECTORS_PER_MIB;
        let bios = (SECTORS_PER_MIB, 2 * SECTORS_PER_MIB - 1);
        let esp = (bios.1 + 1, bios.1 + esp_mib * SECTORS_PER_MIB);
        // Up to the last whole MiB before the 33 sectors of backup GPT (aligned ends keep
        // partitioning tools quiet; the partition grows at deploy anyway).
        let root = (
            esp.1 + 1,
            (sectors - 33) / SECTORS_PER_MIB * SECTORS_PER_MIB - 1,
        );
        Self {
            sectors,
            bios,
            esp,
            root,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Where a reader of the disk could take what a deploy leaves in a block map's gaps for a
    /// signature ([`blockmap::signature_areas`](stork_proto::blockmap::signature_areas)): kept
    /// in the map, zero or not, so a deploy overwrites them.
    pub fn signature_areas(&self) -> Vec<(u64, u64)> {
        let part = |(first, last): (u64, u64)| (first * SECTOR, (last + 1 - first) * SECTOR);
        stork_proto::blockmap::signature_areas(
            self.bytes(),
            &[part(self.bios), part(self.esp), part(self.root)],
        )
    }
}

/// Identifiers of the file systems and the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// ext4 UUID, lowercase text.
    pub root_uuid: String,
    /// FAT volume id.
    pub esp_id: u32,
    pub disk_guid: Guid,
    pub partition_guids: [Guid; 3],
}

impl Ids {
    /// Derived from `seed` (the tree key): stable across rebuilds, different between trees.
    pub fn derive(seed: &str) -> Self {
        let bytes = |label: &str| -> [u8; 16] {
            let d = Sha256::digest(format!("stork-image {label} {seed}").as_bytes());
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            // RFC 4122 version 4 and variant bits, so tools treat them as ordinary random ids.
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            b
        };
        let root = bytes("root-fs");
        let esp = bytes("esp-fs");
        Self {
            root_uuid: uuid_text(root),
            esp_id: u32::from_be_bytes([esp[0], esp[1], esp[2], esp[3]]),
            disk_guid: Guid::from_big_endian(bytes("disk")),
            partition_guids: [
                Guid::from_big_endian(bytes("part-bios")),
                Guid::from_big_endian(bytes("part-esp")),
                Guid::from_big_endian(bytes("part-root")),
            ],
        }
    }

    /// The ESP's id as blkid and fstab write it.
    pub fn esp_text(&self) -> String {
        format!("{:04X}-{:04X}", self.esp_id >> 16, self.esp_id & 0xffff)
    }
}

fn uuid_text(b: [u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The partition table for `layout`.
pub fn gpt(layout: &Layout, ids: &Ids) -> Result<Gpt, DiskError> {
    let part = |type_guid: &str, guid: Guid, (first, last): (u64, u64), name: &str| {
        Ok::<_, GptError>(Partition {
            type_guid: Guid::parse(type_guid)?,
            guid,
            first_lba: first,
            last_lba: last,
            attributes: 0,
            name: name.to_owned(),
        })
    };
    Ok(Gpt {
        disk_guid: ids.disk_guid,
        sectors: layout.sectors,
        partitions: vec![
            part(Guid::BIOS_BOOT, ids.partition_guids[0], layout.bios, "bios")?,
            part(Guid::ESP, ids.partition_guids[1], layout.esp, "esp")?,
            part(
                Guid::LINUX_ROOT_X86_64,
                ids.partition_guids[2],
                layout.root,
                "root",
            )?,
        ],
    })
}

/// The partitions as the manifest lists them.
pub fn partition_info(table: &Gpt) -> Vec<PartitionInfo> {
    table
        .partitions
        .iter()
        .zip(1u32..)
        .map(|(p, number)| PartitionInfo {
            number,
            name: p.name.clone(),
            type_guid: p.type_guid.to_text(),
            guid: p.guid.to_text(),
            first_lba: p.first_lba,
            last_lba: p.last_lba,
        })
        .collect()
}

/// GRUB pieces, all from the image's own GRUB.
pub struct Bootloader<'a> {
    pub boot_img: &'a [u8],
    pub core_img: &'a [u8],
    /// Written to `EFI/BOOT/BOOTX64.EFI` on the ESP (unless `signed`).
    pub efi_image: &'a Path,
    /// The signed chain, when the image has it: the ESP boots with Secure Boot on.
    pub signed: Option<Signed<'a>>,
}

/// The signed chain for Secure Boot on the ESP: Debian's Microsoft-signed shim as the
/// removable-media loader `EFI/BOOT/BOOTX64.EFI`, Debian's signed GRUB beside it as
/// `grubx64.efi` (shim loads that name from its own directory), and that GRUB's
/// configuration at `EFI/debian/grub.cfg` (its built-in prefix is `/EFI/debian` on the
/// device it came from). Signed GRUB loads no modules from disk; it has what it needs built
/// in, and checks the kernel's signature through shim.
pub struct Signed<'a> {
    pub shim: &'a Path,
    pub grub: &'a Path,
    pub config: String,
}

/// Builds the raw image at `raw` from `tree`, with `fstab` as the root's `/etc/fstab` (the
/// tree's own is left alone: the SquashFS and tar carry it).
pub fn build_raw(
    raw: &Path,
    tree: &Path,
    layout: &Layout,
    ids: &Ids,
    boot: &Bootloader<'_>,
    fstab: &str,
    epoch: u64,
) -> Result<Gpt, DiskError> {
    let table = gpt(layout, ids)?;
    {
        let mut f = File::create(raw).map_err(io_err(raw))?;
        // Sparse: only what is written takes space.
        f.set_len(layout.bytes()).map_err(io_err(raw))?;
        table.write(&mut f)?;
    }

    // ESP: FAT32 (UEFI's required format), fixed volume id.
    let esp_offset = layout.esp.0 * SECTOR;
    let esp_len = (layout.esp.1 - layout.esp.0 + 1) * SECTOR;
    let esp = mkfs_vfat(raw, (esp_offset, esp_len), Fat::Fat32, "EFI", ids.esp_id)?;
    cmd::run(mtools("mmd", &esp, Some(epoch)).args(["::/EFI", "::/EFI/BOOT"]))?;
    let copy = |from: &Path, to: &str| {
        cmd::run(
            mtools("mcopy", &esp, Some(epoch))
                .arg("-m")
                .arg(from)
                .arg(to),
        )
    };
    match &boot.signed {
        None => {
            copy(boot.efi_image, "::/EFI/BOOT/BOOTX64.EFI")?;
        }
        Some(signed) => {
            copy(signed.shim, "::/EFI/BOOT/BOOTX64.EFI")?;
            copy(signed.grub, "::/EFI/BOOT/grubx64.efi")?;
            cmd::run(mtools("mmd", &esp, Some(epoch)).arg("::/EFI/debian"))?;
            let dir = raw.parent().unwrap_or(Path::new("."));
            let mut cfg = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
            cfg.write_all(signed.config.as_bytes())
                .map_err(io_err(cfg.path()))?;
            copy(cfg.path(), "::/EFI/debian/grub.cfg")?;
        }
    }

    // Root: ext4 filled from the tree.
    let root_offset = layout.root.0 * SECTOR;
    let root_len = (layout.root.1 - layout.root.0 + 1) * SECTOR;
    mke2fs(
        raw,
        (root_offset, root_len),
        &Ext4 {
            label: "root",
            uuid: &ids.root_uuid,
            content: Some(tree),
            root_owner: None,
            conf_tree: tree,
        },
        epoch,
    )?;
    replace_in_ext4(raw, root_offset, tree, "/etc/fstab", fstab, epoch)?;

    install_grub_bios(raw, layout.bios, boot.boot_img, boot.core_img)?;
    Ok(table)
}

/// FAT variants [`mkfs_vfat`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fat {
    Fat16,
    /// With 512-byte clusters: FAT32 needs 65525 clusters or more, which a small ESP has
    /// only so.
    Fat32,
}

/// `mkfs.vfat` in place over `(offset, len)` bytes of `raw`, with volume id `id` and no
/// random or time-dependent field (`--invariant`); returns the file system as mtools names
/// it (`file@@offset`).
pub fn mkfs_vfat(
    raw: &Path,
    (offset, len): (u64, u64),
    fat: Fat,
    label: &str,
    id: u32,
) -> Result<String, DiskError> {
    let sector = offset / SECTOR;
    let mut c = cmd::clean("mkfs.vfat");
    match fat {
        Fat::Fat16 => c.args(["-F", "16"]),
        Fat::Fat32 => c.args(["-F", "32", "-s", "1"]),
    };
    cmd::run(
        c.args(["-n", label, "--invariant"])
            .arg("-i")
            .arg(format!("{id:08X}"))
            .arg(format!("--offset={sector}"))
            .arg("-h")
            .arg(sector.to_string())
            .arg(raw)
            .arg((len / 1024).to_string()),
    )?;
    Ok(format!("{}@@{offset}", raw.display()))
}

/// An mtools command on the FAT `image` (`file@@offset`); with `epoch`, directory entries
/// get that time (SOURCE_DATE_EPOCH) instead of now.
pub fn mtools(program: &str, image: &str, epoch: Option<u64>) -> std::process::Command {
    let mut c = cmd::clean(program);
    c.env("MTOOLS_SKIP_CHECK", "1");
    if let Some(e) = epoch {
        c.env("SOURCE_DATE_EPOCH", e.to_string());
    }
    c.arg("-i").arg(image);
    c
}

/// An ext4 file system for [`mke2fs`].
pub struct Ext4<'a> {
    pub label: &'a str,
    pub uuid: &'a str,
    /// Filled from this tree (`-d`), else empty.
    pub content: Option<&'a Path>,
    /// Owner (uid = gid) of the root directory; else root.
    pub root_owner: Option<u32>,
    /// The tree whose `etc/mke2fs.conf` decides the feature set, so the file system is one
    /// its kernel, e2fsck and GRUB were built for.
    pub conf_tree: &'a Path,
}

/// `mke2fs` in place over `(offset, len)` bytes of `raw`: 4 KiB blocks, the UUID also as the
/// directory hash seed, every time `epoch` (E2FSPROGS_FAKE_TIME).
pub fn mke2fs(
    raw: &Path,
    (offset, len): (u64, u64),
    fs: &Ext4<'_>,
    epoch: u64,
) -> Result<(), DiskError> {
    let mut c = cmd::clean("mke2fs");
    let conf = fs.conf_tree.join("etc/mke2fs.conf");
    if conf.is_file() {
        c.env("MKE2FS_CONFIG", &conf);
    }
    let mut extended = format!("offset={offset},hash_seed={}", fs.uuid);
    if let Some(o) = fs.root_owner {
        extended.push_str(&format!(",root_owner={o}:{o}"));
    }
    c.env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", fs.label])
        .arg("-U")
        .arg(fs.uuid)
        .arg("-E")
        .arg(extended);
    if let Some(dir) = fs.content {
        c.arg("-d").arg(dir);
    }
    cmd::run(c.arg(raw).arg((len / 4096).to_string()))?;
    Ok(())
}

/// GRUB for BIOS on a GPT disk: boot.img into sector 0 around the protective MBR, core.img
/// into the BIOS boot partition `bios` (first and last sector), as `grub-bios-setup` embeds it.
pub fn install_grub_bios(
    raw: &Path,
    bios: (u64, u64),
    boot_img: &[u8],
    core_img: &[u8],
) -> Result<(), DiskError> {
    let room = (bios.1 - bios.0 + 1) * SECTOR;
    if core_img.len() as u64 > room {
        return Err(DiskError::CoreTooBig {
            len: core_img.len(),
            room,
        });
    }
    let mut f = File::options()
        .read(true)
        .write(true)
        .open(raw)
        .map_err(io_err(raw))?;
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr).map_err(io_err(raw))?;
    let sector0 = grub::boot_sector(boot_img, &mbr, bios.0)?;
    let core = grub::embed_core(core_img, bios.0)?;
    f.seek(SeekFrom::Start(0)).map_err(io_err(raw))?;
    f.write_all(&sector0).map_err(io_err(raw))?;
    f.seek(SeekFrom::Start(bios.0 * SECTOR))
        .map_err(io_err(raw))?;
    f.write_all(&core).map_err(io_err(raw))?;
    f.sync_all().map_err(io_err(raw))
}

/// Replaces the regular file `path` (directly under a directory of the root, like
/// `/etc/fstab`) in the ext4 at byte `offset` of `image` with `text`: mode 0644, owner root,
/// times `epoch`; its directory keeps the times it has in `tree`. debugfs with
/// E2FSPROGS_FAKE_TIME does it in place, so the result is the same bytes on every build.
fn replace_in_ext4(
    image: &Path,
    offset: u64,
    tree: &Path,
    path: &str,
    text: &str,
    epoch: u64,
) -> Result<(), DiskError> {
    use std::os::unix::fs::MetadataExt;
    let dir = Path::new(path)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let dir_meta = fs::metadata(tree.join(dir.trim_start_matches('/'))).map_err(io_err(tree))?;
    let content = image.with_extension("debugfs-file");
    let script = image.with_extension("debugfs");
    fs::write(&content, text).map_err(io_err(&content))?;
    let mut commands = format!(
        "rm {path}\nwrite {} {path}\nsif {path} mode 0100644\nsif {path} uid 0\nsif {path} gid 0\n",
        content.display()
    );
    for field in ["atime", "mtime", "ctime", "crtime"] {
        // `@seconds`: debugfs reads a bare number as a YYYYMMDD... date.
        commands.push_str(&format!("sif {path} {field} @{epoch}\n"));
    }
    for (field, t) in [
        ("atime", dir_meta.atime()),
        ("mtime", dir_meta.mtime()),
        ("ctime", dir_meta.ctime()),
    ] {
        commands.push_str(&format!("sif {dir} {field} @{t}\n"));
    }
    fs::write(&script, commands).map_err(io_err(&script))?;
    let device = format!("{}?offset={offset}", image.display());
    let debugfs = || {
        let mut c = cmd::clean("debugfs");
        c.env("E2FSPROGS_FAKE_TIME", epoch.to_string());
        c
    };
    let result = cmd::run(debugfs().arg("-w").arg("-f").arg(&script).arg(&device))
        // debugfs exits 0 even when a command fails: read the file back.
        .and_then(|_| cmd::run(debugfs().arg("-R").arg(format!("cat {path}")).arg(&device)));
    // Best effort: these are scratch files beside the image.
    let _ = fs::remove_file(&content);
    let _ = fs::remove_file(&script);
    let got = result?;
    if got.stdout != text.as_bytes() {
        return Err(DiskError::Replace {
            path: path.to_owned(),
            got: String::from_utf8_lossy(&got.stdout).into_owned(),
        });
    }
    Ok(())
}

/// The byte ranges `(offset, length)` of `image` that hold the journal of the ext4 at byte
/// `offset`. A deploy that leaves a block map's gaps as the disk has them must still
/// overwrite these: a journal's unused blocks left from an earlier deploy of the same image
/// (same UUID, same first sequence number) could look like the next transaction to a
/// recovery after a crash.
pub fn journal_areas(image: &Path, offset: u64) -> Result<Vec<(u64, u64)>, DiskError> {
    let device = format!("{}?offset={offset}", image.display());
    let ask = |request: &str| -> Result<String, DiskError> {
        let out = cmd::run(cmd::clean("debugfs").arg("-R").arg(request).arg(&device))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let stats = ask("stats")?;
    let block: Option<u64> = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok());
    let inode = ask("stat <8>")?;
    let extents = inode
        .split_once("EXTENTS:")
        .map(|(_, rest)| parse_extents(rest));
    match (block, extents) {
        (Some(block), Some(extents)) if !extents.is_empty() => Ok(extents
            .into_iter()
            .map(|(first, last)| (offset + first * block, (last + 1 - first) * block))
            .collect()),
        _ => Err(DiskError::Journal {
            got: format!("{stats}\n{inode}"),
        }),
    }
}

/// The physical block ranges (first, last) of debugfs's `EXTENTS:` list: `(0-8191):139265-147456`
/// for a run, `(8192):150000` for one block; index blocks (`(ETB0):...`) hold no data.
fn parse_extents(text: &str) -> Vec<(u64, u64)> {
    text.split([',', '\n'])
        .filter_map(|item| {
            let (logical, physical) = item.trim().split_once("):")?;
            if logical.starts_with("(ETB") {
                return None;
            }
            let (first, last) = physical.split_once('-').unwrap_or((physical, physical));
            let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
            (first <= last).then_some((first, last))
        })
        .collect()
}

/// Compresses `raw` to `out` as one zstd frame whose header carries the image's size (the agent
/// reads it from the first bytes to choose a disk big enough). Returns size and SHA-256 of
/// `out`.
pub fn compress(raw: &Path, out: &Path, level: i32) -> Result<(u64, String), DiskError> {
    let tmp = manifest::tmp_path(out);
    let result = (|| {
        let mut src = File::open(raw).map_err(io_err(raw))?;
        let len = src.metadata().map_err(io_err(raw))?.len();
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut enc = zstd::Encoder::new(
            HashingWriter::new(BufWriter::with_capacity(1 << 20, file)),
            level,
        )
        .map_err(io_err(&tmp))?;
        enc.include_checksum(true).map_err(io_err(&tmp))?;
        enc.set_pledged_src_size(Some(len)).map_err(io_err(&tmp))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(io_err(raw))?;
            if n == 0 {
                break;
            }
            enc.write_all(&buf[..n]).map_err(io_err(&tmp))?;
        }
        let (buffered, size, sha) = enc.finish().map_err(io_err(&tmp))?.finish();
        let file = buffered.into_inner().map_err(|e| DiskError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, out).map_err(io_err(out))?;
        Ok((size, sha))
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than a stray temporary file.
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_root_is_last() {
        let l = Layout::new(3072, 100);
        assert_eq!(l.bios, (2048, 4095));
        assert_eq!(l.esp, (4096, 4096 + 100 * 2048 - 1));
        assert_eq!(l.root.0, 4096 + 100 * 2048);
        assert_eq!(l.root.0 % 2048, 0);
        assert_eq!(l.root.1, 3071 * 2048 - 1);
        assert_eq!(l.bytes(), 3 << 30);
    }

    #[test]
    fn signature_areas_are_the_edges_of_the_disk_and_of_each_partition() {
        let l = Layout::new(3072, 100);
        let areas = l.signature_areas();
        let mib = MIB;
        assert_eq!(
            areas[..4],
            [(0, mib), (3071 * mib, mib), (mib, mib), (mib, mib)]
        );
        assert_eq!(areas[4..6], [(2 * mib, mib), (101 * mib, mib)]);
        assert_eq!(areas[6], (102 * mib, mib));
        // The root ends where the disk's last MiB (the backup GPT's) begins.
        assert_eq!(areas[7], (3070 * mib, mib));
    }

    #[test]
    fn debugfs_extents_are_parsed_and_index_blocks_skipped() {
        let text =
            "\n(ETB0):1000, (0-8191):139265-147456, (8192):150000,\n(8193-8200):160000-160007\n";
        assert_eq!(
            parse_extents(text),
            [(139_265, 147_456), (150_000, 150_000), (160_000, 160_007)]
        );
    }

    #[test]
    fn ids_are_stable_per_seed() {
        let a = Ids::derive("0123456789abcdef");
        assert_eq!(a, Ids::derive("0123456789abcdef"));
        assert_ne!(a, Ids::derive("fedcba9876543210"));
        assert_eq!(a.root_uuid.len(), 36);
        assert_eq!(a.root_uuid.as_bytes()[14], b'4');
        assert_eq!(a.esp_text().len(), 9);
        let table = gpt(&Layout::new(2048, 64), &a).unwrap();
        let info = partition_info(&table);
        assert_eq!(info.len(), 3);
        assert_eq!(info[2].number, ROOT_PARTITION);
        assert_eq!(info[1].type_guid, Guid::ESP);
    }

    fn decompress(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::Decoder::new(File::open(path).unwrap())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn compressed_images_carry_their_size_and_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw");
        let mut f = File::create(&raw).unwrap();
        f.set_len(16 << 20).unwrap();
        for (at, byte) in [(0u64, 1u8), (10 << 20, 2), ((16 << 20) - 4096, 4)] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(f);
        let out = tmp.path().join("raw.zst");
        let (size, sha) = compress(&raw, &out, 3).unwrap();
        assert_eq!(manifest::sha256_file(&out).unwrap(), (size, sha));
        let bytes = fs::read(&out).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&bytes[..18]).unwrap(),
            Some(16 << 20)
        );
        assert_eq!(decompress(&out), fs::read(&raw).unwrap());
    }
}
