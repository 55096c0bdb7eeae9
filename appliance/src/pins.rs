//! How the CLI trusts an appliance's HTTPS certificate: a CA file, a fingerprint given on
//! the command line, or the fingerprint pinned at the first connection (trust on first use,
//! as ssh does), kept in a pins file: `$STORK_PINS`, else `$XDG_CONFIG_HOME/stork/pins`,
//! else `~/.config/stork/pins`; one `host:port fingerprint` per line.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_tls::{Fingerprint, Trust};

/// Where the pins are kept.
pub fn pins_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STORK_PINS") {
        return Some(PathBuf::from(p));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("stork/pins"))
}

/// `host` and `port` of an `https://` URL; `None` for any other scheme.
pub fn https_authority(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            match p.parse() {
                Ok(p) => (h, p),
                // An IPv6 literal without a port: every colon is the address's.
                Err(_) => (authority, 443),
            }
        }
        _ => (authority, 443),
    };
    Some((host.to_string(), port))
}

/// What to trust for `url`: nothing for plain HTTP; the CA file or fingerprint given; else
/// the pinned fingerprint, pinned now if this is the first connection.
pub fn trust_for(
    url: &str,
    ca_file: Option<&Path>,
    fingerprint: Option<&str>,
) -> Result<Option<Trust>> {
    let Some((host, port)) = https_authority(url) else {
        return Ok(None);
    };
    if let Some(ca) = ca_file {
        return Ok(Some(Trust::ca_file(ca)?));
    }
    if let Some(f) = fingerprint {
        return Ok(Some(Trust::Pinned(f.parse().context("--fingerprint")?)));
    }
    let Some(file) = pins_file() else {
        bail!(
            "{url}: no CA file, no fingerprint, and no home directory to keep a pin in; \
             give --fingerprint (`stork config show` on the appliance prints it) or --ca-file"
        );
    };
    let key = format!("{host}:{port}");
    if let Some(pinned) = lookup(&file, &key)? {
        return Ok(Some(Trust::Pinned(pinned)));
    }
    let cert = stork_tls::probe(&host, port, Duration::from_secs(10))
        .with_context(|| format!("cannot read the certificate of {key}"))?;
    let fp = Fingerprint::of(&cert);
    append(&file, &key, fp)?;
    eprintln!(
        "stork: first connection to {key}: its certificate {fp} is now pinned in {}; \
         compare it with `stork config show` on the appliance",
        file.display()
    );
    Ok(Some(Trust::Pinned(fp)))
}

fn lookup(file: &Path, key: &str) -> Result<Option<Fingerprint>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        if words.next() == Some(key) {
            let fp = words.next().unwrap_or_default();
            return fp
                .parse()
                .map(Some)
                .with_context(|| format!("{} line {}", file.display(), n + 1));
        }
    }
    Ok(None)
}

fn append(file: &Path, key: &str, fp: Fingerprint) -> Result<()> {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(file)?;
        writeln!(f, "{key} {fp}")
    };
    write().with_context(|| format!("cannot keep the pin in {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_of_an_https_url() {
        let a = |u: &str| https_authority(u);
        assert_eq!(
            a("https://10.0.0.1:8443/api"),
            Some(("10.0.0.1".into(), 8443))
        );
        assert_eq!(a("https://stork.lab"), Some(("stork.lab".into(), 443)));
        assert_eq!(a("https://[::1]:8443"), Some(("[::1]".into(), 8443)));
        assert_eq!(a("http://10.0.0.1:8080"), None);
    }

    #[test]
    fn a_pin_is_kept_and_found_by_host_and_port() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stork/pins");
        let fp = Fingerprint::of(b"x");
        assert_eq!(lookup(&file, "h:1").unwrap(), None);
        append(&file, "h:1", fp).unwrap();
        append(&file, "h:2", Fingerprint::of(b"y")).unwrap();
        assert_eq!(lookup(&file, "h:1").unwrap(), Some(fp));
        assert_eq!(lookup(&file, "h:3").unwrap(), None);
    }
}
