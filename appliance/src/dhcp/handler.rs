//! DHCPv4 protocol logic, sans I/O: one request in, a reply (with where it goes) or the
//! reason it was ignored out. Time is passed in so tests replay transcripts exactly.
//!
//! Lease changes a crash must not lose are queued as journal records
//! ([`Handler::take_records`]); the I/O layer makes them durable before it sends the reply
//! that depends on them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, SystemTime};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use stork_proto::MacAddr;

use super::client::{self, BootAnswer, ClientKind};
use super::config::RelayPolicy;
use super::datagram::Port;
use super::edge::Request;
use super::ha::HaState;
use super::journal::Record;
use super::pool::{DeclineRefused, Pool, PoolError};
use crate::config::{DhcpConfig, DhcpMode, SubnetConfig};
use crate::lifecycle::secure_boot::SignedBoot;
use crate::ratelimit::{Bucket, RateLimiter};

/// Everything the handler needs to know about this server.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub server_ip: Ipv4Addr,
    /// e.g. `http://10.77.0.1:8080`.
    pub http_base: String,
    pub dhcp: DhcpConfig,
    /// Which UEFI PXE clients get the signed chain.
    pub signed: std::sync::Arc<SignedBoot>,
}

impl ServerInfo {
    /// What the handler needs from the validated configuration (the signed chain for every
    /// UEFI PXE client or none, as `boot.secure_boot` says).
    pub fn new(cfg: &crate::config::Config) -> Self {
        Self {
            server_ip: cfg.address,
            http_base: cfg.base_url(),
            dhcp: cfg.dhcp.clone(),
            signed: std::sync::Arc::new(SignedBoot::new(cfg.boot.secure_boot)),
        }
    }

    /// With the machines that boot signed as the appliance follows them.
    pub fn with_signed(self, signed: std::sync::Arc<SignedBoot>) -> Self {
        Self { signed, ..self }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub msg: Message,
    pub to: SocketAddrV4,
}

/// Why a request got no answer; counted and logged by the I/O layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("{0:?} is not handled")]
    Unhandled(MessageType),
    #[error("client chose server {0}")]
    OtherServer(Ipv4Addr),
    #[error("relayed from {0}, which is in no configured subnet")]
    ForeignRelay(Ipv4Addr),
    #[error("giaddr {giaddr} sent from {from}, which is not a relay we trust")]
    UntrustedRelay { giaddr: Ipv4Addr, from: IpAddr },
    #[error("no address to offer: {0}")]
    NoAddress(PoolError),
    #[error("release processed")]
    Released,
    #[error("decline of {0} processed: address on probation")]
    Declined(Ipv4Addr),
    #[error("decline of {ip} refused: {why}")]
    DeclineRefused { ip: Ipv4Addr, why: DeclineRefused },
    #[error("request has no address to confirm")]
    NothingRequested,
    #[error("over the {0} rate limit")]
    RateLimited(RateScope),
    #[error("DHCP is off for this subnet")]
    SubnetOff,
    #[error("proxy mode answers PXE clients only")]
    NotPxe,
    #[error("proxy mode: {0:?} is for the site's DHCP server")]
    ProxyIgnores(MessageType),
    #[error("the client is the HA partner's")]
    PartnersClient,
}

/// Which rate limit dropped a request; each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The client's MAC (`dhcp.rate_limit`).
    Mac,
    /// The datagram's source address (`dhcp.rate_limit_source`).
    Source,
    /// Everyone together (`dhcp.rate_limit_global`).
    Global,
}

impl std::fmt::Display for RateScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mac => "per-MAC",
            Self::Source => "per-source",
            Self::Global => "global",
        })
    }
}

#[derive(Debug)]
pub enum Outcome {
    Reply(Reply),
    Ignore(Ignored),
}

/// RFC 2132 section 8.4 / PXE 2.1: option 43 sub-option 6, PXE_DISCOVERY_CONTROL.
const PXE_DISCOVERY_CONTROL: u8 = 6;
/// Bit 3: the boot file in this offer is to be used as is (no boot server discovery).
const PXE_USE_BOOTFILE: u8 = 0x08;
const OPTION_END: u8 = 255;

pub struct Handler {
    info: ServerInfo,
    /// One per `info.dhcp.subnets`, same order.
    pools: Vec<Pool>,
    limiter: Option<RateLimiter>,
    by_source: Option<RateLimiter<IpAddr>>,
    global: Option<Bucket>,
    /// This server's part in an HA pair (`dhcp.ha`).
    ha: Option<HaState>,
}

impl Handler {
    pub fn new(info: ServerInfo) -> Self {
        let ha = info.dhcp.ha.map(|h| HaState::new(h.role));
        let mut pools: Vec<Pool> = info.dhcp.subnets.iter().map(Pool::for_subnet).collect();
        for p in &mut pools {
            p.set_ha(ha);
        }
        Self {
            ha,
            pools,
            limiter: info.dhcp.rate_limit.map(RateLimiter::new),
            by_source: info.dhcp.rate_limit_source.map(RateLimiter::new),
            global: info.dhcp.rate_limit_global.map(Bucket::new),
            info,
        }
    }

    /// In an HA pair: whether the partner is down (this server answers everyone), as the
    /// I/O layer finds it.
    pub fn set_partner_down(&mut self, down: bool) {
        if let Some(h) = &mut self.ha {
            h.partner_down = down;
        }
        for p in &mut self.pools {
            p.set_ha(self.ha);
        }
    }

    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// This server's part in an HA pair now.
    pub fn ha(&self) -> Option<HaState> {
        self.ha
    }

    /// The provisioning subnet's pool.
    pub fn pool(&self) -> &Pool {
        &self.pools[0]
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Puts the journal's live records back into the pools; returns how many found no
    /// subnet (the configuration changed since they were written).
    pub fn restore(&mut self, records: &[Record]) -> usize {
        let mut orphans = 0;
        for r in records {
            let placed = self
                .info
                .dhcp
                .subnets
                .iter()
                .position(|s| s.net.contains(r.ip()))
                .and_then(|i| self.pools.get_mut(i))
                .is_some_and(|p| p.restore(r));
            if !placed {
                orphans += 1;
            }
        }
        orphans
    }

    /// Journal records queued by the requests handled since the last call.
    pub fn take_records(&mut self, out: &mut Vec<Record>) {
        for p in &mut self.pools {
            p.take_records(out);
        }
    }

    /// A request that passed the edge's checks ([`super::edge::accept`]: a BOOTREQUEST from a
    /// 6-byte Ethernet address with a message type), sent from `peer` (the datagram's
    /// source), on port 67 or on the PXE boot server port, 4011.
    pub fn answer(
        &mut self,
        req: &Request,
        peer: SocketAddr,
        port: Port,
        now: SystemTime,
    ) -> Outcome {
        if self.ha.is_some_and(|h| !h.answers(&req.mac)) {
            return Outcome::Ignore(Ignored::PartnersClient);
        }
        match self.admit(req, peer.ip(), now) {
            Ok(()) => match self.decide(req, now, port == Port::Pxe) {
                Ok(reply) => Outcome::Reply(reply),
                Err(why) => Outcome::Ignore(why),
            },
            Err(why) => Outcome::Ignore(why),
        }
    }

    /// Whether a request is served at all, before any state is looked at: a relayed one
    /// must come from a relay we trust, then the rate limits, narrowest first, so a flood
    /// spends its own bucket before anyone else's: the client's MAC, the source address
    /// (not for 0.0.0.0, which every client without an address sends from, nor for
    /// relays, each of which speaks for a whole subnet), everyone.
    fn admit(&mut self, req: &Request, from: IpAddr, now: SystemTime) -> Result<(), Ignored> {
        let giaddr = req.msg.giaddr();
        let relayed = !giaddr.is_unspecified();
        if relayed {
            self.check_relay(giaddr, from)?;
        }
        if let Some(l) = &mut self.limiter
            && !l.allow(req.mac, now)
        {
            return Err(Ignored::RateLimited(RateScope::Mac));
        }
        if let Some(l) = &mut self.by_source
            && !relayed
            && !from.is_unspecified()
            && !l.allow(from, now)
        {
            return Err(Ignored::RateLimited(RateScope::Source));
        }
        if let Some(b) = &mut self.global
            && !b.allow(now)
        {
            return Err(Ignored::RateLimited(RateScope::Global));
        }
        Ok(())
    }

    /// A relayed request (giaddr set) is believed only when its giaddr is in a configured
    /// subnet and its datagram came from a relay we trust ([`RelayPolicy`]): otherwise any
    /// host could draw addresses from a relay's subnet, or aim replies at any address.
    fn check_relay(&self, giaddr: Ipv4Addr, from: IpAddr) -> Result<(), Ignored> {
        let subnets = &self.info.dhcp.subnets;
        if !subnets.iter().any(|s| s.net.contains(giaddr)) {
            return Err(Ignored::ForeignRelay(giaddr));
        }
        let trusted = match (from, &self.info.dhcp.relays) {
            (IpAddr::V4(src), RelayPolicy::Listed(list)) => list.contains(&src),
            (IpAddr::V4(src), RelayPolicy::Implicit) => {
                src == giaddr || subnets.iter().any(|s| s.net.contains(src))
            }
            (IpAddr::V6(_), _) => false,
        };
        if trusted {
            Ok(())
        } else {
            Err(Ignored::UntrustedRelay { giaddr, from })
        }
    }

    /// Which subnet a request belongs to: the relay's (giaddr), else the one of the address
    /// a renewing client already has (a unicast renewal from behind a relay carries no
    /// giaddr), else the provisioning subnet.
    fn subnet_for(&self, req: &Message) -> Result<usize, Ignored> {
        let subnets = &self.info.dhcp.subnets;
        let giaddr = req.giaddr();
        if !giaddr.is_unspecified() {
            return subnets
                .iter()
                .position(|s| s.net.contains(giaddr))
                .ok_or(Ignored::ForeignRelay(giaddr));
        }
        let ciaddr = req.ciaddr();
        if !ciaddr.is_unspecified()
            && let Some(i) = subnets.iter().position(|s| s.net.contains(ciaddr))
        {
            return Ok(i);
        }
        Ok(0)
    }

    fn decide(&mut self, req: &Request, now: SystemTime, pxe_port: bool) -> Result<Reply, Ignored> {
        let (msg_type, mac) = (req.kind, req.mac);
        let req = &req.msg;
        let idx = self.subnet_for(req)?;
        let Some((subnet, pool)) = self.info.dhcp.subnets.get(idx).zip(self.pools.get_mut(idx))
        else {
            return Err(Ignored::SubnetOff);
        };
        let ctx = Ctx {
            info: &self.info,
            subnet,
            req,
            mac,
        };
        if pxe_port {
            // PXE 2.1: after a proxy offer the client asks the boot server on 4011 with a
            // REQUEST (or INFORM) from the address it got elsewhere; the ACK carries the boot file.
            return match (subnet.mode, msg_type) {
                (DhcpMode::Off, _) => Err(Ignored::SubnetOff),
                (_, MessageType::Request | MessageType::Inform) => {
                    ctx.proxy_reply(MessageType::Ack).ok_or(Ignored::NotPxe)
                }
                (_, other) => Err(Ignored::Unhandled(other)),
            };
        }
        match subnet.mode {
            DhcpMode::Off => Err(Ignored::SubnetOff),
            DhcpMode::Proxy => match msg_type {
                MessageType::Discover => ctx.proxy_reply(MessageType::Offer).ok_or(Ignored::NotPxe),
                other => Err(Ignored::ProxyIgnores(other)),
            },
            DhcpMode::Full => ctx.full(pool, msg_type, now),
        }
    }
}

/// One request being answered, with the subnet it belongs to.
struct Ctx<'a> {
    info: &'a ServerInfo,
    subnet: &'a SubnetConfig,
    req: &'a Message,
    mac: MacAddr,
}

impl Ctx<'_> {
    fn full(
        &self,
        pool: &mut Pool,
        msg_type: MessageType,
        now: SystemTime,
    ) -> Result<Reply, Ignored> {
        let (req, mac) = (self.req, self.mac);
        match msg_type {
            MessageType::Discover => {
                let lease = pool
                    .offer(mac, requested_ip(req), now)
                    .map_err(Ignored::NoAddress)?;
                Ok(self.reply(MessageType::Offer, Some(lease.ip)))
            }
            MessageType::Request => self.request(pool, now),
            MessageType::Decline => {
                if let Some(sid) = server_id(req)
                    && sid != self.info.server_ip
                {
                    return Err(Ignored::OtherServer(sid));
                }
                let ip = requested_ip(req).ok_or(Ignored::NothingRequested)?;
                // RFC 2131 4.3.3: the address is in use by someone else (the client ARPed
                // it): never hand it out while on probation. Only its holder may say so,
                // and only so many at once ([`Pool::decline`]).
                match pool.decline(&mac, ip, now, now + self.info.dhcp.probation) {
                    Ok(()) => Err(Ignored::Declined(ip)),
                    Err(why) => Err(Ignored::DeclineRefused { ip, why }),
                }
            }
            MessageType::Release => {
                pool.release(&mac, req.ciaddr());
                Err(Ignored::Released)
            }
            MessageType::Inform => Ok(self.reply(MessageType::Ack, None)),
            other => Err(Ignored::Unhandled(other)),
        }
    }

    fn request(&self, pool: &mut Pool, now: SystemTime) -> Result<Reply, Ignored> {
        let (req, mac) = (self.req, self.mac);
        if let Some(sid) = server_id(req)
            && sid != self.info.server_ip
        {
            // SELECTING another server's offer: drop the address we held for this client.
            if let Some(l) = pool.lease_of(&mac).copied() {
                pool.release(&mac, l.ip);
            }
            return Err(Ignored::OtherServer(sid));
        }
        // SELECTING and INIT-REBOOT name the address in option 50; RENEWING and REBINDING
        // put it in ciaddr (RFC 2131 4.3.2).
        let ip = requested_ip(req)
            .or_else(|| (!req.ciaddr().is_unspecified()).then_some(req.ciaddr()))
            .ok_or(Ignored::NothingRequested)?;
        let lease_time = Duration::from_secs(u64::from(self.subnet.lease_time));
        match pool.bind(mac, ip, lease_time, now) {
            Ok(lease) => Ok(self.reply(MessageType::Ack, Some(lease.ip))),
            // Wrong network, taken, declined or reserved for another: the client restarts
            // with DISCOVER.
            Err(_) => Ok(self.reply(MessageType::Nak, None)),
        }
    }

    fn reply(&self, kind: MessageType, yiaddr: Option<Ipv4Addr>) -> Reply {
        let (info, subnet, req) = (self.info, self.subnet, self.req);
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
        if kind == MessageType::Nak {
            if !req.giaddr().is_unspecified() {
                // RFC 2131 4.3.2: a NAK through a relay asks it to broadcast.
                msg.set_flags(Flags::default().set_broadcast());
            }
        } else {
            if let Some(ip) = yiaddr {
                msg.set_yiaddr(ip);
                let t = subnet.lease_time;
                let opts = msg.opts_mut();
                opts.insert(DhcpOption::AddressLeaseTime(t));
                // RFC 2131 4.4.5 defaults, stated so every client uses the same.
                opts.insert(DhcpOption::Renewal(t / 2));
                opts.insert(DhcpOption::Rebinding(
                    u32::try_from(u64::from(t) * 7 / 8).unwrap_or(t),
                ));
            } else {
                // INFORM: the client already has its address (and gets no lease time).
                msg.set_ciaddr(req.ciaddr());
            }
            msg.set_siaddr(info.server_ip);
            let opts = msg.opts_mut();
            opts.insert(DhcpOption::SubnetMask(subnet.net.mask()));
            if let Some(r) = subnet.router {
                opts.insert(DhcpOption::Router(vec![r]));
            }
            if !subnet.dns.is_empty() {
                opts.insert(DhcpOption::DomainNameServer(subnet.dns.clone()));
            }
            if let Some(d) = &subnet.domain {
                opts.insert(DhcpOption::DomainName(d.clone()));
            }
            if !subnet.ntp.is_empty() {
                opts.insert(DhcpOption::NtpServers(subnet.ntp.clone()));
            }
            if let Some(mtu) = subnet.mtu {
                opts.insert(DhcpOption::InterfaceMtu(mtu));
            }
            if let Some(boot) = self.boot_answer() {
                set_boot(&mut msg, boot);
            }
        }
        self.echo_relay_info(&mut msg);
        let to = destination(req, kind);
        Reply { msg, to }
    }

    /// proxyDHCP (PXE 2.1): boot information only, no address. `kind` is Offer on port 67
    /// and Ack on port 4011. `None` for clients that are not network-booting.
    fn proxy_reply(&self, kind: MessageType) -> Option<Reply> {
        let (info, req) = (self.info, self.req);
        let mut boot = self.boot_answer()?;
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootReply)
            .set_htype(req.htype())
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_giaddr(req.giaddr())
            .set_chaddr(req.chaddr())
            .set_siaddr(info.server_ip);
        if kind == MessageType::Ack {
            msg.set_ciaddr(req.ciaddr());
        }
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(info.server_ip));
        // A proxy offer is recognised by option 60 PXEClient (HTTPClient for HTTP boot).
        // Unlike a full offer, it is right for EDK2's own PXE too: with option 43 saying
        // "use this boot file" it takes the file from here and the address from the
        // site's server.
        if boot.vendor_class.is_none() {
            boot.vendor_class = Some("PXEClient");
        }
        opts.insert(DhcpOption::VendorExtensions(vec![
            PXE_DISCOVERY_CONTROL,
            1,
            PXE_USE_BOOTFILE,
            OPTION_END,
        ]));
        if let Some(uuid) = req.opts().get(OptionCode::ClientMachineIdentifier) {
            // PXE 2.1: the client UUID is echoed back.
            opts.insert(uuid.clone());
        }
        set_boot(&mut msg, boot);
        self.echo_relay_info(&mut msg);
        let to = if req.giaddr().is_unspecified() {
            if kind == MessageType::Ack && !req.ciaddr().is_unspecified() {
                SocketAddrV4::new(req.ciaddr(), dhcproto::v4::CLIENT_PORT)
            } else {
                SocketAddrV4::new(Ipv4Addr::BROADCAST, dhcproto::v4::CLIENT_PORT)
            }
        } else {
            SocketAddrV4::new(req.giaddr(), dhcproto::v4::SERVER_PORT)
        };
        Some(Reply { msg, to })
    }

    fn echo_relay_info(&self, msg: &mut Message) {
        if let Some(o82) = self.req.opts().get(OptionCode::RelayAgentInformation) {
            // RFC 3046: echo the relay's option back unchanged.
            msg.opts_mut().insert(o82.clone());
        }
    }

    fn boot_answer(&self) -> Option<BootAnswer> {
        let kind = client::classify(self.req);
        if kind == ClientKind::Plain {
            return None;
        }
        let script = format!("{}/ipxe/{}", self.info.http_base, self.mac);
        let signed = self.info.signed.wants(self.mac);
        client::boot_file(kind, &script, &self.info.http_base, signed)
    }
}

fn set_boot(msg: &mut Message, boot: BootAnswer) {
    if boot.file.len() < 128 {
        msg.set_fname_str(&boot.file);
    }
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::BootfileName(boot.file.into_bytes()));
    if let Some(vc) = boot.vendor_class {
        opts.insert(DhcpOption::ClassIdentifier(vc.as_bytes().to_vec()));
    }
}

fn requested_ip(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

fn server_id(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
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
        // RENEWING, REBINDING and INFORM: the client has its address and listens on it.
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

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    /// The tests hand the handler a message as the socket loop does: encoded, then through
    /// the edge's checks.
    trait ViaEdge {
        /// From where the message says it comes from: a relay sends from its giaddr, a
        /// client with an address from it, others from 0.0.0.0.
        fn handle(&mut self, m: &Message, now: SystemTime) -> Outcome;
        fn handle_pxe(&mut self, m: &Message, now: SystemTime) -> Outcome;
        fn handle_from(&mut self, m: &Message, peer: SocketAddr, now: SystemTime) -> Outcome;
    }

    fn natural_peer(m: &Message) -> SocketAddr {
        if !m.giaddr().is_unspecified() {
            SocketAddr::from((m.giaddr(), 67))
        } else {
            SocketAddr::from((m.ciaddr(), 68))
        }
    }

    impl ViaEdge for Handler {
        fn handle(&mut self, m: &Message, now: SystemTime) -> Outcome {
            self.answer(&through_edge(m), natural_peer(m), Port::Dhcp, now)
        }
        fn handle_pxe(&mut self, m: &Message, now: SystemTime) -> Outcome {
            self.answer(&through_edge(m), natural_peer(m), Port::Pxe, now)
        }
        fn handle_from(&mut self, m: &Message, peer: SocketAddr, now: SystemTime) -> Outcome {
            self.answer(&through_edge(m), peer, Port::Dhcp, now)
        }
    }

    fn through_edge(m: &Message) -> Request {
        crate::dhcp::edge::accept(&m.to_vec().unwrap()).unwrap()
    }

    fn handler_with(text: &str) -> Handler {
        let cfg = FileConfig::parse(text, std::path::Path::new("test"))
            .unwrap()
            .validate()
            .unwrap();
        Handler::new(ServerInfo::new(&cfg))
    }

    fn handler() -> Handler {
        handler_with("")
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

    /// A plain (non-booting) client's DISCOVER, as an OS's DHCP client sends it.
    fn plain_discover(mac: u8) -> Message {
        let mut d = ipxe_discover();
        d.opts_mut().remove(OptionCode::UserClass);
        d.opts_mut().remove(OptionCode::ClassIdentifier);
        d.opts_mut().remove(OptionCode::Unknown(175));
        d.set_chaddr(&[0x52, 0x54, 0, 0, 0, mac]);
        d
    }

    fn with_type(m: &Message, t: MessageType) -> Message {
        let mut r = m.clone();
        r.opts_mut().insert(DhcpOption::MessageType(t));
        r
    }

    fn request_for(offer: &Message, discover: &Message) -> Message {
        let mut r = with_type(discover, MessageType::Request);
        let o = r.opts_mut();
        o.insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        o.insert(DhcpOption::ServerIdentifier(SERVER));
        r
    }

    fn reply(o: Outcome) -> Reply {
        match o {
            Outcome::Reply(r) => r,
            Outcome::Ignore(why) => panic!("ignored: {why}"),
        }
    }

    fn ignored(o: Outcome) -> Ignored {
        match o {
            Outcome::Reply(r) => panic!("answered {:?}", r.msg.opts().msg_type()),
            Outcome::Ignore(why) => why,
        }
    }

    fn opt_bytes(m: &Message, code: OptionCode) -> Option<Vec<u8>> {
        match m.opts().get(code)? {
            DhcpOption::BootfileName(v)
            | DhcpOption::ClassIdentifier(v)
            | DhcpOption::VendorExtensions(v) => Some(v.clone()),
            _ => None,
        }
    }

    fn records(h: &mut Handler) -> Vec<Record> {
        let mut v = Vec::new();
        h.take_records(&mut v);
        v
    }

    /// DISCOVER, OFFER, REQUEST, ACK; returns the ACK.
    fn dora(h: &mut Handler, d: &Message, t: SystemTime) -> Message {
        let offer = reply(h.handle(d, t));
        assert_eq!(offer.msg.opts().msg_type(), Some(MessageType::Offer));
        let ack = reply(h.handle(&request_for(&offer.msg, d), t));
        assert_eq!(ack.msg.opts().msg_type(), Some(MessageType::Ack));
        ack.msg
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
    fn option_lengths_the_decoder_would_assert_on_are_rejected() {
        // Found by the dhcp_handler fuzz target: Rapid Commit (80) with a payload made
        // dhcproto's debug_assert fire.
        let mut bad = IPXE_DISCOVER[..240].to_vec();
        bad.extend_from_slice(&[53, 1, 1, 80, 2, 0, 0, 255]);
        assert!(matches!(
            super::super::edge::accept(&bad),
            Err(super::super::edge::Dropped::OptionLength { code: 80, len: 2 })
        ));
        for (code, len) in [(94u8, 2u8), (81, 1), (151, 0), (152, 3)] {
            let mut p = IPXE_DISCOVER[..240].to_vec();
            p.extend_from_slice(&[53, 1, 1, code, len]);
            p.extend(std::iter::repeat_n(0, usize::from(len)));
            p.push(255);
            assert!(
                super::super::edge::accept(&p).is_err(),
                "option {code} len {len}"
            );
        }
        // Two option 94s of 3 bytes each are one of 6 (RFC 3396 concatenation).
        let mut p = IPXE_DISCOVER[..240].to_vec();
        p.extend_from_slice(&[53, 1, 1, 94, 3, 1, 2, 0, 94, 3, 1, 2, 0, 255]);
        assert!(super::super::edge::accept(&p).is_err());
        assert!(super::super::edge::accept(IPXE_DISCOVER).is_ok());
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
        assert!(records(&mut h).is_empty(), "an offer is not journaled");

        let ack = reply(h.handle(&request_for(&offer.msg, &d), t));
        assert_eq!(ack.msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.msg.yiaddr(), offer.msg.yiaddr());
        assert!(matches!(
            ack.msg.opts().get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        ));
        // The ACK's lease is queued for the journal, to be durable before the ACK leaves.
        assert_eq!(
            records(&mut h),
            vec![Record::Bound {
                mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                ip: ack.msg.yiaddr(),
                expires: 1_000_000 + 3600
            }]
        );
    }

    #[test]
    fn configured_options_are_sent() {
        let mut h = handler_with(
            "[dhcp]\nrouter = \"10.77.0.254\"\ndns = [\"10.77.0.53\"]\ndomain = \"lab.example\"\nntp = [\"10.77.0.123\"]\nmtu = 9000\nlease_time = 600\n",
        );
        let ack = dora(&mut h, &plain_discover(1), SystemTime::UNIX_EPOCH);
        let o = ack.opts();
        let ip = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(ip(255, 255, 255, 0)))
        );
        assert_eq!(
            o.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![ip(10, 77, 0, 254)]))
        );
        assert_eq!(
            o.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![ip(10, 77, 0, 53)]))
        );
        assert_eq!(
            o.get(OptionCode::DomainName),
            Some(&DhcpOption::DomainName("lab.example".into()))
        );
        assert_eq!(
            o.get(OptionCode::NtpServers),
            Some(&DhcpOption::NtpServers(vec![ip(10, 77, 0, 123)]))
        );
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(9000))
        );
        assert_eq!(
            o.get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(600))
        );
        assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(300)));
        assert_eq!(
            o.get(OptionCode::Rebinding),
            Some(&DhcpOption::Rebinding(525))
        );
        let wire = ack.to_vec().unwrap();
        assert_eq!(
            decode(&wire).opts().get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(9000))
        );
    }

    #[test]
    fn a_plain_client_gets_no_boot_file() {
        let mut h = handler();
        let offer = reply(h.handle(&plain_discover(1), SystemTime::UNIX_EPOCH));
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
        let ack = dora(&mut h, &d, t);
        let mut other = request_for(&ack, &d);
        other.set_chaddr(&[0x52, 0x54, 0, 0, 0, 9]);
        let nak = reply(h.handle(&other, t));
        assert_eq!(nak.msg.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(nak.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        // INIT-REBOOT on the wrong network is NAKed too.
        let mut wrong = with_type(&plain_discover(3), MessageType::Request);
        wrong
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                192, 168, 1, 5,
            )));
        let nak = reply(h.handle(&wrong, t));
        assert_eq!(nak.msg.opts().msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn renewal_is_unicast_to_ciaddr_and_journals_the_new_expiry() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH;
        let d = plain_discover(1);
        let ack = dora(&mut h, &d, t);
        records(&mut h);
        // RENEWING: ciaddr set, no option 50, no server id (RFC 2131 4.3.2).
        let mut renew = with_type(&d, MessageType::Request);
        renew.set_ciaddr(ack.yiaddr());
        let later = t + Duration::from_secs(1800);
        let r = reply(h.handle(&renew, later));
        assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(r.msg.yiaddr(), ack.yiaddr());
        assert_eq!(r.to, SocketAddrV4::new(ack.yiaddr(), 68));
        assert_eq!(
            records(&mut h),
            vec![Record::Bound {
                mac: MacAddr::from_slice(d.chaddr()).unwrap(),
                ip: ack.yiaddr(),
                expires: 1800 + 3600
            }]
        );
    }

    #[test]
    fn relayed_requests_go_back_to_the_relay_with_option_82() {
        let mut h = handler();
        let mut d = ipxe_discover();
        d.set_giaddr(Ipv4Addr::new(10, 77, 0, 2));
        // As a relay sends it: a circuit id (an empty option 82 does not survive decoding).
        let mut info = dhcproto::v4::relay::RelayAgentInformation::default();
        info.insert(dhcproto::v4::relay::RelayInfo::AgentCircuitId(
            b"eth1".to_vec(),
        ));
        let o82 = DhcpOption::RelayAgentInformation(info);
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

    const TWO_SUBNETS: &str = r#"
[dhcp]
reservations = [{ mac = "52:54:00:00:00:07", ip = "10.77.0.7" }]
[[dhcp.subnets]]
network = "10.78.0.0/24"
ranges = [["10.78.0.50", "10.78.0.60"]]
exclude = [["10.78.0.50", "10.78.0.51"]]
router = "10.78.0.1"
lease_time = 120
reservations = [{ mac = "52:54:00:00:00:08", ip = "10.78.0.8" }]
[[dhcp.subnets]]
network = "10.79.0.0/24"
mode = "off"
"#;

    #[test]
    fn giaddr_picks_the_subnet_and_its_options() {
        let mut h = handler_with(TWO_SUBNETS);
        let t = SystemTime::UNIX_EPOCH;
        let mut d = plain_discover(1);
        d.set_giaddr(Ipv4Addr::new(10, 78, 0, 1));
        let ack = dora(&mut h, &d, t);
        // .50 and .51 are excluded.
        assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 78, 0, 52));
        assert_eq!(
            ack.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 78, 0, 1)]))
        );
        assert_eq!(
            ack.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(120))
        );
        // The same MAC on the local segment gets a local address.
        let local = dora(&mut h, &plain_discover(1), t);
        assert_eq!(local.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
        // A unicast renewal from behind the relay (no giaddr) finds its subnet by ciaddr.
        let mut renew = with_type(&plain_discover(1), MessageType::Request);
        renew.set_ciaddr(ack.yiaddr());
        assert_eq!(reply(h.handle(&renew, t)).msg.yiaddr(), ack.yiaddr());
        // Reservations, per subnet.
        let mut r = plain_discover(8);
        r.set_giaddr(Ipv4Addr::new(10, 78, 0, 1));
        assert_eq!(dora(&mut h, &r, t).yiaddr(), Ipv4Addr::new(10, 78, 0, 8));
        assert_eq!(
            dora(&mut h, &plain_discover(7), t).yiaddr(),
            Ipv4Addr::new(10, 77, 0, 7)
        );
        // A subnet that is off answers nothing.
        let mut off = plain_discover(2);
        off.set_giaddr(Ipv4Addr::new(10, 79, 0, 1));
        assert_eq!(ignored(h.handle(&off, t)), Ignored::SubnetOff);
    }

    #[test]
    fn nak_through_a_relay_asks_for_broadcast() {
        let mut h = handler_with(TWO_SUBNETS);
        let mut r = with_type(&plain_discover(1), MessageType::Request);
        r.set_giaddr(Ipv4Addr::new(10, 78, 0, 1));
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                10, 77, 0, 100,
            )));
        let nak = reply(h.handle(&r, SystemTime::UNIX_EPOCH));
        assert_eq!(nak.msg.opts().msg_type(), Some(MessageType::Nak));
        assert!(nak.msg.flags().broadcast());
        assert_eq!(nak.to, SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 1), 67));
    }

    #[test]
    fn release_frees_replies_nothing_and_is_journaled() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH;
        let d = ipxe_discover();
        let ack = dora(&mut h, &d, t);
        records(&mut h);
        let mut rel = with_type(&d, MessageType::Release);
        rel.set_ciaddr(ack.yiaddr());
        assert_eq!(ignored(h.handle(&rel, t)), Ignored::Released);
        let mac = MacAddr::from_slice(d.chaddr()).unwrap();
        assert!(h.pool().lease_of(&mac).is_none());
        assert_eq!(
            records(&mut h),
            vec![Record::Released {
                mac,
                ip: ack.yiaddr()
            }]
        );
    }

    #[test]
    fn decline_puts_the_address_on_probation() {
        let mut h = handler();
        let t = SystemTime::UNIX_EPOCH;
        let d = plain_discover(1);
        let ack = dora(&mut h, &d, t);
        records(&mut h);
        let mut dec = with_type(&d, MessageType::Decline);
        dec.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(ack.yiaddr()));
        dec.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        assert_eq!(ignored(h.handle(&dec, t)), Ignored::Declined(ack.yiaddr()));
        assert_eq!(
            records(&mut h),
            vec![
                Record::Released {
                    mac: MacAddr::from_slice(d.chaddr()).unwrap(),
                    ip: ack.yiaddr()
                },
                Record::Probation {
                    ip: ack.yiaddr(),
                    until: 600
                }
            ]
        );
        // The client starts over and gets another address; so does everyone else.
        assert_ne!(dora(&mut h, &d, t).yiaddr(), ack.yiaddr());
        let mut want = plain_discover(2);
        want.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(ack.yiaddr()));
        assert_ne!(
            reply(h.handle(&want, t + Duration::from_secs(599)))
                .msg
                .yiaddr(),
            ack.yiaddr()
        );
        // After probation it is back.
        want.set_chaddr(&[0x52, 0x54, 0, 0, 0, 3]);
        assert_eq!(
            reply(h.handle(&want, t + Duration::from_secs(601)))
                .msg
                .yiaddr(),
            ack.yiaddr()
        );
        // A decline for another server, or for an address not ours, changes nothing.
        dec.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 9)));
        assert!(matches!(
            ignored(h.handle(&dec, t)),
            Ignored::OtherServer(_)
        ));
        dec.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        dec.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(matches!(
            ignored(h.handle(&dec, t)),
            Ignored::DeclineRefused {
                why: DeclineRefused::NotOurs,
                ..
            }
        ));
    }

    fn decline_of(mac: u8, ip: Ipv4Addr) -> Message {
        let mut dec = with_type(&plain_discover(mac), MessageType::Decline);
        dec.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        dec.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        dec
    }

    #[test]
    fn a_decline_from_anyone_but_the_holder_changes_nothing() {
        let mut h = handler_with(
            "[dhcp]\nreservations = [{ mac = \"52:54:00:00:00:07\", ip = \"10.77.0.7\" }]\n",
        );
        let t = SystemTime::UNIX_EPOCH;
        let held = dora(&mut h, &plain_discover(1), t).yiaddr();
        let offered = reply(h.handle(&plain_discover(2), t)).msg.yiaddr();
        records(&mut h);
        let refused = |h: &mut Handler, ip| match ignored(h.handle(&decline_of(9, ip), t)) {
            Ignored::DeclineRefused { why, .. } => why,
            other => panic!("{other}"),
        };
        assert_eq!(refused(&mut h, held), DeclineRefused::NotHolder);
        assert_eq!(refused(&mut h, offered), DeclineRefused::NotHolder);
        assert_eq!(
            refused(&mut h, Ipv4Addr::new(10, 77, 0, 150)),
            DeclineRefused::NotHolder
        );
        assert_eq!(
            refused(&mut h, Ipv4Addr::new(10, 77, 0, 7)),
            DeclineRefused::ReservedForAnother
        );
        assert!(records(&mut h).is_empty(), "nothing journaled");
        // The holder keeps its address, the offeree its offer, the owner its reservation.
        let mut renew = with_type(&plain_discover(1), MessageType::Request);
        renew.set_ciaddr(held);
        assert_eq!(reply(h.handle(&renew, t)).msg.yiaddr(), held);
        assert_eq!(dora(&mut h, &plain_discover(2), t).yiaddr(), offered);
        assert_eq!(
            dora(&mut h, &plain_discover(7), t).yiaddr(),
            Ipv4Addr::new(10, 77, 0, 7)
        );
        // The offeree itself may decline what it was offered.
        let o = reply(h.handle(&plain_discover(3), t)).msg.yiaddr();
        assert_eq!(
            ignored(h.handle(&decline_of(3, o), t)),
            Ignored::Declined(o)
        );
    }

    #[test]
    fn declines_cannot_empty_the_pool() {
        // 100 addresses: at most 25 on probation.
        let mut h = handler_with("[dhcp]\nrate_limit = 0\n");
        let t = SystemTime::UNIX_EPOCH;
        // A stranger declining every address: nothing.
        for n in 100..200u8 {
            let ip = Ipv4Addr::new(10, 77, 0, n);
            assert!(matches!(
                ignored(h.handle(&decline_of(200, ip), t)),
                Ignored::DeclineRefused { .. }
            ));
        }
        assert_eq!(h.pool().on_probation_count(t), 0);
        // Hosts that take an address each and decline it: a quarter of the pool at most.
        let mut honoured = 0;
        for m in 0..100u8 {
            let ip = dora(&mut h, &plain_discover(m), t).yiaddr();
            match ignored(h.handle(&decline_of(m, ip), t)) {
                Ignored::Declined(_) => honoured += 1,
                Ignored::DeclineRefused {
                    why: DeclineRefused::Capped { cap: 25 },
                    ..
                } => {}
                other => panic!("{other}"),
            }
        }
        assert_eq!(honoured, 25);
        assert_eq!(h.pool().on_probation_count(t), 25);
        // Everyone else is still served.
        let ip = dora(&mut h, &plain_discover(250), t).yiaddr();
        assert!(h.pool().contains(ip));
    }

    const RELAYED: &str = r#"
[[dhcp.subnets]]
network = "10.78.0.0/24"
ranges = [["10.78.0.50", "10.78.0.60"]]
"#;

    fn relayed_discover(mac: u8, giaddr: Ipv4Addr) -> Message {
        let mut d = plain_discover(mac);
        d.set_giaddr(giaddr);
        d
    }

    fn from(a: u8, b: u8, c: u8, d: u8) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(a, b, c, d), 67))
    }

    #[test]
    fn without_a_relay_list_relays_send_from_giaddr_or_a_served_subnet() {
        let mut h = handler_with(RELAYED);
        let t = SystemTime::UNIX_EPOCH;
        let giaddr = Ipv4Addr::new(10, 78, 0, 1);
        let d = relayed_discover(1, giaddr);
        // A router relaying from its client-side address; dhcrelay from its upstream leg
        // on the provisioning network.
        for peer in [from(10, 78, 0, 1), from(10, 77, 0, 2)] {
            let offer = reply(h.handle_from(&d, peer, t));
            assert_eq!(offer.to, SocketAddrV4::new(giaddr, 67));
        }
        // From anywhere else, or over IPv6: refused, nothing offered.
        for peer in [
            from(192, 0, 2, 9),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 67)),
        ] {
            assert_eq!(
                ignored(h.handle_from(&relayed_discover(2, giaddr), peer, t)),
                Ignored::UntrustedRelay {
                    giaddr,
                    from: peer.ip()
                }
            );
        }
        assert!(
            h.pools()[1]
                .lease_of(&MacAddr([0x52, 0x54, 0, 0, 0, 2]))
                .is_none()
        );
        // A giaddr in no subnet is refused whoever sends it.
        let foreign = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(
            ignored(h.handle_from(&relayed_discover(3, foreign), from(192, 0, 2, 1), t)),
            Ignored::ForeignRelay(foreign)
        );
    }

    #[test]
    fn with_a_relay_list_only_the_listed_relays_are_believed() {
        let mut h = handler_with(&format!("[dhcp]\nrelays = [\"10.77.0.2\"]\n{RELAYED}"));
        let t = SystemTime::UNIX_EPOCH;
        let giaddr = Ipv4Addr::new(10, 78, 0, 1);
        assert_eq!(
            reply(h.handle_from(&relayed_discover(1, giaddr), from(10, 77, 0, 2), t))
                .msg
                .yiaddr(),
            Ipv4Addr::new(10, 78, 0, 50)
        );
        // A host on the provisioning network, even the giaddr itself, is not a listed relay.
        for peer in [from(10, 77, 0, 3), from(10, 78, 0, 1)] {
            assert!(matches!(
                ignored(h.handle_from(&relayed_discover(2, giaddr), peer, t)),
                Ignored::UntrustedRelay { .. }
            ));
        }
        // Local clients are not relayed and not affected.
        assert!(matches!(h.handle(&plain_discover(3), t), Outcome::Reply(_)));

        // An empty list: no relayed request at all.
        let mut h = handler_with(&format!("[dhcp]\nrelays = []\n{RELAYED}"));
        assert!(matches!(
            ignored(h.handle(&relayed_discover(1, giaddr), t)),
            Ignored::UntrustedRelay { .. }
        ));
        assert!(matches!(h.handle(&plain_discover(3), t), Outcome::Reply(_)));
    }

    #[test]
    fn one_source_flooding_with_many_macs_is_limited_alone() {
        let mut h = handler_with(&format!(
            "[dhcp]\nrate_limit_source = 1\nrate_burst_source = 3\n{RELAYED}"
        ));
        let t = SystemTime::UNIX_EPOCH;
        let host = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 250), 68));
        let answered = (0..10u8)
            .filter(|m| {
                matches!(
                    h.handle_from(&plain_discover(*m), host, t),
                    Outcome::Reply(_)
                )
            })
            .count();
        assert_eq!(answered, 3);
        assert_eq!(
            ignored(h.handle_from(&plain_discover(20), host, t)),
            Ignored::RateLimited(RateScope::Source)
        );
        // Another source, clients without an address (0.0.0.0) and relays are not held.
        let other = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 251), 68));
        assert!(matches!(
            h.handle_from(&plain_discover(21), other, t),
            Outcome::Reply(_)
        ));
        for m in 30..40u8 {
            assert!(matches!(h.handle(&plain_discover(m), t), Outcome::Reply(_)));
            let d = relayed_discover(m, Ipv4Addr::new(10, 78, 0, 1));
            assert!(matches!(
                h.handle_from(&d, from(10, 77, 0, 2), t),
                Outcome::Reply(_)
            ));
        }
        // A second later the source has a token again.
        assert!(matches!(
            h.handle_from(&plain_discover(22), host, t + Duration::from_secs(1)),
            Outcome::Reply(_)
        ));
    }

    #[test]
    fn the_global_limit_holds_everyone_and_a_lone_flooder_does_not_spend_it() {
        let mut h = handler_with(
            "[dhcp]\nrate_limit = 1\nrate_burst = 2\nrate_limit_global = 1\nrate_burst_global = 5\n",
        );
        let t = SystemTime::UNIX_EPOCH;
        // One MAC flooding: its own bucket stops it, 2 go through.
        let flood = plain_discover(1);
        for _ in 0..50 {
            h.handle(&flood, t);
        }
        assert_eq!(
            ignored(h.handle(&flood, t)),
            Ignored::RateLimited(RateScope::Mac)
        );
        // 3 tokens left for everyone.
        let answered = (2..10u8)
            .filter(|m| matches!(h.handle(&plain_discover(*m), t), Outcome::Reply(_)))
            .count();
        assert_eq!(answered, 3);
        assert_eq!(
            ignored(h.handle(&plain_discover(11), t)),
            Ignored::RateLimited(RateScope::Global)
        );
        assert!(matches!(
            h.handle(&plain_discover(11), t + Duration::from_secs(1)),
            Outcome::Reply(_)
        ));
    }

    /// The defaults must not throttle the benchmark: perfdhcp relays from its own address
    /// (giaddr = source) at ~24,000 requests/s, a new MAC each exchange.
    #[test]
    fn the_default_limits_leave_a_benchmark_rate_alone() {
        let mut h = handler();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let perfdhcp = from(10, 77, 0, 2);
        let mut d = plain_discover(0);
        d.set_giaddr(Ipv4Addr::new(10, 77, 0, 2));
        for i in 0..30_000u32 {
            let [_, a, b, c] = i.to_be_bytes();
            d.set_chaddr(&[0x02, 0, 0, a, b, c]);
            let now = t0 + Duration::from_micros(u64::from(i) * 1_000_000 / 30_000);
            if let Outcome::Ignore(why) = h.handle_from(&d, perfdhcp, now) {
                assert!(
                    !matches!(
                        why,
                        Ignored::RateLimited(_) | Ignored::UntrustedRelay { .. }
                    ),
                    "request {i}: {why}"
                );
            }
        }
    }

    #[test]
    fn inform_gets_options_but_no_lease() {
        let mut h = handler_with("[dhcp]\ndns = [\"10.77.0.53\"]\n");
        let mut inf = with_type(&plain_discover(1), MessageType::Inform);
        inf.set_ciaddr(Ipv4Addr::new(10, 77, 0, 30));
        let r = reply(h.handle(&inf, SystemTime::UNIX_EPOCH));
        assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.msg.ciaddr(), Ipv4Addr::new(10, 77, 0, 30));
        assert!(r.msg.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(r.msg.opts().get(OptionCode::DomainNameServer).is_some());
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 30), 68));
        assert!(records(&mut h).is_empty());
    }

    #[test]
    fn a_flooding_client_is_rate_limited_alone() {
        let mut h = handler_with("[dhcp]\nrate_limit = 1\nrate_burst = 3\n");
        let t = SystemTime::UNIX_EPOCH;
        let flood = plain_discover(1);
        let answered = (0..10)
            .filter(|_| matches!(h.handle(&flood, t), Outcome::Reply(_)))
            .count();
        assert_eq!(answered, 3);
        assert_eq!(
            ignored(h.handle(&flood, t)),
            Ignored::RateLimited(RateScope::Mac)
        );
        assert!(matches!(h.handle(&plain_discover(2), t), Outcome::Reply(_)));
        assert!(matches!(
            h.handle(&flood, t + Duration::from_secs(1)),
            Outcome::Reply(_)
        ));
    }

    #[test]
    fn restored_leases_are_never_offered_to_others() {
        let mut h = handler_with(TWO_SUBNETS);
        let taken = |m: u8, ip: Ipv4Addr| Record::Bound {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, m]),
            ip,
            expires: 9999,
        };
        let orphans = h.restore(&[
            taken(1, Ipv4Addr::new(10, 77, 0, 100)),
            taken(2, Ipv4Addr::new(10, 78, 0, 52)),
            taken(3, Ipv4Addr::new(192, 0, 2, 1)),
        ]);
        assert_eq!(orphans, 1);
        let t = SystemTime::UNIX_EPOCH;
        assert_eq!(
            dora(&mut h, &plain_discover(9), t).yiaddr(),
            Ipv4Addr::new(10, 77, 0, 101)
        );
        // The holder gets its own address back.
        assert_eq!(
            dora(&mut h, &plain_discover(1), t).yiaddr(),
            Ipv4Addr::new(10, 77, 0, 100)
        );
        let mut d = plain_discover(9);
        d.set_giaddr(Ipv4Addr::new(10, 78, 0, 1));
        assert_eq!(dora(&mut h, &d, t).yiaddr(), Ipv4Addr::new(10, 78, 0, 53));
    }

    fn ovmf_discover() -> Message {
        let mut d = plain_discover(5);
        let o = d.opts_mut();
        o.insert(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00007:UNDI:003000".to_vec(),
        ));
        o.insert(DhcpOption::ClientSystemArchitecture(7u16.into()));
        o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
        d
    }

    #[test]
    fn full_offers_to_edk2_pxe_never_say_pxeclient() {
        // EDK2 treats a PXEClient offer without option 43 as BINL and fails (PXE-E16).
        let mut h = handler();
        let offer = reply(h.handle(&ovmf_discover(), SystemTime::UNIX_EPOCH));
        assert_eq!(opt_bytes(&offer.msg, OptionCode::ClassIdentifier), None);
        assert_eq!(
            opt_bytes(&offer.msg, OptionCode::BootfileName),
            Some(b"snponly.efi".to_vec())
        );
    }

    #[test]
    fn machines_that_boot_signed_get_shim_and_the_others_ipxe() {
        let cfg = FileConfig::default().validate().unwrap();
        let signed = std::sync::Arc::new(SignedBoot::default());
        let mut tagged = crate::store::Machine::new("m".into(), vec![], 0);
        tagged.macs = vec![stork_proto::MacAddr([0x52, 0x54, 0, 0, 0, 5])];
        tagged.tags = vec![crate::lifecycle::secure_boot::TAG.into()];
        signed.note(&tagged);
        let mut h = Handler::new(ServerInfo::new(&cfg).with_signed(signed));
        let t = SystemTime::UNIX_EPOCH;
        let offer = reply(h.handle(&ovmf_discover(), t));
        assert_eq!(
            opt_bytes(&offer.msg, OptionCode::BootfileName),
            Some(b"shimx64.efi".to_vec())
        );
        let mut other = ovmf_discover();
        other.set_chaddr(&[0x52, 0x54, 0, 0, 0, 6]);
        let offer = reply(h.handle(&other, t));
        assert_eq!(
            opt_bytes(&offer.msg, OptionCode::BootfileName),
            Some(b"snponly.efi".to_vec())
        );
    }

    #[test]
    fn proxy_mode_offers_boot_information_only() {
        let mut h = handler_with("[dhcp]\nmode = \"proxy\"\n");
        let t = SystemTime::UNIX_EPOCH;
        let d = ovmf_discover();
        let offer = reply(h.handle(&d, t));
        let m = &offer.msg;
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.siaddr(), SERVER);
        assert_eq!(
            opt_bytes(m, OptionCode::ClassIdentifier),
            Some(b"PXEClient".to_vec())
        );
        assert_eq!(
            opt_bytes(m, OptionCode::VendorExtensions),
            Some(vec![6, 1, 8, 255])
        );
        assert_eq!(
            opt_bytes(m, OptionCode::BootfileName),
            Some(b"snponly.efi".to_vec())
        );
        assert!(m.opts().get(OptionCode::ClientMachineIdentifier).is_some());
        assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert_eq!(offer.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        // iPXE gets its script.
        let ipxe = reply(h.handle(&ipxe_discover(), t));
        assert_eq!(
            opt_bytes(&ipxe.msg, OptionCode::BootfileName),
            Some(b"http://10.77.0.1:8080/ipxe/52:54:00:12:34:56".to_vec())
        );
        // Not a PXE client, or not a DISCOVER: left to the site's server.
        assert_eq!(ignored(h.handle(&plain_discover(1), t)), Ignored::NotPxe);
        assert_eq!(
            ignored(h.handle(&with_type(&d, MessageType::Request), t)),
            Ignored::ProxyIgnores(MessageType::Request)
        );
        assert!(
            h.pool()
                .lease_of(&MacAddr::from_slice(d.chaddr()).unwrap())
                .is_none()
        );
        assert!(records(&mut h).is_empty());

        // Port 4011: REQUEST from the address the client got elsewhere, ACK with the file.
        let mut r = with_type(&d, MessageType::Request);
        r.set_ciaddr(Ipv4Addr::new(10, 77, 0, 150));
        let ack = reply(h.handle_pxe(&r, t));
        assert_eq!(ack.msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.msg.ciaddr(), Ipv4Addr::new(10, 77, 0, 150));
        assert_eq!(ack.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            opt_bytes(&ack.msg, OptionCode::BootfileName),
            Some(b"snponly.efi".to_vec())
        );
        assert_eq!(ack.to, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 150), 68));
        assert_eq!(
            ignored(h.handle_pxe(&d, t)),
            Ignored::Unhandled(MessageType::Discover)
        );
    }

    #[test]
    fn off_mode_answers_nothing() {
        let mut h = handler_with("[dhcp]\nmode = \"off\"\n");
        assert_eq!(
            ignored(h.handle(&ipxe_discover(), SystemTime::UNIX_EPOCH)),
            Ignored::SubnetOff
        );
    }
}
