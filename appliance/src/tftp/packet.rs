//! TFTP packets on the wire (RFC 1350, OACK from RFC 2347), the smoltcp way: [`Packet`] is
//! a view over a buffer with checked lengths and field accessors, [`Repr`] the validated
//! high-level form with [`Repr::parse`], [`Repr::buffer_len`] and [`Repr::emit`].
//!
//! Nothing here panics, whatever the input: every read goes through `get`, every write
//! through a length-checked slice, and a short buffer is an error. Strings stay bytes
//! (the RFC says netascii; firmware sends whatever it likes): the request layer decides
//! what a file name means.

use std::fmt;

/// Opcodes; unknown ones are kept so a log can say what arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Read request (RFC 1350).
    Rrq,
    /// Write request (RFC 1350).
    Wrq,
    /// A block of the file (RFC 1350).
    Data,
    /// Acknowledges a block (RFC 1350).
    Ack,
    /// Ends the transfer (RFC 1350).
    Error,
    /// Option acknowledgement (RFC 2347).
    Oack,
    Unknown(u16),
}

impl From<u16> for Opcode {
    fn from(v: u16) -> Self {
        match v {
            1 => Self::Rrq,
            2 => Self::Wrq,
            3 => Self::Data,
            4 => Self::Ack,
            5 => Self::Error,
            6 => Self::Oack,
            other => Self::Unknown(other),
        }
    }
}

impl From<Opcode> for u16 {
    fn from(v: Opcode) -> Self {
        match v {
            Opcode::Rrq => 1,
            Opcode::Wrq => 2,
            Opcode::Data => 3,
            Opcode::Ack => 4,
            Opcode::Error => 5,
            Opcode::Oack => 6,
            Opcode::Unknown(other) => other,
        }
    }
}

/// Error codes of RFC 1350, plus 8 from RFC 2347.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    /// RFC 2347: the client refuses the server's OACK.
    OptionRefused,
    Unknown(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        match v {
            0 => Self::NotDefined,
            1 => Self::FileNotFound,
            2 => Self::AccessViolation,
            3 => Self::DiskFull,
            4 => Self::IllegalOperation,
            5 => Self::UnknownTid,
            6 => Self::FileExists,
            7 => Self::NoSuchUser,
            8 => Self::OptionRefused,
            other => Self::Unknown(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(v: ErrorCode) -> Self {
        match v {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTid => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Unknown(other) => other,
        }
    }
}

/// Why bytes are not a TFTP packet, or a packet does not fit a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet shorter than its opcode needs")]
    Truncated,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("request without a NUL-terminated file name and mode")]
    Unterminated,
    #[error("empty option name")]
    EmptyOptionName,
    #[error("a string to emit contains NUL")]
    EmbeddedNul,
    #[error("buffer too small to emit the packet")]
    BufferTooSmall,
}

/// Largest DATA payload (RFC 2348: blksize up to 65464).
pub const MAX_BLOCK_SIZE: u16 = 65464;
/// DATA payload without options (RFC 1350).
pub const DEFAULT_BLOCK_SIZE: u16 = 512;
/// Opcode and block number.
pub const DATA_HEADER_LEN: usize = 4;

mod field {
    use std::ops::{Range, RangeFrom};
    pub const OPCODE: Range<usize> = 0..2;
    /// DATA and ACK: block number; ERROR: error code.
    pub const NUMBER: Range<usize> = 2..4;
    /// RRQ, WRQ, OACK: NUL-terminated strings.
    pub const STRINGS: RangeFrom<usize> = 2..;
    /// DATA: the block; ERROR: the message.
    pub const REST: RangeFrom<usize> = 4..;
}

/// A read-only or read-write view over a buffer holding a TFTP packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors then return `None` where it is short.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer, checking it is long enough for its opcode's fixed fields.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        let need = match self.opcode() {
            None => return Err(WireError::Truncated),
            Some(Opcode::Data | Opcode::Ack | Opcode::Error) => field::NUMBER.end,
            Some(_) => field::OPCODE.end,
        };
        if len < need {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u16_at(&self, r: std::ops::Range<usize>) -> Option<u16> {
        let b = self.buffer.as_ref().get(r)?;
        Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
    }

    pub fn opcode(&self) -> Option<Opcode> {
        self.u16_at(field::OPCODE).map(Opcode::from)
    }

    /// DATA and ACK: the block number.
    pub fn block(&self) -> Option<u16> {
        self.u16_at(field::NUMBER)
    }

    /// ERROR: the error code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.u16_at(field::NUMBER).map(ErrorCode::from)
    }

    /// RRQ, WRQ, OACK: the NUL-terminated strings after the opcode.
    pub fn strings(&self) -> &[u8] {
        self.buffer.as_ref().get(field::STRINGS).unwrap_or_default()
    }

    /// DATA: the block's bytes; ERROR: the message with its NUL.
    pub fn rest(&self) -> &[u8] {
        self.buffer.as_ref().get(field::REST).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16(&mut self, r: std::ops::Range<usize>, v: u16) -> Result<(), WireError> {
        let b = self
            .buffer
            .as_mut()
            .get_mut(r)
            .ok_or(WireError::BufferTooSmall)?;
        b.copy_from_slice(&v.to_be_bytes());
        Ok(())
    }

    pub fn set_opcode(&mut self, op: Opcode) -> Result<(), WireError> {
        self.set_u16(field::OPCODE, op.into())
    }

    pub fn set_block(&mut self, block: u16) -> Result<(), WireError> {
        self.set_u16(field::NUMBER, block)
    }

    pub fn set_error_code(&mut self, code: ErrorCode) -> Result<(), WireError> {
        self.set_u16(field::NUMBER, code.into())
    }

    /// DATA: the block's bytes, to fill in place.
    pub fn rest_mut(&mut self) -> &mut [u8] {
        self.buffer
            .as_mut()
            .get_mut(field::REST)
            .unwrap_or_default()
    }
}

/// Splits `buf` at its first NUL: the string before and what follows it.
fn take_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((buf.get(..nul)?, buf.get(nul + 1..)?))
}

/// Options as they sit on the wire: NUL-terminated name and value pairs (RFC 2347).
///
/// Built by [`Options::parse`], which keeps the complete pairs only: a trailing name with no
/// value, or bytes without a final NUL, are dropped there (some PXE ROMs pad requests), so
/// `raw` always holds whole pairs and emits back to the same bytes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Options<'a> {
    raw: &'a [u8],
}

impl<'a> Options<'a> {
    pub const EMPTY: Options<'static> = Options { raw: &[] };

    /// The longest prefix of `buf` made of complete pairs with non-empty names. Never fails
    /// today; the `Result` leaves room for strictness without changing callers.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        let mut rest = buf;
        let mut used = 0;
        while let Some((name, after_name)) = take_cstr(rest) {
            let Some((value, after_value)) = take_cstr(after_name) else {
                break;
            };
            if name.is_empty() {
                // NUL padding (some PXE ROMs) reads as an empty name: keep what came before.
                break;
            }
            used += name.len() + value.len() + 2;
            rest = after_value;
        }
        Ok(Self {
            raw: buf.get(..used).unwrap_or_default(),
        })
    }

    /// Wraps bytes written by [`OptionsWriter`] (or checked by [`Options::parse`]).
    pub fn from_written(w: &'a OptionsWriter) -> Self {
        Self { raw: &w.raw }
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// (name, value) pairs in order; names as sent (compare them case-insensitively).
    pub fn iter(&self) -> OptionsIter<'a> {
        OptionsIter { rest: self.raw }
    }
}

impl fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            }))
            .finish()
    }
}

pub struct OptionsIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for OptionsIter<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let (name, after) = take_cstr(self.rest)?;
        let (value, rest) = take_cstr(after)?;
        self.rest = rest;
        Some((name, value))
    }
}

/// Builds the option list of an OACK (or a request, in tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionsWriter {
    raw: Vec<u8>,
}

impl OptionsWriter {
    /// Appends a pair; refuses NUL inside either string and an empty name, which would not
    /// parse back as the same pair.
    pub fn push(&mut self, name: &str, value: &str) -> Result<(), WireError> {
        if name.is_empty() {
            return Err(WireError::EmptyOptionName);
        }
        if name.contains('\0') || value.contains('\0') {
            return Err(WireError::EmbeddedNul);
        }
        for s in [name, value] {
            self.raw.extend_from_slice(s.as_bytes());
            self.raw.push(0);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn options(&self) -> Options<'_> {
        Options::from_written(self)
    }
}

/// RRQ and WRQ contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub filename: &'a [u8],
    pub mode: &'a [u8],
    pub options: Options<'a>,
}

/// A validated TFTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: &'a [u8] },
    Oack { options: Options<'a> },
}

impl<'a> Repr<'a> {
    /// Parses a packet. Lenient where real clients are sloppy (see [`Options::parse`]; an
    /// ERROR message may lack its NUL), strict where meaning would be lost.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Self, WireError> {
        packet.check_len()?;
        let op = packet.opcode().ok_or(WireError::Truncated)?;
        let buffer: &'a T = packet.buffer;
        let bytes: &'a [u8] = buffer.as_ref();
        let number = || packet.block().ok_or(WireError::Truncated);
        let strings = bytes.get(field::STRINGS).unwrap_or_default();
        let rest = bytes.get(field::REST).unwrap_or_default();
        Ok(match op {
            Opcode::Rrq | Opcode::Wrq => {
                let (filename, after) = take_cstr(strings).ok_or(WireError::Unterminated)?;
                let (mode, after) = take_cstr(after).ok_or(WireError::Unterminated)?;
                let req = Request {
                    filename,
                    mode,
                    options: Options::parse(after)?,
                };
                if op == Opcode::Rrq {
                    Self::Rrq(req)
                } else {
                    Self::Wrq(req)
                }
            }
            Opcode::Data => Self::Data {
                block: number()?,
                data: rest,
            },
            Opcode::Ack => Self::Ack { block: number()? },
            Opcode::Error => Self::Error {
                code: ErrorCode::from(number()?),
                message: take_cstr(rest).map_or(rest, |(m, _)| m),
            },
            Opcode::Oack => Self::Oack {
                options: Options::parse(strings)?,
            },
            Opcode::Unknown(v) => return Err(WireError::UnknownOpcode(v)),
        })
    }

    /// Parses raw bytes: [`Packet::new_checked`] then [`Repr::parse`].
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Self, WireError> {
        Self::parse(&Packet::new_unchecked(bytes))
    }

    pub fn opcode(&self) -> Opcode {
        match self {
            Self::Rrq(_) => Opcode::Rrq,
            Self::Wrq(_) => Opcode::Wrq,
            Self::Data { .. } => Opcode::Data,
            Self::Ack { .. } => Opcode::Ack,
            Self::Error { .. } => Opcode::Error,
            Self::Oack { .. } => Opcode::Oack,
        }
    }

    /// Bytes [`Repr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        field::OPCODE.end
            + match self {
                Self::Rrq(r) | Self::Wrq(r) => {
                    r.filename.len() + 1 + r.mode.len() + 1 + r.options.raw.len()
                }
                Self::Data { data, .. } => 2 + data.len(),
                Self::Ack { .. } => 2,
                Self::Error { message, .. } => 2 + message.len() + 1,
                Self::Oack { options } => options.raw.len(),
            }
    }

    /// Writes the packet at the start of `buf`; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let len = self.buffer_len();
        let out = buf.get_mut(..len).ok_or(WireError::BufferTooSmall)?;
        let mut p = Packet::new_unchecked(&mut *out);
        p.set_opcode(self.opcode())?;
        let mut w = Writer {
            buf: out,
            pos: field::OPCODE.end,
        };
        match self {
            Self::Rrq(r) | Self::Wrq(r) => {
                w.cstr(r.filename)?;
                w.cstr(r.mode)?;
                w.bytes(r.options.raw)?;
            }
            Self::Data { block, data } => {
                w.bytes(&block.to_be_bytes())?;
                w.bytes(data)?;
            }
            Self::Ack { block } => w.bytes(&block.to_be_bytes())?,
            Self::Error { code, message } => {
                w.bytes(&u16::from(*code).to_be_bytes())?;
                w.cstr(message)?;
            }
            Self::Oack { options } => w.bytes(options.raw)?,
        }
        Ok(len)
    }

    /// Emits into a new vector (for tests and rare packets; DATA goes through
    /// [`emit_data_header`] to avoid a copy).
    pub fn to_vec(&self) -> Result<Vec<u8>, WireError> {
        let mut v = vec![0; self.buffer_len()];
        self.emit(&mut v)?;
        Ok(v)
    }
}

/// Writes the DATA header for `block` in front of a payload already in `buf[4..]`.
pub fn emit_data_header(buf: &mut [u8], block: u16) -> Result<(), WireError> {
    let mut p = Packet::new_unchecked(buf);
    p.set_opcode(Opcode::Data)?;
    p.set_block(block)
}

struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) -> Result<(), WireError> {
        let end = self.pos + b.len();
        self.buf
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(())
    }

    fn cstr(&mut self, s: &[u8]) -> Result<(), WireError> {
        if s.contains(&0) {
            return Err(WireError::EmbeddedNul);
        }
        self.bytes(s)?;
        self.bytes(&[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read requests captured from real clients on this machine (Debian 12 packages).
    const CURL_RRQ: &[u8] =
        b"\x00\x01pxelinux.0\x00octet\x00tsize\x000\x00blksize\x00512\x00timeout\x001\x00";
    const ATFTP_RRQ: &[u8] =
        b"\x00\x01snponly.efi\x00octet\x00tsize\x00enable\x00blksize\x001468\x00windowsize\x004\x00";
    const TFTP_HPA_RRQ: &[u8] = b"\x00\x01undionly.kpxe\x00octet\x00";

    fn pairs(o: Options<'_>) -> Vec<(&str, &str)> {
        o.iter()
            .map(|(n, v)| {
                (
                    std::str::from_utf8(n).unwrap(),
                    std::str::from_utf8(v).unwrap(),
                )
            })
            .collect()
    }

    fn roundtrip(bytes: &[u8]) -> Repr<'_> {
        let repr = Repr::parse_bytes(bytes).unwrap();
        assert_eq!(repr.buffer_len(), bytes.len());
        assert_eq!(repr.to_vec().unwrap(), bytes);
        repr
    }

    #[test]
    fn curl_request() {
        let Repr::Rrq(r) = roundtrip(CURL_RRQ) else {
            panic!("not an RRQ")
        };
        assert_eq!(r.filename, b"pxelinux.0");
        assert_eq!(r.mode, b"octet");
        assert_eq!(
            pairs(r.options),
            [("tsize", "0"), ("blksize", "512"), ("timeout", "1")]
        );
    }

    #[test]
    fn atftp_and_tftp_hpa_requests() {
        let Repr::Rrq(r) = roundtrip(ATFTP_RRQ) else {
            panic!("not an RRQ")
        };
        assert_eq!(
            pairs(r.options),
            [
                ("tsize", "enable"),
                ("blksize", "1468"),
                ("windowsize", "4")
            ]
        );
        let Repr::Rrq(r) = roundtrip(TFTP_HPA_RRQ) else {
            panic!("not an RRQ")
        };
        assert_eq!(r.filename, b"undionly.kpxe");
        assert!(r.options.is_empty());
    }

    #[test]
    fn view_fields() {
        let p = Packet::new_checked(&b"\x00\x03\xff\xfeabc"[..]).unwrap();
        assert_eq!(p.opcode(), Some(Opcode::Data));
        assert_eq!(p.block(), Some(0xfffe));
        assert_eq!(p.rest(), b"abc");
        let mut buf = [0u8; 6];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_opcode(Opcode::Error).unwrap();
        p.set_error_code(ErrorCode::OptionRefused).unwrap();
        p.rest_mut().copy_from_slice(b"x\0");
        assert_eq!(&buf, b"\x00\x05\x00\x08x\0");
        let mut short = [0u8; 3];
        let mut p = Packet::new_unchecked(&mut short[..]);
        assert_eq!(p.set_block(1), Err(WireError::BufferTooSmall));
        assert!(p.rest_mut().is_empty());
    }

    #[test]
    fn every_kind_round_trips() {
        let mut w = OptionsWriter::default();
        w.push("blksize", "1468").unwrap();
        w.push("tsize", "123").unwrap();
        for repr in [
            Repr::Wrq(Request {
                filename: b"a",
                mode: b"netascii",
                options: Options::EMPTY,
            }),
            Repr::Data {
                block: 7,
                data: b"hello",
            },
            Repr::Data {
                block: 0,
                data: b"",
            },
            Repr::Ack { block: 65535 },
            Repr::Error {
                code: ErrorCode::FileNotFound,
                message: b"file not found",
            },
            Repr::Error {
                code: ErrorCode::Unknown(99),
                message: b"",
            },
            Repr::Oack {
                options: w.options(),
            },
        ] {
            let bytes = repr.to_vec().unwrap();
            assert_eq!(Repr::parse_bytes(&bytes).unwrap(), repr);
        }
        assert_eq!(
            Repr::Ack { block: 0x0102 }.to_vec().unwrap(),
            b"\x00\x04\x01\x02"
        );
        assert_eq!(
            Repr::Oack {
                options: w.options()
            }
            .to_vec()
            .unwrap(),
            b"\x00\x06blksize\x001468\x00tsize\x00123\x00"
        );
    }

    #[test]
    fn sloppy_but_meaningful_input_is_accepted() {
        // NUL padding after the options (some PXE ROMs).
        let Repr::Rrq(r) =
            Repr::parse_bytes(b"\x00\x01f\x00octet\x00blksize\x001024\x00\x00\x00\x00").unwrap()
        else {
            panic!()
        };
        assert_eq!(pairs(r.options), [("blksize", "1024")]);
        // A name without a value, or without its NUL, is dropped.
        let Repr::Rrq(r) =
            Repr::parse_bytes(b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x00").unwrap()
        else {
            panic!()
        };
        assert_eq!(pairs(r.options), [("tsize", "0")]);
        let Repr::Rrq(r) = Repr::parse_bytes(b"\x00\x01f\x00octet\x00tsi").unwrap() else {
            panic!()
        };
        assert!(r.options.is_empty());
        // An ERROR message without its NUL.
        assert_eq!(
            Repr::parse_bytes(b"\x00\x05\x00\x01gone").unwrap(),
            Repr::Error {
                code: ErrorCode::FileNotFound,
                message: b"gone"
            }
        );
    }

    #[test]
    fn broken_input_is_refused() {
        assert_eq!(Repr::parse_bytes(b""), Err(WireError::Truncated));
        assert_eq!(Repr::parse_bytes(b"\x00"), Err(WireError::Truncated));
        assert_eq!(
            Repr::parse_bytes(b"\x00\x04\x00"),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Repr::parse_bytes(b"\x00\x05\x00"),
            Err(WireError::Truncated)
        );
        assert_eq!(Repr::parse_bytes(b"\x00\x03"), Err(WireError::Truncated));
        assert_eq!(
            Repr::parse_bytes(b"\x00\x09xx"),
            Err(WireError::UnknownOpcode(9))
        );
        assert_eq!(
            Repr::parse_bytes(b"\x00\x01file"),
            Err(WireError::Unterminated)
        );
        assert_eq!(
            Repr::parse_bytes(b"\x00\x01file\x00octet"),
            Err(WireError::Unterminated)
        );
    }

    #[test]
    fn emit_checks_its_buffer_and_strings() {
        let r = Repr::Ack { block: 1 };
        assert_eq!(r.emit(&mut [0u8; 3]), Err(WireError::BufferTooSmall));
        let r = Repr::Rrq(Request {
            filename: b"a\0b",
            mode: b"octet",
            options: Options::EMPTY,
        });
        assert_eq!(r.to_vec(), Err(WireError::EmbeddedNul));
        let mut w = OptionsWriter::default();
        assert_eq!(w.push("", "1"), Err(WireError::EmptyOptionName));
        assert_eq!(w.push("a\0", "1"), Err(WireError::EmbeddedNul));
        let mut buf = [0xffu8; 8];
        emit_data_header(&mut buf, 0x1234).unwrap();
        assert_eq!(&buf[..4], b"\x00\x03\x12\x34");
    }

    /// The fuzz target's property on pseudo-random input, so `cargo test` covers it too.
    #[test]
    fn parse_emit_parse_is_stable_on_noise() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut parsed = 0;
        for _ in 0..200_000 {
            let len = (next() % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| (next() % 8) as u8).collect();
            // Mostly valid opcodes, with NULs and small bytes common.
            if let Some(b) = buf.get_mut(0) {
                *b = 0;
            }
            if let Some(b) = buf.get_mut(1) {
                *b = (next() % 8) as u8;
            }
            if let Ok(repr) = Repr::parse_bytes(&buf) {
                parsed += 1;
                let again = repr.to_vec().unwrap();
                assert_eq!(Repr::parse_bytes(&again).unwrap(), repr, "{buf:?}");
            }
        }
        assert!(parsed > 10_000, "{parsed}");
    }
}
