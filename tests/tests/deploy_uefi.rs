//! Deploying to disk on UEFI through firmware PXE, powered through the machine's BMC: OVMF
//! with the NIC's iPXE ROM disabled, so EDK2's own PXE fetches `snponly.efi` over Stork's
//! TFTP at every network boot. The machine enlists, commissions, gets the Debian image on its
//! disk (uploaded as a user's own image: a qcow2 made from it, `stork image upload` after an
//! upload with a wrong `--sha256` was refused and left nothing; the appliance converted it,
//! gave it a block map (the deploy writes only its data) and read its two kernels from its
//! ext4 root; the deploy asks for the one that is not its
//! default, and `uname -r` is that kernel) and a boot entry for it that is `BootNext` and first in `BootOrder`; the agent's reboot
//! resets the VM in place and OVMF goes straight to the disk's `EFI/BOOT/BOOTX64.EFI` (GRUB),
//! with no network boot on the way (no boot script, no TFTP); cloud-init phones home:
//! Deployed, and SSH with the deploy's key reads the hostname asked for. The machine has a
//! SATA disk and an NVMe disk: the first deploy picks the SATA disk by its serial, with no
//! ephemeral root (a raw image needs none of its tools; the agent writes the boot entry
//! itself); released without an erase, it deploys again onto the NVMe disk picked by its
//! model, and the firmware then holds one entry with Stork's label, not two.
//!
//! The machine keeps its OVMF variable store for its lifetime (every power-on and reset of
//! the same machine); a new machine starts from the pristine template.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_lab::Firmware;
use stork_lab::vm::{DiskBus, ExtraDisk};
use stork_proto::DeployTarget;
use stork_proto::api::Status;
use stork_proto::inventory::Firmware as RecordedFirmware;
use stork_tests::deploy::{IMAGE, Scenario, deploy_to_disk_and_log_in, os_machine, upload_qcow2};

/// The image the test uploads (a qcow2 made from the Debian image) and deploys.
const UPLOADED: &str = "debian-qcow2";
use stork_tests::require_boot_files;

#[test]
#[ignore = "needs root, QEMU, OVMF, ipmi_sim and built images: run `cargo xtask test`"]
fn ovmf_vm_through_firmware_pxe_powered_by_its_bmc_deploys_debian_to_disk_and_logs_in() {
    require_boot_files(&["snponly.efi"]);
    let mac = "52:54:00:77:01:e1";
    let mut spec = os_machine("uefi1", mac, Firmware::Uefi { nic_rom: false }, 4 << 30);
    // A SATA disk (the first deploy's, by serial) and an NVMe disk (the second's, by model).
    spec.disk_bus = DiskBus::Sata;
    spec.disk_serial = SATA_SERIAL.into();
    spec.extra_disks = vec![ExtraDisk {
        bus: DiskBus::Nvme,
        bytes: 4 << 30,
        serial: "STORK-NVME-1".into(),
        unreadable_at: None,
    }];
    let mut s = Scenario::new("deploy-uefi", spec, None).unwrap();
    s.disk = Some(SATA_SERIAL.into());
    let result = (|| -> Result<()> {
        let id = s.add_and_enlist()?;
        let m = s.status(&id)?;
        let firmware = m.inventory.as_ref().map(|i| i.firmware);
        if firmware != Some(RecordedFirmware::Uefi) {
            bail!("firmware recorded as {firmware:?}");
        }
        s.commission(&id)?;
        upload_qcow2(&s, UPLOADED)?;
        s.image = UPLOADED.into();
        // The appliance read the upload's kernels from its ext4 root: the built image's two,
        // named by version, and the deploy asks for the one that is not its default.
        let other = uploaded_kernels_match_the_built_image(&s)?;
        s.kernel = Some(other.clone());
        let ip = deploy_to_disk_and_log_in(&mut s, &id, "stork-e2e-uefi", false)?;
        root_is_on(&s, &ip, "sda")?;
        let running = s.ssh(&ip, "uname -r")?;
        if running.trim() != other {
            bail!(
                "uname -r is {:?}, not the kernel asked for ({other})",
                running.trim()
            );
        }
        s.say(&format!(
            "uname -r: {other}, the upload's non-default kernel"
        ));
        // The appliance gave the converted upload a block map: only its data was written.
        let events = s.appliance.cli(&["machine", "events", &id])?;
        if !events.contains("not written, by its block map)") {
            bail!("the upload's deploy did not go by a block map:\n{events}");
        }
        s.kernel = None;
        // A raw image needs none of the ephemeral root's tools: the appliance did not send it.
        let events = s.appliance.cli(&["machine", "events", &id])?;
        if !events.contains("ephemeral Done: not needed: the task runs from the initrd") {
            bail!("the deploy fetched the ephemeral root:\n{events}");
        }
        // The agent gave the installed disk a UEFI boot entry (written through efivarfs from
        // the initrd: a raw image needs no ephemeral root) and made it the next boot.
        let events = s.appliance.cli(&["machine", "events", &id])?;
        let entry = events
            .lines()
            .find(|l| l.contains("boot-entry Done: UEFI entry Boot"))
            .with_context(|| format!("no UEFI boot entry among the events:\n{events}"))?;
        if !entry.contains("; BootNext ") {
            bail!("the boot entry is not the next boot: {entry}");
        }
        s.say(entry.trim());
        // After the agent's reboot OVMF did not network-boot: the appliance served that MAC
        // no `exit` script (it would, to any network boot of a deployed machine), and the
        // console (OVMF and iPXE write to the serial port) shows no PXE attempt.
        let after_reboot = s.booted_straight_to_disk(
            mac,
            &ip,
            &["Start PXE over", "Stork: booting from local disk"],
        )?;
        // OVMF's boot manager says which option it starts (`BdsDxe: loading Boot0005 ...`):
        // the agent's entry, as BootNext, straight after the reset.
        let num = entry
            .split("UEFI entry Boot")
            .nth(1)
            .and_then(|rest| rest.get(..4))
            .with_context(|| format!("no entry number in {entry:?}"))?;
        if !after_reboot.contains(&format!("BdsDxe: loading Boot{num} ")) {
            bail!("after the agent's reboot OVMF did not start Boot{num} (the agent's entry)");
        }
        // Every network boot came through firmware PXE, and the boot from disk made none:
        // OVMF opens each NBP download with a size probe it ends itself (`tsize`, then an
        // OptionRefused error), then fetches `snponly.efi`: two TFTP requests for each of
        // enlist, commission and deploy. (Completed transfers are not counted: the server
        // may see OVMF's last ACK go missing after the client has the whole file.)
        let stats = s.appliance.stats()?;
        // At least: a firmware that repeats a request under load is not a failure here (the
        // console and the log above show the boot from disk made none).
        let requests = stats.counter("tftp", "requests").unwrap_or(0);
        if requests < 6 {
            bail!("{requests} TFTP requests, wanted two per network boot (3 boots): {stats:#?}");
        }
        redeploy_to_nvme_by_model(&mut s, &id)
    })();
    if let Err(e) = result {
        s.fail(e);
    }
    eprintln!("phases (OVMF, firmware PXE, to disk):\n{}", s.timings());
}

/// The uploaded image lists the kernels of the image it was made from, default first, each
/// named by its version; returns the other one's.
fn uploaded_kernels_match_the_built_image(s: &Scenario) -> Result<String> {
    let images: Vec<stork_proto::api::BootResource> =
        serde_json::from_str(&s.appliance.cli(&["image", "list", "--json"])?)?;
    let versions = |name: &str| -> Vec<String> {
        images
            .iter()
            .filter(|r| r.name == name)
            .flat_map(|r| r.kernels.iter().map(|k| k.version.clone()))
            .collect()
    };
    let (built, uploaded) = (versions(IMAGE), versions(UPLOADED));
    if built.len() != 2 || uploaded != built {
        bail!("the upload lists kernels {uploaded:?}; the image it was made from {built:?}");
    }
    s.say(&format!(
        "the upload lists its kernels: {}",
        uploaded.join(", ")
    ));
    Ok(uploaded[1].clone())
}

/// The serial the first deploy picks its disk by.
const SATA_SERIAL: &str = "STORK-UEFI-SATA";

/// Released without an erase, the machine's deploy onto the NVMe disk (by its model) is
/// refused after the write: the SATA disk still holds the same image, whose root UUID the
/// installed OS would find twice. Released with a quick erase, it deploys there; the agent's
/// entry replaced the first deploy's (one entry with Stork's label).
fn redeploy_to_nvme_by_model(s: &mut Scenario, id: &str) -> Result<()> {
    s.phase_start();
    s.appliance.cli(&["machine", "release", id, "--no-erase"])?;
    s.wait_status(
        id,
        Status::Ready,
        &[Status::Releasing],
        Duration::from_secs(120),
    )?;
    s.wait_off("Stork's power-off at the release", Duration::from_secs(90))?;
    s.phase_done("release without erase (to Ready, off)");
    s.disk = Some("QEMU NVMe Ctrl".into());
    s.deploy(id, DeployTarget::Disk, "stork-e2e-uefi-nvme")?;
    s.deploy_fails_with(
        id,
        "naming the other disk's copy",
        &[
            "sda3 on another disk holds a file system with the installed root's UUID",
            "was wiped",
        ],
    )?;
    s.phase_done("deploy beside the old install refused (to off)");

    s.phase_start();
    s.appliance.cli(&["machine", "release", id, "--quick"])?;
    s.wait_status(
        id,
        Status::Ready,
        &[Status::Releasing, Status::DiskErasing],
        Duration::from_secs(400),
    )?;
    s.wait_off("Stork's power-off after the erase", Duration::from_secs(90))?;
    s.phase_done("release, quick erase (to Ready, off)");
    let ip = deploy_to_disk_and_log_in(s, id, "stork-e2e-uefi-nvme", false)?;
    root_is_on(s, &ip, "nvme0n1")?;
    // The firmware's variables as the installed OS sees them: one entry with Stork's label.
    let count = s.ssh(
        &ip,
        "sudo python3 -c \"import glob; print(sum('Stork: installed OS'.encode('utf-16-le') \
         in open(f, 'rb').read() for f in glob.glob('/sys/firmware/efi/efivars/Boot[0-9A-F]\
         [0-9A-F][0-9A-F][0-9A-F]-8be4df61-93ca-11d2-aa0d-00e098032b8c')))\"",
    )?;
    if count.trim() != "1" {
        bail!(
            "after two deploys {} boot entries carry Stork's label",
            count.trim()
        );
    }
    s.say("redeployed onto the NVMe disk chosen by its model; one Stork boot entry");
    Ok(())
}

/// The installed root file system lies on `disk` (its kernel name).
fn root_is_on(s: &Scenario, ip: &str, disk: &str) -> Result<()> {
    let parent = s.ssh(ip, "lsblk -no PKNAME \"$(findmnt -no SOURCE /)\"")?;
    if parent.trim() != disk {
        bail!("the root is on {:?}, not {disk}", parent.trim());
    }
    s.say(&format!("the root file system is on {disk}"));
    Ok(())
}
