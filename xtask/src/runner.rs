//! Runs the workspace's test binaries as `cargo test` would, in three lanes:
//!
//! - [`ALONE`]: binaries that keep the machine to themselves, first, one after another.
//! - [`VMS`]: the end-to-end binaries that drive QEMU, two at a time. Under TCG one VM
//!   test leaves about half of the two cores idle (`vmstat` during `deploy_uefi.rs`: 40-50 %
//!   idle for most of its run, a guest's boot being mostly one busy vCPU).
//! - Every other binary, one at a time *beside* the VM lane. They wait far more than they
//!   compute (`vmstat 5` through them on 2026-12-06: 95-100 % idle for most of their 12
//!   minutes, `fleet.rs` 99 % idle for its 162 s of status and heartbeat timeouts), so they
//!   cost the VM lane little; the VM lane runs at a lower priority ([`VM_NICE`]) so that
//!   what they do compute is not kept waiting behind the emulated CPUs.
//!
//! An alone binary's output is passed through as it comes. A binary of the other two
//! lanes has its output (stdout and stderr) go to a file, printed whole when the binary ends
//! so that two binaries' lines never mix. Either way each failed test's panic message is
//! repeated at the end ([`crate::failures::Summary`]). docs/measurements.md, CI time.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::failures::{Summary, pass_through};

/// The binaries that run VMs and share the machine two at a time, longest first (seconds
/// beside one another in the CI run of 2026-12-06 17:30): the longest start first, so the
/// pair ends together.
pub const VMS: &[&str] = &[
    "deploy_layout", // 931 s
    "appliance",     // 903
    "deploy_uefi",   // 755
    "ipv6",          // 508
    "uefi_paths",    // 480
    "two_sites",     // 351
    "deploy",        // 334
];

/// Test binaries (of any package) run alone, before the others: `os_image.rs` rebuilds the
/// OS images the VM tests deploy (when its inputs changed), `web_ui.rs` waits on a browser
/// and `dhcp_boot_timing.rs` compares two boots' times.
pub const ALONE: &[&str] = &["os_image", "web_ui", "dhcp_boot_timing"];

/// How much lower the VM lane's priority is (`nice`; it holds for QEMU and everything else
/// the binary starts).
const VM_NICE: u8 = 5;

/// The package whose binaries [`VMS`] names (the end-to-end tests).
const E2E_PACKAGE: &str = "stork-tests";

/// Binaries of [`VMS`] run at once, unless `STORK_TEST_JOBS` says otherwise (`1`: the
/// old order, one at a time).
const JOBS: usize = 2;

/// How often the names of the binaries still running are said while their output is held.
const PROGRESS: Duration = Duration::from_secs(300);

/// One test executable, as cargo built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    pub package: String,
    /// The target's name (`deploy` for `tests/deploy.rs`, the crate's for its unit tests).
    pub name: String,
    /// `lib`, `bin` or `test`.
    pub kind: String,
    pub exe: PathBuf,
    /// The package's directory: cargo runs a test binary there.
    pub dir: PathBuf,
}

/// Where a binary runs ([`run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Alone,
    Vms,
    Beside,
}

impl TestBinary {
    fn lane(&self) -> Lane {
        let test = self.kind == "test";
        if test && ALONE.contains(&self.name.as_str()) {
            Lane::Alone
        } else if test && self.package == E2E_PACKAGE && VMS.contains(&self.name.as_str()) {
            Lane::Vms
        } else {
            Lane::Beside
        }
    }

    fn label(&self) -> String {
        match self.kind.as_str() {
            "test" => format!("{} tests/{}.rs", self.package, self.name),
            kind => format!("{} ({kind} {})", self.package, self.name),
        }
    }

    /// The binary run with `args` and `env`, at `nice` if given.
    fn command(&self, args: &[String], env: &[(String, OsString)], nice: Option<u8>) -> Command {
        let mut c = match nice {
            Some(n) => {
                let mut c = Command::new("nice");
                c.arg("-n").arg(n.to_string()).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        c.args(args)
            .current_dir(&self.dir)
            .env("CARGO_MANIFEST_DIR", &self.dir)
            .env("CARGO_PKG_NAME", &self.package);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }
}

/// The test executables in `cargo test --no-run --message-format=json` output, in the order
/// `cargo test` runs them (package, then unit tests before integration tests, then name).
pub fn parse_artifacts(json: &str) -> Result<Vec<TestBinary>> {
    let mut out = Vec::new();
    for line in json.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo's message {line}"))?;
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        let manifest = v["manifest_path"]
            .as_str()
            .context("an artifact without manifest_path")?;
        let target = &v["target"];
        let kind = target["kind"][0].as_str().unwrap_or("lib").to_string();
        // `package_id` is `path+file:///...#name@version` (or `...#version` when the
        // directory is the name); the manifest's directory names the package as cargo does.
        let package = v["package_id"]
            .as_str()
            .and_then(package_name)
            .context("an artifact without a package name")?;
        out.push(TestBinary {
            package,
            name: target["name"].as_str().unwrap_or_default().to_string(),
            kind,
            exe: PathBuf::from(exe),
            dir: Path::new(manifest)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        });
    }
    let rank = |k: &str| match k {
        "lib" => 0,
        "bin" => 1,
        _ => 2,
    };
    out.sort_by(|a, b| {
        (&a.package, rank(&a.kind), &a.name).cmp(&(&b.package, rank(&b.kind), &b.name))
    });
    out.dedup_by(|a, b| a.exe == b.exe);
    Ok(out)
}

/// The package's name in a package id: `path+file:///w/tests#stork-tests@0.1.0` or
/// `path+file:///w/xtask#0.1.0` (the directory is the name).
fn package_name(id: &str) -> Option<String> {
    let (url, frag) = id.rsplit_once('#')?;
    match frag.split_once('@') {
        Some((name, _)) => Some(name.to_string()),
        None => url.rsplit('/').next().map(str::to_string),
    }
}

/// Runs every binary with `args` and `env`: the [`ALONE`] ones first, then the [`VMS`] ones
/// `jobs` at a time with every other binary one at a time beside them. Fails, after all have
/// run, if any failed, repeating why each test failed.
pub fn run(
    binaries: &[TestBinary],
    args: &[String],
    env: &[(String, OsString)],
    logs: &Path,
) -> Result<()> {
    let jobs = std::env::var("STORK_TEST_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .filter(|&j| j > 0)
        .unwrap_or(JOBS);
    let mut summary = Summary::default();
    let mut ended = Vec::new();
    let of =
        |lane: Lane| -> Vec<&TestBinary> { binaries.iter().filter(|b| b.lane() == lane).collect() };
    for b in of(Lane::Alone) {
        println!("     Running {} ({})", b.label(), b.exe.display());
        let started = Instant::now();
        let status = pass_through(&mut b.command(args, env, None), &mut summary)?;
        ended.push(Ended {
            label: b.label(),
            took: started.elapsed(),
            passed: status.success(),
        });
    }
    let mut vms = of(Lane::Vms);
    vms.sort_by_key(|b| VMS.iter().position(|n| *n == b.name));
    std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let lanes = vec![
        Side {
            queue: vms.into(),
            jobs,
            nice: Some(VM_NICE),
        },
        Side {
            queue: of(Lane::Beside).into(),
            jobs: 1,
            nice: None,
        },
    ];
    ended.extend(concurrently(
        lanes,
        args,
        env,
        logs,
        &mut summary,
        &mut std::io::stdout(),
    )?);
    println!("{}", longest(&ended, LONGEST));
    summary.close();
    let failed: Vec<&str> = ended
        .iter()
        .filter(|e| !e.passed)
        .map(|e| e.label.as_str())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    summary.report();
    bail!("test binaries failed: {}", failed.join(", "))
}

/// How many binaries [`longest`] names at the end of a run.
const LONGEST: usize = 12;

/// A binary that ran: how long it took (beside others, outside the alone lane) and
/// whether it passed.
#[derive(Debug)]
struct Ended {
    label: String,
    took: Duration,
    passed: bool,
}

/// The `n` binaries that took longest, longest first, one per line: where the next cut in a
/// run's time is (docs/measurements.md, CI time).
fn longest(ended: &[Ended], n: usize) -> String {
    let mut by_time: Vec<&Ended> = ended.iter().collect();
    by_time.sort_by_key(|e| std::cmp::Reverse(e.took));
    let mut text = format!("     The {} longest test binaries:", n.min(by_time.len()));
    for e in by_time.iter().take(n) {
        text.push_str(&format!(
            "\n     {:>6.0} s  {}",
            e.took.as_secs_f64(),
            e.label
        ));
    }
    text
}

/// Binaries run side by side with others: up to `jobs` of `queue` at once, at `nice`.
struct Side<'a> {
    queue: VecDeque<&'a TestBinary>,
    jobs: usize,
    nice: Option<u8>,
}

struct Running<'a> {
    binary: &'a TestBinary,
    /// Its lane's index.
    side: usize,
    child: Child,
    log: PathBuf,
    started: Instant,
}

/// Runs each lane's binaries, at most its `jobs` at a time, every lane at once; each
/// binary's output goes into a file under `logs` that is printed and read when it ends.
/// Returns each binary as it ended.
fn concurrently(
    mut lanes: Vec<Side<'_>>,
    args: &[String],
    env: &[(String, OsString)],
    logs: &Path,
    summary: &mut Summary,
    out: &mut dyn Write,
) -> Result<Vec<Ended>> {
    let mut running: Vec<Running> = Vec::new();
    let mut ended = Vec::new();
    let mut said = Instant::now();
    while lanes.iter().any(|l| !l.queue.is_empty()) || !running.is_empty() {
        for (side, lane) in lanes.iter_mut().enumerate() {
            while running.iter().filter(|r| r.side == side).count() < lane.jobs {
                let Some(b) = lane.queue.pop_front() else {
                    break;
                };
                let log = logs.join(format!("{}-{}-{}.log", b.package, b.kind, b.name));
                let file =
                    File::create(&log).with_context(|| format!("creating {}", log.display()))?;
                let child = b
                    .command(args, env, lane.nice)
                    .stdout(file.try_clone()?)
                    .stderr(file)
                    .spawn()
                    .with_context(|| format!("cannot run {}", b.exe.display()))?;
                eprintln!(
                    "     Started {} ({} of its lane at once{}; its output when it ends)",
                    b.label(),
                    lane.jobs,
                    lane.nice.map(|n| format!(", nice {n}")).unwrap_or_default()
                );
                running.push(Running {
                    binary: b,
                    side,
                    child,
                    log,
                    started: Instant::now(),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].child.try_wait()? else {
                i += 1;
                continue;
            };
            let r = running.swap_remove(i);
            let took = r.started.elapsed();
            let _ = writeln!(
                out,
                "     Finished {} ({}) in {:.0} s, beside others; its output:",
                r.binary.label(),
                r.binary.exe.display(),
                took.as_secs_f64()
            );
            let mut text = String::new();
            File::open(&r.log)
                .and_then(|mut f| f.read_to_string(&mut text))
                .with_context(|| format!("reading {}", r.log.display()))?;
            for line in text.lines() {
                let _ = writeln!(out, "{line}");
                summary.feed(line);
            }
            summary.close();
            ended.push(Ended {
                label: r.binary.label(),
                took,
                passed: status.success(),
            });
        }
        if !running.is_empty() && said.elapsed() >= PROGRESS {
            said = Instant::now();
            let names: Vec<String> = running
                .iter()
                .map(|r| {
                    format!(
                        "{} ({:.0} s)",
                        r.binary.label(),
                        r.started.elapsed().as_secs_f64()
                    )
                })
                .collect();
            eprintln!("     Still running: {}", names.join(", "));
        }
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#stork-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"deploy"},"profile":{"test":true},"executable":"/w/target/debug/deps/deploy-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#stork-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"stork_tests"},"profile":{"test":true},"executable":"/w/target/debug/deps/stork_tests-2"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#stork-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"stork_tests"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-3"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#stork-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"dhcp"},"profile":{"test":true},"executable":"/w/target/debug/deps/dhcp-4"}
{"reason":"build-finished","success":true}
"#;

    #[test]
    fn reads_the_test_executables_in_cargos_order_and_picks_the_vm_binaries() {
        let b = parse_artifacts(JSON).unwrap();
        let got: Vec<(&str, &str, &str)> = b
            .iter()
            .map(|b| (b.package.as_str(), b.kind.as_str(), b.name.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("stork-tests", "lib", "stork_tests"),
                ("stork-tests", "test", "deploy"),
                ("stork-tests", "test", "dhcp"),
                ("xtask", "bin", "xtask"),
            ]
        );
        assert_eq!(b[1].dir, Path::new("/w/tests"));
        assert_eq!(b[1].exe, Path::new("/w/target/debug/deps/deploy-1"));
        let lanes: Vec<Lane> = b.iter().map(TestBinary::lane).collect();
        assert_eq!(lanes, [Lane::Beside, Lane::Vms, Lane::Beside, Lane::Beside]);
        // An alone binary by its name in any package; a VM binary's name on a unit-test
        // binary is not one.
        let os_image = TestBinary {
            package: "stork-image".into(),
            name: "os_image".into(),
            ..b[1].clone()
        };
        assert_eq!(os_image.lane(), Lane::Alone);
        let lib = TestBinary {
            kind: "lib".into(),
            ..b[1].clone()
        };
        assert_eq!(lib.lane(), Lane::Beside);
        assert!(parse_artifacts("{not json").is_err());
    }

    /// Real processes: two lanes at once, each binary's output whole and in one piece, the
    /// failing one named and its panic kept, each lane at its own priority.
    #[test]
    fn concurrent_binaries_output_stays_whole_and_failures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            TestBinary {
                package: E2E_PACKAGE.into(),
                name: name.into(),
                kind: "test".into(),
                exe: p,
                dir: dir.path().to_path_buf(),
            }
        };
        let ok = script(
            "deploy",
            "echo one; sleep 1; echo \"two $1 $STORK_X $(basename $PWD) $(nice)\"; echo 'test result: ok.'",
        );
        let beside = script("fleet", "echo \"beside $(nice)\"");
        let bad = script(
            "ipv6",
            "printf -- '---- t stdout ----\\nthread panicked at x.rs:1:\\nwhy\\n\\nfailures:\\n' >&2; exit 101",
        );
        let env = vec![("STORK_X".to_string(), OsString::from("x"))];
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let mut summary = Summary::default();
        let mut printed = Vec::new();
        let lanes = vec![
            Side {
                queue: [&ok, &bad].into(),
                jobs: 2,
                nice: Some(VM_NICE),
            },
            Side {
                queue: [&beside].into(),
                jobs: 1,
                nice: None,
            },
        ];
        let ended = concurrently(
            lanes,
            &["--include-ignored".to_string()],
            &env,
            &logs,
            &mut summary,
            &mut printed,
        )
        .unwrap();
        let failed: Vec<&str> = ended
            .iter()
            .filter(|e| !e.passed)
            .map(|e| e.label.as_str())
            .collect();
        // The one that slept is the longest; each is named once.
        let named = longest(&ended, 2);
        assert!(
            named.starts_with("     The 2 longest test binaries:\n"),
            "{named}"
        );
        assert!(
            named.lines().nth(1).unwrap().ends_with(&ok.label()),
            "{named}"
        );
        assert_eq!(named.lines().count(), 3, "{named}");
        // Each binary's output printed in one piece after its own heading.
        let printed = String::from_utf8(printed).unwrap();
        assert!(
            printed.contains("tests/deploy.rs (") && printed.contains("one\ntwo --include-ignored"),
            "{printed}"
        );
        assert_eq!(failed, vec![bad.label().as_str()]);
        let log = std::fs::read_to_string(logs.join("stork-tests-test-deploy.log")).unwrap();
        let dir_name = dir.path().file_name().unwrap().to_string_lossy();
        let ours: i32 = String::from_utf8(Command::new("nice").output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let lower = (ours + i32::from(VM_NICE)).min(19);
        assert_eq!(
            log,
            format!("one\ntwo --include-ignored x {dir_name} {lower}\ntest result: ok.\n")
        );
        let log = std::fs::read_to_string(logs.join("stork-tests-test-fleet.log")).unwrap();
        assert_eq!(log, format!("beside {ours}\n"));
        summary.close();
        assert_eq!(summary.failed.len(), 1);
        assert_eq!(summary.failed[0].0, "t");
        assert_eq!(
            summary.failed[0].1,
            vec![
                "thread panicked at x.rs:1:".to_string(),
                "why".into(),
                "".into()
            ]
        );
    }

    #[test]
    fn package_names_from_ids() {
        assert_eq!(
            package_name("path+file:///w/tests#stork-tests@0.1.0").as_deref(),
            Some("stork-tests")
        );
        assert_eq!(
            package_name("path+file:///w/xtask#0.1.0").as_deref(),
            Some("xtask")
        );
        assert_eq!(package_name("no-fragment"), None);
    }
}
