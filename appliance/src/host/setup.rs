//! `stork appliance setup`: runs at every boot of the appliance image, as root, before
//! `stork serve --config RUNTIME_DIR/stork.toml` starts as the service user.
//!
//! 1. Reads `CONFIG_DIR/stork.toml` (the STORK partition, edited on a laptop) with the very
//!    code `stork serve` reads its config with ([`serve::load_config`]), and its
//!    `[appliance]` section. A missing or invalid file, or a provisioning interface that
//!    does not exist, is the **safe state**: the reason (naming the field) goes on the
//!    console, a DHCP client runs on every Ethernet NIC, and Stork's DHCP server stays
//!    off. Stork never serves DHCP from a config it could not read.
//! 2. The network through networkd (`.network` files in `/run/systemd/network`, then its
//!    `Reload()`), the host name through hostnamed; waits (bounded) for the address.
//! 3. The effective config in `RUNTIME_DIR/stork.toml`: the user's file with `data_dir`
//!    forced, or in the safe state the defaults with DHCP off on the DHCP'd NIC; checked
//!    again by `serve::load_config` exactly as `stork serve` will read it.
//! 4. DATA_DIR owned by the service user (0750), the TLS certificate made now (the code
//!    `stork serve` uses) so its fingerprint can be shown.
//! 5. The admin token: the one `stork.toml` gives, or, when the store has no live admin
//!    token, a new one (`auth::create_token`) written to `CONFIG_DIR/admin-token.txt`. It
//!    never reaches a log line or the journal; the consoles show it on this boot only.
//! 6. The notice on the consoles and agetty's issue file ([`super::console`]).

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stork_proto::api::{NewToken, TokenScope};

use super::Host;
use super::config::Appliance;
use super::console::{self, NetworkNote, Notice, TokenNote};
use super::network::{self, Ipv4Cidr};
use super::slots;
use crate::config::{Config, DhcpMode, FileConfig, Subnet};
use crate::power::Secret;
use crate::serve;
use crate::store::{Store, StoreError, TokenRecord, now_ms};

/// The user's file in CONFIG_DIR, and the effective one in RUNTIME_DIR.
pub const CONFIG_FILE: &str = "stork.toml";
/// The commented example beside it (the image ships it).
pub const EXAMPLE_FILE: &str = "stork.toml.example";
/// A token made at first boot, for the person to read from the STORK partition.
pub const TOKEN_FILE: &str = "admin-token.txt";
/// The host name in the safe state.
pub const SAFE_HOSTNAME: &str = "stork";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no such user {0:?} (the user `stork serve` runs as)")]
    NoUser(String),
    #[error("no Ethernet NIC appeared (none under {0})")]
    NoNic(PathBuf),
    #[error(
        "{interface} got no address by DHCP in {secs} s: is it connected to a network with a DHCP server?"
    )]
    NoAddress { interface: String, secs: u64 },
    #[error("cannot configure the network")]
    Network(#[source] super::dbus::BusError),
    #[error("cannot write the effective config")]
    Serialize(#[source] toml::ser::Error),
    #[error("the effective config {path} does not load (a bug: it was checked)")]
    Effective {
        path: PathBuf,
        #[source]
        source: anyhow::Error,
    },
    #[error("the database in the data directory")]
    Store(#[from] StoreError),
    #[error("the image's boot files and OS images")]
    Bundled(#[from] super::bundled::BundledError),
    #[error("HTTPS certificate")]
    Tls(#[from] crate::http::tls::TlsError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SetupError {
    let path = path.to_path_buf();
    move |source| SetupError::Io { what, path, source }
}

/// Every place setup reads or writes, injectable for tests.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The STORK partition: `stork.toml`, `admin-token.txt`.
    pub config_dir: PathBuf,
    /// Stork's DATA_DIR (the data partition).
    pub data_dir: PathBuf,
    /// Where the effective `stork.toml` goes.
    pub runtime_dir: PathBuf,
    /// networkd's runtime configuration directory.
    pub network_dir: PathBuf,
    pub consoles: Vec<PathBuf>,
    pub issue: PathBuf,
    pub sys_class_net: PathBuf,
    pub cmdline: PathBuf,
    pub version_file: PathBuf,
    /// What the image carries for Stork to serve ([`super::bundled`]).
    pub bundled_boot: PathBuf,
    pub bundled_images: PathBuf,
}

impl Paths {
    /// The three directories given, the system's places for the rest.
    pub fn new(config_dir: PathBuf, data_dir: PathBuf, runtime_dir: PathBuf) -> Self {
        Self {
            config_dir,
            data_dir,
            runtime_dir,
            network_dir: network::RUNTIME_DIR.into(),
            consoles: console::CONSOLES.iter().map(PathBuf::from).collect(),
            issue: console::ISSUE.into(),
            sys_class_net: "/sys/class/net".into(),
            cmdline: "/proc/cmdline".into(),
            version_file: slots::VERSION_FILE.into(),
            bundled_boot: super::bundled::BOOT_FILES.into(),
            bundled_images: super::bundled::OS_IMAGES.into(),
        }
    }

    pub fn effective_config(&self) -> PathBuf {
        self.runtime_dir.join(CONFIG_FILE)
    }
}

/// The user `stork serve` runs as: it owns DATA_DIR and reads the effective config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub fn lookup(user: &str) -> Result<Self, SetupError> {
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| io("look up the user", Path::new("/etc/passwd"))(e.into()))?
            .ok_or_else(|| SetupError::NoUser(user.to_string()))?;
        Ok(Self {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }

    fn chown(&self, path: &Path) -> Result<(), SetupError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(io("change the owner of", path))
    }
}

pub struct Setup {
    pub paths: Paths,
    pub owner: Owner,
    /// How long to wait for the interface, and for its address.
    pub wait: Duration,
    /// How often to look meanwhile.
    pub poll: Duration,
}

/// What setup did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why the safe state, if it is the safe state.
    pub safe: Option<String>,
    pub interface: String,
    pub address: Ipv4Cidr,
    pub url: String,
    pub fingerprint: Option<String>,
    /// A token was made on this boot.
    pub token_created: bool,
    /// The notice without the token: what may go to the journal.
    pub notice: String,
}

/// What the user's config became.
enum Plan {
    Configured {
        file: Box<FileConfig>,
        cfg: Box<Config>,
        appliance: Appliance,
    },
    Safe {
        why: String,
    },
}

impl Setup {
    /// Runs setup; a failure is also shown on the consoles (the person at the screen has no
    /// other way to learn it).
    pub fn run(&self, host: &dyn Host) -> Result<Outcome, SetupError> {
        let result = self.run_inner(host);
        if let Err(e) = &result {
            let mut text = format!("\nStork setup FAILED: {e}\n",);
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!("  caused by: {c}\n"));
                cause = c.source();
            }
            text.push_str(
                "  Stork is not running. Check stork.toml on the STORK partition and the \
                 network\n  cable, then reboot.\n",
            );
            for u in console::show(&self.paths.consoles, &self.paths.issue, &text, false) {
                tracing::warn!(path = %u.path.display(), error = %u.error, "cannot show the failure");
            }
        }
        result
    }

    fn run_inner(&self, host: &dyn Host) -> Result<Outcome, SetupError> {
        let p = &self.paths;
        let deadline = Instant::now() + self.wait;
        let mut plan = self.read_user_config();
        if let Plan::Configured { cfg, .. } = &plan {
            let iface = p.sys_class_net.join(&cfg.interface);
            // udev may still be naming the NIC: wait for it as for an address.
            if network::wait_until(deadline, self.poll, || iface.exists().then_some(())).is_none() {
                let nics = network::ethernet_nics(&p.sys_class_net);
                let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
                plan = Plan::Safe {
                    why: format!(
                        "config field `interface`: there is no network interface {:?} on this \
                         machine (Ethernet NICs: {})",
                        cfg.interface,
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                };
            }
        }

        let (hostname, configured_token) = match &plan {
            Plan::Configured { appliance, .. } => (
                appliance.hostname.clone(),
                appliance.admin_token_sha256.clone(),
            ),
            Plan::Safe { .. } => (SAFE_HOSTNAME.to_string(), None),
        };
        let (effective, network_note) = match &plan {
            Plan::Configured { file, cfg, .. } => {
                let address = Ipv4Cidr {
                    addr: cfg.address,
                    prefix_len: file.dhcp.prefix_len,
                };
                let management: Vec<String> = network::ethernet_nics(&p.sys_class_net)
                    .into_iter()
                    .map(|n| n.name)
                    .filter(|n| *n != cfg.interface)
                    .collect();
                let files = network::provisioning(&cfg.interface, address, &management);
                self.apply_network(host, &files, &hostname)?;
                let up = network::wait_until(deadline, self.poll, || {
                    host.ipv4_addresses(&cfg.interface)
                        .contains(&address)
                        .then_some(())
                })
                .is_some();
                if !up {
                    tracing::warn!(interface = %cfg.interface, %address, "the provisioning address is not up yet");
                }
                let mut effective = (**file).clone();
                effective.data_dir = p.data_dir.clone();
                let mode = match cfg.dhcp.local().mode {
                    DhcpMode::Full => "full",
                    DhcpMode::Proxy => "proxy",
                    DhcpMode::Off => "off",
                };
                let note = NetworkNote::Configured {
                    interface: cfg.interface.clone(),
                    address,
                    mode,
                    up,
                };
                (effective, note)
            }
            Plan::Safe { why } => {
                tracing::warn!(why = %why, "safe state: Stork's DHCP server stays off");
                // Every Ethernet NIC asks: which port of a new box is cabled is not known.
                let nics = network::wait_until(deadline, self.poll, || {
                    let nics = network::ethernet_nics(&p.sys_class_net);
                    (!nics.is_empty()).then_some(nics)
                })
                .ok_or_else(|| SetupError::NoNic(p.sys_class_net.clone()))?;
                let names: Vec<String> = nics.into_iter().map(|n| n.name).collect();
                self.apply_network(host, &network::safe(&names.join(" ")), &hostname)?;
                let (nic, address) = network::wait_until(deadline, self.poll, || {
                    names.iter().find_map(|n| {
                        host.ipv4_addresses(n)
                            .into_iter()
                            .next()
                            .map(|a| (n.clone(), a))
                    })
                })
                .ok_or_else(|| SetupError::NoAddress {
                    interface: names.join(", "),
                    secs: self.wait.as_secs(),
                })?;
                let effective = safe_config(&p.data_dir, &nic, address);
                let note = NetworkNote::Safe {
                    why: why.clone(),
                    interface: nic,
                    address,
                };
                (effective, note)
            }
        };

        let cfg = self.write_effective(&effective)?;
        self.prepare_data_dir()?;
        let fingerprint = self.certificate(&cfg)?;
        let token = self.admin_token(&cfg, configured_token.as_deref())?;
        self.install_bundled(&cfg)?;

        let notice = Notice {
            version: slots::running_version(&p.version_file),
            slot: std::fs::read_to_string(&p.cmdline)
                .ok()
                .and_then(|c| slots::booted_slot(&c)),
            hostname,
            url: cfg.api_url(),
            fingerprint: fingerprint.clone(),
            token: token.clone(),
            network: network_note,
        };
        let created = matches!(token, TokenNote::Created { .. });
        for u in console::show(&p.consoles, &p.issue, &notice.render(true), created) {
            tracing::warn!(path = %u.path.display(), error = %u.error, "cannot show the notice");
        }
        let (interface, address) = match &notice.network {
            NetworkNote::Configured {
                interface, address, ..
            }
            | NetworkNote::Safe {
                interface, address, ..
            } => (interface.clone(), *address),
        };
        let safe = match plan {
            Plan::Safe { why } => Some(why),
            Plan::Configured { .. } => None,
        };
        tracing::info!(
            safe_state = safe.is_some(),
            %interface,
            %address,
            url = %notice.url,
            fingerprint = fingerprint.as_deref().unwrap_or("none"),
            token_created = created,
            "appliance set up"
        );
        Ok(Outcome {
            safe,
            interface,
            address,
            url: notice.url.clone(),
            fingerprint,
            token_created: created,
            notice: notice.render(false),
        })
    }

    /// The user's config, validated as `stork serve` validates it, or why it is not usable.
    fn read_user_config(&self) -> Plan {
        let path = self.paths.config_dir.join(CONFIG_FILE);
        if !path.exists() {
            return Plan::Safe {
                why: format!("there is no {CONFIG_FILE} on the STORK partition"),
            };
        }
        let overrides = serve::Overrides {
            config: Some(path.clone()),
            data_dir: Some(self.paths.data_dir.clone()),
            ..Default::default()
        };
        let checked = serve::load_config(&overrides).and_then(|cfg| {
            let file = FileConfig::load(&path)?;
            let appliance = file.appliance.validate()?;
            Ok((file, cfg, appliance))
        });
        match checked {
            Ok((file, cfg, appliance)) => Plan::Configured {
                file: Box::new(file),
                cfg: Box::new(cfg),
                appliance,
            },
            Err(e) => Plan::Safe {
                why: redact_tokens(
                    &format!("{e:#}"),
                    &std::fs::read_to_string(&path).unwrap_or_default(),
                ),
            },
        }
    }

    fn apply_network(
        &self,
        host: &dyn Host,
        files: &[network::NetworkFile],
        hostname: &str,
    ) -> Result<(), SetupError> {
        let dir = &self.paths.network_dir;
        network::install(dir, files).map_err(io("write networkd files in", dir))?;
        // The name first: the DHCP client sends it.
        if let Err(e) = host.set_hostname(hostname) {
            tracing::warn!(error = %e, hostname, "cannot set the host name");
        }
        host.reload_networkd().map_err(SetupError::Network)?;
        tracing::info!(files = ?files.iter().map(|f| &f.name).collect::<Vec<_>>(), "networkd reloaded");
        Ok(())
    }

    /// Writes `file` as the effective config, readable by the service user, and loads it
    /// back as `stork serve --config` will.
    fn write_effective(&self, file: &FileConfig) -> Result<Config, SetupError> {
        let dir = &self.paths.runtime_dir;
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = self.paths.effective_config();
        let text = format!(
            "# The effective configuration of `stork serve`, written at boot by `stork appliance \
             setup`\n# from {} (edit that one). Not kept across boots.\n\n{}",
            self.paths.config_dir.join(CONFIG_FILE).display(),
            toml::to_string(file).map_err(SetupError::Serialize)?
        );
        super::write_file(&path, text.as_bytes(), 0o640).map_err(io("write", &path))?;
        std::os::unix::fs::chown(&path, None, Some(self.owner.gid))
            .map_err(io("change the group of", &path))?;
        serve::load_config(&serve::Overrides {
            config: Some(path.clone()),
            ..Default::default()
        })
        .map_err(|source| SetupError::Effective { path, source })
    }

    fn prepare_data_dir(&self) -> Result<(), SetupError> {
        let dir = &self.paths.data_dir;
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .map_err(io("set the mode of", dir))?;
        self.owner.chown(dir)
    }

    /// The HTTPS certificate, generated now if it is ours to generate; its fingerprint.
    fn certificate(&self, cfg: &Config) -> Result<Option<String>, SetupError> {
        let Some(t) = &cfg.tls else {
            return Ok(None);
        };
        let loaded = t.load(cfg.address)?;
        if t.generate {
            for path in [&t.cert, &t.key] {
                if let Some(parent) = path.parent() {
                    self.owner.chown(parent)?;
                }
                self.owner.chown(path)?;
            }
        }
        Ok(Some(loaded.fingerprint.to_string()))
    }

    /// The image's boot files and OS images into DATA_DIR/boot, owned by the service user.
    fn install_bundled(&self, cfg: &Config) -> Result<(), SetupError> {
        let store = Store::open(&cfg.db_path())?;
        let boot = cfg.boot_dir();
        let done = super::bundled::install(
            &self.paths.bundled_boot,
            &self.paths.bundled_images,
            &boot,
            &store,
        )?;
        drop(store);
        tracing::info!(
            copied = ?done.copied,
            imported = ?done.imported,
            images = ?done.images,
            "bundled boot files and OS images in place"
        );
        self.chown_tree(&boot)
    }

    fn chown_tree(&self, path: &Path) -> Result<(), SetupError> {
        self.owner.chown(path)?;
        if path.is_dir() && !path.is_symlink() {
            for e in std::fs::read_dir(path).map_err(io("read", path))?.flatten() {
                self.chown_tree(&e.path())?;
            }
        }
        Ok(())
    }

    /// The admin token (see the module doc); the store's files end up the service user's.
    fn admin_token(&self, cfg: &Config, configured: Option<&str>) -> Result<TokenNote, SetupError> {
        let db = cfg.db_path();
        let store = Store::open(&db)?;
        let file = self.paths.config_dir.join(TOKEN_FILE);
        let note = if let Some(hash) = configured {
            if store.token_by_hash(hash)?.is_none() {
                let id = hash[..12].to_string();
                store.add_token(
                    &TokenRecord {
                        id: id.clone(),
                        description: "appliance.admin_token in stork.toml".into(),
                        created_at: now_ms(),
                        scope: TokenScope::Admin,
                        expires_at: None,
                        revoked_at: None,
                    },
                    hash,
                )?;
                tracing::info!(id, "admin token from stork.toml stored");
            }
            TokenNote::Configured
        } else if has_live_admin(&store)? {
            TokenNote::Existing {
                file: file.exists().then_some(file),
            }
        } else {
            let (rec, token) = crate::auth::create_token(
                &store,
                &NewToken {
                    description: "first admin token, made by `stork appliance setup`".into(),
                    scope: TokenScope::Admin,
                    expires_in_secs: None,
                },
            )?;
            let token = Secret::new(token);
            let saved = super::write_file(&file, format!("{}\n", token.expose()).as_bytes(), 0o600);
            let file = match saved {
                Ok(()) => {
                    tracing::info!(id = %rec.id, file = %file.display(), "admin token made and saved");
                    Some(file)
                }
                Err(e) => {
                    tracing::warn!(id = %rec.id, file = %file.display(), error = %e, "admin token made; it cannot be saved, the console shows it");
                    None
                }
            };
            TokenNote::Created { token, file }
        };
        drop(store);
        let mut owned = vec![db.clone(), crate::store::secrets::key_path_for(&db)];
        for suffix in ["-wal", "-shm"] {
            let mut side = db.as_os_str().to_owned();
            side.push(suffix);
            owned.push(side.into());
        }
        for path in owned.iter().filter(|p| p.exists()) {
            self.owner.chown(path)?;
        }
        Ok(note)
    }
}

/// `why` without the values of the file's `admin_token` lines: a TOML syntax error quotes
/// the line it is on, and `why` goes to the log and the journal.
fn redact_tokens(why: &str, file: &str) -> String {
    let mut out = why.to_string();
    for line in file.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !key.trim().starts_with("admin_token") {
            continue;
        }
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        for secret in [value, value.trim_end_matches('"')] {
            if secret.len() >= 4 {
                out = out.replace(secret, "***");
            }
        }
    }
    out
}

fn has_live_admin(store: &Store) -> Result<bool, StoreError> {
    let now = now_ms();
    Ok(store.list_tokens()?.iter().any(|t| {
        t.scope == TokenScope::Admin
            && t.revoked_at.is_none()
            && t.expires_at.is_none_or(|e| e > now)
    }))
}

/// The safe state's config: the defaults, DATA_DIR, the DHCP'd NIC and its address, DHCP off.
pub fn safe_config(data_dir: &Path, interface: &str, address: Ipv4Cidr) -> FileConfig {
    let mut f = FileConfig {
        data_dir: data_dir.to_path_buf(),
        interface: interface.to_string(),
        address: address.addr,
        ..FileConfig::default()
    };
    f.dhcp.mode = DhcpMode::Off;
    f.dhcp.ipv6_ra = false;
    // `[dhcp]` describes a subnet around `address` even when off, and its range is checked
    // against it: one spare host address of the DHCP'd subnet (of a /30 around it when the
    // lease is narrower), never served.
    let prefix_len = address.prefix_len.clamp(1, 30);
    let net = Subnet::new(address.addr, prefix_len);
    let first = Ipv4Addr::from(u32::from(net.network()).wrapping_add(1));
    let spare = if first == address.addr {
        Ipv4Addr::from(u32::from(first).wrapping_add(1))
    } else {
        first
    };
    f.dhcp.prefix_len = prefix_len;
    f.dhcp.range = [spare, spare];
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Records the D-Bus calls; addresses appear as the test says.
    #[derive(Default)]
    struct FakeHost {
        calls: RefCell<Vec<String>>,
        addresses: HashMap<String, Vec<Ipv4Cidr>>,
    }

    impl Host for FakeHost {
        fn reload_networkd(&self) -> Result<(), super::super::dbus::BusError> {
            self.calls.borrow_mut().push("networkd.Reload".into());
            Ok(())
        }
        fn set_hostname(&self, name: &str) -> Result<(), super::super::dbus::BusError> {
            self.calls
                .borrow_mut()
                .push(format!("hostname1.SetHostname({name}, false)"));
            Ok(())
        }
        fn ipv4_addresses(&self, interface: &str) -> Vec<Ipv4Cidr> {
            self.addresses.get(interface).cloned().unwrap_or_default()
        }
    }

    fn cidr(a: [u8; 4], prefix_len: u8) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(a),
            prefix_len,
        }
    }

    /// A whole appliance in a temporary directory: the STORK partition, DATA_DIR, /run,
    /// networkd's directory, two consoles (files) and a third that does not exist, sysfs
    /// with two Ethernet NICs and loopback, the command line and the version file.
    struct Machine {
        dir: tempfile::TempDir,
        setup: Setup,
    }

    impl Machine {
        fn new(stork_toml: Option<&str>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let at = |p: &str| dir.path().join(p);
            let mut paths = Paths::new(at("etc/stork"), at("var/lib/stork"), at("run/stork"));
            paths.network_dir = at("run/systemd/network");
            paths.consoles = vec![at("dev/tty1"), at("dev/ttyS0"), at("dev/ttyS1")];
            paths.issue = at("run/issue.d/50-stork.issue");
            paths.sys_class_net = at("sys/class/net");
            paths.cmdline = at("proc/cmdline");
            paths.version_file = at("usr/lib/stork/version");
            for d in ["etc/stork", "dev", "proc", "usr/lib/stork"] {
                std::fs::create_dir_all(at(d)).unwrap();
            }
            std::fs::write(at("dev/tty1"), "").unwrap();
            std::fs::write(at("dev/ttyS0"), "").unwrap();
            std::fs::write(at("proc/cmdline"), "ro quiet stork.slot=b\n").unwrap();
            std::fs::write(at("usr/lib/stork/version"), "2026.5.0\n").unwrap();
            let sys = &paths.sys_class_net;
            super::super::network::tests::fake_nic(sys, "lo", 1, 772, false);
            super::super::network::tests::fake_nic(sys, "enp2s0", 3, 1, true);
            super::super::network::tests::fake_nic(sys, "enp1s0", 2, 1, true);
            if let Some(text) = stork_toml {
                std::fs::write(at("etc/stork/stork.toml"), text).unwrap();
            }
            let setup = Setup {
                paths,
                owner: Owner {
                    uid: nix::unistd::getuid().as_raw(),
                    gid: nix::unistd::getgid().as_raw(),
                },
                wait: Duration::from_secs(2),
                poll: Duration::from_millis(5),
            };
            Self { dir, setup }
        }

        fn read(&self, p: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
        }

        /// Runs setup with every tracing event captured; the outcome and the log.
        fn run(&self, host: &FakeHost) -> (Result<Outcome, SetupError>, String) {
            let log = Arc::new(Mutex::new(Vec::<u8>::new()));
            let writer = log.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || Capture(writer.clone()))
                .finish();
            let outcome = tracing::subscriber::with_default(subscriber, || self.setup.run(host));
            let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
            (outcome, text)
        }

        fn effective(&self) -> FileConfig {
            FileConfig::load(&self.setup.paths.effective_config()).unwrap()
        }
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const CONFIGURED: &str = r#"
interface = "enp1s0"
address = "10.77.0.1"
data_dir = "/somewhere/else"

[dhcp]
range = ["10.77.0.100", "10.77.0.199"]

[appliance]
hostname = "pxe-1"
"#;

    #[test]
    fn configured_state_end_to_end() {
        let m = Machine::new(Some(CONFIGURED));
        let host = FakeHost {
            addresses: HashMap::from([("enp1s0".into(), vec![cidr([10, 77, 0, 1], 24)])]),
            ..FakeHost::default()
        };
        let (outcome, log) = m.run(&host);
        let outcome = outcome.unwrap();
        assert_eq!(outcome.safe, None);
        assert_eq!(outcome.interface, "enp1s0");
        assert_eq!(outcome.url, "https://10.77.0.1:8443");
        assert!(outcome.token_created);
        assert_eq!(
            *host.calls.borrow(),
            ["hostname1.SetHostname(pxe-1, false)", "networkd.Reload"]
        );

        // networkd: the provisioning NIC static, the other by DHCP.
        let prov = m.read("run/systemd/network/50-stork-provisioning.network");
        assert!(prov.contains("Name=enp1s0\n") && prov.contains("Address=10.77.0.1/24\n"));
        let mgmt = m.read("run/systemd/network/50-stork-management.network");
        assert!(mgmt.contains("Name=enp2s0\n") && mgmt.contains("DHCP=yes\n"));

        // The effective config: the user's, with DATA_DIR forced and no [appliance].
        let eff = m.effective();
        assert_eq!(eff.data_dir, m.setup.paths.data_dir);
        assert_eq!(eff.interface, "enp1s0");
        assert_eq!(eff.dhcp.mode, DhcpMode::Full);
        assert!(!m.read("run/stork/stork.toml").contains("[appliance]"));

        // The token: in the file, in the store (hashed), on the consoles and the issue
        // file, never in the journal's copy or the log.
        let token = m.read("etc/stork/admin-token.txt").trim().to_string();
        assert!(token.starts_with(crate::auth::ADMIN_PREFIX), "{token}");
        let store = Store::open(&m.setup.paths.data_dir.join("stork.db")).unwrap();
        let rec = store
            .token_by_hash(&crate::auth::hash(&token))
            .unwrap()
            .unwrap();
        assert_eq!(rec.scope, TokenScope::Admin);
        drop(store);
        let tty1 = m.read("dev/tty1");
        assert!(tty1.contains(&token), "{tty1}");
        assert_eq!(m.read("dev/ttyS0"), tty1);
        assert!(
            !m.dir.path().join("dev/ttyS1").exists(),
            "a missing console is not made"
        );
        let issue = m.read("run/issue.d/50-stork.issue");
        assert!(issue.contains(&token));
        assert!(!outcome.notice.contains(&token));
        assert!(log.contains("appliance set up"), "{log}");
        assert!(
            !log.contains(&token[crate::auth::ADMIN_PREFIX.len()..]),
            "{log}"
        );
        for want in [
            "Stork 2026.5.0 (slot b), host pxe-1",
            "https://10.77.0.1:8443",
            outcome.fingerprint.as_deref().unwrap(),
            "admin-token.txt on the STORK partition",
            "DHCP: full on enp1s0 (10.77.0.1/24)",
        ] {
            assert!(tty1.contains(want), "{want}: {tty1}");
        }
        // The certificate is the one `stork serve` will load.
        let cfg = serve::load_config(&serve::Overrides {
            config: Some(m.setup.paths.effective_config()),
            ..Default::default()
        })
        .unwrap();
        let tls = cfg.tls.as_ref().unwrap();
        assert_eq!(
            tls.fingerprint().unwrap().to_string(),
            outcome.fingerprint.clone().unwrap()
        );
        let mode = std::fs::metadata(&m.setup.paths.data_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);

        // The next boot: the same token file and certificate, no token on the consoles.
        std::fs::write(m.dir.path().join("dev/tty1"), "").unwrap();
        let (again, _) = m.run(&host);
        let again = again.unwrap();
        assert!(!again.token_created);
        assert_eq!(again.fingerprint, outcome.fingerprint);
        assert_eq!(m.read("etc/stork/admin-token.txt").trim(), token);
        let tty1 = m.read("dev/tty1");
        assert!(
            !tty1.contains(&token) && tty1.contains("admin-token.txt"),
            "{tty1}"
        );
        assert!(!m.read("run/issue.d/50-stork.issue").contains(&token));
    }

    #[test]
    fn an_invalid_config_is_the_safe_state_naming_the_field() {
        let bad = CONFIGURED.replace("10.77.0.199", "10.78.0.5");
        let m = Machine::new(Some(&bad));
        let host = FakeHost {
            addresses: HashMap::from([("enp1s0".into(), vec![cidr([192, 168, 1, 50], 24)])]),
            ..FakeHost::default()
        };
        let (outcome, log) = m.run(&host);
        let outcome = outcome.unwrap();
        let why = outcome.safe.clone().unwrap();
        assert!(why.contains("`dhcp.range`"), "{why}");
        // Every Ethernet NIC asks for DHCP (by ifindex); the first with an address is
        // announced, under the safe host name.
        assert_eq!(outcome.interface, "enp1s0");
        assert_eq!(
            *host.calls.borrow(),
            ["hostname1.SetHostname(stork, false)", "networkd.Reload"]
        );
        let safe = m.read("run/systemd/network/50-stork-safe.network");
        assert!(safe.contains("Name=enp1s0 enp2s0\n") && safe.contains("DHCP=yes\n"));
        assert!(
            !m.dir
                .path()
                .join("run/systemd/network/50-stork-provisioning.network")
                .exists()
        );
        // Stork's DHCP is off, on the DHCP'd NIC and address.
        let eff = m.effective();
        assert_eq!(eff.dhcp.mode, DhcpMode::Off);
        assert_eq!(eff.interface, "enp1s0");
        assert_eq!(eff.address, Ipv4Addr::new(192, 168, 1, 50));
        assert_eq!(eff.data_dir, m.setup.paths.data_dir);
        assert_eq!(outcome.url, "https://192.168.1.50:8443");
        let tty1 = m.read("dev/tty1");
        for want in [
            "SAFE STATE: Stork's DHCP server is OFF",
            "`dhcp.range`",
            "stork.toml.example",
            "reboot",
            "enp1s0 by DHCP (192.168.1.50/24)",
        ] {
            assert!(tty1.contains(want), "{want}: {tty1}");
        }
        let token = m.read("etc/stork/admin-token.txt").trim().to_string();
        assert!(tty1.contains(&token));
        assert!(!log.contains(&token), "{log}");
    }

    #[test]
    fn no_config_or_a_missing_interface_is_the_safe_state() {
        let m = Machine::new(None);
        let host = FakeHost {
            addresses: HashMap::from([("enp1s0".into(), vec![cidr([10, 1, 2, 3], 16)])]),
            ..FakeHost::default()
        };
        let why = m.run(&host).0.unwrap().safe.unwrap();
        assert!(why.contains("no stork.toml"), "{why}");

        let mut m = Machine::new(Some(&CONFIGURED.replace("enp1s0", "eth9")));
        m.setup.wait = Duration::from_millis(50);
        let why = m.run(&host).0.unwrap().safe.unwrap();
        assert!(
            why.contains("`interface`")
                && why.contains("\"eth9\"")
                && why.contains("enp1s0, enp2s0"),
            "{why}"
        );
    }

    #[test]
    fn a_configured_token_is_stored_and_no_file_made() {
        let plain = "stork_admin_from_the_laptop_0123456789";
        let m = Machine::new(Some(&format!("{CONFIGURED}admin_token = \"{plain}\"\n")));
        let host = FakeHost {
            addresses: HashMap::from([("enp1s0".into(), vec![cidr([10, 77, 0, 1], 24)])]),
            ..FakeHost::default()
        };
        let (outcome, log) = m.run(&host);
        let outcome = outcome.unwrap();
        assert!(!outcome.token_created);
        assert!(!m.dir.path().join("etc/stork/admin-token.txt").exists());
        let store = Store::open(&m.setup.paths.data_dir.join("stork.db")).unwrap();
        assert!(
            store
                .token_by_hash(&crate::auth::hash(plain))
                .unwrap()
                .is_some()
        );
        assert_eq!(store.list_tokens().unwrap().len(), 1);
        drop(store);
        assert!(m.read("dev/tty1").contains("the one set in stork.toml"));
        assert!(!m.read("run/stork/stork.toml").contains(plain));
        assert!(!log.contains(plain));
    }

    #[test]
    fn a_token_on_a_broken_line_stays_out_of_the_log() {
        let secret = "stork_admin_never_in_the_journal_42";
        // An unterminated string: the parser's message quotes the line.
        let m = Machine::new(Some(&format!("{CONFIGURED}admin_token = \"{secret}\n")));
        let host = FakeHost {
            addresses: HashMap::from([("enp1s0".into(), vec![cidr([10, 1, 2, 3], 16)])]),
            ..FakeHost::default()
        };
        let (outcome, log) = m.run(&host);
        let outcome = outcome.unwrap();
        let why = outcome.safe.unwrap();
        assert!(why.contains("admin_token = \"***"), "{why}");
        assert!(
            !why.contains(secret) && !log.contains(secret),
            "{why}\n{log}"
        );
        assert!(!outcome.notice.contains(secret));
        assert!(!m.read("dev/tty1").contains(secret));
        assert_eq!(redact_tokens("x", "admin_token_sha256 = 'abcd'"), "x");
        assert_eq!(
            redact_tokens("q abcd q", "admin_token_sha256 = 'abcd'"),
            "q *** q"
        );
    }

    #[test]
    fn no_dhcp_address_in_the_safe_state_fails_on_the_console() {
        let mut m = Machine::new(None);
        m.setup.wait = Duration::from_millis(30);
        let err = m.run(&FakeHost::default()).0.unwrap_err();
        assert!(matches!(err, SetupError::NoAddress { .. }), "{err}");
        let tty1 = m.read("dev/tty1");
        assert!(
            tty1.contains("Stork setup FAILED") && tty1.contains("enp1s0"),
            "{tty1}"
        );
    }

    #[test]
    fn the_safe_config_validates_for_any_lease() {
        for (addr, prefix) in [
            ([192, 168, 1, 50], 24),
            ([192, 168, 1, 1], 24),
            ([10, 0, 0, 2], 30),
            ([10, 0, 0, 1], 30),
            ([10, 0, 0, 4], 32),
            ([172, 16, 5, 9], 12),
        ] {
            let c = Ipv4Cidr {
                addr: Ipv4Addr::from(addr),
                prefix_len: prefix,
            };
            let f = safe_config(Path::new("/var/lib/stork"), "eno1", c);
            let cfg = f.validate().unwrap_or_else(|e| panic!("{c}: {e}"));
            assert!(!cfg.dhcp.serves(), "{c}");
            assert_eq!(cfg.address, c.addr);
            assert_eq!(cfg.interface, "eno1");
        }
    }
}
