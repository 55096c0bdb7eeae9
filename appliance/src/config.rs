//! Configuration in two forms: the serde file form, where every key has a default, and the
//! validated runtime form the services are built from. Validation names the field at fault.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// The DHCP service's own forms live with it; re-exported so `config::DhcpMode` still reads.
pub use crate::dhcp::config::{
    DhcpConfig, DhcpFile, DhcpMode, RateLimit, ReservationFile, Subnet, SubnetConfig, SubnetFile,
};
pub use crate::host::config::ApplianceFile;
pub use crate::http::config::HttpFile;
pub use crate::http::tls::TlsFile;
pub use crate::lifecycle::config::LifecycleFile;
pub use crate::tftp::config::TftpFile;

/// What `stork config default` prints; `FileConfig::default()` must parse from it unchanged
/// (a unit test holds the two together).
pub const DEFAULT_TOML: &str = r#"# Stork appliance configuration. Every key is optional; shown here with its default.

# Where Stork keeps its state. Boot files live in DATA_DIR/boot/ and are served at /boot/.
data_dir = "./var"

# The database of machines, events and tokens. Unset: SQLite in DATA_DIR/stork.db. Several
# appliances share one PostgreSQL database (each needs a copy of the same secrets.key):
# database = "postgres://stork:PASSWORD@10.77.0.2/stork"
# On a shared database, the site: the provisioning network this appliance serves. Only
# the appliances of a machine's site do its power actions (they alone reach its BMC); an
# HA pair on one network shares a site. Unset: the host name.
# site = "rack-a"

# The provisioning interface: DHCP listens on it only.
interface = "stork0"

# This appliance's IPv4 address on the provisioning network, as machines reach it.
address = "10.77.0.1"

[http]
# Boot files, boot scripts and the API (under /api/v1) share this listener.
listen = "0.0.0.0"
port = 8080
# Limits against a host on the provisioning network that holds or floods the listener:
# open connections (all, and from one address), seconds to send the headers and the body,
# and unauthenticated agent requests (enlist, report) per second from one address.
max_connections = 1024
max_connections_per_ip = 256
header_timeout = 10
body_timeout = 60
agent_rate = 5
agent_burst = 20

[tls]
# The API and the agent's routes over HTTPS on this port (of http.listen's address); the
# plain port then serves boot files and boot scripts only, which is all firmware speaks.
enabled = true
port = 8443
# The certificate chain and key (PEM). Unset: a self-signed pair is generated at first
# start in DATA_DIR/tls/; `stork config show` prints its fingerprint for clients to pin.
# cert = "/etc/stork/cert.pem"
# key = "/etc/stork/key.pem"
# More names or addresses for the generated certificate (localhost, the host name,
# 127.0.0.1 and `address` are always in it).
names = []

[tftp]
# Serve DATA_DIR/boot over TFTP too: firmware PXE fetches its network boot program so.
enabled = true
listen = "0.0.0.0"
port = 69
# Retry a missing name case-insensitively (firmware that upper-cases file names).
case_insensitive = false
# Transfers one client IP address may run at once; more get a TFTP error. A booting
# machine needs one or two; the cap keeps one host from taking every transfer slot.
max_transfers_per_client = 8

[dhcp]
# The keys directly under [dhcp] describe the provisioning subnet (address/prefix_len).
# "full": Stork leases addresses; "proxy": another server leases addresses and Stork
# answers PXE clients with boot information only (ports 67 and 4011); "off": no DHCP
# (another server must send machines here).
mode = "full"
# The dynamic range handed out, inclusive, inside address/prefix_len.
range = ["10.77.0.100", "10.77.0.199"]
prefix_len = 24
# Lease time in seconds.
lease_time = 3600
# Optional: default gateway and DNS servers handed to clients.
# router = "10.77.0.1"
dns = []
# Optional: domain name (option 15), NTP servers (option 42), interface MTU (option 26).
# domain = "lab.example"
ntp = []
# mtu = 1500
# Addresses inside the range never handed out dynamically, as inclusive [first, last] pairs.
exclude = []
# Fixed addresses by MAC; an address may be inside or outside the range.
# reservations = [{ mac = "52:54:00:12:34:56", ip = "10.77.0.50" }]
reservations = []
# Addresses outside `range` that deployed machines get when their network config asks for
# "auto" (each to one machine, recorded with its deploy), inclusive. Unset: none.
# static_range = ["10.77.0.20", "10.77.0.99"]
# Seconds an address a client declined (DHCPDECLINE: in use by someone else) is kept out.
probation = 600
# Per-MAC rate limit: requests per second, and the burst allowed above it (0 = no limit).
rate_limit = 10
rate_burst = 20
# Per source address (not 0.0.0.0, not relays), and for everyone together (0 = no limit).
rate_limit_source = 100
rate_burst_source = 200
rate_limit_global = 50000
rate_burst_global = 10000
# Relays' source addresses; unset: a relay sends from its giaddr or from inside a served
# subnet.
# relays = ["10.77.0.2"]
# Answer IPv6 router solicitations on the interface with "no IPv6 configuration here":
# iPXE otherwise waits about 13 s for a router before it boots.
ipv6_ra = true
# Further subnets, reached through DHCP relays (the relay's giaddr picks the subnet).
# Options not given here (lease_time, dns, domain, ntp, mtu) come from [dhcp].
# [[dhcp.subnets]]
# network = "10.78.0.0/24"
# mode = "full"
# ranges = [["10.78.0.100", "10.78.0.199"]]
# exclude = [["10.78.0.150", "10.78.0.150"]]
# router = "10.78.0.1"
# reservations = [{ mac = "52:54:00:12:34:57", ip = "10.78.0.10" }]

[dhcp.ha]
# Two appliances on one network share its pool (both with the same `site` and the same
# PostgreSQL `database`, which holds the leases): each answers half of the clients, by a
# hash of the MAC, and gives out half of the addresses; when one has been gone for
# `failover` seconds the other answers everyone. Unset: no pair.
# role = "first"
failover = 10

[dhcp6]
# DHCPv6 on the same interface (which must have `address`): "full" leases addresses from
# `range` (IA_NA) and answers network-boot clients with a boot file URL (RFC 5970);
# "stateless" gives the boot file URL to Information-requests only; "off".
mode = "off"
address = "fd77::1"
prefix_len = 64
range = ["fd77::100", "fd77::1ff"]
lease_time = 3600
# Requests per second, and the burst allowed above it, from one source address (0 = no
# limit): each client sends from its own link-local address.
rate_limit = 10
rate_burst = 20

[boot]
# Kernel and initrd of the Stork agent, relative to DATA_DIR/boot/.
kernel = "vmlinuz"
initrd = "initrd.img"
# The agent's ephemeral root (a SquashFS with the disk tools), relative to DATA_DIR/boot/.
# When the file is there, the agent fetches it into RAM, checks its sha256 and switches
# root into it before running its task; when it is not, the agent works from the initrd.
ephemeral = "ephemeral.squashfs"
# Extra kernel arguments for the agent. loglevel=4 keeps the kernel from echoing its
# command line, which carries the per-boot agent token, to the console. cryptomgr.notests:
# the agent uses no kernel crypto (its TLS is in user space), and the self-tests cost boot
# time and once hung an emulated boot (docs/measurements.md).
cmdline = "console=ttyS0,115200 panic=10 loglevel=4 cryptomgr.notests"
# UEFI machines that network-boot by PXE get the signed chain instead of iPXE (which is not
# signed): Debian's shim (shimx64.efi), its network GRUB (grubx64.efi) and a GRUB
# configuration per machine over TFTP, then the signed kernel. They boot so with Secure Boot
# on or off. BIOS machines and UEFI HTTP boot keep iPXE (that GRUB has no HTTP). Off, only
# machines added with the tag `secure-boot`, and those whose inventory said Secure Boot was
# on, get the chain.
secure_boot = false

[lifecycle]
# Seconds a busy status (commissioning, deploying, releasing, disk erasing) may last
# before the machine moves to its failed status.
timeout = 1800
# Seconds between timeout checks.
check_interval = 5
# Seconds an agent that has sent heartbeats (every 10 s while it works) may fall silent
# before its machine moves to its failed status.
heartbeat_timeout = 60
# Seconds between power-state polls of machines with a remote power driver (0: off).
power_poll = 60
# A release erases the machine's disks unless its request says otherwise
# (`stork machine release --no-erase`, or `"erase": false` in the API).
erase_on_release = true
# An erase is full unless its request says otherwise (`--quick`, `"quick": true`): the
# disk's own secure erase where it has one (NVMe Format NVM), else every byte zeroed, then
# samples across each disk read back as zeros. A quick erase clears partition tables and
# signatures only. A full erase of a large spinning disk must finish within `timeout`.
erase_quick = false

# The flashable appliance image only: `stork appliance setup` reads this section at boot
# (`stork serve` ignores it).
# [appliance]
# The host name, set at every boot.
# hostname = "stork"
# The first admin API token. Unset: setup makes one at first boot and writes it to
# admin-token.txt beside this file. Give either its SHA-256 (`printf %s TOKEN | sha256sum`)
# or the token itself (at least 20 characters; only its hash is stored).
# admin_token_sha256 = "<64 hex digits>"
# admin_token = "<a long random string>"
"#;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: PathBuf,
    /// `sqlite:PATH` or a `postgres://` URL; unset, SQLite in `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub interface: String,
    pub address: Ipv4Addr,
    pub http: HttpFile,
    pub tls: TlsFile,
    pub tftp: TftpFile,
    pub dhcp: DhcpFile,
    pub dhcp6: crate::dhcp6::Dhcp6File,
    pub boot: BootFile,
    pub lifecycle: LifecycleFile,
    /// Read by `stork appliance setup` only; never written out (the effective config the
    /// appliance image hands `stork serve` carries no admin token).
    #[serde(skip_serializing)]
    pub appliance: ApplianceFile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootFile {
    pub kernel: String,
    pub initrd: String,
    pub ephemeral: String,
    pub cmdline: String,
    /// UEFI PXE machines boot shim and GRUB, not iPXE (see the template above).
    pub secure_boot: bool,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./var"),
            database: None,
            site: None,
            interface: "stork0".into(),
            address: Ipv4Addr::new(10, 77, 0, 1),
            http: HttpFile::default(),
            tls: TlsFile::default(),
            tftp: TftpFile::default(),
            dhcp: DhcpFile::default(),
            dhcp6: crate::dhcp6::Dhcp6File::default(),
            boot: BootFile::default(),
            lifecycle: LifecycleFile::default(),
            appliance: ApplianceFile::default(),
        }
    }
}

impl Default for BootFile {
    fn default() -> Self {
        Self {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            ephemeral: "ephemeral.squashfs".into(),
            cmdline: "console=ttyS0,115200 panic=10 loglevel=4 cryptomgr.notests".into(),
            secure_boot: false,
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
    /// As `Invalid`, for a field inside a list (`dhcp.subnets[1].network`).
    #[error("config field `{field}`: {why}")]
    InvalidAt { field: String, why: String },
}

pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
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
        if let Err((field, why)) = self.http.check() {
            return Err(invalid(field, why));
        }
        if self.http.port == 0 {
            return Err(invalid("http.port", "must not be 0"));
        }
        if let Err((field, why)) = self.tls.check() {
            return Err(invalid(field, why));
        }
        if self.tls.enabled && self.tls.port == self.http.port {
            return Err(invalid("tls.port", "must differ from http.port"));
        }
        let dhcp = self.dhcp.validate(self.address)?;
        for (field, name) in [
            ("boot.kernel", &self.boot.kernel),
            ("boot.initrd", &self.boot.initrd),
            ("boot.ephemeral", &self.boot.ephemeral),
        ] {
            // Whitespace would split the iPXE script's kernel line.
            if name.is_empty()
                || name.contains("..")
                || name.starts_with('/')
                || name.contains(char::is_whitespace)
            {
                return Err(invalid(
                    field,
                    "must be a file name inside DATA_DIR/boot, without spaces",
                ));
            }
        }
        if self.lifecycle.timeout == 0 {
            return Err(invalid("lifecycle.timeout", "must be at least 1 second"));
        }
        if self.lifecycle.check_interval == 0 {
            return Err(invalid(
                "lifecycle.check_interval",
                "must be at least 1 second",
            ));
        }
        if self.lifecycle.heartbeat_timeout == 0 {
            return Err(invalid(
                "lifecycle.heartbeat_timeout",
                "must be at least 1 second",
            ));
        }
        let database = match &self.database {
            Some(d) => crate::store::Database::parse(d).map_err(|why| invalid("database", why))?,
            None => crate::store::Database::Sqlite(self.data_dir.join("stork.db")),
        };
        let site = match &self.site {
            Some(site) => {
                check_site(site).map_err(|why| invalid("site", why))?;
                site.clone()
            }
            None => host_name(),
        };
        if self.dhcp.ha.role.is_some() && !matches!(database, crate::store::Database::Postgres(_)) {
            return Err(invalid(
                "dhcp.ha.role",
                "an HA pair keeps its leases in the shared database: set `database` to a PostgreSQL URL",
            ));
        }
        Ok(Config {
            database,
            site,
            timeout: std::time::Duration::from_secs(self.lifecycle.timeout),
            heartbeat_timeout: std::time::Duration::from_secs(self.lifecycle.heartbeat_timeout),
            check_interval: std::time::Duration::from_secs(self.lifecycle.check_interval),
            power_poll: (self.lifecycle.power_poll > 0)
                .then(|| std::time::Duration::from_secs(self.lifecycle.power_poll)),
            erase_on_release: self.lifecycle.erase_on_release,
            erase_quick: self.lifecycle.erase_quick,
            data_dir: self.data_dir.clone(),
            interface: self.interface.clone(),
            address: self.address,
            http_listen: SocketAddr::from((self.http.listen, self.http.port)),
            tftp: self.tftp.runtime(&self.data_dir),
            http_port: self.http.port,
            http_limits: self.http.limits(),
            tls: self.tls.enabled.then(|| {
                let (cert, key) = self.tls.paths(&self.data_dir);
                crate::http::tls::TlsConfig {
                    port: self.tls.port,
                    cert,
                    key,
                    generate: self.tls.cert.is_none(),
                    names: self.tls.names.clone(),
                }
            }),
            dhcp,
            dhcp6: self.dhcp6.validate()?,
            boot: self.boot.clone(),
        })
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database: crate::store::Database,
    /// The site this appliance serves (see `site` in [`DEFAULT_TOML`]).
    pub site: String,
    pub interface: String,
    pub address: Ipv4Addr,
    pub http_listen: SocketAddr,
    pub http_port: u16,
    pub http_limits: crate::http::config::HttpLimits,
    /// `None` when HTTPS is off (API and agent routes on the plain port then).
    pub tls: Option<crate::http::tls::TlsConfig>,
    /// `None` when TFTP is off.
    pub tftp: Option<crate::tftp::TftpConfig>,
    pub dhcp: DhcpConfig,
    pub dhcp6: crate::dhcp6::Dhcp6Config,
    pub boot: BootFile,
    /// Busy-status timeout and how often it is checked.
    pub timeout: std::time::Duration,
    pub check_interval: std::time::Duration,
    /// Silence allowed to an agent that has sent heartbeats.
    pub heartbeat_timeout: std::time::Duration,
    /// `None`: power states are only queried on demand.
    pub power_poll: Option<std::time::Duration>,
    /// What a release request that does not say does: erase, and how.
    pub erase_on_release: bool,
    pub erase_quick: bool,
}

/// What a site's name may be: it appears in events, logs and lock keys.
pub fn check_site(site: &str) -> Result<(), &'static str> {
    let ok = !site.is_empty()
        && site.len() <= 64
        && site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err("1 to 64 characters: letters, digits, '-', '_' and '.'")
    }
}

/// The host's name, the default site: appliances on different hosts differ by default.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "stork".into())
}

impl Config {
    /// Base URL machines use to reach this appliance's boot files and scripts.
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.address, self.http_port)
    }
    /// Base URL of the API and the agent routes: HTTPS when it is on.
    pub fn api_url(&self) -> String {
        match &self.tls {
            Some(t) => format!("https://{}:{}", self.address, t.port),
            None => self.base_url(),
        }
    }
    /// The address a machine that asked from `peer` reaches this appliance at: over IPv6
    /// (with `[dhcp6]` on) the DHCPv6 address, else the IPv4 one.
    pub fn address_for(&self, peer: IpAddr) -> IpAddr {
        match crate::lifecycle::boot::canonical(peer) {
            IpAddr::V6(_) if self.dhcp6.serves() => IpAddr::V6(self.dhcp6.address),
            _ => IpAddr::V4(self.address),
        }
    }
    /// [`Config::base_url`] as seen from `peer` (see [`Config::address_for`]).
    pub fn base_url_for(&self, peer: IpAddr) -> String {
        format!("http://{}:{}", host(self.address_for(peer)), self.http_port)
    }
    /// [`Config::api_url`] as seen from `peer` (see [`Config::address_for`]).
    pub fn api_url_for(&self, peer: IpAddr) -> String {
        match &self.tls {
            Some(t) => format!("https://{}:{}", host(self.address_for(peer)), t.port),
            None => self.base_url_for(peer),
        }
    }
    /// Where a listener on `listen` also listens for IPv6 when `[dhcp6]` is on: `[::]` on
    /// the same port, IPv6 only, beside a listener on every IPv4 address (an IPv4 peer
    /// keeps its IPv4 address; a listener on one address has no twin).
    pub fn ipv6_twin(&self, listen: SocketAddr) -> Option<SocketAddr> {
        (self.dhcp6.serves() && listen.ip() == Ipv4Addr::UNSPECIFIED)
            .then(|| SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), listen.port()))
    }
    pub fn boot_dir(&self) -> PathBuf {
        self.data_dir.join("boot")
    }
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("stork.db")
    }
}

/// An address as a URL's host: IPv6 in brackets.
pub fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
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

    /// The commented `[appliance]` section, uncommented, is the default too; `stork serve`
    /// validates without it.
    #[test]
    fn the_appliance_section_is_documented_with_its_default() {
        let text = DEFAULT_TOML
            .replace("# [appliance]\n", "[appliance]\n")
            .replace("# hostname = \"stork\"\n", "hostname = \"stork\"\n");
        assert!(text.contains("\n[appliance]\n") && text.contains("\nhostname = \"stork\"\n"));
        let parsed = FileConfig::parse(&text, Path::new("default")).unwrap();
        assert_eq!(parsed, FileConfig::default());
        let mut bad = FileConfig::default();
        bad.appliance.hostname = "not a host name".into();
        bad.validate().unwrap();
        assert!(bad.appliance.validate().is_err());
        // Never written out: the effective config carries no token.
        bad.appliance.admin_token = Some("stork_admin_0123456789abcdef".into());
        let out = toml::to_string(&bad).unwrap();
        assert!(
            !out.contains("appliance") && !out.contains("0123456789abcdef"),
            "{out}"
        );
    }

    #[test]
    fn a_site_and_an_ha_pair_are_checked_by_field() {
        let parse = |text: &str| {
            FileConfig::parse(text, Path::new("x.toml"))
                .unwrap()
                .validate()
        };
        let err = parse("site = \"two words\"\n").unwrap_err();
        assert!(err.to_string().contains("`site`"), "{err}");
        // A pair keeps its leases in the shared database: not on SQLite.
        let err = parse("[dhcp.ha]\nrole = \"first\"\n").unwrap_err();
        assert!(err.to_string().contains("`dhcp.ha.role`"), "{err}");
        let ok = parse(
            "database = \"postgres://stork@10.77.0.9/stork\"\nsite = \"rack-a\"\n\
             [dhcp.ha]\nrole = \"second\"\nfailover = 5\n",
        )
        .unwrap();
        assert_eq!(ok.site, "rack-a");
        let ha = ok.dhcp.ha.unwrap();
        assert_eq!(
            (ha.role, ha.failover.as_secs()),
            (crate::dhcp::ha::Role::Second, 5)
        );
        let err =
            FileConfig::parse("[dhcp.ha]\nrole = \"third\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("role"), "{err}");
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

        let ip = |d| Ipv4Addr::new(10, 77, 0, d);
        for (range, why) in [
            ([ip(20), ip(150)], "overlaps dhcp.range"),
            ([ip(30), ip(20)], "10.77.0.30 is after 10.77.0.20"),
            (
                [ip(20), Ipv4Addr::new(10, 78, 0, 5)],
                "must be inside 10.77.0.0/24",
            ),
            ([ip(1), ip(20)], "holds 10.77.0.1, the appliance's"),
        ] {
            let mut c = FileConfig::default();
            c.dhcp.static_range = Some(range);
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("`dhcp.static_range`") && err.contains(why),
                "{err}"
            );
        }
        let mut c = FileConfig::default();
        c.dhcp.static_range = Some([ip(20), ip(99)]);
        assert_eq!(
            c.validate().unwrap().dhcp.static_range,
            Some((ip(20), ip(99)))
        );

        let mut c = FileConfig::default();
        c.boot.kernel = "../etc/passwd".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`boot.kernel`")
        );

        let mut c = FileConfig::default();
        c.boot.ephemeral = "/srv/ephemeral.squashfs".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`boot.ephemeral`")
        );
    }

    #[test]
    fn dhcp_subnets_options_and_reservations_parse_and_validate() {
        let text = r#"
[dhcp]
domain = "lab.example"
ntp = ["10.77.0.1"]
mtu = 1500
exclude = [["10.77.0.150", "10.77.0.159"]]
reservations = [{ mac = "52:54:00:00:00:01", ip = "10.77.0.20" }]

[[dhcp.subnets]]
network = "10.78.0.0/24"
ranges = [["10.78.0.100", "10.78.0.199"], ["10.78.0.10", "10.78.0.19"]]
router = "10.78.0.1"
lease_time = 600

[[dhcp.subnets]]
network = "10.79.0.0/16"
mode = "proxy"
"#;
        let cfg = FileConfig::parse(text, Path::new("x"))
            .unwrap()
            .validate()
            .unwrap();
        let d = &cfg.dhcp;
        assert_eq!(d.subnets.len(), 3);
        assert_eq!(
            d.local().exclude,
            vec![(Ipv4Addr::new(10, 77, 0, 150), Ipv4Addr::new(10, 77, 0, 159))]
        );
        assert_eq!(d.local().mtu, Some(1500));
        let s1 = &d.subnets[1];
        assert_eq!(s1.name, "dhcp.subnets[0]");
        // Sorted, and inherited where unset.
        assert_eq!(s1.ranges[0].0, Ipv4Addr::new(10, 78, 0, 10));
        assert_eq!(s1.lease_time, 600);
        assert_eq!(s1.domain.as_deref(), Some("lab.example"));
        assert_eq!(s1.ntp, vec![Ipv4Addr::new(10, 77, 0, 1)]);
        assert_eq!(d.subnets[2].mode, DhcpMode::Proxy);
        assert!(d.proxies() && d.serves());
        assert_eq!(
            d.rate_limit,
            Some(RateLimit {
                per_second: 10,
                burst: 20
            })
        );
    }

    #[test]
    fn dhcp_validation_names_the_field() {
        let check = |text: &str, field: &str| {
            let err = FileConfig::parse(text, Path::new("x"))
                .and_then(|f| f.validate())
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
        };
        check(
            "[[dhcp.subnets]]\nnetwork = \"10.78.0.0\"\nranges=[[\"10.78.0.2\",\"10.78.0.3\"]]",
            "dhcp.subnets[0].network",
        );
        check(
            "[[dhcp.subnets]]\nnetwork = \"10.77.0.0/16\"\nranges=[[\"10.77.9.2\",\"10.77.9.3\"]]",
            "dhcp.subnets[0].network",
        );
        check(
            "[[dhcp.subnets]]\nnetwork = \"10.78.0.0/24\"\nranges=[[\"10.78.1.2\",\"10.78.1.3\"]]",
            "dhcp.subnets[0].ranges",
        );
        check(
            "[[dhcp.subnets]]\nnetwork = \"10.78.0.0/24\"",
            "dhcp.subnets[0].ranges",
        );
        check(
            "[[dhcp.subnets]]\nnetwork = \"10.78.0.0/24\"\nranges=[[\"10.78.0.2\",\"10.78.0.9\"],[\"10.78.0.5\",\"10.78.0.20\"]]",
            "dhcp.subnets[0].ranges",
        );
        check(
            "[dhcp]\nexclude = [[\"10.77.0.9\", \"10.77.0.1\"]]",
            "dhcp.exclude",
        );
        check("[dhcp]\nmtu = 20", "dhcp.mtu");
        check("[dhcp]\ndomain = \"bad domain\"", "dhcp.domain");
        check("[dhcp]\nrouter = \"10.1.0.1\"", "dhcp.router");
        check(
            "[dhcp]\nreservations = [{ mac = \"52:54:00:00:00:01\", ip = \"10.1.0.1\" }]",
            "dhcp.reservations[0].ip",
        );
        check(
            "[dhcp]\nreservations = [{ mac = \"52:54:00:00:00:01\", ip = \"10.77.0.5\" }, { mac = \"52:54:00:00:00:01\", ip = \"10.77.0.6\" }]",
            "dhcp.reservations[1].mac",
        );
        let err = FileConfig::parse(
            "[dhcp]\nreservations = [{ mac = \"zz\", ip = \"10.77.0.5\" }]",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("MAC"), "{err}");
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
