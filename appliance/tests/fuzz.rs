//! Fuzzing on the stable toolchain, in `cargo xtask test`: raw datagrams through exactly the
//! code the DHCP and TFTP socket loops run (`dhcp::Server::on_datagram`: edge checks,
//! handler, journal records, reply encoding, in full and proxy mode, on ports 67 and 4011;
//! `tftp::server::classify`, then the root's confinement, the negotiation and the transfer
//! state machine fed with hostile client packets).
//!
//! Inputs: the corpus in `appliance/fuzz/corpus/`, every crash ever found in
//! `appliance/fuzz/regressions/` (run first, each a regression test), then mutations of them
//! from a seeded generator for a bounded time (`STORK_FUZZ_SECS`, default 10 per target;
//! `STORK_FUZZ_SEED` replays a run). A caught panic is still a bug: the input is written to
//! `target/fuzz-crashes/` and the test fails with it in hex. libFuzzer targets over the same
//! functions live in `appliance/fuzz/` for longer runs on nightly.
// Test helpers: a failure is a test failure, so they unwrap.
#![allow(clippy::unwrap_used)]

mod fuzz_common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use dhcproto::v4::{Decodable, Decoder, Message};
use stork::config::FileConfig;
use stork::dhcp::handler::{Handler, ServerInfo};
use stork::dhcp::journal::Record;
use stork::dhcp::{Action, Port, Server, Stats};
use stork::tftp::packet::Repr;
use stork::tftp::server::{Listen, classify_caught, plan};
use stork::tftp::transfer::Transfer;
use stork::tftp::{TftpConfig, fs::Root};

use fuzz_common::{Rng, drive, seed};

fn info(text: &str) -> ServerInfo {
    let cfg = FileConfig::parse(text, Path::new("fuzz"))
        .and_then(|f| f.validate())
        .expect("fuzz config is valid");
    ServerInfo {
        server_ip: cfg.address,
        http_base: cfg.base_url(),
        dhcp: cfg.dhcp,
    }
}

/// Full mode with a relay subnet, reservations, exclusions and a rate limit; proxy mode.
fn dhcp_configs() -> [ServerInfo; 2] {
    [
        info(
            r#"
[dhcp]
range = ["10.77.0.100", "10.77.0.103"]
exclude = [["10.77.0.101", "10.77.0.101"]]
reservations = [{ mac = "52:54:00:12:34:56", ip = "10.77.0.50" }]
domain = "lab.example"
mtu = 1500
rate_limit = 50
rate_burst = 20
[[dhcp.subnets]]
network = "10.78.0.0/24"
ranges = [["10.78.0.10", "10.78.0.12"]]
"#,
        ),
        info("[dhcp]\nmode = \"proxy\"\n"),
    ]
}

#[test]
fn dhcp_datagrams_from_raw_bytes() {
    let stats = Arc::new(Stats::default());
    let mut servers: Vec<Server> = dhcp_configs()
        .into_iter()
        .map(|i| Server::new(Handler::new(i), stats.clone()))
        .collect();
    let mut clock = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let peers = [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)),
        SocketAddr::from((Ipv4Addr::new(10, 78, 0, 1), 67)),
        SocketAddr::from((Ipv4Addr::new(10, 77, 0, 60), 68)),
    ];
    let mut i = 0usize;
    let n = drive("dhcp", |input| {
        i += 1;
        clock += Duration::from_millis(700);
        let peer = peers[i % peers.len()];
        for server in &mut servers {
            for port in [Port::Dhcp, Port::Pxe] {
                let panics = stats.panics.load(Ordering::Relaxed);
                let action = server.on_datagram(input, peer, port, clock);
                if stats.panics.load(Ordering::Relaxed) != panics {
                    return Err(format!("handling panicked on {port:?}"));
                }
                match action {
                    Action::Nothing => {}
                    Action::Send(s) => {
                        Message::decode(&mut Decoder::new(&s.bytes))
                            .map_err(|e| format!("our reply does not decode: {e}"))?;
                    }
                    Action::Journal(job) => {
                        for r in &job.records {
                            if Record::decode(&r.encode()) != Some(*r) {
                                return Err(format!("journal record does not round-trip: {r:?}"));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    });
    let s = stats.snapshot();
    // The run reached the handler and the drop reasons both, not only one side.
    assert!(s.discover > 0 && s.replied + s.ignored > 0, "{s:?}");
    assert!(
        s.drop_hardware > 0 && s.drop_options > 0 && s.drop_truncated > 0,
        "{s:?}"
    );
    assert!(n > 0);
}

#[test]
fn tftp_datagrams_from_raw_bytes() {
    let root_dir = tempfile::tempdir().unwrap();
    std::fs::write(root_dir.path().join("snponly.efi"), vec![7u8; 5000]).unwrap();
    std::fs::write(root_dir.path().join("undionly.kpxe"), b"kpxe").unwrap();
    std::fs::create_dir(root_dir.path().join("dir")).unwrap();
    std::fs::write(root_dir.path().join("dir/file.txt"), b"a\nb\r\n").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let _ = std::os::unix::fs::symlink(outside.path(), root_dir.path().join("escape"));
    let root = Root::new(root_dir.path(), true).unwrap();
    let canonical = root.path().to_path_buf();
    let cfg = TftpConfig::default();
    let stats = stork::tftp::Stats::default();
    let peer = SocketAddr::from((IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100)), 2000));
    let mut rng = Rng(seed());
    let n = drive("tftp", |input| {
        let panics = stats.panics.load(Ordering::Relaxed);
        let listen = classify_caught(input, peer, &stats);
        if stats.panics.load(Ordering::Relaxed) != panics {
            return Err("classify panicked".into());
        }
        let Listen::Start(req) = listen else {
            return Ok(());
        };
        // The request layer's promise: a relative path without `.`, `..` or empty parts.
        if req
            .path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!("request path not normalised: {:?}", req.path));
        }
        let size = match root.open(&req.path) {
            Ok(o) => {
                if !o.path.starts_with(&canonical) {
                    return Err(format!("served outside the root: {}", o.path.display()));
                }
                o.len
            }
            Err(_) => 4096,
        };
        let p = plan(&req, size, &cfg);
        if !(8..=cfg.max_block).contains(&p.params.block_size)
            || !(1..=cfg.max_window).contains(&p.params.window)
        {
            return Err(format!("negotiated out of bounds: {:?}", p.params));
        }
        // The transfer's state machine on what a hostile client sends back: the input
        // itself, then ACKs and ERRORs around the window, with timeouts between.
        let mut t = Transfer::new(p.params, Instant::now());
        let start = Instant::now();
        for step in 0..32u64 {
            while t.poll_transmit().is_some() {}
            let now = start + Duration::from_millis(step * 300);
            let packet = match rng.below(4) {
                0 => input.to_vec(),
                1 => {
                    let b = rng.next() as u16;
                    [0, 4, (b >> 8) as u8, b as u8].to_vec()
                }
                2 => [0, 4, 0, step as u8].to_vec(),
                _ => [0, 5, 0, rng.byte(), 0].to_vec(),
            };
            if let Ok(repr) = Repr::parse_bytes(&packet) {
                t.on_packet(&repr, now);
            } else {
                t.on_timeout(now);
            }
        }
        Ok(())
    });
    assert!(n > 0);
    assert!(stats.requests.load(Ordering::Relaxed) > 0);
}
