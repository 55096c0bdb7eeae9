//! Two appliances (`stork serve`) on one PostgreSQL database, a scratch server of the test's
//! own (Debian's binaries, a unix socket in a temporary directory): what one writes, the
//! other's API shows at once; one's event stream shows the other's changes as they happen;
//! a token made through one works on the other; both ride out a PostgreSQL restart.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{Options, Server, mac_addr};
use stork::lifecycle::Status;
use stork_lab::postgres::ScratchPostgres;
use stork_proto::api::{EventRecord, MachineFilter, NewMachine, PowerConfig};

const PASSWORD: &str = "pg-test-bmc-secret-4711";

/// Waits for the first event `want` accepts on `rx`, failing with what came instead.
fn wait_event(
    rx: &mpsc::Receiver<EventRecord>,
    what: &str,
    want: impl Fn(&EventRecord) -> bool,
) -> EventRecord {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(e) if want(&e) => return e,
            Ok(e) => seen.push(e),
            Err(_) => panic!("no event {what} in 60 s; the stream brought {seen:#?}"),
        }
    }
}

/// A scratch PostgreSQL with an empty database `name` (and its URL), and the secrets key
/// file every appliance sharing it seals and opens BMC passwords with (in a directory that
/// lives as long as the returned guard).
fn shared(name: &str) -> (ScratchPostgres, String, tempfile::TempDir, String) {
    let pg = ScratchPostgres::start().expect("a scratch PostgreSQL");
    let url = pg.create_database(name).expect("createdb");
    let keys = tempfile::tempdir().expect("a directory for the key");
    let key = keys.path().join("secrets.key").display().to_string();
    (pg, url, keys, key)
}

#[test]
fn two_appliances_share_one_postgres_database() {
    let (mut pg, url, _keys, key) = shared("stork");
    let env = [("STORK_SECRETS_KEY", key.as_str())];
    let opts = || Options {
        database: Some(&url),
        env: &env,
        ..Options::default()
    };
    let a = Server::start(opts());
    let b = Server::start(opts());
    let (ca, cb) = (a.client(), b.client());

    // A's live event stream, from the start.
    let (tx, rx) = mpsc::channel();
    let follower = a.client();
    std::thread::spawn(move || {
        let _ = follower.follow_events(None, |e| tx.send(e).is_ok());
    });

    // Made through A, with a BMC password: B shows it, password and all.
    let mut params = serde_json::Map::new();
    params.insert("host".into(), "127.0.0.1".into());
    params.insert("username".into(), "admin".into());
    params.insert("password".into(), PASSWORD.into());
    let ipmi = PowerConfig {
        driver: "ipmi".into(),
        params,
    };
    let bmc = ca
        .create_machine(&NewMachine {
            macs: vec![mac_addr(1)],
            hostname: Some("pg-bmc".into()),
            power: Some(ipmi.clone()),
            ..NewMachine::default()
        })
        .unwrap();
    let m = ca
        .create_machine(&NewMachine {
            macs: vec![mac_addr(2)],
            hostname: Some("pg-1".into()),
            ..NewMachine::default()
        })
        .unwrap();
    assert_eq!(cb.machine(&m.id).unwrap().hostname.as_deref(), Some("pg-1"));
    assert_eq!(
        cb.machines(&MachineFilter::default()).unwrap().len(),
        2,
        "B lists A's machines"
    );
    let shown = serde_json::to_string(&cb.machine(&bmc.id).unwrap()).unwrap();
    assert!(!shown.contains(PASSWORD), "the API never shows it: {shown}");
    // In the database it is sealed, never in clear.
    let mut direct = postgres::Config::new()
        .host_path(pg.socket_dir())
        .user(stork_lab::postgres::USER)
        .dbname("stork")
        .connect(postgres::NoTls)
        .unwrap();
    let stored: String = direct
        .query_one("SELECT power FROM machines WHERE id = $1", &[&bmc.id])
        .unwrap()
        .get(0);
    assert!(!stored.contains(PASSWORD), "stored in clear: {stored}");

    // Acted on through B: A sees the change, and A's stream shows it as it happens.
    wait_event(&rx, "of pg-1's creation", |e| e.machine_id == m.id);
    cb.commission(&m.id).unwrap();
    assert_eq!(ca.machine(&m.id).unwrap().status, Status::Commissioning);
    wait_event(&rx, "of B's commissioning on A's stream", |e| {
        e.machine_id == m.id && e.new_status == Some(Status::Commissioning)
    });

    // One token table: A's token works on B.
    cb.with_token(a.token.clone())
        .machines(&MachineFilter::default())
        .expect("A's token on B");

    // PostgreSQL restarts: both appliances reconnect, and A's stream still follows B.
    pg.restart().unwrap();
    let again = cb
        .create_machine(&NewMachine {
            macs: vec![mac_addr(3)],
            hostname: Some("after-restart".into()),
            ..NewMachine::default()
        })
        .expect("B writes after the restart");
    assert_eq!(
        ca.machine(&again.id).unwrap().hostname.as_deref(),
        Some("after-restart")
    );
    wait_event(&rx, "of B's machine made after the restart", |e| {
        e.machine_id == again.id
    });
    drop(direct);
}

#[test]
fn an_unreachable_database_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // A socket directory with no server in it.
    let url = format!(
        "postgresql://stork@localhost/stork?host={}",
        dir.path().display()
    );
    let out = std::process::Command::new(common::BIN)
        .args(["token", "create", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--database", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach PostgreSQL") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
}

/// `stork db migrate`: an appliance's SQLite store moved into PostgreSQL; an appliance on
/// PostgreSQL then serves the same machines, and the old appliance's token still works.
#[test]
fn an_appliance_moves_from_sqlite_to_postgres_with_its_machines_and_tokens() {
    let mut old = Server::start(Options::default());
    let made = old
        .client()
        .create_machine(&NewMachine {
            macs: vec![mac_addr(7), mac_addr(8)],
            hostname: Some("moved".into()),
            tags: vec!["rack7".into()],
            ..NewMachine::default()
        })
        .unwrap();
    let before = old.client().machine(&made.id).unwrap();
    old.kill();

    let pg = ScratchPostgres::start().expect("a scratch PostgreSQL");
    let url = pg.create_database("moved").unwrap();
    let data = old.data_dir();
    let migrate = || {
        std::process::Command::new(common::BIN)
            .args(["db", "migrate", "--from"])
            .arg(format!("sqlite:{}", data.join("stork.db").display()))
            .args(["--to", &url, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap()
    };
    let out = migrate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("machines") && l.contains(" 1 rows")),
        "{stdout}"
    );
    // A second run finds the target holding records and changes nothing.
    let again = migrate();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let key = data.join("secrets.key");
    let env = [("STORK_SECRETS_KEY", key.to_str().unwrap())];
    let new = Server::start(Options {
        database: Some(&url),
        env: &env,
        ..Options::default()
    });
    let after = new
        .client()
        .with_token(old.token.clone())
        .machine(&made.id)
        .expect("the old token, on the new appliance");
    assert_eq!(after, before);
}

/// Waits until `server`'s log holds `text`.
fn wait_log(server: &Server, text: &str) {
    stork_lab::wait_for(
        &format!("{text:?} in the log"),
        Duration::from_secs(60),
        Duration::from_millis(100),
        || Ok(server.logs().contains(text).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", server.logs()));
}

/// The periodic duties (timeouts, power polls) run on exactly one of the appliances; when
/// it is killed, the other takes them over and a machine's timeout still fires.
#[test]
fn the_other_appliance_takes_over_the_timeouts_when_the_one_on_duty_dies() {
    let (_pg, url, _keys, key) = shared("duty");
    let env = [("STORK_SECRETS_KEY", key.as_str())];
    let opts = || Options {
        database: Some(&url),
        env: &env,
        config: "[lifecycle]\ncheck_interval = 1\ntimeout = 5\n",
        ..Options::default()
    };
    let mut a = Server::start(opts());
    wait_log(&a, "on duty");
    let b = Server::start(opts());
    wait_log(&b, "standing by");
    assert!(!b.logs().contains("on duty"), "both on duty:\n{}", b.logs());

    // Commissioning, with no agent coming: only the timeout moves it on.
    let m = b
        .client()
        .create_machine(&NewMachine {
            macs: vec![mac_addr(9)],
            ..NewMachine::default()
        })
        .unwrap();
    b.client().commission(&m.id).unwrap();
    a.kill();
    wait_log(&b, "on duty");
    let failed = stork_lab::wait_for(
        "the commissioning timeout",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let now = b.client().machine(&m.id)?;
            Ok((now.status == Status::FailedCommissioning).then_some(now))
        },
    )
    .unwrap();
    assert!(
        failed
            .status_message
            .as_deref()
            .is_some_and(|w| w.contains("timed out")),
        "{failed:?}"
    );
}

/// A power action on a machine of another site is queued for that site and done by its
/// appliance, even one that starts after it was asked; a machine added through an
/// appliance is that appliance's site's unless the request names one.
#[test]
fn a_power_action_on_another_sites_machine_waits_for_and_is_done_by_that_site() {
    let (_pg, url, _keys, key) = shared("sites");
    let env = [("STORK_SECRETS_KEY", key.as_str())];
    let opts = |args| Options {
        database: Some(&url),
        env: &env,
        args,
        ..Options::default()
    };
    let a = Server::start(opts(&["--site", "rack-a"]));
    let ca = a.client();
    let here = ca
        .create_machine(&NewMachine {
            macs: vec![mac_addr(20)],
            ..NewMachine::default()
        })
        .unwrap();
    assert_eq!(here.site.as_deref(), Some("rack-a"));
    let bad = ca.create_machine(&NewMachine {
        macs: vec![mac_addr(22)],
        site: Some("no spaces".into()),
        ..NewMachine::default()
    });
    assert!(format!("{:?}", bad.unwrap_err()).contains("site"));
    let there = ca
        .create_machine(&NewMachine {
            macs: vec![mac_addr(21)],
            site: Some("rack-b".into()),
            ..NewMachine::default()
        })
        .unwrap();
    assert_eq!(there.site.as_deref(), Some("rack-b"));

    // Asked through A, with no appliance of rack-b running: queued, not done.
    ca.commission(&there.id).unwrap();
    let history = |c: &stork_client::Client| -> Vec<(String, String)> {
        c.machine_events(&there.id, 0)
            .unwrap()
            .into_iter()
            .map(|e| (e.actor, e.message))
            .collect()
    };
    let asked = history(&ca);
    assert!(
        asked.iter().any(|(actor, m)| actor == "controller@rack-a"
            && m.contains("netboot_and_power_on asked of site rack-b")),
        "{asked:#?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !history(&ca)
            .iter()
            .any(|(actor, _)| actor == "controller@rack-b"),
        "done with no appliance of rack-b"
    );

    // rack-b's appliance starts and does it (a manual machine: the power action says a
    // person must act, which is the driver's answer).
    let b = Server::start(opts(&["--site", "rack-b"]));
    let done = stork_lab::wait_for(
        "rack-b's appliance to take the power action",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(history(&b.client()).into_iter().find(|(actor, m)| {
                actor == "controller@rack-b" && m.starts_with("power: NetbootAndPowerOn")
            }))
        },
    )
    .unwrap();
    assert!(done.1.contains("manual power"), "{done:?}");
}
