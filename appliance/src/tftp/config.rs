//! The `[tftp]` section's file form and how it becomes the service's [`TftpConfig`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::TftpConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TftpFile {
    pub enabled: bool,
    pub listen: Ipv4Addr,
    pub port: u16,
    pub case_insensitive: bool,
}

impl Default for TftpFile {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: Ipv4Addr::UNSPECIFIED,
            port: crate::tftp::PORT,
            case_insensitive: false,
        }
    }
}

impl TftpFile {
    /// The runtime form (`None` when TFTP is off); the root is `data_dir/boot`, the same
    /// files HTTP serves under `/boot/`.
    pub fn runtime(&self, data_dir: &Path) -> Option<TftpConfig> {
        self.enabled.then(|| TftpConfig {
            root: data_dir.join("boot"),
            listen: SocketAddr::from((self.listen, self.port)),
            case_insensitive: self.case_insensitive,
            ..Default::default()
        })
    }
}
