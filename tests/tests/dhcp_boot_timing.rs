//! How long a SeaBIOS VM (iPXE ROM) takes from power-on to fetching its iPXE script, with
//! and without Stork's IPv6 router advertisements (iPXE waits for IPv6 autoconfiguration
//! unless a router advertisement says there is none: docs/measurements.md says about 13 s).
//! Prints both times; asserts only that the advertisement makes the boot faster.

mod dhcp_common;

use std::time::{Duration, Instant};

use dhcp_common::appliance_with;
use stork_lab::{Lab, Vm, VmSpec, wait_for};
use stork_tests::{lab_dir, require_artefacts};

fn time_to_script(ra: bool) -> Duration {
    let mut lab = Lab::new(if ra { "dhcp_ra_on" } else { "dhcp_ra_off" }, &lab_dir()).expect("lab");
    let appliance = appliance_with(&lab, &format!("[dhcp]\nipv6_ra = {ra}\n"));
    let mac = "52:54:00:77:00:31";
    let mut vm = Vm::start(&mut lab, VmSpec::new("vm", mac)).expect("vm");
    let started = Instant::now();
    let log = lab.dir().join("stork.log");
    let r = wait_for(
        "the iPXE script fetch",
        Duration::from_secs(120),
        Duration::from_millis(50),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text
                .contains("serving iPXE script")
                .then(|| started.elapsed()))
        },
    );
    match r {
        Ok(d) => {
            vm.kill();
            d
        }
        Err(e) => {
            lab.keep_dir();
            panic!(
                "{e:#}\n--- console ---\n{}\n--- stork ---\n{}",
                vm.console_tail(30),
                appliance.log_tail(30)
            )
        }
    }
}

#[test]
#[ignore = "needs root, QEMU and built images: run `cargo xtask test`"]
fn router_advertisements_save_ipxe_its_ipv6_wait() {
    require_artefacts();
    let without = time_to_script(false);
    let with = time_to_script(true);
    println!(
        "power-on to iPXE script fetch: {:.1} s without router advertisements, {:.1} s with",
        without.as_secs_f64(),
        with.as_secs_f64()
    );
    assert!(
        with + Duration::from_secs(3) < without,
        "RA: {with:?}, no RA: {without:?}"
    );
}
