//! A PostgreSQL server of its own for a test or a bench: Debian's binaries (package
//! `postgresql`), a fresh cluster in a temporary directory, listening on a unix socket in
//! that directory only (no TCP port, so nothing outside the test can reach it), stopped and
//! removed on drop, and killed with the process that started it. No system service or
//! cluster is touched.
//!
//! PostgreSQL refuses to run as root; run as root, the server runs as the `postgres` user
//! the package creates.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Spawned, wait_for};

/// Debian keeps each major version's server programs in `/usr/lib/postgresql/<major>/bin`;
/// the newest installed is used.
pub fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql: is the `postgresql` package installed?")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!("no initdb under /usr/lib/postgresql/*/bin: install `postgresql`"),
    }
}

/// The role every scratch cluster is made with (its superuser, trusted on the socket).
pub const USER: &str = "stork";

pub struct ScratchPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    server: Option<Spawned>,
    starts: u32,
}

impl ScratchPostgres {
    /// Creates the cluster and starts the server; returns once it accepts connections.
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("stork-pg-")
            .tempdir()
            .context("temporary directory")?;
        let owner = server_owner()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown {}", dir.path().display()))?;
        }
        let mut me = Self {
            dir,
            bin,
            owner,
            server: None,
            starts: 0,
        };
        let out = me
            .command("initdb")
            .arg("-D")
            .arg(me.data())
            .args(["-U", USER, "--auth=trust", "--encoding=UTF8", "--locale=C"])
            .arg("--no-sync")
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        me.run()?;
        Ok(me)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A program of the server's version, run as the server's owner.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
            // The programs read their working directory; root's may be closed to them.
            c.current_dir("/");
        }
        c
    }

    /// Starts the server on the cluster and waits until it accepts connections.
    fn run(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self.dir.path().join(format!("server-{}.log", self.starts));
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.dir.path())
            // No TCP listener at all: the unix socket in `dir` is the only way in.
            .args(["-c", "listen_addresses=", "-c", "max_connections=200"]);
        let server = Spawned::start("postgres", cmd, &log)?;
        if let Some((uid, gid)) = self.owner {
            // Spawned made the log as us; the server appends to it as itself.
            let _ = std::os::unix::fs::chown(&log, Some(uid), Some(gid));
        }
        self.server = Some(server);
        let ready = self.bin.join("pg_isready");
        let socket = self.dir.path().to_path_buf();
        let server = self.server.as_mut().context("server")?;
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                if let Some(st) = server.exited() {
                    bail!("postgres exited ({st}):\n{}", server.log_tail(20));
                }
                let ok = Command::new(&ready)
                    .arg("-q")
                    .arg("-h")
                    .arg(&socket)
                    .args(["-U", USER, "-d", "postgres"])
                    .status()
                    .is_ok_and(|s| s.success());
                Ok(ok.then_some(()))
            },
        )
    }

    /// The directory of the server's socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `name` (see [`ScratchPostgres::create_database`]).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgresql://{USER}@localhost/{name}?host={}",
            self.dir.path().display()
        )
    }

    /// Creates an empty database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.dir.path())
            .args(["-U", USER, name])
            .output()
            .context("running createdb")?;
        if !out.status.success() {
            bail!(
                "createdb {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(self.url(name))
    }

    /// Stops the server at once, as a crash would (`SIGQUIT`: no checkpoint; the next start
    /// replays the write-ahead log), and starts it again on the same data: what a
    /// PostgreSQL restart looks like to its clients.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.run()
    }

    /// The server's logs so far.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("server-{n}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // SIGQUIT, not Spawned's SIGKILL: the postmaster takes its backends down with
            // it, so their shared memory does not block the next start.
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(server.pid() as i32, libc::SIGQUIT) };
            let _ = wait_for(
                "postgres to stop",
                Duration::from_secs(30),
                Duration::from_millis(50),
                || Ok(server.exited().map(|_| ())),
            );
        }
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Who runs the server: us (`None`), or, when we are root, the `postgres` user.
fn server_owner() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: getpwnam is given a NUL-terminated string; the record it returns is read at
    // once, before any other call that could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!(
            "PostgreSQL will not run as root and there is no `postgres` user: install the \
             `postgresql` package"
        );
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}
