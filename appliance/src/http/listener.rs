//! The HTTP accept loop: the router served by hyper with what `axum::serve` does not offer
//! (docs/security.md, "HTTP"): a cap on open connections, from everyone and from one
//! address, and a deadline for a request's headers, so that slow or idle connections from
//! one host (slowloris) cannot hold the listener. The request body's deadline is a layer of
//! the router (`router`). The same loop serves HTTPS: the TLS handshake then runs under
//! the header deadline.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::config::HttpLimits;

counters! {
    /// The listener's counters, in `/stats` as `http`.
    HttpStats, HttpStatsSnapshot;
    connections,
    /// Closed at once: the listener held `max_connections` already.
    refused_busy,
    /// Closed at once: that address held `max_connections_per_ip` already.
    refused_per_ip,
    /// Unauthenticated agent requests refused by the per-address rate limit.
    agent_rate_limited,
}

/// Open connections, in all and by address.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// One open connection's place; given back when dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    Busy,
    PerIp,
}

fn take_slot(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &HttpLimits) -> Result<Slot, Full> {
    let mut o = open.lock().unwrap_or_else(PoisonError::into_inner);
    if o.total >= limits.max_connections {
        return Err(Full::Busy);
    }
    let n = o.by_ip.entry(ip).or_default();
    if *n >= limits.max_connections_per_ip {
        return Err(Full::PerIp);
    }
    *n += 1;
    o.total += 1;
    Ok(Slot {
        open: open.clone(),
        ip,
    })
}

/// How a listener's connections arrive, and what the router is told of it.
#[derive(Clone)]
pub enum Channel {
    /// Plain HTTP, with the API and agent routes on this listener.
    Plain,
    /// Plain HTTP beside an HTTPS listener: the API and agent routes are refused here
    /// (each request carries a [`PlainBesideTls`] naming where to go instead).
    PlainBesideTls(PlainBesideTls),
    Tls(tokio_rustls::TlsAcceptor),
}

/// In a plain request's extensions while HTTPS is on: the API's HTTPS base URL.
#[derive(Clone, Debug)]
pub struct PlainBesideTls {
    pub api_url: Arc<str>,
}

/// Serves `app` on `listener` until the task is cancelled or accepting fails.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    channel: Channel,
) -> std::io::Result<()> {
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors or a connection reset before accept: the next one
            // may work; a pause keeps a full fd table from spinning the loop.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "HTTP accept failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ip = crate::lifecycle::boot::canonical(peer.ip());
        let slot = match take_slot(&open, ip, &limits) {
            Ok(s) => s,
            Err(full) => {
                let counter = match full {
                    Full::Busy => &stats.refused_busy,
                    Full::PerIp => &stats.refused_per_ip,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, ?full, "HTTP connection refused");
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (app, channel) = (app.clone(), channel.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let plain = match &channel {
                Channel::PlainBesideTls(p) => Some(p.clone()),
                _ => None,
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                // What `into_make_service_with_connect_info` would add: who is asking.
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                if let Some(p) = &plain {
                    req.extensions_mut().insert(p.clone());
                }
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let served = match channel {
                Channel::Tls(acceptor) => {
                    // The handshake gets the headers' deadline: a silent client holds a
                    // slot no longer over TLS than without it.
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                Channel::Plain | Channel::PlainBesideTls(_) => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_all_and_per_address_and_given_back() {
        let limits = HttpLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..HttpLimits::default()
        };
        let open = Arc::new(Mutex::new(Open::default()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = take_slot(&open, a, &limits).unwrap();
        let _a2 = take_slot(&open, a, &limits).unwrap();
        assert_eq!(take_slot(&open, a, &limits).err(), Some(Full::PerIp));
        let _b1 = take_slot(&open, b, &limits).unwrap();
        assert_eq!(take_slot(&open, b, &limits).err(), Some(Full::Busy));
        drop(a1);
        assert!(take_slot(&open, b, &limits).is_ok());
    }
}
