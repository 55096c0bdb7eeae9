//! A DHCPv4 load client for `cargo xtask bench dhcp`: the four-message exchange perfdhcp
//! does (DISCOVER, OFFER, REQUEST, ACK as a relay: from port 67 with `giaddr` set, a new
//! client hardware address per exchange), at a fixed rate, counting what came back.
//!
//! Why our own beside perfdhcp: perfdhcp costs 85 to 130 us of CPU per exchange on this
//! machine (docs/measurements.md, "DHCP"), so on two cores shared with the server it runs
//! out of CPU near 13,000 exchanges/s, before the server does. This one patches two packet
//! templates (and reads a reply's four fields from its bytes rather than decode it whole
//! with dhcproto, as `firmware.rs` does for one machine: here it is the hot path) and
//! moves datagrams in batches with the appliance's own `recvmmsg`/`sendmmsg`
//! ([`stork::dhcp::mmsg`]): 18 us of CPU per exchange at 16,000/s and more, a fifth of
//! perfdhcp's, so the server is what a run measures (2026-12-06: Stork 24,000/s and Kea
//! 16,000/s with it, where perfdhcp stopped both near 13,000 and 8,000). The bench runs perfdhcp too and prints both.
//!
//! Sans-IO where it matters: `Exchanges` holds the protocol side (what to send, what a
//! reply means) and is tested without a socket; [`run`] only paces and moves datagrams.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stork::dhcp::datagram::Send;
use stork::dhcp::edge::{COOKIE, OPTIONS};
use stork::dhcp::mmsg::{self, BATCH, RecvBatch};
use stork::dhcp::set_buffers;

/// What a run does.
#[derive(Debug, Clone)]
pub struct Load {
    /// Where DISCOVERs and REQUESTs go (port 67).
    pub server: Ipv4Addr,
    /// This client's address: the relay's `giaddr`, bound on port 67 for the answers.
    pub relay: Ipv4Addr,
    /// Exchanges started per second.
    pub rate: u64,
    /// How long exchanges are started for.
    pub duration: Duration,
    /// How long replies still in flight are waited for after the last start.
    pub drain: Duration,
}

/// What came of a run: the counts perfdhcp reports, and the REQUEST-ACK delay.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub secs: f64,
    pub discovers: u64,
    pub offers: u64,
    pub requests: u64,
    pub acks: u64,
    pub naks: u64,
    /// Replies that matched no exchange waiting for them (a duplicate, a late one, a stray).
    pub unmatched: u64,
    /// Datagrams that are not a BOOTREPLY with a message type.
    pub malformed: u64,
    /// Datagrams the kernel refused to send (the count, not retried).
    pub send_errors: u64,
    pub ra_avg_ms: f64,
    pub ra_p99_ms: f64,
}

const OP_REPLY: u8 = 2;
const XID: std::ops::Range<usize> = 4..8;
const YIADDR: std::ops::Range<usize> = 16..20;
const GIADDR: std::ops::Range<usize> = 24..28;
const CHADDR: std::ops::Range<usize> = 28..34;
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;
/// Parameter request list: subnet mask, router, DNS, lease time (what perfdhcp asks).
const PARAMS: [u8; 6] = [55, 4, 1, 3, 6, 51];
/// In the REQUEST template: where the requested address (option 50) and the server
/// identifier (option 54) values are.
const REQ_ADDR: usize = OPTIONS + 3 + 2;
const REQ_SERVER: usize = REQ_ADDR + 4 + 2;
/// BOOTP's minimum message (RFC 951): short messages are padded to it, as clients do.
const MIN_LEN: usize = 300;

/// A BOOTREQUEST from `relay` with `options` after the cookie, padded to [`MIN_LEN`].
fn template(relay: Ipv4Addr, options: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; OPTIONS];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[3] = 1; // hops: one relay
    p[GIADDR].copy_from_slice(&relay.octets());
    p[OPTIONS - 4..OPTIONS].copy_from_slice(&COOKIE);
    p.extend_from_slice(options);
    p.push(255);
    p.resize(p.len().max(MIN_LEN), 0);
    p
}

/// A reply's fields the client acts on, read from the raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reply {
    xid: u32,
    kind: u8,
    yiaddr: [u8; 4],
    server_id: Option<[u8; 4]>,
}

impl Reply {
    /// `None` for anything but a BOOTREPLY with the cookie and a message type whose
    /// options stay inside the datagram.
    fn parse(p: &[u8]) -> Option<Self> {
        if p.len() < OPTIONS || p[0] != OP_REPLY || p[OPTIONS - 4..OPTIONS] != COOKIE {
            return None;
        }
        let word = |r: std::ops::Range<usize>| -> Option<[u8; 4]> { p.get(r)?.try_into().ok() };
        let (mut kind, mut server_id) = (None, None);
        let mut at = OPTIONS;
        while let Some(&code) = p.get(at) {
            match code {
                0 => at += 1,
                255 => break,
                _ => {
                    let len = usize::from(*p.get(at + 1)?);
                    let value = p.get(at + 2..at + 2 + len)?;
                    match (code, len) {
                        (53, 1) => kind = Some(value[0]),
                        (54, 4) => server_id = word(at + 2..at + 6),
                        _ => {}
                    }
                    at += 2 + len;
                }
            }
        }
        Some(Self {
            xid: u32::from_be_bytes(word(XID)?),
            kind: kind?,
            yiaddr: word(YIADDR)?,
            server_id,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Discovered,
    /// The REQUEST left this many microseconds into the run.
    Requested(u64),
    Done,
}

/// The protocol side of a run: exchange `i` has transaction id `base + i` and hardware
/// address `02:5a:` then `i`'s four bytes, so each is a new client.
struct Exchanges {
    discover: Vec<u8>,
    request: Vec<u8>,
    base: u32,
    stages: Vec<Stage>,
    latencies_us: Vec<u32>,
    report: Report,
}

impl Exchanges {
    fn new(relay: Ipv4Addr, base: u32, expected: usize) -> Self {
        let discover = template(relay, &[&[53, 1, DISCOVER][..], &PARAMS].concat());
        let request = template(
            relay,
            &[
                &[53, 1, REQUEST, 50, 4, 0, 0, 0, 0, 54, 4, 0, 0, 0, 0][..],
                &PARAMS,
            ]
            .concat(),
        );
        Self {
            discover,
            request,
            base,
            stages: Vec::with_capacity(expected),
            latencies_us: Vec::with_capacity(expected),
            report: Report::default(),
        }
    }

    fn stamp(&self, mut p: Vec<u8>, i: u32) -> Vec<u8> {
        p[XID].copy_from_slice(&self.base.wrapping_add(i).to_be_bytes());
        let b = i.to_be_bytes();
        p[CHADDR].copy_from_slice(&[0x02, 0x5a, b[0], b[1], b[2], b[3]]);
        p
    }

    /// The next exchange's DISCOVER.
    fn start(&mut self) -> Vec<u8> {
        let i = self.stages.len() as u32;
        self.stages.push(Stage::Discovered);
        self.stamp(self.discover.clone(), i)
    }

    /// What a received datagram means; for an OFFER to a waiting exchange, its REQUEST.
    fn receive(&mut self, datagram: &[u8], now_us: u64) -> Option<Vec<u8>> {
        let Some(r) = Reply::parse(datagram) else {
            self.report.malformed += 1;
            return None;
        };
        let i = r.xid.wrapping_sub(self.base);
        let Some(stage) = self.stages.get_mut(i as usize) else {
            self.report.unmatched += 1;
            return None;
        };
        match (r.kind, *stage) {
            (OFFER, Stage::Discovered) => {
                let Some(server) = r.server_id else {
                    self.report.malformed += 1;
                    return None;
                };
                self.report.offers += 1;
                *stage = Stage::Requested(now_us);
                let mut p = self.stamp(self.request.clone(), i);
                p[REQ_ADDR..REQ_ADDR + 4].copy_from_slice(&r.yiaddr);
                p[REQ_SERVER..REQ_SERVER + 4].copy_from_slice(&server);
                Some(p)
            }
            (ACK, Stage::Requested(at)) => {
                self.report.acks += 1;
                let us = now_us.saturating_sub(at);
                self.latencies_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
                *stage = Stage::Done;
                None
            }
            (NAK, Stage::Requested(_)) => {
                self.report.naks += 1;
                *stage = Stage::Done;
                None
            }
            _ => {
                self.report.unmatched += 1;
                None
            }
        }
    }

    fn finish(mut self, secs: f64) -> Report {
        let mut r = self.report;
        r.secs = secs;
        // Every exchange started is a DISCOVER, every OFFER taken is answered by a REQUEST.
        r.discovers = self.stages.len() as u64;
        r.requests = r.offers;
        if !self.latencies_us.is_empty() {
            let sum: u64 = self.latencies_us.iter().map(|&l| u64::from(l)).sum();
            r.ra_avg_ms = sum as f64 / self.latencies_us.len() as f64 / 1000.0;
            self.latencies_us.sort_unstable();
            let p99 = (self.latencies_us.len() * 99).div_ceil(100).max(1) - 1;
            r.ra_p99_ms = f64::from(self.latencies_us[p99]) / 1000.0;
        }
        r
    }
}

/// Runs `load` on a socket bound to `relay:67` and reports what came back.
pub fn run(load: &Load) -> io::Result<Report> {
    let sock = UdpSocket::bind(SocketAddrV4::new(load.relay, 67))?;
    sock.set_nonblocking(true)?;
    // Replies come in bursts (a server's group commit sends its ACKs together).
    set_buffers(&sock, 8 << 20);
    let to = SocketAddr::V4(SocketAddrV4::new(load.server, 67));
    let total = u128::from(load.rate) * load.duration.as_micros() / 1_000_000;
    let base = std::process::id().wrapping_mul(0x9e37_79b9);
    let mut ex = Exchanges::new(load.relay, base, usize::try_from(total).unwrap_or(0));
    let mut out: Vec<Send> = Vec::with_capacity(BATCH);
    let mut rx = RecvBatch::new(BATCH);
    let start = Instant::now();
    let end = load.duration + load.drain;
    loop {
        let now = start.elapsed();
        if now >= end {
            break;
        }
        let due = if now < load.duration {
            u128::from(load.rate) * now.as_micros() / 1_000_000
        } else {
            total
        };
        while (ex.stages.len() as u128) < due {
            out.push(Send::plain(to, ex.start()));
            if out.len() == BATCH {
                flush(&sock, &mut out, &mut ex.report)?;
            }
        }
        flush(&sock, &mut out, &mut ex.report)?;
        let mut received = 0;
        loop {
            match rx.recv(&sock) {
                Ok(0) => break,
                Ok(n) => {
                    received += n;
                    let now_us = start.elapsed().as_micros() as u64;
                    for (bytes, _) in rx.iter() {
                        if let Some(request) = ex.receive(bytes, now_us) {
                            out.push(Send::plain(to, request));
                        }
                    }
                    flush(&sock, &mut out, &mut ex.report)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if received == 0 {
            // Nothing came: sleep until a reply does or the next tick's starts are due.
            wait(&sock, libc::POLLIN, TICK)?;
        }
    }
    Ok(ex.finish(start.elapsed().as_secs_f64()))
}

/// Sends everything queued; a full send buffer is waited out, a refused datagram counted.
fn flush(sock: &UdpSocket, out: &mut Vec<Send>, report: &mut Report) -> io::Result<()> {
    while !out.is_empty() {
        match mmsg::send(sock, out) {
            Ok(n) if n > 0 => {
                out.drain(..n.min(out.len()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(sock, libc::POLLOUT, TICK)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Refused (or, never seen, none taken): the first one is counted and dropped.
            _ => {
                report.send_errors += 1;
                out.remove(0);
            }
        }
    }
    Ok(())
}

/// How long the client sleeps at most between starts: the exchanges due in a tick leave
/// together, so a tick is the largest burst a server sees (6 at 24,000/s). A server with a
/// short packet queue (Kea's recommended 28) is measured on a steady stream, not on bursts.
const TICK: Duration = Duration::from_micros(250);

fn wait(sock: &UdpSocket, events: libc::c_short, timeout: Duration) -> io::Result<()> {
    let mut fd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: one valid pollfd and a valid timeout for the duration of the call; no mask.
    let r = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dhcproto::v4::{
        Decodable, Decoder, DhcpOption, Encodable, Message, MessageType, OptionCode,
    };

    use super::*;

    const RELAY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

    fn decode(p: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(p)).unwrap()
    }

    /// What a server answers `request` with: `kind`, the address offered, its identifier.
    fn answer(request: &[u8], kind: MessageType, addr: Ipv4Addr) -> Vec<u8> {
        let req = decode(request);
        let mut m = Message::default();
        m.set_opcode(dhcproto::v4::Opcode::BootReply)
            .set_xid(req.xid())
            .set_yiaddr(addr)
            .set_giaddr(req.giaddr())
            .set_chaddr(req.chaddr());
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        m.to_vec().unwrap()
    }

    #[test]
    fn discover_and_request_are_what_a_relay_sends_for_a_new_client_each() {
        let mut ex = Exchanges::new(RELAY, 7, 4);
        let a = decode(&ex.start());
        let b = decode(&ex.start());
        assert_eq!(a.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(a.giaddr(), RELAY);
        assert_eq!((a.xid(), b.xid()), (7, 8));
        assert_eq!(a.chaddr(), [2, 0x5a, 0, 0, 0, 0]);
        assert_eq!(b.chaddr(), [2, 0x5a, 0, 0, 0, 1]);
        assert!(ex.start().len() >= MIN_LEN);

        let offer = answer(
            &ex.discover_for(1),
            MessageType::Offer,
            Ipv4Addr::new(10, 96, 1, 9),
        );
        let request = decode(&ex.receive(&offer, 100).unwrap());
        assert_eq!(request.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(request.xid(), 8);
        assert_eq!(request.chaddr(), b.chaddr());
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 96, 1, 9)))
        );
        assert_eq!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
    }

    #[test]
    fn each_reply_counts_once_and_the_delay_is_request_to_ack() {
        let mut ex = Exchanges::new(RELAY, u32::MAX, 3);
        let d: Vec<Vec<u8>> = (0..3).map(|_| ex.start()).collect();
        let addr = Ipv4Addr::new(10, 96, 1, 1);
        let offer = answer(&d[0], MessageType::Offer, addr);
        let req = ex.receive(&offer, 1_000).unwrap();
        // The same offer again (a retransmission) starts nothing.
        assert!(ex.receive(&offer, 1_100).is_none());
        let ack = answer(&req, MessageType::Ack, addr);
        assert!(ex.receive(&ack, 3_000).is_none());
        assert!(ex.receive(&ack, 3_500).is_none());
        // An ACK before any REQUEST, a NAK, garbage and a reply to nobody.
        assert!(
            ex.receive(&answer(&d[1], MessageType::Ack, addr), 4_000)
                .is_none()
        );
        let req2 = ex
            .receive(&answer(&d[2], MessageType::Offer, addr), 4_000)
            .unwrap();
        assert!(
            ex.receive(&answer(&req2, MessageType::Nak, addr), 5_000)
                .is_none()
        );
        assert!(ex.receive(&[2u8; 100], 5_000).is_none());
        let mut stray = answer(&d[0], MessageType::Offer, addr);
        stray[XID].copy_from_slice(&1234u32.to_be_bytes());
        assert!(ex.receive(&stray, 5_000).is_none());

        let r = ex.finish(1.0);
        assert_eq!(
            (r.discovers, r.offers, r.requests, r.acks, r.naks),
            (3, 2, 2, 1, 1)
        );
        assert_eq!((r.unmatched, r.malformed), (4, 1));
        assert_eq!((r.ra_avg_ms, r.ra_p99_ms), (2.0, 2.0));
    }

    #[test]
    fn a_reply_whose_options_run_past_its_end_is_malformed() {
        let mut ex = Exchanges::new(RELAY, 0, 1);
        let d = ex.start();
        let mut offer = answer(&d, MessageType::Offer, Ipv4Addr::new(10, 96, 1, 1));
        // Every length byte claims more than is left: no slice may go past the end.
        for cut in OPTIONS..offer.len() {
            let mut p = offer[..cut].to_vec();
            if let Some(len) = p.get_mut(cut.saturating_sub(1)) {
                *len = 255;
            }
            let _ = Reply::parse(&p);
        }
        offer.truncate(OPTIONS + 1);
        offer[OPTIONS] = 53;
        assert!(Reply::parse(&offer).is_none());
        assert!(ex.receive(&offer, 0).is_none());
        assert_eq!(ex.finish(0.0).malformed, 1);
    }

    #[test]
    fn p99_is_the_ninety_ninth_percentile() {
        let mut ex = Exchanges::new(RELAY, 0, 200);
        let addr = Ipv4Addr::new(10, 96, 1, 1);
        for i in 0..200u64 {
            let d = ex.start();
            let req = ex
                .receive(&answer(&d, MessageType::Offer, addr), 0)
                .unwrap();
            ex.receive(&answer(&req, MessageType::Ack, addr), (i + 1) * 1000);
        }
        let r = ex.finish(1.0);
        assert_eq!(r.acks, 200);
        assert_eq!(r.ra_p99_ms, 198.0);
        assert_eq!(r.ra_avg_ms, 100.5);
    }

    impl Exchanges {
        /// Exchange `i`'s DISCOVER again (what the server received).
        fn discover_for(&self, i: u32) -> Vec<u8> {
            self.stamp(self.discover.clone(), i)
        }
    }
}
