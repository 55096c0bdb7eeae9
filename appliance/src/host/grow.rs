//! `stork appliance grow-data`: the data partition to the end of the disk, at every boot
//! before it is mounted (systemd grows the ext4 inside once mounted: `x-systemd.growfs`).
//!
//! The image is smaller than the disk it is flashed onto, so its backup GPT sits in the
//! middle of the disk. If the partition is the last one of the disk and there is room after
//! it: the backup GPT moves to the disk's end, the partition ends at the last usable sector
//! (rounded down to a MiB), the table is written and the kernel is told with the BLKPG
//! resize-partition ioctl, which works while other partitions of the disk are mounted
//! (BLKRRPART, a re-read of the whole table, would be refused). Nothing to do is success,
//! so every boot runs it.
//!
//! The agent does the same to a deployed root partition (`agent/src/deploy/block.rs`,
//! `grow_gpt`, then BLKRRPART on a disk nothing has mounted). The shared part is small and
//! gptman sits in neither `stork-proto` (no I/O) nor a crate both use, so this is its own
//! copy: by partition number rather than by root type, and with the kernel told per
//! partition.
//!
//! The ioctl numbers are from `<linux/fs.h>` and `<linux/blkpg.h>`; the one `unsafe` is the
//! nix-generated wrapper, called on a file this module opened.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// The partition's usual name.
pub const DATA_PARTITION: &str = "/dev/disk/by-partlabel/stork-data";
const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a partition (no {sys}/partition)")]
    NotAPartition { path: PathBuf, sys: PathBuf },
    #[error("partition table of {path}")]
    Gpt {
        path: PathBuf,
        #[source]
        source: gptman::Error,
    },
    #[error("the primary GPT of {path} is damaged (only its backup reads): not touching it")]
    PrimaryDamaged { path: PathBuf },
    #[error("{path} has no GPT partition {number}")]
    NoEntry { path: PathBuf, number: u32 },
    #[error("BLKPG resize of partition {number} on {path}")]
    Blkpg {
        path: PathBuf,
        number: u32,
        #[source]
        source: Errno,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> GrowError {
    let path = path.to_path_buf();
    move |source| GrowError::Io { what, path, source }
}

/// What the table change did (or would do), in sectors of the disk's logical size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableChange {
    pub start_lba: u64,
    pub end_before: u64,
    pub end_after: u64,
    /// The partition is not the last one on the disk: it is left as it is.
    pub not_last: bool,
    /// The backup GPT moved to the end of the disk.
    pub backup_moved: bool,
}

impl TableChange {
    pub fn grown(&self) -> bool {
        self.end_after > self.end_before
    }
}

/// The table part on any disk-like `disk` (a block device, or a file in tests): moves the
/// backup GPT to the end and grows partition `number` (1-based) when it is the last, and
/// writes the table only if that changed something.
pub fn grow_table<D: Read + Write + Seek>(
    disk: &mut D,
    path: &Path,
    sector_size: u64,
    number: u32,
) -> Result<TableChange, GrowError> {
    let gpt_err = |source| GrowError::Gpt {
        path: path.to_path_buf(),
        source,
    };
    let mut gpt = gptman::GPT::read_from(disk, sector_size).map_err(gpt_err)?;
    if !gpt.header.is_primary() {
        return Err(GrowError::PrimaryDamaged { path: path.into() });
    }
    let entry = (1..=gpt.header.number_of_partition_entries)
        .contains(&number)
        .then(|| gpt[number].clone())
        .filter(|p| p.is_used())
        .ok_or(GrowError::NoEntry {
            path: path.into(),
            number,
        })?;
    let old_backup = gpt.header.backup_lba;
    let old_last_usable = gpt.header.last_usable_lba;
    gpt.header.update_from(disk, sector_size).map_err(gpt_err)?;
    let backup_moved = gpt.header.backup_lba != old_backup;
    let not_last = gpt
        .iter()
        .any(|(i, p)| i != number && p.is_used() && p.ending_lba > entry.ending_lba);
    // The last usable sector, rounded down so the partition ends on a MiB.
    let per_mib = (MIB / sector_size).max(1);
    let aligned_end = ((gpt.header.last_usable_lba + 1) / per_mib * per_mib).saturating_sub(1);
    let end_after = if !not_last && aligned_end > entry.ending_lba {
        aligned_end
    } else {
        entry.ending_lba
    };
    let change = TableChange {
        start_lba: entry.starting_lba,
        end_before: entry.ending_lba,
        end_after,
        not_last,
        backup_moved,
    };
    if !change.grown() && !backup_moved {
        return Ok(change);
    }
    gpt[number].ending_lba = end_after;
    gpt.write_into(disk).map_err(gpt_err)?;
    if backup_moved {
        fix_protective_mbr(disk, gpt.header.backup_lba).map_err(io("write the MBR of", path))?;
        // The old backup (its entries and header) now lies inside the grown partition, past
        // its file system: zeroed, so nothing ever takes it for a table.
        if old_backup < gpt.header.backup_lba && old_last_usable < old_backup {
            let len = (old_backup - old_last_usable) * sector_size;
            disk.seek(SeekFrom::Start((old_last_usable + 1) * sector_size))
                .and_then(|_| disk.write_all(&vec![0u8; len as usize]))
                .map_err(io("clear the old backup GPT of", path))?;
        }
    }
    disk.flush().map_err(io("write", path))?;
    Ok(change)
}

/// The protective MBR's 0xEE entry covers the whole disk (up to 2^32-1 sectors): its size
/// follows the disk. Only that field changes: the boot code (GRUB's boot.img on the BIOS
/// path) and the flags stay.
fn fix_protective_mbr<D: Read + Write + Seek>(disk: &mut D, last_lba: u64) -> std::io::Result<()> {
    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(());
    }
    for entry in 0..4 {
        let at = 446 + entry * 16;
        if mbr[at + 4] == 0xEE {
            let size = u32::try_from(last_lba).unwrap_or(u32::MAX);
            disk.seek(SeekFrom::Start(at as u64 + 12))?;
            disk.write_all(&size.to_le_bytes())?;
            return Ok(());
        }
    }
    Ok(())
}

/// What `grow-data` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The partition's device (symbolic links resolved) and its disk.
    pub partition: PathBuf,
    pub disk: PathBuf,
    pub number: u32,
    pub change: TableChange,
    pub sector_size: u64,
    /// The kernel's idea of the partition's size was changed (BLKPG).
    pub kernel_resized: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |end: u64| (end - self.change.start_lba + 1) * self.sector_size / MIB;
        let (p, d) = (self.partition.display(), self.disk.display());
        if self.change.grown() {
            write!(
                f,
                "{p} grown from {} MiB to {} MiB (the end of {d})",
                mib(self.change.end_before),
                mib(self.change.end_after)
            )
        } else if self.change.not_last {
            write!(f, "{p} is not the last partition of {d}: left as it is")
        } else if self.kernel_resized {
            write!(
                f,
                "{p}: the kernel now sees its {} MiB",
                mib(self.change.end_after)
            )
        } else {
            write!(f, "{p} already ends at the end of {d}: nothing to do")
        }
    }
}

/// `stork appliance grow-data --partition PATH`.
pub fn grow_data(partition: &Path) -> Result<Report, GrowError> {
    let dev = std::fs::canonicalize(partition).map_err(io("find", partition))?;
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = Path::new("/sys/class/block").join(&name);
    let read = |p: PathBuf| std::fs::read_to_string(&p).map(|t| t.trim().to_string());
    let number: u32 = read(sys.join("partition"))
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| GrowError::NotAPartition {
            path: dev.clone(),
            sys: sys.clone(),
        })?;
    // /sys/class/block/vda3 links to .../block/vda/vda3: the parent is the disk.
    let disk_name = std::fs::canonicalize(&sys)
        .map_err(io("resolve", &sys))?
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let disk = dev.with_file_name(&disk_name);
    let sys_disk = Path::new("/sys/class/block").join(&disk_name);
    let sector_size: u64 = read(sys_disk.join("queue/logical_block_size"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    // Not O_EXCL: the disk's other partitions (the running system) are mounted.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&disk)
        .map_err(io("open", &disk))?;
    let change = grow_table(&mut file, &disk, sector_size, number)?;
    file.sync_all().map_err(io("sync", &disk))?;

    // The kernel's view, from the table: also right after a run that wrote the table and
    // died before telling it.
    let want = (change.end_after - change.start_lba + 1) * sector_size;
    let kernel_bytes = read(sys.join("size"))
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|sectors| sectors * 512);
    let kernel_resized = kernel_bytes != Some(want);
    if kernel_resized {
        resize_partition(&file, number, change.start_lba * sector_size, want).map_err(
            |source| GrowError::Blkpg {
                path: disk.clone(),
                number,
                source,
            },
        )?;
    }
    Ok(Report {
        partition: dev,
        disk,
        number,
        change,
        sector_size,
        kernel_resized,
    })
}

mod ioctl {
    /// `struct blkpg_partition` (`<linux/blkpg.h>`), offsets and lengths in bytes.
    #[repr(C)]
    pub struct BlkpgPartition {
        pub start: libc::c_longlong,
        pub length: libc::c_longlong,
        pub pno: libc::c_int,
        pub devname: [libc::c_char; 64],
        pub volname: [libc::c_char; 64],
    }

    /// `struct blkpg_ioctl_arg`.
    #[repr(C)]
    pub struct BlkpgIoctlArg {
        pub op: libc::c_int,
        pub flags: libc::c_int,
        pub datalen: libc::c_int,
        pub data: *mut libc::c_void,
    }

    pub const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

    // BLKPG = _IO(0x12, 105), taking a pointer anyway: the "bad" form.
    nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
}

/// BLKPG_RESIZE_PARTITION: the kernel's partition `number` of the disk `file` now has
/// `length` bytes from `start` (which must not change).
fn resize_partition(file: &File, number: u32, start: u64, length: u64) -> Result<(), Errno> {
    let mut part = ioctl::BlkpgPartition {
        start: i64::try_from(start).map_err(|_| Errno::EOVERFLOW)?,
        length: i64::try_from(length).map_err(|_| Errno::EOVERFLOW)?,
        pno: i32::try_from(number).map_err(|_| Errno::EINVAL)?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = ioctl::BlkpgIoctlArg {
        op: ioctl::BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<ioctl::BlkpgPartition>() as libc::c_int,
        data: (&raw mut part).cast(),
    };
    // SAFETY: BLKPG reads the argument and, through its `data`, the partition record; both
    // live on this stack frame for the call, `datalen` is the record's size.
    unsafe { ioctl::blkpg(file.as_raw_fd(), &arg) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk image of `size` bytes with a GPT (and its protective MBR, boot code kept) whose
    /// partitions are `parts` as (first, last) LBAs.
    fn image(size: u64, parts: &[(u64, u64)]) -> std::io::Cursor<Vec<u8>> {
        let mut disk = std::io::Cursor::new(vec![0u8; size as usize]);
        disk.get_mut()[..440].fill(0xB0);
        gptman::GPT::write_protective_mbr_into(&mut disk, 512).unwrap();
        let mut gpt = gptman::GPT::new_from(&mut disk, 512, [7; 16]).unwrap();
        for (i, (first, last)) in parts.iter().enumerate() {
            gpt[i as u32 + 1] = gptman::GPTPartitionEntry {
                partition_type_guid: [1; 16],
                unique_partition_guid: [i as u8 + 2; 16],
                starting_lba: *first,
                ending_lba: *last,
                attribute_bits: 0,
                partition_name: "stork-data".into(),
            };
        }
        gpt.write_into(&mut disk).unwrap();
        disk
    }

    #[test]
    fn grows_the_last_partition_once_the_disk_is_bigger() {
        let mib = MIB / 512;
        let mut disk = image(32 * MIB, &[(2048, 4095), (4096, 32 * mib - 34)]);
        // Flashed onto a 64 MiB disk.
        disk.get_mut().resize(64 * MIB as usize, 0);
        let path = Path::new("disk.img");
        let change = grow_table(&mut disk, path, 512, 2).unwrap();
        assert!(change.backup_moved && change.grown() && !change.not_last);
        assert_eq!(
            change.end_after,
            64 * mib - 2048 - 1,
            "the last whole MiB before the backup"
        );
        let gpt = gptman::GPT::read_from(&mut disk, 512).unwrap();
        assert_eq!(gpt.header.backup_lba, 64 * mib - 1);
        assert_eq!(gpt[2].ending_lba, change.end_after);
        assert_eq!(gpt[1].ending_lba, 4095, "others untouched");
        let bytes = disk.get_ref();
        assert!(bytes[..440].iter().all(|b| *b == 0xB0), "boot code kept");
        assert_eq!(
            &bytes[446 + 12..446 + 16],
            &(64 * mib as u32 - 1).to_le_bytes()
        );
        // The old backup header is gone.
        let old = (32 * MIB - 512) as usize;
        assert!(bytes[old..old + 512].iter().all(|b| *b == 0));

        // Again: nothing to do, nothing written.
        let before = disk.get_ref().clone();
        let again = grow_table(&mut disk, path, 512, 2).unwrap();
        assert!(!again.grown() && !again.backup_moved);
        assert_eq!(*disk.get_ref(), before);
    }

    #[test]
    fn leaves_a_partition_that_is_not_last() {
        let mib = MIB / 512;
        let mut disk = image(32 * MIB, &[(2048, 4095), (4096, 8191)]);
        disk.get_mut().resize(64 * MIB as usize, 0);
        let change = grow_table(&mut disk, Path::new("d"), 512, 1).unwrap();
        assert!(change.not_last && !change.grown() && change.backup_moved);
        let gpt = gptman::GPT::read_from(&mut disk, 512).unwrap();
        assert_eq!(gpt.header.backup_lba, 64 * mib - 1);
        assert_eq!(gpt[1].ending_lba, 4095);
        assert!(matches!(
            grow_table(&mut disk, Path::new("d"), 512, 3),
            Err(GrowError::NoEntry { number: 3, .. })
        ));
        let report = Report {
            partition: "/dev/vda1".into(),
            disk: "/dev/vda".into(),
            number: 1,
            change,
            sector_size: 512,
            kernel_resized: false,
        };
        assert!(
            report.to_string().contains("not the last partition"),
            "{report}"
        );
    }
}
