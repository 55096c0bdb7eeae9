//! DHCPv4 protocol logic, sans I/O: one request in, a reply (with where it goes) or the
//! reason it was ignored out. Time is passed in so tests replay transcripts exactly.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use stork_proto::MacAddr;

use super::client::{self, BootAnswer, ClientKind};
use super::pool::{Pool, PoolError};
use crate::config::DhcpConfig;

/// Everything the handler needs to know about this server.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub server_ip: Ipv4Addr,
    /// e.g. `http://10.77.0.1:8080`.
    pub http_base: String,
    pub dhcp: DhcpConfig,
}

#[derive(Debug)]
pub struct Reply {
    pub msg: Message,
    pub to: SocketAddrV4,
}

/// Why a request got no answer; counted and logged by the I/O layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not a BOOTREQUEST")]
    NotRequest,
    #[error("no DHCP message type (plain BOOTP is not served)")]
    NoMessageType,
    #[error("hardware address is not 6-byte Ethernet")]
    BadChaddr,
    #[error("{0:?} is not handled")]
    Unhandled(MessageType),
    #[error("client chose server {0}")]
    OtherServer(Ipv4Addr),
    #[error("relayed from {0}, which is outside our subnet")]
    ForeignRelay(Ipv4Addr),
    #[error("no address to offer: {0}")]
    NoAddress(PoolError),
    #[error("release processed")]
    Released,
    #[error("request has no address to confirm")]
    NothingRequested,
}

#[derive(Debug)]
pub enum Outcome {
    Reply(Reply),
    Ignore(Ignored),
}

pub struct Handler {
    info: ServerInfo,
    pool: Pool,
}

impl Handler {
    pub fn new(info: ServerInfo) -> Self {
        let (start, end) = info.dhcp.range;
        Self {
            pool: Pool::new(start, end),
            info,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn handle(&mut self, req: &Message, now: SystemTime) -> Outcome {
        match self.decide(req, now) {
            Ok(reply) => Outcome::Reply(reply),
            Err(why) => Outcome::Ignore(why),
        }
    }

    fn decide(&mut self, req: &Message, now: SystemTime) -> Result<Reply, Ignored> {
        if req.opcode() != Opcode::BootRequest {
            return Err(Ignored::NotRequest);
        }
        let msg_type = req.opts().msg_type().ok_or(Ignored::NoMessageType)?;
        if req.hlen() != 6 {
            return Err(Ignored::BadChaddr);
        }
        let mac = MacAddr::from_slice(req.chaddr()).ok_or(Ignored::BadChaddr)?;
        let giaddr = req.giaddr();
        if !giaddr.is_unspecified() && !self.info.dhcp.subnet.contains(giaddr) {
            // One subnet for now: a relay on another network has no pool here.
            return Err(Ignored::ForeignRelay(giaddr));
        }
        match msg_type {
            MessageType::Discover => {
                let requested = requested_ip(req);
                let lease = self
                    .pool
                    .offer(mac, requested, now)
                    .map_err(Ignored::NoAddress)?;
                Ok(self.reply(req, MessageType::Offer, mac, Some(lease.ip)))
            }
            MessageType::Request => self.request(req, mac, now),
            MessageType::Release => {
                self.pool.release(&mac, req.ciaddr());
                Err(Ignored::Released)
            }
            MessageType::Inform => Ok(self.reply(req, MessageType::Ack, mac, None)),
            other => Err(Ignored::Unhandled(other)),
        }
    }

    fn request(&mut self, req: &Message, mac: MacAddr, now: SystemTime) -> Result<Reply, Ignored> {
        if let Some(DhcpOption::ServerIdentifier(sid)) =
            req.opts().get(OptionCode::ServerIdentifier)
            && *sid != self.info.server_ip
        {
            // SELECTING another server's offer: drop the address we held for this client.
            if let Some(l) = self.pool.lease_of(&mac).copied() {
                self.pool.release(&mac, l.ip);
            }
            return Err(Ignored::OtherServer(*sid));
        }
        let ip = requested_ip(req)
            .or_else(|| (!req.ciaddr().is_unspecified()).then_some(req.ciaddr()))
            .ok_or(Ignored::NothingRequested)?;
        let lease_time = Duration::from_secs(u64::from(self.info.dhcp.lease_time));
        match self.pool.bind(mac, ip, lease_time, now) {
            Ok(lease) => Ok(self.reply(req, MessageType::Ack, mac, Some(lease.ip))),
            Err(_) => Ok(self.reply(req, MessageType::Nak, mac, None)),
        }
    }

    fn reply(
        &self,
        req: &Message,
        kind: MessageType,
        mac: MacAddr,
        yiaddr: Option<Ipv4Addr>,
    ) -> Reply {
        let info = &self.info;
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootReply)
            .set_htype(req.htype())
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_giaddr(req.giaddr())
            .set_chaddr(req.chaddr());
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(info.server_ip));
        if kind != MessageType::Nak {
            if let Some(ip) = yiaddr {
                msg.set_yiaddr(ip);
                msg.opts_mut()
                    .insert(DhcpOption::AddressLeaseTime(info.dhcp.lease_time));
            } else {
                // INFORM: the client already has its address.
                msg.set_ciaddr(req.ciaddr());
            }
            msg.set_siaddr(info.server_ip);
            let opts = msg.opts_mut();
            opts.insert(DhcpOption::SubnetMask(info.dhcp.subnet.mask()));
            if let Some(r) = info.dhcp.router {
                opts.insert(DhcpOption::Router(vec![r]));
            }
            if !info.dhcp.dns.is_empty() {
                opts.insert(DhcpOption::DomainNameServer(info.dhcp.dns.clone()));
            }
            if let Some(boot) = self.boot_answer(req, mac) {
                if boot.file.len() < 128 {
                    msg.set_fname_str(&boot.file);
                }
                let opts = msg.opts_mut();
                opts.insert(DhcpOption::BootfileName(boot.file.into_bytes()));
                if let Some(vc) = boot.vendor_class {
                    opts.insert(DhcpOption::ClassIdentifier(vc.as_bytes().to_vec()));
                }
            }
        }
        if let Some(o82) = req.opts().get(OptionCode::RelayAgentInformation) {
            // RFC 3046: echo the relay's option back unchanged.
            msg.opts_mut().insert(o82.clone());
        }
        let to = destination(req, kind);
        Reply { msg, to }
    }

    fn boot_answer(&self, req: &Message, mac: MacAddr) -> Option<BootAnswer> {
        let kind = client::classify(req);
        if kind == ClientKind::Plain {
            return None;
        }
        let script = format!("{}/ipxe/{mac}", self.info.http_base);
        client::boot_file(kind, &script, &self.info.http_base)
    }
}

fn requested_ip(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

/// RFC 2131 section 4.1: where a server's reply goes.
fn destination(req: &Message, kind: MessageType) -> SocketAddrV4 {
    let giaddr = req.giaddr();
    if !giaddr.is_unspecified() {
        return SocketAddrV4::new(giaddr, dhcproto::v4::SERVER_PORT);
    }
    let client = |ip| SocketAddrV4::new(ip, dhcproto::v4::CLIENT_PORT);
    let ciaddr = req.ciaddr();
    if kind != MessageType::Nak && !ciaddr.is_unspecified() {
        return client(ciaddr);
    }
    // Unicasting to yiaddr would need an ARP entry injected first; broadcasting is always
    // allowed and every client here accepts it.
    client(Ipv4Addr::BROADCAST)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use dhcproto::v4::{Decodable, Decoder, Encodable};

    fn handler() -> Handler {
        let cfg = FileConfig::default().validate().unwrap();
        Handler::new(ServerInfo {
            server_ip: cfg.address,
            http_base: cfg.base_url(),
            dhcp: cfg.dhcp,
        })
    }

    /// A DHCPDISCOVER and the REQUEST that followed it, captured with tcpdump from iPXE's
    /// ROM under SeaBIOS in the QEMU lab (UDP payloads).
    const IPXE_DISCOVER: &[u8] = include_bytes!("testdata_ipxe_discover.bin");
    const IPXE_REQUEST: &[u8] = include_bytes!("testdata_ipxe_request.bin");

    fn decode(bytes: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(bytes)).unwrap()
    }

    fn ipxe_discover() -> Message {
        decode(IPXE_DISCOVER)
    }

    fn request_for(offer: &Message, discover: &Message) -> Message {
        let mut r = discover.clone();
        let o = r.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Request));
        o.insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 1)));
        r
    }

    fn reply(o: Outcome) -> Reply {
        match o {
            Outcome::Reply(r) => r,
            Outcome::Ignore(why) => panic!("ignored: {why}"),
        }
    }

    fn opt_bytes(m: &Message, code: OptionCode) -> Option<Vec<u8>> {
        match m.opts().get(code)? {
            DhcpOption::BootfileName(v) | DhcpOption::ClassIdentifier(v) => Some(v.clone()),
            _ => None,
        }
    }

    #[test]
    fn captured_ipxe_packets_parse_as_ipxe() {
        let d = ipxe_discover();
        assert_eq!(d.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(client::classify(&d), ClientKind::Ipxe);
        assert_eq!(
            d.chaddr().get(..6),
            Some(&[0x52, 0x54, 0, 0x12, 0x34, 0x56][..])
        );
        let r = decode(IPXE_REQUEST);
        assert_eq!(r.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(r.xid(), d.xid());
    }

    #[test]
    fn captured_request_is_acked_after_the_offer() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH;
        let offer = reply(h.handle(&ipxe_discover(), t));
        // The captured REQUEST asked for 10.77.0.100 from server 10.77.0.1: the first address.
        let ack = reply(h.handle(&decode(IPXE_REQUEST), t));
        assert_eq!(ack.msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.msg.yiaddr(), offer.msg.yiaddr());
    }

    #[test]
    fn truncated_or_garbage_packets_fail_to_decode_without_panicking() {
        for len in 0..IPXE_DISCOVER.len() {
            let _ = Message::decode(&mut Decoder::new(&IPXE_DISCOVER[..len]));
        }
        assert!(Message::decode(&mut Decoder::new(b"garbage")).is_err());
    }

    #[test]
    fn ipxe_discover_request_ack_transcript() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = ipxe_discover();
        let offer = reply(h.handle(&d, t));
        assert_eq!(offer.msg.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.msg.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(offer.msg.xid(), d.xid());
        assert_eq!(offer.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        let script = b"http://10.77.0.1:8080/ipxe/52:54:00:12:34:56".to_vec();
        assert_eq!(
            opt_bytes(&offer.msg, OptionCode::BootfileName),
            Some(script.clone())
        );
        assert_eq!(offer.msg.fname(), Some(&script[..]));
        assert_eq!(
            opt_bytes(&offer.msg, OptionCode::ClassIdentifier),
            Some(b"PXEClient".to_vec())
        );
        // The reply encodes and decodes cleanly.
        let wire = offer.msg.to_vec().unwrap();
        Message::decode(&mut Decoder::new(&wire)).unwrap();

        let ack = reply(h.handle(&request_for(&offer.msg, &d), t));
        assert_eq!(ack.msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.msg.yiaddr(), offer.msg.yiaddr());
        assert!(matches!(
            ack.msg.opts().get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        ));
    }

    #[test]
    fn a_plain_client_gets_no_boot_file() {
        let mut h = handler();
        let mut d = ipxe_discover();
        d.opts_mut().remove(OptionCode::UserClass);
        d.opts_mut().remove(OptionCode::ClassIdentifier);
        d.opts_mut().remove(OptionCode::Unknown(175));
        let offer = reply(h.handle(&d, SystemTime::UNIX_EPOCH));
        assert_eq!(opt_bytes(&offer.msg, OptionCode::BootfileName), None);
        assert_eq!(opt_bytes(&offer.msg, OptionCode::ClassIdentifier), None);
    }

    #[test]
    fn request_for_another_server_is_ignored_and_frees_the_offer() {
        let mut h = handler();
        let d = ipxe_discover();
        let offer = reply(h.handle(&d, SystemTime::UNIX_EPOCH));
        let mut r = request_for(&offer.msg, &d);
        r.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 2)));
        assert!(matches!(
            h.handle(&r, SystemTime::UNIX_EPOCH),
            Outcome::Ignore(Ignored::OtherServer(_))
        ));
        assert!(
            h.pool()
                .lease_of(&MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
                .is_none()
        );
    }

    #[test]
    fn request_for_a_taken_address_is_naked() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH;
        let d = ipxe_discover();
        let offer = reply(h.handle(&d, t));
        reply(h.handle(&request_for(&offer.msg, &d), t));
        let mut other = request_for(&offer.msg, &d);
        other.set_chaddr(&[0x52, 0x54, 0, 0, 0, 9]);
        let nak = reply(h.handle(&other, t));
        assert_eq!(nak.msg.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn relayed_requests_go_back_to_the_relay_with_option_82() {
        let mut h = handler();
        let mut d = ipxe_discover();
        d.set_giaddr(Ipv4Addr::new(10, 77, 0, 2));
        let o82 = DhcpOption::RelayAgentInformation(Default::default());
        d.opts_mut().insert(o82.clone());
        let offer = reply(h.handle(&d, SystemTime::UNIX_EPOCH));
        assert_eq!(offer.to, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 67));
        assert_eq!(offer.msg.giaddr(), Ipv4Addr::new(10, 77, 0, 2));
        assert!(
            offer
                .msg
                .opts()
                .get(OptionCode::RelayAgentInformation)
                .is_some()
        );

        d.set_giaddr(Ipv4Addr::new(192, 0, 2, 1));
        assert!(matches!(
            h.handle(&d, SystemTime::UNIX_EPOCH),
            Outcome::Ignore(Ignored::ForeignRelay(_))
        ));
    }

    #[test]
    fn release_frees_and_replies_nothing() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH;
        let d = ipxe_discover();
        let offer = reply(h.handle(&d, t));
        reply(h.handle(&request_for(&offer.msg, &d), t));
        let mut rel = d.clone();
        rel.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Release));
        rel.set_ciaddr(offer.msg.yiaddr());
        assert!(matches!(
            h.handle(&rel, t),
            Outcome::Ignore(Ignored::Released)
        ));
        assert!(
            h.pool()
                .lease_of(&MacAddr::from_slice(d.chaddr()).unwrap())
                .is_none()
        );
    }
}
