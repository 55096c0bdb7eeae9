//! Deploy into memory: the OS's root SquashFS is fetched into a tmpfs (sha256 checked as it
//! arrives), attached to a loop device, mounted read-only under an overlay whose upper layer
//! is tmpfs, given its seed there, and then the agent hands PID 1 over to its init: no disk is
//! touched.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use stork_proto::{AgentEvent, ImageFile, StepState};

use super::{Deployment, Ending, PROGRESS_EVERY, SYS};
use crate::appliance::ApplianceClient;
use crate::console::{human_bytes, say};
use crate::deploy::{download, ramroot, stream};
use crate::step::{Failed, Step, at};
use stork_proto::ImageRole;

/// Deploys into memory; on success never returns (the OS's init replaces the agent).
pub fn run(cx: &Deployment) -> Result<Ending, Failed> {
    let (client, args) = (cx.client, cx.args);
    let file = at(Step::Memory, cx.image_file(ImageRole::Squashfs))?;
    let root = at(Step::Memory, prepare_memory_root(client, file))?;
    at(
        Step::Seed,
        ramroot::write_ram_fstab(&root).and_then(|()| cx.seed_into(&root, "the in-memory root")),
    )?;
    client.step_event(
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
    let error = ramroot::switch_root(&root);
    // Still here: the switch failed. Back on the network so that the failure is reported.
    if let Some(name) = nic
        && let Err(e) = restore_boot_nic(&name, args)
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

/// Undoes [`release_boot_nic`] after a failed switch: an IPv4 address stayed, an IPv6 one
/// went with the link (the kernel drops them), and the default route went. By ioctl: /sys
/// may have moved into the new root.
fn restore_boot_nic(name: &str, args: &stork_proto::cmdline::AgentArgs) -> Result<()> {
    if let std::net::IpAddr::V6(ip) = args.ip {
        crate::net::Control6::new()?.add_address(name, ip, args.prefix_len)?;
    }
    crate::net::Control::new()?.set_up(name)?;
    if let Some(gw) = args.gateway {
        crate::net::add_default_route(name, gw)?;
    }
    Ok(())
}

fn prepare_memory_root(client: &ApplianceClient, file: &ImageFile) -> Result<PathBuf> {
    client.step_event(
        Step::Memory,
        StepState::Started,
        format!(
            "fetching {} ({}) into RAM",
            file.url,
            human_bytes(file.size)
        ),
    );
    let base = ramroot::mount_base()?;
    let image = base.join("root.squashfs");
    let mut sink =
        ramroot::FileSink::create(&image).with_context(|| format!("create {}", image.display()))?;
    let start = Instant::now();
    let download = download::Download::new(&file.url)?;
    let mut report = |p: &stream::Progress| {
        client.progress(&AgentEvent {
            step: Step::Memory,
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
    let loopdev = ramroot::attach_loop(&image)?;
    let root = ramroot::mount_overlay(&base, &loopdev)?;
    let kver = ramroot::kernel_matches(&root)?;
    client.step_event(Step::Memory,
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
mod tests {
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
