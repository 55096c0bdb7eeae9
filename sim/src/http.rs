//! HTTP and HTTPS from a simulated host: hyper's HTTP/1.1 client over a smoltcp
//! [`TcpStream`], rustls (through tokio-rustls) for the API, whose certificate is pinned as
//! the agent pins it. One connection per request, as the agent's ureq calls and iPXE's
//! fetches come.

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::net::{HostId, Net, TcpStream};

const CONNECT: Duration = Duration::from_secs(10);

/// `http://10.77.0.1:8080/boot/x` or `https://...`, with an IPv4 literal host (the
/// appliance's URLs always are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: Ipv4Addr,
    pub port: u16,
    /// With its query, from the first `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Self> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("{s:?}: not an http:// or https:// URL");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().with_context(|| format!("{s:?}: port"))?),
            None => (authority, if tls { 443 } else { 80 }),
        };
        Ok(Self {
            tls,
            host: host
                .parse()
                .with_context(|| format!("{s:?}: not an IPv4 host"))?,
            port,
            path: path.to_string(),
        })
    }

    /// The same server with another path.
    pub fn join(&self, path: &str) -> Self {
        Self {
            path: path.to_string(),
            ..self.clone()
        }
    }
}

/// A host's HTTP client: plain, or TLS with the config given.
#[derive(Clone)]
pub struct Client {
    pub net: Rc<Net>,
    pub host: HostId,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// Sends one request; `timeout` bounds the connection and the answer's head.
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>> {
        let tcp = TcpStream::connect(&self.net, self.host, (url.host, url.port), CONNECT).await?;
        let mut req = Request::builder()
            .method(method)
            .uri(&url.path)
            .header("host", format!("{}:{}", url.host, url.port))
            .header("user-agent", "stork-sim");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let answer = async {
            if url.tls {
                let config = self
                    .tls
                    .clone()
                    .context("an https:// URL, and no pinned certificate for it")?;
                let name = rustls::pki_types::ServerName::IpAddress(url.host.into());
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?;
                exchange(tls, req).await
            } else {
                exchange(tcp, req).await
            }
        };
        tokio::time::timeout(timeout, answer)
            .await
            .with_context(|| format!("no answer from {} in {timeout:?}", url.path))?
    }

    /// A request whose 2xx answer is JSON (or empty: `null`).
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: &Url,
        token: Option<&str>,
        body: Option<&impl serde::Serialize>,
        timeout: Duration,
    ) -> Result<T> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("authorization", b)])
            .unwrap_or_default();
        let body = body.map(serde_json::to_vec).transpose()?;
        let resp = self.send(method, url, &headers, body, timeout).await?;
        let status = resp.status();
        let bytes = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .context("the answer's body stalled")??
            .to_bytes();
        if !status.is_success() {
            bail!(
                "{} {}: {}",
                url.path,
                status,
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            );
        }
        if bytes.is_empty() {
            return Ok(serde_json::from_value(serde_json::Value::Null)?);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not the JSON expected", url.path))
    }

    /// GETs `url` and reads up to `limit` bytes of its body (all of it: `None`), hashing them;
    /// fails when no byte comes for `stall`. Returns the bytes read and their sha256 (hex).
    pub async fn fetch(&self, url: &Url, limit: Option<u64>, stall: Duration) -> Result<Fetched> {
        let resp = self.send(Method::GET, url, &[], None, stall).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            bail!("GET {}: {status}", url.path);
        }
        let mut body = resp.into_body();
        let mut hash = Sha256::new();
        let mut bytes: u64 = 0;
        let mut text = Vec::new();
        loop {
            if limit.is_some_and(|l| bytes >= l) {
                break;
            }
            let frame = tokio::time::timeout(stall, body.frame())
                .await
                .with_context(|| format!("GET {}: stalled at {bytes} bytes", url.path))?;
            let Some(frame) = frame else { break };
            let frame = frame.with_context(|| format!("GET {}: cut at {bytes} bytes", url.path))?;
            if let Ok(data) = frame.into_data() {
                hash.update(&data);
                bytes += data.len() as u64;
                if text.len() < 64 * 1024 {
                    text.extend_from_slice(&data[..data.len().min(64 * 1024 - text.len())]);
                }
            }
        }
        Ok(Fetched {
            bytes,
            sha256: hex::encode(hash.finalize()),
            head: text,
        })
    }
}

/// What [`Client::fetch`] read.
pub struct Fetched {
    pub bytes: u64,
    pub sha256: String,
    /// The first 64 KiB (a script's text).
    pub head: Vec<u8>,
}

async fn exchange<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<Response<Incoming>>
where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_as_the_appliance_writes_them() {
        let u = Url::parse("http://10.77.0.1:8080/ipxe/52:54:00:00:00:01").unwrap();
        assert_eq!(
            (u.tls, u.host, u.port, u.path.as_str()),
            (
                false,
                Ipv4Addr::new(10, 77, 0, 1),
                8080,
                "/ipxe/52:54:00:00:00:01"
            )
        );
        let u = Url::parse("https://10.77.0.1:8443").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 8443, "/"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://appliance.lan/").is_err());
    }
}
