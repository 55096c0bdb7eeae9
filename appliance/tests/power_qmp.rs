//! The QMP driver against a real QEMU (TCG, user networking, no root): status, hard off
//! and on, cycle, boot order through `bootindex`, and a QEMU that has gone away.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stork::power::{BootDevice, PowerDriver, PowerParams, PowerState, QmpParams};
use stork_lab::Spawned;

/// A small QEMU with a NIC and a disk, stopped at nothing in particular (no OS).
fn qemu(dir: &Path) -> Spawned {
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("creating the disk");
    let sock = dir.join("qmp.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .args([
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ])
    .arg("-drive")
    .arg(format!("file={},if=none,id=d0,format=raw", disk.display()))
    .args(["-device", "virtio-blk-pci,drive=d0"]);
    let mut p = Spawned::start("qemu", cmd, &dir.join("qemu.log")).unwrap_or_else(|e| {
        panic!("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e:#}")
    });
    let started = Instant::now();
    while !sock.exists() {
        if let Some(s) = p.exited() {
            panic!("QEMU exited ({s}): {}", p.log_tail(10));
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no QMP socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// One QMP command on a fresh connection, for checking what the driver did.
fn qmp(sock: &Path, command: &str, args: Value) -> Value {
    let s = UnixStream::connect(sock).expect("QMP connect");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    for msg in [
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": command, "arguments": args}),
    ] {
        writeln!(w, "{msg}").expect("QMP write");
        loop {
            line.clear();
            r.read_line(&mut line).expect("QMP read");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("event").is_none() {
                if msg["execute"] == command {
                    return v["return"].clone();
                }
                break;
            }
        }
    }
    Value::Null
}

fn bootindex(sock: &Path, device: &str) -> i64 {
    qmp(
        sock,
        "qom-get",
        json!({"path": format!("/machine/peripheral-anon/{device}"), "property": "bootindex"}),
    )
    .as_i64()
    .expect("bootindex")
}

#[tokio::test]
async fn qmp_power_and_boot_order_on_a_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let vm = qemu(dir.path());
    let sock = dir.path().join("qmp.sock");
    let d = PowerDriver::new(PowerParams::Qmp(QmpParams::new(&sock)));

    assert_eq!(d.query().await.unwrap(), PowerState::On);
    // Hard off: stopped with its CPUs reset.
    d.power_off(false).await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::Off);
    assert_eq!(qmp(&sock, "query-status", json!({}))["status"], "prelaunch");
    d.power_on().await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::On);
    d.power_cycle().await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::On);

    // device[0] is the NIC, device[1] the disk (command-line order).
    d.set_boot_device(BootDevice::Pxe, true, false)
        .await
        .unwrap();
    assert_eq!(
        (bootindex(&sock, "device[0]"), bootindex(&sock, "device[1]")),
        (1, 2)
    );
    d.set_boot_device(BootDevice::Disk, false, false)
        .await
        .unwrap();
    assert_eq!(
        (bootindex(&sock, "device[0]"), bootindex(&sock, "device[1]")),
        (2, 1)
    );

    // Once QEMU is gone the machine is off, and QMP cannot bring it back.
    drop(vm);
    let started = Instant::now();
    while d.query().await.unwrap() != PowerState::Off {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = d.power_on().await.unwrap_err();
    assert!(e.to_string().contains("QMP cannot start a process"), "{e}");
}
