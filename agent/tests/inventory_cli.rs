//! `stork-agent inventory` on the machine running the tests: no PID 1, no side effects.

use std::process::Command;

use stork_proto::Inventory;

#[test]
fn inventory_of_this_host_parses() {
    let out = Command::new(env!("CARGO_BIN_EXE_stork-agent"))
        .arg("inventory")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inv: Inventory = serde_json::from_slice(&out.stdout).unwrap();
    assert!(inv.cpu.count >= 1, "{inv:?}");
    assert!(inv.memory.usable_bytes > 0, "{inv:?}");
    assert!(inv.memory.total_bytes > 0, "{inv:?}");
    assert!(!inv.kernel.is_empty(), "{inv:?}");
}

#[test]
fn inventory_of_an_empty_root_is_empty_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stork-agent"))
        .args(["inventory", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let inv: Inventory = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inv, Inventory::default());
}

#[test]
fn without_pid_1_or_a_command_it_refuses() {
    let out = Command::new(env!("CARGO_BIN_EXE_stork-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running as PID 1"));
}
