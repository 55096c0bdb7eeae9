//! Heartbeats: while the agent works on its task, a background thread tells the appliance
//! every [`HEARTBEAT_EVERY_SECS`] that it is alive and which step it is in. Once they stop
//! (a hung kernel, a crashed agent, a machine that lost power) the appliance fails the
//! machine within `lifecycle.heartbeat_timeout`, long before the busy status's own timeout.
//!
//! A heartbeat that fails is logged and tried again at the next beat; it never fails the task.
//! They end when the appliance wants no more (the task's last call, a revoked token) or the
//! agent hands the machine over ([`ApplianceClient::hand_over`]); the thread dies with the
//! process otherwise (power-off, reboot, exec into stage 2, which starts its own).

use std::thread::{self, JoinHandle};
use std::time::Duration;

use stork_proto::HEARTBEAT_EVERY_SECS;

use crate::appliance::{ApplianceClient, Beat};
use crate::console::say;

const STEP: &str = "heartbeat";

/// Starts the heartbeats of a known machine's agent; does nothing for an agent that is
/// enlisting (it has no token to send them with).
pub fn start(client: &ApplianceClient) {
    if client.is_known() {
        start_every(client, Duration::from_secs(HEARTBEAT_EVERY_SECS));
    }
}

fn start_every(client: &ApplianceClient, every: Duration) -> Option<JoinHandle<()>> {
    let client = client.clone();
    match thread::Builder::new()
        .name(STEP.into())
        .spawn(move || run(&client, every))
    {
        Ok(handle) => Some(handle),
        Err(e) => {
            say!(STEP, "warning: cannot start the heartbeat thread: {e}");
            None
        }
    }
}

/// Beats until they are over. Failures are shown once per outage, not once per beat.
fn run(client: &ApplianceClient, every: Duration) {
    let mut failed = 0u32;
    loop {
        match client.heartbeat() {
            Beat::Recorded => {
                if failed > 0 {
                    say!(STEP, "the appliance answers again after {failed} missed");
                }
                failed = 0;
            }
            Beat::Failed(e) => {
                if failed == 0 {
                    say!(
                        STEP,
                        "warning: {e:#}; trying again every {} s",
                        every.as_secs()
                    );
                }
                failed += 1;
            }
            Beat::Over(why) => {
                say!(STEP, "stopped: {why}");
                return;
            }
        }
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use stork_proto::Heartbeat;

    use super::*;

    /// Answers each request with the next status of `statuses` and sends on the request line
    /// and the heartbeat it carried. Ends after the last status.
    fn appliance(statuses: Vec<u16>) -> (String, mpsc::Receiver<(String, Heartbeat)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for status in statuses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let hb: Heartbeat = serde_json::from_slice(&body).unwrap();
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                .unwrap();
                let _ = tx.send((line.trim().to_string(), hb));
            }
        });
        (url, rx)
    }

    #[test]
    fn beats_with_the_current_step_until_the_appliance_wants_no_more() {
        // A 503 is tried again at the next beat; the 202 ends the beats.
        let (url, rx) = appliance(vec![204, 503, 204, 202]);
        let client = ApplianceClient::new(&url).with_identity("m-1", "stork_agent_x");
        client.enter_step("image");
        let handle = start_every(&client, Duration::from_millis(10)).unwrap();
        handle.join().unwrap();
        let seen: Vec<(String, Heartbeat)> = rx.try_iter().collect();
        assert_eq!(seen.len(), 4);
        for (line, hb) in &seen {
            assert_eq!(line, "POST /api/v1/agent/m-1/heartbeat HTTP/1.1");
            assert_eq!(hb.step, stork_proto::AgentStep::Image);
            assert!(!hb.leaving);
        }
    }

    #[test]
    fn handing_over_sends_a_last_leaving_beat_and_ends_the_thread() {
        let (url, rx) = appliance(vec![204]);
        let client = ApplianceClient::new(&url).with_identity("m-1", "stork_agent_x");
        client.enter_step("memory");
        client.hand_over().unwrap();
        let (_, hb) = rx.recv().unwrap();
        assert_eq!(
            hb,
            Heartbeat {
                step: "memory".into(),
                leaving: true
            }
        );
        // The thread sees the beats are over and ends without sending any.
        let handle = start_every(&client, Duration::from_millis(10)).unwrap();
        handle.join().unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_agent_without_identity_sends_none() {
        let client = ApplianceClient::new("http://127.0.0.1:9");
        assert!(matches!(client.heartbeat(), Beat::Over(_)));
    }
}
