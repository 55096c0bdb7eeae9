//! A simulated machine's BMC on an address of its own, speaking both protocols a real one
//! does: Redfish (plain HTTP, basic auth) with the resources Stork's Redfish driver reads
//! and writes (the Systems collection, the ComputerSystem's `PowerState` and boot
//! override, its Reset action), and IPMI 2.0 over LAN on UDP 623, answered by Stork's own
//! `power::ipmi::responder` (the driver's wire and crypto code, on the BMC's side). Stork
//! powers the simulated fleet through these exactly as it powers real machines.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use stork::power::ipmi::responder::{Chassis, Responder};
use stork::power::ipmi::wire::{self as ipmi, BootFlags, ChassisControl, ChassisStatus};

use crate::machine::{BootTarget, Machine};
use crate::net::{HostId, Net, TcpStream, UdpSocket};

pub const PORT: u16 = 80;
pub const IPMI_PORT: u16 = stork::power::ipmi::DEFAULT_PORT;
const SYSTEM: &str = "/redfish/v1/Systems/1";
const RESET: &str = "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset";
/// Connections served at once: the driver makes one per call.
const LISTENERS: usize = 2;
const MAX_BODY: usize = 16 * 1024;

/// How Stork is told to reach a BMC (each speaks both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    Ipmi,
    Redfish,
}

/// What the IPMI side saw, over the fleet.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct IpmiCounters {
    pub sessions: u64,
    pub dropped_malformed: u64,
    pub dropped_unknown_session: u64,
    pub dropped_unauthentic: u64,
}

impl IpmiCounters {
    pub fn add(&mut self, o: &IpmiCounters) {
        self.sessions += o.sessions;
        self.dropped_malformed += o.dropped_malformed;
        self.dropped_unknown_session += o.dropped_unknown_session;
        self.dropped_unauthentic += o.dropped_unauthentic;
    }
}

pub struct Bmc {
    pub host: HostId,
    pub ip: Ipv4Addr,
    pub username: String,
    pub password: String,
    pub machine: Rc<Machine>,
    pub power: Power,
    /// `BootSourceOverrideMode` as last set (read back by the driver).
    mode: RefCell<String>,
    /// Redfish requests and IPMI datagrams received.
    pub calls: RefCell<u64>,
    ipmi: RefCell<Responder>,
}

impl Bmc {
    pub fn new(
        net: &Rc<Net>,
        mac: [u8; 6],
        ip: Ipv4Addr,
        prefix: u8,
        machine: Rc<Machine>,
        power: Power,
    ) -> Rc<Self> {
        let host = net.add_host(mac);
        net.set_up(host, true);
        net.configure(host, ip, prefix, None);
        let mode = match machine.firmware {
            crate::firmware::Firmware::BiosPxe => "Legacy",
            _ => "UEFI",
        };
        let username = "admin".to_string();
        let password = format!("sim-{}", machine.index);
        let mut guid = [0x5b; 16];
        guid[..8].copy_from_slice(&(machine.index as u64).to_le_bytes());
        let ipmi = Responder::new(username.as_bytes(), password.as_bytes(), guid)
            .expect("a short user name and password");
        Rc::new(Self {
            host,
            ip,
            username,
            password,
            machine,
            power,
            mode: RefCell::new(mode.into()),
            calls: RefCell::new(0),
            ipmi: RefCell::new(ipmi),
        })
    }

    /// Adds this BMC's IPMI counts to `c`.
    pub fn count_ipmi(&self, c: &mut IpmiCounters) {
        let r = self.ipmi.borrow();
        c.sessions += r.established;
        c.dropped_malformed += r.dropped.malformed;
        c.dropped_unknown_session += r.dropped.unknown_session;
        c.dropped_unauthentic += r.dropped.unauthentic;
    }

    /// Serves IPMI on UDP 623 until the runtime ends. A slow BMC answers the first packet
    /// of each session (the capabilities query) late, so the driver's retries run.
    pub fn serve_ipmi(self: &Rc<Self>, net: &Rc<Net>) {
        let (me, net) = (self.clone(), net.clone());
        tokio::task::spawn_local(async move {
            let sock = match UdpSocket::bind_port(&net, me.host, Some(IPMI_PORT)) {
                Ok(s) => Rc::new(s),
                Err(e) => {
                    tracing::error!(bmc = %me.ip, "cannot bind IPMI: {e}");
                    return;
                }
            };
            let mut buf = vec![0u8; 2048];
            loop {
                let (n, from) = match sock.recv_from(&mut buf, Duration::from_secs(3600)).await {
                    Ok(Some(got)) => got,
                    Ok(None) => continue,
                    Err(_) => return,
                };
                *me.calls.borrow_mut() += 1;
                let datagram = &buf[..n];
                let answer = me
                    .ipmi
                    .borrow_mut()
                    .handle(datagram, &mut MachineChassis(&me));
                let Some(answer) = answer else { continue };
                let first_of_session = datagram.get(4) == Some(&ipmi::AUTH_TYPE_NONE);
                match me.machine.faults.slow_bmc {
                    Some(delay) if first_of_session => {
                        let sock = sock.clone();
                        tokio::task::spawn_local(async move {
                            tokio::time::sleep(delay).await;
                            let _ = sock.send_to(&answer, from);
                        });
                    }
                    _ => {
                        let _ = sock.send_to(&answer, from);
                    }
                }
            }
        });
    }

    /// Serves Redfish until the runtime ends.
    pub fn serve(self: &Rc<Self>, net: &Rc<Net>) {
        for _ in 0..LISTENERS {
            let (me, net) = (self.clone(), net.clone());
            tokio::task::spawn_local(async move {
                loop {
                    let Ok(stream) = TcpStream::accept(&net, me.host, PORT).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let me2 = me.clone();
                    let service = service_fn(move |req| {
                        let me = me2.clone();
                        async move { Ok::<_, Infallible>(me.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        *self.calls.borrow_mut() += 1;
        if let Some(delay) = self.machine.faults.slow_bmc {
            tokio::time::sleep(delay).await;
        }
        if !self.authorised(&req) {
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "bad credentials"}),
            );
        }
        let (parts, body) = req.into_parts();
        let body = match body.collect().await.map(|b| b.to_bytes()) {
            Ok(b) if b.len() <= MAX_BODY => b,
            _ => return reply(StatusCode::BAD_REQUEST, json!({"error": "body"})),
        };
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = parts.uri.path().trim_end_matches('/');
        match (parts.method, path) {
            (Method::GET, "/redfish/v1") => reply(
                StatusCode::OK,
                json!({"@odata.id": "/redfish/v1", "Systems": {"@odata.id": "/redfish/v1/Systems"}}),
            ),
            (Method::GET, "/redfish/v1/Systems") => reply(
                StatusCode::OK,
                json!({"Members": [{"@odata.id": SYSTEM}], "Members@odata.count": 1}),
            ),
            (Method::GET, SYSTEM) => reply(StatusCode::OK, self.system()),
            (Method::PATCH, SYSTEM) => self.patch_boot(&body["Boot"]),
            (Method::POST, RESET) => self.reset(body["ResetType"].as_str().unwrap_or_default()),
            _ => reply(StatusCode::NOT_FOUND, json!({"error": "no such resource"})),
        }
    }

    fn authorised(&self, req: &Request<Incoming>) -> bool {
        let want = format!("{}:{}", self.username, self.password);
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .is_some_and(|got| got == want.as_bytes())
    }

    fn system(&self) -> Value {
        let st = self.machine.state.borrow();
        let (target, enabled) = match st.boot_override() {
            Some((t, false)) => (target_name(t), "Once"),
            Some((t, true)) => (target_name(t), "Continuous"),
            None => ("None", "Disabled"),
        };
        json!({
            "@odata.id": SYSTEM,
            "Id": "1",
            "PowerState": if st.on { "On" } else { "Off" },
            "Boot": {
                "BootSourceOverrideTarget": target,
                "BootSourceOverrideEnabled": enabled,
                "BootSourceOverrideMode": *self.mode.borrow(),
            },
            "Actions": {"#ComputerSystem.Reset": {
                "target": RESET,
                "ResetType@Redfish.AllowableValues":
                    ["On", "ForceOff", "GracefulShutdown", "ForceRestart", "GracefulRestart", "PowerCycle"],
            }},
        })
    }

    fn patch_boot(&self, boot: &Value) -> Response<Full<Bytes>> {
        let target = match boot["BootSourceOverrideTarget"].as_str() {
            Some("Pxe") => Some(BootTarget::Network),
            Some("Hdd") => Some(BootTarget::Disk),
            Some("None") | None => None,
            Some(other) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("target {other}")}),
                );
            }
        };
        let enabled = boot["BootSourceOverrideEnabled"].as_str().unwrap_or("Once");
        if let Some(mode) = boot["BootSourceOverrideMode"].as_str() {
            *self.mode.borrow_mut() = mode.to_string();
        }
        let mut st = self.machine.state.borrow_mut();
        match enabled {
            "Continuous" => st.set_boot_override(target, true),
            "Disabled" => st.set_boot_override(None, true),
            _ => st.set_boot_override(target, false),
        }
        reply(StatusCode::NO_CONTENT, Value::Null)
    }

    fn reset(&self, kind: &str) -> Response<Full<Bytes>> {
        let m = &self.machine;
        match kind {
            "On" => m.set_power(true),
            "ForceOff" | "GracefulShutdown" => m.set_power(false),
            "ForceRestart" | "GracefulRestart" | "PowerCycle" => m.reset(),
            other => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("ResetType {other:?}")}),
                );
            }
        }
        reply(StatusCode::NO_CONTENT, Value::Null)
    }
}

/// The machine as IPMI sees it: power and the boot flags, kept where Redfish keeps them.
struct MachineChassis<'a>(&'a Bmc);

impl Chassis for MachineChassis<'_> {
    fn status(&self) -> ChassisStatus {
        ChassisStatus {
            power_on: self.0.machine.is_on(),
            power_fault: false,
            power_control_fault: false,
        }
    }

    fn control(&mut self, control: ChassisControl) -> bool {
        let m = &self.0.machine;
        match control {
            ChassisControl::PowerUp => m.set_power(true),
            ChassisControl::PowerDown | ChassisControl::SoftShutdown => m.set_power(false),
            // As many BMCs do, a cycle or reset of a machine that is off is refused.
            ChassisControl::PowerCycle | ChassisControl::HardReset if !m.is_on() => return false,
            ChassisControl::PowerCycle | ChassisControl::HardReset => m.reset(),
        }
        true
    }

    fn boot_flags(&self) -> BootFlags {
        let Some((target, persistent)) = self.0.machine.state.borrow().boot_override() else {
            return BootFlags::NONE;
        };
        BootFlags {
            valid: true,
            persistent,
            efi: *self.0.mode.borrow() == "UEFI",
            device: match target {
                BootTarget::Network => ipmi::BOOT_DEVICE_PXE,
                BootTarget::Disk => ipmi::BOOT_DEVICE_DISK,
            },
        }
    }

    fn set_boot_flags(&mut self, flags: BootFlags) {
        let target = match flags.device {
            ipmi::BOOT_DEVICE_PXE if flags.valid => Some(BootTarget::Network),
            ipmi::BOOT_DEVICE_DISK if flags.valid => Some(BootTarget::Disk),
            _ => None,
        };
        *self.0.mode.borrow_mut() = if flags.efi { "UEFI" } else { "Legacy" }.into();
        self.0
            .machine
            .state
            .borrow_mut()
            .set_boot_override(target, flags.persistent);
    }
}

fn target_name(t: BootTarget) -> &'static str {
    match t {
        BootTarget::Network => "Pxe",
        BootTarget::Disk => "Hdd",
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let mut r = Response::new(Full::new(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
