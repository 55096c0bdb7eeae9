//! Installs the Debian packages the lab and the tests use, when they are missing.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Packages and why each is here.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "runs lab machines"),
    ("qemu-utils", "disk images"),
    ("seabios", "BIOS firmware for lab machines"),
    ("ovmf", "UEFI firmware for lab machines"),
    ("ipxe", "network boot programs"),
    ("ipxe-qemu", "iPXE option ROMs for QEMU NICs"),
    ("iproute2", "network namespaces, bridges, taps"),
    ("cpio", "tests read initrds with the reference tool"),
    ("zstd", "tests decompress initrds"),
    ("busybox", "udhcpc and small tools for tests"),
    (
        "openssh-client",
        "deploy tests log in to the deployed machine (ssh, ssh-keygen)",
    ),
    (
        "gdisk",
        "deploy tests check an erased disk has no GPT (sgdisk)",
    ),
    ("debootstrap", "root trees of the ephemeral and OS images"),
    ("squashfs-tools", "mksquashfs, unsquashfs: image SquashFS"),
    ("mtools", "the raw OS image's ESP, without mounting"),
    ("dosfstools", "mkfs.vfat: the raw image's ESP, test seeds"),
    ("e2fsprogs", "mke2fs -d: the raw OS image's root"),
    ("libcap2-bin", "getcap: file capabilities survive SquashFS"),
    (
        "openipmi",
        "ipmi_sim: the lab's BMCs and the IPMI driver tests",
    ),
    (
        "ipmitool",
        "an independent IPMI client the power tests check against",
    ),
    (
        "python3-venv",
        "a venv for sushy-tools, the Redfish emulator of the power tests",
    ),
    ("tftp-hpa", "TFTP client for the TFTP tests"),
    (
        "atftp",
        "TFTP client with windowsize, for the TFTP tests and bench",
    ),
    ("curl", "TFTP (and HTTP) client for tests"),
    ("tftpd-hpa", "peer TFTP server for `cargo xtask bench tftp`"),
    ("dnsmasq", "peer TFTP server for `cargo xtask bench tftp`"),
    ("isc-dhcp-client", "dhclient for the DHCP tests"),
    (
        "isc-dhcp-relay",
        "dhcrelay: the real relay of the DHCP relay test",
    ),
    (
        "kea-dhcp4-server",
        "peer DHCP server for `cargo xtask bench dhcp`",
    ),
    (
        "kea-admin",
        "perfdhcp, the load generator of `cargo xtask bench dhcp`",
    ),
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(p, _)| !installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("missing Debian package {p} ({why})");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "run as root, or install them first: apt-get install {}",
            missing.join(" ")
        );
    }
    crate::step(&format!("installing {}", missing.join(" ")));
    // The mirror and proxy come from the host's apt configuration.
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("running apt-get update")?;
    if !update.success() {
        eprintln!("warning: apt-get update failed; trying the install with the lists at hand");
    }
    let s = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !s.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
