//! The client of the appliance's agent API ([`ApplianceClient`]): enlistment with retries, the
//! task, step events and progress, best-effort failure reports, and the heartbeats that
//! [`crate::heartbeat`] sends from its own thread.

use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use stork_proto::{
    AgentReport, ENLIST_PATH, EnlistRequest, EnlistResponse, HEARTBEAT, Heartbeat, REPORT_PATH,
};
use stork_tls::Trust;
use ureq::http::Response;
use ureq::{Agent, Body};

use crate::console::say;
use crate::step::Step;

/// Total tries of an enlistment before giving up.
/// How often a long step posts its progress (stage 1's fetch and the tasks alike).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
pub const ENLIST_ATTEMPTS: u32 = 5;
const ENLIST_TIMEOUT: Duration = Duration::from_secs(10);
const ENLIST_BACKOFF: Duration = Duration::from_secs(2);
/// A failure report must not keep a broken machine powered for long.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Error bodies are echoed to the console; keep them to one readable line.
const MAX_BODY_ECHO: usize = 200;

/// Tries of the heartbeat that says the agent leaves: the appliance would otherwise take the
/// silence that follows for a dead agent.
const LEAVING_ATTEMPTS: u32 = 3;

/// Clones share the heartbeat state, so the heartbeat thread reports the step the main thread
/// is in.
#[derive(Clone)]
pub struct ApplianceClient {
    /// The API's base URL: the boot URL, or the HTTPS one the command line gave.
    base_url: String,
    /// For an HTTPS API: the pinned certificate.
    trust: Option<Trust>,
    backoff: Duration,
    /// The machine id and this boot's agent token, once the appliance knows the machine.
    identity: Option<(String, String)>,
    /// The step the agent is in, as the heartbeats report it: the last one it posted an event
    /// for or called the appliance about.
    step: Arc<Mutex<String>>,
    /// Set once heartbeats must stop (the agent leaves, or the appliance wants no more).
    /// Held while a heartbeat is sent, so the one saying the agent leaves is the last.
    beats_over: Arc<Mutex<bool>>,
}

/// What one heartbeat came to.
#[derive(Debug)]
pub enum Beat {
    /// Recorded; the appliance expects the next one.
    Recorded,
    /// No more are wanted from this boot: why (the agent left, the image is installed, the
    /// token was revoked with the status change that ended the task).
    Over(String),
    /// No answer, or a 5xx: try again at the next beat.
    Failed(anyhow::Error),
}

/// What one POST came to.
enum Outcome<T> {
    Done(T),
    /// Connection trouble or a 5xx: the appliance may be starting or busy.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl ApplianceClient {
    /// `base_url` is the appliance URL from the command line, without a trailing slash.
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            trust: None,
            backoff: ENLIST_BACKOFF,
            identity: None,
            step: Arc::new(Mutex::new("task".to_string())),
            beats_over: Arc::new(Mutex::new(false)),
        }
    }

    /// The API over HTTPS at `api.url`, trusting only the certificate `api.fingerprint`.
    pub fn with_tls(self, api: &stork_proto::cmdline::ApiTls) -> Self {
        Self {
            base_url: api.url.trim_end_matches('/').to_string(),
            // The command line's parser checked the form; were it wrong, every call would
            // fail saying no trust is configured.
            trust: api.fingerprint.parse().ok().map(Trust::Pinned),
            ..self
        }
    }

    /// Records the step the agent is in, for the heartbeats.
    pub fn enter_step(&self, step: &str) {
        // A poisoned lock only means a thread panicked mid-assignment; the string is whole.
        let mut current = self.step.lock().unwrap_or_else(|p| p.into_inner());
        if *current != step {
            *current = step.to_string();
        }
    }

    fn current_step(&self) -> String {
        self.step.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the heartbeats without telling the appliance: for the calls after which it
    /// expects none (its answer to the next would be a refusal).
    fn end_heartbeats(&self) {
        *self.beats_over.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Sends one heartbeat, unless they are over.
    pub fn heartbeat(&self) -> Beat {
        let mut over = self.beats_over.lock().unwrap_or_else(|p| p.into_inner());
        if *over {
            return Beat::Over("the task's work with the appliance is done".into());
        }
        let Ok((url, token)) = self.machine_url(HEARTBEAT) else {
            *over = true;
            return Beat::Over("this boot has no machine id and token".into());
        };
        let body = Heartbeat {
            step: self.current_step().into(),
            leaving: false,
        };
        match send(&self.trust, &url, Some(token), Some(&body), REPORT_TIMEOUT) {
            // 202: the appliance took it but expects no more (the image is installed).
            Outcome::Done(resp) if resp.status() == 202 => {
                *over = true;
                Beat::Over("the appliance expects no more heartbeats".into())
            }
            Outcome::Done(_) => Beat::Recorded,
            Outcome::Retry(e) => Beat::Failed(e),
            // A 4xx: the token was revoked (the task ended) or the request is wrong; neither
            // gets better by sending it again.
            Outcome::Fatal(e) => {
                *over = true;
                Beat::Over(format!("{e:#}"))
            }
        }
    }

    /// Stops the heartbeats and tells the appliance that none will follow, on purpose: the
    /// agent hands the machine over (switches root into a deployed OS, reboots into an
    /// installed one). Best effort, a few tries; a heartbeat in flight is sent first.
    pub fn hand_over(&self) -> Result<()> {
        let mut over = self.beats_over.lock().unwrap_or_else(|p| p.into_inner());
        if *over {
            return Ok(());
        }
        *over = true;
        let (url, token) = self.machine_url(HEARTBEAT)?;
        let body = Heartbeat {
            step: self.current_step().into(),
            leaving: true,
        };
        let mut attempt = 1;
        loop {
            match send(&self.trust, &url, Some(token), Some(&body), REPORT_TIMEOUT) {
                Outcome::Done(_) => return Ok(()),
                Outcome::Retry(e) if attempt < LEAVING_ATTEMPTS => {
                    say!("heartbeat", "leaving: attempt {attempt} failed: {e:#}");
                    sleep(self.backoff);
                    attempt += 1;
                }
                Outcome::Retry(e) | Outcome::Fatal(e) => return Err(e.context(url)),
            }
        }
    }

    /// Calls for a known machine carry its per-boot token.
    pub fn with_identity(mut self, machine_id: &str, token: &str) -> Self {
        self.identity = Some((machine_id.to_string(), token.to_string()));
        self
    }

    fn machine_url(&self, what: &str) -> Result<(String, &str)> {
        let (id, token) = self
            .identity
            .as_ref()
            .ok_or_else(|| anyhow!("this boot has no machine id and token"))?;
        Ok((
            format!("{}{}", self.base_url, stork_proto::agent_path(id, what)),
            token.as_str(),
        ))
    }

    /// Retries connection errors and 5xx answers, like enlistment.
    fn call_with_retries<T: serde::de::DeserializeOwned>(
        &self,
        step: &str,
        what: &str,
        body: Option<&dyn erased::Body>,
    ) -> Result<T> {
        let (url, token) = self.machine_url(what)?;
        let mut attempt = 1;
        loop {
            let outcome = match body {
                Some(b) => send(&self.trust, &url, Some(token), Some(b), ENLIST_TIMEOUT),
                None => send(&self.trust, &url, Some(token), None, ENLIST_TIMEOUT),
            };
            match outcome {
                Outcome::Done(mut resp) => {
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    let text = if text.trim().is_empty() {
                        "null"
                    } else {
                        text.as_str()
                    };
                    return serde_json::from_str(text)
                        .with_context(|| format!("{url}: unexpected answer"));
                }
                Outcome::Fatal(e) => return Err(e.context(url)),
                Outcome::Retry(e) if attempt >= ENLIST_ATTEMPTS => {
                    return Err(
                        e.context(format!("{url}: gave up after {ENLIST_ATTEMPTS} attempts"))
                    );
                }
                Outcome::Retry(e) => {
                    say!(
                        step,
                        "attempt {attempt}/{ENLIST_ATTEMPTS} failed: {e:#}; retrying"
                    );
                    sleep(self.backoff);
                    attempt += 1;
                }
            }
        }
    }

    /// What the appliance wants this boot to do.
    pub fn task(&self) -> Result<stork_proto::Task> {
        self.enter_step("task");
        self.call_with_retries("task", "task", None)
    }

    /// Posts the commissioning inventory. The task ends with it (the appliance revokes the
    /// token), and so do the heartbeats.
    pub fn commissioned(&self, inv: &stork_proto::Inventory) -> Result<EnlistResponse> {
        self.enter_step("commission");
        let resp = self.call_with_retries("commission", "commissioned", Some(inv))?;
        self.end_heartbeats();
        Ok(resp)
    }

    /// Posts a commissioning script's result.
    pub fn script_result(&self, r: &stork_proto::api::ScriptResult) -> Result<()> {
        self.call_with_retries::<serde_json::Value>("commission", stork_proto::SCRIPTS, Some(r))
            .map(|_| ())
    }

    /// Posts a step event (best effort for progress; failures matter and are retried).
    pub fn event(&self, e: &stork_proto::AgentEvent) -> Result<()> {
        self.enter_step(e.step.as_str());
        self.call_with_retries::<serde_json::Value>("report", "events", Some(e))
            .map(|_| ())
    }

    /// Posts a progress event once, without retries: a lost one is replaced by the next.
    pub fn progress(&self, e: &stork_proto::AgentEvent) {
        self.enter_step(e.step.as_str());
        if let Ok((url, token)) = self.machine_url("events") {
            let _ = send(&self.trust, &url, Some(token), Some(e), REPORT_TIMEOUT);
        }
    }

    /// Shows a step's start or end on the console and posts it; best effort (the step's own
    /// outcome is what matters).
    pub fn step_event(&self, step: Step, state: stork_proto::StepState, message: String) {
        say!(step, "{message}");
        self.progress(&stork_proto::AgentEvent {
            step: step.clone(),
            state,
            message,
            progress: None,
            log_tail: None,
        });
    }

    /// The image is on the disk: the appliance stops network-booting this machine. The agent
    /// reboots into it next, so this hands the machine over (the appliance already expects
    /// no more heartbeats; saying so too keeps the rule in one place: leaving ends them).
    pub fn installed(&self) -> Result<()> {
        self.enter_step("installed");
        self.call_with_retries::<serde_json::Value>(
            "installed",
            "installed",
            Some(&serde_json::json!({})),
        )?;
        if let Err(e) = self.hand_over() {
            say!(
                "heartbeat",
                "warning: could not say the agent leaves: {e:#}"
            );
        }
        Ok(())
    }

    /// The disks are erased: the machine is released (and the token revoked).
    pub fn released(&self) -> Result<()> {
        self.enter_step("erase");
        self.call_with_retries::<serde_json::Value>(
            "erase",
            "released",
            Some(&serde_json::json!({})),
        )?;
        self.end_heartbeats();
        Ok(())
    }

    pub fn is_known(&self) -> bool {
        self.identity.is_some()
    }

    #[cfg(test)]
    fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// POSTs the enlistment, retrying connection errors and 5xx answers.
    pub fn enlist(&self, req: &EnlistRequest) -> Result<EnlistResponse> {
        let url = format!("{}{ENLIST_PATH}", self.base_url);
        let mut attempt = 1;
        loop {
            match post(&self.trust, &url, req, ENLIST_TIMEOUT) {
                Outcome::Done(mut resp) => {
                    return resp
                        .body_mut()
                        .read_json::<EnlistResponse>()
                        .with_context(|| format!("POST {url}: unexpected answer"));
                }
                Outcome::Fatal(e) => return Err(e.context(format!("POST {url}"))),
                Outcome::Retry(e) if attempt >= ENLIST_ATTEMPTS => {
                    return Err(e.context(format!(
                        "POST {url}: gave up after {ENLIST_ATTEMPTS} attempts"
                    )));
                }
                Outcome::Retry(e) => {
                    say!(
                        "enlist",
                        "attempt {attempt}/{ENLIST_ATTEMPTS} failed: {e:#}; retrying in {} s",
                        self.backoff.as_secs()
                    );
                    sleep(self.backoff);
                    attempt += 1;
                }
            }
        }
    }

    /// Sends one failure report, without retries.
    pub fn report(&self, report: &AgentReport) -> Result<()> {
        let url = format!("{}{REPORT_PATH}", self.base_url);
        match post(&self.trust, &url, report, REPORT_TIMEOUT) {
            Outcome::Done(_) => Ok(()),
            Outcome::Retry(e) | Outcome::Fatal(e) => Err(e.context(format!("POST {url}"))),
        }
    }
}

/// An `https://` API is trusted by the fingerprint the boot script pinned (`trust`).
fn agent(timeout: Duration, trust: &Option<Trust>) -> Agent {
    let config = Agent::config_builder()
        .timeout_global(Some(timeout))
        // Read 4xx/5xx bodies ourselves: they carry the appliance's reason.
        .http_status_as_error(false)
        // A developer's HTTP_PROXY must not divert tests; the initrd has none anyway.
        .proxy(None)
        .build();
    stork_tls::agent(config, trust.clone())
}

/// Object-safe serialization, so one retry loop serves every body type.
mod erased {
    pub trait Body {
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Body for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}

/// GET (no body) or POST (JSON body) with an optional bearer token.
fn send(
    trust: &Option<Trust>,
    url: &str,
    token: Option<&str>,
    body: Option<&dyn erased::Body>,
    timeout: Duration,
) -> Outcome<Response<Body>> {
    let agent = agent(timeout, trust);
    let result = match body {
        Some(b) => {
            let bytes = match b.to_json() {
                Ok(v) => v,
                Err(e) => return Outcome::Fatal(e.into()),
            };
            let mut req = agent.post(url).header("content-type", "application/json");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            req.send(&bytes[..])
        }
        None => {
            let mut req = agent.get(url);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            req.call()
        }
    };
    classify(result)
}

fn post(
    trust: &Option<Trust>,
    url: &str,
    body: &impl Serialize,
    timeout: Duration,
) -> Outcome<Response<Body>> {
    classify(agent(timeout, trust).post(url).send_json(body))
}

fn classify(result: Result<Response<Body>, ureq::Error>) -> Outcome<Response<Body>> {
    let mut resp = match result {
        Ok(r) => r,
        Err(e) if is_transient(&e) => return Outcome::Retry(e.into()),
        Err(e) => return Outcome::Fatal(e.into()),
    };
    let status = resp.status();
    if status.is_success() {
        return Outcome::Done(resp);
    }
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let text: String = text.trim().chars().take(MAX_BODY_ECHO).collect();
    let e = anyhow!("appliance answered {status}: {text}");
    if status.is_server_error() {
        Outcome::Retry(e)
    } else {
        Outcome::Fatal(e)
    }
}

/// Errors worth another try: the network or the appliance may not be ready yet.
fn is_transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
    )
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::thread::{self, JoinHandle};

    use stork_proto::Inventory;

    use super::*;

    /// Serves one canned response per connection, in order, and returns the request bodies.
    fn serve(responses: Vec<(u16, &'static str)>) -> (String, JoinHandle<Vec<(String, String)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let handle = thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut len = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = header.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut req_body = vec![0; len];
                reader.read_exact(&mut req_body).unwrap();
                seen.push((request_line, String::from_utf8(req_body).unwrap()));
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (url, handle)
    }

    fn request() -> EnlistRequest {
        EnlistRequest {
            boot_mac: "52:54:00:12:34:56".parse().unwrap(),
            inventory: Inventory::default(),
        }
    }

    #[test]
    fn enlist_retries_5xx_then_reads_the_answer() {
        let (url, server) = serve(vec![
            (503, "starting"),
            (200, r#"{"machine_id":"m-1","status":"new"}"#),
        ]);
        let client = ApplianceClient::new(&url).with_backoff(Duration::ZERO);
        let resp = client.enlist(&request()).unwrap();
        assert_eq!(resp.machine_id, "m-1");
        assert_eq!(resp.status, stork_proto::api::Status::New);

        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 2);
        for (line, body) in seen {
            assert_eq!(line.trim(), format!("POST {ENLIST_PATH} HTTP/1.1"));
            let sent: EnlistRequest = serde_json::from_str(&body).unwrap();
            assert_eq!(sent, request());
        }
    }

    #[test]
    fn enlist_does_not_retry_a_4xx() {
        let (url, server) = serve(vec![(400, r#"{"error":"bad inventory"}"#)]);
        let err = ApplianceClient::new(&url)
            .with_backoff(Duration::ZERO)
            .enlist(&request())
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("400") && text.contains("bad inventory"),
            "{text}"
        );
        assert_eq!(server.join().unwrap().len(), 1);
    }

    #[test]
    fn enlist_gives_up_when_nobody_listens() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = ApplianceClient::new(&format!("http://127.0.0.1:{port}"))
            .with_backoff(Duration::ZERO)
            .enlist(&request())
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("gave up after 5 attempts"), "{text}");
    }

    #[test]
    fn report_posts_the_failure() {
        let (url, server) = serve(vec![(204, "")]);
        let report = AgentReport {
            boot_mac: "52:54:00:12:34:56".parse().unwrap(),
            step: "network".into(),
            ok: false,
            message: "no NIC".into(),
        };
        ApplianceClient::new(&url).report(&report).unwrap();
        let seen = server.join().unwrap();
        assert_eq!(seen[0].0.trim(), format!("POST {REPORT_PATH} HTTP/1.1"));
        assert_eq!(
            serde_json::from_str::<AgentReport>(&seen[0].1).unwrap(),
            report
        );
    }
}
