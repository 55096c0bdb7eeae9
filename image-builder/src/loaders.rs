//! The signed boot chain for Secure Boot: iPXE is not signed, so a UEFI machine with Secure
//! Boot on network-boots Debian's Microsoft-signed shim, which loads Debian's signed GRUB (its
//! network build), which loads the signed kernel. Both come from Debian's packages, fetched
//! with the host's apt like the kernel (`CACHE/debs`), and land beside the other boot files:
//!
//! ```text
//! OUT/shimx64.efi   shim-signed            usr/lib/shim/shimx64.efi.signed
//! OUT/grubx64.efi   grub-efi-amd64-signed  usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed
//! ```
//!
//! shim loads `grubx64.efi` from the directory it was loaded from; that GRUB has `/grub` as
//! its prefix and TFTP built in (no HTTP), and reads `$prefix/grub.cfg` from the server it
//! came from (docs/measurements.md, "Secure Boot").

use std::fs;
use std::path::{Path, PathBuf};

use crate::kernel::{self, KernelError};

/// One signed loader: its package, its path in the package, its name among the boot files.
pub struct Loader {
    pub package: &'static str,
    pub path: &'static str,
    pub name: &'static str,
}

pub const SHIM: Loader = Loader {
    package: "shim-signed",
    path: "usr/lib/shim/shimx64.efi.signed",
    name: "shimx64.efi",
};

/// shim asks for `grubx64.efi` by that name, whatever GRUB build it is.
pub const GRUB: Loader = Loader {
    package: "grub-efi-amd64-signed",
    path: "usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed",
    name: "grubx64.efi",
};

pub const ALL: [Loader; 2] = [SHIM, GRUB];

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Fetch(#[from] KernelError),
    #[error("{package} has no {path}")]
    Missing { package: String, path: String },
    #[error("{file} is not a signed PE image (no Authenticode signature)")]
    Unsigned { file: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Fetches (unless cached) each loader's package and puts the loader in `out`, checked to
/// carry a signature. Returns the files written.
pub fn fetch(cache: &Path, out: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    fs::create_dir_all(out).map_err(io_err(out))?;
    let mut written = Vec::new();
    for l in ALL {
        let deb = kernel::ensure_deb(&debs, l.package, None)?;
        let tmp = tempfile::tempdir_in(cache).map_err(io_err(cache))?;
        kernel::run(
            "dpkg",
            &["-x".as_ref(), deb.as_os_str(), tmp.path().as_os_str()],
        )?;
        let from = tmp.path().join(l.path);
        if !from.is_file() {
            return Err(LoaderError::Missing {
                package: l.package.into(),
                path: l.path.into(),
            });
        }
        let bytes = fs::read(&from).map_err(io_err(&from))?;
        if !is_signed_pe(&bytes) {
            return Err(LoaderError::Unsigned { file: from });
        }
        let dest = out.join(l.name);
        let part = out.join(format!(".{}.part", l.name));
        fs::write(&part, &bytes).map_err(io_err(&part))?;
        fs::rename(&part, &dest).map_err(io_err(&dest))?;
        eprintln!(
            "stork-image: {} from {} ({} bytes)",
            l.name,
            deb.file_name().unwrap_or_default().to_string_lossy(),
            bytes.len()
        );
        written.push(dest);
    }
    Ok(written)
}

/// Whether `pe` is a PE32+ image whose certificate table (data directory 4) is not empty:
/// an Authenticode-signed image. Firmware checks the signature itself; this only catches a
/// package that changed what it ships (an unsigned build would fail only at boot).
pub fn is_signed_pe(pe: &[u8]) -> bool {
    let u16_at = |o: usize| pe.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        pe.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if pe.get(..2) != Some(b"MZ") {
        return false;
    }
    let Some(header) = u32_at(0x3c).map(|o| o as usize) else {
        return false;
    };
    if pe.get(header..header + 4) != Some(b"PE\0\0") {
        return false;
    }
    let optional = header + 24;
    // PE32+ (0x20b): the data directories start 112 bytes into the optional header.
    if u16_at(optional) != Some(0x20b) {
        return false;
    }
    let security = optional + 112 + 4 * 8;
    matches!((u32_at(security), u32_at(security + 4)), (Some(at), Some(len)) if at != 0 && len >= 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest PE32+ header the check reads, with a certificate table of `len` bytes.
    fn pe(len: u32) -> Vec<u8> {
        let mut b = vec![0u8; 0x200];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
        let security = 0x98 + 112 + 32;
        b[security..security + 4].copy_from_slice(&0x1000u32.to_le_bytes());
        b[security + 4..security + 8].copy_from_slice(&len.to_le_bytes());
        b
    }

    #[test]
    fn a_certificate_table_means_signed() {
        assert!(is_signed_pe(&pe(1472)));
        assert!(!is_signed_pe(&pe(0)));
        assert!(!is_signed_pe(b"MZ"));
        assert!(!is_signed_pe(&[]));
        let mut pe32 = pe(1472);
        pe32[0x98] = 0x0b;
        pe32[0x99] = 0x01;
        assert!(!is_signed_pe(&pe32), "PE32, not PE32+");
    }
}
