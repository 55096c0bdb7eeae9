//! Builds the boot artifacts from an unpacked kernel and the agent: `vmlinuz`, `initrd.img`
//! (zstd-compressed newc cpio with the agent as `/init`) and `manifest.json`.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::archive::{ArchiveError, Source, Tree};
use crate::depmod::{self, DepmodError};
use crate::manifest::{self, Artifact, ArtifactKind, HashingWriter, Inputs, Manifest};
use crate::modules::{Module, ModuleIndex, ModulesError};

/// zstd level for the initrd. Measured on Debian 6.1's default module set (7.3 MB of cpio,
/// one core): level 9 gives 1.57 MB in 0.1 s, 15 1.56 MB in 0.8 s, 19 1.41 MB in 2.3 s, and 22
/// (--ultra) saves nothing more. Single-threaded, so the bytes are the same on every host.
pub const ZSTD_LEVEL: i32 = 19;

/// The kernel opens `/dev/console` in the initramfs as /init's stdin, stdout and stderr before
/// running it (`console_on_rootfs` in `init/main.c`); devtmpfs is only mounted later, by the
/// agent, so the node must be in the archive.
const CONSOLE: (u32, u32) = (5, 1);
const NULL: (u32, u32) = (1, 3);

/// Where the agent finds its module list (`agent/src/modules.rs`, `LOAD_LIST`).
pub const MODULES_LOAD: &str = "etc/stork/modules.load";
/// Where the agent finds its on-demand modules (`agent/src/modules.rs`, `ON_DEMAND_LIST`):
/// a line per module, its name then its files and its dependencies' files, dependencies
/// first.
pub const MODULES_ON_DEMAND: &str = "etc/stork/modules.ondemand";

const DIRS: &[&str] = &[
    "dev",
    "etc",
    "etc/stork",
    "lib",
    "mnt",
    "proc",
    "run",
    "sys",
    "tmp",
];

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error("{dir} has no kernel version directory under lib/modules")]
    NoKernelVersion { dir: PathBuf },
    #[error("{dir} has several kernel versions ({}); choose one with --kver", found.join(", "))]
    SeveralKernelVersions { dir: PathBuf, found: Vec<String> },
    #[error("kernel version {kver:?} is not a directory under {dir}/lib/modules")]
    NoSuchKernelVersion { dir: PathBuf, kver: String },
    #[error("kernel image {path} not found")]
    NoVmlinuz { path: PathBuf },
    #[error("agent {path} is not a regular file")]
    AgentNotAFile { path: PathBuf },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel modules")]
    Modules(#[from] ModulesError),
    #[error("kernel module index")]
    Depmod(#[from] DepmodError),
    #[error("initrd archive")]
    Archive(#[from] ArchiveError),
    #[error("encoding manifest.json")]
    Manifest(#[from] serde_json::Error),
}

/// Everything a build depends on; the same request gives the same bytes.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Unpacked kernel package: holds `boot/` and `lib/modules/<kver>/`.
    pub kernel_dir: &'a Path,
    /// Needed only when `lib/modules` holds more than one version.
    pub kver: Option<&'a str>,
    pub agent: &'a Path,
    pub out: &'a Path,
    pub modules: &'a [String],
    pub source_date_epoch: u32,
}

/// The single kernel version under `lib/modules`, or the requested one if it is there.
pub fn kernel_version(kernel_dir: &Path, requested: Option<&str>) -> Result<String, InitrdError> {
    let root = kernel_dir.join("lib/modules");
    if let Some(kver) = requested {
        let plain = !kver.is_empty() && !kver.contains('/') && kver != "." && kver != "..";
        if plain && root.join(kver).is_dir() {
            return Ok(kver.to_owned());
        }
        return Err(InitrdError::NoSuchKernelVersion {
            dir: kernel_dir.to_owned(),
            kver: kver.to_owned(),
        });
    }
    let mut found = Vec::new();
    let list = fs::read_dir(&root).map_err(|_| InitrdError::NoKernelVersion {
        dir: kernel_dir.to_owned(),
    })?;
    for entry in list {
        let entry = entry.map_err(|source| InitrdError::Read {
            path: root.clone(),
            source,
        })?;
        if entry.path().is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            found.push(name.to_owned());
        }
    }
    found.sort();
    match found.len() {
        0 => Err(InitrdError::NoKernelVersion {
            dir: kernel_dir.to_owned(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(InitrdError::SeveralKernelVersions {
            dir: kernel_dir.to_owned(),
            found,
        }),
    }
}

/// The module index of `moddir`: its modules.dep, or the modules' own .modinfo when the tree
/// was never run through depmod.
pub fn module_index(moddir: &Path) -> Result<ModuleIndex, InitrdError> {
    if let Some(index) = ModuleIndex::load(moddir)? {
        return Ok(index);
    }
    eprintln!(
        "stork-image: {} has no modules.dep; reading each module's .modinfo",
        moddir.display()
    );
    Ok(depmod::scan(moddir)?)
}

/// The initrd's contents. Pure apart from what `Source::Disk` entries read later.
pub fn tree(
    kver: &str,
    agent: &Path,
    moddir: &Path,
    index: &ModuleIndex,
    load_order: &[Module],
    on_demand: &[(String, Vec<Module>)],
) -> Result<Tree, InitrdError> {
    let mut t = Tree::new();
    for d in DIRS {
        t.dir(d, 0o755)?;
    }
    let kmods = format!("lib/modules/{kver}");
    t.dir(&kmods, 0o755)?;
    t.char_dev("dev/console", 0o600, CONSOLE.0, CONSOLE.1)?;
    t.char_dev("dev/null", 0o666, NULL.0, NULL.1)?;
    t.file("init", 0o755, Source::Disk(agent.to_owned()))?;

    let mut load = String::from("# Written by stork-image: load in this order.\n");
    for m in load_order {
        t.file(
            &format!("{kmods}/{}", m.path),
            0o644,
            Source::Disk(moddir.join(&m.path)),
        )?;
        load.push_str(&format!("/{kmods}/{}\n", m.path));
    }
    t.file(MODULES_LOAD, 0o644, Source::Bytes(load.into_bytes()))?;

    let mut listed: Vec<&str> = load_order.iter().map(|m| m.path.as_str()).collect();
    let mut later =
        String::from("# Written by stork-image: a module, then its files in load order.\n");
    for (name, order) in on_demand {
        later.push_str(name);
        for m in order {
            later.push_str(&format!(" /{kmods}/{}", m.path));
            if !listed.contains(&m.path.as_str()) {
                listed.push(&m.path);
                t.file(
                    &format!("{kmods}/{}", m.path),
                    0o644,
                    Source::Disk(moddir.join(&m.path)),
                )?;
            }
        }
        later.push('\n');
    }
    t.file(MODULES_ON_DEMAND, 0o644, Source::Bytes(later.into_bytes()))?;

    // modules.dep for just these modules, for tools like busybox modprobe.
    let dep = index.render_modules_dep(load_order)?;
    t.file(
        &format!("{kmods}/modules.dep"),
        0o644,
        Source::Bytes(dep.into_bytes()),
    )?;
    Ok(t)
}

/// Builds vmlinuz, initrd.img and manifest.json into `req.out`.
pub fn build(req: &Request<'_>) -> Result<Manifest, InitrdError> {
    let kver = kernel_version(req.kernel_dir, req.kver)?;
    let moddir = req.kernel_dir.join("lib/modules").join(&kver);
    let vmlinuz = req.kernel_dir.join("boot").join(format!("vmlinuz-{kver}"));
    if !vmlinuz.is_file() {
        return Err(InitrdError::NoVmlinuz { path: vmlinuz });
    }
    let agent_meta = fs::metadata(req.agent).map_err(|source| InitrdError::Read {
        path: req.agent.to_owned(),
        source,
    })?;
    if !agent_meta.is_file() {
        return Err(InitrdError::AgentNotAFile {
            path: req.agent.to_owned(),
        });
    }
    let (_, agent_sha256) =
        manifest::sha256_file(req.agent).map_err(|source| InitrdError::Read {
            path: req.agent.to_owned(),
            source,
        })?;
    eprintln!("stork-image: kernel {kver}");

    let index = module_index(&moddir)?;
    let resolution = index.resolve(req.modules)?;
    if !resolution.builtin.is_empty() {
        eprintln!(
            "stork-image: built into the kernel, skipped: {}",
            resolution.builtin.join(" ")
        );
    }
    eprintln!(
        "stork-image: {} modules, load order: {}",
        resolution.load_order.len(),
        resolution
            .load_order
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Each on-demand module with the dependencies the boot list does not load already.
    let mut on_demand = Vec::new();
    for name in crate::modules::ON_DEMAND_MODULES {
        // A kernel without one (a test's synthetic tree, a trimmed build) ships the rest; the
        // agent names what it lacks if a deploy needs it.
        let order = match index.resolve(&[name.to_string()]) {
            Ok(r) => r.load_order,
            Err(ModulesError::Unknown { .. }) => {
                eprintln!("stork-image: on-demand module {name} is not in this kernel, skipped");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let order: Vec<Module> = order
            .into_iter()
            .filter(|m| !resolution.load_order.iter().any(|b| b.name == m.name))
            .collect();
        on_demand.push((name.to_string(), order));
    }
    let tree = tree(
        &kver,
        req.agent,
        &moddir,
        &index,
        &resolution.load_order,
        &on_demand,
    )?;

    fs::create_dir_all(req.out).map_err(|source| InitrdError::Write {
        path: req.out.to_owned(),
        source,
    })?;

    let (kernel_size, kernel_sha256) = write_atomically(req.out, "vmlinuz", |w| {
        let mut src = File::open(&vmlinuz).map_err(|source| InitrdError::Read {
            path: vmlinuz.clone(),
            source,
        })?;
        io::copy(&mut src, w).map_err(|source| InitrdError::Write {
            path: req.out.join("vmlinuz"),
            source,
        })?;
        Ok(())
    })?;

    let started = Instant::now();
    let mut cpio_size = 0;
    let (initrd_size, initrd_sha256) = write_atomically(req.out, "initrd.img", |w| {
        let write_err = |source| InitrdError::Write {
            path: req.out.join("initrd.img"),
            source,
        };
        let mut encoder = zstd::Encoder::new(w, ZSTD_LEVEL).map_err(write_err)?;
        encoder.include_checksum(true).map_err(write_err)?;
        let counted = tree.write_newc(HashingWriter::new(encoder), req.source_date_epoch)?;
        let (encoder, len, _) = counted.finish();
        cpio_size = len;
        encoder.finish().map_err(write_err)?;
        Ok(())
    })?;
    eprintln!(
        "stork-image: initrd.img: {} bytes of cpio, {} bytes zstd-{ZSTD_LEVEL}, {:.2} s",
        cpio_size,
        initrd_size,
        started.elapsed().as_secs_f64()
    );

    let manifest = Manifest {
        artifacts: vec![
            Artifact {
                name: "vmlinuz".into(),
                kind: ArtifactKind::Kernel,
                size: kernel_size,
                sha256: kernel_sha256,
            },
            Artifact {
                name: "initrd.img".into(),
                kind: ArtifactKind::Initrd,
                size: initrd_size,
                sha256: initrd_sha256,
            },
        ],
        inputs: Inputs {
            kernel_version: kver,
            agent_sha256,
            modules: resolution
                .load_order
                .iter()
                .map(|m| m.name.clone())
                .collect(),
            builtin_modules: resolution.builtin,
            on_demand_modules: on_demand.iter().map(|(n, _)| n.clone()).collect(),
            source_date_epoch: req.source_date_epoch,
            compression: format!("zstd-{ZSTD_LEVEL}"),
        },
    };
    let json = manifest.to_json()?;
    write_atomically(req.out, "manifest.json", |w| {
        w.write_all(json.as_bytes())
            .map_err(|source| InitrdError::Write {
                path: req.out.join("manifest.json"),
                source,
            })
    })?;
    Ok(manifest)
}

/// Writes `out/name` through a temporary file renamed into place, so a failed build never
/// leaves a truncated artifact behind. Returns size and SHA-256 of what was written.
fn write_atomically<F>(out: &Path, name: &str, fill: F) -> Result<(u64, String), InitrdError>
where
    F: FnOnce(&mut HashingWriter<BufWriter<File>>) -> Result<(), InitrdError>,
{
    let path = out.join(name);
    let tmp = out.join(format!(".{name}.tmp"));
    let write_err = |source| InitrdError::Write {
        path: path.clone(),
        source,
    };
    let result = (|| {
        let file = File::create(&tmp).map_err(write_err)?;
        let mut w = HashingWriter::new(BufWriter::new(file));
        fill(&mut w)?;
        let (buffered, len, sha) = w.finish();
        let file = buffered
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?;
        file.sync_all().map_err(write_err)?;
        fs::rename(&tmp, &path).map_err(write_err)?;
        Ok((len, sha))
    })();
    if result.is_err() {
        // Best effort: the error being returned matters more than a stray temporary file.
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_needs_exactly_one_or_a_choice() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert!(matches!(
            kernel_version(d, None),
            Err(InitrdError::NoKernelVersion { .. })
        ));
        fs::create_dir_all(d.join("lib/modules/6.1.0-1-amd64")).unwrap();
        assert_eq!(kernel_version(d, None).unwrap(), "6.1.0-1-amd64");
        fs::create_dir_all(d.join("lib/modules/6.1.0-2-amd64")).unwrap();
        let e = kernel_version(d, None).unwrap_err();
        assert!(
            e.to_string().contains("6.1.0-1-amd64, 6.1.0-2-amd64"),
            "{e}"
        );
        assert_eq!(
            kernel_version(d, Some("6.1.0-2-amd64")).unwrap(),
            "6.1.0-2-amd64"
        );
        for bad in ["6.1.0-3-amd64", "..", "6.1.0-1-amd64/../6.1.0-2-amd64", ""] {
            assert!(matches!(
                kernel_version(d, Some(bad)),
                Err(InitrdError::NoSuchKernelVersion { .. })
            ));
        }
    }
}
