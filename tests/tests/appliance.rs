//! The appliance image end to end, in the rootless lab: no namespace, no bridge, no tap; the
//! provisioning segment is the lab's userspace switch, and the host reaches each VM through a
//! user-mode NIC forwarding a port of 127.0.0.1 (`restrict=on`: the guests reach nothing else).
//!
//! - A USB stick under OVMF (`qemu-xhci` + `usb-storage`): `stork.toml` is put on its STORK
//!   partition as a person would from a laptop; the appliance reads it, serves the segment,
//!   and a second VM (SeaBIOS) enlists, commissions and deploys Debian to its disk; SSH in with
//!   the deploy's key. The appliance restarts (ACPI power-down, power-on): the machine, the
//!   token and the leases are still there; the token it printed is on the STORK partition.
//! - An internal disk under SeaBIOS with no `stork.toml`: the safe state (Stork's DHCP off,
//!   the console says why), the data partition grown to the disk; then, powered off,
//!   `stork-image upgrade` to a v2 image: v2 boots from slot B and commits, the machine added
//!   on v1 is still there; then a broken v2 (its system zeroed) falls back to the committed
//!   system, which says so.
//! - The image build is reproducible: a second build from the same inputs has the same
//!   SHA-256.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::rootless::{DiskSpec, RootlessVm, RootlessVmSpec, UserNic, free_local_ports};
use stork_lab::vm::{BootFirst, DiskBus, Firmware, GuestReboot};
use stork_lab::wait_for;
use stork_proto::DeployTarget;
use stork_proto::api::{AllocateBody, DeployRequest, NewMachine, Status};
use stork_tests::appliance::{
    self, Described, Notice, appliance_spec, client, copy_image, put_on_fat, read_from_fat,
    wait_api, wait_console, wait_notice,
};

const APPLIANCE_MAC: &str = "52:54:00:77:0a:01";
const MGMT_MAC: &str = "52:54:00:77:0a:02";
const MACHINE_MAC: &str = "52:54:00:77:0a:11";
const MACHINE_MGMT_MAC: &str = "52:54:00:77:0a:12";
/// The OS image the appliance image carries.
const IMAGE: &str = "debian-bookworm";
const BOOT: Duration = Duration::from_secs(600);
/// What a person writes on the STORK partition: the provisioning NIC (the appliance VM's
/// first PCI NIC under q35: `qemu-xhci` is 00:01, the switch NIC 00:02) and a host name; the
/// rest (10.77.0.1/24, DHCP range .100-.199) is the default.
const STORK_TOML: &str = "\
interface = \"enp0s2\"

[appliance]
hostname = \"stork-lab\"
";

fn fail(lab: &mut stork_lab::RootlessLab, vms: &[&RootlessVm], e: anyhow::Error) -> ! {
    lab.keep_dir();
    let mut msg = format!("{e:#}\nlab kept in {}\n", lab.dir().display());
    for vm in vms {
        msg.push_str(&format!(
            "--- {} console (last 60 lines) ---\n{}\n",
            vm.spec.name,
            vm.console_tail(60)
        ));
    }
    panic!("{msg}");
}

/// Powers the VM down through ACPI and waits for QEMU to exit.
fn power_down(vm: &mut RootlessVm) -> Result<()> {
    vm.qmp(Duration::from_secs(10))?
        .execute("system_powerdown", None)?;
    wait_for(
        &format!("{} to power off", vm.spec.name),
        Duration::from_secs(180),
        Duration::from_millis(500),
        || Ok(vm.exited().map(|_| ())),
    )
}

fn machine_spec(ssh_port: u16) -> RootlessVmSpec {
    let mut spec = RootlessVmSpec::new("machine", MACHINE_MAC);
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.firmware = Firmware::Bios;
    // The agent's reboot into the installed OS resets in place; its power-off ends QEMU, and
    // the test powers the machine on again (manual power).
    spec.guest_reboot = GuestReboot::Reset;
    spec.boot_first = BootFirst::Network;
    spec.disks = vec![DiskSpec::blank(4 << 30, DiskBus::Virtio, "STORK-MACHINE")];
    spec.user_nic = Some(UserNic::new(MACHINE_MGMT_MAC).forward(ssh_port, 22));
    spec
}

#[test]
#[ignore = "needs QEMU and the appliance image: run `cargo xtask test`"]
fn a_usb_stick_under_ovmf_reads_its_stork_toml_provisions_a_machine_and_keeps_it_across_a_restart()
{
    let mut lab = appliance::lab("appliance-usb").unwrap();
    let mut app: Option<RootlessVm> = None;
    let mut machine: Option<RootlessVm> = None;
    let result = (|| -> Result<()> {
        let image = appliance::image();
        let described = Described::load(&image)?;
        let stick = lab.dir().join("stick.raw");
        copy_image(&image, &stick, 16 << 30)?;
        let (config, _) = described.extent("stork-config")?;
        let toml = lab.dir().join("stork.toml");
        std::fs::write(&toml, STORK_TOML)?;
        put_on_fat(&stick, config, &toml, "stork.toml")?;

        let ports = free_local_ports(2)?;
        let (api_port, ssh_port) = (ports[0], ports[1]);
        let mut spec = appliance_spec("appliance", APPLIANCE_MAC);
        spec.firmware = Firmware::Uefi { nic_rom: false };
        spec.disks = vec![DiskSpec::usb_stick(&stick, "STORK-STICK")];
        spec.user_nic = Some(UserNic::new(MGMT_MAC).forward(api_port, 8443));
        let vm = app.insert(lab.start_vm(spec.clone())?);
        let text = wait_notice(vm, 1, BOOT)?;
        if text.contains("SAFE STATE") {
            bail!("the appliance ignored its stork.toml");
        }
        if !text.contains("stork-lab") {
            bail!("the host name from stork.toml is not on the console");
        }
        let notice = Notice::parse(&text)?;
        let token = notice
            .token
            .context("the first boot's notice shows no admin token")?;
        let api = client(api_port, &notice.fingerprint, &token)?;
        wait_api(&api, vm, BOOT)?;
        wait_for(
            "the bundled OS image to be registered",
            BOOT,
            Duration::from_secs(2),
            || {
                Ok(api
                    .boot_resources()?
                    .iter()
                    .any(|r| r.name == IMAGE)
                    .then_some(()))
            },
        )?;

        // A second VM on the segment, manual power: the test is the person at the power button.
        let key = lab.dir().join("id_ed25519");
        stork_lab::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "stork-e2e", "-f"])
                .arg(&key),
        )?;
        let public = std::fs::read_to_string(key.with_extension("pub"))?;
        let mspec = machine_spec(ssh_port);
        let created = api.create_machine(&NewMachine {
            macs: vec![MACHINE_MAC.parse()?],
            ..Default::default()
        })?;
        let id = created.id;
        api.commission(&id)?;
        let m = machine.insert(lab.start_vm(mspec.clone())?);
        wait_status(&api, &id, Status::Ready, m, Duration::from_secs(900))?;
        wait_exit(m, "the agent's power-off after commissioning")?;

        api.allocate(&id, &AllocateBody::default())?;
        api.deploy(
            &id,
            &DeployRequest {
                image: IMAGE.into(),
                target: DeployTarget::Disk,
                disk: None,
                hostname: Some("stork-usb-e2e".into()),
                ssh_keys: vec![public.trim().to_string()],
                user_data: None,
                layout: None,
                late_commands: Vec::new(),
                network: None,
                kernel: None,
            },
        )?;
        let mut again = mspec.clone();
        again.keep_disks = true;
        *m = lab.start_vm(again)?;
        wait_status(&api, &id, Status::Deployed, m, Duration::from_secs(1200))?;
        let hostname = ssh_when_up(&key, ssh_port, "hostname")?;
        if hostname.trim() != "stork-usb-e2e" {
            bail!("the deployed machine calls itself {hostname:?}");
        }

        // A restart of the appliance keeps machines, tokens and leases.
        let vm = app.as_mut().context("appliance")?;
        power_down(vm)?;
        let on_stick = read_from_fat(&stick, config, "admin-token.txt")?;
        if on_stick.trim() != token {
            bail!(
                "admin-token.txt on the STORK partition is {on_stick:?}, not the console's token"
            );
        }
        let mut keep = spec.clone();
        keep.keep_disks = true;
        let vm = app.insert(lab.start_vm(keep)?);
        let text = wait_notice(vm, 2, BOOT)?;
        let again = Notice::parse(&text)?;
        if again.fingerprint != notice.fingerprint {
            bail!("the certificate changed across a restart");
        }
        wait_api(&api, vm, BOOT)?;
        let kept = api.machine(&id)?;
        if kept.status != Status::Deployed {
            bail!("after the restart the machine is {}", kept.status);
        }
        let stats = api.stats()?;
        let restored = stats.dhcp.get("leases_restored").copied().unwrap_or(0);
        if restored == 0 {
            bail!(
                "no DHCP lease was restored after the restart: {:?}",
                stats.dhcp
            );
        }
        Ok(())
    })();
    if let Err(e) = result {
        let vms: Vec<&RootlessVm> = app.iter().chain(machine.iter()).collect();
        fail(&mut lab, &vms, e);
    }
}

/// Waits for `want`, failing at once on a failed status.
fn wait_status(
    api: &stork_client::Client,
    id: &str,
    want: Status,
    vm: &mut RootlessVm,
    timeout: Duration,
) -> Result<()> {
    wait_for(
        &format!("status {want}"),
        timeout,
        Duration::from_secs(2),
        || {
            let m = api.machine(id)?;
            if m.status == want {
                return Ok(Some(()));
            }
            if m.status.as_str().starts_with("failed") {
                bail!(
                    "status {} ({:?}); machine console:\n{}",
                    m.status,
                    m.status_message,
                    vm.console_tail(30)
                );
            }
            Ok(None)
        },
    )
}

fn wait_exit(vm: &mut RootlessVm, what: &str) -> Result<()> {
    wait_for(
        what,
        Duration::from_secs(120),
        Duration::from_millis(500),
        || Ok(vm.exited().map(|_| ())),
    )
}

fn ssh_when_up(key: &Path, port: u16, command: &str) -> Result<String> {
    wait_for(
        "SSH into the deployed machine",
        Duration::from_secs(300),
        Duration::from_secs(3),
        || {
            Ok(stork_lab::run(
                Command::new("ssh")
                    .arg("-i")
                    .arg(key)
                    .args(["-p", &port.to_string()])
                    .args(stork_lab::guest::SSH_OPTIONS)
                    .arg(format!("{}@127.0.0.1", stork_tests::deploy::USER))
                    .arg(command),
            )
            .ok())
        },
    )
}

/// `stork-image` as `cargo xtask test` built it.
fn stork_image() -> PathBuf {
    stork_tests::stork_bin().with_file_name("stork-image")
}

/// Builds an appliance image from the same inputs as the one under test, with `version`.
fn build_image(out: &Path, version: &str) -> Result<Described> {
    // One build at a time: each holds a Debian tree and a whole image on the disk beside
    // the VMs' disks, and two at once have filled a CI machine's disk.
    static BUILDS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDS.lock().unwrap_or_else(|p| p.into_inner());
    let inputs = |var: &str| {
        std::env::var_os(var).with_context(|| format!("{var} is not set: run `cargo xtask test`"))
    };
    stork_lab::run(
        Command::new(stork_image())
            .env("RUST_BACKTRACE", "0")
            .arg("appliance")
            .arg("--cache")
            .arg(inputs("STORK_CACHE")?)
            .arg("--stork")
            .arg(inputs("STORK_APPLIANCE_STORK")?)
            .arg("--boot")
            .arg(stork_tests::boot_files())
            .arg("--images")
            .arg(stork_tests::deploy::os_images())
            // As `cargo xtask` builds it: the image the test deploys, not every one built.
            .args(["--image", IMAGE])
            .args(["--version", version])
            .arg("--out")
            .arg(out),
    )?;
    Described::load(out)
}

#[test]
#[ignore = "needs root (debootstrap tree, or its cache) and the appliance image: run `cargo xtask test`"]
fn the_appliance_image_builds_bit_for_bit_the_same_again() {
    let image = appliance::image();
    let first = Described::load(&image).unwrap();
    let dir = tempfile::tempdir_in(stork_tests::lab_dir()).unwrap();
    let again = build_image(&dir.path().join("again.raw"), &first.version).unwrap();
    assert_eq!(
        again.sha256, first.sha256,
        "two builds of the same inputs differ"
    );
}

#[test]
#[ignore = "needs QEMU, root for the image builds and the appliance image: run `cargo xtask test`"]
fn an_internal_disk_under_seabios_starts_safe_grows_its_data_and_upgrades_with_fallback() {
    let mut lab = appliance::lab("appliance-disk").unwrap();
    let mut app: Option<RootlessVm> = None;
    let result = (|| -> Result<()> {
        let image = appliance::image();
        let v1 = Described::load(&image)?;
        let disk = lab.dir().join("disk.raw");
        copy_image(&image, &disk, 12 << 30)?;
        let ports = free_local_ports(1)?;
        let api_port = ports[0];
        let mut spec = appliance_spec("appliance", APPLIANCE_MAC);
        spec.firmware = Firmware::Bios;
        spec.disks = vec![DiskSpec::image(&disk, DiskBus::Virtio, "STORK-DISK")];
        spec.user_nic = Some(UserNic::new(MGMT_MAC).forward(api_port, 8443));
        let vm = app.insert(lab.start_vm(spec.clone())?);
        let text = wait_notice(vm, 1, BOOT)?;
        if !text.contains("SAFE STATE") {
            bail!("without stork.toml the appliance did not say it is in its safe state");
        }
        if !text.contains(&format!("Stork {} (slot a)", v1.version)) {
            bail!("the notice does not name version {} on slot a", v1.version);
        }
        let notice = Notice::parse(&text)?;
        let token = notice.token.context("no admin token on the console")?;
        let api = client(api_port, &notice.fingerprint, &token)?;
        wait_api(&api, vm, BOOT)?;
        let machine = api.create_machine(&NewMachine {
            macs: vec![MACHINE_MAC.parse()?],
            hostname: Some("kept-across-upgrades".into()),
            ..Default::default()
        })?;
        power_down(vm)?;
        check_data_grown(&disk, &v1)?;

        // v2 onto slot B while the appliance is off.
        let v2_image = lab.dir().join("v2.raw");
        let v2 = build_image(&v2_image, "2.0.0-e2e")?;
        upgrade(&disk, &v2_image)?;
        let mut keep = spec.clone();
        keep.keep_disks = true;
        let vm = app.insert(lab.start_vm(keep.clone())?);
        let text = wait_console(vm, "upgrade to slot b committed", 1, BOOT)?;
        if !text.contains(&format!("Stork {} (slot b)", v2.version)) {
            bail!(
                "the upgraded system does not say it is {} on slot b",
                v2.version
            );
        }
        wait_api(&api, vm, BOOT)?;
        let kept = api.machine(&machine.id)?;
        if kept.hostname.as_deref() != Some("kept-across-upgrades") {
            bail!("the machine added on v1 is not as it was: {kept:?}");
        }
        power_down(vm)?;

        // A broken v2 (its system zeroed) goes to slot A; GRUB falls back to B.
        let broken = lab.dir().join("broken.raw");
        std::fs::rename(&v2_image, &broken)?;
        let (system, len) = v2.extent("stork-system-a")?;
        let f = std::fs::OpenOptions::new().write(true).open(&broken)?;
        zero(&f, system, len)?;
        drop(f);
        upgrade(&disk, &broken)?;
        let vm = app.insert(lab.start_vm(keep)?);
        let text = wait_console(vm, "the upgrade to slot a failed to boot", 1, BOOT)?;
        if text
            .matches(&format!("Stork {} (slot b)", v2.version))
            .count()
            < 2
        {
            bail!(
                "after the failed upgrade slot b with {} did not come up",
                v2.version
            );
        }
        wait_api(&api, vm, BOOT)?;
        api.machine(&machine.id)?;
        Ok(())
    })();
    if let Err(e) = result {
        let vms: Vec<&RootlessVm> = app.iter().collect();
        fail(&mut lab, &vms, e);
    }
}

fn upgrade(disk: &Path, image: &Path) -> Result<()> {
    stork_lab::run(
        Command::new(stork_image())
            .env("RUST_BACKTRACE", "0")
            .arg("upgrade")
            .arg(disk)
            .arg(image),
    )?;
    Ok(())
}

fn zero(f: &std::fs::File, offset: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let block = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = block.len().min((len - at) as usize);
        f.write_all_at(&block[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

/// The data partition reaches the end of the disk and its file system fills it.
fn check_data_grown(disk: &Path, built: &Described) -> Result<()> {
    let gpt = stork_lab::run(Command::new("sgdisk").arg("-i").arg("6").arg(disk))?;
    let last: u64 = gpt
        .lines()
        .find_map(|l| l.strip_prefix("Last sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("sgdisk printed no last sector")?;
    let size = std::fs::metadata(disk)?.len();
    let (_, built_len) = built.extent("stork-data")?;
    if (last + 1) * 512 + (1 << 20) < size - (1 << 20) {
        bail!("the data partition ends at sector {last}, not near the end of the {size}-byte disk");
    }
    let (first, _) = built.extent("stork-data")?;
    let fs = stork_lab::run(
        Command::new("dumpe2fs")
            .arg("-h")
            .arg(format!("{}?offset={first}", disk.display())),
    )?;
    let blocks: u64 = fs
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|n| n.trim().parse().ok())
        .context("dumpe2fs printed no block count")?;
    if blocks * 4096 <= built_len {
        bail!("the data file system did not grow: {blocks} blocks");
    }
    Ok(())
}
