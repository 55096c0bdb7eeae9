//! One simulated machine: its power, its firmware's network boot, and the agent's API
//! conversation, on the wire as the real ones have them; its installed OS's phone-home.
//!
//! A power change (from its BMC, or the agent powering off) aborts whatever the machine was
//! doing: the boot task is dropped and the host's sockets and address are gone, as they are
//! when a real machine loses power.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper::Method;
use serde::Serialize;
use stork_proto::cmdline::AgentArgs;
use stork_proto::inventory::{Cpu, Disk, Dmi, Memory, Nic};
use stork_proto::{
    AgentEvent, AgentStep, ENLIST_PATH, EnlistRequest, EnlistResponse, Heartbeat, ImageRole,
    Inventory, MacAddr, StepState, Task, agent_path,
};

use crate::firmware::{self, Client as DhcpClient, Firmware, Lease};
use crate::http::{Client, Url};
use crate::net::{HostId, Net};

/// Faults a machine is given on purpose.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    /// Share of its frames lost, both ways.
    pub loss: f64,
    /// Its installed OS never phones home.
    pub no_phone_home: bool,
    /// Its agent stalls (stops reading, stops beating) half-way through the image.
    pub stall_image: bool,
    /// Its BMC answers this late.
    pub slow_bmc: Option<Duration>,
}

/// One boot's agent API: where it is, how it is trusted, the machine and its token. The
/// installed OS keeps it for its phone-home (the seed carries the same token).
#[derive(Clone)]
struct AgentApi {
    http: Client,
    base: Url,
    id: String,
    token: String,
}

impl AgentApi {
    /// `POST /api/v1/agent/<id>/<what>` with the token; the answer as `T`.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        self.call(Method::POST, what, Some(body)).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        what: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let url = self.base.join(&agent_path(&self.id, what));
        self.http
            .json(method, &url, Some(&self.token), body, API_TIMEOUT)
            .await
            .with_context(|| what.to_string())
    }
}

/// The next boot device a BMC set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BootTarget {
    Network,
    Disk,
}

/// Phases, as the report names them.
pub mod phase {
    pub const POWER_ON: &str = "power_on";
    pub const DHCP: &str = "dhcp";
    pub const NBP: &str = "nbp";
    pub const IPXE_DHCP: &str = "ipxe_dhcp";
    pub const SCRIPT: &str = "script";
    pub const KERNEL: &str = "kernel_initrd";
    pub const ENLISTED: &str = "enlisted";
    pub const COMMISSIONED: &str = "commissioned";
    pub const IMAGE: &str = "image";
    pub const INSTALLED: &str = "installed";
    pub const DEPLOYED: &str = "deployed";
    pub const RELEASED: &str = "released";
    pub const POWER_OFF: &str = "power_off";
}

#[derive(Default)]
pub struct State {
    pub on: bool,
    pub boot_once: Option<BootTarget>,
    pub persistent_boot: Option<BootTarget>,
    /// The installed OS's phone-home, once an image is installed.
    installed: Option<AgentApi>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// (phase, seconds since the fleet started), in order.
    pub marks: Vec<(&'static str, f64)>,
    /// What went wrong, in order (a failed boot, a refused call).
    pub errors: Vec<String>,
    pub boots: u32,
    /// Image bytes downloaded and checked.
    pub image_bytes: u64,
    /// The agent stalled on purpose: its heartbeats stop too.
    stalled: bool,
    /// A report the agent has sent and not yet seen answered: the appliance powers the
    /// machine off as it records it, so a power-off in between means it was recorded.
    in_flight: Option<&'static str>,
}

impl State {
    /// The BMC's boot override: its target, and whether it holds for every boot (a
    /// next-boot override wins over a persistent one, as BMCs apply them).
    pub fn boot_override(&self) -> Option<(BootTarget, bool)> {
        match (self.boot_once, self.persistent_boot) {
            (Some(t), _) => Some((t, false)),
            (None, Some(t)) => Some((t, true)),
            (None, None) => None,
        }
    }

    /// Sets the override as a BMC does: a persistent one replaces both, a next-boot one
    /// only the next boot's.
    pub fn set_boot_override(&mut self, target: Option<BootTarget>, persistent: bool) {
        if persistent {
            self.persistent_boot = target;
            self.boot_once = None;
        } else {
            self.boot_once = target;
        }
    }
}

pub struct Machine {
    pub index: usize,
    pub mac: MacAddr,
    pub host: HostId,
    pub firmware: Firmware,
    pub faults: Faults,
    /// Share of the kernel, initrd and ephemeral root each boot fetches (0..=1).
    pub boot_share: f64,
    /// A boot storm only: the boot ends once the agent's files are fetched.
    pub storm_only: bool,
    pub state: RefCell<State>,
    net: Rc<Net>,
    epoch: Instant,
}

/// How a boot ended.
enum End {
    /// The agent powered the machine off.
    PowerOff,
    /// The agent (or iPXE after a failure) reboots it.
    Reboot,
    /// It runs on (the installed OS, or a firmware with nothing to boot).
    Stay,
}

const API_TIMEOUT: Duration = Duration::from_secs(30);
const STALL: Duration = Duration::from_secs(30);

impl Machine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        net: &Rc<Net>,
        epoch: Instant,
        index: usize,
        mac: MacAddr,
        firmware: Firmware,
        faults: Faults,
        boot_share: f64,
        storm_only: bool,
    ) -> Rc<Self> {
        let host = net.add_host(mac.0);
        net.set_loss(host, faults.loss);
        Rc::new(Self {
            index,
            mac,
            host,
            firmware,
            faults,
            boot_share,
            storm_only,
            state: RefCell::new(State::default()),
            net: net.clone(),
            epoch,
        })
    }

    pub fn mark(&self, phase: &'static str) {
        let at = self.epoch.elapsed().as_secs_f64();
        self.state.borrow_mut().marks.push((phase, at));
    }

    fn error(&self, e: impl std::fmt::Display) {
        tracing::debug!(machine = %self.mac, "{e}");
        self.state.borrow_mut().errors.push(e.to_string());
    }

    /// The agent sent a report and has not yet seen it answered (or been powered off).
    pub fn awaiting_answer(&self) -> bool {
        self.state.borrow().in_flight.is_some()
    }

    /// What the report needs of this machine, at the end of the run.
    pub fn snapshot(&self, power: Option<crate::bmc::Power>) -> crate::report::MachineSnapshot {
        let st = self.state.borrow();
        crate::report::MachineSnapshot {
            index: self.index,
            mac: self.mac,
            firmware: self.firmware,
            faults: self.faults.clone(),
            power,
            boots: st.boots,
            image_bytes: st.image_bytes,
            marks: st.marks.clone(),
            errors: st.errors.clone(),
        }
    }

    /// Whether the machine reached `phase`.
    pub fn reached(&self, phase: &str) -> bool {
        self.state.borrow().marks.iter().any(|(n, _)| *n == phase)
    }

    pub fn is_on(&self) -> bool {
        self.state.borrow().on
    }

    /// Power from the BMC: on starts a boot (a running machine is left as it is), off stops it.
    pub fn set_power(self: &Rc<Self>, on: bool) {
        if on == self.is_on() {
            return;
        }
        if on {
            self.mark(phase::POWER_ON);
            self.start();
        } else {
            self.mark(phase::POWER_OFF);
            self.stop();
        }
    }

    /// A reset: the running boot ends, a new one starts.
    pub fn reset(self: &Rc<Self>) {
        self.stop();
        self.mark(phase::POWER_ON);
        self.start();
    }

    fn stop(&self) {
        let recorded = self.state.borrow_mut().in_flight.take();
        if let Some(phase) = recorded {
            self.mark(phase);
        }
        let mut st = self.state.borrow_mut();
        st.on = false;
        if let Some(t) = st.task.take() {
            t.abort();
        }
        drop(st);
        self.net.set_up(self.host, false);
    }

    fn start(self: &Rc<Self>) {
        self.net.set_up(self.host, true);
        let me = self.clone();
        let task = tokio::task::spawn_local(async move {
            let end = match me.boot().await {
                Ok(end) => end,
                Err(e) => {
                    me.state.borrow_mut().in_flight = None;
                    me.error(format!("{e:#}"));
                    // As iPXE's script does after a failure: wait, then reboot.
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    End::Reboot
                }
            };
            match end {
                End::Stay => {}
                End::PowerOff => {
                    me.mark(phase::POWER_OFF);
                    let mut st = me.state.borrow_mut();
                    st.on = false;
                    // This task ends itself: dropping the handle detaches it.
                    st.task.take();
                    drop(st);
                    me.net.set_up(me.host, false);
                }
                End::Reboot => {
                    me.state.borrow_mut().task.take();
                    me.start();
                }
            }
        });
        let mut st = self.state.borrow_mut();
        st.on = true;
        st.boots += 1;
        st.task = Some(task);
    }

    fn next_boot(&self) -> BootTarget {
        let mut st = self.state.borrow_mut();
        st.boot_once
            .take()
            .or(st.persistent_boot)
            .unwrap_or(if st.installed.is_some() {
                BootTarget::Disk
            } else {
                BootTarget::Network
            })
    }

    async fn boot(self: &Rc<Self>) -> Result<End> {
        if self.next_boot() == BootTarget::Disk {
            return self.disk_boot().await;
        }
        let http = Client {
            net: self.net.clone(),
            host: self.host,
            tls: None,
        };
        let lease = firmware::dhcp(
            &self.net,
            self.host,
            self.mac.0,
            DhcpClient::Firmware(self.firmware),
        )
        .await
        .context("firmware DHCP")?;
        self.mark(phase::DHCP);
        match self.firmware {
            Firmware::UefiHttp => {
                http.fetch(&Url::parse(&lease.file)?, None, STALL)
                    .await
                    .context("HTTP boot of the NBP")?;
            }
            Firmware::BiosPxe | Firmware::UefiPxe => {
                firmware::tftp_get(
                    &self.net,
                    self.host,
                    lease.next_server,
                    &lease.file,
                    self.firmware,
                )
                .await?;
            }
        }
        self.mark(phase::NBP);
        let lease = firmware::dhcp(
            &self.net,
            self.host,
            self.mac.0,
            DhcpClient::Ipxe(self.firmware),
        )
        .await
        .context("iPXE DHCP")?;
        self.mark(phase::IPXE_DHCP);
        let script = http
            .fetch(&Url::parse(&lease.file)?, None, STALL)
            .await
            .context("the iPXE script")?;
        let script = String::from_utf8_lossy(&script.head).to_string();
        self.mark(phase::SCRIPT);
        let Some(kernel_line) = script.lines().find(|l| l.starts_with("kernel ")) else {
            if script.lines().any(|l| l.trim().starts_with("exit")) {
                return self.disk_boot().await;
            }
            bail!("a boot script with no kernel and no exit: {script:?}");
        };
        let initrd = script
            .lines()
            .find_map(|l| l.strip_prefix("initrd "))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .context("a boot script with no initrd")?;
        let line = expand(kernel_line, &lease);
        let mut words = line.split_whitespace().skip(1);
        let kernel = words.next().unwrap_or_default().to_string();
        let mut files = vec![kernel, initrd];
        // Stage 1 of the agent fetches the ephemeral root before anything else.
        if let Some(e) = stork_proto::cmdline::get(&line, stork_proto::cmdline::EPHEMERAL) {
            files.push(e.to_string());
        }
        for f in files {
            let url = Url::parse(&f)?;
            let size = self.share_of(&http, &url).await?;
            http.fetch(&url, size, STALL)
                .await
                .with_context(|| format!("GET {f}"))?;
        }
        self.mark(phase::KERNEL);
        if self.storm_only {
            return Ok(End::Stay);
        }
        let args = AgentArgs::parse(&line).context("the agent's command line")?;
        self.agent(&args).await
    }

    /// The bytes of `url` a boot fetches: all of them, or the configured share.
    async fn share_of(&self, http: &Client, url: &Url) -> Result<Option<u64>> {
        if self.boot_share >= 1.0 {
            return Ok(None);
        }
        let resp = http.send(Method::HEAD, url, &[], None, STALL).await?;
        let len: u64 = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Some((len as f64 * self.boot_share) as u64))
    }

    /// The installed OS boots and phones home (unless told not to); without one the
    /// firmware finds nothing to boot and waits.
    async fn disk_boot(self: &Rc<Self>) -> Result<End> {
        let installed = self.state.borrow().installed.clone();
        let Some(os) = installed else {
            self.error("no bootable disk");
            return Ok(End::Stay);
        };
        // The OS's own DHCP client: a plain one, no PXE options.
        let _ = firmware::dhcp(&self.net, self.host, self.mac.0, DhcpClient::Os)
            .await
            .context("the installed OS's DHCP")?;
        if self.faults.no_phone_home {
            return Ok(End::Stay);
        }
        let empty = serde_json::json!({});
        let mut tries = 0;
        loop {
            match os.post::<serde_json::Value>("deployed", &empty).await {
                Ok(_) => break,
                Err(e) if tries < 5 => {
                    self.error(format!("phone-home: {e:#}"));
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Err(e) => return Err(e.context("phone-home")),
            }
        }
        self.mark(phase::DEPLOYED);
        Ok(End::Stay)
    }

    fn api_client(&self, api: &Url, fingerprint: Option<String>) -> Result<Client> {
        let tls = match (api.tls, fingerprint) {
            (false, _) => None,
            (true, Some(f)) => {
                let f: stork_tls::Fingerprint = f.parse().context("stork.tls")?;
                Some(Arc::new(stork_tls::client_config(
                    stork_tls::Trust::Pinned(f),
                )))
            }
            (true, None) => bail!("an HTTPS API without a fingerprint to pin"),
        };
        Ok(Client {
            net: self.net.clone(),
            host: self.host,
            tls,
        })
    }

    /// The agent: enlist, or ask for the task and do it.
    async fn agent(self: &Rc<Self>, args: &AgentArgs) -> Result<End> {
        let api_url = Url::parse(args.api_url())?;
        let fingerprint = args.api.as_ref().map(|a| a.fingerprint.clone());
        let api = self.api_client(&api_url, fingerprint)?;
        let (Some(id), Some(token)) = (&args.machine_id, &args.token) else {
            let req = EnlistRequest {
                boot_mac: self.mac,
                inventory: self.inventory(),
            };
            let _: EnlistResponse = api
                .json(
                    Method::POST,
                    &api_url.join(ENLIST_PATH),
                    None,
                    Some(&req),
                    API_TIMEOUT,
                )
                .await
                .context("enlist")?;
            self.mark(phase::ENLISTED);
            return Ok(End::PowerOff);
        };
        let agent = AgentApi {
            http: api.clone(),
            base: api_url.clone(),
            id: id.clone(),
            token: token.clone(),
        };
        let empty = serde_json::json!({});
        let task: Task = agent.call(Method::GET, "task", None::<&()>).await?;
        match task {
            // The simulated fleet's commissioning runs no scripts (none are added).
            Task::Commission { .. } => {
                self.state.borrow_mut().in_flight = Some(phase::COMMISSIONED);
                let _: EnlistResponse = agent.post("commissioned", &self.inventory()).await?;
                self.state.borrow_mut().in_flight = None;
                self.mark(phase::COMMISSIONED);
                Ok(End::PowerOff)
            }
            Task::Deploy(d) => {
                let beats = self.heartbeats(agent.clone());
                let result = self.deploy(&api, &d.image).await;
                beats.abort();
                if let Err(e) = result {
                    let event = AgentEvent {
                        step: AgentStep::Image,
                        state: StepState::Failed,
                        message: format!("{e:#}"),
                        progress: None,
                        log_tail: None,
                    };
                    let _ = agent.post::<serde_json::Value>("events", &event).await;
                    return Err(e);
                }
                let _: serde_json::Value = agent.post("installed", &empty).await?;
                let leaving = Heartbeat {
                    step: AgentStep::Installed,
                    leaving: true,
                };
                let _ = agent
                    .post::<serde_json::Value>(stork_proto::HEARTBEAT, &leaving)
                    .await;
                self.mark(phase::INSTALLED);
                self.state.borrow_mut().installed = Some(agent);
                Ok(End::Reboot)
            }
            Task::Erase { .. } => {
                self.state.borrow_mut().installed = None;
                self.state.borrow_mut().in_flight = Some(phase::RELEASED);
                let _: serde_json::Value = agent.post("released", &empty).await?;
                self.state.borrow_mut().in_flight = None;
                self.mark(phase::RELEASED);
                Ok(End::PowerOff)
            }
            Task::PowerOff => Ok(End::PowerOff),
        }
    }

    /// Heartbeats every 10 s, on a task of their own, until aborted or the agent stalls.
    fn heartbeats(self: &Rc<Self>, agent: AgentApi) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let mut every =
                tokio::time::interval(Duration::from_secs(stork_proto::HEARTBEAT_EVERY_SECS));
            loop {
                every.tick().await;
                if me.state.borrow().stalled {
                    return;
                }
                let beat = Heartbeat {
                    step: AgentStep::Image,
                    leaving: false,
                };
                let _ = agent
                    .post::<serde_json::Value>(stork_proto::HEARTBEAT, &beat)
                    .await;
            }
        })
    }

    /// Downloads the image's disk file in full and checks its sha256 (written nowhere).
    async fn deploy(&self, api: &Client, files: &[stork_proto::ImageFile]) -> Result<()> {
        let file = files
            .iter()
            .find(|f| f.role == ImageRole::Raw)
            .or_else(|| files.iter().find(|f| f.role == ImageRole::Tar))
            .or_else(|| files.iter().find(|f| f.role == ImageRole::Squashfs))
            .context("the task names no image file to install")?;
        let http = Client {
            net: self.net.clone(),
            host: self.host,
            tls: if file.url.starts_with("https://") {
                api.tls.clone()
            } else {
                None
            },
        };
        let url = Url::parse(&file.url)?;
        if self.faults.stall_image {
            // Half the image, then silence: no more reads, no more heartbeats.
            let _ = http.fetch(&url, Some(file.size / 2), STALL).await;
            self.state.borrow_mut().stalled = true;
            std::future::pending::<()>().await;
        }
        let got = http.fetch(&url, None, STALL).await?;
        if got.sha256 != file.sha256 {
            bail!(
                "{}: sha256 {} where the task says {}",
                file.url,
                got.sha256,
                file.sha256
            );
        }
        self.state.borrow_mut().image_bytes += got.bytes;
        self.mark(phase::IMAGE);
        Ok(())
    }

    /// A plausible server's inventory, different per machine.
    pub fn inventory(&self) -> Inventory {
        let i = self.index;
        Inventory {
            cpu: Cpu {
                model: "Simulated Xeon".into(),
                count: 16 + 16 * (i % 4) as u32,
                vendor: Some("GenuineIntel".into()),
                sockets: Some(1 + (i % 2) as u32),
                cores: Some(8),
                flags: vec!["lm".into(), "vmx".into()],
            },
            memory: Memory {
                total_bytes: (32u64 << 30) * (1 + (i % 4) as u64),
                usable_bytes: (31u64 << 30) * (1 + (i % 4) as u64),
            },
            disks: vec![Disk {
                name: "nvme0n1".into(),
                size_bytes: 960 * 1_000_000_000,
                model: Some("SIM NVMe".into()),
                serial: Some(format!("SIM{i:06}")),
                rotational: Some(false),
                transport: Some("nvme".into()),
                ..Default::default()
            }],
            nics: vec![Nic {
                name: "eth0".into(),
                mac: self.mac,
                driver: Some("sim".into()),
                link: Some(true),
                speed_mbps: Some(25_000),
            }],
            dmi: Dmi {
                sys_vendor: Some("Stork".into()),
                product_name: Some("Simulated Server".into()),
                product_serial: Some(format!("SIM{i:06}")),
                ..Default::default()
            },
            firmware: match self.firmware {
                Firmware::BiosPxe => stork_proto::inventory::Firmware::Bios,
                Firmware::UefiPxe | Firmware::UefiHttp => stork_proto::inventory::Firmware::Uefi,
            },
            secure_boot: Some(false),
            kernel: "6.1.0-sim".into(),
        }
    }
}

/// The kernel line as iPXE runs it: its settings expanded, the `|| goto` dropped.
fn expand(line: &str, lease: &Lease) -> String {
    let mask = if lease.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(lease.prefix))
    };
    let line = line.split(" || ").next().unwrap_or(line);
    line.replace("${netX/ip}", &lease.ip.to_string())
        .replace(
            "${netX/netmask}",
            &std::net::Ipv4Addr::from(mask).to_string(),
        )
        .replace(
            "${netX/gateway}",
            &lease.gateway.map(|g| g.to_string()).unwrap_or_default(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_line_expands_as_ipxe_expands_it() {
        let lease = Lease {
            ip: "10.77.0.100".parse().unwrap(),
            prefix: 24,
            gateway: None,
            server: "10.77.0.1".parse().unwrap(),
            next_server: "10.77.0.1".parse().unwrap(),
            file: String::new(),
        };
        let line = "kernel http://10.77.0.1:8080/boot/vmlinuz initrd=initrd.img stork.url=http://10.77.0.1:8080 BOOTIF=01-52-54-00-00-00-01 stork.ip=${netX/ip}/${netX/netmask} stork.gw=${netX/gateway} || goto failed";
        let out = expand(line, &lease);
        assert!(out.ends_with("stork.ip=10.77.0.100/255.255.255.0 stork.gw="));
        let args = AgentArgs::parse(&out).unwrap();
        assert_eq!(args.ip, std::net::Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(args.prefix_len, 24);
        assert_eq!(
            stork_proto::cmdline::get(&out, stork_proto::cmdline::BOOTIF),
            Some("01-52-54-00-00-00-01")
        );
    }
}
