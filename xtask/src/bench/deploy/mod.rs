//! `cargo xtask bench deploy`: one machine's power-on to Deployed, per phase, beside its floor
//! measured in the same run on the same kind of VM (TCG, 2 vCPUs, 2 GiB, 4 GiB virtio disk),
//! in a lab namespace with no uplink: first under SeaBIOS, then under OVMF by firmware PXE and
//! by UEFI HTTP boot (PXE off) and with Secure Boot (firmware PXE, shim, GRUB over TFTP), the
//! agent's BootNext entry taking the installed OS's boot straight to the disk. Side by side,
//! the four show what each boot path costs to the agent.
//!
//! Stork's run: a VM powered only through its BMC (`ipmi_sim` starting QEMU, as the deploy
//! e2e tests do) is enlisted and commissioned, then deployed to disk with the Debian image;
//! Stork does every power-on, and the agent's reboot resets the VM in place, as on hardware.
//! Its phases come from the appliance's event times and the bench's own clock:
//!   boot to agent  `machine deploy` (Stork powers on) -> the agent's first deploy event
//!                  (PXE, iPXE, kernel, initrd, stage 1; a raw deploy fetches no
//!                  ephemeral root)
//!   image          the agent's `disk` step start -> `image` done (wipe, stream, checksum)
//!   finish         -> the agent's "done, rebooting" (partitions grown, seed, installed
//!                  report, which sets the BMC's next boot to the disk on BIOS)
//!   OS boot        that reboot -> Deployed (GRUB, the OS, cloud-init, phone-home; no
//!                  network boot first: BootNext on UEFI, the BMC's boot device on BIOS)
//!
//! The floor, whose three terms the issue names:
//!   PXE to agent   power-on -> the agent's first console line in that same deploy boot
//!   image          what the hardware allows for the image: the slower of its two legs,
//!                  measured in the same VM (deployed into memory for this, so its disk is
//!                  free; over SSH): the registered image file's bytes fetched from the same
//!                  HTTP server (the wire), and `dd` writing the image's data bytes (its block
//!                  map's ranges, what any writer must put on the disk) with direct I/O.
//!                  Decoding is not in the floor: it is Stork's cost, not the hardware's.
//!   OS boot        the same image, already on a disk of that size, booted from disk with a
//!                  NoCloud seed volume: power-on -> cloud-init's "finished" line
//!
//! Numbers are printed, never asserted.

mod layout;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use stork_lab::bmc::BmcVm;
use stork_lab::process::Spawned;
use stork_lab::vm::{DISK_ID, qemu_argv};
use stork_lab::{Appliance, Firmware, Lab, Net, VmSpec, wait_for};
use stork_proto::ImageRole;
use stork_proto::api::{EventRecord, Status};
use stork_proto::blockmap::BlockMap;

const IMAGE: &str = "debian-bookworm";
/// The image's cloud-init default user (the recipe's `[user] name`).
const USER: &str = "debian";
const MAC: &str = "52:54:00:77:0b:01";
const FLOOR_MAC: &str = "52:54:00:77:0b:02";
const POLL: Duration = Duration::from_millis(250);
const PHASE_TIMEOUT: Duration = Duration::from_secs(900);
const DISK_BYTES: u64 = 4 << 30;
/// The BMC's IPMI port, on the lab's loopback.
const BMC_PORT: u16 = 623;
/// The peer's console marker: cloud-init's last line.
const CLOUD_INIT_DONE: &str = " finished at ";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn spec(name: &str, mac: &str, firmware: Firmware) -> VmSpec {
    let mut s = VmSpec::new(name, mac);
    s.firmware = firmware;
    s.memory_mib = 2048;
    s.cpus = 2;
    s.disk_bytes = DISK_BYTES;
    s
}

pub fn run() -> Result<()> {
    let (bin, boot, images) = prepare()?;

    // `STORK_BENCH_DEPLOY_PATHS=bios,uefi,http,sb,v6,layout` runs only those (all by default).
    let wanted = |name: &str| super::chosen("STORK_BENCH_DEPLOY_PATHS", name);
    let mut reports = Vec::new();
    for (path, lab_name, firmware) in [
        ("bios", "bench-deploy", Firmware::Bios),
        (
            "uefi",
            "bench-deploy-uefi",
            Firmware::Uefi { nic_rom: false },
        ),
        ("http", "bench-deploy-http", Firmware::UefiHttp),
        ("sb", "bench-deploy-sb", Firmware::UefiSecureBoot),
        ("v6", "bench-deploy-v6", Firmware::UefiIpv6),
    ] {
        if !wanted(path) {
            continue;
        }
        crate::step(&format!("{}: a lab of its own", firmware_name(firmware)));
        let net = match firmware {
            Firmware::UefiIpv6 | Firmware::UefiHttpIpv6 => Net::Ipv6Only,
            _ => Net::Ipv4,
        };
        let mut lab = Lab::with_net(lab_name, &crate::target().join("lab"), net)?;
        let config = match firmware {
            // The signed chain (shim, GRUB) instead of iPXE for UEFI PXE.
            Firmware::UefiSecureBoot => Some("[boot]\nsecure_boot = true\n"),
            // IPv6 only: DHCPv6 leases, no DHCPv4 (`tests/tests/ipv6.rs`).
            Firmware::UefiIpv6 | Firmware::UefiHttpIpv6 => {
                Some("[dhcp]\nmode = \"off\"\n\n[dhcp6]\nmode = \"full\"\n")
            }
            _ => None,
        };
        let appliance = match config {
            Some(text) => {
                let config = lab.dir().join("stork.toml");
                std::fs::write(&config, text)?;
                let config = config.to_string_lossy().into_owned();
                Appliance::start_with(&lab, &bin, &boot, &["--config", &config])?
            }
            None => Appliance::start(&lab, &bin, &boot)?,
        };
        let mut bench = Bench::new(
            &mut lab,
            appliance,
            &images,
            spec("bench-vm", MAC, firmware),
        )?;
        let report = bench.run(&mut lab, &images);
        reports.push(kept_on_error(report, &mut lab, &bench)?);
    }
    let layout = if wanted("layout") {
        Some(layout::measure(&bin, &boot, &images)?)
    } else {
        None
    };
    for r in &reports {
        r.print();
    }
    if let Some(layout) = layout {
        layout.print();
    }
    Ok(())
}

/// `cargo xtask bench deploy-layout`: only the layout deploy beside its floor.
pub fn run_layout() -> Result<()> {
    let (bin, boot, images) = prepare()?;
    layout::measure(&bin, &boot, &images)?.print();
    Ok(())
}

/// What every deploy bench needs: the tools, the boot files, the OS images, the appliance.
fn prepare() -> Result<(PathBuf, PathBuf, PathBuf)> {
    crate::deps::ensure()?;
    let boot = crate::images()?;
    let images = crate::os_images::build(&crate::target())?;
    crate::step("building the appliance");
    crate::status(crate::cargo().args(["build", "--quiet", "-p", "stork"]))?;
    Ok((crate::target().join("debug/stork"), boot, images))
}

/// `result`, or its error with the lab's logs kept and the appliance's last lines.
fn kept_on_error<T>(result: Result<T>, lab: &mut Lab, bench: &Bench) -> Result<T> {
    result.map_err(|e| {
        lab.keep_dir();
        e.context(format!(
            "logs kept in {}\n--- stork (last 20 lines) ---\n{}",
            lab.dir().display(),
            bench.appliance.log_tail(20)
        ))
    })
}

fn firmware_name(firmware: Firmware) -> &'static str {
    match firmware {
        Firmware::Bios => "SeaBIOS",
        Firmware::Uefi { nic_rom: true } => "OVMF, iPXE ROM",
        Firmware::Uefi { nic_rom: false } => "OVMF, PXE",
        Firmware::UefiHttp => "OVMF, HTTP boot",
        Firmware::UefiSecureBoot => "OVMF, Secure Boot (shim, GRUB)",
        Firmware::UefiIpv6 => "OVMF, PXE over IPv6 only",
        Firmware::UefiHttpIpv6 => "OVMF, HTTP boot over IPv6 only",
    }
}

struct Bench {
    appliance: Appliance,
    machine: BmcVm,
    firmware: Firmware,
    key: PathBuf,
    /// The raw image file as registered (what the agent streams), and its URL path.
    raw: PathBuf,
    raw_url: String,
    /// The image's data bytes, from its block map: what any writer must put on the disk.
    data_bytes: u64,
    /// The root tar (role `tar`) under the boot root, if the image has one.
    tar_rel: Option<String>,
}

/// An install followed to the agent's reboot, times in ms since the epoch.
struct Install {
    power_on: i64,
    /// The agent's first console line (its first event if none was seen).
    console_seen: i64,
    first_agent: i64,
    /// The agent's last console line, "done, rebooting".
    stopped: i64,
    events: Vec<EventRecord>,
}

impl Install {
    /// The time of the deploy's first event starting with `prefix`.
    fn at(&self, prefix: &str) -> Result<i64> {
        self.events
            .iter()
            .find(|e| e.message.starts_with(prefix))
            .map(|e| e.at)
            .with_context(|| format!("no event {prefix:?} in the deploy"))
    }
}

/// One deploy's measured phases, in ms.
#[derive(Debug, Default)]
struct Phases {
    boot_to_agent: i64,
    pxe_to_agent_console: i64,
    image: i64,
    finish: i64,
    os_boot: i64,
}

impl Bench {
    fn new(lab: &mut Lab, appliance: Appliance, images: &Path, vm: VmSpec) -> Result<Self> {
        let firmware = vm.firmware;
        let boot_root = appliance.data_dir.join("boot");
        let resource = stork_lab::images::os_resource(images, &boot_root, IMAGE, None)?;
        let raw_rel = resource
            .files
            .iter()
            .find(|f| f.role == ImageRole::Raw)
            .map(|f| f.path.clone())
            .context("the image has no raw file")?;
        let map_rel = resource
            .files
            .iter()
            .find(|f| f.role == ImageRole::DiskMap)
            .map(|f| f.path.clone())
            .context("the image has no block map")?;
        let map: BlockMap = serde_json::from_slice(&std::fs::read(boot_root.join(&map_rel))?)
            .context("the image's block map")?;
        let file = lab.dir().join("resource.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&resource)?)?;
        appliance.cli(&["image", "register", path_str(&file)?])?;

        let key = lab.dir().join("id_ed25519");
        stork_lab::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "stork-bench", "-f"])
                .arg(&key),
        )?;
        appliance.cli(&[
            "ssh-key",
            "add",
            "bench",
            path_str(&key.with_extension("pub"))?,
        ])?;
        let machine = BmcVm::start(lab, vm, BMC_PORT)?;
        Ok(Self {
            firmware,
            data_bytes: map.data_bytes(),
            tar_rel: resource
                .files
                .iter()
                .find(|f| f.role == ImageRole::Tar)
                .map(|f| f.path.clone()),
            raw: boot_root.join(&raw_rel),
            raw_url: match firmware {
                Firmware::UefiIpv6 | Firmware::UefiHttpIpv6 => {
                    format!("http://[{}]:8080/boot/{raw_rel}", stork_lab::APPLIANCE_IP6)
                }
                _ => format!("http://{}:8080/boot/{raw_rel}", stork_lab::APPLIANCE_IP),
            },
            appliance,
            machine,
            key,
        })
    }

    /// Adds the VM with its IPMI parameters, has Stork power it on to enlist, then
    /// commissions it (not timed); returns its id.
    fn ready(&mut self) -> Result<String> {
        crate::step("stork: enlist and commission, powered through the BMC (not timed)");
        let id = self
            .appliance
            .add_ipmi_machine(&self.machine.spec.mac, &self.machine.bmc)?
            .id;
        self.appliance.cli(&["machine", "power", &id, "on"])?;
        self.machine.bmc.wait_powered_on()?;
        self.machine
            .wait_enlisted(&mut self.appliance, &id, PHASE_TIMEOUT)?;
        self.wait_off()?;
        self.appliance.cli(&["machine", "commission", &id])?;
        self.wait_status(&id, Status::Ready, &[Status::Commissioning])?;
        self.wait_off()?;
        Ok(id)
    }

    /// Releases the deployed machine (no erase: its disks are written again next) and
    /// deploys it into memory, where the floor is measured over SSH; returns its address.
    fn redeploy_in_memory(&mut self, id: &str) -> Result<String> {
        self.appliance
            .cli(&["machine", "release", id, "--no-erase"])?;
        self.wait_status(id, Status::Ready, &[Status::Releasing, Status::DiskErasing])?;
        // The release powered the machine off through its BMC.
        self.wait_off()?;
        self.appliance.cli(&["machine", "allocate", id])?;
        self.appliance.cli(&[
            "machine",
            "deploy",
            id,
            "--image",
            IMAGE,
            "--target",
            "memory",
            "--hostname",
            "stork-bench-mem",
        ])?;
        self.wait_status(id, Status::Deployed, &[Status::Deploying])?;
        stork_lab::guest::leased_ip(&self.machine.paths.console)
    }

    fn run(&mut self, lab: &mut Lab, images: &Path) -> Result<Report> {
        let id = self.ready()?;

        crate::step("stork: deploy to disk, power-on to Deployed");
        self.appliance.cli(&["machine", "allocate", &id])?;
        let stork = self.deploy_to_disk(&id)?;

        crate::step(
            "floor: the image over the wire and its data through dd, in the same VM (deployed into memory)",
        );
        let ip = self.redeploy_in_memory(&id)?;
        let (wire_ms, disk_ms) = self.image_floor(lab, &ip)?;
        self.power_off(&id)?;

        crate::step("floor: the image booted from disk to cloud-init's end");
        let os_floor = os_boot_floor(lab, images, &self.key, self.firmware)?;

        Ok(Report {
            firmware: self.firmware,
            stork,
            image_bytes: std::fs::metadata(&self.raw)?.len(),
            data_bytes: self.data_bytes,
            wire_ms,
            disk_ms,
            os_floor,
        })
    }

    /// Deploys to disk (Stork powers the VM on) and follows it to Deployed; returns the
    /// phases.
    fn deploy_to_disk(&mut self, id: &str) -> Result<Phases> {
        let install =
            self.follow_install(id, &["--target", "disk", "--hostname", "stork-bench"])?;
        let at = |prefix: &str| install.at(prefix);
        let disk_started = at("disk Started")?;
        let image_done = at("image Done")?;
        let p = Phases {
            boot_to_agent: install.first_agent - install.power_on,
            pxe_to_agent_console: install.console_seen - install.power_on,
            image: image_done - disk_started,
            finish: install.stopped - image_done,
            os_boot: self.boot_installed(id, install.stopped)?,
        };
        eprintln!(
            "  deployed: boot to agent {:.1} s, image {:.1} s, finish {:.1} s, OS boot {:.1} s",
            secs(p.boot_to_agent),
            secs(p.image),
            secs(p.finish),
            secs(p.os_boot)
        );
        Ok(p)
    }

    /// `machine deploy ID --image IMAGE <args>` (Stork powers the VM on through its BMC) and
    /// follows the install to the agent's reboot: the deploy's events and the bench's clock.
    fn follow_install(&mut self, id: &str, args: &[&str]) -> Result<Install> {
        let before = self.events(id)?.len();
        // The console holds every boot of the machine: only what this one adds counts.
        let console = &self.machine.paths.console;
        let offset = std::fs::metadata(console).map_or(0, |m| m.len());
        let mut deploy = vec!["machine", "deploy", id, "--image", IMAGE];
        deploy.extend(args);
        let power_on = now_ms();
        self.appliance.cli(&deploy)?;
        let mut console_seen = None;
        // The agent's first console line gives the floor's PXE-to-agent term.
        wait_for("the image to be installed", PHASE_TIMEOUT, POLL, || {
            let added = console_from(console, offset);
            if console_seen.is_none() && added.contains("stork-agent:") {
                console_seen = Some(now_ms());
            }
            if added.contains("stork-agent: done, rebooting") {
                return Ok(Some(()));
            }
            let m = self.appliance.machine(id)?;
            if m.status != Status::Deploying {
                bail!("deploy ended in {}: {:?}", m.status, m.status_message);
            }
            Ok(None)
        })?;
        let stopped = now_ms();
        let events: Vec<EventRecord> = self.events(id)?.into_iter().skip(before).collect();
        let first_agent = events
            .iter()
            .find(|e| e.actor == "agent")
            .map(|e| e.at)
            .context("no agent event in the deploy")?;
        // The agent says where the image step's time went: print it beside the figures.
        if let Some(m) = events
            .iter()
            .map(|e| e.message.as_str())
            .find(|m| m.starts_with("image Done"))
        {
            eprintln!("  agent: {m}");
        }
        Ok(Install {
            power_on,
            console_seen: console_seen.unwrap_or(first_agent),
            first_agent,
            stopped,
            events,
        })
    }

    /// The agent's reboot (at `rebooting`, ms) into the installed OS, to Deployed, in ms:
    /// the VM resets in place and its firmware boots what Stork and the agent set.
    fn boot_installed(&mut self, id: &str, rebooting: i64) -> Result<i64> {
        self.wait_status(id, Status::Deployed, &[Status::Deploying])?;
        Ok(now_ms() - rebooting)
    }

    /// The image floor's two legs inside the VM, as its own clock measured them, in ms:
    /// the registered image file fetched from the appliance's HTTP server (the wire), and
    /// `dd` writing the image's data bytes onto the disk with direct I/O, as the agent's own
    /// writes are unbuffered (the disk).
    fn image_floor(&self, lab: &Lab, ip: &str) -> Result<(i64, i64)> {
        let fetch = fetch(&self.raw_url);
        let blocks = self.data_bytes.div_ceil(4 << 20);
        let disk = format!(
            "d=$(lsblk -dno NAME,TYPE | awk '$2==\"disk\"{{print $1; exit}}'); \
             sudo dd if=/dev/zero of=/dev/$d bs=4M count={blocks} oflag=direct status=none; sync"
        );
        match self.timed_in_vm(lab, ip, "", &[&fetch, &disk])?[..] {
            [wire, disk] => Ok((wire, disk)),
            _ => bail!("the floor's legs did not all report a time"),
        }
    }

    /// Runs `setup` (not timed), then each of `legs` in turn, in the VM at `ip` over SSH;
    /// returns each leg's time in ms as the VM's own clock measured it.
    fn timed_in_vm(&self, lab: &Lab, ip: &str, setup: &str, legs: &[&str]) -> Result<Vec<i64>> {
        // Each leg is a script of its own under `set -e`, so its first failing command stops
        // it, and a failure prints the leg's last lines on stderr (the error shows them).
        let mut script = format!("set -e; {setup}\n");
        for (n, leg) in legs.iter().enumerate() {
            script.push_str(&format!(
                "cat > /tmp/stork-leg{n}.sh <<'STORK_LEG'\nset -e\n{leg}\nSTORK_LEG\n\
                 s=$(date +%s%N)\n\
                 if ! bash /tmp/stork-leg{n}.sh > /tmp/stork-leg{n}.log 2>&1; then \
                 echo \"leg {n} failed:\" >&2; tail -n 20 /tmp/stork-leg{n}.log >&2; \
                 echo \"kernel:\" >&2; sudo dmesg | tail -n 5 >&2; exit 1; fi\n\
                 e=$(date +%s%N); echo \"$(( (e - s) / 1000000 ))\"\n"
            ));
        }
        let out = stork_lab::guest::ssh(lab, &self.key, &format!("{USER}@{ip}"), &script)?;
        let times: Vec<i64> = out
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("the floor's times from the VM: {out:?}"))?;
        if times.len() != legs.len() {
            bail!("the floor's times from the VM: {out:?}");
        }
        Ok(times)
    }

    fn events(&self, id: &str) -> Result<Vec<EventRecord>> {
        self.appliance.events(id)
    }

    fn wait_off(&mut self) -> Result<()> {
        self.machine
            .wait_off("the VM to power off", Duration::from_secs(120))
    }

    /// Stork powers the machine off through its BMC.
    fn power_off(&mut self, id: &str) -> Result<()> {
        self.appliance.cli(&["machine", "power", id, "off"])?;
        self.wait_off()
    }

    fn wait_status(&mut self, id: &str, want: Status, passing: &[Status]) -> Result<()> {
        wait_for(&format!("status {want}"), PHASE_TIMEOUT, POLL, || {
            let m = self.appliance.machine(id)?;
            match m.status {
                s if s == want => Ok(Some(())),
                s if passing.contains(&s) => Ok(None),
                other => bail!(
                    "status {other} ({:?}) while waiting for {want}",
                    m.status_message
                ),
            }
        })
    }
}

/// The floor's OS-boot term: a VM of the same kind whose disk already holds the image (4 GiB,
/// as deployed), with a NoCloud seed volume and its NIC on the lab bridge, booted from disk;
/// power-on to cloud-init's "finished" line on the serial console, in ms.
fn os_boot_floor(lab: &mut Lab, images: &Path, key: &Path, firmware: Firmware) -> Result<i64> {
    let mut s = spec("floor-vm", FLOOR_MAC, firmware);
    s.keep_disk = true;
    let dir = lab.dir().join(&s.name);
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.raw");
    stork_lab::run(
        Command::new("zstd")
            .args(["-d", "-q", "-f", "--sparse"])
            .arg(images.join(format!("{IMAGE}.raw.zst")))
            .arg("-o")
            .arg(&disk),
    )?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)?
        .set_len(DISK_BYTES)?;
    let seed = seed(&dir, key)?;
    let (mut argv, paths) = qemu_argv(lab, &s)?;
    argv.extend([
        "-drive".to_string(),
        format!("file={},if=virtio,format=raw,readonly=on", seed.display()),
        "-set".to_string(),
        format!("device.{DISK_ID}.bootindex=1"),
    ]);
    let mut cmd = lab.command(&argv[0]);
    cmd.args(&argv[1..]);
    let started = Instant::now();
    let mut vm = Spawned::start(&s.name, cmd, &paths.dir.join("qemu.log"))?;
    wait_for("cloud-init to finish", PHASE_TIMEOUT, POLL, || {
        if vm.exited().is_some() {
            bail!("the floor VM stopped: {}", vm.log_tail(10));
        }
        Ok(console_has(&paths.console, CLOUD_INIT_DONE).then_some(()))
    })?;
    let ms = started.elapsed().as_millis() as i64;
    eprintln!(
        "  floor VM: cloud-init finished {:.1} s after power-on",
        secs(ms)
    );
    Ok(ms)
}

/// A `CIDATA` FAT volume with what Stork's own seed carries: hostname and the SSH key.
fn seed(dir: &Path, key: &Path) -> Result<PathBuf> {
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    std::fs::write(
        dir.join("meta-data"),
        "instance-id: stork-bench-floor\nlocal-hostname: stork-bench-floor\n",
    )?;
    std::fs::write(
        dir.join("user-data"),
        format!(
            "#cloud-config\nssh_authorized_keys:\n  - {}\n",
            public.trim()
        ),
    )?;
    let img = dir.join("seed.img");
    let _ = std::fs::remove_file(&img);
    stork_lab::run(
        Command::new("mkfs.vfat")
            .args(["-n", "CIDATA", "-C"])
            .arg(&img)
            .arg("1024"),
    )?;
    stork_lab::run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&img)
            .arg(dir.join("meta-data"))
            .arg(dir.join("user-data"))
            .arg("::"),
    )?;
    Ok(img)
}

/// One firmware's deploy beside its floor.
struct Report {
    firmware: Firmware,
    stork: Phases,
    /// The registered image file's bytes (what crosses the wire).
    image_bytes: u64,
    /// The image's data bytes (what reaches the disk).
    data_bytes: u64,
    wire_ms: i64,
    disk_ms: i64,
    os_floor: i64,
}

impl Report {
    fn print(&self) {
        let p = &self.stork;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let rate = |b: u64, ms: i64| mib(b) / secs(ms.max(1));
        let image_floor = self.wire_ms.max(self.disk_ms);
        let total = p.boot_to_agent + p.image + p.finish + p.os_boot;
        let floor = p.pxe_to_agent_console + image_floor + self.os_floor;
        println!();
        println!(
            "deploy to disk, power-on to Deployed ({}, TCG, 2 vCPUs, 2 GiB, 4 GiB disk)",
            firmware_name(self.firmware)
        );
        header();
        row(
            "PXE to agent (-> first agent event)",
            p.boot_to_agent,
            p.pxe_to_agent_console,
        );
        row("image", p.image, image_floor);
        println!(
            "  floor legs: wire {:.0} MiB in {:.1} s ({:.1} MiB/s), disk dd {:.0} MiB of data \
             in {:.1} s ({:.1} MiB/s)",
            mib(self.image_bytes),
            secs(self.wire_ms),
            rate(self.image_bytes, self.wire_ms),
            mib(self.data_bytes),
            secs(self.disk_ms),
            rate(self.data_bytes, self.disk_ms),
        );
        row("finish (grow, seed, reboot)", p.finish, 0);
        row("OS boot to cloud-init's end", p.os_boot, self.os_floor);
        row("total", total, floor);
        println!(
            "ratio {:.2}x the floor (targets, issue 18: total <= 1.10x, image <= 1.25x, OS boot \
             <= 1.05x)",
            total as f64 / floor.max(1) as f64
        );
    }
}

/// The phase table's header.
fn header() {
    println!(
        "{:<36} {:>9} {:>9} {:>7}",
        "phase", "stork s", "floor s", "ratio"
    );
}

/// One phase: Stork's time, the floor's (ms) and their ratio.
fn row(name: &str, s: i64, f: i64) {
    // A phase the floor does not have at all has no ratio, only its cost.
    let ratio = if f > 0 {
        format!("{:.2}x", s as f64 / f as f64)
    } else {
        "-".to_string()
    };
    println!("{name:<36} {:>9.1} {:>9.1} {ratio:>7}", secs(s), secs(f));
}

/// A shell command writing `url`'s body to stdout in the deployed image, which has python3
/// (cloud-init) but no curl: a plain HTTP GET, 1 MiB at a time.
fn fetch(url: &str) -> String {
    format!(
        "python3 -c 'import sys,shutil,urllib.request as u; \
         shutil.copyfileobj(u.urlopen(sys.argv[1]), sys.stdout.buffer, 1 << 20)' {url}"
    )
}

/// What the console at `path` holds after its first `offset` bytes (read from there: the
/// console of a whole run is several MiB, polled every quarter second).
fn console_from(path: &Path, offset: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let mut bytes = Vec::new();
    let _ = std::fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut bytes)
    });
    String::from_utf8_lossy(&bytes).into_owned()
}

fn console_has(path: &Path, needle: &str) -> bool {
    console_from(path, 0).contains(needle)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
