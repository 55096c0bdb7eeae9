//! The REST API under `/api/v1`. Every change needs an admin bearer token; agent endpoints
//! need the machine's current agent token; enlistment and boot paths need none. Errors are
//! JSON `{code, message}`; an illegal transition is 409.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use stork_proto::inventory::choose_disk;
use stork_proto::layout;
use stork_proto::{
    AgentEvent, AgentReport, EnlistRequest, EnlistResponse, Heartbeat, Inventory, StepState, Task,
};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Admin, Agent, Operator, Reader, Unauthenticated};
use super::openapi::{
    ActionAnswers, AgentMachineId, BadRequest, Forbidden, IllegalTransition, MachineId, NotFound,
    Unauthorized,
};
use crate::lifecycle::boot::{AgentWork, agent_work};
use crate::lifecycle::records::new_id;
use crate::lifecycle::{Command, ControlError, Status};
use crate::store::{
    BootResource, DeployRequest, DeployTarget, EventRecord, Machine, MachineQuery, PowerConfig,
    SshKey, StoreError, TokenRecord, now_ms,
};
use stork_proto::api::{
    AllocateBody, AuditQuery, AuditRecord, CommissionBody, Constraints, CreatedToken,
    DefaultLayout, ErrorBody, EventQuery, HealthReport, MachineFilter, MarkBrokenBody, MinKernel,
    NamedLayout, NewMachine, NewScript, NewSshKey, NewToken, NoFields, PowerAnswer, PowerOp,
    PowerState, ReleaseBody, Script, ScriptResult, StatsResponse, UploadFormat, UploadQuery,
};

pub fn routes() -> Router<AppState> {
    documented_routes().split_for_parts().0
}

/// Every route with its documentation: `routes!` takes the path and method from each
/// handler's `#[utoipa::path]`, so a route cannot be added undocumented.
pub(super) fn documented_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_machines, create_machine))
        .routes(routes!(allocate_any))
        .routes(routes!(show_machine, delete_machine))
        .routes(routes!(machine_events))
        .routes(routes!(commission))
        .routes(routes!(allocate))
        .routes(routes!(deploy))
        .routes(routes!(release))
        .routes(routes!(abort))
        .routes(routes!(mark_broken))
        .routes(routes!(mark_fixed))
        // The JSON 404 for an unknown action: not an endpoint, so not documented.
        .route("/machines/{id}/{action}", post(no_such_action))
        .routes(routes!(power_op))
        .routes(routes!(list_events))
        .routes(routes!(stream_events))
        .routes(routes!(list_ssh_keys, add_ssh_key))
        .routes(routes!(delete_ssh_key))
        .routes(routes!(list_boot_resources, register_boot_resource))
        .routes(routes!(upload_image))
        .routes(routes!(delete_boot_resource))
        .routes(routes!(list_scripts, add_script))
        .routes(routes!(delete_script))
        .routes(routes!(machine_scripts))
        .routes(routes!(list_layouts, add_layout))
        .routes(routes!(delete_layout))
        .routes(routes!(set_machine_layout))
        .routes(routes!(set_machine_min_kernel))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(audit_log))
        .routes(routes!(stats))
        .routes(routes!(dhcp_leases))
        .routes(routes!(health))
        .routes(routes!(openapi))
        .routes(routes!(enlist))
        .routes(routes!(report))
        .routes(routes!(agent_task))
        .routes(routes!(agent_commissioned))
        .routes(routes!(agent_post_event))
        .routes(routes!(agent_heartbeat))
        .routes(routes!(agent_script_result))
        .routes(routes!(agent_released))
        .routes(routes!(agent_installed))
        .routes(routes!(agent_deployed))
}

/// A delete's answer: 204 if there was such a thing, else 404 saying `missing`.
fn deleted(found: bool, missing: String) -> ApiResult<StatusCode> {
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", missing))
    }
}

/// Every error answer: a status code and the JSON [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// The same error, its message saying where it came from: "<message> (in <what>)".
    fn context(mut self, what: &str) -> Self {
        self.message = format!("{} (in {what})", self.message);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // serde's message names the field ("unknown field `x`", "missing field `y`").
        ApiError::bad_request(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StoreError::AddressTaken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "address_taken", e.to_string())
            }
            StoreError::Conflict { .. } | StoreError::MacTaken(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::DiskFull { .. } => {
                tracing::error!(error = %e, "new records refused");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    e.to_string(),
                )
            }
            other => {
                tracing::error!(error = ?other, "store failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "storage failure",
                )
            }
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Store(s) => s.into(),
            ControlError::Rejected(r) => {
                ApiError::new(StatusCode::CONFLICT, "illegal_transition", r.to_string())
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---- machines ----

#[utoipa::path(
    get,
    path = "/machines",
    operation_id = "list_machines",
    tag = "machines",
    summary = "List machines",
    description = "Every machine, oldest first; unknown query parameters are a 400. A deploy's user-data is left out (it may hold secrets): `GET /machines/{id}` shows it.",
    params(
        ("status" = Option<Status>, Query),
        ("tag" = Option<String>, Query),
        ("power" = Option<PowerState>, Query, description = "The power state last seen; `unknown` includes never seen."),
        ("q" = Option<String>, Query, description = "Part of a hostname, MAC address or id."),
        ("sort" = Option<String>, Query, description = "created (default), hostname, status, id, updated or power."),
        ("order" = Option<String>, Query, description = "asc (default) or desc."),
        ("offset" = Option<u64>, Query, description = "Skip this many (paging)."),
        ("limit" = Option<u64>, Query, description = "At most this many (default all)."),
        ("view" = Option<String>, Query, description = "full (default): every machine whole; summary: `MachineSummary` items, no inventory or power parameters (the cheap one for paging a large fleet).")
    ),
    responses(
        (status = 200, description = "OK; header `x-total-count` counts every machine the filter selects, whatever the page. The items are `Machine`s, or `MachineSummary`s with `view=summary`.", body = MachineList),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_machines(
    State(s): State<AppState>,
    _: Reader,
    q: Result<Query<MachineFilter>, QueryRejection>,
) -> ApiResult<([(&'static str, String); 1], Json<MachineList>)> {
    let Query(f) = q?;
    let query = MachineQuery::from_filter(&f).map_err(ApiError::bad_request)?;
    let (total, list) = if query.summary {
        let (total, page) = s.controller.machine_summaries(query).await?;
        (total, MachineList::Summaries(page))
    } else {
        let (total, page) = s.controller.machine_page(query).await?;
        (
            total,
            MachineList::Full(page.iter().map(Machine::listed).collect()),
        )
    };
    Ok(([("x-total-count", total.to_string())], Json(list)))
}

/// `GET /machines`: whole machines, or summaries with `view=summary`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum MachineList {
    Full(Vec<Machine>),
    Summaries(Vec<stork_proto::api::MachineSummary>),
}

const POWER_DRIVERS: &[&str] = &["manual", "ipmi", "redfish", "qmp"];

/// A 400 naming `field` when `text` holds a control character.
fn refuse_control(field: &str, text: &str) -> ApiResult<()> {
    if text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{field}: control characters are not allowed"
        )));
    }
    Ok(())
}

/// [`refuse_control`] for every key and string in `value`, each named by its path.
fn refuse_control_in(field: &str, value: &serde_json::Value) -> ApiResult<()> {
    match value {
        serde_json::Value::String(text) => refuse_control(field, text),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| refuse_control_in(&format!("{field}[{i}]"), v)),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            let path = format!("{field}.{k}");
            refuse_control(&path, k)?;
            refuse_control_in(&path, v)
        }),
        _ => Ok(()),
    }
}

#[utoipa::path(
    post,
    path = "/machines",
    operation_id = "create_machine",
    tag = "machines",
    summary = "Add a machine by hand",
    request_body(content = NewMachine),
    responses(
        (status = 201, description = "Created, New.", body = Machine),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, description = "A MAC address belongs to another machine (`conflict`).", body = ErrorBody)
    )
)]
async fn create_machine(
    State(s): State<AppState>,
    caller: Operator,
    body: Result<Json<NewMachine>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Machine>)> {
    let Json(req) = body?;
    if req.macs.is_empty() {
        return Err(ApiError::bad_request(
            "macs: at least one MAC address is needed",
        ));
    }
    let power = req.power.unwrap_or_else(PowerConfig::manual);
    if !POWER_DRIVERS.contains(&power.driver.as_str()) {
        return Err(ApiError::bad_request(format!(
            "power.driver: {:?} is not one of {POWER_DRIVERS:?}",
            power.driver
        )));
    }
    // Stored as JSON text: PostgreSQL's `jsonb`, which lists and filters read them through,
    // refuses a `\u0000`, and no host name, tag or BMC parameter has a control character.
    if let Some(name) = &req.hostname {
        refuse_control("hostname", name)?;
    }
    for (i, tag) in req.tags.iter().enumerate() {
        refuse_control(&format!("tags[{i}]"), tag)?;
    }
    refuse_control_in(
        "power.params",
        &serde_json::Value::Object(power.params.clone()),
    )?;
    let mut probe = Machine::new(String::new(), vec![], 0);
    probe.power = power.clone();
    crate::lifecycle::controller::power_params(&probe)
        .map_err(|e| ApiError::bad_request(format!("power.params: {e}")))?;
    let now = now_ms();
    let mut m = Machine::new(new_id(), req.macs, now);
    m.hostname = req.hostname;
    m.arch = req.arch.unwrap_or_else(|| "amd64".into());
    m.power = power;
    m.tags = req.tags;
    if let Some(site) = &req.site {
        crate::config::check_site(site)
            .map_err(|why| ApiError::bad_request(format!("site: {why}")))?;
    }
    m.site = req.site.or_else(|| s.controller.site().map(str::to_string));
    let saved = s.controller.create_machine(m, &caller.actor).await?;
    s.signed.note(&saved);
    Ok((StatusCode::CREATED, Json(saved.redacted())))
}

#[utoipa::path(
    get,
    path = "/machines/{id}",
    operation_id = "show_machine",
    tag = "machines",
    summary = "Show a machine",
    params(MachineId),
    responses(
        (status = 200, description = "OK", body = Machine),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn show_machine(
    State(s): State<AppState>,
    _: Reader,
    Path(id): Path<String>,
) -> ApiResult<Json<Machine>> {
    Ok(Json(s.controller.machine(&id).await?.redacted()))
}

#[utoipa::path(
    delete,
    path = "/machines/{id}",
    operation_id = "delete_machine",
    tag = "machines",
    summary = "Delete a machine",
    params(MachineId),
    responses(
        (status = 204, description = "Deleted; its events stay in the history."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn delete_machine(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.controller.delete_machine(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Parses an action's body; an empty body (or `null`) is the action's default. axum's
/// parser names the field at fault (`erase: invalid type ...`), and its rejection becomes
/// our JSON 400.
fn action_body<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> ApiResult<T> {
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    let Json(v) = Json::<T>::from_bytes(bytes)?;
    Ok(v)
}

/// One lifecycle action's request: the admin caller, the machine it names, its body.
struct ActionCall {
    state: AppState,
    actor: String,
    id: String,
    body: Bytes,
    /// `?dry_run=true`: check the request, change nothing (deploy only).
    dry_run: bool,
}

impl axum::extract::FromRequest<AppState> for ActionCall {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, ApiError> {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = req.into_parts();
        let caller = Operator::from_request_parts(&mut parts, state).await?;
        let Path(id) = Path::<String>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let body = axum::body::to_bytes(body, MAX_ACTION_BODY)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("body: {e}"),
                )
            })?;
        let dry_run = parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "dry_run=true"));
        Ok(Self {
            state: state.clone(),
            actor: caller.actor,
            id,
            body,
            dry_run,
        })
    }
}

/// Action bodies are a few fields (a deploy's user-data is the largest).
const MAX_ACTION_BODY: usize = 2 << 20;

impl ActionCall {
    /// The body as the action's fields (an empty body is the action's default).
    fn fields<T: serde::de::DeserializeOwned + Default>(&self) -> ApiResult<T> {
        action_body(&self.body)
    }

    async fn run(&self, command: Command) -> ApiResult<Json<Machine>> {
        let m = self
            .state
            .controller
            .apply(&self.id, command, &self.actor)
            .await?;
        Ok(Json(m.redacted()))
    }
}

#[utoipa::path(
    post,
    path = "/machines/{id}/commission",
    operation_id = "commission_machine",
    tag = "machines",
    summary = "Commission: run the agent to take the inventory",
    description = "New, Ready or Failed commissioning -> Commissioning; powers the machine on into the agent (manual power: records that a person must), which runs every commissioning script (`/scripts`) and the hardware tests asked for, then takes the inventory. The last commissioning's script results are cleared. Lifecycle event `Commission`.",
    params(MachineId),
    request_body(content = Option<CommissionBody>),
    responses(ActionAnswers)
)]
async fn commission(a: ActionCall) -> ApiResult<Json<Machine>> {
    let body: CommissionBody = a.fields()?;
    let tests = crate::commissioning::check_tests(&body.tests).map_err(ApiError::bad_request)?;
    let m = a.run(Command::Commission { tests }).await?;
    // The last commissioning's results go with it.
    a.state.controller.clear_script_results(&m.id).await?;
    Ok(m)
}

#[utoipa::path(
    post,
    path = "/machines/{id}/allocate",
    operation_id = "allocate_machine",
    tag = "machines",
    summary = "Allocate this machine",
    description = "Ready -> Allocated. Lifecycle event `Allocate`.",
    params(MachineId),
    request_body(content = Option<AllocateBody>),
    responses(ActionAnswers)
)]
async fn allocate(a: ActionCall) -> ApiResult<Json<Machine>> {
    let body: AllocateBody = a.fields()?;
    let owner = body.owner.unwrap_or_else(|| a.actor.clone());
    a.run(Command::Allocate { owner }).await
}

#[utoipa::path(
    post,
    path = "/machines/{id}/deploy",
    operation_id = "deploy_machine",
    tag = "machines",
    summary = "Deploy an image",
    description = "Allocated or Failed deployment -> Deploying; the image must be a registered `os` boot resource. A disk deploy streams the image's raw disk image (role `raw`) and grows its root; with a `layout`, or when the image has no raw file, the agent partitions the disk itself (BIOS boot 1 MiB, ESP, root), makes the file systems and extracts the image's root tar (role `tar`). Lifecycle event `Deploy`.",
    params(
        MachineId,
        ("dry_run" = Option<bool>, Query, description = "`true`: check the request (fields, image, layout) and change nothing; the answer is the machine as it is.")
    ),
    request_body(content = DeployRequest),
    responses(ActionAnswers)
)]
async fn deploy(a: ActionCall) -> ApiResult<Json<Machine>> {
    // No default here: `image` is required.
    if a.body.trim_ascii().is_empty() {
        return Err(ApiError::bad_request("missing field `image`"));
    }
    let Json(mut req) = Json::<DeployRequest>::from_bytes(&a.body)?;
    req.check_fields().map_err(ApiError::bad_request)?;
    let known = a.state.controller.boot_resource(&req.image).await?;
    let Some(resource) = known.filter(|r| r.kind == "os") else {
        return Err(ApiError::bad_request(format!(
            "image: no OS boot resource named {:?}",
            req.image
        )));
    };
    let m = a.state.controller.machine(&a.id).await?;
    let default = default_layout(&a.state, &mut req, &m).await?;
    check_disk(&req, &m)?;
    check_kernel(&req, &resource, &m)?;
    check_layout(&req, &resource, &m).map_err(|e| match &default {
        Some(name) => e.context(&format!("the machine's default layout {name:?}")),
        None => e,
    })?;
    let held_now = || async {
        match &req.network {
            Some(_) => a.state.controller.static_addresses(m.site.as_deref()).await,
            None => Ok(Vec::new()),
        }
    };
    let mut held = held_now().await?;
    check_network(&req, &m, &a.state.cfg.dhcp, &held)?;
    // An `auto` address is the lowest of the static range no machine holds. Two deploys
    // picking the same one at once: the store's key refuses the second, which picks again.
    let auto = req
        .network
        .as_ref()
        .is_some_and(|n| !n.auto_addresses().is_empty());
    let mut tries = 0;
    loop {
        let mut req = req.clone();
        allocate_addresses(&a.state.cfg.dhcp, &held, &m.id, &mut req)?;
        if a.dry_run {
            // The web UI checks a form this way before it allocates a Ready machine; an
            // `auto` that would find no address is refused here too.
            return Ok(Json(m.redacted()));
        }
        match a.run(Command::Deploy(req)).await {
            Err(e) if e.code == "address_taken" && auto && tries < 3 => {
                tries += 1;
                held = held_now().await?;
            }
            other => return other,
        }
    }
}

/// A deploy to disk that gives no layout gets the machine's default one, if it has one:
/// returns its name.
async fn default_layout(
    s: &AppState,
    req: &mut DeployRequest,
    m: &Machine,
) -> ApiResult<Option<String>> {
    let Some(name) = m.default_layout.as_ref() else {
        return Ok(None);
    };
    if req.layout.is_some() || req.target != DeployTarget::Disk {
        return Ok(None);
    }
    let Some(named) = s.controller.layout(name).await? else {
        return Err(ApiError::bad_request(format!(
            "layout: the machine's default layout {name:?} no longer exists"
        )));
    };
    req.layout = Some(named.layout);
    Ok(Some(name.clone()))
}

/// Puts an address from `dhcp.static_range` in place of each `auto` of the request's
/// network config: the lowest one that no machine holds, no DHCP reservation names, and
/// the request does not give another interface.
fn allocate_addresses(
    dhcp: &crate::dhcp::config::DhcpConfig,
    held: &[(std::net::IpAddr, String)],
    machine: &str,
    req: &mut DeployRequest,
) -> ApiResult<()> {
    let Some(net) = req.network.as_mut() else {
        return Ok(());
    };
    let mut taken: std::collections::HashSet<std::net::IpAddr> = held
        .iter()
        .filter(|(_, m)| m != machine)
        .map(|(ip, _)| *ip)
        .collect();
    taken.extend(net.static_addresses().into_iter().map(|(_, ip)| ip));
    taken.extend(dhcp.subnets.iter().flat_map(|s| {
        s.reservations
            .iter()
            .map(|(_, ip)| std::net::IpAddr::V4(*ip))
    }));
    for (field, i, k) in net.auto_addresses() {
        let Some((first, last)) = dhcp.static_range else {
            return Err(ApiError::bad_request(format!(
                "network.{field}: \"auto\" takes an address from the appliance's \
                 dhcp.static_range, which is not set"
            )));
        };
        let free = (u32::from(first)..=u32::from(last))
            .map(|n| std::net::IpAddr::V4(n.into()))
            .find(|ip| !taken.contains(ip));
        let Some(ip) = free else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "address_taken",
                format!(
                    "network.{field}: every address of dhcp.static_range ({first} to {last}) \
                     is held by a machine"
                ),
            ));
        };
        taken.insert(ip);
        net.interfaces[i].addresses[k] = format!("{ip}/{}", dhcp.local().net.prefix_len);
        tracing::info!(machine, %ip, field = %format!("network.{field}"), "static address picked");
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/machines/{id}/release",
    operation_id = "release_machine",
    tag = "machines",
    summary = "Release the machine",
    description = "Allocated, Deployed, Failed deployment or Failed releasing -> Disk erasing -> Ready once the agent erased the disks (lifecycle event `ReleaseErase`), or with `erase: false` -> Releasing -> Ready (power off, event `Release`). Fields left out take the appliance's `lifecycle.erase_on_release` (default true) and `lifecycle.erase_quick` (default false: a full erase, by NVMe Format NVM where the disk has it, else zeroing, checked by reading back samples). A failed erase or read-back ends in Failed releasing with the reason.",
    params(MachineId),
    request_body(content = Option<ReleaseBody>),
    responses(ActionAnswers)
)]
async fn release(a: ActionCall) -> ApiResult<Json<Machine>> {
    let body: ReleaseBody = a.fields()?;
    let cfg = &a.state.cfg;
    let (erase, quick) = (
        body.erase.unwrap_or(cfg.erase_on_release),
        body.quick.unwrap_or(cfg.erase_quick),
    );
    a.run(Command::Release { erase, quick }).await
}

#[utoipa::path(
    post,
    path = "/machines/{id}/abort",
    operation_id = "abort_machine",
    tag = "machines",
    summary = "Abort the running operation",
    description = "Commissioning, Deploying, Releasing or Disk erasing -> its failed status. Lifecycle event `Abort`.",
    params(MachineId),
    request_body(content = Option<NoFields>),
    responses(ActionAnswers)
)]
async fn abort(a: ActionCall) -> ApiResult<Json<Machine>> {
    a.fields::<NoFields>()?;
    a.run(Command::Abort).await
}

#[utoipa::path(
    post,
    path = "/machines/{id}/mark-broken",
    operation_id = "mark_broken_machine",
    tag = "machines",
    summary = "Mark broken",
    description = "Any status but Broken -> Broken; powers off. Lifecycle event `MarkBroken`.",
    params(MachineId),
    request_body(content = Option<MarkBrokenBody>),
    responses(ActionAnswers)
)]
async fn mark_broken(a: ActionCall) -> ApiResult<Json<Machine>> {
    let body: MarkBrokenBody = a.fields()?;
    let reason = body.reason.unwrap_or_else(|| "marked broken".into());
    a.run(Command::MarkBroken { reason }).await
}

#[utoipa::path(
    post,
    path = "/machines/{id}/mark-fixed",
    operation_id = "mark_fixed_machine",
    tag = "machines",
    summary = "Mark fixed",
    description = "Broken -> Ready if commissioned, else New. Lifecycle event `MarkFixed`.",
    params(MachineId),
    request_body(content = Option<NoFields>),
    responses(ActionAnswers)
)]
async fn mark_fixed(a: ActionCall) -> ApiResult<Json<Machine>> {
    a.fields::<NoFields>()?;
    a.run(Command::MarkFixed).await
}

/// Any other `POST /machines/{id}/{name}`: a JSON 404 naming it, after the token check.
async fn no_such_action(
    _: Operator,
    Path((_, action)): Path<(String, String)>,
) -> ApiResult<Json<Machine>> {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no machine action {action:?}"),
    ))
}

/// The disk a deploy names must be one disk of the machine's last inventory (by kernel name,
/// serial, WWN, model or path: `inventory::choose_disk`, as the agent will choose), so a
/// typo is refused now, not after a power-on and a boot. Without an inventory (never
/// commissioned) the agent decides alone; a deploy to memory uses no disk.
fn check_disk(req: &DeployRequest, m: &Machine) -> ApiResult<()> {
    let (Some(disk), Some(inv)) = (req.disk.as_deref(), m.inventory.as_ref()) else {
        return Ok(());
    };
    if req.target == DeployTarget::Memory {
        return Ok(());
    }
    choose_disk(&inv.disks, Some(disk), None)
        .map(|_| ())
        .map_err(|e| ApiError::bad_request(format!("disk: {e}")))
}

/// A kernel is one of the image's, and only for a disk deploy: a deploy to memory runs the
/// image's root under the agent's kernel.
fn check_kernel(req: &DeployRequest, resource: &BootResource, m: &Machine) -> ApiResult<()> {
    if req.target == DeployTarget::Memory {
        return match req.kernel {
            Some(_) => Err(ApiError::bad_request(
                "kernel: a deploy to memory runs under the agent's kernel; drop kernel or deploy to disk",
            )),
            None => Ok(()),
        };
    }
    stork_proto::kernel::choose(
        &req.image,
        &resource.kernels,
        req.kernel.as_deref(),
        m.min_kernel.as_deref(),
    )
    .map(|_| ())
    .map_err(|e| ApiError::bad_request(format!("kernel: {e}")))
}

/// A layout is for a disk deploy, valid by itself, of an image the agent can install by
/// extraction (it partitions by the layout, so it cannot stream the raw image), and fits the
/// disks of the machine's last inventory: each named disk is there, once, and the sizes add
/// up, so a mistake is named now and not after a power-on and a boot.
fn check_layout(req: &DeployRequest, resource: &BootResource, m: &Machine) -> ApiResult<()> {
    let Some(layout) = &req.layout else {
        return Ok(());
    };
    if req.target == DeployTarget::Memory {
        return Err(ApiError::bad_request(
            "layout: a deploy to memory touches no disk; drop the layout or deploy to disk",
        ));
    }
    layout
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Some(tar) = resource
        .files
        .iter()
        .find(|f| f.role == stork_proto::ImageRole::Tar)
    else {
        return Err(ApiError::bad_request(format!(
            "layout: image {:?} has no root tar (a file of role `tar`) to install with a layout",
            resource.name
        )));
    };
    if !layout.disks.is_empty() && req.disk.is_some() {
        return Err(ApiError::bad_request(
            "disk: the layout names its disks (layout.disks); drop `disk`",
        ));
    }
    let Some(inv) = m.inventory.as_ref() else {
        // Never commissioned: the agent checks against the disks it finds.
        return Ok(());
    };
    layout
        .pick_disks(
            &inv.disks,
            req.disk.as_deref(),
            layout::root_floor_mib(tar.size),
        )
        .map(drop)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// What the appliance's DHCP already does with `ip`, if anything: a static address there
/// would be two hosts' at once (and the agent token, which works from a deploy's static
/// addresses, would work from the other host's).
fn dhcp_claims(
    dhcp: &crate::dhcp::config::DhcpConfig,
    ip: std::net::Ipv4Addr,
    macs: &[stork_proto::MacAddr],
) -> Option<String> {
    for s in &dhcp.subnets {
        if s.ranges.iter().any(|(a, b)| (*a..=*b).contains(&ip)) {
            return Some(format!("in {}'s dynamic range", s.name));
        }
        if s.router == Some(ip) {
            return Some(format!("{}'s router", s.name));
        }
        if let Some((mac, _)) = s
            .reservations
            .iter()
            .find(|(mac, r)| *r == ip && !macs.contains(mac))
        {
            return Some(format!("reserved for {mac} in {}", s.name));
        }
    }
    (ip == dhcp.local().net.addr).then(|| "the appliance's own address".to_string())
}

/// A network config is valid by itself and its NICs are the machine's (enlisted MACs or the
/// last inventory's), so a typo in a MAC is named now and not after the OS boots unreachable.
fn check_network(
    req: &DeployRequest,
    m: &Machine,
    dhcp: &crate::dhcp::config::DhcpConfig,
    held: &[(std::net::IpAddr, String)],
) -> ApiResult<()> {
    let Some(net) = &req.network else {
        return Ok(());
    };
    net.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    for (field, ip) in net.static_addresses() {
        if let std::net::IpAddr::V4(v4) = ip
            && let Some(why) = dhcp_claims(dhcp, v4, &m.macs)
        {
            return Err(ApiError::bad_request(format!(
                "network.{field}: {ip} is {why}"
            )));
        }
        if let Some((_, holder)) = held.iter().find(|(h, id)| *h == ip && *id != m.id) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "address_taken",
                format!(
                    "network.{field}: {ip} is machine {holder}'s (its deploy's network config)"
                ),
            ));
        }
    }
    let mut known: Vec<stork_proto::MacAddr> = m.macs.clone();
    if let Some(inv) = &m.inventory {
        known.extend(inv.nics.iter().map(|n| n.mac));
    }
    for (field, mac) in net.macs() {
        if !known.contains(&mac) {
            known.sort();
            known.dedup();
            let list: Vec<String> = known.iter().map(|m| m.to_string()).collect();
            return Err(ApiError::bad_request(format!(
                "network.{field}: {mac} is not a NIC of this machine (its NICs: {})",
                list.join(", ")
            )));
        }
    }
    Ok(())
}

/// Direct power control: `on`, `off`, `soft-off`, `cycle`, `query`. Recorded as events;
/// the lifecycle status does not change.
#[utoipa::path(
    post,
    path = "/machines/{id}/power/{op}",
    operation_id = "power_op",
    tag = "machines",
    summary = "Direct power control",
    description = "Recorded as an event; the lifecycle status does not change.",
    params(
        ("id" = String, Path, description = "Machine id, or any of its MAC addresses."),
        ("op" = PowerOp, Path)
    ),
    responses(
        (status = 200, description = "Done; the power state after it (or found by `query`).", body = PowerAnswer),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 502, description = "The BMC failed or cannot be reached (`bmc_unreachable`, `bmc_credentials`, `bmc_tls`, `bmc_error`, ...), or manual power (`manual_action_required`).", body = ErrorBody)
    )
)]
async fn power_op(
    State(s): State<AppState>,
    caller: Operator,
    Path((id, op)): Path<(String, String)>,
) -> ApiResult<Json<PowerAnswer>> {
    use crate::power::{PowerDriver, PowerState};
    let m = s.controller.machine(&id).await?;
    let params = crate::lifecycle::controller::power_params(&m).map_err(ApiError::bad_request)?;
    let d = PowerDriver::new(params);
    let Some(op) = PowerOp::parse(&op) else {
        return Err(ApiError::bad_request(format!(
            "op: {op:?} is not one of on, off, soft-off, cycle, query"
        )));
    };
    let result = match op {
        PowerOp::On => d.power_on().await.map(|_| PowerState::On),
        PowerOp::Off => d.power_off(false).await.map(|_| PowerState::Off),
        PowerOp::SoftOff => d.power_off(true).await.map(|_| PowerState::Off),
        PowerOp::Cycle => d.power_cycle().await.map(|_| PowerState::On),
        PowerOp::Query => d.query().await,
    };
    if let Ok(state) = &result {
        s.controller.power_seen(&m.id, *state).await;
    }
    let message = match &result {
        Ok(state) => format!("power {op}: {state}"),
        Err(e) => format!("power {op} failed: {e}"),
    };
    s.controller.note(&m.id, &caller.actor, message).await?;
    match result {
        Ok(state) => Ok(Json(PowerAnswer {
            machine_id: m.id,
            op,
            state,
        })),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            e.code(),
            e.to_string(),
        )),
    }
}

/// Allocates the first Ready machine that meets the constraints.
#[utoipa::path(
    post,
    path = "/machines/allocate",
    operation_id = "allocate_any",
    tag = "machines",
    summary = "Allocate any Ready machine that meets the constraints",
    request_body(content = Constraints),
    responses(
        (status = 200, description = "The allocated machine.", body = Machine),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, description = "No Ready machine meets the constraints (`no_machine`).", body = ErrorBody)
    )
)]
async fn allocate_any(
    State(s): State<AppState>,
    caller: Operator,
    body: Result<Json<Constraints>, JsonRejection>,
) -> ApiResult<Json<Machine>> {
    let Json(c) = body?;
    let candidates = s.controller.machines().await?;
    let owner = c.owner.clone().unwrap_or_else(|| caller.actor.clone());
    for m in candidates
        .iter()
        .filter(|m| m.status == Status::Ready && c.fit(m))
    {
        let owner = owner.clone();
        match s
            .controller
            .apply(&m.id, Command::Allocate { owner }, &caller.actor)
            .await
        {
            Ok(m) => return Ok(Json(m.redacted())),
            // Someone else took it between the read and the save: try the next one.
            Err(ControlError::Rejected(_) | ControlError::Store(StoreError::Conflict { .. })) => {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "no_machine",
        "no Ready machine meets the constraints",
    ))
}

// ---- events ----

#[utoipa::path(
    get,
    path = "/machines/{id}/events",
    operation_id = "machine_events",
    tag = "events",
    summary = "A machine's event history",
    params(
        ("id" = String, Path, description = "Machine id, or any of its MAC addresses."),
        ("after" = Option<i64>, Query, description = "Only events with a larger id (default 0)."),
        ("limit" = Option<i64>, Query, description = "At most this many (default 1000).")
    ),
    responses(
        (status = 200, description = "OK", body = [EventRecord]),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn machine_events(
    State(s): State<AppState>,
    _: Reader,
    Path(id): Path<String>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<EventRecord>>> {
    let Query(q) = q?;
    let limit = page_limit(q.limit);
    Ok(Json(s.controller.events(Some(id), q.after, limit).await?))
}

#[utoipa::path(
    get,
    path = "/events",
    operation_id = "list_events",
    tag = "events",
    summary = "Events of every machine (or one)",
    params(
        ("after" = Option<i64>, Query, description = "Only events with a larger id (default 0)."),
        ("machine" = Option<String>, Query, description = "Machine id (exact)."),
        ("limit" = Option<i64>, Query, description = "At most this many (default 1000).")
    ),
    responses(
        (status = 200, description = "OK", body = [EventRecord]),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_events(
    State(s): State<AppState>,
    _: Reader,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<EventRecord>>> {
    let Query(q) = q?;
    let limit = page_limit(q.limit);
    // Filtered by id as stored (an unknown id is an empty list, not a 404).
    Ok(Json(
        s.controller.events_by_id(q.machine, q.after, limit).await?,
    ))
}

/// Server-sent events: every event after `after`, then each new one as it is written.
#[utoipa::path(
    get,
    path = "/events/stream",
    operation_id = "stream_events",
    tag = "events",
    summary = "Live event stream (server-sent events)",
    params(
        ("after" = Option<i64>, Query, description = "Only events with a larger id (default 0)."),
        ("machine" = Option<String>, Query, description = "Machine id or MAC.")
    ),
    responses(
        (status = 200, description = "Every event after `after`, then each new one as it is written: `id:` is the event id, `data:` its JSON (an Event).", body = String, content_type = "text/event-stream"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn stream_events(
    State(s): State<AppState>,
    _: Reader,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>> {
    let Query(q) = q?;
    let machine = match q.machine {
        Some(key) => Some(s.controller.machine(&key).await?.id),
        None => None,
    };
    let mut wake = s.controller.subscribe();
    let controller = s.controller.clone();
    let stream = async_stream(move |tx| async move {
        let mut after = q.after;
        loop {
            let batch = controller
                .events_by_id(machine.clone(), after, 500)
                .await
                .unwrap_or_default();
            for e in batch {
                after = e.id;
                let data = serde_json::to_string(&e).unwrap_or_default();
                if tx
                    .send(Ok(SseEvent::default().id(e.id.to_string()).data(data)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if wake.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A stream fed by a task through a small channel; the task ends when the client goes.
fn async_stream<T: Send + 'static, F, Fut>(f: F) -> impl futures_util::Stream<Item = T>
where
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

// ---- SSH keys, boot resources, tokens ----

#[utoipa::path(
    get,
    path = "/ssh-keys",
    operation_id = "list_ssh_keys",
    tag = "ssh-keys",
    summary = "List SSH keys",
    responses(
        (status = 200, description = "OK", body = [SshKey]),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_ssh_keys(State(s): State<AppState>, _: Reader) -> ApiResult<Json<Vec<SshKey>>> {
    Ok(Json(s.controller.ssh_keys().await?))
}

#[utoipa::path(
    post,
    path = "/ssh-keys",
    operation_id = "add_ssh_key",
    tag = "ssh-keys",
    summary = "Add an SSH key (installed on every deployed machine)",
    request_body(content = NewSshKey),
    responses(
        (status = 201, description = "Created.", body = SshKey),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn add_ssh_key(
    State(s): State<AppState>,
    _: Operator,
    body: Result<Json<NewSshKey>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SshKey>)> {
    let Json(k) = body?;
    if k.name.trim().is_empty() {
        return Err(ApiError::bad_request("name: give the key a name"));
    }
    if !stork_proto::api::valid_ssh_key(&k.key) {
        return Err(ApiError::bad_request(format!(
            "key: {}",
            stork_proto::api::NOT_AN_SSH_KEY
        )));
    }
    let out = s.controller.add_ssh_key(k.name, k.key).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(
    delete,
    path = "/ssh-keys/{id}",
    operation_id = "delete_ssh_key",
    tag = "ssh-keys",
    summary = "Delete an SSH key",
    params(
        ("id" = String, Path)
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn delete_ssh_key(
    State(s): State<AppState>,
    _: Operator,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    deleted(
        s.controller.delete_ssh_key(&id).await?,
        format!("no SSH key {id:?}"),
    )
}

#[utoipa::path(
    get,
    path = "/boot-resources",
    operation_id = "list_boot_resources",
    tag = "images",
    summary = "List boot resources (images)",
    responses(
        (status = 200, description = "OK", body = [BootResource]),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_boot_resources(
    State(s): State<AppState>,
    _: Reader,
) -> ApiResult<Json<Vec<BootResource>>> {
    Ok(Json(s.controller.boot_resources().await?))
}

#[utoipa::path(
    post,
    path = "/boot-resources",
    operation_id = "register_boot_resource",
    tag = "images",
    summary = "Register (or replace) a boot resource",
    description = "Every file must exist under DATA_DIR/boot/.",
    request_body(content = BootResource),
    responses(
        (status = 201, description = "Registered.", body = BootResource),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn register_boot_resource(
    State(s): State<AppState>,
    _: Operator,
    body: Result<Json<BootResource>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<BootResource>)> {
    let Json(r) = body?;
    if !["os", "ephemeral", "initrd"].contains(&r.kind.as_str()) {
        return Err(ApiError::bad_request(
            "kind: must be os, ephemeral or initrd",
        ));
    }
    let root = s.cfg.boot_dir();
    for f in &r.files {
        if f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
            return Err(ApiError::bad_request(format!(
                "files.path: {:?} leaves the boot root",
                f.path
            )));
        }
        if !root.join(&f.path).is_file() {
            return Err(ApiError::bad_request(format!(
                "files.path: {:?} does not exist under the boot root",
                f.path
            )));
        }
    }
    let out = r.clone();
    s.controller.put_boot_resource(r).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(
    put,
    path = "/boot-resources/{name}/image",
    operation_id = "upload_image",
    tag = "images",
    summary = "Upload an OS image (raw, qcow2 or root tar) and register it",
    description = "The body is the image's bytes, streamed. Their sha256 must be the query's: otherwise, or when the upload breaks off, nothing is kept. A qcow2 (without a backing file) is converted to raw. The image is stored under DATA_DIR/boot/images/NAME/ and registered as an `os` boot resource. An existing name is a 409.",
    params(
        ("name" = String, Path, description = "The image's name: letters, digits, `.`, `-` and `_`, 64 at most."),
        ("format" = UploadFormat, Query),
        ("sha256" = String, Query, description = "The sha256 of the body, 64 hexadecimal digits.")
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored and registered.", body = BootResource),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, description = "An image of this name exists.", body = ErrorBody),
        (status = 413, description = "Over the largest upload taken.", body = ErrorBody),
        (status = 507, description = "It does not fit in the space free under the boot root.", body = ErrorBody)
    )
)]
async fn upload_image(
    State(s): State<AppState>,
    _: Operator,
    Path(name): Path<String>,
    q: Result<Query<UploadQuery>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<BootResource>)> {
    use crate::image_upload::{Upload, UploadError, check_name, check_sha256};
    use futures_util::StreamExt;
    let Query(q) = q?;
    let fail = |e: UploadError| {
        let (status, code) = match &e {
            UploadError::Exists(_) => (StatusCode::CONFLICT, "exists"),
            UploadError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            UploadError::NoSpace { .. } => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
            e if e.is_request() => (StatusCode::BAD_REQUEST, "bad_request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(image = %name, "image upload: {e:#}");
        }
        ApiError::new(status, code, e.to_string())
    };
    check_name(&name).map_err(fail)?;
    let want = check_sha256(&q.sha256).map_err(fail)?;
    if s.controller
        .boot_resources()
        .await?
        .iter()
        .any(|r| r.name == name)
    {
        return Err(fail(UploadError::Exists(name.clone())));
    }
    let length = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let mut upload = Upload::start(&s.cfg.boot_dir(), &name, q.format, length)
        .await
        .map_err(fail)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| fail(UploadError::Broken(e.to_string())))?;
        upload.write(&chunk).await.map_err(fail)?;
    }
    let r = upload.finish(&want).await.map_err(fail)?;
    tracing::info!(image = %name, format = ?q.format, "image uploaded");
    s.controller.put_boot_resource(r.clone()).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

#[utoipa::path(
    delete,
    path = "/boot-resources/{name}",
    operation_id = "delete_boot_resource",
    tag = "images",
    summary = "Delete a boot resource, and its files when they are its own",
    description = "Refused (409) while a machine deploys it. Files under DATA_DIR/boot/images/NAME/ (an upload's, an import's) go with it; files registered from elsewhere stay.",
    params(
        ("name" = String, Path)
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "A machine is deploying it.", body = ErrorBody)
    )
)]
async fn delete_boot_resource(
    State(s): State<AppState>,
    _: Operator,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no boot resource {name:?}"),
        )
    };
    let resources = s.controller.boot_resources().await?;
    let r = resources
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(not_found)?;
    let deploying = s.controller.machines().await?.into_iter().find(|m| {
        m.status == Status::Deploying && m.deploy.as_ref().is_some_and(|d| d.image == name)
    });
    if let Some(m) = deploying {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("machine {} is deploying {name:?}", m.id),
        ));
    }
    if !s.controller.delete_boot_resource(&name).await? {
        return Err(not_found());
    }
    // Only a directory that holds this resource's files alone: never a shared file.
    let own = format!("images/{name}/");
    let dir = s.cfg.boot_dir().join("images").join(&name);
    if crate::image_upload::check_name(&name).is_ok()
        && !r.files.is_empty()
        && r.files.iter().all(|f| f.path.starts_with(&own))
        && let Err(e) = tokio::fs::remove_dir_all(&dir).await
    {
        tracing::warn!(image = %name, "cannot remove {}: {e}", dir.display());
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/scripts",
    operation_id = "list_scripts",
    tag = "scripts",
    summary = "List the commissioning scripts, in the order they run",
    responses(
        (status = 200, description = "OK", body = [Script]),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_scripts(State(s): State<AppState>, _: Reader) -> ApiResult<Json<Vec<Script>>> {
    Ok(Json(s.controller.scripts().await?))
}

#[utoipa::path(
    post,
    path = "/scripts",
    operation_id = "add_script",
    tag = "scripts",
    summary = "Add (or replace) a commissioning script",
    description = "Every machine commissioned after runs it in the agent's ephemeral root, as root, before the inventory: its output and exit status are recorded on the machine; a non-zero exit or its timeout fails the commissioning.",
    request_body(content = NewScript),
    responses(
        (status = 201, description = "Stored.", body = Script),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn add_script(
    State(s): State<AppState>,
    _: Operator,
    body: Result<Json<NewScript>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Script>)> {
    let Json(new) = body?;
    let script =
        crate::commissioning::check_script(new, now_ms()).map_err(ApiError::bad_request)?;
    s.controller.put_script(script.clone()).await?;
    Ok((StatusCode::CREATED, Json(script)))
}

#[utoipa::path(
    delete,
    path = "/scripts/{name}",
    operation_id = "delete_script",
    tag = "scripts",
    summary = "Delete a commissioning script",
    params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn delete_script(
    State(s): State<AppState>,
    _: Operator,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    deleted(
        s.controller.delete_script(&name).await?,
        format!("no script {name:?}"),
    )
}

#[utoipa::path(
    get,
    path = "/layouts",
    operation_id = "list_layouts",
    tag = "layouts",
    summary = "Named storage layouts",
    responses(
        (status = 200, description = "OK, by name.", body = [NamedLayout]),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_layouts(State(s): State<AppState>, _: Reader) -> ApiResult<Json<Vec<NamedLayout>>> {
    Ok(Json(s.controller.layouts().await?))
}

#[utoipa::path(
    post,
    path = "/layouts",
    operation_id = "add_layout",
    tag = "layouts",
    summary = "Add (or replace) a named storage layout",
    description = "Checked as a deploy's layout is (sizes, disks, RAID, LVM), each mistake naming its field; a machine whose default it is (`PUT /machines/{id}/layout`) deploys with it when a deploy to disk gives no layout.",
    request_body(content = NamedLayout),
    responses(
        (status = 201, description = "Stored.", body = NamedLayout),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn add_layout(
    State(s): State<AppState>,
    _: Operator,
    body: Result<Json<NamedLayout>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<NamedLayout>)> {
    let Json(mut named) = body?;
    crate::image_upload::check_name(&named.name)
        .map_err(|why| ApiError::bad_request(format!("name: {why}")))?;
    named
        .layout
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    named.created_at = now_ms();
    s.controller.put_layout(named.clone()).await?;
    Ok((StatusCode::CREATED, Json(named)))
}

#[utoipa::path(
    delete,
    path = "/layouts/{name}",
    operation_id = "delete_layout",
    tag = "layouts",
    summary = "Delete a named storage layout",
    params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "A machine has it as its default layout (`in_use`).", body = ErrorBody)
    )
)]
async fn delete_layout(
    State(s): State<AppState>,
    _: Operator,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    match s.controller.delete_layout(&name).await? {
        Ok(found) => deleted(found, format!("no layout {name:?}")),
        Err(machines) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!(
                "layout {name:?} is the default of machine(s) {}: set theirs to another first",
                machines.join(", ")
            ),
        )),
    }
}

#[utoipa::path(
    put,
    path = "/machines/{id}/layout",
    operation_id = "set_machine_layout",
    tag = "machines",
    summary = "Set or clear the machine's default storage layout",
    description = "A named layout (`/layouts`), or `null`. A deploy to disk that gives no layout uses it; one that gives a layout uses its own.",
    params(MachineId),
    request_body(content = DefaultLayout),
    responses(
        (status = 200, description = "Set.", body = Machine),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "The machine changed meanwhile (`conflict`): read it and try again.", body = ErrorBody)
    )
)]
async fn set_machine_layout(
    State(s): State<AppState>,
    caller: Operator,
    Path(id): Path<String>,
    body: Result<Json<DefaultLayout>, JsonRejection>,
) -> ApiResult<Json<Machine>> {
    let Json(DefaultLayout { layout }) = body?;
    let m = s.controller.machine(&id).await?;
    if let Some(name) = &layout
        && s.controller.layout(name).await?.is_none()
    {
        return Err(ApiError::bad_request(format!(
            "layout: no layout named {name:?} (`GET /layouts` lists them)"
        )));
    }
    let saved = s
        .controller
        .set_machine_setting(
            m,
            "default layout",
            layout,
            |m, v| m.default_layout = v,
            &caller.actor,
        )
        .await?;
    Ok(Json(saved.redacted()))
}

#[utoipa::path(
    put,
    path = "/machines/{id}/min-kernel",
    operation_id = "set_machine_min_kernel",
    tag = "machines",
    summary = "Set or clear the machine's minimum kernel",
    description = "A kernel release (`6.12`), or `null`. A deploy that names no kernel boots the image's default if it is at least this, else the image's oldest kernel that is; a deploy naming an older kernel, or of an image with none new enough, is refused.",
    params(MachineId),
    request_body(content = MinKernel),
    responses(
        (status = 200, description = "Set.", body = Machine),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "The machine changed meanwhile (`conflict`): read it and try again.", body = ErrorBody)
    )
)]
async fn set_machine_min_kernel(
    State(s): State<AppState>,
    caller: Operator,
    Path(id): Path<String>,
    body: Result<Json<MinKernel>, JsonRejection>,
) -> ApiResult<Json<Machine>> {
    let Json(MinKernel { min_kernel }) = body?;
    if let Some(min) = &min_kernel
        && !stork_proto::kernel::valid_minimum(min)
    {
        return Err(ApiError::bad_request(format!(
            "min_kernel: {min:?} is not a kernel release (numbers and dots: 6.12)"
        )));
    }
    let m = s.controller.machine(&id).await?;
    let saved = s
        .controller
        .set_machine_setting(
            m,
            "minimum kernel",
            min_kernel,
            |m, v| m.min_kernel = v,
            &caller.actor,
        )
        .await?;
    Ok(Json(saved.redacted()))
}

#[utoipa::path(
    get,
    path = "/machines/{id}/scripts",
    operation_id = "machine_scripts",
    tag = "machines",
    summary = "The results of the machine's last commissioning's scripts and tests",
    params(MachineId),
    responses(
        (status = 200, description = "OK, in the order they ran.", body = [ScriptResult]),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn machine_scripts(
    State(s): State<AppState>,
    _: Reader,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ScriptResult>>> {
    let m = s.controller.machine(&id).await?;
    Ok(Json(s.controller.script_results(&m.id).await?))
}

#[utoipa::path(
    get,
    path = "/tokens",
    operation_id = "list_tokens",
    tag = "tokens",
    summary = "List API tokens: ids, scopes, expiry and revocation, never the tokens",
    responses(
        (status = 200, description = "OK", body = [TokenRecord]),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn list_tokens(State(s): State<AppState>, _: Admin) -> ApiResult<Json<Vec<TokenRecord>>> {
    Ok(Json(s.controller.tokens().await?))
}

#[utoipa::path(
    post,
    path = "/tokens",
    operation_id = "create_token",
    tag = "tokens",
    summary = "Create an API token",
    description = "Scoped (`admin` by default, `operator` or `read-only`), optionally expiring. Needs an admin token.",
    request_body(content = NewToken),
    responses(
        (status = 201, description = "Created; the token is shown once.", body = CreatedToken),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn create_token(
    State(s): State<AppState>,
    _: Admin,
    body: Result<Json<NewToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let Json(t) = body?;
    if t.expires_in_secs == Some(0) {
        return Err(ApiError::bad_request(
            "expires_in_secs: a token must live at least a second",
        ));
    }
    let (record, token) = s.controller.create_token(t).await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })))
}

#[utoipa::path(
    delete,
    path = "/tokens/{id}",
    operation_id = "revoke_token",
    tag = "tokens",
    summary = "Revoke a token: it is refused from now on",
    params(("id" = String, Path, description = "The token's id (`stork token list`).")),
    responses(
        (status = 200, description = "The token's record, revoked.", body = TokenRecord),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound)
    )
)]
async fn revoke_token(
    State(s): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenRecord>> {
    Ok(Json(s.controller.revoke_token(id).await?))
}

#[utoipa::path(
    get,
    path = "/audit",
    operation_id = "audit_log",
    tag = "tokens",
    summary = "The audit log: every change asked through the API, by whom, and the answer",
    description = "Every POST and DELETE under `/api/v1` but the agent's, refused ones too, oldest first.",
    params(
        ("after" = Option<i64>, Query, description = "Only entries with a larger id (default 0)."),
        ("limit" = Option<i64>, Query, description = "At most this many (default 1000).")
    ),
    responses(
        (status = 200, description = "OK", body = [AuditRecord]),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn audit_log(
    State(s): State<AppState>,
    _: Admin,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<AuditRecord>>> {
    let Query(q) = q?;
    let limit = page_limit(q.limit);
    Ok(Json(s.controller.audit_log(q.after, limit).await?))
}

/// How many entries a history page holds: 1000 unless asked, 10,000 at most.
fn page_limit(asked: Option<u32>) -> u32 {
    asked.unwrap_or(1000).min(10_000)
}

/// Records every change asked through the admin API (not the agent's routes, which leave
/// their own events) with who asked and how it was answered, refusals included.
pub async fn audit(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let recorded = method != axum::http::Method::GET
        && path.starts_with("/api/v1/")
        && !path.starts_with("/api/v1/agent/");
    if !recorded {
        return next.run(req).await;
    }
    let has_token = req
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION);
    let from = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .copied();
    let slot = super::extract::AuditActor::default();
    let mut req = req;
    req.extensions_mut().insert(slot.clone());
    let resp = next.run(req).await;
    // The extractor names the token it found; a token it did not find (or never looked
    // up: a refusal before the handler) is unknown.
    let actor = match slot.take() {
        Some(actor) => actor,
        None => {
            // Anyone on the network can ask: such refusals are written at the
            // unauthenticated rate of their address, the rest only counted.
            if !super::extract::within(&s.audit_limiter, from) {
                s.http_stats
                    .audit_unauthenticated_dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return resp;
            }
            if has_token {
                "unknown token"
            } else {
                "anonymous"
            }
            .to_string()
        }
    };
    let entry = AuditRecord {
        id: 0,
        at: now_ms(),
        actor,
        method: method.to_string(),
        path,
        status: resp.status().as_u16(),
    };
    if let Err(e) = s.controller.audit(entry).await {
        tracing::error!(error = %e, "cannot write the audit log");
    }
    resp
}

#[utoipa::path(
    get,
    path = "/stats",
    operation_id = "stats",
    tag = "service",
    summary = "Service counters",
    responses(
        (status = 200, description = "OK", body = StatsResponse),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn stats(State(s): State<AppState>, _: Reader) -> Json<impl Serialize> {
    Json(StatsResponse {
        dhcp: super::openapi::counter_map(s.dhcp_stats.snapshot()),
        tftp: super::openapi::counter_map(s.tftp_stats.snapshot()),
        http: super::openapi::counter_map(s.http_stats.snapshot()),
        dhcp6: super::openapi::counter_map(s.dhcp6_stats.snapshot()),
    })
}

#[utoipa::path(
    get,
    path = "/dhcp/leases",
    operation_id = "dhcp_leases",
    tag = "service",
    summary = "The DHCP leases this appliance holds, by address (in an HA pair, each server's own view: its clients', and after a takeover its partner's)",
    responses(
        (status = 200, description = "OK", body = Vec<stork_proto::api::DhcpLease>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn dhcp_leases(
    State(s): State<AppState>,
    _: Reader,
) -> Json<Vec<stork_proto::api::DhcpLease>> {
    Json(
        s.leases
            .all()
            .into_iter()
            .map(|(mac, ip, expires)| stork_proto::api::DhcpLease { mac, ip, expires })
            .collect(),
    )
}

/// Whether every service runs; a failed and restarted one makes it `degraded`.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "service",
    summary = "Whether every service runs; a service that failed is restarted with backoff and makes the status `degraded` for five minutes",
    responses(
        (status = 200, description = "OK", body = HealthReport),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    )
)]
async fn health(State(s): State<AppState>, _: Reader) -> Json<HealthReport> {
    Json(s.health.report())
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "service",
    summary = "This document",
    responses(
        (status = 200, description = "OpenAPI 3.1.", body = Object)
    ),
    security(())
)]
async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi::document_json(),
    )
}

// ---- agent ----

#[utoipa::path(
    post,
    path = "/agent/enlist",
    operation_id = "enlist",
    tag = "agent",
    summary = "Enlist a machine (agent, no token)",
    description = "Creates the machine as New with its inventory, or updates the inventory of a New one.",
    request_body(content = EnlistRequest),
    responses(
        (status = 200, description = "OK", body = EnlistResponse),
        (status = 400, response = BadRequest),
        (status = 409, description = "The MAC belongs to a machine that is not New (`conflict`); recorded as an event.", body = ErrorBody),
        (status = 413, description = "A body over 256 KiB (`too_large`).", body = ErrorBody),
        (status = 429, description = "Too many unauthenticated agent requests from this address (`rate_limited`).", body = ErrorBody)
    ),
    security(())
)]
async fn enlist(
    State(s): State<AppState>,
    _: Unauthenticated,
    body: Result<Json<EnlistRequest>, JsonRejection>,
) -> ApiResult<Json<EnlistResponse>> {
    let Json(req) = body?;
    let mac = req.boot_mac;
    let m = s.controller.enlist(mac, req.inventory).await?;
    tracing::info!(machine = %m.id, %mac, "machine enlisted");
    Ok(Json(EnlistResponse {
        machine_id: m.id,
        status: m.status,
    }))
}

/// Reports from an agent that has no token (it failed while enlisting).
#[utoipa::path(
    post,
    path = "/agent/report",
    operation_id = "report",
    tag = "agent",
    summary = "Report a step's outcome (agent, no token)",
    request_body(content = AgentReport),
    responses(
        (status = 204, description = "Recorded as an event of the known machine."),
        (status = 202, description = "Unknown machine: logged only."),
        (status = 400, response = BadRequest),
        (status = 413, description = "A body over 256 KiB (`too_large`).", body = ErrorBody),
        (status = 429, description = "Too many unauthenticated agent requests from this address (`rate_limited`).", body = ErrorBody)
    ),
    security(())
)]
async fn report(
    State(s): State<AppState>,
    _: Unauthenticated,
    body: Result<Json<AgentReport>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(r) = body?;
    let outcome = if r.ok { "ok" } else { "FAILED" };
    // Debug formatting: the message is the sender's text, its control characters escaped.
    tracing::info!(mac = %r.boot_mac, step = ?r.step.as_str(), ok = r.ok, message = ?r.message, "agent report");
    let message = format!("{}: {outcome}: {}", r.step, r.message);
    let known = s.controller.agent_report(r.boot_mac, message).await?;
    // Unknown machines are not recorded (nothing to attach to); the log line keeps it.
    Ok(if known {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::ACCEPTED
    })
}

#[utoipa::path(
    get,
    path = "/agent/{id}/task",
    operation_id = "agent_task",
    tag = "agent",
    summary = "What the agent should do now",
    params(AgentMachineId),
    responses(
        (status = 200, description = "OK", body = Task),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, description = "Deploying without a usable deploy request or image.", body = ErrorBody)
    ),
    security(("agentToken" = []))
)]
async fn agent_task(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
) -> ApiResult<Json<Task>> {
    agent.check_machine(&id)?;
    let m = agent.machine;
    let task = match agent_work(&m) {
        AgentWork::Commission => Task::Commission {
            scripts: crate::commissioning::task_scripts(
                s.controller.scripts().await?,
                &m.commission_tests,
            ),
        },
        AgentWork::Erase { quick } => Task::Erase { quick },
        AgentWork::Deploy => super::deploy_task(&s, &m).await?,
        AgentWork::PowerOff => Task::PowerOff,
    };
    Ok(Json(task))
}

#[utoipa::path(
    post,
    path = "/agent/{id}/commissioned",
    operation_id = "agent_commissioned",
    tag = "agent",
    summary = "Commissioning done: the inventory",
    description = "Commissioning -> Ready; the token is revoked.",
    params(AgentMachineId),
    request_body(content = Inventory),
    responses(
        (status = 200, description = "OK", body = EnlistResponse),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = IllegalTransition)
    ),
    security(("agentToken" = []))
)]
async fn agent_commissioned(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
    body: Result<Json<Inventory>, JsonRejection>,
) -> ApiResult<Json<EnlistResponse>> {
    agent.check_machine(&id)?;
    let Json(inv) = body?;
    let m = s
        .controller
        .apply(&id, Command::CommissioningDone(inv), "agent")
        .await?;
    Ok(Json(EnlistResponse {
        machine_id: m.id,
        status: m.status,
    }))
}

async fn agent_event_handler(s: &AppState, id: &str, e: AgentEvent) -> ApiResult<()> {
    let text = match e.progress {
        Some(p) => format!(
            "{} {:?} ({:.0}%): {}",
            e.step,
            e.state,
            p * 100.0,
            e.message
        ),
        None => format!("{} {:?}: {}", e.step, e.state, e.message),
    };
    if e.state == StepState::Failed {
        let reason = match &e.log_tail {
            Some(tail) => format!("{}: {}\n{tail}", e.step, e.message),
            None => format!("{}: {}", e.step, e.message),
        };
        s.controller
            .apply(id, Command::AgentFailed(reason), "agent")
            .await?;
        return Ok(());
    }
    s.controller.agent_progress(id, text).await?;
    Ok(())
}

#[utoipa::path(
    post,
    path = "/agent/{id}/events",
    operation_id = "agent_post_event",
    tag = "agent",
    summary = "A step's progress",
    description = "State `failed` moves the machine to its failed status (AgentFailed).",
    params(AgentMachineId),
    request_body(content = AgentEvent),
    responses(
        (status = 204, description = "Recorded."),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = IllegalTransition)
    ),
    security(("agentToken" = []))
)]
async fn agent_post_event(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
    body: Result<Json<AgentEvent>, JsonRejection>,
) -> ApiResult<StatusCode> {
    agent.check_machine(&id)?;
    let Json(e) = body?;
    agent_event_handler(&s, &id, e).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Step names are short identifiers; a longer one is cut rather than stored whole.
const MAX_STEP_LEN: usize = 64;

/// 204: recorded, the next heartbeat is due within `lifecycle.heartbeat_timeout`. 202: not
/// recorded, none is expected any more (the image is installed, or the agent said it left).
#[utoipa::path(
    post,
    path = "/agent/{id}/scripts",
    operation_id = "agent_script_result",
    tag = "agent",
    summary = "A commissioning script's result",
    description = "While the machine commissions. The output is kept to its last 16 KiB.",
    params(AgentMachineId),
    request_body(content = ScriptResult),
    responses(
        (status = 204, description = "Recorded."),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, description = "The machine is not commissioning.", body = ErrorBody)
    ),
    security(("agentToken" = []))
)]
async fn agent_script_result(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
    body: Result<Json<ScriptResult>, JsonRejection>,
) -> ApiResult<StatusCode> {
    agent.check_machine(&id)?;
    let Json(mut r) = body?;
    if agent.machine.status != Status::Commissioning {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_commissioning",
            format!(
                "machine {} is {}, not commissioning",
                id, agent.machine.status
            ),
        ));
    }
    let known = r.test && agent.machine.commission_tests.contains(&r.name)
        || !r.test
            && s.controller
                .scripts()
                .await?
                .iter()
                .any(|sc| sc.name == r.name);
    if !known {
        return Err(ApiError::bad_request(format!(
            "name: {:?} is not a script this commissioning runs",
            r.name
        )));
    }
    r.output = tail_chars(&r.output, stork_proto::api::MAX_SCRIPT_OUTPUT);
    r.at = now_ms();
    s.controller.put_script_result(&agent.machine.id, r).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The end of `text`, at most `max` bytes, cut on a character boundary.
fn tail_chars(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.get(start..).unwrap_or_default().to_string()
}

#[utoipa::path(
    post,
    path = "/agent/{id}/heartbeat",
    operation_id = "agent_heartbeat",
    tag = "agent",
    summary = "The agent is alive",
    description = "Posted every 10 s while the agent runs a task. Each one sets the machine's `heartbeat_deadline` to now + `lifecycle.heartbeat_timeout`; when it passes, the controller fails the busy status (TimedOut) with the reason `agent stopped answering: last heartbeat N s ago (step S)`. `leaving: true` clears the deadline for good in this status.",
    params(AgentMachineId),
    request_body(content = Heartbeat),
    responses(
        (status = 202, description = "Not recorded: no heartbeat is expected any more (the image is installed, or the agent left)."),
        (status = 204, description = "Recorded."),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden)
    ),
    security(("agentToken" = []))
)]
async fn agent_heartbeat(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
    body: Result<Json<Heartbeat>, JsonRejection>,
) -> ApiResult<StatusCode> {
    agent.check_machine(&id)?;
    let Json(hb) = body?;
    let now = now_ms();
    let allowance = i64::try_from(s.cfg.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
    let deadline = (!hb.leaving).then(|| now.saturating_add(allowance));
    let step: String = hb.step.as_str().chars().take(MAX_STEP_LEN).collect();
    let recorded = s.controller.heartbeat(&id, step, now, deadline).await?;
    Ok(if recorded {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::ACCEPTED
    })
}

#[utoipa::path(
    post,
    path = "/agent/{id}/released",
    operation_id = "agent_released",
    tag = "agent",
    summary = "Erase done",
    params(AgentMachineId),
    responses(
        (status = 204, description = "Disk erasing -> Ready."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = IllegalTransition)
    ),
    security(("agentToken" = []))
)]
async fn agent_released(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    agent.check_machine(&id)?;
    s.controller
        .apply(&id, Command::ReleaseDone, "agent")
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The agent wrote the image: the next boot is from disk, and the machine stays Deploying
/// until the installed OS phones home.
#[utoipa::path(
    post,
    path = "/agent/{id}/installed",
    operation_id = "agent_installed",
    tag = "agent",
    summary = "Image written: boot from disk next",
    params(AgentMachineId),
    responses(
        (status = 204, description = "Recorded; the machine stays Deploying, and heartbeats are no longer expected."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = IllegalTransition)
    ),
    security(("agentToken" = []))
)]
async fn agent_installed(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    agent.check_machine(&id)?;
    if !s.controller.image_installed(agent.machine).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "illegal_transition",
            "machine is not deploying",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/agent/{id}/deployed",
    operation_id = "agent_deployed",
    tag = "agent",
    summary = "The installed OS phoned home",
    params(AgentMachineId),
    responses(
        (status = 204, description = "Deploying -> Deployed."),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = IllegalTransition)
    ),
    security(("agentToken" = []))
)]
async fn agent_deployed(
    State(s): State<AppState>,
    agent: Agent,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    agent.check_machine(&id)?;
    s.controller
        .apply(&id, Command::DeploymentDone, "installed-os")
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
