//! Deploy to disk by extraction: the agent partitions the chosen disk by the request's layout,
//! makes the file systems and extracts the image's root tar onto them, then makes the result
//! bootable. Used when the request asks for a layout (a raw image's partitions are fixed) or
//! the image has no raw file.
//!
//! 1. **Disk** (as for a raw image): the requested disk or the smallest that holds the layout;
//!    old signatures wiped.
//! 2. **Partitions**: a fresh GPT by `sgdisk` ([`stork_proto::layout`]: 1 BIOS boot, 2 ESP,
//!    3 root), the kernel's view re-read and checked against the layout, the first and last
//!    MiB of the new partitions zeroed (an earlier layout's file systems may start or end
//!    there), `mkfs.vfat -F 32` and `mkfs.ext4`.
//! 3. **Image**: the root mounted at [`TARGET`]; the tar streamed from the appliance through
//!    [`Download`] (sha256 in line, `Range` resume after a cut) on its own thread
//!    ([`Prefetched`]), decompressed here and piped into `tar -x`. The sum is checked once the
//!    last byte is in: a mismatch fails with both sums, ahead of any error of tar's.
//! 4. **Bootloader**: the ESP mounted at `boot/efi` (after the extraction: tar would try to
//!    set the mode of the mount point, which FAT refuses; an image keeps nothing there, GRUB
//!    is installed onto it next); fstab by UUID (`blkid`); a root of fixed size told to
//!    cloud-init (no growpart); grub.cfg in the shape `stork-image` writes for the raw image
//!    (root by UUID, `/vmlinuz` and `/initrd.img`, the image's own kernel command line from
//!    its `/etc/default/grub`); `grub-install` for i386-pc (core.img in the BIOS boot
//!    partition) and x86_64-efi (the removable-media path, no NVRAM: the boot entry step
//!    makes the entry), both from the image's own GRUB modules when it has them.
//! 5. **Seed**: as for a raw image, into the mounted root; then everything is unmounted.
//!
//! Every tool's failure is an error with the command and the tail of its output.

use std::cell::Cell;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use stork_proto::cmdline::AgentArgs;
use stork_proto::layout::{BIOS_BOOT_MIB, MIN_ROOT_MIB};
use stork_proto::{AgentEvent, DeployTask, DiskLayout, ImageFile, StepState};

use super::disk::{self, BlockDevice, Partition};
use super::prefetch::Prefetched;
use super::stream::{CHUNK, Download, Sink, StreamError};
use super::{DEV, PROGRESS_EVERY, SYS, TARGET, event};
use crate::console::{human_bytes, say};
use crate::init::{Failed, Step, at};
use crate::report::Client;

const MIB: u64 = 1 << 20;
/// GPT partition numbers of the layout.
const BIOS_PART: u32 = 1;
pub const ESP_PART: u32 = 2;
const ROOT_PART: u32 = 3;
/// Lines of a failed tool's output kept in the error.
const TOOL_TAIL_LINES: usize = 12;
/// A compressed root tar holds about three times its size in files (Debian: 221 MiB of zstd,
/// 755 MiB of tar); four times is the least root that a disk chosen for it should offer.
const TAR_EXPANSION: u64 = 4;
/// Read by cloud-init after the image's own `99_stork.cfg`.
const FIXED_ROOT_CFG: &str = "etc/cloud/cloud.cfg.d/99_stork_layout.cfg";

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{tool} is not here: installing from a root tar needs the ephemeral root's tools")]
    Missing {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}):\n{tail}")]
    Tool {
        command: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("after partitioning, {disk} has {found}; the layout wants {want}")]
    Layout {
        disk: String,
        found: String,
        want: String,
    },
    #[error("no UUID on {device} after mkfs (blkid said {said:?})")]
    NoUuid { device: String, said: String },
    #[error("decompressing the root tar at tar byte {offset}")]
    Decode {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("feeding tar at tar byte {offset}")]
    Pipe {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("reading the rest of the root tar")]
    Rest(#[source] io::Error),
    #[error("the image has no kernel to boot: neither /vmlinuz nor /boot/vmlinuz-*")]
    NoKernel,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ExtractError + 'a {
    move |source| ExtractError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The partitions made, by kernel name (`vda2`, `nvme0n1p3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub esp: String,
    pub root: String,
}

/// Installs `tar` on a disk partitioned by `layout`. Returns the disk and its ESP's number
/// for the boot entry step.
pub fn to_disk(
    client: &Client,
    args: &AgentArgs,
    task: &DeployTask,
    tar: &ImageFile,
    layout: DiskLayout,
    machine_id: &str,
    token: &str,
) -> Result<(PathBuf, Option<u32>), Failed> {
    let need = layout.min_disk_bytes(root_floor_mib(tar.size));
    let mut dev = at(
        Step::Disk,
        super::prepare_disk(client, task, Some(need), "a layout"),
    )?;

    let parts = at(Step::Partitions, partition(client, &mut dev, &layout))?;
    let disk_path = dev.path.clone();
    // Close the disk: while it is open with O_EXCL, mkfs and mount refuse its partitions.
    drop(dev);
    at(Step::Partitions, make_file_systems(client, &parts))?;

    let target = Path::new(TARGET);
    let root = at(
        Step::Image,
        Mounted::new(&Path::new(DEV).join(&parts.root), target, "ext4"),
    )?;
    at(Step::Image, extract(client, tar, target))?;

    let esp = at(
        Step::Bootloader,
        Mounted::new(
            &Path::new(DEV).join(&parts.esp),
            &target.join("boot/efi"),
            "vfat",
        ),
    )?;
    at(
        Step::Bootloader,
        bootloader(client, &disk_path, &parts, &layout, target),
    )?;

    at(
        Step::Seed,
        super::seed_into(client, target, &parts.root, task, args, machine_id, token),
    )?;
    at(Step::Seed, esp.unmount().and_then(|()| root.unmount()))?;
    Ok((disk_path, Some(ESP_PART)))
}

/// The least root partition a disk is chosen for when the layout leaves the root's size to
/// the disk, in MiB.
pub fn root_floor_mib(tar_size: u64) -> u64 {
    (tar_size.saturating_mul(TAR_EXPANSION).div_ceil(MIB)).max(MIN_ROOT_MIB)
}

/// sgdisk's arguments: a new GPT with the layout's three partitions, MiB-aligned.
pub fn sgdisk_args(disk: &Path, layout: &DiskLayout) -> Vec<OsString> {
    let size = |mib: Option<u64>| match mib {
        Some(m) => format!("+{m}MiB"),
        // 0 as the end: the largest free block, here the rest of the disk.
        None => "0".to_string(),
    };
    let mut args: Vec<OsString> = [
        "--clear".to_string(),
        "--set-alignment=2048".to_string(),
        format!("--new={BIOS_PART}:1MiB:+{BIOS_BOOT_MIB}MiB"),
        format!("--typecode={BIOS_PART}:EF02"),
        format!("--change-name={BIOS_PART}:bios"),
        format!("--new={ESP_PART}:0:{}", size(Some(layout.esp()))),
        format!("--typecode={ESP_PART}:EF00"),
        format!("--change-name={ESP_PART}:esp"),
        format!("--new={ROOT_PART}:0:{}", size(layout.root_mib)),
        format!("--typecode={ROOT_PART}:8304"),
        format!("--change-name={ROOT_PART}:root"),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(disk.as_os_str().to_owned());
    args
}

/// Checks the kernel's view of the new table against the layout; returns the ESP and root.
pub fn check_partitions(
    disk: &str,
    parts: &[Partition],
    layout: &DiskLayout,
) -> Result<Parts, ExtractError> {
    let want = [
        (BIOS_PART, Some(BIOS_BOOT_MIB)),
        (ESP_PART, Some(layout.esp())),
        (ROOT_PART, layout.root_mib),
    ];
    let describe_want = || {
        want.iter()
            .map(|(n, mib)| match mib {
                Some(m) => format!("{n}: {m} MiB"),
                None => format!("{n}: the rest"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = || {
        if parts.is_empty() {
            "no partitions".to_string()
        } else {
            parts
                .iter()
                .map(|p| format!("{}: {} MiB", p.number, p.size_bytes / MIB))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let ok = parts.len() == want.len()
        && want.iter().all(|(n, mib)| {
            parts.iter().any(|p| {
                p.number == *n && mib.is_none_or(|m| p.size_bytes == m * MIB) && p.size_bytes > 0
            })
        });
    let name = |n: u32| parts.iter().find(|p| p.number == n).map(|p| p.name.clone());
    match (ok, name(ESP_PART), name(ROOT_PART)) {
        (true, Some(esp), Some(root)) => Ok(Parts { esp, root }),
        _ => Err(ExtractError::Layout {
            disk: disk.to_string(),
            found: found(),
            want: describe_want(),
        }),
    }
}

fn partition(client: &Client, dev: &mut BlockDevice, layout: &DiskLayout) -> Result<Parts> {
    let name = dev
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let root = layout
        .root_mib
        .map_or_else(|| "the rest".to_string(), |m| format!("{m} MiB"));
    event(
        client,
        Step::Partitions,
        StepState::Started,
        format!(
            "GPT on {name}: BIOS boot {BIOS_BOOT_MIB} MiB, ESP {} MiB, root {root}",
            layout.esp()
        ),
    );
    run(Command::new("sgdisk").args(sgdisk_args(&dev.path, layout)))?;
    // sgdisk asks for a re-read too, but only warns when it fails: ours is checked.
    dev.reread_partitions()?;
    let found = disk::partitions(Path::new(SYS), &name);
    let parts = check_partitions(&name, &found, layout)?;
    if !disk::wait_for_nodes(Path::new(DEV), &found, Duration::from_secs(10)) {
        return Err(anyhow!("partition device nodes of {name} did not appear"));
    }
    // An earlier layout's file system or RAID member may start or end where a new partition
    // does; mkfs writes its own areas only, and blkid would then find two.
    for p in &found {
        let len = MIB.min(p.size_bytes);
        for offset in [p.start_bytes, p.start_bytes + p.size_bytes - len] {
            dev.zero(offset, len)
                .with_context(|| format!("zeroing {} at byte {offset}", dev.path.display()))?;
        }
    }
    dev.sync()
        .with_context(|| format!("fsync {}", dev.path.display()))?;
    Ok(parts)
}

fn make_file_systems(client: &Client, parts: &Parts) -> Result<()> {
    let esp = Path::new(DEV).join(&parts.esp);
    let root = Path::new(DEV).join(&parts.root);
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP"])
        .arg(&esp))?;
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q", "-L", "root"])
        .arg(&root))?;
    event(
        client,
        Step::Partitions,
        StepState::Done,
        format!(
            "GPT written; FAT32 on {}, ext4 on {}",
            parts.esp, parts.root
        ),
    );
    Ok(())
}

/// Runs a tool to completion; its failure carries the command and its output's tail.
fn run(cmd: &mut Command) -> Result<String, ExtractError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    crate::console::line(&format!("$ {command}"));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ExtractError::Missing {
                tool: tool.clone(),
                source,
            },
            _ => ExtractError::Spawn {
                tool: tool.clone(),
                source,
            },
        })?;
    if !out.status.success() {
        return Err(ExtractError::Tool {
            command,
            status: out.status,
            tail: output_tail(&out.stdout, &out.stderr, TOOL_TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of stderr, else of stdout (some tools say why on stdout).
pub fn output_tail(stdout: &[u8], stderr: &[u8], n: usize) -> String {
    let pick = if String::from_utf8_lossy(stderr).trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let text = String::from_utf8_lossy(pick);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(no output)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A mount that is undone when dropped (after a failure), or by [`Mounted::unmount`].
struct Mounted {
    path: PathBuf,
    active: bool,
}

impl Mounted {
    fn new(device: &Path, at: &Path, fstype: &str) -> Result<Self> {
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

    fn unmount(mut self) -> Result<()> {
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

/// Counts the compressed bytes the decoder has taken, for progress.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// The compression of a root tar, by its magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarFormat {
    Zstd,
    Xz,
    Gzip,
    /// Uncompressed (or something tar will refuse with its own message).
    Plain,
}

pub fn sniff(head: &[u8]) -> TarFormat {
    if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        TarFormat::Zstd
    } else if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        TarFormat::Xz
    } else if head.starts_with(&[0x1F, 0x8B, 0x08]) {
        TarFormat::Gzip
    } else {
        TarFormat::Plain
    }
}

/// How feeding tar ended.
enum Pumped {
    /// The decoder reached its end.
    Done,
    /// Reading failed: the download (a [`StreamError`] inside) or the decoder.
    Read(io::Error),
    /// Writing to tar failed; a broken pipe means tar exited (its status says why).
    Write(io::Error),
}

/// What [`extract`] did.
#[derive(Debug)]
struct Extracted {
    received: u64,
    tar_bytes: u64,
    resumes: u32,
    sha256: String,
    secs: f64,
}

fn extract(client: &Client, tar: &ImageFile, target: &Path) -> Result<()> {
    event(
        client,
        Step::Image,
        StepState::Started,
        format!(
            "extracting {} ({}) into {}",
            tar.url,
            human_bytes(tar.size),
            target.display()
        ),
    );
    let x = stream_into_tar(client, tar, target)?;
    event(
        client,
        Step::Image,
        StepState::Done,
        format!(
            "{} of tar extracted from {} in {:.1} s ({:.0} MB/s), {} resumes, sha256 {} ok",
            human_bytes(x.tar_bytes),
            human_bytes(x.received),
            x.secs,
            x.received as f64 / x.secs.max(0.001) / 1e6,
            x.resumes,
            x.sha256
        ),
    );
    Ok(())
}

fn stream_into_tar(
    client: &Client,
    file: &ImageFile,
    target: &Path,
) -> Result<Extracted, ExtractError> {
    let start = Instant::now();
    let download = Download::new(&file.url)?;
    let mut child = Command::new("tar")
        .args([
            "-x",
            "-p",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-f",
            "-",
            "-C",
        ])
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ExtractError::Missing {
                tool: "tar".into(),
                source,
            },
            _ => ExtractError::Spawn {
                tool: "tar".into(),
                source,
            },
        })?;
    // Read tar's messages as they come: a full stderr pipe would stop tar, and then us.
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            // Best effort: what tar managed to say is still worth showing.
            let _ = e.read_to_end(&mut text);
            text
        })
    });
    let mut prefetched = Prefetched::start(download);
    let consumed = Rc::new(Cell::new(0u64));
    let mut tar_bytes = 0u64;
    let pumped = {
        let input = BufReader::with_capacity(
            CHUNK,
            Counted {
                inner: &mut prefetched,
                count: Rc::clone(&consumed),
            },
        );
        match child.stdin.take() {
            Some(stdin) => pump(input, stdin, &mut tar_bytes, &mut |bytes| {
                report(client, consumed.get(), file.size, bytes);
            }),
            None => Pumped::Write(io::ErrorKind::BrokenPipe.into()),
        }
    };
    // stdin is closed: tar sees the end of its input.
    let status = child.wait().map_err(|source| ExtractError::Spawn {
        tool: "tar".into(),
        source,
    })?;
    let said = stderr
        .and_then(|t| t.join().ok())
        .map(|e| output_tail(&[], &e, TOOL_TAIL_LINES))
        .unwrap_or_default();

    // Blame in order: the download, a file that is not the registered one, then the decoder
    // and tar (a corrupt file makes both fail, and the sum says why).
    let pumped = match pumped {
        Pumped::Read(e) => Pumped::Read(take_stream_error(e)?),
        other => other,
    };
    // The rest of the file, whatever tar and the decoder took: the sum covers every byte.
    let download = match prefetched.finish() {
        Ok(d) => d,
        Err(e) => {
            return Err(match take_stream_error(e) {
                Ok(source) => ExtractError::Rest(source),
                Err(se) => se,
            });
        }
    };
    let actual = download.sha256_hex();
    if !actual.eq_ignore_ascii_case(file.sha256.trim()) {
        return Err(StreamError::Checksum {
            expected: file.sha256.trim().to_string(),
            actual,
            bytes: download.received(),
        }
        .into());
    }
    if file.size > 0 && download.received() != file.size {
        return Err(StreamError::Size {
            expected: file.size,
            actual: download.received(),
        }
        .into());
    }
    match pumped {
        Pumped::Read(source) => {
            return Err(ExtractError::Decode {
                offset: tar_bytes,
                source,
            });
        }
        // tar stopped reading: at its end-of-archive blocks (then it succeeded) or on an error.
        Pumped::Write(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Pumped::Write(source) => {
            return Err(ExtractError::Pipe {
                offset: tar_bytes,
                source,
            });
        }
        Pumped::Done => {}
    }
    if !status.success() {
        return Err(ExtractError::Tool {
            command: format!("tar -x -C {}", target.display()),
            status,
            tail: if said.is_empty() {
                "(no output)".into()
            } else {
                said
            },
        });
    }
    nix::unistd::sync();
    Ok(Extracted {
        received: download.received(),
        tar_bytes,
        resumes: download.resumes,
        sha256: actual,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// A download error travels through the decoder inside an `io::Error`: take it back out
/// (as the error to return), or give the `io::Error` back.
fn take_stream_error(e: io::Error) -> Result<io::Error, ExtractError> {
    if !e.get_ref().is_some_and(|inner| inner.is::<StreamError>()) {
        return Ok(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<StreamError>()) {
        Some(Ok(se)) => Err(ExtractError::Stream(*se)),
        Some(Err(other)) => Ok(io::Error::new(kind, other)),
        None => Ok(kind.into()),
    }
}

fn report(client: &Client, received: u64, total: u64, tar_bytes: u64) {
    let message = format!(
        "{} of {} received, {} of tar extracted",
        human_bytes(received),
        human_bytes(total),
        human_bytes(tar_bytes)
    );
    say!(Step::Image, "{message}");
    client.progress(&AgentEvent {
        step: Step::Image.name().to_string(),
        state: StepState::Progress,
        message,
        progress: (total > 0).then(|| (received as f32 / total as f32).min(1.0)),
        log_tail: None,
    });
}

/// Decompresses `input` (by its magic number) into tar's stdin, calling `progress` every
/// [`PROGRESS_EVERY`] with the tar bytes written.
fn pump(
    mut input: impl BufRead,
    mut stdin: impl Write,
    written: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Pumped {
    let head = match input.fill_buf() {
        Ok(h) => h,
        Err(e) => return Pumped::Read(e),
    };
    let mut decoder: Box<dyn Read + '_> = match sniff(head) {
        TarFormat::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => return Pumped::Read(e),
        },
        TarFormat::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(input)),
        TarFormat::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        TarFormat::Plain => Box::new(input),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut last = Instant::now();
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Pumped::Done,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Pumped::Read(e),
        };
        if let Err(e) = stdin.write_all(&buf[..n]) {
            return Pumped::Write(e);
        }
        *written += n as u64;
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            progress(*written);
        }
    }
}

/// `/etc/fstab` of the installed system: both file systems by UUID, as the raw image's.
pub fn fstab(root_uuid: &str, esp_uuid: &str) -> String {
    format!(
        "# Written by the Stork agent (installed from the root tar).
UUID={root_uuid} / ext4 errors=remount-ro 0 1
UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 2
"
    )
}

/// `/boot/grub/grub.cfg`, in the shape `stork-image` writes for the raw image
/// (image-builder/src/grub.rs): GRUB on console and serial, the root by UUID.
pub fn grub_cfg(title: &str, root_uuid: &str, cmdline: &str, kernel: &str, initrd: &str) -> String {
    let args = if cmdline.is_empty() {
        String::new()
    } else {
        format!(" {cmdline}")
    };
    format!(
        "# Written by the Stork agent. Regenerate with grub-mkconfig (it reads /etc/default/grub)
# if you prefer.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
set default=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry '{title}' {{
    insmod all_video
    insmod gzio
    linux {kernel} root=UUID={root_uuid} ro{args}
    initrd {initrd}
}}
"
    )
}

/// The image's kernel command line: `GRUB_CMDLINE_LINUX` and `GRUB_CMDLINE_LINUX_DEFAULT`
/// from its `/etc/default/grub`, else the arguments of its grub.cfg's first `linux` line
/// (less `root=` and `ro`, which we set). Empty when neither says.
pub fn kernel_cmdline(default_grub: Option<&str>, grub_cfg: Option<&str>) -> String {
    if let Some(text) = default_grub {
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .next_back()
                .map(unquote)
        };
        let (linux, default) = (
            value("GRUB_CMDLINE_LINUX"),
            value("GRUB_CMDLINE_LINUX_DEFAULT"),
        );
        if linux.is_some() || default.is_some() {
            return [linux, default]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    grub_cfg
        .and_then(|cfg| {
            cfg.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("linux")
                    .filter(|r| r.starts_with([' ', '\t']))
            })
        })
        .map(|rest| {
            rest.split_whitespace()
                .skip(1)
                .filter(|w| !w.starts_with("root=") && *w != "ro" && *w != "rw")
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// A shell value as `/etc/default/grub` writes it: `"..."`, `'...'` or bare.
fn unquote(v: &str) -> String {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.trim().to_string();
        }
    }
    v.to_string()
}

/// The kernel and initrd grub.cfg boots, as paths on the root: Debian's `/vmlinuz` and
/// `/initrd.img` symlinks (kept on the newest kernel by linux-base, so an upgrade needs no new
/// grub.cfg), else the newest `/boot/vmlinuz-*` and its initrd.
pub fn boot_files(root: &Path) -> Result<(String, String), ExtractError> {
    if fs::symlink_metadata(root.join("vmlinuz")).is_ok() {
        return Ok(("/vmlinuz".into(), "/initrd.img".into()));
    }
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .map_err(io_err("read", &boot))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .collect();
    versions.sort_by(|a, b| version_order(a, b));
    let v = versions.pop().ok_or(ExtractError::NoKernel)?;
    Ok((
        format!("/boot/vmlinuz-{v}"),
        format!("/boot/initrd.img-{v}"),
    ))
}

/// Kernel versions compared by their numbers (`6.1.0-9` < `6.1.0-10`), then as text.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let nums = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    nums(a).cmp(&nums(b)).then_with(|| a.cmp(b))
}

/// The menu entry's title: `PRETTY_NAME` from os-release.
pub fn os_title(os_release: Option<&str>) -> String {
    os_release
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(unquote)
        })
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('\'', ""))
        .unwrap_or_else(|| "Installed OS".to_string())
}

/// The `UUID` line of `blkid -o export`.
pub fn parse_blkid_uuid(export: &str) -> Option<String> {
    export
        .lines()
        .find_map(|l| l.trim().strip_prefix("UUID="))
        .map(str::to_string)
        .filter(|u| !u.is_empty())
}

fn blkid_uuid(device: &Path) -> Result<String, ExtractError> {
    // -p: probe the device itself; there is no udev and no blkid cache to trust here.
    let out = run(Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device))?;
    parse_blkid_uuid(&out).ok_or_else(|| ExtractError::NoUuid {
        device: device.display().to_string(),
        said: out.trim().to_string(),
    })
}

/// A root of fixed size stays that size: cloud-init would otherwise grow the partition and
/// its file system to the disk at every boot.
pub fn fixed_root_cfg() -> String {
    "# Written by the Stork agent: the deploy asked for a root partition of fixed size.\n\
     {\"growpart\": {\"mode\": \"off\"}, \"resize_rootfs\": false}\n"
        .to_string()
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), ExtractError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    fs::write(path, text).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn bootloader(
    client: &Client,
    disk: &Path,
    parts: &Parts,
    layout: &DiskLayout,
    target: &Path,
) -> Result<()> {
    event(
        client,
        Step::Bootloader,
        StepState::Started,
        format!(
            "fstab, grub.cfg, GRUB for BIOS and UEFI on {}",
            disk.display()
        ),
    );
    let root_uuid = blkid_uuid(&Path::new(DEV).join(&parts.root))?;
    let esp_uuid = blkid_uuid(&Path::new(DEV).join(&parts.esp))?;
    write_file(
        &target.join("etc/fstab"),
        &fstab(&root_uuid, &esp_uuid),
        0o644,
    )?;
    if layout.root_mib.is_some() {
        write_file(&target.join(FIXED_ROOT_CFG), &fixed_root_cfg(), 0o644)?;
    }

    let read = |rel: &str| fs::read_to_string(target.join(rel)).ok();
    let cmdline = kernel_cmdline(
        read("etc/default/grub").as_deref(),
        read("boot/grub/grub.cfg").as_deref(),
    );
    let (kernel, initrd) = boot_files(target)?;
    let title = os_title(
        read("etc/os-release")
            .or_else(|| read("usr/lib/os-release"))
            .as_deref(),
    );

    let boot = target.join("boot");
    let grub_install = |platform: &str, extra: &[OsString]| -> Result<(), ExtractError> {
        let mut cmd = Command::new("grub-install");
        cmd.arg(format!("--target={platform}"))
            .arg(flag("--boot-directory", &boot));
        // The image's own GRUB, so that its modules and core image match the GRUB packages
        // the installed OS updates; else the ephemeral root's.
        let modules = target.join("usr/lib/grub").join(platform);
        if modules.join("modinfo.sh").is_file() {
            cmd.arg(flag("--directory", &modules));
        }
        run(cmd.args(extra)).map(drop)
    };
    grub_install("i386-pc", &[disk.as_os_str().to_owned()])?;
    grub_install(
        "x86_64-efi",
        &[
            flag("--efi-directory", &target.join("boot/efi")),
            "--removable".into(),
            "--no-nvram".into(),
        ],
    )?;
    write_file(
        &target.join("boot/grub/grub.cfg"),
        &grub_cfg(&title, &root_uuid, &cmdline, &kernel, &initrd),
        0o644,
    )?;
    event(
        client,
        Step::Bootloader,
        StepState::Done,
        format!(
            "root UUID {root_uuid}, ESP {esp_uuid}; GRUB i386-pc in {}{BIOS_PART} and x86_64-efi \
             at EFI/BOOT/BOOTX64.EFI; boots {kernel} with {cmdline:?}",
            disk.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
    );
    Ok(())
}

fn flag(name: &str, path: &Path) -> OsString {
    let mut s = OsString::from(format!("{name}="));
    s.push(path.as_os_str());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, mib: u64) -> Partition {
        Partition {
            name: format!("vda{number}"),
            number,
            start_bytes: 0,
            size_bytes: mib * MIB,
            label: None,
        }
    }

    #[test]
    fn sgdisk_gets_the_three_partitions_of_the_layout() {
        let args = |l: DiskLayout| -> Vec<String> {
            sgdisk_args(Path::new("/dev/vda"), &l)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        let fixed = args(DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(2048),
        });
        assert_eq!(
            fixed,
            [
                "--clear",
                "--set-alignment=2048",
                "--new=1:1MiB:+1MiB",
                "--typecode=1:EF02",
                "--change-name=1:bios",
                "--new=2:0:+256MiB",
                "--typecode=2:EF00",
                "--change-name=2:esp",
                "--new=3:0:+2048MiB",
                "--typecode=3:8304",
                "--change-name=3:root",
                "/dev/vda",
            ]
        );
        let rest = args(DiskLayout::default());
        assert!(rest.contains(&"--new=2:0:+512MiB".to_string()), "{rest:?}");
        assert!(rest.contains(&"--new=3:0:0".to_string()), "{rest:?}");
    }

    #[test]
    fn the_kernels_view_must_match_the_layout() {
        let l = DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(2048),
        };
        let good = [part(1, 1), part(2, 256), part(3, 2048)];
        assert_eq!(
            check_partitions("vda", &good, &l).unwrap(),
            Parts {
                esp: "vda2".into(),
                root: "vda3".into()
            }
        );
        let e = check_partitions("vda", &[part(1, 1), part(2, 256), part(3, 1000)], &l)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3: 1000 MiB") && e.contains("3: 2048 MiB"),
            "{e}"
        );
        let e = check_partitions("vda", &[], &l).unwrap_err().to_string();
        assert!(e.contains("no partitions"), "{e}");
        // A root of the rest of the disk: any size.
        let rest = DiskLayout {
            esp_mib: Some(256),
            root_mib: None,
        };
        assert!(check_partitions("vda", &[part(1, 1), part(2, 256), part(3, 3800)], &rest).is_ok());
        assert!(
            check_partitions(
                "vda",
                &[part(1, 1), part(2, 256), part(3, 3800), part(4, 1)],
                &rest
            )
            .is_err()
        );
    }

    #[test]
    fn the_floor_of_a_root_that_takes_the_rest() {
        assert_eq!(root_floor_mib(0), MIN_ROOT_MIB);
        assert_eq!(root_floor_mib(300 * MIB), 1200);
        assert_eq!(root_floor_mib(u64::MAX), u64::MAX.div_ceil(MIB));
    }

    #[test]
    fn fstab_and_grub_cfg_name_the_file_systems_by_uuid() {
        let f = fstab("0d1e2f3a-1111-4222-8333-444455556666", "ABCD-1234");
        let lines: Vec<&str> = f.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "UUID=0d1e2f3a-1111-4222-8333-444455556666 / ext4 errors=remount-ro 0 1",
                "UUID=ABCD-1234 /boot/efi vfat umask=0077,nofail 0 2",
            ]
        );
        let cfg = grub_cfg(
            "Debian GNU/Linux 12 (bookworm)",
            "0d1e2f3a-1111-4222-8333-444455556666",
            "console=tty0 console=ttyS0,115200n8",
            "/vmlinuz",
            "/initrd.img",
        );
        assert!(cfg.contains(
            "search --no-floppy --fs-uuid --set=root 0d1e2f3a-1111-4222-8333-444455556666\n"
        ));
        assert!(cfg.contains(
            "    linux /vmlinuz root=UUID=0d1e2f3a-1111-4222-8333-444455556666 ro console=tty0 console=ttyS0,115200n8\n"
        ));
        assert!(cfg.contains("    initrd /initrd.img\n"));
        assert!(cfg.contains("menuentry 'Debian GNU/Linux 12 (bookworm)' {"));
        assert!(cfg.contains("serial --unit=0 --speed=115200"));
        let bare = grub_cfg("x", "u", "", "/vmlinuz", "/initrd.img");
        assert!(bare.contains("root=UUID=u ro\n"), "{bare}");
    }

    #[test]
    fn the_kernel_command_line_comes_from_the_image() {
        let default_grub = "GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT=\"\"\n\
                            GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200n8\"\n";
        assert_eq!(
            kernel_cmdline(Some(default_grub), None),
            "console=tty0 console=ttyS0,115200n8"
        );
        assert_eq!(
            kernel_cmdline(
                Some("GRUB_CMDLINE_LINUX='a=1'\nGRUB_CMDLINE_LINUX_DEFAULT=quiet\n"),
                None
            ),
            "a=1 quiet"
        );
        let cfg = "search --set=root x\nmenuentry 'D' {\n    linux /vmlinuz root=UUID=x ro console=ttyS0 quiet\n    initrd /initrd.img\n}\n";
        assert_eq!(
            kernel_cmdline(Some("GRUB_TIMEOUT=1\n"), Some(cfg)),
            "console=ttyS0 quiet"
        );
        assert_eq!(kernel_cmdline(None, None), "");
        // `linux16` and the like are not the kernel line.
        assert_eq!(kernel_cmdline(None, Some("linuxefi /x a\n")), "");
    }

    #[test]
    fn boot_files_prefer_the_symlinks_then_the_newest_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("boot")).unwrap();
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            fs::write(root.join(format!("boot/vmlinuz-{v}")), "").unwrap();
        }
        assert_eq!(
            boot_files(root).unwrap(),
            (
                "/boot/vmlinuz-6.1.0-10-amd64".to_string(),
                "/boot/initrd.img-6.1.0-10-amd64".to_string()
            )
        );
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-9-amd64", root.join("vmlinuz")).unwrap();
        assert_eq!(
            boot_files(root).unwrap(),
            ("/vmlinuz".to_string(), "/initrd.img".to_string())
        );
        let empty = tempfile::tempdir().unwrap();
        fs::create_dir_all(empty.path().join("boot")).unwrap();
        assert!(matches!(
            boot_files(empty.path()),
            Err(ExtractError::NoKernel)
        ));
    }

    #[test]
    fn small_parsers() {
        assert_eq!(
            parse_blkid_uuid("DEVNAME=/dev/vda2\nUUID=ABCD-1234\nTYPE=vfat\n"),
            Some("ABCD-1234".into())
        );
        assert_eq!(parse_blkid_uuid("TYPE=vfat\nPART_ENTRY_UUID=x\n"), None);
        assert_eq!(
            os_title(Some(
                "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"
            )),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(os_title(Some("PRETTY_NAME='It''s'\n")), "Its");
        assert_eq!(os_title(None), "Installed OS");
        assert_eq!(output_tail(b"", b"", 3), "(no output)");
        assert_eq!(output_tail(b"out\n", b"\n", 3), "out");
        assert_eq!(output_tail(b"out", b"a\nb\n\nc\nd\n", 3), "b\nc\nd");
        assert_eq!(sniff(&[0x28, 0xB5, 0x2F, 0xFD, 0]), TarFormat::Zstd);
        assert_eq!(sniff(b"./etc\0"), TarFormat::Plain);
        let cfg = fixed_root_cfg();
        let json = cfg.lines().nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["growpart"]["mode"], "off");
        assert_eq!(v["resize_rootfs"], false);
    }

    /// Serves `file` over HTTP/1.1 with Range; the first `cuts` connections end after
    /// `cut_at` bytes of body. Returns the URL and the start offsets asked for.
    fn serve(
        file: Vec<u8>,
        cuts: usize,
        cut_at: usize,
    ) -> (String, std::thread::JoinHandle<Vec<u64>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/boot/root.tar.zst",
            listener.local_addr().unwrap()
        );
        let handle = std::thread::spawn(move || {
            let mut starts = Vec::new();
            for (i, conn) in listener.incoming().enumerate() {
                let mut conn = conn.unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut from = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Range: bytes=") {
                        from = v.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                starts.push(from as u64);
                let body = &file[from..];
                let head = if from > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                        body.len(),
                        file.len() - 1,
                        file.len()
                    )
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                };
                let send = if i < cuts {
                    cut_at.min(body.len())
                } else {
                    body.len()
                };
                // The client may hang up first; that is its business.
                let _ = conn
                    .write_all(head.as_bytes())
                    .and_then(|()| conn.write_all(&body[..send]));
                if i >= cuts {
                    break;
                }
            }
            starts
        });
        (url, handle)
    }

    /// A root tree as `tar -c | zstd`, with data zstd cannot shrink to nothing.
    fn root_tar() -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("etc")).unwrap();
        fs::write(src.path().join("etc/hostname"), "image\n").unwrap();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..3 * CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(src.path().join("blob"), &noise).unwrap();
        std::os::unix::fs::symlink("etc/hostname", src.path().join("link")).unwrap();
        let out = Command::new("tar")
            .args(["-c", "-f", "-", "-C"])
            .arg(src.path())
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success());
        zstd::encode_all(&out.stdout[..], 1).unwrap()
    }

    fn image_file(url: &str, data: &[u8], sha256: Option<&str>) -> ImageFile {
        use sha2::Digest;
        ImageFile {
            role: "tar".into(),
            url: url.into(),
            sha256: sha256.map_or_else(|| hex::encode(sha2::Sha256::digest(data)), String::from),
            size: data.len() as u64,
        }
    }

    /// No identity: progress events go nowhere.
    fn quiet_client() -> Client {
        Client::new("http://127.0.0.1:9")
    }

    #[test]
    fn the_root_tar_streams_into_tar_and_resumes_after_a_cut() {
        let tar = root_tar();
        let (url, server) = serve(tar.clone(), 1, tar.len() / 3);
        let target = tempfile::tempdir().unwrap();
        let x = stream_into_tar(
            &quiet_client(),
            &image_file(&url, &tar, None),
            target.path(),
        )
        .unwrap();
        assert_eq!(x.received, tar.len() as u64);
        assert_eq!(x.resumes, 1);
        assert!(x.tar_bytes > 3 * CHUNK as u64);
        assert_eq!(
            fs::read_to_string(target.path().join("etc/hostname")).unwrap(),
            "image\n"
        );
        assert_eq!(
            fs::metadata(target.path().join("blob")).unwrap().len(),
            3 * CHUNK as u64
        );
        assert_eq!(
            fs::read_link(target.path().join("link")).unwrap(),
            Path::new("etc/hostname")
        );
        let starts = server.join().unwrap();
        assert_eq!(starts, [0, (tar.len() / 3) as u64]);
    }

    #[test]
    fn a_wrong_sum_fails_with_both_sums_and_a_bad_archive_with_tars_words() {
        let tar = root_tar();
        let wrong = "0".repeat(64);
        let (url, server) = serve(tar.clone(), 0, 0);
        let target = tempfile::tempdir().unwrap();
        let e = stream_into_tar(
            &quiet_client(),
            &image_file(&url, &tar, Some(&wrong)),
            target.path(),
        )
        .unwrap_err();
        let right = image_file(&url, &tar, None).sha256;
        let m = e.to_string();
        assert!(
            m.contains("sha256 mismatch") && m.contains(&wrong) && m.contains(&right),
            "{m}"
        );
        server.join().unwrap();

        // The registered bytes, but not a tar: tar's own complaint is the error.
        let junk = zstd::encode_all(&[b'x'; 10_000][..], 1).unwrap();
        let (url, server) = serve(junk.clone(), 0, 0);
        let e = stream_into_tar(
            &quiet_client(),
            &image_file(&url, &junk, None),
            target.path(),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, ExtractError::Tool { .. }), "{m}");
        assert!(m.contains("tar -x") && m.contains("tar:"), "{m}");
        server.join().unwrap();
    }

    /// A tar writer that stops reading early, as tar does at its end-of-archive blocks.
    struct ShortPipe(usize);
    impl Write for ShortPipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pump_decompresses_by_magic_and_tells_a_broken_pipe() {
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        let zst = zstd::encode_all(&data[..], 3).unwrap();
        let mut out = Vec::new();
        let mut n = 0;
        let r = pump(&zst[..], &mut out, &mut n, &mut |_| {});
        assert!(matches!(r, Pumped::Done));
        assert_eq!(out, data);
        assert_eq!(n, data.len() as u64);

        let mut n = 0;
        let r = pump(&data[..], ShortPipe(CHUNK), &mut n, &mut |_| {});
        assert!(matches!(r, Pumped::Write(e) if e.kind() == io::ErrorKind::BrokenPipe));
        assert_eq!(n, CHUNK as u64);

        let mut bad = zst.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xFF;
        bad.truncate(mid + 10);
        let r = pump(&bad[..], io::sink(), &mut 0, &mut |_| {});
        assert!(matches!(r, Pumped::Read(_)));
    }
}
