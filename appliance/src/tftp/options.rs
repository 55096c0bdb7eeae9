//! Option negotiation, sans I/O: what the client asked for (RFC 2347), what the server
//! grants within its limits, and the OACK that says so.

use std::time::Duration;

use super::packet::{DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, Options, OptionsWriter};

/// RFC 2348: block size, 8..=65464.
pub const BLKSIZE: &str = "blksize";
/// RFC 2349: transfer size; 0 in a read request, the file size in the OACK.
pub const TSIZE: &str = "tsize";
/// RFC 2349: retransmission timeout in seconds, 1..=255.
pub const TIMEOUT: &str = "timeout";
/// RFC 7440: blocks sent before an ACK is awaited, 1..=65535.
pub const WINDOWSIZE: &str = "windowsize";

pub const MIN_BLOCK_SIZE: u16 = 8;

/// Largest client `timeout` (seconds) the server acknowledges and uses. A provisioning LAN
/// answers in well under a millisecond and the server's own backoff tops out at
/// `max_timeout` (4 s by default), so a legitimate client gains nothing from more; what a
/// longer interval buys is a silent client holding a transfer slot longer. RFC 2349 lets
/// the server only echo the client's value or leave the option out, so a larger request is
/// not acknowledged and the server's own `timeout` applies (curl asks 6 and copes).
pub const MAX_CLIENT_TIMEOUT_SECS: u8 = 5;

/// The options of a request that Stork understands; anything else is ignored, as RFC 2347
/// allows, and listed for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requested {
    pub blksize: Option<u16>,
    pub tsize: bool,
    pub timeout: Option<u8>,
    pub windowsize: Option<u16>,
    /// Names of options that were unknown, repeated or out of range.
    pub ignored: Vec<String>,
}

/// A decimal option value: ASCII digits only (no sign, no spaces), at most 10 of them.
fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

impl Requested {
    pub fn from_options(opts: Options<'_>) -> Self {
        let mut r = Self::default();
        let mut seen = Vec::<&[u8]>::new();
        for (name, value) in opts.iter() {
            let lname = name.to_ascii_lowercase();
            // RFC 2347 does not define repeats; the first one counts.
            let repeated = seen.iter().any(|s| s.eq_ignore_ascii_case(name));
            seen.push(name);
            let n = number(value);
            let ok = !repeated
                && match lname.as_slice() {
                    b"blksize" => {
                        r.blksize = n
                            .filter(|n| {
                                (u64::from(MIN_BLOCK_SIZE)..=u64::from(MAX_BLOCK_SIZE)).contains(n)
                            })
                            .and_then(|n| u16::try_from(n).ok());
                        r.blksize.is_some()
                    }
                    // A read request's value means nothing (RFC 2349 says 0); atftp 0.8
                    // sends "enable". Any value asks for the size.
                    b"tsize" => {
                        r.tsize = true;
                        true
                    }
                    b"timeout" => {
                        r.timeout = n.filter(|n| *n >= 1).and_then(|n| u8::try_from(n).ok());
                        r.timeout.is_some()
                    }
                    b"windowsize" => {
                        r.windowsize = n.filter(|n| *n >= 1).and_then(|n| u16::try_from(n).ok());
                        r.windowsize.is_some()
                    }
                    _ => false,
                };
            if !ok {
                r.ignored.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        r
    }
}

/// What the server allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest block granted; larger requests get this (RFC 2348 lets the server lower it).
    pub max_block: u16,
    /// Largest window granted.
    pub max_window: u16,
}

/// The terms of one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub block_size: u16,
    pub window: u16,
    /// The client's retransmission timeout, when it set one of at most
    /// [`MAX_CLIENT_TIMEOUT_SECS`] (then acknowledged and used, RFC 2349); `None` otherwise.
    pub timeout: Option<Duration>,
    /// The OACK to send first, or `None` to start with DATA 1 (no option was granted).
    pub oack: Option<OptionsWriter>,
}

/// Grants what the client asked within `limits`. `size` is the byte count the transfer
/// will send (the file, or its netascii form).
pub fn negotiate(req: &Requested, limits: Limits, size: u64) -> Negotiated {
    let mut oack = OptionsWriter::default();
    // Pushes only fail on empty names or NUL, which these constant names and decimal
    // numbers never contain; a failed push would just leave the option out.
    let mut grant = |name: &str, value: String| {
        let _ = oack.push(name, &value);
    };
    let mut block_size = DEFAULT_BLOCK_SIZE;
    if let Some(b) = req.blksize {
        block_size = b.min(limits.max_block).max(MIN_BLOCK_SIZE);
        grant(BLKSIZE, block_size.to_string());
    }
    // curl (lib/tftp.c, 7.88 here) rejects an OACK carrying tsize 0 as invalid, so an empty
    // file fails against tftpd-hpa too; for 0 bytes the option is left out, and the empty
    // DATA 1 tells the size just as well.
    if req.tsize && size > 0 {
        grant(TSIZE, size.to_string());
    }
    // RFC 2349: "The specified timeout value must match the value specified by the
    // client." No lowering as for blksize: above the cap the option is left out.
    let timeout = req
        .timeout
        .filter(|t| *t <= MAX_CLIENT_TIMEOUT_SECS)
        .map(|t| {
            grant(TIMEOUT, t.to_string());
            Duration::from_secs(u64::from(t))
        });
    let mut window = 1;
    if let Some(w) = req.windowsize {
        window = w.min(limits.max_window).max(1);
        grant(WINDOWSIZE, window.to_string());
    }
    Negotiated {
        block_size,
        window,
        timeout,
        oack: (!oack.is_empty()).then_some(oack),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_block: 1468,
        max_window: 64,
    };

    fn opts(pairs: &[(&str, &str)]) -> OptionsWriter {
        let mut w = OptionsWriter::default();
        for (n, v) in pairs {
            w.push(n, v).unwrap();
        }
        w
    }

    fn oack_pairs(n: &Negotiated) -> Vec<(String, String)> {
        n.oack
            .as_ref()
            .map(|w| {
                w.options()
                    .iter()
                    .map(|(a, b)| {
                        (
                            String::from_utf8_lossy(a).into_owned(),
                            String::from_utf8_lossy(b).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn ovmf_request_is_granted_in_full() {
        // What OVMF's PXE asks for (docs/measurements.md): blksize 1468, windowsize 4, tsize.
        let w = opts(&[("blksize", "1468"), ("windowsize", "4"), ("tsize", "0")]);
        let req = Requested::from_options(w.options());
        assert_eq!(req.blksize, Some(1468));
        assert_eq!(req.windowsize, Some(4));
        assert!(req.tsize);
        let n = negotiate(&req, LIMITS, 1_000_000);
        assert_eq!((n.block_size, n.window, n.timeout), (1468, 4, None));
        assert_eq!(
            oack_pairs(&n),
            [
                ("blksize", "1468"),
                ("tsize", "1000000"),
                ("windowsize", "4")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn limits_lower_what_is_asked() {
        let w = opts(&[
            ("BLKSIZE", "65464"),
            ("WindowSize", "65535"),
            ("timeout", "3"),
        ]);
        let n = negotiate(&Requested::from_options(w.options()), LIMITS, 0);
        assert_eq!(n.block_size, 1468);
        assert_eq!(n.window, 64);
        assert_eq!(n.timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            oack_pairs(&n),
            [("blksize", "1468"), ("timeout", "3"), ("windowsize", "64")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn out_of_range_unknown_and_repeated_options_are_ignored() {
        let w = opts(&[
            ("blksize", "7"),
            ("timeout", "0"),
            ("timeout", "256"),
            ("windowsize", "0"),
            ("multicast", ""),
            ("blksize", "+512"),
        ]);
        let req = Requested::from_options(w.options());
        assert_eq!(req.blksize, None);
        assert_eq!(req.timeout, None);
        assert_eq!(req.windowsize, None);
        assert!(!req.tsize);
        assert_eq!(req.ignored.len(), 6);
        let n = negotiate(&req, LIMITS, 10);
        assert_eq!((n.block_size, n.window), (DEFAULT_BLOCK_SIZE, 1));
        assert!(n.oack.is_none(), "nothing granted: no OACK, DATA 1 first");

        let w = opts(&[("blksize", "1024"), ("blksize", "2048")]);
        assert_eq!(Requested::from_options(w.options()).blksize, Some(1024));
    }

    #[test]
    fn timeout_above_the_cap_is_not_acknowledged() {
        // Up to the cap: echoed as asked and used.
        for t in 1..=MAX_CLIENT_TIMEOUT_SECS {
            let v = t.to_string();
            let req = Requested::from_options(opts(&[("timeout", &v)]).options());
            let n = negotiate(&req, LIMITS, 10);
            assert_eq!(n.timeout, Some(Duration::from_secs(u64::from(t))));
            assert_eq!(oack_pairs(&n), [("timeout".to_string(), v)]);
        }
        // Above it (curl's default 6, the attacker's 255): left out of the OACK, not used,
        // and the other options are still granted.
        for v in ["6", "30", "255"] {
            let req = Requested::from_options(
                opts(&[("blksize", "1468"), ("timeout", v), ("tsize", "0")]).options(),
            );
            assert_eq!(req.timeout.map(u64::from), v.parse().ok(), "{v}");
            let n = negotiate(&req, LIMITS, 10);
            assert_eq!(n.timeout, None, "{v}");
            assert_eq!(
                oack_pairs(&n),
                [("blksize", "1468"), ("tsize", "10")].map(|(a, b)| (a.to_string(), b.to_string())),
                "{v}"
            );
        }
        // Nothing else asked: no OACK at all, DATA 1 first.
        let req = Requested::from_options(opts(&[("timeout", "255")]).options());
        assert!(negotiate(&req, LIMITS, 10).oack.is_none());
    }

    #[test]
    fn tsize_is_answered_whatever_its_value() {
        // atftp 0.8 with `--option "tsize enable"` sends the word itself.
        for v in ["0", "enable", ""] {
            let req = Requested::from_options(opts(&[("tsize", v)]).options());
            assert!(req.tsize, "{v:?}");
            let n = negotiate(&req, LIMITS, 42);
            assert_eq!(oack_pairs(&n), [("tsize".to_string(), "42".to_string())]);
        }
    }

    #[test]
    fn tsize_is_left_out_for_an_empty_file() {
        let req = Requested::from_options(opts(&[("tsize", "0"), ("blksize", "1468")]).options());
        let n = negotiate(&req, LIMITS, 0);
        assert_eq!(
            oack_pairs(&n),
            [("blksize".to_string(), "1468".to_string())]
        );
        let req = Requested::from_options(opts(&[("tsize", "0")]).options());
        assert!(negotiate(&req, LIMITS, 0).oack.is_none());
    }

    #[test]
    fn extremes_of_the_ranges_are_accepted() {
        let w = opts(&[("blksize", "8"), ("timeout", "255"), ("windowsize", "1")]);
        let r = Requested::from_options(w.options());
        assert_eq!(
            (r.blksize, r.timeout, r.windowsize),
            (Some(8), Some(255), Some(1))
        );
        let w = opts(&[
            ("blksize", "65464"),
            ("timeout", "1"),
            ("windowsize", "65535"),
        ]);
        let r = Requested::from_options(w.options());
        assert_eq!(
            (r.blksize, r.timeout, r.windowsize),
            (Some(65464), Some(1), Some(65535))
        );
        let w = opts(&[("blksize", "65465"), ("windowsize", "65536")]);
        let r = Requested::from_options(w.options());
        assert_eq!((r.blksize, r.windowsize), (None, None));
    }
}
