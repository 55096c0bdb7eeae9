//! A client behind a real relay (ISC dhcrelay, in its own namespace) gets an address from
//! the relay's subnet, and renews through the server directly.

mod dhcp_common;

use std::time::Duration;

use dhcp_common::{Netns, appliance_with, client_script, counter, run_ok, udhcpc_once};
use stork_lab::{Lab, Spawned, wait_for};
use stork_tests::lab_dir;

const CONFIG: &str = r#"
[dhcp]
range = ["10.77.0.100", "10.77.0.199"]

[[dhcp.subnets]]
network = "10.78.0.0/24"
ranges = [["10.78.0.100", "10.78.0.109"]]
router = "10.78.0.1"
"#;

#[test]
#[ignore = "needs root and isc-dhcp-relay: run `cargo xtask test`"]
fn a_relayed_client_gets_an_address_from_the_relays_subnet() {
    let mut lab = Lab::new("dhcp_relay", &lab_dir()).unwrap();
    let appliance = appliance_with(&lab, CONFIG);
    // The relay: one leg on the provisioning bridge, one on the client's segment.
    let relay = lab.add_host_at("relay", "10.77.0.2/24").unwrap();
    let client_ns = Netns::new(format!("{}-rclient", lab.netns()));
    run_ok(relay.command("ip").args([
        "link",
        "add",
        "down0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &client_ns.0,
    ]));
    run_ok(
        relay
            .command("ip")
            .args(["addr", "add", "10.78.0.1/24", "dev", "down0"]),
    );
    run_ok(relay.command("ip").args(["link", "set", "down0", "up"]));
    run_ok(
        relay
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]),
    );
    run_ok(client_ns.command("ip").args(["link", "set", "eth0", "up"]));
    // The appliance reaches the relay's subnet through the relay (for replies to giaddr).
    run_ok(
        lab.command("ip")
            .args(["route", "add", "10.78.0.0/24", "via", "10.77.0.2"]),
    );

    let pidfile = lab.dir().join("dhcrelay.pid");
    let mut cmd = relay.command("dhcrelay");
    cmd.args(["-4", "-d", "-a", "-pf"]).arg(&pidfile).args([
        "-id",
        "down0",
        "-iu",
        "eth0",
        "10.77.0.1",
    ]);
    let dhcrelay = Spawned::start("dhcrelay", cmd, &lab.dir().join("dhcrelay.log")).unwrap();
    // dhcrelay prints its interfaces once it listens.
    wait_for(
        "dhcrelay to listen",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            Ok(std::fs::read_to_string(dhcrelay.log())
                .unwrap_or_default()
                .contains("Sending on")
                .then_some(()))
        },
    )
    .unwrap();

    let client = client_ns.host("eth0");
    let script = client_script(&lab);
    let (ip, server) = udhcpc_once(&client, &script, &[]);
    assert!(
        ip.starts_with("10.78.0.10"),
        "got {ip}\n--- dhcrelay ---\n{}\n--- stork ---\n{}",
        dhcrelay.log_tail(20),
        appliance.log_tail(20)
    );
    assert_eq!(server, "10.77.0.1");
    assert!(counter(&appliance, "acks") >= 1);
    // The client kept its address and a route back through the relay: a second run is an
    // INIT-REBOOT through the relay and gets the same address.
    let (again, _) = udhcpc_once(&client, &script, &["-r", &ip]);
    assert_eq!(again, ip);
}

/// The DHCP benchmark's own load client (`stork-dhcp-load`) does real exchanges: against
/// the appliance, as a relay on its segment, every exchange it starts ends in an ACK the
/// appliance counted, each for a new client.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn the_benchmarks_load_client_gets_every_exchange_acked() {
    let mut lab = Lab::new("dhcp_load", &lab_dir()).unwrap();
    let appliance = appliance_with(&lab, "[dhcp]\nrange = [\"10.77.0.20\", \"10.77.0.250\"]\n");
    let host = lab.add_host_at("load", "10.77.0.2/24").unwrap();
    // 200 exchanges over a second: fewer than the range's 231 addresses.
    let out = run_ok(host.command(stork_tests::dhcp_load_bin()).args([
        "--server",
        "10.77.0.1",
        "--relay",
        "10.77.0.2",
        "--rate",
        "200",
        "--secs",
        "1",
        "--drain-ms",
        "2000",
    ]));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let n = |k: &str| report[k].as_u64().unwrap();
    assert_eq!(n("discovers"), 200, "{report}");
    for k in ["offers", "requests", "acks"] {
        assert_eq!(n(k), 200, "{k}: {report}\n{}", appliance.log_tail(20));
    }
    for k in ["naks", "unmatched", "malformed", "send_errors"] {
        assert_eq!(n(k), 0, "{k}: {report}");
    }
    assert!(report["ra_avg_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(counter(&appliance, "acks"), 200);
}
