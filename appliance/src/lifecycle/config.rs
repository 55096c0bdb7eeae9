//! The `[lifecycle]` section's file form: timeouts and polling, in seconds, and what a release
//! does to the disks when its request does not say.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleFile {
    pub timeout: u64,
    pub check_interval: u64,
    pub heartbeat_timeout: u64,
    pub power_poll: u64,
    /// A release erases the disks unless its request says `erase: false`.
    pub erase_on_release: bool,
    /// An erase is quick (signatures and partition tables) unless its request says
    /// `quick: false`; by default it is full.
    pub erase_quick: bool,
}

impl Default for LifecycleFile {
    fn default() -> Self {
        Self {
            timeout: 1800,
            check_interval: 5,
            heartbeat_timeout: 60,
            power_poll: 60,
            erase_on_release: true,
            erase_quick: false,
        }
    }
}
