//! OS image recipes: a TOML file naming the suite, the packages, cloud-init's default user, the
//! kernel command line and the raw disk's size. `recipes/debian-bookworm.toml` is the first.
//!
//! The file form is checked field by field into [`Recipe`]; its canonical JSON (not the file's
//! bytes, so comments do not matter) is what cache keys and manifests hash.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Image names the builder uses itself.
pub const RESERVED: &[&str] = &["appliance", "base", "ephemeral"];

/// Architectures the builder knows how to make bootable (GRUB's i386-pc and x86_64-efi).
pub const ARCHES: &[&str] = &["amd64"];

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("reading recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("recipe {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("recipe field `{field}`: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// A validated recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Image name: output files are `<name>.root.squashfs`, `<name>.root.tar.zst`,
    /// `<name>.raw.zst`.
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    #[serde(default = "default_arch")]
    pub arch: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// Installed with `apt-get install --no-install-recommends` on top of debootstrap's
    /// minbase.
    pub packages: Vec<String>,
    /// Appended to the kernel command line in grub.cfg and `/etc/default/grub`.
    #[serde(default)]
    pub kernel_cmdline: String,
    /// Name of the kernel `packages` install (their `linux-image-*`): the image's default.
    #[serde(default = "default_kernel")]
    pub default_kernel: String,
    /// Kernels besides the default, each from another suite of the same release (backports):
    /// a deploy may choose one by name or version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<ExtraKernel>,
    /// cloud-init's default user (`system_info.default_user`): the deploy request's SSH keys
    /// go to this account.
    pub user: User,
    pub disk: Disk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub gecos: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Passwordless sudo for the user.
    #[serde(default)]
    pub sudo: bool,
    #[serde(default = "default_shell")]
    pub shell: String,
}

/// A kernel installed after the packages with `apt-get install -t <suite> <package>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraKernel {
    pub name: String,
    /// `<suite>-<something>`, e.g. `bookworm-backports`.
    pub suite: String,
    pub package: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Logical size of the raw image; the root partition fills what the ESP and the BIOS boot
    /// partition leave, and is grown at deploy.
    pub size_mib: u64,
    /// EFI system partition (FAT32).
    #[serde(default = "default_esp_mib")]
    pub esp_mib: u64,
}

fn default_arch() -> String {
    "amd64".into()
}
fn default_components() -> Vec<String> {
    vec!["main".into()]
}
fn default_kernel() -> String {
    "stable".into()
}
fn default_shell() -> String {
    "/bin/bash".into()
}
fn default_esp_mib() -> u64 {
    100
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Self, RecipeError> {
        let text = fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_owned(),
            source,
        })?;
        let recipe: Recipe = toml::from_str(&text).map_err(|source| RecipeError::Parse {
            path: path.to_owned(),
            source,
        })?;
        recipe.validate()?;
        Ok(recipe)
    }

    pub fn validate(&self) -> Result<(), RecipeError> {
        if !is_name(&self.name) {
            return Err(invalid(
                "name",
                format!("{:?}: lowercase letters, digits, '.', '-'", self.name),
            ));
        }
        // The cache keeps trees as <name>-<key>: these names are the builder's own.
        if RESERVED.contains(&self.name.as_str()) {
            return Err(invalid(
                "name",
                format!("{:?} is reserved ({})", self.name, RESERVED.join(", ")),
            ));
        }
        if !is_name(&self.suite) {
            return Err(invalid(
                "suite",
                format!("{:?} is not a suite name", self.suite),
            ));
        }
        if !ARCHES.contains(&self.arch.as_str()) {
            return Err(invalid(
                "arch",
                format!("{:?}: supported are {}", self.arch, ARCHES.join(", ")),
            ));
        }
        if self.components.is_empty() || !self.components.iter().all(|c| is_name(c)) {
            return Err(invalid("components", format!("{:?}", self.components)));
        }
        if self.packages.is_empty() {
            return Err(invalid("packages", "empty"));
        }
        for p in &self.packages {
            if !is_package(p) {
                return Err(invalid("packages", format!("{p:?} is not a package name")));
            }
        }
        // It goes into grub.cfg inside double quotes and into /etc/default/grub.
        if !self
            .kernel_cmdline
            .chars()
            .all(|c| c.is_ascii_graphic() && !"\"'\\$`;".contains(c) || c == ' ')
        {
            return Err(invalid(
                "kernel_cmdline",
                "printable ASCII without quotes, '\\', '$', '`' or ';'",
            ));
        }
        if !is_name(&self.default_kernel) {
            return Err(invalid(
                "default_kernel",
                format!(
                    "{:?}: lowercase letters, digits, '.', '-'",
                    self.default_kernel
                ),
            ));
        }
        let mut names = vec![self.default_kernel.as_str()];
        for k in &self.kernels {
            if !is_name(&k.name) || names.contains(&k.name.as_str()) {
                return Err(invalid(
                    "kernels.name",
                    format!(
                        "{:?}: a name of letters, digits, '.', '-', used once",
                        k.name
                    ),
                ));
            }
            names.push(&k.name);
            // Another release's kernel would pull that release's libraries into the image.
            if !k
                .suite
                .strip_prefix(&self.suite)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(is_name)
            {
                return Err(invalid(
                    "kernels.suite",
                    format!(
                        "{:?}: a suite of {} (like {}-backports)",
                        k.suite, self.suite, self.suite
                    ),
                ));
            }
            if !is_package(&k.package) {
                return Err(invalid(
                    "kernels.package",
                    format!("{:?} is not a package name", k.package),
                ));
            }
        }
        if !is_user(&self.user.name) {
            return Err(invalid("user.name", format!("{:?}", self.user.name)));
        }
        if let Some(g) = self.user.groups.iter().find(|g| !is_user(g)) {
            return Err(invalid("user.groups", format!("{g:?}")));
        }
        if self.user.gecos.contains([':', '\n', '"']) {
            return Err(invalid("user.gecos", "no ':', '\"' or newline"));
        }
        if !self.user.shell.starts_with('/') || self.user.shell.contains(char::is_whitespace) {
            return Err(invalid("user.shell", "an absolute path"));
        }
        if !(33..=4096).contains(&self.disk.esp_mib) {
            // FAT32 needs 65525 clusters: 33 MiB at 512-byte clusters.
            return Err(invalid("disk.esp_mib", "between 33 and 4096"));
        }
        let min = self.disk.esp_mib + 2 + 1024;
        if self.disk.size_mib < min || self.disk.size_mib > 1 << 20 {
            return Err(invalid(
                "disk.size_mib",
                format!("between {min} (ESP + BIOS boot + 1 GiB root) and 1048576"),
            ));
        }
        Ok(())
    }

    /// SHA-256 of the canonical JSON form.
    pub fn sha256(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// Suite, component and image names: lowercase alphanumerics, '.', '-'.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
}

/// Debian package names (policy 5.6.1); checking keeps a name from being read as an option.
pub fn is_package(s: &str) -> bool {
    s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// User and group names as Debian's adduser accepts them by default.
fn is_user(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/debian-bookworm.toml");

    #[test]
    fn the_shipped_recipe_is_valid() {
        let r = Recipe::load(Path::new(SHIPPED)).unwrap();
        assert_eq!(r.name, "debian-bookworm");
        assert_eq!(r.suite, "bookworm");
        for p in [
            "linux-image-amd64",
            "cloud-init",
            "openssh-server",
            "grub-pc-bin",
        ] {
            assert!(r.packages.iter().any(|x| x == p), "{p}");
        }
        assert!(r.kernel_cmdline.contains("console=ttyS0"));
        assert_eq!(r.default_kernel, "stable");
        assert_eq!(r.kernels[0].suite, "bookworm-backports");
        assert_eq!(r.sha256().len(), 64);
    }

    fn sample() -> Recipe {
        toml::from_str(
            r#"
            name = "x"
            suite = "bookworm"
            packages = ["openssh-server"]
            [user]
            name = "debian"
            [disk]
            size_mib = 2048
            "#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_checks() {
        let r = sample();
        assert_eq!(r.arch, "amd64");
        assert_eq!(r.components, ["main"]);
        assert_eq!(r.disk.esp_mib, 100);
        assert_eq!(r.user.shell, "/bin/bash");
        r.validate().unwrap();

        let bad = |f: fn(&mut Recipe), field: &str| {
            let mut r = sample();
            f(&mut r);
            match r.validate() {
                Err(RecipeError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        };
        bad(|r| r.name = "../x".into(), "name");
        bad(|r| r.name = "base".into(), "name");
        bad(|r| r.arch = "arm64".into(), "arch");
        bad(|r| r.packages = vec!["-o".into()], "packages");
        bad(
            |r| r.kernel_cmdline = "quiet\" root=x".into(),
            "kernel_cmdline",
        );
        bad(|r| r.user.name = "Root".into(), "user.name");
        fn extra(name: &str, suite: &str, package: &str) -> ExtraKernel {
            ExtraKernel {
                name: name.into(),
                suite: suite.into(),
                package: package.into(),
            }
        }
        bad(
            |r| r.kernels = vec![extra("stable", "bookworm-backports", "linux-image-amd64")],
            "kernels.name",
        );
        bad(
            |r| r.kernels = vec![extra("new", "trixie", "linux-image-amd64")],
            "kernels.suite",
        );
        bad(
            |r| r.kernels = vec![extra("new", "bookworm-backports", "-y")],
            "kernels.package",
        );
        bad(|r| r.disk.size_mib = 500, "disk.size_mib");
        bad(|r| r.disk.esp_mib = 8, "disk.esp_mib");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = toml::from_str::<Recipe>(
            "name='x'\nsuite='bookworm'\npackages=['a']\npackage=['typo']\n[user]\nname='u'\n[disk]\nsize_mib=2048\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("package"), "{e}");
    }

    #[test]
    fn comments_do_not_change_the_hash() {
        let a = sample();
        let b: Recipe = toml::from_str(
            "# comment\nname = 'x'\nsuite = 'bookworm'\npackages = ['openssh-server']\n[user]\nname = 'debian'\n[disk]\nsize_mib = 2048\n",
        )
        .unwrap();
        assert_eq!(a.sha256(), b.sha256());
    }
}
