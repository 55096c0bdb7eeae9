//! The DHCP packet handler on arbitrary bytes: whatever `stork::dhcp::decode` accepts
//! must be handled (on both
//! ports, in full and proxy mode) without a panic, and every reply must encode.
//!
//! `cargo +nightly fuzz run dhcp_handler` from `appliance/`.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use dhcproto::v4::Encodable;
use libfuzzer_sys::fuzz_target;
use stork::config::FileConfig;
use stork::dhcp::handler::{Handler, Outcome, ServerInfo};

fn info(text: &str) -> ServerInfo {
    let cfg = FileConfig::parse(text, std::path::Path::new("fuzz"))
        .and_then(|f| f.validate())
        .expect("fuzz config is valid");
    ServerInfo {
        server_ip: cfg.address,
        http_base: cfg.base_url(),
        dhcp: cfg.dhcp,
    }
}

/// Full mode with a relay subnet, reservations and exclusions; and proxy mode.
fn configs() -> &'static [ServerInfo; 2] {
    static C: OnceLock<[ServerInfo; 2]> = OnceLock::new();
    C.get_or_init(|| {
        [
            info(
                r#"
[dhcp]
range = ["10.77.0.100", "10.77.0.103"]
exclude = [["10.77.0.101", "10.77.0.101"]]
reservations = [{ mac = "52:54:00:12:34:56", ip = "10.77.0.50" }]
domain = "lab.example"
mtu = 1500
rate_limit = 5
rate_burst = 3
[[dhcp.subnets]]
network = "10.78.0.0/24"
ranges = [["10.78.0.10", "10.78.0.12"]]
"#,
            ),
            info("[dhcp]\nmode = \"proxy\"\n"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    // Several messages in one input, split on a marker, so sequences (DISCOVER, REQUEST,
    // DECLINE, RELEASE for the same client) reach the pool's state.
    for info in configs() {
        let mut h = Handler::new(info.clone());
        let mut records = Vec::new();
        for (i, chunk) in data.split(|b| *b == 0xA5).take(8).enumerate() {
            // The server's own decode: what it rejects never reaches the handler.
            let Ok(msg) = stork::dhcp::decode(chunk) else {
                continue;
            };
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64 * 30);
            for outcome in [h.handle(&msg, now), h.handle_pxe(&msg, now)] {
                if let Outcome::Reply(r) = outcome {
                    r.msg.to_vec().expect("a reply always encodes");
                }
            }
            h.take_records(&mut records);
        }
        for r in &records {
            assert_eq!(stork::dhcp::journal::Record::decode(&r.encode()), Some(*r));
        }
    }
});
