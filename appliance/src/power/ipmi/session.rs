//! The RMCP+ session as a sans-IO state machine: [`Handshake`] turns the answers of a BMC
//! into the next packet to send until a [`Session`] is established, and a `Session` seals
//! requests and opens responses. Randomness (session ids, random numbers, IVs) is passed
//! in, so a test can replay a transcript byte for byte.
//!
//! Handshake: Get Channel Authentication Capabilities (IPMI 1.5 framing) -> Open Session
//! -> RAKP 1/2 -> RAKP 3/4. The caller then sends Set Session Privilege Level through the
//! session: without it ipmi_sim (and real BMCs) answer chassis commands with 0xD4.

use thiserror::Error;

use super::crypto::{self, CipherSuite, RakpTranscript, SessionKeys};
use super::wire::{
    self, IpmiRequest, IpmiResponse, OpenSessionRequest, OpenSessionResponse, Packet, PayloadType,
    Privilege, Rakp1, Rakp2, Rakp3, Rakp4, RmcpStatus, WireError,
};

/// RAKP 1 role bit 4: look the user up by name only (what ipmitool does by default); the
/// privilege in bits 3:0 is then the maximum the session may ask for.
const ROLE_NAME_ONLY_LOOKUP: u8 = 0x10;

/// The handshake step a packet is awaited for; named in timeouts and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    AuthCapabilities,
    OpenSession,
    Rakp1,
    Rakp3,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::AuthCapabilities => "Get Channel Authentication Capabilities",
            Step::OpenSession => "RMCP+ Open Session",
            Step::Rakp1 => "RAKP 1",
            Step::Rakp3 => "RAKP 3",
        }
    }
}

/// Why a handshake failed, with what the BMC answered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("user name is {0} bytes; IPMI allows at most 16")]
    UsernameTooLong(usize),
    #[error("password is {0} bytes; IPMI 2.0 allows at most 20")]
    PasswordTooLong(usize),
    #[error("malformed answer to {}: {source}", step.name())]
    Malformed {
        step: Step,
        #[source]
        source: WireError,
    },
    #[error("BMC answered {} with completion code 0x{code:02X} ({})", step.name(), wire::completion_meaning(*code, wire::netfn::APP, wire::cmd::GET_CHANNEL_AUTH_CAPABILITIES))]
    Completion { step: Step, code: u8 },
    #[error("BMC does not speak IPMI 2.0 (RMCP+) on this channel")]
    NotIpmi20,
    #[error("BMC refused cipher suite {suite}: {} answered {status}", step.name())]
    CipherSuite {
        suite: u8,
        step: Step,
        status: RmcpStatus,
    },
    #[error("BMC rejected the credentials: {detail}")]
    Credentials { detail: String },
    #[error("BMC answered {} with status {status}", step.name())]
    Rejected { step: Step, status: RmcpStatus },
    #[error("BMC chose algorithms {got:?} instead of cipher suite {suite}'s {want:?}")]
    Algorithms {
        suite: u8,
        want: wire::Algorithms,
        got: wire::Algorithms,
    },
    #[error("RAKP 4 integrity check value does not match: the session keys disagree")]
    Rakp4Mismatch,
}

/// What the handshake wants next.
#[derive(Debug)]
pub enum Next {
    /// Send this packet and wait for the answer.
    Send(Vec<u8>),
    /// The session is up.
    Established(Session),
}

#[derive(Debug)]
enum State {
    AuthCapabilities,
    OpenSession,
    Rakp1 {
        managed_sid: u32,
    },
    Rakp3 {
        managed_sid: u32,
        keys: SessionKeys,
        guid: [u8; 16],
    },
    Done,
}

/// The client side of the RMCP+ session set-up.
pub struct Handshake {
    suite: CipherSuite,
    privilege: Privilege,
    username: Vec<u8>,
    kuid: [u8; crypto::MAX_PASSWORD_LEN],
    console_sid: u32,
    console_random: [u8; 16],
    /// Message tag of the set-up payloads; one handshake, one tag (ipmitool uses 0 too).
    tag: u8,
    state: State,
    /// The last packet sent, for retransmission after a timeout.
    last: Vec<u8>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("suite", &self.suite)
            .field("privilege", &self.privilege)
            .field("step", &self.step())
            .finish_non_exhaustive()
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        for b in self.kuid.iter_mut() {
            // SAFETY: a volatile write to a valid, exclusively borrowed byte.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl Handshake {
    /// `console_sid` must not be zero (zero means "no session"); `console_random` is Rm.
    pub fn new(
        suite: CipherSuite,
        privilege: Privilege,
        username: &[u8],
        password: &[u8],
        console_sid: u32,
        console_random: [u8; 16],
    ) -> Result<Self, HandshakeError> {
        if username.len() > crypto::MAX_USERNAME_LEN {
            return Err(HandshakeError::UsernameTooLong(username.len()));
        }
        let kuid = crypto::kuid(password).ok_or(HandshakeError::PasswordTooLong(password.len()))?;
        Ok(Self {
            suite,
            privilege,
            username: username.to_vec(),
            kuid,
            console_sid: console_sid.max(1),
            console_random,
            tag: 0,
            state: State::AuthCapabilities,
            last: Vec::new(),
        })
    }

    /// The step whose answer is awaited.
    pub fn step(&self) -> Step {
        match self.state {
            State::AuthCapabilities | State::Done => Step::AuthCapabilities,
            State::OpenSession => Step::OpenSession,
            State::Rakp1 { .. } => Step::Rakp1,
            State::Rakp3 { .. } => Step::Rakp3,
        }
    }

    /// The first packet: Get Channel Authentication Capabilities.
    pub fn start(&mut self) -> Vec<u8> {
        self.state = State::AuthCapabilities;
        let req = IpmiRequest {
            netfn: wire::netfn::APP,
            cmd: wire::cmd::GET_CHANNEL_AUTH_CAPABILITIES,
            rq_seq: 0,
            data: wire::channel_auth_capabilities_request(self.privilege),
        };
        self.last = wire::emit_v15_sessionless(&req.emit());
        self.last.clone()
    }

    /// The packet to send again after a timeout.
    pub fn retransmit(&self) -> Vec<u8> {
        self.last.clone()
    }

    fn malformed(&self, source: WireError) -> HandshakeError {
        HandshakeError::Malformed {
            step: self.step(),
            source,
        }
    }

    /// Feeds one received datagram. `Ok(None)` means it was not the awaited answer (a late
    /// duplicate, another session's packet) and is ignored.
    pub fn handle(&mut self, datagram: &[u8]) -> Result<Option<Next>, HandshakeError> {
        let packet = match wire::parse_packet(datagram, 0) {
            Ok(p) => p,
            // Not for us at all (garbage, ASF): keep waiting rather than fail.
            Err(_) => return Ok(None),
        };
        match (&self.state, packet) {
            (State::AuthCapabilities, Packet::V15 { message }) => {
                self.on_auth_capabilities(message)
            }
            (State::AuthCapabilities, Packet::V20(p))
                if p.payload_type == PayloadType::Ipmi && !p.encrypted && p.session_id == 0 =>
            {
                self.on_auth_capabilities(p.payload)
            }
            (State::OpenSession, Packet::V20(p))
                if p.payload_type == PayloadType::OpenSessionResponse =>
            {
                self.on_open_session(p.payload)
            }
            (State::Rakp1 { .. }, Packet::V20(p)) if p.payload_type == PayloadType::Rakp2 => {
                self.on_rakp2(p.payload)
            }
            (State::Rakp3 { .. }, Packet::V20(p)) if p.payload_type == PayloadType::Rakp4 => {
                self.on_rakp4(p.payload)
            }
            _ => Ok(None),
        }
    }

    fn on_auth_capabilities(&mut self, message: &[u8]) -> Result<Option<Next>, HandshakeError> {
        let resp = IpmiResponse::parse(message).map_err(|e| self.malformed(e))?;
        if resp.cmd != wire::cmd::GET_CHANNEL_AUTH_CAPABILITIES {
            return Ok(None);
        }
        if resp.completion != 0 {
            return Err(HandshakeError::Completion {
                step: Step::AuthCapabilities,
                code: resp.completion,
            });
        }
        if !wire::channel_supports_ipmi20(&resp.data).map_err(|e| self.malformed(e))? {
            return Err(HandshakeError::NotIpmi20);
        }
        let req = OpenSessionRequest {
            tag: self.tag,
            max_privilege: 0,
            console_session_id: self.console_sid,
            algorithms: self.suite.algorithms(),
        };
        self.state = State::OpenSession;
        self.last = wire::emit_v20(
            PayloadType::OpenSessionRequest,
            false,
            0,
            0,
            &req.emit(),
            None,
        );
        Ok(Some(Next::Send(self.last.clone())))
    }

    fn on_open_session(&mut self, payload: &[u8]) -> Result<Option<Next>, HandshakeError> {
        let resp = OpenSessionResponse::parse(payload).map_err(|e| self.malformed(e))?;
        if resp.tag != self.tag {
            return Ok(None);
        }
        // Checked before the session id: an error answer may be too short to carry it.
        if !resp.status.is_ok() {
            return Err(self.status_error(Step::OpenSession, resp.status));
        }
        if resp.console_session_id != self.console_sid {
            return Ok(None);
        }
        let want = self.suite.algorithms();
        if resp.algorithms != want {
            return Err(HandshakeError::Algorithms {
                suite: self.suite.id(),
                want,
                got: resp.algorithms,
            });
        }
        let rakp1 = Rakp1 {
            tag: self.tag,
            managed_session_id: resp.managed_session_id,
            console_random: self.console_random,
            role: self.role(),
            username: self.username.clone(),
        };
        self.state = State::Rakp1 {
            managed_sid: resp.managed_session_id,
        };
        self.last = wire::emit_v20(PayloadType::Rakp1, false, 0, 0, &rakp1.emit(), None);
        Ok(Some(Next::Send(self.last.clone())))
    }

    fn role(&self) -> u8 {
        self.privilege.code() | ROLE_NAME_ONLY_LOOKUP
    }

    fn status_error(&self, step: Step, status: RmcpStatus) -> HandshakeError {
        if status.is_credentials() {
            HandshakeError::Credentials {
                detail: format!("{} answered {status}", step.name()),
            }
        } else if status.is_cipher_suite() {
            HandshakeError::CipherSuite {
                suite: self.suite.id(),
                step,
                status,
            }
        } else {
            HandshakeError::Rejected { step, status }
        }
    }

    fn on_rakp2(&mut self, payload: &[u8]) -> Result<Option<Next>, HandshakeError> {
        let State::Rakp1 { managed_sid } = self.state else {
            return Ok(None);
        };
        let r2 = Rakp2::parse(payload).map_err(|e| self.malformed(e))?;
        if r2.tag != self.tag || r2.console_session_id != self.console_sid {
            return Ok(None);
        }
        if !r2.status.is_ok() {
            return Err(self.status_error(Step::Rakp1, r2.status));
        }
        let t = RakpTranscript {
            console_session_id: self.console_sid,
            managed_session_id: managed_sid,
            console_random: self.console_random,
            managed_random: r2.managed_random,
            managed_guid: r2.managed_guid,
            role: self.role(),
            username: &self.username,
        };
        let want = t.rakp2_auth_code(self.suite, &self.kuid);
        if !constant_time_eq(&want, &r2.auth_code) {
            // The BMC proved knowledge of a different password for this user.
            return Err(HandshakeError::Credentials {
                detail: "the RAKP 2 key exchange auth code does not match the password \
                         (wrong password)"
                    .into(),
            });
        }
        let keys = t.session_keys(self.suite, &self.kuid);
        let rakp3 = Rakp3 {
            tag: self.tag,
            status: RmcpStatus::OK,
            managed_session_id: managed_sid,
            auth_code: t.rakp3_auth_code(self.suite, &self.kuid),
        };
        self.state = State::Rakp3 {
            managed_sid,
            keys,
            guid: r2.managed_guid,
        };
        self.last = wire::emit_v20(PayloadType::Rakp3, false, 0, 0, &rakp3.emit(), None);
        Ok(Some(Next::Send(self.last.clone())))
    }

    fn on_rakp4(&mut self, payload: &[u8]) -> Result<Option<Next>, HandshakeError> {
        let r4 = Rakp4::parse(payload).map_err(|e| self.malformed(e))?;
        if r4.tag != self.tag || r4.console_session_id != self.console_sid {
            return Ok(None);
        }
        if !r4.status.is_ok() {
            return Err(self.status_error(Step::Rakp3, r4.status));
        }
        let State::Rakp3 {
            managed_sid,
            keys,
            guid,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Ok(None);
        };
        let want = keys.rakp4_icv(&self.console_random, managed_sid, &guid);
        if !constant_time_eq(&want, &r4.integrity_check) {
            return Err(HandshakeError::Rakp4Mismatch);
        }
        Ok(Some(Next::Established(Session {
            keys,
            send_sid: managed_sid,
            recv_sid: self.console_sid,
            managed_sid,
            out_seq: 0,
            rq_seq: 0,
        })))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a session packet could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("malformed session packet: {0}")]
    Malformed(#[from] WireError),
    #[error("cannot decrypt the payload: {0}")]
    Decrypt(#[from] crypto::DecryptError),
}

/// An established session: authenticated and encrypted IPMI messages.
pub struct Session {
    keys: SessionKeys,
    /// Session id written into outbound packets (the peer's id).
    send_sid: u32,
    /// Session id inbound packets carry (our id).
    recv_sid: u32,
    /// The BMC's session id, which Close Session names.
    managed_sid: u32,
    out_seq: u32,
    rq_seq: u8,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("suite", &self.keys.suite)
            .field("managed_sid", &format_args!("0x{:08x}", self.managed_sid))
            .field("out_seq", &self.out_seq)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The BMC's side of a session, for tests that play BMC: it sends with the console's
    /// id and receives with its own.
    pub fn for_bmc(keys: SessionKeys, console_sid: u32, managed_sid: u32) -> Self {
        Self {
            keys,
            send_sid: console_sid,
            recv_sid: managed_sid,
            managed_sid,
            out_seq: 0,
            rq_seq: 0,
        }
    }

    pub fn suite(&self) -> CipherSuite {
        self.keys.suite
    }

    pub fn managed_session_id(&self) -> u32 {
        self.managed_sid
    }

    /// A new request with the next 6-bit sequence number. Retransmissions of the same
    /// request reuse it, so the BMC can recognise a duplicate.
    pub fn request(&mut self, netfn: u8, cmd: u8, data: Vec<u8>) -> IpmiRequest {
        self.rq_seq = (self.rq_seq + 1) & 0x3F;
        IpmiRequest {
            netfn,
            cmd,
            rq_seq: self.rq_seq,
            data,
        }
    }

    /// Encrypts and authenticates a payload into a packet with the next session sequence
    /// number (each transmission needs a fresh one; the BMC rejects replays).
    pub fn seal(&mut self, payload: &[u8], iv: [u8; 16]) -> Vec<u8> {
        self.out_seq = self.out_seq.wrapping_add(1).max(1);
        let encrypted = self.keys.encrypt(iv, payload);
        let keys = &self.keys;
        let mac = |covered: &[u8]| keys.integrity(covered);
        wire::emit_v20(
            PayloadType::Ipmi,
            true,
            self.send_sid,
            self.out_seq,
            &encrypted,
            Some(&mac),
        )
    }

    /// Checks, decrypts and returns the IPMI payload of a packet of this session.
    /// `Ok(None)`: not ours, or not authentic; ignored rather than trusted.
    pub fn open(&self, datagram: &[u8]) -> Result<Option<Vec<u8>>, SessionError> {
        let Ok(Packet::V20(p)) = wire::parse_packet(datagram, self.keys.suite.integrity_len())
        else {
            return Ok(None);
        };
        if p.payload_type != PayloadType::Ipmi || p.session_id != self.recv_sid {
            return Ok(None);
        }
        if !p.authenticated || !self.keys.verify_integrity(p.integrity_data, p.auth_code) {
            return Ok(None);
        }
        if p.encrypted {
            Ok(Some(self.keys.decrypt(p.payload)?))
        } else {
            Ok(Some(p.payload.to_vec()))
        }
    }

    /// Opens a packet and returns the response to `req`, or `None` if it answers
    /// something else.
    pub fn open_response(
        &self,
        datagram: &[u8],
        req: &IpmiRequest,
    ) -> Result<Option<IpmiResponse>, SessionError> {
        let Some(payload) = self.open(datagram)? else {
            return Ok(None);
        };
        let resp = IpmiResponse::parse(&payload)?;
        if resp.netfn != req.netfn + 1 || resp.cmd != req.cmd || resp.rq_seq != req.rq_seq {
            return Ok(None);
        }
        Ok(Some(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::ipmi::wire::netfn;

    /// Plays the BMC side of the handshake with the same transcript type: a self-check of
    /// the state machine (the independent check is the test against ipmi_sim and ipmitool).
    fn bmc_answers(
        suite: CipherSuite,
        password: &[u8],
        hs: &mut Handshake,
    ) -> Result<(Session, Session), HandshakeError> {
        let managed_sid = 0x5555_0001;
        let rc = [0x22; 16];
        let guid = [0x33; 16];
        let p = hs.start();
        let Packet::V15 { message } = wire::parse_packet(&p, 0).unwrap() else {
            panic!()
        };
        let req = IpmiRequest::parse(message).unwrap();
        let caps = IpmiResponse {
            netfn: req.netfn + 1,
            cmd: req.cmd,
            rq_seq: req.rq_seq,
            completion: 0,
            data: vec![0x01, 0x80 | 0x04, 0x04, 0x02, 0, 0, 0, 0],
        };
        let ans = wire::emit_v15_sessionless(&caps.emit());
        let Some(Next::Send(open)) = hs.handle(&ans)? else {
            panic!()
        };
        let Packet::V20(o) = wire::parse_packet(&open, 0).unwrap() else {
            panic!()
        };
        let osr = OpenSessionRequest::parse(o.payload).unwrap();
        let resp = OpenSessionResponse {
            tag: osr.tag,
            status: RmcpStatus::OK,
            max_privilege: 4,
            console_session_id: osr.console_session_id,
            managed_session_id: managed_sid,
            algorithms: osr.algorithms,
        };
        let ans = wire::emit_v20(
            PayloadType::OpenSessionResponse,
            false,
            0,
            0,
            &resp.emit(),
            None,
        );
        let Some(Next::Send(r1)) = hs.handle(&ans)? else {
            panic!()
        };
        let Packet::V20(r1) = wire::parse_packet(&r1, 0).unwrap() else {
            panic!()
        };
        let r1 = Rakp1::parse(r1.payload).unwrap();
        let t = RakpTranscript {
            console_session_id: osr.console_session_id,
            managed_session_id: managed_sid,
            console_random: r1.console_random,
            managed_random: rc,
            managed_guid: guid,
            role: r1.role,
            username: &r1.username,
        };
        let r2 = Rakp2 {
            tag: r1.tag,
            status: RmcpStatus::OK,
            console_session_id: osr.console_session_id,
            managed_random: rc,
            managed_guid: guid,
            auth_code: t.rakp2_auth_code(suite, password),
        };
        let ans = wire::emit_v20(PayloadType::Rakp2, false, 0, 0, &r2.emit(), None);
        let Some(Next::Send(r3)) = hs.handle(&ans)? else {
            panic!()
        };
        let Packet::V20(r3) = wire::parse_packet(&r3, 0).unwrap() else {
            panic!()
        };
        let r3 = Rakp3::parse(r3.payload).unwrap();
        assert_eq!(r3.auth_code, t.rakp3_auth_code(suite, password));
        let keys = t.session_keys(suite, password);
        let r4 = Rakp4 {
            tag: r3.tag,
            status: RmcpStatus::OK,
            console_session_id: osr.console_session_id,
            integrity_check: keys.rakp4_icv(&r1.console_random, managed_sid, &guid),
        };
        let ans = wire::emit_v20(PayloadType::Rakp4, false, 0, 0, &r4.emit(), None);
        let Some(Next::Established(client)) = hs.handle(&ans)? else {
            panic!()
        };
        Ok((
            client,
            Session::for_bmc(keys, osr.console_session_id, managed_sid),
        ))
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `ipmitool -I lanplus -C 3 -U admin -P secret chassis power status` against
    /// `ipmi_sim` 2.0.33 on the loopback, captured with a UDP relay. Console session id
    /// 0xA0A2A3A4 and Rm are ipmitool's; Rc, the GUID and managed session id 2 are
    /// ipmi_sim's. Two independent implementations computed every auth code below.
    const IPMITOOL_AUTH_CAP: &str = "0600ff07000000000000000000092018c88100388e04b5";
    const SIM_AUTH_CAP: &str = "0600ff0700000000000000000010811c6320003800019706030000000007";
    const IPMITOOL_OPEN: &str = "0600ff0706100000000000000000200000000000a4a3a2a00000000801\
        00000001000008010000000200000801000000";
    const SIM_OPEN: &str = "0600ff0706110000000000000000240000000000a4a3a2a0020000000000000801\
        00000001000008010000000200000801000000";
    const IPMITOOL_RAKP1: &str = "0600ff070612000000000000000021000000000002000000071f5355025e\
        ddf815d5346d40d00e501400000561646d696e";
    const SIM_RAKP2: &str = "0600ff07061300000000000000003c0000000000a4a3a2a0071a9989cd86bc84\
        6ff82478fe5802c5a123456789abcdefa123456789abcdef527a14864ea90b6726ce02fcd8b98f0f32273b49";
    const IPMITOOL_RAKP3: &str = "0600ff07061400000000000000001c00000000000200000055bc22a775c1bf\
        1f00ea7c5bef7d366b10c4fcff";
    const SIM_RAKP4: &str =
        "0600ff0706150000000000000000140000000000a4a3a2a06d0d5d0bd0d8aff1cf02d3e0";
    /// ipmitool's first session message (Set Session Privilege Level, Administrator) and
    /// ipmi_sim's answer.
    const IPMITOOL_FIRST: &str = "0600ff0706c002000000030000002000dbd0d928ef9cf686aadd69e28827b3\
        a2c29ec20874d970619acf9b4156ec29f9ffff0207a9d0de56e1bb74d9883457f5";
    const SIM_FIRST: &str = "0600ff0706c0a4a3a2a00100000020000a1cf2ece4200579d81c0aa43d3d53d3\
        41eb4a794aac784014de598a6138d3ceffff02078bce857d039b93438b3bb84e";

    fn golden(s: &str) -> Vec<u8> {
        hex(&s.split_whitespace().collect::<String>())
    }

    #[test]
    fn replays_the_ipmitool_ipmi_sim_suite_3_transcript_byte_for_byte() {
        let rm: [u8; 16] = hex("071f5355025eddf815d5346d40d00e50").try_into().unwrap();
        let mut hs = Handshake::new(
            CipherSuite::Suite3,
            Privilege::Administrator,
            b"admin",
            b"secret",
            0xA0A2_A3A4,
            rm,
        )
        .unwrap();
        assert_eq!(hs.start(), golden(IPMITOOL_AUTH_CAP));
        let Some(Next::Send(open)) = hs.handle(&golden(SIM_AUTH_CAP)).unwrap() else {
            panic!("no Open Session")
        };
        assert_eq!(open, golden(IPMITOOL_OPEN));
        // A late duplicate of the previous answer, and garbage, are ignored.
        assert!(hs.handle(&golden(SIM_AUTH_CAP)).unwrap().is_none());
        assert!(hs.handle(&[0x06, 0x00, 0xFF]).unwrap().is_none());
        assert_eq!(hs.retransmit(), golden(IPMITOOL_OPEN));
        let Some(Next::Send(rakp1)) = hs.handle(&golden(SIM_OPEN)).unwrap() else {
            panic!("no RAKP 1")
        };
        assert_eq!(rakp1, golden(IPMITOOL_RAKP1));
        // ipmi_sim's RAKP 2 auth code verifies, and our RAKP 3 is ipmitool's.
        let Some(Next::Send(rakp3)) = hs.handle(&golden(SIM_RAKP2)).unwrap() else {
            panic!("no RAKP 3")
        };
        assert_eq!(rakp3, golden(IPMITOOL_RAKP3));
        // ipmi_sim's RAKP 4 integrity check value verifies with our SIK.
        let Some(Next::Established(client)) = hs.handle(&golden(SIM_RAKP4)).unwrap() else {
            panic!("no session")
        };
        assert_eq!(client.managed_session_id(), 2);

        // The BMC's view of the same keys opens ipmitool's encrypted request...
        let t = RakpTranscript {
            console_session_id: 0xA0A2_A3A4,
            managed_session_id: 2,
            console_random: rm,
            managed_random: hex("071a9989cd86bc846ff82478fe5802c5").try_into().unwrap(),
            managed_guid: hex("a123456789abcdefa123456789abcdef").try_into().unwrap(),
            role: 0x14,
            username: b"admin",
        };
        let bmc = Session::for_bmc(
            t.session_keys(CipherSuite::Suite3, b"secret"),
            0xA0A2_A3A4,
            2,
        );
        let req = IpmiRequest::parse(&bmc.open(&golden(IPMITOOL_FIRST)).unwrap().unwrap()).unwrap();
        assert_eq!(
            (req.netfn, req.cmd, req.data.as_slice()),
            (
                netfn::APP,
                wire::cmd::SET_SESSION_PRIVILEGE_LEVEL,
                &[0x04][..]
            )
        );
        // ...and the client opens ipmi_sim's encrypted answer: privilege 4 granted.
        let resp = client
            .open_response(&golden(SIM_FIRST), &req)
            .unwrap()
            .unwrap();
        assert_eq!((resp.completion, resp.data.as_slice()), (0, &[0x04][..]));
    }

    /// `ipmitool -I lanplus -C 17 -L ADMINISTRATOR -U admin -P seventeen-pw chassis power
    /// status` against the suite-17 test BMC of `tests/power_ipmi.rs`. The BMC side is
    /// ours; what ipmitool sent (RAKP 3, the sealed request) is OpenSSL's SHA-256 and AES.
    const T17_OPEN: &str = "0600ff0706100000000000000000200000000000a4a3a2a00000000803\
        00000001000008040000000200000801000000";
    const T17_OPEN_ANSWER: &str = "0600ff0706110000000000000000240000000400a4a3a2a001000010\
        000000080300000001000008040000000200000801000000";
    const T17_RAKP1: &str = "0600ff070612000000000000000021000000000001000010a5d8086664d061d5\
        7d7fd8bd2eacaa631400000561646d696e";
    const T17_RAKP2: &str = "0600ff0706130000000000000000480000000000a4a3a2a095927a5bfafebc46\
        fc602e33a1f30e2c73746f726b2d746573742d626d632121dbd0c7c5683a19785d2894ec49e136044c\
        2eead2b7cf0fd201b2bf84ee0e5828";
    const T17_IPMITOOL_RAKP3: &str = "0600ff0706140000000000000000280000000000010000109a3bca\
        afce764c1022918b25df64ddc41080e215a0079ddeb13bed7287a5ef31";
    const T17_RAKP4: &str =
        "0600ff0706150000000000000000180000000000a4a3a2a06cbc2b6e9b424912da5889f15f21ca9e";
    const T17_IPMITOOL_FIRST: &str = "0600ff0706c0010000100300000020008026b6bbd817e71024a09a\
        01e37be9daf1fcf33a9a50256c82785d7cde3110d6ffff0207dbbff5c9833d0c6e647c4728f450b842";

    #[test]
    fn suite_17_agrees_with_ipmitool() {
        let rm: [u8; 16] = hex("a5d8086664d061d57d7fd8bd2eacaa63").try_into().unwrap();
        let mut hs = Handshake::new(
            CipherSuite::Suite17,
            Privilege::Administrator,
            b"admin",
            b"seventeen-pw",
            0xA0A2_A3A4,
            rm,
        )
        .unwrap();
        hs.start();
        let caps = IpmiResponse {
            netfn: netfn::APP + 1,
            cmd: wire::cmd::GET_CHANNEL_AUTH_CAPABILITIES,
            rq_seq: 0,
            completion: 0,
            data: vec![0x01, 0x80, 0x04, 0x02, 0, 0, 0, 0],
        };
        let Some(Next::Send(open)) = hs
            .handle(&wire::emit_v15_sessionless(&caps.emit()))
            .unwrap()
        else {
            panic!("no Open Session")
        };
        assert_eq!(open, golden(T17_OPEN));
        let Some(Next::Send(rakp1)) = hs.handle(&golden(T17_OPEN_ANSWER)).unwrap() else {
            panic!("no RAKP 1")
        };
        assert_eq!(rakp1, golden(T17_RAKP1));
        let Some(Next::Send(rakp3)) = hs.handle(&golden(T17_RAKP2)).unwrap() else {
            panic!("no RAKP 3")
        };
        // Our HMAC-SHA256 RAKP 3 is byte for byte what ipmitool computed.
        assert_eq!(rakp3, golden(T17_IPMITOOL_RAKP3));
        let Some(Next::Established(_)) = hs.handle(&golden(T17_RAKP4)).unwrap() else {
            panic!("no session")
        };
        // Keys derived here open ipmitool's HMAC-SHA256-128 + AES-CBC-128 request.
        let t = RakpTranscript {
            console_session_id: 0xA0A2_A3A4,
            managed_session_id: 0x1000_0001,
            console_random: rm,
            managed_random: hex("95927a5bfafebc46fc602e33a1f30e2c").try_into().unwrap(),
            managed_guid: *b"stork-test-bmc!!",
            role: 0x14,
            username: b"admin",
        };
        let bmc = Session::for_bmc(
            t.session_keys(CipherSuite::Suite17, b"seventeen-pw"),
            0xA0A2_A3A4,
            0x1000_0001,
        );
        let req =
            IpmiRequest::parse(&bmc.open(&golden(T17_IPMITOOL_FIRST)).unwrap().unwrap()).unwrap();
        assert_eq!(
            (req.netfn, req.cmd, req.data.as_slice()),
            (
                netfn::APP,
                wire::cmd::SET_SESSION_PRIVILEGE_LEVEL,
                &[0x04][..]
            )
        );
    }

    #[test]
    fn handshake_and_a_command_for_both_suites() {
        for suite in [CipherSuite::Suite3, CipherSuite::Suite17] {
            let mut hs = Handshake::new(
                suite,
                Privilege::Operator,
                b"admin",
                b"secret",
                0xC0C0_0001,
                [0x11; 16],
            )
            .unwrap();
            let (mut client, mut bmc) = bmc_answers(suite, b"secret", &mut hs).unwrap();
            let req = client.request(netfn::CHASSIS, wire::cmd::GET_CHASSIS_STATUS, vec![]);
            let pkt = client.seal(&req.emit(), [0x44; 16]);
            let got = IpmiRequest::parse(&bmc.open(&pkt).unwrap().unwrap()).unwrap();
            assert_eq!(got, req);
            let resp = IpmiResponse {
                netfn: got.netfn + 1,
                cmd: got.cmd,
                rq_seq: got.rq_seq,
                completion: 0,
                data: vec![1, 0, 0, 0],
            };
            let back = bmc.seal(&resp.emit(), [0x55; 16]);
            assert_eq!(client.open_response(&back, &req).unwrap(), Some(resp));
            // A flipped bit fails integrity and is ignored.
            let mut bad = back.clone();
            let n = bad.len();
            bad[n - 1] ^= 1;
            assert_eq!(client.open_response(&bad, &req).unwrap(), None);
        }
    }

    #[test]
    fn wrong_password_is_a_credentials_error() {
        let mut hs = Handshake::new(
            CipherSuite::Suite3,
            Privilege::Operator,
            b"admin",
            b"wrong",
            7,
            [0x11; 16],
        )
        .unwrap();
        let err = bmc_answers(CipherSuite::Suite3, b"secret", &mut hs).unwrap_err();
        assert!(matches!(err, HandshakeError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("wrong password"), "{err}");
    }

    #[test]
    fn open_session_refusal_names_the_suite() {
        let mut hs = Handshake::new(
            CipherSuite::Suite17,
            Privilege::Operator,
            b"admin",
            b"pw",
            7,
            [0; 16],
        )
        .unwrap();
        hs.start();
        let caps = IpmiResponse {
            netfn: netfn::APP + 1,
            cmd: wire::cmd::GET_CHANNEL_AUTH_CAPABILITIES,
            rq_seq: 0,
            completion: 0,
            data: vec![0x01, 0x84, 0x04, 0x02, 0, 0, 0, 0],
        };
        hs.handle(&wire::emit_v15_sessionless(&caps.emit()))
            .unwrap()
            .unwrap();
        // ipmi_sim 2.0.33 answers a suite 17 proposal like this: tag and status 0x04.
        let refusal = [0, 0x04];
        let ans = wire::emit_v20(
            PayloadType::OpenSessionResponse,
            false,
            0,
            0,
            &refusal,
            None,
        );
        let err = hs.handle(&ans).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BMC refused cipher suite 17: RMCP+ Open Session answered 0x04 invalid \
             authentication algorithm"
        );
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(
            Handshake::new(
                CipherSuite::Suite3,
                Privilege::Operator,
                &[b'u'; 17],
                b"",
                1,
                [0; 16]
            )
            .unwrap_err(),
            HandshakeError::UsernameTooLong(17)
        );
        assert_eq!(
            Handshake::new(
                CipherSuite::Suite3,
                Privilege::Operator,
                b"u",
                &[b'p'; 21],
                1,
                [0; 16]
            )
            .unwrap_err(),
            HandshakeError::PasswordTooLong(21)
        );
    }
}
