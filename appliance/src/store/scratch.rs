//! A PostgreSQL server of its own for a test or a bench: Debian's binaries (package
//! `postgresql`), a fresh cluster in a temporary directory, listening on a unix socket in
//! that directory only (no TCP port, so nothing outside the test can reach it), stopped and
//! removed on drop. No system service or cluster is touched.
//!
//! PostgreSQL refuses to run as root; run as root, the server runs as the `postgres` user
//! the package creates.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

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

pub struct ScratchPostgres {
    dir: tempfile::TempDir,
    server: Child,
}

impl ScratchPostgres {
    /// Creates the cluster and starts the server; returns once it accepts connections.
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("stork-pg-")
            .tempdir()
            .context("temporary directory")?;
        let owner = Owner::of_server()?;
        owner.give(dir.path())?;
        let data = dir.path().join("data");
        let out = owner
            .command(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "stork",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        owner.give(&dir.path().join("server.log"))?;
        let server = owner
            .command(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            // No TCP listener at all: the unix socket in `dir` is the only way in.
            .args(["-c", "listen_addresses=", "-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        let mut me = Self { dir, server };
        me.wait_ready()?;
        Ok(me)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.server.try_wait()? {
                bail!("postgres exited ({status}): {}", self.log());
            }
            if postgres::Config::new()
                .host_path(self.dir.path())
                .user("stork")
                .dbname("postgres")
                .connect(postgres::NoTls)
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not accept connections in 60 s: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far (for a failure's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The directory of the server's socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `name` (see [`ScratchPostgres::create_database`]).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgresql://stork@localhost/{name}?host={}",
            self.dir.path().display()
        )
    }

    /// Creates an empty database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let mut c = postgres::Config::new()
            .host_path(self.dir.path())
            .user("stork")
            .dbname("postgres")
            .connect(postgres::NoTls)?;
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Stops the server at once (as a crash would) and starts it again on the same data:
    /// what a PostgreSQL restart looks like to its clients.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let bin = bin_dir()?;
        let owner = Owner::of_server()?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("server.log"))?;
        self.server = owner
            .command(bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=", "-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("restarting postgres")?;
        self.wait_ready()
    }

    fn stop(&mut self) {
        // SIGQUIT: immediate shutdown, no checkpoint (recovery replays the WAL at start).
        let pid = nix::unistd::Pid::from_raw(self.server.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let _ = self.server.wait();
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Who runs the server: us, or `postgres` when we are root.
struct Owner(Option<nix::unistd::User>);

impl Owner {
    fn of_server() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Owner(None));
        }
        match nix::unistd::User::from_name("postgres")? {
            Some(u) => Ok(Owner(Some(u))),
            None => bail!(
                "PostgreSQL will not run as root and there is no `postgres` user: install the \
                 `postgresql` package"
            ),
        }
    }

    fn give(&self, path: &Path) -> Result<()> {
        if let Some(u) = &self.0 {
            nix::unistd::chown(path, Some(u.uid), Some(u.gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    fn command(&self, program: PathBuf) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(program);
        if let Some(u) = &self.0 {
            c.uid(u.uid.as_raw()).gid(u.gid.as_raw());
            // initdb reads the current directory; root's may be closed to the user.
            c.current_dir("/");
        }
        c
    }
}
