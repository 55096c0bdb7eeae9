//! Deploying to disk with a layout of the request's own, on a SeaBIOS VM powered through its
//! BMC with two 4 GiB disks, a virtio one and a SATA one: `stork machine deploy --layout
//! lvm.json --esp-mib 256 --root-mib 2048` (the flags over the file's sizes) makes the agent
//! partition both disks itself (BIOS boot, ESP, a 2 GiB data partition not grown to the
//! disk), put one LVM volume group over both data partitions (the SATA disk named by the
//! serial only its VPD page holds), a 3 GiB root volume (larger than either partition, so
//! across both) and `/var` of the rest, extract the image's root tar onto them, write fstab by
//! UUID, install GRUB for BIOS and UEFI and the seed; its reboot resets the VM in place and
//! SeaBIOS boots the disk through the GRUB the agent installed; cloud-init phones home:
//! Deployed. Over SSH: the partition sizes on both disks, `pvs` and `lvs` (the root on both
//! physical volumes), the mounts and fstab by UUID, the hostname, and `uname -r`: the deploy
//! asks for the image's backports kernel (`--kernel backports`), not its default.
//!
//! Before the deploy, the same VM is commissioned with a user's script (`stork script add`)
//! and two hardware tests (`--test smart --test disk-read`) while a third, bad disk (QEMU's
//! blkdebug fails its reads past 32 MiB) is attached: the script and SMART pass, the disk
//! read fails and the machine is `failed_commissioning` naming the test and the disk;
//! `stork machine scripts` shows each run's output. Commissioned again without the tests, it
//! is Ready with the script's result shown.
//!
//! Beside it (the two run side by side), a SeaBIOS VM with two disks deploys with its root on
//! RAID 1 across them and LVM on the array (the machine's default layout, kept by name with
//! `stork layout add` and `stork machine layout`, the deploy giving none: a volume group over md, root and
//! `/var` as logical volumes of the sizes asked, `/var` on XFS). Over SSH: `/proc/mdstat`
//! shows both members in sync, `lvs` the sizes, `findmnt` the file systems. Then the first
//! disk is pulled out of the running VM (QMP `device_del`) and the VM rebooted: it boots
//! from the second disk's GRUB alone, the initramfs starts the array degraded, and SSH shows
//! the root on the one member left.
//!
//! The same VM has two NICs and deploys with a network config of its own (`--network`): an
//! active-backup bond of both with an address the appliance allocates from its
//! `dhcp.static_range` (`auto`, recorded with the deploy) and VLAN 100 on the bond with a
//! static one (networkd files the agent writes; cloud-init's network step off). Its
//! phone-home comes from the bond's address, which the appliance accepts while it deploys.
//! Over SSH at that address: the bond's mode and members, the VLAN's id, the addresses, DNS;
//! the guest's ARP on the VLAN is seen tagged 100 on the lab bridge (the host kernel has no
//! 8021q to end the VLAN in), and SSH keeps working with the first NIC's link cut (QMP
//! `set_link`): the bond failed over.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stork_lab::rootless::Qmp;
use stork_lab::{DiskBus, ExtraDisk, Spawned, VmSpec, wait_for};
use stork_proto::api::Status;
use stork_tests::deploy::{IMAGE, Scenario, USER};

const MIB: u64 = 1 << 20;
const ESP_MIB: u64 = 256;
const ROOT_MIB: u64 = 2048;
const HOSTNAME: &str = "stork-e2e-layout";
/// The image's other kernel (the recipe's backports one), which the LVM deploy asks for.
const KERNEL: &str = "backports";

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn seabios_vm_deploys_debian_from_the_root_tar_onto_lvm_over_two_disks_and_logs_in() {
    let mut spec = VmSpec::new("vm1", "52:54:00:77:01:21");
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.disk_bytes = 4 << 30;
    spec.extra_disks = vec![
        ExtraDisk {
            bus: DiskBus::Sata,
            bytes: 4 << 30,
            serial: LVM_SERIAL.into(),
            unreadable_at: None,
        },
        // A bad disk the layout leaves alone: reads past 32 MiB fail.
        ExtraDisk {
            bus: DiskBus::Virtio,
            bytes: 256 << 20,
            serial: "STORK-BAD".into(),
            unreadable_at: Some(32 << 20),
        },
    ];
    let mut s = Scenario::new("deploy-layout", spec, None).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        // A minimum kernel the agent's default (Debian 12's 6.1) does not meet: the agent
        // commissions and deploys on its backports kernel, as the image's kernel is chosen.
        s.appliance
            .cli(&["machine", "min-kernel", &id, AGENT_MIN_KERNEL])?;
        commission_with_scripts(&mut s, &id)?;
        agent_ran_its_newer_kernel(&s, &id)?;
        deploy_with_layout(&mut s, &id)?;
        check_installed(&s, &id)
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!(
        "phases (SeaBIOS, to disk from the root tar, LVM over two disks):\n{}",
        s.timings()
    );
}

/// The machine's minimum kernel: newer than the agent's default kernel.
const AGENT_MIN_KERNEL: &str = "6.12";

/// The agent's kernel (in the inventory it took, and as the user's script saw it) is its
/// second, the backports kernel `cargo xtask images` builds (`boot/kernels/backports/`).
fn agent_ran_its_newer_kernel(s: &Scenario, id: &str) -> Result<()> {
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(
        stork_tests::boot_files().join("kernels/backports/manifest.json"),
    )?)?;
    let want = manifest["inputs"]["kernel_version"]
        .as_str()
        .context("the backports kernel's manifest names no version")?;
    let seen = s
        .status(id)?
        .inventory
        .map(|i| i.kernel)
        .unwrap_or_default();
    let results = s.appliance.cli(&["machine", "scripts", id])?;
    if seen != want || !results.contains(&format!("kernel {want}")) {
        bail!(
            "the agent ran kernel {seen:?}, wanted {want} (minimum {AGENT_MIN_KERNEL}):\n{results}"
        );
    }
    s.say(&format!(
        "the agent ran kernel {want}: the machine's minimum is {AGENT_MIN_KERNEL}"
    ));
    Ok(())
}

/// A user's commissioning script: what it prints is checked in the results.
const HELLO: &str = "#!/bin/sh\necho \"hello from $(uname -n): $(nproc) CPUs, kernel $(uname -r)\"\nls /sys/block | grep -v loop\n";

/// Commissioning with a user's script and two hardware tests: SMART passes (the SATA disk
/// has it, virtio disks have none), the disk read finds the bad disk and fails the
/// commissioning, the machine says why and the results show each run; commissioned again
/// without the tests it is Ready, the script's output shown.
fn commission_with_scripts(s: &mut Scenario, id: &str) -> Result<()> {
    let file = s.lab.dir().join("hello.sh");
    std::fs::write(&file, HELLO)?;
    s.appliance.cli(&[
        "script",
        "add",
        "10-hello",
        file.to_str().context("lab path")?,
        "--timeout",
        "60",
    ])?;
    s.commission_with(id, &["smart", "disk-read"], Status::FailedCommissioning)?;
    let m = s.status(id)?;
    let why = m.status_message.unwrap_or_default();
    if !why.contains("hardware test disk-read failed (exit 1)") || !why.contains("vdb") {
        bail!("the failed commissioning says {why:?}: wanted disk-read's failure naming vdb");
    }
    let results = s.appliance.cli(&["machine", "scripts", id])?;
    for want in [
        "== 10-hello (script): passed",
        "hello from ",
        "== smart (hardware test): passed",
        "sda: SMART",
        "vda: no SMART",
        "== disk-read (hardware test): failed (exit 1)",
        "vdb: read error",
    ] {
        if !results.contains(want) {
            bail!("`machine scripts` lacks {want:?}:\n{results}");
        }
    }
    s.say(&format!("a bad disk fails commissioning: {why:?}"));

    s.commission(id)?;
    let shown = s.appliance.cli(&["machine", "show", id])?;
    let results = s.appliance.cli(&["machine", "scripts", id])?;
    if !shown.contains("10-hello (script): passed") || results.contains("disk-read") {
        bail!("after a commissioning without tests:\n{shown}\n{results}");
    }
    s.say("commissioned again without the tests: ready, the script's output kept");
    Ok(())
}

/// The second disk of the LVM VM: SATA, named in the layout by the serial only its VPD page
/// holds.
const LVM_SERIAL: &str = "STORK-LVM-2";
/// The root volume: more than one disk's data partition, so it spans both.
const LVM_ROOT_MIB: u64 = 3072;

/// LVM over both disks' data partitions: a root larger than either, `/var` the rest.
fn lvm_layout() -> Value {
    json!({
        "disks": ["vda", LVM_SERIAL],
        "lvm": {
            "vg": "data",
            "volumes": [
                {"name": "root", "mount": "/", "size_mib": LVM_ROOT_MIB},
                {"name": "var", "mount": "/var"}
            ]
        }
    })
}

const RAID_HOSTNAME: &str = "stork-e2e-raid";
/// Each disk's data partition (the RAID member), and the root volume on the array.
const MEMBER_MIB: u64 = 3000;
const ROOT_LV_MIB: u64 = 2048;

#[test]
#[ignore = "needs root, QEMU, ipmi_sim and built images: run `cargo xtask test`"]
fn seabios_vm_deploys_its_root_on_lvm_over_raid1_of_two_disks_and_boots_with_one() {
    let mut spec = VmSpec::new("vm1", "52:54:00:77:01:31");
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.disk_bytes = 4 << 30;
    spec.extra_disks = vec![ExtraDisk {
        bus: DiskBus::Virtio,
        bytes: 4 << 30,
        serial: "STORK-RAID-2".into(),
        unreadable_at: None,
    }];
    spec.extra_nics = vec![SECOND_MAC.into()];
    let mut s = Scenario::with_config("deploy-raid", spec, STATIC_RANGE).unwrap();
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        s.commission(&id)?;
        deploy_raid(&mut s, &id)?;
        check_raid(&s, BOND_IP)?;
        check_network(&mut s, BOND_IP)?;
        boot_without_the_first_disk(&mut s, BOND_IP)
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (SeaBIOS, RAID 1 + LVM):\n{}", s.timings());
}

const SECOND_MAC: &str = "52:54:00:77:01:32";
/// Addresses the appliance gives deploys that ask for `auto`, outside the lab's DHCP range:
/// the bond asks for one and gets the first, [`BOND_IP`].
const STATIC_RANGE: &str = "[dhcp]\nstatic_range = [\"10.77.0.50\", \"10.77.0.59\"]\n";
const BOND_IP: &str = "10.77.0.50";
const VLAN_IP: &str = "10.78.0.50";
const VLAN_PEER: &str = "10.78.0.1";
const VLAN_ID: u16 = 100;

/// Both NICs in an active-backup bond with a static address, VLAN 100 on it.
fn network_config() -> Value {
    json!({
        "interfaces": [
            {"name": "en0", "mac": "52:54:00:77:01:31"},
            {"name": "en1", "mac": SECOND_MAC},
            {"name": "bond0", "bond": {"members": ["en0", "en1"], "mode": "active-backup"},
             "addresses": ["auto"]},
            {"name": "bond0.100", "vlan": {"link": "bond0", "id": VLAN_ID},
             "addresses": [format!("{VLAN_IP}/24")]}
        ],
        "dns": {"servers": ["10.77.0.1"], "search": ["lab"]}
    })
}

/// The layout: both disks (the second by its serial), RAID 1, LVM root and XFS `/var`.
fn raid_layout() -> Value {
    json!({
        "esp_mib": 128,
        "root_mib": MEMBER_MIB,
        "disks": ["vda", "STORK-RAID-2"],
        "raid": 1,
        "lvm": {
            "vg": "vg0",
            "volumes": [
                {"name": "root", "mount": "/", "size_mib": ROOT_LV_MIB},
                {"name": "var", "mount": "/var", "fs": "xfs", "options": "noatime"}
            ]
        }
    })
}

fn deploy_raid(s: &mut Scenario, id: &str) -> Result<()> {
    s.appliance.cli(&["machine", "allocate", id])?;
    // A layout that cannot fit is refused at request time, naming the field.
    let mut too_big = raid_layout();
    too_big["lvm"]["volumes"][0]["size_mib"] = json!(8192);
    let path = s.lab.dir().join("too-big.json");
    std::fs::write(&path, too_big.to_string())?;
    let refused = deploy_cli(s, id, &["--layout", path.to_str().context("lab path")?]);
    match refused {
        Err(e) if format!("{e:#}").contains("layout.lvm.volumes[0].size_mib") => {}
        other => bail!("a layout over the disks was not refused by its field: {other:?}"),
    }
    if s.status(id)?.status != Status::Allocated {
        bail!("the refused deploy changed the machine");
    }

    // The layout kept by name as the machine's default: the deploy gives none and gets it.
    let path = s.lab.dir().join("raid.json");
    std::fs::write(&path, raid_layout().to_string())?;
    s.appliance.cli(&[
        "layout",
        "add",
        "raid1-lvm",
        path.to_str().context("lab path")?,
    ])?;
    s.appliance.cli(&["machine", "layout", id, "raid1-lvm"])?;
    let net = s.lab.dir().join("network.json");
    std::fs::write(&net, network_config().to_string())?;
    s.phase_start();
    deploy_cli(
        s,
        id,
        &[
            "--hostname",
            RAID_HOSTNAME,
            "--network",
            net.to_str().context("lab path")?,
        ],
    )?;
    let m = s.status(id)?;
    let layout = m.deploy.as_ref().and_then(|d| d.layout.as_ref());
    if layout.map(|l| (l.raid, l.disks.len())) != Some((Some(1), 2)) {
        bail!("the deploy did not take the machine's default layout raid1-lvm: {layout:?}");
    }
    // The deploy records the address `auto` got.
    let recorded = m
        .deploy
        .and_then(|d| d.network)
        .map(|n| n.interfaces[2].addresses.clone());
    if recorded != Some(vec![format!("{BOND_IP}/24")]) {
        bail!(
            "the deploy recorded {recorded:?} for the bond: wanted {BOND_IP}/24 from the static range"
        );
    }
    let pid = wait_for(
        "Stork to power the VM on through its BMC",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok(s.machine.qemu_pid()),
    )?;
    let power_ons = s.machine.power_ons();
    s.install_and_reboot_in_place(
        id,
        pid,
        power_ons,
        "deploy (power-on to installed, RAID 1 + LVM)",
    )
}

/// Both members in sync, the volumes of the sizes asked, the file systems where asked.
fn check_raid(s: &Scenario, ip: &str) -> Result<()> {
    let name = s.ssh_when_up(ip, "hostname")?;
    if name.trim() != RAID_HOSTNAME {
        bail!("the deployed machine says its hostname is {name:?}");
    }
    // The initial resync runs on after the first boot: wait for it (not timed).
    let mdstat = wait_for(
        "the RAID 1 array to be in sync",
        Duration::from_secs(900),
        Duration::from_secs(5),
        || {
            let m = s.ssh(ip, "cat /proc/mdstat")?;
            Ok((m.contains("[2/2] [UU]") && !m.contains("resync")).then_some(m))
        },
    )?;
    if !(mdstat.contains("raid1") && mdstat.contains("vda3") && mdstat.contains("vdb3")) {
        bail!("/proc/mdstat does not show vda3 and vdb3 in a RAID 1:\n{mdstat}");
    }
    let lvs = s.ssh(
        ip,
        "sudo lvs --noheadings --units m --nosuffix -o lv_name,lv_size,devices vg0",
    )?;
    let size = |lv: &str| -> Option<f64> {
        lvs.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&lv))
            .and_then(|w| w.get(1)?.parse().ok())
    };
    if size("root") != Some(ROOT_LV_MIB as f64) || size("var").is_none_or(|v| v < 300.0) {
        bail!("lvs shows {lvs:?}: wanted root of {ROOT_LV_MIB} MiB and var of the rest");
    }
    if !lvs.contains("/dev/md") {
        bail!("the volume group is not on the array: {lvs:?}");
    }
    let root = mount_of(s, ip, "/")?;
    let var = mount_of(s, ip, "/var")?;
    if root.source != "/dev/mapper/vg0-root" || root.fstype != "ext4" {
        bail!("/ is {root:?}: wanted ext4 on /dev/mapper/vg0-root");
    }
    if var.source != "/dev/mapper/vg0-var" || var.fstype != "xfs" {
        bail!("/var is {var:?}: wanted xfs on /dev/mapper/vg0-var");
    }
    let opts = s.ssh(ip, "findmnt -n -o OPTIONS /var")?;
    if !opts.split(',').any(|o| o.trim() == "noatime") {
        bail!("/var is mounted with {opts:?}: noatime was asked");
    }
    s.say(&format!(
        "ssh {USER}@{ip}: RAID 1 [UU] over vda3 and vdb3; LVM vg0 root {ROOT_LV_MIB} MiB ext4 on /, \
         var xfs on /var (noatime)"
    ));
    Ok(())
}

/// The bond and the VLAN as asked, reachable, and the bond fails over to the second NIC.
fn check_network(s: &mut Scenario, ip: &str) -> Result<()> {
    let bond = s.ssh(
        ip,
        "cat /sys/class/net/bond0/bonding/mode /sys/class/net/bond0/bonding/slaves; \
         ip -br -4 addr show dev bond0; ip -d link show dev bond0.100; \
         ip -br -4 addr show dev bond0.100; cat /run/systemd/resolve/resolv.conf",
    )?;
    for want in [
        "active-backup".to_string(),
        "nameserver 10.77.0.1".to_string(),
        "search lab".to_string(),
        format!("{BOND_IP}/24"),
        format!("vlan protocol 802.1Q id {VLAN_ID}"),
        format!("{VLAN_IP}/24"),
    ] {
        if !bond.contains(&want) {
            bail!("{want:?} is not in the installed OS's network:\n{bond}");
        }
    }
    let slaves = bond.lines().nth(1).unwrap_or_default();
    if slaves.split_whitespace().count() != 2 {
        bail!("bond0 has members {slaves:?}: wanted both NICs");
    }
    // The host kernel has no 8021q to end VLAN 100 in: the guest's frames are watched on
    // the lab bridge instead. A datagram to the VLAN's peer makes the guest ask for it by
    // ARP: tagged 100 and from the VLAN's address.
    let tcpdump = Spawned::start(
        "tcpdump",
        {
            let mut c = s.lab.command("tcpdump");
            c.args([
                "-i",
                stork_lab::BRIDGE,
                "-e",
                "-n",
                "-l",
                "vlan",
                &VLAN_ID.to_string(),
                "and",
                "arp",
            ]);
            c
        },
        &s.lab.dir().join("tcpdump-vlan.txt"),
    )?;
    let tagged = wait_for(
        "the guest's ARP on VLAN 100 on the lab bridge",
        Duration::from_secs(60),
        Duration::from_secs(2),
        || {
            let _ = s.ssh(ip, &format!("echo x > /dev/udp/{VLAN_PEER}/9"));
            let seen = std::fs::read_to_string(tcpdump.log()).unwrap_or_default();
            Ok(seen
                .lines()
                .find(|l| {
                    l.contains(&format!("vlan {VLAN_ID},"))
                        && l.contains(&format!("tell {VLAN_IP},"))
                })
                .map(str::to_string))
        },
    )?;
    drop(tcpdump);
    // The first NIC's cable pulled: the bond carries on over the second. (A member's MAC is
    // the bond's; its own is in perm_hwaddr.)
    let path = s.ssh(
        ip,
        "grep -l 52:54:00:77:01:31 /sys/class/net/*/bonding_slave/perm_hwaddr",
    )?;
    let first = path
        .trim()
        .split('/')
        .nth(4)
        .unwrap_or_default()
        .to_string();
    if first.is_empty() {
        bail!("no bond member has the first NIC's MAC: {path:?}");
    }
    let mut qmp = Qmp::connect(&s.machine.paths.qmp)?;
    qmp.execute("set_link", Some(json!({"name": "nic0", "up": false})))?;
    let status = format!(
        "cat /sys/class/net/bond0/bonding/active_slave /sys/class/net/{first}/bonding_slave/mii_status"
    );
    let active = wait_for(
        "the bond to fail over to its second NIC",
        Duration::from_secs(60),
        Duration::from_secs(2),
        || {
            let Ok(out) = s.ssh(ip, &status) else {
                return Ok(None);
            };
            let mut lines = out.lines().map(str::trim);
            let (active, mii) = (lines.next().unwrap_or_default(), lines.next());
            Ok((active != first && mii == Some("down")).then(|| active.to_string()))
        },
    )?;
    qmp.execute("set_link", Some(json!({"name": "nic0", "up": true})))?;
    s.say(&format!(
        "ssh debian@{ip}: bond0 active-backup of 2 NICs at {BOND_IP}/24, VLAN {VLAN_ID} at \
         {VLAN_IP}/24 (its ARP seen tagged on the bridge: {:?}); {first}'s link cut, {active} carried on",
        tagged.trim()
    ));
    Ok(())
}

/// Pulls the first disk out of the running VM and reboots it: the second disk's GRUB boots
/// it, the array runs degraded.
fn boot_without_the_first_disk(s: &mut Scenario, ip: &str) -> Result<()> {
    let boot_id = s.ssh(ip, "cat /proc/sys/kernel/random/boot_id")?;
    let mut qmp = Qmp::connect(&s.machine.paths.qmp)?;
    qmp.execute("device_del", Some(json!({"id": stork_lab::vm::disk_id(0)})))?;
    wait_for(
        "the guest to let the first disk go",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || {
            let pci = qmp.execute("query-pci", None)?;
            Ok((!pci.to_string().contains("\"disk0\"")).then_some(()))
        },
    )?;
    drop(qmp);
    // The reboot cuts the SSH session: its error says nothing.
    let _ = s.ssh(ip, "sudo systemctl reboot");
    let mdstat = wait_for(
        "the VM to come back up from the second disk",
        Duration::from_secs(600),
        Duration::from_secs(3),
        || {
            let Ok(id) = s.ssh(ip, "cat /proc/sys/kernel/random/boot_id") else {
                return Ok(None);
            };
            if id == boot_id {
                return Ok(None);
            }
            Ok(Some(s.ssh(ip, "cat /proc/mdstat; findmnt -n -o SOURCE /")?))
        },
    )?;
    if !(mdstat.contains("[2/1]")
        && mdstat.contains("vda3")
        && mdstat.contains("/dev/mapper/vg0-root"))
    {
        bail!(
            "after the first disk was pulled the VM came back, but not on the degraded array \
             (the second disk is vda now):\n{mdstat}"
        );
    }
    s.say(
        "the first disk pulled and the VM rebooted: up from the second disk, RAID 1 degraded [2/1]",
    );
    Ok(())
}

/// `stork machine deploy ID --image IMAGE` with `flags`.
fn deploy_cli(s: &Scenario, id: &str, flags: &[&str]) -> Result<String> {
    let mut args = vec!["machine", "deploy", id, "--image", IMAGE];
    args.extend_from_slice(flags);
    s.appliance.cli(&args)
}

/// Allocates and deploys with the LVM layout, the partition sizes given as flags over it;
/// Stork powers the VM on through its BMC. Waits for the agent's `installed` and then, after
/// the reboot in place, for Deployed.
fn deploy_with_layout(s: &mut Scenario, id: &str) -> Result<()> {
    s.appliance.cli(&["machine", "allocate", id])?;
    let path = s.lab.dir().join("lvm.json");
    std::fs::write(&path, lvm_layout().to_string())?;
    s.phase_start();
    deploy_cli(
        s,
        id,
        &[
            "--hostname",
            HOSTNAME,
            "--layout",
            path.to_str().context("lab path")?,
            "--esp-mib",
            &ESP_MIB.to_string(),
            "--root-mib",
            &ROOT_MIB.to_string(),
            "--kernel",
            KERNEL,
        ],
    )?;
    let m = s.status(id)?;
    let layout = m.deploy.as_ref().and_then(|d| d.layout.as_ref());
    let recorded = layout.map(|l| (l.esp_mib, l.root_mib, l.disks.len(), l.lvm.is_some()));
    if m.status != Status::Deploying || recorded != Some((Some(ESP_MIB), Some(ROOT_MIB), 2, true)) {
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
        "deploy (power-on to installed, by extraction onto LVM)",
    )?;
    Ok(())
}

/// What the installed system says about itself over SSH, and what the agent reported: both
/// disks partitioned as asked (the data partitions not grown to the disks), their data
/// partitions the volume group's two physical volumes, the root volume across both.
fn check_installed(s: &Scenario, id: &str) -> Result<()> {
    let ip = s.leased_ip()?;
    let name = s.ssh_when_up(&ip, "hostname")?;
    if name.trim() != HOSTNAME {
        bail!("the deployed machine says its hostname is {name:?}, asked for {HOSTNAME:?}");
    }

    let root = mount_of(s, &ip, "/")?;
    let var = mount_of(s, &ip, "/var")?;
    let esp = mount_of(s, &ip, "/boot/efi")?;
    if (root.source.as_str(), root.fstype.as_str()) != ("/dev/mapper/data-root", "ext4")
        || (var.source.as_str(), var.fstype.as_str()) != ("/dev/mapper/data-var", "ext4")
        || (esp.source.as_str(), esp.fstype.as_str()) != ("/dev/vda2", "vfat")
    {
        bail!(
            "/ is {root:?}, /var {var:?}, /boot/efi {esp:?}: wanted ext4 on data-root and \
             data-var, vfat on vda2"
        );
    }
    // Both disks have the same GPT: the sizes asked for, the data partition not grown.
    for disk in ["vda", "sda"] {
        let parts = lsblk(s, &ip, disk)?;
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
        for (n, bytes) in [(1, MIB), (2, ESP_MIB * MIB), (3, ROOT_MIB * MIB)] {
            if size_of(n) != Some(bytes) {
                bail!(
                    "partition {n} of {disk} is {:?} bytes, wanted {bytes}: {parts:#?}",
                    size_of(n)
                );
            }
        }
    }
    let pvs = s.ssh(&ip, "sudo pvs --noheadings -o pv_name,vg_name")?;
    let mut pvs: Vec<String> = pvs
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    pvs.sort();
    if pvs != ["/dev/sda3 data", "/dev/vda3 data"] {
        bail!("pvs shows {pvs:?}: wanted vda3 and sda3 in volume group data");
    }
    let lvs = s.ssh(
        &ip,
        "sudo lvs --noheadings --units m --nosuffix -o lv_name,lv_size,devices data",
    )?;
    let root_lv: Vec<&str> = lvs
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("root"))
        .collect();
    let sizes: Vec<Option<f64>> = root_lv
        .iter()
        .map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    let on = |dev: &str| root_lv.iter().any(|l| l.contains(dev));
    if sizes.first() != Some(&Some(LVM_ROOT_MIB as f64)) || !on("/dev/vda3") || !on("/dev/sda3") {
        bail!("lvs shows {lvs:?}: wanted root of {LVM_ROOT_MIB} MiB on vda3 and sda3");
    }

    // fstab names the volumes by their stable mapper paths, the ESP by its UUID.
    let fstab = s.ssh(&ip, "cat /etc/fstab")?;
    let entries: Vec<Vec<&str>> = fstab
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .filter(|w: &Vec<&str>| w.len() >= 3)
        .collect();
    let esp_uuid = format!("UUID={}", esp.uuid);
    for (m, want, mountpoint) in [
        (&root, root.source.as_str(), "/"),
        (&var, var.source.as_str(), "/var"),
        (&esp, esp_uuid.as_str(), "/boot/efi"),
    ] {
        if esp.uuid.is_empty()
            || !entries
                .iter()
                .any(|w| w[0] == want && w[1] == mountpoint && w[2] == m.fstype)
        {
            bail!("fstab lacks `{want} {mountpoint} {}`:\n{fstab}", m.fstype);
        }
    }

    // The root file system fills its volume (less ext4's own metadata).
    let df = s.ssh(&ip, "df -B1 --output=size / | tail -1")?;
    let fs_bytes: u64 = df
        .trim()
        .parse()
        .with_context(|| format!("df said {df:?}"))?;
    if fs_bytes < LVM_ROOT_MIB * MIB / 100 * 85 {
        bail!(
            "the root file system is {fs_bytes} bytes, far less than its {LVM_ROOT_MIB} MiB volume"
        );
    }
    s.say(&format!(
        "ssh {USER}@{ip}: hostname {HOSTNAME}; vda and sda (SATA, by serial) each 1 MiB, \
         {ESP_MIB} MiB, {ROOT_MIB} MiB; VG data over vda3 and sda3, root {LVM_ROOT_MIB} MiB \
         ext4 on both ({fs_bytes} bytes), var the rest; fstab by mapper path and UUID"
    ));

    // The kernel asked for by name, not the image's default, is the one running.
    let images: Vec<stork_proto::api::BootResource> =
        s.appliance.cli_json(&["image", "list", "--json"])?;
    let kernels = images
        .iter()
        .find(|r| r.name == IMAGE)
        .map(|r| r.kernels.clone())
        .unwrap_or_default();
    let (Some(default), Some(chosen)) =
        (kernels.first(), kernels.iter().find(|k| k.name == KERNEL))
    else {
        bail!("image {IMAGE} lists kernels {kernels:?}: wanted the default and {KERNEL:?}");
    };
    let running = s.ssh(&ip, "uname -r")?;
    if running.trim() != chosen.version || chosen.version == default.version {
        bail!(
            "uname -r says {running:?}: wanted {KERNEL} ({}), not the default {}",
            chosen.version,
            default.version
        );
    }
    s.say(&format!(
        "uname -r: {} (the image's {KERNEL} kernel; its default is {})",
        chosen.version, default.version
    ));

    let events = s.appliance.cli(&["machine", "events", id])?;
    let boots = format!("boots kernel {}", chosen.version);
    for want in [
        "of tar extracted",
        "bootloader Done",
        boots.as_str(),
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
    uuid: String,
}

fn mount_of(s: &Scenario, ip: &str, path: &str) -> Result<Mount> {
    let out = s.ssh(ip, &format!("findmnt -n -o SOURCE,FSTYPE,UUID {path}"))?;
    let mut words = out.split_whitespace();
    match (words.next(), words.next()) {
        (Some(source), Some(fstype)) => Ok(Mount {
            source: source.to_string(),
            fstype: fstype.to_string(),
            uuid: words.next().unwrap_or_default().to_string(),
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
