//! The appliance image (`stork-image appliance`): Debian, systemd and Stork on one raw GPT disk,
//! with the boot files and OS images `cargo xtask images` builds. Written to
//! `target/stork/appliance/stork-appliance.raw` (a JSON description beside it).

use std::path::{Path, PathBuf};

use anyhow::Result;

/// The image file, relative to the target directory.
pub const IMAGE: &str = "stork/appliance/stork-appliance.raw";
/// The `stork` binary the image was built with, kept beside it: `cargo test` may relink
/// `target/debug/stork` (other features unified), and a rebuild from the same inputs must
/// get the same binary.
pub const STORK: &str = "stork/appliance/stork";

/// Which `stork` goes into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// What a person flashes.
    Release,
    /// The tests' build, already made by `cargo xtask test`'s workspace build (a release
    /// build would add minutes on two cores; the image's code paths are the same).
    Debug,
}

impl Profile {
    pub fn stork(self, target: &Path) -> PathBuf {
        match self {
            Profile::Release => target.join("release/stork"),
            Profile::Debug => target.join("debug/stork"),
        }
    }
}

/// Builds `stork` for `profile` and the image from the boot files in `boot` and the OS images
/// in `os`; returns the image's path.
pub fn build(
    target: &Path,
    boot: &Path,
    os: &Path,
    version: Option<&str>,
    profile: Profile,
) -> Result<PathBuf> {
    match profile {
        Profile::Release => {
            crate::step("building stork (release) for the appliance image");
            crate::status(crate::cargo().args(["build", "--quiet", "--release", "-p", "stork"]))?;
        }
        // Built by the workspace build just before; building `-p stork` alone would relink it
        // with another feature set.
        Profile::Debug => {}
    }
    let out = target.join(IMAGE);
    std::fs::create_dir_all(out.parent().unwrap_or(target))?;
    let stork = target.join(STORK);
    std::fs::copy(profile.stork(target), &stork)?;
    crate::step("appliance image (Debian tree cached; needs root to build one)");
    let mut c = crate::cargo();
    c.args(["run", "--quiet", "-p", "stork-image", "--", "appliance"])
        .arg("--cache")
        .arg(crate::cache())
        .arg("--out")
        .arg(&out)
        .arg("--stork")
        .arg(&stork)
        .arg("--boot")
        .arg(boot)
        .arg("--images")
        .arg(os)
        // The image the appliance test and the demo deploy; the others are imported or
        // uploaded where wanted (each adds most of a GiB to the system partition).
        .args(["--image", crate::DEMO_IMAGE]);
    if let Some(v) = version {
        c.arg("--version").arg(v);
    }
    crate::status(&mut c)?;
    Ok(out)
}
