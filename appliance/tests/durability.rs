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

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Api, Body, Options, Resp, Server, inventory, mac, script_identity, status_history};
use serde_json::{Value, json};
use stork::lifecycle::Status;

const MACHINES: u32 = 1000;
const CLIENTS: u32 = 50;

/// One step of a machine's script.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    /// A user action with its body.
    Action(&'static str, &'static str),
    /// The machine fetches its boot script (a new agent token).
    Boot,
    /// The agent reports.
    Agent(&'static str),
}

/// The lifecycle tour; machine `n` runs a prefix of it, so machines end in every status.
const SCRIPT: &[(Op, Option<Status>)] = &[
    (Op::Create, Some(Status::New)),
    (Op::Action("commission", "{}"), Some(Status::Commissioning)),
    (Op::Boot, None),
    (Op::Agent("commissioned"), Some(Status::Ready)),
    (Op::Action("allocate", "{}"), Some(Status::Allocated)),
    (
        Op::Action("deploy", r#"{"image":"debian-12"}"#),
        Some(Status::Deploying),
    ),
    (Op::Boot, None),
    (Op::Agent("deployed"), Some(Status::Deployed)),
    (
        Op::Action("release", r#"{"erase":true}"#),
        Some(Status::DiskErasing),
    ),
    (Op::Boot, None),
    (Op::Agent("released"), Some(Status::Ready)),
    (
        Op::Action("mark-broken", r#"{"reason":"test"}"#),
        Some(Status::Broken),
    ),
    (Op::Action("mark-fixed", "{}"), Some(Status::Ready)),
    (Op::Action("allocate", "{}"), Some(Status::Allocated)),
    (Op::Action("release", "{}"), Some(Status::Ready)),
    (Op::Action("commission", "{}"), Some(Status::Commissioning)),
    (Op::Action("abort", "{}"), Some(Status::FailedCommissioning)),
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

struct Client<'a> {
    api: Api,
    admin: &'a str,
    stats: &'a Stats,
}

impl Client<'_> {
    /// Sends until the server answers; the flag says whether an earlier attempt went
    /// unanswered (so it may have been applied).
    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (Resp, bool) {
        let start = Instant::now();
        let mut retried = false;
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            match self.api.try_req(method, path, token, body.map(Body::Raw)) {
                Ok(r) => {
                    assert!(r.status < 500, "{method} {path}: server error {}", r.text);
                    return (r, retried);
                }
                Err(e) => {
                    self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "{method} {path}: no answer for 60 s: {e}"
                    );
                    retried = true;
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
    }

    fn stored_status(&self, key: &str) -> Option<(String, Status)> {
        let (r, _) = self.send("GET", &format!("/machines/{key}"), Some(self.admin), None);
        if r.status == 404 {
            return None;
        }
        assert_eq!(r.status, 200, "GET machine {key}: {}", r.text);
        let status = Status::parse(r.body["status"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("unknown status in {}", r.text));
        Some((
            r.body["id"].as_str().unwrap_or_default().to_string(),
            status,
        ))
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
            let (resp, retried, accepted_refusals): (Resp, bool, &[u16]) = match *op {
                Op::Create => {
                    let body = json!({"macs": [mac], "power": {"driver": "manual"}}).to_string();
                    let (r, retried) =
                        self.send("POST", "/machines", Some(self.admin), Some(&body));
                    if r.status == 201 {
                        rec.id = r.body["id"].as_str().unwrap_or_default().to_string();
                    }
                    // A retried create whose first attempt committed: the MAC is taken.
                    (r, retried, &[409])
                }
                Op::Action(action, body) => {
                    let path = format!("/machines/{}/{action}", rec.id);
                    let (r, retried) = self.send("POST", &path, Some(self.admin), Some(body));
                    (r, retried, &[409])
                }
                Op::Boot => {
                    let (r, _) = self.send("GET", &format!("/ipxe/{mac}"), None, None);
                    assert_eq!(r.status, 200, "boot script: {}", r.text);
                    let (id, t) = script_identity(&r.text)
                        .unwrap_or_else(|| panic!("machine {n}: no agent token in {}", r.text));
                    assert_eq!(id, rec.id);
                    token = Some(t);
                    continue;
                }
                Op::Agent(what) => {
                    let path = format!("/agent/{}/{what}", rec.id);
                    let body =
                        (what == "commissioned").then(|| inventory(&mac, 2, 4, 20).to_string());
                    let (r, retried) = self.send("POST", &path, token.as_deref(), body.as_deref());
                    // The committed report revoked the token the retry carries.
                    (r, retried, &[401, 409])
                }
            };
            let want = want.unwrap_or_else(|| unreachable!());
            if (200..300).contains(&resp.status) {
                if let Some(got) = resp.body.get("status").and_then(Value::as_str) {
                    assert_eq!(got, want.as_str(), "machine {n} {op:?}: {}", resp.text);
                }
            } else if retried && accepted_refusals.contains(&resp.status) {
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
                        "machine {n} {op:?}: retry refused ({}: {}) but the stored machine is {other:?}, not {want}",
                        resp.status, resp.text
                    ),
                }
            } else {
                panic!("machine {n} {op:?}: {} {}", resp.status, resp.text);
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
    let api = server.api();
    let admin = server.token.clone();
    let (size, sha256) = server.boot_file("images/debian-12/root.tar", b"tar");
    let r = api.post(
        "/boot-resources",
        Some(&admin),
        &json!({"name": "debian-12", "kind": "os",
                "files": [{"role": "tar", "path": "images/debian-12/root.tar", "sha256": sha256, "size": size}]}),
    );
    assert_eq!(r.status, 201, "{}", r.text);

    let stats = Stats {
        transport_errors: AtomicU32::new(0),
        requests: AtomicU32::new(0),
    };
    let done = AtomicBool::new(false);
    let mut kills = 0u32;
    let records: Vec<Record> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let client = Client {
                    api: Api::new(&server.base()),
                    admin: &admin,
                    stats: &stats,
                };
                scope.spawn(move || {
                    (0..MACHINES)
                        .filter(|n| n % CLIENTS == c)
                        .map(|n| client.run_machine(n))
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
    let all = api.get("/machines", Some(&admin)).ok();
    let stored: std::collections::HashMap<&str, &Value> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m))
        .collect();
    assert_eq!(stored.len(), MACHINES as usize, "machines stored");
    let (mut confirmed, mut finished) = (0, 0);
    for rec in &records {
        let m = stored
            .get(rec.id.as_str())
            .unwrap_or_else(|| panic!("machine {} ({}) is lost", rec.n, rec.id));
        let last = *rec.acked.last().unwrap();
        assert_eq!(
            m["status"],
            last.as_str(),
            "machine {}: stored status",
            rec.n
        );
        let events = api
            .get(
                &format!("/machines/{}/events?limit=10000", rec.id),
                Some(&admin),
            )
            .ok();
        let history = status_history(events.as_array().unwrap())
            .unwrap_or_else(|e| panic!("machine {}: {e}", rec.n));
        // A plain release is acknowledged as Ready; its history shows Releasing first.
        let changes = SCRIPT[..script_len(rec.n)]
            .iter()
            .filter(|(_, st)| st.is_some());
        let mut expected = Vec::new();
        for ((op, _), acked) in changes.zip(&rec.acked) {
            if let Op::Action("release", "{}") = op {
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
