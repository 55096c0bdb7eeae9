//! The kernel's IPv4 neighbour (ARP) table must hold every machine Stork answers at once.
//!
//! Linux caps it at `net.ipv4.neigh.default.gc_thresh3` entries (1,024 by default), counted
//! over all network namespaces, and beyond that it drops what it cannot resolve ("neighbor
//! table overflow!"): in a boot storm of 1,000 simulated machines Stork's TFTP and DHCP
//! answers to some machines never left, and 29 of them took 50 s more to boot
//! (docs/measurements.md). So `stork serve` sizes the table for its DHCP pools at start:
//! raised where it may write the setting (the appliance, a host's own namespace), a warning
//! naming the setting where it may not (a container or another network namespace, where the
//! setting is the host's).

use std::path::Path;

use super::config::DhcpConfig;

const DIR: &str = "/proc/sys/net/ipv4/neigh/default";

/// Neighbours the pools can hold: every dynamic address and reservation, plus as many
/// again for what else shares the segments (BMCs, switches, the machines' other NICs).
pub fn wanted(dhcp: &DhcpConfig) -> u64 {
    let addresses: u64 = dhcp
        .subnets
        .iter()
        .map(|s| {
            let dynamic: u64 = s
                .ranges
                .iter()
                .map(|(a, b)| u64::from(u32::from(*b).saturating_sub(u32::from(*a))) + 1)
                .sum();
            dynamic + s.reservations.len() as u64
        })
        .sum();
    addresses.saturating_mul(2)
}

/// The thresholds for `wanted` neighbours, never lower than `now`: the soft limit
/// (`gc_thresh2`, above which the kernel collects entries hard) at `wanted`, the hard
/// limit (`gc_thresh3`) at twice that.
pub fn thresholds(wanted: u64, now: (u64, u64)) -> (u64, u64) {
    (now.0.max(wanted), now.1.max(wanted.saturating_mul(2)))
}

/// Raises the table's limits for `dhcp` if they are lower; logs what it did or could not.
pub fn ensure(dhcp: &DhcpConfig) {
    ensure_in(Path::new(DIR), wanted(dhcp));
}

fn ensure_in(dir: &Path, wanted: u64) {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(soft), Some(hard)) = (read("gc_thresh2"), read("gc_thresh3")) else {
        tracing::warn!(
            wanted,
            "the neighbour table's limit is not visible here (another network namespace?): \
             make sure the host's net.ipv4.neigh.default.gc_thresh3 is at least twice the \
             machines on the provisioning network, or answers to some will not leave"
        );
        return;
    };
    let (new_soft, new_hard) = thresholds(wanted, (soft, hard));
    if (new_soft, new_hard) == (soft, hard) {
        return;
    }
    // The hard limit first: the kernel keeps thresh2 <= thresh3 as we go.
    let written = std::fs::write(dir.join("gc_thresh3"), new_hard.to_string())
        .and_then(|()| std::fs::write(dir.join("gc_thresh2"), new_soft.to_string()));
    match written {
        Ok(()) => tracing::info!(
            wanted,
            gc_thresh2 = new_soft,
            gc_thresh3 = new_hard,
            was_thresh2 = soft,
            was_thresh3 = hard,
            "neighbour table raised for the DHCP pools (net.ipv4.neigh.default)"
        ),
        Err(error) => tracing::warn!(
            %error,
            wanted,
            gc_thresh3 = hard,
            "the neighbour table holds fewer entries than the DHCP pools may need, and \
             raising net.ipv4.neigh.default.gc_thresh3 failed: answers to some machines \
             will not leave when the table is full"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dhcp(toml: &str) -> DhcpConfig {
        let cfg = crate::config::FileConfig::parse(toml, Path::new("t"))
            .and_then(|f| f.validate())
            .unwrap();
        cfg.dhcp
    }

    #[test]
    fn wanted_counts_every_pool_and_reservation_twice() {
        // The default pool: 100 addresses.
        assert_eq!(wanted(&dhcp("")), 200);
        let d = dhcp(
            "[dhcp]\nprefix_len = 16\nrange = [\"10.77.16.0\", \"10.77.31.255\"]\n\
             [[dhcp.subnets]]\nnetwork = \"10.78.0.0/24\"\nranges = [[\"10.78.0.10\", \"10.78.0.19\"]]\n",
        );
        assert_eq!(wanted(&d), 2 * (4096 + 10));
    }

    #[test]
    fn thresholds_only_go_up() {
        assert_eq!(thresholds(8192, (512, 1024)), (8192, 16384));
        assert_eq!(thresholds(200, (512, 1024)), (512, 1024));
        assert_eq!(thresholds(800, (512, 1024)), (800, 1600));
    }

    #[test]
    fn raises_low_limits_and_leaves_high_ones() {
        let dir = tempfile::tempdir().unwrap();
        let set = |a: u64, b: u64| {
            std::fs::write(dir.path().join("gc_thresh2"), format!("{a}\n")).unwrap();
            std::fs::write(dir.path().join("gc_thresh3"), format!("{b}\n")).unwrap();
        };
        let get = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        set(512, 1024);
        ensure_in(dir.path(), 2000);
        assert_eq!(
            (get("gc_thresh2"), get("gc_thresh3")),
            ("2000".into(), "4000".into())
        );
        set(8192, 16384);
        ensure_in(dir.path(), 2000);
        assert_eq!(get("gc_thresh3"), "16384\n");
        // Not visible (another namespace): nothing written, no panic.
        ensure_in(&dir.path().join("missing"), 2000);
    }
}
