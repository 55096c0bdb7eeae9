//! The records the store keeps.

pub use stork_proto::DeployTarget;
pub use stork_proto::api::{
    BootResource, DeployRequest, EventRecord, Machine, NamedLayout, PowerConfig, ResourceFile,
    Script, ScriptResult, SshKey, TokenRecord,
};

use crate::lifecycle::Status;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
