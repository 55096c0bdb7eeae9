//! What the appliance and the lab read of `stork-image`'s `manifest.json`: each image's
//! files and which deploy role each one plays. (`stork-image` writes the full manifest;
//! readers ignore the fields they do not need, so both may grow.)

use serde::Deserialize;

use crate::ImageRole;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub images: Vec<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub name: String,
    /// `os`, `ephemeral` or `initrd`.
    pub kind: String,
    #[serde(default)]
    pub arch: String,
    pub artifacts: Vec<Artifact>,
    /// OS images: what a deployment needs to know.
    #[serde(default)]
    pub deploy: Option<DeployInfo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeployInfo {
    /// The image's kernels, its default first.
    #[serde(default)]
    pub kernels: Vec<crate::kernel::ImageKernel>,
}

impl Entry {
    pub fn kernels(&self) -> &[crate::kernel::ImageKernel] {
        self.deploy.as_ref().map_or(&[], |d| &d.kernels)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Artifact {
    /// A file name in the manifest's directory.
    pub name: String,
    /// The artifact kind `stork-image` wrote (`raw_disk_zst`, `root_tar_zst`, ...).
    pub kind: String,
    pub size: u64,
    pub sha256: String,
}

impl Artifact {
    /// The role this file plays in a deploy, for the kinds a deploy uses.
    pub fn deploy_role(&self) -> Option<ImageRole> {
        match self.kind.as_str() {
            "raw_disk_zst" => Some(ImageRole::Raw),
            "raw_disk_map" => Some(ImageRole::DiskMap),
            "root_squashfs" => Some(ImageRole::Squashfs),
            "root_tar_zst" => Some(ImageRole::Tar),
            _ => None,
        }
    }
}
