//! What a machine's firmware and iPXE say on the wire before a kernel runs: DHCP as a PXE
//! ROM, UEFI PXE, UEFI HTTP boot or iPXE sends it (options 60, 77, 93, 94, 97, 175, the
//! values captured from each client: docs/measurements.md), TFTP of the network boot program
//! with the options the firmware negotiates, and the retries of each.

use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dhcproto::v4::{
    Architecture, DhcpOption, Flags, Message, MessageType, Opcode as BootOp, OptionCode,
    UnknownOption,
};
use dhcproto::{Decodable, Encodable};
use serde::{Deserialize, Serialize};
use stork::dhcp::client::{OPTION_IPXE_ENCAP, arch};
use stork::tftp::packet::{Opcode, Options, Packet};

use crate::net::{HostId, Net, UdpSocket};

/// The firmware a simulated machine network-boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// A BIOS PXE ROM: TFTP of `undionly.kpxe`, blocks of 1,456 bytes, one at a time.
    BiosPxe,
    /// UEFI PXE (EDK2): TFTP of `snponly.efi`, blocks of 1,468 bytes in windows of 4.
    UefiPxe,
    /// UEFI HTTP boot: the boot file is a URL.
    UefiHttp,
}

impl Firmware {
    fn arch(self) -> u16 {
        match self {
            Firmware::BiosPxe => arch::BIOS,
            Firmware::UefiPxe => arch::EFI_X64,
            Firmware::UefiHttp => arch::EFI_X64_HTTP,
        }
    }

    fn vendor_class(self) -> &'static str {
        match self {
            Firmware::BiosPxe => "PXEClient:Arch:00000:UNDI:002001",
            Firmware::UefiPxe => "PXEClient:Arch:00007:UNDI:003016",
            Firmware::UefiHttp => "HTTPClient:Arch:00016:UNDI:003001",
        }
    }

    /// TFTP options as the firmware asks them: (blksize, windowsize).
    pub fn tftp_options(self) -> (u16, u16) {
        match self {
            Firmware::BiosPxe => (1456, 1),
            Firmware::UefiPxe | Firmware::UefiHttp => (1468, 4),
        }
    }
}

/// Who is asking: the firmware itself, or iPXE it loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Firmware(Firmware),
    Ipxe(Firmware),
    /// An installed OS's own DHCP client: no boot options.
    Os,
}

/// What an exchange ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Option 54.
    pub server: Ipv4Addr,
    /// `siaddr`, else the server.
    pub next_server: Ipv4Addr,
    /// `file` or option 67: a TFTP path or a URL.
    pub file: String,
}

/// PXE's DISCOVER timeouts (PXE 2.1: 4, 8, 16 and 32 s); iPXE's are shorter, the
/// simulation uses these for both.
const DISCOVER_WAITS: [u64; 4] = [4, 8, 16, 32];
const REQUEST_WAITS: [u64; 3] = [4, 8, 16];

fn message(mac: [u8; 6], xid: u32, kind: MessageType, client: Client) -> Message {
    let mut m = Message::default();
    m.set_opcode(BootOp::BootRequest)
        .set_xid(xid)
        .set_chaddr(&mac)
        .set_flags(Flags::default().set_broadcast());
    let (fw, ipxe) = match client {
        Client::Firmware(f) => (f, false),
        Client::Ipxe(f) => (f, true),
        Client::Os => {
            m.opts_mut().insert(DhcpOption::MessageType(kind));
            return m;
        }
    };
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::MaxMessageSize(1472));
    o.insert(DhcpOption::ClassIdentifier(
        fw.vendor_class().as_bytes().to_vec(),
    ));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
        fw.arch(),
    )));
    o.insert(DhcpOption::Unknown(UnknownOption::new(
        OptionCode::Unknown(94),
        vec![1, 3, 16],
    )));
    let mut guid = vec![0u8];
    guid.extend_from_slice(&[0x5a; 10]);
    guid.extend_from_slice(&mac);
    o.insert(DhcpOption::Unknown(UnknownOption::new(
        OptionCode::Unknown(97),
        guid,
    )));
    o.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::ClassIdentifier,
        OptionCode::BootfileName,
        OptionCode::TFTPServerName,
    ]));
    if ipxe {
        o.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        // iPXE's feature flags: HTTP (0x13), DNS (0x17), bzImage (0x18).
        o.insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::Unknown(OPTION_IPXE_ENCAP),
            vec![0x13, 1, 1, 0x17, 1, 1, 0x18, 1, 1],
        )));
    }
    m
}

fn decode(payload: &[u8]) -> Option<Message> {
    Message::decode(&mut dhcproto::Decoder::new(payload)).ok()
}

fn message_type(m: &Message) -> Option<MessageType> {
    match m.opts().get(OptionCode::MessageType)? {
        DhcpOption::MessageType(t) => Some(*t),
        _ => None,
    }
}

fn boot_file(m: &Message) -> String {
    if let Some(DhcpOption::BootfileName(f)) = m.opts().get(OptionCode::BootfileName) {
        return String::from_utf8_lossy(f)
            .trim_end_matches('\0')
            .to_string();
    }
    m.fname()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim_end_matches('\0')
                .to_string()
        })
        .unwrap_or_default()
}

fn lease_of(m: &Message) -> Option<Lease> {
    let server = match m.opts().get(OptionCode::ServerIdentifier)? {
        DhcpOption::ServerIdentifier(s) => *s,
        _ => return None,
    };
    let prefix = match m.opts().get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => u32::from(*mask).count_ones() as u8,
        _ => 24,
    };
    let gateway = match m.opts().get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let siaddr = m.siaddr();
    Some(Lease {
        ip: m.yiaddr(),
        prefix,
        gateway,
        server,
        next_server: if siaddr.is_unspecified() {
            server
        } else {
            siaddr
        },
        file: boot_file(m),
    })
}

/// One DORA as `client` does it; the lease's address is configured on the host.
pub async fn dhcp(net: &Rc<Net>, host: HostId, mac: [u8; 6], client: Client) -> Result<Lease> {
    let xid: u32 = rand::random();
    net.clear_dhcp(host);
    let discover = message(mac, xid, MessageType::Discover, client).to_vec()?;
    let mut offer = None;
    'discover: for wait in DISCOVER_WAITS {
        net.send_dhcp(host, &discover, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
        let until = tokio::time::Instant::now() + Duration::from_secs(wait);
        while let Some(left) = until.checked_duration_since(tokio::time::Instant::now()) {
            let Some(payload) = net.recv_dhcp(host, left).await else {
                break;
            };
            let Some(m) = decode(&payload) else { continue };
            if m.xid() != xid || message_type(&m) != Some(MessageType::Offer) {
                continue;
            }
            if let Some(lease) = lease_of(&m).filter(|l| !l.ip.is_unspecified()) {
                offer = Some(lease);
                break 'discover;
            }
        }
    }
    let offer = offer.context("no DHCP offer after 4 DISCOVERs (60 s)")?;
    let mut request = message(mac, xid, MessageType::Request, client);
    request
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.ip));
    request
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(offer.server));
    let request = request.to_vec()?;
    for wait in REQUEST_WAITS {
        net.send_dhcp(host, &request, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
        let until = tokio::time::Instant::now() + Duration::from_secs(wait);
        while let Some(left) = until.checked_duration_since(tokio::time::Instant::now()) {
            let Some(payload) = net.recv_dhcp(host, left).await else {
                break;
            };
            let Some(m) = decode(&payload) else { continue };
            if m.xid() != xid {
                continue;
            }
            match message_type(&m) {
                Some(MessageType::Ack) => {
                    let lease = lease_of(&m).context("an ACK without a server identifier")?;
                    net.configure(host, lease.ip, lease.prefix, lease.gateway);
                    return Ok(lease);
                }
                Some(MessageType::Nak) => bail!("DHCP NAK for {}", offer.ip),
                _ => {}
            }
        }
    }
    bail!("no DHCP ACK for {} after 3 REQUESTs", offer.ip)
}

/// TFTP's per-packet timeout and tries, as PXE ROMs use them.
const TFTP_TIMEOUT: Duration = Duration::from_secs(2);
const TFTP_TRIES: u32 = 6;

fn rrq(file: &str, blksize: u16, windowsize: u16) -> Vec<u8> {
    let mut p = vec![0, 1];
    for s in [file, "octet", "blksize", &blksize.to_string(), "tsize", "0"] {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    if windowsize > 1 {
        for s in ["windowsize", &windowsize.to_string()] {
            p.extend_from_slice(s.as_bytes());
            p.push(0);
        }
    }
    p
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// Reads `file` from `server` over TFTP; returns its size (the bytes are counted, not kept).
pub async fn tftp_get(
    net: &Rc<Net>,
    host: HostId,
    server: Ipv4Addr,
    file: &str,
    firmware: Firmware,
) -> Result<u64> {
    let (mut blksize, mut window) = firmware.tftp_options();
    let socket = UdpSocket::bind(net, host)?;
    let request = rrq(file, blksize, window);
    let mut buf = vec![0u8; 65536];
    let mut peer: Option<(Ipv4Addr, u16)> = None;
    let mut last_sent = request.clone();
    let mut to = (server, 69);
    let mut got: u64 = 0;
    let mut expected: u16 = 1;
    let mut in_window: u16 = 0;
    let mut tries = 0;
    socket.send_to(&request, to)?;
    loop {
        let Some((n, from)) = socket.recv_from(&mut buf, TFTP_TIMEOUT).await? else {
            tries += 1;
            if tries >= TFTP_TRIES {
                bail!("TFTP {file}: no answer after {TFTP_TRIES} tries (at {got} bytes)");
            }
            socket.send_to(&last_sent, to)?;
            in_window = 0;
            continue;
        };
        if from.0 != server || peer.is_some_and(|p| p != from) {
            continue;
        }
        let Ok(p) = Packet::new_checked(&buf[..n]) else {
            continue;
        };
        match p.opcode() {
            Some(Opcode::Oack) if peer.is_none() => {
                peer = Some(from);
                to = from;
                // An option the OACK leaves out is refused: RFC 1350's value holds for it.
                (blksize, window) = (512, 1);
                if let Ok(opts) = Options::parse(p.strings()) {
                    for (name, value) in opts.iter() {
                        let v = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                        match (name.to_ascii_lowercase().as_slice(), v) {
                            (b"blksize", Some(v)) => blksize = v,
                            (b"windowsize", Some(v)) => window = v,
                            _ => {}
                        }
                    }
                }
                last_sent = ack(0).to_vec();
                socket.send_to(&last_sent, to)?;
                tries = 0;
            }
            Some(Opcode::Data) => {
                if peer.is_none() {
                    // The server ignored the options: RFC 1350's 512-byte blocks.
                    peer = Some(from);
                    to = from;
                    blksize = 512;
                    window = 1;
                }
                let block = p.block().unwrap_or(0);
                if block != expected {
                    // Out of order (a lost block): ack what we have, the server resends.
                    last_sent = ack(expected.wrapping_sub(1)).to_vec();
                    socket.send_to(&last_sent, to)?;
                    in_window = 0;
                    continue;
                }
                tries = 0;
                let data = p.rest().len();
                got += data as u64;
                in_window += 1;
                let last = data < usize::from(blksize);
                if last || in_window >= window {
                    last_sent = ack(block).to_vec();
                    socket.send_to(&last_sent, to)?;
                    in_window = 0;
                }
                expected = expected.wrapping_add(1);
                if last {
                    return Ok(got);
                }
            }
            Some(Opcode::Error) => {
                let msg = String::from_utf8_lossy(p.rest());
                bail!(
                    "TFTP {file}: the server says {}",
                    msg.trim_end_matches('\0')
                )
            }
            _ => {}
        }
    }
}
