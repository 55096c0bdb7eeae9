//! What the appliance image carries for Stork to serve: the boot files (kernel, initrd,
//! ephemeral SquashFS, network boot programs) under `/usr/share/stork/boot`, copied into
//! `DATA_DIR/boot`, and the OS images under `/usr/share/stork/images` (a `stork-image`
//! output directory), imported and registered as `stork image import` does.
//!
//! Each boot copies only what changed (an upgrade brings new files; an unchanged file is
//! skipped by size and modification time, which the copy keeps), and an image already
//! registered with the same files is left alone.

use std::fs::File;
use std::path::{Path, PathBuf};

use stork_proto::manifest::Manifest;

use crate::image_import::{self, ImportError};
use crate::store::{Store, StoreError, now_ms};

/// Where the image builder puts them (`stork-image appliance`).
pub const BOOT_FILES: &str = "/usr/share/stork/boot";
pub const OS_IMAGES: &str = "/usr/share/stork/images";

#[derive(Debug, thiserror::Error)]
pub enum BundledError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a stork-image manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("importing the bundled OS image {name}")]
    Import {
        name: String,
        #[source]
        source: ImportError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BundledError + 'a {
    move |source| BundledError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Boot files copied (the others were there already).
    pub copied: Vec<String>,
    /// OS images imported and registered (the others were registered already).
    pub imported: Vec<String>,
    /// Every bundled OS image, registered now or before.
    pub images: Vec<String>,
}

/// Copies the boot files of `boot_src` into `boot_dir` and imports the OS images of
/// `images_src` there, registering them in `store`. Missing sources are nothing to do (a
/// development build of the image may carry none).
pub fn install(
    boot_src: &Path,
    images_src: &Path,
    boot_dir: &Path,
    store: &Store,
) -> Result<Installed, BundledError> {
    let mut done = Installed::default();
    std::fs::create_dir_all(boot_dir).map_err(io("create", boot_dir))?;
    if boot_src.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(boot_src)
            .map_err(io("read", boot_src))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            if copy_if_changed(&boot_src.join(&name), &boot_dir.join(&name))? {
                done.copied.push(name);
            }
        }
    }
    let manifest_path = images_src.join("manifest.json");
    if manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path).map_err(io("read", &manifest_path))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| BundledError::Manifest {
                path: manifest_path.clone(),
                source,
            })?;
        for entry in manifest.images.iter().filter(|e| e.kind == "os") {
            done.images.push(entry.name.clone());
            let registered = store.boot_resource(&entry.name)?;
            let current = registered.is_some_and(|r| {
                let wanted: Vec<&str> = entry
                    .artifacts
                    .iter()
                    .filter(|a| a.deploy_role().is_some())
                    .map(|a| a.sha256.as_str())
                    .collect();
                r.kernels == entry.kernels()
                    && r.files.len() == wanted.len()
                    && r.files.iter().all(|f| {
                        wanted.contains(&f.sha256.as_str())
                            && std::fs::metadata(boot_dir.join(&f.path))
                                .is_ok_and(|m| m.len() == f.size)
                    })
            });
            if current {
                continue;
            }
            let resource = image_import::import(images_src, Some(&entry.name), boot_dir).map_err(
                |source| BundledError::Import {
                    name: entry.name.clone(),
                    source,
                },
            )?;
            store.put_boot_resource(&resource, now_ms())?;
            done.imported.push(entry.name.clone());
        }
    }
    Ok(done)
}

/// Copies `from` to `to` (through a temporary name, keeping the modification time) unless
/// `to` has the same size and time; returns whether it copied.
fn copy_if_changed(from: &Path, to: &Path) -> Result<bool, BundledError> {
    let src = std::fs::metadata(from).map_err(io("read", from))?;
    let modified = src.modified().map_err(io("read", from))?;
    if let Ok(dst) = std::fs::metadata(to)
        && dst.len() == src.len()
        && dst.modified().is_ok_and(|t| t == modified)
    {
        return Ok(false);
    }
    let tmp = to.with_extension("installing");
    std::fs::copy(from, &tmp).map_err(io("copy to", &tmp))?;
    let f = File::options()
        .write(true)
        .open(&tmp)
        .map_err(io("open", &tmp))?;
    f.set_modified(modified)
        .map_err(io("set the time of", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, to).map_err(io("rename to", to))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_are_copied_once_and_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(src.join("initrd.img"), b"initrd").unwrap();
        let store = Store::open(&dir.path().join("stork.db")).unwrap();
        let none = dir.path().join("no-images");

        let first = install(&src, &none, &boot, &store).unwrap();
        assert_eq!(first.copied, ["initrd.img", "vmlinuz"]);
        assert_eq!(std::fs::read(boot.join("vmlinuz")).unwrap(), b"kernel");
        let again = install(&src, &none, &boot, &store).unwrap();
        assert!(again.copied.is_empty(), "{again:?}");

        // An upgrade's new kernel (another size) is copied; the initrd is not.
        std::fs::write(src.join("vmlinuz"), b"kernel v2").unwrap();
        let upgraded = install(&src, &none, &boot, &store).unwrap();
        assert_eq!(upgraded.copied, ["vmlinuz"]);
        assert_eq!(std::fs::read(boot.join("vmlinuz")).unwrap(), b"kernel v2");
        assert!(upgraded.images.is_empty());
    }
}
