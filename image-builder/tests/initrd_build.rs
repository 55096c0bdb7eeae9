//! Builds initrds from a synthetic kernel tree with the real binary, then checks them with GNU
//! cpio (Debian package `cpio`) as well as with the cpio crate's reader.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

const KVER: &str = "6.1.0-test-amd64";
const EPOCH: u32 = 1_700_000_000;

const MODULES_DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/misc/not_wanted.ko: kernel/lib/crc16.ko
";
const MODULES_SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crc32c-generic crypto-crc32c
softdep sd_mod pre: no_such_module
";
const MODULES_BUILTIN: &str = "kernel/net/packet/af_packet.ko\nkernel/drivers/block/loop.ko\n";
const REQUEST: &str = "virtio-net,virtio_pci,ext4,sd_mod,af_packet,loop";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stork-image"))
}

/// A kernel tree as `dpkg -x` plus depmod leave it, with fake contents.
fn synthetic_kernel(root: &Path) -> Result<PathBuf> {
    let kdir = root.join("kernel");
    let moddir = kdir.join("lib/modules").join(KVER);
    fs::create_dir_all(kdir.join("boot"))?;
    fs::write(
        kdir.join("boot").join(format!("vmlinuz-{KVER}")),
        b"fake bzImage",
    )?;
    for line in MODULES_DEP.lines() {
        let path = dep_line(line)?.0;
        let file = moddir.join(path);
        fs::create_dir_all(file.parent().context("module path has a parent")?)?;
        fs::write(&file, format!("fake module {path}\n").repeat(50))?;
    }
    fs::write(moddir.join("modules.dep"), MODULES_DEP)?;
    fs::write(moddir.join("modules.softdep"), MODULES_SOFTDEP)?;
    fs::write(moddir.join("modules.builtin"), MODULES_BUILTIN)?;
    Ok(kdir)
}

/// A modules.dep line as (module, dependencies).
fn dep_line(line: &str) -> Result<(&str, Vec<&str>)> {
    let (module, deps) = line
        .split_once(':')
        .context("modules.dep line without ':'")?;
    Ok((module, deps.split_whitespace().collect()))
}

fn build(
    kdir: &Path,
    agent: &Path,
    out: &Path,
    extra: &[&str],
    env_epoch: Option<u32>,
) -> Result<Output> {
    let mut cmd = bin();
    cmd.arg("initrd")
        .arg("--kernel-dir")
        .arg(kdir)
        .arg("--agent")
        .arg(agent)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("SOURCE_DATE_EPOCH");
    if let Some(e) = env_epoch {
        cmd.env("SOURCE_DATE_EPOCH", e.to_string());
    }
    cmd.output().context("running stork-image")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "stork-image failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set_mtime(path: &Path, t: SystemTime) -> Result<()> {
    fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(t)?;
    Ok(())
}

/// Runs GNU cpio on the decompressed archive; fails loudly if the tool is missing.
fn gnu_cpio(archive: &[u8], args: &[&str]) -> Result<String> {
    let mut child = Command::new("cpio")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("GNU cpio must be installed for this test (apt-get install cpio)")?;
    let mut stdin = child.stdin.take().context("cpio stdin")?;
    let data = archive.to_vec();
    // Feed stdin from another thread so a full stdout pipe cannot deadlock us.
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))??;
    assert!(
        out.status.success(),
        "cpio {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn decompress(initrd: &Path) -> Result<Vec<u8>> {
    let compressed = fs::read(initrd)?;
    assert_eq!(&compressed[..4], b"\x28\xb5\x2f\xfd", "zstd frame magic");
    Ok(zstd::decode_all(compressed.as_slice())?)
}
#[test]
fn initrd_is_reproducible_and_complete() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let kdir = synthetic_kernel(tmp.path())?;
    let agent = tmp.path().join("agent");
    fs::write(&agent, b"\x7fELF pretend agent")?;
    let out1 = tmp.path().join("out1");
    let out2 = tmp.path().join("out2");

    let epoch = EPOCH.to_string();
    let first = build(
        &kdir,
        &agent,
        &out1,
        &["--modules", REQUEST, "--source-date-epoch", &epoch],
        None,
    )?;
    assert_ok(&first);
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).lines().last(),
        out1.to_str()
    );

    // Host metadata that must not leak into the image: file times (and the epoch arriving by
    // environment instead of flag).
    let later = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    set_mtime(&agent, later)?;
    for line in MODULES_DEP.lines() {
        let (path, _) = dep_line(line)?;
        set_mtime(&kdir.join("lib/modules").join(KVER).join(path), later)?;
    }
    let second = build(&kdir, &agent, &out2, &["--modules", REQUEST], Some(EPOCH))?;
    assert_ok(&second);

    for name in ["initrd.img", "vmlinuz", "manifest.json"] {
        let a = fs::read(out1.join(name))?;
        let b = fs::read(out2.join(name))?;
        assert!(a == b, "{name} differs between identical builds");
    }
    assert_eq!(fs::read(out1.join("vmlinuz"))?, b"fake bzImage");
    for entry in fs::read_dir(&out1)? {
        let name = entry?.file_name();
        assert!(
            !name.to_string_lossy().ends_with(".tmp"),
            "temporary file {name:?} left behind"
        );
    }

    let cpio = decompress(&out1.join("initrd.img"))?;
    check_with_gnu_cpio(&cpio)?;
    check_with_reader(&cpio)?;
    check_manifest(&out1, &agent)
}

fn check_with_gnu_cpio(cpio: &[u8]) -> Result<()> {
    let listing = gnu_cpio(cpio, &["-itv", "--quiet"])?;
    // `-v` columns: mode, links, owner, group, size or "major, minor", date (3), name.
    let mut entries = BTreeMap::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let name = cols.last().context("empty listing line")?;
        entries.insert((*name).to_owned(), cols);
    }
    let cols = |name: &str| {
        entries
            .get(name)
            .with_context(|| format!("{name} missing from:\n{listing}"))
    };
    assert_eq!(cols("init")?[0], "-rwxr-xr-x");
    assert_eq!(cols("dev/console")?[0], "crw-------");
    assert_eq!(cols("dev/console")?[4..6], ["5,", "1"]);
    assert_eq!(cols("dev/null")?[0], "crw-rw-rw-");
    assert_eq!(cols("dev/null")?[4..6], ["1,", "3"]);
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "etc/stork",
        "mnt",
        "lib",
    ] {
        assert_eq!(cols(dir)?[0], "drwxr-xr-x", "{dir}");
    }
    let kmods = format!("lib/modules/{KVER}");
    assert_eq!(cols(&kmods)?[0], "drwxr-xr-x");
    for c in entries.values() {
        assert_eq!(c[2..4], ["root", "root"], "{c:?}");
    }

    let expected = [
        "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/net/core/failover.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
        "kernel/drivers/scsi/sd_mod.ko",
        "kernel/drivers/scsi/scsi_mod.ko",
        "kernel/drivers/scsi/scsi_common.ko",
        "kernel/fs/ext4/ext4.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/lib/crc16.ko",
        // Only through ext4's softdep.
        "kernel/crypto/crc32c_generic.ko",
    ];
    for m in expected {
        assert_eq!(cols(&format!("{kmods}/{m}"))?[0], "-rw-r--r--", "{m}");
    }
    let shipped = entries.keys().filter(|n| n.ends_with(".ko")).count();
    assert_eq!(shipped, expected.len(), "unexpected modules in:\n{listing}");

    let load = gnu_cpio(
        cpio,
        &["-i", "--quiet", "--to-stdout", "etc/stork/modules.load"],
    )?;
    let prefix = format!("/{kmods}/");
    let order: Vec<&str> = load
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            l.strip_prefix(&prefix)
                .with_context(|| format!("{l} is not an absolute module path"))
        })
        .collect::<Result<_>>()?;
    assert_eq!(
        order.iter().copied().collect::<BTreeSet<_>>(),
        expected.iter().copied().collect::<BTreeSet<_>>()
    );
    let pos = |m: &str| order.iter().position(|o| *o == m);
    for line in MODULES_DEP.lines() {
        let (module, deps) = dep_line(line)?;
        let Some(at) = pos(module) else { continue };
        for dep in deps {
            assert!(
                pos(dep).is_some_and(|d| d < at),
                "{dep} not before {module} in {order:?}"
            );
        }
    }
    assert!(pos("kernel/crypto/crc32c_generic.ko") < pos("kernel/fs/ext4/ext4.ko"));

    let dep = gnu_cpio(
        cpio,
        &[
            "-i",
            "--quiet",
            "--to-stdout",
            &format!("{kmods}/modules.dep"),
        ],
    )?;
    assert_eq!(dep.lines().count(), expected.len());
    assert!(dep.contains(
        "kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko\n"
    ));
    Ok(())
}

/// Header fields GNU cpio's listing does not show plainly.
fn check_with_reader(cpio: &[u8]) -> Result<()> {
    let mut rest = cpio;
    let mut seen = Vec::<String>::new();
    let mut inodes = BTreeSet::new();
    loop {
        let mut r = cpio::NewcReader::new(rest)?;
        let e = r.entry().clone();
        if e.is_trailer() {
            break;
        }
        let name = e.name().to_owned();
        assert!(!name.starts_with('/'), "{name}");
        assert_eq!((e.uid(), e.gid(), e.mtime()), (0, 0, EPOCH), "{name}");
        assert!(inodes.insert(e.ino()), "inode {} reused by {name}", e.ino());
        if let Some((parent, _)) = name.rsplit_once('/') {
            assert!(seen.iter().any(|s| s == parent), "{name} before its parent");
        }
        if e.mode() & 0o170000 == 0o100000 {
            assert_eq!(e.nlink(), 1, "{name}");
        }
        r.read_to_end(&mut Vec::new())?;
        seen.push(name);
        rest = r.finish()?;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "entries are not sorted");
    Ok(())
}

fn check_manifest(out: &Path, agent: &Path) -> Result<()> {
    let text = fs::read_to_string(out.join("manifest.json"))?;
    let m: serde_json::Value = serde_json::from_str(&text)?;
    let artifacts = m["artifacts"].as_array().context("artifacts")?;
    assert_eq!(artifacts.len(), 2);
    for a in artifacts {
        let name = a["name"].as_str().context("artifact name")?;
        let bytes = fs::read(out.join(name))?;
        assert_eq!(a["size"].as_u64(), Some(bytes.len() as u64), "{name}");
        assert_eq!(
            a["sha256"].as_str(),
            Some(sha256_hex(&bytes).as_str()),
            "{name}"
        );
    }
    assert_eq!(artifacts[0]["kind"], "kernel");
    assert_eq!(artifacts[1]["kind"], "initrd");
    let inputs = &m["inputs"];
    assert_eq!(inputs["kernel_version"], KVER);
    assert_eq!(
        inputs["agent_sha256"].as_str(),
        Some(sha256_hex(&fs::read(agent)?).as_str())
    );
    assert_eq!(
        inputs["builtin_modules"],
        serde_json::json!(["af_packet", "loop"])
    );
    assert_eq!(inputs["source_date_epoch"], EPOCH);
    let modules = inputs["modules"].as_array().context("modules")?;
    assert_eq!(modules.len(), 15);
    assert_eq!(modules.last().and_then(|m| m.as_str()), Some("virtio_pci"));
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn unknown_module_fails_naming_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let kdir = synthetic_kernel(tmp.path())?;
    let agent = tmp.path().join("agent");
    fs::write(&agent, b"agent")?;
    let out = tmp.path().join("out");
    let res = build(
        &kdir,
        &agent,
        &out,
        &["--modules", "virtio_net,wireguard"],
        None,
    )?;
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("\"wireguard\""), "{stderr}");
    assert!(!out.join("initrd.img").exists());
    Ok(())
}

#[test]
fn default_module_set_needs_a_real_kernel() -> Result<()> {
    // The synthetic tree lacks most default modules; the first missing one is named.
    let tmp = tempfile::tempdir()?;
    let kdir = synthetic_kernel(tmp.path())?;
    let agent = tmp.path().join("agent");
    fs::write(&agent, b"agent")?;
    let res = build(&kdir, &agent, &tmp.path().join("out"), &[], None)?;
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("no kernel module or built-in named"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn kernel_dir_and_cache_are_exclusive_and_one_is_required() -> Result<()> {
    let res = bin()
        .args(["initrd", "--agent", "/bin/true", "--out", "/nonexistent"])
        .output()?;
    assert!(!res.status.success());
    let res = bin()
        .args([
            "initrd",
            "--kernel-dir",
            "/a",
            "--cache",
            "/b",
            "--agent",
            "/bin/true",
            "--out",
            "/c",
        ])
        .output()?;
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("cannot be used with"));
    Ok(())
}
