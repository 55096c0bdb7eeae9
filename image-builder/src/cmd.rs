//! Running the reference tools (debootstrap, mksquashfs, mke2fs, tar, ...) with their errors
//! kept: a failed tool's message names the command, its exit status and the end of what it
//! printed, and a missing tool names the Debian package that provides it.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Lines of a failed tool's output kept in its error.
const TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run {program} (Debian package {package}; `cargo xtask deps` installs it)")]
    Spawn {
        program: String,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}){}\n{tail}", log.as_ref().map(|l| format!("; full log in {}", l.display())).unwrap_or_default())]
    Failed {
        command: String,
        status: String,
        tail: String,
        log: Option<PathBuf>,
    },
    #[error("creating log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The Debian package a program comes from, for the "is it installed?" hint.
fn package_of(program: &str) -> &'static str {
    match program {
        "debootstrap" => "debootstrap",
        "mksquashfs" | "unsquashfs" => "squashfs-tools",
        "mcopy" | "mmd" | "mdir" => "mtools",
        "mkfs.vfat" | "mkfs.fat" | "fsck.vfat" => "dosfstools",
        "mke2fs" | "e2fsck" | "debugfs" => "e2fsprogs",
        "sgdisk" => "gdisk",
        "tar" => "tar",
        "zstd" => "zstd",
        "unshare" | "mount" => "util-linux / mount",
        "dpkg" | "dpkg-deb" | "dpkg-query" => "dpkg",
        "apt-get" | "apt-config" => "apt",
        _ => "coreutils",
    }
}

/// `program arg arg ...` for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn spawn_err(cmd: &Command) -> impl FnOnce(io::Error) -> CmdError + '_ {
    move |source| {
        let program = cmd.get_program().to_string_lossy().into_owned();
        CmdError::Spawn {
            package: package_of(&program),
            program,
            source,
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to completion with stdout and stderr captured; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output, CmdError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(spawn_err(cmd))?;
    if out.status.success() {
        return Ok(out);
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    Err(CmdError::Failed {
        command: describe(cmd),
        status: out.status.to_string(),
        tail: last_lines(text.trim_end(), TAIL_LINES),
        log: None,
    })
}

/// Runs `cmd` with stdout and stderr appended to `log`: for tools as chatty as debootstrap and
/// apt-get, whose output matters only when they fail.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<(), CmdError> {
    let log_err = |source| CmdError::Log {
        path: log.to_owned(),
        source,
    };
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    let err = file.try_clone().map_err(log_err)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(spawn_err(cmd))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Err(CmdError::Failed {
        command: describe(cmd),
        status: status.to_string(),
        tail: last_lines(text.trim_end(), TAIL_LINES),
        log: Some(log.to_owned()),
    })
}

/// A command with a clean environment: tools behave the same whatever the caller's locale,
/// and nothing of the caller's environment leaks into images.
pub fn clean(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("HOME", "/root");
    // apt and debootstrap honour a proxy from the environment (the host's apt proxy is added
    // by `sources::proxy_env`); keep the caller's if set.
    for var in ["http_proxy", "https_proxy", "no_proxy"] {
        if let Some(v) = std::env::var_os(var) {
            c.env(var, v);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_status_and_output_tail() {
        let e = run(Command::new("sh").args(["-c", "echo one; echo two >&2; exit 3"])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("two"), "{msg}");

        let e = run(&mut Command::new("mksquashfs-not-here")).unwrap_err();
        assert!(matches!(e, CmdError::Spawn { .. }));
    }

    #[test]
    fn logged_failures_point_at_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("x.log");
        run_logged(Command::new("sh").args(["-c", "echo fine"]), &log).unwrap();
        let e = run_logged(Command::new("sh").args(["-c", "echo broken; exit 1"]), &log)
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken") && e.contains("x.log"), "{e}");
        assert_eq!(fs::read_to_string(&log).unwrap(), "fine\nbroken\n");
    }
}
