//! Where a datagram becomes a DHCP request: every field a library or our code trusts is
//! checked here, on the raw bytes, before the decoder sees them. A datagram that fails is
//! dropped with a typed reason and counted; one that passes is a [`Request`] whose hardware
//! address is known to be 6-byte Ethernet, so nothing after this point can slice `chaddr`
//! past its end (dhcproto's `Message::chaddr()` slices by the packet's own `hlen` and
//! panics above 16: issue 12).

use dhcproto::v4::{Decodable, Decoder, Message, MessageType};
use stork_proto::MacAddr;

use super::Stats;

/// Largest datagram accepted: a DHCP message in one unfragmented Ethernet frame
/// (1500 - 20 IP - 8 UDP).
pub const MAX_PACKET: usize = 1472;

/// The fixed BOOTP header (RFC 2131 section 2) and the magic cookie before the options
/// (where the options start); the DHCP benchmark's load client reads replies by them too.
const HEADER: usize = 236;
pub const OPTIONS: usize = HEADER + 4;
pub const COOKIE: [u8; 4] = [99, 130, 83, 99];
const OP: usize = 0;
const HTYPE: usize = 1;
const HLEN: usize = 2;
const BOOTREQUEST: u8 = 1;
const ETHERNET: u8 = 1;
const ETHERNET_LEN: u8 = 6;
const OPTION_PAD: u8 = 0;
const OPTION_END: u8 = 255;
const OPTION_MESSAGE_TYPE: u8 = 53;

/// Why a datagram was dropped before the handler; each has its own counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("{len} bytes: longer than one unfragmented frame ({MAX_PACKET})")]
    Oversized { len: usize },
    #[error("{len} bytes: shorter than the BOOTP header and magic cookie ({OPTIONS})")]
    Truncated { len: usize },
    #[error("op {0} is not BOOTREQUEST")]
    NotRequest(u8),
    #[error("hardware type {htype} length {hlen}: only 6-byte Ethernet is served")]
    Hardware { htype: u8, hlen: u8 },
    #[error("no DHCP magic cookie")]
    NoCookie,
    #[error("option {code} at offset {at} runs past the end of the packet")]
    OptionOverrun { code: u8, at: usize },
    #[error("option {code} has length {len}")]
    OptionLength { code: u8, len: usize },
    #[error("no valid DHCP message type option (plain BOOTP is not served)")]
    NoMessageType,
    #[error("does not decode: {0}")]
    Decode(String),
    #[error("the decoder panicked")]
    DecoderPanic,
}

impl Dropped {
    /// The counter of this reason in `stork stats`.
    pub fn counter<'s>(&self, s: &'s Stats) -> &'s std::sync::atomic::AtomicU64 {
        match self {
            Self::Oversized { .. } => &s.oversized,
            Self::Truncated { .. } => &s.drop_truncated,
            Self::NotRequest(_) => &s.drop_not_request,
            Self::Hardware { .. } => &s.drop_hardware,
            Self::NoCookie => &s.drop_no_cookie,
            Self::OptionOverrun { .. } | Self::OptionLength { .. } => &s.drop_options,
            Self::NoMessageType => &s.drop_no_message_type,
            Self::Decode(_) | Self::DecoderPanic => &s.drop_decode,
        }
    }
}

/// A DHCP request that passed every check at the edge.
#[derive(Debug, Clone)]
pub struct Request {
    pub msg: Message,
    pub mac: MacAddr,
    pub kind: MessageType,
}

/// Option lengths dhcproto 0.15 asserts on (`debug_assert!`, `len - n`) instead of
/// checking: a packet with a wrong length there panics a debug build (found by the
/// `dhcp_handler` fuzz target). `len` is the length after RFC 3396 concatenation, as
/// dhcproto sees it.
fn length_ok(code: u8, len: usize) -> bool {
    match code {
        OPTION_MESSAGE_TYPE => len == 1,
        80 => len == 0,        // Rapid Commit
        81 => len >= 3,        // Client FQDN: flags and two rcodes first
        94 => len == 3,        // Client Network Interface
        151 => len >= 1,       // BLQ status code: a code first
        152..=155 => len == 4, // BLQ times
        _ => true,
    }
}

/// Checks the raw bytes, decodes, and checks the decoded message's hardware address and
/// message type. Shared with the fuzz driver, so it exercises exactly what the server runs.
pub fn accept(packet: &[u8]) -> Result<Request, Dropped> {
    let len = packet.len();
    if len > MAX_PACKET {
        return Err(Dropped::Oversized { len });
    }
    let (Some(&op), Some(&htype), Some(&hlen), Some(cookie)) = (
        packet.get(OP),
        packet.get(HTYPE),
        packet.get(HLEN),
        packet.get(HEADER..OPTIONS),
    ) else {
        return Err(Dropped::Truncated { len });
    };
    if op != BOOTREQUEST {
        return Err(Dropped::NotRequest(op));
    }
    if htype != ETHERNET || hlen != ETHERNET_LEN {
        return Err(Dropped::Hardware { htype, hlen });
    }
    if cookie != COOKIE {
        return Err(Dropped::NoCookie);
    }
    let has_type = walk_options(packet)?;
    if !has_type {
        return Err(Dropped::NoMessageType);
    }
    // The walk above removed every panic we know of; a panic inside the decoder on input we
    // did not foresee must still cost one packet.
    let msg = match std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(packet))) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(Dropped::Decode(e.to_string())),
        Err(_) => return Err(Dropped::DecoderPanic),
    };
    let kind = msg.opts().msg_type().ok_or(Dropped::NoMessageType)?;
    let mac = msg
        .chaddr()
        .get(..6)
        .and_then(MacAddr::from_slice)
        .ok_or(Dropped::Hardware { htype, hlen })?;
    Ok(Request { msg, mac, kind })
}

/// Walks the options area: every option's length must end inside the packet, and the
/// options dhcproto trusts must have the lengths it expects. Consecutive options with the
/// same code are one option (RFC 3396), as dhcproto concatenates them. Returns whether a
/// message type option is present.
fn walk_options(packet: &[u8]) -> Result<bool, Dropped> {
    let mut i = OPTIONS;
    let mut run: Option<(u8, usize)> = None;
    let mut has_type = false;
    let check = |run: Option<(u8, usize)>| match run {
        Some((code, len)) if !length_ok(code, len) => Err(Dropped::OptionLength { code, len }),
        _ => Ok(()),
    };
    while let Some(&code) = packet.get(i) {
        if code == OPTION_PAD || code == OPTION_END {
            check(run.take())?;
            if code == OPTION_END {
                break;
            }
            i += 1;
            continue;
        }
        let Some(&len) = packet.get(i + 1) else {
            return Err(Dropped::OptionOverrun { code, at: i });
        };
        let len = usize::from(len);
        if i + 2 + len > packet.len() {
            return Err(Dropped::OptionOverrun { code, at: i });
        }
        has_type |= code == OPTION_MESSAGE_TYPE;
        run = match run {
            Some((c, total)) if c == code => Some((c, total + len)),
            other => {
                check(other)?;
                Some((code, len))
            }
        };
        i += 2 + len;
    }
    check(run)?;
    Ok(has_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed DISCOVER from 52:54:00:00:00:01.
    fn discover() -> Vec<u8> {
        let mut p = vec![0u8; OPTIONS];
        p[OP] = BOOTREQUEST;
        p[HTYPE] = ETHERNET;
        p[HLEN] = ETHERNET_LEN;
        p[28..34].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        p[HEADER..OPTIONS].copy_from_slice(&COOKIE);
        p.extend_from_slice(&[OPTION_MESSAGE_TYPE, 1, 1, OPTION_END]);
        p
    }

    #[test]
    fn a_well_formed_discover_passes() {
        let r = accept(&discover()).unwrap();
        assert_eq!(r.kind, MessageType::Discover);
        assert_eq!(r.mac.to_string(), "52:54:00:00:00:01");
    }

    #[test]
    fn every_hlen_but_six_is_dropped_without_a_panic() {
        for hlen in [0u8, 1, 5, 7, 16, 17, 200, 255] {
            let mut p = discover();
            p[HLEN] = hlen;
            assert_eq!(
                accept(&p).unwrap_err(),
                Dropped::Hardware { htype: 1, hlen },
                "hlen {hlen}"
            );
        }
    }

    #[test]
    fn header_fields_at_their_extremes_are_dropped_with_their_reason() {
        let cases: Vec<(Vec<u8>, Dropped)> = vec![
            (Vec::new(), Dropped::Truncated { len: 0 }),
            (discover()[..239].to_vec(), Dropped::Truncated { len: 239 }),
            (
                {
                    let mut p = discover();
                    p[OP] = 2;
                    p
                },
                Dropped::NotRequest(2),
            ),
            (
                {
                    let mut p = discover();
                    p[OP] = 0;
                    p
                },
                Dropped::NotRequest(0),
            ),
            (
                {
                    let mut p = discover();
                    p[HTYPE] = 255;
                    p
                },
                Dropped::Hardware {
                    htype: 255,
                    hlen: 6,
                },
            ),
            (
                {
                    let mut p = discover();
                    p[HEADER] = 0;
                    p
                },
                Dropped::NoCookie,
            ),
            (vec![0u8; 1473], Dropped::Oversized { len: 1473 }),
        ];
        for (p, want) in cases {
            assert_eq!(accept(&p).unwrap_err(), want);
        }
    }

    #[test]
    fn options_past_the_end_and_bad_lengths_are_dropped() {
        // A length byte past the end, a length reaching past the end, a message type of
        // length 0 and of length 2, no message type at all.
        let tails: [(&[u8], Dropped); 5] = [
            (&[12], Dropped::OptionOverrun { code: 12, at: 240 }),
            (
                &[OPTION_MESSAGE_TYPE, 1, 1, 12, 9, b'a'],
                Dropped::OptionOverrun { code: 12, at: 243 },
            ),
            (
                &[OPTION_MESSAGE_TYPE, 0, OPTION_END],
                Dropped::OptionLength { code: 53, len: 0 },
            ),
            (
                &[OPTION_MESSAGE_TYPE, 2, 1, 1, OPTION_END],
                Dropped::OptionLength { code: 53, len: 2 },
            ),
            (&[12, 0, OPTION_END], Dropped::NoMessageType),
        ];
        for (tail, want) in tails {
            let mut p = discover();
            p.truncate(OPTIONS);
            p.extend_from_slice(tail);
            assert_eq!(accept(&p).unwrap_err(), want, "{tail:?}");
        }
    }

    #[test]
    fn zero_length_options_and_padding_pass() {
        let mut p = discover();
        p.truncate(OPTIONS);
        p.extend_from_slice(&[0, 0, 12, 0, OPTION_MESSAGE_TYPE, 1, 3, 0, OPTION_END, 0, 0]);
        assert_eq!(accept(&p).unwrap().kind, MessageType::Request);
    }
}
