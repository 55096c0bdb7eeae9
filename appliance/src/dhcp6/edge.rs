//! Raw-byte checks before a datagram reaches the decoder: every option's length fits, and
//! fixed parts are as long as the decoder assumes. dhcproto 0.15 subtracts a fixed size
//! from the length of a few options without checking it (status code, vendor class, vendor
//! options, authentication): a short one panics there. It also reads fixed-size options
//! (preference, elapsed time, rapid commit, ...) by their type, not their length, so a
//! longer one shifts it into the option's data, where the next "option" may be a short
//! one of those: such options must have exactly their size (both found by `fuzz.rs`'s
//! `dhcp6` target). Encapsulated options (in IA_NA, IA_TA, IA addresses and prefixes,
//! vendor options, relayed messages) are checked the same way, to a bounded depth.

use super::handler::Ignored;

/// The header before the options, as the decoder reads it: the handler decodes every
/// datagram as a client message (type and transaction id), whatever its type says; a
/// relay-message option's content as a relay message (type, hop count, link and peer
/// addresses: RFC 8415 section 9). A relay's datagram taken as a client message puts its
/// addresses among the options, which must pass the same checks (found by `fuzz.rs`).
const CLIENT_HEADER: usize = 4;
const RELAY_HEADER: usize = 34;
/// Encapsulation deeper than this is refused (a relay chain is at most 8 hops, and IA
/// options nest two levels).
const MAX_DEPTH: usize = 12;

/// Whether `bytes` is a message the decoder can take.
pub fn check(bytes: &[u8]) -> Result<(), Ignored> {
    if bytes.is_empty() {
        return Err(Ignored::Malformed);
    }
    options(bytes.get(CLIENT_HEADER..).ok_or(Ignored::Malformed)?, 0)
}

/// How option `code`'s length must be for the decoder.
enum Shape {
    /// At least this fixed part, then (if `Some`) encapsulated options from that offset.
    AtLeast(usize, Option<usize>),
    /// Exactly this many bytes: the decoder reads them by type and does not skip the rest.
    Exactly(usize),
    /// A multiple of this many bytes (addresses).
    Multiple(usize),
}

fn shape(code: u16) -> Shape {
    use Shape::*;
    match code {
        3 | 25 => AtLeast(12, Some(12)), // IA_NA, IA_PD: IAID, T1, T2, options
        4 => AtLeast(4, Some(4)),        // IA_TA: IAID, options
        5 => AtLeast(24, Some(24)),      // IA address: address, lifetimes, options
        26 => AtLeast(25, Some(25)),     // IA prefix: lifetimes, length, prefix, options
        17 => AtLeast(4, Some(4)),       // vendor options: enterprise number, options
        13 => AtLeast(2, None),          // status code: code, message
        16 => AtLeast(4, None),          // vendor class: enterprise number, classes
        11 => AtLeast(11, None),         // authentication
        7 | 19 => Exactly(1),            // preference, reconfigure message
        8 => Exactly(2),                 // elapsed time
        12 => Exactly(16),               // server unicast address
        14 | 20 => Exactly(0),           // rapid commit, reconfigure accept
        23 => Multiple(16),              // DNS servers
        _ => AtLeast(0, None),
    }
}

fn options(mut b: &[u8], depth: usize) -> Result<(), Ignored> {
    if depth > MAX_DEPTH {
        return Err(Ignored::Malformed);
    }
    while !b.is_empty() {
        let head = b.get(..4).ok_or(Ignored::Malformed)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let data = b.get(4..4 + len).ok_or(Ignored::Malformed)?;
        match shape(code) {
            Shape::AtLeast(fixed, inner) => {
                if len < fixed {
                    return Err(Ignored::Malformed);
                }
                if let Some(at) = inner {
                    options(data.get(at..).ok_or(Ignored::Malformed)?, depth + 1)?;
                }
            }
            Shape::Exactly(n) if len != n => return Err(Ignored::Malformed),
            Shape::Multiple(n) if !len.is_multiple_of(n) => return Err(Ignored::Malformed),
            _ => {}
        }
        if code == 9 {
            // A relayed message, decoded as a relay message whatever its type.
            options(
                data.get(RELAY_HEADER..).ok_or(Ignored::Malformed)?,
                depth + 1,
            )?;
        }
        b = b.get(4 + len..).ok_or(Ignored::Malformed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(code: u16, data: &[u8]) -> Vec<u8> {
        let mut o = code.to_be_bytes().to_vec();
        o.extend_from_slice(&(data.len() as u16).to_be_bytes());
        o.extend_from_slice(data);
        o
    }

    #[test]
    fn lengths_are_checked_at_every_level() {
        let solicit = |opts: Vec<u8>| [vec![1, 0, 0, 1], opts].concat();
        assert_eq!(
            check(&solicit(opt(1, &[0, 3, 0, 1, 1, 2, 3, 4, 5, 6]))),
            Ok(())
        );
        assert_eq!(check(&[]), Err(Ignored::Malformed));
        assert_eq!(check(&[1, 0]), Err(Ignored::Malformed));
        // Longer than what is left.
        assert_eq!(
            check(&solicit(vec![0, 1, 0, 9, 1])),
            Err(Ignored::Malformed)
        );
        // A status code or vendor class shorter than its fixed part.
        for (code, short) in [(13, &[0][..]), (16, &[0, 0, 1]), (17, &[0]), (11, &[0; 10])] {
            assert_eq!(
                check(&solicit(opt(code, short))),
                Err(Ignored::Malformed),
                "{code}"
            );
        }
        // The same inside an IA_NA's options.
        let ia = |inner: Vec<u8>| opt(3, &[vec![0; 12], inner].concat());
        assert_eq!(check(&solicit(ia(opt(13, &[0, 0])))), Ok(()));
        assert_eq!(check(&solicit(ia(opt(13, &[0])))), Err(Ignored::Malformed));
        // Fixed-size options of another size: the decoder would read into their data.
        assert_eq!(check(&solicit(opt(8, &[0; 18]))), Err(Ignored::Malformed));
        assert_eq!(
            check(&solicit(opt(14, &[0, 17, 0, 0]))),
            Err(Ignored::Malformed)
        );
        assert_eq!(check(&solicit(opt(8, &[0, 0]))), Ok(()));
        assert_eq!(check(&solicit(opt(23, &[0; 17]))), Err(Ignored::Malformed));
        // A relay's datagram is decoded as a client message: its addresses are options.
        let relay = [
            vec![12, 2],
            vec![0x65, 0xbf, 0x8a, 0, 0, 0, 0, 0x10, 0, 0],
            vec![0; 22],
        ];
        assert_eq!(check(&relay.concat()), Err(Ignored::Malformed));
        // Nesting past the bound.
        let mut deep = opt(13, &[0, 0]);
        for _ in 0..=MAX_DEPTH {
            deep = ia(deep);
        }
        assert_eq!(check(&solicit(deep)), Err(Ignored::Malformed));
    }
}
