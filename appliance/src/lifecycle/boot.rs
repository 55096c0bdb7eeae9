//! What a network-booting machine is sent: a lifecycle rule, so it lives beside the table.

use super::Status;
use crate::store::Machine;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootChoice {
    /// Unknown or New: the agent enlists it.
    Enlist,
    /// Commissioning, Deploying, Disk erasing: the agent with a fresh per-boot token.
    Agent { machine_id: String },
    /// Everything else: leave the network boot and try the next boot device.
    LocalDisk,
}

pub fn choose(machine: Option<&Machine>) -> BootChoice {
    match machine {
        None => BootChoice::Enlist,
        Some(m) if m.status == Status::New => BootChoice::Enlist,
        Some(m) if boots_agent(m.status) && m.netboot => BootChoice::Agent {
            machine_id: m.id.clone(),
        },
        Some(_) => BootChoice::LocalDisk,
    }
}

/// What the agent of a machine in a given status is asked to do (`GET /agent/{id}/task`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentWork {
    Commission,
    /// The deploy request's task (its image and keys are looked up by the caller).
    Deploy,
    Erase {
        quick: bool,
    },
    PowerOff,
}

pub fn agent_work(m: &Machine) -> AgentWork {
    match m.status {
        Status::Commissioning => AgentWork::Commission,
        Status::Deploying => AgentWork::Deploy,
        Status::DiskErasing => AgentWork::Erase {
            quick: m.erase_quick,
        },
        _ => AgentWork::PowerOff,
    }
}

/// Whether a machine in this status boots the agent when it network-boots.
pub fn boots_agent(status: Status) -> bool {
    matches!(
        status,
        Status::New | Status::Commissioning | Status::Deploying | Status::DiskErasing
    )
}

/// Whether the agent of a machine in this status sends heartbeats.
pub fn expects_heartbeats(status: Status) -> bool {
    HEARTBEAT_STATUSES.contains(&status)
}

/// Statuses whose agent sends heartbeats.
pub const HEARTBEAT_STATUSES: [Status; 3] = [
    Status::Commissioning,
    Status::Deploying,
    Status::DiskErasing,
];
