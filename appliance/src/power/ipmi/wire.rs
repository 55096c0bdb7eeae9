//! IPMI 2.0 LAN packet formats: RMCP, the IPMI 1.5 and 2.0 (RMCP+) session headers, IPMI
//! LAN messages, and the RMCP+ session set-up payloads (Open Session, RAKP 1-4).
//!
//! No I/O and no crypto here (that is `crypto.rs`): encoders return bytes, parsers take a
//! slice and return a typed value or a [`WireError`]. Every parser checks lengths before
//! it indexes, so nothing here panics on input from the network.
//!
//! Section and table numbers refer to the IPMI v2.0 rev. 1.1 specification.

use thiserror::Error;

/// RMCP header (section 13.1.3): version 1.0, reserved, sequence 0xFF ("no RMCP ACK"),
/// class IPMI.
pub const RMCP_HEADER: [u8; 4] = [0x06, 0x00, 0xFF, 0x07];
pub const RMCP_HEADER_LEN: usize = 4;

/// Authentication type byte (table 13-8): none for pre-session IPMI 1.5 messages, RMCP+
/// for every IPMI 2.0 packet.
pub const AUTH_TYPE_NONE: u8 = 0x00;
pub const AUTH_TYPE_RMCP_PLUS: u8 = 0x06;

/// The "next header" byte of the session trailer (table 13-8): always 0x07 (RMCP).
pub const NEXT_HEADER_RMCP: u8 = 0x07;

/// Software ID of the remote console (section 5.5: 0x81 is the first remote-console SWID)
/// and the BMC's responder address.
pub const REMOTE_CONSOLE_ADDR: u8 = 0x81;
pub const BMC_ADDR: u8 = 0x20;

/// Payload types (table 13-16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadType {
    Ipmi,
    OpenSessionRequest,
    OpenSessionResponse,
    Rakp1,
    Rakp2,
    Rakp3,
    Rakp4,
    Unknown(u8),
}

impl PayloadType {
    pub fn code(self) -> u8 {
        match self {
            PayloadType::Ipmi => 0x00,
            PayloadType::OpenSessionRequest => 0x10,
            PayloadType::OpenSessionResponse => 0x11,
            PayloadType::Rakp1 => 0x12,
            PayloadType::Rakp2 => 0x13,
            PayloadType::Rakp3 => 0x14,
            PayloadType::Rakp4 => 0x15,
            PayloadType::Unknown(c) => c,
        }
    }

    pub fn from_code(c: u8) -> Self {
        match c {
            0x00 => PayloadType::Ipmi,
            0x10 => PayloadType::OpenSessionRequest,
            0x11 => PayloadType::OpenSessionResponse,
            0x12 => PayloadType::Rakp1,
            0x13 => PayloadType::Rakp2,
            0x14 => PayloadType::Rakp3,
            0x15 => PayloadType::Rakp4,
            other => PayloadType::Unknown(other),
        }
    }
}

/// Network functions (table 5-1), request codes; a response is the request's plus one.
pub mod netfn {
    pub const CHASSIS: u8 = 0x00;
    pub const APP: u8 = 0x06;
}

/// Command codes (appendix G) for the commands the driver sends.
pub mod cmd {
    /// App: Get Channel Authentication Capabilities (22.13).
    pub const GET_CHANNEL_AUTH_CAPABILITIES: u8 = 0x38;
    /// App: Set Session Privilege Level (22.18).
    pub const SET_SESSION_PRIVILEGE_LEVEL: u8 = 0x3B;
    /// App: Close Session (22.19).
    pub const CLOSE_SESSION: u8 = 0x3C;
    /// Chassis: Get Chassis Status (28.2).
    pub const GET_CHASSIS_STATUS: u8 = 0x01;
    /// Chassis: Chassis Control (28.3).
    pub const CHASSIS_CONTROL: u8 = 0x02;
    /// Chassis: Set System Boot Options (28.12).
    pub const SET_SYSTEM_BOOT_OPTIONS: u8 = 0x08;
    /// Chassis: Get System Boot Options (28.13).
    pub const GET_SYSTEM_BOOT_OPTIONS: u8 = 0x09;
}

/// Privilege levels (table 6-2 / 22-18). Stork asks for Operator unless told otherwise:
/// it is enough for chassis control and boot options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    User,
    Operator,
    Administrator,
}

impl Privilege {
    pub fn code(self) -> u8 {
        match self {
            Privilege::User => 0x02,
            Privilege::Operator => 0x03,
            Privilege::Administrator => 0x04,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("{what}: {len} bytes, at least {need} needed")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("not an RMCP IPMI packet (header {0:02x?})")]
    NotRmcpIpmi([u8; 4]),
    #[error("unknown session authentication type 0x{0:02x}")]
    AuthType(u8),
    #[error("IPMI message checksum {which} is wrong")]
    Checksum { which: &'static str },
    #[error("payload length {declared} runs past the packet ({available} bytes left)")]
    PayloadLength { declared: usize, available: usize },
    #[error("session trailer is malformed: {0}")]
    Trailer(&'static str),
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        Err(WireError::Short {
            what,
            len: b.len(),
            need: n,
        })
    } else {
        Ok(())
    }
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn array16(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

/// Two's-complement checksum (section 13.8): the bytes plus the checksum sum to zero.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

// ---------------------------------------------------------------------------------------
// IPMI LAN messages (section 13.8, table 13-4)
// ---------------------------------------------------------------------------------------

/// A request from the remote console to the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmiRequest {
    pub netfn: u8,
    pub cmd: u8,
    /// 6-bit request sequence number, echoed in the response.
    pub rq_seq: u8,
    pub data: Vec<u8>,
}

impl IpmiRequest {
    pub fn emit(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(7 + self.data.len());
        m.push(BMC_ADDR);
        m.push(self.netfn << 2);
        m.push(checksum(&m[0..2]));
        m.push(REMOTE_CONSOLE_ADDR);
        m.push((self.rq_seq & 0x3F) << 2);
        m.push(self.cmd);
        m.extend_from_slice(&self.data);
        let c = checksum(&m[3..]);
        m.push(c);
        m
    }

    /// Parses a request (the BMC's side; used by tests that play BMC).
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("IPMI request", b, 7)?;
        if checksum(&b[0..2]) != b[2] {
            return Err(WireError::Checksum { which: "1" });
        }
        let last = b.len() - 1;
        if checksum(&b[3..last]) != b[last] {
            return Err(WireError::Checksum { which: "2" });
        }
        Ok(Self {
            netfn: b[1] >> 2,
            rq_seq: b[4] >> 2,
            cmd: b[5],
            data: b[6..last].to_vec(),
        })
    }
}

/// A response from the BMC: the completion code is kept apart from the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmiResponse {
    /// The response network function (request netfn + 1).
    pub netfn: u8,
    pub cmd: u8,
    pub rq_seq: u8,
    pub completion: u8,
    pub data: Vec<u8>,
}

impl IpmiResponse {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("IPMI response", b, 8)?;
        if checksum(&b[0..2]) != b[2] {
            return Err(WireError::Checksum { which: "1" });
        }
        let last = b.len() - 1;
        if checksum(&b[3..last]) != b[last] {
            return Err(WireError::Checksum { which: "2" });
        }
        Ok(Self {
            netfn: b[1] >> 2,
            rq_seq: b[4] >> 2,
            cmd: b[5],
            completion: b[6],
            data: b[7..last].to_vec(),
        })
    }

    /// Emits a response (the BMC's side; used by tests that play BMC).
    pub fn emit(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(8 + self.data.len());
        m.push(REMOTE_CONSOLE_ADDR);
        m.push(self.netfn << 2);
        m.push(checksum(&m[0..2]));
        m.push(BMC_ADDR);
        m.push((self.rq_seq & 0x3F) << 2);
        m.push(self.cmd);
        m.push(self.completion);
        m.extend_from_slice(&self.data);
        let c = checksum(&m[3..]);
        m.push(c);
        m
    }
}

// ---------------------------------------------------------------------------------------
// Session headers (section 13.6, table 13-8)
// ---------------------------------------------------------------------------------------

/// A pre-session IPMI 1.5 packet with authentication type none, session 0: how Get Channel
/// Authentication Capabilities travels before any session exists.
pub fn emit_v15_sessionless(message: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(14 + message.len());
    p.extend_from_slice(&RMCP_HEADER);
    p.push(AUTH_TYPE_NONE);
    p.extend_from_slice(&0u32.to_le_bytes()); // session sequence
    p.extend_from_slice(&0u32.to_le_bytes()); // session id
    p.push(message.len() as u8);
    p.extend_from_slice(message);
    p
}

/// A parsed packet, with the byte ranges integrity checking needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// IPMI 1.5, authentication type none (only pre-session answers are accepted).
    V15 {
        message: &'a [u8],
    },
    V20(V20Packet<'a>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V20Packet<'a> {
    pub payload_type: PayloadType,
    pub encrypted: bool,
    pub authenticated: bool,
    pub session_id: u32,
    pub session_seq: u32,
    /// The payload as sent (still encrypted if `encrypted`).
    pub payload: &'a [u8],
    /// From the authentication type byte through the "next header" byte: what the
    /// integrity AuthCode covers. Empty when not authenticated.
    pub integrity_data: &'a [u8],
    /// The AuthCode at the end of the packet. Empty when not authenticated.
    pub auth_code: &'a [u8],
}

/// Parses an RMCP packet carrying IPMI. `auth_code_len` is the integrity AuthCode length
/// of the session the packet may belong to (12 or 16; 0 before a session exists); it is
/// only used when the packet says it is authenticated.
pub fn parse_packet(b: &[u8], auth_code_len: usize) -> Result<Packet<'_>, WireError> {
    need("RMCP packet", b, RMCP_HEADER_LEN + 1)?;
    let header = [b[0], b[1], b[2], b[3]];
    // Byte 2 is the RMCP sequence; class 0x07 is IPMI (0x06 would be ASF ping/pong).
    if header[0] != RMCP_HEADER[0] || header[3] & 0x1F != 0x07 {
        return Err(WireError::NotRmcpIpmi(header));
    }
    let s = &b[RMCP_HEADER_LEN..];
    match s[0] {
        AUTH_TYPE_NONE => {
            need("IPMI 1.5 session header", s, 10)?;
            let len = s[9] as usize;
            let available = s.len() - 10;
            if len > available {
                return Err(WireError::PayloadLength {
                    declared: len,
                    available,
                });
            }
            Ok(Packet::V15 {
                message: &s[10..10 + len],
            })
        }
        AUTH_TYPE_RMCP_PLUS => {
            need("IPMI 2.0 session header", s, 12)?;
            let pt = s[1];
            let payload_type = PayloadType::from_code(pt & 0x3F);
            let encrypted = pt & 0x80 != 0;
            let authenticated = pt & 0x40 != 0;
            let session_id = u32_le(s, 2);
            let session_seq = u32_le(s, 6);
            let len = u16::from_le_bytes([s[10], s[11]]) as usize;
            let available = s.len() - 12;
            if len > available {
                return Err(WireError::PayloadLength {
                    declared: len,
                    available,
                });
            }
            let payload = &s[12..12 + len];
            let (integrity_data, auth_code) = if authenticated {
                // Trailer: pad (0xFF..), pad length, next header, AuthCode.
                if s.len() < 12 + len + 2 + auth_code_len {
                    return Err(WireError::Trailer("shorter than its AuthCode"));
                }
                let code_at = s.len() - auth_code_len;
                let next_header = s[code_at - 1];
                let pad_len = s[code_at - 2] as usize;
                if next_header != NEXT_HEADER_RMCP {
                    return Err(WireError::Trailer("next header is not 0x07"));
                }
                if 12 + len + pad_len + 2 != code_at {
                    return Err(WireError::Trailer("pad length does not match"));
                }
                (&s[..code_at], &s[code_at..])
            } else {
                (&s[0..0], &s[0..0])
            };
            Ok(Packet::V20(V20Packet {
                payload_type,
                encrypted,
                authenticated,
                session_id,
                session_seq,
                payload,
                integrity_data,
                auth_code,
            }))
        }
        other => Err(WireError::AuthType(other)),
    }
}

/// The session id of an IPMI 2.0 packet, read before its session (and so its AuthCode
/// length) is known: a BMC finds the session a packet claims, then checks it.
pub fn v20_session_id(b: &[u8]) -> Option<u32> {
    let s = b.get(RMCP_HEADER_LEN..RMCP_HEADER_LEN + 6)?;
    let rmcp_ipmi = b[0] == RMCP_HEADER[0] && b[3] & 0x1F == 0x07;
    (rmcp_ipmi && s[0] == AUTH_TYPE_RMCP_PLUS).then(|| u32_le(s, 2))
}

/// Computes a packet's integrity AuthCode from the bytes it covers.
pub type IntegrityFn<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;

/// Emits an IPMI 2.0 packet. With `integrity`, the trailer is added and the closure is
/// called with the bytes the AuthCode covers; it returns the AuthCode.
pub fn emit_v20(
    payload_type: PayloadType,
    encrypted: bool,
    session_id: u32,
    session_seq: u32,
    payload: &[u8],
    integrity: Option<IntegrityFn<'_>>,
) -> Vec<u8> {
    let mut p = Vec::with_capacity(RMCP_HEADER_LEN + 12 + payload.len() + 24);
    p.extend_from_slice(&RMCP_HEADER);
    let mut pt = payload_type.code() & 0x3F;
    if encrypted {
        pt |= 0x80;
    }
    if integrity.is_some() {
        pt |= 0x40;
    }
    p.push(AUTH_TYPE_RMCP_PLUS);
    p.push(pt);
    p.extend_from_slice(&session_id.to_le_bytes());
    p.extend_from_slice(&session_seq.to_le_bytes());
    p.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    p.extend_from_slice(payload);
    if let Some(mac) = integrity {
        // Integrity pad: the covered range (auth type .. next header) must be a whole
        // number of 4-byte words (table 13-8).
        let covered = p.len() - RMCP_HEADER_LEN + 2;
        let pad = (4 - covered % 4) % 4;
        p.extend(std::iter::repeat_n(0xFF, pad));
        p.push(pad as u8);
        p.push(NEXT_HEADER_RMCP);
        let code = mac(&p[RMCP_HEADER_LEN..]);
        p.extend_from_slice(&code);
    }
    p
}

// ---------------------------------------------------------------------------------------
// RMCP+ session set-up payloads (section 13.17-13.23)
// ---------------------------------------------------------------------------------------

/// Algorithm payload types inside Open Session (table 13-17..13-19).
const ALG_AUTH: u8 = 0x00;
const ALG_INTEGRITY: u8 = 0x01;
const ALG_CONFIDENTIALITY: u8 = 0x02;

/// The three algorithms a cipher suite names (tables 13-17, 13-18, 13-19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithms {
    pub auth: u8,
    pub integrity: u8,
    pub confidentiality: u8,
}

fn emit_alg(out: &mut Vec<u8>, kind: u8, alg: u8) {
    out.extend_from_slice(&[kind, 0, 0, 0x08, alg & 0x3F, 0, 0, 0]);
}

/// Open Session Request (table 13-9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionRequest {
    pub tag: u8,
    /// 0 asks for the highest level the proposed algorithms allow; the real level is set
    /// after the session is up with Set Session Privilege Level.
    pub max_privilege: u8,
    pub console_session_id: u32,
    pub algorithms: Algorithms,
}

impl OpenSessionRequest {
    pub fn emit(&self) -> Vec<u8> {
        let mut p = vec![self.tag, self.max_privilege, 0, 0];
        p.extend_from_slice(&self.console_session_id.to_le_bytes());
        emit_alg(&mut p, ALG_AUTH, self.algorithms.auth);
        emit_alg(&mut p, ALG_INTEGRITY, self.algorithms.integrity);
        emit_alg(&mut p, ALG_CONFIDENTIALITY, self.algorithms.confidentiality);
        p
    }

    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("Open Session Request", b, 32)?;
        Ok(Self {
            tag: b[0],
            max_privilege: b[1],
            console_session_id: u32_le(b, 4),
            algorithms: Algorithms {
                auth: b[12] & 0x3F,
                integrity: b[20] & 0x3F,
                confidentiality: b[28] & 0x3F,
            },
        })
    }
}

/// Open Session Response (table 13-10). On an error status the BMC may send less:
/// ipmi_sim 2.0.33 sends just the tag and the status. Missing fields are then zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionResponse {
    pub tag: u8,
    pub status: RmcpStatus,
    pub max_privilege: u8,
    pub console_session_id: u32,
    pub managed_session_id: u32,
    pub algorithms: Algorithms,
}

impl OpenSessionResponse {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("Open Session Response", b, 2)?;
        let status = RmcpStatus(b[1]);
        let full = b.len() >= 36;
        if status.is_ok() && !full {
            need("Open Session Response", b, 36)?;
        }
        Ok(Self {
            tag: b[0],
            status,
            max_privilege: b.get(2).copied().unwrap_or(0),
            console_session_id: if b.len() >= 8 { u32_le(b, 4) } else { 0 },
            managed_session_id: if full { u32_le(b, 8) } else { 0 },
            algorithms: if full {
                Algorithms {
                    auth: b[16] & 0x3F,
                    integrity: b[24] & 0x3F,
                    confidentiality: b[32] & 0x3F,
                }
            } else {
                Algorithms {
                    auth: 0,
                    integrity: 0,
                    confidentiality: 0,
                }
            },
        })
    }

    pub fn emit(&self) -> Vec<u8> {
        let mut p = vec![self.tag, self.status.0, self.max_privilege, 0];
        p.extend_from_slice(&self.console_session_id.to_le_bytes());
        if self.status.is_ok() {
            p.extend_from_slice(&self.managed_session_id.to_le_bytes());
            emit_alg(&mut p, ALG_AUTH, self.algorithms.auth);
            emit_alg(&mut p, ALG_INTEGRITY, self.algorithms.integrity);
            emit_alg(&mut p, ALG_CONFIDENTIALITY, self.algorithms.confidentiality);
        }
        p
    }
}

/// RAKP Message 1 (table 13-11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp1 {
    pub tag: u8,
    pub managed_session_id: u32,
    pub console_random: [u8; 16],
    /// Requested role: privilege level in bits 3:0, bit 4 set for a name-only user lookup.
    /// Both HMACs cover this exact byte.
    pub role: u8,
    pub username: Vec<u8>,
}

impl Rakp1 {
    pub fn emit(&self) -> Vec<u8> {
        let mut p = vec![self.tag, 0, 0, 0];
        p.extend_from_slice(&self.managed_session_id.to_le_bytes());
        p.extend_from_slice(&self.console_random);
        p.push(self.role);
        p.extend_from_slice(&[0, 0]);
        p.push(self.username.len() as u8);
        p.extend_from_slice(&self.username);
        p
    }

    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("RAKP 1", b, 28)?;
        let ulen = b[27] as usize;
        need("RAKP 1 with its user name", b, 28 + ulen)?;
        Ok(Self {
            tag: b[0],
            managed_session_id: u32_le(b, 4),
            console_random: array16(b, 8),
            role: b[24],
            username: b[28..28 + ulen].to_vec(),
        })
    }
}

/// RAKP Message 2 (table 13-12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp2 {
    pub tag: u8,
    pub status: RmcpStatus,
    pub console_session_id: u32,
    pub managed_random: [u8; 16],
    pub managed_guid: [u8; 16],
    pub auth_code: Vec<u8>,
}

impl Rakp2 {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("RAKP 2", b, 8)?;
        let status = RmcpStatus(b[1]);
        let console_session_id = u32_le(b, 4);
        if !status.is_ok() {
            // An error RAKP 2 carries no random, GUID or auth code.
            return Ok(Self {
                tag: b[0],
                status,
                console_session_id,
                managed_random: [0; 16],
                managed_guid: [0; 16],
                auth_code: Vec::new(),
            });
        }
        need("RAKP 2", b, 40)?;
        Ok(Self {
            tag: b[0],
            status,
            console_session_id,
            managed_random: array16(b, 8),
            managed_guid: array16(b, 24),
            auth_code: b[40..].to_vec(),
        })
    }

    pub fn emit(&self) -> Vec<u8> {
        let mut p = vec![self.tag, self.status.0, 0, 0];
        p.extend_from_slice(&self.console_session_id.to_le_bytes());
        if self.status.is_ok() {
            p.extend_from_slice(&self.managed_random);
            p.extend_from_slice(&self.managed_guid);
            p.extend_from_slice(&self.auth_code);
        }
        p
    }
}

/// RAKP Message 3 (table 13-13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp3 {
    pub tag: u8,
    pub status: RmcpStatus,
    pub managed_session_id: u32,
    pub auth_code: Vec<u8>,
}

impl Rakp3 {
    pub fn emit(&self) -> Vec<u8> {
        let mut p = vec![self.tag, self.status.0, 0, 0];
        p.extend_from_slice(&self.managed_session_id.to_le_bytes());
        p.extend_from_slice(&self.auth_code);
        p
    }

    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("RAKP 3", b, 8)?;
        Ok(Self {
            tag: b[0],
            status: RmcpStatus(b[1]),
            managed_session_id: u32_le(b, 4),
            auth_code: b[8..].to_vec(),
        })
    }
}

/// RAKP Message 4 (table 13-14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp4 {
    pub tag: u8,
    pub status: RmcpStatus,
    pub console_session_id: u32,
    pub integrity_check: Vec<u8>,
}

impl Rakp4 {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        need("RAKP 4", b, 8)?;
        Ok(Self {
            tag: b[0],
            status: RmcpStatus(b[1]),
            console_session_id: u32_le(b, 4),
            integrity_check: b[8..].to_vec(),
        })
    }

    pub fn emit(&self) -> Vec<u8> {
        let mut p = vec![self.tag, self.status.0, 0, 0];
        p.extend_from_slice(&self.console_session_id.to_le_bytes());
        p.extend_from_slice(&self.integrity_check);
        p
    }
}

/// RMCP+ and RAKP message status codes (table 13-15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmcpStatus(pub u8);

impl RmcpStatus {
    pub const OK: RmcpStatus = RmcpStatus(0x00);
    pub const INVALID_AUTH_ALGORITHM: RmcpStatus = RmcpStatus(0x04);
    pub const INVALID_INTEGRITY_ALGORITHM: RmcpStatus = RmcpStatus(0x05);
    pub const UNAUTHORIZED_ROLE: RmcpStatus = RmcpStatus(0x0A);
    pub const UNAUTHORIZED_NAME: RmcpStatus = RmcpStatus(0x0D);
    pub const INVALID_INTEGRITY_CHECK_VALUE: RmcpStatus = RmcpStatus(0x0F);
    pub const INVALID_CONFIDENTIALITY_ALGORITHM: RmcpStatus = RmcpStatus(0x10);
    pub const NO_CIPHER_SUITE_MATCH: RmcpStatus = RmcpStatus(0x11);

    pub fn is_ok(self) -> bool {
        self.0 == 0
    }

    /// The code's meaning as table 13-15 words it.
    pub fn meaning(self) -> &'static str {
        match self.0 {
            0x00 => "no errors",
            0x01 => "insufficient resources to create a session",
            0x02 => "invalid session ID",
            0x03 => "invalid payload type",
            0x04 => "invalid authentication algorithm",
            0x05 => "invalid integrity algorithm",
            0x06 => "no matching authentication payload",
            0x07 => "no matching integrity payload",
            0x08 => "inactive session ID",
            0x09 => "invalid role",
            0x0A => "unauthorized role or privilege level requested",
            0x0B => "insufficient resources to create a session at the requested role",
            0x0C => "invalid name length",
            0x0D => "unauthorized name",
            0x0E => "unauthorized GUID",
            0x0F => "invalid integrity check value",
            0x10 => "invalid confidentiality algorithm",
            0x11 => "no cipher suite match with proposed security algorithms",
            0x12 => "illegal or unrecognized parameter",
            _ => "reserved or OEM status code",
        }
    }

    /// Codes that mean "these credentials are not accepted" rather than a protocol fault.
    pub fn is_credentials(self) -> bool {
        matches!(self.0, 0x09 | 0x0A | 0x0C | 0x0D | 0x0F)
    }

    /// Codes that mean "the BMC does not do this cipher suite".
    pub fn is_cipher_suite(self) -> bool {
        matches!(self.0, 0x04 | 0x05 | 0x06 | 0x07 | 0x10 | 0x11)
    }
}

impl std::fmt::Display for RmcpStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:02X} {}", self.0, self.meaning())
    }
}

/// A completion code's meaning (table 5-2), with the command-specific codes of the
/// commands Stork sends. `cmd` is `(netfn, cmd)` of the request.
pub fn completion_meaning(code: u8, netfn: u8, cmd: u8) -> &'static str {
    match (netfn, cmd, code) {
        (netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL, 0x80) => {
            "requested level not available for this user"
        }
        (netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL, 0x81) => {
            "requested level exceeds the channel or user privilege limit"
        }
        (netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL, 0x82) => {
            "cannot disable user level authentication"
        }
        (netfn::APP, cmd::CLOSE_SESSION, 0x87) => "invalid session ID in request",
        (netfn::CHASSIS, cmd::SET_SYSTEM_BOOT_OPTIONS | cmd::GET_SYSTEM_BOOT_OPTIONS, 0x80) => {
            "parameter not supported"
        }
        (netfn::CHASSIS, cmd::SET_SYSTEM_BOOT_OPTIONS, 0x81) => {
            "attempt to set 'set in progress' while not in 'set complete' state"
        }
        (netfn::CHASSIS, cmd::SET_SYSTEM_BOOT_OPTIONS, 0x82) => {
            "attempt to write a read-only parameter"
        }
        (_, _, 0x00) => "command completed normally",
        (_, _, 0xC0) => "node busy",
        (_, _, 0xC1) => "invalid command",
        (_, _, 0xC2) => "command invalid for given LUN",
        (_, _, 0xC3) => "timeout while processing command",
        (_, _, 0xC4) => "out of space",
        (_, _, 0xC5) => "reservation canceled or invalid reservation ID",
        (_, _, 0xC6) => "request data truncated",
        (_, _, 0xC7) => "request data length invalid",
        (_, _, 0xC8) => "request data field length limit exceeded",
        (_, _, 0xC9) => "parameter out of range",
        (_, _, 0xCA) => "cannot return number of requested data bytes",
        (_, _, 0xCB) => "requested sensor, data, or record not present",
        (_, _, 0xCC) => "invalid data field in request",
        (_, _, 0xCD) => "command illegal for specified sensor or record type",
        (_, _, 0xCE) => "command response could not be provided",
        (_, _, 0xCF) => "cannot execute duplicated request",
        (_, _, 0xD0) => "SDR repository in update mode",
        (_, _, 0xD1) => "device in firmware update mode",
        (_, _, 0xD2) => "BMC initialization or initialization agent in progress",
        (_, _, 0xD3) => "destination unavailable",
        (_, _, 0xD4) => "insufficient privilege level (or the session privilege was never raised)",
        (_, _, 0xD5) => "command not supported in present state",
        (_, _, 0xD6) => "command sub-function disabled or unavailable",
        (_, _, 0xFF) => "unspecified error",
        (_, _, 0x01..=0x7E) => "device-specific (OEM) completion code",
        _ => "command-specific completion code",
    }
}

// ---------------------------------------------------------------------------------------
// Command data (chapter 28)
// ---------------------------------------------------------------------------------------

/// Chassis Control sub-commands (table 28-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChassisControl {
    PowerDown,
    PowerUp,
    PowerCycle,
    HardReset,
    /// ACPI soft shutdown (emulates a fatal overtemperature).
    SoftShutdown,
}

impl ChassisControl {
    pub fn code(self) -> u8 {
        match self {
            ChassisControl::PowerDown => 0x00,
            ChassisControl::PowerUp => 0x01,
            ChassisControl::PowerCycle => 0x02,
            ChassisControl::HardReset => 0x03,
            ChassisControl::SoftShutdown => 0x05,
        }
    }

    /// The sub-command a Chassis Control request's first data byte names (a BMC's view).
    pub fn from_code(code: u8) -> Option<Self> {
        [
            ChassisControl::PowerDown,
            ChassisControl::PowerUp,
            ChassisControl::PowerCycle,
            ChassisControl::HardReset,
            ChassisControl::SoftShutdown,
        ]
        .into_iter()
        .find(|c| c.code() == code & 0x0F)
    }

    pub fn describe(self) -> &'static str {
        match self {
            ChassisControl::PowerDown => "Chassis Control (power down)",
            ChassisControl::PowerUp => "Chassis Control (power up)",
            ChassisControl::PowerCycle => "Chassis Control (power cycle)",
            ChassisControl::HardReset => "Chassis Control (hard reset)",
            ChassisControl::SoftShutdown => "Chassis Control (soft shutdown)",
        }
    }
}

/// The parts of Get Chassis Status (table 28-3) Stork uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChassisStatus {
    pub power_on: bool,
    pub power_fault: bool,
    pub power_control_fault: bool,
}

impl ChassisStatus {
    /// `data` is the response data after the completion code.
    /// Get Chassis Status response data (a BMC's answer): current power state, last power
    /// event, misc chassis state.
    pub fn emit(&self) -> [u8; 3] {
        let mut state = u8::from(self.power_on);
        if self.power_fault {
            state |= 0x08;
        }
        if self.power_control_fault {
            state |= 0x10;
        }
        [state, 0, 0]
    }

    pub fn parse(data: &[u8]) -> Result<Self, WireError> {
        need("Get Chassis Status response", data, 1)?;
        Ok(Self {
            power_on: data[0] & 0x01 != 0,
            power_fault: data[0] & 0x08 != 0,
            power_control_fault: data[0] & 0x10 != 0,
        })
    }
}

/// Boot flags parameter selector (table 28-14, parameter 5).
pub const BOOT_PARAM_FLAGS: u8 = 5;

/// Boot device selector values (table 28-14, data 2 bits 5:2), already shifted.
pub const BOOT_DEVICE_PXE: u8 = 0x04;
pub const BOOT_DEVICE_DISK: u8 = 0x08;
const BOOT_DEVICE_MASK: u8 = 0x3C;

/// Boot flags (parameter 5) as Stork sets and reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootFlags {
    /// Bit 7 of data 1: the BMC should apply the flags on the next boot.
    pub valid: bool,
    /// Bit 6 of data 1: all future boots, not just the next one.
    pub persistent: bool,
    /// Bit 5 of data 1: EFI boot rather than PC-compatible (legacy).
    pub efi: bool,
    /// Data 2 bits 5:2, shifted in place (0x04 PXE, 0x08 disk).
    pub device: u8,
}

impl BootFlags {
    /// No override: the machine boots by its own order.
    pub const NONE: BootFlags = BootFlags {
        valid: false,
        persistent: false,
        efi: false,
        device: 0,
    };

    /// The 5 data bytes of parameter 5.
    pub fn emit(&self) -> [u8; 5] {
        let mut d1 = 0u8;
        if self.valid {
            d1 |= 0x80;
        }
        if self.persistent {
            d1 |= 0x40;
        }
        if self.efi {
            d1 |= 0x20;
        }
        [d1, self.device & BOOT_DEVICE_MASK, 0, 0, 0]
    }

    /// Set System Boot Options request data: parameter selector 5 then the flags.
    pub fn set_request_data(&self) -> Vec<u8> {
        let mut d = vec![BOOT_PARAM_FLAGS];
        d.extend_from_slice(&self.emit());
        d
    }

    /// Get System Boot Options request data for parameter 5 (set and block selector 0).
    pub fn get_request_data() -> Vec<u8> {
        vec![BOOT_PARAM_FLAGS, 0, 0]
    }

    /// Parses Get System Boot Options response data (after the completion code):
    /// parameter version, parameter selector, then the 5 flag bytes.
    pub fn parse_get_response(data: &[u8]) -> Result<Self, WireError> {
        need("Get System Boot Options (boot flags) response", data, 4)?;
        Ok(Self::from_data(data[2], data[3]))
    }

    /// Get System Boot Options response data (a BMC's answer): parameter version 1,
    /// the selector, the flags.
    pub fn get_response_data(&self) -> Vec<u8> {
        let mut d = vec![0x01, BOOT_PARAM_FLAGS];
        d.extend_from_slice(&self.emit());
        d
    }

    /// Parses Set System Boot Options request data (a BMC's view): `None` when it sets
    /// another parameter than the boot flags.
    pub fn parse_set_request(data: &[u8]) -> Result<Option<Self>, WireError> {
        need("Set System Boot Options request", data, 1)?;
        if data[0] & 0x7F != BOOT_PARAM_FLAGS {
            return Ok(None);
        }
        need("Set System Boot Options (boot flags) request", data, 3)?;
        Ok(Some(Self::from_data(data[1], data[2])))
    }

    fn from_data(d1: u8, d2: u8) -> Self {
        Self {
            valid: d1 & 0x80 != 0,
            persistent: d1 & 0x40 != 0,
            efi: d1 & 0x20 != 0,
            device: d2 & BOOT_DEVICE_MASK,
        }
    }
}

/// Get Channel Authentication Capabilities request (table 22-15): bit 7 asks for the
/// IPMI 2.0 extended data, channel 0x0E means "this channel".
pub fn channel_auth_capabilities_request(privilege: Privilege) -> Vec<u8> {
    vec![0x8E, privilege.code()]
}

/// Whether a Get Channel Authentication Capabilities answer (data after the completion
/// code) says the channel speaks IPMI 2.0 (table 22-15, byte 4 bit 1).
/// A BMC's Get Channel Authentication Capabilities answer (table 22-15): channel 1,
/// IPMI 2.0 extended data, password auth, per-message auth, IPMI 2.0 connections.
pub fn channel_auth_capabilities_response() -> Vec<u8> {
    vec![0x01, 0x80 | 0x04, 0x04, 0x02, 0, 0, 0, 0]
}

pub fn channel_supports_ipmi20(data: &[u8]) -> Result<bool, WireError> {
    need("Get Channel Authentication Capabilities response", data, 4)?;
    let extended = data[1] & 0x80 != 0;
    Ok(extended && data[3] & 0x02 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_makes_the_sum_zero() {
        let b = [0x20, 0x18];
        let c = checksum(&b);
        assert_eq!(c, 0xC8);
        assert_eq!(b.iter().fold(c, |a, x| a.wrapping_add(*x)), 0);
    }

    /// Get Channel Authentication Capabilities as ipmitool sends it (captured on the
    /// loopback against ipmi_sim).
    #[test]
    fn channel_auth_capabilities_golden_bytes() {
        let req = IpmiRequest {
            netfn: netfn::APP,
            cmd: cmd::GET_CHANNEL_AUTH_CAPABILITIES,
            rq_seq: 0,
            data: channel_auth_capabilities_request(Privilege::Administrator),
        };
        let p = emit_v15_sessionless(&req.emit());
        assert_eq!(
            p,
            [
                0x06, 0x00, 0xFF, 0x07, // RMCP
                0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x09, // v1.5 session, length 9
                0x20, 0x18, 0xC8, 0x81, 0x00, 0x38, 0x8E, 0x04, 0xB5,
            ]
        );
        match parse_packet(&p, 0).unwrap() {
            Packet::V15 { message } => {
                let back = IpmiRequest::parse(message).unwrap();
                assert_eq!(back, req);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn response_round_trip_and_bad_checksum() {
        let r = IpmiResponse {
            netfn: netfn::CHASSIS + 1,
            cmd: cmd::GET_CHASSIS_STATUS,
            rq_seq: 5,
            completion: 0,
            data: vec![0x01, 0, 0, 0],
        };
        let b = r.emit();
        assert_eq!(IpmiResponse::parse(&b).unwrap(), r);
        let mut bad = b.clone();
        bad[7] ^= 1;
        assert_eq!(
            IpmiResponse::parse(&bad),
            Err(WireError::Checksum { which: "2" })
        );
        assert!(matches!(
            IpmiResponse::parse(&b[..5]),
            Err(WireError::Short { .. })
        ));
    }

    #[test]
    fn v20_trailer_pads_to_words_and_parses_back() {
        let payload = [1u8, 2, 3, 4, 5];
        let mac = |d: &[u8]| {
            // Covered bytes must be a whole number of words.
            assert_eq!(d.len() % 4, 0);
            vec![0xAB; 12]
        };
        let p = emit_v20(
            PayloadType::Ipmi,
            false,
            0x11223344,
            7,
            &payload,
            Some(&mac),
        );
        let Packet::V20(v) = parse_packet(&p, 12).unwrap() else {
            panic!("not v2.0");
        };
        assert!(v.authenticated && !v.encrypted);
        assert_eq!(v.session_id, 0x11223344);
        assert_eq!(v.session_seq, 7);
        assert_eq!(v.payload, payload);
        assert_eq!(v.auth_code, [0xAB; 12]);
        assert_eq!(v.integrity_data.len() % 4, 0);
        // A truncated packet is an error, not a panic.
        for n in 0..p.len() {
            let _ = parse_packet(&p[..n], 12);
        }
    }

    #[test]
    fn open_session_and_rakp_round_trip() {
        let alg = Algorithms {
            auth: 3,
            integrity: 4,
            confidentiality: 1,
        };
        let req = OpenSessionRequest {
            tag: 9,
            max_privilege: 0,
            console_session_id: 0xA0A1A2A3,
            algorithms: alg,
        };
        let b = req.emit();
        assert_eq!(b.len(), 32);
        assert_eq!(&b[8..16], &[0, 0, 0, 8, 3, 0, 0, 0]);
        assert_eq!(OpenSessionRequest::parse(&b).unwrap(), req);

        let resp = OpenSessionResponse {
            tag: 9,
            status: RmcpStatus::OK,
            max_privilege: 4,
            console_session_id: 0xA0A1A2A3,
            managed_session_id: 0x01020304,
            algorithms: alg,
        };
        assert_eq!(OpenSessionResponse::parse(&resp.emit()).unwrap(), resp);
        // An error answer may be 8 bytes long, or (ipmi_sim) just tag and status.
        let short = [9, 0x04, 0, 0, 0xA3, 0xA2, 0xA1, 0xA0];
        let e = OpenSessionResponse::parse(&short).unwrap();
        assert_eq!(e.status, RmcpStatus::INVALID_AUTH_ALGORITHM);
        assert_eq!(e.console_session_id, 0xA0A1A2A3);
        assert!(e.status.is_cipher_suite());
        let e = OpenSessionResponse::parse(&[0, 0x04]).unwrap();
        assert_eq!(e.status, RmcpStatus::INVALID_AUTH_ALGORITHM);
        assert!(OpenSessionResponse::parse(&[0]).is_err());

        let r1 = Rakp1 {
            tag: 1,
            managed_session_id: 5,
            console_random: [7; 16],
            role: 0x14,
            username: b"admin".to_vec(),
        };
        assert_eq!(Rakp1::parse(&r1.emit()).unwrap(), r1);
        let r2 = Rakp2 {
            tag: 1,
            status: RmcpStatus::OK,
            console_session_id: 6,
            managed_random: [8; 16],
            managed_guid: [9; 16],
            auth_code: vec![1; 20],
        };
        assert_eq!(Rakp2::parse(&r2.emit()).unwrap(), r2);
        let r3 = Rakp3 {
            tag: 1,
            status: RmcpStatus::OK,
            managed_session_id: 5,
            auth_code: vec![2; 32],
        };
        assert_eq!(Rakp3::parse(&r3.emit()).unwrap(), r3);
        let r4 = Rakp4 {
            tag: 1,
            status: RmcpStatus::OK,
            console_session_id: 6,
            integrity_check: vec![3; 12],
        };
        assert_eq!(Rakp4::parse(&r4.emit()).unwrap(), r4);
    }

    #[test]
    fn boot_flags_bits() {
        let f = BootFlags {
            valid: true,
            persistent: false,
            efi: true,
            device: BOOT_DEVICE_PXE,
        };
        assert_eq!(f.emit(), [0xA0, 0x04, 0, 0, 0]);
        assert_eq!(f.set_request_data(), [5, 0xA0, 0x04, 0, 0, 0]);
        let persistent_disk = BootFlags {
            valid: true,
            persistent: true,
            efi: false,
            device: BOOT_DEVICE_DISK,
        };
        assert_eq!(persistent_disk.emit(), [0xC0, 0x08, 0, 0, 0]);
        // Get System Boot Options answer: version 1, parameter 5, flags.
        let got = BootFlags::parse_get_response(&[0x01, 0x05, 0xA0, 0x04, 0, 0, 0]).unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn completion_codes_have_meanings() {
        assert_eq!(
            completion_meaning(0xD4, netfn::CHASSIS, cmd::CHASSIS_CONTROL),
            "insufficient privilege level (or the session privilege was never raised)"
        );
        assert_eq!(
            completion_meaning(0x80, netfn::CHASSIS, cmd::SET_SYSTEM_BOOT_OPTIONS),
            "parameter not supported"
        );
        assert_eq!(
            completion_meaning(0x80, netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL),
            "requested level not available for this user"
        );
    }
}
