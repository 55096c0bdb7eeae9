//! The Redfish driver against a real Redfish emulator: `sushy-emulator --fake` from
//! sushy-tools (PyPI), installed on first use into a venv under `target/venv-sushy`.
//!
//! What the fake driver does, and the tests rely on: power changes are applied 1-11 s
//! after `ComputerSystem.Reset` (randomly), so the tests wait for the state; a boot
//! override PATCH with `BootSourceOverrideEnabled: Once` answers 204 but stores
//! `Continuous`, which the driver must catch when it reads the override back. Its state
//! lives in `$TMPDIR/sushy-emulator/`, so each emulator here gets its own TMPDIR.
//!
//! HTTPS: one emulator serves TLS with a self-signed certificate for `localhost` (rcgen),
//! as BMCs ship them, trusted by its pinned fingerprint or as its own CA. What a refused
//! certificate keeps from the BMC is measured on an in-process TLS server that records
//! every byte a client sends after the handshake.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use stork::power::{
    BootDevice, PowerDriver, PowerError, PowerParams, PowerState, RedfishError, RedfishParams,
};
use stork_lab::Spawned;
use stork_tls::Fingerprint;

const USER: &str = "stork";
const PASSWORD: &str = "redfish-pw";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn python() -> &'static str {
    // Debian's python3 has the venv module (package python3-venv); a pyenv shim may not.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The venv with sushy-tools, created once (`python3 -m venv` + `pip install`). A venv
/// cannot be moved (its scripts name their interpreter), so it is built in place and
/// marked complete; an unmarked one is a failed attempt and is rebuilt.
fn venv() -> &'static Path {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = VENV.get_or_init(|| {
        let venv = target_dir().join("venv-sushy");
        let ready = venv.join(".stork-ready");
        if ready.exists() {
            return Ok(venv);
        }
        let _ = std::fs::remove_dir_all(&venv);
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ")
                ))
            }
        };
        run(Command::new(python()).args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args(["install", "-q", "sushy-tools"]))?;
        std::fs::write(&ready, "").map_err(|e| e.to_string())?;
        Ok(venv)
    });
    match r {
        Ok(p) => p,
        Err(e) => panic!(
            "cannot install sushy-tools (the Redfish emulator) into {}: {e}\n\
             It needs python3 with venv (apt-get install python3-venv) and PyPI.",
            target_dir().join("venv-sushy").display()
        ),
    }
}

struct Emulator {
    url: String,
    port: u16,
    process: Spawned,
    _dir: tempfile::TempDir,
}

/// A self-signed certificate for `localhost`, as a BMC ships one.
struct SelfSigned {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    key_der: Vec<u8>,
}

fn self_signed() -> SelfSigned {
    let pair = rcgen::KeyPair::generate().expect("a key pair");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("certificate params")
        .self_signed(&pair)
        .expect("a self-signed certificate");
    SelfSigned {
        cert_pem: cert.pem(),
        key_pem: pair.serialize_pem(),
        der: cert.der().to_vec(),
        key_der: pair.serialize_der(),
    }
}

/// Starts `sushy-emulator --fake` on a free loopback port, with basic auth.
fn emulator() -> Emulator {
    start_emulator(None)
}

/// The same, serving HTTPS with `cert`.
fn emulator_tls(cert: &SelfSigned) -> Emulator {
    start_emulator(Some(cert))
}

fn start_emulator(tls: Option<&SelfSigned>) -> Emulator {
    // One emulator start at a time: port choice and bcrypt are not worth racing.
    static START: Mutex<()> = Mutex::new(());
    let venv = venv();
    let _guard = START.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temporary directory");
    let hash = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(4)).decode())",
            PASSWORD,
        ])
        .output()
        .expect("running the venv's python");
    assert!(hash.status.success(), "bcrypt: {hash:?}");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("{USER}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
    )
    .expect("writing htpasswd");
    let mut settings = format!(
        "SUSHY_EMULATOR_AUTH_FILE = {:?}\n",
        htpasswd.display().to_string()
    );
    if let Some(tls) = tls {
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &tls.cert_pem).expect("writing the certificate");
        std::fs::write(&key, &tls.key_pem).expect("writing the key");
        settings.push_str(&format!(
            "SUSHY_EMULATOR_SSL_CERT = {:?}\nSUSHY_EMULATOR_SSL_KEY = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    let config = dir.path().join("sushy.conf");
    std::fs::write(&config, settings).expect("writing the sushy config");
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("a free TCP port")
        .local_addr()
        .expect("a free TCP port")
        .port();
    let mut cmd = Command::new(venv.join("bin/sushy-emulator"));
    // The fake driver keeps its systems in $TMPDIR/sushy-emulator/*.sqlite, shared by
    // every emulator on the host: give each its own, or parallel tests see each other.
    cmd.env("TMPDIR", dir.path())
        .arg("--config")
        .arg(&config)
        .args(["--fake", "-i", "127.0.0.1", "-p", &port.to_string()]);
    let mut process = Spawned::start("sushy-emulator", cmd, &dir.path().join("sushy.log"))
        .unwrap_or_else(|e| panic!("cannot start sushy-emulator: {e:#}"));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Some(status) = process.exited() {
            panic!(
                "sushy-emulator exited ({status}):\n{}",
                process.log_tail(20)
            );
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "sushy-emulator did not listen on {url} within 30 s:\n{}",
            process.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Emulator {
        url,
        port,
        process,
        _dir: dir,
    }
}

fn driver(url: &str, password: &str) -> PowerDriver {
    let mut p = RedfishParams::new(url, USER, password);
    p.timeout_ms = 5000;
    PowerDriver::new(PowerParams::Redfish(p))
}

async fn wait_state(d: &PowerDriver, want: PowerState, emu: &Emulator) {
    // The fake driver applies power changes 1-11 s after the reset.
    if let Err(e) = d
        .wait_for(want, Duration::from_secs(20), Duration::from_millis(250))
        .await
    {
        panic!(
            "waiting for power {want}: {e}\n--- sushy ---\n{}",
            emu.process.log_tail(20)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_on_off_cycle_and_status() {
    let emu = emulator();
    let d = driver(&emu.url, PASSWORD);
    assert_eq!(d.query().await.unwrap(), PowerState::Off);

    d.power_on().await.unwrap();
    wait_state(&d, PowerState::On, &emu).await;
    // On when already on is a no-op, not a BMC error.
    d.power_on().await.unwrap();

    d.power_off(true).await.unwrap();
    wait_state(&d, PowerState::Off, &emu).await;

    // Cycle from off powers on; from on it is a ForceRestart.
    d.power_cycle().await.unwrap();
    wait_state(&d, PowerState::On, &emu).await;
    d.power_cycle().await.unwrap();
    wait_state(&d, PowerState::On, &emu).await;

    d.power_off(false).await.unwrap();
    wait_state(&d, PowerState::Off, &emu).await;
    // Werkzeug logs each action (not its body; the state changes above prove those):
    // On, GracefulShutdown, On (cycle from off), ForceRestart, ForceOff. The second
    // power_on found the system on and posted nothing.
    let log = std::fs::read_to_string(emu.process.log()).unwrap_or_default();
    let resets = log
        .lines()
        .filter(|l| l.contains("/Actions/ComputerSystem.Reset HTTP/1.1") && l.ends_with(" 204 -"))
        .count();
    assert_eq!(resets, 5, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_override_is_read_back_and_a_silent_change_is_caught() {
    let emu = emulator();
    let d = driver(&emu.url, PASSWORD);

    // Continuous (persistent) reads back as set, in both modes.
    d.set_boot_device(BootDevice::Pxe, true, true)
        .await
        .unwrap();
    d.set_boot_device(BootDevice::Disk, true, false)
        .await
        .unwrap();

    // Once: the emulator answers 204 and stores Continuous. The driver must say so.
    let e = d
        .set_boot_device(BootDevice::Pxe, false, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "boot_override_not_applied", "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "Redfish BMC {} accepted the boot override BootSourceOverrideTarget=Pxe \
             BootSourceOverrideEnabled=Once BootSourceOverrideMode=UEFI but reports \
             BootSourceOverrideTarget=Pxe BootSourceOverrideEnabled=Continuous \
             BootSourceOverrideMode=UEFI",
            emu.url
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_the_bmc_answered() {
    let emu = emulator();

    // Wrong password: 401, named as a credentials problem, password not echoed.
    let e = driver(&emu.url, "wrong-pw").query().await.unwrap_err();
    assert_eq!(e.code(), "bmc_credentials", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("rejected the credentials of user stork"),
        "{msg}"
    );
    assert!(msg.contains("HTTP 401"), "{msg}");
    assert!(!msg.contains("wrong-pw"), "{msg}");

    // A system that does not exist: the status and the emulator's own message.
    let mut p = RedfishParams::new(&emu.url, USER, PASSWORD);
    p.system_id = Some("no-such-system".into());
    let e = PowerDriver::new(PowerParams::Redfish(p))
        .query()
        .await
        .unwrap_err();
    let PowerError::Redfish(RedfishError::Status { status, body, .. }) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(*status, 404, "{e}");
    assert!(body.contains("no-such-system"), "{e}");

    // Nothing listening: unreachable after the attempts, promptly.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut p = RedfishParams::new(&format!("http://127.0.0.1:{port}"), USER, PASSWORD);
    p.timeout_ms = 500;
    p.attempts = 2;
    let e = PowerDriver::new(PowerParams::Redfish(p))
        .power_on()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "bmc_unreachable", "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "Redfish BMC http://127.0.0.1:{port} unreachable (GET /redfish/v1/Systems, 2 attempts)"
        )),
        "{e}"
    );
}

/// Redfish params as the API stores them (JSON, checked when read).
fn params(fields: serde_json::Value) -> Result<PowerParams, String> {
    let mut v = json!({ "driver": "redfish", "username": USER, "password": PASSWORD });
    for (k, x) in fields.as_object().expect("an object") {
        v[k] = x.clone();
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn tls_driver(fields: serde_json::Value) -> PowerDriver {
    let mut fields = fields;
    fields["timeout_ms"] = json!(5000);
    PowerDriver::new(params(fields).unwrap_or_else(|e| panic!("{e}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_pinned_certificate_or_a_ca_file() {
    let cert = self_signed();
    let emu = emulator_tls(&cert);
    let pin = Fingerprint::of(&cert.der);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("bmc-ca.pem");
    std::fs::write(&ca, &cert.cert_pem).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, self_signed().cert_pem).unwrap();

    // Pinned: the address in the URL, which the certificate does not name.
    let pinned = tls_driver(json!({ "url": emu.url, "fingerprint": pin.to_string() }));
    // By CA: the certificate is its own CA, and the URL's host is the name it carries.
    let localhost = format!("https://localhost:{}", emu.port);
    let by_ca = tls_driver(json!({ "url": localhost, "ca_file": ca }));

    assert_eq!(pinned.query().await.unwrap(), PowerState::Off);
    pinned.power_on().await.unwrap();
    wait_state(&pinned, PowerState::On, &emu).await;
    assert_eq!(by_ca.query().await.unwrap(), PowerState::On);
    by_ca.power_off(false).await.unwrap();
    wait_state(&by_ca, PowerState::Off, &emu).await;
    by_ca.power_on().await.unwrap();
    wait_state(&by_ca, PowerState::On, &emu).await;
    pinned.power_off(false).await.unwrap();
    wait_state(&pinned, PowerState::Off, &emu).await;
    // PATCH (with the ETag) and the read-back, over TLS.
    pinned
        .set_boot_device(BootDevice::Pxe, true, true)
        .await
        .unwrap();

    // Certificates that are not the trusted one: each refused at the handshake, promptly
    // (no retries), with what was expected and what was found. `system_id` names a path
    // that no request of the trusted drivers uses, to look for in the emulator's log.
    let other_pin = Fingerprint::of(b"another certificate");
    let refusals = [
        (
            json!({ "url": emu.url, "fingerprint": other_pin.to_string() }),
            vec![
                "its TLS certificate is not the pinned one".to_string(),
                format!("the server's certificate is {pin}, not the pinned {other_pin}"),
            ],
        ),
        (
            json!({ "url": localhost, "ca_file": other_ca }),
            vec![
                // Both certificates carry rcgen's default subject, so webpki finds the
                // other CA as the issuer and says the signature is bad.
                format!(
                    "its TLS certificate is not one issued for that host by a CA in {} (BadSignature",
                    other_ca.display()
                ),
                format!("it presents {pin}"),
            ],
        ),
        (
            // The right CA, but the certificate does not name the URL's host.
            json!({ "url": emu.url, "ca_file": ca }),
            vec![
                format!(
                    "its TLS certificate is not one issued for that host by a CA in {} \
                     (certificate not valid for name \"127.0.0.1\"",
                    ca.display()
                ),
                format!("it presents {pin}"),
            ],
        ),
    ];
    for (mut fields, says) in refusals {
        fields["system_id"] = json!("never-asked");
        let e = tls_driver(fields.clone()).query().await.unwrap_err();
        assert!(
            matches!(e, PowerError::Redfish(RedfishError::Certificate { .. })),
            "{fields}: {e:?}"
        );
        assert_eq!(e.code(), "bmc_tls", "{e}");
        let msg = e.to_string();
        for s in says {
            assert!(msg.contains(&s), "{fields}: {msg:?} does not say {s:?}");
        }
        assert!(msg.ends_with("nothing was sent to it"), "{msg}");
        assert!(!msg.contains(PASSWORD), "{msg}");
    }
    // No request of the refused drivers reached the emulator's HTTP layer (werkzeug logs
    // every request line; a trusted request after them orders the log).
    pinned.query().await.unwrap();
    let log = std::fs::read_to_string(emu.process.log()).unwrap_or_default();
    assert!(log.contains("GET /redfish/v1/Systems/"), "{log}");
    assert!(!log.contains("never-asked"), "{log}");
}

/// A TLS server on loopback with `cert` that records the plaintext every connection sends
/// (up to the end of the first request head) and answers nothing: what a client told the
/// BMC.
struct Recorder {
    port: u16,
    heard: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(cert: &SelfSigned) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring's protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
        )
        .expect("a server config for the certificate");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = listener.local_addr().expect("the listener's port").port();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (heard, connections, stop) = (heard.clone(), connections.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((sock, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    sock.set_nonblocking(false).expect("a blocking socket");
                    sock.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("a read timeout");
                    let conn =
                        rustls::ServerConnection::new(config.clone()).expect("a server connection");
                    let mut tls = rustls::StreamOwned::new(conn, sock);
                    let mut buf = [0u8; 4096];
                    // Ends at the client's alert (a refused certificate), at EOF, or once
                    // a whole request head is in; dropping the stream closes it.
                    while let Ok(n @ 1..) = tls.read(&mut buf) {
                        let mut heard = heard.lock().unwrap_or_else(|e| e.into_inner());
                        heard.extend_from_slice(&buf[..n]);
                        if heard.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
        });
        Self {
            port,
            heard,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    fn heard(&self) -> String {
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&heard).into_owned()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_hears_no_request_and_no_credentials() {
    let cert = self_signed();
    let bmc = Recorder::start(&cert);
    let url = format!("https://127.0.0.1:{}", bmc.port);

    let wrong = Fingerprint::of(&self_signed().der);
    let e = tls_driver(json!({ "url": url, "fingerprint": wrong.to_string(), "attempts": 1 }))
        .power_on()
        .await
        .unwrap_err();
    assert!(
        matches!(e, PowerError::Redfish(RedfishError::Certificate { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("not the pinned one"), "{e}");
    // It connected (the refusal is the handshake's, not an unreachable port), and sent
    // nothing after the handshake.
    assert!(bmc.connections.load(Ordering::Relaxed) >= 1);
    assert_eq!(bmc.heard(), "");

    // The control: with the right pin the same server hears the request and its
    // credentials (then closes without an answer).
    let right = Fingerprint::of(&cert.der);
    let e = tls_driver(json!({ "url": url, "fingerprint": right.to_string(), "attempts": 1 }))
        .query()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "bmc_unreachable", "{e}");
    let heard = bmc.heard().to_ascii_lowercase();
    assert!(
        heard.starts_with("get /redfish/v1/systems http/1.1"),
        "{heard}"
    );
    assert!(heard.contains("authorization: basic "), "{heard}");
}

#[test]
fn https_needs_a_fingerprint_or_a_ca_file() {
    // Checked where the API checks a new machine's params (deserialization).
    let e = params(json!({ "url": "https://10.0.0.6" })).unwrap_err();
    for says in [
        "url: https://10.0.0.6 uses https, so",
        "`fingerprint`",
        "`ca_file`",
        "does not accept whatever certificate",
    ] {
        assert!(e.contains(says), "{e}");
    }
    let e = params(json!({ "url": "https://10.0.0.6", "fingerprint": "AB:CD" })).unwrap_err();
    assert!(
        e.starts_with("fingerprint: \"AB:CD\" is not a SHA-256 fingerprint"),
        "{e}"
    );
    // Plain HTTP as before.
    params(json!({ "url": "http://10.0.0.6:8000" })).unwrap();
}
