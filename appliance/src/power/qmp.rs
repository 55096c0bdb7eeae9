//! QMP power driver for QEMU lab machines: JSON lines over the VM's QMP unix socket.
//!
//! QMP can only act on a running QEMU process, so "power" here means:
//! - query: `query-status`; `running` is on, `paused`/`prelaunch`/`shutdown` are off, and
//!   no process behind the socket is off.
//! - on: `cont` (from hard-off or a paused start); a QEMU process that has exited cannot
//!   be started through QMP: lab VMs that must be powered on from nothing use their IPMI
//!   BMC (`stork_lab::bmc::IpmiSim`), which is the real path.
//! - soft off: `system_powerdown` (ACPI); the guest shuts down and QEMU exits.
//! - hard off: `stop` then `system_reset`: the VM is frozen with its CPUs reset, so the
//!   next "on" boots from the firmware like a real machine.
//! - cycle: `system_reset` (and `cont` if it was stopped).
//! - boot device: `qom-set` of the NIC's and the disk's `bootindex`; QEMU rewrites the
//!   firmware's boot order on the next reset. QEMU has no one-shot boot order, so
//!   "once" is applied as persistent.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tracing::debug;

use super::{BootDevice, PowerError, PowerState};

fn default_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QmpParams {
    /// The VM's QMP unix socket (`-qmp unix:PATH,server=on,wait=off`).
    #[schema(value_type = String)]
    pub socket: PathBuf,
    /// QOM path of the boot NIC; default: the first NIC found under `/machine/peripheral*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<String>,
    /// QOM path of the boot disk; default: the first virtio-blk/scsi-hd/ide-hd found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// For connecting and for each command.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl QmpParams {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            nic: None,
            disk: None,
            timeout_ms: default_timeout_ms(),
        }
    }
}

#[derive(Debug, Error)]
pub enum QmpError {
    #[error(
        "QEMU behind {socket} is not running ({source}); QMP cannot start a process: power this VM on through its BMC"
    )]
    NotRunning {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {socket}: {source}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {socket}: no answer to {command} within {timeout_ms} ms")]
    Timeout {
        socket: String,
        command: String,
        timeout_ms: u64,
    },
    #[error("QEMU answered {command} with {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP socket {socket}: unexpected answer to {command}: {answer}")]
    Protocol {
        socket: String,
        command: String,
        answer: String,
    },
    #[error(
        "no {what} found under /machine/peripheral or /machine/peripheral-anon (set it in the QMP params)"
    )]
    NoDevice { what: &'static str },
}

/// The QMP driver for one VM.
#[derive(Debug, Clone)]
pub struct QmpDriver {
    params: QmpParams,
}

struct Conn {
    socket: String,
    timeout: Duration,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Conn {
    async fn read_json(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                socket: self.socket.clone(),
                command: command.to_string(),
                timeout_ms: self.timeout.as_millis() as u64,
            })?
            .map_err(|source| QmpError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                socket: self.socket.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QEMU closed the socket",
                ),
            });
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol {
            socket: self.socket.clone(),
            command: command.to_string(),
            answer: line.trim().chars().take(200).collect(),
        })
    }

    /// Runs one command; events that arrive meanwhile are skipped.
    async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                socket: self.socket.clone(),
                source,
            })?;
        loop {
            let v = self.read_json(command).await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Protocol {
                socket: self.socket.clone(),
                command: command.to_string(),
                answer: v.to_string(),
            });
        }
    }

    async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None).await?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_string())
    }
}

fn state_of(status: &str) -> PowerState {
    match status {
        "running" => PowerState::On,
        "paused" | "prelaunch" | "shutdown" => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

impl QmpDriver {
    pub fn new(params: QmpParams) -> Self {
        Self { params }
    }

    pub fn params(&self) -> &QmpParams {
        &self.params
    }

    fn socket(&self) -> String {
        self.params.socket.display().to_string()
    }

    /// Connects and negotiates capabilities. `Ok(None)`: no QEMU behind the socket.
    async fn connect(&self) -> Result<Option<Conn>, QmpError> {
        let socket = self.socket();
        let timeout = Duration::from_millis(self.params.timeout_ms.max(1));
        let stream =
            match tokio::time::timeout(timeout, UnixStream::connect(&self.params.socket)).await {
                Err(_) => {
                    return Err(QmpError::Timeout {
                        socket,
                        command: "connect".into(),
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    debug!(socket = %socket, error = %e, "no QEMU behind the QMP socket");
                    return Ok(None);
                }
                Ok(Err(source)) => return Err(QmpError::Io { socket, source }),
                Ok(Ok(s)) => s,
            };
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            socket,
            timeout,
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = conn.read_json("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                socket: conn.socket.clone(),
                command: "greeting".into(),
                answer: greeting.to_string(),
            });
        }
        conn.execute("qmp_capabilities", None).await?;
        Ok(Some(conn))
    }

    async fn require(&self) -> Result<Conn, QmpError> {
        match self.connect().await? {
            Some(c) => Ok(c),
            None => Err(QmpError::NotRunning {
                socket: self.socket(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "nothing listens on the socket",
                ),
            }),
        }
    }

    pub async fn query(&self) -> Result<PowerState, QmpError> {
        match self.connect().await? {
            None => Ok(PowerState::Off),
            Some(mut c) => Ok(state_of(&c.status().await?)),
        }
    }

    pub async fn power_on(&self) -> Result<(), PowerError> {
        let mut c = self.require().await?;
        match c.status().await?.as_str() {
            "running" => Ok(()),
            // A guest that shut down under -no-shutdown needs a reset before it runs again.
            "shutdown" => {
                c.execute("system_reset", None).await?;
                c.execute("cont", None).await?;
                Ok(())
            }
            _ => {
                c.execute("cont", None).await?;
                Ok(())
            }
        }
    }

    pub async fn power_off(&self, soft: bool) -> Result<(), QmpError> {
        let Some(mut c) = self.connect().await? else {
            return Ok(()); // no process: already off
        };
        if soft {
            c.execute("system_powerdown", None).await?;
        } else {
            c.execute("stop", None).await?;
            c.execute("system_reset", None).await?;
        }
        Ok(())
    }

    pub async fn power_cycle(&self) -> Result<(), QmpError> {
        let mut c = self.require().await?;
        let status = c.status().await?;
        c.execute("system_reset", None).await?;
        if status != "running" {
            c.execute("cont", None).await?;
        }
        Ok(())
    }

    /// Puts the NIC (PXE) or the disk first in the firmware's boot order.
    pub async fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
    ) -> Result<(), QmpError> {
        let mut c = self.require().await?;
        let nic = match &self.params.nic {
            Some(p) => p.clone(),
            None => find_device(&mut c, is_nic)
                .await?
                .ok_or(QmpError::NoDevice { what: "NIC" })?,
        };
        let disk = match &self.params.disk {
            Some(p) => p.clone(),
            None => find_device(&mut c, is_disk)
                .await?
                .ok_or(QmpError::NoDevice { what: "disk" })?,
        };
        let (first, second) = match device {
            BootDevice::Pxe => (&nic, &disk),
            BootDevice::Disk => (&disk, &nic),
        };
        if !persistent {
            debug!(socket = %self.socket(), "QEMU has no one-shot boot order; applying it persistently");
        }
        // QEMU refuses a bootindex another device holds: move both out of the way first.
        for (path, index) in [(first, 1000), (second, 1001), (first, 1), (second, 2)] {
            c.execute(
                "qom-set",
                Some(json!({ "path": path, "property": "bootindex", "value": index })),
            )
            .await?;
        }
        let got = c
            .execute(
                "qom-get",
                Some(json!({ "path": first, "property": "bootindex" })),
            )
            .await?;
        if got.as_i64() != Some(1) {
            return Err(QmpError::Protocol {
                socket: self.socket(),
                command: "qom-get bootindex".into(),
                answer: got.to_string(),
            });
        }
        Ok(())
    }
}

fn is_nic(ty: &str) -> bool {
    ["virtio-net", "e1000", "rtl8139", "vmxnet3", "igb"]
        .iter()
        .any(|n| ty.starts_with(n))
}

fn is_disk(ty: &str) -> bool {
    ["virtio-blk", "scsi-hd", "ide-hd", "nvme"]
        .iter()
        .any(|n| ty.starts_with(n))
}

/// The first device under `/machine/peripheral` (devices with an id) or
/// `/machine/peripheral-anon` whose type matches.
async fn find_device(c: &mut Conn, want: fn(&str) -> bool) -> Result<Option<String>, QmpError> {
    for base in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let list = c.execute("qom-list", Some(json!({ "path": base }))).await?;
        for p in list.as_array().into_iter().flatten() {
            let (Some(name), Some(ty)) = (p["name"].as_str(), p["type"].as_str()) else {
                continue;
            };
            if let Some(inner) = ty.strip_prefix("child<").and_then(|t| t.strip_suffix('>'))
                && want(inner)
            {
                return Ok(Some(format!("{base}/{name}")));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert_eq!(state_of("running"), PowerState::On);
        assert_eq!(state_of("prelaunch"), PowerState::Off);
        assert_eq!(state_of("paused"), PowerState::Off);
        assert_eq!(state_of("guest-panicked"), PowerState::Unknown);
        assert!(
            is_nic("virtio-net-pci") && is_disk("virtio-blk-pci") && !is_disk("virtio-net-pci")
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_off_and_cannot_be_powered_on() {
        let d = QmpDriver::new(QmpParams::new("/nonexistent/stork-test/qmp.sock"));
        assert_eq!(d.query().await.unwrap(), PowerState::Off);
        let e = d.power_on().await.unwrap_err();
        assert!(e.to_string().contains("QMP cannot start a process"), "{e}");
    }
}
