//! The agent's tasks beyond commissioning: deploy to disk from a raw image (or, with a
//! layout, from the root tar: [`extract`]), deploy into memory from a root SquashFS, and erase
//! on release. Each step is posted as an event when it starts and when it is done; a failure
//! is reported by the caller with the console's tail.

pub mod disk;
pub mod efi;
pub mod extract;
pub mod http;
pub mod memory;
pub mod prefetch;
pub mod seed;
pub mod stream;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::mount::{MsFlags, mount, umount};
use stork_proto::cmdline::AgentArgs;
use stork_proto::{AgentEvent, DeployTask, ImageFile, StepState};

use crate::console::{human_bytes, say};
use crate::init::{Failed, Step, at};
use crate::inventory;
use crate::report::Client;
use disk::BlockDevice;

/// How often a long step posts its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
const DEV: &str = "/dev";
const SYS: &str = "/sys";
/// Where the installed root is mounted: to write the seed, or to extract the root tar onto.
const TARGET: &str = "/mnt/target";

/// Image file roles, as registered with the boot resource.
pub const ROLE_RAW: &str = "raw";
pub const ROLE_SQUASHFS: &str = "squashfs";
pub const ROLE_TAR: &str = "tar";

/// How the agent's life ends once a task succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    PowerOff,
    /// Into the installed OS.
    Reboot,
}

/// Posts a step's start or end; best effort (the step's own outcome is what matters).
pub fn event(client: &Client, step: Step, state: StepState, message: String) {
    say!(step, "{message}");
    client.progress(&AgentEvent {
        step: step.name().to_string(),
        state,
        message,
        progress: None,
        log_tail: None,
    });
}

fn image_file<'a>(task: &'a DeployTask, role: &str) -> Result<&'a ImageFile> {
    task.image.iter().find(|f| f.role == role).ok_or_else(|| {
        let roles: Vec<&str> = task.image.iter().map(|f| f.role.as_str()).collect();
        anyhow!(
            "the image has no {role:?} file (it has: {})",
            if roles.is_empty() {
                "none".to_string()
            } else {
                roles.join(", ")
            }
        )
    })
}

/// Deploys to disk; returns how the agent ends (reboot into the installed OS).
pub fn to_disk(client: &Client, args: &AgentArgs, task: &DeployTask) -> Result<Ending, Failed> {
    let (Some(machine_id), Some(token)) = (&args.machine_id, &args.token) else {
        return Err(Failed {
            step: Step::Task,
            error: anyhow!("a deploy needs stork.machine and stork.token on the command line"),
        });
    };
    // A layout's partitions are not the raw image's; without a raw file the root tar is all
    // there is to install from.
    let raw = task.image.iter().find(|f| f.role == ROLE_RAW);
    let (disk_path, esp) = match (task.layout, raw) {
        (None, Some(raw)) => raw_to_disk(client, args, task, raw, machine_id, token)?,
        (layout, _) => {
            let tar = at(Step::Disk, image_file(task, ROLE_TAR))?;
            let layout = layout.unwrap_or_default();
            extract::to_disk(client, args, task, tar, layout, machine_id, token)?
        }
    };

    at(Step::BootEntry, boot_entry(client, &disk_path, esp))?;

    event(
        client,
        Step::Installed,
        StepState::Started,
        "telling the appliance: boot from disk from now on".into(),
    );
    at(Step::Installed, client.installed())?;
    event(
        client,
        Step::Installed,
        StepState::Done,
        "image installed; rebooting from disk".into(),
    );
    Ok(Ending::Reboot)
}

/// The raw disk image streamed on, its root grown, the seed written. Returns the disk and
/// its ESP's number.
fn raw_to_disk(
    client: &Client,
    args: &AgentArgs,
    task: &DeployTask,
    raw: &ImageFile,
    machine_id: &str,
    token: &str,
) -> Result<(std::path::PathBuf, Option<u32>), Failed> {
    // Disk: choose it, wipe what was there.
    let image_size = stream::peek_size(&raw.url);
    let mut dev = at(
        Step::Disk,
        prepare_disk(client, task, image_size, "an image"),
    )?;

    // Image: stream it on.
    at(Step::Image, write_raw(client, raw, &mut dev, image_size))?;

    // Partitions: the kernel's view, the GPT grown to the disk, the root found.
    let root = at(Step::Partitions, partitions(client, &mut dev))?;
    let esp = dev.esp_number();
    let disk_path = dev.path.clone();
    // Close the disk: while it is open with O_EXCL the kernel refuses to mount a partition.
    drop(dev);

    // Seed: the installed OS's configuration and phone-home.
    at(
        Step::Seed,
        write_seed(client, &root, task, args, machine_id, token),
    )?;
    Ok((disk_path, esp))
}

/// A UEFI machine gets a boot entry for the installed disk (after network boot).
fn boot_entry(client: &Client, disk: &Path, esp: Option<u32>) -> Result<()> {
    if !efi::is_uefi() {
        event(
            client,
            Step::BootEntry,
            StepState::Done,
            "BIOS: GRUB in the image's BIOS boot partition boots it".into(),
        );
        return Ok(());
    }
    event(
        client,
        Step::BootEntry,
        StepState::Started,
        format!("UEFI: boot entry for {}", disk.display()),
    );
    let Some(part) = esp else {
        bail!("UEFI machine, but the image's GPT has no EFI system partition");
    };
    // One label for whatever Stork installed: a redeploy replaces the entry, never adds one.
    let label = "Stork: installed OS";
    let message = match efi::add_boot_entry(disk, part, label)? {
        efi::Outcome::Added { entry, order } => {
            format!("UEFI entry Boot{entry} {label:?} on partition {part}; boot order {order}")
        }
        efi::Outcome::NoTool => "warning: no efibootmgr here (no ephemeral root); the firmware \
             boots the disk by its removable-media path"
            .to_string(),
    };
    event(client, Step::BootEntry, StepState::Done, message);
    Ok(())
}

/// Chooses the disk for `need` bytes (of `what`, for the event), opens it and wipes its old
/// signatures.
fn prepare_disk(
    client: &Client,
    task: &DeployTask,
    need: Option<u64>,
    what: &str,
) -> Result<BlockDevice> {
    let disks = inventory::disks(Path::new(SYS));
    let chosen = disk::choose(&disks, task.disk.as_deref(), need)?;
    event(
        client,
        Step::Disk,
        StepState::Started,
        format!(
            "target {} ({}){}",
            chosen.name,
            human_bytes(chosen.size_bytes),
            need.map_or_else(String::new, |n| format!(
                " for {what} of {}",
                human_bytes(n)
            ))
        ),
    );
    let mut dev = BlockDevice::open(Path::new(DEV), &chosen.name)?;
    let parts = disk::partitions(Path::new(SYS), &chosen.name);
    let size = dev.size();
    let n = disk::wipe_signatures(&mut dev, size, &parts)
        .with_context(|| format!("wiping signatures on {}", dev.path.display()))?;
    dev.reread_partitions()?;
    event(
        client,
        Step::Disk,
        StepState::Done,
        format!(
            "{}: {} old partitions, {n} signature areas zeroed",
            chosen.name,
            parts.len()
        ),
    );
    Ok(dev)
}

fn write_raw(
    client: &Client,
    raw: &ImageFile,
    dev: &mut BlockDevice,
    image_size: Option<u64>,
) -> Result<()> {
    event(
        client,
        Step::Image,
        StepState::Started,
        format!(
            "streaming {} ({}) to {}",
            raw.url,
            human_bytes(raw.size),
            dev.path.display()
        ),
    );
    let start = Instant::now();
    let download = stream::Download::new(&raw.url)?;
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
            step: Step::Image.name().to_string(),
            state: StepState::Progress,
            message,
            progress: fraction,
            log_tail: None,
        });
    };
    let w = stream::write_image(
        download,
        &raw.sha256,
        raw.size,
        dev,
        PROGRESS_EVERY,
        &mut report,
    )?;
    let secs = start.elapsed().as_secs_f64();
    event(
        client,
        Step::Image,
        StepState::Done,
        format!(
            "{} image written ({} of it zeroed, not written) from {} in {secs:.1} s ({:.0} MB/s), {} resumes, sha256 {} ok; time: waiting for the download {:.1} s, decompressing {:.1} s, writing {:.1} s, fsync {:.1} s",
            human_bytes(w.image_bytes),
            human_bytes(w.zeroed_bytes),
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

fn partitions(client: &Client, dev: &mut BlockDevice) -> Result<String> {
    event(
        client,
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
    let parts = disk::partitions(Path::new(SYS), &name);
    if !disk::wait_for_nodes(Path::new(DEV), &parts, Duration::from_secs(10)) {
        bail!("partition device nodes of {name} did not appear");
    }
    let root = disk::find_root(Path::new(DEV), &name, &parts)?;
    event(
        client,
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

/// Mounts the raw image's root partition to write the seed into it.
fn write_seed(
    client: &Client,
    root_part: &str,
    task: &DeployTask,
    args: &AgentArgs,
    id: &str,
    token: &str,
) -> Result<()> {
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
    let written = seed_into(client, Path::new(TARGET), root_part, task, args, id, token);
    nix::unistd::sync();
    let unmounted = umount(TARGET).with_context(|| format!("unmount {TARGET}"));
    written?;
    unmounted
}

/// The seed step on an installed root mounted at `root` (from partition `root_part`): the
/// NoCloud seed and phone-home, with the step's events. Both ways to disk end with it.
fn seed_into(
    client: &Client,
    root: &Path,
    root_part: &str,
    task: &DeployTask,
    args: &AgentArgs,
    id: &str,
    token: &str,
) -> Result<()> {
    event(
        client,
        Step::Seed,
        StepState::Started,
        format!("writing the NoCloud seed on {root_part}"),
    );
    let seed = seed::seed(task, id, args.boot_mac);
    seed::install(
        root,
        &seed,
        &seed::PhoneHome {
            url: &args.url,
            machine_id: id,
            token,
        },
    )
    .context("writing the seed")?;
    event(
        client,
        Step::Seed,
        StepState::Done,
        format!(
            "seed written: hostname {}, {} SSH keys",
            task.hostname,
            task.ssh_keys.len()
        ),
    );
    Ok(())
}

/// Wipes every disk: `quick` zeroes partition tables and signatures, else every byte.
pub fn erase(client: &Client, quick: bool) -> Result<Ending, Failed> {
    let disks = inventory::disks(Path::new(SYS));
    if disks.is_empty() {
        return Err(Failed {
            step: Step::Erase,
            error: disk::DiskError::NoDisks.into(),
        });
    }
    for d in &disks {
        at(Step::Erase, erase_one(client, &d.name, quick))?;
    }
    at(Step::Erase, client.released())?;
    event(
        client,
        Step::Erase,
        StepState::Done,
        format!("{} disks erased; released", disks.len()),
    );
    Ok(Ending::PowerOff)
}

fn erase_one(client: &Client, name: &str, quick: bool) -> Result<()> {
    let mut dev = BlockDevice::open(Path::new(DEV), name)?;
    let size = dev.size();
    let how = if quick { "quick" } else { "full" };
    event(
        client,
        Step::Erase,
        StepState::Started,
        format!("{how} erase of {name} ({})", human_bytes(size)),
    );
    let start = Instant::now();
    let parts = disk::partitions(Path::new(SYS), name);
    let n = disk::wipe_signatures(&mut dev, size, &parts)
        .with_context(|| format!("wiping signatures on {name}"))?;
    if !quick {
        zero_all(client, &mut dev, size)?;
    }
    dev.reread_partitions()?;
    event(
        client,
        Step::Erase,
        StepState::Done,
        format!(
            "{name}: {how} erase done in {:.1} s ({} partitions, {n} signature areas)",
            start.elapsed().as_secs_f64(),
            parts.len()
        ),
    );
    Ok(())
}

/// Zeroes the whole disk with BLKZEROOUT (offloaded when the device can), in slices so that
/// progress is reported.
fn zero_all(client: &Client, dev: &mut BlockDevice, size: u64) -> Result<()> {
    use stream::Sink;
    const SLICE: u64 = 1 << 30;
    let mut last = Instant::now();
    let mut off = 0;
    while off < size {
        let len = SLICE.min(size - off);
        dev.zero(off, len)
            .with_context(|| format!("zeroing {} from byte {off}", dev.path.display()))?;
        off += len;
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            client.progress(&AgentEvent {
                step: Step::Erase.name().to_string(),
                state: StepState::Progress,
                message: format!("{} of {} zeroed", human_bytes(off), human_bytes(size)),
                progress: Some(off as f32 / size as f32),
                log_tail: None,
            });
        }
    }
    dev.sync().context("fsync")?;
    Ok(())
}

/// Deploys into memory; on success never returns (the OS's init replaces the agent).
pub fn to_memory(client: &Client, args: &AgentArgs, task: &DeployTask) -> Result<Ending, Failed> {
    let (Some(machine_id), Some(token)) = (&args.machine_id, &args.token) else {
        return Err(Failed {
            step: Step::Task,
            error: anyhow!("a deploy needs stork.machine and stork.token on the command line"),
        });
    };
    let file = at(Step::Memory, image_file(task, ROLE_SQUASHFS))?;
    let root = at(Step::Memory, prepare_memory_root(client, file))?;
    at(
        Step::Seed,
        memory::write_ram_fstab(&root).and_then(|()| {
            seed_into(
                client,
                &root,
                "the in-memory root",
                task,
                args,
                machine_id,
                token,
            )
        }),
    )?;
    event(
        client,
        Step::Memory,
        StepState::Done,
        "handing over to the OS's init".into(),
    );
    // The agent is gone once its init runs: no heartbeat is due until the OS phones home.
    if let Err(e) = client.hand_over() {
        say!(Step::Memory, "warning: hand-over not acknowledged: {e:#}");
    }
    // The last use of the network: the OS configures the NIC itself.
    let nic = match release_boot_nic(Path::new(SYS), args.boot_mac) {
        Ok(name) => {
            say!(Step::Memory, "boot NIC {name} down for the OS to configure");
            Some(name)
        }
        Err(e) => {
            say!(
                Step::Memory,
                "warning: boot NIC left up ({e:#}); the OS's udev cannot rename it and \
                 its network-online may wait for its timeout"
            );
            None
        }
    };
    nix::unistd::sync();
    let error = memory::switch_root(&root);
    // Still here: the switch failed. Back on the network so that the failure is reported.
    if let Some(name) = nic
        && let Err(e) = restore_boot_nic(&name, args.gateway)
    {
        say!(Step::Memory, "warning: boot NIC {name} not back up: {e:#}");
    }
    Err(Failed {
        step: Step::Memory,
        error,
    })
}

/// `IFF_UP` (<linux/if.h>) in a link's flags.
const IFF_UP: u32 = libc::IFF_UP as u32;

/// Takes the boot NIC down before the OS's init starts, so that the OS finds it as after a
/// power-on (as a disk deploy's OS does). It may not find it up: the OS's udev renames it
/// (`eth0` -> `ens3`), the kernel refuses to rename a link that is up (EBUSY), and udev 252
/// (Debian 12) then leaves `ID_RENAMING=1` in its database, so systemd-networkd waits for
/// the rename forever (link `pending`) and `systemd-networkd-wait-online` times out.
///
/// Down through sysfs, whose `flags` file is writable (the kernel's `dev_change_flags`):
/// no ioctl needed. The IPv4 address stays and the routes go; systemd-networkd drops the
/// address as foreign and takes the same one by DHCP (the appliance leases by MAC). Returns
/// the NIC's name.
fn release_boot_nic(sys: &Path, mac: stork_proto::MacAddr) -> Result<String> {
    let class_net = sys.join("class/net");
    let name = crate::net::find_by_mac(&class_net, mac)
        .ok_or_else(|| anyhow!("no NIC with MAC {mac} in {}", class_net.display()))?;
    let file = class_net.join(&name).join("flags");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    let flags = parse_link_flags(&text)
        .ok_or_else(|| anyhow!("{}: not link flags: {text:?}", file.display()))?;
    if flags & IFF_UP != 0 {
        std::fs::write(&file, format!("{:#x}", flags & !IFF_UP))
            .with_context(|| format!("write {}", file.display()))?;
    }
    Ok(name)
}

/// A sysfs `flags` file's text: hexadecimal with `0x`.
fn parse_link_flags(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().strip_prefix("0x")?, 16).ok()
}

/// Undoes [`release_boot_nic`] after a failed switch (the address stayed; the default route
/// went down with the link). By ioctl: /sys may have moved into the new root.
fn restore_boot_nic(name: &str, gateway: Option<std::net::Ipv4Addr>) -> Result<()> {
    let ctl = crate::net::Control::new()?;
    ctl.set_up(name)?;
    if let Some(gw) = gateway {
        ctl.add_default_route(gw)?;
    }
    Ok(())
}

fn prepare_memory_root(client: &Client, file: &ImageFile) -> Result<std::path::PathBuf> {
    event(
        client,
        Step::Memory,
        StepState::Started,
        format!(
            "fetching {} ({}) into RAM",
            file.url,
            human_bytes(file.size)
        ),
    );
    let base = memory::mount_base()?;
    let image = base.join("root.squashfs");
    let mut sink =
        memory::FileSink::create(&image).with_context(|| format!("create {}", image.display()))?;
    let start = Instant::now();
    let download = stream::Download::new(&file.url)?;
    let mut report = |p: &stream::Progress| {
        client.progress(&AgentEvent {
            step: Step::Memory.name().to_string(),
            state: StepState::Progress,
            message: format!("{} received", human_bytes(p.received)),
            progress: p
                .total
                .filter(|t| *t > 0)
                .map(|t| p.received as f32 / t as f32),
            log_tail: None,
        });
    };
    let w = stream::write_image(
        download,
        &file.sha256,
        file.size,
        &mut sink,
        PROGRESS_EVERY,
        &mut report,
    )?;
    drop(sink);
    let loopdev = memory::attach_loop(&image)?;
    let root = memory::mount_overlay(&base, &loopdev)?;
    let kver = memory::kernel_matches(&root)?;
    event(
        client,
        Step::Memory,
        StepState::Progress,
        format!(
            "{} fetched in {:.1} s, sha256 {} ok; mounted from {} under a tmpfs overlay; modules for {kver} present",
            human_bytes(w.received),
            start.elapsed().as_secs_f64(),
            w.sha256,
            loopdev.display()
        ),
    );
    Ok(root)
}

#[cfg(test)]
mod handover_tests {
    use super::*;

    #[test]
    fn link_flags_parse_as_sysfs_writes_them() {
        assert_eq!(parse_link_flags("0x1003\n"), Some(0x1003));
        assert_eq!(parse_link_flags("0x9"), Some(9));
        assert_eq!(parse_link_flags("4099"), None);
        assert_eq!(parse_link_flags(""), None);
    }

    #[test]
    fn the_boot_nic_goes_down_keeping_its_other_flags() {
        let sys = tempfile::tempdir().unwrap();
        let net = sys.path().join("class/net");
        for (name, mac, flags) in [
            ("eth0", "52:54:00:77:00:01", "0x1003"),
            ("eth1", "52:54:00:77:00:02", "0x1003"),
        ] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            std::fs::write(net.join(name).join("address"), format!("{mac}\n")).unwrap();
            std::fs::write(net.join(name).join("flags"), format!("{flags}\n")).unwrap();
        }
        let mac = "52:54:00:77:00:02".parse().unwrap();
        assert_eq!(release_boot_nic(sys.path(), mac).unwrap(), "eth1");
        // UP cleared; BROADCAST and MULTICAST kept; the other NIC untouched.
        let flags = |n: &str| std::fs::read_to_string(net.join(n).join("flags")).unwrap();
        assert_eq!(flags("eth1"), "0x1002");
        assert_eq!(flags("eth0"), "0x1003\n");
        // Already down: nothing written.
        assert_eq!(release_boot_nic(sys.path(), mac).unwrap(), "eth1");
        assert_eq!(flags("eth1"), "0x1002");

        let other = "52:54:00:77:00:09".parse().unwrap();
        assert!(release_boot_nic(sys.path(), other).is_err());
    }
}
