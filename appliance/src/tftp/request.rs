//! What a request means, sans I/O: read-only service, transfer mode, and the file name
//! normalised into a path relative to the root. The filesystem check (symlinks) is in
//! [`super::fs`].

use super::options::Requested;
use super::packet::{ErrorCode, Repr, Request};

/// RFC 1350 transfer modes Stork serves ("mail" is obsolete and refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    /// Text with CR LF line ends; converted in memory (see [`netascii`]).
    Netascii,
}

/// A read request Stork will try to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Relative, `/`-separated, no empty, `.` or `..` component.
    pub path: String,
    pub mode: Mode,
    pub options: Requested,
}

/// Why a request is refused; the text goes to the client in the ERROR packet, so it never
/// names anything outside the request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("read-only server: write requests are refused")]
    WriteRequest,
    #[error("transfer mode not supported (octet or netascii)")]
    Mode,
    #[error("file name is not UTF-8")]
    NotUtf8,
    #[error("empty file name")]
    EmptyName,
    #[error("file name has control characters")]
    ControlCharacter,
    #[error("path escapes the TFTP root")]
    Escapes,
    #[error("file not found")]
    NotFound,
    #[error("not a regular file")]
    NotAFile,
    #[error("cannot read file")]
    Unreadable,
    #[error("netascii transfers are limited to {} MiB; use octet", netascii::MAX_LEN >> 20)]
    NetasciiTooLarge,
    #[error("not a request")]
    NotARequest,
}

impl Refused {
    /// The TFTP error code sent with the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::WriteRequest | Self::Escapes | Self::Unreadable => ErrorCode::AccessViolation,
            Self::NotFound | Self::NotAFile => ErrorCode::FileNotFound,
            Self::Mode
            | Self::NotUtf8
            | Self::EmptyName
            | Self::ControlCharacter
            | Self::NotARequest => ErrorCode::IllegalOperation,
            Self::NetasciiTooLarge => ErrorCode::NotDefined,
        }
    }
}

/// Checks a packet received on the listening port.
pub fn read_request(repr: &Repr<'_>) -> Result<ReadRequest, Refused> {
    let req: &Request<'_> = match repr {
        Repr::Rrq(r) => r,
        Repr::Wrq(_) => return Err(Refused::WriteRequest),
        _ => return Err(Refused::NotARequest),
    };
    let mode = if req.mode.eq_ignore_ascii_case(b"octet") {
        Mode::Octet
    } else if req.mode.eq_ignore_ascii_case(b"netascii") {
        Mode::Netascii
    } else {
        return Err(Refused::Mode);
    };
    Ok(ReadRequest {
        path: normalize(req.filename)?,
        mode,
        options: Requested::from_options(req.options),
    })
}

/// Normalises a requested file name into a path relative to the root: backslashes become
/// slashes (Windows-built NBPs and some firmware send them), leading slashes go (clients
/// write `/pxelinux.0` meaning the root's), empty and `.` components go; `..` anywhere is
/// refused rather than resolved, so no spelling reaches above the root.
pub fn normalize(name: &[u8]) -> Result<String, Refused> {
    let name = std::str::from_utf8(name).map_err(|_| Refused::NotUtf8)?;
    if name.chars().any(char::is_control) {
        return Err(Refused::ControlCharacter);
    }
    let mut parts = Vec::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(Refused::Escapes),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(Refused::EmptyName);
    }
    Ok(parts.join("/"))
}

/// Netascii (RFC 764 as used by RFC 1350): LF becomes CR LF and a bare CR becomes CR NUL.
/// Files are converted whole in memory, so the size is known for `tsize` and blocks map to
/// offsets; boot clients all use octet, so the cap costs nothing real.
pub mod netascii {
    /// Largest file served in netascii mode.
    pub const MAX_LEN: u64 = 16 << 20;

    pub fn encode(input: &[u8]) -> Vec<u8> {
        let extra = input.iter().filter(|&&b| b == b'\n' || b == b'\r').count();
        let mut out = Vec::with_capacity(input.len() + extra);
        for &b in input {
            match b {
                b'\n' => out.extend_from_slice(b"\r\n"),
                b'\r' => out.extend_from_slice(b"\r\0"),
                other => out.push(other),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::packet::Options;

    #[test]
    fn names_are_normalised() {
        for (name, want) in [
            ("pxelinux.0", "pxelinux.0"),
            ("/pxelinux.0", "pxelinux.0"),
            ("//efi//snponly.efi", "efi/snponly.efi"),
            ("\\EFI\\BOOT\\bootx64.efi", "EFI/BOOT/bootx64.efi"),
            ("./a/./b", "a/b"),
            ("/etc/passwd", "etc/passwd"),
        ] {
            assert_eq!(normalize(name.as_bytes()).as_deref(), Ok(want), "{name}");
        }
    }

    #[test]
    fn traversal_and_junk_are_refused() {
        for name in [
            "../etc/passwd",
            "..\\..\\etc\\passwd",
            "a/../../b",
            "a/..",
            "/..",
            "..",
        ] {
            assert_eq!(normalize(name.as_bytes()), Err(Refused::Escapes), "{name}");
        }
        assert_eq!(normalize(b""), Err(Refused::EmptyName));
        assert_eq!(normalize(b"///"), Err(Refused::EmptyName));
        assert_eq!(normalize(b"a\nb"), Err(Refused::ControlCharacter));
        assert_eq!(normalize(b"\xff"), Err(Refused::NotUtf8));
        // `..` inside a name is an ordinary name.
        assert_eq!(normalize(b"a..b/c..").as_deref(), Ok("a..b/c.."));
    }

    #[test]
    fn requests_are_checked() {
        let rrq = |mode: &'static [u8]| {
            Repr::Rrq(Request {
                filename: b"/boot/x",
                mode,
                options: Options::EMPTY,
            })
        };
        let r = read_request(&rrq(b"OCTET")).unwrap();
        assert_eq!((r.path.as_str(), r.mode), ("boot/x", Mode::Octet));
        assert_eq!(
            read_request(&rrq(b"netascii")).unwrap().mode,
            Mode::Netascii
        );
        assert_eq!(read_request(&rrq(b"mail")), Err(Refused::Mode));
        let wrq = Repr::Wrq(Request {
            filename: b"x",
            mode: b"octet",
            options: Options::EMPTY,
        });
        let err = read_request(&wrq).unwrap_err();
        assert_eq!(err, Refused::WriteRequest);
        assert_eq!(err.code(), ErrorCode::AccessViolation);
        assert_eq!(
            read_request(&Repr::Ack { block: 1 }),
            Err(Refused::NotARequest)
        );
    }

    #[test]
    fn netascii_converts_line_ends() {
        assert_eq!(netascii::encode(b"a\nb\rc\r\n"), b"a\r\nb\r\0c\r\0\r\n");
        assert_eq!(netascii::encode(b""), b"");
    }
}
