//! TFTP service: read-only, confined to the boot-file root, with option negotiation
//! (RFC 2347 blksize/tsize/timeout from RFC 2348/2349, windowsize from RFC 7440).
//!
//! Layers, sans I/O first: [`packet`] (wire view and `Repr`), [`options`] (negotiation),
//! [`request`] (read-only, modes, path normalisation), [`transfer`] (one transfer's state
//! machine, time passed in), [`limits`] (transfers per client address, the open-file
//! limit), then [`fs`] (confinement on disk) and [`server`] (tokio: the listening socket
//! and one task with its own ephemeral-port socket per transfer).
//!
//! Against a hostile LAN (`docs/security.md`, TFTP): a client `timeout` above
//! [`options::MAX_CLIENT_TIMEOUT_SECS`] is not acknowledged and none outlasts the server's
//! retry budget ([`TftpConfig::retry_budget`]); transfers per client address are capped;
//! netascii is encoded as it is sent; `RLIMIT_NOFILE` is raised and checked at start.
//!
//! # Why our own implementation rather than `async-tftp`
//! `async-tftp` 0.4.2 speaks the same RFCs, windowsize included, but it runs its own smol
//! reactor thread beside tokio, and what Stork needs sits inside its transfer loop, not
//! behind its `Handler` trait:
//! - counters per retransmission, timeout and malformed packet, next to the DHCP ones;
//! - control over the window (capped per server) and per-transfer timeouts with backoff,
//!   and a state machine we can test as transcripts (wrap, duplicate ACKs, windows);
//! - confinement we can prove (canonicalised paths, `O_NOFOLLOW`, a case-insensitive
//!   fallback for firmware that upper-cases names) and, next, files generated per machine;
//! - one runtime: tasks cancelled with the rest of `stork serve`, no second reactor to tune.
//!
//! The sans-IO core (wire, negotiation, requests, state machine) is about 1,100 lines before
//! tests and the tokio layer about 750: less than the glue a second runtime would need.
//! Measured with `cargo xtask bench tftp` against tftpd-hpa and dnsmasq: on par with them
//! lock-step, ahead with windows and in a boot storm, and far ahead once there is latency.

pub mod config;
pub mod fs;
pub mod limits;
pub mod options;
pub mod packet;
pub mod request;
pub mod server;
pub mod transfer;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use server::{bind, run, run_with};

/// Files the service makes when asked instead of reading them from the root: the GRUB
/// configurations of the signed boot chain (`crate::grub`), which say per machine what it
/// boots now, as the iPXE script does over HTTP.
pub trait Generated: Send + Sync {
    /// The file at `path` (normalised, relative to the root) for the client at `peer`;
    /// `None` when `path` is not one of its files, and the root serves it.
    fn generate(
        &self,
        path: &str,
        peer: std::net::IpAddr,
    ) -> Option<futures_util::future::BoxFuture<'static, Result<Vec<u8>, request::Refused>>>;
}

/// Well-known TFTP port (RFC 1350).
pub const PORT: u16 = 69;

/// Runtime configuration of the TFTP service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpConfig {
    /// Served directory; `stork serve` uses DATA_DIR/boot, the same files as HTTP /boot/.
    pub root: PathBuf,
    /// Listening address; transfers use ephemeral ports on the same IP.
    pub listen: SocketAddr,
    /// When a name is not found, match it case-insensitively (firmware that upper-cases).
    pub case_insensitive: bool,
    /// Largest block size granted (8..=65464); clients asking more get this.
    pub max_block: u16,
    /// Largest window granted (RFC 7440); 1 disables windowing.
    pub max_window: u16,
    /// First retransmission interval when the client sets no `timeout` option (or one above
    /// [`options::MAX_CLIENT_TIMEOUT_SECS`], which is not acknowledged).
    pub timeout: Duration,
    /// Cap of the exponential backoff.
    pub max_timeout: Duration,
    /// Retransmissions without progress before a transfer is dropped. With `timeout` and
    /// `max_timeout` this sets the retry budget ([`TftpConfig::retry_budget`]): the longest
    /// a transfer may go without progress, whatever `timeout` its client asked.
    pub retries: u32,
    /// Concurrent transfers; requests beyond are dropped (the client asks again). Lowered
    /// at start when the open-file limit cannot cover it ([`limits::transfers_fitting`]).
    pub max_transfers: usize,
    /// Concurrent transfers per client IP address; a request beyond gets an ERROR and is
    /// counted in `per_client_refused`. A booting machine needs one or two at a time (EDK2
    /// probes the size, then fetches), so the default 8 leaves room while one address
    /// cannot take more than 8 of the `max_transfers` slots.
    pub max_transfers_per_client: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("./var/boot"),
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
            case_insensitive: false,
            max_block: packet::MAX_BLOCK_SIZE,
            max_window: 64,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(4),
            retries: 5,
            max_transfers: 1024,
            max_transfers_per_client: DEFAULT_MAX_TRANSFERS_PER_CLIENT,
        }
    }
}

/// Default of [`TftpConfig::max_transfers_per_client`] (and of the file's key).
pub const DEFAULT_MAX_TRANSFERS_PER_CLIENT: usize = 8;

impl TftpConfig {
    /// Checks the limits; `run` calls it, a config loader may call it to name the field.
    pub fn validate(&self) -> Result<(), TftpError> {
        let bad = |field, why: &str| {
            Err(TftpError::Invalid {
                field,
                why: why.to_string(),
            })
        };
        if !(options::MIN_BLOCK_SIZE..=packet::MAX_BLOCK_SIZE).contains(&self.max_block) {
            return bad("max_block", "must be 8..=65464");
        }
        if self.max_window == 0 {
            return bad("max_window", "must be at least 1");
        }
        if self.timeout.is_zero() {
            return bad("timeout", "must be more than 0");
        }
        if self.max_timeout < self.timeout {
            return bad("max_timeout", "must be at least `timeout`");
        }
        if self.max_transfers == 0 {
            return bad("max_transfers", "must be at least 1");
        }
        if self.max_transfers_per_client == 0 {
            return bad("max_transfers_per_client", "must be at least 1");
        }
        Ok(())
    }

    /// The longest a transfer may go without progress before it is dropped: the server's
    /// own schedule (`timeout`, doubling up to `max_timeout`, `retries` times), 19 s by
    /// default. A client's `timeout` option changes the intervals inside it, never its end.
    pub fn retry_budget(&self) -> Duration {
        transfer::Timing::budget_of(self.timeout, self.max_timeout, self.retries)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("cannot open the TFTP socket on {listen}")]
    Bind {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TFTP root {path} is not a readable directory")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TFTP config field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("TFTP socket receive failed")]
    Recv(#[source] std::io::Error),
}

counters! {
    /// Counters exposed through the API, beside the DHCP ones.
    Stats, StatsSnapshot;
    /// Read and write requests received on the listening port.
    requests,
    /// Requests answered with an ERROR (write, traversal, not found, bad mode...).
    refused,
    /// A retransmitted request for a transfer already under way (not started twice).
    duplicate_requests,
    /// Requests dropped because `max_transfers` were running.
    busy,
    /// Requests refused with an ERROR because their client address already had
    /// `max_transfers_per_client` transfers running.
    per_client_refused,
    transfers_started,
    transfers_completed,
    /// Timed out, aborted by the client, or a local error.
    transfers_failed,
    /// Transfers dropped for want of ACKs (also counted in `transfers_failed`).
    timeouts,
    /// Transfers running now.
    active,
    /// File bytes sent in DATA packets, retransmissions included.
    bytes_sent,
    /// DATA and OACK packets sent.
    packets_sent,
    /// DATA and OACK packets sent again (timeout, or a window restarted by the client).
    retransmits,
    /// ERROR packets sent.
    errors_sent,
    /// ERROR packets received from clients.
    errors_received,
    /// Datagrams that are not TFTP, on the listening port or a transfer's.
    malformed,
    /// Socket errors while sending or receiving.
    io_errors,
    /// Datagrams whose handling panicked (a bug): each was dropped, the service kept on.
    panics,
}

fn bump(c: &AtomicU64) {
    add(c, 1);
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        TftpConfig::default().validate().unwrap();
        let c = TftpConfig {
            max_block: 7,
            ..TftpConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`max_block`")
        );
        let c = TftpConfig {
            max_timeout: Duration::from_millis(10),
            ..TftpConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`max_timeout`")
        );
        let c = TftpConfig {
            max_transfers_per_client: 0,
            ..TftpConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`max_transfers_per_client`")
        );
    }

    #[test]
    fn default_retry_budget() {
        let c = TftpConfig::default();
        assert_eq!(c.retry_budget(), Duration::from_secs(19));
        assert_eq!(c.max_transfers_per_client, 8);
    }
}
