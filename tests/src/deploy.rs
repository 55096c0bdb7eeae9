//! One lab for deploy tests: the appliance with the Debian OS image registered and an SSH
//! key, and one machine powered only through its BMC (`ipmi_sim` starting and stopping the
//! VM's QEMU). The test is the operator: it adds the machine with its IPMI parameters and
//! asks Stork for power-on, commissioning and deploys; Stork does every power-on and -off.
//!
//! Each step is timed; [`Scenario::timings`] lists them, and a failure report carries them
//! with the machine's events, its console, the BMC's calls and the appliance's log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use stork_lab::appliance::Shared;
use stork_lab::bmc::{BmcVm, OPERATOR_PASSWORD};
use stork_lab::{Appliance, Lab, Net, VmSpec, wait_for};
use stork_proto::api::{Machine, Status};
use stork_proto::{DeployTarget, ImageRole};

use crate::{boot_files, lab_dir, require_artefacts, stork_bin};

/// The OS image set that `stork-image os` writes (its `manifest.json` and files).
pub fn os_images() -> PathBuf {
    crate::from_env("STORK_OS_IMAGES", "target/stork/images")
}

/// The image every deploy test deploys.
pub const IMAGE: &str = "debian-bookworm";
/// The image's cloud-init default user (the recipe's `[user] name`).
pub const USER: &str = "debian";
/// The BMC's port, on 127.0.0.1 inside the lab's namespace.
pub const BMC_PORT: u16 = 623;
const POLL: Duration = Duration::from_millis(500);
/// How long a machine may stay off while Stork expects it to run before that is a failure:
/// an IPMI power cycle leaves it off for about a second.
const OFF_GRACE: Duration = Duration::from_secs(30);

/// The lab, the appliance and one BMC-powered machine.
pub struct Scenario {
    // Dropped in this order: the BMC (and the VM it runs), the appliance, then the lab's
    // namespace with whatever still runs in it.
    pub machine: BmcVm,
    pub appliance: Appliance,
    pub lab: Lab,
    /// The private half of the SSH key given at deploy.
    pub key: PathBuf,
    /// The machine's id once it is known, for failure reports.
    pub id: Option<String>,
    /// Tags the machine is added with (`secure-boot`: the signed boot chain).
    pub tags: Vec<&'static str>,
    /// The deploy's `--kernel` (a name or version of the image's kernels), if any.
    pub kernel: Option<String>,
    /// The deploy's `--disk` (a kernel name, serial, WWN, model or path), if any.
    pub disk: Option<String>,
    /// The deploy's `--late-command`s.
    pub late_commands: Vec<String>,
    /// The image [`Scenario::deploy`] deploys: [`IMAGE`] unless a test uploaded its own.
    pub image: String,
    started: Instant,
    phase_started: Instant,
    phases: Vec<(String, Duration)>,
}

impl Scenario {
    /// A lab named after `tag` with the appliance, image [`IMAGE`] (its raw image's sha256
    /// replaced by `raw_sha256` if given), an SSH key, and `spec`'s machine, powered off.
    pub fn new(tag: &str, spec: VmSpec, raw_sha256: Option<&str>) -> Result<Self> {
        Self::new_on(tag, spec, raw_sha256, None)
    }

    /// As [`Scenario::new`], with the appliance configured by `config` (a `stork.toml`).
    pub fn with_config(tag: &str, spec: VmSpec, config: &str) -> Result<Self> {
        Self::start(tag, spec, None, None, Some(config), Net::Ipv4)
    }

    /// As [`Scenario::with_config`] on an IPv6-only lab network ([`Net::Ipv6Only`]).
    pub fn ipv6_only(tag: &str, spec: VmSpec, config: &str) -> Result<Self> {
        Self::start(tag, spec, None, None, Some(config), Net::Ipv6Only)
    }

    /// As [`Scenario::new`], with the appliance on `shared`'s database serving site
    /// `site` (`Some((shared, site))`), beside other scenarios' appliances on it: the image
    /// and the SSH key are registered once more (the same image, a key of its own).
    pub fn new_on(
        tag: &str,
        spec: VmSpec,
        raw_sha256: Option<&str>,
        shared: Option<(&Shared, &str)>,
    ) -> Result<Self> {
        Self::start(tag, spec, raw_sha256, shared, None, Net::Ipv4)
    }

    fn start(
        tag: &str,
        spec: VmSpec,
        raw_sha256: Option<&str>,
        shared: Option<(&Shared, &str)>,
        config: Option<&str>,
        net: Net,
    ) -> Result<Self> {
        require_artefacts();
        let images = os_images();
        let manifest = images.join("manifest.json");
        if !manifest.exists() {
            bail!(
                "{} is missing: build the OS image first (`cargo xtask test` does; or stork-image os --recipe image-builder/recipes/debian-bookworm.toml --out {})",
                manifest.display(),
                images.display()
            );
        }
        let mut lab = Lab::with_net(tag, &lab_dir(), net)?;
        let mut args: Vec<String> = Vec::new();
        if let Some((_, site)) = shared {
            args.extend(["--site".to_string(), site.to_string()]);
        }
        if let Some(text) = config {
            let path = lab.dir().join("stork.toml");
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            args.extend(["--config".to_string(), path.to_string_lossy().into_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let appliance = Appliance::start_on(
            &lab,
            &stork_bin(),
            &boot_files(),
            shared.map(|(db, _)| db),
            &args,
        )?;
        register_image(&appliance, &lab, &images, IMAGE, raw_sha256)?;

        let key = lab.dir().join("id_ed25519");
        stork_lab::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "stork-e2e", "-f"])
                .arg(&key),
        )?;
        appliance.cli(&[
            "ssh-key",
            "add",
            &format!("e2e-{tag}"),
            path_str(&key.with_extension("pub"))?,
        ])?;

        let machine = BmcVm::start(&mut lab, spec, BMC_PORT)?;
        let now = Instant::now();
        Ok(Self {
            lab,
            appliance,
            machine,
            key,
            id: None,
            tags: Vec::new(),
            disk: None,
            kernel: None,
            late_commands: Vec::new(),
            image: IMAGE.to_string(),
            started: now,
            phase_started: now,
            phases: Vec::new(),
        })
    }

    /// Registers another OS image of the built set (`debian-trixie`) and makes it the one
    /// [`Scenario::deploy`] deploys.
    pub fn use_image(&mut self, name: &str) -> Result<()> {
        register_image(&self.appliance, &self.lab, &os_images(), name, None)?;
        self.image = name.to_string();
        Ok(())
    }

    /// Prints `what` with the time since the scenario began.
    pub fn say(&self, what: &str) {
        eprintln!("[{:6.1} s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Starts timing a phase now (the previous phase's end is not a phase's start when the
    /// test did something in between).
    pub fn phase_start(&mut self) {
        self.phase_started = Instant::now();
    }

    /// Ends the phase begun by the last [`Scenario::phase_start`] or [`Scenario::phase_done`].
    pub fn phase_done(&mut self, name: &str) {
        let took = self.phase_started.elapsed();
        self.phases.push((name.to_string(), took));
        self.phase_started = Instant::now();
        self.say(&format!("{name}: {:.0} s", took.as_secs_f64()));
    }

    /// Every phase so far with its duration, one per line.
    pub fn timings(&self) -> String {
        self.phases
            .iter()
            .map(|(name, d)| format!("  {name:<36} {:6.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn status(&self, id: &str) -> Result<Machine> {
        self.appliance.machine(id)
    }

    /// The machine's history as `stork machine events` prints it.
    pub fn events(&self, id: &str) -> Result<String> {
        self.appliance.cli(&["machine", "events", id])
    }

    /// Adds the machine with its IPMI parameters (the answer must not show the BMC's
    /// password; Stork's power query must say off), has Stork power it on (the BMC's boot
    /// device is the default: the blank disk, then the network), and waits until the agent
    /// enlisted it and powered it off. Returns the machine id.
    pub fn add_and_enlist(&mut self) -> Result<String> {
        let m = self.appliance.add_ipmi_machine_tagged(
            &self.machine.spec.mac,
            &self.machine.bmc,
            &self.tags,
        )?;
        let shown = serde_json::to_string(&m)?;
        if shown.contains(OPERATOR_PASSWORD) {
            bail!("the API's answer to the add shows the BMC password: {shown}");
        }
        let id = m.id;
        self.id = Some(id.clone());
        let query = self.appliance.cli(&["machine", "power", &id, "query"])?;
        if !query.contains("off") {
            bail!("the machine is not off before its first power-on: {query}");
        }
        self.phase_start();
        self.appliance.cli(&["machine", "power", &id, "on"])?;
        self.machine
            .bmc
            .wait_powered_on()
            .context("`stork machine power on` did not power the VM on through its BMC")?;
        self.machine
            .wait_enlisted(&mut self.appliance, &id, Duration::from_secs(400))?;
        self.wait_off(
            "the agent's power-off after enlisting",
            Duration::from_secs(90),
        )?;
        self.phase_done("enlist (power-on to New, off)");
        Ok(id)
    }

    /// `stork machine commission`: Stork sets PXE and powers the machine on through the BMC;
    /// the agent commissions it; Stork powers it off. Waits for Ready and off.
    pub fn commission(&mut self, id: &str) -> Result<()> {
        self.commission_with(id, &[], Status::Ready)
    }

    /// Commissions with the hardware `tests` (`--test`), to `want` (Ready, or failed
    /// commissioning for a test that must find a fault) and off; both power actions are in
    /// the history, the BMC's password in no event or log line.
    pub fn commission_with(&mut self, id: &str, tests: &[&str], want: Status) -> Result<()> {
        self.phase_start();
        let mut args = vec!["machine", "commission", id];
        for t in tests {
            args.extend(["--test", t]);
        }
        self.appliance.cli(&args)?;
        if self.machine.bmc.boot() != "pxe" {
            bail!(
                "commissioning did not set the BMC's boot device to PXE: {:?}",
                self.machine.bmc.boot()
            );
        }
        self.wait_status(id, want, &[Status::Commissioning], Duration::from_secs(400))?;
        self.wait_off(
            "Stork's power-off after commissioning",
            Duration::from_secs(90),
        )?;
        // Both power actions went through the BMC, and its password is in neither the
        // history nor the log.
        let events = self.appliance.wait_events(
            id,
            &["NetbootAndPowerOn done", "PowerOff"],
            Duration::from_secs(30),
        )?;
        if events.contains(OPERATOR_PASSWORD)
            || self.appliance.log_tail(10_000).contains(OPERATOR_PASSWORD)
        {
            bail!("the BMC password appears in the events or the appliance's log");
        }
        self.phase_done(&format!("commission (to {want}, off)"));
        Ok(())
    }

    /// Allocates the machine and asks for a deploy of [`IMAGE`]; Stork sets PXE and powers it
    /// on through the BMC. Returns the QEMU process id of that power-on.
    pub fn deploy(&mut self, id: &str, target: DeployTarget, hostname: &str) -> Result<i32> {
        self.appliance.cli(&["machine", "allocate", id])?;
        self.phase_start();
        let mut args = vec![
            "machine",
            "deploy",
            id,
            "--image",
            &self.image,
            "--target",
            target.as_str(),
            "--hostname",
            hostname,
        ];
        if let Some(disk) = &self.disk {
            args.extend(["--disk", disk.as_str()]);
        }
        if let Some(kernel) = &self.kernel {
            args.extend(["--kernel", kernel.as_str()]);
        }
        for c in &self.late_commands {
            args.extend(["--late-command", c.as_str()]);
        }
        self.appliance.cli(&args)?;
        let m = self.status(id)?;
        if m.status != Status::Deploying {
            bail!("after `machine deploy` the status is {}", m.status);
        }
        if self.machine.bmc.boot() != "pxe" {
            bail!(
                "the deploy did not set the BMC's boot device to PXE: {:?}",
                self.machine.bmc.boot()
            );
        }
        // On at once when it was off; a power cycle leaves it off for about a second.
        let pid = wait_for(
            "Stork to power the VM on through its BMC",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || Ok(self.machine.qemu_pid()),
        )?;
        self.say(&format!(
            "deploy ({target}) requested; Stork powered the VM on (QEMU pid {pid})"
        ));
        Ok(pid)
    }

    /// Deploys [`IMAGE`] into memory with `hostname`, waits for Deployed (the OS phoned
    /// home) and logs in over SSH to check the hostname; returns the machine's address.
    pub fn deploy_in_memory_and_log_in(&mut self, id: &str, hostname: &str) -> Result<String> {
        self.deploy(id, DeployTarget::Memory, hostname)?;
        self.wait_status(
            id,
            Status::Deployed,
            &[Status::Deploying],
            Duration::from_secs(600),
        )?;
        self.phase_done("deploy in memory (to phone-home)");
        let ip = self.leased_ip()?;
        let got = self.ssh_when_up(&ip, "hostname")?;
        if got.trim() != hostname {
            bail!("over SSH the hostname is {got:?}, wanted {hostname:?}");
        }
        self.say(&format!("ssh {ip}: hostname {hostname}"));
        Ok(ip)
    }

    /// Waits until the machine's QEMU has stopped.
    pub fn wait_off(&self, what: &str, timeout: Duration) -> Result<()> {
        self.machine.wait_off(what, timeout)
    }

    /// Waits for status `want`, failing at once on any status outside `passing`, and when the
    /// machine stays off for `OFF_GRACE` while passing (nothing would change any more).
    pub fn wait_status(
        &mut self,
        id: &str,
        want: Status,
        passing: &[Status],
        timeout: Duration,
    ) -> Result<Machine> {
        let mut off_since: Option<Instant> = None;
        wait_for(&format!("status {want}"), timeout, POLL, || {
            let m = self.status(id)?;
            match m.status {
                s if s == want => Ok(Some(m)),
                s if passing.contains(&s) => {
                    if self.machine.is_on() {
                        off_since = None;
                    } else if off_since.get_or_insert_with(Instant::now).elapsed() > OFF_GRACE {
                        bail!("the VM has been off for {OFF_GRACE:?} while {s}");
                    }
                    Ok(None)
                }
                other => bail!(
                    "status {other} ({:?}) while waiting for {want}",
                    m.status_message
                ),
            }
        })
    }

    /// Waits for the deploy under way to end, which must be in FailedDeployment with a
    /// message holding each of `phrases` (`what` names the failure expected); then for Stork
    /// to power the machine off. Returns the message.
    pub fn deploy_fails_with(&mut self, id: &str, what: &str, phrases: &[&str]) -> Result<String> {
        let m = wait_for(
            &format!("the deployment to fail ({what})"),
            Duration::from_secs(600),
            Duration::from_millis(500),
            || {
                let m = self.status(id)?;
                Ok((m.status != Status::Deploying).then_some(m))
            },
        )?;
        let msg = m.status_message.unwrap_or_default();
        if m.status != Status::FailedDeployment || !phrases.iter().all(|p| msg.contains(p)) {
            bail!(
                "expected failed_deployment {what}, got {} ({msg})",
                m.status
            );
        }
        self.say(&format!(
            "failed as it should: {}",
            msg.lines().next().unwrap_or_default()
        ));
        self.wait_off(
            &format!("Stork's power-off after the failed deployment ({what})"),
            Duration::from_secs(90),
        )?;
        Ok(msg)
    }

    /// Everything the machine's serial console printed, every boot of it.
    pub fn console(&self) -> Result<String> {
        let bytes = std::fs::read(&self.machine.paths.console)
            .with_context(|| format!("read {}", self.machine.paths.console.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Fails unless the TFTP server never heard a request: a machine that boots over HTTP
    /// only.
    pub fn check_no_tftp(&self) -> Result<()> {
        let stats = self.appliance.stats()?;
        let tftp = stats.counter("tftp", "requests").unwrap_or(0);
        if tftp != 0 {
            bail!("{tftp} TFTP requests from a machine that boots over HTTP only: {stats:#?}");
        }
        Ok(())
    }

    /// The address the machine leased (its agent printed it on the console).
    pub fn leased_ip(&self) -> Result<String> {
        stork_lab::guest::leased_ip(&self.machine.paths.console)
    }

    /// Runs `command` on the machine over SSH as [`USER`], from inside the lab namespace.
    pub fn ssh(&self, ip: &str, command: &str) -> Result<String> {
        stork_lab::guest::ssh(&self.lab, &self.key, &format!("{USER}@{ip}"), command)
    }

    /// Logs in over SSH (retrying while sshd comes up) and runs `command`.
    pub fn ssh_when_up(&self, ip: &str, command: &str) -> Result<String> {
        wait_for(
            "SSH into the deployed machine",
            Duration::from_secs(180),
            Duration::from_secs(2),
            || Ok(self.ssh(ip, command).ok()),
        )
    }

    /// Follows a deploy to disk whose machine Stork powered on (QEMU `pid`, after
    /// `power_ons` BMC power-ons): the agent installs (its `installed` report clears the
    /// machine's network boot), reboots, the VM resets in place (no power-on by Stork or the
    /// test) and comes up from its disk: Deployed. Times both phases, the first as `phase`.
    pub fn install_and_reboot_in_place(
        &mut self,
        id: &str,
        pid: i32,
        power_ons: usize,
        phase: &str,
    ) -> Result<()> {
        wait_for(
            "the agent to install the image",
            Duration::from_secs(900),
            POLL,
            || {
                // VM first, then status: see `add_and_enlist`.
                let was_on = self.machine.is_on();
                let m = self.status(id)?;
                if m.status == Status::Deployed {
                    return Ok(Some(()));
                }
                if m.status != Status::Deploying {
                    bail!(
                        "status {} ({:?}) while the agent installs",
                        m.status,
                        m.status_message
                    );
                }
                if !was_on {
                    bail!("the VM powered off while the agent installed");
                }
                Ok((!m.netboot).then_some(()))
            },
        )?;
        self.phase_done(phase);
        self.wait_status(
            id,
            Status::Deployed,
            &[Status::Deploying],
            Duration::from_secs(900),
        )?;
        self.phase_done("reboot from disk to phone-home");
        if self.machine.qemu_pid() != Some(pid) || self.machine.power_ons() != power_ons {
            bail!(
                "the machine did not reboot in place: QEMU pid {pid} at power-on, now {:?}; BMC calls:\n{}",
                self.machine.qemu_pid(),
                self.machine.bmc.calls()
            );
        }
        Ok(())
    }

    /// How many boot scripts the appliance served to `mac` that sent it on to its disk
    /// (iPXE's `exit`), read from the appliance's log: each one is a network boot the
    /// firmware made before it booted the disk.
    /// Only those asked from `ip` (the machine's own address: a hostile host may ask with
    /// its MAC).
    pub fn local_disk_scripts(&self, mac: &str, ip: &str) -> Result<usize> {
        let log = self.lab.dir().join("stork.log");
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        let served = format!("serving iPXE script mac={mac} from={ip} ");
        Ok(text
            .lines()
            .filter(|l| l.contains(&served) && l.contains("choice=LocalDisk"))
            .count())
    }

    /// Checks that after the agent's reboot into the installed OS the firmware went straight
    /// to the disk: the appliance served `mac` at `ip` no `exit` script (it answers one to any network
    /// boot of a deployed machine) and the console after the agent's last line shows no
    /// network boot (`network_boot`: what the firmware or iPXE prints when it starts one).
    /// Returns the console from the reboot on.
    pub fn booted_straight_to_disk(
        &self,
        mac: &str,
        ip: &str,
        network_boot: &[&str],
    ) -> Result<String> {
        let detours = self.local_disk_scripts(mac, ip)?;
        if detours != 0 {
            bail!("after the install the machine network-booted {detours} time(s) before its disk");
        }
        let console = self.console()?;
        let after_reboot = console
            .rsplit_once("stork-agent: done, rebooting")
            .map(|(_, rest)| rest.to_string())
            .context("the console lacks the agent's last line")?;
        for marker in network_boot {
            if after_reboot.contains(marker) {
                bail!("after the agent's reboot the console shows a network boot: {marker:?}");
            }
        }
        Ok(after_reboot)
    }

    /// Fails with everything a person needs to see why, and keeps the lab's files.
    pub fn fail(&mut self, e: anyhow::Error) -> ! {
        panic!("{e:#}\n{}", self.report());
    }

    /// Everything a person needs to see why a step failed: the machine's status and
    /// events, the phases, its console, the appliance's log; keeps the lab's files.
    pub fn report(&mut self) -> String {
        self.lab.keep_dir();
        let id = self.id.clone();
        let events = id
            .as_deref()
            .and_then(|id| self.events(id).ok())
            .unwrap_or_default();
        let machine = id
            .as_deref()
            .and_then(|id| self.appliance.machine(id).ok())
            .map(|m| format!("status {} ({:?})", m.status, m.status_message))
            .unwrap_or_default();
        format!(
            "--- machine: {machine}\n--- phases ---\n{}\n--- events ---\n{events}\n--- {} console (last 60 lines) ---\n{}\n{}\n--- stork (last 30 lines) ---\n{}\n(logs kept in {})",
            self.timings(),
            self.machine.describe(),
            self.machine.console_tail(60),
            self.machine.diagnostics(),
            self.appliance.log_tail(30),
            self.lab.dir().display()
        )
    }
}

/// Deploys [`IMAGE`] to the machine's disk and logs in: the agent streams the image (cut
/// once mid-stream when `cut_download`, and then it must resume with a Range request), writes
/// the seed, reports installed and reboots; the reboot resets the VM in place (no power-on
/// by Stork or the test), the firmware boots the disk (straight to it where Stork set the
/// next boot, through the BMC or `BootNext`; else after a network boot Stork answers with
/// `exit`), cloud-init phones home: Deployed. Then SSH with the deploy's
/// key reads `hostname` and the root file system's size. Returns the machine's address.
pub fn deploy_to_disk_and_log_in(
    s: &mut Scenario,
    id: &str,
    hostname: &str,
    cut_download: bool,
) -> Result<String> {
    let pid = s.deploy(id, DeployTarget::Disk, hostname)?;
    let power_ons = s.machine.power_ons();

    if cut_download {
        // The appliance's end of every established HTTP connection is destroyed (`ss -K`,
        // a RST to the agent) once the image streams.
        wait_for(
            "the image to be streaming",
            Duration::from_secs(400),
            POLL,
            || {
                let m = s.status(id)?;
                if m.status != Status::Deploying {
                    bail!(
                        "status {} ({:?}) before the image streamed",
                        m.status,
                        m.status_message
                    );
                }
                Ok(s.events(id)?.contains("image Progress").then_some(()))
            },
        )?;
        stork_lab::run(s.lab.command("ss").args([
            "-K",
            "state",
            "established",
            "( sport = :8080 )",
        ]))?;
        s.say("cut the download connection");
    }

    s.install_and_reboot_in_place(id, pid, power_ons, "deploy (power-on to installed)")?;

    let ip = s.leased_ip()?;
    let got = s.ssh_when_up(&ip, "hostname")?;
    if got.trim() != hostname {
        bail!(
            "the deployed machine says its hostname is {:?}, asked for {hostname:?}",
            got.trim()
        );
    }
    s.say(&format!("ssh {USER}@{ip}: hostname {}", got.trim()));
    // The root file system grew to the disk at first boot (agent: partition; cloud-init: ext4).
    let df = s.ssh(&ip, "df -B1 --output=size / | tail -1")?;
    let root_bytes: u64 = df
        .trim()
        .parse()
        .with_context(|| format!("df said {df:?}"))?;
    if root_bytes < s.machine.spec.disk_bytes * 3 / 4 {
        bail!(
            "the root file system is {root_bytes} bytes: it did not grow to the {} byte disk",
            s.machine.spec.disk_bytes
        );
    }

    let events = s.events(id)?;
    if cut_download {
        let resumes = events
            .lines()
            .filter(|l| l.contains("image Done"))
            .find_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let i = words.iter().position(|w| w.starts_with("resumes"))?;
                words.get(i.checked_sub(1)?)?.parse::<u32>().ok()
            });
        if resumes.is_none_or(|n| n == 0) {
            bail!("the cut download was not resumed (resumes: {resumes:?}):\n{events}");
        }
    }
    for want in ["image Done", "DeploymentDone: deploying -> deployed"] {
        if !events.contains(want) {
            bail!("event history lacks {want:?}:\n{events}");
        }
    }
    Ok(ip)
}

/// Checks, from the host and with the VM stopped, that the disk image file `disk` holds
/// nothing at all: no MBR boot signature (0x55AA at byte 510), no GPT header ("EFI PART") at
/// LBA 1 or at the last LBA, no signature that `wipefs` or `blkid` knows (file systems'
/// magic in the first MiB among them), no partition table for `sgdisk`, and not one non-zero
/// byte anywhere. Returns what was checked, for the log.
pub fn check_blank_disk(disk: &Path) -> Result<String> {
    use std::os::unix::fs::FileExt;

    const SECTOR: u64 = 512;
    let f = std::fs::File::open(disk).with_context(|| format!("open {}", disk.display()))?;
    let size = f.metadata()?.len();
    let at = |offset: u64, len: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    if at(510, 2)? == [0x55, 0xAA] {
        bail!("{}: an MBR boot signature at byte 510", disk.display());
    }
    for (what, lba) in [("primary", 1), ("backup", size / SECTOR - 1)] {
        if at(lba * SECTOR, 8)? == b"EFI PART" {
            bail!("{}: a {what} GPT header at LBA {lba}", disk.display());
        }
    }
    let path = path_str(disk)?;
    let wipefs = stork_lab::run(Command::new("wipefs").args(["--no-act", path]))?;
    if !wipefs.trim().is_empty() {
        bail!("wipefs still finds signatures on {path}:\n{wipefs}");
    }
    let blkid = Command::new("blkid").args(["-p", path]).output()?;
    // blkid exits 2 when it finds nothing.
    if blkid.status.code() != Some(2) {
        bail!(
            "blkid -p still recognises {path}: {}",
            String::from_utf8_lossy(&blkid.stdout)
        );
    }
    let sgdisk = Command::new("sgdisk").args(["-p", path]).output()?;
    let text = String::from_utf8_lossy(&sgdisk.stdout).to_string()
        + &String::from_utf8_lossy(&sgdisk.stderr);
    if !text.contains("GPT: not present") && !text.contains("Creating new GPT entries") {
        bail!("sgdisk still finds a partition table on {path}:\n{text}");
    }
    // Every byte of its data, holes being zeros. Slices compared whole (memcmp): a byte
    // loop in a debug build reads at some 60 MB/s.
    let zeros = vec![0u8; stork_image::blockmap::BLOCK as usize];
    stork_image::blockmap::visit_data(&f, size, |at, bytes| -> Result<()> {
        if bytes != &zeros[..bytes.len()]
            && let Some(i) = bytes.iter().position(|b| *b != 0)
        {
            bail!("{path}: a non-zero byte at {} of {size}", at + i as u64);
        }
        Ok(())
    })?;
    Ok(format!(
        "{path}: no MBR, no GPT at LBA 1 or {}, nothing for wipefs, blkid or sgdisk, all {size} bytes zero",
        size / SECTOR - 1
    ))
}

/// The sha256 of file `path` (a VM's disk image), to show a deploy left it untouched.
pub fn sha256_of(path: &Path) -> Result<String> {
    let (_, sum) = stork_image::manifest::sha256_file(path)
        .with_context(|| format!("hashing {}", path.display()))?;
    Ok(sum)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Links (or copies) the image files of OS image `name` (of `stork-image os`'s manifest)
/// into the appliance's boot directory and registers them as a boot resource of that name,
/// roles `raw`, `squashfs` and `tar`.
fn register_image(
    appliance: &Appliance,
    lab: &Lab,
    images: &Path,
    name: &str,
    raw_sha256: Option<&str>,
) -> Result<()> {
    let resource =
        stork_lab::images::os_resource(images, &appliance.data_dir.join("boot"), name, raw_sha256)?;
    let file = lab.dir().join(format!("{name}.resource.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(&resource)?)?;
    appliance.cli(&["image", "register", path_str(&file)?])?;
    Ok(())
}

/// Makes a qcow2 of [`IMAGE`]'s raw disk image (as a user's own image would come) and
/// uploads it with `stork image upload` as boot resource `name`: first with a wrong
/// `--sha256`, which must be refused naming the field and leave nothing (no file under the
/// boot root's `images/`, no resource), then with the sum the CLI computes. Returns what the
/// appliance stored.
pub fn upload_qcow2(s: &Scenario, name: &str) -> Result<String> {
    let raw = s.lab.dir().join(format!("{name}.raw"));
    let qcow2 = s.lab.dir().join(format!("{name}.qcow2"));
    let zst = os_images().join(format!("{IMAGE}.raw.zst"));
    stork_lab::run(
        Command::new("zstd")
            .args(["-q", "-f", "-d", "-o"])
            .arg(&raw)
            .arg(&zst),
    )?;
    stork_lab::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    )?;
    std::fs::remove_file(&raw)?;
    let images = s.appliance.data_dir.join("boot/images");
    let listing = || -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(&images)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    };
    let before = listing()?;
    let file = path_str(&qcow2)?;
    let wrong = "0".repeat(64);
    match s
        .appliance
        .cli(&["image", "upload", name, file, "--sha256", &wrong])
    {
        Ok(out) => bail!("an upload with a wrong sha256 was taken: {out}"),
        Err(e) if format!("{e:#}").contains("sha256: the upload's sha256 is") => {}
        Err(e) => bail!("an upload with a wrong sha256 failed otherwise: {e:#}"),
    }
    let list = s.appliance.cli(&["image", "list"])?;
    if listing()? != before || list.contains(name) {
        bail!(
            "the refused upload left something: images/ has {:?} (had {before:?}); image list:\n{list}",
            listing()?
        );
    }
    let out = s.appliance.cli(&["image", "upload", name, file])?;
    std::fs::remove_file(&qcow2)?;
    if !s.appliance.cli(&["image", "list"])?.contains(name) {
        bail!("the uploaded image {name} is not listed");
    }
    s.say(&format!(
        "a wrong --sha256 is refused and leaves nothing; {}",
        out.trim()
    ));
    Ok(out)
}

/// Registers boot resource `name`: [`IMAGE`] with its block map missing range `index` (the
/// same raw file, a map of its own, its sum in the resource), as a broken image build would
/// make it.
pub fn register_image_with_map_range_dropped(
    appliance: &Appliance,
    lab: &Lab,
    name: &str,
    index: usize,
) -> Result<()> {
    let out = lab.dir().join(name);
    stork_image::blockmap::copy_with_range_dropped(&os_images(), IMAGE, index, &out)?;
    let boot = appliance.data_dir.join("boot");
    let mut resource = stork_lab::images::os_resource(&out, &boot, IMAGE, None)?;
    resource.name = name.to_string();
    for f in resource
        .files
        .iter_mut()
        .filter(|f| f.role == ImageRole::DiskMap)
    {
        // The good image's map has the same file name: this one gets a name of its own.
        let from = out.join(Path::new(&f.path).file_name().context("map path")?);
        f.path = format!("images/{name}.raw.map.json");
        std::fs::copy(&from, boot.join(&f.path))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    if !resource.files.iter().any(|f| f.role == ImageRole::DiskMap) {
        bail!("image {IMAGE} has no block map: rebuild it (`cargo xtask images`)");
    }
    let file = lab.dir().join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(&resource)?)?;
    appliance.cli(&["image", "register", path_str(&file)?])?;
    Ok(())
}

/// A SeaBIOS machine with room for the installed Debian, or Debian in memory (cloud-init is
/// python, and sshd).
pub fn seabios(mac: &str, disk_bytes: u64) -> VmSpec {
    os_machine("vm1", mac, stork_lab::Firmware::Bios, disk_bytes)
}

/// A machine named `name` with `firmware` and room for Debian (2 GiB, 2 vCPUs).
pub fn os_machine(name: &str, mac: &str, firmware: stork_lab::Firmware, disk_bytes: u64) -> VmSpec {
    let mut spec = VmSpec::new(name, mac);
    spec.firmware = firmware;
    spec.memory_mib = 2048;
    spec.cpus = 2;
    spec.disk_bytes = disk_bytes;
    spec
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::check_blank_disk;

    /// The check reads the data and skips the holes: a byte in the last GiB of a 4 GiB disk
    /// is found, and a disk that is all hole passes.
    #[test]
    fn a_blank_disk_check_finds_a_byte_past_the_holes() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let f = tmp.as_file();
        f.set_len(4 << 30).unwrap();
        let blank = check_blank_disk(tmp.path()).unwrap();
        assert!(blank.contains("all 4294967296 bytes zero"), "{blank}");
        let at = (3 << 30) + 12345;
        f.write_all_at(&[7], at).unwrap();
        let err = check_blank_disk(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("a non-zero byte at {at} of")),
            "{err}"
        );
    }
}
