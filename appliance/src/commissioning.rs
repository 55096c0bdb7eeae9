//! Commissioning scripts: the hardware tests Stork ships, the checks a user's script passes
//! before it is stored, and the list an agent runs (the users' scripts in name order, then
//! the tests the commissioning asked for).
//!
//! The tests are shell, run by the agent in the ephemeral root (which carries smartmontools
//! and memtester for them): a test prints what it found and exits non-zero on a fault, which
//! fails the commissioning with the test's name and its last line.

use stork_proto::CommissionScript;
use stork_proto::api::{
    BUILTIN_TESTS, DEFAULT_SCRIPT_SECS, MAX_SCRIPT_BYTES, MAX_SCRIPT_SECS, NewScript, Script,
};

/// The machine's whole disks: not partitions, loops, RAM disks, CD drives, arrays or
/// device-mapper volumes.
const DISKS: &str = r#"disks() {
  for d in /sys/block/*; do
    n=${d##*/}
    case $n in loop*|ram*|sr*|md*|dm-*|zram*) continue ;; esac
    [ "$(cat "$d/size" 2>/dev/null || echo 0)" -gt 0 ] && echo "$n"
  done
}
"#;

/// SMART overall health of every disk that has SMART; `smartctl`'s bit 3 ("disk failing")
/// fails the test, a disk without SMART (virtio, most VMs) is skipped.
const SMART: &str = r#"
command -v smartctl >/dev/null || { echo "smartctl is not installed"; exit 2; }
failed=
for n in $(disks); do
  out=$(smartctl -H "/dev/$n" 2>&1); rc=$?
  # Bits 0 and 1: no device type smartctl knows, or no answer to IDENTIFY.
  if [ $((rc & 3)) -ne 0 ] || echo "$out" | grep -q "SMART support is: Unavailable"; then
    echo "$n: no SMART"
  elif [ $((rc & 8)) -ne 0 ]; then
    echo "$n: SMART says the disk is failing"; echo "$out" | tail -n 5; failed="$failed $n"
  else
    echo "$n: $(echo "$out" | grep -i "overall-health\|health status" | head -n 1)"
  fi
done
[ -z "$failed" ] || { echo "failing:$failed"; exit 1; }
"#;

/// The first 64 MiB of every disk read with direct I/O (past the page cache): a disk that
/// cannot be read fails, with `dd`'s error; the rate is printed.
const DISK_READ: &str = r#"
failed=
for n in $(disks); do
  if out=$(dd if="/dev/$n" of=/dev/null bs=1M count=64 iflag=direct 2>&1); then
    echo "$n: $(echo "$out" | tail -n 1)"
  else
    echo "$n: read error: $(echo "$out" | grep -v records | head -n 1)"; failed="$failed $n"
  fi
done
[ -z "$failed" ] || { echo "unreadable:$failed"; exit 1; }
"#;

/// `memtester` over 64 MiB, one pass.
const MEMORY: &str = r#"
command -v memtester >/dev/null || { echo "memtester is not installed"; exit 2; }
out=$(memtester 64M 1 2>&1); rc=$?
echo "$out" | tail -n 12
[ $rc -eq 0 ] || { echo "memtester found faults (exit $rc)"; exit 1; }
"#;

/// How long each test may run.
const TEST_SECS: u32 = 600;

/// Test `name`'s script, if Stork ships one by that name.
pub fn builtin(name: &str) -> Option<CommissionScript> {
    let body = match name {
        "smart" => SMART,
        "disk-read" => DISK_READ,
        "memory" => MEMORY,
        _ => return None,
    };
    Some(CommissionScript {
        name: name.to_string(),
        test: true,
        content: format!("#!/bin/sh\n# Stork's hardware test {name}.\n{DISKS}{body}"),
        timeout_secs: TEST_SECS,
    })
}

/// The hardware tests a commissioning asks for, each known and once: the `tests` field's
/// error otherwise.
pub fn check_tests(tests: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for t in tests {
        if !BUILTIN_TESTS.contains(&t.as_str()) {
            return Err(format!(
                "tests: {t:?} is not a hardware test (there are: {})",
                BUILTIN_TESTS.join(", ")
            ));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// A user's script as it is stored, or the error naming its field.
pub fn check_script(s: NewScript, now: i64) -> Result<Script, String> {
    // The same plain file name an uploaded image's name must be.
    if crate::image_upload::check_name(&s.name).is_err() {
        return Err(format!(
            "name: {:?} is not a script name (letters, digits, `.`, `-` and `_`, 64 at most)",
            s.name
        ));
    }
    if BUILTIN_TESTS.contains(&s.name.as_str()) {
        return Err(format!("name: {:?} is a hardware test's name", s.name));
    }
    if s.content.trim().is_empty() {
        return Err("content: the script is empty".into());
    }
    if s.content.len() > MAX_SCRIPT_BYTES || s.content.contains('\0') {
        return Err(format!(
            "content: a script is text of at most {MAX_SCRIPT_BYTES} bytes"
        ));
    }
    let timeout_secs = s.timeout_secs.unwrap_or(DEFAULT_SCRIPT_SECS);
    if timeout_secs == 0 || timeout_secs > MAX_SCRIPT_SECS {
        return Err(format!(
            "timeout_secs: {timeout_secs} is not 1 to {MAX_SCRIPT_SECS} seconds"
        ));
    }
    Ok(Script {
        name: s.name,
        content: s.content,
        timeout_secs,
        created_at: now,
    })
}

/// What a commissioning's agent runs: every user script in name order, then the tests.
pub fn task_scripts(scripts: Vec<Script>, tests: &[String]) -> Vec<CommissionScript> {
    scripts
        .into_iter()
        .map(|s| CommissionScript {
            name: s.name,
            test: false,
            content: s.content,
            timeout_secs: s.timeout_secs,
        })
        .chain(tests.iter().filter_map(|t| builtin(t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str, content: &str, timeout: Option<u32>) -> NewScript {
        NewScript {
            name: name.into(),
            content: content.into(),
            timeout_secs: timeout,
        }
    }

    #[test]
    fn scripts_are_checked_by_field() {
        let ok = check_script(new("10-hello", "echo hi", None), 5).unwrap();
        assert_eq!((ok.timeout_secs, ok.created_at), (DEFAULT_SCRIPT_SECS, 5));
        for (bad, field) in [
            (new("a/b", "x", None), "name:"),
            (new("smart", "x", None), "name:"),
            (new("ok", " \n", None), "content:"),
            (
                new("ok", &"x".repeat(MAX_SCRIPT_BYTES + 1), None),
                "content:",
            ),
            (new("ok", "x", Some(0)), "timeout_secs:"),
            (new("ok", "x", Some(MAX_SCRIPT_SECS + 1)), "timeout_secs:"),
        ] {
            let e = check_script(bad, 0).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        assert_eq!(
            check_tests(&["smart".into(), "smart".into(), "memory".into()]).unwrap(),
            ["smart", "memory"]
        );
        assert!(
            check_tests(&["fan".into()])
                .unwrap_err()
                .starts_with("tests: \"fan\"")
        );
    }

    #[test]
    fn users_scripts_run_first_then_the_tests_asked_for() {
        let s = |n: &str| Script {
            name: n.into(),
            content: "true".into(),
            timeout_secs: 9,
            created_at: 0,
        };
        let list = task_scripts(vec![s("a"), s("b")], &["disk-read".into()]);
        let names: Vec<(&str, bool)> = list.iter().map(|c| (c.name.as_str(), c.test)).collect();
        assert_eq!(names, [("a", false), ("b", false), ("disk-read", true)]);
        assert!(list[2].content.starts_with("#!/bin/sh"));
    }

    /// The tests are valid shell: `sh -n` parses each.
    #[test]
    fn every_test_parses_as_shell() {
        for t in BUILTIN_TESTS {
            let script = builtin(t).unwrap().content;
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{t}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
