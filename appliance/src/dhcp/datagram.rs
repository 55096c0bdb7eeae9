//! One datagram in, what to do with it out: the edge checks, the handler, the journal
//! records and the encoded reply, sans I/O. The socket loop ([`super::run`]) and the fuzz
//! driver run exactly this, so the driver reaches every line a hostile packet can. The loop
//! receives datagrams in batches ([`super::mmsg`]) and gathers what they come to in a
//! [`Batch`]: replies to send at once, and one journal [`Commit`] for the whole batch.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::SystemTime;

use dhcproto::v4::{Encodable, MessageType};

use super::edge::{self, Request};
use super::handler::{Handler, Ignored, Outcome, RateScope};
use super::journal::{Commit, Job};
use super::{Stats, bump};

/// Which socket a datagram came in on, and so which one answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP.
    Dhcp,
    /// 4011: the PXE boot server (proxy mode).
    Pxe,
}

/// What the socket loop does next.
#[derive(Debug)]
pub enum Action {
    Nothing,
    /// Send now, on the socket of `port` ([`super::reply::send`]).
    Send(Send),
    /// Make these records durable; the journal writer sends the reply (if any) after.
    Journal(Job),
}

/// An encoded reply, with what [`super::reply`] needs to send and count it.
#[derive(Debug)]
pub struct Send {
    pub bytes: Vec<u8>,
    pub to: SocketAddr,
    pub port: Port,
    pub kind: Option<MessageType>,
    /// A boot-only answer (proxy mode), counted apart from offers and ACKs.
    pub proxy: bool,
}

impl Send {
    /// A datagram on port 67 that counts as nothing in particular (a test's, a load
    /// client's).
    pub fn plain(to: SocketAddr, bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            to,
            port: Port::Dhcp,
            kind: None,
            proxy: false,
        }
    }
}

/// What one received batch of datagrams comes to: the replies that depend on nothing
/// durable (offers, NAKs, INFORM and proxy answers), and every lease change of the batch
/// with the ACKs that wait for it, as one [`Commit`]. The loop sends the first with
/// `sendmmsg` and queues the commit whole, so a batch costs the journal writer one wake-up
/// and at most one `fdatasync`, and the ACKs still leave only once their leases are durable.
#[derive(Debug, Default)]
pub struct Batch {
    /// Sent on the socket the batch came in on (each reply's `port` is that socket's).
    pub immediate: Vec<Send>,
    pub commit: Commit,
}

impl Batch {
    pub fn push(&mut self, action: Action) {
        match action {
            Action::Nothing => {}
            Action::Send(s) => self.immediate.push(s),
            Action::Journal(job) => self.commit.add(job),
        }
    }

    /// The batch's commit, if it changed anything; the batch is left without one.
    pub fn take_commit(&mut self) -> Option<Commit> {
        (!self.commit.is_empty()).then(|| std::mem::take(&mut self.commit))
    }
}

/// Sources refused as relays that get a warning in the log (each once), so an operator
/// whose relay is not trusted finds out, and a host forging giaddrs cannot fill the log.
const RELAY_WARNINGS: usize = 32;

pub struct Server {
    handler: Handler,
    stats: Arc<Stats>,
    records: Vec<super::journal::Record>,
    warned_relays: HashSet<IpAddr>,
}

impl Server {
    /// The protocol logic, for what the I/O layer learns outside requests (the HA
    /// partner's state, leases the database says others hold).
    pub fn handler_mut(&mut self) -> &mut Handler {
        &mut self.handler
    }

    pub fn new(handler: Handler, stats: Arc<Stats>) -> Self {
        Self {
            handler,
            stats,
            records: Vec::new(),
            warned_relays: HashSet::new(),
        }
    }

    /// Everything the server does with one datagram. A panic anywhere in it (a bug we have
    /// not found yet) costs this datagram only: it is caught, counted and logged with the
    /// datagram's summary.
    pub fn on_datagram(
        &mut self,
        bytes: &[u8],
        peer: SocketAddr,
        port: Port,
        now: SystemTime,
    ) -> Action {
        bump(&self.stats.received);
        match catch_unwind(AssertUnwindSafe(|| self.process(bytes, peer, port, now))) {
            Ok(action) => action,
            Err(panic) => {
                bump(&self.stats.panics);
                // Records a half-handled request queued must not reach the journal.
                self.records.clear();
                let what = crate::supervise::panic_message(&*panic);
                let head = hex::encode(bytes.get(..16).unwrap_or(bytes));
                tracing::error!(%peer, len = bytes.len(), %head, panic = %what,
                    "DHCP packet handling panicked: packet dropped");
                Action::Nothing
            }
        }
    }

    /// Every datagram of one receive call, in order, into `out` ([`Batch`]); one clock
    /// reading serves the batch (it spans well under a millisecond).
    pub fn on_batch<'a>(
        &mut self,
        datagrams: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
        port: Port,
        now: SystemTime,
        out: &mut Batch,
    ) {
        for (bytes, peer) in datagrams {
            out.push(self.on_datagram(bytes, peer, port, now));
        }
    }

    fn process(&mut self, bytes: &[u8], peer: SocketAddr, port: Port, now: SystemTime) -> Action {
        let req = match edge::accept(bytes) {
            Ok(r) => r,
            Err(why) => {
                bump(why.counter(&self.stats));
                if !matches!(why, edge::Dropped::Oversized { .. }) {
                    bump(&self.stats.malformed);
                }
                tracing::debug!(%peer, len = bytes.len(), reason = %why, "dropped DHCP packet");
                return Action::Nothing;
            }
        };
        self.count_request(req.kind);
        let outcome = self.handler.answer(&req, peer, port, now);
        self.handler.take_records(&mut self.records);
        match outcome {
            Outcome::Reply(reply) => self.reply(&req, reply, peer, port),
            Outcome::Ignore(why) => {
                bump(&self.stats.ignored);
                if let Some(c) = ignored_counter(&why, &self.stats) {
                    bump(c);
                }
                if let Ignored::UntrustedRelay { giaddr, from } = why
                    && self.warned_relays.len() < RELAY_WARNINGS
                    && self.warned_relays.insert(from)
                {
                    tracing::warn!(%from, %giaddr, "relayed DHCP request from a source that is not a trusted relay: ignored (list the relay's address in dhcp.relays)");
                }
                tracing::debug!(mac = %req.mac, xid = req.msg.xid(), %peer, reason = %why, "DHCP request ignored");
                // RELEASE and DECLINE: no reply, but the change must outlive a crash.
                self.journal(None)
            }
        }
    }

    fn reply(
        &mut self,
        req: &Request,
        mut reply: super::handler::Reply,
        peer: SocketAddr,
        port: Port,
    ) -> Action {
        if port == Port::Pxe
            && let SocketAddr::V4(p) = peer
        {
            // PXE 2.1: the boot server answers where the request came from.
            reply.to = p;
        }
        let kind = reply.msg.opts().msg_type();
        let bytes = match reply.msg.to_vec() {
            Ok(b) => b,
            Err(e) => {
                bump(&self.stats.send_errors);
                tracing::error!(mac = %req.mac, error = %e, "cannot encode DHCP reply");
                self.records.clear();
                return Action::Nothing;
            }
        };
        let to = SocketAddr::V4(reply.to);
        // A proxy offer is the only offer without an address.
        let proxy = port == Port::Pxe
            || (kind == Some(MessageType::Offer) && reply.msg.yiaddr().is_unspecified());
        tracing::debug!(mac = %req.mac, xid = req.msg.xid(), ?kind, yiaddr = %reply.msg.yiaddr(), %to, "DHCP reply");
        let send = Send {
            bytes,
            to,
            port,
            kind,
            proxy,
        };
        if !self.records.is_empty() {
            // An ACK that binds a lease leaves only once the lease is durable.
            return self.journal(Some(send));
        }
        Action::Send(send)
    }

    fn journal(&mut self, reply: Option<Send>) -> Action {
        if self.records.is_empty() {
            return Action::Nothing;
        }
        Action::Journal(Job {
            records: std::mem::take(&mut self.records),
            reply,
        })
    }

    fn count_request(&self, kind: MessageType) {
        let s = &self.stats;
        match kind {
            MessageType::Discover => bump(&s.discover),
            MessageType::Request => bump(&s.request),
            MessageType::Decline => bump(&s.decline),
            MessageType::Release => bump(&s.release),
            MessageType::Inform => bump(&s.inform),
            _ => {}
        }
    }
}

/// The counter of an ignored request's reason, beside `ignored`, where it has one.
fn ignored_counter<'s>(why: &Ignored, s: &'s Stats) -> Option<&'s std::sync::atomic::AtomicU64> {
    Some(match why {
        Ignored::RateLimited(RateScope::Mac) => &s.rate_limited,
        Ignored::RateLimited(RateScope::Source) => &s.rate_limited_source,
        Ignored::RateLimited(RateScope::Global) => &s.rate_limited_global,
        Ignored::ForeignRelay(_) | Ignored::UntrustedRelay { .. } => &s.relay_refused,
        Ignored::DeclineRefused { .. } => &s.decline_refused,
        Ignored::PartnersClient => &s.ha_partners_clients,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::time::Duration;

    use dhcproto::v4::{Decodable, Decoder, DhcpOption, Message, Opcode};

    use super::*;
    use crate::config::FileConfig;
    use crate::dhcp::handler::ServerInfo;

    fn server(text: &str) -> (Server, Arc<Stats>) {
        let cfg = FileConfig::parse(text, Path::new("test"))
            .unwrap()
            .validate()
            .unwrap();
        let stats = Arc::new(Stats::default());
        (
            Server::new(Handler::new(ServerInfo::new(&cfg)), stats.clone()),
            stats,
        )
    }

    fn packet(
        kind: MessageType,
        mac: u8,
        giaddr: Ipv4Addr,
        requested: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootRequest)
            .set_xid(u32::from(mac))
            .set_giaddr(giaddr)
            .set_chaddr(&[0x52, 0x54, 0, 0, 0, mac]);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(ip) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        m.to_vec().unwrap()
    }

    /// Every refusal is counted under its own name, beside `ignored`.
    #[test]
    fn refusals_are_counted_by_reason() {
        let (mut s, stats) = server(
            "[dhcp]\nrate_limit_source = 1\nrate_burst_source = 1\nrate_limit_global = 1\nrate_burst_global = 4\n[[dhcp.subnets]]\nnetwork = \"10.78.0.0/24\"\nranges = [[\"10.78.0.50\", \"10.78.0.60\"]]\n",
        );
        let t = SystemTime::UNIX_EPOCH;
        let none = Ipv4Addr::UNSPECIFIED;
        let client: SocketAddr = (none, 68).into();
        // A stranger's decline of an address it does not hold.
        let dec = packet(
            MessageType::Decline,
            1,
            none,
            Some(Ipv4Addr::new(10, 77, 0, 100)),
        );
        assert!(matches!(
            s.on_datagram(&dec, client, Port::Dhcp, t),
            Action::Nothing
        ));
        // A relayed DISCOVER from outside every subnet, and one with a foreign giaddr.
        let giaddr = Ipv4Addr::new(10, 78, 0, 1);
        let relayed = packet(MessageType::Discover, 2, giaddr, None);
        s.on_datagram(
            &relayed,
            (Ipv4Addr::new(192, 0, 2, 9), 67).into(),
            Port::Dhcp,
            t,
        );
        let foreign = packet(MessageType::Discover, 2, Ipv4Addr::new(192, 0, 2, 1), None);
        s.on_datagram(
            &foreign,
            (Ipv4Addr::new(192, 0, 2, 1), 67).into(),
            Port::Dhcp,
            t,
        );
        // One host with an address, two MACs: the second is over the source's limit.
        let host: SocketAddr = (Ipv4Addr::new(10, 77, 0, 250), 68).into();
        for mac in [3, 4] {
            s.on_datagram(
                &packet(MessageType::Discover, mac, none, None),
                host,
                Port::Dhcp,
                t,
            );
        }
        // Global: 4 tokens, the decline and host's first discover took 2.
        for mac in 5..=8 {
            s.on_datagram(
                &packet(MessageType::Discover, mac, none, None),
                client,
                Port::Dhcp,
                t,
            );
        }
        let n = stats.snapshot();
        assert_eq!(
            (
                n.decline_refused,
                n.relay_refused,
                n.rate_limited_source,
                n.rate_limited_global,
                n.rate_limited
            ),
            (1, 2, 1, 2, 0),
            "{n:?}"
        );
        assert_eq!(n.ignored, 1 + 2 + 1 + 2);
        // The 3 others were answered: the host's first DISCOVER and two clients'.
        assert_eq!(n.received, 9);
        // A second later everyone is served again.
        let later = t + Duration::from_secs(2);
        let again = s.on_datagram(
            &packet(MessageType::Discover, 9, none, None),
            client,
            Port::Dhcp,
            later,
        );
        assert!(matches!(again, Action::Send(_)));
    }

    fn reply_to(offer: &Send, mac: u8) -> Vec<u8> {
        let offer = Message::decode(&mut Decoder::new(&offer.bytes)).unwrap();
        packet(
            MessageType::Request,
            mac,
            Ipv4Addr::UNSPECIFIED,
            Some(offer.yiaddr()),
        )
    }

    /// A received batch of REQUESTs (with a RELEASE and an INFORM among them) is one commit
    /// holding every lease change and every ACK that waits for it, in order; what waits for
    /// nothing (the INFORM's answer, the offers of the batch before) leaves at once.
    #[test]
    fn a_batch_becomes_one_commit_and_its_replies() {
        let (mut s, stats) = server("");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let client: SocketAddr = (Ipv4Addr::UNSPECIFIED, 68).into();
        let discovers: Vec<Vec<u8>> = (1..=5)
            .map(|mac| packet(MessageType::Discover, mac, Ipv4Addr::UNSPECIFIED, None))
            .collect();
        let mut first = Batch::default();
        s.on_batch(
            discovers.iter().map(|p| (p.as_slice(), client)),
            Port::Dhcp,
            t,
            &mut first,
        );
        assert!(first.take_commit().is_none(), "offers are never journaled");
        assert_eq!(first.immediate.len(), 5);

        let mut second: Vec<Vec<u8>> = (1..=5)
            .map(|mac| reply_to(&first.immediate[usize::from(mac) - 1], mac))
            .collect();
        // Client 5 gives its address straight back; a stranger asks for options only.
        let mut release = packet(MessageType::Release, 5, Ipv4Addr::UNSPECIFIED, None);
        let leased = Message::decode(&mut Decoder::new(&first.immediate[4].bytes))
            .unwrap()
            .yiaddr();
        let mut m = Message::decode(&mut Decoder::new(&release)).unwrap();
        m.set_ciaddr(leased);
        release = m.to_vec().unwrap();
        second.push(release);
        second.push(packet(MessageType::Inform, 9, Ipv4Addr::UNSPECIFIED, None));
        let mut batch = Batch::default();
        s.on_batch(
            second.iter().map(|p| (p.as_slice(), client)),
            Port::Dhcp,
            t,
            &mut batch,
        );
        let commit = batch.take_commit().unwrap();
        assert_eq!(commit.requests, 6, "five REQUESTs and the RELEASE");
        assert_eq!(commit.records.len(), 6);
        assert!(matches!(
            commit.records.last(),
            Some(super::super::journal::Record::Released { ip, .. }) if *ip == leased
        ));
        let acks: Vec<(u32, Option<MessageType>)> = commit
            .replies
            .iter()
            .map(|r| {
                let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
                (m.xid(), r.kind)
            })
            .collect();
        assert_eq!(
            acks,
            (1..=5u32)
                .map(|x| (x, Some(MessageType::Ack)))
                .collect::<Vec<_>>()
        );
        // The INFORM's ACK binds nothing: it does not wait for the journal.
        assert_eq!(batch.immediate.len(), 1);
        assert_eq!(batch.immediate[0].kind, Some(MessageType::Ack));
        assert!(batch.take_commit().is_none(), "taken once");
        let n = stats.snapshot();
        assert_eq!(
            (n.received, n.discover, n.request, n.release, n.inform),
            (12, 5, 5, 1, 1)
        );
    }
}
