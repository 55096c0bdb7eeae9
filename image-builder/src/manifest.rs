//! `manifest.json`: what a build produced and from what, so the appliance can check the files
//! it serves and a rebuild can be compared with the original.
//!
//! Two shapes: the boot set's ([`Manifest`], written by `initrd`: one kernel, one initrd, one
//! set of inputs) and the image directory's ([`ImageManifest`], written by `ephemeral` and
//! `os`: one entry per image, each with its artifacts and inputs; building one image replaces
//! its entry and keeps the others).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
pub use stork_proto::kernel::ImageKernel;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub artifacts: Vec<Artifact>,
    pub inputs: Inputs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// File name inside the output directory.
    pub name: String,
    pub kind: ArtifactKind,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Kernel,
    Initrd,
    /// The agent's ephemeral root (SquashFS), mounted from RAM.
    EphemeralSquashfs,
    /// An OS root as SquashFS: deploy in memory, or install by copying.
    RootSquashfs,
    /// An OS root as a zstd-compressed POSIX tar (with xattrs): install by extracting.
    RootTarZst,
    /// A zstd-compressed raw GPT disk image: install by streaming to the disk.
    RawDiskZst,
    /// The raw disk image's block map (`crate::blockmap`): its data ranges and zstd frames.
    RawDiskMap,
    /// `dpkg-query` list of the installed packages (name, version, architecture).
    PackageList,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub kernel_version: String,
    pub agent_sha256: String,
    /// Module names in the order the agent loads them.
    pub modules: Vec<String>,
    /// Requested modules that are built into this kernel.
    pub builtin_modules: Vec<String>,
    /// Modules the agent loads when a task needs them, by name (each with its dependencies
    /// in the initrd).
    #[serde(default)]
    pub on_demand_modules: Vec<String>,
    pub source_date_epoch: u32,
    pub compression: String,
}

impl Manifest {
    /// Pretty JSON with a final newline; field order is fixed, so equal manifests are equal
    /// bytes.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self).map(|s| s + "\n")
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the byte count and the hex SHA-256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.len, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Size and hex SHA-256 of a file. Its holes are hashed as the zeros they read as, without
/// reading them: reading a hole of a large sparse file (a VM's disk, the appliance image)
/// costs time that grows with its offset on the ext4 of our build machines, some 40 s for
/// a 4 GiB file that is nothing but a hole (docs/measurements.md, Host file I/O).
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    // The end, not the metadata's length: a block device's is 0.
    let len = f.seek(io::SeekFrom::End(0))?;
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut hashed = 0u64;
    let zeros_to = |hasher: &mut Sha256, hashed: &mut u64, to: u64| {
        while *hashed < to {
            let n = (to - *hashed).min(zeros.len() as u64) as usize;
            hasher.update(&zeros[..n]);
            *hashed += n as u64;
        }
    };
    crate::blockmap::visit_data(&f, len, |at, bytes| -> io::Result<()> {
        zeros_to(&mut hasher, &mut hashed, at);
        hasher.update(bytes);
        hashed += bytes.len() as u64;
        Ok(())
    })?;
    zeros_to(&mut hasher, &mut hashed, len);
    Ok((len, hex::encode(hasher.finalize())))
}

/// Where a file is written before it is renamed into place: beside it, hidden.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// `manifest.json` of an image directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// Sorted by name.
    pub images: Vec<ImageEntry>,
}

/// One built image: what it is, its files, and everything it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    pub name: String,
    /// `ephemeral` or `os`.
    pub kind: ImageKind,
    /// Debian architecture.
    pub arch: String,
    pub artifacts: Vec<ImageArtifact>,
    pub inputs: ImageInputs,
    /// For OS images: what a deployment needs to know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    Ephemeral,
    Os,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageArtifact {
    /// File name inside the output directory.
    pub name: String,
    pub kind: ArtifactKind,
    pub size: u64,
    pub sha256: String,
    /// How the file is compressed (e.g. `zstd-15 block 1M`).
    pub compression: String,
    /// Size once decompressed, for compressed disk images: the smallest disk it fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
}

/// Everything the bytes depend on. Equal inputs mean equal outputs (`ephemeral`: bit for bit,
/// checked by the tests), and an output directory whose entry has equal inputs is up to date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInputs {
    /// `stork-image <version>` and the format version of the tree and image steps.
    pub builder: String,
    /// SHA-256 of the recipe's canonical JSON (for `ephemeral`, of the built-in recipe).
    pub recipe_sha256: String,
    pub suite: String,
    pub variant: String,
    /// Requested packages, as in the recipe.
    pub packages: Vec<String>,
    /// SHA-256 of the apt source URIs and suites (never the host names).
    pub mirror_sha256: String,
    /// SHA-256 of the installed package list (the `.packages` artifact's text).
    pub installed_sha256: String,
    pub installed_count: usize,
    /// Timestamp of every file (later times are clamped): the newest `Date:` of the apt
    /// Release files the packages came from, unless SOURCE_DATE_EPOCH was set.
    pub source_date_epoch: u64,
    /// Per-output settings that change bytes (compression levels, disk size).
    pub settings: BTreeMap<String, String>,
}

/// How to deploy an OS image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployInfo {
    /// `uname -r` of the default kernel (the one `/vmlinuz` points at).
    pub kernel_version: String,
    /// Every kernel the image carries, the default first: what a deploy may choose.
    #[serde(default)]
    pub kernels: Vec<ImageKernel>,
    /// Inside the root tar and the raw image: the default kernel and initrd (the root
    /// SquashFS, which a deploy into memory runs under the agent's kernel, has no /boot).
    pub kernel: String,
    pub initrd: String,
    /// Kernel command line the image's grub.cfg uses (after `root=UUID=... ro`).
    pub kernel_cmdline: String,
    /// ext4 UUID of the root file system; grub.cfg (and the raw image's fstab) find it by this.
    pub root_fs_uuid: String,
    /// FAT volume id of the ESP in the raw image, as `blkid` prints it (`XXXX-XXXX`).
    pub esp_fs_id: String,
    /// The raw image's partitions; the last one is the root and grows at deploy.
    pub partitions: Vec<PartitionInfo>,
    /// 1-based number of the root partition.
    pub root_partition: u32,
    /// cloud-init's default user.
    pub default_user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionInfo {
    pub number: u32,
    pub name: String,
    /// GPT partition type GUID.
    pub type_guid: String,
    /// GPT unique partition GUID.
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageManifestError {
    #[error(
        "{path} is not an image manifest (an initrd's, perhaps): choose another output directory"
    )]
    Foreign {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageManifest {
    pub const FILE: &str = "manifest.json";

    /// The manifest in `dir`, or an empty one if there is none.
    pub fn load(dir: &Path) -> Result<Self, ImageManifestError> {
        let path = dir.join(Self::FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| ImageManifestError::Foreign { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ImageManifestError::Io { path, source }),
        }
    }

    pub fn get(&self, name: &str) -> Option<&ImageEntry> {
        self.images.iter().find(|e| e.name == name)
    }

    /// Adds or replaces the entry of the same name.
    pub fn put(&mut self, entry: ImageEntry) {
        self.images.retain(|e| e.name != entry.name);
        self.images.push(entry);
        self.images.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data structures to a string does not fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Reads `dir`'s manifest, replaces `entry`, writes it back atomically. Callers hold the
    /// output directory's lock, so concurrent builds into one directory do not lose entries.
    pub fn update(dir: &Path, entry: ImageEntry) -> Result<Self, ImageManifestError> {
        let mut m = Self::load(dir)?;
        m.put(entry);
        let path = dir.join(Self::FILE);
        let tmp = tmp_path(&path);
        let io_err = |source| ImageManifestError::Io {
            path: path.clone(),
            source,
        };
        fs::write(&tmp, m.to_json()).map_err(io_err)?;
        fs::rename(&tmp, &path).map_err(io_err)?;
        Ok(m)
    }
}

impl ImageEntry {
    /// True when every artifact is in `dir` with its recorded size: with equal inputs, the
    /// build can be skipped. (Sizes, not hashes: rehashing gigabytes would cost most of what
    /// skipping saves; `stork-image verify`-style checks belong to the consumer.)
    pub fn present_in(&self, dir: &Path) -> bool {
        self.artifacts.iter().all(|a| {
            fs::metadata(dir.join(&a.name)).is_ok_and(|m| m.is_file() && m.len() == a.size)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The appliance reads the kinds this crate writes: each deployable kind maps to its role.
    #[test]
    fn readers_know_the_deployable_kinds() {
        use stork_proto::ImageRole;
        use stork_proto::manifest::Artifact as Read;
        let role = |kind: ArtifactKind| {
            let kind = serde_json::to_value(kind)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string();
            Read {
                name: String::new(),
                kind,
                size: 0,
                sha256: String::new(),
            }
            .deploy_role()
        };
        assert_eq!(role(ArtifactKind::RawDiskZst), Some(ImageRole::Raw));
        assert_eq!(role(ArtifactKind::RawDiskMap), Some(ImageRole::DiskMap));
        assert_eq!(role(ArtifactKind::RootTarZst), Some(ImageRole::Tar));
        assert_eq!(role(ArtifactKind::RootSquashfs), Some(ImageRole::Squashfs));
        assert_eq!(role(ArtifactKind::EphemeralSquashfs), None);
        assert_eq!(role(ArtifactKind::Kernel), None);
    }

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashing_writer_matches_file_hash() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (inner, len, sha) = w.finish();
        assert_eq!((inner.as_slice(), len), (b"abc".as_slice(), 3));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let tmp = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            sha256_file(tmp.path()).unwrap(),
            (0, EMPTY_SHA256.to_owned())
        );
    }

    #[test]
    fn a_sparse_files_sum_is_its_bytes_sum_holes_included() {
        use std::os::unix::fs::FileExt;
        // Data at the start, inside a block, across a block's edge and in the last bytes;
        // holes between them and a hole before the end.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let f = tmp.as_file();
        let len = 9 * (1 << 20) + 4321;
        f.set_len(len).unwrap();
        let mut bytes = vec![0u8; len as usize];
        for (at, n) in [(0, 10), (3 << 20, 777), ((5 << 20) - 5, 20), (len - 3, 3)] {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 + 1).collect();
            f.write_all_at(&data, at).unwrap();
            bytes[at as usize..(at + n) as usize].copy_from_slice(&data);
        }
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&bytes).unwrap();
        let (_, _, want) = w.finish();
        assert_eq!(sha256_file(tmp.path()).unwrap(), (len, want));
    }

    #[test]
    fn manifest_json_has_the_agreed_fields() {
        let m = Manifest {
            artifacts: vec![Artifact {
                name: "initrd.img".into(),
                kind: ArtifactKind::Initrd,
                size: 1,
                sha256: EMPTY_SHA256.into(),
            }],
            inputs: Inputs {
                kernel_version: "6.1.0-9-amd64".into(),
                agent_sha256: EMPTY_SHA256.into(),
                modules: vec!["virtio".into()],
                builtin_modules: vec![],
                on_demand_modules: vec!["xfs".into()],
                source_date_epoch: 0,
                compression: "zstd-19".into(),
            },
        };
        let json = m.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["artifacts"][0]["kind"], "initrd");
        assert_eq!(v["inputs"]["kernel_version"], "6.1.0-9-amd64");
        assert!(json.ends_with("}\n"));
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }

    fn entry(name: &str) -> ImageEntry {
        ImageEntry {
            name: name.into(),
            kind: ImageKind::Ephemeral,
            arch: "amd64".into(),
            artifacts: vec![ImageArtifact {
                name: format!("{name}.squashfs"),
                kind: ArtifactKind::EphemeralSquashfs,
                size: 3,
                sha256: EMPTY_SHA256.into(),
                compression: "zstd-15 block 1M".into(),
                uncompressed_size: None,
            }],
            inputs: ImageInputs {
                builder: "stork-image test".into(),
                recipe_sha256: EMPTY_SHA256.into(),
                suite: "bookworm".into(),
                variant: "minbase".into(),
                packages: vec!["zstd".into()],
                mirror_sha256: EMPTY_SHA256.into(),
                installed_sha256: EMPTY_SHA256.into(),
                installed_count: 1,
                source_date_epoch: 1,
                settings: BTreeMap::new(),
            },
            deploy: None,
        }
    }

    #[test]
    fn image_manifest_entries_are_replaced_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(ImageManifest::load(d).unwrap(), ImageManifest::default());
        ImageManifest::update(d, entry("zeta")).unwrap();
        ImageManifest::update(d, entry("alpha")).unwrap();
        let mut newer = entry("zeta");
        newer.inputs.source_date_epoch = 2;
        let m = ImageManifest::update(d, newer.clone()).unwrap();
        assert_eq!(m.images.len(), 2);
        assert_eq!(m.images[0].name, "alpha");
        assert_eq!(ImageManifest::load(d).unwrap().get("zeta"), Some(&newer));
        let json = fs::read_to_string(d.join("manifest.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["images"][1]["artifacts"][0]["kind"], "ephemeral_squashfs");
        assert_eq!(v["images"][1]["kind"], "ephemeral");
        assert!(v["images"][1].get("deploy").is_none());

        assert!(!newer.present_in(d));
        fs::write(d.join("zeta.squashfs"), b"abc").unwrap();
        assert!(newer.present_in(d));
    }

    #[test]
    fn an_initrd_manifest_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join("manifest.json"),
            r#"{"artifacts": [], "inputs": {}}"#,
        )
        .unwrap();
        assert!(matches!(
            ImageManifest::update(tmp.path(), entry("x")),
            Err(ImageManifestError::Foreign { .. })
        ));
    }
}
