//! `cargo xtask`: the project's tasks. `demo` and `test` install what is missing, build what
//! is needed, then run.

mod appliance;
mod bench;
mod deps;
mod failures;
mod lab;
mod os_images;
mod runner;

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use stork_lab::bmc::BmcVm;
use stork_lab::{Appliance, Lab, VmSpec, wait_for};
use stork_proto::api::Status;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Live: an appliance on its embedded default and a QEMU machine that PXE-boots and enlists.
    Demo,
    /// Every test: unit, in-process, namespaces and QEMU end to end (plus fmt and clippy).
    Test {
        /// Extra arguments for `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Install the Debian packages the lab and tests need.
    Deps,
    /// Build the agent (static) and the boot images into target/stork/boot.
    Images,
    /// Build the appliance disk image (Debian, systemd, Stork, the boot files and OS images)
    /// into target/stork/appliance/stork-appliance.raw, ready for `stork-image write`.
    Appliance {
        /// Version the image's system reports (default: the workspace version).
        #[arg(long)]
        version: Option<String>,
    },
    /// Rootless: the appliance image as a QEMU VM and machine VMs on one segment (a userspace
    /// switch), the API forwarded to 127.0.0.1; Enter stops it.
    Lab {
        /// Machine VMs that network-boot on the segment.
        #[arg(long, default_value_t = 1)]
        machines: u32,
        /// Host port forwarded to the appliance's HTTPS API.
        #[arg(long, default_value_t = 18443)]
        api_port: u16,
        /// An appliance image to run (default: build it as `cargo xtask appliance` does).
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
    },
    /// Benchmarks: `api` (machines API on loopback); against peer implementations, in
    /// namespaces (needs root): `tftp`, `dhcp`, `images`; `deploy` (a QEMU machine's
    /// power-on to Deployed, per phase, against its floor); `ui` (the web UI with 10,000
    /// machines, in headless Chromium).
    Bench {
        /// What to benchmark.
        what: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Task::Deps => deps::ensure(),
        Task::Images => {
            deps::ensure()?;
            images()?;
            os_images::build(&target()).map(|_| ())
        }
        Task::Appliance { version } => {
            deps::ensure()?;
            let boot = images()?;
            let os = os_images::build(&target())?;
            appliance::build(
                &target(),
                &boot,
                &os,
                version.as_deref(),
                appliance::Profile::Release,
            )
            .map(|_| ())
        }
        Task::Lab {
            machines,
            api_port,
            image,
        } => lab::run(machines, api_port, image),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
        Task::Bench { what } => bench::run(&what),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Downloads and unpacked packages (the kernel, debootstrap trees) outlive `target/`, so a
/// fresh clone does not fetch them again: `$STORK_CACHE`, else `~/.cache/stork`.
fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("STORK_CACHE") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/stork"),
        None => target().join("stork-cache"),
    }
}

/// Says what comes next, with the time since the first step (minutes:seconds): a CI log
/// then shows where a run's time goes.
fn step(what: &str) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let secs = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs();
    eprintln!("\x1b[1m==> [{}:{:02}] {what}\x1b[0m", secs / 60, secs % 60);
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // A CI run builds once from a clean clone: incremental state (about 2 GB here) would
    // only take disk space the end-to-end tests' images need.
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}

const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the static agent and the initrd; returns the boot files directory.
/// The suite the agent's second kernel comes from.
const AGENT_KERNEL_SUITE: &str = "bookworm-backports";

fn images() -> Result<PathBuf> {
    step("building the agent (static, release)");
    // crt-static for the agent only: it runs as PID 1 in an initrd with no libc.
    status(
        cargo()
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "stork-agent",
                "--target",
                AGENT_TARGET,
            ])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            ),
    )?;
    let agent = target().join(AGENT_TARGET).join("release/stork-agent");
    let boot = target().join("stork/boot");
    step("building the initrd (kernel from Debian's linux-image-amd64, cached)");
    status(
        os_images::stork_image("initrd")
            .arg("--agent")
            .arg(&agent)
            .arg("--out")
            .arg(&boot),
    )?;
    // A newer kernel for the agent (boot/kernels/backports/): a machine whose minimum kernel
    // the default does not meet boots it (appliance/src/agent_kernels.rs).
    step("the agent's second kernel (Debian's bookworm-backports linux-image-amd64, cached)");
    status(
        os_images::stork_image("initrd")
            .args(["--suite", AGENT_KERNEL_SUITE, "--agent"])
            .arg(&agent)
            .arg("--out")
            .arg(boot.join("kernels/backports")),
    )?;
    step("the signed boot chain for Secure Boot (Debian's shim and GRUB, cached)");
    status(os_images::stork_image("loaders").arg("--out").arg(&boot))?;
    // Network boot programs for firmware PXE (TFTP) and UEFI HTTP boot, from Debian's
    // ipxe package: snponly.efi uses the firmware's own NIC driver (docs/measurements.md: faster than
    // ipxe.efi under OVMF), undionly.kpxe chains from a BIOS PXE ROM.
    for nbp in ["undionly.kpxe", "snponly.efi", "ipxe.efi"] {
        let from = Path::new("/usr/lib/ipxe").join(nbp);
        std::fs::copy(&from, boot.join(nbp)).with_context(|| {
            format!(
                "copying {} (is the ipxe package installed?)",
                from.display()
            )
        })?;
    }
    Ok(boot)
}

fn build_workspace() -> Result<()> {
    step("building the workspace");
    status(cargo().args(["build", "--quiet", "--workspace", "--all-targets"]))
}

fn test(extra: &[String]) -> Result<()> {
    deps::ensure()?;
    step("cargo fmt --check");
    status(cargo().args(["fmt", "--all", "--check"]))?;
    step("cargo clippy");
    status(cargo().args([
        "clippy",
        "--quiet",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let boot = images()?;
    let os = os_images::build(&target())?;
    build_workspace()?;
    let appliance = appliance::build(&target(), &boot, &os, None, appliance::Profile::Debug)?;
    let lab = target().join("lab");
    std::fs::create_dir_all(&lab)?;
    // The VM tests' disks are sparse but written: a run needs some 15 GiB free beyond the
    // build (docs/measurements.md, Disk space); said before and, on failure, after.
    step(&format!(
        "cargo test (every tier, end-to-end included); {}",
        stork_lab::kept::free_space_line(&lab)
    ));
    let env: Vec<(String, std::ffi::OsString)> = [
        ("STORK_OS_IMAGES", os.clone().into_os_string()),
        ("STORK_BIN", target().join("debug/stork").into_os_string()),
        ("STORK_BOOT_FILES", boot.clone().into_os_string()),
        ("STORK_APPLIANCE_IMAGE", appliance.into_os_string()),
        // For the test that builds the image again and the one that builds a v2.
        (
            "STORK_APPLIANCE_STORK",
            target().join(appliance::STORK).into_os_string(),
        ),
        ("STORK_CACHE", cache().into_os_string()),
        ("STORK_LAB_DIR", lab.clone().into_os_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut args = vec!["--include-ignored".to_string()];
    args.extend(extra.iter().cloned());
    let result = run_test_binaries(&args, &env);
    if result.is_err() {
        eprintln!("{}", stork_lab::kept::free_space_line(&lab));
    }
    result
}

/// `cargo test --workspace --no-fail-fast -- ARGS` with the end-to-end VM binaries two at
/// a time (`runner`), then the doc tests.
fn run_test_binaries(args: &[String], env: &[(String, std::ffi::OsString)]) -> Result<()> {
    let out = cargo()
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--quiet",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed: {}", out.status);
    }
    let binaries = runner::parse_artifacts(&String::from_utf8_lossy(&out.stdout))?;
    let ran = runner::run(&binaries, args, env, &target().join("test-logs"));
    let mut doc = cargo();
    doc.args(["test", "--workspace", "--doc", "--no-fail-fast", "--"])
        .args(args);
    for (k, v) in env {
        doc.env(k, v);
    }
    let docs = failures::run_tests(&mut doc);
    ran.and(docs)
}

fn demo() -> Result<()> {
    deps::ensure()?;
    let boot = images()?;
    let os = os_images::build(&target())?;
    step("building the appliance");
    status(cargo().args(["build", "--quiet", "-p", "stork"]))?;
    let bin = target().join("debug/stork");

    step("creating the lab: namespace, bridge stork0 at 10.77.0.1/24, no uplink");
    let mut lab = Lab::new("demo", &target().join("lab"))?;
    step("starting `stork serve` on its embedded default");
    let appliance = Appliance::start(&lab, &bin, &boot)?;
    step("stork config show: boot files on HTTP, the API on HTTPS, the certificate clients pin");
    print!(
        "{}",
        stork_lab::run(
            std::process::Command::new(&bin)
                .args(["config", "show", "--data-dir"])
                .arg(&appliance.data_dir)
        )?
    );
    let mac = "52:54:00:77:00:99";
    let mut spec = VmSpec::new("demo-vm", mac);
    spec.memory_mib = 2048;
    step(&format!(
        "racking a SeaBIOS VM (TCG, 2 cpus, 2 GiB, 4 GiB disk, mac {mac}) behind its BMC \
         (OpenIPMI's ipmi_sim at 127.0.0.1:{DEMO_BMC_PORT}): powered off"
    ));
    let machine = BmcVm::start(&mut lab, spec, DEMO_BMC_PORT)?;
    let mut demo = Demo {
        appliance,
        machine,
        console_pos: 0,
        started: Instant::now(),
    };
    let result = demo.run(&os, mac);
    if let Err(e) = result {
        lab.keep_dir();
        return Err(e.context(format!(
            "logs kept in {}\n--- stork (last 20 lines) ---\n{}",
            lab.dir().display(),
            demo.appliance.log_tail(20)
        )));
    }
    step("tearing down the lab");
    Ok(())
}

const DEMO_BMC_PORT: u16 = 623;

struct Demo {
    appliance: Appliance,
    machine: BmcVm,
    console_pos: u64,
    started: Instant,
}

impl Demo {
    /// Follows the console until `done` says the machine reached what we wait for.
    fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&Appliance, &BmcVm) -> Result<bool>,
    ) -> Result<()> {
        wait_for(
            what,
            Duration::from_secs(900),
            Duration::from_millis(300),
            || {
                self.console_pos = print_new_lines(&self.machine.paths.console, self.console_pos);
                if self.appliance.exited().is_some() {
                    bail!("stork serve exited:\n{}", self.appliance.log_tail(20));
                }
                Ok(done(&self.appliance, &self.machine)?.then_some(()))
            },
        )?;
        self.console_pos = print_new_lines(&self.machine.paths.console, self.console_pos);
        step(&format!(
            "{what}: done at {:.0} s",
            self.started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        self.appliance.cli(args)
    }

    /// Waits until machine `id` is `want` (failing on any status outside `passing`) and,
    /// with `off`, powered off.
    fn until_status(
        &mut self,
        what: &str,
        id: &str,
        want: Status,
        passing: &[Status],
        off: bool,
    ) -> Result<()> {
        self.until(what, |a, machine| {
            let m = a.machine(id)?;
            match m.status {
                s if s == want => Ok(!off || !machine.is_on()),
                s if passing.contains(&s) => Ok(false),
                other => bail!("{what}: status {other}: {:?}", m.status_message),
            }
        })
    }

    fn run(&mut self, images: &Path, mac: &str) -> Result<()> {
        step("stork machine add --mac .. --power ipmi (the BMC's address and operator login)");
        let m = self.appliance.add_ipmi_machine(mac, &self.machine.bmc)?;
        let id = m.id;

        step(&format!(
            "stork machine power {id} on: through IPMI; it network-boots and enlists"
        ));
        self.cli(&["machine", "power", &id, "on"])?;
        self.until(
            "enlistment (New) and the agent's power-off",
            |a, machine| {
                let m = a.machine(&id)?;
                Ok(m.inventory.is_some() && !machine.is_on())
            },
        )?;
        print!("{}", self.cli(&["machine", "show", &id])?);

        step(&format!(
            "stork machine commission {id}: Stork sets PXE and powers it on through IPMI"
        ));
        self.cli(&["machine", "commission", &id])?;
        self.until_status(
            "commissioning (Ready, powered off by Stork)",
            &id,
            Status::Ready,
            &[Status::Commissioning],
            true,
        )?;

        step(&format!(
            "stork image import {} --name {DEMO_IMAGE}: the Debian image stork-image built, \
             checked against its manifest and registered",
            images.display()
        ));
        print!(
            "{}",
            self.cli(&[
                "image",
                "import",
                &images.to_string_lossy(),
                "--name",
                DEMO_IMAGE,
                "--data-dir",
                &self.appliance.data_dir.to_string_lossy(),
            ])?
        );
        print!("{}", self.cli(&["image", "list"])?);

        step(&format!(
            "stork machine allocate {id} && stork machine deploy {id}: Stork powers it on; \
             the agent writes the image and reboots into it"
        ));
        self.cli(&["machine", "allocate", &id])?;
        self.cli(&[
            "machine",
            "deploy",
            &id,
            "--image",
            DEMO_IMAGE,
            "--hostname",
            "stork-demo",
        ])?;
        self.until_status(
            "Deployed (the installed OS phoned home)",
            &id,
            Status::Deployed,
            &[Status::Deploying],
            false,
        )?;
        print!("{}", self.cli(&["machine", "show", &id])?);
        print!("{}", self.cli(&["machine", "events", &id])?);
        Ok(())
    }
}

const DEMO_IMAGE: &str = "debian-bookworm";

/// Prints the lines of `path` from byte `pos` on, prefixed, and returns the new position.
fn print_new_lines(path: &Path, pos: u64) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else {
        return pos;
    };
    if f.seek(SeekFrom::Start(pos)).is_err() {
        return pos;
    }
    let mut reader = BufReader::new(f);
    let mut line = Vec::new();
    let mut pos = pos;
    while let Ok(n) = reader.read_until(b'\n', &mut line) {
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        pos += n as u64;
        let text = String::from_utf8_lossy(&line);
        // Firmware output is full of escape sequences; keep the printable part.
        let clean: String = text
            .chars()
            .filter(|c| !c.is_control() || *c == '\t')
            .collect();
        if !clean.trim().is_empty() {
            println!("  vm | {}", clean.trim_end());
        }
        line.clear();
    }
    pos
}
