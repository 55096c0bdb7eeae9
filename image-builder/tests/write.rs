//! `stork-image write` against a real loop device (as root; skipped otherwise): a small GPT
//! image goes onto a 64 MiB loop device filled with a byte pattern. A mounted partition of the
//! device, an image larger than it, and a missing `--yes` without a terminal are refused with
//! nothing written; the raw image, its `.raw.zst` and an image that ends inside a sector are
//! written, verified and read back byte for byte. The disk behind `/` is refused.
//!
//! The mounted partition is `/dev/loopNp1` where the kernel parses partition tables; kernels
//! built without (`CONFIG_EFI_PARTITION` unset, as in some VMs) get a "loop partition" instead,
//! a second loop device over the first at the partition's offset, which is what
//! `mount -o loop,offset=` makes of a stick too.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const DEVICE_MIB: usize = 64;
/// What the device holds before each write, so a skipped byte shows.
const PATTERN: u8 = 0xa5;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Why this machine cannot run the loop-device test, if it cannot.
fn skip_reason(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("needs root (loop devices, mount)".into());
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    (!missing.is_empty()).then(|| format!("missing tools: {}", missing.join(" ")))
}

/// Runs a helper tool, failing with its output.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Outcome {
    ok: bool,
    stderr: String,
}

/// The real binary, stdin not a terminal; its stderr goes to the test log.
fn stork<S: AsRef<OsStr>>(args: &[S]) -> Result<Outcome> {
    let out = Command::new(env!("CARGO_BIN_EXE_stork-image"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .context("running stork-image")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "--- stork-image {:?}\n{stderr}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>()
    );
    Ok(Outcome {
        ok: out.status.success(),
        stderr,
    })
}

/// The loop device and what the test stacked on it, undone on drop (also after a failed
/// assertion): the mount, the loop partition, the device.
struct LoopDisk {
    dev: PathBuf,
    /// A loop device over `dev` standing in for a partition.
    loop_part: Option<PathBuf>,
    mounted: Option<PathBuf>,
}

impl LoopDisk {
    fn attach(backing: &Path) -> Result<Self> {
        let dev = run(Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(backing))?;
        Ok(Self {
            dev: PathBuf::from(dev),
            loop_part: None,
            mounted: None,
        })
    }

    /// Partition 1 (starting at `offset`, `len` bytes): the kernel's node, else a loop
    /// partition.
    fn partition(&mut self, offset: usize, len: usize) -> Result<PathBuf> {
        let node = PathBuf::from(format!("{}p1", self.dev.display()));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            if fs::metadata(&node).is_ok_and(|m| m.file_type().is_block_device()) {
                eprintln!("partition: {} (the kernel's)", node.display());
                return Ok(node);
            }
            sleep(Duration::from_millis(50));
        }
        let part = PathBuf::from(run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(format!("--offset={offset}"))
            .arg(format!("--sizelimit={len}"))
            .arg(&self.dev))?);
        eprintln!(
            "partition: {} (a loop partition: this kernel made no {})",
            part.display(),
            node.display()
        );
        self.loop_part = Some(part.clone());
        Ok(part)
    }

    fn mount(&mut self, part: &Path, dir: &Path) -> Result<()> {
        run(Command::new("mount").arg(part).arg(dir))?;
        self.mounted = Some(dir.to_owned());
        Ok(())
    }

    /// Unmounts and removes the loop partition.
    fn release(&mut self) -> Result<()> {
        if let Some(dir) = self.mounted.take() {
            run(Command::new("umount").arg(&dir))?;
        }
        if let Some(part) = self.loop_part.take() {
            run(Command::new("losetup").arg("-d").arg(&part))?;
        }
        Ok(())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if let Some(dir) = self.mounted.take()
            && run(Command::new("umount").arg(&dir)).is_err()
        {
            let _ = run(Command::new("umount").arg("-l").arg(&dir));
        }
        if let Some(part) = self.loop_part.take() {
            let _ = run(Command::new("losetup").arg("-d").arg(&part));
        }
        if let Err(e) = run(Command::new("losetup").arg("-d").arg(&self.dev)) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An 8 MiB GPT disk image: one FAT partition at 1 MiB, and a marker after it so the image is
/// not mostly what mkfs wrote.
fn build_image(path: &Path) -> Result<Vec<u8>> {
    File::create(path)?.set_len(8 * MIB as u64)?;
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+4M", "-t", "1:0700", "-c", "1:data"])
        .arg(path))?;
    run(Command::new("mkfs.vfat")
        .args(["-n", "STORKTEST", "--offset", "2048"])
        .arg(path)
        .arg("4096"))?;
    let mut f = File::options().write(true).open(path)?;
    f.seek(SeekFrom::Start(6 * MIB as u64))?;
    f.write_all(&[0x5a; 4096])?;
    drop(f);
    Ok(fs::read(path)?)
}

/// Overwrites the first `len` bytes of the device with the pattern.
fn scribble(dev: &Path, len: usize) -> Result<()> {
    let mut f = File::options().write(true).open(dev)?;
    f.write_all(&vec![PATTERN; len])?;
    f.sync_all()?;
    Ok(())
}

fn expect_written(out: &Outcome, dev: &Path, image: &[u8], before: &[u8]) -> Result<()> {
    ensure!(out.ok, "the write failed:\n{}", out.stderr);
    let sha = sha256_hex(image);
    ensure!(
        out.stderr.contains(&format!("sha256 written   {sha}"))
            && out.stderr.contains(&format!("sha256 read back {sha}")),
        "no sha256 lines for {sha}:\n{}",
        out.stderr
    );
    let now = fs::read(dev)?;
    ensure!(now.len() == before.len(), "device size changed");
    ensure!(
        now[..image.len()] == *image,
        "{} does not read back as the image",
        dev.display()
    );
    ensure!(
        now[image.len()..] == before[image.len()..],
        "{} changed after the image's end",
        dev.display()
    );
    Ok(())
}

fn expect_refused(out: &Outcome, why: &str, dev: &Path, before: &[u8]) -> Result<()> {
    ensure!(!out.ok, "not refused (expected: {why})");
    ensure!(
        out.stderr.contains(why),
        "refused, but not for {why:?}:\n{}",
        out.stderr
    );
    ensure!(
        fs::read(dev)? == before,
        "{} changed although the write was refused",
        dev.display()
    );
    Ok(())
}

#[test]
fn writes_a_loop_device_and_refuses_what_it_must() -> Result<()> {
    if let Some(why) = skip_reason(&["losetup", "sgdisk", "mkfs.vfat", "mke2fs", "mount"]) {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("disk.raw");
    let image = build_image(&img)?;

    // The device: the pattern, an old GPT and an ext4 partition at 1 MiB.
    let backing = tmp.path().join("device");
    fs::write(&backing, vec![PATTERN; DEVICE_MIB * MIB])?;
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+16M"])
        .arg(&backing))?;
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "offset=1048576"])
        .arg(&backing)
        .arg("16M"))?;
    let mut disk = LoopDisk::attach(&backing)?;
    let dev = disk.dev.clone();

    // 1. A partition is mounted: refused, the mount point named, nothing written.
    let part = disk.partition(MIB, 16 * MIB)?;
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt)?;
    disk.mount(&part, &mnt)?;
    let before = fs::read(&dev)?;
    let out = stork(&[
        OsStr::new("write"),
        img.as_os_str(),
        dev.as_os_str(),
        OsStr::new("--yes"),
    ])?;
    expect_refused(
        &out,
        &format!("is mounted on {}", mnt.display()),
        &dev,
        &before,
    )?;

    // 2. Unmounted: written, verified, the same bytes on the device.
    disk.release()?;
    let before = fs::read(&dev)?;
    let out = stork(&[
        OsStr::new("write"),
        img.as_os_str(),
        dev.as_os_str(),
        OsStr::new("--yes"),
    ])?;
    expect_written(&out, &dev, &image, &before)?;
    // The file hash reads a block device whole (its metadata's length is 0).
    let (len, sum) = stork_image::manifest::sha256_file(&dev)?;
    let now = fs::read(&dev)?;
    ensure!(
        (len, sum.as_str()) == (now.len() as u64, sha256_hex(&now).as_str()),
        "sha256_file of {} gave {len} bytes, {sum}",
        dev.display()
    );

    // 3. The .raw.zst of the same image, onto the pattern again.
    scribble(&dev, image.len())?;
    let before = fs::read(&dev)?;
    let zst = tmp.path().join("disk.raw.zst");
    stork_image::disk::compress(&img, &zst, 3)?;
    let out = stork(&[
        OsStr::new("write"),
        zst.as_os_str(),
        dev.as_os_str(),
        OsStr::new("--yes"),
    ])?;
    expect_written(&out, &dev, &image, &before)?;

    // An image that ends inside a sector: its last bytes go through the page cache.
    let odd: Vec<u8> = (0..3 * MIB + 1234).map(|i| (i % 253) as u8).collect();
    let odd_path = tmp.path().join("odd.raw");
    fs::write(&odd_path, &odd)?;
    let before = fs::read(&dev)?;
    let out = stork(&[
        OsStr::new("write"),
        odd_path.as_os_str(),
        dev.as_os_str(),
        OsStr::new("--yes"),
    ])?;
    expect_written(&out, &dev, &odd, &before)?;

    // 4. An image larger than the device: refused.
    let big = tmp.path().join("big.raw");
    File::create(&big)?.set_len((DEVICE_MIB * MIB + 512) as u64)?;
    let before = fs::read(&dev)?;
    let out = stork(&[
        OsStr::new("write"),
        big.as_os_str(),
        dev.as_os_str(),
        OsStr::new("--yes"),
    ])?;
    expect_refused(&out, "the image is larger than", &dev, &before)?;

    // 5. No --yes and stdin not a terminal: refused rather than waiting.
    let out = stork(&[OsStr::new("write"), img.as_os_str(), dev.as_os_str()])?;
    expect_refused(&out, "stdin is not a terminal", &dev, &before)?;
    Ok(())
}

/// The whole disk behind `/` (or, where `/` is not on a block device, behind any mount),
/// as a node: `/dev/<name>` if that is it, else one made in `dir`.
fn system_disk(dir: &Path) -> Result<Option<(PathBuf, bool)>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mounts: Vec<(String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(2)?.to_string(), f.get(4)?.to_string()))
        })
        .filter(|(dev, _)| Path::new("/sys/dev/block").join(dev).exists())
        .collect();
    let Some((dev, mount_point)) = mounts
        .iter()
        .find(|(_, m)| m == "/")
        .or_else(|| mounts.first())
    else {
        return Ok(None);
    };
    let mut sys = fs::canonicalize(Path::new("/sys/dev/block").join(dev))?;
    if sys.join("partition").exists() {
        sys = sys.parent().context("partition without disk")?.to_owned();
    }
    let name = sys.file_name().context("sysfs name")?.to_owned();
    let number = fs::read_to_string(sys.join("dev"))?.trim().to_owned();
    let (major, minor) = number.split_once(':').context("dev")?;
    let (major, minor): (u32, u32) = (major.parse()?, minor.parse()?);
    let rdev = libc::makedev(major, minor);
    let node = Path::new("/dev").join(&name);
    let node =
        if fs::metadata(&node).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev) {
            node
        } else {
            let made = dir.join(&name);
            run(Command::new("mknod")
                .arg(&made)
                .arg("b")
                .arg(major.to_string())
                .arg(minor.to_string()))?;
            made
        };
    eprintln!(
        "system disk: {} (holds {mount_point}, {number})",
        node.display()
    );
    Ok(Some((node, mount_point == "/")))
}

#[test]
fn refuses_the_system_disk() -> Result<()> {
    if let Some(why) = skip_reason(&["mknod"]) {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let Some((node, is_root_fs)) = system_disk(tmp.path())? else {
        eprintln!("skipped: no mount here is on a block device");
        return Ok(());
    };
    let img = tmp.path().join("small.raw");
    fs::write(&img, vec![0u8; 4096])?;
    // Without --yes and with stdin not a terminal, nothing can ever be written, even if the
    // check under test were broken: the refusal must still be the system disk's.
    let out = stork(&[OsStr::new("write"), img.as_os_str(), node.as_os_str()])?;
    ensure!(!out.ok, "not refused");
    let why = if is_root_fs {
        "holds the running system: / is mounted from"
    } else {
        "holds the running system"
    };
    ensure!(
        out.stderr.contains(why) || (!is_root_fs && out.stderr.contains("is in use")),
        "refused, but not because it is the system disk:\n{}",
        out.stderr
    );
    Ok(())
}

/// `--allow-file` writes into an existing file, and only with it; no root needed.
#[test]
fn writes_a_file_only_with_allow_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("img.raw");
    let image: Vec<u8> = (0..MIB + 77).map(|i| (i % 241) as u8).collect();
    fs::write(&img, &image)?;
    let target = tmp.path().join("target.img");
    fs::write(&target, vec![PATTERN; 2 * MIB])?;
    let before = fs::read(&target)?;

    let out = stork(&[
        OsStr::new("write"),
        img.as_os_str(),
        target.as_os_str(),
        OsStr::new("--yes"),
    ])?;
    expect_refused(&out, "not a block device (--allow-file", &target, &before)?;

    let out = stork(&[
        OsStr::new("write"),
        img.as_os_str(),
        target.as_os_str(),
        OsStr::new("--yes"),
        OsStr::new("--allow-file"),
    ])?;
    expect_written(&out, &target, &image, &before)?;
    Ok(())
}
