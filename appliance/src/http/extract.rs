//! Who is calling: the bearer token of a request, checked against the controller's records.
//! An admin token opens the API; an agent token opens its own machine's agent endpoints.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::AppState;
use super::api::ApiError;
use crate::auth::{AGENT_PREFIX, hash};
use crate::store::Machine;

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token",
            )
        })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authorization header must be `Bearer <token>`",
            )
        })
}

/// An API caller holding an admin token.
pub struct Admin {
    /// `api:<token id>`: the actor recorded in events.
    pub actor: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Admin
where
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = AppState::from_ref(state);
        let token = bearer(parts)?;
        let is_agent = token.starts_with(AGENT_PREFIX);
        let h = hash(token);
        let rec = state.controller.admin_token(h).await?;
        match rec {
            Some(rec) => Ok(Admin {
                actor: format!("api:{}", rec.id),
            }),
            None if is_agent => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "an agent token cannot use this endpoint",
            )),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid token",
            )),
        }
    }
}

/// An agent holding the current token of the machine it booted on.
pub struct Agent {
    pub machine: Machine,
}

impl<S: Send + Sync> FromRequestParts<S> for Agent
where
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = AppState::from_ref(state);
        let token = bearer(parts)?;
        let h = hash(token);
        let (machine, admin) = state.controller.token_holder(h).await?;
        match (machine, admin) {
            (Some(machine), _) => Ok(Agent { machine }),
            (None, Some(_)) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "agent endpoints need an agent token",
            )),
            (None, None) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid or expired agent token",
            )),
        }
    }
}

impl Agent {
    /// Agent endpoints name their machine; a token is good for its own machine only.
    pub fn check_machine(&self, id: &str) -> Result<(), ApiError> {
        if self.machine.id == id {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this agent token belongs to another machine",
            ))
        }
    }
}
