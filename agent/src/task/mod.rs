//! The tasks the appliance hands out, one module each: [`commission`], [`erase`] on release,
//! deploy into [`memory`] from a root SquashFS, and deploy to [`disk`] (from the raw image,
//! or by extracting the root tar onto a layout). Each step is posted as an event when it
//! starts and when it is done; a failure is reported by the caller with the console's tail.
//!
//! Here: what the tasks share, above all the [`Deployment`] that every deploy step is given,
//! and the steps more than one deploy runs (the disk, the seed). The means they use are in
//! [`crate::deploy`].

pub mod commission;
pub mod disk;
pub mod erase;
pub mod memory;

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use stork_proto::cmdline::AgentArgs;
use stork_proto::{DeployTask, ImageFile, ImageRole, StepState};

use crate::appliance::ApplianceClient;
use crate::console::human_bytes;
use crate::deploy::block::{self, BlockDevice};
use crate::deploy::seed;
use crate::inventory;
use crate::step::{Failed, Step};

pub(crate) use crate::appliance::PROGRESS_EVERY;
const DEV: &str = "/dev";
const SYS: &str = "/sys";
/// Where the installed root is mounted: to write the seed, or to extract the root tar onto.
const TARGET: &str = "/mnt/target";

/// How the agent's life ends once a task succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    PowerOff,
    /// Into the installed OS.
    Reboot,
}

/// One deploy: whom to tell, what was asked, and the machine's identity for the seed's
/// phone-home. Built only by [`Deployment::new`], so no deploy starts without an identity.
pub struct Deployment<'a> {
    client: &'a ApplianceClient,
    args: &'a AgentArgs,
    task: &'a DeployTask,
    machine_id: &'a str,
    token: &'a str,
}

impl<'a> Deployment<'a> {
    /// Fails when the command line lacks the identity a deploy needs.
    pub fn new(
        client: &'a ApplianceClient,
        args: &'a AgentArgs,
        task: &'a DeployTask,
    ) -> Result<Self, Failed> {
        let (Some(machine_id), Some(token)) = (&args.machine_id, &args.token) else {
            return Err(Failed {
                step: Step::Task,
                error: anyhow!("a deploy needs stork.machine and stork.token on the command line"),
            });
        };
        Ok(Self {
            client,
            args,
            task,
            machine_id,
            token,
        })
    }

    fn image_file(&self, role: ImageRole) -> Result<&'a ImageFile> {
        let task = self.task;
        task.image.iter().find(|f| f.role == role).ok_or_else(|| {
            let roles: Vec<&str> = task.image.iter().map(|f| f.role.as_str()).collect();
            anyhow!(
                "the image has no {role:?} file (it has: {})",
                if roles.is_empty() {
                    "none".to_string()
                } else {
                    roles.join(", ")
                }
            )
        })
    }

    /// The disk step of both ways to disk: chooses the disk for `need` bytes (of `what`, for
    /// the event), the deploy's `disk` if it names one, opens it and wipes its old signatures.
    fn prepare_disk(&self, need: Option<u64>, what: &str) -> Result<BlockDevice> {
        self.open_disk(self.task.disk.as_deref(), need, what)
    }

    /// As [`Self::prepare_disk`], for the disk `requested` names (any disk when `None`).
    fn open_disk(
        &self,
        requested: Option<&str>,
        need: Option<u64>,
        what: &str,
    ) -> Result<BlockDevice> {
        let disks = inventory::disks(Path::new(SYS));
        let chosen = block::choose(&disks, requested, need)?;
        self.client.step_event(
            Step::Disk,
            StepState::Started,
            format!(
                "target {} ({}){}",
                chosen.name,
                human_bytes(chosen.size_bytes),
                need.map_or_else(String::new, |n| format!(
                    " for {what} of {}",
                    human_bytes(n)
                ))
            ),
        );
        let mut dev = BlockDevice::open(Path::new(DEV), &chosen.name)?;
        let parts = block::partitions(Path::new(SYS), &chosen.name);
        let size = dev.size();
        let n = block::wipe_signatures(&mut dev, size, &parts)
            .with_context(|| format!("wiping signatures on {}", dev.path.display()))?;
        dev.reread_partitions()?;
        self.client.step_event(
            Step::Disk,
            StepState::Done,
            format!(
                "{}: {} old partitions, {n} signature areas zeroed",
                chosen.name,
                parts.len()
            ),
        );
        Ok(dev)
    }

    /// The seed step on an installed root mounted at `root` (from partition `root_part`): the
    /// NoCloud seed and phone-home, with the step's events. Every deploy runs it.
    fn seed_into(&self, root: &Path, root_part: &str) -> Result<()> {
        let (task, args) = (self.task, self.args);
        if let Some(version) = &task.kernel {
            crate::deploy::kernel::boot(root, version)?;
            self.client.step_event(
                Step::Bootloader,
                StepState::Done,
                format!("the installed OS boots kernel {version}"),
            );
        }
        self.client.step_event(
            Step::Seed,
            StepState::Started,
            format!("writing the NoCloud seed on {root_part}"),
        );
        let family = match args.ip {
            std::net::IpAddr::V4(_) => seed::Family::V4,
            std::net::IpAddr::V6(_) => seed::Family::V6,
        };
        let seed = seed::seed(task, self.machine_id, args.boot_mac, family);
        seed::install(
            root,
            &seed,
            &seed::PhoneHome {
                url: args.api_url(),
                pin: args.api.as_ref().map(|a| a.fingerprint.as_str()),
                machine_id: self.machine_id,
                token: self.token,
            },
        )
        .context("writing the seed")?;
        self.client.step_event(
            Step::Seed,
            StepState::Done,
            format!(
                "seed written: hostname {}, {} SSH keys",
                task.hostname,
                task.ssh_keys.len()
            ),
        );
        crate::deploy::late::run_all(root, &task.late_commands, |n, command, ran| {
            self.client.step_event(
                Step::Seed,
                StepState::Progress,
                format!(
                    "late command {n} ({command:?}): {}; output: {}",
                    ran.status,
                    ran.output.trim()
                ),
            );
        })
    }
}
