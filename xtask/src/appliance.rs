//! The appliance image (`stork-image appliance`): Debian, systemd and Stork on one raw GPT disk,
//! with the boot files and OS images `cargo xtask images` builds. Written to
//! `target/stork/appliance/stork-appliance.raw` (a JSON description beside it).

use std::path::{Path, PathBuf};

use anyhow::Result;

/// The image file, relative to the target directory.
pub const IMAGE: &str = "stork/appliance/stork-appliance.raw";

/// Builds `stork` (release: the image is what a person flashes) and the image from the boot
/// files in `boot` and the OS images in `os`; returns the image's path.
pub fn build(target: &Path, boot: &Path, os: &Path, version: Option<&str>) -> Result<PathBuf> {
    crate::step("building stork (release) for the appliance image");
    crate::status(crate::cargo().args(["build", "--quiet", "--release", "-p", "stork"]))?;
    let out = target.join(IMAGE);
    std::fs::create_dir_all(out.parent().unwrap_or(target))?;
    crate::step("appliance image (Debian tree cached; needs root to build one)");
    let mut c = crate::cargo();
    c.args(["run", "--quiet", "-p", "stork-image", "--", "appliance"])
        .arg("--cache")
        .arg(crate::cache())
        .arg("--out")
        .arg(&out)
        .arg("--stork")
        .arg(target.join("release/stork"))
        .arg("--boot")
        .arg(boot)
        .arg("--images")
        .arg(os);
    if let Some(v) = version {
        c.arg("--version").arg(v);
    }
    crate::status(&mut c)?;
    Ok(out)
}
