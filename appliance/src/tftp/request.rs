//! What a request means, sans I/O: read-only service, transfer mode, and the file name
//! normalised into a path relative to the root. The filesystem check (symlinks) is in
//! [`super::fs`].

use super::options::Requested;
use super::packet::{ErrorCode, Repr, Request};

/// RFC 1350 transfer modes Stork serves ("mail" is obsolete and refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    /// Text with CR LF line ends; converted as it is sent (see [`netascii`]).
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
///
/// Converted as it is sent, never whole: the [`Encoder`](netascii::Encoder) keeps the
/// encoded bytes from the first unacknowledged one to a little past the block asked, so
/// what a transfer holds depends on its block and window sizes, not on the file's. The
/// encoded size (for `tsize` and the last block) is counted first in one streaming pass
/// ([`encoded_len`](netascii::encoded_len) over chunks).
pub mod netascii {
    /// Bytes `input` takes once encoded (each LF and CR gains a byte). Add it up over the
    /// chunks of a file for the file's encoded size.
    pub fn encoded_len(input: &[u8]) -> u64 {
        let extra = input.iter().filter(|&&b| b == b'\n' || b == b'\r').count();
        (input.len() as u64).saturating_add(extra as u64)
    }

    /// Appends the encoded form of `input` to `out`.
    pub fn encode_into(input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        for &b in input {
            match b {
                b'\n' => out.extend_from_slice(b"\r\n"),
                b'\r' => out.extend_from_slice(b"\r\0"),
                other => out.push(other),
            }
        }
    }

    /// The whole encoded form (tests and small inputs; transfers use [`Encoder`]).
    pub fn encode(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(input, &mut out);
        out
    }

    /// Streams a file's encoded form, sans I/O: asks for raw chunks ([`Encoder::wants`]),
    /// is fed them ([`Encoder::feed`]) and hands out encoded ranges ([`Encoder::get`]).
    ///
    /// It holds the encoded bytes from its start to its end; the start moves up to what the
    /// transfer will never send again ([`Encoder::release_before`]) when more must be
    /// encoded, always to a whole encoded character (an encoded CR is always the first of
    /// a pair, so the raw offset of any such point is known). A range before the start is
    /// served by encoding again from the file's beginning: correct, slow, and never needed
    /// by the state machine, which only goes back to its first unacknowledged block.
    #[derive(Debug)]
    pub struct Encoder {
        /// Raw length of the file, as counted at open.
        raw_len: u64,
        /// Encoded offset of `buf[0]`.
        start: u64,
        /// Raw offset of the byte `buf[0]` comes from.
        raw_start: u64,
        /// Raw offset after the last byte encoded into `buf`.
        raw_end: u64,
        /// Encoded offset below which nothing will be asked again.
        release: u64,
        buf: Vec<u8>,
    }

    impl Encoder {
        pub fn new(raw_len: u64) -> Self {
            Self {
                raw_len,
                start: 0,
                raw_start: 0,
                raw_end: 0,
                release: 0,
                buf: Vec::new(),
            }
        }

        /// Nothing before encoded `offset` will be asked again: it may go at the next
        /// refill (not now, so a refill moves memory once, not every block).
        pub fn release_before(&mut self, offset: u64) {
            self.release = self.release.max(offset);
        }

        fn end(&self) -> u64 {
            self.start.saturating_add(self.buf.len() as u64)
        }

        /// The raw chunk (offset, length) to [`Encoder::feed`] next before encoded
        /// `offset..offset + len` can be read, or `None` when it can (or never will: the
        /// file ends before, and [`Encoder::get`] says so). Chunks are at most `chunk`
        /// raw bytes.
        pub fn wants(&mut self, offset: u64, len: usize, chunk: usize) -> Option<(u64, usize)> {
            if offset < self.start {
                // Asked behind what was dropped: start again from the beginning.
                *self = Self::new(self.raw_len);
            }
            if offset.saturating_add(len as u64) <= self.end() || self.raw_end >= self.raw_len {
                return None;
            }
            self.drop_front(self.release.min(offset));
            let left = self.raw_len - self.raw_end;
            let n = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(chunk.max(1));
            Some((self.raw_end, n))
        }

        /// Drops encoded bytes before `offset`, stopping at a whole encoded character.
        fn drop_front(&mut self, offset: u64) {
            let Some(k) = offset.checked_sub(self.start) else {
                return;
            };
            let k = usize::try_from(k).unwrap_or(usize::MAX).min(self.buf.len());
            let (mut at, mut raw) = (0usize, 0u64);
            while at < k {
                // An encoded CR starts a pair (CR LF or CR NUL), from one raw byte.
                let step = if self.buf.get(at) == Some(&b'\r') {
                    2
                } else {
                    1
                };
                if at + step > k {
                    break;
                }
                at += step;
                raw += 1;
            }
            if at > 0 {
                self.buf.drain(..at);
                self.start += at as u64;
                self.raw_start += raw;
            }
        }

        /// The raw bytes [`Encoder::wants`] asked for (at most; fewer is fine).
        pub fn feed(&mut self, raw: &[u8]) {
            encode_into(raw, &mut self.buf);
            self.raw_end = self.raw_end.saturating_add(raw.len() as u64);
        }

        /// Encoded `offset..offset + len`, or `None` when not encoded (the file ended
        /// sooner than counted: it changed under the transfer).
        pub fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
            let from = usize::try_from(offset.checked_sub(self.start)?).ok()?;
            self.buf.get(from..from.checked_add(len)?)
        }

        /// Encoded bytes held now.
        pub fn buffered(&self) -> usize {
            self.buf.len()
        }
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
        assert_eq!(netascii::encoded_len(b"a\nb\rc\r\n"), 11);
    }

    /// Text with runs of CR and LF, so pairs straddle every chunk and block boundary.
    fn text(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match x % 8 {
                    0 | 1 => b'\n',
                    2 => b'\r',
                    n => b'a' + n as u8,
                }
            })
            .collect()
    }

    /// Streams `raw` the way a transfer does: windows of blocks from the first
    /// unacknowledged one, releasing what is acknowledged, every third window lost and sent
    /// again. Checks every block; returns the most the encoder held.
    fn stream(raw: &[u8], block: usize, window: u64, chunk: usize) -> usize {
        let want = netascii::encode(raw);
        let (size, b) = (want.len() as u64, block as u64);
        let last = size / b + 1;
        let mut enc = netascii::Encoder::new(raw.len() as u64);
        let (mut most, mut next_unacked, mut round) = (0, 1u64, 0);
        while next_unacked <= last {
            let end = (next_unacked + window - 1).min(last);
            for n in next_unacked..=end {
                let offset = (n - 1) * b;
                let len = usize::try_from((size - offset).min(b)).unwrap();
                while let Some((at, k)) = enc.wants(offset, len, chunk) {
                    let at = usize::try_from(at).unwrap();
                    enc.feed(&raw[at..at + k]);
                }
                let from = usize::try_from(offset).unwrap();
                assert_eq!(
                    enc.get(offset, len),
                    Some(&want[from..from + len]),
                    "block {n}"
                );
                most = most.max(enc.buffered());
            }
            round += 1;
            if round % 3 != 0 {
                next_unacked = end + 1;
                enc.release_before((next_unacked - 1) * b);
            }
        }
        most
    }

    #[test]
    fn netascii_streams_with_a_bounded_buffer() {
        for (len, block, window, chunk) in [
            (0, 512, 1, 64),
            (1, 512, 1, 64),
            (5000, 8, 1, 7),
            (5000, 512, 4, 100),
            (200_000, 512, 1, 4096),
            (200_000, 1468, 16, 4096),
        ] {
            let most = stream(&text(len), block, window, chunk);
            // The unacknowledged window, the block asked, and a chunk's encoding past it:
            // nothing that grows with the file.
            let bound = block * (window as usize + 1) + 2 * chunk + 2;
            assert!(most <= bound, "{most} > {bound} for {len} {block} {window}");
        }
    }

    #[test]
    fn netascii_encoder_restarts_when_asked_behind() {
        let raw = text(10_000);
        let want = netascii::encode(&raw);
        let mut enc = netascii::Encoder::new(raw.len() as u64);
        let fill = |enc: &mut netascii::Encoder, offset: u64, len: usize| {
            while let Some((at, n)) = enc.wants(offset, len, 256) {
                let at = usize::try_from(at).unwrap();
                enc.feed(&raw[at..at + n]);
            }
        };
        fill(&mut enc, 9000, 512);
        enc.release_before(9000);
        fill(&mut enc, 10_000, 512);
        assert_eq!(enc.get(10_000, 512), Some(&want[10_000..10_512]));
        assert_eq!(enc.get(100, 10), None);
        // Behind the start: encoded again from the beginning, still right.
        fill(&mut enc, 100, 10);
        assert_eq!(enc.get(100, 10), Some(&want[100..110]));
    }

    #[test]
    fn netascii_encoder_reports_a_shrunk_file() {
        // Counted as 4 encoded bytes ("a\nb" -> "a\r\nb"), but the file now reads "abc".
        let mut enc = netascii::Encoder::new(3);
        while let Some((at, n)) = enc.wants(0, 4, 64) {
            assert_eq!(at, 0);
            enc.feed(&b"abc"[..n]);
        }
        assert_eq!(enc.get(0, 4), None);
        assert_eq!(enc.get(0, 3), Some(&b"abc"[..]));
    }
}
