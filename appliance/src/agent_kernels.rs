//! The kernels the agent boots with: the configured `boot.kernel` and `boot.initrd` (the
//! default) and each `kernels/<name>/` under the boot root that `stork-image initrd --out`
//! wrote (`vmlinuz`, `initrd.img` and the `manifest.json` naming the kernel's version, as
//! `cargo xtask images` builds Debian's backports kernel beside the stable one). A machine's
//! agent boots the default unless the machine's minimum kernel asks for a newer one, then the
//! oldest that is: the rule a deploy's kernel follows (`stork_proto::kernel::choose`), so new
//! hardware whose drivers only a newer kernel has commissions, deploys and erases with it.
//!
//! Read once at start-up: a kernel added later is booted after a restart.

use std::path::Path;

use stork_proto::kernel::{ImageKernel, choose};

/// The files the boot manifest names the kernel version in (`inputs.kernel_version`).
const MANIFEST: &str = "manifest.json";
/// Under the boot root: one directory per further kernel.
const DIR: &str = "kernels";

/// One kernel the agent can boot, its files relative to the boot root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKernel {
    pub name: String,
    /// Its `uname -r`; empty when its manifest does not say.
    pub version: String,
    pub kernel: String,
    pub initrd: String,
}

/// Every kernel the agent can boot, the default first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKernels {
    list: Vec<AgentKernel>,
}

impl AgentKernel {
    /// The configured default: `kernel` and `initrd` under the boot root, no known version.
    pub fn configured(kernel: &str, initrd: &str) -> Self {
        Self {
            name: "default".into(),
            version: String::new(),
            kernel: kernel.into(),
            initrd: initrd.into(),
        }
    }
}

impl AgentKernels {
    /// The configured default only.
    pub fn configured(kernel: &str, initrd: &str) -> Self {
        Self {
            list: vec![AgentKernel::configured(kernel, initrd)],
        }
    }

    /// The default (`kernel`, `initrd`, its version from the boot root's manifest when that
    /// names these files) and every complete `kernels/<name>/` under `boot_dir`, by name.
    pub fn discover(boot_dir: &Path, kernel: &str, initrd: &str) -> Self {
        let mut me = Self::configured(kernel, initrd);
        if let Some(v) = version_of(&boot_dir.join(MANIFEST), kernel) {
            me.list[0].version = v;
        }
        let mut more: Vec<AgentKernel> = std::fs::read_dir(boot_dir.join(DIR))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                // Names go into boot scripts and GRUB configurations: plain ones only.
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    || name.starts_with('.')
                {
                    return None;
                }
                let dir = e.path();
                let version = version_of(&dir.join(MANIFEST), "vmlinuz")?;
                (dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file()).then(|| {
                    AgentKernel {
                        kernel: format!("{DIR}/{name}/vmlinuz"),
                        initrd: format!("{DIR}/{name}/initrd.img"),
                        name,
                        version,
                    }
                })
            })
            .collect();
        more.sort_by(|a, b| a.name.cmp(&b.name));
        me.list.extend(more);
        me
    }

    pub fn default_kernel(&self) -> &AgentKernel {
        &self.list[0]
    }

    /// The kernel a machine with minimum kernel `min` boots the agent with: the default if
    /// it is at least `min`, else the oldest that is; with none that is, the newest, the
    /// nearest the machine can get (it still boots, and says which kernel in its inventory).
    pub fn for_machine(&self, min: Option<&str>) -> &AgentKernel {
        let listed = self.listed();
        match choose("the agent's", &listed, None, min) {
            Ok(Some(k)) => self
                .list
                .iter()
                .find(|a| a.name == k.name)
                .unwrap_or(&self.list[0]),
            _ => self
                .list
                .iter()
                .max_by(|a, b| {
                    stork_proto::kernel::release(&a.version)
                        .cmp(&stork_proto::kernel::release(&b.version))
                })
                .unwrap_or(&self.list[0]),
        }
    }

    /// Name and version of each, the default first.
    pub fn listed(&self) -> Vec<ImageKernel> {
        self.list
            .iter()
            .map(|k| ImageKernel {
                name: k.name.clone(),
                version: k.version.clone(),
            })
            .collect()
    }
}

/// The kernel version a boot manifest (`stork-image initrd`'s) records, if it lists
/// `kernel` among its artifacts.
fn version_of(manifest: &Path, kernel: &str) -> Option<String> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let names_it = v["artifacts"]
        .as_array()?
        .iter()
        .any(|a| a["name"].as_str() == Some(kernel));
    let version = v["inputs"]["kernel_version"].as_str()?;
    (names_it && !version.is_empty()).then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, version: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(MANIFEST),
            serde_json::json!({
                "artifacts": [{"name": "vmlinuz"}, {"name": "initrd.img"}],
                "inputs": {"kernel_version": version},
            })
            .to_string(),
        )
        .unwrap();
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
    }

    fn boot_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        manifest(d.path(), "6.1.0-57-amd64");
        manifest(&d.path().join("kernels/backports"), "6.12.95+deb12-amd64");
        // Incomplete or oddly named: not offered.
        std::fs::create_dir_all(d.path().join("kernels/empty")).unwrap();
        manifest(&d.path().join("kernels/bad name"), "7.0");
        d
    }

    #[test]
    fn the_default_and_each_complete_kernel_directory_are_found() {
        let d = boot_dir();
        let k = AgentKernels::discover(d.path(), "vmlinuz", "initrd.img");
        assert_eq!(
            k.listed(),
            [
                ImageKernel {
                    name: "default".into(),
                    version: "6.1.0-57-amd64".into()
                },
                ImageKernel {
                    name: "backports".into(),
                    version: "6.12.95+deb12-amd64".into()
                },
            ]
        );
        assert_eq!(k.list[1].kernel, "kernels/backports/vmlinuz");
        assert_eq!(k.list[1].initrd, "kernels/backports/initrd.img");
        // A configured kernel the manifest does not name has no known version.
        let other = AgentKernels::discover(d.path(), "custom/vmlinuz", "custom/initrd");
        assert_eq!(other.default_kernel().version, "");
    }

    #[test]
    fn a_machines_minimum_picks_the_agents_kernel_as_it_picks_a_deploys() {
        let d = boot_dir();
        let k = AgentKernels::discover(d.path(), "vmlinuz", "initrd.img");
        assert_eq!(k.for_machine(None).name, "default");
        assert_eq!(k.for_machine(Some("6.1")).name, "default");
        assert_eq!(k.for_machine(Some("6.12")).name, "backports");
        // None new enough: the newest there is.
        assert_eq!(k.for_machine(Some("7")).name, "backports");
        let only = AgentKernels::configured("vmlinuz", "initrd.img");
        assert_eq!(only.for_machine(Some("6.12")).kernel, "vmlinuz");
    }
}
