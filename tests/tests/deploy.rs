//! Deploying an OS end to end: a SeaBIOS VM enlists, commissions, gets the Debian image
//! streamed onto its disk by the agent, reboots from that disk, and the installed OS phones
//! home after cloud-init; the test then logs in over SSH with the key given at deploy. Then a
//! release with erase leaves no partition table or file-system signature on the disk. The
//! image download is cut once mid-stream and must be resumed. A wrong image checksum ends in
//! failed_deployment with the reason. A deploy into memory leaves the disk untouched.
//!
//! Power is manual: the test is the person who powers the VM on when the appliance asks.
//! QEMU runs with `-no-reboot`, so the agent's reboot into the installed OS stops QEMU, and
//! the test powers the VM on again with the same disk ([`Vm::restart`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use stork_lab::{Appliance, Lab, Vm, VmSpec, wait_for};
use stork_tests::{boot_files, lab_dir, require_artefacts, stork_bin};

/// The OS image set that `stork-image os` writes (its `manifest.json` and files).
fn os_images() -> PathBuf {
    std::env::var_os("STORK_OS_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target/stork/images")
        })
}

const IMAGE: &str = "debian-bookworm";
/// The image's cloud-init default user (the recipe's `[user] name`).
const USER: &str = "debian";
const POLL: Duration = Duration::from_millis(500);

/// One lab with the appliance, the OS image registered, an SSH key, and one VM.
struct Scenario {
    lab: Lab,
    appliance: Appliance,
    vm: Vm,
    key: PathBuf,
    mac: String,
    started: Instant,
}

impl Scenario {
    fn new(tag: &str, mac: &str, sha256_override: Option<&str>) -> Result<Self> {
        Self::with_disk(tag, mac, sha256_override, 4 << 30)
    }

    fn with_disk(
        tag: &str,
        mac: &str,
        sha256_override: Option<&str>,
        disk_bytes: u64,
    ) -> Result<Self> {
        require_artefacts();
        let images = os_images();
        let manifest = images.join("manifest.json");
        assert!(
            manifest.exists(),
            "{} is missing: build the OS image first (stork-image os --recipe image-builder/recipes/debian-bookworm.toml --out {})",
            manifest.display(),
            images.display()
        );
        let mut lab = Lab::new(tag, &lab_dir())?;
        let appliance = Appliance::start(&lab, &stork_bin(), &boot_files())?;
        register_image(&appliance, &lab, &images, sha256_override)?;

        let key = lab.dir().join("id_ed25519");
        stork_lab::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "stork-e2e", "-f"])
                .arg(&key),
        )?;
        let public = key.with_extension("pub");
        appliance.cli(&["ssh-key", "add", "e2e", path_str(&public)?])?;

        let mut spec = VmSpec::new("vm1", mac);
        // The installed Debian runs cloud-init (python) and sshd: give it room.
        spec.memory_mib = 2048;
        spec.cpus = 2;
        spec.disk_bytes = disk_bytes;
        let vm = Vm::start(&mut lab, spec)?;
        Ok(Self {
            lab,
            appliance,
            vm,
            key,
            mac: mac.to_string(),
            started: Instant::now(),
        })
    }

    fn say(&self, what: &str) {
        eprintln!("[{:6.1} s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn status(&self, id: &str) -> Result<Value> {
        self.appliance.machine(id)
    }

    /// Power-on to New, then commissioning to Ready; returns the machine id.
    fn enlist_and_commission(&mut self) -> Result<String> {
        let mac = self.mac.clone();
        let m = wait_for("the VM to enlist", Duration::from_secs(300), POLL, || {
            let found = self
                .appliance
                .machines()?
                .into_iter()
                .find(|m| m["boot_mac"] == mac.as_str());
            if found.is_none()
                && let Some(status) = self.vm.exited()
            {
                bail!("the VM stopped ({status}) before it enlisted");
            }
            Ok(found)
        })?;
        let id = m["id"].as_str().context("machine id")?.to_string();
        self.say(&format!("enlisted as {id}"));
        self.wait_powered_off(Duration::from_secs(60))?;
        self.appliance.cli(&["machine", "commission", &id])?;
        self.vm.restart(&mut self.lab)?;
        self.wait_status(&id, "ready", &["commissioning"], Duration::from_secs(300))?;
        self.say("commissioned: ready");
        self.wait_powered_off(Duration::from_secs(60))?;
        Ok(id)
    }

    fn wait_powered_off(&mut self, timeout: Duration) -> Result<()> {
        wait_for("the VM to power off", timeout, POLL, || {
            Ok(self.vm.exited())
        })?;
        Ok(())
    }

    /// Waits for `want`, failing at once on any status outside `passing`.
    fn wait_status(
        &mut self,
        id: &str,
        want: &str,
        passing: &[&str],
        timeout: Duration,
    ) -> Result<Value> {
        wait_for(&format!("status {want}"), timeout, POLL, || {
            let m = self.status(id)?;
            match m["status"].as_str() {
                Some(s) if s == want => Ok(Some(m)),
                Some(s) if passing.contains(&s) => {
                    if let Some(st) = self.vm.exited() {
                        bail!("the VM stopped ({st}) while {s}");
                    }
                    Ok(None)
                }
                other => bail!(
                    "status {other:?} ({}) while waiting for {want}",
                    m["status_message"]
                ),
            }
        })
    }

    /// Deploy (already allocated) with the given target; powers the VM on.
    fn deploy(&mut self, id: &str, target: &str, hostname: &str) -> Result<()> {
        self.appliance.cli(&[
            "machine",
            "deploy",
            id,
            "--image",
            IMAGE,
            "--target",
            target,
            "--hostname",
            hostname,
        ])?;
        let m = self.status(id)?;
        if m["status"] != "deploying" {
            bail!("after `machine deploy` the status is {}", m["status"]);
        }
        self.say(&format!("deploy ({target}) requested; powering on"));
        self.vm.restart(&mut self.lab)
    }

    /// The address the machine leased: the agent prints it on the console (the appliance
    /// leases by MAC, so the installed OS gets the same one).
    fn leased_ip(&self) -> Result<String> {
        let dir = self.vm.console.parent().context("console dir")?;
        for entry in std::fs::read_dir(dir)? {
            let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
            if let Some(ip) = text
                .lines()
                .filter_map(|l| l.split_once("stork-agent: cmdline: ").map(|(_, r)| r))
                .filter_map(|r| r.split_whitespace().find_map(|w| w.strip_prefix("ip=")))
                .filter_map(|ip| ip.split('/').next())
                .next_back()
            {
                return Ok(ip.to_string());
            }
        }
        bail!("no agent cmdline line with ip= on any console")
    }

    /// Runs `command` on the machine over SSH, from inside the lab namespace.
    fn ssh(&self, ip: &str, command: &str) -> Result<String> {
        stork_lab::run(
            self.lab
                .command("ssh")
                .arg("-i")
                .arg(&self.key)
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "ConnectTimeout=10",
                    "-o",
                    "LogLevel=ERROR",
                ])
                .arg(format!("{USER}@{ip}"))
                .arg(command),
        )
    }

    /// Panics with everything a person needs to see why.
    fn fail(&mut self, id: Option<&str>, e: anyhow::Error) -> ! {
        self.lab.keep_dir();
        let events = id
            .and_then(|id| self.appliance.cli(&["machine", "events", id]).ok())
            .unwrap_or_default();
        let machine = id
            .and_then(|id| self.appliance.machine(id).ok())
            .map(|m| format!("status {} ({})", m["status"], m["status_message"]))
            .unwrap_or_default();
        panic!(
            "{e:#}\n--- machine: {machine}\n--- events ---\n{events}\n--- {} console (last 60 lines) ---\n{}\n--- qemu ---\n{}\n--- stork (last 30 lines) ---\n{}\n(logs kept in {})",
            self.vm.describe(),
            self.vm.console_tail(60),
            self.vm.qemu_log_tail(10),
            self.appliance.log_tail(30),
            self.lab.dir().display()
        );
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Links (or copies) the image files into the appliance's boot directory and registers them
/// as boot resource [`IMAGE`], roles `raw`, `squashfs` and `tar`.
fn register_image(
    appliance: &Appliance,
    lab: &Lab,
    images: &Path,
    sha256_override: Option<&str>,
) -> Result<()> {
    let resource = stork_lab::images::os_resource(
        images,
        &appliance.data_dir.join("boot"),
        IMAGE,
        sha256_override,
    )?;
    let file = lab.dir().join("resource.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&resource)?)?;
    appliance.cli(&["image", "register", path_str(&file)?])?;
    Ok(())
}

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn seabios_vm_deploys_debian_to_disk_logs_in_over_ssh_then_releases_with_erase() {
    let mut s = Scenario::new("deploy-disk", "52:54:00:77:01:01", None).unwrap();
    let id = match s.enlist_and_commission() {
        Ok(id) => id,
        Err(e) => s.fail(None, e),
    };
    if let Err(e) = deploy_to_disk_and_log_in(&mut s, &id) {
        s.fail(Some(&id), e);
    }
    if let Err(e) = release_with_erase(&mut s, &id) {
        s.fail(Some(&id), e);
    }
}

fn deploy_to_disk_and_log_in(s: &mut Scenario, id: &str) -> Result<()> {
    let hostname = "stork-e2e-disk";
    s.appliance.cli(&["machine", "allocate", id])?;
    let t0 = Instant::now();
    s.deploy(id, "disk", hostname)?;

    // Cut the image download once, mid-stream: the appliance's end of every established
    // HTTP connection is destroyed (`ss -K`, a RST to the agent). The agent must resume with
    // a Range request and still end with the right sha256.
    wait_for(
        "the image to be streaming",
        Duration::from_secs(300),
        POLL,
        || {
            let m = s.status(id)?;
            if m["status"] != "deploying" {
                bail!(
                    "status {} ({}) before the image streamed",
                    m["status"],
                    m["status_message"]
                );
            }
            let events = s.appliance.cli(&["machine", "events", id])?;
            Ok(events.contains("image Progress").then_some(()))
        },
    )?;
    stork_lab::run(
        s.lab
            .command("ss")
            .args(["-K", "state", "established", "( sport = :8080 )"]),
    )?;
    s.say("cut the download connection");

    // The agent streams the image, writes the seed, reports installed and reboots: QEMU exits.
    wait_for(
        "the agent to install and reboot",
        Duration::from_secs(600),
        POLL,
        || {
            let m = s.status(id)?;
            if m["status"] != "deploying" {
                bail!(
                    "status {} ({}) while the agent installs",
                    m["status"],
                    m["status_message"]
                );
            }
            Ok(s.vm.exited())
        },
    )?;
    let m = s.status(id)?;
    if m["netboot"] != false {
        bail!("the agent rebooted but the machine still network-boots: {m:#}");
    }
    let installed = t0.elapsed();
    s.say(&format!(
        "image installed in {:.0} s; powering on from disk",
        installed.as_secs_f64()
    ));

    // PXE first (the script says `exit`), then the disk; cloud-init, then the phone-home.
    s.vm.restart(&mut s.lab)?;
    s.wait_status(id, "deployed", &["deploying"], Duration::from_secs(600))?;
    s.say(&format!(
        "deployed {:.0} s after power-on ({:.0} s in the installed OS's first boot)",
        t0.elapsed().as_secs_f64(),
        (t0.elapsed() - installed).as_secs_f64()
    ));

    let ip = s.leased_ip()?;
    let got = wait_for(
        "SSH into the deployed machine",
        Duration::from_secs(120),
        Duration::from_secs(2),
        || Ok(s.ssh(&ip, "hostname").ok()),
    )?;
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
    if root_bytes < 3 << 30 {
        bail!("the root file system is {root_bytes} bytes: it did not grow to the 4 GiB disk");
    }
    let events = s.appliance.cli(&["machine", "events", id])?;
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
    for want in ["image Done", "DeploymentDone: deploying -> deployed"] {
        if !events.contains(want) {
            bail!("event history lacks {want:?}:\n{events}");
        }
    }
    Ok(())
}

fn release_with_erase(s: &mut Scenario, id: &str) -> Result<()> {
    s.appliance.cli(&["machine", "release", id, "--erase"])?;
    let m = s.status(id)?;
    if m["status"] != "disk_erasing" {
        bail!("after `release --erase` the status is {}", m["status"]);
    }
    // The person power-cycles the machine; it network-boots the agent again.
    s.say("release with erase requested; power-cycling");
    s.vm.restart(&mut s.lab)?;
    s.wait_status(id, "ready", &["disk_erasing"], Duration::from_secs(300))?;
    s.wait_powered_off(Duration::from_secs(60))?;
    s.say("erased: ready");

    let disk = path_str(&s.vm.disk)?.to_string();
    let wipefs = stork_lab::run(Command::new("wipefs").args(["--no-act", &disk]))?;
    if !wipefs.trim().is_empty() {
        bail!("wipefs still finds signatures on the erased disk:\n{wipefs}");
    }
    let blkid = Command::new("blkid").args(["-p", &disk]).output()?;
    // blkid exits 2 when it finds nothing.
    if blkid.status.code() != Some(2) {
        bail!(
            "blkid -p still recognises the erased disk: {}",
            String::from_utf8_lossy(&blkid.stdout)
        );
    }
    let sgdisk = Command::new("sgdisk").args(["-p", &disk]).output()?;
    let text = String::from_utf8_lossy(&sgdisk.stdout).to_string()
        + &String::from_utf8_lossy(&sgdisk.stderr);
    if !text.contains("GPT: not present") && !text.contains("Creating new GPT entries") {
        bail!("sgdisk still finds a partition table:\n{text}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn an_image_with_the_wrong_sha256_fails_the_deployment_with_that_reason() {
    let wrong = "0".repeat(64);
    let mut s = Scenario::new("deploy-badsum", "52:54:00:77:01:02", Some(&wrong)).unwrap();
    let id = match s.enlist_and_commission() {
        Ok(id) => id,
        Err(e) => s.fail(None, e),
    };
    let result = (|| -> Result<()> {
        s.appliance.cli(&["machine", "allocate", &id])?;
        s.deploy(&id, "disk", "stork-e2e-badsum")?;
        let m = wait_for(
            "the deployment to fail",
            Duration::from_secs(600),
            POLL,
            || {
                let m = s.status(&id)?;
                Ok(match m["status"].as_str() {
                    Some("deploying") => None,
                    _ => Some(m),
                })
            },
        )?;
        let msg = m["status_message"].as_str().unwrap_or_default();
        if m["status"] != "failed_deployment"
            || !msg.contains("sha256 mismatch")
            || !msg.contains(&wrong)
        {
            bail!(
                "expected failed_deployment with a sha256 mismatch, got {} ({msg})",
                m["status"]
            );
        }
        s.say(&format!(
            "failed as it should: {}",
            msg.lines().next().unwrap_or_default()
        ));
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(Some(&id), e);
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = stork_lab::run(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn seabios_vm_deploys_debian_in_memory_without_touching_its_disk() {
    let mut s = Scenario::with_disk("deploy-mem", "52:54:00:77:01:03", None, 1 << 30).unwrap();
    let id = match s.enlist_and_commission() {
        Ok(id) => id,
        Err(e) => s.fail(None, e),
    };
    let result = (|| -> Result<()> {
        let hostname = "stork-e2e-ram";
        let before = sha256_of(&s.vm.disk)?;
        s.appliance.cli(&["machine", "allocate", &id])?;
        let t0 = Instant::now();
        s.deploy(&id, "memory", hostname)?;
        s.wait_status(&id, "deployed", &["deploying"], Duration::from_secs(600))?;
        s.say(&format!(
            "deployed in memory {:.0} s after power-on",
            t0.elapsed().as_secs_f64()
        ));
        let ip = s.leased_ip()?;
        let got = wait_for(
            "SSH into the machine",
            Duration::from_secs(120),
            Duration::from_secs(2),
            || Ok(s.ssh(&ip, "hostname; findmnt -n -o FSTYPE /").ok()),
        )?;
        let mut lines = got.lines();
        let (name, fstype) = (
            lines.next().unwrap_or_default(),
            lines.next().unwrap_or_default(),
        );
        if name.trim() != hostname || fstype.trim() != "overlay" {
            bail!(
                "over SSH: hostname {name:?}, root {fstype:?}; wanted {hostname:?} on an overlay"
            );
        }
        s.say(&format!(
            "ssh {USER}@{ip}: hostname {name}, root on {fstype}"
        ));
        let after = sha256_of(&s.vm.disk)?;
        if after != before {
            bail!("the disk changed during a deploy in memory: sha256 {before} -> {after}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        s.fail(Some(&id), e);
    }
}
