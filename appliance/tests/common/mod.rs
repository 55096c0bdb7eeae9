//! The real `stork serve` on loopback with a temporary data directory (DHCP off), and the
//! typed client (`stork_client`) for it, with the agent's inventory and the lifecycle checks
//! the tests share. (`Api`, `Resp` and `Body`, the untyped client, go once no test uses them.) The server dies with the test: killed on drop, and
//! `PR_SET_PDEATHSIG` (via `stork_lab::Spawned`) if the test process itself is killed.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork::lifecycle::{Event, Status, transition};
use stork_lab::{Spawned, wait_for};
use stork_proto::Inventory;
use stork_proto::MacAddr;
use stork_proto::api::EventRecord;
use stork_proto::inventory::{Cpu, Disk, Dmi, Firmware, Memory, Nic};

pub const BIN: &str = env!("CARGO_BIN_EXE_stork");

/// The OS image [`Server::register_image`] registers.
pub const IMAGE: &str = "debian-12";

pub struct Server {
    pub dir: tempfile::TempDir,
    /// Plain HTTP: boot files and scripts (and the API, with `tls: false`).
    pub port: u16,
    /// HTTPS: the API and the agent routes; 0 with `tls: false`.
    pub tls_port: u16,
    /// An admin token made with `stork token create` before the first start.
    pub token: String,
    extra_config: String,
    extra_http: String,
    extra_dhcp: String,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    tls: bool,
    process: Option<Spawned>,
    /// Starts so far; each writes its own log file.
    pub starts: u32,
}

/// A port nobody listens on right now (the OS picks it; we release it for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

pub struct Options<'a> {
    /// Extra TOML for the config file, e.g. a `[lifecycle]` table.
    pub config: &'a str,
    /// Extra keys of the `[http]` table (the server writes its `listen` and `port`).
    pub http: &'a str,
    /// Extra keys of the `[dhcp]` table (the server writes `mode = "off"`).
    pub dhcp: &'a str,
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// The API over HTTPS (the default, as `stork serve` does), or everything on the plain
    /// port (tests of the plain listener's limits on agent routes).
    pub tls: bool,
    /// The `database` (a `postgres://` URL); unset, SQLite in the data directory.
    pub database: Option<&'a str>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            config: "[lifecycle]\ncheck_interval = 1\n",
            http: "",
            dhcp: "",
            args: &[],
            env: &[],
            tls: true,
            database: None,
        }
    }
}

impl Server {
    pub fn start(opts: Options<'_>) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("stork-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data/boot")).expect("data dir");
        let mut create = Command::new(BIN);
        create
            .args(["token", "create", "--description", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .envs(opts.env.iter().copied());
        if let Some(db) = opts.database {
            create.args(["--database", db]);
        }
        let out = create.output().expect("stork token create");
        assert!(out.status.success(), "stork token create: {out:?}");
        let token = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        let mut s = Server {
            dir,
            port: 0,
            token,
            extra_config: match opts.database {
                Some(db) => format!("database = {db:?}\n{}", opts.config),
                None => opts.config.to_string(),
            },
            extra_http: opts.http.to_string(),
            extra_dhcp: opts.dhcp.to_string(),
            extra_args: opts.args.iter().map(|s| s.to_string()).collect(),
            env: opts
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls: opts.tls,
            tls_port: 0,
            process: None,
            starts: 0,
        };
        // Another test may grab the port between our probe and the server's bind: retry.
        let mut last = None;
        for _ in 0..5 {
            s.port = free_port();
            s.tls_port = if s.tls { free_port() } else { 0 };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => last = Some(e),
            }
        }
        panic!("stork serve did not start: {:?}", last);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The API's base URL: HTTPS unless the test turned it off.
    pub fn base(&self) -> String {
        if self.tls {
            format!("https://127.0.0.1:{}", self.tls_port)
        } else {
            self.plain_base()
        }
    }

    /// Boot files and scripts.
    pub fn plain_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The certificate's fingerprint (`None` without TLS): every test server of a process
    /// serves the same certificate ([`test_cert`]), so a CLI command can be told it once.
    pub fn fingerprint(&self) -> Option<stork_tls::Fingerprint> {
        self.tls.then(|| test_cert().fingerprint)
    }

    /// What a client of [`Server::base`] trusts.
    pub fn trust(&self) -> Option<stork_tls::Trust> {
        self.fingerprint().map(stork_tls::Trust::Pinned)
    }

    /// `--url`, `--token` and `--fingerprint` for a CLI command.
    pub fn cli_args(&self) -> Vec<String> {
        let mut a = vec![
            "--url".into(),
            self.base(),
            "--token".into(),
            self.token.clone(),
        ];
        if let Some(fp) = self.fingerprint() {
            a.extend(["--fingerprint".into(), fp.to_string()]);
        }
        a
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("stork-{n}.log"))
    }

    fn spawn(&mut self) -> Result<()> {
        let config = self.dir.path().join("stork.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n{}\n[http]\nlisten = \"127.0.0.1\"\nport = {}\n{}\n\n[tls]\nenabled = {}\nport = {}\ncert = {:?}\nkey = {:?}\n\n[dhcp]\nmode = \"off\"\n{}\n\n[tftp]\nenabled = false\n",
                self.data_dir(),
                self.extra_config,
                self.port,
                self.extra_http,
                self.tls,
                self.tls_port.max(1),
                test_cert().cert,
                test_cert().key,
                self.extra_dhcp,
            ),
        )?;
        self.starts += 1;
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .args(&self.extra_args)
            .env("RUST_LOG", "info,stork=debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let log = self.log_path(self.starts);
        let mut p = Spawned::start("stork", cmd, &log)?;
        let ready = wait_for(
            "the API to answer",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                if let Some(st) = p.exited() {
                    bail!("stork serve exited ({st}):\n{}", p.log_tail(30));
                }
                let client = stork_client::Client::with_trust(&self.base(), None, self.trust());
                Ok(client.openapi().ok())
            },
        );
        match ready {
            Ok(_) => {
                self.process = Some(p);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// SIGKILL, as a power cut would (no shutdown handler runs).
    pub fn kill(&mut self) {
        // Spawned's drop sends SIGKILL and reaps the child.
        self.process = None;
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn()
            .context("restart")
            .expect("stork serve restarts");
    }

    /// Every start's log, concatenated.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect()
    }

    /// The typed client, with the admin token.
    pub fn client(&self) -> stork_client::Client {
        stork_client::Client::with_trust(&self.base(), Some(self.token.clone()), self.trust())
    }

    /// Registers OS image [`IMAGE`]: a root tar of `content` (not a real one: the tests
    /// that use it never run an agent).
    pub fn register_image(&self, content: &[u8]) {
        let (size, sha256) = self.boot_file("images/debian-12/root.tar", content);
        self.client()
            .register_boot_resource(&stork_proto::api::BootResource {
                name: IMAGE.into(),
                kind: "os".into(),
                arch: Some("amd64".into()),
                files: vec![stork_proto::api::ResourceFile {
                    role: stork_proto::ImageRole::Tar,
                    path: "images/debian-12/root.tar".into(),
                    sha256,
                    size,
                }],
                kernels: ["6.1.0-50-amd64", "6.12.95+deb12-amd64"]
                    .iter()
                    .zip(["stable", "backports"])
                    .map(|(v, n)| stork_proto::kernel::ImageKernel {
                        name: n.into(),
                        version: (*v).into(),
                    })
                    .collect(),
            })
            .expect("register the image");
    }

    /// Writes `DATA_DIR/boot/<rel>` and returns its size and sha256 (hex).
    pub fn boot_file(&self, rel: &str, content: &[u8]) -> (u64, String) {
        use sha2::Digest;
        let path = self.data_dir().join("boot").join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).expect("boot subdir");
        }
        std::fs::write(&path, content).expect("boot file");
        (
            content.len() as u64,
            hex::encode(sha2::Sha256::digest(content)),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            eprintln!(
                "---- stork serve log (last 60 lines) ----\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}

/// The certificate every test server serves (a user-supplied pair, as `[tls] cert`/`key`
/// take it; the generated one is tested in the `http::tls` unit tests and the lab).
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: stork_tls::Fingerprint,
}

pub fn test_cert() -> &'static TestCert {
    static CERT: std::sync::OnceLock<TestCert> = std::sync::OnceLock::new();
    CERT.get_or_init(|| {
        // Kept for the process (servers read it at each start), so under the target's
        // scratch directory rather than /tmp, one per test process.
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("stork-test-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let pair = rcgen::KeyPair::generate().expect("key pair");
        let signed = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&pair)
            .expect("self-signed certificate");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, signed.pem()).expect("write cert");
        std::fs::write(&key, pair.serialize_pem()).expect("write key");
        TestCert {
            cert,
            key,
            fingerprint: stork_tls::Fingerprint::of(signed.der()),
        }
    })
}

/// The per-boot agent token from a boot script's kernel line (`stork.token=...`), with the
/// machine id it names (`stork.machine=...`).
pub fn script_identity(script: &str) -> Option<(String, String)> {
    let kernel = script.lines().find(|l| l.starts_with("kernel "))?;
    let arg = |key: &str| {
        kernel
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some((
        arg(stork_proto::cmdline::MACHINE)?,
        arg(stork_proto::cmdline::TOKEN)?,
    ))
}

/// An inventory as the agent posts it: `cpus` CPUs, `mem_gib` GiB, one disk of `disk_gib`.
pub fn inventory(boot_mac: &str, cpus: u32, mem_gib: u64, disk_gib: u64) -> Inventory {
    Inventory {
        cpu: Cpu {
            model: "QEMU Virtual CPU".into(),
            count: cpus,
            ..Cpu::default()
        },
        memory: Memory {
            total_bytes: mem_gib << 30,
            usable_bytes: (mem_gib << 30) - (64 << 20),
        },
        disks: vec![Disk {
            name: "vda".into(),
            size_bytes: disk_gib << 30,
            model: None,
            serial: Some("d1".into()),
            rotational: Some(false),
            ..Disk::default()
        }],
        nics: vec![Nic {
            name: "ens3".into(),
            mac: boot_mac.parse().expect("a MAC"),
            driver: Some("virtio_net".into()),
            link: Some(true),
            speed_mbps: Some(1000),
        }],
        dmi: Dmi {
            sys_vendor: Some("QEMU".into()),
            product_name: Some("Standard PC".into()),
            product_serial: None,
            product_uuid: None,
            bios_vendor: Some("SeaBIOS".into()),
            bios_version: Some("1.16".into()),
        },
        firmware: Firmware::Bios,
        secure_boot: Some(false),
        kernel: "6.1.0-test".into(),
    }
}

/// A distinct locally administered MAC for test machine `n`.
pub fn mac(n: u32) -> String {
    let b = n.to_be_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// [`mac`] as a `MacAddr`.
pub fn mac_addr(n: u32) -> MacAddr {
    mac(n).parse().expect("a MAC")
}

/// Whether the table has an edge `from -> to` (for any event, commissioned or not).
pub fn legal_edge(from: Status, to: Status) -> bool {
    Event::ALL.iter().any(|e| {
        [true, false]
            .iter()
            .any(|c| transition(from, *e, *c).is_ok_and(|s| s.to == to))
    })
}

/// The statuses a machine went through according to its events (the creation's `new` first),
/// checking that the chain is unbroken and every step is an edge of the table.
pub fn status_history(events: &[EventRecord]) -> Result<Vec<Status>, String> {
    let mut out: Vec<Status> = Vec::new();
    for e in events {
        let Some(new) = e.new_status else {
            continue;
        };
        match (out.last(), e.old_status) {
            (None, None) if new == Status::New => {}
            (Some(&prev), Some(old)) if prev == old && legal_edge(old, new) => {}
            _ => return Err(format!("illegal or broken chain at {e:?} after {out:?}")),
        }
        out.push(new);
    }
    Ok(out)
}

/// A TCP connection to the server on 127.0.0.1:`port` from `source` (another loopback
/// address: another host on the provisioning network).
pub fn connect_from(source: std::net::IpAddr, port: u16) -> std::net::TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&std::net::SocketAddr::new(source, 0).into())
        .expect("bind the source address");
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connect");
    socket.into()
}

/// An HTTP/1.1 request from `source` (see [`connect_from`]) to the plain listener, with a
/// JSON `body` if any; the status, the headers (lower case) and the body.
pub fn request_from(
    source: std::net::IpAddr,
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    exchange(connect_from(source, port), method, path, token, body)
}

impl Server {
    /// As [`request_from`], to the API's listener: over TLS unless the test turned it off.
    pub fn api_request_from(
        &self,
        source: std::net::IpAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, String) {
        let Some(trust) = self.trust() else {
            return request_from(source, self.port, method, path, token, body);
        };
        let config = std::sync::Arc::new(stork_tls::client_config(trust));
        let name = "localhost".try_into().expect("a server name");
        let conn = stork_tls::rustls::ClientConnection::new(config, name).expect("TLS client");
        let stream = stork_tls::rustls::StreamOwned::new(conn, connect_from(source, self.tls_port));
        exchange(stream, method, path, token, body)
    }
}

fn exchange(
    mut stream: impl std::io::Read + std::io::Write,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.unwrap_or_default();
    // A body over 64 KiB is declared, not sent: the server must refuse it from its
    // Content-Length before reading (and had it read on, the test would wait on it). Sending
    // it would race the server's close against our write, which can lose its answer.
    let sent = if body.len() > 64 << 10 { "" } else { body };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sent}",
        body.len()
    )
    .and_then(|()| stream.flush())
    .expect("send");
    let mut answer = Vec::new();
    // The server may close before reading an oversized body (or without a TLS
    // close_notify): keep what it answered.
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}
