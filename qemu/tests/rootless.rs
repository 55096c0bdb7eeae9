//! The rootless lab with real QEMU (TCG), no root: VMs on the userspace switch, a user-mode
//! NIC with host forwards, and image disks. Each test is skipped, with the reason printed,
//! when QEMU (or for UEFI, OVMF) is not installed.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use stork_lab::rootless::{DiskSpec, RootlessLab, RootlessVm, RootlessVmSpec, UserNic};
use stork_lab::switch::Decision;
use stork_lab::vm::{BootFirst, DiskBus, Firmware, OVMF_VARS_TEMPLATE};
use stork_lab::wait_for;
use stork_proto::MacAddr;

fn have_qemu() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
    }
    found
}

fn small(name: &str, mac: &str) -> RootlessVmSpec {
    let mut spec = RootlessVmSpec::new(name, mac);
    spec.memory_mib = 256;
    spec.cpus = 1;
    spec
}

/// What a VM has said, for a failure message.
fn report(vms: &[&RootlessVm]) -> String {
    vms.iter()
        .map(|vm| {
            format!(
                "{}\n--- console ---\n{}\n--- qemu ---\n{}",
                vm.describe(),
                vm.console_tail(20),
                vm.qemu_log_tail(20)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails if a VM's QEMU has exited.
fn still_running(vms: &mut [&mut RootlessVm]) -> Result<()> {
    for vm in vms.iter_mut() {
        if let Some(status) = vm.exited() {
            bail!("QEMU exited ({status}):\n{}", report(&[vm]));
        }
    }
    Ok(())
}

/// A DHCPDISCOVER: IPv4, UDP 68 -> 67, the DHCP magic cookie, option 53 = 1.
fn is_dhcp_discover(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(14..) else {
        return false;
    };
    if frame.get(12..14) != Some(&[0x08, 0x00]) || ip.len() < 20 || ip[9] != 17 {
        return false;
    }
    let Some(udp) = ip.get(usize::from(ip[0] & 0x0f) * 4..) else {
        return false;
    };
    if udp.get(..4) != Some(&[0, 68, 0, 67]) {
        return false;
    }
    // UDP header 8, BOOTP fixed part 236, then the cookie.
    let Some(dhcp) = udp.get(8..) else {
        return false;
    };
    if dhcp.get(236..240) != Some(&[99, 130, 83, 99]) {
        return false;
    }
    let mut opts = &dhcp[240..];
    while let [code, rest @ ..] = opts {
        match code {
            0 => opts = rest,
            255 => return false,
            _ => {
                let Some((&len, rest)) = rest.split_first() else {
                    return false;
                };
                let Some(value) = rest.get(..usize::from(len)) else {
                    return false;
                };
                if *code == 53 {
                    return value == [1];
                }
                opts = &rest[usize::from(len)..];
            }
        }
    }
    false
}

/// Two SeaBIOS VMs boot from the network on the switch: their NICs' iPXE ROMs broadcast
/// DHCPDISCOVERs, and each VM's frames reach the other's port.
#[test]
fn two_vms_network_boot_on_the_switch() -> Result<()> {
    if !have_qemu() {
        return Ok(());
    }
    let base = tempfile::tempdir()?;
    let lab = RootlessLab::new("pxe", base.path())?;
    let captured = lab.switch().capture();
    let (mac_a, mac_b) = ("52:54:00:5a:00:01", "52:54:00:5a:00:02");
    let mut a = lab.start_vm(small("a", mac_a))?;
    let mut b = lab.start_vm(small("b", mac_b))?;
    let (mac_a, mac_b): (MacAddr, MacAddr) = (mac_a.parse()?, mac_b.parse()?);
    let sw = lab.switch();

    let (port_a, port_b) = wait_for(
        "both VMs on the switch",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            still_running(&mut [&mut a, &mut b])?;
            Ok(sw.port_of_pid(a.pid()).zip(sw.port_of_pid(b.pid())))
        },
    )?;
    let waited = wait_for(
        "broadcasts from both VMs, each delivered to the other's port",
        Duration::from_secs(240),
        Duration::from_millis(250),
        || {
            still_running(&mut [&mut a, &mut b])?;
            Ok((sw.broadcasts_from(&mac_a) > 0
                && sw.broadcasts_from(&mac_b) > 0
                && sw.delivered(&mac_a, port_b) > 0
                && sw.delivered(&mac_b, port_a) > 0)
                .then_some(()))
        },
    );
    if let Err(e) = waited {
        bail!("{e:#}\nports: {:#?}\n{}", sw.ports(), report(&[&a, &b]));
    }

    // The switch learned each MAC on its VM's port, and sent nothing back to the sender.
    assert_eq!(sw.port_of(&mac_a), Some(port_a));
    assert_eq!(sw.port_of(&mac_b), Some(port_b));
    assert_eq!(sw.delivered(&mac_a, port_a), 0);
    assert_eq!(sw.delivered(&mac_b, port_b), 0);
    let stats_a = sw.port_stats(port_a).unwrap_or_default();
    assert!(stats_a.flooded > 0 && stats_a.sent > 0, "{stats_a:?}");

    // What went through were DHCPDISCOVERs from iPXE, flooded to the other VM.
    let mut discovers = [false, false];
    for c in captured.try_iter() {
        if is_dhcp_discover(&c.frame) {
            let src = MacAddr::from_slice(&c.frame[6..12]);
            if src == Some(mac_a) && c.port == port_a {
                assert_eq!(c.decision, Decision::Flood(vec![port_b]));
                discovers[0] = true;
            }
            if src == Some(mac_b) && c.port == port_b {
                assert_eq!(c.decision, Decision::Flood(vec![port_a]));
                discovers[1] = true;
            }
        }
    }
    assert_eq!(
        discovers,
        [true, true],
        "no DHCPDISCOVER captured from a VM"
    );

    // A VM that goes away leaves the switch, and its MAC is forgotten.
    b.kill();
    wait_for(
        "b's port to close",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || Ok((sw.connected() == 1).then_some(())),
    )?;
    assert_eq!(sw.port_of(&mac_b), None);
    Ok(())
}

/// A user-mode NIC with host forwards. No guest here listens on a port without building an
/// image, so this checks QEMU's side: it runs with the NIC, lists the forwards (bound to
/// 127.0.0.1 only) in `info usernet`, and accepts connections on the host ports.
#[test]
fn a_user_nic_forwards_host_ports() -> Result<()> {
    if !have_qemu() {
        return Ok(());
    }
    let base = tempfile::tempdir()?;
    let lab = RootlessLab::new("usernet", base.path())?;
    let ports = stork_lab::rootless::free_local_ports(2)?;
    let mut spec = small("web", "52:54:00:5b:00:01");
    spec.user_nic = Some(
        UserNic::new("52:54:00:5b:01:01")
            .forward(ports[0], 22)
            .forward(ports[1], 8080),
    );
    let mut vm = lab.start_vm(spec)?;
    let mut qmp = vm.qmp(Duration::from_secs(60))?;
    assert_eq!(qmp.status()?, "running");
    let usernet = qmp.hmp("info usernet")?;
    for (host, guest) in [(ports[0], 22), (ports[1], 8080)] {
        let line = usernet
            .lines()
            .find(|l| l.contains("HOST_FORWARD") && l.contains(&format!(" {host} ")))
            .unwrap_or_else(|| panic!("no forward of {host} in:\n{usernet}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.contains(&"127.0.0.1"), "{line}");
        assert!(words.contains(&guest.to_string().as_str()), "{line}");
    }
    // QEMU listens on the forwarded ports of the host's loopback.
    for port in &ports {
        TcpStream::connect_timeout(&([127, 0, 0, 1], *port).into(), Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!("connecting to 127.0.0.1:{port}: {e}"))?;
    }
    // Its provisioning NIC joined the switch too.
    assert!(lab.switch().port_of_pid(vm.pid()).is_some());
    vm.kill();
    Ok(())
}

/// An appliance-style machine under OVMF: a raw image as a USB stick (written to an
/// overlay), an NVMe and a virtio data disk; QEMU takes the command line and shows the
/// drives.
#[test]
fn an_image_boots_as_a_usb_stick_beside_data_disks() -> Result<()> {
    if !have_qemu() {
        return Ok(());
    }
    if !Path::new(OVMF_VARS_TEMPLATE).exists() {
        eprintln!("skipped: OVMF is not installed (apt-get install ovmf)");
        return Ok(());
    }
    let base = tempfile::tempdir()?;
    let image = base.path().join("appliance.raw");
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    let lab = RootlessLab::new("usb", base.path())?;
    let mut spec = small("appliance", "52:54:00:5c:00:01");
    spec.firmware = Firmware::Uefi { nic_rom: false };
    spec.boot_first = BootFirst::Disk;
    spec.disks = vec![
        DiskSpec::usb_stick(&image, "STORK-STICK").snapshot(),
        DiskSpec::blank(64 << 20, DiskBus::Nvme, "DATA-NVME"),
        DiskSpec::blank(32 << 20, DiskBus::Virtio, "DATA-VIRTIO"),
    ];
    let mut vm = lab.start_vm(spec)?;
    let mut qmp = vm.qmp(Duration::from_secs(60))?;
    assert_eq!(qmp.status()?, "running");

    // Drive d<n> backs device disk<n>; the stick's image is behind a snapshot overlay.
    let blocks = qmp.execute("query-block", None)?;
    let drive = |id: &str| {
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b.get("device").and_then(|d| d.as_str()) == Some(id))
            .map(|b| {
                let field = |f: &str| b.pointer(f).and_then(|v| v.as_str()).unwrap_or("");
                (
                    field("/qdev").to_string(),
                    field("/inserted/file").to_string(),
                )
            })
            .unwrap_or_else(|| panic!("no drive {id} in {blocks:#}"))
    };
    let (qdev, file) = drive("d0");
    assert!(qdev.contains("disk0"), "{qdev}");
    assert!(
        file.contains(&image.display().to_string()) && file.contains("backing"),
        "the image is not behind a snapshot overlay: {file}"
    );
    for (n, disk) in vm.paths.disks.iter().enumerate().skip(1) {
        let (qdev, file) = drive(&format!("d{n}"));
        assert!(qdev.contains(&format!("disk{n}")), "{qdev}");
        assert_eq!(Path::new(&file), disk);
    }
    let usb = qmp.hmp("info usb")?;
    assert!(usb.contains("QEMU USB MSD"), "no USB stick in:\n{usb}");
    vm.kill();
    Ok(())
}
