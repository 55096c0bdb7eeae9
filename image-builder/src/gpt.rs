//! GUID partition tables (UEFI 2.10, section 5) for the raw OS image: a protective MBR, the
//! primary header and entry array at LBA 1 and 2, and their backups at the end of the disk.
//! 512-byte sectors, 128 entries of 128 bytes, as every tool expects.
//!
//! The bytes are written by `gptman`, the crate the agent reads and grows the same table with
//! on the target disk, so one implementation of the format serves both ends. What is ours is
//! the layout check, with an error that names the partition, and the GUIDs' text form for the
//! manifest.
//!
//! Nothing here panics on its inputs: sizes and counts are checked and reported before
//! `gptman` (which does arithmetic on the disk's size) sees them.

use std::io::{self, Read, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
/// Sectors taken by the entry array: 128 * 128 / 512.
const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
const NAME_UNITS: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("a disk of {sectors} sectors is too small for a GPT")]
    TooSmall { sectors: u64 },
    #[error("more than {ENTRIES} partitions")]
    TooMany,
    #[error(
        "partition {index} ({first}..={last}) is outside the usable sectors {usable_first}..={usable_last} or overlaps another"
    )]
    BadRange {
        index: usize,
        first: u64,
        last: u64,
        usable_first: u64,
        usable_last: u64,
    },
    #[error("partition name {name:?} is longer than {NAME_UNITS} UTF-16 units")]
    LongName { name: String },
    #[error("{0:?} is not a GUID")]
    BadGuid(String),
    #[error("the disk is {bytes} bytes, not the table's {sectors} sectors of {SECTOR}")]
    WrongSize { bytes: u64, sectors: u64 },
    #[error("gptman could not write the partition table")]
    Write(#[from] gptman::Error),
    #[error("writing the partition table")]
    Io(#[from] io::Error),
}

/// A GUID in its on-disk form: the first three fields little-endian ("mixed endian").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid([u8; 16]);

impl Guid {
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    /// Discoverable Partitions Specification: root file system, x86-64 (sgdisk code 8304).
    pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

    pub fn parse(s: &str) -> Result<Self, GptError> {
        let bad = || GptError::BadGuid(s.to_owned());
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
        if hex.len() != 32 || dashes != [8, 13, 18, 23] {
            return Err(bad());
        }
        let mut big = [0u8; 16];
        for (i, b) in big.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self::from_big_endian(big))
    }

    /// From the 16 bytes in text order (as an RFC 4122 UUID is usually held).
    pub fn from_big_endian(b: [u8; 16]) -> Self {
        let mut d = b;
        d[0..4].reverse();
        d[4..6].reverse();
        d[6..8].reverse();
        Self(d)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// Text form, uppercase as sgdisk prints it.
    pub fn to_text(self) -> String {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        let h = hex::encode_upper(b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub type_guid: Guid,
    pub guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub disk_guid: Guid,
    pub sectors: u64,
    pub partitions: Vec<Partition>,
}

impl Gpt {
    /// First sector a partition may use: after the MBR, the header and the entry array.
    pub fn first_usable(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    /// Last sector a partition may use: before the backup entries and header.
    pub fn last_usable(&self) -> u64 {
        self.sectors.saturating_sub(2 + ENTRY_SECTORS)
    }

    fn check(&self) -> Result<(), GptError> {
        if self.sectors < 2 * (2 + ENTRY_SECTORS) + 1 {
            return Err(GptError::TooSmall {
                sectors: self.sectors,
            });
        }
        if self.partitions.len() > ENTRIES {
            return Err(GptError::TooMany);
        }
        let (lo, hi) = (self.first_usable(), self.last_usable());
        for (i, p) in self.partitions.iter().enumerate() {
            let overlaps = self.partitions[..i]
                .iter()
                .any(|q| p.first_lba <= q.last_lba && q.first_lba <= p.last_lba);
            if p.first_lba < lo || p.last_lba > hi || p.first_lba > p.last_lba || overlaps {
                return Err(GptError::BadRange {
                    index: i + 1,
                    first: p.first_lba,
                    last: p.last_lba,
                    usable_first: lo,
                    usable_last: hi,
                });
            }
            if p.name.encode_utf16().count() > NAME_UNITS {
                return Err(GptError::LongName {
                    name: p.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Writes the protective MBR, both headers and both entry arrays into `disk`, which must
    /// already be `sectors * 512` bytes long. Other bytes are not touched.
    pub fn write<D: Read + Write + Seek>(&self, disk: &mut D) -> Result<(), GptError> {
        self.check()?;
        let bytes = disk.seek(SeekFrom::End(0))?;
        if self.sectors.checked_mul(SECTOR) != Some(bytes) {
            return Err(GptError::WrongSize {
                bytes,
                sectors: self.sectors,
            });
        }
        // gptman takes the size from `disk`: the same usable range as ours, checked above.
        let mut table = gptman::GPT::new_from(disk, SECTOR, self.disk_guid.0)?;
        for (number, p) in (1..).zip(&self.partitions) {
            table[number] = gptman::GPTPartitionEntry {
                partition_type_guid: p.type_guid.0,
                unique_partition_guid: p.guid.0,
                starting_lba: p.first_lba,
                ending_lba: p.last_lba,
                attribute_bits: p.attributes,
                partition_name: p.name.as_str().into(),
            };
        }
        gptman::GPT::write_protective_mbr_into(disk, SECTOR)?;
        table.write_into(disk)?;
        disk.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn guids_use_mixed_endian() {
        let g = Guid::parse(Guid::ESP).unwrap();
        assert_eq!(
            hex::encode(g.to_bytes()),
            "28732ac11ff8d211ba4b00a0c93ec93b"
        );
        assert_eq!(g.to_text(), Guid::ESP);
        for bad in [
            "",
            "C12A7328F81F11D2BA4B00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93Z",
        ] {
            assert!(Guid::parse(bad).is_err(), "{bad}");
        }
    }

    fn sample(sectors: u64) -> Gpt {
        let g = |s| Guid::parse(s).unwrap();
        Gpt {
            disk_guid: g("01234567-89AB-CDEF-0123-456789ABCDEF"),
            sectors,
            partitions: vec![
                Partition {
                    type_guid: g(Guid::BIOS_BOOT),
                    guid: g("11111111-1111-1111-1111-111111111111"),
                    first_lba: 2048,
                    last_lba: 4095,
                    attributes: 0,
                    name: "bios".into(),
                },
                Partition {
                    type_guid: g(Guid::LINUX_ROOT_X86_64),
                    guid: g("22222222-2222-2222-2222-222222222222"),
                    first_lba: 4096,
                    last_lba: sectors - 34,
                    attributes: 0,
                    name: "root".into(),
                },
            ],
        }
    }

    #[test]
    fn headers_point_at_each_other_and_check_out() {
        let sectors = 8192;
        let mut disk = Cursor::new(vec![0u8; (sectors * SECTOR) as usize]);
        sample(sectors).write(&mut disk).unwrap();
        let d = disk.into_inner();
        let sector = |lba: u64| &d[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize];
        assert_eq!(&sector(0)[510..], &[0x55, 0xAA]);
        assert_eq!(sector(0)[0x1BE + 4], 0xEE);
        for (lba, my, alt, entries) in [
            (1, 1, sectors - 1, 2),
            (sectors - 1, sectors - 1, 1, sectors - 33),
        ] {
            let h = sector(lba);
            assert_eq!(&h[0..8], b"EFI PART");
            let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
            assert_eq!((u64_at(24), u64_at(32), u64_at(72)), (my, alt, entries));
            let mut zeroed = h[..92].to_vec();
            zeroed[16..20].fill(0);
            assert_eq!(crc32fast::hash(&zeroed).to_le_bytes(), h[16..20]);
            let array = &d[(entries * SECTOR) as usize..((entries + 32) * SECTOR) as usize];
            assert_eq!(crc32fast::hash(array).to_le_bytes(), h[88..92]);
        }
        let e = &d[1024..1024 + 128];
        assert_eq!(u64::from_le_bytes(e[32..40].try_into().unwrap()), 2048);
        assert_eq!(&e[56..64], &[b'b', 0, b'i', 0, b'o', 0, b's', 0]);
    }

    /// What the agent sees when it reads the image's table back (`gptman` there too).
    #[test]
    fn the_table_reads_back() {
        let sectors = 8192;
        let g = sample(sectors);
        let mut disk = Cursor::new(vec![0u8; (sectors * SECTOR) as usize]);
        g.write(&mut disk).unwrap();
        let back = gptman::GPT::read_from(&mut disk, SECTOR).unwrap();
        assert_eq!(back.header.disk_guid, g.disk_guid.to_bytes());
        assert_eq!(
            (back.header.first_usable_lba, back.header.last_usable_lba),
            (g.first_usable(), g.last_usable())
        );
        let used: Vec<_> = back.iter().filter(|(_, p)| p.is_used()).collect();
        assert_eq!(used.len(), g.partitions.len());
        for ((n, e), p) in used.into_iter().zip(&g.partitions) {
            assert_eq!(e.partition_type_guid, p.type_guid.to_bytes(), "{n}");
            assert_eq!(e.unique_partition_guid, p.guid.to_bytes(), "{n}");
            assert_eq!((e.starting_lba, e.ending_lba), (p.first_lba, p.last_lba));
            assert_eq!(e.partition_name.as_str(), p.name);
        }
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut g = sample(8192);
        g.partitions[1].first_lba = 4000;
        assert!(matches!(
            g.write(&mut Cursor::new(Vec::new())),
            Err(GptError::BadRange { index: 2, .. })
        ));
        let mut g = sample(8192);
        g.partitions[1].last_lba = 8192 - 33;
        assert!(matches!(
            g.write(&mut Cursor::new(Vec::new())),
            Err(GptError::BadRange { .. })
        ));
        assert!(matches!(
            sample(60).write(&mut Cursor::new(Vec::new())),
            Err(GptError::TooSmall { .. })
        ));
        let mut g = sample(8192);
        g.partitions[0].name = "x".repeat(37);
        assert!(matches!(
            g.write(&mut Cursor::new(Vec::new())),
            Err(GptError::LongName { .. })
        ));
        // A disk of another size than the table's, even an empty one, is refused, not
        // handed to gptman.
        for len in [0, 4096 * SECTOR] {
            assert!(matches!(
                sample(8192).write(&mut Cursor::new(vec![0u8; len as usize])),
                Err(GptError::WrongSize { sectors: 8192, .. })
            ));
        }
    }
}
