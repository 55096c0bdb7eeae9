//! The HTTP listener: static boot files under `/boot/`, generated per-machine iPXE scripts
//! under `/ipxe/`, and the API under `/api/v1`. Boot files and the API never share a path.

pub mod api;
pub mod extract;
pub mod openapi;
pub mod script;

use std::sync::Arc;

use axum::Router;
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
    /// Which services run, and which failed and were restarted.
    pub health: Arc<crate::supervise::Health>,
}

pub fn router(state: AppState) -> Router {
    // ServeDir refuses `..` and absolute components, so nothing outside the boot root is
    // served; it answers Range requests with 206.
    let boot = ServeDir::new(state.cfg.boot_dir()).append_index_html_on_directories(false);
    let ephemeral = script::Ephemeral::start(&state.cfg.boot_dir(), &state.cfg.boot.ephemeral);
    Router::new()
        .route(
            "/ipxe/{mac}",
            get(script::ipxe_script).layer(axum::Extension(ephemeral)),
        )
        .nest("/api/v1", api::routes())
        .nest_service("/boot", boot)
        .with_state(state)
        .layer(tower_http::trace::TraceLayer::new_for_http())
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
    let base = s.cfg.base_url();
    let mut ssh_keys = req.ssh_keys.clone();
    ssh_keys.extend(keys.into_iter().map(|k| k.key));
    Ok(Task::Deploy(DeployTask {
        target: req.target,
        disk: req.disk.clone(),
        hostname: req
            .hostname
            .clone()
            .or_else(|| m.hostname.clone())
            .unwrap_or_else(|| format!("stork-{}", m.id)),
        ssh_keys,
        user_data: req.user_data.clone(),
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
            DeployTarget::Disk => req.layout,
            DeployTarget::Memory => None,
        },
    }))
}
