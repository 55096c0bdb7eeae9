//! Bearer tokens. Admin tokens live in the store; each boot of a machine gets its own agent
//! token, carried in its boot script. Only SHA-256 hashes are stored; a token is shown once,
//! when created, and never logged. The HTTP side (reading the header, answering 401/403)
//! is `http::extract`.

use rand::RngCore;
use sha2::{Digest, Sha256};

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
