//! `stork-image appliance`: one raw GPT disk image that boots under BIOS and UEFI, from a USB
//! stick or an internal disk, and runs Stork: a minimal Debian with systemd ([`tree`]), the
//! `stork` binary as a service, the boot files (kernel, initrd, ephemeral SquashFS, network boot
//! programs) and OS images, on the partitions [`layout`] describes, booted by the A/B GRUB
//! script of [`boot`].
//!
//! The root tree is cached like the OS images' ([`crate::rootfs`]); each build hard-links it
//! into a staging tree, adds the inputs (binary, boot files, images, version) with their times
//! clamped to the tree's SOURCE_DATE_EPOCH, and writes every file system in place in a sparse
//! file with fixed identifiers and fake times, so two builds from the same inputs give the same
//! bytes.

pub mod boot;
pub mod layout;
pub mod tree;
pub mod upgrade;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cmd;
use crate::disk::{self, Fat, Ids};
use crate::gpt::{Gpt, Guid};
use crate::image::{ImageError, io_err};
use crate::manifest::{self, ImageKind, ImageManifest};
use crate::progress::Progress;
use crate::rootfs::{self, RootfsError};
use layout::{CONFIG, DATA, ESP, Layout, MIB, SYSTEM_A};

/// The root tree's cache name.
pub const NAME: &str = "appliance";
pub const SUITE: &str = "bookworm";
/// Default size of each system partition.
pub const SYSTEM_MIB: u64 = 3072;

pub struct Request<'a> {
    pub cache: &'a Path,
    /// The raw image to write.
    pub out: &'a Path,
    /// The `stork` binary to install.
    pub stork: &'a Path,
    /// Boot files: `stork-image initrd`'s output plus the ephemeral SquashFS and the network
    /// boot programs (what the appliance serves under `/boot/`).
    pub boot: &'a Path,
    /// An images directory (`manifest.json`) and the OS images from it to include (empty: all).
    pub images: &'a Path,
    pub image_names: &'a [String],
    /// The version the system reports (`/usr/lib/stork/version`).
    pub version: &'a str,
    /// A `stork.toml` to put on the configuration partition (else only the example is there).
    pub config: Option<&'a Path>,
    pub system_mib: u64,
    pub refresh: bool,
}

/// What a build made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub version: String,
    /// Bytes the system tree takes (what must fit a system partition).
    pub system_used: u64,
    pub partitions: Vec<manifest::PartitionInfo>,
}

/// The ESP's FAT volume id for a tree: GRUB's images (made with the tree) search for it.
fn esp_ids(tree_key: &str) -> Ids {
    Ids::derive(&format!("appliance {tree_key}"))
}

/// The appliance's root tree (cached).
pub fn tree_for(
    cache: &Path,
    refresh: bool,
    progress: &Progress,
) -> Result<rootfs::Tree, RootfsError> {
    // The early configuration names the ESP by an id derived from the tree's key, which is
    // known only inside the build: `configure` gets the key.
    let configure = |tree: &Path, key: &str| {
        tree::configure(tree, &boot::early_config(&esp_ids(key).esp_text()))
    };
    let packages: Vec<String> = tree::PACKAGES.iter().map(|p| p.to_string()).collect();
    let spec = rootfs::Spec {
        name: NAME,
        suite: SUITE,
        arch: "amd64",
        components: &["main".to_owned()],
        packages: &packages,
        extra_kernels: &[],
        minimize: true,
        config_key: tree::config_key(&boot::early_config("<esp>")),
        configure: &configure,
    };
    rootfs::prepare(cache, &spec, refresh, progress)
}

pub fn build(req: &Request<'_>) -> Result<Built, ImageError> {
    let progress = Progress::new("appliance");
    let tree = tree_for(req.cache, req.refresh, &progress)?;
    // One staging tree per build: two builds at once (a v2 beside a rebuild) must not mix.
    let staging = req
        .cache
        .join(format!("appliance-staging-{}", std::process::id()));
    let result = build_staged(req, &tree, &staging, &progress);
    // Best effort: a leftover staging tree only costs space (hard links, mostly).
    let _ = rootfs::remove_tree(&staging);
    result
}

fn build_staged(
    req: &Request<'_>,
    tree: &rootfs::Tree,
    staging: &Path,
    progress: &Progress,
) -> Result<Built, ImageError> {
    let epoch = tree.info.source_date_epoch;
    progress.step(
        "staging the system (tree, stork, boot files, images)",
        || stage(&tree.path, staging, req, epoch),
    )?;
    let staging = staging.to_path_buf();
    let system_used = du(&staging)?;
    let layout = Layout::new(req.system_mib);
    let (_, system_bytes) = layout.extent(SYSTEM_A);
    // ext4 needs room for its metadata and reserved blocks: ask for a fifth more.
    if system_used + system_used / 5 > system_bytes {
        return Err(ImageError::Io {
            path: staging.clone(),
            source: std::io::Error::other(format!(
                "the system takes {} MiB: more than a {} MiB system partition holds (--system-mib)",
                system_used / MIB,
                req.system_mib
            )),
        });
    }
    // Identifiers from everything the bytes come from, so a rebuild gives the same ones.
    let build_key = {
        let mut h = Sha256::new();
        h.update(tree.info.key.as_bytes());
        h.update(req.version.as_bytes());
        h.update(
            manifest::sha256_file(req.stork)
                .map_err(io_err(req.stork))?
                .1,
        );
        hex::encode(h.finalize())
    };
    let guid = |label: &str| {
        let d = Sha256::digest(format!("stork appliance {label} {build_key}").as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid::from_big_endian(b)
    };
    let table = layout.gpt(guid)?;
    let tmp = manifest::tmp_path(req.out);
    let result = progress.step(
        &format!(
            "raw GPT image ({} MiB: BIOS boot, ESP, STORK, system A, system B, data)",
            layout.bytes() / MIB
        ),
        || {
            write_disk(
                &tmp,
                &table,
                &layout,
                &tree.path,
                &staging,
                &tree.info.key,
                &build_key,
                req,
                epoch,
            )
        },
    );
    if let Err(e) = result {
        // Best effort: the error being returned matters more than a stray temporary file.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, req.out).map_err(io_err(req.out))?;
    let (bytes, sha256) = manifest::sha256_file(req.out).map_err(io_err(req.out))?;
    let built = Built {
        path: req.out.to_owned(),
        bytes,
        sha256,
        version: req.version.to_owned(),
        system_used,
        partitions: crate::disk::partition_info(&table),
    };
    let json = req.out.with_extension("json");
    fs::write(&json, serde_json::to_vec_pretty(&built).unwrap_or_default())
        .map_err(io_err(&json))?;
    progress.say(&format!(
        "{}: {} MiB, sha256 {}, system {} MiB of {} MiB; done in {:.1} s",
        req.out.display(),
        bytes / MIB,
        built.sha256,
        system_used / MIB,
        req.system_mib,
        progress.elapsed()
    ));
    Ok(built)
}

/// The tree hard-linked into `staging`, plus the build's inputs.
fn stage(tree: &Path, staging: &Path, req: &Request<'_>, epoch: u64) -> Result<(), ImageError> {
    rootfs::remove_tree(staging)?;
    cmd::run(cmd::clean("cp").arg("-al").arg(tree).arg(staging))?;
    // Files replaced below are unlinked first: the tree's copy is shared with the cache.
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let p = staging.join(rel);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
        fs::write(&p, bytes).map_err(io_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err(&p))
    };
    put("etc/hostname", b"stork\n", 0o644)?;
    for (rel, text, mode) in tree::stork_files() {
        put(&rel, text.as_bytes(), mode)?;
    }
    let wants = staging.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).map_err(io_err(&wants))?;
    for (name, _) in tree::UNITS {
        let link = wants.join(name);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("/usr/lib/systemd/system/{name}"), &link)
                .map_err(io_err(&link))?;
        }
    }
    put(
        tree::VERSION_FILE,
        format!("{}\n", req.version).as_bytes(),
        0o644,
    )?;
    let copy = |from: &Path, rel: String, mode: u32| -> Result<(), ImageError> {
        let bytes = fs::read(from).map_err(io_err(from))?;
        put(&rel, &bytes, mode)
    };
    copy(req.stork, "usr/bin/stork".into(), 0o755)?;
    // The boot files and their directories (the agent's other kernels, `kernels/<name>/`).
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        for name in rootfs::list_dir(&req.boot.join(&dir))? {
            let rel = if dir.is_empty() {
                name.clone()
            } else {
                format!("{dir}/{name}")
            };
            let from = req.boot.join(&rel);
            if name.starts_with('.') {
                continue;
            } else if from.is_dir() {
                dirs.push(rel);
            } else if from.is_file() {
                copy(&from, format!("{}/{rel}", tree::BOOT_FILES), 0o644)?;
            }
        }
    }
    let manifest = ImageManifest::load(req.images)?;
    let mut chosen = ImageManifest::default();
    for e in &manifest.images {
        let wanted = if req.image_names.is_empty() {
            e.kind == ImageKind::Os
        } else {
            req.image_names.contains(&e.name)
        };
        if !wanted {
            continue;
        }
        for a in &e.artifacts {
            copy(
                &req.images.join(&a.name),
                format!("{}/{}", tree::OS_IMAGES, a.name),
                0o644,
            )?;
        }
        chosen.put(e.clone());
    }
    if let Some(missing) = req
        .image_names
        .iter()
        .find(|n| chosen.get(n.as_str()).is_none())
    {
        return Err(ImageError::Io {
            path: req.images.join(ImageManifest::FILE),
            source: std::io::Error::other(format!("no image named {missing:?} there")),
        });
    }
    put(
        &format!("{}/{}", tree::OS_IMAGES, ImageManifest::FILE),
        chosen.to_json().as_bytes(),
        0o644,
    )?;
    rootfs::clamp_times(staging, epoch)?;
    Ok(())
}

/// Bytes under `dir` as `du` counts them (hard links once).
fn du(dir: &Path) -> Result<u64, ImageError> {
    let out = cmd::run(cmd::clean("du").args(["-s", "-B1", "-x"]).arg(dir))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ImageError::Io {
            path: dir.to_owned(),
            source: std::io::Error::other("du printed no size"),
        })
}

/// An empty GRUB environment block.
pub fn empty_grubenv() -> Vec<u8> {
    stork_proto::grubenv::GrubEnv::new(stork_proto::grubenv::DEFAULT_SIZE)
        .map(|e| e.to_bytes())
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn write_disk(
    raw: &Path,
    table: &Gpt,
    layout: &Layout,
    tree: &Path,
    staging: &Path,
    tree_key: &str,
    build_key: &str,
    req: &Request<'_>,
    epoch: u64,
) -> Result<(), ImageError> {
    {
        let mut f = File::create(raw).map_err(io_err(raw))?;
        // Sparse: only what is written takes space.
        f.set_len(layout.bytes()).map_err(io_err(raw))?;
        table.write(&mut f).map_err(crate::disk::DiskError::from)?;
    }
    let scratch = raw.with_extension("scratch");
    rootfs::remove_tree(&scratch)?;
    fs::create_dir_all(&scratch).map_err(io_err(&scratch))?;
    let result = (|| {
        esp(raw, layout, tree, tree_key, &scratch, epoch)?;
        config_partition(raw, layout, req, &scratch, epoch)?;
        let uuid = |label: &str| Ids::derive(&format!("{label} {build_key}")).root_uuid;
        let ext4 = |number: u32, label: &str, uuid: &str, content, root_owner| {
            disk::mke2fs(
                raw,
                layout.extent(number),
                &disk::Ext4 {
                    label,
                    uuid,
                    content,
                    root_owner,
                    conf_tree: tree,
                },
                epoch,
            )
        };
        ext4(
            SYSTEM_A,
            "stork-system",
            &uuid("system"),
            Some(staging),
            None,
        )?;
        pin_ctimes(raw, layout.extent(SYSTEM_A).0, staging, &scratch, epoch)?;
        ext4(
            DATA,
            "stork-data",
            &uuid("data"),
            None,
            Some(tree::STORK_UID),
        )?;
        bios(raw, layout, tree)
    })();
    // Best effort: scratch files beside the image.
    let _ = rootfs::remove_tree(&scratch);
    result
}

/// `mke2fs -d` copies each file's ctime, which no one can set: it is when the staging tree
/// linked the file; and reading the staging tree moved its directories' atimes. debugfs sets
/// both to `epoch` (`@seconds`: a bare number would be read as a date), by path, so the
/// bytes do not depend on when the build ran.
fn pin_ctimes(
    raw: &Path,
    offset: u64,
    staging: &Path,
    scratch: &Path,
    epoch: u64,
) -> Result<(), ImageError> {
    fn walk(dir: &Path, rel: &str, out: &mut String, epoch: u64) -> Result<(), ImageError> {
        let mut names = rootfs::list_dir(dir)?;
        names.sort();
        for name in names {
            let path = format!("{rel}/{name}");
            if path.contains(['"', '\n']) {
                return Err(ImageError::Io {
                    path: dir.join(&name),
                    source: std::io::Error::other("a name debugfs cannot be given"),
                });
            }
            // Directory atimes moved too (reading them after the clamp): both go.
            out.push_str(&format!(
                "sif \"{path}\" ctime @{epoch}\nsif \"{path}\" atime @{epoch}\n"
            ));
            let full = dir.join(&name);
            let meta = fs::symlink_metadata(&full).map_err(io_err(&full))?;
            if meta.is_dir() {
                walk(&full, &path, out, epoch)?;
            }
        }
        Ok(())
    }
    let mut script = format!("sif / ctime @{epoch}\nsif / atime @{epoch}\n");
    walk(staging, "", &mut script, epoch)?;
    let file = scratch.join("ctimes.debugfs");
    fs::write(&file, script).map_err(io_err(&file))?;
    let out = cmd::run(
        cmd::clean("debugfs")
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .arg("-w")
            .arg("-f")
            .arg(&file)
            .arg(format!("{}?offset={offset}", raw.display())),
    )?;
    // debugfs exits 0 whatever its commands did: any complaint is a failure.
    let complaints = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs "))
        .take(5)
        .collect::<Vec<_>>()
        .join("\n");
    if !complaints.is_empty() {
        return Err(ImageError::Io {
            path: raw.to_owned(),
            source: std::io::Error::other(format!("debugfs setting ctimes: {complaints}")),
        });
    }
    Ok(())
}

fn esp(
    raw: &Path,
    layout: &Layout,
    tree: &Path,
    tree_key: &str,
    scratch: &Path,
    epoch: u64,
) -> Result<(), ImageError> {
    let id = esp_ids(tree_key).esp_id;
    let img = disk::mkfs_vfat(raw, layout.extent(ESP), Fat::Fat32, "EFI", id)?;
    let grub_dir = scratch.join("grub");
    for platform in ["i386-pc", "x86_64-efi"] {
        let src = tree.join("usr/lib/grub").join(platform);
        let dst = grub_dir.join(platform);
        fs::create_dir_all(&dst).map_err(io_err(&dst))?;
        let mut names = rootfs::list_dir(&src)?;
        names.sort();
        for name in names {
            if name.ends_with(".mod") || name.ends_with(".lst") {
                fs::copy(src.join(&name), dst.join(&name)).map_err(io_err(&src))?;
            }
        }
    }
    fs::write(grub_dir.join("grub.cfg"), boot::grub_cfg()).map_err(io_err(&grub_dir))?;
    fs::write(grub_dir.join("grubenv"), empty_grubenv()).map_err(io_err(&grub_dir))?;
    rootfs::clamp_times(&grub_dir, epoch)?;
    cmd::run(disk::mtools("mmd", &img, Some(epoch)).args(["::/EFI", "::/EFI/BOOT"]))?;
    cmd::run(
        disk::mtools("mcopy", &img, Some(epoch))
            .arg("-m")
            .arg(tree.join(tree::CORE_EFI))
            .arg("::/EFI/BOOT/BOOTX64.EFI"),
    )?;
    // -s: recursive; -m: keep the (clamped) modification times.
    cmd::run(
        disk::mtools("mcopy", &img, Some(epoch))
            .args(["-s", "-m"])
            .arg(&grub_dir)
            .arg("::/"),
    )?;
    Ok(())
}

const CONFIG_README: &str = "\
STORK: this appliance's configuration.

Copy stork.toml.example to stork.toml, set at least:
  interface    the NIC on the provisioning network (e.g. enp1s0)
  address      this appliance's address there
  [dhcp]       mode (full, proxy or off), range, prefix_len
and optionally [appliance] hostname and admin_token_sha256. Then boot the appliance.

Without stork.toml the appliance comes up safe: a DHCP client on its first NIC, Stork's
own DHCP off. Its console says where to reach it and what it read.

admin-token.txt appears here at first boot when no admin token was configured.
";

fn config_partition(
    raw: &Path,
    layout: &Layout,
    req: &Request<'_>,
    scratch: &Path,
    epoch: u64,
) -> Result<(), ImageError> {
    // Volume id "STRK".
    let img = disk::mkfs_vfat(raw, layout.extent(CONFIG), Fat::Fat16, "STORK", 0x5354_524B)?;
    // The example is the binary's own commented default configuration.
    let example = cmd::run(cmd::clean(req.stork).args(["config", "default"]))?;
    let dir = scratch.join("config");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut files = vec![
        (
            "README.txt",
            CONFIG_README.replace('\n', "\r\n").into_bytes(),
        ),
        ("stork.toml.example", example.stdout),
    ];
    if let Some(c) = req.config {
        files.push(("stork.toml", fs::read(c).map_err(io_err(c))?));
    }
    for (name, bytes) in files {
        let p = dir.join(name);
        fs::write(&p, bytes).map_err(io_err(&p))?;
        rootfs::clamp_times(&p, epoch)?;
        cmd::run(
            disk::mtools("mcopy", &img, Some(epoch))
                .arg("-m")
                .arg(&p)
                .arg(format!("::/{name}")),
        )?;
    }
    Ok(())
}

/// GRUB for BIOS from the tree's images (see [`crate::disk::install_grub_bios`]).
fn bios(raw: &Path, layout: &Layout, tree: &Path) -> Result<(), ImageError> {
    let read = |rel: &str| {
        let p = tree.join(rel);
        fs::read(&p).map_err(io_err(&p))
    };
    let (boot_img, core_img) = (read(tree::BOOT_IMG)?, read(tree::CORE_IMG)?);
    let sectors = layout.parts[layout::BIOS as usize - 1];
    crate::disk::install_grub_bios(raw, sectors, &boot_img, &core_img)?;
    Ok(())
}
