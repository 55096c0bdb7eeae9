//! What kind of network-boot client sent a request, and which boot file it gets.
//!
//! One table ([`boot_file`]) maps client kinds to answers; a test enumerates it.

use dhcproto::v4::{DhcpOption, Message, OptionCode};

/// RFC 4578 option 93 processor architecture types (IANA registry).
pub mod arch {
    pub const BIOS: u16 = 0;
    /// 32-bit EFI: no x86-64 NBP runs there, so it is left unanswered.
    pub const EFI_IA32: u16 = 6;
    pub const EFI_X64: u16 = 7;
    pub const EFI_BC: u16 = 9;
    pub const EFI_ARM64: u16 = 11;
    pub const EFI_X64_HTTP: u16 = 16;
    pub const EFI_ARM64_HTTP: u16 = 19;
}

/// iPXE's own option space: option 175 carries its feature flags (iPXE `dhcp.h`).
pub const OPTION_IPXE_ENCAP: u8 = 175;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Already running iPXE: give it its boot script URL, never an NBP (that would loop).
    Ipxe,
    /// Legacy BIOS PXE ROM.
    PxeBios,
    /// UEFI firmware PXE on x86-64.
    PxeUefiX64,
    /// UEFI HTTP boot on x86-64.
    HttpUefiX64,
    PxeUefiArm64,
    HttpUefiArm64,
    /// A PXE client with an architecture we have no boot file for.
    PxeUnknown(u16),
    /// Not a network-boot client (an OS's own DHCP client): lease only.
    Plain,
}

fn option_bytes(msg: &Message, code: OptionCode) -> Option<&[u8]> {
    match msg.opts().get(code)? {
        DhcpOption::ClassIdentifier(v) | DhcpOption::UserClass(v) => Some(v),
        DhcpOption::Unknown(u) => Some(u.data()),
        _ => None,
    }
}

pub fn is_ipxe(msg: &Message) -> bool {
    // iPXE sends user class "iPXE" as raw bytes (not RFC 3004 length-prefixed) and always
    // includes its encapsulated option 175.
    let user_class = option_bytes(msg, OptionCode::UserClass)
        .is_some_and(|v| v.windows(4).any(|w| w == b"iPXE"));
    user_class || msg.opts().contains(OptionCode::Unknown(OPTION_IPXE_ENCAP))
}

pub fn classify(msg: &Message) -> ClientKind {
    if is_ipxe(msg) {
        return ClientKind::Ipxe;
    }
    let class = option_bytes(msg, OptionCode::ClassIdentifier).unwrap_or_default();
    let pxe = class.starts_with(b"PXEClient");
    let http = class.starts_with(b"HTTPClient");
    if !pxe && !http {
        return ClientKind::Plain;
    }
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => u16::from(*a),
        // PXE 2.1 requires option 93; without it assume the oldest kind, BIOS.
        _ => arch::BIOS,
    };
    match (arch, http) {
        (arch::BIOS, false) => ClientKind::PxeBios,
        (arch::EFI_X64 | arch::EFI_BC, false) => ClientKind::PxeUefiX64,
        (arch::EFI_X64_HTTP, _) | (arch::EFI_X64 | arch::EFI_BC, true) => ClientKind::HttpUefiX64,
        (arch::EFI_ARM64, false) => ClientKind::PxeUefiArm64,
        (arch::EFI_ARM64_HTTP, _) | (arch::EFI_ARM64, true) => ClientKind::HttpUefiArm64,
        (other, _) => ClientKind::PxeUnknown(other),
    }
}

/// What goes into the reply's boot fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAnswer {
    /// `file` field / option 67: a TFTP path or an absolute `http://` URL.
    pub file: String,
    /// Option 60 to send back. iPXE waits about 3 s for a proxyDHCP offer unless the offer
    /// says `PXEClient`; HTTP-boot firmware only accepts offers that say `HTTPClient`. EDK2's
    /// own PXE must NOT get `PXEClient` without option 43: it then treats the offer as a
    /// BINL offer, tries port 4011 and fails (PXE-E16).
    pub vendor_class: Option<&'static str>,
}

/// Network boot programs, as the image builder lays them out under `boot/`.
pub mod nbp {
    pub const BIOS: &str = "undionly.kpxe";
    /// snponly.efi uses the firmware's own NIC driver, which measured faster here than the
    /// full ipxe.efi (14.6 s against 19.2 s to the agent under TCG).
    pub const UEFI_X64: &str = "snponly.efi";
    pub const UEFI_ARM64: &str = "arm64/snponly.efi";
    /// The signed chain's first stage for UEFI x86-64 with Secure Boot (Debian's shim, which
    /// then fetches `grubx64.efi` from the same server: `stork-image loaders`).
    pub const UEFI_X64_SIGNED: &str = "shimx64.efi";
}

/// The one table from client kind to boot answer. `script_url` is the machine's iPXE script,
/// `http_base` the appliance's base URL (for UEFI HTTP boot, which needs absolute URLs);
/// `secure_boot` sends UEFI x86-64 PXE clients the signed shim instead of iPXE. HTTP boot
/// keeps iPXE: the signed network GRUB has TFTP only.
pub fn boot_file(
    kind: ClientKind,
    script_url: &str,
    http_base: &str,
    secure_boot: bool,
) -> Option<BootAnswer> {
    let tftp = |file: &str| BootAnswer {
        file: file.to_string(),
        vendor_class: None,
    };
    let http = |file: &str| BootAnswer {
        file: format!("{http_base}/boot/{file}"),
        vendor_class: Some("HTTPClient"),
    };
    match kind {
        ClientKind::Ipxe => Some(BootAnswer {
            file: script_url.to_string(),
            vendor_class: Some("PXEClient"),
        }),
        ClientKind::PxeBios => Some(tftp(nbp::BIOS)),
        ClientKind::PxeUefiX64 if secure_boot => Some(tftp(nbp::UEFI_X64_SIGNED)),
        ClientKind::PxeUefiX64 => Some(tftp(nbp::UEFI_X64)),
        ClientKind::HttpUefiX64 => Some(http(nbp::UEFI_X64)),
        ClientKind::PxeUefiArm64 => Some(tftp(nbp::UEFI_ARM64)),
        ClientKind::HttpUefiArm64 => Some(http(nbp::UEFI_ARM64)),
        ClientKind::PxeUnknown(_) | ClientKind::Plain => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{Architecture, MessageType, UnknownOption};

    fn discover(opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::default();
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m
    }

    fn class(s: &str) -> DhcpOption {
        DhcpOption::ClassIdentifier(s.as_bytes().to_vec())
    }
    fn arch(a: u16) -> DhcpOption {
        DhcpOption::ClientSystemArchitecture(Architecture::from(a))
    }

    #[test]
    fn classifies_the_clients_seen_here() {
        // Option values as captured from each client (docs/measurements.md, "Firmware and iPXE").
        let seabios_ipxe = discover(vec![
            class("PXEClient:Arch:00000:UNDI:002001"),
            DhcpOption::UserClass(b"iPXE".to_vec()),
            arch(0),
        ]);
        assert_eq!(classify(&seabios_ipxe), ClientKind::Ipxe);
        let ovmf = discover(vec![class("PXEClient:Arch:00007:UNDI:003000"), arch(7)]);
        assert_eq!(classify(&ovmf), ClientKind::PxeUefiX64);
        let ipxe_175_only = discover(vec![
            class("PXEClient:Arch:00007:UNDI:003010"),
            DhcpOption::Unknown(UnknownOption::new(OptionCode::Unknown(175), vec![1, 1, 1])),
            arch(7),
        ]);
        assert_eq!(classify(&ipxe_175_only), ClientKind::Ipxe);
        assert_eq!(classify(&discover(vec![])), ClientKind::Plain);
        assert_eq!(
            classify(&discover(vec![
                class("HTTPClient:Arch:00016:UNDI:003000"),
                arch(16)
            ])),
            ClientKind::HttpUefiX64
        );
        assert_eq!(
            classify(&discover(vec![class("PXEClient")])),
            ClientKind::PxeBios
        );
        assert_eq!(
            classify(&discover(vec![class("PXEClient"), arch(2)])),
            ClientKind::PxeUnknown(2)
        );
    }

    #[test]
    fn boot_file_table() {
        let script = "http://10.0.0.1:8080/ipxe/52:54:00:00:00:01";
        let base = "http://10.0.0.1:8080";
        let table = [
            (ClientKind::Ipxe, Some((script, Some("PXEClient")))),
            (ClientKind::PxeBios, Some(("undionly.kpxe", None))),
            (ClientKind::PxeUefiX64, Some(("snponly.efi", None))),
            (
                ClientKind::HttpUefiX64,
                Some(("http://10.0.0.1:8080/boot/snponly.efi", Some("HTTPClient"))),
            ),
            (ClientKind::PxeUefiArm64, Some(("arm64/snponly.efi", None))),
            (
                ClientKind::HttpUefiArm64,
                Some((
                    "http://10.0.0.1:8080/boot/arm64/snponly.efi",
                    Some("HTTPClient"),
                )),
            ),
            (ClientKind::PxeUnknown(2), None),
            (ClientKind::Plain, None),
        ];
        for (kind, want) in table {
            let got = boot_file(kind, script, base, false);
            let got = got.as_ref().map(|a| (a.file.as_str(), a.vendor_class));
            assert_eq!(got, want, "{kind:?}");
            // With Secure Boot only UEFI x86-64 PXE changes: to the signed shim.
            let signed = boot_file(kind, script, base, true);
            let signed = signed.as_ref().map(|a| (a.file.as_str(), a.vendor_class));
            if kind == ClientKind::PxeUefiX64 {
                assert_eq!(signed, Some(("shimx64.efi", None)));
            } else {
                assert_eq!(signed, want, "{kind:?} with secure_boot");
            }
        }
    }
}
