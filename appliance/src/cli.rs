//! Client commands: talk to a running appliance over its API. Human tables by default,
//! `--json` for scripts.

use std::io::{BufRead, BufReader};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use stork_proto::units::human_bytes;

use crate::lifecycle::Status;
use crate::store::{BootResource, EventRecord, Machine};

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn finish<T: DeserializeOwned>(
        url: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = resp.with_context(|| format!("cannot reach the appliance at {url}"))?;
        let status = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer from {url}"))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
                .unwrap_or(body);
            let hint = if status == 401 {
                " (set --token or STORK_TOKEN; `stork token create` makes one)"
            } else {
                ""
            };
            bail!("{status}: {msg}{hint}");
        }
        let body = if body.is_empty() { "null" } else { &body };
        serde_json::from_str(body).with_context(|| format!("unexpected answer from {url}"))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = self.url(path);
        let mut req = self.agent.get(&url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(&url, req.call())
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T> {
        let url = self.url(path);
        let mut req = self.agent.post(&url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish(&url, req.send_json(body))
    }

    pub fn delete(&self, path: &str) -> Result<()> {
        let url = self.url(path);
        let mut req = self.agent.delete(&url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        Self::finish::<Value>(&url, req.call()).map(|_| ())
    }

    /// Follows the event stream, calling `f` for each event until it returns false.
    pub fn follow_events(
        &self,
        machine: &str,
        mut f: impl FnMut(EventRecord) -> bool,
    ) -> Result<()> {
        let url = self.url(&format!("/events/stream?machine={machine}"));
        let mut req = self.agent.get(&url);
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.call().with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
        let reader = BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.context("event stream broke")?;
            if let Some(data) = line.strip_prefix("data:") {
                let e: EventRecord = serde_json::from_str(data.trim()).context("bad event")?;
                if !f(e) {
                    break;
                }
            }
        }
        Ok(())
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn time(ms: i64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms % 1000)
}

pub fn machine_table(machines: &[Machine]) {
    println!(
        "{:<13} {:<20} {:<19} {:<16} {:>4} {:>9} {:>6}",
        "ID", "STATUS", "BOOT MAC", "HOSTNAME", "CPUS", "MEMORY", "DISKS"
    );
    for m in machines {
        let inv = m.inventory.as_ref();
        println!(
            "{:<13} {:<20} {:<19} {:<16} {:>4} {:>9} {:>6}",
            m.id,
            m.status.to_string(),
            m.boot_mac
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            m.hostname.as_deref().unwrap_or("-"),
            inv.map_or(0, |i| i.cpu.count),
            inv.map_or("-".into(), |i| human_bytes(i.memory.total_bytes)),
            inv.map_or(0, |i| i.disks.len()),
        );
    }
}

pub fn machine_details(m: &Machine, events: &[EventRecord]) {
    let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("id:        {}", m.id);
    println!("status:    {}", m.status);
    if let Some(msg) = &m.status_message {
        println!("reason:    {msg}");
    }
    println!("hostname:  {}", show(&m.hostname));
    println!(
        "macs:      {}",
        m.macs
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("power:     {}", m.power.driver);
    if let Some(o) = &m.owner {
        println!("owner:     {o}");
    }
    if let Some(d) = &m.deploy {
        let layout = d.layout.map_or_else(String::new, |l| {
            format!(
                ", layout: ESP {} MiB, root {}",
                l.esp(),
                l.root_mib
                    .map_or_else(|| "the rest".to_string(), |r| format!("{r} MiB"))
            )
        });
        println!("deploy:    {} to {:?}{layout}", d.image, d.target);
    }
    if let Some(at) = m.last_heartbeat {
        let step = m.heartbeat_step.as_deref().unwrap_or("-");
        let due = match m.heartbeat_deadline {
            Some(d) => format!("next due by {}", time(d)),
            None => "none expected".to_string(),
        };
        println!("heartbeat: {} (step {step}), {due}", time(at));
    }
    if let Some(inv) = &m.inventory {
        println!("firmware:  {:?}", inv.firmware);
        let c = &inv.cpu;
        let topology = match (c.sockets, c.cores) {
            (Some(s), Some(k)) => format!(" ({s} sockets, {k} cores)"),
            _ => String::new(),
        };
        println!("cpu:       {} x {}{topology}", c.count, c.model);
        if !c.flags.is_empty() {
            println!("cpu flags: {}", c.flags.join(" "));
        }
        println!(
            "memory:    {} (usable {})",
            human_bytes(inv.memory.total_bytes),
            human_bytes(inv.memory.usable_bytes)
        );
        let d = &inv.dmi;
        println!(
            "system:    {} {} (serial {})",
            show(&d.sys_vendor),
            show(&d.product_name),
            show(&d.product_serial)
        );
        for disk in &inv.disks {
            println!(
                "disk:      {:<8} {:>10}  model {}  serial {}  {}{}",
                disk.name,
                human_bytes(disk.size_bytes),
                show(&disk.model),
                show(&disk.serial),
                show(&disk.transport),
                if disk.removable == Some(true) {
                    " removable"
                } else {
                    ""
                }
            );
            for p in &disk.partitions {
                println!(
                    "           {:<10} {:>10}  at {}  {}",
                    p.name,
                    human_bytes(p.size_bytes),
                    p.start_bytes,
                    show(&p.label)
                );
            }
        }
        for nic in &inv.nics {
            println!(
                "nic:       {:<8} {}  driver {}  link {}{}",
                nic.name,
                nic.mac,
                show(&nic.driver),
                nic.link.map_or("-", |l| if l { "up" } else { "down" }),
                nic.speed_mbps
                    .map_or_else(String::new, |s| format!(" {s} Mb/s"))
            );
        }
    }
    for e in events {
        print_event(e);
    }
}

pub fn print_event(e: &EventRecord) {
    println!("{} {:<12} {}", time(e.at), e.actor, e.message);
}

/// `stork machine watch`: prints events live; with `until_settled`, stops once the machine
/// leaves its busy status.
pub fn watch(c: &Client, id: &str, until_settled: bool) -> Result<()> {
    let m: Machine = c.get(&format!("/machines/{id}"))?;
    let mut last_status = m.status;
    c.follow_events(&m.id, |e| {
        if let Some(p) = e
            .message
            .split('(')
            .nth(1)
            .and_then(|r| r.split('%').next())
            && let Ok(pct) = p.trim().parse::<f32>()
        {
            let filled = (pct / 5.0) as usize;
            println!(
                "{} [{}{}] {}",
                time(e.at),
                "#".repeat(filled.min(20)),
                " ".repeat(20 - filled.min(20)),
                e.message
            );
        } else {
            print_event(&e);
        }
        if let Some(s) = e.new_status {
            last_status = s;
        }
        !(until_settled && e.new_status.is_some() && last_status.failure_on_timeout().is_none())
    })?;
    if until_settled {
        println!("status: {last_status}");
    }
    Ok(())
}

pub fn stats(c: &Client, json: bool) -> Result<()> {
    let mut v: Value = c.get("/stats")?;
    let health: crate::supervise::HealthReport = c.get("/health")?;
    if json {
        // The counters by service as the API has them, and the health beside them.
        if let Some(o) = v.as_object_mut() {
            o.insert("health".into(), serde_json::to_value(&health)?);
        }
        return print_json(&v);
    }
    if let Some(services) = v.as_object() {
        for (service, counters) in services {
            for (name, value) in counters.as_object().into_iter().flatten() {
                println!("{service}.{name} {value}");
            }
        }
    }
    println!("health {}", health.status);
    for (name, s) in &health.services {
        let state = serde_json::to_value(s.state)?;
        let state = state.as_str().unwrap_or("?");
        match &s.last_error {
            Some(e) => println!(
                "health.{name} {state} restarts={} last_error={e}",
                s.restarts
            ),
            None => println!("health.{name} {state} restarts={}", s.restarts),
        }
    }
    Ok(())
}

pub fn images(c: &Client, json: bool) -> Result<()> {
    let list: Vec<BootResource> = c.get("/boot-resources")?;
    if json {
        return print_json(&list);
    }
    println!("{:<24} {:<10} {:<6} FILES", "NAME", "KIND", "ARCH");
    for r in list {
        let files: Vec<String> = r
            .files
            .iter()
            .map(|f| format!("{}={}", f.role, f.path))
            .collect();
        println!(
            "{:<24} {:<10} {:<6} {}",
            r.name,
            r.kind,
            r.arch.as_deref().unwrap_or("-"),
            files.join(" ")
        );
    }
    Ok(())
}

/// Machines filtered by status, for `machine list --status`.
pub fn list(c: &Client, status: Option<Status>, json: bool) -> Result<()> {
    let path = match status {
        Some(s) => format!("/machines?status={s}"),
        None => "/machines".into(),
    };
    let machines: Vec<Machine> = c.get(&path)?;
    if json {
        return print_json(&machines);
    }
    machine_table(&machines);
    Ok(())
}

pub fn show(c: &Client, id: &str, json: bool) -> Result<()> {
    let m: Machine = c.get(&format!("/machines/{id}"))?;
    if json {
        return print_json(&m);
    }
    let events: Vec<EventRecord> = c.get(&format!("/machines/{}/events", m.id))?;
    machine_details(&m, &events);
    Ok(())
}

/// Runs a machine action and prints the machine after it.
pub fn action(c: &Client, id: &str, action: &str, body: Value, json: bool) -> Result<()> {
    let m: Machine = c.post(&format!("/machines/{id}/{action}"), &body)?;
    if json {
        return print_json(&m);
    }
    println!("{} {}", m.id, m.status);
    Ok(())
}

pub fn events(c: &Client, id: &str, json: bool) -> Result<()> {
    let events: Vec<EventRecord> = c.get(&format!("/machines/{id}/events"))?;
    if json {
        return print_json(&events);
    }
    for e in &events {
        print_event(e);
    }
    Ok(())
}

pub fn json_or_line(v: &Value, json: bool, line: impl FnOnce(&Value) -> String) -> Result<()> {
    if json {
        print_json(v)
    } else {
        println!("{}", line(v));
        Ok(())
    }
}

pub fn empty() -> Value {
    json!({})
}
