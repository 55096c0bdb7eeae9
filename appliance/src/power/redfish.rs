//! Redfish power driver: finds the ComputerSystem, reads `PowerState`, posts
//! `ComputerSystem.Reset`, and PATCHes the boot source override, then reads it back,
//! because some BMCs answer 200/204 and silently keep (or revert to) something else.
//! sushy-tools' fake driver is one: it stores `Once` as `Continuous`.
//!
//! HTTP is ureq (blocking) on `spawn_blocking`, through `stork_tls`. Plain `http://`
//! works as it always did; an `https://` BMC must be trusted explicitly, by its
//! certificate's SHA-256 (`fingerprint`, pinned: what a BMC's self-signed certificate
//! needs; names are not checked) or by the CAs that issue it (`ca_file`, webpki: the URL's
//! host must be a name the certificate carries). An `https://` URL with neither is refused
//! when the params are read ([`ParamsError::NoTrust`]): Stork never accepts whatever
//! certificate a BMC presents. When the handshake fails on the certificate, nothing was
//! sent (the credentials included) and the error says so ([`RedfishError::Certificate`]).
//!
//! ureq logs at DEBUG only allow-listed headers; its TRACE level prints the wire, including
//! the Authorization header, so never enable `ureq=trace` on a production appliance.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};
use stork_tls::{Fingerprint, Trust};
use thiserror::Error;
use tracing::{debug, warn};

use super::{BootDevice, PowerState, Secret};

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_attempts() -> u32 {
    3
}

/// How to reach one machine's Redfish service. The password is a [`Secret`].
///
/// Checked as a whole when read: an `https://` URL needs exactly one of `fingerprint` and
/// `ca_file`, an `http://` URL neither.
//
// The check is `RedfishParams::check`, run by the `Deserialize` impl below, so a machine
// cannot be stored with params its driver would refuse. `remote = "Self"` turns serde's
// derived code into inherent functions, which the `Serialize`/`Deserialize` impls wrap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RedfishParams {
    /// Service root's scheme, host and port: `http://10.0.0.6:8000` (no path). An
    /// `https://` URL needs `fingerprint` or `ca_file`.
    pub url: String,
    pub username: String,
    #[schema(value_type = String)]
    pub password: Secret,
    /// The ComputerSystem's id (`1`, or a path `/redfish/v1/Systems/1`); default: the
    /// first member of `/redfish/v1/Systems`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// For an `https://` URL: the BMC's certificate, pinned by its SHA-256
    /// (`sha256:<hex>`, openssl's `AB:CD:...` form, or bare hex). Only that certificate is
    /// accepted, whatever names it carries: what a BMC's self-signed certificate needs.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "fingerprint_field"
    )]
    #[schema(value_type = Option<String>)]
    pub fingerprint: Option<Fingerprint>,
    /// For an `https://` URL: a PEM file on the appliance with the CA certificates that
    /// issue the BMC's certificate; the URL's host must be a name (or address) in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ca_file: Option<PathBuf>,
    /// Per request, connection included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Tries per request when the BMC cannot be reached or answers 5xx (GET and PATCH;
    /// a POST only when the connection was never made).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

impl Serialize for RedfishParams {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Self::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for RedfishParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let params = Self::deserialize(d)?;
        params.check().map_err(serde::de::Error::custom)?;
        Ok(params)
    }
}

/// `fingerprint` as its text form; a bad value is an error naming the field.
mod fingerprint_field {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use stork_tls::Fingerprint;

    pub fn serialize<S: Serializer>(f: &Option<Fingerprint>, s: S) -> Result<S::Ok, S::Error> {
        match f {
            Some(f) => s.collect_str(f),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Fingerprint>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| {
                text.parse()
                    .map_err(|e| D::Error::custom(format!("fingerprint: {e}")))
            })
            .transpose()
    }
}

/// Params that no driver could use safely; see [`RedfishParams::check`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("url: {url:?} must start with http:// or https://")]
    Scheme { url: String },
    #[error(
        "url: {url} uses https, so `fingerprint` (the BMC certificate's SHA-256, pinned) or \
         `ca_file` (a PEM file of CA certificates on the appliance) must say which certificate \
         to trust; Stork does not accept whatever certificate a BMC presents"
    )]
    NoTrust { url: String },
    #[error(
        "`fingerprint` and `ca_file` are both set: give one (the BMC's own certificate, or the \
         CAs that issue it)"
    )]
    BothTrusts,
    #[error(
        "`fingerprint` and `ca_file` apply to https:// URLs; with {url} the BMC's identity \
         would not be checked at all"
    )]
    TrustWithoutHttps { url: String },
    #[error("ca_file: empty; give the path of a PEM file on the appliance")]
    EmptyCaFile,
}

impl RedfishParams {
    pub fn new(url: &str, username: &str, password: impl Into<Secret>) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password: password.into(),
            system_id: None,
            fingerprint: None,
            ca_file: None,
            timeout_ms: default_timeout_ms(),
            attempts: default_attempts(),
        }
    }

    /// The URL's scheme, and for `https://` exactly one of `fingerprint` and `ca_file`
    /// (for `http://` neither: set, it would suggest a check that never happens).
    pub fn check(&self) -> Result<(), ParamsError> {
        let url = self.url.trim_end_matches('/').to_string();
        let https = if url.starts_with("https://") {
            true
        } else if url.starts_with("http://") {
            false
        } else {
            return Err(ParamsError::Scheme { url });
        };
        if self
            .ca_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ParamsError::EmptyCaFile);
        }
        match (https, &self.fingerprint, &self.ca_file) {
            (true, None, None) => Err(ParamsError::NoTrust { url }),
            (true, Some(_), Some(_)) => Err(ParamsError::BothTrusts),
            (false, Some(_), _) | (false, _, Some(_)) => {
                Err(ParamsError::TrustWithoutHttps { url })
            }
            _ => Ok(()),
        }
    }
}

/// What an `https://` BMC must present, and how an error names it.
struct Tls {
    trust: Trust,
    /// "the pinned one", "one issued for that host by a CA in /etc/stork/bmc-ca.pem".
    expected: String,
}

#[derive(Debug, Error)]
pub enum RedfishError {
    #[error("Redfish parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("Redfish BMC {url}: {source}")]
    CaFile {
        url: String,
        #[source]
        source: stork_tls::Error,
    },
    /// The TLS handshake failed on the BMC's certificate, so no request was sent: the
    /// credentials never left the appliance.
    #[error(
        "Redfish BMC {url}: its TLS certificate is not {expected} ({why}); nothing was sent to it"
    )]
    Certificate {
        url: String,
        expected: String,
        why: String,
    },
    #[error("Redfish BMC {url} unreachable ({method} {path}, {attempts} attempts): {reason}")]
    Unreachable {
        url: String,
        method: &'static str,
        path: String,
        attempts: u32,
        reason: String,
    },
    #[error(
        "Redfish BMC {url} rejected the credentials of user {user}: {method} {path} answered HTTP {status}: {body}"
    )]
    Credentials {
        url: String,
        user: String,
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("Redfish BMC {url} answered {method} {path} with HTTP {status}: {body}")]
    Status {
        url: String,
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("Redfish BMC {url} sent an unusable answer to {method} {path}: {why}")]
    Answer {
        url: String,
        method: &'static str,
        path: String,
        why: String,
    },
    #[error("Redfish BMC {url} lists no ComputerSystem under /redfish/v1/Systems")]
    NoSystem { url: String },
    #[error("Redfish BMC {url} does not offer ResetType {reset_type} (it allows: {allowed})")]
    ResetTypeUnsupported {
        url: String,
        reset_type: &'static str,
        allowed: String,
    },
    #[error("Redfish BMC {url} accepted the boot override {wanted} but reports {got}")]
    BootReadBack {
        url: String,
        wanted: String,
        got: String,
    },
    #[error("Redfish request task failed: {0}")]
    Task(String),
}

impl RedfishError {
    pub fn is_credentials(&self) -> bool {
        matches!(self, RedfishError::Credentials { .. })
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, RedfishError::Unreachable { .. })
    }

    /// The BMC's certificate is not the trusted one.
    pub fn is_certificate(&self) -> bool {
        matches!(self, RedfishError::Certificate { .. })
    }
}

/// The Redfish power driver for one BMC.
#[derive(Debug, Clone)]
pub struct RedfishDriver {
    params: RedfishParams,
    /// The system's path once found, so each operation does not list the systems again.
    system: Arc<Mutex<Option<String>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Patch,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
        }
    }
}

/// One answer: status, body, and the ETag (some BMCs require it back in `If-Match`).
struct Answer {
    status: u16,
    body: String,
    etag: Option<String>,
}

impl RedfishDriver {
    pub fn new(params: RedfishParams) -> Self {
        Self {
            params,
            system: Arc::new(Mutex::new(None)),
        }
    }

    pub fn params(&self) -> &RedfishParams {
        &self.params
    }

    fn base(&self) -> &str {
        self.params.url.trim_end_matches('/')
    }

    /// One blocking HTTP exchange with retries; runs on the blocking pool.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<String>,
    ) -> Result<Answer, RedfishError> {
        self.params.check()?;
        let base = self.base().to_string();
        let path = path.to_string();
        let auth = basic_auth(&self.params.username, self.params.password.expose());
        let timeout = Duration::from_millis(self.params.timeout_ms.max(1));
        let attempts = self.params.attempts.max(1);
        let fingerprint = self.params.fingerprint;
        let ca_file = self.params.ca_file.clone();
        let task = tokio::task::spawn_blocking(move || {
            // Read here, not at deserialization: a CA file replaced on the appliance is
            // picked up by the next request.
            let tls = tls_for(&base, fingerprint, ca_file)?;
            blocking_request(
                &base,
                tls.as_ref(),
                method,
                &path,
                body,
                if_match,
                &auth,
                timeout,
                attempts,
            )
        });
        task.await.map_err(|e| RedfishError::Task(e.to_string()))?
    }

    /// GET, POST or PATCH that must succeed (2xx); JSON body parsed when present.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<String>,
    ) -> Result<(Value, Option<String>), RedfishError> {
        let a = self.request(method, path, body, if_match).await?;
        let url = self.base().to_string();
        if a.status == 401 || a.status == 403 {
            return Err(RedfishError::Credentials {
                url,
                user: self.params.username.clone(),
                method: method.name(),
                path: path.to_string(),
                status: a.status,
                body: excerpt(&a.body),
            });
        }
        if !(200..300).contains(&a.status) {
            return Err(RedfishError::Status {
                url,
                method: method.name(),
                path: path.to_string(),
                status: a.status,
                body: excerpt(&a.body),
            });
        }
        let v = parse_body(&a.body).map_err(|why| RedfishError::Answer {
            url,
            method: method.name(),
            path: path.to_string(),
            why,
        })?;
        Ok((v, a.etag))
    }

    /// An unusable answer to a GET of `path`.
    fn unusable(&self, path: &str, why: String) -> RedfishError {
        RedfishError::Answer {
            url: self.base().to_string(),
            method: "GET",
            path: path.to_string(),
            why,
        }
    }

    /// The ComputerSystem's path: configured, cached, or the first member listed.
    async fn system_path(&self) -> Result<String, RedfishError> {
        if let Some(id) = &self.params.system_id {
            return Ok(if id.starts_with('/') {
                id.clone()
            } else {
                format!("/redfish/v1/Systems/{id}")
            });
        }
        if let Ok(guard) = self.system.lock()
            && let Some(p) = guard.as_ref()
        {
            return Ok(p.clone());
        }
        let (v, _) = self
            .call(Method::Get, "/redfish/v1/Systems", None, None)
            .await?;
        let member = first_member(&v).ok_or_else(|| RedfishError::NoSystem {
            url: self.base().to_string(),
        })?;
        let path = service_path(self.base(), member).ok_or_else(|| {
            self.unusable(
                "/redfish/v1/Systems",
                format!(
                    "its first member {} is not a path on this service",
                    clip(member)
                ),
            )
        })?;
        debug!(bmc = %self.base(), system = %path, "Redfish system found");
        if let Ok(mut guard) = self.system.lock() {
            *guard = Some(path.clone());
        }
        Ok(path)
    }

    async fn system(&self) -> Result<(String, Value, Option<String>), RedfishError> {
        let path = self.system_path().await?;
        let (v, etag) = self.call(Method::Get, &path, None, None).await?;
        Ok((path, v, etag))
    }

    pub async fn query(&self) -> Result<PowerState, RedfishError> {
        let (path, v, _) = self.system().await?;
        self.power_state_of(&path, &v)
    }

    fn power_state_of(&self, path: &str, v: &Value) -> Result<PowerState, RedfishError> {
        power_state(v)
            .ok_or_else(|| self.unusable(path, "the ComputerSystem has no PowerState".into()))
    }

    /// POSTs `ComputerSystem.Reset` to the target the system advertises, after checking
    /// the BMC lists the reset type.
    async fn reset(
        &self,
        path: &str,
        system: &Value,
        reset_type: &'static str,
    ) -> Result<(), RedfishError> {
        let action = reset_action(path, system);
        let target = service_path(self.base(), &action.target).ok_or_else(|| {
            self.unusable(
                path,
                format!(
                    "its ComputerSystem.Reset target {} is not a path on this service",
                    clip(&action.target)
                ),
            )
        })?;
        if let Some(allowed) = action.allowed
            && !allowed.iter().any(|a| a == reset_type)
        {
            return Err(RedfishError::ResetTypeUnsupported {
                url: self.base().to_string(),
                reset_type,
                allowed: allowed.join(", "),
            });
        }
        self.call(
            Method::Post,
            &target,
            Some(json!({ "ResetType": reset_type })),
            None,
        )
        .await?;
        debug!(bmc = %self.base(), reset_type, "Redfish reset accepted");
        Ok(())
    }

    /// Powers on unless the system already reports On (some BMCs answer 409 otherwise).
    pub async fn power_on(&self) -> Result<(), RedfishError> {
        let (path, v, _) = self.system().await?;
        if self.power_state_of(&path, &v)? == PowerState::On {
            return Ok(());
        }
        self.reset(&path, &v, "On").await
    }

    pub async fn power_off(&self, soft: bool) -> Result<(), RedfishError> {
        let (path, v, _) = self.system().await?;
        if self.power_state_of(&path, &v)? == PowerState::Off {
            return Ok(());
        }
        self.reset(
            &path,
            &v,
            if soft { "GracefulShutdown" } else { "ForceOff" },
        )
        .await
    }

    /// ForceRestart when on; On when off.
    pub async fn power_cycle(&self) -> Result<(), RedfishError> {
        let (path, v, _) = self.system().await?;
        let reset_type = match self.power_state_of(&path, &v)? {
            PowerState::Off => "On",
            _ => "ForceRestart",
        };
        self.reset(&path, &v, reset_type).await
    }

    /// PATCHes `Boot` and reads it back; a BMC that reports anything else than what it
    /// accepted is an error naming both.
    pub async fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        efi: bool,
    ) -> Result<(), RedfishError> {
        let want = BootOverride {
            target: match device {
                BootDevice::Pxe => "Pxe",
                BootDevice::Disk => "Hdd",
            }
            .to_string(),
            enabled: if persistent { "Continuous" } else { "Once" }.to_string(),
            mode: Some(if efi { "UEFI" } else { "Legacy" }.to_string()),
        };
        let (path, _, etag) = self.system().await?;
        let body = json!({ "Boot": {
            "BootSourceOverrideTarget": want.target,
            "BootSourceOverrideEnabled": want.enabled,
            "BootSourceOverrideMode": want.mode,
        }});
        self.call(Method::Patch, &path, Some(body), etag).await?;
        let (_, v, _) = self.system().await?;
        let got = BootOverride::from_system(&v["Boot"]);
        if got.target != want.target || got.enabled != want.enabled {
            return Err(RedfishError::BootReadBack {
                url: self.base().to_string(),
                wanted: want.to_string(),
                got: got.to_string(),
            });
        }
        match &got.mode {
            Some(m) if Some(m) != want.mode.as_ref() => {
                return Err(RedfishError::BootReadBack {
                    url: self.base().to_string(),
                    wanted: want.to_string(),
                    got: got.to_string(),
                });
            }
            None => warn!(bmc = %self.base(), "BMC does not report BootSourceOverrideMode"),
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Reading the BMC's answers
// ---------------------------------------------------------------------------------------
//
// Pure functions over what a BMC sent, apart from the HTTP exchange, so that
// `tests/fuzz_bmc.rs` can drive them with hostile bodies. `Value` indexing yields `Null`
// for anything missing or of the wrong type, and serde_json stops nesting at 128 levels.

/// A 2xx answer's body as JSON; `Null` when the body is empty (a 204, most POSTs).
pub fn parse_body(body: &str) -> Result<Value, String> {
    if body.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(body).map_err(|e| format!("not JSON ({e})"))
}

/// The `@odata.id` of the first member of a collection (`/redfish/v1/Systems`).
pub fn first_member(collection: &Value) -> Option<&str> {
    collection["Members"].as_array()?.first()?["@odata.id"].as_str()
}

/// A ComputerSystem's `PowerState`; `None` when it reports none.
pub fn power_state(system: &Value) -> Option<PowerState> {
    Some(match system["PowerState"].as_str()? {
        "On" => PowerState::On,
        "Off" => PowerState::Off,
        // PoweringOn, PoweringOff, Paused: in transition; ask again later.
        _ => PowerState::Unknown,
    })
}

/// A ComputerSystem's `#ComputerSystem.Reset` action, as the system advertises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetAction {
    /// Where to POST, as the BMC names it (check it with [`service_path`]); the
    /// conventional `<system>/Actions/ComputerSystem.Reset` when the BMC names none.
    pub target: String,
    /// `ResetType@Redfish.AllowableValues`, when the BMC lists them.
    pub allowed: Option<Vec<String>>,
}

/// The reset action of the ComputerSystem at `system_path`.
pub fn reset_action(system_path: &str, system: &Value) -> ResetAction {
    let action = &system["Actions"]["#ComputerSystem.Reset"];
    ResetAction {
        target: action["target"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{system_path}/Actions/ComputerSystem.Reset")),
        allowed: action["ResetType@Redfish.AllowableValues"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            }),
    }
}

/// A path a BMC names (a member's `@odata.id`, an action target), as the path to request
/// on the service at `base`: an absolute path, or an absolute URL on `base` itself. Anything
/// else is refused, because the driver requests `base` followed by the path, with the
/// credentials: `@evil.example/x` would send them to another host.
pub fn service_path(base: &str, named: &str) -> Option<String> {
    let path = named
        .strip_prefix(base.trim_end_matches('/'))
        .filter(|rest| rest.starts_with('/'))
        .unwrap_or(named);
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some(path.to_string())
}

/// At most 100 characters of something a BMC named, for an error message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(100).collect();
    if s.chars().nth(100).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

/// The three boot override properties, as set and as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOverride {
    /// `BootSourceOverrideTarget`, `(absent)` when the BMC reports none.
    pub target: String,
    /// `BootSourceOverrideEnabled`, `(absent)` when the BMC reports none.
    pub enabled: String,
    pub mode: Option<String>,
}

impl BootOverride {
    /// Reads the override from a ComputerSystem's `Boot` object.
    pub fn from_system(boot: &Value) -> Self {
        let s = |k: &str| boot[k].as_str().unwrap_or("(absent)").to_string();
        Self {
            target: s("BootSourceOverrideTarget"),
            enabled: s("BootSourceOverrideEnabled"),
            mode: boot["BootSourceOverrideMode"].as_str().map(str::to_string),
        }
    }
}

impl std::fmt::Display for BootOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BootSourceOverrideTarget={} BootSourceOverrideEnabled={} BootSourceOverrideMode={}",
            self.target,
            self.enabled,
            self.mode.as_deref().unwrap_or("(absent)")
        )
    }
}

/// The message of a Redfish error body (`error.message`, then the first extended info
/// message), else the body's first 300 characters.
pub fn excerpt(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let err = &v["error"];
        let mut parts = Vec::new();
        if let Some(m) = err["message"].as_str() {
            parts.push(m.to_string());
        }
        if let Some(m) = err["@Message.ExtendedInfo"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|i| i["Message"].as_str().or(i["MessageId"].as_str()))
        {
            parts.push(m.to_string());
        }
        if !parts.is_empty() {
            return parts.join(": ");
        }
    }
    let t = body.trim();
    if t.is_empty() {
        return "(empty body)".into();
    }
    let mut s: String = t.chars().take(300).collect();
    if t.chars().count() > 300 {
        s.push('…');
    }
    s
}

/// The trust for an `https://` `base` (checked params: exactly one of the two is set);
/// `None` for `http://`.
fn tls_for(
    base: &str,
    fingerprint: Option<Fingerprint>,
    ca_file: Option<PathBuf>,
) -> Result<Option<Tls>, RedfishError> {
    if !base.starts_with("https://") {
        return Ok(None);
    }
    Ok(match (fingerprint, ca_file) {
        (Some(pin), _) => Some(Tls {
            trust: Trust::Pinned(pin),
            expected: "the pinned one".into(),
        }),
        (None, Some(path)) => Some(Tls {
            trust: Trust::ca_file(&path).map_err(|source| RedfishError::CaFile {
                url: base.to_string(),
                source,
            })?,
            expected: format!("one issued for that host by a CA in {}", path.display()),
        }),
        // `check` refuses this; stork_tls refuses https without a trust all the same.
        (None, None) => None,
    })
}

#[allow(clippy::too_many_arguments)]
fn blocking_request(
    base: &str,
    tls: Option<&Tls>,
    method: Method,
    path: &str,
    body: Option<Value>,
    if_match: Option<String>,
    auth: &str,
    timeout: Duration,
    attempts: u32,
) -> Result<Answer, RedfishError> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // Redfish answers do not redirect; a redirect would drop the credentials.
        .max_redirects(0)
        .build();
    let agent = stork_tls::agent(config, tls.map(|t| t.trust.clone()));
    let url = format!("{base}{path}");
    let mut last = String::new();
    for attempt in 1..=attempts {
        if attempt > 1 {
            debug!(bmc = %base, method = method.name(), path, attempt, "Redfish retry");
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
        }
        let result = match method {
            Method::Get => agent
                .get(&url)
                .header("Authorization", auth)
                .header("Accept", "application/json")
                .call(),
            Method::Post | Method::Patch => {
                let b = body.clone().unwrap_or(Value::Null);
                let mut req = if method == Method::Post {
                    agent.post(&url)
                } else {
                    agent.patch(&url)
                }
                .header("Authorization", auth)
                .header("Accept", "application/json");
                if let Some(tag) = &if_match {
                    req = req.header("If-Match", tag);
                }
                req.send_json(b)
            }
        };
        match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let etag = resp
                    .headers()
                    .get("ETag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let text = resp
                    .body_mut()
                    .with_config()
                    .limit(4 << 20)
                    .read_to_string()
                    .unwrap_or_default();
                if status >= 500 && method != Method::Post && attempt < attempts {
                    last = format!("HTTP {status}");
                    continue;
                }
                return Ok(Answer {
                    status,
                    body: text,
                    etag,
                });
            }
            Err(e) => {
                let never_connected = matches!(
                    e,
                    ureq::Error::ConnectionFailed | ureq::Error::HostNotFound
                ) || matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                last = describe_ureq_error(&e);
                // A refused certificate is not worth another attempt, and says more than
                // the transport error: ask the handshake alone why it failed.
                if let (Some(tls), ureq::Error::Io(io)) = (tls, &e)
                    && io.kind() != io::ErrorKind::ConnectionRefused
                    && let Some(why) = certificate_refusal(base, tls, timeout)
                {
                    return Err(RedfishError::Certificate {
                        url: base.to_string(),
                        expected: tls.expected.clone(),
                        why,
                    });
                }
                if matches!(e, ureq::Error::HostNotFound | ureq::Error::BadUri(_)) {
                    break;
                }
                if method == Method::Post && !never_connected {
                    break;
                }
            }
        }
    }
    Err(RedfishError::Unreachable {
        url: base.to_string(),
        method: method.name(),
        path: path.to_string(),
        attempts,
        reason: last,
    })
}

fn describe_ureq_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Io(io) => format!("{io}"),
        other => other.to_string(),
    }
}

/// Why the BMC at `base` fails the TLS handshake under `tls`, when its certificate is the
/// reason: the handshake alone, with the same verifier as the agent, and nothing sent
/// after it. `None` when it cannot connect, or the handshake fails otherwise or succeeds.
fn certificate_refusal(base: &str, tls: &Tls, timeout: Duration) -> Option<String> {
    use stork_tls::rustls::{self, ClientConnection, pki_types::ServerName};
    let uri: ureq::http::Uri = base.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let mut sock = (host, port)
        .to_socket_addrs()
        .ok()?
        .find_map(|addr| TcpStream::connect_timeout(&addr, timeout).ok())?;
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.set_write_timeout(Some(timeout)).ok()?;
    let name = ServerName::try_from(host.to_string()).ok()?;
    let config = Arc::new(stork_tls::client_config(tls.trust.clone()));
    let mut conn = ClientConnection::new(config, name).ok()?;
    while conn.is_handshaking() {
        let Err(e) = conn.complete_io(&mut sock) else {
            continue;
        };
        let Some(rustls::Error::InvalidCertificate(cert)) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return None;
        };
        let why = match cert {
            // The pinned verifier's own words: which certificate, and which was pinned.
            rustls::CertificateError::Other(other) => other.to_string(),
            other => other.to_string(),
        };
        return Some(match &tls.trust {
            Trust::Pinned(_) => why,
            // Name the certificate, so that it can be checked and pinned instead.
            Trust::Roots(_) => match stork_tls::probe(host, port, timeout) {
                Ok(der) => format!("{why}; it presents {}", Fingerprint::of(&der)),
                Err(_) => why,
            },
        });
    }
    None
}

/// `Basic base64(user:password)` (RFC 7617).
fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_matches_rfc_7617() {
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic_auth("a", "b"), "Basic YTpi");
        assert_eq!(basic_auth("ab", "c"), "Basic YWI6Yw==");
    }

    #[test]
    fn excerpt_prefers_the_redfish_message() {
        let body = r#"{"error":{"code":"Base.1.0.GeneralError","message":"Power state Bogus is not supported","@Message.ExtendedInfo":[{"MessageId":"Base.1.0.GeneralError"}]}}"#;
        assert_eq!(
            excerpt(body),
            "Power state Bogus is not supported: Base.1.0.GeneralError"
        );
        assert_eq!(excerpt(""), "(empty body)");
        assert_eq!(excerpt(&"x".repeat(400)).chars().count(), 301);
    }

    #[test]
    fn service_paths_stay_on_the_service() {
        let base = "http://10.0.0.6:8000";
        assert_eq!(
            service_path(base, "/redfish/v1/Systems/1").as_deref(),
            Some("/redfish/v1/Systems/1")
        );
        assert_eq!(
            service_path(base, "http://10.0.0.6:8000/redfish/v1/Systems/1").as_deref(),
            Some("/redfish/v1/Systems/1")
        );
        // Appended to the base, these name another host (or no path), and the request
        // would carry the credentials there.
        for named in [
            "@evil.example/x",
            "http://10.0.0.6:8000@evil.example/x",
            "http://10.0.0.6:80001/x",
            ".evil.example/x",
            "Systems/1",
            "",
            "/a b",
            "/a\r\nX-Injected: 1",
        ] {
            assert_eq!(service_path(base, named), None, "{named:?}");
        }
        let leaked: ureq::http::Uri = format!("{base}@evil.example/x").parse().unwrap();
        assert_eq!(leaked.host(), Some("evil.example"));
        assert_eq!(clip(&"x".repeat(500)).chars().count(), 103);
    }

    #[test]
    fn answers_of_the_wrong_shape_are_absent_values() {
        assert_eq!(parse_body(" \n"), Ok(Value::Null));
        assert!(parse_body("<html>").unwrap_err().starts_with("not JSON"));
        // serde_json's nesting limit answers, not the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_body(&deep).is_err());
        let odd = json!({ "Members": "none", "PowerState": 7, "Actions": [], "Boot": null });
        assert_eq!(first_member(&odd), None);
        assert_eq!(power_state(&odd), None);
        assert_eq!(
            reset_action("/redfish/v1/Systems/1", &odd),
            ResetAction {
                target: "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset".into(),
                allowed: None,
            }
        );
        assert_eq!(
            BootOverride::from_system(&odd["Boot"]).to_string(),
            "BootSourceOverrideTarget=(absent) BootSourceOverrideEnabled=(absent) \
             BootSourceOverrideMode=(absent)"
        );
        let system = json!({
            "PowerState": "PoweringOn",
            "Actions": { "#ComputerSystem.Reset": {
                "target": "/x",
                "ResetType@Redfish.AllowableValues": ["On", 3, null],
            }},
        });
        assert_eq!(power_state(&system), Some(PowerState::Unknown));
        assert_eq!(
            reset_action("/s", &system).allowed,
            Some(vec!["On".to_string()])
        );
        let systems = json!({ "Members": [{ "@odata.id": "/redfish/v1/Systems/7" }, 1] });
        assert_eq!(first_member(&systems), Some("/redfish/v1/Systems/7"));
    }

    #[test]
    fn params_defaults() {
        let p: RedfishParams = serde_json::from_str(
            r#"{"url":"http://127.0.0.1:8000","username":"u","password":"p"}"#,
        )
        .unwrap();
        assert_eq!(p.timeout_ms, 10_000);
        assert_eq!(p.system_id, None);
        assert_eq!((p.fingerprint, p.ca_file), (None, None));
    }

    #[test]
    fn https_params_must_say_what_to_trust() {
        let read = |fields: &str| {
            serde_json::from_str::<super::super::PowerParams>(&format!(
                r#"{{"driver":"redfish","username":"u","password":"p",{fields}}}"#
            ))
            .map_err(|e| e.to_string())
        };
        let hex = "ab".repeat(32);
        let openssl = vec!["AB"; 32].join(":");
        for fp in [format!("sha256:{hex}"), openssl, hex.clone()] {
            let p = read(&format!(r#""url":"https://10.0.0.6","fingerprint":"{fp}""#)).unwrap();
            let super::super::PowerParams::Redfish(r) = &p else {
                panic!("{p:?}")
            };
            assert_eq!(r.fingerprint, Some(hex.parse().unwrap()));
            // Stored in one form, and read back.
            let v = serde_json::to_value(&p).unwrap();
            assert_eq!(v["fingerprint"], format!("sha256:{hex}"));
            assert_eq!(
                serde_json::from_value::<super::super::PowerParams>(v).unwrap(),
                p
            );
        }
        let p = read(r#""url":"https://bmc.example","ca_file":"/etc/stork/bmc-ca.pem""#).unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap()["ca_file"],
            "/etc/stork/bmc-ca.pem"
        );
        read(r#""url":"http://10.0.0.6:8000""#).unwrap();

        let refused = |fields: &str, says: &[&str]| {
            let e = read(fields).unwrap_err();
            for s in says {
                assert!(e.contains(s), "{fields}: {e}");
            }
            assert!(!e.contains("\"p\""), "{e}");
        };
        refused(
            r#""url":"https://10.0.0.6""#,
            &[
                "url: https://10.0.0.6 uses https, so",
                "`fingerprint`",
                "`ca_file`",
                "does not accept",
            ],
        );
        refused(
            r#""url":"https://10.0.0.6","fingerprint":"sha256:12""#,
            &["fingerprint: \"sha256:12\" is not a SHA-256 fingerprint"],
        );
        refused(
            &format!(r#""url":"https://10.0.0.6","fingerprint":"{hex}","ca_file":"/ca.pem""#),
            &["both set"],
        );
        refused(
            &format!(r#""url":"http://10.0.0.6","fingerprint":"{hex}""#),
            &["apply to https:// URLs"],
        );
        refused(
            r#""url":"https://10.0.0.6","ca_file":"""#,
            &["ca_file: empty"],
        );
        refused(
            r#""url":"ftp://10.0.0.6""#,
            &["must start with http:// or https://"],
        );
        refused(
            &format!(r#""url":"https://10.0.0.6","fingerprint":"{hex}","extra":1"#),
            &["unknown field `extra`"],
        );
    }

    #[tokio::test]
    async fn the_driver_checks_params_made_in_code() {
        // `new` and field assignment skip serde: the driver checks before any request.
        let d = RedfishDriver::new(RedfishParams::new("https://127.0.0.1:9", "u", "p"));
        let e = d.query().await.unwrap_err();
        assert!(
            matches!(e, RedfishError::Params(ParamsError::NoTrust { .. })),
            "{e}"
        );
        let mut p = RedfishParams::new("https://127.0.0.1:9", "u", "p");
        p.ca_file = Some("/nonexistent/ca.pem".into());
        let e = RedfishDriver::new(p).query().await.unwrap_err();
        assert!(
            e.to_string().starts_with(
                "Redfish BMC https://127.0.0.1:9: cannot read CA file /nonexistent/ca.pem"
            ),
            "{e}"
        );
    }
}
