//! `cargo xtask lab`: the appliance image as a QEMU VM and machine VMs on one L2 segment, with
//! no root and no hardware: the segment is a userspace switch (`stork_lab::rootless`), the host
//! reaches the appliance's API through a forwarded port of 127.0.0.1. Machines have no BMC
//! (manual power): the lab is the person at the power button, and powers a machine that is
//! off on again when Stork has not seen it yet or wants it on (commissioning, deploying,
//! erasing), reading the API with the token and fingerprint the console showed.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use stork_lab::appliance_image::{Described, Notice, copy_image, put_on_fat};
use stork_lab::rootless::{DiskSpec, RootlessLab, RootlessVm, RootlessVmSpec, UserNic};
use stork_lab::vm::{BootFirst, DiskBus, Firmware, GuestReboot};

/// The provisioning NIC under q35 with the USB controller first (see the appliance test).
const STORK_TOML: &str = "interface = \"enp0s2\"\n\n[appliance]\nhostname = \"stork-lab\"\n";

pub fn run(machines: u32, api_port: u16, image: Option<PathBuf>) -> Result<()> {
    crate::deps::ensure()?;
    let image = match image {
        Some(i) => i,
        None => {
            let boot = crate::images()?;
            let os = crate::os_images::build(&crate::target())?;
            crate::appliance::build(
                &crate::target(),
                &boot,
                &os,
                None,
                crate::appliance::Profile::Release,
            )?
        }
    };

    let lab = RootlessLab::new("lab", &crate::target().join("lab"))?;
    let stick = lab.dir().join("stick.raw");
    crate::step("copying the image onto a 16 GiB \"USB stick\" and writing stork.toml on it");
    copy_image(&image, &stick, 16 << 30)?;
    let (config, _) = Described::load(&image)?.extent("stork-config")?;
    let toml = lab.dir().join("stork.toml");
    std::fs::write(&toml, STORK_TOML)?;
    put_on_fat(&stick, config, &toml, "stork.toml")?;

    let mut spec = RootlessVmSpec::new("appliance", "52:54:00:77:0b:01");
    spec.memory_mib = 2048;
    spec.firmware = Firmware::Uefi { nic_rom: false };
    spec.guest_reboot = GuestReboot::Reset;
    spec.boot_first = BootFirst::Disk;
    spec.disks = vec![DiskSpec::usb_stick(&stick, "STORK-STICK")];
    spec.user_nic = Some(UserNic::new("52:54:00:77:0b:02").forward(api_port, 8443));
    crate::step(&format!(
        "booting the appliance (OVMF, USB stick; console {})",
        lab.dir().join("appliance/console.log").display()
    ));
    let mut appliance = lab.start_vm(spec)?;
    let console = wait_notice(&mut appliance)?;
    println!("{console}");
    println!(
        "The API is at https://127.0.0.1:{api_port} (forwarded to the appliance's 8443):\n  \
         stork --url https://127.0.0.1:{api_port} --fingerprint <the fingerprint above> \
         --token <the token above> machine list"
    );

    let api = client_from_notice(&console, api_port)?;
    let mut vms: Vec<(RootlessVmSpec, RootlessVm)> = Vec::new();
    for n in 0..machines {
        let mut m = RootlessVmSpec::new(&format!("machine{n}"), &format!("52:54:00:77:0c:{n:02x}"));
        m.memory_mib = 2048;
        m.guest_reboot = GuestReboot::Reset;
        m.boot_first = BootFirst::Network;
        m.disks = vec![DiskSpec::blank(
            8 << 30,
            DiskBus::Virtio,
            &format!("LAB-{n}"),
        )];
        crate::step(&format!("machine{n} ({}) network-boots", m.mac));
        let vm = lab.start_vm(m.clone())?;
        vms.push((m, vm));
    }
    crate::step("running: machines power on again when they power off; Enter stops the lab");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        // Best effort: EOF on stdin stops the lab as Enter does.
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    loop {
        if rx.recv_timeout(Duration::from_secs(2)).is_ok() {
            break;
        }
        if let Some(status) = appliance.exited() {
            anyhow::bail!("the appliance VM exited ({status})");
        }
        for (spec, vm) in vms.iter_mut() {
            if vm.exited().is_some() && wants_power(&api, &spec.mac) {
                let mut again = spec.clone();
                again.keep_disks = true;
                println!("lab: {} powered off; powering it on again", spec.name);
                *vm = lab.start_vm(again)?;
            }
        }
    }
    crate::step("stopping the lab");
    Ok(())
}

/// A client of the API with the token and certificate fingerprint of the console's notice.
fn client_from_notice(notice: &str, port: u16) -> Result<stork_client::Client> {
    let notice = Notice::parse(notice)?;
    let fingerprint: stork_tls::Fingerprint = notice.fingerprint.parse()?;
    let token = notice.token.context("no admin token in the notice")?;
    Ok(stork_client::Client::with_trust(
        &format!("https://127.0.0.1:{port}"),
        Some(token),
        Some(stork_tls::Trust::Pinned(fingerprint)),
    ))
}

/// Whether Stork wants the machine with `mac` on: it has not enlisted yet, or its status is
/// one an agent works in. A Ready or Deployed machine that powered off stays off.
fn wants_power(api: &stork_client::Client, mac: &str) -> bool {
    use stork_proto::api::{MachineFilter, Status};
    let Ok(machines) = api.machines(&MachineFilter::default()) else {
        return false;
    };
    match machines
        .iter()
        .find(|m| m.macs.iter().any(|x| x.to_string() == mac))
    {
        None => true,
        Some(m) => matches!(
            m.status,
            Status::Commissioning | Status::Deploying | Status::DiskErasing | Status::Releasing
        ),
    }
}

/// Waits for the appliance's console notice (URL, fingerprint, token) and returns it.
fn wait_notice(vm: &mut RootlessVm) -> Result<String> {
    stork_lab::wait_for(
        "the appliance's console notice",
        Duration::from_secs(900),
        Duration::from_secs(1),
        || {
            if let Some(status) = vm.exited() {
                anyhow::bail!("the appliance VM exited ({status})");
            }
            // QEMU creates the console file once it runs.
            let bytes = std::fs::read(&vm.paths.console).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            Ok(stork_lab::appliance_image::Notice::all(&text)
                .last()
                .map(|n| n.to_string()))
        },
    )
}
