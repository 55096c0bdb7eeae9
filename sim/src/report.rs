//! What a fleet run found: per machine its phases and outcome, per phase p50/p99 over the
//! fleet, failures by cause, the appliance's CPU, memory and descriptors over time; written
//! as JSON and drawn as an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use stork_proto::MacAddr;
use stork_proto::api::{Machine as ApiMachine, Status};

use crate::bmc::{IpmiCounters, Power};
use crate::firmware::Firmware;
use crate::fleet::{FaultPlan, FleetConfig, OperatorStep};
use crate::machine::{Faults, phase};
use crate::net::Counters;

#[derive(Debug, Serialize)]
pub struct Report {
    pub machines: usize,
    pub faults: FaultPlan,
    pub operator: Vec<OperatorStep>,
    /// Final statuses, counted.
    pub statuses: BTreeMap<String, usize>,
    /// Failed machines' reasons, counted (numbers and ids masked so like joins like).
    pub failures: BTreeMap<String, usize>,
    /// Errors the machines met on the way (a retried DHCP, a refused call), counted.
    pub errors: BTreeMap<String, usize>,
    /// Per phase: seconds from the machine's previous phase, over the fleet.
    pub phases: BTreeMap<String, Spread>,
    /// A storm: seconds from power-on to the agent's files fetched, and to the last one.
    pub storm: Option<Spread>,
    /// Seconds from the operator's ask to each machine's outcome.
    pub commission: Option<Spread>,
    pub deploy: Option<Spread>,
    pub release: Option<Spread>,
    /// Machines per minute through the whole deploy (asked to Deployed, the last one).
    pub deploys_per_minute: Option<f64>,
    pub image_bytes: u64,
    pub tap: Counters,
    pub bmc_calls: u64,
    pub ipmi: IpmiCounters,
    pub appliance: Vec<Sample>,
    pub per_machine: Vec<MachineReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            count: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: v[v.len() - 1],
        })
    }
}

#[derive(Debug, Serialize)]
pub struct MachineReport {
    pub index: usize,
    pub mac: String,
    pub id: Option<String>,
    pub firmware: Firmware,
    /// How Stork powers it (none in a storm).
    pub power: Option<Power>,
    pub faults: Faults,
    pub status: Option<Status>,
    pub status_message: Option<String>,
    pub boots: u32,
    pub marks: Vec<(&'static str, f64)>,
    pub errors: Vec<String>,
}

/// One look at the appliance process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub at: f64,
    /// CPU used since the last sample, in cores (1.0 = one core busy).
    pub cpu: f64,
    pub rss_mib: f64,
    pub fds: usize,
}

/// Samples a process once a second on a thread of its own.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let tick = 100.0; // USER_HZ on Linux
            let mut samples = Vec::new();
            let mut last: Option<(f64, f64)> = None;
            while !flag.load(Ordering::Relaxed) {
                let at = t0.elapsed().as_secs_f64();
                let Some(cpu_s) = cpu_seconds(pid, tick) else {
                    break;
                };
                let cpu = last.map_or(0.0, |(t, c)| (cpu_s - c) / (at - t).max(1e-3));
                last = Some((at, cpu_s));
                samples.push(Sample {
                    at,
                    cpu,
                    rss_mib: rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
                    fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                        .map(|d| d.count())
                        .unwrap_or(0),
                });
                std::thread::sleep(Duration::from_secs(1));
            }
            samples
        });
        Self { stop, thread }
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn cpu_seconds(pid: u32, tick: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / tick)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Masks what varies from machine to machine (ids, numbers) so like causes count together.
fn cause(s: &str) -> String {
    let mut out = String::new();
    let mut in_num = false;
    for c in s.chars().take(160) {
        if c.is_ascii_hexdigit() && (c.is_ascii_digit() || in_num) {
            if !in_num {
                out.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out
}

/// One machine as a shard saw it at the end (what the report needs, free of the shard's
/// thread-local state).
#[derive(Debug, Clone)]
pub struct MachineSnapshot {
    pub index: usize,
    pub mac: MacAddr,
    pub firmware: Firmware,
    pub faults: Faults,
    pub power: Option<Power>,
    pub boots: u32,
    pub image_bytes: u64,
    pub marks: Vec<(&'static str, f64)>,
    pub errors: Vec<String>,
}

impl MachineSnapshot {
    pub fn reached(&self, phase: &str) -> bool {
        self.marks.iter().any(|(n, _)| *n == phase)
    }
}

/// What the shards saw, together.
#[derive(Debug, Default)]
pub struct Seen {
    pub machines: Vec<MachineSnapshot>,
    pub tap: Counters,
    pub bmc_calls: u64,
    pub ipmi: IpmiCounters,
}

pub fn build(
    config: &FleetConfig,
    seen: Seen,
    operator: Vec<OperatorStep>,
    finals: BTreeMap<String, ApiMachine>,
    appliance: Vec<Sample>,
) -> Report {
    let by_mac: BTreeMap<String, &ApiMachine> = finals
        .values()
        .filter_map(|m| {
            m.boot_mac
                .or(m.macs.first().copied())
                .map(|mac| (mac.to_string(), m))
        })
        .collect();
    let asked = |name: &str| operator.iter().find(|s| s.step == name).map(|s| s.at);
    let mut statuses = BTreeMap::new();
    let mut failures = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let (mut commission, mut deploy, mut release) = (Vec::new(), Vec::new(), Vec::new());
    let mut storm = Vec::new();
    let mut per_machine = Vec::new();
    let mut image_bytes = 0;
    for m in &seen.machines {
        let api = by_mac.get(&m.mac.to_string());
        let status = api.map(|a| a.status);
        // A storm asks the appliance nothing: no statuses to count.
        if !finals.is_empty() {
            *statuses
                .entry(status.map_or("missing".to_string(), |s| s.to_string()))
                .or_default() += 1;
        }
        if let Some(a) = api.filter(|a| a.status.to_string().starts_with("failed")) {
            *failures
                .entry(cause(a.status_message.as_deref().unwrap_or("(no reason)")))
                .or_default() += 1;
        }
        for e in &m.errors {
            *errors.entry(cause(e)).or_default() += 1;
        }
        let mut prev: Option<f64> = None;
        for (name, at) in &m.marks {
            if *name == phase::POWER_ON || *name == phase::POWER_OFF {
                prev = (*name == phase::POWER_ON).then_some(*at);
                continue;
            }
            if let Some(p) = prev {
                phases.entry(name.to_string()).or_default().push(at - p);
            }
            prev = Some(*at);
        }
        let first_after = |phase: &str, from: Option<f64>| {
            let from = from?;
            m.marks
                .iter()
                .find(|(n, at)| *n == phase && *at >= from)
                .map(|(_, at)| at - from)
        };
        storm.extend(first_after(phase::KERNEL, asked("storm")));
        commission.extend(first_after(phase::COMMISSIONED, asked("commission")));
        deploy.extend(first_after(phase::DEPLOYED, asked("deploy")));
        release.extend(first_after(phase::RELEASED, asked("release")));
        image_bytes += m.image_bytes;
        per_machine.push(MachineReport {
            index: m.index,
            mac: m.mac.to_string(),
            id: api.map(|a| a.id.clone()),
            firmware: m.firmware,
            power: m.power,
            faults: m.faults.clone(),
            status,
            status_message: api.and_then(|a| a.status_message.clone()),
            boots: m.boots,
            marks: m.marks.clone(),
            errors: m.errors.clone(),
        });
    }
    let deploys_per_minute = deploy
        .iter()
        .copied()
        .reduce(f64::max)
        .filter(|last| *last > 0.0)
        .map(|last| deploy.len() as f64 * 60.0 / last);
    Report {
        machines: config.machines,
        faults: config.faults.clone(),
        operator,
        statuses,
        failures,
        errors,
        phases: phases
            .into_iter()
            .filter_map(|(k, v)| Spread::of(v).map(|s| (k, s)))
            .collect(),
        storm: Spread::of(storm),
        commission: Spread::of(commission),
        deploy: Spread::of(deploy),
        release: Spread::of(release),
        deploys_per_minute,
        image_bytes,
        tap: seen.tap,
        bmc_calls: seen.bmc_calls,
        ipmi: seen.ipmi,
        appliance,
        per_machine,
    }
}

impl Report {
    /// A few lines a person reads first.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "machines: {}", self.machines);
        let _ = writeln!(s, "final statuses: {:?}", self.statuses);
        for (cause, n) in &self.failures {
            let _ = writeln!(s, "  failed ({n}): {cause}");
        }
        for (name, spread) in [
            ("storm", &self.storm),
            ("commission", &self.commission),
            ("deploy", &self.deploy),
            ("release", &self.release),
        ] {
            if let Some(sp) = spread {
                let _ = writeln!(
                    s,
                    "{name}: {} machines, asked to done p50 {:.1} s, p99 {:.1} s, max {:.1} s",
                    sp.count, sp.p50, sp.p99, sp.max
                );
            }
        }
        if let Some(r) = self.deploys_per_minute {
            let _ = writeln!(s, "deploys per minute: {r:.1}");
        }
        for (name, sp) in &self.phases {
            let _ = writeln!(
                s,
                "  phase {name:<14} n={:<5} p50 {:7.2} s  p99 {:7.2} s",
                sp.count, sp.p50, sp.p99
            );
        }
        if let Some(peak) = self.appliance.iter().map(|x| x.cpu).reduce(f64::max) {
            let rss = self.appliance.iter().map(|x| x.rss_mib).fold(0.0, f64::max);
            let fds = self.appliance.iter().map(|x| x.fds).max().unwrap_or(0);
            let _ = writeln!(
                s,
                "appliance: peak CPU {peak:.2} cores, peak RSS {rss:.0} MiB, peak fds {fds}"
            );
        }
        let _ = writeln!(
            s,
            "tap: {} frames in, {} out, {} lost on purpose, {} refused; BMC calls {}",
            self.tap.frames_in,
            self.tap.frames_out,
            self.tap.frames_lost,
            self.tap.frames_refused,
            self.bmc_calls
        );
        let i = &self.ipmi;
        let _ = writeln!(
            s,
            "IPMI: {} sessions; dropped {} malformed, {} of unknown sessions, {} unauthentic",
            i.sessions, i.dropped_malformed, i.dropped_unknown_session, i.dropped_unauthentic
        );
        s
    }

    /// The fleet over time: machines past each milestone, and the appliance's CPU.
    pub fn svg(&self) -> String {
        const W: f64 = 900.0;
        const H: f64 = 420.0;
        const L: f64 = 60.0;
        const B: f64 = 40.0;
        let series: Vec<(&str, &str, Vec<f64>)> = [
            (phase::DHCP, "#999999"),
            (phase::COMMISSIONED, "#1f77b4"),
            (phase::IMAGE, "#ff7f0e"),
            (phase::DEPLOYED, "#2ca02c"),
            (phase::RELEASED, "#9467bd"),
        ]
        .into_iter()
        .map(|(name, colour)| {
            let mut times: Vec<f64> = self
                .per_machine
                .iter()
                .filter_map(|m| m.marks.iter().find(|(n, _)| *n == name).map(|(_, at)| *at))
                .collect();
            times.sort_by(f64::total_cmp);
            (name, colour, times)
        })
        .collect();
        let end = series
            .iter()
            .flat_map(|(_, _, t)| t.last().copied())
            .chain(self.appliance.last().map(|s| s.at))
            .fold(1.0, f64::max);
        let n = self.machines.max(1) as f64;
        let x = |t: f64| L + (W - L - 20.0) * t / end;
        let y = |k: f64| H - B - (H - B - 20.0) * k / n;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{L}\" y=\"14\">{} simulated machines: how many passed each milestone (left axis), appliance CPU in cores (grey, right)</text>\n\
             <line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{L}\" y1=\"20\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>\n",
            self.machines,
            H - B,
            W - 20.0,
            H - B,
            H - B
        );
        for i in 0..=5 {
            let t = end * i as f64 / 5.0;
            let _ = writeln!(
                s,
                "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{t:.0} s</text>",
                x(t),
                H - B + 16.0
            );
            let k = n * i as f64 / 5.0;
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{:.0}\" text-anchor=\"end\">{k:.0}</text>",
                L - 6.0,
                y(k) + 4.0
            );
        }
        if !self.appliance.is_empty() {
            let cores = self.appliance.iter().map(|a| a.cpu).fold(1.0, f64::max);
            let pts: Vec<String> = self
                .appliance
                .iter()
                .map(|a| format!("{:.1},{:.1}", x(a.at), y(n * a.cpu / cores)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"#cccccc\" points=\"{}\"/>",
                pts.join(" ")
            );
        }
        for (i, (name, colour, times)) in series.iter().enumerate() {
            let mut pts = vec![format!("{:.1},{:.1}", x(0.0), y(0.0))];
            for (k, t) in times.iter().enumerate() {
                pts.push(format!("{:.1},{:.1}", x(*t), y(k as f64)));
                pts.push(format!("{:.1},{:.1}", x(*t), y(k as f64 + 1.0)));
            }
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            );
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name} ({})</text>",
                L + 10.0 + 150.0 * i as f64,
                36,
                times.len()
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_take_the_nearest_rank() {
        let s = Spread::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((s.count, s.p50, s.p99, s.max), (100, 51.0, 99.0, 100.0));
        assert!(Spread::of(Vec::new()).is_none());
    }

    #[test]
    fn causes_count_together_whatever_their_numbers() {
        assert_eq!(
            cause("no answer from /api/v1/agent/3f2a/task in 30s"),
            cause("no answer from /api/v1/agent/9c11/task in 31s")
        );
        assert_ne!(cause("DHCP NAK"), cause("TFTP error"));
    }
}
