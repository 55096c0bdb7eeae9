//! The REST API under `/api/v1`. Errors are JSON `{code, message}`.

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use stork_proto::{AgentReport, EnlistRequest, EnlistResponse};

use super::AppState;
use crate::machines::Machine;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/machines", get(list_machines))
        .route("/machines/{id}", get(show_machine))
        .route("/agent/enlist", post(enlist))
        .route("/agent/report", post(report))
        .route("/stats", get(stats))
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // serde's message names the field ("unknown field `x`", "missing field `y`").
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
    }
}

async fn list_machines(State(s): State<AppState>) -> Json<Vec<Machine>> {
    Json(s.machines.list())
}

async fn show_machine(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Machine>, ApiError> {
    s.machines.get(&id).map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no machine {id:?}"),
        )
    })
}

async fn enlist(
    State(s): State<AppState>,
    body: Result<Json<EnlistRequest>, JsonRejection>,
) -> Result<Json<EnlistResponse>, ApiError> {
    let Json(req) = body?;
    let m = s.machines.enlist(req.boot_mac, req.inventory);
    tracing::info!(machine = %m.id, mac = %m.boot_mac, "machine enlisted");
    Ok(Json(EnlistResponse {
        machine_id: m.id,
        status: m.status.to_string(),
    }))
}

async fn report(
    State(s): State<AppState>,
    body: Result<Json<AgentReport>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(r) = body?;
    let outcome = if r.ok { "ok" } else { "FAILED" };
    tracing::info!(mac = %r.boot_mac, step = %r.step, ok = r.ok, message = %r.message, "agent report");
    let message = format!("{}: {outcome}: {}", r.step, r.message);
    if s.machines.record(r.boot_mac, "agent", message) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        // Not enlisted yet (it failed before enlisting): the log line above keeps the report.
        Ok(StatusCode::ACCEPTED)
    }
}

#[derive(Serialize)]
struct StatsResponse {
    dhcp: crate::dhcp::StatsSnapshot,
}

async fn stats(State(s): State<AppState>) -> Json<impl Serialize> {
    Json(StatsResponse {
        dhcp: s.dhcp_stats.snapshot(),
    })
}
