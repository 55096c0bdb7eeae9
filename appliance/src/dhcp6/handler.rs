//! DHCPv6 (RFC 8415), sans-IO: one datagram and the time in, the reply out. Stateful
//! address assignment (IA_NA) from one range, stateless answers (Information-request), and
//! the boot file URL of RFC 5970 (option 59) for network-boot clients, chosen by the same
//! table as DHCPv4's (`dhcp::client::boot_file`).

use std::collections::HashMap;
use std::net::Ipv6Addr;

use dhcproto::v6::{
    DhcpOption, DhcpOptions, IAAddr, IANA, Message, MessageType, OptionCode, Status, StatusCode,
    UnknownOption,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use stork_proto::MacAddr;

use super::leases::{Change, Lease};
use crate::dhcp::client::{self, ClientKind};

/// RFC 5970 option 59: the boot file, as a URL.
pub const OPT_BOOTFILE_URL: u16 = 59;
/// The vendor class an HTTP-boot client sends and must get back: IANA's enterprise number
/// 343 (Intel), as EDK2 sends it, and the class string.
const HTTP_CLIENT_ENTERPRISE: u32 = 343;

/// The validated `[dhcp6]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dhcp6Config {
    pub mode: Mode,
    /// The appliance's address on the provisioning network: the boot URLs name it.
    pub address: Ipv6Addr,
    pub prefix_len: u8,
    /// Addresses leased (IA_NA), inclusive.
    pub range: (Ipv6Addr, Ipv6Addr),
    /// Valid and preferred lifetime, seconds.
    pub lease_time: u32,
    /// Per source address (a client's link-local address); `None`: no limit.
    pub rate_limit: Option<crate::dhcp::config::RateLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Addresses (IA_NA) and boot information.
    Full,
    /// Boot information only, to Information-request (addresses come from elsewhere).
    Stateless,
    Off,
}

impl Dhcp6Config {
    /// Whether DHCPv6 runs at all (full or stateless).
    pub fn serves(&self) -> bool {
        self.mode != Mode::Off
    }

    /// The provisioning network's prefix: `address` with the host bits cleared.
    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.address) & mask(self.prefix_len))
    }
}

/// What the handler needs besides the configuration.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub cfg: Dhcp6Config,
    /// This server's DUID (option 2).
    pub duid: Vec<u8>,
    /// The HTTP port boot URLs use.
    pub http_port: u16,
    /// Which UEFI PXE clients get the signed chain.
    pub signed: std::sync::Arc<crate::lifecycle::secure_boot::SignedBoot>,
}

impl ServerInfo {
    /// `http://[address]:port`, the base of every boot URL.
    pub fn http_base(&self) -> String {
        format!("http://[{}]:{}", self.cfg.address, self.http_port)
    }
}

/// A DUID-LL (RFC 8415 section 11.4) for Ethernet address `mac`.
pub fn duid_ll(mac: [u8; 6]) -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&mac);
    d
}

/// The client's MAC address when its DUID carries one (DUID-LLT and DUID-LL on Ethernet).
pub fn duid_mac(duid: &[u8]) -> Option<MacAddr> {
    let mac = match duid {
        [0, 1, 0, 1, _, _, _, _, rest @ ..] | [0, 3, 0, 1, rest @ ..] => rest,
        _ => return None,
    };
    let mac: [u8; 6] = mac.try_into().ok()?;
    Some(MacAddr(mac))
}

/// The MAC inside a modified EUI-64 interface identifier (RFC 4291 appendix A), as in the
/// link-local address a client sends from: iPXE and EDK2 form theirs so, and their DUIDs
/// (DUID-UUID, DUID-EN) carry no MAC.
pub fn eui64_mac(addr: Ipv6Addr) -> Option<MacAddr> {
    let o = addr.octets();
    let link_local = o[..8] == [0xfe, 0x80, 0, 0, 0, 0, 0, 0];
    (link_local && o[11] == 0xff && o[12] == 0xfe)
        .then(|| MacAddr([o[8] ^ 0x02, o[9], o[10], o[13], o[14], o[15]]))
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not a DHCPv6 message")]
    Malformed,
    #[error("a message type servers do not answer")]
    NotForServers,
    #[error("no client identifier")]
    NoClientId,
    #[error("addressed to another server")]
    OtherServer,
    #[error("DHCPv6 is off or stateless for this message")]
    NotServed,
}

/// One binding: the address, when it ends (Unix seconds), the client's MAC when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Binding {
    addr: Ipv6Addr,
    expires: u64,
    mac: Option<MacAddr>,
}

type Key = (Vec<u8>, u32);

/// The leases, by client DUID and IA_NA IAID, and who holds each address. A machine's
/// firmware, iPXE, the agent and the installed OS each have a DUID of their own; one MAC
/// keeps one address across them (as DHCPv4 leases by MAC), so the address the agent's
/// token was bound to is the one the installed OS phones home from.
#[derive(Debug, Default)]
pub struct Pool {
    by_client: HashMap<Key, Binding>,
    by_addr: HashMap<Ipv6Addr, Key>,
    by_mac: HashMap<MacAddr, Key>,
    /// The address each MAC held last: given again while free, so a machine keeps its
    /// address across boots even though its firmware releases it before handing over.
    last: HashMap<MacAddr, Ipv6Addr>,
    /// Where the search for a free address starts: after the last one given, so that
    /// handing out a range costs one step per address, not a scan from its start.
    next: u128,
}

impl Pool {
    /// The client's address: its binding (renewed); else the one its MAC holds under
    /// another DUID, which moves to it (the old key is returned, to be written released);
    /// else the first free one in `range`.
    fn bind(
        &mut self,
        key: Key,
        mac: Option<MacAddr>,
        range: (Ipv6Addr, Ipv6Addr),
        now: u64,
        lease: u32,
    ) -> Option<(Ipv6Addr, Option<Key>)> {
        let expires = now + u64::from(lease);
        match self.by_client.get_mut(&key) {
            // Another machine with the same DUID and IAID (iPXE's DUID-UUID is all zeros
            // where the firmware has no UUID): not a renewal of that one's lease.
            Some(b) if b.mac.is_some() && mac.is_some() && b.mac != mac => {
                self.remove(&key);
            }
            Some(b) => {
                b.expires = expires;
                b.mac = b.mac.or(mac);
                return Some((b.addr, None));
            }
            None => {}
        }
        if let Some(old) = mac.and_then(|m| self.by_mac.get(&m)).cloned()
            && let Some(b) = self.by_client.remove(&old)
        {
            let addr = b.addr;
            self.insert(key, Binding { addr, expires, mac });
            return Some((addr, Some(old)));
        }
        let (start, end) = (u128::from(range.0), u128::from(range.1));
        let from = self.next.clamp(start, end);
        let free = |a: &Ipv6Addr| {
            self.by_addr
                .get(a)
                .and_then(|k| self.by_client.get(k))
                .is_none_or(|b| b.expires <= now)
        };
        let sticky = mac
            .and_then(|m| self.last.get(&m).copied())
            .filter(|a| (start..=end).contains(&u128::from(*a)) && free(a));
        // Else from the cursor to the end, then from the start to the cursor.
        let addr = match sticky {
            Some(a) => a,
            None => {
                let a = (from..=end)
                    .chain(start..from)
                    .map(Ipv6Addr::from)
                    .find(free)?;
                self.next = u128::from(a).saturating_add(1);
                a
            }
        };
        if let Some(old) = self.by_addr.get(&addr).cloned() {
            self.remove(&old);
        }
        self.insert(key, Binding { addr, expires, mac });
        Some((addr, None))
    }

    fn insert(&mut self, key: Key, b: Binding) {
        // An address and a MAC each have one holder: the newest.
        if let Some(old) = self.by_addr.get(&b.addr).cloned()
            && old != key
        {
            self.remove(&old);
        }
        if let Some(m) = b.mac {
            self.by_mac.insert(m, key.clone());
            self.last.insert(m, b.addr);
        }
        self.by_addr.insert(b.addr, key.clone());
        self.by_client.insert(key, b);
    }

    fn remove(&mut self, key: &Key) -> Option<Binding> {
        let b = self.by_client.remove(key)?;
        if self.by_addr.get(&b.addr) == Some(key) {
            self.by_addr.remove(&b.addr);
        }
        if let Some(m) = b.mac
            && self.by_mac.get(&m) == Some(key)
        {
            self.by_mac.remove(&m);
        }
        Some(b)
    }

    /// Puts back a lease read from the lease file.
    pub fn restore(&mut self, l: Lease) {
        let b = Binding {
            addr: l.addr,
            expires: l.expires,
            mac: l.mac,
        };
        self.insert((l.duid, l.iaid), b);
    }

    fn release(&mut self, key: &Key) -> Option<MacAddr> {
        self.remove(key).and_then(|b| b.mac)
    }

    /// The address leased to `key`, if any and unexpired.
    pub fn lease_of(&self, duid: &[u8], iaid: u32, now: u64) -> Option<Ipv6Addr> {
        self.by_client
            .get(&(duid.to_vec(), iaid))
            .filter(|b| b.expires > now)
            .map(|b| b.addr)
    }
}

/// The DHCPv6 server's state: its information and its leases.
#[derive(Debug)]
pub struct Handler {
    pub info: ServerInfo,
    pub pool: Pool,
}

/// What one client message produced.
#[derive(Debug)]
pub struct Handled {
    /// The reply, encoded.
    pub reply: Vec<u8>,
    /// Lease changes to make durable before the reply is sent.
    pub changes: Vec<Change>,
    /// The client is UEFI HTTP boot (EDK2) and now holds an address: it reaches its
    /// server only through a default router, so it should be sent one
    /// ([`crate::dhcp::ra::router_hint`]).
    pub router_hint: bool,
}

impl Handled {
    pub fn into_pair(self) -> (Vec<u8>, Vec<Change>) {
        (self.reply, self.changes)
    }
}

impl Handler {
    pub fn new(info: ServerInfo) -> Self {
        Self {
            info,
            pool: Pool::default(),
        }
    }

    /// The reply to `bytes` (a client message) at `now` (Unix seconds), encoded, and the
    /// lease changes to make durable before it is sent.
    pub fn handle(&mut self, bytes: &[u8], now: u64) -> Result<(Vec<u8>, Vec<Change>), Ignored> {
        self.handle_from(bytes, now, None).map(Handled::into_pair)
    }

    /// [`Handler::handle`] for a message sent from `peer`: a client whose DUID carries no
    /// MAC is known by the one in its link-local address ([`eui64_mac`]).
    pub fn handle_from(
        &mut self,
        bytes: &[u8],
        now: u64,
        peer: Option<Ipv6Addr>,
    ) -> Result<Handled, Ignored> {
        super::edge::check(bytes)?;
        let req = Message::decode(&mut Decoder::new(bytes)).map_err(|_| Ignored::Malformed)?;
        let mut changes = Vec::new();
        let reply = self.reply(&req, now, peer, &mut changes)?;
        let router_hint = reply.msg_type() == MessageType::Reply
            && changes.iter().any(|c| matches!(c, Change::Bound { .. }))
            && matches!(
                classify(&req),
                ClientKind::HttpUefiX64 | ClientKind::HttpUefiArm64
            );
        let mut out = Vec::with_capacity(256);
        reply
            .encode(&mut Encoder::new(&mut out))
            .map_err(|_| Ignored::Malformed)?;
        Ok(Handled {
            reply: out,
            changes,
            router_hint,
        })
    }

    fn reply(
        &mut self,
        req: &Message,
        now: u64,
        peer: Option<Ipv6Addr>,
        changes: &mut Vec<Change>,
    ) -> Result<Message, Ignored> {
        use MessageType as M;
        let kind = req.msg_type();
        if !matches!(
            kind,
            M::Solicit
                | M::Request
                | M::Confirm
                | M::Renew
                | M::Rebind
                | M::Release
                | M::Decline
                | M::InformationRequest
        ) {
            return Err(Ignored::NotForServers);
        }
        let client_id = match req.opts().get(OptionCode::ClientId) {
            Some(DhcpOption::ClientId(id)) => id.clone(),
            // Information-request may come without one (RFC 8415 section 18.2.6).
            _ if kind == M::InformationRequest => Vec::new(),
            _ => return Err(Ignored::NoClientId),
        };
        // Request, Renew, Release and Decline name the server they are for.
        if let Some(DhcpOption::ServerId(id)) = req.opts().get(OptionCode::ServerId)
            && *id != self.info.duid
        {
            return Err(Ignored::OtherServer);
        }
        let mac = duid_mac(&client_id).or_else(|| peer.and_then(eui64_mac));
        let mode = self.info.cfg.mode;
        if mode == Mode::Off || (mode == Mode::Stateless && kind != M::InformationRequest) {
            return Err(Ignored::NotServed);
        }
        let rapid = kind == M::Solicit && req.opts().get(OptionCode::RapidCommit).is_some();
        let out_kind = if kind == M::Solicit && !rapid {
            M::Advertise
        } else {
            M::Reply
        };
        let mut msg = Message::new_with_id(out_kind, req.xid());
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::ServerId(self.info.duid.clone()));
        if !client_id.is_empty() {
            opts.insert(DhcpOption::ClientId(client_id.clone()));
        }
        if rapid {
            opts.insert(DhcpOption::RapidCommit);
        }
        if out_kind == M::Advertise {
            // The highest preference: the client takes this offer without waiting for others.
            opts.insert(DhcpOption::Preference(255));
        }
        let lease = self.info.cfg.lease_time;
        let ianas: Vec<IANA> = req
            .opts()
            .get_all(OptionCode::IANA)
            .unwrap_or_default()
            .iter()
            .filter_map(|o| match o {
                DhcpOption::IANA(ia) => Some(ia.clone()),
                _ => None,
            })
            .collect();
        match kind {
            M::Solicit | M::Request | M::Renew | M::Rebind => {
                for ia in &ianas {
                    let key = (client_id.clone(), ia.id);
                    let bound = self.pool.bind(key, mac, self.info.cfg.range, now, lease);
                    // An Advertise only offers: what a Reply grants must outlive a crash.
                    if let (Some((addr, moved_from)), M::Reply) = (&bound, out_kind) {
                        if let Some((duid, iaid)) = moved_from.clone() {
                            changes.push(Change::Released {
                                duid,
                                iaid,
                                mac: None,
                            });
                        }
                        changes.push(Change::Bound {
                            duid: client_id.clone(),
                            iaid: ia.id,
                            addr: *addr,
                            expires: now + u64::from(lease),
                            mac,
                        });
                    }
                    let granted = bound.map(|(addr, _)| addr);
                    msg.opts_mut()
                        .insert(DhcpOption::IANA(ia_na(ia.id, granted, lease)));
                }
            }
            M::Release | M::Decline => {
                for ia in &ianas {
                    let held_by = self.pool.release(&(client_id.clone(), ia.id));
                    changes.push(Change::Released {
                        duid: client_id.clone(),
                        iaid: ia.id,
                        mac: held_by,
                    });
                }
                msg.opts_mut().insert(status(Status::Success, "released"));
            }
            M::Confirm => {
                let on_link = ianas.iter().all(|ia| {
                    ia.opts.iter().all(|o| match o {
                        DhcpOption::IAAddr(a) => self.on_link(a.addr),
                        _ => true,
                    })
                });
                msg.opts_mut().insert(if on_link {
                    status(Status::Success, "on link")
                } else {
                    status(Status::NotOnLink, "not on this link")
                });
            }
            _ => {}
        }
        if matches!(
            kind,
            M::Solicit | M::Request | M::Renew | M::Rebind | M::InformationRequest
        ) {
            self.boot(req, mac, &mut msg);
        }
        Ok(msg)
    }

    fn on_link(&self, addr: Ipv6Addr) -> bool {
        same_prefix(addr, self.info.cfg.address, self.info.cfg.prefix_len)
    }

    /// The boot file URL (and for HTTP boot the vendor class) for a network-boot client.
    fn boot(&self, req: &Message, mac: Option<MacAddr>, msg: &mut Message) {
        let kind = classify(req);
        if kind == ClientKind::Plain {
            return;
        }
        let base = self.info.http_base();
        let script = match mac {
            Some(mac) => format!("{base}/ipxe/{mac}"),
            // iPXE's script is per machine: without a MAC there is none to give.
            None if kind == ClientKind::Ipxe => return,
            None => String::new(),
        };
        let signed = mac.is_some_and(|m| self.info.signed.wants(m));
        let Some(answer) = client::boot_file(kind, &script, &base, signed) else {
            return;
        };
        let url = if answer.file.contains("://") {
            answer.file
        } else {
            format!("tftp://[{}]/{}", self.info.cfg.address, answer.file)
        };
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(OPT_BOOTFILE_URL),
            url.into_bytes(),
        )));
        if answer.vendor_class == Some("HTTPClient") {
            opts.insert(vendor_class(HTTP_CLIENT_ENTERPRISE, b"HTTPClient"));
        }
    }
}

/// Whether `a` and `b` share their first `prefix_len` bits.
pub fn same_prefix(a: Ipv6Addr, b: Ipv6Addr, prefix_len: u8) -> bool {
    let m = mask(prefix_len);
    u128::from(a) & m == u128::from(b) & m
}

/// The first `prefix_len` bits set.
fn mask(prefix_len: u8) -> u128 {
    let bits = u32::from(prefix_len.min(128));
    u128::MAX.checked_shl(128 - bits).unwrap_or(0)
}

fn ia_na(id: u32, addr: Option<Ipv6Addr>, lease: u32) -> IANA {
    let mut opts = DhcpOptions::new();
    match addr {
        Some(addr) => opts.insert(DhcpOption::IAAddr(IAAddr {
            addr,
            preferred_life: lease,
            valid_life: lease,
            opts: DhcpOptions::new(),
        })),
        None => opts.insert(status(Status::NoAddrsAvail, "no addresses left")),
    }
    // RFC 8415 section 21.4: renew at half the lifetime, rebind at 0.8.
    let (t1, t2) = match addr {
        Some(_) => (lease / 2, lease / 5 * 4),
        None => (0, 0),
    };
    IANA { id, t1, t2, opts }
}

/// Option 16 with one class. By hand: dhcproto 0.15 writes the vendor and user class
/// options' length as their number of items, not bytes (it decodes them right).
pub fn vendor_class(enterprise: u32, class: &[u8]) -> DhcpOption {
    let mut data = enterprise.to_be_bytes().to_vec();
    data.extend_from_slice(&(class.len() as u16).to_be_bytes());
    data.extend_from_slice(class);
    DhcpOption::Unknown(UnknownOption::new(OptionCode::VendorClass, data))
}

/// Option 15 with one class, by hand for the same reason as [`vendor_class`].
pub fn user_class(class: &[u8]) -> DhcpOption {
    let mut data = (class.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(class);
    DhcpOption::Unknown(UnknownOption::new(OptionCode::UserClass, data))
}

fn status(status: Status, msg: &str) -> DhcpOption {
    DhcpOption::StatusCode(StatusCode {
        status,
        msg: msg.to_string(),
    })
}

/// The client's kind from its DHCPv6 options: iPXE by its user class, the firmware by its
/// architecture (option 61) and vendor class (`HTTPClient` for HTTP boot); then the same
/// kinds as DHCPv4's.
pub fn classify(req: &Message) -> ClientKind {
    let has = |data: &[Vec<u8>], what: &[u8]| {
        data.iter()
            .any(|d| d.windows(what.len()).any(|w| w == what))
    };
    if let Some(DhcpOption::UserClass(u)) = req.opts().get(OptionCode::UserClass)
        && has(&u.data, b"iPXE")
    {
        return ClientKind::Ipxe;
    }
    let http = matches!(
        req.opts().get(OptionCode::VendorClass),
        Some(DhcpOption::VendorClass(v)) if has(&v.data, b"HTTPClient")
    );
    let arch = match req.opts().get(OptionCode::ClientArchType) {
        Some(DhcpOption::ClientArchType(a)) => a.first().map(|a| u16::from(*a)),
        _ => None,
    };
    use client::arch;
    match (arch, http) {
        (None, _) => ClientKind::Plain,
        (Some(arch::EFI_X64 | arch::EFI_BC), false) => ClientKind::PxeUefiX64,
        (Some(arch::EFI_X64_HTTP), _) | (Some(arch::EFI_X64 | arch::EFI_BC), true) => {
            ClientKind::HttpUefiX64
        }
        (Some(arch::EFI_ARM64), false) => ClientKind::PxeUefiArm64,
        (Some(arch::EFI_ARM64_HTTP), _) | (Some(arch::EFI_ARM64), true) => {
            ClientKind::HttpUefiArm64
        }
        // No IPv6 PXE on BIOS: iPXE (above) is the BIOS path over IPv6.
        (Some(other), _) => ClientKind::PxeUnknown(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v6::ORO;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x66, 0, 1];

    fn handler(mode: Mode) -> Handler {
        Handler::new(ServerInfo {
            cfg: Dhcp6Config {
                mode,
                address: "fd77::1".parse().unwrap(),
                prefix_len: 64,
                range: ("fd77::100".parse().unwrap(), "fd77::101".parse().unwrap()),
                lease_time: 3600,
                rate_limit: None,
            },
            duid: duid_ll([2, 0, 0, 0, 0, 1]),
            http_port: 8080,
            signed: Default::default(),
        })
    }

    fn msg(kind: MessageType, client: &[u8], extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(kind, [1, 2, 3]);
        m.opts_mut().insert(DhcpOption::ClientId(client.to_vec()));
        m.opts_mut().insert(DhcpOption::IANA(IANA {
            id: 7,
            t1: 0,
            t2: 0,
            opts: DhcpOptions::new(),
        }));
        m.opts_mut().insert(DhcpOption::ORO(ORO { opts: vec![] }));
        for o in extra {
            m.opts_mut().insert(o);
        }
        let mut out = Vec::new();
        m.encode(&mut Encoder::new(&mut out)).unwrap();
        out
    }

    fn decode(out: &(Vec<u8>, Vec<Change>)) -> Message {
        Message::decode(&mut Decoder::new(&out.0)).unwrap()
    }

    fn leased(m: &Message) -> Option<Ipv6Addr> {
        let Some(DhcpOption::IANA(ia)) = m.opts().get(OptionCode::IANA) else {
            return None;
        };
        ia.opts.iter().find_map(|o| match o {
            DhcpOption::IAAddr(a) => Some(a.addr),
            _ => None,
        })
    }

    fn url(m: &Message) -> Option<String> {
        match m.opts().get(OptionCode::from(OPT_BOOTFILE_URL)) {
            Some(DhcpOption::Unknown(u)) => Some(String::from_utf8_lossy(u.data()).into()),
            _ => None,
        }
    }

    #[test]
    fn solicit_advertises_and_request_binds_the_same_address() {
        let mut h = handler(Mode::Full);
        let client = duid_ll(MAC);
        let out = h
            .handle(&msg(MessageType::Solicit, &client, vec![]), 100)
            .unwrap();
        assert!(
            out.1.is_empty(),
            "an Advertise commits nothing: {:?}",
            out.1
        );
        let adv = decode(&out);
        assert_eq!(adv.msg_type(), MessageType::Advertise);
        assert_eq!(adv.xid(), [1, 2, 3]);
        let addr = leased(&adv).unwrap();
        assert_eq!(addr, "fd77::100".parse::<Ipv6Addr>().unwrap());
        let server = DhcpOption::ServerId(h.info.duid.clone());
        let rep = h
            .handle(
                &msg(MessageType::Request, &client, vec![server.clone()]),
                101,
            )
            .unwrap();
        let bound = Change::Bound {
            duid: client.clone(),
            iaid: 7,
            addr,
            expires: 101 + 3600,
            mac: Some(MacAddr(MAC)),
        };
        assert_eq!(rep.1, [bound]);
        let rep = decode(&rep);
        assert_eq!(rep.msg_type(), MessageType::Reply);
        assert_eq!(leased(&rep), Some(addr));
        assert_eq!(h.pool.lease_of(&client, 7, 102), Some(addr));
        // Another client gets the next address; a third finds none left.
        let other = duid_ll([0x52, 0x54, 0, 0x66, 0, 2]);
        let rep2 = decode(
            &h.handle(&msg(MessageType::Request, &other, vec![]), 103)
                .unwrap(),
        );
        assert_eq!(leased(&rep2), Some("fd77::101".parse().unwrap()));
        let third = duid_ll([0x52, 0x54, 0, 0x66, 0, 3]);
        let rep3 = decode(
            &h.handle(&msg(MessageType::Solicit, &third, vec![]), 104)
                .unwrap(),
        );
        assert_eq!(leased(&rep3), None);
        // Released, the address goes to the third client.
        let out = h
            .handle(&msg(MessageType::Release, &client, vec![server]), 105)
            .unwrap();
        let released = Change::Released {
            duid: client.clone(),
            iaid: 7,
            mac: Some(MacAddr(MAC)),
        };
        assert_eq!(out.1, [released]);
        let rep3 = decode(
            &h.handle(&msg(MessageType::Solicit, &third, vec![]), 106)
                .unwrap(),
        );
        assert_eq!(leased(&rep3), Some(addr));
        // An expired lease is free again.
        let late = h.info.cfg.lease_time as u64 + 200;
        let fourth = duid_ll([0x52, 0x54, 0, 0x66, 0, 4]);
        let rep4 = decode(
            &h.handle(&msg(MessageType::Solicit, &fourth, vec![]), late)
                .unwrap(),
        );
        assert!(leased(&rep4).is_some());
    }

    #[test]
    fn rapid_commit_replies_at_once() {
        let mut h = handler(Mode::Full);
        let client = duid_ll(MAC);
        let rep = h
            .handle(
                &msg(MessageType::Solicit, &client, vec![DhcpOption::RapidCommit]),
                1,
            )
            .unwrap();
        let rep = decode(&rep);
        assert_eq!(rep.msg_type(), MessageType::Reply);
        assert!(rep.opts().get(OptionCode::RapidCommit).is_some());
        assert!(h.pool.lease_of(&client, 7, 2).is_some());
    }

    #[test]
    fn boot_urls_by_client_kind() {
        let mut h = handler(Mode::Full);
        let client = duid_ll(MAC);
        let arch = |a: u16| DhcpOption::ClientArchType(vec![a.into()]);
        let ipxe = user_class(b"iPXE");
        let http = vendor_class(343, b"HTTPClient:Arch:00016:UNDI:003001");
        let cases = [
            (vec![], None),
            (
                vec![ipxe],
                Some("http://[fd77::1]:8080/ipxe/52:54:00:66:00:01".to_string()),
            ),
            (vec![arch(7)], Some("tftp://[fd77::1]/snponly.efi".into())),
            (
                vec![arch(16), http],
                Some("http://[fd77::1]:8080/boot/snponly.efi".into()),
            ),
            (vec![arch(6)], None),
        ];
        for (extra, want) in cases {
            let rep = decode(
                &h.handle(&msg(MessageType::Solicit, &client, extra.clone()), 1)
                    .unwrap(),
            );
            assert_eq!(url(&rep), want, "{extra:?}");
            // An HTTP-boot client gets its vendor class back, readable as one.
            let class = match rep.opts().get(OptionCode::VendorClass) {
                Some(DhcpOption::VendorClass(v)) => Some((v.num, v.data.clone())),
                _ => None,
            };
            let http = want
                .as_deref()
                .is_some_and(|u| u.ends_with("/boot/snponly.efi"));
            let want_class = http.then(|| (343, vec![b"HTTPClient".to_vec()]));
            assert_eq!(class, want_class, "{extra:?}");
        }
    }

    #[test]
    fn an_http_boot_client_holding_an_address_wants_a_router() {
        let mut h = handler(Mode::Full);
        let client = duid_ll(MAC);
        let http = vec![
            DhcpOption::ClientArchType(vec![16.into()]),
            vendor_class(343, b"HTTPClient:Arch:00016:UNDI:003001"),
        ];
        let hint = |h: &mut Handler, kind, extra: Vec<DhcpOption>| {
            h.handle_from(&msg(kind, &client, extra), 1, None)
                .unwrap()
                .router_hint
        };
        // Only once it holds an address (a Reply that binds), not at the offer.
        assert!(!hint(&mut h, MessageType::Solicit, http.clone()));
        assert!(hint(&mut h, MessageType::Request, http));
        // iPXE and PXE clients find the server on the link themselves.
        let pxe = vec![DhcpOption::ClientArchType(vec![7.into()])];
        assert!(!hint(&mut h, MessageType::Request, pxe));
        assert!(!hint(
            &mut h,
            MessageType::Request,
            vec![user_class(b"iPXE")]
        ));
    }

    #[test]
    fn stateless_answers_information_requests_only_and_other_servers_are_left_alone() {
        let mut h = handler(Mode::Stateless);
        let client = duid_ll(MAC);
        assert_eq!(
            h.handle(&msg(MessageType::Solicit, &client, vec![]), 1),
            Err(Ignored::NotServed)
        );
        let info = msg(
            MessageType::InformationRequest,
            &client,
            vec![DhcpOption::ClientArchType(vec![7.into()])],
        );
        let rep = decode(&h.handle(&info, 1).unwrap());
        assert_eq!(rep.msg_type(), MessageType::Reply);
        assert!(leased(&rep).is_none());
        assert_eq!(url(&rep).as_deref(), Some("tftp://[fd77::1]/snponly.efi"));
        let mut full = handler(Mode::Full);
        let elsewhere = DhcpOption::ServerId(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]);
        assert_eq!(
            full.handle(&msg(MessageType::Request, &client, vec![elsewhere]), 1),
            Err(Ignored::OtherServer)
        );
        assert_eq!(full.handle(b"\x01", 1), Err(Ignored::Malformed));
        assert_eq!(
            full.handle(&msg(MessageType::Advertise, &client, vec![]), 1),
            Err(Ignored::NotForServers)
        );
    }

    #[test]
    fn confirm_checks_the_prefix() {
        let mut h = handler(Mode::Full);
        let client = duid_ll(MAC);
        let confirm = |addr: &str| {
            let mut m = Message::new_with_id(MessageType::Confirm, [9, 9, 9]);
            m.opts_mut().insert(DhcpOption::ClientId(client.clone()));
            let mut ia = DhcpOptions::new();
            ia.insert(DhcpOption::IAAddr(IAAddr {
                addr: addr.parse().unwrap(),
                preferred_life: 0,
                valid_life: 0,
                opts: DhcpOptions::new(),
            }));
            m.opts_mut().insert(DhcpOption::IANA(IANA {
                id: 1,
                t1: 0,
                t2: 0,
                opts: ia,
            }));
            let mut out = Vec::new();
            m.encode(&mut Encoder::new(&mut out)).unwrap();
            out
        };
        let code =
            |out: (Vec<u8>, Vec<Change>)| match decode(&out).opts().get(OptionCode::StatusCode) {
                Some(DhcpOption::StatusCode(s)) => s.status,
                other => panic!("{other:?}"),
            };
        assert_eq!(
            code(h.handle(&confirm("fd77::5"), 1).unwrap()),
            Status::Success
        );
        assert_eq!(
            code(h.handle(&confirm("fd78::5"), 1).unwrap()),
            Status::NotOnLink
        );
    }

    #[test]
    fn one_mac_keeps_one_address_across_duids() {
        // iPXE (a DUID-UUID, no MAC in it) then the installed OS (a DUID-EN): both from
        // the machine's EUI-64 link-local address.
        let ll: Ipv6Addr = "fe80::5054:ff:fe66:1".parse().unwrap();
        assert_eq!(eui64_mac(ll), Some(MacAddr(MAC)));
        assert_eq!(eui64_mac("fe80::1".parse().unwrap()), None);
        assert_eq!(eui64_mac("fd77::5054:ff:fe66:1".parse().unwrap()), None);
        let mut h = handler(Mode::Full);
        let ipxe = vec![0, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        let rep = h
            .handle_from(&msg(MessageType::Request, &ipxe, vec![]), 100, Some(ll))
            .unwrap()
            .into_pair();
        let first = leased(&decode(&rep)).unwrap();
        let os = vec![0, 2, 0, 0, 0, 9, 7, 7];
        let rep = h
            .handle_from(&msg(MessageType::Request, &os, vec![]), 200, Some(ll))
            .unwrap()
            .into_pair();
        assert_eq!(leased(&decode(&rep)), Some(first));
        // The move is written: the old holder released, the new one bound, with the MAC.
        assert!(matches!(&rep.1[..], [
            Change::Released { duid, .. },
            Change::Bound { mac: Some(m), .. },
        ] if *duid == ipxe && *m == MacAddr(MAC)));
        // Released (firmware does before it hands over), the address waits for its MAC:
        // the next DUID from that machine gets it again.
        let server = DhcpOption::ServerId(h.info.duid.clone());
        h.handle_from(&msg(MessageType::Release, &os, vec![server]), 210, Some(ll))
            .unwrap();
        let again = vec![0, 2, 0, 0, 0, 9, 8, 8];
        let rep = h
            .handle_from(&msg(MessageType::Request, &again, vec![]), 220, Some(ll))
            .unwrap()
            .into_pair();
        assert_eq!(leased(&decode(&rep)), Some(first));
        // Another machine with the same DUID and IAID as that one (a DUID-UUID of zeros):
        // another address, not the first machine's.
        let other: Ipv6Addr = "fe80::5054:ff:fe66:2".parse().unwrap();
        let rep = h
            .handle_from(&msg(MessageType::Request, &again, vec![]), 300, Some(other))
            .unwrap()
            .into_pair();
        let second = leased(&decode(&rep)).unwrap();
        assert_ne!(second, first);
    }

    #[test]
    fn duids_carry_macs() {
        assert_eq!(duid_mac(&duid_ll(MAC)), Some(MacAddr(MAC)));
        let llt = [0, 1, 0, 1, 1, 2, 3, 4, 0x52, 0x54, 0, 0x66, 0, 1];
        assert_eq!(duid_mac(&llt), Some(MacAddr(MAC)));
        assert_eq!(duid_mac(&[0, 2, 0, 0, 1, 2]), None);
    }
}
