//! Shared helpers for the DHCP namespace tests (`tests/tests/dhcp*.rs`).
// Test helpers: a failure is a test failure, so they unwrap.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stork_lab::{Appliance, Host, Lab, Spawned, wait_for};

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

pub fn counter(a: &Appliance, name: &str) -> u64 {
    service_counter(a, "dhcp", name)
}

/// Counter `name` of `service` (`dhcp`, `dhcp6`, ...).
pub fn service_counter(a: &Appliance, service: &str, name: &str) -> u64 {
    let v = a.stats().unwrap();
    v.counter(service, name)
        .unwrap_or_else(|| panic!("no {service} counter {name} in {v:?}"))
}

/// A udhcpc/dhclient script that configures the address, so renewals (unicast from the
/// leased address) work. Never touches resolv.conf: the namespaces share the host's files.
pub fn client_script(lab: &Lab) -> PathBuf {
    let path = lab.dir().join("dhcp-client-script");
    std::fs::write(
        &path,
        r#"#!/bin/sh
# udhcpc passes the event as $1; dhclient sets $reason.
case "$1$reason" in
  bound|renew|BOUND|RENEW|REBIND|REBOOT)
    ip addr flush dev "$interface"
    ip addr add "${ip:-$new_ip_address}/${mask:-24}" dev "$interface" ;;
  deconfig|RELEASE|EXPIRE|STOP)
    ip addr flush dev "$interface" ;;
esac
exit 0
"#,
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&path));
    path
}

/// `busybox udhcpc` once: returns (address, server).
pub fn udhcpc_once(host: &Host, script: &Path, extra: &[&str]) -> (String, String) {
    let out = stork_tests::udhcpc(host, script, extra).unwrap();
    parse_lease(&out).unwrap_or_else(|| panic!("no lease in: {out}"))
}

/// The last `lease of A obtained from S` line.
pub fn parse_lease(out: &str) -> Option<(String, String)> {
    out.lines().rev().find_map(|l| {
        let rest = l.split("lease of ").nth(1)?;
        let mut w = rest.split_whitespace();
        let ip = w.next()?.to_string();
        let server = w.nth(2)?.trim_end_matches(',').to_string();
        Some((ip, server))
    })
}

/// Waits until `log` has `n` lines containing `needle`.
pub fn wait_lines(p: &Spawned, needle: &str, n: usize, what: &str) -> String {
    wait_lines_for(p, needle, n, what, Duration::from_secs(20))
}

/// [`wait_lines`] for up to `limit`.
pub fn wait_lines_for(p: &Spawned, needle: &str, n: usize, what: &str, limit: Duration) -> String {
    wait_for(what, limit, Duration::from_millis(100), || {
        let text = std::fs::read_to_string(p.log()).unwrap_or_default();
        Ok((text.matches(needle).count() >= n).then_some(text))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- {} log ---\n{}",
            p.name,
            std::fs::read_to_string(p.log()).unwrap_or_default()
        )
    })
}

pub fn signal(p: &Spawned, sig: &str) {
    run_ok(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(p.pid().to_string()),
    );
}

/// Starts the appliance with `[dhcp]` settings from `toml` (a config file in the lab).
pub fn appliance_with(lab: &Lab, toml: &str) -> Appliance {
    let path = lab.dir().join("stork.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_string_lossy().into_owned();
    Appliance::start_with(
        lab,
        &stork_tests::stork_bin(),
        &stork_tests::boot_files(),
        &["--config", &path],
    )
    .unwrap()
}

/// A network namespace of the test's own (beyond the lab's hosts), deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Self {
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self(name);
        run_ok(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
        ns
    }
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
    pub fn host(&self, ifname: &str) -> Host {
        Host {
            netns: self.0.clone(),
            ifname: ifname.into(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
