//! The Debian OS image for real: built from recipes/debian-bookworm.toml into
//! `target/stork/images` (where `cargo xtask images` builds it; the tree is in the xtask's
//! cache, `~/.cache/stork`, so a rerun with unchanged inputs only boots), read back with the reference tools (`sgdisk -v`, `blkid`, mtools, e2fsck,
//! `unsquashfs`, `tar`), then booted by itself in QEMU (TCG, no network device) under SeaBIOS
//! and under OVMF with a NoCloud seed volume, until cloud-init reports on the serial console
//! that it has finished.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::{artifact, bin, cache_dir, run};
use stork_lab::process::tail;
use stork_lab::{Spawned, wait_for};

const NAME: &str = "debian-bookworm";
const RECIPE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/debian-bookworm.toml");
/// Boot to cloud-init's end takes about 45 s under TCG on an idle machine; other builds share
/// the two cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// The VMs' disks are bigger than the image, so first boot must grow the root.
const VM_DISK: &str = "4G";

struct Built {
    out: PathBuf,
    /// The raw image, decompressed (sparse).
    raw: PathBuf,
    manifest: serde_json::Value,
}

static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();

/// Builds (or finds up to date) the images once per test run; every test uses them.
fn built() -> Result<&'static Built> {
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("building the OS image failed: {e}"))
}

fn build() -> Result<Built> {
    ensure!(common::is_root(), "needs root (debootstrap, chroot)");
    let out = common::target_dir().join("stork/images");
    let started = Instant::now();
    run(bin()
        .args(["os", "--recipe", RECIPE, "--cache"])
        .arg(cache_dir())
        .arg("--out")
        .arg(&out))?;
    eprintln!("os image ready in {:.1} s", started.elapsed().as_secs_f64());
    let manifest = common::manifest(&out)?;
    // Outside the image directory, which the appliance may serve.
    let raw = common::target_dir().join("stork/test-disk.raw");
    run(Command::new("zstd")
        .args(["-d", "-q", "-f", "--sparse"])
        .arg(out.join(format!("{NAME}.raw.zst")))
        .arg("-o")
        .arg(&raw))?;
    Ok(Built { out, raw, manifest })
}

fn image(b: &Built) -> Result<&serde_json::Value> {
    b.manifest["images"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == NAME))
        .context("image in manifest")
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs root and the Debian mirror: run via cargo xtask test"]
fn raw_image_passes_sgdisk_and_matches_the_manifest() -> Result<()> {
    let b = built()?;
    let img = image(b)?;
    let deploy = &img["deploy"];

    let v = text(&run(Command::new("sgdisk").arg("-v").arg(&b.raw))?);
    ensure!(v.contains("No problems found"), "sgdisk -v:\n{v}");
    ensure!(!v.contains("Caution"), "sgdisk -v:\n{v}");
    let p = text(&run(Command::new("sgdisk").arg("-p").arg(&b.raw))?);
    let rows: Vec<Vec<&str>> = p
        .lines()
        .skip_while(|l| !l.starts_with("Number"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let codes: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[5])).collect();
    ensure!(
        codes
            == [
                ("1", "2048", "EF02"),
                ("2", "4096", "EF00"),
                ("3", "208896", "8304")
            ],
        "partitions:\n{p}"
    );

    // File systems, found where the partition table says, with the manifest's identifiers.
    let parts = deploy["partitions"].as_array().context("partitions")?;
    let offset = |n: usize| -> Result<u64> {
        Ok(parts[n - 1]["first_lba"].as_u64().context("first_lba")? * 512)
    };
    let probe = |n: usize| -> Result<String> {
        Ok(text(&run(Command::new("blkid")
            .args(["-p", "-O"])
            .arg(offset(n)?.to_string())
            .arg(&b.raw))?))
    };
    let root = probe(3)?;
    ensure!(root.contains("TYPE=\"ext4\""), "{root}");
    let uuid = deploy["root_fs_uuid"].as_str().context("root uuid")?;
    ensure!(
        root.contains(&format!("UUID=\"{uuid}\"")),
        "{root} vs {uuid}"
    );
    let esp = probe(2)?;
    let esp_id = deploy["esp_fs_id"].as_str().context("esp id")?;
    ensure!(
        esp.contains("TYPE=\"vfat\"") && esp.contains(&format!("UUID=\"{esp_id}\"")),
        "{esp}"
    );
    let efi = text(&run(Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", b.raw.display(), offset(2)?))
        .arg("::/EFI/BOOT"))?);
    ensure!(efi.contains("BOOTX64  EFI"), "ESP:\n{efi}");
    // e2fsck on the root, read-only, through a copy of just that partition.
    let part = b.out.join(".test-root.img");
    let first = parts[2]["first_lba"].as_u64().context("lba")?;
    let last = parts[2]["last_lba"].as_u64().context("lba")?;
    run(Command::new("dd")
        .arg(format!("if={}", b.raw.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=1M", "conv=sparse", "status=none"])
        .arg(format!("skip={}", first / 2048))
        .arg(format!("count={}", (last + 1 - first) / 2048)))?;
    let fsck = run(Command::new("e2fsck").args(["-f", "-n"]).arg(&part));
    let _ = fs::remove_file(&part);
    fsck?;

    // BIOS boot: GRUB's boot.img in sector 0 pointing at core.img in partition 1.
    let disk = fs::read(&b.raw).map(|d| d[..2048 * 512 + 512].to_vec())?;
    ensure!(disk[510..512] == [0x55, 0xAA]);
    ensure!(
        disk[0x5c..0x64] == 2048u64.to_le_bytes(),
        "boot.img kernel sector"
    );
    ensure!(
        disk[2048 * 512 + 500..2048 * 512 + 508] == 2049u64.to_le_bytes(),
        "core blocklist"
    );

    for (name, kind) in [
        (format!("{NAME}.root.squashfs"), "root_squashfs"),
        (format!("{NAME}.root.tar.zst"), "root_tar_zst"),
        (format!("{NAME}.raw.zst"), "raw_disk_zst"),
    ] {
        let a = artifact(&b.manifest, NAME, &name)?;
        ensure!(a["kind"] == kind, "{name}: {a}");
        eprintln!("{name}: {} bytes", a["size"]);
    }
    // The raw image's frames add up to the whole image, as the manifest and the block map
    // say: the agent sizes the target disk from the map (an agent without it, from the
    // frames' sizes).
    let raw_zst = b.out.join(format!("{NAME}.raw.zst"));
    let declared = stork_image::blockmap::zstd_content_size(&raw_zst)?;
    let raw_art = artifact(&b.manifest, NAME, &format!("{NAME}.raw.zst"))?;
    ensure!(
        declared == raw_art["uncompressed_size"].as_u64()
            && declared == Some(fs::metadata(&b.raw)?.len()),
        "raw.zst's frames add up to {declared:?} bytes, manifest {}",
        raw_art["uncompressed_size"]
    );
    let map_art = artifact(&b.manifest, NAME, &format!("{NAME}.raw.map.json"))?;
    ensure!(map_art["kind"] == "raw_disk_map", "{map_art}");
    let map: serde_json::Value =
        serde_json::from_slice(&fs::read(b.out.join(format!("{NAME}.raw.map.json")))?)?;
    ensure!(
        map["image_size"].as_u64() == declared,
        "the block map's image_size {} is not the image's {declared:?}",
        map["image_size"]
    );
    ensure!(
        img["inputs"]["packages"]
            .as_array()
            .is_some_and(|p| p.len() > 5)
    );
    ensure!(
        deploy["kernel"]
            .as_str()
            .is_some_and(|k| k.starts_with("/boot/vmlinuz-"))
    );
    ensure!(deploy["root_partition"] == 3 && deploy["default_user"] == "debian");
    Ok(())
}

#[test]
#[ignore = "needs root and the Debian mirror: run via cargo xtask test"]
fn root_squashfs_and_tar_hold_the_configured_tree() -> Result<()> {
    let b = built()?;
    let sq = b.out.join(format!("{NAME}.root.squashfs"));
    let tar = b.out.join(format!("{NAME}.root.tar.zst"));
    let cat = |path: &str| -> Result<String> {
        Ok(text(&run(Command::new("unsquashfs")
            .arg("-cat")
            .arg(&sq)
            .arg(path))?))
    };
    let cloud = cat("/etc/cloud/cloud.cfg.d/99_stork.cfg")?;
    ensure!(
        cloud.contains("datasource_list: [ NoCloud, None ]"),
        "{cloud}"
    );
    ensure!(cat("/etc/machine-id")?.is_empty());
    ensure!(
        !cat("/etc/fstab")?
            .lines()
            .any(|l| !l.starts_with('#') && !l.trim().is_empty())
    );
    let tar_list = text(&run(Command::new("tar").args(["--zstd", "-tf"]).arg(&tar))?);
    let grub = text(&run(Command::new("tar")
        .args(["--zstd", "-xOf"])
        .arg(&tar)
        .arg("./boot/grub/grub.cfg"))?);
    ensure!(grub.contains("console=ttyS0"), "{grub}");
    // The image's kernels, the default first: the recipe's stable and backports ones.
    let kernels: Vec<(&str, &str)> = b.manifest["images"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["name"] == NAME))
        .and_then(|e| e["deploy"]["kernels"].as_array())
        .context("no kernels in the manifest")?
        .iter()
        .filter_map(|k| Some((k["name"].as_str()?, k["version"].as_str()?)))
        .collect();
    ensure!(
        kernels.len() == 2 && kernels[0].0 == "stable" && kernels[1].0 == "backports",
        "kernels {kernels:?}"
    );
    for (_, version) in &kernels {
        for file in ["vmlinuz", "initrd.img"] {
            let want = format!("./boot/{file}-{version}");
            ensure!(
                tar_list.lines().any(|l| l == want),
                "{want} not in the root tar"
            );
        }
    }
    let listing = text(&run(Command::new("unsquashfs").arg("-lls").arg(&sq))?);
    for want in [
        "squashfs-root/vmlinuz ->",
        "squashfs-root/usr/bin/cloud-init",
        "squashfs-root/usr/sbin/sshd",
        &format!("squashfs-root/usr/lib/modules/{}/", kernels[0].1),
    ] {
        ensure!(listing.contains(want), "{want} not in the root SquashFS");
    }
    // A deploy into memory runs under the agent's kernel: no /boot, no other kernel's
    // modules in the RAM it takes.
    let backports_modules = format!("squashfs-root/usr/lib/modules/{}", kernels[1].1);
    for unwanted in ["squashfs-root/boot", backports_modules.as_str()] {
        ensure!(
            !listing.lines().any(|l| l.contains(unwanted)),
            "{unwanted} is in the root SquashFS"
        );
    }
    ensure!(
        !listing.contains("ssh_host_"),
        "SSH host keys baked into the image"
    );
    ensure!(
        !listing.contains("var/lib/apt/lists/deb"),
        "apt lists in the image"
    );

    let names = |s: &str, strip: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.split_whitespace().last())
            .map(|p| p.trim_start_matches(strip).trim_end_matches('/').to_owned())
            .collect()
    };
    let in_sq = names(
        &text(&run(Command::new("unsquashfs").arg("-l").arg(&sq))?),
        "squashfs-root/",
    );
    let excluded = |p: &str| {
        p == "boot"
            || p.starts_with("boot/")
            || p.starts_with(&format!("usr/lib/modules/{}", kernels[1].1))
    };
    let in_tar: Vec<String> = names(&tar_list, "./")
        .into_iter()
        .filter(|p| !excluded(p))
        .collect();
    // Same tree less the exclusions: the tar has "." for the root where unsquashfs lists
    // "squashfs-root".
    ensure!(
        in_tar.len() == in_sq.len(),
        "tar has {} entries besides /boot and the backports modules, the SquashFS {}",
        in_tar.len(),
        in_sq.len()
    );
    Ok(())
}

/// A console line without terminal escape sequences (firmware and GRUB draw with them).
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte; other escapes: ESC and one more character.
            if chars.next_if_eq(&'[').is_some() {
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Firmware {
    SeaBios,
    Ovmf,
}

/// A NoCloud seed volume: `CIDATA`-labelled FAT with meta-data and user-data, as the agent
/// writes it. The user-data prints a marker with what it can see to the serial console.
fn seed(dir: &Path) -> Result<PathBuf> {
    fs::write(
        dir.join("meta-data"),
        "instance-id: stork-test-1\nlocal-hostname: stork-test\n",
    )?;
    fs::write(
        dir.join("user-data"),
        "#cloud-config\n\
         ssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0test0key0for0stork0image0tests0only0000000 stork@test\n\
         runcmd:\n  - [sh, -c, 'echo \"STORK-SEED-OK user=$(id -un debian) host=$(hostname) root_mib=$(df -BM --output=size / | tail -n1 | tr -dc 0-9)\" > /dev/ttyS0']\n",
    )?;
    let img = dir.join("seed.img");
    run(Command::new("mkfs.vfat")
        .args(["-n", "CIDATA", "-C"])
        .arg(&img)
        .arg("1024"))?;
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&img)
        .arg(dir.join("meta-data"))
        .arg(dir.join("user-data"))
        .arg("::"))?;
    Ok(img)
}

fn boot(fw: Firmware) -> Result<()> {
    let b = built()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let disk = dir.join("disk.qcow2");
    // Copy-on-write over the shared raw image: each VM writes only its own overlay.
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&b.raw)
        .arg(&disk)
        .arg(VM_DISK))?;
    let seed = seed(dir)?;
    let console = dir.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    // KVM hangs on this machine (docs/measurements.md): TCG. No network device at all.
    qemu.args([
        "-accel",
        "tcg",
        "-m",
        "2048",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-nic", "none", "-no-reboot"])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-drive")
    .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
    .arg("-drive")
    .arg(format!(
        "file={},if=virtio,format=raw,readonly=on",
        seed.display()
    ));
    if let Firmware::Ovmf = fw {
        let vars = dir.join("OVMF_VARS.fd");
        fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
            .context("copying OVMF_VARS_4M.fd (is ovmf installed?)")?;
        qemu.args(["-machine", "q35"])
            .args([
                "-drive",
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            ])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    }
    let started = Instant::now();
    let mut vm = Spawned::start(&format!("{fw:?}"), qemu, &dir.join("qemu.log"))?;
    let finished = wait_for(
        "cloud-init to finish (serial console)",
        BOOT_TIMEOUT,
        Duration::from_secs(1),
        || {
            let log = String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("Cloud-init v.") && l.contains(" finished at "))
            {
                return Ok(Some((line.to_owned(), log)));
            }
            if vm.exited().is_some() {
                bail!(
                    "QEMU exited: {}\nconsole:\n{}",
                    vm.log_tail(10),
                    tail(&console, 40)
                );
            }
            Ok(None)
        },
    );
    let (line, log) = match finished {
        Ok(v) => v,
        Err(e) => bail!("{e:#}\nconsole tail:\n{}", tail(&console, 60)),
    };
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{fw:?}: cloud-init finished {secs:.1} s after QEMU started");
    for l in log.lines().map(plain).filter(|l| {
        ["GNU GRUB", "Cloud-init v.", "STORK-SEED", "BdsDxe"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!("  {fw:?} | {}", l.trim());
    }
    ensure!(
        line.contains("DataSourceNoCloud"),
        "not the NoCloud seed: {line}"
    );
    let marker = log
        .lines()
        .find(|l| l.starts_with("STORK-SEED-OK"))
        .context("user-data's runcmd marker not on the console")?;
    ensure!(marker.contains("user=debian host=stork-test"), "{marker}");
    let root_mib: u64 = marker
        .split("root_mib=")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .context("root size in the marker")?;
    ensure!(
        root_mib > 3500,
        "root not grown to the 4 GiB disk: {root_mib} MiB"
    );
    ensure!(
        log.contains("BEGIN SSH HOST KEY FINGERPRINTS"),
        "cloud-init generated no SSH host keys"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[WARNING]") || l.contains("Traceback"))
        .collect();
    ensure!(
        errors.is_empty(),
        "cloud-init warnings:\n{}",
        errors.join("\n")
    );
    Ok(())
}

#[test]
#[ignore = "needs root and the Debian mirror: run via cargo xtask test"]
fn raw_image_boots_to_cloud_init_under_seabios() -> Result<()> {
    boot(Firmware::SeaBios)
}

#[test]
#[ignore = "needs root and the Debian mirror: run via cargo xtask test"]
fn raw_image_boots_to_cloud_init_under_ovmf() -> Result<()> {
    boot(Firmware::Ovmf)
}
