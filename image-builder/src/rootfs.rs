//! Debian root trees, built once and kept in the cache:
//!
//! ```text
//! CACHE/debootstrap/<suite>-<arch>/   debootstrap's .deb cache (--cache-dir)
//! CACHE/apt-archives/<name>/          the chroot's /var/cache/apt/archives (bind mount)
//! CACHE/rootfs/base-<key>/            `debootstrap --variant=minbase`, keyed by suite, arch,
//!                                     components and mirror
//! CACHE/rootfs/<name>-<key>/          base + packages + configuration, keyed by all of the
//!                                     above plus the package list and the configuration
//! CACHE/rootfs/<name>-<key>.json      what the tree holds (TreeInfo)
//! CACHE/rootfs/<name>-<key>.log       debootstrap's and apt's output
//! ```
//!
//! Needs root: debootstrap, chroot and mounts. Every command inside the tree runs in a private
//! mount namespace (`unshare --mount`) that mounts /proc, /sys, /dev (and the apt archive
//! cache) for that command alone, so nothing stays mounted inside the tree when a build is
//! interrupted, and removing a tree can never reach the host's /dev.
//!
//! A finished tree is normalized so that images built from it are reproducible: per-machine
//! and per-build files removed (logs, apt lists and caches, machine-id, SSH host keys,
//! random seeds), shadow's password-change dates set to the epoch day, and every timestamp
//! clamped to `SOURCE_DATE_EPOCH` (by default the newest `Date:` of the apt Release files the
//! packages came from, so the same mirror state gives the same epoch).

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cmd::{self, CmdError};
use crate::progress::Progress;
use crate::recipe::ExtraKernel;
use crate::sources::{self, Mirrors, SourcesError};

pub const VARIANT: &str = "minbase";
/// Bump when base creation changes what a base tree holds.
const BASE_FORMAT: u32 = 1;
/// Bump when tree creation (install, cleanup, normalization) changes what a tree holds.
pub const TREE_FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{what} needs root (debootstrap, chroot and mount namespaces): run as root")]
    NeedsRoot { what: &'static str },
    #[error("the host's apt sources")]
    Sources(#[from] SourcesError),
    #[error(transparent)]
    Tool(#[from] CmdError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} has file systems mounted inside it; unmount them first (refusing to delete it)"
    )]
    MountsInside { path: PathBuf },
    #[error("{path}: bad tree record")]
    Info {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("SOURCE_DATE_EPOCH={value:?} is not a number of seconds")]
    BadEpoch { value: String },
    #[error("no apt Release file with a Date: field in {dir}")]
    NoReleaseDate { dir: PathBuf },
    #[error(
        "the tree has {found:?} under /lib/modules: exactly one kernel from the packages expected"
    )]
    Kernels { found: Vec<String> },
    #[error("kernel {name}: the install added {found:?} under /lib/modules, not one new kernel")]
    ExtraKernel { name: String, found: Vec<String> },
}

pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to build.
pub struct Spec<'a> {
    /// Cache name of the tree (`ephemeral`, or the recipe's name).
    pub name: &'a str,
    pub suite: &'a str,
    pub arch: &'a str,
    pub components: &'a [String],
    pub packages: &'a [String],
    /// Kernels installed after the packages, each from its suite; the packages' own kernel
    /// stays the one `/vmlinuz` points at.
    pub extra_kernels: &'a [ExtraKernel],
    /// Leave out documentation, manual pages and translations (dpkg path excludes).
    pub minimize: bool,
    /// Everything `configure` depends on (its format version and its inputs): part of the key.
    pub config_key: String,
    /// Runs inside the build, after the packages are installed, with the tree's path and its
    /// key; may run commands in the tree with [`chroot`].
    pub configure: &'a dyn Fn(&Path, &str) -> Result<(), RootfsError>,
}

/// A finished tree, locked for the caller until dropped.
#[derive(Debug)]
pub struct Tree {
    pub path: PathBuf,
    pub info: TreeInfo,
    _lock: File,
}

/// What a tree holds, recorded beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeInfo {
    pub name: String,
    /// Cache key (16 hex digits of a SHA-256).
    pub key: String,
    pub suite: String,
    pub arch: String,
    pub mirror_sha256: String,
    pub source_date_epoch: u64,
    /// `dpkg-query` output: `name\tversion\tarch` lines, sorted.
    pub installed: String,
    /// Directories under /lib/modules.
    pub kernel_versions: Vec<String>,
    /// The version each of [`Spec::extra_kernels`] installed, in its order.
    #[serde(default)]
    pub extra_kernel_versions: Vec<String>,
}

impl TreeInfo {
    /// The packages' kernel: the one that is not an extra.
    pub fn default_kernel(&self) -> Result<&str, RootfsError> {
        match self
            .kernel_versions
            .iter()
            .filter(|v| !self.extra_kernel_versions.contains(v))
            .collect::<Vec<_>>()[..]
        {
            [one] => Ok(one),
            ref found => Err(RootfsError::Kernels {
                found: found.iter().map(|v| (*v).clone()).collect(),
            }),
        }
    }
}

impl TreeInfo {
    pub fn installed_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.installed.as_bytes()))
    }
    pub fn installed_count(&self) -> usize {
        self.installed.lines().count()
    }
}

fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    hex::encode(h.finalize())[..16].to_owned()
}

pub fn require_root(what: &'static str) -> Result<(), RootfsError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(RootfsError::NeedsRoot { what })
    }
}

/// SOURCE_DATE_EPOCH from the environment, if set (an empty value counts as unset).
pub fn epoch_override() -> Result<Option<u64>, RootfsError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| RootfsError::BadEpoch { value: v }),
        _ => Ok(None),
    }
}

/// An exclusive lock on `path` (created if missing), released when the file is dropped.
fn lock(path: &Path) -> Result<File, RootfsError> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.lock().map_err(io_err(path))?;
    Ok(f)
}

/// The tree for `spec`: from the cache, or built (base first, if that is not cached either).
/// `refresh` rebuilds the tree, fetching the newest packages (the tree's `apt-get upgrade`
/// brings the cached base's packages up to date too).
pub fn prepare(
    cache: &Path,
    spec: &Spec<'_>,
    refresh: bool,
    progress: &Progress,
) -> Result<Tree, RootfsError> {
    let mirrors = spec.extra_kernels.iter().fold(
        sources::mirrors(Path::new(sources::APT_DIR), spec.suite)?,
        |m, k| m.with_suite(&k.suite),
    );
    let epoch = epoch_override()?;
    let dir = absolute(&cache.join("rootfs"))?;
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;

    let components = spec.components.join(",");
    let base_key = key(&[
        &format!("base {BASE_FORMAT}"),
        spec.suite,
        spec.arch,
        VARIANT,
        &components,
        &mirrors.main,
    ]);
    let tree_key = key(&[
        &format!("tree {TREE_FORMAT}"),
        &base_key,
        &mirrors.sha256(),
        &spec.packages.join(" "),
        &serde_json::to_string(spec.extra_kernels).unwrap_or_default(),
        &format!("minimize={}", spec.minimize),
        &format!("epoch={epoch:?}"),
        &spec.config_key,
    ]);
    let lock_file = lock(&dir.join(format!(".{}.lock", spec.name)))?;
    let path = dir.join(format!("{}-{tree_key}", spec.name));
    let info_path = dir.join(format!("{}-{tree_key}.json", spec.name));
    if !refresh
        && path.is_dir()
        && let Ok(bytes) = fs::read(&info_path)
    {
        let info: TreeInfo =
            serde_json::from_slice(&bytes).map_err(|source| RootfsError::Info {
                path: info_path.clone(),
                source,
            })?;
        progress.say(&format!("root tree {} (cached)", path.display()));
        return Ok(Tree {
            path,
            info,
            _lock: lock_file,
        });
    }
    require_root("building a Debian root tree")?;

    let base = dir.join(format!("base-{base_key}"));
    {
        let _base_lock = lock(&dir.join(format!(".base-{base_key}.lock")))?;
        if !base.is_dir() {
            debootstrap(cache, &dir, &base, spec, &mirrors, progress)?;
        } else {
            progress.say(&format!("debootstrap tree {} (cached)", base.display()));
        }
    }

    let log = dir.join(format!("{}-{tree_key}.log", spec.name));
    let tmp = dir.join(format!(".{}-{tree_key}.tmp", spec.name));
    remove_tree(&tmp)?;
    // Best effort: a stale log only confuses.
    let _ = fs::remove_file(&log);
    progress.step("copying the debootstrap tree", || {
        cmd::run(
            cmd::clean("cp")
                .arg("-a")
                .arg("--reflink=auto")
                .arg(&base)
                .arg(&tmp),
        )
    })?;
    let archives = absolute(&cache.join("apt-archives").join(spec.name))?;
    let partial = archives.join("partial");
    fs::create_dir_all(&partial).map_err(io_err(&partial))?;

    setup_apt(&tmp, &mirrors, spec)?;
    let apt = |args: &[&str]| {
        let mut c = chroot(&tmp, Some(&archives));
        c.args(["apt-get", "-y", "-q"])
            .args(APT_OPTIONS.iter().flat_map(|o| ["-o", o]))
            .args(args);
        sources::proxy_env(&mut c);
        cmd::run_logged(&mut c, &log)
    };
    progress.step("apt-get update", || apt(&["update"]))?;
    progress.step("apt-get upgrade (updates and security fixes)", || {
        apt(&["upgrade"])
    })?;
    let mut install = vec!["install", "--no-install-recommends"];
    install.extend(spec.packages.iter().map(String::as_str));
    progress.step(
        &format!("apt-get install {} packages", spec.packages.len()),
        || apt(&install),
    )?;
    let modules = tmp.join("usr/lib/modules");
    let mut extra_kernel_versions = Vec::new();
    if !spec.extra_kernels.is_empty() {
        let base = list_dir(&modules)?;
        let [default] = &base[..] else {
            return Err(RootfsError::Kernels { found: base });
        };
        for k in spec.extra_kernels {
            let before = list_dir(&modules)?;
            progress.step(
                &format!(
                    "apt-get install {} from {} (kernel {})",
                    k.package, k.suite, k.name
                ),
                || {
                    apt(&[
                        "install",
                        "--no-install-recommends",
                        "-t",
                        &k.suite,
                        &k.package,
                    ])
                },
            )?;
            let new: Vec<String> = list_dir(&modules)?
                .into_iter()
                .filter(|v| !before.contains(v))
                .collect();
            let [version] = &new[..] else {
                return Err(RootfsError::ExtraKernel {
                    name: k.name.clone(),
                    found: new,
                });
            };
            extra_kernel_versions.push(version.clone());
        }
        // Each install pointed /vmlinuz at its kernel: the packages' kernel is the default.
        point_kernel_links(&tmp, default)?;
    }
    // Drop cached .debs that are no longer in the mirror, so the archive cache does not grow
    // with every refresh.
    apt(&["autoclean"])?;
    progress.step("configuring", || (spec.configure)(&tmp, &tree_key))?;

    let out = cmd::run(chroot(&tmp, None).args([
        "dpkg-query",
        "-W",
        "-f",
        "${binary:Package}\t${Version}\t${Architecture}\n",
    ]))?;
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap_or_default()
        .lines()
        .collect();
    lines.sort_unstable();
    let installed = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let source_date_epoch = match epoch {
        Some(e) => e,
        None => release_epoch(&tmp.join("var/lib/apt/lists"))?,
    };
    let kernel_versions = list_dir(&modules)?;

    progress.step("normalizing (per-build files, dates)", || {
        cleanup(&tmp)?;
        normalize_shadow(&tmp, source_date_epoch)?;
        clamp_times(&tmp, source_date_epoch)
    })?;
    let info = TreeInfo {
        name: spec.name.to_owned(),
        key: tree_key.clone(),
        suite: spec.suite.to_owned(),
        arch: spec.arch.to_owned(),
        mirror_sha256: mirrors.sha256(),
        source_date_epoch,
        installed,
        kernel_versions,
        extra_kernel_versions,
    };
    remove_tree(&path)?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    let json = serde_json::to_vec_pretty(&info).map_err(|source| RootfsError::Info {
        path: info_path.clone(),
        source,
    })?;
    fs::write(&info_path, json).map_err(io_err(&info_path))?;
    prune(&dir, spec.name, &tree_key)?;
    progress.say(&format!(
        "root tree {}: {} packages, SOURCE_DATE_EPOCH {source_date_epoch}",
        path.display(),
        info.installed_count()
    ));
    Ok(Tree {
        path,
        info,
        _lock: lock_file,
    })
}

/// Points Debian's `/vmlinuz` and `/initrd.img` at `version`, as linux-update-symlinks does.
fn point_kernel_links(tree: &Path, version: &str) -> Result<(), RootfsError> {
    for (link, target) in stork_proto::kernel::links(version) {
        let path = tree.join(link);
        remove_file_if_exists(&path)?;
        std::os::unix::fs::symlink(&target, &path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// apt options for unattended runs in the chroot: keep configuration files the build wrote,
/// skip the download sandbox (the archive directory is a bind mount owned by the host's root),
/// retry transient mirror errors.
const APT_OPTIONS: &[&str] = &[
    "Dpkg::Options::=--force-confdef",
    "Dpkg::Options::=--force-confold",
    "APT::Sandbox::User=root",
    "Acquire::Retries=3",
];

fn debootstrap(
    cache: &Path,
    dir: &Path,
    base: &Path,
    spec: &Spec<'_>,
    mirrors: &Mirrors,
    progress: &Progress,
) -> Result<(), RootfsError> {
    let debs = absolute(
        &cache
            .join("debootstrap")
            .join(format!("{}-{}", spec.suite, spec.arch)),
    )?;
    fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let log = dir.join(format!("{name}.log"));
    remove_tree(&tmp)?;
    // Best effort: a stale log only confuses.
    let _ = fs::remove_file(&log);
    let mut c = cmd::clean("debootstrap");
    c.arg(format!("--variant={VARIANT}"))
        .arg(format!("--arch={}", spec.arch))
        .arg(format!("--components={}", spec.components.join(",")))
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(spec.suite)
        .arg(&tmp)
        .arg(&mirrors.main);
    sources::proxy_env(&mut c);
    progress.step(
        &format!(
            "debootstrap --variant={VARIANT} {} (host mirror)",
            spec.suite
        ),
        || cmd::run_logged(&mut c, &log),
    )?;
    // debootstrap leaves its .debs in the tree too; they are in --cache-dir already.
    remove_matching(&tmp.join("var/cache/apt/archives"), |n| n.ends_with(".deb"))?;
    remove_tree(base)?;
    fs::rename(&tmp, base).map_err(io_err(base))?;
    Ok(())
}

/// The host's mirrors as the tree's apt sources, a policy-rc.d that keeps packages from
/// starting daemons in the chroot, and for minimized trees the dpkg path excludes.
fn setup_apt(tree: &Path, mirrors: &Mirrors, spec: &Spec<'_>) -> Result<(), RootfsError> {
    let list = tree.join("etc/apt/sources.list");
    if list.exists() {
        fs::remove_file(&list).map_err(io_err(&list))?;
    }
    write_file(
        &tree.join("etc/apt/sources.list.d/debian.sources"),
        &mirrors.deb822(spec.components),
        0o644,
    )?;
    write_file(
        &tree.join("usr/sbin/policy-rc.d"),
        "#!/bin/sh\n# stork-image: no daemons start while the image is built.\nexit 101\n",
        0o755,
    )?;
    if spec.minimize {
        write_file(
            &tree.join("etc/dpkg/dpkg.cfg.d/stork-minimize"),
            MINIMIZE,
            0o644,
        )?;
        prune_docs(tree)?;
    }
    Ok(())
}

/// dpkg path excludes for minimized trees: the ephemeral image lives in RAM, and nobody reads
/// manuals there. Copyright files stay (licences require them).
const MINIMIZE: &str = "\
# Written by stork-image: this image lives in RAM; no documentation or translations.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
";

/// Removes what MINIMIZE excludes from files debootstrap already installed.
fn prune_docs(tree: &Path) -> Result<(), RootfsError> {
    for d in ["usr/share/man", "usr/share/info", "usr/share/lintian"] {
        remove_matching(&tree.join(d), |_| true)?;
    }
    remove_matching(&tree.join("usr/share/locale"), |n| n != "locale.alias")?;
    let doc = tree.join("usr/share/doc");
    for pkg in list_dir(&doc)? {
        let p = doc.join(&pkg);
        if p.is_dir() && !p.is_symlink() {
            remove_matching(&p, |n| n != "copyright")?;
        }
    }
    Ok(())
}

/// A command run inside `tree` (as root, in a private mount namespace with /proc, /sys and
/// /dev mounted, and `archives` as apt's archive directory if given). The environment is
/// [`cmd::clean`]'s plus what unattended apt and debconf need.
pub fn chroot(tree: &Path, archives: Option<&Path>) -> Command {
    // Mounts made here vanish with the namespace when the command exits, however it exits.
    const SCRIPT: &str = r#"set -e
root=$1 archives=$2
shift 2
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
if [ -n "$archives" ]; then
  mount --bind "$archives" "$root/var/cache/apt/archives"
  # apt resolves the mirror's name: once systemd-resolved is installed the tree's
  # resolv.conf is a link into /run, empty here, so the host's goes where it points.
  target=$(chroot "$root" readlink -m /etc/resolv.conf)
  case "$target" in
    /run/*)
      mount -t tmpfs -o size=1m tmpfs "$root/run"
      mkdir -p "$root${target%/*}"
      cp /etc/resolv.conf "$root$target" ;;
  esac
fi
exec chroot "$root" "$@""#;
    let mut c = cmd::clean("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        SCRIPT,
        "sh",
    ])
    .arg(tree)
    .arg(archives.map(Path::as_os_str).unwrap_or_default())
    .env("DEBIAN_FRONTEND", "noninteractive")
    .env("DEBCONF_NONINTERACTIVE_SEEN", "true");
    c
}

/// Per-machine and per-build files that must not be in an image.
fn cleanup(tree: &Path) -> Result<(), RootfsError> {
    remove_matching(&tree.join("var/lib/apt/lists"), |n| {
        n != "partial" && n != "lock"
    })?;
    remove_matching(&tree.join("var/cache/apt"), |n| n.ends_with(".bin"))?;
    remove_matching(&tree.join("var/cache/debconf"), |n| n.ends_with("-old"))?;
    remove_matching(&tree.join("var/lib/dpkg"), |n| n.ends_with("-old"))?;
    remove_matching(&tree.join("etc/ssh"), |n| n.starts_with("ssh_host_"))?;
    remove_matching(&tree.join("tmp"), |_| true)?;
    remove_matching(&tree.join("var/tmp"), |_| true)?;
    for f in [
        "usr/sbin/policy-rc.d",
        "var/cache/ldconfig/aux-cache",
        "var/lib/dbus/machine-id",
        "var/lib/systemd/random-seed",
        "var/lib/systemd/credential.secret",
        "root/.bash_history",
    ] {
        remove_file_if_exists(&tree.join(f))?;
    }
    empty_files(&tree.join("var/log"))?;
    drop_build_date(&tree.join("etc/mdadm/mdadm.conf"))?;
    // Empty, not absent: systemd treats an empty machine-id as "first boot" and writes a new
    // one; absent, it would run read-only root logic.
    write_file(&tree.join("etc/machine-id"), "", 0o444)?;
    write_file(&tree.join("etc/hostname"), "localhost\n", 0o644)?;
    write_file(
        &tree.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
        0o644,
    )?;
    // debootstrap copied the build host's resolv.conf; a symlink (systemd-resolved's) stays.
    let resolv = tree.join("etc/resolv.conf");
    if fs::symlink_metadata(&resolv).is_ok_and(|m| m.is_file()) {
        fs::remove_file(&resolv).map_err(io_err(&resolv))?;
    }
    Ok(())
}

/// mdadm's postinst writes `mdadm.conf` with a line dating it (`auto-generated on <date> by
/// mkconf`): without it, two builds of a tree are the same bytes.
fn drop_build_date(path: &Path) -> Result<(), RootfsError> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            !(l.starts_with("# This configuration was auto-generated on")
                && l.ends_with("by mkconf"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        // In place: the file keeps its owner and mode.
        fs::write(path, kept).map_err(io_err(path))?;
    }
    Ok(())
}

/// Removes every log file under `dir`, keeping the directories (packages expect them).
fn empty_files(dir: &Path) -> Result<(), RootfsError> {
    for name in list_dir(dir)? {
        let p = dir.join(name);
        let m = fs::symlink_metadata(&p).map_err(io_err(&p))?;
        if m.is_dir() {
            empty_files(&p)?;
        } else {
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Sets the "last password change" field of /etc/shadow (days since 1970, the build day) to
/// the epoch's day.
fn normalize_shadow(tree: &Path, epoch: u64) -> Result<(), RootfsError> {
    for f in ["etc/shadow", "etc/shadow-"] {
        let p = tree.join(f);
        let Ok(text) = fs::read_to_string(&p) else {
            continue;
        };
        let out = set_shadow_days(&text, epoch / 86_400);
        if out != text {
            // Rewriting in place keeps the file's owner and mode.
            fs::write(&p, out).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

fn set_shadow_days(text: &str, day: u64) -> String {
    text.lines()
        .map(|line| {
            let mut f: Vec<String> = line.split(':').map(str::to_owned).collect();
            if f.len() > 2 && !f[2].is_empty() {
                f[2] = day.to_string();
            }
            f.join(":") + "\n"
        })
        .collect()
}

/// Sets every access and modification time later than `epoch` to `epoch`, symlinks included,
/// without following them.
pub fn clamp_times(root: &Path, epoch: u64) -> Result<(), RootfsError> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(root).map_err(io_err(root))?;
    if m.is_dir() {
        for name in list_dir(root)? {
            clamp_times(&root.join(name), epoch)?;
        }
    }
    let clamp = |t: i64| u64::try_from(t).unwrap_or(0).min(epoch);
    let (atime, mtime) = (clamp(m.atime()), clamp(m.mtime()));
    if atime == u64::try_from(m.atime()).unwrap_or(u64::MAX)
        && mtime == u64::try_from(m.mtime()).unwrap_or(u64::MAX)
        && m.atime_nsec() == 0
        && m.mtime_nsec() == 0
    {
        return Ok(());
    }
    set_times(root, atime, mtime)
}

fn set_times(path: &Path, atime: u64, mtime: u64) -> Result<(), RootfsError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| RootfsError::Io {
        path: path.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let ts = |s: u64| libc::timespec {
        tv_sec: libc::time_t::try_from(s).unwrap_or(libc::time_t::MAX),
        tv_nsec: 0,
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: `c` is a valid NUL-terminated path and `times` two initialized timespecs, both
    // alive for the call; utimensat reads nothing else.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(RootfsError::Io {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        })
    }
}

/// The newest `Date:` among apt's Release and InRelease files in `lists`.
fn release_epoch(lists: &Path) -> Result<u64, RootfsError> {
    let mut newest = None;
    for name in list_dir(lists)? {
        if !(name.ends_with("_Release") || name.ends_with("_InRelease")) {
            continue;
        }
        let p = lists.join(&name);
        let text = fs::read_to_string(&p).map_err(io_err(&p))?;
        if let Some(t) = text
            .lines()
            .find_map(|l| l.strip_prefix("Date:"))
            .and_then(parse_rfc2822)
        {
            newest = newest.max(Some(t));
        }
    }
    newest.ok_or_else(|| RootfsError::NoReleaseDate {
        dir: lists.to_owned(),
    })
}

/// `Sat, 11 Jul 2026 10:16:37 UTC` (the form apt's Release files use) as seconds since 1970.
pub fn parse_rfc2822(s: &str) -> Option<u64> {
    let words: Vec<&str> = s.split_whitespace().collect();
    // The weekday is optional.
    let words = if words.first()?.ends_with(',') {
        &words[1..]
    } else {
        &words[..]
    };
    let [day, month, year, time, zone] = words else {
        return None;
    };
    if !matches!(*zone, "UTC" | "GMT" | "+0000" | "Z") {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let day: i64 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else {
        return None;
    };
    if !(1..=31).contains(&day)
        || !(0..24).contains(&h)
        || !(0..60).contains(&m)
        || !(0..=60).contains(&sec)
    {
        return None;
    }
    // Days from civil date (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
}

/// Removes other trees (and their records and logs) of the same name: a cache that only grows
/// fills the disk.
fn prune(dir: &Path, name: &str, keep: &str) -> Result<(), RootfsError> {
    let prefix = format!("{name}-");
    for entry in list_dir(dir)? {
        let Some(rest) = entry.strip_prefix(&prefix) else {
            continue;
        };
        let key = rest.split('.').next().unwrap_or_default();
        if key == keep || key.len() != 16 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let p = dir.join(&entry);
        if p.is_dir() {
            remove_tree(&p)?;
        } else {
            remove_file_if_exists(&p)?;
        }
    }
    Ok(())
}

/// Mount points at or below `path`, from /proc/self/mountinfo.
fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(path))
        .collect()
}

/// mountinfo (and /proc/swaps) escape space, tab, newline and backslash as `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deletes a tree, refusing if anything is mounted inside it (a bind-mounted /dev would be
/// emptied otherwise: remove_dir_all crosses mount points).
pub fn remove_tree(path: &Path) -> Result<(), RootfsError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let abs = absolute(path)?;
    if !mounts_below(&abs).is_empty() {
        return Err(RootfsError::MountsInside { path: abs });
    }
    fs::remove_dir_all(&abs).map_err(io_err(&abs))
}

fn absolute(path: &Path) -> Result<PathBuf, RootfsError> {
    std::path::absolute(path).map_err(io_err(path))
}

/// Names in `dir`, sorted; empty if it does not exist.
pub fn list_dir(dir: &Path) -> Result<Vec<String>, RootfsError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RootfsError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(io_err(dir))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Removes the entries of `dir` whose names match (directories recursively).
fn remove_matching(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<(), RootfsError> {
    for name in list_dir(dir)? {
        if !matches(&name) {
            continue;
        }
        let p = dir.join(&name);
        let m = fs::symlink_metadata(&p).map_err(io_err(&p))?;
        if m.is_dir() {
            remove_tree(&p)?;
        } else {
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

fn remove_file_if_exists(path: &Path) -> Result<(), RootfsError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RootfsError::Io {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Writes a file (creating parent directories) with `mode`, owned by whoever runs the build
/// (root).
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), RootfsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    // A symlink in the tree must not redirect the write outside it.
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
        fs::remove_file(path).map_err(io_err(path))?;
    }
    fs::write(path, text).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn release_dates() {
        assert_eq!(
            parse_rfc2822(" Sat, 11 Jul 2026 10:16:37 UTC"),
            Some(1_783_764_997)
        );
        assert_eq!(parse_rfc2822("29 Feb 2000 23:59:59 GMT"), Some(951_868_799));
        assert_eq!(parse_rfc2822("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        for bad in [
            "",
            "Sat, 11 Jul 2026 10:16:37 +0200",
            "11 Foo 2026 10:16:37 UTC",
            "11 Jul 2026 10:16 UTC",
            "32 Jul 2026 10:16:37 UTC",
        ] {
            assert_eq!(parse_rfc2822(bad), None, "{bad}");
        }
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("m_dists_bookworm_InRelease"), "-----BEGIN PGP SIGNED MESSAGE-----\nOrigin: Debian\nDate: Sat, 11 Jul 2026 10:16:37 UTC\n").unwrap();
        fs::write(
            tmp.path().join("s_dists_bookworm-security_InRelease"),
            "Date: Sun, 12 Jul 2026 10:16:37 UTC\n",
        )
        .unwrap();
        fs::write(
            tmp.path()
                .join("m_dists_bookworm_main_binary-amd64_Packages"),
            "Date: Mon, 13 Jul 2026 10:16:37 UTC\n",
        )
        .unwrap();
        assert_eq!(release_epoch(tmp.path()).unwrap(), 1_783_764_997 + 86_400);
        assert!(matches!(
            release_epoch(&tmp.path().join("none")),
            Err(RootfsError::NoReleaseDate { .. })
        ));
    }

    #[test]
    fn shadow_change_days_become_the_epoch_day() {
        let text = "root:*:20400:0:99999:7:::\ndebian:!:20401:0:99999:7:::\nodd:x:::\n";
        assert_eq!(
            set_shadow_days(text, 19_000),
            "root:*:19000:0:99999:7:::\ndebian:!:19000:0:99999:7:::\nodd:x:::\n"
        );
    }

    #[test]
    fn times_are_clamped_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir(d.join("dir")).unwrap();
        fs::write(d.join("dir/new"), "x").unwrap();
        fs::write(d.join("old"), "x").unwrap();
        set_times(&d.join("old"), 1000, 1000).unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.join("dir/link")).unwrap();
        clamp_times(d, 5000).unwrap();
        let mtime = |p: &str| fs::symlink_metadata(d.join(p)).unwrap().mtime();
        assert_eq!(mtime("dir/new"), 5000);
        assert_eq!(mtime("dir/link"), 5000);
        assert_eq!(mtime("dir"), 5000);
        assert_eq!(mtime("old"), 1000);
        assert_eq!(mtime(""), 5000);
    }

    #[test]
    fn cleanup_removes_per_machine_files() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        for f in [
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/sshd_config",
            "var/log/apt/history.log",
            "var/lib/apt/lists/x_Packages",
            "var/cache/apt/pkgcache.bin",
            "var/lib/dpkg/status-old",
            "var/lib/dpkg/status",
            "etc/resolv.conf",
            "tmp/junk",
        ] {
            write_file(&t.join(f), "x", 0o644).unwrap();
        }
        fs::create_dir_all(t.join("var/lib/apt/lists/partial")).unwrap();
        cleanup(t).unwrap();
        for gone in [
            "etc/ssh/ssh_host_ed25519_key",
            "var/log/apt/history.log",
            "var/lib/apt/lists/x_Packages",
            "var/cache/apt/pkgcache.bin",
            "var/lib/dpkg/status-old",
            "etc/resolv.conf",
            "tmp/junk",
        ] {
            assert!(!t.join(gone).exists(), "{gone}");
        }
        for kept in [
            "etc/ssh/sshd_config",
            "var/log/apt",
            "var/lib/dpkg/status",
            "var/lib/apt/lists/partial",
        ] {
            assert!(t.join(kept).exists(), "{kept}");
        }
        assert_eq!(fs::read(t.join("etc/machine-id")).unwrap(), b"");
        assert_eq!(
            fs::metadata(t.join("etc/machine-id")).unwrap().mode() & 0o777,
            0o444
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
        // /proc is mounted: a tree containing it is refused.
        assert!(!mounts_below(Path::new("/proc")).is_empty());
    }

    #[test]
    fn keys_depend_on_every_part() {
        assert_ne!(key(&["a", "bc"]), key(&["ab", "c"]));
        assert_eq!(key(&["a"]).len(), 16);
    }
}
