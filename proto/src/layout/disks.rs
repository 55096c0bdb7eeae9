//! Which of a machine's disks a layout goes on: the appliance picks them from the last
//! inventory when it takes the request, the agent from the disks it finds, by the same rule.

use super::{DiskLayout, DiskSize, Fit, LayoutError};
use crate::inventory::{ChooseError, Disk, choose_disk};

/// Why no disks were picked; each names the request's field.
#[derive(Debug, thiserror::Error)]
pub enum PickError {
    /// A disk the request names (`disk`, `layout.disks[i]`) is not there or names several.
    #[error("{field}: {source}")]
    Choose { field: String, source: ChooseError },
    #[error("layout.disks[{i}]: {name:?} is {disk}, as layout.disks[{j}] is")]
    Twice {
        i: usize,
        name: String,
        disk: String,
        j: usize,
    },
    #[error(transparent)]
    Fit(#[from] LayoutError),
}

impl DiskLayout {
    /// The disks the layout goes on, in its order, and its fit on them: the disks it names,
    /// else `requested`, else the smallest it fits (the largest when none does, for the
    /// error that says why). `root_floor_mib` as for [`DiskLayout::fit`].
    pub fn pick_disks<'a>(
        &self,
        found: &'a [Disk],
        requested: Option<&str>,
        root_floor_mib: u64,
    ) -> Result<(Vec<&'a Disk>, Fit), PickError> {
        let choose = |field: String, name: &str| {
            choose_disk(found, Some(name), None)
                .map_err(|source| PickError::Choose { field, source })
        };
        let chosen: Vec<&Disk> = if !self.disks.is_empty() {
            let mut chosen: Vec<&Disk> = Vec::with_capacity(self.disks.len());
            for (i, name) in self.disks.iter().enumerate() {
                let d = choose(format!("layout.disks[{i}]"), name)?;
                if let Some(j) = chosen.iter().position(|c| c.name == d.name) {
                    return Err(PickError::Twice {
                        i,
                        name: name.clone(),
                        disk: d.name.clone(),
                        j,
                    });
                }
                chosen.push(d);
            }
            chosen
        } else if let Some(name) = requested {
            vec![choose("disk".into(), name)?]
        } else {
            let mut by_size: Vec<&Disk> = found.iter().collect();
            by_size.sort_by(|a, b| a.size_bytes.cmp(&b.size_bytes).then(a.name.cmp(&b.name)));
            let fitting = by_size
                .iter()
                .find(|d| self.fit(&[size(d)], root_floor_mib).is_ok());
            match fitting.or(by_size.last()) {
                Some(d) => vec![*d],
                None => {
                    return Err(PickError::Choose {
                        field: "disk".into(),
                        source: ChooseError::NoDisks,
                    });
                }
            }
        };
        let sizes: Vec<DiskSize> = chosen.iter().map(|d| size(d)).collect();
        let fit = self.fit(&sizes, root_floor_mib)?;
        Ok((chosen, fit))
    }
}

fn size(d: &Disk) -> DiskSize {
    DiskSize {
        label: d.label(),
        bytes: d.size_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(picked: Result<(Vec<&Disk>, Fit), PickError>) -> Vec<String> {
        picked.unwrap().0.iter().map(|d| d.name.clone()).collect()
    }

    #[test]
    fn an_lvm_layout_goes_on_the_smallest_disk_it_fits() {
        let disk = |name: &str, gib: u64| Disk {
            name: name.into(),
            size_bytes: gib << 30,
            ..Disk::default()
        };
        let found = [disk("sda", 20), disk("sdb", 500), disk("sdc", 4)];
        let l: DiskLayout = serde_json::from_str(
            r#"{"lvm": {"volumes": [{"name": "root", "mount": "/", "size_mib": 8192},
                {"name": "data", "mount": "/data", "size_mib": 200000}]}}"#,
        )
        .unwrap();
        assert_eq!(names(l.pick_disks(&found, None, 1024)), ["sdb"]);
        let flat = DiskLayout::default();
        assert_eq!(names(flat.pick_disks(&found, None, 1024)), ["sdc"]);
        // Named, or requested: fitted, and refused before anything is opened.
        let e = l
            .pick_disks(&found, Some("sda"), 1024)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("layout.lvm.volumes[1].size_mib:"), "{e}");
        let mut named = l.clone();
        named.disks = vec!["sdc".into(), "sdc".into()];
        named.lvm.as_mut().unwrap().volumes[1].size_mib = Some(512);
        let e = named
            .pick_disks(&found, None, 1024)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layout.disks[1]") && e.contains("as layout.disks[0] is"),
            "{e}"
        );
        // Nothing fits: the largest says why.
        let huge: DiskLayout = serde_json::from_str(r#"{"root_mib": 1048576}"#).unwrap();
        let e = huge.pick_disks(&found, None, 1024).unwrap_err().to_string();
        assert!(e.contains("does not fit disk sdb"), "{e}");
    }
}
