//! What the `ephemeral` and `os` builds share: their error type, the output directory's lock,
//! the up-to-date check, and the package list artifact.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::cmd::CmdError;
use crate::disk::DiskError;
use crate::manifest::{
    ArtifactKind, ImageArtifact, ImageEntry, ImageInputs, ImageManifest, ImageManifestError,
};
use crate::progress::Progress;
use crate::recipe::RecipeError;
use crate::rootfs::{RootfsError, TreeInfo};
use crate::squashfs::SquashfsError;
use crate::tarball::TarballError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("recipe")]
    Recipe(#[from] RecipeError),
    #[error("root tree")]
    Rootfs(#[from] RootfsError),
    #[error("SquashFS image")]
    Squashfs(#[from] SquashfsError),
    #[error("root tar")]
    Tarball(#[from] TarballError),
    #[error("raw disk image")]
    Disk(#[from] DiskError),
    #[error("raw disk image and its block map")]
    BlockMap(#[source] crate::blockmap::MapWriteError),
    #[error("manifest")]
    Manifest(#[from] ImageManifestError),
    #[error(transparent)]
    Tool(#[from] CmdError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `stork-image <version>` plus the format versions of the steps, for manifests.
pub fn builder(image_format: u32) -> String {
    format!(
        "stork-image {} (tree format {}, image format {image_format})",
        env!("CARGO_PKG_VERSION"),
        crate::rootfs::TREE_FORMAT
    )
}

/// Creates `out` and locks it for this build: two builds into one directory take turns.
pub fn lock_out(out: &Path) -> Result<File, ImageError> {
    fs::create_dir_all(out).map_err(io_err(out))?;
    let path = out.join(".stork-image.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.lock().map_err(io_err(&path))?;
    Ok(f)
}

/// The entry in `out`'s manifest if it was built from `inputs` and its files are all there.
pub fn up_to_date(
    out: &Path,
    name: &str,
    inputs: &ImageInputs,
    progress: &Progress,
) -> Result<Option<ImageEntry>, ImageError> {
    let manifest = ImageManifest::load(out)?;
    match manifest.get(name) {
        Some(e) if &e.inputs == inputs && e.present_in(out) => {
            progress.say(&format!(
                "{} is up to date (same inputs, files present)",
                out.join(ImageManifest::FILE).display()
            ));
            Ok(Some(e.clone()))
        }
        _ => Ok(None),
    }
}

/// Writes `<name>.packages` (what dpkg says is installed) and returns its artifact.
pub fn package_list(out: &Path, name: &str, info: &TreeInfo) -> Result<ImageArtifact, ImageError> {
    let file = format!("{name}.packages");
    let path = out.join(&file);
    fs::write(&path, &info.installed).map_err(io_err(&path))?;
    Ok(ImageArtifact {
        name: file,
        kind: ArtifactKind::PackageList,
        size: info.installed.len() as u64,
        sha256: info.installed_sha256(),
        compression: "none".into(),
        uncompressed_size: None,
    })
}
