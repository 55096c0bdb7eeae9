//! Configuration in two forms: the serde file form, where every key has a default, and the
//! validated runtime form the services are built from. Validation names the field at fault.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `stork config default` prints; `FileConfig::default()` must parse from it unchanged
/// (a unit test holds the two together).
pub const DEFAULT_TOML: &str = r#"# Stork appliance configuration. Every key is optional; shown here with its default.

# Where Stork keeps its state. Boot files live in DATA_DIR/boot/ and are served at /boot/.
data_dir = "./var"

# The provisioning interface: DHCP listens on it only.
interface = "stork0"

# This appliance's IPv4 address on the provisioning network, as machines reach it.
address = "10.77.0.1"

[http]
# Boot files, boot scripts and the API (under /api/v1) share this listener.
listen = "0.0.0.0"
port = 8080

[dhcp]
# "full": Stork leases addresses; "off": no DHCP (another server must send machines here).
mode = "full"
# The dynamic range handed out, inclusive, inside address/prefix_len.
range = ["10.77.0.100", "10.77.0.199"]
prefix_len = 24
# Lease time in seconds.
lease_time = 3600
# Optional: default gateway and DNS servers handed to clients.
# router = "10.77.0.1"
dns = []

[boot]
# Kernel and initrd of the Stork agent, relative to DATA_DIR/boot/.
kernel = "vmlinuz"
initrd = "initrd.img"
# Extra kernel arguments for the agent. loglevel=4 keeps the kernel from echoing its
# command line, which carries the per-boot agent token, to the console.
cmdline = "console=ttyS0,115200 panic=10 loglevel=4"

[lifecycle]
# Seconds a busy status (commissioning, deploying, releasing, disk erasing) may last
# before the machine moves to its failed status.
timeout = 1800
# Seconds between timeout checks.
check_interval = 5
"#;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: PathBuf,
    pub interface: String,
    pub address: Ipv4Addr,
    pub http: HttpFile,
    pub dhcp: DhcpFile,
    pub boot: BootFile,
    pub lifecycle: LifecycleFile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleFile {
    pub timeout: u64,
    pub check_interval: u64,
}

impl Default for LifecycleFile {
    fn default() -> Self {
        Self {
            timeout: 1800,
            check_interval: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpFile {
    pub listen: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    Full,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DhcpFile {
    pub mode: DhcpMode,
    pub range: [Ipv4Addr; 2],
    pub prefix_len: u8,
    pub lease_time: u32,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootFile {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./var"),
            interface: "stork0".into(),
            address: Ipv4Addr::new(10, 77, 0, 1),
            http: HttpFile::default(),
            dhcp: DhcpFile::default(),
            boot: BootFile::default(),
            lifecycle: LifecycleFile::default(),
        }
    }
}

impl Default for HttpFile {
    fn default() -> Self {
        Self {
            listen: Ipv4Addr::UNSPECIFIED,
            port: 8080,
        }
    }
}

impl Default for DhcpFile {
    fn default() -> Self {
        Self {
            mode: DhcpMode::Full,
            range: [Ipv4Addr::new(10, 77, 0, 100), Ipv4Addr::new(10, 77, 0, 199)],
            prefix_len: 24,
            lease_time: 3600,
            router: None,
            dns: Vec::new(),
        }
    }
}

impl Default for BootFile {
    fn default() -> Self {
        Self {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: "console=ttyS0,115200 panic=10 loglevel=4".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
}

fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        why: why.into(),
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Checks every field and builds the runtime form.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.interface.is_empty() {
            return Err(invalid("interface", "must name the provisioning interface"));
        }
        if self.address.is_unspecified() || self.address.is_broadcast() {
            return Err(invalid(
                "address",
                "must be this appliance's unicast address",
            ));
        }
        if self.http.port == 0 {
            return Err(invalid("http.port", "must not be 0"));
        }
        let d = &self.dhcp;
        if !(1..=30).contains(&d.prefix_len) {
            return Err(invalid("dhcp.prefix_len", "must be 1..=30"));
        }
        let net = Subnet::new(self.address, d.prefix_len);
        let [start, end] = d.range;
        if u32::from(start) > u32::from(end) {
            return Err(invalid(
                "dhcp.range",
                format!("start {start} is after end {end}"),
            ));
        }
        for ip in [start, end] {
            if !net.contains(ip) || ip == net.network() || ip == net.broadcast() {
                return Err(invalid(
                    "dhcp.range",
                    format!(
                        "{ip} is not a host address in {}/{}",
                        net.network(),
                        net.prefix_len
                    ),
                ));
            }
        }
        if (u32::from(start)..=u32::from(end)).contains(&u32::from(self.address)) {
            return Err(invalid(
                "dhcp.range",
                format!("contains the appliance's own address {}", self.address),
            ));
        }
        if d.lease_time < 60 {
            return Err(invalid("dhcp.lease_time", "must be at least 60 seconds"));
        }
        if let Some(router) = d.router
            && !net.contains(router)
        {
            return Err(invalid(
                "dhcp.router",
                format!("{router} is outside the subnet"),
            ));
        }
        for (field, name) in [
            ("boot.kernel", &self.boot.kernel),
            ("boot.initrd", &self.boot.initrd),
        ] {
            if name.is_empty() || name.contains("..") || name.starts_with('/') {
                return Err(invalid(field, "must be a file name inside DATA_DIR/boot"));
            }
        }
        if self.lifecycle.timeout == 0 {
            return Err(invalid("lifecycle.timeout", "must be at least 1 second"));
        }
        if self.lifecycle.check_interval == 0 {
            return Err(invalid("lifecycle.check_interval", "must be at least 1 second"));
        }
        Ok(Config {
            timeout: std::time::Duration::from_secs(self.lifecycle.timeout),
            check_interval: std::time::Duration::from_secs(self.lifecycle.check_interval),
            data_dir: self.data_dir.clone(),
            interface: self.interface.clone(),
            address: self.address,
            http_listen: SocketAddr::from((self.http.listen, self.http.port)),
            http_port: self.http.port,
            dhcp: DhcpConfig {
                mode: d.mode,
                subnet: net,
                range: (start, end),
                lease_time: d.lease_time,
                router: d.router,
                dns: d.dns.clone(),
            },
            boot: self.boot.clone(),
        })
    }
}

/// An IPv4 subnet: an address and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        Self { addr, prefix_len }
    }
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len))
                .unwrap_or(0),
        )
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask()))
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.mask()))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network())
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub interface: String,
    pub address: Ipv4Addr,
    pub http_listen: SocketAddr,
    pub http_port: u16,
    pub dhcp: DhcpConfig,
    pub boot: BootFile,
    /// Busy-status timeout and how often it is checked.
    pub timeout: std::time::Duration,
    pub check_interval: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    pub subnet: Subnet,
    pub range: (Ipv4Addr, Ipv4Addr),
    pub lease_time: u32,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

impl Config {
    /// Base URL machines use to reach this appliance.
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.address, self.http_port)
    }
    pub fn boot_dir(&self) -> PathBuf {
        self.data_dir.join("boot")
    }
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("stork.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_default_is_the_default() {
        let parsed = FileConfig::parse(DEFAULT_TOML, Path::new("default")).unwrap();
        assert_eq!(parsed, FileConfig::default());
        assert_eq!(
            FileConfig::parse("", Path::new("empty")).unwrap(),
            FileConfig::default()
        );
        parsed.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = FileConfig::parse("[dhcp]\nrnage = []\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("rnage"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = FileConfig::default();
        c.dhcp.range = [Ipv4Addr::new(10, 77, 0, 100), Ipv4Addr::new(10, 78, 0, 5)];
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("`dhcp.range`"), "{err}");

        let mut c = FileConfig::default();
        c.dhcp.range = [Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 5)];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("own address")
        );

        let mut c = FileConfig::default();
        c.boot.kernel = "../etc/passwd".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`boot.kernel`")
        );
    }

    #[test]
    fn subnet_math() {
        let s = Subnet::new(Ipv4Addr::new(10, 77, 0, 1), 24);
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.network(), Ipv4Addr::new(10, 77, 0, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 77, 0, 255));
        assert!(s.contains(Ipv4Addr::new(10, 77, 0, 200)));
        assert!(!s.contains(Ipv4Addr::new(10, 77, 1, 1)));
    }
}
