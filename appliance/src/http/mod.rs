//! The HTTP listener: static boot files under `/boot/`, generated per-machine iPXE scripts
//! under `/ipxe/`, and the API under `/api/v1`. Boot files and the API never share a path.

pub mod api;
pub mod script;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use tower_http::services::ServeDir;

use crate::config::Config;
use crate::dhcp::Stats;
use crate::machines::Machines;

#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    pub machines: Arc<Machines>,
    pub dhcp_stats: Arc<Stats>,
}

pub fn router(state: AppState) -> Router {
    // ServeDir refuses `..` and absolute components, so nothing outside the boot root is
    // served; it answers Range requests with 206.
    let boot = ServeDir::new(state.cfg.boot_dir()).append_index_html_on_directories(false);
    Router::new()
        .route("/ipxe/{mac}", get(script::ipxe_script))
        .nest("/api/v1", api::routes())
        .nest_service("/boot", boot)
        .with_state(state)
        .layer(tower_http::trace::TraceLayer::new_for_http())
}
