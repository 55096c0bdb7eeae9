//! Reads the `.modinfo` section of a kernel module (an ELF64 relocatable object): the
//! `key=value` strings modpost wrote, among them `depends=` and `softdep=`.
//!
//! Only the headers and that one section are read, so scanning a whole kernel's modules stays
//! cheap. 32-bit and big-endian objects are refused: Stork targets x86_64 and arm64.

use std::io::{self, Read, Seek, SeekFrom};

#[derive(Debug, thiserror::Error)]
pub enum ModinfoError {
    #[error("reading module")]
    Io(#[from] io::Error),
    #[error("not a 64-bit little-endian ELF object")]
    NotElf64Le,
    #[error("ELF section table is malformed: {0}")]
    Malformed(&'static str),
    #[error("module has no .modinfo section")]
    NoModinfo,
}

/// The `.modinfo` strings of one module, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Modinfo {
    pub fields: Vec<(String, String)>,
}

impl Modinfo {
    /// Module names from `depends=` (comma separated; empty for none).
    pub fn depends(&self) -> Vec<String> {
        self.values("depends")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `pre:` targets of every `softdep=` entry.
    pub fn softdeps_pre(&self) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.values("softdep") {
            let mut in_pre = false;
            for w in v.split_whitespace() {
                match w {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    t if in_pre => out.push(t.to_owned()),
                    _ => {}
                }
            }
        }
        out
    }

    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Splits the raw section: NUL-separated `key=value` strings, with NUL padding between.
    pub fn parse_section(bytes: &[u8]) -> Self {
        let fields = bytes
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                let s = String::from_utf8_lossy(s);
                s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        Self { fields }
    }
}

const SHDR_LEN: usize = 64;
// Sections larger than this are not modinfo tables; refuse rather than allocate from a header.
const MAX_SECTION: u64 = 16 << 20;

/// Reads `.modinfo` from an uncompressed module.
pub fn read<R: Read + Seek>(mut r: R) -> Result<Modinfo, ModinfoError> {
    let mut ehdr = [0u8; 64];
    r.read_exact(&mut ehdr).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ModinfoError::NotElf64Le,
        _ => ModinfoError::Io(e),
    })?;
    // e_ident: magic, EI_CLASS = ELFCLASS64, EI_DATA = ELFDATA2LSB.
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(ModinfoError::NotElf64Le);
    }
    let shoff = u64_at(&ehdr, 0x28);
    let shentsize = usize::from(u16_at(&ehdr, 0x3a));
    let shnum = usize::from(u16_at(&ehdr, 0x3c));
    let shstrndx = usize::from(u16_at(&ehdr, 0x3e));
    if shentsize != SHDR_LEN {
        return Err(ModinfoError::Malformed("section header size is not 64"));
    }
    if shnum == 0 || shstrndx >= shnum {
        return Err(ModinfoError::Malformed("no section name table"));
    }
    let mut table = vec![0u8; shnum * SHDR_LEN];
    r.seek(SeekFrom::Start(shoff))?;
    r.read_exact(&mut table)?;
    let section = |i: usize| {
        let h = &table[i * SHDR_LEN..(i + 1) * SHDR_LEN];
        // sh_name, sh_offset, sh_size
        (u32_at(h, 0), u64_at(h, 24), u64_at(h, 32))
    };
    let (_, str_off, str_size) = section(shstrndx);
    let names = read_range(&mut r, str_off, str_size)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i);
        let name = usize::try_from(name_off)
            .ok()
            .and_then(|n| names.get(n..))
            .and_then(|rest| rest.split(|b| *b == 0).next());
        if name == Some(b".modinfo".as_slice()) {
            return Ok(Modinfo::parse_section(&read_range(&mut r, off, size)?));
        }
    }
    Err(ModinfoError::NoModinfo)
}

fn read_range<R: Read + Seek>(r: &mut R, off: u64, size: u64) -> Result<Vec<u8>, ModinfoError> {
    if size > MAX_SECTION {
        return Err(ModinfoError::Malformed("section too large"));
    }
    let len = usize::try_from(size).map_err(|_| ModinfoError::Malformed("section too large"))?;
    let mut buf = vec![0u8; len];
    r.seek(SeekFrom::Start(off))?;
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Builds a minimal ELF64 object with the given sections: enough for [`read`], and for tests
/// elsewhere in the crate that need fake modules.
#[cfg(test)]
pub(crate) fn fake_elf(sections: &[(&str, &[u8])]) -> Vec<u8> {
    // Layout: ELF header, section data, .shstrtab, section headers (null first).
    let mut shstrtab = vec![0u8];
    let mut data = Vec::new();
    let mut headers: Vec<(u32, u64, u64)> = vec![(0, 0, 0)];
    for (name, bytes) in sections {
        headers.push((
            shstrtab.len() as u32,
            (64 + data.len()) as u64,
            bytes.len() as u64,
        ));
        shstrtab.extend_from_slice(name.as_bytes());
        shstrtab.push(0);
        data.extend_from_slice(bytes);
    }
    let strtab_name = shstrtab.len() as u32;
    shstrtab.extend_from_slice(b".shstrtab\0");
    headers.push((strtab_name, (64 + data.len()) as u64, shstrtab.len() as u64));
    data.extend_from_slice(&shstrtab);
    let shoff = (64 + data.len()) as u64;

    let mut out = vec![0u8; 64];
    out[..6].copy_from_slice(b"\x7fELF\x02\x01");
    out[6] = 1; // EI_VERSION
    out[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
    out[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    out[0x3c..0x3e].copy_from_slice(&(headers.len() as u16).to_le_bytes());
    out[0x3e..0x40].copy_from_slice(&((headers.len() - 1) as u16).to_le_bytes());
    out.extend_from_slice(&data);
    for (name, off, size) in headers {
        let mut h = [0u8; SHDR_LEN];
        h[0..4].copy_from_slice(&name.to_le_bytes());
        h[24..32].copy_from_slice(&off.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_depends_and_softdeps_from_modinfo() {
        let modinfo = b"softdep=pre: crypto-crc32c post: x\0license=GPL\0\0\0depends=jbd2,mbcache,crc16\0name=ext4\0";
        let elf = fake_elf(&[(".text", b"\x90\x90"), (".modinfo", modinfo)]);
        let info = read(Cursor::new(elf)).unwrap();
        assert_eq!(info.depends(), ["jbd2", "mbcache", "crc16"]);
        assert_eq!(info.softdeps_pre(), ["crypto-crc32c"]);
        assert_eq!(info.values("name").collect::<Vec<_>>(), ["ext4"]);
    }

    #[test]
    fn empty_depends_means_none() {
        let elf = fake_elf(&[(".modinfo", b"depends=\0name=overlay\0")]);
        assert!(read(Cursor::new(elf)).unwrap().depends().is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_module() {
        assert!(matches!(
            read(Cursor::new(b"not an elf file at all".to_vec())),
            Err(ModinfoError::NotElf64Le)
        ));
        let elf = fake_elf(&[(".text", b"\x90")]);
        assert!(matches!(
            read(Cursor::new(elf)),
            Err(ModinfoError::NoModinfo)
        ));
        let mut truncated = fake_elf(&[(".modinfo", b"depends=\0")]);
        truncated.truncate(100);
        assert!(read(Cursor::new(truncated)).is_err());
    }
}
