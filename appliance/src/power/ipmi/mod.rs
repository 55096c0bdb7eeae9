//! IPMI 2.0 over LAN (RMCP+) power driver on tokio UDP.
//!
//! The protocol is sans-IO in [`wire`] (packets), [`crypto`] (cipher suites 3 and 17) and
//! [`session`] (the RAKP handshake and sealed messages); this file only moves datagrams,
//! times out and retries. Each operation opens a session, raises its privilege, does its
//! commands and closes it: BMCs drop idle sessions, and a power operation is rare.
//! [`responder`] is the BMC's side on the same code, for simulated BMCs.

pub mod crypto;
pub mod responder;
pub mod session;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use crypto::CipherSuite;
use session::{Handshake, HandshakeError, Next, Session, SessionError};
pub use wire::{BootFlags, ChassisControl, ChassisStatus, Privilege};
use wire::{IpmiResponse, WireError, cmd, netfn};

use super::{BootDevice, PowerState, Secret};

/// The IANA port for RMCP / IPMI over LAN.
pub const DEFAULT_PORT: u16 = 623;

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_attempts() -> u32 {
    3
}

/// How to reach one machine's BMC over IPMI. The password is a [`Secret`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpmiParams {
    /// BMC address or name.
    pub host: String,
    #[serde(default = "default_port")]
    #[schema(default = 623)]
    pub port: u16,
    pub username: String,
    #[schema(value_type = String)]
    pub password: Secret,
    /// 3 (HMAC-SHA1, AES-128) or 17 (HMAC-SHA256, AES-128). Default 3: every IPMI 2.0
    /// BMC has it; 17 where the BMC offers it (OpenIPMI's ipmi_sim 2.0.33 does not).
    #[serde(default)]
    #[schema(value_type = u8, default = 3)]
    pub cipher_suite: IpmiCipherSuite,
    /// Operator (default) is enough for chassis control and boot options.
    #[serde(default)]
    #[schema(default = "operator")]
    pub privilege: IpmiPrivilege,
    /// How long to wait for each answer before sending again.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Transmissions per request (the first plus retries) before giving up.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

impl IpmiParams {
    pub fn new(host: &str, username: &str, password: impl Into<Secret>) -> Self {
        Self {
            host: host.to_string(),
            port: DEFAULT_PORT,
            username: username.to_string(),
            password: password.into(),
            cipher_suite: IpmiCipherSuite::default(),
            privilege: IpmiPrivilege::default(),
            timeout_ms: default_timeout_ms(),
            attempts: default_attempts(),
        }
    }
}

/// Cipher suite as stored: the number, checked on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum IpmiCipherSuite {
    #[default]
    Suite3,
    Suite17,
}

impl TryFrom<u8> for IpmiCipherSuite {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            3 => Ok(Self::Suite3),
            17 => Ok(Self::Suite17),
            other => Err(format!(
                "cipher suite {other} is not supported (Stork speaks 3 and 17)"
            )),
        }
    }
}

impl From<IpmiCipherSuite> for u8 {
    fn from(s: IpmiCipherSuite) -> u8 {
        match s {
            IpmiCipherSuite::Suite3 => 3,
            IpmiCipherSuite::Suite17 => 17,
        }
    }
}

impl From<IpmiCipherSuite> for CipherSuite {
    fn from(s: IpmiCipherSuite) -> Self {
        match s {
            IpmiCipherSuite::Suite3 => CipherSuite::Suite3,
            IpmiCipherSuite::Suite17 => CipherSuite::Suite17,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IpmiPrivilege {
    #[default]
    Operator,
    Administrator,
}

impl From<IpmiPrivilege> for Privilege {
    fn from(p: IpmiPrivilege) -> Self {
        match p {
            IpmiPrivilege::Operator => Privilege::Operator,
            IpmiPrivilege::Administrator => Privilege::Administrator,
        }
    }
}

/// What went wrong talking to a BMC, with what it answered.
#[derive(Debug, Error)]
pub enum IpmiError {
    #[error("cannot resolve IPMI BMC address {bmc}: {source}")]
    Resolve {
        bmc: String,
        #[source]
        source: std::io::Error,
    },
    #[error("UDP socket error talking to IPMI BMC {bmc}: {source}")]
    Io {
        bmc: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "IPMI BMC {bmc} did not answer {step} after {attempts} attempts of {timeout_ms} ms{}",
        if *refused { " (ICMP port unreachable: nothing listens there)" } else { "" }
    )]
    Timeout {
        bmc: String,
        step: String,
        attempts: u32,
        timeout_ms: u64,
        /// The host answered "port unreachable" at least once.
        refused: bool,
    },
    #[error("IPMI BMC {bmc} (user {user}, cipher suite {suite}): {source}")]
    Handshake {
        bmc: String,
        user: String,
        suite: u8,
        #[source]
        source: HandshakeError,
    },
    #[error("IPMI BMC {bmc} answered {command} with completion code 0x{code:02X}: {meaning}")]
    Completion {
        bmc: String,
        command: &'static str,
        code: u8,
        meaning: &'static str,
    },
    #[error("IPMI BMC {bmc} sent a malformed answer to {command}: {source}")]
    Malformed {
        bmc: String,
        command: &'static str,
        #[source]
        source: WireError,
    },
    #[error("IPMI BMC {bmc}: {source}")]
    Session {
        bmc: String,
        #[source]
        source: SessionError,
    },
    #[error("IPMI BMC {bmc} accepted the boot override {wanted} but reports {got}")]
    BootReadBack {
        bmc: String,
        wanted: String,
        got: String,
    },
}

impl IpmiError {
    /// The BMC refused the user name or password.
    pub fn is_credentials(&self) -> bool {
        matches!(
            self,
            IpmiError::Handshake {
                source: HandshakeError::Credentials { .. },
                ..
            }
        )
    }

    /// Nothing answered (timeout or port unreachable), or the name did not resolve.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, IpmiError::Timeout { .. } | IpmiError::Resolve { .. })
    }
}

/// The IPMI power driver for one BMC.
#[derive(Debug, Clone)]
pub struct IpmiDriver {
    params: IpmiParams,
}

impl IpmiDriver {
    pub fn new(params: IpmiParams) -> Self {
        Self { params }
    }

    pub fn params(&self) -> &IpmiParams {
        &self.params
    }

    fn bmc(&self) -> String {
        if self.params.host.contains(':') {
            format!("[{}]:{}", self.params.host, self.params.port)
        } else {
            format!("{}:{}", self.params.host, self.params.port)
        }
    }

    /// Opens a session at the configured privilege.
    async fn connect(&self) -> Result<Conn, IpmiError> {
        let bmc = self.bmc();
        let addr: SocketAddr =
            tokio::net::lookup_host((self.params.host.as_str(), self.params.port))
                .await
                .map_err(|source| IpmiError::Resolve {
                    bmc: bmc.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| IpmiError::Resolve {
                    bmc: bmc.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                })?;
        let local = if addr.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0u8; 4], 0))
        };
        let io = |source| IpmiError::Io {
            bmc: bmc.clone(),
            source,
        };
        let sock = UdpSocket::bind(local).await.map_err(io)?;
        // Connected, so the kernel filters other senders and reports ICMP unreachable.
        sock.connect(addr).await.map_err(io)?;

        let suite: CipherSuite = self.params.cipher_suite.into();
        let privilege: Privilege = self.params.privilege.into();
        let hs_err = |source| IpmiError::Handshake {
            bmc: bmc.clone(),
            user: self.params.username.clone(),
            suite: suite.id(),
            source,
        };
        let mut hs = Handshake::new(
            suite,
            privilege,
            self.params.username.as_bytes(),
            self.params.password.expose().as_bytes(),
            rand::random::<u32>() | 1,
            rand::random::<[u8; 16]>(),
        )
        .map_err(hs_err)?;
        let mut conn = Conn {
            sock,
            bmc: bmc.clone(),
            timeout: Duration::from_millis(self.params.timeout_ms.max(1)),
            attempts: self.params.attempts.max(1),
            session: None,
        };
        let session = conn.handshake(&mut hs).await.map_err(|e| match e {
            Exchange::Failed(h) => hs_err(h),
            Exchange::Io(err) => err,
        })?;
        debug!(
            bmc = %bmc,
            user = %self.params.username,
            suite = suite.id(),
            "IPMI session established"
        );
        conn.session = Some(session);
        // Without this the session stays at User level and chassis commands fail 0xD4.
        let resp = conn
            .call(
                netfn::APP,
                cmd::SET_SESSION_PRIVILEGE_LEVEL,
                vec![privilege.code()],
                "Set Session Privilege Level",
            )
            .await?;
        if resp
            .data
            .first()
            .is_some_and(|p| *p & 0x0F != privilege.code())
        {
            warn!(bmc = %bmc, granted = resp.data[0], "BMC granted another privilege level");
        }
        Ok(conn)
    }

    /// Runs `f` in a fresh session and closes the session whatever `f` returned.
    async fn with_session<T>(
        &self,
        f: impl AsyncFnOnce(&mut Conn) -> Result<T, IpmiError>,
    ) -> Result<T, IpmiError> {
        let mut conn = self.connect().await?;
        let result = f(&mut conn).await;
        conn.close().await;
        result
    }

    /// Get Chassis Status.
    pub async fn chassis_status(&self) -> Result<ChassisStatus, IpmiError> {
        self.with_session(async |c| c.chassis_status().await).await
    }

    pub async fn query(&self) -> Result<PowerState, IpmiError> {
        let s = self.chassis_status().await?;
        Ok(if s.power_on {
            PowerState::On
        } else {
            PowerState::Off
        })
    }

    pub async fn chassis_control(&self, control: ChassisControl) -> Result<(), IpmiError> {
        self.with_session(async |c| c.chassis_control(control).await)
            .await
    }

    pub async fn power_on(&self) -> Result<(), IpmiError> {
        self.chassis_control(ChassisControl::PowerUp).await
    }

    /// Soft: ACPI shutdown request to the OS; hard: power down now.
    pub async fn power_off(&self, soft: bool) -> Result<(), IpmiError> {
        self.chassis_control(if soft {
            ChassisControl::SoftShutdown
        } else {
            ChassisControl::PowerDown
        })
        .await
    }

    /// Power cycle; a machine that is off is powered on instead, because many BMCs
    /// refuse a cycle in that state (0xD5).
    pub async fn power_cycle(&self) -> Result<(), IpmiError> {
        self.with_session(async |c| {
            let on = c.chassis_status().await?.power_on;
            c.chassis_control(if on {
                ChassisControl::PowerCycle
            } else {
                ChassisControl::PowerUp
            })
            .await
        })
        .await
    }

    /// Get System Boot Options, parameter 5.
    pub async fn boot_flags(&self) -> Result<BootFlags, IpmiError> {
        self.with_session(async |c| c.boot_flags().await).await
    }

    /// Sets the boot flags (valid bit set) and reads them back. The device must match;
    /// the persistent and EFI bits are compared when the BMC reports the flags valid.
    pub async fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        efi: bool,
    ) -> Result<(), IpmiError> {
        let wanted = BootFlags {
            valid: true,
            persistent,
            efi,
            device: match device {
                BootDevice::Pxe => wire::BOOT_DEVICE_PXE,
                BootDevice::Disk => wire::BOOT_DEVICE_DISK,
            },
        };
        let bmc = self.bmc();
        self.with_session(async |c| {
            c.call(
                netfn::CHASSIS,
                cmd::SET_SYSTEM_BOOT_OPTIONS,
                wanted.set_request_data(),
                "Set System Boot Options (boot flags)",
            )
            .await?;
            let got = c.boot_flags().await?;
            check_boot_read_back(&bmc, &wanted, &got)
        })
        .await
    }
}

/// Compares the flags read back with the flags set.
fn check_boot_read_back(bmc: &str, wanted: &BootFlags, got: &BootFlags) -> Result<(), IpmiError> {
    let mismatch = || IpmiError::BootReadBack {
        bmc: bmc.to_string(),
        wanted: describe_flags(wanted),
        got: describe_flags(got),
    };
    if got.device != wanted.device {
        return Err(mismatch());
    }
    if !got.valid {
        // ipmi_sim reports only the device, with data 1 all zero; a BMC that really
        // dropped the override would not report the device either.
        warn!(
            bmc,
            "BMC reports the boot device but not the valid, persistent or EFI bits"
        );
        return Ok(());
    }
    if got.persistent != wanted.persistent || got.efi != wanted.efi {
        return Err(mismatch());
    }
    Ok(())
}

fn describe_flags(f: &BootFlags) -> String {
    let device = match f.device {
        wire::BOOT_DEVICE_PXE => "PXE".to_string(),
        wire::BOOT_DEVICE_DISK => "disk".to_string(),
        0 => "no override".to_string(),
        other => format!("device selector 0x{:X}", other >> 2),
    };
    format!(
        "{device}, {}, {}{}",
        if f.persistent {
            "persistent"
        } else {
            "next boot only"
        },
        if f.efi { "EFI" } else { "legacy" },
        if f.valid { "" } else { ", valid bit clear" }
    )
}

/// Internal: a handshake failure or an I/O-level failure.
enum Exchange {
    Failed(HandshakeError),
    Io(IpmiError),
}

struct Conn {
    sock: UdpSocket,
    bmc: String,
    timeout: Duration,
    attempts: u32,
    session: Option<Session>,
}

/// What one receive produced.
enum Recv {
    Packet(usize),
    TimedOut,
    Refused,
}

impl Conn {
    async fn recv_until(&self, buf: &mut [u8], deadline: Instant) -> Result<Recv, IpmiError> {
        match tokio::time::timeout_at(deadline, self.sock.recv(buf)).await {
            Err(_) => Ok(Recv::TimedOut),
            Ok(Ok(n)) => Ok(Recv::Packet(n)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // Port unreachable: wait out the attempt, so a BMC that is restarting gets
                // the whole timeout to come back.
                tokio::time::sleep_until(deadline).await;
                Ok(Recv::Refused)
            }
            Ok(Err(source)) => Err(IpmiError::Io {
                bmc: self.bmc.clone(),
                source,
            }),
        }
    }

    async fn send(&self, p: &[u8]) -> Result<(), IpmiError> {
        match self.sock.send(p).await {
            Ok(_) => Ok(()),
            // A previous ICMP error can surface on send; the attempt then times out.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(source) => Err(IpmiError::Io {
                bmc: self.bmc.clone(),
                source,
            }),
        }
    }

    fn timeout_error(&self, step: &str, refused: bool) -> IpmiError {
        IpmiError::Timeout {
            bmc: self.bmc.clone(),
            step: step.to_string(),
            attempts: self.attempts,
            timeout_ms: self.timeout.as_millis() as u64,
            refused,
        }
    }

    async fn handshake(&mut self, hs: &mut Handshake) -> Result<Session, Exchange> {
        let mut out = hs.start();
        let mut buf = vec![0u8; 1024];
        'step: loop {
            let mut refused = false;
            for attempt in 1..=self.attempts {
                if attempt > 1 {
                    out = hs.retransmit();
                    debug!(bmc = %self.bmc, step = hs.step().name(), attempt, "IPMI retransmit");
                }
                self.send(&out).await.map_err(Exchange::Io)?;
                let deadline = Instant::now() + self.timeout;
                loop {
                    match self
                        .recv_until(&mut buf, deadline)
                        .await
                        .map_err(Exchange::Io)?
                    {
                        Recv::TimedOut => break,
                        Recv::Refused => {
                            refused = true;
                            break;
                        }
                        Recv::Packet(n) => match hs.handle(&buf[..n]).map_err(Exchange::Failed)? {
                            None => continue,
                            Some(Next::Send(p)) => {
                                out = p;
                                continue 'step;
                            }
                            Some(Next::Established(s)) => return Ok(s),
                        },
                    }
                }
            }
            return Err(Exchange::Io(self.timeout_error(hs.step().name(), refused)));
        }
    }

    /// Sends one request in the session and returns the response; a non-zero completion
    /// code is an error naming the command and the code's meaning.
    async fn call(
        &mut self,
        netfn: u8,
        command: u8,
        data: Vec<u8>,
        what: &'static str,
    ) -> Result<IpmiResponse, IpmiError> {
        let resp = self.call_raw(netfn, command, data, what).await?;
        if resp.completion != 0 {
            return Err(IpmiError::Completion {
                bmc: self.bmc.clone(),
                command: what,
                code: resp.completion,
                meaning: wire::completion_meaning(resp.completion, netfn, command),
            });
        }
        Ok(resp)
    }

    async fn call_raw(
        &mut self,
        netfn: u8,
        command: u8,
        data: Vec<u8>,
        what: &'static str,
    ) -> Result<IpmiResponse, IpmiError> {
        let bmc = self.bmc.clone();
        let Some(session) = self.session.as_mut() else {
            return Err(self.timeout_error(what, false));
        };
        let req = session.request(netfn, command, data);
        let payload = req.emit();
        let mut buf = vec![0u8; 1024];
        let mut refused = false;
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                debug!(bmc = %bmc, command = what, attempt, "IPMI retransmit");
            }
            let packet = match self.session.as_mut() {
                Some(s) => s.seal(&payload, rand::random::<[u8; 16]>()),
                None => break,
            };
            self.send(&packet).await?;
            let deadline = Instant::now() + self.timeout;
            loop {
                match self.recv_until(&mut buf, deadline).await? {
                    Recv::TimedOut => break,
                    Recv::Refused => {
                        refused = true;
                        break;
                    }
                    Recv::Packet(n) => {
                        let Some(session) = self.session.as_ref() else {
                            break;
                        };
                        match session.open_response(&buf[..n], &req) {
                            Ok(Some(resp)) => return Ok(resp),
                            Ok(None) => continue,
                            Err(SessionError::Malformed(source)) => {
                                return Err(IpmiError::Malformed {
                                    bmc,
                                    command: what,
                                    source,
                                });
                            }
                            Err(source) => return Err(IpmiError::Session { bmc, source }),
                        }
                    }
                }
            }
        }
        Err(self.timeout_error(what, refused))
    }

    async fn chassis_status(&mut self) -> Result<ChassisStatus, IpmiError> {
        let what = "Get Chassis Status";
        let resp = self
            .call(netfn::CHASSIS, cmd::GET_CHASSIS_STATUS, vec![], what)
            .await?;
        ChassisStatus::parse(&resp.data).map_err(|source| IpmiError::Malformed {
            bmc: self.bmc.clone(),
            command: what,
            source,
        })
    }

    async fn chassis_control(&mut self, control: ChassisControl) -> Result<(), IpmiError> {
        self.call(
            netfn::CHASSIS,
            cmd::CHASSIS_CONTROL,
            vec![control.code()],
            control.describe(),
        )
        .await?;
        debug!(bmc = %self.bmc, command = control.describe(), "IPMI chassis control accepted");
        Ok(())
    }

    async fn boot_flags(&mut self) -> Result<BootFlags, IpmiError> {
        let what = "Get System Boot Options (boot flags)";
        let resp = self
            .call(
                netfn::CHASSIS,
                cmd::GET_SYSTEM_BOOT_OPTIONS,
                BootFlags::get_request_data(),
                what,
            )
            .await?;
        BootFlags::parse_get_response(&resp.data).map_err(|source| IpmiError::Malformed {
            bmc: self.bmc.clone(),
            command: what,
            source,
        })
    }

    /// Close Session, best effort: a BMC that does not answer drops the session itself.
    async fn close(mut self) {
        let Some(sid) = self.session.as_ref().map(Session::managed_session_id) else {
            return;
        };
        // One attempt only: nothing depends on the answer.
        self.attempts = 1;
        if let Err(e) = self
            .call_raw(
                netfn::APP,
                cmd::CLOSE_SESSION,
                sid.to_le_bytes().to_vec(),
                "Close Session",
            )
            .await
        {
            debug!(bmc = %self.bmc, error = %e, "IPMI Close Session failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_serde_defaults_and_cipher_check() {
        let p: IpmiParams =
            serde_json::from_str(r#"{"host":"10.0.0.5","username":"admin","password":"pw"}"#)
                .unwrap();
        assert_eq!(p.port, 623);
        assert_eq!(p.cipher_suite, IpmiCipherSuite::Suite3);
        assert_eq!(p.privilege, IpmiPrivilege::Operator);
        let e = serde_json::from_str::<IpmiParams>(
            r#"{"host":"h","username":"u","password":"p","cipher_suite":1}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("cipher suite 1 is not supported"),
            "{e}"
        );
        let p17: IpmiParams = serde_json::from_str(
            r#"{"host":"h","username":"u","password":"p","cipher_suite":17,"privilege":"administrator"}"#,
        )
        .unwrap();
        assert_eq!(p17.cipher_suite, IpmiCipherSuite::Suite17);
        assert!(!format!("{p17:?}").contains("\"p\""));
    }

    #[test]
    fn read_back_rules() {
        let want = BootFlags {
            valid: true,
            persistent: false,
            efi: true,
            device: wire::BOOT_DEVICE_PXE,
        };
        assert!(check_boot_read_back("b", &want, &want).is_ok());
        // ipmi_sim: device only, data 1 zero.
        let sim = BootFlags {
            valid: false,
            persistent: false,
            efi: false,
            device: wire::BOOT_DEVICE_PXE,
        };
        assert!(check_boot_read_back("b", &want, &sim).is_ok());
        let disk = BootFlags {
            device: wire::BOOT_DEVICE_DISK,
            ..want
        };
        let e = check_boot_read_back("b", &want, &disk).unwrap_err();
        assert_eq!(
            e.to_string(),
            "IPMI BMC b accepted the boot override PXE, next boot only, EFI but reports disk, \
             next boot only, EFI"
        );
        let persistent = BootFlags {
            persistent: true,
            ..want
        };
        assert!(check_boot_read_back("b", &want, &persistent).is_err());
    }
}
