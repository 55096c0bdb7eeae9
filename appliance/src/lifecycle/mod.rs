//! The machine lifecycle as one transition table.
//!
//! [`transition`] is pure: no I/O, no clock (time arrives inside the caller's record, not
//! here). One `match` arm per legal edge; every other (status, event) pair is rejected. The
//! controller performs a step's actions and saves the new status only if the stored version
//! is unchanged. `tests::table` writes the whole table to `docs/lifecycle.md`, so a change
//! to the lifecycle is a visible diff.

pub mod boot;
pub mod command;
pub mod config;
pub mod controller;
pub mod records;
pub mod secure_boot;

use serde::{Deserialize, Serialize};

pub use command::Command;
pub use controller::{ControlError, Controller, DriverPower, ManualPower, PowerActions};

pub use stork_proto::api::Status;

/// Busy statuses run an agent on the machine and time out into their failed status.
pub fn failure_on_timeout(status: Status) -> Option<Status> {
    match status {
        Status::Commissioning => Some(Status::FailedCommissioning),
        Status::Deploying => Some(Status::FailedDeployment),
        Status::Releasing | Status::DiskErasing => Some(Status::FailedReleasing),
        _ => None,
    }
}

/// What can happen to a machine. Who may send each is the API's business, not the table's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// User: run the commissioning agent (inventory).
    Commission,
    /// Agent: inventory posted.
    CommissioningDone,
    /// User: reserve a Ready machine.
    Allocate,
    /// User: install an OS on an allocated machine.
    Deploy,
    /// The installed OS phoned home.
    DeploymentDone,
    /// User: give the machine back; with erase, wipe its disks first.
    Release,
    ReleaseErase,
    /// Agent: release work (erase) done.
    ReleaseDone,
    /// Agent: the running step failed.
    AgentFailed,
    /// Controller: a busy status outlived its timeout, or its agent's heartbeat is overdue.
    TimedOut,
    /// User: stop the busy operation.
    Abort,
    MarkBroken,
    MarkFixed,
}

impl Event {
    pub const ALL: [Event; 13] = [
        Event::Commission,
        Event::CommissioningDone,
        Event::Allocate,
        Event::Deploy,
        Event::DeploymentDone,
        Event::Release,
        Event::ReleaseErase,
        Event::ReleaseDone,
        Event::AgentFailed,
        Event::TimedOut,
        Event::Abort,
        Event::MarkBroken,
        Event::MarkFixed,
    ];
}

/// Side effects the controller performs for a step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Next boot from the network, then power on (or cycle if on).
    NetbootAndPowerOn,
    PowerOff,
    /// Drop the agent's per-boot token so a late report from it is refused.
    RevokeAgentToken,
    /// Clear the deploy request and owner.
    ClearAllocation,
    /// Once the actions before it are done, apply this event too.
    Then(Event),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub to: Status,
    pub actions: &'static [Action],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event:?} a machine that is {from}")]
pub struct Rejected {
    pub from: Status,
    pub event: Event,
}

const NONE: &[Action] = &[];
const BOOT: &[Action] = &[Action::NetbootAndPowerOn];
const STOP: &[Action] = &[Action::RevokeAgentToken, Action::PowerOff];
const STOP_AND_FREE: &[Action] = &[
    Action::RevokeAgentToken,
    Action::PowerOff,
    Action::ClearAllocation,
];
/// A release without erase is done as soon as the power-off has been asked for.
const STOP_FREE_AND_DONE: &[Action] = &[
    Action::RevokeAgentToken,
    Action::PowerOff,
    Action::ClearAllocation,
    Action::Then(Event::ReleaseDone),
];

/// The table. `context.commissioned` says whether an inventory exists (for MarkFixed).
pub fn transition(from: Status, event: Event, commissioned: bool) -> Result<Step, Rejected> {
    use Event as E;
    use Status as S;
    let step = |to, actions| Ok(Step { to, actions });
    match (from, event) {
        (S::New | S::Ready | S::FailedCommissioning, E::Commission) => step(S::Commissioning, BOOT),
        (S::Commissioning, E::CommissioningDone) => step(S::Ready, STOP),
        (S::Commissioning, E::AgentFailed | E::TimedOut | E::Abort) => {
            step(S::FailedCommissioning, STOP)
        }

        (S::Ready, E::Allocate) => step(S::Allocated, NONE),
        (S::Allocated | S::FailedDeployment, E::Deploy) => step(S::Deploying, BOOT),
        (S::Deploying, E::DeploymentDone) => step(S::Deployed, &[Action::RevokeAgentToken]),
        (S::Deploying, E::AgentFailed | E::TimedOut | E::Abort) => step(S::FailedDeployment, STOP),

        (S::Allocated | S::Deployed | S::FailedDeployment | S::FailedReleasing, E::Release) => {
            step(S::Releasing, STOP_FREE_AND_DONE)
        }
        (
            S::Allocated | S::Deployed | S::FailedDeployment | S::FailedReleasing,
            E::ReleaseErase,
        ) => step(S::DiskErasing, BOOT),
        (S::DiskErasing, E::ReleaseDone) => step(S::Ready, STOP_AND_FREE),
        // Releasing without erase completes as soon as the machine is off.
        (S::Releasing, E::ReleaseDone) => step(S::Ready, NONE),
        (S::Releasing | S::DiskErasing, E::AgentFailed | E::TimedOut | E::Abort) => {
            step(S::FailedReleasing, STOP)
        }

        (s, E::MarkBroken) if s != S::Broken => step(S::Broken, STOP),
        (S::Broken, E::MarkFixed) => step(if commissioned { S::Ready } else { S::New }, NONE),

        (from, event) => Err(Rejected { from, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path() {
        let mut s = Status::New;
        for e in [
            Event::Commission,
            Event::CommissioningDone,
            Event::Allocate,
            Event::Deploy,
            Event::DeploymentDone,
            Event::ReleaseErase,
            Event::ReleaseDone,
        ] {
            s = transition(s, e, true).unwrap().to;
        }
        assert_eq!(s, Status::Ready);
    }

    #[test]
    fn busy_statuses_time_out_into_their_failure() {
        for s in Status::ALL {
            match (failure_on_timeout(s), transition(s, Event::TimedOut, true)) {
                (Some(failed), Ok(step)) => assert_eq!(step.to, failed, "{s}"),
                (None, Err(_)) => {}
                (want, got) => panic!("{s}: timeout table disagrees: {want:?} vs {got:?}"),
            }
        }
    }

    #[test]
    fn agent_reports_outside_a_busy_status_are_rejected() {
        for s in [Status::Ready, Status::Deployed, Status::New, Status::Broken] {
            for e in [
                Event::CommissioningDone,
                Event::DeploymentDone,
                Event::AgentFailed,
            ] {
                assert!(transition(s, e, true).is_err(), "{s} {e:?}");
            }
        }
    }

    /// Golden table: every (status, event) pair, written to docs/lifecycle.md. When the
    /// lifecycle changes on purpose, regenerate with `STORK_BLESS=1 cargo test -p stork`.
    #[test]
    fn table() {
        let mut out = String::from(
            "# Machine lifecycle\n\nGenerated by `appliance/src/lifecycle/mod.rs` \
             (`tests::table`); edit the code, not this file.\n\n| from | event | to | actions |\n|---|---|---|---|\n",
        );
        let mut mermaid = String::from("```mermaid\nstateDiagram-v2\n");
        for s in Status::ALL {
            for e in Event::ALL {
                for commissioned in [true, false] {
                    if e != Event::MarkFixed && !commissioned {
                        continue;
                    }
                    if let Ok(step) = transition(s, e, commissioned) {
                        let ev = if e == Event::MarkFixed {
                            format!("{e:?} (commissioned: {commissioned})")
                        } else {
                            format!("{e:?}")
                        };
                        out.push_str(&format!(
                            "| {s} | {ev} | {} | {:?} |\n",
                            step.to, step.actions
                        ));
                        mermaid.push_str(&format!("    {s} --> {}: {e:?}\n", step.to));
                    }
                }
            }
        }
        mermaid.push_str("```\n");
        out.push('\n');
        out.push_str(&mermaid);
        // The rules per status that are not transitions (lifecycle/boot.rs and the
        // controller's timeouts), so the whole lifecycle reads from this one page.
        out.push_str(
            "\n## Per status\n\n| status | network boot gets | the agent's task | agent heartbeats | on timeout |\n|---|---|---|---|---|\n",
        );
        for st in Status::ALL {
            let mut m = crate::store::Machine::new("m".into(), vec![], 0);
            m.status = st;
            m.netboot = true;
            let boot = match boot::choose(Some(&m)) {
                boot::BootChoice::Enlist => "the agent, to enlist",
                boot::BootChoice::Agent { .. } => "the agent, with a per-boot token",
                boot::BootChoice::LocalDisk => "exit to the local disk",
            };
            let hb = if boot::expects_heartbeats(st) {
                "expected"
            } else {
                "-"
            };
            let timeout = failure_on_timeout(st).map_or_else(|| "-".to_string(), |f| f.to_string());
            let work = match boot::agent_work(&m) {
                boot::AgentWork::Commission => "commission",
                boot::AgentWork::Deploy => "deploy",
                boot::AgentWork::Erase { .. } => "erase",
                boot::AgentWork::PowerOff => "power off",
            };
            out.push_str(&format!("| {st} | {boot} | {work} | {hb} | {timeout} |\n"));
        }
        out.push_str(
            "\nRecords that change no status: the agent's `installed` report is accepted only \
             while deploying (it clears the network-boot flag, so the next boot is the disk), \
             and a heartbeat is recorded only where heartbeats are expected.\n",
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/lifecycle.md");
        if std::env::var_os("STORK_BLESS").is_some() {
            std::fs::write(&path, &out).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            on_disk, out,
            "docs/lifecycle.md is stale: rerun with STORK_BLESS=1 and review the diff"
        );
    }
}
