//! Deploying to disk with a layout of the request's own, on a SeaBIOS VM powered through its
//! BMC: `stork machine deploy --esp-mib 256 --root-mib 2048` makes the agent partition the
//! 4 GiB disk itself (BIOS boot, ESP, root), make the file systems, extract the image's root
//! tar onto them, write fstab by UUID, install GRUB for BIOS and UEFI and the seed; its reboot
//! resets the VM in place and SeaBIOS boots the disk through the GRUB the agent installed;
//! cloud-init phones home: Deployed. Over SSH: the partition sizes asked for (the root not
//! grown to the disk), `/` ext4 by UUID in fstab, the ESP mounted on `/boot/efi`, the hostname.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use stork_lab::{VmSpec, wait_for};
use stork_proto::api::Status;
use stork_tests::deploy::{IMAGE, Scenario, USER};

const MIB: u64 = 1 << 20;
const ESP_MIB: u64 = 256;
const ROOT_MIB: u64 = 2048;
const HOSTNAME: &str = "stork-e2e-layout";

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn seabios_vm_deploys_debian_from_the_root_tar_onto_the_requested_layout_and_logs_in() {
    let mut spec = VmSpec::new("vm1", "52:54:00:77:01:21");
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.disk_bytes = 4 << 30;
    let mut s = Scenario::new("deploy-layout", spec, None).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        s.commission(&id)?;
        deploy_with_layout(&mut s, &id)?;
        check_installed(&s, &id)
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!(
        "phases (SeaBIOS, to disk from the root tar):\n{}",
        s.timings()
    );
}

/// Allocates and deploys with the layout; Stork powers the VM on through its BMC. Waits for
/// the agent's `installed` and then, after the reboot in place, for Deployed.
fn deploy_with_layout(s: &mut Scenario, id: &str) -> Result<()> {
    s.appliance.cli(&["machine", "allocate", id])?;
    s.phase_start();
    s.appliance.cli(&[
        "machine",
        "deploy",
        id,
        "--image",
        IMAGE,
        "--hostname",
        HOSTNAME,
        "--esp-mib",
        &ESP_MIB.to_string(),
        "--root-mib",
        &ROOT_MIB.to_string(),
    ])?;
    let m = s.status(id)?;
    let root_mib = m.deploy.as_ref().and_then(|d| d.layout?.root_mib);
    if m.status != Status::Deploying || root_mib != Some(ROOT_MIB) {
        bail!(
            "after `machine deploy` the status is {} with deploy {:?}",
            m.status,
            m.deploy
        );
    }
    let pid = wait_for(
        "Stork to power the VM on through its BMC",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok(s.machine.qemu_pid()),
    )?;
    let power_ons = s.machine.power_ons();
    s.say(&format!(
        "deploy with a layout requested; Stork powered the VM on (QEMU pid {pid})"
    ));

    s.install_and_reboot_in_place(
        id,
        pid,
        power_ons,
        "deploy (power-on to installed, by extraction)",
    )?;
    Ok(())
}

/// What the installed system says about itself over SSH, and what the agent reported.
fn check_installed(s: &Scenario, id: &str) -> Result<()> {
    let ip = s.leased_ip()?;
    let name = s.ssh_when_up(&ip, "hostname")?;
    if name.trim() != HOSTNAME {
        bail!("the deployed machine says its hostname is {name:?}, asked for {HOSTNAME:?}");
    }

    let root = mount_of(s, &ip, "/")?;
    let esp = mount_of(s, &ip, "/boot/efi")?;
    if root.fstype != "ext4" || esp.fstype != "vfat" {
        bail!("/ is {root:?} and /boot/efi is {esp:?}: wanted ext4 and vfat");
    }
    let disk = root
        .source
        .trim_start_matches("/dev/")
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string();
    let parts = lsblk(s, &ip, &disk)?;
    let size_of = |n: u32| {
        parts
            .iter()
            .find(|p| p["name"] == format!("{disk}{n}"))
            // A number in lsblk's JSON since util-linux 2.33, a string before.
            .and_then(|p| {
                p["size"]
                    .as_u64()
                    .or_else(|| p["size"].as_str()?.parse().ok())
            })
    };
    let want = [(1, MIB), (2, ESP_MIB * MIB), (3, ROOT_MIB * MIB)];
    for (n, bytes) in want {
        if size_of(n) != Some(bytes) {
            bail!(
                "partition {n} of {disk} is {:?} bytes, wanted {bytes}: {parts:#?}",
                size_of(n)
            );
        }
    }
    if root.source != format!("/dev/{disk}3") || esp.source != format!("/dev/{disk}2") {
        bail!(
            "/ on {}, /boot/efi on {}: wanted partitions 3 and 2",
            root.source,
            esp.source
        );
    }

    // fstab names / and /boot/efi by the UUIDs their file systems have.
    let uuid_of = |n: u32| {
        parts
            .iter()
            .find(|p| p["name"] == format!("{disk}{n}"))
            .and_then(|p| p["uuid"].as_str())
            .filter(|u| !u.is_empty())
            .map(str::to_string)
    };
    let fstab = s.ssh(&ip, "cat /etc/fstab")?;
    let entries: Vec<Vec<&str>> = fstab
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .filter(|w: &Vec<&str>| w.len() >= 3)
        .collect();
    for (n, mountpoint, fstype) in [(3, "/", "ext4"), (2, "/boot/efi", "vfat")] {
        let uuid = uuid_of(n).with_context(|| format!("no UUID for partition {n}: {parts:#?}"))?;
        let want = format!("UUID={uuid}");
        if !entries
            .iter()
            .any(|w| w[0] == want && w[1] == mountpoint && w[2] == fstype)
        {
            bail!("fstab lacks `{want} {mountpoint} {fstype}`:\n{fstab}");
        }
    }

    // The file system fills its partition (less ext4's own metadata): mkfs got the partition
    // the layout asked for, and the partition's size (checked above) was not grown after.
    let df = s.ssh(&ip, "df -B1 --output=size / | tail -1")?;
    let fs_bytes: u64 = df
        .trim()
        .parse()
        .with_context(|| format!("df said {df:?}"))?;
    if fs_bytes < ROOT_MIB * MIB / 100 * 85 {
        bail!(
            "the root file system is {fs_bytes} bytes, far less than its {ROOT_MIB} MiB partition"
        );
    }
    s.say(&format!(
        "ssh {USER}@{ip}: hostname {HOSTNAME}; {disk}1 1 MiB, {disk}2 {ESP_MIB} MiB vfat on /boot/efi, \
         {disk}3 {ROOT_MIB} MiB ext4 on / ({fs_bytes} bytes); fstab by UUID"
    ));

    let events = s.appliance.cli(&["machine", "events", id])?;
    for want in [
        "of tar extracted",
        "bootloader Done",
        "DeploymentDone: deploying -> deployed",
    ] {
        if !events.contains(want) {
            bail!("event history lacks {want:?}:\n{events}");
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Mount {
    source: String,
    fstype: String,
}

fn mount_of(s: &Scenario, ip: &str, path: &str) -> Result<Mount> {
    let out = s.ssh(ip, &format!("findmnt -n -o SOURCE,FSTYPE {path}"))?;
    let mut words = out.split_whitespace();
    match (words.next(), words.next()) {
        (Some(source), Some(fstype)) => Ok(Mount {
            source: source.to_string(),
            fstype: fstype.to_string(),
        }),
        _ => bail!("nothing mounted on {path}: findmnt said {out:?}"),
    }
}

/// The disk's partitions as lsblk's JSON objects (lower-case keys, sizes in bytes).
fn lsblk(s: &Scenario, ip: &str, disk: &str) -> Result<Vec<Value>> {
    let out = s.ssh(
        ip,
        &format!("lsblk -J -b -o NAME,SIZE,FSTYPE,UUID,PARTTYPE /dev/{disk}"),
    )?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("lsblk said {out:?}"))?;
    let children = v["blockdevices"][0]["children"]
        .as_array()
        .with_context(|| format!("no partitions of {disk} in {v}"))?;
    Ok(children.clone())
}
