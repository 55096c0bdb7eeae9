//! What callers ask of the lifecycle, with the data each event carries. The table
//! ([`super::transition`]) decides on the [`Event`] alone; the controller then writes the
//! command's data into the machine in the same save as the new status, so request data
//! never reaches the store any other way.

use stork_proto::Inventory;

use super::Event;
use super::records::machine_macs;
use crate::store::{DeployRequest, Machine};

#[derive(Debug, Clone)]
pub enum Command {
    /// Run the commissioning agent: the scripts, the hardware `tests` named, the inventory.
    Commission {
        tests: Vec<String>,
    },
    /// The agent's inventory.
    CommissioningDone(Inventory),
    /// Reserve a Ready machine for `owner`.
    Allocate {
        owner: String,
    },
    Deploy(DeployRequest),
    /// The installed OS phoned home.
    DeploymentDone,
    /// Give the machine back; with `erase`, wipe its disks first (`quick`: signatures and
    /// partition tables only).
    Release {
        erase: bool,
        quick: bool,
    },
    /// The agent (or the controller, for a release without erase) finished the release.
    ReleaseDone,
    /// The agent's step failed: the reason with the step's log tail.
    AgentFailed(String),
    /// A busy status outlived its timeout, or its agent went silent: why.
    TimedOut(String),
    Abort,
    MarkBroken {
        reason: String,
    },
    MarkFixed,
}

impl Command {
    pub fn event(&self) -> Event {
        match self {
            Self::Commission { .. } => Event::Commission,
            Self::CommissioningDone(_) => Event::CommissioningDone,
            Self::Allocate { .. } => Event::Allocate,
            Self::Deploy(_) => Event::Deploy,
            Self::DeploymentDone => Event::DeploymentDone,
            Self::Release { erase: false, .. } => Event::Release,
            Self::Release { erase: true, .. } => Event::ReleaseErase,
            Self::ReleaseDone => Event::ReleaseDone,
            Self::AgentFailed(_) => Event::AgentFailed,
            Self::TimedOut(_) => Event::TimedOut,
            Self::Abort => Event::Abort,
            Self::MarkBroken { .. } => Event::MarkBroken,
            Self::MarkFixed => Event::MarkFixed,
        }
    }

    /// The status message the new status carries, and the history line's detail.
    pub fn message(&self) -> Option<String> {
        match self {
            Self::Release {
                erase: true, quick, ..
            } => Some(format!("erase (quick: {quick})")),
            Self::AgentFailed(why) | Self::TimedOut(why) => Some(why.clone()),
            Self::Abort => Some("aborted by user".into()),
            Self::MarkBroken { reason } => Some(reason.clone()),
            _ => None,
        }
    }

    /// Writes the command's data into the machine (after the table allowed the step).
    pub fn write_into(self, m: &mut Machine) {
        match self {
            Self::CommissioningDone(inv) => {
                if let Some(boot) = m.boot_mac {
                    m.macs = machine_macs(boot, &inv);
                }
                m.inventory = Some(inv);
            }
            Self::Allocate { owner } => m.owner = Some(owner),
            Self::Deploy(req) => {
                if let Some(h) = &req.hostname {
                    m.hostname = Some(h.clone());
                }
                m.deploy = Some(req);
            }
            Self::Release { quick, .. } => m.erase_quick = quick,
            Self::Commission { tests } => m.commission_tests = tests,
            _ => {}
        }
    }
}
