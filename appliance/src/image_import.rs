//! `stork image import DIR`: an OS image from a `stork-image os` output directory into the
//! appliance in one step. Each file is checked against the directory's `manifest.json`
//! (size and sha256) while it is copied under `DATA_DIR/boot/images/NAME/`, and the boot
//! resource to register is returned.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use stork_proto::manifest::{Artifact, Entry, Manifest};

use crate::store::{BootResource, ResourceFile};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a stork-image manifest: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the manifest lists no OS image")]
    NoImage,
    #[error("the manifest lists several OS images ({0}): choose one with --name")]
    Ambiguous(String),
    #[error("the manifest has no OS image {name:?}; it has: {have}")]
    NoSuchImage { name: String, have: String },
    #[error("image {0:?} has no file a deploy can use (raw disk, root tar or root SquashFS)")]
    NoDeployable(String),
    #[error("artifact name {0:?} is not a plain file name")]
    BadName(String),
    #[error("{path}: {what} is {got}, the manifest says {want}")]
    Mismatch {
        path: PathBuf,
        what: &'static str,
        got: String,
        want: String,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks and copies image `name` (or the only OS image) of `dir` under
/// `boot_root/images/NAME/` and returns its boot resource.
pub fn import(
    dir: &Path,
    name: Option<&str>,
    boot_root: &Path,
) -> Result<BootResource, ImportError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ImportError::Read {
        path: path.clone(),
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| ImportError::Manifest { path, source })?;
    let os: Vec<&Entry> = manifest.images.iter().filter(|e| e.kind == "os").collect();
    let names = || {
        os.iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = match (name, os.as_slice()) {
        (_, []) => return Err(ImportError::NoImage),
        (None, [one]) => *one,
        (None, _) => return Err(ImportError::Ambiguous(names())),
        (Some(n), _) => {
            *os.iter()
                .find(|e| e.name == n)
                .ok_or_else(|| ImportError::NoSuchImage {
                    name: n.to_string(),
                    have: names(),
                })?
        }
    };
    if entry.name.contains('/') || entry.name.starts_with('.') {
        return Err(ImportError::BadName(entry.name.clone()));
    }
    let rel_dir = format!("images/{}", entry.name);
    let dest = boot_root.join(&rel_dir);
    std::fs::create_dir_all(&dest).map_err(|source| ImportError::Write {
        path: dest.clone(),
        source,
    })?;
    let mut files = Vec::new();
    for a in &entry.artifacts {
        let Some(role) = a.deploy_role() else {
            continue;
        };
        if a.name.contains('/') || a.name.starts_with('.') {
            return Err(ImportError::BadName(a.name.clone()));
        }
        copy_checked(&dir.join(&a.name), &dest.join(&a.name), a)?;
        files.push(ResourceFile {
            role,
            path: format!("{rel_dir}/{}", a.name),
            sha256: a.sha256.clone(),
            size: a.size,
        });
    }
    if files.is_empty() {
        return Err(ImportError::NoDeployable(entry.name.clone()));
    }
    Ok(BootResource {
        name: entry.name.clone(),
        kind: "os".into(),
        arch: Some(entry.arch.clone()),
        files,
        kernels: entry.kernels().to_vec(),
    })
}

/// Copies `from` to `to` through a temporary file, hashing as it goes; the file takes its
/// name only once its size and sum match the manifest, so a served file is never partial.
fn copy_checked(from: &Path, to: &Path, a: &Artifact) -> Result<(), ImportError> {
    let read_err = |source| ImportError::Read {
        path: from.to_path_buf(),
        source,
    };
    let tmp = to.with_extension("importing");
    let write_err = |source| ImportError::Write {
        path: tmp.clone(),
        source,
    };
    let mut src = File::open(from).map_err(read_err)?;
    let mut out = File::create(&tmp).map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(read_err)?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            break;
        };
        hasher.update(chunk);
        out.write_all(chunk).map_err(write_err)?;
        size += n as u64;
    }
    let sum = hex::encode(hasher.finalize());
    let mismatch = if size != a.size {
        Some(("the size", size.to_string(), a.size.to_string()))
    } else if sum != a.sha256 {
        Some(("the sha256", sum, a.sha256.clone()))
    } else {
        None
    };
    if let Some((what, got, want)) = mismatch {
        drop(out);
        let _ = std::fs::remove_file(&tmp);
        return Err(ImportError::Mismatch {
            path: from.to_path_buf(),
            what,
            got,
            want,
        });
    }
    out.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, to).map_err(|source| ImportError::Write {
        path: to.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stork_proto::ImageRole;

    fn image_dir(content: &[u8], sha: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("root.tar.zst"), content).unwrap();
        let sum = sha.map_or_else(|| hex::encode(Sha256::digest(content)), str::to_string);
        let manifest = serde_json::json!({"images": [
            {"name": "debian-bookworm", "kind": "os", "arch": "amd64", "inputs": {},
             "artifacts": [
                {"name": "root.tar.zst", "kind": "root_tar_zst", "size": content.len(),
                 "sha256": sum, "compression": "zstd"},
                {"name": "packages.txt", "kind": "package_list", "size": 0, "sha256": "", "compression": ""}
             ]},
            {"name": "ephemeral", "kind": "ephemeral", "arch": "amd64", "artifacts": []}
        ]});
        std::fs::write(d.path().join("manifest.json"), manifest.to_string()).unwrap();
        d
    }

    #[test]
    fn the_only_os_image_is_copied_and_described() {
        let src = image_dir(b"tar bytes", None);
        let data = tempfile::tempdir().unwrap();
        let r = import(src.path(), None, data.path()).unwrap();
        assert_eq!(r.name, "debian-bookworm");
        assert_eq!(r.files.len(), 1);
        assert_eq!(r.files[0].role, ImageRole::Tar);
        assert_eq!(r.files[0].path, "images/debian-bookworm/root.tar.zst");
        assert_eq!(
            std::fs::read(data.path().join(&r.files[0].path)).unwrap(),
            b"tar bytes"
        );
    }

    #[test]
    fn a_wrong_sum_names_the_file_and_leaves_nothing_behind() {
        let src = image_dir(b"tar bytes", Some(&"0".repeat(64)));
        let data = tempfile::tempdir().unwrap();
        let e = import(src.path(), None, data.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("root.tar.zst: the sha256 is"), "{msg}");
        let dir = data.path().join("images/debian-bookworm");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0);
    }

    #[test]
    fn an_unknown_name_lists_the_images_there_are() {
        let src = image_dir(b"x", None);
        let data = tempfile::tempdir().unwrap();
        let e = import(src.path(), Some("ubuntu"), data.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the manifest has no OS image \"ubuntu\"; it has: debian-bookworm"
        );
    }
}
