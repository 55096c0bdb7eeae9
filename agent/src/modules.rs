//! Loading the kernel modules the image builder listed, in its order: the boot list at once,
//! the on-demand list's modules when a task needs them (stage 1 carries their files into the
//! ephemeral root, [`carry_on_demand`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

use crate::console::say;

/// One absolute module path per line, dependencies first.
pub const LOAD_LIST: &str = "/etc/stork/modules.load";
/// A line per module the agent loads only when a task needs it: its name, then the files
/// to load for it, dependencies first.
pub const ON_DEMAND_LIST: &str = "/etc/stork/modules.ondemand";

const STEP: &str = "load-modules";

/// `MODULE_INIT_COMPRESSED_FILE` from `<linux/module.h>` (Linux 5.17+): the kernel decompresses
/// the image itself. libc and nix do not name it yet.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Module paths from the load list; blank lines and `#` comments are skipped.
pub fn parse_load_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// Flags for `finit_module`: compressed images are handed to the kernel as they are.
fn init_flags(path: &Path) -> ModuleInitFlags {
    let compressed = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "xz" | "zst" | "gz"));
    if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    }
}

/// The on-demand list: each module's name with its files in load order.
pub fn parse_on_demand(text: &str) -> Vec<(String, Vec<PathBuf>)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?.to_string();
            Some((name, words.map(PathBuf::from).collect()))
        })
        .collect()
}

/// Copies the on-demand list and every file it names into `root` at the same paths, so that
/// stage 2 can load them there.
pub fn carry_on_demand(root: &Path) -> std::io::Result<usize> {
    let text = match std::fs::read_to_string(ON_DEMAND_LIST) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for path in parse_on_demand(&text)
        .into_iter()
        .flat_map(|(_, files)| files)
    {
        let to = inside(&path);
        if to.exists() {
            continue;
        }
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(&path, &to)?;
        n += 1;
    }
    let list = inside(Path::new(ON_DEMAND_LIST));
    if let Some(dir) = list.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(list, text)?;
    Ok(n)
}

/// Loads the on-demand modules `names` (with their dependencies, each once) from
/// [`ON_DEMAND_LIST`]; a name the list lacks, or a module that fails, is an error.
pub fn load_on_demand(names: &[&str]) -> anyhow::Result<Summary> {
    let text = std::fs::read_to_string(ON_DEMAND_LIST)
        .map_err(|e| anyhow::anyhow!("reading {ON_DEMAND_LIST}: {e}"))?;
    let listed = parse_on_demand(&text);
    let mut paths: Vec<PathBuf> = Vec::new();
    for name in names {
        let (_, files) = listed.iter().find(|(n, _)| n == name).ok_or_else(|| {
            anyhow::anyhow!("module {name} is not in the initrd ({ON_DEMAND_LIST})")
        })?;
        for f in files {
            if !paths.contains(f) {
                paths.push(f.clone());
            }
        }
    }
    let s = load_all(&paths);
    if s.failed > 0 {
        anyhow::bail!(
            "{} of the modules for {} failed to load (the console says which)",
            s.failed,
            names.join(", ")
        );
    }
    Ok(s)
}

#[derive(Debug, Default)]
pub struct Summary {
    pub listed: usize,
    pub loaded: usize,
    pub already: usize,
    /// Refused with ENODEV: for hardware or firmware this machine lacks (efivarfs on BIOS).
    pub absent: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

/// Loads every module, warning about (and skipping) the ones that fail: a driver for
/// hardware this machine lacks refuses to load, and that must not stop the agent.
pub fn load_all(paths: &[PathBuf]) -> Summary {
    let start = Instant::now();
    let mut s = Summary {
        listed: paths.len(),
        ..Summary::default()
    };
    for path in paths {
        match load_one(path) {
            Ok(()) => s.loaded += 1,
            Err(LoadError::Init(Errno::EEXIST)) => s.already += 1,
            Err(LoadError::Init(Errno::ENODEV)) => s.absent += 1,
            Err(e) => {
                s.failed += 1;
                say!(STEP, "warning: {}: {}", path.display(), e.describe(path));
            }
        }
    }
    s.elapsed = start.elapsed();
    s
}

enum LoadError {
    Open(std::io::Error),
    Init(Errno),
}

impl LoadError {
    fn describe(&self, path: &Path) -> String {
        match self {
            LoadError::Open(e) => format!("open: {e}"),
            // A kernel without CONFIG_MODULE_DECOMPRESS refuses the flag; say what to do about it.
            LoadError::Init(e @ Errno::EOPNOTSUPP) if !init_flags(path).is_empty() => {
                format!("{e} (kernel cannot decompress modules; ship them uncompressed)")
            }
            LoadError::Init(e) => e.to_string(),
        }
    }
}

fn load_one(path: &Path) -> Result<(), LoadError> {
    let file = File::open(path).map_err(LoadError::Open)?;
    finit_module(&file, c"", init_flags(path)).map_err(LoadError::Init)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_list_skips_blanks_and_comments() {
        let text = "# generated by stork-image-builder\n\
                    /lib/modules/6.1.0-9-amd64/kernel/drivers/virtio/virtio.ko.xz\n\
                    \n\
                    \t/lib/modules/6.1.0-9-amd64/kernel/drivers/net/virtio_net.ko  \n\
                      # indented comment\n\
                    /lib/modules/6.1.0-9-amd64/kernel/drivers/block/virtio_blk.ko.zst\n";
        assert_eq!(
            parse_load_list(text),
            [
                "/lib/modules/6.1.0-9-amd64/kernel/drivers/virtio/virtio.ko.xz",
                "/lib/modules/6.1.0-9-amd64/kernel/drivers/net/virtio_net.ko",
                "/lib/modules/6.1.0-9-amd64/kernel/drivers/block/virtio_blk.ko.zst",
            ]
            .map(PathBuf::from)
        );
        assert!(parse_load_list("\n# nothing\n   \n").is_empty());
    }

    #[test]
    fn on_demand_list_names_each_module_with_its_files() {
        let text = "# written by stork-image\nxfs /lib/m/libcrc32c.ko /lib/m/xfs.ko\n\ndm_mod /lib/m/dm-mod.ko\nraid1\n";
        assert_eq!(
            parse_on_demand(text),
            [
                (
                    "xfs".to_string(),
                    vec![
                        PathBuf::from("/lib/m/libcrc32c.ko"),
                        PathBuf::from("/lib/m/xfs.ko")
                    ]
                ),
                (
                    "dm_mod".to_string(),
                    vec![PathBuf::from("/lib/m/dm-mod.ko")]
                ),
                ("raid1".to_string(), vec![]),
            ]
        );
    }

    #[test]
    fn compressed_modules_get_the_kernel_decompress_flag() {
        for p in ["a.ko.xz", "a.ko.zst", "a.ko.gz"] {
            assert_eq!(
                init_flags(Path::new(p)).bits(),
                MODULE_INIT_COMPRESSED_FILE,
                "{p}"
            );
        }
        assert!(init_flags(Path::new("a.ko")).is_empty());
    }
}
