//! Power drivers: turn a machine on and off, ask whether it is on, and choose its next boot
//! device, through its BMC (IPMI 2.0 lanplus, Redfish), through QEMU's monitor (lab VMs),
//! or by asking a person (manual).
//!
//! [`PowerParams`] is what the store keeps per machine (serde; secrets are [`Secret`], and
//! the store encrypts them at rest: `store::secrets`);
//! [`PowerDriver::new`] turns it into a driver. Every operation is async and bounded by
//! the driver's own timeouts and retries; errors say what the BMC answered. Operations
//! return once the BMC has accepted the request: use [`PowerDriver::wait_for`] to wait
//! until the machine reports the state (Redfish BMCs and sushy apply power changes
//! seconds later).
//!
//! Secrets: `Debug`/`Display` of params and errors never show a password, logs carry
//! none, and [`PowerParams::api_view`] is the form for API answers (no password at all).

pub mod ipmi;
pub mod qmp;
pub mod redfish;
mod secret;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use ipmi::{IpmiDriver, IpmiError, IpmiParams};
pub use qmp::{QmpDriver, QmpError, QmpParams};
pub use redfish::{RedfishDriver, RedfishError, RedfishParams};
pub use secret::Secret;

pub use stork_proto::api::PowerState;

/// The next boot device Stork asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootDevice {
    /// Network boot (PXE, or the firmware's HTTP boot where the BMC maps it so).
    Pxe,
    /// The first local disk.
    Disk,
}

impl std::fmt::Display for BootDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootDevice::Pxe => "PXE",
            BootDevice::Disk => "disk",
        })
    }
}

/// How to power one machine, as stored per machine. Tagged by `driver`:
/// `{"driver": "ipmi", "host": "10.0.0.5", "username": "admin", "password": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case")]
pub enum PowerParams {
    Ipmi(IpmiParams),
    Redfish(RedfishParams),
    Qmp(QmpParams),
    /// No remote control: every operation asks a person to act.
    Manual,
}

impl PowerParams {
    /// The params as API answers show them: every secret removed and replaced by
    /// `"password_set": true|false`. The stored form (plain `Serialize`) keeps it.
    pub fn api_view(&self) -> serde_json::Value {
        let (mut v, has_password) = match self {
            PowerParams::Ipmi(p) => (
                serde_json::to_value(self).unwrap_or_default(),
                Some(!p.password.is_empty()),
            ),
            PowerParams::Redfish(p) => (
                serde_json::to_value(self).unwrap_or_default(),
                Some(!p.password.is_empty()),
            ),
            PowerParams::Qmp(_) | PowerParams::Manual => {
                (serde_json::to_value(self).unwrap_or_default(), None)
            }
        };
        if let (Some(obj), Some(set)) = (v.as_object_mut(), has_password) {
            obj.remove("password");
            obj.insert("password_set".into(), serde_json::Value::Bool(set));
        }
        v
    }

    pub fn driver_name(&self) -> &'static str {
        match self {
            PowerParams::Ipmi(_) => "ipmi",
            PowerParams::Redfish(_) => "redfish",
            PowerParams::Qmp(_) => "qmp",
            PowerParams::Manual => "manual",
        }
    }
}

/// An operation, named in errors and in manual requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    On,
    SoftOff,
    HardOff,
    Cycle,
    SetBootDevice,
}

impl std::fmt::Display for PowerAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerAction::On => "power on",
            PowerAction::SoftOff => "soft power off",
            PowerAction::HardOff => "hard power off",
            PowerAction::Cycle => "power cycle",
            PowerAction::SetBootDevice => "set the next boot device",
        })
    }
}

/// A power operation failed; the driver's error says what the BMC answered.
#[derive(Debug, Error)]
pub enum PowerError {
    #[error(transparent)]
    Ipmi(#[from] IpmiError),
    #[error(transparent)]
    Redfish(#[from] RedfishError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Manual power: not a failure of the machine, a request for a person.
    #[error("manual power control: a person must {request}")]
    ManualActionRequired {
        action: PowerAction,
        request: String,
    },
    #[error("{driver} driver cannot {action}: {why}")]
    Unsupported {
        driver: &'static str,
        action: PowerAction,
        why: &'static str,
    },
    #[error("the machine did not report power {want} within {waited:?} (last seen: {last})")]
    StateTimeout {
        want: PowerState,
        last: PowerState,
        waited: Duration,
    },
}

impl PowerError {
    /// A stable code for API answers and events.
    pub fn code(&self) -> &'static str {
        match self {
            PowerError::Ipmi(e) if e.is_credentials() => "bmc_credentials",
            PowerError::Ipmi(e) if e.is_unreachable() => "bmc_unreachable",
            PowerError::Ipmi(IpmiError::BootReadBack { .. }) => "boot_override_not_applied",
            PowerError::Ipmi(_) => "bmc_error",
            PowerError::Redfish(e) if e.is_credentials() => "bmc_credentials",
            PowerError::Redfish(e) if e.is_certificate() => "bmc_tls",
            PowerError::Redfish(e) if e.is_unreachable() => "bmc_unreachable",
            PowerError::Redfish(RedfishError::BootReadBack { .. }) => "boot_override_not_applied",
            PowerError::Redfish(_) => "bmc_error",
            PowerError::Qmp(_) => "qmp_error",
            PowerError::ManualActionRequired { .. } => "manual_action_required",
            PowerError::Unsupported { .. } => "unsupported",
            PowerError::StateTimeout { .. } => "power_state_timeout",
        }
    }
}

/// One machine's power driver. Cheap to clone; holds no connection between operations.
#[derive(Debug, Clone)]
pub enum PowerDriver {
    Ipmi(IpmiDriver),
    Redfish(RedfishDriver),
    Qmp(QmpDriver),
    Manual,
}

fn manual(action: PowerAction, request: String) -> PowerError {
    PowerError::ManualActionRequired { action, request }
}

impl PowerDriver {
    pub fn new(params: PowerParams) -> Self {
        match params {
            PowerParams::Ipmi(p) => PowerDriver::Ipmi(IpmiDriver::new(p)),
            PowerParams::Redfish(p) => PowerDriver::Redfish(RedfishDriver::new(p)),
            PowerParams::Qmp(p) => PowerDriver::Qmp(QmpDriver::new(p)),
            PowerParams::Manual => PowerDriver::Manual,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PowerDriver::Ipmi(_) => "ipmi",
            PowerDriver::Redfish(_) => "redfish",
            PowerDriver::Qmp(_) => "qmp",
            PowerDriver::Manual => "manual",
        }
    }

    pub async fn power_on(&self) -> Result<(), PowerError> {
        match self {
            PowerDriver::Ipmi(d) => Ok(d.power_on().await?),
            PowerDriver::Redfish(d) => Ok(d.power_on().await?),
            PowerDriver::Qmp(d) => d.power_on().await,
            PowerDriver::Manual => Err(manual(PowerAction::On, "power the machine on".into())),
        }
    }

    /// Soft: ask the OS to shut down (ACPI); hard: cut power now.
    pub async fn power_off(&self, soft: bool) -> Result<(), PowerError> {
        match self {
            PowerDriver::Ipmi(d) => Ok(d.power_off(soft).await?),
            PowerDriver::Redfish(d) => Ok(d.power_off(soft).await?),
            PowerDriver::Qmp(d) => Ok(d.power_off(soft).await?),
            PowerDriver::Manual => Err(manual(
                if soft {
                    PowerAction::SoftOff
                } else {
                    PowerAction::HardOff
                },
                if soft {
                    "shut the machine down".into()
                } else {
                    "power the machine off".into()
                },
            )),
        }
    }

    /// Off and on again (a machine that is off is powered on).
    pub async fn power_cycle(&self) -> Result<(), PowerError> {
        match self {
            PowerDriver::Ipmi(d) => Ok(d.power_cycle().await?),
            PowerDriver::Redfish(d) => Ok(d.power_cycle().await?),
            PowerDriver::Qmp(d) => Ok(d.power_cycle().await?),
            PowerDriver::Manual => Err(manual(
                PowerAction::Cycle,
                "power-cycle the machine (or power it on if it is off)".into(),
            )),
        }
    }

    pub async fn query(&self) -> Result<PowerState, PowerError> {
        match self {
            PowerDriver::Ipmi(d) => Ok(d.query().await?),
            PowerDriver::Redfish(d) => Ok(d.query().await?),
            PowerDriver::Qmp(d) => Ok(d.query().await?),
            PowerDriver::Manual => Ok(PowerState::Unknown),
        }
    }

    /// Sets the next boot device and checks that the BMC reports it back.
    /// `persistent`: every boot, not only the next; `efi`: UEFI rather than legacy BIOS.
    pub async fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        efi: bool,
    ) -> Result<(), PowerError> {
        match self {
            PowerDriver::Ipmi(d) => Ok(d.set_boot_device(device, persistent, efi).await?),
            PowerDriver::Redfish(d) => Ok(d.set_boot_device(device, persistent, efi).await?),
            PowerDriver::Qmp(d) => Ok(d.set_boot_device(device, persistent).await?),
            PowerDriver::Manual => Err(manual(
                PowerAction::SetBootDevice,
                format!(
                    "set the machine's {} boot device to {device} ({})",
                    if persistent { "default" } else { "next" },
                    if efi { "UEFI" } else { "legacy BIOS" }
                ),
            )),
        }
    }

    /// Polls [`Self::query`] until the machine reports `want`. Query errors end the wait.
    pub async fn wait_for(
        &self,
        want: PowerState,
        timeout: Duration,
        every: Duration,
    ) -> Result<(), PowerError> {
        let start = tokio::time::Instant::now();
        loop {
            let last = self.query().await?;
            if last == want {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(PowerError::StateTimeout {
                    want,
                    last,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipmi_params() -> PowerParams {
        PowerParams::Ipmi(IpmiParams::new("10.0.0.5", "admin", "s3cret-pw"))
    }

    #[test]
    fn secrets_stay_out_of_debug_and_api_view_but_serde_keeps_them() {
        let redfish = PowerParams::Redfish(RedfishParams::new(
            "http://10.0.0.6:8000",
            "root",
            "s3cret-pw",
        ));
        for p in [ipmi_params(), redfish] {
            let dbg = format!("{p:?}");
            assert!(!dbg.contains("s3cret"), "{dbg}");
            let api = p.api_view();
            let api_text = api.to_string();
            assert!(!api_text.contains("s3cret"), "{api_text}");
            assert_eq!(api["password_set"], true);
            assert!(api.get("password").is_none());
            // The serde form round-trips the password (the store seals it before it reaches
            // the disk: `store::secrets`).
            let stored = serde_json::to_string(&p).unwrap();
            assert!(stored.contains("s3cret"));
            let back: PowerParams = serde_json::from_str(&stored).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn params_are_tagged_by_driver() {
        let v = serde_json::to_value(ipmi_params()).unwrap();
        assert_eq!(v["driver"], "ipmi");
        assert_eq!(v["port"], 623);
        let m: PowerParams = serde_json::from_str(r#"{"driver":"manual"}"#).unwrap();
        assert_eq!(m, PowerParams::Manual);
        let q: PowerParams =
            serde_json::from_str(r#"{"driver":"qmp","socket":"/run/vm1/qmp.sock"}"#).unwrap();
        assert_eq!(q.driver_name(), "qmp");
    }

    #[tokio::test]
    async fn manual_asks_a_person() {
        let d = PowerDriver::new(PowerParams::Manual);
        assert_eq!(d.query().await.unwrap(), PowerState::Unknown);
        let e = d.power_on().await.unwrap_err();
        assert_eq!(e.code(), "manual_action_required");
        assert_eq!(
            e.to_string(),
            "manual power control: a person must power the machine on"
        );
        let e = d
            .set_boot_device(BootDevice::Pxe, false, true)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "manual power control: a person must set the machine's next boot device to PXE (UEFI)"
        );
    }

    #[test]
    fn driver_futures_are_send() {
        // The lifecycle runs power operations in spawned tasks.
        fn is_send<T: Send>(_: &T) {}
        let d = PowerDriver::new(ipmi_params());
        is_send(&d.power_on());
        is_send(&d.query());
        is_send(&d.set_boot_device(BootDevice::Pxe, false, false));
        is_send(&d.power_cycle());
    }
}
