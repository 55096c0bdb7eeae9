//! The agent's steps and a step's failure: what every layer names and returns.
//!
//! A leaf: it uses no other module of the agent, so that stage 1, stage 2 and the tasks can
//! all use it without importing one another.

use std::fmt;

use anyhow::Result;

/// The steps, named as they appear on the console and in [`stork_proto::AgentReport::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Mount,
    LoadModules,
    Cmdline,
    Network,
    /// Stage 1: fetch, check and mount the ephemeral root.
    Ephemeral,
    /// Stage 1 hands over to stage 2 inside the ephemeral root.
    SwitchRoot,
    Inventory,
    Enlist,
    Task,
    Commission,
    /// Deploy: choose and wipe the target disk.
    Disk,
    /// Deploy: stream the image onto it.
    Image,
    /// Deploy: re-read, grow and find the root partition.
    Partitions,
    /// Deploy: write the cloud-init seed and phone-home.
    Seed,
    /// Deploy: tell the appliance the image is installed.
    Installed,
    /// Release: wipe the disks.
    Erase,
    /// Deploy in memory: fetch, mount and hand over to the OS.
    Memory,
    /// Deploy: the installed disk's UEFI boot entry.
    BootEntry,
    /// Deploy from the root tar: fstab, grub.cfg, GRUB for BIOS and UEFI.
    Bootloader,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Mount => "mount",
            Step::LoadModules => "load-modules",
            Step::Cmdline => "cmdline",
            Step::Network => "network",
            Step::Ephemeral => "ephemeral",
            Step::SwitchRoot => "switch-root",
            Step::Inventory => "inventory",
            Step::Enlist => "enlist",
            Step::Task => "task",
            Step::Commission => "commission",
            Step::Disk => "disk",
            Step::Image => "image",
            Step::Partitions => "partitions",
            Step::Seed => "seed",
            Step::Installed => "installed",
            Step::Erase => "erase",
            Step::Memory => "memory",
            Step::BootEntry => "boot-entry",
            Step::Bootloader => "bootloader",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub struct Failed {
    pub step: Step,
    pub error: anyhow::Error,
}

/// Tags a step's error with the step.
pub fn at<T>(step: Step, r: Result<T>) -> Result<T, Failed> {
    r.map_err(|error| Failed { step, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_are_the_report_names() {
        let names = [
            Step::Mount,
            Step::LoadModules,
            Step::Cmdline,
            Step::Network,
            Step::Ephemeral,
            Step::SwitchRoot,
            Step::Inventory,
            Step::Enlist,
            Step::Task,
            Step::Commission,
        ]
        .map(Step::name);
        assert_eq!(
            names,
            [
                "mount",
                "load-modules",
                "cmdline",
                "network",
                "ephemeral",
                "switch-root",
                "inventory",
                "enlist",
                "task",
                "commission"
            ]
        );
    }
}
