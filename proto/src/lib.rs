//! Wire types shared by the Stork appliance and the agent.
//!
//! Nothing here does I/O, so the agent (a static PID 1), the appliance and the
//! fuzzers can all depend on it.

#[macro_use]
mod names;

pub mod api;
pub mod blockmap;
pub mod cmdline;
pub mod grub;
pub mod grubenv;
pub mod inventory;
pub mod kernel;
pub mod layout;
pub mod mac;
pub mod manifest;
pub mod netconf;
pub mod units;
pub mod wire;

pub use inventory::Inventory;
pub use layout::DiskLayout;
pub use mac::MacAddr;
pub use netconf::NetworkConfig;
pub use wire::{AgentStep, DeployTarget, ImageRole};

use serde::{Deserialize, Serialize};

/// Path of the enlistment endpoint, relative to the appliance URL.
pub const ENLIST_PATH: &str = "/api/v1/agent/enlist";
/// Path of the failure report endpoint, relative to the appliance URL.
pub const REPORT_PATH: &str = "/api/v1/agent/report";

/// What a freshly booted agent sends to make its machine known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnlistRequest {
    /// The NIC the machine network-booted from.
    pub boot_mac: MacAddr,
    pub inventory: Inventory,
}

/// The appliance's answer to an enlistment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnlistResponse {
    pub machine_id: String,
    pub status: api::Status,
}

/// Agent endpoints for a known machine: `/api/v1/agent/{machine_id}/...`, each needing that
/// machine's current agent token as a bearer token.
pub fn agent_path(machine_id: &str, what: &str) -> String {
    format!("/api/v1/agent/{machine_id}/{what}")
}

/// What the appliance wants from an agent that booted on a known machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// Run the scripts and tests, each result posted (`POST .../scripts`), stopping at the
    /// first that fails (the machine fails commissioning with its reason); then report the
    /// inventory (`POST .../commissioned`) and power off.
    Commission {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scripts: Vec<CommissionScript>,
    },
    /// Install an OS.
    Deploy(Box<DeployTask>),
    /// Wipe the disks (`quick`: signatures and partition tables; else every byte), then
    /// `POST .../released` and power off.
    Erase { quick: bool },
    /// Nothing to do: power off.
    PowerOff,
}

/// A script the agent runs while commissioning: a user's, or one of Stork's hardware tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommissionScript {
    pub name: String,
    /// A hardware test Stork ships (`api::BUILTIN_TESTS`), not a user's script.
    #[serde(default)]
    pub test: bool,
    /// The script itself, run as an executable file (its `#!` line picks the interpreter; a
    /// script without one runs under `/bin/sh`).
    pub content: String,
    pub timeout_secs: u32,
}

/// Where the agent posts each script's result.
pub const SCRIPTS: &str = "scripts";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeployTask {
    pub target: DeployTarget,
    pub disk: Option<String>,
    pub hostname: String,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    /// Image files: absolute URLs on the appliance with their sha256.
    pub image: Vec<ImageFile>,
    /// Disk deploys only: partition by this layout and install from the root tar (role
    /// `tar`). Absent: the raw image (role `raw`) when the image has one, else the root tar
    /// with the default layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<DiskLayout>,
    /// Commands run chrooted in the installed root before the reboot
    /// ([`api::DeployRequest::late_commands`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late_commands: Vec<String>,
    /// The installed OS's network ([`api::DeployRequest::network`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// The `uname -r` of the kernel the installed OS boots, when the request chose one
    /// ([`api::DeployRequest::kernel`]): Debian's `/vmlinuz` and `/initrd.img` point at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageFile {
    pub role: ImageRole,
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// Agent endpoint (under [`agent_path`]) for [`Heartbeat`]s.
pub const HEARTBEAT: &str = "heartbeat";

/// How often a busy agent posts a [`Heartbeat`]; the appliance's `lifecycle.heartbeat_timeout`
/// should be several of these.
pub const HEARTBEAT_EVERY_SECS: u64 = 10;

/// "Still alive", posted by an agent every [`HEARTBEAT_EVERY_SECS`] while it runs a task. Once
/// the appliance has heard one, silence fails the machine's busy status long before the
/// status's own timeout would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The step the agent is in, for the failure's reason.
    #[serde(default)]
    pub step: AgentStep,
    /// The agent is handing the machine over (rebooting into the installed OS, switching root
    /// into a deployed one) and will send no more heartbeats on purpose.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(default = false))]
    pub leaving: bool,
}

/// A step's progress, posted to `.../events`. A `failed` state fails the machine's
/// current operation with `message` as the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgentEvent {
    pub step: AgentStep,
    pub state: StepState,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(default = ""))]
    pub message: String,
    /// 0.0..=1.0 for long steps.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub progress: Option<f32>,
    /// Last lines of the step's log, on failure.
    #[serde(default)]
    pub log_tail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Started,
    Progress,
    Done,
    Failed,
}

/// A step's outcome reported by the agent, so that a failure is never silent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    pub boot_mac: MacAddr,
    pub step: AgentStep,
    pub ok: bool,
    pub message: String,
}
