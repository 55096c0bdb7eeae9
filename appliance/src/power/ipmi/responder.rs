//! The BMC's side of IPMI 2.0 over LAN, sans-IO: a datagram in, the answer out. It speaks
//! exactly what Stork's driver asks (Get Channel Authentication Capabilities, the RMCP+
//! handshake with cipher suite 3 or 17, Set Session Privilege Level, chassis status and
//! control, the boot flags, Close Session) with the same `wire` and `crypto` code the
//! driver uses, so a simulated BMC (`stork-sim`) checks the driver's every byte.
//!
//! One user, no BMC key (Kg = Kuid). What it cannot use it drops and counts.

use std::collections::BTreeMap;

use super::crypto::{self, CipherSuite, MAX_PASSWORD_LEN, RakpTranscript};
use super::session::{HandshakeError, Session};
use super::wire::{
    self, BootFlags, ChassisControl, ChassisStatus, IpmiRequest, IpmiResponse, OpenSessionRequest,
    OpenSessionResponse, Packet, PayloadType, Rakp1, Rakp2, Rakp3, Rakp4, RmcpStatus, cmd, netfn,
};

/// Sessions (set up or being set up) one BMC keeps; the oldest goes first. Real BMCs keep
/// 4 to 16; the driver opens one per operation and closes it.
const MAX_SESSIONS: usize = 16;

/// Privilege levels (table 6-2).
const USER: u8 = 2;
const OPERATOR: u8 = 3;
const ADMINISTRATOR: u8 = 4;

/// Completion codes (table 5-2) a BMC answers with.
mod completion {
    pub const OK: u8 = 0x00;
    pub const PARAMETER_NOT_SUPPORTED: u8 = 0x80;
    pub const LEVEL_NOT_AVAILABLE: u8 = 0x81;
    pub const INVALID_COMMAND: u8 = 0xC1;
    pub const LENGTH_INVALID: u8 = 0xC7;
    pub const INVALID_DATA: u8 = 0xCC;
    pub const INSUFFICIENT_PRIVILEGE: u8 = 0xD4;
    pub const NOT_IN_PRESENT_STATE: u8 = 0xD5;
}

/// What the BMC controls.
pub trait Chassis {
    fn status(&self) -> ChassisStatus;
    /// Carries out a Chassis Control; `false`: not in the present state (answered 0xD5).
    fn control(&mut self, control: ChassisControl) -> bool;
    fn boot_flags(&self) -> BootFlags;
    fn set_boot_flags(&mut self, flags: BootFlags);
}

/// A chassis held in memory (tests, fuzzing): power, the boot flags, and every control
/// asked of it. As many BMCs do, it refuses a cycle or reset while off.
#[derive(Debug, Default)]
pub struct MemoryChassis {
    pub on: bool,
    pub flags: Option<BootFlags>,
    pub controls: Vec<ChassisControl>,
}

impl Chassis for MemoryChassis {
    fn status(&self) -> ChassisStatus {
        ChassisStatus {
            power_on: self.on,
            power_fault: false,
            power_control_fault: false,
        }
    }

    fn control(&mut self, c: ChassisControl) -> bool {
        match c {
            ChassisControl::PowerUp => self.on = true,
            ChassisControl::PowerDown | ChassisControl::SoftShutdown => self.on = false,
            ChassisControl::PowerCycle | ChassisControl::HardReset if !self.on => return false,
            ChassisControl::PowerCycle | ChassisControl::HardReset => {}
        }
        self.controls.push(c);
        true
    }

    fn boot_flags(&self) -> BootFlags {
        self.flags.unwrap_or(BootFlags::NONE)
    }

    fn set_boot_flags(&mut self, flags: BootFlags) {
        self.flags = Some(flags);
    }
}

struct Pending {
    console_sid: u32,
    suite: CipherSuite,
    /// After RAKP 1: Rm, Rc and the role byte, which RAKP 3 and the keys are computed over.
    rakp: Option<([u8; 16], [u8; 16], u8)>,
}

struct Active {
    session: Session,
    /// The role RAKP 1 asked for: the most Set Session Privilege Level may grant.
    max: u8,
    current: u8,
}

/// What a responder dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Not an RMCP IPMI packet, or a payload that does not parse.
    pub malformed: u64,
    /// A session or set-up step it does not know (closed, evicted, never opened).
    pub unknown_session: u64,
    /// A session packet whose AuthCode does not check out.
    pub unauthentic: u64,
}

/// One BMC's IPMI LAN channel.
pub struct Responder {
    username: Vec<u8>,
    kuid: [u8; MAX_PASSWORD_LEN],
    guid: [u8; 16],
    next_sid: u32,
    pending: BTreeMap<u32, Pending>,
    sessions: BTreeMap<u32, Active>,
    pub dropped: Dropped,
    /// Sessions fully set up, since the start.
    pub established: u64,
}

impl Responder {
    pub fn new(username: &[u8], password: &[u8], guid: [u8; 16]) -> Result<Self, HandshakeError> {
        if username.len() > crypto::MAX_USERNAME_LEN {
            return Err(HandshakeError::UsernameTooLong(username.len()));
        }
        let kuid = crypto::kuid(password).ok_or(HandshakeError::PasswordTooLong(password.len()))?;
        Ok(Self {
            username: username.to_vec(),
            kuid,
            guid,
            next_sid: rand::random::<u32>() | 1,
            pending: BTreeMap::new(),
            sessions: BTreeMap::new(),
            dropped: Dropped::default(),
            established: 0,
        })
    }

    /// Sessions set up and not closed.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Answers one datagram; `None`: nothing to answer (dropped, and counted).
    pub fn handle(&mut self, datagram: &[u8], chassis: &mut dyn Chassis) -> Option<Vec<u8>> {
        let result = if let Some(sid) = wire::v20_session_id(datagram).filter(|s| *s != 0) {
            self.in_session(sid, datagram, chassis)
        } else {
            self.setup(datagram)
        };
        self.count(result)
    }

    /// Before a session: capabilities and the RMCP+ handshake.
    fn setup(&mut self, datagram: &[u8]) -> Result<Vec<u8>, Discard> {
        match wire::parse_packet(datagram, 0) {
            Ok(Packet::V15 { message }) => self.sessionless(message),
            Ok(Packet::V20(p)) if !p.authenticated && !p.encrypted => match p.payload_type {
                PayloadType::OpenSessionRequest => self.open_session(p.payload),
                PayloadType::Rakp1 => self.rakp1(p.payload),
                PayloadType::Rakp3 => self.rakp3(p.payload),
                _ => Err(Discard::Malformed),
            },
            _ => Err(Discard::Malformed),
        }
    }

    fn count(&mut self, result: Result<Vec<u8>, Discard>) -> Option<Vec<u8>> {
        match result {
            Ok(a) => return Some(a),
            Err(Discard::Malformed) => self.dropped.malformed += 1,
            Err(Discard::UnknownSession) => self.dropped.unknown_session += 1,
            Err(Discard::Unauthentic) => self.dropped.unauthentic += 1,
        }
        None
    }

    /// Before a session: only Get Channel Authentication Capabilities.
    fn sessionless(&mut self, message: &[u8]) -> Result<Vec<u8>, Discard> {
        let req = IpmiRequest::parse(message).map_err(|_| Discard::Malformed)?;
        if (req.netfn, req.cmd) != (netfn::APP, cmd::GET_CHANNEL_AUTH_CAPABILITIES) {
            return Err(Discard::Malformed);
        }
        let resp = answer(
            &req,
            completion::OK,
            wire::channel_auth_capabilities_response(),
        );
        Ok(wire::emit_v15_sessionless(&resp.emit()))
    }

    fn open_session(&mut self, payload: &[u8]) -> Result<Vec<u8>, Discard> {
        let req = OpenSessionRequest::parse(payload).map_err(|_| Discard::Malformed)?;
        let suite = [CipherSuite::Suite3, CipherSuite::Suite17]
            .into_iter()
            .find(|s| s.algorithms() == req.algorithms);
        let mut resp = OpenSessionResponse {
            tag: req.tag,
            status: RmcpStatus::NO_CIPHER_SUITE_MATCH,
            max_privilege: req.max_privilege,
            console_session_id: req.console_session_id,
            managed_session_id: 0,
            algorithms: req.algorithms,
        };
        if let Some(suite) = suite {
            let sid = self.new_session_id();
            self.pending.insert(
                sid,
                Pending {
                    console_sid: req.console_session_id,
                    suite,
                    rakp: None,
                },
            );
            resp.status = RmcpStatus::OK;
            resp.managed_session_id = sid;
        }
        Ok(setup_packet(PayloadType::OpenSessionResponse, &resp.emit()))
    }

    fn new_session_id(&mut self) -> u32 {
        while self.pending.len() + self.sessions.len() >= MAX_SESSIONS {
            // The oldest goes: ids grow (they wrap only after 2^32 sessions, which a
            // simulated BMC does not reach).
            let oldest = self
                .pending
                .keys()
                .chain(self.sessions.keys())
                .min()
                .copied();
            let Some(sid) = oldest else { break };
            if self.pending.remove(&sid).is_none() {
                self.sessions.remove(&sid);
            }
        }
        let sid = self.next_sid;
        self.next_sid = self.next_sid.wrapping_add(1).max(1);
        sid
    }

    fn rakp1(&mut self, payload: &[u8]) -> Result<Vec<u8>, Discard> {
        let r1 = Rakp1::parse(payload).map_err(|_| Discard::Malformed)?;
        let sid = r1.managed_session_id;
        let p = self.pending.get_mut(&sid).ok_or(Discard::UnknownSession)?;
        let mut r2 = Rakp2 {
            tag: r1.tag,
            status: RmcpStatus::OK,
            console_session_id: p.console_sid,
            managed_random: rand::random(),
            managed_guid: self.guid,
            auth_code: Vec::new(),
        };
        let level = r1.role & 0x0F;
        if r1.username != self.username {
            r2.status = RmcpStatus::UNAUTHORIZED_NAME;
        } else if !(USER..=ADMINISTRATOR).contains(&level) {
            r2.status = RmcpStatus::UNAUTHORIZED_ROLE;
        }
        if r2.status.is_ok() {
            let t = RakpTranscript {
                console_session_id: p.console_sid,
                managed_session_id: sid,
                console_random: r1.console_random,
                managed_random: r2.managed_random,
                managed_guid: self.guid,
                role: r1.role,
                username: &r1.username,
            };
            r2.auth_code = t.rakp2_auth_code(p.suite, &self.kuid);
            p.rakp = Some((r1.console_random, r2.managed_random, r1.role));
        } else {
            self.pending.remove(&sid);
        }
        Ok(setup_packet(PayloadType::Rakp2, &r2.emit()))
    }

    fn rakp3(&mut self, payload: &[u8]) -> Result<Vec<u8>, Discard> {
        let r3 = Rakp3::parse(payload).map_err(|_| Discard::Malformed)?;
        let sid = r3.managed_session_id;
        let Some(Pending {
            console_sid,
            suite,
            rakp: Some((rm, rc, role)),
        }) = self.pending.remove(&sid)
        else {
            return Err(Discard::UnknownSession);
        };
        let t = RakpTranscript {
            console_session_id: console_sid,
            managed_session_id: sid,
            console_random: rm,
            managed_random: rc,
            managed_guid: self.guid,
            role,
            username: &self.username,
        };
        let mut r4 = Rakp4 {
            tag: r3.tag,
            status: RmcpStatus::INVALID_INTEGRITY_CHECK_VALUE,
            console_session_id: console_sid,
            integrity_check: Vec::new(),
        };
        let want = t.rakp3_auth_code(suite, &self.kuid);
        if r3.status.is_ok() && want == r3.auth_code {
            let keys = t.session_keys(suite, &self.kuid);
            r4.status = RmcpStatus::OK;
            r4.integrity_check = keys.rakp4_icv(&rm, sid, &self.guid);
            self.sessions.insert(
                sid,
                Active {
                    session: Session::for_bmc(keys, console_sid, sid),
                    max: role & 0x0F,
                    current: USER,
                },
            );
            self.established += 1;
        }
        Ok(setup_packet(PayloadType::Rakp4, &r4.emit()))
    }

    fn in_session(
        &mut self,
        sid: u32,
        datagram: &[u8],
        chassis: &mut dyn Chassis,
    ) -> Result<Vec<u8>, Discard> {
        let active = self.sessions.get_mut(&sid).ok_or(Discard::UnknownSession)?;
        let payload = match active.session.open(datagram) {
            Ok(Some(p)) => p,
            Ok(None) => return Err(Discard::Unauthentic),
            Err(_) => return Err(Discard::Malformed),
        };
        let req = IpmiRequest::parse(&payload).map_err(|_| Discard::Malformed)?;
        let (code, data) = command(&req, active, chassis);
        let sealed = active
            .session
            .seal(&answer(&req, code, data).emit(), rand::random());
        if (req.netfn, req.cmd) == (netfn::APP, cmd::CLOSE_SESSION) && code == completion::OK {
            self.sessions.remove(&sid);
        }
        Ok(sealed)
    }
}

enum Discard {
    Malformed,
    UnknownSession,
    Unauthentic,
}

fn setup_packet(kind: PayloadType, payload: &[u8]) -> Vec<u8> {
    wire::emit_v20(kind, false, 0, 0, payload, None)
}

fn answer(req: &IpmiRequest, completion: u8, data: Vec<u8>) -> IpmiResponse {
    IpmiResponse {
        netfn: req.netfn + 1,
        cmd: req.cmd,
        rq_seq: req.rq_seq,
        completion,
        data,
    }
}

/// One command in a session: the completion code and the response data.
fn command(req: &IpmiRequest, active: &mut Active, chassis: &mut dyn Chassis) -> (u8, Vec<u8>) {
    let operator = active.current >= OPERATOR;
    match (req.netfn, req.cmd) {
        (netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL) => match req.data.first() {
            None => (completion::LENGTH_INVALID, vec![]),
            Some(0) => (completion::OK, vec![active.current]),
            Some(l) if (USER..=active.max).contains(&(l & 0x0F)) => {
                active.current = l & 0x0F;
                (completion::OK, vec![active.current])
            }
            Some(_) => (completion::LEVEL_NOT_AVAILABLE, vec![]),
        },
        (netfn::APP, cmd::CLOSE_SESSION) => (completion::OK, vec![]),
        (netfn::CHASSIS, cmd::GET_CHASSIS_STATUS) => {
            (completion::OK, chassis.status().emit().to_vec())
        }
        (netfn::CHASSIS, cmd::CHASSIS_CONTROL | cmd::SET_SYSTEM_BOOT_OPTIONS) if !operator => {
            (completion::INSUFFICIENT_PRIVILEGE, vec![])
        }
        (netfn::CHASSIS, cmd::CHASSIS_CONTROL) => {
            match req.data.first().and_then(|c| ChassisControl::from_code(*c)) {
                None => (completion::INVALID_DATA, vec![]),
                Some(c) if chassis.control(c) => (completion::OK, vec![]),
                Some(_) => (completion::NOT_IN_PRESENT_STATE, vec![]),
            }
        }
        (netfn::CHASSIS, cmd::SET_SYSTEM_BOOT_OPTIONS) => {
            match BootFlags::parse_set_request(&req.data) {
                Ok(Some(flags)) => {
                    chassis.set_boot_flags(flags);
                    (completion::OK, vec![])
                }
                // Other parameters (set in progress, boot info acknowledge): accepted.
                Ok(None) => (completion::OK, vec![]),
                Err(_) => (completion::LENGTH_INVALID, vec![]),
            }
        }
        (netfn::CHASSIS, cmd::GET_SYSTEM_BOOT_OPTIONS) => match req.data.first() {
            Some(p) if p & 0x7F == wire::BOOT_PARAM_FLAGS => {
                (completion::OK, chassis.boot_flags().get_response_data())
            }
            Some(_) => (completion::PARAMETER_NOT_SUPPORTED, vec![]),
            None => (completion::LENGTH_INVALID, vec![]),
        },
        _ => (completion::INVALID_COMMAND, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::power::BootDevice;
    use crate::power::ipmi::{IpmiCipherSuite, IpmiDriver, IpmiParams};

    /// A responder on a loopback UDP socket, answering until the test ends.
    async fn serve(
        user: &str,
        password: &str,
    ) -> (u16, Arc<Mutex<MemoryChassis>>, Arc<Mutex<Responder>>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sock.local_addr().unwrap().port();
        let chassis = Arc::new(Mutex::new(MemoryChassis::default()));
        let responder = Arc::new(Mutex::new(
            Responder::new(user.as_bytes(), password.as_bytes(), [7; 16]).unwrap(),
        ));
        let (c, r) = (chassis.clone(), responder.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let out = {
                    let mut chassis = c.lock().unwrap();
                    r.lock().unwrap().handle(&buf[..n], &mut *chassis)
                };
                if let Some(out) = out {
                    let _ = sock.send_to(&out, from).await;
                }
            }
        });
        (port, chassis, responder)
    }

    fn driver(port: u16, user: &str, password: &str, suite: IpmiCipherSuite) -> IpmiDriver {
        let mut p = IpmiParams::new("127.0.0.1", user, password.to_string());
        p.port = port;
        p.cipher_suite = suite;
        p.timeout_ms = 500;
        IpmiDriver::new(p)
    }

    /// Stork's own driver, over real UDP, against the responder: both suites, every
    /// operation the lifecycle uses; each closes its session.
    #[tokio::test]
    async fn the_driver_powers_and_sets_boot_through_the_responder() {
        let (port, chassis, responder) = serve("admin", "secret").await;
        for suite in [IpmiCipherSuite::Suite3, IpmiCipherSuite::Suite17] {
            let d = driver(port, "admin", "secret", suite);
            d.power_on().await.unwrap();
            assert_eq!(d.query().await.unwrap(), crate::power::PowerState::On);
            d.set_boot_device(BootDevice::Pxe, false, true)
                .await
                .unwrap();
            assert_eq!(
                chassis.lock().unwrap().flags,
                Some(BootFlags {
                    valid: true,
                    persistent: false,
                    efi: true,
                    device: wire::BOOT_DEVICE_PXE,
                })
            );
            d.power_cycle().await.unwrap();
            d.power_off(false).await.unwrap();
            assert_eq!(d.query().await.unwrap(), crate::power::PowerState::Off);
        }
        let c = chassis.lock().unwrap();
        assert_eq!(
            c.controls,
            [
                ChassisControl::PowerUp,
                ChassisControl::PowerCycle,
                ChassisControl::PowerDown
            ]
            .repeat(2)
        );
        let r = responder.lock().unwrap();
        assert_eq!(r.open_sessions(), 0, "every session was closed");
        assert_eq!(r.established, 12);
        assert_eq!(r.dropped, Dropped::default());
    }

    #[tokio::test]
    async fn a_wrong_password_or_user_is_refused_as_credentials() {
        let (port, chassis, _) = serve("admin", "secret").await;
        for (user, password) in [("admin", "wrong"), ("root", "secret")] {
            let err = driver(port, user, password, IpmiCipherSuite::Suite3)
                .power_on()
                .await
                .unwrap_err();
            assert!(err.is_credentials(), "{user}/{password}: {err}");
        }
        assert!(chassis.lock().unwrap().controls.is_empty());
    }

    /// Garbage, truncations and replays of a real conversation are dropped and counted;
    /// none is answered as if it were good, and the responder goes on answering.
    #[test]
    fn bad_datagrams_are_dropped_and_counted() {
        let mut r = Responder::new(b"admin", b"secret", [7; 16]).unwrap();
        let mut chassis = MemoryChassis::default();
        let mut hs = super::super::session::Handshake::new(
            CipherSuite::Suite3,
            wire::Privilege::Operator,
            b"admin",
            b"secret",
            0x1234,
            [9; 16],
        )
        .unwrap();
        let first = hs.start();
        for bad in [
            &[][..],
            &[0x06, 0, 0xFF],
            &first[..first.len() - 3],
            &[0xAA; 64],
        ] {
            assert_eq!(r.handle(bad, &mut chassis), None);
        }
        assert_eq!(r.dropped.malformed, 4);
        // An authenticated packet for a session that does not exist.
        let mut forged = first.clone();
        forged[4] = wire::AUTH_TYPE_RMCP_PLUS;
        forged[6..10].copy_from_slice(&99u32.to_le_bytes());
        assert_eq!(r.handle(&forged, &mut chassis), None);
        assert_eq!(r.dropped.unknown_session, 1);
        // The real handshake still works afterwards.
        let mut next = r.handle(&first, &mut chassis).unwrap();
        let session = loop {
            match hs.handle(&next).unwrap() {
                Some(super::super::session::Next::Send(p)) => {
                    next = r.handle(&p, &mut chassis).unwrap()
                }
                Some(super::super::session::Next::Established(s)) => break s,
                None => panic!("the handshake stalled"),
            }
        };
        assert_eq!(r.open_sessions(), 1);
        // A session packet with one bit flipped fails its AuthCode.
        let mut s = session;
        let req = s.request(netfn::CHASSIS, cmd::GET_CHASSIS_STATUS, vec![]);
        let mut sealed = s.seal(&req.emit(), [1; 16]);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(r.handle(&sealed, &mut chassis), None);
        assert_eq!(r.dropped.unauthentic, 1);
    }
}
