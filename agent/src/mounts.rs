//! The pseudo-filesystems an initramfs init has to mount for itself.

use std::fs;

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
pub fn mount_all() -> Result<Mounted> {
    let mut done = Mounted {
        mounted: Vec::new(),
        already: Vec::new(),
    };
    for m in table() {
        fs::create_dir_all(m.target).with_context(|| format!("create {}", m.target))?;
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
