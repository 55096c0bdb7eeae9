//! Commissioning: the scripts and hardware tests the appliance sent, each run and its result
//! posted, the first failure failing the commissioning with its reason; then the inventory,
//! collected and posted. Its end is the appliance's own event: the machine becomes Ready.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stork_proto::api::{MAX_SCRIPT_OUTPUT, ScriptResult};
use stork_proto::{CommissionScript, StepState};

use super::Ending;
use crate::appliance::ApplianceClient;
use crate::console::say;
use crate::deploy::late::{PATH, capture};
use crate::inventory;
use crate::step::{Failed, Step, at};

/// Where the scripts are written to run (the ephemeral root's RAM).
const DIR: &str = "/run/stork/scripts";

pub fn run(client: &ApplianceClient, scripts: &[CommissionScript]) -> Result<Ending, Failed> {
    for s in scripts {
        at(Step::Commission, run_script(client, s, Path::new(DIR)))?;
    }
    client.step_event(
        Step::Commission,
        StepState::Started,
        "collecting the inventory".into(),
    );
    let inv = inventory::collect_and_show();
    let resp = at(Step::Commission, client.commissioned(&inv))?;
    say!(
        Step::Commission,
        "machine {} status {}",
        resp.machine_id,
        resp.status
    );
    Ok(Ending::PowerOff)
}

/// Runs one script, posts its result, and fails naming it and its last line unless it
/// passed.
fn run_script(client: &ApplianceClient, s: &CommissionScript, dir: &Path) -> Result<()> {
    let kind = if s.test { "hardware test" } else { "script" };
    client.step_event(
        Step::Commission,
        StepState::Started,
        format!("running {kind} {}", s.name),
    );
    let r = execute(s, dir)?;
    client
        .script_result(&r)
        .with_context(|| format!("posting {kind} {}'s result", s.name))?;
    let last = r
        .output
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    match (r.timed_out, r.exit_status) {
        (true, _) => bail!(
            "{kind} {} timed out after {} s: {last}",
            s.name,
            s.timeout_secs
        ),
        (false, Some(0)) => {
            say!(Step::Commission, "{kind} {} passed: {last}", s.name);
            Ok(())
        }
        (false, code) => bail!(
            "{kind} {} failed (exit {}): {last}",
            s.name,
            code.map_or("by a signal".to_string(), |c| c.to_string())
        ),
    }
}

/// Writes the script into `dir` and runs it as an executable (its `#!` line picks the
/// interpreter; none: `/bin/sh`), with a clean environment and its timeout.
fn execute(s: &CommissionScript, dir: &Path) -> Result<ScriptResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // The name is the appliance's checked plain file name; a slash would still stay inside.
    let path = dir.join(s.name.replace('/', "_"));
    std::fs::write(&path, &s.content).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", path.display()))?;
    let mut cmd = if s.content.starts_with("#!") {
        Command::new(&path)
    } else {
        let mut c = Command::new("/bin/sh");
        c.arg(&path);
        c
    };
    cmd.env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .current_dir(dir);
    let out = capture(
        cmd,
        Duration::from_secs(u64::from(s.timeout_secs)),
        MAX_SCRIPT_OUTPUT,
    )
    .with_context(|| format!("start {}", path.display()))?;
    Ok(ScriptResult {
        name: s.name.clone(),
        test: s.test,
        exit_status: out.status.and_then(|st| st.code()),
        timed_out: out.status.is_none(),
        duration_ms: u64::try_from(out.elapsed.as_millis()).unwrap_or(u64::MAX),
        output: out.output,
        at: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(name: &str, content: &str, timeout_secs: u32) -> CommissionScript {
        CommissionScript {
            name: name.into(),
            test: false,
            content: content.into(),
            timeout_secs,
        }
    }

    #[test]
    fn a_script_runs_with_or_without_its_interpreter_line_and_its_output_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let r = execute(&script("hello", "echo out; echo err >&2", 10), d.path()).unwrap();
        assert_eq!((r.exit_status, r.timed_out), (Some(0), false));
        assert_eq!(r.output, "out\nerr\n");
        let r = execute(&script("bash", "#!/bin/sh\nexit 3", 10), d.path()).unwrap();
        assert_eq!(r.exit_status, Some(3));
        assert!(!r.passed());
    }

    #[test]
    fn a_script_past_its_timeout_is_killed() {
        let d = tempfile::tempdir().unwrap();
        // The script's child holds the output pipe too: it must die with the script.
        let pid_file = d.path().join("sleep.pid");
        let body = format!(
            "echo started; sleep 300 & echo $! > {}; wait; echo never",
            pid_file.display()
        );
        let r = execute(&script("slow", &body, 1), d.path()).unwrap();
        assert!(r.timed_out && r.exit_status.is_none(), "{r:?}");
        assert_eq!(r.output, "started\n");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        // SIGKILL is delivered when the child next runs: on a loaded machine it may still be
        // runnable a moment after the group was signalled. Dead means gone, or a zombie no one
        // reaped yet (its state letter follows the name); a survivor would sleep 300 s.
        let dead = |stat: &std::io::Result<String>| {
            stat.as_deref().map_or(true, |s| {
                s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
            })
        };
        let mut stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
        for _ in 0..600 {
            if dead(&stat) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
        }
        assert!(
            dead(&stat),
            "the script's child outlived its timeout: {stat:?}"
        );
    }
}
