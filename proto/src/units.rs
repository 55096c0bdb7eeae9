//! Sizes for people: one formatter for the agent's console lines and the `stork` CLI's tables,
//! so a disk reads the same in both.

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// `512 MiB`, `10.0 GiB`, `3.6 TiB`: whole MiB below a GiB (nothing Stork sizes is smaller
/// than a MiB), one decimal above, short enough for one console line per device.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= TIB {
        format!("{:.1} TiB", bytes as f64 / TIB as f64)
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_a_readable_unit() {
        assert_eq!(human_bytes(0), "0 MiB");
        assert_eq!(human_bytes((1 << 20) - 1), "0 MiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes((1 << 30) - 1), "1023 MiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(4_000_787_030_016), "3.6 TiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }
}
