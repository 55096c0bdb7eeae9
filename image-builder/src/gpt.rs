//! GUID partition tables (UEFI 2.10, section 5), written without any tool or device: a
//! protective MBR, the primary header and entry array at LBA 1 and 2, and their backups at the
//! end of the disk. 512-byte sectors, 128 entries of 128 bytes, as every tool expects.
//!
//! Nothing here panics on its inputs: sizes and counts are checked and reported.

use std::io::{self, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
/// Sectors taken by the entry array: 128 * 128 / 512.
const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
const HEADER_SIZE: usize = 92;
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

    /// The 128-entry array.
    fn entries(&self) -> Vec<u8> {
        let mut a = vec![0u8; ENTRIES * ENTRY_SIZE];
        for (i, p) in self.partitions.iter().enumerate() {
            let e = &mut a[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
            e[0..16].copy_from_slice(&p.type_guid.0);
            e[16..32].copy_from_slice(&p.guid.0);
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            for (j, u) in p.name.encode_utf16().take(NAME_UNITS).enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        a
    }

    /// A header sector; `primary` decides which copy it describes.
    fn header(&self, primary: bool, entries_crc: u32) -> [u8; SECTOR as usize] {
        let last = self.sectors - 1;
        let (my, alternate, entries_lba) = if primary {
            (1, last, 2)
        } else {
            (last, 1, last - ENTRY_SECTORS)
        };
        let mut h = [0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        // 16..20: header CRC, computed below over the header with this field zero.
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alternate.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.0);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[..HEADER_SIZE]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The protective MBR: one partition of type 0xEE over the whole disk (capped at 2 TiB).
    pub fn protective_mbr(&self) -> [u8; SECTOR as usize] {
        let mut m = [0u8; SECTOR as usize];
        let e = &mut m[0x1BE..0x1CE];
        e[0] = 0x00; // not bootable: UEFI 5.2.3
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        let size = u32::try_from(self.sectors - 1).unwrap_or(u32::MAX);
        e[12..16].copy_from_slice(&size.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// Writes the protective MBR, both headers and both entry arrays into `disk`, which must
    /// already be `sectors * 512` bytes long. Other sectors are not touched.
    pub fn write<W: Write + Seek>(&self, disk: &mut W) -> Result<(), GptError> {
        self.check()?;
        let entries = self.entries();
        let entries_crc = crc32(&entries);
        let last = self.sectors - 1;
        let at = |lba: u64| SeekFrom::Start(lba * SECTOR);

        disk.seek(at(0))?;
        disk.write_all(&self.protective_mbr())?;
        disk.write_all(&self.header(true, entries_crc))?;
        disk.write_all(&entries)?;
        disk.seek(at(last - ENTRY_SECTORS))?;
        disk.write_all(&entries)?;
        disk.write_all(&self.header(false, entries_crc))?;
        disk.flush()?;
        Ok(())
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and the UEFI spec use). Bitwise: GPT checksums cover
/// 16 KiB at most, so a table buys nothing.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

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
            assert_eq!(crc32(&zeroed).to_le_bytes(), h[16..20]);
            let array = &d[(entries * SECTOR) as usize..((entries + 32) * SECTOR) as usize];
            assert_eq!(crc32(array).to_le_bytes(), h[88..92]);
        }
        let e = &d[1024..1024 + 128];
        assert_eq!(u64::from_le_bytes(e[32..40].try_into().unwrap()), 2048);
        assert_eq!(&e[56..64], &[b'b', 0, b'i', 0, b'o', 0, b's', 0]);
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
    }
}
