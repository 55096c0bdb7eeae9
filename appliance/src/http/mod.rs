//! The HTTP listener: static boot files under `/boot/`, generated per-machine iPXE scripts
//! under `/ipxe/`, and the API under `/api/v1`. Boot files and the API never share a path.

pub mod api;
pub mod bootfile;
pub mod config;
pub mod extract;
pub mod listener;
pub mod openapi;
pub mod script;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use stork_proto::{DeployTask, ImageFile, Task};
use tower_http::services::ServeDir;

use crate::config::Config;
use crate::dhcp::Stats;
use crate::lifecycle::Controller;
use crate::store::{DeployTarget, Machine};
use api::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    /// The one way to machine state and every other record.
    pub controller: Controller,
    pub dhcp_stats: Arc<Stats>,
    pub tftp_stats: Arc<crate::tftp::Stats>,
    pub dhcp6_stats: Arc<crate::dhcp6::Stats>,
    /// Which services run, and which failed and were restarted.
    pub health: Arc<crate::supervise::Health>,
    /// The addresses the DHCP server leased, by MAC: who may take a booting machine's token.
    pub leases: Arc<crate::dhcp::Leases>,
    pub http_stats: Arc<listener::HttpStats>,
    /// The API over HTTPS, as boot scripts tell the agent (`None`: HTTPS is off).
    pub api_tls: Option<stork_proto::cmdline::ApiTls>,
    /// Unauthenticated agent requests (enlist, report) by source address.
    pub agent_limiter: Arc<std::sync::Mutex<crate::ratelimit::RateLimiter<std::net::IpAddr>>>,
    /// Audit entries of refused changes without a valid token, by source address (the same
    /// limit): a host flooding the admin API cannot make a durable write of each request.
    pub audit_limiter: Arc<std::sync::Mutex<crate::ratelimit::RateLimiter<std::net::IpAddr>>>,
    /// The kernels the agent boots with, the default first.
    pub agent_kernels: Arc<crate::agent_kernels::AgentKernels>,
    /// The agent's ephemeral root and its sha256, as boot scripts and GRUB configs name it.
    pub ephemeral: Arc<script::Ephemeral>,
    /// Which machines' UEFI PXE boots get the signed chain (shim, GRUB), as DHCP answers.
    pub signed: Arc<crate::lifecycle::secure_boot::SignedBoot>,
}

impl AppState {
    /// The lease a boot script's requester must hold for `mac`: `Some` where this appliance
    /// leases the addresses (`Some(None)`: it leased this MAC none), `None` where another
    /// DHCP server may have (proxy mode, DHCP off).
    pub fn lease_of(
        &self,
        mac: stork_proto::MacAddr,
        from: std::net::IpAddr,
    ) -> Option<Option<std::net::IpAddr>> {
        // The lease of the requester's family: IPv6 from this appliance's DHCPv6 (when it
        // leases addresses), IPv4 from its DHCPv4.
        let (leased, ours) = match crate::lifecycle::boot::canonical(from) {
            std::net::IpAddr::V6(_) => (
                self.leases.of6(mac).map(Into::into),
                self.cfg.dhcp6.mode == crate::dhcp6::Mode::Full,
            ),
            std::net::IpAddr::V4(_) => (
                self.leases.of(mac).map(Into::into),
                self.cfg.dhcp.serves() && !self.cfg.dhcp.proxies(),
            ),
        };
        match leased {
            Some(ip) => Some(Some(ip)),
            None if ours => Some(None),
            None => None,
        }
    }
}

pub fn router(state: AppState) -> Router {
    // ServeDir refuses `..` and absolute components and answers Range requests with 206;
    // it follows symbolic links, so `confine` refuses a path that resolves outside the root.
    // On plain HTTP the listener answers most `/boot/` requests itself (`bootfile`), with
    // the same check on the same root (`serve` gives it `boot_root`).
    let root = state.cfg.boot_dir();
    let boot = tower::ServiceBuilder::new()
        .layer(axum::middleware::from_fn_with_state(
            boot_root(&state.cfg),
            confine,
        ))
        .service(ServeDir::new(&root).append_index_html_on_directories(false));
    Router::new()
        .route("/ipxe/{mac}", get(script::ipxe_script))
        .nest(
            "/api/v1",
            api::routes().layer(axum::middleware::from_fn(https_only)),
        )
        .nest(
            "/ui",
            crate::ui::routes().layer(axum::middleware::from_fn(ui_https_only)),
        )
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/ui/machines") }),
        )
        .nest_service("/boot", boot)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::audit,
        ))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.cfg.http_limits.body_timeout,
        ))
        .with_state(state)
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Refuses an API or agent request that came over plain HTTP while HTTPS is on, saying
/// where to go (a token sent in clear is the user's to revoke; the answer says so).
async fn https_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(p) = req.extensions().get::<listener::PlainBesideTls>() {
        let message = format!(
            "this appliance takes API and agent requests over HTTPS only: {}/api/v1",
            p.api_url
        );
        return axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::FORBIDDEN,
            "https_required",
            message,
        ));
    }
    next.run(req).await
}

/// Sends a browser that came to the UI over plain HTTP, while HTTPS is on, to the same page
/// over HTTPS: a session cookie never travels in clear.
async fn ui_https_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(p) = req.extensions().get::<listener::PlainBesideTls>() {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/ui/");
        let base = p.api_url.trim_end_matches("/api/v1");
        return axum::response::IntoResponse::into_response(axum::response::Redirect::permanent(
            &format!("{base}/ui{path}"),
        ));
    }
    next.run(req).await
}

/// Refuses (404) a `/boot/` path that resolves, through symbolic links, outside the boot
/// root, as TFTP does, or that climbs with `..`; what does not exist is left to ServeDir's
/// own 404. The check is `bootfile::lookup`, the one the listener's own responder makes.
async fn confine(
    State(root): State<Arc<std::path::PathBuf>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let relative = req.uri().path().trim_start_matches('/');
    if bootfile::lookup(&root, relative) == bootfile::Lookup::Refused {
        return axum::response::IntoResponse::into_response(StatusCode::NOT_FOUND);
    }
    next.run(req).await
}

/// The boot root as both `/boot/` servers check paths against it: resolved once, since the
/// root itself does not move while the appliance runs.
pub fn boot_root(cfg: &Config) -> Arc<std::path::PathBuf> {
    let root = cfg.boot_dir();
    Arc::new(std::fs::canonicalize(&root).unwrap_or(root))
}

/// The deploy task for a Deploying machine: its request, the image's files as URLs on
/// this appliance, and the SSH keys (the request's plus every registered one).
pub async fn deploy_task(s: &AppState, m: &Machine) -> Result<Task, ApiError> {
    let req = m.deploy.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_deploy_request",
            "machine has no deploy request",
        )
    })?;
    let (resource, keys) = s.controller.deploy_inputs(&req.image).await?;
    let resource = resource.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_image",
            format!("boot resource {:?} is gone", req.image),
        )
    })?;
    // The files' URLs in the family the agent booted with (its token's address).
    let base = m
        .agent
        .ip
        .map_or_else(|| s.cfg.base_url(), |ip| s.cfg.base_url_for(ip));
    let mut ssh_keys = req.ssh_keys.clone();
    ssh_keys.extend(keys.into_iter().map(|k| k.key));
    // Checked at request time; the image may have been replaced since.
    let kernel = stork_proto::kernel::choose(
        &req.image,
        &resource.kernels,
        req.kernel.as_deref(),
        m.min_kernel.as_deref(),
    )
    .map_err(|e| ApiError::new(StatusCode::CONFLICT, "no_kernel", e.to_string()))?
    .filter(|k| resource.kernels.first() != Some(*k))
    .map(|k| k.version.clone());
    Ok(Task::Deploy(Box::new(DeployTask {
        target: req.target,
        disk: req.disk.clone(),
        hostname: req
            .hostname
            .clone()
            .or_else(|| m.hostname.clone())
            .unwrap_or_else(|| format!("stork-{}", m.id)),
        ssh_keys,
        user_data: req.user_data.clone(),
        late_commands: req.late_commands.clone(),
        network: req.network.clone(),
        kernel,
        image: resource
            .files
            .iter()
            .map(|f| ImageFile {
                role: f.role.clone(),
                url: format!("{base}/boot/{}", f.path),
                sha256: f.sha256.clone(),
                size: f.size,
            })
            .collect(),
        // The deploy handler refused a layout for memory; a stored one never reaches it.
        layout: match req.target {
            DeployTarget::Disk => req.layout.clone(),
            DeployTarget::Memory => None,
        },
    })))
}
