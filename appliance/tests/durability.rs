//! Durability: 1,000 machines moved through the lifecycle by 50 concurrent clients while the
//! server is killed with SIGKILL and restarted every second or two.
//!
//! What "acknowledged" means here: a 2xx answer, or, for a request whose first attempt got no
//! answer (the server died), a retry against the restarted server whose refusal (409, or 401
//! for an agent whose token the first attempt already revoked) is explained by the stored
//! machine being exactly in the status the first attempt would have produced. Each client
//! owns its machines, so nothing else moves them and the checks are exact:
//! - every machine whose creation was acknowledged exists;
//! - its stored status equals the status after its last acknowledged change;
//! - its status-change events form an unbroken chain of edges of `lifecycle::transition`,
//!   and that chain is exactly the acknowledged changes (a plain release shows as
//!   `releasing` then `ready`: the controller completes it) - so the history is complete
//!   and no change the server did not acknowledge slipped in.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{IMAGE, Options, Server, inventory, mac, mac_addr, script_identity, status_history};
use stork::lifecycle::Status;
use stork_client::Client;
use stork_proto::api::{
    AllocateBody, DeployRequest, EventQuery, Machine, MachineFilter, MarkBrokenBody, NewMachine,
    PowerConfig, ReleaseBody,
};

const MACHINES: u32 = 1000;
const CLIENTS: u32 = 50;

/// One step of a machine's script.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    /// A user action.
    Action(Action),
    /// The machine fetches its boot script (a new agent token).
    Boot,
    /// The agent reports.
    Agent(Report),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Commission,
    Allocate,
    /// Of [`IMAGE`].
    Deploy,
    /// Without erasing.
    Release,
    ReleaseErase,
    /// With a reason.
    MarkBroken,
    MarkFixed,
    Abort,
}

impl Action {
    fn send(self, c: &Client, id: &str) -> stork_client::Result<Machine> {
        let release = |erase| {
            c.release(
                id,
                &ReleaseBody {
                    erase: Some(erase),
                    quick: None,
                },
            )
        };
        match self {
            Action::Commission => c.commission(id),
            Action::Allocate => c.allocate(id, &AllocateBody::default()),
            Action::Deploy => c.deploy(
                id,
                &DeployRequest {
                    image: IMAGE.into(),
                    ..DeployRequest::default()
                },
            ),
            Action::Release => release(false),
            Action::ReleaseErase => release(true),
            Action::MarkBroken => c.mark_broken(
                id,
                &MarkBrokenBody {
                    reason: Some("test".into()),
                },
            ),
            Action::MarkFixed => c.mark_fixed(id),
            Action::Abort => c.abort(id),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Report {
    Commissioned,
    Deployed,
    Released,
}

/// The lifecycle tour; machine `n` runs a prefix of it, so machines end in every status.
const SCRIPT: &[(Op, Option<Status>)] = &[
    (Op::Create, Some(Status::New)),
    (Op::Action(Action::Commission), Some(Status::Commissioning)),
    (Op::Boot, None),
    (Op::Agent(Report::Commissioned), Some(Status::Ready)),
    (Op::Action(Action::Allocate), Some(Status::Allocated)),
    (Op::Action(Action::Deploy), Some(Status::Deploying)),
    (Op::Boot, None),
    (Op::Agent(Report::Deployed), Some(Status::Deployed)),
    (Op::Action(Action::ReleaseErase), Some(Status::DiskErasing)),
    (Op::Boot, None),
    (Op::Agent(Report::Released), Some(Status::Ready)),
    (Op::Action(Action::MarkBroken), Some(Status::Broken)),
    (Op::Action(Action::MarkFixed), Some(Status::Ready)),
    (Op::Action(Action::Allocate), Some(Status::Allocated)),
    (Op::Action(Action::Release), Some(Status::Ready)),
    (Op::Action(Action::Commission), Some(Status::Commissioning)),
    (Op::Action(Action::Abort), Some(Status::FailedCommissioning)),
];

fn script_len(n: u32) -> usize {
    // Most machines run the whole tour; the rest stop at every possible step.
    let full = SCRIPT.len();
    if n.is_multiple_of(3) {
        1 + (n as usize / 3) % full
    } else {
        full
    }
}

/// What a client knows about one of its machines.
#[derive(Debug, Default)]
struct Record {
    n: u32,
    id: String,
    /// Status after each acknowledged change, in order.
    acked: Vec<Status>,
    /// Changes acknowledged only through a retry's explained refusal.
    confirmed_by_retry: u32,
    /// Plain releases cut between their two saves and finished by the restarted server.
    finished_by_restart: u32,
}

struct Stats {
    transport_errors: AtomicU32,
    requests: AtomicU32,
}

/// One of the concurrent clients.
struct Worker<'a> {
    /// With the admin token.
    client: Client,
    stats: &'a Stats,
}

impl Worker<'_> {
    /// Sends until the server answers; the flag says whether an earlier attempt went
    /// unanswered (so it may have been applied).
    fn send<T>(
        &self,
        what: &str,
        request: impl Fn() -> stork_client::Result<T>,
    ) -> (stork_client::Result<T>, bool) {
        let start = Instant::now();
        let mut retried = false;
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            match request() {
                Err(e @ stork_client::Error::Unreachable { .. }) => {
                    self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "{what}: no answer for 60 s: {e}"
                    );
                    retried = true;
                    std::thread::sleep(Duration::from_millis(25));
                }
                answer => {
                    if let Err(e) = &answer {
                        assert!(
                            e.status().is_some_and(|s| s < 500),
                            "{what}: a server error or an undecodable answer: {e}"
                        );
                    }
                    return (answer, retried);
                }
            }
        }
    }

    fn stored_status(&self, key: &str) -> Option<(String, Status)> {
        let what = format!("GET machine {key}");
        match self.send(&what, || self.client.machine(key)).0 {
            Ok(m) => Some((m.id, m.status)),
            Err(e) if e.status() == Some(404) => None,
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// Runs machine `n`'s script, recording what the server acknowledged.
    fn run_machine(&self, n: u32) -> Record {
        let mut rec = Record {
            n,
            ..Record::default()
        };
        let mac = mac(n);
        let mut token: Option<String> = None;
        for (op, want) in &SCRIPT[..script_len(n)] {
            let what = format!("machine {n} {op:?}");
            // The status the answer names, if it names one.
            let (answer, retried, accepted_refusals): (
                stork_client::Result<Option<Status>>,
                bool,
                &[u16],
            ) = match *op {
                Op::Create => {
                    let new = NewMachine {
                        macs: vec![mac_addr(n)],
                        power: Some(PowerConfig::manual()),
                        ..NewMachine::default()
                    };
                    let (r, retried) = self.send(&what, || self.client.create_machine(&new));
                    if let Ok(m) = &r {
                        rec.id = m.id.clone();
                    }
                    // A retried create whose first attempt committed: the MAC is taken.
                    (r.map(|m| Some(m.status)), retried, &[409])
                }
                Op::Action(action) => {
                    let (r, retried) = self.send(&what, || action.send(&self.client, &rec.id));
                    (r.map(|m| Some(m.status)), retried, &[409])
                }
                Op::Boot => {
                    let anonymous = self.client.anonymous();
                    let (r, _) = self.send(&what, || anonymous.boot_script(&mac));
                    let script = r.unwrap_or_else(|e| panic!("boot script: {e}"));
                    let (id, t) = script_identity(&script)
                        .unwrap_or_else(|| panic!("machine {n}: no agent token in {script}"));
                    assert_eq!(id, rec.id);
                    token = Some(t);
                    continue;
                }
                Op::Agent(report) => {
                    let agent = match &token {
                        Some(t) => self.client.with_token(t),
                        None => self.client.anonymous(),
                    };
                    let id = rec.id.as_str();
                    let (r, retried) = match report {
                        Report::Commissioned => {
                            let inv = inventory(&mac, 2, 4, 20);
                            let (r, retried) =
                                self.send(&what, || agent.agent_commissioned(id, &inv));
                            (r.map(|r| Some(r.status)), retried)
                        }
                        Report::Deployed => {
                            let (r, retried) = self.send(&what, || agent.agent_deployed(id));
                            (r.map(|()| None), retried)
                        }
                        Report::Released => {
                            let (r, retried) = self.send(&what, || agent.agent_released(id));
                            (r.map(|()| None), retried)
                        }
                    };
                    // The committed report revoked the token the retry carries.
                    (r, retried, &[401, 409])
                }
            };
            let want = want.unwrap_or_else(|| unreachable!());
            match answer {
                Ok(got) => {
                    if let Some(got) = got {
                        assert_eq!(got, want, "{what}");
                    }
                }
                Err(e) if retried && e.status().is_some_and(|s| accepted_refusals.contains(&s)) => {
                    // Did the unanswered attempt commit? Then the machine is exactly where it
                    // would have left it.
                    let key = if rec.id.is_empty() {
                        mac.clone()
                    } else {
                        rec.id.clone()
                    };
                    let mut stored = self.stored_status(&key);
                    // A plain release interrupted between its two saves is finished by the
                    // restarted server (Releasing -> Ready) shortly after it starts.
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while want == Status::Ready
                        && matches!(stored, Some((_, Status::Releasing)))
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(50));
                        stored = self.stored_status(&key);
                        if matches!(stored, Some((_, Status::Ready))) {
                            rec.finished_by_restart += 1;
                        }
                    }
                    match stored {
                        Some((id, status)) if status == want => {
                            rec.id = id;
                            rec.confirmed_by_retry += 1;
                        }
                        other => panic!(
                            "{what}: retry refused ({e:?}) but the stored machine is {other:?}, not {want}"
                        ),
                    }
                }
                Err(e) => panic!("{what}: {e:?}"),
            }
            rec.acked.push(want);
        }
        rec
    }
}

#[test]
fn acknowledged_changes_survive_sigkill() {
    let started = Instant::now();
    let mut server = Server::start(Options::default());
    let client = server.client();
    server.register_image(b"tar");

    let stats = Stats {
        transport_errors: AtomicU32::new(0),
        requests: AtomicU32::new(0),
    };
    let done = AtomicBool::new(false);
    let mut kills = 0u32;
    let records: Vec<Record> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let worker = Worker {
                    client: client.clone(),
                    stats: &stats,
                };
                scope.spawn(move || {
                    (0..MACHINES)
                        .filter(|n| n % CLIENTS == c)
                        .map(|n| worker.run_machine(n))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let finisher = scope.spawn(|| {
            // Join every client before reporting a failure, so the killer always stops.
            let results: Vec<_> = clients.into_iter().map(|h| h.join()).collect();
            done.store(true, Ordering::SeqCst);
            let mut out = Vec::new();
            for r in results {
                out.extend(r.unwrap_or_else(|e| std::panic::resume_unwind(e)));
            }
            out
        });
        // The killer runs on this thread: the server is our child (PR_SET_PDEATHSIG).
        let mut rounds = 0u64;
        while !done.load(Ordering::SeqCst) {
            // 0.7 to 1.7 s of work between kills, varied so kills land at different moments.
            rounds += 1;
            let wait = Duration::from_millis(700 + (rounds * 379) % 1000);
            let until = Instant::now() + wait;
            while Instant::now() < until && !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !done.load(Ordering::SeqCst) {
                server.restart();
                kills += 1;
            }
        }
        finisher
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    let work = started.elapsed();
    // One more power cut after the last acknowledgement.
    server.restart();
    kills += 1;

    // Verify every machine against what its client was told.
    let all = client
        .machines(&MachineFilter::default())
        .expect("the machines");
    let stored: HashMap<&str, &Machine> = all.iter().map(|m| (m.id.as_str(), m)).collect();
    assert_eq!(stored.len(), MACHINES as usize, "machines stored");
    let (mut confirmed, mut finished) = (0, 0);
    for rec in &records {
        let m = stored
            .get(rec.id.as_str())
            .unwrap_or_else(|| panic!("machine {} ({}) is lost", rec.n, rec.id));
        let last = *rec.acked.last().unwrap();
        assert_eq!(m.status, last, "machine {}: stored status", rec.n);
        let events = client
            .events(&EventQuery {
                after: 0,
                machine: Some(rec.id.clone()),
                limit: Some(10000),
            })
            .unwrap_or_else(|e| panic!("machine {}: events: {e}", rec.n));
        let history = status_history(&events).unwrap_or_else(|e| panic!("machine {}: {e}", rec.n));
        // A plain release is acknowledged as Ready; its history shows Releasing first.
        let changes = SCRIPT[..script_len(rec.n)]
            .iter()
            .filter(|(_, st)| st.is_some());
        let mut expected = Vec::new();
        for ((op, _), acked) in changes.zip(&rec.acked) {
            if let Op::Action(Action::Release) = op {
                expected.push(Status::Releasing);
            }
            expected.push(*acked);
        }
        assert_eq!(history, expected, "machine {}: status-change events", rec.n);
        confirmed += rec.confirmed_by_retry;
        finished += rec.finished_by_restart;
    }
    let requests = stats.requests.load(Ordering::Relaxed);
    let lost = stats.transport_errors.load(Ordering::Relaxed);
    eprintln!(
        "{MACHINES} machines, {CLIENTS} clients, {requests} requests in {:.1} s; {kills} SIGKILLs; \
         {lost} requests unanswered and retried; {confirmed} changes confirmed by a retry's refusal; \
         {finished} interrupted releases finished by the restarted server",
        work.as_secs_f64()
    );
    assert!(
        kills >= 3,
        "only {kills} kills: the workload finished too fast to test anything"
    );
}
