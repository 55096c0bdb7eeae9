//! The agent's steps and a step's failure: what every layer names and returns.
//!
//! A leaf: it uses no other module of the agent, so that stage 1, stage 2 and the tasks can
//! all use it without importing one another.

use anyhow::Result;

/// The steps, named as they appear on the console and on the wire (`stork_proto`).
pub use stork_proto::AgentStep as Step;

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
        .map(|s| s.as_str().to_string());
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
