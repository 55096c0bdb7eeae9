//! Fuzzing the BMC clients on the stable toolchain, in `cargo xtask test`: what a BMC (or
//! anything else on its network) sends back, through the code that reads it.
//!
//! - `ipmi`: raw UDP datagrams through `wire::parse_packet` and every reply parser; through
//!   the RMCP+ handshake's `handle` at each of its four steps (the steps before replayed
//!   with valid answers of a BMC whose password the test knows, for cipher suites 3 and
//!   17), as they are and wrapped in the framing each step waits for; and through the
//!   established session's `open` and `open_response`, as they are and sealed with the
//!   session's real keys, so decryption, the confidentiality pad and the response parsers
//!   behind the integrity check are reached too.
//! - `ipmi-bmc`: what a console (or anything on a BMC's network) sends, through the BMC's
//!   side (`responder::Responder::handle`, which `stork-sim`'s BMCs run): as received; as
//!   RAKP 1 or RAKP 3 addressed to a session really being set up; and sealed in a session
//!   the driver's handshake set up, so the command parsers behind the AuthCode are reached.
//!   Every answer must parse, and an answer in the session must authenticate and decrypt
//!   with its keys.
//! - `redfish`: HTTP bodies through everything the driver reads from a BMC's answers
//!   (`parse_body`, `first_member`, `power_state`, `reset_action`, `service_path`,
//!   `BootOverride::from_system`, `excerpt`), with the invariant that a path the BMC names
//!   never takes the request (and its credentials) to another host.
//!
//! The harness is `fuzz_common`, shared with `fuzz.rs`: the corpus in
//! `appliance/fuzz/corpus/{ipmi,ipmi-bmc,redfish}/`, every crash ever found in
//! `appliance/fuzz/regressions/` (run first), then mutations for `STORK_FUZZ_SECS` (default
//! 10 per target; `STORK_FUZZ_SEED` replays a run); a failing input is kept in
//! `target/fuzz-crashes/` and the test fails with it in hex. The corpus is generated here
//! from the code's own encoders: `corpus_is_current` checks it, and
//! `STORK_FUZZ_WRITE_CORPUS=1 cargo test -p stork --test fuzz_bmc corpus_is_current`
//! writes it again after a format change.
// Test helpers: a failure is a test failure, so they unwrap.
#![allow(clippy::unwrap_used)]

mod fuzz_common;

use serde_json::{Value, json};
use stork::power::ipmi::crypto::{CipherSuite, RakpTranscript, SessionKeys};
use stork::power::ipmi::responder::{MemoryChassis, Responder};
use stork::power::ipmi::session::{Handshake, Next, Session, SessionError, Step};
use stork::power::ipmi::wire::{
    self, BootFlags, ChassisStatus, IpmiRequest, IpmiResponse, OpenSessionRequest,
    OpenSessionResponse, Packet, PayloadType, Privilege, Rakp1, Rakp2, Rakp3, Rakp4, RmcpStatus,
    cmd, netfn,
};
use stork::power::redfish::{
    BootOverride, excerpt, first_member, parse_body, power_state, reset_action, service_path,
};

use fuzz_common::{INTERESTING, Rng, caught, drive_with, mutate};

// ---------------------------------------------------------------------------------------
// IPMI: a BMC whose password the test knows
// ---------------------------------------------------------------------------------------

const USER: &[u8] = b"admin";
const PASSWORD: &[u8] = b"fuzz-pw";
const PRIVILEGE: Privilege = Privilege::Operator;
/// RAKP 1's role byte: the privilege with the name-only lookup bit, as the handshake sends.
const ROLE: u8 = 0x03 | 0x10;
const CONSOLE_SID: u32 = 0xC0C0_0001;
const MANAGED_SID: u32 = 0x5555_0001;
const RM: [u8; 16] = [0x11; 16];
const RC: [u8; 16] = [0x22; 16];
const GUID: [u8; 16] = *b"stork-fuzz-guid!";
const IV: [u8; 16] = [0x5A; 16];
const SUITES: [CipherSuite; 2] = [CipherSuite::Suite3, CipherSuite::Suite17];

fn transcript() -> RakpTranscript<'static> {
    RakpTranscript {
        console_session_id: CONSOLE_SID,
        managed_session_id: MANAGED_SID,
        console_random: RM,
        managed_random: RC,
        managed_guid: GUID,
        role: ROLE,
        username: USER,
    }
}

fn keys(suite: CipherSuite) -> SessionKeys {
    transcript().session_keys(suite, PASSWORD)
}

/// A set-up payload as the BMC frames it: IPMI 2.0, session 0, no integrity yet.
fn v20(payload_type: PayloadType, payload: &[u8]) -> Vec<u8> {
    wire::emit_v20(payload_type, false, 0, 0, payload, None)
}

fn auth_capabilities(completion: u8, data: &[u8]) -> IpmiResponse {
    IpmiResponse {
        netfn: netfn::APP + 1,
        cmd: cmd::GET_CHANNEL_AUTH_CAPABILITIES,
        rq_seq: 0,
        completion,
        data: data.to_vec(),
    }
}

/// IPMI 2.0 extended data, RMCP+ supported (table 22-15).
const CAPS_IPMI20: [u8; 8] = [0x01, 0x84, 0x04, 0x02, 0, 0, 0, 0];

/// The BMC's four valid answers, one per handshake step.
fn bmc_answers(suite: CipherSuite) -> [Vec<u8>; 4] {
    let caps = auth_capabilities(0, &CAPS_IPMI20);
    let open = OpenSessionResponse {
        tag: 0,
        status: RmcpStatus::OK,
        max_privilege: 4,
        console_session_id: CONSOLE_SID,
        managed_session_id: MANAGED_SID,
        algorithms: suite.algorithms(),
    };
    let t = transcript();
    let rakp2 = Rakp2 {
        tag: 0,
        status: RmcpStatus::OK,
        console_session_id: CONSOLE_SID,
        managed_random: RC,
        managed_guid: GUID,
        auth_code: t.rakp2_auth_code(suite, PASSWORD),
    };
    let rakp4 = Rakp4 {
        tag: 0,
        status: RmcpStatus::OK,
        console_session_id: CONSOLE_SID,
        integrity_check: keys(suite).rakp4_icv(&RM, MANAGED_SID, &GUID),
    };
    [
        wire::emit_v15_sessionless(&caps.emit()),
        v20(PayloadType::OpenSessionResponse, &open.emit()),
        v20(PayloadType::Rakp2, &rakp2.emit()),
        v20(PayloadType::Rakp4, &rakp4.emit()),
    ]
}

/// A handshake that has had the first `step` valid answers: it waits for answer `step`.
fn handshake_at(suite: CipherSuite, answers: &[Vec<u8>; 4], step: usize) -> Handshake {
    let mut hs = Handshake::new(suite, PRIVILEGE, USER, PASSWORD, CONSOLE_SID, RM).unwrap();
    hs.start();
    for a in &answers[..step] {
        match hs.handle(a) {
            Ok(Some(Next::Send(_))) => {}
            other => panic!("valid answer did not advance the handshake: {other:?}"),
        }
    }
    hs
}

/// How the answer to each step is framed, to wrap a fuzz input as that step's answer.
fn frame_for_step(step: usize, payload: &[u8]) -> Vec<u8> {
    match step {
        0 => wire::emit_v15_sessionless(payload),
        1 => v20(PayloadType::OpenSessionResponse, payload),
        2 => v20(PayloadType::Rakp2, payload),
        _ => v20(PayloadType::Rakp4, payload),
    }
}

fn established(suite: CipherSuite) -> Session {
    let answers = bmc_answers(suite);
    let mut hs = handshake_at(suite, &answers, 3);
    match hs.handle(&answers[3]) {
        Ok(Some(Next::Established(s))) => s,
        other => panic!("no session: {other:?}"),
    }
}

/// The requests the driver sends in a session, each with a distinct sequence number.
fn session_requests() -> Vec<IpmiRequest> {
    let flags = BootFlags {
        valid: true,
        persistent: false,
        efi: true,
        device: wire::BOOT_DEVICE_PXE,
    };
    [
        (netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL, vec![0x03]),
        (netfn::CHASSIS, cmd::GET_CHASSIS_STATUS, vec![]),
        (netfn::CHASSIS, cmd::CHASSIS_CONTROL, vec![0x01]),
        (
            netfn::CHASSIS,
            cmd::SET_SYSTEM_BOOT_OPTIONS,
            flags.set_request_data(),
        ),
        (
            netfn::CHASSIS,
            cmd::GET_SYSTEM_BOOT_OPTIONS,
            BootFlags::get_request_data(),
        ),
        (
            netfn::APP,
            cmd::CLOSE_SESSION,
            MANAGED_SID.to_le_bytes().to_vec(),
        ),
    ]
    .into_iter()
    .zip(1u8..)
    .map(|((netfn, cmd, data), rq_seq)| IpmiRequest {
        netfn,
        cmd,
        rq_seq,
        data,
    })
    .collect()
}

/// What the driver does with an answer's data (`Conn::call` and its callers).
fn read_answer(req: &IpmiRequest, resp: &IpmiResponse) {
    let _ = wire::completion_meaning(resp.completion, req.netfn, req.cmd);
    match (req.netfn, req.cmd) {
        (netfn::CHASSIS, cmd::GET_CHASSIS_STATUS) => {
            let _ = ChassisStatus::parse(&resp.data).map_err(|e| e.to_string());
        }
        (netfn::CHASSIS, cmd::GET_SYSTEM_BOOT_OPTIONS) => {
            let _ = BootFlags::parse_get_response(&resp.data).map_err(|e| e.to_string());
        }
        (netfn::APP, cmd::SET_SESSION_PRIVILEGE_LEVEL) => {
            let _ = resp.data.first().map(|p| p & 0x0F);
        }
        _ => {}
    }
}

/// Every parser of set-up payloads, IPMI messages and command data, on the same bytes;
/// what parses must encode back to the same value.
fn payload_parsers(b: &[u8]) -> Result<(), String> {
    if let Ok(r) = IpmiResponse::parse(b) {
        if IpmiResponse::parse(&r.emit()).as_ref() != Ok(&r) {
            return Err(format!("IPMI response does not round-trip: {r:?}"));
        }
        for req in session_requests() {
            read_answer(&req, &r);
        }
    }
    let _ = IpmiRequest::parse(b);
    match OpenSessionResponse::parse(b) {
        Ok(o) => {
            let _ = (o.status.to_string(), o.status.is_credentials());
            if o.status.is_ok() && OpenSessionResponse::parse(&o.emit()).as_ref() != Ok(&o) {
                return Err(format!("Open Session Response does not round-trip: {o:?}"));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(r) = Rakp2::parse(b)
        && Rakp2::parse(&r.emit()).as_ref() != Ok(&r)
    {
        return Err(format!("RAKP 2 does not round-trip: {r:?}"));
    }
    if let Ok(r) = Rakp4::parse(b)
        && Rakp4::parse(&r.emit()).as_ref() != Ok(&r)
    {
        return Err(format!("RAKP 4 does not round-trip: {r:?}"));
    }
    // The BMC's side of the set-up, same module, same rules.
    let _ = (
        OpenSessionRequest::parse(b),
        Rakp1::parse(b),
        Rakp3::parse(b),
    );
    let _ = ChassisStatus::parse(b);
    let _ = BootFlags::parse_get_response(b);
    let _ = wire::channel_supports_ipmi20(b);
    Ok(())
}

/// `parse_packet` with each AuthCode length a session may have, then every payload parser
/// on what it found and on the raw bytes.
fn ipmi_parsers(input: &[u8]) -> Result<(), String> {
    for auth_code_len in [0, 12, 16] {
        match wire::parse_packet(input, auth_code_len) {
            Ok(Packet::V15 { message }) => {
                if message.len() + 14 > input.len() {
                    return Err("IPMI 1.5 message longer than the packet".into());
                }
                payload_parsers(message)?;
            }
            Ok(Packet::V20(p)) => {
                if p.authenticated
                    && (p.auth_code.len() != auth_code_len
                        || 4 + p.integrity_data.len() + p.auth_code.len() != input.len()
                        || p.integrity_data.len() < 12 + p.payload.len())
                {
                    return Err(format!("IPMI 2.0 trailer ranges are wrong: {p:?}"));
                }
                payload_parsers(p.payload)?;
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    payload_parsers(input)
}

/// The handshake at each step, fed the input as it is and wrapped as the answer that step
/// waits for.
fn ipmi_handshake(suite: CipherSuite, answers: &[Vec<u8>; 4], input: &[u8]) -> Result<(), String> {
    for step in 0..4 {
        let wrapped = frame_for_step(step, input);
        for datagram in [input, &wrapped[..]] {
            let mut hs = handshake_at(suite, answers, step);
            let before = hs.step();
            match hs.handle(datagram) {
                Ok(None) => {
                    if hs.step() != before {
                        return Err(format!("an ignored packet moved step {before:?}"));
                    }
                }
                Ok(Some(Next::Send(p))) => {
                    if wire::parse_packet(&p, 0).is_err() || hs.retransmit() != p {
                        return Err(format!("step {before:?} sent a bad packet: {p:02x?}"));
                    }
                }
                Ok(Some(Next::Established(s))) => {
                    if step != 3 || s.managed_session_id() != MANAGED_SID {
                        return Err(format!("session established at step {before:?}"));
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
    Ok(())
}

/// One suite's established session, both ends.
struct Sessions {
    client: Session,
    bmc: Session,
    keys: SessionKeys,
}

fn open_as_received(s: &Sessions, input: &[u8]) -> Result<(), String> {
    match s.client.open(input) {
        Ok(Some(payload)) => payload_parsers(&payload)?,
        Ok(None) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
    for req in session_requests() {
        match s.client.open_response(input, &req) {
            Ok(Some(resp)) => {
                if (resp.netfn, resp.cmd, resp.rq_seq) != (req.netfn + 1, req.cmd, req.rq_seq) {
                    return Err(format!("answer to another request taken: {resp:?}"));
                }
                read_answer(&req, &resp);
            }
            Ok(None) => {}
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    Ok(())
}

/// The input sealed with the session's real keys, so it gets past the integrity check: as
/// the whole payload, as the data of the answer to one request, unencrypted, and with the
/// confidentiality pad taken from the input. One request and one pad per input (`pick`
/// says which): crypto in a debug build is what bounds the rate here.
fn open_sealed(s: &mut Sessions, input: &[u8], pick: usize) -> Result<(), String> {
    let sealed = s.bmc.seal(input, IV);
    match s.client.open(&sealed) {
        Ok(Some(p)) if p == input => {}
        other => return Err(format!("a sealed payload opened as {other:?}")),
    }
    let reqs = session_requests();
    let req = &reqs[pick % reqs.len()];
    let resp = IpmiResponse {
        netfn: req.netfn + 1,
        cmd: req.cmd,
        rq_seq: req.rq_seq,
        completion: input.first().copied().unwrap_or(0),
        data: input.get(1..).unwrap_or_default().to_vec(),
    };
    let sealed = s.bmc.seal(&resp.emit(), IV);
    match s.client.open_response(&sealed, req) {
        Ok(Some(got)) if got == resp => read_answer(req, &got),
        other => return Err(format!("a sealed answer opened as {other:?}")),
    }
    let keys = &s.keys;
    let mac = |covered: &[u8]| keys.integrity(covered);
    let plain = wire::emit_v20(PayloadType::Ipmi, false, CONSOLE_SID, 1, input, Some(&mac));
    match s.client.open(&plain) {
        Ok(Some(p)) if p == input => {}
        other => {
            return Err(format!(
                "an authenticated clear payload opened as {other:?}"
            ));
        }
    }
    // Encrypting 16n - 1 bytes adds only the pad length 0; decrypting the first k blocks
    // then finds the input's byte 16k - 1 where the pad length goes, and the bytes before
    // it where the pad goes.
    let mut padded = input.to_vec();
    padded.resize(input.len() / 16 * 16 + 15, 0xA5);
    let ct = s.keys.encrypt(IV, &padded);
    let blocks = (ct.len() - 16) / 16;
    let k = 1 + pick % blocks;
    let packet = wire::emit_v20(
        PayloadType::Ipmi,
        true,
        CONSOLE_SID,
        1,
        &ct[..16 + 16 * k],
        Some(&mac),
    );
    match s.client.open(&packet) {
        Ok(Some(p)) if padded.starts_with(&p) => Ok(()),
        Err(SessionError::Decrypt(_)) => Ok(()),
        other => Err(format!(
            "{k} blocks with the input's pad opened as {other:?}"
        )),
    }
}

const PAYLOAD_TYPE_BYTES: &[u8] = &[
    0x00, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x3F, 0x40, 0x51, 0x53, 0x55, 0x80, 0xC0,
];

/// Makes an IPMI message's two checksums right.
fn fix_checksums(m: &mut [u8]) {
    if m.len() >= 7 {
        m[2] = wire::checksum(&m[..2]);
        let last = m.len() - 1;
        m[last] = wire::checksum(&m[3..last]);
    }
}

/// Makes the length fields and checksums agree with the bytes, so a mutation reaches the
/// parsers behind them.
fn repair(p: &mut Vec<u8>) {
    match p.get(4) {
        Some(&wire::AUTH_TYPE_NONE) if p.len() >= 14 => {
            p.truncate(14 + 255);
            p[13] = (p.len() - 14) as u8;
            fix_checksums(&mut p[14..]);
        }
        Some(&wire::AUTH_TYPE_RMCP_PLUS) if p.len() >= 16 && p[5] & 0x40 == 0 => {
            let n = (p.len() - 16) as u16;
            p[14..16].copy_from_slice(&n.to_le_bytes());
            if p[5] & 0x3F == 0 {
                fix_checksums(&mut p[16..]);
            }
        }
        _ => {}
    }
}

fn mutate_ipmi(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut p = mutate(rng, seeds);
    match rng.below(4) {
        0 if p.len() > 5 => p[5] = PAYLOAD_TYPE_BYTES[rng.below(PAYLOAD_TYPE_BYTES.len())],
        1 => repair(&mut p),
        2 if p.len() > 16 => {
            // A byte in the payload (a status, a tag, an algorithm record's length), then
            // the framing made right again.
            let i = 16 + rng.below(p.len() - 16);
            p[i] = INTERESTING[rng.below(INTERESTING.len())];
            repair(&mut p);
        }
        _ => {}
    }
    p
}

#[test]
fn ipmi_replies_from_raw_bytes() {
    let answers = SUITES.map(bmc_answers);
    let mut sessions: Vec<Sessions> = SUITES
        .into_iter()
        .map(|suite| Sessions {
            client: established(suite),
            bmc: Session::for_bmc(keys(suite), CONSOLE_SID, MANAGED_SID),
            keys: keys(suite),
        })
        .collect();
    let mut accepted = 0u64;
    let mut i = 0usize;
    let n = drive_with("ipmi", mutate_ipmi, |input| {
        i += 1;
        caught(|| {
            ipmi_parsers(input)?;
            // The suites differ in the lengths of auth codes and the AuthCode: both, in turn.
            let which = i % SUITES.len();
            ipmi_handshake(SUITES[which], &answers[which], input)?;
            for s in &mut sessions {
                if matches!(s.client.open(input), Ok(Some(_))) {
                    accepted += 1;
                }
                open_as_received(s, input)?;
                open_sealed(s, input, i / SUITES.len())?;
            }
            Ok(())
        })?
    });
    assert!(n > 0);
    // The unmutated sealed answers of the corpus opened: the session part ran for real.
    assert!(accepted > 0);
}

// ---------------------------------------------------------------------------------------
// IPMI, the BMC's side
// ---------------------------------------------------------------------------------------

/// A responder, and a session with it that the driver's handshake set up (set up again
/// whenever an input closed it or crowded it out).
struct FuzzBmc {
    suite: CipherSuite,
    responder: Responder,
    chassis: MemoryChassis,
    client: Session,
}

impl FuzzBmc {
    fn new(suite: CipherSuite) -> Self {
        let mut responder = Responder::new(USER, PASSWORD, GUID).unwrap();
        let mut chassis = MemoryChassis::default();
        let client = connect(suite, &mut responder, &mut chassis);
        Self {
            suite,
            responder,
            chassis,
            client,
        }
    }

    fn ask(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        self.responder.handle(packet, &mut self.chassis)
    }

    /// A session being set up: its id, after Open Session (and RAKP 1 for `rakp3`).
    fn pending(&mut self, rakp3: bool) -> Result<u32, String> {
        let open = OpenSessionRequest {
            tag: 0,
            max_privilege: 0,
            console_session_id: CONSOLE_SID,
            algorithms: self.suite.algorithms(),
        };
        let answer = self
            .ask(&v20(PayloadType::OpenSessionRequest, &open.emit()))
            .ok_or("no answer to a valid Open Session")?;
        let Ok(Packet::V20(p)) = wire::parse_packet(&answer, 0) else {
            return Err("the Open Session answer does not parse".into());
        };
        let sid = OpenSessionResponse::parse(p.payload)
            .map_err(|e| format!("our Open Session answer: {e}"))?
            .managed_session_id;
        if rakp3 {
            let r1 = Rakp1 {
                tag: 0,
                managed_session_id: sid,
                console_random: RM,
                role: ROLE,
                username: USER.to_vec(),
            };
            self.ask(&v20(PayloadType::Rakp1, &r1.emit()))
                .ok_or("no answer to a valid RAKP 1")?;
        }
        Ok(sid)
    }
}

fn connect(suite: CipherSuite, r: &mut Responder, chassis: &mut MemoryChassis) -> Session {
    let mut hs = Handshake::new(suite, PRIVILEGE, USER, PASSWORD, CONSOLE_SID, RM).unwrap();
    let mut out = hs.start();
    loop {
        let answer = r
            .handle(&out, chassis)
            .expect("the responder answers the driver");
        match hs.handle(&answer) {
            Ok(Some(Next::Send(p))) => out = p,
            Ok(Some(Next::Established(s))) => return s,
            other => panic!("the driver's handshake with the responder: {other:?}"),
        }
    }
}

fn bmc_one(b: &mut FuzzBmc, input: &[u8]) -> Result<(), String> {
    // As received: whatever answers must be a packet.
    if let Some(answer) = b.ask(input) {
        wire::parse_packet(&answer, b.suite.integrity_len())
            .map_err(|e| format!("our answer does not parse: {e}"))?;
    }
    // A RAKP 1 or 3 payload addressed to a session being set up.
    if let Ok(Packet::V20(p)) = wire::parse_packet(input, 0)
        && matches!(p.payload_type, PayloadType::Rakp1 | PayloadType::Rakp3)
        && p.payload.len() >= 8
    {
        let kind = p.payload_type;
        let mut payload = p.payload.to_vec();
        let sid = b.pending(kind == PayloadType::Rakp3)?;
        payload[4..8].copy_from_slice(&sid.to_le_bytes());
        if let Some(answer) = b.ask(&v20(kind, &payload)) {
            wire::parse_packet(&answer, 0).map_err(|e| format!("our RAKP answer: {e}"))?;
        }
    }
    // Sealed in the live session, as an IPMI message.
    if b.responder.open_sessions() == 0 {
        b.client = connect(b.suite, &mut b.responder, &mut b.chassis);
    }
    let sealed = b.client.seal(input, IV);
    match b.ask(&sealed) {
        Some(answer) => {
            let payload = b
                .client
                .open(&answer)
                .map_err(|e| format!("our sealed answer: {e}"))?
                .ok_or("our sealed answer does not authenticate")?;
            IpmiResponse::parse(&payload).map_err(|e| format!("our response: {e}"))?;
        }
        None if IpmiRequest::parse(input).is_ok() => {
            return Err("a well-formed sealed request got no answer".into());
        }
        None => {}
    }
    Ok(())
}

#[test]
fn ipmi_requests_from_raw_bytes() {
    let mut bmcs = SUITES.map(FuzzBmc::new);
    let mut i = 0usize;
    let n = drive_with("ipmi-bmc", mutate_ipmi, |input| {
        i += 1;
        let b = &mut bmcs[i % SUITES.len()];
        caught(|| bmc_one(b, input))?
    });
    assert!(n > 0);
    for b in &bmcs {
        let (r, d) = (&b.responder, b.responder.dropped);
        // The run reached the handshake, the sessions and the drop reasons.
        assert!(r.established > 1, "{}", r.established);
        assert!(d.malformed > 0 && d.unknown_session > 0, "{d:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Redfish
// ---------------------------------------------------------------------------------------

const BASE: &str = "http://10.0.0.6:8000";
const SYSTEM: &str = "/redfish/v1/Systems/1";

/// A path the BMC names: refused, or a path whose URL stays on the BMC's host.
fn check_path(named: &str) -> Result<(), String> {
    let Some(path) = service_path(BASE, named) else {
        return Ok(());
    };
    if !path.starts_with('/') {
        return Err(format!("{named:?} taken as {path:?}, not an absolute path"));
    }
    if let Ok(uri) = format!("{BASE}{path}").parse::<ureq::http::Uri>()
        && uri.authority().map(|a| a.as_str()) != Some("10.0.0.6:8000")
    {
        return Err(format!("{named:?} leads to {uri}, another host"));
    }
    Ok(())
}

fn read_system(v: &Value) -> Result<(), String> {
    let _ = power_state(v);
    let action = reset_action(SYSTEM, v);
    check_path(&action.target)?;
    if let Some(allowed) = &action.allowed {
        let _ = allowed.iter().any(|a| a == "ForceRestart");
    }
    let boot = BootOverride::from_system(&v["Boot"]);
    let _ = boot.to_string();
    Ok(())
}

fn read_body(body: &str) -> Result<(), String> {
    let _ = excerpt(body);
    let Ok(v) = parse_body(body) else {
        return Ok(());
    };
    if let Some(member) = first_member(&v) {
        check_path(member)?;
    }
    read_system(&v)?;
    if let Some(members) = v["Members"].as_array() {
        for m in members.iter().take(4) {
            read_system(m)?;
        }
    }
    Ok(())
}

fn redfish_one(input: &[u8]) -> Result<(), String> {
    // What the driver reads: ureq's `read_to_string` fails on bytes that are not UTF-8, and
    // the body is then empty. The lossy text as well, for the JSON around such bytes.
    read_body(std::str::from_utf8(input).unwrap_or(""))?;
    if std::str::from_utf8(input).is_err() {
        read_body(&String::from_utf8_lossy(input))?;
    }
    Ok(())
}

/// Values a BMC could put anywhere: wrong types, edge numbers, odd strings, and paths
/// that try to leave the service.
fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(1e308),
        5 => json!(""),
        6 => json!("On"),
        7 => json!("PoweringOff"),
        8 => json!("x".repeat(rng.below(400))),
        9 => json!("\u{0}\u{7f}\u{feff}\u{1F600}"),
        10 => json!("@evil.example/redfish/v1/Systems/1"),
        11 => json!("http://10.0.0.6:8000@evil.example/x"),
        12 => json!(format!("{BASE}{SYSTEM}")),
        13 => json!([]),
        14 => json!({}),
        _ => {
            let mut v = json!("deep");
            for _ in 0..rng.below(140) {
                v = json!([v]);
            }
            v
        }
    }
}

const KEYS: &[&str] = &[
    "Members",
    "@odata.id",
    "PowerState",
    "Boot",
    "BootSourceOverrideTarget",
    "BootSourceOverrideEnabled",
    "BootSourceOverrideMode",
    "Actions",
    "#ComputerSystem.Reset",
    "target",
    "ResetType@Redfish.AllowableValues",
    "error",
    "message",
    "@Message.ExtendedInfo",
    "Message",
    "MessageId",
];

/// Replaces, adds or removes one node somewhere in the tree.
fn mutate_tree(rng: &mut Rng, v: &mut Value, depth: usize) {
    let descend = rng.below(3) != 0 && depth < 6;
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let i = rng.below(map.len());
            if let Some((_, child)) = map.iter_mut().nth(i) {
                mutate_tree(rng, child, depth + 1);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.below(items.len());
            mutate_tree(rng, &mut items[i], depth + 1);
        }
        Value::Object(map) => match rng.below(3) {
            0 if !map.is_empty() => {
                let key = map.keys().nth(rng.below(map.len())).cloned();
                if let Some(key) = key {
                    map.remove(&key);
                }
            }
            _ => {
                map.insert(KEYS[rng.below(KEYS.len())].to_string(), odd_value(rng));
            }
        },
        Value::Array(items) if rng.below(2) == 0 => items.push(odd_value(rng)),
        _ => *v = odd_value(rng),
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "null",
    "1e999",
    "-0",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\u{feff}",
    "\u{1F600}",
    "\"On\"",
    "\"Members\"",
    "\"@odata.id\"",
];

fn mutate_json(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = &seeds[rng.below(seeds.len())];
    match rng.below(6) {
        0 => mutate(rng, seeds),
        1 => {
            let mut p = seed.clone();
            for _ in 0..=rng.below(3) {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let at = rng.below(p.len() + 1);
                p.splice(at..at, token.iter().copied());
            }
            p
        }
        2 => {
            // Nesting around the serde_json limit of 128.
            let n = [100, 126, 127, 128, 129, 20_000][rng.below(6)];
            let mut p = "[".repeat(n).into_bytes();
            p.extend_from_slice(seed);
            p.extend("]".repeat(rng.below(n + 1)).bytes());
            p
        }
        _ => match serde_json::from_slice::<Value>(seed) {
            Ok(mut v) => {
                for _ in 0..=rng.below(3) {
                    mutate_tree(rng, &mut v, 0);
                }
                serde_json::to_vec(&v).unwrap()
            }
            Err(_) => mutate(rng, seeds),
        },
    }
}

#[test]
fn redfish_answers_from_raw_bytes() {
    let n = drive_with("redfish", mutate_json, |input| {
        caught(|| redfish_one(input))?
    });
    assert!(n > 0);
}

// ---------------------------------------------------------------------------------------
// The corpus, generated from the code's own encoders
// ---------------------------------------------------------------------------------------

fn ipmi_corpus() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| out.push((format!("{name}.bin"), bytes));
    let caps = auth_capabilities(0, &CAPS_IPMI20).emit();
    add("auth-capabilities", wire::emit_v15_sessionless(&caps));
    add("auth-capabilities-v20", v20(PayloadType::Ipmi, &caps));
    // IPMI 1.5 only: no extended data.
    add(
        "auth-capabilities-ipmi15",
        wire::emit_v15_sessionless(
            &auth_capabilities(0, &[0x01, 0x04, 0x04, 0, 0, 0, 0, 0]).emit(),
        ),
    );
    add(
        "auth-capabilities-c1",
        wire::emit_v15_sessionless(&auth_capabilities(0xC1, &[]).emit()),
    );
    for suite in SUITES {
        let id = suite.id();
        let [_, open, rakp2, rakp4] = bmc_answers(suite);
        add(&format!("open-session-suite{id}"), open);
        add(&format!("rakp2-suite{id}"), rakp2);
        add(&format!("rakp4-suite{id}"), rakp4);
    }
    // ipmi_sim refuses a suite with just the tag and the status.
    add(
        "open-session-refused-short",
        v20(PayloadType::OpenSessionResponse, &[0, 0x04]),
    );
    let refused = OpenSessionResponse {
        tag: 0,
        status: RmcpStatus::NO_CIPHER_SUITE_MATCH,
        max_privilege: 0,
        console_session_id: CONSOLE_SID,
        managed_session_id: 0,
        algorithms: CipherSuite::Suite3.algorithms(),
    };
    add(
        "open-session-refused",
        v20(PayloadType::OpenSessionResponse, &refused.emit()),
    );
    let rakp2_refused = Rakp2 {
        tag: 0,
        status: RmcpStatus::UNAUTHORIZED_NAME,
        console_session_id: CONSOLE_SID,
        managed_random: [0; 16],
        managed_guid: [0; 16],
        auth_code: Vec::new(),
    };
    add(
        "rakp2-unauthorized-name",
        v20(PayloadType::Rakp2, &rakp2_refused.emit()),
    );
    let rakp4_refused = Rakp4 {
        tag: 0,
        status: RmcpStatus::INVALID_INTEGRITY_CHECK_VALUE,
        console_session_id: CONSOLE_SID,
        integrity_check: Vec::new(),
    };
    add(
        "rakp4-invalid-icv",
        v20(PayloadType::Rakp4, &rakp4_refused.emit()),
    );
    // Answers in the session, sealed with its keys.
    let reqs = session_requests();
    let answers: [(&str, usize, u8, &[u8]); 8] = [
        ("set-privilege", 0, 0, &[0x03]),
        ("chassis-status-on", 1, 0, &[0x01, 0x00, 0x00, 0x00]),
        ("chassis-status-fault", 1, 0, &[0x19, 0x00, 0x00]),
        ("chassis-control", 2, 0, &[]),
        ("chassis-control-d4", 2, 0xD4, &[]),
        ("set-boot-options-80", 3, 0x80, &[]),
        ("boot-flags", 4, 0, &[0x01, 0x05, 0xA0, 0x04, 0, 0, 0]),
        ("close-session", 5, 0, &[]),
    ];
    for suite in SUITES {
        let mut bmc = Session::for_bmc(keys(suite), CONSOLE_SID, MANAGED_SID);
        for (name, i, completion, data) in answers {
            let req = &reqs[i];
            let resp = IpmiResponse {
                netfn: req.netfn + 1,
                cmd: req.cmd,
                rq_seq: req.rq_seq,
                completion,
                data: data.to_vec(),
            };
            add(
                &format!("{name}-suite{}", suite.id()),
                bmc.seal(&resp.emit(), IV),
            );
        }
    }
    out
}

/// What the driver sends a BMC, each step of a session of each suite.
fn ipmi_bmc_corpus() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| out.push((format!("{name}.bin"), bytes));
    let mut hs = Handshake::new(
        CipherSuite::Suite3,
        PRIVILEGE,
        USER,
        PASSWORD,
        CONSOLE_SID,
        RM,
    )
    .unwrap();
    add("auth-capabilities", hs.start());
    let rakp1 = Rakp1 {
        tag: 0,
        managed_session_id: MANAGED_SID,
        console_random: RM,
        role: ROLE,
        username: USER.to_vec(),
    };
    add("rakp1", v20(PayloadType::Rakp1, &rakp1.emit()));
    for suite in SUITES {
        let id = suite.id();
        let open = OpenSessionRequest {
            tag: 0,
            max_privilege: 0,
            console_session_id: CONSOLE_SID,
            algorithms: suite.algorithms(),
        };
        add(
            &format!("open-session-suite{id}"),
            v20(PayloadType::OpenSessionRequest, &open.emit()),
        );
        let rakp3 = Rakp3 {
            tag: 0,
            status: RmcpStatus::OK,
            managed_session_id: MANAGED_SID,
            auth_code: transcript().rakp3_auth_code(suite, PASSWORD),
        };
        add(
            &format!("rakp3-suite{id}"),
            v20(PayloadType::Rakp3, &rakp3.emit()),
        );
        let mut client = established(suite);
        for req in session_requests() {
            add(
                &format!("request-{:02x}-{:02x}-suite{id}", req.netfn, req.cmd),
                client.seal(&req.emit(), IV),
            );
        }
    }
    // The bare messages: the fuzzer seals them in a live session.
    for req in session_requests() {
        add(
            &format!("message-{:02x}-{:02x}", req.netfn, req.cmd),
            req.emit(),
        );
    }
    out
}

fn redfish_corpus() -> Vec<(String, Vec<u8>)> {
    let system = |power: &str, mode: &str| {
        json!({
            "@odata.id": SYSTEM,
            "Id": "1",
            "Name": "fuzz-node",
            "PowerState": power,
            "Boot": {
                "BootSourceOverrideTarget": "Pxe",
                "BootSourceOverrideEnabled": "Once",
                "BootSourceOverrideMode": mode,
                "BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd"],
            },
            "Actions": {
                "#ComputerSystem.Reset": {
                    "target": format!("{SYSTEM}/Actions/ComputerSystem.Reset"),
                    "ResetType@Redfish.AllowableValues":
                        ["On", "ForceOff", "GracefulShutdown", "ForceRestart"],
                },
            },
        })
    };
    let seeds: Vec<(&str, Value)> = vec![
        (
            "systems",
            json!({
                "@odata.id": "/redfish/v1/Systems",
                "Members": [{ "@odata.id": SYSTEM }],
                "Members@odata.count": 1,
            }),
        ),
        ("system-on", system("On", "UEFI")),
        ("system-off-legacy", system("Off", "Legacy")),
        (
            "system-powering-on-absolute-target",
            json!({
                "@odata.id": SYSTEM,
                "PowerState": "PoweringOn",
                "Boot": { "BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Continuous" },
                "Actions": { "#ComputerSystem.Reset": {
                    "target": format!("{BASE}{SYSTEM}/Actions/ComputerSystem.Reset"),
                }},
            }),
        ),
        ("system-bare", json!({ "@odata.id": SYSTEM, "Id": "1" })),
        // Appended to the base URL, this target names another host: refused.
        (
            "system-reset-target-other-host",
            json!({
                "@odata.id": SYSTEM,
                "PowerState": "On",
                "Actions": { "#ComputerSystem.Reset": { "target": "@evil.example/reset" }},
            }),
        ),
        (
            "error-extended-info",
            json!({ "error": {
                "code": "Base.1.0.GeneralError",
                "message": "Power state Bogus is not supported",
                "@Message.ExtendedInfo": [{ "MessageId": "Base.1.0.GeneralError" }],
            }}),
        ),
        (
            "error-message-id-only",
            json!({ "error": { "@Message.ExtendedInfo": [{
                "MessageId": "Base.1.8.InsufficientPrivilege",
                "Message": "There are insufficient privileges for the account",
            }]}}),
        ),
    ];
    let mut out: Vec<(String, Vec<u8>)> = seeds
        .into_iter()
        .map(|(name, v)| {
            (
                format!("{name}.bin"),
                serde_json::to_vec_pretty(&v).unwrap(),
            )
        })
        .collect();
    out.push(("empty.bin".into(), Vec::new()));
    out.push((
        "html-502.bin".into(),
        b"<html><head><title>502 Bad Gateway</title></head>\n<body><h1>502 Bad Gateway</h1></body></html>\n"
            .to_vec(),
    ));
    out
}

#[test]
fn corpus_is_current() {
    for (kind, seeds) in [
        ("ipmi", ipmi_corpus()),
        ("ipmi-bmc", ipmi_bmc_corpus()),
        ("redfish", redfish_corpus()),
    ] {
        fuzz_common::check_corpus(kind, "fuzz_bmc corpus_is_current", seeds);
    }
}

/// The replayed handshake really reaches each step, for both suites, so the fuzzing above
/// drives `handle` in every state and not only the first.
#[test]
fn handshake_harness_reaches_every_step() {
    for suite in SUITES {
        let answers = bmc_answers(suite);
        for (step, want) in [
            Step::AuthCapabilities,
            Step::OpenSession,
            Step::Rakp1,
            Step::Rakp3,
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(handshake_at(suite, &answers, step).step(), want);
        }
        assert_eq!(established(suite).managed_session_id(), MANAGED_SID);
    }
}
