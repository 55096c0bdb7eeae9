//! The Redfish driver against a real Redfish emulator: `sushy-emulator --fake` from
//! sushy-tools (PyPI), installed on first use into a venv under `target/venv-sushy`.
//!
//! What the fake driver does, and the tests rely on: power changes are applied 1-11 s
//! after `ComputerSystem.Reset` (randomly), so the tests wait for the state; a boot
//! override PATCH with `BootSourceOverrideEnabled: Once` answers 204 but stores
//! `Continuous`, which the driver must catch when it reads the override back. Its state
//! lives in `$TMPDIR/sushy-emulator/`, so each emulator here gets its own TMPDIR.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use stork::power::{
    BootDevice, PowerDriver, PowerError, PowerParams, PowerState, RedfishError, RedfishParams,
};
use stork_lab::Spawned;

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
    process: Spawned,
    _dir: tempfile::TempDir,
}

/// Starts `sushy-emulator --fake` on a free loopback port, with basic auth.
fn emulator() -> Emulator {
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
    let config = dir.path().join("sushy.conf");
    std::fs::write(
        &config,
        format!(
            "SUSHY_EMULATOR_AUTH_FILE = {:?}\n",
            htpasswd.display().to_string()
        ),
    )
    .expect("writing the sushy config");
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
    let url = format!("http://127.0.0.1:{port}");
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
    let started = Instant::now();
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
    assert!(started.elapsed() < Duration::from_secs(5));
}
