//! A layout placed on disks of known sizes: each disk's data partition, the RAID array, the
//! volume group's extents and each logical volume's. The appliance fits a request to the
//! inventory's disks (so a layout that cannot fit is refused before any power-on); the agent
//! fits it to the disks it found and creates exactly that.

use super::check::raid_min_members;
use super::{BIOS_BOOT_MIB, DiskLayout, GPT_OVERHEAD_MIB, LayoutError, MIN_ROOT_MIB};

/// Kept back from each RAID member for md's metadata 1.2 superblock, bitmap and data offset:
/// mdadm 4.2 starts the data at most 128 MiB in (room for a later reshape), less on small
/// members. Counted in full, so a layout fitted here fits what mdadm makes.
pub const MD_RESERVE_MIB: u64 = 130;
/// LVM's label and metadata area at the start of a physical volume (pvcreate's default).
pub const PV_METADATA_MIB: u64 = 1;
/// LVM's default physical extent: volumes are whole extents.
pub const PE_MIB: u64 = 4;

/// Where each part of a layout lands, in MiB or extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// Each disk's data partition (partition 3), in the order of the disks.
    pub data_mib: Vec<u64>,
    /// The RAID array's capacity, with `raid`.
    pub array_mib: Option<u64>,
    /// The volume group's extents, with `lvm`.
    pub vg_extents: Option<u64>,
    /// Each logical volume's extents, in the layout's order.
    pub volume_extents: Vec<u64>,
    /// The root file system's size.
    pub root_mib: u64,
}

/// A disk as a fit sees it: how it is named in messages, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSize {
    pub label: String,
    pub bytes: u64,
}

impl DiskLayout {
    /// Places the layout on `disks` (the layout's disks in order, or the one disk it goes
    /// on). `root_floor_mib` is the least root that holds the image when it takes the whole
    /// data space (no LVM). Every refusal names the field that does not fit.
    pub fn fit(&self, disks: &[DiskSize], root_floor_mib: u64) -> Result<Fit, LayoutError> {
        let disk_field = |i: usize| {
            if self.disks.is_empty() {
                "disk".to_string()
            } else {
                format!("disks[{i}]")
            }
        };
        let overhead = (GPT_OVERHEAD_MIB + BIOS_BOOT_MIB).saturating_add(self.esp());
        let mut data_mib = Vec::with_capacity(disks.len());
        for d in disks {
            let mib = d.bytes >> 20;
            let avail = mib.saturating_sub(overhead);
            match self.root_mib {
                Some(r) if r > avail => {
                    return Err(LayoutError::field(
                        "root_mib",
                        format!(
                            "{r} MiB does not fit disk {}: its {mib} MiB hold {avail} MiB after \
                             the GPT, BIOS boot and ESP ({overhead} MiB)",
                            d.label
                        ),
                    ));
                }
                Some(r) => data_mib.push(r),
                None => data_mib.push(avail),
            }
        }
        let Some(&smallest) = data_mib.iter().min() else {
            return Err(LayoutError::field(
                "disks",
                "no disk to place the layout on",
            ));
        };

        let array_mib = match self.raid {
            Some(level) => {
                let n = disks.len() as u64;
                let min = raid_min_members(level).unwrap_or(usize::MAX) as u64;
                if n < min {
                    return Err(LayoutError::field(
                        "raid",
                        format!("RAID {level} needs at least {min} disks; {n} found"),
                    ));
                }
                let member = smallest.saturating_sub(MD_RESERVE_MIB);
                Some(match level {
                    0 => member * n,
                    1 => member,
                    5 => member * (n - 1),
                    _ => member * n / 2,
                })
            }
            None => None,
        };

        let Some(lvm) = &self.lvm else {
            let root_mib = array_mib.unwrap_or(smallest);
            let need = root_floor_mib
                .max(MIN_ROOT_MIB)
                .max(self.root_fs().min_mib());
            if root_mib < need {
                let field = if self.root_mib.is_some() {
                    "root_mib".to_string()
                } else {
                    disk_field(0)
                };
                return Err(LayoutError::field(
                    field,
                    format!(
                        "the root would be {root_mib} MiB{}; it needs at least {need} MiB",
                        if array_mib.is_some() {
                            " (the array, after md's metadata)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            return Ok(Fit {
                data_mib,
                array_mib,
                vg_extents: None,
                volume_extents: Vec::new(),
                root_mib,
            });
        };

        let pvs: Vec<u64> = match array_mib {
            Some(a) => vec![a],
            None => data_mib.clone(),
        };
        let vg: u64 = pvs
            .iter()
            .map(|pv| pv.saturating_sub(PV_METADATA_MIB) / PE_MIB)
            .sum();
        let mut extents = vec![0u64; lvm.volumes.len()];
        let mut used = 0u64;
        let mut rest = None;
        for (i, v) in lvm.volumes.iter().enumerate() {
            let e = match (v.size_mib, v.percent) {
                (Some(s), _) => s.div_ceil(PE_MIB),
                (None, Some(p)) => vg * u64::from(p) / 100,
                (None, None) => {
                    rest = Some(i);
                    continue;
                }
            };
            used = used.saturating_add(e);
            if used > vg {
                return Err(LayoutError::field(
                    format!(
                        "lvm.volumes[{i}].{}",
                        if v.size_mib.is_some() {
                            "size_mib"
                        } else {
                            "percent"
                        }
                    ),
                    format!(
                        "with the volumes before it the volumes need {} MiB; the volume group \
                         {} holds {} MiB",
                        used * PE_MIB,
                        lvm.vg,
                        vg * PE_MIB
                    ),
                ));
            }
            extents[i] = e;
        }
        if let Some(i) = rest {
            extents[i] = vg - used;
        }
        for (i, v) in lvm.volumes.iter().enumerate() {
            let min = if v.mount == "/" {
                MIN_ROOT_MIB.max(v.fs.min_mib())
            } else {
                v.fs.min_mib()
            };
            if extents[i] * PE_MIB < min {
                return Err(LayoutError::field(
                    format!(
                        "lvm.volumes[{i}].{}",
                        if v.percent.is_some() {
                            "percent"
                        } else {
                            "size_mib"
                        }
                    ),
                    format!(
                        "{} gets {} MiB of the volume group's {} MiB; a {} on {} needs {min} MiB",
                        v.name,
                        extents[i] * PE_MIB,
                        vg * PE_MIB,
                        v.fs.name(),
                        v.mount
                    ),
                ));
            }
        }
        // The image's files spread over the volumes mounted under the root: together they
        // must hold what the root alone would.
        let total = extents.iter().sum::<u64>() * PE_MIB;
        if total < root_floor_mib {
            return Err(LayoutError::field(
                "lvm.volumes",
                format!(
                    "the volumes hold {total} MiB; the image needs at least {root_floor_mib} MiB"
                ),
            ));
        }
        let root_mib = lvm
            .volumes
            .iter()
            .zip(&extents)
            .find(|(v, _)| v.mount == "/")
            .map_or(0, |(_, e)| e * PE_MIB);
        Ok(Fit {
            data_mib,
            array_mib,
            vg_extents: Some(vg),
            volume_extents: extents,
            root_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Lvm, test_volume as vol};
    use super::*;

    const GIB: u64 = 1 << 30;

    fn disks(gib: &[u64]) -> Vec<DiskSize> {
        gib.iter()
            .enumerate()
            .map(|(i, g)| DiskSize {
                label: format!("vd{}", (b'a' + i as u8) as char),
                bytes: g * GIB,
            })
            .collect()
    }

    #[test]
    fn raid1_with_lvm_on_two_disks() {
        let l = DiskLayout {
            esp_mib: Some(256),
            root_mib: Some(3000),
            disks: vec!["vda".into(), "vdb".into()],
            raid: Some(1),
            lvm: Some(Lvm {
                vg: "vg0".into(),
                volumes: vec![
                    vol("root", "/", None, None),
                    vol("var", "/var", Some(500), None),
                ],
            }),
            ..DiskLayout::default()
        };
        l.validate().unwrap();
        let f = l.fit(&disks(&[4, 8]), 0).unwrap();
        assert_eq!(f.data_mib, [3000, 3000]);
        assert_eq!(f.array_mib, Some(3000 - MD_RESERVE_MIB));
        let vg = (3000 - MD_RESERVE_MIB - PV_METADATA_MIB) / PE_MIB;
        assert_eq!(f.vg_extents, Some(vg));
        assert_eq!(f.volume_extents, [vg - 125, 125]);
        assert_eq!(f.root_mib, (vg - 125) * PE_MIB);

        // A /var of 3 GiB does not fit: the field that overflows is named.
        let mut big = l.clone();
        big.lvm.as_mut().unwrap().volumes[1].size_mib = Some(3072);
        let e = big.fit(&disks(&[4, 8]), 0).unwrap_err().to_string();
        assert!(
            e.starts_with("layout.lvm.volumes[1].size_mib: with the volumes before it"),
            "{e}"
        );
        // What is left for the root is too little.
        big.lvm.as_mut().unwrap().volumes[1].size_mib = Some(2500);
        let e = big.fit(&disks(&[4, 8]), 0).unwrap_err().to_string();
        assert!(
            e.starts_with("layout.lvm.volumes[0].size_mib: root gets"),
            "{e}"
        );
        // The data partition does not fit the smaller disk.
        let e = l.fit(&disks(&[2, 8]), 0).unwrap_err().to_string();
        assert!(
            e.starts_with("layout.root_mib: 3000 MiB does not fit disk vda: its 2048 MiB"),
            "{e}"
        );
    }

    #[test]
    fn raid_levels_capacity_and_the_smallest_member() {
        let raid = |level, n: usize| DiskLayout {
            raid: Some(level),
            disks: (0..n).map(|i| format!("d{i}")).collect(),
            ..DiskLayout::default()
        };
        let member = |gib: u64| (gib << 10) - 2 - 1 - 512 - MD_RESERVE_MIB;
        let cap = |level, sizes: &[u64]| {
            raid(level, sizes.len())
                .fit(&disks(sizes), 0)
                .unwrap()
                .array_mib
                .unwrap()
        };
        assert_eq!(cap(1, &[4, 8]), member(4));
        assert_eq!(cap(0, &[4, 8]), 2 * member(4));
        assert_eq!(cap(5, &[4, 4, 4]), 2 * member(4));
        assert_eq!(cap(10, &[4, 4, 4, 4]), 2 * member(4));
        // The image does not fit the array.
        let e = raid(1, 2)
            .fit(&disks(&[4, 4]), 8000)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("layout.disks[0]: the root would be"), "{e}");
    }

    #[test]
    fn flat_root_floor_and_lvm_over_several_disks() {
        let flat = DiskLayout::default();
        let one = |gib| disks(&[gib]);
        assert_eq!(
            flat.fit(&one(4), 1200).unwrap().root_mib,
            4096 - 2 - 1 - 512
        );
        let e = flat.fit(&one(1), 1200).unwrap_err().to_string();
        assert!(
            e.starts_with("layout.disk: the root would be 509 MiB"),
            "{e}"
        );
        let spread = DiskLayout {
            disks: vec!["a".into(), "b".into()],
            lvm: Some(Lvm {
                vg: "vg0".into(),
                volumes: vec![
                    vol("root", "/", None, Some(50)),
                    vol("srv", "/srv", None, None),
                ],
            }),
            ..DiskLayout::default()
        };
        let f = spread.fit(&disks(&[4, 4]), 0).unwrap();
        let pv = (4096 - 2 - 1 - 512 - PV_METADATA_MIB) / PE_MIB;
        assert_eq!(f.vg_extents, Some(2 * pv));
        assert_eq!(f.volume_extents, [pv, pv]);
        // Volumes that together hold less than the image are refused.
        let small = DiskLayout {
            lvm: Some(Lvm {
                vg: "vg0".into(),
                volumes: vec![vol("root", "/", Some(1024), None)],
            }),
            ..DiskLayout::default()
        };
        let e = small.fit(&disks(&[8]), 4000).unwrap_err().to_string();
        assert_eq!(
            e,
            "layout.lvm.volumes: the volumes hold 1024 MiB; the image needs at least 4000 MiB"
        );
    }
}
