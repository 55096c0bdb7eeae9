//! The REST API against the real `stork serve` (a child process) with a real SQLite file:
//! the happy path, every illegal transition, timeouts, auth, bad input and secrets.
//! The agent is played by the test: it reads its token from the boot script, as a machine
//! does.

mod common;

use std::time::Duration;

use common::{Api, Options, Resp, Server, inventory, mac, script_identity, status_history};
use serde_json::{Value, json};
use stork::lifecycle::{Event, Status, transition};
use stork_lab::wait_for;

const IMAGE: &str = "debian-12";

/// A server, its client and the admin token.
struct Fixture {
    server: Server,
    api: Api,
    admin: String,
}

/// A machine the test drives; `token` is the agent token of its latest boot script.
#[derive(Debug, Clone)]
struct M {
    id: String,
    mac: String,
    token: Option<String>,
}

impl Fixture {
    fn new() -> Self {
        Self::with(Options::default())
    }

    fn with(opts: Options<'_>) -> Self {
        let server = Server::start(opts);
        let api = server.api();
        let admin = server.token.clone();
        let f = Self { server, api, admin };
        f.register_image();
        f
    }

    fn get(&self, path: &str) -> Resp {
        self.api.get(path, Some(&self.admin))
    }

    fn post(&self, path: &str, body: Value) -> Resp {
        self.api.post(path, Some(&self.admin), &body)
    }

    fn register_image(&self) {
        let (size, sha256) = self
            .server
            .boot_file("images/debian-12/root.tar", b"not really a tarball");
        let r = self.post(
            "/boot-resources",
            json!({
                "name": IMAGE, "kind": "os", "arch": "amd64",
                "files": [{"role": "tar", "path": "images/debian-12/root.tar", "sha256": sha256, "size": size}],
            }),
        );
        assert_eq!(r.status, 201, "{}", r.text);
    }

    fn create(&self, n: u32) -> M {
        self.create_with(n, json!({"driver": "manual"}), &[])
    }

    fn create_with(&self, n: u32, power: Value, tags: &[&str]) -> M {
        let mac = mac(n);
        let r = self.post(
            "/machines",
            json!({"macs": [mac], "power": power, "tags": tags, "hostname": format!("node{n}")}),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["status"], "new");
        M {
            id: r.body["id"].as_str().expect("id").to_string(),
            mac,
            token: None,
        }
    }

    fn machine(&self, id: &str) -> Value {
        self.get(&format!("/machines/{id}")).ok()
    }

    fn status(&self, id: &str) -> Status {
        let m = self.machine(id);
        Status::parse(m["status"].as_str().expect("status")).expect("known status")
    }

    fn events(&self, id: &str) -> Vec<Value> {
        let v = self.get(&format!("/machines/{id}/events")).ok();
        v.as_array().expect("events array").clone()
    }

    /// A user action; asserts success and the resulting status.
    #[track_caller]
    fn act(&self, m: &M, action: &str, body: Value, want: Status) -> Value {
        let r = self.post(&format!("/machines/{}/{action}", m.id), body);
        assert_eq!(r.status, 200, "{action} {}: {}", m.id, r.text);
        assert_eq!(r.body["status"], want.as_str(), "{action}: {}", r.text);
        r.body
    }

    /// What the machine's firmware does: fetch its iPXE script. Returns the script.
    fn boot_script(&self, m: &M) -> String {
        let r = self.api.get(&format!("/ipxe/{}", m.mac), None);
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.text.starts_with("#!ipxe\n"), "{}", r.text);
        r.text
    }

    /// Boots the agent: the script's token becomes the machine's agent token.
    fn boot(&self, m: &mut M) {
        let script = self.boot_script(m);
        let (id, token) = script_identity(&script).expect("script names machine and token");
        assert_eq!(id, m.id);
        assert!(token.starts_with("stork_agent_"), "{token}");
        m.token = Some(token);
    }

    fn agent_post(&self, m: &M, what: &str, body: Option<Value>) -> Resp {
        let path = format!("/agent/{}/{what}", m.id);
        let token = m.token.as_deref();
        match body {
            Some(b) => self.api.post(&path, token, &b),
            None => self.api.post_empty(&path, token),
        }
    }

    /// A new machine driven through the API (and the agent endpoints) into `target`.
    /// `None` for Releasing: with manual power a plain release completes at once.
    fn drive(&self, n: u32, target: Status) -> Option<M> {
        use Status as S;
        let mut m = match target {
            S::New => return Some(self.create(n)),
            S::Releasing => return None,
            S::Commissioning | S::Broken => self.create(n),
            S::FailedCommissioning | S::Ready => self.drive(n, S::Commissioning)?,
            S::Allocated => self.drive(n, S::Ready)?,
            S::Deploying | S::DiskErasing => self.drive(n, S::Allocated)?,
            S::Deployed | S::FailedDeployment => self.drive(n, S::Deploying)?,
            S::FailedReleasing => self.drive(n, S::DiskErasing)?,
        };
        match target {
            S::Commissioning => {
                self.act(&m, "commission", json!({}), target);
                self.boot(&mut m);
            }
            S::Broken => {
                self.act(&m, "mark-broken", json!({"reason": "test"}), target);
            }
            S::Ready => {
                let r = self.agent_post(&m, "commissioned", Some(inventory(&m.mac, 4, 8, 100)));
                assert_eq!(r.status, 200, "{}", r.text);
                assert_eq!(r.body["status"], "ready");
            }
            S::Allocated => {
                self.act(&m, "allocate", json!({}), target);
            }
            S::Deploying => {
                self.act(&m, "deploy", json!({"image": IMAGE}), target);
                self.boot(&mut m);
            }
            S::Deployed => {
                let r = self.agent_post(&m, "deployed", None);
                assert_eq!(r.status, 204, "{}", r.text);
            }
            S::DiskErasing => {
                self.act(&m, "release", json!({"erase": true}), target);
                self.boot(&mut m);
            }
            S::FailedCommissioning | S::FailedDeployment | S::FailedReleasing => {
                self.act(&m, "abort", json!({}), target);
            }
            S::New | S::Releasing => unreachable!(),
        }
        assert_eq!(self.status(&m.id), target);
        Some(m)
    }
}

#[test]
fn happy_path() {
    let f = Fixture::new();
    let admin = Some(f.admin.as_str());

    // A real SQLite file in WAL mode.
    assert!(f.server.data_dir().join("stork.db").is_file());
    assert!(f.server.data_dir().join("stork.db-wal").exists());

    // Create with manual power, then commission: the appliance asks a person to power it.
    let mut a = f.create_with(1, json!({"driver": "manual"}), &["rack1"]);
    let shown = f.machine(&a.id);
    assert_eq!(shown["macs"], json!([a.mac]));
    assert_eq!(shown["boot_mac"], a.mac.as_str());
    assert_eq!(shown["power"]["driver"], "manual");
    // By MAC too.
    assert_eq!(f.machine(&a.mac)["id"], a.id.as_str());

    f.act(&a, "commission", json!({}), Status::Commissioning);
    let events = f.events(&a.id);
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("manual power"))),
        "no manual-power event: {events:#?}"
    );

    // The agent: its token comes only from the boot script.
    let first_script = f.boot_script(&a);
    let (id, token) = script_identity(&first_script).expect("identity in script");
    assert_eq!(id, a.id);
    let kernel = first_script
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap();
    assert!(
        kernel.contains(&format!("stork.machine={} stork.token={token}", a.id)),
        "{kernel}"
    );
    a.token = Some(token);
    let task = f
        .api
        .get(&format!("/agent/{}/task", a.id), a.token.as_deref())
        .ok();
    assert_eq!(task, json!({"kind": "commission"}));

    let r = f.agent_post(&a, "commissioned", Some(inventory(&a.mac, 4, 8, 100)));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"machine_id": a.id, "status": "ready"}));
    let shown = f.machine(&a.id);
    assert_eq!(shown["status"], "ready");
    assert_eq!(shown["inventory"]["cpu"]["count"], 4);
    // Commissioning's token died with commissioning.
    let commissioning_token = a.token.clone();
    assert_eq!(
        f.api
            .get(
                &format!("/agent/{}/task", a.id),
                commissioning_token.as_deref()
            )
            .status,
        401
    );

    // The image is registered (by the fixture) and listed.
    let images = f.get("/boot-resources").ok();
    assert_eq!(images[0]["name"], IMAGE);
    assert_eq!(images[0]["files"][0]["path"], "images/debian-12/root.tar");
    let key = f.post(
        "/ssh-keys",
        json!({"name": "ops", "key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA ops@site"}),
    );
    assert_eq!(key.status, 201, "{}", key.text);
    assert_eq!(f.get("/ssh-keys").ok().as_array().map(Vec::len), Some(1));

    // Allocate by id.
    let allocated = f.act(&a, "allocate", json!({}), Status::Allocated);
    assert!(
        allocated["owner"].as_str().unwrap().starts_with("api:"),
        "{allocated}"
    );

    // Allocate by constraints: B is the only Ready machine with 16 CPUs and tag gpu.
    let mut b = f.create_with(2, json!({"driver": "manual"}), &["gpu"]);
    f.act(&b, "commission", json!({}), Status::Commissioning);
    f.boot(&mut b);
    let r = f.agent_post(&b, "commissioned", Some(inventory(&b.mac, 16, 64, 500)));
    assert_eq!(r.status, 200, "{}", r.text);
    let none = f.post("/machines/allocate", json!({"min_cpus": 32}));
    assert_eq!(none.status, 409, "{}", none.text);
    assert_eq!(none.code(), "no_machine");
    let none = f.post(
        "/machines/allocate",
        json!({"tags": ["gpu"], "min_disk_gib": 1000}),
    );
    assert_eq!(none.status, 409, "{}", none.text);
    let got = f
        .post(
            "/machines/allocate",
            json!({"min_cpus": 8, "min_memory_mib": 32768, "min_disk_gib": 400, "arch": "amd64", "tags": ["gpu"], "owner": "alice"}),
        )
        .ok();
    assert_eq!(got["id"], b.id.as_str());
    assert_eq!(got["status"], "allocated");
    assert_eq!(got["owner"], "alice");

    // Deploy A; every boot gets a fresh token and the previous one stops working.
    f.act(
        &a,
        "deploy",
        json!({"image": IMAGE, "hostname": "web1", "ssh_keys": ["ssh-ed25519 AAAAreq user@req"], "user_data": "#cloud-config\n"}),
        Status::Deploying,
    );
    f.boot(&mut a);
    let old = a.token.clone();
    f.boot(&mut a);
    assert_ne!(old, a.token);
    let r = f.api.get(&format!("/agent/{}/task", a.id), old.as_deref());
    assert_eq!(r.status, 401, "old token: {}", r.text);
    let task = f
        .api
        .get(&format!("/agent/{}/task", a.id), a.token.as_deref())
        .ok();
    assert_eq!(task["kind"], "deploy", "{task}");
    assert_eq!(task["hostname"], "web1");
    assert_eq!(task["target"], "disk");
    assert_eq!(task["user_data"], "#cloud-config\n");
    let url = task["image"][0]["url"].as_str().unwrap();
    assert!(url.ends_with("/boot/images/debian-12/root.tar"), "{url}");
    assert_eq!(task["image"][0]["size"], 20);
    let keys: Vec<&str> = task["ssh_keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "ssh-ed25519 AAAAreq user@req",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA ops@site"
        ]
    );
    // The image is really served there.
    let served = f.api.get("/boot/images/debian-12/root.tar", None);
    assert_eq!(served.text, "not really a tarball");

    let r = f.agent_post(&a, "deployed", None);
    assert_eq!(r.status, 204, "{}", r.text);
    let shown = f.machine(&a.id);
    assert_eq!(shown["status"], "deployed");
    assert_eq!(shown["hostname"], "web1");
    assert_eq!(shown["deploy"]["image"], IMAGE);
    // A deployed machine boots its disk.
    assert!(f.boot_script(&a).contains("\nexit 1\n"));

    // Release with erase: the agent erases, then reports.
    f.act(&a, "release", json!({"erase": true}), Status::DiskErasing);
    f.boot(&mut a);
    let task = f
        .api
        .get(&format!("/agent/{}/task", a.id), a.token.as_deref())
        .ok();
    assert_eq!(task, json!({"kind": "erase", "quick": true}));
    let r = f.agent_post(
        &a,
        "events",
        Some(json!({"step": "erase", "state": "progress", "progress": 0.5, "message": "vda"})),
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let r = f.agent_post(&a, "released", None);
    assert_eq!(r.status, 204, "{}", r.text);
    let shown = f.machine(&a.id);
    assert_eq!(shown["status"], "ready");
    assert_eq!(shown["owner"], Value::Null);
    assert_eq!(shown["deploy"], Value::Null);

    // Broken and fixed: a commissioned machine comes back Ready.
    let broken = f.act(
        &a,
        "mark-broken",
        json!({"reason": "fan failure"}),
        Status::Broken,
    );
    assert_eq!(broken["status_message"], "fan failure");
    f.act(&a, "mark-fixed", json!({}), Status::Ready);

    // Abort from commissioning.
    f.act(&a, "commission", json!({}), Status::Commissioning);
    let aborted = f.act(&a, "abort", json!({}), Status::FailedCommissioning);
    assert_eq!(aborted["status_message"], "aborted by user");

    // Direct power control is recorded and leaves the status alone.
    let q = f
        .post(&format!("/machines/{}/power/query", a.id), json!({}))
        .ok();
    assert_eq!(
        q,
        json!({"machine_id": a.id, "op": "query", "state": "unknown"})
    );
    let on = f.post(&format!("/machines/{}/power/on", a.id), json!({}));
    assert_eq!(
        (on.status, on.code()),
        (502, "manual_action_required"),
        "{}",
        on.text
    );
    let last = f.events(&a.id).pop().unwrap();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("power on failed"),
        "{last}"
    );
    assert_eq!(f.status(&a.id), Status::FailedCommissioning);

    // Filters.
    let failed = f.get("/machines?status=failed_commissioning").ok();
    assert_eq!(failed.as_array().unwrap().len(), 1);
    assert_eq!(failed[0]["id"], a.id.as_str());
    let gpu = f.get("/machines?tag=gpu").ok();
    assert_eq!(gpu.as_array().unwrap().len(), 1);
    assert_eq!(gpu[0]["id"], b.id.as_str());
    assert_eq!(f.get("/machines").ok().as_array().unwrap().len(), 2);

    // The whole history is recorded and every step is an edge of the table.
    let history = status_history(&f.events(&a.id)).unwrap();
    use Status as S;
    assert_eq!(
        history,
        [
            S::New,
            S::Commissioning,
            S::Ready,
            S::Allocated,
            S::Deploying,
            S::Deployed,
            S::DiskErasing,
            S::Ready,
            S::Broken,
            S::Ready,
            S::Commissioning,
            S::FailedCommissioning
        ]
    );
    let all = f.get(&format!("/events?machine={}", a.id)).ok();
    assert_eq!(all.as_array().unwrap().len(), f.events(&a.id).len());
    assert!(
        f.get("/events?after=0&limit=3")
            .ok()
            .as_array()
            .unwrap()
            .len()
            == 3
    );
    // The live stream starts with the history.
    let first = f
        .api
        .first_streamed(&format!("/events/stream?machine={}", a.id), &f.admin);
    assert_eq!(first["machine_id"], a.id.as_str());
    assert_eq!(first["new_status"], "new");

    // The CLI reads the same.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(["--url", &f.server.base(), "--token", &f.admin])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stork {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let shown: Value = serde_json::from_str(&cli(&["machine", "show", &a.id, "--json"])).unwrap();
    assert_eq!(shown["status"], "failed_commissioning");
    assert!(cli(&["machine", "list"]).contains(&b.id));
    assert!(
        cli(&["machine", "events", &a.id]).contains("Abort: commissioning -> failed_commissioning")
    );
    assert!(cli(&["image", "list"]).contains(IMAGE));

    // Delete.
    let r = f.api.delete(&format!("/machines/{}", a.id), admin);
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(f.get(&format!("/machines/{}", a.id)).status, 404);
    assert_eq!(
        f.api.delete(&format!("/machines/{}", a.id), admin).status,
        404
    );
    // Its MAC is free again.
    let again = f.create(1);
    assert_ne!(again.id, a.id);
}

/// The user actions and the lifecycle event each one sends.
fn user_actions() -> Vec<(&'static str, Value, Event)> {
    vec![
        ("commission", json!({}), Event::Commission),
        ("allocate", json!({}), Event::Allocate),
        ("deploy", json!({"image": IMAGE}), Event::Deploy),
        ("release", json!({}), Event::Release),
        ("release", json!({"erase": true}), Event::ReleaseErase),
        ("abort", json!({}), Event::Abort),
        ("mark-broken", json!({"reason": "test"}), Event::MarkBroken),
        ("mark-fixed", json!({}), Event::MarkFixed),
    ]
}

/// The status a step ends in as seen through the API: a plain release with manual power
/// completes at once (Releasing -> Ready on the controller's ReleaseDone).
fn settled(to: Status) -> Status {
    if to == Status::Releasing {
        transition(to, Event::ReleaseDone, true)
            .expect("Releasing completes")
            .to
    } else {
        to
    }
}

#[track_caller]
fn assert_rejected(f: &Fixture, m: &M, status: Status, r: &Resp, what: &str, version: &Value) {
    assert_eq!(r.status, 409, "{status} {what}: {}", r.text);
    assert_eq!(
        r.code(),
        "illegal_transition",
        "{status} {what}: {}",
        r.text
    );
    assert!(
        r.message().contains(status.as_str()),
        "{status} {what}: {}",
        r.text
    );
    // Nothing changed...
    let now = f.machine(&m.id);
    assert_eq!(now["status"], status.as_str(), "{what}");
    assert_eq!(
        &now["version"], version,
        "{status} {what}: the machine was saved"
    );
    // ...and the refusal is in the history.
    let events = f.events(&m.id);
    let last = events.last().expect("an event");
    assert_eq!(last["old_status"], status.as_str(), "{what}: {last}");
    assert_eq!(last["new_status"], Value::Null, "{what}: {last}");
    assert!(
        last["message"]
            .as_str()
            .expect("message")
            .starts_with("rejected: "),
        "{what}: {last}"
    );
}

#[test]
fn every_illegal_transition_is_409_and_recorded() {
    let f = Fixture::new();
    let mut n = 100;
    let mut next = || {
        n += 1;
        n
    };
    let (mut accepted, mut rejected) = (0, 0);
    for status in Status::ALL {
        // One machine per status takes every refused action (a refusal changes nothing).
        let Some(sitter) = f.drive(next(), status) else {
            // Releasing: a plain release goes straight on to Ready; show it is transient.
            assert_eq!(status, Status::Releasing);
            let m = f.drive(next(), Status::Allocated).unwrap();
            f.act(&m, "release", json!({}), Status::Ready);
            let history = status_history(&f.events(&m.id)).unwrap();
            assert_eq!(
                &history[history.len() - 2..],
                [Status::Releasing, Status::Ready]
            );
            continue;
        };
        let commissioned = !f.machine(&sitter.id)["inventory"].is_null();
        for (action, body, event) in user_actions() {
            match transition(status, event, commissioned) {
                Err(_) => {
                    let version = f.machine(&sitter.id)["version"].clone();
                    let r = f.post(&format!("/machines/{}/{action}", sitter.id), body);
                    assert_rejected(&f, &sitter, status, &r, &format!("{event:?}"), &version);
                    rejected += 1;
                }
                Ok(step) => {
                    let m = f.drive(next(), status).unwrap();
                    f.act(&m, action, body, settled(step.to));
                    let history = status_history(&f.events(&m.id)).unwrap();
                    assert!(
                        history.contains(&step.to),
                        "{status} {event:?}: {history:?}"
                    );
                    accepted += 1;
                }
            }
        }

        // Agent reports that do not fit the status are refused and recorded too.
        // Only a busy machine has a live agent token; elsewhere the last boot's token is dead.
        if stork::lifecycle::failure_on_timeout(status).is_none() {
            if let Some(stale) = &sitter.token {
                let r = f
                    .api
                    .get(&format!("/agent/{}/task", sitter.id), Some(stale));
                assert_eq!(
                    r.status, 401,
                    "{status}: a stale agent token works: {}",
                    r.text
                );
            }
            continue;
        }
        let reports: [(&str, Option<Value>, Event, u16); 4] = [
            (
                "commissioned",
                Some(inventory(&sitter.mac, 2, 2, 10)),
                Event::CommissioningDone,
                200,
            ),
            ("deployed", None, Event::DeploymentDone, 204),
            ("released", None, Event::ReleaseDone, 204),
            (
                "events",
                Some(json!({"step": "work", "state": "failed", "message": "disk on fire"})),
                Event::AgentFailed,
                204,
            ),
        ];
        for (what, body, event, ok_status) in reports {
            match transition(status, event, commissioned) {
                Err(_) => {
                    let version = f.machine(&sitter.id)["version"].clone();
                    let r = f.agent_post(&sitter, what, body);
                    assert_rejected(&f, &sitter, status, &r, what, &version);
                    rejected += 1;
                }
                Ok(step) => {
                    let m = f.drive(next(), status).unwrap();
                    // The inventory lists the machine's own NIC.
                    let body = body.map(|b| {
                        if what == "commissioned" {
                            inventory(&m.mac, 2, 2, 10)
                        } else {
                            b
                        }
                    });
                    let r = f.agent_post(&m, what, body);
                    assert_eq!(r.status, ok_status, "{status} {what}: {}", r.text);
                    assert_eq!(f.status(&m.id), step.to, "{status} {what}");
                    accepted += 1;
                }
            }
        }
    }
    eprintln!("{accepted} accepted and {rejected} refused (status, action) pairs checked");
    assert!(rejected > 60, "{rejected}");
}

#[test]
fn busy_statuses_time_out_with_the_reason() {
    let f = Fixture::with(Options {
        config: "[lifecycle]\ncheck_interval = 1\n",
        args: &["--timeout", "2"],
        ..Options::default()
    });
    let cases = [
        (Status::Commissioning, Status::FailedCommissioning),
        (Status::Deploying, Status::FailedDeployment),
        (Status::DiskErasing, Status::FailedReleasing),
    ];
    // Idle statuses first: they are older than the timeout when the busy ones fail.
    let ready = f.drive(10, Status::Ready).unwrap();
    let broken = f.drive(11, Status::Broken).unwrap();
    let machines: Vec<M> = cases
        .iter()
        .enumerate()
        .map(|(i, (busy, _))| f.drive(i as u32 + 1, *busy).unwrap())
        .collect();
    for (m, (busy, failed)) in machines.iter().zip(cases) {
        let shown = wait_for(
            "the timeout",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                let shown = f.machine(&m.id);
                Ok((shown["status"] == failed.as_str()).then_some(shown))
            },
        )
        .unwrap();
        let reason = shown["status_message"].as_str().unwrap_or_default();
        assert!(reason.contains("timed out after 2 s"), "{reason}");
        assert!(reason.contains(busy.as_str()), "{reason}");
        let last = f
            .events(&m.id)
            .into_iter()
            .rfind(|e| !e["new_status"].is_null())
            .unwrap();
        assert_eq!(last["actor"], "controller");
        assert!(
            last["message"].as_str().unwrap().contains("TimedOut"),
            "{last}"
        );
        // The agent of the timed-out boot is locked out.
        let r = f
            .api
            .get(&format!("/agent/{}/task", m.id), m.token.as_deref());
        assert_eq!(r.status, 401, "{}", r.text);
        status_history(&f.events(&m.id)).unwrap();
    }
    // Statuses that are not busy never time out.
    assert_eq!(f.status(&ready.id), Status::Ready);
    assert_eq!(f.status(&broken.id), Status::Broken);
}

/// An agent heartbeat with `step`; returns the HTTP status.
fn heartbeat(f: &Fixture, m: &M, step: &str, leaving: bool) -> u16 {
    let r = f.agent_post(
        m,
        "heartbeat",
        Some(json!({"step": step, "leaving": leaving})),
    );
    assert!([202, 204].contains(&r.status), "{}", r.text);
    r.status
}

#[test]
fn heartbeats_keep_busy_machines_alive_and_silence_fails_them() {
    let f = Fixture::with(Options {
        config: "[lifecycle]\ncheck_interval = 1\nheartbeat_timeout = 5\n",
        ..Options::default()
    });
    // Created (so checked) before the silent ones: were the rule to apply to them, it would
    // fail them in the same pass as the silent ones, or an earlier one.
    let installed = f.drive(1, Status::Deploying).unwrap();
    let left = f.drive(2, Status::Deploying).unwrap();
    let alive = f.drive(3, Status::Deploying).unwrap();
    let never = f.drive(4, Status::Deploying).unwrap();

    // A disk deploy: the image is installed, the agent reboots into the OS and goes quiet.
    assert_eq!(heartbeat(&f, &installed, "seed", false), 204);
    let shown = f.machine(&installed.id);
    assert_eq!(shown["heartbeat_step"], "seed");
    assert!(shown["heartbeat_deadline"].as_i64() > shown["last_heartbeat"].as_i64());
    assert_eq!(f.agent_post(&installed, "installed", None).status, 204);
    assert!(f.machine(&installed.id)["heartbeat_deadline"].is_null());
    // A late beat of that agent (its thread raced the reboot) does not re-arm the rule.
    assert_eq!(heartbeat(&f, &installed, "installed", false), 202);
    // A deploy into memory: the agent says it leaves before switching root.
    assert_eq!(heartbeat(&f, &left, "memory", false), 204);
    assert_eq!(heartbeat(&f, &left, "memory", true), 204);
    assert_eq!(heartbeat(&f, &left, "memory", false), 202);
    assert!(f.machine(&left.id)["heartbeat_deadline"].is_null());

    let cases = [
        (
            Status::Commissioning,
            Status::FailedCommissioning,
            "inventory",
        ),
        (Status::Deploying, Status::FailedDeployment, "image"),
        (Status::DiskErasing, Status::FailedReleasing, "erase"),
    ];
    let silent: Vec<M> = cases
        .iter()
        .enumerate()
        .map(|(i, (busy, _, step))| {
            let m = f.drive(10 + i as u32, *busy).unwrap();
            assert_eq!(heartbeat(&f, &m, step, false), 204);
            m
        })
        .collect();
    for (m, (_, failed, step)) in silent.iter().zip(cases) {
        let shown = wait_for(
            "the missed heartbeat",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                // The live agent keeps beating all along.
                heartbeat(&f, &alive, "image", false);
                let shown = f.machine(&m.id);
                Ok((shown["status"] == failed.as_str()).then_some(shown))
            },
        )
        .unwrap();
        let reason = shown["status_message"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("agent stopped answering: last heartbeat ")
                && reason.ends_with(&format!(" s ago (step {step})")),
            "{reason}"
        );
        let last = f
            .events(&m.id)
            .into_iter()
            .rfind(|e| !e["new_status"].is_null())
            .unwrap();
        assert_eq!(last["actor"], "controller");
        assert!(
            last["message"].as_str().unwrap().contains("TimedOut"),
            "{last}"
        );
        // The agent of the failed boot is locked out.
        let r = f.agent_post(m, "heartbeat", Some(json!({"step": step})));
        assert_eq!(r.status, 401, "{}", r.text);
        status_history(&f.events(&m.id)).unwrap();
    }
    // Silence outlasted the allowance while these stayed busy: one kept beating, one is
    // installed, one left, and one never sent a heartbeat (the status timeout rules it).
    for m in [&alive, &installed, &left, &never] {
        assert_eq!(f.status(&m.id), Status::Deploying, "{}", m.id);
    }
    assert!(f.machine(&never.id)["last_heartbeat"].is_null());

    // A new attempt's agent is heard afresh, though the failed one's last beat is on record.
    let mut retry = silent[1].clone();
    f.act(&retry, "deploy", json!({"image": IMAGE}), Status::Deploying);
    f.boot(&mut retry);
    assert_eq!(heartbeat(&f, &retry, "disk", false), 204);
    assert_eq!(f.machine(&retry.id)["heartbeat_step"], "disk");
}

#[test]
fn tokens_401_and_403() {
    let f = Fixture::new();
    let admin = Some(f.admin.as_str());
    let a = f.drive(1, Status::Commissioning).unwrap();
    let b = f.drive(2, Status::Commissioning).unwrap();
    let agent_a = a.token.as_deref();

    // Every admin route: no token 401, a wrong one 401, an agent token 403.
    let admin_routes: &[(&str, String)] = &[
        ("GET", "/machines".into()),
        ("POST", "/machines".into()),
        ("POST", "/machines/allocate".into()),
        ("GET", format!("/machines/{}", a.id)),
        ("DELETE", format!("/machines/{}", a.id)),
        ("GET", format!("/machines/{}/events", a.id)),
        ("POST", format!("/machines/{}/abort", a.id)),
        ("GET", "/events".into()),
        ("GET", "/events/stream".into()),
        ("GET", "/ssh-keys".into()),
        ("POST", "/ssh-keys".into()),
        ("DELETE", "/ssh-keys/x".into()),
        ("GET", "/boot-resources".into()),
        ("POST", "/boot-resources".into()),
        ("GET", "/tokens".into()),
        ("POST", "/tokens".into()),
        ("GET", "/stats".into()),
    ];
    let body = json!({});
    for (method, path) in admin_routes {
        let call = |token: Option<&str>| {
            f.api
                .try_req(
                    method,
                    path,
                    token,
                    (*method == "POST").then_some(common::Body::Json(&body)),
                )
                .unwrap()
        };
        let r = call(None);
        assert_eq!(
            (r.status, r.code()),
            (401, "unauthorized"),
            "{method} {path}: {}",
            r.text
        );
        let r = call(Some("stork_admin_0000"));
        assert_eq!(
            (r.status, r.code()),
            (401, "unauthorized"),
            "{method} {path}: {}",
            r.text
        );
        let r = call(agent_a);
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{method} {path}: {}",
            r.text
        );
    }
    assert_eq!(
        f.status(&a.id),
        Status::Commissioning,
        "nothing was aborted or deleted"
    );

    // Agent routes: no token 401, unknown 401, admin token 403, machine A's token on B 403.
    let inv = inventory(&b.mac, 2, 2, 10);
    let agent_routes: Vec<(&str, &str, Option<Value>)> = vec![
        ("GET", "task", None),
        ("POST", "commissioned", Some(inv.clone())),
        (
            "POST",
            "events",
            Some(json!({"step": "x", "state": "started"})),
        ),
        ("POST", "released", None),
        ("POST", "deployed", None),
        ("POST", "heartbeat", Some(json!({"step": "x"}))),
    ];
    for (method, what, body) in &agent_routes {
        let path = format!("/agent/{}/{what}", b.id);
        let call = |token: Option<&str>| {
            f.api
                .try_req(method, &path, token, body.as_ref().map(common::Body::Json))
                .unwrap()
        };
        assert_eq!(call(None).status, 401, "{path}");
        assert_eq!(call(Some("stork_agent_00")).status, 401, "{path}");
        let r = call(admin);
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{path}: {}",
            r.text
        );
        let r = call(agent_a);
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{path}: {}",
            r.text
        );
    }
    assert_eq!(f.status(&b.id), Status::Commissioning, "B was not touched");
    // B's own token works.
    assert_eq!(
        f.api
            .get(&format!("/agent/{}/task", b.id), b.token.as_deref())
            .status,
        200
    );

    // Boot and enlistment paths need no token.
    assert_eq!(f.api.get(&format!("/ipxe/{}", mac(77)), None).status, 200);
    let enlist = json!({"boot_mac": mac(77), "inventory": inventory(&mac(77), 2, 4, 20)});
    let r = f.api.post("/agent/enlist", None, &enlist);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "new");
    let enlisted = r.body["machine_id"].as_str().unwrap().to_string();
    // Enlisting is recorded as the machine's creation.
    assert_eq!(status_history(&f.events(&enlisted)).unwrap(), [Status::New]);
    let report = json!({"boot_mac": mac(77), "step": "network", "ok": false, "message": "no link"});
    assert_eq!(f.api.post("/agent/report", None, &report).status, 204);
    assert_eq!(f.api.get("/openapi.json", None).status, 200);

    // Admin tokens made through the API work, and are listed without the secret.
    let made = f.post("/tokens", json!({"description": "ci"})).ok();
    let new_token = made["token"].as_str().unwrap();
    assert_eq!(f.api.get("/machines", Some(new_token)).status, 200);
    let list = f.get("/tokens").ok();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(new_token));
}

#[test]
fn bad_input_is_400_naming_the_field() {
    let f = Fixture::new();
    let m = f.drive(1, Status::Allocated).unwrap();
    let admin = Some(f.admin.as_str());
    let check = |r: Resp, needle: &str| {
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.code(), "bad_request", "not a JSON error: {}", r.text);
        assert!(r.message().contains(needle), "{needle:?} not in {}", r.text);
    };
    // Malformed JSON, everywhere a body is read.
    for path in [
        "/machines".to_string(),
        "/machines/allocate".into(),
        format!("/machines/{}/deploy", m.id),
        format!("/machines/{}/commission", m.id),
        "/ssh-keys".into(),
        "/boot-resources".into(),
        "/tokens".into(),
    ] {
        let r = f.api.post_raw(&path, admin, r#"{"macs": ["#);
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert_eq!(
            r.code(),
            "bad_request",
            "{path}: not a JSON error: {}",
            r.text
        );
    }
    check(f.api.post_raw("/agent/enlist", None, "{"), "");
    check(
        f.post("/machines", json!({"macs": [mac(2)], "colour": "red"})),
        "colour",
    );
    check(f.post("/machines", json!({"hostname": "x"})), "macs");
    check(f.post("/machines", json!({"macs": ["zz:zz"]})), "macs");
    check(f.post("/machines", json!({"macs": []})), "macs");
    check(
        f.post(
            "/machines",
            json!({"macs": [mac(2)], "power": {"driver": "telepathy"}}),
        ),
        "power.driver",
    );
    check(
        f.post(
            "/machines",
            json!({"macs": [mac(2)], "power": {"driver": "ipmi", "pw": 1, "x": 2}}),
        ),
        "pw",
    );
    check(
        f.post("/machines/allocate", json!({"min_cpu": 2})),
        "min_cpu",
    );
    check(f.post("/ssh-keys", json!({"name": "k"})), "key");
    check(
        f.post("/ssh-keys", json!({"name": "k", "key": "hello"})),
        "key",
    );
    check(f.post("/boot-resources", json!({"name": "x", "kind": "os", "files": [{"role": "raw", "path": "../etc/passwd", "sha256": "", "size": 0}]})), "files.path");
    check(f.post("/boot-resources", json!({"name": "x", "kind": "os", "files": [{"role": "raw", "path": "missing.img", "sha256": "", "size": 0}]})), "files.path");
    check(
        f.post("/boot-resources", json!({"name": "x", "kind": "weird"})),
        "kind",
    );
    check(f.post("/tokens", json!({"descr": "x"})), "descr");
    // Action bodies are checked strictly too.
    let action = |a: &str, body: Value| f.post(&format!("/machines/{}/{a}", m.id), body);
    check(
        action("deploy", json!({"image": IMAGE, "colour": 1})),
        "colour",
    );
    check(action("deploy", json!({"imag": IMAGE})), "imag");
    check(action("deploy", json!({})), "image");
    check(action("deploy", json!({"image": "nonesuch"})), "image");
    check(
        action("deploy", json!({"image": IMAGE, "target": "tape"})),
        "target",
    );
    // The disk layout: bounds, types and unknown fields, each naming the field.
    let layout = |l: Value| action("deploy", json!({"image": IMAGE, "layout": l}));
    check(layout(json!({"esp_mib": 16})), "layout.esp_mib");
    check(layout(json!({"esp_mib": 1 << 20})), "layout.esp_mib");
    check(layout(json!({"root_mib": 100})), "layout.root_mib");
    check(layout(json!({"root_mib": "big"})), "layout.root_mib");
    check(layout(json!({"esp": 256})), "esp");
    check(
        action(
            "deploy",
            json!({"image": IMAGE, "target": "memory", "layout": {}}),
        ),
        "layout",
    );
    check(action("release", json!({"erase": "yes"})), "erase");
    check(action("release", json!({"wipe": true})), "wipe");
    check(action("commission", json!({"bogus": true})), "bogus");
    check(action("mark-broken", json!({"reason": 5})), "reason");
    assert_eq!(
        f.status(&m.id),
        Status::Allocated,
        "no bad request changed the machine"
    );
    // Query strings.
    check(f.get("/machines?status=bogus"), "status");
    check(f.get("/machines?sort=name"), "sort");
    check(f.get("/events?after=x"), "after");
    // Unknown things are 404 with a JSON error.
    let r = f.get("/machines/nonesuch");
    assert_eq!((r.status, r.code()), (404, "not_found"), "{}", r.text);
    let r = f.post(&format!("/machines/{}/fly", m.id), json!({}));
    assert_eq!((r.status, r.code()), (404, "not_found"), "{}", r.text);
    check(
        f.post(&format!("/machines/{}/power/explode", m.id), json!({})),
        "op",
    );
    // A MAC that belongs to another machine is a conflict.
    let r = f.post("/machines", json!({"macs": [m.mac]}));
    assert_eq!(r.status, 409, "{}", r.text);
    // Agent bodies.
    let mut c = f.drive(3, Status::Commissioning).unwrap();
    f.boot(&mut c);
    check(
        f.agent_post(&c, "commissioned", Some(json!({"cpu": {}}))),
        "cpu",
    );
    check(
        f.agent_post(
            &c,
            "events",
            Some(json!({"step": "x", "state": "exploded"})),
        ),
        "state",
    );
    assert_eq!(f.status(&c.id), Status::Commissioning);
}

#[test]
fn secrets_never_leave_the_appliance() {
    let f = Fixture::with(Options {
        env: &[("RUST_LOG", "debug")],
        ..Options::default()
    });
    // A BMC address where nothing answers (a closed loopback port), so the power actions
    // fail fast and log their failures.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let power = json!({"driver": "ipmi", "params": {
        "host": "127.0.0.1", "port": closed, "username": "admin", "password": "hunter2",
        "timeout_ms": 100, "attempts": 1,
    }});
    let m = f.create_with(1, power, &[]);
    let shown = f.machine(&m.id);
    assert_eq!(shown["power"]["params"]["host"], "127.0.0.1");
    assert_eq!(shown["power"]["params"]["username"], "admin");
    assert_ne!(shown["power"]["params"]["password"], "hunter2");
    // Moving it around runs the power actions, which log.
    let mut m = m;
    f.act(&m, "commission", json!({}), Status::Commissioning);
    f.boot(&mut m);
    let r = f.agent_post(&m, "commissioned", Some(inventory(&m.mac, 2, 2, 10)));
    assert_eq!(r.status, 200, "{}", r.text);
    f.act(&m, "mark-broken", json!({}), Status::Broken);
    f.act(&m, "mark-fixed", json!({}), Status::Ready);
    let _ = f.post(
        &format!("/machines/{}/deploy", m.id),
        json!({"image": IMAGE}),
    );
    for path in [
        "/machines".to_string(),
        format!("/machines/{}", m.id),
        format!("/machines/{}", m.mac),
        format!("/machines/{}/events", m.id),
        "/events".into(),
    ] {
        let r = f.get(&path);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            !r.text.contains("hunter2"),
            "{path} leaks the password: {}",
            r.text
        );
    }
    let out = std::process::Command::new(common::BIN)
        .args([
            "--url",
            &f.server.base(),
            "--token",
            &f.admin,
            "machine",
            "show",
            &m.id,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));
    // The IPMI driver really ran (and failed: no BMC there), with its outcome in the history.
    let events = f.get(&format!("/machines/{}/events", m.id)).text;
    assert!(events.contains("power: NetbootAndPowerOn: "), "{events}");
    let logs = f.server.logs();
    assert!(logs.contains(&m.id), "the log is not being written");
    assert!(!logs.contains("hunter2"), "the log leaks the password");
    // It is kept, though: the power driver needs it.
    let db = std::fs::read(f.server.data_dir().join("stork.db")).unwrap();
    let wal = std::fs::read(f.server.data_dir().join("stork.db-wal")).unwrap_or_default();
    let needle = b"hunter2";
    assert!(
        db.windows(needle.len()).any(|w| w == needle)
            || wal.windows(needle.len()).any(|w| w == needle),
        "the password is not stored"
    );
}

#[test]
fn openapi_is_served_and_describes_the_machine() {
    let f = Fixture::new();
    let r = f.api.get("/openapi.json", None);
    assert_eq!(r.status, 200);
    let on_disk: Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json parses");
    assert_eq!(r.body, on_disk);
    // The documented Machine and Event schemas name exactly the fields the API returns.
    let m = f.drive(1, Status::Ready).unwrap();
    let machine = f.machine(&m.id);
    let event = f.events(&m.id)[0].clone();
    for (schema, real) in [("Machine", machine), ("Event", event)] {
        let props = on_disk["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no {schema} schema"));
        let mut documented: Vec<&String> = props.keys().collect();
        let mut returned: Vec<&String> = real.as_object().unwrap().keys().collect();
        documented.sort();
        returned.sort();
        assert_eq!(documented, returned, "{schema}");
    }
}

#[test]
fn a_deploy_layout_reaches_the_agent_and_needs_a_root_tar() {
    let f = Fixture::new();
    let mut m = f.drive(1, Status::Allocated).expect("allocated");
    // An image with only a raw disk image cannot be installed by a layout.
    let (size, sha256) = f
        .server
        .boot_file("images/raw-only/disk.raw.zst", b"not really an image");
    let r = f.post(
        "/boot-resources",
        json!({
            "name": "raw-only", "kind": "os",
            "files": [{"role": "raw", "path": "images/raw-only/disk.raw.zst", "sha256": sha256, "size": size}],
        }),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let r = f.post(
        &format!("/machines/{}/deploy", m.id),
        json!({"image": "raw-only", "layout": {"root_mib": 2048}}),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.message().contains("layout") && r.message().contains("root tar"),
        "{}",
        r.text
    );
    assert_eq!(f.status(&m.id), Status::Allocated);
    // The image with a root tar: the task carries exactly what was asked.
    f.act(
        &m,
        "deploy",
        json!({"image": IMAGE, "layout": {"esp_mib": 256, "root_mib": 2048}}),
        Status::Deploying,
    );
    let shown = f.machine(&m.id);
    assert_eq!(
        shown["deploy"]["layout"],
        json!({"esp_mib": 256, "root_mib": 2048})
    );
    f.boot(&mut m);
    let task = f
        .api
        .get(&format!("/agent/{}/task", m.id), m.token.as_deref())
        .ok();
    assert_eq!(task["kind"], "deploy", "{task}");
    assert_eq!(task["layout"], json!({"esp_mib": 256, "root_mib": 2048}));

    // No layout asked: none in the request or the task (the agent then picks raw or tar).
    let mut n = f.drive(2, Status::Allocated).expect("allocated");
    f.act(&n, "deploy", json!({"image": IMAGE}), Status::Deploying);
    assert!(f.machine(&n.id)["deploy"].get("layout").is_none());
    f.boot(&mut n);
    let task = f
        .api
        .get(&format!("/agent/{}/task", n.id), n.token.as_deref())
        .ok();
    assert!(task.get("layout").is_none(), "{task}");
    // Defaults only: `{}` asks for extraction with the default sizes.
    let o = f.drive(3, Status::Allocated).expect("allocated");
    f.act(
        &o,
        "deploy",
        json!({"image": IMAGE, "layout": {}}),
        Status::Deploying,
    );
    assert_eq!(f.machine(&o.id)["deploy"]["layout"], json!({}));
}
