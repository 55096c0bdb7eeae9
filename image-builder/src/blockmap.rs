//! The raw image compressed with its block map (`stork_proto::blockmap` has the format and
//! why it is shaped so): `<name>.raw.zst` as independent zstd frames, one zero frame per gap
//! and data ranges cut into frames of [`FRAME`] bytes, and `<name>.raw.map.json` saying where
//! each range and frame is.
//!
//! The data ranges come from the sparse file (`SEEK_DATA`/`SEEK_HOLE`: what `mkfs`, `debugfs`
//! and the copies into the image left as holes is never read), then each [`BLOCK`] of the
//! data the file system did write is read and dropped when it is all zeros (`mkfs.ext4`
//! writes zeroed inode tables, for one). A range is a run of data blocks.
//!
//! [`copy_with_range_dropped`] makes the wrong map the end-to-end test deploys.

use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use stork_proto::blockmap::{self, BlockMap, Frame, MapError, Range};

use crate::manifest::{self, ArtifactKind, HashingWriter, ImageManifest};

/// The unit of the zero test: ranges start and end on it (1 MiB: partitions are aligned to
/// it, and it is the agent's write unit).
pub const BLOCK: u64 = 1 << 20;
/// Decoded bytes per data frame: enough for zstd's ratio (its window at level 3 is 1 MiB to
/// 4 MiB), small enough that a frame per core in flight costs little memory, and many frames
/// for the cores to share (a 1 GiB root is some 250).
pub const FRAME: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the block map made for {path} is not valid")]
    Invalid {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("{path} is not a block map")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image {name:?} has no {what} in {dir}")]
    Missing {
        name: String,
        what: &'static str,
        dir: PathBuf,
    },
    #[error("the map has {ranges} ranges: there is no range {index} to drop")]
    NoRange { index: usize, ranges: usize },
    #[error("manifest")]
    Manifest(#[from] manifest::ImageManifestError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MapWriteError + '_ {
    move |source| MapWriteError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The map file's name for a raw image file: `x.raw.zst` -> `x.raw.map.json`.
pub fn map_name(raw_file: &str) -> String {
    format!(
        "{}.map.json",
        raw_file.strip_suffix(".zst").unwrap_or(raw_file)
    )
}

/// What [`compress_mapped`] wrote: the compressed file's and the map's size and sha256.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub file_size: u64,
    pub file_sha256: String,
    pub map_size: u64,
    pub map_sha256: String,
    pub map: BlockMap,
}

/// The byte ranges of `file` (`len` bytes) that are not holes, widened to whole [`BLOCK`]s
/// and merged. What has no `SEEK_DATA` (a block device: `EINVAL`) is one range: the whole.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let Ok(from) = libc::off_t::try_from(from) else {
            return Ok(None);
        };
        // SAFETY: lseek on a file descriptor `file` keeps open for the call; no memory passed.
        let at = unsafe { libc::lseek(fd, from, whence) };
        if at < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `from`.
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(u64::try_from(at).ok())
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            Err(e) if at == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![(0, len)]);
            }
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let start = start / BLOCK * BLOCK;
        let end = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(len);
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
        at = end;
    }
    Ok(out)
}

/// Reads `file`'s data (its [`data_extents`], `len` bytes long) in order, at most 1 MiB at a
/// time, and hands each piece to `visit` with its offset; the holes, which read as zeros,
/// are not read (on our build machines reading a hole costs more the further in it is:
/// docs/measurements.md, Host file I/O).
pub fn visit_data<E: From<io::Error>>(
    file: &File,
    len: u64,
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut buf = vec![0u8; BLOCK as usize];
    for (start, end) in data_extents(file, len)? {
        let mut at = start;
        while at < end {
            let n = (end - at).min(BLOCK) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            visit(at, &buf[..n])?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Compresses the raw image `raw` to `out` as frames (level `level`) and writes its block map
/// to `map_out`, each through a temporary file renamed into place. The `keep` areas
/// (offset, length) are data in the map even where they are zero: the places a deploy,
/// which leaves gaps as the disk has them, must overwrite (`Layout::signature_areas`).
pub fn compress_mapped(
    raw: &Path,
    out: &Path,
    map_out: &Path,
    level: i32,
    keep: &[(u64, u64)],
) -> Result<Mapped, MapWriteError> {
    let tmp = manifest::tmp_path(out);
    let map_tmp = manifest::tmp_path(map_out);
    let result = (|| {
        let src = File::open(raw).map_err(io_err(raw))?;
        let image_size = src.metadata().map_err(io_err(raw))?.len();
        let keep = blocks_of(keep, image_size);
        let extents = merged(data_extents(&src, image_size).map_err(io_err(raw))?, &keep);
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = Framer {
            out: HashingWriter::new(BufWriter::with_capacity(1 << 20, file)),
            at: 0,
            image_at: 0,
            ranges: Vec::new(),
            current: None,
            buf: Vec::with_capacity(FRAME as usize),
            zstd: zstd::bulk::Compressor::new(level).map_err(io_err(&tmp))?,
        };
        // Each frame carries a checksum of its content, as the whole-image file did: `zstd -d`
        // and any decoder check the frames they decode.
        w.zstd
            .set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))
            .map_err(io_err(&tmp))?;
        let mut block = vec![0u8; BLOCK as usize];
        for (start, end) in extents {
            let mut off = start;
            while off < end {
                let n = (end - off).min(BLOCK) as usize;
                src.read_exact_at(&mut block[..n], off)
                    .map_err(io_err(raw))?;
                let data = &block[..n];
                let kept = keep.iter().any(|&(s, e)| s < off + n as u64 && off < e);
                if is_zero(data) && !kept {
                    w.end_range().map_err(io_err(&tmp))?;
                } else {
                    w.put(off, data).map_err(io_err(&tmp))?;
                }
                off += n as u64;
            }
        }
        w.end_range().map_err(io_err(&tmp))?;
        w.gap(image_size).map_err(io_err(&tmp))?;
        let ranges = std::mem::take(&mut w.ranges);
        let (buffered, file_size, file_sha256) = w.out.finish();
        let file = buffered.into_inner().map_err(|e| MapWriteError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&tmp))?;
        let map = BlockMap {
            format: blockmap::FORMAT.into(),
            version: blockmap::VERSION,
            image_size,
            block_size: BLOCK,
            file_size,
            file_sha256,
            ranges,
        };
        // What the agent will check, checked here first: a map we write is one it takes.
        map.segments(file_size, &map.file_sha256)
            .map_err(|source| MapWriteError::Invalid {
                path: map_out.to_owned(),
                source,
            })?;
        let (map_size, map_sha256) = write_map(&map_tmp, &map)?;
        fs::rename(&tmp, out).map_err(io_err(out))?;
        fs::rename(&map_tmp, map_out).map_err(io_err(map_out))?;
        Ok(Mapped {
            file_size: map.file_size,
            file_sha256: map.file_sha256.clone(),
            map_size,
            map_sha256,
            map,
        })
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than stray temporary files.
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&map_tmp);
    }
    result
}

/// `areas` (offset, length) as `(start, end)` widened to whole [`BLOCK`]s inside `len`.
fn blocks_of(areas: &[(u64, u64)], len: u64) -> Vec<(u64, u64)> {
    areas
        .iter()
        .map(|&(offset, n)| {
            let end = offset
                .saturating_add(n)
                .div_ceil(BLOCK)
                .saturating_mul(BLOCK);
            (offset / BLOCK * BLOCK, end.min(len))
        })
        .filter(|(s, e)| s < e)
        .collect()
}

/// `extents` and `more` (both `(start, end)`) as one sorted list without overlaps.
fn merged(mut extents: Vec<(u64, u64)>, more: &[(u64, u64)]) -> Vec<(u64, u64)> {
    extents.extend_from_slice(more);
    extents.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
    for (s, e) in extents {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Writes `map` as pretty JSON with a final newline; returns its size and sha256.
fn write_map(path: &Path, map: &BlockMap) -> Result<(u64, String), MapWriteError> {
    // Serialising plain data does not fail.
    let text = serde_json::to_string_pretty(map).unwrap_or_default() + "\n";
    let mut w = HashingWriter::new(File::create(path).map_err(io_err(path))?);
    w.write_all(text.as_bytes()).map_err(io_err(path))?;
    let (file, size, sha) = w.finish();
    file.sync_all().map_err(io_err(path))?;
    Ok((size, sha))
}

/// Lays the frames out as the image's blocks come in.
struct Framer<W: Write> {
    out: HashingWriter<W>,
    /// Bytes of the compressed file written.
    at: u64,
    /// Where the last range ended in the image.
    image_at: u64,
    ranges: Vec<Range>,
    current: Option<Range>,
    /// The current frame's decoded bytes.
    buf: Vec<u8>,
    zstd: zstd::bulk::Compressor<'static>,
}

impl<W: Write> Framer<W> {
    /// A data block at `offset`: continues the current range or starts one after a gap.
    fn put(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|r| r.offset + r.length != offset)
        {
            self.end_range()?;
        }
        if self.current.is_none() {
            self.gap(offset)?;
            self.current = Some(Range {
                offset,
                length: 0,
                frames: Vec::new(),
            });
        }
        if let Some(r) = self.current.as_mut() {
            r.length += data.len() as u64;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() as u64 >= FRAME {
            self.frame()?;
        }
        Ok(())
    }

    /// The zero frame from the last range's end to `to`.
    fn gap(&mut self, to: u64) -> io::Result<()> {
        if to > self.image_at {
            let z = blockmap::zero_frame(to - self.image_at);
            self.out.write_all(&z)?;
            self.at += z.len() as u64;
            self.image_at = to;
        }
        Ok(())
    }

    fn frame(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let z = self.zstd.compress(&self.buf)?;
        self.out.write_all(&z)?;
        if let Some(r) = self.current.as_mut() {
            r.frames.push(Frame {
                file_offset: self.at,
                file_length: z.len() as u64,
                length: self.buf.len() as u64,
            });
        }
        self.at += z.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn end_range(&mut self) -> io::Result<()> {
        self.frame()?;
        if let Some(r) = self.current.take() {
            self.image_at = r.offset + r.length;
            self.ranges.push(r);
        }
        Ok(())
    }
}

/// The decoded size of a zstd file of one or more frames, summed from the frame headers
/// (walking the block headers to find each frame's end, never decoding): `None` when a frame
/// has no content size or the file is not plain zstd frames.
pub fn zstd_content_size(path: &Path) -> io::Result<Option<u64>> {
    match frames_content_size(path) {
        // A frame cut short: not a file to trust a size from (its decoder says why).
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        other => other,
    }
}

fn frames_content_size(path: &Path) -> io::Result<Option<u64>> {
    use std::io::{BufRead, BufReader, Read};
    let mut r = BufReader::new(File::open(path)?);
    let len = r.get_ref().metadata()?.len();
    let mut total = 0u64;
    // Blocks are skipped by seeking: a single-frame image of gigabytes is not read through.
    let skip = |r: &mut BufReader<File>, n: u64| -> io::Result<bool> {
        r.seek_relative(i64::try_from(n).unwrap_or(i64::MAX))?;
        Ok(r.stream_position()? <= len)
    };
    loop {
        if r.fill_buf()?.is_empty() {
            return Ok(Some(total));
        }
        let mut head = [0u8; 5];
        if r.read_exact(&mut head).is_err() || head[..4] != blockmap::ZSTD_MAGIC.to_le_bytes() {
            return Ok(None);
        }
        let d = head[4];
        let single = d & 0x20 != 0;
        let dict = [0, 1, 2, 4][usize::from(d & 3)];
        let fcs = match (d >> 6, single) {
            (0, false) => return Ok(None),
            (0, true) => 1,
            (1, _) => 2,
            (2, _) => 4,
            _ => 8,
        };
        let mut rest = [0u8; 13];
        let n = usize::from(!single) + dict + fcs;
        r.read_exact(&mut rest[..n])?;
        let mut le = [0u8; 8];
        le[..fcs].copy_from_slice(&rest[n - fcs..n]);
        let size = u64::from_le_bytes(le) + if fcs == 2 { 256 } else { 0 };
        total = total.saturating_add(size);
        loop {
            let mut b = [0u8; 3];
            r.read_exact(&mut b)?;
            let h = u32::from_le_bytes([b[0], b[1], b[2], 0]);
            let body = match (h >> 1) & 3 {
                1 => 1,
                3 => return Ok(None),
                _ => u64::from(h >> 3),
            };
            if !skip(&mut r, body)? {
                return Ok(None);
            }
            if h & 1 == 1 {
                break;
            }
        }
        if d & 0x04 != 0 && !skip(&mut r, 4)? {
            return Ok(None);
        }
    }
}

fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|b| b.iter().fold(0u8, |acc, x| acc | x) == 0)
}

/// For the test of a wrong map: copies image `name` of the image directory `images` to `out`
/// (files hard-linked, or copied across file systems) with range `index` dropped from its block
/// map, and a `manifest.json` with only that image, the map's size and sha256 updated, so
/// the wrong map is registered as the right one. Returns the map written.
pub fn copy_with_range_dropped(
    images: &Path,
    name: &str,
    index: usize,
    out: &Path,
) -> Result<BlockMap, MapWriteError> {
    let manifest = ImageManifest::load(images)?;
    let missing = |what| MapWriteError::Missing {
        name: name.to_string(),
        what,
        dir: images.to_owned(),
    };
    let mut entry = manifest
        .get(name)
        .cloned()
        .ok_or_else(|| missing("entry"))?;
    let map_artifact = entry
        .artifacts
        .iter()
        .position(|a| a.kind == ArtifactKind::RawDiskMap)
        .ok_or_else(|| missing("block map"))?;
    fs::create_dir_all(out).map_err(io_err(out))?;
    for a in &entry.artifacts {
        let (from, to) = (images.join(&a.name), out.join(&a.name));
        // A copy made before: replaced, so the map below is the only one.
        let _ = fs::remove_file(&to);
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(io_err(&from))?;
        }
    }
    let map_path = out.join(&entry.artifacts[map_artifact].name);
    let text = fs::read(&map_path).map_err(io_err(&map_path))?;
    let mut map: BlockMap =
        serde_json::from_slice(&text).map_err(|source| MapWriteError::Json {
            path: map_path.clone(),
            source,
        })?;
    if index >= map.ranges.len() {
        return Err(MapWriteError::NoRange {
            index,
            ranges: map.ranges.len(),
        });
    }
    map.ranges.remove(index);
    // The link shares the original's inode: write a new file, never through the link.
    fs::remove_file(&map_path).map_err(io_err(&map_path))?;
    let (size, sha256) = write_map(&map_path, &map)?;
    let a = &mut entry.artifacts[map_artifact];
    a.size = size;
    a.sha256 = sha256;
    let mut copy = ImageManifest::default();
    copy.put(entry);
    let path = out.join(ImageManifest::FILE);
    fs::write(&path, copy.to_json()).map_err(io_err(&path))?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names() {
        assert_eq!(map_name("deb.raw.zst"), "deb.raw.map.json");
        assert_eq!(map_name("deb.raw"), "deb.raw.map.json");
    }
}
