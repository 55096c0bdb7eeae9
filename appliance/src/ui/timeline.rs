//! A machine's last operation as phases, from its event history: where the time went.
//!
//! Pure: events in, phases out. The markers it reads are the events the controller, the boot
//! script and the agent already write: the transition into a busy status (the operation
//! starts, Stork powers the machine on), the served boot script (the firmware's DHCP and
//! PXE are over), each agent step's `Started` and `Done`/`Failed`, the installed image (the
//! machine reboots into it), and the transition out (phone-home, or a failure).

use stork_proto::api::{EventRecord, Status};

use crate::lifecycle::records::BOOT_SCRIPT_EVENT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// A stable name (`dhcp`, `boot`, an agent step, `first-boot`).
    pub name: String,
    /// What it covers, for people.
    pub label: String,
    pub start: i64,
    pub end: i64,
    /// Still running (`end` is now).
    pub running: bool,
    pub failed: bool,
}

impl Phase {
    pub fn ms(&self) -> i64 {
        self.end - self.start
    }
}

fn busy(s: Status) -> bool {
    matches!(
        s,
        Status::Commissioning | Status::Deploying | Status::Releasing | Status::DiskErasing
    )
}

/// The agent's step names as the timeline shows them.
fn step_phase(step: &str) -> (String, String) {
    let (name, label) = match step {
        "image" => ("image-write", "image written to disk and checked"),
        "ephemeral" => ("ephemeral", "ephemeral root fetched into RAM"),
        "switch-root" => ("switch-root", "into the ephemeral root"),
        "commission" => ("commission", "hardware inventory"),
        "erase" => ("erase", "disks erased"),
        other => (other, ""),
    };
    let label = if label.is_empty() {
        format!("agent step {step}")
    } else {
        label.to_string()
    };
    (name.to_string(), label)
}

/// An agent step event: `<step> Started: ...`, `<step> Done: ...`, `<step> Failed: ...`
/// (progress events, `<step> Progress (40%): ...`, are not phase edges).
fn agent_step(e: &EventRecord) -> Option<(&str, &str)> {
    if e.actor != "agent" {
        return None;
    }
    let (head, _) = e.message.split_once(':')?;
    let (step, state) = head.split_once(' ')?;
    matches!(state, "Started" | "Done" | "Failed").then_some((step, state))
}

/// The phases of the last operation in `events` (oldest first); `now` ends a running one.
pub fn phases(events: &[EventRecord], now: i64) -> Vec<Phase> {
    let Some(start) = events.iter().rposition(|e| e.new_status.is_some_and(busy)) else {
        return Vec::new();
    };
    let mut out: Vec<Phase> = Vec::new();
    // The phase that runs until the next marker.
    let mut open: Option<Phase> = Some(Phase {
        name: "dhcp".into(),
        label: "power-on, firmware, DHCP, PXE".into(),
        start: events[start].at,
        end: events[start].at,
        running: true,
        failed: false,
    });
    let close = |open: &mut Option<Phase>, at: i64, failed: bool, out: &mut Vec<Phase>| {
        if let Some(mut p) = open.take() {
            p.end = at.max(p.start);
            p.running = false;
            p.failed = failed;
            out.push(p);
        }
    };
    let mut ended = false;
    for e in &events[start + 1..] {
        if e.message.starts_with(BOOT_SCRIPT_EVENT) {
            close(&mut open, e.at, false, &mut out);
            open = Some(Phase {
                name: "boot".into(),
                label: "kernel, initrd, agent".into(),
                start: e.at,
                end: e.at,
                running: true,
                failed: false,
            });
        } else if let Some((step, state)) = agent_step(e) {
            let (name, label) = step_phase(step);
            match state {
                "Started" => {
                    close(&mut open, e.at, false, &mut out);
                    open = Some(Phase {
                        name,
                        label,
                        start: e.at,
                        end: e.at,
                        running: true,
                        failed: false,
                    });
                }
                _ => {
                    if open.as_ref().is_some_and(|p| p.name == name) {
                        close(&mut open, e.at, state == "Failed", &mut out);
                    }
                }
            }
        } else if e.actor == "agent" && e.message.starts_with("image installed") {
            close(&mut open, e.at, false, &mut out);
            open = Some(first_boot(e.at));
        } else if let Some(to) = e.new_status {
            // The operation ends: what ran until now ends with it. A deploy whose last
            // agent step is done and that never reported an installed image ran in memory:
            // the time after its last step is the OS's own boot.
            let failed = super::machines::is_failed(to);
            if open.is_none()
                && to == Status::Deployed
                && let Some(last) = out.last()
            {
                open = Some(first_boot(last.end));
            }
            close(&mut open, e.at, failed, &mut out);
            ended = true;
            break;
        }
    }
    if !ended && let Some(mut p) = open {
        p.end = now.max(p.start);
        out.push(p);
    }
    out
}

fn first_boot(at: i64) -> Phase {
    Phase {
        name: "first-boot".into(),
        label: "reboot, the installed OS, cloud-init, phone-home".into(),
        start: at,
        end: at,
        running: true,
        failed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: i64, actor: &str, to: Option<Status>, message: &str) -> EventRecord {
        EventRecord {
            id: at,
            machine_id: "m".into(),
            at,
            actor: actor.into(),
            old_status: None,
            new_status: to,
            message: message.into(),
        }
    }

    fn names(p: &[Phase]) -> Vec<(&str, i64)> {
        p.iter().map(|p| (p.name.as_str(), p.ms())).collect()
    }

    #[test]
    fn a_disk_deploy_reads_as_its_phases() {
        let events = [
            ev(0, "api:x", Some(Status::Ready), "CommissioningDone"),
            ev(
                100,
                "api:x",
                Some(Status::Deploying),
                "Deploy: allocated -> deploying",
            ),
            ev(150, "controller", None, "power: NetbootAndPowerOn done"),
            ev(
                9_100,
                "boot",
                None,
                "boot script served with an agent token, to 10.0.0.2",
            ),
            ev(20_100, "agent", None, "ephemeral Started: fetching"),
            ev(22_100, "agent", None, "ephemeral Done: 39 MiB"),
            ev(23_000, "agent", None, "image Started: streaming"),
            ev(30_000, "agent", None, "image Progress (50%): half"),
            ev(40_000, "agent", None, "image Done: written"),
            ev(
                41_000,
                "agent",
                None,
                "image installed; next boot from disk",
            ),
            ev(
                90_000,
                "agent",
                Some(Status::Deployed),
                "DeploymentDone: deploying -> deployed",
            ),
        ];
        let p = phases(&events, 100_000);
        assert_eq!(
            names(&p),
            vec![
                ("dhcp", 9_000),
                ("boot", 11_000),
                ("ephemeral", 2_000),
                ("image-write", 17_000),
                ("first-boot", 49_000),
            ]
        );
        assert!(p.iter().all(|p| !p.running && !p.failed));
    }

    #[test]
    fn a_memory_deploy_boots_the_os_after_its_last_step() {
        let events = [
            ev(0, "api:x", Some(Status::Deploying), "Deploy"),
            ev(
                5_000,
                "boot",
                None,
                "boot script served with an agent token, to x",
            ),
            ev(8_000, "agent", None, "memory Started: fetching"),
            ev(12_000, "agent", None, "memory Done: ok"),
            ev(30_000, "agent", Some(Status::Deployed), "DeploymentDone"),
        ];
        let p = phases(&events, 40_000);
        assert_eq!(
            names(&p),
            vec![
                ("dhcp", 5_000),
                ("boot", 3_000),
                ("memory", 4_000),
                ("first-boot", 18_000)
            ]
        );
    }

    #[test]
    fn a_running_step_ends_now_and_a_failure_is_marked() {
        let running = [
            ev(0, "api:x", Some(Status::Commissioning), "Commission"),
            ev(1_000, "agent", None, "commission Started: collecting"),
        ];
        let p = phases(&running, 5_000);
        assert_eq!(names(&p), vec![("dhcp", 1_000), ("commission", 4_000)]);
        assert!(p[1].running);

        let failed = [
            ev(0, "api:x", Some(Status::Deploying), "Deploy"),
            ev(1_000, "agent", None, "image Started: x"),
            ev(2_000, "agent", None, "image Failed: checksum"),
            ev(
                2_100,
                "agent",
                Some(Status::FailedDeployment),
                "AgentFailed",
            ),
        ];
        let p = phases(&failed, 5_000);
        assert_eq!(names(&p), vec![("dhcp", 1_000), ("image-write", 1_000)]);
        assert!(p[1].failed);
    }

    #[test]
    fn no_operation_no_phases() {
        let events = [ev(0, "agent", None, "enlisted")];
        assert!(phases(&events, 10).is_empty());
    }
}
