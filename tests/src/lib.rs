//! Shared set-up for the end-to-end tests: where the built binaries and images are, and
//! ([`deploy`]) a lab with the appliance, the OS image and one BMC-powered machine.
//!
//! `cargo xtask test` builds them and sets the variables; run directly, the defaults point
//! into this workspace's `target/`.

use std::path::PathBuf;

pub mod appliance;
pub mod attacker;
pub mod deploy;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

pub(crate) fn from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(default))
}

/// The `stork` binary.
pub fn stork_bin() -> PathBuf {
    from_env("STORK_BIN", "target/debug/stork")
}

/// `stork-dhcp-load`, the DHCP benchmark's load client (built with the workspace).
pub fn dhcp_load_bin() -> PathBuf {
    from_env("STORK_DHCP_LOAD", "target/debug/stork-dhcp-load")
}

/// Directory with the agent's `vmlinuz` and `initrd.img` (built by `cargo xtask images`).
pub fn boot_files() -> PathBuf {
    from_env("STORK_BOOT_FILES", "target/stork/boot")
}

/// Where labs keep their logs, disks and consoles.
pub fn lab_dir() -> PathBuf {
    from_env("STORK_LAB_DIR", "target/lab")
}

/// Where the web UI test saves its screenshots (kept after the run, for a person to look
/// at): `STORK_UI_SCREENSHOTS`, by default `target/stork/ui-screenshots`.
pub fn ui_screenshots() -> PathBuf {
    from_env("STORK_UI_SCREENSHOTS", "target/stork/ui-screenshots")
}

/// Fails with a clear message when the built artefacts are missing.
pub fn require_artefacts() {
    require_boot_files(&[]);
}

/// [`require_artefacts`], and `files` among the boot files (network boot programs a test's
/// firmware path needs).
pub fn require_boot_files(files: &[&str]) {
    let wanted = files.iter().map(|f| boot_files().join(f));
    for p in [
        stork_bin(),
        boot_files().join("vmlinuz"),
        boot_files().join("initrd.img"),
    ]
    .into_iter()
    .chain(wanted)
    {
        assert!(
            p.exists(),
            "{} is missing: end-to-end tests run through `cargo xtask test`, which builds it",
            p.display()
        );
    }
}

/// `busybox udhcpc` once on `host` (one DISCOVER round, up to five tries a second apart),
/// with `script` as its hook (`/bin/true`: the lease is shown, not configured); what it
/// printed, stdout and stderr (where it says what it got).
pub fn udhcpc(
    host: &stork_lab::Host,
    script: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<String> {
    let out = host
        .command("busybox")
        .args([
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
        ])
        .arg(script)
        .args(extra)
        .output()
        .map_err(|e| anyhow::anyhow!("running busybox udhcpc: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "busybox udhcpc failed: {text}");
    Ok(text)
}
