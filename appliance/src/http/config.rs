//! The `[http]` section: where the listener is, and the limits that keep one host on the
//! provisioning network from holding it (docs/security.md, "HTTP").

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpFile {
    pub listen: Ipv4Addr,
    pub port: u16,
    /// Open connections at once, from everyone.
    pub max_connections: usize,
    /// Open connections at once from one address.
    pub max_connections_per_ip: usize,
    /// Seconds a connection may take to send a request's headers (slowloris).
    pub header_timeout: u64,
    /// Seconds a request may take to send its body.
    pub body_timeout: u64,
    /// Unauthenticated agent requests (enlist, report) per second from one address, and the
    /// burst allowed above that rate.
    pub agent_rate: u32,
    pub agent_burst: u32,
}

impl Default for HttpFile {
    fn default() -> Self {
        Self {
            listen: Ipv4Addr::UNSPECIFIED,
            port: 8080,
            max_connections: 1024,
            // A booting rack fetches from many addresses; one address with hundreds of
            // connections is a client in a loop (or the API bench, which sets its own).
            max_connections_per_ip: 256,
            header_timeout: 10,
            body_timeout: 60,
            agent_rate: 5,
            agent_burst: 20,
        }
    }
}

impl HttpFile {
    pub fn limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_timeout: Duration::from_secs(self.header_timeout),
            body_timeout: Duration::from_secs(self.body_timeout),
            agent_rate: self.agent_rate,
            agent_burst: self.agent_burst,
        }
    }

    /// The field at fault, if a limit makes no sense.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let zero = |v: u64| v == 0;
        if self.max_connections == 0 {
            return Err(("http.max_connections", "must be at least 1"));
        }
        if self.max_connections_per_ip == 0 {
            return Err(("http.max_connections_per_ip", "must be at least 1"));
        }
        if zero(self.header_timeout) {
            return Err(("http.header_timeout", "must be at least 1 second"));
        }
        if zero(self.body_timeout) {
            return Err(("http.body_timeout", "must be at least 1 second"));
        }
        if self.agent_rate == 0 || self.agent_burst == 0 {
            return Err((
                "http.agent_rate",
                "agent_rate and agent_burst must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The runtime form of the limits.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub agent_rate: u32,
    pub agent_burst: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpFile::default().limits()
    }
}
