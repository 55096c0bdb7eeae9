//! The ephemeral image for real: debootstrap from the host's mirror (cached in `~/.cache/stork`
//! like the xtask's downloads, so only the first run pays), two builds from freshly installed
//! trees (`--refresh`: apt installs the packages again, only the .debs come from the cache)
//! that must be bit-identical, and an `unsquashfs` extraction that must equal the tree it was
//! made from.

mod common;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::{artifact, bin, cache_dir, diff, manifest, run, sha256_hex, stdout_line, walk};

/// What the deploy step calls, by path inside the image.
const TOOLS: &[&str] = &[
    "usr/sbin/mke2fs",
    "usr/sbin/resize2fs",
    "usr/sbin/e2fsck",
    "usr/sbin/mkfs.vfat",
    "usr/sbin/sgdisk",
    "usr/sbin/sfdisk",
    "usr/sbin/wipefs",
    "usr/sbin/blkid",
    "usr/sbin/grub-install",
    "usr/lib/grub/i386-pc/boot.img",
    "usr/lib/grub/x86_64-efi/normal.mod",
    "usr/bin/zstd",
    "usr/bin/xz",
    "usr/bin/tar",
];

fn build(out: &Path) -> Result<()> {
    run(bin()
        .arg("ephemeral")
        .arg("--refresh")
        .arg("--cache")
        .arg(cache_dir())
        .arg("--out")
        .arg(out))?;
    Ok(())
}

#[test]
#[ignore = "needs root and the Debian mirror: run via cargo xtask test"]
fn two_builds_are_identical_and_unsquashfs_gives_back_the_tree() -> Result<()> {
    ensure!(common::is_root(), "needs root (debootstrap, chroot)");
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    build(&a)?;
    build(&b)?;
    let (sa, sb) = (
        sha256_hex(&a.join("ephemeral.squashfs"))?,
        sha256_hex(&b.join("ephemeral.squashfs"))?,
    );
    ensure!(sa == sb, "two builds differ: {sa} vs {sb}");

    let m = manifest(&a)?;
    let art = artifact(&m, "ephemeral", "ephemeral.squashfs")?;
    ensure!(
        art["sha256"] == sa.as_str(),
        "manifest sha256 {} vs file {sa}",
        art["sha256"]
    );
    ensure!(art["kind"] == "ephemeral_squashfs");
    let image = &m["images"][0];
    ensure!(image["arch"] == "amd64" && image["kind"] == "ephemeral");
    ensure!(image["inputs"]["suite"] == "bookworm");
    ensure!(
        image["inputs"]["mirror_sha256"]
            .as_str()
            .is_some_and(|s| s.len() == 64)
    );
    // No mirror address in the manifest: only its hash (URLs read from the host's apt sources).
    ensure!(
        !serde_json::to_string(&m)?.contains("://"),
        "a URL in the manifest"
    );
    eprintln!(
        "ephemeral.squashfs: {} bytes, sha256 {sa}",
        art["size"].as_u64().context("size")?
    );
    // A third run finds it up to date.
    let again = run(bin()
        .arg("ephemeral")
        .arg("--cache")
        .arg(cache_dir())
        .arg("--out")
        .arg(&a))?;
    ensure!(String::from_utf8_lossy(&again.stderr).contains("up to date"));

    let tree = stdout_line(&run(bin()
        .args(["rootfs", "--ephemeral", "--cache"])
        .arg(cache_dir()))?)?;
    for t in TOOLS {
        ensure!(tree.join(t).exists(), "{t} missing from the ephemeral tree");
    }
    ensure!(!tree.join("boot/vmlinuz").exists() && !tree.join("usr/lib/modules").exists());
    ensure!(std::fs::read(tree.join("etc/machine-id"))?.is_empty());

    let out = tmp.path().join("x");
    run(Command::new("unsquashfs")
        .args(["-quiet", "-no-progress", "-d"])
        .arg(&out)
        .arg(a.join("ephemeral.squashfs")))?;
    let (want, got) = (walk(&tree)?, walk(&out)?);
    let d = diff(&want, &got, 20);
    ensure!(
        d.is_empty(),
        "unsquashfs differs from the tree:\n{}",
        d.join("\n")
    );
    eprintln!("unsquashfs: {} entries equal to the tree", got.len());
    Ok(())
}
