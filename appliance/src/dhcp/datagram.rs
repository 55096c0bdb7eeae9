//! One datagram in, what to do with it out: the edge checks, the handler, the journal
//! records and the encoded reply, sans I/O. The socket loop ([`super::run`]) and the fuzz
//! driver run exactly this, so the driver reaches every line a hostile packet can.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::SystemTime;

use dhcproto::v4::{Encodable, MessageType};

use super::edge::{self, Request};
use super::handler::{Handler, Ignored, Outcome};
use super::journal::Job;
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

pub struct Server {
    handler: Handler,
    stats: Arc<Stats>,
    records: Vec<super::journal::Record>,
}

impl Server {
    pub fn new(handler: Handler, stats: Arc<Stats>) -> Self {
        Self {
            handler,
            stats,
            records: Vec::new(),
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
        let outcome = self.handler.answer(&req, port, now);
        self.handler.take_records(&mut self.records);
        match outcome {
            Outcome::Reply(reply) => self.reply(&req, reply, peer, port),
            Outcome::Ignore(why) => {
                bump(&self.stats.ignored);
                if why == Ignored::RateLimited {
                    bump(&self.stats.rate_limited);
                }
                tracing::debug!(mac = %req.mac, xid = req.msg.xid(), reason = %why, "DHCP request ignored");
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
