//! Crash test: leases granted to real clients survive `kill -9` of the appliance.

mod dhcp_common;

use std::collections::HashSet;

use dhcp_common::{client_script, udhcpc_once};
use stork_lab::{Appliance, Lab};
use stork_tests::{boot_files, lab_dir, stork_bin};

#[test]
#[ignore = "needs root and busybox: run `cargo xtask test`"]
fn leases_survive_sigkill_and_are_never_handed_out_twice() {
    let mut lab = Lab::new("dhcp_crash", &lab_dir()).unwrap();
    let mut appliance = Appliance::start(&lab, &stork_bin(), &boot_files()).unwrap();
    let script = client_script(&lab);
    let hosts: Vec<_> = (0..4)
        .map(|i| lab.add_host(&format!("c{i}")).unwrap())
        .collect();
    let leases: Vec<String> = hosts
        .iter()
        .map(|h| udhcpc_once(h, &script, &[]).0)
        .collect();
    let distinct: HashSet<_> = leases.iter().collect();
    assert_eq!(distinct.len(), leases.len(), "{leases:?}");
    let journal = appliance.data_dir.join("dhcp-leases.journal");
    assert!(journal.exists());

    // SIGKILL (Child::kill), no chance to flush anything: what is on disk is all there is.
    let log_before = appliance.log_tail(5);
    drop(appliance);
    appliance = Appliance::start(&lab, &stork_bin(), &boot_files())
        .unwrap_or_else(|e| panic!("restart failed: {e:#}\n{log_before}"));

    // A new client first, asking for a held address: it must get a free one.
    let newcomer = lab.add_host("new").unwrap();
    let (got, _) = udhcpc_once(&newcomer, &script, &["-r", &leases[0]]);
    assert!(
        !leases.contains(&got),
        "new client got {got}, which is held: {leases:?}\n{}",
        appliance.log_tail(30)
    );
    // Every old client gets its own address back.
    for (h, ip) in hosts.iter().zip(&leases) {
        let (again, _) = udhcpc_once(h, &script, &[]);
        assert_eq!(&again, ip, "{}", appliance.log_tail(30));
    }
}
