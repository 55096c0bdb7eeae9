//! Streaming an image from the appliance onto a disk: HTTP, then a decoder (zstd, xz or gzip,
//! told by the file's magic number; none for a raw image), then the disk, in one pass and in
//! constant memory.
//!
//! - **Checksum in line**: the sha256 is of the bytes as served (compressed), computed as they
//!   arrive, and checked once the last byte is in; a mismatch fails the deploy with both sums.
//! - **Resume**: [`Download`] counts the compressed bytes it has handed on. When the connection
//!   drops or stalls it GETs again with `Range: bytes=N-` and goes on feeding the same
//!   decoder and hasher, so neither notices the break: every decoder reads the compressed
//!   bytes through the one [`Download`], whatever the format.
//! - **Sparse**: the decompressed image is cut into [`CHUNK`]-sized pieces; an all-zero piece
//!   is not written but joins a run that the sink zeroes in one call ([`Sink::zero`]: on a
//!   block device `BLKZEROOUT`, which the kernel offloads as WRITE ZEROES or UNMAP when the
//!   device can and otherwise writes zero pages). Skipping without zeroing would be wrong: the
//!   disk may hold an earlier OS there, and a file system expects its unused metadata blocks
//!   (ext4's uninitialised inode tables, for one) to read as zeros.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel};
use std::time::{Duration, Instant};

use super::download::{CHUNK, Download, StreamError};
use super::http::{self, Url};
use super::prefetch::Prefetched;

/// Decoded chunks queued for the disk writer.
const WRITE_AHEAD: usize = 4;

/// Where the decompressed image goes.
pub trait Sink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `len` bytes from `offset` read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the sink can hold, if bounded.
    fn capacity(&self) -> Option<u64>;
    /// Durably stores what was written (fsync).
    fn sync(&mut self) -> io::Result<()>;
}

/// The decompressed size of an image, when the file tells it cheaply: a zstd frame header
/// (zstd writes the size when it knows the input's, as it does for a file), an xz index (at
/// the end of the file: two more ranged GETs), a raw file's length. `None` for gzip, whose
/// trailer keeps the size modulo 4 GiB only, and for anything unclear.
pub fn peek_size(url: &str) -> Option<u64> {
    let url = Url::parse(url).ok()?;
    let mut resp = http::get(&url, 0).ok()?;
    // The longest frame header: magic 4 + descriptor 1 + window 1 + dictionary id 4 + size 8.
    let mut head = [0u8; 18];
    let n = http::read_full(&mut resp.body, &mut head).ok()?;
    // Dropping the response closes the connection: the rest is not wanted.
    match sniff(&head[..n]) {
        Format::Zstd => zstd::zstd_safe::get_frame_content_size(&head[..n])
            .ok()
            .flatten(),
        Format::Xz => xz_size(&url, resp.total?),
        Format::Gzip => None,
        Format::Raw => Some(resp.length),
    }
}

/// xz's stream header and footer are 12 bytes each.
const XZ_HEADER: u64 = 12;
/// An index this large describes some 50,000 blocks: not an image written for us.
const MAX_XZ_INDEX: u64 = 1 << 20;

/// The decompressed size of a single-stream xz file of `len` bytes, from its footer and
/// index (the xz file format, sections 2.1.2 and 4).
fn xz_size(url: &Url, len: u64) -> Option<u64> {
    let tail = |from: u64, n: u64| -> Option<Vec<u8>> {
        let mut resp = http::get(url, from).ok()?;
        // A server that ignored the range would send the file from its start.
        if resp.offset != from {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(n).ok()?];
        let got = http::read_full(&mut resp.body, &mut buf).ok()?;
        (got == buf.len()).then_some(buf)
    };
    let footer = tail(len.checked_sub(XZ_HEADER)?, XZ_HEADER)?;
    let index_len = xz_index_len(&footer)?;
    if index_len > MAX_XZ_INDEX {
        return None;
    }
    let index = tail(len.checked_sub(XZ_HEADER + index_len)?, index_len)?;
    xz_uncompressed_size(&index, len)
}

/// The index's length from a stream footer: CRC32, backward size, flags, magic `YZ`.
fn xz_index_len(footer: &[u8]) -> Option<u64> {
    let footer: &[u8; 12] = footer.try_into().ok()?;
    if &footer[10..] != b"YZ" || !crc32_matches(&footer[4..10], &footer[..4]) {
        return None;
    }
    let stored = u32::from_le_bytes([footer[4], footer[5], footer[6], footer[7]]);
    Some((u64::from(stored) + 1) * 4)
}

/// The sum of an index's uncompressed sizes, provided the stream it describes is the whole
/// file (`file_len`): a file of several streams (or with stream padding) gets `None` rather
/// than the size of its last stream.
fn xz_uncompressed_size(index: &[u8], file_len: u64) -> Option<u64> {
    let (body, crc) = index.split_at(index.len().checked_sub(4)?);
    if !crc32_matches(body, crc) || body.first() != Some(&0) {
        return None;
    }
    let mut pos = 1;
    let mut varint = || -> Option<u64> {
        // Up to 9 bytes of 7 bits, least significant first (section 1.2).
        let mut v = 0u64;
        for i in 0..9 {
            let b = *body.get(pos)?;
            pos += 1;
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    let records = varint()?;
    let (mut blocks, mut size) = (0u64, 0u64);
    for _ in 0..records {
        let unpadded = varint()?;
        // Blocks are padded to a multiple of four bytes.
        blocks = blocks.checked_add(unpadded.checked_add(3)? & !3)?;
        size = size.checked_add(varint()?)?;
    }
    // What is left is the index padding: zeros up to a multiple of four.
    let rest = body.get(pos..)?;
    if rest.len() > 3 || rest.iter().any(|b| *b != 0) || body.len() % 4 != 0 {
        return None;
    }
    let stream = XZ_HEADER + blocks + index.len() as u64 + XZ_HEADER;
    (stream == file_len).then_some(size)
}

/// Whether `crc` (4 bytes, little-endian) is the CRC32 of `data`, as xz stores them.
fn crc32_matches(data: &[u8], crc: &[u8]) -> bool {
    let mut c = flate2::Crc::new();
    c.update(data);
    crc == c.sum().to_le_bytes()
}

/// What [`write_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Compressed bytes received (the file's size).
    pub received: u64,
    /// Decompressed bytes: the image's size on disk.
    pub image_bytes: u64,
    /// Of which zeroed instead of written.
    pub zeroed_bytes: u64,
    /// Of which left as the disk had them: a block map's gaps (see `blockmap::VERSION`).
    pub left_bytes: u64,
    pub resumes: u32,
    pub sha256: String,
    /// Where the time went: what limits a deploy's image phase is told, not guessed.
    pub spent: Spent,
}

/// Time spent in each part of [`write_image`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// Waiting for the download thread (network, sha256).
    pub waiting: Duration,
    /// Decompressing (time in the decoder, less the waiting).
    pub decoding: Duration,
    /// Zero tests, writes and zeroing.
    pub writing: Duration,
    /// The final fsync.
    pub syncing: Duration,
}

/// Progress, for the caller's events: compressed bytes received of the expected total.
pub struct Progress {
    pub received: u64,
    pub total: Option<u64>,
    pub written: u64,
}

/// A file's compression, by its magic number: the raw image's and the root tar's alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Zstd,
    Xz,
    Gzip,
    /// Not compressed (or not anything we know: its consumer says so).
    Raw,
}

/// zstd, xz and gzip magic numbers (RFC 8878, the xz file format, RFC 1952); anything else
/// is a raw image. A raw disk image starts with boot code or zeros, never with these.
pub fn sniff(head: &[u8]) -> Format {
    if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Format::Zstd
    } else if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        Format::Xz
    } else if head.starts_with(&[0x1F, 0x8B, 0x08]) {
        // ID1 ID2 and CM 8 (deflate, the only method defined).
        Format::Gzip
    } else {
        Format::Raw
    }
}

/// Streams `download` (zstd, xz, gzip or raw) onto `sink` and checks its sha256
/// (`expected_sha256`, hex) and, when not 0, its size. `progress` is called every `every`.
pub fn write_image(
    download: Download,
    expected_sha256: &str,
    expected_size: u64,
    sink: &mut (dyn Sink + Send),
    every: Duration,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Written, StreamError> {
    let mut input = BufReader::with_capacity(CHUNK, Prefetched::start(download));
    let head = input.fill_buf().map_err(|e| unwrap_stream_error(e, 0))?;
    let format = sniff(head);

    // Every decoder reads through `input` (a BufRead over the download), so what it has not
    // consumed when it ends is still there to hash, and a resume is invisible to it. The
    // multi-stream decoders accept what pxz, pigz and bgzip write: streams back to back.
    let mut decoder: Box<dyn DecodeRead> = match format {
        Format::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|source| StreamError::Decode { offset: 0, source })?,
        ),
        Format::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(input)),
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Format::Raw => Box::new(input),
    };
    let mut spent = Spent::default();
    let written = AtomicU64::new(0);
    // Decompressing and writing take turns on one core otherwise: under QEMU TCG each was
    // about half of the image step. The writer gets whole chunks over a short queue and
    // hands the buffers back.
    let (decoded, wrote) = std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Vec<u8>>(WRITE_AHEAD);
        let (back_tx, back_rx) = channel::<Vec<u8>>();
        let written = &written;
        let sink = &mut *sink;
        let writer = scope.spawn(move || -> Result<(u64, u64, Duration), StreamError> {
            let mut writer = ChunkWriter::new(sink);
            let mut busy = Duration::ZERO;
            for buf in rx {
                let t = Instant::now();
                writer.put(&buf)?;
                busy += t.elapsed();
                written.store(writer.offset, Ordering::Relaxed);
                // The decoder may be gone already (it failed): the buffer is just dropped.
                let _ = back_tx.send(buf);
            }
            writer.finish()?;
            Ok((writer.offset, writer.zeroed, busy))
        });
        let mut last_report = Instant::now();
        let decoded = loop {
            let mut buf = back_rx.try_recv().unwrap_or_default();
            buf.resize(CHUNK, 0);
            let t = Instant::now();
            let read = http::read_full(&mut decoder, &mut buf);
            spent.decoding += t.elapsed();
            let n = match read {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if n == 0 {
                break Ok(());
            }
            buf.truncate(n);
            // A closed queue means the writer failed: its error is the one to report.
            if tx.send(buf).is_err() {
                break Ok(());
            }
            if last_report.elapsed() >= every {
                last_report = Instant::now();
                let d = decoder.input();
                progress(&Progress {
                    received: d.received(),
                    total: d.total().or((expected_size > 0).then_some(expected_size)),
                    written: written.load(Ordering::Relaxed),
                });
            }
            if n < CHUNK {
                break Ok(());
            }
        };
        drop(tx);
        let wrote = writer.join().unwrap_or_else(|_| {
            Err(StreamError::Write {
                offset: written.load(Ordering::Relaxed),
                len: 0,
                source: io::Error::other("the disk writer thread panicked"),
            })
        });
        (decoded, wrote)
    });
    let offset = written.load(Ordering::Relaxed);
    if let Err(e) = decoded {
        let e = unwrap_stream_error(e, offset);
        return Err(blame_the_file(decoder, e, expected_sha256));
    }
    let (image_bytes, zeroed_bytes, writing) = wrote?;
    spent.writing = writing;
    // The decoder may stop at the end of the last frame: whatever follows is hashed too.
    let input = decoder.into_input().into_inner();
    spent.waiting = input.waited();
    spent.decoding = spent.decoding.saturating_sub(spent.waiting);
    let download = input
        .finish()
        .map_err(|e| unwrap_stream_error(e, image_bytes))?;
    let actual = download.sha256_hex();
    if !actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        return Err(StreamError::Checksum {
            expected: expected_sha256.trim().to_string(),
            actual,
            bytes: download.received(),
        });
    }
    if expected_size > 0 && download.received() != expected_size {
        return Err(StreamError::Size {
            expected: expected_size,
            actual: download.received(),
        });
    }
    // Everything is in and checked; the fsync can still take long (a slow disk's write-back
    // of the last gigabytes), and the last progress may be `every` old: say where it stands.
    progress(&Progress {
        received: download.received(),
        total: download
            .total()
            .or((expected_size > 0).then_some(expected_size)),
        written: image_bytes,
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
        image_bytes,
        zeroed_bytes,
        left_bytes: 0,
        resumes: download.resumes,
        sha256: actual,
        spent,
    })
}

/// The decoder, or the plain input for a raw image; both give back the download.
trait DecodeRead: Read {
    fn input(&self) -> &Prefetched;
    fn into_input(self: Box<Self>) -> BufReader<Prefetched>;
}

impl DecodeRead for BufReader<Prefetched> {
    fn input(&self) -> &Prefetched {
        self.get_ref()
    }
    fn into_input(self: Box<Self>) -> BufReader<Prefetched> {
        *self
    }
}

impl DecodeRead for zstd::stream::read::Decoder<'static, BufReader<Prefetched>> {
    fn input(&self) -> &Prefetched {
        self.get_ref().get_ref()
    }
    fn into_input(self: Box<Self>) -> BufReader<Prefetched> {
        self.finish()
    }
}

impl DecodeRead for liblzma::bufread::XzDecoder<BufReader<Prefetched>> {
    fn input(&self) -> &Prefetched {
        self.get_ref().get_ref()
    }
    fn into_input(self: Box<Self>) -> BufReader<Prefetched> {
        self.into_inner()
    }
}

impl DecodeRead for flate2::bufread::MultiGzDecoder<BufReader<Prefetched>> {
    fn input(&self) -> &Prefetched {
        self.get_ref().get_ref()
    }
    fn into_input(self: Box<Self>) -> BufReader<Prefetched> {
        self.into_inner()
    }
}

/// A download error travels through the decoder as an `io::Error`; take it back out.
pub(super) fn unwrap_stream_error(e: io::Error, offset: u64) -> StreamError {
    if e.get_ref().is_some_and(|inner| inner.is::<StreamError>()) {
        if let Some(inner) = e.into_inner()
            && let Ok(se) = inner.downcast::<StreamError>()
        {
            return *se;
        }
        // Unreachable: checked just above.
        return StreamError::Decode {
            offset,
            source: io::ErrorKind::Other.into(),
        };
    }
    StreamError::Decode { offset, source: e }
}

/// Writes data chunks, and merges all-zero chunks into runs zeroed in one call.
struct ChunkWriter<'a> {
    sink: &'a mut (dyn Sink + Send),
    offset: u64,
    zero_run: Option<(u64, u64)>,
    zeroed: u64,
}

impl<'a> ChunkWriter<'a> {
    fn new(sink: &'a mut (dyn Sink + Send)) -> Self {
        Self {
            sink,
            offset: 0,
            zero_run: None,
            zeroed: 0,
        }
    }

    fn put(&mut self, data: &[u8]) -> Result<(), StreamError> {
        let len = data.len() as u64;
        if let Some(cap) = self.sink.capacity()
            && self.offset + len > cap
        {
            return Err(StreamError::TooLarge {
                needed: self.offset + len,
                capacity: cap,
            });
        }
        // Only whole chunks are zeroed: BLKZEROOUT wants sector-aligned lengths, and a short
        // tail is cheaper to write than to special-case.
        if data.len() == CHUNK && is_zero(data) {
            match &mut self.zero_run {
                Some((_, run_len)) => *run_len += len,
                None => self.zero_run = Some((self.offset, len)),
            }
        } else {
            self.flush_zeros()?;
            self.sink
                .write_at(self.offset, data)
                .map_err(|source| StreamError::Write {
                    offset: self.offset,
                    len,
                    source,
                })?;
        }
        self.offset += len;
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<(), StreamError> {
        if let Some((offset, len)) = self.zero_run.take() {
            self.sink
                .zero(offset, len)
                .map_err(|source| StreamError::Write {
                    offset,
                    len,
                    source,
                })?;
            self.zeroed += len;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.flush_zeros()
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding a block vectorises; stopping at the first non-zero block keeps data chunks
    // cheap. This runs over every byte of the image.
    data.chunks(4096)
        .all(|b| b.iter().fold(0u8, |acc, x| acc | x) == 0)
}

/// A decode error on a file that is not the registered one is really a checksum error:
/// read the rest (the LAN is fast) and say so when the sums differ.
fn blame_the_file(
    decoder: Box<dyn DecodeRead>,
    e: StreamError,
    expected_sha256: &str,
) -> StreamError {
    if !matches!(e, StreamError::Decode { .. }) {
        return e;
    }
    blame_the_input(decoder.into_input().into_inner(), e, expected_sha256)
}

/// `e`, or a checksum error when the rest of `input`, read to its end, does not have the
/// registered sum: a fault in the bytes of a file that is not the registered one is the
/// file's, not the decoder's nor the block map's.
pub(super) fn blame_the_input(
    input: Prefetched,
    e: StreamError,
    expected_sha256: &str,
) -> StreamError {
    let Ok(download) = input.finish() else {
        return e;
    };
    let actual = download.sha256_hex();
    if actual.eq_ignore_ascii_case(expected_sha256.trim()) {
        e
    } else {
        StreamError::Checksum {
            expected: expected_sha256.trim().to_string(),
            actual,
            bytes: download.received(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write as _;
    use std::net::TcpListener;
    use std::thread::{self, JoinHandle};

    /// A sink in memory that records which ranges were zeroed rather than written.
    #[derive(Default)]
    struct MemSink {
        data: Vec<u8>,
        zeroed: Vec<(u64, u64)>,
        cap: Option<u64>,
    }

    impl Sink for MemSink {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            let end = offset as usize + data.len();
            if self.data.len() < end {
                self.data.resize(end, 0xAA);
            }
            self.data[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
            let end = (offset + len) as usize;
            if self.data.len() < end {
                self.data.resize(end, 0xAA);
            }
            self.data[offset as usize..end].fill(0);
            self.zeroed.push((offset, len));
            Ok(())
        }
        fn capacity(&self) -> Option<u64> {
            self.cap
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An image with data, a long zero run and an odd-sized tail.
    fn image() -> Vec<u8> {
        // xorshift: data zstd cannot shrink to nothing, so cuts land inside the body.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut v = Vec::new();
        for _ in 0..(CHUNK + 4096) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        v.resize(v.len() + 3 * CHUNK + (CHUNK - 4096), 0);
        v.extend((0..12345).map(|i| (i % 7) as u8 + 1));
        v
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// The compressed formats, each as its usual tool writes it.
    #[derive(Debug, Clone, Copy)]
    enum Packed {
        Zstd,
        Xz,
        Gzip,
    }

    const PACKED: [Packed; 3] = [Packed::Zstd, Packed::Xz, Packed::Gzip];

    fn pack(how: Packed, data: &[u8]) -> Vec<u8> {
        match how {
            Packed::Zstd => zstd::encode_all(data, 1).unwrap(),
            Packed::Xz => liblzma::encode_all(data, 1).unwrap(),
            Packed::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    /// Serves `file` once per connection; the first `cuts` connections are closed after
    /// `cut_at` body bytes. Honours `Range: bytes=N-` with 206 unless `ignore_range`.
    /// Returns the Range starts it saw. Also the root-tar tests' server.
    pub(crate) fn serve(
        file: Vec<u8>,
        cuts: usize,
        cut_at: usize,
        ignore_range: bool,
    ) -> (String, JoinHandle<Vec<u64>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/boot/image.raw.zst",
            listener.local_addr().unwrap()
        );
        let handle = thread::spawn(move || {
            let mut starts = Vec::new();
            for (i, conn) in listener.incoming().enumerate() {
                let mut conn = conn.unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut from = 0u64;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Range: bytes=") {
                        from = v.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                starts.push(from);
                let from = if ignore_range { 0 } else { from as usize };
                let body = &file[from..];
                let head = if from > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                        body.len(),
                        file.len() - 1,
                        file.len()
                    )
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                };
                conn.write_all(head.as_bytes()).unwrap();
                let send = if i < cuts {
                    cut_at.min(body.len())
                } else {
                    body.len()
                };
                // The client may hang up first; that is its business.
                let _ = conn.write_all(&body[..send]);
                drop(conn);
                if i >= cuts {
                    break;
                }
            }
            starts
        });
        (url, handle)
    }

    fn run(url: &str, sha256: &str, size: u64, sink: &mut MemSink) -> Result<Written, StreamError> {
        let dl = Download::new(url).unwrap().with_backoff(Duration::ZERO);
        write_image(dl, sha256, size, sink, Duration::ZERO, &mut |_| {})
    }

    #[test]
    fn writes_each_format_and_zeroes_the_zero_chunks() {
        let img = image();
        for how in PACKED {
            let z = pack(how, &img);
            let (url, server) = serve(z.clone(), 0, 0, false);
            let mut sink = MemSink::default();
            let w = run(&url, &sha(&z), z.len() as u64, &mut sink).unwrap();
            assert!(sink.data == img, "{how:?}");
            assert_eq!(w.image_bytes, img.len() as u64, "{how:?}");
            assert_eq!(w.received, z.len() as u64, "{how:?}");
            assert_eq!(w.resumes, 0, "{how:?}");
            // Chunks 2, 3 and 4 are all zero: one run, one call.
            assert_eq!(
                sink.zeroed,
                [(2 * CHUNK as u64, 3 * CHUNK as u64)],
                "{how:?}"
            );
            assert_eq!(w.zeroed_bytes, 3 * CHUNK as u64, "{how:?}");
            assert_eq!(server.join().unwrap(), [0], "{how:?}");
        }
    }

    #[test]
    fn the_last_progress_is_the_whole_image_before_the_sync() {
        let img = image();
        let z = pack(Packed::Xz, &img);
        let (url, _server) = serve(z.clone(), 0, 0, false);
        let dl = Download::new(&url).unwrap();
        let mut seen = Vec::new();
        let hour = Duration::from_secs(3600);
        let mut sink = MemSink::default();
        write_image(dl, &sha(&z), 0, &mut sink, hour, &mut |p| {
            seen.push((p.received, p.total, p.written));
        })
        .unwrap();
        let n = z.len() as u64;
        assert_eq!(seen, [(n, Some(n), img.len() as u64)]);
    }

    #[test]
    fn streams_written_back_to_back_are_one_image() {
        // pxz, pigz and bgzip write several streams (members) into one file.
        let img = image();
        let (a, b) = img.split_at(CHUNK + 100);
        for how in [Packed::Xz, Packed::Gzip] {
            let z = [pack(how, a), pack(how, b)].concat();
            let (url, _server) = serve(z.clone(), 0, 0, false);
            let mut sink = MemSink::default();
            run(&url, &sha(&z), z.len() as u64, &mut sink).unwrap();
            assert!(sink.data == img, "{how:?}");
        }
    }

    #[test]
    fn resumes_with_range_after_a_cut_and_the_sum_still_matches() {
        let img = image();
        for how in PACKED {
            let z = pack(how, &img);
            let third = z.len() / 3;
            // Two cuts in a row, each a third of the file into its answer: the decoder is in
            // the middle of a block (xz), a deflate stream (gzip) or a frame (zstd) each time.
            let (url, server) = serve(z.clone(), 2, third, false);
            let mut sink = MemSink::default();
            let w = run(&url, &sha(&z), z.len() as u64, &mut sink).unwrap();
            assert!(sink.data == img, "{how:?}");
            assert_eq!(w.resumes, 2, "{how:?}");
            let starts = server.join().unwrap();
            assert_eq!(starts, [0, third as u64, 2 * third as u64], "{how:?}");
        }
    }

    #[test]
    fn a_server_that_ignores_range_is_skipped_forward() {
        let img = image();
        for how in PACKED {
            let z = pack(how, &img);
            let (url, server) = serve(z.clone(), 1, z.len() / 2, true);
            let mut sink = MemSink::default();
            run(&url, &sha(&z), z.len() as u64, &mut sink).unwrap();
            assert!(sink.data == img, "{how:?}");
            assert_eq!(server.join().unwrap(), [0, z.len() as u64 / 2], "{how:?}");
        }
    }

    #[test]
    fn a_wrong_sha256_is_reported_with_both_sums() {
        let img = image();
        let z = zstd::encode_all(&img[..], 1).unwrap();
        let (url, _server) = serve(z.clone(), 0, 0, false);
        let wrong = "0".repeat(64);
        let err = run(&url, &wrong, 0, &mut MemSink::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "sha256 mismatch: expected {wrong}, got {}",
                sha(&z)
            )),
            "{text}"
        );
    }

    #[test]
    fn raw_images_pass_through() {
        let img = image();
        let (url, _server) = serve(img.clone(), 0, 0, false);
        let mut sink = MemSink::default();
        run(&url, &sha(&img), 0, &mut sink).unwrap();
        assert_eq!(sink.data, img);
    }

    #[test]
    fn a_corrupt_file_is_a_decode_error_or_the_wrong_file() {
        let img = image();
        // xz and gzip check their data (CRC64, CRC32); zstd only with a content checksum,
        // which `zstd::encode_all` leaves out, so there the registered sha256 is the guard.
        for how in [Packed::Xz, Packed::Gzip] {
            let good = pack(how, &img);
            let mut bad = good.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x55;
            // Registered as it is: the file itself is broken.
            let (url, _server) = serve(bad.clone(), 0, 0, false);
            let err = run(&url, &sha(&bad), 0, &mut MemSink::default()).unwrap_err();
            assert!(
                matches!(err, StreamError::Decode { .. }),
                "{how:?}: {err:?}"
            );
            // Registered with another sum: it is not the registered file, and that is said.
            let (url, _server) = serve(bad.clone(), 0, 0, false);
            let err = run(&url, &sha(&good), 0, &mut MemSink::default()).unwrap_err();
            assert!(
                matches!(err, StreamError::Checksum { .. }),
                "{how:?}: {err:?}"
            );
        }
    }

    #[test]
    fn an_image_larger_than_the_disk_is_refused() {
        let img = image();
        let z = zstd::encode_all(&img[..], 1).unwrap();
        let (url, _server) = serve(z.clone(), 0, 0, false);
        let mut sink = MemSink {
            cap: Some(CHUNK as u64),
            ..MemSink::default()
        };
        let err = run(&url, &sha(&z), 0, &mut sink).unwrap_err();
        assert!(matches!(err, StreamError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn gives_up_when_the_server_keeps_cutting() {
        let img = image();
        let z = zstd::encode_all(&img[..], 1).unwrap();
        let (url, _server) = serve(z.clone(), 100, 0, false);
        let err = run(&url, &sha(&z), 0, &mut MemSink::default()).unwrap_err();
        assert!(matches!(err, StreamError::Download { .. }), "{err:?}");
    }

    #[test]
    fn a_missing_file_is_not_retried() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/boot/nope", listener.local_addr().unwrap());
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let err = run(&url, "00", 0, &mut MemSink::default()).unwrap_err();
        assert!(err.to_string().contains("download failed"), "{err}");
        let chain = format!("{:?}", anyhow::Error::from(err));
        assert!(chain.contains("404"), "{chain}");
        server.join().unwrap();
    }

    #[test]
    fn peeks_the_decompressed_size() {
        let img = image();
        // One-shot compression knows the size and writes it into the frame header, as the
        // zstd tool does for a file; a streaming encoder does not.
        let sized = zstd::bulk::compress(&img, 1).unwrap();
        let (url, _server) = serve(sized, 0, 0, false);
        assert_eq!(peek_size(&url), Some(img.len() as u64));
        let unsized_ = zstd::encode_all(&img[..], 1).unwrap();
        let (url, _server) = serve(unsized_, 0, 0, false);
        assert_eq!(peek_size(&url), None);
    }

    /// Serves `file` to `n` connections (ranged ones too), as the xz peek needs three.
    fn serve_n(file: Vec<u8>, n: usize) -> String {
        let (url, _server) = serve(file, n - 1, usize::MAX, false);
        url
    }

    #[test]
    fn peeks_the_size_of_an_xz_image_from_its_index() {
        let img = image();
        let xz = liblzma::encode_all(&img[..], 1).unwrap();
        assert_eq!(peek_size(&serve_n(xz.clone(), 3)), Some(img.len() as u64));
        // Several blocks (a full flush ends one): the index has a record each.
        let mut blocks = Vec::new();
        {
            let mut w = liblzma::write::XzEncoder::new(&mut blocks, 1);
            for piece in img.chunks(CHUNK) {
                w.write_all(piece).unwrap();
                w.flush().unwrap();
            }
            w.finish().unwrap();
        }
        assert_eq!(peek_size(&serve_n(blocks, 3)), Some(img.len() as u64));
        // Two streams: the last one's index is not the whole image.
        let two = [xz.clone(), xz].concat();
        assert_eq!(peek_size(&serve_n(two, 3)), None);
        // gzip keeps the size modulo 4 GiB only: not trusted.
        assert_eq!(peek_size(&serve_n(pack(Packed::Gzip, &img), 1)), None);
    }

    #[test]
    fn a_damaged_xz_index_gives_no_size() {
        let img = image();
        let xz = liblzma::encode_all(&img[..], 1).unwrap();
        let footer = &xz[xz.len() - 12..];
        let index_len = xz_index_len(footer).unwrap() as usize;
        let index = &xz[xz.len() - 12 - index_len..xz.len() - 12];
        let len = xz.len() as u64;
        assert_eq!(xz_uncompressed_size(index, len), Some(img.len() as u64));
        let mut bad = index.to_vec();
        bad[2] ^= 1;
        assert_eq!(xz_uncompressed_size(&bad, len), None);
        assert_eq!(xz_uncompressed_size(&index[..3], len), None);
        let mut bad_footer = footer.to_vec();
        bad_footer[5] ^= 1;
        assert_eq!(xz_index_len(&bad_footer), None);
    }

    #[test]
    fn zero_test() {
        assert!(is_zero(&[0; 4096]));
        let mut v = vec![0; 4096];
        v[4095] = 1;
        assert!(!is_zero(&v));
    }
}
