//! The pseudo-filesystems an initramfs init has to mount for itself.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

fn table() -> [Mount; 5] {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    [
        Mount {
            fstype: "proc",
            target: "/proc",
            flags: nodev,
            data: None,
        },
        Mount {
            fstype: "sysfs",
            target: "/sys",
            flags: nodev,
            data: None,
        },
        Mount {
            fstype: "devtmpfs",
            target: "/dev",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        Mount {
            fstype: "tmpfs",
            target: "/run",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        Mount {
            fstype: "tmpfs",
            target: "/tmp",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
    ]
}

/// What [`mount_all`] did, for the console line.
pub struct Mounted {
    pub mounted: Vec<&'static str>,
    pub already: Vec<&'static str>,
}

/// Mounts /proc, /sys, /dev, /run and /tmp, creating the mount points if the initrd lacks them.
/// What is mounted already is left alone: in stage 2 the API file systems were moved in
/// from the initramfs, and mounting them again would hide their contents (/run holds the
/// stage-1 console log).
pub fn mount_all() -> Result<Mounted> {
    let mut done = Mounted {
        mounted: Vec::new(),
        already: Vec::new(),
    };
    for m in table() {
        fs::create_dir_all(m.target).with_context(|| format!("create {}", m.target))?;
        if is_mount_point(Path::new(m.target))? {
            done.already.push(m.target);
            continue;
        }
        match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => done.mounted.push(m.target),
            // The kernel mounts devtmpfs itself when built with DEVTMPFS_MOUNT.
            Err(Errno::EBUSY) if m.fstype == "devtmpfs" => done.already.push(m.target),
            Err(e) => {
                return Err(e).with_context(|| format!("mount {} on {}", m.fstype, m.target));
            }
        }
    }
    Ok(done)
}

/// Whether `dir` is the root of a mounted file system: it is on another device than its
/// parent. (A bind mount of the parent's own file system would not show; none is made here.)
pub fn is_mount_point(dir: &Path) -> Result<bool> {
    let own = fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    let parent = dir.join("..");
    let up = fs::metadata(&parent).with_context(|| format!("stat {}", parent.display()))?;
    Ok(own.dev() != up.dev())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("proc");
        fs::create_dir(&sub).unwrap();
        assert!(!is_mount_point(&sub).unwrap());
        assert!(is_mount_point(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn proc_is_a_mount_point_here() {
        // The test host has /proc mounted, as stage 2 has after the move.
        assert!(is_mount_point(Path::new("/proc")).unwrap());
    }
}
