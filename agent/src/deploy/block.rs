//! Disks: choosing one, its partitions, wiping signatures, the block-device ioctls, and the
//! GPT fix-up after a smaller image was written to a larger disk.
//!
//! The ioctl numbers are from `<linux/fs.h>`; all `unsafe` of this module is in their
//! nix-generated wrappers, each called on a file this module opened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use nix::errno::Errno;
use stork_proto::inventory::Disk;

use super::stream::Sink;

/// GPT root partition type for x86-64 (Discoverable Partitions Specification).
const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
/// GPT EFI system partition type (UEFI specification).
const ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// ext2/3/4 superblock magic 0xEF53, little-endian at byte 1080 (superblock at 1024, +56).
const EXT4_MAGIC_OFFSET: u64 = 1080;
const MIB: u64 = 1 << 20;

mod ioctl {
    // BLKRRPART = _IO(0x12, 95): re-read the partition table.
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): the device's size in bytes.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKZEROOUT = _IO(0x12, 127) taking u64[2] {start, length}: the number says _IO, the
    // argument is a pointer anyway, hence the "bad" form.
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
    // BLKFLSBUF = _IO(0x12, 97): write back and drop the device's cached pages.
    nix::ioctl_none!(blkflsbuf, 0x12, 97);
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no disk found (is the storage driver in the initrd?)")]
    NoDisks,
    #[error(transparent)]
    Choose(#[from] stork_proto::inventory::ChooseError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} on {path}")]
    Ioctl {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("partition table of {path}")]
    Gpt {
        path: PathBuf,
        #[source]
        source: gptman::Error,
    },
    #[error("no ext4 root partition on {disk} (partitions: {present})")]
    NoRoot { disk: String, present: String },
    #[error(
        "{path} is not erased: reading it back found a non-zero byte at byte {at} \
         (in the {len}-byte sample at {start})"
    )]
    NotErased {
        path: PathBuf,
        at: u64,
        start: u64,
        len: u64,
    },
}

/// Picks the target disk ([`stork_proto::inventory::choose_disk`]).
pub fn choose<'a>(
    disks: &'a [Disk],
    requested: Option<&str>,
    need: Option<u64>,
) -> Result<&'a Disk, DiskError> {
    Ok(stork_proto::inventory::choose_disk(disks, requested, need)?)
}

/// A partition as the kernel sees it (`/sys/block/<disk>/<part>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Kernel name, e.g. `vda3`, `nvme0n1p3`.
    pub name: String,
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// GPT partition name (`PARTNAME=` in its uevent).
    pub label: Option<String>,
}

/// The partitions of `disk`, by number, read from `sys` (normally /sys).
pub fn partitions(sys: &Path, disk: &str) -> Vec<Partition> {
    let dir = sys.join("block").join(disk);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let read = |p: PathBuf| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let mut parts: Vec<Partition> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let p = dir.join(&name);
            let number = read(p.join("partition"))?.parse().ok()?;
            // sysfs counts 512-byte sectors whatever the logical block size.
            let start: u64 = read(p.join("start"))?.parse().ok()?;
            let size: u64 = read(p.join("size"))?.parse().ok()?;
            let label = read(p.join("uevent")).and_then(|u| {
                u.lines()
                    .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_string))
            });
            Some(Partition {
                name,
                number,
                start_bytes: start * 512,
                size_bytes: size * 512,
                label,
            })
        })
        .collect();
    parts.sort_by_key(|p| p.number);
    parts
}

/// An open whole-disk block device.
pub struct BlockDevice {
    pub path: PathBuf,
    file: File,
    size: u64,
    /// The same device opened with `O_DIRECT`, for aligned writes (see [`write_direct`]);
    /// `None` where the device refuses it.
    direct: Option<File>,
    /// The aligned copy of an unaligned buffer on its way to `direct`.
    bounce: Vec<u8>,
}

/// What `O_DIRECT` writes are aligned to: the page size, a multiple of every logical block
/// size a disk has in practice.
const DIRECT_ALIGN: usize = 4096;
/// The most [`write_direct`] hands the kernel in one call.
const DIRECT_CHUNK: usize = 4 << 20;

/// Writes `data` at `offset` (both aligned to [`DIRECT_ALIGN`]) through `direct`, copying
/// through `bounce` what is not at an aligned address. Through the page cache, the image's
/// 869 MiB of data took 16 s to write in a QEMU guest where `dd oflag=direct` writes them in
/// 2 s: the writer waited on dirty-page throttling and the flusher's write-back.
fn write_direct(direct: &File, bounce: &mut Vec<u8>, offset: u64, data: &[u8]) -> io::Result<()> {
    if bounce.len() < DIRECT_CHUNK + DIRECT_ALIGN {
        bounce.resize(DIRECT_CHUNK + DIRECT_ALIGN, 0);
    }
    let skip = bounce.as_ptr().align_offset(DIRECT_ALIGN);
    let aligned = &mut bounce[skip..skip + DIRECT_CHUNK];
    let mut at = offset;
    for piece in data.chunks(DIRECT_CHUNK) {
        if piece.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            direct.write_all_at(piece, at)?;
        } else {
            let copy = &mut aligned[..piece.len()];
            copy.copy_from_slice(piece);
            direct.write_all_at(copy, at)?;
        }
        at += piece.len() as u64;
    }
    Ok(())
}

impl BlockDevice {
    /// Opens `/dev/<name>` read-write and exclusively: `O_EXCL` on a block device fails with
    /// EBUSY while anything has it (or a partition of it) mounted.
    pub fn open(dev_dir: &Path, name: &str) -> Result<Self, DiskError> {
        let path = dev_dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| DiskError::Io {
                what: "open",
                path: path.clone(),
                source,
            })?;
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which `size` is.
        unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(|source| {
            DiskError::Ioctl {
                what: "BLKGETSIZE64",
                path: path.clone(),
                source,
            }
        })?;
        // Not O_EXCL: the first descriptor holds the claim, which refuses a second one.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&path)
            .ok();
        Ok(Self {
            path,
            file,
            size,
            direct,
            bounce: Vec::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open device, for ioctls of other modules (NVMe passthrough).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes back and drops the kernel's cached pages of the device: after a command that
    /// changed the medium behind the cache's back (an NVMe format), reads must go to the disk.
    pub fn drop_caches(&self) -> Result<(), DiskError> {
        // SAFETY: BLKFLSBUF takes no argument.
        unsafe { ioctl::blkflsbuf(self.file.as_raw_fd()) }
            .map(drop)
            .map_err(|source| DiskError::Ioctl {
                what: "BLKFLSBUF",
                path: self.path.clone(),
                source,
            })
    }

    /// Reads `samples` (offset, length) back from the disk itself (`O_DIRECT`: not from the
    /// page cache) and fails at the first non-zero byte. Returns the bytes read.
    pub fn check_zeros(&self, samples: &[(u64, u64)]) -> Result<u64, DiskError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| DiskError::Io { what, path, source }
        };
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(io("open for reading back (O_DIRECT)"))?;
        match first_nonzero(&direct, samples).map_err(io("reading back"))? {
            None => Ok(samples.iter().map(|(_, len)| len).sum()),
            Some((at, (start, len))) => Err(DiskError::NotErased {
                path: self.path.clone(),
                at,
                start,
                len,
            }),
        }
    }

    fn zeroout(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let range = [offset, len];
        // SAFETY: BLKZEROOUT reads a u64[2] {start, length} through the pointer, which
        // `range` is, alive for the call; the kernel checks alignment and bounds.
        unsafe { ioctl::blkzeroout(self.file.as_raw_fd(), &range) }.map(drop)
    }

    /// Re-reads the partition table, retrying while the kernel still holds the old one busy.
    pub fn reread_partitions(&self) -> Result<(), DiskError> {
        let mut last = Errno::EBUSY;
        for _ in 0..20 {
            // SAFETY: BLKRRPART takes no argument.
            match unsafe { ioctl::blkrrpart(self.file.as_raw_fd()) } {
                Ok(_) => return Ok(()),
                Err(e @ Errno::EBUSY) => {
                    last = e;
                    sleep(Duration::from_millis(250));
                }
                Err(source) => {
                    return Err(DiskError::Ioctl {
                        what: "BLKRRPART",
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Err(DiskError::Ioctl {
            what: "BLKRRPART",
            path: self.path.clone(),
            source: last,
        })
    }

    /// Moves the backup GPT to the end of the disk and grows the root partition (the last one,
    /// when it is the root) to fill the disk. Returns the root's new size in bytes, or `None`
    /// when the disk has no GPT or nothing to grow. The ext4 file system inside is grown by the
    /// installed OS (cloud-init `resizefs`, run on every boot by default).
    pub fn grow_gpt(&mut self) -> Result<Option<u64>, DiskError> {
        let gpt_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DiskError::Gpt { path, source }
        };
        let mut gpt = match gptman::GPT::read_from(&mut self.file, 512) {
            Ok(g) => g,
            Err(_) => return Ok(None),
        };
        let old_last = gpt.header.last_usable_lba;
        gpt.header
            .update_from(&mut self.file, 512)
            .map_err(gpt_err(&self.path))?;
        let last_usable = gpt.header.last_usable_lba;
        // The partition that ends last, if it is a root partition or named `root`.
        let root_guid = gptman_guid(ROOT_X86_64);
        let last = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .max_by_key(|(_, p)| p.ending_lba)
            .map(|(i, p)| {
                (
                    i,
                    p.partition_type_guid,
                    p.partition_name.as_str().to_string(),
                )
            });
        let mut grown = None;
        if let Some((i, type_guid, name)) = last
            && (Some(type_guid) == root_guid || name == "root")
        {
            let p = &mut gpt[i];
            if p.ending_lba < last_usable {
                p.ending_lba = last_usable;
                grown = Some((p.ending_lba - p.starting_lba + 1) * 512);
            }
        }
        if grown.is_none() && last_usable == old_last {
            return Ok(None);
        }
        gpt.write_into(&mut self.file)
            .map_err(gpt_err(&self.path))?;
        self.file.sync_all().map_err(|source| DiskError::Io {
            what: "fsync",
            path: self.path.clone(),
            source,
        })?;
        Ok(grown)
    }

    /// The 1-based number of the disk's EFI system partition, if its GPT has one.
    pub fn esp_number(&mut self) -> Option<u32> {
        let gpt = gptman::GPT::read_from(&mut self.file, 512).ok()?;
        let esp = gptman_guid(ESP)?;
        gpt.iter()
            .find(|(_, p)| p.is_used() && p.partition_type_guid == esp)
            .map(|(i, _)| i)
    }
}

/// A GPT type GUID in gptman's on-disk byte order (first three fields little-endian).
fn gptman_guid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let bytes = hex::decode(hex).ok()?;
    let mut b: [u8; 16] = bytes.try_into().ok()?;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

impl Sink for BlockDevice {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(direct) = &self.direct
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
        {
            match write_direct(direct, &mut self.bounce, offset, data) {
                Ok(()) => return Ok(()),
                // A device that wants another alignment: the page cache serves from now on
                // (and writes this buffer again, whole).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        // The kernel keeps the two descriptors coherent: a direct write writes back and
        // drops the cached pages of its range first.
        self.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // The kernel offloads this (WRITE ZEROES / UNMAP with zeroing) or writes zero pages.
        self.zeroout(offset, len).map_err(io::Error::from)
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.size)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// Zeroes the places where partition tables and file-system or RAID signatures live
/// ([`signature_areas`](stork_proto::blockmap::signature_areas): the first and last MiB of
/// the disk and of each partition, clamped to the disk, as a stale partition table may
/// describe more than there is). Returns the number of ranges zeroed.
pub fn wipe_signatures(
    sink: &mut dyn Sink,
    disk_size: u64,
    parts: &[Partition],
) -> io::Result<usize> {
    let parts: Vec<(u64, u64)> = parts
        .iter()
        .map(|p| (p.start_bytes, p.size_bytes))
        .collect();
    let areas = stork_proto::blockmap::signature_areas(disk_size, &parts);
    for &(offset, len) in &areas {
        sink.write_at(offset, &vec![0u8; len as usize])?;
    }
    sink.sync()?;
    Ok(areas.len())
}

/// The first non-zero byte in `samples` of `file`, with the sample it is in. The buffer is
/// page-aligned and the samples are whole MiB (or the whole of a smaller disk), as `O_DIRECT`
/// reads of a block device want.
pub fn first_nonzero(file: &File, samples: &[(u64, u64)]) -> io::Result<Option<(u64, (u64, u64))>> {
    const ALIGN: usize = 4096;
    let mut backing = vec![0u8; MIB as usize + ALIGN];
    let skip = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[skip..skip + MIB as usize];
    for &(start, len) in samples {
        let mut off = start;
        while off < start + len {
            let n = MIB.min(start + len - off) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
                return Ok(Some((off + i as u64, (start, len))));
            }
            off += n as u64;
        }
    }
    Ok(None)
}

/// The read-back plan of a quick erase: the first and last MiB, where the partition tables
/// (MBR, primary and backup GPT) live.
pub fn edge_samples(disk_size: u64) -> Vec<(u64, u64)> {
    let len = MIB.min(disk_size);
    let mut v = vec![(0, len)];
    if disk_size > len {
        v.push((disk_size - len, len));
    }
    v
}

/// The read-back plan of a full erase: the first and last MiB and one MiB at a position
/// drawn from `seed` in each of `n` equal stretches between them, so that the samples cover
/// the whole disk and are not where a device could guess them.
pub fn spread_samples(disk_size: u64, n: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut v = edge_samples(disk_size);
    // Whole MiB strictly between the first and the last one.
    let inner = (disk_size / MIB).saturating_sub(2);
    if inner == 0 || n == 0 {
        return v;
    }
    let n = n.min(inner);
    // xorshift's one fixed point is zero.
    let mut x = if seed == 0 {
        0x9E37_79B9_7F4A_7C15
    } else {
        seed
    };
    for i in 0..n {
        // xorshift64: cheap and enough to keep the positions from being predictable.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (from, to) = (inner * i / n, inner * (i + 1) / n);
        let mib = 1 + from + x % (to - from);
        v.push((mib * MIB, MIB));
    }
    v.sort_unstable();
    v
}

/// Whether the device or file at `path` starts with an ext2/3/4 superblock.
pub fn is_ext4(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(EXT4_MAGIC_OFFSET))?;
            f.read_exact(&mut magic)
        })
        .is_ok()
        && magic == [0x53, 0xEF]
}

/// The UUID of the ext2/3/4 file system on the device or file at `path` (`s_uuid`, 104
/// bytes into the superblock), if it has one.
pub fn ext4_uuid(path: &Path) -> Option<[u8; 16]> {
    if !is_ext4(path) {
        return None;
    }
    let mut uuid = [0u8; 16];
    let mut f = File::open(path).ok()?;
    f.seek(SeekFrom::Start(1024 + 104)).ok()?;
    f.read_exact(&mut uuid).ok()?;
    Some(uuid)
}

/// The partitions of disks other than `disk` (kernel names, from `sys` and `dev_dir`) whose
/// ext4 file system has `uuid`: an earlier install of the same raw image, which the installed
/// OS, finding its root by UUID, could mount instead of its own.
pub fn ext4_twins(
    sys: &Path,
    dev_dir: &Path,
    disks: &[String],
    disk: &str,
    uuid: &[u8; 16],
) -> Vec<String> {
    disks
        .iter()
        .filter(|d| d.as_str() != disk)
        .flat_map(|d| partitions(sys, d))
        .filter(|p| ext4_uuid(&dev_dir.join(&p.name)).as_ref() == Some(uuid))
        .map(|p| p.name)
        .collect()
}

/// The root partition: the one named `root`, else the largest with an ext4 superblock.
pub fn find_root<'a>(
    dev_dir: &Path,
    disk: &str,
    parts: &'a [Partition],
) -> Result<&'a Partition, DiskError> {
    let ext4: Vec<&Partition> = parts
        .iter()
        .filter(|p| is_ext4(&dev_dir.join(&p.name)))
        .collect();
    ext4.iter()
        .find(|p| p.label.as_deref() == Some("root"))
        .or_else(|| ext4.iter().max_by_key(|p| p.size_bytes))
        .copied()
        .ok_or_else(|| DiskError::NoRoot {
            disk: disk.to_string(),
            present: if parts.is_empty() {
                "none".to_string()
            } else {
                parts
                    .iter()
                    .map(|p| format!("{} ({})", p.name, p.label.as_deref().unwrap_or("no name")))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// Waits until every partition's device node exists (devtmpfs makes them as the kernel
/// registers the partitions).
pub fn wait_for_nodes(dev_dir: &Path, parts: &[Partition], timeout: Duration) -> bool {
    crate::net::poll_until(timeout, Duration::from_millis(50), || {
        parts
            .iter()
            .all(|p| dev_dir.join(&p.name).exists())
            .then_some(())
    })
    .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_writes_copy_unaligned_buffers_and_land_where_asked() {
        // A file under the build's target directory stands for the disk (a disk-backed file
        // system takes O_DIRECT; tmpfs, often /tmp, does not, and the test then says so).
        let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../target");
        let dir = tempfile::tempdir_in(target).unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xA5u8; 12 << 20]).unwrap();
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("O_DIRECT on the test's file system");
        // 9 MiB at a 1-byte offset into its allocation: unaligned, and more than a chunk.
        let backing: Vec<u8> = (0..(9 << 20) + 1).map(|i| (i % 251) as u8).collect();
        let data = &backing[1..];
        let mut bounce = Vec::new();
        write_direct(&direct, &mut bounce, 2 << 20, data).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..2 << 20].iter().all(|b| *b == 0xA5));
        assert!(disk[2 << 20..11 << 20] == *data, "the data differs");
        assert!(disk[11 << 20..].iter().all(|b| *b == 0xA5));
    }

    #[test]
    fn reads_partitions_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        put("block/vda/size", "8388608\n");
        put("block/vda/vda3/partition", "3\n");
        put("block/vda/vda3/start", "208896\n");
        put("block/vda/vda3/size", "6082527\n");
        put(
            "block/vda/vda3/uevent",
            "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME=root\n",
        );
        put("block/vda/vda1/partition", "1\n");
        put("block/vda/vda1/start", "2048\n");
        put("block/vda/vda1/size", "2048\n");
        put("block/vda/queue/rotational", "1\n");
        let parts = partitions(dir.path(), "vda");
        assert_eq!(
            parts,
            [
                Partition {
                    name: "vda1".into(),
                    number: 1,
                    start_bytes: 2048 * 512,
                    size_bytes: 2048 * 512,
                    label: None,
                },
                Partition {
                    name: "vda3".into(),
                    number: 3,
                    start_bytes: 208896 * 512,
                    size_bytes: 6082527 * 512,
                    label: Some("root".into()),
                },
            ]
        );
        assert!(partitions(dir.path(), "vdz").is_empty());
    }

    #[test]
    fn finds_another_disks_file_system_with_the_same_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        fs::create_dir_all(&dev).unwrap();
        let part = |disk: &str, name: &str, uuid: Option<u8>| {
            let p = sys.join("block").join(disk).join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("partition"), &name[name.len() - 1..]).unwrap();
            fs::write(p.join("start"), "2048").unwrap();
            fs::write(p.join("size"), "2048").unwrap();
            // An ext4 superblock's magic and UUID, or nothing (a FAT ESP, say).
            let mut b = vec![0u8; 4096];
            if let Some(u) = uuid {
                b[1080..1082].copy_from_slice(&[0x53, 0xEF]);
                b[1128..1144].fill(u);
            }
            fs::write(dev.join(name), b).unwrap();
        };
        part("nvme0n1", "nvme0n1p3", Some(7));
        part("nvme0n1", "nvme0n1p2", None);
        part("sda", "sda3", Some(7));
        part("sda", "sda1", None);
        part("vda", "vda1", Some(8));
        assert_eq!(ext4_uuid(&dev.join("sda3")), Some([7; 16]));
        assert_eq!(ext4_uuid(&dev.join("sda1")), None);
        let disks: Vec<String> = ["nvme0n1", "sda", "vda"].map(String::from).to_vec();
        assert_eq!(
            ext4_twins(&sys, &dev, &disks, "nvme0n1", &[7; 16]),
            ["sda3"]
        );
        // The disk just written is not its own twin; another UUID has none.
        assert!(ext4_twins(&sys, &dev, &disks[..1], "nvme0n1", &[7; 16]).is_empty());
        assert!(ext4_twins(&sys, &dev, &disks, "vda", &[8; 16]).is_empty());
    }

    struct FileSink(File);
    impl Sink for FileSink {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write_all_at(data, offset)
        }
        fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.0.write_all_at(&vec![0; len as usize], offset)
        }
        fn capacity(&self) -> Option<u64> {
            None
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn wipes_table_and_superblocks_and_finds_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let size = 16 * MIB;
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&vec![0xFF; size as usize], 0).unwrap();
        // An ext4 magic at the start of a "partition" at 4 MiB, and on the whole file.
        f.write_all_at(&[0x53, 0xEF], 4 * MIB + EXT4_MAGIC_OFFSET)
            .unwrap();
        f.write_all_at(&[0x53, 0xEF], EXT4_MAGIC_OFFSET).unwrap();
        assert!(is_ext4(&path));
        let parts = [Partition {
            name: "p1".into(),
            number: 1,
            start_bytes: 4 * MIB,
            size_bytes: 8 * MIB,
            label: None,
        }];
        let n = wipe_signatures(&mut FileSink(f.try_clone().unwrap()), size, &parts).unwrap();
        assert_eq!(n, 4);
        let mut all = vec![0; size as usize];
        f.read_exact_at(&mut all, 0).unwrap();
        let zero = |a: u64, b: u64| all[a as usize..b as usize].iter().all(|x| *x == 0);
        let ff = |a: u64, b: u64| all[a as usize..b as usize].iter().all(|x| *x == 0xFF);
        assert!(zero(0, MIB) && zero(15 * MIB, 16 * MIB));
        assert!(zero(4 * MIB, 5 * MIB) && zero(11 * MIB, 12 * MIB));
        assert!(ff(MIB, 4 * MIB) && ff(5 * MIB, 11 * MIB) && ff(12 * MIB, 15 * MIB));
        assert!(!is_ext4(&path));
    }

    #[test]
    fn read_back_plans_cover_both_ends_and_the_middle() {
        assert_eq!(edge_samples(16 * MIB), [(0, MIB), (15 * MIB, MIB)]);
        // A disk smaller than a MiB is read whole, once.
        assert_eq!(edge_samples(4096), [(0, 4096)]);
        let size = 10 * 1024 * MIB + 512 * 3;
        let plan = spread_samples(size, 64, 42);
        assert_eq!(plan.len(), 66);
        assert_eq!(plan[0], (0, MIB));
        assert_eq!(plan[65], (size - MIB, MIB));
        // One MiB in each sixty-fourth of the disk, MiB-aligned, none on an edge sample.
        let inner = size / MIB - 2;
        for (i, (off, len)) in plan[1..65].iter().enumerate() {
            let i = i as u64;
            assert_eq!((*len, off % MIB), (MIB, 0));
            let mib = off / MIB;
            assert!(
                mib > inner * i / 64 && mib <= inner * (i + 1) / 64,
                "{i}: {mib}"
            );
        }
        assert_ne!(plan, spread_samples(size, 64, 43));
        // Fewer MiB than samples: every inner MiB once.
        assert_eq!(spread_samples(4 * MIB, 64, 1).len(), 4);
        assert_eq!(spread_samples(MIB, 64, 1), [(0, MIB)]);
    }

    #[test]
    fn read_back_finds_the_first_non_zero_byte() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 * MIB).unwrap();
        let plan = spread_samples(8 * MIB, 64, 7);
        assert_eq!(first_nonzero(&f, &plan).unwrap(), None);
        f.write_all_at(&[1], 8 * MIB - 1).unwrap();
        assert_eq!(
            first_nonzero(&f, &plan).unwrap(),
            Some((8 * MIB - 1, (7 * MIB, MIB)))
        );
        // A sample past the end of the file is an error, not a pass.
        assert!(first_nonzero(&f, &[(8 * MIB, MIB)]).is_err());
    }

    #[test]
    fn gpt_guids_in_disk_order() {
        assert_eq!(
            gptman_guid(ROOT_X86_64).unwrap(),
            [
                0xE3, 0xBC, 0x68, 0x4F, 0xCD, 0xE8, 0xB1, 0x4D, 0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84,
                0xB7, 0x09
            ]
        );
    }
}
