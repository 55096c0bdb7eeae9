//! The HTTP listener's limits against one host on the provisioning network (issue 15):
//! boot files stay inside their root, slow connections are capped per address and closed
//! after the header deadline while others are served, and the unauthenticated agent routes
//! are rate-limited and small. Hosts are loopback addresses (127.0.0.2 is "the attacker").

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::Duration;

use common::{Options, Server, connect_from, inventory, mac, mac_addr, request_from};
use stork_client::Client;
use stork_proto::api::MachineFilter;
use stork_proto::{AgentReport, AgentStep, EnlistRequest};

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ME: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Whether the server closed the connection (EOF or reset) within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn boot_files_never_resolve_outside_their_root() {
    let server = Server::start(Options::default());
    let outside = server.dir.path().join("secret.txt");
    std::fs::write(&outside, "the appliance's own file").unwrap();
    server.boot_file("ok.txt", b"a boot file");
    let boot = server.data_dir().join("boot");
    std::os::unix::fs::symlink(&outside, boot.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink(boot.join("ok.txt"), boot.join("alias.txt")).unwrap();
    std::os::unix::fs::symlink(server.dir.path(), boot.join("up")).unwrap();
    let get = |path: &str| request_from(ME, server.port, "GET", path, None, None);
    let (status, _, body) = get("/boot/ok.txt");
    assert_eq!((status, body.as_str()), (200, "a boot file"));
    // A link inside the root is served; one leading out of it is not there.
    assert_eq!(get("/boot/alias.txt").0, 200);
    let (status, _, body) = get("/boot/escape.txt");
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("appliance's own"));
    assert_eq!(get("/boot/up/secret.txt").0, 404);
    assert_eq!(get("/boot/up%2Fsecret.txt").0, 404);
    assert_eq!(get("/boot/../secret.txt").0, 404);
}

#[test]
fn slow_connections_are_capped_per_address_and_closed_after_the_header_deadline() {
    let server = Server::start(Options {
        http: "max_connections_per_ip = 4\nheader_timeout = 1\n",
        ..Options::default()
    });
    // The attacker opens its four connections and sends half a request line on each.
    let mut slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect_from(ATTACKER, server.port);
            s.write_all(b"GET /api/v1/openapi.json HT")
                .expect("partial request");
            s
        })
        .collect();
    // Over TLS, a connection that never starts its handshake is held no longer.
    let mut silent_tls = connect_from(ATTACKER, server.tls_port);
    // A fifth is closed at once, before it can say anything.
    let mut fifth = connect_from(ATTACKER, server.port);
    assert!(
        closed_within(&mut fifth, Duration::from_secs(10)),
        "the fifth connection from one address stays open"
    );
    // Everyone else is served meanwhile.
    let client: Client = server.client();
    client
        .machines(&MachineFilter::default())
        .expect("another address is served");
    // The slow ones are closed once their header deadline passes (one second; allow a
    // loaded machine thirty).
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(30)),
            "a connection that never finished its headers is still open"
        );
    }
    assert!(
        closed_within(&mut silent_tls, Duration::from_secs(30)),
        "a TLS connection that never sent a ClientHello is still open"
    );
    let stats = client.stats().expect("stats");
    assert!(stats.http["refused_per_ip"] >= 1, "{:?}", stats.http);
}

#[test]
fn the_api_refuses_plain_http_while_https_is_on_and_a_wrong_certificate_is_named() {
    let server = Server::start(Options::default());
    // Over plain HTTP: refused, naming where to go; boot files and scripts stay there.
    let (status, _, body) = request_from(
        ME,
        server.port,
        "GET",
        "/api/v1/machines",
        Some(&server.token),
        None,
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("https_required") && body.contains("https://"),
        "{body}"
    );
    server.boot_file("ok.txt", b"a boot file");
    assert_eq!(
        request_from(ME, server.port, "GET", "/boot/ok.txt", None, None).0,
        200
    );
    // A client that pinned another certificate refuses this one, and says so.
    let wrong = stork_tls::Trust::Pinned(stork_tls::Fingerprint::of(b"another certificate"));
    let e = Client::with_trust(&server.base(), Some(server.token.clone()), Some(wrong))
        .machines(&MachineFilter::default())
        .expect_err("a certificate that is not the pinned one");
    let chain = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(chain.contains("not the pinned"), "{chain}");
    // ... and so does the CLI, with what to do about it.
    let out = std::process::Command::new(common::BIN)
        .args(["--url", &server.base(), "--token", &server.token])
        .args([
            "--fingerprint",
            &stork_tls::Fingerprint::of(b"x").to_string(),
        ])
        .args(["machine", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not the pinned") && err.contains("stork config show"),
        "{err}"
    );
    // With no fingerprint and no CA, the first connection pins what it sees (in the pins
    // file it is told), and the next ones hold it to that.
    let pins = server.dir.path().join("pins");
    let first = std::process::Command::new(common::BIN)
        .env("STORK_PINS", &pins)
        .env_remove("STORK_FINGERPRINT")
        .args(["--url", &server.base(), "--token", &server.token])
        .args(["machine", "list"])
        .output()
        .unwrap();
    assert!(first.status.success(), "{first:?}");
    let said = String::from_utf8_lossy(&first.stderr);
    let fp = common::test_cert().fingerprint.to_string();
    assert!(said.contains("pinned") && said.contains(&fp), "{said}");
    let kept = std::fs::read_to_string(&pins).unwrap();
    assert!(kept.contains(&fp), "{kept}");
    // A CA file works too (the self-signed certificate is its own CA), and a name the
    // certificate does not carry is refused with the name.
    let ca = common::test_cert().cert.clone();
    let by_ca = |url: &str| {
        std::process::Command::new(common::BIN)
            .env("STORK_PINS", &pins)
            .args(["--url", url, "--token", &server.token])
            .arg("--ca-file")
            .arg(&ca)
            .args(["machine", "list"])
            .output()
            .unwrap()
    };
    let ok = by_ca(&format!("https://localhost:{}", server.tls_port));
    assert!(ok.status.success(), "{ok:?}");
    let other_name = by_ca(&server.base());
    assert!(!other_name.status.success());
    let err = String::from_utf8_lossy(&other_name.stderr);
    assert!(err.contains("127.0.0.1"), "{err}");
}

#[test]
fn unauthenticated_agent_routes_are_rate_limited_per_address_and_small() {
    let server = Server::start(Options {
        http: "agent_rate = 1\nagent_burst = 3\n",
        ..Options::default()
    });
    let anonymous = server.client().anonymous();
    let report = |n: u32| AgentReport {
        boot_mac: mac_addr(n),
        step: AgentStep::Network,
        ok: false,
        message: "no link".into(),
    };
    // The burst passes, then the address is held to its rate.
    let mut refused = None;
    for n in 0..20 {
        if let Err(e) = anonymous.report(&report(n)) {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("twenty reports in a row are never refused");
    assert_eq!(e.status(), Some(429), "{e}");
    assert_eq!(e.code(), Some("rate_limited"), "{e}");
    // Another address still enlists.
    let enlist = EnlistRequest {
        boot_mac: mac_addr(90),
        inventory: inventory(&mac(90), 2, 4, 20),
    };
    let body = serde_json::to_string(&enlist).unwrap();
    let (status, _, text) =
        server.api_request_from(ATTACKER, "POST", "/api/v1/agent/enlist", None, Some(&body));
    assert_eq!(status, 200, "{text}");
    // A body over 256 KiB is refused before it is read.
    let mut big = report(91);
    big.message = "x".repeat(300 << 10);
    let body = serde_json::to_string(&big).unwrap();
    let (status, _, text) = server.api_request_from(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        "POST",
        "/api/v1/agent/report",
        None,
        Some(&body),
    );
    assert_eq!(status, 413, "{text}");
    let stats = server.client().stats().expect("stats");
    assert!(stats.http["agent_rate_limited"] >= 1, "{:?}", stats.http);
}
