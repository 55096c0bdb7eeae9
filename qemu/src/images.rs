//! Boot resources for the images `stork-image` built, as the appliance's API takes them.

use std::path::Path;

use anyhow::{Context, Result};
use stork_proto::ImageRole;
use stork_proto::api::{BootResource, ResourceFile};
use stork_proto::manifest::Manifest;

/// The boot resource for OS image `name` in `images` (its `manifest.json` and files): the
/// files are linked (or copied) into `boot_root/images/` and listed by role (`raw`,
/// `squashfs`, `tar`) with their sha256; `raw_sha256` replaces the raw image's sum (for
/// tests of a corrupt image).
pub fn os_resource(
    images: &Path,
    boot_root: &Path,
    name: &str,
    raw_sha256: Option<&str>,
) -> Result<BootResource> {
    let manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(images.join("manifest.json"))
            .context("reading the image manifest")?,
    )
    .context("parsing the image manifest")?;
    let image = manifest
        .images
        .into_iter()
        .find(|i| i.name == name)
        .with_context(|| format!("no image {name} in the manifest"))?;
    let dest = boot_root.join("images");
    std::fs::create_dir_all(&dest)?;
    let kernels = image.kernels().to_vec();
    let mut files = Vec::new();
    for a in image.artifacts {
        let Some(role) = a.deploy_role() else {
            continue;
        };
        let file = &a.name;
        let to = dest.join(file);
        if !to.exists() && std::fs::hard_link(images.join(file), &to).is_err() {
            std::fs::copy(images.join(file), &to).with_context(|| format!("copying {file}"))?;
        }
        let sha256 = match (&role, raw_sha256) {
            (ImageRole::Raw, Some(s)) => s.to_string(),
            _ => a.sha256,
        };
        files.push(ResourceFile {
            role,
            path: format!("images/{file}"),
            sha256,
            size: a.size,
        });
    }
    Ok(BootResource {
        name: name.to_string(),
        kind: "os".into(),
        arch: Some("amd64".into()),
        files,
        kernels,
    })
}

/// Registers OS image `name` on `appliance`: one raw file of `bytes` pseudo-random bytes
/// (nothing compresses them away) under `DATA_DIR/boot/images/`, with its sha256. For
/// simulated machines, which download and check an image and write it nowhere.
pub fn register_random_image(appliance: &crate::Appliance, name: &str, bytes: usize) -> Result<()> {
    use sha2::{Digest, Sha256};
    let dir = appliance.data_dir.join("boot/images");
    std::fs::create_dir_all(&dir)?;
    let mut data = vec![0u8; bytes];
    // xorshift64: fast, and the same bytes every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let file = format!("{name}.raw");
    std::fs::write(dir.join(&file), &data)?;
    let resource = BootResource {
        name: name.to_string(),
        kind: "os".into(),
        arch: Some("amd64".into()),
        files: vec![ResourceFile {
            role: ImageRole::Raw,
            path: format!("images/{file}"),
            sha256: hex::encode(Sha256::digest(&data)),
            size: bytes as u64,
        }],
        kernels: Vec::new(),
    };
    let json = appliance.data_dir.join(format!("{name}.resource.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(&resource)?)?;
    appliance.cli(&["image", "register", &json.to_string_lossy()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_lists_the_deployable_files_by_role() {
        let images = tempfile::tempdir().unwrap();
        let boot = tempfile::tempdir().unwrap();
        let manifest = r#"{"images": [
            {"name": "other", "kind": "os", "artifacts": []},
            {"name": "deb", "kind": "os", "arch": "amd64", "artifacts": [
                {"name": "deb.raw.zst", "kind": "raw_disk_zst", "size": 3, "sha256": "aa",
                 "compression": "zstd"},
                {"name": "deb.squashfs", "kind": "root_squashfs", "size": 4, "sha256": "bb",
                 "compression": "zstd"},
                {"name": "deb.tar.zst", "kind": "root_tar_zst", "size": 5, "sha256": "cc",
                 "compression": "zstd"},
                {"name": "deb.packages", "kind": "packages", "size": 6, "sha256": "dd",
                 "compression": "none"}
            ]}
        ]}"#;
        std::fs::write(images.path().join("manifest.json"), manifest).unwrap();
        for f in ["deb.raw.zst", "deb.squashfs", "deb.tar.zst", "deb.packages"] {
            std::fs::write(images.path().join(f), f).unwrap();
        }
        let r = os_resource(images.path(), boot.path(), "deb", Some("00")).unwrap();
        assert_eq!((r.name.as_str(), r.kind.as_str()), ("deb", "os"));
        assert_eq!(r.arch.as_deref(), Some("amd64"));
        let got: Vec<(&str, &str, &str, u64)> = r
            .files
            .iter()
            .map(|f| (f.role.as_str(), f.path.as_str(), f.sha256.as_str(), f.size))
            .collect();
        assert_eq!(
            got,
            [
                ("raw", "images/deb.raw.zst", "00", 3),
                ("squashfs", "images/deb.squashfs", "bb", 4),
                ("tar", "images/deb.tar.zst", "cc", 5),
            ]
        );
        assert!(boot.path().join("images/deb.tar.zst").exists());
        assert!(os_resource(images.path(), boot.path(), "nope", None).is_err());
    }
}
