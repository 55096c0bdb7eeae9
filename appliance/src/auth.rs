//! Bearer tokens. Admin tokens live in the store; each boot of a machine gets its own agent
//! token, carried in its boot script. Only SHA-256 hashes are stored; a token is shown once,
//! when created, and never logged.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::http::AppState;
use crate::http::api::ApiError;
use crate::store::{Machine, Store, TokenRecord, now_ms};

pub const ADMIN_PREFIX: &str = "stork_admin_";
pub const AGENT_PREFIX: &str = "stork_agent_";

/// A new random token with `prefix`, and its hash for the store.
pub fn generate(prefix: &str) -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("{prefix}{}", hex::encode(bytes));
    let h = hash(&token);
    (token, h)
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Creates an admin token in the store and returns it (the only time it is visible).
pub fn create_admin_token(
    store: &Store,
    description: &str,
) -> Result<(TokenRecord, String), crate::store::StoreError> {
    let (token, h) = generate(ADMIN_PREFIX);
    let rec = TokenRecord {
        id: h[..12].to_string(),
        description: description.to_string(),
        created_at: now_ms(),
    };
    store.add_token(&rec, &h)?;
    Ok((rec, token))
}

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
        let rec = state.store.call(move |s| s.token_by_hash(&h)).await?;
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
        let (machine, admin) = state
            .store
            .call(move |s| Ok((s.machine_by_agent_token(&h)?, s.token_by_hash(&h)?)))
            .await?;
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
