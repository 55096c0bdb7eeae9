//! Installs the Debian packages the lab and the tests use, then checks that every tool they
//! call is really there.
//!
//! Why the check after: a machine can come with one of these packages from another suite
//! (`qemu-utils` from backports), and installing the rest then makes apt remove it to keep
//! versions consistent (docs/measurements.md, "Dependencies"). So the whole set goes into
//! one apt transaction (apt keeps what is current and can pick matching versions), and the
//! tools are looked for on `PATH` afterwards, not only the packages before.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Packages and why each is here.
pub const PACKAGES: &[(&str, &str)] = &[
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
    (
        "grub-common",
        "grub-editenv: the GRUB environment block the appliance's A/B boot keeps",
    ),
    (
        "util-linux",
        "partx: the data partition grow test on a loop device",
    ),
    (
        "mount",
        "losetup: loop devices for the write and grow tests",
    ),
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
        "kea-dhcp6-server",
        "peer DHCPv6 server for `cargo xtask bench dhcp6`",
    ),
    (
        "kea-admin",
        "perfdhcp, the load generator of `cargo xtask bench dhcp`",
    ),
    (
        "chromium",
        "a real browser for the web UI test and `cargo xtask bench ui`",
    ),
    ("chromium-driver", "WebDriver for chromium"),
    (
        "nginx-light",
        "peer HTTP server for `cargo xtask bench http` (run by the bench, never as a service)",
    ),
    (
        "postgresql",
        "the store's PostgreSQL backend tests (a scratch server per test, never the service)",
    ),
    (
        "tcpdump",
        "sees a deployed VM's VLAN-tagged frames on the lab bridge (the host has no 8021q)",
    ),
];

/// Every program the lab, the image builder and the tests run, and the package that brings it.
pub const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("cpio", "cpio"),
    ("zstd", "zstd"),
    ("busybox", "busybox"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("sgdisk", "gdisk"),
    ("debootstrap", "debootstrap"),
    ("mksquashfs", "squashfs-tools"),
    ("unsquashfs", "squashfs-tools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("mtype", "mtools"),
    ("grub-editenv", "grub-common"),
    ("partx", "util-linux"),
    ("dumpe2fs", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("losetup", "mount"),
    ("mkfs.vfat", "dosfstools"),
    ("mke2fs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("getcap", "libcap2-bin"),
    ("ipmi_sim", "openipmi"),
    ("ipmitool", "ipmitool"),
    ("python3", "python3-venv"),
    ("tftp", "tftp-hpa"),
    ("atftp", "atftp"),
    ("curl", "curl"),
    ("in.tftpd", "tftpd-hpa"),
    ("dnsmasq", "dnsmasq"),
    ("dhclient", "isc-dhcp-client"),
    ("dhcrelay", "isc-dhcp-relay"),
    ("kea-dhcp4", "kea-dhcp4-server"),
    ("kea-dhcp6", "kea-dhcp6-server"),
    ("perfdhcp", "kea-admin"),
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
    ("nginx", "nginx-light"),
    ("pg_lsclusters", "postgresql"),
    ("tcpdump", "tcpdump"),
];

/// Programs Debian keeps off `PATH`, in a directory per major version
/// (`/usr/lib/postgresql/<major>/bin`): any version will do.
pub const VERSIONED: &[(&str, &str, &str)] = &[
    ("/usr/lib/postgresql", "bin/initdb", "postgresql"),
    ("/usr/lib/postgresql", "bin/postgres", "postgresql"),
    // The scratch server's client tools (stork_lab::postgres), from postgresql-client-<major>.
    ("/usr/lib/postgresql", "bin/createdb", "postgresql"),
    ("/usr/lib/postgresql", "bin/pg_isready", "postgresql"),
];

/// Firmware and boot files the lab reads by path.
pub const FILES: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    ("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf"),
    ("/usr/share/seabios/bios-256k.bin", "seabios"),
    ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
    ("/usr/lib/ipxe/snponly.efi", "ipxe"),
    ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
    ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Finds `tool` in the directories of `path` (a `PATH` value), as a shell would.
fn which(tool: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What is missing after the install: each line names the tool or file, its package, and
/// what it is for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    pub lines: Vec<String>,
    pub packages: Vec<&'static str>,
}

impl Missing {
    fn add(&mut self, what: String, pkg: &'static str) {
        let why = PACKAGES
            .iter()
            .find(|(p, _)| *p == pkg)
            .map_or("", |(_, why)| *why);
        self.lines.push(format!("{what} (package {pkg}: {why})"));
        if !self.packages.contains(&pkg) {
            self.packages.push(pkg);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// Checks every tool on `path`, every file under `root` and every package with `installed`.
pub fn check(path: &OsStr, root: &Path, installed: impl Fn(&str) -> bool) -> Missing {
    let mut m = Missing::default();
    for (pkg, _) in PACKAGES {
        if !installed(pkg) {
            m.add(format!("package {pkg} is not installed"), pkg);
        }
    }
    for (tool, pkg) in TOOLS {
        if which(tool, path).is_none() {
            m.add(format!("`{tool}` is not on PATH"), pkg);
        }
    }
    for (file, pkg) in FILES {
        let p = root.join(file.trim_start_matches('/'));
        if !p.is_file() {
            m.add(format!("{} does not exist", p.display()), pkg);
        }
    }
    for (dir, program, pkg) in VERSIONED {
        let dir = root.join(dir.trim_start_matches('/'));
        let found = std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().any(|e| e.path().join(program).is_file()))
            .unwrap_or(false);
        if !found {
            m.add(format!("{}/*/{program} does not exist", dir.display()), pkg);
        }
    }
    m
}

/// `PATH` with the sbin directories, where Debian puts several of these tools, even when the
/// caller's `PATH` lacks them (a login shell of a user other than root).
pub fn search_path() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(d.into());
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

pub fn ensure() -> Result<()> {
    let path = search_path();
    let before = check(&path, Path::new("/"), installed);
    if before.is_empty() {
        return Ok(());
    }
    for line in before.lines.iter().filter(|l| !l.starts_with("package ")) {
        eprintln!("missing: {line}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "run as root, or install them first: apt-get install {}",
            all_packages().join(" ")
        );
    }
    // The whole set in one transaction: apt keeps what is current and resolves versions
    // across all of it, instead of removing one package to install another.
    crate::step(&format!(
        "installing the lab's Debian packages ({} missing of {})",
        before.packages.len(),
        PACKAGES.len()
    ));
    // The mirror and proxy come from the host's apt configuration.
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("running apt-get update")?;
    if !update.success() {
        eprintln!("warning: apt-get update failed; trying the install with the lists at hand");
    }
    // First as apt sees fit; if it cannot (a package installed from a suite this machine
    // no longer lists, like `qemu-utils` 10 from backports, breaks `qemu-system-common`
    // 7.2), again with such packages pinned to their listed version, downgrading them.
    if !apt_install(
        &all_packages()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>(),
    )? {
        let pinned: Vec<String> = PACKAGES
            .iter()
            .map(|(p, _)| match unlisted_install(p) {
                Some(v) => {
                    eprintln!("{p}: the installed version is in no listed suite; taking {v}");
                    format!("{p}={v}")
                }
                None => (*p).to_string(),
            })
            .collect();
        if !apt_install(&pinned)? {
            bail!("apt-get install of the lab's packages failed (see apt's output above)");
        }
    }
    stop_services(&before.packages);
    let after = check(&path, Path::new("/"), installed);
    if !after.is_empty() {
        bail!(
            "after installing, still missing:\n  {}\n\
             apt may have removed a package to satisfy another (a version from another suite \
             installed before); `apt-get install {}` by hand shows why",
            after.lines.join("\n  "),
            after.packages.join(" ")
        );
    }
    Ok(())
}

/// Packages whose install starts a system service that only a bench or a test runs, as a
/// process of its own: the unit is stopped and disabled, so nothing of ours listens on the
/// host.
const NO_SERVICE: &[(&str, &str)] = &[("nginx-light", "nginx"), ("postgresql", "postgresql")];

/// Stops and disables the services of [`NO_SERVICE`] among `installed` (on a host without
/// systemd, such as a container, apt's policy-rc.d never started them).
fn stop_services(installed: &[&str]) {
    if !Path::new("/run/systemd/system").exists() {
        return;
    }
    for (pkg, unit) in NO_SERVICE {
        if installed.contains(pkg) {
            let stopped = Command::new("systemctl")
                .args(["disable", "--now", unit])
                .status();
            if !stopped.is_ok_and(|s| s.success()) {
                eprintln!("warning: cannot stop and disable {unit}.service (from {pkg})");
            }
        }
    }
}

/// One apt transaction; whether it succeeded.
fn apt_install(packages: &[String]) -> Result<bool> {
    let s = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    Ok(s.success())
}

/// The newest listed version of `pkg` when the installed one is in none of the configured
/// suites, else `None`.
fn unlisted_install(pkg: &str) -> Option<String> {
    let out = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let installed = out(&["dpkg-query", "-W", "-f=${Version}", pkg])?;
    let listed = out(&["apt-cache", "madison", pkg])?;
    pick_listed(installed.trim(), &listed)
}

/// From `apt-cache madison` lines (`pkg | version | source`), newest first: the version to
/// install when `installed` is not among them.
fn pick_listed(installed: &str, madison: &str) -> Option<String> {
    let versions: Vec<&str> = madison
        .lines()
        .filter_map(|l| l.split('|').nth(1).map(str::trim))
        .collect();
    if installed.is_empty() || versions.contains(&installed) {
        return None;
    }
    versions.first().map(|v| (*v).to_string())
}

fn all_packages() -> Vec<&'static str> {
    PACKAGES.iter().map(|(p, _)| *p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn stand_in(dir: &Path, tools: &[&str]) {
        for t in tools {
            let p = dir.join(t);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stork-deps-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn full_root(name: &str) -> PathBuf {
        let root = tmp(name);
        let versioned = VERSIONED
            .iter()
            .map(|(dir, program, _)| format!("{dir}/15/{program}"));
        for f in FILES.iter().map(|(f, _)| f.to_string()).chain(versioned) {
            let p = root.join(f.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        root
    }

    #[test]
    fn everything_present_is_nothing_missing() {
        let bin = tmp("all");
        let tools: Vec<&str> = TOOLS.iter().map(|(t, _)| *t).collect();
        stand_in(&bin, &tools);
        let root = full_root("all-root");
        let m = check(bin.as_os_str(), &root, |_| true);
        assert!(m.is_empty(), "{m:?}");
    }

    /// The fresh-machine failure: every package says installed, but apt removed qemu-utils,
    /// so `qemu-img` is gone. The check names the tool, its package and its use.
    #[test]
    fn a_tool_missing_from_path_is_named_with_its_package() {
        let bin = tmp("no-qemu-img");
        let tools: Vec<&str> = TOOLS
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t != "qemu-img")
            .collect();
        stand_in(&bin, &tools);
        let root = full_root("no-qemu-img-root");
        let m = check(bin.as_os_str(), &root, |_| true);
        assert_eq!(m.packages, vec!["qemu-utils"]);
        assert_eq!(m.lines.len(), 1);
        assert!(m.lines[0].contains("`qemu-img` is not on PATH"), "{m:?}");
        assert!(m.lines[0].contains("disk images"), "{m:?}");
    }

    #[test]
    fn a_file_that_is_not_executable_does_not_count() {
        let bin = tmp("noexec");
        let tools: Vec<&str> = TOOLS.iter().map(|(t, _)| *t).collect();
        stand_in(&bin, &tools);
        std::fs::set_permissions(bin.join("ipmi_sim"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let root = full_root("noexec-root");
        let m = check(bin.as_os_str(), &root, |_| true);
        assert_eq!(m.packages, vec!["openipmi"]);
    }

    #[test]
    fn missing_packages_and_firmware_files_are_named() {
        let bin = tmp("nothing");
        let root = tmp("nothing-root");
        let m = check(bin.as_os_str(), &root, |p| p != "ovmf");
        assert!(m.lines.iter().any(|l| l
            == &format!(
                "package ovmf is not installed (package ovmf: {})",
                PACKAGES.iter().find(|(p, _)| *p == "ovmf").unwrap().1
            )));
        assert!(
            m.lines
                .iter()
                .any(|l| l.contains("OVMF_CODE_4M.fd does not exist"))
        );
        // Every package shows up once, however many of its tools are missing.
        let mut sorted = m.packages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), m.packages.len());
    }

    #[test]
    fn a_version_from_an_unlisted_suite_is_replaced_by_the_listed_one() {
        let madison = "qemu-utils | 1:7.2+dfsg-7+deb12u18+b3 | http://mirror bookworm/main amd64 Packages\n\
                       qemu-utils | 1:7.2+dfsg-7+deb12u15 | http://mirror bookworm-security/main amd64 Packages\n";
        assert_eq!(
            pick_listed("1:10.0.2+ds-2+deb13u1~bpo12+1", madison).as_deref(),
            Some("1:7.2+dfsg-7+deb12u18+b3")
        );
        assert_eq!(pick_listed("1:7.2+dfsg-7+deb12u15", madison), None);
        assert_eq!(pick_listed("", madison), None);
        assert_eq!(pick_listed("1:10", ""), None);
    }

    #[test]
    fn every_tool_and_file_names_a_listed_package() {
        let versioned = VERSIONED.iter().map(|(_, what, pkg)| (*what, *pkg));
        for (what, pkg) in TOOLS
            .iter()
            .copied()
            .chain(FILES.iter().copied())
            .chain(versioned)
        {
            assert!(
                PACKAGES.iter().any(|(p, _)| *p == pkg),
                "{what} names {pkg}, which is not installed by the step"
            );
        }
    }
}
