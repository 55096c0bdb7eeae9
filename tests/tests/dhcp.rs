//! DHCP against real clients in the lab's namespaces: busybox udhcpc and ISC dhclient get
//! leases, renew and release; malformed packets and floods are counted and dropped.

mod dhcp_common;

use std::time::Duration;

use dhcp_common::{client_script, counter, parse_lease, run_ok, signal, udhcpc_once, wait_lines};
use stork_lab::{Appliance, Lab, Spawned, wait_for};
use stork_tests::{boot_files, lab_dir, stork_bin};

#[test]
#[ignore = "needs root and busybox: run `cargo xtask test`"]
fn malformed_packets_are_counted_and_dropped_and_udhcpc_still_gets_a_lease() {
    assert!(stork_bin().exists(), "run through `cargo xtask test`");
    let mut lab = Lab::new("dhcp_udhcpc", &lab_dir()).unwrap();
    let appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    // A static address outside the range, just to send garbage from.
    let host = lab.add_host_at("c1", "10.77.0.250/24").unwrap();

    for garbage in ["not dhcp", "\\001\\001\\006\\000"] {
        run_ok(
            host.command("bash")
                .args(["-c", &format!("printf '{garbage}' > /dev/udp/10.77.0.1/67")]),
        );
    }
    // Oversized: longer than one unfragmented frame can carry.
    run_ok(
        host.command("bash")
            .args(["-c", "head -c 3000 /dev/zero > /dev/udp/10.77.0.1/67"]),
    );
    wait_for(
        "malformed packets counted",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            Ok(
                (counter(&appliance, "malformed") >= 2 && counter(&appliance, "oversized") >= 1)
                    .then_some(()),
            )
        },
    )
    .unwrap();

    let out = stork_tests::udhcpc(&host, std::path::Path::new("/bin/true"), &[]).unwrap();
    assert!(
        out.contains("lease of 10.77.0.100 obtained from 10.77.0.1"),
        "{out}"
    );
    assert!(counter(&appliance, "replied") >= 2);
    assert!(counter(&appliance, "discover") >= 1 && counter(&appliance, "acks") >= 1);
}

#[test]
#[ignore = "needs root and busybox: run `cargo xtask test`"]
fn udhcpc_gets_renews_and_releases() {
    let mut lab = Lab::new("dhcp_udhcpc_renew", &lab_dir()).unwrap();
    let appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let host = lab.add_host("c1").unwrap();
    let script = client_script(&lab);
    let client = Spawned::start(
        "udhcpc",
        {
            let mut c = host.command("busybox");
            c.args([
                "udhcpc",
                "-i",
                &host.ifname,
                "-f",
                "-t",
                "5",
                "-T",
                "1",
                "-s",
            ])
            .arg(&script);
            c
        },
        &lab.dir().join("udhcpc.log"),
    )
    .unwrap();
    let log = wait_lines(&client, "obtained from", 1, "the first lease");
    let (ip, server) = parse_lease(&log).unwrap();
    assert_eq!(server, "10.77.0.1");
    let acks = counter(&appliance, "acks");

    // SIGUSR1: renew now. udhcpc unicasts a REQUEST from its address (RENEWING) and the
    // ACK comes back unicast to it.
    signal(&client, "USR1");
    let log = wait_lines(&client, "obtained from", 2, "the renewal");
    assert_eq!(parse_lease(&log).unwrap().0, ip, "{log}");
    assert!(counter(&appliance, "acks") > acks);

    // SIGUSR2: release.
    signal(&client, "USR2");
    wait_for(
        "the release",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok((counter(&appliance, "release") >= 1).then_some(())),
    )
    .unwrap();
    drop(client);
    // The address is free again: another client asking for it gets it.
    let other = lab.add_host("c2").unwrap();
    let (got, _) = udhcpc_once(&other, &script, &["-r", &ip]);
    assert_eq!(got, ip);
}

#[test]
#[ignore = "needs root and isc-dhcp-client: run `cargo xtask test`"]
fn dhclient_gets_reboots_into_the_same_lease_and_releases() {
    let mut lab = Lab::new("dhcp_dhclient", &lab_dir()).unwrap();
    let appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let host = lab.add_host("c1").unwrap();
    let script = client_script(&lab);
    let dir = lab.dir().to_path_buf();
    let conf = dir.join("dhclient.conf");
    std::fs::write(&conf, "").unwrap();
    let dhclient = |args: &[&str]| {
        let mut c = host.command("dhclient");
        c.args(["-4", "-v", "-cf"])
            .arg(&conf)
            .arg("-lf")
            .arg(dir.join("dhclient.leases"))
            .arg("-pf")
            .arg(dir.join("dhclient.pid"))
            .arg("-sf")
            .arg(&script)
            .args(args)
            .arg(&host.ifname);
        c
    };
    let bound = |log: &str| -> Option<String> {
        log.lines().rev().find_map(|l| {
            l.split("bound to ")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(String::from)
        })
    };

    let first = Spawned::start("dhclient", dhclient(&["-d"]), &dir.join("dhclient1.log")).unwrap();
    let log = wait_lines(&first, "bound to", 1, "dhclient's lease");
    let ip = bound(&log).unwrap();
    assert!(log.contains("DHCPOFFER of"), "{log}");
    drop(first);

    // A restart with the lease file: INIT-REBOOT asks for the same address and gets it.
    let second = Spawned::start("dhclient", dhclient(&["-d"]), &dir.join("dhclient2.log")).unwrap();
    let log = wait_lines(&second, "bound to", 1, "dhclient's reboot");
    assert_eq!(bound(&log).unwrap(), ip, "{log}");
    assert!(
        log.contains(&format!("DHCPREQUEST for {ip}")),
        "INIT-REBOOT expected: {log}"
    );
    drop(second);

    // -r releases the lease it holds.
    run_ok(&mut dhclient(&["-r"]));
    wait_for(
        "the release",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok((counter(&appliance, "release") >= 1).then_some(())),
    )
    .unwrap();
    let other = lab.add_host("c2").unwrap();
    let (got, _) = udhcpc_once(&other, &script, &["-r", &ip]);
    assert_eq!(got, ip, "released address offered again");
}

#[test]
#[ignore = "needs root and busybox: run `cargo xtask test`"]
fn a_flooding_client_is_rate_limited_and_others_are_served() {
    let mut lab = Lab::new("dhcp_flood", &lab_dir()).unwrap();
    let appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let flooder = lab.add_host_at("flood", "10.77.0.250/24").unwrap();
    // 200 copies of one DISCOVER from one MAC, as fast as bash writes them.
    let discover = dhcp_common_discover();
    let path = lab.dir().join("discover.bin");
    std::fs::write(&path, discover).unwrap();
    run_ok(flooder.command("bash").args([
        "-c",
        &format!(
            "for i in $(seq 200); do cat {} > /dev/udp/10.77.0.1/67; done",
            path.display()
        ),
    ]));
    wait_for(
        "rate limiting",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok((counter(&appliance, "rate_limited") >= 150).then_some(())),
    )
    .unwrap();
    // Everyone else is unaffected.
    let other = lab.add_host("c2").unwrap();
    let (ip, _) = udhcpc_once(&other, &client_script(&lab), &[]);
    assert!(ip.starts_with("10.77.0."));
}

/// A minimal DHCPDISCOVER from MAC 52:54:00:00:99:99.
fn dhcp_common_discover() -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&[1, 2, 3, 4]);
    p[28..34].copy_from_slice(&[0x52, 0x54, 0, 0, 0x99, 0x99]);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, 1, 255]);
    p
}
