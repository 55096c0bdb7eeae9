//! The `[lifecycle]` section's file form: timeouts and polling, in seconds.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleFile {
    pub timeout: u64,
    pub check_interval: u64,
    pub heartbeat_timeout: u64,
    pub power_poll: u64,
}

impl Default for LifecycleFile {
    fn default() -> Self {
        Self {
            timeout: 1800,
            check_interval: 5,
            heartbeat_timeout: 60,
            power_poll: 60,
        }
    }
}
