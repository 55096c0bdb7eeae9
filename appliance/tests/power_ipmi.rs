//! The IPMI driver against OpenIPMI's `ipmi_sim` on the loopback (Debian `openipmi`),
//! checked against `ipmitool -I lanplus` (Debian `ipmitool`): on, off, cycle, status,
//! boot device, privilege, wrong credentials, unreachable BMC.
//!
//! `ipmi_sim` 2.0.33 does not offer cipher suite 17 (no SHA-256: it answers Open Session
//! with "invalid authentication algorithm", to ipmitool too). So suite 17 is tested twice:
//! the refusal against ipmi_sim gives a clear error, and a small BMC in this file, built on
//! the driver's own sans-IO session code, is first checked with `ipmitool -C 17` (an
//! independent implementation of the SHA-256 RAKP, keys, integrity and AES) and then
//! driven by the driver.

use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stork::power::ipmi::crypto::{CipherSuite, RakpTranscript};
use stork::power::ipmi::session::Session;
use stork::power::ipmi::wire::{
    self, IpmiRequest, IpmiResponse, OpenSessionRequest, OpenSessionResponse, Packet, PayloadType,
    Rakp1, Rakp2, Rakp3, Rakp4, RmcpStatus,
};
use stork::power::ipmi::{IpmiCipherSuite, IpmiPrivilege};
use stork::power::{BootDevice, IpmiParams, PowerDriver, PowerError, PowerParams, PowerState};
use stork_lab::bmc::{
    ADMIN_PASSWORD, ADMIN_USER, IpmiSim, IpmiSimSpec, OPERATOR_PASSWORD, OPERATOR_USER,
    free_udp_port,
};

fn tools_present() {
    for tool in ["ipmi_sim", "ipmitool"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is missing: apt-get install openipmi ipmitool (or `cargo xtask deps`)"
        );
    }
}

/// A recorder BMC on a free loopback port, in a temporary directory.
fn sim(name: &str) -> (IpmiSim, tempfile::TempDir) {
    tools_present();
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = free_udp_port().expect("a free UDP port");
    let sim = IpmiSim::start_local(dir.path(), IpmiSimSpec::new(name, port))
        .unwrap_or_else(|e| panic!("cannot start ipmi_sim: {e:#}"));
    (sim, dir)
}

fn params(port: u16, user: &str, password: &str, suite: IpmiCipherSuite) -> IpmiParams {
    let mut p = IpmiParams::new("127.0.0.1", user, password);
    p.port = port;
    p.cipher_suite = suite;
    p.timeout_ms = 1000;
    p.attempts = 3;
    p
}

fn admin(port: u16, suite: IpmiCipherSuite) -> PowerDriver {
    let mut p = params(port, ADMIN_USER, ADMIN_PASSWORD, suite);
    p.privilege = IpmiPrivilege::Administrator;
    PowerDriver::new(PowerParams::Ipmi(p))
}

fn operator(port: u16, suite: IpmiCipherSuite) -> PowerDriver {
    PowerDriver::new(PowerParams::Ipmi(params(
        port,
        OPERATOR_USER,
        OPERATOR_PASSWORD,
        suite,
    )))
}

/// What `ipmitool chassis power status` says: `Some(true)` for on.
fn ipmitool_power(sim: &IpmiSim) -> bool {
    let out = sim
        .ipmitool(&["chassis", "power", "status"])
        .expect("ipmitool chassis power status");
    match out.trim() {
        "Chassis Power is on" => true,
        "Chassis Power is off" => false,
        other => panic!("unexpected ipmitool answer {other:?}"),
    }
}

async fn wait_state(d: &PowerDriver, want: PowerState) {
    d.wait_for(want, Duration::from_secs(10), Duration::from_millis(200))
        .await
        .unwrap_or_else(|e| panic!("waiting for {want}: {e}"));
}

#[tokio::test]
async fn power_on_off_cycle_and_status_agree_with_ipmitool() {
    let (sim, _dir) = sim("onoff");
    let d = operator(sim.port, IpmiCipherSuite::Suite3);

    assert_eq!(d.query().await.unwrap(), PowerState::Off);
    assert!(!ipmitool_power(&sim));

    d.power_on().await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::On);
    assert!(ipmitool_power(&sim), "ipmitool disagrees after power on");
    assert!(sim.power_is_on());

    d.power_off(false).await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::Off);
    assert!(!ipmitool_power(&sim), "ipmitool disagrees after power off");

    // Cycle from off powers on.
    d.power_cycle().await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::On);

    // Cycle from on: ipmi_sim powers down, then up again after its 1 s timer.
    let calls_before = sim.calls().lines().count();
    d.power_cycle().await.unwrap();
    wait_state(&d, PowerState::On).await;
    let tail: Vec<String> = sim
        .calls()
        .lines()
        .skip(calls_before)
        .map(|l| l.split_once(' ').map(|x| x.1).unwrap_or(l).to_string())
        .filter(|l| l.starts_with("set"))
        .collect();
    assert_eq!(
        tail,
        ["set power 0", "set power 1"],
        "calls: {}",
        sim.calls()
    );
    assert!(ipmitool_power(&sim));

    // Soft off is the ACPI request (Chassis Control 5): ipmi_sim passes `set shutdown 1`.
    d.power_off(true).await.unwrap();
    assert!(sim.calls().contains("set shutdown 1"), "{}", sim.calls());
    assert_eq!(d.query().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn ipmitool_changes_are_seen_by_the_driver() {
    let (sim, _dir) = sim("seen");
    let d = admin(sim.port, IpmiCipherSuite::Suite3);
    sim.ipmitool(&["chassis", "power", "on"]).unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::On);
    sim.ipmitool(&["chassis", "power", "off"]).unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn boot_device_is_set_and_read_back() {
    let (sim, _dir) = sim("boot");
    let d = operator(sim.port, IpmiCipherSuite::Suite3);

    d.set_boot_device(BootDevice::Pxe, false, true)
        .await
        .unwrap();
    assert_eq!(sim.boot(), "pxe");
    let out = sim.ipmitool(&["chassis", "bootparam", "get", "5"]).unwrap();
    assert!(out.contains("Boot Device Selector : Force PXE"), "{out}");

    d.set_boot_device(BootDevice::Disk, true, false)
        .await
        .unwrap();
    assert_eq!(sim.boot(), "default");
    let out = sim.ipmitool(&["chassis", "bootparam", "get", "5"]).unwrap();
    assert!(
        out.contains("Boot Device Selector : Force Boot from default Hard-Drive"),
        "{out}"
    );

    // ipmitool's change is what the driver reads.
    sim.ipmitool(&["chassis", "bootdev", "pxe"]).unwrap();
    let PowerDriver::Ipmi(ipmi) = &d else {
        unreachable!()
    };
    let flags = ipmi.boot_flags().await.unwrap();
    assert_eq!(flags.device, wire::BOOT_DEVICE_PXE);
    // ipmi_sim reports the device only: data 1 (valid, persistent, EFI) is always zero.
    assert!(!flags.valid && !flags.persistent && !flags.efi);
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_clear_errors() {
    let (sim, _dir) = sim("creds");
    let started = Instant::now();
    let d = PowerDriver::new(PowerParams::Ipmi(params(
        sim.port,
        ADMIN_USER,
        "not-the-password",
        IpmiCipherSuite::Suite3,
    )));
    let e = d.query().await.unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.code(), "bmc_credentials", "{msg}");
    assert!(msg.contains("BMC rejected the credentials"), "{msg}");
    assert!(msg.contains("wrong password"), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");
    // Rejected at once, not after retries.
    assert!(started.elapsed() < Duration::from_secs(2));

    let d = PowerDriver::new(PowerParams::Ipmi(params(
        sim.port,
        "nobody",
        "whatever",
        IpmiCipherSuite::Suite3,
    )));
    let e = d.query().await.unwrap_err();
    assert_eq!(e.code(), "bmc_credentials", "{e}");
    assert!(e.to_string().contains("unauthorized name"), "{e}");

    // The driver left no stale state behind: the right password still works.
    assert_eq!(
        operator(sim.port, IpmiCipherSuite::Suite3)
            .query()
            .await
            .unwrap(),
        PowerState::Off
    );
}

#[tokio::test]
async fn operator_default_and_administrator_both_control_the_chassis() {
    let (sim, _dir) = sim("priv");
    // Operator (the default) is enough for chassis control and boot options...
    let op = operator(sim.port, IpmiCipherSuite::Suite3);
    op.power_on().await.unwrap();
    op.set_boot_device(BootDevice::Pxe, false, false)
        .await
        .unwrap();
    // ...and Administrator may be asked for.
    let adm = admin(sim.port, IpmiCipherSuite::Suite3);
    adm.power_off(false).await.unwrap();
    assert_eq!(op.query().await.unwrap(), PowerState::Off);
    // ipmi_sim 2.0.33 does not enforce per-user privilege limits: an Operator user is
    // granted Administrator (ipmitool -L ADMINISTRATOR sees the same). Real BMCs answer
    // Set Session Privilege Level with 0x81, which the driver reports with its meaning.
    let mut p = params(
        sim.port,
        OPERATOR_USER,
        OPERATOR_PASSWORD,
        IpmiCipherSuite::Suite3,
    );
    p.privilege = IpmiPrivilege::Administrator;
    assert!(PowerDriver::new(PowerParams::Ipmi(p)).query().await.is_ok());
}

#[tokio::test]
async fn unreachable_bmc_times_out_with_a_clear_error() {
    // A socket that never answers: the driver must give up after attempts x timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut p = params(port, ADMIN_USER, ADMIN_PASSWORD, IpmiCipherSuite::Suite3);
    p.timeout_ms = 300;
    p.attempts = 2;
    let d = PowerDriver::new(PowerParams::Ipmi(p));
    let started = Instant::now();
    let e = d.power_on().await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(e.code(), "bmc_unreachable");
    assert_eq!(
        e.to_string(),
        format!(
            "IPMI BMC 127.0.0.1:{port} did not answer Get Channel Authentication Capabilities \
             after 2 attempts of 300 ms"
        )
    );
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // Nothing listening: the ICMP port-unreachable is named, still after the timeout.
    drop(silent);
    let mut p = params(port, ADMIN_USER, ADMIN_PASSWORD, IpmiCipherSuite::Suite3);
    p.timeout_ms = 200;
    p.attempts = 2;
    let started = Instant::now();
    let e = PowerDriver::new(PowerParams::Ipmi(p))
        .query()
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(e.to_string().contains("ICMP port unreachable"), "{e}");
}

/// A UDP relay to `target` that drops the client datagrams whose 1-based numbers are in
/// `drop`: lost packets without a lossy network.
fn lossy_relay(target: u16, drop: &'static [usize]) -> (u16, Arc<Mutex<usize>>) {
    let front = UdpSocket::bind("127.0.0.1:0").expect("relay socket");
    let back = UdpSocket::bind("127.0.0.1:0").expect("relay socket");
    back.connect(("127.0.0.1", target)).expect("relay connect");
    front
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    back.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let port = front.local_addr().expect("relay address").port();
    let seen = Arc::new(Mutex::new(0usize));
    let counter = seen.clone();
    std::thread::spawn(move || {
        let mut client = None;
        let mut buf = [0u8; 2048];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok((n, from)) = front.recv_from(&mut buf) {
                client = Some(from);
                let mut c = counter.lock().unwrap_or_else(|e| e.into_inner());
                *c += 1;
                if !drop.contains(&*c) {
                    let _ = back.send(&buf[..n]);
                }
            }
            if let (Ok(n), Some(to)) = (back.recv(&mut buf), client) {
                let _ = front.send_to(&buf[..n], to);
            }
        }
    });
    (port, seen)
}

#[tokio::test]
async fn lost_datagrams_are_retransmitted() {
    let (sim, _dir) = sim("lossy");
    // Datagram 1 is Get Channel Authentication Capabilities (a handshake step); 6 is Get
    // Chassis Status, after auth caps, Open Session, RAKP 1, RAKP 3 and Set Session
    // Privilege Level (a sealed session request, resent with a new session sequence).
    let (port, seen) = lossy_relay(sim.port, &[1, 6]);
    let mut p = params(
        port,
        OPERATOR_USER,
        OPERATOR_PASSWORD,
        IpmiCipherSuite::Suite3,
    );
    p.timeout_ms = 300;
    let d = PowerDriver::new(PowerParams::Ipmi(p));
    assert_eq!(d.query().await.unwrap(), PowerState::Off);
    // Two retransmissions, and Close Session at the end: 7 + 2 datagrams.
    assert_eq!(*seen.lock().unwrap(), 9);
}

/// ipmi_sim 2.0.33 has no SHA-256: both ipmitool and the driver are refused, and the
/// driver says so.
#[tokio::test]
async fn suite_17_refusal_by_ipmi_sim_is_a_clear_error() {
    let (sim, _dir) = sim("suite17");
    let d = admin(sim.port, IpmiCipherSuite::Suite17);
    let e = d.query().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "IPMI BMC 127.0.0.1:{} (user admin, cipher suite 17): BMC refused cipher suite \
             17: RMCP+ Open Session answered 0x04 invalid authentication algorithm",
            sim.port
        )
    );
    let out = std::process::Command::new("ipmitool")
        .args([
            "-I",
            "lanplus",
            "-C",
            "17",
            "-N",
            "1",
            "-R",
            "1",
            "-H",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &sim.port.to_string(),
            "-U",
            ADMIN_USER,
            "-P",
            ADMIN_PASSWORD,
        ])
        .args(["chassis", "power", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid authentication algorithm"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Cipher suite 17: a minimal BMC on the driver's sans-IO code, proven with ipmitool.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct ChassisState {
    power: bool,
    boot: [u8; 5],
}

/// Serves one IPMI 2.0 BMC on a loopback UDP socket on a thread: channel capabilities,
/// Open Session, RAKP, and the chassis commands. Only suite 17 is offered.
struct TestBmc {
    port: u16,
    state: Arc<Mutex<ChassisState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TestBmc {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Pending {
    console_sid: u32,
    managed_sid: u32,
    rm: [u8; 16],
    rc: [u8; 16],
    role: u8,
    user: Vec<u8>,
}

const TEST_GUID: [u8; 16] = *b"stork-test-bmc!!";

fn test_bmc(user: &'static str, password: &'static str) -> TestBmc {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("binding the test BMC");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("socket timeout");
    let port = sock.local_addr().expect("test BMC address").port();
    let state = Arc::new(Mutex::new(ChassisState::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (st, sp) = (state.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let suite = CipherSuite::Suite17;
        let mut pending: Option<Pending> = None;
        let mut sessions: Vec<(u32, Session)> = Vec::new();
        let mut next_sid = 0x1000_0000u32;
        let mut buf = [0u8; 1024];
        while !sp.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let pkt = &buf[..n];
            let reply = |p: Vec<u8>| {
                let _ = sock.send_to(&p, peer);
            };
            match wire::parse_packet(pkt, 0) {
                Ok(Packet::V15 { message }) => {
                    let Ok(req) = IpmiRequest::parse(message) else {
                        continue;
                    };
                    if req.cmd == wire::cmd::GET_CHANNEL_AUTH_CAPABILITIES {
                        let resp = IpmiResponse {
                            netfn: req.netfn + 1,
                            cmd: req.cmd,
                            rq_seq: req.rq_seq,
                            completion: 0,
                            // channel 1; IPMI 2.0 extended data; user-level auth; v2.0.
                            data: vec![0x01, 0x80, 0x04, 0x02, 0, 0, 0, 0],
                        };
                        reply(wire::emit_v15_sessionless(&resp.emit()));
                    }
                    continue;
                }
                Ok(Packet::V20(p)) if p.payload_type == PayloadType::OpenSessionRequest => {
                    let Ok(req) = OpenSessionRequest::parse(p.payload) else {
                        continue;
                    };
                    let ok = req.algorithms == suite.algorithms();
                    next_sid += 1;
                    let resp = OpenSessionResponse {
                        tag: req.tag,
                        status: if ok {
                            RmcpStatus::OK
                        } else {
                            RmcpStatus::INVALID_AUTH_ALGORITHM
                        },
                        max_privilege: 4,
                        console_session_id: req.console_session_id,
                        managed_session_id: next_sid,
                        algorithms: req.algorithms,
                    };
                    if ok {
                        pending = Some(Pending {
                            console_sid: req.console_session_id,
                            managed_sid: next_sid,
                            rm: [0; 16],
                            rc: [0; 16],
                            role: 0,
                            user: Vec::new(),
                        });
                    }
                    reply(wire::emit_v20(
                        PayloadType::OpenSessionResponse,
                        false,
                        0,
                        0,
                        &resp.emit(),
                        None,
                    ));
                    continue;
                }
                Ok(Packet::V20(p)) if p.payload_type == PayloadType::Rakp1 => {
                    let Ok(r1) = Rakp1::parse(p.payload) else {
                        continue;
                    };
                    let Some(pd) = pending.as_mut() else { continue };
                    pd.rm = r1.console_random;
                    pd.rc = rand::random();
                    pd.role = r1.role;
                    pd.user = r1.username.clone();
                    let known = r1.username == user.as_bytes();
                    let t = RakpTranscript {
                        console_session_id: pd.console_sid,
                        managed_session_id: pd.managed_sid,
                        console_random: pd.rm,
                        managed_random: pd.rc,
                        managed_guid: TEST_GUID,
                        role: pd.role,
                        username: &pd.user,
                    };
                    let r2 = Rakp2 {
                        tag: r1.tag,
                        status: if known {
                            RmcpStatus::OK
                        } else {
                            RmcpStatus::UNAUTHORIZED_NAME
                        },
                        console_session_id: pd.console_sid,
                        managed_random: pd.rc,
                        managed_guid: TEST_GUID,
                        auth_code: t.rakp2_auth_code(suite, password.as_bytes()),
                    };
                    reply(wire::emit_v20(
                        PayloadType::Rakp2,
                        false,
                        0,
                        0,
                        &r2.emit(),
                        None,
                    ));
                    continue;
                }
                Ok(Packet::V20(p)) if p.payload_type == PayloadType::Rakp3 => {
                    let Ok(r3) = Rakp3::parse(p.payload) else {
                        continue;
                    };
                    let Some(pd) = pending.take() else { continue };
                    let t = RakpTranscript {
                        console_session_id: pd.console_sid,
                        managed_session_id: pd.managed_sid,
                        console_random: pd.rm,
                        managed_random: pd.rc,
                        managed_guid: TEST_GUID,
                        role: pd.role,
                        username: &pd.user,
                    };
                    if r3.status != RmcpStatus::OK {
                        continue; // the console gave up (e.g. our RAKP 2 did not verify)
                    }
                    let ok = r3.auth_code == t.rakp3_auth_code(suite, password.as_bytes());
                    let keys = t.session_keys(suite, password.as_bytes());
                    let r4 = Rakp4 {
                        tag: r3.tag,
                        status: if ok {
                            RmcpStatus::OK
                        } else {
                            RmcpStatus::INVALID_INTEGRITY_CHECK_VALUE
                        },
                        console_session_id: pd.console_sid,
                        integrity_check: keys.rakp4_icv(&pd.rm, pd.managed_sid, &TEST_GUID),
                    };
                    reply(wire::emit_v20(
                        PayloadType::Rakp4,
                        false,
                        0,
                        0,
                        &r4.emit(),
                        None,
                    ));
                    if ok {
                        sessions.push((
                            pd.managed_sid,
                            Session::for_bmc(keys, pd.console_sid, pd.managed_sid),
                        ));
                    }
                    continue;
                }
                _ => {}
            }
            // A session message: find the session by its id, open, answer.
            let Ok(Packet::V20(p)) = wire::parse_packet(pkt, suite.integrity_len()) else {
                continue;
            };
            let Some(idx) = sessions.iter().position(|(id, _)| *id == p.session_id) else {
                continue;
            };
            let Ok(Some(payload)) = sessions[idx].1.open(pkt) else {
                continue;
            };
            let Ok(req) = IpmiRequest::parse(&payload) else {
                continue;
            };
            let (completion, data, close) = answer(&st, &req);
            let resp = IpmiResponse {
                netfn: req.netfn + 1,
                cmd: req.cmd,
                rq_seq: req.rq_seq,
                completion,
                data,
            };
            let out = sessions[idx].1.seal(&resp.emit(), rand::random());
            reply(out);
            if close {
                sessions.remove(idx);
            }
        }
    });
    TestBmc {
        port,
        state,
        stop,
        thread: Some(thread),
    }
}

/// The test BMC's command handling: (completion code, data, close the session).
fn answer(state: &Mutex<ChassisState>, req: &IpmiRequest) -> (u8, Vec<u8>, bool) {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    match (req.netfn, req.cmd) {
        (wire::netfn::APP, wire::cmd::SET_SESSION_PRIVILEGE_LEVEL) => {
            (0, vec![req.data.first().copied().unwrap_or(4)], false)
        }
        (wire::netfn::APP, wire::cmd::CLOSE_SESSION) => (0, vec![], true),
        (wire::netfn::CHASSIS, wire::cmd::GET_CHASSIS_STATUS) => {
            (0, vec![u8::from(s.power), 0, 0, 0], false)
        }
        (wire::netfn::CHASSIS, wire::cmd::CHASSIS_CONTROL) => {
            match req.data.first() {
                Some(0) | Some(5) => s.power = false,
                Some(1) | Some(2) | Some(3) => s.power = true,
                _ => return (0xCC, vec![], false),
            }
            (0, vec![], false)
        }
        (wire::netfn::CHASSIS, wire::cmd::SET_SYSTEM_BOOT_OPTIONS) => {
            if req.data.first() == Some(&5) && req.data.len() == 6 {
                s.boot.copy_from_slice(&req.data[1..6]);
                (0, vec![], false)
            } else {
                // Parameters 0, 3, 4 (set in progress, valid-bit clearing, ack): accepted.
                (0, vec![], false)
            }
        }
        (wire::netfn::CHASSIS, wire::cmd::GET_SYSTEM_BOOT_OPTIONS) => {
            let mut d = vec![0x01, 0x05];
            d.extend_from_slice(&s.boot);
            (0, d, false)
        }
        _ => (0xC1, vec![], false),
    }
}

fn ipmitool_17(port: u16, user: &str, password: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ipmitool")
        .args([
            "-I",
            "lanplus",
            "-C",
            "17",
            "-N",
            "1",
            "-R",
            "2",
            "-H",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string(), "-U", user, "-P", password])
        .args(args)
        .output()
        .expect("running ipmitool")
}

#[tokio::test]
async fn suite_17_crypto_is_proven_by_ipmitool_and_used_by_the_driver() {
    tools_present();
    let bmc = test_bmc("admin", "seventeen-pw");
    // ipmitool (OpenSSL SHA-256 and AES) against the test BMC: a success proves the RAKP
    // HMACs, SIK, K1/K2, integrity and encryption agree with an independent implementation.
    let out = ipmitool_17(
        bmc.port,
        "admin",
        "seventeen-pw",
        &["chassis", "power", "on"],
    );
    assert!(
        out.status.success(),
        "ipmitool -C 17 against the test BMC failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bmc.state.lock().unwrap().power);
    let out = ipmitool_17(
        bmc.port,
        "admin",
        "seventeen-pw",
        &["chassis", "power", "status"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Chassis Power is on"
    );
    // ipmitool with a wrong password is refused (our RAKP 2 auth code does not verify).
    let out = ipmitool_17(bmc.port, "admin", "wrong", &["chassis", "power", "status"]);
    assert!(!out.status.success());

    // Now the driver, on the same BMC, suite 17.
    let d = PowerDriver::new(PowerParams::Ipmi({
        let mut p = params(bmc.port, "admin", "seventeen-pw", IpmiCipherSuite::Suite17);
        p.privilege = IpmiPrivilege::Administrator;
        p
    }));
    assert_eq!(d.query().await.unwrap(), PowerState::On);
    d.power_off(false).await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::Off);
    let out = ipmitool_17(
        bmc.port,
        "admin",
        "seventeen-pw",
        &["chassis", "power", "status"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Chassis Power is off"
    );
    d.power_on().await.unwrap();
    assert!(bmc.state.lock().unwrap().power);
    d.power_cycle().await.unwrap();
    assert_eq!(d.query().await.unwrap(), PowerState::On);

    // Boot flags: this BMC keeps every bit, so the full read-back is exercised.
    d.set_boot_device(BootDevice::Pxe, false, true)
        .await
        .unwrap();
    assert_eq!(bmc.state.lock().unwrap().boot, [0xA0, 0x04, 0, 0, 0]);
    let out = ipmitool_17(
        bmc.port,
        "admin",
        "seventeen-pw",
        &["chassis", "bootparam", "get", "5"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Boot Flag Valid"), "{text}");
    assert!(text.contains("Force PXE"), "{text}");
    assert!(text.contains("BIOS EFI boot"), "{text}");
    d.set_boot_device(BootDevice::Disk, true, false)
        .await
        .unwrap();
    assert_eq!(bmc.state.lock().unwrap().boot, [0xC0, 0x08, 0, 0, 0]);

    // The driver refuses a wrong password with suite 17 too.
    let bad = PowerDriver::new(PowerParams::Ipmi(params(
        bmc.port,
        "admin",
        "wrong",
        IpmiCipherSuite::Suite17,
    )));
    let e = bad.query().await.unwrap_err();
    assert!(
        matches!(&e, PowerError::Ipmi(i) if i.is_credentials()),
        "{e}"
    );
    assert!(
        e.to_string().contains("BMC rejected the credentials"),
        "{e}"
    );
}
