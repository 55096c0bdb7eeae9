//! Bearer tokens. API tokens (scoped: read-only, operator, admin; optionally expiring,
//! revocable) live in the store; each boot of a machine gets its own agent
//! token, carried in its boot script. Only SHA-256 hashes are stored; a token is shown once,
//! when created, and never logged. The HTTP side (reading the header, answering 401/403)
//! is `http::extract`.

use rand::RngCore;
use sha2::{Digest, Sha256};

use stork_proto::api::NewToken;

use crate::store::{Store, TokenRecord, now_ms};

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

/// Creates an API token in the store and returns it (the only time it is visible).
pub fn create_token(
    store: &Store,
    req: &NewToken,
) -> Result<(TokenRecord, String), crate::store::StoreError> {
    let (token, h) = generate(ADMIN_PREFIX);
    let now = now_ms();
    let expires_at = req
        .expires_in_secs
        .map(|s| now.saturating_add(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)));
    let rec = TokenRecord {
        id: h[..12].to_string(),
        description: req.description.clone(),
        created_at: now,
        scope: req.scope,
        expires_at,
        revoked_at: None,
    };
    store.add_token(&rec, &h)?;
    Ok((rec, token))
}
