//! Which kernel modules go into the initrd, and in what order the agent loads them.
//!
//! The index comes from `lib/modules/<kver>/modules.dep` (plus `modules.softdep` and
//! `modules.builtin` when present), or from [`crate::depmod::scan`] when the tree has no
//! `modules.dep`. Module names use `_` internally; `-` in a requested name or a file name is the
//! same module, as it is for modprobe.
//!
//! Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are kept compressed: the agent hands them
//! to `finit_module` with `MODULE_INIT_COMPRESSED_FILE`, which needs the kernel's matching
//! `CONFIG_MODULE_COMPRESS_*` decompressor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

/// Drivers and filesystems the agent needs on common virtual and physical machines.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_net",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "e1000",
    "e1000e",
    "ahci",
    "sd_mod",
    "nvme",
    "squashfs",
    "overlay",
    "loop",
    "ext4",
    "vfat",
    // Mounting FAT (the ESP, on an install from the root tar) loads its default codepage and
    // I/O charset, modules in Debian's kernel (CONFIG_FAT_DEFAULT_CODEPAGE=437, _IOCHARSET=ascii).
    "nls_cp437",
    "nls_ascii",
    // The deployed disk's UEFI boot entry (the agent writes EFI variables through it).
    "efivarfs",
    // ext4 asks for "crypto-crc32c" as a softdep, an alias this index does not resolve.
    "crc32c_generic",
    "af_packet",
];

/// Modules in the initrd that the agent loads only when a task needs them: a layout's
/// software RAID, LVM (device-mapper), XFS and btrfs. Not at boot: raid456 and btrfs pull in
/// raid6_pq and xor, which time their algorithms as they load (seconds under TCG, measured
/// in docs/measurements.md), and most boots (commission, release, a raw image) need none.
pub const ON_DEMAND_MODULES: &[&str] = &[
    "raid0", "raid1", "raid10", "raid456", "dm_mod", "xfs", "btrfs",
];

const MODULE_SUFFIXES: &[&str] = &[".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} line {line}: {reason}")]
    Syntax {
        file: &'static str,
        line: usize,
        reason: &'static str,
    },
    #[error("module path {path:?} is not a relative path ending in .ko, .ko.xz, .ko.zst or .ko.gz")]
    BadPath { path: String },
    #[error("module {name} appears twice: {first} and {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    #[error("module {module} depends on {dependency}, which has no modules.dep entry")]
    MissingDependency { module: String, dependency: String },
    #[error("no kernel module or built-in named {name:?}")]
    Unknown { name: String },
    #[error("module dependency cycle among: {}", modules.join(", "))]
    Cycle { modules: Vec<String> },
}

/// One loadable module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalised name (`_` for `-`).
    pub name: String,
    /// Path relative to `lib/modules/<kver>`, as modules.dep spells it.
    pub path: String,
    /// Hard dependencies, by name.
    pub deps: Vec<String>,
}

/// What a kernel's module tree offers.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    modules: BTreeMap<String, Module>,
    /// `softdep NAME pre: ...` targets, by module name; targets may name nothing loadable.
    softdeps_pre: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// The modules to ship, dependencies first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub load_order: Vec<Module>,
    /// Requested names that are compiled into the kernel and so need nothing.
    pub builtin: Vec<String>,
}

/// `-` and `_` are interchangeable in module names.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name from its path: file name without the `.ko[.xz|.zst|.gz]` suffix, normalised.
pub fn name_from_path(path: &str) -> Result<String, ModulesError> {
    let bad = || ModulesError::BadPath {
        path: path.to_owned(),
    };
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    let file = p.file_name().and_then(|f| f.to_str()).ok_or_else(bad)?;
    let stem = MODULE_SUFFIXES
        .iter()
        .find_map(|s| file.strip_suffix(s))
        .filter(|s| !s.is_empty())
        .ok_or_else(bad)?;
    Ok(normalise(stem))
}

impl ModuleIndex {
    /// Reads the index files of `moddir` (`lib/modules/<kver>`). Missing `modules.softdep` and
    /// `modules.builtin` are taken as empty; a missing `modules.dep` is reported as `Ok(None)`.
    pub fn load(moddir: &Path) -> Result<Option<Self>, ModulesError> {
        let Some(dep) = read_optional(&moddir.join("modules.dep"))? else {
            return Ok(None);
        };
        let softdep = read_optional(&moddir.join("modules.softdep"))?;
        let builtin = read_optional(&moddir.join("modules.builtin"))?;
        Self::parse(&dep, softdep.as_deref(), builtin.as_deref()).map(Some)
    }

    /// Parses the text of modules.dep, modules.softdep and modules.builtin.
    pub fn parse(
        dep: &str,
        softdep: Option<&str>,
        builtin: Option<&str>,
    ) -> Result<Self, ModulesError> {
        let mut raw = Vec::new();
        for (i, line) in dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or(ModulesError::Syntax {
                file: "modules.dep",
                line: i + 1,
                reason: "expected `path: deps`",
            })?;
            let deps = deps
                .split_whitespace()
                .map(name_from_path)
                .collect::<Result<Vec<_>, _>>()?;
            raw.push(Module {
                name: name_from_path(path.trim())?,
                path: path.trim().to_owned(),
                deps,
            });
        }
        let mut index = Self::from_modules(raw)?;
        if let Some(text) = softdep {
            index.softdeps_pre = parse_softdeps(text)?;
        }
        if let Some(text) = builtin {
            index.builtin = parse_builtin(text)?;
        }
        Ok(index)
    }

    /// Builds an index from modules already known (e.g. read from each module's .modinfo).
    pub fn from_modules(modules: Vec<Module>) -> Result<Self, ModulesError> {
        let mut map: BTreeMap<String, Module> = BTreeMap::new();
        for m in modules {
            if let Some(prev) = map.get(&m.name) {
                return Err(ModulesError::Duplicate {
                    name: m.name,
                    first: prev.path.clone(),
                    second: m.path,
                });
            }
            map.insert(m.name.clone(), m);
        }
        for m in map.values() {
            if let Some(d) = m.deps.iter().find(|d| !map.contains_key(*d)) {
                return Err(ModulesError::MissingDependency {
                    module: m.name.clone(),
                    dependency: d.clone(),
                });
            }
        }
        Ok(Self {
            modules: map,
            ..Self::default()
        })
    }

    pub fn set_softdeps_pre(&mut self, softdeps: BTreeMap<String, Vec<String>>) {
        self.softdeps_pre = softdeps;
    }

    pub fn set_builtin(&mut self, builtin: BTreeSet<String>) {
        self.builtin = builtin;
    }

    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.values()
    }

    pub fn softdeps_pre(&self) -> &BTreeMap<String, Vec<String>> {
        &self.softdeps_pre
    }

    pub fn get(&self, name: &str) -> Option<&Module> {
        self.modules.get(&normalise(name))
    }

    /// Loadable modules this one must follow: hard deps, then softdep `pre:` targets that exist
    /// as modules (a softdep on an alias or an absent module is skipped, as modprobe would
    /// carry on without it).
    fn before(&self, name: &str, softdeps: bool) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let Some(m) = self.modules.get(name) {
            out.extend(m.deps.iter().map(String::as_str));
        }
        if let Some(pre) = self.softdeps_pre.get(name).filter(|_| softdeps) {
            out.extend(
                pre.iter()
                    .map(String::as_str)
                    .filter(|p| self.modules.contains_key(*p)),
            );
        }
        out
    }

    /// The closure of `requested` over dependencies and softdeps, in load order: every module
    /// after all it depends on, ties broken by name so the order is the same on every run.
    pub fn resolve<S: AsRef<str>>(&self, requested: &[S]) -> Result<Resolution, ModulesError> {
        let mut roots = BTreeSet::new();
        let mut builtin = BTreeSet::new();
        for r in requested {
            let name = normalise(r.as_ref().trim());
            if name.is_empty() {
                continue;
            }
            if self.modules.contains_key(&name) {
                roots.insert(name);
            } else if self.builtin.contains(&name) {
                builtin.insert(name);
            } else {
                return Err(ModulesError::Unknown {
                    name: r.as_ref().trim().to_owned(),
                });
            }
        }

        Ok(Resolution {
            load_order: self.load_order(roots, true)?,
            builtin: builtin.into_iter().collect(),
        })
    }

    /// modules.dep text for `modules` as depmod writes it: lines sorted by path, each with the
    /// module's full dependency chain, the one loaded last first (modprobe walks it backwards).
    pub fn render_modules_dep<'a>(
        &self,
        modules: impl IntoIterator<Item = &'a Module>,
    ) -> Result<String, ModulesError> {
        let mut by_path: Vec<&Module> = modules.into_iter().collect();
        by_path.sort_by(|a, b| a.path.cmp(&b.path));
        let mut out = String::new();
        for m in by_path {
            out.push_str(&m.path);
            out.push(':');
            for d in self.hard_dependencies(&m.name)?.iter().rev() {
                if d.name != m.name {
                    out.push(' ');
                    out.push_str(&d.path);
                }
            }
            out.push('\n');
        }
        Ok(out)
    }

    /// Hard dependencies of one module, transitively, in load order (the module itself last).
    pub fn hard_dependencies(&self, name: &str) -> Result<Vec<Module>, ModulesError> {
        self.load_order(BTreeSet::from([normalise(name)]), false)
    }

    fn load_order(
        &self,
        roots: BTreeSet<String>,
        softdeps: bool,
    ) -> Result<Vec<Module>, ModulesError> {
        let mut closure = BTreeSet::new();
        let mut stack: Vec<String> = roots.into_iter().collect();
        while let Some(name) = stack.pop() {
            if closure.insert(name.clone()) {
                stack.extend(self.before(&name, softdeps).into_iter().map(str::to_owned));
            }
        }

        // Kahn's algorithm over the closure; a BTreeSet of ready names gives the tie-break.
        let mut waiting_on: BTreeMap<&str, BTreeSet<&str>> = closure
            .iter()
            .map(|n| (n.as_str(), self.before(n, softdeps).into_iter().collect()))
            .collect();
        let mut ready: BTreeSet<&str> = waiting_on
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(n, _)| *n)
            .collect();
        for n in &ready {
            waiting_on.remove(n);
        }
        let mut load_order = Vec::with_capacity(closure.len());
        while let Some(next) = ready.pop_first() {
            if let Some(m) = self.modules.get(next) {
                load_order.push(m.clone());
            }
            let mut now_ready = Vec::new();
            for (n, deps) in waiting_on.iter_mut() {
                if deps.remove(next) && deps.is_empty() {
                    now_ready.push(*n);
                }
            }
            for n in now_ready {
                waiting_on.remove(n);
                ready.insert(n);
            }
        }
        if !waiting_on.is_empty() {
            return Err(ModulesError::Cycle {
                modules: waiting_on.keys().map(|s| (*s).to_owned()).collect(),
            });
        }
        Ok(load_order)
    }
}

/// Names of the modules compiled into the kernel, one path per line in modules.builtin.
pub fn parse_builtin(text: &str) -> Result<BTreeSet<String>, ModulesError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(name_from_path)
        .collect()
}

/// `softdep MODULE pre: a b post: c` lines; only `pre:` targets matter for load order.
pub fn parse_softdeps(text: &str) -> Result<BTreeMap<String, Vec<String>>, ModulesError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("softdep") => {}
            // Comments, blank lines and other modprobe.d commands say nothing about softdeps.
            _ => continue,
        }
        let module = words.next().ok_or(ModulesError::Syntax {
            file: "modules.softdep",
            line: i + 1,
            reason: "softdep without a module name",
        })?;
        let mut in_pre = false;
        for w in words {
            match w {
                "pre:" => in_pre = true,
                "post:" => in_pre = false,
                target if in_pre => out
                    .entry(normalise(module))
                    .or_default()
                    .push(normalise(target)),
                _ => {}
            }
        }
    }
    Ok(out)
}

fn read_optional(path: &Path) -> Result<Option<String>, ModulesError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModulesError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz kernel/lib/crc16.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/crypto/crc32c_generic.ko.zst:
kernel/arch/x86/events/amd/amd-uncore.ko:
";
    const SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crc32c-generic crypto-crc32c post: never_here
softdep virtio_net pre: absent_module
";
    const BUILTIN: &str = "kernel/net/packet/af_packet.ko\nkernel/fs/fat/fat.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, Some(SOFTDEP), Some(BUILTIN)).unwrap()
    }

    fn names(r: &Resolution) -> Vec<&str> {
        r.load_order.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn names_come_from_paths_with_any_suffix() {
        assert_eq!(
            name_from_path("kernel/a/virtio_net.ko").unwrap(),
            "virtio_net"
        );
        assert_eq!(
            name_from_path("kernel/a/amd-uncore.ko.xz").unwrap(),
            "amd_uncore"
        );
        assert_eq!(name_from_path("b.ko.zst").unwrap(), "b");
        assert_eq!(name_from_path("b.ko.gz").unwrap(), "b");
        for bad in [
            "",
            "kernel/a.o",
            "/abs/a.ko",
            "../a.ko",
            "kernel/.ko",
            "a.ko.bz2",
        ] {
            assert!(
                matches!(name_from_path(bad), Err(ModulesError::BadPath { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_modules_dep() {
        let idx = index();
        let ext4 = idx.get("ext4").unwrap();
        assert_eq!(ext4.path, "kernel/fs/ext4/ext4.ko.xz");
        assert_eq!(ext4.deps, ["jbd2", "mbcache", "crc16"]);
        assert!(idx.get("failover").unwrap().deps.is_empty());
        assert_eq!(idx.get("amd-uncore").unwrap().name, "amd_uncore");
        assert_eq!(
            idx.softdeps_pre()["ext4"],
            ["crc32c_generic", "crypto_crc32c"]
        );
    }

    #[test]
    fn rejects_malformed_modules_dep() {
        let e = ModuleIndex::parse("kernel/a.ko\n", None, None).unwrap_err();
        assert!(matches!(e, ModulesError::Syntax { line: 1, .. }), "{e}");
        let e = ModuleIndex::parse("kernel/a.ko: kernel/b.ko\n", None, None).unwrap_err();
        assert!(
            matches!(&e, ModulesError::MissingDependency { module, dependency } if module == "a" && dependency == "b"),
            "{e}"
        );
        let e = ModuleIndex::parse("x/a.ko:\ny/a.ko.xz:\n", None, None).unwrap_err();
        assert!(matches!(e, ModulesError::Duplicate { .. }), "{e}");
    }

    #[test]
    fn closure_puts_dependencies_first_with_name_tie_break() {
        let r = index().resolve(&["virtio_net"]).unwrap();
        assert_eq!(
            names(&r),
            [
                "failover",
                "net_failover",
                "virtio",
                "virtio_ring",
                "virtio_net"
            ]
        );
        assert!(r.builtin.is_empty());
    }

    #[test]
    fn order_is_the_same_whatever_the_request_order() {
        let a = index()
            .resolve(&["virtio_pci", "virtio_net", "ext4"])
            .unwrap();
        let b = index()
            .resolve(&["ext4", "virtio_net", "virtio_pci"])
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            names(&a),
            [
                "crc16",
                "crc32c_generic",
                "failover",
                "jbd2",
                "mbcache",
                "ext4",
                "net_failover",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio_net",
                "virtio_pci",
            ]
        );
    }

    #[test]
    fn softdeps_that_exist_are_pulled_in_and_loaded_first() {
        let r = index().resolve(&["ext4"]).unwrap();
        let order = names(&r);
        assert!(order.contains(&"crc32c_generic"), "{order:?}");
        let pos = |n: &str| order.iter().position(|m| *m == n).unwrap();
        assert!(pos("crc32c_generic") < pos("ext4"));
        for dep in ["jbd2", "mbcache", "crc16"] {
            assert!(pos(dep) < pos("ext4"), "{dep} in {order:?}");
        }
        // Post softdeps and softdeps on aliases or absent modules add nothing.
        assert_eq!(order.len(), 5, "{order:?}");
    }

    #[test]
    fn dash_and_underscore_name_the_same_module() {
        let idx = index();
        let a = idx.resolve(&["amd-uncore", "crc32c-generic"]).unwrap();
        let b = idx.resolve(&["amd_uncore", "crc32c_generic"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(names(&a), ["amd_uncore", "crc32c_generic"]);
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let r = index()
            .resolve(&["af_packet", "af-packet", "virtio"])
            .unwrap();
        assert_eq!(names(&r), ["virtio"]);
        assert_eq!(r.builtin, ["af_packet"]);
    }

    #[test]
    fn unknown_module_is_an_error_naming_it() {
        let e = index().resolve(&["virtio", "no-such-thing"]).unwrap_err();
        assert!(
            matches!(&e, ModulesError::Unknown { name } if name == "no-such-thing"),
            "{e}"
        );
        assert!(e.to_string().contains("no-such-thing"));
    }

    #[test]
    fn empty_names_are_ignored() {
        let r = index().resolve(&["", " "]).unwrap();
        assert!(r.load_order.is_empty());
    }

    #[test]
    fn softdep_cycles_are_reported() {
        let mut idx = ModuleIndex::parse("a.ko:\nb.ko: a.ko\n", None, None).unwrap();
        idx.set_softdeps_pre(parse_softdeps("softdep a pre: b\n").unwrap());
        let e = idx.resolve(&["b"]).unwrap_err();
        assert!(
            matches!(&e, ModulesError::Cycle { modules } if modules == &["a", "b"]),
            "{e}"
        );
    }
}
