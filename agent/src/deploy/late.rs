//! Late commands: the user's shell commands run in the installed OS before its first boot
//! (what MAAS and curtin call late commands), chrooted into its root with `/dev`, `/proc`
//! and `/sys` mounted there, one after another; the first that fails stops the deploy.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// How long one command may run.
pub const TIMEOUT: Duration = Duration::from_secs(600);
/// How much of a command's output (stdout and stderr together) is kept: its end.
pub const OUTPUT_TAIL: usize = 2048;
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What one command did.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    /// The last [`OUTPUT_TAIL`] bytes it wrote, lossily UTF-8.
    pub output: String,
}

/// Runs `commands` in order chrooted into `root`, `done(n, command, ran)` after each;
/// fails at the first whose exit status is not 0 (or that outlasts [`TIMEOUT`]), naming it,
/// its status and its output.
pub fn run_all(
    root: &Path,
    commands: &[String],
    mut done: impl FnMut(usize, &str, &Ran),
) -> Result<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let _mounts = Mounts::new(root)?;
    for (n, command) in commands.iter().enumerate() {
        let ran = run_one(root, command)
            .with_context(|| format!("late command {} ({command:?})", n + 1))?;
        done(n + 1, command, &ran);
        if !ran.status.success() {
            bail!(
                "late command {} ({command:?}) {}: {}",
                n + 1,
                describe(ran.status),
                ran.output.trim()
            );
        }
    }
    Ok(())
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// `/bin/sh -c command` chrooted into `root`, stdin empty, a clean environment.
fn run_one(root: &Path, command: &str) -> Result<Ran> {
    let root_c = CString::new(root.as_os_str().as_bytes()).context("root path")?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8");
    // SAFETY: between fork and exec the child only calls chroot(2) and chdir(2) on
    // strings made before the fork: async-signal-safe, no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = capture(cmd, TIMEOUT, OUTPUT_TAIL).context("start /bin/sh in the installed root")?;
    match out.status {
        Some(status) => Ok(Ran {
            status,
            output: out.output,
        }),
        None => bail!("still running after {TIMEOUT:?}: killed"),
    }
}

/// What [`capture`] saw of a command.
#[derive(Debug)]
pub struct Captured {
    /// `None`: it outlasted its timeout and was killed.
    pub status: Option<ExitStatus>,
    /// The last bytes it wrote to stdout and stderr together (the tail asked for), lossily
    /// UTF-8.
    pub output: String,
    pub elapsed: Duration,
}

/// Runs `cmd`, its stdout and stderr into one pipe of which the last `tail` bytes are kept,
/// for at most `timeout` (then killed). Also what commissioning scripts run through.
pub fn capture(mut cmd: Command, timeout: Duration, tail: usize) -> Result<Captured> {
    let (mut reader, writer) = std::io::pipe().context("pipe")?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone().context("pipe")?)
        .stderr(writer)
        // A group of its own: a timeout kills what it started too, which would otherwise
        // keep the pipe (and the output) open.
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    // The command builder holds the pipe's write ends: dropped, the read sees the end
    // once the child (and what it started) closes its own.
    drop(cmd);
    let keeper = std::thread::spawn(move || {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > tail {
                kept.drain(..kept.len() - tail);
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    });
    let deadline = started + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    // A background process the command left holding the pipe would keep the reader
    // waiting: what it wrote so far is enough once the command itself has ended. After a
    // timeout the whole group was killed and closes the pipe as soon as the kernel has
    // delivered the signals, which on a loaded machine takes longer than a clean exit.
    let grace = Instant::now()
        + if status.is_none() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(200)
        };
    while !keeper.is_finished() && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = if keeper.is_finished() {
        keeper.join().unwrap_or_default()
    } else {
        "(output still open by a process the command started)".to_string()
    };
    Ok(Captured {
        status,
        output,
        elapsed,
    })
}

/// `/dev` (bound), `/proc` and `/sys` inside the installed root while the commands run;
/// unmounted in reverse order when dropped.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn new(root: &Path) -> Result<Self> {
        let mut done = Self(Vec::new());
        for (source, dir, fstype, flags) in [
            ("/dev", "dev", None, MsFlags::MS_BIND | MsFlags::MS_REC),
            ("proc", "proc", Some("proc"), MsFlags::empty()),
            ("sysfs", "sys", Some("sysfs"), MsFlags::empty()),
        ] {
            let target = root.join(dir);
            std::fs::create_dir_all(&target)
                .with_context(|| format!("create {}", target.display()))?;
            mount(Some(source), &target, fstype, flags, None::<&str>)
                .with_context(|| format!("mount {source} on {}", target.display()))?;
            done.0.push(target);
        }
        Ok(done)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            // Detached: a process a command left behind must not keep the root mounted.
            let _ = umount2(target, MntFlags::MNT_DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_run_touches_nothing() {
        let mut calls = 0;
        run_all(Path::new("/nonexistent"), &[], |_, _, _| calls += 1).unwrap();
        assert_eq!(calls, 0);
    }

    #[test]
    fn exit_statuses_read_as_people_say_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exited 3");
        assert_eq!(describe(ExitStatus::from_raw(9)), "was killed by signal 9");
    }
}
