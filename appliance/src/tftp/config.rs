//! The `[tftp]` section's file form and how it becomes the service's [`TftpConfig`].

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
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
    /// Transfers one client IP address may run at once (at least 1); more get an ERROR.
    pub max_transfers_per_client: NonZeroUsize,
}

impl Default for TftpFile {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: Ipv4Addr::UNSPECIFIED,
            port: crate::tftp::PORT,
            case_insensitive: false,
            max_transfers_per_client: NonZeroUsize::new(super::DEFAULT_MAX_TRANSFERS_PER_CLIENT)
                .unwrap_or(NonZeroUsize::MIN),
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
            max_transfers_per_client: self.max_transfers_per_client.get(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_cap_reaches_the_runtime_form() {
        let f: TftpFile = toml::from_str("max_transfers_per_client = 3").unwrap();
        let c = f.runtime(Path::new("/data")).unwrap();
        assert_eq!(c.max_transfers_per_client, 3);
        assert_eq!(
            TftpFile::default()
                .runtime(Path::new("/data"))
                .unwrap()
                .max_transfers_per_client,
            super::super::DEFAULT_MAX_TRANSFERS_PER_CLIENT
        );
        let err = toml::from_str::<TftpFile>("max_transfers_per_client = 0").unwrap_err();
        assert!(err.to_string().contains("nonzero"), "{err}");
    }
}
