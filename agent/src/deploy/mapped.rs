//! Streaming a raw image that has a block map (`stork_proto::blockmap`: the format, and why a
//! map that passes these checks cannot write a wrong disk): the gaps are never decoded (a
//! version 1 map's are zeroed, a later one's left as the disk has them: see
//! `blockmap::VERSION`), and the data frames are decoded on every core and written in order.
//!
//! Four stages overlap, as in [`super::stream`]:
//!
//! - **download** ([`Prefetched`]'s thread): receives, hashes (sha256 of the file as served,
//!   checked at the end as for any image) and resumes with `Range` after a cut;
//! - **split** (the calling thread): walks the map's segments in file order; a gap's bytes are
//!   checked to be zero frames as they pass ([`ZeroFrames`], a few bytes per 128 KiB) and
//!   become one "zero" item; a data frame's bytes go whole to the decoders;
//! - **decode** (one thread per CPU): each frame must be one zstd frame of exactly the map's
//!   compressed length, with the map's decoded length in its header and in its output;
//! - **write** (one thread): puts the items back in file order, writes frames at their image
//!   offsets and, for a version 1 map, zeroes gaps ([`Sink::zero`]: `BLKZEROOUT`).
//!
//! Memory is bounded: at most [`in_flight`] items between split and write (a frame is at most
//! `blockmap::MAX_FRAME` decoded), and decoded buffers go back to the decoders.
//!
//! Whatever fails (download, a map fault, a decode, a write) becomes the item at its place in
//! the sequence, so the writer has written everything before it and nothing after. The map's
//! faults read "block map: ...", saying where; a range missing from the map reads as data
//! in a gap and names the image byte where the missing range starts.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel, sync_channel};
use std::time::{Duration, Instant};

use stork_proto::ImageFile;
use stork_proto::blockmap::{BlockMap, MapError, NotZero, Segment, SegmentKind, ZeroFrames};

use super::download::{Download, StreamError};
use super::prefetch::Prefetched;
use super::stream::{Progress, Sink, Spent, Written, unwrap_stream_error};

/// A map larger than this is not one `stork-image` wrote (a 3 GiB image's is a few KiB).
const MAX_MAP: u64 = 16 << 20;
/// A gap's bytes are read and checked this much at a time.
const GAP_READ: usize = 64 << 10;

/// Why an image's block map does not fit its file: the deploy fails with "block map: ...".
#[derive(Debug, thiserror::Error)]
pub enum MapFault {
    #[error("the map file's sha256 is {actual}, registered as {expected}")]
    Checksum { expected: String, actual: String },
    #[error("the map file is {actual} bytes, registered as {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("the map file is larger than {MAX_MAP} bytes")]
    TooBig,
    #[error("the map file is not a block map: {0}")]
    Json(String),
    #[error(transparent)]
    Invalid(#[from] MapError),
    #[error(
        "the map has a gap at image bytes {}..{}, but the file holds {why}: a range is missing \
         from the map",
        gap.image_offset,
        gap.image_offset + gap.length
    )]
    Missing { gap: Segment, why: NotZero },
    #[error(
        "the gap at image bytes {}..{} (file bytes {}..{}) is not zero frames: {why}",
        gap.image_offset,
        gap.image_offset + gap.length,
        gap.file_offset,
        gap.file_offset + gap.file_length
    )]
    NotZero { gap: Segment, why: NotZero },
    #[error(
        "the frame at file bytes {}..{} (image bytes {}..{}): {why}",
        frame.file_offset,
        frame.file_offset + frame.file_length,
        frame.image_offset,
        frame.image_offset + frame.length
    )]
    Frame { frame: Segment, why: String },
    #[error("the file ends before byte {end}, where the map's segment ends")]
    Short { end: u64 },
    #[error("the file goes on after byte {end}, where the map ends")]
    Long { end: u64 },
}

impl From<MapFault> for StreamError {
    fn from(f: MapFault) -> Self {
        StreamError::BlockMap(f)
    }
}

/// Fetches the image's block map (`map`), checks it against its registered size and sha256,
/// and against the raw file's registered size (`raw`); returns it with the segments to
/// stream.
pub fn fetch(map: &ImageFile, raw: &ImageFile) -> Result<(BlockMap, Vec<Segment>), StreamError> {
    let mut dl = Download::new(&map.url)?;
    let mut bytes = Vec::new();
    (&mut dl)
        .take(MAX_MAP + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unwrap_stream_error(e, 0))?;
    if bytes.len() as u64 > MAX_MAP {
        return Err(MapFault::TooBig.into());
    }
    let actual = dl.sha256_hex();
    if !actual.eq_ignore_ascii_case(map.sha256.trim()) {
        return Err(MapFault::Checksum {
            expected: map.sha256.trim().to_string(),
            actual,
        }
        .into());
    }
    if map.size > 0 && map.size != bytes.len() as u64 {
        return Err(MapFault::Size {
            expected: map.size,
            actual: bytes.len() as u64,
        }
        .into());
    }
    let parsed: BlockMap =
        serde_json::from_slice(&bytes).map_err(|e| MapFault::Json(e.to_string()))?;
    // A raw file registered without its size (0) is checked against the map's and, at the
    // end of the stream, against the bytes received.
    let size = if raw.size > 0 {
        raw.size
    } else {
        parsed.file_size
    };
    // The map's file sha256 is checked against the bytes received, at the end, after the
    // registered sum: a file registered with a wrong sum fails as any image does ("sha256
    // mismatch", the disk wiped), whether it has a map or not.
    let segments = parsed
        .segments(size, &parsed.file_sha256)
        .map_err(MapFault::Invalid)?;
    Ok((parsed, segments))
}

/// Items in flight between the split and the write, for `threads` decoders: each decoder
/// busy with one and one waiting, and two for the writer.
pub fn in_flight(threads: usize) -> usize {
    2 * threads + 2
}

/// A data frame's compressed bytes, for a decoder.
struct Job {
    seq: usize,
    seg: Segment,
    bytes: Vec<u8>,
}

/// What the writer gets, in sequence order.
enum Item {
    Data { offset: u64, buf: Vec<u8> },
    Gap { offset: u64, len: u64 },
    End,
}

type Done = (usize, Result<Item, StreamError>);

/// Streams `download` (the raw file of `map`, laid out as `segments` from [`fetch`]) onto
/// `sink` and checks its sha256 (`expected_sha256`). `progress` is called every `every`.
pub fn write_mapped(
    download: Download,
    map: &BlockMap,
    segments: &[Segment],
    expected_sha256: &str,
    sink: &mut (dyn Sink + Send),
    every: Duration,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Written, StreamError> {
    if let Some(capacity) = sink.capacity()
        && map.image_size > capacity
    {
        return Err(StreamError::TooLarge {
            needed: map.image_size,
            capacity,
        });
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
    let mut input = Prefetched::start(download);
    let written = AtomicU64::new(0);
    let decode_ns = AtomicU64::new(0);
    let mut spent = Spent::default();
    let file_end = segments.last().map_or(0, |s| s.file_offset + s.file_length);

    // The decoders share one queue of frames and one of spare buffers.
    let (jobs_tx, jobs_rx) = channel::<Job>();
    let jobs_rx = Mutex::new(jobs_rx);
    let (bufs_tx, bufs_rx) = channel::<Vec<u8>>();
    let bufs_rx = Mutex::new(bufs_rx);
    let wrote = std::thread::scope(|scope| {
        let (done_tx, done_rx) = channel::<Done>();
        let n = in_flight(threads);
        let (token_tx, token_rx) = sync_channel::<()>(n);
        for _ in 0..n {
            // Cannot fail: the channel has room for all of them and its receiver is here.
            let _ = token_tx.send(());
        }
        for _ in 0..threads {
            let (jobs_rx, bufs_rx, done_tx) = (&jobs_rx, &bufs_rx, done_tx.clone());
            let decode_ns = &decode_ns;
            scope.spawn(move || decoder(jobs_rx, bufs_rx, &done_tx, decode_ns));
        }
        let written = &written;
        let sink = &mut *sink;
        let zero_gaps = map.zeroes_gaps();
        let writer = scope
            .spawn(move || write_in_order(sink, zero_gaps, done_rx, &token_tx, &bufs_tx, written));

        let mut last_report = Instant::now();
        let mut failed = false;
        for (seq, seg) in segments.iter().enumerate() {
            // No token: the writer stopped (it failed) and its error is the one to report.
            if token_rx.recv().is_err() {
                failed = true;
                break;
            }
            let result = match seg.kind {
                SegmentKind::Gap => check_gap(&mut input, seg).map(|()| Item::Gap {
                    offset: seg.image_offset,
                    len: seg.length,
                }),
                SegmentKind::Data { .. } => match read_segment(&mut input, seg) {
                    Ok(bytes) => {
                        let job = Job {
                            seq,
                            seg: *seg,
                            bytes,
                        };
                        if jobs_tx.send(job).is_err() {
                            failed = true;
                            break;
                        }
                        continue_report(&mut last_report, every, &input, written, progress);
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            let stop = result.is_err();
            // The writer gone: its error is the one to report.
            if done_tx.send((seq, result)).is_err() || stop {
                failed = true;
                break;
            }
            continue_report(&mut last_report, every, &input, written, progress);
        }
        if !failed {
            // The map's end must be the file's: a byte more is a file the map does not
            // describe (its size was checked against the registered one: belt and braces).
            let mut one = [0u8; 1];
            let end = match input.read(&mut one) {
                Ok(0) => Ok(Item::End),
                Ok(_) => Err(MapFault::Long { end: file_end }.into()),
                Err(e) => Err(unwrap_stream_error(e, map.image_size)),
            };
            let _ = done_tx.send((segments.len(), end));
        }
        drop(jobs_tx);
        drop(done_tx);
        writer.join().unwrap_or_else(|_| {
            Err(StreamError::Write {
                offset: written.load(Ordering::Relaxed),
                len: 0,
                source: io::Error::other("the disk writer thread panicked"),
            })
        })
    });
    spent.waiting = input.waited();
    spent.decoding = Duration::from_nanos(decode_ns.load(Ordering::Relaxed));
    let (gaps, writing) = match wrote {
        Ok(w) => w,
        Err(e) => return Err(blame_the_file(input, e, expected_sha256)),
    };
    spent.writing = writing;
    let download = input
        .finish()
        .map_err(|e| unwrap_stream_error(e, map.image_size))?;
    let actual = download.sha256_hex();
    if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        return Err(StreamError::Checksum {
            expected: expected_sha256.trim().to_string(),
            actual,
            bytes: download.received(),
        });
    }
    if !actual.eq_ignore_ascii_case(map.file_sha256.trim()) {
        return Err(MapFault::Invalid(MapError::FileSha256 {
            map: map.file_sha256.clone(),
            file: actual,
        })
        .into());
    }
    progress(&Progress {
        received: download.received(),
        total: download.total().or(Some(map.file_size)),
        written: map.image_size,
    });
    let t = Instant::now();
    sink.sync().map_err(|source| StreamError::Write {
        offset: 0,
        len: 0,
        source,
    })?;
    spent.syncing = t.elapsed();
    Ok(Written {
        received: download.received(),
        image_bytes: map.image_size,
        zeroed_bytes: gaps.zeroed,
        left_bytes: gaps.left,
        resumes: download.resumes,
        sha256: actual,
        spent,
    })
}

fn continue_report(
    last: &mut Instant,
    every: Duration,
    input: &Prefetched,
    written: &AtomicU64,
    progress: &mut dyn FnMut(&Progress),
) {
    if last.elapsed() >= every {
        *last = Instant::now();
        progress(&Progress {
            received: input.received(),
            total: input.total(),
            written: written.load(Ordering::Relaxed),
        });
    }
}

/// A map fault on a file that is not the registered one is really a checksum error: read the
/// rest and say so when the sums differ (as [`super::stream`] does for a decode error).
fn blame_the_file(input: Prefetched, e: StreamError, expected_sha256: &str) -> StreamError {
    if !matches!(e, StreamError::BlockMap(_) | StreamError::Decode { .. }) {
        return e;
    }
    super::stream::blame_the_input(input, e, expected_sha256)
}

/// Reads exactly `len` bytes; the file ending first is the map's fault (`end`).
fn read_exact(input: &mut Prefetched, buf: &mut [u8], end: u64) -> Result<(), StreamError> {
    input.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            MapFault::Short { end }.into()
        } else {
            unwrap_stream_error(e, 0)
        }
    })
}

fn read_segment(input: &mut Prefetched, seg: &Segment) -> Result<Vec<u8>, StreamError> {
    let end = seg.file_offset + seg.file_length;
    let len = usize::try_from(seg.file_length).map_err(|_| MapFault::Frame {
        frame: *seg,
        why: "too large for memory".into(),
    })?;
    let mut bytes = vec![0u8; len];
    read_exact(input, &mut bytes, end)?;
    Ok(bytes)
}

/// Reads a gap's bytes, checking that they are zero frames of the gap's length.
fn check_gap(input: &mut Prefetched, gap: &Segment) -> Result<(), StreamError> {
    let fault = |why: NotZero| match why.data_at() {
        Some(_) => MapFault::Missing { gap: *gap, why },
        None => MapFault::NotZero { gap: *gap, why },
    };
    let mut z = ZeroFrames::new(gap.length, gap.image_offset, gap.file_offset);
    let mut buf = vec![0u8; GAP_READ];
    let mut left = gap.file_length;
    while left > 0 {
        let n = usize::try_from(left).map_or(GAP_READ, |l| l.min(GAP_READ));
        read_exact(input, &mut buf[..n], gap.file_offset + gap.file_length)?;
        z.feed(&buf[..n]).map_err(fault)?;
        left -= n as u64;
    }
    z.finish().map_err(|why| fault(why).into())
}

/// A decoder thread: frames in, decoded buffers out, until the jobs end.
fn decoder(
    jobs: &Mutex<Receiver<Job>>,
    bufs: &Mutex<Receiver<Vec<u8>>>,
    done: &std::sync::mpsc::Sender<Done>,
    decode_ns: &AtomicU64,
) {
    // Without a decoder (out of memory) each frame fails with a decode error.
    let mut zstd = zstd::bulk::Decompressor::new().ok();
    loop {
        // A poisoned lock means another decoder panicked: stop too (the writer reports it).
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        let mut buf = bufs
            .lock()
            .ok()
            .and_then(|rx| rx.try_recv().ok())
            .unwrap_or_default();
        let t = Instant::now();
        let result = match zstd.as_mut() {
            Some(z) => decode(z, &job, &mut buf).map(|()| Item::Data {
                offset: job.seg.image_offset,
                buf,
            }),
            None => Err(StreamError::Decode {
                offset: job.seg.image_offset,
                source: io::Error::other("cannot create a zstd decoder"),
            }),
        };
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        decode_ns.fetch_add(ns, Ordering::Relaxed);
        if done.send((job.seq, result)).is_err() {
            return;
        }
    }
}

/// Decodes one data frame into `out`, checking it against the map: one zstd frame of exactly
/// the bytes the map gives it, decoding to exactly the map's length.
fn decode(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    job: &Job,
    out: &mut Vec<u8>,
) -> Result<(), StreamError> {
    let seg = &job.seg;
    let src = &job.bytes[..];
    let fault = |why: String| MapFault::Frame { frame: *seg, why };
    match zstd::zstd_safe::find_frame_compressed_size(src) {
        Ok(n) if n == src.len() => {}
        Ok(n) => {
            return Err(fault(format!(
                "it holds a zstd frame of {n} bytes, the map says {}",
                src.len()
            ))
            .into());
        }
        Err(code) => {
            return Err(fault(format!(
                "not a whole zstd frame ({})",
                zstd::zstd_safe::get_error_name(code)
            ))
            .into());
        }
    }
    match zstd::zstd_safe::get_frame_content_size(src) {
        Ok(Some(n)) if n == seg.length => {}
        Ok(Some(n)) => {
            return Err(fault(format!(
                "its header says {n} bytes decoded, the map says {}",
                seg.length
            ))
            .into());
        }
        _ => return Err(fault("its header has no content size".into()).into()),
    }
    let len = usize::try_from(seg.length).map_err(|_| fault("too large for memory".into()))?;
    out.clear();
    out.reserve(len);
    let n = zstd
        .decompress_to_buffer(src, out)
        .map_err(|source| StreamError::Decode {
            offset: seg.image_offset,
            source,
        })?;
    if n != len {
        return Err(fault(format!("it decoded to {n} bytes, the map says {len}")).into());
    }
    Ok(())
}

/// Gap bytes the writer zeroed, and those it left as they were.
#[derive(Debug, Default, Clone, Copy)]
struct Gaps {
    zeroed: u64,
    left: u64,
}

/// The writer: items back in sequence order, written, and gaps zeroed (`zero_gaps`) or
/// passed over; a token back for each. Returns what it did with the gaps and the time spent.
fn write_in_order(
    sink: &mut (dyn Sink + Send),
    zero_gaps: bool,
    done: Receiver<Done>,
    tokens: &std::sync::mpsc::SyncSender<()>,
    bufs: &std::sync::mpsc::Sender<Vec<u8>>,
    written: &AtomicU64,
) -> Result<(Gaps, Duration), StreamError> {
    let mut pending: BTreeMap<usize, Result<Item, StreamError>> = BTreeMap::new();
    let (mut next, mut gaps, mut busy) = (0usize, Gaps::default(), Duration::ZERO);
    loop {
        while let Some(item) = pending.remove(&next) {
            let t = Instant::now();
            match item? {
                Item::Data { offset, buf } => {
                    sink.write_at(offset, &buf)
                        .map_err(|source| StreamError::Write {
                            offset,
                            len: buf.len() as u64,
                            source,
                        })?;
                    written.store(offset + buf.len() as u64, Ordering::Relaxed);
                    // The decoders may be gone (the split ended): the buffer is just dropped.
                    let _ = bufs.send(buf);
                }
                Item::Gap { offset, len } => {
                    if zero_gaps {
                        zero(sink, offset, len)?;
                        gaps.zeroed += len;
                    } else {
                        gaps.left += len;
                    }
                    written.store(offset + len, Ordering::Relaxed);
                }
                Item::End => return Ok((gaps, busy + t.elapsed())),
            }
            busy += t.elapsed();
            next += 1;
            // The split may be done: no one needs the token then.
            let _ = tokens.send(());
        }
        match done.recv() {
            Ok((seq, item)) => {
                pending.insert(seq, item);
            }
            // Everyone is gone without an end: the split stopped on an error it sent, which
            // is not reached only if a decoder panicked.
            Err(_) => {
                return Err(StreamError::Decode {
                    offset: written.load(Ordering::Relaxed),
                    source: io::Error::other("a decoder thread stopped"),
                });
            }
        }
    }
}

/// Zeroes `len` bytes at `offset`: the sector-aligned middle in one call (`BLKZEROOUT` wants
/// 512-byte alignment), the unaligned edges (an image that ends inside a sector) written.
fn zero(sink: &mut (dyn Sink + Send), offset: u64, len: u64) -> Result<(), StreamError> {
    const SECTOR: u64 = 512;
    let end = offset + len;
    let (mid_start, mid_end) = (offset.next_multiple_of(SECTOR), end / SECTOR * SECTOR);
    let err = |offset, len| {
        move |source| StreamError::Write {
            offset,
            len,
            source,
        }
    };
    if mid_start >= mid_end {
        let zeros = vec![0u8; len as usize];
        return sink.write_at(offset, &zeros).map_err(err(offset, len));
    }
    if mid_start > offset {
        let zeros = vec![0u8; (mid_start - offset) as usize];
        sink.write_at(offset, &zeros)
            .map_err(err(offset, mid_start - offset))?;
    }
    sink.zero(mid_start, mid_end - mid_start)
        .map_err(err(mid_start, mid_end - mid_start))?;
    if end > mid_end {
        let zeros = vec![0u8; (end - mid_end) as usize];
        sink.write_at(mid_end, &zeros)
            .map_err(err(mid_end, end - mid_end))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::stream::tests::serve;
    use sha2::{Digest, Sha256};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use stork_proto::ImageRole;
    use stork_proto::blockmap::{self, Frame, Range};

    const MIB: usize = 1 << 20;

    /// A disk image file: what the agent writes to, as a block device would be.
    struct FileSink {
        file: File,
        zeroed: Vec<(u64, u64)>,
        /// How far anything was written or zeroed.
        end: u64,
    }

    impl FileSink {
        fn new(dir: &tempfile::TempDir) -> Self {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("disk"))
                .unwrap();
            // What was on the disk before: a gap not zeroed would show.
            file.write_all_at(&vec![0xA5; 24 * MIB], 0).unwrap();
            Self {
                file,
                zeroed: Vec::new(),
                end: 0,
            }
        }

        fn read(&self, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.file.read_exact_at(&mut v, 0).unwrap();
            v
        }
    }

    impl Sink for FileSink {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.end = self.end.max(offset + data.len() as u64);
            self.file.write_all_at(data, offset)
        }
        fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.end = self.end.max(offset + len);
            self.zeroed.push((offset, len));
            self.file.write_all_at(&vec![0; len as usize], offset)
        }
        fn capacity(&self) -> Option<u64> {
            None
        }
        fn sync(&mut self) -> io::Result<()> {
            self.file.sync_all()
        }
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// 20 MiB and a half sector: data at 0 (1 MiB), 3..8 MiB (two frames of 3 and 2 MiB),
    /// 12 MiB, and a tail ending inside a sector; zeros between.
    fn image() -> Vec<u8> {
        let mut v = vec![0u8; 20 * MIB + 256];
        v[..MIB].copy_from_slice(&noise(MIB, 1));
        v[3 * MIB..8 * MIB].copy_from_slice(&noise(5 * MIB, 2));
        v[12 * MIB..13 * MIB].copy_from_slice(&noise(MIB, 3));
        let n = v.len();
        v[n - 100..].copy_from_slice(&noise(100, 4));
        v
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// The file and map `stork-image` writes, made the same way (1 MiB blocks, zero frames
    /// for gaps, frames of at most 3 MiB here).
    fn pack(img: &[u8]) -> (Vec<u8>, BlockMap) {
        let mut file = Vec::new();
        let mut ranges: Vec<Range> = Vec::new();
        let mut image_at = 0usize;
        let blocks: Vec<(usize, &[u8])> = img
            .chunks(MIB)
            .enumerate()
            .map(|(i, b)| (i * MIB, b))
            .filter(|(_, b)| b.iter().any(|x| *x != 0))
            .collect();
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i].0;
            let mut end = start;
            while i < blocks.len() && blocks[i].0 == end {
                end += blocks[i].1.len();
                i += 1;
            }
            if start > image_at {
                file.extend(blockmap::zero_frame((start - image_at) as u64));
            }
            let frames = img[start..end]
                .chunks(3 * MIB)
                .map(|data| {
                    let z = zstd::bulk::compress(data, 3).unwrap();
                    let f = Frame {
                        file_offset: file.len() as u64,
                        file_length: z.len() as u64,
                        length: data.len() as u64,
                    };
                    file.extend(z);
                    f
                })
                .collect();
            ranges.push(Range {
                offset: start as u64,
                length: (end - start) as u64,
                frames,
            });
            image_at = end;
        }
        if img.len() > image_at {
            file.extend(blockmap::zero_frame((img.len() - image_at) as u64));
        }
        let map = BlockMap {
            format: blockmap::FORMAT.into(),
            version: blockmap::VERSION,
            image_size: img.len() as u64,
            block_size: MIB as u64,
            file_size: file.len() as u64,
            file_sha256: sha(&file),
            ranges,
        };
        (file, map)
    }

    fn files(file: &[u8], map: &BlockMap) -> (ImageFile, ImageFile) {
        let json = serde_json::to_vec(map).unwrap();
        let (raw_url, _) = serve(file.to_vec(), 0, 0, false);
        let (map_url, _) = serve(json.clone(), 0, 0, false);
        let raw = ImageFile {
            role: ImageRole::Raw,
            url: raw_url,
            sha256: sha(file),
            size: file.len() as u64,
        };
        let map = ImageFile {
            role: ImageRole::DiskMap,
            url: map_url,
            sha256: sha(&json),
            size: json.len() as u64,
        };
        (raw, map)
    }

    fn deploy(
        raw: &ImageFile,
        map: &ImageFile,
        sink: &mut FileSink,
    ) -> Result<Written, StreamError> {
        let (m, segments) = fetch(map, raw)?;
        let dl = Download::new(&raw.url)?.with_backoff(Duration::ZERO);
        write_mapped(
            dl,
            &m,
            &segments,
            &raw.sha256,
            sink,
            Duration::ZERO,
            &mut |_| {},
        )
    }

    #[test]
    fn the_layout_is_the_builders_and_any_zstd_decoder_reads_the_whole_image() {
        let img = image();
        let (file, map) = pack(&img);
        let ranges: Vec<_> = map.ranges.iter().map(|r| (r.offset, r.length)).collect();
        let m = MIB as u64;
        assert_eq!(ranges, [(0, m), (3 * m, 5 * m), (12 * m, m), (20 * m, 256)]);
        assert_eq!(zstd::decode_all(&file[..]).unwrap(), img);
    }

    #[test]
    fn a_version_1_map_writes_the_image_byte_for_byte_zeroing_the_gaps() {
        let img = image();
        let (file, mut map) = pack(&img);
        map.version = 1;
        let (raw, map_file) = files(&file, &map);
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(&dir);
        let w = deploy(&raw, &map_file, &mut sink).unwrap();
        assert!(
            sink.read(img.len()) == img,
            "the disk differs from the image"
        );
        assert_eq!(w.image_bytes, img.len() as u64);
        assert_eq!((w.received, w.resumes), (file.len() as u64, 0));
        assert_eq!(w.sha256, sha(&file));
        // Gaps are zeroed in one call each, never decoded or written.
        let m = MIB as u64;
        assert_eq!(sink.zeroed, [(m, 2 * m), (8 * m, 4 * m), (13 * m, 7 * m)]);
        assert_eq!((w.zeroed_bytes, w.left_bytes), (13 * m, 0));
    }

    #[test]
    fn a_current_map_writes_the_data_and_leaves_the_gaps_as_the_disk_had_them() {
        let img = image();
        let (file, map) = pack(&img);
        assert!(!map.zeroes_gaps());
        let (raw, map_file) = files(&file, &map);
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(&dir);
        let w = deploy(&raw, &map_file, &mut sink).unwrap();
        let disk = sink.read(img.len());
        let m = MIB as u64;
        let gaps = [(m, 2 * m), (8 * m, 4 * m), (13 * m, 7 * m)];
        for (offset, len) in gaps {
            let (from, to) = (offset as usize, (offset + len) as usize);
            assert!(
                disk[from..to].iter().all(|b| *b == 0xA5),
                "the gap at {offset} was touched"
            );
        }
        assert_ranges_written(&sink, &img, &map);
        assert!(sink.zeroed.is_empty(), "zeroed {:?}", sink.zeroed);
        assert_eq!((w.zeroed_bytes, w.left_bytes), (0, 13 * m));
        assert_eq!(w.sha256, sha(&file));
    }

    /// Each of `map`'s data ranges holds the image's bytes on the disk.
    fn assert_ranges_written(sink: &FileSink, img: &[u8], map: &BlockMap) {
        let disk = sink.read(img.len());
        for r in &map.ranges {
            let (from, to) = (r.offset as usize, (r.offset + r.length) as usize);
            assert!(
                disk[from..to] == img[from..to],
                "range at {} differs",
                r.offset
            );
        }
    }

    #[test]
    fn resumes_after_a_cut_connection() {
        let img = image();
        let (file, map) = pack(&img);
        let (mut raw, map_file) = files(&file, &map);
        let third = file.len() / 3;
        // Two cuts, each inside a data frame (a third of the file into its answer).
        let (url, server) = serve(file.clone(), 2, third, false);
        raw.url = url;
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(&dir);
        let w = deploy(&raw, &map_file, &mut sink).unwrap();
        assert_ranges_written(&sink, &img, &map);
        assert_eq!(w.resumes, 2);
        assert_eq!(server.join().unwrap(), [0, third as u64, 2 * third as u64]);
    }

    #[test]
    fn a_map_with_a_range_missing_fails_with_the_reason_and_writes_nothing_after_it() {
        let img = image();
        let (file, mut map) = pack(&img);
        // Registered with its own sum: only the file can tell the map is wrong. (The missing
        // range's noise is stored, not compressed: zstd says so with a raw block.)
        map.ranges.remove(2);
        let (raw, map_file) = files(&file, &map);
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(&dir);
        let err = deploy(&raw, &map_file, &mut sink).unwrap_err();
        assert!(
            matches!(err, StreamError::BlockMap(MapFault::Missing { .. })),
            "{err:?}"
        );
        let text = err.to_string();
        let m = MIB as u64;
        assert!(
            text.starts_with(&format!(
                "block map: the map has a gap at image bytes {}..{}, but the file holds data at \
                 image byte {}: a ",
                8 * m,
                20 * m,
                12 * m
            )),
            "{text}"
        );
        assert!(text.ends_with("a range is missing from the map"), "{text}");
        // Everything before the gap was written; nothing of the gap or after it.
        assert_eq!(sink.end, 8 * m);
    }

    #[test]
    fn a_map_or_a_file_that_is_not_the_registered_one_fails_with_the_reason() {
        let img = image();
        let (file, map) = pack(&img);
        let dir = tempfile::tempdir().unwrap();
        // The map is not the registered one: refused before anything is written.
        let mut sink = FileSink::new(&dir);
        let (raw, mut map_file) = files(&file, &map);
        map_file.sha256 = "0".repeat(64);
        let err = deploy(&raw, &map_file, &mut sink).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("block map: the map file's sha256 is "),
            "{err}"
        );
        assert_eq!(sink.end, 0);
        // A map that says it is another file's: told once the file's sum is known (the
        // caller wipes what was written, as after any sha256 mismatch).
        let mut other = map.clone();
        other.file_sha256 = "1".repeat(64);
        let (raw, other_file) = files(&file, &other);
        let err = deploy(&raw, &other_file, &mut sink).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("block map: the map describes the file with sha256 1111"),
            "{err}"
        );
        // A file registered with a wrong sum fails as without a map: streamed, then the sums.
        let (mut raw, map_file) = files(&file, &map);
        raw.sha256 = "0".repeat(64);
        let err = deploy(&raw, &map_file, &mut sink).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("sha256 mismatch: expected {}", "0".repeat(64))),
            "{err}"
        );
        // A frame whose decoded length is not the map's: the writes stop before it.
        let mut sink = FileSink::new(&dir);
        let mut lying = map.clone();
        lying.ranges[1].frames[0].length -= 4096;
        lying.ranges[1].frames[1].length += 4096;
        let (raw, lying_file) = files(&file, &lying);
        let err = deploy(&raw, &lying_file, &mut sink).unwrap_err();
        assert!(
            err.to_string()
                .contains("its header says 3145728 bytes decoded, the map says 3141632"),
            "{err}"
        );
        assert_eq!(sink.end, MIB as u64, "the first range only (its gap left)");
    }
}
