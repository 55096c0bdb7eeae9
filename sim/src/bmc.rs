//! A simulated machine's BMC: a Redfish service (plain HTTP, basic auth) on an address of
//! its own, with the resources Stork's Redfish driver reads and writes: the Systems
//! collection, the ComputerSystem's `PowerState` and boot override, its Reset action.
//! Stork powers the simulated fleet through these exactly as it powers real machines.

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

use crate::machine::{BootTarget, Machine};
use crate::net::{HostId, Net, TcpStream};

pub const PORT: u16 = 80;
const SYSTEM: &str = "/redfish/v1/Systems/1";
const RESET: &str = "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset";
/// Connections served at once: the driver makes one per call.
const LISTENERS: usize = 2;
const MAX_BODY: usize = 16 * 1024;

pub struct Bmc {
    pub host: HostId,
    pub ip: Ipv4Addr,
    pub username: String,
    pub password: String,
    pub machine: Rc<Machine>,
    /// `BootSourceOverrideMode` as last set (read back by the driver).
    mode: RefCell<String>,
    pub calls: RefCell<u64>,
}

impl Bmc {
    pub fn new(
        net: &Rc<Net>,
        mac: [u8; 6],
        ip: Ipv4Addr,
        prefix: u8,
        machine: Rc<Machine>,
    ) -> Rc<Self> {
        let host = net.add_host(mac);
        net.set_up(host, true);
        net.configure(host, ip, prefix, None);
        let mode = match machine.firmware {
            crate::firmware::Firmware::BiosPxe => "Legacy",
            _ => "UEFI",
        };
        Rc::new(Self {
            host,
            ip,
            username: "admin".into(),
            password: format!("sim-{}", machine.index),
            machine,
            mode: RefCell::new(mode.into()),
            calls: RefCell::new(0),
        })
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
        let (target, enabled) = match (st.boot_once, st.persistent_boot) {
            (Some(t), _) => (target_name(t), "Once"),
            (None, Some(t)) => (target_name(t), "Continuous"),
            (None, None) => ("None", "Disabled"),
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
            "Continuous" => {
                st.persistent_boot = target;
                st.boot_once = None;
            }
            "Disabled" => {
                st.persistent_boot = None;
                st.boot_once = None;
            }
            _ => st.boot_once = target,
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
