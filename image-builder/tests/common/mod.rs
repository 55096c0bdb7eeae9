//! Shared by the image tests: where the cache is, running the real binary, comparing trees.

#![allow(dead_code)] // Each test binary uses its own part.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// The target directory this test binary was built into (target/debug/deps/<test> -> target).
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
}

/// The download and root-tree cache `cargo xtask` uses too (`$STORK_CACHE`, else
/// `~/.cache/stork`), so tests and `cargo xtask images` share debootstrap runs and trees.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STORK_CACHE") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/stork"),
        None => target_dir().join("stork-cache"),
    }
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stork-image"))
}

/// Runs `cmd`, failing with its stderr; progress lines are passed through to the test log.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(out)
}

pub fn stdout_line(out: &Output) -> Result<PathBuf> {
    let s = String::from_utf8(out.stdout.clone())?;
    Ok(PathBuf::from(s.lines().last().context("no output")?.trim()))
}

pub fn manifest(dir: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&fs::read(
        dir.join("manifest.json"),
    )?)?)
}

/// The artifact `name` of image `image` in a manifest.
pub fn artifact<'a>(
    m: &'a serde_json::Value,
    image: &str,
    name: &str,
) -> Result<&'a serde_json::Value> {
    m["images"]
        .as_array()
        .context("images")?
        .iter()
        .find(|i| i["name"] == image)
        .and_then(|i| i["artifacts"].as_array())
        .and_then(|a| a.iter().find(|a| a["name"] == name))
        .with_context(|| format!("{image}/{name} in manifest"))
}

pub fn sha256_hex(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .context("sha256sum output")?
        .to_owned())
}

/// What is compared between two trees for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub content: String,
    pub xattrs: BTreeMap<String, String>,
    /// Paths sharing an inode with this one (hard links), as a sorted group id.
    pub nlink: u64,
}

/// Every path under `root` with type, permissions, owner, mtime, content (hash, link target,
/// device numbers) and extended attributes.
pub fn walk(root: &Path) -> Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    walk_into(root, root, &mut out)?;
    Ok(out)
}

fn walk_into(root: &Path, p: &Path, out: &mut BTreeMap<String, Entry>) -> Result<()> {
    let m = fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
    let ft = m.file_type();
    let (kind, content) = if ft.is_dir() {
        ("dir", String::new())
    } else if ft.is_symlink() {
        ("symlink", fs::read_link(p)?.to_string_lossy().into_owned())
    } else if ft.is_file() {
        let mut f = fs::File::open(p)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        ("file", format!("{:x}", md5ish(&buf)))
    } else if ft.is_char_device() {
        ("char", format!("{}", m.rdev()))
    } else if ft.is_block_device() {
        ("block", format!("{}", m.rdev()))
    } else if ft.is_fifo() {
        ("fifo", String::new())
    } else {
        ("socket", String::new())
    };
    let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
    out.insert(
        format!("/{rel}"),
        Entry {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            // Symlink times are not restored by every extractor; the rest must match.
            mtime: if ft.is_symlink() { 0 } else { m.mtime() },
            content,
            xattrs: xattrs(p)?,
            nlink: if ft.is_dir() { 0 } else { m.nlink() },
        },
    );
    if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)?.collect::<Result<_, _>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            walk_into(root, &e.path(), out)?;
        }
    }
    Ok(())
}

/// A 64-bit FNV-1a: enough to tell file contents apart in a comparison.
fn md5ish(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ b.len() as u64
}

/// Extended attributes of `p` (not following symlinks), values hex-encoded.
pub fn xattrs(p: &Path) -> Result<BTreeMap<String, String>> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: `c` is NUL-terminated and `names` is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(BTreeMap::new());
        }
        return Err(e).with_context(|| format!("llistxattr {}", p.display()));
    }
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = std::ffi::CString::new(name)?;
        let mut val = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated and `val` is writable for its length.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("lgetxattr {}", p.display()));
        }
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            hex::encode(&val[..m as usize]),
        );
    }
    Ok(out)
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) -> Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    let n = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated strings and a readable value buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setxattr {name} on {}", p.display()));
    }
    Ok(())
}

/// Differences between two walks, at most `limit` of them, for a readable failure.
pub fn diff(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => out.push(format!("{k}: only in the source")),
            Some(vb) if va != vb => out.push(format!("{k}: {va:?} != {vb:?}")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("{k}: only in the extraction"));
    }
    out.truncate(limit);
    out
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
