//! `stork-image write`: a disk image onto a USB stick or disk, the way Raspberry Pi Imager and
//! balenaEtcher do it, with the checks that keep it from overwriting the wrong disk.
//!
//! Three steps, so the caller can talk to the user in between:
//!
//! 1. [`plan`] opens the image (raw, or one zstd frame whose header gives the size) and looks
//!    at the target without opening it for writing. It refuses a target that is not a block
//!    device (a regular file only with `allow_file`), a partition instead of a whole disk, the
//!    disk that holds the running system (`/`, `/boot`, `/boot/efi`, `/usr`, followed through
//!    partitions and device-mapper/md to the whole disks), a disk any of whose nodes (itself,
//!    its partitions, their holders such as dm/LVM, loop devices on them) is mounted or swap,
//!    or that has anything stacked on it at all, one smaller than the image (`BLKGETSIZE64`)
//!    and a read-only one (`BLKROGET`).
//! 2. [`confirm`]: the user types `yes`, or the caller passed `--yes`; without a terminal and
//!    without `--yes` it refuses instead of waiting on a stdin nobody types into.
//! 3. [`execute`] checks the mounts again (the user may have taken minutes to answer), opens the
//!    device with `O_EXCL` (the kernel refuses while anything mounts or claims it) and
//!    `O_DIRECT` (progress is what reached the device, not the page cache), writes every byte
//!    in 4 MiB aligned chunks while hashing them (no skipping of zero runs: the stick holds old
//!    data), fsyncs, drops the device's cached pages (`BLKFLSBUF`; `posix_fadvise(DONTNEED)`
//!    for a file) and reads the written length back to compare SHA-256s.
//!
//! The checks read sysfs and the mount and swap tables through [`Host`], so tests give them a
//! made-up machine. The ioctl numbers are from `<linux/fs.h>`; the few `unsafe` calls (ioctl,
//! fcntl, posix_fadvise) are on a descriptor this module opened and pass no pointer other
//! than to a local integer.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Size of one write, and of one read when verifying.
pub const CHUNK: usize = 4 << 20;
/// Buffer alignment for `O_DIRECT`: the largest logical block size in use.
const ALIGN: usize = 4096;
/// Mount points whose disks hold the running system.
pub const SYSTEM_MOUNTS: [&str; 4] = ["/", "/boot", "/boot/efi", "/usr"];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest zstd frame header: magic, descriptor, window, dictionary id, content size.
const ZSTD_HEADER_MAX: usize = 18;
const MIB: f64 = 1_048_576.0;

mod ioctl {
    //! `_IOC(dir, 0x12, nr, size)` of `<asm-generic/ioctl.h>`; mips, powerpc and sparc put
    //! three direction bits at bit 29 and give "none" its own bit.

    #[cfg(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const DIR: (u32, u32) = (1 << 29, 2 << 29);
    #[cfg(not(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const DIR: (u32, u32) = (0, 2 << 30);

    pub(super) const fn blk(dir: u32, nr: u32, size: usize) -> libc::Ioctl {
        (dir | ((size as u32) << 16) | (0x12 << 8) | nr) as libc::Ioctl
    }

    /// `_IO(0x12, 94)`, int out: non-zero if the device is read-only.
    pub const BLKROGET: libc::Ioctl = blk(DIR.0, 94, 0);
    /// `_IO(0x12, 95)`: re-read the partition table.
    pub const BLKRRPART: libc::Ioctl = blk(DIR.0, 95, 0);
    /// `_IO(0x12, 97)`: write back and drop the device's cached pages.
    pub const BLKFLSBUF: libc::Ioctl = blk(DIR.0, 97, 0);
    /// `_IOR(0x12, 114, size_t)`, u64 out: the size in bytes.
    pub const BLKGETSIZE64: libc::Ioctl = blk(DIR.1, 114, size_of::<libc::size_t>());
    /// `_IO(0x12, 104)`, int out: the logical block size.
    pub const BLKSSZGET: libc::Ioctl = libc::BLKSSZGET;
    #[cfg(test)]
    pub(super) const NONE: u32 = DIR.0;
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
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
        source: io::Error,
    },
    #[error("the image {path} is not a regular file")]
    ImageNotFile { path: PathBuf },
    #[error("the image {path} is empty")]
    EmptyImage { path: PathBuf },
    #[error(
        "the image {path} is compressed with {format}; only raw and zstd images are read \
         (decompress it first)"
    )]
    UnsupportedCompression { path: PathBuf, format: &'static str },
    #[error(
        "the image {path} decompresses to {actual} bytes or more, but its zstd header says \
         {declared} (several frames?)"
    )]
    ImageLength {
        path: PathBuf,
        declared: u64,
        actual: u64,
    },
    #[error("{path} is {kind}, not a block device{}", file_hint(.kind))]
    NotBlockDevice { path: PathBuf, kind: &'static str },
    #[error("{path} is the image itself")]
    SameFile { path: PathBuf },
    #[error("{path} is partition {partition} of the disk {disk}: give the whole disk, /dev/{disk}")]
    Partition {
        path: PathBuf,
        partition: String,
        disk: String,
    },
    #[error("{path} holds the running system: {mount_point} is mounted from {node}, on this disk")]
    SystemDisk {
        path: PathBuf,
        mount_point: PathBuf,
        node: String,
    },
    #[error("{path} is in use: {node} is mounted on {mount_point}")]
    Mounted {
        path: PathBuf,
        node: String,
        mount_point: PathBuf,
    },
    #[error("{path} is in use: {node} is swap space ({swap}); swapoff it first")]
    Swap {
        path: PathBuf,
        node: String,
        swap: String,
    },
    #[error(
        "{path} is in use: {holder} is on {node} (device-mapper, LVM, md, a loop device, ...); \
         remove it first"
    )]
    Held {
        path: PathBuf,
        node: String,
        holder: String,
    },
    #[error(
        "the image is larger than {path}: {} ({image_size} bytes) does not fit in {} \
         ({device_size} bytes)",
        human(*.image_size),
        human(*.device_size)
    )]
    TooSmall {
        path: PathBuf,
        image_size: u64,
        device_size: u64,
    },
    #[error("{path} is read-only")]
    ReadOnly { path: PathBuf },
    #[error(
        "{path} is busy: the kernel refused an exclusive open (mounted, claimed by \
         device-mapper or md, or opened exclusively by another program)"
    )]
    Busy { path: PathBuf },
    #[error("stdin is not a terminal, so nobody can confirm overwriting {path}: pass --yes")]
    NoTerminal { path: PathBuf },
    #[error("not confirmed (the answer was {answer:?}, not \"yes\"): {path} left alone")]
    NotConfirmed { path: PathBuf, answer: String },
    #[error("reading {path} back: it ended at byte {at} of {len}")]
    ShortRead { path: PathBuf, at: u64, len: u64 },
    #[error(
        "verification failed: {path} reads back with sha256 {read}, but the image written \
         has sha256 {written}"
    )]
    Mismatch {
        path: PathBuf,
        written: String,
        read: String,
    },
}

fn file_hint(kind: &str) -> &'static str {
    if kind == "a regular file" {
        " (--allow-file writes to a file)"
    } else {
        ""
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// "3.0 GiB", "64.0 MiB", "512 bytes".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = None;
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = Some(u);
    }
    match unit {
        Some(u) => format!("{v:.1} {u}"),
        None => format!("{bytes} bytes"),
    }
}

/// A device number, `major:minor`.
pub type DevNo = (u32, u32);

fn dev_no(rdev: u64) -> DevNo {
    (libc::major(rdev), libc::minor(rdev))
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: DevNo,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo (proc(5)): `id parent major:minor root mount-point options
/// [optional fields] - fstype source super-options`. Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let mount_point = PathBuf::from(crate::rootfs::unescape_mountinfo(fields.get(4)?));
            let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some(Mount {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                mount_point,
                fstype: crate::rootfs::unescape_mountinfo(fields.get(sep + 1)?),
                source: crate::rootfs::unescape_mountinfo(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// The swap areas of /proc/swaps (first column; the first line is a header).
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(crate::rootfs::unescape_mountinfo)
        .collect()
}

/// What the checks look at: sysfs, the mount table and the swap list. [`Host::current`] is
/// this machine; tests build their own.
#[derive(Debug, Clone)]
pub struct Host {
    /// Normally `/sys`.
    pub sys: PathBuf,
    pub mounts: Vec<Mount>,
    pub swaps: Vec<String>,
}

impl Host {
    pub fn current() -> Result<Self, WriteError> {
        let mountinfo = Path::new("/proc/self/mountinfo");
        let mounts = fs::read_to_string(mountinfo).map_err(io_err("reading", mountinfo))?;
        // A kernel without swap support has no /proc/swaps: nothing is swap then.
        let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
        Ok(Self {
            sys: PathBuf::from("/sys"),
            mounts: parse_mountinfo(&mounts),
            swaps: parse_swaps(&swaps),
        })
    }

    fn block(&self, name: &str) -> PathBuf {
        self.sys.join("class/block").join(name)
    }

    fn read(&self, name: &str, file: &str) -> Option<String> {
        fs::read_to_string(self.block(name).join(file))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// The kernel name of a block device number (`/sys/dev/block/M:m` -> `sda1`).
    pub fn name_of(&self, dev: DevNo) -> Option<String> {
        let link = self.sys.join(format!("dev/block/{}:{}", dev.0, dev.1));
        let path = fs::canonicalize(link).ok()?;
        Some(path.file_name()?.to_str()?.to_owned())
    }

    fn dev_of(&self, name: &str) -> Option<DevNo> {
        let text = self.read(name, "dev")?;
        let (major, minor) = text.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    /// The whole disk a partition belongs to (its parent directory in sysfs).
    pub fn disk_of_partition(&self, name: &str) -> Option<String> {
        if !self.block(name).join("partition").exists() {
            return None;
        }
        let path = fs::canonicalize(self.block(name)).ok()?;
        Some(path.parent()?.file_name()?.to_str()?.to_owned())
    }

    fn entries(&self, dir: PathBuf) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Partitions of a disk: its sysfs subdirectories with a `partition` file.
    fn partitions(&self, name: &str) -> Vec<String> {
        self.entries(self.block(name))
            .into_iter()
            .filter(|p| self.block(name).join(p).join("partition").exists())
            .collect()
    }

    /// The whole disks under a device: itself, the disk of a partition, or (device-mapper, md)
    /// the disks under its slaves.
    pub fn whole_disks(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        let mut seen = BTreeSet::new();
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(disk) = self.disk_of_partition(&n) {
                todo.push(disk);
                continue;
            }
            let slaves = self.entries(self.block(&n).join("slaves"));
            if slaves.is_empty() {
                out.insert(n);
            } else {
                todo.extend(slaves);
            }
        }
        out
    }

    /// `/dev/<name>`, or `/dev/mapper/<name>` for device-mapper.
    fn node(&self, name: &str) -> String {
        match self.read(name, "dm/name") {
            Some(dm) => format!("/dev/mapper/{dm} ({name})"),
            None => format!("/dev/{name}"),
        }
    }

    /// The device a mount is on: its number, or for file systems that report a virtual one
    /// (btrfs) the block device its source names.
    fn mount_dev(m: &Mount) -> Vec<DevNo> {
        let mut devs = vec![m.dev];
        devs.extend(block_dev_of_path(&m.source));
        devs
    }

    /// Refuses if `name`, a partition of it, or anything stacked on them (device-mapper and md
    /// holders, loop devices backed by them) is mounted or swap, or (unmounted) stacked on at
    /// all.
    pub fn check_unused(&self, path: &Path, name: &str) -> Result<(), WriteError> {
        // Every node on top of the disk, each with the one it sits on.
        let mut nodes: Vec<(String, Option<String>)> = vec![(name.to_owned(), None)];
        let mut i = 0;
        while i < nodes.len() && i < 256 {
            let n = nodes[i].0.clone();
            let loops = self.dev_of(&n).map(|d| self.loops_on_block(d));
            let children: Vec<String> = self
                .partitions(&n)
                .into_iter()
                .chain(self.entries(self.block(&n).join("holders")))
                .chain(loops.into_iter().flatten())
                .filter(|c| !nodes.iter().any(|(seen, _)| seen == c))
                .collect();
            nodes.extend(children.into_iter().map(|c| (c, Some(n.clone()))));
            i += 1;
        }
        for (n, _) in &nodes {
            let Some(dev) = self.dev_of(n) else { continue };
            if let Some(m) = self
                .mounts
                .iter()
                .find(|m| Self::mount_dev(m).contains(&dev))
            {
                return Err(WriteError::Mounted {
                    path: path.to_owned(),
                    node: self.node(n),
                    mount_point: m.mount_point.clone(),
                });
            }
            if let Some(s) = self
                .swaps
                .iter()
                .find(|s| block_dev_of_path(s) == Some(dev))
            {
                return Err(WriteError::Swap {
                    path: path.to_owned(),
                    node: self.node(n),
                    swap: s.clone(),
                });
            }
        }
        let partitions: BTreeSet<String> = nodes
            .iter()
            .filter(|(n, _)| self.block(n).join("partition").exists())
            .map(|(n, _)| n.clone())
            .collect();
        if let Some((holder, Some(under))) =
            nodes.iter().skip(1).find(|(n, _)| !partitions.contains(n))
        {
            return Err(WriteError::Held {
                path: path.to_owned(),
                node: self.node(under),
                holder: self.node(holder),
            });
        }
        Ok(())
    }

    /// Refuses if `name` shares a whole disk with a mount of the running system.
    pub fn check_not_system(&self, path: &Path, name: &str) -> Result<(), WriteError> {
        let target = self.whole_disks(name);
        for mount_point in SYSTEM_MOUNTS {
            // The last of several mounts on one point is the one in use.
            let Some(m) = self
                .mounts
                .iter()
                .rev()
                .find(|m| m.mount_point == Path::new(mount_point))
            else {
                continue;
            };
            for dev in Self::mount_dev(m) {
                let Some(node) = self.name_of(dev) else {
                    continue;
                };
                if !self.whole_disks(&node).is_disjoint(&target) {
                    return Err(WriteError::SystemDisk {
                        path: path.to_owned(),
                        mount_point: m.mount_point.clone(),
                        node: self.node(&node),
                    });
                }
            }
        }
        Ok(())
    }

    /// Loop devices and what backs them.
    fn loops(&self) -> Vec<(String, fs::Metadata)> {
        self.entries(self.sys.join("class/block"))
            .into_iter()
            .filter_map(|n| {
                let backing = self.read(&n, "loop/backing_file")?;
                let m = fs::metadata(backing.trim_end_matches(" (deleted)")).ok()?;
                Some((n, m))
            })
            .collect()
    }

    /// Loop devices on the block device `dev` (`losetup --offset`, `mount -o loop,offset=`):
    /// neither a holder in sysfs nor an exclusive claim, so only their backing file tells.
    fn loops_on_block(&self, dev: DevNo) -> Vec<String> {
        self.loops()
            .into_iter()
            .filter(|(_, m)| m.file_type().is_block_device() && dev_no(m.rdev()) == dev)
            .map(|(n, _)| n)
            .collect()
    }

    /// Refuses a regular file that a loop device is on (naming a mount on it if there is one).
    pub fn check_file_unused(&self, path: &Path, file: &fs::Metadata) -> Result<(), WriteError> {
        let on_file: Vec<String> = self
            .loops()
            .into_iter()
            .filter(|(_, m)| m.dev() == file.dev() && m.ino() == file.ino())
            .map(|(n, _)| n)
            .collect();
        for lo in &on_file {
            self.check_unused(path, lo)?;
        }
        match on_file.first() {
            Some(lo) => Err(WriteError::Held {
                path: path.to_owned(),
                node: path.display().to_string(),
                holder: self.node(lo),
            }),
            None => Ok(()),
        }
    }

    /// Model, size and removable flag as sysfs has them.
    fn info(&self, name: &str) -> DeviceInfo {
        let model = [
            self.read(name, "device/vendor"),
            self.read(name, "device/model"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        let model = if !model.is_empty() {
            Some(model)
        } else {
            self.read(name, "loop/backing_file")
                .map(|b| format!("loop device on {b}"))
        };
        DeviceInfo {
            name: Some(name.to_owned()),
            model,
            // sysfs counts 512-byte sectors whatever the logical block size.
            size: self
                .read(name, "size")
                .and_then(|s| s.parse::<u64>().ok())
                .map(|s| s * 512),
            removable: self.read(name, "removable").map(|r| r == "1"),
        }
    }
}

/// The number of the block device at `path`, if it is one.
fn block_dev_of_path(path: &str) -> Option<DevNo> {
    if !path.starts_with('/') {
        return None;
    }
    let m = fs::metadata(path).ok()?;
    m.file_type().is_block_device().then(|| dev_no(m.rdev()))
}

/// The image to write.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    pub zstd: bool,
    /// Bytes written to the device (after decompression).
    pub size: u64,
    /// The zstd header had no size: it was found by decompressing the image once.
    pub measured: bool,
    /// Identifies the file, to refuse writing it onto itself.
    id: (u64, u64),
}

impl Image {
    pub fn open(path: &Path) -> Result<Self, WriteError> {
        let mut f = File::open(path).map_err(io_err("opening the image", path))?;
        let meta = f.metadata().map_err(io_err("reading", path))?;
        if !meta.is_file() {
            return Err(WriteError::ImageNotFile {
                path: path.to_owned(),
            });
        }
        let mut head = Vec::with_capacity(ZSTD_HEADER_MAX);
        (&mut f)
            .take(ZSTD_HEADER_MAX as u64)
            .read_to_end(&mut head)
            .map_err(io_err("reading", path))?;
        let foreign = [
            (&[0xfd, b'7', b'z', b'X', b'Z', 0][..], "xz"),
            (&[0x1f, 0x8b][..], "gzip"),
        ];
        if let Some(&(_, format)) = foreign.iter().find(|(magic, _)| head.starts_with(magic)) {
            return Err(WriteError::UnsupportedCompression {
                path: path.to_owned(),
                format,
            });
        }
        let zstd = head.starts_with(&ZSTD_MAGIC);
        let (size, measured) = if !zstd {
            (meta.len(), false)
        } else {
            // The sum of the frames' sizes: an OS image's `.raw.zst` is many frames (its
            // block map's), the first of which is not the whole image.
            match crate::blockmap::zstd_content_size(path) {
                Ok(Some(size)) => (size, false),
                // No size in the header (a streamed `zstd -`): count the bytes once.
                _ => {
                    let mut dec = zstd::Decoder::new(
                        File::open(path).map_err(io_err("opening the image", path))?,
                    )
                    .map_err(io_err("decompressing", path))?;
                    let n = io::copy(&mut dec, &mut io::sink())
                        .map_err(io_err("decompressing", path))?;
                    (n, true)
                }
            }
        };
        if size == 0 {
            return Err(WriteError::EmptyImage {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            zstd,
            size,
            measured,
            id: (meta.dev(), meta.ino()),
        })
    }

    fn reader(&self) -> Result<Box<dyn Read>, WriteError> {
        let f = File::open(&self.path).map_err(io_err("opening the image", &self.path))?;
        Ok(if self.zstd {
            Box::new(zstd::Decoder::new(f).map_err(io_err("decompressing", &self.path))?)
        } else {
            Box::new(f)
        })
    }
}

/// What sysfs says about the target, for the confirmation.
#[derive(Debug, Clone, Default)]
pub struct DeviceInfo {
    /// Kernel name (`sdb`); none for a regular file.
    pub name: Option<String>,
    /// Vendor and model, e.g. `SanDisk Cruzer Blade`.
    pub model: Option<String>,
    pub size: Option<u64>,
    pub removable: Option<bool>,
}

/// A checked target.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    /// A block device (else a regular file, with `allow_file`).
    pub block: bool,
    /// Capacity in bytes: BLKGETSIZE64, or a file's length.
    pub size: u64,
    pub info: DeviceInfo,
}

#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub image: &'a Path,
    pub device: &'a Path,
    /// Accept a regular file as the target (tests and CI); it is written in place and must
    /// already be as large as the image.
    pub allow_file: bool,
}

/// An image and a target that passed every check.
#[derive(Debug, Clone)]
pub struct Plan {
    pub image: Image,
    pub target: Target,
}

/// Opens the image and checks the target without opening it for writing.
pub fn plan(req: &Request<'_>, host: &Host) -> Result<Plan, WriteError> {
    let image = Image::open(req.image)?;
    let target = inspect(req.device, req.allow_file, &image, host)?;
    check_fits(&image, &target)?;
    Ok(Plan { image, target })
}

/// Refuses an image larger than the target.
pub fn check_fits(image: &Image, target: &Target) -> Result<(), WriteError> {
    if image.size > target.size {
        return Err(WriteError::TooSmall {
            path: target.path.clone(),
            image_size: image.size,
            device_size: target.size,
        });
    }
    Ok(())
}

fn kind(t: fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

fn inspect(
    path: &Path,
    allow_file: bool,
    image: &Image,
    host: &Host,
) -> Result<Target, WriteError> {
    let meta = fs::metadata(path).map_err(io_err("looking at", path))?;
    let ft = meta.file_type();
    if (meta.dev(), meta.ino()) == image.id {
        return Err(WriteError::SameFile {
            path: path.to_owned(),
        });
    }
    if ft.is_file() && allow_file {
        host.check_file_unused(path, &meta)?;
        return Ok(Target {
            path: path.to_owned(),
            block: false,
            size: meta.len(),
            info: DeviceInfo {
                model: Some("regular file (--allow-file)".into()),
                size: Some(meta.len()),
                ..DeviceInfo::default()
            },
        });
    }
    if !ft.is_block_device() {
        return Err(WriteError::NotBlockDevice {
            path: path.to_owned(),
            kind: kind(ft),
        });
    }
    let dev = dev_no(meta.rdev());
    let name = host.name_of(dev).ok_or_else(|| WriteError::Io {
        what: "finding in /sys/dev/block the device",
        path: path.to_owned(),
        source: io::ErrorKind::NotFound.into(),
    })?;
    if let Some(disk) = host.disk_of_partition(&name) {
        return Err(WriteError::Partition {
            path: path.to_owned(),
            partition: name,
            disk,
        });
    }
    // The system check first: its reason is the one to read when both apply.
    host.check_not_system(path, &name)?;
    host.check_unused(path, &name)?;

    // Read-only: opening a block device for reading changes nothing.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening for reading", path))?;
    let size = ioctl_u64(&f, ioctl::BLKGETSIZE64, "BLKGETSIZE64", path)?;
    if ioctl_int(&f, ioctl::BLKROGET, "BLKROGET", path)? != 0 {
        return Err(WriteError::ReadOnly {
            path: path.to_owned(),
        });
    }
    Ok(Target {
        path: path.to_owned(),
        block: true,
        size,
        info: host.info(&name),
    })
}

fn ioctl_u64(
    f: &File,
    req: libc::Ioctl,
    what: &'static str,
    path: &Path,
) -> Result<u64, WriteError> {
    let mut v = 0u64;
    // SAFETY: the request writes one u64 through the pointer, which `v` is.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v as *mut u64) };
    if r < 0 {
        return Err(ioctl_err(what, path));
    }
    Ok(v)
}

fn ioctl_int(
    f: &File,
    req: libc::Ioctl,
    what: &'static str,
    path: &Path,
) -> Result<i32, WriteError> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int through the pointer, which `v` is.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(ioctl_err(what, path));
    }
    Ok(v)
}

fn ioctl_none(
    f: &File,
    req: libc::Ioctl,
    what: &'static str,
    path: &Path,
) -> Result<(), WriteError> {
    // SAFETY: the request takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, 0) };
    if r < 0 {
        return Err(ioctl_err(what, path));
    }
    Ok(())
}

fn ioctl_err(what: &'static str, path: &Path) -> WriteError {
    WriteError::Ioctl {
        what,
        path: path.to_owned(),
        source: io::Error::last_os_error(),
    }
}

impl Plan {
    /// What is about to happen, for the user to check before typing `yes`.
    pub fn summary(&self) -> String {
        let (i, t) = (&self.image, &self.target);
        let mut s = format!(
            "stork-image: write {} ({}{} = {} bytes)\n",
            i.path.display(),
            if i.zstd { "zstd, " } else { "" },
            human(i.size),
            i.size
        );
        let canonical = fs::canonicalize(&t.path).unwrap_or_else(|_| t.path.clone());
        let _ = write!(s, "  to        {}", t.path.display());
        if canonical != t.path {
            let _ = write!(s, " -> {}", canonical.display());
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "  model     {}",
            t.info.model.as_deref().unwrap_or("(unknown)")
        );
        let size = t.info.size.unwrap_or(t.size);
        let _ = writeln!(
            s,
            "  size      {:.1} GB ({}, {size} bytes)",
            size as f64 / 1e9,
            human(size)
        );
        if t.block {
            let _ = writeln!(
                s,
                "  removable {}",
                match t.info.removable {
                    Some(true) => "yes",
                    Some(false) => "no (a fixed disk: is this really the one?)",
                    None => "(unknown)",
                }
            );
        }
        let _ = writeln!(
            s,
            "  everything on {} will be overwritten",
            t.path.display()
        );
        s
    }
}

/// Asks for `yes` on `out`/`input`, unless `yes` was given; refuses without a terminal.
pub fn confirm(
    plan: &Plan,
    yes: bool,
    interactive: bool,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), WriteError> {
    let path = &plan.target.path;
    if yes {
        return Ok(());
    }
    if !interactive {
        return Err(WriteError::NoTerminal { path: path.clone() });
    }
    let ask = |out: &mut dyn Write| {
        write!(out, "Type yes to overwrite {}: ", path.display())?;
        out.flush()
    };
    ask(out).map_err(io_err("asking about", path))?;
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(io_err("reading the answer about", path))?;
    let answer = line.trim();
    if answer != "yes" {
        return Err(WriteError::NotConfirmed {
            path: path.clone(),
            answer: answer.to_owned(),
        });
    }
    Ok(())
}

/// Progress lines: on a terminal one line redrawn at most four times a second, else one line
/// per tenth of the work.
#[derive(Debug)]
pub struct Meter {
    what: &'static str,
    total: u64,
    terminal: bool,
    started: Instant,
    last: Option<Instant>,
    tenth: u64,
}

impl Meter {
    const INTERVAL: Duration = Duration::from_millis(250);

    pub fn new(what: &'static str, total: u64, terminal: bool, now: Instant) -> Self {
        Self {
            what,
            total,
            terminal,
            started: now,
            last: None,
            tenth: 0,
        }
    }

    fn line(&self, done: u64, now: Instant) -> String {
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = if secs > 0.0 {
            done as f64 / MIB / secs
        } else {
            0.0
        };
        format!(
            "stork-image: {} {:.1} / {:.1} MiB ({:3}%) {rate:.1} MiB/s",
            self.what,
            done as f64 / MIB,
            self.total as f64 / MIB,
            done.saturating_mul(100) / self.total.max(1)
        )
    }

    /// The text to print after `done` bytes, if any is due: `\r` + line on a terminal,
    /// line + `\n` elsewhere.
    pub fn tick(&mut self, done: u64, now: Instant) -> Option<String> {
        if self.terminal {
            if self
                .last
                .is_some_and(|l| now.duration_since(l) < Self::INTERVAL)
            {
                return None;
            }
            self.last = Some(now);
            return Some(format!("\r{}\x1b[K", self.line(done, now)));
        }
        let tenth = done.saturating_mul(10) / self.total.max(1);
        if tenth <= self.tenth || tenth >= 10 {
            return None;
        }
        self.tenth = tenth;
        Some(format!("{}\n", self.line(done, now)))
    }

    /// The last line.
    pub fn finish(&self, done: u64, now: Instant) -> String {
        let line = self.line(done, now);
        if self.terminal {
            format!("\r{line}\x1b[K\n")
        } else {
            format!("{line}\n")
        }
    }
}

/// A `len`-byte buffer aligned for `O_DIRECT`, carved out of a slightly larger vector.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Self { buf, start, len }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn set_direct(f: &File, on: bool) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: F_SETFL takes an int.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: u64,
    pub seconds: f64,
    /// Of the bytes written.
    pub sha256_written: String,
    /// Of the same length read back from the target.
    pub sha256_read: String,
    /// Written through `O_DIRECT`.
    pub direct: bool,
    /// Why the kernel did not re-read the new partition table, if it did not.
    pub reread: Option<String>,
}

/// Writes the image, then reads it back and compares. Progress goes to `progress`.
pub fn execute(
    plan: &Plan,
    host: &Host,
    progress: &mut dyn Write,
    terminal: bool,
) -> Result<Written, WriteError> {
    let (image, target) = (&plan.image, &plan.target);
    let path = target.path.as_path();
    let started = Instant::now();

    // Again: a desktop may have mounted the stick while the user read the question.
    let meta = fs::metadata(path).map_err(io_err("looking at", path))?;
    if target.block {
        if let Some(name) = host.name_of(dev_no(meta.rdev())) {
            host.check_not_system(path, &name)?;
            host.check_unused(path, &name)?;
        }
    } else {
        host.check_file_unused(path, &meta)?;
    }
    let (dev, direct) = open_target(target)?;
    // O_DIRECT lengths and offsets are multiples of the logical block size.
    let block = if target.block {
        let b = ioctl_int(&dev, ioctl::BLKSSZGET, "BLKSSZGET", path)?;
        usize::try_from(b).unwrap_or(512).clamp(512, ALIGN)
    } else {
        1
    };

    let mut buf = Aligned::new(CHUNK);
    let mut reader = image.reader()?;
    let mut hasher = Sha256::new();
    let mut meter = Meter::new("writing", image.size, terminal, Instant::now());
    let mut done = 0u64;
    let mut direct_now = direct;
    loop {
        let chunk = buf.get();
        let n = read_full(&mut *reader, chunk).map_err(io_err("reading the image", &image.path))?;
        if n == 0 {
            break;
        }
        if done + n as u64 > image.size {
            return Err(WriteError::ImageLength {
                path: image.path.clone(),
                declared: image.size,
                actual: done + n as u64,
            });
        }
        hasher.update(&chunk[..n]);
        let aligned = n / block * block;
        if !direct_now || aligned == n {
            dev.write_all_at(&chunk[..n], done)
                .map_err(io_err("writing", path))?;
        } else {
            // The image ends inside a logical block: the rest goes through the page cache.
            dev.write_all_at(&chunk[..aligned], done)
                .map_err(io_err("writing", path))?;
            set_direct(&dev, false).map_err(io_err("clearing O_DIRECT on", path))?;
            direct_now = false;
            dev.write_all_at(&chunk[aligned..n], done + aligned as u64)
                .map_err(io_err("writing", path))?;
        }
        done += n as u64;
        if let Some(text) = meter.tick(done, Instant::now()) {
            let _ = progress.write_all(text.as_bytes());
        }
    }
    if done != image.size {
        return Err(WriteError::ImageLength {
            path: image.path.clone(),
            declared: image.size,
            actual: done,
        });
    }
    dev.sync_all().map_err(io_err("syncing", path))?;
    let _ = progress.write_all(meter.finish(done, Instant::now()).as_bytes());
    let sha256_written = hex::encode(hasher.finalize());

    // Forget the cached pages so the read-back asks the device.
    if target.block {
        ioctl_none(&dev, ioctl::BLKFLSBUF, "BLKFLSBUF", path)?;
        if direct && !direct_now {
            set_direct(&dev, true).map_err(io_err("setting O_DIRECT on", path))?;
        }
    } else {
        // SAFETY: plain integers; the descriptor is open.
        let r = unsafe { libc::posix_fadvise(dev.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            return Err(WriteError::Io {
                what: "posix_fadvise(DONTNEED) on",
                path: path.to_owned(),
                source: io::Error::from_raw_os_error(r),
            });
        }
    }
    let sha256_read = read_back(&dev, path, image.size, block, &mut buf, progress, terminal)?;
    if sha256_read != sha256_written {
        return Err(WriteError::Mismatch {
            path: path.to_owned(),
            written: sha256_written,
            read: sha256_read,
        });
    }
    // Best effort: the new partitions appear without replugging the stick.
    let reread = if target.block {
        ioctl_none(&dev, ioctl::BLKRRPART, "BLKRRPART", path)
            .err()
            .map(|e| match e {
                WriteError::Ioctl { source, .. } => source.to_string(),
                other => other.to_string(),
            })
    } else {
        None
    };
    Ok(Written {
        bytes: done,
        seconds: started.elapsed().as_secs_f64(),
        sha256_written,
        sha256_read,
        direct,
        reread,
    })
}

/// Opens the target for writing: a block device exclusively and with `O_DIRECT` (falling back
/// to the page cache where `O_DIRECT` is refused), a file in place.
fn open_target(target: &Target) -> Result<(File, bool), WriteError> {
    let path = target.path.as_path();
    let open = |flags: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | flags)
            .open(path)
    };
    let opened = if target.block {
        match open(libc::O_EXCL | libc::O_DIRECT) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                open(libc::O_EXCL).map(|f| (f, false))
            }
            r => r.map(|f| (f, true)),
        }
    } else {
        open(0).map(|f| (f, false))
    };
    opened.map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => WriteError::Busy {
            path: path.to_owned(),
        },
        Some(libc::EROFS) => WriteError::ReadOnly {
            path: path.to_owned(),
        },
        _ => WriteError::Io {
            what: "opening for writing",
            path: path.to_owned(),
            source: e,
        },
    })
}

/// SHA-256 of the first `len` bytes of `dev`. Reads are whole logical blocks (the device is at
/// least `len` rounded up to one, being a whole number of them).
fn read_back(
    dev: &File,
    path: &Path,
    len: u64,
    block: usize,
    buf: &mut Aligned,
    progress: &mut dyn Write,
    terminal: bool,
) -> Result<String, WriteError> {
    let mut hasher = Sha256::new();
    let mut meter = Meter::new("verifying", len, terminal, Instant::now());
    let mut at = 0u64;
    let chunk = buf.get();
    while at < len {
        let want = (len - at).min(CHUNK as u64) as usize;
        let asked = want.div_ceil(block) * block;
        let mut got = 0;
        while got < want {
            match dev.read_at(&mut chunk[got..asked], at + got as u64) {
                Ok(0) => {
                    return Err(WriteError::ShortRead {
                        path: path.to_owned(),
                        at: at + got as u64,
                        len,
                    });
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("reading back", path)(e)),
            }
        }
        hasher.update(&chunk[..want]);
        at += want as u64;
        if let Some(text) = meter.tick(at, Instant::now()) {
            let _ = progress.write_all(text.as_bytes());
        }
    }
    let _ = progress.write_all(meter.finish(at, Instant::now()).as_bytes());
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn ioctl_numbers_match_linux() {
        // The encoding, checked against the one number libc has.
        assert_eq!(ioctl::blk(ioctl::NONE, 104, 0), libc::BLKSSZGET);
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(ioctl::BLKGETSIZE64, 0x8008_1272);
            assert_eq!(ioctl::BLKROGET, 0x125e);
            assert_eq!(ioctl::BLKRRPART, 0x125f);
            assert_eq!(ioctl::BLKFLSBUF, 0x1261);
        }
    }

    #[test]
    fn mountinfo_parses_with_optional_fields_and_escapes() {
        let text = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
36 27 8:17 / /media/my\\040stick rw,nosuid shared:5 master:1 - vfat /dev/sdb1 rw
40 27 0:45 /@home /home rw - btrfs /dev/nvme0n1p3 rw,subvol=/@home
garbage line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].dev, (254, 0));
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[0].source, "/dev/vda");
        assert_eq!(m[1].dev, (8, 17));
        assert_eq!(m[1].mount_point, Path::new("/media/my stick"));
        assert_eq!(m[1].fstype, "vfat");
        assert_eq!(m[1].source, "/dev/sdb1");
        assert_eq!(m[2].dev, (0, 45));
        assert_eq!(m[2].fstype, "btrfs");
    }

    #[test]
    fn swaps_skip_the_header() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sda2                               partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file                            file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), ["/dev/sda2", "/swap file"]);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(64 << 20), "64.0 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    /// A sysfs with `sda` (partitions `sda1`, `sda2`, `dm-0` on `sda2`), `sdb` (`sdb1`) and the
    /// whole-disk `vda`.
    fn fake_sys() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path();
        fs::create_dir_all(sys.join("class/block")).unwrap();
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        let add = |rel: &str, dev: DevNo, partition: bool| {
            let dir = sys.join("devices").join(rel);
            fs::create_dir_all(dir.join("holders")).unwrap();
            fs::create_dir_all(dir.join("slaves")).unwrap();
            fs::write(dir.join("dev"), format!("{}:{}\n", dev.0, dev.1)).unwrap();
            fs::write(dir.join("size"), "2048\n").unwrap();
            if partition {
                fs::write(dir.join("partition"), "1\n").unwrap();
            }
            let name = dir.file_name().unwrap().to_owned();
            symlink(&dir, sys.join("class/block").join(&name)).unwrap();
            symlink(&dir, sys.join(format!("dev/block/{}:{}", dev.0, dev.1))).unwrap();
        };
        add("pci/block/sda", (8, 0), false);
        add("pci/block/sda/sda1", (8, 1), true);
        add("pci/block/sda/sda2", (8, 2), true);
        add("usb/block/sdb", (8, 16), false);
        add("usb/block/sdb/sdb1", (8, 17), true);
        add("virtual/block/vda", (254, 0), false);
        add("virtual/block/dm-0", (253, 0), false);
        let dm = sys.join("devices/virtual/block/dm-0");
        fs::create_dir_all(dm.join("dm")).unwrap();
        fs::write(dm.join("dm/name"), "vg-root\n").unwrap();
        symlink(
            sys.join("devices/pci/block/sda/sda2"),
            dm.join("slaves/sda2"),
        )
        .unwrap();
        symlink(&dm, sys.join("devices/pci/block/sda/sda2/holders/dm-0")).unwrap();
        let usb = sys.join("devices/usb/block/sdb");
        fs::create_dir_all(usb.join("device")).unwrap();
        fs::write(usb.join("device/vendor"), "SanDisk \n").unwrap();
        fs::write(usb.join("device/model"), "Cruzer Blade    \n").unwrap();
        fs::write(usb.join("removable"), "1\n").unwrap();
        tmp
    }

    fn host(sys: &Path, mountinfo: &str) -> Host {
        Host {
            sys: sys.to_owned(),
            mounts: parse_mountinfo(mountinfo),
            swaps: Vec::new(),
        }
    }

    #[test]
    fn sysfs_resolves_partitions_and_stacks_to_disks() {
        let tmp = fake_sys();
        let h = host(tmp.path(), "");
        assert_eq!(h.name_of((8, 17)).as_deref(), Some("sdb1"));
        assert_eq!(h.disk_of_partition("sdb1").as_deref(), Some("sdb"));
        assert_eq!(h.disk_of_partition("sdb"), None);
        assert_eq!(h.whole_disks("dm-0"), BTreeSet::from(["sda".to_owned()]));
        assert_eq!(h.whole_disks("vda"), BTreeSet::from(["vda".to_owned()]));
        let info = h.info("sdb");
        assert_eq!(info.model.as_deref(), Some("SanDisk Cruzer Blade"));
        assert_eq!(info.size, Some(1 << 20));
        assert_eq!(info.removable, Some(true));
    }

    #[test]
    fn a_mounted_partition_or_holder_is_refused_and_named() {
        let tmp = fake_sys();
        let sdb = Path::new("/dev/sdb");
        let h = host(
            tmp.path(),
            "40 1 8:17 / /media/stick rw - vfat /dev/sdb1 rw\n",
        );
        match h.check_unused(sdb, "sdb") {
            Err(WriteError::Mounted {
                node, mount_point, ..
            }) => {
                assert_eq!(node, "/dev/sdb1");
                assert_eq!(mount_point, Path::new("/media/stick"));
            }
            other => panic!("{other:?}"),
        }
        assert!(host(tmp.path(), "").check_unused(sdb, "sdb").is_ok());

        // LVM on sda2, mounted: the mount is named.
        let sda = Path::new("/dev/sda");
        let h = host(
            tmp.path(),
            "40 1 253:0 / /srv rw - ext4 /dev/mapper/vg-root rw\n",
        );
        let e = h.check_unused(sda, "sda").unwrap_err();
        assert!(
            matches!(&e, WriteError::Mounted { mount_point, .. } if mount_point == Path::new("/srv"))
        );
        assert!(e.to_string().contains("/dev/mapper/vg-root (dm-0)"), "{e}");
        // Active but not mounted: still held.
        let e = host(tmp.path(), "").check_unused(sda, "sda").unwrap_err();
        assert!(
            matches!(&e, WriteError::Held { node, holder, .. }
                if node == "/dev/sda2" && holder == "/dev/mapper/vg-root (dm-0)"),
            "{e:?}"
        );
    }

    #[test]
    fn the_system_disk_is_refused_through_lvm() {
        let tmp = fake_sys();
        let h = host(
            tmp.path(),
            "27 1 253:0 / / rw - ext4 /dev/mapper/vg-root rw\n\
             28 27 8:1 / /boot rw - ext4 /dev/sda1 rw\n",
        );
        let e = h
            .check_not_system(Path::new("/dev/sda"), "sda")
            .unwrap_err();
        assert!(
            matches!(&e, WriteError::SystemDisk { mount_point, .. } if mount_point == Path::new("/")),
            "{e:?}"
        );
        assert!(h.check_not_system(Path::new("/dev/sdb"), "sdb").is_ok());
        // The root directly on a whole disk; overlay roots have no disk to find.
        let h = host(tmp.path(), "27 1 254:0 / / rw - ext4 /dev/vda rw\n");
        assert!(h.check_not_system(Path::new("/dev/vda"), "vda").is_err());
        let h = host(tmp.path(), "27 1 0:30 / / rw - overlay overlay rw\n");
        assert!(h.check_not_system(Path::new("/dev/vda"), "vda").is_ok());
    }

    #[test]
    fn a_file_under_a_loop_device_is_refused() {
        let tmp = fake_sys();
        let file = tmp.path().join("disk.img");
        fs::write(&file, [0u8; 4096]).unwrap();
        let lo = tmp.path().join("devices/virtual/block/loop7");
        fs::create_dir_all(lo.join("loop")).unwrap();
        fs::write(lo.join("dev"), "7:7\n").unwrap();
        fs::write(
            lo.join("loop/backing_file"),
            format!("{}\n", file.display()),
        )
        .unwrap();
        symlink(&lo, tmp.path().join("class/block/loop7")).unwrap();
        let meta = fs::metadata(&file).unwrap();
        let e = host(tmp.path(), "")
            .check_file_unused(&file, &meta)
            .unwrap_err();
        assert!(
            matches!(&e, WriteError::Held { holder, .. } if holder == "/dev/loop7"),
            "{e:?}"
        );
        let e = host(tmp.path(), "50 1 7:7 / /mnt/x rw - ext4 /dev/loop7 rw\n")
            .check_file_unused(&file, &meta)
            .unwrap_err();
        assert!(
            e.to_string().contains("/dev/loop7 is mounted on /mnt/x"),
            "{e}"
        );
        let other = tmp.path().join("other.img");
        fs::write(&other, [0u8; 4096]).unwrap();
        let meta = fs::metadata(&other).unwrap();
        assert!(
            host(tmp.path(), "")
                .check_file_unused(&other, &meta)
                .is_ok()
        );
    }

    fn plan_of(image_size: u64, device_size: u64) -> Plan {
        Plan {
            image: Image {
                path: PathBuf::from("img.raw"),
                zstd: false,
                size: image_size,
                measured: false,
                id: (0, 0),
            },
            target: Target {
                path: PathBuf::from("/dev/sdx"),
                block: true,
                size: device_size,
                info: DeviceInfo::default(),
            },
        }
    }

    #[test]
    fn the_image_must_fit() {
        let p = plan_of(64 << 20, 64 << 20);
        assert!(check_fits(&p.image, &p.target).is_ok());
        let p = plan_of((64 << 20) + 1, 64 << 20);
        let e = check_fits(&p.image, &p.target).unwrap_err();
        assert!(e.to_string().contains("67108865 bytes"), "{e}");
        assert!(e.to_string().contains("larger than /dev/sdx"), "{e}");
    }

    #[test]
    fn confirmation_needs_yes_or_a_typed_yes() {
        let p = plan_of(1, 2);
        let ask = |yes, interactive, typed: &str| {
            let mut out = Vec::new();
            let r = confirm(&p, yes, interactive, &mut typed.as_bytes(), &mut out);
            (r, String::from_utf8(out).unwrap())
        };
        let (r, out) = ask(true, false, "");
        assert!(r.is_ok() && out.is_empty());
        assert!(matches!(
            ask(false, false, "yes\n").0,
            Err(WriteError::NoTerminal { .. })
        ));
        let (r, out) = ask(false, true, "yes\n");
        assert!(r.is_ok());
        assert!(out.contains("Type yes to overwrite /dev/sdx"), "{out}");
        assert!(ask(false, true, "  yes  \n").0.is_ok());
        for typed in ["y\n", "YES\n", "\n", "", "no\n"] {
            assert!(
                matches!(
                    ask(false, true, typed).0,
                    Err(WriteError::NotConfirmed { .. })
                ),
                "{typed:?}"
            );
        }
    }

    #[test]
    fn meter_limits_its_lines() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut m = Meter::new("writing", 100 << 20, true, t0);
        assert!(m.tick(1 << 20, ms(10)).is_some());
        assert!(m.tick(2 << 20, ms(100)).is_none());
        let line = m.tick(50 << 20, ms(1000)).unwrap();
        assert!(line.starts_with('\r'));
        assert!(
            line.contains("50.0 / 100.0 MiB ( 50%) 50.0 MiB/s"),
            "{line}"
        );
        assert!(m.finish(100 << 20, ms(2000)).ends_with('\n'));

        let mut m = Meter::new("writing", 100, false, t0);
        let lines: Vec<String> = (1..=100).filter_map(|d| m.tick(d, ms(d))).collect();
        assert_eq!(lines.len(), 9);
        assert!(lines.iter().all(|l| l.ends_with('\n') && !l.contains('\r')));
    }

    #[test]
    fn images_are_recognized_and_sized() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("a.raw");
        fs::write(&raw, vec![7u8; 5000]).unwrap();
        let img = Image::open(&raw).unwrap();
        assert!(!img.zstd && img.size == 5000);

        let zst = tmp.path().join("a.raw.zst");
        crate::disk::compress(&raw, &zst, 3).unwrap();
        let img = Image::open(&zst).unwrap();
        assert!(img.zstd && img.size == 5000 && !img.measured);

        // A streamed frame has no size in its header: measured.
        let streamed = tmp.path().join("s.zst");
        let mut enc = zstd::Encoder::new(File::create(&streamed).unwrap(), 3).unwrap();
        enc.write_all(&[1u8; 3000]).unwrap();
        enc.finish().unwrap();
        let img = Image::open(&streamed).unwrap();
        assert!(img.zstd && img.size == 3000 && img.measured);

        let xz = tmp.path().join("a.raw.xz");
        fs::write(&xz, [0xfd, b'7', b'z', b'X', b'Z', 0, 0]).unwrap();
        assert!(matches!(
            Image::open(&xz),
            Err(WriteError::UnsupportedCompression { format: "xz", .. })
        ));
        let empty = tmp.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Image::open(&empty),
            Err(WriteError::EmptyImage { .. })
        ));
    }

    #[test]
    fn a_file_target_is_written_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("img");
        let data: Vec<u8> = (0..(CHUNK + 1000)).map(|i| (i % 251) as u8).collect();
        fs::write(&raw, &data).unwrap();
        let target = tmp.path().join("disk");
        fs::write(&target, vec![0xaau8; CHUNK * 2]).unwrap();
        let h = host(Path::new("/nonexistent"), "");
        let req = Request {
            image: &raw,
            device: &target,
            allow_file: true,
        };
        let p = plan(&req, &h).unwrap();
        let mut progress = Vec::new();
        let w = execute(&p, &h, &mut progress, false).unwrap();
        assert_eq!(w.bytes, data.len() as u64);
        assert_eq!(w.sha256_written, w.sha256_read);
        assert_eq!(w.sha256_written, hex::encode(Sha256::digest(&data)));
        let got = fs::read(&target).unwrap();
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(got[data.len()..].iter().all(|b| *b == 0xaa));

        // Without --allow-file, onto itself, or too small: refused.
        let req = Request {
            allow_file: false,
            ..req
        };
        assert!(matches!(
            plan(&req, &h),
            Err(WriteError::NotBlockDevice { .. })
        ));
        let req = Request {
            device: &raw,
            allow_file: true,
            ..req
        };
        assert!(matches!(plan(&req, &h), Err(WriteError::SameFile { .. })));
        let small = tmp.path().join("small");
        fs::write(&small, [0u8; 10]).unwrap();
        let req = Request {
            device: &small,
            ..req
        };
        assert!(matches!(plan(&req, &h), Err(WriteError::TooSmall { .. })));
    }
}
