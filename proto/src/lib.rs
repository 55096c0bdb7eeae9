//! Wire types shared by the Stork appliance and the agent.
//!
//! Nothing here does I/O, so the agent (a static PID 1), the appliance and the
//! fuzzers can all depend on it.

pub mod cmdline;
pub mod inventory;
pub mod mac;

pub use inventory::Inventory;
pub use mac::MacAddr;

use serde::{Deserialize, Serialize};

/// Path of the enlistment endpoint, relative to the appliance URL.
pub const ENLIST_PATH: &str = "/api/v1/agent/enlist";
/// Path of the failure report endpoint, relative to the appliance URL.
pub const REPORT_PATH: &str = "/api/v1/agent/report";

/// What a freshly booted agent sends to make its machine known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnlistRequest {
    /// The NIC the machine network-booted from.
    pub boot_mac: MacAddr,
    pub inventory: Inventory,
}

/// The appliance's answer to an enlistment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnlistResponse {
    pub machine_id: String,
    pub status: String,
}

/// A step's outcome reported by the agent, so that a failure is never silent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    pub boot_mac: MacAddr,
    /// Short machine-readable step name, e.g. `load-modules`, `network`, `inventory`.
    pub step: String,
    pub ok: bool,
    pub message: String,
}
