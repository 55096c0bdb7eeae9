//! The records the store keeps.

use serde::{Deserialize, Serialize};
use stork_proto::{Inventory, MacAddr};

use crate::lifecycle::Status;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How the machine is powered: the driver and its parameters. Parameters may hold secrets
/// (BMC passwords): [`PowerConfig::redacted`] is what leaves the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// `manual`, `ipmi`, `redfish` or `qmp`.
    pub driver: String,
    #[serde(default)]
    #[schema(schema_with = crate::http::openapi::power_params)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// Parameter names whose values never leave the appliance.
const SECRET_PARAMS: &[&str] = &["password", "pass", "secret", "token", "key"];

impl PowerConfig {
    pub fn manual() -> Self {
        Self {
            driver: "manual".into(),
            params: Default::default(),
        }
    }

    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        for (k, v) in c.params.iter_mut() {
            if SECRET_PARAMS
                .iter()
                .any(|s| k.to_ascii_lowercase().contains(s))
            {
                *v = serde_json::Value::String("***".into());
            }
        }
        c
    }
}

/// What to install and how, as the user asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// A registered boot resource name.
    pub image: String,
    /// `disk` (install) or `memory` (run from RAM, no disk touched).
    #[serde(default = "default_target")]
    pub target: DeployTarget,
    /// Disk to install to (kernel name like `vda`); default: the smallest that fits.
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub user_data: Option<String>,
    /// Disk deploys: partition sizes; asking for one installs from the image's root tar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<stork_proto::DiskLayout>,
}

fn default_target() -> DeployTarget {
    DeployTarget::Disk
}

pub use stork_proto::DeployTarget;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Machine {
    pub id: String,
    pub hostname: Option<String>,
    pub status: Status,
    /// Why the machine is in a failed status, or what it is doing.
    pub status_message: Option<String>,
    /// When the current status began (ms): busy statuses time out from here.
    pub status_since: i64,
    /// Bumped by every save; a save with a stale version is refused.
    pub version: i64,
    pub boot_mac: Option<MacAddr>,
    /// Every interface's MAC, the boot NIC first.
    pub macs: Vec<MacAddr>,
    pub arch: String,
    pub power: PowerConfig,
    pub inventory: Option<Inventory>,
    pub owner: Option<String>,
    pub deploy: Option<DeployRequest>,
    pub tags: Vec<String>,
    /// SHA-256 of the current per-boot agent token; never serialized.
    #[serde(skip)]
    pub agent_token: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Network-boot the agent while busy; cleared when the agent has installed an image so
    /// the next boot is from disk, set again by every step that powers on into the agent.
    pub netboot: bool,
    /// How the current release erases: signatures and partition tables only, or every byte.
    pub erase_quick: bool,
    /// When the machine's agent last sent a heartbeat (ms), and the step it was in then.
    pub last_heartbeat: Option<i64>,
    pub heartbeat_step: Option<String>,
    /// The agent's next heartbeat is due by then (ms): past it, the controller fails the busy
    /// status. Cleared by every status change, by the image's installation and by an agent
    /// that says it is leaving, so an agent on purpose silent (rebooting into the installed
    /// OS) is never taken for a dead one.
    pub heartbeat_deadline: Option<i64>,
}

impl Machine {
    pub fn new(id: String, macs: Vec<MacAddr>, now: i64) -> Self {
        Self {
            id,
            hostname: None,
            status: Status::New,
            status_message: None,
            status_since: now,
            version: 1,
            boot_mac: macs.first().copied(),
            macs,
            arch: "amd64".into(),
            power: PowerConfig::manual(),
            inventory: None,
            owner: None,
            deploy: None,
            tags: Vec::new(),
            agent_token: None,
            created_at: now,
            updated_at: now,
            netboot: true,
            erase_quick: true,
            last_heartbeat: None,
            heartbeat_step: None,
            heartbeat_deadline: None,
        }
    }

    /// The machine as the API shows it: secrets redacted.
    pub fn redacted(&self) -> Machine {
        let mut m = self.clone();
        m.power = m.power.redacted();
        m
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub at: i64,
    /// Who or what: `api:<token id>`, `agent`, `controller`, `dhcp`.
    pub actor: String,
    pub old_status: Option<Status>,
    pub new_status: Option<Status>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Event)]
pub struct EventRecord {
    pub id: i64,
    pub machine_id: String,
    pub at: i64,
    pub actor: String,
    pub old_status: Option<Status>,
    pub new_status: Option<Status>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub description: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SshKey {
    pub id: String,
    pub name: String,
    pub key: String,
    pub created_at: i64,
}

/// A registered bootable image (built by `stork-image`), served from `DATA_DIR/boot/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootResource {
    pub name: String,
    /// `os` (deployable), `ephemeral` (the agent's SquashFS) or `initrd`.
    pub kind: String,
    #[serde(default)]
    pub arch: Option<String>,
    /// Files by role (`raw`, `squashfs`, `tar`, `kernel`, `initrd`), paths relative to
    /// `DATA_DIR/boot/`, with their sha256.
    #[serde(default)]
    pub files: Vec<ResourceFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceFile {
    pub role: stork_proto::ImageRole,
    pub path: String,
    pub sha256: String,
    pub size: u64,
}
