//! The images the agent fetches: the ephemeral SquashFS and the Debian OS image
//! (`image-builder/recipes/debian-bookworm.toml`), built by `stork-image` into
//! `target/stork/images/` with one `manifest.json`.
//!
//! Rebuilding is cheap when nothing changed: debootstrap and apt downloads and the root trees
//! stay in the cache (`cache()`, shared with the tests), and `stork-image` skips an image whose
//! manifest entry has the same inputs and whose files are present. Building a tree needs root
//! (debootstrap, chroot).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The OS recipes built by default.
pub const RECIPES: &[&str] = &["image-builder/recipes/debian-bookworm.toml"];

/// `stork-image <subcommand> --cache <the xtask's cache>`, through cargo.
fn stork_image(subcommand: &str) -> std::process::Command {
    let mut c = crate::cargo();
    c.args(["run", "--quiet", "-p", "stork-image", "--", subcommand])
        .arg("--cache")
        .arg(crate::cache());
    c
}

/// Builds (or finds up to date) the ephemeral and OS images in `target/stork/images`; returns
/// that directory.
pub fn build(target: &Path) -> Result<PathBuf> {
    let out = target.join("stork/images");
    crate::step("ephemeral SquashFS (debootstrap tree cached; needs root to build one)");
    crate::status(stork_image("ephemeral").arg("--out").arg(&out))?;
    for recipe in RECIPES {
        crate::step(&format!("OS image from {recipe}"));
        crate::status(
            stork_image("os")
                .arg("--recipe")
                .arg(crate::root().join(recipe))
                .arg("--out")
                .arg(&out),
        )?;
    }
    Ok(out)
}

/// The cached root tree of the ephemeral image (`None`) or of a recipe's OS image.
pub fn tree(recipe: Option<&str>) -> Result<PathBuf> {
    let mut c = crate::cargo();
    c.args([
        "run",
        "--quiet",
        "-p",
        "stork-image",
        "--",
        "rootfs",
        "--cache",
    ])
    .arg(crate::cache());
    match recipe {
        Some(r) => c.arg("--recipe").arg(crate::root().join(r)),
        None => c.arg("--ephemeral"),
    };
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(
        path.lines()
            .last()
            .context("stork-image rootfs printed nothing")?
            .trim(),
    ))
}
