//! Ending the agent's life: PID 1 must never exit (the kernel panics), so it powers off.

use std::thread::sleep;
use std::time::Duration;

use nix::sys::reboot::{RebootMode, reboot};

use crate::console;

/// How long a failure stays on screen (and the machine stays reachable) before power-off.
pub const FAILURE_GRACE: Duration = Duration::from_secs(10);

/// Flushes filesystems and powers the machine off.
pub fn off() -> ! {
    nix::unistd::sync();
    let err = match reboot(RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    console::line(&format!("power-off failed: {err}; halting here"));
    // Returning would end PID 1 and panic the kernel; idle instead, having said why.
    loop {
        sleep(Duration::from_secs(3600));
    }
}

/// Flushes filesystems and restarts the machine (into the installed OS: the appliance no
/// longer network-boots it).
pub fn restart() -> ! {
    nix::unistd::sync();
    let err = match reboot(RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    console::line(&format!("reboot failed: {err}; powering off instead"));
    off()
}

/// Prints a failure's grace notice, waits, and powers off.
pub fn off_after_failure() -> ! {
    console::line(&format!("powering off in {} s", FAILURE_GRACE.as_secs()));
    sleep(FAILURE_GRACE);
    off()
}

/// Makes a panic print on the console and power off instead of unwinding out of PID 1. A
/// helper thread's panic (download, disk writer, heartbeat) only unwinds that thread: its
/// join turns it into an error that the main thread reports before powering off.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        if std::thread::current().name() != Some("main") {
            console::line(&format!("a helper thread panicked: {info}"));
            return;
        }
        console::line(&format!("FAILED with a panic: {info}"));
        off_after_failure();
    }));
}
