//! The typed client of the appliance's HTTP API: one method per route, its request and
//! answer the `stork_proto::api` types the appliance serves. The CLI, the tests, the lab and
//! the demo all talk through it, so none builds a JSON body or indexes a JSON value.
//!
//! Blocking (ureq): every caller is a command or a test that waits for the answer anyway.

use std::io::Read;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use stork_proto::api::{
    AllocateBody, AuditQuery, AuditRecord, BootResource, CommissionBody, Constraints, CreatedToken,
    DeployRequest, ErrorBody, EventQuery, EventRecord, HealthReport, Machine, MachineFilter,
    MarkBrokenBody, NamedLayout, NewMachine, NewScript, NewSshKey, NewToken, PowerAnswer, PowerOp,
    ReleaseBody, Script, ScriptResult, SshKey, StatsResponse, TokenRecord, UploadFormat,
    UploadQuery,
};
use stork_proto::{
    AgentEvent, AgentReport, ENLIST_PATH, EnlistRequest, EnlistResponse, HEARTBEAT, Heartbeat,
    Inventory, REPORT_PATH, SCRIPTS, Task, agent_path,
};

/// The API's prefix.
pub const API: &str = "/api/v1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No HTTP answer: refused, reset, timed out.
    #[error("cannot reach the appliance at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The appliance answered with an error status and its `{code, message}`.
    #[error("{status}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// A success whose body is not the type the route documents.
    #[error("unexpected answer from {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// A success, but not the one the route documents.
    #[error("{url} answered {status}, not {expected:?}")]
    UnexpectedStatus {
        url: String,
        status: u16,
        expected: Vec<u16>,
    },
    #[error("the event stream from {url} broke: {reason}")]
    Stream { url: String, reason: String },
}

impl Error {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `code` of an error answer (`bad_request`, `illegal_transition`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The `message` of an error answer.
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::Api { message, .. } => Some(message),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An answer as it came, for the callers that test the API's edges (status codes of
/// malformed requests, non-JSON routes such as the boot scripts).
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub text: String,
}

impl RawResponse {
    /// The `{code, message}` of an error answer, if it is one.
    pub fn error(&self) -> Option<ErrorBody> {
        serde_json::from_str(&self.text).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the appliance at `base` (`http://host:port`), sending `token` as its
    /// bearer token. Each request waits at most a minute. An `https://` base needs
    /// [`Client::with_trust`].
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::with_trust(base, token, None)
    }

    /// As [`Client::new`], trusting `trust` for an `https://` base (a pinned fingerprint
    /// or a CA file, `stork_tls::Trust`).
    pub fn with_trust(base: &str, token: Option<String>, trust: Option<stork_tls::Trust>) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            // A fresh connection per request: the appliance may close a connection after an
            // answer it gave without reading the body (401, 403), and a pooled one would then
            // fail the next request.
            .max_idle_connections(0)
            .build();
        let agent = stork_tls::agent(config, trust);
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// The same appliance with another bearer token (an agent's, another admin's).
    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Self {
            token: Some(token.into()),
            ..self.clone()
        }
    }

    /// The same appliance without a token.
    pub fn anonymous(&self) -> Self {
        Self {
            token: None,
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    // ---- machines ----

    pub fn machines(&self, filter: &MachineFilter) -> Result<Vec<Machine>> {
        self.get(&format!("{API}/machines"), filter)
    }

    /// A machine by id or by any of its MACs.
    pub fn machine(&self, id: &str) -> Result<Machine> {
        self.get(&format!("{API}/machines/{id}"), &())
    }

    pub fn create_machine(&self, m: &NewMachine) -> Result<Machine> {
        self.create(&format!("{API}/machines"), m)
    }

    pub fn delete_machine(&self, id: &str) -> Result<()> {
        self.delete(&format!("{API}/machines/{id}"))
    }

    pub fn commission(&self, id: &str) -> Result<Machine> {
        self.action(id, "commission", None::<&()>)
    }

    /// Commissions with the hardware `tests` besides the scripts.
    pub fn commission_with(&self, id: &str, body: &CommissionBody) -> Result<Machine> {
        self.action(id, "commission", Some(body))
    }

    /// The results of the machine's last commissioning's scripts and tests.
    pub fn machine_scripts(&self, id: &str) -> Result<Vec<ScriptResult>> {
        self.get(&format!("{API}/machines/{id}/scripts"), &())
    }

    // ---- commissioning scripts ----

    pub fn scripts(&self) -> Result<Vec<Script>> {
        self.get(&format!("{API}/scripts"), &())
    }

    pub fn add_script(&self, s: &NewScript) -> Result<Script> {
        self.create(&format!("{API}/scripts"), s)
    }

    pub fn delete_script(&self, name: &str) -> Result<()> {
        self.delete(&format!("{API}/scripts/{name}"))
    }

    // ---- named storage layouts ----

    pub fn layouts(&self) -> Result<Vec<NamedLayout>> {
        self.get(&format!("{API}/layouts"), &())
    }

    pub fn add_layout(&self, l: &NamedLayout) -> Result<NamedLayout> {
        self.create(&format!("{API}/layouts"), l)
    }

    pub fn delete_layout(&self, name: &str) -> Result<()> {
        self.delete(&format!("{API}/layouts/{name}"))
    }

    /// Sets (`Some`) or clears the machine's default layout.
    pub fn set_default_layout(&self, id: &str, layout: Option<&str>) -> Result<Machine> {
        let body = stork_proto::api::DefaultLayout {
            layout: layout.map(str::to_string),
        };
        self.put(&format!("{API}/machines/{id}/layout"), &body)
    }

    /// Sets (`Some`) or clears the machine's minimum kernel.
    pub fn set_min_kernel(&self, id: &str, min: Option<&str>) -> Result<Machine> {
        let body = stork_proto::api::MinKernel {
            min_kernel: min.map(str::to_string),
        };
        self.put(&format!("{API}/machines/{id}/min-kernel"), &body)
    }

    pub fn allocate(&self, id: &str, body: &AllocateBody) -> Result<Machine> {
        self.action(id, "allocate", Some(body))
    }

    pub fn deploy(&self, id: &str, body: &DeployRequest) -> Result<Machine> {
        self.action(id, "deploy", Some(body))
    }

    pub fn release(&self, id: &str, body: &ReleaseBody) -> Result<Machine> {
        self.action(id, "release", Some(body))
    }

    pub fn abort(&self, id: &str) -> Result<Machine> {
        self.action(id, "abort", None::<&()>)
    }

    pub fn mark_broken(&self, id: &str, body: &MarkBrokenBody) -> Result<Machine> {
        self.action(id, "mark-broken", Some(body))
    }

    pub fn mark_fixed(&self, id: &str) -> Result<Machine> {
        self.action(id, "mark-fixed", None::<&()>)
    }

    fn action<B: Serialize + ?Sized>(
        &self,
        id: &str,
        action: &str,
        body: Option<&B>,
    ) -> Result<Machine> {
        self.post(&format!("{API}/machines/{id}/{action}"), body)
    }

    /// The first Ready machine that meets the constraints, allocated.
    pub fn allocate_any(&self, c: &Constraints) -> Result<Machine> {
        self.post(&format!("{API}/machines/allocate"), Some(c))
    }

    /// Direct power control.
    pub fn power(&self, id: &str, op: PowerOp) -> Result<PowerAnswer> {
        self.post(&format!("{API}/machines/{id}/power/{op}"), None::<&()>)
    }

    // ---- events ----

    pub fn machine_events(&self, id: &str, after: i64) -> Result<Vec<EventRecord>> {
        let q = EventQuery {
            after,
            ..Default::default()
        };
        self.get(&format!("{API}/machines/{id}/events"), &q)
    }

    pub fn events(&self, q: &EventQuery) -> Result<Vec<EventRecord>> {
        self.get(&format!("{API}/events"), q)
    }

    /// Follows the live event stream (of one machine, or of all), calling `f` for each event
    /// until it returns false or the stream ends.
    pub fn follow_events(
        &self,
        machine: Option<&str>,
        mut f: impl FnMut(EventRecord) -> bool,
    ) -> Result<()> {
        let url = format!("{}{API}/events/stream", self.base);
        let mut req = self.agent.get(&url);
        if let Some(m) = machine {
            req = req.query("machine", m);
        }
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| unreachable(&url, e))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.into_body().read_to_string().unwrap_or_default();
            return Err(api_error(status, &text));
        }
        // eventsource-stream parses the text/event-stream (fields, the keep-alive comments, an
        // event split across reads). It takes a futures Stream of byte chunks: the blocking
        // body becomes one through `stream::iter`, which is always ready, so each event is
        // taken by a single poll (`now_or_never`) with no executor or runtime. (sse-codec wants
        // an async reader or the old futures_codec; eventsource-client brings hyper and tokio.)
        let mut body = resp.into_body().into_reader();
        let chunks = std::iter::from_fn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match body.read(&mut buf) {
                    Ok(0) => return None,
                    Ok(n) => {
                        buf.truncate(n);
                        return Some(Ok(buf));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(e)),
                }
            }
        });
        let mut events = eventsource_stream::EventStream::new(futures_util::stream::iter(chunks));
        let broke = |reason: String| Error::Stream {
            url: url.clone(),
            reason,
        };
        loop {
            let Some(next) = events.next().now_or_never() else {
                return Err(broke("the parser waited on a blocking reader".into()));
            };
            let Some(event) = next else { break };
            let event = event.map_err(|e| broke(e.to_string()))?;
            let e: EventRecord =
                serde_json::from_str(&event.data).map_err(|source| Error::Decode {
                    url: url.clone(),
                    source,
                })?;
            if !f(e) {
                break;
            }
        }
        Ok(())
    }

    // ---- SSH keys, boot resources, tokens, service ----

    pub fn ssh_keys(&self) -> Result<Vec<SshKey>> {
        self.get(&format!("{API}/ssh-keys"), &())
    }

    pub fn add_ssh_key(&self, key: &NewSshKey) -> Result<SshKey> {
        self.create(&format!("{API}/ssh-keys"), key)
    }

    pub fn delete_ssh_key(&self, id: &str) -> Result<()> {
        self.delete(&format!("{API}/ssh-keys/{id}"))
    }

    pub fn boot_resources(&self) -> Result<Vec<BootResource>> {
        self.get(&format!("{API}/boot-resources"), &())
    }

    pub fn register_boot_resource(&self, r: &BootResource) -> Result<BootResource> {
        self.create(&format!("{API}/boot-resources"), r)
    }

    /// Streams an image (`body`, `format`, whose sha256 is `sha256`, `length` bytes if known) to the appliance,
    /// which checks the sum, converts a qcow2 and registers it as boot resource `name`. No
    /// time limit: a large image takes as long as the network does.
    pub fn upload_image(
        &self,
        name: &str,
        format: UploadFormat,
        sha256: &str,
        body: &mut dyn Read,
        length: Option<u64>,
    ) -> Result<BootResource> {
        let query = query_string(&UploadQuery {
            format,
            sha256: sha256.to_string(),
        });
        let path = format!("{API}/boot-resources/{name}/image{query}");
        let url = format!("{}{path}", self.base);
        let mut r = self
            .agent
            .put(&url)
            .config()
            .timeout_global(None)
            .build()
            .content_type("application/octet-stream")
            // The appliance refuses a bad request (token, name, sum) before the body: the
            // client waits for its go-ahead instead of sending gigabytes into a closed
            // connection.
            .header("Expect", "100-continue");
        if let Some(t) = &self.token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        // Known, the length lets the appliance refuse what will not fit before it starts.
        if let Some(n) = length {
            r = r.header("Content-Length", n.to_string());
        }
        let mut resp = r
            .send(ureq::SendBody::from_reader(body))
            .map_err(|e| unreachable(&url, e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| unreachable(&url, e))?;
        let r = success(RawResponse { status, text })?;
        if r.status != 201 {
            return Err(Error::UnexpectedStatus {
                url,
                status: r.status,
                expected: CREATED.to_vec(),
            });
        }
        self.decode(&path, r)
    }

    pub fn delete_boot_resource(&self, name: &str) -> Result<()> {
        self.delete(&format!("{API}/boot-resources/{name}"))
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.get(&format!("{API}/tokens"), &())
    }

    /// Revokes a token: it is refused from now on.
    pub fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        let path = format!("{API}/tokens/{id}");
        self.decode(&path, self.call(Method::Delete, &path, None::<&()>, OK)?)
    }

    /// The audit log: every change asked through the API, oldest first.
    pub fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        self.get(&format!("{API}/audit"), q)
    }

    pub fn create_token(&self, t: &NewToken) -> Result<CreatedToken> {
        self.create(&format!("{API}/tokens"), t)
    }

    pub fn stats(&self) -> Result<StatsResponse> {
        self.get(&format!("{API}/stats"), &())
    }

    /// The DHCP leases the appliance holds, by address.
    pub fn dhcp_leases(&self) -> Result<Vec<stork_proto::api::DhcpLease>> {
        self.get(&format!("{API}/dhcp/leases"), &())
    }

    pub fn health(&self) -> Result<HealthReport> {
        self.get(&format!("{API}/health"), &())
    }

    /// The OpenAPI document the appliance serves, as JSON text.
    pub fn openapi(&self) -> Result<String> {
        let url = format!("{API}/openapi.json");
        let r = self.raw(Method::Get, &url, None)?;
        success(r).map(|r| r.text)
    }

    // ---- the agent's routes (with the machine's agent token: `with_token`) ----

    pub fn enlist(&self, req: &EnlistRequest) -> Result<EnlistResponse> {
        self.post(ENLIST_PATH, Some(req))
    }

    pub fn report(&self, r: &AgentReport) -> Result<()> {
        self.report_recorded(r).map(drop)
    }

    pub fn agent_task(&self, machine: &str) -> Result<Task> {
        self.get(&agent_path(machine, "task"), &())
    }

    pub fn agent_commissioned(&self, machine: &str, inv: &Inventory) -> Result<EnlistResponse> {
        self.post(&agent_path(machine, "commissioned"), Some(inv))
    }

    pub fn agent_event(&self, machine: &str, e: &AgentEvent) -> Result<()> {
        self.post_no_answer(&agent_path(machine, "events"), Some(e))
    }

    pub fn agent_script_result(&self, machine: &str, r: &ScriptResult) -> Result<()> {
        self.post_no_answer(&agent_path(machine, SCRIPTS), Some(r))
    }

    pub fn agent_heartbeat(&self, machine: &str, h: &Heartbeat) -> Result<()> {
        self.agent_heartbeat_recorded(machine, h).map(drop)
    }

    /// [`Client::agent_heartbeat`], telling whether the beat was recorded (204) or no
    /// heartbeat is expected any more in this status (202: the image is installed, or the
    /// agent said it was leaving).
    pub fn agent_heartbeat_recorded(&self, machine: &str, h: &Heartbeat) -> Result<bool> {
        self.post_recorded(&agent_path(machine, HEARTBEAT), h)
    }

    /// [`Client::report`], telling whether the report was recorded as an event of a known
    /// machine (204) or only logged (202: no machine has that MAC).
    pub fn report_recorded(&self, r: &AgentReport) -> Result<bool> {
        self.post_recorded(REPORT_PATH, r)
    }

    pub fn agent_released(&self, machine: &str) -> Result<()> {
        self.post_no_answer(&agent_path(machine, "released"), None::<&()>)
    }

    pub fn agent_installed(&self, machine: &str) -> Result<()> {
        self.post_no_answer(&agent_path(machine, "installed"), None::<&()>)
    }

    pub fn agent_deployed(&self, machine: &str) -> Result<()> {
        self.post_no_answer(&agent_path(machine, "deployed"), None::<&()>)
    }

    /// The iPXE script a machine booting from `mac` is sent (`GET /ipxe/<mac>`).
    pub fn boot_script(&self, mac: &str) -> Result<String> {
        success(self.raw(Method::Get, &format!("/ipxe/{mac}"), None)?).map(|r| r.text)
    }

    // ---- the transport ----

    /// One request as given (`path` from the root: `/api/v1/...`, `/ipxe/...`), its answer
    /// as it came; `Err` only when there is no HTTP answer. A body is sent as JSON text.
    pub fn raw(&self, method: Method, path: &str, body: Option<&str>) -> Result<RawResponse> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let resp = match method {
            Method::Get | Method::Delete => {
                let mut r = if method == Method::Get {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            Method::Post | Method::Put => {
                let mut r = if method == Method::Post {
                    self.agent.post(&url)
                } else {
                    self.agent.put(&url)
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r.content_type("application/json").send(b),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = resp.map_err(|e| unreachable(&url, e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| unreachable(&url, e))?;
        Ok(RawResponse { status, text })
    }

    fn get<T: DeserializeOwned>(&self, path: &str, query: &impl Serialize) -> Result<T> {
        let path = format!("{path}{}", query_string(query));
        self.decode(&path, self.call(Method::Get, &path, None::<&()>, OK)?)
    }

    /// A POST answered 200 with a body.
    fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        self.decode(path, self.call(Method::Post, path, body, OK)?)
    }

    /// A PUT answered 200 with a body.
    fn put<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.decode(path, self.call(Method::Put, path, Some(body), OK)?)
    }

    /// A POST that creates: 201 with the created thing.
    fn create<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.decode(path, self.call(Method::Post, path, Some(body), CREATED)?)
    }

    fn delete(&self, path: &str) -> Result<()> {
        self.call(Method::Delete, path, None::<&()>, NO_CONTENT)
            .map(drop)
    }

    /// A POST answered 204, no body.
    fn post_no_answer<B: Serialize + ?Sized>(&self, path: &str, body: Option<&B>) -> Result<()> {
        self.call(Method::Post, path, body, NO_CONTENT).map(drop)
    }

    /// A POST the appliance answers 204 (recorded: `true`) or 202 (accepted, not recorded).
    fn post_recorded<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<bool> {
        let r = self.call(Method::Post, path, Some(body), RECORDED_OR_ACCEPTED)?;
        Ok(r.status == 204)
    }

    /// One request whose success must be one of the statuses the route documents: a
    /// different one is an error too, so a route that changes its answer is noticed.
    fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        expect: &[u16],
    ) -> Result<RawResponse> {
        let body = body
            .map(serde_json::to_string)
            .transpose()
            .map_err(|source| Error::Decode {
                url: path.to_string(),
                source,
            })?;
        let r = success(self.raw(method, path, body.as_deref())?)?;
        if !expect.contains(&r.status) {
            return Err(Error::UnexpectedStatus {
                url: format!("{}{path}", self.base),
                status: r.status,
                expected: expect.to_vec(),
            });
        }
        Ok(r)
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, r: RawResponse) -> Result<T> {
        serde_json::from_str(&r.text).map_err(|source| Error::Decode {
            url: format!("{}{path}", self.base),
            source,
        })
    }
}

// The success statuses of the routes.
const OK: &[u16] = &[200];
const CREATED: &[u16] = &[201];
const NO_CONTENT: &[u16] = &[204];
const RECORDED_OR_ACCEPTED: &[u16] = &[204, 202];

/// A query's fields as `?a=1&b=x` (nothing for a query without set fields).
fn query_string(query: &impl Serialize) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(query) else {
        return String::new();
    };
    let pairs: Vec<String> = fields
        .iter()
        .filter_map(|(k, v)| {
            let v = match v {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some(format!("{k}={}", percent_encode(&v)))
        })
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

/// Query values are ids, MACs, statuses and numbers: everything but the unreserved
/// characters is escaped (ureq's `query()` takes only a whole URL's worth of pairs).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn success(r: RawResponse) -> Result<RawResponse> {
    if (200..300).contains(&r.status) {
        Ok(r)
    } else {
        Err(api_error(r.status, &r.text))
    }
}

fn api_error(status: u16, text: &str) -> Error {
    let (code, message) = match serde_json::from_str::<ErrorBody>(text) {
        Ok(e) => (e.code, e.message),
        Err(_) => (String::new(), text.to_string()),
    };
    Error::Api {
        status,
        code,
        message,
    }
}

fn unreachable(url: &str, e: ureq::Error) -> Error {
    Error::Unreachable {
        url: url.to_string(),
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_sends_only_its_set_fields_escaped() {
        let q = EventQuery {
            after: 7,
            machine: Some("52:54:00:00:00:01".into()),
            limit: None,
        };
        assert_eq!(
            query_string(&q),
            "?after=7&machine=52%3A54%3A00%3A00%3A00%3A01"
        );
        assert_eq!(query_string(&MachineFilter::default()), "");
        assert_eq!(query_string(&()), "");
    }

    #[test]
    fn an_error_answer_keeps_its_code_and_message() {
        let e = api_error(409, r#"{"code":"illegal_transition","message":"cannot"}"#);
        assert_eq!(e.status(), Some(409));
        assert_eq!(e.code(), Some("illegal_transition"));
        assert_eq!(e.message(), Some("cannot"));
        let e = api_error(502, "Bad Gateway");
        assert_eq!((e.code(), e.message()), (Some(""), Some("Bad Gateway")));
    }
}
