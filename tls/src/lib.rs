//! TLS for Stork's HTTP clients (CLI, agent, Redfish driver): ureq over rustls, trusting
//! either CA certificates (webpki, the server's name checked) or one certificate pinned by
//! its SHA-256 fingerprint. Pinning checks no name on purpose: an appliance's generated
//! certificate, or a BMC's self-signed one, is known by its fingerprint (printed by
//! `stork config show`, or by the BMC's own page), not by a name it may not carry.
//!
//! ureq's own rustls connector only takes root certificates, so pinning needs a connector of
//! our own (`connector`); the verifier is in `verify`.

mod connector;
mod fingerprint;
mod verify;

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub use fingerprint::{Fingerprint, FingerprintError};
pub use rustls;

/// What a client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The one certificate whose DER has this SHA-256 (names not checked).
    Pinned(Fingerprint),
    /// Certificates issued by these CAs for the name in the URL.
    Roots(Vec<CertificateDer<'static>>),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read CA file {path}: {source}")]
    ReadCa {
        path: String,
        source: std::io::Error,
    },
    #[error("CA file {0} holds no PEM certificate")]
    NoCertificate(String),
    #[error("no usable CA certificate in {path}: {why}")]
    BadCa { path: String, why: String },
}

impl Trust {
    /// The CA certificates of a PEM file.
    pub fn ca_file(path: &std::path::Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| Error::ReadCa {
            path: shown.clone(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::BadCa {
                path: shown.clone(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(Error::NoCertificate(shown));
        }
        Ok(Self::Roots(certs))
    }
}

/// A ureq agent that speaks `https://` with `trust` (and `http://` as ureq does). Without
/// a trust, an `https://` URL fails with an error that says what to set.
pub fn agent(config: ureq::config::Config, trust: Option<Trust>) -> ureq::Agent {
    use ureq::unversioned::resolver::DefaultResolver;
    use ureq::unversioned::transport::{Connector, TcpConnector};
    let tls = connector::TlsConnector::new(trust.map(|t| Arc::new(verify::client_config(t))));
    ureq::Agent::with_parts(
        config,
        TcpConnector::default().chain(tls),
        DefaultResolver::default(),
    )
}

/// The rustls client configuration for `trust`, for a client that is not ureq (a test
/// speaking raw HTTP over TLS).
pub fn client_config(trust: Trust) -> rustls::ClientConfig {
    verify::client_config(trust)
}

/// The certificate `host:port` presents, without trusting it: for pinning on first use.
/// Nothing is sent but the handshake.
pub fn probe(
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> std::io::Result<CertificateDer<'static>> {
    verify::probe(host, port, timeout)
}
