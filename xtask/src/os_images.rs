//! The images the agent fetches: the ephemeral SquashFS and the Debian OS images (Debian 12
//! and 13, `image-builder/recipes/debian-{bookworm,trixie}.toml`), built by `stork-image` into
//! `target/stork/images/` with one `manifest.json`.
//!
//! Rebuilding is cheap when nothing changed: debootstrap and apt downloads and the root trees
//! stay in the cache (`cache()`, shared with the tests), and `stork-image` skips an image whose
//! manifest entry has the same inputs and whose files are present. Building a tree needs root
//! (debootstrap, chroot).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The OS recipes built by default.
pub const RECIPES: &[&str] = &[
    "image-builder/recipes/debian-bookworm.toml",
    "image-builder/recipes/debian-trixie.toml",
];

/// `stork-image <subcommand> --cache <the xtask's cache>`, through cargo.
pub fn stork_image(subcommand: &str) -> std::process::Command {
    let mut c = crate::cargo();
    c.args(["run", "--quiet", "-p", "stork-image", "--", subcommand])
        .arg("--cache")
        .arg(crate::cache());
    c
}

/// The agent's ephemeral root, as `stork-image ephemeral` names it and as the appliance's
/// `boot.ephemeral` defaults to.
const EPHEMERAL: &str = "ephemeral.squashfs";

/// Builds (or finds up to date) the ephemeral and OS images in `target/stork/images`, and puts
/// the ephemeral root among the boot files (`target/stork/boot`, which the lab copies into the
/// appliance's `DATA_DIR/boot`); returns the images directory.
pub fn build(target: &Path) -> Result<PathBuf> {
    let out = target.join("stork/images");
    crate::step("ephemeral SquashFS (debootstrap tree cached; needs root to build one)");
    crate::status(stork_image("ephemeral").arg("--out").arg(&out))?;
    install_boot_file(&out.join(EPHEMERAL), &target.join("stork/boot"))?;
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

/// Hard-links `file` into `boot` (a copy across file systems), replacing what is there in
/// one rename so that a reader never sees half a file.
fn install_boot_file(file: &Path, boot: &Path) -> Result<()> {
    let name = file
        .file_name()
        .with_context(|| format!("{} has no file name", file.display()))?;
    let dest = boot.join(name);
    if same_file(file, &dest) {
        return Ok(());
    }
    std::fs::create_dir_all(boot).with_context(|| format!("creating {}", boot.display()))?;
    let tmp = boot.join(format!(".{}.tmp", name.to_string_lossy()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    if std::fs::hard_link(file, &tmp).is_err() {
        std::fs::copy(file, &tmp)
            .with_context(|| format!("copying {} to {}", file.display(), tmp.display()))?;
    }
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
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
