//! Raw datagrams through what the DHCP socket loop runs (`stork::dhcp::Server::on_datagram`:
//! edge checks, handler, journal records, reply encoding) on both ports, in full and proxy
//! mode: no panic, not even a caught one. `appliance/tests/fuzz.rs` runs the same on stable
//! in `cargo xtask test`; this target is for longer runs.
//!
//! `cargo +nightly fuzz run dhcp_handler` from `appliance/`.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use stork::config::FileConfig;
use stork::dhcp::handler::{Handler, ServerInfo};
use stork::dhcp::{Action, Port, Server, Stats};

fn info(text: &str) -> ServerInfo {
    let cfg = FileConfig::parse(text, Path::new("fuzz"))
        .and_then(|f| f.validate())
        .expect("fuzz config is valid");
    ServerInfo::new(&cfg)
}

/// Full mode with a relay subnet, reservations and exclusions; and proxy mode.
fn configs() -> &'static [ServerInfo; 2] {
    static C: OnceLock<[ServerInfo; 2]> = OnceLock::new();
    C.get_or_init(|| {
        [
            info(
                include_str!("../dhcp-full.toml"),
            ),
            info("[dhcp]\nmode = \"proxy\"\n"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    // Several messages in one input, split on a marker, so sequences (DISCOVER, REQUEST,
    // DECLINE, RELEASE for the same client) reach the pool's state.
    let stats = Arc::new(Stats::default());
    let peer = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68));
    for info in configs() {
        let mut server = Server::new(Handler::new(info.clone()), stats.clone());
        for (i, chunk) in data.split(|b| *b == 0xA5).take(8).enumerate() {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64 * 30);
            for port in [Port::Dhcp, Port::Pxe] {
                if let Action::Journal(job) = server.on_datagram(chunk, peer, port, now) {
                    for r in &job.records {
                        assert_eq!(stork::dhcp::journal::Record::decode(&r.encode()), Some(*r));
                    }
                }
            }
        }
    }
    assert_eq!(stats.panics.load(Ordering::Relaxed), 0, "a datagram panicked");
});
