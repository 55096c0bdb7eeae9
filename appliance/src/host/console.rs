//! What the person at the appliance's screen or serial line reads after boot: where to reach
//! Stork, the certificate to pin, where the admin token is, the slot and version, and in the
//! safe state why DHCP is off and how to fix it.
//!
//! It goes to each console device that exists (`/dev/tty1`, `/dev/ttyS0`: a write to
//! `/dev/console` reaches only the last `console=` of the kernel command line) and to
//! `/run/issue.d/50-stork.issue`, which agetty shows above every login prompt (agetty
//! clears the screen first, so the issue file is what stays visible). A token made on this
//! boot is in that text; the copy for the journal ([`Notice::render`] with `show_token`
//! false) never holds it.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::power::Secret;

use super::network::Ipv4Cidr;
use super::slots::Slot;

/// The consoles written to, when they exist.
pub const CONSOLES: [&str; 2] = ["/dev/tty1", "/dev/ttyS0"];
/// agetty's drop-in directory for the pre-login text.
pub const ISSUE: &str = "/run/issue.d/50-stork.issue";

/// Where the admin token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenNote {
    /// Made on this boot: the token (shown on the consoles only) and the file it was written
    /// to (`None`: the file could not be written).
    Created {
        token: Secret,
        file: Option<PathBuf>,
    },
    /// The one `stork.toml` gives (`appliance.admin_token` or `admin_token_sha256`).
    Configured,
    /// Made on an earlier boot; `file`: the token file, if it is still there.
    Existing { file: Option<PathBuf> },
}

/// The network part of the notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkNote {
    /// Stork's DHCP `mode` on the provisioning `interface`; `up`: the address was seen on it.
    Configured {
        interface: String,
        address: Ipv4Cidr,
        mode: &'static str,
        up: bool,
    },
    /// The safe state: `why` the config was not used, the NIC and the address it got by DHCP.
    Safe {
        why: String,
        interface: String,
        address: Ipv4Cidr,
    },
}

/// Everything the notice says.
#[derive(Debug, Clone)]
pub struct Notice {
    pub version: String,
    pub slot: Option<Slot>,
    pub hostname: String,
    pub url: String,
    pub fingerprint: Option<String>,
    pub token: TokenNote,
    pub network: NetworkNote,
}

impl Notice {
    /// The text; the token of [`TokenNote::Created`] only with `show_token` (consoles, never
    /// the journal).
    pub fn render(&self, show_token: bool) -> String {
        let mut t = String::new();
        let slot = self
            .slot
            .map_or_else(|| "slot unknown".to_string(), |s| format!("slot {s}"));
        t.push_str(&format!(
            "\nStork {} ({slot}), host {}\n",
            self.version, self.hostname
        ));
        if let NetworkNote::Safe { why, .. } = &self.network {
            t.push_str(
                "\n  SAFE STATE: Stork's DHCP server is OFF.\n  Why: stork.toml could not be \
                 used:\n",
            );
            for line in why.lines() {
                t.push_str(&format!("    {line}\n"));
            }
            t.push_str(
                "  Fix: on a laptop, edit stork.toml on the STORK partition (stork.toml.example\n  \
                 beside it shows every key), then reboot.\n",
            );
        }
        t.push_str(&format!("\n  Web API:  {}\n", self.url));
        if let Some(fp) = &self.fingerprint {
            t.push_str(&format!(
                "  Certificate fingerprint (pin it: stork --fingerprint):\n    {fp}\n"
            ));
        }
        t.push_str("  Admin token: ");
        match &self.token {
            TokenNote::Created { token, file } => {
                match file {
                    Some(f) => t.push_str(&format!(
                        "made on this boot, in {} on the STORK partition\n",
                        file_name(f)
                    )),
                    None => t.push_str("made on this boot (it could not be saved: note it now)\n"),
                }
                if show_token {
                    t.push_str(&format!("    {}\n", token.expose()));
                }
            }
            TokenNote::Configured => t.push_str("the one set in stork.toml ([appliance])\n"),
            TokenNote::Existing { file: Some(f) } => {
                t.push_str(&format!("in {} on the STORK partition\n", file_name(f)))
            }
            TokenNote::Existing { file: None } => t.push_str(
                "made on an earlier boot; admin-token.txt is gone.\n    To add \
                 another, set admin_token in [appliance] of stork.toml and reboot.\n",
            ),
        }
        match &self.network {
            NetworkNote::Configured {
                interface,
                address,
                mode,
                up,
            } => {
                t.push_str(&format!("  DHCP: {mode} on {interface} ({address})\n"));
                if !up {
                    t.push_str(&format!(
                        "  WARNING: {address} was not up on {interface} in time: is the \
                         interface right?\n"
                    ));
                }
            }
            NetworkNote::Safe {
                interface, address, ..
            } => t.push_str(&format!(
                "  Network: {interface} by DHCP ({address}); Stork's DHCP is off\n"
            )),
        }
        t
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// A write to a console or the issue file that failed, for the log.
#[derive(Debug)]
pub struct Unwritten {
    pub path: PathBuf,
    pub error: std::io::Error,
}

/// Writes `text` to each of `consoles` that exists and to the `issue` file (`secret`: it
/// holds a token, so the issue file is readable by root alone; agetty runs as root).
pub fn show(consoles: &[PathBuf], issue: &Path, text: &str, secret: bool) -> Vec<Unwritten> {
    let mut failed = Vec::new();
    for c in consoles {
        if !c.exists() {
            continue;
        }
        if let Err(error) = write_console(c, text) {
            failed.push(Unwritten {
                path: c.clone(),
                error,
            });
        }
    }
    // agetty expands backslash escapes in issue files (`\4` is an address): ours are literal.
    let escaped = text.replace('\\', "\\\\");
    let written = issue
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            super::write_file(
                issue,
                escaped.as_bytes(),
                if secret { 0o600 } else { 0o644 },
            )
        });
    if let Err(error) = written {
        failed.push(Unwritten {
            path: issue.to_path_buf(),
            error,
        });
    }
    failed
}

/// Appends `text` to a console: never its controlling terminal, never blocking (a serial
/// line without a reader and with flow control would hold the boot). A terminal gets CR LF.
fn write_console(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    let tty = f.metadata()?.file_type().is_char_device();
    let bytes = if tty {
        text.replace('\n', "\r\n")
    } else {
        text.to_string()
    };
    f.write_all(bytes.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn notice(token: TokenNote, network: NetworkNote) -> Notice {
        Notice {
            version: "1.2.3".into(),
            slot: Some(Slot::B),
            hostname: "stork".into(),
            url: "https://10.77.0.1:8443".into(),
            fingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
            token,
            network,
        }
    }

    const CIDR: Ipv4Cidr = Ipv4Cidr {
        addr: Ipv4Addr::new(10, 77, 0, 1),
        prefix_len: 24,
    };

    #[test]
    fn the_token_only_where_asked_and_lines_fit_a_console() {
        let n = notice(
            TokenNote::Created {
                token: Secret::new(format!("stork_admin_{}", "0".repeat(64))),
                file: Some("/etc/stork/admin-token.txt".into()),
            },
            NetworkNote::Configured {
                interface: "enp1s0".into(),
                address: CIDR,
                mode: "full",
                up: true,
            },
        );
        let shown = n.render(true);
        let logged = n.render(false);
        assert!(shown.contains("stork_admin_000"));
        assert!(!logged.contains("stork_admin_"), "{logged}");
        for want in [
            "Stork 1.2.3 (slot b), host stork",
            "Web API:  https://10.77.0.1:8443",
            "sha256:abab",
            "admin-token.txt on the STORK partition",
            "DHCP: full on enp1s0 (10.77.0.1/24)",
        ] {
            assert!(shown.contains(want), "{want}: {shown}");
        }
        assert!(!shown.contains("SAFE"));
        for line in shown.lines() {
            assert!(line.len() <= 80, "{line:?}");
        }
    }

    #[test]
    fn the_safe_state_says_why_and_how_to_fix() {
        let n = notice(
            TokenNote::Existing { file: None },
            NetworkNote::Safe {
                why: "config field `dhcp.range`: bad\nsecond line".into(),
                interface: "eno1".into(),
                address: CIDR,
            },
        );
        let t = n.render(true);
        for want in [
            "SAFE STATE: Stork's DHCP server is OFF",
            "    config field `dhcp.range`: bad\n    second line\n",
            "edit stork.toml on the STORK partition (stork.toml.example",
            "then reboot",
            "eno1 by DHCP (10.77.0.1/24)",
        ] {
            assert!(t.contains(want), "{want}: {t}");
        }
        for line in t.lines() {
            assert!(line.len() <= 80, "{line:?}");
        }
    }

    #[test]
    fn writes_consoles_that_exist_and_the_issue_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tty1 = dir.path().join("tty1");
        std::fs::write(&tty1, "boot messages\n").unwrap();
        let missing = dir.path().join("ttyS0");
        let issue = dir.path().join("issue.d/50-stork.issue");
        let failed = show(&[tty1.clone(), missing.clone()], &issue, "a\\b\n", true);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            std::fs::read_to_string(&tty1).unwrap(),
            "boot messages\na\\b\n"
        );
        assert!(!missing.exists());
        assert_eq!(std::fs::read_to_string(&issue).unwrap(), "a\\\\b\n");
        let mode = std::fs::metadata(&issue).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        show(&[], &issue, "x\n", false);
        let mode = std::fs::metadata(&issue).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
