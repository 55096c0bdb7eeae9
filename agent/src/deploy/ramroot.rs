//! A root in RAM, for the memory deploy and stage 1's ephemeral root alike: a SquashFS file
//! in a tmpfs, attached to a read-only loop device, mounted under an overlay whose upper
//! layer is tmpfs, and PID 1 handed over into it (`switch_root`).
//!
//! The OS runs on the kernel the agent booted, so its modules must be that kernel's: the OS
//! image and the agent's initrd are built from the same Debian kernel package (both
//! `6.1.0-56-amd64` today); [`kernel_matches`] checks and says so when they are not.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use nix::mount::{MsFlags, mount};

use super::stream::Sink;

/// Everything of the in-memory OS lives under this tmpfs.
pub const BASE: &str = "/stork-mem";

mod ioctl {
    // LOOP_CTL_GET_FREE (<linux/loop.h>): returns the number of a free loop device.
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    // LOOP_SET_FD: attaches the file descriptor passed by value; a read-only descriptor
    // makes a read-only loop device.
    nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);
}

/// A new file in the tmpfs; holes read as zeros, so zero runs need no writing.
pub struct FileSink {
    file: File,
}

impl FileSink {
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self { file })
    }
}

impl Sink for FileSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // The file started empty: extending it makes the range a hole, which reads as zeros.
        let end = offset + len;
        if self.file.metadata()?.len() < end {
            self.file.set_len(end)?;
        }
        Ok(())
    }
    fn capacity(&self) -> Option<u64> {
        None
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Mounts a tmpfs at [`BASE`] for the image and the overlay's upper layer.
pub fn mount_base() -> Result<PathBuf> {
    mount_tmpfs(Path::new(BASE))
}

/// Mounts a tmpfs at `dir` for an image and the overlay's upper layer over it.
pub fn mount_tmpfs(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // Up to 90% of RAM: the image and what the OS writes share it.
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=90%"),
    )
    .with_context(|| format!("mount tmpfs on {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Attaches `image` read-only to a free loop device; returns the device path.
pub fn attach_loop(image: &Path) -> Result<PathBuf> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context("open /dev/loop-control (is the loop module loaded?)")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument.
    let n =
        unsafe { ioctl::loop_ctl_get_free(control.as_raw_fd()) }.context("LOOP_CTL_GET_FREE")?;
    let dev = PathBuf::from(format!("/dev/loop{n}"));
    let mut waited = 0;
    while !dev.exists() && waited < 50 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        waited += 1;
    }
    let loopdev = OpenOptions::new()
        .read(true)
        .open(&dev)
        .with_context(|| format!("open {}", dev.display()))?;
    let backing = File::open(image).with_context(|| format!("open {}", image.display()))?;
    // SAFETY: LOOP_SET_FD takes the backing file's descriptor by value; both stay open for
    // the call (the kernel takes its own reference).
    unsafe { ioctl::loop_set_fd(loopdev.as_raw_fd(), backing.as_raw_fd()) }
        .with_context(|| format!("LOOP_SET_FD {} on {}", image.display(), dev.display()))?;
    Ok(dev)
}

/// Mounts the SquashFS on `loopdev` and an overlay with a tmpfs upper layer; returns the
/// overlay's mount point, the new root.
pub fn mount_overlay(base: &Path, loopdev: &Path) -> Result<PathBuf> {
    let lower = base.join("lower");
    let upper = base.join("upper");
    let work = base.join("work");
    let root = base.join("root");
    for d in [&lower, &upper, &work, &root] {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    mount(
        Some(loopdev),
        &lower,
        Some("squashfs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mount squashfs {} on {}",
            loopdev.display(),
            lower.display()
        )
    })?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .with_context(|| format!("mount overlay on {} ({opts})", root.display()))?;
    Ok(root)
}

/// Whether `root` has modules for the running kernel; `Err` says which it has instead.
pub fn kernel_matches(root: &Path) -> Result<String> {
    let running = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("read /proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    if root.join("lib/modules").join(&running).is_dir() {
        return Ok(running);
    }
    let have: Vec<String> = fs::read_dir(root.join("lib/modules"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    bail!(
        "the image has no modules for the running kernel {running} (it has: {}); build the \
         agent's initrd and the OS image from the same kernel package",
        if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        }
    )
}

/// The fstab of an OS without disks: the image's own names its disk partitions by UUID,
/// and systemd would wait for them and then drop to emergency mode.
pub fn write_ram_fstab(root: &Path) -> Result<()> {
    fs::write(
        root.join("etc/fstab"),
        "# Written by the Stork agent: this OS runs from RAM (SquashFS under a tmpfs overlay).\n",
    )
    .context("write etc/fstab")
}

/// Moves the API file systems into `new_root`, makes it `/` and execs its init as PID 1.
/// Returns only on failure.
pub fn switch_root(new_root: &Path) -> anyhow::Error {
    let init = c"/sbin/init".to_owned();
    switch_root_exec(new_root, &[init], None)
}

/// Moves the API file systems into `new_root`, makes it `/` and execs `argv[0]` (a path
/// inside the new root) as PID 1, with `env` or, when `None`, this process's environment.
/// Returns only on failure.
///
/// Works nested: from the initramfs (whose root cannot be pivot_root'ed away) and again
/// from a root that is itself a mount moved onto `/` (the ephemeral root of stage 2): the
/// moved mount then stacks on top of the old root, which stays mounted underneath.
pub fn switch_root_exec(
    new_root: &Path,
    argv: &[CString],
    env: Option<&[CString]>,
) -> anyhow::Error {
    match try_switch_root(new_root, argv, env) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The API file systems, moved from root to root.
const API_MOUNTS: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

fn try_switch_root(
    new_root: &Path,
    argv: &[CString],
    env: Option<&[CString]>,
) -> Result<std::convert::Infallible> {
    let program = argv.first().ok_or_else(|| anyhow!("nothing to exec"))?;
    for api in API_MOUNTS {
        let target = new_root.join(api.trim_start_matches('/'));
        fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
        mount(
            Some(api),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("move {api} to {}", target.display()))?;
    }
    nix::unistd::chdir(new_root).with_context(|| format!("chdir {}", new_root.display()))?;
    // What busybox switch_root does: the initramfs cannot be pivot_root'ed away.
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move the new root onto /")?;
    nix::unistd::chroot(".").context("chroot")?;
    nix::unistd::chdir("/").context("chdir /")?;
    let err = match env {
        Some(env) => nix::unistd::execve(program, argv, env),
        None => nix::unistd::execv(program, argv),
    };
    match err {
        Ok(never) => match never {},
        Err(e) => Err(anyhow!("exec {}: {e}", program.to_string_lossy())),
    }
}
