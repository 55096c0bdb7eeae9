//! A fleet: N machines and their BMCs on one tap, and the operator who takes them through
//! Stork's lifecycle (add with IPMI or Redfish power, commission, allocate and deploy, release)
//! over the admin API, as a person with the CLI would, only all at once.
//!
//! The fleet runs in shards, a thread and a tap each (a tokio `LocalSet`: smoltcp's hosts
//! are not `Send`); the operator is a thread of its own with the blocking API client,
//! reporting back what it asked and when.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use stork_client::Client as ApiClient;
use stork_proto::MacAddr;
use stork_proto::api::{
    AllocateBody, DeployRequest, Machine as ApiMachine, MachineFilter, NewMachine, PowerConfig,
    ReleaseBody, Status,
};

use crate::bmc::{Bmc, IpmiCounters, Power};
use crate::firmware::Firmware;
use crate::machine::{Faults, Machine};
use crate::net::{Counters, Net};
use crate::report::{self, MachineSnapshot, Report, Seen};
use crate::tap::Tap;

/// What to simulate and what to ask of Stork.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// One shard (a thread) per tap.
    pub taps: Vec<String>,
    pub machines: usize,
    /// Machine `i`'s MAC is `52:54:5a:xx:hi:lo` and its BMC's `52:54:5b:xx:hi:lo`, `xx` this.
    pub mac_tag: u8,
    /// BMC `i` is at `bmc_base + i`, on the segment's prefix.
    pub bmc_base: Ipv4Addr,
    pub prefix: u8,
    /// Shares of UEFI PXE and UEFI HTTP clients (the rest boot as BIOS PXE).
    pub uefi_pxe: f64,
    pub uefi_http: f64,
    /// Share of machines Stork powers over IPMI (the rest over Redfish; every BMC speaks both).
    pub ipmi: f64,
    /// Share of the kernel, initrd and ephemeral root each boot fetches.
    pub boot_share: f64,
    pub faults: FaultPlan,
    pub api: String,
    pub token: String,
    /// The API certificate's fingerprint; `None`: pinned on first use (a lab's appliance).
    pub fingerprint: Option<String>,
    /// The boot resource to deploy; `None`: commission only.
    pub image: Option<String>,
    pub release: bool,
    /// How long the operator waits for a phase before it counts what is left as stuck.
    pub phase_timeout: Duration,
    /// A process to sample (CPU, memory, descriptors): the appliance.
    pub watch_pid: Option<u32>,
    /// A boot storm only: the sim powers every machine on at once, each boots as far as the
    /// agent's files (DHCP, NBP, iPXE, script, kernel, initrd, ephemeral root) and stays
    /// there; no BMC, no API, any DHCP+TFTP+HTTP servers.
    pub storm: bool,
}

/// How many machines get each fault; the faulty ones are spread over the fleet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultPlan {
    /// Machines losing `loss` of their frames.
    pub lossy: usize,
    pub loss: f64,
    pub no_phone_home: usize,
    pub stall_image: usize,
    pub slow_bmc: usize,
    pub slow_bmc_delay: Duration,
}

impl FaultPlan {
    /// Machine `i`'s faults: the faulty machines are every k-th, each fault its own set.
    pub fn for_machine(&self, i: usize, n: usize) -> Faults {
        let kinds = [
            self.lossy,
            self.no_phone_home,
            self.stall_image,
            self.slow_bmc,
        ];
        let total: usize = kinds.iter().sum();
        let mut f = Faults::default();
        if total == 0 || n == 0 {
            return f;
        }
        let stride = (n / total).max(1);
        if i % stride != stride - 1 {
            return f;
        }
        let mut k = i / stride;
        for (kind, count) in kinds.iter().enumerate() {
            if k < *count {
                match kind {
                    0 => f.loss = self.loss,
                    1 => f.no_phone_home = true,
                    2 => f.stall_image = true,
                    _ => f.slow_bmc = Some(self.slow_bmc_delay),
                }
                return f;
            }
            k -= count;
        }
        f
    }
}

pub fn mac(tag: u8, kind: u8, i: usize) -> MacAddr {
    MacAddr([0x52, 0x54, kind, tag, (i >> 8) as u8, i as u8])
}

/// What the operator did, in order: (step, seconds since the fleet started, detail).
#[derive(Debug, Clone, Serialize)]
pub struct OperatorStep {
    pub step: String,
    pub at: f64,
    pub detail: String,
}

/// One shard's share of the fleet at the end of the run.
struct Shard {
    machines: Vec<MachineSnapshot>,
    tap: Counters,
    bmc_calls: u64,
    ipmi: IpmiCounters,
    /// A storm: when this shard powered its machines on (seconds since the fleet started).
    powered_at: Option<f64>,
}

/// Runs the fleet and the operator to the end; the report is written by the caller.
///
/// The fleet is split into shards, one per tap, each a thread of its own (a tokio
/// `LocalSet`: smoltcp's hosts are not `Send`) with machine `i` in shard `i % shards`;
/// the bridge sends each frame to the tap its destination MAC was learnt on.
pub fn run(config: &FleetConfig) -> Result<Report> {
    if config.machines == 0 || config.machines > 60_000 {
        bail!("--machines: 1 to 60000");
    }
    if config.taps.is_empty() {
        bail!("--tap: at least one");
    }
    let epoch = Instant::now();
    let shards = config.taps.len();
    let done = Arc::new(AtomicBool::new(false));
    let (plans_tx, plans_rx) = mpsc::channel::<Vec<PowerPlan>>();
    let (shard_tx, shard_rx) = mpsc::channel::<Result<Shard>>();
    for s in 0..shards {
        let (config, done) = (config.clone(), done.clone());
        let (plans_tx, shard_tx) = (plans_tx.clone(), shard_tx.clone());
        std::thread::Builder::new()
            .name(format!("shard-{s}"))
            .spawn(move || {
                let r = on_local_runtime(shard(&config, s, epoch, &done, &plans_tx));
                let _ = shard_tx.send(r.and_then(|r| r));
            })?;
    }
    drop((plans_tx, shard_tx));
    let sampler = config.watch_pid.map(report::Sampler::start);
    let mut results = Vec::new();
    let (mut steps, mut finals) = (Vec::new(), BTreeMap::new());
    if !config.storm {
        let mut plan = Vec::new();
        for _ in 0..shards {
            // A shard that failed sends no plan: its error is among the results below.
            let Ok(p) = plans_rx.recv() else { break };
            plan.extend(p);
        }
        plan.sort_by_key(|p| p.index);
        let outcome = if plan.len() == config.machines {
            operate_while_shards_run(config, plan, epoch, &shard_rx, &mut results)
        } else {
            Err(anyhow::anyhow!("a shard did not start"))
        };
        done.store(true, Ordering::Relaxed);
        match outcome {
            Ok((s, f)) => (steps, finals) = (s, f),
            Err(e) => {
                // A shard's own failure says more than the operator's.
                results.extend(shard_rx.try_iter());
                return Err(results.into_iter().find_map(|r| r.err()).unwrap_or(e));
            }
        }
    }
    while results.len() < shards {
        match shard_rx.recv() {
            Ok(r) => results.push(r),
            Err(_) => bail!("a shard ended without a result"),
        }
    }
    let mut seen = Seen::default();
    let mut powered_at: Option<f64> = None;
    for r in results {
        let shard = r?;
        seen.machines.extend(shard.machines);
        seen.tap.add(&shard.tap);
        seen.bmc_calls += shard.bmc_calls;
        seen.ipmi.add(&shard.ipmi);
        powered_at = match (powered_at, shard.powered_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    seen.machines.sort_by_key(|m| m.index);
    if config.storm {
        let fetched = seen
            .machines
            .iter()
            .filter(|m| m.reached(crate::machine::phase::KERNEL))
            .count();
        steps = vec![
            OperatorStep {
                step: "storm".into(),
                at: powered_at.unwrap_or(0.0),
                detail: format!("powering on {} machines", config.machines),
            },
            OperatorStep {
                step: "stormed".into(),
                at: epoch.elapsed().as_secs_f64(),
                detail: format!(
                    "{fetched} of {} machines fetched their agent's files",
                    config.machines
                ),
            },
        ];
    }
    let samples = sampler.map(|s| s.stop()).unwrap_or_default();
    Ok(report::build(config, seen, steps, finals, samples))
}

/// The operator on a thread of its own; its answer ends the run, as does a shard failing
/// (a shard returns before the run is done only on failure).
fn operate_while_shards_run(
    config: &FleetConfig,
    plan: Vec<PowerPlan>,
    epoch: Instant,
    shards: &mpsc::Receiver<Result<Shard>>,
    early: &mut Vec<Result<Shard>>,
) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let op_config = config.clone();
    let operator = std::thread::spawn(move || operate(&op_config, &plan, epoch, &tx));
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                early.extend(shards.try_iter());
                if early.iter().any(|r| r.is_err()) {
                    // The operator is left to finish on its own: it only waits.
                    return Err(anyhow::anyhow!("a shard failed"));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(anyhow::anyhow!(
                    "the operator thread ended without a result"
                ));
            }
        }
    };
    let _ = operator.join();
    outcome
}

/// Runs `f` to its end on a runtime of this thread's own, with a `LocalSet` for the
/// tasks that hold smoltcp's (not `Send`) hosts.
fn on_local_runtime<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(tokio::task::LocalSet::new().block_on(&rt, f))
}

/// Shard `s`: its machines and their BMCs on its tap, until its storm is over or the
/// operator is done.
async fn shard(
    config: &FleetConfig,
    s: usize,
    epoch: Instant,
    done: &AtomicBool,
    plans: &mpsc::Sender<Vec<PowerPlan>>,
) -> Result<Shard> {
    let tap_name = &config.taps[s];
    let net = Net::new();
    let tap = Tap::open(tap_name).with_context(|| format!("opening tap {tap_name}"))?;
    let mut machines = Vec::new();
    let mut bmcs: Vec<Rc<Bmc>> = Vec::new();
    for i in (s..config.machines).step_by(config.taps.len()) {
        let firmware = firmware_of(i, config);
        let faults = config.faults.for_machine(i, config.machines);
        let m = Machine::new(
            &net,
            epoch,
            i,
            mac(config.mac_tag, 0x5a, i),
            firmware,
            faults,
            config.boot_share,
            config.storm,
        );
        if !config.storm {
            let ip = Ipv4Addr::from(u32::from(config.bmc_base) + i as u32);
            let power = if spread(i, 0.414_213_562_4) < config.ipmi {
                Power::Ipmi
            } else {
                Power::Redfish
            };
            let bmc = Bmc::new(
                &net,
                mac(config.mac_tag, 0x5b, i).0,
                ip,
                config.prefix,
                m.clone(),
                power,
            );
            bmc.serve(&net);
            bmc.serve_ipmi(&net);
            bmcs.push(bmc);
        }
        machines.push(m);
    }
    let net_task = {
        let net = net.clone();
        tokio::task::spawn_local(async move { net.run(tap).await })
    };
    let tap_failed = || anyhow::anyhow!("tap {tap_name} failed");
    let mut powered_at = None;
    if config.storm {
        // Every machine on at once; over when each has fetched its agent's files or the
        // phase has timed out.
        powered_at = Some(epoch.elapsed().as_secs_f64());
        for m in &machines {
            m.set_power(true);
        }
        let until = Instant::now() + config.phase_timeout;
        while Instant::now() < until
            && !machines
                .iter()
                .all(|m| m.reached(crate::machine::phase::KERNEL))
        {
            if net_task.is_finished() {
                return Err(tap_failed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        let plan = bmcs
            .iter()
            .map(|b| PowerPlan {
                index: b.machine.index,
                mac: b.machine.mac,
                bmc: b.ip,
                password: b.password.clone(),
                ipmi: b.power == Power::Ipmi,
            })
            .collect();
        let _ = plans.send(plan);
        while !done.load(Ordering::Relaxed) {
            if net_task.is_finished() {
                return Err(tap_failed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A report the appliance recorded may still be on its way back to its machine
        // (the appliance powers it off first, through a BMC that may be slow): let it land.
        let until = Instant::now() + Duration::from_secs(15);
        while machines.iter().any(|m| m.awaiting_answer()) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    net_task.abort();
    let mut ipmi = IpmiCounters::default();
    for b in &bmcs {
        b.count_ipmi(&mut ipmi);
    }
    Ok(Shard {
        machines: machines
            .iter()
            .enumerate()
            .map(|(k, m)| m.snapshot(bmcs.get(k).map(|b| b.power)))
            .collect(),
        tap: net.counters(),
        bmc_calls: bmcs.iter().map(|b| *b.calls.borrow()).sum(),
        ipmi,
        powered_at,
    })
}

/// Machine `i`'s position in [0, 1), so that each share is spread evenly over the fleet;
/// `step` irrational, one per choice so that the choices do not line up.
fn spread(i: usize, step: f64) -> f64 {
    ((i as f64) * step).fract()
}

fn firmware_of(i: usize, config: &FleetConfig) -> Firmware {
    let x = spread(i, 0.618_033_988_7);
    if x < config.uefi_http {
        Firmware::UefiHttp
    } else if x < config.uefi_http + config.uefi_pxe {
        Firmware::UefiPxe
    } else {
        Firmware::BiosPxe
    }
}

type Outcome = Result<(Vec<OperatorStep>, BTreeMap<String, ApiMachine>)>;

/// How the operator adds one machine: its boot MAC and how Stork reaches its BMC.
struct PowerPlan {
    index: usize,
    mac: MacAddr,
    bmc: Ipv4Addr,
    password: String,
    ipmi: bool,
}

/// The operator: every call through the admin API, each phase waited for.
fn operate(config: &FleetConfig, plan: &[PowerPlan], epoch: Instant, done: &mpsc::Sender<Outcome>) {
    let r = operate_inner(config, plan, epoch);
    let _ = done.send(r);
}

fn operate_inner(config: &FleetConfig, plan: &[PowerPlan], epoch: Instant) -> Outcome {
    let mut steps = Vec::new();
    let mut step = |name: &str, detail: String| {
        tracing::info!("{name}: {detail}");
        steps.push(OperatorStep {
            step: name.to_string(),
            at: epoch.elapsed().as_secs_f64(),
            detail,
        });
    };
    let api = client(config)?;
    let tag = format!("sim{}", config.mac_tag);
    let mut ids = Vec::new();
    for p in plan {
        let mut params = serde_json::Map::new();
        let driver = if p.ipmi {
            params.insert("host".into(), p.bmc.to_string().into());
            "ipmi"
        } else {
            params.insert(
                "url".into(),
                format!("http://{}:{}", p.bmc, crate::bmc::PORT).into(),
            );
            "redfish"
        };
        params.insert("username".into(), "admin".into());
        params.insert("password".into(), p.password.clone().into());
        let m = api
            .create_machine(&NewMachine {
                macs: vec![p.mac],
                hostname: None,
                arch: None,
                power: Some(PowerConfig {
                    driver: driver.into(),
                    params,
                }),
                tags: vec![tag.clone()],
                site: None,
            })
            .with_context(|| format!("adding machine {}", p.mac))?;
        ids.push(m.id);
    }
    let ipmi = plan.iter().filter(|p| p.ipmi).count();
    step(
        "added",
        format!(
            "{} machines, {ipmi} with IPMI power, {} with Redfish",
            ids.len(),
            ids.len() - ipmi
        ),
    );

    step("commission", format!("asking {} machines", ids.len()));
    for id in &ids {
        api.commission(id)
            .with_context(|| format!("commissioning {id}"))?;
    }
    let list = wait_settled(&api, &tag, config.phase_timeout, &[Status::Commissioning])?;
    step("commissioned", count(&list));

    if let Some(image) = &config.image {
        let ready: Vec<&ApiMachine> = list
            .values()
            .filter(|m| m.status == Status::Ready)
            .collect();
        step("deploy", format!("asking {} ready machines", ready.len()));
        for m in &ready {
            api.allocate(&m.id, &AllocateBody::default())
                .with_context(|| format!("allocating {}", m.id))?;
            api.deploy(
                &m.id,
                &DeployRequest {
                    image: image.clone(),
                    ..Default::default()
                },
            )
            .with_context(|| format!("deploying {}", m.id))?;
        }
        let list = wait_settled(&api, &tag, config.phase_timeout, &[Status::Deploying])?;
        step("deployed", count(&list));

        if config.release {
            let deployed: Vec<&ApiMachine> = list
                .values()
                .filter(|m| m.status == Status::Deployed)
                .collect();
            step(
                "release",
                format!("asking {} deployed machines", deployed.len()),
            );
            for m in &deployed {
                api.release(
                    &m.id,
                    &ReleaseBody {
                        erase: Some(true),
                        quick: Some(true),
                    },
                )
                .with_context(|| format!("releasing {}", m.id))?;
            }
            let list = wait_settled(
                &api,
                &tag,
                config.phase_timeout,
                &[Status::Releasing, Status::DiskErasing],
            )?;
            step("released", count(&list));
        }
    }
    let finals = machines(&api, &tag)?;
    Ok((steps, finals))
}

fn client(config: &FleetConfig) -> Result<ApiClient> {
    let fingerprint = match &config.fingerprint {
        Some(f) => f.clone(),
        None => {
            let url = crate::http::Url::parse(&config.api)?;
            let der = stork_tls::probe(&url.host.to_string(), url.port, Duration::from_secs(5))
                .with_context(|| format!("reaching {}", config.api))?;
            stork_tls::Fingerprint::of(&der).to_string()
        }
    };
    let trust = stork_tls::Trust::Pinned(fingerprint.parse().context("--fingerprint")?);
    Ok(ApiClient::with_trust(
        &config.api,
        Some(config.token.clone()),
        Some(trust),
    ))
}

fn machines(api: &ApiClient, tag: &str) -> Result<BTreeMap<String, ApiMachine>> {
    let list = api.machines(&MachineFilter {
        tag: Some(tag.to_string()),
        ..Default::default()
    })?;
    Ok(list.into_iter().map(|m| (m.id.clone(), m)).collect())
}

/// Waits until no machine is in one of `busy`; returns the fleet as it then is.
fn wait_settled(
    api: &ApiClient,
    tag: &str,
    timeout: Duration,
    busy: &[Status],
) -> Result<BTreeMap<String, ApiMachine>> {
    let until = Instant::now() + timeout;
    loop {
        let list = machines(api, tag)?;
        let left = list.values().filter(|m| busy.contains(&m.status)).count();
        if left == 0 || Instant::now() >= until {
            return Ok(list);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn count(list: &BTreeMap<String, ApiMachine>) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for m in list.values() {
        *by.entry(m.status.to_string()).or_default() += 1;
    }
    by.iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_go_to_distinct_machines_in_the_counts_asked() {
        let plan = FaultPlan {
            lossy: 3,
            loss: 0.05,
            no_phone_home: 2,
            stall_image: 2,
            slow_bmc: 1,
            slow_bmc_delay: Duration::from_secs(2),
        };
        let n = 50;
        let all: Vec<Faults> = (0..n).map(|i| plan.for_machine(i, n)).collect();
        assert_eq!(all.iter().filter(|f| f.loss > 0.0).count(), 3);
        assert_eq!(all.iter().filter(|f| f.no_phone_home).count(), 2);
        assert_eq!(all.iter().filter(|f| f.stall_image).count(), 2);
        assert_eq!(all.iter().filter(|f| f.slow_bmc.is_some()).count(), 1);
        let faulty = all
            .iter()
            .filter(|f| f.loss > 0.0 || f.no_phone_home || f.stall_image || f.slow_bmc.is_some())
            .count();
        assert_eq!(faulty, 8, "one fault per faulty machine");
    }

    #[test]
    fn macs_are_unicast_and_distinct_per_kind() {
        let a = mac(1, 0x5a, 258);
        let b = mac(1, 0x5b, 258);
        assert_ne!(a, b);
        assert_eq!(a.0[0] & 1, 0, "unicast");
        assert_eq!(a.to_string(), "52:54:5a:01:01:02");
    }
}
