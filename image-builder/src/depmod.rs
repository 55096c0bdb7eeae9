//! A small stand-in for kmod's `depmod`: Debian's kernel package ships no `modules.dep` (its
//! postinst runs depmod), and the build host need not have kmod. Dependencies come from each
//! module's `.modinfo` `depends=`, which modpost computed from the same symbol tables depmod
//! reads.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use crate::modinfo::{self, ModinfoError};
use crate::modules::{self, Module, ModuleIndex, ModulesError};

#[derive(Debug, thiserror::Error)]
pub enum DepmodError {
    #[error("listing {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading .modinfo of {path}")]
    Modinfo {
        path: PathBuf,
        #[source]
        source: ModinfoError,
    },
    #[error(
        "{path}: cannot read .modinfo of a gzip compressed module; generate modules.dep with kmod's depmod"
    )]
    Compressed { path: PathBuf },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Modules(#[from] ModulesError),
}

/// Builds the module index of `moddir` (`lib/modules/<kver>`) from the modules themselves.
pub fn scan(moddir: &Path) -> Result<ModuleIndex, DepmodError> {
    let mut files = Vec::new();
    walk(moddir, moddir, &mut files)?;
    files.sort();

    let mut found = Vec::with_capacity(files.len());
    let mut softdeps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rel in files {
        let path = moddir.join(&rel);
        let info = read_modinfo(&path)?;
        let name = modules::name_from_path(&rel)?;
        let pre: Vec<String> = info
            .softdeps_pre()
            .iter()
            .map(|s| modules::normalise(s))
            .collect();
        if !pre.is_empty() {
            softdeps.insert(name.clone(), pre);
        }
        found.push(Module {
            name,
            path: rel,
            deps: info
                .depends()
                .iter()
                .map(|s| modules::normalise(s))
                .collect(),
        });
    }
    let mut index = ModuleIndex::from_modules(found)?;
    index.set_softdeps_pre(softdeps);
    let builtin_path = moddir.join("modules.builtin");
    match fs::read_to_string(&builtin_path) {
        Ok(text) => index.set_builtin(modules::parse_builtin(&text)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DepmodError::Read {
                path: builtin_path,
                source,
            });
        }
    }
    Ok(index)
}

/// Writes `modules.dep` and `modules.softdep` as depmod would: each module's full dependency
/// list, the one to load last first (modprobe walks the list backwards).
pub fn write(moddir: &Path, index: &ModuleIndex) -> Result<(), DepmodError> {
    let dep = index.render_modules_dep(index.modules())?;
    let mut softdep = String::from("# Soft dependencies from each module's .modinfo.\n");
    for (name, pre) in index.softdeps_pre() {
        softdep.push_str(&format!("softdep {name} pre: {}\n", pre.join(" ")));
    }
    write_file(&moddir.join("modules.dep"), dep.as_bytes())?;
    write_file(&moddir.join("modules.softdep"), softdep.as_bytes())?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DepmodError> {
    let err = |source| DepmodError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = File::create(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

fn read_modinfo(path: &Path) -> Result<modinfo::Modinfo, DepmodError> {
    let name = path.to_string_lossy();
    let read_err = |source| DepmodError::Read {
        path: path.to_owned(),
        source,
    };
    let info_err = |source| DepmodError::Modinfo {
        path: path.to_owned(),
        source,
    };
    if name.ends_with(".ko") {
        modinfo::read(File::open(path).map_err(read_err)?).map_err(info_err)
    } else if name.ends_with(".ko.zst") {
        let raw = zstd::decode_all(File::open(path).map_err(read_err)?).map_err(read_err)?;
        modinfo::read(Cursor::new(raw)).map_err(info_err)
    } else if name.ends_with(".ko.xz") {
        // Debian's kernels from 6.12 (bookworm-backports, trixie) ship xz modules.
        let mut raw = Vec::new();
        liblzma::read::XzDecoder::new(File::open(path).map_err(read_err)?)
            .read_to_end(&mut raw)
            .map_err(read_err)?;
        modinfo::read(Cursor::new(raw)).map_err(info_err)
    } else {
        Err(DepmodError::Compressed {
            path: path.to_owned(),
        })
    }
}

/// Module files under `dir`, as paths relative to `root`. Symlinks are not followed (a
/// `build` link into kernel headers is no module).
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), DepmodError> {
    let list_err = |source| DepmodError::List {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let kind = entry.file_type().map_err(list_err)?;
        let path = entry.path();
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file()
            && let Ok(rel) = path.strip_prefix(root)
            && let Some(rel) = rel.to_str()
            && modules::name_from_path(rel).is_ok()
        {
            out.push(rel.to_owned());
        }
    }
    Ok(())
}

/// How many modules an index knows, for progress messages.
pub fn count(index: &ModuleIndex) -> usize {
    index.modules().count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modinfo::fake_elf;

    fn fake_module(dir: &Path, rel: &str, modinfo: &str) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let elf = fake_elf(&[(".modinfo", modinfo.replace(';', "\0").as_bytes())]);
        if rel.ends_with(".zst") {
            fs::write(path, zstd::encode_all(elf.as_slice(), 3).unwrap()).unwrap();
        } else if rel.ends_with(".xz") {
            let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
            std::io::Write::write_all(&mut xz, &elf).unwrap();
            fs::write(path, xz.finish().unwrap()).unwrap();
        } else {
            fs::write(path, elf).unwrap();
        }
    }

    #[test]
    fn scans_modinfo_and_writes_depmod_style_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fake_module(
            d,
            "kernel/fs/ext4/ext4.ko",
            "softdep=pre: crypto-crc32c;depends=jbd2,mbcache;name=ext4",
        );
        fake_module(d, "kernel/fs/jbd2/jbd2.ko", "depends=;name=jbd2");
        fake_module(d, "kernel/fs/mbcache.ko.zst", "depends=jbd2;name=mbcache");
        fake_module(d, "kernel/x/amd-uncore.ko.xz", "depends=;name=amd_uncore");
        fs::write(
            d.join("modules.builtin"),
            "kernel/net/packet/af_packet.ko\n",
        )
        .unwrap();
        fs::write(d.join("kernel/notes.txt"), "not a module").unwrap();

        let index = scan(d).unwrap();
        assert_eq!(count(&index), 4);
        write(d, &index).unwrap();
        assert_eq!(
            fs::read_to_string(d.join("modules.dep")).unwrap(),
            "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko.zst kernel/fs/jbd2/jbd2.ko\n\
             kernel/fs/jbd2/jbd2.ko:\n\
             kernel/fs/mbcache.ko.zst: kernel/fs/jbd2/jbd2.ko\n\
             kernel/x/amd-uncore.ko.xz:\n"
        );
        // What was written parses back to the same index.
        let again = ModuleIndex::load(d).unwrap().unwrap();
        assert_eq!(again.modules().count(), 4);
        assert_eq!(again.softdeps_pre()["ext4"], ["crypto_crc32c"]);
        let r = again.resolve(&["ext4", "af-packet"]).unwrap();
        let names: Vec<_> = r.load_order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["jbd2", "mbcache", "ext4"]);
        assert_eq!(r.builtin, ["af_packet"]);
    }

    #[test]
    fn gzip_modules_need_real_depmod() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("kernel")).unwrap();
        fs::write(tmp.path().join("kernel/a.ko.gz"), b"\x1f\x8b\x08").unwrap();
        assert!(matches!(
            scan(tmp.path()),
            Err(DepmodError::Compressed { .. })
        ));
    }

    #[test]
    fn missing_dependency_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        fake_module(tmp.path(), "kernel/a.ko", "depends=b;name=a");
        let e = scan(tmp.path()).unwrap_err();
        assert!(e.to_string().contains('b'), "{e}");
    }
}
