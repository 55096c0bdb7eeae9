//! Boot resources for the images `stork-image` built, as the appliance's API takes them.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// The boot resource for OS image `name` in `images` (its `manifest.json` and files): the
/// files are linked (or copied) into `boot_root/images/` and listed by role (`raw`,
/// `squashfs`, `tar`) with their sha256; `raw_sha256` replaces the raw image's sum (for
/// tests of a corrupt image).
pub fn os_resource(
    images: &Path,
    boot_root: &Path,
    name: &str,
    raw_sha256: Option<&str>,
) -> Result<Value> {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(images.join("manifest.json"))
            .context("reading the image manifest")?,
    )?;
    let image = manifest["images"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .with_context(|| format!("no image {name} in the manifest"))?;
    let dest = boot_root.join("images");
    std::fs::create_dir_all(&dest)?;
    let mut files = Vec::new();
    for a in image["artifacts"].as_array().context("artifacts")? {
        let role = match a["kind"].as_str() {
            Some("raw_disk_zst") => "raw",
            Some("root_squashfs") => "squashfs",
            Some("root_tar_zst") => "tar",
            _ => continue,
        };
        let file = a["name"].as_str().context("artifact name")?;
        let to = dest.join(file);
        if !to.exists() && std::fs::hard_link(images.join(file), &to).is_err() {
            std::fs::copy(images.join(file), &to).with_context(|| format!("copying {file}"))?;
        }
        let sha = match (role, raw_sha256) {
            ("raw", Some(s)) => Value::String(s.to_string()),
            _ => a["sha256"].clone(),
        };
        files.push(json!({
            "role": role, "path": format!("images/{file}"), "sha256": sha, "size": a["size"],
        }));
    }
    Ok(json!({"name": name, "kind": "os", "arch": "amd64", "files": files}))
}
