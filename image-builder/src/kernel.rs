//! Fetches a Debian kernel package with the host's apt (its configured mirrors, no others) and
//! unpacks it into a cache directory:
//!
//! ```text
//! CACHE/debs/*.deb                  what `apt-get download` fetched; reused when present
//! CACHE/debs/<suite>/*.deb          the same from another suite of the host's release
//! CACHE/apt/<suite>/                that suite's package lists (the host's apt state is
//!                                   left alone; its mirrors, with the suite added)
//! CACHE/kernel/<package>/boot/      vmlinuz-<kver>, config-<kver>, System.map-<kver>
//! CACHE/kernel/<package>/lib/modules/<kver>/
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::depmod::{self, DepmodError};

/// The metapackage that always depends on the current kernel.
pub const DEFAULT_PACKAGE: &str = "linux-image-amd64";

/// Metapackage chains are one hop in Debian; a few more allow for local indirection.
const MAX_HOPS: usize = 4;

/// Names the unpacked package's .deb, so a newer .deb in the cache is unpacked afresh.
const MARKER: &str = ".stork-deb";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{name:?} is not a valid Debian package name")]
    BadPackageName { name: String },
    #[error("{version:?} is not a valid Debian version")]
    BadVersion { version: String },
    #[error("running {program} (is it installed?)")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "apt-get download {package} failed ({status}); the package lists may be missing or stale: run `apt-get update`\n{stderr}"
    )]
    AptGet {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("{program} {arg} failed ({status})\n{stderr}")]
    Tool {
        program: &'static str,
        arg: String,
        status: String,
        stderr: String,
    },
    #[error("apt-get download {package} succeeded but left no matching .deb in {dir}")]
    NotDownloaded { package: String, dir: PathBuf },
    #[error("several cached .debs for {package}: {}; remove the stale ones", files.join(", "))]
    SeveralCached { package: String, files: Vec<String> },
    #[error("{package}: more than {MAX_HOPS} linux-image packages depend on each other")]
    TooDeep { package: String },
    #[error("{package} contains no boot/vmlinuz-* and lib/modules/<kver>: not a kernel package")]
    NotAKernel { package: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the host's apt sources: {0}")]
    Sources(String),
    #[error("generating modules.dep")]
    Depmod(#[from] DepmodError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Downloads (unless cached) and unpacks `package`, following a metapackage to the real kernel
/// package, from the host's release or, with `suite`, from that suite of it (the kernel of
/// `bookworm-backports`). Returns the directory holding `boot/` and `lib/modules/<kver>/`.
pub fn fetch(cache: &Path, package: &str, suite: Option<&str>) -> Result<PathBuf, KernelError> {
    check_name(package)?;
    let (debs, apt) = match suite {
        None => (cache.join("debs"), Vec::new()),
        Some(suite) => {
            check_name(suite)?;
            (
                cache.join("debs").join(suite),
                apt_with_suite(cache, suite)?,
            )
        }
    };
    fs::create_dir_all(&debs).map_err(io_err(&debs))?;

    let mut name = package.to_owned();
    let mut version: Option<String> = None;
    for _ in 0..MAX_HOPS {
        let deb = ensure_deb_with(&debs, &name, version.as_deref(), &apt)?;
        let depends = deb_field(&deb, "Depends")?;
        match kernel_dependency(&depends) {
            Some((next, next_version)) if next != name => {
                eprintln!(
                    "stork-image: {name} is a metapackage for {next}{}",
                    next_version
                        .as_deref()
                        .map(|v| format!(" {v}"))
                        .unwrap_or_default()
                );
                check_name(&next)?;
                if let Some(v) = &next_version {
                    check_version(v)?;
                }
                name = next;
                version = next_version;
            }
            _ => return unpack(cache, &name, &deb),
        }
    }
    Err(KernelError::TooDeep {
        package: package.to_owned(),
    })
}

/// The first `linux-image-*` alternative in a Depends field, with its version when the
/// relation is `(= version)`.
pub fn kernel_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends
        .split(',')
        .flat_map(|group| group.split('|'))
        .map(str::trim)
        .find_map(|alt| {
            let name_end = alt.find([' ', '(', '[']).unwrap_or(alt.len());
            // An architecture qualifier (`name:any`) is not part of the name.
            let name = alt[..name_end].split(':').next().unwrap_or_default();
            if !name.starts_with("linux-image-") {
                return None;
            }
            let version = alt[name_end..]
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.trim_start().strip_prefix('='))
                .and_then(|r| r.split(')').next())
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty());
            Some((name.to_owned(), version))
        })
}

/// Package names are lowercase alphanumerics and `+-.`, starting alphanumeric; checking keeps
/// a name from being read as an option by apt-get.
fn check_name(name: &str) -> Result<(), KernelError> {
    let ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(KernelError::BadPackageName {
            name: name.to_owned(),
        })
    }
}

fn check_version(version: &str) -> Result<(), KernelError> {
    let ok = version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(KernelError::BadVersion {
            version: version.to_owned(),
        })
    }
}

/// File name prefix apt-get download uses: `name_version_arch.deb`, with an epoch's `:`
/// written as `%3a`.
fn deb_prefix(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{name}_{}_", v.replace(':', "%3a")),
        None => format!("{name}_"),
    }
}

fn cached_debs(debs: &Path, prefix: &str) -> Result<Vec<String>, KernelError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(debs).map_err(io_err(debs))? {
        let entry = entry.map_err(io_err(debs))?;
        if let Some(n) = entry.file_name().to_str()
            && n.starts_with(prefix)
            && n.ends_with(".deb")
        {
            found.push(n.to_owned());
        }
    }
    found.sort();
    Ok(found)
}

/// apt-get's options for a suite of the host's release that its sources lack: the host's
/// mirrors with the suite added, package lists of our own under `CACHE/apt/<suite>` (brought
/// up to date by [`apt_update`] before a download, so a cached kernel needs no mirror), and
/// the suite as the default release so its versions win.
fn apt_with_suite(cache: &Path, suite: &str) -> Result<Vec<String>, KernelError> {
    let release = suite.split('-').next().unwrap_or(suite);
    let mirrors = crate::sources::mirrors(Path::new(crate::sources::APT_DIR), release)
        .map_err(|e| KernelError::Sources(e.to_string()))?
        .with_suite(suite);
    let dir = cache.join("apt").join(suite);
    let parts = dir.join("sources.list.d");
    let lists = dir.join("lists");
    fs::create_dir_all(lists.join("partial")).map_err(io_err(&lists))?;
    fs::create_dir_all(&parts).map_err(io_err(&parts))?;
    let file = parts.join("stork.sources");
    fs::write(&file, mirrors.deb822(&["main".to_owned()])).map_err(io_err(&file))?;
    Ok([
        "Dir::Etc::SourceList=/dev/null".to_owned(),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
        format!("APT::Default-Release={suite}"),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect())
}

/// `apt-get update` of the package lists `apt` (from [`apt_with_suite`]) names.
fn apt_update(apt: &[String]) -> Result<(), KernelError> {
    eprintln!("stork-image: apt-get update (another suite's package lists)");
    let mut cmd = Command::new("apt-get");
    cmd.args(apt).args(["update", "-q"]);
    crate::sources::proxy_env(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| KernelError::Spawn {
            program: "apt-get",
            source,
        })?;
    if !out.status.success() {
        return Err(KernelError::AptGet {
            package: "(update)".to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

pub(crate) fn ensure_deb(
    debs: &Path,
    name: &str,
    version: Option<&str>,
) -> Result<PathBuf, KernelError> {
    ensure_deb_with(debs, name, version, &[])
}

/// [`ensure_deb`] with apt-get options (another suite's package lists).
fn ensure_deb_with(
    debs: &Path,
    name: &str,
    version: Option<&str>,
    apt: &[String],
) -> Result<PathBuf, KernelError> {
    let prefix = deb_prefix(name, version);
    let mut found = cached_debs(debs, &prefix)?;
    if found.is_empty() {
        if !apt.is_empty() {
            apt_update(apt)?;
        }
        let spec = match version {
            Some(v) => format!("{name}={v}"),
            None => name.to_owned(),
        };
        eprintln!("stork-image: apt-get download {spec}");
        let started = Instant::now();
        // apt's progress goes to our stderr: stdout carries only the result path.
        let out = Command::new("apt-get")
            .args(apt)
            .args(["download", "-q", &spec])
            .current_dir(debs)
            .stdin(Stdio::null())
            .stdout(io::stderr())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| KernelError::Spawn {
                program: "apt-get",
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(KernelError::AptGet {
                package: spec,
                status: out.status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        eprint!("{stderr}");
        found = cached_debs(debs, &prefix)?;
        eprintln!(
            "stork-image: downloaded in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    match found.len() {
        0 => Err(KernelError::NotDownloaded {
            package: name.to_owned(),
            dir: debs.to_owned(),
        }),
        1 => {
            let deb = debs.join(&found[0]);
            eprintln!("stork-image: using {}", deb.display());
            Ok(deb)
        }
        _ => Err(KernelError::SeveralCached {
            package: name.to_owned(),
            files: found,
        }),
    }
}

pub(crate) fn run(program: &'static str, args: &[&std::ffi::OsStr]) -> Result<Output, KernelError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| KernelError::Spawn { program, source })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(KernelError::Tool {
            program,
            arg: args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn deb_field(deb: &Path, field: &str) -> Result<String, KernelError> {
    let out = run(
        "dpkg-deb",
        &["-f".as_ref(), deb.as_os_str(), field.as_ref()],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn kernel_versions(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir.join("lib/modules"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found
}

fn has_vmlinuz(dir: &Path) -> bool {
    fs::read_dir(dir.join("boot"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
}

/// Unpacks `deb` into `CACHE/kernel/<name>` (via a temporary directory renamed into place, so
/// an interrupted run leaves nothing half-unpacked) and writes modules.dep, which Debian's
/// postinst would otherwise have made with depmod.
fn unpack(cache: &Path, name: &str, deb: &Path) -> Result<PathBuf, KernelError> {
    let kernels = cache.join("kernel");
    let dest = kernels.join(name);
    let deb_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let marker = dest.join(MARKER);
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == deb_name) {
        eprintln!("stork-image: {} already unpacked", dest.display());
        return Ok(dest);
    }

    let tmp = kernels.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    eprintln!("stork-image: unpacking {deb_name}");
    let started = Instant::now();
    run("dpkg", &["-x".as_ref(), deb.as_os_str(), tmp.as_os_str()])?;
    eprintln!(
        "stork-image: unpacked in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let versions = kernel_versions(&tmp);
    if versions.is_empty() || !has_vmlinuz(&tmp) {
        return Err(KernelError::NotAKernel {
            package: name.to_owned(),
        });
    }
    for moddir in versions {
        if moddir.join("modules.dep").exists() {
            continue;
        }
        let started = Instant::now();
        let index = depmod::scan(&moddir)?;
        depmod::write(&moddir, &index)?;
        eprintln!(
            "stork-image: modules.dep for {} modules in {:.1} s",
            depmod::count(&index),
            started.elapsed().as_secs_f64()
        );
    }
    fs::write(tmp.join(MARKER), format!("{deb_name}\n")).map_err(io_err(&tmp))?;
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_first_linux_image_alternative() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-amd64 (= 6.1.192-2)"),
            Some((
                "linux-image-6.1.0-56-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
        assert_eq!(
            kernel_dependency(
                "kmod, linux-base (>= 4.3~), linux-image-6.1.0-9-amd64-unsigned (>= 6.1) | linux-image-6.1.0-9-amd64"
            ),
            Some(("linux-image-6.1.0-9-amd64-unsigned".into(), None))
        );
        assert_eq!(
            kernel_dependency("foo | linux-image-x:any"),
            Some(("linux-image-x".into(), None))
        );
        assert_eq!(
            kernel_dependency("kmod, linux-base (>= 4.3~), initramfs-tools | linux-initramfs-tool"),
            None
        );
        assert_eq!(kernel_dependency(""), None);
    }

    #[test]
    fn names_and_versions_are_checked() {
        for ok in ["linux-image-amd64", "linux-image-6.1.0-56-amd64", "g++"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-o", "--option=x", "Linux", "a b", "a/b", "x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_version("1:6.1.192-2~bpo12+1").is_ok());
        assert!(check_version("-6").is_err());
        assert!(check_version("6 1").is_err());
    }

    #[test]
    fn deb_file_names_escape_the_epoch() {
        assert_eq!(
            deb_prefix("linux-image-x", Some("1:6.1-2")),
            "linux-image-x_1%3a6.1-2_"
        );
        assert_eq!(deb_prefix("linux-image-amd64", None), "linux-image-amd64_");
    }

    #[test]
    fn cache_lookup_matches_whole_package_names() {
        let tmp = tempfile::tempdir().unwrap();
        for f in [
            "linux-image-amd64_6.1.192-2_amd64.deb",
            "linux-image-amd64-dbg_6.1.192-2_amd64.deb",
            "linux-image-amd64_6.1.192-2_amd64.deb.partial",
        ] {
            fs::write(tmp.path().join(f), b"").unwrap();
        }
        assert_eq!(
            cached_debs(tmp.path(), "linux-image-amd64_").unwrap(),
            ["linux-image-amd64_6.1.192-2_amd64.deb"]
        );
        assert!(
            cached_debs(
                tmp.path(),
                &deb_prefix("linux-image-amd64", Some("6.1.1-1"))
            )
            .unwrap()
            .is_empty()
        );
        let path = ensure_deb(tmp.path(), "linux-image-amd64", None).unwrap();
        assert!(path.ends_with("linux-image-amd64_6.1.192-2_amd64.deb"));
        fs::write(
            tmp.path().join("linux-image-amd64_6.1.200-1_amd64.deb"),
            b"",
        )
        .unwrap();
        assert!(matches!(
            ensure_deb(tmp.path(), "linux-image-amd64", None),
            Err(KernelError::SeveralCached { .. })
        ));
    }
}
