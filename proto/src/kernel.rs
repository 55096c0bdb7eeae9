//! The kernels an OS image carries and how a deploy chooses one: by name (`stable`,
//! `backports`) or by `uname -r`, at least a machine's minimum.

use serde::{Deserialize, Serialize};

/// One kernel of an OS image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImageKernel {
    /// The recipe's name for it (`stable`, `backports`).
    pub name: String,
    /// Its `uname -r`.
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("image {image} has no kernel {wanted:?}; it has: {have}")]
    Unknown {
        image: String,
        wanted: String,
        have: String,
    },
    #[error("image {image} lists no kernels to choose from (an image users brought)")]
    NoneListed { image: String },
    #[error("kernel {version} is older than the machine's minimum kernel {min}")]
    BelowMinimum { version: String, min: String },
    #[error("no kernel of image {image} is at least the machine's minimum {min}; it has: {have}")]
    NoneAtMinimum {
        image: String,
        min: String,
        have: String,
    },
}

/// The kernel a deploy of `image` boots: `wanted` (a name or a version) if given, else the
/// image's default (its first) if it is at least `min`, else the oldest kernel that is.
/// `None`: the image lists no kernels and nothing was asked, so it boots what it boots.
pub fn choose<'a>(
    image: &str,
    kernels: &'a [ImageKernel],
    wanted: Option<&str>,
    min: Option<&str>,
) -> Result<Option<&'a ImageKernel>, KernelError> {
    let have = || {
        kernels
            .iter()
            .map(|k| format!("{} ({})", k.name, k.version))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if kernels.is_empty() {
        return match (wanted, min) {
            (None, None) => Ok(None),
            _ => Err(KernelError::NoneListed {
                image: image.into(),
            }),
        };
    }
    let fits = |k: &ImageKernel| min.is_none_or(|m| at_least(&k.version, m));
    if let Some(w) = wanted {
        let k = kernels
            .iter()
            .find(|k| k.name == w || k.version == w)
            .ok_or_else(|| KernelError::Unknown {
                image: image.into(),
                wanted: w.into(),
                have: have(),
            })?;
        return match min {
            Some(m) if !fits(k) => Err(KernelError::BelowMinimum {
                version: k.version.clone(),
                min: m.into(),
            }),
            _ => Ok(Some(k)),
        };
    }
    if fits(&kernels[0]) {
        return Ok(Some(&kernels[0]));
    }
    kernels
        .iter()
        .filter(|k| fits(k))
        .min_by(|a, b| release(&a.version).cmp(&release(&b.version)))
        .map(Some)
        .ok_or_else(|| KernelError::NoneAtMinimum {
            image: image.into(),
            min: min.unwrap_or_default().into(),
            have: have(),
        })
}

/// The release numbers a `uname -r` or a minimum starts with: `6.12.95+deb12-amd64` is
/// `[6, 12, 95]`, `6.1` is `[6, 1]`.
pub fn release(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or_default()
        .split('.')
        .map_while(|p| p.parse().ok())
        .collect()
}

/// Whether `version` is at least `min`, by release numbers (`6.1.0-50-amd64` is at least
/// `6.1`, not at least `6.12`).
pub fn at_least(version: &str, min: &str) -> bool {
    release(version) >= release(min)
}

/// Whether `min` reads as a minimum kernel (`6`, `6.12`, `6.12.95`).
pub fn valid_minimum(min: &str) -> bool {
    !min.is_empty()
        && min.len() <= 32
        && min
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Debian's links at the root of an installed system (linux-base's default,
/// `link_in_boot = no`), pointed at `version`: the kernel and initrd the grub.cfg Stork
/// writes boots.
pub fn links(version: &str) -> [(&'static str, String); 2] {
    [
        ("vmlinuz", format!("boot/vmlinuz-{version}")),
        ("initrd.img", format!("boot/initrd.img-{version}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str, version: &str) -> ImageKernel {
        ImageKernel {
            name: name.into(),
            version: version.into(),
        }
    }

    #[test]
    fn releases_compare_by_number_not_by_text() {
        assert_eq!(release("6.12.95+deb12-amd64"), [6, 12, 95]);
        assert_eq!(release("6.1.0-50-amd64"), [6, 1, 0]);
        assert!(at_least("6.12.95+deb12-amd64", "6.2"));
        assert!(!at_least("6.1.0-50-amd64", "6.12"));
        assert!(at_least("6.1.0-50-amd64", "6.1"));
        assert!(valid_minimum("6.12") && !valid_minimum("6..1") && !valid_minimum("6.x"));
    }

    #[test]
    fn a_deploy_gets_the_kernel_asked_for_else_the_default_else_the_oldest_at_the_minimum() {
        let ks = [
            k("stable", "6.1.0-50-amd64"),
            k("backports", "6.12.95+deb12-amd64"),
        ];
        let pick = |w, m| choose("deb", &ks, w, m).map(|k| k.map(|k| k.name.as_str()));
        assert_eq!(pick(None, None), Ok(Some("stable")));
        assert_eq!(pick(Some("backports"), None), Ok(Some("backports")));
        assert_eq!(
            pick(Some("6.12.95+deb12-amd64"), None),
            Ok(Some("backports"))
        );
        assert_eq!(pick(None, Some("6.6")), Ok(Some("backports")));
        assert_eq!(
            pick(Some("stable"), Some("6.6")),
            Err(KernelError::BelowMinimum {
                version: "6.1.0-50-amd64".into(),
                min: "6.6".into()
            })
        );
        let e = pick(Some("hwe"), None).unwrap_err().to_string();
        assert!(
            e.contains("\"hwe\"") && e.contains("backports (6.12.95+deb12-amd64)"),
            "{e}"
        );
        assert!(matches!(
            pick(None, Some("7")),
            Err(KernelError::NoneAtMinimum { .. })
        ));
        assert_eq!(choose("up", &[], None, None), Ok(None));
        assert!(matches!(
            choose("up", &[], Some("stable"), None),
            Err(KernelError::NoneListed { .. })
        ));
    }
}
