//! The storage stack on the disks' data partitions, as the layout asks: an md array over
//! them (`mdadm --create`), an LVM volume group over the array or the partitions with its
//! logical volumes, and the file systems on what is on top (the volumes, else the array or
//! the one partition), each with its mount point and options.
//!
//! No udev runs in the ephemeral root: mdadm and LVM create their device nodes themselves
//! (LVM told so by `--config`, so it waits for no udev event), and every device is named by
//! its kernel or device-mapper path.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use stork_proto::StepState;
use stork_proto::layout::{DiskLayout, Fit, Fs};

use super::tool::run;
use crate::appliance::ApplianceClient;
use crate::step::Step;
use crate::task::DEV;

/// The array the layout's RAID becomes.
pub const MD_DEVICE: &str = "/dev/md0";
/// LVM without udev: device nodes made by LVM itself, no waiting for udev's confirmation.
const LVM_CONFIG: &str = "activation { udev_sync = 0 udev_rules = 0 } \
                          devices { obtain_device_list_from_udev = 0 }";

/// A file system to make and mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub device: PathBuf,
    pub fs: Fs,
    pub mount: String,
    pub options: String,
    /// The file system's label (at most 12 characters: XFS's limit).
    pub label: String,
    /// How fstab and the kernel name it: a device-mapper path for a logical volume (what
    /// the initramfs activates the volume group by), else `None` (by its UUID).
    pub path_name: Option<String>,
}

/// What [`build`] made: the array and volume group to stop after a failure, and the file
/// systems, the root first, then by mount point depth (the order to mount them in).
#[derive(Debug, Default)]
pub struct Stack {
    pub md: Option<PathBuf>,
    pub vg: Option<String>,
    pub volumes: Vec<Volume>,
}

impl Stack {
    /// The root file system.
    pub fn root(&self) -> &Volume {
        &self.volumes[0]
    }

    /// Stops what [`build`] started, after a failure: the volume group's volumes, then the
    /// array, so that the disks can be wiped. Best effort: the failure being reported
    /// matters more.
    pub fn stop(&self) {
        if let Some(vg) = &self.vg {
            let _ = run(lvm("vgchange").args(["-an", vg]));
        }
        if let Some(md) = &self.md {
            let _ = run(Command::new("mdadm").arg("--stop").arg(md));
        }
    }
}

/// Who runs LVM's `tool` without udev.
fn lvm(tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.arg("--config").arg(LVM_CONFIG);
    c
}

/// The file systems the layout wants, in mount order, on `base` (the array or the one data
/// partition) or on the volume group's volumes. Pure: what [`build`] makes.
pub fn volumes(layout: &DiskLayout, base: &Path) -> Vec<Volume> {
    let mut v: Vec<Volume> = match &layout.lvm {
        None => {
            let fs = layout.root_fs();
            vec![Volume {
                device: base.to_path_buf(),
                fs,
                mount: "/".into(),
                options: layout
                    .mount_options
                    .clone()
                    .unwrap_or_else(|| fs.default_options().into()),
                label: "root".into(),
                path_name: None,
            }]
        }
        Some(lvm) => lvm
            .volumes
            .iter()
            .map(|vol| {
                let mapper = format!("/dev/mapper/{}-{}", lvm.vg, vol.name);
                Volume {
                    device: PathBuf::from(&mapper),
                    fs: vol.fs,
                    mount: vol.mount.clone(),
                    options: vol
                        .options
                        .clone()
                        .unwrap_or_else(|| vol.fs.default_options().into()),
                    label: vol.name.chars().take(12).collect(),
                    path_name: Some(mapper),
                }
            })
            .collect(),
    };
    // `/` first, then parents before children.
    v.sort_by_key(|vol| {
        (
            vol.mount != "/",
            vol.mount.matches('/').count(),
            vol.mount.clone(),
        )
    });
    v
}

/// `mdadm --create`'s arguments for the layout's level over `members`.
pub fn mdadm_args(level: u8, members: &[PathBuf], homehost: &str) -> Vec<String> {
    let mut a = vec![
        "--create".to_string(),
        MD_DEVICE.to_string(),
        // --run: no question (a member that looks used), start at once.
        "--run".into(),
        "--metadata=1.2".into(),
        format!("--level={level}"),
        format!("--raid-devices={}", members.len()),
        "--name=root".into(),
        // The installed system's hostname: it then sees the array as its own (named
        // /dev/md/root, not md127).
        format!("--homehost={homehost}"),
    ];
    a.extend(members.iter().map(|m| m.display().to_string()));
    a
}

/// `lvcreate`'s size arguments for each volume: fixed sizes and percentages in order, the
/// volume that takes the rest last (what is free once the others exist).
pub fn lvcreate_order(layout: &DiskLayout) -> Vec<(String, Vec<String>)> {
    let Some(lvm) = &layout.lvm else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut rest = None;
    for v in &lvm.volumes {
        let size = match (v.size_mib, v.percent) {
            (Some(m), _) => vec!["-L".to_string(), format!("{m}m")],
            (None, Some(p)) => vec!["-l".to_string(), format!("{p}%VG")],
            (None, None) => {
                rest = Some(v.name.clone());
                continue;
            }
        };
        out.push((v.name.clone(), size));
    }
    if let Some(name) = rest {
        out.push((name, vec!["-l".to_string(), "100%FREE".to_string()]));
    }
    out
}

/// Makes the array, the volume group and volumes, and the file systems, on the disks' data
/// partitions (kernel names).
pub fn build(
    client: &ApplianceClient,
    layout: &DiskLayout,
    fit: &Fit,
    data: &[String],
    hostname: &str,
) -> Result<Stack> {
    let members: Vec<PathBuf> = data.iter().map(|p| Path::new(DEV).join(p)).collect();
    let mut stack = Stack::default();
    let result = (|| -> Result<()> {
        let base = match layout.raid {
            Some(level) => {
                run(Command::new("mdadm").args(mdadm_args(level, &members, hostname)))?;
                stack.md = Some(PathBuf::from(MD_DEVICE));
                client.step_event(
                    Step::Partitions,
                    StepState::Progress,
                    format!(
                        "RAID {level} {MD_DEVICE} over {} ({} MiB)",
                        data.join(", "),
                        fit.array_mib.unwrap_or_default()
                    ),
                );
                PathBuf::from(MD_DEVICE)
            }
            None => members[0].clone(),
        };
        if let Some(l) = &layout.lvm {
            let pvs: Vec<PathBuf> = match &stack.md {
                Some(md) => vec![md.clone()],
                None => members.clone(),
            };
            run(lvm("pvcreate").args(["-ff", "-y"]).args(&pvs))?;
            run(lvm("vgcreate").arg("-y").arg(&l.vg).args(&pvs))?;
            stack.vg = Some(l.vg.clone());
            for (name, size) in lvcreate_order(layout) {
                run(lvm("lvcreate")
                    .args(["-y", "--wipesignatures", "y", "-n", &name])
                    .args(&size)
                    .arg(&l.vg))?;
            }
            // Device nodes for every volume, whatever lvcreate managed without udev.
            run(lvm("vgmknodes").arg(&l.vg))?;
            client.step_event(
                Step::Partitions,
                StepState::Progress,
                format!(
                    "LVM volume group {} ({} MiB): {}",
                    l.vg,
                    fit.vg_extents.unwrap_or_default() * stork_proto::layout::PE_MIB,
                    l.volumes
                        .iter()
                        .map(|v| format!("{} on {}", v.name, v.mount))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        stack.volumes = volumes(layout, &base);
        for v in &stack.volumes {
            run(&mut mkfs(v))?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(stack),
        Err(e) => {
            stack.stop();
            Err(e).context("building the layout's storage")
        }
    }
}

/// The mkfs for a volume: forced (the zeroed partition may still look used to it), quiet.
fn mkfs(v: &Volume) -> Command {
    let mut c = Command::new(format!("mkfs.{}", v.fs.name()));
    match v.fs {
        Fs::Ext4 => c.args(["-F", "-q", "-L", &v.label]),
        Fs::Xfs => c.args(["-f", "-q", "-L", &v.label]),
        Fs::Btrfs => c.args(["-f", "-q", "-L", &v.label]),
    };
    c.arg(&v.device);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use stork_proto::layout::{Lvm, Volume as LvmVolume};

    fn layout() -> DiskLayout {
        let vol = |name: &str, mount: &str, fs, size_mib, percent| LvmVolume {
            name: name.into(),
            mount: mount.into(),
            fs,
            size_mib,
            percent,
            options: None,
        };
        DiskLayout {
            disks: vec!["vda".into(), "vdb".into()],
            raid: Some(1),
            lvm: Some(Lvm {
                vg: "vg0".into(),
                volumes: vec![
                    vol("srvdata", "/srv/data", Fs::Btrfs, None, Some(10)),
                    vol("root", "/", Fs::Ext4, None, None),
                    vol("var", "/var", Fs::Xfs, Some(512), None),
                ],
            }),
            ..DiskLayout::default()
        }
    }

    #[test]
    fn volumes_mount_root_first_then_parents() {
        let v = volumes(&layout(), Path::new(MD_DEVICE));
        let mounts: Vec<&str> = v.iter().map(|v| v.mount.as_str()).collect();
        assert_eq!(mounts, ["/", "/var", "/srv/data"]);
        assert_eq!(v[0].device, PathBuf::from("/dev/mapper/vg0-root"));
        assert_eq!(v[0].path_name.as_deref(), Some("/dev/mapper/vg0-root"));
        assert_eq!(v[0].options, "errors=remount-ro");
        assert_eq!(v[1].fs, Fs::Xfs);
        assert_eq!(v[1].options, "defaults");

        let flat = DiskLayout {
            fs: Some(Fs::Xfs),
            mount_options: Some("noatime".into()),
            ..DiskLayout::default()
        };
        let v = volumes(&flat, Path::new("/dev/vda3"));
        assert_eq!(v.len(), 1);
        assert_eq!(
            (v[0].device.to_str(), v[0].fs, v[0].options.as_str()),
            (Some("/dev/vda3"), Fs::Xfs, "noatime")
        );
        assert_eq!(v[0].path_name, None);
    }

    #[test]
    fn the_rest_is_created_last() {
        let order = lvcreate_order(&layout());
        let got: Vec<(String, String)> = order.into_iter().map(|(n, a)| (n, a.join(" "))).collect();
        assert_eq!(
            got,
            [
                ("srvdata".to_string(), "-l 10%VG".to_string()),
                ("var".to_string(), "-L 512m".to_string()),
                ("root".to_string(), "-l 100%FREE".to_string()),
            ]
        );
        let args = mdadm_args(
            1,
            &[PathBuf::from("/dev/vda3"), PathBuf::from("/dev/vdb3")],
            "h1",
        );
        assert_eq!(
            args.join(" "),
            "--create /dev/md0 --run --metadata=1.2 --level=1 --raid-devices=2 --name=root \
             --homehost=h1 /dev/vda3 /dev/vdb3"
        );
    }
}
