//! `stork`: the appliance daemon (`stork serve`) and its command-line client.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;
use stork::cli::{self, Client};
use stork::lifecycle::Status;
use stork::{auth, config, serve, store};
use stork_proto::api::{
    AllocateBody, BootResource, Constraints, DeployRequest, MarkBrokenBody, NewMachine, NewSshKey,
    NewToken, PowerConfig, ReleaseBody, TokenScope,
};

const DEFAULT_URL: &str = "https://127.0.0.1:8443";

#[derive(Parser)]
#[command(name = "stork", version, about = "Bare-metal provisioning appliance")]
struct Cli {
    /// Where the client commands find the appliance, given before the command
    /// (`stork --url U machine list`); the client commands take the same after it.
    #[command(flatten)]
    conn: TopConn,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The connection options before the command: not global, so `stork serve --help` and
/// `stork config --help`, which talk to no appliance, do not list them.
#[derive(clap::Args)]
struct TopConn {
    /// Appliance URL for client commands [default: https://127.0.0.1:8443].
    #[arg(long, env = "STORK_URL")]
    url: Option<String>,
    /// Admin API token for client commands (`stork token create` makes one).
    #[arg(long, env = "STORK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For an https URL: the appliance certificate's fingerprint (`stork config show`
    /// prints it); without it or --ca-file, the first connection pins what it sees.
    #[arg(long, env = "STORK_FINGERPRINT")]
    fingerprint: Option<String>,
    /// For an https URL: the CA certificates (PEM) that issued the appliance's.
    #[arg(long, env = "STORK_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// The same options on each client command and everything under it.
#[derive(clap::Args)]
struct Conn {
    /// Appliance URL [default: https://127.0.0.1:8443].
    #[arg(long, env = "STORK_URL", global = true)]
    url: Option<String>,
    /// Admin API token (`stork token create` makes one).
    #[arg(long, env = "STORK_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// For an https URL: the certificate's fingerprint to pin (`stork config show`).
    #[arg(long, env = "STORK_FINGERPRINT", global = true)]
    fingerprint: Option<String>,
    /// For an https URL: the CA certificates (PEM) that issued the appliance's.
    #[arg(long, env = "STORK_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
}

impl Conn {
    fn client(&self, top: &TopConn) -> Result<Client> {
        let url = self
            .url
            .as_deref()
            .or(top.url.as_deref())
            .unwrap_or(DEFAULT_URL);
        let trust = stork::pins::trust_for(
            url,
            self.ca_file.as_deref().or(top.ca_file.as_deref()),
            self.fingerprint.as_deref().or(top.fingerprint.as_deref()),
        )?;
        let token = self.token.clone().or_else(|| top.token.clone());
        Ok(Client::with_trust(url, token, trust))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the appliance: DHCP, HTTP boot files, boot scripts and the API.
    Serve(ServeArgs),
    /// Machines: list, inspect, and move through the lifecycle.
    Machine {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: MachineCmd,
    },
    /// API tokens: create (scoped, expiring), list, revoke.
    Token {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Boot resources (images) the appliance can deploy.
    Image {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Commissioning scripts, run on every machine commissioned (in name order).
    Script {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: ScriptCmd,
    },
    /// Named storage layouts: a machine's default (`machine layout`) is what a deploy to disk
    /// that gives no layout uses.
    Layout {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: LayoutCmd,
    },
    /// SSH public keys installed on every deployed machine.
    #[command(name = "ssh-key")]
    SshKey {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: SshKeyCmd,
    },
    /// The DHCP leases this appliance holds: MAC, address, seconds left.
    Leases {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Print the services' counters (packets, drops by reason, replies, ...) and health.
    Stats {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// The audit log: every change asked through the API, who asked, the answer (admin).
    Audit {
        #[command(flatten)]
        conn: Conn,
        /// Only entries after this id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long)]
        json: bool,
    },
    /// The database: move an appliance's records between SQLite and PostgreSQL.
    #[command(subcommand)]
    Db(DbCmd),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The flashable appliance image: setup at boot, the data partition, the A/B slots.
    ///
    /// What the image's systemd units run around `stork serve`.
    #[command(subcommand)]
    Appliance(ApplianceCmd),
}

#[derive(Subcommand)]
enum ApplianceCmd {
    /// At boot, before `stork serve`: network, effective config, data directory, admin token.
    ///
    /// Runs as root. Reads stork.toml from the STORK partition (invalid or missing: the safe
    /// state, a DHCP client on the first Ethernet NIC and Stork's DHCP server off),
    /// configures the network through networkd and the host name through hostnamed, writes
    /// the effective config `stork serve --config` reads, prepares the data directory, the
    /// HTTPS certificate and the first admin token, and shows where to reach Stork on the
    /// consoles.
    Setup {
        /// The STORK partition: stork.toml, and admin-token.txt when setup makes the token.
        #[arg(long, default_value = "/etc/stork")]
        config_dir: PathBuf,
        /// Stork's data directory (the data partition), made the service user's.
        #[arg(long, default_value = "/var/lib/stork")]
        data_dir: PathBuf,
        /// Where the effective stork.toml for `stork serve --config` goes.
        #[arg(long, default_value = "/run/stork")]
        runtime_dir: PathBuf,
        /// The user `stork serve` runs as.
        #[arg(long, default_value = "stork")]
        user: String,
        /// A console to show the notice on, when it exists (repeatable).
        #[arg(long = "console", value_name = "DEVICE", default_values = ["/dev/tty1", "/dev/ttyS0"])]
        consoles: Vec<PathBuf>,
        /// Seconds to wait for the interface and its address.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
    },
    /// Grow the data partition to the end of its disk, before it is mounted.
    ///
    /// If it is the last partition of its disk and the disk has room after it: move the
    /// backup GPT to the disk's end, grow the partition to it (to a whole MiB) and tell the
    /// kernel (BLKPG, fine while the disk's other partitions are mounted). Nothing to do is
    /// success.
    GrowData {
        #[arg(long, default_value = stork::host::grow::DATA_PARTITION)]
        partition: PathBuf,
    },
    /// After a boot: commit an upgrade's slot that booted, or end a try GRUB gave up on.
    ///
    /// If `stork_try` in GRUB's environment block is the slot that booted (`stork.slot=` on
    /// the kernel command line), it becomes `stork_slot` and the try ends; if GRUB fell back
    /// to the other slot, the try ends and the failure is said. Otherwise nothing changes.
    Commit {
        /// GRUB's environment block.
        #[arg(long, default_value = "/boot/efi/grub/grubenv")]
        grubenv: PathBuf,
        /// The kernel command line, with `stork.slot=a` or `stork.slot=b`.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
    },
    /// The A/B slots: which runs, which is committed, a pending or failed upgrade, versions.
    Status {
        #[arg(long, default_value = "/boot/efi/grub/grubenv")]
        grubenv: PathBuf,
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// The running system's version file.
        #[arg(long, default_value = stork::host::slots::VERSION_FILE)]
        version_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); every key has a default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Provisioning interface (overrides `interface`).
    #[arg(long)]
    interface: Option<String>,
    /// This appliance's address on the provisioning network (overrides `address`).
    #[arg(long)]
    address: Option<Ipv4Addr>,
    /// DHCP range as START,END (overrides `dhcp.range`).
    #[arg(long, value_parser = parse_range)]
    dhcp_range: Option<[Ipv4Addr; 2]>,
    /// State directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The database: `sqlite:PATH` or `postgres://USER:PASSWORD@HOST/DB` (overrides
    /// `database`; several appliances share one PostgreSQL database).
    #[arg(long)]
    database: Option<String>,
    /// The site this appliance serves on a shared database (overrides `site`).
    #[arg(long)]
    site: Option<String>,
    /// HTTP port (overrides `http.port`).
    #[arg(long)]
    http_port: Option<u16>,
    /// Busy-status timeout in seconds (overrides `lifecycle.timeout`).
    #[arg(long)]
    timeout: Option<u64>,
}

impl From<ServeArgs> for serve::Overrides {
    fn from(a: ServeArgs) -> Self {
        Self {
            config: a.config,
            interface: a.interface,
            address: a.address,
            dhcp_range: a.dhcp_range,
            data_dir: a.data_dir,
            database: a.database,
            site: a.site,
            http_port: a.http_port,
            timeout: a.timeout,
        }
    }
}

fn parse_range(s: &str) -> Result<[Ipv4Addr; 2], String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected START,END, got {s:?}"))?;
    let ip = |t: &str| {
        t.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{t:?} is not an IPv4 address"))
    };
    Ok([ip(a)?, ip(b)?])
}

#[derive(Subcommand)]
enum MachineCmd {
    /// List machines.
    List {
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        #[arg(long)]
        json: bool,
    },
    /// Show one machine (by id or MAC) with its events.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a machine by hand (before it enlists).
    Add {
        /// MAC address; the first is the boot NIC.
        #[arg(long = "mac", required = true)]
        macs: Vec<stork_proto::MacAddr>,
        #[arg(long)]
        hostname: Option<String>,
        /// Power driver: manual, ipmi, redfish, qmp.
        #[arg(long, default_value = "manual")]
        power: String,
        /// Power parameter KEY=VALUE (repeatable), e.g. address=10.0.0.5 user=admin. Redfish
        /// over https also needs fingerprint=sha256:<hex> (the BMC's certificate, pinned) or
        /// ca_file=<PEM file on the appliance>.
        #[arg(long = "power-param")]
        power_params: Vec<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The site whose appliances reach the BMC, when several appliances share one
        /// database (default: the site of the appliance asked).
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run the commissioning agent (the scripts, the tests asked for, the inventory); the
    /// machine ends Ready, or failed with the reason.
    Commission {
        id: String,
        /// A hardware test to run too: smart, disk-read or memory (repeatable).
        #[arg(long = "test")]
        tests: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set the machine's default storage layout (a named layout, `stork layout list`), or
    /// clear it with `--clear`.
    Layout {
        id: String,
        #[arg(required_unless_present = "clear", conflicts_with = "clear")]
        name: Option<String>,
        #[arg(long)]
        clear: bool,
    },
    /// Set the oldest kernel release the machine's deploys may boot (`6.12`), or clear it
    /// with `--clear`.
    #[command(name = "min-kernel")]
    MinKernel {
        id: String,
        #[arg(required_unless_present = "clear", conflicts_with = "clear")]
        release: Option<String>,
        #[arg(long)]
        clear: bool,
    },
    /// The last commissioning's scripts and tests: exit status, time and output.
    Scripts {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Reserve a Ready machine: by id, or the first that meets the constraints.
    Allocate {
        id: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_gib: Option<u64>,
        #[arg(long)]
        arch: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Install an OS on an allocated machine.
    Deploy {
        id: String,
        /// Boot resource name (`stork image list`).
        #[arg(long)]
        image: String,
        /// disk (install) or memory (run from RAM).
        #[arg(long, default_value = "disk", value_parser = deploy_target)]
        target: stork_proto::DeployTarget,
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// File with an SSH public key (repeatable).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
        /// File with cloud-init user-data.
        #[arg(long)]
        user_data: Option<PathBuf>,
        /// Disk deploys: the EFI system partition's size (default 512). Either size flag makes
        /// the agent partition the disk itself and install from the image's root tar.
        #[arg(long, value_name = "MIB")]
        esp_mib: Option<u64>,
        /// Disk deploys: the root partition's size (default: the rest of the disk).
        #[arg(long, value_name = "MIB")]
        root_mib: Option<u64>,
        /// Disk deploys: a storage layout as JSON (disks, raid, lvm, fs, mount_options, the
        /// sizes; see the API's `DiskLayout`), in a file; the size flags override its sizes.
        #[arg(long, value_name = "FILE")]
        layout: Option<PathBuf>,
        /// A shell command to run in the installed OS before its first boot (repeatable,
        /// in order; one that fails fails the deploy).
        #[arg(long = "late-command", value_name = "COMMAND")]
        late_commands: Vec<String>,
        /// The installed OS's network as JSON (interfaces: NICs by MAC, bonds, VLANs,
        /// bridges, with dhcp4/dhcp6 or addresses, gateways, routes; dns; see the API's
        /// `NetworkConfig`), in a file. Default: DHCP on the boot NIC.
        #[arg(long, value_name = "FILE")]
        network: Option<PathBuf>,
        /// Disk deploys: the kernel the installed OS boots, by name or version, among the
        /// image's (`stork image list` shows them). Default: the image's default.
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Give the machine back, its disks erased first unless --no-erase (the defaults are the
    /// appliance's `lifecycle.erase_on_release` and `lifecycle.erase_quick`).
    Release {
        id: String,
        /// Erase the disks (the default unless the appliance is configured otherwise).
        #[arg(long)]
        erase: bool,
        /// Release without touching the disks.
        #[arg(long, conflicts_with = "erase")]
        no_erase: bool,
        /// Erase every byte (secure erase where the disk has one), checked by reading back.
        #[arg(long, conflicts_with_all = ["quick", "no_erase"])]
        full: bool,
        /// Erase partition tables and signatures only.
        #[arg(long, conflicts_with = "no_erase")]
        quick: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop the running operation (the machine goes to its failed status).
    Abort {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a machine out of service (Broken) until it is repaired; nothing is powered.
    MarkBroken {
        id: String,
        /// Why, kept with the machine and its event.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put a Broken machine back in service: Ready if it was commissioned, else New.
    MarkFixed {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Forget a machine: its record, events and leases' link to it (not while it is busy).
    Delete { id: String },
    /// Power control through the machine's driver: on, off, soft-off, cycle, query.
    Power {
        id: String,
        /// on, off, soft-off, cycle or query.
        #[arg(value_parser = power_op)]
        op: stork_proto::api::PowerOp,
        #[arg(long)]
        json: bool,
    },
    /// The machine's event history.
    Events {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a machine's events live.
    Watch {
        id: String,
        /// Stop once the machine is no longer busy.
        #[arg(long)]
        until_settled: bool,
    },
}

fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {s:?}; one of {}", all.join(", "))
    })
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an API token directly in the data directory's database (works with or
    /// without a running server) and print it.
    Create {
        #[arg(long, default_value = "./var")]
        data_dir: PathBuf,
        /// The database, when not SQLite in the data directory: `sqlite:PATH` or a
        /// `postgres://` URL (the appliances' `database`).
        #[arg(long)]
        database: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// admin (everything), operator (machines, images, keys) or read-only.
        #[arg(long, default_value = "admin", value_parser = token_scope)]
        scope: TokenScope,
        /// Refuse the token this many seconds from now (default: never).
        #[arg(long, value_name = "SECONDS")]
        expires_in: Option<u64>,
    },
    /// List tokens (id, scope, state, description; never the tokens).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: it is refused from now on.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List the registered boot resources.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Import an OS image from a `stork-image os` output directory in one step: check each
    /// file against the directory's manifest.json, copy it under DATA_DIR/boot/images/NAME/,
    /// and register it with the appliance.
    Import {
        /// The directory `stork-image os --out DIR` wrote (with manifest.json).
        dir: PathBuf,
        /// Which image of the manifest (needed only when it lists more than one OS image).
        #[arg(long)]
        name: Option<String>,
        /// The appliance's data directory (its `data_dir`), where the files are served from.
        #[arg(long, default_value = "./var")]
        data_dir: PathBuf,
    },
    /// Upload an OS image file to the appliance (over the API, from anywhere): a raw disk
    /// image, a qcow2 (converted to raw there) or a root tar. The appliance checks the
    /// sha256 (`--sha256`, else computed here from the file) and keeps nothing on a mismatch.
    Upload {
        /// The name to register it as.
        name: String,
        file: PathBuf,
        /// raw, qcow2 or tar; by default from the file's name (`.qcow2`, `.tar*`, else raw).
        #[arg(long, value_parser = parse_upload_format)]
        format: Option<stork_proto::api::UploadFormat>,
        /// The sha256 the file must have (a published sum); by default computed here.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Delete a boot resource (refused while a machine deploys it); its files go with it
    /// when they are under DATA_DIR/boot/images/NAME/.
    Delete { name: String },
    /// Register a boot resource from a JSON description (see the API's BootResource) whose
    /// files are already under DATA_DIR/boot/.
    Register { file: PathBuf },
}

#[derive(Subcommand)]
enum ScriptCmd {
    /// The scripts, in the order they run.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add (or replace) script NAME from FILE: the agent runs it as root in its ephemeral
    /// system before the inventory; a non-zero exit fails the commissioning.
    Add {
        name: String,
        file: PathBuf,
        /// Seconds before it is killed (and fails); default 300.
        #[arg(long)]
        timeout: Option<u32>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum LayoutCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add (or replace) layout NAME from FILE: JSON as `machine deploy --layout` takes it.
    Add {
        name: String,
        file: PathBuf,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum SshKeyCmd {
    Add {
        name: String,
        file: PathBuf,
    },
    /// Import the public keys published at SOURCE: `gh:USER` (GitHub), `lp:USER`
    /// (Launchpad) or an https:// URL serving authorized_keys lines. Keys already known are
    /// skipped; a line that is not a key refuses the import. `STORK_GH_URL` and
    /// `STORK_LP_URL` change where gh: and lp: point.
    Import {
        source: String,
        /// Name the keys NAME-1, NAME-2, ... (default: the source).
        #[arg(long)]
        name: Option<String>,
        /// CA certificates (PEM) to check SOURCE's server with, instead of the system's
        /// (`--ca-file` is the appliance's).
        #[arg(long)]
        source_ca: Option<PathBuf>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a key by its id (`stork ssh-key list`).
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum DbCmd {
    /// Copy every record (machines, events, tokens, SSH keys, images, audit) from one
    /// database into a new, empty one, e.g. from an appliance's SQLite file to the
    /// PostgreSQL database several appliances will share. Stop the appliance first.
    Migrate {
        /// `sqlite:PATH` or a `postgres://` URL.
        #[arg(long)]
        from: String,
        /// `sqlite:PATH` or a `postgres://` URL; must hold no machines or tokens.
        #[arg(long)]
        to: String,
        /// The data directory: its `secrets.key` seals the BMC passwords of both (a
        /// SQLite source's key file beside it is used first, as the appliance does).
        #[arg(long, default_value = "./var")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the full default configuration, commented.
    Default,
    /// Check a configuration file and print the effective settings.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Where clients reach this appliance, and the fingerprint of its HTTPS certificate
    /// (what `--fingerprint` takes and the CLI pins).
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
        /// As `stork serve --data-dir` (where the generated certificate is).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of what failed, without a backtrace: these are the user's errors
            // (a missing interface, a wrong file), not the program's.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = cli::hint(&e) {
                eprintln!("  hint: {hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let top = cli.conn;
    match cli.cmd {
        Cmd::Serve(args) => serve::serve(args.into()),
        Cmd::Machine { conn, cmd } => machine(&conn.client(&top)?, cmd),
        Cmd::Token { conn, cmd } => token(|| conn.client(&top), cmd),
        Cmd::Image { conn, cmd } => image(&conn.client(&top)?, cmd),
        Cmd::SshKey { conn, cmd } => ssh_key(&conn.client(&top)?, cmd),
        Cmd::Script { conn, cmd } => script(&conn.client(&top)?, cmd),
        Cmd::Layout { conn, cmd } => layout(&conn.client(&top)?, cmd),
        Cmd::Stats { conn, json } => cli::stats(&conn.client(&top)?, json),
        Cmd::Leases { conn, json } => cli::leases(&conn.client(&top)?, json),
        Cmd::Audit { conn, after, json } => cli::audit(&conn.client(&top)?, after, json),
        Cmd::Config(ConfigCmd::Default) => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Cmd::Db(DbCmd::Migrate { from, to, data_dir }) => {
            let from = store::Database::parse(&from)
                .map_err(|e| anyhow::anyhow!("--from: {}", e.trim_start_matches("database: ")))?;
            let to = store::Database::parse(&to)
                .map_err(|e| anyhow::anyhow!("--to: {}", e.trim_start_matches("database: ")))?;
            if let store::Database::Sqlite(path) = &from
                && !path.is_file()
            {
                bail!("--from: {} does not exist", path.display());
            }
            // One key for both: the target holds the source's sealed passwords as they are.
            let key = from.key_path(&data_dir);
            let source = store::Store::open_database(&from, &key)
                .with_context(|| format!("cannot open the source ({from})"))?;
            let target = store::Store::open_database(&to, &key)
                .with_context(|| format!("cannot open the target ({to})"))?;
            let report = source
                .copy_into(&target)
                .with_context(|| format!("copying {from} into {to}"))?;
            for (table, rows) in &report.rows {
                println!("{table:<16} {rows:>9} rows");
            }
            println!("copied into {to}; the secrets key is {}", key.display());
            Ok(())
        }
        Cmd::Config(ConfigCmd::Check { config }) => {
            let cfg = serve::load_config(&serve::Overrides {
                config,
                ..Default::default()
            })?;
            println!("{cfg:#?}");
            Ok(())
        }
        Cmd::Appliance(cmd) => appliance(cmd),
        Cmd::Config(ConfigCmd::Show { config, data_dir }) => {
            let cfg = serve::load_config(&serve::Overrides {
                config,
                data_dir,
                ..Default::default()
            })?;
            cli::config_show(&cfg)
        }
    }
}

fn appliance(cmd: ApplianceCmd) -> Result<()> {
    use stork::host;
    // Setup and the boot units log to the journal through stderr; nothing secret goes there.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    match cmd {
        ApplianceCmd::Setup {
            config_dir,
            data_dir,
            runtime_dir,
            user,
            consoles,
            wait,
        } => {
            let mut paths = host::setup::Paths::new(config_dir, data_dir, runtime_dir);
            paths.consoles = consoles;
            let setup = host::setup::Setup {
                paths,
                owner: host::setup::Owner::lookup(&user)?,
                wait: std::time::Duration::from_secs(wait),
                poll: std::time::Duration::from_millis(250),
            };
            let outcome = setup
                .run(&host::dbus::LiveHost::default())
                .context("appliance setup")?;
            // The notice without the token: stdout goes to the journal.
            print!("{}", outcome.notice);
            Ok(())
        }
        ApplianceCmd::GrowData { partition } => {
            let report = host::grow::grow_data(&partition)
                .with_context(|| format!("growing {}", partition.display()))?;
            println!("{report}");
            Ok(())
        }
        ApplianceCmd::Commit { grubenv, cmdline } => {
            let outcome = host::slots::commit(&grubenv, &cmdline).context("slot commit")?;
            println!("{outcome}");
            Ok(())
        }
        ApplianceCmd::Status {
            grubenv,
            cmdline,
            version_file,
            json,
        } => {
            let status =
                host::slots::status(&grubenv, &cmdline, &version_file).context("slot status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
    }
}

/// `client` is called only by the commands that talk to an appliance (`create` writes the
/// database directly, so it needs no URL and pins nothing).
fn token(client: impl FnOnce() -> Result<Client>, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            data_dir,
            database,
            description,
            scope,
            expires_in,
        } => {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("cannot create {}", data_dir.display()))?;
            let db = match database {
                Some(d) => store::Database::parse(&d).map_err(anyhow::Error::msg)?,
                None => store::Database::Sqlite(data_dir.join("stork.db")),
            };
            let store = db
                .open(&data_dir)
                .with_context(|| format!("cannot open the database ({db})"))?;
            let req = NewToken {
                description,
                scope,
                expires_in_secs: expires_in,
            };
            let (_, token) = auth::create_token(&store, &req)?;
            println!("{token}");
            Ok(())
        }
        TokenCmd::List { json } => {
            let tokens = client()?.tokens()?;
            cli::json_or_line(&tokens, json, |tokens| {
                let now = stork::store::now_ms();
                let rows = tokens.iter().map(|t| {
                    let state = match (t.revoked_at, t.expires_at) {
                        (Some(_), _) => "revoked",
                        (None, Some(e)) if e <= now => "expired",
                        _ => "live",
                    };
                    [
                        t.id.as_str(),
                        t.scope.as_str(),
                        state,
                        t.description.as_str(),
                    ]
                });
                cli::plain_table(&["ID", "SCOPE", "STATE", "DESCRIPTION"], &[], rows)
            })
        }
        TokenCmd::Revoke { id, json } => {
            let t = client()?.revoke_token(&id)?;
            cli::json_or_line(&t, json, |t| format!("{} revoked", t.id))
        }
    }
}

fn image(client: &Client, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::List { json } => cli::images(client, json),
        ImageCmd::Import {
            dir,
            name,
            data_dir,
        } => {
            let resource =
                stork::image_import::import(&dir, name.as_deref(), &data_dir.join("boot"))?;
            let registered = client.register_boot_resource(&resource)?;
            println!(
                "imported {} ({} files checked and copied under {})",
                registered.name,
                resource.files.len(),
                data_dir.join("boot").display()
            );
            Ok(())
        }
        ImageCmd::Upload {
            name,
            file,
            format,
            sha256,
        } => {
            let format = format.unwrap_or_else(|| upload_format_of(&file));
            let sha256 = match sha256 {
                Some(s) => s,
                None => sha256_of(&file)?,
            };
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            let length = f.metadata().ok().map(|m| m.len());
            let r = client.upload_image(&name, format, &sha256, &mut f, length)?;
            let stored = r.files.first();
            println!(
                "uploaded {} ({format:?}): {} bytes stored as {}, sha256 {}",
                r.name,
                stored.map_or(0, |f| f.size),
                stored.map_or("", |f| f.path.as_str()),
                stored.map_or("", |f| f.sha256.as_str()),
            );
            Ok(())
        }
        ImageCmd::Delete { name } => {
            client.delete_boot_resource(&name)?;
            println!("deleted {name}");
            Ok(())
        }
        ImageCmd::Register { file } => {
            let resource: BootResource = serde_json::from_str(&read(&file)?)
                .with_context(|| format!("{} is not a boot resource", file.display()))?;
            let registered = client.register_boot_resource(&resource)?;
            println!("registered {}", registered.name);
            Ok(())
        }
    }
}

fn script(client: &Client, cmd: ScriptCmd) -> Result<()> {
    match cmd {
        ScriptCmd::List { json } => {
            let scripts = client.scripts()?;
            if json {
                return cli::print_json(&scripts);
            }
            for sc in scripts {
                println!(
                    "{}\t{} s\t{} lines",
                    sc.name,
                    sc.timeout_secs,
                    sc.content.lines().count()
                );
            }
            Ok(())
        }
        ScriptCmd::Add {
            name,
            file,
            timeout,
        } => {
            let sc = client.add_script(&stork_proto::api::NewScript {
                name,
                content: read(&file)?,
                timeout_secs: timeout,
            })?;
            println!("added {} (timeout {} s)", sc.name, sc.timeout_secs);
            Ok(())
        }
        ScriptCmd::Delete { name } => {
            client.delete_script(&name)?;
            println!("deleted {name}");
            Ok(())
        }
    }
}

fn layout(client: &Client, cmd: LayoutCmd) -> Result<()> {
    match cmd {
        LayoutCmd::List { json } => {
            let layouts = client.layouts()?;
            if json {
                return cli::print_json(&layouts);
            }
            for l in layouts {
                println!("{}\t{}", l.name, cli::layout_summary(&l.layout));
            }
            Ok(())
        }
        LayoutCmd::Add { name, file } => {
            let layout = serde_json::from_str::<stork_proto::DiskLayout>(&read(&file)?)
                .with_context(|| file.display().to_string())?;
            let l = client.add_layout(&stork_proto::api::NamedLayout {
                name,
                layout,
                created_at: 0,
            })?;
            println!("added {}: {}", l.name, cli::layout_summary(&l.layout));
            Ok(())
        }
        LayoutCmd::Delete { name } => {
            client.delete_layout(&name)?;
            println!("deleted {name}");
            Ok(())
        }
    }
}

fn ssh_key(client: &Client, cmd: SshKeyCmd) -> Result<()> {
    match cmd {
        SshKeyCmd::Add { name, file } => {
            let key = client.add_ssh_key(&NewSshKey {
                name,
                key: read(&file)?,
            })?;
            println!("{}", key.id);
            Ok(())
        }
        SshKeyCmd::Import {
            source,
            name,
            source_ca,
        } => import_ssh_keys(client, &source, name, source_ca),
        SshKeyCmd::Delete { id } => {
            client.delete_ssh_key(&id)?;
            println!("deleted {id}");
            Ok(())
        }
        SshKeyCmd::List { json } => {
            let keys = client.ssh_keys()?;
            cli::json_or_line(&keys, json, |keys| {
                let rows = keys
                    .iter()
                    .map(|k| [k.id.as_str(), k.name.as_str(), k.key.trim_end()]);
                cli::plain_table(&[], &[], rows)
            })
        }
    }
}

/// `stork ssh-key import`: fetched here ([`stork::key_import`]), added through the API.
fn import_ssh_keys(
    client: &Client,
    source: &str,
    name: Option<String>,
    source_ca: Option<PathBuf>,
) -> Result<()> {
    use stork::key_import as ki;
    let env = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
    let url = ki::source_url(
        source,
        &env("STORK_GH_URL", ki::GITHUB),
        &env("STORK_LP_URL", ki::LAUNCHPAD),
    )?;
    let cas = source_ca.unwrap_or_else(|| PathBuf::from(ki::SYSTEM_CAS));
    let trust = stork_tls::Trust::ca_file(&cas)
        .with_context(|| format!("no CA certificates to check {url} with (--source-ca)"))?;
    let keys = ki::parse(&url, &ki::fetch(&url, trust)?)?;
    let known: std::collections::HashSet<String> = client
        .ssh_keys()?
        .into_iter()
        .map(|k| k.key.trim().to_string())
        .collect();
    let prefix = name.unwrap_or_else(|| source.trim().to_string());
    let (mut added, mut skipped) = (0, 0);
    for (n, key) in keys.iter().enumerate() {
        if known.contains(key) {
            skipped += 1;
            continue;
        }
        let k = client.add_ssh_key(&NewSshKey {
            name: format!("{prefix}-{}", n + 1),
            key: key.clone(),
        })?;
        println!("{} {}", k.id, k.name);
        added += 1;
    }
    println!("{added} added, {skipped} already known");
    Ok(())
}

fn machine(c: &Client, cmd: MachineCmd) -> Result<()> {
    match cmd {
        MachineCmd::List { status, json } => cli::list(c, status, json),
        MachineCmd::Show { id, json } => cli::show(c, &id, json),
        MachineCmd::Add {
            macs,
            hostname,
            power,
            power_params,
            tags,
            site,
            json,
        } => {
            let mut params = serde_json::Map::new();
            for p in power_params {
                let Some((k, v)) = p.split_once('=') else {
                    bail!("--power-param {p:?}: expected KEY=VALUE");
                };
                // Numbers and booleans as JSON types (ports, timeouts), the rest as strings.
                let value = serde_json::from_str::<Value>(v)
                    .ok()
                    .filter(|j| j.is_number() || j.is_boolean())
                    .unwrap_or_else(|| Value::String(v.to_string()));
                params.insert(k.to_string(), value);
            }
            let m = c.create_machine(&NewMachine {
                macs,
                hostname,
                arch: None,
                power: Some(PowerConfig {
                    driver: power,
                    params,
                }),
                tags,
                site,
            })?;
            cli::machine_line(&m, json)
        }
        MachineCmd::Commission { id, tests, json } => cli::machine_line(
            &c.commission_with(&id, &stork_proto::api::CommissionBody { tests })?,
            json,
        ),
        MachineCmd::Scripts { id, json } => cli::script_results(c, &id, json),
        MachineCmd::MinKernel { id, release, .. } => {
            let m = c.set_min_kernel(&id, release.as_deref())?;
            cli::setting_line(&m.id, "minimum kernel", m.min_kernel.as_deref());
            Ok(())
        }
        MachineCmd::Layout { id, name, .. } => {
            let m = c.set_default_layout(&id, name.as_deref())?;
            cli::setting_line(&m.id, "default layout", m.default_layout.as_deref());
            Ok(())
        }
        MachineCmd::Allocate {
            id: Some(id), json, ..
        } => cli::machine_line(&c.allocate(&id, &AllocateBody::default())?, json),
        MachineCmd::Allocate {
            id: None,
            cpus,
            memory_mib,
            disk_gib,
            arch,
            tags,
            json,
        } => {
            let m = c.allocate_any(&Constraints {
                arch,
                min_cpus: cpus,
                min_memory_mib: memory_mib,
                min_disk_gib: disk_gib,
                tags,
                owner: None,
            })?;
            cli::machine_line(&m, json)
        }
        MachineCmd::Deploy {
            id,
            image,
            target,
            disk,
            hostname,
            ssh_keys,
            user_data,
            esp_mib,
            root_mib,
            layout,
            late_commands,
            network,
            kernel,
            json,
        } => {
            let keys = ssh_keys.iter().map(read).collect::<Result<Vec<_>>>()?;
            let network = match &network {
                Some(path) => Some(
                    serde_json::from_str::<stork_proto::NetworkConfig>(&read(path)?)
                        .with_context(|| format!("--network {}", path.display()))?,
                ),
                None => None,
            };
            let user_data = user_data.as_ref().map(read).transpose()?;
            let layout = match &layout {
                Some(path) => Some(
                    serde_json::from_str::<stork_proto::DiskLayout>(&read(path)?)
                        .with_context(|| format!("--layout {}", path.display()))?,
                ),
                None => None,
            };
            // No size flag, no layout: the raw image when the image has one.
            let layout = (layout.is_some() || esp_mib.is_some() || root_mib.is_some()).then(|| {
                let l = layout.unwrap_or_default();
                stork_proto::DiskLayout {
                    esp_mib: esp_mib.or(l.esp_mib),
                    root_mib: root_mib.or(l.root_mib),
                    ..l
                }
            });
            let request = DeployRequest {
                image,
                target,
                disk,
                hostname,
                ssh_keys: keys.iter().map(|k| k.trim().to_string()).collect(),
                user_data,
                layout,
                late_commands,
                network,
                kernel,
            };
            cli::machine_line(&c.deploy(&id, &request)?, json)
        }
        MachineCmd::Release {
            id,
            erase,
            no_erase,
            full,
            quick,
            json,
        } => {
            // What the command line leaves unsaid, the appliance's configuration decides;
            // --full or --quick asks for an erase.
            let body = ReleaseBody {
                erase: (erase || no_erase || full || quick).then_some(!no_erase),
                quick: (full || quick).then_some(quick),
            };
            cli::machine_line(&c.release(&id, &body)?, json)
        }
        MachineCmd::Abort { id, json } => cli::machine_line(&c.abort(&id)?, json),
        MachineCmd::MarkBroken { id, reason, json } => {
            cli::machine_line(&c.mark_broken(&id, &MarkBrokenBody { reason })?, json)
        }
        MachineCmd::MarkFixed { id, json } => cli::machine_line(&c.mark_fixed(&id)?, json),
        MachineCmd::Delete { id } => Ok(c.delete_machine(&id)?),
        MachineCmd::Power { id, op, json } => {
            let answer = c.power(&id, op)?;
            cli::json_or_line(&answer, json, |a| format!("{} {}", a.machine_id, a.state))
        }
        MachineCmd::Events { id, json } => cli::events(c, &id, json),
        MachineCmd::Watch { id, until_settled } => cli::watch(c, &id, until_settled),
    }
}

/// `--target`: a deploy target by its API name.
fn deploy_target(s: &str) -> Result<stork_proto::DeployTarget, String> {
    serde_json::from_value(Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not one of disk, memory"))
}

/// A power operation by its API name.
fn power_op(s: &str) -> Result<stork_proto::api::PowerOp, String> {
    stork_proto::api::PowerOp::parse(s)
        .ok_or_else(|| format!("{s:?} is not one of on, off, soft-off, cycle, query"))
}

/// A token scope by its API name.
fn token_scope(s: &str) -> Result<TokenScope, String> {
    TokenScope::parse(s).ok_or_else(|| format!("{s:?} is not one of admin, operator, read-only"))
}

fn parse_upload_format(s: &str) -> std::result::Result<stork_proto::api::UploadFormat, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?}: raw, qcow2 or tar"))
}

/// An upload's format from its file name: `.qcow2`, `.tar` (compressed or not), else raw.
fn upload_format_of(file: &std::path::Path) -> stork_proto::api::UploadFormat {
    use stork_proto::api::UploadFormat;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".qcow2") {
        UploadFormat::Qcow2
    } else if name.contains(".tar") {
        UploadFormat::Tar
    } else {
        UploadFormat::Raw
    }
}

/// The file's sha256, hex.
fn sha256_of(file: &std::path::Path) -> Result<String> {
    use sha2::Digest;
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", file.display()))?;
    Ok(hex::encode(hasher.finalize()))
}
