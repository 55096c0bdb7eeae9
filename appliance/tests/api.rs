//! The REST API against the real `stork serve` (a child process) with a real SQLite file:
//! the happy path, every illegal transition, timeouts, auth, bad input and secrets.
//! The agent is played by the test: it reads its token from the boot script, as a machine
//! does.

mod common;

use std::fmt::Debug;
use std::time::Duration;

use common::{IMAGE, Options, Server, inventory, mac, mac_addr, script_identity, status_history};
use stork::lifecycle::{Event, Status, transition};
use stork_client::{API, Client, Method, RawResponse};
use stork_lab::wait_for;
use stork_proto::api::{
    AllocateBody, BootResource, Constraints, DeployRequest, EventQuery, EventRecord, Machine,
    MachineFilter, MarkBrokenBody, NamedLayout, NewMachine, NewSshKey, NewToken, PowerAnswer,
    PowerConfig, PowerOp, PowerState, ReleaseBody, ResourceFile, TokenRecord,
};
use stork_proto::{
    AgentEvent, AgentReport, AgentStep, DeployTarget, DiskLayout, ENLIST_PATH, EnlistRequest,
    EnlistResponse, Heartbeat, ImageRole, StepState, Task, agent_path,
};

/// A server and its client (with the admin token).
struct Fixture {
    server: Server,
    client: Client,
}

/// A machine the test drives; `token` is the agent token of its latest boot script.
#[derive(Debug, Clone)]
struct M {
    id: String,
    mac: String,
    token: Option<String>,
}

/// A user action with its body.
#[derive(Debug, Clone)]
enum Action {
    Commission,
    Allocate(AllocateBody),
    Deploy(Box<DeployRequest>),
    Release(ReleaseBody),
    Abort,
    MarkBroken(MarkBrokenBody),
    MarkFixed,
}

impl Action {
    fn allocate() -> Self {
        Action::Allocate(AllocateBody::default())
    }

    fn deploy(image: &str) -> Self {
        Action::Deploy(Box::new(deploy(image)))
    }

    /// A release that says whether to erase; how is left to the appliance's configuration.
    fn release(erase: bool) -> Self {
        Action::Release(ReleaseBody {
            erase: Some(erase),
            quick: None,
        })
    }

    fn mark_broken(reason: Option<&str>) -> Self {
        Action::MarkBroken(MarkBrokenBody {
            reason: reason.map(str::to_string),
        })
    }

    fn send(&self, c: &Client, id: &str) -> stork_client::Result<Machine> {
        match self {
            Action::Commission => c.commission(id),
            Action::Allocate(b) => c.allocate(id, b),
            Action::Deploy(b) => c.deploy(id, b),
            Action::Release(b) => c.release(id, b),
            Action::Abort => c.abort(id),
            Action::MarkBroken(b) => c.mark_broken(id, b),
            Action::MarkFixed => c.mark_fixed(id),
        }
    }
}

/// A deploy of `image` with every other field left to its default.
fn deploy(image: &str) -> DeployRequest {
    DeployRequest {
        image: image.into(),
        ..DeployRequest::default()
    }
}

/// The error answer of a request that must be refused.
#[track_caller]
fn refused<T: Debug>(r: stork_client::Result<T>) -> stork_client::Error {
    let e = r.expect_err("the request was refused");
    assert!(e.status().is_some(), "not an error answer: {e}");
    e
}

/// An error answer's status and code.
fn answer(e: &stork_client::Error) -> (u16, &str) {
    (e.status().unwrap_or(0), e.code().unwrap_or(""))
}

/// An agent heartbeat; whether the appliance recorded it.
#[track_caller]
fn heartbeat(f: &Fixture, m: &M, step: &str, leaving: bool) -> bool {
    let h = Heartbeat {
        step: step.into(),
        leaving,
    };
    f.agent(m)
        .agent_heartbeat_recorded(&m.id, &h)
        .unwrap_or_else(|e| panic!("heartbeat {}: {e}", m.id))
}

impl Fixture {
    fn new() -> Self {
        Self::with(Options::default())
    }

    fn with(opts: Options<'_>) -> Self {
        let server = Server::start(opts);
        let client = server.client();
        let f = Self { server, client };
        f.register_image();
        f
    }

    /// The appliance as machine `m`'s agent sees it: with its latest agent token.
    fn agent(&self, m: &M) -> Client {
        match &m.token {
            Some(t) => self.client.with_token(t),
            None => self.client.anonymous(),
        }
    }

    /// A request as given, for the API's edges: `path` under `/api/v1`, with the admin token.
    fn raw(&self, method: Method, path: &str, body: Option<&str>) -> RawResponse {
        self.client
            .raw(method, &format!("{API}{path}"), body)
            .unwrap_or_else(|e| panic!("{method:?} {path}: {e}"))
    }

    fn register_image(&self) {
        self.server.register_image(b"not really a tarball");
    }

    fn create(&self, n: u32) -> M {
        self.create_with(n, PowerConfig::manual(), &[])
    }

    fn create_with(&self, n: u32, power: PowerConfig, tags: &[&str]) -> M {
        let created = self
            .client
            .create_machine(&NewMachine {
                macs: vec![mac_addr(n)],
                hostname: Some(format!("node{n}")),
                power: Some(power),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..NewMachine::default()
            })
            .unwrap_or_else(|e| panic!("create machine {n}: {e}"));
        assert_eq!(created.status, Status::New);
        M {
            id: created.id,
            mac: mac(n),
            token: None,
        }
    }

    #[track_caller]
    fn machine(&self, id: &str) -> Machine {
        self.client
            .machine(id)
            .unwrap_or_else(|e| panic!("machine {id}: {e}"))
    }

    #[track_caller]
    fn status(&self, id: &str) -> Status {
        self.machine(id).status
    }

    #[track_caller]
    fn events(&self, id: &str) -> Vec<EventRecord> {
        self.client
            .machine_events(id, 0)
            .unwrap_or_else(|e| panic!("events of {id}: {e}"))
    }

    /// A user action; asserts success and the resulting status.
    #[track_caller]
    fn act(&self, m: &M, action: Action, want: Status) -> Machine {
        let shown = action
            .send(&self.client, &m.id)
            .unwrap_or_else(|e| panic!("{action:?} {}: {e}", m.id));
        assert_eq!(shown.status, want, "{action:?}: {shown:?}");
        shown
    }

    /// What the machine's firmware does: fetch its iPXE script. Returns the script.
    #[track_caller]
    fn boot_script(&self, m: &M) -> String {
        let script = self
            .client
            .anonymous()
            .boot_script(&m.mac)
            .unwrap_or_else(|e| panic!("boot script of {}: {e}", m.mac));
        assert!(script.starts_with("#!ipxe\n"), "{script}");
        script
    }

    /// Boots the agent: the script's token becomes the machine's agent token.
    fn boot(&self, m: &mut M) {
        let script = self.boot_script(m);
        let (id, token) = script_identity(&script).expect("script names machine and token");
        assert_eq!(id, m.id);
        assert!(token.starts_with("stork_agent_"), "{token}");
        m.token = Some(token);
    }

    /// The agent's task, with its latest token.
    #[track_caller]
    fn task(&self, m: &M) -> Task {
        self.agent(m)
            .agent_task(&m.id)
            .unwrap_or_else(|e| panic!("task of {}: {e}", m.id))
    }

    /// The agent posts its inventory.
    fn commissioned(
        &self,
        m: &M,
        cpus: u32,
        mem_gib: u64,
        disk_gib: u64,
    ) -> stork_client::Result<EnlistResponse> {
        self.agent(m)
            .agent_commissioned(&m.id, &inventory(&m.mac, cpus, mem_gib, disk_gib))
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
                self.act(&m, Action::Commission, target);
                self.boot(&mut m);
            }
            S::Broken => {
                self.act(&m, Action::mark_broken(Some("test")), target);
            }
            S::Ready => {
                let r = self
                    .commissioned(&m, 4, 8, 100)
                    .unwrap_or_else(|e| panic!("commissioned {}: {e}", m.id));
                assert_eq!(r.status, Status::Ready);
            }
            S::Allocated => {
                self.act(&m, Action::allocate(), target);
            }
            S::Deploying => {
                self.act(&m, Action::deploy(IMAGE), target);
                self.boot(&mut m);
            }
            S::Deployed => {
                self.agent(&m)
                    .agent_deployed(&m.id)
                    .unwrap_or_else(|e| panic!("deployed {}: {e}", m.id));
            }
            S::DiskErasing => {
                self.act(&m, Action::release(true), target);
                self.boot(&mut m);
            }
            S::FailedCommissioning | S::FailedDeployment | S::FailedReleasing => {
                self.act(&m, Action::Abort, target);
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

    // A real SQLite file in WAL mode.
    assert!(f.server.data_dir().join("stork.db").is_file());
    assert!(f.server.data_dir().join("stork.db-wal").exists());

    // Create with manual power, then commission: the appliance asks a person to power it.
    let mut a = f.create_with(1, PowerConfig::manual(), &["rack1"]);
    let shown = f.machine(&a.id);
    assert_eq!(shown.macs, [mac_addr(1)]);
    assert_eq!(shown.boot_mac, Some(mac_addr(1)));
    assert_eq!(shown.power.driver, "manual");
    // By MAC too.
    assert_eq!(f.machine(&a.mac).id, a.id);

    f.act(&a, Action::Commission, Status::Commissioning);
    let events = f.events(&a.id);
    assert!(
        events.iter().any(|e| e.message.contains("manual power")),
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
    assert_eq!(f.task(&a), Task::Commission { scripts: vec![] });

    let r = f
        .commissioned(&a, 4, 8, 100)
        .expect("commissioned is accepted");
    assert_eq!(
        r,
        EnlistResponse {
            machine_id: a.id.clone(),
            status: Status::Ready
        }
    );
    let shown = f.machine(&a.id);
    assert_eq!(shown.status, Status::Ready);
    assert_eq!(shown.inventory.expect("an inventory").cpu.count, 4);
    // Commissioning's token died with commissioning.
    let e = refused(f.agent(&a).agent_task(&a.id));
    assert_eq!(e.status(), Some(401), "{e}");

    // The image is registered (by the fixture) and listed.
    let images = f.client.boot_resources().expect("boot resources");
    assert_eq!(images[0].name, IMAGE);
    assert_eq!(images[0].files[0].path, "images/debian-12/root.tar");
    f.client
        .add_ssh_key(&NewSshKey {
            name: "ops".into(),
            key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA ops@site".into(),
        })
        .expect("add an SSH key");
    assert_eq!(f.client.ssh_keys().expect("SSH keys").len(), 1);

    // Allocate by id.
    let allocated = f.act(&a, Action::allocate(), Status::Allocated);
    let owner = allocated.owner.as_deref().unwrap_or_default();
    assert!(owner.starts_with("api:"), "{allocated:?}");

    // Allocate by constraints: B is the only Ready machine with 16 CPUs and tag gpu.
    let mut b = f.create_with(2, PowerConfig::manual(), &["gpu"]);
    f.act(&b, Action::Commission, Status::Commissioning);
    f.boot(&mut b);
    f.commissioned(&b, 16, 64, 500)
        .expect("commissioned is accepted");
    let none = refused(f.client.allocate_any(&Constraints {
        min_cpus: Some(32),
        ..Constraints::default()
    }));
    assert_eq!(answer(&none), (409, "no_machine"), "{none}");
    let none = refused(f.client.allocate_any(&Constraints {
        tags: vec!["gpu".into()],
        min_disk_gib: Some(1000),
        ..Constraints::default()
    }));
    assert_eq!(none.status(), Some(409), "{none}");
    let got = f
        .client
        .allocate_any(&Constraints {
            min_cpus: Some(8),
            min_memory_mib: Some(32768),
            min_disk_gib: Some(400),
            arch: Some("amd64".into()),
            tags: vec!["gpu".into()],
            owner: Some("alice".into()),
        })
        .expect("allocate by constraints");
    assert_eq!(got.id, b.id);
    assert_eq!(got.status, Status::Allocated);
    assert_eq!(got.owner.as_deref(), Some("alice"));

    // Deploy A; every boot gets a fresh token and the previous one stops working.
    f.act(
        &a,
        Action::Deploy(Box::new(DeployRequest {
            image: IMAGE.into(),
            hostname: Some("web1".into()),
            ssh_keys: vec!["ssh-ed25519 AAAAreq user@req".into()],
            user_data: Some("#cloud-config\n".into()),
            ..DeployRequest::default()
        })),
        Status::Deploying,
    );
    f.boot(&mut a);
    let old = a.token.clone().expect("a token");
    f.boot(&mut a);
    assert_ne!(Some(&old), a.token.as_ref());
    let e = refused(f.client.with_token(&old).agent_task(&a.id));
    assert_eq!(e.status(), Some(401), "old token: {e}");
    let task = f.task(&a);
    let Task::Deploy(task) = task else {
        panic!("not a deploy task: {task:?}");
    };
    assert_eq!(task.hostname, "web1");
    assert_eq!(task.target, DeployTarget::Disk);
    assert_eq!(task.user_data.as_deref(), Some("#cloud-config\n"));
    let url = &task.image[0].url;
    assert!(url.ends_with("/boot/images/debian-12/root.tar"), "{url}");
    assert_eq!(task.image[0].size, 20);
    assert_eq!(
        task.ssh_keys,
        [
            "ssh-ed25519 AAAAreq user@req",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA ops@site"
        ]
    );
    // The image is really served there.
    let served = f
        .client
        .anonymous()
        .raw(Method::Get, "/boot/images/debian-12/root.tar", None)
        .expect("the image");
    assert_eq!(served.text, "not really a tarball");

    f.agent(&a).agent_deployed(&a.id).expect("deployed");
    let shown = f.machine(&a.id);
    assert_eq!(shown.status, Status::Deployed);
    assert_eq!(shown.hostname.as_deref(), Some("web1"));
    assert_eq!(shown.deploy.expect("a deploy request").image, IMAGE);
    // A deployed machine boots its disk.
    assert!(f.boot_script(&a).contains("\nexit 1\n"));

    // A release that does not say erases, fully (the configuration's defaults): the agent
    // erases, then reports.
    f.act(
        &a,
        Action::Release(ReleaseBody::default()),
        Status::DiskErasing,
    );
    f.boot(&mut a);
    assert_eq!(f.task(&a), Task::Erase { quick: false });
    f.agent(&a)
        .agent_event(
            &a.id,
            &AgentEvent {
                step: AgentStep::Erase,
                state: StepState::Progress,
                message: "vda".into(),
                progress: Some(0.5),
                log_tail: None,
            },
        )
        .expect("progress event");
    f.agent(&a).agent_released(&a.id).expect("released");
    let shown = f.machine(&a.id);
    assert_eq!(shown.status, Status::Ready);
    assert_eq!(shown.owner, None);
    assert_eq!(shown.deploy, None);

    // Broken and fixed: a commissioned machine comes back Ready.
    let broken = f.act(&a, Action::mark_broken(Some("fan failure")), Status::Broken);
    assert_eq!(broken.status_message.as_deref(), Some("fan failure"));
    f.act(&a, Action::MarkFixed, Status::Ready);

    // Abort from commissioning.
    f.act(&a, Action::Commission, Status::Commissioning);
    let aborted = f.act(&a, Action::Abort, Status::FailedCommissioning);
    assert_eq!(aborted.status_message.as_deref(), Some("aborted by user"));

    // Direct power control is recorded and leaves the status alone.
    let q = f.client.power(&a.id, PowerOp::Query).expect("power query");
    assert_eq!(
        q,
        PowerAnswer {
            machine_id: a.id.clone(),
            op: PowerOp::Query,
            state: PowerState::Unknown
        }
    );
    let on = refused(f.client.power(&a.id, PowerOp::On));
    assert_eq!(answer(&on), (502, "manual_action_required"), "{on}");
    let last = f.events(&a.id).pop().unwrap();
    assert!(last.message.starts_with("power on failed"), "{last:?}");
    assert_eq!(f.status(&a.id), Status::FailedCommissioning);

    // Filters.
    let filter = |status: Option<&str>, tag: Option<&str>| {
        f.client
            .machines(&MachineFilter {
                status: status.map(str::to_string),
                tag: tag.map(str::to_string),
                ..MachineFilter::default()
            })
            .expect("machines")
    };
    let failed = filter(Some("failed_commissioning"), None);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, a.id);
    let gpu = filter(None, Some("gpu"));
    assert_eq!(gpu.len(), 1);
    assert_eq!(gpu[0].id, b.id);
    assert_eq!(filter(None, None).len(), 2);

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
    let all = f
        .client
        .events(&EventQuery {
            machine: Some(a.id.clone()),
            ..EventQuery::default()
        })
        .expect("events of a");
    assert_eq!(all.len(), f.events(&a.id).len());
    let page = f
        .client
        .events(&EventQuery {
            after: 0,
            limit: Some(3),
            ..EventQuery::default()
        })
        .expect("a page of events");
    assert!(page.len() == 3);
    // The live stream starts with the history.
    let mut first = None;
    f.client
        .follow_events(Some(&a.id), |e| {
            first = Some(e);
            false
        })
        .expect("event stream");
    let first = first.expect("the event stream ended without an event");
    assert_eq!(first.machine_id, a.id);
    assert_eq!(first.new_status, Some(Status::New));

    // The CLI reads the same.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(f.server.cli_args())
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
    let shown: Machine = serde_json::from_str(&cli(&["machine", "show", &a.id, "--json"])).unwrap();
    assert_eq!(shown.status, Status::FailedCommissioning);
    assert!(cli(&["machine", "list"]).contains(&b.id));
    assert!(
        cli(&["machine", "events", &a.id]).contains("Abort: commissioning -> failed_commissioning")
    );
    assert!(cli(&["image", "list"]).contains(IMAGE));

    // Delete.
    f.client.delete_machine(&a.id).expect("delete");
    let e = refused(f.client.machine(&a.id));
    assert_eq!(e.status(), Some(404), "{e}");
    let e = refused(f.client.delete_machine(&a.id));
    assert_eq!(e.status(), Some(404), "{e}");
    // Its MAC is free again.
    let again = f.create(1);
    assert_ne!(again.id, a.id);
}

/// The user actions and the lifecycle event each one sends.
fn user_actions() -> Vec<(Action, Event)> {
    vec![
        (Action::Commission, Event::Commission),
        (Action::allocate(), Event::Allocate),
        (Action::deploy(IMAGE), Event::Deploy),
        (Action::release(false), Event::Release),
        (Action::release(true), Event::ReleaseErase),
        (Action::Abort, Event::Abort),
        (Action::mark_broken(Some("test")), Event::MarkBroken),
        (Action::MarkFixed, Event::MarkFixed),
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
fn assert_rejected<T: Debug>(
    f: &Fixture,
    m: &M,
    status: Status,
    r: stork_client::Result<T>,
    what: &str,
    version: i64,
) {
    let e = refused(r);
    assert_eq!(e.status(), Some(409), "{status} {what}: {e}");
    assert_eq!(e.code(), Some("illegal_transition"), "{status} {what}: {e}");
    assert!(
        e.message().unwrap_or_default().contains(status.as_str()),
        "{status} {what}: {e}"
    );
    // Nothing changed...
    let now = f.machine(&m.id);
    assert_eq!(now.status, status, "{what}");
    assert_eq!(
        now.version, version,
        "{status} {what}: the machine was saved"
    );
    // ...and the refusal is in the history.
    let events = f.events(&m.id);
    let last = events.last().expect("an event");
    assert_eq!(last.old_status, Some(status), "{what}: {last:?}");
    assert_eq!(last.new_status, None, "{what}: {last:?}");
    assert!(last.message.starts_with("rejected: "), "{what}: {last:?}");
}

/// The agent's reports, each a lifecycle event.
#[derive(Debug, Clone, Copy)]
enum Report {
    /// The inventory (of the machine's own NIC).
    Commissioned,
    Deployed,
    Released,
    /// A step failed.
    Failed,
}

impl Report {
    fn send(self, f: &Fixture, m: &M) -> stork_client::Result<()> {
        let agent = f.agent(m);
        match self {
            Report::Commissioned => f.commissioned(m, 2, 2, 10).map(drop),
            Report::Deployed => agent.agent_deployed(&m.id),
            Report::Released => agent.agent_released(&m.id),
            Report::Failed => agent.agent_event(
                &m.id,
                &AgentEvent {
                    step: "work".into(),
                    state: StepState::Failed,
                    message: "disk on fire".into(),
                    progress: None,
                    log_tail: None,
                },
            ),
        }
    }
}

#[test]
fn a_release_that_does_not_say_follows_the_configuration() {
    // Configured off: a bare release leaves the disks alone; asked, it erases, quick by the
    // configuration unless the request says full.
    let f = Fixture::with(Options {
        config: "[lifecycle]\ncheck_interval = 1\nerase_on_release = false\nerase_quick = true\n",
        ..Options::default()
    });
    let m = f.drive(1, Status::Allocated).unwrap();
    f.act(&m, Action::Release(ReleaseBody::default()), Status::Ready);
    let history = status_history(&f.events(&m.id)).unwrap();
    assert_eq!(
        &history[history.len() - 2..],
        [Status::Releasing, Status::Ready]
    );

    let mut m = f.drive(2, Status::Allocated).unwrap();
    f.act(&m, Action::release(true), Status::DiskErasing);
    f.boot(&mut m);
    assert_eq!(f.task(&m), Task::Erase { quick: true });

    // `quick` alone asks for no erase: the configuration said no.
    let m = f.drive(3, Status::Allocated).unwrap();
    let full_only = ReleaseBody {
        erase: None,
        quick: Some(false),
    };
    f.act(&m, Action::Release(full_only), Status::Ready);

    let mut m = f.drive(4, Status::Allocated).unwrap();
    let full = ReleaseBody {
        erase: Some(true),
        quick: Some(false),
    };
    f.act(&m, Action::Release(full), Status::DiskErasing);
    f.boot(&mut m);
    assert_eq!(f.task(&m), Task::Erase { quick: false });
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
            f.act(&m, Action::release(false), Status::Ready);
            let history = status_history(&f.events(&m.id)).unwrap();
            assert_eq!(
                &history[history.len() - 2..],
                [Status::Releasing, Status::Ready]
            );
            continue;
        };
        let commissioned = f.machine(&sitter.id).inventory.is_some();
        for (action, event) in user_actions() {
            match transition(status, event, commissioned) {
                Err(_) => {
                    let version = f.machine(&sitter.id).version;
                    let r = action.send(&f.client, &sitter.id);
                    assert_rejected(&f, &sitter, status, r, &format!("{event:?}"), version);
                    rejected += 1;
                }
                Ok(step) => {
                    let m = f.drive(next(), status).unwrap();
                    f.act(&m, action, settled(step.to));
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
                let e = refused(f.client.with_token(stale).agent_task(&sitter.id));
                assert_eq!(
                    e.status(),
                    Some(401),
                    "{status}: a stale agent token works: {e}"
                );
            }
            continue;
        }
        let reports = [
            (Report::Commissioned, Event::CommissioningDone),
            (Report::Deployed, Event::DeploymentDone),
            (Report::Released, Event::ReleaseDone),
            (Report::Failed, Event::AgentFailed),
        ];
        for (report, event) in reports {
            match transition(status, event, commissioned) {
                Err(_) => {
                    let version = f.machine(&sitter.id).version;
                    let r = report.send(&f, &sitter);
                    assert_rejected(&f, &sitter, status, r, &format!("{report:?}"), version);
                    rejected += 1;
                }
                Ok(step) => {
                    let m = f.drive(next(), status).unwrap();
                    report
                        .send(&f, &m)
                        .unwrap_or_else(|e| panic!("{status} {report:?}: {e}"));
                    assert_eq!(f.status(&m.id), step.to, "{status} {report:?}");
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
                Ok((shown.status == failed).then_some(shown))
            },
        )
        .unwrap();
        let reason = shown.status_message.unwrap_or_default();
        assert!(reason.contains("timed out after 2 s"), "{reason}");
        assert!(reason.contains(busy.as_str()), "{reason}");
        let last = f
            .events(&m.id)
            .into_iter()
            .rfind(|e| e.new_status.is_some())
            .unwrap();
        assert_eq!(last.actor, "controller");
        assert!(last.message.contains("TimedOut"), "{last:?}");
        // The agent of the timed-out boot is locked out.
        let e = refused(f.agent(m).agent_task(&m.id));
        assert_eq!(e.status(), Some(401), "{e}");
        status_history(&f.events(&m.id)).unwrap();
    }
    // Statuses that are not busy never time out.
    assert_eq!(f.status(&ready.id), Status::Ready);
    assert_eq!(f.status(&broken.id), Status::Broken);
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
    // (A heartbeat is recorded: 204; or not, no heartbeat being expected any more: 202.)
    assert!(heartbeat(&f, &installed, "seed", false), "recorded");
    let shown = f.machine(&installed.id);
    assert_eq!(shown.heartbeat_step.as_deref(), Some("seed"));
    assert!(shown.heartbeat_deadline > shown.last_heartbeat);
    f.agent(&installed)
        .agent_installed(&installed.id)
        .expect("installed");
    assert!(f.machine(&installed.id).heartbeat_deadline.is_none());
    // A late beat of that agent (its thread raced the reboot) does not re-arm the rule.
    assert!(
        !heartbeat(&f, &installed, "installed", false),
        "not recorded"
    );
    // A deploy into memory: the agent says it leaves before switching root.
    assert!(heartbeat(&f, &left, "memory", false), "recorded");
    assert!(heartbeat(&f, &left, "memory", true), "recorded");
    assert!(!heartbeat(&f, &left, "memory", false), "not recorded");
    assert!(f.machine(&left.id).heartbeat_deadline.is_none());

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
            assert!(heartbeat(&f, &m, step, false), "recorded");
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
                Ok((shown.status == failed).then_some(shown))
            },
        )
        .unwrap();
        let reason = shown.status_message.unwrap_or_default();
        assert!(
            reason.starts_with("agent stopped answering: last heartbeat ")
                && reason.ends_with(&format!(" s ago (step {step})")),
            "{reason}"
        );
        let last = f
            .events(&m.id)
            .into_iter()
            .rfind(|e| e.new_status.is_some())
            .unwrap();
        assert_eq!(last.actor, "controller");
        assert!(last.message.contains("TimedOut"), "{last:?}");
        // The agent of the failed boot is locked out.
        let e = refused(f.agent(m).agent_heartbeat(
            &m.id,
            &Heartbeat {
                step: step.into(),
                leaving: false,
            },
        ));
        assert_eq!(e.status(), Some(401), "{e}");
        status_history(&f.events(&m.id)).unwrap();
    }
    // Silence outlasted the allowance while these stayed busy: one kept beating, one is
    // installed, one left, and one never sent a heartbeat (the status timeout rules it).
    for m in [&alive, &installed, &left, &never] {
        assert_eq!(f.status(&m.id), Status::Deploying, "{}", m.id);
    }
    assert!(f.machine(&never.id).last_heartbeat.is_none());

    // A new attempt's agent is heard afresh, though the failed one's last beat is on record.
    let mut retry = silent[1].clone();
    f.act(&retry, Action::deploy(IMAGE), Status::Deploying);
    f.boot(&mut retry);
    assert!(heartbeat(&f, &retry, "disk", false), "recorded");
    assert_eq!(f.machine(&retry.id).heartbeat_step.as_deref(), Some("disk"));
}

/// A request of the API's, by a client with some token (or none); `Ok` on success.
type Call<'a> = (
    String,
    Box<dyn Fn(&Client) -> stork_client::Result<()> + 'a>,
);

fn call<'a, T>(
    label: impl Into<String>,
    f: impl Fn(&Client) -> stork_client::Result<T> + 'a,
) -> Call<'a> {
    (label.into(), Box::new(move |c| f(c).map(drop)))
}

#[test]
fn tokens_401_and_403() {
    let f = Fixture::new();
    let a = f.drive(1, Status::Commissioning).unwrap();
    let b = f.drive(2, Status::Commissioning).unwrap();
    let agent_a = f.agent(&a);

    // Every admin route: no token 401, a wrong one 401, an agent token 403. The bodies are
    // empty or defaults: the token is checked first.
    let admin_routes: Vec<Call> = vec![
        call("GET /machines", |c| c.machines(&MachineFilter::default())),
        call("POST /machines", |c| {
            c.create_machine(&NewMachine::default())
        }),
        call("POST /machines/allocate", |c| {
            c.allocate_any(&Constraints::default())
        }),
        call("GET /machines/{id}", |c| c.machine(&a.id)),
        call("DELETE /machines/{id}", |c| c.delete_machine(&a.id)),
        call("GET /machines/{id}/events", |c| c.machine_events(&a.id, 0)),
        call("POST /machines/{id}/abort", |c| c.abort(&a.id)),
        call("GET /events", |c| c.events(&EventQuery::default())),
        call("GET /events/stream", |c| c.follow_events(None, |_| false)),
        call("GET /ssh-keys", |c| c.ssh_keys()),
        call("POST /ssh-keys", |c| {
            c.add_ssh_key(&NewSshKey {
                name: String::new(),
                key: String::new(),
            })
        }),
        call("DELETE /ssh-keys/x", |c| c.delete_ssh_key("x")),
        call("GET /boot-resources", |c| c.boot_resources()),
        call("POST /boot-resources", |c| {
            c.register_boot_resource(&BootResource {
                name: String::new(),
                kind: String::new(),
                arch: None,
                files: vec![],
                kernels: vec![],
            })
        }),
        call("GET /tokens", |c| c.tokens()),
        call("POST /tokens", |c| c.create_token(&NewToken::default())),
        call("GET /stats", |c| c.stats()),
    ];
    for (route, send) in &admin_routes {
        let e = refused(send(&f.client.anonymous()));
        assert_eq!(answer(&e), (401, "unauthorized"), "{route}: {e}");
        let e = refused(send(&f.client.with_token("stork_admin_0000")));
        assert_eq!(answer(&e), (401, "unauthorized"), "{route}: {e}");
        let e = refused(send(&agent_a));
        assert_eq!(answer(&e), (403, "forbidden"), "{route}: {e}");
    }
    assert_eq!(
        f.status(&a.id),
        Status::Commissioning,
        "nothing was aborted or deleted"
    );

    // Agent routes: no token 401, unknown 401, admin token 403, machine A's token on B 403.
    let inv = inventory(&b.mac, 2, 2, 10);
    let b_id = b.id.as_str();
    let agent_routes: Vec<Call> = vec![
        call("task", |c| c.agent_task(b_id)),
        call("commissioned", |c| c.agent_commissioned(b_id, &inv)),
        call("events", |c| {
            c.agent_event(
                b_id,
                &AgentEvent {
                    step: "x".into(),
                    state: StepState::Started,
                    message: String::new(),
                    progress: None,
                    log_tail: None,
                },
            )
        }),
        call("released", |c| c.agent_released(b_id)),
        call("deployed", |c| c.agent_deployed(b_id)),
        call("heartbeat", |c| {
            c.agent_heartbeat(
                b_id,
                &Heartbeat {
                    step: "x".into(),
                    leaving: false,
                },
            )
        }),
    ];
    for (what, send) in &agent_routes {
        let path = agent_path(&b.id, what);
        let e = refused(send(&f.client.anonymous()));
        assert_eq!(e.status(), Some(401), "{path}: {e}");
        let e = refused(send(&f.client.with_token("stork_agent_00")));
        assert_eq!(e.status(), Some(401), "{path}: {e}");
        let e = refused(send(&f.client));
        assert_eq!(answer(&e), (403, "forbidden"), "{path}: {e}");
        let e = refused(send(&agent_a));
        assert_eq!(answer(&e), (403, "forbidden"), "{path}: {e}");
    }
    assert_eq!(f.status(&b.id), Status::Commissioning, "B was not touched");
    // B's own token works.
    f.task(&b);

    // Boot and enlistment paths need no token.
    let anonymous = f.client.anonymous();
    anonymous.boot_script(&mac(77)).expect("boot script");
    let r = anonymous
        .enlist(&EnlistRequest {
            boot_mac: mac_addr(77),
            inventory: inventory(&mac(77), 2, 4, 20),
        })
        .expect("enlist");
    assert_eq!(r.status, Status::New);
    let enlisted = r.machine_id;
    // Enlisting is recorded as the machine's creation.
    assert_eq!(status_history(&f.events(&enlisted)).unwrap(), [Status::New]);
    let report = AgentReport {
        boot_mac: mac_addr(77),
        step: AgentStep::Network,
        ok: false,
        message: "no link".into(),
    };
    assert!(
        anonymous.report_recorded(&report).expect("report"),
        "the report of a known machine is recorded (204)"
    );
    anonymous.openapi().expect("the OpenAPI document");

    // Admin tokens made through the API work, and are listed without the secret.
    let made = f
        .client
        .create_token(&NewToken {
            description: "ci".into(),
            ..NewToken::default()
        })
        .expect("create a token");
    let new_token = made.token.as_str();
    f.client
        .with_token(new_token)
        .machines(&MachineFilter::default())
        .expect("the new token works");
    // The list as it is served: no field of any record holds the secret.
    let r = f.raw(Method::Get, "/tokens", None);
    assert_eq!(r.status, 200, "{}", r.text);
    let list: Vec<TokenRecord> = serde_json::from_str(&r.text).expect("token records");
    assert_eq!(list.len(), 2);
    assert!(!r.text.contains(new_token));
}

/// A refusal as a 400 whose message names `needle`.
#[track_caller]
fn check<T: Debug>(r: stork_client::Result<T>, needle: &str) {
    let e = refused(r);
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(e.code(), Some("bad_request"), "not a JSON error: {e}");
    let message = e.message().unwrap_or_default();
    assert!(message.contains(needle), "{needle:?} not in {message}");
}

/// [`check`] of an answer to a raw request.
#[track_caller]
fn check_raw(r: RawResponse, needle: &str) {
    assert_eq!(r.status, 400, "{}", r.text);
    let e = r
        .error()
        .unwrap_or_else(|| panic!("not a JSON error: {}", r.text));
    assert_eq!(e.code, "bad_request", "not a JSON error: {}", r.text);
    assert!(e.message.contains(needle), "{needle:?} not in {}", r.text);
}

#[test]
fn bad_input_is_400_naming_the_field() {
    let f = Fixture::new();
    let m = f.drive(1, Status::Allocated).unwrap();
    let post = |path: &str, body: &str| f.raw(Method::Post, path, Some(body));
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
        let r = post(&path, r#"{"macs": ["#);
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert_eq!(
            r.error().map(|e| e.code).as_deref(),
            Some("bad_request"),
            "{path}: not a JSON error: {}",
            r.text
        );
    }
    let enlist = f
        .client
        .anonymous()
        .raw(Method::Post, ENLIST_PATH, Some("{"));
    check_raw(enlist.expect("an answer"), "");
    let new_machine = |macs: Vec<_>, power: Option<PowerConfig>| {
        f.client.create_machine(&NewMachine {
            macs,
            power,
            ..NewMachine::default()
        })
    };
    check_raw(
        post(
            "/machines",
            &format!(r#"{{"macs": ["{}"], "colour": "red"}}"#, mac(2)),
        ),
        "colour",
    );
    check_raw(post("/machines", r#"{"hostname": "x"}"#), "macs");
    check_raw(post("/machines", r#"{"macs": ["zz:zz"]}"#), "macs");
    check(new_machine(vec![], None), "macs");
    let telepathy = PowerConfig {
        driver: "telepathy".into(),
        params: Default::default(),
    };
    check(
        new_machine(vec![mac_addr(2)], Some(telepathy)),
        "power.driver",
    );
    check_raw(
        post(
            "/machines",
            &format!(
                r#"{{"macs": ["{}"], "power": {{"driver": "ipmi", "pw": 1, "x": 2}}}}"#,
                mac(2)
            ),
        ),
        "pw",
    );
    // Control characters (PostgreSQL's jsonb refuses a \u0000) are refused by field.
    for (body, field) in [
        (r#""tags": ["rack", "a\u0000b"]"#, "tags[1]"),
        (r#""hostname": "web\u0007""#, "hostname"),
        (
            r#""power": {"driver": "ipmi", "params": {"host": "10.0.0.5", "user": "ad\u0000min"}}"#,
            "power.params.user",
        ),
    ] {
        check_raw(
            post(
                "/machines",
                &format!(r#"{{"macs": ["{}"], {body}}}"#, mac(3)),
            ),
            field,
        );
    }
    check_raw(post("/machines/allocate", r#"{"min_cpu": 2}"#), "min_cpu");
    check_raw(post("/ssh-keys", r#"{"name": "k"}"#), "key");
    check(
        f.client.add_ssh_key(&NewSshKey {
            name: "k".into(),
            key: "hello".into(),
        }),
        "key",
    );
    let resource = |kind: &str, path: Option<&str>| BootResource {
        name: "x".into(),
        kind: kind.into(),
        arch: None,
        files: path
            .map(|p| ResourceFile {
                role: ImageRole::Raw,
                path: p.into(),
                sha256: String::new(),
                size: 0,
            })
            .into_iter()
            .collect(),
        kernels: vec![],
    };
    check(
        f.client
            .register_boot_resource(&resource("os", Some("../etc/passwd"))),
        "files.path",
    );
    check(
        f.client
            .register_boot_resource(&resource("os", Some("missing.img"))),
        "files.path",
    );
    check(
        f.client.register_boot_resource(&resource("weird", None)),
        "kind",
    );
    check_raw(post("/tokens", r#"{"descr": "x"}"#), "descr");
    // Action bodies are checked strictly too.
    let action = |a: &str, body: &str| post(&format!("/machines/{}/{a}", m.id), body);
    let deploy_req = |r: DeployRequest| f.client.deploy(&m.id, &r);
    check_raw(
        action("deploy", r#"{"image": "debian-12", "colour": 1}"#),
        "colour",
    );
    check_raw(action("deploy", r#"{"imag": "debian-12"}"#), "imag");
    check_raw(action("deploy", "{}"), "image");
    check(deploy_req(deploy("nonesuch")), "image");
    check_raw(
        action("deploy", r#"{"image": "debian-12", "target": "tape"}"#),
        "target",
    );
    // A disk the machine's inventory does not have, refused before any power-on, naming
    // the field and the disks there are.
    let disk = |d: &str| {
        deploy_req(DeployRequest {
            disk: Some(d.into()),
            ..deploy(IMAGE)
        })
    };
    check(disk("sdz"), "disk: no disk is named \"sdz\"");
    check(disk("sdz"), "vda (serial d1");
    // Late commands: bounded in number and size, each a command.
    let late = |cmds: Vec<String>| {
        deploy_req(DeployRequest {
            late_commands: cmds,
            ..deploy(IMAGE)
        })
    };
    check(late(vec!["true".into(); 33]), "late_commands: 33 commands");
    check(late(vec!["true".into(), " ".into()]), "late_commands[1]");
    check(late(vec!["x".repeat(5000)]), "late_commands[0]");
    // The disk layout: bounds, types and unknown fields, each naming the field.
    let layout = |esp_mib: Option<u64>, root_mib: Option<u64>| {
        deploy_req(DeployRequest {
            layout: Some(DiskLayout {
                esp_mib,
                root_mib,
                ..DiskLayout::default()
            }),
            ..deploy(IMAGE)
        })
    };
    check(layout(Some(16), None), "layout.esp_mib");
    check(layout(Some(1 << 20), None), "layout.esp_mib");
    check(layout(None, Some(100)), "layout.root_mib");
    // Against the machine's inventory (one disk, vda): each mistake by its field.
    let shaped = |json: &str| {
        deploy_req(DeployRequest {
            layout: Some(serde_json::from_str(json).expect("a layout")),
            ..deploy(IMAGE)
        })
    };
    check(
        layout(None, Some(1 << 20)),
        "layout.root_mib: 1048576 MiB does not fit disk vda (serial d1",
    );
    check(
        shaped(r#"{"disks": ["vda", "sdz"], "raid": 1}"#),
        "layout.disks[1]: no disk is named \"sdz\"",
    );
    check(
        shaped(r#"{"disks": ["vda", "d1"], "raid": 1}"#),
        "layout.disks[1]: \"d1\" is vda, as layout.disks[0] is",
    );
    check(
        shaped(r#"{"raid": 1}"#),
        "layout.raid: RAID 1 needs at least 2 disks",
    );
    check(
        shaped(
            r#"{"lvm": {"volumes": [{"name": "root", "mount": "/", "size_mib": 4096},
                {"name": "var", "mount": "/var", "fs": "xfs", "size_mib": 1048576}]}}"#,
        ),
        "layout.lvm.volumes[1].size_mib: with the volumes before it the volumes need 1052672 MiB; \
         the volume group vg0 holds",
    );
    check(
        shaped(r#"{"lvm": {"volumes": [{"name": "var", "mount": "/var"}]}}"#),
        "layout.lvm.volumes: no volume is mounted on /",
    );
    check(
        deploy_req(DeployRequest {
            disk: Some("vda".into()),
            layout: Some(serde_json::from_str(r#"{"disks": ["vda"]}"#).expect("a layout")),
            ..deploy(IMAGE)
        }),
        "disk: the layout names its disks",
    );
    check_raw(
        action(
            "deploy",
            r#"{"image": "debian-12", "layout": {"lvm": {"volumes": [{"name": "r", "mount": "/", "fs": "zfs"}]}}}"#,
        ),
        "layout.lvm.volumes[0].fs",
    );
    check_raw(
        action(
            "deploy",
            r#"{"image": "debian-12", "layout": {"root_mib": "big"}}"#,
        ),
        "layout.root_mib",
    );
    check_raw(
        action(
            "deploy",
            r#"{"image": "debian-12", "layout": {"esp": 256}}"#,
        ),
        "esp",
    );
    check(
        deploy_req(DeployRequest {
            target: DeployTarget::Memory,
            layout: Some(DiskLayout::default()),
            ..deploy(IMAGE)
        }),
        "layout",
    );
    // The installed OS's network: valid by itself, its NICs the machine's.
    let network = |json: &str| {
        deploy_req(DeployRequest {
            network: Some(serde_json::from_str(json).expect("a network config")),
            ..deploy(IMAGE)
        })
    };
    check(
        network(r#"{"interfaces": [{"name": "en0", "mac": "52:54:00:99:99:99", "dhcp4": true}]}"#),
        "network.interfaces[0].mac: 52:54:00:99:99:99 is not a NIC of this machine",
    );
    check(
        network(
            r#"{"interfaces": [{"name": "en0", "mac": "52:54:00:99:99:99"},
                {"name": "v", "vlan": {"link": "en0", "id": 0}, "dhcp4": true}]}"#,
        ),
        "network.interfaces[1].vlan.id",
    );
    check_raw(
        action(
            "deploy",
            r#"{"image": "debian-12", "network": {"interfaces": [{"name": "b", "bond": {"members": [], "mode": "fast"}}]}}"#,
        ),
        "network.interfaces[0].bond.mode",
    );
    check_raw(action("release", r#"{"erase": "yes"}"#), "erase");
    check_raw(action("release", r#"{"wipe": true}"#), "wipe");
    check_raw(action("commission", r#"{"bogus": true}"#), "bogus");
    check_raw(action("mark-broken", r#"{"reason": 5}"#), "reason");
    assert_eq!(
        f.status(&m.id),
        Status::Allocated,
        "no bad request changed the machine"
    );
    // Query strings.
    check(
        f.client.machines(&MachineFilter {
            status: Some("bogus".into()),
            ..MachineFilter::default()
        }),
        "status",
    );
    check_raw(f.raw(Method::Get, "/machines?sort=name", None), "sort");
    check_raw(f.raw(Method::Get, "/events?after=x", None), "after");
    // Unknown things are 404 with a JSON error.
    let e = refused(f.client.machine("nonesuch"));
    assert_eq!(answer(&e), (404, "not_found"), "{e}");
    let r = action("fly", "{}");
    assert_eq!(
        (r.status, r.error().map(|e| e.code).as_deref()),
        (404, Some("not_found")),
        "{}",
        r.text
    );
    check_raw(
        f.raw(
            Method::Post,
            &format!("/machines/{}/power/explode", m.id),
            None,
        ),
        "op",
    );
    // A MAC that belongs to another machine is a conflict.
    let e = refused(new_machine(vec![m.mac.parse().unwrap()], None));
    assert_eq!(e.status(), Some(409), "{e}");
    // Agent bodies.
    let mut c = f.drive(3, Status::Commissioning).unwrap();
    f.boot(&mut c);
    let agent_post = |what: &str, body: &str| {
        f.agent(&c)
            .raw(Method::Post, &agent_path(&c.id, what), Some(body))
            .expect("an answer")
    };
    check_raw(agent_post("commissioned", r#"{"cpu": {}}"#), "cpu");
    check_raw(
        agent_post("events", r#"{"step": "x", "state": "exploded"}"#),
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
    let params: [(&str, serde_json::Value); 6] = [
        ("host", "127.0.0.1".into()),
        ("port", closed.into()),
        ("username", "admin".into()),
        ("password", "hunter2".into()),
        ("timeout_ms", 100.into()),
        ("attempts", 1.into()),
    ];
    let power = PowerConfig {
        driver: "ipmi".into(),
        params: params.into_iter().map(|(k, v)| (k.into(), v)).collect(),
    };
    let m = f.create_with(1, power, &[]);
    let shown = f.machine(&m.id).power.params;
    assert_eq!(shown["host"], "127.0.0.1");
    assert_eq!(shown["username"], "admin");
    assert_ne!(shown["password"], "hunter2");
    // Moving it around runs the power actions, which log.
    let mut m = m;
    f.act(&m, Action::Commission, Status::Commissioning);
    f.boot(&mut m);
    f.commissioned(&m, 2, 2, 10).expect("commissioned");
    f.act(&m, Action::mark_broken(None), Status::Broken);
    f.act(&m, Action::MarkFixed, Status::Ready);
    let _ = f.client.deploy(&m.id, &deploy(IMAGE));
    // Every answer as it is served: no field anywhere holds the password.
    for path in [
        "/machines".to_string(),
        format!("/machines/{}", m.id),
        format!("/machines/{}", m.mac),
        format!("/machines/{}/events", m.id),
        "/events".into(),
    ] {
        let r = f.raw(Method::Get, &path, None);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            !r.text.contains("hunter2"),
            "{path} leaks the password: {}",
            r.text
        );
    }
    let out = std::process::Command::new(common::BIN)
        .args(f.server.cli_args())
        .args(["machine", "show", &m.id])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));
    // The IPMI driver really ran (and failed: no BMC there), with its outcome in the history.
    let events = f.events(&m.id);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("power: NetbootAndPowerOn: ")),
        "{events:#?}"
    );
    let logs = f.server.logs();
    assert!(logs.contains(&m.id), "the log is not being written");
    assert!(!logs.contains("hunter2"), "the log leaks the password");
    // A Redfish machine's password too.
    let redfish = PowerConfig {
        driver: "redfish".into(),
        params: [
            ("url", "http://127.0.0.1:9".into()),
            ("username", "root".into()),
            ("password", "hunter3-redfish".into()),
        ]
        .into_iter()
        .map(|(k, v): (&str, serde_json::Value)| (k.into(), v))
        .collect(),
    };
    let r = f.create_with(2, redfish, &[]);
    assert!(f.machine(&r.id).power.params["password"] != "hunter3-redfish");
    // Kept, since the power driver needs it (it ran, above), but encrypted: neither the
    // database nor its log holds it, and the key is a file of its own, both the owner's only.
    let data = f.server.data_dir();
    let mut stored = std::fs::read(data.join("stork.db")).unwrap();
    stored.extend(std::fs::read(data.join("stork.db-wal")).unwrap_or_default());
    for needle in ["hunter2", "hunter3-redfish"] {
        assert!(
            !stored.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} is stored in clear"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    for file in ["stork.db", "secrets.key"] {
        let mode = std::fs::metadata(data.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn openapi_is_served_and_describes_the_machine() {
    let f = Fixture::new();
    let served = f
        .client
        .anonymous()
        .openapi()
        .expect("the OpenAPI document");
    let served: serde_json::Value = serde_json::from_str(&served).expect("served JSON");
    let on_disk: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json parses");
    assert_eq!(served, on_disk);
    // The documented Machine and Event schemas name exactly the fields the API returns, as
    // it returns them (the text: decoding into the types would drop an undocumented field).
    let m = f.drive(1, Status::Ready).unwrap();
    type Object = serde_json::Map<String, serde_json::Value>;
    let machine = f.raw(Method::Get, &format!("/machines/{}", m.id), None);
    assert_eq!(machine.status, 200, "{}", machine.text);
    let machine: Object = serde_json::from_str(&machine.text).expect("a machine");
    let events = f.raw(Method::Get, &format!("/machines/{}/events", m.id), None);
    assert_eq!(events.status, 200, "{}", events.text);
    let events: Vec<Object> = serde_json::from_str(&events.text).expect("events");
    let event = events[0].clone();
    for (schema, real) in [("Machine", machine), ("Event", event)] {
        let props = on_disk["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no {schema} schema"));
        let mut documented: Vec<&String> = props.keys().collect();
        let mut returned: Vec<&String> = real.keys().collect();
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
    f.client
        .register_boot_resource(&BootResource {
            name: "raw-only".into(),
            kind: "os".into(),
            arch: None,
            files: vec![ResourceFile {
                role: ImageRole::Raw,
                path: "images/raw-only/disk.raw.zst".into(),
                sha256,
                size,
            }],
            kernels: vec![],
        })
        .expect("register raw-only");
    let e = refused(f.client.deploy(
        &m.id,
        &DeployRequest {
            layout: Some(DiskLayout {
                root_mib: Some(2048),
                ..DiskLayout::default()
            }),
            ..deploy("raw-only")
        },
    ));
    assert_eq!(e.status(), Some(400), "{e}");
    let message = e.message().unwrap_or_default();
    assert!(
        message.contains("layout") && message.contains("root tar"),
        "{e}"
    );
    assert_eq!(f.status(&m.id), Status::Allocated);
    // The image with a root tar: the task carries exactly what was asked.
    let asked = DiskLayout {
        esp_mib: Some(256),
        root_mib: Some(2048),
        ..DiskLayout::default()
    };
    f.act(
        &m,
        Action::Deploy(Box::new(DeployRequest {
            layout: Some(asked.clone()),
            ..deploy(IMAGE)
        })),
        Status::Deploying,
    );
    let shown = f.machine(&m.id).deploy.expect("a deploy request");
    assert_eq!(shown.layout.as_ref(), Some(&asked));
    f.boot(&mut m);
    let task = f.task(&m);
    let Task::Deploy(task) = task else {
        panic!("not a deploy task: {task:?}");
    };
    assert_eq!(task.layout, Some(asked));

    // No layout asked: none in the request or the task (the agent then picks raw or tar).
    let mut n = f.drive(2, Status::Allocated).expect("allocated");
    f.act(&n, Action::deploy(IMAGE), Status::Deploying);
    let shown = f.machine(&n.id).deploy.expect("a deploy request");
    assert!(shown.layout.is_none(), "{shown:?}");
    f.boot(&mut n);
    let task = f.task(&n);
    let Task::Deploy(task) = task else {
        panic!("not a deploy task: {task:?}");
    };
    assert!(task.layout.is_none(), "{task:?}");
    // Defaults only: `{}` asks for extraction with the default sizes.
    let o = f.drive(3, Status::Allocated).expect("allocated");
    f.act(
        &o,
        Action::Deploy(Box::new(DeployRequest {
            layout: Some(DiskLayout::default()),
            ..deploy(IMAGE)
        })),
        Status::Deploying,
    );
    let shown = f.machine(&o.id).deploy.expect("a deploy request");
    assert_eq!(shown.layout, Some(DiskLayout::default()));
}

/// `auto` in a deploy's network config takes the lowest address of `dhcp.static_range` that
/// no machine holds; the deploy records it (and the agent's task carries it); an address
/// another machine holds is refused naming the field; a range used up is refused; a release
/// frees the address.
#[test]
fn auto_addresses_come_from_the_static_range_one_machine_each() {
    let f = Fixture::with(Options {
        dhcp: "static_range = [\"10.77.0.50\", \"10.77.0.51\"]\n",
        ..Options::default()
    });
    let network = |n: u32, addr: &str| DeployRequest {
        network: Some(
            serde_json::from_str(&format!(
                r#"{{"interfaces": [{{"name": "en0", "mac": "{}", "addresses": ["{addr}"]}}]}}"#,
                mac_addr(n)
            ))
            .expect("a network config"),
        ),
        ..deploy(IMAGE)
    };
    let addresses = |id: &str| -> Vec<String> {
        let d = f.machine(id).deploy.expect("a deploy request");
        d.network.expect("a network config").interfaces[0]
            .addresses
            .clone()
    };
    let mut a = f.drive(1, Status::Allocated).expect("allocated");
    f.act(
        &a,
        Action::Deploy(Box::new(network(1, "auto"))),
        Status::Deploying,
    );
    assert_eq!(addresses(&a.id), ["10.77.0.50/24"]);
    f.boot(&mut a);
    let Task::Deploy(task) = f.task(&a) else {
        panic!("not a deploy task");
    };
    assert_eq!(
        task.network.expect("the task's network").interfaces[0].addresses,
        ["10.77.0.50/24"]
    );
    // Held by a: refused by field for b, which gets the next one by `auto`.
    let b = f.drive(2, Status::Allocated).expect("allocated");
    let e = refused(f.client.deploy(&b.id, &network(2, "10.77.0.50/24")));
    assert_eq!(answer(&e), (409, "address_taken"), "{e}");
    let message = e.message().unwrap_or_default();
    assert!(
        message.starts_with("network.interfaces[0].addresses[0]: 10.77.0.50 is machine")
            && message.contains(&a.id),
        "{e}"
    );
    // Addresses DHCP hands out, or the appliance's own: refused by field.
    for (addr, why) in [
        ("10.77.0.150/24", "10.77.0.150 is in dhcp's dynamic range"),
        ("10.77.0.1/24", "10.77.0.1 is the appliance's own address"),
    ] {
        let e = refused(f.client.deploy(&b.id, &network(2, addr)));
        assert_eq!(e.status(), Some(400), "{e}");
        let message = e.message().unwrap_or_default();
        assert_eq!(
            message,
            format!("network.interfaces[0].addresses[0]: {why}"),
            "{e}"
        );
    }
    f.act(
        &b,
        Action::Deploy(Box::new(network(2, "auto"))),
        Status::Deploying,
    );
    assert_eq!(addresses(&b.id), ["10.77.0.51/24"]);
    // The range is used up.
    let c = f.drive(3, Status::Allocated).expect("allocated");
    let e = refused(f.client.deploy(&c.id, &network(3, "auto")));
    assert_eq!(answer(&e), (409, "address_taken"), "{e}");
    assert!(
        e.message()
            .unwrap_or_default()
            .contains("every address of dhcp.static_range"),
        "{e}"
    );
    assert_eq!(f.status(&c.id), Status::Allocated);
    // Released, a's address is free again: c gets it.
    f.client.abort(&a.id).expect("abort");
    f.client
        .release(
            &a.id,
            &ReleaseBody {
                erase: Some(false),
                quick: None,
            },
        )
        .expect("release");
    f.act(
        &c,
        Action::Deploy(Box::new(network(3, "auto"))),
        Status::Deploying,
    );
    assert_eq!(addresses(&c.id), ["10.77.0.50/24"]);
}

/// A booting machine's agent token goes once to one address (DHCP off here, so to the
/// first address that asks after the machine was powered into the agent): another host
/// that fetches the same script gets no token and cannot use the machine's; the machine
/// itself may fetch again until its agent used the token, and then gets no other.
#[test]
fn a_boot_token_is_given_once_to_one_address() {
    use std::net::{IpAddr, Ipv4Addr};
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let f = Fixture::new();
    let mut a = f.create(31);
    f.act(&a, Action::Commission, Status::Commissioning);
    let script_path = format!("/ipxe/{}", a.mac);

    // The machine fetches its script: a token, and no cache may keep it.
    let (status, head, first) = common::request_from(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        f.server.port,
        "GET",
        &script_path,
        None,
        None,
    );
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    let (_, t1) = script_identity(&first).expect("the machine's script has its token");

    // Another host asks for the same script: no machine id, no token.
    let (status, _, stolen) =
        common::request_from(other, f.server.port, "GET", &script_path, None, None);
    assert_eq!(status, 200);
    assert!(script_identity(&stolen).is_none(), "{stolen}");
    assert!(
        !stolen.contains(&a.id) && !stolen.contains("stork.token"),
        "{stolen}"
    );
    // ... and the machine's token does not work from there.
    let (status, _, body) = f.server.api_request_from(
        other,
        "GET",
        &format!("/api/v1/agent/{}/task", a.id),
        Some(&t1),
        None,
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("another address"), "{body}");

    // iPXE retrying before the agent ran: a new token from the same address, the old dead.
    f.boot(&mut a);
    let t2 = a.token.clone().expect("a new token");
    assert_ne!(t1, t2);
    assert_eq!(
        answer(&refused(f.client.with_token(&t1).agent_task(&a.id))).0,
        401
    );
    assert_eq!(f.task(&a), Task::Commission { scripts: vec![] });

    // The agent used it: a later fetch gets no token, and the agent keeps working.
    let again = f.boot_script(&a);
    assert!(script_identity(&again).is_none(), "{again}");
    assert_eq!(f.task(&a), Task::Commission { scripts: vec![] });
    let events = f.events(&a.id);
    assert!(
        events.iter().any(|e| e.message.contains("no agent token")),
        "the refusals are recorded: {events:#?}"
    );

    // The next boot step starts a new boot: a token again.
    f.act(&a, Action::Abort, Status::FailedCommissioning);
    f.act(&a, Action::Commission, Status::Commissioning);
    f.boot(&mut a);
    assert_eq!(f.task(&a), Task::Commission { scripts: vec![] });
}

/// Scopes: a read-only token reads and changes nothing, an operator changes machines but
/// not tokens; an expired or revoked token is refused; the audit log names who asked what.
#[test]
fn token_scopes_expiry_revocation_and_the_audit_log() {
    use stork_proto::api::{AuditQuery, NewToken, TokenScope};
    let f = Fixture::new();
    let token = |scope, expires_in_secs| {
        f.client
            .create_token(&NewToken {
                description: format!("{scope} test"),
                scope,
                expires_in_secs,
            })
            .expect("create a token")
    };
    let reader = token(TokenScope::ReadOnly, None);
    let operator = token(TokenScope::Operator, None);
    assert_eq!(reader.record.scope, TokenScope::ReadOnly);
    let as_reader = f.client.with_token(&reader.token);
    let as_operator = f.client.with_token(&operator.token);

    // Read-only: reads, and every change is 403 naming the scope it needs.
    as_reader
        .machines(&MachineFilter::default())
        .expect("a reader reads");
    let new = NewMachine {
        macs: vec![mac_addr(41)],
        ..NewMachine::default()
    };
    let e = refused(as_reader.create_machine(&new));
    assert_eq!(answer(&e), (403, "forbidden"), "{e}");
    assert!(e.message().unwrap_or_default().contains("operator"), "{e}");
    assert_eq!(
        f.client.machines(&MachineFilter::default()).unwrap().len(),
        0
    );

    // Operator: machines yes, tokens and the audit log no.
    let m = as_operator
        .create_machine(&new)
        .expect("an operator adds a machine");
    as_operator.commission(&m.id).expect("and commissions it");
    let e = refused(as_operator.create_token(&NewToken::default()));
    assert_eq!(answer(&e), (403, "forbidden"), "{e}");
    let e = refused(as_operator.audit(&AuditQuery::default()));
    assert_eq!(answer(&e), (403, "forbidden"), "{e}");

    // Revoked: 401 from then on, and listed as revoked.
    let revoked = f.client.revoke_token(&operator.record.id).expect("revoke");
    assert!(revoked.revoked_at.is_some());
    let e = refused(as_operator.machines(&MachineFilter::default()));
    assert_eq!(answer(&e).0, 401, "{e}");
    assert!(e.message().unwrap_or_default().contains("revoked"), "{e}");
    let listed = f.client.tokens().unwrap();
    let row = listed.iter().find(|t| t.id == operator.record.id).unwrap();
    assert!(row.revoked_at.is_some(), "{listed:?}");
    let e = refused(f.client.revoke_token("nonesuch"));
    assert_eq!(answer(&e).0, 404, "{e}");

    // Expired: 401 once its time is past.
    let brief = token(TokenScope::Admin, Some(1));
    let as_brief = f.client.with_token(&brief.token);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match as_brief.machines(&MachineFilter::default()) {
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Ok(_) => panic!("a token of one second still works after ten"),
            Err(e) => {
                assert_eq!(answer(&e).0, 401, "{e}");
                assert!(e.message().unwrap_or_default().contains("expired"), "{e}");
                break;
            }
        }
    }

    // The audit log: each change with its actor and answer, refusals included.
    let log = f
        .client
        .audit(&AuditQuery::default())
        .expect("the audit log");
    let seen = |actor: &str, method: &str, path: &str, status: u16| {
        log.iter()
            .any(|a| a.actor == actor && a.method == method && a.path == path && a.status == status)
    };
    let (r, o) = (
        format!("api:{}", reader.record.id),
        format!("api:{}", operator.record.id),
    );
    assert!(seen(&r, "POST", "/api/v1/machines", 403), "{log:#?}");
    assert!(seen(&o, "POST", "/api/v1/machines", 201), "{log:#?}");
    let commission = format!("/api/v1/machines/{}/commission", m.id);
    assert!(seen(&o, "POST", &commission, 200), "{log:#?}");
    assert!(seen(&o, "POST", "/api/v1/tokens", 403), "{log:#?}");
    let revoke = format!("/api/v1/tokens/{}", operator.record.id);
    assert!(
        log.iter()
            .any(|a| a.method == "DELETE" && a.path == revoke && a.status == 200),
        "{log:#?}"
    );
    // Reads are not changes: not in the log.
    assert!(log.iter().all(|a| a.method != "GET"), "{log:#?}");
}

/// A host without a token cannot make the appliance write an audit entry per request (each
/// is a durable write): its refusals are written at the unauthenticated rate of its address
/// (`http.agent_rate`, `agent_burst`), the rest only counted, and none goes uncounted.
#[test]
fn anonymous_refusals_are_audited_at_a_bounded_rate() {
    use stork_proto::api::{AuditQuery, NewToken};
    let f = Fixture::new();
    let anonymous = f.client.anonymous();
    const SENT: u64 = 200;
    for _ in 0..SENT {
        let e = refused(anonymous.create_token(&NewToken::default()));
        assert_eq!(answer(&e), (401, "unauthorized"), "{e}");
    }
    let log = f
        .client
        .audit(&AuditQuery {
            after: 0,
            limit: Some(10_000),
        })
        .expect("the audit log");
    let written = log.iter().filter(|a| a.actor == "anonymous").count() as u64;
    let dropped = f.client.stats().expect("stats").http["audit_unauthenticated_dropped"];
    assert_eq!(
        written + dropped,
        SENT,
        "{written} written, {dropped} counted"
    );
    // The burst (20) is written; far fewer than all of them.
    assert!((20..SENT).contains(&written), "{written} written");
}

/// A deploy's user-data (it may hold secrets) is shown by the machine's own page, not by
/// the listing everyone with a read-only token scrolls.
#[test]
fn user_data_is_left_out_of_listings() {
    let f = Fixture::new();
    let m = f.drive(51, Status::Allocated).unwrap();
    let req = DeployRequest {
        user_data: Some("#cloud-config\npassword: s3cret\n".into()),
        ..deploy(IMAGE)
    };
    f.act(&m, Action::Deploy(Box::new(req)), Status::Deploying);
    let listed = f.client.machines(&MachineFilter::default()).unwrap();
    let row = listed.iter().find(|x| x.id == m.id).unwrap();
    let deploy = row.deploy.as_ref().expect("the listing shows the deploy");
    assert_eq!(
        (deploy.image.as_str(), deploy.user_data.as_ref()),
        (IMAGE, None)
    );
    let shown = f.machine(&m.id);
    assert!(
        shown
            .deploy
            .and_then(|d| d.user_data)
            .is_some_and(|u| u.contains("s3cret"))
    );
}

/// `PUT /boot-resources/{name}/image`: an upload with its sum is stored and registered and a
/// deploy takes it; a wrong sum, a broken qcow2 or a bad name is refused naming the field and
/// leaves no file; a read-only token cannot upload; a name is taken once.
#[test]
fn an_uploaded_image_is_checked_stored_and_registered() {
    use sha2::{Digest, Sha256};
    use stork_proto::api::{NewToken, TokenScope, UploadFormat};
    let f = Fixture::new();
    let images = f.server.data_dir().join("boot/images");
    let left = || -> Vec<String> {
        std::fs::read_dir(&images)
            .map(|d| {
                let mut v: Vec<String> = d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    };
    let before = left();
    let bytes = vec![7u8; 3 << 20];
    let sum = hex::encode(Sha256::digest(&bytes));
    let upload = |c: &Client, name: &str, format, sha: &str, body: &[u8]| {
        c.upload_image(
            name,
            format,
            sha,
            &mut std::io::Cursor::new(body.to_vec()),
            Some(body.len() as u64),
        )
    };

    let wrong = hex::encode(Sha256::digest(b"other"));
    let e = refused(upload(&f.client, "mine", UploadFormat::Raw, &wrong, &bytes));
    assert_eq!(answer(&e).0, 400, "{e}");
    assert!(
        e.message().unwrap_or_default().starts_with("sha256: "),
        "{e}"
    );
    let e = refused(upload(&f.client, "mine", UploadFormat::Raw, "12ab", &bytes));
    assert!(
        e.message().unwrap_or_default().starts_with("sha256: "),
        "{e}"
    );
    let e = refused(upload(
        &f.client,
        "bad!name",
        UploadFormat::Raw,
        &sum,
        &bytes,
    ));
    assert_eq!(answer(&e).0, 400, "{e}");
    // A length over what fits is refused before a byte is sent.
    let e = refused(f.client.upload_image(
        "huge",
        UploadFormat::Raw,
        &sum,
        &mut std::io::Cursor::new(Vec::new()),
        Some(1 << 62),
    ));
    assert_eq!(answer(&e), (413, "too_large"), "{e}");
    let e = refused(upload(&f.client, "q", UploadFormat::Qcow2, &sum, &bytes));
    assert!(
        e.message().unwrap_or_default().starts_with("format: "),
        "{e}"
    );
    let reader = f
        .client
        .create_token(&NewToken {
            description: "reader".into(),
            scope: TokenScope::ReadOnly,
            expires_in_secs: None,
        })
        .expect("a reader token");
    let e = refused(upload(
        &f.client.with_token(&reader.token),
        "mine",
        UploadFormat::Raw,
        &sum,
        &bytes,
    ));
    assert_eq!(answer(&e).0, 403, "{e}");
    assert_eq!(left(), before, "a refused upload left files");
    let staged = std::fs::read_dir(f.server.data_dir().join("uploads")).map_or(0, |d| d.count());
    assert_eq!(staged, 0, "a refused upload left its staging directory");

    let r = upload(&f.client, "mine", UploadFormat::Raw, &sum, &bytes).expect("upload");
    assert_eq!(r.files[0].path, "images/mine/disk.raw");
    assert_eq!(
        (r.files[0].size, r.files[0].sha256.as_str()),
        (bytes.len() as u64, sum.as_str())
    );
    assert_eq!(std::fs::read(images.join("mine/disk.raw")).unwrap(), bytes);
    assert!(f.client.boot_resources().unwrap().iter().any(|b| b == &r));
    let e = refused(upload(&f.client, "mine", UploadFormat::Raw, &sum, &bytes));
    assert_eq!(answer(&e), (409, "exists"), "{e}");
    // A deploy takes it.
    let m = f.drive(1, Status::Allocated).expect("allocated");
    let m = f
        .client
        .deploy(&m.id, &deploy("mine"))
        .expect("deploy the upload");
    assert_eq!(m.status, Status::Deploying);
    // Not deleted while a machine deploys it; then deleted with its files.
    let e = refused(f.client.delete_boot_resource("mine"));
    assert_eq!(answer(&e), (409, "in_use"), "{e}");
    f.client.abort(&m.id).expect("abort the deploy");
    f.client.delete_boot_resource("mine").expect("delete");
    assert_eq!(left(), before);
    assert!(
        !f.client
            .boot_resources()
            .unwrap()
            .iter()
            .any(|b| b.name == "mine")
    );
    let e = refused(f.client.delete_boot_resource("mine"));
    assert_eq!(answer(&e).0, 404, "{e}");
}

/// Commissioning scripts: stored by field-checked request, run in name order before the
/// hardware tests the commission asked for; the agent's results are recorded and shown, a
/// result for a script this commissioning does not run is refused, and a new commissioning
/// clears them. A failed script's step failure fails the commissioning with its reason.
#[test]
fn commissioning_scripts_run_in_order_and_their_results_are_kept() {
    use stork_proto::api::{CommissionBody, NewScript, ScriptResult};
    use stork_proto::{AgentEvent, CommissionScript};
    let f = Fixture::new();
    let add = |name: &str, content: &str| {
        f.client.add_script(&NewScript {
            name: name.into(),
            content: content.into(),
            timeout_secs: None,
        })
    };
    add("20-second", "echo two").expect("add a script");
    add("10-first", "#!/bin/sh\necho one").expect("add a script");
    let e = refused(add("bad/name", "x"));
    assert!(e.message().unwrap_or_default().starts_with("name: "), "{e}");
    let e = refused(add("memory", "x"));
    assert!(e.message().unwrap_or_default().starts_with("name: "), "{e}");
    let names: Vec<String> = f
        .client
        .scripts()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["10-first", "20-second"]);

    let mut m = f.create(1);
    let e = refused(f.client.commission_with(
        &m.id,
        &CommissionBody {
            tests: vec!["fans".into()],
        },
    ));
    assert!(
        e.message()
            .unwrap_or_default()
            .starts_with("tests: \"fans\""),
        "{e}"
    );
    assert_eq!(f.status(&m.id), Status::New);
    let shown = f
        .client
        .commission_with(
            &m.id,
            &CommissionBody {
                tests: vec!["disk-read".into()],
            },
        )
        .expect("commission");
    assert_eq!(shown.commission_tests, ["disk-read"]);
    f.boot(&mut m);
    let Task::Commission { scripts } = f.task(&m) else {
        panic!("not a commission task");
    };
    let order: Vec<(&str, bool)> = scripts.iter().map(|s| (s.name.as_str(), s.test)).collect();
    assert_eq!(
        order,
        [
            ("10-first", false),
            ("20-second", false),
            ("disk-read", true)
        ]
    );
    let result = |s: &CommissionScript, code: i32| ScriptResult {
        name: s.name.clone(),
        test: s.test,
        exit_status: Some(code),
        timed_out: false,
        duration_ms: 12,
        output: format!("ran {}\n", s.name),
        at: 0,
    };
    let agent = f.agent(&m);
    agent
        .agent_script_result(&m.id, &result(&scripts[0], 0))
        .expect("a result");
    agent
        .agent_script_result(&m.id, &result(&scripts[2], 1))
        .expect("a result");
    let mut stray = result(&scripts[0], 0);
    stray.name = "not-run".into();
    let e = refused(agent.agent_script_result(&m.id, &stray));
    assert!(e.message().unwrap_or_default().starts_with("name: "), "{e}");
    let kept = f.client.machine_scripts(&m.id).expect("results");
    assert_eq!(kept.len(), 2);
    assert_eq!(
        (kept[0].output.as_str(), kept[0].passed()),
        ("ran 10-first\n", true)
    );
    assert!(!kept[1].passed() && kept[1].test);

    // The agent fails the step with the test's reason: the machine says why.
    agent
        .agent_event(
            &m.id,
            &AgentEvent {
                step: AgentStep::Commission,
                state: StepState::Failed,
                message: "hardware test disk-read failed (exit 1): unreadable: vdb".into(),
                progress: None,
                log_tail: None,
            },
        )
        .expect("the failure");
    let failed = f.machine(&m.id);
    assert_eq!(failed.status, Status::FailedCommissioning);
    let why = failed.status_message.unwrap_or_default();
    assert!(
        why.contains("disk-read failed (exit 1): unreadable: vdb"),
        "{why}"
    );
    // Results are not taken once the machine no longer commissions (its token is gone).
    let e = refused(agent.agent_script_result(&m.id, &result(&scripts[1], 0)));
    assert_eq!(e.status(), Some(401), "{e}");

    // A new commissioning clears them, and runs only the scripts then.
    f.act(&m, Action::Commission, Status::Commissioning);
    assert!(f.client.machine_scripts(&m.id).unwrap().is_empty());
    f.client.delete_script("20-second").expect("delete");
    f.boot(&mut m);
    let Task::Commission { scripts } = f.task(&m) else {
        panic!("not a commission task");
    };
    let names: Vec<&str> = scripts.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["10-first"]);
}

/// Named layouts: stored by field-checked request and listed; a machine's default names one
/// (an unknown name is refused naming `layout`). A deploy to disk that gives no layout takes
/// the default, checked against the inventory as any layout (a mistake says it is the
/// default's); one that gives its own keeps it; a deploy to memory takes none. A default
/// in use cannot be deleted.
#[test]
fn a_machines_default_layout_is_what_a_deploy_without_one_installs() {
    let f = Fixture::new();
    let named = |name: &str, json: &str| NamedLayout {
        name: name.into(),
        layout: serde_json::from_str(json).expect("a layout"),
        created_at: 0,
    };
    let e = refused(f.client.add_layout(&named("a/b", "{}")));
    assert!(e.message().unwrap_or_default().starts_with("name: "), "{e}");
    let e = refused(f.client.add_layout(&named("raid", r#"{"raid": 1}"#)));
    assert!(
        e.message().unwrap_or_default().starts_with("layout.raid: "),
        "{e}"
    );
    let big = f
        .client
        .add_layout(&named("big", r#"{"root_mib": 1048576}"#))
        .expect("add big");
    assert!(big.created_at > 0);
    let lvm = named(
        "lvm",
        r#"{"esp_mib": 256, "lvm": {"volumes": [{"name": "root", "mount": "/", "size_mib": 2048}]}}"#,
    );
    f.client.add_layout(&lvm).expect("add lvm");
    let names: Vec<String> = f
        .client
        .layouts()
        .expect("list")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["big", "lvm"]);

    let m = f.drive(1, Status::Allocated).expect("allocated");
    let e = refused(f.client.set_default_layout(&m.id, Some("nope")));
    assert_eq!(answer(&e), (400, "bad_request"), "{e}");
    assert!(
        e.message().unwrap_or_default().starts_with("layout: "),
        "{e}"
    );
    let shown = f
        .client
        .set_default_layout(&m.id, Some("big"))
        .expect("set big");
    assert_eq!(shown.default_layout.as_deref(), Some("big"));
    let e = refused(f.client.deploy(&m.id, &deploy(IMAGE)));
    let message = e.message().unwrap_or_default();
    assert!(
        message.starts_with("layout.root_mib: ")
            && message.ends_with("(in the machine's default layout \"big\")"),
        "{e}"
    );
    assert_eq!(f.status(&m.id), Status::Allocated);
    let e = refused(f.client.delete_layout("big"));
    assert_eq!(answer(&e), (409, "in_use"), "{e}");

    f.client
        .set_default_layout(&m.id, Some("lvm"))
        .expect("set lvm");
    f.act(&m, Action::deploy(IMAGE), Status::Deploying);
    let shown = f.machine(&m.id);
    assert_eq!(shown.default_layout.as_deref(), Some("lvm"));
    assert_eq!(
        shown.deploy.expect("a deploy").layout,
        Some(lvm.layout.clone())
    );

    // A layout in the request wins; a deploy to memory touches no disk.
    let n = f.drive(2, Status::Allocated).expect("allocated");
    f.client
        .set_default_layout(&n.id, Some("lvm"))
        .expect("set lvm");
    let own = DiskLayout {
        root_mib: Some(3000),
        ..DiskLayout::default()
    };
    f.act(
        &n,
        Action::Deploy(Box::new(DeployRequest {
            layout: Some(own.clone()),
            ..deploy(IMAGE)
        })),
        Status::Deploying,
    );
    assert_eq!(f.machine(&n.id).deploy.expect("a deploy").layout, Some(own));
    let o = f.drive(3, Status::Allocated).expect("allocated");
    f.client
        .set_default_layout(&o.id, Some("lvm"))
        .expect("set lvm");
    f.act(
        &o,
        Action::Deploy(Box::new(DeployRequest {
            target: DeployTarget::Memory,
            ..deploy(IMAGE)
        })),
        Status::Deploying,
    );
    assert!(f.machine(&o.id).deploy.expect("a deploy").layout.is_none());

    // Cleared, the layout it named can go.
    let cleared = f.client.set_default_layout(&m.id, None).expect("clear");
    assert!(cleared.default_layout.is_none());
    f.client.delete_layout("big").expect("delete big");
    let e = refused(f.client.delete_layout("big"));
    assert_eq!(answer(&e).0, 404, "{e}");
    let events = f.client.machine_events(&m.id, 0).expect("events");
    assert!(
        events.iter().any(|e| e.message == "default layout: lvm")
            && events.iter().any(|e| e.message == "default layout cleared"),
        "{events:?}"
    );
}

#[test]
fn a_deploys_kernel_is_one_of_the_images_and_reaches_the_agent_as_its_version() {
    let f = Fixture::new();
    let mut m = f.drive(1, Status::Allocated).expect("allocated");
    let with_kernel = |k: &str| DeployRequest {
        kernel: Some(k.into()),
        ..deploy(IMAGE)
    };
    // Refused at request time, naming the field and what the image has.
    let e = refused(f.client.deploy(&m.id, &with_kernel("hwe")));
    assert_eq!(e.status(), Some(400), "{e}");
    let message = e.message().unwrap_or_default();
    assert!(
        message.starts_with("kernel:")
            && message.contains("\"hwe\"")
            && message.contains("backports (6.12.95+deb12-amd64)"),
        "{e}"
    );
    let e = refused(f.client.deploy(
        &m.id,
        &DeployRequest {
            target: DeployTarget::Memory,
            ..with_kernel("backports")
        },
    ));
    assert!(
        e.message().unwrap_or_default().starts_with("kernel:"),
        "{e}"
    );
    assert_eq!(f.status(&m.id), Status::Allocated);
    // By name: the agent gets its version.
    f.act(
        &m,
        Action::Deploy(Box::new(with_kernel("backports"))),
        Status::Deploying,
    );
    f.boot(&mut m);
    let Task::Deploy(task) = f.task(&m) else {
        panic!("not a deploy task");
    };
    assert_eq!(task.kernel.as_deref(), Some("6.12.95+deb12-amd64"));
    // The default, asked by version or not at all: the links stay as the image has them.
    for (n, kernel) in [(2, Some("6.1.0-50-amd64")), (3, None)] {
        let mut o = f.drive(n, Status::Allocated).expect("allocated");
        let req = DeployRequest {
            kernel: kernel.map(String::from),
            ..deploy(IMAGE)
        };
        f.act(&o, Action::Deploy(Box::new(req)), Status::Deploying);
        f.boot(&mut o);
        let Task::Deploy(task) = f.task(&o) else {
            panic!("not a deploy task");
        };
        assert_eq!(task.kernel, None, "{kernel:?}");
    }
    // A machine's minimum: a bad release is refused naming the field; an older kernel asked
    // for is refused; none asked for boots the oldest at the minimum.
    let mut p = f.drive(4, Status::Allocated).expect("allocated");
    let e = refused(f.client.set_min_kernel(&p.id, Some("6.x")));
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        e.message().unwrap_or_default().starts_with("min_kernel:"),
        "{e}"
    );
    let shown = f
        .client
        .set_min_kernel(&p.id, Some("6.6"))
        .expect("min kernel");
    assert_eq!(shown.min_kernel.as_deref(), Some("6.6"));
    let e = refused(f.client.deploy(&p.id, &with_kernel("stable")));
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        e.message()
            .unwrap_or_default()
            .contains("older than the machine's minimum kernel 6.6"),
        "{e}"
    );
    f.act(&p, Action::deploy(IMAGE), Status::Deploying);
    assert_eq!(f.machine(&p.id).min_kernel.as_deref(), Some("6.6"));
    f.boot(&mut p);
    assert_eq!(
        f.machine(&p.id).min_kernel.as_deref(),
        Some("6.6"),
        "after boot"
    );
    let Task::Deploy(task) = f.task(&p) else {
        panic!("not a deploy task");
    };
    assert_eq!(task.kernel.as_deref(), Some("6.12.95+deb12-amd64"));
    let cleared = f.client.set_min_kernel(&p.id, None).expect("cleared");
    assert_eq!(cleared.min_kernel, None);
}
