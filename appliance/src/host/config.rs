//! The `[appliance]` section of `stork.toml`: what only the flashable image uses. `stork
//! appliance setup` reads it at boot; `stork serve` parses it (the file is one file) and
//! ignores it, and the effective config setup writes for serve leaves it out.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, invalid};
use crate::power::Secret;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplianceFile {
    /// The host name, set (transiently: /etc is read-only) at every boot.
    pub hostname: String,
    /// The first admin API token as `auth::hash` makes it: SHA-256, 64 hex digits
    /// (`printf %s TOKEN | sha256sum`).
    pub admin_token_sha256: Option<String>,
    /// Or the token itself; only its hash is stored.
    pub admin_token: Option<Secret>,
}

impl Default for ApplianceFile {
    fn default() -> Self {
        Self {
            hostname: "stork".into(),
            admin_token_sha256: None,
            admin_token: None,
        }
    }
}

/// The shortest plain admin token accepted: a guessable token would open the whole API.
pub const MIN_TOKEN_LEN: usize = 20;

/// The validated section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appliance {
    pub hostname: String,
    /// The configured admin token's hash (lower-case hex), from either key.
    pub admin_token_sha256: Option<String>,
}

impl ApplianceFile {
    pub fn validate(&self) -> Result<Appliance, ConfigError> {
        if !stork_proto::api::valid_hostname(&self.hostname) {
            return Err(invalid(
                "appliance.hostname",
                format!(
                    "{:?} is not a host name (letters, digits and `-` in dot-separated labels, \
                     at most 64 characters)",
                    self.hostname
                ),
            ));
        }
        let admin_token_sha256 = match (&self.admin_token_sha256, &self.admin_token) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "appliance.admin_token",
                    "give admin_token or admin_token_sha256, not both",
                ));
            }
            (Some(h), None) => {
                let h = h.trim().to_ascii_lowercase();
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        "appliance.admin_token_sha256",
                        "must be 64 hex digits, the SHA-256 of the token \
                         (`printf %s TOKEN | sha256sum`)",
                    ));
                }
                Some(h)
            }
            (None, Some(t)) => {
                let t = t.expose();
                if t.len() < MIN_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "appliance.admin_token",
                        format!(
                            "must be at least {MIN_TOKEN_LEN} printable characters without \
                             spaces"
                        ),
                    ));
                }
                Some(crate::auth::hash(t))
            }
            (None, None) => None,
        };
        Ok(Appliance {
            hostname: self.hostname.clone(),
            admin_token_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use std::path::Path;

    fn check(text: &str) -> Result<Appliance, String> {
        FileConfig::parse(text, Path::new("stork.toml"))
            .map_err(|e| e.to_string())?
            .appliance
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_both_token_forms() {
        assert_eq!(
            check("").unwrap(),
            Appliance {
                hostname: "stork".into(),
                admin_token_sha256: None
            }
        );
        let plain = check("[appliance]\nadmin_token = \"stork_admin_0123456789abcdef\"").unwrap();
        assert_eq!(
            plain.admin_token_sha256.as_deref(),
            Some(crate::auth::hash("stork_admin_0123456789abcdef").as_str())
        );
        let h = crate::auth::hash("x").to_uppercase();
        let hashed = check(&format!(
            "[appliance]\nhostname = \"pxe-1.lab\"\nadmin_token_sha256 = \"{h}\""
        ))
        .unwrap();
        assert_eq!(hashed.hostname, "pxe-1.lab");
        assert_eq!(hashed.admin_token_sha256, Some(h.to_lowercase()));
    }

    #[test]
    fn a_bad_field_is_named_and_the_token_never_shown() {
        let err = |text: &str, field: &str| {
            let e = check(text).unwrap_err();
            assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
            e
        };
        err("[appliance]\nhostname = \"bad_name\"", "appliance.hostname");
        err("[appliance]\nhostname = \"-x\"", "appliance.hostname");
        err(
            "[appliance]\nadmin_token_sha256 = \"abc\"",
            "appliance.admin_token_sha256",
        );
        let e = err(
            "[appliance]\nadmin_token = \"short-secret\"",
            "appliance.admin_token",
        );
        assert!(!e.contains("short-secret"), "{e}");
        err(
            "[appliance]\nadmin_token = \"stork_admin_0123456789abcdef\"\nadmin_token_sha256 = \"00\"",
            "appliance.admin_token",
        );
        // Unknown keys are named by the parser.
        let e = check("[appliance]\nhost = \"x\"").unwrap_err();
        assert!(e.contains("host"), "{e}");
        // The plain token stays out of Debug.
        let f = FileConfig::parse(
            "[appliance]\nadmin_token = \"stork_admin_0123456789abcdef\"",
            Path::new("x"),
        )
        .unwrap();
        assert!(!format!("{f:?}").contains("0123456789abcdef"));
    }
}
