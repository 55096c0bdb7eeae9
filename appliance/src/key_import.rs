//! `stork ssh-key import`: public keys from where people publish them. `gh:USER` is
//! GitHub's list of a user's keys (`https://github.com/USER.keys`), `lp:USER` Launchpad's,
//! and any `https://` URL serving `authorized_keys` lines works the same way.
//!
//! The CLI fetches, not the appliance: the appliance sits on the provisioning network and
//! makes no requests out of it; the person importing has the network the keys are on. Only
//! HTTPS (keys decide who logs in to deployed machines), with a size and a time limit.

use std::time::Duration;

use stork_proto::api::valid_ssh_key;

/// The largest answer read: a user's keys are a few KiB.
pub const MAX_BODY: u64 = 1 << 20;
/// The whole fetch, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Where `gh:` and `lp:` sources point unless `STORK_GH_URL` / `STORK_LP_URL` say
/// otherwise (a mirror, a test's server).
pub const GITHUB: &str = "https://github.com";
pub const LAUNCHPAD: &str = "https://launchpad.net";
/// The system's CA certificates (Debian's `ca-certificates`).
pub const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    #[error(
        "{0:?} is not a key source: give gh:USER, lp:USER or an https:// URL serving authorized_keys lines"
    )]
    Source(String),
    #[error("{0:?} is not a user name (letters, digits, `-`, `_` and `.`)")]
    User(String),
    #[error("{url}: {why}")]
    Fetch { url: String, why: String },
    #[error("{url} line {line}: {}", stork_proto::api::NOT_AN_SSH_KEY)]
    NotAKey { url: String, line: usize },
    #[error("{0} lists no key")]
    NoKeys(String),
}

/// The URL `source` names, with `gh:` and `lp:` under `github` and `launchpad`.
pub fn source_url(source: &str, github: &str, launchpad: &str) -> Result<String, ImportError> {
    let source = source.trim();
    let user = |u: &str| {
        let ok = !u.is_empty()
            && u.len() <= 64
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(u.to_string())
        } else {
            Err(ImportError::User(u.to_string()))
        }
    };
    if let Some(u) = source.strip_prefix("gh:") {
        return Ok(format!(
            "{}/{}.keys",
            github.trim_end_matches('/'),
            user(u)?
        ));
    }
    if let Some(u) = source.strip_prefix("lp:") {
        return Ok(format!(
            "{}/~{}/+sshkeys",
            launchpad.trim_end_matches('/'),
            user(u)?
        ));
    }
    if source.starts_with("https://") && source.len() > "https://".len() {
        return Ok(source.to_string());
    }
    Err(ImportError::Source(source.to_string()))
}

/// The keys in an `authorized_keys` text: one per line, blank lines and `#` comments
/// skipped. Any other line that is not a key refuses the whole text (naming the line), so
/// nothing half-read is imported.
pub fn parse(url: &str, text: &str) -> Result<Vec<String>, ImportError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !valid_ssh_key(line) {
            return Err(ImportError::NotAKey {
                url: url.to_string(),
                line: n + 1,
            });
        }
        keys.push(line.to_string());
    }
    if keys.is_empty() {
        return Err(ImportError::NoKeys(url.to_string()));
    }
    Ok(keys)
}

/// GETs `url` trusting `trust`, within [`TIMEOUT`] and [`MAX_BODY`].
pub fn fetch(url: &str, trust: stork_tls::Trust) -> Result<String, ImportError> {
    let fail = |why: String| ImportError::Fetch {
        url: url.to_string(),
        why,
    };
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .build();
    let agent = stork_tls::agent(config, Some(trust));
    let mut response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop";

    #[test]
    fn sources_name_urls() {
        let url = |s| source_url(s, "https://gh.example/", LAUNCHPAD);
        assert_eq!(url("gh:alice"), Ok("https://gh.example/alice.keys".into()));
        assert_eq!(
            url(" lp:bob.smith "),
            Ok("https://launchpad.net/~bob.smith/+sshkeys".into())
        );
        assert_eq!(
            url("https://keys.example/me"),
            Ok("https://keys.example/me".into())
        );
        // Keys decide who logs in: never over plain HTTP.
        assert!(matches!(
            url("http://keys.example/me"),
            Err(ImportError::Source(_))
        ));
        assert!(matches!(url("alice"), Err(ImportError::Source(_))));
        assert!(matches!(url("gh:../x"), Err(ImportError::User(_))));
        assert!(matches!(url("gh:"), Err(ImportError::User(_))));
    }

    #[test]
    fn authorized_keys_lines_or_nothing() {
        let text = format!("# mine\n\n{KEY}\n  {KEY}-2  \n");
        assert_eq!(
            parse("u", &text),
            Ok(vec![KEY.to_string(), format!("{KEY}-2")])
        );
        assert_eq!(
            parse("u", &format!("{KEY}\n<html>Not Found</html>\n")),
            Err(ImportError::NotAKey {
                url: "u".into(),
                line: 2
            })
        );
        assert_eq!(
            parse("u", "\n# none\n"),
            Err(ImportError::NoKeys("u".into()))
        );
    }
}
