//! The rustls client configurations: CA roots (webpki), a pinned fingerprint, and the
//! recorder that `probe` uses to read a certificate before anything is trusted.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};

use crate::{Fingerprint, Trust};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        // ring supports every safe default version.
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
}

pub(crate) fn client_config(trust: Trust) -> ClientConfig {
    match trust {
        Trust::Roots(certs) => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(certs);
            builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        Trust::Pinned(pin) => with_verifier(Arc::new(Check {
            algorithms: provider().signature_verification_algorithms,
            rule: Rule::Pinned(pin),
        })),
    }
}

fn with_verifier(v: Arc<Check>) -> ClientConfig {
    builder()
        .dangerous()
        .with_custom_certificate_verifier(v)
        .with_no_client_auth()
}

#[derive(Debug)]
enum Rule {
    Pinned(Fingerprint),
    /// Keep the certificate and end the handshake (probe).
    Record(Mutex<Option<CertificateDer<'static>>>),
}

/// The verifier for a pinned fingerprint and for the probe. Handshake signatures are still
/// checked against the certificate's key: a pin of a certificate proves nothing unless the
/// server holds its private key.
#[derive(Debug)]
struct Check {
    algorithms: WebPkiSupportedAlgorithms,
    rule: Rule,
}

/// Why the probe's handshake stopped: it had what it came for.
const RECORDED: &str = "certificate recorded";

impl ServerCertVerifier for Check {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.rule {
            Rule::Pinned(pin) => {
                let got = Fingerprint::of(end_entity);
                if got == *pin {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                            io::Error::other(format!(
                                "the server's certificate is {got}, not the pinned {pin}"
                            )),
                        ))),
                    ))
                }
            }
            Rule::Record(slot) => {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(end_entity.clone().into_owned());
                Err(rustls::Error::General(RECORDED.into()))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

pub(crate) fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))
}

pub(crate) fn probe(
    host: &str,
    port: u16,
    timeout: Duration,
) -> io::Result<CertificateDer<'static>> {
    let check = Arc::new(Check {
        algorithms: provider().signature_verification_algorithms,
        rule: Rule::Record(Mutex::new(None)),
    });
    let config = Arc::new(with_verifier(check.clone()));
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (bare, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address")))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut conn = ClientConnection::new(config, server_name(host)?).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            if let Rule::Record(slot) = &check.rule
                && let Some(cert) = slot.lock().unwrap_or_else(PoisonError::into_inner).take()
            {
                return Ok(cert);
            }
            return Err(e);
        }
    }
    Err(io::Error::other(
        "the handshake ended without a certificate",
    ))
}
