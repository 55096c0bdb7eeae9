//! Any bytes into the TFTP packet parser: it must not panic, and whatever it accepts must
//! emit and parse back to the same packet. Requests then go through the request layer
//! (path normalisation, option negotiation), which must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stork::tftp::options::{Limits, negotiate};
use stork::tftp::packet::Repr;
use stork::tftp::request;

fuzz_target!(|data: &[u8]| {
    let Ok(repr) = Repr::parse_bytes(data) else {
        return;
    };
    let bytes = repr.to_vec().expect("a parsed packet emits");
    assert_eq!(bytes.len(), repr.buffer_len());
    let again = Repr::parse_bytes(&bytes).expect("an emitted packet parses");
    assert_eq!(again, repr);
    if let Ok(req) = request::read_request(&repr) {
        assert!(
            !req.path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        );
        let limits = Limits {
            max_block: 1468,
            max_window: 64,
        };
        let n = negotiate(&req.options, limits, data.len() as u64);
        assert!((8..=1468).contains(&n.block_size));
        assert!((1..=64).contains(&n.window));
    }
});
