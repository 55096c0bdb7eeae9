//! Stage 1 -> stage 2. Stage 1 is the agent as PID 1 of the initrd: once the boot NIC is up
//! it fetches the ephemeral root SquashFS into a tmpfs (sha256 checked as it arrives),
//! attaches it to a read-only loop device, mounts it under an overlay with a tmpfs upper
//! layer, copies itself in and execs itself there as PID 1 again: stage 2, which runs the
//! task with the ephemeral root's tools (sgdisk, mkfs, mdadm, ...) on `PATH`. The appliance
//! names the root only for tasks that need those tools (`lifecycle::boot::tools`); the
//! others run from the initrd.
//!
//! What crosses the exec: everything the kernel holds (loaded modules, the NIC's address and
//! route, the loop device and the mounts; /dev, /proc, /sys and /run are moved into the new
//! root), the console's file descriptors, and the console's remembered lines, written to
//! [`CONSOLE_LOG`] on /run. Stage 2 re-reads /proc/cmdline and goes on as before.
//!
//! The ephemeral root has no kernel modules: whatever the tasks need is loaded by stage 1
//! from the initrd's list (ext4, vfat, squashfs, overlay, loop, NIC and disk drivers are), or
//! carried into the new root with the on-demand list (RAID, LVM, XFS, btrfs) for stage 2 to
//! load when a task needs them.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use stork_proto::StepState;
use stork_proto::cmdline::EphemeralRoot;

use crate::appliance::{ApplianceClient, PROGRESS_EVERY};
use crate::console::{self, human_bytes, say};
use crate::deploy::{download, ramroot, stream};
use crate::step::Step;

/// The argument that tells the agent it is stage 2; `=<seconds since boot>` says when
/// stage 1 started the fetch.
pub const STAGE2_ARG: &str = "--stork-stage2";
/// The tmpfs holding the image, the overlay's upper layer and the new root.
const BASE: &str = "/stork-ephemeral";
/// Where stage 1 puts its own binary inside the new root.
const AGENT_IN_ROOT: &str = "usr/sbin/stork-agent";
/// The console's lines from stage 1, on the /run that moves along.
pub const CONSOLE_LOG: &str = "/run/stork/console.log";
/// The kernel starts init without `PATH`; children of stage 2 find the root's tools with it.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    /// From the initrd.
    One,
    /// Inside the ephemeral root, after the exec.
    Two {
        /// Seconds since boot when stage 1 started the fetch.
        fetch_started: Option<f64>,
    },
}

impl Stage {
    /// Stage 2 only when stage 1 said so; the kernel's stray words are ignored.
    pub fn from_args(args: &[String]) -> Self {
        args.iter()
            .find_map(|a| a.strip_prefix(STAGE2_ARG))
            .filter(|rest| rest.is_empty() || rest.starts_with('='))
            .map_or(Stage::One, |rest| Stage::Two {
                fetch_started: rest.strip_prefix('=').and_then(|v| v.parse().ok()),
            })
    }
}

/// Seconds since boot, from /proc/uptime: the one clock both stages share.
pub fn uptime() -> Option<f64> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Fetches, checks and mounts the ephemeral root; returns the new root's path.
pub fn prepare(client: &ApplianceClient, eph: &EphemeralRoot) -> Result<PathBuf> {
    client.step_event(
        Step::Ephemeral,
        StepState::Started,
        format!("fetching {} into RAM", eph.url),
    );
    let start = Instant::now();
    let base = ramroot::mount_tmpfs(Path::new(BASE))?;
    let image = base.join("ephemeral.squashfs");
    let mut sink =
        ramroot::FileSink::create(&image).with_context(|| format!("create {}", image.display()))?;
    let download = download::Download::new(&eph.url)?;
    let mut report = |p: &stream::Progress| {
        // Not posted: at LAN speed the fetch takes seconds; the console is enough.
        say!(Step::Ephemeral, "{} received", human_bytes(p.received));
    };
    // The size is not on the command line: the sha256 alone vouches for the file.
    let w = stream::write_image(
        download,
        &eph.sha256,
        0,
        &mut sink,
        PROGRESS_EVERY,
        &mut report,
    )?;
    drop(sink);
    let fetched = start.elapsed();
    let loopdev = ramroot::attach_loop(&image)?;
    let root = ramroot::mount_overlay(&base, &loopdev)?;
    // A SquashFS of something else would only fail at the exec, after the mounts moved.
    if !root.join("usr/bin").is_dir() {
        bail!(
            "{} mounted, but it has no usr/bin: not a root file system",
            eph.url
        );
    }
    client.step_event(Step::Ephemeral,
        StepState::Done,
        format!(
            "{} fetched in {:.1} s ({:.0} MB/s), {} resumes, sha256 {} ok; mounted from {} under a tmpfs overlay in {:.1} s",
            human_bytes(w.received),
            fetched.as_secs_f64(),
            w.received as f64 / fetched.as_secs_f64().max(0.001) / 1e6,
            w.resumes,
            w.sha256,
            loopdev.display(),
            (start.elapsed() - fetched).as_secs_f64()
        ),
    );
    Ok(root)
}

/// Copies the agent into `root`, switches root into it and execs it as stage 2. Returns only
/// on failure.
pub fn enter(client: &ApplianceClient, root: &Path, fetch_started: Option<f64>) -> anyhow::Error {
    match try_enter(client, root, fetch_started) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_enter(
    client: &ApplianceClient,
    root: &Path,
    fetch_started: Option<f64>,
) -> Result<std::convert::Infallible> {
    let agent = root.join(AGENT_IN_ROOT);
    if let Some(dir) = agent.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // The running binary, whatever the initrd calls it.
    fs::copy("/proc/self/exe", &agent)
        .with_context(|| format!("copy /proc/self/exe to {}", agent.display()))?;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", agent.display()))?;
    // The initrd is gone after the switch: the modules tasks load later go along.
    crate::modules::carry_on_demand(root)
        .with_context(|| format!("copying the on-demand modules into {}", root.display()))?;

    let program = format!("/{AGENT_IN_ROOT}");
    let mut argv = vec![cstring(program.as_bytes())?];
    argv.push(cstring(
        match fetch_started {
            Some(t) => format!("{STAGE2_ARG}={t:.2}"),
            None => STAGE2_ARG.to_string(),
        }
        .as_bytes(),
    )?);
    let env = stage2_env(std::env::vars_os().map(|(k, v)| {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        kv
    }))?;
    client.step_event(
        Step::SwitchRoot,
        StepState::Started,
        format!("switching root into the ephemeral image; {program} goes on as stage 2"),
    );
    // Best effort: without it stage 2 only lacks stage 1's lines in a failure's log tail.
    if let Err(e) = console::save(Path::new(CONSOLE_LOG)) {
        say!(Step::SwitchRoot, "warning: console lines not kept: {e:#}");
    }
    Err(ramroot::switch_root_exec(root, &argv, Some(&env)))
}

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|e| anyhow!("{e}"))
}

/// This process's environment (`KEY=value` entries) with `PATH` set for stage 2's children.
fn stage2_env(vars: impl Iterator<Item = Vec<u8>>) -> Result<Vec<CString>> {
    let mut env: Vec<CString> = vars
        .filter(|kv| !kv.starts_with(b"PATH="))
        .map(|kv| cstring(&kv))
        .collect::<Result<_>>()?;
    env.push(cstring(format!("PATH={PATH}").as_bytes())?);
    Ok(env)
}

/// Stage 2's first word to the appliance: the switch worked.
pub fn arrived(client: &ApplianceClient, fetch_started: Option<f64>) {
    let since = match (fetch_started, uptime()) {
        (Some(then), Some(now)) if now >= then => {
            format!(", {:.1} s after stage 1 started the fetch", now - then)
        }
        _ => String::new(),
    };
    client.step_event(
        Step::SwitchRoot,
        StepState::Done,
        format!("stage 2 running from the ephemeral root{since}"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stage_two_only_when_stage_one_says_so() {
        assert_eq!(Stage::from_args(&[]), Stage::One);
        // Stray kernel command-line words reach init as arguments.
        assert_eq!(Stage::from_args(&args(&["quiet", "splash"])), Stage::One);
        assert_eq!(
            Stage::from_args(&args(&["--stork-stage2x"])),
            Stage::One,
            "a longer word is not the marker"
        );
        assert_eq!(
            Stage::from_args(&args(&[STAGE2_ARG])),
            Stage::Two {
                fetch_started: None
            }
        );
        assert_eq!(
            Stage::from_args(&args(&["--stork-stage2=12.50"])),
            Stage::Two {
                fetch_started: Some(12.5)
            }
        );
        assert_eq!(
            Stage::from_args(&args(&["--stork-stage2=soon"])),
            Stage::Two {
                fetch_started: None
            }
        );
    }

    #[test]
    fn stage_two_gets_a_path_and_keeps_the_rest() {
        let env = stage2_env(
            [
                "HOME=/",
                "PATH=/nowhere",
                "TERM=linux",
                "BOOTIF=01-52-54-00-00-00-01",
            ]
            .into_iter()
            .map(|s| s.as_bytes().to_vec()),
        )
        .unwrap();
        let env: Vec<&str> = env.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(
            env,
            [
                "HOME=/",
                "TERM=linux",
                "BOOTIF=01-52-54-00-00-00-01",
                &format!("PATH={PATH}")
            ]
        );
        assert!(
            PATH.split(':').any(|d| d == "/usr/sbin"),
            "sgdisk lives there"
        );
    }
}
