//! What a failed test's lab leaves behind. The logs and consoles are what a person reads; the
//! VM disks (GiBs each) are what fills a build machine's disk, and on a full disk QEMU stops a
//! VM whose write finds no space (its default `werror=enospc`), so one kept lab turned every
//! later VM test into a silent timeout. Under CI (`CI` set) a kept lab's large files go;
//! elsewhere they stay for inspection. Either way the free space is said beside the path.

use std::path::{Path, PathBuf};

/// Files at least this large are disk images, not logs.
const LARGE: u64 = 64 << 20;

/// Bytes free to an unprivileged writer on `path`'s file system (as the appliance's
/// `Store::free_bytes` reads its data directory's).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Some(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

/// One line for a failure report: how much room is left where the lab writes its disks.
pub fn free_space_line(path: &Path) -> String {
    match free_bytes(path) {
        Some(b) if b < 2 << 30 => format!(
            "{} MiB free on {}'s file system: nearly full (QEMU pauses a VM whose disk \
             write finds no space; every later VM test then times out)",
            b >> 20,
            path.display()
        ),
        Some(b) => format!("{:.1} GiB free on {}'s file system", gib(b), path.display()),
        None => format!("free space on {}'s file system unknown", path.display()),
    }
}

/// A dropped lab's directory: removed, or kept and [`report`]ed.
pub fn finish(dir: &Path, keep: bool) {
    if keep {
        report(dir);
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Called when a lab whose directory is kept is dropped: under CI removes its large files
/// (`remove_large`), and prints where it is and the space left.
pub fn report(dir: &Path) {
    let removed = if std::env::var_os("CI").is_some() {
        remove_large(dir)
    } else {
        Vec::new()
    };
    let mut line = format!("lab kept in {}; {}", dir.display(), free_space_line(dir));
    if !removed.is_empty() {
        let names: Vec<String> = removed
            .iter()
            .map(|p| p.strip_prefix(dir).unwrap_or(p).display().to_string())
            .collect();
        line.push_str(&format!(
            "; under CI its disk images were removed ({})",
            names.join(", ")
        ));
    }
    eprintln!("{line}");
}

/// Removes regular files of at least `LARGE` bytes (apparent size) under `dir`; returns
/// what it removed.
pub fn remove_large(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let path = e.path();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && meta.len() >= LARGE && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed.sort();
    removed
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_labs_disks_go_and_its_logs_stay() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("m1");
        std::fs::create_dir(&vm).unwrap();
        let disk = vm.join("disk.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        let console = vm.join("console.log");
        std::fs::write(&console, "login:").unwrap();
        let removed = remove_large(dir.path());
        assert_eq!(removed, vec![disk.clone()]);
        assert!(!disk.exists());
        assert_eq!(std::fs::read_to_string(&console).unwrap(), "login:");
    }

    #[test]
    fn free_space_is_read_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let line = free_space_line(dir.path());
        assert!(line.contains("free on"), "{line}");
        assert!(free_bytes(&dir.path().join("no/such")).is_none());
        assert!(free_space_line(&dir.path().join("no/such")).contains("unknown"));
    }
}
