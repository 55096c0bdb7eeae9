//! Client commands: talk to a running appliance over its API.

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

use crate::machines::Machine;

fn get_json<T: DeserializeOwned>(base: &str, path: &str) -> Result<T> {
    let url = format!("{}/api/v1{path}", base.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(&url)
        .call()
        .with_context(|| format!("cannot reach the appliance at {url}"))?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer from {url}"))?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or(body);
        bail!("{url}: {status}: {msg}");
    }
    serde_json::from_str(&body).with_context(|| format!("unexpected answer from {url}"))
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub fn machine_list(url: &str, json: bool) -> Result<()> {
    let machines: Vec<Machine> = get_json(url, "/machines")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&machines)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<10} {:<19} {:>5} {:>10} {:>6}",
        "ID", "STATUS", "BOOT MAC", "CPUS", "MEMORY", "DISKS"
    );
    for m in machines {
        let inv = m.inventory.as_ref();
        println!(
            "{:<10} {:<10} {:<19} {:>5} {:>10} {:>6}",
            m.id,
            m.status.to_string(),
            m.boot_mac.to_string(),
            inv.map_or(0, |i| i.cpu.count),
            inv.map_or("-".into(), |i| format!("{} MiB", mib(i.memory.total_bytes))),
            inv.map_or(0, |i| i.disks.len()),
        );
    }
    Ok(())
}

pub fn machine_show(url: &str, id: &str, json: bool) -> Result<()> {
    let m: Machine = get_json(url, &format!("/machines/{id}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!("id:        {}", m.id);
    println!("status:    {}", m.status);
    println!("boot mac:  {}", m.boot_mac);
    if let Some(inv) = &m.inventory {
        println!("firmware:  {:?}", inv.firmware);
        println!("cpu:       {} x {}", inv.cpu.count, inv.cpu.model);
        println!(
            "memory:    {} (usable {})",
            human_size(inv.memory.total_bytes),
            human_size(inv.memory.usable_bytes)
        );
        let d = &inv.dmi;
        let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        println!(
            "system:    {} {} (serial {})",
            show(&d.sys_vendor),
            show(&d.product_name),
            show(&d.product_serial)
        );
        println!("kernel:    {}", inv.kernel);
        for disk in &inv.disks {
            println!(
                "disk:      {:<8} {:>10}  model {}  serial {}",
                disk.name,
                human_size(disk.size_bytes),
                show(&disk.model),
                show(&disk.serial)
            );
        }
        for nic in &inv.nics {
            println!(
                "nic:       {:<8} {}  driver {}  link {}",
                nic.name,
                nic.mac,
                show(&nic.driver),
                nic.link.map_or("-", |l| if l { "up" } else { "down" })
            );
        }
    }
    for e in &m.events {
        println!("event:     {} [{}] {}", e.at, e.source, e.message);
    }
    Ok(())
}

pub fn stats(url: &str, json: bool) -> Result<()> {
    let v: serde_json::Value = get_json(url, "/stats")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some(services) = v.as_object() {
        for (service, counters) in services {
            let Some(counters) = counters.as_object() else {
                continue;
            };
            for (name, value) in counters {
                println!("{service}.{name} {value}");
            }
        }
    }
    Ok(())
}
