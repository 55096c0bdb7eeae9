//! The block map of a raw disk image (bmaptool's idea, our format): which byte ranges of the
//! image hold data, and where each range's zstd frames sit in the compressed file. Written by
//! `stork-image` next to `<name>.raw.zst` (as `<name>.raw.map.json`, role `disk-map`), read by
//! the agent to write a disk without decompressing what is zero and to decode on every core.
//!
//! # The compressed file stays one whole-image zstd file
//!
//! The `.raw.zst` is a sequence of independent zstd frames that, decoded one after the other
//! by any zstd decoder (`zstd -d`, an agent without map support), gives the whole raw image:
//!
//! - each data range is cut into frames of at most a few MiB (their content size in their
//!   header), compressed as usual;
//! - each gap between ranges (and before the first, after the last) is one **zero frame**
//!   ([`zero_frame`]) made only of RLE blocks of byte 0: about 4 bytes per 128 KiB of zeros,
//!   which a reader can recognise by walking the block headers ([`ZeroFrames`]), never
//!   decoding.
//!
//! The design we started from kept only the ranges' bytes in a second compressed file; one
//! file serves both readers instead, so an image is not stored twice (the appliance stick is
//! 8 GB) and nothing that reads the file today changes.
//!
//! # Why a wrong map cannot write a wrong disk
//!
//! The file's sha256 is registered and checked in line, as for any image; the map's own
//! sha256 is registered too. A reader that uses the map checks that the file is exactly the
//! frames the map lists in order: each data frame is one zstd frame of precisely the
//! compressed length, with the decoded length the map says (header and output), the bytes
//! between data frames are zero frames whose blocks decode to exactly the gap's length, and
//! the file ends where the map's last frame (or gap) does. Then the image the reader writes
//! equals the file decoded from start to end, frame after frame, which is the registered
//! image. A per-frame sha256 of the decoded bytes (the design's first idea) would add no
//! check beyond that, and hashing every decoded byte again costs more CPU than anything else
//! on the deploy's critical path (under QEMU TCG above all). A map with a range missing shows
//! as data where the map has a gap: a compressed block inside "zeros" ([`NotZero`]).
//!
//! Nothing here does I/O: [`BlockMap::segments`] validates a map and lays out what the reader
//! meets in the file; [`ZeroFrames`] is fed the gap's bytes as they arrive.

use std::fmt;

use serde::{Deserialize, Serialize};

/// [`BlockMap::format`].
pub const FORMAT: &str = "stork-block-map";
/// [`BlockMap::version`] this build writes. It reads every version from [`MIN_VERSION`]:
///
/// - **1**: a writer zeroes the gaps on the target;
/// - **2**: a writer leaves the gaps as the target has them (bmaptool's way: zeroing 2.2 GiB
///   of gaps was most of a 3 GiB image's write time, and on a disk without a write-zeroes
///   offload it is that many bytes written). Every place a reader of the disk could take
///   for a signature, the disk's and each partition's first and last MiB
///   ([`signature_areas`]), is in the map's ranges, zero or not, so what the target held
///   there before is overwritten; the rest of a gap is space no file system of the image
///   uses.
pub const VERSION: u32 = 2;
/// The oldest [`BlockMap::version`] this build reads.
pub const MIN_VERSION: u32 = 1;
/// The largest decoded data frame a reader accepts: what bounds its memory per frame in flight.
pub const MAX_FRAME: u64 = 16 << 20;
/// zstd's largest block (RFC 8878 3.1.1.2.4, `Block_Maximum_Size`).
pub const MAX_BLOCK: u64 = 128 << 10;
/// The zstd frame magic number, little-endian on the wire (RFC 8878 3.1.1).
pub const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// A raw disk image's data ranges and its compressed file's frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockMap {
    /// Always [`FORMAT`]: says what the file is to someone who opens it.
    pub format: String,
    pub version: u32,
    /// Bytes of the decompressed image.
    pub image_size: u64,
    /// The unit the data ranges are found in (all-zero blocks are gaps); ranges start on it.
    pub block_size: u64,
    /// Size and sha256 of the compressed file the map describes (a map and a file of two
    /// different builds are told apart before anything is written).
    pub file_size: u64,
    pub file_sha256: String,
    /// The data ranges, in order, not overlapping.
    pub ranges: Vec<Range>,
}

/// Image bytes `offset..offset + length` hold data; `frames` decode to them, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
    pub frames: Vec<Frame>,
}

/// One zstd frame of the compressed file: where it is and how much it decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frame {
    pub file_offset: u64,
    pub file_length: u64,
    /// Decoded bytes.
    pub length: u64,
}

/// What a reader meets in the file, in order: a gap (zero frames) or a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub kind: SegmentKind,
    /// Where its decoded bytes go in the image.
    pub image_offset: u64,
    pub length: u64,
    /// Where its bytes are in the compressed file.
    pub file_offset: u64,
    pub file_length: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Zero frames only: zeroed, never decoded.
    Gap,
    /// One zstd frame of range `range` (its index in the map).
    Data { range: usize },
}

/// Why a map is not valid, or not the map of this file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("not a block map: format {0:?}, expected {FORMAT:?}")]
    Format(String),
    #[error("version {0}; this build reads versions {MIN_VERSION} to {VERSION}")]
    Version(u32),
    #[error("block size {0} is not a power of two of at least 512")]
    BlockSize(u64),
    #[error("range {index} ({}) {why}", Span(*offset, *length))]
    Range {
        index: usize,
        offset: u64,
        length: u64,
        why: &'static str,
    },
    #[error("range {index}: frame {frame} {why}")]
    Frame {
        index: usize,
        frame: usize,
        why: &'static str,
    },
    #[error("range {index}: its frames decode to {frames} bytes, the range is {length}")]
    FramesLength {
        index: usize,
        frames: u64,
        length: u64,
    },
    #[error(
        "the gap at image bytes {} has no zero frames in the file (file bytes {})",
        Span(*image_offset, *length),
        Span(*file_offset, *file_length)
    )]
    Gap {
        image_offset: u64,
        length: u64,
        file_offset: u64,
        file_length: u64,
    },
    #[error("the map describes a file of {map} bytes, the image's file is {file} bytes")]
    FileSize { map: u64, file: u64 },
    #[error("the map describes the file with sha256 {map}, the image's file is {file}")]
    FileSha256 { map: String, file: String },
    #[error("an offset or length past 2^64")]
    Overflow,
}

/// `a..b` written as "a..b" (offset and length in, end out).
struct Span(u64, u64);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.0, self.0.saturating_add(self.1))
    }
}

fn add(a: u64, b: u64) -> Result<u64, MapError> {
    a.checked_add(b).ok_or(MapError::Overflow)
}

/// Where partition tables and file-system or RAID signatures live, as `(offset, length)`
/// clamped to a disk of `disk_size` bytes: its first and last MiB (MBR, primary and backup
/// GPT, md 1.0 and DDF at the end) and the first and last MiB of each partition given as
/// `(start, size)` in bytes (ext4, XFS, btrfs, swap, LVM at the start; md 0.9/1.0 and ZFS
/// labels at the end). Empty areas are left out.
pub fn signature_areas(disk_size: u64, parts: &[(u64, u64)]) -> Vec<(u64, u64)> {
    const MIB: u64 = 1 << 20;
    let mut areas = vec![(0, MIB), (disk_size.saturating_sub(MIB), MIB)];
    for &(start, size) in parts {
        let len = MIB.min(size);
        areas.push((start, len));
        areas.push((start.saturating_add(size).saturating_sub(len), len));
    }
    areas
        .into_iter()
        .map(|(offset, len)| (offset, len.min(disk_size.saturating_sub(offset))))
        .filter(|&(_, len)| len > 0)
        .collect()
}

impl BlockMap {
    /// Whether a writer zeroes the gaps on the target (version 1) or leaves them as they are
    /// (see [`VERSION`]).
    pub fn zeroes_gaps(&self) -> bool {
        self.version < 2
    }

    /// Data bytes in the image (the sum of the ranges).
    pub fn data_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.length))
    }

    /// Checks the map against itself and against the compressed file it goes with (its size
    /// and sha256 as registered), and returns what a reader meets in the file, in order.
    /// Every segment is non-empty; together they cover the image and the file exactly.
    pub fn segments(&self, file_size: u64, file_sha256: &str) -> Result<Vec<Segment>, MapError> {
        if self.format != FORMAT {
            return Err(MapError::Format(self.format.clone()));
        }
        if !(MIN_VERSION..=VERSION).contains(&self.version) {
            return Err(MapError::Version(self.version));
        }
        if self.block_size < 512 || !self.block_size.is_power_of_two() {
            return Err(MapError::BlockSize(self.block_size));
        }
        if self.file_size != file_size {
            return Err(MapError::FileSize {
                map: self.file_size,
                file: file_size,
            });
        }
        if !self.file_sha256.eq_ignore_ascii_case(file_sha256.trim()) {
            return Err(MapError::FileSha256 {
                map: self.file_sha256.clone(),
                file: file_sha256.trim().to_string(),
            });
        }
        let mut out = Vec::new();
        // Where the previous range (or frame) ended, in the image and in the file.
        let (mut image_at, mut file_at) = (0u64, 0u64);
        for (index, r) in self.ranges.iter().enumerate() {
            let range_err = |why| MapError::Range {
                index,
                offset: r.offset,
                length: r.length,
                why,
            };
            let end = add(r.offset, r.length)?;
            if r.length == 0 {
                return Err(range_err("is empty"));
            }
            if r.offset < image_at {
                return Err(range_err("starts before the previous range ends"));
            }
            if end > self.image_size {
                return Err(range_err("ends past the image"));
            }
            if r.offset % self.block_size != 0
                || (end % self.block_size != 0 && end != self.image_size)
            {
                return Err(range_err("is not on block boundaries"));
            }
            let Some(first) = r.frames.first() else {
                return Err(range_err("has no frames"));
            };
            gap(&mut out, image_at, r.offset, file_at, first.file_offset)?;
            let mut decoded = 0u64;
            for (i, f) in r.frames.iter().enumerate() {
                let frame_err = |why| MapError::Frame {
                    index,
                    frame: i,
                    why,
                };
                if f.length == 0 || f.file_length == 0 {
                    return Err(frame_err("is empty"));
                }
                if f.length > MAX_FRAME {
                    return Err(frame_err("decodes to more than 16 MiB"));
                }
                // Frames of one range follow each other; only gaps have zero frames between.
                if i > 0 && f.file_offset != file_at {
                    return Err(frame_err("does not start where the previous frame ends"));
                }
                let file_end = add(f.file_offset, f.file_length)?;
                if file_end > self.file_size {
                    return Err(frame_err("ends past the file"));
                }
                out.push(Segment {
                    kind: SegmentKind::Data { range: index },
                    image_offset: add(r.offset, decoded)?,
                    length: f.length,
                    file_offset: f.file_offset,
                    file_length: f.file_length,
                });
                decoded = add(decoded, f.length)?;
                file_at = file_end;
            }
            if decoded != r.length {
                return Err(MapError::FramesLength {
                    index,
                    frames: decoded,
                    length: r.length,
                });
            }
            image_at = end;
        }
        gap(&mut out, image_at, self.image_size, file_at, self.file_size)?;
        Ok(out)
    }
}

/// The gap from `image_at` to `image_end`, in file bytes `file_at..file_end`: both empty, or
/// both not (a zero frame is never empty; file bytes without image bytes would be skipped).
fn gap(
    out: &mut Vec<Segment>,
    image_at: u64,
    image_end: u64,
    file_at: u64,
    file_end: u64,
) -> Result<(), MapError> {
    let err = MapError::Gap {
        image_offset: image_at,
        length: image_end.saturating_sub(image_at),
        file_offset: file_at,
        file_length: file_end.saturating_sub(file_at),
    };
    if file_end < file_at {
        return Err(err);
    }
    match (image_end - image_at, file_end - file_at) {
        (0, 0) => Ok(()),
        (0, _) | (_, 0) => Err(err),
        (length, file_length) => {
            out.push(Segment {
                kind: SegmentKind::Gap,
                image_offset: image_at,
                length,
                file_offset: file_at,
                file_length,
            });
            Ok(())
        }
    }
}

/// Block types (RFC 8878 3.1.1.2.2).
const RAW_BLOCK: u32 = 0;
const RLE_BLOCK: u32 = 1;
const COMPRESSED_BLOCK: u32 = 2;

/// A zstd frame that decodes to `len` zero bytes: RLE blocks of byte 0 (4 bytes per 128 KiB),
/// the content size in the header, a 128 KiB window (so a decoder allocates no more for a
/// gap of gigabytes; a single-segment frame would ask for a window of the whole gap).
pub fn zero_frame(len: u64) -> Vec<u8> {
    let blocks = len.div_ceil(MAX_BLOCK).max(1);
    let mut out = Vec::with_capacity(14 + 4 * usize::try_from(blocks).unwrap_or(0));
    out.extend_from_slice(&ZSTD_MAGIC.to_le_bytes());
    // Frame header descriptor: 8-byte content size, no single segment, no checksum, no
    // dictionary. Window descriptor: exponent 17 - 10, mantissa 0: 128 KiB.
    out.push(0b1100_0000);
    out.push((17 - 10) << 3);
    out.extend_from_slice(&len.to_le_bytes());
    let mut left = len;
    loop {
        let n = left.min(MAX_BLOCK);
        left -= n;
        let last = u32::from(left == 0);
        // n <= 128 KiB: fits the header's 21 bits.
        let header = last | (RLE_BLOCK << 1) | ((n as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.push(0);
        if left == 0 {
            break;
        }
    }
    out
}

/// Why a gap's bytes are not zero frames of the gap's length. `at` is the file offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotZero {
    #[error("data at image byte {image}: a compressed block at file byte {at}")]
    Compressed { at: u64, image: u64 },
    #[error("data at image byte {image}: a block of non-zero bytes at file byte {at}")]
    NonZero { at: u64, image: u64 },
    #[error("no zstd frame at file byte {at}")]
    Magic { at: u64 },
    #[error("a reserved {what} at file byte {at}")]
    Reserved { at: u64, what: &'static str },
    #[error("the frame at file byte {at} says {header} bytes, its blocks make {blocks}")]
    ContentSize { at: u64, header: u64, blocks: u64 },
    #[error("the zero frames decode to {got} bytes, the gap is {want}")]
    Length { got: u64, want: u64 },
    #[error("the bytes end inside a frame (file byte {at})")]
    Truncated { at: u64 },
}

impl NotZero {
    /// Where the gap's bytes turn out to be data: a range missing from the map starts there.
    pub fn data_at(&self) -> Option<u64> {
        match self {
            Self::Compressed { image, .. } | Self::NonZero { image, .. } => Some(*image),
            _ => None,
        }
    }
}

/// Where [`ZeroFrames`] is within a frame.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting a frame header: magic, descriptor, then up to `need` bytes in all.
    Header {
        need: usize,
    },
    BlockHeader,
    /// In a raw block's bytes (each must be 0), or the one byte of an RLE block.
    Raw {
        left: u64,
        last: bool,
    },
    Rle {
        size: u64,
        last: bool,
    },
    /// The 4-byte content checksum after the last block (not checked: zeros are zeros).
    Checksum {
        left: u64,
    },
}

/// Checks, as its bytes arrive, that a gap's part of the file is zstd frames whose blocks are
/// all RLE or raw zeros and that they decode to exactly `want` bytes, without decoding.
/// Feed it with [`feed`](Self::feed), end with [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct ZeroFrames {
    want: u64,
    /// Image offset of the gap's first byte (for the error's "data at image byte").
    image_offset: u64,
    /// File offset of the next byte fed.
    at: u64,
    decoded: u64,
    state: State,
    pending: Vec<u8>,
    frame_start: u64,
    frame_decoded: u64,
    frame_size: Option<u64>,
    has_checksum: bool,
}

impl ZeroFrames {
    /// A gap of `want` bytes at `image_offset`, whose frames start at file byte `file_offset`.
    pub fn new(want: u64, image_offset: u64, file_offset: u64) -> Self {
        Self {
            want,
            image_offset,
            at: file_offset,
            decoded: 0,
            state: NEXT_FRAME,
            pending: Vec::with_capacity(18),
            frame_start: file_offset,
            frame_decoded: 0,
            frame_size: None,
            has_checksum: false,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), NotZero> {
        while let Some((&b, rest)) = bytes.split_first() {
            match self.state {
                State::Header { need } => {
                    self.pending.push(b);
                    self.at += 1;
                    bytes = rest;
                    let got = self.pending.len();
                    if got == 4 {
                        self.frame_start = self.at - 4;
                        if self.pending[..] != ZSTD_MAGIC.to_le_bytes() {
                            return Err(NotZero::Magic {
                                at: self.frame_start,
                            });
                        }
                    } else if got == 5 {
                        self.state = State::Header {
                            need: 5 + header_rest(b),
                        };
                    } else if got == need {
                        self.frame_header()?;
                    }
                }
                State::BlockHeader => {
                    self.pending.push(b);
                    self.at += 1;
                    bytes = rest;
                    if self.pending.len() == 3 {
                        let h = u32::from_le_bytes([
                            self.pending[0],
                            self.pending[1],
                            self.pending[2],
                            0,
                        ]);
                        self.pending.clear();
                        let last = h & 1 == 1;
                        let size = u64::from(h >> 3);
                        let at = self.at - 3;
                        let image = self.image_offset + self.decoded;
                        self.state = match (h >> 1) & 3 {
                            RAW_BLOCK if size == 0 => self.block_done(0, last)?,
                            RAW_BLOCK => State::Raw { left: size, last },
                            RLE_BLOCK => State::Rle { size, last },
                            COMPRESSED_BLOCK => return Err(NotZero::Compressed { at, image }),
                            _ => {
                                return Err(NotZero::Reserved {
                                    at,
                                    what: "block type",
                                });
                            }
                        };
                    }
                }
                State::Raw { left, last } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    let (chunk, rest) = bytes.split_at(n);
                    if let Some(i) = chunk.iter().position(|x| *x != 0) {
                        return Err(NotZero::NonZero {
                            at: self.at + i as u64,
                            image: self.image_offset + self.decoded + i as u64,
                        });
                    }
                    self.at += n as u64;
                    self.decoded += n as u64;
                    self.frame_decoded += n as u64;
                    bytes = rest;
                    self.state = if left == n as u64 {
                        self.block_done(0, last)?
                    } else {
                        State::Raw {
                            left: left - n as u64,
                            last,
                        }
                    };
                }
                State::Rle { size, last } => {
                    if b != 0 {
                        return Err(NotZero::NonZero {
                            at: self.at,
                            image: self.image_offset + self.decoded,
                        });
                    }
                    self.at += 1;
                    bytes = rest;
                    self.state = self.block_done(size, last)?;
                }
                State::Checksum { left } => {
                    self.at += 1;
                    bytes = rest;
                    self.state = if left == 1 {
                        NEXT_FRAME
                    } else {
                        State::Checksum { left: left - 1 }
                    };
                }
            }
            // More than the gap is never zeros of the gap.
            if self.decoded > self.want {
                return Err(NotZero::Length {
                    got: self.decoded,
                    want: self.want,
                });
            }
        }
        Ok(())
    }

    /// The gap's bytes are all in: they must end at a frame's end, at exactly `want` bytes.
    pub fn finish(self) -> Result<(), NotZero> {
        match self.state {
            State::Header { .. } if self.pending.is_empty() && self.decoded == self.want => Ok(()),
            State::Header { .. } if self.pending.is_empty() => Err(NotZero::Length {
                got: self.decoded,
                want: self.want,
            }),
            _ => Err(NotZero::Truncated { at: self.at }),
        }
    }

    /// The whole frame header is in `pending`: note its content size and checksum flag.
    fn frame_header(&mut self) -> Result<(), NotZero> {
        let d = self.pending[4];
        if d & 0b0000_1000 != 0 {
            return Err(NotZero::Reserved {
                at: self.frame_start + 4,
                what: "frame header bit",
            });
        }
        let (single, dict, fcs_len) = descriptor(d);
        let at = 5 + usize::from(!single) + dict;
        let mut le = [0u8; 8];
        if let Some(field) = self.pending.get(at..at + fcs_len) {
            le[..fcs_len].copy_from_slice(field);
        }
        let mut size = u64::from_le_bytes(le);
        if fcs_len == 2 {
            // The 2-byte field is offset by 256 (RFC 8878 3.1.1.1.4).
            size += 256;
        }
        self.frame_size = (fcs_len > 0).then_some(size);
        self.has_checksum = d & 0b0000_0100 != 0;
        self.frame_decoded = 0;
        self.pending.clear();
        self.state = State::BlockHeader;
        Ok(())
    }

    /// A block of `size` zeros (an RLE block's; a raw block counted its bytes already) ended;
    /// after the last block the header's content size must match what the blocks made.
    fn block_done(&mut self, size: u64, last: bool) -> Result<State, NotZero> {
        self.decoded += size;
        self.frame_decoded += size;
        if !last {
            return Ok(State::BlockHeader);
        }
        if let Some(header) = self.frame_size
            && header != self.frame_decoded
        {
            return Err(NotZero::ContentSize {
                at: self.frame_start,
                header,
                blocks: self.frame_decoded,
            });
        }
        Ok(if self.has_checksum {
            State::Checksum { left: 4 }
        } else {
            NEXT_FRAME
        })
    }
}

/// Waiting for the next frame's magic and descriptor (`need` is set from the descriptor).
const NEXT_FRAME: State = State::Header { need: 0 };

/// Single segment, dictionary id bytes, content size bytes, from a frame header descriptor.
fn descriptor(d: u8) -> (bool, usize, usize) {
    let single = d & 0b0010_0000 != 0;
    let dict = match d & 3 {
        0 => 0,
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let fcs = match (d >> 6, single) {
        (0, false) => 0,
        (0, true) => 1,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    (single, dict, fcs)
}

/// Header bytes after the magic and the descriptor: window descriptor (unless single
/// segment), dictionary id, content size.
fn header_rest(d: u8) -> usize {
    let (single, dict, fcs) = descriptor(d);
    usize::from(!single) + dict + fcs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SHA: &str = "ab";

    /// Data at 0..2 MiB (two frames) and 5..6 MiB (one), in a 8 MiB image; the file holds
    /// a zero frame for each gap (sizes made up: only the layout matters here).
    fn map() -> BlockMap {
        BlockMap {
            format: FORMAT.into(),
            version: VERSION,
            image_size: 8 * MIB,
            block_size: MIB,
            file_size: 1000,
            file_sha256: SHA.into(),
            ranges: vec![
                Range {
                    offset: 0,
                    length: 2 * MIB,
                    frames: vec![
                        Frame {
                            file_offset: 0,
                            file_length: 100,
                            length: MIB,
                        },
                        Frame {
                            file_offset: 100,
                            file_length: 200,
                            length: MIB,
                        },
                    ],
                },
                Range {
                    offset: 5 * MIB,
                    length: MIB,
                    frames: vec![Frame {
                        file_offset: 400,
                        file_length: 500,
                        length: MIB,
                    }],
                },
            ],
        }
    }

    #[test]
    fn segments_cover_the_image_and_the_file_in_order() {
        let s = map().segments(1000, "AB").unwrap();
        let laid: Vec<_> = s
            .iter()
            .map(|s| (s.image_offset, s.length, s.file_offset, s.file_length))
            .collect();
        assert_eq!(
            laid,
            [
                (0, MIB, 0, 100),
                (MIB, MIB, 100, 200),
                (2 * MIB, 3 * MIB, 300, 100),
                (5 * MIB, MIB, 400, 500),
                (6 * MIB, 2 * MIB, 900, 100),
            ]
        );
        assert_eq!(s[2].kind, SegmentKind::Gap);
        assert_eq!(s[3].kind, SegmentKind::Data { range: 1 });
        assert_eq!(map().data_bytes(), 3 * MIB);
    }

    #[test]
    fn serde_round_trip() {
        let m = map();
        let json = serde_json::to_string_pretty(&m).unwrap();
        assert_eq!(serde_json::from_str::<BlockMap>(&json).unwrap(), m);
        // An unknown field is a map of another version, not one to half-read.
        let extra = json.replacen("{", "{\"later\": 1,", 1);
        assert!(serde_json::from_str::<BlockMap>(&extra).is_err());
    }

    #[test]
    fn both_versions_are_read_and_only_the_first_zeroes_gaps() {
        let mut m = map();
        assert!(m.segments(1000, SHA).is_ok() && !m.zeroes_gaps());
        m.version = 1;
        assert!(m.segments(1000, SHA).is_ok() && m.zeroes_gaps());
        for v in [0, VERSION + 1] {
            m.version = v;
            assert_eq!(
                m.segments(1000, SHA).unwrap_err().to_string(),
                format!("version {v}; this build reads versions 1 to {VERSION}")
            );
        }
    }

    #[test]
    fn signature_areas_are_clamped_to_the_disk() {
        // A partition smaller than a MiB, one past the end of the disk (a stale table), and
        // a disk smaller than a MiB.
        let areas = signature_areas(10 * MIB, &[(MIB, 4096), (9 * MIB, 4 * MIB)]);
        assert_eq!(
            areas,
            [
                (0, MIB),
                (9 * MIB, MIB),
                (MIB, 4096),
                (MIB, 4096),
                (9 * MIB, MIB)
            ]
        );
        assert_eq!(signature_areas(4096, &[]), [(0, 4096), (0, 4096)]);
    }

    #[test]
    fn wrong_maps_are_refused_with_the_reason() {
        let check = |m: BlockMap| m.segments(1000, SHA).unwrap_err().to_string();
        let mut m = map();
        m.ranges[0].frames[1].length -= 1;
        assert_eq!(
            check(m),
            "range 0: its frames decode to 2097151 bytes, the range is 2097152"
        );
        let mut m = map();
        m.ranges[1].offset = MIB;
        assert_eq!(
            check(m),
            "range 1 (1048576..2097152) starts before the previous range ends"
        );
        let mut m = map();
        m.ranges[1].offset += 512;
        assert!(check(m).contains("is not on block boundaries"));
        let mut m = map();
        m.ranges[0].frames[1].file_offset = 101;
        assert!(check(m).contains("does not start where the previous frame ends"));
        let mut m = map();
        m.ranges[1].frames[0].file_length = 600;
        assert!(check(m).starts_with("the gap at image bytes 6291456..8388608 has no zero frames"));
        let mut m = map();
        m.ranges[1].frames[0].length = 17 * MIB;
        m.ranges[1].length = 17 * MIB;
        m.image_size = 32 * MIB;
        assert!(check(m).contains("more than 16 MiB"));
        assert_eq!(
            map().segments(999, SHA).unwrap_err(),
            MapError::FileSize {
                map: 1000,
                file: 999
            }
        );
        assert!(matches!(
            map().segments(1000, "cd").unwrap_err(),
            MapError::FileSha256 { .. }
        ));
        // A range dropped with its frames is still a valid map: the file tells it (below).
        let mut m = map();
        m.ranges.remove(1);
        let s = m.segments(1000, SHA).unwrap();
        assert_eq!(
            s.last().map(|s| (s.kind, s.file_offset)),
            Some((SegmentKind::Gap, 300))
        );
    }

    fn check_zero(bytes: &[u8], want: u64) -> Result<(), NotZero> {
        // Fed in odd pieces: the state must survive any split.
        let mut z = ZeroFrames::new(want, 4096, 10);
        for piece in bytes.chunks(7) {
            z.feed(piece)?;
        }
        z.finish()
    }

    #[test]
    fn zero_frames_are_recognised_without_decoding() {
        for len in [1, 512, MAX_BLOCK, MAX_BLOCK + 1, 3 * MIB + 17] {
            let f = zero_frame(len);
            assert_eq!(f.len() as u64, 14 + 4 * len.div_ceil(MAX_BLOCK));
            check_zero(&f, len).unwrap();
            // Two frames back to back make one gap.
            check_zero(&[zero_frame(len), zero_frame(5)].concat(), len + 5).unwrap();
        }
        let f = zero_frame(MIB);
        assert_eq!(
            check_zero(&f, MIB + 1).unwrap_err(),
            NotZero::Length {
                got: MIB,
                want: MIB + 1
            }
        );
        assert!(matches!(
            check_zero(&f, MIB - 1).unwrap_err(),
            NotZero::Length { .. }
        ));
        assert_eq!(
            check_zero(&f[..f.len() - 1], MIB).unwrap_err(),
            NotZero::Truncated {
                at: 10 + f.len() as u64 - 1
            }
        );
        // An RLE block of another byte is data.
        let mut bad = f.clone();
        bad[14 + 4 * 3 + 3] = 7;
        assert_eq!(
            check_zero(&bad, MIB).unwrap_err(),
            NotZero::NonZero {
                at: 10 + 14 + 4 * 3 + 3,
                image: 4096 + 3 * MAX_BLOCK
            }
        );
        // A compressed block where zeros should be: a range missing from the map.
        let mut bad = f.clone();
        bad[14 + 4 * 2] = (bad[14 + 4 * 2] & !0b110) | ((COMPRESSED_BLOCK as u8) << 1);
        let e = check_zero(&bad, MIB).unwrap_err();
        assert_eq!(e.data_at(), Some(4096 + 2 * MAX_BLOCK));
        assert_eq!(
            e.to_string(),
            format!(
                "data at image byte {}: a compressed block at file byte {}",
                4096 + 2 * MAX_BLOCK,
                10 + 14 + 8
            )
        );
        // The header's size must be what the blocks make.
        let mut bad = f.clone();
        bad[6] ^= 1;
        assert!(matches!(
            check_zero(&bad, MIB).unwrap_err(),
            NotZero::ContentSize { .. }
        ));
        let mut bad = f;
        bad[0] ^= 1;
        assert_eq!(
            check_zero(&bad, MIB).unwrap_err(),
            NotZero::Magic { at: 10 }
        );
    }
}
