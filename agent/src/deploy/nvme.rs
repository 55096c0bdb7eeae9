//! NVMe secure erase: Format NVM with Secure Erase Settings 1 (user data erase), sent through
//! the kernel's admin passthrough (`NVME_IOCTL_ADMIN_CMD`) on the namespace's block device.
//!
//! The controller's Identify data says whether it can (OACS bit 1, Format NVM) and how
//! (FNA: a format or secure erase that applies to every namespace at once must be sent to the
//! broadcast namespace). The namespace keeps its LBA format, metadata and protection settings
//! (from its own Identify data), so the disk's size and block size do not change. Sanitize
//! (SANICAP) is reported but not used: it acts on the whole subsystem, runs in the background
//! and leaves a failed drive refusing I/O until a later sanitize succeeds; Format NVM is
//! synchronous and what every Format-capable controller (QEMU's included) implements.
//!
//! The command layouts are from the NVM Express Base Specification 2.0 (Identify, Format NVM)
//! and `<linux/nvme_ioctl.h>`. Parsing and command building are pure; the two ioctls are the
//! only `unsafe`, each on a file the caller opened.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::errno::Errno;

/// Admin opcodes.
const IDENTIFY: u8 = 0x06;
const FORMAT_NVM: u8 = 0x80;
/// Identify CNS values.
const CNS_NAMESPACE: u32 = 0x00;
const CNS_CONTROLLER: u32 = 0x01;
const IDENTIFY_LEN: usize = 4096;
/// Every namespace of the controller.
const BROADCAST_NSID: u32 = 0xFFFF_FFFF;
/// Secure Erase Settings: user data erase.
const SES_USER_DATA: u32 = 1;
/// How long the kernel lets a Format NVM run before it aborts the command: a user data erase
/// of a large drive can take minutes; the appliance's busy-status timeout is the outer bound.
const FORMAT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `struct nvme_passthru_cmd` of `<linux/nvme_ioctl.h>` (72 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);

mod ioctl {
    // NVME_IOCTL_ID = _IO('N', 0x40): the namespace id of a namespace's block device.
    nix::ioctl_none!(nvme_id, b'N', 0x40);
    // NVME_IOCTL_ADMIN_CMD = _IOWR('N', 0x41, struct nvme_admin_cmd).
    nix::ioctl_readwrite!(nvme_admin_cmd, b'N', 0x41, super::PassthruCmd);
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("{what}: the ioctl failed")]
    Ioctl {
        what: &'static str,
        #[source]
        source: Errno,
    },
    /// The controller completed the command with an error: Status Code Type and Status Code
    /// as the kernel returns them (bits 10:8 and 7:0).
    #[error("{what}: the controller answered status {status:#05x} ({})", describe_status(*status))]
    Status { what: &'static str, status: u32 },
}

/// The Identify Controller fields an erase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub model: String,
    /// Optional Admin Command Support (bytes 257:256).
    pub oacs: u16,
    /// Format NVM Attributes (byte 524).
    pub fna: u8,
    /// Sanitize Capabilities (bytes 331:328).
    pub sanicap: u32,
}

impl Controller {
    pub fn parse(id: &[u8]) -> Option<Self> {
        let id = id.get(..IDENTIFY_LEN)?;
        Some(Self {
            model: String::from_utf8_lossy(&id[24..64]).trim().to_string(),
            oacs: u16::from_le_bytes([id[256], id[257]]),
            fna: id[524],
            sanicap: u32::from_le_bytes([id[328], id[329], id[330], id[331]]),
        })
    }

    /// OACS bit 1: Format NVM is supported.
    pub fn can_format(&self) -> bool {
        self.oacs & (1 << 1) != 0
    }

    /// FNA bits 0 and 1: a format, or a secure erase, applies to every namespace; such a
    /// controller wants the broadcast namespace id.
    pub fn erases_all_namespaces(&self) -> bool {
        self.fna & 0b11 != 0
    }

    /// What SANICAP offers, for the event ("none" when nothing).
    pub fn sanitize(&self) -> String {
        let names = [(0, "crypto erase"), (1, "block erase"), (2, "overwrite")];
        let have: Vec<&str> = names
            .iter()
            .filter(|(bit, _)| self.sanicap & (1 << bit) != 0)
            .map(|(_, n)| *n)
            .collect();
        if have.is_empty() {
            "none".into()
        } else {
            have.join(", ")
        }
    }
}

/// The Identify Namespace fields a format must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Formatted LBA Size (byte 26): format index bits 3:0 and 6:5, metadata setting bit 4.
    pub flbas: u8,
    /// End-to-end Data Protection Type Settings (byte 29): PI type bits 2:0, location bit 3.
    pub dps: u8,
}

impl Namespace {
    pub fn parse(id: &[u8]) -> Option<Self> {
        let id = id.get(..IDENTIFY_LEN)?;
        Some(Self {
            flbas: id[26],
            dps: id[29],
        })
    }

    /// Format NVM's command dword 10 for this namespace's current format with `ses`: LBAF
    /// (3:0), MSET (4), PI (7:5), PIL (8), SES (11:9), LBAFU (13:12).
    pub fn format_cdw10(&self, ses: u32) -> u32 {
        let flbas = u32::from(self.flbas);
        let dps = u32::from(self.dps);
        let lbaf = flbas & 0xF;
        let mset = (flbas >> 4) & 1;
        let lbafu = (flbas >> 5) & 0b11;
        let pi = dps & 0b111;
        let pil = (dps >> 3) & 1;
        lbaf | mset << 4 | pi << 5 | pil << 8 | (ses & 0b111) << 9 | lbafu << 12
    }
}

/// What [`secure_erase`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Format NVM with user data erase completed; how, for the event.
    Formatted(String),
    /// Not an NVMe namespace, or its controller cannot format: why, for the event.
    Unsupported(String),
}

/// Erases the NVMe namespace open as `file` with Format NVM (user data erase), keeping its
/// format. Blocks until the controller is done.
pub fn secure_erase(file: &File) -> Result<Outcome, NvmeError> {
    let fd = file.as_raw_fd();
    // SAFETY: NVME_IOCTL_ID takes no argument.
    let nsid = match unsafe { ioctl::nvme_id(fd) } {
        Ok(n) => u32::try_from(n).unwrap_or(0),
        // ENOTTY: not an NVMe device at all.
        Err(Errno::ENOTTY | Errno::EINVAL) => {
            return Ok(Outcome::Unsupported("not an NVMe namespace".into()));
        }
        Err(source) => {
            return Err(NvmeError::Ioctl {
                what: "NVME_IOCTL_ID",
                source,
            });
        }
    };
    let ctrl = Controller::parse(&identify(fd, CNS_CONTROLLER, 0)?).ok_or(NvmeError::Status {
        what: "Identify Controller",
        status: 0,
    })?;
    if !ctrl.can_format() {
        return Ok(Outcome::Unsupported(format!(
            "{} has no Format NVM (OACS {:#06x}; sanitize: {})",
            ctrl.model,
            ctrl.oacs,
            ctrl.sanitize()
        )));
    }
    let ns = Namespace::parse(&identify(fd, CNS_NAMESPACE, nsid)?).ok_or(NvmeError::Status {
        what: "Identify Namespace",
        status: 0,
    })?;
    let target = if ctrl.erases_all_namespaces() {
        BROADCAST_NSID
    } else {
        nsid
    };
    let mut cmd = PassthruCmd {
        opcode: FORMAT_NVM,
        nsid: target,
        cdw10: ns.format_cdw10(SES_USER_DATA),
        timeout_ms: u32::try_from(FORMAT_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
        ..PassthruCmd::default()
    };
    admin(fd, &mut cmd, "Format NVM")?;
    Ok(Outcome::Formatted(format!(
        "NVMe Format NVM, user data erase (SES 1), of namespace {}{} on {} (sanitize: {})",
        nsid,
        if target == BROADCAST_NSID {
            " and every other namespace of its controller (FNA)"
        } else {
            ""
        },
        ctrl.model,
        ctrl.sanitize()
    )))
}

fn identify(fd: i32, cns: u32, nsid: u32) -> Result<Vec<u8>, NvmeError> {
    let mut data = vec![0u8; IDENTIFY_LEN];
    let mut cmd = PassthruCmd {
        opcode: IDENTIFY,
        nsid,
        addr: data.as_mut_ptr() as u64,
        data_len: IDENTIFY_LEN as u32,
        cdw10: cns,
        ..PassthruCmd::default()
    };
    let what = if cns == CNS_CONTROLLER {
        "Identify Controller"
    } else {
        "Identify Namespace"
    };
    admin(fd, &mut cmd, what)?;
    Ok(data)
}

fn admin(fd: i32, cmd: &mut PassthruCmd, what: &'static str) -> Result<(), NvmeError> {
    // SAFETY: the kernel reads the 72-byte command through the pointer and writes its
    // `result`; `addr`/`data_len`, when set, describe a buffer the caller keeps alive and
    // large enough for the command's data.
    match unsafe { ioctl::nvme_admin_cmd(fd, cmd) } {
        Ok(0) => Ok(()),
        Ok(status) => Err(NvmeError::Status {
            what,
            status: u32::try_from(status).unwrap_or(0),
        }),
        Err(source) => Err(NvmeError::Ioctl { what, source }),
    }
}

/// The common generic statuses by name (Base Specification, Figure 102 and 103).
fn describe_status(status: u32) -> &'static str {
    match status & 0x7FF {
        0x001 => "invalid command opcode",
        0x002 => "invalid field in command",
        0x00B => "invalid namespace or format",
        0x10A => "invalid format",
        0x115 => "namespace is write protected",
        _ => "see the NVMe specification",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identify_controller(oacs: u16, fna: u8, sanicap: u32) -> Vec<u8> {
        let mut id = vec![0u8; IDENTIFY_LEN];
        id[24..64].copy_from_slice(&[b' '; 40]);
        id[24..34].copy_from_slice(b"QEMU NVMe ");
        id[256..258].copy_from_slice(&oacs.to_le_bytes());
        id[328..332].copy_from_slice(&sanicap.to_le_bytes());
        id[524] = fna;
        id
    }

    #[test]
    fn reads_what_an_erase_needs_from_identify_controller() {
        // QEMU's: Namespace Management, Format NVM, Doorbell Buffer Config; no sanitize.
        let c = Controller::parse(&identify_controller(0x010A, 0, 0)).unwrap();
        assert_eq!(c.model, "QEMU NVMe");
        assert!(c.can_format() && !c.erases_all_namespaces());
        assert_eq!(c.sanitize(), "none");
        let c = Controller::parse(&identify_controller(0x0004, 0b110, 0b011)).unwrap();
        assert!(!c.can_format() && c.erases_all_namespaces());
        assert_eq!(c.sanitize(), "crypto erase, block erase");
        assert_eq!(Controller::parse(&[0; 100]), None);
    }

    #[test]
    fn a_format_keeps_the_namespace_format_and_asks_for_user_data_erase() {
        // LBA format 0, no metadata, no protection: SES 1 only.
        let plain = Namespace { flbas: 0, dps: 0 };
        assert_eq!(plain.format_cdw10(SES_USER_DATA), 1 << 9);
        // Format 2 with metadata at the end of the LBA, PI type 1 first in the metadata.
        let pi = Namespace {
            flbas: 0x12,
            dps: 0b1001,
        };
        assert_eq!(
            pi.format_cdw10(SES_USER_DATA),
            2 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9
        );
        // Format 17 (index bits 6:5 hold the upper two bits of 6 bits).
        let high = Namespace {
            flbas: 0x21,
            dps: 0,
        };
        assert_eq!(high.format_cdw10(SES_USER_DATA), 1 | 1 << 9 | 1 << 12);
        let mut id = vec![0u8; IDENTIFY_LEN];
        id[26] = 0x12;
        id[29] = 0b1001;
        assert_eq!(Namespace::parse(&id), Some(pi));
    }

    #[test]
    fn statuses_are_named() {
        let e = NvmeError::Status {
            what: "Format NVM",
            status: 0x10A,
        };
        assert_eq!(
            e.to_string(),
            "Format NVM: the controller answered status 0x10a (invalid format)"
        );
    }

    #[test]
    fn a_regular_file_is_not_an_nvme_namespace() {
        let f = tempfile::tempfile().unwrap();
        assert_eq!(
            secure_erase(&f).unwrap(),
            Outcome::Unsupported("not an NVMe namespace".into())
        );
    }
}
