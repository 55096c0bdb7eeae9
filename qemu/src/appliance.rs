//! The Stork appliance running inside a lab namespace on its embedded default config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use stork_proto::MacAddr;
use stork_proto::api::{EventRecord, HealthReport, Machine, StatsResponse};

use crate::Lab;
use crate::process::{Spawned, wait_for};

/// What `stork stats --json` prints: the API's counters by service, the daemon's health
/// beside them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Stats {
    #[serde(flatten)]
    pub counters: StatsResponse,
    pub health: HealthReport,
}

impl Stats {
    /// Counter `name` of `service` (`dhcp`, `tftp`, `http`, `dhcp6`), if the appliance has
    /// it.
    pub fn counter(&self, service: &str, name: &str) -> Option<u64> {
        let counters = match service {
            "dhcp" => &self.counters.dhcp,
            "tftp" => &self.counters.tftp,
            "http" => &self.counters.http,
            "dhcp6" => &self.counters.dhcp6,
            _ => return None,
        };
        counters.get(name).copied()
    }
}

/// The HTTPS port of the API and the web UI in `stork serve`'s embedded default (`[tls]
/// port`), which the lab's appliance runs on.
pub const TLS_PORT: u16 = 8443;

pub struct Appliance {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    /// An admin token, made with `stork token create` before the server started.
    pub token: String,
    process: Option<Spawned>,
    netns: String,
    /// `stork serve`'s arguments after the data directory.
    args: Vec<String>,
    /// The secrets key file of a shared database.
    key: Option<PathBuf>,
    /// The lab's directory, where the logs go.
    dir: PathBuf,
    /// How many times `stork serve` was started.
    starts: u32,
    /// Its logs' name: `NAME.log`, then `NAME-2.log` after a restart.
    name: String,
}

/// The secrets key's environment variable (`stork::store::KEY_ENV`).
const SECRETS_KEY_ENV: &str = "STORK_SECRETS_KEY";

/// A database several appliances share: its URL and the secrets key file they all use.
#[derive(Debug, Clone)]
pub struct Shared {
    pub url: String,
    pub key: PathBuf,
}

impl Appliance {
    /// Starts `stork serve` in the lab with a fresh data directory whose `boot/` holds a copy
    /// of every file in `boot_files`, and waits until its API answers.
    pub fn start(lab: &Lab, bin: &Path, boot_files: &Path) -> Result<Self> {
        Self::start_with(lab, bin, boot_files, &[])
    }

    /// As [`Appliance::start`], with extra `stork serve` arguments.
    pub fn start_with(lab: &Lab, bin: &Path, boot_files: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_on(lab, bin, boot_files, None, extra)
    }

    /// As [`Appliance::start_with`], on `shared`'s database (PostgreSQL shared with other
    /// appliances) when given, with its secrets key.
    pub fn start_on(
        lab: &Lab,
        bin: &Path,
        boot_files: &Path,
        shared: Option<&Shared>,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_at(lab, lab.netns(), "stork", bin, boot_files, shared, extra)
    }

    /// As [`Appliance::start_on`], in namespace `netns` (the lab's, or a [`crate::Host`]'s
    /// on its bridge: a second appliance on the same network), with its data directory and
    /// logs named after `name` (`stork`: the lab's own appliance).
    pub fn start_at(
        lab: &Lab,
        netns: &str,
        name: &str,
        bin: &Path,
        boot_files: &Path,
        shared: Option<&Shared>,
        extra: &[&str],
    ) -> Result<Self> {
        let data_dir = match name {
            "stork" => lab.dir().join("appliance"),
            other => lab.dir().join(other),
        };
        copy_tree(boot_files, &data_dir.join("boot"))?;
        let mut create = std::process::Command::new(bin);
        create
            .args(["token", "create", "--description", "lab", "--data-dir"])
            .arg(&data_dir);
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(db) = shared {
            create
                .args(["--database", &db.url])
                .env(SECRETS_KEY_ENV, &db.key);
            args.extend(["--database".to_string(), db.url.clone()]);
        }
        let token = crate::run(&mut create)?.trim().to_string();
        let mut a = Self {
            bin: bin.to_path_buf(),
            data_dir,
            token,
            process: None,
            netns: netns.to_string(),
            name: name.to_string(),
            args,
            key: shared.map(|db| db.key.clone()),
            dir: lab.dir().to_path_buf(),
            starts: 0,
        };
        a.launch()?;
        Ok(a)
    }

    /// Starts `stork serve` (again) with the same data directory and arguments, each start
    /// logging to a file of its own, and waits until its API answers.
    fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info,stork=debug");
        if let Some(key) = &self.key {
            cmd.env(SECRETS_KEY_ENV, key);
        }
        let log = self.log_path(self.starts);
        self.process = Some(Spawned::start("stork", cmd, &log)?);
        wait_for(
            "the appliance API",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                if let Some(status) = self.exited() {
                    bail!("stork serve exited ({status}):\n{}", self.log_tail(30));
                }
                Ok(self.cli(&["machine", "list", "--json"]).ok())
            },
        )?;
        Ok(())
    }

    /// `stork serve`'s process id while it runs (for sampling its CPU and memory).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    /// Kills `stork serve` with SIGKILL, as a crash or a pulled plug would, and waits for
    /// it to be gone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(p) = self.process.as_mut() {
            p.kill()?;
        }
        Ok(())
    }

    /// Starts `stork serve` again after [`Appliance::kill`].
    pub fn restart(&mut self) -> Result<()> {
        self.launch()
    }

    /// The CLI's pins file: every appliance of a lab is 127.0.0.1:8443 from its own
    /// namespace, each with a certificate of its own.
    pub fn pins_path(&self) -> PathBuf {
        match self.name.as_str() {
            "stork" => self.data_dir.with_file_name("pins"),
            name => self.data_dir.with_file_name(format!("{name}.pins")),
        }
    }

    /// The log of start `n`.
    fn log_path(&self, n: u32) -> PathBuf {
        match n {
            1 => self.dir.join(format!("{}.log", self.name)),
            n => self.dir.join(format!("{}-{n}.log", self.name)),
        }
    }

    /// Everything this appliance logged, every start's log in turn.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| self.log_path(n))
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect()
    }

    /// The web UI's base, `https://10.77.0.1:8443/ui` (pages are `<base>/machines` and so
    /// on); reachable only inside the lab's namespace, with a self-signed certificate.
    pub fn ui_url(&self) -> String {
        format!("https://{}:{TLS_PORT}/ui", crate::APPLIANCE_IP)
    }

    /// Runs a `stork` client command inside the namespace and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        crate::run(
            std::process::Command::new("ip")
                .args(["netns", "exec", &self.netns])
                .arg(&self.bin)
                .args(args)
                .env("STORK_TOKEN", &self.token)
                // The API is HTTPS with a certificate generated at the first start: the
                // first command pins it (trust on first use, as a user's CLI does), in the
                // lab's own pins file, never the user's.
                .env("STORK_PINS", self.pins_path()),
        )
    }

    /// Runs a `stork ... --json` command inside the namespace and parses its output.
    pub fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let out = self.cli(args)?;
        serde_json::from_str(&out).with_context(|| {
            let shown: Vec<&str> = args
                .iter()
                .copied()
                .take_while(|a| !a.starts_with("--"))
                .collect();
            format!("parsing `stork {} --json`", shown.join(" "))
        })
    }

    /// `stork machine add` for a machine behind lab BMC `bmc`, with its operator login
    /// (`--power ipmi`); returns the added machine (its password is never in it).
    pub fn add_ipmi_machine(&self, mac: &str, bmc: &crate::bmc::IpmiSim) -> Result<Machine> {
        self.add_ipmi_machine_tagged(mac, bmc, &[])
    }

    /// As [`Appliance::add_ipmi_machine`], with `tags` (`--tag`).
    pub fn add_ipmi_machine_tagged(
        &self,
        mac: &str,
        bmc: &crate::bmc::IpmiSim,
        tags: &[&str],
    ) -> Result<Machine> {
        let tags: Vec<&str> = tags.iter().flat_map(|t| ["--tag", t]).collect();
        self.cli_json(
            &[
                &[
                    "machine",
                    "add",
                    "--mac",
                    mac,
                    "--power",
                    "ipmi",
                    "--power-param",
                    &format!("host={}", bmc.addr),
                    "--power-param",
                    &format!("port={}", bmc.port),
                    "--power-param",
                    &format!("username={}", crate::bmc::OPERATOR_USER),
                    "--power-param",
                    &format!("password={}", crate::bmc::OPERATOR_PASSWORD),
                    "--json",
                ],
                &tags[..],
            ]
            .concat(),
        )
    }

    /// `stork machine list --json`, parsed.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        self.cli_json(&["machine", "list", "--json"])
    }

    /// `stork machine show ID --json`, parsed.
    pub fn machine(&self, id: &str) -> Result<Machine> {
        self.cli_json(&["machine", "show", id, "--json"])
    }

    /// `stork machine events ID --json`, parsed: the machine's history, oldest first.
    pub fn events(&self, id: &str) -> Result<Vec<EventRecord>> {
        self.cli_json(&["machine", "events", id, "--json"])
    }

    /// Waits until `stork machine events ID` shows every one of `wants`, and returns that
    /// history. Events a controller records after acting (a power-off the BMC has already
    /// seen) land a moment after their effect, so tests wait for them, never sample once.
    pub fn wait_events(&self, id: &str, wants: &[&str], timeout: Duration) -> Result<String> {
        let mut events = String::new();
        let found = wait_for("events", timeout, Duration::from_millis(200), || {
            events = self.cli(&["machine", "events", id])?;
            Ok(wants.iter().all(|w| events.contains(w)).then_some(()))
        });
        if found.is_err() {
            let missing: Vec<&&str> = wants.iter().filter(|w| !events.contains(**w)).collect();
            bail!("events lack {missing:?} after {timeout:?}:\n{events}");
        }
        Ok(events)
    }

    /// `stork stats --json`, parsed.
    pub fn stats(&self) -> Result<Stats> {
        self.cli_json(&["stats", "--json"])
    }

    /// Waits until a machine with boot MAC `mac` is recorded; fails early if the appliance
    /// exits or the VM stops before that.
    pub fn wait_enlisted(
        &mut self,
        vm: &mut crate::Vm,
        mac: &str,
        timeout: Duration,
    ) -> Result<Machine> {
        let mac: MacAddr = mac.parse()?;
        wait_for(
            "the VM to enlist",
            timeout,
            Duration::from_millis(500),
            || {
                if let Some(status) = self.exited() {
                    bail!("stork serve exited: {status}");
                }
                let found = self
                    .machines()?
                    .into_iter()
                    .find(|m| m.boot_mac == Some(mac));
                if found.is_none()
                    && let Some(status) = vm.exited()
                {
                    bail!("the VM stopped ({status}) before it enlisted");
                }
                Ok(found)
            },
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(|p| p.exited())
    }
}

/// Copies the files of `from` and of its directories (the agent's other kernels under
/// `kernels/`) into `to`. Copies, not links: a test may change the appliance's files.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)
        .with_context(|| format!("reading boot files in {}", from.display()))?
    {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_read_the_counters_and_the_health_beside_them() {
        let json = r#"{
            "dhcp": {"received": 7, "discover": 2},
            "tftp": {"transfers_completed": 4},
            "health": {"status": "ok", "services": {
                "dhcp": {"state": "running", "restarts": 0, "last_error": null,
                         "last_failure_ms": null}
            }}
        }"#;
        let s: Stats = serde_json::from_str(json).unwrap();
        assert_eq!(s.counter("dhcp", "received"), Some(7));
        assert_eq!(s.counter("tftp", "transfers_completed"), Some(4));
        assert_eq!(s.counter("dhcp", "offer"), None);
        assert_eq!(s.counter("http", "received"), None);
        assert_eq!(s.health.status, "ok");
        assert_eq!(s.health.services["dhcp"].restarts, 0);
    }
}
