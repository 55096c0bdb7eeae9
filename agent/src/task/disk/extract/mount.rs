//! A mount that is undone when dropped: the extraction's root and ESP are unmounted on a
//! failure path too.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// A mount that is undone when dropped (after a failure), or by [`Mounted::unmount`].
pub(super) struct Mounted {
    path: PathBuf,
    active: bool,
}

impl Mounted {
    pub(super) fn new(device: &Path, at: &Path, fstype: &str) -> Result<Self> {
        fs::create_dir_all(at).with_context(|| format!("create {}", at.display()))?;
        mount(
            Some(device),
            at,
            Some(fstype),
            MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .with_context(|| format!("mount {} ({fstype}) on {}", device.display(), at.display()))?;
        Ok(Self {
            path: at.to_path_buf(),
            active: true,
        })
    }

    pub(super) fn unmount(mut self) -> Result<()> {
        self.active = false;
        nix::unistd::sync();
        umount2(&self.path, MntFlags::empty())
            .with_context(|| format!("unmount {}", self.path.display()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            // Best effort on a failure path: the failure being reported matters more.
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        }
    }
}
