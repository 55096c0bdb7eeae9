//! A hostile host on the provisioning network (issue 12): single packets with every DHCP
//! header field at its extremes, then a flood of random datagrams to the DHCP and TFTP
//! ports, sent from a second namespace. The appliance keeps running, counts every packet
//! as dropped with its reason, reports every service healthy, and serves real clients
//! (busybox udhcpc, tftp-hpa) right after.
// Test helpers: a failure is a test failure, so they unwrap.
#![allow(clippy::unwrap_used)]

mod dhcp_common;

use std::time::Duration;

use dhcp_common::{run_ok, udhcpc_once};
use stork_lab::appliance::Stats;
use stork_lab::{Appliance, Lab, wait_for};
use stork_proto::api::ServiceState;
use stork_tests::{boot_files, lab_dir, stork_bin};

const BOOTREQUEST: u8 = 1;
const COOKIE: [u8; 4] = [99, 130, 83, 99];

/// A DISCOVER from `mac` with `options` after the cookie.
fn bootp(op: u8, htype: u8, hlen: u8, options: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = op;
    p[1] = htype;
    p[2] = hlen;
    p[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    p[28..34].copy_from_slice(&[0x52, 0x54, 0x00, 0xee, 0, 1]);
    p.extend_from_slice(&COOKIE);
    p.extend_from_slice(options);
    p
}

const DISCOVER: &[u8] = &[53, 1, 1, 255];

/// Packets with one field at an extreme, and the counter each must land in.
fn extremes() -> Vec<(&'static str, Vec<u8>)> {
    let good = bootp(BOOTREQUEST, 1, 6, DISCOVER);
    let mut v: Vec<(&str, Vec<u8>)> = Vec::new();
    for hlen in [0, 17, 255] {
        v.push(("drop_hardware", bootp(BOOTREQUEST, 1, hlen, DISCOVER)));
    }
    v.push(("drop_hardware", bootp(BOOTREQUEST, 0, 6, DISCOVER)));
    v.push(("drop_hardware", bootp(BOOTREQUEST, 255, 6, DISCOVER)));
    v.push(("drop_not_request", bootp(2, 1, 6, DISCOVER)));
    v.push(("drop_not_request", bootp(0, 1, 6, DISCOVER)));
    v.push(("drop_not_request", bootp(255, 1, 6, DISCOVER)));
    for len in [0, 1, 3, 100, 239] {
        v.push(("drop_truncated", good[..len].to_vec()));
    }
    let mut no_cookie = good.clone();
    no_cookie[236] = 0;
    v.push(("drop_no_cookie", no_cookie));
    // An option whose length runs past the end; a length byte that is missing.
    v.push((
        "drop_options",
        bootp(BOOTREQUEST, 1, 6, &[53, 1, 1, 12, 200, b'x']),
    ));
    v.push(("drop_options", bootp(BOOTREQUEST, 1, 6, &[53, 1, 1, 12])));
    // A zero-length and an overlong message type.
    v.push(("drop_options", bootp(BOOTREQUEST, 1, 6, &[53, 0, 255])));
    v.push((
        "drop_options",
        bootp(BOOTREQUEST, 1, 6, &[53, 3, 1, 1, 1, 255]),
    ));
    v.push((
        "drop_no_message_type",
        bootp(BOOTREQUEST, 1, 6, &[12, 0, 255]),
    ));
    // Longer than one unfragmented frame, padded with zero options.
    let mut overlong = good.clone();
    overlong.resize(3000, 0);
    v.push(("oversized", overlong));
    v
}

/// Seeded random datagrams of random length (0 to 1,600 bytes).
fn random_datagrams(n: usize, mut seed: u64) -> Vec<Vec<u8>> {
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|_| {
            let len = (next() % 1601) as usize;
            (0..len).map(|_| next() as u8).collect()
        })
        .collect()
}

/// Sends each datagram from the host's namespace with one `sendto` each.
fn send_all(host: &stork_lab::Host, lab: &Lab, name: &str, port: u16, datagrams: &[Vec<u8>]) {
    let file = lab.dir().join(format!("{name}.hex"));
    let text: String = datagrams
        .iter()
        .map(|d| d.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
        .collect();
    std::fs::write(&file, text).unwrap();
    // Paced so the appliance's socket buffer never overflows: every datagram must arrive to
    // be counted.
    let script = "import socket,sys,time\n\
        s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
        for i,l in enumerate(open(sys.argv[1])):\n\
        \x20   s.sendto(bytes.fromhex(l.strip()),('10.77.0.1',int(sys.argv[2])))\n\
        \x20   i%200==199 and time.sleep(0.02)\n";
    run_ok(
        host.command("python3")
            .args(["-c", script])
            .arg(&file)
            .arg(port.to_string()),
    );
}

fn stats(a: &Appliance) -> Stats {
    a.stats().unwrap()
}

fn get(v: &Stats, service: &str, name: &str) -> u64 {
    v.counter(service, name)
        .unwrap_or_else(|| panic!("no counter {service}.{name} in {v:?}"))
}

#[test]
#[ignore = "needs root, busybox, tftp-hpa and python3: run `cargo xtask test`"]
fn hostile_packets_are_counted_and_dropped_and_real_clients_are_served_after() {
    assert!(stork_bin().exists(), "run through `cargo xtask test`");
    let mut lab = Lab::new("hostile", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let host = lab.add_host_at("evil", "10.77.0.250/24").unwrap();
    let before = stats(&appliance);

    // 1. Single packets, each field at an extreme.
    let extremes = extremes();
    let packets: Vec<Vec<u8>> = extremes.iter().map(|(_, p)| p.clone()).collect();
    send_all(&host, &lab, "extremes", 67, &packets);
    let mut want: std::collections::BTreeMap<&str, u64> = Default::default();
    for (counter, _) in &extremes {
        *want.entry(counter).or_default() += 1;
    }
    let sent = extremes.len() as u64;
    wait_for(
        "every extreme packet counted",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            Ok(
                (get(&stats(&appliance), "dhcp", "received") - get(&before, "dhcp", "received")
                    >= sent)
                    .then_some(()),
            )
        },
    )
    .unwrap();
    let after = stats(&appliance);
    for (counter, n) in &want {
        assert_eq!(
            get(&after, "dhcp", counter) - get(&before, "dhcp", counter),
            *n,
            "dhcp.{counter}: {after:#?}"
        );
    }
    let delta = |v: &Stats, c: &str| get(v, "dhcp", c) - get(&before, "dhcp", c);
    assert_eq!(delta(&after, "received"), sent, "{after:#?}");
    assert_eq!(delta(&after, "discover"), 0, "{after:#?}");

    // 2. A flood of random datagrams at DHCP and TFTP.
    let flood = random_datagrams(3000, 0x5eed_1234_abcd_0001);
    send_all(&host, &lab, "flood-dhcp", 67, &flood);
    let tftp_flood = random_datagrams(3000, 0x5eed_1234_abcd_0002);
    send_all(&host, &lab, "flood-tftp", 69, &tftp_flood);
    let total = sent + flood.len() as u64;
    wait_for(
        "every flooded datagram counted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok((delta(&stats(&appliance), "received") >= total).then_some(())),
    )
    .unwrap();
    let s = stats(&appliance);
    let dropped: u64 = [
        "drop_truncated",
        "drop_not_request",
        "drop_hardware",
        "drop_no_cookie",
        "drop_options",
        "drop_no_message_type",
        "drop_decode",
    ]
    .iter()
    .map(|c| delta(&s, c))
    .sum();
    // Every datagram received was dropped at the edge, each under one reason.
    assert_eq!(delta(&s, "received"), total, "{s:#?}");
    assert_eq!(dropped + delta(&s, "oversized"), total, "{s:#?}");
    assert_eq!(delta(&s, "malformed"), dropped, "{s:#?}");
    assert_eq!(get(&s, "dhcp", "panics"), 0, "{s:#?}");
    // TFTP: a datagram that is not a TFTP request is counted as malformed; one that reads as
    // a request (a random opcode 1 or 2) is refused or served. Nothing panicked.
    let not_requests = tftp_flood
        .iter()
        .filter(|d| !matches!(d.get(..2), Some([0, 1 | 2])))
        .count() as u64;
    wait_for(
        "the TFTP flood counted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok((get(&stats(&appliance), "tftp", "malformed") >= not_requests).then_some(())),
    )
    .unwrap();
    let s = stats(&appliance);
    assert_eq!(get(&s, "tftp", "panics"), 0, "{s:#?}");
    assert!(appliance.exited().is_none(), "{}", appliance.log_tail(30));
    // Every service still runs, none was restarted.
    let health = &s.health;
    assert_eq!(health.status, "ok", "{health:#?}");
    for name in ["dhcp", "tftp", "http"] {
        let service = health.services.get(name);
        assert_eq!(
            service.map(|v| v.state),
            Some(ServiceState::Running),
            "{health:#?}"
        );
        assert_eq!(service.map(|v| v.restarts), Some(0), "{health:#?}");
    }

    // 3. Real clients are served right after.
    let (_, server) = udhcpc_once(&host, std::path::Path::new("/bin/true"), &[]);
    assert_eq!(server, "10.77.0.1");
    let got = lab.dir().join("fetched-undionly.kpxe");
    run_ok(
        host.command("tftp")
            .args(["-m", "binary", "10.77.0.1", "-c", "get", "undionly.kpxe"])
            .arg(&got),
    );
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(appliance.data_dir.join("boot/undionly.kpxe")).unwrap()
    );
}
