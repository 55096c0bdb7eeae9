//! The admin API's requests and answers (`/api/v1`), as the appliance serves them and the
//! client (`stork-client`) reads them: one definition for both sides. The appliance derives
//! their OpenAPI schemas from these types (feature `openapi`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{DeployTarget, DiskLayout, ImageRole, Inventory, MacAddr};

closed_names! {
    /// A machine's lifecycle status; `docs/lifecycle.md` lists every transition.
    pub enum Status {
        New = "new",
        Commissioning = "commissioning",
        FailedCommissioning = "failed_commissioning",
        Ready = "ready",
        Allocated = "allocated",
        Deploying = "deploying",
        Deployed = "deployed",
        FailedDeployment = "failed_deployment",
        Releasing = "releasing",
        DiskErasing = "disk_erasing",
        FailedReleasing = "failed_releasing",
        Broken = "broken",
    }
}

/// How the machine is powered: the driver and its parameters. Parameters may hold secrets
/// (BMC passwords): [`PowerConfig::redacted`] is what leaves the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// `manual`, `ipmi`, `redfish` or `qmp`.
    pub driver: String,
    /// The driver's parameters (the appliance's document names each driver's).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// Parameter names whose values never leave the appliance (and are encrypted at rest).
pub const SECRET_PARAMS: &[&str] = &["password", "pass", "secret", "token", "key"];

/// Whether a power parameter of this name holds a secret: any name containing one of
/// [`SECRET_PARAMS`], in any case.
pub fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

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
            if is_secret_param(k) {
                *v = serde_json::Value::String("***".into());
            }
        }
        c
    }
}

/// What to install and how, as the user asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// A registered boot resource name.
    pub image: String,
    /// `disk` (install) or `memory` (run from RAM, no disk touched).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(default = "disk"))]
    pub target: DeployTarget,
    /// Disk to install to, by its kernel name (`vda`, `/dev/sda`), serial, WWN, model or
    /// device path as the inventory shows them; it must name exactly one disk. Default:
    /// the smallest that fits.
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
    pub layout: Option<DiskLayout>,
    /// Shell commands run in the installed OS (chrooted into its root, `/bin/sh -c`) after
    /// the seed is written and before the reboot, in order; the first that fails (or runs
    /// past 10 minutes) fails the deploy with its exit status and output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late_commands: Vec<String>,
    /// The installed OS's network: NICs by MAC, bonds, VLANs, bridges, their DHCP or static
    /// addresses, routes and DNS. Default: DHCP on the boot NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetworkConfig>,
    /// The kernel the installed OS boots, among the image's (`BootResource::kernels`), by
    /// name (`backports`) or version (`uname -r`). Default: the image's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The current boot's agent credentials: the appliance's store keeps them, the API
    /// never shows them.
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub agent: AgentIdentity,
    pub created_at: i64,
    pub updated_at: i64,
    /// Network-boot the agent while busy; cleared when the agent has installed an image so
    /// the next boot is from disk, set again by every step that powers on into the agent.
    pub netboot: bool,
    /// How the current release erases: signatures and partition tables only (true), or every
    /// byte (false).
    pub erase_quick: bool,
    /// When the machine's agent last sent a heartbeat (ms), and the step it was in then.
    pub last_heartbeat: Option<i64>,
    pub heartbeat_step: Option<String>,
    /// The agent's next heartbeat is due by then (ms): past it, the controller fails the busy
    /// status. Cleared by every status change, by the image's installation and by an agent
    /// that says it is leaving, so an agent on purpose silent (rebooting into the installed
    /// OS) is never taken for a dead one.
    pub heartbeat_deadline: Option<i64>,
    /// The power state last seen (a power action's result, a query, an agent's power-off),
    /// and when (ms): never a live answer, which `POST /machines/{id}/power/query` gives.
    #[serde(default)]
    pub power_state: Option<PowerState>,
    #[serde(default)]
    pub power_seen_at: Option<i64>,
    /// The site that serves the machine: the appliances of its provisioning network, which
    /// reach its BMC and do its power actions. Set where it boots (or was added); unset on
    /// an appliance of its own.
    #[serde(default)]
    pub site: Option<String>,
    /// The hardware tests (`BUILTIN_TESTS`) the current or last commissioning runs, asked
    /// for with it.
    #[serde(default)]
    pub commission_tests: Vec<String>,
    /// The named layout (`/layouts`) a deploy to disk that gives no layout uses: the
    /// machine's default, set with `PUT /machines/{id}/layout`.
    #[serde(default)]
    pub default_layout: Option<String>,
    /// The oldest kernel release a deploy may boot (`6.12`): a deploy that names no kernel
    /// gets the image's default if it is at least this, else the image's oldest that is;
    /// one that names an older kernel is refused. Set with `PUT /machines/{id}/min-kernel`.
    #[serde(default)]
    pub min_kernel: Option<String>,
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
            agent: AgentIdentity::default(),
            created_at: now,
            updated_at: now,
            netboot: true,
            erase_quick: true,
            last_heartbeat: None,
            heartbeat_step: None,
            heartbeat_deadline: None,
            power_state: None,
            power_seen_at: None,
            site: None,
            commission_tests: Vec::new(),
            default_layout: None,
            min_kernel: None,
        }
    }

    /// The machine as the API shows it: secrets redacted.
    pub fn redacted(&self) -> Machine {
        let mut m = self.clone();
        m.power = m.power.redacted();
        m
    }

    /// The machine as a listing shows it: [`Machine::redacted`], and without its deploy's
    /// user-data, which may hold secrets (`GET /machines/{id}` shows it to its reader).
    pub fn listed(&self) -> Machine {
        let mut m = self.redacted();
        if let Some(d) = &mut m.deploy {
            d.user_data = None;
        }
        m
    }
}

/// A machine as a page of the machine list shows it (`GET /machines?view=summary`): what
/// the list and its filters need, without the inventory and the power parameters, so a
/// page of 100 is a few KiB and read from stored columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineSummary {
    pub id: String,
    pub hostname: Option<String>,
    pub status: Status,
    pub status_message: Option<String>,
    pub status_since: i64,
    pub boot_mac: Option<MacAddr>,
    /// Every interface's MAC, the boot NIC first.
    pub macs: Vec<MacAddr>,
    pub arch: String,
    /// The power driver's name (`manual`, `ipmi`, `redfish`, `qmp`).
    pub power_driver: String,
    pub power_state: Option<PowerState>,
    pub power_seen_at: Option<i64>,
    /// `None` until the machine has reported an inventory.
    pub hardware: Option<HardwareSummary>,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    pub heartbeat_step: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A machine's hardware in four numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HardwareSummary {
    /// Logical processors.
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disks: u32,
    /// The disks' sizes added up.
    pub disk_bytes: u64,
}

impl HardwareSummary {
    pub fn of(inv: &Inventory) -> Self {
        Self {
            cpus: inv.cpu.count,
            memory_bytes: inv.memory.total_bytes,
            disks: u32::try_from(inv.disks.len()).unwrap_or(u32::MAX),
            disk_bytes: inv.disks.iter().map(|d| d.size_bytes).sum(),
        }
    }
}

/// A machine's per-boot agent token as the appliance keeps it: given once per boot, to
/// one address, and good only from there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentIdentity {
    /// SHA-256 of the token (the token itself is only in the boot script).
    pub token_hash: Option<String>,
    /// The address the token was given to; requests from any other are refused.
    pub ip: Option<std::net::IpAddr>,
    /// The agent has used it: no boot script gives another token this boot.
    pub used: bool,
}

/// One entry of a machine's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Event))]
pub struct EventRecord {
    pub id: i64,
    pub machine_id: String,
    pub at: i64,
    pub actor: String,
    pub old_status: Option<Status>,
    pub new_status: Option<Status>,
    pub message: String,
}

closed_names! {
    /// What an API token may do. Each scope may do what the ones below it may.
    pub enum TokenScope {
        /// Read machines, events, images, keys, stats and health.
        ReadOnly = "read-only",
        /// Also change machines (add, delete, every lifecycle action, power), SSH keys and
        /// boot resources.
        Operator = "operator",
        /// Also manage tokens and read the audit log.
        Admin = "admin",
    }
}

impl TokenScope {
    /// Whether a token of this scope may do what `need` allows.
    pub fn allows(self, need: TokenScope) -> bool {
        self.rank() >= need.rank()
    }

    fn rank(self) -> u8 {
        match self {
            TokenScope::ReadOnly => 0,
            TokenScope::Operator => 1,
            TokenScope::Admin => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenRecord {
    pub id: String,
    pub description: String,
    pub created_at: i64,
    pub scope: TokenScope,
    /// After this (ms since the Unix epoch) the token is refused; `null`: never.
    pub expires_at: Option<i64>,
    /// When it was revoked; a revoked token is refused.
    pub revoked_at: Option<i64>,
}

impl TokenRecord {
    /// Whether the token may be used at `now` (ms).
    pub fn live_at(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }
}

/// One change made through the API, by whom, and how the appliance answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    /// `api:<token id>`, or `anonymous` / `unknown token` for refused calls.
    pub actor: String,
    pub method: String,
    pub path: String,
    /// The HTTP status the appliance answered.
    pub status: u16,
}

/// `GET /audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries with a larger id.
    #[serde(default)]
    pub after: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshKey {
    pub id: String,
    pub name: String,
    pub key: String,
    pub created_at: i64,
}

/// A registered bootable image (built by `stork-image`), served from `DATA_DIR/boot/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// OS images: the kernels the image carries, its default first, which a deploy may
    /// choose from (`DeployRequest::kernel`). Empty for an image users brought.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<crate::kernel::ImageKernel>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResourceFile {
    pub role: ImageRole,
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

// ---- requests ----

/// A host name as hostnamed and cloud-init take it: labels of letters, digits and `-` (not
/// first or last), joined by dots, 64 characters at most (`HOST_NAME_MAX`).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// What a key that [`valid_ssh_key`] refuses is told.
pub const NOT_AN_SSH_KEY: &str = "not an OpenSSH public key line (\"ssh-ed25519 AAAA... comment\")";

/// One OpenSSH public key line: a key type, base64, an optional comment, no line break.
pub fn valid_ssh_key(key: &str) -> bool {
    let mut words = key.split_whitespace();
    let (kind, body) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    let base64 = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    known && base64 && !key.trim().contains('\n')
}

/// The largest user-data a deploy takes (cloud-init's own seed limit is far above; a
/// deploy request is no place for a payload).
pub const MAX_USER_DATA: usize = 64 * 1024;

/// How many late commands a deploy takes, and how long each may be.
pub const MAX_LATE_COMMANDS: usize = 32;
pub const MAX_LATE_COMMAND: usize = 4096;

/// The longest `disk` a deploy names (serials and models are at most 40 characters in ATA,
/// device paths longer).
pub const MAX_DISK_NAME: usize = 256;

impl DeployRequest {
    /// The static addresses its network config gives the installed OS (not `auto`, which
    /// the appliance replaces before the request is recorded).
    pub fn static_addresses(&self) -> Vec<std::net::IpAddr> {
        self.network
            .iter()
            .flat_map(|n| n.static_addresses())
            .map(|(_, ip)| ip)
            .collect()
    }

    /// Checks the fields a person types; the error names the field.
    pub fn check_fields(&self) -> Result<(), String> {
        if let Some(h) = &self.hostname
            && !valid_hostname(h)
        {
            return Err(format!(
                "hostname: {h:?} is not a host name (letters, digits and `-` in dot-separated labels, 64 characters at most)"
            ));
        }
        if let Some(d) = &self.disk
            && (d.trim().is_empty()
                || d.len() > MAX_DISK_NAME
                || !d.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        {
            return Err(format!(
                "disk: {d:?} names no disk: give its kernel name (vda, /dev/sda), serial, WWN, model or path, up to {MAX_DISK_NAME} printable characters"
            ));
        }
        if self.late_commands.len() > MAX_LATE_COMMANDS {
            return Err(format!(
                "late_commands: {} commands, at most {MAX_LATE_COMMANDS}",
                self.late_commands.len()
            ));
        }
        for (i, c) in self.late_commands.iter().enumerate() {
            if c.trim().is_empty() || c.len() > MAX_LATE_COMMAND || c.contains('\0') {
                return Err(format!(
                    "late_commands[{i}]: a command is 1 to {MAX_LATE_COMMAND} bytes with no NUL"
                ));
            }
        }
        for (i, key) in self.ssh_keys.iter().enumerate() {
            if !valid_ssh_key(key) {
                return Err(format!("ssh_keys[{i}]: {NOT_AN_SSH_KEY}"));
            }
        }
        if let Some(u) = &self.user_data
            && u.len() > MAX_USER_DATA
        {
            return Err(format!(
                "user_data: {} bytes, more than the {MAX_USER_DATA} a deploy takes",
                u.len()
            ));
        }
        Ok(())
    }
}

/// `GET /machines` filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The power state last seen: on, off or unknown (never seen counts as unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<String>,
    /// Free text: part of the hostname, a MAC address or the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Sort key: one of [`SORT_KEYS`] (default `created`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<String>,
    /// `asc` (default) or `desc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// Skip this many machines (paging; the answer's `x-total-count` header counts all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// At most this many machines (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// `full` (default: every machine whole) or `summary` ([`MachineSummary`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
}

/// The keys a machine listing sorts by.
pub const SORT_KEYS: &[&str] = &["created", "hostname", "status", "id", "updated", "power"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewMachine {
    /// The boot NIC first.
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub macs: Vec<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(default = "amd64"))]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The site whose appliances reach its BMC (default: the site of the appliance asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

// Action bodies: each action reads only its own fields, strictly. (One struct with the
// deploy request `flatten`ed in let unknown fields through and misreported deploy errors as
// "missing field `image`": serde's flatten and deny_unknown_fields do not mix.)

/// commission, abort, mark-fixed: no fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AllocateBody {
    /// Who holds it (default: the caller's token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// Wipe the disks first. Left out: the appliance's `lifecycle.erase_on_release` (true
    /// unless configured otherwise); `false` releases without touching the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erase: Option<bool>,
    /// With erase: signatures and partition tables only, not every byte. Left out: the
    /// appliance's `lifecycle.erase_quick` (false unless configured otherwise: a full erase,
    /// by the disk's own secure erase where it has one, else zeroing, verified by reading
    /// back samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quick: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MarkBrokenBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `POST /machines/allocate` asks of the machine it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_disk_gib: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Constraints {
    /// Whether a commissioned machine meets them (one without an inventory never does).
    pub fn fit(&self, m: &Machine) -> bool {
        let Some(inv) = &m.inventory else {
            return false;
        };
        let largest_disk = inv.disks.iter().map(|d| d.size_bytes).max().unwrap_or(0);
        self.arch.as_ref().is_none_or(|a| *a == m.arch)
            && self.min_cpus.is_none_or(|c| inv.cpu.count >= c)
            && self
                .min_memory_mib
                .is_none_or(|mib| inv.memory.total_bytes >= mib << 20)
            && self.min_disk_gib.is_none_or(|g| largest_disk >= g << 30)
            && self.tags.iter().all(|t| m.tags.contains(t))
    }
}

/// The hardware tests Stork ships, run while commissioning when asked for
/// (`POST /machines/{id}/commission {"tests": [...]}`): `smart` (every disk's SMART health,
/// where the disk has SMART), `disk-read` (the first 64 MiB of every disk read, direct, and
/// its rate), `memory` (`memtester` over 64 MiB).
pub const BUILTIN_TESTS: &[&str] = &["smart", "disk-read", "memory"];

/// `POST /machines/{id}/commission`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CommissionBody {
    /// Hardware tests to run besides the scripts (`smart`, `disk-read`, `memory`); a failing
    /// one fails the commissioning with its reason.
    #[serde(default)]
    pub tests: Vec<String>,
}

/// The longest a script may run, and its default.
pub const MAX_SCRIPT_SECS: u32 = 3600;
pub const DEFAULT_SCRIPT_SECS: u32 = 300;
/// The largest script taken, and the most output kept of one run (its end).
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;
pub const MAX_SCRIPT_OUTPUT: usize = 16 * 1024;

/// `POST /scripts`: a commissioning script, run on every machine commissioned after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewScript {
    /// Letters, digits, `.`, `-` and `_`; scripts run in name order.
    pub name: String,
    pub content: String,
    /// Default 300, at most 3600: past it the script is killed and fails.
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

/// A storage layout kept by name (`POST /layouts`): a machine's default layout names one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NamedLayout {
    /// Letters, digits, `.`, `-` and `_`.
    pub name: String,
    pub layout: DiskLayout,
    /// Set by the appliance when stored (ms); ignored in a request.
    #[serde(default)]
    pub created_at: i64,
}

/// `PUT /machines/{id}/layout`: the machine's default layout, by name, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DefaultLayout {
    /// A named layout; `null` clears the default.
    pub layout: Option<String>,
}

/// `PUT /machines/{id}/min-kernel`: the machine's minimum kernel release, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MinKernel {
    /// A release (`6`, `6.12`, `6.12.95`); `null` clears it.
    pub min_kernel: Option<String>,
}

/// A stored commissioning script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Script {
    pub name: String,
    pub content: String,
    pub timeout_secs: u32,
    pub created_at: i64,
}

/// One script's or test's run on a machine, as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScriptResult {
    pub name: String,
    /// A hardware test Stork ships, not a user's script.
    #[serde(default)]
    pub test: bool,
    /// The exit status; none when it was killed (its timeout) or could not start.
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Its standard output and error together, the last 16 KiB.
    pub output: String,
    /// When the appliance recorded it (ms); set by the appliance.
    #[serde(default)]
    pub at: i64,
}

impl ScriptResult {
    pub fn passed(&self) -> bool {
        self.exit_status == Some(0) && !self.timed_out
    }
}

/// What an uploaded image's bytes are (`PUT /boot-resources/{name}/image?format=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UploadFormat {
    /// A whole-disk image, written to the disk as it is.
    Raw,
    /// A qcow2 disk image without a backing file, converted to raw.
    Qcow2,
    /// The root file system as a tar (zstd, xz or plain), for deploys with a layout.
    Tar,
}

/// `PUT /boot-resources/{name}/image`'s query: the body's format and its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    pub format: UploadFormat,
    /// 64 hexadecimal digits: the upload is refused, and nothing kept, unless its bytes
    /// have this sum.
    pub sha256: String,
}

/// `GET /events` and `GET /machines/{id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events with a larger id.
    #[serde(default)]
    pub after: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewSshKey {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(default = ""))]
    pub description: String,
    #[serde(default = "admin_scope")]
    #[cfg_attr(feature = "openapi", schema(default = "admin"))]
    pub scope: TokenScope,
    /// The token is refused this many seconds after its creation; absent: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub expires_in_secs: Option<u64>,
}

fn admin_scope() -> TokenScope {
    TokenScope::Admin
}

impl Default for NewToken {
    fn default() -> Self {
        Self {
            description: String::new(),
            scope: TokenScope::Admin,
            expires_in_secs: None,
        }
    }
}

// ---- answers ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    #[serde(flatten)]
    pub record: TokenRecord,
    /// Shown once.
    pub token: String,
}

closed_names! {
    /// A machine's power as its driver sees it.
    pub enum PowerState {
        On = "on",
        Off = "off",
        /// The driver cannot tell (manual power, or a state the BMC reports ambiguously).
        Unknown = "unknown",
    }
}

closed_names! {
    /// A direct power operation (`POST /machines/{id}/power/{op}`).
    pub enum PowerOp {
        On = "on",
        Off = "off",
        /// ACPI shutdown: the OS powers off by itself.
        SoftOff = "soft-off",
        /// Off, then on (or on when off).
        Cycle = "cycle",
        /// Only ask the power state.
        Query = "query",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PowerAnswer {
    pub machine_id: String,
    pub op: PowerOp,
    pub state: PowerState,
}

/// Counters by name.
pub type Counters = BTreeMap<String, u64>;

/// A DHCP lease as the appliance that answers the request holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DhcpLease {
    pub mac: MacAddr,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.77.0.100"))]
    pub ip: std::net::Ipv4Addr,
    /// When it ends (Unix seconds).
    pub expires: u64,
}

/// Counters by service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Stats))]
pub struct StatsResponse {
    // The appliance's document names each service's counters.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub dhcp: Counters,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub tftp: Counters,
    /// The HTTP listener's (absent from appliances before it counted).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub http: Counters,
    /// The DHCPv6 service's (absent from appliances before it).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub dhcp6: Counters,
}

closed_names! {
    /// What a service is doing now.
    pub enum ServiceState {
        Running = "running",
        /// It failed and waits for its backoff before starting again.
        Restarting = "restarting",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceHealth {
    pub state: ServiceState,
    /// Times it failed and was started again since the daemon started.
    pub restarts: u64,
    /// Why it last failed (an error chain or a panic message).
    pub last_error: Option<String>,
    /// When it last failed, milliseconds since the Unix epoch.
    pub last_failure_ms: Option<i64>,
}

/// The daemon's health: `ok` while every service runs and none has failed recently,
/// `degraded` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Health))]
pub struct HealthReport {
    #[cfg_attr(feature = "openapi", schema(example = "ok"))]
    pub status: String,
    pub services: BTreeMap<String, ServiceHealth>,
}

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Error))]
pub struct ErrorBody {
    /// Stable machine-readable code: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict`, `illegal_transition`, `no_machine`, `internal`, ...
    pub code: String,
    /// What went wrong, naming the field or the transition.
    pub message: String,
}
