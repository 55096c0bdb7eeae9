//! DHCPv6 against a real client in the lab's namespaces: ISC `dhclient -6` solicits and gets
//! an address from `[dhcp6] range` (IA_NA); the appliance is killed (`kill -9`) and started
//! again, reads the lease back, and the client renews the same address from it; released,
//! the address goes to another client. Malformed datagrams to port 547 are counted and
//! dropped, and the service goes on.

mod dhcp_common;

use std::time::Duration;

use dhcp_common::{appliance_with, run_ok, service_counter, wait_lines_for};
use stork_lab::{Appliance, Host, Lab, Spawned, wait_for};
use stork_tests::lab_dir;

const CONFIG: &str = "[dhcp6]\nmode = \"full\"\naddress = \"fd77::1\"\nprefix_len = 64\nrange = [\"fd77::100\", \"fd77::1ff\"]\nlease_time = 60\n";

fn counter(a: &Appliance, name: &str) -> u64 {
    service_counter(a, "dhcp6", name)
}

/// Waits until `host`'s link-local address has passed duplicate address detection:
/// dhclient cannot bind to a tentative one.
fn wait_link_local(host: &Host) {
    wait_for(
        "a usable link-local address",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let out = run_ok(host.command("ip").args([
                "-6",
                "addr",
                "show",
                "dev",
                &host.ifname,
                "scope",
                "link",
            ]));
            Ok((out.contains("inet6 fe80") && !out.contains("tentative")).then_some(()))
        },
    )
    .expect("the host's link-local address");
}

/// The last `iaaddr` in a dhclient -6 lease file.
fn leased(lease_file: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(lease_file).ok()?;
    text.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("iaaddr ")?;
        rest.split_whitespace().next().map(String::from)
    })
}

#[test]
#[ignore = "needs root and isc-dhcp-client: run `cargo xtask test`"]
fn dhclient6_gets_renews_and_releases_an_address() {
    let mut lab = Lab::new("dhcp6", &lab_dir()).unwrap();
    let mut appliance = appliance_with(&lab, CONFIG);
    let host = lab.add_host("c1").unwrap();
    wait_link_local(&host);

    // Garbage to the server port: counted by reason, dropped (too short to be a message;
    // an option longer than the datagram; an Advertise, which servers send, not answer).
    for garbage in ["\\001", "not dhcpv6 at all", "\\002\\000\\000\\001"] {
        run_ok(host.command("bash").args([
            "-c",
            &format!(
                "printf '{garbage}' > /dev/udp/ff02::1:2%{}/547",
                host.ifname
            ),
        ]));
    }
    wait_for(
        "malformed datagrams counted",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let dropped = (
                counter(&appliance, "drop_malformed"),
                counter(&appliance, "drop_not_for_servers"),
            );
            Ok((dropped == (2, 1)).then_some(()))
        },
    )
    .unwrap();

    let dir = lab.dir().to_path_buf();
    let leases = dir.join("dhclient6.leases");
    let dhclient = |host: &Host, args: &[&str], leases: &std::path::Path| {
        let mut c = host.command("dhclient");
        c.args(["-6", "-v", "-cf", "/dev/null", "-lf"])
            .arg(leases)
            .arg("-pf")
            .arg(dir.join(format!("dhclient6-{}.pid", host.netns)))
            .args(["-sf", "/bin/true"])
            .args(args)
            .arg(&host.ifname);
        c
    };
    let client = Spawned::start(
        "dhclient -6",
        dhclient(&host, &["-d"], &leases),
        &dir.join("dhclient6.log"),
    )
    .unwrap();
    let log = wait_lines_for(
        &client,
        "Reply message on",
        1,
        "dhclient -6's lease",
        Duration::from_secs(60),
    );
    let ip = leased(&leases).unwrap_or_else(|| panic!("no iaaddr in the lease file; log:\n{log}"));
    assert!(ip.starts_with("fd77::1"), "leased {ip}\n{log}");
    assert!(log.contains("Advertise message on"), "{log}");
    assert!(counter(&appliance, "replied") >= 2);

    // Killed mid-lease and started again: the lease is read back from the lease file.
    appliance.kill().unwrap();
    appliance.restart().unwrap();
    assert_eq!(counter(&appliance, "leases_restored"), 1);

    // dhclient renews at T1 (half of the 60 s lifetime) with the restarted server (same
    // DUID: its interface's MAC): the same address again. The wait allows for Renew's
    // retransmissions (10 s and up) on a loaded host.
    let log = wait_lines_for(
        &client,
        "Reply message on",
        2,
        "dhclient -6's renewal",
        Duration::from_secs(180),
    );
    assert!(log.contains("XMT: Renew on"), "{log}");
    assert_eq!(leased(&leases).as_deref(), Some(ip.as_str()), "{log}");
    drop(client);

    // -r releases it; the next client gets that address.
    run_ok(&mut dhclient(&host, &["-r"], &leases));
    let other = lab.add_host("c2").unwrap();
    wait_link_local(&other);
    let other_leases = dir.join("dhclient6-c2.leases");
    run_ok(&mut dhclient(&other, &["-1"], &other_leases));
    assert_eq!(leased(&other_leases).as_deref(), Some(ip.as_str()));
}
