//! `PUT /api/v1/boot-resources/{name}/image`: an OS image a user brings (a raw disk image, a
//! qcow2 or a root tar) streamed into a staging directory beside the boot root (never served), hashed as it
//! arrives, checked against the sha256 the request names, converted (qcow2 to raw, with
//! `qemu-img`: the tool every peer uses, and no maintained crate reads qcow2's compressed and
//! sparse clusters) and only then moved under `boot/images/NAME/` and described as a boot
//! resource. A failure at any step removes the staging directory: nothing is left behind.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stork_proto::ImageRole;
use stork_proto::kernel::ImageKernel;
use tokio::io::AsyncWriteExt;

use crate::image_kernels;
use crate::store::{BootResource, ResourceFile};

/// The largest upload taken (before conversion): a raw server disk image, with room.
pub const MAX_UPLOAD: u64 = 64 << 30;
/// The largest raw image a qcow2 may expand to.
pub const MAX_RAW: u64 = 256 << 30;
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

pub use stork_proto::api::UploadFormat as Format;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(
        "name: {0:?} is not an image name (letters, digits, `.`, `-` and `_`, 64 at most, not starting with `.`)"
    )]
    Name(String),
    #[error("name: an image {0:?} is registered already")]
    Exists(String),
    #[error("sha256: {0:?} is not 64 hexadecimal digits")]
    Sha256Syntax(String),
    #[error("sha256: the upload's sha256 is {got}, the request says {want}; nothing was kept")]
    Mismatch { got: String, want: String },
    #[error("body: the upload is over {MAX_UPLOAD} bytes")]
    TooLarge,
    #[error("body: the upload is empty")]
    Empty,
    #[error("body: the upload broke off: {0}")]
    Broken(String),
    #[error("format: the upload is not a qcow2 image: {0}")]
    NotQcow2(String),
    #[error("format: the qcow2 image has a backing file ({0:?}); upload a standalone image")]
    Backing(String),
    #[error("format: the qcow2 image is {0} bytes as raw, over {MAX_RAW}")]
    RawTooLarge(u64),
    #[error("body: {need} bytes do not fit in the {free} bytes free under the boot root")]
    NoSpace { need: u64, free: u64 },
    #[error("converting the qcow2 image: {0}")]
    Convert(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl UploadError {
    /// Whether the request is at fault (400), not the appliance (500).
    pub fn is_request(&self) -> bool {
        !matches!(self, UploadError::Convert(_) | UploadError::Io { .. })
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UploadError + use<> {
    let path = path.to_path_buf();
    move |source| UploadError::Io { what, path, source }
}

/// Where uploads are staged: `DATA_DIR/uploads/`, beside `DATA_DIR/boot/`.
pub fn staging_root(boot_root: &Path) -> PathBuf {
    boot_root.parent().unwrap_or(boot_root).join("uploads")
}

/// An image name: a plain file name the boot root's `images/` takes.
pub fn check_name(name: &str) -> Result<(), UploadError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(UploadError::Name(name.to_string()))
    }
}

/// The sha256 the request names, lower case.
pub fn check_sha256(sum: &str) -> Result<String, UploadError> {
    if sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sum.to_ascii_lowercase())
    } else {
        Err(UploadError::Sha256Syntax(sum.to_string()))
    }
}

/// An upload in progress: its staging directory (removed on drop unless kept), the file the
/// bytes go to, and their running sum.
pub struct Upload {
    name: String,
    format: Format,
    boot_root: PathBuf,
    staging: PathBuf,
    file: tokio::fs::File,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    kept: bool,
}

impl Upload {
    /// Starts an upload of image `name` under `boot_root` (`DATA_DIR/boot`), of `length`
    /// bytes when the request says.
    pub async fn start(
        boot_root: &Path,
        name: &str,
        format: Format,
        length: Option<u64>,
    ) -> Result<Self, UploadError> {
        check_name(name)?;
        let images = boot_root.join("images");
        if images.join(name).exists() {
            return Err(UploadError::Exists(name.to_string()));
        }
        tokio::fs::create_dir_all(&images)
            .await
            .map_err(io("creating", &images))?;
        if let Some(need) = length {
            if need > MAX_UPLOAD {
                return Err(UploadError::TooLarge);
            }
            fits(&images, need)?;
        }
        // Beside the boot root, not in it: a partial upload is never served. One file system
        // with it (both in the data directory), so the move into place is a rename.
        let uploads = staging_root(boot_root);
        tokio::fs::create_dir_all(&uploads)
            .await
            .map_err(io("creating", &uploads))?;
        let staging = uploads.join(crate::lifecycle::records::new_id());
        tokio::fs::create_dir(&staging)
            .await
            .map_err(io("creating", &staging))?;
        let path = staging.join("upload");
        let file = match tokio::fs::File::create(&path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(io("creating", &path)(e));
            }
        };
        Ok(Self {
            name: name.to_string(),
            format,
            boot_root: boot_root.to_path_buf(),
            staging,
            file,
            path,
            hasher: Sha256::new(),
            size: 0,
            kept: false,
        })
    }

    /// Writes the next bytes of the upload.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        self.size += chunk.len() as u64;
        if self.size > MAX_UPLOAD {
            return Err(UploadError::TooLarge);
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .await
            .map_err(io("writing", &self.path))
    }

    /// Checks the sum, converts, moves the image into place and describes it.
    pub async fn finish(mut self, want_sha256: &str) -> Result<BootResource, UploadError> {
        if self.size == 0 {
            return Err(UploadError::Empty);
        }
        let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if got != want_sha256 {
            return Err(UploadError::Mismatch {
                got,
                want: want_sha256.to_string(),
            });
        }
        self.file
            .sync_all()
            .await
            .map_err(io("syncing", &self.path))?;
        let (file_name, role) = match self.format {
            Format::Raw => ("disk.raw", ImageRole::Raw),
            Format::Tar => ("root.tar", ImageRole::Tar),
            Format::Qcow2 => ("disk.raw.zst", ImageRole::Raw),
        };
        let image = |sha256, size| ResourceFile {
            role: role.clone(),
            path: format!("images/{}/{file_name}", self.name),
            sha256,
            size,
        };
        let (files, kernels) = match self.format {
            Format::Raw | Format::Tar => (
                vec![image(got, self.size)],
                kernels_of(&self.path, self.format).await,
            ),
            Format::Qcow2 => {
                let raw = self.staging.join("disk.raw");
                convert_qcow2(&self.path, &raw).await?;
                let kernels = kernels_of(&raw, self.format).await;
                tokio::fs::remove_file(&self.path)
                    .await
                    .map_err(io("removing", &self.path))?;
                let (sha256, size, map) = compress(&raw, &self.staging.join(file_name)).await?;
                let mut files = vec![image(sha256, size)];
                // Beside the image file: its block map, when one was made.
                if let Some((sha256, size)) = map {
                    files.push(ResourceFile {
                        role: ImageRole::DiskMap,
                        path: format!("images/{}/{MAP_FILE}", self.name),
                        sha256,
                        size,
                    });
                }
                (files, kernels)
            }
        };
        if self.format != Format::Qcow2 {
            let to = self.staging.join(file_name);
            tokio::fs::rename(&self.path, &to)
                .await
                .map_err(io("renaming", &self.path))?;
        }
        let dest = self.boot_root.join("images").join(&self.name);
        tokio::fs::rename(&self.staging, &dest)
            .await
            .map_err(|e| match e.kind() {
                // Another upload of the name finished first.
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty => {
                    UploadError::Exists(self.name.clone())
                }
                _ => io("moving into place", &dest)(e),
            })?;
        self.kept = true;
        Ok(BootResource {
            name: self.name.clone(),
            kind: "os".into(),
            arch: Some("amd64".into()),
            files,
            kernels,
        })
    }
}

/// The kernels the image at `path` carries (image_kernels.rs); none when they cannot be read,
/// which is no reason to refuse the image: it then boots what it boots.
async fn kernels_of(path: &Path, format: Format) -> Vec<ImageKernel> {
    let p = path.to_path_buf();
    let scan = tokio::task::spawn_blocking(move || match format {
        Format::Tar => image_kernels::in_tar(&p),
        Format::Raw | Format::Qcow2 => image_kernels::in_raw(&p),
    })
    .await;
    match scan {
        Ok(Ok(kernels)) => kernels,
        Ok(Err(e)) => {
            tracing::info!(image = %path.display(), "its kernels are not known: {e}");
            Vec::new()
        }
        // A panic in the file system reader (a hostile image) loses only the listing.
        Err(e) => {
            tracing::warn!(image = %path.display(), "reading its kernels failed: {e}");
            Vec::new()
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// `qemu-img info`, then `qemu-img convert` to raw: the format given (never probed), no
/// backing file (it would read a file of the appliance's into the image), a bounded size.
async fn convert_qcow2(from: &Path, to: &Path) -> Result<(), UploadError> {
    let mut head = [0u8; 4];
    let mut f = tokio::fs::File::open(from)
        .await
        .map_err(io("opening", from))?;
    tokio::io::AsyncReadExt::read_exact(&mut f, &mut head)
        .await
        .map_err(|e| UploadError::NotQcow2(e.to_string()))?;
    if head != QCOW2_MAGIC {
        return Err(UploadError::NotQcow2("no qcow2 magic at its start".into()));
    }
    let info = qemu_img(&[
        "info".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "--output=json".as_ref(),
        from.as_os_str(),
    ])
    .await
    .map_err(UploadError::NotQcow2)?;
    let info: serde_json::Value =
        serde_json::from_str(&info).map_err(|e| UploadError::NotQcow2(e.to_string()))?;
    if let Some(b) = info.get("backing-filename") {
        return Err(UploadError::Backing(b.as_str().unwrap_or("?").to_string()));
    }
    let virtual_size = info["virtual-size"].as_u64().unwrap_or(u64::MAX);
    if virtual_size > MAX_RAW {
        return Err(UploadError::RawTooLarge(virtual_size));
    }
    // The raw file is sparse, but a full disk image has no holes.
    fits(to.parent().unwrap_or(to), virtual_size)?;
    qemu_img(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        from.as_os_str(),
        to.as_os_str(),
    ])
    .await
    .map(drop)
    .map_err(UploadError::Convert)
}

/// Refuses `need` bytes more in `dir` when its file system has less free (the store keeps
/// its own reserve: the check leaves it).
fn fits(dir: &Path, need: u64) -> Result<(), UploadError> {
    const RESERVE: u64 = 256 << 20;
    match crate::store::Store::free_bytes(dir) {
        Some(free) if free < need.saturating_add(RESERVE) => {
            Err(UploadError::NoSpace { need, free })
        }
        _ => Ok(()),
    }
}

async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The block map's file name beside `disk.raw.zst`.
const MAP_FILE: &str = "disk.raw.map.json";

/// Compresses the converted raw image with zstd (the agent decodes it as it streams: a
/// mostly empty disk image is a small fraction of its size on the wire) and removes it;
/// returns the compressed file's sha256 and size, and its block map's when it has a GPT.
///
/// With a GPT it is compressed as `stork-image` compresses its own images: frames, and a
/// block map of its data ranges, so that a deploy writes only those (what `qemu-img`
/// left as holes and the blocks of zeros are never decoded or written) and keeps every
/// partition's edges, where an old signature could survive (`blockmap::signature_areas`).
/// Without one, what a gap would leave on the disk is not known: one zstd stream.
async fn compress(
    raw: &Path,
    zst: &Path,
) -> Result<(String, u64, Option<(String, u64)>), UploadError> {
    let (raw, zst) = (raw.to_path_buf(), zst.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let mut from = std::fs::File::open(&raw).map_err(io("opening", &raw))?;
        let len = from.metadata().map_err(io("reading", &raw))?.len();
        let result = match image_kernels::partitions(&mut from, len) {
            Some(parts) => {
                let keep = stork_proto::blockmap::signature_areas(len, &parts);
                let map = zst.with_file_name(MAP_FILE);
                let m = stork_image::blockmap::compress_mapped(&raw, &zst, &map, 3, &keep)
                    .map_err(|e| UploadError::Convert(e.to_string()))?;
                (m.file_sha256, m.file_size, Some((m.map_sha256, m.map_size)))
            }
            None => {
                let (sha256, size) = compress_stream(from, &zst)?;
                (sha256, size, None)
            }
        };
        std::fs::remove_file(&raw).map_err(io("removing", &raw))?;
        Ok(result)
    })
    .await
    .map_err(|e| UploadError::Convert(e.to_string()))?
}

/// `from` as one zstd stream into `zst`: its sha256 and size.
fn compress_stream(mut from: std::fs::File, zst: &Path) -> Result<(String, u64), UploadError> {
    let out = std::fs::File::create(zst).map_err(io("creating", zst))?;
    let hashed = HashingWriter {
        inner: std::io::BufWriter::new(out),
        hasher: Sha256::new(),
        size: 0,
    };
    let mut enc = zstd::Encoder::new(hashed, 3).map_err(io("compressing", zst))?;
    std::io::copy(&mut from, &mut enc).map_err(io("compressing", zst))?;
    let mut hashed = enc.finish().map_err(io("compressing", zst))?;
    std::io::Write::flush(&mut hashed.inner).map_err(io("writing", zst))?;
    hashed
        .inner
        .get_ref()
        .sync_all()
        .map_err(io("syncing", zst))?;
    Ok((hex::encode(hashed.hasher.finalize()), hashed.size))
}

/// Hashes and counts what passes through to `inner`.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or(buf));
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    async fn upload(
        root: &Path,
        format: Format,
        chunks: &[&[u8]],
        sha: &str,
    ) -> Result<BootResource, UploadError> {
        let mut u = Upload::start(root, "mine", format, None).await?;
        for c in chunks {
            u.write(c).await?;
        }
        u.finish(sha).await
    }

    /// What is in the boot root's `images/` and in the staging directory.
    fn left_in(root: &Path) -> Vec<String> {
        let staged = std::fs::read_dir(staging_root(root))
            .map(|d| d.count())
            .unwrap_or_default();
        assert_eq!(staged, 0, "an upload left its staging directory");
        std::fs::read_dir(root.join("images"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_raw_upload_with_its_sum_is_kept_and_described() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        let r = upload(
            &boot,
            Format::Raw,
            &[b"disk ", b"bytes"],
            &sum(b"disk bytes"),
        )
        .await
        .unwrap();
        assert_eq!(r.files[0].path, "images/mine/disk.raw");
        assert_eq!(r.files[0].role, ImageRole::Raw);
        assert_eq!(r.files[0].size, 10);
        assert_eq!(r.files[0].sha256, sum(b"disk bytes"));
        assert_eq!(
            std::fs::read(boot.join(&r.files[0].path)).unwrap(),
            b"disk bytes"
        );
        assert_eq!(left_in(&boot), ["mine"]);
        // A second upload of the name is refused before it takes any bytes.
        let e = upload(&boot, Format::Raw, &[b"x"], &sum(b"x"))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("name: an image \"mine\""), "{e}");
    }

    #[tokio::test]
    async fn a_wrong_sum_or_a_broken_upload_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        let e = upload(&boot, Format::Raw, &[b"disk"], &sum(b"other"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with("sha256: the upload's sha256 is"),
            "{e}"
        );
        assert!(e.is_request());
        assert!(left_in(&boot).is_empty(), "{:?}", left_in(&boot));
        // Dropped mid-way (the client went away).
        let mut u = Upload::start(&boot, "mine", Format::Raw, None)
            .await
            .unwrap();
        u.write(b"half").await.unwrap();
        drop(u);
        assert!(left_in(&boot).is_empty());
    }

    fn have_qemu_img() -> bool {
        let have = std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok();
        if !have {
            eprintln!("skipped: no qemu-img");
        }
        have
    }

    /// The qcow2 `qemu-img` makes of the raw image at `raw`.
    fn qcow2_of(raw: &Path) -> Vec<u8> {
        let qcow = raw.with_extension("qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(&qcow)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(&qcow).unwrap()
    }

    #[tokio::test]
    async fn a_qcow2_is_converted_to_raw_and_one_with_a_backing_file_is_refused() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        let src = d.path().join("src-files");
        std::fs::create_dir(&src).unwrap();
        let raw = src.join("a.raw");
        let mut bytes = vec![0u8; 1 << 20];
        bytes[..4].copy_from_slice(b"BOOT");
        bytes[(1 << 20) - 3..].copy_from_slice(b"END");
        std::fs::write(&raw, &bytes).unwrap();
        let q = qcow2_of(&raw);
        let r = upload(&boot, Format::Qcow2, &[&q], &sum(&q)).await.unwrap();
        assert_eq!(r.files[0].path, "images/mine/disk.raw.zst");
        let stored = std::fs::read(boot.join(&r.files[0].path)).unwrap();
        assert_eq!(r.files[0].sha256, sum(&stored));
        assert_eq!(r.files[0].size, stored.len() as u64);
        // (Not assert_eq: a mismatch would print a MiB of bytes.)
        assert!(zstd::decode_all(&stored[..]).unwrap() == bytes);
        // No GPT, no block map: one file.
        assert_eq!(
            std::fs::read_dir(boot.join("images/mine")).unwrap().count(),
            1
        );

        let over = src.join("over.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&raw)
            .arg(&over)
            .status()
            .unwrap();
        assert!(st.success());
        let o = std::fs::read(&over).unwrap();
        let root2 = d.path().join("second/boot");
        let e = upload(&root2, Format::Qcow2, &[&o], &sum(&o))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("has a backing file"), "{e}");
        assert!(left_in(&root2).is_empty());
        let e = upload(&root2, Format::Qcow2, &[b"not qcow"], &sum(b"not qcow"))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("format: the upload is not a qcow2"),
            "{e}"
        );
        assert!(left_in(&root2).is_empty());
    }

    /// A qcow2 of a GPT disk is stored as the builder stores its images: frames and a block
    /// map (what the agent writes), its kernels read from its ext4 root.
    #[tokio::test]
    async fn a_qcow2_with_a_gpt_gets_a_block_map_and_its_kernels_listed() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let raw = crate::image_kernels::tests::gpt_disk(
            &d.path().join("src"),
            crate::image_kernels::tests::LINKED,
        );
        let q = qcow2_of(&raw);
        let boot = d.path().join("boot");
        let r = upload(&boot, Format::Qcow2, &[&q], &sum(&q)).await.unwrap();
        let roles: Vec<_> = r.files.iter().map(|f| f.role.clone()).collect();
        assert_eq!(roles, [ImageRole::Raw, ImageRole::DiskMap]);
        let stored = std::fs::read(boot.join(&r.files[0].path)).unwrap();
        assert!(zstd::decode_all(&stored[..]).unwrap() == std::fs::read(&raw).unwrap());
        let map: stork_proto::blockmap::BlockMap =
            serde_json::from_slice(&std::fs::read(boot.join(&r.files[1].path)).unwrap()).unwrap();
        assert_eq!(map.file_sha256, r.files[0].sha256);
        map.segments(stored.len() as u64, &r.files[0].sha256)
            .unwrap();
        // Fewer bytes in ranges than the disk: the gaps are never written.
        let data: u64 = map.ranges.iter().map(|g| g.length).sum();
        assert!(data < map.image_size, "{data} of {}", map.image_size);
        let versions: Vec<_> = r.kernels.iter().map(|k| k.version.as_str()).collect();
        assert_eq!(versions, ["6.1.0-57-amd64", "6.12.95+deb12-amd64"]);
    }

    #[test]
    fn names_and_sums_are_checked() {
        for bad in ["", ".hidden", "a/b", "..", &"x".repeat(65), "sp ace"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("debian-13_custom.v2").unwrap();
        assert!(check_sha256("abc").is_err());
        assert_eq!(check_sha256(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
    }
}
