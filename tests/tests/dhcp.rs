//! DHCP against real clients in the lab's namespaces.

use std::time::Duration;

use stork_lab::{Appliance, Lab, wait_for};
use stork_tests::{boot_files, lab_dir, stork_bin};

fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn counter(a: &Appliance, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&a.cli(&["stats", "--json"]).unwrap()).unwrap();
    v["dhcp"][name].as_u64().unwrap()
}

#[test]
#[ignore = "needs root and busybox: run `cargo xtask test`"]
fn malformed_packets_are_counted_and_dropped_and_udhcpc_still_gets_a_lease() {
    assert!(stork_bin().exists(), "run through `cargo xtask test`");
    let mut lab = Lab::new("dhcp_udhcpc", &lab_dir()).unwrap();
    let appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let host = lab.add_host("c1").unwrap();
    // A static address outside the range, just to send garbage from.
    run_ok(
        host.command("ip")
            .args(["addr", "add", "10.77.0.250/24", "dev", &host.ifname]),
    );

    for garbage in ["not dhcp", "\\001\\001\\006\\000"] {
        run_ok(
            host.command("bash")
                .args(["-c", &format!("printf '{garbage}' > /dev/udp/10.77.0.1/67")]),
        );
    }
    wait_for(
        "malformed packets counted",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok((counter(&appliance, "malformed") >= 2).then_some(())),
    )
    .unwrap();

    let out = run_ok(host.command("busybox").args([
        "udhcpc",
        "-i",
        &host.ifname,
        "-n",
        "-q",
        "-f",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        "/bin/true",
    ]));
    assert!(
        out.contains("lease of 10.77.0.100 obtained from 10.77.0.1"),
        "{out}"
    );
    assert!(counter(&appliance, "replied") >= 2);
}
