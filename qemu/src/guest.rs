//! A deployed machine seen from inside the lab: the address it leased and an SSH login.

use std::path::Path;

use anyhow::{Context, Result};

use crate::Lab;

/// The address a machine leased: its agent prints its command line (`ip=`) on the serial
/// console, and the appliance leases by MAC, so the installed OS gets the same one.
pub fn leased_ip(console: &Path) -> Result<String> {
    // Firmware writes bytes that are not UTF-8 (OVMF's screen control) to the console.
    let bytes = std::fs::read(console).with_context(|| format!("reading {}", console.display()))?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.split_once("stork-agent: cmdline: ").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().find_map(|w| w.strip_prefix("ip=")))
        .filter_map(|ip| ip.split('/').next())
        .next_back()
        .map(str::to_string)
        .context("no agent cmdline line with ip= on the console")
}

/// ssh options for a machine deployed a moment ago: its host key is new (none is checked or
/// stored), no prompt, a bounded wait. A connection made just before the machine rebooted
/// has no peer and no reset to end it (a poll for the next boot hung past its deadline in
/// CI): without answers to keep-alives it ends in 15 s.
pub const SSH_OPTIONS: &[&str] = &[
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
    "-o",
    "LogLevel=ERROR",
];

/// Runs `command` as `login` (`user@ip`) over SSH with `key`, from inside the lab namespace;
/// returns its stdout. Host keys are new on every deploy: none is checked or stored.
pub fn ssh(lab: &Lab, key: &Path, login: &str, command: &str) -> Result<String> {
    crate::run(
        lab.command("ssh")
            .arg("-i")
            .arg(key)
            .args(SSH_OPTIONS)
            .arg(login)
            .arg(command),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_agent_boot_names_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(
            &console,
            b"\x1b[2J BdsDxe \xff\nstork-agent: cmdline: url=http://10.77.0.1:8080 ip=10.77.0.100/24 gateway=none\n\
              stork-agent: cmdline: url=http://10.77.0.1:8080 ip=10.77.0.101/24 gateway=none\n",
        )
        .unwrap();
        assert_eq!(leased_ip(&console).unwrap(), "10.77.0.101");
        std::fs::write(&console, "no agent here\n").unwrap();
        assert!(leased_ip(&console).is_err());
    }
}
