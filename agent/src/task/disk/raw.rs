//! Deploy to disk from the raw image: the GPT disk image streamed onto the chosen disk, its
//! backup GPT moved to the disk's end and its root partition grown, the seed written into
//! the root.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount, umount};
use stork_proto::blockmap::{BlockMap, Segment};
use stork_proto::{AgentEvent, ImageFile, StepState};

use crate::appliance::ApplianceClient;
use crate::console::{human_bytes, say};
use crate::deploy::block::{self, BlockDevice};
use crate::deploy::stream::Sink;
use crate::deploy::{download, mapped, stream};
use crate::step::{Failed, Step, at};
use crate::task::{DEV, Deployment, PROGRESS_EVERY, SYS, TARGET};

/// The raw disk image streamed on, its root grown, the seed written. Returns the disk and
/// its ESP's number.
pub fn to_disk(
    cx: &Deployment,
    raw: &ImageFile,
    map: Option<&ImageFile>,
) -> Result<(PathBuf, Option<u32>), Failed> {
    let client = cx.client;
    // The block map, when the image has one: fetched and checked against the raw file before
    // any disk is touched; it also gives the image's size.
    let mapped = match map {
        Some(m) => Some(at(Step::Image, mapped::fetch(m, raw).map_err(Into::into))?),
        None => None,
    };
    // Disk: choose it, wipe what was there.
    let image_size = match &mapped {
        Some((m, _)) => Some(m.image_size),
        None => stream::peek_size(&raw.url),
    };
    let mut dev = at(Step::Disk, cx.prepare_disk(image_size, "an image"))?;

    // Image: stream it on; after a failure (a checksum mismatch above all) nothing of it
    // may stay bootable.
    let mut tracked = Tracked {
        dev: &mut dev,
        end: 0,
    };
    let outcome = write_raw(client, raw, mapped.as_ref(), &mut tracked, image_size);
    let written = tracked.end;
    if let Err(reason) = outcome {
        // Nothing written (the download never started): the disk is as the Disk step left it.
        let error = if written == 0 {
            reason
        } else {
            super::wipe_after_failure(client, &mut dev, Some(written), &[], reason)
        };
        return Err(Failed {
            step: Step::Image,
            error,
        });
    }

    // Partitions: the kernel's view, the GPT grown to the disk, the root found.
    let root = at(Step::Partitions, partitions(client, &mut dev))?;
    // A root whose UUID another disk shares is refused, and not left bootable.
    if let Err(reason) = unique_root(&dev, &root) {
        let error = super::wipe_after_failure(client, &mut dev, Some(written), &[], reason);
        return Err(Failed {
            step: Step::Partitions,
            error,
        });
    }
    let esp = dev.esp_number();
    let disk_path = dev.path.clone();
    // Close the disk: while it is open with O_EXCL the kernel refuses to mount a partition.
    drop(dev);

    // Seed: the installed OS's configuration and phone-home.
    at(Step::Seed, write_seed(cx, &root))?;
    Ok((disk_path, esp))
}

/// The disk as the image's sink, remembering how far into it anything was written.
struct Tracked<'a> {
    dev: &'a mut BlockDevice,
    end: u64,
}

impl Sink for Tracked<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Before the write: one that fails half-way may still have written.
        self.end = self.end.max(offset + data.len() as u64);
        self.dev.write_at(offset, data)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.end = self.end.max(offset + len);
        self.dev.zero(offset, len)
    }

    fn capacity(&self) -> Option<u64> {
        self.dev.capacity()
    }

    fn sync(&mut self) -> io::Result<()> {
        self.dev.sync()
    }
}

fn write_raw(
    client: &ApplianceClient,
    raw: &ImageFile,
    mapped: Option<&(BlockMap, Vec<Segment>)>,
    dev: &mut Tracked,
    image_size: Option<u64>,
) -> Result<()> {
    client.step_event(
        Step::Image,
        StepState::Started,
        format!(
            "streaming {} ({}) to {}",
            raw.url,
            human_bytes(raw.size),
            dev.dev.path.display()
        ),
    );
    let start = Instant::now();
    let download = download::Download::new(&raw.url)?;
    let mut report = |p: &stream::Progress| {
        // Written of the decompressed size is the truer measure (the decoder reads ahead);
        // received of the file's size otherwise.
        let fraction = match image_size.filter(|n| *n > 0) {
            Some(n) => Some(p.written as f32 / n as f32),
            None => p
                .total
                .filter(|t| *t > 0)
                .map(|t| p.received as f32 / t as f32),
        };
        let message = format!(
            "{} received, {} written",
            human_bytes(p.received),
            human_bytes(p.written)
        );
        say!(Step::Image, "{message}");
        client.progress(&AgentEvent {
            step: Step::Image,
            state: StepState::Progress,
            message,
            progress: fraction,
            log_tail: None,
        });
    };
    let w = match mapped {
        // Gaps zeroed without decoding, frames decoded on every core.
        Some((map, segments)) => mapped::write_mapped(
            download,
            map,
            segments,
            &raw.sha256,
            dev,
            PROGRESS_EVERY,
            &mut report,
        )?,
        None => stream::write_image(
            download,
            &raw.sha256,
            raw.size,
            dev,
            PROGRESS_EVERY,
            &mut report,
        )?,
    };
    let secs = start.elapsed().as_secs_f64();
    client.step_event(Step::Image,
        StepState::Done,
        format!(
            "{} image written ({} of it zeroed, {} left as the disk had them, not written{}) from {} in {secs:.1} s ({:.0} MB/s), {} resumes, sha256 {} ok; time: waiting for the download {:.1} s, decompressing {:.1} s, writing {:.1} s, fsync {:.1} s",
            human_bytes(w.image_bytes),
            human_bytes(w.zeroed_bytes),
            human_bytes(w.left_bytes),
            if mapped.is_some() {
                ", by its block map"
            } else {
                ""
            },
            human_bytes(w.received),
            w.received as f64 / secs.max(0.001) / 1e6,
            w.resumes,
            w.sha256,
            w.spent.waiting.as_secs_f64(),
            w.spent.decoding.as_secs_f64(),
            w.spent.writing.as_secs_f64(),
            w.spent.syncing.as_secs_f64()
        ),
    );
    Ok(())
}

fn partitions(client: &ApplianceClient, dev: &mut BlockDevice) -> Result<String> {
    client.step_event(
        Step::Partitions,
        StepState::Started,
        format!(
            "re-reading {}'s partitions, growing the GPT",
            dev.path.display()
        ),
    );
    dev.reread_partitions()?;
    let grown = dev.grow_gpt()?;
    dev.reread_partitions()?;
    let name = dev
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let parts = block::partitions(Path::new(SYS), &name);
    if !block::wait_for_nodes(Path::new(DEV), &parts, Duration::from_secs(10)) {
        bail!("partition device nodes of {name} did not appear");
    }
    let root = block::find_root(Path::new(DEV), &name, &parts)?;
    client.step_event(
        Step::Partitions,
        StepState::Done,
        format!(
            "{} partitions; root {}{}",
            parts.len(),
            root.name,
            match grown {
                Some(b) => format!(
                    " grown to {} (its ext4 grows at first boot)",
                    human_bytes(b)
                ),
                None => " (not grown)".to_string(),
            }
        ),
    );
    Ok(root.name.clone())
}

/// Fails when a partition of another disk holds an ext4 file system with the UUID of the
/// root just written: the same raw image installed there before (released without an
/// erase). The image's GRUB, kernel command line and fstab find the root by that UUID, so
/// the installed OS could boot the other copy; peers ask for the same thing (a cleaning
/// between deploys). Tar and layout deploys make new file systems, with new UUIDs.
fn unique_root(dev: &BlockDevice, root: &str) -> Result<()> {
    let Some(uuid) = block::ext4_uuid(&Path::new(DEV).join(root)) else {
        return Ok(());
    };
    let disks: Vec<String> = crate::inventory::disks(Path::new(SYS))
        .into_iter()
        .map(|d| d.name)
        .collect();
    let name = dev
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let twins = block::ext4_twins(Path::new(SYS), Path::new(DEV), &disks, name, &uuid);
    if !twins.is_empty() {
        bail!(
            "{} on another disk holds a file system with the installed root's UUID (this \
             image, installed there before): the installed OS could mount it instead of its \
             own; erase that disk (release with erase) or deploy onto it",
            twins.join(", ")
        );
    }
    Ok(())
}

/// Mounts the raw image's root partition to write the seed into it.
fn write_seed(cx: &Deployment, root_part: &str) -> Result<()> {
    std::fs::create_dir_all(TARGET).with_context(|| format!("create {TARGET}"))?;
    let dev = Path::new(DEV).join(root_part);
    mount(
        Some(&dev),
        TARGET,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .with_context(|| format!("mount {} on {TARGET}", dev.display()))?;
    let written = cx.seed_into(Path::new(TARGET), root_part);
    nix::unistd::sync();
    let unmounted = umount(TARGET).with_context(|| format!("unmount {TARGET}"));
    written?;
    unmounted
}
