//! The kernel the installed OS boots when the deploy chose one of the image's: Debian's
//! `/vmlinuz` and `/initrd.img` links, which the grub.cfg of the raw image and of a layout
//! deploy boot, pointed at it (as Debian's linux-update-symlinks would).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Points the links of the root at `root` at kernel `version`, which must be installed there.
pub fn boot(root: &Path, version: &str) -> Result<()> {
    let links = stork_proto::kernel::links(version);
    for (_, target) in &links {
        if !root.join(target).is_file() {
            bail!("the image has no /{target}: kernel {version} is not installed in it");
        }
    }
    for (link, target) in links {
        // Replaced by a rename, so a cut leaves the old link or the new one.
        let tmp = root.join(format!(".{link}.stork"));
        let _ = fs::remove_file(&tmp);
        symlink(&target, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
        fs::rename(&tmp, root.join(link)).with_context(|| format!("replacing /{link}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_links_name_the_chosen_kernel_and_a_missing_one_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir(root.join("boot")).unwrap();
        for f in [
            "vmlinuz-6.1",
            "initrd.img-6.1",
            "vmlinuz-6.12",
            "initrd.img-6.12",
        ] {
            fs::write(root.join("boot").join(f), f).unwrap();
        }
        boot(root, "6.1").unwrap();
        boot(root, "6.12").unwrap();
        assert_eq!(
            fs::read_to_string(root.join("vmlinuz")).unwrap(),
            "vmlinuz-6.12"
        );
        assert_eq!(
            fs::read_to_string(root.join("initrd.img")).unwrap(),
            "initrd.img-6.12"
        );
        assert_eq!(
            fs::read_link(root.join("vmlinuz")).unwrap(),
            Path::new("boot/vmlinuz-6.12")
        );
        let e = boot(root, "7.0").unwrap_err().to_string();
        assert!(
            e.contains("/boot/vmlinuz-7.0") && e.contains("kernel 7.0"),
            "{e}"
        );
        assert_eq!(
            fs::read_to_string(root.join("vmlinuz")).unwrap(),
            "vmlinuz-6.12"
        );
    }
}
