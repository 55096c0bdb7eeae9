//! A synthetic tree with every kind of entry an OS root has (modes with setuid and sticky
//! bits, other owners, symlinks, hard links, a fifo, device nodes, `user.` and
//! `security.capability` xattrs, file times after SOURCE_DATE_EPOCH) goes through Stork's
//! SquashFS writer; `unsquashfs` (the reference reader) must give the same tree back, and a
//! second write the same bytes.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};
use common::{diff, run, set_xattr, walk};
use stork_image::squashfs;

/// Before every file time the test creates (the files made now are clamped to it).
const EPOCH: u64 = 1_700_000_000;

/// `cap_net_raw+ep`, as setcap writes it (VFS_CAP_REVISION_2).
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

fn chown(p: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    Ok(())
}

fn mode(p: &Path, m: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(m))?;
    Ok(())
}

fn synthetic(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("usr/bin"))?;
    fs::create_dir_all(root.join("home/user"))?;
    fs::create_dir_all(root.join("tmp"))?;
    fs::create_dir_all(root.join("dev"))?;
    fs::write(root.join("usr/bin/ping"), b"\x7fELF pretend ping")?;
    set_xattr(
        &root.join("usr/bin/ping"),
        "security.capability",
        &CAP_NET_RAW,
    )?;
    fs::write(root.join("usr/bin/su"), b"pretend su")?;
    mode(&root.join("usr/bin/su"), 0o4755)?;
    mode(&root.join("tmp"), 0o1777)?;
    fs::write(root.join("home/user/notes"), "x".repeat(300_000))?;
    chown(&root.join("home/user/notes"), 1000, 1000)?;
    chown(&root.join("home/user"), 1000, 1000)?;
    mode(&root.join("home/user"), 0o700)?;
    set_xattr(&root.join("home/user/notes"), "user.stork", b"kept")?;
    fs::hard_link(root.join("usr/bin/su"), root.join("usr/bin/su-link"))?;
    symlink("ping", root.join("usr/bin/ping6"))?;
    symlink("/nonexistent/target", root.join("dangling"))?;
    fs::write(root.join("empty"), b"")?;
    run(Command::new("mkfifo").arg(root.join("dev/fifo")))?;
    run(Command::new("mknod")
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]))?;
    run(Command::new("mknod")
        .arg(root.join("dev/loop9"))
        .args(["b", "7", "9"]))?;
    // An old file keeps its time; everything made above is later than EPOCH and is clamped.
    fs::write(root.join("old"), b"old")?;
    run(Command::new("touch")
        .args(["-h", "-d", "@1000000000"])
        .arg(root.join("old")))?;
    Ok(())
}

#[test]
#[ignore = "needs root and squashfs-tools: run via cargo xtask test"]
fn unsquashfs_gives_back_the_tree_and_writes_are_reproducible() -> Result<()> {
    ensure!(
        common::is_root(),
        "needs root (owners, device nodes, security.* xattrs)"
    );
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    synthetic(&src)?;
    let opts = squashfs::Options {
        level: 15,
        source_date_epoch: EPOCH,
    };
    let a = squashfs::write(&src, &tmp.path().join("a.sqfs"), &opts)?;
    let b = squashfs::write(&src, &tmp.path().join("b.sqfs"), &opts)?;
    ensure!(
        a.sha256 == b.sha256,
        "two writes differ: {} {}",
        a.sha256,
        b.sha256
    );

    let out = tmp.path().join("out");
    run(Command::new("unsquashfs")
        .args(["-quiet", "-no-progress", "-d"])
        .arg(&out)
        .arg(tmp.path().join("a.sqfs")))?;
    let mut want = walk(&src)?;
    for e in want.values_mut() {
        e.mtime = e.mtime.min(EPOCH as i64);
    }
    let got = walk(&out)?;
    let d = diff(&want, &got, 20);
    ensure!(
        d.is_empty(),
        "unsquashfs differs from the source:\n{}",
        d.join("\n")
    );

    // The checks above compare whatever is there; make sure the interesting parts were.
    ensure!(
        got["/usr/bin/ping"]
            .xattrs
            .contains_key("security.capability")
    );
    ensure!(got["/home/user/notes"].xattrs["user.stork"] == hex::encode("kept"));
    ensure!(got["/usr/bin/su"].nlink == 2 && got["/usr/bin/su"].mode == 0o4755);
    ensure!(got["/home/user/notes"].uid == 1000);
    ensure!(got["/dev/loop9"].kind == "block" && got["/dev/fifo"].kind == "fifo");
    ensure!(got["/old"].mtime == 1_000_000_000 && got["/empty"].mtime == EPOCH as i64);
    let caps = run(Command::new("getcap").arg(out.join("usr/bin/ping")))?;
    ensure!(
        String::from_utf8_lossy(&caps.stdout).contains("cap_net_raw=ep"),
        "getcap: {}",
        String::from_utf8_lossy(&caps.stdout)
    );
    Ok(())
}

#[test]
#[ignore = "needs squashfs-tools: run via cargo xtask test"]
fn the_cli_writes_the_same_bytes_as_the_library() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("etc"))?;
    fs::write(src.join("etc/hostname"), "stork\n")?;
    let lib = squashfs::write(
        &src,
        &tmp.path().join("lib.sqfs"),
        &squashfs::Options {
            level: 15,
            source_date_epoch: EPOCH,
        },
    )?;
    let out = run(common::bin()
        .args(["squashfs", "--source"])
        .arg(&src)
        .arg("--out")
        .arg(tmp.path().join("cli.sqfs"))
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["sha256"] == lib.sha256.as_str(), "{v} vs {}", lib.sha256);
    Ok(())
}
