//! Limits that keep one client, or many, from exhausting the service: transfers per client
//! address ([`PerClient`], sans I/O), and the process's open-file limit, raised at start and
//! checked against `max_transfers` ([`raise_nofile`], [`transfers_fitting`]).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

/// Transfers running per client IP address, each address capped at `max`.
///
/// Keyed by address only, not port: a client opens a new port per request, so a port cap
/// would stop nobody. IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug)]
pub struct PerClient {
    max: usize,
    running: HashMap<IpAddr, usize>,
}

impl PerClient {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            running: HashMap::new(),
        }
    }

    /// Takes a slot for `ip`: `false` (and nothing taken) when it already runs `max`.
    pub fn try_acquire(&mut self, ip: IpAddr) -> bool {
        let n = self.running.entry(ip.to_canonical()).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a slot [`PerClient::try_acquire`] took; an address's entry goes with its
    /// last transfer, so the map holds only addresses with transfers running.
    pub fn release(&mut self, ip: IpAddr) {
        let key = ip.to_canonical();
        if let Some(n) = self.running.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&key);
            }
        }
    }

    /// Transfers `ip` runs now.
    pub fn running(&self, ip: IpAddr) -> usize {
        self.running.get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    /// Addresses with at least one transfer running.
    pub fn clients(&self) -> usize {
        self.running.len()
    }
}

/// Descriptors one transfer can hold at once: its socket, its file, and a duplicate of the
/// socket while it waits for send-buffer space.
pub const FDS_PER_TRANSFER: u64 = 3;

/// How many of `wanted` transfers fit an open-file limit of `limit` descriptors when TFTP
/// may use half of them (the other half is for HTTP connections, DHCP, SQLite, the lease
/// journal and the runtime). At least 1.
pub fn transfers_fitting(limit: u64, wanted: usize) -> usize {
    let fit = limit / 2 / FDS_PER_TRANSFER;
    usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .min(wanted)
        .max(1)
}

/// `RLIMIT_NOFILE` before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// Soft limit found at start.
    pub was: u64,
    /// Soft limit now.
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("cannot read the open-file limit (RLIMIT_NOFILE)")]
    Get(#[source] io::Error),
    #[error("cannot raise the open-file limit (RLIMIT_NOFILE) from {was} to {hard}")]
    Set {
        was: u64,
        hard: u64,
        #[source]
        source: io::Error,
    },
}

/// Raises the soft open-file limit to the hard one, for the whole process (idempotent).
/// Every TFTP transfer holds a socket and a file, so the usual soft limit of 1024 would
/// cap a boot storm far below `max_transfers`, with `EMFILE` failures instead of a clear
/// refusal.
pub fn raise_nofile() -> Result<Nofile, LimitError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `lim`, a live local for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(LimitError::Get(io::Error::last_os_error()));
    }
    let (was, hard) = (lim.rlim_cur, lim.rlim_max);
    if was >= hard {
        return Ok(Nofile {
            was,
            soft: was,
            hard,
        });
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one `rlimit` from `raised`, a live local for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(LimitError::Set {
            was,
            hard,
            source: io::Error::last_os_error(),
        });
    }
    Ok(Nofile {
        was,
        soft: hard,
        hard,
    })
}

/// [`raise_nofile`], logged, then `wanted` lowered to what the limit covers (with a warning
/// saying how to raise it). What `tftp::run` calls at start.
pub fn max_transfers_for_nofile(wanted: usize) -> usize {
    let soft = match raise_nofile() {
        Ok(n) => {
            tracing::info!(
                was = n.was,
                soft = n.soft,
                hard = n.hard,
                "open-file limit (RLIMIT_NOFILE) at its hard limit"
            );
            n.soft
        }
        Err(LimitError::Set { was, hard, source }) => {
            tracing::warn!(was, hard, error = %source, "cannot raise the open-file limit (RLIMIT_NOFILE); keeping the soft limit");
            was
        }
        Err(LimitError::Get(source)) => {
            tracing::warn!(error = %source, "open-file limit (RLIMIT_NOFILE) unknown: tftp.max_transfers not checked");
            return wanted;
        }
    };
    let fit = transfers_fitting(soft, wanted);
    if fit < wanted {
        let wanted_fds = (wanted as u64).saturating_mul(FDS_PER_TRANSFER * 2);
        tracing::warn!(
            limit = soft,
            max_transfers = wanted,
            serving = fit,
            "open-file limit {soft} too low for {wanted} TFTP transfers (each holds up to {FDS_PER_TRANSFER} descriptors, TFTP takes half the limit): at most {fit} at once; raise the hard limit to {wanted_fds} (systemd LimitNOFILE=, ulimit -Hn)"
        );
    }
    fit
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn per_client_cap() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
        let b = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 101));
        let mut p = PerClient::new(2);
        assert!(p.try_acquire(a));
        assert!(p.try_acquire(a));
        // The third from the same address is refused, and takes nothing.
        assert!(!p.try_acquire(a));
        assert_eq!(p.running(a), 2);
        // Another address is not affected.
        assert!(p.try_acquire(b));
        assert_eq!(p.clients(), 2);
        // A slot given back can be taken again.
        p.release(a);
        assert!(p.try_acquire(a));
        assert!(!p.try_acquire(a));
        // Entries go with their last transfer; a stray release changes nothing.
        p.release(b);
        p.release(b);
        assert_eq!((p.running(b), p.clients()), (0, 1));
        p.release(a);
        p.release(a);
        assert_eq!(p.clients(), 0);
    }

    #[test]
    fn mapped_ipv6_counts_as_its_ipv4_address() {
        let v4 = Ipv4Addr::new(10, 77, 0, 100);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        let mut p = PerClient::new(1);
        assert!(p.try_acquire(IpAddr::V4(v4)));
        assert!(!p.try_acquire(mapped));
        assert!(p.try_acquire(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        p.release(mapped);
        assert_eq!(p.running(IpAddr::V4(v4)), 0);
    }

    #[test]
    fn transfers_fitting_takes_half_the_limit() {
        // The usual soft limit: 1024 / 2 / 3 = 170.
        assert_eq!(transfers_fitting(1024, 1024), 170);
        // systemd's default hard limit covers the default 1024 transfers.
        assert_eq!(transfers_fitting(524_288, 1024), 1024);
        assert_eq!(transfers_fitting(6144, 1024), 1024);
        assert_eq!(transfers_fitting(6143, 1024), 1023);
        // Never 0, never above what was asked.
        assert_eq!(transfers_fitting(0, 1024), 1);
        assert_eq!(transfers_fitting(u64::MAX, 7), 7);
    }

    #[test]
    fn nofile_is_raised_to_the_hard_limit() {
        let n = raise_nofile().unwrap();
        assert_eq!(n.soft, n.hard);
        assert!(n.was <= n.soft);
        // Idempotent.
        let again = raise_nofile().unwrap();
        assert_eq!((again.was, again.soft), (n.soft, n.soft));
        assert!(max_transfers_for_nofile(4) <= 4);
    }
}
