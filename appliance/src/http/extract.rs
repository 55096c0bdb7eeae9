//! Who is calling: the bearer token of a request, checked against the controller's records.
//! An admin token opens the API; an agent token opens its own machine's agent endpoints.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::AppState;
use super::api::ApiError;
use crate::auth::{AGENT_PREFIX, hash};
use stork_proto::api::TokenScope;

use crate::store::{Machine, now_ms};

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

/// Who made a change, as the audit middleware (`api::audit`) records it: filled by the
/// extractor that looked the request's API token up, so the log needs no second lookup.
#[derive(Clone, Default)]
pub struct AuditActor(pub std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl AuditActor {
    pub fn take(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The web UI's session cookie: the API token the user logged in with (`ui::session`).
pub const SESSION_COOKIE: &str = "stork_session";
/// The header the UI's scripts send with every change: a form on another site can send the
/// cookie (were it not SameSite=Strict) but never a custom header without CORS, which this
/// appliance does not answer.
pub const UI_HEADER: &str = "x-stork-ui";

/// The session cookie's token, if the request carries one.
pub fn session_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// An API caller's token: the bearer header, or the UI's session cookie. A change sent
/// with the cookie alone must also carry [`UI_HEADER`] (cross-site request forgery).
fn api_token(parts: &Parts) -> Result<&str, ApiError> {
    if parts
        .headers
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        return bearer(parts);
    }
    let Some(token) = session_token(&parts.headers) else {
        return bearer(parts);
    };
    if !parts.method.is_safe() && !parts.headers.contains_key(UI_HEADER) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("a change sent with the session cookie needs the {UI_HEADER} header"),
        ));
    }
    Ok(token)
}

/// The API caller a request's bearer token names, if its token is live and its scope
/// allows `need`.
async fn api_caller(parts: &Parts, state: &AppState, need: TokenScope) -> Result<String, ApiError> {
    let token = api_token(parts)?;
    let is_agent = token.starts_with(AGENT_PREFIX);
    let rec = state.controller.admin_token(hash(token)).await?;
    // Refused calls are logged with the token they used too.
    if let (Some(rec), Some(slot)) = (&rec, parts.extensions.get::<AuditActor>()) {
        *slot
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!("api:{}", rec.id));
    }
    let unauthorized = |message: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            message.to_string(),
        )
    };
    match rec {
        Some(rec) if rec.revoked_at.is_some() => Err(unauthorized("this token was revoked")),
        Some(rec) if !rec.live_at(now_ms()) => Err(unauthorized("this token has expired")),
        Some(rec) if !rec.scope.allows(need) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("a {} token cannot do this: it needs {need}", rec.scope),
        )),
        Some(rec) => Ok(format!("api:{}", rec.id)),
        None if is_agent => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an agent token cannot use this endpoint",
        )),
        None => Err(unauthorized("invalid token")),
    }
}

/// One extractor per scope: a handler names the least scope it needs.
macro_rules! scoped_callers {
    ($($(#[$doc:meta])* $name:ident => $scope:expr,)*) => {$(
        $(#[$doc])*
        pub struct $name {
            /// `api:<token id>`: the actor recorded in events.
            pub actor: String,
        }

        impl<S: Send + Sync> FromRequestParts<S> for $name
        where
            AppState: FromRef<S>,
        {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                let state = AppState::from_ref(state);
                let actor = api_caller(parts, &state, $scope).await?;
                Ok(Self { actor })
            }
        }
    )*};
}

scoped_callers! {
    /// A caller that may read (any live API token).
    Reader => TokenScope::ReadOnly,
    /// A caller that may change machines, images and keys.
    Operator => TokenScope::Operator,
    /// A caller that may manage tokens and read the audit log.
    Admin => TokenScope::Admin,
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
            (Some(machine), _) => {
                // The token works only from the address it was given to (or the installed
                // OS's static one).
                let from = parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip());
                if !from.is_some_and(|ip| crate::lifecycle::boot::token_usable_from(&machine, ip)) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "this agent token belongs to another address",
                    ));
                }
                if !machine.agent.used
                    && let Some(h) = machine.agent.token_hash.clone()
                {
                    state.controller.agent_token_used(h).await?;
                }
                Ok(Agent { machine })
            }
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

/// The largest body an unauthenticated agent request may have: an enlistment's inventory
/// of a large machine is tens of KiB.
pub const MAX_UNAUTHENTICATED_BODY: u64 = 256 << 10;

/// An unauthenticated agent request (enlist, report): rate-limited per source address and
/// small, so that a host on the network cannot fill the disk or the log through them.
pub struct Unauthenticated;

impl<S: Send + Sync> FromRequestParts<S> for Unauthenticated
where
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = AppState::from_ref(state);
        let length = parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length.is_some_and(|n| n > MAX_UNAUTHENTICATED_BODY) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body: more than {MAX_UNAUTHENTICATED_BODY} bytes"),
            ));
        }
        let from = parts.extensions.get::<ConnectInfo<SocketAddr>>().copied();
        if within(&state.agent_limiter, from) {
            Ok(Self)
        } else {
            state
                .http_stats
                .agent_rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many unauthenticated agent requests from this address; retry later",
            ))
        }
    }
}

/// Whether a request from `from` is within `limiter`'s per-address rate (one that names no
/// address is).
pub fn within(
    limiter: &std::sync::Mutex<crate::ratelimit::RateLimiter<std::net::IpAddr>>,
    from: Option<ConnectInfo<SocketAddr>>,
) -> bool {
    from.is_none_or(|c| {
        limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .allow(
                crate::lifecycle::boot::canonical(c.0.ip()),
                std::time::SystemTime::now(),
            )
    })
}
