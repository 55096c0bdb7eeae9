//! HTTPS for the API and the agent routes: the `[tls]` section, the certificate (the
//! user's, or one generated at first start and kept in `DATA_DIR/tls/`), and the rustls
//! server configuration. Boot files and boot scripts stay on plain HTTP, which is all
//! firmware speaks; what the agent fetches from there is checked by the sha256 it got over
//! TLS (docs/security.md, "TLS").

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use stork_tls::Fingerprint;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFile {
    pub enabled: bool,
    pub port: u16,
    /// The certificate chain (PEM) and its key; both unset: generated at first start.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Extra names and addresses for the generated certificate, beyond localhost, the
    /// host name, 127.0.0.1 and the appliance's address.
    pub names: Vec<String>,
}

impl Default for TlsFile {
    fn default() -> Self {
        Self {
            enabled: true,
            port: 8443,
            cert: None,
            key: None,
            names: Vec::new(),
        }
    }
}

impl TlsFile {
    /// The field at fault, if any.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.enabled && self.port == 0 {
            return Err(("tls.port", "must not be 0"));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(("tls.cert", "tls.cert and tls.key are given together"));
        }
        Ok(())
    }

    /// Where the certificate and key are read from (or generated into).
    pub fn paths(&self, data_dir: &Path) -> (PathBuf, PathBuf) {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (data_dir.join("tls/cert.pem"), data_dir.join("tls/key.pem")),
        }
    }
}

/// The runtime form: where the files are, and what goes into a generated certificate.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Generate the pair when both are missing (the user gave no files).
    pub generate: bool,
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS {what} {path}: {why}")]
    Bad {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("cannot write the generated TLS certificate to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a TLS certificate: {0}")]
    Generate(String),
}

/// The server side: rustls' configuration and the certificate's fingerprint.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub fingerprint: Fingerprint,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl TlsConfig {
    /// Reads the pair, generating it first if it is ours to generate and missing.
    pub fn load(&self, address: Ipv4Addr) -> Result<ServerTls, TlsError> {
        if self.generate && !self.cert.exists() && !self.key.exists() {
            generate(&self.cert, &self.key, address, &self.names)?;
        }
        let chain = read_chain(&self.cert)?;
        let key_pem = std::fs::read(&self.key).map_err(|source| TlsError::Read {
            what: "key",
            path: self.key.clone(),
            source,
        })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Bad {
            what: "key",
            path: self.key.clone(),
            why: e.to_string(),
        })?;
        let fingerprint = Fingerprint::of(&chain[0]);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| TlsError::Bad {
            what: "key",
            path: self.key.clone(),
            why: format!("does not go with {}: {e}", self.cert.display()),
        })?;
        Ok(ServerTls {
            config: Arc::new(config),
            fingerprint,
        })
    }

    /// The certificate's fingerprint, if the file is there (for `stork config show`).
    pub fn fingerprint(&self) -> Result<Fingerprint, TlsError> {
        Ok(Fingerprint::of(&read_chain(&self.cert)?[0]))
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "certificate",
        path: path.to_path_buf(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bad {
            what: "certificate",
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Bad {
            what: "certificate",
            path: path.to_path_buf(),
            why: "holds no PEM certificate".into(),
        });
    }
    Ok(chain)
}

/// A self-signed certificate for the names a client may use to reach this appliance. The
/// CLI and the agent pin its fingerprint, so the names matter only to a client that checks
/// them against a CA it was given (then the user supplies the certificate anyway).
fn generate(cert: &Path, key: &Path, address: Ipv4Addr, extra: &[String]) -> Result<(), TlsError> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.push(address.to_string());
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    names.extend(extra.iter().cloned());
    names.dedup();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    for n in &names {
        params.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e| TlsError::Generate(format!("name {n:?}: {e}")))?,
            ),
        });
    }
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Stork appliance {address}"),
    );
    let now = std::time::SystemTime::now();
    // A day back for a client whose clock lags; ten years ahead: an appliance is not
    // expected to renew a certificate nobody else signed.
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
    let pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let signed = params
        .self_signed(&pair)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // The key first, 0600 from its creation; the certificate last, so a certificate on
    // disk always has its key.
    write_new(key, pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert, signed.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_pair_loads_and_keeps_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let file = TlsFile::default();
        let (cert, key) = file.paths(dir.path());
        let cfg = TlsConfig {
            port: 8443,
            cert: cert.clone(),
            key: key.clone(),
            generate: true,
            names: vec!["stork.lab".into()],
        };
        let first = cfg.load(Ipv4Addr::new(10, 77, 0, 1)).unwrap();
        let again = cfg.load(Ipv4Addr::new(10, 77, 0, 1)).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint, "generated once");
        assert_eq!(cfg.fingerprint().unwrap(), first.fingerprint);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A user's certificate without its key is named.
        let user = TlsConfig {
            key: dir.path().join("missing.pem"),
            generate: false,
            ..cfg
        };
        let e = user.load(Ipv4Addr::LOCALHOST).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
